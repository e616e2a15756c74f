"""The banded one-pass reduction (gppy_calib.frame) against the whole-frame formulas of
gppy_calib.reduce / masks / trails, the windowed cosmic-ray search at the frame's border, and
the in-place patching of the written products."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits

from gppy.masks import MaskBit
from gppy_calib import frame, masks, reduce, trails
from gppy_calib.night import _patch_header, _patch_pixels, _write_image

GAIN = 0.256
RN_ADU = 3.0 / GAIN
SAT = 60000.0


def _masters(shape, rng, rn_adu=RN_ADU, dark_rate=0.3):
    """Masters with a dead pixel, a NaN, a dead column and a hot pixel; without read noise the
    dark is exactly ``dark_rate`` and has no error."""
    ny, nx = shape
    bias = (500.0 + rng.normal(0, 2.0, shape)).astype(np.float32)
    dark = np.full(shape, dark_rate, np.float32)
    if rn_adu:
        dark += rng.normal(0, 0.05, shape).astype(np.float32)
    flat = (1.0 + 0.05 * rng.standard_normal(shape)).astype(np.float32)
    flat[5, 7] = 0.0                   # dead pixel: reduced value not finite
    flat[9, 2] = np.nan                # non-finite master
    flat[:, nx // 3] *= 0.3            # dead column: BAD
    dark[11, 13] = 500.0               # hot pixel: BAD
    errs = [np.full(shape, v, np.float32) for v in (rn_adu / 3, 0.2 if rn_adu else 0.0, 0.002)]
    bad = masks.master_bad_pixels(np, bias, errs[0], dark, errs[1], 100.0, flat, errs[2], GAIN, 9)
    return bias, dark, flat, errs, bad


def _raw(bias, dark, flat, rng, sky=800.0, n_cr=40):
    shape = bias.shape
    sig = np.full(shape, sky, np.float32)
    ys, xs = rng.integers(0, shape[0], n_cr), rng.integers(0, shape[1], n_cr)
    sig[ys, xs] += rng.uniform(2000, 20000, n_cr).astype(np.float32)      # cosmic-ray hits
    e = rng.poisson(np.maximum(np.nan_to_num(sig * flat) * GAIN, 0)).astype(np.float32)
    raw = np.rint(e / GAIN + bias + dark * 1.0 + rng.normal(0, RN_ADU, shape)).astype(np.float32)
    raw[3, 4] = SAT + 100.0                                                   # saturated
    raw[20, 30] = np.nan                                                      # a lost pixel
    return raw


def _reference(raw, bias, dark, flat, errs, bad):
    """Whole-frame reduction, mask, variance and weight (the formulas of reduce/masks)."""
    red = reduce.reduce_frame(raw, bias, dark, 1.0, flat, np)
    mask = bad | masks.saturation_mask(np, raw, SAT)
    nonfinite = ~np.isfinite(red)
    mask = mask | np.where(nonfinite, np.uint16(int(MaskBit.NONFINITE)), np.uint16(0))
    red = np.where(nonfinite, np.float32(0), red)
    sky = reduce.subgrid_median(red, mask == 0, np)
    var = reduce.variance_map(flat, dark, errs[0], errs[1], errs[2], 1.0, sky, GAIN, RN_ADU, np)
    return red, mask, sky, var, masks.weight_map(np, var, mask)


@pytest.mark.parametrize("shape,band_rows,rn_adu", [((203, 150), 64, RN_ADU), ((130, 97), 128, 0.0)])
def test_banded_pass_equals_the_whole_frame_formulas(shape, band_rows, rn_adu):
    rng = np.random.default_rng(3)
    bias, dark, flat, errs, bad = _masters(shape, rng, rn_adu=rn_adu, dark_rate=0.3 if rn_adu else 0.0)
    raw = _raw(bias, dark, flat, rng)
    red, mask, sky, var, weight = _reference(raw, bias, dark, flat, errs, bad)

    terms = frame.frame_terms(bias, dark, flat, *errs, bad, 1.0, GAIN, rn_adu, np)
    assert terms.regular == (rn_adu > 0)         # without read noise or dark, var can be 0: slow path
    if rn_adu == 0:                              # the reference must use the same terms then
        var = reduce.variance_map(flat, dark, *errs, 1.0, sky, GAIN, 0.0, np)
        weight = masks.weight_map(np, var, mask)
    stats = frame.frame_statistics(raw, terms, SAT, np, background=True)
    assert stats.sky == pytest.approx(sky, rel=1e-6)
    out = frame.FrameBuffers.empty(shape)
    fp = frame.reduce_pass(raw, terms, stats, SAT, GAIN, out, np, cosmic_rays=True, satellite_trails=True,
                           workers=2, band_rows=band_rows)

    np.testing.assert_allclose(out.image_be, red, rtol=2e-6, atol=1e-4)
    assert np.array_equal(out.mask_be.astype(np.uint16), mask)
    np.testing.assert_allclose(out.weight_be, weight, rtol=2e-6, atol=0)
    assert fp.counts["bad"] == int(np.count_nonzero(mask & int(MaskBit.BAD)))
    assert fp.counts["saturated"] == int(np.count_nonzero(mask & int(MaskBit.SATURATED)))
    assert fp.counts["nonfinite"] == int(np.count_nonzero(mask & int(MaskBit.NONFINITE)))

    # cosmic-ray candidates: the same as on the whole frame (the bands' halos are exact)
    cy, cx = masks.cosmic_ray_candidates(np, red, var, mask != 0, sky, GAIN)
    assert cy.size > 10
    assert set(zip(fp.cr_y.tolist(), fp.cr_x.tolist(), strict=True)) == set(zip(cy.tolist(), cx.tolist(), strict=True))

    # binned S/N of the trail search: block sums of the residual over the unmasked pixels
    # that are not candidates, against their variance
    residual, good = trails.residual_image(red, mask != 0)
    good[cy, cx] = False
    np.testing.assert_allclose(fp.binned, trails.block_snr(residual, var, good), rtol=1e-4, atol=1e-4)
    snr = trails.snr_image(red, np.sqrt(var), mask != 0)
    snr[cy, cx] = 0

    # the lazily evaluated S/N of the trail search reads the same values
    px = frame.PixelSNR(out.image_be, terms, stats, out.mask_be, np, exclude=(cy, cx))
    ys, xs = rng.integers(0, shape[0], 500), rng.integers(0, shape[1], 500)
    np.testing.assert_allclose(px[ys, xs], snr[ys, xs], rtol=1e-5, atol=1e-5)


def test_group_medians_are_numpy_medians():
    rng = np.random.default_rng(4)
    key = rng.integers(0, 40, 5000)
    key[key == 7] = 8                                                   # an empty group
    v = rng.normal(0, 3, key.size).astype(np.float32)
    med, count = trails._group_medians(key, v, 45)
    for k in range(45):
        sel = key == k
        assert count[k] == sel.sum()
        if sel.any():
            assert med[k] == pytest.approx(float(np.median(v[sel])), abs=1e-5)
        else:
            assert np.isnan(med[k])


def test_cosmic_rays_on_the_border_and_in_corners_are_flagged():
    rng = np.random.default_rng(5)
    shape = (120, 160)
    sky = 300.0
    var = np.full(shape, sky / GAIN + RN_ADU ** 2, np.float32)
    image = (sky + rng.normal(0, 1, shape) * np.sqrt(var)).astype(np.float32)
    spots = [(0, 50), (119, 80), (60, 0), (40, 159), (0, 0), (119, 159), (1, 1), (118, 2)]
    for y, x in spots:
        image[y, x] += 3000.0 / GAIN
    found = masks.cosmic_ray_mask(np, image, var, sky, np.zeros(shape, bool), GAIN, RN_ADU * GAIN, SAT)
    for y, x in spots:
        assert found[y, x], (y, x)
    assert found.sum() <= 3 * len(spots)


def test_products_are_patched_in_place(tmp_path):
    rng = np.random.default_rng(6)
    data = rng.normal(0, 1, (40, 50)).astype(">f4")
    hdr = fits.Header()
    hdr["NCRPIX"] = (0, "pixels flagged COSMIC_RAY")
    hdr["NTRAIL"] = (0, "trails found")
    path = tmp_path / "a.fits"
    on_disk = _write_image(path, data, hdr)
    data[3, 4] = 0.0
    data[10, 20] = 0.0
    _patch_pixels(path, on_disk, data, np.array([3, 10]), np.array([4, 20]))
    final = hdr.copy()
    final["NCRPIX"] = 123456
    final["NTRAIL"] = 2
    _patch_header(path, on_disk, final, ("NCRPIX", "NTRAIL"), data)
    with fits.open(path) as h:
        assert h[0].header["NCRPIX"] == 123456 and h[0].header["NTRAIL"] == 2
        assert h[0].header.comments["NCRPIX"] == "pixels flagged COSMIC_RAY"
        assert np.array_equal(h[0].data, data)
    # a value that no longer fits the header's size: the file is written again
    final["NTRAIL"] = ("x" * 70 + "y" * 3000, "long")
    _patch_header(path, on_disk, final, ("NTRAIL",), data)
    with fits.open(path) as h:
        assert h[0].header["NTRAIL"].endswith("y" * 3000)
        assert np.array_equal(h[0].data, data)


def test_products_written_early_and_patched_equal_products_written_last(tmp_path):
    """The files written before the cosmic-ray and trail searches and patched after are the
    files written once everything is known (pixels and headers)."""
    from gppy.config import PathConfig, Settings
    from gppy.tables import load_changehdr
    from gppy.xp import get_xp
    from gppy_calib.headers import describe
    from gppy_calib.night import Job, MasterRef, NightCalibrator
    from gppy_calib.rawio import write_master

    rng = np.random.default_rng(7)
    shape = (300, 420)
    bias, dark, flat, errs, _ = _masters(shape, rng)
    raw = _raw(bias, dark * 100.0, flat, rng, n_cr=60)
    raw[150:153, :] += 400.0                                  # a trail along a row
    raw = np.nan_to_num(raw, nan=500.0)
    h = fits.Header()
    for k, v in {"IMAGETYP": "Light Frame", "EXPTIME": 100.0, "DATE-OBS": "2025-01-15T21:40:00",
                 "FILTER": "m425", "OBJECT": "T00001", "EGAIN": GAIN}.items():
        h[k] = v
    raw_path = tmp_path / "raw.fits"
    fits.PrimaryHDU(np.clip(raw, 0, 65535).astype(np.uint16), h).writeto(raw_path)
    mroot = tmp_path / "mframe" / "7DT01"
    refs = {}
    for kind, data, err, name, extra in (("bias", bias, errs[0], "zero/20250115-zero.fits", {"NCOMBINE": 9}),
                                         ("dark", dark * 100.0, errs[1] * 100, "dark/100-20250115-dark.fits",
                                          {"NCOMBINE": 9, "EXPTIME": 100.0}),
                                         ("flat", flat, errs[2], "flat/20250115-nm425.fits", {"NCOMBINE": 9})):
        mh = fits.Header()
        for k, v in extra.items():
            mh[k] = v
        refs[kind] = write_master(mroot / name, data, err, mh)
    paths = PathConfig(path_base=tmp_path / "factory", path_processed=tmp_path / "processed",
                       path_mframe=tmp_path / "mframe")
    info = describe(str(raw_path), fits.getheader(raw_path), load_changehdr())
    files = {}
    for early in (True, False):
        cal = NightCalibrator(Settings(gpu="off"), paths, "7DT01", get_xp("off"))
        cal.write_early = early
        job = Job(info, tmp_path / f"out_{early}" / "calib.fits", "v1", MasterRef("bias", refs["bias"], "20250115"),
                  MasterRef("dark", refs["dark"], "20250115", exptime=100.0),
                  MasterRef("flat", refs["flat"], "20250115", filter="m425"))
        prod = cal.reduce(job)
        assert prod.ncr > 20 and prod.ntrail == 1
        files[early] = [fits.open(p) for p in (prod.image, prod.weight, prod.mask)]
    for a, b in zip(files[True], files[False], strict=True):
        assert np.array_equal(a[0].data, b[0].data)
        ha, hb = a[0].header, b[0].header
        assert [k for k in ha if k != "HISTORY"] == [k for k in hb if k != "HISTORY"]
        for key in ("NCRPIX", "NTRAIL", "NTRLPIX", "NBADPIX", "NSATPIX"):
            assert ha.get(key) == hb.get(key)
    image, weight, mask = files[True]
    assert image[0].header["NCRPIX"] == int(np.count_nonzero(mask[0].data & int(MaskBit.COSMIC_RAY)))
    assert image[0].header["NTRLPIX"] == int(np.count_nonzero(mask[0].data & int(MaskBit.TRAIL)))
    assert (weight[0].data[mask[0].data != 0] == 0).all() and (weight[0].data[mask[0].data == 0] > 0).all()
