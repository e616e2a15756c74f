"""Judging a SCAMP solution: numbers from its XML report and sanity checks, never its exit code.

SCAMP exits 0 and writes a ``.head`` even when its match was wrong (solutions off by minutes
of arc were seen with ASTRRMS = 0 in the header). A solution is accepted only when

* enough detections were cross-identified with reference stars (``min_stars``),
* the RMS against the reference is small in both axes (``max_rms_arcsec``),
* the plate scale, the centre and the rotation are plausible for this telescope, and
* the fitted WCS agrees with the independent coarse match at the frame's corners.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np
from astropy.io import fits

from gppy_astrometry.wcs import _wcs


class AstrometryFailure(Exception):
    """A frame that cannot be solved; ``reason`` says why (reported with ok=False)."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)


@dataclass
class ScampStats:
    """The numbers the astrometry stage reads from SCAMP's XML (arcsec for angles)."""

    ndet: int = 0                       # detections in the catalogue (NDetect)
    nmatched: int = 0                   # detections matched to reference stars
    sigma: tuple[float, float] = (float("nan"), float("nan"))          # RMS vs reference, all
    nmatched_highsn: int = 0
    sigma_highsn: tuple[float, float] = (float("nan"), float("nan"))   # RMS vs reference, high S/N
    chi2: float = float("nan")
    offset: tuple[float, float] = (0.0, 0.0)  # mean offset vs reference
    contrast: float | None = None       # AS_Contrast (only when SCAMP pattern-matched)
    xy_contrast: float | None = None
    warnings: list[str] = field(default_factory=list)


def _pair(value) -> tuple[float, float]:
    arr = np.atleast_1d(np.asarray(value, dtype=float))
    if arr.size >= 2:
        return float(arr[0]), float(arr[1])
    return float(arr[0]), float(arr[0])


def parse_scamp_xml(xml: bytes | str) -> ScampStats:
    """Read the first field of a SCAMP XML (VOTable) report.

    Parameters
    ----------
    xml : bytes or str
        File content.

    Returns
    -------
    ScampStats

    Raises
    ------
    AstrometryFailure
        If the report is unreadable or has no field.
    """
    import io

    from astropy.io.votable import parse

    data = xml.encode() if isinstance(xml, str) else xml
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            vot = parse(io.BytesIO(data), verify="ignore")
    except Exception as exc:
        raise AstrometryFailure(f"SCAMP wrote an unreadable XML report ({exc.__class__.__name__})") from exc
    tables = {t.ID or t.name: t.array for t in vot.iter_tables()}
    fields = tables.get("Fields")
    if fields is None or len(fields) == 0:
        raise AstrometryFailure("SCAMP's XML report has no field")
    row = fields[0]
    names = fields.dtype.names

    def get(name, default=None):
        if name not in names:
            return default
        value = row[name]
        return default if np.ma.is_masked(value) else value

    stats = ScampStats(
        ndet=int(get("NDetect", 0)),
        nmatched=int(get("NDeg_Reference", 0)),
        sigma=_pair(get("AstromSigma_Reference", [np.nan, np.nan])),
        nmatched_highsn=int(get("NDeg_Reference_HighSN", 0)),
        sigma_highsn=_pair(get("AstromSigma_Reference_HighSN", [np.nan, np.nan])),
        chi2=float(get("Chi2_Reference", np.nan)),
        offset=_pair(get("AstromOffset_Reference", [0.0, 0.0])),
    )
    groups = tables.get("FGroups")
    if groups is not None and len(groups) and "AstromNDets_Reference" in groups.dtype.names:
        stats.nmatched = int(groups[0]["AstromNDets_Reference"])
        stats.nmatched_highsn = int(groups[0]["AstromNDets_Reference_HighSN"])
    if get("AS_Contrast") is not None:
        stats.contrast = float(get("AS_Contrast"))
    if get("XY_Contrast") is not None:
        stats.xy_contrast = float(get("XY_Contrast"))
    warn = tables.get("Warnings")
    if warn is not None and "Msg" in warn.dtype.names:
        stats.warnings = [str(m) for m in warn["Msg"]]
    return stats


def corner_disagreement_arcsec(a: fits.Header, b: fits.Header, nx: int, ny: int) -> float:
    """Largest separation (arcsec) between two WCS at the frame's centre and corners."""
    px = np.array([0, nx - 1, nx - 1, 0, (nx - 1) / 2], float)
    py = np.array([0, 0, ny - 1, ny - 1, (ny - 1) / 2], float)
    ra1, de1 = _wcs(a).all_pix2world(px, py, 0)
    ra2, de2 = _wcs(b).all_pix2world(px, py, 0)
    dra = ((ra1 - ra2 + 180.0) % 360.0 - 180.0) * np.cos(np.deg2rad(de1))
    return float(np.max(np.hypot(dra, de1 - de2)) * 3600.0)


