"""The subtract stage service: PSF-matched difference of each stack against its reference.

Consumes ``phot.done``. Acts on successful photometry of a stack (and of a single frame when
``subtract_singles`` is set); every other ``phot.done`` is ignored. For each it

1. reads the science image with its weight and mask (``<stem>.weight.fits``,
   ``<stem>.mask.fits``), OBJECT and FILTER from the header (else name fields 2 and 5, v1);
2. chooses the reference (:func:`gppy_subtract.reference.find_reference`); none is the
   reported outcome ``diff.done`` with ``ok=False, reason="no reference"``;
3. brings the reference onto the science grid: as is when the grids agree, else reprojected and
   cached as ``<cache>/<ref stem>.<key>.resamp{,.noise,.mask}.fits`` with
   ``<cache> = <ref_frame>/<FILT>/resampled`` (or ``<path_scratch>/ref_cache/<FILT>`` when the
   reference folder is read-only); the key covers the reference file and the science grid;
   the catalogue stars that moved between the reference's epoch and the science's (proper
   motion; a survey reference may be a decade older) are then moved in it
   (:mod:`gppy_subtract.propermotion`; ``subtract_move_stars``, header keys ``SUBPM*``);
4. runs the native engine (:mod:`gppy_subtract.engine`; array backend from ``gpu``), or
   HOTPANTS when ``subtract_engine`` is ``hotpants``/``auto`` and the binary is on PATH;
5. writes ``transient/<stem>.subt.fits`` (difference, science header and quality keys),
   ``<stem>.subt.noise.fits`` (1-sigma; its inverse square is the weight), ``<stem>.subt.mask.fits``
   (uint16 MaskBit) and the convolved image (:func:`gppy.naming.convolved_reference_name` when the reference is
   convolved, else ``<stem>.conv.fits``), all atomically and provenance-stamped;
6. returns ``diff.done``.

A subtraction that cannot be done (unreadable input, no stars in common, no kernel) gives
``diff.done`` with ``ok=False`` and the reason, plus ``stage.failed``, so that the night's
accounting never waits for it. Products that exist, are newer than both inputs and carry the
same settings hash are reused (a redelivered message costs nothing).

Settings: ``gpu``, ``subtract_engine`` (native | hotpants | auto), ``subtract_nregions``
(v1 ``-nrx 3 -nry 2``), ``subtract_singles``, ``subtract_move_stars`` (default on) and, when the shared settings provide it,
``subtract_convolve`` (auto | reference | science; default auto).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS, FITSFixedWarning, InconsistentAxisTypesError, NoConvergence

from gppy import tools
from gppy.fitsio import BadInputError, read_header, read_image, write_fits
from gppy.messages import DifferenceDone, Event, PhotometryDone
from gppy.naming import (
    ProductDirs,
    convolved_reference_name,
    difference_name,
    flag_of,
    sanitize,
    stem,
    weight_of,
)
from gppy.provenance import settings_hash, stamp
from gppy.refcat import catalogue_motion, image_epoch
from gppy.runtime import StageService, run_service
from gppy.xp import backend_name, get_xp, to_host

from . import products, propermotion, reference
from .engine import EngineError, EngineParams, Plane, subtract, to_host_result
from .stamps import sky_level

log = logging.getLogger(__name__)
STAGE = "subtract"
#: WCS failures while reprojecting: the reference cannot be used with this image (not retried)
_WCS_ERRORS = (NoConvergence, InconsistentAxisTypesError)


@dataclasses.dataclass
class Inputs:
    """One image with its variance and mask (host arrays) and header."""

    path: Path
    data: np.ndarray
    var: np.ndarray
    mask: np.ndarray
    header: fits.Header

    @property
    def egain(self) -> float | None:
        try:
            g = float(self.header.get("EGAIN", 0) or 0)
        except (TypeError, ValueError):
            return None
        return g if g > 0 else None

    @property
    def saturate(self) -> float | None:
        try:
            s = float(self.header.get("SATURATE", 0) or 0)
        except (TypeError, ValueError):
            return None
        return s if s > 0 else None


def object_filter(header: fits.Header, path: Path) -> tuple[str, str]:
    """OBJECT and FILTER of an image: header first, else v1's name fields 2 and 5."""
    parts = Path(path).name.split("_")
    obj = str(header.get("OBJECT", "") or (parts[2] if len(parts) > 5 else "")).strip()
    filt = str(header.get("FILTER", "") or (parts[5] if len(parts) > 5 else "")).strip()
    if not obj or not filt:
        raise BadInputError(path, "no OBJECT/FILTER in the header or the file name")
    return sanitize(obj, "OBJECT"), sanitize(filt, "FILTER")


