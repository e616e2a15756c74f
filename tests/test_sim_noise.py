"""The simulator's read-out noise and star rendering against independent references.

The read-out draws photo-electrons plus read noise as a skew-corrected normal deviate above
``POISSON_EXACT_BELOW`` electrons and exact Poisson below it. Here the raw ADU it writes are
compared, value by value, with raw ADU made from NumPy's exact Poisson sampler plus Gaussian
read noise, rounded the same way (two-sample chi-square on the histograms), and their mean and
variance with the expected ``lam / g`` and ``lam / g^2 + RN^2 + 1/12``. A plain normal
approximation fails the chi-square at 20-100 e- (skewness 0.09-0.13 missing). The star
renderer is compared with a direct evaluation of the elliptical Moffat formula.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from gppy.sim.detector import POISSON_EXACT_BELOW, Exposure, Physics, make_detector, read_out
from gppy.sim.instrument import BIAS_LEVEL
from gppy.sim.optics import moffat_alpha
from gppy.sim.render import render_moffat, stamp_half_size

SHAPE = (500, 1000)


def _clean_detector():
    ph = Physics.none()
    ph.noise = True
    return make_detector(SHAPE, seed=3, physics=ph)


def _reference_adu(lam: np.ndarray, det, rng: np.random.Generator) -> np.ndarray:
    """Raw ADU from exact Poisson electrons + Gaussian read noise (float64), rounded, clipped."""
    e = rng.poisson(lam).astype(np.float64) + det.read_noise_e * rng.standard_normal(lam.shape)
    return np.clip(np.rint(e / det.gain + BIAS_LEVEL), 0, 65535)


def _chi2_two_sample(a: np.ndarray, b: np.ndarray, min_count: int = 20) -> tuple[float, int]:
    lo = int(min(a.min(), b.min()))
    ha = np.bincount((a - lo).astype(np.int64).ravel())
    hb = np.bincount((b - lo).astype(np.int64).ravel())
    m = max(ha.size, hb.size)
    ha, hb = np.pad(ha, (0, m - ha.size)), np.pad(hb, (0, m - hb.size))
    ok = (ha + hb) >= min_count
    chi = float(((ha[ok] - hb[ok]) ** 2 / (ha[ok] + hb[ok])).sum())
    return chi, int(ok.sum()) - 1


@pytest.mark.parametrize("lam_e", [3.0, 12.0, POISSON_EXACT_BELOW, 30.0, 100.0, 6400.0])
def test_read_out_matches_poisson_plus_read_noise(lam_e):
    det = _clean_detector()
    assert np.all(det.flat("r") == 1.0) and np.all(det.bias == BIAS_LEVEL)
    exp = Exposure(10.0, "r", np.float32(lam_e / det.gain))        # uniform illumination, ADU
    raw = read_out(det, exp, np.random.default_rng(7)).astype(np.float64)
    ref = _reference_adu(np.full(SHAPE, lam_e), det, np.random.default_rng(8))
    n = raw.size
    # mean and variance against the expectation (5 sigma of their sampling errors)
    var_expect = lam_e / det.gain ** 2 + det.read_noise_adu ** 2 + 1.0 / 12.0
    assert abs(raw.mean() - BIAS_LEVEL - lam_e / det.gain) < 5 * np.sqrt(var_expect / n)
    assert abs(raw.var() / var_expect - 1) < 5 * np.sqrt(2.0 / n)
    # the whole distribution against the exact one
    chi, dof = _chi2_two_sample(raw, ref)
    assert stats.chi2.sf(chi, dof) > 1e-4, (lam_e, chi, dof)


def test_a_plain_normal_approximation_would_be_caught():
    """The chi-square above has the power to see the missing skewness of a plain normal."""
    det = _clean_detector()
    rng = np.random.default_rng(9)
    lam = 30.0
    plain = np.clip(np.rint((lam + np.sqrt(lam + det.read_noise_e ** 2) * rng.standard_normal(SHAPE)) / det.gain
                            + BIAS_LEVEL), 0, 65535)
    ref = _reference_adu(np.full(SHAPE, lam), det, np.random.default_rng(10))
    chi, dof = _chi2_two_sample(plain, ref)
    assert stats.chi2.sf(chi, dof) < 1e-6


def test_read_out_across_the_exact_poisson_threshold():
    """A ramp of 5..60 e- (both branches in one frame): the pooled histogram matches the exact
    one, and mean and variance follow lam in every slice of the ramp."""
    det = _clean_detector()
    ny, nx = SHAPE
    lam = np.broadcast_to(np.linspace(5.0, 60.0, nx, dtype=np.float32)[None, :], SHAPE)
    exp = Exposure(10.0, "r", np.ascontiguousarray(lam / np.float32(det.gain)))
    raw = read_out(det, exp, np.random.default_rng(11)).astype(np.float64)
    ref = _reference_adu(np.asarray(lam, np.float64), det, np.random.default_rng(12))
    chi, dof = _chi2_two_sample(raw, ref)
    assert stats.chi2.sf(chi, dof) > 1e-4, (chi, dof)
    for c0 in range(0, nx, 100):
        sl = raw[:, c0:c0 + 100] - BIAS_LEVEL
        lam_s = lam[:, c0:c0 + 100].astype(np.float64)
        expect_var = lam_s.mean() / det.gain ** 2 + det.read_noise_adu ** 2 + 1 / 12 + lam_s.var() / det.gain ** 2
        assert abs(sl.mean() - lam_s.mean() / det.gain) < 5 * np.sqrt(expect_var / sl.size)
        assert abs(sl.var() / expect_var - 1) < 5 * np.sqrt(2.0 / sl.size)


def test_bias_frame_is_read_noise_only():
    det = _clean_detector()
    raw = read_out(det, Exposure(0.0, None, None), np.random.default_rng(13)).astype(np.float64)
    expect = det.read_noise_adu ** 2 + 1.0 / 12.0
    assert abs(raw.mean() - BIAS_LEVEL) < 5 * np.sqrt(expect / raw.size)
    assert abs(raw.var() / expect - 1) < 5 * np.sqrt(2.0 / raw.size)


def _moffat_direct(shape, x, y, flux, fwhm, beta, ell, theta):
    """Each star evaluated pixel by pixel on its stamp from the formula, normalised over the
    stamp, clipped at the edges."""
    img = np.zeros(shape)
    ny, nx = shape
    half = stamp_half_size(flux, fwhm, beta)
    for i in range(len(x)):
        h = int(half[i])
        ix, iy = int(np.rint(x[i])), int(np.rint(y[i]))
        yy, xx = np.mgrid[iy - h:iy + h + 1, ix - h:ix + h + 1]
        dx, dy = xx - x[i], yy - y[i]
        alpha = float(moffat_alpha(fwhm[i], beta[i]))
        q = np.sqrt(1 - ell[i])
        u = dx * np.cos(theta[i]) + dy * np.sin(theta[i])
        v = -dx * np.sin(theta[i]) + dy * np.cos(theta[i])
        prof = (1 + (u / (alpha / q)) ** 2 + (v / (alpha * q)) ** 2) ** (-beta[i])
        prof *= flux[i] / prof.sum()
        ok = (xx >= 0) & (xx < nx) & (yy >= 0) & (yy < ny)
        np.add.at(img, (yy[ok], xx[ok]), prof[ok])
    return img


def test_star_rendering_matches_the_moffat_formula():
    rng = np.random.default_rng(14)
    shape = (120, 160)
    n = 40
    x = np.r_[rng.uniform(-3, 163, n - 4), [-2.0, 0.3, 159.6, 80.0]]
    y = np.r_[rng.uniform(-3, 123, n - 4), [60.0, 119.8, -1.0, 60.4]]
    flux = np.r_[10 ** rng.uniform(1, 5, n - 1), [3e6]]                # one bright star, large stamp
    fwhm = rng.uniform(2.0, 7.0, n)
    beta = rng.uniform(2.3, 5.0, n)
    ell = rng.uniform(0.0, 0.4, n)
    theta = rng.uniform(-np.pi, np.pi, n)
    ours = render_moffat(np.zeros(shape, np.float32), x, y, flux, fwhm, beta, ell, theta)
    direct = _moffat_direct(shape, x, y, flux, fwhm, beta, ell, theta)
    # float32 arithmetic: relative 1e-5 of the brightest pixel around each value
    assert np.max(np.abs(ours - direct)) < 1e-5 * direct.max()
    assert np.max(np.abs(ours - direct) / np.maximum(direct, 1e-3)) < 1e-3
