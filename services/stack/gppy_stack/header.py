"""The header of a stack: statistics of its inputs, units, gain, saturation (fixes v1 B7, B9, B10).

v1 meant to write the mean observation time and the summed exposure time of a group, but read
every value from the last frame (B7), and its EGAIN came from an unrelated frame (B9) and did
not match the pixel units (B10). Here every statistic is computed over all inputs:

* ``MJD``, ``JD``, ``DATE-OBS``: mean of the inputs' start times (``DATE-OBS``);
  ``MJD-MID``: the exposure-weighted mean of their mid-exposure times;
* ``DATE-LOC``: mean of the inputs' local start times;
* ``EXPTIME`` and ``EXPOSURE``: sum of the inputs' exposure times (s);
* ``AIRMASS``, ``CENTALT``: means; ``CENTAZ``: circular mean (azimuths wrap at 360 deg);
* ``NCOMBINE`` and ``IMCMBnnn``: the number and the names of the inputs;
* ``EGAIN``, ``SATURATE``, ``STKZP``, ``STKUNIT``: the units (see :mod:`gppy_stack.scaling`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.time import Time

#: Keywords copied from the reference input (v1's SWarp COPY_KEYWORDS, v1-behaviour.md §3.2),
#: except EGAIN and SATURATE, which the stack recomputes.
COPY_KEYWORDS: tuple[str, ...] = (
    "IMAGETYP", "XBINNING", "YBINNING", "GAIN", "XPIXSZ", "YPIXSZ", "INSTRUME", "SET-TEMP",
    "CCD-TEMP", "TELESCOP", "FOCALLEN", "FOCRATIO", "RA", "DEC", "PIERSIDE", "SITEELEV",
    "SITELAT", "SITELONG", "FWHEEL", "FILTER", "OBJECT", "OBJCTRA", "OBJCTDEC", "OBJCTROT",
    "FOCNAME", "FOCPOS", "FOCUSPOS", "FOCUSSZ", "ROWORDER", "_QUINOX", "SWCREATE",
)


def set_card(h: fits.Header, key: str, value, comment: str = "") -> None:
    """Set ``key`` with as much of ``comment`` as fits on the 80-column card."""
    card = fits.Card(key, value)
    room = 80 - len(card.image.rstrip()) - 3
    h[key] = (value, comment[:room] if room > 0 else "")


def _float(header: fits.Header, key: str) -> float | None:
    try:
        value = float(header[key])
    except (KeyError, TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def start_mjd(header: fits.Header) -> float:
    """Start of the exposure (MJD, UTC) from ``DATE-OBS``, else ``MJD``.

    Raises
    ------
    ValueError
        If neither is usable.
    """
    date_obs = header.get("DATE-OBS")
    if date_obs:
        try:
            return float(Time(str(date_obs).strip(), format="isot", scale="utc").mjd)
        except ValueError:
            pass
    mjd = _float(header, "MJD")
    if mjd is None:
        raise ValueError("no usable DATE-OBS or MJD")
    return mjd


def mean_of(values: Sequence[float | None]) -> float | None:
    """Mean of the known values, None if there are none."""
    known = [float(v) for v in values if v is not None]
    return float(np.mean(known)) if known else None


def circular_mean_deg(values: Sequence[float | None]) -> float | None:
    """Circular mean of angles in degrees, in [0, 360); None if none are known."""
    known = np.deg2rad([float(v) for v in values if v is not None])
    if known.size == 0:
        return None
    angle = math.degrees(math.atan2(np.sin(known).mean(), np.cos(known).mean()))
    return angle % 360.0


def mean_local_time(values: Sequence[str | None]) -> str | None:
    """Mean of ISO local date-times (``DATE-LOC``), in the same ISO form (ms precision)."""
    stamps = []
    for v in values:
        if not v:
            continue
        try:
            stamps.append(datetime.fromisoformat(str(v).strip()))
        except ValueError:
            continue
    if not stamps:
        return None
    t0 = stamps[0]
    mean_offset = round(float(np.mean([(t - t0).total_seconds() for t in stamps])), 3)
    return (t0 + timedelta(seconds=mean_offset)).isoformat(timespec="milliseconds")


def stack_statistics(headers: Sequence[fits.Header]) -> dict[str, float | str | int]:
    """Mean times, summed exposure and mean pointing of the inputs.

    Returns
    -------
    dict
        ``MJD``, ``JD``, ``DATE-OBS``, ``MJD-MID``, ``EXPTIME`` (s), ``NCOMBINE`` and, when
        the inputs carry them, ``DATE-LOC``, ``AIRMASS``, ``CENTALT`` (deg), ``CENTAZ`` (deg).
    """
    if not headers:
        raise ValueError("no input headers")
    starts = np.array([start_mjd(h) for h in headers])
    exptimes = np.array([_float(h, "EXPTIME") or 0.0 for h in headers])
    mjd = float(starts.mean())
    t = Time(mjd, format="mjd", scale="utc")
    total = float(exptimes.sum())
    mids = starts + exptimes / 2.0 / 86400.0
    mjd_mid = float(np.average(mids, weights=exptimes)) if total > 0 else float(mids.mean())
    out: dict[str, float | str | int] = {
        "MJD": mjd,
        "JD": float(t.jd),
        "DATE-OBS": t.isot,
        "MJD-MID": mjd_mid,
        "EXPTIME": total,
        "NCOMBINE": len(headers),
    }
    date_loc = mean_local_time([h.get("DATE-LOC") for h in headers])
    if date_loc:
        out["DATE-LOC"] = date_loc
    for key in ("AIRMASS", "CENTALT"):
        value = mean_of([_float(h, key) for h in headers])
        if value is not None:
            out[key] = value
    az = circular_mean_deg([_float(h, "CENTAZ") for h in headers])
    if az is not None:
        out["CENTAZ"] = az
    return out


_COMMENTS = {
    "MJD": "mean start of the inputs (MJD, UTC)",
    "JD": "mean start of the inputs (JD, UTC)",
    "DATE-OBS": "mean start of the inputs (UTC)",
    "MJD-MID": "exposure-weighted mean mid-exposure (MJD)",
    "EXPTIME": "total exposure time of the inputs (s)",
    "EXPOSURE": "total exposure time of the inputs (s)",
    "NCOMBINE": "number of combined inputs",
    "DATE-LOC": "mean local start of the inputs",
    "AIRMASS": "mean airmass of the inputs",
    "CENTALT": "mean altitude of the inputs (deg)",
    "CENTAZ": "circular mean azimuth of the inputs (deg)",
}


def build_stack_header(wcs_header: fits.Header, inputs: Sequence[fits.Header], names: Sequence[str | Path],
                       *, egain: float, saturate: float, zp: float | None, factors: Sequence[float],
                       reference: str, combine: str, resampling: str, single: bool,
                       visit: str = "", centre_source: str = "", tile: str = "") -> fits.Header:
    """The full header of a stack (without provenance, which the service stamps).

    Parameters
    ----------
    wcs_header : astropy.io.fits.Header
        The output grid's WCS.
    inputs : sequence of Header
        Headers of the inputs that took part, in time order; the first is the reference.
    names : sequence of str or Path
        Their file names (written as ``IMCMBnnn``).
    egain : float
        Effective gain (e- per stack unit).
    saturate : float
        Saturation level (stack units).
    zp : float or None
        Zero point of the pixel units (mag for 1 unit), None when scaled by exposure time.
    factors : sequence of float
        Flux factor of each input (``FSCLnnn``).
    reference : str
        File name of the reference input (defines the units).
    combine, resampling : str
        SWarp ``COMBINE_TYPE`` and ``RESAMPLING_TYPE``.
    single : bool
        True for a one-frame visit (resampled, not combined).
    visit, centre_source, tile : str
        Visit id, where the grid centre came from, tile name.
    """
    h = fits.Header()
    for card in wcs_header.cards:
        if card.keyword not in ("SIMPLE", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "EXTEND", "", "COMMENT", "HISTORY"):
            h[card.keyword] = (card.value, card.comment)
    ref = inputs[0]
    for key in COPY_KEYWORDS:
        if key in ref:
            h[key] = (ref[key], ref.comments[key])
    stats = stack_statistics(inputs)
    for key, value in stats.items():
        h[key] = (value, _COMMENTS.get(key, ""))
    h["EXPOSURE"] = (stats["EXPTIME"], _COMMENTS["EXPOSURE"])
    h["EGAIN"] = (float(egain), "effective gain of the stack (e-/unit)")
    h["SATURATE"] = (float(saturate), "saturation level (stack units, sky removed)")
    h["STKUNIT"] = ("ADU of reference frame" if zp is not None else "ADU of ref frame, EXPTIME-scaled",
                    "pixel units of the stack")
    set_card(h, "STKREF", Path(reference).name[:68], "input that defines the units")
    if zp is not None:
        h["STKZP"] = (float(zp), "zero point of the pixel units (mag for 1 unit)")
    h["STKSCAL"] = ("ZP_AUTO" if zp is not None else "EXPTIME", "how inputs were put on one flux scale")
    h["COMBINET"] = (combine, "SWarp COMBINE_TYPE")
    h["RESAMPT"] = (resampling, "SWarp RESAMPLING_TYPE")
    h["BKGSUB"] = (True, "sky background subtracted before combining")
    h["SINGLE"] = (bool(single), "one-frame visit, resampled only")
    if visit:
        h["VISIT"] = (visit[:68], "visit id")
    if centre_source:
        h["GRIDSRC"] = (centre_source, "grid centre from skygrid, objctradec or radec")
    if tile:
        h["TILE"] = (tile, "sky-grid tile")
    for i, (name, f) in enumerate(zip(names, factors, strict=True), start=1):
        if i > 999:
            break
        set_card(h, f"IMCMB{i:03d}", Path(name).name[:68], "combined input")
        h[f"FSCL{i:03d}"] = (float(f), "flux factor applied to this input")
    return h
