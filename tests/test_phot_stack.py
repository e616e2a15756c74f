"""Photometry of resampled stacks (real SWarp, LANCZOS3): honest errors and depth.

Three independent visits of three dithered frames each are stacked by SWarp onto one grid
(weighted mean, weight maps in, weight map out), as the stack stage does. The stacks' pixels
are correlated; the errors and the depth must still be honest.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from gppy.tools import run_tool
from gppy_phot import synthetic as syn
from gppy_phot.matching import match_sky
from gppy_phot.photometry import PhotParams, photometer

_spec = importlib.util.spec_from_file_location("conftest_phot", Path(__file__).with_name("conftest_phot.py"))
cp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cp)

FILT = "m650"
DITHERS = ((0.0, 0.0), (7.3, -4.6), (-5.1, 6.2))


def swarp_stack(root: Path, images: list[Path], weights: list[Path], ra0: float, dec0: float, name: str) -> Path:
    out = root / f"{name}.fits"
    run_tool("swarp", [str(p) for p in images] + [
        "-c", "/dev/null", "-IMAGEOUT_NAME", str(out), "-WEIGHTOUT_NAME", str(root / f"{name}.weight.fits"),
        "-WEIGHT_TYPE", "MAP_WEIGHT", "-WEIGHT_IMAGE", ",".join(str(w) for w in weights),
        "-COMBINE_TYPE", "WEIGHTED", "-RESAMPLING_TYPE", "LANCZOS3", "-CENTER_TYPE", "MANUAL",
        "-CENTER", f"{ra0},{dec0}", "-PIXELSCALE_TYPE", "MANUAL", "-PIXEL_SCALE", str(syn.PIXSCALE),
        "-IMAGE_SIZE", "960,960", "-SUBTRACT_BACK", "N", "-WRITE_XML", "N", "-VERBOSE_TYPE", "QUIET",
        "-RESAMPLE_DIR", str(root), "-NTHREADS", "1"], cwd=root)
    return out


@pytest.fixture(scope="module")
def stacks(tmp_path_factory):
    root = tmp_path_factory.mktemp("stacks")
    fld = syn.make_field(1000, 1000, nstars=1000, seed=11, fwhm_arcsec=2.3, beta=3.0)
    ref = syn.reference_table(fld)
    rng = np.random.default_rng(0)
    out = []
    for v in range(3):
        ims, ws = [], []
        for k, (dx, dy) in enumerate(DITHERS):
            w = syn.make_wcs(1000, 1000, rot_deg=0.7)
            w.wcs.crpix = [w.wcs.crpix[0] + dx, w.wcs.crpix[1] + dy]
            x, y = w.all_world2pix(fld.ra, fld.dec, 0)
            model = fld.sky + syn.render_sources(fld.shape, x, y, fld.flux, fld.fwhm_px, fld.beta)
            h = w.to_header()
            p = root / f"v{v}_{k}.fits"
            fits.writeto(p, syn.add_noise(model, fld.gain, fld.rdnoise, rng), h)
            wp = root / f"v{v}_{k}.weight.fits"
            fits.writeto(wp, syn.weight_map(fld))
            ims.append(p)
            ws.append(wp)
        path = swarp_stack(root, ims, ws, *fld.wcs.wcs.crval, f"stack{v}")
        with fits.open(path, mode="update") as hd:   # what the stack stage writes
            hd[0].header["EGAIN"] = 3 * fld.gain        # weighted mean of 3 frames, in ADU
            hd[0].header["SATURATE"] = 60000.0
            hd[0].header["DATE-OBS"] = "2024-04-23T03:30:00"
            hd[0].header["FILTER"] = FILT
        wpath = root / f"stack{v}.weight.fits"
        mask = (fits.getdata(wpath) == 0).astype(np.uint16)
        res = photometer(path, fits.getheader(path), fits.getdata(path), mask, wpath, ref, "r", root / f"w{v}",
                         PhotParams(measure_correlation=True))
        out.append(res)
    return fld, out


def test_stack_zero_point_and_correlation(stacks):
    fld, res = stacks
    for r in res:
        assert abs(r.total.zp - fld.zp) < 0.02           # same ADU scale as one frame
        # resampling correlates the pixels: an aperture holds more noise than SKYSIG sqrt(A)
        assert 1.05 < r.noise["APER_1"] < 1.5


def test_stack_errors_are_honest(stacks):
    _, res = stacks
    tabs = [r.table for r in res]
    base = tabs[0]
    idxs = [match_sky(np.asarray(base["ALPHA_J2000"]), np.asarray(base["DELTA_J2000"]), np.asarray(t["ALPHA_J2000"]),
                      np.asarray(t["DELTA_J2000"]), 0.5)[0] for t in tabs]
    found = np.all([i >= 0 for i in idxs], axis=0)
    for s in ("APER", "APER_1", "APER_3", "APER_5"):
        mags = np.array([np.asarray(t[f"MAG_{s}_{FILT}"])[i[found]] for t, i in zip(tabs, idxs, strict=True)])
        errs = np.array([np.asarray(t[f"MAGERR_{s}_{FILT}"])[i[found]] for t, i in zip(tabs, idxs, strict=True)])
        flags = np.array([np.asarray(t["FLAGS"])[i[found]] for t, i in zip(tabs, idxs, strict=True)])
        good = np.all(np.isfinite(mags), 0) & np.all(flags == 0, 0)
        good &= (np.median(errs, 0) > 0.02) & (np.median(errs, 0) < 0.2)
        assert good.sum() > 60
        ratio = np.sqrt(mags[:, good].var(0, ddof=1).mean() / (errs[:, good] ** 2).mean())
        assert 0.8 < ratio < 1.2, (s, ratio)


def test_stack_depth_agrees_with_the_errors(stacks):
    """UL5_1 is where the catalogue's own S/N(APER_1) of faint stars reaches 5 (the depth and
    the errors share one noise model, the weight map's)."""
    _, res = stacks
    for r in res:
        t = r.table
        mag = np.asarray(t[f"MAG_APER_1_{FILT}"], float)
        snr = np.asarray(t[f"SNR_APER_1_{FILT}"], float)
        ul5 = r.depths["APER_1"][1]
        near = np.isfinite(mag) & (np.abs(mag - ul5) < 0.5) & (np.asarray(t["FLAGS"]) == 0)
        assert near.sum() > 10
        # S/N scales as 10^(-0.4 (m - UL5)) x 5 where the sky dominates
        pred = 5 * 10 ** (-0.4 * (mag[near] - ul5))
        assert 0.85 < np.median(snr[near] / pred) < 1.1
