"""Raw-frame headers: normalisation (``changehdr.dat``), classification and the keywords the
calibration needs (v1-behaviour.md §3.2-§3.4).

Everything here works on :class:`astropy.io.fits.Header` objects; nothing reads files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from astropy.io import fits
from astropy.time import Time

from gppy.tables import apply_changehdr

FrameKind = Literal["science", "bias", "dark", "flat"]

#: IMAGETYP values (compared in lower case, after ``changehdr.dat``) -> frame kind.
IMAGETYP_KINDS: dict[str, FrameKind] = {
    "object": "science", "light": "science", "light frame": "science", "science": "science",
    "bias": "bias", "zero": "bias", "bias frame": "bias",
    "dark": "dark", "dark frame": "dark",
    "flat": "flat", "flat field": "flat", "flat frame": "flat", "skyflat": "flat", "domeflat": "flat",
}


class HeaderProblem(ValueError):
    """A header that does not allow the frame to be used; the message is the reason."""


@dataclass(frozen=True)
class FrameInfo:
    """What the calibration needs to know about one raw frame.

    Attributes
    ----------
    path : str
        Raw file.
    kind : {"science", "bias", "dark", "flat"}
    exptime : float
        Exposure time, s.
    date_obs : str
        Start of the exposure, ISO UTC (``YYYY-MM-DDThh:mm:ss[.fff]``).
    mjd : float
        ``date_obs`` as MJD (UTC), days.
    shape : (int, int)
        ``(NAXIS2, NAXIS1)``, pixels.
    filter : str
        Filter name ("" for bias and dark frames).
    object : str
        OBJECT ("" for calibration frames).
    header : astropy.io.fits.Header
        The normalised header (a copy; the raw file is never touched).
    changes : list of str
        The ``changehdr.dat`` rules that changed a value.
    """

    path: str
    kind: FrameKind
    exptime: float
    date_obs: str
    mjd: float
    shape: tuple[int, int]
    filter: str = ""
    object: str = ""
    header: fits.Header = field(default_factory=fits.Header, compare=False, repr=False)
    changes: tuple[str, ...] = ()


def normalise(header: fits.Header, rules: list[tuple[str, str, str]]) -> tuple[fits.Header, list[str]]:
    """A copy of ``header`` with the ``changehdr.dat`` rules applied in order (v1 §3.4).

    Also completes a date-only ``DATE-OBS`` with ``TIME-OBS`` (the legacy routine did so).

    Returns
    -------
    header : astropy.io.fits.Header
        The normalised copy.
    changes : list of str
        One line per change made.
    """
    out = header.copy()
    changes = apply_changehdr(out, rules)
    date = str(out.get("DATE-OBS", "")).strip()
    if date and "T" not in date and out.get("TIME-OBS"):
        out["DATE-OBS"] = f"{date}T{str(out['TIME-OBS']).strip()}"
        changes.append("DATE-OBS: completed with TIME-OBS")
    return out, changes


def classify(header: fits.Header) -> FrameKind:
    """Frame kind from ``IMAGETYP`` (case-insensitive, after normalisation).

    Raises
    ------
    HeaderProblem
        If IMAGETYP is missing or not a known frame type.
    """
    if "IMAGETYP" not in header:
        raise HeaderProblem("no IMAGETYP keyword: cannot classify the frame")
    value = str(header["IMAGETYP"]).strip().lower()
    kind = IMAGETYP_KINDS.get(value)
    if kind is None:
        raise HeaderProblem(f"IMAGETYP {header['IMAGETYP']!r} is not a known frame type "
                            f"(expected light/object, bias/zero, dark or flat)")
    return kind


def _text(header: fits.Header, key: str) -> str:
    value = header.get(key)
    if value is None:
        return ""
    return str(value).strip()


def parse_date_obs(value: str) -> Time:
    """``DATE-OBS`` as an astropy Time (UTC); raises :class:`HeaderProblem`."""
    try:
        t = Time(str(value).strip(), format="isot", scale="utc")
    except (ValueError, TypeError) as exc:
        raise HeaderProblem(f"DATE-OBS {value!r} is not an ISO date-time") from exc
    return t


def describe(path: str, header: fits.Header, rules: list[tuple[str, str, str]]) -> FrameInfo:
    """Normalise, classify and check one raw header.

    Parameters
    ----------
    path : str
        The raw file (recorded, never opened here).
    header : astropy.io.fits.Header
        Its primary header as read.
    rules : list of (key, val, newval)
        ``changehdr.dat`` rules.

    Raises
    ------
    HeaderProblem
        With the reason when the frame cannot be used (unknown type, missing or invalid
        EXPTIME / DATE-OBS / FILTER / OBJECT, not a 2-D image).
    """
    hdr, changes = normalise(header, rules)
    kind = classify(hdr)
    if int(hdr.get("NAXIS", 0)) != 2:
        raise HeaderProblem(f"not a 2-D image (NAXIS={hdr.get('NAXIS', 0)})")
    shape = (int(hdr.get("NAXIS2", 0)), int(hdr.get("NAXIS1", 0)))
    if min(shape) < 1:
        raise HeaderProblem(f"empty image (NAXIS1={shape[1]}, NAXIS2={shape[0]})")
    if "EXPTIME" not in hdr:
        raise HeaderProblem("no EXPTIME keyword")
    try:
        exptime = float(hdr["EXPTIME"])
    except (TypeError, ValueError) as exc:
        raise HeaderProblem(f"EXPTIME {hdr['EXPTIME']!r} is not a number") from exc
    if not np.isfinite(exptime) or exptime < 0:
        raise HeaderProblem(f"EXPTIME {exptime} is not a valid exposure time")
    if kind in ("dark", "flat", "science") and exptime <= 0:
        raise HeaderProblem(f"EXPTIME {exptime} s is not positive for a {kind} frame")
    date_obs = _text(hdr, "DATE-OBS")
    if not date_obs:
        raise HeaderProblem("no DATE-OBS keyword")
    t = parse_date_obs(date_obs)
    filt = _text(hdr, "FILTER") if kind in ("flat", "science") else ""
    if kind in ("flat", "science") and not filt:
        raise HeaderProblem(f"no FILTER keyword on a {kind} frame")
    obj = _text(hdr, "OBJECT") if kind == "science" else ""
    if kind == "science" and not obj:
        raise HeaderProblem("no OBJECT keyword on a science frame")
    return FrameInfo(path=str(path), kind=kind, exptime=exptime, date_obs=t.isot, mjd=float(t.mjd),
                     shape=shape, filter=filt, object=obj, header=hdr, changes=tuple(changes))


def mean_date(mjds: list[float]) -> Time:
    """Mean of MJDs as a UTC Time (v1 dates masters by the mean DATE-OBS of their inputs)."""
    if not mjds:
        raise ValueError("no dates to average")
    return Time(float(np.mean(mjds)), format="mjd", scale="utc")


def yyyymmdd(t: Time) -> str:
    """``YYYYMMDD`` of a Time (UTC)."""
    return t.to_datetime().strftime("%Y%m%d")
