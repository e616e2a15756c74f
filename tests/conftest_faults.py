"""Fault-injection harness for the reliability tests (issue 11).

A small simulated night (``gppy.sim``) is processed by the local stack of ``gppy up``
(:class:`gppy.local.LocalStack`: a real nats-server and the six services as processes) with a
stand-in for Slack's Web API. While it runs, faults are injected: a stage's worker killed
with SIGKILL in the middle of a job (the whole process tree, as a container kill does), the
NATS server restarted, the whole stack stopped and started, the data volume full (ENOSPC),
Slack unreachable. Afterwards :func:`audit` compares what the night produced with the
simulator's truth (``truth/night.json``): every science frame and every visit must reach its
final state exactly once, nothing may be left half-written under a final name, the ledger must
say what happened, Slack must have been told once, and the raw tree must be unchanged.

Each scenario's figures (faults injected, frames lost, duplicates, time to recover) are
appended as one JSON line to ``$GPPY_FAULTS_RESULTS`` when that is set
(``scripts/fault_report.py`` sets it and writes ``FAULTS.md`` from them).

Import from a test file after putting this folder on ``sys.path``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np
from astropy.io import fits

sys.path.insert(0, str(Path(__file__).parent))

from conftest_watcher import SlackStandIn  # noqa: E402

from gppy import bus, naming, truthcheck  # noqa: E402
from gppy.config import load_settings  # noqa: E402
from gppy.fitsio import is_complete_fits  # noqa: E402
from gppy.local import LocalStack, free_port, wait_for_port  # noqa: E402
from gppy.messages import MessageError, parse  # noqa: E402
from gppy.sim import simulate  # noqa: E402

UNIT = "7DT01"
#: Settings of the services under test: short redelivery so a killed job comes back quickly.
FAULT_ENV = {
    "GPPY_ACK_WAIT_S": "8",
    "GPPY_HEARTBEAT_S": "1.5",
    "GPPY_MAX_DELIVER": "4",
    "GPPY_QUIET_PERIOD_S": "2",
    "GPPY_POLL_INTERVAL_S": "1",
    "GPPY_NIGHT_STALL_TIMEOUT_S": "600",
    "GPPY_NIGHT_INCOMPLETE_GRACE_S": "8",
    "GPPY_LOG_JSON": "true",
    "GPPY_GPU": "off",
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
}
STAGE_OF_KIND = {"night.plan": "calib", "frame.calibrated": "calib", "frame.solved": "astrometry",
                 "phot.done": "phot", "stack.done": "stack", "diff.done": "subtract", "night.done": "watcher",
                 "night.ready": "watcher"}


# ------------------------------------------------------------------------ the night
@dataclass
class Night:
    """A simulated night: its data root, path.json, truth and raw folder."""

    root: Path
    config: Path
    night_dir: Path
    truth: dict

    @property
    def night_id(self) -> str:
        return naming.night_id(UNIT, self.night_dir)

    def paths(self):
        return load_settings(config=str(self.config)).paths()

    @property
    def processed(self) -> Path:
        return Path(self.paths().path_processed)

    def science(self) -> list[str]:
        """Raw file names of the science frames."""
        return [f["file"] for f in self.truth["frames"] if f["kind"] == "science"]

    def visits(self) -> list[list[str]]:
        """Raw file names of each visit's frames."""
        return [list(v["frames"]) for v in self.truth["visits"]]


def simulate_night(root: Path, seed: int = 5, size: tuple[int, int] = (1024, 768), targets: int = 2,
                   filters: tuple[str, ...] = ("r",), volume: Path | None = None, **kw) -> Night:
    """Simulate a small night (6 frames in 2 visits by default) under ``root``.

    With ``volume``, the processed tree and the scratch folder live on that file system (a
    small tmpfs in the disk-full scenario) instead of next to the raw data.
    """
    root.mkdir(parents=True, exist_ok=True)
    config = Path(simulate(root, targets=targets, filters=list(filters), size=size, seed=seed, extras=False,
                           **kw))
    if volume is not None:
        cfg = json.loads(config.read_text())
        cfg["path_processed"] = str(volume / "processed_1x1_gain2750")
        cfg["path_scratch"] = str(volume / "scratch")
        config.write_text(json.dumps(cfg, indent=1))
    truth = json.loads((root / "truth" / "night.json").read_text())
    return Night(root=root, config=config, night_dir=Path(truth["night_dir"]), truth=truth)


