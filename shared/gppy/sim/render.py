"""Vectorised rendering of point sources, cosmic rays and trails (no loop over pixels).

Stars are drawn as elliptical Moffat profiles sampled at pixel centres in square stamps. Stars
are grouped by stamp size; for each group the squared elliptical radius of every stamp pixel
of many stars at once is one matrix product (per-star coefficients of a quadratic form times
a fixed basis of the stamp grid), the profile is ``exp(-beta * log(1 + r^2))`` in float32, and
the stamps are added to the image with ``np.add.at`` on flat indices (a buffered scatter-add
that handles overlapping stamps). Stamps that cross the image edge are clipped; each stamp is
normalised to hold the star's whole flux (the part falling outside the image is lost, as on a
real detector).
"""

from __future__ import annotations

import numpy as np
from threadpoolctl import threadpool_limits

from gppy.sim.optics import moffat_alpha

_HALF_SIZES = np.array([6, 8, 11, 16, 22, 32, 45, 64, 90, 128, 180])
_CHUNK_ELEMENTS = 2_000_000


def stamp_half_size(flux: np.ndarray, fwhm: np.ndarray, beta: np.ndarray | float,
                    floor_adu: float = 0.5) -> np.ndarray:
    """Half size (px) of the stamp needed so the profile has fallen below ``floor_adu`` and at
    least 3.5 FWHM; rounded up to a few fixed classes."""
    beta = np.broadcast_to(np.asarray(beta, float), np.shape(flux))
    alpha = moffat_alpha(fwhm, beta)
    peak = np.maximum(flux, 1e-9) * (beta - 1) / (np.pi * alpha * alpha)
    ratio = np.maximum(peak / floor_adu, 1.0)
    r_floor = alpha * np.sqrt(np.maximum(ratio ** (1.0 / beta) - 1.0, 0.0))
    need = np.maximum(r_floor, 3.5 * fwhm)
    idx = np.searchsorted(_HALF_SIZES, need)
    return _HALF_SIZES[np.minimum(idx, len(_HALF_SIZES) - 1)]


