"""Coarse astrometric match of a frame's detections to the reference catalogue.

SCAMP's own pattern matching costs about 5 s per small frame whatever its search limits,
and more with more reference stars; the frame is matched here instead, in a fraction of a
second, and SCAMP then only cross-identifies and fits (``MATCH N``) from the linear WCS
found here.

Method: a cross-correlation of the two star fields over a grid of rotations (the plate
scale is known to a fraction of a percent).

1. reference stars are projected on the tangent plane at the header pointing; detections
   are turned into the same (east, north) arcsec frame with the nominal scale, north up,
   east left;
2. both lists are counted into maps with a common grid of ``bin`` arcsec; for each trial
   rotation of the detections (steps that move the frame corners by at most a quarter of a
   bin), the cross-correlation of the two maps (FFT) holds, for every offset, the number
   of detection-reference pairs that it separates; the rotation and offset whose 2x2-bin
   peak stands highest above its local background win;
3. the pairs within about a bin of that solution vote again, with 1" bins, over rotations
   an eighth of a step apart (a fine vote in rotation and offset); each detection keeps its
   closest reference star within 2" of the voted solution, and the pairs are fitted with an
   affine transform (scale, rotation, shear, offset) with sigma clipping, then paired again
   within 3" and 1.5" and refitted;
4. the match is accepted only if the fit pairs at least a tenth of the stars the frame and
   the reference have in common, and well over twice the pairs a random field of the same
   density would give;
5. the same pairs are refitted in the tangent plane at the solved centre (the plane at the
   header pointing is rotated by the pointing error times sin(dec) from it: 2" at the
   corners of a full frame 4.5' off in RA at dec -35) to give the TAN WCS.

All the stars of both lists take part (the deeper list is cut to a few times the surface
density of the other, brightest first), so the match does not depend on the brightest
stars being the same in both: saturated stars missing from the detections, a reference in
another band, or a reference much deeper or shallower than the frame change the height of
the peak a little, not where it is. (An earlier version voted with the 150 brightest
unsaturated detections against the reference's brightest stars; on a full-size frame with
276 saturated stars only one of those 150 was among the 421 reference stars it voted
against, and the match failed.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from astropy.io import fits
from scipy.fft import irfft2, next_fast_len, rfft2
from scipy.spatial import cKDTree

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


def _nearest(a: np.ndarray, tree) -> tuple[np.ndarray, np.ndarray]:
    """For each point of ``a``, index of and distance to the nearest point of ``tree``
    (a :class:`scipy.spatial.cKDTree`)."""
    dist, idx = tree.query(a, k=1)
    return idx, dist


def _search_grid(half_w: float, half_h: float, reach: float, max_rotation_deg: float, bin_arcsec: float
                 ) -> tuple[float, float, int, int]:
    """Half extents (arcsec) and shape (bins) of a grid holding the rotated frame shifted by
    up to ``reach`` per axis, with a sizes good for FFTs."""
    sin_t = math.sin(math.radians(min(max_rotation_deg, 90.0)))
    ex = half_w + half_h * sin_t + reach + 2.0 * bin_arcsec
    ey = half_h + half_w * sin_t + reach + 2.0 * bin_arcsec
    nbx = next_fast_len(int(math.ceil(2.0 * ex / bin_arcsec)), real=True)
    nby = next_fast_len(int(math.ceil(2.0 * ey / bin_arcsec)), real=True)
    return nbx * bin_arcsec / 2.0, nby * bin_arcsec / 2.0, nbx, nby


def _rotation_step(rc: float, bin_arcsec: float) -> float:
    """Rotation step (deg) that leaves the frame corners (``rc`` arcsec from the centre) at
    most a quarter of a bin from a grid angle."""
    return math.degrees(bin_arcsec / (2.0 * rc))


def choose_bin(half_w: float, half_h: float, reach: float, max_rotation_deg: float,
               budget: float = 8.0e6, smallest: float = 4.0, largest: float = 30.0) -> float:
    """The smallest bin (arcsec, whole) whose search costs at most ``budget`` map cells
    (cells of the FFT grid times the number of trial rotations): a finer bin sets the peak
    higher above the background but costs as the inverse cube of the bin."""
    rc = math.hypot(half_w, half_h)
    b = smallest
    while b < largest:
        _, _, nbx, nby = _search_grid(half_w, half_h, reach, max_rotation_deg, b)
        nrot = 2 * int(math.ceil(max_rotation_deg / _rotation_step(rc, b))) + 1
        if nbx * nby * nrot <= budget:
            break
        b += 1.0
    return b


def _counts(pts: np.ndarray, ex: float, ey: float, nbx: int, nby: int, bin_arcsec: float) -> np.ndarray:
    ix = np.floor((pts[:, 0] + ex) / bin_arcsec).astype(np.int64)
    iy = np.floor((pts[:, 1] + ey) / bin_arcsec).astype(np.int64)
    ok = (ix >= 0) & (ix < nbx) & (iy >= 0) & (iy < nby)
    return np.bincount(iy[ok] * nbx + ix[ok], minlength=nbx * nby).reshape(nby, nbx).astype(np.float32)


def coarse_match(x: np.ndarray, y: np.ndarray, flux: np.ndarray, ref_ra: np.ndarray, ref_dec: np.ndarray,
                 ref_mag: np.ndarray, ra0: float, dec0: float, nx: int, ny: int, pixscale_arcsec: float,
                 max_offset_arcmin: float = 12.0, max_rotation_deg: float = 5.0, bin_arcsec: float | None = None,
                 min_significance: float = 8.0, min_pairs: int = 6, min_fraction: float = 0.1,
                 density_factor: float = 3.0) -> CoarseMatch:
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
    bin_arcsec : float, optional
        Bin of the count maps (arcsec); by default the finest that keeps the search within
        a fixed cost (:func:`choose_bin`): about 5" on a 1500 px frame, 16" on a full one.
    min_significance : float
        Minimum height of the correlation peak over its local background, in standard
        deviations (Poisson, or the background's scatter if larger, plus one count).
    min_pairs : int
        Minimum number of pairs in the peak and in every fit.
    min_fraction : float
        Minimum fraction of the stars expected in common (the smaller of the number of
        detections and of reference stars on the solved footprint) that the final fit pairs.
    density_factor : float
        The denser list is cut (brightest first) to this many times the surface density of
        the other one.

    Returns
    -------
    CoarseMatch

    Raises
    ------
    NoMatchError
        Too few detections or reference stars, no significant correlation peak, or too few
        stars paired after the alignment; the message says which.
    """
    x = np.asarray(x, float)
    y = np.asarray(y, float)
    flux = np.asarray(flux, float)
    good = np.isfinite(x) & np.isfinite(y) & np.isfinite(flux)
    x, y, flux = x[good], y[good], flux[good]
    if len(x) < min_pairs:
        raise NoMatchError(f"only {len(x)} usable detections (need {min_pairs} for a match)")
    cx, cy = (nx + 1) / 2.0, (ny + 1) / 2.0
    s = pixscale_arcsec
    det = np.column_stack([-(x - cx) * s, (y - cy) * s])  # (east, north) arcsec, unrotated
    det = det[np.argsort(-flux, kind="stable")]           # brightest first
    half_w, half_h = nx * s / 2.0, ny * s / 2.0
    rc = math.hypot(half_w, half_h)
    reach = max_offset_arcmin * 60.0
    b = float(bin_arcsec) if bin_arcsec else choose_bin(half_w, half_h, reach, max_rotation_deg)
    ex, ey, nbx, nby = _search_grid(half_w, half_h, reach, max_rotation_deg, b)

    xi, eta = tan_project(ref_ra, ref_dec, ra0, dec0)
    ref = np.column_stack([xi, eta])
    mags = np.asarray(ref_mag, float)
    ok = np.all(np.isfinite(ref), axis=1) & (np.abs(ref[:, 0]) < ex - b) & (np.abs(ref[:, 1]) < ey - b)
    ref_all = ref[ok]
    ref_all = ref_all[np.argsort(np.where(np.isfinite(mags[ok]), mags[ok], 99.0), kind="stable")]
    if len(ref_all) < min_pairs:
        raise NoMatchError(f"only {len(ref_all)} reference stars within {ex / 60:.0f}'x{ey / 60:.0f}' "
                           f"of the pointing")
    # the denser list is cut to a few times the surface density of the other one
    area_ratio = (4.0 * ex * ey) / (4.0 * half_w * half_h)
    n_ref = int(min(len(ref_all), math.ceil(density_factor * len(det) * area_ratio)))
    n_det = int(min(len(det), max(math.ceil(density_factor * len(ref_all) / area_ratio), min_pairs)))
    ref_v, det_v = ref_all[:n_ref], det[:n_det]

    # cross-correlation of the count maps over a grid of rotations
    fr = rfft2(_counts(ref_v, ex, ey, nbx, nby, b))
    step = _rotation_step(rc, b)
    nrot = int(math.ceil(max_rotation_deg / step))
    angles = np.arange(-nrot, nrot + 1) * step
    m = int(math.ceil(reach / b)) + 1
    rows = np.arange(-m, m + 2) % nby
    cols = np.arange(-m, m + 2) % nbx
    best: tuple[float, ...] = (-np.inf, 0.0, 0.0, 0.0, 0.0, 0.0)  # significance, angle, tx, ty, peak, bg
    for ang in angles:
        rd = det_v @ _rot(float(ang)).T
        corr = irfft2(np.conj(rfft2(_counts(rd, ex, ey, nbx, nby, b))) * fr, s=(nby, nbx))
        sub = corr[np.ix_(rows, cols)]                      # offsets -m..m+1 bins (ref - det)
        box = sub[:-1, :-1] + sub[1:, :-1] + sub[:-1, 1:] + sub[1:, 1:]
        k = int(np.argmax(box))
        i, j = divmod(k, box.shape[1])
        peak = float(box[i, j])
        win = box[max(i - 7, 0):i + 8, max(j - 7, 0):j + 8].astype(float)
        core = box[max(i - 1, 0):i + 2, max(j - 1, 0):j + 2].astype(float)
        n_ring = win.size - core.size
        bg = max((win.sum() - core.sum()) / n_ring, 0.0) if n_ring > 0 else 0.0
        sig = (peak - bg) / math.sqrt(bg + 1.0)
        if sig > best[0]:
            # sub-bin offset: the mean bin shift of a pair is its true shift over the bin
            cells = np.clip(sub[i:i + 2, j:j + 2].astype(float) - bg / 4.0, 0.0, None)
            tot = cells.sum()
            if tot > 0:
                sy = i - m + float(cells[1, :].sum()) / tot
                sx = j - m + float(cells[:, 1].sum()) / tot
            else:
                sy, sx = i - m + 0.5, j - m + 0.5
            best = (sig, float(ang), sx * b, sy * b, peak, bg)
    sig, ang, tx, ty, count, bg = best
    if sig < min_significance or count < min_pairs:
        raise NoMatchError(f"no match with the reference catalogue: best correlation peak {count:.0f} pairs "
                           f"over a background of {bg:.1f}, {sig:.1f} sigma (need {min_pairs} pairs and "
                           f"{min_significance:g} sigma); wrong field, blank frame, or pointing off by more "
                           f"than {max_offset_arcmin:g}' or rotated by more than {max_rotation_deg:g} deg")

    # fine vote: the pairs within a bin (plus a rotation step at the corners) of the coarse
    # solution vote again with 1" bins, over rotations an eighth of a step apart
    tree_ref = cKDTree(ref_all)
    pred = det @ _rot(ang).T + np.array([tx, ty])
    radius = b + rc * math.radians(step) + 2.0
    pairs = cKDTree(pred).sparse_distance_matrix(tree_ref, radius, output_type="ndarray")
    if len(pairs) < min_pairs:
        raise NoMatchError(f"no match with the reference catalogue: only {len(pairs)} detection-reference "
                           f"pairs within {radius:.0f}\" after the first alignment")
    pi, pj = pairs["i"], pairs["j"]
    src_all, dst_all = det[pi], ref_all[pj] - np.array([tx, ty])
    nb = int(math.ceil(radius)) + 2
    fine = (-1.0, ang, 0.0, 0.0)  # peak, angle, x, y (1" bins)
    for a_k in ang + np.arange(-8, 9) * (step / 8.0):
        res = dst_all - src_all @ _rot(float(a_k)).T
        ix = np.floor(res[:, 0]).astype(np.int64) + nb
        iy = np.floor(res[:, 1]).astype(np.int64) + nb
        ok = (ix >= 0) & (ix < 2 * nb) & (iy >= 0) & (iy < 2 * nb)
        h2 = np.bincount(iy[ok] * 2 * nb + ix[ok], minlength=4 * nb * nb).reshape(2 * nb, 2 * nb)
        box2 = h2[:-1, :-1] + h2[1:, :-1] + h2[:-1, 1:] + h2[1:, 1:]
        k = int(np.argmax(box2))
        i, j = divmod(k, box2.shape[1])
        if box2[i, j] > fine[0]:
            fine = (float(box2[i, j]), float(a_k), j - nb + 1.0, i - nb + 1.0)
    _, ang, fx, fy = fine
    res = dst_all - src_all @ _rot(ang).T
    near = np.hypot(res[:, 0] - fx, res[:, 1] - fy) <= 1.5
    if near.sum() >= min_pairs:
        fx, fy = res[near].mean(axis=0)
    # each detection keeps its closest reference star within 2" of the voted solution
    d = np.hypot(res[:, 0] - fx, res[:, 1] - fy)
    keep = d <= 2.0
    pi, pj, d = pi[keep], pj[keep], d[keep]
    order = np.lexsort((d, pi))
    first = np.r_[True, pi[order][1:] != pi[order][:-1]]
    pi, pj = pi[order][first], pj[order][first]
    if len(pi) < min_pairs:
        raise NoMatchError(f"no match with the reference catalogue: only {len(pi)} pairs within 2\" "
                           f"after the fine alignment")
    src, dst = det[pi], ref_all[pj]
    rms = float("nan")

    def fit(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        aff = _fit_affine(src, dst)
        rr = float("nan")
        for _ in range(4):
            aff = _fit_affine(src, dst)
            r = np.hypot(*(_apply(aff, src) - dst).T)
            rr = float(np.sqrt(np.mean(r ** 2)))
            kept = r <= max(3.0 * rr, 0.3)
            if kept.all() or kept.sum() < min_pairs:
                break
            src, dst = src[kept], dst[kept]
        return aff, src, dst, rr

    affine, src, dst, rms = fit(src, dst)
    for radius in (3.0, 1.5):
        idx, dist = _nearest(_apply(affine, det), tree_ref)
        matched = np.flatnonzero(dist <= radius)
        if len(matched) < min_pairs:
            raise NoMatchError(f"no match with the reference catalogue: only {len(matched)} detections "
                               f"within {radius:g}\" of a reference star after the alignment")
        affine, src, dst, rms = fit(det[matched], ref_all[idx[matched]])
    nmatch = len(src)
    # a true match pairs a good part of the stars the frame and the reference have in common,
    # and many more than an alignment on a random field would (the fit itself pulls in some)
    inv = np.linalg.inv(affine[:, :2])
    back = (ref_all - affine[:, 2]) @ inv.T
    inside = (np.abs(back[:, 0]) < half_w) & (np.abs(back[:, 1]) < half_h)
    expected = min(len(det), int(inside.sum()))
    rho = len(ref_all) / (4.0 * (ex - b) * (ey - b))
    chance = len(det) * (1.0 - math.exp(-rho * math.pi * 1.5 ** 2))
    need = max(min_pairs, min_fraction * expected, 2.0 * chance + 5.0 * math.sqrt(chance))
    if nmatch < need:
        raise NoMatchError(f"no match with the reference catalogue: only {nmatch} of {expected} stars paired "
                           f"after the alignment (need {need:.0f}; {chance:.0f} expected by chance; best "
                           f"correlation peak {count:.0f} pairs, {sig:.1f} sigma); wrong field, or pointing "
                           f"off by more than {max_offset_arcmin:g}'")

    # the fit holds in the tangent plane at the header pointing; the WCS is tangent at the
    # solved centre: refit the same pairs there (step 5 of the module docstring)
    sky_ra, sky_dec = tan_deproject(dst[:, 0], dst[:, 1], ra0, dec0)
    cra, cdec = ra0, dec0
    for _ in range(2):
        t = affine[:, 2]
        c_ra, c_dec = tan_deproject(np.array([t[0]]), np.array([t[1]]), cra, cdec)
        cra, cdec = float(c_ra[0]), float(c_dec[0])
        affine = _fit_affine(src, np.column_stack(tan_project(sky_ra, sky_dec, cra, cdec)))
    t = affine[:, 2]
    c_ra, c_dec = tan_deproject(np.array([t[0]]), np.array([t[1]]), cra, cdec)
    offset = tan_project(c_ra, c_dec, ra0, dec0)
    # affine (east, north) = M @ det + t, det = diag(-s, s) @ (p - c)  =>  CD = M @ diag(-s, s) / 3600
    m2 = affine[:, :2]
    cd = m2 @ np.diag([-s, s]) / 3600.0
    h = fits.Header()
    h["EQUINOX"] = 2000.0
    h["RADESYS"] = "ICRS"
    h["CTYPE1"] = "RA---TAN"
    h["CTYPE2"] = "DEC--TAN"
    h["CUNIT1"] = "deg"
    h["CUNIT2"] = "deg"
    h["CRVAL1"] = float(c_ra[0])
    h["CRVAL2"] = float(c_dec[0])
    h["CRPIX1"] = cx
    h["CRPIX2"] = cy
    h["CD1_1"], h["CD1_2"], h["CD2_1"], h["CD2_2"] = (float(cd[0, 0]), float(cd[0, 1]),
                                                      float(cd[1, 0]), float(cd[1, 1]))
    scale = math.sqrt(abs(np.linalg.det(m2))) * s
    rotation = math.degrees(math.atan2(m2[1, 0] - m2[0, 1], m2[0, 0] + m2[1, 1]))
    return CoarseMatch(header=h, nmatch=int(nmatch), rms_arcsec=rms, offset_arcsec=(float(offset[0][0]), float(offset[1][0])),
                       rotation_deg=rotation, scale_arcsec=scale, significance=float(sig))
