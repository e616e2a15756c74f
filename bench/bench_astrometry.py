"""Time the astrometry stage per frame: extraction + solution + header update.

    .venv/bin/python bench/bench_astrometry.py [--size 1536x1024 | --full] [--frames 3]
                                               [--matcher own|scamp|both] [--keep DIR]
    .venv/bin/python bench/bench_astrometry.py --match-only bench/data/9576x6388/astrometry

Simulates one visit of one tile with the simulator (true pointing errors up to 5', rotation
up to 2 deg, 1" of distortion at the corners), calibrates the raw frames with the simulator's
true bias/dark/flat, then solves each frame with the service's own code path
(``gppy_astrometry.service.process_frame``: Source Extractor, coarse match, SCAMP, WCS written
into the frame) and prints the time of each step, the number of matched stars and the WCS
residuals against the true positions of the stars with S/N > 20. ``--matcher scamp`` lets
SCAMP do the pattern matching instead (MATCH Y, POSITION_MAXERR / POSANGLE_MAXERR from the
settings), for comparison. Not a test; results go in bench/RESULTS.md by hand.

``--match-only DIR`` re-runs only the coarse match (no Source Extractor, no SCAMP) on the
Source Extractor catalogues that an earlier run of ``python -m bench.run --only astrometry``
left in DIR (its ``ready.json`` and scratch folder), with the frames' own pointing errors and
with further ones added (header pointing moved by up to 10', detections rotated by up to
4 deg), and checks each solution against the simulator's true star positions.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

from gppy.config import PathConfig, Settings
from gppy.masks import MaskBit
from gppy.naming import ProductDirs, calib_name
from gppy.sim import instrument as ins
from gppy.sim import simulate
from gppy_astrometry.service import options_from, process_frame

UNIT = "7DT01"


def calibrate(root: Path, raw: Path, processed: Path) -> tuple[Path, Path, Path, Table, dict]:
    """Calibrated frame, weight and mask from the simulator's true bias, dark and flat."""
    tdir = root / "truth"
    t = json.loads((tdir / "frames" / f"{raw.stem}.json").read_text())
    with fits.open(raw) as h:
        data = np.asarray(h[0].data, dtype=np.float32)
        hdr = h[0].header.copy()
    g = t["gain_e_per_adu"]
    bias = fits.getdata(tdir / "calib" / "bias.fits").astype(np.float32) + np.float32(t["bias_offset_adu"])
    dark = fits.getdata(tdir / "calib" / "dark_current.fits").astype(np.float32) * np.float32(hdr["EXPTIME"] / g)
    flat = fits.getdata(tdir / "calib" / f"flat_{hdr['FILTER'].strip()}.fits").astype(np.float32)
    cal = (data - bias - dark) / flat
    mask = np.where(data >= 65535, np.uint16(MaskBit.SATURATED), np.uint16(0)).astype(np.uint16)
    var = (np.clip(cal * flat, 0, None) * g + t["read_noise_e"] ** 2) / (g * g) / (flat * flat)
    weight = (1.0 / var).astype(np.float32)
    weight[mask != 0] = 0
    for k in ("BSCALE", "BZERO"):
        hdr.remove(k, ignore_missing=True)
    hdr["SATURATE"] = float((65535 - bias.max()) / flat.max())
    obj, filt = hdr["OBJECT"].strip(), hdr["FILTER"].strip()
    base = ProductDirs.of(processed, obj, UNIT, filt).base
    base.mkdir(parents=True, exist_ok=True)
    path = base / calib_name(UNIT, obj, hdr["DATE-OBS"][:19], filt, hdr["EXPTIME"])
    fits.PrimaryHDU(cal.astype(np.float32), hdr).writeto(path, overwrite=True)
    wpath, mpath = path.with_name(path.name[:-5] + ".weight.fits"), path.with_name(path.name[:-5] + ".mask.fits")
    fits.PrimaryHDU(weight).writeto(wpath, overwrite=True)
    fits.PrimaryHDU(mask).writeto(mpath, overwrite=True)
    stars = Table.read(tdir / "frames" / f"{raw.stem}.stars.csv", format="ascii.csv")
    fwhm_px = np.asarray(stars["fwhm_arcsec"], float) / ins.PIXEL_SCALE
    npix = 1.5 * 4 * np.pi * (fwhm_px / 2.3548) ** 2
    f_e = np.asarray(stars["flux_adu"], float) * g
    stars["snr"] = f_e / np.sqrt(f_e + npix * (t["sky_adu"] * g + t["read_noise_e"] ** 2))
    return path, wpath, mpath, stars, t


