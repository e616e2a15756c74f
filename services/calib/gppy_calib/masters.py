"""Master frames: bias, dark (per exposure time) and flat (per filter), and their QC.

v1-behaviour.md §4.3-§4.5 with bugs B5/B18 fixed:

* **bias**: combine every bias frame of the night (:mod:`gppy_calib.combine`).
* **dark** (per distinct EXPTIME): combine that EXPTIME's dark frames, then subtract the
  master bias. Units: ADU accumulated in the dark's own EXPTIME.
* **flat** (per FILTER): every flat frame, minus the bias, minus the dark nearest in
  exposure time scaled by ``t_flat / t_dark``, divided by its own median (taken on a regular
  sub-grid of every ``norm_step``-th pixel in each axis, finite pixels only), then combined.
  Like v1 the master is not renormalised (its median is slightly above 1 on vignetted
  optics). Flat frames whose median is not positive or whose raw median reaches 90 % of the
  saturation level are left out and reported.

Every master has an error (1-sigma) image from the combine, propagated through the bias
(and dark) subtraction: ``err_dark = sqrt(err_comb**2 + err_bias**2)``; the flat's error is
that of the combined normalised frames. QC compares a new master with the previous archived
one (:func:`qc_compare`).

Inputs are "row sources": anything 2-D that can be sliced (``src[r0:r1]``, ``src[::s, ::s]``)
into host arrays, such as NumPy arrays or memory maps. Nothing here reads or writes files.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np
from astropy.io import fits

from gppy_calib.combine import Combined, combine_bands
from gppy_calib.headers import FrameInfo, mean_date, yyyymmdd

#: Sub-sampling step of the flat normalisation median (every 4th pixel in each axis).
NORM_STEP = 4
#: Flat frames whose raw median reaches this fraction of the saturation level are left out.
FLAT_SATURATION_FRACTION = 0.9
#: QC: a pixel "differs" when |new - old| > QC_NSIGMA * sqrt(err_new**2 + err_old**2).
QC_NSIGMA = 6.0


@dataclass
class ClipRule:
    """Combine parameters (see :mod:`gppy_calib.combine`)."""

    sigma: float = 3.0
    iters: int = 5
    band_rows: int = 512


@dataclass
class Master:
    """A master frame in memory.

    Attributes
    ----------
    kind : {"bias", "dark", "flat"}
    data : numpy.ndarray
        float32. Bias: ADU. Dark: ADU in ``exptime`` seconds, bias removed. Flat: relative
        response (dimensionless, median of each input normalised to 1).
    error : numpy.ndarray
        float32, 1-sigma error of ``data`` (same units); may be all zero for an archived v1
        master that carried none.
    exptime : float
        s (darks; flats: mean EXPTIME of the inputs; bias: 0).
    filter : str
        Flats only.
    date : str
        ``YYYYMMDD`` of the mean DATE-OBS of the inputs (the archive name's date).
    date_obs : str
        Mean DATE-OBS of the inputs, ISO UTC.
    inputs : list of str
        Input file paths.
    header : astropy.io.fits.Header
        Header to write (see :func:`master_header`).
    rejected : dict
        Inputs left out, path -> reason.
    """

    kind: str
    data: np.ndarray
    error: np.ndarray
    exptime: float = 0.0
    filter: str = ""
    date: str = ""
    date_obs: str = ""
    inputs: list[str] = field(default_factory=list)
    header: fits.Header = field(default_factory=fits.Header)
    rejected: dict[str, str] = field(default_factory=dict)
    nused: np.ndarray | None = None


@dataclass(frozen=True)
class QCResult:
    """Outcome of comparing a new master with the previous one.

    Attributes
    ----------
    fraction : float
        Fraction of the compared pixels that differ by more than ``nsigma`` sigma.
    ok : bool
        ``fraction <= threshold``.
    reason : str
        Human-readable summary.
    """

    fraction: float
    ok: bool
    reason: str


def _host(src: Any, rows: slice | tuple) -> np.ndarray:
    return np.asarray(src[rows], dtype=np.float32)


def _reader(sources: Sequence[Any], xp: ModuleType, transform=None):
    """A band reader over row sources; ``transform(i, r0, r1, band)`` may correct a band."""

    def read_band(r0: int, r1: int):
        bands = []
        for i, src in enumerate(sources):
            band = xp.asarray(_host(src, slice(r0, r1)))
            if transform is not None:
                band = transform(i, r0, r1, band)
            bands.append(band)
        return xp.stack(bands)

    return read_band


def _check_shapes(frames: Sequence[FrameInfo], sources: Sequence[Any]) -> tuple[int, int]:
    if not frames or len(frames) != len(sources):
        raise ValueError("need one source per frame and at least one frame")
    shape = tuple(int(s) for s in sources[0].shape)
    for f, src in zip(frames, sources, strict=True):
        if tuple(src.shape) != shape:
            raise ValueError(f"{f.path}: shape {tuple(src.shape)} differs from {shape}")
    return shape  # type: ignore[return-value]


def _dates(frames: Sequence[FrameInfo]) -> tuple[str, str]:
    t = mean_date([f.mjd for f in frames])
    return yyyymmdd(t), t.isot


def robust_std(values: np.ndarray) -> float:
    """1.4826 x the median absolute deviation of the finite values (same units)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan")
    return float(1.4826 * np.median(np.abs(v - np.median(v))))


def measure_read_noise(src_a: Any, src_b: Any, step: int = NORM_STEP) -> float:
    """Read noise from two bias frames, ADU: robust std of their difference / sqrt(2).

    Uses every ``step``-th pixel in each axis.
    """
    a = _host(src_a, (slice(None, None, step), slice(None, None, step)))
    b = _host(src_b, (slice(None, None, step), slice(None, None, step)))
    return robust_std(a - b) / float(np.sqrt(2.0))


def make_bias(frames: Sequence[FrameInfo], sources: Sequence[Any], xp: ModuleType,
              clip: ClipRule | None = None) -> Master:
    """Master bias (ADU) from raw bias frames.

    Parameters
    ----------
    frames : list of FrameInfo
        The bias frames (headers already checked).
    sources : list of array-like
        Their pixel data (ADU), sliceable row sources, same order.
    xp : module
        NumPy or CuPy.
    clip : ClipRule, optional

    Returns
    -------
    Master
        With ``RDNOISE`` measured from the first two frames (``header['RDNADU']``, ADU).
    """
    clip = clip or ClipRule()
    shape = _check_shapes(frames, sources)
    comb = combine_bands(_reader(sources, xp), len(sources), shape, xp, clip.sigma, clip.iters,
                         clip.band_rows)
    date, date_obs = _dates(frames)
    m = Master("bias", comb.image, comb.error, 0.0, "", date, date_obs, [f.path for f in frames],
               nused=comb.nused)
    rn = measure_read_noise(sources[0], sources[1]) if len(sources) >= 2 else float("nan")
    m.header = master_header(m, frames, comb, clip)
    if np.isfinite(rn):
        m.header["RDNADU"] = (round(rn, 4), "[ADU] read noise measured from bias pairs")
        gain = _gain(frames)
        if gain:
            m.header["RDNOISE"] = (round(rn * gain, 4), "[e-] read noise (RDNADU x EGAIN)")
    return m


def _gain(frames: Sequence[FrameInfo]) -> float | None:
    for f in frames:
        g = f.header.get("EGAIN")
        try:
            g = float(g)
        except (TypeError, ValueError):
            continue
        if np.isfinite(g) and g > 0:
            return g
    return None


def make_dark(frames: Sequence[FrameInfo], sources: Sequence[Any], bias: Master, xp: ModuleType,
              clip: ClipRule | None = None) -> Master:
    """Master dark for one exposure time: combined raw darks minus the master bias.

    Returns
    -------
    Master
        ``data`` in ADU accumulated in ``exptime`` seconds; ``error`` includes the bias error.
    """
    clip = clip or ClipRule()
    shape = _check_shapes(frames, sources)
    if bias.data.shape != shape:
        raise ValueError(f"master bias shape {bias.data.shape} differs from the darks' {shape}")
    exptimes = sorted({f.exptime for f in frames})
    if len(exptimes) != 1:
        raise ValueError(f"darks of several exposure times given together: {exptimes}")
    comb = combine_bands(_reader(sources, xp), len(sources), shape, xp, clip.sigma, clip.iters,
                         clip.band_rows)
    data = comb.image
    data -= bias.data
    err = np.sqrt(comb.error.astype(np.float32) ** 2 + bias.error.astype(np.float32) ** 2)
    date, date_obs = _dates(frames)
    m = Master("dark", data, err.astype(np.float32), exptimes[0], "", date, date_obs,
               [f.path for f in frames], nused=comb.nused)
    m.header = master_header(m, frames, comb, clip)
    m.header["BIASFILE"] = (bias.header.get("FILENAME", ""), "master bias subtracted")
    return m


def nearest_dark(darks: dict[float, Master], exptime: float) -> Master | None:
    """The dark whose exposure time is nearest ``exptime`` (ties: the longer one)."""
    if not darks:
        return None
    t = min(darks, key=lambda d: (abs(d - exptime), -d))
    return darks[t]


def flat_normalisation(source: Any, bias: np.ndarray, dark: np.ndarray | None, scale: float,
                       step: int = NORM_STEP) -> tuple[float, float]:
    """Median of a bias- and dark-corrected flat frame on a sub-grid.

    Returns
    -------
    norm : float
        Median of ``raw - bias - dark * scale`` over every ``step``-th pixel (ADU).
    raw_median : float
        Median of the raw values on the same grid (ADU), for the saturation check.
    """
    sl = (slice(None, None, step), slice(None, None, step))
    raw = _host(source, sl)
    corr = raw - bias[sl]
    if dark is not None:
        corr -= dark[sl] * np.float32(scale)
    good = np.isfinite(corr)
    if not good.any():
        return float("nan"), float("nan")
    return float(np.median(corr[good])), float(np.median(raw[good]))


def make_flat(frames: Sequence[FrameInfo], sources: Sequence[Any], bias: Master,
              darks: dict[float, Master], xp: ModuleType, clip: ClipRule | None = None,
              saturate: float = 60000.0) -> Master:
    """Master flat for one filter (relative response).

    Parameters
    ----------
    frames, sources : list
        Flat frames of one filter and their pixel data (ADU).
    bias : Master
    darks : dict of float -> Master
        Available master darks by exposure time (may be empty: then no dark is removed).
    saturate : float
        Raw saturation level, ADU.

    Raises
    ------
    ValueError
        If no usable flat frame is left (every one saturated or with a non-positive median).
    """
    clip = clip or ClipRule()
    shape = _check_shapes(frames, sources)
    filters = sorted({f.filter for f in frames})
    if len(filters) != 1:
        raise ValueError(f"flats of several filters given together: {filters}")
    if bias.data.shape != shape:
        raise ValueError(f"master bias shape {bias.data.shape} differs from the flats' {shape}")
    used_frames: list[FrameInfo] = []
    used_sources: list[Any] = []
    scales: list[float] = []
    norms: list[float] = []
    dark_of: list[Master | None] = []
    rejected: dict[str, str] = {}
    for f, src in zip(frames, sources, strict=True):
        dark = nearest_dark(darks, f.exptime)
        scale = f.exptime / dark.exptime if dark is not None else 0.0
        norm, raw_med = flat_normalisation(src, bias.data, dark.data if dark is not None else None, scale)
        if not np.isfinite(norm) or norm <= 0:
            rejected[f.path] = f"flat frame median {norm:.3g} ADU after bias/dark removal is not positive"
            continue
        if raw_med >= FLAT_SATURATION_FRACTION * saturate:
            rejected[f.path] = (f"flat frame median {raw_med:.0f} ADU is at or above "
                                f"{FLAT_SATURATION_FRACTION:.0%} of saturation ({saturate:.0f} ADU)")
            continue
        used_frames.append(f)
        used_sources.append(src)
        scales.append(scale)
        norms.append(norm)
        dark_of.append(dark)
    if not used_frames:
        raise ValueError(f"no usable flat frame for filter {filters[0]}: " + "; ".join(rejected.values()))

    def correct(i: int, r0: int, r1: int, band):
        band = band - xp.asarray(bias.data[r0:r1])
        if dark_of[i] is not None:
            band = band - xp.asarray(dark_of[i].data[r0:r1]) * xp.float32(scales[i])
        return band * xp.float32(1.0 / norms[i])

    comb = combine_bands(_reader(used_sources, xp, correct), len(used_sources), shape, xp, clip.sigma,
                         clip.iters, clip.band_rows)
    date, date_obs = _dates(used_frames)
    m = Master("flat", comb.image, comb.error, float(np.mean([f.exptime for f in used_frames])), filters[0],
               date, date_obs, [f.path for f in used_frames], rejected=rejected, nused=comb.nused)
    m.header = master_header(m, used_frames, comb, clip)
    darks_used = sorted({d.exptime for d in dark_of if d is not None})
    m.header["FLATDARK"] = (",".join(f"{t:g}" for t in darks_used) or "none",
                            "[s] master darks scaled and removed")
    m.header["FLATNORM"] = (f"median of every {NORM_STEP}th px", "normalisation of each flat frame")
    for i, norm in enumerate(norms[:999], start=1):
        m.header[f"FNORM{i:03d}"] = (round(norm, 3), f"[ADU] median of input {i}")
    return m


def master_header(m: Master, frames: Sequence[FrameInfo], comb: Combined, clip: ClipRule) -> fits.Header:
    """Header of a master: type, inputs, combine rule, dates, EXPTIME/FILTER.

    Provenance (``PIPEVER`` etc.) is added by the service with ``gppy.provenance.stamp``.
    """
    h = fits.Header()
    first = frames[0].header
    for key in ("TELESCOP", "INSTRUME", "XBINNING", "YBINNING", "GAIN", "EGAIN", "SET-TEMP", "CCD-TEMP"):
        if key in first:
            h[key] = first[key]
    h["MASTTYPE"] = (m.kind, "master frame type")
    h["BUNIT"] = ("ADU" if m.kind != "flat" else "", "data units" if m.kind != "flat" else "relative response")
    h["IMAGETYP"] = {"bias": "bias", "dark": "dark", "flat": "flat"}[m.kind]
    h["EXPTIME"] = (float(m.exptime), "[s] exposure time" + (" (dark units)" if m.kind == "dark" else ""))
    if m.kind == "flat":
        h["FILTER"] = (m.filter, "filter")
    mjds = [f.mjd for f in frames]
    h["DATE-OBS"] = (m.date_obs, "mean DATE-OBS of the inputs (UTC)")
    h["MJD-OBS"] = (round(float(np.mean(mjds)), 6), "mean MJD of the inputs (UTC)")
    h["DATE-BEG"] = (min(frames, key=lambda f: f.mjd).date_obs, "first input DATE-OBS")
    h["DATE-END"] = (max(frames, key=lambda f: f.mjd).date_obs, "last input DATE-OBS")
    h["MASTDATE"] = (m.date, "date in the archive name (YYYYMMDD)")
    h["NCOMBINE"] = (len(frames), "number of frames combined")
    h["COMBRULE"] = ("sigclip-mean-std then median", "see gppy_calib.combine")
    h["CLIPSIG"] = (clip.sigma, "clipping half-width (sigma)")
    h["CLIPITER"] = (clip.iters, "maximum clipping iterations")
    finite = comb.nused[comb.nused > 0]
    h["NUSEDMIN"] = (int(finite.min()) if finite.size else 0, "fewest values surviving in a pixel")
    h["ERREXT"] = ("ERR", "extension holding the 1-sigma error image")
    for i, f in enumerate(frames, start=1):
        key = f"IMCMB{i:03d}" if i < 1000 else f"IMCMB{i:X}"
        h[key] = (f.path.rsplit("/", 1)[-1][:68], "input")
    h["MEDIAN"] = (float(np.nanmedian(m.data[::NORM_STEP, ::NORM_STEP])), "median of the master (sub-grid)")
    return h


def _central(a: np.ndarray, frac: float = 0.5) -> tuple[slice, slice]:
    ny, nx = a.shape
    dy, dx = int(ny * (1 - frac) / 2), int(nx * (1 - frac) / 2)
    return slice(dy, ny - dy), slice(dx, nx - dx)


def qc_compare(new: Master, old_data: np.ndarray, old_error: np.ndarray | None, threshold: float,
               nsigma: float = QC_NSIGMA, step: int = 2) -> QCResult:
    """Compare a new master with the previous archived one (BANZAI-style).

    Both are compared on every ``step``-th pixel. Flats are first divided by the median of
    their central half (so a change of lamp level is not a difference); a pixel differs when
    ``|new - old| > nsigma * sqrt(err_new**2 + err_old**2)``; the master fails when more than
    ``threshold`` (a fraction) of the finite pixels differ.
    """
    if old_data.shape != new.data.shape:
        return QCResult(0.0, True, f"previous master has shape {old_data.shape}, not compared")
    sl = (slice(None, None, step), slice(None, None, step))
    a = np.asarray(new.data[sl], dtype=np.float64)
    b = np.asarray(old_data[sl], dtype=np.float64)
    ea = np.asarray(new.error[sl], dtype=np.float64)
    eb = np.zeros_like(b) if old_error is None else np.asarray(old_error[sl], dtype=np.float64)
    if new.kind == "flat":
        ca, cb = np.nanmedian(a[_central(a)]), np.nanmedian(b[_central(b)])
        if not (np.isfinite(ca) and np.isfinite(cb) and ca > 0 and cb > 0):
            return QCResult(1.0, False, "flat with a non-positive central median")
        a, ea, b, eb = a / ca, ea / ca, b / cb, eb / cb
    sig = np.sqrt(ea ** 2 + eb ** 2)
    good = np.isfinite(a) & np.isfinite(b) & np.isfinite(sig) & (sig > 0)
    if not good.any():
        return QCResult(0.0, True, "no pixel with a usable error; not compared")
    frac = float(np.mean(np.abs(a[good] - b[good]) > nsigma * sig[good]))
    ok = frac <= threshold
    verdict = "passes" if ok else "FAILS"
    return QCResult(frac, ok, f"{frac:.2%} of pixels differ by > {nsigma:g} sigma from the previous "
                              f"master (limit {threshold:.2%}): {verdict}")
