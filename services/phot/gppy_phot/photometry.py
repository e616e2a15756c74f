"""Calibrated photometry of one image (single frame or stack), v1-behaviour.md §7.2.

The steps, in order:

1. Source Extractor pre-run (bright sources only) -> seeing stars matched to the reference
   -> ``SEEING``, ``PEEING``, ``ELLIP``, ``ELONG`` (:mod:`gppy_phot.seeing`).
2. Apertures from the seeing (:mod:`gppy_phot.apertures`); detection filter = Gaussian of the
   seeing.
3. Main Source Extractor run with the weight and flag maps, the image's EGAIN and SATURATE.
4. Match to the reference at the observation epoch, ZP per aperture
   (:mod:`gppy_phot.zeropoint`).
5. Aperture noise from the weight map, limiting magnitudes (:mod:`gppy_phot.depth`).
6. Calibrated columns and the catalogue table (:mod:`gppy_phot.catalog`), the header cards.

This module runs Source Extractor (files in a scratch folder) but writes no product: the
service does that.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table
from astropy.time import Time
from astropy.wcs import WCS
from astropy.wcs.utils import proj_plane_pixel_scales

from gppy.fitsio import BadInputError, write_fits, write_text
from gppy.refcat import propagate_to_epoch
from gppy_phot import catalog, depth, seeing, sextractor, zeropoint
from gppy_phot.apertures import SUFFIXES, ZP_KEYS, ApertureSet, aperture_set
from gppy_phot.matching import match_sky

log = logging.getLogger(__name__)

#: Seeing assumed by the pre-run (arcsec), as v1's ``-SEEING_FWHM 2.0``.
PRE_SEEING_ARCSEC = 2.0
#: Pre-run detection significance (filtered-image sigma): only sources bright enough for a FWHM.
PRE_DETECT_SIGNIFICANCE = 30.0


@dataclass
class PhotParams:
    """Settings of the photometry (v1's gphot.config values where v1 had them)."""

    match_radius_arcsec: float = 1.0
    #: Cut frames larger than this (pixels) into bands measured by parallel Source Extractor
    #: processes (one per usable CPU, at most ``max_bands``).
    split_min_pixels: int = 8_000_000
    max_bands: int = 4
    detect_significance: float = 4.0
    analysis_thresh: float = 1.5
    detect_minarea: int = 5
    back_size: int = 128
    back_filtersize: int = 3
    backphoto_type: str = "GLOBAL"
    default_saturation: float = 60000.0
    refcat_name: str = "GaiaXP"
    #: Measure the noise correlation of the image (a diagnostic for stacks, header APNF_k; a
    #: single frame is never resampled, so its pixels are independent).
    measure_correlation: bool = False


@dataclass
class ImageInfo:
    """What the photometry needs from an image header."""

    nx: int
    ny: int
    wcs: WCS
    pixscale: float
    gain: float
    saturation: float
    obstime: Time
    filt: str
    obj: str

    @classmethod
    def from_header(cls, header: fits.Header, path: str | Path, default_saturation: float) -> ImageInfo:
        """Read and check the keys; raise :class:`BadInputError` naming what is missing."""
        nx, ny = int(header.get("NAXIS1", 0)), int(header.get("NAXIS2", 0))
        if header.get("NAXIS", 0) != 2 or nx < 16 or ny < 16:
            raise BadInputError(path, f"not a 2-D image (NAXIS={header.get('NAXIS')}, {nx}x{ny})")
        try:
            wcs = WCS(header, naxis=2)
        except Exception as exc:
            raise BadInputError(path, f"unusable WCS ({exc.__class__.__name__}: {exc})") from exc
        if not wcs.has_celestial:
            raise BadInputError(path, "no celestial WCS in the header (was the frame solved?)")
        pixscale = float(np.mean(proj_plane_pixel_scales(wcs.celestial)) * 3600.0)
        gain = header.get("EGAIN")
        try:
            gain = float(gain)
        except (TypeError, ValueError):
            raise BadInputError(path, f"EGAIN missing or not a number ({gain!r}); the camera GAIN "
                                      "setting is never used as e-/ADU (v1 bug B12)") from None
        if not np.isfinite(gain) or gain < 0:
            raise BadInputError(path, f"EGAIN {gain!r} is not a usable gain")
        sat = header.get("SATURATE")
        try:
            sat = float(sat)
        except (TypeError, ValueError):
            sat = float(default_saturation)
        date = header.get("DATE-OBS")
        try:
            obstime = Time(date, format="isot", scale="utc") if date else Time(float(header["MJD-OBS"]),
                                                                               format="mjd", scale="utc")
        except Exception as exc:
            raise BadInputError(path, f"no usable DATE-OBS/MJD-OBS ({date!r})") from exc
        filt = str(header.get("FILTER", "")).strip()
        if not filt:
            raise BadInputError(path, "FILTER missing")
        return cls(nx=nx, ny=ny, wcs=wcs, pixscale=pixscale, gain=gain, saturation=sat, obstime=obstime,
                   filt=filt, obj=str(header.get("OBJECT", "")).strip())


@dataclass
class PhotResult:
    """Everything the service writes: catalogue, header cards and figures for the event."""

    table: Table
    cards: list[tuple[str, object, str]]
    seeing: seeing.Seeing
    apertures: ApertureSet
    zps: dict[str, zeropoint.ZeroPoint]
    depths: dict[str, tuple[float, float]]
    skyval: float
    skysig: float
    noise: dict[str, float]
    total: zeropoint.TotalZeroPoint | None = None
    zp_inputs: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=dict)

    @property
    def ul5_1(self) -> float:
        return self.depths["APER_1"][1]


