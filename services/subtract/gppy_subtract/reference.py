"""The reference image: v1's choice rules, its noise and mask, and reprojection onto the science grid.

Choice (v1-behaviour.md §8.1), in ``<ref_frame>/<FILT>/``: the first (sorted) file named
``ref_7DT_<OBJ>_<date>_<time>_<FILT>_<...>.fits``; if none, the first
``ref_PS1_<OBJ>_<date>_<time>_<FILT>_0.fits``. Names containing ``mask`` (v1) and our own
side-cars (``.weight.fits``, ``.noise.fits``, ``.conv.fits``) are never references. Fields
are compared exactly (v1 bug B17: no substring matches).

Noise and mask of a reference: ``<stem>.weight.fits`` (inverse variance) and
``<stem>.mask.fits`` when they exist (7DT references from the stack stage; v1's int8 0/1
masks read the same way: non-zero = masked). Without a weight map (PS1 cut-outs) the
variance is ``SKYSIG**2`` from the header, else the robust pixel variance of the image, and
pixels that are exactly 0 or not finite are masked (v1: "1 where the pixel == 0").

Reprojection (v1 assumed the reference was already on the science grid and never checked):
when the grids differ by more than ``tol_px`` anywhere, the reference is resampled onto the
science grid with the ``reproject`` package (bicubic for the image, bilinear for variance and
mask), in bands of rows to bound memory. The image is scaled by the pixel-area ratio
``f = A_science / A_reference`` so that fluxes are conserved, and the variance by ``f`` (not
``f**2``): the resampled noise is correlated over the input pixel, so what the convolution
kernel integrates is the noise power per unit area, ``var_in * A_ref`` per science pixel area
``A_sci`` times ``f**2``. This is exact for kernels wider than the interpolation kernel, the
usual case since the sharper image is convolved. Pixels outside the reference, or within one
pixel of a masked input pixel, are masked.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS

from gppy.masks import MaskBit

SIDECAR_SUFFIXES = (".weight.fits", ".mask.fits", ".noise.fits", ".conv.fits", ".var.fits", ".flag.fits")


@dataclass(frozen=True)
class ReferenceName:
    """Fields of a reference file name ``ref_<SURVEY>_<OBJ>_<date>_<time>_<FILT>_<rest>.fits``."""

    survey: str
    obj: str
    date: str
    time: str
    filt: str
    rest: str


def parse_reference_name(name: str) -> ReferenceName | None:
    """The fields of a reference name, or None when ``name`` is not a reference image."""
    if not name.startswith("ref_") or not name.endswith(".fits") or "mask" in name:
        return None
    if name.endswith(SIDECAR_SUFFIXES):
        return None
    parts = name[:-5].split("_")
    if len(parts) < 7:
        return None
    return ReferenceName(survey=parts[1], obj=parts[2], date=parts[3], time=parts[4], filt=parts[5],
                         rest="_".join(parts[6:]))


def choose_reference(names: list[str], obj: str, filt: str) -> str | None:
    """The reference among ``names`` for object ``obj`` in filter ``filt`` (v1 §8.1 rules).

    Parameters
    ----------
    names : list of str
        File names in ``<ref_frame>/<FILT>/``.
    obj, filt : str
        OBJECT and FILTER of the science image (exact match).

    Returns
    -------
    str or None
        The 7DT reference if any (first in sorted order), else the PS1 one whose last field is
        ``0``, else None.
    """
    seven, ps1 = [], []
    for n in sorted(names):
        f = parse_reference_name(n)
        if f is None or f.obj != obj or f.filt != filt:
            continue
        if f.survey == "7DT":
            seven.append(n)
        elif f.survey == "PS1" and f.rest == "0":
            ps1.append(n)
    if seven:
        return seven[0]
    return ps1[0] if ps1 else None


def find_reference(ref_root: Path, obj: str, filt: str) -> Path | None:
    """The reference file for (OBJECT, FILTER) under ``<ref_root>/<FILT>/``, or None."""
    folder = Path(ref_root) / filt
    if not folder.is_dir():
        return None
    name = choose_reference([p.name for p in folder.iterdir() if p.is_file()], obj, filt)
    return folder / name if name else None


def grid_offset(wcs_a: WCS, shape_a: tuple[int, int], wcs_b: WCS, n: int = 7) -> float:
    """Largest offset (px of grid a) between grid a's pixels and the same sky points on grid b.

    Evaluated on an ``n x n`` lattice over grid a (corners included).
    """
    h, w = shape_a
    yy, xx = np.meshgrid(np.linspace(0, h - 1, n), np.linspace(0, w - 1, n), indexing="ij")
    sky = wcs_a.pixel_to_world(xx.ravel(), yy.ravel())
    xb, yb = wcs_b.world_to_pixel(sky)
    return float(np.nanmax(np.hypot(np.asarray(xb) - xx.ravel(), np.asarray(yb) - yy.ravel())))


def same_grid(wcs_a: WCS, shape_a: tuple[int, int], wcs_b: WCS, shape_b: tuple[int, int],
              tol_px: float = 0.05) -> bool:
    """True when grid b has grid a's shape and every pixel maps within ``tol_px``."""
    if tuple(shape_a) != tuple(shape_b):
        return False
    try:
        return grid_offset(wcs_a, shape_a, wcs_b) <= tol_px
    except Exception:
        return False


