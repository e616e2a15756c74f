"""Solving one frame with Source Extractor and SCAMP in a scratch folder.

This module runs the external tools (files in the frame's work folder only); it reads the
frame but never writes it - the service writes the solution into the frame.

Steps: Source Extractor (FITS_LDAC, with the calib stage's weight map as MAP_WEIGHT and its
bit mask as FLAG_IMAGE) -> source checks (blank frame, too few stars) -> coarse match of the
detections against the epoch-propagated reference (:mod:`gppy_astrometry.match`)
-> SCAMP cross-identification and TPV fit (``MATCH N``) from that linear WCS, given as an
``.ahead`` file -> :func:`gppy_astrometry.quality.judge` on SCAMP's XML report.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table

from gppy.tools import ToolError, run_tool
from gppy_astrometry.match import NoMatchError, coarse_match
from gppy_astrometry.quality import AstrometryFailure, judge, parse_scamp_xml
from gppy_astrometry.wcs import WCS_KEYS_RE, initial_wcs, parse_scamp_head

CONFIG_DIR = Path(__file__).resolve().parent
SEX_CONFIG = CONFIG_DIR / "gppy.sex"
SEX_PARAM = CONFIG_DIR / "gppy.param"
SEX_CONV = CONFIG_DIR / "gppy.conv"
SEX_NNW = CONFIG_DIR / "gppy.nnw"
SCAMP_CONFIG = CONFIG_DIR / "gppy.scamp"

#: The mask bits that matter in IMAFLAGS_ISO. The calib stage writes uint16 masks, which
#: FITS stores as int16 with BZERO = 32768; Source Extractor reads a FLAG_IMAGE without
#: applying BZERO, so bit 15 is set everywhere and the lower 15 bits are the true mask bits
#: (all of gppy.masks.MaskBit). SCAMP's IMAFLAGS masks (gppy.scamp) ignore bit 15 as well.
FLAG_BITS = 0x7FFF


@dataclass
class SolveOptions:
    """Parameters of one solution (from :class:`gppy.config.Settings` in the service)."""

    pixscale_arcsec: float = 0.505
    max_offset_arcmin: float = 6.0   # pointing error per axis (SCAMP's POSITION_MAXERR)
    max_rotation_deg: float = 3.0    # rotation either way (SCAMP's POSANGLE_MAXERR)
    # the own matcher searches at least this far (it costs little more and a header
    # pointing 10' off must still solve)
    coarse_offset_arcmin: float = 12.0
    coarse_rotation_deg: float = 5.0
    min_stars: int = 15
    max_rms_arcsec: float = 0.3
    distort_degree: int = 3
    matcher: str = "own"          # "own": coarse match here + SCAMP MATCH N; "scamp": SCAMP matches
    min_snr: float = 10.0         # sources counted as stars (S/N of FLUX_AUTO)
    nthreads: int = 1
    timeout_s: float = 300.0


@dataclass
class Solution:
    """A solved frame: SCAMP's header, the quality numbers and step timings (s)."""

    head: fits.Header
    quality: dict
    timings: dict = field(default_factory=dict)
    coarse: dict = field(default_factory=dict)


def _header_text(header: fits.Header) -> str:
    return "".join(f"{card.image}\n" for card in header.cards) + "END\n"


def extract(image: Path, weight: Path, mask: Path, catalogue: Path, nthreads: int = 1,
            timeout_s: float = 300.0) -> Table:
    """Run Source Extractor on ``image``; returns the LDAC_OBJECTS table."""
    args = [str(image), "-c", str(SEX_CONFIG), "-CATALOG_NAME", str(catalogue), "-CATALOG_TYPE", "FITS_LDAC",
            "-PARAMETERS_NAME", str(SEX_PARAM), "-FILTER_NAME", str(SEX_CONV), "-STARNNW_NAME", str(SEX_NNW),
            "-WEIGHT_TYPE", "MAP_WEIGHT", "-WEIGHT_IMAGE", str(weight), "-FLAG_IMAGE", str(mask),
            "-NTHREADS", str(nthreads)]
    run_tool("sextractor", args, cwd=catalogue.parent, timeout=timeout_s)
    with fits.open(catalogue, memmap=False) as hdul:
        return Table(hdul["LDAC_OBJECTS"].data)


