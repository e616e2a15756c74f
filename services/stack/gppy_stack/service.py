"""The stack service: nightly visit stacks and deep stacks (issue P6).

Consumes ``night.plan`` (the frames of a night and their visits), ``phot.done`` of single
frames (a frame is ready, or definitively failed) and ``deepstack.request``. A visit is
stacked once every frame of it is done or failed, whatever order the messages come in, and
exactly one replica builds it.

Per-visit state lives in the JetStream key-value bucket ``gppy-stack-visits`` and every change
is a compare-and-set (``kv.create`` / ``kv.update(last=revision)``), so replicas agree:

* ``visit.<night>.<visit>``: the visit's frames (path -> status), its state (``open`` ->
  ``building`` -> ``done`` or ``failed``) and, once claimed, the claim token;
* ``plan.<night>``: frame (hash of its path) -> visit, written after the visit keys;
* ``frame.<night>.<hash>``: a frame's final status, written before the plan is read.

A ``phot.done`` handler writes the frame key and then reads the plan key; a ``night.plan``
handler writes the plan key and then reads the frame keys. One of the two always sees the
other, so no frame is lost whatever the order. The update that makes a visit complete also
claims it, with a token that is the claiming message's id; a redelivery of that message (after
a crash) carries the same token and resumes the build, so a claim is never orphaned and no
other replica builds the visit.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

from gppy import bus
from gppy.fitsio import BadInputError, read_header
from gppy.messages import DeepStackRequest, Event, NightPlan, PhotometryDone, StackDone
from gppy.naming import ProductDirs, flag_of, sanitize, scratch_dir, stack_name, weight_of
from gppy.runtime import PermanentError, StageService, run_service

from . import deep
from .coadd import make_stack
from .grid import grid_header, read_skygrid, stack_centre
from .swarp import SwarpOptions

log = logging.getLogger(__name__)
BUCKET = "gppy-stack-visits"
_KEY_BAD = re.compile(r"[^-/_=.a-zA-Z0-9]")


def kv_token(text: str) -> str:
    """``text`` made safe as one part of a KV key (no dots, only the allowed characters)."""
    return _KEY_BAD.sub("-", text.replace(".", "-")) or "-"


def path_hash(path: str) -> str:
    """Short stable id of a frame path."""
    return hashlib.sha256(os.path.normpath(path).encode()).hexdigest()[:20]


class StackService(StageService):
    """Visit stacks of a night and deep stacks on request."""

    name = "stack"
    consumes = ["night.plan", "phot.done", "deepstack.request"]

    def __init__(self, settings=None, options: SwarpOptions | None = None):
        super().__init__(settings)
        self.options = options or SwarpOptions()
        self.kv = None
        self.skygrid = read_skygrid(self.paths.skygrid)

    async def setup(self) -> None:
        self.kv = await bus.kv_bucket(self.js, BUCKET, ttl_s=30 * 86400.0)
        log.info("sky grid: %s (%d tiles)", self.skygrid.source, len(self.skygrid))

    # ------------------------------------------------------------------ dispatch
    async def handle(self, event: Event) -> list[Event]:
        if isinstance(event, NightPlan):
            return await self.on_plan(event)
        if isinstance(event, PhotometryDone):
            if event.image_kind != "single":
                return []
            return await self.on_frame(event)
        if isinstance(event, DeepStackRequest):
            return await self.on_deep(event)
        return []

    # ------------------------------------------------------------------ KV helpers
    async def _get(self, key: str) -> tuple[dict | None, int]:
        try:
            entry = await self.kv.get(key)
        except KeyNotFoundError:
            return None, 0
        if entry.value is None:
            return None, entry.revision or 0
        return json.loads(entry.value), entry.revision

    async def _cas(self, key: str, change: Callable[[dict | None], dict | None]) -> dict | None:
        """Apply ``change`` to the value of ``key`` with compare-and-set, retrying on conflict.

        ``change(old)`` returns the new value, or None for "no change". Returns the value in
        force afterwards.
        """
        for _ in range(200):
            old, revision = await self._get(key)
            new = change(None if old is None else json.loads(json.dumps(old)))
            if new is None:
                return old
            data = json.dumps(new, sort_keys=True).encode()
            try:
                if old is None and revision == 0:
                    await self.kv.create(key, data)
                else:
                    await self.kv.update(key, data, last=revision)
                return new
            except KeyWrongLastSequenceError:
                await asyncio.sleep(0.01)
        raise RuntimeError(f"KV key {key}: too many concurrent updates")

    def _keys(self, night_id: str) -> tuple[str, str, str]:
        n = kv_token(night_id)
        return f"plan.{n}", f"visit.{n}", f"frame.{n}"

    # ------------------------------------------------------------------ events
    async def on_plan(self, event: NightPlan) -> list[Event]:
        plan_key, visit_prefix, frame_prefix = self._keys(event.night_id)
        visits: dict[str, list] = defaultdict(list)
        for f in event.frames:
            visits[f.visit].append(f)
        for visit, frames in visits.items():
            record = {
                "night_id": event.night_id, "unit": event.unit, "lane": event.lane,
                "night_dir": event.night_dir, "visit": visit, "object": frames[0].object,
                "filter": frames[0].filter, "state": "open", "token": "",
                "frames": {path_hash(f.calib_path): {"path": f.calib_path, "status": None} for f in frames},
            }

            def create(old, record=record):
                if old is not None:
                    missing = {h: v for h, v in record["frames"].items() if h not in old["frames"]}
                    if not missing or old["state"] != "open":
                        return None
                    old["frames"].update(missing)
                    return old
                return record

            await self._cas(f"{visit_prefix}.{kv_token(visit)}", create)
        mapping = {path_hash(f.calib_path): f.visit for f in event.frames}

        def merge_plan(old):
            if old is not None and all(old["frames"].get(h) == v for h, v in mapping.items()):
                return None
            value = old or {"night_dir": event.night_dir, "unit": event.unit, "frames": {}}
            value["frames"].update(mapping)
            return value

        await self._cas(plan_key, merge_plan)
        outputs: list[Event] = []
        token = event.msg_id()
        for visit, frames in visits.items():
            statuses = {}
            for f in frames:
                h = path_hash(f.calib_path)
                value, _ = await self._get(f"{frame_prefix}.{h}")
                if value is not None:
                    statuses[h] = value["status"]
            outputs += await self._advance(event, f"{visit_prefix}.{kv_token(visit)}", statuses, token)
        return outputs

    async def on_frame(self, event: PhotometryDone) -> list[Event]:
        plan_key, visit_prefix, frame_prefix = self._keys(event.night_id)
        h = path_hash(event.image_path)
        status = "ok" if event.ok else "failed"
        await self.kv.put(f"{frame_prefix}.{h}", json.dumps({"status": status, "path": event.image_path}).encode())
        plan, _ = await self._get(plan_key)
        if plan is None or h not in plan["frames"]:
            return []  # the plan handler will pick the frame up
        visit = plan["frames"][h]
        return await self._advance(event, f"{visit_prefix}.{kv_token(visit)}", {h: status}, event.msg_id())

    async def _advance(self, event: Event, key: str, statuses: dict[str, str], token: str) -> list[Event]:
        """Record frame statuses in a visit; claim and build it if now complete."""
        claimed = {"mine": False}

        def change(old):
            claimed["mine"] = False
            if old is None:
                return None
            changed = False
            for h, st in statuses.items():
                if h in old["frames"] and old["frames"][h]["status"] != st:
                    old["frames"][h]["status"] = st
                    changed = True
            complete = all(v["status"] is not None for v in old["frames"].values())
            if old["state"] == "open" and complete:
                old["state"] = "building"
                old["token"] = token
                claimed["mine"] = True
                return old
            if old["state"] in ("building", "done", "failed") and old["token"] == token:
                claimed["mine"] = True
            return old if changed and old["state"] == "open" else None

        record = await self._cas(key, change)
        if record is None or not claimed["mine"]:
            return []
        if record["state"] == "done":
            return self._done_events(record)  # a redelivery after the build: same (deduplicated) event
        if record["state"] == "failed":
            return [self.failed(event, record.get("reason", f"visit {record['visit']} failed"), record["visit"])]
        return await self._build_visit(event, key, record, token)

    def _done_events(self, record: dict) -> list[Event]:
        stack = record.get("stack")
        if not stack:
            return []
        return [StackDone(**stack)]

    async def _build_visit(self, event: Event, key: str, record: dict, token: str) -> list[Event]:
        ok_paths = [v["path"] for v in record["frames"].values() if v["status"] == "ok"]
        visit = record["visit"]
        if not ok_paths:
            reason = f"visit {visit}: no frame of it was processed successfully"
            await self._finish(key, token, "failed", None, reason)
            return [self.failed(event, reason, visit)]
        try:
            with self.step("stack_visit"):
                result = await asyncio.to_thread(self.build_visit_stack, record, ok_paths)
        except (PermanentError, BadInputError) as exc:
            # reported as a stage.failed naming the visit (what the watcher waits for); not retried
            reason = f"visit {visit}: {exc}"
            log.error("%s", reason)
            await self._finish(key, token, "failed", None, reason)
            return [self.failed(event, reason, visit)]
        done = StackDone(night_id=record["night_id"], unit=record["unit"], lane=record["lane"],
                         path=str(result.path), weight_path=str(result.weight_path),
                         mask_path=str(result.mask_path), object=record["object"], filter=record["filter"],
                         visit=visit, input_paths=[str(p) for p in result.inputs],
                         single=len(result.inputs) == 1)
        stack = done.model_dump(exclude={"created", "kind", "schema_version"})
        await self._finish(key, token, "done", stack)
        log.info("visit %s stacked from %d frame(s): %s", visit, len(result.inputs), result.path.name)
        return [done]

    async def _finish(self, key: str, token: str, state: str, stack: dict | None, reason: str = "") -> None:
        def change(old):
            if old is None or old.get("token") != token:
                return None
            old["state"] = state
            if stack is not None:
                old["stack"] = stack
            if reason:
                old["reason"] = reason[:2000]
            return old

        await self._cas(key, change)

    # ------------------------------------------------------------------ building
    def _hash_settings(self) -> dict:
        return {"combine": self.options.combine_type, "resampling": self.options.resampling_type,
                "back_size": self.options.back_size, "subtract_back": self.options.subtract_back,
                "stack_size": list(self.settings.stack_size), "pixel_scale": self.settings.pixel_scale,
                "zp_keys": "ZP_AUTO", "skygrid": self.skygrid.source}

    def _grid_for(self, obj: str, first_path: str):
        header = read_header(first_path)
        try:
            centre = stack_centre(obj, header, self.skygrid)
        except ValueError as exc:
            raise PermanentError(str(exc)) from exc
        return centre, grid_header(centre.ra, centre.dec, tuple(self.settings.stack_size), self.settings.pixel_scale)

    def build_visit_stack(self, record: dict, paths: list[str]):
        """Stack one visit (blocking; no bus needed).

        ``record`` holds ``unit``, ``object``, ``filter``, ``night_dir`` and ``visit``;
        ``paths`` are the visit's calibrated singles that succeeded. Returns the
        :class:`~gppy_stack.coadd.StackResult`.
        """
        unit, obj, filt = record["unit"], record["object"], record["filter"]
        centre, grid = self._grid_for(obj, paths[0])
        dirs = ProductDirs.of(self.paths.path_processed, obj, unit, filt)
        work = scratch_dir(self.paths.path_scratch, unit, record["night_dir"]) / "stack"

        def name_for(stats):
            return stack_name(unit, obj, str(stats["DATE-OBS"]), filt, float(stats["EXPTIME"]))

        return make_stack(paths, dirs.base / "stack.com.fits", grid, settings_for_hash=self._hash_settings(),
                          workdir=work, options=self.options, default_saturate=self.settings.saturate_adu,
                          visit=record["visit"], centre_source=centre.source, tile=centre.tile,
                          name_for=name_for)

    # ------------------------------------------------------------------ deep stacks
    def scan_candidates(self, obj: str, filt: str) -> list[deep.Candidate]:
        """Calibrated singles of ``obj`` in ``filt`` anywhere in the processed tree."""
        root = Path(self.paths.path_processed) / obj
        out = []
        for unit_dir in sorted(root.glob("*")) if root.is_dir() else []:
            folder = unit_dir / filt
            if unit_dir.name == deep.DEEP_UNIT or not folder.is_dir():
                continue
            for p in sorted(folder.glob("calib_*.fits")):
                if not deep.is_single_name(p.name):
                    continue
                try:
                    header = read_header(p)
                    out.append(deep.candidate_from_header(p, header))
                except (BadInputError, KeyError, ValueError) as exc:
                    log.warning("deep stack: skipping %s: %s", p.name, exc)
        return out

    def build_deep_stack(self, req: DeepStackRequest):
        """Select, scale and coadd the singles a deep-stack request asks for (blocking).

        Writes a deep stack, or with ``as_reference`` a ``ref_7DT_`` reference; returns the
        :class:`~gppy_stack.coadd.StackResult` (``excluded`` also lists the frames the
        selection rejected).
        """
        obj, filt = sanitize(req.object, "OBJECT"), sanitize(req.filter, "FILTER")
        cands = self.scan_candidates(obj, filt)
        chosen, rejected = deep.select_frames(cands, req.select, req.nights)
        if not chosen:
            raise PermanentError(f"deep stack {obj} {filt}: no frame selected from {len(cands)} "
                                 f"candidate(s) in {self.paths.path_processed}")
        paths = [str(c.path) for c in chosen]
        centre, grid = self._grid_for(obj, paths[0])
        if req.as_reference:
            folder = deep.reference_dir(self.paths.ref_frame, filt)

            def name_for(stats):
                return deep.reference_name(obj, str(stats["DATE-OBS"]), filt, float(stats["EXPTIME"]))
        else:
            folder = ProductDirs.of(self.paths.path_processed, obj, deep.DEEP_UNIT, filt).base

            def name_for(stats):
                return deep.deep_stack_name(obj, str(stats["DATE-OBS"]), filt, float(stats["EXPTIME"]))
        work = Path(self.paths.path_scratch) / "deep" / f"{obj}_{filt}_{os.getpid()}"
        settings = dict(self._hash_settings(), select=req.select, nights=sorted(req.nights or []))
        result = make_stack(paths, folder / "deep.com.fits", grid, settings_for_hash=settings, workdir=work,
                            options=self.options, default_saturate=self.settings.saturate_adu,
                            visit="deep", centre_source=centre.source, tile=centre.tile, name_for=name_for)
        result.excluded.update({k: v for k, v in rejected.items() if k not in result.excluded})
        return result

    async def on_deep(self, req: DeepStackRequest) -> list[Event]:
        with self.step("deep_stack"):
            result = await asyncio.to_thread(self.build_deep_stack, req)
        log.info("deep stack %s %s from %d frame(s): %s", req.object, req.filter, len(result.inputs), result.path)
        if req.as_reference:
            return []  # a reference is an input of later subtractions, not a new science product
        return [StackDone(night_id=req.night_id, unit=deep.DEEP_UNIT, lane=req.lane, path=str(result.path),
                          weight_path=str(weight_of(result.path)), mask_path=str(flag_of(result.path)),
                          object=req.object, filter=req.filter, visit="deep",
                          input_paths=[str(p) for p in result.inputs], single=len(result.inputs) == 1)]


def main() -> None:
    run_service(StackService)


if __name__ == "__main__":
    main()
