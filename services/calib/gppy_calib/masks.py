"""Per-frame bit mask and inverse-variance weight (beyond v1, which had neither).

Bits (:class:`gppy.masks.MaskBit`, uint16, OR-ed) set by the calibration:

* ``BAD`` (1): from the masters. A pixel is bad when any master is non-finite there; when
  the flat is below ``FLAT_LOW`` or above ``FLAT_HIGH`` times its median (dead or
  dust-choked pixels and columns); when the master dark shows a hot pixel (dark current
  above the master's median by more than ``HOT_RATE_E`` e-/s *and* by more than
  ``HOT_NSIGMA`` times the master dark's robust scatter); or when the master bias's error
  image exceeds ``NOISY_FACTOR`` times its median (noisy pixels and columns; only when the
  bias combined at least ``NOISY_MIN_FRAMES`` frames, so that the error is meaningful); and
  every pixel of a column or row of which more than ``LINE_BAD_FRACTION`` is bad.
* ``SATURATED`` (2): the raw value is at or above the saturation level (raw ADU).
* ``COSMIC_RAY`` (4): detected by astroscrappy (L.A.Cosmic) on the reduced frame.
* ``TRAIL`` (8): satellite / aircraft trails (:mod:`gppy_calib.trails`).
* ``NONFINITE`` (16): NaN or inf in the reduced frame (its value is then set to 0).
* ``EDGE`` (32): a border of ``edge`` pixels when asked for (none by default: the 7DT CMOS
  has no overscan or dead border).

The weight is ``1 / variance`` (reduced ADU^-2) where the mask is 0 and 0 elsewhere: the
``MAP_WEIGHT`` form that SExtractor, SCAMP and SWarp read directly.
"""

from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType

import numpy as np
from scipy import ndimage
from threadpoolctl import threadpool_limits

from gppy.masks import MaskBit
from gppy.xp import to_host

FLAT_LOW = 0.5
FLAT_HIGH = 1.5
HOT_RATE_E = 0.5          # e-/s above the median dark current
HOT_NSIGMA = 5.0
NOISY_FACTOR = 3.0
NOISY_MIN_FRAMES = 5
#: A column or row with more than this fraction of bad pixels is a defective line: all of it
#: is flagged (a noisy column's pixels pass the per-pixel noise test now and then).
LINE_BAD_FRACTION = 0.25

#: astroscrappy parameters: v1's unused calib.cr_removal (sigclip 4.5, sigfrac 0.3, objlim 5) with
#: 1 iteration instead of 4. On the simulated night of tests/test_calib_sim.py a second
#: iteration added 1 of 2712 cosmic-ray pixels with S/N > 5, at 60 % more cost.
CR_PARAMS = {"sigclip": 4.5, "sigfrac": 0.3, "objlim": 5.0, "niter": 1}
#: Candidate threshold of the cheap pre-screen and its sharpness limit (see
#: :func:`cosmic_ray_candidates`). With the pixel's own Poisson noise in ``N``, 4.5 keeps every
#: cosmic ray of the simulated night and of the benchmark frame and drops the noise peaks of
#: 4-4.5 sigma, which L.A.Cosmic would partly flag: 4.0 gave 80 false flags on that night,
#: 4.5 gave 9, with the same recall.
CR_PRESCREEN = 4.5
CR_SHARPNESS = 0.35
#: Half size of the region around a candidate whose pixels astroscrappy may flag, px (its
#: neighbour growth reaches 2 px from a detection; one more for safety).
CR_GROW = 3
#: Largest core of one astroscrappy window, px; larger groups of candidates are cut up.
CR_CORE = 8
#: Context around a core, px (see :func:`cosmic_ray_windows`).
CR_PAD = 5
#: Mask bits whose pixel values are not data: filled from a neighbour before astroscrappy.
CR_FILL_BITS = int(MaskBit.BAD | MaskBit.NONFINITE | MaskBit.EDGE)


def _robust_sigma(xp: ModuleType, a) -> float:
    sub = a[::4, ::4]
    sub = sub[xp.isfinite(sub)]
    if int(sub.size) == 0:
        return float("nan")
    med = xp.median(sub)
    return float(1.4826 * xp.median(xp.abs(sub - med)))


