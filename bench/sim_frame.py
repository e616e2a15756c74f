"""Time the simulator on one science frame (detector set-up, rendering, read-out, writing).

    .venv/bin/python bench/sim_frame.py [--full | --size 1536x1024] [--density 55000]

Generates one target's star field, the detector, and one 100 s science frame with its truth
in a temporary folder, printing the time of each step. Not a test; results go in
bench/RESULTS.md by hand.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from astropy.io import fits

from gppy import fitsio
from gppy.sim import instrument as ins
from gppy.sim.catalog import make_starfield
from gppy.sim.detector import Physics, make_detector
from gppy.sim.header import raw_header
from gppy.sim.night import _frame_truth, _rng, _science_frame, _visit_conditions, write_csv
from gppy.sim.optics import distortion_coefficients
from gppy.sim.plan import make_plan


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--size", default="1536x1024")
    ap.add_argument("--density", type=float, default=55000.0)
    a = ap.parse_args()
    nx, ny = ins.FULL_SIZE if a.full else tuple(int(v) for v in a.size.split("x"))
    ph = Physics()
    times = {}
    t0 = time.perf_counter()
    plan = make_plan("7DT01", "2025-01-15", 1, ["r"], _rng(0, 1), calib=False, extras=False)
    det = make_detector((ny, nx), seed=1, physics=ph)
    det.flat("r")
    times["detector + flat"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    tg = plan.targets[0]
    s = ins.PIXEL_SCALE / 3600
    fld = make_starfield(tg.ra, tg.dec, 0.5 * nx * s * 1.25 + 0.05, 0.5 * ny * s * 1.25 + 0.05, a.density,
                         _rng(0, 4, 0))
    pv1, pv2 = distortion_coefficients((nx, ny), 1.0, 0.15, _rng(0, 3))
    vc = _visit_conditions(plan, 0, ph, 4.0, 1.5, (nx, ny))
    spec = plan.science()[0]
    tr = _frame_truth(spec, plan, vc[spec.visit], 0, ph, (nx, ny), pv1, pv2)
    times["star field"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    raw, truth, mask, stars = _science_frame(spec, tr, fld, det, [], True, 0, ph, 0.15, "7DT01")
    times["render + read-out (1 frame)"] = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        hdr = raw_header(unit="7DT01", kind="science", obj=spec.obj, filt="r", exptime=100.0,
                         date_obs=spec.t_start, ra=tr.header_ra, dec=tr.header_dec, obj_ra=tg.ra, obj_dec=tg.dec)
        fitsio.write_fits(Path(tmp) / "raw.fits", raw, hdr)
        times["write raw"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        fitsio.write_fits(Path(tmp) / "mask.fits", None, fits.Header(),
                          extra_hdus=[fits.CompImageHDU(mask, compression_type="RICE_1")])
        write_csv(stars, Path(tmp) / "stars.csv")
        times["write truth"] = time.perf_counter() - t0
    print(f"frame {nx}x{ny}: {truth['n_stars_in_frame']} stars, {int(np.sum(stars['saturated']))} saturated")
    for k, v in times.items():
        print(f"  {k:32s} {v:7.2f} s")


if __name__ == "__main__":
    main()
