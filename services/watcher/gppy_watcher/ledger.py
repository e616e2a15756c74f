"""The durable ledger of nights, in a JetStream key-value bucket.

One record per night (key ``n.<night_id>``) holds its lifecycle state
``seen -> waiting -> queued -> processing -> done | failed``, attempt counts, timestamps,
per-stage counts and the flags an operator needs. The detailed progress of a night being
processed (which frames, stacks and differences are done) is a second, larger value
(``p.<night_id>``, zlib-compressed JSON) that is removed once the night has ended.

Writes use compare-and-set on the key's revision, so the watcher and an ad hoc client (the
``gppy process`` command, the HTTP API) never overwrite each other, and the bucket survives
restarts of the watcher (it lives in the NATS server's file store).

Attempts: ``attempt`` is the ``attempt`` field of the latest published
:class:`gppy.messages.NightReady`; it only ever increases, so every publish has a new message
id and is never swallowed by JetStream's de-duplication. ``run_attempts`` counts the attempts
of the current run and is bounded by ``settings.night_max_attempts``; an operator re-queue
starts a new run.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import zlib
from collections.abc import Callable
from typing import Literal

from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, NoKeysError
from pydantic import BaseModel, Field

from gppy import bus
from gppy.config import Settings

log = logging.getLogger(__name__)

State = Literal["seen", "waiting", "queued", "processing", "done", "failed"]
ACTIVE = ("queued", "processing")
TERMINAL = ("done", "failed")
_KEY_BAD = re.compile(r"[^-_=.a-zA-Z0-9]")


class TaskLock:
    """An asyncio lock that the task holding it may take again (re-entrant per task)."""

    def __init__(self) -> None:
        self._lock = asyncio.Lock()
        self._owner: asyncio.Task | None = None
        self._depth = 0

    async def __aenter__(self) -> TaskLock:
        me = asyncio.current_task()
        if self._owner is me and me is not None:
            self._depth += 1
            return self
        await self._lock.acquire()
        self._owner, self._depth = me, 1
        return self

    async def __aexit__(self, *exc) -> None:
        self._depth -= 1
        if self._depth == 0:
            self._owner = None
            self._lock.release()


class NightRecord(BaseModel):
    """One night in the ledger (times are Unix seconds)."""

    night_id: str
    unit: str
    night_dir: str
    lane: Literal["too", "survey"] = "survey"
    kind: str = "survey"  # survey | too | test | adhoc
    source: str = "scan"  # scan | adhoc | v1-log
    state: State = "seen"
    note: str = ""
    run: int = 0
    attempt: int = 0
    run_attempts: int = 0
    targets: list[str] | None = None
    filters: list[str] | None = None
    ready_msg_id: str = ""
    published: bool = False
    seen_at: float | None = None
    queued_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    updated_at: float | None = None
    snapshot: dict | None = None
    changed: dict | None = None
    progress: dict[str, dict[str, int]] = Field(default_factory=dict)
    outstanding: int | None = None
    last_error: str = ""
    night_failures: list[dict] = Field(default_factory=list)
    history: list[dict] = Field(default_factory=list)
    final_steps: list[str] = Field(default_factory=list)
    summary_path: str = ""

    @property
    def active(self) -> bool:
        return self.state in ACTIVE

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL


def record_key(night_id: str) -> str:
    return "n." + _KEY_BAD.sub("=", night_id)


def progress_key(night_id: str) -> str:
    return "p." + _KEY_BAD.sub("=", night_id)


def bucket_name(settings: Settings) -> str:
    return f"{settings.stream}_nights"


class Ledger:
    """Records of every night, cached in memory, stored in a JetStream KV bucket."""

    def __init__(self, kv):
        self.kv = kv
        self._cache: dict[str, tuple[NightRecord, int]] = {}
        self._locks: dict[str, TaskLock] = {}

    @classmethod
    async def open(cls, js, settings: Settings) -> Ledger:
        """Open (or create) the bucket and load every record."""
        kv = await bus.kv_bucket(js, bucket_name(settings))
        ledger = cls(kv)
        await ledger.load()
        return ledger

    async def load(self) -> int:
        """(Re)load every record from the bucket into the cache; returns their number."""
        try:
            keys = await self.kv.keys()
        except NoKeysError:
            keys = []
        self._cache.clear()
        for key in keys:
            if not key.startswith("n."):
                continue
            try:
                entry = await self.kv.get(key)
            except KeyNotFoundError:
                continue
            rec = NightRecord.model_validate_json(entry.value)
            self._cache[rec.night_id] = (rec, entry.revision)
        return len(self._cache)

    # ---------------------------------------------------------------- reads
    def cached(self, night_id: str) -> NightRecord | None:
        hit = self._cache.get(night_id)
        return hit[0].model_copy(deep=True) if hit else None

    def records(self) -> list[NightRecord]:
        return [r.model_copy(deep=True) for r, _ in self._cache.values()]

    async def get(self, night_id: str) -> NightRecord | None:
        """The record as stored now (refreshes the cache)."""
        rec, rev = await self._read(night_id)
        if rec is not None:
            self._cache[night_id] = (rec, rev)
        return rec.model_copy(deep=True) if rec else None

    async def _read(self, night_id: str) -> tuple[NightRecord | None, int]:
        try:
            entry = await self.kv.get(record_key(night_id))
        except KeyNotFoundError:
            return None, 0
        return NightRecord.model_validate_json(entry.value), entry.revision

    # ---------------------------------------------------------------- writes
    def lock(self, night_id: str) -> TaskLock:
        """The night's lock (re-entrant): hold it across a read-modify-write of the night."""
        return self._locks.setdefault(night_id, TaskLock())

    async def mutate(self, night_id: str, fn: Callable[[NightRecord | None], NightRecord | None]
                     ) -> NightRecord | None:
        """Apply ``fn`` to the current record (``None`` if absent) and store the result.

        ``fn`` gets a private copy and returns the new record, or ``None`` to change nothing.
        A concurrent writer makes the compare-and-set fail; then the record is re-read and
        ``fn`` applied again. Returns the record as stored.
        """
        async with self.lock(night_id):
            return await self._mutate(night_id, fn)

    async def _mutate(self, night_id, fn) -> NightRecord | None:
        hit = self._cache.get(night_id)
        rec, rev = (hit[0], hit[1]) if hit else await self._read(night_id)
        for _ in range(20):
            new = fn(rec.model_copy(deep=True) if rec is not None else None)
            if new is None:
                return rec.model_copy(deep=True) if rec is not None else None
            new.updated_at = time.time()
            data = new.model_dump_json().encode()
            try:
                if rev:
                    rev = await self.kv.update(record_key(night_id), data, last=rev)
                else:
                    rev = await self.kv.create(record_key(night_id), data)
            except KeyWrongLastSequenceError:
                rec, rev = await self._read(night_id)
                continue
            self._cache[night_id] = (new, rev)
            return new.model_copy(deep=True)
        raise RuntimeError(f"ledger: could not update {night_id} (too many concurrent writers)")

    # ---------------------------------------------------------------- detailed progress
    async def load_progress(self, night_id: str) -> dict | None:
        try:
            entry = await self.kv.get(progress_key(night_id))
        except KeyNotFoundError:
            return None
        return json.loads(zlib.decompress(entry.value))

    async def save_progress(self, night_id: str, data: dict) -> None:
        await self.kv.put(progress_key(night_id), zlib.compress(json.dumps(data, separators=(",", ":")).encode(), 1))

    async def drop_progress(self, night_id: str) -> None:
        try:
            await self.kv.purge(progress_key(night_id))
        except KeyNotFoundError:
            pass


