"""Follow one night's events on the bus and show per-stage progress (rich progress bars)."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from dataclasses import dataclass, field

from nats.js import api

from gppy import bus
from gppy.config import Settings
from gppy.messages import Event, MessageError, parse

STAGE_ROWS = [
    ("calib", "frames calibrated"),
    ("astrometry", "frames solved"),
    ("phot", "singles photometered"),
    ("stack", "visits stacked"),
    ("subtract", "stacks subtracted"),
    ("transients", "differences searched"),
]


@dataclass
class NightProgress:
    """Counts of one night's events, and its first/last event times per stage."""

    night_id: str
    planned_frames: int | None = None
    planned_visits: int | None = None
    done: dict[str, int] = field(default_factory=Counter)
    failed: dict[str, int] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    first_seen: dict[str, float] = field(default_factory=dict)
    last_seen: dict[str, float] = field(default_factory=dict)
    status: str | None = None
    summary_path: str = ""

    def total(self, stage: str) -> int | None:
        if stage in ("calib", "astrometry", "phot"):
            return self.planned_frames
        if stage in ("stack", "subtract", "transients"):
            return self.planned_visits
        return None

    def _mark(self, stage: str, ok: bool) -> None:
        now = time.time()
        self.first_seen.setdefault(stage, now)
        self.last_seen[stage] = now
        (self.done if ok else self.failed)[stage] += 1

    def update(self, ev: Event) -> None:
        kind = ev.kind
        if kind == "night.plan":
            self.planned_frames = len(ev.frames)
            self.planned_visits = len({f.visit for f in ev.frames})
            for path, reason in ev.rejected.items():
                self.failures.append(f"calib: {path}: {reason}")
        elif kind == "frame.calibrated":
            self._mark("calib", True)
        elif kind == "frame.solved":
            self._mark("astrometry", ev.ok)
            if not ev.ok:
                self.failures.append(f"astrometry: {ev.path}: {ev.reason}")
        elif kind == "phot.done":
            stage = {"single": "phot", "stack": "phot-stack", "difference": "transients"}[ev.image_kind]
            self._mark(stage, ev.ok)
        elif kind == "stack.done":
            self._mark("stack", True)
        elif kind == "diff.done":
            self._mark("subtract", ev.ok)
            if not ev.ok:
                self.failures.append(f"subtract: {ev.science_path}: {ev.reason}")
        elif kind == "stage.failed":
            self.failures.append(f"{ev.stage}: {ev.item_path}: {ev.reason}")
        elif kind == "night.done":
            self.status = ev.status
            self.summary_path = ev.summary_path

    def stage_seconds(self) -> dict[str, float]:
        return {s: round(self.last_seen[s] - self.first_seen[s], 1) for s in self.first_seen}


async def follow_night(settings: Settings, night_id: str, publish: Event | None = None,
                       timeout: float = 3600.0, show: bool = True) -> NightProgress:
    """Subscribe to the night's events (from now on), optionally publish ``publish``, and
    return when the night is done or failed (or on timeout, status None)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    nc = await bus.connect(settings, "gppy-cli")
    js = nc.jetstream()
    await bus.ensure_stream(js, settings)
    prog = NightProgress(night_id)
    queue: asyncio.Queue = asyncio.Queue()

    async def on_msg(msg):
        await queue.put(msg)

    sub = await js.subscribe(f"{settings.subject_prefix}.>", cb=on_msg, ordered_consumer=True,
                             config=api.ConsumerConfig(deliver_policy=api.DeliverPolicy.NEW))
    if publish is not None:
        await bus.publish(js, publish, settings.subject_prefix)
    bars = Progress(TextColumn("{task.description:<22}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[failed]} failed"), TimeElapsedColumn(), disable=not show)
    tasks = {stage: bars.add_task(label, total=None, failed=0) for stage, label in STAGE_ROWS}
    deadline = time.monotonic() + timeout
    with bars:
        while prog.status is None and time.monotonic() < deadline:
            try:
                msg = await asyncio.wait_for(queue.get(), timeout=1.0)
            except TimeoutError:
                continue
            if ".dlq." in msg.subject:
                body = json.loads(msg.data)
                prog.failures.append(f"{body.get('stage')}: dead letter: {body.get('reason')}")
                continue
            try:
                ev = parse(msg.data, settings.max_message_bytes * 4)
            except MessageError:
                continue
            if ev.night_id != night_id:
                continue
            prog.update(ev)
            for stage, _ in STAGE_ROWS:
                bars.update(tasks[stage], total=prog.total(stage), completed=prog.done.get(stage, 0),
                            failed=prog.failed.get(stage, 0))
    await sub.unsubscribe()
    await nc.drain()
    return prog
