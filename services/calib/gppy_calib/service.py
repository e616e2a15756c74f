"""The calibration service: ``night.ready`` in; one ``night.plan`` then one
``frame.calibrated`` per science frame out.

The work is done by :class:`gppy_calib.night.NightCalibrator` in a worker thread
(``asyncio.to_thread``) so that the runtime's heartbeats continue. The plan is published as
soon as the masters are ready, then each frame's event as soon as its files are written, so
astrometry starts early; the same events are also returned to the runtime, whose publish
is de-duplicated by message id. A frame that fails during reduction gets a
``frame.calibrated`` with ``ok=False`` and the reason; astrometry and photometry forward it, so
its visit and the night's completion do not wait for it.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import ClassVar

from gppy.fitsio import BadInputError, is_complete_fits, read_header
from gppy.messages import Event, FrameCalibrated, NightPlan, NightReady, PlannedFrame
from gppy.naming import flag_of, weight_of
from gppy.runtime import StageService, disk_full_error, run_service
from gppy.xp import get_xp
from gppy_calib.night import Job, NightCalibrator, Products

log = logging.getLogger(__name__)


class CalibService(StageService):
    """Masters, science reduction, masks and weights for one night per message."""

    name: ClassVar[str] = "calib"
    consumes: ClassVar[list[str]] = ["night.ready"]

    def calibrator(self, unit: str) -> NightCalibrator:
        return NightCalibrator(self.settings, self.paths, unit, get_xp(self.settings.gpu))

    async def _emit(self, event: Event) -> None:
        if self.js is not None:
            await self.publish(event)

    async def handle(self, event: Event) -> list[Event]:
        if not isinstance(event, NightReady):
            raise BadInputError(getattr(event, "night_id", "?"), f"calib does not handle {event.kind}")
        cal = self.calibrator(event.unit)
        cal.run_id = event.msg_id().split(":", 1)[1][:16]
        with self.step("masters"):
            result = await asyncio.to_thread(cal.prepare, Path(event.night_dir), event.targets, event.filters)
        for path, reason in result.rejected.items():
            log.warning("rejected %s: %s", path, reason)
        for key, text in result.qc.items():
            log.info("QC %s: %s", key, text)
        plan = NightPlan(night_id=event.night_id, unit=event.unit, lane=event.lane, night_dir=event.night_dir,
                         frames=[self._planned(job) for job in result.jobs], rejected=result.rejected,
                         borrowed=result.borrowed)
        await self._emit(plan)
        outputs: list[Event] = [plan]
        for job in result.jobs:
            try:
                if self._reduced_already(job, cal.run_id):
                    # An earlier delivery of this message wrote it (and it was announced then);
                    # astrometry and photometry may have updated it in place since: keep it.
                    log.info("frame %s already reduced by this run: kept", job.calib_path)
                    products = Products(job.calib_path, weight_of(job.calib_path), flag_of(job.calib_path))
                else:
                    with self.step("reduce"):
                        products = await asyncio.to_thread(cal.reduce, job)
            except Exception as exc:
                if isinstance(exc, OSError) or disk_full_error(exc):
                    raise  # the machine, not the frame: the runtime retries the night (or waits for space)
                # reported down the chain (astrometry -> phot -> stack) so its visit never waits;
                # an unexpected error fails this frame only, not the rest of the night
                reason = exc.reason if isinstance(exc, BadInputError) else f"{exc.__class__.__name__}: {exc}"
                log.error("frame %s failed: %s", job.info.path, reason, exc_info=not isinstance(exc, BadInputError))
                out: Event = FrameCalibrated(
                    night_id=event.night_id, unit=event.unit, lane=event.lane, path=str(job.calib_path),
                    weight_path=str(weight_of(job.calib_path)), mask_path=str(flag_of(job.calib_path)),
                    raw_path=job.info.path, object=job.info.object, filter=job.info.filter,
                    exptime=job.info.exptime, date_obs=job.info.date_obs, visit=job.visit, ok=False,
                    reason=f"{job.info.path}: {reason}"[:2000])
            else:
                out = FrameCalibrated(night_id=event.night_id, unit=event.unit, lane=event.lane,
                                      path=str(products.image), weight_path=str(products.weight),
                                      mask_path=str(products.mask), raw_path=job.info.path,
                                      object=job.info.object, filter=job.info.filter,
                                      exptime=job.info.exptime, date_obs=job.info.date_obs, visit=job.visit)
            await self._emit(out)
            outputs.append(out)
        log.info("night %s: %d frames reduced, %d rejected, %d masters archived", event.night_id,
                 sum(isinstance(o, FrameCalibrated) and o.ok for o in outputs), len(result.rejected), len(result.masters))
        return outputs

    @staticmethod
    def _reduced_already(job: Job, run_id: str) -> bool:
        """True when the frame's products exist, complete, written for the message ``run_id``."""
        paths = (job.calib_path, weight_of(job.calib_path), flag_of(job.calib_path))
        if not all(is_complete_fits(p) for p in paths):
            return False
        try:
            return read_header(job.calib_path).get("CALRUNID") == run_id
        except BadInputError:
            return False

    @staticmethod
    def _planned(job: Job) -> PlannedFrame:
        f = job.info
        return PlannedFrame(raw_path=f.path, calib_path=str(job.calib_path), object=f.object, filter=f.filter,
                            exptime=f.exptime, date_obs=f.date_obs, visit=job.visit)


def main() -> None:
    run_service(CalibService)


if __name__ == "__main__":
    main()
