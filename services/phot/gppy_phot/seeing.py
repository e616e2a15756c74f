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


def moffat_fwhm(alpha: float, beta: float) -> float:
    """FWHM of a Moffat profile (same unit as ``alpha``)."""
    return float(2.0 * alpha * np.sqrt(2.0 ** (1.0 / beta) - 1.0))


def fit_moffat_profile(r: np.ndarray, v: np.ndarray, err: np.ndarray, r_ap: float,
                       fwhm_guess: float) -> tuple[float, float]:
    """Fit a circular Moffat to a normalised radial profile.

    ``v`` is the surface brightness at radius ``r`` divided by the flux within ``r_ap``; the
    model is the unit-integral Moffat divided by its encircled energy at ``r_ap``. Returns
    (alpha, beta).
    """
    from scipy.optimize import least_squares

    def model(p: np.ndarray) -> np.ndarray:
        alpha, beta = np.exp(p[0]), 1.0 + np.exp(p[1])
        ee = 1.0 - (1.0 + r_ap**2 / alpha**2) ** (1.0 - beta)
        return (beta - 1.0) / (np.pi * alpha**2) * (1.0 + r**2 / alpha**2) ** (-beta) / ee

    beta0 = 3.0
    alpha0 = fwhm_guess / (2 * np.sqrt(2 ** (1 / beta0) - 1))
    fit = least_squares(lambda p: (model(p) - v) / err, [np.log(alpha0), np.log(beta0 - 1)],
                        bounds=([np.log(0.2), np.log(0.2)], [np.log(50), np.log(20)]))
    return float(np.exp(fit.x[0])), float(1 + np.exp(fit.x[1]))


