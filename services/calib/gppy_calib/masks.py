"""Per-frame bit mask and inverse-variance weight (beyond v1, which had neither).

Bits (:class:`gppy.masks.MaskBit`, uint16, OR-ed) set by the calibration:

* ``BAD`` (1): from the masters. A pixel is bad when any master is non-finite there; when
  the flat is below ``FLAT_LOW`` or above ``FLAT_HIGH`` times its median (dead or
  dust-choked pixels and columns); when the master dark shows a hot pixel (dark current
  above the master's median by more than ``HOT_RATE_E`` e-/s *and* by more than
  ``HOT_NSIGMA`` times the master dark's robust scatter); or when the master bias's error
  image exceeds ``NOISY_FACTOR`` times its median (noisy pixels and columns; only when the
  bias combined at least ``NOISY_MIN_FRAMES`` frames, so that the error is meaningful).
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

from concurrent.futures import ThreadPoolExecutor
from types import ModuleType

import numpy as np
from scipy import ndimage

from gppy.masks import MaskBit
from gppy.xp import to_host

FLAT_LOW = 0.5
FLAT_HIGH = 1.5
HOT_RATE_E = 0.5          # e-/s above the median dark current
HOT_NSIGMA = 5.0
NOISY_FACTOR = 3.0
NOISY_MIN_FRAMES = 5

#: astroscrappy parameters: v1's unused calib.cr_removal (sigclip 4.5, sigfrac 0.3, objlim 5) with
#: 2 iterations instead of 4 (on simulated frames iterations 3-4 added nothing).
CR_PARAMS = {"sigclip": 4.5, "sigfrac": 0.3, "objlim": 5.0, "niter": 2}
#: Candidate threshold of the cheap pre-screen (a little below ``sigclip``) and its sharpness
#: limit (see :func:`cosmic_ray_candidates`).
CR_PRESCREEN = 4.0
CR_SHARPNESS = 0.35
#: Tile size and context padding of the tiled astroscrappy run, px.
CR_TILE = 32
CR_PAD = 8


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


def _shift_max(xp: ModuleType, a, r: int):
    """Maximum of ``a`` over a (2r+1) x (2r+1) box (edges padded with False/0)."""
    out = a.copy()
    for axis in (0, 1):
        acc = out.copy()
        for k in range(1, r + 1):
            fwd = xp.zeros_like(out)
            bwd = xp.zeros_like(out)
            if axis == 0:
                fwd[k:] = out[:-k]
                bwd[:-k] = out[k:]
            else:
                fwd[:, k:] = out[:, :-k]
                bwd[:, :-k] = out[:, k:]
            acc = acc | fwd | bwd
        out = acc
    return out


def cosmic_ray_candidates(xp: ModuleType, image, invar, inmask, threshold: float = CR_PRESCREEN,
                          sharpness: float = CR_SHARPNESS):
    """Pixels that L.A.Cosmic could flag, without the cores of well-sampled stars.

    L.A.Cosmic's statistic on a 2x sub-sampled Laplacian reduces, per pixel, to
    ``S = (I - mean4) / N`` (``mean4``: the 4 nearest neighbours, ``N``: the noise); it flags
    ``S - median5(S) > sigclip``. A candidate has ``S > threshold`` (a little below
    ``sigclip``) and is sharp: ``I - mean4 > sharpness * (I - ring3)``, ``ring3`` being the
    mean of the 4 pixels 3 px away along the axes. A cosmic-ray pixel (even inside a track,
    or on a star's wing) has a ratio of 0.5-1; the core of a star of FWHM >= 2.6 px less than
    0.35. Returns a boolean array (on ``xp``), grown by 3 pixels to cover neighbour growth.
    """
    f32 = xp.float32
    img = xp.asarray(image, dtype=f32)
    p = xp.pad(img, 3, mode="reflect")         # mirrored border: edge pixels get neighbours too
    c = p[3:-3, 3:-3]
    mean4 = (p[2:-4, 3:-3] + p[4:-2, 3:-3] + p[3:-3, 2:-4] + p[3:-3, 4:-2]) * f32(0.25)
    ring3 = (p[:-6, 3:-3] + p[6:, 3:-3] + p[3:-3, :-6] + p[3:-3, 6:]) * f32(0.25)
    lap = c - mean4
    with np.errstate(divide="ignore", invalid="ignore"):
        s = lap / xp.sqrt(xp.asarray(invar, dtype=f32) * f32(1.25))
    cand = (s > f32(threshold)) & (lap > f32(sharpness) * (c - ring3)) & ~xp.asarray(inmask, dtype=bool)
    return _shift_max(xp, cand, 3)


def cosmic_ray_mask(xp: ModuleType, image, variance, sky: float, inmask, gain: float, rdnoise_e: float,
                    satlevel: float, fill=None, protect=None, params: dict | None = None,
                    tile: int = CR_TILE, pad: int = CR_PAD, workers: int = 2) -> np.ndarray:
    """Cosmic rays on a reduced frame with astroscrappy (L.A.Cosmic), on candidate tiles.

    astroscrappy gets the full noise model as ``invar``: the background variance plus the
    sources' Poisson term ``max(image - sky, 0) / gain``. To keep the cost proportional to
    what is there, the frame is cut into ``tile`` x ``tile`` tiles and astroscrappy runs (in
    ``workers`` threads; it releases the GIL) only on tiles holding a candidate
    (:func:`cosmic_ray_candidates`), each padded by ``pad`` pixels of context; only the
    tile's own pixels are kept from each run. Pixels of ``fill`` (bad, non-finite) take their
    nearest good neighbour's value before the run (astroscrappy's own ``inmask`` misses cosmic
    rays next to a masked column); pixels of ``protect`` (saturated) go to astroscrappy's
    ``inmask``, which keeps the cores of saturated stars from producing false detections.
    Pixels of ``inmask`` are never flagged.

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
    import astroscrappy

    fill = inmask if fill is None else fill

    kw = dict(CR_PARAMS)
    kw.update(params or {})
    img = xp.asarray(image, dtype=xp.float32)
    invar = xp.asarray(variance, dtype=xp.float32) + xp.maximum(img - xp.float32(sky), 0) * xp.float32(1.0 / gain)
    cand = to_host(cosmic_ray_candidates(xp, img, invar, inmask))
    # mirror the frame by ``pad`` pixels so that tiles on the border get context too
    # (L.A.Cosmic misses tracks on the outermost rows and columns otherwise)
    data = np.pad(np.asarray(to_host(img), dtype=np.float32), pad, mode="reflect")
    var = np.pad(np.asarray(to_host(invar), dtype=np.float32), pad, mode="reflect")
    mask = np.pad(np.asarray(to_host(fill), dtype=bool), pad, mode="reflect")
    prot = None if protect is None else np.pad(np.asarray(to_host(protect), dtype=bool), pad, mode="reflect")
    ny, nx = cand.shape
    ty, tx = -(-ny // tile), -(-nx // tile)
    padded = np.zeros((ty * tile, tx * tile), dtype=bool)
    padded[:ny, :nx] = cand
    tiles = np.argwhere(padded.reshape(ty, tile, tx, tile).any(axis=(1, 3)))
    out = np.zeros((ny, nx), dtype=bool)

    def run(t):
        y0, x0 = int(t[0]) * tile, int(t[1]) * tile
        y1, x1 = min(ny, y0 + tile), min(nx, x0 + tile)
        # in the mirrored frame the tile starts at (y0 + pad, x0 + pad)
        sl = (slice(y0, y1 + 2 * pad), slice(x0, x1 + 2 * pad))
        sub, sub_var, sub_mask = data[sl], var[sl], mask[sl]
        if sub_mask.any():
            if sub_mask.all():
                return
            # masked pixels take the value of their nearest unmasked neighbour: astroscrappy's
            # own inmask misses cosmic rays next to a masked (bad) column
            iy, ix = ndimage.distance_transform_edt(sub_mask, return_distances=False, return_indices=True)
            sub, sub_var = sub[iy, ix], sub_var[iy, ix]
        extra = {} if prot is None or not prot[sl].any() else {"inmask": np.ascontiguousarray(prot[sl])}
        cr, _ = astroscrappy.detect_cosmics(np.ascontiguousarray(sub), invar=np.ascontiguousarray(sub_var),
                                            **extra, gain=float(gain), readnoise=float(rdnoise_e),
                                            satlevel=float(satlevel), sepmed=True, cleantype="meanmask",
                                            fsmode="median", verbose=False, **kw)
        out[y0:y1, x0:x1] = cr[pad:pad + y1 - y0, pad:pad + x1 - x0]

    if workers > 1 and len(tiles) > 1:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(run, tiles))
    else:
        for t in tiles:
            run(t)
    return out & ~np.asarray(to_host(inmask), dtype=bool)


def weight_map(xp: ModuleType, variance, mask):
    """Inverse-variance weight: ``1 / variance`` where ``mask == 0`` and the variance is
    finite and positive, else 0 (float32, reduced ADU^-2)."""
    var = xp.asarray(variance, dtype=xp.float32)
    ok = (xp.asarray(mask) == 0) & xp.isfinite(var) & (var > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        w = xp.where(ok, xp.float32(1.0) / var, xp.float32(0))
    return w.astype(xp.float32)