def judge(stats: ScampStats, solution: fits.Header, reference_wcs: fits.Header, nx: int, ny: int,
          pointing: tuple[float, float], pixscale_arcsec: float, min_stars: int, max_rms_arcsec: float,
          max_offset_arcmin: float, max_rotation_deg: float, min_contrast: float = 2.5,
          max_corner_shift_arcsec: float = 10.0) -> dict[str, float | int]:
    """Accept or reject a SCAMP solution.

    Parameters
    ----------
    stats : ScampStats
        From :func:`parse_scamp_xml`.
    solution : astropy.io.fits.Header
        SCAMP's WCS (TPV).
    reference_wcs : astropy.io.fits.Header
        An independent WCS of the frame (the coarse match, or the header pointing when SCAMP
        did the matching) used to catch a wrong SCAMP match.
    nx, ny : int
        Frame size (px).
    pointing : (float, float)
        Header RA/DEC (deg).
    pixscale_arcsec : float
        Nominal plate scale (arcsec/px).
    min_stars : int
        Minimum number of detections matched to reference stars.
    max_rms_arcsec : float
        Maximum RMS per axis against the reference (arcsec).
    max_offset_arcmin, max_rotation_deg : float
        Search limits: the solved centre and rotation must lie within them (plus a margin).
    min_contrast : float
        Minimum SCAMP match contrast, when SCAMP did the pattern matching.
    max_corner_shift_arcsec : float
        Largest allowed disagreement with ``reference_wcs`` at the frame corners.

    Returns
    -------
    dict
        ``nstars``, ``rms1``, ``rms2`` (arcsec), ``chi2``, ``scale`` (arcsec/px),
        ``rotation`` (deg), ``offset_arcmin`` and ``contrast`` when known.

    Raises
    ------
    AstrometryFailure
        With the first reason the solution fails.
    """
    from gppy_astrometry.wcs import pixel_scale_arcsec, position_angle_deg

    if stats.nmatched < min_stars:
        raise AstrometryFailure(f"too few stars matched to the reference catalogue: {stats.nmatched} "
                                f"(need {min_stars}; {stats.ndet} detections)")
    rms1, rms2 = stats.sigma
    if not (math.isfinite(rms1) and math.isfinite(rms2)):
        raise AstrometryFailure("SCAMP reported no astrometric RMS against the reference")
    if max(rms1, rms2) > max_rms_arcsec:
        raise AstrometryFailure(f"astrometric RMS {rms1:.3f}\"/{rms2:.3f}\" exceeds {max_rms_arcsec:g}\"")
    if stats.contrast is not None and stats.contrast < min_contrast:
        raise AstrometryFailure(f"SCAMP match contrast {stats.contrast:.2f} below {min_contrast:g}")
    if any(k not in solution for k in ("CD1_1", "CD1_2", "CD2_1", "CD2_2", "CRVAL1", "CRVAL2")):
        raise AstrometryFailure("SCAMP's header has no complete WCS")
    scale = pixel_scale_arcsec(solution)
    if abs(scale / pixscale_arcsec - 1.0) > 0.02:
        raise AstrometryFailure(f"solved plate scale {scale:.4f}\"/px differs from {pixscale_arcsec:g}\"/px "
                                f"by more than 2%")
    det = (float(solution["CD1_1"]) * float(solution["CD2_2"])
           - float(solution["CD1_2"]) * float(solution["CD2_1"]))
    if det >= 0:
        raise AstrometryFailure("solved WCS is mirrored (east-west flip)")
    rot = position_angle_deg(solution)
    if abs(rot) > max_rotation_deg + 1.0:
        raise AstrometryFailure(f"solved rotation {rot:.2f} deg is outside +-{max_rotation_deg:g} deg")
    w = _wcs(solution)
    cra, cdec = w.all_pix2world([(nx - 1) / 2.0], [(ny - 1) / 2.0], 0)
    dra = ((float(cra[0]) - pointing[0] + 180.0) % 360.0 - 180.0) * math.cos(math.radians(pointing[1]))
    offset = math.hypot(dra, float(cdec[0]) - pointing[1]) * 60.0
    if offset > math.sqrt(2) * max_offset_arcmin + 1.0:
        raise AstrometryFailure(f"solved centre is {offset:.1f}' from the header pointing "
                                f"(search limit {max_offset_arcmin:g}')")
    shift = corner_disagreement_arcsec(solution, reference_wcs, nx, ny)
    if shift > max_corner_shift_arcsec:
        raise AstrometryFailure(f"SCAMP's solution disagrees with the catalogue match by {shift:.1f}\" "
                                f"at the frame corners (wrong match)")
    out: dict[str, float | int] = {"nstars": stats.nmatched, "rms1": rms1, "rms2": rms2, "chi2": stats.chi2,
                                   "scale": scale, "rotation": rot, "offset_arcmin": offset,
                                   "corner_shift": shift}
    if stats.contrast is not None:
        out["contrast"] = stats.contrast
    return out
