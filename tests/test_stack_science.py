"""The stack stage's science modules on small data made in the test (no SWarp, no bus)."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits
from astropy.time import Time
from astropy.wcs import WCS

from gppy.masks import MaskBit
from gppy_stack import deep, header, maskmap, scaling
from gppy_stack.grid import (
    builtin_skygrid,
    grid_header,
    parse_radec,
    read_skygrid,
    stack_centre,
)


def write_skygrid(path, rows):
    """A sky-grid file in the 7DS format: BinTable (id K, ra D, dec D, tile 6A)."""
    cols = [fits.Column("id", "K", array=[r[0] for r in rows]),
            fits.Column("ra", "D", array=[r[1] for r in rows]),
            fits.Column("dec", "D", array=[r[2] for r in rows]),
            fits.Column("tile", "6A", array=[f"T{r[0]:05d}" for r in rows])]
    fits.HDUList([fits.PrimaryHDU(), fits.BinTableHDU.from_columns(cols)]).writeto(path)


# ---------------------------------------------------------------------- grid
def test_skygrid_reads_the_7ds_format_and_finds_tiles(tmp_path):
    rows = [(0, 0.0, -90.0), (1, 0.0, -89.1509434), (9614, 213.75, -12.5), (28519, 0.0, 30.5660377)]
    write_skygrid(tmp_path / "skygrid.fits", rows)
    grid = read_skygrid(tmp_path / "skygrid.fits")
    assert len(grid) == 4
    assert "T09614" in grid
    t = grid.tile("T09614")
    assert (t.ra, t.dec) == (213.75, -12.5)
    assert grid.tile("T12345") is None
    assert grid.nearest(213.9, -12.3).name == "T09614"
    assert grid.nearest(359.9, -89.9).name == "T00000"


def test_skygrid_without_the_columns_is_refused(tmp_path):
    cols = [fits.Column("name", "6A", array=["T00001"]), fits.Column("x", "D", array=[1.0])]
    fits.HDUList([fits.PrimaryHDU(), fits.BinTableHDU.from_columns(cols)]).writeto(tmp_path / "bad.fits")
    with pytest.raises(ValueError, match="id, ra, dec, tile"):
        read_skygrid(tmp_path / "bad.fits")
    with pytest.raises(ValueError):
        read_skygrid(tmp_path / "missing.fits")


def test_builtin_skygrid_is_the_default():
    grid = read_skygrid(None)
    assert grid.source == "built-in"
    assert grid.tile("T90001").ra == 150.0
    assert len(builtin_skygrid()) == len(grid)


def test_stack_centre_tile_named_field_and_fallbacks():
    grid = builtin_skygrid()
    h = fits.Header({"OBJCTRA": "10 00 30.0", "OBJCTDEC": "+02 30 00", "RA": 1.0, "DEC": 2.0})
    c = stack_centre("T90001", h, grid)
    assert (c.ra, c.dec, c.source, c.tile) == (150.0, 2.0, "skygrid", "T90001")
    c = stack_centre("NGC1566", h, grid)
    assert c.source == "objctradec"
    assert c.ra == pytest.approx(150.125, abs=1e-9) and c.dec == pytest.approx(2.5, abs=1e-9)
    c = stack_centre("T00042", h, grid)  # a tile the table does not know: its OBJCTRA/DEC
    assert c.source == "objctradec"
    c = stack_centre("NGC1566", fits.Header({"RA": 64.0, "DEC": -54.9}), grid)
    assert (c.ra, c.dec, c.source) == (64.0, -54.9, "radec")
    with pytest.raises(ValueError):
        stack_centre("NGC1566", fits.Header(), grid)


@pytest.mark.parametrize("ra,dec,expected", [
    ("10 00 00.0", "+02 00 00", (150.0, 2.0)),
    ("10:00:00", "-02:30:00", (150.0, -2.5)),
    (150.0, 2.0, (150.0, 2.0)),
    ("23 59 59.9", "-89 59 59", (359.99958333, -89.99972222)),
])
def test_parse_radec(ra, dec, expected):
    got = parse_radec(ra, dec)
    assert got == pytest.approx(expected, abs=1e-6)


def test_parse_radec_refuses_garbage():
    with pytest.raises(ValueError):
        parse_radec("abc", "+02 00 00")
    with pytest.raises(ValueError):
        parse_radec(10.0, 95.0)


def test_grid_header_geometry():
    h = grid_header(213.75, -12.5, (10200, 6800), 0.505)
    w = WCS(h)
    assert (h["NAXIS1"], h["NAXIS2"]) == (10200, 6800)
    # the tile centre is the grid's centre (1-based (N+1)/2)
    x, y = w.wcs_world2pix([[213.75, -12.5]], 1)[0]
    assert (x, y) == pytest.approx((5100.5, 3400.5), abs=1e-6)
    scales = np.abs(np.diag(w.pixel_scale_matrix)) * 3600
    assert scales == pytest.approx([0.505, 0.505], rel=1e-12)
    # east left: RA decreases with x
    ra1 = w.wcs_pix2world([[100, 3400]], 1)[0][0]
    ra2 = w.wcs_pix2world([[200, 3400]], 1)[0][0]
    assert ra1 > ra2
    # footprint of v1's grid: about 1.43 x 0.95 deg
    assert 10200 * 0.505 / 3600 == pytest.approx(1.431, abs=1e-3)


# ---------------------------------------------------------------------- scaling
def test_plan_scaling_brings_inputs_to_the_first_frames_zero_point():
    plan = scaling.plan_scaling([25.0, 25.5, 24.0], [60, 60, 60])
    assert plan.method == "zp" and plan.zp == 25.0 and plan.used == [0, 1, 2]
    # a star of magnitude m gives 10**(-0.4 (m - ZP_i)) ADU in frame i; times f_i it is the same
    m = 18.0
    scaled = [10 ** (-0.4 * (m - zp)) * f for zp, f in zip([25.0, 25.5, 24.0], plan.factors, strict=True)]
    assert scaled == pytest.approx([10 ** (-0.4 * (m - 25.0))] * 3, rel=1e-12)


def test_plan_scaling_leaves_out_frames_without_zero_point():
    plan = scaling.plan_scaling([None, 25.2, 25.0], [60, 60, 60])
    assert plan.used == [1, 2] and plan.reference == 1 and plan.zp == 25.2
    assert 0 in plan.excluded


def test_plan_scaling_by_exposure_time_when_no_zero_point():
    plan = scaling.plan_scaling([None, None], [60, 300])
    assert plan.method == "exptime" and plan.zp is None
    assert plan.factors == pytest.approx([1.0, 0.2])
    with pytest.raises(ValueError):
        scaling.plan_scaling([None], [0.0])
    with pytest.raises(ValueError):
        scaling.plan_scaling([], [])


def test_zero_point_reads_zp_auto():
    assert scaling.zero_point(fits.Header({"ZP_AUTO": 26.1})) == 26.1
    assert scaling.zero_point(fits.Header({"ZP_AUTO": 0.0})) is None
    assert scaling.zero_point(fits.Header({"ZP_AUTO": "nan"})) is None
    assert scaling.zero_point(fits.Header()) is None


def test_effective_gain_of_equal_frames_is_n_times_gain():
    assert scaling.effective_gain([0.256] * 4, [1.0] * 4, [0.01] * 4) == pytest.approx(4 * 0.256)


def test_effective_gain_matches_a_monte_carlo_weighted_mean():
    """Poisson variance of a scaled, weighted mean of electrons counted at gain g_i."""
    rng = np.random.default_rng(3)
    gains = np.array([0.25, 0.3, 0.2])
    factors = np.array([1.0, 0.7, 1.6])
    weights = np.array([0.02, 0.01, 0.03])  # ADU^-2 in each frame's own units
    s = 5000.0  # source in stack units
    wprime = weights / factors**2
    adu = rng.poisson((s / factors * gains)[:, None] * np.ones((3, 200000))) / gains[:, None]
    mean = np.sum(wprime[:, None] * adu * factors[:, None], axis=0) / wprime.sum()
    measured_gain = s / mean.var()
    assert scaling.effective_gain(gains, factors, weights) == pytest.approx(measured_gain, rel=0.02)


def test_saturation_level_is_the_lowest_scaled_level_above_sky():
    assert scaling.saturation_level([60000, 60000], [1000, 3000], [1.0, 2.0]) == pytest.approx(59000.0)
    assert scaling.saturation_level([60000, 60000], [1000, 3000], [1.0, 0.5]) == pytest.approx(28500.0)


# ---------------------------------------------------------------------- header
def _hdr(date_obs, exptime, airmass, alt, az, loc):
    return fits.Header({"DATE-OBS": date_obs, "EXPTIME": exptime, "AIRMASS": airmass, "CENTALT": alt,
                        "CENTAZ": az, "DATE-LOC": loc, "FILTER": "m650", "OBJECT": "T00001", "GAIN": 2750,
                        "EGAIN": 0.256})


def test_stack_statistics_are_means_and_sums_of_all_inputs():
    hs = [_hdr("2025-01-02T03:00:00", 45.0, 1.10, 60.0, 358.0, "2025-01-01T23:00:00"),
          _hdr("2025-01-02T03:01:00", 45.0, 1.20, 58.0, 2.0, "2025-01-01T23:01:00"),
          _hdr("2025-01-02T03:05:00", 300.0, 1.30, 56.0, 6.0, "2025-01-01T23:05:00.500")]
    st = header.stack_statistics(hs)
    mjds = [Time(h["DATE-OBS"], format="isot", scale="utc").mjd for h in hs]
    assert st["MJD"] == pytest.approx(np.mean(mjds), abs=1e-9)
    assert st["JD"] == pytest.approx(np.mean(mjds) + 2400000.5, abs=1e-9)
    assert Time(st["DATE-OBS"], format="isot").mjd == pytest.approx(np.mean(mjds), abs=1e-8)
    assert st["EXPTIME"] == 390.0 and st["NCOMBINE"] == 3
    assert st["AIRMASS"] == pytest.approx(1.2) and st["CENTALT"] == pytest.approx(58.0)
    assert st["CENTAZ"] == pytest.approx(2.0, abs=1e-9)  # not (358+2+6)/3 = 122
    assert st["DATE-LOC"] == "2025-01-01T23:02:00.167"
    mids = [m + t / 2 / 86400 for m, t in zip(mjds, [45, 45, 300], strict=True)]
    assert st["MJD-MID"] == pytest.approx(np.average(mids, weights=[45, 45, 300]), abs=1e-9)


def test_build_stack_header_units_inputs_and_flags():
    hs = [_hdr("2025-01-02T03:00:00", 60.0, 1.1, 60.0, 10.0, "2025-01-01T23:00:00")]
    g = grid_header(150.0, 2.0, (100, 80))
    h = header.build_stack_header(g, hs, ["/x/calib_a.fits"], egain=0.256, saturate=59000.0, zp=25.0,
                                  factors=[1.0], reference="/x/calib_a.fits", combine="WEIGHTED",
                                  resampling="LANCZOS3", single=True, visit="T00001_m650_20250102_030000")
    assert h["SINGLE"] is True and h["NCOMBINE"] == 1 and h["IMCMB001"] == "calib_a.fits"
    assert h["EGAIN"] == 0.256 and h["SATURATE"] == 59000.0 and h["STKZP"] == 25.0
    assert h["GAIN"] == 2750 and h["FILTER"] == "m650" and h["CTYPE1"] == "RA---TAN"
    assert "NAXIS1" not in h


# ---------------------------------------------------------------------- mask map
def test_project_mask_bits_follows_the_wcs():
    out_h = grid_header(150.0, 2.0, (300, 200))
    out_w = WCS(out_h)
    in_w = WCS(grid_header(150.0, 2.0, (200, 150)))
    in_w.wcs.crpix = [in_w.wcs.crpix[0] + 10.0, in_w.wcs.crpix[1] - 5.0]  # input shifted
    mask = np.zeros((150, 200), np.uint16)
    mask[40, 60] = MaskBit.COSMIC_RAY
    mask[100, 20:25] = MaskBit.SATURATED
    carried = np.zeros((200, 300), np.uint16)
    n = maskmap.project_mask_bits(mask, in_w, out_w, carried)
    assert n == 6
    # expected output position of input pixel (x=60, y=40) through the two WCSs
    ra, dec = in_w.wcs_pix2world([[60, 40]], 0)[0]
    ox, oy = np.rint(out_w.wcs_world2pix([[ra, dec]], 0)[0]).astype(int)
    assert carried[oy, ox] == MaskBit.COSMIC_RAY
    assert np.count_nonzero(carried) == 6


def test_stack_mask_keeps_saturation_on_valid_pixels_and_everything_on_holes():
    weight = np.ones((20, 20), np.float32)
    weight[:, :3] = 0.0          # outside the footprint
    weight[10, 10] = 0.0         # a hole left by a cosmic ray in the only input
    carried = np.zeros((20, 20), np.uint16)
    carried[10, 10] = MaskBit.COSMIC_RAY
    carried[5, 15] = MaskBit.SATURATED | MaskBit.TRAIL
    m = maskmap.stack_mask(weight, carried, radius=1)
    assert m[10, 10] == MaskBit.COSMIC_RAY
    assert m[10, 11] == 0              # grown CR bit dropped where the data are valid
    assert m[5, 15] == MaskBit.SATURATED and m[6, 16] == MaskBit.SATURATED  # grown by 1
    assert m[5, 17] == 0
    assert np.all(m[:, :3] == MaskBit.EDGE)
    assert m.dtype == np.uint16


def test_dilate_bits_is_a_square_or():
    a = np.zeros((9, 9), np.uint16)
    a[4, 4] = 1
    a[0, 0] = 4
    d = maskmap.dilate_bits(a, 2)
    assert np.all(d[2:7, 2:7] & 1) and not np.any(d[1, :] & 1) and not np.any(d[:, 7] & 1)
    assert np.all(d[:3, :3] & 4) and (d[3, 3] & 4) == 0


# ---------------------------------------------------------------------- deep selection
def _cand(i, night, seeing, depth, zp=25.0):
    return deep.Candidate(path=f"/p/calib_{i}.fits", night=night, date_obs=f"2025-01-{i + 1:02d}T03:00:00",
                          exptime=60.0, zp=zp, seeing=seeing, depth=depth)


def test_select_frames_by_seeing_depth_and_nights():
    cands = [_cand(0, "2025-01-01", 2.0, 19.0), _cand(1, "2025-01-02", 3.0, 19.5),
             _cand(2, "2025-01-03", 2.5, 20.0), _cand(3, "2025-01-04", 4.0, 18.0),
             _cand(4, "2025-01-05", 1.8, 20.5, zp=None)]
    chosen, rejected = deep.select_frames(cands, "all")
    assert [c.path for c in chosen] == [f"/p/calib_{i}.fits" for i in range(4)]
    assert "ZP_AUTO" in rejected["/p/calib_4.fits"]
    chosen, _ = deep.select_frames(cands, "seeing")
    assert sorted(c.seeing for c in chosen) == [2.0, 2.5]   # median of 2, 3, 2.5, 4 is 2.75
    chosen, _ = deep.select_frames(cands, "depth")
    assert sorted(c.depth for c in chosen) == [19.5, 20.0]  # median 19.25
    chosen, rejected = deep.select_frames(cands, "all", nights=["20250102", "2025-01-03_gain2750"])
    assert [c.night for c in chosen] == ["2025-01-02", "2025-01-03"]
    with pytest.raises(ValueError):
        deep.select_frames(cands, "best")


def test_night_of_a_frame():
    assert deep.night_of(fits.Header({"DATE-LOC": "2025-01-02T02:30:00", "DATE-OBS": "2025-01-02T06:30:00"})) \
        == "2025-01-01"
    assert deep.night_of(fits.Header({"DATE-OBS": "2025-01-02T01:00:00"})) == "2025-01-01"
    assert deep.night_of(fits.Header({"DATE-OBS": "2025-01-02T23:30:00"})) == "2025-01-02"
    assert deep.normalise_night("7DT07_2024-04-23_gain2750") == "2024-04-23"
    with pytest.raises(ValueError):
        deep.normalise_night("last week")


def test_deep_names():
    assert deep.reference_name("T09614", "2024-04-23T02:07:57.5", "r", 3600.0) == \
        "ref_7DT_T09614_20240423_020757_r_3600.com.fits"
    assert deep.deep_stack_name("T09614", "2024-04-23T02:07:57", "m650", 1234.5) == \
        "calib_7DT_T09614_20240423_020757_m650_1234.5.com.fits"
    assert deep.is_single_name("calib_7DT07_T09614_20240423_020757_m650_45.fits")
    assert deep.is_single_name("calib_7DT07_T09614_20240423_020757_m650_0.5.fits")
    assert not deep.is_single_name("calib_7DT07_T09614_20240423_020757_m650_45.weight.fits")
    assert not deep.is_single_name("calib_7DT07_T09614_20240423_020757_m650_135.com.fits")
