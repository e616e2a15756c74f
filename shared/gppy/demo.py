"""``gppy demo``: simulate a small night, run it through the local stack, report on it.

The report lists the products written, per-stage times, and how the results compare with
the simulator's truth (astrometric residuals, zero-point error, transients recovered). Stages
that are not installed are named as missing; nothing is faked for them.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

from rich.console import Console
from rich.table import Table

from gppy import naming
from gppy.config import load_settings
from gppy.local import LocalStack, free_port
from gppy.messages import NightReady
from gppy.progress import follow_night

PRODUCT_KINDS = [
    ("calibrated singles", "calib_*.fits", lambda p: ".com." not in p.name and ".weight" not in p.name
     and ".mask" not in p.name and "/transient/" not in str(p)),
    ("stacks", "*.com.fits", lambda p: True),
    ("weight maps", "*.weight.fits", lambda p: True),
    ("masks", "*.mask.fits", lambda p: "/transient/" not in str(p)),
    ("photometry catalogues", "*.phot.cat", lambda p: ".subt." not in p.name),
    ("difference images", "*.subt.fits", lambda p: True),
    ("transient catalogues", "*.subt.transient.cat", lambda p: True),
    ("candidate cutouts (PNG)", "*.png", lambda p: "png_image" in str(p)),
    ("header snapshots", "*.head", lambda p: True),
]


def inventory(processed: Path) -> Counter:
    counts: Counter = Counter()
    for label, pattern, keep in PRODUCT_KINDS:
        counts[label] = sum(1 for p in processed.rglob(pattern) if keep(p))
    return counts


def run_demo(outdir: Path, seed: int = 1, timeout: float = 1800.0, keep_running: bool = False) -> int:
    console = Console()
    outdir = outdir.resolve()
    try:
        from gppy.sim import simulate
    except ImportError:
        console.print("[red]the simulator (gppy.sim) is not installed: nothing to demonstrate[/red]")
        return 1
    t0 = time.time()
    config = outdir / "path.json"
    if not config.exists():
        console.print(f"simulating a small 7DT night into {outdir} ...")
        from gppy.sim.cli import default_workers

        config = Path(simulate(outdir, seed=seed, workers=default_workers()))
    console.print(f"simulated in {time.time() - t0:.1f} s; config {config}")
    settings = load_settings(config=str(config))
    paths = settings.paths()
    nights = sorted(p for p in paths.path_obsdata.glob("*/*_gain2750") if p.is_dir())
    if not nights:
        console.print("[red]no night folder in the simulated data[/red]")
        return 1
    night_dir = nights[-1]
    unit = night_dir.parent.name
    stack = LocalStack(config=config, nats_port=free_port(), log_dir=outdir / "logs")
    missing = stack.start()
    if missing:
        console.print(f"[yellow]stages not yet built, not run: {', '.join(missing)}[/yellow]")
    try:
        stack.wait_healthy()
        settings = load_settings(config=str(config), nats_url=stack.nats_url)
        event = NightReady(night_id=naming.night_id(unit, night_dir), unit=unit, night_dir=str(night_dir))
        console.print(f"processing {event.night_id} (logs in {outdir / 'logs'}) ...")
        t1 = time.time()
        prog = asyncio.run(follow_night(settings, event.night_id, publish=event, timeout=timeout))
        wall = time.time() - t1
    finally:
        if not keep_running:
            stack.stop()
    report(console, paths, prog, wall, missing, outdir)
    return 0 if prog.status == "done" and not missing else 1


def report(console: Console, paths, prog, wall: float, missing: list[str], outdir: Path) -> None:
    console.rule("gppy demo report")
    console.print(f"night {prog.night_id}: {prog.status or 'not finished (time-out)'} in {wall:.1f} s")
    if missing:
        console.print(f"[yellow]missing stages: {', '.join(missing)}; their products are absent[/yellow]")
    table = Table(title="products written")
    table.add_column("product")
    table.add_column("count", justify="right")
    for label, n in inventory(paths.path_processed).items():
        table.add_row(label, str(n))
    console.print(table)
    times = Table(title="per-stage activity (first to last event, s)")
    times.add_column("stage")
    times.add_column("done", justify="right")
    times.add_column("failed", justify="right")
    times.add_column("seconds", justify="right")
    secs = prog.stage_seconds()
    for stage in sorted(set(prog.done) | set(prog.failed)):
        times.add_row(stage, str(prog.done.get(stage, 0)), str(prog.failed.get(stage, 0)),
                      f"{secs.get(stage, 0.0):.1f}")
    console.print(times)
    try:
        from gppy.truthcheck import compare_with_truth
    except ImportError:
        console.print("[yellow]no truth comparison available[/yellow]")
    else:
        for line in compare_with_truth(outdir, paths):
            console.print(line)
    for line in prog.failures[:20]:
        console.print(f"[red]failure[/red] {line}")
