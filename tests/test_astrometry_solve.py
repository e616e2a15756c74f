"""The astrometry stage on simulated frames, judged against the simulator's true star positions.

Every frame is calibrated with the simulator's true bias/dark/flat (the calib stage is tested
on its own), solved with the real Source Extractor and SCAMP, and its WCS evaluated at the true
pixel positions of the stars with S/N > 20: the residuals against their true sky positions
must stay under 0.10" per axis, with pointing errors and field distortion.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.time import Time

from gppy.config import PathConfig, Settings
from gppy.refcat import load_gaiaxp, write_scamp_reference
from gppy_astrometry.reference import ensure_reference, scamp_reference_path
from gppy_astrometry.service import options_from, process_frame
from gppy_astrometry.wcs import footprint

_spec = importlib.util.spec_from_file_location("conftest_astrometry",
                                               Path(__file__).with_name("conftest_astrometry.py"))
ca = sys.modules.setdefault("conftest_astrometry", importlib.util.module_from_spec(_spec))
if not hasattr(ca, "make_field"):
    _spec.loader.exec_module(ca)

UNIT = "7DT01"
NIGHT_ID = "7DT01_2025-01-15_gain2750"
GOAL = 0.10  # arcsec per axis


def _rms(a: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.asarray(a) ** 2)))


def _sim(tmp_path_factory, name: str, **kw) -> tuple[Path, PathConfig, list[ca.SimFrame]]:
    root = tmp_path_factory.mktemp(name)
    cfg = ca.simulate_night(root, **kw)
    paths = PathConfig.load(cfg)
    frames = [ca.calibrate_sim_frame(root, raw, paths.path_processed)
              for raw in sorted((root / "obsdata").rglob("*.fits"))]
    return root, paths, frames


@pytest.fixture(scope="module")
def night(tmp_path_factory):
    """The simulator's default physics: 1" of distortion at the corners, pointing errors up
    to 4', rotation up to 1.5 deg."""
    return _sim(tmp_path_factory, "night", seed=5)


@pytest.fixture(scope="module")
def distorted(tmp_path_factory):
    """Stronger distortion (2" at the corners), pointing errors up to 5', rotation up to 2 deg."""
    return _sim(tmp_path_factory, "distorted", seed=8, max_pointing_error_arcmin=5.0, max_rotation_deg=2.0,
                distortion_arcsec=2.0)


def _solve(frame: ca.SimFrame, paths: PathConfig, degree: int = 3, settings: Settings | None = None):
    s = settings or Settings()
    return process_frame(frame.path, frame.weight, frame.mask, frame.header["OBJECT"].strip(),
                         frame.header["DATE-OBS"], UNIT, NIGHT_ID, paths, options_from(s, distort_degree=degree))


def _test_stars(frame: ca.SimFrame):
    st = frame.stars
    return st[(st["snr"] > 20) & (st["saturated"] == 0)]


def test_frames_solve_to_the_true_positions(night):
    root, paths, frames = night
    for frame in frames:
        data_before = fits.getdata(frame.path).copy()
        result = _solve(frame, paths)
        assert result.ok, result.reason
        header = fits.getheader(frame.path)
        stars = _test_stars(frame)
        assert len(stars) > 100
        dra, ddec = ca.wcs_residuals(header, stars)
        print(f"{frame.path.name}: pointing off {np.hypot(*frame.truth['pointing_offset_arcsec']):.0f}\", "
              f"rotation {frame.truth['rotation_deg']:.2f} deg, {len(stars)} stars S/N>20: "
              f"rms {_rms(dra):.4f}\" / {_rms(ddec):.4f}\", timings {result.timings}")
        assert _rms(dra) < GOAL and _rms(ddec) < GOAL
        # pixels untouched, TPV written, v1 keys present and consistent with the WCS
        np.testing.assert_array_equal(fits.getdata(frame.path), data_before)
        assert header["CTYPE1"] == "RA---TPV" and header["CTYPE2"] == "DEC--TPV"
        assert any(k.startswith("PV1_") for k in header)
        assert header["ROTANG1"] == pytest.approx(frame.truth["rotation_deg"], abs=0.02)
        assert header["ASTNSTAR"] == result.nstars >= Settings().astrometry_min_stars
        assert max(header["ASTRMS1A"], header["ASTRMS2A"]) == pytest.approx(result.rms_arcsec, abs=1e-3)
        assert header["ASTRRMS1"] == pytest.approx(header["ASTRMS1A"] / 3600.0, rel=1e-3)
        assert header["PIPESTG"] == "astrometry"
        assert "RA" in header and header["OBJECT"].strip() == frame.header["OBJECT"].strip()


