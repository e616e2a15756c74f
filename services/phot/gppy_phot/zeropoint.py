"""Zero points against the Gaia-XP-like reference (v1-behaviour.md §7.2 items 6-9).

* Reference positions are propagated from J2016.0 to the observation epoch with their proper
  motions (:func:`gppy.refcat.propagate_to_epoch`); rows without proper motion keep their
  catalogue position and are still matched (fix of B13: v1 lost them, or the whole image when
  the first row had none).
* Matching: nearest neighbour within 1 arcsec.
* ZP stars (v1 item 7): FLAGS == 0, inside the 0.99 ellipse, S/N(AUTO) > 20, reference
  magnitude > 12 (``MAGLOW``; v1 has no faint limit), plus (new) no masked pixel
  (IMAFLAGS_ISO == 0) and a finite instrumental magnitude.
* Per aperture (v1 item 8): ``zp_i = mag_ref - MAG_inst``, sigma-clipped at 2 sigma about the
  median, iterated to convergence (astropy ``sigma_clip``, ``maxiters=None``); ZP = median of
  the survivors.
* Error (changed from v1, whose EZP was the unscaled MAD of the survivors, i.e. a per-star
  scatter): the scatter of a star's zp is estimated robustly as 1.4826 x MAD of the selected
  stars, and ``EZP = 1.2533 x scatter / sqrt(N_kept)``, the standard error of a median. The
  scatter itself is kept as ``ZPSCAT``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from astropy.stats import sigma_clip

from gppy_phot.seeing import inside_ellipse

#: v1's ``refmaglower`` and ``refmagupper`` (MAGLOW, MAGUP header keys).
MAG_LOW = 12.0
MAG_UP = 20.0
#: S/N(AUTO) threshold of ZP stars.
ZP_SNR_MIN = 20.0
#: Clipping (v1: 2 sigma about the median, to convergence).
CLIP_SIGMA = 2.0
#: Error of a median in units of sigma / sqrt(N) for Gaussian data.
MEDIAN_EFFICIENCY = 1.2533
#: AB magnitude of 1 microjansky.
UJY_AB = 23.9


@dataclass(frozen=True)
class ZeroPoint:
    """One aperture's zero point: ``ZP`` (mag), ``EZP`` its error, ``scatter`` per star."""

    zp: float
    ezp: float
    scatter: float
    ninput: int
    nused: int
    kept: np.ndarray  # bool over the input stars


def select_zp_stars(flags: np.ndarray, imaflags: np.ndarray | None, x: np.ndarray, y: np.ndarray,
                    nx: int, ny: int, snr_auto: np.ndarray, ref_mag: np.ndarray,
                    snr_min: float = ZP_SNR_MIN, mag_low: float = MAG_LOW) -> np.ndarray:
    """Boolean selection of ZP stars (v1 §7.2 item 7 plus the masked-pixel cut).

    ``ref_mag`` is NaN for unmatched sources.
    """
    ok = (np.asarray(flags) == 0) & inside_ellipse(x, y, nx, ny)
    if imaflags is not None:
        ok &= np.asarray(imaflags) == 0
    with np.errstate(invalid="ignore"):
        ok &= (snr_auto > snr_min) & np.isfinite(ref_mag) & (ref_mag > mag_low)
    return ok


def clipped_zero_point(zp_values: np.ndarray, sigma: float = CLIP_SIGMA) -> ZeroPoint:
    """Zero point from per-star values ``mag_ref - MAG_inst`` (mag).

    Non-finite values are ignored. Raises ``ValueError`` when no finite value is left.
    """
    zp_values = np.asarray(zp_values, float)
    finite = np.isfinite(zp_values)
    if finite.sum() == 0:
        raise ValueError("no star for the zero point")
    vals = zp_values[finite]
    clipped = sigma_clip(vals, sigma=sigma, maxiters=None, cenfunc="median", stdfunc="std")
    keep_f = ~np.ma.getmaskarray(clipped)
    survivors = vals[keep_f]
    zp = float(np.median(survivors))
    mad = float(np.median(np.abs(vals - np.median(vals))))
    scatter = 1.4826 * mad
    n = int(keep_f.sum())
    ezp = MEDIAN_EFFICIENCY * scatter / np.sqrt(n) if n > 1 else float("nan")
    kept = np.zeros(len(zp_values), bool)
    kept[np.flatnonzero(finite)[keep_f]] = True
    return ZeroPoint(zp=zp, ezp=float(ezp), scatter=scatter, ninput=int(finite.sum()), nused=n, kept=kept)


def moffat_ee(radius: np.ndarray | float, alpha: float, beta: float) -> np.ndarray:
    """Encircled energy of a circular Moffat profile within ``radius`` (same unit as alpha)."""
    return 1.0 - (1.0 + (np.asarray(radius, float) / alpha) ** 2) ** (1.0 - beta)


@dataclass(frozen=True)
class TotalZeroPoint:
    """Zero point of the total flux (mag of a source giving 1 image unit in total)."""

    zp: float
    ezp: float
    alpha: float
    beta: float
    correction: float  # mag added to the largest aperture's ZP


