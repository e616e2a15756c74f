"""Astrometry service: ``frame.calibrated`` in, the frame's TPV WCS written, ``frame.solved`` out.

Each frame is solved on its own (Source Extractor + coarse catalogue match + SCAMP against
the field's local reference, :mod:`gppy_astrometry.solve`), so frames of a visit are solved
in parallel by the service's replicas and each is published as soon as it is done. A frame
that cannot be solved (blank, too few stars, wrong field, no reference catalogue, a SCAMP
solution failing the checks) is published with ``ok=False`` and the reason; it is left
unchanged on disk and the night goes on.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from astropy.io import fits
from astropy.time import Time

from gppy import provenance
from gppy.config import PathConfig, Settings
from gppy.fitsio import BadInputError, atomic_path, read_header
from gppy.messages import Event, FrameCalibrated, FrameSolved
from gppy.naming import scratch_dir, stem
from gppy.provenance import tool_version
from gppy.runtime import StageService, run_service
from gppy_astrometry.quality import AstrometryFailure
from gppy_astrometry.reference import ensure_reference
from gppy_astrometry.solve import SolveOptions, solve_frame
from gppy_astrometry.wcs import apply_solution, solution_header

log = logging.getLogger(__name__)


@dataclass
class FrameResult:
    """Outcome of one frame."""

    ok: bool
    reason: str = ""
    nstars: int = 0
    rms_arcsec: float = 0.0
    quality: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)


def replace_primary_header(path: Path, header: fits.Header) -> None:
    """Write ``header`` as the primary header of ``path`` (atomic replace), copying the data
    unit and any extensions byte for byte - what MissFITS does, without decoding the pixels.

    The structural keywords (BITPIX, NAXISn, BZERO/BSCALE) must be those of the file.
    """
    with fits.open(path, memmap=False, lazy_load_hdus=True) as hdul:
        old = hdul[0].header
        for key in ("BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "BZERO", "BSCALE"):
            if old.get(key) != header.get(key):
                raise ValueError(f"{path.name}: header update would change {key}")
        data_start = int(hdul[0].fileinfo()["datLoc"])
    block = header.tostring(padding=True).encode("ascii")
    with atomic_path(path) as tmp, open(path, "rb") as src, open(tmp, "wb") as dst:
        dst.write(block)
        src.seek(data_start)
        shutil.copyfileobj(src, dst, length=16 * 1024 * 1024)


def night_folder(night_id: str, unit: str) -> str:
    """The night folder name from a night id ``<UNIT>_<folder>``."""
    prefix = f"{unit}_"
    return night_id[len(prefix):] if night_id.startswith(prefix) else night_id


def options_from(settings: Settings, matcher: str = "own", distort_degree: int = 3) -> SolveOptions:
    return SolveOptions(pixscale_arcsec=settings.pixel_scale,
                        max_offset_arcmin=settings.scamp_position_maxerr_arcmin,
                        max_rotation_deg=settings.scamp_posangle_maxerr_deg,
                        min_stars=settings.astrometry_min_stars,
                        max_rms_arcsec=settings.astrometry_max_rms_arcsec,
                        distort_degree=distort_degree, matcher=matcher,
                        nthreads=max(1, (os.cpu_count() or 1) // max(1, settings.concurrency)))


def _pointing(header: fits.Header, path: Path) -> tuple[float, float]:
    try:
        ra, dec = float(header["RA"]), float(header["DEC"])
    except (KeyError, TypeError, ValueError) as exc:
        raise AstrometryFailure("the frame's header has no numeric RA/DEC pointing") from exc
    if not -90.0 <= dec <= 90.0:
        raise AstrometryFailure(f"the frame's header pointing DEC={dec} is not a declination")
    return ra % 360.0, dec


def process_frame(image: str | Path, weight: str | Path, mask: str | Path, obj: str, date_obs: str,
                  unit: str, night_id: str, paths: PathConfig, options: SolveOptions,
                  settings_record: dict | None = None) -> FrameResult:
    """Solve one calibrated frame and write its WCS into it (atomic replace).

    Returns a :class:`FrameResult`; every expected failure (bad input, no solution) comes
    back as ``ok=False`` with the reason instead of an exception.
    """
    image, weight, mask = Path(image), Path(weight), Path(mask)
    t_start = time.perf_counter()
    try:
        for p, what in ((image, "frame"), (weight, "weight map"), (mask, "mask")):
            if not p.exists():
                raise AstrometryFailure(f"{what} {p} does not exist")
        header = read_header(image)
        if int(header.get("NAXIS", 0)) != 2:
            raise AstrometryFailure(f"{image.name} is not a 2-D image")
        nx, ny = int(header["NAXIS1"]), int(header["NAXIS2"])
        pointing = _pointing(header, image)
        try:
            obstime = Time(date_obs or header.get("DATE-OBS"), format="isot", scale="utc")
        except (ValueError, TypeError) as exc:
            raise AstrometryFailure(f"unreadable DATE-OBS {date_obs!r}") from exc
        ref = ensure_reference(paths.path_refcat, paths.path_ref_scamp, obj, obstime)
        workdir = scratch_dir(paths.path_scratch, unit, night_folder(night_id, unit)) / "astrometry" / stem(image)
        sol = solve_frame(image, weight, mask, ref.path, workdir, pointing, (nx, ny), options,
                          ref_positions=(ref.ra, ref.dec, ref.mag))
        t0 = time.perf_counter()
        new = apply_solution(header, solution_header(sol.head, nx, ny, sol.quality))
        provenance.stamp(new, "astrometry", settings=settings_record or {})
        new["ASTTOOL1"] = (f"source-extractor {tool_version('source-extractor')}"[:50], "astrometry tool")
        new["ASTTOOL2"] = (f"scamp {tool_version('scamp')}"[:50], "astrometry tool")
        replace_primary_header(image, new)
        sol.timings["header"] = time.perf_counter() - t0
        sol.timings["total"] = time.perf_counter() - t_start
        rms = max(float(sol.quality["rms1"]), float(sol.quality["rms2"]))
        log.info("solved %s: %d stars, RMS %.3f\"/%.3f\", %.1f s", image.name, sol.quality["nstars"],
                 sol.quality["rms1"], sol.quality["rms2"], sol.timings["total"])
        return FrameResult(ok=True, nstars=int(sol.quality["nstars"]), rms_arcsec=rms, quality=sol.quality,
                           timings=sol.timings)
    except AstrometryFailure as exc:
        log.warning("not solved %s: %s", image.name, exc.reason)
        return FrameResult(ok=False, reason=exc.reason, timings={"total": time.perf_counter() - t_start})
    except BadInputError as exc:
        log.warning("bad input %s", exc)
        return FrameResult(ok=False, reason=f"bad input: {exc}", timings={"total": time.perf_counter() - t_start})


class AstrometryService(StageService):
    """``frame.calibrated`` -> WCS written into the frame -> ``frame.solved``."""

    name = "astrometry"
    consumes = ["frame.calibrated"]

    def settings_record(self) -> dict:
        s = self.settings
        o = options_from(s)
        return {"pixel_scale": s.pixel_scale, "maxerr": s.scamp_position_maxerr_arcmin,
                "posangle": s.scamp_posangle_maxerr_deg,
                "search_arcmin": max(o.max_offset_arcmin, o.coarse_offset_arcmin),
                "search_deg": max(o.max_rotation_deg, o.coarse_rotation_deg), "min_stars": s.astrometry_min_stars,
                "max_rms": s.astrometry_max_rms_arcsec, "degree": 3}

    async def handle(self, event: Event) -> list[Event]:
        if not isinstance(event, FrameCalibrated):
            return []
        if not event.ok:  # a planned frame calib could not reduce: forward so its visit does not wait
            return [FrameSolved(night_id=event.night_id, unit=event.unit, lane=event.lane, path=event.path,
                                weight_path=event.weight_path, mask_path=event.mask_path, object=event.object,
                                filter=event.filter, exptime=event.exptime, date_obs=event.date_obs,
                                visit=event.visit, ok=False, reason=f"calibration failed: {event.reason}"[:2000])]
        with self.step("solve"):
            result = await asyncio.to_thread(
                process_frame, event.path, event.weight_path, event.mask_path, event.object, event.date_obs,
                event.unit, event.night_id, self.paths, options_from(self.settings), self.settings_record())
        return [FrameSolved(night_id=event.night_id, unit=event.unit, lane=event.lane, path=event.path,
                            weight_path=event.weight_path, mask_path=event.mask_path, object=event.object,
                            filter=event.filter, exptime=event.exptime, date_obs=event.date_obs,
                            visit=event.visit, ok=result.ok, reason=result.reason[:2000],
                            nstars=result.nstars, rms_arcsec=round(result.rms_arcsec, 4))]


def main() -> None:
    run_service(AstrometryService)


if __name__ == "__main__":
    main()
