"""Benchmark of the calibration stage (a script, not a test).

Measures, on synthetic 16-bit frames of the size given (``--size 9576x6388`` is a full 7DT
frame):

1. a master of N frames (default 9) with ``gppy_calib`` (read from FITS by row bands,
   sigma-clipped median, error image, written to FITS) and, side by side, with
   ``ccdproc.combine`` (sigma-clipped median, the same rule: 3 sigma about the mean with the
   standard deviation) on the same files; the two results are compared;
2. the reduction of one science frame including reading the raw file and writing the image,
   weight and mask, with the masters already loaded (steady state of a night) and from cold
   (masters read too), with cosmic rays and trails on or off; wall and CPU time (user +
   system, all threads) and the stage's own step timings (``NightCalibrator.last_steps``).

Usage::

    .venv/bin/python bench/bench_calib.py --size 1536x1024
    .venv/bin/python bench/bench_calib.py --size 9576x6388 --gpu auto --results bench/RESULTS.md
    .venv/bin/python bench/bench_calib.py --size 9576x6388 --reduce-only --workdir /tmp/bc --repeat 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from astropy.io import fits

GAIN = 0.256
RN_ADU = 3.0 / GAIN


def _write_raw(path: Path, data: np.ndarray, header: fits.Header) -> None:
    hdu = fits.PrimaryHDU(data.astype(np.uint16), header=header)     # BITPIX 16, BZERO 32768
    hdu.writeto(path, overwrite=True)


def _header(kind: str, exptime: float, minute: int, filt: str = "m425") -> fits.Header:
    h = fits.Header()
    h["IMAGETYP"] = {"bias": "Bias Frame", "dark": "Dark Frame", "flat": "Flat Field", "science": "Light Frame"}[kind]
    h["EXPTIME"] = exptime
    h["DATE-OBS"] = f"2025-01-15T21:{minute:02d}:00"
    h["FILTER"] = filt
    h["OBJECT"] = "T00001" if kind == "science" else kind.upper()
    h["EGAIN"] = GAIN
    h["GAIN"] = 2750
    return h


def make_data(work: Path, shape: tuple[int, int], n: int, seed: int = 1) -> dict:
    """Raw bias frames, masters (bias, 100 s dark, flat) and one science frame."""
    rng = np.random.default_rng(seed)
    ny, nx = shape
    raw = work / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    bias_level = (500.0 + rng.normal(0, 2.0, nx)).astype(np.float32)[None, :]
    biases = []
    for i in range(n):
        frame = np.rint(bias_level + rng.normal(0, RN_ADU, shape).astype(np.float32))
        p = raw / f"bias_{i:02d}.fits"
        _write_raw(p, frame, _header("bias", 0.0, i))
        biases.append(p)
    # masters (as the stage writes them: primary + ERR)
    from gppy_calib.rawio import write_master

    yy = (np.arange(ny, dtype=np.float32)[:, None] - ny / 2) / (ny / 2)
    xx = (np.arange(nx, dtype=np.float32)[None, :] - nx / 2) / (nx / 2)
    flat = (1.0 - 0.08 * (xx * xx + yy * yy) / 2).astype(np.float32)
    flat /= np.median(flat[::8, ::8])
    mroot = work / "mframe" / "7DT01"
    masters = {}
    for kind, data, err, name, extra in (
            ("bias", np.broadcast_to(bias_level, shape), np.full(shape, RN_ADU / 3, np.float32),
             "zero/20250115-zero.fits", {"NCOMBINE": n, "RDNADU": RN_ADU}),
            ("dark", np.full(shape, 0.01 * 100 / GAIN, np.float32), np.full(shape, RN_ADU / 3, np.float32),
             "dark/100-20250115-dark.fits", {"NCOMBINE": n, "EXPTIME": 100.0}),
            ("flat", flat, np.full(shape, 0.003, np.float32), "flat/20250115-nm425.fits", {"NCOMBINE": n})):
        h = fits.Header()
        for k, v in extra.items():
            h[k] = v
        masters[kind] = write_master(mroot / name, np.ascontiguousarray(data, dtype=np.float32), err, h)
    # science: sky + stars + cosmic rays + a trail, through the detector response
    sky = 1800.0
    signal = np.full(shape, sky, np.float32)
    nstars = int(ny * nx / 1500)
    sx, sy = rng.uniform(0, nx, nstars), rng.uniform(0, ny, nstars)
    flux = 10 ** rng.uniform(2.5, 5.5, nstars)
    ix, iy = np.clip(sx.astype(int), 4, nx - 5), np.clip(sy.astype(int), 4, ny - 5)
    s2 = (4.0 / 2.3548) ** 2                       # Gaussian stars of FWHM 4 px in 9x9 stamps
    for dy in range(-4, 5):
        for dx in range(-4, 5):
            w = np.exp(-((dx + ix - sx) ** 2 + (dy + iy - sy) ** 2) / (2 * s2)) / (2 * np.pi * s2)
            np.add.at(signal, (iy + dy, ix + dx), (flux * w).astype(np.float32))
    for r0 in range(0, ny, 512):                   # a satellite trail, Gaussian profile, FWHM 4 px
        yy = np.arange(r0, min(ny, r0 + 512), dtype=np.float32)[:, None]
        dist = (yy - (ny * 0.3 + 0.2 * np.arange(nx, dtype=np.float32)[None, :])) / np.hypot(1.0, 0.2)
        signal[r0:r0 + 512] += 300.0 * np.exp(-0.5 * (dist / 1.7) ** 2)
    e = rng.poisson(np.maximum(signal * flat * GAIN, 0)).astype(np.float32)
    ncr = int(0.15 * nx * ny / 1e6 * 100)
    e[rng.integers(0, ny, ncr), rng.integers(0, nx, ncr)] += rng.uniform(300, 6000, ncr).astype(np.float32)
    sci = np.clip(np.rint(e / GAIN + bias_level + 0.01 * 100 / GAIN + rng.normal(0, RN_ADU, shape)), 0, 65535)
    sci_path = raw / "science.fits"
    _write_raw(sci_path, sci, _header("science", 100.0, 40))
    return {"biases": biases, "masters": masters, "science": sci_path, "mframe": work / "mframe"}


def bench_master(data: dict, shape, xp_name: str) -> dict:
    from gppy.fitsio import read_header
    from gppy.tables import load_changehdr
    from gppy.xp import get_xp
    from gppy_calib.headers import describe
    from gppy_calib.masters import ClipRule, make_bias
    from gppy_calib.rawio import RawImage, write_master

    xp = get_xp(xp_name)
    rules = load_changehdr()
    out = Path(tempfile.mkdtemp(prefix="bench-master-"))
    t0 = time.perf_counter()
    infos = [describe(str(p), read_header(p), rules) for p in data["biases"]]
    sources = [RawImage(p, f.header) for p, f in zip(data["biases"], infos, strict=True)]
    m = make_bias(infos, sources, xp, ClipRule(3.0, 5, 512))
    write_master(out / "zero.fits", m.data, m.error, m.header)
    ours = time.perf_counter() - t0

    import ccdproc

    t0 = time.perf_counter()
    comb = ccdproc.combine([str(p) for p in data["biases"]], method="median", sigma_clip=True,
                           sigma_clip_low_thresh=3, sigma_clip_high_thresh=3,
                           sigma_clip_func=np.ma.mean, sigma_clip_dev_func=np.ma.std,
                           unit="adu", dtype=np.float32, mem_limit=16e9)
    fits.PrimaryHDU(np.asarray(comb.data, dtype=np.float32)).writeto(out / "ccdproc.fits", overwrite=True)
    theirs = time.perf_counter() - t0
    diff = float(np.nanmax(np.abs(np.asarray(comb.data, dtype=np.float32) - m.data)))
    shutil.rmtree(out, ignore_errors=True)
    return {"master_s": ours, "ccdproc_s": theirs, "speedup": theirs / ours, "max_abs_diff_adu": diff}


def bench_reduce(data: dict, xp_name: str, cosmic_rays: bool, satellite_trails: bool, repeat: int = 3) -> dict:
    from gppy.config import PathConfig, Settings
    from gppy.fitsio import read_header
    from gppy.tables import load_changehdr
    from gppy.xp import get_xp
    from gppy_calib.headers import describe
    from gppy_calib.night import Job, MasterRef, NightCalibrator

    work = Path(data["science"]).parents[1]
    paths = PathConfig(path_base=work / "factory", path_processed=work / "processed", path_mframe=data["mframe"])
    settings = Settings(gpu=xp_name, cosmic_rays=cosmic_rays, satellite_trails=satellite_trails)
    cal = NightCalibrator(settings, paths, "7DT01", get_xp(xp_name))
    info = describe(str(data["science"]), read_header(data["science"]), load_changehdr())
    m = data["masters"]
    job = Job(info, work / "processed" / "science_calib.fits", "v1",
              MasterRef("bias", m["bias"], "20250115"), MasterRef("dark", m["dark"], "20250115", exptime=100.0),
              MasterRef("flat", m["flat"], "20250115", filter="m425"))
    t0 = time.perf_counter()
    cal.reduce(job)
    cold = time.perf_counter() - t0
    warm, cpu, steps = [], [], []
    for _ in range(repeat):
        c0, t0 = _cpu(), time.perf_counter()
        prod = cal.reduce(job)
        warm.append(time.perf_counter() - t0)
        cpu.append(_cpu() - c0)
        steps.append({k: round(v, 3) for k, v in cal.last_steps.items()})
    i = int(np.argsort(warm)[len(warm) // 2])            # the median run
    return {"cold_s": cold, "warm_s": warm[i], "warm_all_s": [round(w, 3) for w in warm], "cpu_s": cpu[i],
            "steps_s": steps[i], "ncr": prod.ncr, "ntrail": prod.ntrail}


def _cpu() -> float:
    """User + system CPU seconds of this process (all threads)."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1536x1024", help="NAXIS1xNAXIS2 (9576x6388 = full frame)")
    ap.add_argument("--nframes", type=int, default=9)
    ap.add_argument("--gpu", default="off", choices=["auto", "on", "off"])
    ap.add_argument("--workdir", help="where the synthetic files go (default: a temporary folder)")
    ap.add_argument("--results", help="append a Markdown row to this file")
    ap.add_argument("--repeat", type=int, default=3, help="warm reductions per variant (the median is reported)")
    ap.add_argument("--reduce-only", action="store_true", help="skip the master benchmark")
    args = ap.parse_args()
    nx, ny = (int(v) for v in args.size.lower().split("x"))
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-calib-"))
    t0 = time.perf_counter()
    index = work / "bench_calib.json"             # a --workdir keeps its data for the next run
    key = {"size": [nx, ny], "nframes": args.nframes}
    if args.workdir and index.exists() and json.loads(index.read_text()).get("key") == key:
        saved = json.loads(index.read_text())["data"]
        data = {"biases": [Path(p) for p in saved["biases"]], "masters": {k: Path(v) for k, v in saved["masters"].items()},
                "science": Path(saved["science"]), "mframe": Path(saved["mframe"])}
        print(f"synthetic data {nx}x{ny} reused from {work}")
    else:
        data = make_data(work, (ny, nx), args.nframes)
        index.write_text(json.dumps({"key": key, "data": {
            "biases": [str(p) for p in data["biases"]], "masters": {k: str(v) for k, v in data["masters"].items()},
            "science": str(data["science"]), "mframe": str(data["mframe"])}}))
        print(f"synthetic data {nx}x{ny} written in {time.perf_counter() - t0:.1f} s under {work}")
    res = {"size": f"{nx}x{ny}", "nframes": args.nframes, "gpu": args.gpu, "cpus": os.cpu_count(),
           "machine": platform.processor() or platform.machine()}
    if not args.reduce_only:
        res["master"] = bench_master(data, (ny, nx), args.gpu)
    for cr, tr in ((False, False), (True, False), (True, True)):
        res[f"reduce_cr{int(cr)}_trail{int(tr)}"] = bench_reduce(data, args.gpu, cr, tr, args.repeat)
    res["load_1min_end"] = os.getloadavg()[0]
    print(json.dumps(res, indent=1))
    if "master" in res:
        m = res["master"]
        print(f"\nmaster of {args.nframes}: gppy_calib {m['master_s']:.2f} s, ccdproc {m['ccdproc_s']:.2f} s "
              f"(x{m['speedup']:.1f}), max |difference| {m['max_abs_diff_adu']:.3g} ADU")
    for key in ("reduce_cr0_trail0", "reduce_cr1_trail0", "reduce_cr1_trail1"):
        r = res[key]
        print(f"{key}: {r['warm_s']:.2f} s per frame with masters loaded (CPU {r['cpu_s']:.2f} s; "
              f"{r['cold_s']:.2f} s cold); steps {r['steps_s']}")
    if args.results and "master" in res:
        row = (f"| calib | {nx}x{ny} | {args.gpu} | master of {args.nframes}: {m['master_s']:.2f} s "
               f"(ccdproc {m['ccdproc_s']:.2f} s, x{m['speedup']:.1f}) | reduce: "
               f"{res['reduce_cr0_trail0']['warm_s']:.2f} s, +CR {res['reduce_cr1_trail0']['warm_s']:.2f} s, "
               f"+CR+trails {res['reduce_cr1_trail1']['warm_s']:.2f} s |\n")
        with open(args.results, "a") as fh:
            fh.write(row)
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
