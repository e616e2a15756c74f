"""The combine rule of the calibration masters (gppy_calib.combine) on synthetic stacks.

The reference for the rule is an independent implementation: astropy's ``sigma_clip``
(mean centre, std, 3 sigma, 5 iterations) followed by a masked median.
"""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pytest
from astropy.stats import sigma_clip

from gppy_calib.combine import (
    combine_arrays,
    combine_bands,
    median_error_factor,
    median_network,
    sorting_network,
)


def _apply(network, values):
    v = list(values)
    for a, b in network:
        if v[a] > v[b]:
            v[a], v[b] = v[b], v[a]
    return v


@pytest.mark.parametrize("n", range(1, 9))
def test_sorting_network_sorts_every_permutation(n):
    net = sorting_network(n)
    for perm in itertools.permutations(range(n)):
        assert _apply(net, perm) == sorted(perm)


@pytest.mark.parametrize("n", [9, 10, 13, 16, 17, 25])
def test_sorting_network_sorts_random_values(n):
    # 0-1 principle: a comparator network sorts everything iff it sorts every 0/1 input
    net = sorting_network(n)
    if n <= 17:
        for bits in itertools.product((0, 1), repeat=n):
            assert _apply(net, bits) == sorted(bits)
    rng = np.random.default_rng(n)
    for _ in range(200):
        v = list(rng.normal(size=n))
        assert _apply(net, v) == sorted(v)


@pytest.mark.parametrize("n", [2, 3, 5, 8, 9, 12])
def test_median_network_gives_the_median(n):
    from gppy_calib.combine import _median_rows

    rng = np.random.default_rng(100 + n)
    x = rng.normal(size=(n, 5000)).astype(np.float32)
    med = _median_rows(np, [x[i].copy() for i in range(n)])
    assert np.array_equal(med, np.median(x, axis=0).astype(np.float32))
    assert len(median_network(n)) <= len(sorting_network(n))


def _reference(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(median of the survivors, number of survivors) by astropy."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clipped = sigma_clip(frames, sigma=3.0, maxiters=5, cenfunc="mean", stdfunc="std", axis=0)
    return np.ma.median(clipped, axis=0).filled(np.nan), (~np.ma.getmaskarray(clipped)).sum(axis=0)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 9, 10, 11, 15, 21])
def test_combine_matches_astropy_sigma_clip_then_median(n):
    rng = np.random.default_rng(n)
    frames = rng.normal(500.0, 12.0, size=(n, 41, 67)).astype(np.float32)
    frames[rng.random(frames.shape) < 0.06] += rng.uniform(50, 3000)      # outliers (cosmic rays)
    frames[rng.random(frames.shape) < 0.01] = np.nan                      # non-finite inputs
    frames[0, 3, 5] = np.inf
    out = combine_arrays(list(frames), np, band_rows=7)
    ref, survivors = _reference(frames)
    assert np.array_equal(np.isnan(out.image), np.isnan(ref))
    ok = np.isfinite(ref)
    assert np.allclose(out.image[ok], ref[ok], rtol=0, atol=1e-3)
    assert np.array_equal(out.nused, survivors)


def test_nine_frames_is_the_plain_median():
    # Samuelson: |x - mean| <= std * sqrt(n - 1) = 2.83 std < 3 std, nothing can be clipped
    rng = np.random.default_rng(9)
    frames = rng.normal(0, 1, size=(9, 64, 80)).astype(np.float32)
    frames[0] += 1e6          # even a huge outlier survives 3-sigma clipping about the mean
    out = combine_arrays(list(frames), np, band_rows=16)
    assert np.array_equal(out.image, np.median(frames, axis=0))
    assert (out.nused == 9).all()


def test_clipping_removes_outliers_with_many_frames():
    rng = np.random.default_rng(3)
    n = 21
    frames = rng.normal(100.0, 5.0, size=(n, 50, 50)).astype(np.float32)
    frames[0] += 5000.0
    out = combine_arrays(list(frames), np)
    assert (out.nused == n - 1).mean() > 0.95
    assert abs(float(np.mean(out.image)) - 100.0) < 0.1


def test_error_image_predicts_the_scatter_of_the_combined_value():
    rng = np.random.default_rng(11)
    n, sigma = 7, 12.0
    frames = rng.normal(500.0, sigma, size=(n, 300, 400)).astype(np.float32)
    out = combine_arrays(list(frames), np)
    predicted = float(np.sqrt(np.mean(out.error.astype(np.float64) ** 2)))
    # the error image is ~ k(n) sigma / sqrt(n) (from a 7-sample std, so noisy per pixel)
    truth = sigma * median_error_factor(n) / math.sqrt(n)
    measured = float(np.std(out.image))
    assert measured == pytest.approx(truth, rel=0.02)
    assert predicted == pytest.approx(truth, rel=0.03)


def test_median_error_factor_limits():
    assert median_error_factor(1) == 1.0
    assert median_error_factor(2) == 1.0
    assert median_error_factor(3) == pytest.approx(1.160, abs=0.01)   # known: 1.160 for 3 normals
    assert median_error_factor(500) == pytest.approx(math.sqrt(math.pi / 2))


def test_bands_bound_the_rows_read_at_once():
    rng = np.random.default_rng(5)
    frames = rng.normal(0, 1, size=(5, 203, 31)).astype(np.float32)
    asked: list[int] = []

    def read_band(r0, r1):
        asked.append(r1 - r0)
        return frames[:, r0:r1].copy()

    out = combine_bands(read_band, 5, (203, 31), np, band_rows=16)
    assert max(asked) <= 16 and sum(asked) == 203
    assert np.array_equal(out.image, np.median(frames, axis=0))


def test_band_reader_shape_is_checked():
    def bad_reader(r0, r1):
        return np.zeros((2, r1 - r0, 10), np.float32)

    with pytest.raises(ValueError, match="shape"):
        combine_bands(bad_reader, 3, (20, 10), np)