def measure_psf(data: np.ndarray, bad: np.ndarray | None, x: np.ndarray, y: np.ndarray, pixscale: float,
                saturation: float, fwhm_guess_px: float = 5.0, max_stars: int = 300) -> Seeing:
    """Seeing, ellipticity and elongation from stamps of known stars (no extraction run).

    For each star (0-based positions ``x``, ``y``, e.g. reference stars of v1's seeing window
    11.75 < mag < 18 projected with the WCS): a stamp, its background (median of the stamp
    border), a Gaussian-weighted centroid, the flux within 3 FWHM, and Gaussian-weighted second
    moments (ellipticity 1 - b/a, elongation a/b). Stars with a masked pixel, a neighbour
    brighter than a quarter of their peak, or a peak above 80 % of the saturation are left
    out. The profiles of all stars (pixel value / flux against the distance to the centroid) are
    binned and fitted with one circular Moffat profile; SEEING is its FWHM. Done twice, the
    second time with the first FWHM as the guess.

    Returns
    -------
    Seeing
        ``method = "psf-fit"``; ``nstars`` the stars used. Raises ``ValueError`` with fewer
        than 5 usable stars.
    """
    from gppy_phot.pixels import stamps

    x = np.asarray(x, float)
    y = np.asarray(y, float)
    fwhm = float(fwhm_guess_px)
    result = None
    for _ in range(2):
        half = int(np.ceil(3.5 * fwhm)) + 2
        v, dx, dy = stamps(data, x, y, half)
        n = len(x)
        r = np.hypot(dx, dy)
        border = r >= half - 2
        bkg = np.nanmedian(np.where(border, v, np.nan).reshape(n, -1), axis=1)
        sub = v - bkg[:, None, None]
        ok = np.isfinite(bkg)
        if bad is not None:
            b, _, _ = stamps(bad, x, y, half, fill=1.0)
            ok &= ~((b > 0) & (r <= 3 * fwhm)).reshape(n, -1).any(axis=1)
        ok &= ~np.isnan(v).reshape(n, -1).any(axis=1)
        core = r <= 1.0
        peak = np.nanmax(np.where(core, sub, -np.inf).reshape(n, -1), axis=1)
        ok &= (peak + bkg < 0.8 * saturation) & (peak > 0)
        # no neighbour: nothing brighter than a quarter of the peak outside 1.5 FWHM
        outer = (r > 1.5 * fwhm) & (r < half - 2)
        ok &= np.nanmax(np.where(outer, sub, -np.inf).reshape(n, -1), axis=1) < 0.25 * peak
        if ok.sum() < MIN_SEEING_STARS:
            raise ValueError(f"only {int(ok.sum())} isolated unsaturated stars for the PSF")
        idx = np.flatnonzero(ok)
        idx = idx[np.argsort(-peak[idx])][:max_stars]
        sub, dx, dy = sub[idx], np.array(dx[idx]), np.array(dy[idx])
        # Gaussian-weighted centroid (3 iterations)
        sw = fwhm / 2.3548
        cx = np.zeros(len(idx))
        cy = np.zeros(len(idx))
        for _ in range(3):
            w = np.exp(-0.5 * ((dx - cx[:, None, None]) ** 2 + (dy - cy[:, None, None]) ** 2) / sw**2) * sub
            tot = w.reshape(len(idx), -1).sum(axis=1)
            cx = (w * dx).reshape(len(idx), -1).sum(axis=1) / tot
            cy = (w * dy).reshape(len(idx), -1).sum(axis=1) / tot
        ddx, ddy = dx - cx[:, None, None], dy - cy[:, None, None]
        rr = np.hypot(ddx, ddy)
        # second moments with a Gaussian weight twice as broad as the PSF
        w2 = np.exp(-0.5 * rr**2 / (2 * sw) ** 2) * sub
        t2 = w2.reshape(len(idx), -1).sum(axis=1)
        qxx = (w2 * ddx**2).reshape(len(idx), -1).sum(axis=1) / t2
        qyy = (w2 * ddy**2).reshape(len(idx), -1).sum(axis=1) / t2
        qxy = (w2 * ddx * ddy).reshape(len(idx), -1).sum(axis=1) / t2
        tr, det = qxx + qyy, qxx * qyy - qxy**2
        disc = np.sqrt(np.clip((tr / 2) ** 2 - det, 0, None))
        a2, b2 = tr / 2 + disc, np.clip(tr / 2 - disc, 1e-6, None)
        # a stamp whose weighted sum or moments come out non-positive (a noisy faint star on a
        # background step) has no axis ratio: it is left out of the ellipticity
        with np.errstate(invalid="ignore", divide="ignore"):
            q = np.where((t2 > 0) & (a2 > 0), np.sqrt(b2 / np.where(a2 > 0, a2, 1.0)), np.nan)
        if np.isfinite(q).sum() < MIN_SEEING_STARS:
            raise ValueError(f"only {int(np.isfinite(q).sum())} stars with measurable second moments")
        # flux within 3 FWHM and the stacked profile
        rap = 3.0 * fwhm
        flux = np.where(rr <= rap, sub, 0.0).reshape(len(idx), -1).sum(axis=1)
        good = flux > 0
        prof_r = rr[good][rr[good] <= rap]
        prof_v = (sub[good] / flux[good][:, None, None])[rr[good] <= rap]
        edges = np.arange(0.0, rap + 0.5, 0.5)
        which = np.digitize(prof_r, edges) - 1
        rb, vb, eb = [], [], []
        for k in range(len(edges) - 1):
            sel = which == k
            if sel.sum() < 5:
                continue
            vals = prof_v[sel]
            med = np.median(vals)
            rb.append(np.median(prof_r[sel]))
            vb.append(med)
            eb.append(max(1.2533 * 1.4826 * np.median(np.abs(vals - med)) / np.sqrt(sel.sum()), 1e-5))
        rb, vb, eb = np.array(rb), np.array(vb), np.array(eb)

        alpha, beta = fit_moffat_profile(rb, vb, eb, rap, fwhm)
        fwhm = moffat_fwhm(alpha, beta)
        result = Seeing(seeing_arcsec=fwhm * pixscale, peeing_px=fwhm, ellip=float(np.nanmedian(1 - q)),
                        elong=float(np.nanmedian(1 / q)), nstars=len(idx), method="psf-fit")
    assert result is not None
    return result
