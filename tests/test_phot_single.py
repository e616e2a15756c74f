"""Photometry of single frames against the truth of synthetic frames (real Source Extractor).

Truth: stars of known total flux rendered with a Moffat PSF, so the flux inside an aperture
of radius R is the total flux times the PSF's encircled energy EE(R); the zero point of
aperture k must therefore be ZP_true + 2.5 log10 EE(R_k).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from gppy.fitsio import BadInputError
from gppy_phot import sextractor
from gppy_phot import synthetic as syn
from gppy_phot.apertures import SUFFIXES, ZP_KEYS
from gppy_phot.photometry import PhotParams, photometer

_spec = importlib.util.spec_from_file_location("conftest_phot", Path(__file__).with_name("conftest_phot.py"))
cp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cp)

NREAL = 6
FILT = "m650"


def run_phot(tmp: Path, fld, image, mask=None, ref=None, **kw):
    path, wpath, _ = cp.write_frame(tmp, fld, image, mask=mask, **kw)
    header = fits.getheader(path)
    ref = syn.reference_table(fld) if ref is None else ref
    return photometer(path, header, image, mask, wpath, ref, "synthetic.csv", tmp / "work", PhotParams())


@pytest.fixture(scope="module")
def field():
    return syn.make_field(1000, 1000, nstars=1000, seed=11, fwhm_arcsec=2.3, beta=3.0)


@pytest.fixture(scope="module")
def realisations(field, tmp_path_factory):
    """The same field measured in NREAL independent noise realisations."""
    model = syn.noiseless_image(field)
    out = []
    for i in range(NREAL):
        img = syn.add_noise(model, field.gain, field.rdnoise, np.random.default_rng(100 + i))
        out.append(run_phot(tmp_path_factory.mktemp(f"real{i}"), field, img))
    return out


def test_zero_points_match_truth(field, realisations):
    """Every aperture's ZP within 0.02 mag of ZP_true + 2.5 log10 EE(R) (and its quoted error
    is consistent with the scatter between realisations)."""
    for res in realisations:
        for s in SUFFIXES[1:]:
            r = res.apertures.diameters[s] / 2
            expected = field.zp + 2.5 * np.log10(cp.pixel_ee(r, field.fwhm_px, field.beta))
            assert abs(res.zps[s].zp - expected) < 0.02, (s, res.zps[s].zp, expected)
            assert 0 < res.zps[s].ezp < 0.02
        # MAG_AUTO: Kron apertures hold >~ 90 % of the flux of a Moffat(3) star
        assert -0.12 < res.zps["AUTO"].zp - field.zp < 0.0
        # total-flux zero point from the curve of growth: the truth (the stamps of the synthetic
        # stars hold 99.6 % of an infinite Moffat(3), hence +0.004 expected)
        assert abs(res.total.zp - field.zp) < 0.02, res.total
        assert abs(res.total.zp - field.zp) < 3 * res.total.ezp + 0.005
    zp1 = np.array([r.zps["APER_3"].zp for r in realisations])
    ezp1 = np.array([r.zps["APER_3"].ezp for r in realisations])
    # ZP error honest to a factor of ~2 with 6 realisations (chi2 with 5 dof is wide)
    assert 0.3 < zp1.std(ddof=1) / np.median(ezp1) < 2.5


def test_seeing_from_matched_stars(field, realisations):
    for res in realisations:
        assert res.seeing.method == "psf-fit"
        assert res.seeing.nstars >= 10
        # the Moffat FWHM fitted to the stars' profiles (the synthetic PSF is integrated over pixels,
        # which broadens it by ~1 %): within 5 % of the truth
        assert abs(res.seeing.seeing_arcsec / (field.fwhm_px * syn.PIXSCALE) - 1) < 0.05
        assert res.seeing.ellip < 0.05
        assert abs(res.seeing.peeing_px - res.seeing.seeing_arcsec / syn.PIXSCALE) < 0.05


def _matched_stars(field, res):
    t = res.table
    ra, dec = np.asarray(t["ALPHA_J2000"]), np.asarray(t["DELTA_J2000"])
    from gppy_phot.matching import match_sky

    idx, _ = match_sky(field.ra, field.dec, ra, dec, 0.5)
    return idx


def test_magnitude_errors_are_honest(field, realisations):
    """Scatter of repeated measurements / quoted error in [0.8, 1.2] for constant stars, in all
    fixed and seeing-scaled apertures. MAG_AUTO's error (Source Extractor's) leaves out the
    noise of the Kron radius itself: it is honest for bright stars and up to ~25 % low at
    S/N < 30, which is documented and checked as such."""
    idxs = [_matched_stars(field, r) for r in realisations]
    found = np.all([i >= 0 for i in idxs], axis=0)
    for s in ("APER", "APER_1", "APER_3", "APER_5", "AUTO"):
        mags = np.array([np.asarray(r.table[f"MAG_{s}_{FILT}"])[i[found]] for r, i in zip(realisations, idxs,
                                                                                           strict=True)])
        errs = np.array([np.asarray(r.table[f"MAGERR_{s}_{FILT}"])[i[found]] for r, i in zip(realisations, idxs,
                                                                                            strict=True)])
        flags = np.array([np.asarray(r.table["FLAGS"])[i[found]] for r, i in zip(realisations, idxs, strict=True)])
        good = np.all(np.isfinite(mags), axis=0) & np.all(flags == 0, axis=0) & (np.median(errs, axis=0) < 0.2)
        assert good.sum() > 40
        var = mags[:, good].var(axis=0, ddof=1)
        quoted = np.mean(errs[:, good] ** 2, axis=0)
        ratio = np.sqrt(var.mean() / quoted.mean())
        # and for faint stars separately (where sky noise dominates)
        faint = np.median(errs[:, good], axis=0) > 0.03
        ratio_faint = np.sqrt(var[faint].mean() / quoted[faint].mean())
        if s == "AUTO":
            bright = np.median(errs[:, good], axis=0) < 0.03
            ratio_bright = np.sqrt(var[bright].mean() / quoted[bright].mean())
            assert 0.8 < ratio_bright < 1.2, (s, ratio_bright)
            assert 1.0 < ratio_faint < 1.4, (s, ratio_faint)
            continue
        assert 0.8 < ratio < 1.2, (s, ratio)
        assert 0.8 < ratio_faint < 1.2, (s, ratio_faint)


def test_depth_matches_recovery_at_5_sigma(field, tmp_path):
    """UL5_1 is the magnitude at which injected point sources come out at S/N 5 half the time,
    and 0.75 mag brighter (S/N 10) nearly all of them are measured above 5 sigma."""
    rng = np.random.default_rng(7)
    model = syn.noiseless_image(field)
    first = run_phot(tmp_path / "a", field, syn.add_noise(model, field.gain, field.rdnoise, rng))
    ul5 = first.depths["APER_1"][1]
    assert first.noise["APER_1"] == 1.0  # a single frame: independent pixels
    # inject a grid of isolated sources at UL5_1 and UL5_1 - 0.75 away from the stars
    gx, gy = np.meshgrid(np.arange(40, 960, 46.0), np.arange(40, 960, 46.0))
    gx, gy = gx.ravel(), gy.ravel()
    d = np.hypot(gx[:, None] - field.x[None, :], gy[:, None] - field.y[None, :]).min(axis=1)
    gx, gy = gx[d > 15], gy[d > 15]
    half = len(gx) // 2
    mags = np.where(np.arange(len(gx)) < half, ul5, ul5 - 0.75)
    flux = 10 ** (-0.4 * (mags - field.zp))
    model2 = model + syn.render_sources(field.shape, gx, gy, flux, field.fwhm_px, field.beta)
    res = run_phot(tmp_path / "b", field, syn.add_noise(model2, field.gain, field.rdnoise, rng))
    t = res.table
    from gppy_phot.matching import match_pixels

    idx, _ = match_pixels(gx + 1, gy + 1, np.asarray(t["X_IMAGE"]), np.asarray(t["Y_IMAGE"]), 2.0)
    snr = np.where(idx >= 0, np.asarray(t[f"SNR_APER_1_{FILT}"])[np.where(idx >= 0, idx, 0)], 0.0)
    at_ul5 = (snr[:half] >= 5).mean()
    brighter = (snr[half:] >= 5).mean()
    assert 0.3 < at_ul5 < 0.7, at_ul5
    assert brighter > 0.95, brighter
    assert abs(res.depths["APER_1"][1] - ul5) < 0.1


def test_missing_proper_motions_are_matched_not_fatal(field, tmp_path):
    """B13: the first reference row lacks pm and parallax; such rows are matched at their
    catalogue position and the frame is photometered."""
    ref = syn.reference_table(field, nan_pm_fraction=0.3, first_row_nan=True)
    img = syn.add_noise(syn.noiseless_image(field), field.gain, field.rdnoise, np.random.default_rng(3))
    res = run_phot(tmp_path, field, img, ref=ref)
    nan_ids = set(np.asarray(ref["source_id"])[~np.isfinite(np.asarray(ref["pmra"]))])
    matched = res.table["source_id"][~res.table["source_id"].mask]
    assert len(nan_ids & set(np.asarray(matched))) > 10
    # and stars with proper motions are matched at the observation epoch, not at J2016
    sep = np.asarray(res.table["SEP_REF"].filled(np.nan))[np.asarray(res.table["ZPSTAR"])]
    assert np.nanmedian(sep) < 0.1  # J2016 positions would be off by 20 mas/yr x 8.3 yr ~ 0.2"


def test_gain_and_saturation_from_egain_and_saturate(field, tmp_path):
    """B12: GAIN=2750 (camera setting) is in the header, yet Source Extractor gets EGAIN;
    the saturation level comes from SATURATE in the image's units."""
    img = syn.add_noise(syn.noiseless_image(field), field.gain, field.rdnoise, np.random.default_rng(4))
    args = sextractor.build_args(Path("a.fits"), Path("a.cat"), Path("p"), Path("c"), gain=0.256,
                                 saturation=8000.0, seeing_arcsec=2.0)
    assert args[args.index("-GAIN") + 1] == "0.256"
    assert args[args.index("-GAIN_KEY") + 1] not in ("GAIN", "EGAIN", "SATURATE")
    assert args[args.index("-SATUR_KEY") + 1] not in ("GAIN", "EGAIN", "SATURATE")
    res = run_phot(tmp_path, field, img, saturate=8000.0)
    t = res.table
    sat = (np.asarray(t["FLAGS"]) & 4) > 0
    peak = np.asarray(t["FLUX_MAX"]) + np.asarray(t["BACKGROUND"])
    assert sat.sum() >= 1
    assert np.all(peak[sat] > 7500)
    assert not np.any((peak > 8500) & ~sat)
    assert not np.any(np.asarray(t["ZPSTAR"])[sat])
    assert dict((c[0], c[1]) for c in res.cards)["SATLV"] == 8000.0