def tree_checksums(folder: Path) -> dict[str, tuple[str, int, float]]:
    """sha256, size and mtime of every file below ``folder``."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            st = p.stat()
            out[str(p.relative_to(folder))] = (hashlib.sha256(p.read_bytes()).hexdigest(), st.st_size, st.st_mtime)
    return out


# ------------------------------------------------------------------------ NATS with per-service users
REPO = Path(__file__).resolve().parents[1]
SERVICES = ["watcher", "calib", "astrometry", "phot", "stack", "subtract"]
OPERATOR = "gppy"


class SecureNats:
    """nats-server started by ``deploy/nats/entrypoint.sh`` with ``deploy/nats/users.conf``:
    one user per service with its own password (secret files) and subject permissions, plus
    the operator user ``gppy``. Only listening address and store differ from the deployment."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.secrets = workdir / "secrets"
        self.secrets.mkdir(parents=True, exist_ok=True)
        for name in ["nats_password", *[f"nats_password_{s}" for s in SERVICES]]:
            f = self.secrets / name
            if not f.exists():
                f.write_text(hashlib.sha256(os.urandom(32)).hexdigest()[:32] + "\n")
                f.chmod(0o600)
        shutil.copy(REPO / "deploy" / "nats" / "users.conf", workdir / "users.conf")

    def password(self, user: str) -> str:
        name = "nats_password" if user == OPERATOR else f"nats_password_{user}"
        return (self.secrets / name).read_text().strip()

    def password_file(self, user: str) -> Path:
        return self.secrets / ("nats_password" if user == OPERATOR else f"nats_password_{user}")

    def start(self, port: int, store: Path, log=subprocess.DEVNULL) -> subprocess.Popen:
        conf = self.workdir / "nats-local.conf"
        conf.write_text(f"listen: 127.0.0.1:{port}\nmax_payload: 1MB\n"
                        f"jetstream {{ store_dir: {json.dumps(str(store))} }}\ninclude ./users.conf\n")
        env = {"PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}",
               "GPPY_NATS_CONF": str(conf), "GPPY_NATS_PASSWORD_FILE": str(self.password_file(OPERATOR)),
               "GPPY_NATS_USER": OPERATOR, "HOME": str(self.workdir)}
        proc = subprocess.Popen(["bash", str(REPO / "deploy" / "nats" / "entrypoint.sh")], env=env, stdout=log,
                                stderr=subprocess.STDOUT)
        wait_for_port(port)
        return proc


class SecureStack(LocalStack):
    """:class:`LocalStack` whose NATS has per-service users; each service logs in as itself."""

    secure: SecureNats | None = None

    def start_nats(self) -> None:
        store = self.store_dir or Path(self.config).parent / "nats-store"
        store.mkdir(parents=True, exist_ok=True)
        self.procs["nats"] = self.secure.start(self.nats_port, store, self._log("nats"))

    def start_stage(self, stage: str, replica: int = 0) -> subprocess.Popen:
        base = self.env
        self.env = {**base, "GPPY_NATS_USER": stage,
                    "GPPY_NATS_PASSWORD_FILE": str(self.secure.password_file(stage))}
        try:
            return super().start_stage(stage, replica)
        finally:
            self.env = base


