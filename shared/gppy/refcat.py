"""Local reference catalogues: the Gaia-XP-like CSV of a field and SCAMP's FITS_LDAC copy.

The pipeline never queries a catalogue server at run time. Each field (OBJECT) has a CSV
``<path_refcat>/gaiaxp_dr3_synphot_<OBJ>.csv`` with Gaia DR3 astrometry at epoch J2016.0
(``ra``, ``dec`` in deg, ``pmra`` = mu_alpha* and ``pmdec`` in mas/yr, ``parallax`` in mas),
the G magnitude and synthetic 7DT magnitudes ``mag_<filter>``. Rows can lack proper motion
or parallax, or carry a negative parallax: such rows are kept and never break a frame
(v1 bug B13).

SCAMP 2.10 does not apply the proper motions of a local reference file, so
:func:`write_scamp_reference` writes positions already propagated to the observation epoch.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import MaskedColumn, Table
from astropy.time import Time

from gppy.fitsio import BadInputError, atomic_path
from gppy.naming import sanitize

#: Gaia DR3 reference epoch (Julian year, TCB; the difference to TT/UTC is irrelevant here).
GAIA_DR3_EPOCH = 2016.0
#: Columns every reference CSV must have.
REQUIRED_COLUMNS = ("ra", "dec", "pmra", "pmdec", "phot_g_mean_mag")
#: Columns converted to float with missing values as NaN (when present).
NUMERIC_COLUMNS = ("ra", "dec", "pmra", "pmdec", "parallax", "phot_g_mean_mag", "bp_rp",
                   "ra_error", "dec_error", "pmra_error", "pmdec_error", "ref_epoch")

#: Positional error assumed at J2016.0 when the CSV has no ``ra_error``/``dec_error`` (mas).
DEFAULT_POS_ERROR_MAS = 1.0
#: Proper-motion error assumed when the CSV has no ``pmra_error``/``pmdec_error`` (mas/yr).
DEFAULT_PM_ERROR_MASYR = 0.5
#: Proper motion assumed, for the error budget only, of a row without one (mas/yr).
MISSING_PM_ERROR_MASYR = 10.0

_MAS_TO_DEG = 1.0 / 3.6e6
#: ``ORIGIN`` of the primary header of the FITS_LDAC references this module writes.
REFERENCE_ORIGIN = "gppy.refcat"


def gaiaxp_path(path_refcat: str | Path, obj: str) -> Path:
    """Reference CSV of a field: ``<path_refcat>/gaiaxp_dr3_synphot_<OBJ>.csv``.

    Parameters
    ----------
    path_refcat : str or Path
        The ``path_refcat`` data root.
    obj : str
        OBJECT header value; sanitised with :func:`gppy.naming.sanitize`.
    """
    return Path(path_refcat) / f"gaiaxp_dr3_synphot_{sanitize(obj, 'OBJECT')}.csv"


def _as_float(col) -> np.ndarray:
    """A table column as float64 with masked/blank values as NaN."""
    if isinstance(col, MaskedColumn):
        data = np.ma.asarray(col).astype(np.float64)
        return np.ma.filled(data, np.nan)
    return np.asarray(col, dtype=np.float64)


def load_gaiaxp(path: str | Path) -> Table:
    """Read a Gaia-XP-like reference CSV.

    Numeric columns (``ra``, ``dec``, ``pmra``, ``pmdec``, ``parallax``, magnitudes...) come
    back as float64 with missing values as NaN (never masked), so that downstream code never
    meets a masked value. Rows whose ``ra`` or ``dec`` is missing are dropped.

    Parameters
    ----------
    path : str or Path
        The CSV file.

    Returns
    -------
    astropy.table.Table
        ``ra``, ``dec`` in deg (ICRS, epoch J2016.0), ``pmra`` (mu_alpha* = mu_alpha cos dec)
        and ``pmdec`` in mas/yr, ``parallax`` in mas, magnitudes in mag (AB for ``mag_*``).

    Raises
    ------
    gppy.fitsio.BadInputError
        If the file is missing, empty, unreadable, lacks a required column, has a
        non-numeric position column, or has no row with a position.
    """
    p = Path(path)
    if not p.exists():
        raise BadInputError(p, "reference catalogue does not exist")
    if p.stat().st_size == 0:
        raise BadInputError(p, "reference catalogue is empty (0 bytes)")
    try:
        table = Table.read(p, format="ascii.csv")
    except Exception as exc:  # astropy raises several types for malformed text
        raise BadInputError(p, f"reference catalogue is not a readable CSV ({exc.__class__.__name__}: "
                               f"{exc})") from exc
    missing = [c for c in REQUIRED_COLUMNS if c not in table.colnames]
    if missing:
        raise BadInputError(p, f"reference catalogue lacks column(s) {', '.join(missing)}")
    numeric = [c for c in table.colnames if c in NUMERIC_COLUMNS or c.startswith("mag_")]
    out = Table(masked=False)
    for name in table.colnames:
        col = table[name]
        if name in numeric:
            try:
                out[name] = _as_float(col)
            except (TypeError, ValueError) as exc:
                raise BadInputError(p, f"reference catalogue column {name!r} is not numeric") from exc
        elif isinstance(col, MaskedColumn):
            out[name] = col.filled(0 if col.dtype.kind in "iu" else "")
        else:
            out[name] = col
    good = np.isfinite(out["ra"]) & np.isfinite(out["dec"])
    out = out[good]
    if len(out) == 0:
        raise BadInputError(p, "reference catalogue has no star with a position")
    out.meta["path"] = str(p)
    return out


def _years_since_reference(table: Table, obstime: Time) -> np.ndarray:
    """Julian years from each row's reference epoch (``ref_epoch`` or J2016.0) to ``obstime``."""
    t_obs = float(Time(obstime).tt.jyear)
    if "ref_epoch" in table.colnames:
        ref = _as_float(table["ref_epoch"])
        ref = np.where(np.isfinite(ref), ref, GAIA_DR3_EPOCH)
    else:
        ref = np.full(len(table), GAIA_DR3_EPOCH)
    return t_obs - ref


