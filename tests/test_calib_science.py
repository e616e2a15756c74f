"""Calibration science on synthetic frames of known truth: headers, archive choice, masters,
QC, reduction with a scaled dark, the noise model, the bad-pixel mask, cosmic rays, trails.

Tolerances come from the noise of the data made here (Poisson at 0.256 e-/ADU, read noise 3 e-).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from gppy.masks import MaskBit
from gppy.tables import load_changehdr
from gppy_calib import archive, masks, reduce, trails
from gppy_calib.headers import HeaderProblem, classify, describe, normalise
from gppy_calib.masters import ClipRule, Master, make_bias, make_dark, make_flat, qc_compare

sys.path.insert(0, str(Path(__file__).parent))
from conftest_calib import (  # noqa: E402
    GAIN,
    RN_ADU,
    box_mean,
    expose,
    header,
    infos,
    make_detector,
)

SHAPE = (256, 384)
CLIP = ClipRule(3.0, 5, 64)


# ------------------------------------------------------------------ headers
@pytest.mark.parametrize("value,kind", [
    ("Light Frame", "science"), ("LIGHT", "science"), ("Light", "science"), ("OBJECT", "science"),
    ("Bias Frame", "bias"), ("zero", "bias"), ("BIAS", "bias"), ("Dark Frame", "dark"),
    ("DARK", "dark"), ("Flat Field", "flat"), ("FLAT", "flat"), ("Flat", "flat"),
])
def test_changehdr_spellings_are_classified(value, kind):
    h = header("science", 100.0, "2025-01-16T01:00:00")
    h["IMAGETYP"] = value
    hdr, _ = normalise(h, load_changehdr())
    assert classify(hdr) == kind


def test_changehdr_normalises_filters_and_keeps_the_raw_header():
    h = header("science", 100.0, "2025-01-16T01:00:00", filt="sloan_r")
    info = describe("/raw/x.fits", h, load_changehdr())
    assert info.filter == "r" and h["FILTER"] == "sloan_r"        # the input header is untouched
    assert any("FILTER" in c for c in info.changes)


@pytest.mark.parametrize("edit,reason", [
    ({"IMAGETYP": "Junk"}, "IMAGETYP"), ({"EXPTIME": None}, "EXPTIME"), ({"EXPTIME": "abc"}, "EXPTIME"),
    ({"DATE-OBS": "yesterday"}, "DATE-OBS"), ({"OBJECT": None}, "OBJECT"), ({"FILTER": None}, "FILTER"),
    ({"NAXIS": 3}, "2-D"),
])
def test_unusable_headers_are_refused_with_the_reason(edit, reason):
    h = header("science", 100.0, "2025-01-16T01:00:00")
    for key, value in edit.items():
        if value is None:
            del h[key]
        else:
            h[key] = value
    with pytest.raises(HeaderProblem, match=reason):
        describe("/raw/x.fits", h, load_changehdr())


def test_date_only_date_obs_is_completed_with_time_obs():
    h = header("bias", 0.0, "2025-01-15")
    h["TIME-OBS"] = "21:30:05"
    assert describe("/raw/b.fits", h, load_changehdr()).date_obs.startswith("2025-01-15T21:30:05")


# ------------------------------------------------------------------ archive choice
def _arch(names, kind):
    return archive.parse_listing([Path("/m") / n for n in names], kind)


def test_nearest_date_and_deterministic_ties():
    ref = archive.ArchivedMaster(Path("x"), "bias", "20250110").mjd + 0.5     # noon of 2025-01-10
    names = ["20250108-zero.fits", "20250111-zero.fits", "20250105-zero.fits", "20250110-zero.fits"]
    pick = archive.choose(_arch(names, "bias"), ref)
    assert pick.date == "20250110"
    # 20250110 and 20250111 are both 0.5 d away: the earlier wins, whatever the listing order
    tie = ["20250111-zero.fits", "20250110-zero.fits"]
    assert archive.choose(_arch(tie, "bias"), ref).date == "20250110"
    assert archive.choose(_arch(list(reversed(tie)), "bias"), ref).date == "20250110"
    assert archive.choose([], ref) is None


def test_dark_choice_prefers_date_then_exposure_time():
    names = ["100-20250110-dark.fits", "300-20250110-dark.fits", "100-20250112-dark.fits", "60-20250101-dark.fits"]
    darks = _arch(names, "dark")
    ref = darks[0].mjd + 0.4
    pick = archive.choose(darks, ref, exptime=250.0)
    assert (pick.date, pick.exptime) == ("20250110", 300.0)
    pick = archive.choose(darks, ref, exptime=200.0)          # 100 and 300 tie: the longer one
    assert pick.exptime == 300.0


def test_flat_filter_is_matched_exactly_not_as_a_substring():
    flats = _arch(["20250110-nm425.fits", "20250110-nr.fits", "readme.txt"], "flat")
    ref = flats[0].mjd
    assert archive.choose(flats, ref, filt="m42") is None               # v1's glob *nm42* matched nm425
    assert archive.choose(flats, ref, filt="m425").filter == "m425"
    assert archive.choose(flats, ref, filt="r").path.name == "20250110-nr.fits"


def test_previous_master_for_qc_is_strictly_earlier():
    zeros = _arch(["20250110-zero.fits", "20250115-zero.fits", "20250120-zero.fits"], "bias")
    ref = zeros[1].mjd
    assert archive.choose(zeros, ref, before="20250115").date == "20250110"


# ------------------------------------------------------------------ masters
@pytest.fixture(scope="module")
def det():
    return make_detector(SHAPE, seed=1, hot=[(50, 60, 5.0), (120, 200, 30.0)], dead_col=250, noisy_col=300)


@pytest.fixture(scope="module")
def bias_master(det):
    rng = np.random.default_rng(10)
    frames = [expose(det, rng, 0.0) for _ in range(9)]
    return make_bias(infos("bias", 9, 0.0), frames, np, CLIP)


def test_master_bias_matches_the_truth_within_its_noise(det, bias_master):
    m = bias_master
    good = det.noisy == 0
    r = ((m.data - det.bias) / m.error)[good]
    assert abs(float(np.mean(m.data[good] - det.bias[good]))) < 4 * RN_ADU * 1.25 / np.sqrt(9 * good.sum())
    assert 0.9 < float(np.std(r)) < 1.3            # per-pixel error from a 9-sample std
    assert m.header["NCOMBINE"] == 9 and m.header["IMCMB001"] == "bias_0.fits"
    assert m.header["RDNADU"] == pytest.approx(RN_ADU, rel=0.03)
    assert m.header["RDNOISE"] == pytest.approx(3.0, rel=0.03)
    assert m.date == "20250115" and m.header["DATE-OBS"].startswith("2025-01-15T21:04")


def test_master_dark_matches_the_true_dark_current(det, bias_master):
    rng = np.random.default_rng(20)
    t = 100.0
    frames = [expose(det, rng, t) for _ in range(7)]
    m = make_dark(infos("dark", 7, t), frames, bias_master, np, CLIP)
    truth = det.dark * t / GAIN
    good = det.noisy == 0
    r = ((m.data - truth) / m.error)[good]
    assert abs(float(np.mean(r))) < 0.05
    assert 0.9 < float(np.std(r)) < 1.35
    for y, x in [(50, 60), (120, 200)]:
        assert abs(m.data[y, x] - truth[y, x]) < 5 * m.error[y, x]
    assert m.exptime == t and m.header["EXPTIME"] == t
    with pytest.raises(ValueError, match="several exposure times"):
        make_dark(infos("dark", 2, t) + infos("dark", 1, 30.0), frames[:3], bias_master, np, CLIP)


def test_master_flat_recovers_the_response_within_half_a_percent(det, bias_master):
    rng = np.random.default_rng(30)
    dark_frames = [expose(det, rng, 100.0) for _ in range(5)]
    dark = make_dark(infos("dark", 5, 100.0), dark_frames, bias_master, np, CLIP)
    levels = [25000, 22000, 27000, 24000, 26000]
    flats = [expose(det, rng, 10.0, np.full(SHAPE, lv, np.float32)) for lv in levels]
    m = make_flat(infos("flat", 5, 10.0), flats, bias_master, {100.0: dark}, np, CLIP)
    assert m.filter == "r" and m.header["FILTER"] == "r" and m.header["FLATDARK"] == "100"
    # each frame was divided by its own median: the master's median is ~1
    assert float(np.median(m.data)) == pytest.approx(1.0, abs=0.002)
    central = (slice(64, 192), slice(96, 288))
    ratio = (m.data / det.flat)[central]
    # per pixel the noise is ~1.2 * 1.3 % / sqrt(5); averaged over 8x8 boxes well below 0.5 %
    assert np.abs(box_mean(ratio, 8) / np.median(ratio) - 1).max() < 0.005
    r = ((m.data - det.flat * np.median(m.data[central] / det.flat[central])) / m.error)[central]
    assert 0.9 < float(np.std(r)) < 1.45


def test_saturated_and_empty_flat_frames_are_left_out(det, bias_master):
    rng = np.random.default_rng(31)
    good = [expose(det, rng, 5.0, np.full(SHAPE, 25000, np.float32)) for _ in range(3)]
    burnt = expose(det, rng, 5.0, np.full(SHAPE, 80000, np.float32))
    empty = det.bias - 10.0
    frames = infos("flat", 5, 5.0)
    m = make_flat(frames, good + [burnt, empty], bias_master, {}, np, CLIP, saturate=60000.0)
    assert m.header["NCOMBINE"] == 3 and m.header["FLATDARK"] == "none"
    assert "saturation" in m.rejected[frames[3].path]
    assert "not positive" in m.rejected[frames[4].path]
    with pytest.raises(ValueError, match="no usable flat"):
        make_flat(frames[3:], [burnt, empty], bias_master, {}, np, CLIP)


def test_qc_passes_a_master_of_the_same_detector_and_fails_a_different_one(det, bias_master):
    rng = np.random.default_rng(40)
    again = make_bias(infos("bias", 9, 0.0), [expose(det, rng, 0.0) for _ in range(9)], np, CLIP)
    assert qc_compare(again, bias_master.data, bias_master.error, 0.05).ok
    # the camera's offset setting changed: 100 ADU, > 6 sigma of the difference everywhere
    changed = make_bias(infos("bias", 9, 0.0), [expose(det, rng, 0.0, offset=100.0) for _ in range(9)],
                        np, CLIP)
    qc = qc_compare(changed, bias_master.data, bias_master.error, 0.05)
    assert not qc.ok and qc.fraction > 0.9 and "FAILS" in qc.reason
    assert qc_compare(again, bias_master.data[:10], None, 0.05).ok        # other shape: not compared


# ------------------------------------------------------------------ reduction and noise model
def test_qc_of_flats_ignores_the_lamp_level_but_not_a_new_pattern(det):
    rng = np.random.default_rng(41)
    bias = make_bias(infos("bias", 5, 0.0), [expose(det, rng, 0.0) for _ in range(5)], np, CLIP)

    def flat_of(d, level):
        frames = [expose(d, rng, 5.0, np.full(SHAPE, level, np.float32)) for _ in range(5)]
        return make_flat(infos("flat", 5, 5.0), frames, bias, {}, np, CLIP)

    old = flat_of(det, 25000)
    assert qc_compare(flat_of(det, 15000), old.data, old.error, 0.05).ok
    moved = make_detector(SHAPE, seed=1, hot=[(50, 60, 5.0), (120, 200, 30.0)], dead_col=250, noisy_col=300)
    yy, xx = np.mgrid[0:SHAPE[0], 0:SHAPE[1]]
    moved.flat = (moved.flat * np.where(xx > 200, 0.85, 1.0)).astype(np.float32)   # a filter out of place
    qc = qc_compare(flat_of(moved, 25000), old.data, old.error, 0.05)
    assert not qc.ok


def _masters(det, rng, t_dark=100.0, n=9):
    bias = make_bias(infos("bias", n, 0.0), [expose(det, rng, 0.0) for _ in range(n)], np, CLIP)
    dark = make_dark(infos("dark", n, t_dark), [expose(det, rng, t_dark) for _ in range(n)], bias, np, CLIP)
    flat = make_flat(infos("flat", n, 10.0), [expose(det, rng, 10.0, np.full(det.shape, 25000, np.float32))
                                              for _ in range(n)], bias, {t_dark: dark}, np, CLIP)
    return bias, dark, flat


def test_science_reduction_scales_the_dark_to_the_exposure_time():
    det = make_detector(SHAPE, seed=2)
    det.dark[:] = 2.0                                  # a warm detector: 600 e- in 300 s
    rng = np.random.default_rng(50)
    bias, dark, flat = _masters(det, rng, t_dark=100.0)
    sky = np.full(SHAPE, 300.0, np.float32)
    raw = expose(det, rng, 300.0, sky)
    scale = reduce.dark_scale(300.0, dark.exptime)
    assert scale == 3.0
    red = reduce.reduce_frame(raw, bias.data, dark.data, scale, flat.data, np)
    assert red.dtype == np.float32
    resid = float(np.mean(red - sky))
    sigma_mean = np.sqrt((300 * GAIN + 600) / GAIN ** 2 + RN_ADU ** 2) / np.sqrt(red.size)
    assert abs(resid) < 5 * sigma_mean + 0.3            # 0.3 ADU: master noise averaged
    unscaled = reduce.reduce_frame(raw, bias.data, dark.data, 1.0, flat.data, np)
    left = float(np.mean(det.dark * 200.0 / GAIN / flat.data))       # v1 bug B5: 2/3 of the dark left in
    assert float(np.mean(unscaled - sky)) == pytest.approx(left, rel=0.01)


def test_variance_model_predicts_the_scatter_of_reduced_frames():
    det = make_detector((96, 128), seed=3)
    rng = np.random.default_rng(60)
    bias, dark, flat = _masters(det, rng, t_dark=100.0)
    sky = 400.0
    reds = np.stack([reduce.reduce_frame(expose(det, rng, 100.0, np.full(det.shape, sky, np.float32)),
                                         bias.data, dark.data, 1.0, flat.data, np) for _ in range(300)])
    var = reduce.variance_map(flat.data, dark.data, np.zeros(det.shape), np.zeros(det.shape),
                              np.zeros(det.shape), 1.0, sky, GAIN, RN_ADU, np)
    ratio = reds.var(axis=0) / var
    # 300 realisations: each pixel's variance to ~8 %; the mean ratio to ~0.5 %
    assert float(np.mean(ratio)) == pytest.approx(1.0, abs=0.02)
    # vignetting: the corners have less response, hence more variance in reduced ADU
    corner, centre = (slice(0, 16), slice(0, 16)), (slice(40, 56), slice(56, 72))
    assert var[corner].mean() > var[centre].mean() * 1.05
    assert float(np.mean(reds.var(axis=0)[corner])) == pytest.approx(float(var[corner].mean()), rel=0.05)


def test_effective_gain_and_saturation_of_the_reduced_frame():
    flat = np.full((10, 10), 1.05, np.float32)
    flat[0, 0] = 1.2
    good = np.ones((10, 10), bool)
    assert reduce.effective_gain(0.256, flat, good, np) == pytest.approx(0.256 * 1.05)
    bias = np.full((10, 10), 500.0, np.float32)
    dark = np.zeros((10, 10), np.float32)
    sat = reduce.reduced_saturation(60000.0, bias, dark, 1.0, flat, good, np)
    assert sat == pytest.approx((60000.0 - 500.0) / 1.2)         # the most responsive pixel
    good[0, 0] = False
    assert reduce.reduced_saturation(60000.0, bias, dark, 1.0, flat, good, np) == pytest.approx(59500 / 1.05)


# ------------------------------------------------------------------ masks
def test_bad_pixel_mask_flags_dead_hot_and_noisy_pixels(det):
    rng = np.random.default_rng(70)
    bias, dark, flat = _masters(det, rng)
    bad = masks.master_bad_pixels(np, bias.data, bias.error, dark.data, dark.error, 100.0, flat.data,
                                  flat.error, GAIN, bias_ncombine=9)
    assert bad.dtype == np.uint16
    is_bad = bad == int(MaskBit.BAD)
    assert is_bad[:, 250].all()               # dead column (response 0.2)
    assert is_bad[50, 60] and is_bad[120, 200]  # hot pixels (5 and 30 e-/s)
    assert is_bad[:, 300].all()               # noisy column (60 ADU extra read noise), as a whole
    normal = np.ones(SHAPE, bool)
    normal[:, [250, 300]] = False
    normal[50, 60] = normal[120, 200] = False
    assert is_bad[normal].mean() < 1e-3


def test_weight_is_inverse_variance_and_zero_where_masked():
    var = np.full((4, 5), 4.0, np.float32)
    var[0, 0] = np.nan
    var[0, 1] = 0.0
    mask = np.zeros((4, 5), np.uint16)
    mask[3, 3] = int(MaskBit.COSMIC_RAY)
    w = masks.weight_map(np, var, mask)
    assert w.dtype == np.float32
    assert w[1, 1] == pytest.approx(0.25)
    assert w[0, 0] == 0 and w[0, 1] == 0 and w[3, 3] == 0


def _star_field(shape, rng, n=150, fwhm=4.0):
    ny, nx = shape
    img = np.zeros(shape, np.float32)
    s = fwhm / 2.3548
    yy, xx = np.mgrid[0:ny, 0:nx]
    for _ in range(n):
        x, y, f = rng.uniform(10, nx - 10), rng.uniform(10, ny - 10), 10 ** rng.uniform(3, 5.3)
        sl = (slice(max(0, int(y) - 15), int(y) + 16), slice(max(0, int(x) - 15), int(x) + 16))
        img[sl] += (f / (2 * np.pi * s * s) * np.exp(-((xx[sl] - x) ** 2 + (yy[sl] - y) ** 2) / (2 * s * s)))
    return img


def test_cosmic_rays_are_flagged_and_stars_are_not():
    rng = np.random.default_rng(80)
    shape = (512, 640)
    sky = 200.0
    stars = _star_field(shape, rng)
    signal = sky + stars
    var_bg = np.full(shape, sky / GAIN + RN_ADU ** 2, np.float32)
    image = (signal + rng.normal(0, 1, shape) * np.sqrt(var_bg + stars / GAIN)).astype(np.float32)
    cr = np.zeros(shape, np.float32)
    for _ in range(120):                       # short tracks of 1-5 pixels, 300-6000 e- per pixel
        x0, y0 = rng.uniform(0, shape[1] - 1), rng.uniform(0, shape[0] - 1)
        length, ang = rng.exponential(2.0), rng.uniform(0, np.pi)
        q = np.exp(rng.uniform(np.log(300), np.log(6000))) / GAIN
        for f in np.linspace(0, 1, int(2 * length) + 2):
            x, y = int(round(x0 + f * length * np.cos(ang))), int(round(y0 + f * length * np.sin(ang)))
            if 0 <= x < shape[1] and 0 <= y < shape[0]:
                cr[y, x] += q / (int(2 * length) + 2)
    image += cr
    hit = cr > 0
    snr5 = hit & (cr / np.sqrt(var_bg) > 5)
    found = masks.cosmic_ray_mask(np, image, var_bg, sky, np.zeros(shape, bool), GAIN, RN_ADU * GAIN, 60000.0)
    assert (found & snr5).sum() >= 0.95 * snr5.sum()
    near_hit = np.zeros(shape, bool)
    ys, xs = np.nonzero(hit)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            near_hit[np.clip(ys + dy, 0, shape[0] - 1), np.clip(xs + dx, 0, shape[1] - 1)] = True
    false = found & ~near_hit
    assert false.sum() <= 1e-4 * found.size
    # bright unsaturated star cores are not cosmic rays
    peaks = stars > 50 * np.sqrt(var_bg)
    assert (found & peaks & ~near_hit).sum() == 0


def _trail_frame(shape, rng, peak_snr, angle_deg, fwhm=4.0, with_stars=True):
    ny, nx = shape
    sigma = 25.0
    img = rng.normal(1000.0, sigma, shape).astype(np.float32)
    if with_stars:
        img += _star_field(shape, rng, n=200)
    a = np.radians(angle_deg)
    yy, xx = np.mgrid[0:ny, 0:nx]
    dist = (xx - nx * 0.4) * np.sin(a) - (yy - ny * 0.55) * np.cos(a)
    prof = (peak_snr * sigma * np.exp(-0.5 * (dist / (fwhm / 2.3548)) ** 2)).astype(np.float32)
    return img + prof, prof, sigma


@pytest.mark.parametrize("peak_snr,angle", [(12.0, 17.0), (6.0, 71.0), (8.0, 135.0), (6.0, 90.0)])
def test_trail_pixels_are_flagged(peak_snr, angle):
    rng = np.random.default_rng(int(peak_snr * 10 + angle))
    img, prof, sigma = _trail_frame((768, 1024), rng, peak_snr, angle)
    found, found_trails = trails.detect_trails(img, sigma, np.zeros(img.shape, bool))
    assert len(found_trails) == 1
    hit5 = prof > 5 * sigma
    assert (found & hit5).sum() >= 0.95 * hit5.sum()
    # few false flags: nearly every flagged pixel holds trail light above 0.25 sigma
    assert (found & (prof < 0.25 * sigma)).sum() <= 0.15 * found.sum()


def test_no_trail_no_flag_even_with_bad_columns_masked():
    rng = np.random.default_rng(90)
    img, _, sigma = _trail_frame((768, 1024), rng, 0.0, 0.0)
    masked = np.zeros(img.shape, bool)
    img[:, 300] += 500.0                       # a hot column, masked as BAD upstream
    masked[:, 300] = True
    found, found_trails = trails.detect_trails(img, sigma, masked)
    assert found_trails == [] and not found.any()


def test_master_dataclass_holds_header_values():
    m = Master("bias", np.zeros((2, 2), np.float32), np.zeros((2, 2), np.float32))
    assert m.kind == "bias" and isinstance(m.header, fits.Header)