def test_masked_pixels_flag_sources(field, tmp_path):
    """B14: the uint16 mask reaches Source Extractor as flags (IMAFLAGS_ISO), and flagged
    sources are not ZP stars. (The weight of the masked box is kept here: with zero weight, as
    the calib stage writes it, nothing would be detected there at all.)"""
    img = syn.add_noise(syn.noiseless_image(field), field.gain, field.rdnoise, np.random.default_rng(5))
    mask = cp.bad_box_mask(field.shape, (0, 300, 0, 300))
    res = run_phot(tmp_path, field, img, mask=mask, zero_weight=False)
    t = res.table
    x, y = np.asarray(t["X_IMAGE"]), np.asarray(t["Y_IMAGE"])
    imaf = np.asarray(t["IMAFLAGS_ISO"])
    inside = (x < 295) & (y < 295)
    outside = (x > 340) | (y > 340)
    assert inside.sum() > 3
    assert np.all(imaf[inside] == 1)
    assert np.all(imaf[outside] == 0)
    assert not np.any(np.asarray(t["ZPSTAR"])[inside])


def test_catalogue_columns_and_units(field, realisations, tmp_path):
    """The catalogue has v1's columns, reads back with format='ascii', and its fluxes are in
    microjansky (AB: m = 23.9 - 2.5 log10 F)."""
    from gppy_phot import catalog

    res = realisations[0]
    path = tmp_path / "x.phot.cat"
    path.write_text(catalog.to_ecsv(res.table))
    t = Table.read(path, format="ascii")
    for s in SUFFIXES:
        for q in ("MAG", "MAGERR", "FLUX", "FLUXERR", "SNR"):
            assert f"{q}_{s}_{FILT}" in t.colnames
    for c in ("MAG_APER_1", "FLUX_APER_5", "source_id", "ra", "dec", "parallax", "pmra", "pmdec",
              "phot_g_mean_mag", "bp_rp", f"mag_{FILT}", "mag_u", "mag_z", "FLAGS", "CLASS_STAR"):
        assert c in t.colnames
    assert len(t) == len(res.table)
    assert t.meta["filter"] == FILT
    good = np.isfinite(np.asarray(t[f"MAG_APER_5_{FILT}"], float)) & (np.asarray(t[f"SNR_APER_5_{FILT}"]) > 5)
    f = np.asarray(t[f"FLUX_APER_5_{FILT}"])[good]
    m = np.asarray(t[f"MAG_APER_5_{FILT}"])[good]
    assert np.allclose(m, 23.9 - 2.5 * np.log10(f), atol=2e-4)
    # reference columns are masked where there is no match within 1"
    unmatched = np.asarray(t["source_id"].mask) if hasattr(t["source_id"], "mask") else np.zeros(len(t), bool)
    assert unmatched.any() and (~unmatched).any()
    # header cards: v1's keys all present
    keys = {c[0] for c in res.cards}
    for k in ("SEEING", "PEEING", "ELLIP", "ELONG", "SKYVAL", "SKYSIG", "REFCAT", "STDNUMB", "MAGLOW", "MAGUP",
              "SATLV", "JD", "MJD", "AUTHOR", "PHOTIME", "AUTO", "APER", "APER_1", "APER_5"):
        assert k in keys
    for s in SUFFIXES:
        for pre in ("ZP_", "EZP_", "UL3_", "UL5_"):
            assert f"{pre}{ZP_KEYS[s]}" in keys


