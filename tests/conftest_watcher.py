"""Helpers for the watcher tests: raw nights written file by file, a stand-in for Slack's Web
API, the watcher run in-process, the stages' events published from the test, and readers
of the stream and the ledger.

Import from a test file after putting this folder on ``sys.path``.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
from astropy.io import fits

from gppy import bus, naming
from gppy.config import Settings
from gppy.fitsio import write_fits
from gppy.messages import (
    DifferenceDone,
    FrameCalibrated,
    FrameSolved,
    NightPlan,
    NightReady,
    PhotometryDone,
    PlannedFrame,
    StackDone,
    parse,
)

UNIT = "7DT01"


# ------------------------------------------------------------------------ raw nights
def raw_fits_bytes(i: int, obj: str = "T00001", filt: str = "m425", shape=(96, 128),
                   imagetyp: str = "LIGHT") -> bytes:
    """A small raw frame (uint16 as BITPIX 16 + BZERO) with the v1 header keys."""
    rng = np.random.default_rng(i)
    data = rng.integers(900, 1100, size=shape).astype(np.uint16)
    hdu = fits.PrimaryHDU(data)
    h = hdu.header
    h["IMAGETYP"] = imagetyp
    h["OBJECT"] = obj
    h["FILTER"] = filt
    h["EXPTIME"] = 60.0
    h["DATE-OBS"] = f"2025-01-02T03:{i // 60:02d}:{i % 60:02d}.000"
    h["GAIN"] = 2750
    buf = io.BytesIO()
    hdu.writeto(buf)
    return buf.getvalue()


def raw_name(i: int, obj: str = "T00001", filt: str = "m425") -> str:
    return f"{UNIT}_20250102_03{i // 60:02d}{i % 60:02d}_{obj}_{filt}_1x1_60.0s_{i:04d}.fits"


def night_dir(settings: Settings, name: str, unit: str = UNIT) -> Path:
    return Path(settings.paths().path_obsdata) / unit / name


def write_raw(folder: Path, i: int, truncate_to: float | None = None, **kw) -> Path:
    """Write raw frame ``i`` into ``folder`` (optionally only the first fraction of its bytes)."""
    folder.mkdir(parents=True, exist_ok=True)
    data = raw_fits_bytes(i, **kw)
    if truncate_to is not None:
        data = data[: int(len(data) * truncate_to)]
    p = folder / raw_name(i, kw.get("obj", "T00001"), kw.get("filt", "m425"))
    p.write_bytes(data)
    return p


# ------------------------------------------------------------------------ a stand-in for Slack
@dataclass
class SlackStandIn:
    """``POST <base>/chat.postMessage`` like Slack's Web API; records what it receives.

    ``down()`` closes the listening socket (connection refused), ``up()`` re-opens it on the
    same port; ``token`` is the only accepted bearer token (others get ``invalid_auth``).
    """

    token: str = "xoxb-test-token"
    port: int = 0
    messages: list[dict] = field(default_factory=list)
    requests: int = 0
    answers: list[int] = field(default_factory=list)  # HTTP codes to answer first (429, 503...)
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/"

    def up(self) -> SlackStandIn:
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                stand_in.requests += 1
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if stand_in.answers:
                    code = stand_in.answers.pop(0)
                    if code == 429:
                        self.send_response(429)
                        self.send_header("Retry-After", "1")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                    else:
                        self._reply(code, {"ok": False, "error": "internal_error"})
                    return
                if self.path != "/api/chat.postMessage":
                    self._reply(404, {"ok": False, "error": "unknown_method"})
                    return
                if self.headers.get("Authorization") != f"Bearer {stand_in.token}":
                    self._reply(200, {"ok": False, "error": "invalid_auth"})
                    return
                payload = json.loads(body or b"{}")
                stand_in.messages.append({"channel": payload.get("channel"), "text": payload.get("text", ""),
                                          "t": time.time()})
                self._reply(200, {"ok": True, "channel": payload.get("channel"), "ts": f"{time.time():.6f}"})

            def _reply(self, code: int, obj: dict):
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def down(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def texts(self) -> list[str]:
        return [m["text"] for m in self.messages]


# ------------------------------------------------------------------------ bus helpers
async def stream_events(settings: Settings, subject: str = "gppy.>") -> list[tuple[str, bytes]]:
    """Every message of the stream on ``subject`` (an ordered, ephemeral consumer)."""
    nc = await bus.connect(settings, "test-read")
    js = nc.jetstream()
    out = []
    try:
        info = await js.stream_info(settings.stream)
        if info.state.messages == 0:
            return []
        sub = await js.subscribe(subject, ordered_consumer=True)
        while True:
            try:
                msg = await sub.next_msg(timeout=0.5)
            except Exception:
                break
            out.append((msg.subject, msg.data))
    finally:
        await nc.close()
    return out


async def readies(settings: Settings, night_id: str | None = None) -> list[NightReady]:
    evs = [parse(d) for s, d in await stream_events(settings, "gppy.*.night.ready")]
    return [e for e in evs if night_id is None or e.night_id == night_id]


async def dones(settings: Settings, night_id: str | None = None) -> list:
    evs = [parse(d) for s, d in await stream_events(settings, "gppy.*.night.done")]
    return [e for e in evs if night_id is None or e.night_id == night_id]


async def ledger_record(settings: Settings, night_id: str) -> dict | None:
    from gppy_watcher.ledger import bucket_name, record_key

    nc = await bus.connect(settings, "test-ledger")
    try:
        kv = await nc.jetstream().key_value(bucket_name(settings))
        entry = await kv.get(record_key(night_id))
        return json.loads(entry.value)
    except Exception:
        return None
    finally:
        await nc.close()


async def wait_for(cond, timeout: float = 60.0, what: str = "condition", step: float = 0.1):
    """Poll the (sync or async) condition until it is truthy; returns its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(step)


