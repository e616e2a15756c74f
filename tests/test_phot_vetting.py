"""The vetting score's evaluation (trees as plain arrays) and its context features."""

from __future__ import annotations

import numpy as np
import pytest

from gppy_phot import vetting


def _two_trees(features=vetting.FEATURES) -> dict:
    """baseline 0.1; tree 1 splits feature 3 at 1.0 (left -1, right +2, NaN left); tree 2 is a
    leaf of 0.5."""
    split = {"feature": [3, 0, 0], "threshold": [1.0, 0.0, 0.0], "left": [1, 0, 0], "right": [2, 0, 0],
             "leaf": [False, True, True], "missing_left": [True, False, False], "value": [0.0, -1.0, 2.0],
             "depth": 1}
    leaf = {"feature": [0], "threshold": [0.0], "left": [0], "right": [0], "leaf": [True], "missing_left": [False],
            "value": [0.5], "depth": 0}
    return {"baseline": 0.1, "trees": [split, leaf], "features": list(features)}


def test_trees_are_walked_as_stored():
    x = np.zeros((4, len(vetting.FEATURES)))
    x[:, 3] = [0.5, 1.0, 2.0, np.nan]           # left, left (<=), right, missing -> left
    p = vetting.score(x, _two_trees())
    raw = np.array([0.1 - 1 + 0.5, 0.1 - 1 + 0.5, 0.1 + 2 + 0.5, 0.1 - 1 + 0.5])
    np.testing.assert_allclose(p, 1 / (1 + np.exp(-raw)))


def test_a_model_of_other_features_is_refused():
    with pytest.raises(ValueError, match="features"):
        vetting.score(np.zeros((1, len(vetting.FEATURES))), _two_trees(features=("a", "b")))


