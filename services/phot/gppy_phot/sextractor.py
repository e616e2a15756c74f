"""Source Extractor runs of the phot stage (v1-behaviour.md §7.2 items 3-5, §9).

The configuration files are package data (``phot.sex``, ``phot.param``, ``pre.param``,
``det.param``); the detection filter is a Gaussian written for the image's seeing; the
neural-network file for CLASS_STAR is the one the ``source-extractor`` package installs.

Fixes of v1:

* B12: the gain is given with ``-GAIN <EGAIN>`` and the saturation with
  ``-SATUR_LEVEL <SATURATE>`` while ``GAIN_KEY`` and ``SATUR_KEY`` name keywords that do not
  exist, so the camera's ``GAIN`` setting (2750) can never override them.
* B14: Source Extractor ignores ``BZERO`` in flag images, so the uint16 mask (stored with
  BZERO = 32768) is handed over as a plain int16/int32 copy (:func:`flag_image_data`).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.table import Table

from gppy.fitsio import write_fits
from gppy.tools import run_tool

#: Where Debian's source-extractor package installs its data files.
NNW_CANDIDATES = (
    "/usr/share/source-extractor/default.nnw",
    "/usr/share/sextractor/default.nnw",
    "/usr/local/share/source-extractor/default.nnw",
    "/usr/local/share/sextractor/default.nnw",
)

_BACKGROUND = re.compile(r"Background:\s*([-+0-9.eE]+)\s+RMS:\s*([-+0-9.eE]+)\s*/\s*Threshold:\s*([-+0-9.eE]+)")


@dataclass
class SexResult:
    """A Source Extractor catalogue and its global background figures (image units)."""

    table: Table
    background: float
    rms: float
    threshold: float


def package_file(name: str) -> Path:
    """Absolute path of a configuration file shipped with gppy_phot."""
    return Path(__file__).resolve().parent / name


def nnw_path() -> Path:
    """The star/galaxy neural network of the installed Source Extractor.

    ``GPPY_SEX_NNW`` overrides the search.
    """
    env = os.environ.get("GPPY_SEX_NNW")
    for cand in ([env] if env else []) + list(NNW_CANDIDATES):
        if cand and Path(cand).is_file():
            return Path(cand)
    raise FileNotFoundError("Source Extractor's default.nnw not found (install source-extractor or set GPPY_SEX_NNW)")


def gaussian_conv_text(fwhm_px: float) -> str:
    """A normalised Gaussian detection filter of FWHM ``fwhm_px`` (px) in SExtractor's CONV format.

    The kernel is (2k+1)^2 with k = ceil(0.75 FWHM) (+-2 sigma), at most 15x15, sampled at pixel
    centres (see :func:`gaussian_kernel`).
    """
    kern = gaussian_kernel(fwhm_px)
    fwhm = float(np.clip(fwhm_px, 1.0, 10.0))
    k = kern.shape[0] // 2
    lines = [f"CONV NORM\n# Gaussian, FWHM = {fwhm:.2f} px, {2 * k + 1}x{2 * k + 1}, written by gppy_phot"]
    lines += [" ".join(f"{v:.6f}" for v in row) for row in kern]
    return "\n".join(lines) + "\n"


def gaussian_kernel(fwhm_px: float) -> np.ndarray:
    """The normalised Gaussian detection kernel written by :func:`gaussian_conv_text`."""
    fwhm = float(np.clip(fwhm_px, 1.0, 10.0))
    k = int(min(7, max(1, np.ceil(1.5 * fwhm / 2.0))))
    sigma = fwhm / 2.3548200450309493
    d = np.arange(-k, k + 1)
    kern = np.exp(-0.5 * (d[:, None] ** 2 + d[None, :] ** 2) / sigma**2)
    return kern / kern.sum()


def detect_thresh_for(significance: float, fwhm_px: float) -> float:
    """DETECT_THRESH (in units of the *unfiltered* pixel RMS, as Source Extractor applies it to
    the filtered image) for a detection ``significance`` in units of the filtered image's noise.

    Filtering white noise of RMS s with a normalised kernel k leaves s sqrt(sum k^2), so a
    threshold of N filtered-noise sigmas is N sqrt(sum k^2) pixel sigmas. For a kernel matched
    to the PSF the significance is the S/N of an optimal (PSF-weighted) flux.
    """
    return float(significance * np.sqrt((gaussian_kernel(fwhm_px) ** 2).sum()))


def flag_image_data(mask: np.ndarray) -> np.ndarray:
    """The mask as a signed integer array Source Extractor reads without BZERO (fix of B14).

    int16 when every value fits (the documented MaskBit bits do), else int32.
    """
    m = np.asarray(mask)
    if m.size and int(m.max()) > np.iinfo(np.int16).max:
        return m.astype(np.int32)
    return m.astype(np.int16)


def write_flag_image(mask: np.ndarray, dest: str | Path) -> Path:
    """Write :func:`flag_image_data` of ``mask`` to ``dest`` (a scratch file)."""
    return write_fits(dest, flag_image_data(mask))


def parse_background(log: str) -> tuple[float, float, float]:
    """(background, rms, threshold) from Source Extractor's ``Background: ... RMS: ...`` line."""
    found = _BACKGROUND.findall(log.replace("\x1b", " "))
    if not found:
        return float("nan"), float("nan"), float("nan")
    b, r, t = found[-1]
    return float(b), float(r), float(t)


