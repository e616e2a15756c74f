"""One science frame in a single pass over its pixels, in row bands.

The reduction of a 61-Mpx frame is bound by memory traffic, not arithmetic: written as
whole-frame array expressions it makes a dozen passes over 245-MB temporaries. Here each
band of :data:`BAND_ROWS` rows is read, reduced and turned into every per-pixel product while
it sits in the CPU cache, and the bands are shared by ``workers`` threads (NumPy releases the
GIL in its loops). One pass gives, per pixel:

* the reduced image ``(raw - offset) * invflat`` with ``offset = bias + dark * s`` and
  ``invflat = 1 / flat`` (:mod:`gppy_calib.reduce`; ``s = t_science / t_dark``), float32 ADU,
  0 where non-finite;
* the bit mask: ``BAD``/``EDGE`` from the masters, ``SATURATED`` (raw at or above the
  saturation level), ``NONFINITE``;
* the inverse-variance weight ``1 / var`` (0 where masked), ``var = a + sky (b + sky c)``
  (:func:`gppy_calib.reduce.variance_terms`);
* the candidate pixels of the cosmic-ray search (:func:`gppy_calib.masks.cosmic_ray_candidates`,
  with a 3-row halo so that bands see their neighbours);
* the binned S/N image of the trail search (:func:`gppy_calib.trails.block_snr`), with the
  cosmic-ray candidates left out (they are sharp: no trail light), so that the trail search
  need not wait for the cosmic rays.

The sky level and the trail search's background, both medians of every 4th pixel, come
first from that sub-grid (:func:`frame_statistics`), so that the pass needs them ready.

Products are written into buffers the caller owns (so that a night of frames reuses the
same memory); the image, weight and mask for the files are big-endian, as FITS stores them,
so that writing them is a plain copy. The array module ``xp`` is NumPy or CuPy; with CuPy
the whole frame is one band.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import ModuleType

import numpy as np

from gppy.masks import MaskBit
from gppy.xp import backend_name, to_host
from gppy_calib import masks, reduce, trails

#: Rows per band: a multiple of the trail search's BIN and BKG_BLOCK; 64 rows of a 9576-px
#: frame are 2.4 MB per float32 array, so a band's dozen arrays stay in the L3 cache.
BAND_ROWS = 64
#: Halo rows of the cosmic-ray stencil (:func:`gppy_calib.masks.cosmic_ray_candidates`).
CR_HALO = 3

_SAT = int(MaskBit.SATURATED)
_NONFINITE = int(MaskBit.NONFINITE)
_BAD = int(MaskBit.BAD)


@dataclass
class FrameTerms:
    """Everything the reduction of a frame needs from its masters (shared by the frames that
    use the same masters and exposure-time scale).

    Attributes
    ----------
    offset : array
        ``bias + dark * s``, raw ADU.
    invflat : array
        ``1 / flat`` (inf or NaN where the flat is 0 or NaN).
    bad : array of uint8
        ``BAD`` and ``EDGE`` bits from the masters (every bit the calibration sets fits in 8
        bits; the mask file is int16).
    var_a, var_c : array
        Variance terms, ``var = a + sky * (b + sky * c)`` (reduced ADU^2), with
        ``b = invflat * inv_gain`` (:func:`gppy_calib.reduce.variance_terms`), computed from
        ``invflat`` where needed: one array less to read per frame (the pass is bound by
        memory traffic).
    inv_gain : float
        ``1 / g``, e-/ADU of the raw frame.
    nbad : int
        Pixels with the ``BAD`` bit.
    regular : bool
        ``a > 0`` and ``b, c >= 0``, all finite, on every unflagged pixel: the variance is then
        finite and positive there for any sky >= 0.
    floor_a, floor_b, floor_c : numpy.ndarray
        Minimum of ``a``, ``b``, ``c`` over the unflagged pixels of each block of
        :data:`BAND_ROWS` rows (inf for a block without one): a lower bound of the variance
        of a band, for the cosmic-ray pre-screen.
    bin_a, bin_b, bin_c : array
        Sums of ``a``, ``b``, ``c`` over the unflagged pixels of each
        :data:`gppy_calib.trails.BIN`-square block (float64): the variance of the trail
        search's block sums.
    sub : tuple of array
        ``offset``, ``invflat`` and ``bad`` on the statistics sub-grid (every
        :data:`gppy_calib.reduce.STAT_STEP`-th pixel), contiguous.
    """

    offset: object
    invflat: object
    bad: object
    var_a: object
    var_c: object
    inv_gain: float = 1.0
    nbad: int = 0
    regular: bool = False
    floor_a: np.ndarray = field(default_factory=lambda: np.zeros(0))
    floor_b: np.ndarray = field(default_factory=lambda: np.zeros(0))
    floor_c: np.ndarray = field(default_factory=lambda: np.zeros(0))
    bin_a: object = None
    bin_b: object = None
    bin_c: object = None
    sub: tuple = ()

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.offset.shape)

    def var_floor(self, r0: int, r1: int, sky: float) -> float:
        """A lower bound of the variance over the unflagged pixels of rows ``r0:r1``."""
        k0, k1 = r0 // BAND_ROWS, -(-r1 // BAND_ROWS)
        a, b, c = (float(np.min(f[k0:k1])) for f in (self.floor_a, self.floor_b, self.floor_c))
        if not np.isfinite(a):
            return float("inf")
        return a + sky * (b + sky * c) if sky > 0 else a


def frame_terms(bias, dark, flat, bias_err, dark_err, flat_err, bad, scale: float, gain: float,
                rdnoise_adu: float, xp: ModuleType) -> FrameTerms:
    """:class:`FrameTerms` of a master set (see :func:`gppy_calib.reduce.variance_terms` for the
    arguments; ``bad`` is the mask of the masters, bits below 256)."""
    f32 = xp.float32
    offset = xp.asarray(bias, dtype=f32) + xp.asarray(dark, dtype=f32) * f32(scale)
    with np.errstate(divide="ignore", invalid="ignore"):
        invflat = f32(1) / xp.asarray(flat, dtype=f32)
    a, b, c = reduce.variance_terms(flat, dark, bias_err, dark_err, flat_err, scale, gain, rdnoise_adu, xp)
    bad = xp.asarray(bad)
    if bad.size and int(bad.max()) > 0xFF:
        raise ValueError("master mask bits beyond 8 bits")
    bad = bad.astype(xp.uint8)
    good = bad == 0
    ny = int(bad.shape[0])
    floors = []
    regular = True
    with np.errstate(invalid="ignore"):
        for t, lo in ((a, 0.0), (b, 0.0), (c, 0.0)):
            g = xp.where(good, t, f32(np.inf))
            fl = np.array([float(xp.min(g[r0:r0 + BAND_ROWS])) for r0 in range(0, ny, BAND_ROWS)])
            floors.append(fl)
            ok = xp.isfinite(t) & ((t > lo) if t is a else (t >= lo))
            regular = regular and bool(xp.all(ok | ~good))
    nbad = int(xp.count_nonzero(bad & xp.uint8(_BAD)))
    with np.errstate(invalid="ignore"):
        bins = [trails.bin_sum(xp.where(good & xp.isfinite(t), t, f32(0)).astype(xp.float64)) for t in (a, b, c)]
    st = reduce.STAT_STEP
    sub = tuple(xp.ascontiguousarray(t[::st, ::st]) for t in (offset, invflat, bad))
    return FrameTerms(offset, invflat, bad, a, c, float(f32(1.0 / gain)), nbad, regular, *floors, *bins, sub)


def variance_at(terms: FrameTerms, sky: float, ys, xs, xp: ModuleType) -> np.ndarray:
    """Background variance ``a + sky (b + sky c)`` at the pixels ``(ys, xs)`` (host arrays of
    any shape), reduced ADU^2, as a host float32 array."""
    s = np.float32(max(float(sky), 0.0))
    if backend_name(xp) != "numpy":
        ys, xs = xp.asarray(ys), xp.asarray(xs)
    a, c = terms.var_a[ys, xs], terms.var_c[ys, xs]
    b = terms.invflat[ys, xs] * np.float32(terms.inv_gain)
    return to_host(a + s * (b + s * c)).astype(np.float32, copy=False)


@dataclass
class FrameStats:
    """Sub-grid statistics of a frame (every ``step``-th pixel in each axis).

    Attributes
    ----------
    sky : float
        Median of the good reduced pixels (NaN when none), reduced ADU.
    background : numpy.ndarray or None
        Block medians of the trail search (:func:`gppy_calib.trails.block_background`).
    raw_min, raw_max : float
        Extremes of the finite raw values of the sub-grid (NaN when none).
    """

    sky: float
    background: np.ndarray | None
    raw_min: float = float("nan")
    raw_max: float = float("nan")

    @property
    def maybe_empty(self) -> bool:
        """True when the sub-grid is all non-finite or constant: the whole frame must be checked
        (:func:`gppy_calib.night.check_signal`); otherwise it holds image data."""
        return not (np.isfinite(self.raw_min) and np.isfinite(self.raw_max)) or self.raw_min == self.raw_max


def _median(xp: ModuleType, vals) -> float:
    """``median(vals)`` (NaN when empty) as :func:`numpy.median` gives it, from one partition:
    for an even count the lower middle value is the maximum of the lower part."""
    n = int(vals.size)
    if n == 0:
        return float("nan")
    part = xp.partition(vals, n // 2)
    if n % 2:
        return float(part[n // 2])
    return float(xp.mean(xp.stack([xp.max(part[:n // 2]), part[n // 2]])))


def frame_statistics(raw, terms: FrameTerms, sat_raw: float, xp: ModuleType, background: bool,
                     step: int = reduce.STAT_STEP) -> FrameStats:
    """The sky (median of the good reduced pixels on the sub-grid) and, when asked, the trail
    search's block background, from every ``step``-th pixel of the raw frame.

    ``raw`` may be any array-like that slices into float32 ADU (a NumPy array or a
    :class:`gppy_calib.rawio.RawImage`). Good pixels: no master flag, below ``sat_raw``,
    finite once reduced (the mask the pass builds, on the sub-grid).
    """
    f32 = xp.float32
    raw_s = xp.asarray(raw[::step, ::step], dtype=f32)
    if step == reduce.STAT_STEP and terms.sub:
        off_s, inv_s, bad_s = terms.sub
    else:
        off_s, inv_s, bad_s = (t[::step, ::step] for t in (terms.offset, terms.invflat, terms.bad))
    with np.errstate(invalid="ignore"):
        red_s = (raw_s - off_s) * inv_s
    good = (bad_s == 0) & (raw_s < f32(sat_raw)) & xp.isfinite(red_s)
    sky = _median(xp, red_s[good])
    bkg = None
    if background:
        bkg = trails.block_background(to_host(red_s), to_host(good), tuple(terms.shape), trails.BKG_BLOCK, step)
    fin = raw_s[xp.isfinite(raw_s)]
    lo, hi = (float(xp.min(fin)), float(xp.max(fin))) if int(fin.size) else (float("nan"), float("nan"))
    return FrameStats(sky, bkg, lo, hi)


@dataclass
class FrameBuffers:
    """Host buffers of one frame's products, as written (big-endian), reused from frame to frame.

    Attributes
    ----------
    image_be, weight_be : numpy.ndarray
        Reduced image and weight (big-endian float32).
    mask_be : numpy.ndarray
        Bit mask (big-endian int16, :data:`gppy.masks.MASK_DTYPE`).
    """

    image_be: np.ndarray
    weight_be: np.ndarray
    mask_be: np.ndarray

    @classmethod
    def empty(cls, shape: tuple[int, int]) -> FrameBuffers:
        return cls(np.empty(shape, ">f4"), np.empty(shape, ">f4"), np.empty(shape, ">i2"))

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.image_be.shape)


@dataclass
class FramePass:
    """What the pass found besides the products in the buffers.

    Attributes
    ----------
    counts : dict
        Pixels flagged ``BAD``, ``SATURATED`` and ``NONFINITE``.
    cr_y, cr_x : numpy.ndarray
        Cosmic-ray candidate pixels (not grown), int64.
    binned : numpy.ndarray or None
        Binned S/N image of the trail search.
    """

    counts: dict = field(default_factory=dict)
    cr_y: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    cr_x: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    binned: np.ndarray | None = None


def _share(func, items: list, workers: int, pool: ThreadPoolExecutor | None) -> list:
    """``[func(item) for item in items]`` on ``workers`` threads taking the next item as they
    finish (in ``pool``, or in new threads)."""
    results: list = [None] * len(items)
    order = iter(range(len(items)))
    lock = threading.Lock()

    def work() -> None:
        while True:
            with lock:
                i = next(order, None)
            if i is None:
                return
            results[i] = func(items[i])

    if pool is None:
        with ThreadPoolExecutor(max_workers=workers) as own:
            for fut in [own.submit(work) for _ in range(workers)]:
                fut.result()
    else:
        for fut in [pool.submit(work) for _ in range(workers)]:
            fut.result()
    return results


def _trail_bins(xp: ModuleType, red, var, masked, cand, r0: int, nb: int, nbx: int, terms: FrameTerms, bkg_cols,
                sky, binned: np.ndarray) -> None:
    """Rows ``r0 // BIN`` on of the trail search's binned S/N (:func:`gppy_calib.trails.block_snr`)
    from a band: the block sums of the whole band, less the pixels left out (masked, or
    cosmic-ray candidates: sharp, no trail light), so that only a few pixels are handled one
    by one; the variance sums over the master-good pixels come from :class:`FrameTerms`."""
    b = trails.BIN
    hb, wb = nb * b, nbx * b
    b0 = r0 // b
    blk = (r0 + b * xp.arange(nb)) // trails.BKG_BLOCK
    bk_bins = bkg_cols[blk][:, 0:wb:b].astype(xp.float64)                 # (nb, nbx)
    num = trails.bin_sum(red[:hb, :wb]).astype(xp.float64) - (b * b) * bk_bins
    den = terms.bin_a[b0:b0 + nb] + sky * (terms.bin_b[b0:b0 + nb] + sky * terms.bin_c[b0:b0 + nb])
    idx = xp.flatnonzero(masked[:hb, :wb])
    iy, ix = idx // wb, idx % wb
    if cand is not None and cand[0].size:
        cy, cx = xp.asarray(cand[0] - r0), xp.asarray(cand[1])
        inside = (cy < hb) & (cx < wb)
        iy, ix = xp.concatenate([iy, cy[inside]]), xp.concatenate([ix, cx[inside]])
    n = nb * nbx
    cell = (iy // b) * nbx + ix // b
    resid = red[iy, ix].astype(xp.float64) - bkg_cols[(r0 + iy) // trails.BKG_BLOCK, ix]
    num -= xp.bincount(cell, weights=resid, minlength=n).reshape(nb, nbx)
    good = terms.bad[r0 + iy, ix] == 0                                     # in the sums of FrameTerms
    den -= xp.bincount(cell[good], weights=var[iy[good], ix[good]].astype(xp.float64), minlength=n).reshape(nb, nbx)
    left = xp.bincount(cell, minlength=n).reshape(nb, nbx) < b * b
    valid = left & (den > 0)
    snr = xp.where(valid, num / xp.sqrt(xp.where(valid, den, 1.0)), 0.0)
    binned[b0:b0 + nb] = to_host(snr).astype(np.float32)


def reduce_pass(raw, terms: FrameTerms, stats: FrameStats, sat_raw: float, gain: float, out: FrameBuffers,
                xp: ModuleType, *, cosmic_rays: bool, satellite_trails: bool, workers: int = 2,
                band_rows: int = BAND_ROWS, pool: ThreadPoolExecutor | None = None) -> FramePass:
    """Reduce a frame and build its mask, weight, cosmic-ray candidates and binned S/N image.

    Parameters
    ----------
    raw : array-like
        Raw frame, sliceable by rows into float32 ADU (NumPy array or
        :class:`gppy_calib.rawio.RawImage`).
    terms : FrameTerms
    stats : FrameStats
        Sky and (for trails) the block background of this frame.
    sat_raw : float
        Raw saturation level, ADU.
    gain : float
        e-/ADU of the reduced frame (the sources' Poisson term of the cosmic-ray noise).
    out : FrameBuffers
        Filled in place.
    xp : module
    cosmic_rays, satellite_trails : bool
        Whether to collect the candidates / the binned S/N image.
    workers : int
        Threads sharing the bands (NumPy only).
    band_rows : int
        Rows per band (:data:`BAND_ROWS`; with CuPy the whole frame is one band).
    pool : ThreadPoolExecutor, optional
        Threads to use (at least ``workers``); default: ``workers`` new ones.

    Returns
    -------
    FramePass
    """
    f32 = xp.float32
    ny, nx = terms.shape
    sky_cr = float(stats.sky) if np.isfinite(stats.sky) else 0.0     # the cosmic-ray noise's sky
    sky = f32(max(sky_cr, 0.0))                                         # the variance model's (>= 0)
    cpu = backend_name(xp) == "numpy"
    step = band_rows if cpu else -(-ny // band_rows) * band_rows
    bands = [(r0, min(ny, r0 + step)) for r0 in range(0, ny, step)]
    nbx = nx // trails.BIN
    binned = np.zeros((ny // trails.BIN, nbx), np.float32) if satellite_trails else None
    if satellite_trails:
        bkg = xp.asarray(stats.background)                               # (blocks y, blocks x)
        bkg_cols = bkg[:, xp.arange(nx) // trails.BKG_BLOCK]            # (blocks y, nx)
    sat = f32(sat_raw)
    halo = CR_HALO if cosmic_rays else 0
    sat_bit, nf_bit = xp.uint8(_SAT), xp.uint8(_NONFINITE)
    inv_gain = f32(terms.inv_gain)

    def band(rows: tuple[int, int]) -> dict:
        r0, r1 = rows
        a0, a1 = max(0, r0 - halo), min(ny, r1 + halo)
        own = slice(r0 - a0, r1 - a0)
        raw_b = xp.asarray(raw[a0:a1], dtype=f32)
        with np.errstate(invalid="ignore", over="ignore"):
            red = raw_b - terms.offset[a0:a1]
            red *= terms.invflat[a0:a1]
            total = xp.sum(red)
        raw_o = raw_b[own]
        m = terms.bad[r0:r1].copy()
        is_sat = raw_o >= sat
        nsat = int(xp.count_nonzero(is_sat))
        if nsat:
            m[is_sat] |= sat_bit
        nonfinite = 0
        if not bool(xp.isfinite(total)):                 # rare: NaN/inf in the raw or the masters
            finite = xp.isfinite(red)
            nonfinite = int(red[own].size - xp.count_nonzero(finite[own]))
            red = xp.where(finite, red, f32(0))
            m[~finite[own]] |= nf_bit
        red_o = red[own]
        var = terms.var_c[r0:r1] * sky
        var += terms.invflat[r0:r1] * inv_gain              # b (see FrameTerms)
        var *= sky
        var += terms.var_a[r0:r1]
        masked = m != 0
        with np.errstate(divide="ignore", invalid="ignore"):
            if terms.regular:                            # var > 0 and finite wherever m == 0
                w = f32(1) / var
                w[masked] = 0
            else:
                ok = ~masked & (var > 0) & xp.isfinite(var)
                w = xp.where(ok, f32(1) / var, f32(0))
        out.image_be[r0:r1] = to_host(red_o)
        out.weight_be[r0:r1] = to_host(w)
        out.mask_be[r0:r1] = to_host(m)
        res = {"saturated": nsat, "nonfinite": nonfinite}
        if cosmic_rays:
            ys, xs = masks.cosmic_ray_candidates(xp, red, var, masked, sky_cr, gain,
                                                 pad_rows=(halo - (r0 - a0), halo - (a1 - r1)),
                                                 var_floor=terms.var_floor(r0, r1, float(sky)))
            res["cr"] = (ys + r0, xs)
        if satellite_trails:
            nb = (r1 - r0) // trails.BIN
            if nb and nbx:
                _trail_bins(xp, red_o, var, masked, res.get("cr"), r0, nb, nbx, terms, bkg_cols, sky, binned)
        return res

    if cpu and workers > 1 and len(bands) > 1:
        results = _share(band, bands, workers, pool)
    else:
        results = [band(b) for b in bands]
    fp = FramePass(binned=binned)
    fp.counts = {"bad": terms.nbad, **{k: sum(r[k] for r in results) for k in ("saturated", "nonfinite")}}
    if cosmic_rays:
        fp.cr_y = np.concatenate([r["cr"][0] for r in results])
        fp.cr_x = np.concatenate([r["cr"][1] for r in results])
    return fp


def flag_pixels(out: FrameBuffers, ys: np.ndarray, xs: np.ndarray, bit: int) -> None:
    """Set ``bit`` in the mask and zero the weight at the pixels ``(ys, xs)``."""
    if ys.size:
        out.mask_be[ys, xs] = out.mask_be[ys, xs] | np.int16(bit)
        out.weight_be[ys, xs] = 0


class PixelSNR:
    """The trail search's full-resolution S/N image, computed only at the pixels asked for.

    ``snr[ys, xs]`` is ``(image - background) / sqrt(var)`` there, 0 on masked (mask != 0,
    read at the time of the call) or non-finite pixels and where set to 0 (``snr[ys, xs] =
    0``); the same values as :func:`gppy_calib.trails.snr_image` with the background of
    :func:`frame_statistics`. See :func:`gppy_calib.trails.search`.
    """

    def __init__(self, image: np.ndarray, terms: FrameTerms, stats: FrameStats, mask: np.ndarray, xp: ModuleType,
                 exclude: tuple[np.ndarray, np.ndarray] | None = None):
        # image and mask may be the big-endian buffers (:class:`FrameBuffers`); ``exclude``:
        # pixels read as 0 (the cosmic-ray candidates, as in the binned image of the pass)
        self.shape = tuple(image.shape)
        self._image, self._terms, self._mask, self._xp = image, terms, mask, xp
        self._sky = stats.sky if np.isfinite(stats.sky) else 0.0
        self._bkg = np.asarray(stats.background, dtype=np.float32)
        self._zero: np.ndarray | None = None
        if exclude is not None and np.size(exclude[0]):
            self[exclude] = 0.0

    def __getitem__(self, key) -> np.ndarray:
        ys, xs = (np.asarray(k, dtype=np.int64) for k in key)
        var = variance_at(self._terms, self._sky, ys, xs, self._xp)
        bk = self._bkg[ys // trails.BKG_BLOCK, xs // trails.BKG_BLOCK]
        with np.errstate(divide="ignore", invalid="ignore"):
            snr = (self._image[ys, xs].astype(np.float32) - bk) / np.sqrt(var)
        good = (self._mask[ys, xs] == 0) & np.isfinite(snr)
        if self._zero is not None:
            good &= ~self._zero[ys, xs]
        return np.where(good, snr, np.float32(0)).astype(np.float32, copy=False)

    def __setitem__(self, key, value) -> None:
        if np.any(np.asarray(value) != 0):
            raise ValueError("PixelSNR only accepts zeros")
        if self._zero is None:
            self._zero = np.zeros(self.shape, dtype=bool)
        self._zero[key] = True
