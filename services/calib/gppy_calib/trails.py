"""Satellite and aircraft trails: a Hough line detector on a binned S/N image (host NumPy/SciPy).

Steps, for a reduced frame, its background noise and the pixels already masked:

1. Residual image ``image - background`` (the background is a block median, ``BKG_BLOCK``
   px, so that gentle gradients do not matter) and its S/N ``residual / noise`` with masked
   pixels set to 0.
2. Bin by ``BIN`` x ``BIN``: the S/N of each block sum over its unmasked pixels,
   ``sum(residual) / sqrt(sum(noise^2))`` (:func:`block_snr`), and keep the binned pixels
   above ``DETECT_SNR``.
3. Drop compact blobs (stars, galaxies): connected groups that are neither small (at most
   ``SMALL_BLOB`` binned px, the fragments a faint trail breaks into) nor elongated (the
   ratio of the principal axes at least ``ELONGATION``).
4. Hough transform of what is left, coarse then fine (:func:`_hough_peak`); the strongest
   line must collect more votes than randomly placed candidates would give in its coarse
   cell (``e + 6 sqrt(e)``, ``e`` the candidates' density times the cell's area) and at least
   ``MIN_LENGTH / (2 BIN)`` votes on the fine line.
5. Refine the line on the full-resolution S/N image (centroids of the median profile across
   the line in 128-px pieces, fitted with a clipped straight line), then check it: the median S/N profile across
   the line (along-line median at each perpendicular offset) must peak above ``PROFILE_SNR``
   within ``SEARCH_HALF`` px; the mask half-width is the farthest offset from the peak where
   the profile is still above ``min(EDGE_SNR, EDGE_FRACTION * peak)``, plus ``MARGIN`` px.
   Along the line, 64-px pieces whose mean S/N in that strip is significant (> 3 sigma)
   define the extent (the first to the last such piece); the trail must be at least
   ``MIN_LENGTH`` px long.
6. Mask the strip, remove its votes, and look for the next line (at most ``MAX_TRAILS``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

BIN = 4
BKG_BLOCK = 64
DETECT_SNR = 3.0
SMALL_BLOB = 6
ELONGATION = 3.0
NTHETA = 360
MIN_LENGTH = 200.0
SEARCH_HALF = 6.0
PROFILE_SNR = 0.6
EDGE_SNR = 1.0
EDGE_FRACTION = 0.25
MARGIN = 0.5
MAX_TRAILS = 3
STRIP_HALF = 25


@dataclass(frozen=True)
class Trail:
    """One detected trail.

    Attributes
    ----------
    x0, y0, x1, y1 : float
        0-based pixel coordinates of its ends (along the detected extent).
    half_width : float
        Half width of the masked strip, px.
    peak_snr : float
        Median S/N per pixel on the trail's centre line.
    """

    x0: float
    y0: float
    x1: float
    y1: float
    half_width: float
    peak_snr: float


def block_background(sub: np.ndarray, good_sub: np.ndarray, shape: tuple[int, int], block: int = BKG_BLOCK,
                     step: int = 4) -> np.ndarray:
    """Median of the good pixels of each ``block`` x ``block`` box, median-filtered over 3 x 3
    boxes; boxes without good pixels take the overall median.

    Parameters
    ----------
    sub, good_sub : numpy.ndarray
        Every ``step``-th pixel of the image in each axis (``image[::step, ::step]``) and
        whether it is good.
    shape : (int, int)
        Shape of the full image.

    Returns
    -------
    numpy.ndarray
        Shape ``(ceil(ny / block), ceil(nx / block))``, float32.
    """
    ny, nx = shape
    by, bx = -(-ny // block), -(-nx // block)
    sub = np.where(good_sub, sub, np.nan)
    b = block // step
    pad = np.full((by * b, bx * b), np.nan, np.float32)
    pad[:sub.shape[0], :sub.shape[1]] = sub
    vals = pad.reshape(by, b, bx, b).transpose(0, 2, 1, 3).reshape(by * bx, b * b)
    count = np.isfinite(vals).sum(axis=1)
    med = np.full(by * bx, np.nan, np.float32)
    n = b * b
    full = count == n
    if full.any():                     # the usual block: a partition finds its two middle values
        part = np.partition(vals[full], [(n - 1) // 2, n // 2], axis=1)
        med[full] = 0.5 * (part[:, (n - 1) // 2] + part[:, n // 2])
    some = ~full & (count > 0)
    if some.any():                     # blocks with masked pixels: sorted (NaN last)
        srt = np.sort(vals[some], axis=1)
        cnt = count[some]
        lo = (cnt - 1) // 2
        hi = np.where(cnt % 2 == 1, lo, cnt // 2)
        rows = np.arange(srt.shape[0])
        med[some] = 0.5 * (srt[rows, lo] + srt[rows, hi])
    med = med.reshape(by, bx)
    fill = float(np.nanmedian(med)) if np.isfinite(med).any() else 0.0
    med = np.where(np.isfinite(med), med, fill).astype(np.float32)
    return ndimage.median_filter(med, size=3, mode="nearest")


def _block_median(image: np.ndarray, good: np.ndarray, block: int, step: int = 4) -> np.ndarray:
    """:func:`block_background` of a whole image (every ``step``-th pixel in each axis)."""
    return block_background(image[::step, ::step], good[::step, ::step], image.shape, block, step)


def residual_image(image: np.ndarray, masked: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``image - background`` (block medians of :func:`_block_median`) and the good pixels
    (unmasked and finite)."""
    image = np.asarray(image, dtype=np.float32)
    good = ~np.asarray(masked, dtype=bool) & np.isfinite(image)
    med = _block_median(image, good, BKG_BLOCK)
    ny, nx = image.shape
    by, bx = med.shape
    res = np.zeros((by * BKG_BLOCK, bx * BKG_BLOCK), np.float32)
    res[:ny, :nx] = image
    view = res.reshape(by, BKG_BLOCK, bx, BKG_BLOCK)
    view -= med[:, None, :, None]
    return res[:ny, :nx], good