# ------------------------------------------------------------------------ processes
def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, grandchildren...), from /proc."""
    children: dict[int, list[int]] = defaultdict(list)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children[ppid].append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def kill_tree(proc: subprocess.Popen) -> int:
    """SIGKILL a process and everything it started (a container kill); returns the exit code."""
    pids = descendants(proc.pid)
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGKILL)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return proc.wait(timeout=30)


@dataclass
class Fault:
    """One injected fault: its kind, target, when it began and when it was over (Unix s)."""

    kind: str
    target: str
    start: float
    end: float
    note: str = ""
    recovered_s: float | None = None


def free_http_base(n: int = 6) -> int:
    """A base port with ``n`` free ports above it (LocalStack's HTTP ports: base + stage index)."""
    import random
    import socket

    for _ in range(200):
        base = random.randrange(30000, 50000)
        try:
            for port in range(base, base + n):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError("no free range of HTTP ports")


class Pipeline:
    """The local stack running one night, with fault injection."""

    def __init__(self, night: Night, workdir: Path, slack: SlackStandIn | None = None, env: dict | None = None,
                 secure: bool = False):
        self.night = night
        self.slack = slack or SlackStandIn().up()
        self.workdir = workdir
        environment = dict(FAULT_ENV)
        environment.update(GPPY_SLACK_TOKEN=self.slack.token, GPPY_SLACK_BASE_URL=self.slack.base_url)
        environment.update(env or {})
        kind = SecureStack if secure else LocalStack
        self.stack = kind(config=night.config, nats_port=free_port(), http_base=free_http_base(),
                          store_dir=workdir / "nats-store", env=environment, log_dir=workdir / "logs")
        creds = {}
        if secure:
            self.stack.secure = SecureNats(workdir)
            creds = {"nats_user": OPERATOR, "nats_password": self.stack.secure.password(OPERATOR)}
        self.settings = load_settings(config=str(night.config), nats_url=self.stack.nats_url, **creds)
        self.faults: list[Fault] = []
        self.t_start = 0.0

    # ---------------------------------------------------------------- lifecycle
    def start(self, timeout: float = 180.0) -> None:
        self.t_start = self.t_start or time.time()
        missing = self.stack.start()
        assert not missing, f"stages missing: {missing}"
        self.stack.wait_healthy(timeout=timeout)

    def stop(self) -> None:
        self.stack.stop()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.stack.stop()
        self.slack.down()

    # ---------------------------------------------------------------- observation
    def status(self, stage: str) -> dict | None:
        try:
            r = httpx.get(f"http://127.0.0.1:{self.stack.http_port(stage)}/status", timeout=1.0)
            return r.json() if r.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            return None

    def busy(self, stage: str) -> bool:
        st = self.status(stage)
        return bool(st and st.get("inflight"))

    def record(self) -> dict | None:
        """The night's ledger record as stored in the KV bucket (None while unreachable)."""
        return asyncio.run(ledger_record(self.settings, self.night.night_id))

    def wait_terminal(self, timeout: float = 900.0, during=None) -> dict:
        """Wait until the ledger says the night is done or failed (calls ``during()`` meanwhile)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if during is not None:
                during()
            rec = self.record()
            if rec and rec.get("state") in ("done", "failed") and "message" in rec.get("final_steps", []):
                return rec
            time.sleep(1.0)
        raise AssertionError(f"night {self.night.night_id} not finished after {timeout:.0f} s; "
                             f"ledger: {self.record()}; logs in {self.workdir / 'logs'}")

    def wait_busy(self, stage: str, timeout: float = 240.0) -> bool:
        """Poll until ``stage`` holds a message (True) or the night ended / time ran out (False)."""
        deadline = time.monotonic() + timeout
        n = 0
        while time.monotonic() < deadline:
            if self.busy(stage):
                return True
            n += 1
            if n % 20 == 0:
                rec = self.record()
                if rec and rec.get("state") in ("done", "failed"):
                    return False
            time.sleep(0.1)
        return False

    # ---------------------------------------------------------------- faults
    def kill_stage(self, stage: str, note: str = "") -> Fault:
        """SIGKILL the stage's worker (with the tools it runs) and start a new one at once."""
        name = f"{stage}-0"
        proc = self.stack.procs[name]
        t0 = time.time()
        code = kill_tree(proc)
        assert code == -signal.SIGKILL, (stage, code)
        self.stack.start_stage(stage)
        fault = Fault("sigkill", stage, t0, time.time(), note)
        if stage == "watcher":  # it publishes little: recovered when its replacement is ready
            def ready():
                with contextlib.suppress(AssertionError):
                    self.wait_ready(stage)
                    fault.recovered_s = round(time.time() - fault.end, 2)
            threading.Thread(target=ready, daemon=True).start()
        self.faults.append(fault)
        return fault

    def wait_ready(self, stage: str, timeout: float = 90.0) -> None:
        url = f"http://127.0.0.1:{self.stack.http_port(stage)}/readyz"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url, timeout=1.0).status_code == 200:
                    return
            time.sleep(0.1)
        raise AssertionError(f"{stage} not ready {timeout:.0f} s after its restart")

    def kill_while_busy(self, delays: dict[str, list], timeout: float = 600.0,
                        spacing_s: float = 2.0, gap_s: float = 0.3) -> dict[str, int]:
        """SIGKILL each stage when it has held a message for the next of its ``delays`` (s), or
        (a callable instead of a number) when it holds one and the callable says so.

        Every stage is watched at once (they work concurrently); ``watcher`` is killed when
        another stage is busy. Kills of one stage are ``spacing_s`` apart, kills of different
        stages ``gap_s`` (jobs of small frames last well under a second on an idle machine).
        Returns the kills that could not be made before the night ended.
        """
        todo = {s: list(d) for s, d in delays.items()}
        since: dict[str, float] = {}
        last_kill = 0.0
        last_of: dict[str, float] = {}
        deadline = time.monotonic() + timeout
        polls = 0
        while any(todo.values()) and time.monotonic() < deadline:
            polls += 1
            if polls % 25 == 0:
                rec = self.record()
                if rec and rec.get("state") in ("done", "failed"):
                    break
            now = time.time()
            busy = {s for s in todo if s != "watcher" and self.busy(s)}
            for s in list(since):
                if s not in busy:
                    since.pop(s)
            for s in busy:
                since.setdefault(s, now)
            if now - last_kill < gap_s:
                time.sleep(0.05)
                continue
            for s, d in todo.items():
                if not d or now - last_of.get(s, 0.0) < spacing_s:
                    continue
                if s == "watcher":  # while frames flow (not in calib's short night job)
                    ready = bool(busy - {"calib"})
                elif callable(d[0]):
                    ready = s in since and bool(d[0]())
                else:
                    ready = s in since and now - since[s] >= d[0]
                if ready:
                    delay = d.pop(0)
                    note = ("while other stages work" if s == "watcher" else
                            getattr(delay, "__doc__", None) or "mid-job" if callable(delay) else
                            f"{delay:.1f} s into a job")
                    self.kill_stage(s, note)
                    since.pop(s, None)
                    last_kill = last_of[s] = time.time()
                    break
            time.sleep(0.05)
        return {s: len(d) for s, d in todo.items() if d}

    def slack_down(self) -> Fault:
        """Slack's Web API stops answering (connection refused) until :meth:`slack_up`."""
        self.slack.down()
        fault = Fault("slack-unreachable", "slack", time.time(), 0.0)
        self.faults.append(fault)
        return fault

    def slack_up(self, fault: Fault) -> None:
        self.slack.up()
        fault.end = time.time()

    def wait_slack(self, *needles: str, timeout: float = 300.0) -> list[str]:
        """Wait until Slack received a message containing each of ``needles`` (the notifier
        retries with a back-off of up to 120 s, so messages queued during an outage arrive up
        to that long after Slack is back, possibly after the night ended). Returns the missing."""
        deadline = time.monotonic() + timeout
        while True:
            texts = [m["text"] for m in self.slack.messages]
            missing = [n for n in needles if not any(n in t for t in texts)]
            if not missing or time.monotonic() > deadline:
                return missing
            time.sleep(0.5)

    def restart_nats(self, down_s: float = 3.0) -> Fault:
        """Stop the NATS server (SIGKILL, no clean shutdown), keep it down, start it again."""
        proc = self.stack.procs["nats"]
        t0 = time.time()
        proc.kill()
        proc.wait(timeout=30)
        time.sleep(down_s)
        self.stack.start_nats()
        fault = Fault("nats-restart", "nats", t0, time.time(), f"down {down_s:.0f} s")
        self.faults.append(fault)
        return fault

    def restart_all(self) -> Fault:
        """Stop the whole stack (SIGTERM, as ``gppy up`` does on Ctrl-C) and start it again."""
        t0 = time.time()
        self.stack.stop()
        self.start()
        fault = Fault("stack-restart", "all", t0, time.time())
        self.faults.append(fault)
        return fault

    # ---------------------------------------------------------------- the bus
    def events(self) -> list[tuple[float, str, dict]]:
        return asyncio.run(stream_events(self.settings))

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted((self.workdir / "logs").glob("*.log")))