def reference_positions(ref: Table, obstime: Time) -> tuple[np.ndarray, np.ndarray]:
    """Reference RA/Dec at the observation epoch (rows without proper motion kept as they are)."""
    return propagate_to_epoch(ref, obstime)


def _ref_mag(ref: Table, filt: str, index: np.ndarray, path: str) -> np.ndarray:
    col = f"mag_{filt}"
    if col not in ref.colnames:
        raise BadInputError(path, f"reference catalogue has no column {col!r}")
    mags = np.asarray(ref[col], float)
    out = np.full(len(index), np.nan)
    hit = index >= 0
    out[hit] = mags[index[hit]]
    return out


def psf_from_reference(data: np.ndarray, mask: np.ndarray, ref: Table, ref_ra: np.ndarray, ref_dec: np.ndarray,
                       info: ImageInfo, refpath: str) -> seeing.Seeing:
    """Seeing from the pixels of the reference stars in v1's magnitude window (raises
    ``ValueError`` when too few are usable)."""
    col = f"mag_{info.filt}"
    if col not in ref.colnames:
        raise BadInputError(refpath, f"reference catalogue has no column {col!r}")
    mag = np.asarray(ref[col], float)
    lo, hi = seeing.SEEING_MAG_RANGE
    with np.errstate(invalid="ignore"):
        sel = (mag > lo) & (mag < hi)
    if sel.sum() == 0:
        raise ValueError("no reference star in the seeing window")
    x, y = info.wcs.all_world2pix(ref_ra[sel], ref_dec[sel], 0)
    inside = seeing.inside_ellipse(x + 1, y + 1, info.nx, info.ny) & np.isfinite(x) & np.isfinite(y)
    return seeing.measure_psf(data, mask != 0, x[inside], y[inside], info.pixscale, info.saturation)


