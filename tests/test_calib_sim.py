"""Acceptance of issue 5 on a simulated night (gppy.sim), against the simulator's truth.

One night (2 targets x 3 filters x 3 frames, a 3 x 300 s visit and a 45 s frame; biases,
100 s and 300 s darks and flats) is calibrated once by :class:`NightCalibrator`; the masters,
reduced frames, masks and weights are then compared with the true bias, dark current, flat
response, the noise-free signal (rendered from the truth tables) and the truth masks.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from gppy.masks import MaskBit
from gppy.naming import ProductDirs, calib_name, flag_of, weight_of

sys.path.insert(0, str(Path(__file__).parent))
from conftest_calib import (  # noqa: E402
    box_mean,
    calibrator,
    checksums,
    frame_truth,
    night_dir,
    sim_night,
    truth_mask,
    truth_signal,
    write_config,
)

GAIN = 0.256


@pytest.fixture(scope="module")
def night(tmp_path_factory):
    root = sim_night(tmp_path_factory, "calib-night", seed=5, calib=True, references=False)
    ndir = night_dir(root)
    before = checksums(ndir)
    tmp = tmp_path_factory.mktemp("calib-sim")
    cfg = write_config(tmp, root)
    cal = calibrator(cfg)
    res = cal.prepare(ndir)
    products = {job.info.path: (job, cal.reduce(job)) for job in res.jobs}
    truth = json.loads((root / "truth" / "night.json").read_text())
    return {"root": root, "ndir": ndir, "before": before, "tmp": tmp, "cal": cal, "res": res,
            "products": products, "truth": truth, "mframe": tmp / "mframe" / "7DT01"}


def _offsets(root: Path, pattern: str) -> float:
    return float(np.mean([json.loads(p.read_text())["bias_offset_adu"]
                          for p in (root / "truth" / "frames").glob(f"*{pattern}*.json")]))


def _master(path: Path):
    with fits.open(path) as h:
        return h[0].data.astype(np.float32), h["ERR"].data.astype(np.float32), h[0].header


def test_every_science_frame_is_planned_and_nothing_rejected(night):
    res, truth = night["res"], night["truth"]
    science = [f for f in truth["frames"] if f["kind"] == "science"]
    assert len(res.jobs) == len(science) and not res.rejected and not res.borrowed
    # visits: per (OBJECT, FILTER), a new one after a gap > 300 s from the end of an exposure;
    # every exposure time takes part (the 45 s frame joins the 100 s visit it follows)
    expected = 0
    by_target: dict = {}
    for f in sorted(science, key=lambda f: f["date_obs"]):
        by_target.setdefault((f["object"], f["filter"]), []).append(f)
    from astropy.time import Time

    for group in by_target.values():
        end = None
        for f in group:
            start = Time(f["date_obs"]).unix
            if end is None or start - end > 300:
                expected += 1
            end = start + f["exptime"]
    assert len({job.visit for job in res.jobs}) == expected
    names = sorted(p.name for p in night["mframe"].rglob("*.fits"))
    date = res.jobs[0].bias.date
    assert f"{date}-zero.fits" in names
    assert any(n == f"100-{date}-dark.fits" for n in names) and any(n.startswith("300-") for n in names)
    for filt in truth["filters"]:
        assert any(n.endswith(f"-n{filt}.fits") for n in names)


def test_master_headers_carry_provenance(night):
    for path in night["mframe"].rglob("*.fits"):
        _, err, h = _master(path)
        assert h["NCOMBINE"] >= 5 and h["IMCMB001"].startswith("7DT01_") and "PIPEVER" in h
        assert h["MASTTYPE"] in ("bias", "dark", "flat") and h["DATE-OBS"].startswith("2025-01-1")
        assert "EXPTIME" in h and h["FILENAME"] == path.name and err.shape == (1024, 1536)
        if h["MASTTYPE"] == "flat":
            assert path.name == f"{h['MASTDATE']}-n{h['FILTER']}.fits"


def test_master_bias_matches_the_true_bias_within_its_noise(night):
    root = night["root"]
    data, err, h = _master(next((night["mframe"] / "zero").glob("*.fits")))
    true = fits.getdata(root / "truth" / "calib" / "bias.fits") + _offsets(root, "BIAS")
    good = ~(truth_mask(root, Path(h["IMCMB001"]).name) & 8).astype(bool)       # not a bad column
    r = ((data - true) / err)[good]
    assert abs(float(np.mean(r))) < 0.03
    assert 0.9 < float(np.std(r)) < 1.35          # err from a 7-sample std: Student-like tails
    # the mean bias level to its standard error (read noise 11.7 ADU, 7 frames, 1.5 Mpx)
    assert abs(float(np.mean((data - true)[good]))) < 5 * 11.72 * 1.25 / np.sqrt(7 * good.sum())
    assert h["RDNADU"] == pytest.approx(3.0 / GAIN, rel=0.03)


@pytest.mark.parametrize("exptime", [100.0, 300.0])
def test_master_darks_match_the_true_dark_current(night, exptime):
    root = night["root"]
    data, err, h = _master(next((night["mframe"] / "dark").glob(f"{int(exptime)}-*.fits")))
    current = fits.getdata(root / "truth" / "calib" / "dark_current.fits")
    true = current * exptime / GAIN + (_offsets(root, f"DARK_m425_1x1_{exptime:.1f}s") - _offsets(root, "BIAS"))
    bias = fits.getdata(root / "truth" / "calib" / "bias.fits")
    usable = (bias + current * exptime / GAIN * 1.1 < 60000)         # not saturated in the raw darks
    normal = usable & (current < 0.5)
    r = ((data - true) / err)[normal]
    assert abs(float(np.mean(r))) < 0.05
    assert 0.9 < float(np.std(r)) < 1.35
    hot = usable & (current >= 0.5)
    assert np.mean(np.abs((data - true) / err)[hot] < 5) > 0.95
    assert h["EXPTIME"] == exptime


def test_master_flats_recover_the_true_response_within_half_a_percent(night):
    root = night["root"]
    for filt in night["truth"]["filters"]:
        data, err, h = _master(next((night["mframe"] / "flat").glob(f"*-n{filt}.fits")))
        true = fits.getdata(root / "truth" / "calib" / f"flat_{filt}.fits")
        ny, nx = data.shape
        c = (slice(ny // 4, 3 * ny // 4), slice(nx // 4, 3 * nx // 4))
        ratio = data[c] / true[c]
        ratio /= np.median(ratio)
        # per pixel the noise of 5 flats at ~25000 ADU is ~0.7 %; 16 x 16 boxes average it away
        assert np.abs(box_mean(ratio, 16) - 1).max() < 0.005
        r = (data[c] - true[c] * np.median(data[c] / true[c])) / err[c]
        assert 0.9 < float(np.std(r)) < 1.5       # err from a 5-sample std
        assert h["FILTER"] == filt and h["FLATDARK"] == "100"


def _reduced(night, raw: str):
    job, prod = night["products"][raw]
    data = fits.getdata(prod.image)
    head = fits.getheader(prod.image)
    weight = fits.getdata(prod.weight)
    mask = fits.getdata(prod.mask)
    return job, prod, data, head, weight, mask


def test_reduced_frames_match_the_truth_within_the_expected_noise(night):
    root = night["root"]
    bias_off = _offsets(root, "BIAS")
    for raw, (job, _) in night["products"].items():
        _, _, data, head, weight, mask = _reduced(night, raw)
        name = Path(raw).name
        truth, untrue = truth_signal(root, name, data.shape)
        tj = frame_truth(root, name)
        flat = fits.getdata(job.flat.path)
        ok = (mask == 0) & ~untrue & (weight > 0)
        # expected noise: the weight (background) plus the sources' own Poisson noise
        var = 1.0 / weight[ok] + np.maximum(truth[ok] - tj["sky_adu"], 0) / head["EGAIN"]
        resid = data[ok] - truth[ok] - (tj["bias_offset_adu"] - bias_off) / flat[ok]
        r = resid / np.sqrt(var)
        assert abs(float(np.mean(r))) < 0.05, name
        assert 0.9 < float(np.std(r)) < 1.1, name
        assert np.mean(np.abs(r) > 5) < 1e-4, name


def test_cosmic_rays_are_flagged_with_few_false_flags(night):
    root = night["root"]
    hits = found = false = total = 0
    for raw in night["products"]:
        job, _, data, head, weight, mask = _reduced(night, raw)
        name = Path(raw).name
        tm = truth_mask(root, name)
        truth, _ = truth_signal(root, name, data.shape)
        cr_true = (tm & 1).astype(bool)
        sigma = np.sqrt(1.0 / np.median(weight[weight > 0]))
        # a hit pixel's S/N: its excess over the noise-free signal, in background sigmas
        snr5 = cr_true & ((data - truth) / sigma > 5) & ~(tm & 4).astype(bool) & ((mask & 3) == 0)
        flagged = (mask & int(MaskBit.COSMIC_RAY)).astype(bool)
        near = cr_true.copy()
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                near |= np.roll(np.roll(cr_true, dy, 0), dx, 1)
        hits += int(snr5.sum())
        found += int((flagged & snr5).sum())
        false += int((flagged & ~near).sum())
        total += flagged.size
        assert head["NCRPIX"] == int(flagged.sum())
    assert hits > 1000
    assert found >= 0.95 * hits
    assert false < 2e-5 * total


def test_satellite_trails_are_flagged(night):
    root = night["root"]
    with_trail = set(night["truth"]["trail_frames"])
    assert with_trail
    for raw in night["products"]:
        _, _, data, head, weight, mask = _reduced(night, raw)
        name = Path(raw).name
        flagged = (mask & int(MaskBit.TRAIL)).astype(bool)
        if name not in with_trail:
            assert not flagged.any() and head["NTRAIL"] == 0, name
            continue
        t = frame_truth(root, name)["trail"]
        from gppy.sim.render import line_profile

        prof = line_profile(data.shape, tuple(t["point0_0based"]), tuple(t["point1_0based"]), t["fwhm_px"]) * t["peak_adu"]
        sigma = np.sqrt(1.0 / np.median(weight[weight > 0]))
        snr5 = prof / sigma > 5
        assert (flagged & snr5).sum() >= 0.95 * snr5.sum(), name
        assert (flagged & (truth_mask(root, name) & 2 == 0)).sum() <= 0.15 * flagged.sum(), name
        assert head["NTRAIL"] == 1


def test_bad_and_saturated_pixels_are_flagged(night):
    root = night["root"]
    for raw in list(night["products"])[:4]:
        _, _, data, head, weight, mask = _reduced(night, raw)
        tm = truth_mask(root, Path(raw).name)
        bad_true = (tm & (8 | 16)).astype(bool)
        bad = (mask & int(MaskBit.BAD)).astype(bool)
        assert bad[bad_true].mean() > 0.99
        assert bad[~bad_true].mean() < 1e-3
        sat_true = (tm & 4).astype(bool)
        assert (mask[sat_true] & int(MaskBit.SATURATED)).all()
        assert (weight[mask != 0] == 0).all() and (weight[mask == 0] > 0).all()


def test_products_names_headers_and_provenance(night):
    root = night["root"]
    for raw, (job, prod) in night["products"].items():
        info = job.info
        base = ProductDirs.of(night["tmp"] / "processed", info.object, "7DT01", info.filter).base
        assert prod.image == base / calib_name("7DT01", info.object, info.date_obs, info.filter, info.exptime)
        assert prod.weight == weight_of(prod.image) and prod.mask == flag_of(prod.image)
        with fits.open(prod.image) as h:
            assert h[0].data.dtype == np.dtype(">f4")
            hd = h[0].header
        assert fits.getdata(prod.mask).dtype == np.dtype(">i2") and fits.getdata(prod.weight).dtype == np.dtype(">f4")
        flat = fits.getdata(job.flat.path)
        assert hd["EGAIN"] == pytest.approx(GAIN * np.median(flat), rel=0.01)
        assert hd["EGAINRAW"] == GAIN and hd["GAIN"] == 2750
        assert hd["RDNOISE"] == pytest.approx(3.0, rel=0.03)
        assert 50000 < hd["SATURATE"] < 60000
        assert hd["DARKSCAL"] == pytest.approx(info.exptime / hd["DARKEXP"])
        assert hd["DARKEXP"] == (300.0 if info.exptime == 300.0 else 100.0)
        for kw in ("BIAS", "DARK", "FLAT"):
            assert Path(getattr(job, kw.lower()).path).name == hd[f"{kw}FILE"] and hd[f"{kw}BORR"] is False
        assert hd["CALBORR"] == "none" and hd["PIPESTG"] == "calib" and hd["PROVIN01"] == Path(raw).name
        assert hd["IMAGETYP"] == "object"                       # changehdr.dat applied
        assert hd["OBJECT"] == info.object and hd["DATE-OBS"].startswith(info.date_obs[:19])
        assert "BZERO" not in hd and hd["BUNIT"] == "ADU"
        assert frame_truth(root, Path(raw).name)["exptime"] == hd["EXPTIME"]


def test_raw_files_are_never_modified(night):
    assert checksums(night["ndir"]) == night["before"]
