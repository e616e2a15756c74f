"""A stand-in stage for the compose plumbing test, run inside a container built from the base image.

It is the real service runtime (``gppy.runtime.StageService``: durable pull consumers, ack
after the outputs, graceful SIGTERM) with a trivial handler: for each ``night.ready`` it
writes ``start-<night>-<host>-<ns>`` in ``PROBE_OUT``, waits ``PROBE_SLEEP`` seconds,
writes ``done-<night>-<host>-<ns>`` and publishes ``night.done``. The container's host name
tells which replica (and which image generation) handled a message. No pytest imports: this
file is executed by the image's Python as ``python /opt/probe/probe.py``.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from pathlib import Path

from gppy.messages import Event, NightDone
from gppy.runtime import StageService, run_service


class ComposeProbe(StageService):
    name = "cprobe"
    consumes = ["night.ready"]

    async def handle(self, event: Event) -> list[Event]:
        out = Path(os.environ["PROBE_OUT"])
        host = socket.gethostname()
        (out / f"start-{event.night_id}-{host}-{time.time_ns()}").touch()
        await asyncio.sleep(float(os.environ.get("PROBE_SLEEP", "0")))
        (out / f"done-{event.night_id}-{host}-{time.time_ns()}").touch()
        return [NightDone(night_id=event.night_id, unit=event.unit, lane=event.lane,
                          night_dir=event.night_dir, status="done")]


if __name__ == "__main__":
    run_service(ComposeProbe)
