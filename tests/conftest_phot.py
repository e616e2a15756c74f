"""Helpers of the phot tests: synthetic frames with known truth written as the pipeline does.

A frame is written as the astrometry stage leaves it: float32 image in ADU with a WCS,
EGAIN (e-/ADU) and GAIN = the camera setting (2750), SATURATE; ``<stem>.weight.fits``
(inverse background variance, 0 where masked) and ``<stem>.mask.fits`` (uint16 MaskBit);
the Gaia-XP-like catalogue goes to ``<path_refcat>/gaiaxp_dr3_synphot_<OBJ>.csv``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from astropy.io import fits

from gppy.masks import MaskBit
from gppy.naming import calib_name
from gppy_phot import synthetic as syn


def moffat_ee(radius_px: float, fwhm_px: float, beta: float | None) -> float:
    """Encircled-energy fraction of the synthetic PSF within ``radius_px``."""
    if beta is None:
        sigma = fwhm_px / 2.3548200450309493
        return 1.0 - np.exp(-0.5 * radius_px**2 / sigma**2)
    alpha = fwhm_px / (2.0 * np.sqrt(2.0 ** (1.0 / beta) - 1.0))
    return 1.0 - (1.0 + radius_px**2 / alpha**2) ** (1.0 - beta)


def pixel_ee(radius_px: float, fwhm_px: float, beta: float | None, npos: int = 6) -> float:
    """Encircled energy of the *rendered* (pixel-integrated) PSF in a circular aperture,
    computed as Source Extractor does it (pixels split at the aperture edge), averaged over
    sub-pixel positions."""
    rng = np.random.default_rng(0)
    h = int(np.ceil(radius_px)) + 2
    size = 2 * h + 41
    sub = 16
    fr = []
    for _ in range(npos):
        x0, y0 = size // 2 + rng.uniform(-0.5, 0.5, 2)
        img = syn.render_sources((size, size), np.array([x0]), np.array([y0]), np.array([1.0]), fwhm_px, beta,
                                 half=size // 2 - 1)
        off = (np.arange(sub) + 0.5) / sub - 0.5
        yy, xx = np.mgrid[0:size, 0:size]
        frac = np.zeros((size, size))
        for oy in off:
            for ox in off:
                frac += np.hypot(xx + ox - x0, yy + oy - y0) <= radius_px
        fr.append(float((img * frac / sub**2).sum() / img.sum()))
    return float(np.mean(fr))


def write_frame(folder: Path, fld: syn.SyntheticField, image: np.ndarray, *, unit: str = "7DT01",
                obj: str = "T00001", date_obs: str = "2024-04-23T03:28:04", exptime: float = 60.0,
                mask: np.ndarray | None = None, saturate: float = 60000.0, name: str | None = None,
                extra_header: dict | None = None, zero_weight: bool = True) -> tuple[Path, Path, Path]:
    """Write image, weight and mask; returns their paths. ``zero_weight=False`` keeps the weight
    of masked pixels (to see the mask reach Source Extractor as flags)."""
    folder.mkdir(parents=True, exist_ok=True)
    name = name or calib_name(unit, obj, date_obs, fld.filt, exptime)
    path = folder / name
    h = syn.frame_header(fld, date_obs=date_obs, exptime=exptime, obj=obj, saturate=saturate)
    for k, v in (extra_header or {}).items():
        h[k] = v
    fits.writeto(path, image.astype(np.float32), h, overwrite=True)
    m = np.zeros(fld.shape, np.uint16) if mask is None else mask.astype(np.uint16)
    w = syn.weight_map(fld)
    if zero_weight:
        w[m != 0] = 0.0
    wpath = path.with_name(path.name[:-5] + ".weight.fits")
    mpath = path.with_name(path.name[:-5] + ".mask.fits")
    fits.writeto(wpath, w, overwrite=True)
    fits.writeto(mpath, m, overwrite=True)
    return path, wpath, mpath


def write_refcat(refcat_root: Path, fld: syn.SyntheticField, obj: str = "T00001", **kw) -> Path:
    """The field's Gaia-XP-like CSV under ``path_refcat``."""
    refcat_root.mkdir(parents=True, exist_ok=True)
    path = refcat_root / f"gaiaxp_dr3_synphot_{obj}.csv"
    syn.reference_table(fld, **kw).write(path, format="ascii.csv", overwrite=True)
    return path


def bad_box_mask(shape: tuple[int, int], box: tuple[int, int, int, int]) -> np.ndarray:
    """A mask with one rectangle (y0, y1, x0, x1) flagged BAD."""
    m = np.zeros(shape, np.uint16)
    y0, y1, x0, x1 = box
    m[y0:y1, x0:x1] = int(MaskBit.BAD)
    return m
