"""Combining a stack of frames into a master: iterative sigma clipping, median of survivors.

The exact rule (v1's ``eclaire.imcombine`` defaults, v1-behaviour.md §4.2), applied to every
pixel independently along the frame axis:

1. Non-finite values (NaN, +-inf) are excluded from the start.
2. Iterate at most ``iters`` times (default 5): with ``m`` the mean and ``s`` the standard
   deviation (``ddof=0``) of the values that survive so far, keep the values with
   ``|x - m| <= sigma * s`` (default ``sigma = 3``). A rejected value is never re-admitted.
   Stop early when an iteration rejects nothing.
3. The result is the median of the survivors; for an even number of survivors, the mean of
   the two middle values. A pixel with no survivor is NaN.

This is the same rule as ``astropy.stats.sigma_clip(cenfunc="mean", stdfunc="std",
sigma=sigma, maxiters=iters)`` followed by a median of the unmasked values.

Note (Samuelson's inequality): for ``c`` values, ``|x - m| <= s * sqrt(c - 1)`` always holds,
so with ``c - 1 < sigma**2`` (nine frames or fewer at ``sigma = 3``) the clipping can never
reject anything and the rule is exactly the plain median. The code uses that fact to skip
the clipping loop; it is not an approximation.

The error (sigma) image of the combined value is ``k(c) * std(survivors, ddof=1) /
sqrt(c)``, where ``k(c)`` is the ratio of the standard deviation of the median of ``c``
Gaussian values to that of their mean (``k(1) = 1``, ``k -> sqrt(pi/2)`` for large ``c``;
tabulated once from a fixed-seed simulation). Pixels with fewer than two survivors get NaN.

Implementation: the frames are sorted per pixel with a Batcher odd-even merge sorting
network built from element-wise ``minimum``/``maximum`` (available in NumPy and CuPy alike);
the survivors of the clipping are then a contiguous run of the sorted values. Work proceeds
in row bands (``band_rows``) so that only ``nframes * band_rows * ncols`` values are in memory
at once; on NumPy each band is further split into cache-sized pixel chunks processed by a
small thread pool (NumPy releases the GIL inside its ufuncs).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from types import ModuleType
from typing import Any

import numpy as np

from gppy.xp import backend_name, to_host

#: A callable returning rows ``[r0, r1)`` of every input frame as an ``(n, r1 - r0, ncols)``
#: float32 array on the backend.
BandReader = Callable[[int, int], Any]

#: Pixels per compute chunk on the CPU (9 frames x 32768 px x 4 B ~ 1.2 MB: fits in L2).
CPU_CHUNK_PIXELS = 32768


@dataclass
class Combined:
    """Result of a combine (host arrays).

    Attributes
    ----------
    image : numpy.ndarray
        float32, combined value per pixel (input units); NaN where nothing survived.
    error : numpy.ndarray
        float32, 1-sigma error of ``image`` (input units); NaN where fewer than 2 survived.
    nused : numpy.ndarray
        uint8/uint16, number of surviving values per pixel.
    """

    image: np.ndarray
    error: np.ndarray
    nused: np.ndarray


@lru_cache(maxsize=64)
def sorting_network(n: int) -> tuple[tuple[int, int], ...]:
    """Comparator pairs ``(i, j)``, ``i < j``, of Batcher's odd-even merge sort for ``n`` items.

    The network is built for the next power of two and pruned of every comparator touching an
    index ``>= n`` (those positions would hold ``+inf`` and never move).
    """
    if n < 1:
        raise ValueError(f"cannot sort {n} items")
    p2 = 1
    while p2 < n:
        p2 *= 2
    pairs: list[tuple[int, int]] = []
    p = 1
    while p < p2:
        k = p
        while k >= 1:
            for j in range(k % p, p2 - k, 2 * k):
                for i in range(min(k, p2 - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p):
                        pairs.append((i + j, i + j + k))
            k //= 2
        p *= 2
    return tuple((a, b) for a, b in pairs if b < n)


@lru_cache(maxsize=256)
def median_error_factor(c: int) -> float:
    """``std(median of c Gaussian values) / std(mean of c values)``.

    Exact for ``c <= 2`` (1.0); otherwise from 200,000 simulated samples with a fixed seed
    (relative accuracy about 0.2 %); ``sqrt(pi/2)`` above 99 values.
    """
    if c <= 2:
        return 1.0
    if c > 99:
        return math.sqrt(math.pi / 2)
    rng = np.random.default_rng(20240423 + c)
    samples = rng.standard_normal((200_000, c))
    return float(np.std(np.median(samples, axis=1)) * math.sqrt(c))


@lru_cache(maxsize=64)
def median_network(n: int) -> tuple[tuple[int, int, bool, bool], ...]:
    """The part of :func:`sorting_network` that the middle value(s) depend on.

    Returns ``(i, j, need_min, need_max)`` per comparator, in order: outputs nobody reads
    later are not computed (a median of 9 needs 30 of the 56 element-wise operations).
    """
    targets = {n // 2} if n % 2 else {n // 2 - 1, n // 2}
    needed = set(targets)
    kept: list[tuple[int, int, bool, bool]] = []
    for a, b in reversed(sorting_network(n)):
        need_min, need_max = a in needed, b in needed
        if need_min or need_max:
            kept.append((a, b, need_min, need_max))
            needed |= {a, b}
    return tuple(reversed(kept))


def _median_rows(xp: ModuleType, rows: list):
    """Element-wise median of a list of equally shaped arrays (rows may be overwritten)."""
    rows = list(rows)
    n = len(rows)
    tmp = xp.empty_like(rows[0])
    for a, b, need_min, need_max in median_network(n):
        if need_min and need_max:
            xp.minimum(rows[a], rows[b], out=tmp)
            xp.maximum(rows[a], rows[b], out=rows[b])
            rows[a], tmp = tmp, rows[a]
        elif need_min:
            xp.minimum(rows[a], rows[b], out=rows[a])
        else:
            xp.maximum(rows[a], rows[b], out=rows[b])
    if n % 2:
        return rows[n // 2]
    return (rows[n // 2 - 1] + rows[n // 2]) * xp.float32(0.5)


def _sort_rows(xp: ModuleType, rows: list) -> list:
    """Sort a list of equally shaped arrays element-wise (ascending across the list)."""
    rows = list(rows)
    tmp = xp.empty_like(rows[0])
    for a, b in sorting_network(len(rows)):
        xp.minimum(rows[a], rows[b], out=tmp)
        xp.maximum(rows[a], rows[b], out=rows[b])
        rows[a], tmp = tmp, rows[a]
    return rows


def _factor_table(xp: ModuleType, n: int):
    return xp.asarray([0.0] + [median_error_factor(c) for c in range(1, n + 1)], dtype=xp.float32)


def combine_chunk(x, xp: ModuleType, sigma: float = 3.0, iters: int = 5):
    """Combine one chunk: ``x`` has shape ``(n, m)`` (frames x pixels), float32.

    Returns ``(image, error, nused)`` as backend arrays of shape ``(m,)``. The rule is the
    module's (see the module docstring). ``x`` may be modified in place.
    """
    n = int(x.shape[0])
    finite = xp.isfinite(x)
    all_finite = bool(finite.all())
    if not all_finite:
        x = xp.where(finite, x, xp.float32(np.inf))
    if all_finite and n - 1 < sigma * sigma:
        # Fast path: nothing can be clipped (Samuelson), every value survives.
        rows = [x[i] for i in range(n)]
        # mean and variance first (order-free), then the median overwrites the rows
        shift = rows[0].copy()
        acc = xp.zeros_like(shift)
        acc2 = xp.zeros_like(shift)
        d = xp.empty_like(shift)
        for row in rows[1:]:
            xp.subtract(row, shift, out=d)
            acc += d
            xp.multiply(d, d, out=d)
            acc2 += d
        med = _median_rows(xp, rows).copy()
        if n < 2:
            return med, xp.full_like(med, np.nan), xp.ones(med.shape, dtype=xp.uint16)
        var = (acc2 - acc * acc / xp.float32(n)) / xp.float32(n - 1)
        err = xp.sqrt(xp.maximum(var, 0)) * xp.float32(median_error_factor(n) / math.sqrt(n))
        return med, err.astype(xp.float32), xp.full(med.shape, n, dtype=xp.uint16)

    s = _sort_rows(xp, [x[i] for i in range(n)])
    srt = xp.stack(s)                                   # (n, m), non-finite sorted last as +inf
    count = finite.sum(axis=0)
    k = xp.arange(n).reshape(n, 1)
    valid = k < count
    for _ in range(max(0, iters)):
        c = valid.sum(axis=0)
        cc = xp.maximum(c, 1).astype(xp.float32)
        vals = xp.where(valid, srt, xp.float32(0))
        mean = vals.sum(axis=0) / cc
        dev = xp.where(valid, srt - mean, xp.float32(0))
        std = xp.sqrt((dev * dev).sum(axis=0) / cc)
        new_valid = valid & (xp.abs(srt - mean) <= xp.float32(sigma) * std)
        if bool((new_valid == valid).all()):
            break
        valid = new_valid
    c = valid.sum(axis=0)
    lo = xp.argmax(valid, axis=0)
    cm1 = xp.maximum(c - 1, 0)
    i1 = (lo + cm1 // 2).reshape(1, -1)
    i2 = (lo + c // 2).clip(0, n - 1).reshape(1, -1)
    med = (xp.take_along_axis(srt, i1, axis=0)[0] + xp.take_along_axis(srt, i2, axis=0)[0]) * xp.float32(0.5)
    med = xp.where(c > 0, med, xp.float32(np.nan))
    cc = xp.maximum(c, 1).astype(xp.float32)
    vals = xp.where(valid, srt, xp.float32(0))
    mean = vals.sum(axis=0) / cc
    dev = xp.where(valid, srt - mean, xp.float32(0))
    var1 = (dev * dev).sum(axis=0) / xp.maximum(c - 1, 1).astype(xp.float32)
    factor = _factor_table(xp, n)[c]
    err = xp.sqrt(var1) * factor / xp.sqrt(cc)
    err = xp.where(c >= 2, err, xp.float32(np.nan))
    return med.astype(xp.float32), err.astype(xp.float32), c.astype(xp.uint16)


def combine_bands(read_band: BandReader, nframes: int, shape: tuple[int, int], xp: ModuleType,
                  sigma: float = 3.0, iters: int = 5, band_rows: int = 512,
                  workers: int | None = None) -> Combined:
    """Combine ``nframes`` frames of ``shape`` read band by band.

    Parameters
    ----------
    read_band : callable
        ``read_band(r0, r1)`` returns rows ``[r0, r1)`` of every frame as an array of shape
        ``(nframes, r1 - r0, ncols)`` (float32, on ``xp``; any units).
    nframes : int
        Number of input frames.
    shape : (int, int)
        ``(nrows, ncols)`` of each frame, pixels.
    xp : module
        NumPy or CuPy.
    sigma : float
        Clipping half-width in standard deviations about the mean.
    iters : int
        Maximum number of clipping iterations.
    band_rows : int
        Rows per band: bounds memory to about ``nframes * band_rows * ncols * 4`` bytes
        (times ~3 while sorting).
    workers : int, optional
        CPU threads for the chunks (default: the CPU count, at most 4). Ignored on CuPy.

    Returns
    -------
    Combined
        Host arrays of the combined image, its error and the survivor count.
    """
    if nframes < 1:
        raise ValueError("nothing to combine")
    nrows, ncols = int(shape[0]), int(shape[1])
    band_rows = max(1, int(band_rows))
    image = np.empty((nrows, ncols), dtype=np.float32)
    error = np.empty((nrows, ncols), dtype=np.float32)
    nused = np.empty((nrows, ncols), dtype=np.uint16)
    on_gpu = backend_name(xp) == "cupy"
    nworkers = 1 if on_gpu else (workers or min(4, os.cpu_count() or 1))
    bands = [(r0, min(nrows, r0 + band_rows)) for r0 in range(0, nrows, band_rows)]

    def load(band: tuple[int, int]):
        stack = read_band(*band)
        if tuple(stack.shape) != (nframes, band[1] - band[0], ncols):
            raise ValueError(f"band reader returned shape {tuple(stack.shape)} for rows {band}")
        return stack

    def run_chunk(flat, p0: int, p1: int, out: tuple):
        med, err, cnt = combine_chunk(flat[:, p0:p1].copy() if not on_gpu else flat[:, p0:p1], xp,
                                      sigma, iters)
        out[0][p0:p1] = to_host(med)
        out[1][p0:p1] = to_host(err)
        out[2][p0:p1] = to_host(cnt)

    with ThreadPoolExecutor(max_workers=max(2, nworkers)) as pool:
        pending = pool.submit(load, bands[0])
        for bi, (r0, r1) in enumerate(bands):
            stack = pending.result()
            if bi + 1 < len(bands):        # read the next band while this one is combined
                pending = pool.submit(load, bands[bi + 1])
            flat = stack.reshape(nframes, -1)
            npix = flat.shape[1]
            out = (image[r0:r1].reshape(-1), error[r0:r1].reshape(-1), nused[r0:r1].reshape(-1))
            step = npix if on_gpu else CPU_CHUNK_PIXELS
            chunks = [(p0, min(npix, p0 + step)) for p0 in range(0, npix, step)]
            if nworkers == 1:
                for p0, p1 in chunks:
                    run_chunk(flat, p0, p1, out)
            else:
                list(pool.map(lambda c, f=flat, o=out: run_chunk(f, c[0], c[1], o), chunks))
    return Combined(image=image, error=error, nused=nused)


def combine_arrays(frames: list[np.ndarray] | np.ndarray, xp: ModuleType, sigma: float = 3.0,
                   iters: int = 5, band_rows: int = 512) -> Combined:
    """Combine in-memory frames (a list of equally shaped 2-D arrays, any units)."""
    frames = list(frames)
    shape = frames[0].shape
    for f in frames:
        if f.shape != shape:
            raise ValueError(f"frame shapes differ: {f.shape} != {shape}")

    def read_band(r0: int, r1: int):
        return xp.asarray(np.stack([np.asarray(f[r0:r1], dtype=np.float32) for f in frames]))

    return combine_bands(read_band, len(frames), shape, xp, sigma=sigma, iters=iters, band_rows=band_rows)
