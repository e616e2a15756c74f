"""The per-field SCAMP reference catalogue: ``<path_ref_scamp>/<OBJ>.fits``, built on demand.

When a frame of field OBJ is solved, the reference is used as it is if it was written by
:func:`gppy.refcat.write_scamp_reference` for an epoch within :data:`EPOCH_TOLERANCE_YR` of
the frame's; otherwise it is (re)built from ``<path_refcat>/gaiaxp_dr3_synphot_<OBJ>.csv``
with positions propagated to the frame's epoch (SCAMP 2.10 ignores proper motions in local
files). A reference file not written by gppy (e.g. one kept from v1) is used as it is when
there is no CSV to build from.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.time import Time

from gppy.fitsio import BadInputError
from gppy.naming import sanitize
from gppy.refcat import REFERENCE_ORIGIN, gaiaxp_path, load_gaiaxp, write_scamp_reference
from gppy_astrometry.quality import AstrometryFailure

log = logging.getLogger(__name__)

#: Largest epoch difference (yr) for which a cached reference is reused: 0.25 yr moves a
#: 20 mas/yr star by 5 mas, a tenth of the accuracy goal.
EPOCH_TOLERANCE_YR = 0.25


@dataclass
class Reference:
    """A reference ready for SCAMP: its path, epoch and star positions (deg) and magnitudes."""

    path: Path
    epoch: float | None
    ra: np.ndarray
    dec: np.ndarray
    mag: np.ndarray
    built: bool


def scamp_reference_path(path_ref_scamp: str | Path, obj: str) -> Path:
    """``<path_ref_scamp>/<OBJ>.fits`` (OBJ sanitised)."""
    return Path(path_ref_scamp) / f"{sanitize(obj, 'OBJECT')}.fits"


def _read(path: Path) -> tuple[float | None, bool, np.ndarray, np.ndarray, np.ndarray]:
    try:
        with fits.open(path, memmap=False) as hdul:
            ours = hdul[0].header.get("ORIGIN") == REFERENCE_ORIGIN
            epoch = hdul[0].header.get("REFEPOCH")
            objs = hdul["LDAC_OBJECTS"].data
            ra = np.asarray(objs["X_WORLD"], float)
            dec = np.asarray(objs["Y_WORLD"], float)
            mag = np.asarray(objs["MAG"], float) if "MAG" in objs.columns.names else np.zeros(len(ra))
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise BadInputError(path, f"unreadable SCAMP reference catalogue ({exc.__class__.__name__}: {exc})") from exc
    return (float(epoch) if epoch is not None else None), ours, ra, dec, mag


def ensure_reference(path_refcat: str | Path, path_ref_scamp: str | Path, obj: str, obstime: Time) -> Reference:
    """The SCAMP reference of field ``obj`` valid at ``obstime``, built and cached if needed.

    Raises
    ------
    AstrometryFailure
        When neither a usable cached reference nor the Gaia-XP CSV exists, or the CSV is
        unusable (the reason names the file and the problem).
    """
    dest = scamp_reference_path(path_ref_scamp, obj)
    csv = gaiaxp_path(path_refcat, obj)
    want = float(obstime.tt.jyear)
    cached = None
    if dest.exists():
        try:
            cached = _read(dest)
        except BadInputError as exc:
            log.warning("cached reference unusable, rebuilding: %s", exc)
    if cached is not None:
        epoch, ours, ra, dec, mag = cached
        fresh = ours and epoch is not None and abs(epoch - want) <= EPOCH_TOLERANCE_YR
        if fresh or not csv.exists():
            if not fresh:
                log.warning("using reference %s as it is (epoch %s, frame %.2f; no CSV to rebuild from)",
                            dest, epoch, want)
            return Reference(dest, epoch, ra, dec, mag, built=False)
    if not csv.exists():
        raise AstrometryFailure(f"missing reference catalogue for {obj}: neither {dest} nor {csv} exists")
    try:
        table = load_gaiaxp(csv)
        write_scamp_reference(table, obstime, dest)
    except BadInputError as exc:
        raise AstrometryFailure(f"unusable reference catalogue: {exc}") from exc
    log.info("built SCAMP reference %s from %s (%d stars, epoch %.3f)", dest.name, csv.name, len(table), want)
    epoch, _, ra, dec, mag = _read(dest)
    return Reference(dest, epoch, ra, dec, mag, built=True)
