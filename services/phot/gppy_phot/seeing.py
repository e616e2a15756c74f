"""Seeing, ellipticity and elongation of an image (v1-behaviour.md §7.2 item 3)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: v1's reference-magnitude window for seeing stars.
SEEING_MAG_RANGE = (11.75, 18.0)
#: Fewest stars for a seeing measurement from matched stars before falling back.
MIN_SEEING_STARS = 5


@dataclass(frozen=True)
class Seeing:
    """Seeing figures written as ``SEEING`` (arcsec), ``PEEING`` (px), ``ELLIP``, ``ELONG``."""

    seeing_arcsec: float
    peeing_px: float
    ellip: float
    elong: float
    nstars: int
    method: str


def inside_ellipse(x: np.ndarray, y: np.ndarray, nx: int, ny: int, frac: float = 0.99) -> np.ndarray:
    """True inside v1's ellipse centred on (NAXIS1/2, NAXIS2/2) with semi-axes ``frac`` x half size.

    ``x``, ``y`` are Source Extractor's 1-based pixel coordinates.
    """
    cx, cy = nx / 2.0, ny / 2.0
    ax, ay = frac * nx / 2.0, frac * ny / 2.0
    return ((np.asarray(x) - cx) / ax) ** 2 + ((np.asarray(y) - cy) / ay) ** 2 <= 1.0


def select_seeing_stars(flags: np.ndarray, imaflags: np.ndarray | None, x: np.ndarray, y: np.ndarray,
                        nx: int, ny: int, ref_mag: np.ndarray,
                        mag_range: tuple[float, float] = SEEING_MAG_RANGE) -> np.ndarray:
    """v1's seeing stars: FLAGS == 0, no masked pixel, inside the 0.99 ellipse, and a matched
    reference magnitude (NaN where unmatched) strictly inside ``mag_range``."""
    ok = (np.asarray(flags) == 0) & inside_ellipse(x, y, nx, ny)
    if imaflags is not None:
        ok &= np.asarray(imaflags) == 0
    with np.errstate(invalid="ignore"):
        ok &= (ref_mag > mag_range[0]) & (ref_mag < mag_range[1])
    return ok


def select_fallback_stars(flags: np.ndarray, imaflags: np.ndarray | None, x: np.ndarray, y: np.ndarray,
                          nx: int, ny: int, snr: np.ndarray, fwhm_px: np.ndarray, elongation: np.ndarray,
                          snr_min: float = 30.0, elong_max: float = 1.5) -> np.ndarray:
    """Point sources picked without the reference (when too few stars match it): FLAGS == 0,
    no masked pixel, inside the ellipse, S/N > ``snr_min``, ELONGATION < ``elong_max`` and a
    FWHM within 20 % of the median of those (the stellar locus; galaxies are broader).
    CLASS_STAR is not used: it needs the seeing it is meant to find."""
    ok = (np.asarray(flags) == 0) & inside_ellipse(x, y, nx, ny)
    if imaflags is not None:
        ok &= np.asarray(imaflags) == 0
    fw = np.asarray(fwhm_px, float)
    with np.errstate(invalid="ignore"):
        ok &= (snr > snr_min) & (elongation < elong_max) & (fw > 1.0)
    for _ in range(3):
        if ok.sum() == 0:
            break
        med = np.median(fw[ok])
        ok &= np.abs(fw / med - 1.0) < 0.2
    return ok


def measure_seeing(fwhm_world_deg: np.ndarray, ellipticity: np.ndarray, elongation: np.ndarray,
                   pixscale_arcsec: float, method: str = "matched") -> Seeing:
    """Medians over the selected stars.

    Parameters
    ----------
    fwhm_world_deg : array
        Source Extractor's FWHM_WORLD (deg) of the seeing stars.
    ellipticity, elongation : array
        ELLIPTICITY (1 - B/A) and ELONGATION (A/B).
    pixscale_arcsec : float
        Pixel scale (arcsec/px) for PEEING.

    Returns
    -------
    Seeing
        SEEING = median(FWHM_WORLD) x 3600 (arcsec), PEEING = SEEING / pixscale (px),
        ELLIP and ELONG medians.
    """
    fw = np.asarray(fwhm_world_deg, float) * 3600.0
    good = np.isfinite(fw) & (fw > 0)
    if good.sum() == 0:
        raise ValueError("no star with a valid FWHM for the seeing")
    seeing = float(np.median(fw[good]))
    return Seeing(seeing_arcsec=seeing, peeing_px=seeing / pixscale_arcsec,
                  ellip=float(np.nanmedian(np.asarray(ellipticity, float)[good])),
                  elong=float(np.nanmedian(np.asarray(elongation, float)[good])),
                  nstars=int(good.sum()), method=method)
