"""The stack's mask: input mask bits carried onto the output grid.

SWarp sees the inputs' masks only through their zero weights, so its output says *where* a
pixel has no valid data but not *why*. The stack's ``<stem>.mask.fits`` (uint16,
:class:`gppy.masks.MaskBit`) is built here:

* every non-zero pixel of each input mask is mapped through the input's WCS onto the output
  grid (nearest output pixel) and its bits are OR-ed there, then spread over the resampling
  kernel's half-width (the area SWarp drops around a masked input pixel);
* on pixels with valid data (stack weight > 0) only ``SATURATED`` is kept: the pixel is fine,
  but a saturated star's core there rests on fewer frames;
* on pixels without valid data (weight 0) all carried bits are kept, and ``EDGE`` marks those
  that no input covered with a masked pixel, i.e. outside every input's footprint.

Masks are sparse, so the mapping works on the masked pixels only (no full-frame coordinate
transform), which keeps it to a fraction of a second per full-size frame.
"""

from __future__ import annotations

import numpy as np
from astropy.wcs import WCS

from gppy.masks import MaskBit


def project_mask_bits(mask: np.ndarray, in_wcs: WCS, out_wcs: WCS, out_bits: np.ndarray,
                      chunk: int = 2_000_000) -> int:
    """OR the bits of ``mask`` into ``out_bits`` at the nearest output pixel (in place).

    Parameters
    ----------
    mask : ndarray of uint16, shape (ny_in, nx_in)
        Input mask (0 = good).
    in_wcs : astropy.wcs.WCS
        The input image's WCS (TAN, TPV or SIP).
    out_wcs : astropy.wcs.WCS
        The output grid's WCS.
    out_bits : ndarray of uint16, shape (ny_out, nx_out)
        Accumulator on the output grid, updated in place.
    chunk : int
        Pixels transformed per call (bounds the memory used).

    Returns
    -------
    int
        Number of masked input pixels that fell on the output grid.
    """
    ys, xs = np.nonzero(mask)
    ny, nx = out_bits.shape
    landed = 0
    for start in range(0, ys.size, chunk):
        y = ys[start:start + chunk]
        x = xs[start:start + chunk]
        bits = mask[y, x].astype(np.uint16)
        ra, dec = in_wcs.all_pix2world(x.astype(np.float64), y.astype(np.float64), 0)
        ox, oy = out_wcs.wcs_world2pix(ra, dec, 0)
        good = np.isfinite(ox) & np.isfinite(oy)
        ix = np.rint(ox[good]).astype(np.int64)
        iy = np.rint(oy[good]).astype(np.int64)
        b = bits[good]
        inside = (ix >= 0) & (ix < nx) & (iy >= 0) & (iy < ny)
        np.bitwise_or.at(out_bits, (iy[inside], ix[inside]), b[inside])
        landed += int(inside.sum())
    return landed


def dilate_bits(bits: np.ndarray, radius: int) -> np.ndarray:
    """OR of each pixel's ``(2 radius + 1)^2`` neighbourhood (a square dilation of every bit)."""
    out = bits.copy()
    if radius <= 0:
        return out
    for axis in (1, 0):
        src = out.copy()
        n = src.shape[axis]
        for s in range(1, radius + 1):
            if s >= n:
                break
            lo = [slice(None), slice(None)]
            hi = [slice(None), slice(None)]
            lo[axis], hi[axis] = slice(0, n - s), slice(s, n)
            out[tuple(lo)] |= src[tuple(hi)]
            out[tuple(hi)] |= src[tuple(lo)]
    return out


def stack_mask(weight: np.ndarray, carried: np.ndarray, radius: int) -> np.ndarray:
    """The stack's uint16 mask from its weight map and the carried input bits.

    Parameters
    ----------
    weight : ndarray of float, shape (ny, nx)
        Stack weight map (inverse variance; 0 = no valid data).
    carried : ndarray of uint16, shape (ny, nx)
        Input bits projected with :func:`project_mask_bits` (not yet dilated).
    radius : int
        Resampling-kernel half-width (px).

    Returns
    -------
    ndarray of uint16
    """
    grown = dilate_bits(carried, radius)
    valid = weight > 0
    out = np.where(valid, grown & np.uint16(MaskBit.SATURATED), grown).astype(np.uint16)
    out[~valid & (out == 0)] = np.uint16(MaskBit.EDGE)
    return out
