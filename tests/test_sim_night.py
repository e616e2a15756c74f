"""The simulator measured against its own truth files.

One small night (2 targets, 2 filters, calibration frames, references) is simulated per module;
every check measures the raw data with independent means (pair statistics, Source Extractor,
a Moffat fit, aperture sums) and compares with the truth within tolerances derived from the
noise of the measurement.
"""

from __future__ import annotations

import json
import re
import warnings

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from astropy.time import Time
from astropy.wcs import WCS, FITSFixedWarning
from scipy.optimize import least_squares

from gppy import naming, refcat
from gppy.config import PathConfig, load_settings
from gppy.sim import SimTruth, simulate
from gppy.tables import apply_changehdr, load_changehdr
from gppy.tools import run_tool

from .conftest_sim import load_night, match_nearest, moffat_fraction_within, run_sextractor

NAME_RE = re.compile(r"^(?P<unit>7DT\d\d)_(?P<date>\d{8})_(?P<time>\d{6})_(?P<obj>[A-Z0-9]+)_(?P<filt>[a-z0-9]+)_1x1_"
                     r"(?P<exp>\d+\.\d)s_(?P<seq>\d{4})\.fits$")


@pytest.fixture(scope="module")
def night(tmp_path_factory):
    root = tmp_path_factory.mktemp("simnight")
    path_json = simulate(root, unit="7DT03", night="2025-01-15", targets=2, filters=["m650", "r"], seed=11)
    assert path_json == root / "path.json"
    return load_night(root)


def _science(night, filt="m650", exptime=100.0, target=0):
    obj = night.truth["targets"][target]["name"]
    return night.frames("science", filter=filt, exptime=exptime, object=obj)


# ------------------------------------------------------------------------------ files and names


def test_layout_and_path_json(night):
    cfg = PathConfig.load(night.root / "path.json")
    assert cfg.path_base == night.root / "factory"
    assert cfg.path_obsdata == night.root / "obsdata"
    assert night.night_dir == cfg.path_obsdata / "7DT03" / "2025-01-15_gain2750"
    assert cfg.skygrid == night.root / "factory" / "skygrid.fits"
    settings = load_settings(config=str(night.root / "path.json"))
    assert tuple(settings.stack_size) == tuple(night.truth["stack_size"])
    assert settings.stack_size[0] > 1536 and settings.stack_size[1] > 1024
    for t in night.truth["targets"]:
        assert (cfg.path_refcat / f"gaiaxp_dr3_synphot_{t['name']}.csv").exists()
        assert (cfg.path_ref_scamp / f"{t['name']}.fits").exists()


def test_skygrid_format(night):
    with fits.open(night.root / "factory" / "skygrid.fits") as h:
        cols = h[1].columns
        assert [c.name for c in cols] == ["id", "ra", "dec", "tile"]
        assert [c.format for c in cols] == ["K", "D", "D", "6A"]
        tab = h[1].data
        tiles = [t["name"] for t in night.truth["targets"] if t["tile"]]
        for t in night.truth["targets"]:
            if t["tile"]:
                row = tab[tab["tile"] == t["name"]]
                assert len(row) == 1
                assert row["id"][0] == int(t["name"][1:])
                assert abs(row["ra"][0] - t["ra"]) < 1e-9 and abs(row["dec"][0] - t["dec"]) < 1e-9
    assert tiles and "SIMF01" in [t["name"] for t in night.truth["targets"]]


def test_every_raw_frame_opens_and_its_name_matches_its_header(night):
    rules = load_changehdr()
    files = sorted(night.night_dir.glob("*.fits"))
    assert len(files) == len(night.truth["frames"])
    kinds = {"object": 0, "bias": 0, "dark": 0, "flat": 0}
    spellings = set()
    for path in files:
        with fits.open(path) as h:
            hdr = h[0].header
            assert hdr["BITPIX"] == 16 and hdr["BZERO"] == 32768
            data = h[0].data
            assert data.dtype == np.uint16 and data.shape == (1024, 1536)
        m = NAME_RE.match(path.name)
        assert m, path.name
        d, t = naming.date_time_fields(hdr["DATE-OBS"])
        assert (m["date"], m["time"]) == (d, t)
        assert m["obj"] == hdr["OBJECT"] and m["filt"] == hdr["FILTER"] and m["unit"] == "7DT03"
        assert float(m["exp"]) == hdr["EXPTIME"]
        assert hdr["GAIN"] == 2750 and abs(hdr["EGAIN"] - 0.256) < 1e-9
        for key in ("XBINNING", "YBINNING", "CCD-TEMP", "SET-TEMP", "TELESCOP", "INSTRUME", "XPIXSZ",
                    "FOCALLEN", "JD", "MJD", "DATE-LOC", "SATURATE"):
            assert key in hdr, key
        for key in ("CTYPE1", "CRVAL1", "CD1_1", "CDELT1", "PV1_1"):
            assert key not in hdr
        spellings.add(hdr["IMAGETYP"])
        norm = hdr.copy()
        apply_changehdr(norm, rules)
        kinds[norm["IMAGETYP"]] += 1
        if norm["IMAGETYP"] == "object":
            for key in ("RA", "DEC", "OBJCTRA", "OBJCTDEC", "AIRMASS", "CENTALT", "CENTAZ"):
                assert key in hdr, key
            assert re.match(r"^\d\d \d\d \d\d\.\d\d$", hdr["OBJCTRA"])
            assert re.match(r"^[+-]\d\d \d\d \d\d\.\d$", hdr["OBJCTDEC"])
            assert 1.0 <= hdr["AIRMASS"] < 2.0
    assert {"Light Frame", "Bias Frame", "Dark Frame", "Flat Field"} <= spellings
    assert len(spellings) > 4
    assert kinds["bias"] >= 5 and kinds["dark"] >= 5 and kinds["flat"] >= 5 and kinds["object"] >= 12
    exptimes = {f["exptime"] for f in night.truth["frames"] if f["kind"] == "science"}
    assert {100.0, 300.0, 45.0} <= exptimes


