"""Reference choice (v1 rules), grid comparison, reprojection, and a subtraction against a
reference of another pixel scale and orientation."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

sys.path.insert(0, str(Path(__file__).parent))
from conftest_subtract import acceptance_failures, evaluate, linear_fwhm, render, simulate_pair  # noqa: E402

from gppy.masks import MaskBit  # noqa: E402
from gppy_subtract.engine import EngineParams, Plane, subtract  # noqa: E402
from gppy_subtract.reference import (  # noqa: E402
    choose_reference,
    find_reference,
    grid_offset,
    noise_from_image,
    parse_reference_name,
    pixel_area_ratio,
    reproject_to_grid,
    same_grid,
)


def tan_wcs(shape, scale_arcsec, rot_deg=0.0, crval=(150.0, 2.0), crpix=None):
    h, w = shape
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = list(crval)
    wcs.wcs.crpix = list(crpix) if crpix is not None else [(w + 1) / 2.0, (h + 1) / 2.0]
    s = scale_arcsec / 3600.0
    c, sn = np.cos(np.radians(rot_deg)), np.sin(np.radians(rot_deg))
    wcs.wcs.cd = np.array([[-s * c, s * sn], [s * sn, s * c]])
    return wcs


def test_v1_choice_rules():
    names = [
        "ref_PS1_T09373_00000000_000000_r_0.fits",
        "ref_7DT_T09373_20241117_190933_r_2300.com.fits",
        "ref_7DT_T09373_20241001_010101_r_1200.com.fits",
        "ref_7DT_T09373_20241117_190933_r_2300.com.weight.fits",
        "ref_7DT_T09373_20241117_190933_r_2300.com.mask.fits",
        "ref_7DT_T093730_20241117_190933_r_2300.com.fits",     # other object (no substring match)
        "ref_7DT_T09373_20241117_190933_m650_2300.com.fits",   # other filter
        "ref_7DT_T09373mask_20241117_190933_r_2300.com.fits",  # 'mask' in the name: never
    ]
    # first 7DT reference in sorted order wins
    assert choose_reference(names, "T09373", "r") == "ref_7DT_T09373_20241001_010101_r_1200.com.fits"
    ps1_only = [n for n in names if "7DT" not in n]
    assert choose_reference(ps1_only, "T09373", "r") == "ref_PS1_T09373_00000000_000000_r_0.fits"
    # PS1 needs the trailing _0
    assert choose_reference(["ref_PS1_T09373_00000000_000000_r_1.fits"], "T09373", "r") is None
    assert choose_reference(names, "T0937", "r") is None
    assert choose_reference(names, "T09373", "g") is None
    assert parse_reference_name("ref_7DT_T09373_20241117_190933_r_2300.com.noise.fits") is None
    f = parse_reference_name("ref_7DT_T00138_20241117_190933_m650_2300.com.fits")
    assert (f.survey, f.obj, f.filt, f.rest) == ("7DT", "T00138", "m650", "2300.com")


def test_find_reference_in_the_filter_folder(tmp_path):
    assert find_reference(tmp_path, "T1", "r") is None
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "ref_PS1_T1_00000000_000000_r_0.fits").write_bytes(b"")
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "ref_7DT_T1_20240101_000000_g_60.com.fits").write_bytes(b"")
    assert find_reference(tmp_path, "T1", "r") == tmp_path / "r" / "ref_PS1_T1_00000000_000000_r_0.fits"
    (tmp_path / "r" / "ref_7DT_T1_20240101_000000_r_60.com.fits").write_bytes(b"")
    assert find_reference(tmp_path, "T1", "r").name == "ref_7DT_T1_20240101_000000_r_60.com.fits"


def test_same_grid_and_area_ratio():
    a = tan_wcs((400, 600), 0.505)
    assert same_grid(a, (400, 600), tan_wcs((400, 600), 0.505), (400, 600))
    shifted = tan_wcs((400, 600), 0.505, crpix=(300.5 + 0.2, 200.5))
    assert grid_offset(a, (400, 600), shifted) == pytest.approx(0.2, abs=1e-3)
    assert not same_grid(a, (400, 600), shifted, (400, 600))
    assert not same_grid(a, (400, 600), a, (400, 601))
    assert pixel_area_ratio(a, tan_wcs((10, 10), 0.25, rot_deg=40)) == pytest.approx((0.505 / 0.25) ** 2, rel=1e-9)


def test_noise_of_a_reference_without_weight_map():
    rng = np.random.default_rng(2)
    data = rng.normal(0, 7.0, (300, 300)).astype(np.float32)
    data[:, :20] = 0.0                       # no data (survey gap): exactly 0, as v1 masks it
    data[5, 50] = np.nan
    var, mask = noise_from_image(data)
    assert np.all(mask[:, :20] & int(MaskBit.EDGE)) and mask[5, 50] & int(MaskBit.NONFINITE)
    assert np.sqrt(var[mask == 0][0]) == pytest.approx(7.0, rel=0.03)
    h = fits.Header({"SKYSIG": 3.0})
    var2, _ = noise_from_image(data, h)
    assert np.allclose(var2[mask == 0], 9.0)
    assert np.all(var2[mask != 0] == 0)


def test_reprojection_conserves_flux_and_propagates_mask():
    # a reference at 0.3"/px rotated by 35 deg, onto a 0.505"/px grid
    out_shape = (200, 260)
    w_out = tan_wcs(out_shape, 0.505)
    in_shape = (420, 420)
    w_in = tan_wcs(in_shape, 0.3, rot_deg=35.0)
    xs = np.array([60.3, 130.7, 200.2])
    ys = np.array([50.5, 100.1, 150.8])
    xi, yi = w_in.world_to_pixel_values(*w_out.pixel_to_world_values(xs, ys))
    fw_in = 3.5 * 0.505 / 0.3
    data = render(in_shape, np.asarray(xi), np.asarray(yi), np.array([1000.0, 2000.0, 3000.0]),
                  np.full(3, fw_in)).astype(np.float32)
    var = np.full(in_shape, 4.0, np.float32)
    mask = np.zeros(in_shape, np.uint16)
    mask[200:203, 100:103] = int(MaskBit.SATURATED)
    d, v, m = reproject_to_grid(data, var, mask, w_in, w_out, out_shape, band=64)
    truth = render(out_shape, xs, ys, np.array([1000.0, 2000.0, 3000.0]), np.full(3, 3.5))
    for x, y in zip(xs, ys, strict=True):
        sl = (slice(int(y) - 15, int(y) + 16), slice(int(x) - 15, int(x) + 16))
        assert d[sl].sum() == pytest.approx(truth[sl].sum(), rel=0.01)
    f = (0.505 / 0.3) ** 2
    assert np.allclose(v[m == 0], 4.0 * f, rtol=1e-4)
    # the masked input block lands inside the output, masked (BAD) with a 1-pixel margin
    xo, yo = w_out.world_to_pixel_values(*w_in.pixel_to_world_values(101.0, 201.0))
    assert m[int(np.round(yo)), int(np.round(xo))] & int(MaskBit.BAD)
    assert np.all(d[m != 0] == 0) and np.all(v[m != 0] == 0)
    # the output's corners (83" from the centre) lie outside the rotated input (63" half-size)
    for corner in (m[0, 0], m[0, -1], m[-1, 0], m[-1, -1]):
        assert corner == int(MaskBit.EDGE)
    assert m[100, 130] == 0


@pytest.fixture(scope="module")
def rotated_pair():
    """Science on a 0.505"/px grid; the reference on a 0.6"/px grid rotated by 30 degrees."""
    shape = (900, 1200)
    w_sci = tan_wcs(shape, 0.505)
    ref_shape = (1300, 1300)
    w_ref = tan_wcs(ref_shape, 0.6, rot_deg=30.0, crval=(150.0 + 5 / 3600, 2.0 - 4 / 3600))

    def to_ref(x, y):
        xr, yr = w_ref.world_to_pixel_values(*w_sci.pixel_to_world_values(x, y))
        return np.asarray(xr), np.asarray(yr)

    pair = simulate_pair(seed=11, shape=shape, n_stars=1700, sci_fwhm=linear_fwhm(4.4, shape=shape),
                         ref_fwhm=linear_fwhm(3.0, shape=shape),
                         ref_grid={"shape": ref_shape, "to_ref": to_ref, "pix_ratio": 0.6 / 0.505})
    return pair, w_sci, w_ref


def test_subtraction_against_a_rotated_reference_of_another_scale(rotated_pair):
    pair, w_sci, w_ref = rotated_pair
    assert not same_grid(w_sci, pair.sci.data.shape, w_ref, pair.ref.data.shape)
    d, v, m = reproject_to_grid(pair.ref.data, pair.ref.var, pair.ref.mask, w_ref, w_sci, pair.sci.data.shape)
    f = pixel_area_ratio(w_sci, w_ref)
    s = pair.sci
    res = subtract(Plane(s.data, s.var, s.mask, s.egain, s.saturate),
                   Plane(d, v, m, pair.ref.egain / f, pair.ref.saturate * f), np, EngineParams(nregions=(2, 2)))
    assert res.convolved == "reference"
    # flux is conserved by the reprojection: the kernel sum is still 1 / ref_scale
    assert res.kernel_sum == pytest.approx(1.0 / pair.ref_scale, rel=0.01)
    ev = evaluate(pair, res.diff, res.noise, res.mask, convolved=res.convolved)
    assert acceptance_failures(ev) == []
