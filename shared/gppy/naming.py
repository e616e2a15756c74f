"""Every product's name and place (v1-behaviour.md §4, §5.4, §6.1, §7, §8, §10, §11.3).

Stages write their products straight into the processed tree
``<path_processed>/<OBJ>/<UNIT>/<FILT>/`` (singles and stacks), with ``phot/``,
``transient/``, ``transient/fits_image/``, ``transient/png_image/`` and ``header/`` below it.
A night's scratch space is ``<path_scratch>/<UNIT>/<night folder>/`` and is removed when the
night ends.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from astropy.time import Time

_SAFE = re.compile(r"[^A-Za-z0-9+\-.]")


def sanitize(value: object, what: str = "value") -> str:
    """Make a header value safe as one file-name field.

    Keeps letters, digits, ``+ - .``; every other character (``/``, spaces, quotes, shell
    metacharacters, non-ASCII, ``_`` which separates name fields) becomes ``-``. Leading dots
    are dropped so that ``..`` can never name a parent directory.

    Raises
    ------
    ValueError
        If nothing usable is left.
    """
    text = _SAFE.sub("-", str(value).strip())
    text = re.sub(r"\.{2,}", "-", text).lstrip(".-")
    if not text:
        raise ValueError(f"{what} {value!r} is empty after sanitising")
    return text[:64]


def format_exptime(exptime: float) -> str:
    """EXPTIME as v1 writes it in names: ``60`` when whole, ``0.5`` otherwise."""
    value = float(exptime)
    if value.is_integer():
        return str(int(value))
    return f"{value:g}"


def date_time_fields(date_obs: str) -> tuple[str, str]:
    """``(YYYYMMDD, HHMMSS)`` from an ISO DATE-OBS, seconds truncated (as v1's strftime)."""
    t = Time(date_obs, format="isot", scale="utc").to_datetime()
    return t.strftime("%Y%m%d"), t.strftime("%H%M%S")


def calib_name(unit: str, obj: str, date_obs: str, filt: str, exptime: float) -> str:
    """``calib_<UNIT>_<OBJ>_<YYYYMMDD>_<HHMMSS>_<FILT>_<EXPTIME>.fits``."""
    d, t = date_time_fields(date_obs)
    return (f"calib_{sanitize(unit, 'UNIT')}_{sanitize(obj, 'OBJECT')}_{d}_{t}_"
            f"{sanitize(filt, 'FILTER')}_{format_exptime(exptime)}.fits")


def stack_name(unit: str, obj: str, date_obs: str, filt: str, exptime_total: float) -> str:
    """``calib_<UNIT>_<OBJ>_<YYYYMMDD>_<HHMMSS>_<FILT>_<EXPTIME_total>.com.fits``."""
    return calib_name(unit, obj, date_obs, filt, exptime_total)[:-5] + ".com.fits"


def stem(path: str | Path) -> str:
    """File name without the final ``.fits``."""
    name = Path(path).name
    return name[:-5] if name.endswith(".fits") else Path(name).stem


def sibling(path: str | Path, suffix: str) -> Path:
    """``<stem><suffix>`` next to ``path`` (``.weight.fits``, ``.flag.fits``, ...)."""
    p = Path(path)
    return p.with_name(stem(p) + suffix)


def weight_of(path: str | Path) -> Path:
    """Inverse-variance weight map of an image: ``<stem>.weight.fits``."""
    return sibling(path, ".weight.fits")


def flag_of(path: str | Path) -> Path:
    """Bit-mask (flag) image of an image: ``<stem>.mask.fits`` (uint16, see gppy.masks)."""
    return sibling(path, ".mask.fits")


def master_zero(mframe: Path, unit: str, yyyymmdd: str) -> Path:
    return Path(mframe) / unit / "zero" / f"{yyyymmdd}-zero.fits"


def master_dark(mframe: Path, unit: str, exptime: float, yyyymmdd: str) -> Path:
    return Path(mframe) / unit / "dark" / f"{format_exptime(round(float(exptime)))}-{yyyymmdd}-dark.fits"


def master_flat(mframe: Path, unit: str, filt: str, yyyymmdd: str) -> Path:
    return Path(mframe) / unit / "flat" / f"{yyyymmdd}-n{sanitize(filt, 'FILTER')}.fits"


@dataclass(frozen=True)
class ProductDirs:
    """The processed tree of one (OBJECT, UNIT, FILTER)."""

    base: Path

    @classmethod
    def of(cls, processed: Path, obj: str, unit: str, filt: str) -> ProductDirs:
        return cls(Path(processed) / sanitize(obj, "OBJECT") / sanitize(unit, "UNIT") / sanitize(filt, "FILTER"))

    @property
    def phot(self) -> Path:
        return self.base / "phot"

    @property
    def transient(self) -> Path:
        return self.base / "transient"

    @property
    def fits_image(self) -> Path:
        return self.base / "transient" / "fits_image"

    @property
    def png_image(self) -> Path:
        return self.base / "transient" / "png_image"

    @property
    def header(self) -> Path:
        return self.base / "header"


def scratch_dir(scratch_root: Path, unit: str, night_dir: str | Path) -> Path:
    """Per-night scratch folder, removed when the night ends."""
    return Path(scratch_root) / sanitize(unit, "UNIT") / Path(night_dir).name


def night_id(unit: str, night_dir: str | Path) -> str:
    """Canonical night key ``<UNIT>_<night folder name>`` (e.g. ``7DT07_2024-04-23_gain2750``)."""
    folder = re.sub(r"[^A-Za-z0-9\-_]", "-", Path(night_dir).name).lstrip("-.")
    if not folder:
        raise ValueError(f"night folder {night_dir!r} has no usable name")
    return f"{sanitize(unit, 'UNIT')}_{folder[:80]}"


def night_folder(night_id: str, unit: str) -> str:
    """The night folder name inside a night id (inverse of :func:`night_id`)."""
    prefix = f"{sanitize(unit, 'UNIT')}_"
    return night_id[len(prefix):] if night_id.startswith(prefix) else night_id


def phot_catalogue(image: Path, dirs: ProductDirs) -> Path:
    """``phot/<stem>.phot.cat``."""
    return dirs.phot / f"{stem(image)}.phot.cat"


def difference_name(stack_path: Path, dirs: ProductDirs) -> Path:
    """``transient/<stem>.subt.fits``."""
    return dirs.transient / f"{stem(stack_path)}.subt.fits"


def convolved_reference_name(ref_path: Path, sci_date_obs: str, dirs: ProductDirs) -> Path:
    """v1 §8.4: the reference name with fields 3-4 replaced by the science date and time,
    ``.fits`` -> ``.conv.fits``, in ``transient/``."""
    parts = stem(ref_path).split("_")
    d, t = date_time_fields(sci_date_obs)
    if len(parts) >= 5:
        parts[3], parts[4] = d, t
    return dirs.transient / ("_".join(parts) + ".conv.fits")


def now_stamp() -> str:
    return datetime.utcnow().strftime("%Y-%m-%dT%H:%M:%S")