async def ledger_record(settings, night_id: str) -> dict | None:
    from gppy_watcher.ledger import bucket_name, record_key

    try:
        nc = await asyncio.wait_for(bus.connect(settings, "faults-ledger"), 5)
    except Exception:
        return None
    try:
        js = nc.jetstream()
        kv = await js.key_value(bucket_name(settings))
        entry = await kv.get(record_key(night_id))
        return json.loads(entry.value)
    except Exception:
        return None
    finally:
        with contextlib.suppress(Exception):
            await nc.close()


async def stream_events(settings) -> list[tuple[float, str, dict]]:
    """Every message of the pipeline stream: (server time, subject, decoded body)."""
    nc = await bus.connect(settings, "faults-reader")
    out = []
    try:
        js = nc.jetstream()
        info = await js.stream_info(settings.stream)
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            try:
                msg = await js.get_msg(settings.stream, seq)
            except Exception:
                continue
            try:
                body = json.loads(msg.data)
            except ValueError:
                body = {"raw": msg.data[:200].decode("utf-8", "replace")}
            ts = msg.time.timestamp() if getattr(msg, "time", None) else 0.0
            out.append((ts, msg.subject, body))
    finally:
        await nc.close()
    return out


# ------------------------------------------------------------------------ a small volume
class SmallVolume:
    """A small tmpfs mounted for the processed tree and scratch; :meth:`fill` makes it full.

    Needs root (mount); the tests run as root in this environment.
    """

    def __init__(self, where: Path, size_mb: int):
        self.where = where
        self.size_mb = size_mb
        self.ballast = where / ".ballast"
        self.mounted = False

    def mount(self) -> SmallVolume:
        self.where.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.size_mb}m,mode=0755", "tmpfs", str(self.where)],
                       check=True, capture_output=True, text=True)
        self.mounted = True
        return self

    def free_bytes(self) -> int:
        st = os.statvfs(self.where)
        return st.f_bavail * st.f_frsize

    def fill(self, leave: int = 0) -> int:
        """Write a ballast file until the volume is full (``leave`` bytes free); returns its size."""
        chunk = b"\0" * (1 << 20)
        written = 0
        with open(self.ballast, "ab") as fh:
            while self.free_bytes() - leave > 0:
                n = min(len(chunk), self.free_bytes() - leave)
                try:
                    fh.write(chunk[:n])
                    fh.flush()
                except OSError:
                    break
                written += n
        return written

    def free(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.ballast.unlink()

    def unmount(self) -> None:
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.where)], check=False, capture_output=True)
            self.mounted = False


