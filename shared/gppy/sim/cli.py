"""``gppy simulate``: the command-line front of :func:`gppy.sim.simulate`."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"size must be WxH (e.g. 1536x1024), not {text!r}") from exc
    if w < 64 or h < 64:
        raise argparse.ArgumentTypeError("size must be at least 64x64")
    return w, h


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``simulate`` subcommand to ``subparsers`` (``func`` takes the namespace)."""
    p = subparsers.add_parser("simulate", help="simulate a raw 7DT night with known truth",
                              description="Write a simulated raw night (obsdata/), reference data "
                                          "(factory/), its truth (truth/) and path.json under OUTDIR.")
    p.add_argument("outdir", help="output root")
    p.add_argument("--unit", default="7DT01", help="unit name (default 7DT01)")
    p.add_argument("--night", default="2025-01-15", help="local date of the night, YYYY-MM-DD")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--size", type=_size, default=(1536, 1024), help="frame size WxH (default 1536x1024)")
    g.add_argument("--full", action="store_true", help="real 9576x6388 frames")
    p.add_argument("--targets", type=int, default=2, help="number of targets (default 2)")
    p.add_argument("--filters", nargs="+", default=None, help="filters (default m425 m650 r)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--no-calib", action="store_true",
                   help="no bias/dark/flat frames; write an archive of earlier masters instead")
    p.add_argument("--no-transients", action="store_true", help="inject no transients")
    p.add_argument("--no-references", action="store_true", help="write no reference catalogue or images")
    p.add_argument("--no-extras", action="store_true",
                   help="only the 3 x 100 s visits (no 3 x 300 s visit of the first target, no 45 s frame of the "
                        "last): targets x filters x 3 science frames")
    p.add_argument("--archive-nights", nargs="*", default=None,
                   help="earlier nights (YYYY-MM-DD) whose masters go into the master archive")
    p.add_argument("--star-density", type=float, default=55000.0,
                   help="stars per square degree with 10 < G < 21.5 (default 55000)")
    p.add_argument("--workers", type=int, default=None,
                   help="processes writing frames in parallel (default: the usable cores, at most 8; the "
                        "output does not depend on it)")
    p.add_argument("--quiet", action="store_true", help="do not list the files written")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Run the simulation described by the parsed arguments; prints the path.json written."""
    from gppy.sim.night import simulate

    t0 = time.time()
    workers = args.workers if args.workers else default_workers()
    path = simulate(Path(args.outdir), unit=args.unit, night=args.night, size=args.size, full=args.full,
                    targets=args.targets, filters=args.filters, seed=args.seed, calib=not args.no_calib,
                    transients=not args.no_transients, references=not args.no_references,
                    archive_nights=args.archive_nights, star_density=args.star_density, workers=workers,
                    extras=not args.no_extras,
                    progress=None if args.quiet else print)
    print(f"simulated night written in {time.time() - t0:.1f} s; configuration: {path}")
    return 0


def default_workers() -> int:
    """Usable cores of this process (CPU affinity), at most 8."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return max(1, min(8, n))
