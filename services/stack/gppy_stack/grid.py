"""The 7DS sky grid and the stack's output pixel grid (v1-behaviour.md §6.1).

Tile centres come from a sky-grid table in the 7DS ``skygrid.fits`` format: a FITS binary
table (first extension) with the columns ``id`` (int), ``ra`` and ``dec`` (deg, ICRS) and
``tile`` (``T#####``). Its path is ``PathConfig.skygrid`` (path.json key ``skygrid``). A small
built-in table (:func:`builtin_skygrid`) stands in when no file is configured; it only knows
a handful of tiles and is meant for tests and demos, never for survey data.

Every nightly stack of one tile lands on the same pixel grid: ``10200 x 6800`` pixels of
0.505" in a TAN projection, north up and east left, with the tile centre at the grid's centre
(pixel ``((NAXIS1 + 1) / 2, (NAXIS2 + 1) / 2)``, 1-based, the convention SWarp uses for
``CENTER_TYPE MANUAL``). That is what lets the subtraction stage use a reference made on the
same grid without reprojection. Fields that are not tiles are centred on their
``OBJCTRA``/``OBJCTDEC``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy import units as u
from astropy.coordinates import Angle
from astropy.io import fits

#: OBJECT values that name a sky-grid tile.
TILE_PATTERN = re.compile(r"^T\d{5}$")


@dataclass(frozen=True)
class Tile:
    """One sky-grid cell: its name and centre (deg, ICRS)."""

    name: str
    ra: float
    dec: float


class SkyGrid:
    """A sky-grid table: tile name -> centre, plus nearest-tile search.

    Parameters
    ----------
    ids : array of int
        Tile numbers.
    ra, dec : array of float
        Tile centres (deg).
    names : array of str
        Tile names (``T#####``).
    source : str
        Where the table came from (file path or ``"built-in"``), for headers and logs.
    """

    def __init__(self, ids, ra, dec, names, source: str = "built-in"):
        self.ids = np.asarray(ids, dtype=np.int64)
        self.ra = np.asarray(ra, dtype=np.float64)
        self.dec = np.asarray(dec, dtype=np.float64)
        self.names = np.array([str(n).strip() for n in names])
        if not (len(self.ids) == len(self.ra) == len(self.dec) == len(self.names)):
            raise ValueError("sky grid: columns id, ra, dec, tile differ in length")
        self.source = source
        self._index = {name: i for i, name in enumerate(self.names)}

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name: object) -> bool:
        return str(name).strip() in self._index

    def tile(self, name: str) -> Tile | None:
        """The tile called ``name`` (``T#####``), or None if the table does not have it."""
        i = self._index.get(str(name).strip())
        if i is None:
            return None
        return Tile(self.names[i], float(self.ra[i]), float(self.dec[i]))

    def nearest(self, ra: float, dec: float) -> Tile:
        """The tile whose centre is nearest to (``ra``, ``dec``) in deg."""
        if len(self) == 0:
            raise ValueError("sky grid is empty")
        r1, d1 = np.deg2rad(ra), np.deg2rad(dec)
        r2, d2 = np.deg2rad(self.ra), np.deg2rad(self.dec)
        cosd = np.sin(d1) * np.sin(d2) + np.cos(d1) * np.cos(d2) * np.cos(r1 - r2)
        i = int(np.argmax(cosd))
        return Tile(self.names[i], float(self.ra[i]), float(self.dec[i]))


def skygrid_from_hdul(hdul: fits.HDUList, source: str = "file") -> SkyGrid:
    """A :class:`SkyGrid` from an open 7DS sky-grid FITS file (first table extension).

    Raises
    ------
    ValueError
        If no extension holds the columns ``id``, ``ra``, ``dec`` and ``tile``.
    """
    for hdu in hdul:
        if not isinstance(hdu, fits.BinTableHDU):
            continue
        cols = {c.lower(): c for c in hdu.columns.names}
        if {"id", "ra", "dec", "tile"} <= set(cols):
            data = hdu.data
            names = [n.decode() if isinstance(n, bytes) else n for n in data[cols["tile"]]]
            return SkyGrid(data[cols["id"]], data[cols["ra"]], data[cols["dec"]], names, source)
    raise ValueError(f"{source}: no table with the columns id, ra, dec, tile")


def read_skygrid(path: str | Path | None) -> SkyGrid:
    """Read the sky-grid table at ``path``; the built-in table when ``path`` is None.

    Raises
    ------
    ValueError
        If the file cannot be read or lacks the 7DS columns.
    """
    if path is None or str(path).strip() == "":
        return builtin_skygrid()
    p = Path(path)
    try:
        with fits.open(p, memmap=False) as hdul:
            return skygrid_from_hdul(hdul, str(p))
    except OSError as exc:
        raise ValueError(f"{p}: cannot read the sky grid: {exc}") from exc


#: The built-in stand-in: a few tiles along the equator and at mid-southern declinations,
#: spaced like the 7DS grid (about 1.28 deg in RA, 0.85 deg in Dec). Test and demo data only.
_BUILTIN = [
    (90001, 150.00, 2.00), (90002, 151.28, 2.00), (90003, 150.00, 2.85),
    (90004, 10.00, -30.00), (90005, 11.48, -30.00), (90006, 10.00, -29.15),
    (90007, 200.00, -45.00), (90008, 201.81, -45.00),
]


def builtin_skygrid() -> SkyGrid:
    """The small built-in sky grid (tiles ``T90001``-``T90008``; see ``_BUILTIN``)."""
    ids = [t[0] for t in _BUILTIN]
    return SkyGrid(ids, [t[1] for t in _BUILTIN], [t[2] for t in _BUILTIN],
                   [f"T{i:05d}" for i in ids], source="built-in")


def parse_radec(ra: object, dec: object) -> tuple[float, float]:
    """(RA, Dec) in deg from decimal degrees or sexagesimal strings.

    ``OBJCTRA`` is hours (``'10 00 00.0'`` or ``'10:00:00'``), ``OBJCTDEC`` degrees
    (``'+02 00 00'``); numbers are taken as degrees.

    Raises
    ------
    ValueError
        If the values cannot be parsed.
    """
    def _one(value: object, hours: bool) -> float:
        if isinstance(value, int | float | np.floating | np.integer):
            return float(value)
        text = str(value).strip()
        if not text:
            raise ValueError("empty coordinate")
        try:
            return float(text)
        except ValueError:
            pass
        text = re.sub(r"[\s:]+", ":", text)
        unit = u.hourangle if hours else u.deg
        return float(Angle(text, unit=unit).to_value(u.deg))

    try:
        ra_deg, dec_deg = _one(ra, True), _one(dec, False)
    except (ValueError, TypeError, u.UnitsError) as exc:
        raise ValueError(f"cannot parse coordinates ({ra!r}, {dec!r}): {exc}") from exc
    if not (-90.0 <= dec_deg <= 90.0):
        raise ValueError(f"declination {dec_deg} out of range")
    return ra_deg % 360.0, dec_deg


@dataclass(frozen=True)
class GridCentre:
    """The centre of a stack's grid and where it came from.

    ``source`` is ``"skygrid"`` (tile table), ``"objctradec"`` (OBJCTRA/OBJCTDEC) or
    ``"radec"`` (the pointing RA/DEC, last resort).
    """

    ra: float
    dec: float
    source: str
    tile: str = ""


def stack_centre(obj: str, header: fits.Header, grid: SkyGrid) -> GridCentre:
    """Where the stack of ``obj`` is centred.

    A tile name (``T#####``) found in ``grid`` gives the tile centre; otherwise (a named field,
    or a tile missing from the table) ``OBJCTRA``/``OBJCTDEC`` of ``header``, then its
    ``RA``/``DEC``.

    Raises
    ------
    ValueError
        If none of these is available.
    """
    name = str(obj).strip()
    if TILE_PATTERN.match(name):
        tile = grid.tile(name)
        if tile is not None:
            return GridCentre(tile.ra, tile.dec, "skygrid", tile.name)
    for kra, kdec, source in (("OBJCTRA", "OBJCTDEC", "objctradec"), ("RA", "DEC", "radec")):
        if kra in header and kdec in header:
            try:
                ra, dec = parse_radec(header[kra], header[kdec])
            except ValueError:
                continue
            return GridCentre(ra, dec, source)
    raise ValueError(f"OBJECT {name!r}: not in the sky grid ({grid.source}) and no OBJCTRA/OBJCTDEC")


def grid_header(ra: float, dec: float, size: tuple[int, int] = (10200, 6800),
                pixel_scale: float = 0.505) -> fits.Header:
    """The WCS header of a stack grid (TAN, north up, east left) centred on (``ra``, ``dec``).

    Parameters
    ----------
    ra, dec : float
        Grid centre (deg, ICRS).
    size : (int, int)
        ``(NAXIS1, NAXIS2)`` in pixels.
    pixel_scale : float
        Pixel scale (arcsec/px).

    Returns
    -------
    astropy.io.fits.Header
        ``NAXIS1/2``, ``CTYPE``, ``CRVAL``, ``CRPIX`` = ``(NAXIS + 1) / 2``, ``CD`` (deg/px),
        ``RADESYS`` ICRS, ``EQUINOX`` 2000.
    """
    nx, ny = int(size[0]), int(size[1])
    if nx < 1 or ny < 1 or pixel_scale <= 0:
        raise ValueError(f"bad grid size {size} or pixel scale {pixel_scale}")
    scale = float(pixel_scale) / 3600.0
    h = fits.Header()
    h["NAXIS"] = 2
    h["NAXIS1"] = nx
    h["NAXIS2"] = ny
    h["EQUINOX"] = 2000.0
    h["RADESYS"] = "ICRS"
    h["CTYPE1"] = "RA---TAN"
    h["CUNIT1"] = "deg"
    h["CRVAL1"] = float(ra) % 360.0
    h["CRPIX1"] = (nx + 1) / 2.0
    h["CD1_1"] = -scale
    h["CD1_2"] = 0.0
    h["CTYPE2"] = "DEC--TAN"
    h["CUNIT2"] = "deg"
    h["CRVAL2"] = float(dec)
    h["CRPIX2"] = (ny + 1) / 2.0
    h["CD2_1"] = 0.0
    h["CD2_2"] = scale
    return h
