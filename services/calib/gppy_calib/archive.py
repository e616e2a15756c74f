"""The master-frame archive: names, parsing, and choosing a master to borrow or compare with.

Layout (v1 names, v1-behaviour.md §4.3-§4.5): ``<path_mframe>/<UNIT>/zero/<YYYYMMDD>-zero.fits``,
``<path_mframe>/<UNIT>/dark/<EXPTIME>-<YYYYMMDD>-dark.fits`` and
``<path_mframe>/<UNIT>/flat/<YYYYMMDD>-n<FILTER>.fits``. Masters that fail quality control go
to ``<kind folder>/rejected/`` under the same name and are never borrowed.

Choice of an archived master (fixes v1 bugs B15 and B17): candidates are parsed from exact
names (the filter must match exactly, not as a substring); the one chosen minimises, in
this order,

1. ``|date - reference|`` in days, the archive date read as midnight UTC and the reference
   being the mean DATE-OBS of the frames that need the master,
2. for darks, ``|EXPTIME - wanted exposure time|``,
3. the date itself (the earlier of two equally distant dates wins),
4. for darks, the longer exposure time, then the file name.

So two equally good files never crash the choice, and the result does not depend on the
order of a directory listing. Nothing here touches the file system.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from astropy.time import Time

_ZERO = re.compile(r"^(\d{8})-zero\.fits$")
_DARK = re.compile(r"^(\d+(?:\.\d+)?)-(\d{8})-dark\.fits$")
_FLAT = re.compile(r"^(\d{8})-n(.+)\.fits$")

KIND_FOLDERS = {"bias": "zero", "dark": "dark", "flat": "flat"}


@dataclass(frozen=True)
class ArchivedMaster:
    """One master file of the archive, as its name describes it.

    Attributes
    ----------
    path : pathlib.Path
    kind : {"bias", "dark", "flat"}
    date : str
        ``YYYYMMDD``.
    exptime : float
        Dark exposure time, s (0 for bias and flat).
    filter : str
        Flat filter ("" otherwise).
    """

    path: Path
    kind: str
    date: str
    exptime: float = 0.0
    filter: str = ""

    @property
    def mjd(self) -> float:
        """Midnight UTC of :attr:`date`, MJD."""
        return float(Time(f"{self.date[:4]}-{self.date[4:6]}-{self.date[6:]}T00:00:00", scale="utc").mjd)

    @property
    def iso_date(self) -> str:
        return f"{self.date[:4]}-{self.date[4:6]}-{self.date[6:]}"

    def describe(self) -> str:
        """``<file> from <YYYY-MM-DD>``, as written into night plans."""
        return f"{self.path.name} from {self.iso_date}"


def parse_name(path: str | Path, kind: str) -> ArchivedMaster | None:
    """The :class:`ArchivedMaster` a file name describes, or None if it is not one."""
    p = Path(path)
    name = p.name
    if kind == "bias":
        m = _ZERO.match(name)
        return ArchivedMaster(p, "bias", m.group(1)) if m else None
    if kind == "dark":
        m = _DARK.match(name)
        return ArchivedMaster(p, "dark", m.group(2), exptime=float(m.group(1))) if m else None
    if kind == "flat":
        m = _FLAT.match(name)
        return ArchivedMaster(p, "flat", m.group(1), filter=m.group(2)) if m else None
    raise ValueError(f"unknown master kind {kind!r}")


def parse_listing(paths: list[str | Path], kind: str) -> list[ArchivedMaster]:
    """Every file of ``paths`` that names a ``kind`` master, sorted by name."""
    out = [m for m in (parse_name(p, kind) for p in paths) if m is not None]
    return sorted(out, key=lambda m: m.path.name)


def choose(candidates: list[ArchivedMaster], reference_mjd: float, *, exptime: float | None = None,
           filt: str | None = None, exclude_dates: tuple[str, ...] = (),
           before: str | None = None) -> ArchivedMaster | None:
    """The archived master to use (rule in the module docstring), or None.

    Parameters
    ----------
    candidates : list of ArchivedMaster
    reference_mjd : float
        Mean DATE-OBS (MJD, UTC) of the frames that need the master.
    exptime : float, optional
        Wanted dark exposure time, s (darks only).
    filt : str, optional
        Required filter (flats only; exact match).
    exclude_dates : tuple of str
        ``YYYYMMDD`` dates to ignore (e.g. tonight's own master).
    before : str, optional
        Only dates strictly before this ``YYYYMMDD`` (the "previous" master for QC).
    """
    pool = [c for c in candidates
            if (filt is None or c.filter == filt) and c.date not in exclude_dates
            and (before is None or c.date < before)]
    if not pool:
        return None

    def key(c: ArchivedMaster):
        dt = abs(c.mjd - reference_mjd)
        de = abs(c.exptime - exptime) if exptime is not None else 0.0
        return (round(dt, 6), round(de, 6), c.date, -c.exptime, c.path.name)

    return min(pool, key=key)
