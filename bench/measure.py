"""Timing and memory helpers of the benchmark harness (``python -m bench.run``).

* :class:`PeakMemory` resets the kernel's high-water mark of this process (``/proc/self/clear_refs``
  ``5``, Linux >= 4.0), so ``VmHWM`` afterwards is the exact peak RSS of the Python process during
  the measured call; a sampling thread (every 20 ms) adds the resident memory of every descendant
  process (Source Extractor, SCAMP, SWarp, worker pools) to get the peak of the whole process
  tree (sampled, so short spikes of children can be missed).
* :func:`timed` runs a callable once under :class:`PeakMemory` and returns a :class:`Run`
  (wall seconds, peaks, 1-minute load average before and after).
* :class:`Series` holds the runs of one measurement and gives the median, min and max.
"""

from __future__ import annotations

import os
import resource
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path


def _status_kb(pid: int | str, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (from ``/proc/<pid>/task/*/children``)."""
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for t in tasks:
            try:
                with open(f"/proc/{p}/task/{t}/children") as fh:
                    kids = [int(k) for k in fh.read().split()]
            except (OSError, ValueError):
                continue
            out.extend(kids)
            todo.extend(kids)
    return out


def reset_hwm() -> bool:
    """Reset this process's peak-RSS counter; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Context manager: peak RSS (MB) of this process and of its process tree while inside."""

    def __init__(self, interval_s: float = 0.02):
        self.interval_s = interval_s
        self.self_mb = 0.0
        self.tree_mb = 0.0
        self.children_mb = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._exact = False

    def _sample(self) -> None:
        me = os.getpid()
        while not self._stop.is_set():
            kids = sum(_status_kb(k, "VmRSS") for k in _children(me))
            own = _status_kb(me, "VmRSS")
            self.children_mb = max(self.children_mb, kids / 1024)
            self.tree_mb = max(self.tree_mb, (own + kids) / 1024)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakMemory:
        self._exact = reset_hwm()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        hwm = _status_kb(os.getpid(), "VmHWM") / 1024
        self.self_mb = hwm if self._exact else max(hwm, self.tree_mb - self.children_mb)
        self.tree_mb = max(self.tree_mb, self.self_mb)


def load1() -> float:
    """1-minute load average."""
    return os.getloadavg()[0]


@dataclass
class Run:
    seconds: float
    peak_self_mb: float
    peak_tree_mb: float
    load_before: float
    load_after: float
    cpu_s: float = float("nan")
    extra: dict = field(default_factory=dict)


def cpu_seconds() -> float:
    """User + system CPU seconds of this process (all threads) and of its waited-for children."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def timed(fn: Callable[[], object]) -> tuple[Run, object]:
    """Run ``fn()`` once; wall time, CPU time (this process and the children it waited for),
    peak memory and load average around it. On a shared machine the CPU time is the steadier
    figure: other processes stretch the wall time, not the work done."""
    lb = load1()
    with PeakMemory() as pm:
        c0 = cpu_seconds()
        t0 = time.perf_counter()
        value = fn()
        dt = time.perf_counter() - t0
        cpu = cpu_seconds() - c0
    return Run(dt, round(pm.self_mb, 1), round(pm.tree_mb, 1), round(lb, 2), round(load1(), 2), round(cpu, 3)), value


@dataclass
class Series:
    """Repeated runs of one measurement (``kind`` is ``ours``, ``peer`` or ``info``)."""

    name: str
    kind: str = "ours"
    runs: list[Run] = field(default_factory=list)
    note: str = ""

    def add(self, run: Run) -> None:
        self.runs.append(run)

    def summary(self) -> dict:
        t = [r.seconds for r in self.runs]
        cpu = [r.cpu_s for r in self.runs if r.cpu_s == r.cpu_s]
        loads = [r.load_before for r in self.runs] + [r.load_after for r in self.runs]
        return {
            "name": self.name, "kind": self.kind, "n": len(t), "note": self.note,
            "median_s": statistics.median(t) if t else None,
            "min_s": min(t) if t else None, "max_s": max(t) if t else None,
            "times_s": [round(x, 3) for x in t],
            "cpu_median_s": statistics.median(cpu) if cpu else None,
            "peak_self_mb": max((r.peak_self_mb for r in self.runs), default=None),
            "peak_tree_mb": max((r.peak_tree_mb for r in self.runs), default=None),
            "load_min": min(loads) if loads else None, "load_max": max(loads) if loads else None,
            "runs": [asdict(r) for r in self.runs],
        }


def median_steps(step_dicts: list[dict[str, float]]) -> dict[str, float]:
    """Median of each key over several step-timing dictionaries (missing keys ignored)."""
    keys: list[str] = []
    for d in step_dicts:
        keys += [k for k in d if k not in keys]
    return {k: round(statistics.median([d[k] for d in step_dicts if k in d]), 3) for k in keys}


def dir_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()) / 2**20