def propagate_to_epoch(table: Table, obstime: Time) -> tuple[np.ndarray, np.ndarray]:
    """Positions at ``obstime`` from the catalogue epoch and proper motions.

    Straight-line space motion on the unit sphere (exact at the poles and across RA = 0):
    the position vector moves along the local east and north directions by
    ``pmra * dt`` and ``pmdec * dt`` and is renormalised. This is what
    ``SkyCoord.apply_space_motion`` gives without radial velocity; annual parallax is not
    applied (catalogue positions are barycentric ICRS, as the WCS is). Rows with a missing
    proper motion keep their catalogue position; missing or negative parallaxes play no role.

    Parameters
    ----------
    table : astropy.table.Table
        Columns ``ra``, ``dec`` (deg), ``pmra`` (mu_alpha*, mas/yr), ``pmdec`` (mas/yr);
        optional ``ref_epoch`` (Julian year, default 2016.0).
    obstime : astropy.time.Time
        Observation epoch (scalar).

    Returns
    -------
    ra, dec : numpy.ndarray
        Right ascension in [0, 360) and declination in deg at ``obstime`` (float64).
    """
    ra0 = np.deg2rad(_as_float(table["ra"]))
    dec0 = np.deg2rad(_as_float(table["dec"]))
    n = len(table)
    pmra = _as_float(table["pmra"]) if "pmra" in table.colnames else np.full(n, np.nan)
    pmdec = _as_float(table["pmdec"]) if "pmdec" in table.colnames else np.full(n, np.nan)
    has_pm = np.isfinite(pmra) & np.isfinite(pmdec)
    dt = _years_since_reference(table, obstime)
    # tangent-plane displacement in radians
    d_east = np.where(has_pm, pmra, 0.0) * dt * np.deg2rad(_MAS_TO_DEG)
    d_north = np.where(has_pm, pmdec, 0.0) * dt * np.deg2rad(_MAS_TO_DEG)
    cos_d, sin_d = np.cos(dec0), np.sin(dec0)
    cos_a, sin_a = np.cos(ra0), np.sin(ra0)
    r = np.stack([cos_d * cos_a, cos_d * sin_a, sin_d])
    east = np.stack([-sin_a, cos_a, np.zeros_like(ra0)])
    north = np.stack([-sin_d * cos_a, -sin_d * sin_a, cos_d])
    v = r + east * d_east + north * d_north
    v /= np.linalg.norm(v, axis=0)
    ra = np.rad2deg(np.arctan2(v[1], v[0])) % 360.0
    dec = np.rad2deg(np.arcsin(np.clip(v[2], -1.0, 1.0)))
    return ra, dec