def split_vector_columns(table: Table) -> Table:
    """Split vector columns as astropy's ASCII reading of v1 did: ``MAG_APER`` (n, 6) becomes
    ``MAG_APER, MAG_APER_1 ... MAG_APER_5``."""
    out = Table(meta=table.meta)
    for name in table.colnames:
        col = table[name]
        if col.ndim == 2:
            for j in range(col.shape[1]):
                out[name if j == 0 else f"{name}_{j}"] = np.asarray(col[:, j])
        else:
            out[name] = col
    return out


def build_args(image: Path, catalog: Path, params: Path, conv: Path, *, gain: float, saturation: float,
               seeing_arcsec: float, apertures_px: list[float] | None = None, weight: Path | None = None,
               weight_type: str = "MAP_WEIGHT", flag: Path | None = None,
               overrides: dict[str, object] | None = None) -> list[str]:
    """Command-line arguments of one Source Extractor run.

    Parameters
    ----------
    image, catalog, params, conv : Path
        Measured image, output FITS catalogue, parameter list and detection filter.
    gain : float
        e-/ADU valid for the image's pixel units (its ``EGAIN``); 0 means "no Poisson term".
    saturation : float
        Saturation level in the image's pixel units.
    seeing_arcsec : float
        Stellar FWHM for CLASS_STAR (arcsec).
    apertures_px : list of float, optional
        Aperture diameters (px) for MAG_APER.
    weight, weight_type : Path, str
        Weight map and its type (``MAP_WEIGHT`` inverse variance, ``MAP_RMS`` noise sigma).
    flag : Path, optional
        Integer flag image (see :func:`flag_image_data`).
    overrides : dict, optional
        Further ``KEY: value`` settings (detection threshold, background mesh...).
    """
    def a(path: Path) -> str:
        return os.path.abspath(path)

    args: list[str] = [a(image), "-c", str(package_file("phot.sex")),
                       "-CATALOG_NAME", a(catalog), "-CATALOG_TYPE", "FITS_1.0",
                       "-PARAMETERS_NAME", a(params), "-FILTER_NAME", a(conv),
                       "-STARNNW_NAME", str(nnw_path()),
                       "-GAIN", f"{max(float(gain), 0.0):.6g}", "-GAIN_KEY", "GPPYNOGN",
                       "-SATUR_LEVEL", f"{float(saturation):.8g}", "-SATUR_KEY", "GPPYNOST",
                       "-SEEING_FWHM", f"{float(seeing_arcsec):.4f}"]
    if apertures_px:
        args += ["-PHOT_APERTURES", ",".join(f"{a:.4f}" for a in apertures_px)]
    if weight is not None:
        args += ["-WEIGHT_TYPE", weight_type, "-WEIGHT_IMAGE", a(weight)]
    if flag is not None:
        args += ["-FLAG_IMAGE", a(flag), "-FLAG_TYPE", "OR"]
    for key, value in (overrides or {}).items():
        args += [f"-{key}", str(value)]
    return args


