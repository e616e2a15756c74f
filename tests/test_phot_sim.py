"""Photometry of simulated 7DT frames (gppy.sim) against the simulator's truth.

The raw frames are calibrated and given their true WCS and mask with the simulator's truth
(:func:`conftest_phot.calibrate_sim_frame`), since the calib and astrometry stages are built
in parallel; the reference catalogue is the simulator's Gaia-XP-like CSV (epoch 2016.0, with
proper motions, some missing).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from gppy.refcat import gaiaxp_path, load_gaiaxp
from gppy.sim import simulate
from gppy_phot.photometry import PhotParams, photometer

_spec = importlib.util.spec_from_file_location("conftest_phot", Path(__file__).with_name("conftest_phot.py"))
cp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cp)

FILT = "m650"


@pytest.fixture(scope="module")
def visit(tmp_path_factory):
    root = tmp_path_factory.mktemp("sim")
    simulate(root, targets=1, filters=[FILT], seed=3, calib=False, extras=False, transients=False)
    raws = sorted((root / "obsdata").glob("*/*/*.fits"))
    assert len(raws) == 3
    out = []
    for raw in raws:
        p, w, m, truth = cp.calibrate_sim_frame(raw, root / "truth", root / "cal")
        header = fits.getheader(p)
        ref = load_gaiaxp(gaiaxp_path(root / "factory" / "ref_cat", header["OBJECT"]))
        res = photometer(p, header, fits.getdata(p), fits.getdata(m), w, ref, "ref", root / "work" / p.name,
                         PhotParams())
        out.append((res, truth))
    return out


def test_zero_points_against_truth(visit):
    """ZP_TOT (total flux) within 0.02 mag of the true zero point; ZP_AUTO within 0.03 (the
    Kron aperture misses ~1 % of a star's light: v1's ZP_AUTO includes it)."""
    for res, truth in visit:
        assert abs(res.total.zp - truth["zp_adu"]) < 0.02, (res.total, truth["zp_adu"])
        assert abs(res.total.zp - truth["zp_adu"]) < 3 * res.total.ezp + 0.01
        assert -0.03 < res.zps["AUTO"].zp - truth["zp_adu"] < 0.005
        assert res.zps["AUTO"].nused > 30


def test_seeing_against_truth(visit):
    for res, truth in visit:
        assert abs(res.seeing.seeing_arcsec / truth["fwhm_median_arcsec"] - 1) < 0.04
        assert abs(res.total.beta - truth["psf"]["beta"]) < 0.6


def test_errors_honest_across_the_visit(visit):
    """The three frames of the visit measure the same stars: the scatter of their calibrated
    magnitudes over the quoted errors is between 0.8 and 1.2."""
    tabs = [r.table for r, _ in visit]
    ids = [np.asarray(t["source_id"].filled(-1)) for t in tabs]
    common = set(ids[0][ids[0] > 0]) & set(ids[1][ids[1] > 0]) & set(ids[2][ids[2] > 0])
    common = np.array(sorted(common))
    rows = [np.array([np.flatnonzero(i == c)[0] for c in common]) for i in ids]
    for s in ("APER_1", "APER_3", "APER_5"):
        mags = np.array([np.asarray(t[f"MAG_{s}_{FILT}"])[r] for t, r in zip(tabs, rows, strict=True)])
        errs = np.array([np.asarray(t[f"MAGERR_{s}_{FILT}"])[r] for t, r in zip(tabs, rows, strict=True)])
        flags = np.array([np.asarray(t["FLAGS"])[r] | np.asarray(t["IMAFLAGS_ISO"])[r] for t, r in
                          zip(tabs, rows, strict=True)])
        good = np.all(np.isfinite(mags), axis=0) & np.all(flags == 0, axis=0)
        good &= (np.median(errs, axis=0) > 0.01) & (np.median(errs, axis=0) < 0.2)
        assert good.sum() > 50
        ratio = np.sqrt(mags[:, good].var(axis=0, ddof=1).mean() / (errs[:, good] ** 2).mean())
        assert 0.8 < ratio < 1.2, (s, ratio, good.sum())