def read_mask(path: Path, shape) -> np.ndarray | None:
    if not path.exists():
        return None
    header = read_header(path)
    if int(header.get("BITPIX", 16)) < 0:          # a float mask: non-finite counts as masked
        data, _ = read_image(path, dtype=np.float32)
        data = np.where(np.isfinite(data), data, 1)
    else:
        data, _ = read_image(path, dtype=np.int32)
    if data.shape != tuple(shape):
        raise BadInputError(path, f"mask shape {data.shape} differs from the image's {tuple(shape)}")
    return np.clip(data, 0, 65535).astype(np.uint16)


def read_with_noise(path: Path, require_weight: bool) -> Inputs:
    """An image with the variance from its weight map and its mask.

    Without a weight map: an error when ``require_weight``, else the variance and mask come
    from the image itself (:func:`gppy_subtract.reference.noise_from_image`).
    """
    data, header = read_image(path)
    wpath = weight_of(path)
    mask = read_mask(flag_of(path), data.shape)
    if wpath.exists():
        w, _ = read_image(wpath)
        if w.shape != data.shape:
            raise BadInputError(wpath, f"weight shape {w.shape} differs from the image's {data.shape}")
        with np.errstate(divide="ignore", invalid="ignore"):
            var = np.where(w > 0, 1.0 / np.where(w > 0, w, 1.0), 0).astype(np.float32)
        if mask is None:
            mask = np.zeros(data.shape, np.uint16)
    elif require_weight:
        raise BadInputError(wpath, "weight map missing")
    else:
        var, mask0 = reference.noise_from_image(data, header)
        mask = mask0 if mask is None else (mask | mask0)
    bad = ~np.isfinite(data)
    if bad.any():
        data = np.where(bad, 0, data).astype(np.float32)
    return Inputs(Path(path), data.astype(np.float32, copy=False), var, mask, header)


def _celestial_wcs(header: fits.Header, path: Path) -> WCS:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        try:
            w = WCS(header).celestial
        except Exception as exc:
            raise BadInputError(path, f"unusable WCS ({exc})") from exc
    if not w.has_celestial:
        raise BadInputError(path, "no celestial WCS")
    return w


def cache_dirs(ref_path: Path, scratch_root: Path, filt: str) -> list[Path]:
    return [ref_path.parent / "resampled", Path(scratch_root) / "ref_cache" / filt]