def test_named_field_keeps_its_catalogue_position(night):
    named = [t for t in night.truth["targets"] if t["name"] == "SIMF01"][0]
    for name in night.frames("science", object="SIMF01"):
        _, hdr = night.raw(name)
        h, m, s = (float(v) for v in hdr["OBJCTRA"].split())
        assert abs((h + m / 60 + s / 3600) * 15 - named["ra"]) < 0.01 / 3600 * 15 * 1.01
        # the reported pointing (RA, DEC) is off by the pointing error recorded in the truth
        t = night.frame_truth(name)
        off = np.hypot(*t["pointing_offset_arcsec"])
        assert off < 4.0 * 60 + 10


# ---------------------------------------------------------------------------------- detector


def test_read_noise_from_bias_pairs(night):
    biases = night.frames("bias")
    assert len(biases) >= 2
    t = night.frame_truth(biases[0])
    good = np.ones((1024, 1536), bool)
    for bc in night.truth["detector"]["bad_columns"]:
        good[:, bc["x_0based"]] = False
    diff = night.raw(biases[0])[0] - night.raw(biases[1])[0]
    d = diff[good]
    d = d - d.mean()
    rn = np.sqrt(d.var() / 2.0)
    expect = np.sqrt(t["read_noise_adu"] ** 2 + 1.0 / 12.0)       # + quantisation
    tol = 5.0 * expect / np.sqrt(2.0 * d.size)
    assert abs(rn - expect) < tol, (rn, expect, tol)


def test_bias_level_and_column_structure(night):
    stack = np.mean([night.raw(b)[0] for b in night.frames("bias")], axis=0)
    true_bias = night.calib_truth("bias")
    n = len(night.frames("bias"))
    offsets = np.mean([night.frame_truth(b)["bias_offset_adu"] for b in night.frames("bias")])
    resid = (stack - true_bias - offsets)
    good = np.ones(resid.shape, bool)
    for bc in night.truth["detector"]["bad_columns"]:
        good[:, bc["x_0based"]] = False
    rn = night.frame_truth(night.frames("bias")[0])["read_noise_adu"]
    assert abs(resid[good].mean()) < 5 * rn / np.sqrt(n * good.sum())
    # the column pattern is real structure: column means of the stack follow the truth's
    col_meas = (stack - offsets).mean(axis=0)
    col_true = true_bias.mean(axis=0)
    assert np.std(col_true) > 1.0
    assert np.corrcoef(col_meas[good[0]], col_true[good[0]])[0, 1] > 0.99


def test_gain_from_flat_pairs(night):
    flats = night.frames("flat", filter="m650")
    assert len(flats) >= 2
    bias = np.mean([night.raw(b)[0] for b in night.frames("bias")], axis=0)
    (f1, _), (f2, _) = night.raw(flats[0]), night.raw(flats[1])
    bad = (night.mask(flats[0]) > 0) | (night.mask(flats[1]) > 0)
    sl = (slice(200, 824), slice(300, 1236))
    a, b = (f1 - bias)[sl], (f2 - bias)[sl]
    ok = ~bad[sl]
    s1, s2 = a[ok].mean(), b[ok].mean()
    k = s1 / s2
    d = (a - k * b)[ok]
    t = night.frame_truth(flats[0])
    rn2 = t["read_noise_adu"] ** 2 + 1.0 / 12.0
    var_poisson = d.var() - (1 + k * k) * rn2
    gain = (s1 + k * k * s2) / var_poisson
    tol = 5.0 * gain * np.sqrt(2.0 / d.size)
    assert abs(gain - t["gain_e_per_adu"]) < tol, (gain, tol)