def master_bad_pixels(xp: ModuleType, bias, bias_err, dark, dark_err, dark_exptime: float, flat, flat_err,
                      gain: float, bias_ncombine: int = 0):
    """``MaskBit.BAD`` wherever the masters say a pixel cannot be trusted.

    Parameters
    ----------
    xp : module
    bias, bias_err : array
        Master bias and its error, ADU.
    dark, dark_err : array
        Master dark (ADU in ``dark_exptime`` s) and its error.
    dark_exptime : float
        s.
    flat, flat_err : array
        Master flat (relative) and its error.
    gain : float
        e-/ADU (converts the hot-pixel threshold from e-/s to ADU).
    bias_ncombine : int
        Frames in the master bias (the noisy-pixel test needs ``NOISY_MIN_FRAMES``).

    Returns
    -------
    array of uint16
        ``MaskBit.BAD`` or 0 per pixel.
    """
    f32 = xp.float32
    bias = xp.asarray(bias, dtype=f32)
    dark = xp.asarray(dark, dtype=f32)
    flat = xp.asarray(flat, dtype=f32)
    bad = ~(xp.isfinite(bias) & xp.isfinite(dark) & xp.isfinite(flat))
    fmed = float(xp.median(flat[::4, ::4][xp.isfinite(flat[::4, ::4])])) if bool((~bad).any()) else 1.0
    with np.errstate(invalid="ignore"):
        bad |= (flat < f32(FLAT_LOW * fmed)) | (flat > f32(FLAT_HIGH * fmed))
        dmed = float(xp.median(dark[::4, ::4][xp.isfinite(dark[::4, ::4])])) if bool((~bad).any()) else 0.0
        dsig = _robust_sigma(xp, dark)
        limit = max(HOT_RATE_E * dark_exptime / gain, HOT_NSIGMA * (dsig if np.isfinite(dsig) else 0.0))
        bad |= (dark - f32(dmed)) > f32(limit)
        if bias_ncombine >= NOISY_MIN_FRAMES and bias_err is not None:
            berr = xp.asarray(bias_err, dtype=f32)
            finite = berr[::4, ::4][xp.isfinite(berr[::4, ::4])]
            if int(finite.size):
                bmed = float(xp.median(finite))
                if bmed > 0:
                    bad |= berr > f32(NOISY_FACTOR * bmed)
    ny, nx = bad.shape
    bad |= (bad.sum(axis=0, dtype=xp.int32) > LINE_BAD_FRACTION * ny)[None, :]
    bad |= (bad.sum(axis=1, dtype=xp.int32) > LINE_BAD_FRACTION * nx)[:, None]
    return xp.where(bad, xp.uint16(int(MaskBit.BAD)), xp.uint16(0)).astype(xp.uint16)


def saturation_mask(xp: ModuleType, raw, level: float):
    """``MaskBit.SATURATED`` where the raw frame is at or above ``level`` (raw ADU)."""
    raw = xp.asarray(raw)
    return xp.where(raw >= level, xp.uint16(int(MaskBit.SATURATED)), xp.uint16(0)).astype(xp.uint16)


def edge_mask(xp: ModuleType, shape: tuple[int, int], edge: int):
    """``MaskBit.EDGE`` on a border ``edge`` pixels wide (nothing when ``edge`` is 0)."""
    m = xp.zeros(shape, dtype=xp.uint16)
    if edge > 0:
        e = xp.uint16(int(MaskBit.EDGE))
        m[:edge, :] = e
        m[-edge:, :] = e
        m[:, :edge] = e
        m[:, -edge:] = e
    return m