class Publisher:
    """Publishes events as the stages would (content-derived message ids)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.nc = None
        self.js = None

    async def __aenter__(self) -> Publisher:
        self.nc = await bus.connect(self.settings, "test-stages")
        self.js = self.nc.jetstream()
        await bus.ensure_stream(self.js, self.settings)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.nc.close()

    async def __call__(self, *events) -> None:
        for ev in events:
            await bus.publish(self.js, ev, self.settings.subject_prefix)

    async def dead_letter(self, stage: str, reason: str, event) -> None:
        await bus.dead_letter(self.js, self.settings.subject_prefix, stage, reason, event.subject(),
                              event.to_bytes(), self.settings.max_deliver)


# ------------------------------------------------------------------------ a simulated night's products
@dataclass
class SimFrame:
    raw: str
    calib: Path
    obj: str
    filt: str
    visit: str
    date_obs: str


@dataclass
class SimNight:
    """The products and events of a processed night, made up in the test (truth)."""

    ready: NightReady
    processed: Path
    frames: list[SimFrame]

    @classmethod
    def make(cls, settings: Settings, ready: NightReady, visits: dict[str, list[int]],
             obj: str = "T00001", filt: str = "m425") -> SimNight:
        processed = Path(settings.paths().path_processed)
        dirs = naming.ProductDirs.of(processed, obj, ready.unit, filt)
        frames = []
        for visit, idx in visits.items():
            for i in idx:
                date_obs = f"2025-01-02T03:{i // 60:02d}:{i % 60:02d}.000"
                calib = dirs.base / naming.calib_name(ready.unit, obj, date_obs, filt, 60.0)
                frames.append(SimFrame(str(Path(ready.night_dir) / raw_name(i, obj, filt)), calib, obj, filt, visit,
                                       date_obs))
        return cls(ready, processed, frames)

    def _lane(self) -> dict:
        r = self.ready
        return {"night_id": r.night_id, "unit": r.unit, "lane": r.lane}

    @staticmethod
    def write_image(path: Path, obj: str, filt: str, kind: str) -> None:
        h = fits.Header()
        h["OBJECT"] = obj
        h["FILTER"] = filt
        h["PRODKIND"] = kind
        write_fits(path, np.zeros((8, 8), np.float32), h)

    def plan(self, rejected: dict[str, str] | None = None) -> NightPlan:
        return NightPlan(**self._lane(), night_dir=self.ready.night_dir, rejected=rejected or {}, frames=[
            PlannedFrame(raw_path=f.raw, calib_path=str(f.calib), object=f.obj, filter=f.filt, exptime=60.0,
                         date_obs=f.date_obs, visit=f.visit) for f in self.frames])

    def calibrated(self, f: SimFrame, write: bool = True) -> FrameCalibrated:
        w, m = naming.weight_of(f.calib), naming.flag_of(f.calib)
        if write:
            for p, k in ((f.calib, "single"), (w, "weight"), (m, "mask")):
                self.write_image(p, f.obj, f.filt, k)
        return FrameCalibrated(**self._lane(), path=str(f.calib), weight_path=str(w), mask_path=str(m),
                               raw_path=f.raw, object=f.obj, filter=f.filt, exptime=60.0, date_obs=f.date_obs,
                               visit=f.visit)

    def solved(self, f: SimFrame, ok: bool = True, reason: str = "") -> FrameSolved:
        return FrameSolved(**self._lane(), path=str(f.calib), weight_path=str(naming.weight_of(f.calib)),
                           mask_path=str(naming.flag_of(f.calib)), object=f.obj, filter=f.filt, exptime=60.0,
                           date_obs=f.date_obs, visit=f.visit, ok=ok, reason=reason, nstars=40 if ok else 0)

    def phot(self, path: Path, kind: str, ok: bool = True, reason: str = "") -> PhotometryDone:
        cat = naming.phot_catalogue(path, naming.ProductDirs(path.parent if kind != "difference"
                                                             else path.parent.parent))
        return PhotometryDone(**self._lane(), image_path=str(path), image_kind=kind, ok=ok, reason=reason,
                              catalogue_path=str(cat) if ok else "")

    def stack_path(self, visit: str) -> Path:
        f = [f for f in self.frames if f.visit == visit][0]
        n = sum(1 for g in self.frames if g.visit == visit)
        return f.calib.parent / naming.stack_name(self.ready.unit, f.obj, f.date_obs, f.filt, 60.0 * n)

    def stacked(self, visit: str, write: bool = True) -> StackDone:
        p = self.stack_path(visit)
        fs = [f for f in self.frames if f.visit == visit]
        if write:
            for q, k in ((p, "stack"), (naming.weight_of(p), "weight"), (naming.flag_of(p), "mask")):
                self.write_image(q, fs[0].obj, fs[0].filt, k)
        return StackDone(**self._lane(), path=str(p), weight_path=str(naming.weight_of(p)),
                         mask_path=str(naming.flag_of(p)), object=fs[0].obj, filter=fs[0].filt, visit=visit,
                         input_paths=[str(f.calib) for f in fs], single=len(fs) == 1)

    def diff_path(self, visit: str) -> Path:
        p = self.stack_path(visit)
        return naming.difference_name(p, naming.ProductDirs(p.parent))

    def differenced(self, visit: str, ok: bool = True, write: bool = True) -> DifferenceDone:
        p = self.stack_path(visit)
        fs = [f for f in self.frames if f.visit == visit]
        if not ok:
            return DifferenceDone(**self._lane(), science_path=str(p), object=fs[0].obj, filter=fs[0].filt, ok=False,
                                  reason="no reference image for this field")
        d = self.diff_path(visit)
        if write:
            self.write_image(d, fs[0].obj, fs[0].filt, "difference")
        return DifferenceDone(**self._lane(), science_path=str(p), object=fs[0].obj, filter=fs[0].filt, path=str(d))

    def frame_events(self, f: SimFrame) -> list:
        return [self.calibrated(f), self.solved(f), self.phot(f.calib, "single")]

    def visit_events(self, visit: str) -> list:
        return [self.stacked(visit), self.phot(self.stack_path(visit), "stack"), self.differenced(visit),
                self.phot(self.diff_path(visit), "difference")]

    def all_events(self) -> list:
        out = [self.plan()]
        for f in self.frames:
            out += self.frame_events(f)
        for v in dict.fromkeys(f.visit for f in self.frames):
            out += self.visit_events(v)
        return out


# ------------------------------------------------------------------------ the watcher in-process
@contextlib.asynccontextmanager
async def running_watcher(settings: Settings, **kwargs):
    """A WatcherService serving in this event loop until the block ends."""
    from gppy_watcher.service import WatcherService

    svc = WatcherService(settings, **kwargs)
    task = asyncio.create_task(svc.serve())
    try:
        await wait_for(lambda: svc._ready or task.done(), 30, "the watcher to connect")
        if task.done():
            task.result()
        yield svc
    finally:
        svc._stopping.set()
        await asyncio.wait_for(task, 60)


def watcher_settings(settings: Settings, **over) -> Settings:
    base = dict(quiet_period_s=1.0, poll_interval_s=0.3, night_max_attempts=3, units=[UNIT])
    base.update(over)
    return settings.model_copy(update=base)