def strip_ldac_wcs(catalogue: Path) -> int:
    """Blank every WCS keyword of the image header stored in a FITS_LDAC catalogue.

    SCAMP starts from that header merged with the ``.ahead`` file; a frame solved before
    carries TPV distortion terms (``PV*``) that the ``.ahead`` would not remove. The cards
    are overwritten in place by ``COMMENT`` cards of the same length, so that the file
    keeps Source Extractor's exact layout (a catalogue re-written by astropy makes SCAMP
    2.10 crash). Returns the number of cards blanked.
    """
    with fits.open(catalogue, memmap=False) as hdul:
        info = hdul["LDAC_IMHEAD"].fileinfo()
        offset, size = int(info["datLoc"]), int(hdul["LDAC_IMHEAD"].header["NAXIS1"])
    n = 0
    with open(catalogue, "r+b") as fh:
        fh.seek(offset)
        block = bytearray(fh.read(size))
        for i in range(0, len(block) - 79, 80):
            key = block[i:i + 8].decode("ascii", "replace").strip()
            if key and WCS_KEYS_RE.match(key):
                block[i:i + 80] = f"COMMENT   (WCS keyword {key} removed by gppy)".ljust(80)[:80].encode()
                n += 1
        fh.seek(offset)
        fh.write(block)
    return n


def star_like(cat: Table, min_snr: float) -> np.ndarray:
    """Boolean mask of catalogue rows usable as stars: S/N >= ``min_snr``, unflagged by the
    mask, not saturated/truncated/blended badly (FLAGS < 4), not elongated like a trail."""
    if len(cat) == 0:
        return np.zeros(0, bool)
    flux = np.asarray(cat["FLUX_AUTO"], float)
    err = np.asarray(cat["FLUXERR_AUTO"], float)
    with np.errstate(divide="ignore", invalid="ignore"):
        snr = np.where(err > 0, flux / err, 0.0)
    ok = (snr >= min_snr) & (np.asarray(cat["FLAGS"]) < 4) & (np.asarray(cat["ELONGATION"], float) < 2.0)
    if "IMAFLAGS_ISO" in cat.colnames:
        ok &= (np.asarray(cat["IMAFLAGS_ISO"]).astype(np.int64) & FLAG_BITS) == 0
    return ok