def measure_seeing_from(pre: Table, ref_ra: np.ndarray, ref_dec: np.ndarray, ref: Table, info: ImageInfo,
                        radius: float, refpath: str) -> seeing.Seeing:
    """Seeing from the pre-run catalogue (matched stars, else bright point sources)."""
    if len(pre) == 0:
        raise BadInputError(refpath, "no source detected in the pre-run")
    idx, _ = match_sky(np.asarray(pre["ALPHA_J2000"]), np.asarray(pre["DELTA_J2000"]), ref_ra, ref_dec, radius)
    rmag = _ref_mag(ref, info.filt, idx, refpath)
    imaf = np.asarray(pre["IMAFLAGS_ISO"]) if "IMAFLAGS_ISO" in pre.colnames else None
    sel = seeing.select_seeing_stars(np.asarray(pre["FLAGS"]), imaf, np.asarray(pre["X_IMAGE"]),
                                     np.asarray(pre["Y_IMAGE"]), info.nx, info.ny, rmag)
    method = "matched"
    if sel.sum() < seeing.MIN_SEEING_STARS:
        with np.errstate(divide="ignore", invalid="ignore"):
            snr = np.asarray(pre["FLUX_AUTO"]) / np.asarray(pre["FLUXERR_AUTO"])
        sel = seeing.select_fallback_stars(np.asarray(pre["FLAGS"]), imaf, np.asarray(pre["X_IMAGE"]),
                                           np.asarray(pre["Y_IMAGE"]), info.nx, info.ny, snr,
                                           np.asarray(pre["FWHM_IMAGE"]), np.asarray(pre["ELONGATION"]))
        method = "point-sources"
    if sel.sum() == 0:
        raise BadInputError(refpath, "no star usable for the seeing (none matched, none point-like)")
    return seeing.measure_seeing(np.asarray(pre["FWHM_WORLD"])[sel], np.asarray(pre["ELLIPTICITY"])[sel],
                                 np.asarray(pre["ELONGATION"])[sel], info.pixscale, method)