def residuals(path: Path, stars: Table) -> tuple[float, float, int]:
    st = stars[(stars["snr"] > 20) & (stars["saturated"] == 0)]
    w = WCS(fits.getheader(path), relax=True)
    ra, dec = w.all_pix2world(np.asarray(st["x_0based"], float), np.asarray(st["y_0based"], float), 0)
    dra = ((ra - st["ra"] + 180) % 360 - 180) * np.cos(np.deg2rad(dec)) * 3600
    ddec = (dec - st["dec"]) * 3600
    return float(np.sqrt(np.mean(dra ** 2))), float(np.sqrt(np.mean(ddec ** 2))), len(st)


def _turn(x: np.ndarray, y: np.ndarray, nx: int, ny: int, deg: float) -> tuple[np.ndarray, np.ndarray]:
    """Pixel positions (1-based) rotated by ``deg`` about the frame centre."""
    c, s = np.cos(np.deg2rad(deg)), np.sin(np.deg2rad(deg))
    cx, cy = (nx + 1) / 2.0, (ny + 1) / 2.0
    return cx + (x - cx) * c - (y - cy) * s, cy + (x - cx) * s + (y - cy) * c


def match_only(folder: Path, cases: int = 8, seed: int = 1) -> None:
    """Coarse match alone on the kept catalogues of a bench run (see the module docstring)."""
    import math

    from gppy_astrometry.match import NoMatchError, coarse_match
    from gppy_astrometry.reference import scamp_reference_path
    from gppy_astrometry.solve import star_like

    ready = json.loads((folder / "ready.json").read_text())["data"]
    paths = PathConfig.load(ready["config"])
    rng = np.random.default_rng(seed)
    times, n_ok, n_all = [], 0, 0
    for f in ready["frames"]:
        stem = Path(f["image"]).name[:-5]
        ldac = next(Path(paths.path_scratch).rglob(f"{stem}.ldac"))
        with fits.open(ldac) as h:
            cat = Table(h["LDAC_OBJECTS"].data)
        with fits.open(scamp_reference_path(paths.path_ref_scamp, f["obj"])) as h:
            objs = h["LDAC_OBJECTS"].data
            ref = (np.asarray(objs["X_WORLD"], float), np.asarray(objs["Y_WORLD"], float),
                   np.asarray(objs["MAG"], float))
        hdr = fits.getheader(f["pristine"])
        nx, ny = hdr["NAXIS1"], hdr["NAXIS2"]
        stars = Table.read(f["stars"])
        stars = stars[(stars["snr"] > 20) & (stars["saturated"] == 0)]
        ok = star_like(cat, 10.0)
        x, y, flux = (np.asarray(cat[c], float)[ok] for c in ("XWIN_IMAGE", "YWIN_IMAGE", "FLUX_AUTO"))
        extra = [(0.0, 0.0, 0.0)] + [(float(rng.uniform(-7, 7)), float(rng.uniform(-7, 7)), float(rng.uniform(-4, 4)))
                                     for _ in range(cases - 1)]
        for de, dn, rot in extra:
            n_all += 1
            dec0 = hdr["DEC"] + dn / 60.0
            ra0 = hdr["RA"] + de / 60.0 / math.cos(math.radians(dec0))
            xr, yr = _turn(x, y, nx, ny, rot)
            t0 = time.perf_counter()
            try:
                cm = coarse_match(xr, yr, flux, *ref, ra0, dec0, nx, ny, ins.PIXEL_SCALE)
            except NoMatchError as exc:
                print(f"{stem} +({de:+.1f}', {dn:+.1f}'), {rot:+.2f} deg: FAILED: {exc}")
                continue
            dt = time.perf_counter() - t0
            times.append(dt)
            tx, ty = _turn(np.asarray(stars["x_0based"], float) + 1, np.asarray(stars["y_0based"], float) + 1,
                           nx, ny, rot)
            ra, dec = WCS(cm.header).all_pix2world(tx, ty, 1)
            sep = np.hypot((ra - stars["ra"]) * np.cos(np.deg2rad(dec)), dec - stars["dec"]) * 3600
            good = bool(np.median(sep) < 1.0)
            n_ok += good
            print(f"{stem} +({de:+.1f}', {dn:+.1f}'), {rot:+.2f} deg: {'ok' if good else 'WRONG'} in {dt:.2f} s, "
                  f"{cm.nmatch} pairs, peak {cm.significance:.0f} sigma, linear WCS vs truth: median "
                  f"{np.median(sep):.2f}\", 95% {np.percentile(sep, 95):.2f}\"", flush=True)
    print(f"coarse match: {n_ok}/{n_all} right; time median {statistics.median(times):.2f} s, "
          f"max {max(times):.2f} s")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--match-only", metavar="DIR", help="coarse match alone on a bench run's kept catalogues")
    ap.add_argument("--full", action="store_true", help="9576x6388 frames")
    ap.add_argument("--size", default="1536x1024")
    ap.add_argument("--frames", type=int, default=3, help="frames of the visit to solve (<= 3)")
    ap.add_argument("--matcher", choices=["own", "scamp", "both"], default="own")
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--keep", help="work in this folder instead of a temporary one")
    a = ap.parse_args()
    if a.match_only:
        match_only(Path(a.match_only))
        return
    size = ins.FULL_SIZE if a.full else tuple(int(v) for v in a.size.split("x"))
    tmp = None
    if a.keep:
        root = Path(a.keep)
        root.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory()
        root = Path(tmp.name)
    t0 = time.perf_counter()
    cfg = simulate(root, size=size, targets=1, filters=["m625"], calib=False, transients=False,
                   references=True, extras=False, seed=a.seed, max_pointing_error_arcmin=5.0,
                   max_rotation_deg=2.0)
    print(f"simulated {size[0]}x{size[1]} in {time.perf_counter() - t0:.1f} s ({os.cpu_count()} cpus)")
    paths = PathConfig.load(cfg)
    settings = Settings()
    raws = sorted((root / "obsdata").rglob("*.fits"))[: a.frames]
    frames = [calibrate(root, raw, paths.path_processed) for raw in raws]
    # the reference is built once per field and epoch; time it apart from the frames
    matchers = ["own", "scamp"] if a.matcher == "both" else [a.matcher]
    for matcher in matchers:
        totals = []
        for i, (path, w, m, stars, truth) in enumerate(frames):
            hdr = fits.getheader(path)
            t0 = time.perf_counter()
            res = process_frame(path, w, m, hdr["OBJECT"].strip(), hdr["DATE-OBS"], UNIT,
                                "7DT01_2025-01-15_gain2750", paths, options_from(settings, matcher=matcher))
            wall = time.perf_counter() - t0
            off = float(np.hypot(*truth["pointing_offset_arcsec"])) / 60
            line = (f"[{matcher}] frame {i}: pointing off {off:.1f}', rotation {truth['rotation_deg']:+.2f} deg: "
                    f"wall {wall:.2f} s, steps " + ", ".join(f"{k} {v:.2f}" for k, v in res.timings.items()))
            if res.ok:
                r1, r2, n = residuals(path, stars)
                line += (f"; {res.nstars} stars matched, SCAMP RMS {res.rms_arcsec:.3f}\"; "
                         f"truth residuals {r1:.4f}\" / {r2:.4f}\" ({n} stars S/N>20)")
                if i > 0 or len(frames) == 1:  # the first frame also builds the reference
                    totals.append(res.timings["total"])
            else:
                line += f"; FAILED: {res.reason}"
            print(line, flush=True)
        if totals:
            print(f"[{matcher}] per frame (reference already cached): median {statistics.median(totals):.2f} s, "
                  f"max {max(totals):.2f} s over {len(totals)} frames")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
