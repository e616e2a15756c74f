"""Benchmark: stack three frames with the stack stage (SWarp + the stage's own work).

    .venv/bin/python bench/bench_stack.py --size 1536x1024            # small, quick check
    .venv/bin/python bench/bench_stack.py --size 9576x6388 --grid 10200x6800   # full size

Three synthetic calibrated singles (sky, stars, Poisson and read noise, cosmic rays and a bad
column masked, a TAN WCS with small offsets and rotations, ZP_AUTO) are written to a temporary
folder (or ``--workdir``), then stacked onto the grid with :func:`gppy_stack.coadd.make_stack`.
Reported: wall time of the whole stack, of the SWarp run inside it, and of the stage's own
work (input checks, mask projection, header, writing three products), the peak memory of
this process and of SWarp, and the sizes of the products.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from conftest_stack import make_frames  # noqa: E402

import gppy_stack.coadd as coadd  # noqa: E402
from gppy_stack.grid import grid_header  # noqa: E402
from gppy_stack.swarp import SwarpOptions  # noqa: E402


def size(text: str) -> tuple[int, int]:
    w, h = text.lower().split("x")
    return int(w), int(h)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=size, default=(1536, 1024), help="frame size WxH (default 1536x1024)")
    p.add_argument("--grid", type=size, help="stack grid WxH (default: frame size x 1.07)")
    p.add_argument("--frames", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="SWarp NTHREADS (0: all cores)")
    p.add_argument("--workdir", help="folder for the frames and products (default: a temporary one)")
    p.add_argument("--keep", action="store_true", help="keep the files")
    args = p.parse_args(argv)
    nx, ny = args.size
    grid = args.grid or (int(round(nx * 1.07)), int(round(ny * 1.07)))
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-stack-"))
    try:
        t0 = time.perf_counter()
        truth = make_frames(work / "in", n=args.frames, shape=(ny, nx), nstars=max(50, nx * ny // 20000),
                            cosmics=max(10, nx * ny // 100000), seed=1)
        t_make = time.perf_counter() - t0
        timings = {}
        original = coadd.run_swarp

        def timed_swarp(*a, **k):
            t = time.perf_counter()
            try:
                return original(*a, **k)
            finally:
                timings["swarp_s"] = time.perf_counter() - t

        coadd.run_swarp = timed_swarp
        t1 = time.perf_counter()
        result = coadd.make_stack(truth.paths, work / "out" / "bench.com.fits", grid_header(150.0, 2.0, grid),
                                  settings_for_hash={"bench": 1}, workdir=work / "scratch",
                                  options=SwarpOptions(nthreads=args.threads))
        t_stack = time.perf_counter() - t1
        coadd.run_swarp = original
        report = {
            "frames": args.frames, "frame_size": f"{nx}x{ny}", "grid": f"{grid[0]}x{grid[1]}",
            "make_frames_s": round(t_make, 2),
            "stack_total_s": round(t_stack, 2),
            "swarp_s": round(timings.get("swarp_s", float("nan")), 2),
            "stage_own_s": round(t_stack - timings.get("swarp_s", 0.0), 2),
            "peak_rss_python_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "peak_rss_swarp_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
            "products_mb": round(sum(q.stat().st_size for q in (result.path, result.weight_path, result.mask_path))
                                 / 2**20, 1),
        }
        print(json.dumps(report, indent=1))
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
