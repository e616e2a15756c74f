"""Transient candidates on a difference image: forced measurements, vetting flags, labels.

v1 wrote this step (``gregoryfind_7DT.py``, v1-behaviour.md §10) and never ran it. Here every
detection of Source Extractor on the difference D (positive) and on -D (negative, i.e. fading
sources) gets:

* forced measurements at its position (:func:`forced_aperture`, :func:`forced_psf`): a PSF-
  weighted flux and S/N on D with its noise image, and aperture fluxes (APER_1) on the
  difference, the science and the (convolved) reference;
* the vetting flags of v1 §10, each a boolean column (``flag_*``), re-expressed with the noise
  image where v1 compared raw counts (:func:`vetting_flags`);
* a real/bogus score (:mod:`gppy_phot.vetting`; the shape-only :mod:`gppy_phot.realbogus`);
* a label: ``new`` (positive, nothing in the reference), ``brightening`` (positive, a
  reference source), ``fading`` (negative), ``moving`` (its position moves across the visit's
  single frames, :func:`moving_objects`, or it is a trail on D, :func:`trailed_objects`).

A detection is a candidate when none of the hard flags (:data:`HARD_FLAGS`) is set, its S/N
reaches ``snr_min`` and its vetting score (:mod:`gppy_phot.vetting`, trained on simulated
nights, which weighs the measurements behind the other flags together) is at least ``rb_min``;
a moving object needs no hard flag only. With ``vetting_model=False``, v1's rule: no flag at
all (shape flags waived for moving objects) and the shape-only score of
:mod:`gppy_phot.realbogus` at least ``rb_min``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gppy_phot.pixels import stamps

#: Flag columns, with the v1 §10 item each stands for.
FLAG_DOC = {
    "flag_inv_diff": "1: a detection of the opposite sign within SEEING (dipole / negative counterpart)",
    "flag_inv_ref": "2: a negative feature in the convolved reference at the detection (APER_1 flux below "
                    "-5 sigma of that aperture's scatter on the convolved reference)",
    "flag_edge": "3: within the border margin (outside v1's 99 % box, and >= 2 FWHM from the edge)",
    "flag_faint": "4: PSF-weighted S/N below snr_min (negative detections: snr_min_negative; matched-filter "
                  "peaks without a Source Extractor shape: 1.5 snr_min) (v1: fainter than the 5-sigma depth UL5_1)",
    "flag_ellip": "5: ELLIPTICITY / ELLIP > 5 and ELLIPTICITY > 0.3 + 2.5 / S/N",
    "flag_sexflags": "6: Source Extractor FLAGS > 4",
    "flag_seeing": "7: FWHM / SEEING > 3 (1 + 2.5 / S/N) or < 0.5",
    "flag_background": "8: |BACKGROUND| > 2 x the local noise (v1: > 50 counts)",
    "flag_concentration": "9: 3\"/10\" concentration off the stars' by > max(10 MAD, 0.25 mag, 5 sigma) "
                          "(not tested within 10\" + FWHM of a star)",
    "flag_dipole": "10: > 30 % of the pixels within +-PEEING beyond 1 sigma of the opposite sign, or a lobe of "
                   "the opposite sign within 1.5 FWHM at least half as strong as the detection and beyond 3 sigma",
    "flag_masked": "11, 13: more than 30 % of the PSF information (sum P^2 within 2 FWHM) on masked or null "
                   "pixels, or a saturated pixel within max(5 px, 1.5 PEEING)",
    "flag_footprint": "12: outside the reference image's footprint",
    "flag_pm_star": "(v1 flag 0's neighbour) at a catalogue star that moved by >= 0.1\" between the reference's "
                    "epoch and the science's (its proper motion leaves a dipole): within 0.6 FWHM (>= 1\") of "
                    "the segment between its two positions",
    "flag_star_residual": "beside a star (0.5-4 FWHM): a residual of that star at the detection's distance "
                          "from it (+-0.5 FWHM), away from the detection, beyond 3 sigma and at least half the "
                          "detection's flux: of the opposite sign, or of its sign over 30 % of the circle "
                          "(the star's residual pattern, not a source)",
}
#: Flags that do not veto a moving object (a moving object is elongated in a stack).
SHAPE_FLAGS = ("flag_ellip", "flag_seeing", "flag_concentration", "flag_inv_diff", "flag_dipole")
#: Flags that veto a candidate whatever its vetting score: where the difference cannot hold a
#: new source (the border, outside the reference, a hole in the reference, a moving star).
HARD_FLAGS = ("flag_edge", "flag_footprint", "flag_inv_ref", "flag_pm_star")


@dataclass
class TransientParams:
    """Settings of the transient search."""

    detect_significance: float = 3.5
    snr_min: float = 5.0
    #: Negative detections (fading sources) need more: the negative halos and lobes that the
    #: PSF matching leaves beside bright stars outnumber real fading sources near the limit.
    snr_min_negative: float = 7.0
    #: Least vetting score (:mod:`gppy_phot.vetting`) of a candidate; of one whose S/N reaches
    #: ``high_snr``, ``rb_min_high_snr``: most false alarms are faint (noise peaks and the lobes
    #: beside stars reach S/N 5-10), and a bright source beside a star, whose surroundings
    #: lower its score, is rarely one (both chosen by cross-validation on simulated nights).
    rb_min: float = 0.9
    rb_min_high_snr: float = 0.3
    high_snr: float = 10.0
    #: Score with the trained vetting model (False: v1's rule, no veto flag and the shape-only
    #: score of :mod:`gppy_phot.realbogus` at least ``rb_min``).
    vetting_model: bool = True
    #: Least shape-only score (:mod:`gppy_phot.realbogus`, trained on synthetic cosmic rays, bad
    #: columns, dipoles and broad blobs) of a candidate: a veto on artefacts that the
    #: simulated nights behind the vetting model do not show (their calibration masks them).
    rb_shape_min: float = 0.03
    edge_fraction: float = 0.005
    moving_min_arcsec: float = 1.0
    moving_search_arcsec: float = 8.0
    #: Also label as moving the candidates that are trails on the difference
    #: (:func:`trailed_objects`), for a moving object that the single frames cannot show.
    trails: bool = True
    #: Check the noise image at random places and rescale it (off only where the noise is known
    #: exactly and the image is crowded with objects, as in the real/bogus training images).
    calibrate_noise: bool = True


# ----------------------------------------------------------------------- forced measurements
def aperture_weights(dx: np.ndarray, dy: np.ndarray, radius: float) -> np.ndarray:
    """Fraction of each pixel inside a circle of ``radius`` (px), a linear ramp across the edge
    (exact to a few 0.1 % of the aperture area for radii of a few pixels)."""
    return np.clip(radius + 0.5 - np.hypot(dx, dy), 0.0, 1.0)


@dataclass
class Forced:
    """Forced aperture measurement (image units)."""

    flux: np.ndarray
    err: np.ndarray
    background: np.ndarray
    nbad: np.ndarray


def forced_aperture(image: np.ndarray, x: np.ndarray, y: np.ndarray, radius: float,
                    sigma: np.ndarray | None = None, bad: np.ndarray | None = None, gain: float = 0.0,
                    annulus: tuple[float, float] | None = None) -> Forced:
    """Aperture photometry at fixed 0-based positions.

    Parameters
    ----------
    image : 2-D array
        The image (D, science or reference), image units.
    x, y : arrays
        0-based positions (px).
    radius : float
        Aperture radius (px).
    sigma : 2-D array, optional
        Per-pixel noise (image units). Without it, the robust scatter of the annulus is used.
    bad : 2-D bool array, optional
        Pixels excluded from the aperture sum (counted in ``nbad``) and from the annulus.
    gain : float
        e- per image unit for the sources' Poisson noise (0: none).
    annulus : (r_in, r_out), optional
        Background annulus radii (px); default (radius + 4, radius + 12). Its median is
        subtracted; ``annulus=(0, 0)`` means no background subtraction.
    """
    x = np.atleast_1d(np.asarray(x, float))
    y = np.atleast_1d(np.asarray(y, float))
    n = len(x)
    if n == 0:
        z = np.zeros(0)
        return Forced(z, z, z, z.astype(int))
    r_in, r_out = annulus if annulus is not None else (radius + 4.0, radius + 12.0)
    half = int(np.ceil(max(radius, r_out))) + 1
    vals, dx, dy = stamps(image, x, y, half)
    badst = ~np.isfinite(vals)
    if bad is not None:
        b, _, _ = stamps(bad, x, y, half, fill=1.0)
        badst |= b > 0
    w = aperture_weights(dx, dy, radius)
    r = np.hypot(dx, dy)
    ann = (r >= r_in) & (r < r_out) & ~badst
    v0 = np.where(badst, 0.0, vals)
    if r_out > 0:
        with np.errstate(invalid="ignore"):
            annv = np.where(ann, vals, np.nan).reshape(n, -1)
            bkg = np.nanmedian(annv, axis=1)
            mad = np.nanmedian(np.abs(annv - bkg[:, None]), axis=1) * 1.4826
        nann = ann.reshape(n, -1).sum(axis=1)
        bkg = np.where(np.isfinite(bkg), bkg, 0.0)
    else:
        bkg = np.zeros(n)
        mad = np.full(n, np.nan)
        nann = np.zeros(n, int)
    area = (w * ~badst).reshape(n, -1).sum(axis=1)
    flux = (w * v0).reshape(n, -1).sum(axis=1) - bkg * area
    if sigma is not None:
        s, _, _ = stamps(sigma, x, y, half, fill=0.0)
        s = np.where(badst | ~np.isfinite(s), 0.0, s)
        var = ((w * s) ** 2).reshape(n, -1).sum(axis=1)
        with np.errstate(invalid="ignore"):
            sig_pix = np.sqrt(np.nanmedian(np.where(ann, s, np.nan).reshape(n, -1) ** 2, axis=1))
    else:
        var = (w**2).reshape(n, -1).sum(axis=1) * np.where(np.isfinite(mad), mad, 0.0) ** 2
        sig_pix = mad
    with np.errstate(invalid="ignore", divide="ignore"):
        var_bkg = np.where(nann > 0, 0.5 * np.pi * (area * np.where(np.isfinite(sig_pix), sig_pix, 0.0)) ** 2
                           / np.maximum(nann, 1), 0.0)
    if gain > 0:
        var = var + np.clip(flux, 0, None) / gain
    nbad = (badst & (w > 0)).reshape(n, -1).sum(axis=1)
    return Forced(flux=flux, err=np.sqrt(var + var_bkg), background=bkg, nbad=nbad)


def psf_model(dx: np.ndarray, dy: np.ndarray, fwhm_px: float, beta: float | None = None) -> np.ndarray:
    """Unit-integral PSF sampled at offsets (dx, dy): a circular Moffat of index ``beta``
    (the science image's curve-of-growth ``COGBETA``), or a Gaussian when ``beta`` is None."""
    r2 = dx**2 + dy**2
    if beta is None or not np.isfinite(beta) or beta > 15:
        s2 = (fwhm_px / 2.3548200450309493) ** 2
        return np.exp(-0.5 * r2 / s2) / (2 * np.pi * s2)
    alpha = fwhm_px / (2.0 * np.sqrt(2.0 ** (1.0 / beta) - 1.0))
    return (beta - 1.0) / (np.pi * alpha**2) * (1.0 + r2 / alpha**2) ** (-beta)


@dataclass
class PsfFit:
    """PSF-weighted flux on the difference and its figures."""

    flux: np.ndarray
    err: np.ndarray
    snr: np.ndarray
    chi2: np.ndarray       # reduced chi^2 of D - flux x PSF within 1.5 FWHM
    sharpness: np.ndarray  # peak pixel / model peak (1 for a PSF)


def forced_psf(diff: np.ndarray, sigma: np.ndarray, x: np.ndarray, y: np.ndarray, fwhm_px: float,
               bad: np.ndarray | None = None, beta: float | None = None) -> PsfFit:
    """Optimal (PSF-weighted) flux of point sources at fixed positions on the difference.

    ``flux = sum(P D / s^2) / sum(P^2 / s^2)``, ``err = 1 / sqrt(sum(P^2 / s^2))`` over the pixels
    within 2 FWHM (:func:`psf_model` of the image's seeing; masked pixels left out). ``snr`` is
    the significance of a point source there: it is what the detection threshold means.
    """
    x = np.atleast_1d(np.asarray(x, float))
    y = np.atleast_1d(np.asarray(y, float))
    n = len(x)
    if n == 0:
        z = np.zeros(0)
        return PsfFit(z, z, z, z, z)
    half = int(np.ceil(2 * fwhm_px)) + 1
    d, dx, dy = stamps(diff, x, y, half)
    s, _, _ = stamps(sigma, x, y, half, fill=0.0)
    badst = ~np.isfinite(d) | ~np.isfinite(s) | (s <= 0)
    if bad is not None:
        b, _, _ = stamps(bad, x, y, half, fill=1.0)
        badst |= b > 0
    r = np.hypot(dx, dy)
    use = (r <= 2 * fwhm_px) & ~badst
    p = psf_model(dx, dy, fwhm_px, beta)
    with np.errstate(invalid="ignore", divide="ignore"):
        ivar = np.where(use, 1.0 / np.where(s > 0, s, 1.0) ** 2, 0.0)
        a = (p * p * ivar).reshape(n, -1).sum(axis=1)
        b = (p * np.where(use, d, 0.0) * ivar).reshape(n, -1).sum(axis=1)
        flux = np.where(a > 0, b / a, np.nan)
        err = np.where(a > 0, 1.0 / np.sqrt(a), np.nan)
        core = use & (r <= 1.5 * fwhm_px)
        res2 = ((np.where(core, d, 0.0) - flux[:, None, None] * p) ** 2 * np.where(core, ivar, 0.0))
        ncore = core.reshape(n, -1).sum(axis=1)
        chi2 = res2.reshape(n, -1).sum(axis=1) / np.maximum(ncore - 1, 1)
        near = use & (r <= 1.0)
        peak = np.nanmax(np.where(near, d, -np.inf).reshape(n, -1), axis=1)
        model_peak = flux * psf_model(np.zeros(1), np.zeros(1), fwhm_px, beta)[0]
        sharp = np.where(np.abs(model_peak) > 0, peak / model_peak, np.nan)
    return PsfFit(flux=flux, err=err, snr=flux / err, chi2=chi2, sharpness=sharp)


# ----------------------------------------------------------------------- pixel-level checks
def box_fraction(sig: np.ndarray, x: np.ndarray, y: np.ndarray, half: int, threshold: float,
                 sign: np.ndarray) -> np.ndarray:
    """Fraction of the pixels in a (2 half + 1)^2 box where ``sign x sig < -threshold``
    (significantly of the opposite sign; NaN pixels do not count)."""
    v, _, _ = stamps(sig, x, y, half)
    good = np.isfinite(v)
    opp = good & ((np.asarray(sign)[:, None, None] * v) < -threshold)
    n = len(np.atleast_1d(x))
    return opp.reshape(n, -1).sum(axis=1) / np.maximum(good.reshape(n, -1).sum(axis=1), 1)


def any_in_radius(bad: np.ndarray, x: np.ndarray, y: np.ndarray, radius: float) -> np.ndarray:
    """True where a ``bad`` pixel lies within ``radius`` px (outside the image counts as bad)."""
    half = int(np.ceil(radius))
    v, dx, dy = stamps(bad, x, y, half, fill=1.0)
    inside = np.hypot(dx, dy) <= radius
    n = len(np.atleast_1d(x))
    return ((v > 0) & inside).reshape(n, -1).any(axis=1)


def masked_psf_fraction(bad: np.ndarray, x: np.ndarray, y: np.ndarray, fwhm_px: float,
                        beta: float | None = None) -> np.ndarray:
    """Fraction of a point source's information lost to masked pixels: ``sum P^2`` over the
    masked pixels within 2 FWHM over ``sum P^2`` there (:func:`psf_model`; outside the image
    counts as masked). 0 for a clean place; a single masked pixel in the wing costs a few
    per cent, the masked core of a star most of it."""
    x = np.atleast_1d(np.asarray(x, float))
    y = np.atleast_1d(np.asarray(y, float))
    n = len(x)
    if n == 0:
        return np.zeros(0)
    half = int(np.ceil(2 * fwhm_px)) + 1
    b, dx, dy = stamps(bad, x, y, half, fill=1.0)
    p2 = psf_model(dx, dy, fwhm_px, beta) ** 2 * (np.hypot(dx, dy) <= 2 * fwhm_px)
    tot = p2.reshape(n, -1).sum(axis=1)
    lost = (p2 * (b > 0)).reshape(n, -1).sum(axis=1)
    return np.where(tot > 0, lost / np.where(tot > 0, tot, 1.0), 1.0)


def opposite_lobe(diff: np.ndarray, sigma: np.ndarray, bad: np.ndarray | None, x: np.ndarray, y: np.ndarray,
                  sign: np.ndarray, flux: np.ndarray, fwhm_px: float, beta: float | None = None,
                  noise_scale_: float = 1.0, radii: tuple[float, ...] = (1.0, 1.5), npts: int = 8
                  ) -> tuple[np.ndarray, np.ndarray]:
    """The strongest lobe of the opposite sign beside each detection.

    PSF-weighted fluxes are measured at ``npts`` points on circles of ``radii`` FWHM around
    the detection; the most opposite one (``-sign x flux``) is its lobe. A misregistered or
    moving star (a proper motion between the reference's epoch and the science's), or a
    star's wing residual, leaves a positive and a negative lobe of similar strength side by
    side; a transient has none.

    Returns
    -------
    ratio : float array
        Opposite lobe over the detection's own PSF-weighted flux (both taken with the
        detection's sign; about 0 or below for a point source).
    snr : float array
        Significance of that lobe.
    """
    x = np.atleast_1d(np.asarray(x, float))
    y = np.atleast_1d(np.asarray(y, float))
    n = len(x)
    if n == 0:
        return np.zeros(0), np.zeros(0)
    best = np.full(n, -np.inf)
    best_err = np.ones(n)
    sg = np.asarray(sign, float)
    for k, rr in enumerate(radii):
        ang = (np.arange(npts) + 0.5 * (k % 2)) * 2 * np.pi / npts
        ox, oy = rr * fwhm_px * np.cos(ang), rr * fwhm_px * np.sin(ang)
        fit = forced_psf(diff, sigma, (x[:, None] + ox[None, :]).ravel(), (y[:, None] + oy[None, :]).ravel(),
                         fwhm_px, bad, beta)
        opp = -(fit.flux.reshape(n, npts) * sg[:, None])
        err = (fit.err * noise_scale_).reshape(n, npts)
        opp = np.where(np.isfinite(opp) & np.isfinite(err), opp, -np.inf)
        j = np.argmax(opp, axis=1)
        o = opp[np.arange(n), j]
        better = o > best
        best = np.where(better, o, best)
        best_err = np.where(better, err[np.arange(n), j], best_err)
    own = np.abs(np.asarray(flux, float))
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.where(np.isfinite(best) & (own > 0), best / own, 0.0)
        snr = np.where(np.isfinite(best), best / best_err, 0.0)
    return ratio, snr


def moving_star_flag(ra: np.ndarray, dec: np.ndarray, star_ra: np.ndarray, star_dec: np.ndarray,
                     star_ra_ref: np.ndarray, star_dec_ref: np.ndarray, radius_arcsec: float,
                     min_shift_arcsec: float = 0.1) -> np.ndarray:
    """True for detections at a catalogue star that moved between the reference's epoch and
    the science's (proper motion): a star that moved by ``min_shift_arcsec`` or more leaves a
    positive and a negative lobe, within ``radius_arcsec`` of the segment between its two
    positions. (Positions in deg; ``star_*`` at the science epoch, ``star_*_ref`` at the
    reference's.)"""
    ra = np.atleast_1d(np.asarray(ra, float))
    dec = np.atleast_1d(np.asarray(dec, float))
    out = np.zeros(len(ra), bool)
    if len(ra) == 0 or len(star_ra) == 0:
        return out
    cosd = np.cos(np.deg2rad(np.nanmedian(dec)))
    # tangent-plane offsets (arcsec) about the detections' mean position
    ra0, dec0 = float(np.nanmedian(ra)), float(np.nanmedian(dec))

    def xy(a, d):
        return (((np.asarray(a, float) - ra0 + 180.0) % 360.0 - 180.0) * cosd * 3600.0,
                (np.asarray(d, float) - dec0) * 3600.0)

    ax, ay = xy(star_ra_ref, star_dec_ref)
    bx, by = xy(star_ra, star_dec)
    shift = np.hypot(bx - ax, by - ay)
    moved = np.isfinite(shift) & (shift >= min_shift_arcsec)
    if not moved.any():
        return out
    ax, ay, bx, by = ax[moved], ay[moved], bx[moved], by[moved]
    px, py = xy(ra, dec)
    from scipy.spatial import cKDTree

    mx, my = 0.5 * (ax + bx), 0.5 * (ay + by)
    half = 0.5 * np.hypot(bx - ax, by - ay)
    tree = cKDTree(np.column_stack([mx, my]))
    for i, nb in enumerate(tree.query_ball_point(np.column_stack([px, py]), radius_arcsec + float(half.max()))):
        if not nb:
            continue
        nb = np.asarray(nb)
        vx, vy = bx[nb] - ax[nb], by[nb] - ay[nb]
        l2 = np.maximum(vx * vx + vy * vy, 1e-12)
        t = np.clip(((px[i] - ax[nb]) * vx + (py[i] - ay[nb]) * vy) / l2, 0.0, 1.0)
        d = np.hypot(px[i] - (ax[nb] + t * vx), py[i] - (ay[nb] + t * vy))
        out[i] = bool(np.any(d <= radius_arcsec))
    return out


def edge_flag(x: np.ndarray, y: np.ndarray, nx: int, ny: int, fraction: float, min_px: float) -> np.ndarray:
    """True within ``max(fraction x size, min_px)`` of the border (0-based positions)."""
    mx = max(fraction * nx, min_px)
    my = max(fraction * ny, min_px)
    return (x < mx) | (x > nx - 1 - mx) | (y < my) | (y > ny - 1 - my)


def opposite_counterpart(x: np.ndarray, y: np.ndarray, sign: np.ndarray, radius_px: float) -> np.ndarray:
    """True where a detection of the opposite sign lies within ``radius_px``."""
    from scipy.spatial import cKDTree

    out = np.zeros(len(x), bool)
    for sgn in (1, -1):
        me = np.flatnonzero(sign == sgn)
        other = np.flatnonzero(sign == -sgn)
        if len(me) == 0 or len(other) == 0:
            continue
        tree = cKDTree(np.column_stack([x[other], y[other]]))
        d, _ = tree.query(np.column_stack([x[me], y[me]]), k=1, distance_upper_bound=radius_px)
        out[me] = np.isfinite(d)
    return out


# ----------------------------------------------------------------------- flags
def vetting_flags(cat: dict[str, np.ndarray], *, seeing_arcsec: float, peeing_px: float, ellip: float,
                  pixscale: float, nx: int, ny: int, params: TransientParams, conc_star: float | None,
                  conc_mad: float | None) -> dict[str, np.ndarray]:
    """The flag columns from the per-detection measurements in ``cat``.

    ``cat`` holds arrays: ``x``, ``y`` (0-based), ``sign``, ``snr_psf``, ``ELLIPTICITY``,
    ``FWHM_IMAGE``, ``FLAGS``, ``BACKGROUND``, ``sigma_local``, ``conc``, ``conc_err``,
    ``dipole_frac``, ``masked``, ``in_footprint``, ``ref_min_sig``.
    """
    n = len(cat["x"])
    f: dict[str, np.ndarray] = {}
    f["flag_inv_diff"] = opposite_counterpart(cat["x"], cat["y"], cat["sign"], seeing_arcsec / pixscale)
    f["flag_inv_ref"] = (cat["sign"] > 0) & (cat["ref_min_sig"] < -5.0)
    f["flag_edge"] = edge_flag(cat["x"], cat["y"], nx, ny, params.edge_fraction, 2 * peeing_px)
    with np.errstate(invalid="ignore", divide="ignore"):
        smin = np.where(np.asarray(cat["sign"]) < 0, params.snr_min_negative, params.snr_min)
        if "peak_only" in cat:        # no shape measured: the shape vetting cannot apply
            smin = np.where(np.asarray(cat["peak_only"], bool), np.maximum(smin, 1.5 * params.snr_min), smin)
        f["flag_faint"] = ~(cat["snr_psf"] >= smin)
        el = np.asarray(cat["ELLIPTICITY"], float)
        snr = np.abs(np.asarray(cat["snr_psf"], float))
        noise_allow = 2.5 / np.where(snr > 0, snr, np.inf)          # shape noise of faint sources
        f["flag_ellip"] = (el / max(ellip, 0.01) > 5) & (el > 0.3 + noise_allow)
        f["flag_sexflags"] = np.asarray(cat["FLAGS"]) > 4
        rs = np.asarray(cat["FWHM_IMAGE"], float) / peeing_px
        f["flag_seeing"] = (rs > 3 * (1 + noise_allow)) | (rs < 0.5)
        f["flag_background"] = np.abs(cat["BACKGROUND"]) > 2 * cat["sigma_local"]
        if conc_star is not None and np.isfinite(conc_star):
            tol = np.maximum(max(10 * (conc_mad or 0.0), 0.25), 5 * np.nan_to_num(cat["conc_err"], nan=np.inf))
            f["flag_concentration"] = np.nan_to_num(np.abs(cat["conc"] - conc_star), nan=0.0) > tol
        else:
            f["flag_concentration"] = np.zeros(n, bool)
    f["flag_dipole"] = cat["dipole_frac"] > 0.3
    if "lobe_ratio" in cat:
        f["flag_dipole"] |= (np.asarray(cat["lobe_ratio"]) > 0.5) & (np.asarray(cat["lobe_snr"]) > 3.0)
    f["flag_masked"] = np.asarray(cat["masked"], bool)
    f["flag_footprint"] = ~np.asarray(cat["in_footprint"], bool)
    f["flag_pm_star"] = np.asarray(cat.get("pm_star", np.zeros(n)), bool)
    f["flag_star_residual"] = np.asarray(cat.get("star_other", np.zeros(n)), float) > 0.5
    return f


def candidates(flags: dict[str, np.ndarray], moving: np.ndarray, rb: np.ndarray, rb_min: float,
               snr: np.ndarray | None = None, sign: np.ndarray | None = None,
               params: TransientParams | None = None, rb_shape: np.ndarray | None = None) -> np.ndarray:
    """Which detections are candidates.

    With ``snr`` and ``sign`` (the trained vetting score in ``rb``): no hard flag
    (:data:`HARD_FLAGS`), S/N at least ``snr_min`` (``snr_min_negative`` for negative
    detections), ``rb >= rb_min`` (``rb_min_high_snr`` from S/N ``high_snr`` on) and
    ``rb_shape >= rb_shape_min``; a moving object needs no hard flag only. Without them
    (v1's rule): no veto flag (shape flags waived for moving objects) and ``rb >= rb_min``
    (waived for moving objects too).
    """
    n = len(moving)
    veto = np.zeros(n, bool)
    if snr is not None and sign is not None:
        p = params or TransientParams()
        for name in HARD_FLAGS:
            if name in flags:
                veto |= flags[name]
        floor = np.where(np.asarray(sign) > 0, p.snr_min, p.snr_min_negative)
        snr = np.nan_to_num(np.asarray(snr, float))
        ok = (rb >= np.where(snr >= p.high_snr, min(p.rb_min_high_snr, rb_min), rb_min)) & (snr >= floor)
        if rb_shape is not None:
            ok &= np.asarray(rb_shape) >= p.rb_shape_min
        return ~veto & (ok | moving)
    for name, f in flags.items():
        if name in SHAPE_FLAGS:
            veto |= f & ~moving
        else:
            veto |= f
    return ~veto & ((rb >= rb_min) | moving)


def labels(sign: np.ndarray, ref_snr: np.ndarray, moving: np.ndarray) -> np.ndarray:
    """``moving``, ``fading`` (negative), ``brightening`` (positive with a reference source at
    S/N >= 3) or ``new``."""
    out = np.where(sign < 0, "fading", np.where(ref_snr >= 3, "brightening", "new")).astype("<U11")
    out[moving] = "moving"
    return out


# ----------------------------------------------------------------------- moving objects
@dataclass
class SingleDetections:
    """Detections of one single frame of the visit that have no reference-catalogue match."""

    t: float          # mid-exposure (days, any origin common to the visit)
    ra: np.ndarray
    dec: np.ndarray
    flux: np.ndarray | None = None   # calibrated flux (microjansky), APER_1
    snr: np.ndarray | None = None    # its S/N


def visit_span_hours(singles: list[SingleDetections]) -> float:
    """Time the visit's exposures cover (hours): from the first frame's mid-time to the last's,
    stretched by n / (n - 1) for the half exposures at both ends (equal exposures, evenly
    spaced); 0 with fewer than two frames."""
    t = sorted(s.t for s in singles)
    if len(t) < 2:
        return 0.0
    return (t[-1] - t[0]) * 24.0 * len(t) / (len(t) - 1)


def static_in_singles(ra: np.ndarray, dec: np.ndarray, singles: list[SingleDetections], radius_arcsec: float,
                      snr_min: float = 5.0) -> np.ndarray:
    """Number of the visit's single frames that show an unmatched source (S/N >= ``snr_min``)
    within ``radius_arcsec`` of each position: a source that stays put."""
    count = np.zeros(len(ra), int)
    cosd = np.cos(np.deg2rad(dec))
    for s in singles:
        if not len(s.ra):
            continue
        ok = np.ones(len(s.ra), bool) if s.snr is None else np.asarray(s.snr) >= snr_min
        for i in range(len(ra)):
            d = np.hypot((s.ra[ok] - ra[i]) * cosd[i], s.dec[ok] - dec[i]) * 3600.0
            count[i] += int(d.size > 0 and d.min() <= radius_arcsec)
    return count


def _fit_motion(p: np.ndarray, span: float, min_motion_arcsec: float, seeing_arcsec: float
                ) -> tuple[float, float] | None:
    """Straight-line motion through points ``(t - t_mean [days], east, north [arcsec], sigma)``
    (see :func:`moving_objects` for the tests); (rate arcsec/h, PA deg) or None."""
    t = p[:, 0] * 24.0
    if t.max() - t.min() <= 0:
        return None
    a = np.column_stack([np.ones_like(t), t])
    coef_e, *_ = np.linalg.lstsq(a, p[:, 1], rcond=None)
    coef_n, *_ = np.linalg.lstsq(a, p[:, 2], rcond=None)
    resid = np.hypot(p[:, 1] - a @ coef_e, p[:, 2] - a @ coef_n)
    v = np.hypot(coef_e[1], coef_n[1])
    # error of the path length: sigma_pos x span / sqrt(sum (t - mean t)^2) per axis
    sig_path = float(np.median(p[:, 3])) * (t.max() - t.min()) / np.sqrt(((t - t.mean()) ** 2).sum())
    sig_pos = float(np.median(p[:, 3]))
    tol = max(0.5, 0.35 * seeing_arcsec)
    # two points fit any line: then the line must pass through the detection as closely as
    # their own errors allow
    through = np.hypot(coef_e[0], coef_n[0]) < (max(tol, 3 * sig_pos) if len(p) >= 3 else max(0.5, 3 * sig_pos))
    if v * span >= max(min_motion_arcsec, 6 * sig_path) and np.sqrt(np.mean(resid**2)) < tol and through:
        return float(v), float(np.rad2deg(np.arctan2(coef_e[1], coef_n[1])) % 360.0)
    return None


def moving_objects(ra: np.ndarray, dec: np.ndarray, singles: list[SingleDetections], min_motion_arcsec: float,
                   search_arcsec: float, flux: np.ndarray | None = None, sign: np.ndarray | None = None,
                   snr_min: float = 5.0, seeing_arcsec: float = 2.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Which detections move across the visit's single frames.

    For every positive detection, the unmatched single-frame sources within ``search_arcsec``
    with S/N >= ``snr_min`` and (when fluxes are given) a flux within a factor 3 of the
    detection's are taken, one per frame (the nearest); a straight line in time is fitted to
    their positions (all of them; failing that, all but one, at least two: a single frame's
    centroid may be off, a source merged with a star or a trail cut in two; with two points the
    line must pass within max(0.5", 3 sigma) of the detection). With three or more frames in
    the visit, a detection is moving when the fitted path is
    longer than ``min_motion_arcsec`` and than 6 sigma of its own error over the visit (a
    position error of SEEING / (S/N) per axis and frame, conservative for isophotal centroids),
    the positions lie on the line (rms < max(0.5 arcsec, 0.35 SEEING)) and the line passes
    through the detection at the mean time (within max(0.5 arcsec, 3 sigma, 0.35 SEEING): the
    stack shows the mean position). The SEEING terms allow for the single frames' isophotal
    centroids of a trailed source, which a masked column or the trail itself shifts by up to a
    third of the seeing.

    Returns
    -------
    moving : bool array
    rate : float array
        Motion (arcsec/hour), NaN where not measured.
    pa : float array
        Direction of motion (deg from north through east), NaN where not measured.
    """
    n = len(ra)
    moving = np.zeros(n, bool)
    rate = np.full(n, np.nan)
    pa = np.full(n, np.nan)
    usable = [s for s in singles if len(s.ra)]
    if n == 0 or len(usable) < 3:
        return moving, rate, pa
    tmean = np.mean([s.t for s in usable])
    span = (max(s.t for s in usable) - min(s.t for s in usable)) * 24.0  # hours
    if span <= 0:
        return moving, rate, pa
    cosd = np.cos(np.deg2rad(dec))
    for i in range(n):
        if sign is not None and sign[i] <= 0:
            continue
        pts = []
        for s in usable:
            de = (s.ra - ra[i]) * cosd[i] * 3600.0
            dn = (s.dec - dec[i]) * 3600.0
            d = np.hypot(de, dn)
            ok = d <= search_arcsec
            if s.snr is not None:
                ok &= np.asarray(s.snr) >= snr_min
            if s.flux is not None and flux is not None and np.isfinite(flux[i]) and flux[i] > 0:
                with np.errstate(invalid="ignore", divide="ignore"):
                    ratio = np.asarray(s.flux) / flux[i]
                ok &= (ratio > 1 / 3) & (ratio < 3)
            if not ok.any():
                continue
            j = int(np.flatnonzero(ok)[np.argmin(d[ok])])
            snr_j = float(s.snr[j]) if s.snr is not None else 10.0
            pts.append((s.t - tmean, de[j], dn[j], seeing_arcsec / max(snr_j, 1.0)))
        if len(pts) < 2:
            continue
        p_all = np.array(pts)
        # all the frames' points; failing that, all but one (a single frame's centroid can be
        # off: a source merged with a star, or a trail cut in two), never fewer than two
        subsets = [np.arange(len(p_all))]
        if len(p_all) >= 3:
            subsets += [np.delete(np.arange(len(p_all)), k) for k in range(len(p_all))]
        for sub in subsets:
            fit = _fit_motion(p_all[sub], span, min_motion_arcsec, seeing_arcsec)
            left = np.setdiff1d(np.arange(len(p_all)), sub)
            # a frame left out that shows a source right at the detection: a static source
            if fit is not None and any(np.hypot(p_all[k, 1], p_all[k, 2]) < max(0.5, 3 * p_all[k, 3])
                                       for k in left):
                fit = None
            if fit is not None:
                moving[i] = True
                rate[i], pa[i] = fit
                break
    return moving, rate, pa


# ----------------------------------------------------------------------- calibration of the S/N
def concentration(image: np.ndarray, x: np.ndarray, y: np.ndarray, r_small: float, r_large: float,
                  sigma: np.ndarray | None = None, bad: np.ndarray | None = None,
                  sign: np.ndarray | float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """``-2.5 log10(F(r_small) / F(r_large))`` (v1: MAG_APER_3 - MAG_APER_5, the 3" and 10"
    apertures) by forced aperture photometry of ``sign x image``, and its error (NaN where a
    flux is not positive)."""
    small = forced_aperture(image, x, y, r_small, sigma=sigma, bad=bad)
    large = forced_aperture(image, x, y, r_large, sigma=sigma, bad=bad)
    fs, fl = small.flux * sign, large.flux * sign
    with np.errstate(invalid="ignore", divide="ignore"):
        ok = (fs > 0) & (fl > 0)
        c = np.where(ok, -2.5 * np.log10(np.where(ok, fs / fl, 1.0)), np.nan)
        err = 1.0857 * np.hypot(small.err / fs, large.err / fl)
    return c, np.where(ok, err, np.nan)


def random_positions(bad: np.ndarray, n: int, margin: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``n`` random 0-based positions on good pixels at least ``margin`` px from the border."""
    ny, nx = bad.shape
    if nx <= 2 * margin or ny <= 2 * margin:
        return np.zeros(0), np.zeros(0)
    rng = np.random.default_rng(seed)
    x = rng.integers(margin, nx - margin, 3 * n)
    y = rng.integers(margin, ny - margin, 3 * n)
    ok = ~np.asarray(bad)[y, x]
    return x[ok][:n].astype(float), y[ok][:n].astype(float)


def noise_scale(values: np.ndarray) -> float:
    """Robust standard deviation (1.4826 MAD) of S/N values measured at random positions: 1 when
    the noise image describes the difference's noise at the scale of the measurement; more when
    it is underestimated (e.g. correlated noise after a convolution), less when overestimated."""
    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    if len(v) < 50:
        return 1.0
    s = float(1.4826 * np.median(np.abs(v - np.median(v))))
    return s if s > 0 else 1.0


def residual_level(diff_flux: np.ndarray, ref_flux: np.ndarray) -> float:
    """Subtraction residual at stars, as a fraction of their reference flux:
    ``sqrt(median^2 + (1.4826 MAD)^2)`` of ``diff_flux / ref_flux`` (0 with fewer than 10 stars).

    Imperfect PSF matching, flux scaling or registration leaves residuals that grow with the
    star's flux; this level, measured on the image's own stars, enters the noise of every
    detection as ``level x reference flux under it`` (:func:`effective_snr`).
    """
    d = np.asarray(diff_flux, float)
    r = np.asarray(ref_flux, float)
    ok = np.isfinite(d) & np.isfinite(r) & (r > 0)
    if ok.sum() < 10:
        return 0.0
    q = d[ok] / r[ok]
    med = float(np.median(q))
    mad = float(1.4826 * np.median(np.abs(q - med)))
    return float(np.hypot(med, mad))


def wing_residual_level(diff: np.ndarray, sigma: np.ndarray, bad: np.ndarray | None, x: np.ndarray, y: np.ndarray,
                        flux: np.ndarray, fwhm_px: float, beta: float | None = None, noise_scale_: float = 1.0) -> float:
    """Residual lobes beside stars, as a fraction of their flux, at 1.5 FWHM from them.

    A kernel that does not match the PSF's shape everywhere leaves positive and negative lobes
    beside each star. At 1.5 FWHM from each star, in 8 directions, the PSF-weighted flux of D
    is measured; per star, the largest lobe less twice its noise (so that noise is not taken
    for a residual), over the star's flux; the level is the median over the stars (0 with
    fewer than 10 stars).
    """
    x = np.asarray(x, float)
    y = np.asarray(y, float)
    f = np.asarray(flux, float)
    if len(x) < 10:
        return 0.0
    ang = np.arange(8) * np.pi / 4
    r = 1.5 * fwhm_px
    xs = (x[:, None] + r * np.cos(ang)[None, :]).ravel()
    ys = (y[:, None] + r * np.sin(ang)[None, :]).ravel()
    fit = forced_psf(diff, sigma, xs, ys, fwhm_px, bad, beta)
    excess = np.clip(np.abs(fit.flux) - 2 * fit.err * noise_scale_, 0, None).reshape(len(x), 8)
    with np.errstate(invalid="ignore", divide="ignore"):
        q = np.nanmax(excess, axis=1) / f
    q = q[np.isfinite(q) & (f > 0)]
    return float(np.median(q)) if len(q) >= 10 else 0.0


def nearby_flux(x: np.ndarray, y: np.ndarray, sx: np.ndarray, sy: np.ndarray, sflux: np.ndarray, fwhm_px: float,
                beta: float | None = None, r_in_fwhm: float = 0.5, r_out_fwhm: float = 5.0) -> np.ndarray:
    """Flux of the stars (sx, sy, sflux) around each position, each weighted by its PSF at the
    distance relative to the PSF at 1.5 FWHM (the wing residual scales with the star's light
    there); stars closer than ``r_in_fwhm`` (the source itself) or farther than ``r_out_fwhm``
    FWHM are left out."""
    from scipy.spatial import cKDTree

    out = np.zeros(len(x))
    if len(x) == 0 or len(sx) == 0:
        return out
    p0 = psf_model(np.array([1.5 * fwhm_px]), np.zeros(1), fwhm_px, beta)[0]
    tree = cKDTree(np.column_stack([sx, sy]))
    for i, nb in enumerate(tree.query_ball_point(np.column_stack([x, y]), r_out_fwhm * fwhm_px)):
        if not nb:
            continue
        nb = np.asarray(nb)
        d = np.hypot(sx[nb] - x[i], sy[nb] - y[i])
        keep = d >= r_in_fwhm * fwhm_px
        w = psf_model(d[keep], np.zeros(keep.sum()), fwhm_px, beta) / p0
        out[i] = float((np.clip(sflux[nb][keep], 0, None) * w).sum())
    return out


def local_residual(diff: np.ndarray, sigma: np.ndarray, bad: np.ndarray | None, x: np.ndarray, y: np.ndarray,
                   fwhm_px: float, beta: float | None = None, noise_scale_: float = 1.0,
                   radii: tuple[float, ...] = (2.0, 3.0), npts: int = 12,
                   avoid: tuple[np.ndarray, np.ndarray] | None = None,
                   avoid_fwhm: float = 1.5) -> tuple[np.ndarray, np.ndarray]:
    """Structure of the difference around each detection, beyond its noise.

    PSF-weighted fluxes (:func:`forced_psf`) are measured at ``npts`` points on rings of
    ``radii`` FWHM around each detection; points that lost much of their PSF to masked pixels
    (error above 1.5 times the ring's median) are left out, and each ring's weighted mean is
    taken off (the detection's own light is the same all round a ring, whatever the exact
    PSF). Points within ``avoid_fwhm`` FWHM of the positions ``avoid`` (the cores of stars,
    whose own residual is counted apart, from their flux) are left out too.
    On clean sky what is left is noise: ``chi2 = sum(z^2) / dof`` with ``z`` the
    deviations in units of their errors is about 1. Subtraction residuals (the halo of a
    badly matched bright star, the edge of a masked area, a background step) make it larger.
    The residual level is ``e sqrt(max(chi2 - (1 + 2 sqrt(2 / dof)), 0))`` with ``e`` the
    median error: only an excess beyond twice the scatter that noise alone gives counts.

    Returns
    -------
    resid : float array
        Residual level (difference units, on the scale of a PSF-weighted flux), 0 where none
        or where fewer than 6 points were usable.
    chi : float array
        ``sqrt(chi2)`` (about 1 on clean sky), NaN with fewer than 6 usable points.
    """
    x = np.atleast_1d(np.asarray(x, float))
    y = np.atleast_1d(np.asarray(y, float))
    n = len(x)
    if n == 0:
        return np.zeros(0), np.zeros(0)
    chi2 = np.zeros(n)
    dof = np.zeros(n)
    errs = []
    tree = None
    if avoid is not None and len(avoid[0]):
        from scipy.spatial import cKDTree

        tree = cKDTree(np.column_stack([np.asarray(avoid[0], float), np.asarray(avoid[1], float)]))
    for k, rr in enumerate(radii):
        ang = (np.arange(npts) + 0.5 * (k % 2)) * 2 * np.pi / npts
        ox, oy = rr * fwhm_px * np.cos(ang), rr * fwhm_px * np.sin(ang)
        fit = forced_psf(diff, sigma, (x[:, None] + ox[None, :]).ravel(), (y[:, None] + oy[None, :]).ravel(),
                         fwhm_px, bad, beta)
        f = fit.flux.reshape(n, npts)
        e = (fit.err * noise_scale_).reshape(n, npts)
        ok = np.isfinite(f) & np.isfinite(e) & (e > 0)
        if tree is not None:
            dstar, _ = tree.query(np.column_stack([(x[:, None] + ox[None, :]).ravel(),
                                                   (y[:, None] + oy[None, :]).ravel()]), k=1)
            ok &= dstar.reshape(n, npts) > avoid_fwhm * fwhm_px
        with np.errstate(invalid="ignore", divide="ignore"):
            emed = np.nanmedian(np.where(ok, e, np.nan), axis=1)
            ok &= e <= 1.5 * emed[:, None]
            w = np.where(ok, 1.0 / np.where(ok, e, 1.0) ** 2, 0.0)
            mean = (w * np.where(ok, f, 0.0)).sum(axis=1) / np.where(w.sum(axis=1) > 0, w.sum(axis=1), 1.0)
            z2 = np.where(ok, (f - mean[:, None]) ** 2 * w, 0.0).sum(axis=1)
        c = ok.sum(axis=1)
        use = c >= 3
        chi2 += np.where(use, z2, 0.0)
        dof += np.where(use, c - 1, 0)
        errs.append(np.where(ok, e, np.nan))
    with np.errstate(invalid="ignore", divide="ignore"):
        emed = np.nanmedian(np.hstack(errs), axis=1)
        red = chi2 / np.maximum(dof, 1)
        allow = 1.0 + 2.0 * np.sqrt(2.0 / np.maximum(dof, 1))
        resid = emed * np.sqrt(np.clip(red - allow, 0, None))
    good = (dof >= 6) & np.isfinite(resid)
    return np.where(good, resid, 0.0), np.where(good, np.sqrt(red), np.nan)


def star_ring_residual(diff: np.ndarray, sigma: np.ndarray, bad: np.ndarray | None, x: np.ndarray, y: np.ndarray,
                       sx: np.ndarray, sy: np.ndarray, sflux: np.ndarray, fwhm_px: float, beta: float | None = None,
                       noise_scale_: float = 1.0, max_fwhm: float = 4.0, min_fwhm: float = 0.5,
                       flux: np.ndarray | None = None
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The residual a star leaves at a detection's distance from it, from the other azimuths.

    A kernel that does not match the PSF's wings leaves rings of one sign around every bright
    star (and lobes, where the PSFs differ in shape); a detection on such a ring is the star's
    residual, not a transient. For each detection between ``min_fwhm`` and ``max_fwhm`` FWHM
    from a star (the star with the most light there, ``sflux`` times the PSF at that
    distance), PSF-weighted fluxes are measured on the circle through the detection around
    the star, at points more than 1.5 FWHM from the detection (and with less than half of
    their information masked). Their weighted mean is the star's residual at that distance;
    their scatter beyond the noise (as in :func:`local_residual`) tells how far that mean
    describes the azimuth of the detection. With the detections' own PSF-weighted ``flux``,
    ``other`` tells whether the detection stands out among the star's residuals, measured
    at the detection's distance from the star (+-0.5 FWHM), more than 1.5 FWHM from the
    detection: the largest residual of the opposite sign beyond 3 sigma over the detection's
    flux, or the level of the detection's sign reached over 30 % of those points (a ring).

    Returns
    -------
    mean : float array
        The star's residual at the detection (PSF-weighted flux, difference units), 0 where no
        star is near or fewer than 4 points were usable.
    scatter : float array
        Scatter of the residual around the circle beyond the noise, plus the error of the
        mean (0 where no star).
    star : int array
        Index of the star used (-1 where none).
    other : float array
        Largest significant (> 3 sigma) residual of the star away from the detection over the
        detection's flux (0 where none, or without ``flux``).
    """
    x = np.atleast_1d(np.asarray(x, float))
    y = np.atleast_1d(np.asarray(y, float))
    n = len(x)
    mean = np.zeros(n)
    scatter = np.zeros(n)
    star = np.full(n, -1)
    other = np.zeros(n)
    if n == 0 or len(sx) == 0:
        return mean, scatter, star, other
    from scipy.spatial import cKDTree

    sx = np.asarray(sx, float)
    sy = np.asarray(sy, float)
    sflux = np.clip(np.nan_to_num(np.asarray(sflux, float)), 0, None)
    tree = cKDTree(np.column_stack([sx, sy]))
    p0 = psf_model(np.zeros(1), np.zeros(1), fwhm_px, beta)[0]
    for i, nb in enumerate(tree.query_ball_point(np.column_stack([x, y]), max_fwhm * fwhm_px)):
        if not nb:
            continue
        nb = np.asarray(nb)
        d = np.hypot(sx[nb] - x[i], sy[nb] - y[i])
        keep = d > min_fwhm * fwhm_px
        if not keep.any():
            continue
        nb, d = nb[keep], d[keep]
        light = sflux[nb] * psf_model(d, np.zeros(len(d)), fwhm_px, beta) / p0
        k = int(np.argmax(light))
        j, dj = int(nb[k]), float(d[k])
        npts = int(np.clip(np.ceil(2 * np.pi * dj / (0.75 * fwhm_px)), 8, 24))
        theta0 = np.arctan2(y[i] - sy[j], x[i] - sx[j])
        ang = theta0 + 2 * np.pi * np.arange(1, npts) / npts
        px = sx[j] + dj * np.cos(ang)
        py = sy[j] + dj * np.sin(ang)
        far = np.hypot(px - x[i], py - y[i]) > 1.5 * fwhm_px
        if far.sum() < 4:
            continue
        fit = forced_psf(diff, sigma, px[far], py[far], fwhm_px, bad, beta)
        f, e = fit.flux, fit.err * noise_scale_
        ok = np.isfinite(f) & np.isfinite(e) & (e > 0)
        if ok.sum() < 4:
            continue
        emed = float(np.median(e[ok]))
        ok &= e <= 1.5 * emed
        c = int(ok.sum())
        if c < 4:
            continue
        w = 1.0 / e[ok] ** 2
        m = float((w * f[ok]).sum() / w.sum())
        chi2 = float(((f[ok] - m) ** 2 * w).sum()) / (c - 1)
        allow = 1.0 + 2.0 * np.sqrt(2.0 / (c - 1))
        excess = emed * np.sqrt(max(chi2 - allow, 0.0))
        mean[i] = m
        scatter[i] = np.hypot(excess, np.sqrt(1.0 / w.sum()))
        star[i] = j
        if flux is not None and np.isfinite(flux[i]) and flux[i] != 0:
            # the star's residual at about the detection's distance from it (+-0.5 FWHM, not
            # nearer than 0.75 FWHM), away from the detection
            radii = np.unique(np.clip(dj + np.array([-0.5, 0.0, 0.5]) * fwhm_px, 0.75 * fwhm_px, None))
            rr = np.repeat(radii, 16)
            aa = np.tile(np.arange(16) * np.pi / 8, len(radii))
            qx, qy = sx[j] + rr * np.cos(aa), sy[j] + rr * np.sin(aa)
            away = np.hypot(qx - x[i], qy - y[i]) > 1.5 * fwhm_px
            fa = forced_psf(diff, sigma, qx[away], qy[away], fwhm_px, bad, beta)
            ea = fa.err * noise_scale_
            oka = np.isfinite(fa.flux) & np.isfinite(ea) & (ea > 0)
            if oka.any():
                oka &= ea <= 1.5 * float(np.median(ea[oka]))
                own = float(flux[i])
                rel = fa.flux[oka] / own                  # > 0: the detection's sign
                sig = np.abs(fa.flux[oka]) > 3 * ea[oka]
                # a lobe of the opposite sign, or the detection's sign over much of the circle
                # (a ring); one more source of the same sign nearby is no residual pattern
                opp = float(np.max(-rel[sig], initial=0.0))
                same = np.sort(rel[sig & (rel > 0)])[::-1]
                ring = float(same[int(0.3 * oka.sum())]) if same.size > 0.3 * oka.sum() else 0.0
                other[i] = max(opp, ring)
    return mean, scatter, star, other


def effective_snr(flux: np.ndarray, err: np.ndarray, ref_flux: np.ndarray | None, level: float,
                  near_flux: np.ndarray | None = None, wing_level: float = 0.0,
                  local: np.ndarray | None = None) -> np.ndarray:
    """``flux / sqrt(err^2 + (level x max(ref_flux, 0))^2 + (wing_level x near_flux)^2 + local^2)``:
    the S/N with the subtraction residuals of the reference source under the detection, of the
    stars beside it and of the difference around it (:func:`local_residual`) counted as noise."""
    flux = np.asarray(flux, float)
    var = np.asarray(err, float) ** 2
    if ref_flux is not None and level > 0:
        var = var + (level * np.clip(np.nan_to_num(np.asarray(ref_flux, float)), 0, None)) ** 2
    if near_flux is not None and wing_level > 0:
        var = var + (wing_level * np.asarray(near_flux, float)) ** 2
    if local is not None:
        var = var + np.nan_to_num(np.asarray(local, float)) ** 2
    return flux / np.sqrt(var)


# ----------------------------------------------------------------------- matched-filter peaks
def significance_map(diff: np.ndarray, sigma: np.ndarray, bad: np.ndarray, fwhm_px: float) -> np.ndarray:
    """S/N of a point source at every pixel (matched filter with a Gaussian of the seeing):
    ``(D/s^2 * P) / sqrt((1/s^2) * P^2)`` with masked pixels given no weight (float32)."""
    from scipy.ndimage import gaussian_filter

    sg = fwhm_px / 2.3548200450309493
    with np.errstate(invalid="ignore", divide="ignore"):
        w = np.where(bad | ~np.isfinite(sigma) | (sigma <= 0), 0.0, 1.0 / np.where(sigma > 0, sigma, 1.0) ** 2)
    w = w.astype(np.float32)
    num = gaussian_filter(np.where(w > 0, diff, 0.0).astype(np.float32) * w, sg, truncate=3.0)
    den = gaussian_filter(w, sg / np.sqrt(2.0), truncate=3.0) / np.float32(4 * np.pi * sg * sg)
    del w
    with np.errstate(invalid="ignore", divide="ignore"):
        s = np.where(den > 0, num / np.sqrt(den), 0.0).astype(np.float32)
    return s


def peak_detections(smap: np.ndarray, threshold: float, fwhm_px: float,
                    bad: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Local extrema of the significance map beyond ``threshold`` (either sign), at least one
    FWHM apart, with sub-pixel positions from a parabola through the peak.

    Returns 0-based x, y and the sign (+1 / -1) of each peak.
    """
    from scipy.ndimage import maximum_filter

    size = 2 * int(round(fwhm_px)) + 1
    a = np.abs(smap)
    peaks = (a >= threshold) & (maximum_filter(a, size=size) == a)
    if bad is not None:
        peaks &= ~bad
    iy, ix = np.nonzero(peaks)
    ny, nx = smap.shape
    inner = (ix > 0) & (ix < nx - 1) & (iy > 0) & (iy < ny - 1)
    iy, ix = iy[inner], ix[inner]
    c = a[iy, ix]
    with np.errstate(invalid="ignore", divide="ignore"):
        dxn = (a[iy, ix + 1] - a[iy, ix - 1]) / (2 * (2 * c - a[iy, ix + 1] - a[iy, ix - 1]))
        dyn = (a[iy + 1, ix] - a[iy - 1, ix]) / (2 * (2 * c - a[iy + 1, ix] - a[iy - 1, ix]))
    dxn = np.clip(np.nan_to_num(dxn), -0.5, 0.5)
    dyn = np.clip(np.nan_to_num(dyn), -0.5, 0.5)
    return ix + dxn, iy + dyn, np.sign(smap[iy, ix]).astype(int)


# ----------------------------------------------------------------------- trails on the difference
def trail_fit(diff: np.ndarray, sigma: np.ndarray, bad: np.ndarray | None, x: float, y: float, fwhm_px: float,
              beta: float | None = None, max_length_px: float = 30.0, nsteps: int = 9
              ) -> tuple[float, float, float]:
    """Length (px), its 1-sigma error and position angle (rad, from +x) of a trail fitted at a
    detection of D (0-based x, y): the PSF (:func:`psf_model`) averaged along a segment of
    free centre, flux, length and angle, fitted by least squares to the unmasked pixels within
    2 FWHM + ``max_length_px`` / 2, weighted by ``sigma``. A moving object's stack is such a
    trail (the object moves through each exposure and between them); the reference does not
    hold it, so the difference shows it clean even where it crosses a star. NaNs when the fit
    fails."""
    from scipy.optimize import least_squares

    ny, nx = diff.shape
    h = int(np.ceil(2 * fwhm_px + max_length_px / 2))
    xi, yi = int(round(x)), int(round(y))
    if xi - h < 0 or yi - h < 0 or xi + h >= nx or yi + h >= ny:
        return np.nan, np.nan, np.nan
    sl = (slice(yi - h, yi + h + 1), slice(xi - h, xi + h + 1))
    d = np.asarray(diff[sl], float)
    s = np.asarray(sigma[sl], float)
    use = np.isfinite(d) & np.isfinite(s) & (s > 0)
    if bad is not None:
        use &= ~bad[sl]
    if use.sum() < 20:
        return np.nan, np.nan, np.nan
    gy, gx = np.mgrid[-h:h + 1, -h:h + 1]
    gx, gy = gx[use] + xi - x, gy[use] + yi - y
    d, s = d[use], s[use]
    tt = (np.arange(nsteps) + 0.5) / nsteps - 0.5     # the segment's midpoints: its second moment is L^2 / 12

    def model(p):
        x0, y0, f, ex, ey = p
        # the segment as a vector (ex, ey): smooth in both components through length 0
        px = x0 + tt[:, None] * ex
        py = y0 + tt[:, None] * ey
        return f * psf_model(gx[None, :] - px, gy[None, :] - py, fwhm_px, beta).mean(axis=0)

    p1 = psf_model(gx, gy, fwhm_px, beta)
    f0 = float(np.sum(d * p1) / np.sum(p1**2))
    # the starting segment along the light's own major axis
    w = np.clip(d, 0, None) * p1
    if w.sum() > 0:
        mxx, myy, mxy = (w * gx * gx).sum() / w.sum(), (w * gy * gy).sum() / w.sum(), (w * gx * gy).sum() / w.sum()
        ang = 0.5 * np.arctan2(2 * mxy, mxx - myy)
    else:
        ang = 0.0
    p0 = [0.0, 0.0, f0, fwhm_px * np.cos(ang), fwhm_px * np.sin(ang)]
    try:
        best = least_squares(lambda p: (model(p) - d) / s, p0, x_scale=[1, 1, max(abs(f0), 1.0), 1, 1],
                             bounds=([-fwhm_px, -fwhm_px, -np.inf, -max_length_px, -max_length_px],
                                     [fwhm_px, fwhm_px, np.inf, max_length_px, max_length_px]))
    except ValueError:
        return np.nan, np.nan, np.nan
    if not best.success:
        return np.nan, np.nan, np.nan
    ex, ey = best.x[3], best.x[4]
    length = float(np.hypot(ex, ey))
    try:
        cov = np.linalg.inv(best.jac.T @ best.jac) * max(2 * best.cost / max(len(d) - 5, 1), 1.0)
    except np.linalg.LinAlgError:
        return length, np.nan, float(np.arctan2(ey, ex))
    if length > 0:
        g = np.array([ex, ey]) / length
        err = float(np.sqrt(max(g @ cov[3:5, 3:5] @ g, 0.0)))
    else:
        err = float(np.sqrt(max(np.trace(cov[3:5, 3:5]) / 2, 0.0)))
    return length, err, float(np.arctan2(ey, ex))


def psf_trail_level(image: np.ndarray, sigma: np.ndarray, bad: np.ndarray | None, sx: np.ndarray, sy: np.ndarray,
                    sflux: np.ndarray, fwhm_px: float, beta: float | None = None, nmax: int = 12
                    ) -> tuple[float, float]:
    """The trail length (px) that :func:`trail_fit` finds on stars of ``image`` (an image with
    the difference's PSF): the PSF's own departure from the fitted model (ellipticity, another
    profile), which a static source of D shows too. Median and robust scatter over up to
    ``nmax`` isolated stars (no brighter neighbour within 4 FWHM), the brightest first;
    (0, 0) with fewer than 5."""
    from scipy.spatial import cKDTree

    if len(sx) < 5:
        return 0.0, 0.0
    tree = cKDTree(np.column_stack([sx, sy]))
    order = np.argsort(-np.nan_to_num(sflux))
    lengths = []
    for k in order:
        nb = [j for j in tree.query_ball_point([sx[k], sy[k]], 4 * fwhm_px) if j != k]
        if any(sflux[j] > 0.05 * sflux[k] for j in nb):
            continue
        length, err, _ = trail_fit(image, sigma, bad, float(sx[k]), float(sy[k]), fwhm_px, beta)
        if np.isfinite(length):
            lengths.append(length)
        if len(lengths) >= nmax:
            break
    if len(lengths) < 5:
        return 0.0, 0.0
    lengths = np.asarray(lengths)
    med = float(np.median(lengths))
    return med, float(1.4826 * np.median(np.abs(lengths - med)))


def trailed_objects(diff: np.ndarray, sigma: np.ndarray, bad: np.ndarray | None, x: np.ndarray, y: np.ndarray,
                    test: np.ndarray, fwhm_px: float, beta: float | None, psf_level: tuple[float, float],
                    min_length_px: float, nsigma: float = 5.0
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Detections (where ``test``) that are trails on D: a fitted length (:func:`trail_fit`)
    beyond the PSF's own (``psf_level``: median, scatter from :func:`psf_trail_level`) by
    ``nsigma`` times its error and 3 times the scatter, and at least ``min_length_px``.

    Returns (trailed, length px, angle rad from +x, significance (L - median) / error); NaN
    where not fitted."""
    n = len(x)
    trailed = np.zeros(n, bool)
    length = np.full(n, np.nan)
    angle = np.full(n, np.nan)
    signif = np.full(n, np.nan)
    med, scatter = psf_level
    for i in np.flatnonzero(test):
        L, err, th = trail_fit(diff, sigma, bad, float(x[i]), float(y[i]), fwhm_px, beta)
        length[i], angle[i] = L, th
        if np.isfinite(L) and np.isfinite(err) and err > 0:
            signif[i] = (L - med) / err
            trailed[i] = (L - med > max(nsigma * err, 3 * scatter)) and L >= min_length_px
    return trailed, length, angle, signif