def solve_frame(image: Path, weight: Path, mask: Path, reference: Path, workdir: Path,
                pointing: tuple[float, float], shape: tuple[int, int], options: SolveOptions,
                ref_positions: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> Solution:
    """Solve one frame.

    Parameters
    ----------
    image, weight, mask : Path
        The calibrated frame (ADU), its inverse-variance weight and its uint16 bit mask.
    reference : Path
        FITS_LDAC reference catalogue at the frame's epoch (``X_WORLD``, ``Y_WORLD``, ``MAG``).
    workdir : Path
        Scratch folder of this frame (created).
    pointing : (float, float)
        Header RA/DEC (deg).
    shape : (int, int)
        (nx, ny) = (NAXIS1, NAXIS2).
    options : SolveOptions
    ref_positions : (ra, dec, mag), optional
        The reference stars, if already in memory (else read from ``reference``).

    Returns
    -------
    Solution

    Raises
    ------
    AstrometryFailure
        Blank frame, too few stars, no match with the reference, or a solution that fails
        :func:`gppy_astrometry.quality.judge`; the reason says which.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    nx, ny = shape
    stem = image.name[:-5] if image.name.endswith(".fits") else image.stem
    catalogue = workdir / f"{stem}.ldac"
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    try:
        cat = extract(image, weight, mask, catalogue, options.nthreads, options.timeout_s)
        strip_ldac_wcs(catalogue)
    except ToolError as exc:
        raise AstrometryFailure(f"Source Extractor failed: {exc}") from exc
    timings["extract"] = time.perf_counter() - t0

    stars = star_like(cat, options.min_snr)
    nstars = int(stars.sum())
    if nstars == 0:
        raise AstrometryFailure(f"blank frame: no source with S/N >= {options.min_snr:g} "
                                f"({len(cat)} detections in all)")
    if nstars < options.min_stars:
        raise AstrometryFailure(f"too few stars: {nstars} sources with S/N >= {options.min_snr:g} "
                                f"(need {options.min_stars})")

    t0 = time.perf_counter()
    if ref_positions is None:
        with fits.open(reference, memmap=False) as hdul:
            objs = hdul["LDAC_OBJECTS"].data
            ref_positions = (np.asarray(objs["X_WORLD"], float), np.asarray(objs["Y_WORLD"], float),
                             np.asarray(objs["MAG"], float))
    ra0, dec0 = pointing
    pointing_wcs = initial_wcs(ra0, dec0, nx, ny, options.pixscale_arcsec)
    coarse_info: dict = {}
    if options.matcher == "own":
        x = np.asarray(cat["XWIN_IMAGE"], float)[stars]
        y = np.asarray(cat["YWIN_IMAGE"], float)[stars]
        flux = np.asarray(cat["FLUX_AUTO"], float)[stars]
        max_offset = max(options.max_offset_arcmin, options.coarse_offset_arcmin)
        max_rotation = max(options.max_rotation_deg, options.coarse_rotation_deg)
        try:
            cm = coarse_match(x, y, flux, *ref_positions, ra0, dec0, nx, ny, options.pixscale_arcsec,
                              max_offset_arcmin=max_offset, max_rotation_deg=max_rotation)
        except NoMatchError as exc:
            raise AstrometryFailure(str(exc)) from exc
        start_wcs = cm.header
        coarse_info = {"nmatch": cm.nmatch, "rms": cm.rms_arcsec, "significance": cm.significance,
                       "offset_arcsec": cm.offset_arcsec, "rotation": cm.rotation_deg, "scale": cm.scale_arcsec}
        # the coarse match is an independent check of SCAMP's result at the corners
        check_wcs, corner_limit = start_wcs, max(10.0, 20.0 * cm.rms_arcsec)
        match_args = ["-MATCH", "N"]
    else:
        max_offset, max_rotation = options.max_offset_arcmin, options.max_rotation_deg
        start_wcs = pointing_wcs
        check_wcs = pointing_wcs
        corner_limit = (math.sqrt(2) * options.max_offset_arcmin * 60.0
                        + math.radians(options.max_rotation_deg) * math.hypot(nx, ny) / 2 * options.pixscale_arcsec
                        + 60.0)
        match_args = ["-MATCH", "Y", "-POSITION_MAXERR", f"{options.max_offset_arcmin:g}",
                      "-POSANGLE_MAXERR", f"{options.max_rotation_deg:g}"]
    timings["match"] = time.perf_counter() - t0

    # SCAMP: the starting WCS (TAN) in the .ahead next to the catalogue, whose own image
    # header no longer has any WCS keyword (strip_ldac_wcs)
    (workdir / f"{stem}.ahead").write_text(_header_text(start_wcs))
    head_path = workdir / f"{stem}.head"
    xml_path = workdir / f"{stem}.scamp.xml"
    for p in (head_path, xml_path):
        p.unlink(missing_ok=True)
    t0 = time.perf_counter()
    args = [str(catalogue), "-c", str(SCAMP_CONFIG), "-ASTREF_CATALOG", "FILE", "-ASTREFCAT_NAME", str(reference),
            "-DISTORT_DEGREES", str(int(options.distort_degree)), "-XML_NAME", str(xml_path),
            "-NTHREADS", str(options.nthreads), "-VERBOSE_TYPE", "QUIET", *match_args]
    try:
        run_tool("scamp", args, cwd=workdir, timeout=options.timeout_s)
    except ToolError as exc:
        raise AstrometryFailure(f"SCAMP failed: {exc}") from exc
    timings["scamp"] = time.perf_counter() - t0
    if not xml_path.exists() or not head_path.exists():
        raise AstrometryFailure("SCAMP wrote no solution (no .head or XML report)")
    stats = parse_scamp_xml(xml_path.read_bytes())
    head = parse_scamp_head(head_path.read_text(encoding="latin-1"))
    if "PV1_1" not in head:  # a linear fit: SCAMP writes TPV without PV terms
        for axis in (1, 2):
            head[f"PV{axis}_1"] = 1.0
    quality = judge(stats, head, check_wcs, nx, ny, pointing, options.pixscale_arcsec, options.min_stars,
                    options.max_rms_arcsec, max_offset, max_rotation,
                    max_corner_shift_arcsec=corner_limit)
    quality["degree"] = int(options.distort_degree)
    quality["refcat"] = reference.name
    if coarse_info:
        quality["contrast"] = coarse_info["significance"]
    return Solution(head=head, quality=quality, timings=timings, coarse=coarse_info)
