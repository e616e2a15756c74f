"""FFT convolution of image regions with a spatially varying kernel, and mask growth.

A region is cut into square tiles of ``tile - 2r`` output pixels; each tile is read with a halo
of r pixels (real neighbouring pixels, zeros beyond the image edge), so the output is the
exact linear convolution. Tiles are transformed in batches (one real FFT per tile).

* :func:`convolve_polynomial` applies the fitted kernel exactly at every output pixel:
  ``out(x) = sum_j P_j(x) (I * K_j)(x)``, one inverse FFT per spatial term.
* :func:`convolve_tilewise` applies one kernel per tile, evaluated at the tile centre (used
  for the noise image with the squared kernel, where the kernel's change across a tile of a
  few hundred pixels is negligible; HOTPANTS steps its kernel every 2r+1 pixels).

All functions take ``xp`` (NumPy or CuPy) and an FFT object from :mod:`gppy_subtract.backend`.
"""

from __future__ import annotations

import numpy as np

from .kernel import clamp_uv, normalised_coords


def next_fast_len(n: int) -> int:
    """Smallest integer >= n whose only prime factors are 2, 3 and 5."""
    n = int(n)
    best = 1 << max(int(n - 1).bit_length(), 0)
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            q = p35
            while q < n:
                q *= 2
            best = min(best, q)
            p35 *= 3
        p5 *= 5
    return max(best, 1)


def _region_with_halo(image, bounds, r: int, out_h: int, out_w: int, xp):
    """Copy of image[y0-r:y0+out_h+r, x0-r:x0+out_w+r] with zeros outside the image."""
    y0, _, x0, _ = bounds
    H, W = image.shape
    pad = xp.zeros((out_h + 2 * r, out_w + 2 * r), dtype=xp.float32)
    sy0, sy1 = max(y0 - r, 0), min(y0 + out_h + r, H)
    sx0, sx1 = max(x0 - r, 0), min(x0 + out_w + r, W)
    if sy1 > sy0 and sx1 > sx0:
        pad[sy0 - (y0 - r):sy1 - (y0 - r), sx0 - (x0 - r):sx1 - (x0 - r)] = image[sy0:sy1, sx0:sx1]
    return pad