def position_errors_deg(table: Table, obstime: Time) -> np.ndarray:
    """1-sigma positional error of each row at ``obstime`` (deg, per axis).

    Catalogue errors (``ra_error``/``dec_error`` in mas, or :data:`DEFAULT_POS_ERROR_MAS`)
    grown by the proper-motion error times the epoch difference; a row without proper motion
    gets :data:`MISSING_PM_ERROR_MASYR` times the epoch difference, so that SCAMP trusts it less.
    """
    n = len(table)

    def col(name: str, default: float) -> np.ndarray:
        if name in table.colnames:
            v = _as_float(table[name])
            return np.where(np.isfinite(v), v, default)
        return np.full(n, default)

    pos = np.hypot(col("ra_error", DEFAULT_POS_ERROR_MAS), col("dec_error", DEFAULT_POS_ERROR_MAS)) / np.sqrt(2)
    pm_err = np.hypot(col("pmra_error", DEFAULT_PM_ERROR_MASYR),
                      col("pmdec_error", DEFAULT_PM_ERROR_MASYR)) / np.sqrt(2)
    pmra = _as_float(table["pmra"]) if "pmra" in table.colnames else np.full(n, np.nan)
    pmdec = _as_float(table["pmdec"]) if "pmdec" in table.colnames else np.full(n, np.nan)
    has_pm = np.isfinite(pmra) & np.isfinite(pmdec)
    pm_err = np.where(has_pm, pm_err, MISSING_PM_ERROR_MASYR)
    dt = np.abs(_years_since_reference(table, obstime))
    return np.hypot(pos, pm_err * dt) * _MAS_TO_DEG


def _ldac_imhead(header: fits.Header) -> fits.BinTableHDU:
    """The ``LDAC_IMHEAD`` extension: one row holding the header cards as 80-char strings."""
    cards = [str(card).ljust(80)[:80] for card in header.cards] + ["END".ljust(80)]
    ncards = len(cards)
    col = fits.Column(name="Field Header Card", format=f"{80 * ncards}A", dim=f"(80, {ncards})",
                      array=np.array([cards], dtype="S80"))
    hdu = fits.BinTableHDU.from_columns([col])
    hdu.header["EXTNAME"] = "LDAC_IMHEAD"
    return hdu


