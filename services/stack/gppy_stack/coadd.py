"""Building one stack from files: inputs checked, SWarp run, products written.

This is the file-level half of the stage, shared by the nightly visit stacks and the deep
stacks; the science it calls lives in :mod:`~gppy_stack.grid`, :mod:`~gppy_stack.scaling`,
:mod:`~gppy_stack.header`, :mod:`~gppy_stack.maskmap` and :mod:`~gppy_stack.swarp`.
Products are written with :func:`gppy.fitsio.write_fits` (temporary name + rename): the
stack ``<stem>.com.fits``, its ``<stem>.com.weight.fits`` (inverse variance in stack units^-2)
and ``<stem>.com.mask.fits`` (uint16 :class:`gppy.masks.MaskBit`) in the same folder.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS, FITSFixedWarning

from gppy.fitsio import BadInputError, is_complete_fits, read_header, write_fits, write_mask
from gppy.masks import describe as mask_bits
from gppy.naming import flag_of, weight_of
from gppy.provenance import stamp
from gppy.runtime import PermanentError

from . import header as hdr
from . import maskmap, scaling
from .swarp import SwarpOptions, run_swarp

log = logging.getLogger(__name__)
#: Subsampling step for the typical weight and the sky level of an input (px).
SAMPLE_STEP = 8


@dataclass
class StackInput:
    """One checked input frame."""

    path: Path
    weight_path: Path
    mask_path: Path | None
    header: fits.Header
    mjd: float
    exptime: float
    zp: float | None
    egain: float
    saturate: float
    sky: float
    typical_weight: float


@dataclass
class StackResult:
    """What :func:`make_stack` wrote."""

    path: Path
    weight_path: Path
    mask_path: Path
    inputs: list[Path]
    excluded: dict[str, str] = field(default_factory=dict)
    header: fits.Header = field(default_factory=fits.Header)


def _celestial_wcs(header: fits.Header, path: Path) -> WCS:
    import warnings

    if not str(header.get("CTYPE1", "")).startswith("RA--"):
        raise BadInputError(path, "no celestial WCS (CTYPE1 is not RA---*): frame not solved")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        try:
            return WCS(header, naxis=2)
        except Exception as exc:
            raise BadInputError(path, f"unusable WCS ({exc})") from exc


def _grid_wcs_cards(grid: fits.Header, swarp_header: fits.Header) -> fits.Header:
    """The grid's WCS keywords, after checking that SWarp wrote the stack on that grid."""
    for key in ("NAXIS1", "NAXIS2", "CRVAL1", "CRVAL2", "CRPIX1", "CRPIX2"):
        if key in swarp_header and not np.isclose(float(swarp_header[key]), float(grid[key]), rtol=0, atol=1e-7):
            raise RuntimeError(f"SWarp wrote {key}={swarp_header[key]} instead of the grid's {grid[key]}")
    out = fits.Header()
    for card in grid.cards:
        if card.keyword not in ("NAXIS", "NAXIS1", "NAXIS2"):
            out.append(card)
    return out


def inspect_input(path: str | Path, default_saturate: float = 60000.0) -> StackInput:
    """Read and check one input (the calibrated single with its WCS and zero point).

    Raises
    ------
    BadInputError
        Missing or truncated file, no WCS, no weight map, no or bad EGAIN, empty weights.
    """
    p = Path(path)
    header = read_header(p)
    if not is_complete_fits(p):
        raise BadInputError(p, "truncated FITS file")
    _celestial_wcs(header, p)
    wpath = weight_of(p)
    if not wpath.exists() or not is_complete_fits(wpath):
        raise BadInputError(p, f"weight map {wpath.name} missing or truncated")
    mpath = flag_of(p)
    mpath_ok = mpath if mpath.exists() and is_complete_fits(mpath) else None
    try:
        egain = float(header["EGAIN"])
    except (KeyError, TypeError, ValueError) as exc:
        raise BadInputError(p, "no EGAIN (e-/ADU) in the header") from exc
    if not egain > 0:
        raise BadInputError(p, f"EGAIN {egain} is not positive")
    try:
        mjd = hdr.start_mjd(header)
    except ValueError as exc:
        raise BadInputError(p, str(exc)) from exc
    exptime = float(header.get("EXPTIME", 0.0) or 0.0)
    sat = header.get("SATURATE", default_saturate)
    try:
        saturate = float(sat)
    except (TypeError, ValueError):
        saturate = default_saturate
    with fits.open(wpath, memmap=True) as wh, fits.open(p, memmap=True) as ih:
        w = np.asarray(wh[0].data[::SAMPLE_STEP, ::SAMPLE_STEP], dtype=np.float64)
        d = np.asarray(ih[0].data[::SAMPLE_STEP, ::SAMPLE_STEP], dtype=np.float64)
    if w.shape != d.shape:
        raise BadInputError(wpath, f"weight map shape {w.shape} differs from the image's {d.shape}")
    good = (w > 0) & np.isfinite(w) & np.isfinite(d)
    if good.sum() < 10:
        raise BadInputError(wpath, "weight map has no positive weights")
    return StackInput(path=p, weight_path=wpath, mask_path=mpath_ok, header=header, mjd=mjd,
                      exptime=exptime, zp=scaling.zero_point(header), egain=egain, saturate=saturate,
                      sky=float(np.median(d[good])), typical_weight=float(np.median(w[good])))


