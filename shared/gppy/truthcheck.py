"""Compare a processed night with the simulator's truth (used by ``gppy demo``).

Astrometry: the solved WCS of each calibrated single evaluated at the true pixel positions
of unsaturated stars, against their true sky positions (RMS per axis, arcsec). Photometry:
each frame's ``ZP_TOT`` against the true zero point (``zp_adu``, AB mag of 1 ADU in the whole
exposure). Transients: injected sources found in the difference-image candidate lists.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS, FITSFixedWarning

from gppy.config import PathConfig

MATCH_ARCSEC = 1.5
warnings.filterwarnings("ignore", category=FITSFixedWarning)


def _truth_of(truth: Path, header) -> dict | None:
    """Truth of the science frame a calibrated single came from (its raw file, PROVIN01)."""
    raw = str(header.get("PROVIN01", ""))
    f = truth / "frames" / (raw[:-5] + ".json" if raw.endswith(".fits") else raw + ".json")
    if not raw or not f.exists():
        return None
    d = json.loads(f.read_text())
    if d.get("kind") != "science":
        return None
    d["stem"] = f.name[:-5]
    return d


def _singles(processed: Path) -> list[Path]:
    return sorted(p for p in processed.rglob("calib_*.fits")
                  if not any(s in p.name for s in (".com.", ".weight.", ".mask.", ".subt."))
                  and "/transient/" not in str(p))


def astrometry_residuals(processed: Path, truth: Path, max_mag_snr20: float | None = None) -> list[dict]:
    """Per solved single: RMS of (solved - true) in RA*cos(dec) and Dec, arcsec."""
    rows = []
    for img in _singles(processed):
        hdr = fits.getheader(img)
        if "CTYPE1" not in hdr or "TPV" not in str(hdr.get("CTYPE1")):
            continue
        t = _truth_of(truth, hdr)
        if t is None:
            continue
        stars = Table.read(truth / "frames" / f"{t['stem']}.stars.csv", format="ascii.csv")
        good = ~np.asarray(stars["saturated"], dtype=bool)
        flux = np.asarray(stars["flux_adu"], float)
        good &= flux > np.percentile(flux, 60)  # brighter stars: S/N well above 20 here
        s = stars[good]
        ra, dec = WCS(hdr).all_pix2world(np.asarray(s["x_0based"], float), np.asarray(s["y_0based"], float), 0)
        dra = (ra - np.asarray(s["ra"])) * np.cos(np.radians(np.asarray(s["dec"]))) * 3600
        ddec = (dec - np.asarray(s["dec"])) * 3600
        rows.append({"image": img.name, "n": len(s), "rms_ra": float(np.sqrt(np.mean(dra**2))),
                     "rms_dec": float(np.sqrt(np.mean(ddec**2)))})
    return rows


def zeropoint_errors(processed: Path, truth: Path, key: str = "ZP_TOT") -> list[dict]:
    """Per photometered single: the zero point of the total flux (``ZP_TOT``) minus the true
    ``zp_adu`` (mag). v1's ``ZP_AUTO`` folds in the light outside the Kron aperture, so it is
    not the image's zero point; pass ``key="ZP_AUTO"`` to see that difference."""
    rows = []
    for img in _singles(processed):
        hdr = fits.getheader(img)
        if key not in hdr:
            continue
        t = _truth_of(truth, hdr)
        if t is None or "zp_adu" not in t:
            continue
        rows.append({"image": img.name, "zp": float(hdr[key]), "true": float(t["zp_adu"]),
                     "error": float(hdr[key]) - float(t["zp_adu"]),
                     "quoted": float(hdr.get("E" + key, float("nan")))})
    return rows


def _difference_coverage(processed: Path) -> list[tuple[WCS, np.ndarray]]:
    """(WCS, usable-pixel map) of every difference image (``*.subt.fits`` and its mask)."""
    out = []
    for diff in processed.rglob("*.subt.fits"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FITSFixedWarning)
            hdr = fits.getheader(diff)
            wcs = WCS(hdr)
        mask_path = diff.with_name(diff.name[:-5] + ".mask.fits")
        if mask_path.exists():
            usable = fits.getdata(mask_path) == 0
        else:
            usable = np.ones((int(hdr["NAXIS2"]), int(hdr["NAXIS1"])), bool)
        out.append((wcs, usable))
    return out


def transients_recovered(processed: Path, truth: Path) -> tuple[int, int]:
    """(injected transients on a usable pixel of some difference image, of them found as
    candidates within ``MATCH_ARCSEC``). Transients outside every difference or on masked
    pixels are not counted (no search could find them); no S/N cut is applied, so this is a
    completeness over all injected brightnesses, not the recall at a given S/N."""
    tfile = truth / "transients.json"
    if not tfile.exists():
        return 0, 0
    injected = json.loads(tfile.read_text())
    items = [t for t in (injected.values() if isinstance(injected, dict) else injected)
             if isinstance(t, dict) and "ra" in t]
    coverage = _difference_coverage(processed)
    cands = []
    for reg in processed.rglob("*.subt.transient.reg"):
        for line in reg.read_text().splitlines():
            if line.startswith("circle("):
                ra, dec = (float(v) for v in line[7:].split(",")[:2])
                cands.append((ra, dec))
    c = np.array(cands) if cands else np.zeros((0, 2))
    covered = found = 0
    for tr in items:
        on = False
        for wcs, usable in coverage:
            x, y = wcs.all_world2pix([[tr["ra"], tr["dec"]]], 0)[0]
            ix, iy = int(round(float(x))), int(round(float(y)))
            if 0 <= iy < usable.shape[0] and 0 <= ix < usable.shape[1] and usable[iy, ix]:
                on = True
                break
        if not on:
            continue
        covered += 1
        if len(c):
            d = np.hypot((c[:, 0] - tr["ra"]) * np.cos(np.radians(tr["dec"])), c[:, 1] - tr["dec"]) * 3600
            found += int(d.min() < MATCH_ARCSEC)
    return covered, found


def compare_with_truth(outdir: Path, paths: PathConfig) -> list[str]:
    """Lines of text for the demo report."""
    truth = Path(outdir) / "truth"
    processed = Path(paths.path_processed)
    lines = []
    ast = astrometry_residuals(processed, truth)
    if ast:
        ra = np.median([r["rms_ra"] for r in ast])
        de = np.median([r["rms_dec"] for r in ast])
        worst = max(max(r["rms_ra"], r["rms_dec"]) for r in ast)
        lines.append(f"astrometry: {len(ast)} frames, median RMS {ra:.3f}\" (RA) {de:.3f}\" (Dec), "
                     f"worst {worst:.3f}\" vs truth")
    else:
        lines.append("astrometry: no solved single to compare")
    zps = zeropoint_errors(processed, truth)
    if zps:
        err = np.array([r["error"] for r in zps])
        lines.append(f"zero points: {len(zps)} frames, ZP_TOT - truth: median {np.median(err):+.3f} mag, "
                     f"max |error| {np.abs(err).max():.3f} mag")
    else:
        lines.append("zero points: no photometered single to compare")
    covered, found = transients_recovered(processed, truth)
    lines.append(f"transients: {found} of {covered} injected sources on usable difference pixels found as "
                 "candidates (all brightnesses)")
    return lines