def test_bad_inputs_are_reported(field, tmp_path):
    img = syn.add_noise(syn.noiseless_image(field), field.gain, field.rdnoise, np.random.default_rng(6))
    path, wpath, _ = cp.write_frame(tmp_path, field, img)
    header = fits.getheader(path)
    del header["EGAIN"]
    with pytest.raises(BadInputError, match="EGAIN"):
        photometer(path, header, img, None, wpath, syn.reference_table(field), "r.csv", tmp_path / "w")
    header = fits.getheader(path)
    far = syn.reference_table(field)
    far["dec"] = far["dec"] + 1.0
    with pytest.raises(BadInputError, match="reference star"):
        photometer(path, header, img, None, wpath, far, "r.csv", tmp_path / "w")


def test_noise_correlation_of_resampled_noise():
    """The aperture-noise ratio from the measured autocorrelation agrees with the scatter of
    sums in random apertures for correlated noise, and is 1 for white noise."""
    from scipy.ndimage import gaussian_filter

    from gppy_phot import depth

    rng = np.random.default_rng(9)
    white = rng.normal(0, 1, (800, 800))
    corr = gaussian_filter(white, 0.7)
    corr /= corr.std()
    for img, expect_white in ((white, True), (corr, False)):
        rho = depth.noise_correlation(img, None)
        for d in (6.0, 12.0):
            f = depth.correlation_noise_ratio(rho, d)
            # truth: the scatter of sums in many disjoint apertures
            r = d / 2
            yy, xx = np.mgrid[-8:9, -8:9]
            disk = np.hypot(xx, yy) <= r
            sums = [img[y - 8:y + 9, x - 8:x + 9][disk].sum() for y in range(20, 780, 19) for x in range(20, 780, 19)]
            truth = np.std(sums) / np.sqrt(disk.sum())
            if expect_white:
                assert f < 1.03
            else:
                assert abs(f / truth - 1) < 0.1, (d, f, truth)