def snr_image(image: np.ndarray, noise: np.ndarray | float, masked: np.ndarray) -> np.ndarray:
    """Background-subtracted S/N per pixel; 0 on masked or non-finite pixels."""
    snr, good = residual_image(image, masked)
    with np.errstate(all="ignore"):
        snr /= np.asarray(noise, dtype=np.float32)
    snr[~good | ~np.isfinite(snr)] = 0.0
    return snr


def bin_sum(a, b: int = BIN):
    """Sums over ``b`` x ``b`` blocks; rows and columns beyond a whole block are dropped.
    Works on NumPy and CuPy arrays (same dtype as ``a``)."""
    ny, nx = a.shape
    by, bx = ny // b, nx // b
    rows = a[0:by * b:b, :bx * b].copy()               # sums of b rows, then of b columns
    for k in range(1, b):
        rows += a[k:by * b:b, :bx * b]
    out = rows[:, 0::b].copy()
    for k in range(1, b):
        out += rows[:, k::b]
    return out


def block_snr(residual: np.ndarray, var: np.ndarray, good: np.ndarray, b: int = BIN) -> np.ndarray:
    """S/N of the ``b`` x ``b`` block sums of ``residual`` over the good pixels,
    ``sum(residual) / sqrt(sum(var))`` (0 for a block without a good pixel), float32."""
    ok = np.asarray(good, dtype=bool) & np.isfinite(var) & (np.asarray(var) > 0)
    num = bin_sum(np.where(ok, residual, 0).astype(np.float64), b)
    den = bin_sum(np.where(ok, var, 0).astype(np.float64), b)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.sqrt(den), 0.0).astype(np.float32)