def cosmic_ray_candidates(xp: ModuleType, image, var, inmask, sky: float, gain: float,
                          threshold: float = CR_PRESCREEN, sharpness: float = CR_SHARPNESS,
                          pad_rows: tuple[int, int] = (3, 3), var_floor: float | None = None
                          ) -> tuple[np.ndarray, np.ndarray]:
    """Pixels that L.A.Cosmic could flag, without the cores of well-sampled stars.

    L.A.Cosmic's statistic on a 2x sub-sampled Laplacian reduces, per pixel, to
    ``S = (I - mean4) / N`` (``mean4``: the 4 nearest neighbours, ``N``: the noise); it flags
    ``S - median5(S) > sigclip``. A candidate has ``S > threshold`` with ``N`` the noise of
    ``I - mean4`` including the pixel's own Poisson noise, ``N^2 = 1.25 (var + max(I - sky, 0)
    / gain)`` (see :data:`CR_PRESCREEN` for the value), and is sharp:
    ``I - mean4 > sharpness * (I - ring3)``, ``ring3`` being the mean of the 4 pixels 3 px
    away along the axes. A cosmic-ray pixel (even inside a track, or on a star's wing) has a
    ratio of 0.5-1; the core of a star of FWHM >= 2.6 px less than 0.35.

    Two stages keep the cost low: the Laplacian is compared with the threshold at the lowest
    noise of the unmasked pixels (``var_floor``; the noise only grows from there), and the
    full test runs only on the few pixels that pass.

    Parameters
    ----------
    xp : module
    image : array
        Reduced image, ADU, with its context rows.
    var : array
        Background variance (ADU^2) on the output rows.
    inmask : array of bool
        Pixels never to flag, on the output rows.
    sky : float
        Sky level, ADU.
    gain : float
        e-/ADU (the sources' Poisson term).
    threshold, sharpness : float
    pad_rows : (int, int)
        Rows mirrored above and below ``image`` to give every output row 3 rows of context:
        ``(3, 3)`` for a whole frame; for a band of rows that carries ``h`` rows of its
        neighbours above (below), ``3 - h``. The output rows are the rows that have their
        context (``image.shape[0] + sum(pad_rows) - 6`` of them); columns are mirrored by 3.
    var_floor : float, optional
        A lower bound of ``var`` over the unmasked output pixels (default: their minimum).

    Returns
    -------
    ys, xs : numpy.ndarray
        Candidates (not grown), int64, in output-row coordinates.
    """
    f32 = xp.float32
    img = xp.asarray(image, dtype=f32)
    height, nx = int(img.shape[0]), int(img.shape[1])
    r0 = 3 - int(pad_rows[0])                       # first output row in ``img``
    r1 = height - (3 - int(pad_rows[1]))            # end of the output rows

    def rows(lo: int, hi: int):
        """``img[lo:hi]`` with rows outside ``img`` mirrored (a copy only then)."""
        if lo >= 0 and hi <= height:
            return img[lo:hi]
        return img[xp.asarray(_reflect(np.arange(lo, hi), height))]

    c = img[r0:r1]
    inmask = xp.asarray(inmask, dtype=bool)
    var = xp.asarray(var, dtype=f32)
    if var_floor is None:
        good = var[~inmask]
        var_floor = float(xp.min(good)) if int(good.size) else float("inf")
    # stage 1: 4 (I - mean4) against the threshold at the lowest noise (columns mirrored)
    lap4 = c * f32(4)
    lap4 -= rows(r0 - 1, r1 - 1)
    lap4 -= rows(r0 + 1, r1 + 1)
    if nx > 1:
        lap4[:, 1:-1] -= c[:, :-2]
        lap4[:, 1:-1] -= c[:, 2:]
        lap4[:, 0] -= f32(2) * c[:, 1]
        lap4[:, -1] -= f32(2) * c[:, -2]
    if np.isfinite(var_floor):
        limit = 4 * threshold * np.sqrt(1.25 * var_floor) if var_floor > 0 else 0.0
        idx = xp.flatnonzero(lap4 > f32(limit))       # (flatnonzero is much faster than nonzero)
    else:
        idx = xp.zeros(0, dtype=xp.int64)
    ys, xs = idx // nx, idx % nx
    # stage 2: the full test on those pixels
    cv = c[ys, xs]
    lap = lap4[ys, xs] * f32(0.25)
    iy = ys + r0
    up, down = xp.asarray(_reflect(to_host(iy) - 3, height)), xp.asarray(_reflect(to_host(iy) + 3, height))
    left, right = xp.asarray(_reflect(to_host(xs) - 3, nx)), xp.asarray(_reflect(to_host(xs) + 3, nx))
    ring3 = (img[up, xs] + img[down, xs] + img[iy, left] + img[iy, right]) * f32(0.25)
    invar = var[ys, xs] + xp.maximum(cv - f32(sky), f32(0)) * f32(1.0 / gain)
    with np.errstate(divide="ignore", invalid="ignore"):
        s = lap / xp.sqrt(invar * f32(1.25))
    keep = (s > f32(threshold)) & (lap > f32(sharpness) * (cv - ring3)) & ~inmask[ys, xs]
    return to_host(ys[keep]).astype(np.int64), to_host(xs[keep]).astype(np.int64)