def pixel_area_ratio(wcs_out: WCS, wcs_in: WCS) -> float:
    """``A_out / A_in``: projected pixel areas of two celestial WCSs at their reference points."""
    return float(wcs_out.celestial.proj_plane_pixel_area() / wcs_in.celestial.proj_plane_pixel_area())


def noise_from_image(data: np.ndarray, header: fits.Header | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Variance and mask of a reference without a weight map.

    Returns
    -------
    var : float32 (H, W)
        ``SKYSIG**2`` from the header if present, else the robust pixel variance
        (1.4826 MAD of a sub-sample), 0 where masked.
    mask : uint16 (H, W)
        ``NONFINITE`` where not finite, ``EDGE`` where exactly 0 (no data).
    """
    finite = np.isfinite(data)
    mask = np.where(finite, 0, int(MaskBit.NONFINITE)).astype(np.uint16)
    mask[finite & (data == 0)] |= int(MaskBit.EDGE)
    skysig = float(header.get("SKYSIG", 0) or 0) if header is not None else 0.0
    if skysig <= 0:
        sub = data[::4, ::4][mask[::4, ::4] == 0]
        if sub.size < 10:
            skysig = 1.0
        else:
            med = float(np.median(sub))
            skysig = 1.4826 * float(np.median(np.abs(sub - med)))
    var = np.where(mask == 0, skysig ** 2, 0).astype(np.float32)
    return var, mask


def reproject_to_grid(data: np.ndarray, var: np.ndarray, mask: np.ndarray, wcs_in: WCS, wcs_out: WCS,
                      shape_out: tuple[int, int], band: int = 1024) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Resample a reference (image, variance, mask) onto another grid.

    Parameters
    ----------
    data : (h, w) float
        Reference image, flux per pixel (its units).
    var : (h, w) float
        Its background variance (units^2); 0 where masked.
    mask : (h, w) uint16
        Its bit mask.
    wcs_in, wcs_out : astropy.wcs.WCS
        Celestial WCS of the reference and of the science grid.
    shape_out : (H, W)
        Science grid shape.
    band : int
        Rows resampled at a time (memory bound).

    Returns
    -------
    data, var : float32 (H, W)
        Flux-conserving resampled image and its variance (see the module docstring); 0 where
        masked.
    mask : uint16 (H, W)
        ``EDGE`` outside the reference, ``BAD`` where a masked input pixel contributes.
    """
    from reproject import reproject_interp

    f = pixel_area_ratio(wcs_out, wcs_in)
    bad_in = (mask != 0) | ~np.isfinite(data) | ~(var > 0)
    fill = float(np.median(data[~bad_in][::7])) if (~bad_in).any() else 0.0
    d_in = np.where(bad_in, fill, data).astype(np.float64)
    v_in = np.where(bad_in, 0, var).astype(np.float64)
    b_in = bad_in.astype(np.float64)
    H, W = shape_out
    d_out = np.zeros((H, W), np.float32)
    v_out = np.zeros((H, W), np.float32)
    m_out = np.zeros((H, W), np.uint16)
    wcs_in2 = wcs_in.celestial
    for y0 in range(0, H, band):
        y1 = min(y0 + band, H)
        sub = wcs_out.celestial.slice((slice(y0, y1), slice(0, W)))
        shp = (y1 - y0, W)
        d, fp = reproject_interp((d_in, wcs_in2), sub, shape_out=shp, order="bicubic")
        v, _ = reproject_interp((v_in, wcs_in2), sub, shape_out=shp, order="bilinear")
        b, _ = reproject_interp((b_in, wcs_in2), sub, shape_out=shp, order="bilinear")
        outside = ~(fp > 0.999) | ~np.isfinite(d) | ~np.isfinite(v)
        touched = np.nan_to_num(b, nan=1.0) > 1e-6
        # one more pixel around masked inputs: the bicubic kernel reaches 2 input pixels
        grown = touched.copy()
        grown[1:, :] |= touched[:-1, :]
        grown[:-1, :] |= touched[1:, :]
        grown[:, 1:] |= touched[:, :-1]
        grown[:, :-1] |= touched[:, 1:]
        m = np.zeros(shp, np.uint16)
        m[grown] |= int(MaskBit.BAD)
        m[outside] = int(MaskBit.EDGE)
        good = m == 0
        d_out[y0:y1] = np.where(good, d * f, 0)
        v_out[y0:y1] = np.where(good, v * f, 0)
        m_out[y0:y1] = m
    return d_out, v_out, m_out


def cache_key(ref_path: Path, grid_header: fits.Header, shape: tuple[int, int]) -> str:
    """Stable key of (reference file content identity, target grid): 16 hex digits."""
    st = Path(ref_path).stat()
    cards = sorted(f"{k}={grid_header[k]!r}" for k in grid_header
                   if k.startswith(("CTYPE", "CRVAL", "CRPIX", "CD", "PC", "CDELT", "PV", "LONPOLE", "LATPOLE",
                                    "RADESYS", "EQUINOX", "A_", "B_")))
    blob = "|".join([str(Path(ref_path).resolve()), str(st.st_size), str(int(st.st_mtime)), str(shape), *cards])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