def test_footprint_is_a_closed_polygon(night):
    """RAPOLY/DEPOLY 0..3 go round the frame (fixing v1 B16's Z order): consecutive corners are
    joined by the frame's edges, never by a diagonal, and RACENT/DECCENT is the centre."""
    root, paths, frames = night
    frame = frames[0]
    if "RAPOLY0" not in fits.getheader(frame.path):
        assert _solve(frame, paths).ok
    h = fits.getheader(frame.path)
    nx, ny = h["NAXIS1"], h["NAXIS2"]
    ra = np.array([h[f"RAPOLY{i}"] for i in range(4)])
    dec = np.array([h[f"DEPOLY{i}"] for i in range(4)])
    x = (ra - h["RACENT"]) * np.cos(np.deg2rad(h["DECCENT"])) * 3600 / 0.505
    y = (dec - h["DECCENT"]) * 3600 / 0.505
    sides = [np.hypot(x[(i + 1) % 4] - x[i], y[(i + 1) % 4] - y[i]) for i in range(4)]
    np.testing.assert_allclose(sides, [nx - 1, ny - 1, nx - 1, ny - 1], rtol=0.01)
    # the true sky position of each pixel corner matches
    t = ca.WCS(fits.Header.fromstring(frame.truth["wcs_header"], sep="\n"), relax=True)
    tra, tdec = t.all_pix2world([0, nx - 1, nx - 1, 0], [0, 0, ny - 1, ny - 1], 0)
    sep = np.hypot((ra - tra) * np.cos(np.deg2rad(dec)), dec - tdec) * 3600
    assert sep.max() < 0.1  # RAPOLY are rounded to 1e-6 deg = 0.0036"
    area = 0.5 * np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y)
    assert abs(area) == pytest.approx((nx - 1) * (ny - 1), rel=0.02)
    fp = footprint(h, nx, ny)
    assert fp["RACENT"] == pytest.approx(h["RACENT"]) and fp["DEPOLY2"] == pytest.approx(h["DEPOLY2"])


def test_distortion_terms_are_needed(distorted):
    """With 2" of distortion at the corners and pointing errors up to 5': the degree-3 TPV
    fit passes the 0.10" test, a linear (DISTORT_DEGREES 1) fit of the same frame fails it."""
    root, paths, frames = distorted
    frame = frames[0]
    stars = _test_stars(frame)
    lin = _solve(frame, paths, degree=1)
    assert lin.ok, lin.reason  # a linear fit still "solves" (RMS against the reference < 0.3")
    dra1, ddec1 = ca.wcs_residuals(fits.getheader(frame.path), stars)
    cub = _solve(frame, paths, degree=3)
    assert cub.ok, cub.reason
    dra3, ddec3 = ca.wcs_residuals(fits.getheader(frame.path), stars)
    print(f"linear: {_rms(dra1):.3f}\" / {_rms(ddec1):.3f}\"; TPV degree 3: {_rms(dra3):.4f}\" / {_rms(ddec3):.4f}\"")
    assert _rms(dra3) < GOAL and _rms(ddec3) < GOAL
    assert max(_rms(dra1), _rms(ddec1)) > GOAL


def test_rerun_gives_the_same_solution(distorted):
    """Re-running a message on an already solved frame (whose header now carries a TPV WCS)
    starts again from the header pointing and gives the same WCS."""
    root, paths, frames = distorted
    frame = frames[1]
    assert _solve(frame, paths).ok
    h1 = fits.getheader(frame.path)
    assert _solve(frame, paths).ok
    h2 = fits.getheader(frame.path)
    for key in ("CRVAL1", "CRVAL2", "CD1_1", "CD1_2", "CD2_1", "CD2_2", "PV1_7", "PV2_9", "RAPOLY3"):
        assert h2[key] == pytest.approx(h1[key], rel=1e-9, abs=1e-12), key
    assert sum(1 for k in h2 if k == "PV1_7") == 1


@pytest.mark.parametrize("offset, angle", [((5.0, 0.0), 2.0), ((-3.5, 3.5), -2.0), ((0.0, -5.0), 1.0)])
def test_pointing_errors_up_to_5_arcmin_and_2_degrees(tmp_path, offset, angle):
    fld = ca.make_field(seed=21, pointing_error_arcmin=offset, angle_deg=angle, k3=4e-9, q2=6e-7)
    paths = PathConfig(path_base=tmp_path / "factory")
    ca.write_catalogue_csv(fld, paths.path_refcat / "gaiaxp_dr3_synphot_T01234.csv")
    img, w, m = ca.write_calibrated(fld, tmp_path / "proc")
    result = process_frame(img, w, m, "T01234", fld.header["DATE-OBS"], UNIT, NIGHT_ID, paths,
                           options_from(Settings()))
    assert result.ok, result.reason
    sel = (fld.truth["snr"] > 20) & fld.truth["inside"]
    dra, ddec = ca.wcs_residuals(fits.getheader(img), fld.truth[sel], "x", "y")
    assert _rms(dra) < GOAL and _rms(ddec) < GOAL
    assert fits.getheader(img)["ROTANG1"] == pytest.approx(angle, abs=0.02)


