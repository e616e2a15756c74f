"""gppy.refcat: the Gaia-XP CSV loader, proper-motion propagation, and the FITS_LDAC reference
that the real SCAMP reads."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import astropy.units as u
import numpy as np
import pytest
from astropy.coordinates import SkyCoord
from astropy.io import fits
from astropy.table import Table
from astropy.time import Time

from gppy.fitsio import BadInputError
from gppy.refcat import gaiaxp_path, load_gaiaxp, propagate_to_epoch, write_scamp_reference
from gppy_astrometry.quality import AstrometryFailure
from gppy_astrometry.solve import SolveOptions, solve_frame

_spec = importlib.util.spec_from_file_location("conftest_astrometry",
                                               Path(__file__).with_name("conftest_astrometry.py"))
ca = sys.modules.setdefault("conftest_astrometry", importlib.util.module_from_spec(_spec))
if not hasattr(ca, "make_field"):
    _spec.loader.exec_module(ca)

HEADER = "source_id,ra,dec,parallax,pmra,pmdec,phot_g_mean_mag,bp_rp,mag_m625\n"


def test_gaiaxp_path_sanitises_object(tmp_path):
    assert gaiaxp_path(tmp_path, "T01234") == tmp_path / "gaiaxp_dr3_synphot_T01234.csv"
    p = gaiaxp_path(tmp_path, "../NGC 253/x")
    assert p.parent == tmp_path
    assert "/" not in p.name[len("gaiaxp_dr3_synphot_"):] and ".." not in p.name


@pytest.mark.parametrize("content, reason", [
    (None, "does not exist"),
    ("", "empty"),
    ("source_id,ra,dec,phot_g_mean_mag\n1,10.0,-5.0,15.0\n", "lacks column(s) pmra, pmdec"),
    (HEADER + "1,ten,-5.0,1.0,2.0,3.0,15.0,0.5,15.1\n", "'ra' is not numeric"),
    (HEADER + "1,,,1.0,2.0,3.0,15.0,0.5,15.1\n", "no star with a position"),
])
def test_load_gaiaxp_reports_bad_input(tmp_path, content, reason):
    p = tmp_path / "gaiaxp_dr3_synphot_X.csv"
    if content is not None:
        p.write_text(content)
    with pytest.raises(BadInputError) as err:
        load_gaiaxp(p)
    assert reason in err.value.reason
    assert err.value.path == str(p)


def test_missing_pm_and_bad_parallax_never_break(tmp_path):
    """v1 B13: a first row without proper motion failed the whole image. Here rows with blank
    or NaN proper motion keep their J2016.0 position; missing and negative parallaxes play no role."""
    p = tmp_path / "c.csv"
    p.write_text(HEADER
                 + "1,10.0,-5.0,,,,15.0,0.5,15.1\n"          # first row: nothing but a position
                 + "2,10.01,-5.01,-0.4,100.0,-50.0,16.0,0.6,16.1\n"
                 + "3,10.02,-5.02,nan,nan,nan,17.0,,17.1\n"
                 + "4,10.03,-5.03,2.0,-20.0,30.0,,0.8,18.1\n")
    t = load_gaiaxp(p)
    assert len(t) == 4
    assert np.isnan(t["pmra"][0]) and np.isnan(t["parallax"][2]) and np.isnan(t["phot_g_mean_mag"][3])
    obstime = Time("2026-01-01T00:00:00", scale="utc")
    ra, dec = propagate_to_epoch(t, obstime)
    assert np.all(np.isfinite(ra)) and np.all(np.isfinite(dec))
    assert ra[0] == pytest.approx(10.0, abs=1e-12) and dec[0] == pytest.approx(-5.0, abs=1e-12)
    assert ra[2] == pytest.approx(10.02, abs=1e-12)
    dt = obstime.tt.jyear - 2016.0
    # row 2: 100 mas/yr east, -50 mas/yr north
    assert (ra[1] - 10.01) * np.cos(np.deg2rad(-5.01)) * 3.6e6 == pytest.approx(100.0 * dt, rel=1e-4)
    assert (dec[1] + 5.01) * 3.6e6 == pytest.approx(-50.0 * dt, rel=1e-4)
    out = write_scamp_reference(t, obstime, tmp_path / "ref" / "X.fits")
    mag = fits.getdata(out, "LDAC_OBJECTS")["MAG"]
    assert mag[3] == 99.0 and mag[0] == pytest.approx(15.0)


@pytest.mark.filterwarnings("ignore::erfa.ErfaWarning")
def test_propagation_agrees_with_astropy_space_motion():
    """Independent check against astropy's rigorous space motion (zero radial velocity), over
    the whole sky including the poles and RA = 0/360, for large proper motions."""
    rng = np.random.default_rng(7)
    n = 3000
    ra = rng.uniform(0, 360, n)
    dec = np.degrees(np.arcsin(rng.uniform(-1, 1, n)))
    dec[:20] = 89.999 * np.sign(rng.uniform(-1, 1, 20))
    ra[20:40] = rng.choice([0.0001, 359.9999], 20)
    pmra = rng.normal(0, 300, n)
    pmdec = rng.normal(0, 300, n)
    t = Table({"ra": ra, "dec": dec, "pmra": pmra, "pmdec": pmdec})
    obstime = Time("2031-07-01T12:00:00", scale="utc")
    got_ra, got_dec = propagate_to_epoch(t, obstime)
    c0 = SkyCoord(ra=ra * u.deg, dec=dec * u.deg, pm_ra_cosdec=pmra * u.mas / u.yr, pm_dec=pmdec * u.mas / u.yr,
                  distance=10 * u.pc, radial_velocity=0 * u.km / u.s,
                  obstime=Time(2016.0, format="jyear", scale="tcb"))
    want = c0.apply_space_motion(new_obstime=obstime)
    sep = want.separation(SkyCoord(got_ra * u.deg, got_dec * u.deg)).to(u.mas).value
    # astropy's epoch is TCB, ours TT: 2016.0 TCB - TT ~ 20 s, 300 mas/yr * 20 s ~ 2e-4 mas
    assert sep.max() < 0.01


def test_reference_file_layout_and_atomic_write(tmp_path):
    fld = ca.make_field(seed=11, nstars=200)
    csv = ca.write_catalogue_csv(fld, tmp_path / "gaiaxp_dr3_synphot_T01234.csv")
    t = load_gaiaxp(csv)
    dest = tmp_path / "ref_scamp" / "T01234.fits"
    write_scamp_reference(t, fld.obstime, dest)
    assert sorted(p.name for p in dest.parent.iterdir()) == ["T01234.fits"]  # no temp file left
    with fits.open(dest) as h:
        assert [x.name for x in h] == ["PRIMARY", "LDAC_IMHEAD", "LDAC_OBJECTS"]
        assert h[0].header["REFEPOCH"] == pytest.approx(fld.obstime.tt.jyear)
        cards = h["LDAC_IMHEAD"].data["Field Header Card"][0]
        assert h["LDAC_IMHEAD"].header["TDIM1"].startswith("(80,") and any("NSTARS" in c for c in cards)
        obj = h["LDAC_OBJECTS"].data
        assert {"X_WORLD", "Y_WORLD", "ERRA_WORLD", "ERRB_WORLD", "MAG", "MAGERR", "OBSDATE", "FLAGS"} <= set(
            obj.columns.names)
        assert len(obj) == 200
        # positions are the epoch positions (the truth of the synthetic field)
        dra = (obj["X_WORLD"] - fld.truth["ra"]) * np.cos(np.deg2rad(fld.truth["dec"])) * 3.6e6
        ddec = (obj["Y_WORLD"] - fld.truth["dec"]) * 3.6e6
        assert np.max(np.hypot(dra, ddec)) < 0.01  # mas
        assert np.all(obj["OBSDATE"] == pytest.approx(fld.obstime.tt.jyear))


def _solve(fld, tmp_path, reference, name):
    img, w, m = ca.write_calibrated(fld, tmp_path / name)
    return solve_frame(img, w, m, reference, tmp_path / name / "work", (fld.header["RA"], fld.header["DEC"]),
                       fld.image.shape[::-1], SolveOptions())


def test_scamp_solves_against_the_reference_and_needs_propagated_positions(tmp_path):
    """The real SCAMP reads the file (ASTREF_CATALOG FILE) and solves the frame to the truth.
    Stars move by 80 mas/yr (rms) over 8 years here; a reference left at J2016.0 (SCAMP 2.10
    does not propagate local references itself) leaves arcsecond residuals against the stars."""
    fld = ca.make_field(seed=12, pm_scale=10.0, pointing_error_arcmin=(1.0, -2.0), angle_deg=0.7)
    t = load_gaiaxp(ca.write_catalogue_csv(fld, tmp_path / "gaiaxp_dr3_synphot_T01234.csv"))
    good = write_scamp_reference(t, fld.obstime, tmp_path / "ref" / "good.fits")
    sol = _solve(fld, tmp_path, good, "good")
    sel = (fld.truth["snr"] > 20) & fld.truth["inside"]
    dra, ddec = ca.wcs_residuals(sol.head, fld.truth[sel], "x", "y")
    assert np.sqrt(np.mean(dra ** 2)) < 0.05 and np.sqrt(np.mean(ddec ** 2)) < 0.05
    assert max(sol.quality["rms1"], sol.quality["rms2"]) < 0.1
    assert sol.quality["nstars"] > 100

    stale = write_scamp_reference(t, Time(2016.0, format="jyear", scale="tt"), tmp_path / "ref" / "stale.fits")
    try:
        bad = _solve(fld, tmp_path, stale, "stale")
    except AstrometryFailure as exc:  # RMS against the reference above the 0.3" limit
        assert "RMS" in exc.reason or "too few" in exc.reason
    else:
        assert min(bad.quality["rms1"], bad.quality["rms2"]) > 5 * max(sol.quality["rms1"], sol.quality["rms2"])
