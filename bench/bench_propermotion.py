"""Benchmark: moving the stars of a decade-old reference to the science's epoch, full size.

    .venv/bin/python bench/bench_propermotion.py                   # 10200 x 6800, 12 years
    .venv/bin/python bench/bench_propermotion.py --size 2048x1536 --years 0.2

A reference on the stack grid (sky 100, noise 5 per pixel, Moffat FWHM 8 px as a PS1-like
reference resampled to 0.505"/px) holds stars at the 7DT density of ~3e-4 per px^2 with
fluxes from a power law (peaks up to ~10^4 sigma), and a Gaia-like catalogue gives each
star a proper motion (log-normal magnitude, median 5 mas/yr, 0.7 % faster than 50 mas/yr,
random direction). :func:`gppy_subtract.propermotion.move_stars` then moves them by
``years`` of motion. Generation is not timed. Printed as JSON: seconds (median of
``--runs``), stars in the catalogue, stars moved, largest shift.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "services" / "subtract"))

from bench_subtract import add_stars, size  # noqa: E402

from gppy_subtract.propermotion import move_stars  # noqa: E402

PIXSCALE = 0.505          # arcsec/px
FWHM = 8.0                # px: a 4" reference PSF on the stack grid
SKY, SIGMA = 100.0, 5.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="10200x6800")
    ap.add_argument("--years", type=float, default=12.0, help="reference epoch to science epoch")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args(argv)
    w, h = size(args.size)
    rng = np.random.default_rng(5)
    n = int(3e-4 * w * h)
    x, y = rng.uniform(0, w, n), rng.uniform(0, h, n)
    flux = SIGMA * 30 * (1 - rng.uniform(0, 1, n)) ** (-1 / 0.6)          # S/N-ish 30 up, power law
    flux = np.minimum(flux, 4e6)
    img = np.full((h, w), SKY, np.float32) + rng.normal(0, SIGMA, (h, w)).astype(np.float32)
    add_stars(img, x, y, flux.astype(np.float32), FWHM, half=31)
    pm = np.exp(rng.normal(np.log(5.0), 1.0, n))                          # mas/yr
    ang = rng.uniform(0, 2 * np.pi, n)
    shift_px = pm * args.years / 1000.0 / PIXSCALE
    x_new, y_new = x + shift_px * np.cos(ang), y + shift_px * np.sin(ang)
    times = []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        _, _, moved = move_stars(img, None, x, y, x_new, y_new, flux, sky=SKY, sigma=SIGMA, fwhm_px=FWHM)
        times.append(time.perf_counter() - t0)
    print(json.dumps({"grid": f"{w}x{h}", "years": args.years, "catalogue_stars": n,
                      "stars_moved": moved.n_moved, "max_shift_px": round(moved.max_shift_px, 2),
                      "median_s": round(float(np.median(times)), 2), "runs_s": [round(t, 2) for t in times]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