def test_the_shipped_model_never_saw_the_test_night():
    """The simulated night of test_phot_sim_transients (seed 21) is left out of the training."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("t", Path(__file__).with_name("test_phot_sim_transients.py"))
    src = spec.origin and Path(spec.origin).read_text()
    seed = int(src.split("SEED = ")[1].split()[0])
    m = vetting.load_model()
    assert seed in m["excluded_seeds"] and seed not in m["train_seeds"]
    assert tuple(m["features"]) == vetting.FEATURES and len(m["trees"]) > 10
    # the stored cross-validation figures were measured on nights left out of each fold's fit
    for fold in m["cross_validation"]:
        assert not set(fold["test_seeds"]) & {seed}


def test_star_context_finds_the_star_whose_light_dominates():
    stars = (np.array([100.0, 130.0]), np.array([100.0, 100.0]), np.array([1e6, 1e3]))
    fwhm = 5.0
    # 8 px from the bright star, 22 px from the faint one; and a detection on the bright star
    x, y = np.array([108.0, 100.2, 400.0]), np.array([100.0, 100.0, 400.0])
    dist, ratio, light, which = vetting.star_context(x, y, np.array([100.0, 100.0, 100.0]), np.ones(3), stars, fwhm, 2.5)
    assert dist[0] == pytest.approx(8 / fwhm) and list(which) == [0, 1, -1]
    assert ratio[0] == pytest.approx(4.0)            # log10(1e6 / 100)
    assert dist[1] == pytest.approx(29.8 / fwhm)      # its own star (within 0.5 FWHM) is left out
    assert dist[2] == vetting.STAR_DIST_MAX and light[2] == 0.0
    alpha = fwhm / (2 * np.sqrt(2 ** (1 / 2.5) - 1))
    expect = 1e6 * (1 + (8 / alpha) ** 2) ** -2.5 + 1e3 * (1 + (22 / alpha) ** 2) ** -2.5
    assert light[0] == pytest.approx(np.log1p(expect))


def test_saturation_distance():
    sat = np.zeros((50, 60), bool)
    sat[10, 20] = True
    d = vetting.saturation_distance(sat, np.array([20.0, 23.0, 59.0]), np.array([14.0, 10.0, 49.0]), 2.0)
    assert d[0] == pytest.approx(2.0) and d[1] == pytest.approx(1.5)
    assert d[2] == vetting.SAT_DIST_MAX                # capped
    assert np.all(vetting.saturation_distance(None, np.zeros(2), np.zeros(2), 2.0) == vetting.SAT_DIST_MAX)


def test_a_lobe_around_a_star_is_tangential_a_source_is_round():
    """A Gaussian elongated along the circle around a star (a subtraction lobe) and a round
    one displaced toward the star from the detection."""
    fwhm = 5.0
    s = fwhm / 2.3548
    yy, xx = np.mgrid[0:80, 0:80].astype(float)
    star = (40.0, 20.0)
    # detection 10 px above the star: radial = +y, tangential = x
    lobe = np.exp(-((xx - 40) ** 2 / (2 * (2.5 * s) ** 2) + (yy - 30) ** 2 / (2 * s**2)))
    src = np.exp(-((xx - 40) ** 2 + (yy - 29) ** 2) / (2 * s**2))       # 1 px toward the star
    tang, off = vetting.star_aligned_shape(lobe, None, np.array([40.0]),
                                           np.array([30.0]), np.array([1.0]), np.array([star[0]]),
                                           np.array([star[1]]), fwhm)
    assert tang[0] > 0.8 and abs(off[0]) < 0.02
    tang, off = vetting.star_aligned_shape(src, None, np.array([40.0]), np.array([30.0]), np.array([1.0]),
                                           np.array([star[0]]), np.array([star[1]]), fwhm)
    # the window (sigma 0.6 FWHM) times the source: the centroid moves by w^2 / (w^2 + s^2) px
    w2 = (0.6 * fwhm) ** 2
    assert abs(tang[0]) < 0.05 and off[0] == pytest.approx(-w2 / (w2 + s**2) / fwhm, abs=0.01)
    # no star: not measured; a negative detection measures -D
    tang, off = vetting.star_aligned_shape(-src, None, np.array([40.0]), np.array([30.0]), np.array([-1.0]),
                                           np.array([np.nan]), np.array([np.nan]), fwhm)
    assert np.isnan(tang[0]) and np.isnan(off[0])


def test_a_trail_is_measured_and_a_point_source_is_not():
    """A Moffat averaged along a 12-px segment at 30 deg (known truth) in white noise, S/N ~ 60:
    the fitted length is 12 px and the angle 30 deg, each within 4 sigma of the fit's error. The
    decision (:func:`trailed_objects`) against the length the same fit gives on seven point
    sources of other noise draws (:func:`psf_trail_level`, the production's calibration): the
    trail is one, an eighth point source is not."""
    from gppy_phot import synthetic as syn
    from gppy_phot.transients import (
        SingleDetections,
        psf_trail_level,
        trail_fit,
        trailed_objects,
        visit_span_hours,
    )

    rng = np.random.default_rng(7)
    fwhm, beta, sigma, flux = 5.0, 3.0, 5.0, 4000.0
    ang = np.deg2rad(30.0)
    t = np.linspace(-0.5, 0.5, 41)
    # the trail at (50, 50); point sources on a grid 80 px apart, the eighth at (210, 210)
    grid = [(50.0 + 80 * i, 50.0 + 80 * j) for i in range(3) for j in range(3)][1:]
    xs = list(50 + 12 * t * np.cos(ang)) + [g[0] for g in grid]
    ys = list(50 + 12 * t * np.sin(ang)) + [g[1] for g in grid]
    fl = [flux / len(t)] * len(t) + [flux] * len(grid)
    img = syn.render_sources((260, 260), xs, ys, fl, fwhm, beta) + rng.normal(0, sigma, (260, 260))
    sig = np.full(img.shape, sigma)
    length, err, theta = trail_fit(img, sig, None, 50.0, 50.0, fwhm, beta)
    assert abs(length - 12.0) < 4 * err and err < 1.0
    assert abs((np.degrees(theta) - 30.0 + 90) % 180 - 90) < np.degrees(4 * err / length)
    stars = np.array([g[0] for g in grid[:-1]]), np.array([g[1] for g in grid[:-1]]), np.full(len(grid) - 1, flux)
    level = psf_trail_level(img, sig, None, *stars, fwhm, beta)
    trailed, _, _, _ = trailed_objects(img, sig, None, np.array([50.0, 210.0]), np.array([50.0, 210.0]),
                                       np.array([True, True]), fwhm, beta, level, min_length_px=2.0)
    assert list(trailed) == [True, False]
    # three 100-s frames 150 s apart cover 400 s (mid-times 300 s apart, stretched by 3/2)
    singles = [SingleDetections(t=60000.0 + k * 150 / 86400, ra=np.zeros(0), dec=np.zeros(0)) for k in range(3)]
    assert visit_span_hours(singles) == pytest.approx(450 / 3600)
