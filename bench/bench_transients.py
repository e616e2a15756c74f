"""Benchmark of the transient search on one difference image (gppy_phot.transient_products.search).

    .venv/bin/python bench/bench_transients.py                 # a full-size 10200 x 6800 stack
    .venv/bin/python bench/bench_transients.py --size 2560x1800

The difference is synthetic: the stars of a field at gppy.sim's default density (55000 per
square degree, mag 11-21.5) rendered with the science PSF minus the same stars with a 2 %
broader PSF (the residual a slightly mismatched kernel leaves beside every star), plus
``--transients`` point sources at PSF S/N 5-100 and white noise. The convolved reference is
the broader stars; the science, the stars plus the transients. Timed: ``search`` (Source
Extractor on D and -D, forced photometry, the residual terms, the flags, the vetting score, the
trail test of the candidates), the wall time and the CPU time of the process and its
Source Extractor children. Printed as a Markdown row.
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
from astropy.io import fits

from gppy_phot import synthetic as syn
from gppy_phot.transient_products import search

DENSITY = 55000.0


def cpu_s() -> float:
    me, ch = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + ch.ru_utime + ch.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="10200x6800")
    ap.add_argument("--transients", type=int, default=300)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    nx, ny = (int(v) for v in a.size.split("x"))
    rng = np.random.default_rng(a.seed)
    area = nx * ny * (syn.PIXSCALE / 3600.0) ** 2
    fld = syn.make_field(nx, ny, nstars=int(DENSITY * area), seed=a.seed, fwhm_arcsec=2.6, beta=3.2, sky=0.0,
                         zp=26.7, mag_range=(11.0, 21.5))
    fw, beta, sigma = fld.fwhm_px, fld.beta, 12.0
    t0 = time.time()
    stars = syn.render_sources(fld.shape, fld.x, fld.y, fld.flux, fw, beta, oversample=1)
    broad = syn.render_sources(fld.shape, fld.x, fld.y, fld.flux, 1.02 * fw, beta, oversample=1)
    # transients at PSF S/N 5-100 in white noise sigma
    tx, ty = rng.uniform(50, nx - 50, a.transients), rng.uniform(50, ny - 50, a.transients)
    p = syn.render_sources((61, 61), [30.0], [30.0], [1.0], fw, beta, half=29)
    tflux = np.exp(rng.uniform(np.log(5), np.log(100), a.transients)) * sigma / np.sqrt((p**2).sum())
    trans = syn.render_sources(fld.shape, tx, ty, tflux, fw, beta, oversample=1)
    diff = (stars - broad + trans + rng.normal(0, sigma, fld.shape)).astype(np.float32)
    science = (stars + trans + rng.normal(0, sigma / np.sqrt(2), fld.shape)).astype(np.float32)
    conv = broad.astype(np.float32)
    del stars, trans
    print(f"rendered {len(fld.x)} stars and {a.transients} transients on {nx} x {ny} in {time.time() - t0:.1f} s")
    h = syn.make_wcs(nx, ny).to_header()
    h.update({"SEEING": fw * syn.PIXSCALE, "PEEING": fw, "COGBETA": beta, "ELLIP": 0.03, "ELONG": 1.03,
              "FILTER": "m650", "DATE-OBS": "2024-04-23T03:28:04", "ZP_1": 26.7, "EZP_1": 0.01, "ZP_3": 26.7,
              "ZP_5": 26.7, "SUBCONV": "REFERENCE"})
    bright = fld.flux > 20 * sigma * fw * 1.5
    with tempfile.TemporaryDirectory(prefix="bench-transients-") as tmp:
        path = Path(tmp) / "bench.subt.fits"
        fits.writeto(path, diff, h)
        noise = np.full(diff.shape, sigma, np.float32)
        c0, w0 = cpu_s(), time.time()
        res = search(path, diff, fits.getheader(path), noise, None, science, noise / np.sqrt(2), 0.0, conv, None, [],
                     Path(tmp) / "w", stars=(fld.x[bright], fld.y[bright], fld.flux[bright]))
        wall, cpu = time.time() - w0, cpu_s() - c0
    t = res.transients
    ncand = int(np.sum(t["candidate"]))
    print("| size | stars | transients | detections | candidates | wall s | CPU s | load |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {nx} x {ny} | {len(fld.x)} | {a.transients} | {len(t)} | {ncand} | {wall:.1f} | {cpu:.1f} | "
          f"{os.getloadavg()[0]:.2f} |")


if __name__ == "__main__":
    main()