def _failure(tmp_path, fld, with_catalogue=True, catalogue_of=None):
    paths = PathConfig(path_base=tmp_path / "factory")
    if with_catalogue:
        ca.write_catalogue_csv(catalogue_of or fld, paths.path_refcat / "gaiaxp_dr3_synphot_T01234.csv")
    img, w, m = ca.write_calibrated(fld, tmp_path / "proc")
    before = img.read_bytes()
    result = process_frame(img, w, m, "T01234", fld.header["DATE-OBS"], UNIT, NIGHT_ID, paths,
                           options_from(Settings()))
    assert not result.ok
    assert img.read_bytes() == before  # a failed frame is left as it was
    return result.reason


def test_blank_frame_fails_with_reason(tmp_path):
    reason = _failure(tmp_path, ca.make_field(seed=31, blank=True))
    assert reason.startswith("blank frame")


def test_too_few_stars_fails_with_reason(tmp_path):
    reason = _failure(tmp_path, ca.make_field(seed=32, nstars=9))
    assert reason.startswith("too few stars")


def test_wrong_field_fails_with_reason(tmp_path):
    """The frame's stars are not those of the reference catalogue named by its OBJECT."""
    frame = ca.make_field(seed=33)
    other = ca.make_field(seed=34)  # another star field at the same nominal position
    reason = _failure(tmp_path, frame, catalogue_of=other)
    assert reason.startswith("no match with the reference catalogue")


def test_missing_reference_catalogue_fails_with_reason(tmp_path):
    reason = _failure(tmp_path, ca.make_field(seed=35), with_catalogue=False)
    assert reason.startswith("missing reference catalogue for T01234")


def test_unreadable_frame_is_a_reported_failure(tmp_path):
    paths = PathConfig(path_base=tmp_path / "factory")
    bad = tmp_path / "calib_7DT01_T01234_20240301_030000_m625_60.fits"
    bad.write_bytes(b"SIMPLE  = garbage")
    for p in (bad.with_name(bad.name[:-5] + ".weight.fits"), bad.with_name(bad.name[:-5] + ".mask.fits")):
        p.write_bytes(b"")
    result = process_frame(bad, bad.with_name(bad.name[:-5] + ".weight.fits"),
                           bad.with_name(bad.name[:-5] + ".mask.fits"), "T01234", "2024-03-01T03:00:00",
                           UNIT, NIGHT_ID, paths, options_from(Settings()))
    assert not result.ok and result.reason.startswith("bad input")


def test_reference_is_built_cached_and_rebuilt_for_another_epoch(tmp_path):
    fld = ca.make_field(seed=41, nstars=100)
    paths = PathConfig(path_base=tmp_path / "factory")
    csv = ca.write_catalogue_csv(fld, paths.path_refcat / "gaiaxp_dr3_synphot_T01234.csv")
    dest = scamp_reference_path(paths.path_ref_scamp, "T01234")
    ref = ensure_reference(paths.path_refcat, paths.path_ref_scamp, "T01234", fld.obstime)
    assert ref.built and ref.path == dest and dest.exists()
    mtime = dest.stat().st_mtime_ns
    later = Time(fld.obstime.jd + 30, format="jd", scale="utc")
    again = ensure_reference(paths.path_refcat, paths.path_ref_scamp, "T01234", later)
    assert not again.built and dest.stat().st_mtime_ns == mtime
    next_year = Time(fld.obstime.jd + 365, format="jd", scale="utc")
    rebuilt = ensure_reference(paths.path_refcat, paths.path_ref_scamp, "T01234", next_year)
    assert rebuilt.built and rebuilt.epoch == pytest.approx(next_year.tt.jyear)
    # a reference kept from elsewhere (not written by gppy) is used as it is without a CSV
    csv.unlink()
    foreign = paths.path_ref_scamp / "T09999.fits"
    write_scamp_reference(load_gaiaxp_table(fld), fld.obstime, foreign)
    with fits.open(foreign, mode="update") as h:
        h[0].header["ORIGIN"] = "SCAMP"
    kept = ensure_reference(paths.path_refcat, paths.path_ref_scamp, "T09999", next_year)
    assert not kept.built and len(kept.ra) == 100 and kept.path == foreign


def load_gaiaxp_table(fld):
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        return load_gaiaxp(ca.write_catalogue_csv(fld, Path(d) / "c.csv"))
