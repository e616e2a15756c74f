"""Grouping of science frames into visits (fixes v1 bugs B3, B4, B6).

Frames are grouped by (OBJECT, FILTER); within a group, sorted by start time, a new visit
starts when the gap from the *end* of one exposure (DATE-OBS + EXPTIME) to the *start* of the
next exceeds ``gap_s`` (default 300 s). Every exposure time takes part, and a one-frame visit
is a visit.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from astropy.time import Time

from gppy.naming import date_time_fields, sanitize


@dataclass(frozen=True)
class FrameInfo:
    key: str          # any identifier (a path)
    object: str
    filter: str
    date_obs: str     # ISO UTC start
    exptime: float    # s


def visit_id(obj: str, filt: str, first_date_obs: str) -> str:
    d, t = date_time_fields(first_date_obs)
    return f"{sanitize(obj, 'OBJECT')}_{sanitize(filt, 'FILTER')}_{d}_{t}"


def group_visits(frames: list[FrameInfo], gap_s: float = 300.0) -> dict[str, list[FrameInfo]]:
    """Visit id -> frames of that visit in time order."""
    by_target: dict[tuple[str, str], list[FrameInfo]] = defaultdict(list)
    for f in frames:
        by_target[(f.object, f.filter)].append(f)
    visits: dict[str, list[FrameInfo]] = {}
    for (obj, filt), group in sorted(by_target.items()):
        group.sort(key=lambda f: (f.date_obs, f.key))
        current: list[FrameInfo] = []
        last_end = None
        for f in group:
            start = Time(f.date_obs, format="isot", scale="utc").unix
            if current and last_end is not None and start - last_end > gap_s:
                visits[visit_id(obj, filt, current[0].date_obs)] = current
                current = []
            current.append(f)
            last_end = start + float(f.exptime)
        if current:
            visits[visit_id(obj, filt, current[0].date_obs)] = current
    return visits