def test_banded_source_extractor_gives_the_same_catalogue(field, tmp_path):
    """A frame cut into bands measured in parallel gives the same sources and zero points."""
    img = syn.add_noise(syn.noiseless_image(field), field.gain, field.rdnoise, np.random.default_rng(8))
    path, wpath, _ = cp.write_frame(tmp_path, field, img)
    header = fits.getheader(path)
    ref = syn.reference_table(field)
    whole = photometer(path, header, img, None, wpath, ref, "r.csv", tmp_path / "w1", PhotParams())
    banded = photometer(path, header, img, None, wpath, ref, "r.csv", tmp_path / "w2",
                        PhotParams(split_min_pixels=1, max_bands=3))
    assert abs(len(banded.table) - len(whole.table)) <= max(2, 0.01 * len(whole.table))
    from gppy_phot.matching import match_pixels

    a, b = whole.table, banded.table
    idx, _ = match_pixels(np.asarray(a["X_IMAGE"]), np.asarray(a["Y_IMAGE"]), np.asarray(b["X_IMAGE"]),
                          np.asarray(b["Y_IMAGE"]), 0.1)
    sure = np.asarray(a["SNR_APER_1_m650"]) > 10
    assert (idx[sure] >= 0).mean() > 0.99
    ok = sure & (idx >= 0)
    # the bands estimate their own background maps: fluxes agree to a small part of their errors
    dflux = np.asarray(a["FLUX_APER_1"])[ok] - np.asarray(b["FLUX_APER_1"])[idx[ok]]
    assert np.all(np.abs(dflux) < 0.2 * np.asarray(a["FLUXERR_APER_1"])[ok])
    for s in SUFFIXES:  # the same stars, possibly clipped differently: well within the ZP error
        assert abs(whole.zps[s].zp - banded.zps[s].zp) < 1.5 * whole.zps[s].ezp