# ------------------------------------------------------------------------ module fixtures
_FAILED: dict[str, str] = {}


def run_once(key: str, build):
    """``build()`` for a module fixture, but when it failed once, fail the next tests at once
    (pytest would otherwise run an expensive failing module fixture again for every test)."""
    import pytest

    if key in _FAILED:
        pytest.fail(f"the scenario failed earlier: {_FAILED[key]}", pytrace=False)
    try:
        return build()
    except BaseException as exc:
        _FAILED[key] = f"{exc.__class__.__name__}: {str(exc)[:2000]}"
        raise


# ------------------------------------------------------------------------ the audit
@dataclass
class Audit:
    """What a night left behind, compared with what it should have."""

    scenario: str
    night_id: str
    state: str = ""
    frames_expected: int = 0
    frames_final: int = 0
    frames_lost: list[str] = field(default_factory=list)
    duplicate_products: list[str] = field(default_factory=list)
    visits_expected: int = 0
    stacks_ok: int = 0
    diffs_ok: int = 0
    incomplete_files: list[str] = field(default_factory=list)
    stale_parts: list[str] = field(default_factory=list)
    repeated_stages: list[str] = field(default_factory=list)
    duplicate_events: int = 0
    event_counts: dict = field(default_factory=dict)
    ledger: dict = field(default_factory=dict)
    slack_start: int = 0
    slack_done: int = 0
    slack_failures: list[str] = field(default_factory=list)
    slack_disk: list[str] = field(default_factory=list)
    raw_changed: list[str] = field(default_factory=list)
    astrometry_worst_arcsec: float = 0.0
    zp_worst_mag: float = 0.0
    duration_s: float = 0.0
    faults: list[dict] = field(default_factory=list)
    bad_inputs: int = 0
    problems: list[str] = field(default_factory=list)

    def figures(self) -> dict:
        kinds = Counter(f["kind"] for f in self.faults)
        rec = [f["recovered_s"] for f in self.faults if f.get("recovered_s") is not None]
        return {"scenario": self.scenario, "faults": dict(kinds), "bad_inputs": self.bad_inputs,
                "frames": self.frames_expected, "frames_lost": len(self.frames_lost),
                "duplicates": len(self.duplicate_products) + len(self.repeated_stages),
                "duplicate_events": self.duplicate_events,
                "half_written": len(self.incomplete_files), "stale_parts": len(self.stale_parts),
                "recover_max_s": round(max(rec), 1) if rec else None,
                "recover_median_s": round(float(np.median(rec)), 1) if rec else None,
                "night_s": round(self.duration_s, 1), "slack_failure_lines": len(self.slack_failures),
                "raw_changed": len(self.raw_changed), "state": self.state}


