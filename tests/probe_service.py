"""A minimal stage used by the runtime tests: records each message it handles in a folder.

Run as ``python tests/probe_service.py``; configured by GPPY_* variables plus
PROBE_OUT (folder for records), PROBE_SLEEP (seconds per message), PROBE_FAIL (always raise).
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from gppy.messages import Event, NightDone
from gppy.runtime import StageService, run_service


class ProbeService(StageService):
    name = "probe"
    consumes = ["night.ready"]

    async def handle(self, event: Event) -> list[Event]:
        out = Path(os.environ["PROBE_OUT"])
        out.mkdir(parents=True, exist_ok=True)
        pid = os.getpid()
        (out / f"start-{pid}-{event.night_id}-{time.time_ns()}").touch()
        await asyncio.sleep(float(os.environ.get("PROBE_SLEEP", "0")))
        if os.environ.get("PROBE_FAIL"):
            raise RuntimeError("probe told to fail")
        (out / f"done-{pid}-{event.night_id}").touch()
        return [NightDone(night_id=event.night_id, unit=event.unit, night_dir=event.night_dir, status="done")]


if __name__ == "__main__":
    run_service(ProbeService)
