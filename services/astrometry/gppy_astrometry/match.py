"""Coarse astrometric match of a frame's detections to the reference catalogue.

SCAMP's own pattern matching costs about 5 s per small frame whatever its search limits,
and more with more reference stars; a frame whose header pointing is off by up to 5' and
whose rotation is unknown to 2 deg is matched here instead, in well under a second, and
SCAMP then only cross-identifies and fits (``MATCH N``) from the linear WCS found here.

Method (plate scale known to a fraction of a percent):

1. reference stars are projected on the tangent plane at the header pointing; detections are
   turned into the same (east, north) arcsec frame with the nominal scale, north up, east left;
2. for each trial rotation on a grid covering +-``max_rotation_deg``, every detection-reference
   pair votes for its offset in a 2-D histogram of offsets within +-``max_offset_arcmin``;
   the offset and rotation with the most votes win, if the peak stands out of the pair
   background by ``min_significance`` standard deviations;
3. pairs closer than a shrinking radius are fitted with an affine transform (scale,
   rotation, shear, offset), with sigma clipping, three times.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from astropy.io import fits

_D2R = math.pi / 180.0


class NoMatchError(ValueError):
    """The detections do not match the reference catalogue (wrong field, blank frame...)."""


@dataclass
class CoarseMatch:
    """Result of :func:`coarse_match`.

    Attributes
    ----------
    header : astropy.io.fits.Header
        Linear TAN WCS (CRVAL at the frame centre, CD in deg/px).
    nmatch : int
        Detection-reference pairs within ``rms_arcsec``-scale radius after the final fit.
    rms_arcsec : float
        RMS of the final affine fit residuals (arcsec, both axes together).
    offset_arcsec : tuple[float, float]
        Centre offset of the solution from the header pointing (east, north), arcsec.
    rotation_deg : float
        Rotation of the solution (deg; 0 = north up, east left; positive counter-clockwise).
    scale_arcsec : float
        Fitted plate scale (arcsec/px).
    significance : float
        Height of the vote peak above the pair background, in standard deviations.
    """

    header: fits.Header
    nmatch: int
    rms_arcsec: float
    offset_arcsec: tuple[float, float]
    rotation_deg: float
    scale_arcsec: float
    significance: float


def tan_project(ra: np.ndarray, dec: np.ndarray, ra0: float, dec0: float) -> tuple[np.ndarray, np.ndarray]:
    """Gnomonic projection about (ra0, dec0): standard coordinates in arcsec (xi east, eta north).

    Points more than 90 deg away get NaN.
    """
    a = np.asarray(ra, float) * _D2R
    d = np.asarray(dec, float) * _D2R
    a0, d0 = ra0 * _D2R, dec0 * _D2R
    cosc = np.sin(d0) * np.sin(d) + np.cos(d0) * np.cos(d) * np.cos(a - a0)
    with np.errstate(divide="ignore", invalid="ignore"):
        xi = np.where(cosc > 0, np.cos(d) * np.sin(a - a0) / cosc, np.nan)
        eta = np.where(cosc > 0, (np.cos(d0) * np.sin(d) - np.sin(d0) * np.cos(d) * np.cos(a - a0)) / cosc,
                       np.nan)
    return xi / _D2R * 3600.0, eta / _D2R * 3600.0


def tan_deproject(xi: np.ndarray, eta: np.ndarray, ra0: float, dec0: float) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`tan_project` (arcsec in, deg out)."""
    x = np.asarray(xi, float) / 3600.0 * _D2R
    y = np.asarray(eta, float) / 3600.0 * _D2R
    a0, d0 = ra0 * _D2R, dec0 * _D2R
    denom = np.cos(d0) - y * np.sin(d0)
    ra = a0 + np.arctan2(x, denom)
    dec = np.arctan2(np.sin(d0) + y * np.cos(d0), np.hypot(x, denom))
    return np.mod(ra / _D2R, 360.0), dec / _D2R


def _rot(theta_deg: float) -> np.ndarray:
    c, s = math.cos(theta_deg * _D2R), math.sin(theta_deg * _D2R)
    return np.array([[c, -s], [s, c]])


