"""The phot stage service: calibrated photometry of singles and stacks, transients on differences.

Consumes ``frame.solved`` (singles), ``stack.done`` (stacks) and ``diff.done`` (differences);
publishes one ``phot.done`` per input, whatever happens to it, so that the stack stage never
waits for a frame and the watcher can finish the night:

* photometry of an image (single or stack): header keys written into the image (atomic
  replace), ``phot/<stem>.phot.cat``, ``phot/<stem>.zp.png``, ``phot/<stem>.phot.reg``;
* a difference image: ``transient/<stem>.subt.phot.cat``, ``<stem>.subt.transient.cat``,
  ``<stem>.subt.transient.reg`` and the candidates' cutouts in ``transient/fits_image`` and
  ``transient/png_image``;
* an input that failed upstream, or bad input here: ``phot.done`` with ``ok=False`` and the
  reason (plus ``stage.failed`` for a failure of this stage). A failure that exhausts its
  retries is also answered with ``phot.done ok=False`` (:meth:`PhotService._give_up`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
from astropy.io import fits

from gppy import provenance
from gppy.fitsio import BadInputError, atomic_path, read_image, write_fits, write_text
from gppy.messages import (
    DifferenceDone,
    Event,
    FrameSolved,
    PhotometryDone,
    StackDone,
)
from gppy.naming import ProductDirs, phot_catalogue, stem
from gppy.refcat import gaiaxp_path, load_gaiaxp
from gppy.runtime import PermanentError, StageService, run_service
from gppy_phot import catalog, plots, regions
from gppy_phot.photometry import PhotParams, apply_cards, photometer
from gppy_phot.transients import TransientParams

log = logging.getLogger(__name__)

STAGE = "phot"


def phot_params(settings) -> PhotParams:
    """Photometry settings from the service settings."""
    return PhotParams(match_radius_arcsec=float(getattr(settings, "match_radius_arcsec", 1.0)),
                      default_saturation=float(getattr(settings, "saturate_adu", 60000.0)))


def transient_params(settings) -> TransientParams:
    """Transient-search settings: ``GPPY_PHOT_SNR_MIN`` (PSF S/N of a candidate, default 5),
    ``GPPY_PHOT_RB_MIN`` (least vetting score of a candidate, 0.9; from S/N 10 on
    ``GPPY_PHOT_RB_MIN_HIGH_SNR``, 0.3), ``GPPY_PHOT_VETTING_MODEL``
    (the trained vetting score, on; off: v1's flags and the shape-only score) and ``GPPY_PHOT_DETECT_SIGMA`` (Source
    Extractor detection significance, 3.5); negative detections (fading sources) need
    ``GPPY_PHOT_SNR_MIN_NEGATIVE`` (7, never below the positive threshold). With Gaussian noise and a 4.6-px
    PSF, S/N >= 5 leaves ~10 positive noise peaks per 10200 x 6800 difference and S/N >= 5.5
    about 1, at the price of completeness at S/N 5 (~50 % -> ~30 %)."""
    return TransientParams(snr_min=settings.phot_snr_min, rb_min=settings.phot_rb_min,
                           rb_min_high_snr=settings.phot_rb_min_high_snr,
                           snr_min_negative=max(settings.phot_snr_min_negative, settings.phot_snr_min),
                           detect_significance=settings.phot_detect_sigma,
                           vetting_model=settings.phot_vetting_model)


def settings_record(params: PhotParams) -> dict:
    """The settings that affect the products (hashed into the provenance)."""
    return dict(vars(params))


def provenance_meta(inputs: list[str | Path], params: PhotParams, extra: dict | None = None) -> dict:
    """The provenance record as a dict, for text products' meta (``extra``: more settings that
    affect the products, hashed with ``params``)."""
    h = provenance.stamp(fits.Header(), STAGE, inputs, {**settings_record(params), **(extra or {})}, ["sextractor"])
    return {k: h[k] for k in h}


def read_mask(path: str | Path | None) -> np.ndarray | None:
    """The uint16 mask next to an image, or None when there is none."""
    if not path or not Path(path).exists():
        return None
    data, _ = read_image(path, dtype=np.uint16)
    return data


def rewrite_with_header(path: Path, data: np.ndarray, header: fits.Header) -> None:
    """Replace ``path`` atomically with the same pixels and an updated header."""
    hdr = header.copy()
    for key in ("BZERO", "BSCALE"):
        hdr.remove(key, ignore_missing=True)
    write_fits(path, data, hdr)


def photometry_products(image: Path, weight: Path | None, mask_path: Path | None, obj: str, filt: str,
                        unit: str, processed: Path, refcat_root: Path, scratch_root: Path,
                        params: PhotParams, kind: str = "single", timings: dict[str, float] | None = None) -> dict:
    """Photometry of one image and its products; returns the figures for ``phot.done``.

    Raises
    ------
    BadInputError
        Missing or unusable image, reference catalogue or header keys.
    """
    params = dataclasses.replace(params, measure_correlation=kind == "stack")
    times = timings if timings is not None else {}
    t0 = time.perf_counter()
    data, header = read_image(image)
    mask = read_mask(mask_path)
    if mask is not None and mask.shape != data.shape:
        raise BadInputError(mask_path, f"mask shape {mask.shape} differs from the image {data.shape}")
    refpath = gaiaxp_path(refcat_root, obj)
    ref = load_gaiaxp(refpath)
    dirs = ProductDirs.of(processed, obj, unit, filt)
    scratch_root.mkdir(parents=True, exist_ok=True)
    times["read"] = time.perf_counter() - t0
    with tempfile.TemporaryDirectory(prefix=f"phot-{stem(image)[:40]}-", dir=scratch_root) as tmp:
        result = photometer(image, header, data, mask, weight, ref, str(refpath), Path(tmp), params, times)
    t0 = time.perf_counter()
    cat_path = phot_catalogue(image, dirs)
    result.table.meta["provenance"] = provenance_meta([image, refpath], params)
    write_text(cat_path, catalog.to_ecsv(result.table))
    times["write_catalogue"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    png = plots.zp_figure_png(result.zp_inputs, result.zps, Path(image).name)
    png_path = dirs.phot / f"{stem(image)}.zp.png"
    with atomic_path(png_path) as tmp:
        tmp.write_bytes(png)
    write_text(dirs.phot / f"{stem(image)}.phot.reg", regions.phot_regions(result.table, result.seeing.seeing_arcsec))
    times["plot_and_regions"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    # header keys last: the image announces its photometry only once the products exist
    rewrite_with_header(image, data, apply_cards(header, result.cards))
    times["write_header"] = time.perf_counter() - t0
    zp = result.total.zp if result.total is not None and np.isfinite(result.total.zp) else result.zps["AUTO"].zp
    return {"catalogue_path": str(cat_path), "zp": zp, "seeing": result.seeing.seeing_arcsec,
            "depth": result.ul5_1}


class PhotService(StageService):
    """Photometry of singles and stacks, transient search on differences."""

    name = "phot"
    consumes = ["frame.solved", "stack.done", "diff.done"]

    @property
    def params(self) -> PhotParams:
        return phot_params(self.settings)

    @property
    def scratch(self) -> Path:
        return Path(self.paths.path_scratch) / "phot"

    async def handle(self, event: Event) -> list[Event]:
        if isinstance(event, FrameSolved):
            if not event.ok:
                return [self._done(event, event.path, "single", ok=False,
                                   reason=f"frame not solved: {event.reason}" if event.reason else "frame not solved")]
            return await asyncio.to_thread(self._image, event, event.path, event.weight_path, event.mask_path,
                                           "single")
        if isinstance(event, StackDone):
            return await asyncio.to_thread(self._image, event, event.path, event.weight_path, event.mask_path,
                                           "stack")
        if isinstance(event, DifferenceDone):
            if not event.ok:
                return [self._done(event, event.path or event.science_path, "difference", ok=False,
                                   reason=event.reason or "no difference image")]
            return await asyncio.to_thread(self._difference, event)
        return []

    # ------------------------------------------------------------------ helpers
    def _done(self, event: Event, image: str, kind: str, ok: bool = True, reason: str = "", **kw) -> PhotometryDone:
        return PhotometryDone(night_id=event.night_id, unit=event.unit, lane=event.lane,
                              run=getattr(event, "run", 0), image_path=image, image_kind=kind, ok=ok,
                              reason=reason[:2000], **kw)

    def _image(self, event: Event, path: str, weight: str, mask: str, kind: str) -> list[Event]:
        try:
            with self.step(f"{kind}_photometry"):
                figures = photometry_products(
                    Path(path), Path(weight) if weight else None, Path(mask) if mask else None,
                    event.object, event.filter, event.unit, Path(self.paths.path_processed),
                    Path(self.paths.path_refcat), self.scratch, self.params, kind)
        except (BadInputError, PermanentError) as exc:
            log.error("photometry of %s failed: %s", path, exc)
            return [self._done(event, path, kind, ok=False, reason=str(exc)), self.failed(event, str(exc), path)]
        log.info("%s photometry of %s: ZP_TOT %.3f, SEEING %.2f\", UL5_1 %.2f", kind, Path(path).name,
                 figures["zp"], figures["seeing"], figures["depth"])
        return [self._done(event, path, kind, **figures)]

    def _difference(self, event: DifferenceDone) -> list[Event]:
        from gppy_phot.transient_products import difference_products

        try:
            with self.step("difference_photometry"):
                figures = difference_products(event, Path(self.paths.path_processed), self.scratch, self.params,
                                              transient_params(self.settings), Path(self.paths.path_refcat))
        except (BadInputError, PermanentError) as exc:
            log.error("transient search on %s failed: %s", event.path, exc)
            return [self._done(event, event.path, "difference", ok=False, reason=str(exc)),
                    self.failed(event, str(exc), event.path)]
        log.info("transients on %s: %d candidate(s)", Path(event.path).name, figures["ncandidates"])
        return [self._done(event, event.path, "difference", **figures)]

    async def _give_up(self, msg, event: Event, reason: str, delivered: int) -> None:
        """Also answer with ``phot.done ok=False``, so that nothing downstream waits for it."""
        await super()._give_up(msg, event, reason, delivered)
        done = None
        if isinstance(event, FrameSolved):
            done = self._done(event, event.path, "single", ok=False, reason=reason)
        elif isinstance(event, StackDone):
            done = self._done(event, event.path, "stack", ok=False, reason=reason)
        elif isinstance(event, DifferenceDone):
            done = self._done(event, event.path or event.science_path, "difference", ok=False, reason=reason)
        if done is not None:
            with contextlib.suppress(Exception):
                await self.publish(done)


def main() -> None:
    run_service(PhotService)