def _link(target: Path, link: Path) -> Path:
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(Path(target).resolve())
    return link


def _read_mask(path: Path) -> np.ndarray:
    with fits.open(path, memmap=False) as mh:
        return np.asarray(mh[0].data).astype(np.uint16, copy=False)


def _consistent_weight(inp: StackInput, dest: Path) -> Path:
    """The weight map to give SWarp (at ``dest``), zero wherever the mask is set.

    The calibration stage's contract is that weights are already 0 where the mask is set;
    if an input breaks it, a corrected copy is written into the scratch folder (the input
    itself is never modified). Otherwise ``dest`` is a link to the input's weight map.
    """
    if inp.mask_path is None:
        return _link(inp.weight_path, dest)
    mask = _read_mask(inp.mask_path)
    with fits.open(inp.weight_path, memmap=True) as wh:
        weight = wh[0].data
        if weight.shape != mask.shape:
            raise BadInputError(inp.mask_path, f"mask shape {mask.shape} differs from the weight's {weight.shape}")
        masked = mask != 0
        if not np.any(weight[masked] > 0):
            return _link(inp.weight_path, dest)
        fixed = np.array(weight, dtype=np.float32)
    fixed[masked] = 0.0
    log.warning("%s: weight map not zero where masked; using a corrected copy", inp.path.name)
    if dest.is_symlink():
        dest.unlink()
    write_fits(dest, fixed)
    return dest


def _swarp_in_chunks(links: list[Path], weights: list[Path], used: list[StackInput], factors: list[float],
                     grid: fits.Header, run_dir: Path, workdir: Path,
                     options: SwarpOptions) -> tuple[np.ndarray, np.ndarray, fits.Header]:
    """Run SWarp on at most ``options.max_inputs_per_run`` inputs at a time and combine.

    SWarp keeps every resampled input (image and weight, each about the size of a frame) in
    its resample folder until it combines them, so a deep stack of many full-size frames would
    need tens of GB of scratch space. The inverse-variance weighted mean is associative: each
    chunk's coadd ``S_k`` with weight ``W_k`` combines exactly as ``sum W_k S_k / sum W_k``,
    with weight ``sum W_k``. Returns the image and weight (0 where no data) and the first
    run's SWarp header (with SWarp's GAIN only when there was a single run).
    """
    size = max(1, int(options.max_inputs_per_run))
    chunks = [list(range(i, min(i + size, len(used)))) for i in range(0, len(used), size)]
    num = den = None
    swarp_header = fits.Header()
    for j, idx in enumerate(chunks):
        sub = run_dir / f"c{j}"
        img_j, w_j = sub / "o.fits", sub / "o.weight.fits"
        try:
            run_swarp([links[i] for i in idx], [weights[i] for i in idx], grid=grid, imageout=img_j,
                      weightout=w_j, workdir=sub, fscales=[factors[i] for i in idx],
                      gains=[used[i].egain for i in idx], saturates=[used[i].saturate for i in idx],
                      options=options)
        except ValueError as exc:
            raise PermanentError(f"scratch folder {workdir}: {exc}") from exc
        with fits.open(img_j, memmap=False) as ih:
            image = np.asarray(ih[0].data, dtype=np.float32)
            if j == 0:
                swarp_header = ih[0].header.copy()
        with fits.open(w_j, memmap=False) as wh:
            weight = np.asarray(wh[0].data, dtype=np.float32)
        bad = ~np.isfinite(image) | ~np.isfinite(weight) | (weight <= 0)
        image[bad] = 0.0
        weight[bad] = 0.0
        shutil.rmtree(sub, ignore_errors=True)
        if len(chunks) == 1:
            return image, weight, swarp_header
        if num is None:
            num = np.zeros(image.shape, np.float64)
            den = np.zeros(image.shape, np.float64)
        num += weight.astype(np.float64) * image
        den += weight
        del image, weight
    swarp_header.remove("GAIN", ignore_missing=True)
    good = den > 0
    image = np.zeros(den.shape, np.float32)
    image[good] = (num[good] / den[good]).astype(np.float32)
    return image, den.astype(np.float32), swarp_header


