"""Stars that moved between the reference's epoch and the science's (proper motion).

A reference observed years before the science (a Pan-STARRS-like survey stack, epoch ~2013)
holds every star where it was then. A star of 50 mas/yr has moved 0.6" by 2025: more than a
pixel, and the difference shows it as a dipole of tens of sigma that hides any transient
within several arcseconds and passes the vetting as one. The stars' motions are known (the
Gaia catalogue the astrometry uses), so before the subtraction each such star's light in the
reference (on the science grid) is moved to where the star is at the science's epoch:

    R' = R - w s (R - sky) + shift(w s (R - sky), delta)

with ``s`` the star's share of each pixel's light (its expected light over that of every
catalogue star there), ``w`` a taper around it out to where its light falls below the noise,
and ``delta`` its displacement in science pixels. A neighbour keeps its own share where it is.

Units: pixel coordinates are 0-based (NumPy ``[y, x]``), displacements in pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

#: Stars that moved less than this (px) are left where they are.
MIN_SHIFT_PX = 0.1
#: The light moved around a star extends (then tapers off over one FWHM) to where a Moffat
#: profile through its peak pixel falls below this many sigma (times 1.5, for broader wings).
PROFILE_SIGMA = 0.5


@dataclass
class MovedStars:
    """What :func:`move_stars` did."""

    n_moved: int
    max_shift_px: float


def moffat(dx: np.ndarray, dy: np.ndarray, fwhm_px: float, beta: float = 3.0) -> np.ndarray:
    """Unit-integral circular Moffat profile at offsets (dx, dy) (px)."""
    alpha = fwhm_px / (2.0 * np.sqrt(2.0 ** (1.0 / beta) - 1.0))
    return (beta - 1.0) / (np.pi * alpha**2) * (1.0 + (dx**2 + dy**2) / alpha**2) ** (-beta)


def move_stars(data: np.ndarray, mask: np.ndarray | None, x_old: np.ndarray, y_old: np.ndarray,
               x_new: np.ndarray, y_new: np.ndarray, flux: np.ndarray, *, sky: float, sigma: float,
               fwhm_px: float, r_max: float = 40.0) -> tuple[np.ndarray, np.ndarray | None, MovedStars]:
    """Move the light of catalogue stars from ``(x_old, y_old)`` to ``(x_new, y_new)``.

    Each pixel's light (above the sky) is shared among the catalogue stars in proportion to
    their expected light there (``flux`` times a Moffat of ``fwhm_px``), so a star moves its
    own share only: a neighbour, brighter or not, stays where it was. A star is moved when it
    shifted by :data:`MIN_SHIFT_PX` or more and the dipole it would leave (its peak times the
    shift over half the FWHM) reaches the noise.

    Parameters
    ----------
    data : ndarray (ny, nx)
        The reference on the science grid (not modified).
    mask : uint16 ndarray or None
        Its mask: masked pixels do not move light, and a masked pixel of a moved star (its
        saturated core) is masked at the new place as well.
    x_old, y_old, x_new, y_new : arrays
        0-based positions of every catalogue star at the reference's and at the science's
        epochs.
    flux : array
        The stars' relative fluxes (any unit; from the catalogue magnitudes), NaN = unknown
        (such a star neither moves nor takes a share).
    sky, sigma : float
        The reference's sky level and per-pixel noise (its units).
    fwhm_px : float
        The reference's FWHM on the science grid (sets the shares, the smallest radius and the
        taper).
    r_max : float
        Largest radius moved around a star (px).

    Returns
    -------
    (data, mask, MovedStars)
        New arrays (float32, uint16) and a summary.
    """
    from scipy.spatial import cKDTree

    out = np.asarray(data, np.float32).copy()
    new_mask = None if mask is None else mask.copy()
    ny, nx = out.shape
    x_old, y_old = np.asarray(x_old, float), np.asarray(y_old, float)
    dx_all = np.asarray(x_new, float) - x_old
    dy_all = np.asarray(y_new, float) - y_old
    flux = np.asarray(flux, float)
    known = np.isfinite(flux) & (flux > 0) & np.isfinite(x_old) & np.isfinite(y_old)
    shift = np.where(known, np.hypot(dx_all, dy_all), 0.0)
    taper = max(fwhm_px, 1.0)
    r_min = 2.0 * fwhm_px
    alpha = fwhm_px / (2.0 * np.sqrt(2.0 ** (1.0 / 3.0) - 1.0))
    tree = cKDTree(np.column_stack([x_old[known], y_old[known]]))
    idx_known = np.flatnonzero(known)
    n_moved = 0
    max_shift = 0.0
    for k in np.flatnonzero((shift >= MIN_SHIFT_PX) & np.isfinite(shift)):
        xo, yo = x_old[k], y_old[k]
        ix, iy = int(round(xo)), int(round(yo))
        if not (0 <= ix < nx and 0 <= iy < ny):
            continue
        # cheap first look: the light at the star's pixel (all its neighbours' included) must
        # leave a visible dipole, and bounds the radius to move (a Moffat of index 3 falls to
        # PROFILE_SIGMA sigma at alpha sqrt((peak / (PROFILE_SIGMA sigma))^(1/3) - 1), taken
        # 1.5 times for broader wings)
        centre = out[max(iy - 1, 0):iy + 2, max(ix - 1, 0):ix + 2]
        peak0 = float(np.nanmax(centre)) - sky if np.isfinite(centre).any() else 0.0
        if peak0 * min(shift[k] / (0.5 * fwhm_px), 1.0) < sigma:
            continue
        ratio = max(peak0 / (PROFILE_SIGMA * sigma), 1.0)
        r_est = float(np.clip(1.5 * alpha * np.sqrt(ratio ** (1.0 / 3.0) - 1.0), r_min, r_max))
        h = int(np.ceil(r_est + taper + abs(dx_all[k]) + abs(dy_all[k]))) + 2
        ya, yb, xa, xb = max(iy - h, 0), min(iy + h + 1, ny), max(ix - h, 0), min(ix + h + 1, nx)
        cut = out[ya:yb, xa:xb].astype(np.float64) - sky
        valid = np.isfinite(cut)
        if mask is not None:
            valid &= mask[ya:yb, xa:xb] == 0
        cut = np.where(valid, cut, 0.0)
        cx, cy = xo - xa, yo - ya
        yy, xx = np.indices(cut.shape)
        r = np.hypot(xx - cx, yy - cy)
        # the star's share of each pixel's light
        near = idx_known[tree.query_ball_point([xo, yo], h + 2 * fwhm_px)]
        own = flux[k] * moffat(xx - cx, yy - cy, fwhm_px)
        total = own.copy()
        # neighbours 100 times fainter take a share too small to matter for this star
        for j in near[(near != k) & (flux[near] >= 0.01 * flux[k])]:
            total += flux[j] * moffat(xx - (x_old[j] - xa), yy - (y_old[j] - ya), fwhm_px)
        share = own / np.maximum(total, 1e-300)
        mine = share * cut
        if not valid.all():
            # masked pixels (a saturated core) get the star's profile scaled to its valid
            # pixels, so that the shifted light has no hole that the interpolation would spread
            prof = own / flux[k]
            fit = valid & (r <= 2 * fwhm_px)
            denom = float((prof[fit] ** 2).sum())
            if denom > 0:
                mine = np.where(valid, mine, float((mine[fit] * prof[fit]).sum()) / denom * prof)
        peak = float(mine[max(int(round(cy)) - 1, 0):int(round(cy)) + 2, max(int(round(cx)) - 1, 0):int(round(cx)) + 2].max(
            initial=0.0))
        if peak * min(shift[k] / (0.5 * fwhm_px), 1.0) < sigma:
            continue                     # its dipole would be lost in the noise
        w = np.clip((r_est + taper - r) / taper, 0.0, 1.0)
        w = 0.5 - 0.5 * np.cos(np.pi * w)                # 1 inside the radius, 0 beyond + taper
        part = w * mine
        moved = ndimage.shift(part, (dy_all[k], dx_all[k]), order=3, mode="constant", cval=0.0)
        out[ya:yb, xa:xb] += (moved - part).astype(np.float32)
        if new_mask is not None:
            core = np.where((r <= r_est) & (share > 0.5), mask[ya:yb, xa:xb], 0)
            if core.any():
                new_mask[ya:yb, xa:xb] |= ndimage.shift(core, (dy_all[k], dx_all[k]), order=0, mode="constant",
                                                        cval=0).astype(new_mask.dtype)
        n_moved += 1
        max_shift = max(max_shift, float(shift[k]))
    return out, new_mask, MovedStars(n_moved, max_shift)
