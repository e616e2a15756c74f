"""Candidate cutouts (v1-behaviour.md §10 item 4): science, reference and difference, north up
and east left, as FITS and PNG.

Each cutout is resampled (bilinear) onto a small TAN grid centred on the candidate, with the
image's pixel scale, north up and east left, whatever the orientation of the image; pixels
outside the image are filled with the image's median (v1: Cutout2D, partial mode, padded with
the median). The PNG is 720 x 720 px, zscale, linear, with a yellow box of 10 image pixels at
the centre (v1's look).
"""

from __future__ import annotations

import io

import numpy as np
from astropy.io import fits
from astropy.visualization import ZScaleInterval
from astropy.wcs import WCS
from scipy.ndimage import map_coordinates

#: Cutout side (arcsec) and the PNG size (px).
SIZE_ARCSEC = 60.0
PNG_PX = 720


def north_up_wcs(ra: float, dec: float, npix: int, pixscale_arcsec: float) -> WCS:
    """A TAN WCS of ``npix`` x ``npix`` pixels centred on (ra, dec), north up, east left."""
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [ra, dec]
    w.wcs.crpix = [(npix + 1) / 2.0, (npix + 1) / 2.0]
    s = pixscale_arcsec / 3600.0
    w.wcs.cd = np.array([[-s, 0.0], [0.0, s]])
    w.wcs.radesys = "ICRS"
    return w


def cutout(image: np.ndarray, wcs: WCS, ra: float, dec: float, pixscale_arcsec: float,
           size_arcsec: float = SIZE_ARCSEC, fill: float | None = None) -> tuple[np.ndarray, WCS]:
    """A north-up, east-left cutout of ``image`` (with celestial ``wcs``) around (ra, dec).

    Returns the cutout (float32) and its WCS. ``fill`` defaults to the median of the image's
    finite pixels near the position.
    """
    npix = int(round(size_arcsec / pixscale_arcsec))
    npix += npix % 2 == 1
    out_wcs = north_up_wcs(ra, dec, npix, pixscale_arcsec)
    yy, xx = np.mgrid[0:npix, 0:npix]
    wra, wdec = out_wcs.all_pix2world(xx.ravel(), yy.ravel(), 0)
    sx, sy = wcs.all_world2pix(wra, wdec, 0)
    ny, nx = image.shape
    if fill is None:
        cx, cy = wcs.all_world2pix([[ra, dec]], 0)[0]
        x0, x1 = int(max(0, cx - npix)), int(min(nx, cx + npix))
        y0, y1 = int(max(0, cy - npix)), int(min(ny, cy + npix))
        block = np.asarray(image[y0:y1, x0:x1], float) if (x1 > x0 and y1 > y0) else np.zeros(1)
        fin = block[np.isfinite(block)]
        fill = float(np.median(fin)) if fin.size else 0.0
    inside = (sx >= -0.5) & (sx <= nx - 0.5) & (sy >= -0.5) & (sy <= ny - 0.5)
    vals = np.full(sx.shape, fill, dtype=np.float64)
    if inside.any():
        # bilinear interpolation from a local block (no copy of the whole image)
        bx0, bx1 = int(max(0, np.floor(sx[inside].min()) - 1)), int(min(nx, np.ceil(sx[inside].max()) + 2))
        by0, by1 = int(max(0, np.floor(sy[inside].min()) - 1)), int(min(ny, np.ceil(sy[inside].max()) + 2))
        block = np.asarray(image[by0:by1, bx0:bx1], float)
        block = np.where(np.isfinite(block), block, fill)
        vals[inside] = map_coordinates(block, [sy[inside] - by0, sx[inside] - bx0], order=1, mode="nearest")
    return vals.reshape(npix, npix).astype(np.float32), out_wcs


def cutout_fits_bytes(data: np.ndarray, wcs: WCS, extra: dict | None = None) -> fits.HDUList:
    """An HDU list of the cutout with its WCS and ``extra`` keys."""
    h = wcs.to_header()
    for k, v in (extra or {}).items():
        h[k] = v
    return fits.HDUList([fits.PrimaryHDU(data=data, header=h)])


def png_bytes(data: np.ndarray, box_px: float = 10.0, size: int = PNG_PX) -> bytes:
    """720 x 720 PNG: zscale, linear, grey, north up (row 0 at the top is north), a yellow box
    of ``box_px`` image pixels at the centre."""
    from matplotlib.image import imsave

    d = np.asarray(data, float)
    finite = np.isfinite(d)
    if finite.any():
        lo, hi = ZScaleInterval().get_limits(d[finite])
    else:
        lo, hi = 0.0, 1.0
    if hi <= lo:
        hi = lo + 1.0
    img = np.clip((np.where(finite, d, lo) - lo) / (hi - lo), 0, 1)
    n = img.shape[0]
    factor = max(1, int(round(size / n)))
    big = np.kron(img, np.ones((factor, factor)))
    # pad or crop to exactly size x size
    if big.shape[0] < size:
        pad = size - big.shape[0]
        big = np.pad(big, ((pad // 2, pad - pad // 2), (pad // 2, pad - pad // 2)), mode="edge")
    big = big[:size, :size]
    rgb = np.repeat(big[:, :, None], 3, axis=2)
    half = box_px / 2.0 * (size / n)
    c = size / 2.0
    lo_i, hi_i = int(round(c - half)), int(round(c + half))
    for a, b in ((lo_i, lo_i + 2), (hi_i - 2, hi_i)):
        rgb[a:b, lo_i:hi_i] = [1.0, 1.0, 0.0]
        rgb[lo_i:hi_i, a:b] = [1.0, 1.0, 0.0]
    # image row 0 is the south edge (FITS): flip so that north is at the top of the PNG
    rgb = rgb[::-1]
    buf = io.BytesIO()
    imsave(buf, rgb, format="png")
    return buf.getvalue()