def test_non_finite_pixels_are_flagged_not_fatal(field, tmp_path):
    """NaN pixels (no data: NONFINITE in the mask, zero weight, as the calib stage writes them)
    reach Source Extractor as flagged zeros; nothing is detected there and the photometry goes
    on."""
    from gppy.masks import MaskBit

    img = syn.add_noise(syn.noiseless_image(field), field.gain, field.rdnoise, np.random.default_rng(10))
    img[400:420, :] = np.nan
    mask = np.zeros(field.shape, np.uint16)
    mask[400:420, :] = int(MaskBit.NONFINITE)
    res = run_phot(tmp_path, field, img, mask=mask)
    t = res.table
    y = np.asarray(t["Y_IMAGE"]) - 1
    assert not np.any((y > 401) & (y < 418))
    assert np.all(np.isfinite(np.asarray(t["FLUX_APER_1"])))
    r = res.apertures.diameters["APER_3"] / 2
    expected = field.zp + 2.5 * np.log10(cp.pixel_ee(r, field.fwhm_px, field.beta))
    assert abs(res.zps["APER_3"].zp - expected) < 0.02


def test_a_star_without_measurable_moments_leaves_the_ellipticity_finite():
    """Eight round Gaussian stars (FWHM 4 px) and one whose stamp is a narrow spike in a
    depression (its weighted second moments come out negative): the ellipticity is that of the
    round stars, not NaN (a NaN header value failed a simulated frame's photometry)."""
    from gppy_phot.seeing import measure_psf

    rng = np.random.default_rng(3)
    ny, nx = 200, 260
    yy, xx = np.mgrid[0:ny, 0:nx]
    data = 100.0 + rng.normal(0, 1.0, (ny, nx))
    sig = 4.0 / 2.3548
    xs, ys = [], []
    for k in range(8):
        x0, y0 = 30.0 + 28 * k + rng.uniform(-0.5, 0.5), 50.0 + rng.uniform(-0.5, 0.5)
        data += 5000.0 * np.exp(-0.5 * ((xx - x0) ** 2 + (yy - y0) ** 2) / sig**2)
        xs.append(x0)
        ys.append(y0)
    xo, yo = 130.0, 140.0
    r = np.hypot(xx - xo, yy - yo)
    data[r < 9] -= 40.0                       # a depression ...
    data[r < 1.5] += 500.0                    # ... with a spike at its centre
    xs.append(xo)
    ys.append(yo)
    see = measure_psf(data, None, np.array(xs), np.array(ys), pixscale=0.505, saturation=60000.0,
                      fwhm_guess_px=4.0)
    assert np.isfinite(see.ellip) and np.isfinite(see.elong)
    assert see.ellip < 0.05 and see.elong < 1.06, (see.ellip, see.elong)
    assert see.peeing_px == pytest.approx(4.0, rel=0.05)
