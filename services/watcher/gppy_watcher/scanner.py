"""Find the night folders of the configured units and decide when each is completely copied.

v1 (v1-behaviour.md §2) globbed ``{path_obsdata}/<UNIT>/`` for ``20??-??-??_gain2750``
(survey), ``20??-??-??_ToO_gain2750`` (ToO) and ``20??-00-??`` (test, skipped), and called a
folder ready when its total size was equal 5 s apart (bug B19: no per-file check). Here a
night is ready when its total size and file count have been unchanged for
``settings.quiet_period_s`` *and* every FITS file in it has a complete header and data unit
(:func:`gppy.fitsio.is_complete_fits`): a truncated file means "still copying" -- until the
folder has been unchanged for ``settings.night_incomplete_grace_s``; then the copy is taken
to have died and the night is queued (calibration rejects the broken files with the reason).

File-system events (watchfiles: inotify on Linux) wake the scanner as soon as something
changes; a poll every ``settings.poll_interval_s`` is the fallback for network file systems
that deliver no events. Nights already processed before the ledger existed are recognised
from v1's run log (their folder is in its ``date`` column) and not queued again. Processed
nights are re-checked now and then: a night whose files changed after it was queued is
flagged (``changed`` in the ledger, a log line and a message), not silently ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from gppy import naming
from gppy.config import PathConfig, Settings
from gppy.fitsio import is_complete_fits
from gppy_watcher.endofnight import logged_nights
from gppy_watcher.ledger import Ledger, NightRecord, new_record

log = logging.getLogger(__name__)
logging.getLogger("watchfiles").setLevel(logging.WARNING)  # one INFO line per change otherwise

#: v1's folder globs as regular expressions; the month ``00`` marks a test night.
DEFAULT_PATTERNS = {
    "test": r"^20\d\d-00-\d\d(_.*)?$",
    "too": r"^20\d\d-\d\d-\d\d_ToO_gain2750$",
    "survey": r"^20\d\d-\d\d-\d\d_gain2750$",
}
FITS_SUFFIXES = (".fits", ".fit", ".fts", ".fits.fz")
#: Nights are re-checked for changed files for this many days after they were processed.
RECHECK_DAYS = 14


@dataclass(frozen=True)
class NightPatterns:
    """Folder-name patterns (regular expressions) of each kind of night."""

    test: re.Pattern
    too: re.Pattern
    survey: re.Pattern

    @classmethod
    def from_settings(cls, settings: Settings) -> NightPatterns:
        """Defaults, overridden by an optional ``night_patterns`` mapping in the settings."""
        pats = dict(DEFAULT_PATTERNS)
        pats.update(getattr(settings, "night_patterns", None) or {})
        return cls(**{k: re.compile(v) for k, v in pats.items() if k in DEFAULT_PATTERNS})

    def classify(self, name: str) -> str | None:
        """``test``, ``too``, ``survey`` or ``None`` for a folder that is not a night."""
        for kind in ("test", "too", "survey"):
            if getattr(self, kind).match(name):
                return kind
        return None


@dataclass(frozen=True)
class Snapshot:
    """Total size (bytes), number of files and of FITS files below a folder."""

    size: int
    count: int
    fits: int

    def as_dict(self) -> dict:
        return {"size": self.size, "count": self.count, "fits": self.fits}

    def same_files(self, other: dict | None) -> bool:
        return bool(other) and other.get("size") == self.size and other.get("count") == self.count


def is_fits(name: str) -> bool:
    return name.lower().endswith(FITS_SUFFIXES) and not name.startswith(".")


def take_snapshot(folder: Path) -> tuple[Snapshot, list[Path]]:
    """Walk ``folder`` (recursively, as v1's ``os.walk``); returns the snapshot and the FITS files."""
    size = count = 0
    fits: list[Path] = []
    for root, _dirs, files in os.walk(folder):
        for name in files:
            p = os.path.join(root, name)
            try:
                size += os.stat(p).st_size
            except OSError:  # vanished while walking: still changing
                continue
            count += 1
            if is_fits(name):
                fits.append(Path(p))
    return Snapshot(size, count, len(fits)), fits


class CompletenessCache:
    """``is_complete_fits`` results, re-used while a file's size and mtime stay the same."""

    def __init__(self) -> None:
        self._seen: dict[str, tuple[int, int, bool]] = {}

    def incomplete(self, files: list[Path]) -> list[Path]:
        bad = []
        for p in files:
            try:
                st = p.stat()
            except OSError:
                bad.append(p)
                continue
            hit = self._seen.get(str(p))
            if hit and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
                ok = hit[2]
            else:
                ok = is_complete_fits(p)
                self._seen[str(p)] = (st.st_size, st.st_mtime_ns, ok)
            if not ok:
                bad.append(p)
        return bad

    def forget(self, folder: str) -> None:
        prefix = folder.rstrip("/") + "/"
        for k in [k for k in self._seen if k.startswith(prefix)]:
            del self._seen[k]


@dataclass(frozen=True)
class Candidate:
    """A night folder found under a unit."""

    unit: str
    night_dir: Path
    kind: str

    @property
    def night_id(self) -> str:
        return naming.night_id(self.unit, self.night_dir)

    @property
    def lane(self) -> str:
        return "too" if self.kind == "too" else "survey"


@dataclass
class _Watch:
    snapshot: Snapshot
    since: float


ReadyCallback = Callable[[Candidate, Snapshot], Awaitable[None]]
ChangedCallback = Callable[[NightRecord, Snapshot], Awaitable[None]]


class Scanner:
    """Discovers nights, tracks their readiness in the ledger and hands ready ones over."""

    def __init__(self, settings: Settings, paths: PathConfig, ledger: Ledger, on_ready: ReadyCallback,
                 on_changed: ChangedCallback | None = None, recheck_interval_s: float | None = None,
                 use_events: bool = True, clock: Callable[[], float] = time.monotonic):
        self.settings = settings
        self.paths = paths
        self.ledger = ledger
        self.on_ready = on_ready
        self.on_changed = on_changed
        self.patterns = NightPatterns.from_settings(settings)
        self.quiet = float(settings.quiet_period_s)
        #: Unchanged this long, a night with incomplete FITS files is queued all the same (a copy
        #: that died leaves a truncated file for ever; calibration rejects it with the reason).
        self.incomplete_grace = max(self.quiet, float(getattr(settings, "night_incomplete_grace_s", 600.0)))
        self.poll = max(0.05, float(settings.poll_interval_s))
        self.recheck = recheck_interval_s if recheck_interval_s is not None else max(60.0, 30 * self.poll)
        self.use_events = use_events
        self.clock = clock
        self.cache = CompletenessCache()
        self.scans = 0
        self._watch: dict[str, _Watch] = {}
        self._ignored: set[str] = set()
        self._last_recheck = clock()
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._watch_restart = asyncio.Event()
        self._watch_paths: tuple[str, ...] = ()
        self._logged: dict[str, tuple[float, set[str]]] = {}

    # ---------------------------------------------------------------- discovery (blocking I/O)
    def unit_dirs(self) -> list[tuple[str, Path]]:
        return [(u.upper(), Path(self.paths.path_obsdata) / u.upper()) for u in self.settings.units]

    def _discover(self) -> list[Candidate]:
        found = []
        for unit, udir in self.unit_dirs():
            try:
                entries = sorted(os.scandir(udir), key=lambda e: e.name)
            except OSError:
                continue
            for entry in entries:
                if not entry.is_dir():
                    continue
                kind = self.patterns.classify(entry.name)
                if kind is None:
                    continue
                if kind == "test" and not self.settings.process_test_nights:
                    if entry.path not in self._ignored:
                        self._ignored.add(entry.path)
                        log.info("test night %s ignored (process_test_nights is off)", entry.path)
                    continue
                found.append(Candidate(unit, Path(os.path.abspath(entry.path)), kind))
        return found

    def _v1_logged(self, unit: str) -> set[str]:
        path = self.paths.unit_log(unit)
        try:
            mtime = path.stat().st_mtime
        except OSError:
            return set()
        hit = self._logged.get(unit)
        if hit is None or hit[0] != mtime:
            hit = (mtime, logged_nights(path))
            self._logged[unit] = hit
        return hit[1]

    def _measure(self, cands: list[Candidate]) -> dict[str, tuple[Snapshot, list[Path]]]:
        return {c.night_id: take_snapshot(c.night_dir) for c in cands}

    # ---------------------------------------------------------------- one pass
    async def scan_once(self) -> list[Candidate]:
        """Look at every night folder once; returns the nights handed over as ready."""
        self.scans += 1
        found = await asyncio.to_thread(self._discover)
        now = self.clock()
        recheck = now - self._last_recheck >= self.recheck
        to_measure: list[Candidate] = []
        terminal: list[tuple[Candidate, NightRecord]] = []
        for cand in found:
            rec = self.ledger.cached(cand.night_id)
            if rec is None:
                rec = await self._register(cand)
            if rec.state in ("seen", "waiting"):
                to_measure.append(cand)
            elif recheck and self._recheckable(rec):
                terminal.append((cand, rec))
        if recheck:
            self._last_recheck = now
        snaps = await asyncio.to_thread(self._measure, to_measure + [c for c, _ in terminal]) if (
            to_measure or terminal) else {}
        ready: list[tuple[Candidate, Snapshot]] = []
        for cand in to_measure:
            snap, fits = snaps[cand.night_id]
            verdict = await self._readiness(cand, snap, fits)
            if verdict:
                ready.append((cand, snap))
        for cand, rec in terminal:
            snap, _ = snaps[cand.night_id]
            if not snap.same_files(rec.snapshot):
                await self._flag_changed(rec, snap)
        self._update_watch_paths([str(c.night_dir) for c in to_measure])
        # ToO nights first, then by folder name (v1's order)
        ready.sort(key=lambda cs: (cs[0].kind != "too", cs[0].night_dir.name, cs[0].unit))
        for cand, snap in ready:
            self._watch.pop(cand.night_id, None)
            await self.on_ready(cand, snap)
        return [c for c, _ in ready]

    def _recheckable(self, rec: NightRecord) -> bool:
        """Queued or processed by us, not flagged yet, and not older than ``RECHECK_DAYS``."""
        if rec.state in ("seen", "waiting") or rec.source == "v1-log" or not rec.snapshot or rec.changed:
            return False
        return time.time() - (rec.finished_at or rec.queued_at or 0) < RECHECK_DAYS * 86400

    async def _register(self, cand: Candidate) -> NightRecord:
        if str(cand.night_dir) in self._v1_logged(cand.unit):
            snap, _ = await asyncio.to_thread(take_snapshot, cand.night_dir)
            log.info("%s is in the run log already: recorded as done, not queued", cand.night_dir)

            def create(rec):
                if rec is not None:
                    return None
                return new_record(cand.night_id, cand.unit, str(cand.night_dir), cand.lane, cand.kind, "v1-log",
                                  state="done", snapshot=snap.as_dict(), note="listed in the unit run log")
            return await self.ledger.mutate(cand.night_id, create)

        def create_seen(rec):
            if rec is not None:
                return None
            return new_record(cand.night_id, cand.unit, str(cand.night_dir), cand.lane, cand.kind, "scan")
        rec = await self.ledger.mutate(cand.night_id, create_seen)
        if rec.state == "seen":
            log.info("new night folder %s (%s)", cand.night_dir, cand.kind)
        return rec

    async def _readiness(self, cand: Candidate, snap: Snapshot, fits: list[Path]) -> bool:
        now = self.clock()
        w = self._watch.get(cand.night_id)
        if w is None or w.snapshot != snap:
            first = w is None
            self._watch[cand.night_id] = _Watch(snap, now)
            if not first:
                await self._set_waiting(cand, f"copying: {snap.count} files, {snap.size} bytes")
            return False
        if snap.fits == 0:
            await self._set_waiting(cand, "no FITS file yet")
            return False
        if now - w.since < self.quiet:
            return False
        bad = await asyncio.to_thread(self.cache.incomplete, fits)
        if bad and now - w.since < self.incomplete_grace:
            await self._set_waiting(cand, f"{len(bad)} incomplete FITS file(s), e.g. {bad[0].name}")
            return False
        if bad:
            log.warning("%s: %d FITS file(s) still incomplete after %.0f s without change (e.g. %s): queued "
                        "all the same; calibration rejects them", cand.night_dir, len(bad), now - w.since,
                        bad[0].name)
        return True

    async def _set_waiting(self, cand: Candidate, note: str) -> None:
        def fn(rec):
            if rec is None or rec.state not in ("seen", "waiting") or (rec.state == "waiting" and rec.note == note):
                return None
            rec.state = "waiting"
            rec.note = note
            return rec
        await self.ledger.mutate(cand.night_id, fn)

    async def _flag_changed(self, rec: NightRecord, snap: Snapshot) -> None:
        def fn(r):
            if r is None or r.changed or r.state in ("seen", "waiting"):
                return None
            r.changed = {"at": time.time(), "before": r.snapshot, "now": snap.as_dict()}
            return r
        new = await self.ledger.mutate(rec.night_id, fn)
        if new is not None and new.changed and new.changed.get("now") == snap.as_dict():
            log.warning("%s changed after it was queued (%s -> %s); re-queue it to process it again",
                        rec.night_dir, rec.snapshot, snap.as_dict())
            if self.on_changed is not None:
                await self.on_changed(new, snap)

    def next_timeout(self) -> float:
        """Seconds until the next scan is due (a quiet period ending, or the poll interval)."""
        now = self.clock()
        due = [w.since + self.quiet - now for w in self._watch.values()]
        due = [d for d in due if d > 0]
        return max(0.05, min([self.poll, *due]) + 0.01)

    # ---------------------------------------------------------------- event-driven loop
    def _update_watch_paths(self, active: list[str]) -> None:
        paths = tuple(sorted({str(d) for _, d in self.unit_dirs() if d.is_dir()} | set(active)))
        if paths != self._watch_paths:
            self._watch_paths = paths
            self._watch_restart.set()

    async def _watch_loop(self) -> None:
        """Wake the scan loop on file-system events; restarts when the watched folders change."""
        import watchfiles

        while not self._stop.is_set():
            paths = [p for p in self._watch_paths if os.path.isdir(p)]
            self._watch_restart.clear()
            if not paths:
                await self._wait_any([self._watch_restart, self._stop], self.poll)
                continue
            stop = asyncio.Event()

            async def relay(stop=stop):
                await self._wait_any([self._watch_restart, self._stop], None)
                stop.set()

            relay_task = asyncio.create_task(relay())
            try:
                async for _changes in watchfiles.awatch(*paths, stop_event=stop, recursive=False,
                                                        debounce=200, step=50, rust_timeout=1000):
                    self._wake.set()
            except Exception as exc:  # inotify limits, vanished folder...: polling still works
                log.info("file-system events unavailable (%s); polling every %.1f s", exc, self.poll)
                await self._wait_any([self._watch_restart, self._stop], self.poll)
            finally:
                relay_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await relay_task

    @staticmethod
    async def _wait_any(events: list[asyncio.Event], timeout: float | None) -> None:
        tasks = [asyncio.create_task(e.wait()) for e in events]
        try:
            await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()

    async def run(self) -> None:
        """Scan until :meth:`stop`; each pass is followed by a wait for an event or a time-out."""
        watcher = asyncio.create_task(self._watch_loop()) if self.use_events else None
        try:
            while not self._stop.is_set():
                self._wake.clear()
                try:
                    await self.scan_once()
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("scan failed; trying again in %.1f s", self.poll)
                await self._wait_any([self._wake, self._stop], self.next_timeout())
        finally:
            if watcher is not None:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await watcher

    def stop(self) -> None:
        self._stop.set()