def _singles(processed: Path) -> list[Path]:
    return sorted(p for p in processed.rglob("calib_*.fits")
                  if not any(s in p.name for s in (".com.", ".weight.", ".mask.", ".subt."))
                  and "transient" not in p.parts)


def _stacks(processed: Path) -> list[Path]:
    return sorted(p for p in processed.rglob("*.com.fits") if ".weight." not in p.name and ".mask." not in p.name
                  and "transient" not in p.parts)


def _provin(hdr) -> list[str]:
    return [str(hdr[k]) for k in sorted(k for k in hdr if k.startswith("PROVIN"))]


def audit(scenario: str, night: Night, pipe: Pipeline, rec: dict, raw_before: dict,
          expect_lost: set[str] = frozenset(), truth_quality: bool = True) -> Audit:
    """Check the night against the truth; fill an :class:`Audit` (assertions are the caller's)."""
    a = Audit(scenario=scenario, night_id=night.night_id, state=rec.get("state", ""))
    processed = night.processed
    science = night.science()
    a.frames_expected = len(science)
    a.visits_expected = len(night.visits())
    a.ledger = {k: rec.get(k) for k in ("state", "run", "attempt", "run_attempts", "progress", "outstanding",
                                        "last_error", "note", "final_steps")}
    # singles: each raw science frame -> exactly one product, solved and photometered
    by_raw: dict[str, list[Path]] = defaultdict(list)
    for p in _singles(processed):
        hdr = fits.getheader(p)
        prov = _provin(hdr)
        if prov:
            by_raw[prov[0]].append(p)
        stages = [s for s in str(hdr.get("PIPESTG", "")).split(",") if s]
        if len(stages) != len(set(stages)):
            a.repeated_stages.append(f"{p.name}: PIPESTG={hdr.get('PIPESTG')}")
    for raw in science:
        prods = by_raw.get(raw, [])
        if len(prods) > 1:
            a.duplicate_products.append(f"{raw}: {[p.name for p in prods]}")
        ok = [p for p in prods if _final_single(p)]
        if ok:
            a.frames_final += 1
        elif raw not in expect_lost:
            a.frames_lost.append(raw)
    # stacks: one per visit, made of exactly the visit's frames
    stacks = _stacks(processed)
    by_visit: dict[int, list[Path]] = defaultdict(list)
    visits = night.visits()
    for s in stacks:
        hdr = fits.getheader(s)
        inputs = _provin(hdr)
        if len(inputs) != len(set(inputs)) or int(hdr.get("NCOMBINE", -1)) != len(inputs):
            a.duplicate_products.append(f"{s.name}: NCOMBINE={hdr.get('NCOMBINE')} inputs={inputs}")
        for i, frames in enumerate(visits):
            names = {_single_name_of(by_raw, r) for r in frames}
            if set(inputs) <= names and inputs:
                by_visit[i].append(s)
    for i in range(len(visits)):
        if len(by_visit.get(i, [])) > 1:
            a.duplicate_products.append(f"visit {i}: {[p.name for p in by_visit[i]]}")
    a.stacks_ok = sum(1 for i in range(len(visits)) if by_visit.get(i) and "ZP_AUTO" in fits.getheader(by_visit[i][0]))
    for s in stacks:
        stem = s.name[:-5]
        diff = s.parent / "transient" / f"{stem}.subt.fits"
        cat = s.parent / "transient" / f"{stem}.subt.transient.cat"
        if diff.exists() and cat.exists():
            a.diffs_ok += 1
    # nothing half-written under a final name; leftovers under temporary names
    for p in processed.rglob("*.fits"):
        if p.name.startswith(".") or p.name.endswith(".part"):
            continue
        if not is_complete_fits(p):
            a.incomplete_files.append(str(p.relative_to(processed)))
    a.stale_parts = sorted(str(p.relative_to(processed)) for p in processed.rglob("*.part"))
    # the bus: several terminal events for one item mean work was repeated and re-announced
    events = pipe.events()
    per_item: Counter = Counter()
    kinds: Counter = Counter()
    for _, subject, body in events:
        kind = body.get("kind", subject.rsplit(".", 1)[-1])
        if body.get("night_id") != night.night_id:
            continue
        kinds[kind] += 1
        item = body.get("path") or body.get("image_path") or body.get("science_path") or ""
        if kind in ("frame.calibrated", "frame.solved", "stack.done", "diff.done", "phot.done") and item:
            per_item[(kind, body.get("image_kind", ""), item)] += 1
    a.event_counts = dict(kinds)
    a.duplicate_events = sum(n - 1 for n in per_item.values() if n > 1)
    # Slack: the night's start, its end, and its failure lines
    name = night.night_dir.name
    texts = [m["text"] for m in pipe.slack.messages if name in m["text"]]
    a.slack_start = sum("Start processing" in t for t in texts)
    a.slack_done = sum(("Processing complete" in t) or ("FAILED" in t) for t in texts)
    a.slack_failures = [t for t in texts if " failed on " in t]
    a.slack_disk = [m["text"] for m in pipe.slack.messages if "data volume full" in m["text"]
                    or "space available again" in m["text"]]
    # raw tree untouched
    after = tree_checksums(night.night_dir)
    a.raw_changed = sorted(k for k in set(raw_before) | set(after) if raw_before.get(k) != after.get(k))
    # the science still right after the faults (truth of the simulator)
    if truth_quality:
        ast = truthcheck.astrometry_residuals(processed, night.root / "truth")
        zps = truthcheck.zeropoint_errors(processed, night.root / "truth")
        a.astrometry_worst_arcsec = max((max(r["rms_ra"], r["rms_dec"]) for r in ast), default=float("nan"))
        a.zp_worst_mag = max((abs(r["error"]) for r in zps), default=float("nan"))
    a.duration_s = (rec.get("finished_at") or time.time()) - (rec.get("queued_at") or pipe.t_start)
    # time to recover: from the end of each fault (worker restarted, broker or stack back, space
    # freed, Slack back) to the next event of the part it hit (the next Slack delivery)
    stamps = sorted((t, STAGE_OF_KIND.get(b.get("kind", ""), b.get("stage", ""))) for t, _, b in events if t)
    for f in pipe.faults:
        if f.recovered_s is not None:
            continue
        target = f.target
        nxt = [t for t, st in stamps if t > f.end and (target in ("nats", "all", "volume") or st == target)]
        if target == "slack":
            nxt = [m["t"] for m in pipe.slack.messages if m["t"] > f.end]
        if not nxt and target not in ("slack",):
            # nothing new from it: its work was complete when it was hit (a re-run's identical
            # events are de-duplicated); recovered at the latest when the night ended
            nxt = [t for t, _, b in events if t > f.end and b.get("kind") == "night.done"
                   and b.get("night_id") == night.night_id]
        if nxt:
            f.recovered_s = round(nxt[0] - f.end, 2)
    a.faults = [asdict(f) for f in pipe.faults]
    with contextlib.suppress(OSError):
        (pipe.workdir / "audit.json").write_text(json.dumps(asdict(a), indent=1, default=str))
    return a


