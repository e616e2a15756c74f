"""How fast the watcher follows a night: publish the events of a night of N frames (10 per visit)
with a real nats-server and time until its night.done (ledger writes, progress, header
snapshots with imhead of every product, summary).

    .venv/bin/python -m bench.watcher_events --frames 200
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from conftest_watcher import Publisher, SimNight, dones, running_watcher, wait_for  # noqa: E402

from gppy.config import Settings  # noqa: E402
from gppy.local import free_port, nats_server_binary, wait_for_port  # noqa: E402
from gppy.messages import NightReady  # noqa: E402


async def run(frames: int, per_visit: int, write: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "obsdata").mkdir()
        (root / "factory").mkdir()
        cfg = root / "path.json"
        cfg.write_text(json.dumps({"path_base": str(root / "factory")}))
        port = free_port()
        nats = subprocess.Popen([nats_server_binary(), "-js", "-a", "127.0.0.1", "-p", str(port), "-sd",
                                 str(root / "js")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for_port(port)
            s = Settings(config=cfg, nats_url=f"nats://127.0.0.1:{port}", log_json=False, units=["7DT09"])
            nd = root / "obsdata" / "7DT01" / "2025-02-01_gain2750"
            nd.mkdir(parents=True)
            ready = NightReady(night_id="7DT01_bench", unit="7DT01", night_dir=str(nd), attempt=1)
            visits = {f"V{v:03d}": list(range(v * per_visit, min(frames, (v + 1) * per_visit)))
                      for v in range(-(-frames // per_visit))}
            sim = SimNight.make(s, ready, visits)
            t0 = time.perf_counter()
            events = [sim.plan()]
            for f in sim.frames:
                events += [sim.calibrated(f, write=write), sim.solved(f), sim.phot(f.calib, "single")]
            for v in visits:
                events += [sim.stacked(v, write=write), sim.phot(sim.stack_path(v), "stack"),
                           sim.differenced(v, write=write), sim.phot(sim.diff_path(v), "difference")]
            t_make = time.perf_counter() - t0
            async with running_watcher(s) as svc, Publisher(s) as pub:
                t1 = time.perf_counter()
                await pub(ready, *events)
                t_pub = time.perf_counter() - t1
                done = await wait_for(lambda: dones(s, ready.night_id), 3600, "night.done", step=0.5)
                t_done = time.perf_counter() - t1
                summary = json.loads(Path(done[0].summary_path).read_text())
                del svc
        finally:
            nats.terminate()
            nats.wait()
    return {"frames": frames, "visits": len(visits), "events": len(events) + 1, "status": done[0].status,
            "headers": len(summary["products"]["headers"]), "make_products_s": round(t_make, 2),
            "publish_s": round(t_pub, 2), "until_night_done_s": round(t_done, 2),
            "ms_per_event": round(1000 * t_done / (len(events) + 1), 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--frames", type=int, default=200)
    ap.add_argument("--per-visit", type=int, default=10)
    ap.add_argument("--no-products", action="store_true", help="do not write product files (no imhead)")
    args = ap.parse_args()
    print(json.dumps(asyncio.run(run(args.frames, args.per_visit, not args.no_products))))


if __name__ == "__main__":
    main()