def reference_on_grid(ref_path: Path, sci: Inputs, scratch_root: Path, filt: str) -> tuple[Inputs, bool]:
    """The reference on the science grid (reprojected and cached when needed).

    Returns
    -------
    (Inputs, bool)
        The reference planes and whether it was reprojected.
    """
    ref = read_with_noise(ref_path, require_weight=False)
    w_sci = _celestial_wcs(sci.header, sci.path)
    w_ref = _celestial_wcs(ref.header, ref_path)
    if reference.same_grid(w_sci, sci.data.shape, w_ref, ref.data.shape):
        return ref, False
    key = reference.cache_key(ref_path, sci.header, sci.data.shape)
    name = f"{stem(ref_path)}.{key}.resamp"
    for d in cache_dirs(ref_path, scratch_root, filt):
        img, noi, msk = d / f"{name}.fits", d / f"{name}.noise.fits", d / f"{name}.mask.fits"
        if img.exists() and noi.exists() and msk.exists():
            data, hdr = read_image(img)
            sig, _ = read_image(noi)
            mask = read_mask(msk, data.shape)
            log.info("reference %s: cached reprojection %s", ref_path.name, img)
            return Inputs(img, data, (sig.astype(np.float64) ** 2).astype(np.float32), mask, hdr), True
    log.info("reference %s: reprojecting onto the science grid", ref_path.name)
    data, var, mask = reference.reproject_to_grid(ref.data, ref.var, ref.mask, w_ref, w_sci, sci.data.shape)
    f = reference.pixel_area_ratio(w_sci, w_ref)
    hdr = products.wcs_keys(sci.header)
    for key_ in ("OBJECT", "FILTER", "BUNIT", "MAGZERO", "SKYSIG"):
        if key_ in ref.header:
            hdr[key_] = ref.header[key_]
    if ref.egain:
        products.set_card(hdr, "EGAIN", ref.egain / f, "e- per unit of the resampled image")
    if ref.saturate:
        products.set_card(hdr, "SATURATE", ref.saturate * f, "saturation in resampled units")
    products.set_card(hdr, "RESAMPF", f, "flux scale: science / reference pixel area")
    products.set_card(hdr, "RESAMPOF", ref_path.name[:60], "resampled reference")
    stamp(hdr, STAGE, inputs=[ref_path, sci.path], tools=None)
    for d in cache_dirs(ref_path, scratch_root, filt):
        try:
            d.mkdir(parents=True, exist_ok=True)
            if not os.access(d, os.W_OK):
                continue
            write_fits(d / f"{name}.fits", data, hdr)
            write_fits(d / f"{name}.noise.fits", np.sqrt(var).astype(np.float32), hdr)
            write_fits(d / f"{name}.mask.fits", mask, hdr)
            img = d / f"{name}.fits"
            break
        except OSError as exc:
            log.warning("cannot cache the reprojection in %s: %s", d, exc)
    else:
        img = ref_path
    return Inputs(img, data, var, mask, hdr), True


def stars_to_science_epoch(ref: Inputs, ref_header: fits.Header, sci: Inputs, path_refcat: Path, filt: str
                           ) -> tuple[Inputs, dict]:
    """The reference (on the science grid) with the catalogue stars that moved between the two
    epochs moved to their place at the science's (:mod:`.propermotion`), and what was done
    (``pm_moved``, ``pm_max_shift``, ``pm_ref_epoch``: the products' ``SUBPM*`` keys); unchanged
    (and ``{}``) when an epoch or the field's catalogue is unknown."""
    obj, _ = object_filter(sci.header, sci.path)
    t_ref, t_sci = image_epoch(ref_header), image_epoch(sci.header)
    motion = catalogue_motion(path_refcat, obj, t_sci, t_ref, filt=filt)
    if motion is None:
        log.info("%s: reference epoch or catalogue of %s unknown: stars not moved", sci.path.name, obj)
        return ref, {}
    w_sci = _celestial_wcs(sci.header, sci.path)
    ra, dec, ra_r, dec_r, mag = motion
    ok = np.isfinite(ra) & np.isfinite(dec) & np.isfinite(ra_r) & np.isfinite(dec_r)
    x_new, y_new = w_sci.all_world2pix(ra[ok], dec[ok], 0)
    x_old, y_old = w_sci.all_world2pix(ra_r[ok], dec_r[ok], 0)
    sky, sigma = sky_level(ref.data, ref.mask, np)
    scale = float(np.sqrt(abs(np.linalg.det(w_sci.pixel_scale_matrix))) * 3600.0)
    seeing = max(float(ref_header.get("SEEING", 0) or 0), float(sci.header.get("SEEING", 0) or 0), 2.0)
    data, mask, moved = propermotion.move_stars(ref.data, ref.mask, x_old, y_old, x_new, y_new,
                                                10.0 ** (-0.4 * (mag[ok] - 20.0)), sky=sky, sigma=sigma,
                                                fwhm_px=seeing / scale)
    log.info("%s: %d stars moved by up to %.2f px from the reference epoch %.2f", sci.path.name, moved.n_moved,
             moved.max_shift_px, t_ref.jyear)
    return (Inputs(ref.path, data, ref.var, mask, ref.header),
            {"pm_moved": moved.n_moved, "pm_max_shift": round(moved.max_shift_px, 3),
             "pm_ref_epoch": round(float(t_ref.jyear), 3)})


