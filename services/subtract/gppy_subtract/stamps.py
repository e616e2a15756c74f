"""Stamp stars: isolated, unsaturated, unmasked point sources found in both images.

Both images are on the same pixel grid. Each is searched for local maxima of its per-pixel
signal-to-noise ``(data - sky) / sigma``; maxima found in both within 2 px are measured
(adaptive Gaussian moments -> FWHM, aperture flux) and kept when they are star-like in both
images (FWHM within a factor of the median), below the saturation level, free of masked
pixels over the whole stamp plus kernel footprint, away from the image edge, and without a
comparably bright neighbour inside the stamp. Stamps are then spread over each region on a
grid of cells (HOTPANTS' ``-nsx``/``-nsy``), the brightest few per cell.

All image-sized work takes ``xp`` (NumPy or CuPy); the short star lists are host arrays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gppy.xp import to_host

from .kernel import FWHM_PER_SIGMA

#: the 8 neighbours of a pixel; the first four must be strictly lower, the last four lower
#: or equal, so that a two-pixel plateau yields exactly one peak
_NEIGHBOURS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


def sky_level(data, mask, xp, step: int = 5) -> tuple[float, float]:
    """Robust sky level and pixel noise of an image from a sub-sample of unmasked pixels.

    Parameters
    ----------
    data : array (H, W)
        Image (any units).
    mask : array (H, W) of int
        Bit mask; non-zero pixels are ignored.
    step : int
        Sampling step along both axes.

    Returns
    -------
    (float, float)
        Median and 1.4826 x median absolute deviation, in image units.
    """
    sub = data[::step, ::step]
    ok = (mask[::step, ::step] == 0) & xp.isfinite(sub)
    vals = sub[ok]
    if vals.size < 10:
        return 0.0, 1.0
    med = float(xp.median(vals))
    mad = float(xp.median(xp.abs(vals - med)))
    return med, 1.4826 * mad


def find_peaks(data, var, sky: float, threshold: float, border: int, xp):
    """Local maxima of the per-pixel signal-to-noise ``(data - sky) / sqrt(var)`` above ``threshold``.

    The S/N is computed only at pixels that pass the threshold test
    ``(data - sky)^2 > threshold^2 var`` and at their neighbours, not as a full image.

    Parameters
    ----------
    data : array (H, W)
        Image (its units).
    var : array (H, W)
        Background variance (units^2); pixels with ``var <= 0`` (masked) never peak.
    sky : float
        Sky level subtracted from ``data``.
    threshold : float
        Minimum peak S/N.
    border : int
        Peaks closer than this to an edge are ignored (px, >= 1).

    Returns
    -------
    ys, xs, values : host arrays
        Peak rows, columns (0-based) and their S/N, brightest first.
    """
    h, w = data.shape
    b = max(int(border), 1)
    if h <= 2 * b or w <= 2 * b:
        return np.zeros(0, int), np.zeros(0, int), np.zeros(0)
    d = xp.subtract(data, xp.float32(sky), dtype=xp.float32)
    hit = d > 0
    d *= d
    d *= xp.float32(1.0 / (threshold * threshold))
    hit &= d > var
    del d
    hit[:b] = False
    hit[h - b:] = False
    hit[:, :b] = False
    hit[:, w - b:] = False
    iy, ix = xp.nonzero(hit)
    del hit

    def snr_at(yy, xx):
        v = var[yy, xx]
        return xp.where(v > 0, (data[yy, xx] - sky) / xp.sqrt(xp.where(v > 0, v, 1)), 0)

    vals = snr_at(iy, ix)
    is_max = xp.ones(vals.shape, dtype=bool)
    for k, (dy, dx) in enumerate(_NEIGHBOURS):
        nb = snr_at(iy + dy, ix + dx)
        is_max &= (vals > nb) if k < 4 else (vals >= nb)
    ys, xs, v = to_host(iy[is_max]), to_host(ix[is_max]), to_host(vals[is_max]).astype(float)
    order = np.argsort(-v, kind="stable")
    return ys[order].astype(int), xs[order].astype(int), v[order]


def gather_stamps(data, ys, xs, half: int, xp):
    """Square cut-outs ``data[y-half:y+half+1, x-half:x+half+1]`` for every centre.

    The centres must lie at least ``half`` pixels inside the image.

    Returns
    -------
    array (n, 2*half+1, 2*half+1), same dtype and backend as ``data``.
    """
    off = xp.arange(-half, half + 1)
    yy = xp.asarray(ys)[:, None, None] + off[None, :, None]
    xx = xp.asarray(xs)[:, None, None] + off[None, None, :]
    return data[yy, xx]


def adaptive_moments(stamps, xp, sigma0: float = 2.0, n_iter: int = 12):
    """FWHM and centroid offset of point sources by adaptive Gaussian-weighted moments.

    Parameters
    ----------
    stamps : array (n, s, s)
        Background-subtracted cut-outs centred (to 1 px) on each source.
    sigma0 : float
        Starting weight width (px).

    Returns
    -------
    fwhm, dx, dy : host arrays (n,)
        FWHM (px) of the Gaussian with the same adaptive second moment, and the centroid
        offset (px) from the stamp centre. NaN where the moments do not converge.
    """
    n, s, _ = stamps.shape
    c = (s - 1) / 2.0
    grid = xp.arange(s, dtype=xp.float64) - c
    img = stamps.astype(xp.float64)
    sw = xp.full(n, sigma0, dtype=xp.float64)
    cx = xp.zeros(n)
    cy = xp.zeros(n)
    for _ in range(n_iter):
        dx = grid[None, None, :] - cx[:, None, None]
        dy = grid[None, :, None] - cy[:, None, None]
        r2 = dx * dx + dy * dy
        wgt = xp.exp(-0.5 * r2 / (sw * sw)[:, None, None]) * img
        tot = wgt.sum(axis=(1, 2))
        tot = xp.where(tot > 0, tot, xp.nan)
        mx = (wgt * dx).sum(axis=(1, 2)) / tot
        my = (wgt * dy).sum(axis=(1, 2)) / tot
        m2 = 0.5 * (wgt * r2).sum(axis=(1, 2)) / tot
        cx = xp.clip(cx + mx, -2.0, 2.0)
        cy = xp.clip(cy + my, -2.0, 2.0)
        sw = xp.clip(xp.sqrt(xp.abs(2.0 * m2)), 0.3, s / 3.0)
        sw = xp.where(xp.isfinite(sw), sw, sigma0)
    fwhm = to_host(sw) * FWHM_PER_SIGMA
    bad = ~np.isfinite(to_host(tot))
    fwhm[bad] = np.nan
    return fwhm, to_host(cx), to_host(cy)


@dataclass
class Stars:
    """Stars found in both images (host arrays, one entry per star).

    Attributes
    ----------
    x, y : int arrays
        Stamp centres (px, 0-based; the science peak).
    snr_s, snr_r : float arrays
        Peak pixel signal-to-noise in the science and in the reference image.
    fwhm_s, fwhm_r : float arrays
        Adaptive-moment FWHM (px) in the science and reference images.
    flux_s, flux_r : float arrays
        Aperture fluxes above the local sky (image units), radius 2 x FWHM.
    peak_s, peak_r : float arrays
        Peak pixel values (image units, sky included), for the saturation test.
    """

    x: np.ndarray
    y: np.ndarray
    snr_s: np.ndarray
    snr_r: np.ndarray
    fwhm_s: np.ndarray
    fwhm_r: np.ndarray
    flux_s: np.ndarray
    flux_r: np.ndarray
    peak_s: np.ndarray
    peak_r: np.ndarray

    def __len__(self) -> int:
        return int(self.x.size)

    def take(self, idx) -> Stars:
        return Stars(**{k: getattr(self, k)[idx] for k in self.__dataclass_fields__})


def _measure(data, sky: float, ys, xs, half: int, xp):
    st = gather_stamps(data, ys, xs, half, xp).astype(xp.float64)
    ring = xp.concatenate([st[:, 0, :], st[:, -1, :], st[:, 1:-1, 0], st[:, 1:-1, -1]], axis=1)
    local = xp.median(ring, axis=1)
    sub = st - local[:, None, None]
    fwhm, _, _ = adaptive_moments(sub, xp)
    off = np.arange(-half, half + 1)
    r = np.hypot(off[None, :], off[:, None])
    peak = to_host(st[:, half, half])
    return sub, fwhm, peak, to_host(local), r


def find_stars(sci_data, sci_var, sci_mask, ref_data, ref_var, ref_mask, xp, *, detect_snr: float = 10.0,
               border: int = 20, match_radius: float = 2.0, saturate_sci: float | None = None,
               saturate_ref: float | None = None, sat_fraction: float = 0.8, size_range=(0.6, 1.6),
               max_stars: int = 60000) -> Stars:
    """Point sources detected in both images, with their sizes and fluxes.

    Parameters
    ----------
    sci_data, ref_data : arrays (H, W)
        Science and reference images on the same grid (their own units).
    sci_var, ref_var : arrays (H, W)
        Background variance (units^2); <= 0 where unknown.
    sci_mask, ref_mask : arrays (H, W) of uint16
        Bit masks (non-zero = bad).
    detect_snr : float
        Minimum peak pixel signal-to-noise in both images.
    border : int
        Minimum distance of a star from the image edge (px).
    match_radius : float
        Maximum distance (px) between the science and the reference peak.
    saturate_sci, saturate_ref : float, optional
        Saturation levels (image units); stars with a peak above ``sat_fraction`` of it are
        dropped.
    size_range : (float, float)
        Accepted FWHM range as multiples of the median FWHM (per image).
    max_stars : int
        Only the brightest this many science peaks are measured.

    Returns
    -------
    Stars
    """
    sky_s, _ = sky_level(sci_data, sci_mask, xp)
    sky_r, _ = sky_level(ref_data, ref_mask, xp)
    ys, xs, vs = find_peaks(sci_data, sci_var, sky_s, detect_snr, border, xp)
    yr, xr, vr = find_peaks(ref_data, ref_var, sky_r, detect_snr, border, xp)
    empty = Stars(*(np.zeros(0, int),) * 2, *(np.zeros(0),) * 8)
    if ys.size == 0 or yr.size == 0:
        return empty
    ys, xs, vs = ys[:max_stars], xs[:max_stars], vs[:max_stars]
    from scipy.spatial import cKDTree

    tree = cKDTree(np.column_stack([yr, xr]))
    dist, j = tree.query(np.column_stack([ys, xs]), k=1, distance_upper_bound=match_radius)
    ok = np.isfinite(dist)
    if not ok.any():
        return empty
    ys, xs, vs, jr = ys[ok], xs[ok], vs[ok], j[ok]
    half = 8
    keep_b = (ys >= half) & (xs >= half) & (ys < sci_data.shape[0] - half) & (xs < sci_data.shape[1] - half)
    ys, xs, vs, jr = ys[keep_b], xs[keep_b], vs[keep_b], jr[keep_b]
    sub_s, fw_s, pk_s, _, rgrid = _measure(sci_data, sky_s, ys, xs, half, xp)
    sub_r, fw_r, pk_r, _, _ = _measure(ref_data, sky_r, ys, xs, half, xp)
    med_s = np.nanmedian(fw_s) if np.isfinite(fw_s).any() else np.nan
    med_r = np.nanmedian(fw_r) if np.isfinite(fw_r).any() else np.nan
    ap_s = xp.asarray((rgrid <= min(half, max(2.0 * med_s, 3.0))).astype(np.float64))
    ap_r = xp.asarray((rgrid <= min(half, max(2.0 * med_r, 3.0))).astype(np.float64))
    flux_s = to_host((sub_s * ap_s).sum(axis=(1, 2)))
    flux_r = to_host((sub_r * ap_r).sum(axis=(1, 2)))
    good = np.isfinite(fw_s) & np.isfinite(fw_r) & (flux_s > 0) & (flux_r > 0)
    good &= (fw_s > size_range[0] * med_s) & (fw_s < size_range[1] * med_s)
    good &= (fw_r > size_range[0] * med_r) & (fw_r < size_range[1] * med_r)
    if saturate_sci:
        good &= pk_s < sat_fraction * saturate_sci
    if saturate_ref:
        good &= pk_r < sat_fraction * saturate_ref
    return Stars(x=xs[good], y=ys[good], snr_s=vs[good], snr_r=vr[jr][good], fwhm_s=fw_s[good],
                 fwhm_r=fw_r[good], flux_s=flux_s[good], flux_r=flux_r[good], peak_s=pk_s[good],
                 peak_r=pk_r[good])


def stamp_bad(tgt_mask, src_mask, ys, xs, half_stamp: int, half_kernel: int, xp):
    """Pixels of each target stamp that the kernel fit cannot use.

    A target pixel is unusable when it is masked in the target, or when a masked pixel of the
    image to convolve lies within ``half_kernel`` of it (Chebyshev distance: the kernel
    footprint), since that pixel was set to a neutral value before the convolution.

    Returns
    -------
    bool array (n, 2*half_stamp+1, 2*half_stamp+1), on the backend of the masks.
    """
    s = 2 * half_stamp + 1
    r = int(half_kernel)
    tb = gather_stamps(tgt_mask, ys, xs, half_stamp, xp) != 0
    sb = (gather_stamps(src_mask, ys, xs, half_stamp + r, xp) != 0).astype(xp.int32)
    # box sums of width 2r+1 over the padded source stamps by cumulative sums
    c = xp.cumsum(xp.cumsum(sb, axis=1), axis=2)
    c = xp.pad(c, ((0, 0), (1, 0), (1, 0)))
    w = 2 * r + 1
    box = c[:, w:w + s, w:w + s] - c[:, :s, w:w + s] - c[:, w:w + s, :s] + c[:, :s, :s]
    return tb | (box > 0)


def _inside(stars: Stars, shape, ext: int) -> np.ndarray:
    """Stars whose footprint of half-width ``ext`` lies inside an image of ``shape``."""
    h, w = shape
    return (stars.y >= ext) & (stars.x >= ext) & (stars.y < h - ext) & (stars.x < w - ext)


def _drop_crowded(stars: Stars, ok: np.ndarray, half_stamp: int, isolation: float) -> np.ndarray:
    """``ok`` without the stars that have a neighbour brighter than ``isolation`` times their
    flux (in either image) within ``half_stamp`` pixels."""
    from scipy.spatial import cKDTree

    pts = np.column_stack([stars.y, stars.x]).astype(float)
    for i, nbrs in enumerate(cKDTree(pts).query_ball_point(pts, r=float(half_stamp))):
        if not ok[i] or len(nbrs) <= 1:
            continue
        nb = np.array([j for j in nbrs if j != i])
        if (np.any(stars.flux_s[nb] > isolation * stars.flux_s[i])
                or np.any(stars.flux_r[nb] > isolation * stars.flux_r[i])):
            ok[i] = False
    return ok


def usable_with_masks(stars: Stars, tgt_mask, src_mask, half_stamp: int, half_kernel: int, shape, xp,
                      core_radius: float, max_core_fraction: float = 0.05, max_fraction: float = 0.3,
                      isolation: float = 0.3) -> np.ndarray:
    """Which stars can serve as stamps when masked pixels are left out of the fit.

    As :func:`usable`, but a stamp may contain masked pixels: the unusable pixels
    (:func:`stamp_bad`) must be fewer than ``max_core_fraction`` of those within
    ``core_radius`` of the star and fewer than ``max_fraction`` of the whole stamp. (Requiring
    a stamp free of every masked pixel over its padded footprint leaves almost none on a
    frame with a few bad columns and hot pixels and a kernel 20 px wide.)

    Returns
    -------
    host bool array (n,)
    """
    if len(stars) == 0:
        return np.zeros(0, bool)
    ext = half_stamp + half_kernel
    ok = _inside(stars, shape, ext)
    idx = np.nonzero(ok)[0]
    off = np.arange(-half_stamp, half_stamp + 1)
    core = xp.asarray(np.hypot(off[:, None], off[None, :]) <= core_radius)
    ncore = float(core.sum())
    npix = float((2 * half_stamp + 1) ** 2)
    for chunk in range(0, idx.size, 1024):
        sel = idx[chunk:chunk + 1024]
        bad = stamp_bad(tgt_mask, src_mask, stars.y[sel], stars.x[sel], half_stamp, half_kernel, xp)
        fcore = to_host((bad & core[None]).reshape(sel.size, -1).sum(axis=1)) / ncore
        fall = to_host(bad.reshape(sel.size, -1).sum(axis=1)) / npix
        ok[sel] = (fcore <= max_core_fraction) & (fall <= max_fraction)
    return _drop_crowded(stars, ok, half_stamp, isolation)


def usable(stars: Stars, sci_mask, ref_mask, half_stamp: int, half_kernel: int, shape, xp,
           isolation: float = 0.3) -> np.ndarray:
    """Which stars can serve as stamps for a kernel of half-width ``half_kernel``.

    A stamp needs its full (2*(half_stamp+half_kernel)+1)^2 footprint inside the image and
    free of masked pixels in both masks, and no other star of this list with more than
    ``isolation`` times its flux (in either image) within ``half_stamp`` pixels.

    Returns
    -------
    host bool array (n,)
    """
    if len(stars) == 0:
        return np.zeros(0, bool)
    ext = half_stamp + half_kernel
    ok = _inside(stars, shape, ext)
    idx = np.nonzero(ok)[0]
    if idx.size:
        any_bad = xp.zeros(idx.size, dtype=bool)
        for m in (sci_mask, ref_mask):
            for chunk in range(0, idx.size, 2048):
                sel = idx[chunk:chunk + 2048]
                st = gather_stamps(m, stars.y[sel], stars.x[sel], ext, xp)
                any_bad[chunk:chunk + sel.size] |= (st != 0).reshape(sel.size, -1).any(axis=1)
        ok[idx[to_host(any_bad)]] = False
    return _drop_crowded(stars, ok, half_stamp, isolation)


def pick_stamps(stars: Stars, bounds: tuple[int, int, int, int], grid: tuple[int, int] = (10, 10),
                per_cell: int = 3) -> np.ndarray:
    """Stamps of one region: up to ``per_cell`` brightest stars in each cell of a grid.

    Parameters
    ----------
    stars : Stars
        Usable stars (already filtered by :func:`usable`).
    bounds : (y0, y1, x0, x1)
        The region.
    grid : (nx, ny)
        Cells along x and y (HOTPANTS ``-nsx``, ``-nsy``).
    per_cell : int
        Stars kept per cell (HOTPANTS ``-nss``).

    Returns
    -------
    host int array of indices into ``stars``
    """
    y0, y1, x0, x1 = bounds
    inside = np.nonzero((stars.x >= x0) & (stars.x < x1) & (stars.y >= y0) & (stars.y < y1))[0]
    if inside.size == 0:
        return inside
    nx, ny = grid
    cx = np.minimum(((stars.x[inside] - x0) * nx) // max(x1 - x0, 1), nx - 1)
    cy = np.minimum(((stars.y[inside] - y0) * ny) // max(y1 - y0, 1), ny - 1)
    cell = cy * nx + cx
    bright = np.minimum(stars.snr_s[inside], stars.snr_r[inside])
    order = np.lexsort((-bright, cell))
    cell_sorted = cell[order]
    rank = np.arange(order.size) - np.searchsorted(cell_sorted, cell_sorted, side="left")
    return np.sort(inside[order[rank < per_cell]])
