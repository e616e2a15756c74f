"""How far a night is, learnt from the stages' events (no I/O, no bus).

The calibration stage's ``night.plan`` lists the night's science frames and their visits.
From then on every frame must reach a terminal state: its single-frame photometry is done
(``phot.done`` single, successful or not), or it failed definitively somewhere (a
``frame.solved`` with ``ok=False``, a ``stage.failed`` naming it, a dead letter of a message
about it). Every visit with at least one frame whose photometry worked expects a stack
(``stack.done``, or a ``stage.failed`` of the stack stage naming the visit: the stack stage
builds a visit from those frames), every stack its photometry and (when the stack's photometry worked) a
difference image (``diff.done``; ``ok=False`` means "no reference" and ends that branch),
every difference its photometry. With ``subtract_singles`` the single frames expect
differences too. A stage failure or dead letter closes the branch it names.

The night is complete when nothing is outstanding. It is *failed* when the night itself
could not be processed (the calibration stage gave up on the ``night.ready`` message) or
when no frame at all came through single-frame photometry; otherwise it is *done*, its per-item failures listed.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter, defaultdict
from datetime import datetime

from gppy.messages import Event, MessageError, parse

#: Output kinds of each stage, in pipeline order (the per-stage timings of the summary).
STAGE_OUTPUTS = [
    ("calib", ["night.plan", "frame.calibrated"]),
    ("astrometry", ["frame.solved"]),
    ("phot_single", ["phot.done:single"]),
    ("stack", ["stack.done"]),
    ("phot_stack", ["phot.done:stack"]),
    ("subtract", ["diff.done"]),
    ("phot_difference", ["phot.done:difference"]),
]

#: Prefix of the reason astrometry gives for a frame that calibration could not reduce.
CALIB_FAILED = "calibration failed: "
_PATH = re.compile(r"(/[^\s:'\",]+)+")
_NUM = re.compile(r"\d+(\.\d+)?")


def collapse_key(stage: str, reason: str) -> str:
    """A key under which failures that differ only in file names and numbers are the same."""
    text = _NUM.sub("N", _PATH.sub("<path>", reason or ""))
    return f"{stage}|{text.strip()[:300]}"


def _match(value: str, allowed: list[str] | None) -> bool:
    return not allowed or value.strip().lower() in {a.strip().lower() for a in allowed}


def _name(path: str) -> str:
    return path.rsplit("/", 1)[-1]


def _ts(iso: str) -> float:
    try:
        return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()
    except (ValueError, AttributeError):
        return time.time()


class NightProgress:
    """Everything the watcher knows about one night's processing (JSON-serialisable)."""

    def __init__(self, night_id: str, night_dir: str, targets: list[str] | None = None,
                 filters: list[str] | None = None, subtract_singles: bool = False):
        self.night_id = night_id
        self.night_dir = night_dir
        self.targets = targets
        self.filters = filters
        self.subtract_singles = subtract_singles
        self.planned = False
        self.frames: dict[str, dict] = {}
        self.skipped = 0
        self.rejected: dict[str, str] = {}
        self.stacks: dict[str, dict] = {}
        self.visit_fail: dict[str, str] = {}
        self.diffs: dict[str, dict] = {}
        self.failures: list[dict] = []
        self.kinds: dict[str, list] = {}
        self.catalogues: list[str] = []
        self.night_failed = ""
        self.lost: list[str] = []
        self.notified: dict[str, int] = {}
        self.announced = False
        self.last_event = time.time()

    # ---------------------------------------------------------------- (de)serialisation
    _FIELDS = ("night_id", "night_dir", "targets", "filters", "subtract_singles", "planned", "frames",
               "skipped", "rejected", "stacks", "visit_fail", "diffs", "failures", "kinds", "catalogues",
               "night_failed", "lost", "notified", "announced", "last_event")

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self._FIELDS}

    @classmethod
    def from_dict(cls, data: dict) -> NightProgress:
        prog = cls(data["night_id"], data["night_dir"])
        for k in cls._FIELDS:
            if k in data:
                setattr(prog, k, data[k])
        return prog

    # ---------------------------------------------------------------- look-ups
    def _frame_key(self, path: str) -> str | None:
        if path in self.frames:
            return path
        for key, f in self.frames.items():
            if path and path in (f.get("raw"), f.get("weight"), f.get("mask")):
                return key
        return None

    def _stack_visit(self, path: str) -> str | None:
        for visit, s in self.stacks.items():
            if path and path in (s.get("path"), s.get("weight"), s.get("mask")):
                return visit
        return None

    def _diff_key(self, path: str) -> str | None:
        if path in self.diffs:
            return path
        for key, d in self.diffs.items():
            if path and path in (d.get("path"), d.get("noise"), d.get("mask"), d.get("conv")):
                return key
        return None

    def _visit_of(self, frame_path: str) -> str | None:
        key = self._frame_key(frame_path)
        return self.frames[key]["visit"] if key else None

    def _wanted(self, obj: str, filt: str) -> bool:
        return _match(obj, self.targets) and _match(filt, self.filters)

    # ---------------------------------------------------------------- events
    def _stamp(self, kind: str, created: str) -> None:
        entry = self.kinds.setdefault(kind, [0, created, created])
        entry[0] += 1
        entry[1] = min(entry[1], created)
        entry[2] = max(entry[2], created)
        self.last_event = time.time()

    def _fail(self, stage: str, item: str, reason: str, via: str = "event") -> dict | None:
        """Record a failure once; returns it when new.

        ``via`` is ``event`` (an ``ok=False`` outcome), ``sf`` (a ``stage.failed``) or ``dlq`` (a
        dead letter). When a stage gives up on a message the runtime reports it twice, by a
        ``stage.failed`` and a dead letter with the same stage and reason, in either order on
        separate consumers: the second report is matched to the first and not counted again.
        Otherwise a failure is recorded once per (stage, item), or per (stage, reason) without
        an item.
        """
        reason = reason[:2000]
        if via in ("sf", "dlq"):
            other = "dlq" if via == "sf" else "sf"
            for f in self.failures:
                if (f["stage"] == stage and f["reason"] == reason and f.get(other) and not f.get(via)
                        and (not item or not f["item"] or f["item"] == item)):
                    f[via] = True
                    f["item"] = f["item"] or item
                    return None
        for f in self.failures:
            if f["stage"] == stage and ((item and f["item"] == item) or (not item and not f["item"]
                                                                           and f["reason"] == reason)):
                if via != "event":
                    f[via] = True
                return None
        rec = {"stage": stage, "item": item, "reason": reason, "at": time.time(), "sf": via == "sf",
               "dlq": via == "dlq"}
        self.failures.append(rec)
        return rec

    def _add_frame(self, path: str, raw: str, obj: str, filt: str, visit: str, weight: str = "",
                   mask: str = "") -> str | None:
        if not self._wanted(obj, filt):
            return None
        self.frames[path] = {"raw": raw, "obj": obj, "filt": filt, "visit": visit, "cal": False, "sol": None,
                             "phot": None, "fail": "", "weight": weight, "mask": mask}
        return path

    def apply(self, ev: Event) -> list[dict]:
        """Take one event into account; returns the failures it newly reported."""
        kind = ev.kind
        new: list[dict | None] = []
        if kind == "night.plan":
            self._stamp(kind, ev.created)
            self.planned = True
            for fr in ev.frames:
                if fr.calib_path in self.frames:
                    continue
                if self._add_frame(fr.calib_path, fr.raw_path, fr.object, fr.filter, fr.visit) is None:
                    self.skipped += 1
            for raw, reason in ev.rejected.items():
                if raw not in self.rejected:
                    self.rejected[raw] = reason
                    new.append(self._fail("calib", raw, f"rejected: {reason}"))
        elif kind == "frame.calibrated":
            self._stamp(kind, ev.created)
            key = self._frame_key(ev.path) or self._frame_key(ev.raw_path)
            if key is None:
                key = self._add_frame(ev.path, ev.raw_path, ev.object, ev.filter, ev.visit)
            if key is not None:
                self.frames[key].update(cal=True, weight=ev.weight_path, mask=ev.mask_path)
        elif kind == "frame.solved":
            self._stamp(kind, ev.created)
            key = self._frame_key(ev.path)
            if key is None:
                key = self._add_frame(ev.path, "", ev.object, ev.filter, ev.visit, ev.weight_path, ev.mask_path)
            if key is not None:
                self.frames[key]["cal"] = True
                self.frames[key]["sol"] = ev.ok
                if not ev.ok:
                    reason = ev.reason or "no astrometric solution"
                    # a frame calibration could not reduce is passed on by astrometry: calib's failure
                    stage = "calib" if reason.startswith(CALIB_FAILED) else "astrometry"
                    new.append(self._fail(stage, key, reason.removeprefix(CALIB_FAILED)))
        elif kind == "phot.done":
            self._stamp(f"phot.done:{ev.image_kind}", ev.created)
            for p in (ev.catalogue_path, ev.candidates_path):
                if ev.ok and p and p not in self.catalogues:
                    self.catalogues.append(p)
            new.extend(self._apply_phot(ev))
        elif kind == "stack.done":
            self._stamp(kind, ev.created)
            self.stacks[ev.visit] = {"path": ev.path, "weight": ev.weight_path, "mask": ev.mask_path,
                                     "obj": ev.object, "filt": ev.filter, "n": len(ev.input_paths),
                                     "single": ev.single, "phot": None, "fail": ""}
        elif kind == "diff.done":
            self._stamp(kind, ev.created)
            d = self.diffs.setdefault(ev.science_path, {"phot": None, "fail": ""})
            d.update(path=ev.path, noise=ev.noise_path, mask=ev.mask_path, conv=ev.conv_path,
                     ref=ev.reference_path, ok=ev.ok, reason=ev.reason, obj=ev.object, filt=ev.filter)
        elif kind == "stage.failed":
            self._stamp(kind, ev.created)
            new.extend(self._apply_failure(ev.stage, ev.item_path, ev.reason))
        return [f for f in new if f]

    def _apply_phot(self, ev) -> list[dict | None]:
        path, ok = ev.image_path, ev.ok
        out: list[dict | None] = []
        if ev.image_kind == "single":
            key = self._frame_key(path)
            if key is not None:
                f = self.frames[key]
                f["phot"] = ok
                if not ok and f["sol"] is not False and not f["fail"]:
                    out.append(self._fail("phot", key, ev.reason or "photometry failed"))
            if self.subtract_singles and ok and path not in self.diffs:
                self.diffs[path] = {"phot": None, "fail": "", "expected": True, "obj": "", "filt": ""}
        elif ev.image_kind == "stack":
            visit = self._stack_visit(path)
            if visit is None:
                visit = f"?{path}"
                self.stacks[visit] = {"path": path, "phot": None, "fail": "", "obj": "", "filt": ""}
            self.stacks[visit]["phot"] = ok
            if not ok:
                out.append(self._fail("phot", path, ev.reason or "photometry of the stack failed"))
        else:
            key = self._diff_key(path)
            if key is None:
                key = path
                self.diffs[key] = {"path": path, "ok": True, "phot": None, "fail": ""}
            d = self.diffs[key]
            d["phot"] = ok
            if not ok and d.get("ok") is not False and not d.get("fail"):  # not an upstream outcome
                out.append(self._fail("phot", path, ev.reason or "photometry of the difference failed"))
        return out

    def _close(self, stage: str, item: str, reason: str) -> tuple[str, bool]:
        """Close the branch that a failure of ``stage`` on ``item`` ends.

        Returns ``(key, consequence)``: the item's canonical key, and whether the failure only
        follows from failures already reported (a visit none of whose frames came through).
        """
        text = f"{stage}: {reason}"[:500]
        if not item:
            return "", False
        if item == self.night_dir:
            if not self.planned:
                self.night_failed = self.night_failed or text
            else:  # the stage gave up on the night after its plan: what it did not deliver never comes
                for f in self.frames.values():
                    if not f["cal"] and not f["fail"]:
                        f["fail"] = text
            return item, False
        key = self._frame_key(item)
        if key is not None:
            f = self.frames[key]
            if stage == "stack":
                self.visit_fail.setdefault(f["visit"], text)
            elif stage == "subtract" and self.subtract_singles:
                self.diffs.setdefault(key, {"phot": None})["fail"] = text
            elif not f["fail"] and f["phot"] is None:
                f["fail"] = text
            return key, False
        visit = self._stack_visit(item)
        if visit is not None:
            st = self.stacks[visit]
            if stage == "subtract":
                self.diffs.setdefault(st["path"], {"phot": None})["fail"] = text
            else:
                st["fail"] = st["fail"] or text
            return item, False
        if item in {f["visit"] for f in self.frames.values()}:
            self.visit_fail.setdefault(item, text)
            return item, not any(f["phot"] is True for f in self.frames.values() if f["visit"] == item)
        dkey = self._diff_key(item)
        if dkey is not None:
            self.diffs[dkey]["fail"] = self.diffs[dkey].get("fail") or text
        return item, False

    def _apply_failure(self, stage: str, item: str, reason: str) -> list[dict]:
        """A ``stage.failed``: close its branch; returns the failure if newly reported."""
        key, consequence = self._close(stage, item, reason)
        rec = self._fail(stage, key or item, reason, "sf")
        return [] if rec is None or consequence else [rec]

    def apply_dead_letter(self, stage: str, reason: str, data: str) -> list[dict]:
        """A dead letter of ``stage``: the message it gave up on (``data``) names the branch."""
        try:
            ev: Event | None = parse(data.encode(), max_bytes=1 << 22)
        except MessageError:
            ev = None
        item = ""
        if ev is not None:
            item = (getattr(ev, "path", "") or getattr(ev, "image_path", "") or getattr(ev, "science_path", "")
                    or getattr(ev, "night_dir", ""))
        key = self._close_from_dead_letter(stage, reason, ev)
        rec = self._fail(stage, key or item, reason, "dlq")
        return [] if rec is None else [rec]

    def _close_from_dead_letter(self, stage: str, reason: str, ev: Event | None) -> str:
        """Close the branch of the message a stage gave up on; returns the item's key."""
        if ev is None:
            return ""
        text = f"{stage}: {reason}"[:500]
        if ev.kind == "night.ready":
            return self._close(stage, ev.night_dir, reason)[0]
        if ev.kind == "night.plan" and stage == "stack":
            for f in self.frames.values():
                self.visit_fail.setdefault(f["visit"], text)
            return ev.night_dir
        if ev.kind in ("frame.calibrated", "frame.solved", "stack.done"):
            return self._close(stage, ev.path, reason)[0]
        if ev.kind == "phot.done":
            if ev.image_kind == "single" and stage == "stack":
                visit = self._visit_of(ev.image_path)
                if visit:
                    self.visit_fail.setdefault(visit, text)
                return self._frame_key(ev.image_path) or ev.image_path
            if stage == "subtract" and (ev.image_kind == "stack" or self.subtract_singles):
                self.diffs.setdefault(ev.image_path, {"phot": None})["fail"] = text
            return ev.image_path
        if ev.kind == "diff.done":
            key = ev.science_path
            if key in self.diffs:
                self.diffs[key]["fail"] = self.diffs[key].get("fail") or text
            return ev.path or key
        return ""

    # ---------------------------------------------------------------- state
    @staticmethod
    def _frame_terminal(f: dict) -> bool:
        return bool(f["fail"]) or f["phot"] is not None or f["sol"] is False

    def outstanding(self) -> list[str]:
        """What the night still waits for (empty when complete)."""
        if self.night_failed:
            return []
        if not self.planned:
            return ["night.plan (calibration)"]
        out: list[str] = []
        by_visit: dict[str, list[dict]] = defaultdict(list)
        for key, f in self.frames.items():
            by_visit[f["visit"]].append(f)
            if not self._frame_terminal(f):
                step = "calibration" if not f["cal"] else "astrometry" if f["sol"] is None else "photometry"
                out.append(f"{step} of {_name(key)}")
        for visit, frames in by_visit.items():
            if visit in self.stacks or any(not self._frame_terminal(f) for f in frames):
                continue
            if visit not in self.visit_fail and any(f["phot"] is True for f in frames):
                out.append(f"stack of visit {visit}")
        for s in self.stacks.values():
            if s.get("fail"):
                continue
            name = _name(s["path"])
            if s["phot"] is None:
                out.append(f"photometry of stack {name}")
            elif s["phot"] is True and s["path"] not in self.diffs:
                out.append(f"difference of {name}")
        for key, d in self.diffs.items():
            if d.get("fail") or d.get("ok") is False:
                continue
            if "ok" not in d:
                out.append(f"difference of {_name(key)}")
            elif d["phot"] is None:
                out.append(f"photometry of difference {_name(d.get('path') or key)}")
        return out

    def complete(self) -> bool:
        return not self.outstanding()

    def frames_ok(self) -> int:
        return sum(1 for f in self.frames.values() if f["phot"] is True)

    def outcome(self) -> tuple[str, str]:
        """``(status, note)``: ``failed`` when the night itself failed or no frame came through."""
        if self.night_failed:
            return "failed", self.night_failed
        if self.planned and not self.frames and self.rejected and not self.skipped:
            # files were there, none could be used (e.g. science frames with no master at all):
            # say so rather than "No Light Frame" (each rejection was reported on its own)
            path, reason = next(iter(self.rejected.items()))
            return "done", (f"no usable frame: {len(self.rejected)} file(s) rejected, e.g. {_name(path)}: "
                            f"{reason}")[:500]
        if self.planned and not self.frames:
            return "done", "No Light Frame" if not self.skipped else "no frame matches the targets/filters"
        if self.frames_ok() == 0:
            first = next((f"{f['stage']}: {f['reason']}" for f in self.failures), "no event")
            return "failed", f"no frame was processed successfully ({first})"[:500]
        return "done", "-"

    def counts(self) -> dict[str, dict[str, int]]:
        """Per-stage done/failed counts (what the ledger shows as the night's progress)."""
        fr = list(self.frames.values())
        stage_of_fail = Counter(f["fail"].split(":", 1)[0] for f in fr if f["fail"])
        diffs = list(self.diffs.values())
        return {
            "plan": {"frames": len(fr), "visits": len({f["visit"] for f in fr}), "rejected": len(self.rejected),
                     "skipped": self.skipped},
            "calib": {"done": sum(f["cal"] for f in fr), "failed": stage_of_fail.get("calib", 0)},
            "astrometry": {"done": sum(f["sol"] is True for f in fr),
                           "failed": sum(f["sol"] is False for f in fr) + stage_of_fail.get("astrometry", 0)},
            "phot_single": {"done": sum(f["phot"] is True for f in fr),
                            "failed": sum(f["phot"] is False for f in fr) + stage_of_fail.get("phot", 0)},
            "stack": {"done": len(self.stacks), "failed": len(self.visit_fail)
                      + sum(bool(s.get("fail")) for s in self.stacks.values())},
            "phot_stack": {"done": sum(s["phot"] is True for s in self.stacks.values()),
                           "failed": sum(s["phot"] is False for s in self.stacks.values())},
            "subtract": {"done": sum(d.get("ok") is True for d in diffs),
                         "no_reference": sum(d.get("ok") is False for d in diffs),
                         "failed": sum(bool(d.get("fail")) for d in diffs)},
            "phot_difference": {"done": sum(d["phot"] is True for d in diffs),
                                "failed": sum(d["phot"] is False for d in diffs)},
        }

    def products(self) -> list[dict]:
        """Every image product the night wrote: ``{"path", "kind", "obj", "filt"}``."""
        out = []
        for key, f in self.frames.items():
            if f["cal"]:
                for p, k in ((key, "single"), (f.get("weight"), "weight"), (f.get("mask"), "mask")):
                    if p:
                        out.append({"path": p, "kind": k, "obj": f["obj"], "filt": f["filt"]})
        for s in self.stacks.values():
            for p, k in ((s.get("path"), "stack"), (s.get("weight"), "weight"), (s.get("mask"), "mask")):
                if p:
                    out.append({"path": p, "kind": k, "obj": s.get("obj", ""), "filt": s.get("filt", "")})
        for d in self.diffs.values():
            if d.get("ok"):
                for p, k in ((d.get("path"), "difference"), (d.get("noise"), "noise"), (d.get("mask"), "mask"),
                             (d.get("conv"), "convolved_reference")):
                    if p:
                        out.append({"path": p, "kind": k, "obj": d.get("obj", ""), "filt": d.get("filt", "")})
        return out

    def timings(self, queued_at: float | None) -> dict[str, dict]:
        """Per stage: number of outputs and the span from the first available input to the last
        output (the stage's wall-clock share of the night, in seconds)."""
        out: dict[str, dict] = {}
        prev_first = queued_at
        for stage, kinds in STAGE_OUTPUTS:
            entries = [self.kinds[k] for k in kinds if k in self.kinds]
            if not entries:
                continue
            first = min(_ts(e[1]) for e in entries)
            last = max(_ts(e[2]) for e in entries)
            start = prev_first if prev_first is not None else first
            out[stage] = {"outputs": sum(e[0] for e in entries), "first_output": min(e[1] for e in entries),
                          "last_output": max(e[2] for e in entries), "span_s": round(max(0.0, last - start), 3)}
            prev_first = first
        return out

    def failure_summary(self) -> list[dict]:
        """Failures grouped by stage and collapsed reason, with counts and a few items."""
        groups: dict[str, dict] = {}
        for f in self.failures:
            key = collapse_key(f["stage"], f["reason"])
            g = groups.setdefault(key, {"stage": f["stage"], "reason": f["reason"], "count": 0, "items": []})
            g["count"] += 1
            if f["item"] and len(g["items"]) < 20:
                g["items"].append(f["item"])
        return list(groups.values())


def dead_letter_fields(data: bytes) -> tuple[str, str, str, str | None]:
    """``(stage, reason, original message, night_id or None)`` of a dead letter body."""
    try:
        body = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return "", "unreadable dead letter", "", None
    original = str(body.get("data", ""))
    night = None
    try:
        night = json.loads(original).get("night_id")
    except (json.JSONDecodeError, AttributeError):
        night = None
    return str(body.get("stage", "")), str(body.get("reason", "")), original, night
