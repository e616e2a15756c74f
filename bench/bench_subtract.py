"""Benchmark: one PSF-matched subtraction with the native engine, per engine stage.

    .venv/bin/python bench/bench_subtract.py --size 2048x1536            # small, quick check
    .venv/bin/python bench/bench_subtract.py --size 10200x6800           # full 7DT stack grid

A synthetic stack and a deeper, sharper reference on the same grid are generated (Moffat
stars at the 7DT density of ~3e-4 per px^2, FWHM 4.2 px science / 3.0 px reference, a
differential background, masked columns and saturated stars; float32 throughout). Then:

1. the engine alone on in-memory arrays (:func:`gppy_subtract.engine.subtract`), with the time
   of each stage (stamps = star finding and selection, fit = kernel fits of all regions,
   convolution, noise, mask) -- the figure to compare with the < 30 s target;
2. unless ``--no-io``, the same subtraction from files to products through the service code
   (read stack + weight + mask and reference, engine, write difference, noise, weight, mask and
   convolved image), i.e. one message's work.

Generation is not timed. Reported: seconds per stage and in total, peak RSS of the process,
quality figures (stamps kept, chi^2, residual noise ratio, kernel sum vs truth).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS

from gppy.xp import backend_name, get_xp
from gppy_subtract.engine import EngineParams, Plane, subtract


def size(text: str) -> tuple[int, int]:
    w, h = text.lower().split("x")
    return int(w), int(h)


def moffat_stamps(fwhm: float, beta: float, half: int, fx: np.ndarray, fy: np.ndarray) -> np.ndarray:
    alpha = fwhm / (2.0 * np.sqrt(2.0 ** (1.0 / beta) - 1.0))
    off = np.arange(-half, half + 1, dtype=np.float32)
    dx = off[None, None, :] - fx[:, None, None]
    dy = off[None, :, None] - fy[:, None, None]
    p = (1.0 + (dx * dx + dy * dy) / alpha ** 2) ** (-beta)
    return (p / p.sum(axis=(1, 2), keepdims=True)).astype(np.float32)


def add_stars(img: np.ndarray, x, y, flux, fwhm: float, beta: float = 3.0, half: int = 15) -> None:
    h, w = img.shape
    ix = np.floor(x + 0.5).astype(int)
    iy = np.floor(y + 0.5).astype(int)
    ok = (ix >= half) & (iy >= half) & (ix < w - half) & (iy < h - half)
    ix, iy, fx, fy, fl = ix[ok], iy[ok], (x - np.floor(x + 0.5))[ok], (y - np.floor(y + 0.5))[ok], flux[ok]
    for c in range(0, ix.size, 512):
        st = moffat_stamps(fwhm, beta, half, fx[c:c + 512], fy[c:c + 512]) * fl[c:c + 512, None, None]
        for k in range(st.shape[0]):
            i = c + k
            img[iy[i] - half:iy[i] + half + 1, ix[i] - half:ix[i] + half + 1] += st[k]


def make_pair(w: int, h: int, seed: int = 1):
    """Science (ADU, sky-subtracted) and reference (deeper, sharper, with a background plane)."""
    rng = np.random.default_rng(seed)
    n = max(200, int(3e-4 * w * h))
    x = rng.uniform(0, w, n).astype(np.float32)
    y = rng.uniform(0, h, n).astype(np.float32)
    flux = (10 ** rng.uniform(2.0, 5.3, n)).astype(np.float32)
    sat_s, sat_r, ref_scale = 40000.0, 30000.0, 0.5
    sky_s, sky_r, g_s, g_r = 8.0, 2.5, 2.0, 12.0
    sci = np.zeros((h, w), np.float32)
    add_stars(sci, x, y, flux, 4.2)
    noise = rng.standard_normal((h, w), dtype=np.float32)
    noise *= np.sqrt(sky_s ** 2 + np.maximum(sci, 0) / g_s)
    sci += noise
    del noise
    mask_s = np.zeros((h, w), np.uint16)
    mask_s[sci >= sat_s] |= 2
    np.minimum(sci, sat_s, out=sci)
    mask_s[:, int(0.61 * w)] |= 1
    var_s = np.where(mask_s == 0, np.float32(sky_s ** 2), np.float32(0))
    ref = np.zeros((h, w), np.float32)
    add_stars(ref, x, y, flux * ref_scale, 3.0)
    noise = rng.standard_normal((h, w), dtype=np.float32)
    noise *= np.sqrt(sky_r ** 2 + np.maximum(ref, 0) / g_r)
    ref += noise
    del noise
    ref += (35.0 + 0.002 * np.arange(w, dtype=np.float32))[None, :] - (0.001 * np.arange(h, dtype=np.float32))[:, None]
    mask_r = np.zeros((h, w), np.uint16)
    mask_r[ref >= sat_r] |= 2
    np.minimum(ref, sat_r, out=ref)
    mask_r[:, -30:] |= 32
    ref[:, -30:] = 0
    var_r = np.where(mask_r == 0, np.float32(sky_r ** 2), np.float32(0))
    return (Plane(sci, var_s, mask_s, g_s, sat_s), Plane(ref, var_r, mask_r, g_r, sat_r), n, 1.0 / ref_scale)


def tan_header(w: int, h: int, scale: float = 0.505) -> fits.Header:
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [150.0, 2.0]
    wcs.wcs.crpix = [(w + 1) / 2.0, (h + 1) / 2.0]
    wcs.wcs.cd = np.array([[-scale / 3600, 0], [0, scale / 3600]])
    return wcs.to_header()


def file_run(sci: Plane, ref: Plane, work: Path, nregions) -> dict:
    """One message's work: files in, products out, through the service code."""
    from gppy.config import Settings
    from gppy.messages import PhotometryDone
    from gppy.naming import flag_of, weight_of
    from gppy_subtract.service import SubtractService

    base = work / "root" / "factory"
    base.mkdir(parents=True, exist_ok=True)
    cfg = work / "root" / "path.json"
    cfg.write_text(json.dumps({"path_base": str(base)}))
    h, w = sci.data.shape
    hdr = tan_header(w, h)
    folder = base.parent / "processed_1x1_gain2750" / "T00001" / "7DT01" / "r"
    folder.mkdir(parents=True, exist_ok=True)
    sp = folder / "calib_7DT01_T00001_20250110_030405_r_300.com.fits"
    sh = hdr.copy()
    sh.update({"OBJECT": "T00001", "FILTER": "r", "DATE-OBS": "2025-01-10T03:04:05", "EGAIN": sci.egain,
               "SATURATE": sci.saturate, "ZP_AUTO": 25.0, "SEEING": 2.1})
    fits.writeto(sp, sci.data, sh)
    with np.errstate(divide="ignore"):
        fits.writeto(weight_of(sp), np.where(sci.var > 0, 1 / sci.var, 0).astype(np.float32), hdr)
        rdir = base / "ref_frame" / "r"
        rdir.mkdir(parents=True, exist_ok=True)
        rp = rdir / "ref_7DT_T00001_20240101_000000_r_3600.com.fits"
        rh = hdr.copy()
        rh.update({"EGAIN": ref.egain, "SATURATE": ref.saturate})
        fits.writeto(rp, ref.data, rh)
        fits.writeto(weight_of(rp), np.where(ref.var > 0, 1 / ref.var, 0).astype(np.float32), hdr)
    fits.writeto(flag_of(sp), sci.mask, hdr)
    fits.writeto(flag_of(rp), ref.mask, hdr)
    svc = SubtractService(Settings(config=cfg, gpu=os.environ.get("GPPY_GPU", "auto"), subtract_nregions=nregions,
                                   log_json=False))
    ev = PhotometryDone(night_id="7DT01_2025-01-09", unit="7DT01", image_path=str(sp), image_kind="stack")
    t0 = time.perf_counter()
    out = svc.process(ev)
    dt = time.perf_counter() - t0
    assert out[0].ok, out
    return {"file_to_products_s": round(dt, 2)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=size, default=(2048, 1536), help="image size WxH (default 2048x1536)")
    p.add_argument("--regions", type=size, default=(3, 2), help="regions NXxNY (default v1's 3x2)")
    p.add_argument("--gpu", default="off", choices=["auto", "on", "off"])
    p.add_argument("--no-io", action="store_true", help="skip the file-to-products run")
    p.add_argument("--workdir", help="folder for the file run (default: a temporary one)")
    args = p.parse_args(argv)
    w, h = args.size
    xp = get_xp(args.gpu)
    t0 = time.perf_counter()
    sci, ref, nstars, ksum_true = make_pair(w, h)
    t_make = time.perf_counter() - t0
    params = EngineParams(nregions=args.regions)
    planes = [Plane(xp.asarray(pl.data), xp.asarray(pl.var), xp.asarray(pl.mask), pl.egain, pl.saturate)
              for pl in (sci, ref)]
    t0 = time.perf_counter()
    c0 = time.process_time()
    res = subtract(planes[0], planes[1], xp, params)
    t_total = time.perf_counter() - t0
    c_total = time.process_time() - c0
    result = {
        "size": f"{w}x{h}", "megapixels": round(w * h / 1e6, 1), "backend": backend_name(xp),
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "stars": nstars, "generate_s": round(t_make, 1), "engine_total_s": round(t_total, 2),
        "engine_cpu_s": round(c_total, 2), "load_avg_1min": round(os.getloadavg()[0], 1),
        "stages_s": {k: round(v, 2) for k, v in res.timings.items()},
        "stages_cpu_s": {k: round(v, 2) for k, v in res.cpu_timings.items()},
        "stamps_kept": res.n_kept, "stamps": res.n_stamps, "chi2": round(res.mean_chi2, 3),
        "noise_ratio": round(res.noise_ratio, 3), "kernel_sum": round(res.kernel_sum, 4), "kernel_sum_true": ksum_true,
        "kernel_half_width": res.spec.half_width, "convolved": res.convolved,
    }
    del res, planes
    if not args.no_io:
        work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-subtract-"))
        try:
            result.update(file_run(sci, ref, work, args.regions))
        finally:
            if not args.workdir:
                shutil.rmtree(work, ignore_errors=True)
    result["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)
    for k, v in result.items():
        print(f"{k:>20}: {v}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
