"""Photometry of a difference image and its transient products (v1-behaviour.md §9, §10).

:func:`search` does the work on arrays plus a scratch folder for Source Extractor:

1. Source Extractor on D and on -D with the difference's noise image (``MAP_RMS``) and mask
   (flag image), apertures from the science seeing (header ``SEEING``, carried over by the
   subtract stage), detection at ``detect_significance`` in units of the filtered noise.
2. The positive catalogue calibrated with the science zero points of the header ->
   ``<stem>.subt.phot.cat`` (v1 §9).
3. Every detection of either sign measured and vetted (:mod:`gppy_phot.transients`), scored
   (:mod:`gppy_phot.realbogus`), labelled, and moving objects found from the visit's single
   frames.

:func:`difference_products` is the service's side: read the files named by the ``diff.done``
event, call :func:`search`, write the catalogues, the region file, the flag summary and the
candidates' cutouts, and update the difference header (v1 §9: AUTHOR PHOTIME JD MJD SKYSIG
SKYVAL and the apertures).
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import MaskedColumn, Table
from astropy.time import Time
from astropy.wcs import WCS
from astropy.wcs.utils import proj_plane_pixel_scales

from gppy.fitsio import BadInputError, atomic_path, read_header, read_image, write_fits, write_text
from gppy.masks import MaskBit
from gppy.naming import ProductDirs, stem, weight_of
from gppy.refcat import catalogue_motion, image_epoch
from gppy_phot import catalog, cutouts, realbogus, regions, sextractor, transients, vetting, zeropoint
from gppy_phot.apertures import SUFFIXES, ZP_KEYS, aperture_set
from gppy_phot.photometry import PhotParams

log = logging.getLogger(__name__)

#: Largest fraction of a detection's PSF information (sum P^2) on masked pixels (flag_masked).
MAX_MASKED_PSF_FRACTION = 0.3
#: Detections within this many FWHM of a saturated pixel are flagged (flag_masked): of the
#: science's when the science was convolved (its saturated core spread over the kernel), else
#: of the unconvolved image's, whose saturated pixels spoil only themselves.
SAT_RADIUS_FWHM = {"SCIENCE": 1.5, "REFERENCE": 1.0}
#: Stars of at least this S/N (their PSF flux over the difference's PSF-flux noise) measure the
#: level of the residual lobes beside stars.
WING_STAR_SNR = 200.0
#: A matched-filter peak farther than this many FWHM from every Source Extractor detection is a
#: detection of its own (closer, it is that detection's source; a transient beside a star's
#: residual is merged into the residual's isophote, whose centroid lies between the two).
PEAK_SEPARATION_FWHM = 0.5
#: Value given to masked pixels of the noise image handed to Source Extractor (ignored there).
BAD_RMS = 1e30


@dataclass
class DiffScience:
    """What the difference's header (the science keys carried over) provides."""

    seeing: float
    peeing: float
    ellip: float
    elong: float
    pixscale: float
    filt: str
    wcs: WCS
    zps: dict[str, tuple[float, float]]
    ul5_1: float
    obstime: Time | None
    beta: float | None = None

    @classmethod
    def from_header(cls, h: fits.Header, path: str | Path) -> DiffScience:
        missing = [k for k in ("SEEING", "ZP_1", "FILTER") if k not in h]
        if missing:
            raise BadInputError(path, f"difference header lacks {', '.join(missing)} (the science photometry keys "
                                      "must be carried over by the subtract stage)")
        wcs = WCS(h, naxis=2)
        if not wcs.has_celestial:
            raise BadInputError(path, "difference has no celestial WCS")
        pixscale = float(np.mean(proj_plane_pixel_scales(wcs.celestial)) * 3600.0)
        seeing = float(h["SEEING"])
        zps = {}
        for s in SUFFIXES:
            k = ZP_KEYS[s]
            if f"ZP_{k}" in h:
                zps[s] = (float(h[f"ZP_{k}"]), float(h.get(f"EZP_{k}", 0.0)))
        try:
            obstime = Time(h["DATE-OBS"], format="isot", scale="utc") if "DATE-OBS" in h else None
        except ValueError:
            obstime = None
        peeing = float(h.get("PEEING", seeing / pixscale))
        beta = float(h["COGBETA"]) if "COGBETA" in h else None
        # when the science was convolved to the reference, the difference has the reference's PSF
        if str(h.get("SUBCONV", "")).strip().upper() == "SCIENCE":
            try:
                fwhm_ref = float(h["SUBFWHMR"])
            except (KeyError, TypeError, ValueError):
                fwhm_ref = float("nan")
            if np.isfinite(fwhm_ref) and fwhm_ref > peeing:
                peeing, seeing, beta = fwhm_ref, fwhm_ref * pixscale, None
        return cls(seeing=seeing, peeing=peeing, ellip=float(h.get("ELLIP", 0.05)),
                   elong=float(h.get("ELONG", 1.05)), pixscale=pixscale, filt=str(h["FILTER"]).strip(), wcs=wcs,
                   zps=zps, ul5_1=float(h.get("UL5_1", np.nan)), obstime=obstime, beta=beta)


@dataclass
class SearchResult:
    """Products of :func:`search`."""

    phot: Table                      # positive Source Extractor catalogue, calibrated (.subt.phot.cat)
    transients: Table                # every detection, both signs, with flags and score
    skyval: float
    skysig: float
    aps: dict[str, float] = field(default_factory=dict)


def _se_job(image: Path, workdir: Path, tag: str, info: DiffScience, aps, rms: Path, flag: Path,
            params: PhotParams, tparams: transients.TransientParams) -> tuple[list[str], Path, Path]:
    conv = write_text(workdir / "diff.conv", sextractor.gaussian_conv_text(info.peeing))
    args = sextractor.build_args(
        image, workdir / f"{tag}.cat", sextractor.package_file("det.param"), conv, gain=0.0, saturation=1e15,
        seeing_arcsec=info.seeing, apertures_px=aps.phot_apertures(), weight=rms, weight_type="MAP_RMS",
        flag=flag,
        overrides={"DETECT_THRESH": sextractor.detect_thresh_for(tparams.detect_significance, info.peeing),
                   "ANALYSIS_THRESH": 1.5, "DETECT_MINAREA": params.detect_minarea, "BACK_SIZE": 64,
                   "BACK_FILTERSIZE": 3, "BACKPHOTO_TYPE": "GLOBAL", "WEIGHT_THRESH": BAD_RMS / 10})
    return args, workdir / f"{tag}.cat", workdir