def _candidate_pixels(binned: np.ndarray) -> np.ndarray:
    """Binned pixels above threshold that belong to small or elongated groups."""
    det = binned > DETECT_SNR
    labels, n = ndimage.label(det, structure=np.ones((3, 3)))
    if n == 0:
        return np.zeros_like(det)
    # second moments of each group, from its pixels only
    flat = labels.ravel()
    pix = np.flatnonzero(flat)
    lab = flat[pix]
    yy, xx = (pix // det.shape[1]).astype(np.float64), (pix % det.shape[1]).astype(np.float64)
    count = np.bincount(lab, minlength=n + 1)[1:].astype(np.float64)

    def mean(w: np.ndarray) -> np.ndarray:
        return np.bincount(lab, weights=w, minlength=n + 1)[1:] / count

    my, mx = mean(yy), mean(xx)
    syy = mean(yy * yy) - my * my
    sxx = mean(xx * xx) - mx * mx
    sxy = mean(xx * yy) - mx * my
    tr, det2 = sxx + syy, sxx * syy - sxy * sxy
    disc = np.sqrt(np.maximum(tr * tr / 4 - det2, 0))
    lmax, lmin = tr / 2 + disc, np.maximum(tr / 2 - disc, 1.0 / 12)
    elong = np.sqrt(lmax / lmin)
    keep = (count <= SMALL_BLOB) | (elong >= ELONGATION)
    keep_lut = np.concatenate([[False], keep])
    return keep_lut[labels]


def _group_medians(key: np.ndarray, values: np.ndarray, nkeys: int) -> tuple[np.ndarray, np.ndarray]:
    """Median of ``values`` in each group ``key`` (0 .. nkeys-1; NaN for an empty group, the
    mean of the two middle values for an even count, as :func:`numpy.median`) and the counts.

    One sort of ``key + u`` with ``u`` the value mapped into [0, 0.5] orders the values within
    their groups (float64 keeps ``u`` to ~1e-12 of the values' range).
    """
    count = np.bincount(key, minlength=nkeys)
    out = np.full(nkeys, np.nan)
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return out, count
    lo, span = float(v.min()), float(v.max() - v.min())
    scale = 0.5 / span if span > 0 else 0.0
    comb = np.sort(key + (v - lo) * scale)
    start = np.cumsum(count) - count
    have = count > 0
    g = np.flatnonzero(have)
    a = comb[(start + (count - 1) // 2)[have]] - g
    b = comb[(start + count // 2)[have]] - g
    out[have] = lo + 0.5 * (a + b) / scale if scale else lo
    return out, count


def _accumulate(ys: np.ndarray, xs: np.ndarray, thetas: np.ndarray, rho_bin: float,
                diag: float, dtype=np.float64) -> tuple[int, float, float]:
    """(votes, theta, rho) of the fullest (theta, rho-bin) cell; rho bins of ``rho_bin``.

    The cell of a point is ``floor(rho / rho_bin + 0.5)``, computed as the truncation of a
    positive number (``+ offset``); ``dtype`` float32 suits wide bins (the coarse pass).
    """
    offset = int(np.ceil(diag / rho_bin)) + 1
    nrho = 2 * offset + 1
    xb, yb = (xs / rho_bin).astype(dtype), (ys / rho_bin).astype(dtype)
    cos, sin = np.cos(thetas).astype(dtype), np.sin(thetas).astype(dtype)
    best = (0, 0.0, 0.0)
    chunk = max(1, 400_000 // max(1, xs.size))          # (k, n) blocks that stay in the cache
    for t0 in range(0, thetas.size, chunk):
        c, s = cos[t0:t0 + chunk], sin[t0:t0 + chunk]
        k = c.size
        cell = np.multiply.outer(c, xb)
        cell += np.multiply.outer(s, yb)
        cell += dtype(offset + 0.5)
        idx = cell.astype(np.intp)
        idx += (np.arange(k, dtype=np.intp) * nrho)[:, None]
        acc = np.bincount(idx.ravel(), minlength=k * nrho)
        i = int(acc.argmax())
        if acc[i] > best[0]:
            ti, ri = divmod(i, nrho)
            best = (int(acc[i]), float(thetas[t0 + ti]), float((ri - offset) * rho_bin))
    return best


def _hough_peak(ys: np.ndarray, xs: np.ndarray, shape: tuple[int, int]) -> tuple[int, int, float, float, float]:
    """The strongest line through the points (binned coordinates), in two stages.

    A coarse pass over ``NTHETA`` angles uses distance bins as wide as a line drifts over the
    image's diagonal ``L`` between two angles (``L pi / NTHETA``); a fine pass, on the points
    near the coarse line only, steps the angle by ``1 / L`` rad with 1-px distance bins.

    Returns
    -------
    coarse_votes, votes : int
        Votes of the coarse cell and of the fine line.
    rho_bin : float
        Width of the coarse distance bins (binned px).
    theta, rho : float
        The fine line ``x cos(theta) + y sin(theta) = rho``.
    """
    diag = float(np.hypot(*shape))
    step = np.pi / NTHETA
    rho_bin = max(1.0, diag * step)
    coarse, th_c, rho_c = _accumulate(ys, xs, np.arange(NTHETA) * step, rho_bin, diag, np.float32)
    near = np.abs(xs * np.cos(th_c) + ys * np.sin(th_c) - rho_c) <= 1.5 * rho_bin
    fine_thetas = th_c + np.arange(-step, step, 1.0 / diag)
    votes, theta, rho = _accumulate(ys[near], xs[near], fine_thetas, 1.0, diag)
    return coarse, votes, rho_bin, theta, rho


def _strip(shape: tuple[int, int], theta: float, rho: float, half: float):
    """Pixels within ``half`` of the line ``x cos t + y sin t = rho`` (full resolution).

    Returns (ys, xs, d, t): coordinates, signed distance and along-line position.
    """
    ny, nx = shape
    c, s = np.cos(theta), np.sin(theta)
    if abs(s) >= abs(c):          # line closer to horizontal: walk along x, one offset at a time
        xs = np.arange(nx, dtype=np.float64)                 # (pixels in memory order: the
        yc = (rho - xs * c) / s                              # image is read row by row)
        span = int(np.ceil(half / abs(s))) + 1
        offs = np.arange(-span, span + 2)
        X = np.tile(xs, offs.size)
        Y = np.tile(np.floor(yc), offs.size) + np.repeat(offs, xs.size)
    else:                          # closer to vertical: walk along y
        ys = np.arange(ny, dtype=np.float64)
        xc = (rho - ys * s) / c
        span = int(np.ceil(half / abs(c))) + 1
        offs = np.arange(-span, span + 2)
        Y = np.repeat(ys, offs.size)
        X = np.repeat(np.floor(xc), offs.size) + np.tile(offs, ys.size)
    ok = (X >= 0) & (X < nx) & (Y >= 0) & (Y < ny)
    X, Y = X[ok].astype(np.int64), Y[ok].astype(np.int64)
    d = X * c + Y * s - rho
    t = -X * s + Y * c
    sel = np.abs(d) <= half
    return Y[sel], X[sel], d[sel], t[sel]


def _refine(snr: np.ndarray, theta: float, rho: float, iters: int = 3) -> tuple[float, float]:
    """Sharpen a Hough line (binned, ~0.25 deg) on the full-resolution S/N image.

    In 128-px pieces along the line, the median S/N across the line is taken at each
    1-px offset (the median ignores stars on the way) and its centroid (positive part within
    ``SEARCH_HALF + 2`` px) gives the trail's offset there; a straight-line fit ``d = a + b t``
    of those offsets, with 3-sigma clipping, gives the corrected line:
    ``theta' = theta - atan(b)``, ``rho' = (rho + a) cos(atan(b))``.
    """
    half = SEARCH_HALF + 2.0
    edges = np.arange(-half, half + 1.0)
    for _ in range(iters):
        ys, xs, d, t = _strip(snr.shape, theta, rho, half)
        if ys.size < 50:
            break
        v = snr[ys, xs]
        piece = np.floor((t - t.min()) / 128.0).astype(np.int64)
        ob = np.clip(np.rint(d - edges[0]).astype(np.int64), 0, edges.size - 1)
        npiece = int(piece.max()) + 1
        # median S/N of each (piece, offset) cell; 0 for an empty cell
        prof, count = _group_medians(piece * edges.size + ob, v, npiece * edges.size)
        prof = np.where(count > 0, prof, 0.0).reshape(npiece, edges.size)
        size = np.bincount(piece, minlength=npiece)
        tmean = np.bincount(piece, weights=t, minlength=npiece) / np.maximum(size, 1)
        prof = np.maximum(prof - np.median(prof, axis=1)[:, None], 0.0)
        tot = prof.sum(axis=1)
        use = (size >= 10 * edges.size) & (tot > 0) & (prof.max(axis=1) >= 1.0)
        if use.sum() < 3:
            break
        tc_a = tmean[use]
        dc_a = (prof[use] * edges[None, :]).sum(axis=1) / tot[use]
        keep = np.ones(tc_a.size, bool)
        for _clip in range(3):
            b, a = np.polyfit(tc_a[keep], dc_a[keep], 1)
            res = dc_a - (a + b * tc_a)
            scale = 1.4826 * np.median(np.abs(res[keep])) + 0.1
            new = np.abs(res) <= 3 * scale
            if new.sum() < 3 or (new == keep).all():
                break
            keep = new
        delta = float(np.arctan(b))
        theta, rho = theta - delta, (rho + float(a)) * float(np.cos(delta))
    return theta, rho


def _measure(snr: np.ndarray, theta: float, rho: float) -> Trail | None:
    """Confirm a Hough line on the full-resolution S/N image and measure its strip."""
    theta, rho = _refine(snr, theta, rho)
    ys, xs, d, t = _strip(snr.shape, theta, rho, STRIP_HALF)
    if ys.size == 0:
        return None
    vals = snr[ys, xs]
    # median profile across the line in half-pixel bins of the perpendicular offset
    off = np.rint(2.0 * d).astype(np.int64) + 2 * STRIP_HALF
    keep = (off >= 0) & (off <= 4 * STRIP_HALF)
    med, count = _group_medians(off[keep], vals[keep], 4 * STRIP_HALF + 1)
    have = count > 20
    if not have.any():
        return None
    offsets = (np.flatnonzero(have) - 2 * STRIP_HALF) / 2.0
    p = med[have]
    # the outer part of the strip is background: its scatter sets the significance
    outer = np.abs(offsets) > STRIP_HALF - 8
    base = float(np.median(p[outer])) if outer.any() else 0.0
    p = p - base
    inner = np.abs(offsets) <= SEARCH_HALF
    if not inner.any():
        return None
    ipk = int(np.argmax(np.where(inner, p, -np.inf)))
    peak, centre = float(p[ipk]), float(offsets[ipk])
    if peak < PROFILE_SNR:
        return None
    # half width: farthest contiguous offset from the peak still above the edge level
    edge = min(EDGE_SNR, EDGE_FRACTION * peak)
    lo = ipk
    while lo > 0 and p[lo - 1] > edge:
        lo -= 1
    hi = ipk
    while hi < p.size - 1 and p[hi + 1] > edge:
        hi += 1
    half = max(centre - offsets[lo], offsets[hi] - centre) + MARGIN
    rho_c = rho + centre
    # extent along the line: 64-px pieces with significant mean S/N inside the strip
    in_strip = np.abs(d - centre) <= max(1.0, half - MARGIN)
    tt, vv = t[in_strip], vals[in_strip] - base
    if tt.size == 0:
        return None
    piece = np.floor((tt - tt.min()) / 64.0).astype(np.int64)
    npiece = int(piece.max()) + 1
    sums = np.bincount(piece, weights=vv, minlength=npiece)
    cnts = np.bincount(piece, minlength=npiece)
    with np.errstate(all="ignore"):
        sig = sums / np.sqrt(np.maximum(cnts, 1))
    good = np.flatnonzero((cnts > 0) & (sig > 3.0))
    if good.size == 0:
        return None
    t0 = tt.min() + good[0] * 64.0
    t1 = min(tt.max(), tt.min() + (good[-1] + 1) * 64.0)
    if t1 - t0 < MIN_LENGTH:
        return None
    c, s = np.cos(theta), np.sin(theta)
    x0, y0 = rho_c * c - t0 * s, rho_c * s + t0 * c
    x1, y1 = rho_c * c - t1 * s, rho_c * s + t1 * c
    return Trail(float(x0), float(y0), float(x1), float(y1), float(half), peak)


def _distance(trail: Trail, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Distance (px) of points from the infinite line through a trail's ends."""
    dx, dy = trail.x1 - trail.x0, trail.y1 - trail.y0
    return np.abs((x - trail.x0) * dy - (y - trail.y0) * dx) / max(float(np.hypot(dx, dy)), 1e-9)


def trail_pixels(shape: tuple[int, int], trail: Trail) -> tuple[np.ndarray, np.ndarray]:
    """(ys, xs) of the pixels a trail's strip covers (its extent plus ``half_width`` at the ends)."""
    dx, dy = trail.x1 - trail.x0, trail.y1 - trail.y0
    length = float(np.hypot(dx, dy))
    theta = float(np.arctan2(dy, dx)) - np.pi / 2      # normal; the line runs along (-sin, cos)
    c, s = np.cos(theta), np.sin(theta)
    rho = trail.x0 * c + trail.y0 * s
    ys, xs, d, t = _strip(shape, theta, rho, trail.half_width)
    ext = t - (-trail.x0 * s + trail.y0 * c)
    sel = (ext >= -trail.half_width) & (ext <= length + trail.half_width)
    return ys[sel], xs[sel]


def detect_trails(image: np.ndarray, noise: np.ndarray | float, masked: np.ndarray,
                  max_trails: int = MAX_TRAILS) -> tuple[np.ndarray, list[Trail]]:
    """Find straight trails in a reduced frame.

    Parameters
    ----------
    image : numpy.ndarray
        Reduced frame, ADU (host array).
    noise : numpy.ndarray or float
        1-sigma background noise per pixel, same units.
    masked : numpy.ndarray of bool
        Pixels to ignore (bad, saturated, cosmic rays).
    max_trails : int
        Most trails to look for.

    Returns
    -------
    mask : numpy.ndarray of bool
        True on trail pixels.
    trails : list of Trail
    """
    shape = image.shape
    residual, good = residual_image(image, masked)
    noise = np.broadcast_to(np.asarray(noise, dtype=np.float32), shape)
    binned = block_snr(residual, noise * noise, good)
    with np.errstate(all="ignore"):
        snr = residual / noise
    snr[~good | ~np.isfinite(snr)] = 0.0
    out = np.zeros(shape, dtype=bool)
    found = search(binned, snr, max_trails)
    for trail in found:
        ty, tx = trail_pixels(shape, trail)
        out[ty, tx] = True
    return out, found


def search(binned: np.ndarray, snr, max_trails: int = MAX_TRAILS) -> list[Trail]:
    """Steps 3-6 of the module docstring on a binned S/N image (:func:`block_snr`).

    Parameters
    ----------
    binned : numpy.ndarray
        Binned S/N image (:func:`block_snr`).
    snr : numpy.ndarray or array-like
        The full-resolution S/N image, or any object with its ``shape`` that returns the S/N
        at pixels ``snr[ys, xs]`` and accepts ``snr[ys, xs] = 0`` (see
        :class:`gppy_calib.frame.PixelSNR`): the search reads it only along candidate lines.
        The strips of the trails found are set to 0.
    max_trails : int

    Returns
    -------
    list of Trail
    """
    shape = tuple(snr.shape)
    cand = _candidate_pixels(binned)
    trails: list[Trail] = []
    ys, xs = np.divmod(np.flatnonzero(cand), cand.shape[1])
    # a line must beat what randomly placed candidates give: at their density, a coarse cell
    # (as long as the binned image's diagonal, rho_bin wide) gets ``e`` votes on average; ask
    # for e + 6 sqrt(e) there, and for MIN_LENGTH / (2 BIN) votes on the fine line
    density = ys.size / float(binned.size)
    diag = float(np.hypot(*binned.shape))
    min_votes = MIN_LENGTH / BIN * 0.5
    tried: set[tuple[int, int]] = set()
    attempts = 0
    while len(trails) < max_trails and ys.size >= min_votes and attempts < 4 * max_trails:
        attempts += 1
        coarse, votes, rho_bin, theta, rho = _hough_peak(ys.astype(np.float64), xs.astype(np.float64),
                                                         binned.shape)
        e = density * diag * rho_bin
        if coarse < e + 6.0 * np.sqrt(e) or votes < min_votes:
            break
        key = (int(round(np.degrees(theta) * 2)), int(round(rho)))
        # binned coordinates -> full resolution (binned pixel centre is at BIN*i + (BIN-1)/2)
        rho_full = rho * BIN + (BIN - 1) / 2.0 * (np.cos(theta) + np.sin(theta))
        trail = _measure(snr, theta, rho_full) if key not in tried else None
        tried.add(key)
        # remove the votes of this line whatever the verdict, to look for the next one; around a
        # confirmed trail clear a strip twice its width, so that its wings are not found again
        if trail is None:
            near = np.abs(xs * np.cos(theta) + ys * np.sin(theta) - rho) <= 2.0
        else:
            near = _distance(trail, BIN * xs + (BIN - 1) / 2.0, BIN * ys + (BIN - 1) / 2.0) <= (
                2.0 * trail.half_width + 4.0 + BIN)
        ys, xs = ys[~near], xs[~near]
        if trail is None:
            continue
        trails.append(trail)
        wide = Trail(trail.x0, trail.y0, trail.x1, trail.y1, 2.0 * trail.half_width + 4.0, trail.peak_snr)
        wy, wx = trail_pixels(shape, wide)
        snr[wy, wx] = 0.0
    return trails
