"""The photometric catalogue ``<stem>.phot.cat`` (v1-behaviour.md §7.2 item 12).

One row per Source Extractor source (matched or not), with:

* every Source Extractor column, vectors split as v1's reader did (``MAG_APER``,
  ``MAG_APER_1`` ... ``MAG_APER_5``);
* for each suffix S in AUTO, APER, APER_1 ... APER_5: ``MAG_S_<FILT>``, ``MAGERR_S_<FILT>``,
  ``FLUX_S_<FILT>`` and ``FLUXERR_S_<FILT>`` in microjansky, ``SNR_S_<FILT>``;
* the reference columns ``source_id ra dec parallax pmra pmdec phot_g_mean_mag bp_rp
  mag_<FILT> mag_u mag_g mag_r mag_i mag_z`` (catalogue values at J2016.0), masked where
  there is no reference star within the match radius, and ``SEP_REF`` (arcsec);
* ``ZPSTAR`` (selected as a ZP star) and ``ZPKEPT`` (kept by the clipping of APER_1).

Written as ECSV: plain text that ``astropy.table.Table.read(path, format="ascii")`` reads,
which, unlike v1's ``ascii.tab``, keeps the table meta (object, filter, date, ZP, ...).
"""

from __future__ import annotations

import io

import numpy as np
from astropy.table import MaskedColumn, Table

from gppy_phot.apertures import SUFFIXES

REF_COLUMNS = ("source_id", "ra", "dec", "parallax", "pmra", "pmdec", "phot_g_mean_mag", "bp_rp")
BROAD_BANDS = ("u", "g", "r", "i", "z")


def se_flux_columns(suffix: str) -> tuple[str, str]:
    """Source Extractor's (flux, error) column names of a suffix (``APER_1`` -> FLUX_APER_1)."""
    return f"FLUX_{suffix}", f"FLUXERR_{suffix}"


def calibrated_names(suffix: str, filt: str) -> dict[str, str]:
    """``{"MAG": "MAG_<S>_<FILT>", ...}`` for the five calibrated quantities."""
    return {q: f"{q}_{suffix}_{filt}" for q in ("MAG", "MAGERR", "FLUX", "FLUXERR", "SNR")}


def reference_columns(ref: Table, index: np.ndarray, filt: str) -> dict[str, MaskedColumn]:
    """Reference values for each source (masked where ``index`` is -1)."""
    names = list(REF_COLUMNS) + [f"mag_{filt}"] + [f"mag_{b}" for b in BROAD_BANDS if b != filt]
    out: dict[str, MaskedColumn] = {}
    hit = index >= 0
    safe = np.where(hit, index, 0)
    for name in names:
        if name not in ref.colnames:
            continue
        src = np.asarray(ref[name])
        if len(src) == 0:
            values = np.zeros(len(index), dtype=src.dtype)
        else:
            values = src[safe]
        mask = ~hit
        if values.dtype.kind == "f":
            mask = mask | ~np.isfinite(values)
        out[name] = MaskedColumn(values, mask=mask)
    return out


def build_catalogue(se: Table, filt: str, calibrated: dict[str, dict[str, np.ndarray]],
                    ref_cols: dict[str, MaskedColumn], sep_arcsec: np.ndarray,
                    zpstar: np.ndarray, zpkept: np.ndarray, meta: dict) -> Table:
    """Assemble the catalogue table.

    Parameters
    ----------
    se : Table
        Source Extractor catalogue (vector columns split).
    filt : str
        Filter name used in the column names.
    calibrated : dict
        ``suffix -> {"MAG", "MAGERR", "FLUX", "FLUXERR", "SNR"}`` arrays (see
        :func:`gppy_phot.zeropoint.calibrate`).
    ref_cols : dict
        From :func:`reference_columns`.
    sep_arcsec : array
        Separation to the matched reference star (NaN if none).
    zpstar, zpkept : bool arrays
        ZP-star selection and the APER_1 survivors.
    meta : dict
        Table meta (object, filter, date-obs, JD, MJD, ZP...).
    """
    t = Table(se, copy=False)
    for suffix in SUFFIXES:
        if suffix not in calibrated:
            continue
        names = calibrated_names(suffix, filt)
        for q, name in names.items():
            t[name] = np.asarray(calibrated[suffix][q], dtype=np.float64)
    for name, col in ref_cols.items():
        t[name] = col
    t["SEP_REF"] = MaskedColumn(np.asarray(sep_arcsec, float), mask=~np.isfinite(sep_arcsec))
    t["ZPSTAR"] = np.asarray(zpstar, bool)
    t["ZPKEPT"] = np.asarray(zpkept, bool)
    t.meta.update(meta)
    return t


def _float_format(name: str) -> str:
    """printf format of a float column: the precision of the measurement, not of float64."""
    upper = name.upper()
    if upper in ("ALPHA_J2000", "DELTA_J2000", "RA", "DEC", "ALPHAPEAK_J2000", "DELTAPEAK_J2000"):
        return "%.8f"
    if upper.startswith(("MAG", "SNR", "X_", "Y_", "XPEAK", "YPEAK", "SEP_", "FWHM_IMAGE", "ELL", "ELONG",
                         "CLASS", "THETA", "A_IMAGE", "B_IMAGE", "KRON", "RATIO", "DEL_MAG", "RB_")):
        return "%.5f"
    return "%.7g"


def _column_strings(col) -> tuple[str, list]:
    """(printf format, values) of one column; masked cells become the ECSV null ``""``."""
    data = np.asarray(col)
    mask = np.ma.getmaskarray(col) if hasattr(col, "mask") else None
    kind = data.dtype.kind
    if kind == "f":
        fmt = _float_format(col.info.name)
    elif kind in "iu":
        fmt = "%d"
    elif kind == "b":
        return "%s", ["True" if v else "False" for v in data.tolist()]
    else:
        return "%s", ['"' + str(v).replace('"', "'") + '"' if (" " in str(v) or not str(v)) else str(v)
                      for v in data.tolist()]
    if mask is not None and mask.any():
        vals = [(fmt % v) if not m else '""' for v, m in zip(data.tolist(), mask.tolist(), strict=True)]
        return "%s", vals
    return fmt, data.tolist()


def to_ecsv(t: Table) -> str:
    """The table as ECSV text, fast: astropy writes the header, the rows are printf-formatted.

    Masked cells are written as ``""`` (ECSV's null), so reading gives masked values back.
    """
    buf = io.StringIO()
    Table(t[:0], copy=True).write(buf, format="ascii.ecsv")
    fmts, cols = [], []
    for name in t.colnames:
        fmt, vals = _column_strings(t[name])
        fmts.append(fmt)
        cols.append(vals)
    line = " ".join(fmts)
    body = "\n".join(line % row for row in zip(*cols, strict=True)) if cols and len(t) else ""
    return buf.getvalue() + body + ("\n" if body else "")