def test_master_flat_shape_matches_true_flat(night):
    flats = night.frames("flat", filter="r")
    bias = np.mean([night.raw(b)[0] for b in night.frames("bias")], axis=0)
    norm = [(night.raw(f)[0] - bias) / np.median(night.raw(f)[0] - bias) for f in flats]
    master = np.median(norm, axis=0)
    true = night.calib_truth("flat_r")
    ny, nx = true.shape
    centre = true[ny // 2 - 100:ny // 2 + 100, nx // 2 - 100:nx // 2 + 100]
    assert 1.03 < np.median(centre) < 1.10            # vignetting: v1 masters show 1.050-1.075
    ratio = (master / true)[50:-50, 50:-50]
    level = 25000.0 * 0.256                        # e- per pixel of one flat
    assert abs(np.median(ratio) - 1) < 3e-3        # the median of a noisy skewed image shifts a little
    ratio = ratio / np.median(ratio)
    # noise of a median of n flats: 1.2533 sigma / sqrt(n); +15 % for the vignetted corners
    assert np.std(ratio) < 1.2533 / np.sqrt(level * len(flats)) * 1.15


def test_dark_current_and_hot_pixels(night):
    darks = night.frames("dark", exptime=300.0)
    bias = np.mean([night.raw(b)[0] for b in night.frames("bias")], axis=0)
    stack = np.median([night.raw(d)[0] for d in darks], axis=0) - bias
    true = night.calib_truth("dark_current") * 300.0 / 0.256
    hot = true > 0.5 * 300 / 0.256
    assert hot.sum() > 50
    ratio = stack[hot] / true[hot]
    assert abs(np.median(ratio) - 1) < 0.05
    assert np.all(night.mask(darks[0])[hot] & 16)


# --------------------------------------------------------------------------------- astrometry


def test_truth_wcs_is_consistent_with_star_positions(night):
    name = _science(night)[0]
    t = night.frame_truth(name)
    h = fits.Header.fromstring(t["wcs_header"], sep="\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        w = WCS(h)
    stars = night.stars(name)
    ra, dec = w.all_pix2world(stars["x_1based"], stars["y_1based"], 1)
    sep = np.hypot((ra - stars["ra"]) * np.cos(np.deg2rad(stars["dec"])), dec - stars["dec"]) * 3600
    assert sep.max() < 1e-3
    ra2, dec2 = SimTruth(night.root).wcs(name).all_pix2world(stars["x_0based"], stars["y_0based"], 0)
    assert np.allclose(ra2, ra, atol=1e-10) and np.allclose(dec2, dec, atol=1e-10)
    # distortion matters: an affine fit leaves several tenths of an arcsec at the corners
    x, y = stars["x_0based"], stars["y_0based"]
    xi = (ra - t["crval"][0]) * np.cos(np.deg2rad(t["crval"][1])) * 3600
    eta = (dec - t["crval"][1]) * 3600
    a = np.c_[x, y, x * 0 + 1]
    worst = 0.0
    for v in (xi, eta):
        c, *_ = np.linalg.lstsq(a, v, rcond=None)
        worst = max(worst, np.abs(v - a @ c).max())
    assert 0.2 < worst < 1.5
    # pointing and rotation errors are what the header would mislead a solver by
    assert np.hypot(*t["pointing_offset_arcsec"]) > 10.0 or abs(t["rotation_deg"]) > 0.05


def test_star_positions_match_sextractor_centroids(night, tmp_path):
    name = _science(night)[0]
    t = night.frame_truth(name)
    cat = run_sextractor(night.night_dir / name, tmp_path, gain=t["gain_e_per_adu"])
    snr = cat["FLUX_AUTO"] / cat["FLUXERR_AUTO"]
    assert (snr > 20).sum() >= 150
    stars = night.stars(name)
    bright = stars[(~stars["saturated"].astype(bool)) & (stars["flux_adu"] > 3e4)
                   & (stars["x_0based"] > 20) & (stars["x_0based"] < 1515)
                   & (stars["y_0based"] > 20) & (stars["y_0based"] < 1003)]
    # isolated: no other star brighter than 2 % of it within 25 px
    iso = []
    for r in bright:
        d = np.hypot(stars["x_0based"] - r["x_0based"], stars["y_0based"] - r["y_0based"])
        iso.append(np.sum((d < 25) & (d > 0) & (stars["flux_adu"] > 0.02 * r["flux_adu"])) == 0)
    bright = bright[np.array(iso)]
    good = cat[(cat["FLAGS"] == 0) & (snr > 30)]
    idx, dist = match_nearest(bright["x_1based"], bright["y_1based"], good["XWIN_IMAGE"], good["YWIN_IMAGE"])
    ok = dist < 1.5
    assert ok.sum() > 40
    dx = good["XWIN_IMAGE"][idx[ok]] - bright["x_1based"][ok]
    dy = good["YWIN_IMAGE"][idx[ok]] - bright["y_1based"][ok]
    err = good["ERRAWIN_IMAGE"][idx[ok]]
    n = ok.sum()
    for v in (dx, dy):
        assert abs(np.mean(v)) < 5 * np.std(v) / np.sqrt(n) + 0.01
        chi = v / err
        assert 0.5 < np.std(chi) < 2.0, np.std(chi)


def test_seeing_from_a_moffat_fit(night):
    name = _science(night, filt="r")[1]
    t = night.frame_truth(name)
    beta = t["psf"]["beta"]
    img = night.calibrated(name)
    stars = night.stars(name)
    cand = stars[(~stars["saturated"].astype(bool)) & (stars["flux_adu"] > 2e4) & (stars["flux_adu"] < 4e5)
                 & (stars["x_0based"] > 30) & (stars["x_0based"] < 1505)
                 & (stars["y_0based"] > 30) & (stars["y_0based"] < 993)]
    yy, xx = np.mgrid[-12:13, -12:13]
    ratios = []
    for r in cand:
        d = np.hypot(stars["x_0based"] - r["x_0based"], stars["y_0based"] - r["y_0based"])
        if np.sum((d < 30) & (d > 0) & (stars["flux_adu"] > 0.01 * r["flux_adu"])):
            continue
        ix, iy = int(round(r["x_0based"])), int(round(r["y_0based"]))
        cut = img[iy - 12:iy + 13, ix - 12:ix + 13]

        def model(p, cut=cut):
            amp, x0, y0, alpha, sky = p
            rr = ((xx - x0) ** 2 + (yy - y0) ** 2) / alpha ** 2
            return (amp * (1 + rr) ** (-beta) + sky - cut).ravel()

        fit = least_squares(model, [cut.max(), r["x_0based"] - ix, r["y_0based"] - iy, 4.0, t["sky_adu"]])
        fwhm_px = 2 * abs(fit.x[3]) * np.sqrt(2 ** (1 / beta) - 1)
        ratios.append(fwhm_px * 0.505 / r["fwhm_arcsec"])
    ratios = np.array(ratios)
    assert ratios.size >= 15
    med = np.median(ratios)
    tol = 5 * 1.25 * np.std(ratios) / np.sqrt(ratios.size) + 0.01   # + circular fit of e < 0.1 PSFs
    assert abs(med - 1) < tol, (med, tol)
    assert 1.5 < t["fwhm_median_arcsec"] < 4.5


def test_sky_level(night):
    name = _science(night)[1]
    t = night.frame_truth(name)
    img = night.calibrated(name)
    ny, nx = img.shape
    keep = night.mask(name) == 0
    keep[:60], keep[-60:], keep[:, :60], keep[:, -60:] = False, False, False, False
    stars = night.stars(name)
    beta = t["psf"]["beta"]
    # mask every star out to where its Moffat profile falls below 0.02 ADU
    alpha = stars["fwhm_arcsec"] / 0.505 / (2 * np.sqrt(2 ** (1 / beta) - 1))
    peak = stars["flux_adu"] * (beta - 1) / (np.pi * alpha ** 2)
    rad = alpha * np.sqrt(np.maximum((peak / 0.02) ** (1 / beta) - 1, 0)) + 3
    yy, xx = np.mgrid[0:ny, 0:nx]
    for x, y, r in zip(stars["x_0based"], stars["y_0based"], rad, strict=True):
        r = min(r, 200)
        x0, x1 = max(0, int(x - r)), min(nx, int(x + r) + 1)
        y0, y1 = max(0, int(y - r)), min(ny, int(y + r) + 1)
        sub = (xx[y0:y1, x0:x1] - x) ** 2 + (yy[y0:y1, x0:x1] - y) ** 2 < r * r
        keep[y0:y1, x0:x1] &= ~sub
    for tr in t["transients"]:
        keep[max(0, int(tr["y_0based"]) - 40):int(tr["y_0based"]) + 40,
             max(0, int(tr["x_0based"]) - 40):int(tr["x_0based"]) + 40] = False
    assert keep.sum() > 0.2 * keep.size
    gx, gy = t["sky_gradient_per_frame"]
    model = t["sky_adu"] * (1 + gx * (xx - (nx - 1) / 2) / nx + gy * (yy - (ny - 1) / 2) / ny)
    resid = (img - model)[keep]
    sigma = np.std(resid)
    expect_sigma = np.sqrt(t["sky_adu"] / t["gain_e_per_adu"] + t["read_noise_adu"] ** 2)
    assert abs(sigma / expect_sigma - 1) < 0.03          # Poisson + read noise at the stated gain
    assert abs(resid.mean()) < 5 * sigma / np.sqrt(resid.size) + 0.05


def test_zero_point_from_aperture_photometry(night):
    name = _science(night)[2]
    t = night.frame_truth(name)
    img = night.calibrated(name)
    stars = night.stars(name)
    beta = t["psf"]["beta"]
    ny, nx = img.shape
    yy, xx = np.mgrid[-40:41, -40:41]
    rap = 3.0 * t["fwhm_median_arcsec"] / 0.505
    mags_meas, mags_true, errs = [], [], []
    sel = stars[(~stars["saturated"].astype(bool)) & (stars["flux_adu"] > 1e4)
                & (stars["x_0based"] > 45) & (stars["x_0based"] < nx - 46)
                & (stars["y_0based"] > 45) & (stars["y_0based"] < ny - 46)]
    for r in sel:
        d = np.hypot(stars["x_0based"] - r["x_0based"], stars["y_0based"] - r["y_0based"])
        if np.sum((d < 2 * rap) & (d > 0) & (stars["flux_adu"] > 0.01 * r["flux_adu"])):
            continue
        ix, iy = int(round(r["x_0based"])), int(round(r["y_0based"]))
        cut = img[iy - 40:iy + 41, ix - 40:ix + 41]
        rr = np.hypot(xx + ix - r["x_0based"], yy + iy - r["y_0based"])
        ann = (rr > 25) & (rr < 38)
        sky = np.median(cut[ann])
        flux = np.sum(cut[rr < rap] - sky)
        frac = moffat_fraction_within(rap, r["fwhm_arcsec"] / 0.505, beta)
        var = flux * frac / t["gain_e_per_adu"] + (rr < rap).sum() * (t["sky_adu"] / t["gain_e_per_adu"]
                                                                    + t["read_noise_adu"] ** 2)
        mags_meas.append(-2.5 * np.log10(flux / frac))
        mags_true.append(r["mag"])
        errs.append(1.0857 * np.sqrt(var) / flux)
    zp = np.array(mags_true) - np.array(mags_meas)
    errs = np.array(errs)
    assert zp.size >= 20
    w = 1 / errs ** 2
    zp_meas = np.sum(w * zp) / np.sum(w)
    tol = 5 / np.sqrt(w.sum()) + 0.005                 # + aperture correction of slightly elliptical PSFs
    assert abs(zp_meas - t["zp_adu"]) < tol, (zp_meas, t["zp_adu"], tol)
    assert abs(t["zp_adu_per_s"] - (t["zp_adu"] - 2.5 * np.log10(100.0))) < 1e-9


def test_truth_masks_mark_cosmic_rays_trails_and_saturation(night):
    trail_frames = night.truth["trail_frames"]
    assert trail_frames
    t = night.frame_truth(trail_frames[0])
    assert t["trail"] is not None
    m = night.mask(trail_frames[0])
    img = night.calibrated(trail_frames[0])
    sigma = np.sqrt(t["sky_adu"] / t["gain_e_per_adu"] + t["read_noise_adu"] ** 2)
    on_trail = (m == 2)
    assert on_trail.sum() > 500
    # the trail raises the pixels it marks (compared with the sky level)
    assert np.median(img[on_trail]) - t["sky_adu"] > 0.5 * sigma
    name = _science(night)[0]
    t = night.frame_truth(name)
    m = night.mask(name)
    img = night.calibrated(name)
    cr = (m & 1) > 0
    assert cr.sum() >= t["n_cosmic_rays"] > 0
    # nearly every cosmic-ray pixel stands above the noise
    assert np.mean(img[cr] - t["sky_adu"] > 3 * sigma) > 0.8
    raw, _ = night.raw(name)
    assert np.array_equal((m & 4) > 0, raw >= 65535)
    stars = night.stars(name)
    assert stars["saturated"].astype(bool).sum() >= 1


# ---------------------------------------------------------------------------------- transients


def test_transients_flux_and_motion(night):
    trs = json.loads((night.root / "truth" / "transients.json").read_text())
    kinds = {t["kind"] for t in trs}
    assert {"static", "near_bright", "fading", "moving"} <= kinds
    design = [t["snr_visit_design"] for t in trs if "snr_visit_design" in t]
    assert min(design) == pytest.approx(3.0) and max(design) == pytest.approx(100.0)
    # a bright static transient is in the science frames with its flux
    tr = max((t for t in trs if t["kind"] == "static" and t["target"] == trs[0]["target"]),
             key=lambda t: t["snr_visit_design"])
    row = [r for r in tr["frames"] if "_m650_" in r["file"] and "_100.0s_" in r["file"]][0]
    ft = night.frame_truth(row["file"])
    img = night.calibrated(row["file"])
    ix, iy = int(round(row["x_0based"])), int(round(row["y_0based"]))
    yy, xx = np.mgrid[-30:31, -30:31]
    rr = np.hypot(xx + ix - row["x_0based"], yy + iy - row["y_0based"])
    cut = img[iy - 30:iy + 31, ix - 30:ix + 31]
    rap = 3.0 * ft["fwhm_center_arcsec"] / 0.505
    sky = np.median(cut[rr > 20])
    flux = np.sum(cut[rr < rap] - sky) / moffat_fraction_within(rap, ft["fwhm_center_arcsec"] / 0.505 * 1.1,
                                                               ft["psf"]["beta"])
    sig = np.sqrt(row["flux_adu"] / 0.256 + (rr < rap).sum() * (ft["sky_adu"] / 0.256 + ft["read_noise_adu"] ** 2))
    assert abs(flux - row["flux_adu"]) < 5 * sig + 0.05 * row["flux_adu"]
    # the moving object moves at its stated rate between frames of a visit
    mv = [t for t in trs if t["kind"] == "moving"][0]
    rows = sorted([r for r in mv["frames"] if "_m650_" in r["file"] and "_100.0s_" in r["file"]],
                  key=lambda r: r["t_mid"])
    assert len(rows) == 3
    dt_h = (Time(rows[2]["t_mid"]) - Time(rows[0]["t_mid"])).to_value("hour")
    moved = np.hypot((rows[2]["ra"] - rows[0]["ra"]) * np.cos(np.deg2rad(rows[0]["dec"])),
                     rows[2]["dec"] - rows[0]["dec"]) * 3600
    assert moved == pytest.approx(mv["rate_arcsec_per_hour"] * dt_h, rel=0.01)
    assert moved / 0.505 > 4.0                     # pixels between the first and last frame
    for r in rows:
        img = night.calibrated(r["file"])
        ix, iy = int(round(r["x_0based"])), int(round(r["y_0based"]))
        cut = img[iy - 6:iy + 7, ix - 6:ix + 7]
        cut = cut - np.median(img[iy - 30:iy + 31, ix - 30:ix + 31])
        cut = np.clip(cut, 0, None)
        yy, xx = np.mgrid[-6:7, -6:7]
        cx, cy = (cut * xx).sum() / cut.sum() + ix, (cut * yy).sum() / cut.sum() + iy
        assert np.hypot(cx - r["x_0based"], cy - r["y_0based"]) < 1.0
    # none of the transients is in the Gaia catalogue
    cat = refcat.load_gaiaxp(night.root / "factory" / "ref_cat" / f"gaiaxp_dr3_synphot_{trs[0]['target']}.csv")
    for t in trs:
        if t["target"] != trs[0]["target"]:
            continue
        d = np.hypot((cat["ra"] - t["ra"]) * np.cos(np.deg2rad(t["dec"])), cat["dec"] - t["dec"]) * 3600
        assert d.min() > 0.5


# ----------------------------------------------------------------------------------- references


def test_gaia_csv(night):
    t0 = night.truth["targets"][0]["name"]
    path = night.root / "factory" / "ref_cat" / f"gaiaxp_dr3_synphot_{t0}.csv"
    raw = Table.read(path, format="ascii.csv")
    for col in ["source_id", "ra", "dec", "parallax", "pmra", "pmdec", "phot_g_mean_mag", "bp_rp", "mag_m650",
                "mag_r", "mag_u", "mag_g", "mag_i", "mag_z", "mag_m400", "mag_m875"]:
        assert col in raw.colnames, col
    cat = refcat.load_gaiaxp(path)
    assert np.isnan(cat["pmra"][0])                 # a missing proper motion in the very first row
    assert np.isnan(cat["pmra"]).sum() > 5
    assert (cat["parallax"] < 0).sum() > 5
    # catalogue positions propagated to the frame's epoch agree with the true positions
    name = _science(night)[0]
    ft = night.frame_truth(name)
    stars = night.stars(name)
    ra, dec = refcat.propagate_to_epoch(cat, Time(ft["t_mid"]))
    ids = {int(s): i for i, s in enumerate(cat["source_id"])}
    k = np.array([ids.get(int(s), -1) for s in stars["source_id"]])
    have = (k >= 0)
    assert have.sum() > 0.8 * len(stars[stars["gmag"] < 21])
    has_pm = have.copy()
    has_pm[have] = np.isfinite(cat["pmra"][k[have]])
    sep = np.hypot((ra[k[has_pm]] - stars["ra"][has_pm]) * np.cos(np.deg2rad(stars["dec"][has_pm])),
                   dec[k[has_pm]] - stars["dec"][has_pm]) * 3600e3
    assert np.median(sep) < 5.0 and np.percentile(sep, 99) < 60.0     # mas
    bright = stars["gmag"][have] < 17
    dm = cat["mag_m650"][k[have]][bright] - stars["mag"][have][bright]
    assert abs(np.median(dm)) < 0.003 and np.std(dm) < 0.03


def test_reference_images(night):
    t0 = night.truth["targets"][0]["name"]
    ref_dir = night.root / "factory" / "ref_frame" / "m650"
    ps1 = ref_dir / f"ref_PS1_{t0}_00000000_000000_m650_0.fits"
    sevendt = ref_dir / f"ref_7DT_{t0}_20241117_190933_m650_2100.com.fits"
    assert ps1.exists() and sevendt.exists() and naming.weight_of(sevendt).exists()
    cat = refcat.load_gaiaxp(night.root / "factory" / "ref_cat" / f"gaiaxp_dr3_synphot_{t0}.csv")
    fwhms = []
    for path, scale in ((ps1, 0.25), (sevendt, 0.505)):
        with fits.open(path) as h:
            data, hdr = h[0].data.astype(np.float64), h[0].header
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FITSFixedWarning)
            w = WCS(hdr)
        assert abs(np.hypot(*w.pixel_scale_matrix[:, 0]) * 3600 - scale) < 1e-6
        ra, dec = refcat.propagate_to_epoch(cat, Time(hdr["EPOCH"], format="jyear"))
        ok = np.isfinite(ra) & (cat["mag_m650"] > 14) & (cat["mag_m650"] < 16.5)
        x, y = w.all_world2pix(ra[ok], dec[ok], 0)
        ny, nx = data.shape
        inside = (x > 60) & (x < nx - 61) & (y > 60) & (y < ny - 61)
        mags = cat["mag_m650"][ok][inside]
        fwhm_px = hdr["SEEING"] / scale
        rap = 4.0 * fwhm_px
        yy, xx = np.mgrid[-60:61, -60:61]
        zps = []
        for xi, yi, m in zip(x[inside], y[inside], mags, strict=True):
            ix, iy = int(round(xi)), int(round(yi))
            cut = data[iy - 60:iy + 61, ix - 60:ix + 61]
            if np.any(cut == 0):
                continue
            rr = np.hypot(xx + ix - xi, yy + iy - yi)
            f = np.sum(cut[rr < rap]) - np.median(cut[rr > 45]) * (rr < rap).sum()
            zps.append(m + 2.5 * np.log10(f))
        zps = np.array(zps)
        assert zps.size > 10
        # MAGZERO is right to within the aperture loss (Moffat wings) and blends
        assert -0.06 < np.median(zps) - hdr["MAGZERO"] < 0.01, (path.name, np.median(zps), hdr["MAGZERO"])
        fwhms.append(hdr["SEEING"])
        # the stated noise: the background is 0, so the RMS of the negative pixels is SKYSIG,
        # lowered a little where faint star light lifts the noise
        neg = data[data < 0]
        rms = np.sqrt(np.mean(neg ** 2))
        assert 0.85 < rms / hdr["SKYSIG"] < 1.02, (path.name, rms / hdr["SKYSIG"])
    with fits.open(sevendt) as h, fits.open(naming.weight_of(sevendt)) as wh:
        hdr = h[0].header
        assert np.allclose(wh[0].data[h[0].data != 0], 1.0 / hdr["SKYSIG"] ** 2, rtol=1e-5)
        assert (hdr["NAXIS1"], hdr["NAXIS2"]) == tuple(night.truth["stack_size"])
        assert abs(hdr["CRVAL1"] - night.truth["targets"][0]["ra"]) < 1e-9
        assert abs(hdr["CD1_2"]) < 1e-12
    with fits.open(ps1) as h:
        hdr = h[0].header
        assert abs(np.degrees(np.arctan2(hdr["CD1_2"], -hdr["CD1_1"]))) > 2.0   # rotated
    # every PS1-like reference covers the whole nightly stack footprint of its target
    sw, sh = night.truth["stack_size"]
    for tg in night.truth["targets"]:
        grid = WCS(naxis=2)
        grid.wcs.ctype = ["RA---TAN", "DEC--TAN"]
        grid.wcs.crval = [tg["ra"], tg["dec"]]
        grid.wcs.crpix = [(sw + 1) / 2, (sh + 1) / 2]
        grid.wcs.cd = [[-0.505 / 3600, 0], [0, 0.505 / 3600]]
        cra, cdec = grid.all_pix2world([1, sw, 1, sw], [1, 1, sh, sh], 1)
        for path in (night.root / "factory" / "ref_frame").glob(f"*/ref_PS1_{tg['name']}_*.fits"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FITSFixedWarning)
                w = WCS(fits.getheader(path))
            hdr = fits.getheader(path)
            x, y = w.all_world2pix(cra, cdec, 1)
            assert np.all((x > 1) & (x < hdr["NAXIS1"]) & (y > 1) & (y < hdr["NAXIS2"])), path.name
    science_fwhm = night.frame_truth(_science(night)[0])["fwhm_center_arcsec"]
    assert min(fwhms) < science_fwhm or max(fwhms) > science_fwhm


def test_scamp_solves_a_frame_with_the_reference_catalogue(night, tmp_path):
    """SCAMP reads the simulated reference catalogue and, starting from the header pointing,
    finds a TPV solution that agrees with the true WCS."""
    obj = night.truth["targets"][0]["name"]
    name = _science(night, filt="r")[0]
    t = night.frame_truth(name)
    img = night.calibrated(name).astype(np.float32)
    _, raw_hdr = night.raw(name)
    hdr = fits.Header()
    for key in ("EXPTIME", "FILTER", "OBJECT", "DATE-OBS", "EGAIN"):
        hdr[key] = raw_hdr[key]
    hdr.update({"CTYPE1": "RA---TAN", "CTYPE2": "DEC--TAN", "CRVAL1": raw_hdr["RA"], "CRVAL2": raw_hdr["DEC"],
                "CRPIX1": 768.5, "CRPIX2": 512.5, "CD1_1": -0.505 / 3600, "CD1_2": 0.0, "CD2_1": 0.0,
                "CD2_2": 0.505 / 3600, "EQUINOX": 2000.0, "RADESYS": "ICRS"})
    image = tmp_path / "frame.fits"
    fits.writeto(image, img, hdr)
    param = tmp_path / "ldac.param"
    param.write_text("\n".join(["NUMBER", "XWIN_IMAGE", "YWIN_IMAGE", "ERRAWIN_IMAGE", "ERRBWIN_IMAGE",
                                "ERRTHETAWIN_IMAGE", "X_WORLD", "Y_WORLD", "FLUX_AUTO", "FLUXERR_AUTO",
                                "MAG_AUTO", "MAGERR_AUTO", "FLAGS", "FLAGS_WEIGHT", "ELONGATION",
                                "FLUX_RADIUS"]) + "\n")
    cat = tmp_path / "frame.ldac"
    run_tool("sextractor", [str(image), "-c", "/dev/null", "-PARAMETERS_NAME", str(param), "-CATALOG_NAME", str(cat),
                            "-CATALOG_TYPE", "FITS_LDAC", "-FILTER", "N", "-DETECT_THRESH", "5",
                            "-DETECT_MINAREA", "5", "-GAIN", "0.256", "-GAIN_KEY", "NO_SUCH_KEY",
                            "-SATUR_LEVEL", "50000", "-SATUR_KEY", "NO_SUCH_KEY", "-VERBOSE_TYPE", "QUIET"],
             cwd=tmp_path, timeout=300)
    ref = night.root / "factory" / "ref_scamp" / f"{obj}.fits"
    run_tool("scamp", [str(cat), "-c", "/dev/null", "-ASTREF_CATALOG", "FILE", "-ASTREFCAT_NAME", str(ref),
                       "-ASTREFMAG_LIMITS", "10,20", "-POSITION_MAXERR", "6.0", "-PIXSCALE_MAXERR", "1.2",
                       "-POSANGLE_MAXERR", "3.0", "-MATCH", "Y", "-MATCH_FLIPPED", "N", "-CROSSID_RADIUS", "2.0",
                       "-PROJECTION_TYPE", "TPV", "-DISTORT_DEGREES", "3", "-SOLVE_PHOTOM", "N",
                       "-SN_THRESHOLDS", "10,100", "-CHECKPLOT_TYPE", "NONE", "-WRITE_XML", "N",
                       "-HEADER_TYPE", "NORMAL", "-NTHREADS", "2", "-VERBOSE_TYPE", "QUIET"],
             cwd=tmp_path, timeout=300)
    head = fits.Header.fromstring((tmp_path / "frame.head").read_text(), sep="\n")
    solved = fits.Header()
    solved.update({"NAXIS": 2, "NAXIS1": 1536, "NAXIS2": 1024})
    for card in head.cards:
        if card.keyword not in ("COMMENT", "HISTORY", ""):
            solved[card.keyword] = card.value
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        w = WCS(solved)
    stars = night.stars(name)
    stars = stars[stars["mag"] < 19]
    ra, dec = w.all_pix2world(stars["x_1based"], stars["y_1based"], 1)
    sep = np.hypot((ra - stars["ra"]) * np.cos(np.deg2rad(stars["dec"])), dec - stars["dec"]) * 3600
    # the header pointing was off by the simulated error; the solution is right to ~0.1"
    assert np.hypot(*t["pointing_offset_arcsec"]) > 10.0
    assert np.median(sep) < 0.1, np.median(sep)
    assert np.percentile(sep, 95) < 0.3, np.percentile(sep, 95)