def total_zero_point(radii_px: np.ndarray, zps: np.ndarray, ezps: np.ndarray, fwhm_px: float,
                     floor: float = 0.004) -> TotalZeroPoint:
    """Total-flux zero point from the aperture zero points (a curve of growth).

    The aperture zero points are ``ZP_k = ZP_tot + 2.5 log10 EE(R_k)``, with EE the encircled
    energy of the stars. A circular Moffat EE (alpha, beta free) is fitted to them together
    with ZP_tot, by least squares with errors ``sqrt(EZP_k^2 + floor^2)``; the result is the
    largest aperture's ZP minus 2.5 log10 EE_fit(R_max). Its error combines that aperture's
    EZP with the spread of the correction over the fit's covariance.

    Parameters
    ----------
    radii_px : array
        Aperture radii (px).
    zps, ezps : array
        Zero points of the apertures and their errors (mag).
    fwhm_px : float
        Seeing FWHM (px), for the starting point.
    floor : float
        Error floor per aperture (mag): the PSF is not exactly a circular Moffat.
    """
    from scipy.optimize import least_squares

    r = np.asarray(radii_px, float)
    z = np.asarray(zps, float)
    e = np.sqrt(np.asarray(ezps, float) ** 2 + floor**2)
    ok = np.isfinite(r) & np.isfinite(z) & np.isfinite(e) & (r > 0)
    r, z, e = r[ok], z[ok], e[ok]
    if len(r) < 3:
        raise ValueError("need at least 3 apertures for a curve of growth")
    beta0 = 3.0
    alpha0 = fwhm_px / (2.0 * np.sqrt(2.0 ** (1.0 / beta0) - 1.0))
    imax = int(np.argmax(r))

    def resid(p):
        zp0, la, lb = p
        return (z - (zp0 + 2.5 * np.log10(moffat_ee(r, np.exp(la), 1.0 + np.exp(lb))))) / e

    fit = least_squares(resid, [z[imax], np.log(alpha0), np.log(beta0 - 1.0)],
                        bounds=([-np.inf, np.log(0.3), np.log(0.3)], [np.inf, np.log(50.0), np.log(20.0)]))
    zp0, la, lb = fit.x
    alpha, beta = float(np.exp(la)), float(1.0 + np.exp(lb))
    corr = -2.5 * np.log10(moffat_ee(r[imax], alpha, beta))
    # error of the correction from the covariance of (log alpha, log(beta-1))
    try:
        jac = fit.jac
        cov = np.linalg.pinv(jac.T @ jac)
        chi2 = float((fit.fun**2).sum()) / max(1, len(r) - 3)
        cov *= max(1.0, chi2)
        eps = 1e-4
        g = np.zeros(3)
        for i in (1, 2):
            p = np.array(fit.x, float)
            p[i] += eps
            c2 = -2.5 * np.log10(moffat_ee(r[imax], np.exp(p[1]), 1.0 + np.exp(p[2])))
            g[i] = (c2 - corr) / eps
        ecorr = float(np.sqrt(max(0.0, g @ cov @ g)))
    except np.linalg.LinAlgError:
        ecorr = float("nan")
    ezp = float(np.hypot(np.asarray(ezps, float)[ok][imax], ecorr))
    return TotalZeroPoint(zp=float(z[imax] + corr), ezp=ezp, alpha=alpha, beta=beta, correction=float(corr))


def ujy_per_adu(zp: float) -> float:
    """Flux of one image unit in microjansky for a zero point ``zp`` (AB)."""
    return 10 ** (-0.4 * (zp - UJY_AB))


def calibrate(flux: np.ndarray, fluxerr: np.ndarray, zp: float, ezp: float) -> dict[str, np.ndarray]:
    """Calibrated MAG, MAGERR, FLUX (microjansky), FLUXERR and SNR of one aperture (v1 item 9).

    Parameters
    ----------
    flux, fluxerr : array
        Instrumental flux and error (image units).
    zp, ezp : float
        Zero point and its error (mag).

    Returns
    -------
    dict
        ``MAG`` = -2.5 log10(flux) + ZP (NaN for flux <= 0); ``MAGERR`` =
        sqrt((1.0857 fluxerr/flux)^2 + EZP^2); ``FLUX`` in microjansky (linear, so negative
        fluxes stay meaningful); ``FLUXERR`` with the ZP error included; ``SNR`` = FLUX/FLUXERR.
    """
    flux = np.asarray(flux, float)
    fluxerr = np.asarray(fluxerr, float)
    scale = ujy_per_adu(zp)
    ezp = 0.0 if not np.isfinite(ezp) else ezp
    k = 2.5 / np.log(10)
    with np.errstate(divide="ignore", invalid="ignore"):
        pos = flux > 0
        mag = np.where(pos, -2.5 * np.log10(np.where(pos, flux, 1.0)) + zp, np.nan)
        magerr = np.where(pos, np.sqrt((k * fluxerr / np.where(pos, flux, 1.0)) ** 2 + ezp**2), np.nan)
        f_ujy = flux * scale
        ferr_ujy = np.sqrt((fluxerr * scale) ** 2 + (np.abs(f_ujy) * ezp / k) ** 2)
        snr = np.where(ferr_ujy > 0, f_ujy / ferr_ujy, np.nan)
    return {"MAG": mag, "MAGERR": magerr, "FLUX": f_ujy, "FLUXERR": ferr_ujy, "SNR": snr}
