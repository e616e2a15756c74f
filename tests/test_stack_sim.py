"""Nightly stacks of a simulated night (gppy.sim), measured against the simulator's truth.

The calib, astrometry and phot stages are stood in for by the truth (conftest_stack.py:
calibrate_sim_night): calibrated singles with the true TPV WCS and zero point, weight maps and
masks. The stack stage then works as in production (sky grid and stack size from the
simulator's path.json, the service's own visit builder, the real SWarp). Visits are the
simulator's: 3 x 100 s of a tile, 3 x 300 s of the same tile, 3 x 100 s of a named field and
one 45-s frame of it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.time import Time
from astropy.wcs import WCS

from gppy.config import load_settings
from gppy.naming import ProductDirs
from gppy_stack.grid import parse_radec, read_skygrid
from gppy_stack.service import StackService

sys.path.insert(0, str(Path(__file__).parent))
from conftest_stack import (  # noqa: E402
    calibrate_sim_night,
    measure_sim_stars,
    simulate_fixed_targets,
    trail_distance,
)


@pytest.fixture(scope="module")
def night(tmp_path_factory):
    root = tmp_path_factory.mktemp("simnight")
    pj = simulate_fixed_targets(root / "sim", "2025-01-15", 5, None, size=(1536, 1024), targets=2,
                                filters=["m650"], calib=False, transients=False, references=False,
                                star_density=20000.0)
    frames = calibrate_sim_night(pj)
    truth = json.loads((pj.parent / "truth" / "night.json").read_text())
    svc = StackService(load_settings(config=str(pj), log_json=False))
    stacks = {}
    for v in truth["visits"]:
        fs = [f for f in frames if f.visit == v["index"]]
        record = {"unit": truth["unit"], "object": v["target"], "filter": v["filter"],
                  "night_dir": truth["night_dir"], "visit": f"sim{v['index']}"}
        stacks[v["index"]] = (fs, svc.build_visit_stack(record, [str(f.calib) for f in fs]))
    return pj, truth, svc, stacks


def test_every_simulated_visit_is_stacked_on_its_grid(night):
    pj, truth, svc, stacks = night
    grid = read_skygrid(svc.paths.skygrid)
    assert len(stacks) == 4
    for index, (frames, result) in stacks.items():
        v = truth["visits"][index]
        h = fits.getheader(result.path)
        assert (h["NAXIS1"], h["NAXIS2"]) == tuple(truth["stack_size"])
        assert h["NCOMBINE"] == len(frames) and h["SINGLE"] == (len(frames) == 1)
        assert result.path.name.endswith(f"_{v['filter']}_{int(v['exptime'] * len(frames))}.com.fits")
        assert result.path.parent == ProductDirs.of(svc.paths.path_processed, v["target"], truth["unit"],
                                                    v["filter"]).base
        if v["target"].startswith("T"):
            tile = grid.tile(v["target"])
            assert h["GRIDSRC"] == "skygrid" and (h["CRVAL1"], h["CRVAL2"]) == pytest.approx((tile.ra, tile.dec))
        else:
            ra, dec = parse_radec(frames[0].header["OBJCTRA"], frames[0].header["OBJCTDEC"])
            assert h["GRIDSRC"] == "objctradec" and (h["CRVAL1"], h["CRVAL2"]) == pytest.approx((ra, dec))
    exptimes = sorted((v["exptime"], len(v["frames"])) for v in truth["visits"])
    assert exptimes == [(45.0, 1), (100.0, 3), (100.0, 3), (300.0, 3)]


def test_noise_in_empty_sky_matches_the_weight_map(night):
    pj, truth, svc, stacks = night
    for _index, (frames, result) in stacks.items():
        img, h, w = fits.getdata(result.path), fits.getheader(result.path), fits.getdata(result.weight_path)
        st = frames[0].stars
        x, y = WCS(h).all_world2pix(st["ra"], st["dec"], 0)
        flux = 10 ** (-0.4 * (np.asarray(st["mag"]) - h["STKZP"]))
        ny, nx = img.shape
        gx, gy = np.meshgrid(np.arange(40, nx - 40, 13), np.arange(40, ny - 40, 13))
        gx, gy = gx.ravel(), gy.ravel()
        sigma_ap = np.sqrt(np.pi * 25 / np.median(w[w > 0]))
        # clear of every star that would add more than 5 % of the aperture noise, and of trails
        bright = flux > 0.05 * sigma_ap
        reach = 15 + 10 * np.log10(np.clip(flux[bright] / sigma_ap, 1, None))
        near = np.any(np.hypot(gx[:, None] - x[bright][None, :], gy[:, None] - y[bright][None, :])
                      < reach[None, :], axis=1)
        ra, dec = WCS(h).all_pix2world(gx, gy, 0)
        on_trail = np.any([trail_distance(f, ra, dec) < 40 for f in frames], axis=0)
        keep = ~near & ~on_trail
        yy, xx = np.mgrid[-5:6, -5:6]
        ap = xx**2 + yy**2 <= 25
        sums, preds = [], []
        for cx, cy in zip(gx[keep], gy[keep], strict=True):
            ws = w[cy - 5:cy + 6, cx - 5:cx + 6]
            if np.all(ws[ap] > 0):
                sums.append(img[cy - 5:cy + 6, cx - 5:cx + 6][ap].sum())
                preds.append(np.sum(1.0 / ws[ap]))
        sums, preds = np.array(sums), np.array(preds)
        assert len(sums) > 300
        clipped = np.abs(sums - np.median(sums)) < 5 * np.sqrt(preds)  # stray faint stars
        ratio = sums[clipped].std() / np.sqrt(preds[clipped].mean())
        print(f"measured: {result.path.name}: empty-sky noise / prediction = {ratio:.3f} "
              f"({clipped.sum()} apertures)")
        assert abs(ratio - 1.0) < 0.10, (result.path.name, ratio)


def test_star_fluxes_match_the_truth_in_stack_units(night):
    pj, truth, svc, stacks = night
    ratios, chis = [], []
    for _index, (frames, result) in stacks.items():
        s, expected, err, clean, h = measure_sim_stars(frames, result)
        assert h["STKZP"] == pytest.approx(frames[0].truth["zp_adu"])
        bright = clean & (err / expected < 0.0033)  # 3 sigma < 1 %
        ratios.append(s[bright] / expected[bright])
        chi = (s - expected) / err
        chis.append(chi[clean])
        print(f"measured: {result.path.name}: {clean.sum()} clean stars, chi std {chi[clean].std():.3f}, "
              f"{bright.sum()} at S/N > 300, flux/truth median {np.median(s[bright] / expected[bright]):.4f}")
    ratios = np.concatenate(ratios)
    chis = np.concatenate(chis)
    assert len(ratios) >= 10
    assert np.all(np.abs(ratios - 1.0) < 0.01), ratios
    # errors from the weight map and EGAIN describe the scatter of all clean stars
    assert abs(chis.std() - 1.0) < 3.0 / np.sqrt(2 * len(chis)) + 0.05, chis.std()


def test_header_statistics_are_those_of_the_inputs(night):
    pj, truth, svc, stacks = night
    for _index, (frames, result) in stacks.items():
        h = fits.getheader(result.path)
        raw = [fits.getheader(f.raw) for f in frames]
        mjd = np.mean([Time(r["DATE-OBS"], format="isot", scale="utc").mjd for r in raw])
        assert h["MJD"] == pytest.approx(mjd, abs=1e-8) and h["JD"] == pytest.approx(mjd + 2400000.5, abs=1e-8)
        assert Time(h["DATE-OBS"], format="isot", scale="utc").mjd == pytest.approx(mjd, abs=1e-8)
        assert h["EXPTIME"] == sum(r["EXPTIME"] for r in raw)
        for key in ("AIRMASS", "CENTALT"):
            assert h[key] == pytest.approx(np.mean([r[key] for r in raw]))
        az = np.deg2rad([r["CENTAZ"] for r in raw])
        assert h["CENTAZ"] == pytest.approx(np.rad2deg(np.arctan2(np.sin(az).mean(), np.cos(az).mean())) % 360)
        loc = np.mean([Time(r["DATE-LOC"], format="isot").mjd for r in raw])
        assert Time(h["DATE-LOC"], format="isot").mjd == pytest.approx(loc, abs=2e-8)
        assert h["EGAIN"] == pytest.approx(h["SWARPGN"], rel=0.02)
        assert h["GAIN"] == 2750 and h["FILTER"] == "m650" and h["OBJECT"] == frames[0].header["OBJECT"]
        assert [h[f"IMCMB{i + 1:03d}"] for i in range(len(frames))] == [f.calib.name for f in frames]
