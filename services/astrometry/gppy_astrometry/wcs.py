"""Pure WCS helpers of the astrometry stage: headers in, headers and numbers out.

* :func:`initial_wcs` - the starting TAN WCS from the pointing (RA/DEC) and the plate scale,
  north up and east left;
* :func:`parse_scamp_head` - SCAMP's ``.head`` text as a header;
* :func:`solution_header` - the keywords written into the calibrated frame: the TPV WCS,
  RACENT/DECCENT, the footprint polygon (closed order, fixing v1 B16), ROTANG1/2 and the
  astrometric quality;
* :func:`footprint` / :func:`rotation_angles` - the v1 extra keys.
"""

from __future__ import annotations

import math
import re
import warnings

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS, FITSFixedWarning

#: Keywords that make up a celestial WCS (removed before a new solution is written).
WCS_KEYS_RE = re.compile(
    r"^(WCSAXES|CTYPE[12]|CUNIT[12]|CRVAL[12]|CRPIX[12]|CDELT[12]|CROTA[12]|CD[12]_[12]|PC[12]_[12]"
    r"|PV[12]_\d+|A_\w+|B_\w+|AP_\w+|BP_\w+|LONPOLE|LATPOLE|EQUINOX|EPOCH|RADESYS|RADECSYS|MJDREF"
    r"|WCSNAME|IMAGEW|IMAGEH)$")

#: Keywords copied from SCAMP's ``.head`` into the frame.
SCAMP_WCS_KEYS = ("EQUINOX", "RADESYS", "CTYPE1", "CTYPE2", "CUNIT1", "CUNIT2", "CRVAL1", "CRVAL2",
                  "CRPIX1", "CRPIX2", "CD1_1", "CD1_2", "CD2_1", "CD2_2")


def initial_wcs(ra_deg: float, dec_deg: float, nx: int, ny: int, pixscale_arcsec: float) -> fits.Header:
    """A TAN WCS centred on the frame, north up and east left.

    Parameters
    ----------
    ra_deg, dec_deg : float
        Pointing (header ``RA``/``DEC``) in deg, assigned to the frame centre.
    nx, ny : int
        Frame size in pixels (NAXIS1, NAXIS2).
    pixscale_arcsec : float
        Plate scale in arcsec per pixel.

    Returns
    -------
    astropy.io.fits.Header
        ``CTYPE``, ``CUNIT``, ``CRVAL``, ``CRPIX`` (1-based centre), ``CD`` (deg/px),
        ``EQUINOX``, ``RADESYS``.
    """
    if not (math.isfinite(ra_deg) and math.isfinite(dec_deg)) or not -90.0 <= dec_deg <= 90.0:
        raise ValueError(f"pointing RA={ra_deg!r} DEC={dec_deg!r} is not a sky position")
    s = pixscale_arcsec / 3600.0
    h = fits.Header()
    h["EQUINOX"] = 2000.0
    h["RADESYS"] = "ICRS"
    h["CTYPE1"] = "RA---TAN"
    h["CTYPE2"] = "DEC--TAN"
    h["CUNIT1"] = "deg"
    h["CUNIT2"] = "deg"
    h["CRVAL1"] = float(ra_deg) % 360.0
    h["CRVAL2"] = float(dec_deg)
    h["CRPIX1"] = (nx + 1) / 2.0
    h["CRPIX2"] = (ny + 1) / 2.0
    h["CD1_1"] = -s
    h["CD1_2"] = 0.0
    h["CD2_1"] = 0.0
    h["CD2_2"] = s
    return h


def parse_scamp_head(text: str) -> fits.Header:
    """Parse a SCAMP ``.head`` file (80-column cards, newline separated, ``END`` last).

    Commentary cards (``COMMENT``, ``HISTORY``, blank) are dropped: SCAMP writes non-ASCII
    text in them.
    """
    cards = []
    for line in text.splitlines():
        if not line.strip() or line.startswith(("END", "COMMENT", "HISTORY", " ")):
            continue
        cards.append(line.encode("ascii", "replace").decode("ascii").ljust(80)[:80])
    return fits.Header.fromstring("".join(cards) + "END".ljust(80))


def strip_wcs(header: fits.Header) -> fits.Header:
    """A copy of ``header`` without any celestial WCS keyword."""
    h = header.copy()
    for key in list(h.keys()):
        if WCS_KEYS_RE.match(key):
            del h[key]
    return h


def _wcs(header: fits.Header) -> WCS:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        return WCS(header, relax=True)