# -------------------------------------------------------------------- state transitions
def new_record(night_id: str, unit: str, night_dir: str, lane: str, kind: str, source: str,
               state: State = "seen", **extra) -> NightRecord:
    return NightRecord(night_id=night_id, unit=unit, night_dir=night_dir, lane=lane, kind=kind, source=source,
                       state=state, seen_at=time.time(), **extra)


def start_attempt(rec: NightRecord, msg_id_of: Callable[[NightRecord], str], new_run: bool = False,
                  targets: list[str] | None = None, filters: list[str] | None = None,
                  snapshot: dict | None = None, attempt: int | None = None) -> NightRecord:
    """Move ``rec`` to ``queued`` for its next attempt (a new run when ``new_run``).

    ``attempt`` is the attempt number of a night-ready event published by someone else (the
    ``gppy process`` command); the record's counter never goes back.
    """
    if new_run or rec.run == 0:
        rec.run += 1
        rec.run_attempts = 0
        rec.targets, rec.filters = targets, filters
        rec.changed = None
        rec.final_steps = []
        rec.summary_path = ""
    rec.attempt = max(rec.attempt + 1, attempt or 0)
    rec.run_attempts += 1
    rec.state = "queued"
    rec.note = ""
    rec.queued_at = time.time()
    rec.started_at = None
    rec.finished_at = None
    rec.progress = {}
    rec.outstanding = None
    rec.published = False
    if snapshot is not None:
        rec.snapshot = snapshot
    rec.ready_msg_id = msg_id_of(rec)
    return rec
