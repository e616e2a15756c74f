"""Vectorised rendering of point sources, cosmic rays and trails (no loop over pixels).

Stars are drawn as elliptical Moffat profiles sampled at pixel centres in square stamps. Stars
are grouped by stamp size; each group is evaluated for many stars at once with NumPy
broadcasting and added to the image with ``np.bincount``. Each stamp is normalised to hold the
star's whole flux (the part falling outside the image is lost, as on a real detector).
"""

from __future__ import annotations

import numpy as np

from gppy.sim.optics import moffat_alpha

_HALF_SIZES = np.array([6, 8, 11, 16, 22, 32, 45, 64, 90, 128, 180])
_CHUNK_ELEMENTS = 3_000_000


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


def render_moffat(image: np.ndarray, x: np.ndarray, y: np.ndarray, flux: np.ndarray,
                  fwhm: np.ndarray, beta: np.ndarray | float, ell: np.ndarray | float = 0.0,
                  theta: np.ndarray | float = 0.0, floor_adu: float = 0.5) -> np.ndarray:
    """Add elliptical Moffat sources to ``image`` in place.

    Parameters
    ----------
    image : 2-D float array (ny, nx)
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
    x = np.asarray(x, float)
    y = np.asarray(y, float)
    flux = np.asarray(flux, float)
    fwhm = np.broadcast_to(np.asarray(fwhm, float), (n,))
    beta = np.broadcast_to(np.asarray(beta, float), (n,))
    ell = np.broadcast_to(np.asarray(ell, float), (n,))
    theta = np.broadcast_to(np.asarray(theta, float), (n,))
    half = stamp_half_size(flux, fwhm, beta, floor_adu)
    keep = (x + half >= 0) & (x - half <= nx - 1) & (y + half >= 0) & (y - half <= ny - 1) & (flux > 0)
    flat = image.reshape(-1)
    for h in np.unique(half[keep]):
        sel = np.flatnonzero(keep & (half == h))
        side = 2 * h + 1
        per = max(1, _CHUNK_ELEMENTS // (side * side))
        off = np.arange(-h, h + 1, dtype=np.float32)
        for start in range(0, sel.size, per):
            idx = sel[start:start + per]
            ix = np.rint(x[idx]).astype(np.int64)
            iy = np.rint(y[idx]).astype(np.int64)
            dx = (ix - x[idx]).astype(np.float32)[:, None, None] + off[None, None, :]
            dy = (iy - y[idx]).astype(np.float32)[:, None, None] + off[None, :, None]
            alpha = moffat_alpha(fwhm[idx], beta[idx]).astype(np.float32)
            q = np.sqrt(1.0 - ell[idx]).astype(np.float32)           # b/a = 1 - e -> sqrt
            a_ax = (alpha / q)[:, None, None]
            b_ax = (alpha * q)[:, None, None]
            c = np.cos(theta[idx]).astype(np.float32)[:, None, None]
            s = np.sin(theta[idx]).astype(np.float32)[:, None, None]
            u = dx * c + dy * s
            v = -dx * s + dy * c
            r2 = (u / a_ax) ** 2 + (v / b_ax) ** 2
            prof = np.exp(-beta[idx].astype(np.float32)[:, None, None] * np.log1p(r2))
            prof *= (flux[idx] / prof.sum(axis=(1, 2), dtype=np.float64)).astype(np.float32)[:, None, None]
            px = ix[:, None, None] + off.astype(np.int64)[None, None, :]
            py = iy[:, None, None] + off.astype(np.int64)[None, :, None]
            inside = (px >= 0) & (px < nx) & (py >= 0) & (py < ny)
            lin = (py * nx + px)[inside]
            np.add.at(flat, lin, prof[inside].astype(image.dtype))
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
