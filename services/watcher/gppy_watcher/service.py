"""The watcher service: owner of every night's lifecycle.

* The :class:`~gppy_watcher.scanner.Scanner` (a background task) finds night folders of the
  configured units and, when one is completely copied, the service queues it: the ledger
  moves it to ``queued`` and a :class:`~gppy.messages.NightReady` is published on the ToO
  lane for ToO nights (so they overtake survey nights in every stage) or the survey lane.
* It consumes every stage's events (the runtime's consumers ``watcher-too`` and
  ``watcher-survey``, one message at a time) and the dead letters (an extra consumer
  ``watcher-dlq`` on ``<prefix>.dlq.>``), and follows each night's progress
  (:mod:`gppy_watcher.progress`). A stage that gives up on a message reports it twice (a
  ``stage.failed`` and a dead letter); the two are paired, in whichever order they come.
  When nothing is outstanding the night is *done*. When the night itself failed (the
  calibration stage gave up on it) it is retried with a new attempt until
  ``settings.night_max_attempts``, then *failed* and reported once; a night processed with
  no frame coming through is *failed* at once. A failed night is never queued again until an
  operator re-queues it (``POST /nights/<id>/requeue``).
* A night-ready event that the watcher did not publish (``gppy process UNIT NIGHT_DIR``)
  starts a new run of that night in the ledger, with its targets/filters restriction.
* At the end of a night: header snapshots, the night summary, the v1 run-log line, removal
  of the scratch folder, :class:`~gppy.messages.NightDone`, and a Slack message.
* A night whose stages went silent (no event for ``night_stall_timeout_s`` while no stage
  has work pending) is closed with the missing items listed, so it can never hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from pathlib import Path

from fastapi import FastAPI
from nats.errors import TimeoutError as NatsTimeout
from nats.js import api
from nats.js.errors import NotFoundError

from gppy import __version__, bus, naming
from gppy.config import Settings
from gppy.messages import KINDS, Event, MessageError, NightDone, NightReady, parse
from gppy.notify import SlackNotifier
from gppy.runtime import StageService, run_service
from gppy_watcher import endofnight, report
from gppy_watcher.ledger import Ledger, NightRecord, new_record, start_attempt
from gppy_watcher.progress import NightProgress, collapse_key, dead_letter_fields
from gppy_watcher.scanner import Candidate, NightPatterns, Scanner, Snapshot

log = logging.getLogger(__name__)

PIPELINE_STAGES = ("calib", "astrometry", "phot", "stack", "subtract")
TAG = "[gpPy/7DT]"


class WatcherService(StageService):
    """Watches the units' night folders and follows every night to its end."""

    name = "watcher"
    consumes = [k for k in KINDS if k not in ("night.done", "deepstack.request")]
    dlq_durable = "watcher-dlq"

    def __init__(self, settings: Settings | None = None, notifier: SlackNotifier | None = None,
                 recheck_interval_s: float | None = None, use_events: bool = True,
                 stall_timeout_s: float | None = None):
        super().__init__(settings)
        if self.settings.concurrency != 1:  # each lane's events are followed in stream order
            self.settings = self.settings.model_copy(update={"concurrency": 1})
        self.notifier = notifier
        self.recheck_interval_s = recheck_interval_s
        self.use_events = use_events
        self.ledger: Ledger | None = None
        self.scanner: Scanner | None = None
        self.patterns = NightPatterns.from_settings(self.settings)
        self.stall_timeout_s = float(stall_timeout_s if stall_timeout_s is not None
                                     else getattr(self.settings, "night_stall_timeout_s", 1800.0))
        self._tasks: list[asyncio.Task] = []
        self._progress: dict[str, NightProgress] = {}
        self._last_event = time.time()

    # ---------------------------------------------------------------- dead letters
    async def _dlq_subscription(self):
        """The durable pull consumer ``watcher-dlq`` on ``<prefix>.dlq.>``."""
        cfg = api.ConsumerConfig(durable_name=self.dlq_durable, ack_policy=api.AckPolicy.EXPLICIT,
                                 ack_wait=self.settings.ack_wait_s, max_deliver=self.settings.max_deliver + 1,
                                 filter_subject=f"{self.settings.subject_prefix}.dlq.>",
                                 deliver_policy=api.DeliverPolicy.ALL, max_ack_pending=1000)
        try:
            await self.js.consumer_info(self.settings.stream, self.dlq_durable)
        except NotFoundError:
            await self.js.add_consumer(self.settings.stream, cfg)
        return await self.js.pull_subscribe_bind(durable=self.dlq_durable, stream=self.settings.stream)

    async def _dlq_loop(self, sub) -> None:
        while not self._stopping.is_set():
            try:
                msgs = await sub.fetch(batch=10, timeout=1.0)
            except (TimeoutError, NatsTimeout):
                continue
            except Exception as exc:  # connection trouble: back off
                log.warning("dead-letter fetch failed: %s", exc)
                await asyncio.sleep(1.0)
                continue
            for msg in msgs:
                await self._take_dead_letter(msg)

    async def _take_dead_letter(self, msg) -> None:
        delivered = msg.metadata.num_delivered if msg.metadata else 1
        try:
            await self.on_dead_letter(msg.data)
        except Exception as exc:
            if delivered < self.settings.max_deliver:
                log.warning("dead letter not taken into account yet (%s); will retry", exc)
                with contextlib.suppress(Exception):
                    await msg.nak(delay=min(30.0, 2.0 ** delivered))
                return
            log.exception("dead letter could not be taken into account; skipped")
        with contextlib.suppress(Exception):
            await msg.ack_sync()

    # ---------------------------------------------------------------- lifecycle
    async def setup(self) -> None:
        self.ledger = await Ledger.open(self.js, self.settings)
        if self.notifier is None:
            self.notifier = SlackNotifier.from_settings(self.settings)
        self._last_event = time.time()
        await self.resume()
        self.scanner = Scanner(self.settings, self.paths, self.ledger, self.queue_night, self.night_changed,
                               recheck_interval_s=self.recheck_interval_s, use_events=self.use_events)
        dlq = await self._dlq_subscription()
        self._tasks = [asyncio.create_task(self.scanner.run(), name="scanner"),
                       asyncio.create_task(self._dlq_loop(dlq), name="dead-letters"),
                       asyncio.create_task(self._stall_loop(), name="stall-check")]
        log.info("watching %s under %s (quiet period %.1f s, poll %.1f s)", ", ".join(self.settings.units),
                 self.paths.path_obsdata, self.settings.quiet_period_s, self.settings.poll_interval_s)

    async def on_disk_full(self, root: str, free: float, full: bool, waited_s: float = 0.0) -> None:
        """A data root is full (or has room again): logged, and told on Slack once each."""
        await super().on_disk_full(root, free, full, waited_s)
        if self.notifier is None:
            return
        if full:
            self.notifier.post(f"{TAG} data volume full: {root} has {free:.0f} MB free; the pipeline holds its "
                               f"work until space is freed (nothing is dropped)")
        else:
            self.notifier.post(f"{TAG} space available again on {root} after {waited_s / 60:.1f} min: "
                               f"processing resumed")

    async def background_stop(self) -> None:
        if self.scanner is not None:
            self.scanner.stop()
        for task in self._tasks:
            if task.get_name() == "stall-check":
                task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(task, timeout=10.0)
        self._tasks = []
        if self.notifier is not None:
            await self.notifier.close(timeout=5.0)

    async def resume(self) -> None:
        """After a restart: publish what was queued but not published; finish interrupted ends."""
        for rec in self.ledger.records():
            if rec.state == "queued" and not rec.published:
                log.info("%s: publishing its queued attempt %d again", rec.night_id, rec.attempt)
                await self._publish_ready(rec)
            elif rec.terminal and rec.run and not {"log", "done_event", "message"} <= set(rec.final_steps):
                async with self.ledger.lock(rec.night_id):
                    await self._announce(rec)

    # ---------------------------------------------------------------- queueing
    def _ready_event(self, rec: NightRecord) -> NightReady:
        return NightReady(night_id=rec.night_id, unit=rec.unit, lane=rec.lane, night_dir=rec.night_dir,
                          attempt=rec.attempt, targets=rec.targets, filters=rec.filters)

    def _msg_id(self, rec: NightRecord) -> str:
        return self._ready_event(rec).msg_id()

    async def queue_night(self, cand: Candidate, snap: Snapshot) -> None:
        """The scanner found ``cand`` completely copied: queue its first attempt."""
        queued = []

        def fn(rec):
            queued.clear()
            if rec is None:
                rec = new_record(cand.night_id, cand.unit, str(cand.night_dir), cand.lane, cand.kind, "scan")
            elif rec.state not in ("seen", "waiting"):
                return None  # queued meanwhile by someone else (gppy process)
            queued.append(True)
            return start_attempt(rec, self._msg_id, snapshot=snap.as_dict())

        rec = await self.ledger.mutate(cand.night_id, fn)
        if not queued or rec is None:
            return
        log.info("%s is ready (%d files, %d bytes): queued on the %s lane", cand.night_dir, snap.count, snap.size,
                 rec.lane)
        await self._publish_ready(rec)

    async def _publish_ready(self, rec: NightRecord) -> None:
        await self.publish(self._ready_event(rec))

        def fn(r):
            if r is None or r.attempt != rec.attempt or r.published:
                return None
            r.published = True
            return r
        await self.ledger.mutate(rec.night_id, fn)

    async def requeue(self, night_id: str, targets: list[str] | None = None,
                      filters: list[str] | None = None) -> NightRecord:
        """Operator re-queue: a new run of the night (a fresh attempt budget)."""
        queued = []

        def fn(rec):
            queued.clear()
            if rec is None:
                raise KeyError(night_id)
            if rec.active:
                return None
            queued.append(True)
            return start_attempt(rec, self._msg_id, new_run=True, targets=targets, filters=filters)

        rec = await self.ledger.mutate(night_id, fn)
        if queued:
            self._progress.pop(night_id, None)
            await self.ledger.drop_progress(night_id)
            log.info("%s re-queued by an operator (run %d, attempt %d)", night_id, rec.run, rec.attempt)
            await self._publish_ready(rec)
        return rec

    async def night_changed(self, rec: NightRecord, snap: Snapshot) -> None:
        self.notifier.post(f"{TAG} {rec.unit} {Path(rec.night_dir).name}: files changed after the night was "
                           f"queued ({rec.snapshot.get('count')} files, {rec.snapshot.get('size')} bytes -> "
                           f"{snap.count} files, {snap.size} bytes); not processed again until re-queued")

    # ---------------------------------------------------------------- events
    async def handle(self, event: Event) -> list[Event]:
        self._last_event = time.time()
        nid = event.night_id
        async with self.ledger.lock(nid):
            if event.kind == "night.ready":
                await self._on_night_ready(event)
                return []
            rec = self.ledger.cached(nid)
            if rec is None and event.kind == "night.plan":
                rec = await self._adopt(event)
            if rec is None:
                log.debug("event %s for unknown night %s ignored", event.kind, nid)
                return []
            if not rec.active:
                log.info("late %s for %s (%s) ignored", event.kind, nid, rec.state)
                return []
            if event.kind == "stage.failed" and event.item_path == rec.night_dir and \
                    not await self._night_failure(rec, event.stage, event.reason, "sf"):
                return []
            prog = await self._load_progress(rec)
            new = prog.apply(event)
            await self._after_update(rec, prog, new)
        return []

    async def _night_failure(self, rec: NightRecord, stage: str, reason: str, via: str,
                             attempt: int | None = None, current: bool = True) -> bool:
        """Record a failure of the night itself; False when it is the second report of one
        already counted (the runtime sends a ``stage.failed`` and a dead letter for each give-up,
        possibly after the watcher already moved on to the next attempt) or a stale one."""
        reason = reason[:2000]
        other = "dlq" if via == "sf" else "sf"
        verdict = {"new": False}

        def fn(r):
            verdict["new"] = False
            if r is None:
                return None
            for e in r.night_failures:
                if (e["stage"] == stage and e["reason"] == reason and e.get(other) and not e.get(via)
                        and (attempt is None or e["attempt"] == attempt)):
                    e[via] = True
                    return r
            if not current:
                return None
            verdict["new"] = True
            r.night_failures = [*r.night_failures, {"attempt": r.attempt, "stage": stage, "reason": reason,
                                                    "sf": via == "sf", "dlq": via == "dlq"}][-20:]
            return r

        await self.ledger.mutate(rec.night_id, fn)
        if not verdict["new"]:
            log.info("%s: second report of a night failure (%s: %s) not counted again", rec.night_id, stage,
                     reason[:200])
        return verdict["new"]

    async def on_dead_letter(self, data: bytes) -> None:
        """A stage gave up on a message: close the branch of the night it was about."""
        stage, reason, original, nid = dead_letter_fields(data)
        if stage == self.name or not nid:
            log.info("dead letter of %s without a night of ours: %s", stage or "?", reason[:200])
            return
        self._last_event = time.time()
        async with self.ledger.lock(nid):
            rec = self.ledger.cached(nid)
            if rec is None or not rec.active:
                return
            with contextlib.suppress(MessageError):
                orig = parse(original.encode(), max_bytes=1 << 22)
                if orig.kind == "night.ready" and not await self._night_failure(
                        rec, stage, reason, "dlq", attempt=orig.attempt, current=orig.msg_id() == rec.ready_msg_id):
                    return
            prog = await self._load_progress(rec)
            new = prog.apply_dead_letter(stage, reason, original)
            await self._after_update(rec, prog, new)

    async def _on_night_ready(self, event: NightReady) -> None:
        rec = self.ledger.cached(event.night_id)
        if rec is not None and (event.msg_id() == rec.ready_msg_id or (rec.active and event.attempt < rec.attempt)):
            return  # our own publish, or an older attempt
        kind = self.patterns.classify(Path(event.night_dir).name) or "adhoc"

        def fn(r):
            if r is None:
                r = new_record(event.night_id, event.unit, event.night_dir, event.lane, kind, "adhoc")
            r.lane = event.lane
            r.night_dir = event.night_dir
            r = start_attempt(r, lambda _: event.msg_id(), new_run=True, targets=event.targets,
                              filters=event.filters, attempt=event.attempt)
            r.published = True
            return r

        if rec is not None and rec.active:
            log.warning("%s: a new night-ready event arrived while attempt %d was %s; following the new run",
                        event.night_id, rec.attempt, rec.state)
        self._progress.pop(event.night_id, None)
        await self.ledger.drop_progress(event.night_id)
        new = await self.ledger.mutate(event.night_id, fn)
        log.info("%s requested from outside the watcher (run %d, attempt %d, targets=%s, filters=%s)",
                 event.night_id, new.run, new.attempt, event.targets, event.filters)

    async def _adopt(self, plan) -> NightRecord:
        """A plan for a night the ledger never saw (its night-ready predates the watcher)."""
        def fn(r):
            if r is not None:
                return None
            r = new_record(plan.night_id, plan.unit, plan.night_dir, plan.lane, "adhoc", "adhoc")
            return start_attempt(r, lambda _: "", new_run=True)
        return await self.ledger.mutate(plan.night_id, fn)

    async def _load_progress(self, rec: NightRecord) -> NightProgress:
        prog = self._progress.get(rec.night_id)
        if prog is None:
            data = await self.ledger.load_progress(rec.night_id)
            prog = (NightProgress.from_dict(data) if data else
                    NightProgress(rec.night_id, rec.night_dir, rec.targets, rec.filters,
                                  self.settings.subtract_singles))
            self._progress[rec.night_id] = prog
        return prog

    async def _after_update(self, rec: NightRecord, prog: NightProgress, new_failures: list[dict]) -> None:
        """Store the progress (before the event is acknowledged), update the record, send the
        messages it calls for, and end the night when nothing is outstanding."""
        messages = []
        if prog.planned and not prog.announced:
            prog.announced = True
            messages.append(self._start_message(rec, prog))
        for f in new_failures:
            if f["item"] == rec.night_dir:
                continue  # the night itself: reported once, at its end
            key = collapse_key(f["stage"], f["reason"])
            if key in prog.notified:  # the same failure again (another frame): counted, not sent
                prog.notified[key] += 1
                continue
            prog.notified[key] = 1
            item = Path(f["item"]).name if f["item"] else "-"
            messages.append(f"{TAG} {rec.unit} {Path(rec.night_dir).name}: {f['stage']} failed on {item}: "
                            f"{f['reason'][:800]}")
        await self.ledger.save_progress(rec.night_id, prog.to_dict())
        outstanding = prog.outstanding()
        counts = prog.counts()

        def fn(r):
            if r is None or r.attempt != rec.attempt:
                return None
            if r.state == "queued":
                r.state = "processing"
                r.started_at = time.time()
            r.progress = counts
            r.outstanding = len(outstanding)
            if new_failures:
                f = new_failures[-1]
                r.last_error = f"{f['stage']}: {Path(f['item']).name if f['item'] else ''}: {f['reason']}"[:1000]
            return r

        rec = await self.ledger.mutate(rec.night_id, fn) or rec
        for text in messages:
            self.notifier.post(text)
        if not outstanding:
            await self._night_complete(rec, prog)

    def _start_message(self, rec: NightRecord, prog: NightProgress) -> str:
        n = len(prog.frames)
        objects = len({f["obj"] for f in prog.frames.values()})
        visits = len({f["visit"] for f in prog.frames.values()})
        extra = f" (attempt {rec.run_attempts}/{self.settings.night_max_attempts})" if rec.run_attempts > 1 else ""
        if rec.targets or rec.filters:
            extra += f" restricted to targets={rec.targets or 'all'} filters={rec.filters or 'all'}"
        return (f"{TAG} Start processing {rec.unit} {Path(rec.night_dir).name} ({rec.lane}): {n} frames, "
                f"{objects} objects, {visits} visits{extra}")

    # ---------------------------------------------------------------- the end of a night
    async def _night_complete(self, rec: NightRecord, prog: NightProgress) -> None:
        status, note = prog.outcome()
        # Only a failure of the night itself is retried: when the stages did process it and no
        # frame came through, running it again would re-send the same (de-duplicated) events.
        retry = status == "failed" and (bool(prog.night_failed) or not prog.planned)
        if retry and rec.run_attempts < self.settings.night_max_attempts:
            def fn(r):
                if r is None or r.attempt != rec.attempt:
                    return None
                r.history.append({"attempt": r.attempt, "outcome": "failed", "reason": note, "at": time.time()})
                r.last_error = note
                return start_attempt(r, self._msg_id)
            new = await self.ledger.mutate(rec.night_id, fn)
            self._progress.pop(rec.night_id, None)
            await self.ledger.drop_progress(rec.night_id)
            log.warning("%s attempt %d failed (%s); retrying (%d/%d)", rec.night_id, rec.attempt, note,
                        new.run_attempts, self.settings.night_max_attempts)
            await self._publish_ready(new)
            return
        await self._finalise(rec, prog, status, note)

    async def _finalise(self, rec: NightRecord, prog: NightProgress, status: str, note: str) -> None:
        processed = Path(self.paths.path_processed)
        products = prog.products()
        written, problems = await asyncio.to_thread(endofnight.snapshot_headers, [p["path"] for p in products],
                                                    processed)
        removed = await asyncio.to_thread(endofnight.remove_scratch, self.paths.path_scratch, rec.unit,
                                          rec.night_dir)
        finished = time.time()
        if status == "done" and note == "-" and not any(
                Path(rec.night_dir).glob("*.fit*")) and Path(rec.night_dir).is_dir():
            note = "No Fits Files"
        summary = self._summary(rec, prog, status, note, finished, written, problems, products)
        dest = endofnight.summary_path(processed, rec.night_id)
        await asyncio.to_thread(endofnight.write_summary, dest, summary)
        try:
            await asyncio.to_thread(report.write_report, summary, dest)
        except Exception:  # the report is a courtesy: the night ends all the same
            log.exception("%s: the night report could not be written", rec.night_id)
        collapsed = sum(n - 1 for n in prog.notified.values())

        def fn(r):
            if r is None or r.attempt != rec.attempt:
                return None
            r.state = status
            r.note = note
            r.finished_at = finished
            r.started_at = r.started_at or finished
            r.progress = prog.counts()
            r.progress["failures"] = {"total": len(prog.failures), "collapsed": collapsed}
            r.progress["products"] = {"images": len(products), "headers": len(written),
                                      "catalogues": len(prog.catalogues)}
            r.outstanding = len(prog.lost)
            r.summary_path = str(dest)
            r.history.append({"attempt": r.attempt, "outcome": status, "reason": note, "at": finished})
            if status == "failed":
                r.last_error = note
            r.final_steps = ["headers", "summary", "scratch"]
            return r

        new = await self.ledger.mutate(rec.night_id, fn)
        self._progress.pop(rec.night_id, None)
        await self.ledger.drop_progress(rec.night_id)
        log.info("%s %s: %d images, %d header snapshots, scratch %s; summary %s", rec.night_id, status,
                 len(products), len(written), "removed" if removed else "absent", dest)
        if new is not None:
            await self._announce(new)

    async def _announce(self, rec: NightRecord) -> None:
        """The steps after the ledger says done/failed; each recorded so a restart does it once."""
        steps = set(rec.final_steps)
        if "log" not in steps:
            line = endofnight.append_unit_log(self.paths.unit_log(rec.unit), rec.night_dir,
                                              rec.queued_at or rec.finished_at or time.time(),
                                              rec.finished_at or time.time(),
                                              rec.note if rec.state == "done" else f"Failed: {rec.note}")
            log.info("run log %s: %s", self.paths.unit_log(rec.unit), line)
            rec = await self._step(rec, "log")
        if "done_event" not in steps:
            done = NightDone(night_id=rec.night_id, unit=rec.unit, lane=rec.lane, night_dir=rec.night_dir,
                             status=rec.state, summary_path=rec.summary_path)
            await self.js.publish(done.subject(self.settings.subject_prefix), done.to_bytes(),
                                  headers={"Nats-Msg-Id": f"night.done:{rec.night_id}:{rec.run}:{rec.attempt}"})
            rec = await self._step(rec, "done_event")
        if "message" not in steps:
            self.notifier.post(self._final_message(rec))
            rec = await self._step(rec, "message")

    async def _step(self, rec: NightRecord, step: str) -> NightRecord:
        def fn(r):
            if r is None or step in r.final_steps:
                return None
            r.final_steps.append(step)
            return r
        return await self.ledger.mutate(rec.night_id, fn) or rec

    def _report_note(self, rec: NightRecord) -> str:
        """`` Report: <link>`` when the night's HTML report exists (URL with GPPY_PUBLIC_URL)."""
        path = report.report_path(rec.summary_path) if rec.summary_path else None
        if path is None or not path.exists():
            return ""
        return f". Report: {report.report_link(rec.night_id, path, os.environ.get('GPPY_PUBLIC_URL'))}"

    def _final_message(self, rec: NightRecord) -> str:
        return self._final_text(rec) + self._report_note(rec)

    def _final_text(self, rec: NightRecord) -> str:
        night = Path(rec.night_dir).name
        if rec.state == "failed":
            return (f"{TAG} FAILED {rec.unit} {night} after {rec.run_attempts} attempt(s) "
                    f"(limit {self.settings.night_max_attempts}): {rec.note[:800]}")
        c = rec.progress
        minutes = ((rec.finished_at or 0) - (rec.queued_at or rec.finished_at or 0)) / 60.0
        frames = c.get("plan", {}).get("frames", 0)
        ok = c.get("phot_single", {}).get("done", 0)
        fails = c.get("failures", {})
        text = (f"{TAG} Processing complete {rec.unit} {night}: {ok}/{frames} frames, "
                f"{c.get('stack', {}).get('done', 0)} stacks, {c.get('subtract', {}).get('done', 0)} differences, "
                f"{c.get('products', {}).get('catalogues', 0)} catalogues, {fails.get('total', 0)} failures")
        if fails.get("collapsed"):
            text += f" ({fails['collapsed']} repeated failures not sent separately)"
        if rec.outstanding:
            text += f", {rec.outstanding} items never reported (stalled)"
        if rec.changed:
            text += "; files changed after queueing"
        return text + f", taking {minutes:.1f} mins"

    def _summary(self, rec: NightRecord, prog: NightProgress, status: str, note: str, finished: float,
                 headers: list[str], problems: list[str], products: list[dict]) -> dict:
        fr = prog.frames
        by_kind: dict[str, list[str]] = {}
        for p in products:
            by_kind.setdefault(p["kind"], []).append(p["path"])
        start = rec.queued_at or finished
        return {
            "night_id": rec.night_id, "unit": rec.unit, "night_dir": rec.night_dir, "lane": rec.lane,
            "kind": rec.kind, "source": rec.source, "status": status, "note": note,
            "run": rec.run, "attempt": rec.attempt, "attempts_in_run": rec.run_attempts,
            "attempt_history": rec.history, "targets": rec.targets, "filters": rec.filters,
            "queued": endofnight.iso(rec.queued_at), "started": endofnight.iso(rec.started_at),
            "finished": endofnight.iso(finished), "duration_s": round(finished - start, 3),
            "frames": {
                "planned": len(fr), "skipped_by_restriction": prog.skipped, "rejected": prog.rejected,
                "calibrated": sum(f["cal"] for f in fr.values()),
                "solved": sum(f["sol"] is True for f in fr.values()),
                "photometry_ok": sum(f["phot"] is True for f in fr.values()),
                "failed": [{"path": k, "reason": f["fail"] or ("astrometry failed" if f["sol"] is False else
                                                              "photometry failed")}
                           for k, f in fr.items() if f["fail"] or f["sol"] is False or f["phot"] is False],
            },
            "stages": prog.counts(),
            "products": {"singles": by_kind.get("single", []), "stacks": by_kind.get("stack", []),
                         "differences": by_kind.get("difference", []),
                         "convolved_references": by_kind.get("convolved_reference", []),
                         "weights": by_kind.get("weight", []), "masks": by_kind.get("mask", []),
                         "noise": by_kind.get("noise", []), "catalogues": prog.catalogues, "headers": headers},
            "no_reference": {k: d.get("reason", "") for k, d in prog.diffs.items() if d.get("ok") is False},
            "failures": prog.failure_summary(),
            "outstanding_at_end": prog.lost,
            "timings": prog.timings(rec.queued_at),
            "header_problems": problems[:100],
            "files_changed": rec.changed,
            "pipeline_version": __version__,
        }

    # ---------------------------------------------------------------- stalled nights
    async def _pipeline_busy(self) -> bool:
        for stage in PIPELINE_STAGES:
            for lane in bus.LANES:
                try:
                    info = await self.js.consumer_info(self.settings.stream, f"{stage}-{lane}")
                except Exception:
                    continue
                if info.num_pending or info.num_ack_pending:
                    return True
        return False

    async def check_stalled(self) -> list[str]:
        """Close the processing nights that nothing will advance any more; returns their ids."""
        if time.time() - self._last_event < self.stall_timeout_s or await self._pipeline_busy():
            return []
        closed = []
        for rec in self.ledger.records():
            if rec.state != "processing":
                continue
            async with self.ledger.lock(rec.night_id):
                rec = self.ledger.cached(rec.night_id)
                if rec is None or rec.state != "processing":
                    continue
                prog = await self._load_progress(rec)
                missing = prog.outstanding()
                if not missing:
                    continue
                prog.lost = missing
                if not prog.planned:
                    prog.night_failed = f"no plan from calibration within {self.stall_timeout_s:.0f} s"
                log.warning("%s stalled: nothing reported %d item(s) for %.0f s (%s...)", rec.night_id, len(missing),
                            self.stall_timeout_s, "; ".join(missing[:3]))
                await self.ledger.save_progress(rec.night_id, prog.to_dict())
                await self._night_complete(rec, prog)
                closed.append(rec.night_id)
        return closed

    async def _stall_loop(self) -> None:
        period = max(0.5, min(60.0, self.stall_timeout_s / 4))
        while True:
            await asyncio.sleep(period)
            try:
                await self.check_stalled()
            except Exception:
                log.exception("stall check failed")

    # ---------------------------------------------------------------- HTTP API
    def extra_routes(self, app: FastAPI) -> None:
        """The operations API and the dashboard (:mod:`gppy_watcher.api`)."""
        from gppy_watcher import api

        api.install(app, self)


def adhoc_night_ready(settings: Settings, unit: str, night_dir: str | Path, targets: list[str] | None = None,
                      filters: list[str] | None = None, attempt: int | None = None) -> NightReady:
    """The night-ready event of an ad hoc run (``gppy process UNIT NIGHT_DIR``).

    The lane follows the folder name (ToO pattern -> ``too``); ``attempt`` defaults to the
    current time so that a repeated request is never de-duplicated away. The watcher adopts
    it into the ledger as a new run when it sees it on the bus.
    """
    night_dir = Path(night_dir).resolve()
    kind = NightPatterns.from_settings(settings).classify(night_dir.name)
    return NightReady(night_id=naming.night_id(unit, night_dir), unit=unit.upper(),
                      lane="too" if kind == "too" else "survey", night_dir=str(night_dir),
                      attempt=attempt if attempt is not None else int(time.time()), targets=targets,
                      filters=filters)


def main() -> None:
    run_service(WatcherService)
