"""Benchmark of the simulator (``gppy simulate``): one raw frame of each kind, and a whole night.

    .venv/bin/python -m bench.bench_sim [--size 1536x1024 | --full] [--repeat 3] [--workers 2]
                                        [--filters m425 m550 m650 r i] [--targets 2] [--references]
                                        [--no-night] [--json result.json]

1. Frames: a 100 s science frame (stars, transients off, one satellite trail), a bias, a 300 s
   dark and a twilight flat, each made and written exactly as a night does it (raw FITS, truth
   JSON, mask, star table), ``--repeat`` times; the science frame also without the writing.
2. Night: ``gppy simulate OUT --size WxH --targets 2 --filters <5 filters> --no-extras
   --no-references --workers N --quiet`` in a child process: 2 x 5 x 3 = 30 science frames plus
   7 bias, 10 dark and 25 flat frames, with the truth of everything. Wall time, CPU seconds
   (the CLI and its worker processes), peak memory of the process tree, and the 1-minute load
   average around it. Reference images are left out by default (``--references`` adds them):
   at full size each PS1-like reference is ~0.45 Gpx (1.8 GB) and there is one per target and
   filter.

The harness calls ``run_sim(size, repeat, workdir, opts)`` (the shape of ``bench.stages``
results); it is not registered in ``bench/run.py`` (see the module ``bench.stages``:
``STAGES["sim"] = bench.bench_sim.run_sim`` and ``"sim"`` in ``bench.run.ORDER`` would do it).

Measured on this machine (2 cores shared with other work, 2026-11-25, commit 8e4266c), full
size 9576 x 6388:

* the night, ``python -m bench.bench_sim --full --no-frames --workers 2`` (``FULL_NIGHT``):
  30 science + 42 calibration frames (7 bias, 10 dark, 25 flat), 10.9 GB written,
  **202 s wall** (188.7 CPU s in the CLI and its 2 workers) at a 1-minute load of 1.6-4.5;
  an earlier run at load 4.4-9.5: 273 s wall, 194.6 CPU s. Peak memory of the process tree
  ~9 GB summed over processes (the detector images are shared by fork, so counted 3 times).
* one frame made and written (``--full --repeat 2 --no-night``, load 2.6-2.8), median wall / CPU:
  science 3.85 / 2.85 s (66405 stars; 3.37 / 2.49 s without the writing), bias 1.50 / 1.03 s,
  300 s dark 4.89 / 4.61 s (exact Poisson draws at 3 e-), flat 1.55 / 1.37 s; detector + one flat
  once per night 3.6 s.
* before this work (commit 52d5191, same machine, CPU s per frame without writing): science
  7.0-7.5, flat 3.5, bias 1.4, 300 s dark 4.1, detector 4.3; the CLI wrote frames in 1 process
  by default.
* a full-size reference (not in the night above): a blurry PS1-like one (23783 x 18018 px,
  0.43 Gpx, 1.7 GB) 24.7 CPU s / 31.5 s wall and 1.9 GB peak RSS; a 7DT one (10246 x 6835)
  4-6 CPU s. The default ``gppy simulate --full`` night (2 targets x 3 filters) adds 6 + 3 of
  them (~10 GB), made by the same worker pool as the frames.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FULL = (9576, 6388)
NIGHT_FILTERS = ["m425", "m550", "m650", "r", "i"]
TARGET_S = 300.0                 # "a few minutes" for a full-size night of 30 frames on 2 cores

# the full-size night as measured with this script (copied by hand from its --json output)
FULL_NIGHT: dict = {
    "command": "gppy simulate OUT --size 9576x6388 --targets 2 --filters m425 m550 m650 r i --no-extras "
               "--seed 11 --workers 2 --quiet --no-references",
    "frames": {"bias": 7, "dark": 10, "flat": 25, "science": 30}, "bytes_written_gb": 10.88,
    "wall_s": 202.0, "cpu_s": 188.7, "load1_start": 1.63, "load1_min": 1.63, "load1_max": 4.54,
    "cores_usable": 2, "measured_at": "2026-11-25 17:03 UTC", "commit": "8e4266c",
    "earlier_run": {"wall_s": 273.2, "cpu_s": 194.6, "load1_min": 4.37, "load1_max": 9.48},
}


def _children_cpu_s() -> float:
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return c.ru_utime + c.ru_stime


class _LoadSampler:
    """1-minute load average every ``interval_s`` while inside (min, max)."""

    def __init__(self, interval_s: float = 5.0):
        self.interval_s = interval_s
        self.values: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.is_set():
            self.values.append(os.getloadavg()[0])
            self._stop.wait(self.interval_s)

    def __enter__(self) -> _LoadSampler:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.values.append(os.getloadavg()[0])


# ------------------------------------------------------------------------------------ frames

def _frame_context(size: tuple[int, int], workdir: Path, filt: str = "r", seed: int = 0) -> dict:
    """Set up ``gppy.sim.night``'s job context for one target observed in ``filt`` (with
    calibration frames), writing under ``workdir``; returns the frame indices by kind."""
    from gppy.sim import instrument as ins
    from gppy.sim import night as sn
    from gppy.sim.catalog import make_starfield
    from gppy.sim.detector import Physics, make_detector
    from gppy.sim.optics import distortion_coefficients
    from gppy.sim.plan import make_plan

    nx, ny = size
    ph = Physics()
    plan = make_plan("7DT01", "2025-01-15", 1, [filt], sn._rng(seed, 1), calib=True, extras=False)
    t0 = time.perf_counter()
    det = make_detector((ny, nx), seed=1, physics=ph)
    det.flat(filt)
    det.fixed_mask()
    t_det = time.perf_counter() - t0
    tg = plan.targets[0]
    s = ins.PIXEL_SCALE / 3600.0
    fld = make_starfield(tg.ra, tg.dec, 0.5 * nx * s * 1.25 + 0.05, 0.5 * ny * s * 1.25 + 0.05, 55000.0,
                         sn._rng(seed, 4, 0), id_base=4_000_000_000_000_000)
    pv1, pv2 = distortion_coefficients((nx, ny), 1.0, 0.15, sn._rng(seed, 3))
    vc = sn._visit_conditions(plan, seed, ph, 4.0, 1.5, (nx, ny))
    truths = {sp.index: sn._frame_truth(sp, plan, vc[sp.visit], seed, ph, (nx, ny), pv1, pv2)
              for sp in plan.science()}
    sci = plan.science()[0].index
    night_dir = workdir / "obsdata"
    truth_dir = workdir / "truth"
    (truth_dir / "frames").mkdir(parents=True, exist_ok=True)
    night_dir.mkdir(parents=True, exist_ok=True)
    sn._JOB = {"plan": plan, "truths": truths, "fields": [fld], "det": det, "tr_list": [],
               "trail_frames": {sci}, "seed": seed, "physics": ph, "cr_rate": 0.15, "unit": "7DT01",
               "night_dir": night_dir, "truth_dir": truth_dir, "say": lambda _m: None}

    def first(kind: str, exptime: float | None = None) -> int:
        return next(f.index for f in plan.frames if f.kind == kind and (exptime is None or f.exptime == exptime))

    return {"science": sci, "bias": first("bias"), "dark 300 s": first("dark", 300.0), "flat": first("flat"),
            "detector_s": t_det, "n_stars_field": len(fld)}


def measure_frames(size: tuple[int, int], repeat: int, workdir: Path) -> dict:
    """Time one frame of each kind as a night makes and writes it."""
    from bench.measure import Series, timed
    from gppy.sim import night as sn

    ctx = _frame_context(size, workdir)
    series = {k: Series(f"{k} frame: generate + write raw FITS and truth", "ours")
              for k in ("science", "bias", "dark 300 s", "flat")}
    gen = Series("science frame: generate only (stars, trail, cosmic rays, read-out, masks)", "ours")
    c = sn._JOB
    spec = c["plan"].frames[ctx["science"]]
    n_stars = None
    for _ in range(max(1, repeat)):
        run, out = timed(lambda: sn._science_frame(spec, c["truths"][spec.index], c["fields"][0], c["det"], [],
                                                   True, c["seed"], c["physics"], c["cr_rate"], "7DT01"))
        gen.add(run)
        n_stars = out[1]["n_stars_in_frame"]
        del out
        for kind, s in series.items():
            run, _ = timed(lambda kind=kind: sn._frame_job(ctx[kind]))
            s.add(run)
    sn._JOB = {}
    return {"series": [series["science"].summary(), gen.summary()] + [series[k].summary() for k in
                                                                      ("bias", "dark 300 s", "flat")],
            "info": {"detector + flat + fixed mask (once per night) s": round(ctx["detector_s"], 2),
                     "stars in the science frame": n_stars, "stars in the target's field": ctx["n_stars_field"]}}


# ------------------------------------------------------------------------------------- night

def measure_night(size: tuple[int, int], out: Path, workers: int, targets: int = 2,
                  filters: list[str] | None = None, references: bool = False, seed: int = 11) -> dict:
    """Run ``gppy simulate`` for a night in a child process; wall and CPU time, load, peak memory."""
    from bench.measure import PeakMemory

    filters = filters or NIGHT_FILTERS
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "gppy.cli", "simulate", str(out), "--size", f"{size[0]}x{size[1]}",
           "--targets", str(targets), "--filters", *filters, "--no-extras", "--seed", str(seed),
           "--workers", str(workers), "--quiet"]
    if not references:
        cmd.append("--no-references")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    load0 = os.getloadavg()
    cpu0 = _children_cpu_s()
    with _LoadSampler() as load, PeakMemory(interval_s=0.25) as mem:
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
    cpu = _children_cpu_s() - cpu0
    if proc.returncode != 0:
        raise RuntimeError(f"gppy simulate failed ({proc.returncode}): {proc.stderr[-2000:]}")
    night = json.loads((out / "truth" / "night.json").read_text())
    kinds: dict[str, int] = {}
    for f in night["frames"]:
        kinds[f["kind"]] = kinds.get(f["kind"], 0) + 1
    raw_dir = Path(night["night_dir"])
    raws = list(raw_dir.glob("*.fits"))
    total_bytes = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return {"command": " ".join(["gppy", *cmd[3:]]), "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
            "frames": kinds, "raw_files": len(raws), "science_frames": kinds.get("science", 0),
            "size": list(size), "workers": workers, "references": references,
            "load1_start": round(load0[0], 2), "load1_min": round(min(load.values), 2),
            "load1_max": round(max(load.values), 2), "load1_end": round(load.values[-1], 2),
            "peak_tree_mb": round(mem.tree_mb, 0), "bytes_written_gb": round(total_bytes / 1e9, 2),
            "cores": os.cpu_count(), "cores_usable": len(os.sched_getaffinity(0)),
            "stdout_tail": proc.stdout.strip().splitlines()[-1:]}


# --------------------------------------------------------------------------------- harness

def run_sim(size, repeat, workdir: Path, opts: dict) -> dict:
    """Harness entry (``bench.stages`` result shape): frames of each kind, then a night of
    2 targets x 5 filters x 3 frames (+ calibration) through ``gppy simulate`` unless
    ``opts["sim_night"]`` is False."""
    from bench.stages import target

    size = tuple(int(v) for v in size)
    workdir = Path(workdir)
    full = size == FULL
    with tempfile.TemporaryDirectory(prefix="bench-sim-", dir=workdir if workdir.exists() else None) as tmp:
        frames = measure_frames(size, repeat, Path(tmp) / "frames")
        night = None
        if opts.get("sim_night", True):
            night = measure_night(size, Path(tmp) / "night", int(opts.get("workers") or 2),
                                  references=bool(opts.get("sim_references", False)))
    sci = frames["series"][0]
    targets = [target(f"one {size[0]}x{size[1]} science frame made and written (stars rendered vectorised)",
                      "a few s at full size", f"{sci['median_s']:.2f} s (CPU {sci['cpu_median_s']:.2f} s)", None)]
    notes = ["frames as gppy.sim.night writes them: raw uint16 FITS, truth JSON, RICE mask, star CSV"]
    if night:
        n = night["science_frames"]
        targets.append(target(f"a night of {n} science + {sum(night['frames'].values()) - n} calibration frames "
                              f"through `gppy simulate` ({night['workers']} workers)",
                              f"a few minutes on 2 cores (< {TARGET_S:.0f} s)",
                              f"{night['wall_s']:.0f} s wall, {night['cpu_s']:.0f} CPU s, load "
                              f"{night['load1_min']:.1f}-{night['load1_max']:.1f}",
                              night["wall_s"] < TARGET_S if full else None))
        notes.append(f"night: {night['command']}")
    return {"series": frames["series"], "steps": {}, "targets": targets, "ratios": {},
            "info": {**frames["info"], "night": night}, "notes": notes}


def _size(text: str) -> tuple[int, int]:
    if text.lower() == "full":
        return FULL
    w, h = text.lower().split("x")
    return int(w), int(h)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1536x1024", help="WxH or full (9576x6388)")
    ap.add_argument("--full", action="store_true", help="full-size frames (9576x6388)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--targets", type=int, default=2)
    ap.add_argument("--filters", nargs="+", default=NIGHT_FILTERS)
    ap.add_argument("--references", action="store_true", help="the night also writes reference images")
    ap.add_argument("--no-night", action="store_true", help="only the single frames")
    ap.add_argument("--no-frames", action="store_true", help="only the night")
    ap.add_argument("--workdir", default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--json", help="write the result here")
    a = ap.parse_args(argv)
    size = FULL if a.full else _size(a.size)
    result: dict = {"size": list(size), "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    with tempfile.TemporaryDirectory(prefix="bench-sim-", dir=a.workdir) as tmp:
        if not a.no_frames:
            fr = measure_frames(size, a.repeat, Path(tmp) / "frames")
            result["frames"] = fr
            print(f"frames {size[0]}x{size[1]} ({fr['info']['stars in the science frame']} stars in the science "
                  f"frame; detector + flat once: {fr['info']['detector + flat + fixed mask (once per night) s']} s):")
            for s in fr["series"]:
                print(f"  {s['name']:75s} median {s['median_s']:6.2f} s  CPU {s['cpu_median_s']:6.2f} s  "
                      f"load {s['load_min']:.1f}-{s['load_max']:.1f}")
        if not a.no_night:
            nt = measure_night(size, Path(tmp) / "night", a.workers, a.targets, a.filters, a.references)
            result["night"] = nt
            print(f"night: {nt['command']}")
            print(f"  {nt['frames']} -> {nt['raw_files']} raw files, {nt['bytes_written_gb']} GB written")
            print(f"  wall {nt['wall_s']} s, CPU {nt['cpu_s']} s (CLI + workers), peak memory of the tree "
                  f"{nt['peak_tree_mb']:.0f} MB, 1-min load {nt['load1_start']} at start, "
                  f"{nt['load1_min']}-{nt['load1_max']} during; {nt['cores_usable']} usable cores")
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