def engine_params(settings) -> EngineParams:
    """Engine settings; masked pixels of the convolved image spoil the difference only where
    the light they may have held matters (``mask_growth="light"``; the settings may say
    ``subtract_mask_growth = "footprint"`` for HOTPANTS' whole-footprint rule)."""
    nx, ny = settings.subtract_nregions
    return EngineParams(nregions=(int(nx), int(ny)), convolve=getattr(settings, "subtract_convolve", "auto"),
                        mask_growth=getattr(settings, "subtract_mask_growth", "light"))


def product_paths(sci_path: Path, ref_path: Path, sci_header: fits.Header, convolved: str) -> dict[str, Path]:
    dirs = ProductDirs(Path(sci_path).parent)
    diff = difference_name(Path(sci_path), dirs)
    conv = None
    if convolved == "reference" and sci_header.get("DATE-OBS"):
        try:
            conv = convolved_reference_name(Path(ref_path), str(sci_header["DATE-OBS"]), dirs)
        except Exception:
            conv = None
    if conv is None:
        conv = dirs.transient / f"{stem(sci_path)}.conv.fits"
    return {"diff": diff, "noise": diff.with_name(stem(diff) + ".noise.fits"), "mask": flag_of(diff),
            "conv": conv}


class SubtractService(StageService):
    """Difference images of stacks (and, optionally, singles) against their references."""

    name = "subtract"
    consumes = ["phot.done"]

    def wanted(self, event: Event) -> bool:
        if not isinstance(event, PhotometryDone) or not event.ok:
            return False
        return event.image_kind == "stack" or (event.image_kind == "single" and self.settings.subtract_singles)

    async def handle(self, event: Event) -> list[Event]:
        if not self.wanted(event):
            return []
        return await asyncio.to_thread(self.process, event)

    # ------------------------------------------------------------------ work
    def _settings_dict(self, engine: str) -> dict:
        d = dataclasses.asdict(engine_params(self.settings))
        d["engine"] = engine
        d["move_stars"] = bool(self.settings.subtract_move_stars)
        return d

    def process(self, event: PhotometryDone) -> list[Event]:
        sci_path = Path(event.image_path)
        base = dict(night_id=event.night_id, unit=event.unit, lane=event.lane, run=event.run,
                    science_path=str(sci_path))
        try:
            header = read_header(sci_path)
            obj, filt = object_filter(header, sci_path)
        except BadInputError as exc:
            return [DifferenceDone(**base, object="", filter="", ok=False, reason=str(exc)),
                    self.failed(event, str(exc), str(sci_path))]
        base.update(object=obj, filter=filt)
        ref_path = reference.find_reference(Path(self.paths.ref_frame), obj, filt)
        if ref_path is None:
            log.info("%s: no reference for %s/%s", sci_path.name, obj, filt)
            return [DifferenceDone(**base, ok=False, reason="no reference")]
        engine = self._engine()
        try:
            with self.step("subtraction"):
                out = self.subtract_files(sci_path, ref_path, filt, engine)
        except (BadInputError, EngineError, tools.ToolError, *_WCS_ERRORS) as exc:
            reason = f"subtraction failed: {exc}"
            log.error("%s: %s", sci_path.name, reason)
            return [DifferenceDone(**base, ok=False, reason=reason[:2000], reference_path=str(ref_path)),
                    self.failed(event, reason, str(sci_path))]
        return [DifferenceDone(**base, ok=True, path=str(out["diff"]), noise_path=str(out["noise"]),
                               mask_path=str(out["mask"]), conv_path=str(out["conv"]),
                               reference_path=str(ref_path))]

    def _engine(self) -> str:
        want = self.settings.subtract_engine
        if want in ("hotpants", "auto") and tools.which("hotpants"):
            return "hotpants"
        if want == "hotpants":
            log.warning("subtract_engine=hotpants but no hotpants binary on PATH: using the native engine")
        return "native"

    def _reusable(self, out: dict[str, Path], inputs: list[Path], shash: str) -> bool:
        try:
            if not all(p.exists() for p in out.values()):
                return False
            newest_input = max(p.stat().st_mtime for p in inputs)
            if min(p.stat().st_mtime for p in out.values()) < newest_input:
                return False
            h = read_header(out["diff"])
        except (OSError, BadInputError):
            return False
        return h.get("PIPESET") == shash and h.get("PROVIN01") == inputs[0].name[:68]

    def subtract_files(self, sci_path: Path, ref_path: Path, filt: str, engine: str) -> dict[str, Path]:
        """Run one subtraction from files to products; returns the product paths."""
        shash = settings_hash(self._settings_dict(engine))
        sci_header = read_header(sci_path)
        for convolved in ("reference", "science"):
            out = product_paths(sci_path, ref_path, sci_header, convolved)
            if self._reusable(out, [sci_path, ref_path], shash):
                log.info("%s: products up to date, reused", sci_path.name)
                return out
        sci = read_with_noise(sci_path, require_weight=True)
        ref, _ = reference_on_grid(ref_path, sci, Path(self.paths.path_scratch), filt)
        moved: dict = {}
        if self.settings.subtract_move_stars:
            ref, moved = stars_to_science_epoch(ref, read_header(ref_path), sci, Path(self.paths.path_refcat), filt)
        if engine == "hotpants":
            from . import hotpants

            scratch = Path(self.paths.path_scratch) / "subtract"
            scratch.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(prefix=f"{stem(sci_path)[:40]}-", dir=scratch) as tmp:
                res, convolved = hotpants.subtract_with_hotpants(sci, ref, Path(tmp), engine_params(self.settings))
            summary = {**hotpants.summary(res, ref_path.name, convolved), **moved}
            out = product_paths(sci_path, ref_path, sci.header, convolved)
            self._write(out, sci, ref, summary, res["diff"], res["noise"], res["mask"], res["conv"], ref_path,
                        "hotpants")
            return out
        xp = get_xp(self.settings.gpu)
        params = engine_params(self.settings)
        res = subtract(Plane(xp.asarray(sci.data), xp.asarray(sci.var), xp.asarray(sci.mask), sci.egain,
                             sci.saturate),
                       Plane(xp.asarray(ref.data), xp.asarray(ref.var), xp.asarray(ref.mask), ref.egain,
                             ref.saturate), xp, params)
        for name, seconds in res.timings.items():
            self.m_step.labels(self.name, name).observe(seconds)
        res = to_host_result(res)
        summary = {**products.summary_of(res, ref_path.name, "native"), **moved}
        out = product_paths(sci_path, ref_path, sci.header, res.convolved)
        self._write(out, sci, ref, summary, res.diff, res.noise, res.mask, res.convolved_image, ref_path,
                    f"native ({backend_name(xp)})")
        return out

    def _write(self, out, sci: Inputs, ref: Inputs, summary: dict, diff, noise, mask, conv, ref_path: Path,
               engine_label: str) -> None:
        inputs = [sci.path, ref_path]
        resampled = ref.path != ref_path
        settings = self._settings_dict(summary["engine"])
        tools_used = ["hotpants"] if summary["engine"] == "hotpants" else None

        def prov(h: fits.Header) -> fits.Header:
            stamp(h, STAGE, inputs=inputs, settings=settings, tools=tools_used)
            products.set_card(h, "SUBBACK", engine_label[:60], "engine and array backend")
            products.set_card(h, "SUBRESMP", resampled, "reference reprojected onto the science grid")
            return h

        write_fits(out["noise"], to_host(noise).astype(np.float32), prov(products.noise_header(sci.header, summary)))
        write_fits(out["mask"], to_host(mask).astype(np.uint16), prov(products.mask_header(sci.header, summary)))
        write_fits(out["conv"], to_host(conv).astype(np.float32),
                   prov(products.convolved_header(sci.header, ref.header, summary)))
        # the difference last: its presence (with the settings hash) marks a complete set
        write_fits(out["diff"], to_host(diff).astype(np.float32),
                   prov(products.difference_header(sci.header, summary)))


def main() -> None:
    run_service(SubtractService)


if __name__ == "__main__":
    main()