def run(args: list[str], catalog: Path, cwd: Path, timeout: float = 900.0) -> SexResult:
    """Run Source Extractor with ``args`` (from :func:`build_args`) and read its catalogue.

    Returns the catalogue with vector columns split (:func:`split_vector_columns`) and the
    global background, RMS and threshold parsed from its log.
    """
    proc = run_tool("sextractor", args, cwd=cwd, timeout=timeout)
    background, rms, threshold = parse_background(proc.stderr + proc.stdout)
    table = Table.read(catalog, format="fits", hdu=1) if _has_rows_hdu(catalog) else Table()
    return SexResult(split_vector_columns(table), background, rms, threshold)


def run_many(jobs: list[tuple[list[str], Path, Path]], max_workers: int) -> list[SexResult]:
    """Run several Source Extractor jobs ``(args, catalog, cwd)`` at once (threads waiting on
    processes: the Debian build is single-threaded, so this is how it uses several cores)."""
    from concurrent.futures import ThreadPoolExecutor

    if max_workers <= 1 or len(jobs) == 1:
        return [run(a, c, d) for a, c, d in jobs]
    with ThreadPoolExecutor(max_workers=max_workers) as pool:
        return list(pool.map(lambda j: run(*j), jobs))


def usable_cpus() -> int:
    """CPUs this process may use (the container's share)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def split_rows(ny: int, nparts: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """Row ranges to cut an image into ``nparts`` horizontal bands.

    Returns ``(y0, y1, core0, core1)`` per band (0-based, end exclusive): the band read is
    [y0, y1), and its sources count when their centre lies in [core0, core1); the cores tile
    the image and each band extends ``overlap`` rows beyond its core.
    """
    edges = np.linspace(0, ny, nparts + 1).round().astype(int)
    out = []
    for i in range(nparts):
        c0, c1 = int(edges[i]), int(edges[i + 1])
        out.append((max(0, c0 - overlap), min(ny, c1 + overlap), c0, c1))
    return out


def merge_bands(results: list[SexResult], bands: list[tuple[int, int, int, int]]) -> SexResult:
    """One catalogue from the bands: sources whose centre lies in their band's core, with
    Y_IMAGE (and YPEAK_IMAGE) moved to the full image, renumbered; the global background and
    RMS are the bands' means."""
    from astropy.table import vstack

    parts = []
    for res, (y0, _, c0, c1) in zip(results, bands, strict=True):
        t = res.table
        if len(t) == 0:
            continue
        yfull = np.asarray(t["Y_IMAGE"], float) + y0
        keep = (yfull - 1 >= c0 - 0.5) & (yfull - 1 < c1 - 0.5)
        t = t[keep]
        t["Y_IMAGE"] = t["Y_IMAGE"] + y0
        if "YPEAK_IMAGE" in t.colnames:
            t["YPEAK_IMAGE"] = t["YPEAK_IMAGE"] + y0
        parts.append(t)
    table = vstack(parts, metadata_conflicts="silent") if parts else results[0].table[:0]
    if "NUMBER" in table.colnames:
        table["NUMBER"] = np.arange(1, len(table) + 1, dtype=table["NUMBER"].dtype)
    return SexResult(table, float(np.nanmean([r.background for r in results])),
                     float(np.nanmean([r.rms for r in results])), float(np.nanmean([r.threshold for r in results])))


def _has_rows_hdu(catalog: Path) -> bool:
    from astropy.io import fits

    with fits.open(catalog) as hdul:
        return len(hdul) > 1