def photometer(image_path: Path, header: fits.Header, data: np.ndarray, mask: np.ndarray | None,
               weight_path: Path | None, ref: Table, refpath: str, workdir: Path,
               params: PhotParams | None = None, timings: dict[str, float] | None = None) -> PhotResult:
    """Photometry of one image.

    Parameters
    ----------
    image_path : Path
        The image file (read by Source Extractor).
    header : astropy.io.fits.Header
        Its primary header.
    data : 2-D array
        Its pixels (image units), for the PSF of the reference stars and the noise correlation.
    mask : 2-D uint16 array or None
        Its MaskBit mask (non-zero = bad); handed to Source Extractor as a flag image.
    weight_path : Path or None
        Inverse-variance weight map (image units^-2), 0 where masked.
    ref : astropy.table.Table
        Reference catalogue (:func:`gppy.refcat.load_gaiaxp`).
    refpath : str
        Its path (for messages and the REFCAT provenance).
    workdir : Path
        Scratch folder for Source Extractor's files.
    params : PhotParams
        Settings.
    timings : dict, optional
        Filled with the seconds spent in each step (seeing, main run, zero points...).
    """
    clock = [time.perf_counter()]

    def lap(name: str) -> None:
        now = time.perf_counter()
        if timings is not None:
            timings[name] = timings.get(name, 0.0) + now - clock[0]
        clock[0] = now

    p = params or PhotParams()
    info = ImageInfo.from_header(header, image_path, p.default_saturation)
    image_name = Path(image_path).name
    workdir.mkdir(parents=True, exist_ok=True)
    finite = np.isfinite(data)
    if mask is None:  # Source Extractor needs a flag image for IMAFLAGS_ISO: non-finite pixels
        mask = (~finite).astype(np.uint16)
    if not finite.all():
        # Source Extractor has no notion of NaN: measure a copy with them at 0 and flagged
        mask = mask | (~finite).astype(mask.dtype)
        data = np.where(finite, data, 0.0).astype(np.float32)
        image_path = write_fits(workdir / "finite.fits", data, header)
    del finite
    flag_path = workdir / "flag.fits"   # written when a whole-frame run needs it
    wpath = weight_path if weight_path is not None and Path(weight_path).exists() else None
    ref_ra, ref_dec = reference_positions(ref, info.obstime)
    lap("prepare")

    # 1. seeing from stamps of the reference stars (v1's window 11.75 < mag < 18); the
    #    Source Extractor pre-run of v1 only when too few of them are usable
    try:
        see = psf_from_reference(data, mask, ref, ref_ra, ref_dec, info, refpath)
        lap("seeing")
    except ValueError as exc:
        log.info("seeing from reference stars failed (%s): Source Extractor pre-run", exc)
        if not flag_path.exists():
            sextractor.write_flag_image(mask, flag_path)
        pre_conv = write_text(workdir / "pre.conv",
                              sextractor.gaussian_conv_text(PRE_SEEING_ARCSEC / info.pixscale))
        pre_args = sextractor.build_args(
            image_path, workdir / "pre.cat", sextractor.package_file("pre.param"), pre_conv, gain=info.gain,
            saturation=info.saturation, seeing_arcsec=PRE_SEEING_ARCSEC, weight=wpath, flag=flag_path,
            overrides={"DETECT_THRESH": sextractor.detect_thresh_for(PRE_DETECT_SIGNIFICANCE,
                                                                     PRE_SEEING_ARCSEC / info.pixscale),
                       "ANALYSIS_THRESH": 3.0,
                       "DETECT_MINAREA": p.detect_minarea, "BACK_SIZE": p.back_size,
                       "BACK_FILTERSIZE": p.back_filtersize, "CLEAN": "N"})
        pre = sextractor.run(pre_args, workdir / "pre.cat", workdir).table
        lap("sextractor_pre")
        see = measure_seeing_from(pre, ref_ra, ref_dec, ref, info, p.match_radius_arcsec, refpath)
    aps = aperture_set(see.peeing_px, info.pixscale)

    # 2-3. main run
    conv = write_text(workdir / "main.conv", sextractor.gaussian_conv_text(see.peeing_px))
    args = sextractor.build_args(
        image_path, workdir / "main.cat", sextractor.package_file("phot.param"), conv, gain=info.gain,
        saturation=info.saturation, seeing_arcsec=see.seeing_arcsec, apertures_px=aps.phot_apertures(),
        weight=wpath, flag=flag_path,
        overrides={"DETECT_THRESH": sextractor.detect_thresh_for(p.detect_significance, see.peeing_px),
                   "ANALYSIS_THRESH": p.analysis_thresh, "DETECT_MINAREA": p.detect_minarea,
                   "BACK_SIZE": p.back_size, "BACK_FILTERSIZE": p.back_filtersize,
                   "BACKPHOTO_TYPE": p.backphoto_type})
    lap("prepare_main")
    res = run_main(args, image_path, data, header, mask, wpath, workdir, aps, p)
    lap("sextractor_main")
    se = res.table
    if len(se) == 0:
        raise BadInputError(image_path, "Source Extractor found no source")

    # 4. match and zero points
    idx, sep = match_sky(np.asarray(se["ALPHA_J2000"]), np.asarray(se["DELTA_J2000"]), ref_ra, ref_dec,
                         p.match_radius_arcsec)
    rmag = _ref_mag(ref, info.filt, idx, refpath)
    with np.errstate(divide="ignore", invalid="ignore"):
        snr_auto = np.asarray(se["FLUX_AUTO"]) / np.asarray(se["FLUXERR_AUTO"])
    imaf = np.asarray(se["IMAFLAGS_ISO"]) if "IMAFLAGS_ISO" in se.colnames else None
    zpsel = zeropoint.select_zp_stars(np.asarray(se["FLAGS"]), imaf, np.asarray(se["X_IMAGE"]),
                                      np.asarray(se["Y_IMAGE"]), info.nx, info.ny, snr_auto, rmag)
    if zpsel.sum() < 3:
        raise BadInputError(image_path, f"only {int(zpsel.sum())} reference star(s) usable for the zero "
                                        f"point (matched within {p.match_radius_arcsec} arcsec in {refpath})")

    # 5. noise: pixel RMS (SKYSIG), the weight map's sigma for apertures, and (stacks) the
    #    noise correlation as a diagnostic
    skysig = float(res.rms)
    sigma_ap = skysig
    if wpath is not None:
        sw = depth.weight_sigma(wpath, mask)
        if np.isfinite(sw) and sw > 0:
            sigma_ap = sw
    if p.measure_correlation:
        rho = depth.noise_correlation(data, mask != 0)
        noise = {s: depth.correlation_noise_ratio(rho, aps.diameters[s]) for s in SUFFIXES[1:]}
    else:
        noise = {s: 1.0 for s in SUFFIXES[1:]}

    zps: dict[str, zeropoint.ZeroPoint] = {}
    calibrated: dict[str, dict[str, np.ndarray]] = {}
    depths: dict[str, tuple[float, float]] = {}
    zp_inputs: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    use_of: dict[str, np.ndarray] = {}
    for s in SUFFIXES:
        fcol, ecol = catalog.se_flux_columns(s)
        flux = np.asarray(se[fcol], float)
        ferr = np.asarray(se[ecol], float)
        with np.errstate(divide="ignore", invalid="ignore"):
            inst = np.where(flux > 0, -2.5 * np.log10(np.where(flux > 0, flux, 1.0)), np.nan)
        zpi = rmag - inst
        use = zpsel & np.isfinite(zpi)
        use_of[s] = use
        zp = zeropoint.clipped_zero_point(zpi[use])
        zps[s] = zp
        zp_inputs[s] = (rmag[use], zpi[use], zp.kept)
        calibrated[s] = zeropoint.calibrate(flux, ferr, zp.zp, zp.ezp)
        d = aps.diameters[s]
        depths[s] = (depth.limiting_magnitude(zp.zp, sigma_ap, d, 3),
                     depth.limiting_magnitude(zp.zp, sigma_ap, d, 5))

    suf = list(SUFFIXES[1:])
    try:
        total = zeropoint.total_zero_point(np.array([aps.diameters[s] / 2 for s in suf]),
                                           np.array([zps[s].zp for s in suf]), np.array([zps[s].ezp for s in suf]),
                                           see.peeing_px)
    except ValueError:
        total = zeropoint.TotalZeroPoint(float("nan"), float("nan"), float("nan"), float("nan"), float("nan"))

    lap("noise_and_zero_points")
    kept1 = np.zeros(len(se), bool)
    kept1[np.flatnonzero(use_of["APER_1"])[zps["APER_1"].kept]] = True

    t_jd = info.obstime
    meta = {"obs": header.get("TELESCOP", ""), "object": info.obj, "filter": info.filt,
            "date-obs": t_jd.isot, "jd": round(float(t_jd.jd), 6), "mjd": round(float(t_jd.mjd), 6),
            "exptime": float(header.get("EXPTIME", 0.0) or 0.0),
            "seeing": round(see.seeing_arcsec, 3), "refcat": p.refcat_name, "image": image_name,
            "zp": {s: round(z.zp, 4) for s, z in zps.items()}, "zp_total": round(total.zp, 4),
            "ezp": {s: round(z.ezp, 4) for s, z in zps.items()},
            "zpscatter": {s: round(z.scatter, 4) for s, z in zps.items()}}
    table = catalog.build_catalogue(se, info.filt, calibrated, catalog.reference_columns(ref, idx, info.filt),
                                    sep, zpsel, kept1, meta)
    cards = header_cards(info, see, aps, zps, depths, noise, res.background, skysig, int(zpsel.sum()),
                         p.refcat_name, total)
    lap("catalogue")
    return PhotResult(table=table, cards=cards, seeing=see, apertures=aps, zps=zps, depths=depths,
                      skyval=float(res.background), skysig=skysig, noise=noise, zp_inputs=zp_inputs, total=total)


