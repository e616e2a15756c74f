"""Latency of the watcher's dashboard/API reads with a large ledger (no NATS needed).

A ledger of N finished nights (each with a summary JSON and a report on disk) plus a few
nights being processed (with live progress of F frames each) is served by the real API
router; the script times ``GET /overview`` (what every open dashboard polls every 2 s),
``GET /nights`` and ``GET /nights/{id}`` of an active night.

    .venv/bin/python -m bench.bench_ops --nights 2000 --frames 300
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from gppy.config import Settings
from gppy_watcher.ledger import NightRecord
from gppy_watcher.progress import NightProgress
from gppy_watcher.service import WatcherService


class FakeLedger:
    """The ledger's read side, in memory (the API reads only this)."""

    def __init__(self):
        self._cache: dict[str, tuple[NightRecord, int]] = {}
        self.progress: dict[str, dict] = {}

    def cached(self, nid):
        hit = self._cache.get(nid)
        return hit[0].model_copy(deep=True) if hit else None

    def records(self):
        return [r.model_copy(deep=True) for r, _ in self._cache.values()]

    async def load_progress(self, nid):
        return self.progress.get(nid)


def build(root: Path, nights: int, active: int, frames: int) -> WatcherService:
    (root / "f").mkdir(parents=True)
    cfg = root / "path.json"
    cfg.write_text(json.dumps({"path_base": str(root / "f")}))
    svc = WatcherService(Settings(config=cfg))
    ledger = FakeLedger()
    processed = Path(svc.paths.path_processed)
    (processed / "nights").mkdir(parents=True)
    now = time.time()
    for i in range(nights):
        nid = f"7DT{i % 20 + 1:02d}_2024-{i // 600 + 1:02d}-{i % 28 + 1:02d}_gain2750_{i}"
        summ = processed / "nights" / f"{nid}.json"
        summ.write_text(json.dumps({"night_id": nid, "failures": [{"stage": "astrometry", "reason": "SCAMP: few stars",
                                                                   "count": 2, "items": ["/x/a.fits"]}]}))
        summ.with_suffix(".html").write_text("<html></html>")
        rec = NightRecord(night_id=nid, unit=nid[:5], night_dir=f"/obs/{nid}", state="done", run=1, attempt=1,
                          run_attempts=1, queued_at=now - 3600 - i, finished_at=now - i, summary_path=str(summ),
                          progress={"plan": {"frames": 300, "visits": 30}, "calib": {"done": 300, "failed": 0}},
                          history=[{"attempt": 1, "outcome": "done", "reason": "-", "at": now - i}])
        ledger._cache[nid] = (rec, 1)
    for j in range(active):
        nid = f"7DT{j + 1:02d}_2025-01-02_gain2750"
        rec = NightRecord(night_id=nid, unit=nid[:5], night_dir=f"/obs/{nid}", state="processing", run=1,
                          attempt=1, run_attempts=1, queued_at=now - 600, started_at=now - 590)
        prog = NightProgress(nid, rec.night_dir)
        prog.planned = True
        for k in range(frames):
            prog._add_frame(f"/p/T{k // 10:05d}/{nid[:5]}/m425/calib_{k}.fits", f"/obs/raw_{k}.fits",
                            f"T{k // 10:05d}", "m425", f"v{k // 10}")
            prog.frames[f"/p/T{k // 10:05d}/{nid[:5]}/m425/calib_{k}.fits"].update(cal=True, sol=True,
                                                                                    phot=k % 3 == 0)
        rec.progress = prog.counts()
        ledger._cache[nid] = (rec, 1)
        svc._progress[nid] = prog
    svc.ledger = ledger
    return svc


async def timed(client: httpx.AsyncClient, url: str, n: int) -> tuple[float, float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        r = await client.get(url)
        r.raise_for_status()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3, max(times) * 1e3


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nights", type=int, default=2000)
    ap.add_argument("--active", type=int, default=3)
    ap.add_argument("--frames", type=int, default=300)
    ap.add_argument("--repeat", type=int, default=10)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        svc = build(Path(tmp), args.nights, args.active, args.frames)
        transport = httpx.ASGITransport(app=svc.app())
        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
            active = next(r.night_id for r, _ in svc.ledger._cache.values() if r.state == "processing")
            print(f"{args.nights} finished nights, {args.active} active with {args.frames} frames each")
            for url in ("/overview?candidates=0", "/nights", f"/nights/{active}", "/failures"):
                med, worst = await timed(client, url, args.repeat)
                print(f"  GET {url:32s} median {med:8.1f} ms   max {worst:8.1f} ms")


if __name__ == "__main__":
    asyncio.run(main())
