"""The watcher's HTTP API and live dashboard (FastAPI; OpenAPI at ``/docs`` and ``/openapi.json``).

Reads (no token):

* ``GET /nights`` (``?state=``, ``?unit=``): every night in the ledger with per-stage progress.
* ``GET /nights/{id}``: the ledger record plus per-stage, per-frame, per-stack and
  per-difference state, the products with their paths, failures and timings. While the night
  is processed this comes from the watcher's live progress, afterwards from its summary.
* ``GET /nights/{id}/qa``: seeing, zero point and depth of every photometered frame and stack.
* ``GET /nights/{id}/candidates``: the latest transient candidates with cutout URLs.
* ``GET /nights/{id}/report``: the end-of-night HTML report (:mod:`gppy_watcher.report`).
* ``GET /queues``: per stage, JetStream backlog (``num_pending``), messages being worked on
  (``num_ack_pending``) and the replicas alive (heartbeats in the ``gppy-services`` bucket).
* ``GET /failures``: recent failures with their reasons, newest first.
* ``GET /overview``: all the dashboard needs in one call.
* ``GET /files/{path}``: a file below ``path_processed`` (cutouts, reports, summaries);
  nothing outside it, and no FITS images.
* ``GET /`` and ``GET /dashboard/``: the dashboard (static HTML, JS and CSS in ``dashboard/``).

Mutations need ``Authorization: Bearer <api token>`` (``GPPY_API_TOKEN`` or
``GPPY_API_TOKEN_FILE``): no or a malformed header is answered 401, a wrong token 403. Without
a configured token (a local ``gppy up``) mutations are open.

* ``POST /nights/{id}/requeue`` (``{"targets": [...], "filters": [...]}``, optional): a new
  run of a night that is not being processed.
* ``POST /nights/{id}/frames/requeue`` (``{"frame": path}``): a frame is re-run by a new run
  of its night restricted to the frame's object and filter (its visit's stack needs the
  frame's siblings anyway).
* ``POST /nights`` (``{"unit", "night_dir", "targets", "filters"}``): an ad hoc night, as
  ``gppy process`` submits it.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query
from fastapi.responses import FileResponse, RedirectResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from nats.js.errors import NoKeysError
from prometheus_client.core import GaugeMetricFamily
from pydantic import BaseModel, Field, field_validator

from gppy import bus, naming
from gppy.fitsio import BadInputError, read_header
from gppy.runtime import SERVICES_TTL_S, services_bucket
from gppy_watcher import endofnight, report

if TYPE_CHECKING:
    from gppy_watcher.ledger import NightRecord
    from gppy_watcher.service import WatcherService

log = logging.getLogger(__name__)
DASHBOARD_DIR = Path(__file__).parent / "dashboard"
DASHBOARD_FILES = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css"}
#: Stages whose consumers the queue view lists, in pipeline order.
QUEUE_STAGES = ("watcher", "calib", "astrometry", "phot", "stack", "subtract")
#: File types ``/files`` serves (products for a browser: no FITS images).
SERVED_SUFFIXES = {".png": "image/png", ".html": "text/html", ".json": "application/json",
                   ".cat": "text/plain", ".reg": "text/plain", ".csv": "text/plain", ".head": "text/plain",
                   ".log": "text/plain"}
_LIST_ITEM = Field(default=None, max_length=100)
_BEARER = HTTPBearer(auto_error=False, description="the API token (GPPY_API_TOKEN)")


# ------------------------------------------------------------------------ request bodies
def _clean_list(value: list[str] | None) -> list[str] | None:
    if value is None:
        return None
    out = [str(v).strip() for v in value if str(v).strip()]
    if any(len(v) > 64 for v in out):
        raise ValueError("an entry is longer than 64 characters")
    return out or None


class RequeueRequest(BaseModel):
    """Optional restriction of the new run."""

    targets: list[str] | None = _LIST_ITEM
    filters: list[str] | None = _LIST_ITEM

    _clean = field_validator("targets", "filters")(_clean_list)


class FrameRequeueRequest(BaseModel):
    frame: str = Field(..., description="calibrated (or raw) path of the frame, as GET /nights/{id} lists it")


class NightRequest(BaseModel):
    unit: str = Field(..., max_length=32, description="telescope unit, e.g. 7DT07")
    night_dir: str = Field(..., max_length=1024, description="absolute path of the raw night folder")
    targets: list[str] | None = _LIST_ITEM
    filters: list[str] | None = _LIST_ITEM

    _clean = field_validator("targets", "filters")(_clean_list)


# ------------------------------------------------------------------------ views of a night
def stage_bars(counts: dict) -> list[dict]:
    """Per stage ``done``, ``failed`` and the ``total`` known so far (``None``: not known yet).

    Totals follow the pipeline: frames for the first three stages, visits for stacking, the
    stacks made for their photometry, the stacks photometered for subtraction, the
    differences made for the transient search.
    """
    plan = counts.get("plan", {})
    frames, visits = plan.get("frames"), plan.get("visits")
    planned = bool(counts)
    c = {k: counts.get(k, {}) for k, _ in report.STAGE_LABELS}
    totals = {
        "calib": frames, "astrometry": frames, "phot_single": frames, "stack": visits,
        "phot_stack": c["stack"].get("done"), "subtract": c["phot_stack"].get("done"),
        "phot_difference": c["subtract"].get("done"),
    }
    out = []
    for key, label in report.STAGE_LABELS:
        done = c[key].get("done", 0)
        failed = c[key].get("failed", 0) + c[key].get("no_reference", 0)
        total = totals[key] if planned else None
        out.append({"stage": key, "label": label, "done": done, "failed": failed,
                    "no_reference": c[key].get("no_reference", 0),
                    "total": None if total is None else max(int(total), done + failed)})
    return out


def _frame_state(f: dict) -> str:
    if f.get("fail") or f.get("sol") is False or f.get("phot") is False:
        return "failed"
    if f.get("phot") is True:
        return "done"
    if f.get("sol") is True:
        return "photometry"
    if f.get("cal"):
        return "astrometry"
    return "calibration"


def frames_from_progress(prog: dict) -> list[dict]:
    reasons: dict[str, str] = {}
    for f in prog.get("failures", []):
        if f.get("item"):
            reasons.setdefault(f["item"], f"{f['stage']}: {f['reason']}" if f["stage"] != "astrometry"
                               else f["reason"])
    out = []
    for path, f in prog.get("frames", {}).items():
        reason = f.get("fail") or reasons.get(path) or ("astrometry failed" if f.get("sol") is False else
                                                        "photometry failed" if f.get("phot") is False else "")
        out.append({"path": path, "raw": f.get("raw", ""), "object": f.get("obj", ""), "filter": f.get("filt", ""),
                    "visit": f.get("visit", ""), "state": _frame_state(f), "calibrated": bool(f.get("cal")),
                    "solved": f.get("sol"), "photometry": f.get("phot"), "reason": reason})
    return out


def _obj_filt_of(path: str) -> tuple[str, str]:
    """OBJECT and FILTER of a product from its place ``<OBJ>/<UNIT>/<FILT>/...``."""
    parts = Path(path).parts
    return (parts[-4], parts[-2]) if len(parts) >= 4 else ("", "")


def frames_from_summary(summary: dict) -> list[dict]:
    reasons = {item: g.get("reason", "") for g in summary.get("failures", []) for item in g.get("items", [])}
    failed = {f["path"]: reasons.get(f["path"]) or f["reason"] for f in summary.get("frames", {}).get("failed", [])}
    out = []
    for p in summary.get("products", {}).get("singles", []):
        obj, filt = _obj_filt_of(p)
        out.append({"path": p, "raw": "", "object": obj, "filter": filt, "visit": "",
                    "state": "failed" if p in failed else "done", "reason": failed.get(p, "")})
    for p, reason in failed.items():
        if p not in summary.get("products", {}).get("singles", []):
            obj, filt = _obj_filt_of(p)
            out.append({"path": p, "raw": "", "object": obj, "filter": filt, "visit": "", "state": "failed",
                        "reason": reason})
    return out


def stacks_from_progress(prog: dict) -> list[dict]:
    out = []
    for visit, s in prog.get("stacks", {}).items():
        state = "failed" if s.get("fail") or s.get("phot") is False else "done" if s.get("phot") else "photometry"
        out.append({"visit": visit, "path": s.get("path", ""), "object": s.get("obj", ""),
                    "filter": s.get("filt", ""), "inputs": s.get("n"), "state": state,
                    "reason": s.get("fail", "") or ("photometry failed" if s.get("phot") is False else "")})
    made = {s["visit"] for s in out}
    for visit, reason in prog.get("visit_fail", {}).items():
        if visit not in made:
            out.append({"visit": visit, "path": "", "object": "", "filter": "", "inputs": None, "state": "failed",
                        "reason": reason})
    return out


def differences_from_progress(prog: dict) -> list[dict]:
    out = []
    for sci, d in prog.get("diffs", {}).items():
        if d.get("fail"):
            state = "failed"
        elif d.get("ok") is False:
            state = "no_reference"
        elif d.get("phot") is True:
            state = "done"
        elif d.get("phot") is False:
            state = "failed"
        elif d.get("path"):
            state = "transient search"
        else:
            state = "subtraction"
        out.append({"science": sci, "path": d.get("path", ""), "reference": d.get("ref", ""), "state": state,
                    "reason": d.get("fail") or d.get("reason", "")})
    return out


def _products(items: list[dict]) -> list[dict]:
    return [dict(p, exists=os.path.exists(p["path"])) for p in items]


def products_from_summary(summary: dict) -> list[dict]:
    prods = summary.get("products", {})
    kinds = {"singles": "single", "stacks": "stack", "differences": "difference",
             "convolved_references": "convolved_reference", "weights": "weight", "masks": "mask",
             "noise": "noise", "catalogues": "catalogue", "headers": "header"}
    return _products([{"path": p, "kind": kind} for key, kind in kinds.items() for p in prods.get(key, [])])


# ------------------------------------------------------------------------ the router
class Ops:
    """What the routes share: the service, caches of files and of the bus."""

    def __init__(self, service: WatcherService):
        self.svc = service
        self.qa_cache = report.QaCache()
        self.cand_cache = report.CandidateCache()
        self._summaries: dict[str, tuple[tuple[int, int], dict]] = {}
        self._queues: tuple[float, dict] | None = None
        self._queue_lock = asyncio.Lock()
        self._kv = None

    # ---- paths
    @property
    def processed(self) -> Path:
        return Path(self.svc.paths.path_processed)

    def file_url(self, path: str | Path) -> str | None:
        """``/files/<path below path_processed>``, or None for a path outside it."""
        try:
            rel = Path(os.path.realpath(path)).relative_to(os.path.realpath(self.processed))
        except ValueError:
            return None
        return "/files/" + rel.as_posix()

    def report_file(self, rec: NightRecord) -> Path:
        summary = Path(rec.summary_path) if rec.summary_path else endofnight.summary_path(self.processed,
                                                                                         rec.night_id)
        return report.report_path(summary)

    # ---- ledger and progress
    def records(self) -> list[NightRecord]:
        """Every ledger record, read-only (the ledger's cached objects, not copies: a year of
        20 units is thousands of records, read on every dashboard poll)."""
        ledger = self.svc.ledger
        if ledger is None:
            return []
        cache = getattr(ledger, "_cache", None)
        if isinstance(cache, dict):
            return [hit[0] for hit in list(cache.values())]
        return ledger.records()

    def record(self, night_id: str) -> NightRecord:
        rec = self.svc.ledger.cached(night_id) if self.svc.ledger else None
        if rec is None:
            raise HTTPException(status_code=404, detail=f"unknown night {night_id}")
        return rec

    async def progress(self, rec: NightRecord) -> dict | None:
        """The live progress of an active night (the watcher's own copy, else the ledger's)."""
        if not rec.active:
            return None
        prog = self.svc._progress.get(rec.night_id)
        if prog is not None:
            return prog.to_dict()
        return await self.svc.ledger.load_progress(rec.night_id)

    def summary(self, rec: NightRecord) -> dict | None:
        """The night summary JSON of a finished night (cached until the file changes)."""
        if not rec.terminal or not rec.summary_path:
            return None
        p = rec.summary_path
        try:
            st = os.stat(p)
        except OSError:
            return None
        stamp = (st.st_mtime_ns, st.st_size)
        hit = self._summaries.get(p)
        if hit is None or hit[0] != stamp:
            try:
                hit = (stamp, json.loads(Path(p).read_text()))
            except (OSError, json.JSONDecodeError):
                return None
            if len(self._summaries) >= 200:
                self._summaries.clear()
            self._summaries[p] = hit
        return hit[1]

    def night_row(self, rec: NightRecord) -> dict:
        rep = self.report_file(rec)
        return {"night_id": rec.night_id, "unit": rec.unit, "night_dir": rec.night_dir, "state": rec.state,
                "lane": rec.lane, "kind": rec.kind, "source": rec.source, "run": rec.run, "attempt": rec.attempt,
                "run_attempts": rec.run_attempts, "note": rec.note, "outstanding": rec.outstanding,
                "changed": bool(rec.changed), "last_error": rec.last_error, "targets": rec.targets,
                "filters": rec.filters, "queued_at": rec.queued_at, "started_at": rec.started_at,
                "finished_at": rec.finished_at, "updated_at": rec.updated_at, "stages": stage_bars(rec.progress),
                "summary_path": rec.summary_path,
                "report_url": f"/nights/{rec.night_id}/report" if rec.terminal and rep.exists() else None}

    async def images(self, rec: NightRecord) -> list[tuple[str, str]]:
        """``(path, kind)`` of the night's photometered singles and stacks."""
        prog = await self.progress(rec)
        if prog is not None:
            return ([(p, "single") for p, f in prog.get("frames", {}).items() if f.get("phot") is True]
                    + [(s["path"], "stack") for s in prog.get("stacks", {}).values()
                       if s.get("phot") is True and s.get("path")])
        summary = self.summary(rec)
        return report.night_images(summary) if summary else []

    async def catalogues(self, rec: NightRecord) -> list[str]:
        prog = await self.progress(rec)
        if prog is not None:
            return [c for c in prog.get("catalogues", []) if c.endswith(report.TRANSIENT_CAT)]
        summary = self.summary(rec)
        return report.night_catalogues(summary) if summary else []

    async def qa(self, rec: NightRecord) -> dict:
        imgs = await self.images(rec)

        def read() -> list[dict]:
            rows = [self.qa_cache.get(p, kind) for p, kind in imgs]
            return [r for r in rows if r and any(r.get(k) is not None for k in ("seeing", "zp", "depth"))]

        rows = await asyncio.to_thread(read)
        return {"night_id": rec.night_id, "images": rows, "by_filter": report.qa_by_filter(rows)}

    async def candidates(self, rec: NightRecord, limit: int) -> dict:
        cats = await self.catalogues(rec)

        def read() -> list[tuple[float, list[dict]]]:
            return [self.cand_cache.get(c) for c in cats]

        found = await asyncio.to_thread(read)
        rows = [r for _, rs in sorted(found, key=lambda x: -x[0]) for r in rs]
        out = []
        for r in rows[:limit]:
            out.append(dict(r, cutout_urls={tag: self.file_url(p) for tag, p in r["cutouts"].items()}))
        return {"night_id": rec.night_id, "total": len(rows), "candidates": out}

    # ---- the bus
    async def replicas(self) -> list[dict]:
        """The live replicas (heartbeats younger than the bucket's TTL)."""
        js = self.svc.js
        if js is None:
            return []
        try:
            if self._kv is None:
                self._kv = await bus.kv_bucket(js, services_bucket(self.svc.settings), ttl_s=SERVICES_TTL_S)
            keys = await self._kv.keys()
        except NoKeysError:
            return []
        except Exception:
            self._kv = None
            return []
        now, out = time.time(), []
        for key in keys:
            try:
                entry = await self._kv.get(key)
                value = json.loads(entry.value)
            except Exception:
                continue
            if now - float(value.get("last_seen", 0)) <= SERVICES_TTL_S:
                out.append(value)
        return out

    async def queues(self, max_age_s: float = 1.0) -> dict:
        """Backlog and workers per stage (cached for ``max_age_s``)."""
        async with self._queue_lock:
            if self._queues is not None and time.monotonic() - self._queues[0] < max_age_s:
                return self._queues[1]
            replicas = await self.replicas()
            by_stage: dict[str, list[dict]] = {}
            for r in replicas:
                by_stage.setdefault(str(r.get("stage", "")), []).append(r)
            stages = []
            names = list(QUEUE_STAGES) + sorted(set(by_stage) - set(QUEUE_STAGES))
            for stage in names:
                lanes, pending, ack = {}, 0, 0
                for lane in bus.LANES:
                    try:
                        info = await self.svc.js.consumer_info(self.svc.settings.stream, f"{stage}-{lane}")
                    except Exception:
                        lanes[lane] = None
                        continue
                    lanes[lane] = {"pending": info.num_pending, "ack_pending": info.num_ack_pending,
                                   "waiting": info.num_waiting, "redelivered": info.num_redelivered}
                    pending += info.num_pending
                    ack += info.num_ack_pending
                reps = sorted(by_stage.get(stage, []), key=lambda r: str(r.get("replica")))
                stages.append({"stage": stage, "pending": pending, "ack_pending": ack, "workers": len(reps),
                               "lanes": lanes,
                               "replicas": [{k: r.get(k) for k in ("replica", "host", "pid", "version", "inflight",
                                                                   "concurrency", "last_seen", "started", "counts")}
                                            for r in reps]})
            result = {"at": time.time(), "stages": stages}
            self._queues = (time.monotonic(), result)
            return result

    # ---- failures
    async def failures(self, limit: int, recs: list[NightRecord] | None = None, recent_nights: int = 30) -> list[dict]:
        """Failures of the nights being processed and of the ``recent_nights`` last finished."""
        recs = self.records() if recs is None else recs
        done = sorted((r for r in recs if r.terminal), key=lambda r: -(r.finished_at or 0))[:recent_nights]
        out: list[dict] = []
        for rec in [r for r in recs if r.active] + done:
            base = {"night_id": rec.night_id, "unit": rec.unit}
            prog = await self.progress(rec) if rec.active else None
            if prog is not None:
                out += [dict(base, stage=f["stage"], item=f.get("item", ""), reason=f["reason"], at=f.get("at"),
                             count=1) for f in prog.get("failures", [])]
            elif rec.terminal:
                if rec.state == "failed":
                    out.append(dict(base, stage="night", item=rec.night_dir, reason=rec.note or rec.last_error,
                                    at=rec.finished_at, count=1))
                summary = self.summary(rec)
                for g in (summary or {}).get("failures", []):
                    items = g.get("items", [])
                    out.append(dict(base, stage=g.get("stage", ""), item=items[0] if items else "",
                                    reason=g.get("reason", ""), at=rec.finished_at, count=g.get("count", 1)))
            for e in getattr(rec, "night_failures", []) if rec.active else []:
                out.append(dict(base, stage=e.get("stage", ""), item=rec.night_dir, reason=e.get("reason", ""),
                                at=rec.updated_at, count=1))
        out.sort(key=lambda f: -(f.get("at") or 0))
        return out[:limit]

    # ---- the dashboard's choice of night
    def current(self, wanted: str | None, recs: list[NightRecord] | None = None) -> NightRecord | None:
        recs = self.records() if recs is None else recs
        if wanted:
            return next((r for r in recs if r.night_id == wanted), None)
        active = [r for r in recs if r.state == "processing"] or [r for r in recs if r.active]
        if active:
            return max(active, key=lambda r: r.started_at or r.queued_at or 0)
        done = [r for r in recs if r.terminal]
        return max(done, key=lambda r: r.finished_at or 0) if done else None