def run_main(args: list[str], image_path: Path, data: np.ndarray, header: fits.Header, mask: np.ndarray,
             weight_path: Path | None, workdir: Path, aps: ApertureSet, p: PhotParams) -> sextractor.SexResult:
    """The main Source Extractor run; a large frame is cut into horizontal bands (overlapping by
    more than the largest aperture) measured in parallel, and the catalogues merged."""
    ny, nx = data.shape
    nbands = min(sextractor.usable_cpus(), p.max_bands) if data.size >= p.split_min_pixels else 1
    if nbands <= 1:
        flag = Path(args[args.index("-FLAG_IMAGE") + 1])
        if not flag.exists():
            sextractor.write_flag_image(mask, flag)
        return sextractor.run(args, workdir / "main.cat", workdir)
    overlap = int(max(128, 4 * aps.diameters["APER_5"]))
    bands = sextractor.split_rows(ny, nbands, overlap)
    weight = fits.getdata(weight_path, memmap=True) if weight_path is not None else None
    jobs = []
    for i, (y0, y1, _, _) in enumerate(bands):
        h = header.copy()
        if "CRPIX2" in h:
            h["CRPIX2"] = float(h["CRPIX2"]) - y0
        img_i = write_fits(workdir / f"band{i}.fits", np.ascontiguousarray(data[y0:y1]), h)
        flag_i = sextractor.write_flag_image(mask[y0:y1], workdir / f"band{i}.flag.fits")
        a = list(args)
        a[0] = str(img_i)
        a[a.index("-CATALOG_NAME") + 1] = str(workdir / f"band{i}.cat")
        a[a.index("-FLAG_IMAGE") + 1] = str(flag_i)
        if weight is not None:
            w_i = write_fits(workdir / f"band{i}.weight.fits", np.asarray(weight[y0:y1], dtype=np.float32))
            a[a.index("-WEIGHT_IMAGE") + 1] = str(w_i)
        jobs.append((a, workdir / f"band{i}.cat", workdir))
    results = sextractor.run_many(jobs, nbands)
    return sextractor.merge_bands(results, bands)