def _stamp_grid(h: int, nx: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Basis ``(gx^2, gx gy, gy^2, gx, gy, 1)`` of a (2h+1)^2 stamp (float32, shape (6, npx)),
    the flat-index offsets of its pixels in an image ``nx`` wide, and the integer offsets."""
    g = np.arange(-h, h + 1)
    side = g.size
    gx, gy = np.tile(g, side), np.repeat(g, side)
    fx, fy = gx.astype(np.float32), gy.astype(np.float32)
    basis = np.stack([fx * fx, fx * fy, fy * fy, fx, fy, np.ones_like(fx)])
    return basis, gy.astype(np.int64) * nx + gx, gx, gy


def render_moffat(image: np.ndarray, x: np.ndarray, y: np.ndarray, flux: np.ndarray,
                  fwhm: np.ndarray, beta: np.ndarray | float, ell: np.ndarray | float = 0.0,
                  theta: np.ndarray | float = 0.0, floor_adu: float = 0.5) -> np.ndarray:
    """Add elliptical Moffat sources to ``image`` in place.

    Parameters
    ----------
    image : 2-D float array (ny, nx), C-contiguous
        Image in the flux unit of ``flux``.
    x, y : arrays
        0-based pixel positions of the centres.
    flux : array
        Total flux of each source (image units).
    fwhm : array
        FWHM (px), geometric mean of the axes.
    beta : float or array
        Moffat index.
    ell, theta : float or arrays
        Ellipticity ``1 - b/a`` and position angle (rad, from +x towards +y).
    floor_adu : float
        Stamps extend until the profile falls below this value (image units).

    Returns
    -------
    image : the same array.
    """
    ny, nx = image.shape
    n = np.size(x)
    if n == 0:
        return image
    x = np.asarray(x, float).reshape(-1)
    y = np.asarray(y, float).reshape(-1)
    flux = np.asarray(flux, float).reshape(-1)
    fwhm = np.broadcast_to(np.asarray(fwhm, float), (n,))
    beta = np.broadcast_to(np.asarray(beta, float), (n,))
    ell = np.broadcast_to(np.asarray(ell, float), (n,))
    theta = np.broadcast_to(np.asarray(theta, float), (n,))
    half = stamp_half_size(flux, fwhm, beta, floor_adu)
    keep = (x + half >= 0) & (x - half <= nx - 1) & (y + half >= 0) & (y - half <= ny - 1) & (flux > 0)
    if not keep.any():
        return image
    if not image.flags.c_contiguous:
        raise ValueError("render_moffat adds in place through a flat view: the image must be C-contiguous")
    flat = image.reshape(-1)
    ix = np.rint(x).astype(np.int64)
    iy = np.rint(y).astype(np.int64)
    # (u/a)^2 + (v/b)^2 with u = dx c + dy s, v = -dx s + dy c, a = alpha/q, b = alpha q,
    # q = sqrt(1 - e), written as A dx^2 + B dx dy + C dy^2 with dx = gx + fx, dy = gy + fy
    alpha = moffat_alpha(fwhm, beta)
    q = np.sqrt(1.0 - ell)
    ia2, ib2 = (q / alpha) ** 2, 1.0 / (alpha * q) ** 2
    c, s = np.cos(theta), np.sin(theta)
    qa = c * c * ia2 + s * s * ib2
    qb = 2.0 * c * s * (ia2 - ib2)
    qc = s * s * ia2 + c * c * ib2
    fx, fy = ix - x, iy - y
    coef = np.stack([qa, qb, qc, 2 * qa * fx + qb * fy, qb * fx + 2 * qc * fy,
                     qa * fx * fx + qb * fx * fy + qc * fy * fy], axis=1).astype(np.float32)
    mbeta = (-beta).astype(np.float32)
    one_beta = bool(np.all(beta == beta[0]))
    with threadpool_limits(1, user_api="blas"):   # one core per process (frames run in parallel)
        for h in np.unique(half[keep]):
            h = int(h)
            sel = np.flatnonzero(keep & (half == h))
            sel = sel[np.argsort(iy[sel], kind="stable")]          # chunks touch bands of rows
            edge = (ix[sel] < h) | (ix[sel] > nx - 1 - h) | (iy[sel] < h) | (iy[sel] > ny - 1 - h)
            basis, goff, gx, gy = _stamp_grid(h, nx)
            per = max(1, _CHUNK_ELEMENTS // goff.size)
            for part, clipped in ((sel[~edge], False), (sel[edge], True)):
                for start in range(0, part.size, per):
                    idx = part[start:start + per]
                    prof = coef[idx] @ basis                        # r^2, (n, npx)
                    prof += np.float32(1.0)
                    np.log(prof, out=prof)
                    if one_beta:
                        prof *= mbeta[0]
                    else:
                        prof *= mbeta[idx][:, None]
                    np.exp(prof, out=prof)
                    prof *= (flux[idx] / prof.sum(axis=1)).astype(np.float32)[:, None]   # float32 pairwise sum
                    lin = (iy[idx] * nx + ix[idx])[:, None] + goff[None, :]
                    if clipped:
                        px = ix[idx][:, None] + gx[None, :]
                        py = iy[idx][:, None] + gy[None, :]
                        inside = (px >= 0) & (px < nx) & (py >= 0) & (py < ny)
                        lin, prof = lin[inside], prof[inside]
                    np.add.at(flat, lin.reshape(-1), prof.reshape(-1).astype(image.dtype, copy=False))
    return image


def cosmic_rays(shape: tuple[int, int], n: int, rng: np.random.Generator,
                mean_length: float = 3.0, charge_e: tuple[float, float] = (300.0, 6000.0)
                ) -> tuple[np.ndarray, np.ndarray]:
    """Cosmic-ray hits: ``n`` short straight tracks.

    Returns
    -------
    pix : int array
        Flat indices (``y * nx + x``) of every pixel hit (may repeat).
    electrons : float array
        Charge deposited in each of those pixels (e-).
    """
    ny, nx = shape
    if n <= 0:
        return np.zeros(0, np.int64), np.zeros(0)
    x0 = rng.uniform(0, nx - 1, n)
    y0 = rng.uniform(0, ny - 1, n)
    length = np.minimum(rng.exponential(mean_length, n), 40.0)
    ang = rng.uniform(0, np.pi, n)
    total = np.exp(rng.uniform(np.log(charge_e[0]), np.log(charge_e[1]), n)) * (1 + length)
    nstep = np.maximum(1, np.ceil(length * 2).astype(int) + 1)
    rep = np.repeat(np.arange(n), nstep)
    frac = np.concatenate([np.linspace(0.0, 1.0, k) if k > 1 else np.zeros(1) for k in nstep])
    xs = np.rint(x0[rep] + frac * length[rep] * np.cos(ang[rep])).astype(np.int64)
    ys = np.rint(y0[rep] + frac * length[rep] * np.sin(ang[rep])).astype(np.int64)
    q = total[rep] / nstep[rep]
    ok = (xs >= 0) & (xs < nx) & (ys >= 0) & (ys < ny)
    return (ys * nx + xs)[ok], q[ok]


def line_profile(shape: tuple[int, int], p0: tuple[float, float], p1: tuple[float, float],
                 fwhm_px: float, rows: slice | None = None) -> np.ndarray:
    """Unit-peak Gaussian cross-section of the infinite line through ``p0``, ``p1`` (0-based
    x, y), evaluated on the rows ``rows`` of an image of ``shape`` (float32)."""
    ny, nx = shape
    rows = rows or slice(0, ny)
    yy = np.arange(rows.start, rows.stop, dtype=np.float32)[:, None]
    xx = np.arange(nx, dtype=np.float32)[None, :]
    (x0, y0), (x1, y1) = p0, p1
    dxl, dyl = x1 - x0, y1 - y0
    norm = np.hypot(dxl, dyl)
    dist = ((xx - x0) * dyl - (yy - y0) * dxl) / norm
    sigma = fwhm_px / 2.3548
    return np.exp(-0.5 * (dist / sigma) ** 2).astype(np.float32)


def line_strip(shape: tuple[int, int], p0: tuple[float, float], p1: tuple[float, float],
               fwhm_px: float, nsigma: float = 10.0) -> tuple[np.ndarray, np.ndarray]:
    """The pixels within ``nsigma`` sigma of the infinite line through ``p0``, ``p1`` (0-based
    x, y) and the unit-peak Gaussian cross-section there (the values of :func:`line_profile`;
    beyond ``nsigma`` = 10 they are below 2e-22 of the peak).

    Returns
    -------
    lin : int64 array
        Flat indices ``y * nx + x``, each pixel once.
    prof : float32 array
        Profile at those pixels.
    """
    ny, nx = shape
    (x0, y0), (x1, y1) = p0, p1
    dxl, dyl = x1 - x0, y1 - y0
    norm = float(np.hypot(dxl, dyl))
    sigma = fwhm_px / 2.3548
    reach = nsigma * sigma
    if abs(dxl) >= abs(dyl):          # shallow: a few rows about the line in every column
        along = np.arange(nx)
        centre = y0 + (along - x0) * (dyl / dxl)
        half = int(np.ceil(reach * norm / abs(dxl))) + 1
        across = np.rint(centre).astype(np.int64)[:, None] + np.arange(-half, half + 1)[None, :]
        xs, ys = np.broadcast_to(along[:, None], across.shape), across
        ok = (ys >= 0) & (ys < ny)
    else:                             # steep: a few columns about the line in every row
        along = np.arange(ny)
        centre = x0 + (along - y0) * (dxl / dyl)
        half = int(np.ceil(reach * norm / abs(dyl))) + 1
        across = np.rint(centre).astype(np.int64)[:, None] + np.arange(-half, half + 1)[None, :]
        xs, ys = across, np.broadcast_to(along[:, None], across.shape)
        ok = (xs >= 0) & (xs < nx)
    xs, ys = xs[ok], ys[ok]
    xx, yy = xs.astype(np.float32), ys.astype(np.float32)
    dist = ((xx - x0) * dyl - (yy - y0) * dxl) / norm
    prof = np.exp(-0.5 * (dist / sigma) ** 2).astype(np.float32)
    near = np.abs(dist) <= reach
    return (ys * nx + xs)[near], prof[near]
