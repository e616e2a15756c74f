"""Stars moved from the reference's epoch to the science's (gppy_subtract.propermotion).

Images are rendered with a known Moffat PSF: the reference with a star at its old place and
a neighbour that did not move, the truth with the star at its new place. Moving the star
must turn the one into the other, to a small fraction of the dipole the shift leaves,
without touching the neighbour.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "services" / "subtract"))

from gppy_subtract.propermotion import moffat, move_stars  # noqa: E402

FWHM = 4.0
SKY = 100.0
SIGMA = 5.0
SHAPE = (160, 200)


def render(stars: list[tuple[float, float, float]]) -> np.ndarray:
    """Sky plus stars (x, y, flux), each integrated over its pixels (4x4 sub-samples)."""
    ny, nx = SHAPE
    img = np.full(SHAPE, SKY)
    off = (np.arange(4) + 0.5) / 4 - 0.5
    yy, xx = np.mgrid[0:ny, 0:nx]
    for x, y, f in stars:
        acc = np.zeros(SHAPE)
        for oy in off:
            for ox in off:
                acc += moffat(xx + ox - x, yy + oy - y, FWHM)
        img += f * acc / 16
    return img


def centroid(img: np.ndarray, x: float, y: float, h: int = 4, good: np.ndarray | None = None) -> tuple[float, float]:
    """First moment in a (2h+1)^2 box (over the ``good`` pixels only)."""
    iy, ix = int(round(y)), int(round(x))
    c = img[iy - h:iy + h + 1, ix - h:ix + h + 1] - SKY
    if good is not None:
        c = np.where(good[iy - h:iy + h + 1, ix - h:ix + h + 1], c, 0.0)
    yy, xx = np.mgrid[-h:h + 1, -h:h + 1]
    return float((xx * c).sum() / c.sum() + ix), float((yy * c).sum() / c.sum() + iy)


STAR_OLD, STAR_NEW, STAR_FLUX = (60.3, 70.2), (61.7, 69.3), 2.0e5
NEIGHBOUR = (74.0, 71.0, 6.0e4)          # 13.7 px away: inside the moved star's radius
SLOW = (170.0, 30.0, 1.0e5)              # moved by 0.05 px: left alone


def _run():
    ref = render([(*STAR_OLD, STAR_FLUX), NEIGHBOUR, SLOW]).astype(np.float32)
    truth = render([(*STAR_NEW, STAR_FLUX), NEIGHBOUR, SLOW])
    x_old = np.array([STAR_OLD[0], NEIGHBOUR[0], SLOW[0]])
    y_old = np.array([STAR_OLD[1], NEIGHBOUR[1], SLOW[1]])
    x_new = np.array([STAR_NEW[0], NEIGHBOUR[0], SLOW[0] + 0.05])
    y_new = np.array([STAR_NEW[1], NEIGHBOUR[1], SLOW[1]])
    flux = np.array([STAR_FLUX, NEIGHBOUR[2], SLOW[2]])
    mask = np.zeros(SHAPE, np.uint16)
    mask[70, 60] = 2                      # the star's saturated core pixel in the reference
    out, new_mask, summary = move_stars(ref, mask, x_old, y_old, x_new, y_new, flux, sky=SKY, sigma=SIGMA,
                                        fwhm_px=FWHM)
    return ref, truth, out, new_mask, summary


def test_the_moved_star_lands_where_the_science_sees_it():
    ref, truth, out, new_mask, summary = _run()
    assert summary.n_moved == 1
    assert summary.max_shift_px == pytest.approx(np.hypot(1.4, 0.9), abs=1e-9)
    peak = STAR_FLUX * moffat(np.zeros(1), np.zeros(1), FWHM)[0]
    good = new_mask == 0                  # a masked pixel keeps its (unused) value
    before = np.abs(ref - truth)[good].max()
    after = np.abs(out - truth)[good].max()
    # the shift leaves a dipole of ~half the star's peak; what is left is a few percent of it
    assert before > 0.3 * peak
    assert after < 0.05 * before, (before, after)
    # the same moments as the true image's, on the same pixels
    (cx, cy), (tx, ty) = centroid(out, *STAR_NEW, good=good), centroid(truth, *STAR_NEW, good=good)
    assert abs(cx - tx) < 0.02 and abs(cy - ty) < 0.02, (cx, cy, tx, ty)
    # flux conserved within the star's surroundings
    sl = (slice(45, 95), slice(40, 90))
    assert (np.where(good, out, truth)[sl] - SKY).sum() == pytest.approx((truth[sl] - SKY).sum(), rel=0.01)


def test_the_neighbour_and_a_slow_star_stay_put():
    ref, truth, out, _, _ = _run()
    nx_, ny_ = centroid(out, NEIGHBOUR[0], NEIGHBOUR[1], h=2)
    assert abs(nx_ - NEIGHBOUR[0]) < 0.1 and abs(ny_ - NEIGHBOUR[1]) < 0.1, (nx_, ny_)
    far = (slice(10, 50), slice(150, 190))  # around SLOW: unchanged to the bit
    assert np.array_equal(out[far], ref[far])


def test_a_masked_core_is_masked_where_the_star_went():
    _, _, _, new_mask, _ = _run()
    assert new_mask[70, 60] == 2             # kept where it was (the reference's pixel is bad)
    assert new_mask[69, 61] == 2 or new_mask[69, 62] == 2   # and where the core moved to
    assert np.count_nonzero(new_mask) <= 2