def calibrate_table(t: Table, filt: str, zps: dict[str, tuple[float, float]]) -> Table:
    """Add ``MAG/MAGERR/FLUX/FLUXERR/SNR_<S>_<FILT>`` from the header zero points (v1 §9)."""
    out = Table(t, copy=False)
    for s in SUFFIXES:
        if s not in zps:
            continue
        fcol, ecol = catalog.se_flux_columns(s)
        cal = zeropoint.calibrate(np.asarray(t[fcol], float), np.asarray(t[ecol], float), *zps[s])
        for q, name in catalog.calibrated_names(s, filt).items():
            out[name] = cal[q]
    return out


def vetting_columns(diff, bad, x, y, sign, snr_stat, snr_psf, psf_pos, psf_scale, ring_mean, ring_scatter, local, local_chi,
                    star_other, dipole, lobe_ratio, lobe_snr, fwhm_det, elongation, masked_frac, ref_min, detector,
                    rb_shape, stars, saturated, header, info: DiffScience) -> dict[str, np.ndarray]:
    """The measurements the vetting score weighs (:data:`gppy_phot.vetting.FEATURES`), per
    detection (0-based x, y); ``saturated``: the difference's saturated pixels (or None)."""
    n = len(x)
    err = np.asarray(psf_pos.err, float) * psf_scale
    err = np.where(np.isfinite(err) & (err > 0), err, np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        sdist, sratio, slight, which = vetting.star_context(x, y, np.asarray(psf_pos.flux, float),
                                                            np.nan_to_num(err, nan=1.0), stars, info.peeing, info.beta)
        # the dominant star's position; which = -1 (none) picks the NaN appended last
        star_x = np.append(stars[0] if stars is not None else [], np.nan)[which]
        star_y = np.append(stars[1] if stars is not None else [], np.nan)[which]
        tang, off = vetting.star_aligned_shape(diff, bad, x, y, np.asarray(sign, float), star_x, star_y, info.peeing)
        return {
            "snr_stat": np.asarray(snr_stat, float), "snr_psf": np.asarray(snr_psf, float),
            "ring_scatter": np.log1p(np.clip(np.asarray(ring_scatter, float), 0, None) / err),
            "local": np.log1p(np.clip(np.nan_to_num(np.asarray(local, float)), 0, None) / err),
            "ring_mean": np.asarray(ring_mean, float) * sign / err,
            "local_chi": np.asarray(local_chi, float), "star_other": np.asarray(star_other, float),
            "dipole": np.asarray(dipole, float), "lobe_ratio": np.asarray(lobe_ratio, float),
            "lobe_snr": np.asarray(lobe_snr, float),
            "log_chi2": np.log(np.clip(np.asarray(psf_pos.chi2, float) / psf_scale**2, 1e-3, None)),
            "log_sharp": np.log(np.clip(np.abs(np.asarray(psf_pos.sharpness, float)), 1e-3, None)),
            "log_fwhm": np.nan_to_num(np.log(fwhm_det / info.peeing), nan=0.0),
            "log_elong": np.nan_to_num(np.log(np.clip(elongation, 1e-3, None) / max(info.elong, 1.0)), nan=0.0),
            "masked_frac": np.asarray(masked_frac, float), "ref_min": np.asarray(ref_min, float),
            "sign": np.asarray(sign, float), "star_dist": sdist, "star_ratio": sratio, "star_light": slight,
            "star_tangential": tang, "star_offset": off,
            "sat_dist": vetting.saturation_distance(saturated, x, y, info.peeing),
            "peak_only": (np.asarray(detector) == "peak").astype(float), "rb_shape": np.asarray(rb_shape, float),
            "sci_convolved": np.full(n, float(str(header.get("SUBCONV", "")).strip().upper() == "SCIENCE")),
        }


def search(diff_path: Path, diff: np.ndarray, header: fits.Header, noise: np.ndarray, mask: np.ndarray | None,
           science: np.ndarray | None, sci_sigma: np.ndarray | None, sci_gain: float, conv: np.ndarray | None,
           ref_footprint: tuple[WCS, tuple[int, int]] | None,
           singles: list[transients.SingleDetections], workdir: Path, params: PhotParams | None = None,
           tparams: transients.TransientParams | None = None, rb_model: dict | None = None,
           vet_model: dict | None = None,
           stars: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
           moving_stars: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None) -> SearchResult:
    """Detect, measure and vet the sources of a difference image.

    Parameters
    ----------
    diff_path : Path
        The difference image file (read by Source Extractor).
    diff, header : array, Header
        Its pixels and header (science keys SEEING, ZP_*, ... carried over).
    noise : array
        1-sigma noise of each pixel of ``diff`` (0 or non-finite where masked).
    mask : uint16 array or None
        MaskBit mask of ``diff``.
    science, sci_sigma, sci_gain : array, array, float
        The science image on the same grid, its noise (from its weight) and EGAIN.
    conv : array or None
        The convolved reference on the same grid (science photometric scale).
    ref_footprint : (WCS, (ny, nx)) or None
        The reference image's WCS and shape, for the footprint flag.
    singles : list
        Unmatched detections of the visit's single frames (for moving objects).
    workdir : Path
        Scratch folder.
    stars : (x, y, flux) arrays, optional
        0-based positions and APER_1 fluxes (science units) of the science image's sources
        with S/N > 20: the level of the subtraction residuals is measured at the brightest, and
        the residuals they leave beside them count in the noise of nearby detections.
    moving_stars : (ra, dec, ra_ref, dec_ref) arrays, optional
        Catalogue stars at the science's and at the reference's epoch (deg), for
        ``flag_pm_star``.
    """
    p = params or PhotParams()
    tp = tparams or transients.TransientParams()
    info = DiffScience.from_header(header, diff_path)
    ny, nx = diff.shape
    aps = aperture_set(info.peeing, info.pixscale)
    bad = np.zeros(diff.shape, bool) if mask is None else (mask != 0)
    bad |= ~np.isfinite(diff) | ~np.isfinite(noise) | (noise <= 0)
    workdir.mkdir(parents=True, exist_ok=True)
    # the noise image checked at random places, at the scale of a PSF and of an aperture: a
    # convolution correlates the noise and the per-pixel sigma no longer describes it
    sig_img = np.where(bad, np.nan, noise)
    r1 = aps.diameters["APER_1"] / 2.0
    margin = int(np.ceil(3 * info.peeing)) + 2
    rx_, ry_ = transients.random_positions(bad, 2000, margin)
    psf_scale = ap_scale = 1.0
    psf_rand = transients.forced_psf(diff, sig_img, rx_, ry_, info.peeing, bad, info.beta)
    if tp.calibrate_noise:
        psf_scale = transients.noise_scale(psf_rand.snr)
        fr_rand = transients.forced_aperture(diff, rx_, ry_, r1, sigma=sig_img, bad=bad)
        ap_scale = transients.noise_scale(fr_rand.flux / fr_rand.err)
    # Source Extractor detects with the noise at the PSF scale (its threshold is on the image
    # filtered with the PSF). Masked pixels reach it as noise-free background (value 0, the
    # typical noise in the RMS map) and through the flag image: pixels beyond a weight
    # threshold would be bad pixels to it, and a source whose filter footprint touches a
    # single one (a cosmic ray or bad column of the stack, a pixel of the reference's mask)
    # would not be detected at all.
    sub_sig = sig_img[::4, ::4]
    typical = float(np.nanmedian(sub_sig)) * psf_scale if np.isfinite(sub_sig).any() else 1.0
    rms = np.where(bad, typical, noise * psf_scale).astype(np.float32)
    rms_path = write_fits(workdir / "rms.fits", rms)
    del rms
    flag_path = sextractor.write_flag_image(bad.astype(np.uint16) if mask is None else (mask | bad.astype(np.uint16)),
                                            workdir / "flag.fits")
    pos_path = write_fits(workdir / "pos.fits", np.where(bad, 0.0, diff).astype(np.float32), header)
    neg_path = write_fits(workdir / "neg.fits", np.where(bad, 0.0, -diff).astype(np.float32), header)
    pos, neg = sextractor.run_many([_se_job(pos_path, workdir, "pos", info, aps, rms_path, flag_path, p, tp),
                                    _se_job(neg_path, workdir, "neg", info, aps, rms_path, flag_path, p, tp)],
                                   sextractor.usable_cpus())
    phot = calibrate_table(pos.table, info.filt, info.zps)

    # ---- every detection of either sign
    cols = ["NUMBER", "X_IMAGE", "Y_IMAGE", "ALPHA_J2000", "DELTA_J2000", "FLUX_APER_1", "FLUXERR_APER_1",
            "MAG_APER_3", "MAG_APER_5", "MAGERR_APER_3", "MAGERR_APER_5", "BACKGROUND", "FLAGS", "IMAFLAGS_ISO",
            "NIMAFLAGS_ISO", "FWHM_IMAGE", "ELONGATION", "ELLIPTICITY", "ISOAREA_IMAGE", "CLASS_STAR"]
    parts = []
    for sign, t in ((1, pos.table), (-1, neg.table)):
        if len(t) == 0:
            continue
        sub = Table({c: np.asarray(t[c]) for c in cols if c in t.colnames})
        sub["sign"] = np.full(len(sub), sign, dtype=np.int8)
        parts.append(sub)
    # matched-filter peaks that Source Extractor merged into a neighbour's isophote (a
    # transient beside a star's subtraction residual) join as detections of their own
    sat_px = (mask & int(MaskBit.SATURATED)) != 0 if mask is not None else None
    smap = transients.significance_map(diff, sig_img * psf_scale, bad, info.peeing)
    px, py, psign = transients.peak_detections(smap, 0.8 * tp.snr_min, info.peeing, bad)
    del smap
    if len(px):
        se_xy = [np.column_stack([np.asarray(t["X_IMAGE"], float) - 1, np.asarray(t["Y_IMAGE"], float) - 1])
                 for t in (pos.table, neg.table) if len(t)]
        if se_xy:
            from scipy.spatial import cKDTree

            dist, _ = cKDTree(np.vstack(se_xy)).query(np.column_stack([px, py]), k=1)
            new = dist > PEAK_SEPARATION_FWHM * info.peeing
            px, py, psign = px[new], py[new], psign[new]
        # only beside stars and saturated cores (where isophotes merge); elsewhere Source
        # Extractor's own detections, with their shape measurements, stand
        close = np.zeros(len(px), bool)
        if stars is not None and len(stars[0]) and len(px):
            from scipy.spatial import cKDTree

            dstar, _ = cKDTree(np.column_stack([stars[0], stars[1]])).query(np.column_stack([px, py]), k=1)
            close |= dstar < 5 * info.peeing
        if sat_px is not None and len(px):
            close |= vetting.saturation_distance(sat_px, px, py, info.peeing) < 5
        px, py, psign = px[close], py[close], psign[close]
    if len(px):
        pra, pdec = info.wcs.all_pix2world(px, py, 0)
        extra = Table({"NUMBER": np.zeros(len(px), np.int32), "X_IMAGE": px + 1.0, "Y_IMAGE": py + 1.0,
                       "ALPHA_J2000": pra, "DELTA_J2000": pdec,
                       "FWHM_IMAGE": np.full(len(px), info.peeing), "ELONGATION": np.full(len(px), info.elong),
                       "ELLIPTICITY": np.full(len(px), info.ellip), "FLAGS": np.zeros(len(px), np.int32),
                       "IMAFLAGS_ISO": np.zeros(len(px), np.int32), "BACKGROUND": np.zeros(len(px))})
        extra["sign"] = psign.astype(np.int8)
        parts.append(extra)
    if parts:
        from astropy.table import vstack

        det = vstack(parts, metadata_conflicts="silent", join_type="outer")
        for c in det.colnames:
            if hasattr(det[c], "mask") and det[c].dtype.kind == "f":
                det[c] = np.asarray(det[c].filled(np.nan))
            elif hasattr(det[c], "mask"):
                det[c] = np.asarray(det[c].filled(0))
    else:
        det = Table({c: np.zeros(0) for c in cols})
        det["sign"] = np.zeros(0, np.int8)
    n = len(det)
    detector = np.where(np.asarray(det["NUMBER"]) > 0, "sextractor", "peak")
    x = np.asarray(det["X_IMAGE"], float) - 1.0
    y = np.asarray(det["Y_IMAGE"], float) - 1.0
    sign = np.asarray(det["sign"], int)
    psf_pos = transients.forced_psf(diff, sig_img, x, y, info.peeing, bad, info.beta)
    fd = transients.forced_aperture(diff, x, y, r1, sigma=sig_img, bad=bad)
    fs = (transients.forced_aperture(science, x, y, r1, sigma=sci_sigma, bad=bad, gain=sci_gain)
          if science is not None else None)
    fr = transients.forced_aperture(conv, x, y, r1, bad=bad) if conv is not None else None
    # the subtraction residual at the science image's stars
    fd.err = fd.err * ap_scale
    level = wing = 0.0
    near = None
    if stars is not None and len(stars[0]):
        sx_, sy_, sf_ = stars
        with np.errstate(invalid="ignore", divide="ignore"):
            brightest = np.argsort(-sf_)[:400]
        if conv is not None:
            level = transients.residual_level(
                transients.forced_psf(diff, sig_img, sx_[brightest], sy_[brightest], info.peeing, bad, info.beta).flux,
                transients.forced_aperture(conv, sx_[brightest], sy_[brightest], r1, bad=bad).flux)
        # the wing residual, as a fraction of a star's flux, is measurable only beside stars
        # bright enough for it to stand out of the noise: those of S/N > WING_STAR_SNR on the
        # difference's noise (at least the 10 brightest)
        err0 = float(np.nanmedian(psf_rand.err)) * psf_scale
        wing_stars = brightest[sf_[brightest] > WING_STAR_SNR * err0] if np.isfinite(err0) else brightest[:0]
        if len(wing_stars) < 10:
            wing_stars = brightest[:10]
        wing = transients.wing_residual_level(diff, sig_img, bad, sx_[wing_stars], sy_[wing_stars], sf_[wing_stars],
                                              info.peeing, info.beta, psf_scale)
        near = transients.nearby_flux(x, y, sx_, sy_, sf_, info.peeing, info.beta)
    snr_stat = psf_pos.snr / psf_scale * sign
    # the residual of a star's core (a fraction ``level`` of its flux) counts for detections on
    # a star; beside stars, the residual structure of the difference around each detection
    # (rings at 2 and 3 FWHM, away from the stars' cores) and the stars' wing residual count
    on_star = np.zeros(n, bool)
    avoid = None
    if stars is not None and len(stars[0]) and n:
        from scipy.spatial import cKDTree

        dstar, _ = cKDTree(np.column_stack([stars[0], stars[1]])).query(np.column_stack([x, y]), k=1)
        on_star = dstar < info.peeing
        avoid = (stars[0], stars[1])
    local, local_chi = transients.local_residual(diff, sig_img, bad, x, y, info.peeing, info.beta, psf_scale,
                                                 avoid=avoid)
    ref_core = np.where(on_star, fr.flux, 0.0) if fr is not None else None
    ring_mean = ring_scatter = star_other = np.zeros(n)
    if stars is not None and len(stars[0]) and n:
        # beside a star: the star's own residual at that distance (from the other azimuths)
        # is taken off the detection's flux, and its azimuthal scatter counts as noise
        ring_mean, ring_scatter, _, star_other = transients.star_ring_residual(
            diff, sig_img, bad, x, y, *stars, info.peeing, info.beta, psf_scale, flux=psf_pos.flux)
    # only a residual of the detection's own sign can explain it away (a detection on the
    # weaker part of a negative ring is not made positive by it)
    ring_mean = np.where(ring_mean * sign > 0, ring_mean, 0.0)
    snr_psf = transients.effective_snr((psf_pos.flux - ring_mean) * sign, psf_pos.err * psf_scale, ref_core, level,
                                       near, wing, np.hypot(local, ring_scatter))
    with np.errstate(invalid="ignore", divide="ignore"):
        zsig = diff / sig_img
    dipole = transients.box_fraction(zsig, x, y, int(np.ceil(info.peeing)), 1.0, sign) if n else np.zeros(0)
    lobe_ratio, lobe_snr = transients.opposite_lobe(diff, sig_img, bad, x, y, sign, psf_pos.flux, info.peeing,
                                                    info.beta, psf_scale)
    # v1 rules 11 and 13 (masked or null pixels near the detection): a detection is lost to the
    # mask when much of its PSF lies on masked or null pixels, or when a saturated pixel (a star's
    # core) is near (SAT_RADIUS_FWHM); a single masked pixel (a cosmic ray
    # or bad column of the stack) beside a source does not make it bogus
    zero_or_bad = bad | (diff == 0)
    masked_frac = transients.masked_psf_fraction(zero_or_bad, x, y, info.peeing, info.beta)
    masked = masked_frac > MAX_MASKED_PSF_FRACTION
    if mask is not None and n:
        saturated = (mask & int(MaskBit.SATURATED | MaskBit.NONFINITE)) != 0
        k_sat = SAT_RADIUS_FWHM.get(str(header.get("SUBCONV", "SCIENCE")).strip().upper(), 1.5)
        masked |= transients.any_in_radius(saturated, x, y, max(5.0, k_sat * info.peeing))
    if ref_footprint is not None and n:
        rw, (rny, rnx) = ref_footprint
        rx, ry = rw.all_world2pix(np.asarray(det["ALPHA_J2000"]), np.asarray(det["DELTA_J2000"]), 0)
        margin = 2.0
        in_fp = (rx >= margin) & (rx <= rnx - 1 - margin) & (ry >= margin) & (ry <= rny - 1 - margin)
    else:
        rx = ry = np.full(n, np.nan)
        in_fp = np.ones(n, bool)
    if conv is not None and n:
        # a hole in the reference (a negative feature a PSF wide: an artefact, a wrongly
        # subtracted background) at the detection, judged at the aperture scale against the
        # scatter of the same aperture on the convolved reference at random places: a single
        # low pixel among the ~100 within the seeing radius is noise
        rand = transients.forced_aperture(conv, rx_, ry_, r1, bad=bad).flux
        rand = rand[np.isfinite(rand)]
        med = float(np.median(rand)) if len(rand) >= 50 else 0.0
        conv_ap_sig = float(1.4826 * np.median(np.abs(rand - med))) if len(rand) >= 50 else 0.0
        ref_min = (fr.flux - med) / conv_ap_sig if conv_ap_sig > 0 else np.zeros(n)
    else:
        ref_min = np.zeros(n)
    iy = np.clip(np.rint(y).astype(int), 0, ny - 1)
    ix = np.clip(np.rint(x).astype(int), 0, nx - 1)
    local_sig = sig_img[iy, ix].astype(float)   # NaN where masked
    # concentration (v1 flag 9: the 3" and 10" apertures) of each detection on D, against the
    # stars of the image with D's PSF: the (convolved) reference, or else the science
    r3, r5 = aps.diameters["APER_3"] / 2, aps.diameters["APER_5"] / 2
    conc, conc_err = transients.concentration(diff, x, y, r3, r5, sigma=sig_img, bad=bad, sign=sign)
    conc_err = conc_err * ap_scale
    star_conc = None
    psf_image = conv if conv is not None else science
    if psf_image is not None and stars is not None and len(stars[0]) >= 5:
        order = np.argsort(-stars[2])[:400]
        cs, _ = transients.concentration(psf_image, stars[0][order], stars[1][order], r3, r5, bad=bad)
        cs = cs[np.isfinite(cs)]
        if len(cs) >= 5:
            med = float(np.median(cs))
            star_conc = (med, float(np.median(np.abs(cs - med))))
    # Source Extractor gives FWHM_IMAGE = 0 when it cannot measure it (faint sources in
    # correlated noise): unmeasured, not sharp
    fwhm_det = np.asarray(det["FWHM_IMAGE"], float)
    fwhm_det = np.where(fwhm_det > 0, fwhm_det, np.nan)
    pm_star = np.zeros(n, bool)
    if moving_stars is not None and n:
        pm_star = transients.moving_star_flag(np.asarray(det["ALPHA_J2000"], float), np.asarray(det["DELTA_J2000"], float),
                                              *moving_stars, radius_arcsec=max(0.6 * info.peeing * info.pixscale, 1.0))
    meas = {"x": x, "y": y, "sign": sign, "snr_psf": snr_psf, "ELLIPTICITY": np.asarray(det["ELLIPTICITY"], float),
            "FWHM_IMAGE": fwhm_det, "FLAGS": np.asarray(det["FLAGS"]),
            "BACKGROUND": np.asarray(det["BACKGROUND"], float), "sigma_local": local_sig, "conc": conc,
            "conc_err": conc_err, "dipole_frac": dipole, "lobe_ratio": lobe_ratio, "lobe_snr": lobe_snr, "star_other": star_other, "pm_star": pm_star,
            "peak_only": detector == "peak", "masked": masked, "in_footprint": in_fp,
            "ref_min_sig": ref_min}
    # the 10" aperture of a detection beside a star holds the star's residual: no
    # concentration test there
    if stars is not None and len(stars[0]) and n:
        from scipy.spatial import cKDTree

        dnear, _ = cKDTree(np.column_stack([stars[0], stars[1]])).query(np.column_stack([x, y]), k=1)
        conc = np.where(dnear > r5 + info.peeing, conc, np.nan)
    meas["conc"] = conc
    flags = transients.vetting_flags(meas, seeing_arcsec=info.seeing, peeing_px=info.peeing, ellip=info.ellip,
                                     pixscale=info.pixscale, nx=nx, ny=ny, params=tp,
                                     conc_star=star_conc[0] if star_conc else None,
                                     conc_mad=star_conc[1] if star_conc else None)
    ncore = float(np.pi * (1.5 * info.peeing) ** 2)
    feats = realbogus.features(meas["FWHM_IMAGE"], info.peeing, np.asarray(det["ELONGATION"], float), info.elong,
                               dipole, psf_pos.chi2 / psf_scale**2, ncore, snr_stat, psf_pos.sharpness * sign)
    rb_shape = realbogus.score(feats, rb_model) if n else np.zeros(0)
    vet = vetting_columns(diff, bad, x, y, sign, snr_stat, snr_psf, psf_pos, psf_scale, ring_mean, ring_scatter, local, local_chi,
                          star_other, dipole, lobe_ratio, lobe_snr, fwhm_det, np.asarray(det["ELONGATION"], float),
                          masked_frac, ref_min, detector, rb_shape, stars, sat_px, header, info)
    if tp.vetting_model:
        rb = vetting.score(vetting.feature_matrix(vet), vet_model) if n else np.zeros(0)
    else:
        rb = rb_shape
    zp1, ezp1 = info.zps.get("APER_1", (np.nan, 0.0))
    flux_diff_ujy = fd.flux * sign * zeropoint.ujy_per_adu(zp1) if n else np.zeros(0)
    moving, rate, pa = transients.moving_objects(np.asarray(det["ALPHA_J2000"], float),
                                                 np.asarray(det["DELTA_J2000"], float), singles,
                                                 tp.moving_min_arcsec, tp.moving_search_arcsec,
                                                 flux=flux_diff_ujy, sign=sign, snr_min=tp.snr_min,
                                                 seeing_arcsec=info.seeing)
    cand = (transients.candidates(flags, moving, rb, tp.rb_min, snr=snr_stat, sign=sign, params=tp, rb_shape=rb_shape)
            if tp.vetting_model else transients.candidates(flags, moving, rb, tp.rb_min))
    trail_len, trail_sig = np.full(n, np.nan), np.full(n, np.nan)
    if n and tp.trails:
        # a moving object merged with a star in the single frames: their centroids do not line
        # up, but the difference shows its trail clean of the star
        psf_image = conv if conv is not None else science
        psf_trail = (0.0, 0.0)
        if psf_image is not None and stars is not None and len(stars[0]):
            psf_trail = transients.psf_trail_level(psf_image, sig_img * psf_scale, bad, *stars, info.peeing, info.beta)
        test = cand & (sign > 0) & ~moving & (snr_stat >= 2 * tp.snr_min)
        trailed, trail_len, trail_angle, trail_sig = transients.trailed_objects(
            diff, sig_img * psf_scale, bad, x, y, test, info.peeing, info.beta, psf_trail,
            tp.moving_min_arcsec / info.pixscale)
        # a source that the single frames show in place is not moving, whatever its shape on D
        # (a transient beside a star whose residual stretches it)
        k = np.flatnonzero(trailed)
        trailed[k] = transients.static_in_singles(np.asarray(det["ALPHA_J2000"], float)[k],
                                                  np.asarray(det["DELTA_J2000"], float)[k], singles,
                                                  0.25 * info.seeing, tp.snr_min) < 2
        span_h = transients.visit_span_hours(singles)
        for i in np.flatnonzero(trailed):
            moving[i] = True
            ends = info.wcs.all_pix2world(x[i] + 0.5 * trail_len[i] * np.cos(trail_angle[i]) * np.array([-1.0, 1.0]),
                                          y[i] + 0.5 * trail_len[i] * np.sin(trail_angle[i]) * np.array([-1.0, 1.0]), 0)
            dra = (ends[0][1] - ends[0][0]) * np.cos(np.deg2rad(ends[1].mean())) * 3600
            ddec = (ends[1][1] - ends[1][0]) * 3600
            # a trail has no head: the direction is given modulo 180 deg
            pa[i] = float(np.degrees(np.arctan2(dra, ddec)) % 180.0)
            rate[i] = float(np.hypot(dra, ddec) / span_h) if span_h > 0 else np.nan

    # ---- the transient table
    out = Table()
    out["ID"] = np.arange(1, n + 1, dtype=np.int32)
    for c in ("NUMBER", "X_IMAGE", "Y_IMAGE", "ALPHA_J2000", "DELTA_J2000"):
        out[c] = det[c] if n else np.zeros(0)
    out["sign"] = sign.astype(np.int8)
    out["detector"] = detector
    out["label"] = transients.labels(sign, (fr.flux / fr.err) if fr is not None else np.zeros(n), moving) \
        if n else np.zeros(0, "<U11")
    out["candidate"] = cand
    out["rb"] = rb
    out["snr_psf"] = snr_psf
    out["snr_stat"] = snr_stat
    for tag, fm in (("DIFF", fd), ("SCI", fs), ("REF", fr)):
        if fm is None:
            continue
        flux = fm.flux * (sign if tag == "DIFF" else 1)
        cal = zeropoint.calibrate(flux, fm.err, zp1, ezp1)
        out[f"FLUX_{tag}"] = cal["FLUX"]
        out[f"FLUXERR_{tag}"] = cal["FLUXERR"]
        out[f"MAG_{tag}"] = cal["MAG"]
        out[f"MAGERR_{tag}"] = cal["MAGERR"]
    if fs is not None and fr is not None:
        out["del_mag"] = out["MAG_SCI"] - out["MAG_REF"]
    for c in ("FLAGS", "IMAFLAGS_ISO", "BACKGROUND", "FWHM_IMAGE", "ELONGATION", "ELLIPTICITY", "CLASS_STAR",
              "ISOAREA_IMAGE"):
        if c in det.colnames:
            out[c] = det[c]
    with np.errstate(invalid="ignore", divide="ignore"):
        out["ratio_seeing"] = meas["FWHM_IMAGE"] * info.pixscale / info.seeing
        out["ratio_ellipticity"] = meas["ELLIPTICITY"] / max(info.ellip, 1e-3)
        out["ratio_elongation"] = np.asarray(det["ELONGATION"], float) / max(info.elong, 1.0) if n else np.zeros(0)
    out["n_bad"] = fd.nbad
    out["masked_psf_frac"] = masked_frac
    out["local_resid"] = local
    out["local_chi"] = local_chi
    out["star_ring_flux"] = ring_mean * sign
    out["star_ring_scatter"] = ring_scatter
    out["star_ring_other"] = star_other
    out["dipole_frac"] = dipole
    out["lobe_ratio"] = lobe_ratio
    out["lobe_snr"] = lobe_snr
    out["psf_chi2"] = psf_pos.chi2
    out["sharpness"] = psf_pos.sharpness * sign
    out["ref_min_sig"] = ref_min
    out["x_refim"] = MaskedColumn(rx, mask=~np.isfinite(rx))
    out["y_refim"] = MaskedColumn(ry, mask=~np.isfinite(ry))
    out["trail_arcsec"] = trail_len * info.pixscale if n else np.zeros(0)
    out["trail_snr"] = trail_sig if n else np.zeros(0)
    out["rate_arcsec_h"] = MaskedColumn(rate, mask=~np.isfinite(rate))
    out["pa_deg"] = MaskedColumn(pa, mask=~np.isfinite(pa))
    for name, f in flags.items():
        out[name] = f
    for j, fname in enumerate(realbogus.FEATURES):
        out[f"rb_{fname}"] = feats[:, j] if n else np.zeros(0)
    out["rb_shape"] = rb_shape
    for fname in vetting.FEATURES:
        out[f"vet_{fname}"] = vet[fname] if n else np.zeros(0)
    out.meta.update({"filter": info.filt, "seeing": info.seeing, "snr_min": tp.snr_min,
                     "snr_min_negative": tp.snr_min_negative, "rb_min": tp.rb_min,
                     "rb_min_high_snr": tp.rb_min_high_snr, "high_snr": tp.high_snr,
                     "rb_shape_min": tp.rb_shape_min, "vetting_model": vetting.model_id() if tp.vetting_model else "",
                     "psf_noise_scale": round(psf_scale, 4), "aperture_noise_scale": round(ap_scale, 4),
                     "residual_level": round(level, 4), "wing_residual_level": round(wing, 4),
                     "psf_fwhm_px": round(info.peeing, 3),
                     "detect_significance": tp.detect_significance, "flags": transients.FLAG_DOC,
                     "ncandidates": int(cand.sum())})
    return SearchResult(phot=phot, transients=out, skyval=pos.background, skysig=pos.rms,
                        aps=dict(aps.diameters))


# ----------------------------------------------------------------------------- service side
#: Science keys the photometry of a difference uses; taken from the science image when the
#: subtract stage did not carry them into the difference header.
SCIENCE_KEYS = ("SEEING", "PEEING", "ELLIP", "ELONG", "COGBETA", "FILTER", "DATE-OBS", "UL5_1", "EGAIN") + tuple(
    f"{pre}{ZP_KEYS[s]}" for s in SUFFIXES for pre in ("ZP_", "EZP_"))


def reference_on_science_scale(conv: np.ndarray, diff: np.ndarray, header: fits.Header) -> np.ndarray:
    """The reference, PSF-matched where possible, on the science photometric scale.

    The subtract stage writes the image it convolved (``SUBCONV``): the convolved reference
    K*R + B (already on the science scale, D = S - conv), or the convolved science K*S + B in
    the reference's units, with D = (conv - R) / sum(K); then R / sum(K) = conv / sum(K) - D
    (with the reference's own, broader PSF).
    """
    if str(header.get("SUBCONV", "REFERENCE")).strip().upper() != "SCIENCE":
        return conv
    try:
        ksum = float(header.get("SUBKSUM", 1.0))
    except (TypeError, ValueError):
        ksum = 1.0
    if not np.isfinite(ksum) or ksum <= 0:
        ksum = 1.0
    return (conv / ksum - diff).astype(np.float32)


def with_science_keys(diff_header: fits.Header, sci_header: fits.Header) -> fits.Header:
    """The difference header completed with the science keys it lacks."""
    h = diff_header.copy()
    for key in SCIENCE_KEYS:
        if key not in h and key in sci_header:
            h[key] = sci_header[key]
    return h


def _singles_of(science_header: fits.Header, dirs: ProductDirs) -> list[transients.SingleDetections]:
    """Unmatched detections of the stack's input singles, from their phot catalogues."""
    names = [str(v) for k, v in science_header.items() if k.startswith(("IMCMB", "PROVIN"))]
    seen, out = set(), []
    for name in names:
        s = stem(name)
        if s in seen or s.endswith((".weight", ".mask")):
            continue
        seen.add(s)
        cat = dirs.phot / f"{s}.phot.cat"
        if not cat.exists():
            continue
        try:
            t = Table.read(cat, format="ascii.ecsv")
        except Exception as exc:  # a broken catalogue only costs the moving-object check
            log.warning("cannot read %s: %s", cat, exc)
            continue
        mjd = float(t.meta.get("mjd", np.nan)) + float(t.meta.get("exptime", 0.0)) / 2 / 86400.0
        if not np.isfinite(mjd):
            continue
        if "source_id" not in t.colnames:
            unmatched = np.ones(len(t), bool)
        elif hasattr(t["source_id"], "mask"):
            unmatched = np.asarray(np.ma.getmaskarray(t["source_id"]))
        else:
            unmatched = np.zeros(len(t), bool)
        filt = str(t.meta.get("filter", ""))
        fcol, scol = f"FLUX_APER_1_{filt}", f"SNR_APER_1_{filt}"
        out.append(transients.SingleDetections(
            t=mjd, ra=np.asarray(t["ALPHA_J2000"], float)[unmatched], dec=np.asarray(t["DELTA_J2000"], float)[unmatched],
            flux=np.asarray(t[fcol], float)[unmatched] if fcol in t.colnames else None,
            snr=np.asarray(t[scol], float)[unmatched] if scol in t.colnames else None))
    return out


def _science_sources(science: Path, dirs: ProductDirs) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """0-based positions and APER_1 fluxes of the science image's unflagged sources with
    S/N(APER_1) > 20, from its catalogue."""
    cat = dirs.phot / f"{stem(science)}.phot.cat"
    if not cat.exists():
        return None
    t = Table.read(cat, format="ascii.ecsv")
    flux = np.asarray(t["FLUX_APER_1"], float)
    with np.errstate(invalid="ignore", divide="ignore"):
        snr = flux / np.asarray(t["FLUXERR_APER_1"], float)
    ok = (np.asarray(t["FLAGS"]) <= 4) & (snr > 20)
    if "IMAFLAGS_ISO" in t.colnames:
        ok &= np.asarray(t["IMAFLAGS_ISO"]) == 0
    return (np.asarray(t["X_IMAGE"], float)[ok] - 1.0, np.asarray(t["Y_IMAGE"], float)[ok] - 1.0, flux[ok])


#: At most this many candidates get cutouts (the highest S/N first); a difference with more
#: is broken, and thousands of PNGs would only fill the disk.
MAX_CUTOUTS = 200


def _write_cutouts(res: SearchResult, diff: np.ndarray, sci: np.ndarray | None, conv: np.ndarray | None,
                   wcs: WCS, pixscale: float, base: str, dirs: ProductDirs) -> int:
    t = res.transients
    n = 0
    cand = t[np.asarray(t["candidate"], bool)]
    if len(cand) > MAX_CUTOUTS:
        log.warning("%d candidates: cutouts of the %d with the highest S/N only", len(cand), MAX_CUTOUTS)
        cand = cand[np.argsort(-np.abs(np.asarray(cand["snr_psf"], float)))[:MAX_CUTOUTS]]
    for row in cand:
        ra, dec = float(row["ALPHA_J2000"]), float(row["DELTA_J2000"])
        for tag, img in (("sci", sci), ("ref", conv), ("sub", diff)):
            if img is None:
                continue
            data, cw = cutouts.cutout(img, wcs, ra, dec, pixscale)
            name = f"{base}.{int(row['ID'])}.{tag}"
            hdul = cutouts.cutout_fits_bytes(data, cw, {"CANDID": int(row["ID"]), "LABEL": str(row["label"]),
                                                        "IMAGE": tag})
            with atomic_path(dirs.fits_image / f"{name}.fits") as tmp:
                hdul.writeto(tmp, overwrite=True)
            with atomic_path(dirs.png_image / f"{name}.png") as tmp:
                tmp.write_bytes(cutouts.png_bytes(data, box_px=10.0))
            n += 1
    return n


def difference_products(event, processed: Path, scratch_root: Path, params: PhotParams,
                        tparams: transients.TransientParams | None = None,
                        refcat_root: Path | None = None) -> dict:
    """Products of one ``diff.done`` event; returns the ``phot.done`` figures. With
    ``refcat_root``, detections at catalogue stars that moved between the reference's epoch
    and the science's are flagged (``flag_pm_star``)."""
    from gppy_phot.service import provenance_meta, read_mask

    diff_path = Path(event.path)
    diff, header = read_image(diff_path)
    noise, _ = read_image(event.noise_path) if event.noise_path else (None, None)
    if noise is None or noise.shape != diff.shape:
        raise BadInputError(event.noise_path or diff_path, "difference noise image missing or of another shape")
    mask = read_mask(event.mask_path)
    if mask is not None and mask.shape != diff.shape:
        raise BadInputError(event.mask_path, "difference mask of another shape")
    science, sci_header = read_image(event.science_path)
    header = with_science_keys(header, sci_header)
    if science.shape != diff.shape:
        science = None
    sci_sigma = None
    wpath = weight_of(event.science_path)
    if science is not None and wpath.exists():
        w, _ = read_image(wpath)
        with np.errstate(divide="ignore"):
            sci_sigma = np.where(w > 0, 1.0 / np.sqrt(np.where(w > 0, w, 1.0)), np.nan).astype(np.float32)
        del w
    conv = None
    if event.conv_path and Path(event.conv_path).exists():
        conv, _ = read_image(event.conv_path)
        conv = reference_on_science_scale(conv, diff, header) if conv.shape == diff.shape else None
    ref_fp = None
    ref_time = None
    if event.reference_path and Path(event.reference_path).exists():
        rh = read_header(event.reference_path)
        ref_time = image_epoch(rh)
        try:
            ref_fp = (WCS(rh, naxis=2), (int(rh["NAXIS2"]), int(rh["NAXIS1"])))
        except Exception as exc:
            log.warning("reference WCS unusable (%s): no footprint check", exc)
    sci_time = DiffScience.from_header(header, diff_path).obstime
    motion = catalogue_motion(refcat_root, event.object, sci_time, ref_time)
    dirs = ProductDirs.of(processed, event.object, event.unit, event.filter)
    singles = _singles_of(sci_header, dirs)
    scratch_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"diff-{stem(diff_path)[:40]}-", dir=scratch_root) as tmp:
        res = search(diff_path, diff, header, noise, mask, science, sci_sigma, float(sci_header.get("EGAIN", 0.0)),
                     conv, ref_fp, singles, Path(tmp), params, tparams,
                     stars=_science_sources(Path(event.science_path), dirs),
                     moving_stars=motion[:4] if motion is not None else None)
    base = stem(diff_path)                      # <science stem>.subt
    out_dir = diff_path.parent
    tp = tparams or transients.TransientParams()
    prov = provenance_meta([diff_path, event.science_path, event.conv_path or "", event.reference_path or ""],
                           params, {**vars(tp), "vetting_model_sha256": vetting.model_id() if tp.vetting_model else ""})
    res.phot.meta.update({"image": diff_path.name, "filter": header.get("FILTER", ""), "provenance": prov})
    write_text(out_dir / f"{base}.phot.cat", catalog.to_ecsv(res.phot))
    res.transients.meta["provenance"] = prov
    write_text(out_dir / f"{base}.transient.cat", catalog.to_ecsv(res.transients))
    t = res.transients
    cand = np.asarray(t["candidate"], bool)
    write_text(out_dir / f"{base}.transient.reg",
               regions.region_text(regions.circles(np.asarray(t["ALPHA_J2000"])[cand], np.asarray(t["DELTA_J2000"])[cand],
                                                   2.5, "red", [f"{i} {lab}" for i, lab in
                                                                zip(t["ID"][cand], t["label"][cand], strict=True)]),
                                   "gppy phot: transient candidates"))
    summary = ["flag,n,ratio"] + [f"{name},{int(np.sum(t[name]))},{np.mean(t[name]) if len(t) else 0:.4f}"
                                  for name in transients.FLAG_DOC]
    summary.append(f"candidate,{int(cand.sum())},{cand.mean() if len(t) else 0:.4f}")
    write_text(out_dir / f"{base}.flag.summary.csv", "\n".join(summary) + "\n")
    info = DiffScience.from_header(header, diff_path)
    _write_cutouts(res, diff, science, conv, info.wcs, info.pixscale, stem(event.science_path), dirs)
    # v1 §9: the difference's own keys
    h = header.copy()
    t0 = info.obstime
    h["AUTHOR"] = ("gppy phot", "photometry software")
    h["PHOTIME"] = (Time.now().isot[:10], "date of the photometry")
    if t0 is not None:
        h["JD"] = (round(float(t0.jd), 6), "Julian date of DATE-OBS")
        h["MJD"] = (round(float(t0.mjd), 6), "modified Julian date of DATE-OBS")
    h["SKYSIG"] = (round(float(res.skysig), 3), "[image units] background RMS of the difference")
    h["SKYVAL"] = (round(float(res.skyval), 3), "[image units] background of the difference")
    for s in SUFFIXES:
        h[s] = (round(res.aps.get(s, 0.0), 3), f"MAG_{s} diameter (px)")
    h["NCANDID"] = (int(cand.sum()), "transient candidates")
    for key in ("BZERO", "BSCALE"):
        h.remove(key, ignore_missing=True)
    write_fits(diff_path, diff, h)
    return {"catalogue_path": str(out_dir / f"{base}.phot.cat"), "candidates_path": str(out_dir / f"{base}.transient.cat"),
            "ncandidates": int(cand.sum())}