def _tile_plan(bounds, r: int, tile: int):
    y0, y1, x0, x1 = bounds
    size = next_fast_len(max(tile, 4 * r + 8))
    step = size - 2 * r
    nty = -(-(y1 - y0) // step)
    ntx = -(-(x1 - x0) // step)
    origins = [(ty * step, tx * step) for ty in range(nty) for tx in range(ntx)]
    return size, step, nty, ntx, origins


def _embed(kernels, size: int, xp):
    m, k, _ = kernels.shape
    r = (k - 1) // 2
    out = xp.zeros((m, size, size), dtype=xp.float32)
    out[:, :k, :k] = kernels
    return xp.roll(out, shift=(-r, -r), axis=(1, 2))


def convolve_polynomial(image, bounds: tuple[int, int, int, int], term_kernels, terms, xp, fft, *,
                        tile: int = 256, batch: int = 8, poly_bounds=None, uv_box=None):
    """Convolve a region of ``image`` with a kernel that varies as a polynomial.

    Parameters
    ----------
    image : array (H, W) float32
        Full image (masked pixels already set to a neutral value, e.g. 0).
    bounds : (y0, y1, x0, x1)
        Region to produce (half-open).
    term_kernels : array (n_terms, k, k)
        Kernel images multiplying each monomial (:meth:`KernelSolution.term_kernels`).
    terms : list of (int, int)
        Monomial exponents ``(a, b)`` of ``u**a v**b``.
    tile : int
        FFT tile size (rounded up to a 2-3-5 smooth length).
    batch : int
        Tiles per FFT batch (memory: ~ 4 x batch x tile^2 x 4 bytes).
    poly_bounds : tuple, optional
        Region the polynomial is normalised to (default ``bounds``).
    uv_box : (u_min, u_max, v_min, v_max), optional
        Normalised coordinates are clipped to this box (:attr:`KernelSolution.uv_box`).

    Returns
    -------
    array (y1-y0, x1-x0) float32
        ``sum_j P_j(x, y) * (image (*) K_j)(x, y)``.
    """
    y0, y1, x0, x1 = bounds
    h, w = y1 - y0, x1 - x0
    k = term_kernels.shape[-1]
    r = (k - 1) // 2
    size, step, nty, ntx, origins = _tile_plan(bounds, r, tile)
    pad = _region_with_halo(image, bounds, r, nty * step, ntx * step, xp)
    fk = fft.rfft2(_embed(xp.asarray(term_kernels, dtype=xp.float32), size, xp))   # (nt, L, L/2+1)
    pb = poly_bounds or bounds
    out = xp.zeros((nty * step, ntx * step), dtype=xp.float32)
    a_pows = sorted({a for a, _ in terms})
    for i in range(0, len(origins), batch):
        chunk = origins[i:i + batch]
        tiles = xp.stack([pad[oy:oy + size, ox:ox + size] for oy, ox in chunk])
        ft = fft.rfft2(tiles)
        del tiles
        oy = np.array([c[0] for c in chunk], dtype=float)
        ox = np.array([c[1] for c in chunk], dtype=float)
        xs = x0 + ox[:, None] + np.arange(step)[None, :]
        ys = y0 + oy[:, None] + np.arange(step)[None, :]
        u, v = clamp_uv(*normalised_coords(xs, ys, pb), uv_box)
        u = xp.asarray(u, dtype=xp.float32)
        v = xp.asarray(v, dtype=xp.float32)
        # Horner-like: sum_a u^a (sum_b v^b (I * K_ab)), one inverse FFT per term, in place
        acc_tiles = None
        for a in a_pows:
            acc = None
            for j, (aj, bj) in enumerate(terms):
                if aj != a:
                    continue
                part = fft.irfft2(ft * fk[j], s=(size, size))[:, r:r + step, r:r + step]
                if bj:
                    part = part * (v ** bj)[:, :, None]
                if acc is None:
                    acc = part
                else:
                    acc += part
            if a:
                acc = acc * (u ** a)[:, None, :]
            if acc_tiles is None:
                acc_tiles = acc
            else:
                acc_tiles += acc
        for n, (oy_, ox_) in enumerate(chunk):
            out[oy_:oy_ + step, ox_:ox_ + step] = acc_tiles[n]
    return out[:h, :w]


def convolve_tilewise(image, bounds: tuple[int, int, int, int], kernel, xp, fft, *, scale_at=None,
                      tile: int = 256, batch: int = 8):
    """Convolve a region with one kernel, scaled by a factor per tile.

    Used for the noise image: the variance is convolved with the squared kernel of the region
    centre, normalised to unit sum, times ``sum K(x)^2`` at each tile centre, so the noise
    power follows the kernel's spatial variation while the kernel is transformed only once.

    Parameters
    ----------
    image : array (H, W) float32
    bounds : (y0, y1, x0, x1)
    kernel : array (k, k)
        The kernel (k = 2r+1).
    scale_at : callable (xc, yc) -> float, optional
        Factor for the tile centred at full-image pixel (xc, yc); default 1.

    Returns
    -------
    array (y1-y0, x1-x0) float32
    """
    y0, y1, x0, x1 = bounds
    h, w = y1 - y0, x1 - x0
    k = kernel.shape[-1]
    r = (k - 1) // 2
    size, step, nty, ntx, origins = _tile_plan(bounds, r, tile)
    pad = _region_with_halo(image, bounds, r, nty * step, ntx * step, xp)
    fk = fft.rfft2(_embed(xp.asarray(kernel, dtype=xp.float32)[None], size, xp))
    out = xp.zeros((nty * step, ntx * step), dtype=xp.float32)
    for i in range(0, len(origins), batch):
        chunk = origins[i:i + batch]
        tiles = xp.stack([pad[oy:oy + size, ox:ox + size] for oy, ox in chunk])
        conv = fft.irfft2(fft.rfft2(tiles) * fk, s=(size, size))[:, r:r + step, r:r + step]
        for n, (oy_, ox_) in enumerate(chunk):
            f = 1.0 if scale_at is None else float(scale_at(x0 + ox_ + 0.5 * (step - 1), y0 + oy_ + 0.5 * (step - 1)))
            out[oy_:oy_ + step, ox_:ox_ + step] = conv[n] * xp.float32(f) if f != 1.0 else conv[n]
    return out[:h, :w]


def polynomial_image(coeffs, terms, bounds: tuple[int, int, int, int], xp, poly_bounds=None):
    """``sum_k c_k u**a_k v**b_k`` over a region, as float32 (H_region, W_region)."""
    y0, y1, x0, x1 = bounds
    u, v = normalised_coords(np.arange(x0, x1, dtype=float), np.arange(y0, y1, dtype=float),
                             poly_bounds or bounds)
    out = xp.zeros((y1 - y0, x1 - x0), dtype=xp.float32)
    for c, (a, b) in zip(coeffs, terms, strict=True):
        if c == 0:
            continue
        col = xp.asarray(float(c) * v ** b, dtype=xp.float32)
        row = xp.asarray(u ** a, dtype=xp.float32)
        out += col[:, None] * row[None, :]
    return out


def _dilate_axis(m, r: int, axis: int, xp):
    """OR over a centred window of 2r+1 along one axis (zeros beyond the edges), by doubling
    shifts: log2(2r+1) + popcount(2r+1) boolean passes instead of a running sum."""
    n = m.shape[axis]
    width = 2 * r + 1
    pad_shape = list(m.shape)
    pad_shape[axis] = n + 2 * r
    p = xp.zeros(pad_shape, dtype=bool)
    inner = [slice(None)] * m.ndim
    inner[axis] = slice(r, r + n)
    p[tuple(inner)] = m
    total = n + 2 * r

    def take(a, start, length):
        sl = [slice(None)] * m.ndim
        sl[axis] = slice(start, start + length)
        return a[tuple(sl)]

    # spans[j] (length total - 2**j + 1): OR of p[i : i + 2**j]
    spans = [p]
    while 2 ** len(spans) <= width:
        a = spans[-1]
        half = 2 ** (len(spans) - 1)
        length = a.shape[axis] - half
        spans.append(take(a, 0, length) | take(a, half, length))
    acc = None
    offset = 0
    for j in range(len(spans) - 1, -1, -1):       # binary decomposition of the width
        if width - offset >= 2 ** j:
            part = take(spans[j], offset, n)
            acc = part if acc is None else acc | part
            offset += 2 ** j
    assert offset == width and total >= width
    return acc


def dilate(mask, half_width: int, xp):
    """Grow a boolean mask by a (2r+1) x (2r+1) square (separable; log2(2r+1) shifted ORs per axis)."""
    r = int(half_width)
    m = mask.astype(bool)
    if r <= 0:
        return m.copy()
    for axis in (0, 1):
        m = _dilate_axis(m, r, axis, xp)
    return m
