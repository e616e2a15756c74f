"""Stacks made with the real SWarp from synthetic singles of known truth (conftest_stack.py).

Acceptance of issue 7 measured here: noise in empty sky against the weight map, star fluxes
against the truth in the stack's units, header statistics against the inputs, errors from
Source Extractor with the stack's EGAIN and weight map, masks, one-frame visits, 45-s frames
and a 300-s exposure series.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from astropy.time import Time
from astropy.wcs import WCS

from gppy.masks import MaskBit
from gppy.naming import stack_name
from gppy.visits import FrameInfo, group_visits
from gppy_stack.coadd import make_stack
from gppy_stack.grid import grid_header
from gppy_stack.swarp import SwarpOptions

sys.path.insert(0, str(Path(__file__).parent))
from conftest_stack import aperture_sums, clean_stars, make_frames  # noqa: E402

GRID = (1500, 1100)
SHAPE = (1000, 1400)


def stack_of(truth, outdir: Path, name: str | None = None, **kw):
    g = grid_header(150.0, 2.0, GRID)
    first = truth.headers[0]

    def name_for(stats):
        return name or stack_name(first["TELESCOP"], first["OBJECT"], str(stats["DATE-OBS"]), first["FILTER"],
                                  float(stats["EXPTIME"]))

    return make_stack(truth.paths, outdir / "x.com.fits", g, settings_for_hash={"test": 1},
                      workdir=outdir / "scratch", name_for=name_for, **kw)


def load(result):
    return (fits.getdata(result.path), fits.getheader(result.path), fits.getdata(result.weight_path),
            fits.getdata(result.mask_path))


@pytest.fixture(scope="module")
def visit3(tmp_path_factory):
    """Three 60-s frames with different transparency and seeing, low sky (bright stars are
    Poisson-dominated, so the gain matters)."""
    root = tmp_path_factory.mktemp("visit3")
    truth = make_frames(root / "in", n=3, shape=SHAPE, transparency=[1.0, 0.75, 1.1], sky_e_per_s=1.5,
                        nstars=220, seed=11, mag_range=(14.3, 19.5))
    result = stack_of(truth, root / "out")
    return truth, result


def star_xy(truth, header):
    return WCS(header).all_world2pix(truth.ra, truth.dec, 0)


def empty_positions(img, x, y, step=14, clearance=30):
    """A grid of positions at least ``clearance`` px from every star."""
    ny, nx = img.shape
    gx, gy = np.meshgrid(np.arange(clearance, nx - clearance, step), np.arange(clearance, ny - clearance, step))
    gx, gy = gx.ravel(), gy.ravel()
    far = np.min(np.hypot(gx[:, None] - x[None, :], gy[:, None] - y[None, :]), axis=1) > clearance
    return gx[far], gy[far]


def test_products_are_named_after_the_stack_and_on_the_grid(visit3):
    truth, result = visit3
    img, h, w, m = load(result)
    stem = result.path.name.removesuffix(".fits")
    assert result.path.name.endswith("_m650_180.com.fits")
    assert result.weight_path.name == f"{stem}.weight.fits"     # B8: named after the stack
    assert result.mask_path.name == f"{stem}.mask.fits"
    assert img.shape == w.shape == m.shape == (GRID[1], GRID[0])
    assert img.dtype.kind == w.dtype.kind == "f" and img.dtype.itemsize == w.dtype.itemsize == 4
    assert m.dtype.kind == "i" and m.dtype.itemsize == 2  # int16 on disk, no BZERO (fitsio.write_mask)
    assert (h["CRVAL1"], h["CRVAL2"]) == (150.0, 2.0)
    assert not list((result.path.parent).glob("coadd*")) and not list(result.path.parent.glob("*.part"))


def test_noise_in_empty_sky_matches_the_weight_map(visit3):
    """Aperture sums in empty sky: their scatter against the variance the weight map predicts
    (sum of 1/w). Apertures, not single pixels, because resampling correlates neighbouring
    pixels: a single pixel's scatter is lower than its variance, an aperture's is not."""
    truth, result = visit3
    img, h, w, _ = load(result)
    x, y = star_xy(truth, h)
    gx, gy = empty_positions(img, x, y)
    yy, xx = np.mgrid[-5:6, -5:6]
    ap = xx**2 + yy**2 <= 25
    sums, preds = [], []
    for cx, cy in zip(gx, gy, strict=True):
        ws = w[cy - 5:cy + 6, cx - 5:cx + 6]
        if np.all(ws[ap] > 0):
            sums.append(img[cy - 5:cy + 6, cx - 5:cx + 6][ap].sum())
            preds.append(np.sum(1.0 / ws[ap]))
    sums, preds = np.array(sums), np.array(preds)
    assert len(sums) > 2000
    ratio = sums.std() / np.sqrt(preds.mean())
    print(f"measured: empty-sky aperture noise / weight-map prediction = {ratio:.4f} ({len(sums)} apertures)")
    # standard error of a std from n samples: 1/sqrt(2n) ~ 1.5 %; the acceptance is 10 %
    assert abs(ratio - 1.0) < 0.10, ratio
    # and the sky is removed (it would be ~80 sigma here); SWarp's mode-based background
    # estimate sits ~0.5 e- below the mean of a Poisson sky, a small fraction of the noise
    assert abs(sums.mean()) < 0.5 * sums.std()


def test_star_fluxes_match_the_truth_in_stack_units(visit3):
    truth, result = visit3
    img, h, w, m = load(result)
    assert h["STKZP"] == pytest.approx(truth.zps[0])  # units: ADU of the first frame
    x, y = star_xy(truth, h)
    expected = 10 ** (-0.4 * (truth.mag - h["STKZP"]))
    s, pred, ok = aperture_sums(img, x, y, 10, 18, 32, w)
    err = np.sqrt(pred + expected / h["EGAIN"])
    good = ok & clean_stars(m, w, x, y) & (err / expected < 0.0033)  # 3 sigma < 1 %
    assert good.sum() >= 20
    ratio = s[good] / expected[good]
    print(f"measured: {good.sum()} stars, flux/truth median {np.median(ratio):.5f}, "
          f"max |dev| {np.max(np.abs(ratio - 1)):.4f}")
    assert np.all(np.abs(ratio - 1.0) < 0.01), ratio
    assert abs(np.median(ratio) - 1.0) < 0.003


def test_flux_errors_from_weight_map_and_egain_are_honest(visit3):
    """(measured - truth) / predicted error has unit scatter, also for bright stars whose
    error is dominated by their own Poisson noise, i.e. by EGAIN."""
    truth, result = visit3
    img, h, w, m = load(result)
    x, y = star_xy(truth, h)
    expected = 10 ** (-0.4 * (truth.mag - h["STKZP"]))
    s, pred, ok = aperture_sums(img, x, y, 10, 18, 32, w)
    good = ok & clean_stars(m, w, x, y)
    chi = (s - expected) / np.sqrt(pred + expected / h["EGAIN"])
    n = good.sum()
    assert n > 100
    tol = 3.0 / np.sqrt(2 * n)
    assert abs(chi[good].std() - 1.0) < tol, chi[good].std()
    poisson = good & (expected / h["EGAIN"] > pred)
    assert poisson.sum() > 40, poisson.sum()
    chi_p = chi[poisson].std()
    print(f"measured: chi std {chi[good].std():.3f} ({n} stars), Poisson-dominated {chi_p:.3f} "
          f"({poisson.sum()} stars), EGAIN {h['EGAIN']:.4f}")
    assert abs(chi_p - 1.0) < 3.0 / np.sqrt(2 * poisson.sum()), chi_p
    # v1's gain, (2/3) N g, would mis-state these errors by more than the tolerance
    chi_v1 = ((s - expected) / np.sqrt(pred + expected / (2 / 3 * 3 * truth.gain)))[poisson].std()
    assert abs(chi_v1 - 1.0) > abs(chi_p - 1.0), (chi_v1, chi_p)


def test_source_extractor_errors_on_the_stack_are_right(visit3, tmp_path):
    """Source Extractor with the stack's EGAIN and its weight map (as an absolute variance
    map) gives flux errors that match the actual scatter against the truth."""
    truth, result = visit3
    img, h, w, m = load(result)
    var = np.where(w > 0, 1.0 / np.where(w > 0, w, 1.0), 1e30).astype(np.float32)
    fits.writeto(tmp_path / "var.fits", var, h)
    (tmp_path / "se.param").write_text("X_IMAGE\nY_IMAGE\nFLUX_APER(1)\nFLUXERR_APER(1)\nFLAGS\n")
    subprocess.run(["source-extractor", str(result.path), "-CATALOG_NAME", str(tmp_path / "se.cat"),
                    "-CATALOG_TYPE", "FITS_1.0", "-PARAMETERS_NAME", str(tmp_path / "se.param"),
                    "-FILTER", "N", "-WEIGHT_TYPE", "MAP_VAR", "-WEIGHT_IMAGE", str(tmp_path / "var.fits"),
                    "-WEIGHT_GAIN", "N", "-GAIN_KEY", "EGAIN", "-SATUR_KEY", "SATURATE", "-PHOT_APERTURES", "20",
                    "-BACK_SIZE", "128", "-BACKPHOTO_TYPE", "GLOBAL", "-DETECT_THRESH", "5",
                    "-VERBOSE_TYPE", "QUIET"], check=True, capture_output=True, cwd=tmp_path)
    cat = Table.read(tmp_path / "se.cat")
    x, y = star_xy(truth, h)
    d = np.hypot(cat["X_IMAGE"][None, :] - 1 - x[:, None], cat["Y_IMAGE"][None, :] - 1 - y[:, None])
    j = d.argmin(axis=1)
    expected = 10 ** (-0.4 * (truth.mag - h["STKZP"]))
    good = (d.min(axis=1) < 1.0) & (cat["FLAGS"][j] == 0) & clean_stars(m, w, x, y)
    chi = (cat["FLUX_APER"][j] - expected) / cat["FLUXERR_APER"][j]
    n = good.sum()
    assert n > 100
    print(f"measured: Source Extractor chi std {chi[good].std():.3f} ({n} stars)")
    assert abs(chi[good].std() - 1.0) < 3.0 / np.sqrt(2 * n) + 0.05, chi[good].std()


def test_header_statistics_are_those_of_all_inputs(visit3):
    truth, result = visit3
    h = fits.getheader(result.path)
    hs = truth.headers
    mjds = [Time(x["DATE-OBS"], format="isot", scale="utc").mjd for x in hs]
    assert h["MJD"] == pytest.approx(np.mean(mjds), abs=1e-8)
    assert h["JD"] == pytest.approx(np.mean(mjds) + 2400000.5, abs=1e-8)
    assert Time(h["DATE-OBS"], format="isot", scale="utc").mjd == pytest.approx(np.mean(mjds), abs=1e-8)
    assert h["EXPTIME"] == sum(x["EXPTIME"] for x in hs) == h["EXPOSURE"]
    assert h["AIRMASS"] == pytest.approx(np.mean([x["AIRMASS"] for x in hs]))
    assert h["CENTALT"] == pytest.approx(np.mean([x["CENTALT"] for x in hs]))
    az = np.deg2rad([x["CENTAZ"] for x in hs])  # 355, 359, 3 deg: wraps
    assert h["CENTAZ"] == pytest.approx(np.rad2deg(np.arctan2(np.sin(az).mean(), np.cos(az).mean())) % 360)
    assert h["NCOMBINE"] == 3 and h["SINGLE"] is False
    assert [h[f"IMCMB{i:03d}"] for i in (1, 2, 3)] == [p.name for p in truth.paths]
    # effective gain of three frames of the same gain, weighted by their scaled weights
    assert 2.0 * truth.gain < h["EGAIN"] <= 3.0 * truth.gain
    assert h["EGAIN"] == pytest.approx(h["SWARPGN"], rel=0.02)  # SWarp's own estimate agrees
    sky = [x["SKYVAL"] for x in hs]
    factors = [h[f"FSCL{i:03d}"] for i in (1, 2, 3)]
    assert factors == pytest.approx([10 ** (0.4 * (truth.zps[0] - zp)) for zp in truth.zps])
    assert h["SATURATE"] == pytest.approx(min(f * (60000.0 - s) for f, s in zip(factors, sky, strict=True)),
                                          rel=1e-3)
    assert h["PIPESTG"] == "stack" and h["PIPEVER"] and h["PROVIN01"] == truth.paths[0].name
    assert h["GAIN"] == 2750  # the camera setting is kept, never used as e-/ADU


def test_masks_carry_saturation_and_holes_and_cosmic_rays_do_not_leak(visit3):
    truth, result = visit3
    img, h, w, m = load(result)
    out = WCS(h)
    # the saturated star: flagged on the stack
    xs, ys = out.all_world2pix(truth.ra[-1:], truth.dec[-1:], 0)
    xs, ys = int(round(xs[0])), int(round(ys[0]))
    assert m[ys, xs] & MaskBit.SATURATED
    # outside every footprint: EDGE, weight 0, value 0
    assert m[0, 0] == MaskBit.EDGE and w[0, 0] == 0 and img[0, 0] == 0
    assert np.all(img[w == 0] == 0)
    # cosmic rays (2000-20000 ADU) are gone: each hit pixel is within the noise on the stack
    x, y = star_xy(truth, h)
    for frame, cy, cx in truth.cosmic_pixels:
        in_wcs = WCS(truth.headers[frame])
        ra, dec = in_wcs.all_pix2world([[cx, cy]], 0)[0]
        ox, oy = np.rint(out.all_world2pix([[ra, dec]], 0)[0]).astype(int)
        if np.min(np.hypot(x - ox, y - oy)) < 15 or w[oy, ox] == 0:
            continue
        assert abs(img[oy, ox]) < 6.0 / np.sqrt(w[oy, ox]), (frame, cy, cx)
    # a masked pixel that left a hole carries its bits; none where the data are valid but SATURATED
    assert np.all((m[w > 0] & ~np.uint16(MaskBit.SATURATED)) == 0)


def test_one_frame_visit_is_resampled_and_flagged(tmp_path):
    truth = make_frames(tmp_path / "in", n=1, shape=SHAPE, seed=5, nstars=150)
    result = stack_of(truth, tmp_path / "out")
    img, h, w, m = load(result)
    assert h["SINGLE"] is True and h["NCOMBINE"] == 1 and h["EXPTIME"] == 60.0
    assert img.shape == (GRID[1], GRID[0])
    assert h["EGAIN"] == pytest.approx(truth.gain, rel=1e-6)
    assert h["DATE-OBS"].startswith(truth.headers[0]["DATE-OBS"][:19])
    x, y = star_xy(truth, h)
    expected = 10 ** (-0.4 * (truth.mag - h["STKZP"]))
    s, pred, ok = aperture_sums(img, x, y, 10, 18, 32, w)
    good = ok & clean_stars(m, w, x, y)
    chi = (s - expected) / np.sqrt(pred + expected / h["EGAIN"])
    assert abs(chi[good].std() - 1.0) < 3.0 / np.sqrt(2 * good.sum())
    # the bad column of the single frame is a hole carrying the BAD bit
    assert np.any(m & MaskBit.BAD)


def test_45s_frames_and_a_300s_series_are_stacked(tmp_path):
    """v1 dropped 45-s frames (B3) and never grouped 300-s exposures (B4)."""
    t45 = make_frames(tmp_path / "in45", n=3, shape=SHAPE, exptimes=[45.0] * 3, seed=21, nstars=60)
    t300 = make_frames(tmp_path / "in300", n=3, shape=SHAPE, exptimes=[300.0] * 3, gaps_s=[25.0] * 3,
                       start="2025-01-02T05:00:00", seed=22, nstars=60)
    frames = [FrameInfo(str(p), h["OBJECT"], h["FILTER"], h["DATE-OBS"], h["EXPTIME"])
              for t in (t45, t300) for p, h in zip(t.paths, t.headers, strict=True)]
    visits = group_visits(frames, gap_s=300.0)
    assert sorted(len(v) for v in visits.values()) == [3, 3]  # start-to-start gaps of 325 s
    for truth, total in ((t45, 135), (t300, 900)):
        result = stack_of(truth, tmp_path / f"out{total}")
        h = fits.getheader(result.path)
        assert result.path.name.endswith(f"_m650_{total}.com.fits")
        assert h["EXPTIME"] == total and h["NCOMBINE"] == 3
        img, w, m = fits.getdata(result.path), fits.getdata(result.weight_path), fits.getdata(result.mask_path)
        x, y = star_xy(truth, h)
        expected = 10 ** (-0.4 * (truth.mag - h["STKZP"]))
        s, pred, ok = aperture_sums(img, x, y, 10, 18, 32, w)
        good = ok & clean_stars(m, w, x, y)
        chi = (s - expected) / np.sqrt(pred + expected / h["EGAIN"])
        assert abs(np.mean(chi[good])) < 4.0 / np.sqrt(good.sum())


def test_inputs_without_zero_point_or_wcs_are_left_out_and_recorded(tmp_path):
    truth = make_frames(tmp_path / "in", n=3, shape=SHAPE, seed=31, nstars=40)
    # frame 2 has no zero point; frame 3 has no WCS (a failed astrometry)
    with fits.open(truth.paths[1], mode="update") as hd:
        del hd[0].header["ZP_AUTO"]
    with fits.open(truth.paths[2], mode="update") as hd:
        for k in ("CTYPE1", "CTYPE2"):
            del hd[0].header[k]
    result = stack_of(truth, tmp_path / "out")
    h = fits.getheader(result.path)
    assert h["NCOMBINE"] == 1 and h["SINGLE"] is True
    assert set(result.excluded) == {str(truth.paths[1]), str(truth.paths[2])}
    history = "\n".join(str(x) for x in h["HISTORY"])
    assert truth.paths[1].name[:40] in history and "zero point" in history


def test_weight_not_zero_under_the_mask_is_corrected_not_trusted(tmp_path):
    truth = make_frames(tmp_path / "in", n=1, shape=SHAPE, seed=41, nstars=30, cosmics=50)
    wpath = truth.paths[0].with_name(truth.paths[0].name[:-5] + ".weight.fits")
    before = fits.getdata(wpath).copy()
    w = before.copy()
    w[:] = np.median(w[w > 0])  # a careless weight map: positive under cosmic rays
    fits.writeto(wpath, w, overwrite=True)
    result = stack_of(truth, tmp_path / "out")
    img, h, wout, m = load(result)
    out = WCS(h)
    in_wcs = WCS(truth.headers[0])
    for _, cy, cx in truth.cosmic_pixels:
        ra, dec = in_wcs.all_pix2world([[cx, cy]], 0)[0]
        ox, oy = np.rint(out.all_world2pix([[ra, dec]], 0)[0]).astype(int)
        assert wout[oy, ox] == 0 and m[oy, ox] & MaskBit.COSMIC_RAY
    assert np.array_equal(fits.getdata(wpath), w)  # the input itself is untouched


def test_coadding_in_chunks_gives_the_same_stack(visit3, tmp_path):
    """Deep stacks run SWarp on a few inputs at a time (bounded scratch space) and combine
    the partial coadds by their weights; that must equal one run over all inputs."""
    truth, whole = visit3
    chunked = stack_of(truth, tmp_path / "out", options=SwarpOptions(max_inputs_per_run=2))
    a, ha, wa, ma = load(whole)
    b, hb, wb, mb = load(chunked)
    assert np.array_equal(wa > 0, wb > 0) and np.array_equal(ma, mb)
    good = wa > 0
    assert np.allclose(wb[good], wa[good], rtol=1e-5)
    noise = 1.0 / np.sqrt(wa[good])
    assert np.max(np.abs(b[good] - a[good]) / noise) < 1e-3
    for key in ("EGAIN", "SATURATE", "STKZP", "EXPTIME", "MJD", "NCOMBINE"):
        assert hb[key] == ha[key]
