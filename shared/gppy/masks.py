"""The per-pixel bit mask carried by every image product (``<stem>.mask.fits``).

On disk a mask is int16 (BITPIX 16 without BZERO, written by :func:`gppy.fitsio.write_mask`)
so that Source Extractor reads its bits unchanged as a FLAG_IMAGE; in memory any integer type
holds it.

Bits are OR-ed; a pixel with any bit set has zero weight. Source Extractor reads the mask as
a FLAG_IMAGE (``IMAFLAGS_ISO``), SWarp through the weight map, which is zero where the mask is
non-zero.
"""

from __future__ import annotations

from enum import IntFlag


class MaskBit(IntFlag):
    """Documented mask bits (uint16)."""

    BAD = 1          # bad pixel from the masters (hot, dead, bad column, non-finite master)
    SATURATED = 2    # raw value at or above the saturation level
    COSMIC_RAY = 4   # astroscrappy detection
    TRAIL = 8        # satellite / aircraft trail (Hough line detector)
    NONFINITE = 16   # NaN or inf in the reduced frame
    EDGE = 32        # outside the detector or the resampled footprint
    REFERENCE = 64   # masked in the reference (difference images)
    GROWN = 128      # neighbour of a masked pixel, grown by the convolution kernel


MASK_DTYPE = "int16"


def describe() -> dict[str, int]:
    """Bit name -> value, as written into product headers (``MASKB_*`` keywords)."""
    return {bit.name: int(bit) for bit in MaskBit}