def _fit_affine(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares ``dst = A @ [src, 1]``; returns the 2x3 matrix."""
    design = np.column_stack([src, np.ones(len(src))])
    sol, *_ = np.linalg.lstsq(design, dst, rcond=None)
    return sol.T


def _apply(affine: np.ndarray, pts: np.ndarray) -> np.ndarray:
    return pts @ affine[:, :2].T + affine[:, 2]


def _nearest(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each point of ``a``, index of and distance to the nearest point of ``b``."""
    from scipy.spatial import cKDTree

    dist, idx = cKDTree(b).query(a, k=1)
    return idx, dist


def coarse_match(x: np.ndarray, y: np.ndarray, flux: np.ndarray, ref_ra: np.ndarray, ref_dec: np.ndarray,
                 ref_mag: np.ndarray, ra0: float, dec0: float, nx: int, ny: int, pixscale_arcsec: float,
                 max_offset_arcmin: float = 6.0, max_rotation_deg: float = 3.0, n_bright: int = 150,
                 bin_arcsec: float = 6.0, min_significance: float = 8.0, min_pairs: int = 6,
                 min_fraction: float = 0.1) -> CoarseMatch:
    """Find the linear WCS that maps detections onto reference stars.

    Parameters
    ----------
    x, y : numpy.ndarray
        Detection centroids, FITS 1-based pixels.
    flux : numpy.ndarray
        Detection fluxes (any units; only their order matters).
    ref_ra, ref_dec : numpy.ndarray
        Reference positions at the frame's epoch (deg).
    ref_mag : numpy.ndarray
        Reference magnitudes (only their order matters).
    ra0, dec0 : float
        Header pointing (deg), taken as the frame centre.
    nx, ny : int
        Frame size (px).
    pixscale_arcsec : float
        Nominal plate scale (arcsec/px).
    max_offset_arcmin : float
        Largest pointing error searched (arcmin, per axis).
    max_rotation_deg : float
        Largest rotation searched (deg, either way).
    n_bright : int
        Number of brightest detections used for voting; the reference list is cut to the
        same surface density.
    bin_arcsec : float
        Vote histogram bin (arcsec).
    min_significance : float
        Minimum height of the vote peak over the background (standard deviations).
    min_pairs : int
        Minimum number of votes in the peak.
    min_fraction : float
        Minimum fraction of the stars expected in common (the smaller of the number of
        detections and of reference stars on the solved footprint) that the final fit pairs.

    Returns
    -------
    CoarseMatch

    Raises
    ------
    NoMatchError
        Too few detections or reference stars, or no significant vote peak.
    """
    x = np.asarray(x, float)
    y = np.asarray(y, float)
    good = np.isfinite(x) & np.isfinite(y) & np.isfinite(flux)
    x, y, flux = x[good], y[good], np.asarray(flux, float)[good]
    if len(x) < min_pairs:
        raise NoMatchError(f"only {len(x)} usable detections (need {min_pairs} for a match)")
    cx, cy = (nx + 1) / 2.0, (ny + 1) / 2.0
    s = pixscale_arcsec
    det = np.column_stack([-(x - cx) * s, (y - cy) * s])  # (east, north) arcsec, unrotated
    order = np.argsort(-flux)
    det_b = det[order[:n_bright]]

    xi, eta = tan_project(ref_ra, ref_dec, ra0, dec0)
    ref = np.column_stack([xi, eta])
    ok = np.all(np.isfinite(ref), axis=1)
    half_w, half_h = nx * s / 2.0, ny * s / 2.0
    reach = max_offset_arcmin * 60.0
    # reference stars that may fall on the frame for any searched offset and rotation
    rmax = math.hypot(half_w, half_h) + reach
    ok &= np.hypot(ref[:, 0], ref[:, 1]) <= rmax
    ref_all = ref[ok]
    mags = np.asarray(ref_mag, float)[ok]
    if len(ref_all) < min_pairs:
        raise NoMatchError(f"only {len(ref_all)} reference stars within {rmax / 60:.1f}' of the pointing")
    # same surface density as the bright detections: the searched area is larger than the frame
    area_frame = 4 * half_w * half_h
    area_ref = 4 * (half_w + reach) * (half_h + reach)
    n_ref = int(min(len(ref_all), max(2 * len(det_b), round(2.0 * len(det_b) * area_ref / area_frame))))
    ref_b = ref_all[np.argsort(np.where(np.isfinite(mags), mags, 99.0))[:n_ref]]

    # rotation step: at most ~bin/3 of misalignment at the frame corner
    rc = math.hypot(half_w, half_h)
    step = max(0.02, math.degrees((bin_arcsec / 3.0) / rc))
    nrot = int(math.ceil(max_rotation_deg / step))
    angles = np.arange(-nrot, nrot + 1) * step
    edges = np.arange(-reach - bin_arcsec, reach + bin_arcsec * 1.0001, bin_arcsec)
    nb = len(edges) - 1
    best = (-1.0, 0.0, 0.0, 0.0, 0.0)  # significance, angle, dx, dy, count
    lo = -reach - bin_arcsec
    for ang in angles:
        rd = det_b @ _rot(ang).T
        ix = np.floor((ref_b[:, None, 0] - rd[None, :, 0] - lo) / bin_arcsec).astype(np.int64).ravel()
        iy = np.floor((ref_b[:, None, 1] - rd[None, :, 1] - lo) / bin_arcsec).astype(np.int64).ravel()
        sel = (ix >= 0) & (ix < nb) & (iy >= 0) & (iy < nb)
        hist = np.bincount(ix[sel] * nb + iy[sel], minlength=nb * nb).reshape(nb, nb)
        # 2x2 box sum: a peak split over neighbouring bins still counts fully
        box = hist[:-1, :-1] + hist[1:, :-1] + hist[:-1, 1:] + hist[1:, 1:]
        k = int(np.argmax(box))
        i, j = divmod(k, box.shape[1])
        peak = float(box[i, j])
        # background around the peak (pair offsets are not uniform over the search area)
        win = box[max(i - 6, 0):i + 7, max(j - 6, 0):j + 7].astype(float)
        core = box[max(i - 1, 0):i + 2, max(j - 1, 0):j + 2]
        n_ring = win.size - core.size
        local = (win.sum() - core.sum()) / n_ring if n_ring > 0 else 0.0
        bg = max(local, 4.0 * sel.sum() / (nb * nb), 0.25)
        sig = (peak - bg) / math.sqrt(bg)
        if sig > best[0]:
            best = (sig, float(ang), float(edges[i + 1]), float(edges[j + 1]), peak)
    sig, ang, dx0, dy0, count = best
    if sig < min_significance or count < min_pairs:
        raise NoMatchError(f"no match with the reference catalogue: best vote peak {count:.0f} pairs, "
                           f"{sig:.1f} sigma above background (need {min_pairs} and {min_significance:g}); "
                           f"wrong field, blank frame, or pointing off by more than "
                           f"{max_offset_arcmin:g}'")

    # refine: affine fit on all detections, shrinking match radius
    affine = np.hstack([_rot(ang), [[dx0], [dy0]]])
    radius = 2.0 * bin_arcsec
    matched = np.zeros(0, int)
    rms = float("nan")
    for radius in (2.0 * bin_arcsec, bin_arcsec, 3.0, 1.5):
        proj = _apply(affine, det)
        idx, dist = _nearest(proj, ref_all)
        matched = np.flatnonzero(dist <= radius)
        if len(matched) < min_pairs:
            raise NoMatchError(f"no match with the reference catalogue: only {len(matched)} detections "
                               f"within {radius:g}\" of a reference star after the first alignment")
        src, dst = det[matched], ref_all[idx[matched]]
        for _ in range(3):
            affine = _fit_affine(src, dst)
            res = np.hypot(*(_apply(affine, src) - dst).T)
            rms = float(np.sqrt(np.mean(res ** 2)))
            keep = res <= max(3.0 * rms, 0.3)
            if keep.all() or keep.sum() < min_pairs:
                break
            src, dst = src[keep], dst[keep]
    nmatch = len(src)
    # a true match pairs a good part of the stars the frame and the reference have in common
    inside = ((np.abs(ref_all[:, 0] - affine[0, 2]) < half_w) & (np.abs(ref_all[:, 1] - affine[1, 2]) < half_h))
    expected = min(len(det), int(inside.sum()))
    if nmatch < max(min_pairs, min_fraction * expected):
        raise NoMatchError(f"no match with the reference catalogue: only {nmatch} of {expected} stars paired "
                           f"after the alignment (best vote peak {count:.0f} pairs, {sig:.1f} sigma); "
                           f"wrong field, or pointing off by more than {max_offset_arcmin:g}'")

    # affine (east, north) = M @ det + t, det = diag(-s, s) @ (p - c)  =>  CD = M @ diag(-s, s) / 3600
    m = affine[:, :2]
    t = affine[:, 2]
    cd = m @ np.diag([-s, s]) / 3600.0
    cra, cdec = tan_deproject(np.array([t[0]]), np.array([t[1]]), ra0, dec0)
    # CD is defined in the tangent plane at the pointing; at the new tangent point (at most a
    # few arcmin away) the difference is below 1e-6 relative and SCAMP refits it anyway
    h = fits.Header()
    h["EQUINOX"] = 2000.0
    h["RADESYS"] = "ICRS"
    h["CTYPE1"] = "RA---TAN"
    h["CTYPE2"] = "DEC--TAN"
    h["CUNIT1"] = "deg"
    h["CUNIT2"] = "deg"
    h["CRVAL1"] = float(cra[0])
    h["CRVAL2"] = float(cdec[0])
    h["CRPIX1"] = cx
    h["CRPIX2"] = cy
    h["CD1_1"], h["CD1_2"], h["CD2_1"], h["CD2_2"] = (float(cd[0, 0]), float(cd[0, 1]),
                                                      float(cd[1, 0]), float(cd[1, 1]))
    scale = math.sqrt(abs(np.linalg.det(m))) * s
    rotation = math.degrees(math.atan2(m[1, 0] - m[0, 1], m[0, 0] + m[1, 1]))
    return CoarseMatch(header=h, nmatch=int(nmatch), rms_arcsec=rms, offset_arcsec=(float(t[0]), float(t[1])),
                       rotation_deg=rotation, scale_arcsec=scale, significance=float(sig))
