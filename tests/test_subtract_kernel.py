"""Building blocks of the native subtraction engine, each against an independent computation."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import binary_dilation
from scipy.signal import fftconvolve

from gppy_subtract.backend import fft_for
from gppy_subtract.convolve import (
    convolve_polynomial,
    convolve_tilewise,
    dilate,
    next_fast_len,
    polynomial_image,
)
from gppy_subtract.engine import choose_direction, region_bounds
from gppy_subtract.kernel import (
    BasisSpec,
    KernelSolution,
    design_basis,
    gaussian_hermite_basis,
    normalised_coords,
    spatial_terms,
)
from gppy_subtract.solve import FitError, StampData, fit_kernel
from gppy_subtract.stamps import adaptive_moments, find_peaks, gather_stamps, pick_stamps

FFT = fft_for(np)


def gaussian(size: int, sigma: float, dx: float = 0.0, dy: float = 0.0) -> np.ndarray:
    r = (size - 1) // 2
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    g = np.exp(-((xx - dx) ** 2 + (yy - dy) ** 2) / (2 * sigma ** 2))
    return g / g.sum()


def test_spatial_terms_and_coordinates():
    assert spatial_terms(0) == [(0, 0)]
    assert spatial_terms(2) == [(0, 0), (1, 0), (0, 1), (2, 0), (1, 1), (0, 2)]
    assert len(spatial_terms(3)) == 10
    u, v = normalised_coords(np.array([10, 19]), np.array([100, 299]), (100, 300, 10, 20))
    assert np.allclose(u, [-1, 1]) and np.allclose(v, [-1, 1])


def test_basis_flux_only_in_the_first_function():
    spec = BasisSpec(half_width=10, sigmas=(0.7, 1.5, 3.0, 6.0), degrees=(6, 4, 2, 0))
    b = gaussian_hermite_basis(spec)
    assert b.shape[1:] == (21, 21)
    assert b[0].sum() == pytest.approx(1.0)
    assert np.allclose(b[1:].sum(axis=(1, 2)), 0, atol=1e-12)
    flat = b[1:].reshape(len(b) - 1, -1)
    assert np.allclose(flat @ flat.T, np.eye(len(b) - 1), atol=1e-10)
    # 28 + 15 + 6 + 1 raw functions, some numerically degenerate on the pixel grid
    assert 30 <= len(b) <= 50


def test_basis_reproduces_a_gaussian_matching_kernel():
    # matching sigma 1.5 -> 2.5 px needs a Gaussian of sqrt(2.5^2 - 1.5^2) = 2 px, plus a shift
    spec = design_basis(1.5 * 2.3548, 2.5 * 2.3548)
    b = gaussian_hermite_basis(spec)
    target = gaussian(spec.size, 2.0, dx=0.3, dy=-0.2) * 1.7
    coef, *_ = np.linalg.lstsq(b.reshape(len(b), -1).T, target.ravel(), rcond=None)
    model = np.tensordot(coef, b, axes=1)
    assert coef[0] == pytest.approx(1.7, rel=1e-3)        # kernel sum carried by b[0] only
    assert np.max(np.abs(model - target)) < 1e-3 * target.max()


def test_design_basis_scales_with_the_matching_width():
    narrow = design_basis(3.0, 3.3)
    wide = design_basis(3.0, 8.0)
    assert narrow.sigmas[0] == pytest.approx(0.5)            # floored: near-equal PSFs
    s_match = np.sqrt((8.0 / 2.3548) ** 2 - (3.0 / 2.3548) ** 2)
    assert wide.sigmas == pytest.approx(tuple(f * s_match for f in (0.5, 1, 2, 4)), rel=1e-3)
    assert wide.half_width > narrow.half_width
    assert design_basis(3, 4, half_width=7).half_width == 7


def test_next_fast_len():
    for n in (1, 7, 97, 251, 256, 257, 1000, 3456):
        m = next_fast_len(n)
        assert m >= n
        k = m
        for p in (2, 3, 5):
            while k % p == 0:
                k //= p
        assert k == 1
        assert all(not _smooth(j) for j in range(n, m))


def _smooth(n: int) -> bool:
    for p in (2, 3, 5):
        while n % p == 0:
            n //= p
    return n == 1


def direct_spatial_convolution(image, kernel_at):
    """Reference implementation: out[y, x] = sum_u K_(x,y)(u) image[(y, x) - u] (zeros outside)."""
    k = kernel_at(0, 0).shape[0]
    r = (k - 1) // 2
    h, w = image.shape
    pad = np.pad(image, r)
    out = np.zeros_like(image, dtype=np.float64)
    for y in range(h):
        for x in range(w):
            kern = kernel_at(x, y)
            patch = pad[y:y + k, x:x + k]
            out[y, x] = np.sum(patch * kern[::-1, ::-1])
    return out


def test_polynomial_convolution_is_exact():
    rng = np.random.default_rng(3)
    h, w = 70, 90
    image = rng.normal(0, 1, (h, w)).astype(np.float32)
    bounds_full = (0, h, 0, w)
    spec = BasisSpec(half_width=4, sigmas=(0.8, 1.6), degrees=(2, 1))
    basis = gaussian_hermite_basis(spec)
    terms = spatial_terms(2)
    coeffs = rng.normal(0, 0.3, (len(basis) - 1, len(terms)))
    sol = KernelSolution(basis=basis, terms=terms, flux=1.3, coeffs=coeffs, bg_terms=[(0, 0)],
                         bg_coeffs=np.zeros(1), bounds=bounds_full)
    want = direct_spatial_convolution(image.astype(np.float64), sol.kernel_at)
    # a sub-region with a small tile size: halos come from the neighbouring real pixels
    region = (10, 60, 15, 80)
    got = convolve_polynomial(image, region, sol.term_kernels(), terms, np, FFT, tile=24, batch=5,
                              poly_bounds=bounds_full)
    assert got.shape == (50, 65)
    assert np.max(np.abs(got - want[10:60, 15:80])) < 2e-5 * np.max(np.abs(want))
    # the whole image, tiles crossing the image edge (zeros outside, as the reference)
    got_full = convolve_polynomial(image, bounds_full, sol.term_kernels(), terms, np, FFT, tile=32)
    assert np.max(np.abs(got_full - want)) < 2e-5 * np.max(np.abs(want))


def test_tilewise_convolution_equals_fftconvolve_times_the_tile_factor():
    rng = np.random.default_rng(4)
    image = rng.uniform(0, 5, (120, 100)).astype(np.float32)
    kern = gaussian(11, 1.7, dx=0.4)
    want = fftconvolve(image.astype(np.float64), kern, mode="same")
    got = convolve_tilewise(image, (0, 120, 0, 100), kern, np, FFT, tile=40)
    assert np.max(np.abs(got - want)) < 1e-5 * want.max()
    # a factor per tile (tile steps of 40 - 10 = 30 px): each tile scaled by its centre's value
    got2 = convolve_tilewise(image, (0, 120, 0, 100), kern, np, FFT, tile=40, scale_at=lambda xc, yc: 1 + xc / 100)
    ys, xs = np.mgrid[0:120, 0:100]
    factor = 1 + ((xs // 30) * 30 + 14.5) / 100
    assert np.max(np.abs(got2 - want * factor)) < 1e-5 * want.max() * 2


def test_polynomial_image():
    img = polynomial_image([2.0, 1.0, -0.5], [(0, 0), (1, 0), (0, 1)], (0, 11, 0, 21), np)
    u, v = normalised_coords(np.arange(21)[None, :], np.arange(11)[:, None], (0, 11, 0, 21))
    assert np.allclose(img, 2.0 + u - 0.5 * v, atol=1e-6)


def test_dilate_matches_scipy():
    rng = np.random.default_rng(5)
    m = rng.uniform(0, 1, (80, 60)) > 0.995
    for r in (0, 1, 4, 9):
        want = binary_dilation(m, structure=np.ones((2 * r + 1, 2 * r + 1), bool)) if r else m
        assert np.array_equal(dilate(m, r, np), want)


def test_regions_and_direction():
    b = region_bounds((6800, 10200), (3, 2))
    assert len(b) == 6
    cover = np.zeros((6800, 10200), np.int8)
    for y0, y1, x0, x1 in b:
        cover[y0:y1, x0:x1] += 1
    assert np.all(cover == 1)
    assert choose_direction(4.0, 3.0) == "reference"
    assert choose_direction(3.0, 4.0) == "science"
    assert choose_direction(3.0, 4.0, "reference") == "reference"
    with pytest.raises(ValueError):
        choose_direction(3.0, 4.0, "sideways")


def test_peaks_moments_and_stamp_grid():
    h, w = 200, 300
    yy, xx = np.mgrid[0:h, 0:w]
    pos = [(50.2, 60.7, 1000.0, 1.5), (120.0, 200.4, 500.0, 2.5), (150.5, 40.1, 300.0, 1.0)]
    img = np.zeros((h, w))
    for y, x, f, s in pos:
        img += f * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * s * s)) / (2 * np.pi * s * s)
    ys, xs, vals = find_peaks(img, np.ones_like(img), 0.0, 1.0, 5, np)
    assert sorted(zip(ys.tolist(), xs.tolist(), strict=False)) == sorted((round(y), round(x)) for y, x, _, _ in pos)
    cut = gather_stamps(img, ys, xs, 10, np)
    fwhm, dx, dy = adaptive_moments(cut, np)
    by_pos = {(int(a), int(b)): f for a, b, f in zip(ys, xs, fwhm, strict=True)}
    for y, x, _, s in pos:
        assert by_pos[(round(y), round(x))] == pytest.approx(2.3548 * s, rel=0.02)


def test_pick_stamps_spreads_over_cells():
    from gppy_subtract.stamps import Stars

    rng = np.random.default_rng(1)
    n = 500
    x = rng.integers(0, 100, n)
    y = rng.integers(0, 100, n)
    snr = rng.uniform(10, 100, n)
    z = np.zeros(n)
    stars = Stars(x=x, y=y, snr_s=snr, snr_r=snr, fwhm_s=z, fwhm_r=z, flux_s=z, flux_r=z, peak_s=z, peak_r=z)
    idx = pick_stamps(stars, (0, 100, 0, 100), (4, 4), per_cell=2)
    cells = (y[idx] * 4 // 100) * 4 + x[idx] * 4 // 100
    assert np.bincount(cells, minlength=16).max() <= 2
    assert len(idx) == 32
    for c in range(16):
        in_cell = np.nonzero((y * 4 // 100) * 4 + x * 4 // 100 == c)[0]
        best = in_cell[np.argsort(-snr[in_cell])][:2]
        assert set(best) == set(idx[cells == c])


def test_fit_recovers_a_known_spatially_varying_kernel():
    """Noise-free stamps made with a known kernel: the fit returns it and the background."""
    rng = np.random.default_rng(7)
    spec = design_basis(3.0, 5.0, half_width=8)
    basis = gaussian_hermite_basis(spec)
    bounds = (0, 1000, 0, 1000)
    n, rss, r = 60, 12, spec.half_width
    xs = rng.integers(50, 950, n)
    ys = rng.integers(50, 950, n)
    size = 2 * (rss + r) + 1

    k_a, k_b, k_c = (gaussian(2 * r + 1, 1.6), gaussian(2 * r + 1, 2.2), gaussian(2 * r + 1, 1.6, dx=0.5))

    def true_kernel(x, y):
        # width and centroid change across the field; sum 2 everywhere
        u, v = normalised_coords(x, y, bounds)
        return 2.0 * ((1 - 0.3 * (u + 1) / 2) * k_a + 0.3 * (u + 1) / 2 * k_b + 0.2 * v * (k_c - k_a))

    src = np.zeros((n, size, size))
    tgt = np.zeros((n, 2 * rss + 1, 2 * rss + 1))
    for i in range(n):
        sig = rng.uniform(1.0, 1.6)
        src[i] = rng.uniform(500, 5000) * gaussian(size, sig, rng.uniform(-.5, .5), rng.uniform(-.5, .5))
        conv = fftconvolve(src[i], true_kernel(xs[i], ys[i]), mode="same")
        yy, xx = np.mgrid[-rss:rss + 1, -rss:rss + 1]
        u, v = normalised_coords(xs[i] + xx, ys[i] + yy, bounds)
        tgt[i] = conv[r:-r, r:-r] + 3.0 + 0.5 * u - 0.25 * v
    stamps = StampData(xs=xs, ys=ys, target=tgt, var_target=np.ones_like(tgt), source=src,
                       var_source=np.full_like(src, 0.01))
    res = fit_kernel(stamps, basis, bounds, np, FFT, kernel_order=2, bg_order=1, clip=10.0)
    assert res.solution.flux == pytest.approx(2.0, rel=2e-3)
    assert res.solution.bg_coeffs == pytest.approx([3.0, 0.5, -0.25], abs=0.02)
    for x, y in [(100, 100), (500, 500), (900, 200)]:
        k = res.solution.kernel_at(x, y)
        assert np.max(np.abs(k - true_kernel(x, y))) < 0.01 * true_kernel(x, y).max()
    assert res.kept.all()


def test_fit_rejects_a_variable_star_and_refuses_too_few_stamps():
    rng = np.random.default_rng(8)
    spec = design_basis(3.0, 4.5, half_width=7)
    basis = gaussian_hermite_basis(spec)
    bounds = (0, 500, 0, 500)
    n, rss, r = 40, 10, spec.half_width
    size = 2 * (rss + r) + 1
    kern = gaussian(2 * r + 1, 1.4)
    src = np.stack([rng.uniform(2000, 8000) * gaussian(size, 1.2) for _ in range(n)])
    tgt = np.stack([fftconvolve(s, kern, mode="same")[r:-r, r:-r] for s in src])
    tgt = tgt + rng.normal(0, 1.0, tgt.shape)
    tgt[5] *= 1.5                                       # a star that brightened
    stamps = StampData(xs=rng.integers(20, 480, n), ys=rng.integers(20, 480, n), target=tgt,
                       var_target=np.ones_like(tgt), source=src, var_source=np.full_like(src, 1e-4))
    res = fit_kernel(stamps, basis, bounds, np, FFT, kernel_order=1, bg_order=0)
    assert not res.kept[5]
    assert res.kept.sum() >= n - 4
    assert res.solution.flux == pytest.approx(1.0, rel=2e-3)
    few = StampData(xs=stamps.xs[:2], ys=stamps.ys[:2], target=tgt[:2], var_target=np.ones_like(tgt[:2]),
                    source=src[:2], var_source=np.full_like(src[:2], 1e-4))
    with pytest.raises(FitError):
        fit_kernel(few, basis, bounds, np, FFT)