def _reflect(i: np.ndarray, n: int) -> np.ndarray:
    """Indices mirrored into ``[0, n)`` like ``numpy.pad(mode="reflect")``."""
    i = np.abs(i)
    i = np.where(i >= n, 2 * (n - 1) - i, i)
    return np.clip(i, 0, n - 1)


def _clusters(ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Label of each point: connected groups of points (8-connectivity)."""
    n = ys.size
    if n <= 1:
        return np.zeros(n, np.int64)
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    from scipy.spatial import cKDTree

    pairs = cKDTree(np.column_stack([ys, xs])).query_pairs(r=1.0, p=np.inf, output_type="ndarray")
    graph = coo_matrix((np.ones(len(pairs), np.int8), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    return connected_components(graph, directed=False)[1].astype(np.int64)


def cosmic_ray_cores(ys: np.ndarray, xs: np.ndarray, shape: tuple[int, int], grow: int = CR_GROW,
                     core: int = CR_CORE) -> np.ndarray:
    """Regions that astroscrappy examines: the bounding box of each connected group of
    candidates, grown by ``grow`` px and clipped to the frame, cut into pieces of at most
    ``core`` x ``core`` px. Returns an ``(n, 4)`` int64 array of ``y0, y1, x0, x1`` (ends
    excluded)."""
    if ys.size == 0:
        return np.zeros((0, 4), np.int64)
    ny, nx = shape
    lab = _clusters(ys, xs)
    n = int(lab.max()) + 1
    y0 = np.full(n, ny, np.int64)
    x0 = np.full(n, nx, np.int64)
    y1 = np.zeros(n, np.int64)
    x1 = np.zeros(n, np.int64)
    np.minimum.at(y0, lab, ys)
    np.minimum.at(x0, lab, xs)
    np.maximum.at(y1, lab, ys)
    np.maximum.at(x1, lab, xs)
    y0, x0 = np.maximum(y0 - grow, 0), np.maximum(x0 - grow, 0)
    y1, x1 = np.minimum(y1 + grow + 1, ny), np.minimum(x1 + grow + 1, nx)
    small = ((y1 - y0) <= core) & ((x1 - x0) <= core)
    out = [np.column_stack([y0[small], y1[small], x0[small], x1[small]])]
    for a0, a1, b0, b1 in zip(y0[~small], y1[~small], x0[~small], x1[~small], strict=True):
        for c0 in range(int(a0), int(a1), core):
            for d0 in range(int(b0), int(b1), core):
                out.append(np.array([[c0, min(c0 + core, a1), d0, min(d0 + core, b1)]], np.int64))
    return np.concatenate(out)


def _mosaic(win: np.ndarray, cols: int, blank: float) -> np.ndarray:
    """``(k, w, w)`` windows side by side in a grid ``cols`` wide (missing ones ``blank``)."""
    k, w, _ = win.shape
    rows = -(-k // cols)
    full = np.full((rows * cols, w, w), blank, dtype=win.dtype)
    full[:k] = win
    return np.ascontiguousarray(full.reshape(rows, cols, w, w).transpose(0, 2, 1, 3).reshape(rows * w, cols * w))


def _unmosaic(m: np.ndarray, k: int, w: int) -> np.ndarray:
    rows, cols = m.shape[0] // w, m.shape[1] // w
    return m.reshape(rows, w, cols, w).transpose(0, 2, 1, 3).reshape(rows * cols, w, w)[:k]


def cosmic_ray_windows(image: np.ndarray, variance_at, mask, cand_y: np.ndarray, cand_x: np.ndarray, sky: float,
                       gain: float, rdnoise_e: float, satlevel: float, params: dict | None = None,
                       fill_bits: int = CR_FILL_BITS, protect_bits: int = int(MaskBit.SATURATED),
                       core: int = CR_CORE, pad: int = CR_PAD, grow: int = CR_GROW,
                       workers: int = 1, omp_threads: int | None = 1,
                       stats: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Cosmic rays with astroscrappy (L.A.Cosmic), run only around candidate pixels.

    Each group of candidates (:func:`cosmic_ray_candidates`) becomes a core region
    (:func:`cosmic_ray_cores`); each core gets ``pad`` px of context (mirrored at the frame's
    border: L.A.Cosmic misses tracks on the outermost rows and columns otherwise), making a
    window of ``core + 2 pad`` px; the windows are laid side by side in one mosaic (per
    worker thread) and astroscrappy runs once on it, so that its cost is that of the pixels
    around candidates, without a per-call overhead. Only a window's core pixels are kept.
    astroscrappy's decision at a pixel depends on pixels up to 6 px away (the fine-structure
    image: 5- and 9-px separable medians) and its neighbour growth on the Laplacian 2 px
    further; a candidate sits at least ``grow`` (3) px inside its core, so ``pad = 5`` gives
    it 8 px. On the simulated night of tests/test_calib_sim.py pads of 8 and 5 flag the same
    cosmic rays (9 and 9 false flags), 4 and 3 add false flags (16, 63).

    astroscrappy gets the full noise model as ``invar``: the background variance plus the
    sources' Poisson term ``max(image - sky, 0) / gain``. Pixels with a ``fill_bits`` bit
    (bad, non-finite, edge) take their nearest good neighbour's value first (astroscrappy's
    own ``inmask`` misses cosmic rays next to a masked column); pixels with a
    ``protect_bits`` bit (saturated) go to astroscrappy's ``inmask``, which keeps the cores of
    saturated stars from producing false detections. Masked pixels are never flagged.

    Parameters
    ----------
    image : numpy.ndarray
        Reduced frame, ADU (sky included), host float32.
    variance_at : callable
        ``variance_at(ys, xs)`` -> background variance (ADU^2) at those pixels.
    mask : numpy.ndarray
        Bit mask of the frame (:class:`gppy.masks.MaskBit`), any integer type.
    cand_y, cand_x : numpy.ndarray
        Candidate pixels.
    sky : float
        Median sky, ADU.
    gain : float
        e-/ADU of ``image``.
    rdnoise_e : float
        Read noise, e-.
    satlevel : float
        Saturation level passed to astroscrappy.
    params : dict, optional
        Overrides of :data:`CR_PARAMS`.
    fill_bits, protect_bits : int
        Mask bits filled from neighbours / handed to astroscrappy's ``inmask``.
    core, pad, grow : int
        See :func:`cosmic_ray_cores` and above, px.
    workers : int
        Mosaics run in parallel threads.
    omp_threads : int or None
        OpenMP threads of each astroscrappy call (None: its default, all cores). One, with
        the parallelism at the level of the caller's threads, avoids OpenMP threads spinning
        at their barriers on a busy machine.
    stats : dict, optional
        Filled with ``candidates``, ``windows`` and ``pixels`` (the mosaic's size).

    Returns
    -------
    ys, xs : numpy.ndarray
        Cosmic-ray pixels (each once), int64.
    """
    import astroscrappy

    ny, nx = image.shape
    cores = cosmic_ray_cores(np.asarray(cand_y, np.int64), np.asarray(cand_x, np.int64), (ny, nx), grow, core)
    k = len(cores)
    w = core + 2 * pad
    if stats is not None:
        stats.update(candidates=int(np.size(cand_y)), windows=k, pixels=k * w * w)
    if k == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    kw = dict(CR_PARAMS)
    kw.update(params or {})
    h, wd = cores[:, 1] - cores[:, 0], cores[:, 3] - cores[:, 2]
    oy, ox = pad + (core - h) // 2, pad + (core - wd) // 2          # core's place in its window
    rr = _reflect(cores[:, 0:1] - oy[:, None] + np.arange(w)[None, :], ny)      # (k, w)
    cc = _reflect(cores[:, 2:3] - ox[:, None] + np.arange(w)[None, :], nx)
    R, C = np.broadcast_to(rr[:, :, None], (k, w, w)), np.broadcast_to(cc[:, None, :], (k, w, w))
    data = np.asarray(image[R, C], dtype=np.float32)
    var = np.asarray(variance_at(R, C), dtype=np.float32)
    bits = np.asarray(mask[R, C]).astype(np.int64)
    masked = bits != 0
    fill = (bits & fill_bits) != 0
    protect = (bits & protect_bits) != 0
    bg_var = float(np.median(var))
    for i in np.flatnonzero(fill.any(axis=(1, 2))):
        if fill[i].all():
            data[i], var[i], masked[i] = sky, bg_var, True
            continue
        iy, ix = ndimage.distance_transform_edt(fill[i], return_distances=False, return_indices=True)
        data[i], var[i] = data[i][iy, ix], var[i][iy, ix]
    with np.errstate(invalid="ignore"):
        invar = var + np.maximum(data - np.float32(sky), np.float32(0)) * np.float32(1.0 / gain)
    found = np.zeros((k, w, w), dtype=bool)
    groups = np.array_split(np.arange(k), max(1, min(int(workers), k)))

    def run(idx: np.ndarray) -> None:
        cols = max(1, int(np.ceil(np.sqrt(idx.size))))
        extra = {}
        if protect[idx].any():
            extra["inmask"] = _mosaic(protect[idx], cols, False)
        with contextlib.ExitStack() as stack:
            if omp_threads is not None:
                stack.enter_context(threadpool_limits(limits=int(omp_threads), user_api="openmp"))
            cr, _ = astroscrappy.detect_cosmics(_mosaic(data[idx], cols, sky), invar=_mosaic(invar[idx], cols, bg_var),
                                                **extra, gain=float(gain), readnoise=float(rdnoise_e),
                                                satlevel=float(satlevel), sepmed=True, cleantype="meanmask",
                                                fsmode="median", verbose=False, **kw)
        found[idx] = _unmosaic(cr, idx.size, w)

    if len(groups) > 1:
        with ThreadPoolExecutor(max_workers=len(groups)) as pool:
            list(pool.map(run, groups))
    else:
        run(groups[0])
    ar = np.arange(w)
    in_core = (((ar[None, :] >= oy[:, None]) & (ar[None, :] < (oy + h)[:, None]))[:, :, None]
               & ((ar[None, :] >= ox[:, None]) & (ar[None, :] < (ox + wd)[:, None]))[:, None, :])
    kk, ii, jj = np.nonzero(found & in_core & ~masked)
    flat = np.unique(rr[kk, ii] * nx + cc[kk, jj])
    return flat // nx, flat % nx


def cosmic_ray_mask(xp: ModuleType, image, variance, sky: float, inmask, gain: float, rdnoise_e: float,
                    satlevel: float, fill=None, protect=None, params: dict | None = None,
                    core: int = CR_CORE, pad: int = CR_PAD, workers: int = 1) -> np.ndarray:
    """Cosmic rays on a whole reduced frame: :func:`cosmic_ray_candidates`, then
    :func:`cosmic_ray_windows`.

    Parameters
    ----------
    xp : module
    image : array
        Reduced frame, ADU (sky included).
    variance : array
        Background variance of ``image``, ADU^2.
    sky : float
        Median sky, ADU.
    inmask : array of bool
        Pixels never to flag (already masked).
    gain : float
        e-/ADU of ``image``.
    rdnoise_e : float
        Read noise, e-.
    satlevel : float
        Saturation level of ``image``, ADU.
    fill : array of bool, optional
        Pixels whose values are not data (bad, non-finite); default ``inmask``.
    protect : array of bool, optional
        Pixels handed to astroscrappy as its ``inmask`` (saturated); default none.
    params : dict, optional
        Overrides of :data:`CR_PARAMS`.

    Returns
    -------
    numpy.ndarray of bool
        True on cosmic-ray pixels (host array).
    """
    img = np.asarray(to_host(xp.asarray(image, dtype=xp.float32)))
    var = np.asarray(to_host(xp.asarray(variance, dtype=xp.float32)))
    inm = np.asarray(to_host(inmask), dtype=bool)
    fil = inm if fill is None else np.asarray(to_host(fill), dtype=bool)
    pro = np.zeros(img.shape, bool) if protect is None else np.asarray(to_host(protect), dtype=bool)
    bits = (np.where(fil, int(MaskBit.BAD), 0) | np.where(pro, int(MaskBit.SATURATED), 0)
            | np.where(inm & ~fil & ~pro, int(MaskBit.GROWN), 0)).astype(np.uint16)
    cy, cx = cosmic_ray_candidates(np, img, var, inm, sky, gain)
    ys, xs = cosmic_ray_windows(img, lambda y, x: var[y, x], bits, cy, cx, sky, gain, rdnoise_e, satlevel,
                                params, core=core, pad=pad, workers=workers)
    out = np.zeros(img.shape, dtype=bool)
    out[ys, xs] = True
    return out


def weight_map(xp: ModuleType, variance, mask):
    """Inverse-variance weight: ``1 / variance`` where ``mask == 0`` and the variance is
    finite and positive, else 0 (float32, reduced ADU^-2)."""
    var = xp.asarray(variance, dtype=xp.float32)
    ok = (xp.asarray(mask) == 0) & xp.isfinite(var) & (var > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        w = xp.where(ok, xp.float32(1.0) / var, xp.float32(0))
    return w.astype(xp.float32)
