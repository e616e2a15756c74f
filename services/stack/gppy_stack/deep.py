"""Deep stacks across nights and 7DT references (v1-behaviour.md §6.2, §8.1).

v1 kept a separate, interactive tool for this, with hard-coded save roots. Here a
``deepstack.request`` (``gppy deep-stack OBJ FILT ...``) makes the stage select calibrated
singles of one target and filter from the processed tree, put them on one photometric scale
by their zero points, coadd them onto the target's tile grid and write either

* a deep stack ``<processed>/<OBJ>/7DT/<FILT>/calib_7DT_<OBJ>_<YYYYMMDD>_<HHMMSS>_<FILT>_<EXPTIME>.com.fits``
  (the unit is the literal ``7DT``, as in v1, since units may be mixed), or
* a 7DT reference ``<ref_frame>/<FILT>/ref_7DT_<OBJ>_<YYYYMMDD>_<HHMMSS>_<FILT>_<EXPTIME>.com.fits``,
  which the subtraction stage prefers to a PS1 reference (v1 §8.1) and which, lying on the
  tile grid, needs no reprojection.

The date and time in the name are those of the mean DATE-OBS, EXPTIME is the total. Selection
(v1's ``select_image``: median cuts on the seeing or depth distribution):

* ``all``: every single with a zero point;
* ``seeing``: those with ``SEEING`` at or below the median of the candidates;
* ``depth``: those with ``UL5_1`` (5-sigma depth in the 2xseeing aperture) at or above the
  median.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.time import Time

from gppy.naming import date_time_fields, format_exptime, sanitize, stack_name

from .scaling import zero_point

#: File names of calibrated singles (not stacks, weights or masks).
SINGLE_NAME = re.compile(r"^calib_[^_]+_[^_]+_\d{8}_\d{6}_[^_]+_[0-9]+(\.[0-9]+)?\.fits$")
#: Unit field of deep stacks.
DEEP_UNIT = "7DT"


@dataclass(frozen=True)
class Candidate:
    """A calibrated single that may enter a deep stack."""

    path: Path
    night: str            # YYYY-MM-DD, local date of the evening the night began
    date_obs: str
    exptime: float
    zp: float | None
    seeing: float | None  # arcsec
    depth: float | None   # UL5_1, mag


def night_of(header: fits.Header) -> str:
    """Night (``YYYY-MM-DD``, the local date at the start of the night) of a frame.

    From ``DATE-LOC`` minus 12 h when present (a 7DT night folder is named after the local
    evening's date), else from ``DATE-OBS`` (UTC) minus 15 h, which gives the same date for
    a site at UTC-3 to UTC-5 such as 7DT's.
    """
    loc = header.get("DATE-LOC")
    if loc:
        try:
            return (datetime.fromisoformat(str(loc).strip()) - timedelta(hours=12)).strftime("%Y-%m-%d")
        except ValueError:
            pass
    t = Time(str(header["DATE-OBS"]).strip(), format="isot", scale="utc").to_datetime()
    return (t - timedelta(hours=15)).strftime("%Y-%m-%d")


def normalise_night(text: str) -> str:
    """``YYYY-MM-DD`` from ``YYYY-MM-DD``, ``YYYYMMDD``, a night folder name
    (``2024-04-23_gain2750``) or a night id (``7DT07_2024-04-23_gain2750``).

    Raises
    ------
    ValueError
        If no date is found.
    """
    m = re.search(r"(\d{4})-?(\d{2})-?(\d{2})", str(text))
    if not m:
        raise ValueError(f"night {text!r}: expected YYYY-MM-DD or YYYYMMDD")
    datetime(int(m[1]), int(m[2]), int(m[3]))  # raises on impossible dates
    return f"{m[1]}-{m[2]}-{m[3]}"


def _opt_float(header: fits.Header, key: str) -> float | None:
    try:
        value = float(header[key])
    except (KeyError, TypeError, ValueError):
        return None
    return value if np.isfinite(value) and value != 0.0 else None


def candidate_from_header(path: Path, header: fits.Header) -> Candidate:
    """A :class:`Candidate` from a single's header (phot keys ZP_AUTO, SEEING, UL5_1)."""
    return Candidate(path=Path(path), night=night_of(header), date_obs=str(header["DATE-OBS"]),
                     exptime=float(header.get("EXPTIME", 0.0) or 0.0), zp=zero_point(header),
                     seeing=_opt_float(header, "SEEING"), depth=_opt_float(header, "UL5_1"))


def is_single_name(name: str) -> bool:
    """True for a calibrated single's file name (not a stack, weight or mask)."""
    return bool(SINGLE_NAME.match(name))


def select_frames(candidates: Sequence[Candidate], select: str = "all",
                  nights: Iterable[str] | None = None) -> tuple[list[Candidate], dict[str, str]]:
    """Choose the frames of a deep stack.

    Parameters
    ----------
    candidates : sequence of Candidate
    select : {"all", "seeing", "depth"}
    nights : iterable of str, optional
        Only these nights (any form :func:`normalise_night` accepts).

    Returns
    -------
    chosen : list of Candidate
        In time order.
    rejected : dict
        Path -> reason.
    """
    if select not in ("all", "seeing", "depth"):
        raise ValueError(f"select must be all, seeing or depth, not {select!r}")
    wanted = {normalise_night(n) for n in nights} if nights else None
    rejected: dict[str, str] = {}
    pool: list[Candidate] = []
    for c in candidates:
        if wanted is not None and c.night not in wanted:
            rejected[str(c.path)] = f"night {c.night} not requested"
        elif c.zp is None:
            rejected[str(c.path)] = "no zero point (ZP_AUTO)"
        else:
            pool.append(c)
    if select == "seeing":
        known = [c for c in pool if c.seeing is not None]
        for c in pool:
            if c.seeing is None:
                rejected[str(c.path)] = "no SEEING"
        cut = float(np.median([c.seeing for c in known])) if known else 0.0
        pool = [c for c in known if c.seeing <= cut]  # type: ignore[operator]
        for c in known:
            if c.seeing > cut:  # type: ignore[operator]
                rejected[str(c.path)] = f"SEEING {c.seeing:.2f} above the median {cut:.2f}"
    elif select == "depth":
        known = [c for c in pool if c.depth is not None]
        for c in pool:
            if c.depth is None:
                rejected[str(c.path)] = "no UL5_1"
        cut = float(np.median([c.depth for c in known])) if known else 0.0
        pool = [c for c in known if c.depth >= cut]  # type: ignore[operator]
        for c in known:
            if c.depth < cut:  # type: ignore[operator]
                rejected[str(c.path)] = f"UL5_1 {c.depth:.2f} below the median {cut:.2f}"
    pool.sort(key=lambda c: (Time(c.date_obs, format="isot", scale="utc").mjd, str(c.path)))
    return pool, rejected


def deep_stack_name(obj: str, date_obs: str, filt: str, exptime_total: float) -> str:
    """``calib_7DT_<OBJ>_<YYYYMMDD>_<HHMMSS>_<FILT>_<EXPTIME>.com.fits``."""
    return stack_name(DEEP_UNIT, obj, date_obs, filt, exptime_total)


def reference_name(obj: str, date_obs: str, filt: str, exptime_total: float) -> str:
    """``ref_7DT_<OBJ>_<YYYYMMDD>_<HHMMSS>_<FILT>_<EXPTIME>.com.fits``."""
    d, t = date_time_fields(date_obs)
    return (f"ref_{DEEP_UNIT}_{sanitize(obj, 'OBJECT')}_{d}_{t}_{sanitize(filt, 'FILTER')}_"
            f"{format_exptime(exptime_total)}.com.fits")


def reference_dir(ref_frame: Path, filt: str) -> Path:
    """``<ref_frame>/<FILT>/``."""
    return Path(ref_frame) / sanitize(filt, "FILTER")