def write_scamp_reference(table: Table, obstime: Time, path: str | Path,
                          mag_column: str = "phot_g_mean_mag") -> Path:
    """Write a FITS_LDAC astrometric reference that SCAMP reads with ``ASTREF_CATALOG FILE``.

    Columns (SCAMP's default local-reference keys): ``X_WORLD``, ``Y_WORLD`` (deg, ICRS,
    propagated to ``obstime``), ``ERRA_WORLD``, ``ERRB_WORLD`` (deg), ``ERRTHETA_WORLD``,
    ``MAG``, ``MAGERR`` (mag), ``OBSDATE`` (Julian year of ``obstime``: the epoch the
    positions refer to) and ``FLAGS`` (0); the primary header has ``ORIGIN`` =
    :data:`REFERENCE_ORIGIN` and ``REFEPOCH`` (Julian year). No proper-motion columns are written, since the
    positions are already at the epoch. Rows without a finite magnitude get 99 (SCAMP only
    uses the magnitude to order and limit stars). Written atomically.

    Parameters
    ----------
    table : astropy.table.Table
        A reference catalogue as returned by :func:`load_gaiaxp`.
    obstime : astropy.time.Time
        Observation epoch the positions are propagated to.
    path : str or Path
        Destination ``.fits`` file.
    mag_column : str
        Column written as ``MAG``.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    gppy.fitsio.BadInputError
        If the table has no rows or lacks ``mag_column``.
    """
    src = table.meta.get("path", "reference table")
    if len(table) == 0:
        raise BadInputError(src, "reference catalogue has no stars")
    if mag_column not in table.colnames:
        raise BadInputError(src, f"reference catalogue lacks column {mag_column!r}")
    ra, dec = propagate_to_epoch(table, obstime)
    err = position_errors_deg(table, obstime)
    mag = _as_float(table[mag_column])
    mag = np.where(np.isfinite(mag), mag, 99.0)
    epoch = float(Time(obstime).tt.jyear)
    n = len(table)
    cols = [
        fits.Column(name="X_WORLD", format="1D", unit="deg", array=ra),
        fits.Column(name="Y_WORLD", format="1D", unit="deg", array=dec),
        fits.Column(name="ERRA_WORLD", format="1E", unit="deg", array=err.astype(np.float32)),
        fits.Column(name="ERRB_WORLD", format="1E", unit="deg", array=err.astype(np.float32)),
        fits.Column(name="ERRTHETA_WORLD", format="1E", unit="deg", array=np.zeros(n, np.float32)),
        fits.Column(name="MAG", format="1E", unit="mag", array=mag.astype(np.float32)),
        fits.Column(name="MAGERR", format="1E", unit="mag", array=np.full(n, 0.01, np.float32)),
        fits.Column(name="OBSDATE", format="1D", unit="yr", array=np.full(n, epoch)),
        fits.Column(name="FLAGS", format="1I", array=np.zeros(n, np.int16)),
    ]
    objects = fits.BinTableHDU.from_columns(cols)
    objects.header["EXTNAME"] = "LDAC_OBJECTS"
    # a minimal image header for LDAC_IMHEAD, centred on the catalogue
    imhead = fits.Header()
    imhead["SIMPLE"] = True
    imhead["BITPIX"] = 8
    imhead["NAXIS"] = 0
    imhead["RADESYS"] = "ICRS"
    imhead["EQUINOX"] = 2000.0
    imhead["REFEPOCH"] = (epoch, "Julian year of the positions")
    imhead["REFSRC"] = (Path(str(src)).name[:60], "source catalogue")
    imhead["NSTARS"] = (n, "number of reference stars")
    primary = fits.PrimaryHDU()
    primary.header["ORIGIN"] = (REFERENCE_ORIGIN, "written by gppy.refcat.write_scamp_reference")
    primary.header["REFEPOCH"] = (epoch, "Julian year the positions are propagated to")
    primary.header["NSTARS"] = (n, "number of reference stars")
    hdul = fits.HDUList([primary, _ldac_imhead(imhead), objects])
    with atomic_path(path) as tmp:
        hdul.writeto(tmp, overwrite=True)
    return Path(path)


def image_epoch(header: fits.Header) -> Time | None:
    """Epoch of an image (a reference survey's stack included): ``DATE-OBS``, ``MJD-OBS`` or
    ``MJD``, else ``EPOCH`` (a Julian year, when it is not just the equinox 2000); None when
    unknown."""
    for key, fmt in (("DATE-OBS", "isot"), ("MJD-OBS", "mjd"), ("MJD", "mjd")):
        if key in header:
            try:
                return Time(header[key], format=fmt, scale="utc")
            except (ValueError, TypeError):
                continue
    try:
        ep = float(header.get("EPOCH", "nan"))
    except (TypeError, ValueError):
        return None
    if np.isfinite(ep) and 1950 < ep < 2200 and ep != 2000.0:
        return Time(ep, format="jyear")
    return None


def catalogue_motion(path_refcat: str | Path | None, obj: str, t_science: Time | None, t_reference: Time | None,
                     filt: str | None = None) -> tuple[np.ndarray, ...] | None:
    """The field's catalogue stars at the science's and at the reference's epochs and their
    magnitudes: ``(ra, dec, ra_ref, dec_ref, mag)`` (deg; ``mag_<filt>``, the G magnitude where
    that is missing or no ``filt`` is given), or None (no catalogue, an unreadable one, or an
    epoch unknown: the callers treat the motion as a help, never a requirement)."""
    if path_refcat is None or t_science is None or t_reference is None:
        return None
    path = gaiaxp_path(path_refcat, obj)
    if not Path(path).exists():
        return None
    try:
        cat = load_gaiaxp(path)
    except Exception as exc:
        logging.getLogger(__name__).warning("cannot read %s for the stars' motion: %s", path, exc)
        return None
    ra, dec = propagate_to_epoch(cat, t_science)
    ra_r, dec_r = propagate_to_epoch(cat, t_reference)
    g = _as_float(cat["phot_g_mean_mag"])
    col = f"mag_{filt}"
    mag = _as_float(cat[col]) if filt is not None and col in cat.colnames else g
    return ra, dec, ra_r, dec_r, np.where(np.isfinite(mag), mag, g)
