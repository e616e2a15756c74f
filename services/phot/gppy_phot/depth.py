"""Limiting magnitudes (v1-behaviour.md §7.2 item 10) and the empirical aperture noise.

v1: ``UL_N = ZP - 2.5 log10(N x SKYSIG x sqrt(pi R^2))`` with R the aperture radius (px) and
N = 3, 5; 0 for AUTO. That assumes independent pixels, which a resampled stack is not: there
the pixel RMS (SKYSIG) is lower than the weight map says, while neighbouring pixels are
correlated, and an aperture sum keeps the noise of the input pixels. The noise in an aperture
is therefore taken from the weight map, ``sigma_w sqrt(pi R^2)`` (:func:`weight_sigma`; for a
single frame sigma_w = SKYSIG), the same noise model as Source Extractor's flux errors, which
are then consistent with the depth. Measured on SWarp (LANCZOS3) stacks of pure noise: the
scatter of aperture sums over sigma_w sqrt(A) is 1.00-1.03 for apertures of 6-20 px, while
over SKYSIG sqrt(A) it is 1.10-1.14.

The noise autocorrelation (:func:`noise_correlation`, :func:`correlation_noise_ratio`) is
measured on stacks as a diagnostic (header ``APNF_k``: aperture noise over the white-noise value
for the pixel RMS). Using it to scale the errors was tried and dropped: the faint static stars
of a rich field leak into any such measurement and made the errors 10-20 % too large.
"""

from __future__ import annotations

import numpy as np


def limiting_magnitude(zp: float, skysig: float, diameter_px: float, nsigma: float,
                       noise_ratio: float = 1.0) -> float:
    """``ZP - 2.5 log10(N x SKYSIG x sqrt(pi R^2) x f)`` rounded to 3 decimals; 0 when the
    diameter is 0 (AUTO) or an input is not usable.

    Parameters
    ----------
    zp : float
        Zero point of the aperture (mag).
    skysig : float
        Background noise per pixel (image units).
    diameter_px : float
        Aperture diameter (px).
    nsigma : float
        3 or 5.
    noise_ratio : float
        Measured / white aperture noise (``f``; 1 reproduces v1).
    """
    if not (diameter_px > 0 and skysig > 0 and np.isfinite(zp)):
        return 0.0
    f = noise_ratio if np.isfinite(noise_ratio) and noise_ratio > 0 else 1.0
    r = diameter_px / 2.0
    return round(float(zp - 2.5 * np.log10(nsigma * skysig * np.sqrt(np.pi * r * r) * f)), 3)


def _disk_overlap_fraction(d: np.ndarray, radius: float) -> np.ndarray:
    """Area shared by two disks of ``radius`` whose centres are ``d`` apart, over the disk area."""
    d = np.minimum(np.abs(d), 2 * radius)
    area = 2 * radius**2 * np.arccos(d / (2 * radius)) - 0.5 * d * np.sqrt(4 * radius**2 - d**2)
    return area / (np.pi * radius**2)


def noise_correlation(data: np.ndarray, bad: np.ndarray | None, max_lag: int = 4, nbox: int = 64,
                      box: int = 64, seed: int = 0, return_sigma: bool = False):
    """Autocorrelation of the background noise at lags up to ``max_lag`` px.

    Measured in ``nbox`` random boxes of ``box`` x ``box`` px, each minus its median, with the
    pixels of sources masked (3x3 mean above 3 robust sigma, grown by ``max_lag``) as well as
    ``bad`` pixels. Static sources hardly enter, so the result describes the noise only (for a
    single frame it is ~0 at every non-zero lag; resampling in a stack correlates neighbours).

    Returns
    -------
    numpy.ndarray or None
        ``rho[dy + max_lag, dx + max_lag]`` (rho = 1 at lag 0), None when the image is too
        small or too masked. With ``return_sigma``, also the RMS of those background pixels.
    """
    from scipy.ndimage import binary_dilation, uniform_filter

    ny, nx = data.shape
    if nx < box + 2 or ny < box + 2:
        return (None, float("nan")) if return_sigma else None
    rng = np.random.default_rng(seed)
    L = max_lag
    num = np.zeros((2 * L + 1, 2 * L + 1))
    cnt = np.zeros((2 * L + 1, 2 * L + 1))
    var_sum, var_n = 0.0, 0
    for _ in range(nbox):
        y0 = int(rng.integers(0, ny - box))
        x0 = int(rng.integers(0, nx - box))
        sub = np.asarray(data[y0:y0 + box, x0:x0 + box], dtype=np.float64)
        badb = ~np.isfinite(sub)
        if bad is not None:
            badb |= np.asarray(bad[y0:y0 + box, x0:x0 + box], bool)
        if badb.mean() > 0.5:
            continue
        x = sub - np.median(sub[~badb])
        x[badb] = 0.0
        sm = uniform_filter(x, 3)
        s3 = 1.4826 * np.median(np.abs(sm[~badb]))
        src = binary_dilation(sm > 3 * s3, iterations=L) | badb
        good = ~src
        if good.sum() < box * box // 4:
            continue
        x = np.where(good, x, 0.0)
        var_sum += float((x[good] ** 2).sum())
        var_n += int(good.sum())
        for dy in range(-L, L + 1):
            for dx in range(-L, L + 1):
                a = x[max(0, dy):box + min(0, dy), max(0, dx):box + min(0, dx)]
                b = x[max(0, -dy):box - max(0, dy), max(0, -dx):box - max(0, dx)]
                ga = good[max(0, dy):box + min(0, dy), max(0, dx):box + min(0, dx)]
                gb = good[max(0, -dy):box - max(0, dy), max(0, -dx):box - max(0, dx)]
                num[dy + L, dx + L] += float((a * b).sum())
                cnt[dy + L, dx + L] += float((ga & gb).sum())
    if var_n < 1000 or var_sum <= 0:
        return (None, float("nan")) if return_sigma else None
    var = var_sum / var_n
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = np.where(cnt > 0, num / cnt / var, 0.0)
    return (rho, float(np.sqrt(var))) if return_sigma else rho


def correlation_noise_ratio(rho: np.ndarray | None, diameter_px: float) -> float:
    """Aperture noise over the white-noise value, from the noise autocorrelation ``rho``.

    ``f^2 = sum over lags of rho(lag) x overlap(lag)``, with overlap the fraction of the
    aperture that coincides with itself shifted by the lag. Never below 1; NaN without ``rho``.
    """
    if rho is None or not diameter_px > 0:
        return float("nan")
    L = rho.shape[0] // 2
    dy, dx = np.mgrid[-L:L + 1, -L:L + 1]
    ov = _disk_overlap_fraction(np.hypot(dx, dy), diameter_px / 2.0)
    return float(np.sqrt(max(1.0, float((rho * ov).sum()))))


def weight_sigma(weight_path, mask: np.ndarray | None = None, n: int = 200000, seed: int = 0) -> float:
    """Median per-pixel sigma implied by an inverse-variance weight map (1/sqrt(w) over a random
    sample of its unmasked, positive pixels)."""
    from astropy.io import fits

    with fits.open(weight_path, memmap=True) as hdul:
        w = hdul[0].data
        ny, nx = w.shape
        rng = np.random.default_rng(seed)
        yy = rng.integers(0, ny, n)
        xx = rng.integers(0, nx, n)
        vals = np.asarray(w[yy, xx], float)
    ok = np.isfinite(vals) & (vals > 0)
    if mask is not None:
        ok &= np.asarray(mask)[yy, xx] == 0
    if ok.sum() == 0:
        return float("nan")
    return float(np.median(1.0 / np.sqrt(vals[ok])))