def make_stack(paths: Sequence[str | Path], dest: Path, grid: fits.Header, *, settings_for_hash: dict,
               workdir: Path, options: SwarpOptions | None = None, default_saturate: float = 60000.0,
               visit: str = "", centre_source: str = "", tile: str = "",
               name_for=None) -> StackResult:
    """Stack ``paths`` onto ``grid`` and write the stack, its weight and its mask.

    Parameters
    ----------
    paths : sequence of path
        Calibrated singles (or any images with WCS, ZP_AUTO, EGAIN and weight maps).
    dest : Path
        The stack's path; if ``name_for`` is given, only its folder is used.
    grid : astropy.io.fits.Header
        Output grid (:func:`gppy_stack.grid.grid_header`).
    settings_for_hash : dict
        Settings that affect the product (provenance hash).
    workdir : Path
        Scratch folder for SWarp's files (removed afterwards).
    options : SwarpOptions
    default_saturate : float
        ADU, for inputs without SATURATE.
    visit, centre_source, tile : str
        Written into the header.
    name_for : callable, optional
        ``name_for(stats) -> str``: file name from the stack statistics (mean DATE-OBS, total
        EXPTIME); used because the name depends on inputs that may be excluded.

    Raises
    ------
    PermanentError
        When no input is usable.
    """
    options = options or SwarpOptions()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    excluded: dict[str, str] = {}
    inputs: list[StackInput] = []
    for p in paths:
        try:
            inputs.append(inspect_input(p, default_saturate))
        except BadInputError as exc:
            excluded[str(p)] = exc.reason
            log.warning("stack input left out: %s", exc)
    if not inputs:
        raise PermanentError(f"no usable input among {len(paths)} frame(s): {excluded}")
    inputs.sort(key=lambda i: (i.mjd, str(i.path)))
    plan = scaling.plan_scaling([i.zp for i in inputs], [i.exptime for i in inputs], reference=0)
    for idx, reason in plan.excluded.items():
        excluded[str(inputs[idx].path)] = reason
    used = [inputs[i] for i in plan.used]
    factors = plan.factors

    stats = hdr.stack_statistics([i.header for i in used])
    if name_for is not None:
        dest = Path(dest).parent / name_for(stats)
    dest = Path(dest)
    # short names: SWarp aborts on long paths (see swarp.run_swarp)
    run_dir = workdir / hashlib.sha256(str(dest).encode()).hexdigest()[:12]
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        links, weights = [], []
        for k, inp in enumerate(used):
            links.append(_link(inp.path, run_dir / f"i{k}.fits"))
            weights.append(_consistent_weight(inp, run_dir / f"i{k}.weight.fits"))
        image, weight, swarp_header = _swarp_in_chunks(links, weights, used, factors, grid, run_dir, workdir,
                                                       options)

        out_wcs = WCS(grid, naxis=2)
        carried = np.zeros(image.shape, dtype=np.uint16)
        for inp in used:  # one input mask in memory at a time
            if inp.mask_path is not None:
                mask = _read_mask(inp.mask_path)
                if mask.any():
                    maskmap.project_mask_bits(mask, _celestial_wcs(inp.header, inp.path), out_wcs, carried)
                del mask
        mask_out = maskmap.stack_mask(weight, carried, options.kernel_radius)
        del carried

        egain = scaling.effective_gain([i.egain for i in used], factors, [i.typical_weight for i in used])
        saturate = scaling.saturation_level([i.saturate for i in used], [i.sky for i in used], factors)
        wcs_header = _grid_wcs_cards(grid, swarp_header)
        header = hdr.build_stack_header(
            wcs_header, [i.header for i in used], [i.path for i in used], egain=egain, saturate=saturate,
            zp=plan.zp, factors=factors, reference=str(used[0].path), combine=options.combine_type,
            resampling=options.resampling_type, single=len(used) == 1, visit=visit,
            centre_source=centre_source, tile=tile)
        header["BUNIT"] = ("adu", "ADU of the reference frame (STKREF)")
        if "GAIN" in swarp_header:
            header["SWARPGN"] = (float(swarp_header["GAIN"]), "SWarp's own equivalent gain (check)")
        for name, reason in list(excluded.items())[:20]:
            header.add_history(f"left out {Path(name).name}: {reason}"[:72])
        tools = ["SWarp"]
        stamp(header, "stack", [i.path for i in used], settings_for_hash, tools)

        weight_header = fits.Header()
        weight_header.extend(wcs_header.cards)
        weight_header["BUNIT"] = ("adu-2", "inverse variance in stack units^-2")
        hdr.set_card(weight_header, "STKIMG", dest.name[:68], "image this weight map belongs to")
        stamp(weight_header, "stack", [i.weight_path for i in used], settings_for_hash, tools)
        mask_header = fits.Header()
        mask_header.extend(wcs_header.cards)
        hdr.set_card(mask_header, "STKIMG", dest.name[:68], "image this mask belongs to")
        for bit_name, value in mask_bits().items():
            mask_header[f"MASKB_{bit_name}"[:8]] = (value, f"mask bit {bit_name}")
        stamp(mask_header, "stack", [i.path for i in used], settings_for_hash, tools)

        weight_dest = weight_of(dest)
        mask_dest = flag_of(dest)
        write_fits(weight_dest, weight, weight_header)
        write_mask(mask_dest, mask_out, mask_header)
        write_fits(dest, image, header)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    return StackResult(path=dest, weight_path=weight_dest, mask_path=mask_dest, inputs=[i.path for i in used],
                       excluded=excluded, header=header)