def footprint(wcs_header: fits.Header, nx: int, ny: int) -> dict[str, float]:
    """Centre and corner coordinates of the frame.

    ``RACENT``/``DECCENT``: world coordinates of pixel (nx//2, ny//2) (0-based, as v1).
    ``RAPOLY0..3``/``DEPOLY0..3``: the corners (0,0), (nx-1,0), (nx-1,ny-1), (0,ny-1) -
    a closed polygon order (v1 wrote Z-order, bug B16). Degrees, rounded to 6 decimals.
    """
    w = _wcs(wcs_header)
    px = np.array([nx // 2, 0, nx - 1, nx - 1, 0], dtype=float)
    py = np.array([ny // 2, 0, 0, ny - 1, ny - 1], dtype=float)
    ra, dec = w.all_pix2world(px, py, 0)
    out = {"RACENT": round(float(ra[0]) % 360.0, 6), "DECCENT": round(float(dec[0]), 6)}
    for i in range(4):
        out[f"RAPOLY{i}"] = round(float(ra[i + 1]) % 360.0, 6)
        out[f"DEPOLY{i}"] = round(float(dec[i + 1]), 6)
    return out


def rotation_angles(wcs_header: fits.Header) -> tuple[float, float]:
    """v1's ``ROTANG1 = atan(CD1_2/CD1_1)`` and ``ROTANG2 = atan(CD2_1/CD2_2)`` in deg.

    NaN when a CD term is missing or a denominator is 0 (v1 gave NaN when any term was 0;
    here a zero numerator simply gives 0, the true answer for an unrotated frame).
    """
    try:
        cd11, cd12 = float(wcs_header["CD1_1"]), float(wcs_header["CD1_2"])
        cd21, cd22 = float(wcs_header["CD2_1"]), float(wcs_header["CD2_2"])
    except (KeyError, TypeError, ValueError):
        return float("nan"), float("nan")
    r1 = math.degrees(math.atan(cd12 / cd11)) if cd11 != 0 else float("nan")
    r2 = math.degrees(math.atan(cd21 / cd22)) if cd22 != 0 else float("nan")
    return r1, r2


def position_angle_deg(wcs_header: fits.Header) -> float:
    """Angle (deg, east of north) of the +y pixel axis on the sky, from the CD matrix."""
    cd12, cd22 = float(wcs_header.get("CD1_2", 0.0)), float(wcs_header.get("CD2_2", 0.0))
    return math.degrees(math.atan2(-cd12, cd22))


def pixel_scale_arcsec(wcs_header: fits.Header) -> float:
    """Mean plate scale (arcsec/px) from the CD determinant."""
    det = (float(wcs_header.get("CD1_1", 0.0)) * float(wcs_header.get("CD2_2", 0.0))
           - float(wcs_header.get("CD1_2", 0.0)) * float(wcs_header.get("CD2_1", 0.0)))
    return math.sqrt(abs(det)) * 3600.0


def solution_header(scamp_head: fits.Header, nx: int, ny: int, quality: dict[str, float | int | str]
                    ) -> fits.Header:
    """Every keyword the astrometry stage writes into a calibrated frame.

    Parameters
    ----------
    scamp_head : astropy.io.fits.Header
        SCAMP's output header (TPV WCS with PV terms).
    nx, ny : int
        Frame size in pixels.
    quality : dict
        ``nstars`` (matched reference stars), ``rms1``/``rms2`` (arcsec, per axis against the
        reference), ``contrast``, ``refcat`` (reference file name), ``degree``.

    Returns
    -------
    astropy.io.fits.Header
        WCS (``CTYPE`` forced to ``RA---TPV``/``DEC--TPV``), ``PV1_*``/``PV2_*``, ``RACENT``,
        ``DECCENT``, ``RAPOLY0..3``, ``DEPOLY0..3``, ``ROTANG1/2``, ``ASTRRMS1/2`` (deg, as
        SCAMP), ``ASTRRMS``-style arcsec keys ``ASTRMS1A``/``ASTRMS2A``, ``ASTNSTAR``,
        ``ASTCONTR``, ``ASTDEG``, ``ASTREFCA``.
    """
    out = fits.Header()
    for key in SCAMP_WCS_KEYS:
        if key in scamp_head:
            out[key] = scamp_head[key]
    out["CTYPE1"] = "RA---TPV"
    out["CTYPE2"] = "DEC--TPV"
    for key in scamp_head:
        if re.match(r"^PV[12]_\d+$", key):
            out[key] = scamp_head[key]
    wcs_only = out.copy()
    for key, value in footprint(wcs_only, nx, ny).items():
        comment = "[deg] world coordinate of the frame centre" if key.endswith("CENT") else \
            "[deg] frame corner (closed polygon order)"
        out[key] = (value, comment)
    r1, r2 = rotation_angles(wcs_only)
    out["ROTANG1"] = (round(r1, 6) if math.isfinite(r1) else "NaN", "[deg] atan(CD1_2/CD1_1), from North")
    out["ROTANG2"] = (round(r2, 6) if math.isfinite(r2) else "NaN", "[deg] atan(CD2_1/CD2_2), from East")
    rms1 = float(quality.get("rms1", float("nan")))
    rms2 = float(quality.get("rms2", float("nan")))
    out["ASTRRMS1"] = (rms1 / 3600.0, "[deg] astrometric RMS vs reference, axis 1")
    out["ASTRRMS2"] = (rms2 / 3600.0, "[deg] astrometric RMS vs reference, axis 2")
    out["ASTRMS1A"] = (round(rms1, 4), "[arcsec] astrometric RMS vs reference, axis 1")
    out["ASTRMS2A"] = (round(rms2, 4), "[arcsec] astrometric RMS vs reference, axis 2")
    out["ASTNSTAR"] = (int(quality.get("nstars", 0)), "reference stars matched by SCAMP")
    if "contrast" in quality:
        out["ASTCONTR"] = (round(float(quality["contrast"]), 3), "match contrast (vote-peak sigma)")
    if "degree" in quality:
        out["ASTDEG"] = (int(quality["degree"]), "distortion polynomial degree")
    if "refcat" in quality:
        out["ASTREFCA"] = (str(quality["refcat"])[:60], "astrometric reference catalogue")
    return out


def apply_solution(header: fits.Header, solution: fits.Header) -> fits.Header:
    """``header`` with any old WCS removed and ``solution`` added (a copy)."""
    h = strip_wcs(header)
    for key in ("RACENT", "DECCENT", "ROTANG1", "ROTANG2", "ASTRRMS1", "ASTRRMS2", "ASTRMS1A", "ASTRMS2A",
                "ASTNSTAR", "ASTCONTR", "ASTDEG", "ASTREFCA", "ASTFAIL",
                *[f"RAPOLY{i}" for i in range(4)], *[f"DEPOLY{i}" for i in range(4)]):
        if key in h:
            del h[key]
    for card in solution.cards:
        h.append(card, end=True)
    return h