def _single_name_of(by_raw: dict[str, list[Path]], raw: str) -> str:
    prods = by_raw.get(raw, [])
    return prods[0].name if prods else f"?{raw}"


def _final_single(p: Path) -> bool:
    """A calibrated single in its final state: WCS, photometry, weight, mask and catalogue."""
    try:
        hdr = fits.getheader(p)
    except OSError:
        return False
    stem = p.name[:-5]
    return ("TPV" in str(hdr.get("CTYPE1", "")) and "ZP_AUTO" in hdr
            and (p.parent / f"{stem}.weight.fits").exists() and (p.parent / f"{stem}.mask.fits").exists()
            and (p.parent / "phot" / f"{stem}.phot.cat").exists())


def save_figures(a: Audit, extra: dict | None = None) -> None:
    """Append the scenario's figures to ``$GPPY_FAULTS_RESULTS`` (the FAULTS.md report)."""
    dest = os.environ.get("GPPY_FAULTS_RESULTS")
    if not dest:
        return
    row = a.figures()
    row["module"] = os.environ.get("PYTEST_CURRENT_TEST", "").split("::")[0]
    row.update(extra or {})
    row["recorded"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    with open(dest, "a") as fh:
        fh.write(json.dumps(row) + "\n")


def save_row(row: dict) -> None:
    """Append a scenario row that is not a whole night (see :func:`save_figures`)."""
    dest = os.environ.get("GPPY_FAULTS_RESULTS")
    if dest:
        row = {"module": os.environ.get("PYTEST_CURRENT_TEST", "").split("::")[0],
               "recorded": time.strftime("%Y-%m-%dT%H:%M:%S"), **row}
        with open(dest, "a") as fh:
            fh.write(json.dumps(row) + "\n")


def assert_clean(a: Audit, *, failures: int = 0) -> None:
    """The common verdict of a fault scenario: nothing lost, nothing twice, told once."""
    assert a.state == "done", a
    assert not a.frames_lost, a.frames_lost
    assert not a.duplicate_products, a.duplicate_products
    assert not a.repeated_stages, a.repeated_stages
    assert not a.incomplete_files, a.incomplete_files
    assert a.frames_final == a.frames_expected
    assert a.stacks_ok == a.visits_expected and a.diffs_ok == a.visits_expected, (a.stacks_ok, a.diffs_ok)
    prog = a.ledger["progress"]
    assert prog["plan"]["frames"] == a.frames_expected and prog["plan"]["visits"] == a.visits_expected, prog
    assert prog["phot_single"] == {"done": a.frames_expected, "failed": 0}, prog
    assert prog["stack"]["done"] == a.visits_expected and prog["phot_difference"]["done"] == a.visits_expected
    assert prog["failures"]["total"] == failures, prog
    assert a.ledger["outstanding"] == 0 and a.ledger["run_attempts"] == 1, a.ledger
    assert a.slack_start == 1 and a.slack_done == 1, (a.slack_start, a.slack_done)
    assert len(a.slack_failures) == failures, a.slack_failures
    assert not a.raw_changed, a.raw_changed


def wait_port_closed(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            wait_for_port(port, timeout=0.2)
        except RuntimeError:
            return
        time.sleep(0.1)


def copy_tree(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, symlinks=True)


__all__ = ["OPERATOR", "SERVICES", "Audit", "Fault", "MessageError", "Night", "Pipeline", "SecureNats",
           "SecureStack", "SlackStandIn", "SmallVolume", "run_once", "save_row", "assert_clean", "audit",
           "copy_tree", "kill_tree", "parse", "save_figures", "simulate_night", "tree_checksums"]