def _metrics_collector(ops: Ops):
    tasks: set[asyncio.Task] = set()

    def refresh() -> None:
        """Start reading the queues (the next scrape gets them): collect() cannot wait."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        stale = ops._queues is None or time.monotonic() - ops._queues[0] > 5.0
        if stale and not tasks and ops.svc.js is not None:
            task = loop.create_task(ops.queues(max_age_s=5.0))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    class Collector:
        def collect(self):
            refresh()
            snap = ops._queues[1] if ops._queues is not None else None
            if snap is not None:
                fams = {k: GaugeMetricFamily(f"gppy_stage_{k}", doc, labels=["stage"]) for k, doc in (
                    ("pending", "Messages waiting for a stage (JetStream, both lanes; as read by the watcher)"),
                    ("ack_pending", "Messages of a stage delivered and not acknowledged yet"),
                    ("workers", "Replicas of a stage with a live heartbeat"))}
                for row in snap["stages"]:
                    for k, fam in fams.items():
                        fam.add_metric([row["stage"]], row[k])
                yield from fams.values()
            recs = ops.records()
            nights = GaugeMetricFamily("gppy_nights", "Nights in the ledger by state", labels=["state"])
            for state in ("seen", "waiting", "queued", "processing", "done", "failed"):
                nights.add_metric([state], sum(r.state == state for r in recs))
            yield nights
            items = GaugeMetricFamily("gppy_active_night_items", "Items of the nights being processed, per stage "
                                      "and outcome", labels=["stage", "outcome"])
            for key, _ in report.STAGE_LABELS:
                for outcome in ("done", "failed"):
                    items.add_metric([key, outcome], sum(r.progress.get(key, {}).get(outcome, 0)
                                                         for r in recs if r.active))
            yield items
            out = GaugeMetricFamily("gppy_active_night_outstanding", "Items still expected by the nights being "
                                    "processed")
            out.add_metric([], sum(r.outstanding or 0 for r in recs if r.active))
            yield out

    return Collector()


def build_router(service: WatcherService) -> APIRouter:
    """The API and dashboard routes of ``service`` (a :class:`~gppy_watcher.service.WatcherService`)."""
    ops = Ops(service)
    router = APIRouter()
    if not service.settings.secret("api_token"):
        log.warning("no API token configured (GPPY_API_TOKEN): the API's mutations are open to anyone who "
                    "reaches this port")
    if not getattr(service, "_ops_metrics", False):
        service.registry.register(_metrics_collector(ops))
        service._ops_metrics = True

    async def authorise(cred: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)]) -> None:
        token = service.settings.secret("api_token")
        if not token:
            return
        if cred is None or not cred.credentials:
            raise HTTPException(status_code=401, detail="missing bearer token",
                                headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(cred.credentials.encode(), token.encode()):
            raise HTTPException(status_code=403, detail="wrong bearer token")

    # ---------------------------------------------------------------- nights
    @router.get("/nights", tags=["nights"], summary="Every night in the ledger")
    async def nights(state: str | None = None, unit: str | None = None) -> list[dict]:
        recs = sorted(ops.records(), key=lambda r: r.night_id)
        return [ops.night_row(r) for r in recs
                if (state is None or r.state == state) and (unit is None or r.unit.upper() == unit.upper())]

    @router.get("/nights/{night_id}", tags=["nights"], summary="One night: stages, frames, products, failures")
    async def night(night_id: str) -> dict:
        rec = ops.record(night_id)
        out = json.loads(rec.model_dump_json())
        out.update(ops.night_row(rec))
        prog = await ops.progress(rec)
        summary = ops.summary(rec)
        if prog is not None:
            from gppy_watcher.progress import NightProgress

            p = NightProgress.from_dict(prog)
            out.update(frames=frames_from_progress(prog), stacks=stacks_from_progress(prog),
                       differences=differences_from_progress(prog),
                       products=_products(p.products() + [{"path": c, "kind": "catalogue"}
                                                          for c in p.catalogues]),
                       failures=[{k: f.get(k) for k in ("stage", "item", "reason", "at")} for f in p.failures],
                       timings=p.timings(rec.queued_at), outstanding_items=p.outstanding()[:200])
        elif summary is not None:
            out.update(frames=frames_from_summary(summary), stacks=[
                {"path": p, "object": _obj_filt_of(p)[0], "filter": _obj_filt_of(p)[1], "state": "done"}
                for p in summary.get("products", {}).get("stacks", [])],
                differences=[{"path": p, "state": "done"} for p in summary.get("products", {}).get("differences", [])]
                + [{"science": k, "path": "", "state": "no_reference", "reason": v}
                   for k, v in (summary.get("no_reference") or {}).items()],
                products=products_from_summary(summary), failures=summary.get("failures", []),
                timings=summary.get("timings", {}), outstanding_items=summary.get("outstanding_at_end", []))
        else:
            out.update(frames=[], stacks=[], differences=[], products=[], failures=[], timings={},
                       outstanding_items=[])
        return out

    @router.get("/nights/{night_id}/qa", tags=["nights"],
                summary="Seeing [arcsec], zero point and 5-sigma depth [AB mag] of every photometered image")
    async def night_qa(night_id: str) -> dict:
        return await ops.qa(ops.record(night_id))

    @router.get("/nights/{night_id}/candidates", tags=["nights"], summary="Latest transient candidates")
    async def night_candidates(night_id: str, limit: int = Query(24, ge=1, le=500)) -> dict:
        return await ops.candidates(ops.record(night_id), limit)

    @router.get("/nights/{night_id}/report", tags=["nights"], summary="The end-of-night HTML report")
    async def night_report(night_id: str):
        rec = ops.record(night_id)
        path = ops.report_file(rec)
        url = ops.file_url(path) if path.exists() else None
        if url is None:
            raise HTTPException(status_code=404, detail=f"no report for {night_id} yet")
        return RedirectResponse(url, status_code=307)

    @router.post("/nights/{night_id}/requeue", tags=["mutations"], dependencies=[Depends(authorise)],
                 summary="A new run of a night that is not being processed")
    async def requeue(night_id: str, body: RequeueRequest | None = None) -> dict:
        body = body or RequeueRequest()
        try:
            rec = await service.requeue(night_id, body.targets, body.filters)
        except KeyError as exc:
            raise HTTPException(status_code=404, detail=f"unknown night {night_id}") from exc
        return {"night_id": rec.night_id, "state": rec.state, "run": rec.run, "attempt": rec.attempt,
                "targets": rec.targets, "filters": rec.filters}

    @router.post("/nights/{night_id}/frames/requeue", tags=["mutations"], dependencies=[Depends(authorise)],
                 summary="Re-run one frame: a new run of its night restricted to its object and filter")
    async def requeue_frame(night_id: str, body: FrameRequeueRequest) -> dict:
        rec = ops.record(night_id)
        if rec.active:
            raise HTTPException(status_code=409, detail=f"{night_id} is {rec.state}; wait for its end")
        obj, filt = await _frame_target(ops, rec, body.frame)
        new = await service.requeue(night_id, [obj], [filt])
        return {"night_id": new.night_id, "state": new.state, "run": new.run, "attempt": new.attempt,
                "targets": new.targets, "filters": new.filters}

    @router.post("/nights", tags=["mutations"], dependencies=[Depends(authorise)], status_code=202,
                 summary="Submit an ad hoc night (optionally restricted to targets and filters)")
    async def submit(body: NightRequest) -> dict:
        from gppy_watcher.service import adhoc_night_ready

        try:
            naming.sanitize(body.unit, "unit")
            if naming.sanitize(body.unit, "unit") != body.unit.strip():
                raise ValueError(f"unit {body.unit!r} has characters a unit name cannot have")
        except ValueError as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from exc
        night_dir = Path(body.night_dir)
        if not night_dir.is_absolute():
            raise HTTPException(status_code=400, detail="night_dir must be an absolute path")
        real = Path(os.path.realpath(night_dir))
        obs = Path(os.path.realpath(service.paths.path_obsdata))
        if obs not in real.parents:
            raise HTTPException(status_code=400, detail=f"night_dir must lie below {service.paths.path_obsdata}")
        if not real.is_dir():
            raise HTTPException(status_code=400, detail=f"{night_dir} is not a folder")
        ev = adhoc_night_ready(service.settings, body.unit.strip(), real, body.targets, body.filters)
        await service.publish(ev)
        return {"night_id": ev.night_id, "unit": ev.unit, "lane": ev.lane, "night_dir": ev.night_dir,
                "attempt": ev.attempt, "targets": ev.targets, "filters": ev.filters}

    # ---------------------------------------------------------------- the pipeline
    @router.get("/queues", tags=["pipeline"], summary="Backlog, messages in progress and workers per stage")
    async def queues() -> dict:
        return await ops.queues()

    @router.get("/failures", tags=["pipeline"], summary="Recent failures with their reasons, newest first")
    async def failures(limit: int = Query(50, ge=1, le=1000)) -> list[dict]:
        return await ops.failures(limit)

    @router.get("/overview", tags=["pipeline"], summary="Everything the dashboard shows, in one call")
    async def overview(night: str | None = None, candidates: int = Query(12, ge=0, le=200)) -> dict:
        recs = ops.records()
        active = sorted((r for r in recs if r.active), key=lambda r: -(r.queued_at or 0))
        recent = sorted((r for r in recs if not r.active), key=lambda r: -(r.finished_at or r.updated_at or 0))[:15]
        cur = ops.current(night, recs)
        out = {"at": time.time(), "active": [ops.night_row(r) for r in active],
               "recent": [ops.night_row(r) for r in recent], "queues": await ops.queues(),
               "failures": await ops.failures(20, recs), "current": cur.night_id if cur else None,
               "qa": None, "candidates": None}
        if cur is not None:
            out["qa"] = await ops.qa(cur)
            out["candidates"] = await ops.candidates(cur, candidates) if candidates else None
        return out

    # ---------------------------------------------------------------- files and the dashboard
    @router.get("/files/{path:path}", tags=["files"], summary="A product below path_processed (no FITS)")
    async def files(path: str):
        root = Path(os.path.realpath(ops.processed))
        target = Path(os.path.realpath(root / path))
        if root not in target.parents:
            raise HTTPException(status_code=403, detail="only files below the processed tree are served")
        media = SERVED_SUFFIXES.get(target.suffix.lower())
        if media is None:
            raise HTTPException(status_code=403, detail=f"files of type {target.suffix or '(none)'} are not served")
        if not target.is_file():
            raise HTTPException(status_code=404, detail="no such file")
        return FileResponse(target, media_type=media, headers={"Cache-Control": "no-cache"})

    @router.get("/", include_in_schema=False)
    async def root():
        return RedirectResponse("/dashboard/", status_code=307)

    @router.get("/dashboard", include_in_schema=False)
    async def dashboard_bare():
        return RedirectResponse("/dashboard/", status_code=307)

    @router.get("/dashboard/", include_in_schema=False)
    async def dashboard_index():
        return FileResponse(DASHBOARD_DIR / "index.html", media_type="text/html")

    @router.get("/dashboard/{name}", include_in_schema=False)
    async def dashboard_file(name: str):
        if name not in DASHBOARD_FILES:
            raise HTTPException(status_code=404, detail="no such file")
        return FileResponse(DASHBOARD_DIR / name, media_type=DASHBOARD_FILES[name])

    return router


async def _frame_target(ops: Ops, rec: NightRecord, frame: str) -> tuple[str, str]:
    """OBJECT and FILTER of a frame of ``rec`` (a calibrated or raw path it names)."""
    summary = ops.summary(rec)
    if summary is not None:
        known = set(summary.get("products", {}).get("singles", []))
        known |= {f["path"] for f in summary.get("frames", {}).get("failed", [])}
        known |= set((summary.get("frames", {}).get("rejected") or {}).keys())
        if frame not in known:
            raise HTTPException(status_code=404, detail=f"{frame} is not a frame of {rec.night_id}")
    elif not (Path(frame).is_absolute() and Path(rec.night_dir) in Path(frame).parents):
        raise HTTPException(status_code=404, detail=f"no summary of {rec.night_id} lists {frame}")
    if Path(rec.night_dir) in Path(frame).parents:  # a raw frame: its header says
        try:
            h = await asyncio.to_thread(read_header, frame)
        except BadInputError as exc:
            raise HTTPException(status_code=409, detail=str(exc)) from exc
        obj, filt = str(h.get("OBJECT", "")).strip(), str(h.get("FILTER", "")).strip()
    else:
        obj, filt = _obj_filt_of(frame)
    if not obj or not filt:
        raise HTTPException(status_code=409, detail=f"object/filter of {frame} unknown")
    return obj, filt


def install(app: FastAPI, service: WatcherService) -> None:
    """Add the API and the dashboard to the watcher's FastAPI app."""
    app.include_router(build_router(service))