def header_cards(info: ImageInfo, see: seeing.Seeing, aps: ApertureSet, zps: dict[str, zeropoint.ZeroPoint],
                 depths: dict[str, tuple[float, float]], noise: dict[str, float], skyval: float,
                 skysig: float, nstd: int, refcat_name: str,
                 total: zeropoint.TotalZeroPoint | None = None) -> list[tuple[str, object, str]]:
    """v1's header keys (§7.2 item 11) plus ``ZPN_k`` (stars kept), ``APNF_k`` (aperture
    noise over white noise) and ``ZP_TOT``/``EZP_TOT``/``COGBETA`` (total-flux zero point from
    the curve of growth, :func:`gppy_phot.zeropoint.total_zero_point`)."""
    t = info.obstime
    cards: list[tuple[str, object, str]] = [
        ("AUTHOR", "gppy phot", "photometry software"),
        ("PHOTIME", Time.now().isot[:10], "date of the photometry"),
        ("JD", round(float(t.jd), 6), "Julian date of DATE-OBS"),
        ("MJD", round(float(t.mjd), 6), "modified Julian date of DATE-OBS"),
        ("SEEING", round(see.seeing_arcsec, 3), "[arcsec] median FWHM of stars"),
        ("PEEING", round(see.peeing_px, 3), "[px] median FWHM of stars"),
        ("ELLIP", round(see.ellip, 3), "median ellipticity of stars"),
        ("ELONG", round(see.elong, 3), "median elongation of stars"),
        ("SKYSIG", round(skysig, 3), "[image units] background RMS per pixel"),
        ("SKYVAL", round(skyval, 3), "[image units] global background"),
        ("REFCAT", refcat_name, "photometric reference catalogue"),
        ("MAGLOW", zeropoint.MAG_LOW, "bright limit of ZP stars (ref mag)"),
        ("MAGUP", zeropoint.MAG_UP, "faint end of the ZP plot (ref mag)"),
        ("STDNUMB", nstd, "number of ZP stars before clipping"),
        ("SATLV", round(info.saturation, 3), "[image units] saturation level used"),
    ]
    cards += aps.header_cards()
    for s in SUFFIXES:
        k = ZP_KEYS[s]
        z = zps[s]
        ul3, ul5 = depths[s]
        cards += [(f"ZP_{k}", round(z.zp, 4), f"zero point of MAG_{s} (AB)"),
                  (f"EZP_{k}", round(z.ezp, 4) if np.isfinite(z.ezp) else 0.0, f"error of ZP_{k}"),
                  (f"UL3_{k}", ul3, f"3-sigma limit of MAG_{s}"),
                  (f"UL5_{k}", ul5, f"5-sigma limit of MAG_{s}"),
                  (f"ZPN_{k}", z.nused, f"stars kept for ZP_{k}")]
        if s in noise and np.isfinite(noise[s]):
            cards.append((f"APNF_{k}", round(float(noise[s]), 3), f"aperture noise / white noise, MAG_{s}"))
    if total is not None and np.isfinite(total.zp):
        cards += [("ZP_TOT", round(total.zp, 4), "total-flux zero point (curve of growth)"),
                  ("EZP_TOT", round(total.ezp, 4) if np.isfinite(total.ezp) else 0.0, "error of ZP_TOT"),
                  ("COGBETA", round(total.beta, 3), "Moffat beta of the curve of growth")]
    return cards


def apply_cards(header: fits.Header, cards: list[tuple[str, object, str]]) -> fits.Header:
    """Write ``cards`` into ``header`` (in place) and return it."""
    for key, value, comment in cards:
        header[key] = (value, comment)
    return header
