"""Benchmark of the phot stage: one frame (per-step times) and a night's frames in parallel.

    .venv/bin/python bench/bench_phot.py --size 2048x1536 --frames 6 --workers 2
    .venv/bin/python bench/bench_phot.py --full --frames 8 --workers 2     # 9576 x 6388 (not in CI)

Frames are synthetic (gppy_phot.synthetic: Moffat stars at 55000 per square degree down to
mag 21.5, as gppy.sim's default density, sky and noise at EGAIN 0.256, a Gaia-XP-like
catalogue) and are written as the astrometry stage leaves them (image, weight, mask). Timed:

1. one frame through ``photometry_products`` (what the service does per frame.solved: read,
   Source Extractor pre-run and main run, match, zero points, catalogue, PNG, region file,
   header rewrite), with the time of each step; repeated ``--repeat`` times, median reported;
2. ``--frames`` frames one after another in one process (v1 ran photometry serially), then the
   same frames with ``--workers`` processes; throughput in frames per minute.
Results are printed as a Markdown table (and written to ``--json`` if given). ``total_cpu`` is
the CPU time of the process and its Source Extractor children: on a shared, loaded machine it
is the figure to trust, wall times grow with the load (the load average is printed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from astropy.io import fits

from gppy.naming import calib_name
from gppy_phot import synthetic as syn
from gppy_phot.photometry import PhotParams
from gppy_phot.service import photometry_products

UNIT, OBJ, FILT = "7DT01", "T00001", "m650"
DENSITY = 55000.0  # stars per square degree (gppy.sim default)


def make_frames(root: Path, nx: int, ny: int, nframes: int, seed: int = 1) -> list[tuple[Path, Path, Path]]:
    """Write ``nframes`` noise realisations of one synthetic field; returns (image, weight, mask)."""
    area = nx * ny * (syn.PIXSCALE / 3600.0) ** 2
    nstars = int(DENSITY * area)
    fld = syn.make_field(nx, ny, nstars=nstars, seed=seed, fwhm_arcsec=2.3, beta=3.2, sky=130.0, zp=26.7,
                         mag_range=(11.0, 21.5))
    model = fld.sky + syn.render_sources(fld.shape, fld.x, fld.y, fld.flux, fld.fwhm_px, fld.beta, oversample=1)
    base = root / "processed" / OBJ / UNIT / FILT
    base.mkdir(parents=True, exist_ok=True)
    refcat = root / "ref_cat"
    refcat.mkdir(parents=True, exist_ok=True)
    syn.reference_table(fld).write(refcat / f"gaiaxp_dr3_synphot_{OBJ}.csv", format="ascii.csv", overwrite=True)
    out = []
    rng = np.random.default_rng(seed)
    for i in range(nframes):
        date = f"2024-04-23T03:{10 + i // 60:02d}:{i % 60:02d}"
        name = calib_name(UNIT, OBJ, date, FILT, 100.0)
        img = syn.add_noise(model, fld.gain, fld.rdnoise, rng)
        h = syn.frame_header(fld, date_obs=date, exptime=100.0, obj=OBJ)
        p = base / name
        fits.writeto(p, img, h, overwrite=True)
        w = p.with_name(name[:-5] + ".weight.fits")
        m = p.with_name(name[:-5] + ".mask.fits")
        fits.writeto(w, syn.weight_map(fld), overwrite=True)
        fits.writeto(m, np.zeros(fld.shape, np.uint16), overwrite=True)
        out.append((p, w, m))
    return out


def phot_one(args: tuple) -> dict:
    import resource

    p, w, m, root = args
    timings: dict[str, float] = {}

    def cpu() -> float:
        a = resource.getrusage(resource.RUSAGE_SELF)
        b = resource.getrusage(resource.RUSAGE_CHILDREN)
        return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime

    c0 = cpu()
    t0 = time.perf_counter()
    figures = photometry_products(Path(p), Path(w), Path(m), OBJ, FILT, UNIT, Path(root) / "processed",
                                  Path(root) / "ref_cat", Path(root) / "scratch", PhotParams(), timings=timings)
    timings["total"] = time.perf_counter() - t0
    timings["total_cpu"] = cpu() - c0
    return {"timings": timings, "zp": figures["zp"], "seeing": figures["seeing"], "depth": figures["depth"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="phot stage benchmark")
    ap.add_argument("--size", default="2048x1536", help="WxH of the frames (default 2048x1536)")
    ap.add_argument("--full", action="store_true", help="9576 x 6388 frames")
    ap.add_argument("--frames", type=int, default=6, help="frames of the 'night' (default 6)")
    ap.add_argument("--workers", type=int, default=2, help="parallel processes (default 2)")
    ap.add_argument("--repeat", type=int, default=3, help="repeats of the one-frame timing")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--keep", help="keep the data in this folder")
    args = ap.parse_args(argv)
    nx, ny = (9576, 6388) if args.full else tuple(int(v) for v in args.size.lower().split("x"))
    tmp = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_phot_"))
    t0 = time.perf_counter()
    frames = make_frames(tmp, nx, ny, max(args.frames, 1))
    t_gen = time.perf_counter() - t0

    singles = [phot_one((*frames[0], tmp)) for _ in range(max(1, args.repeat))]
    steps = sorted(singles[0]["timings"])
    med = {k: statistics.median(s["timings"].get(k, 0.0) for s in singles) for k in steps}

    t0 = time.perf_counter()
    for f in frames:
        phot_one((*f, tmp))
    t_serial = time.perf_counter() - t0
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        list(pool.map(phot_one, [(*f, tmp) for f in frames]))
    t_par = time.perf_counter() - t0

    res = {"machine": f"{platform.machine()} {os.cpu_count()} cpu, Python {sys.version.split()[0]}",
           "size": [nx, ny], "frames": len(frames), "workers": args.workers, "generate_s": round(t_gen, 2),
           "one_frame_median_s": {k: round(v, 3) for k, v in med.items()},
           "serial_s": round(t_serial, 2), "parallel_s": round(t_par, 2),
           "serial_frames_per_min": round(60 * len(frames) / t_serial, 2),
           "parallel_frames_per_min": round(60 * len(frames) / t_par, 2),
           "zp": round(singles[0]["zp"], 4), "seeing": round(singles[0]["seeing"], 3),
           "depth_ul5_1": singles[0]["depth"]}
    res["load_average"] = [round(v, 2) for v in os.getloadavg()]
    print(f"## phot benchmark ({nx}x{ny}, {res['machine']}, load average {res['load_average']})\n")
    print("| step | median s |\n|---|---|")
    for k, v in res["one_frame_median_s"].items():
        print(f"| {k} | {v:.3f} |")
    print(f"\n{len(frames)} frames: serial {t_serial:.1f} s ({res['serial_frames_per_min']} frames/min), "
          f"{args.workers} workers {t_par:.1f} s ({res['parallel_frames_per_min']} frames/min)")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
