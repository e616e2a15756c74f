"""Structured logs: JSON lines with night, frame and stage, also written per unit and night
under ``path_log`` (v1's per-unit log folder), by a real service process."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from conftest_watcher import UNIT, Publisher, SimNight, dones, night_dir, wait_for  # noqa: E402

from gppy.logs import UnitLogHandler, frame_var, night_var, stage_var  # noqa: E402
from gppy.messages import NightPlan  # noqa: E402
from gppy_watcher.service import adhoc_night_ready  # noqa: E402


def test_unit_log_handler_writes_each_night_to_its_file(tmp_path):
    root = tmp_path / "log"
    logger = logging.getLogger("test.ops.unitlog")
    logger.propagate = False
    handler = UnitLogHandler(root)
    logger.addHandler(handler)
    tokens = [stage_var.set("phot"), night_var.set(""), frame_var.set("")]
    try:
        logger.warning("outside any night")
        night_var.set("7DT03_2025-01-02_gain2750")
        frame_var.set("/p/calib_a.fits")
        logger.warning("first %d", 1)
        frame_var.set("/p/calib_b.fits")
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("second")
        for bad in ("../../x_y", "7DT03_../../etc", "7DT03_.hidden", "nounderscore", "7DT/03_x"):
            night_var.set(bad)
            logger.warning("bad night id %s", bad)
    finally:
        logger.removeHandler(handler)
        for var, tok in zip((stage_var, night_var, frame_var), tokens, strict=True):
            var.reset(tok)
    files = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert files == [Path("log/7DT03/2025-01-02_gain2750.log")]
    lines = [json.loads(x) for x in (root / "7DT03" / "2025-01-02_gain2750.log").read_text().splitlines()]
    assert [(x["stage"], x["night"], x["frame"], x["msg"], x["level"]) for x in lines] == [
        ("phot", "7DT03_2025-01-02_gain2750", "/p/calib_a.fits", "first 1", "warning"),
        ("phot", "7DT03_2025-01-02_gain2750", "/p/calib_b.fits", "second", "error")]
    assert "ValueError: boom" in lines[1]["exc"]


async def test_a_service_process_logs_its_nights_under_path_log(settings, tmp_path):
    s = settings
    d = night_dir(s, "2025-01-09_gain2750")
    ready = adhoc_night_ready(s, UNIT, d)
    env = dict(os.environ, GPPY_CONFIG=str(s.config), GPPY_NATS_URL=s.nats_url, GPPY_UNITS=json.dumps([UNIT]),
               GPPY_LOG_JSON="true", GPPY_HTTP_PORT="0", GPPY_QUIET_PERIOD_S="1", GPPY_POLL_INTERVAL_S="0.3")
    out = tmp_path / "watcher.stderr"
    with open(out, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "gppy_watcher"], env=env, stdout=fh, stderr=subprocess.STDOUT)
    try:
        async with Publisher(s) as pub:
            await pub(ready)
            sim = SimNight.make(s, ready, {"A": [0]})
            await wait_for(lambda: _logged(out, "requested from outside the watcher"), 60, "the watcher to take it")
            await pub(NightPlan(night_id=ready.night_id, unit=UNIT, night_dir=str(d), frames=sim.plan().frames[:0]))
            await wait_for(lambda: dones(s, ready.night_id), 60, "the night to end")
    finally:
        proc.terminate()
        assert proc.wait(timeout=60) == 0
    container = [json.loads(x) for x in out.read_text().splitlines() if x.startswith("{")]
    assert container and all({"ts", "level", "stage", "night", "frame", "msg"} <= set(x) for x in container)
    unit_log = Path(s.paths().path_log) / UNIT / "2025-01-09_gain2750.log"
    lines = [json.loads(x) for x in unit_log.read_text().splitlines()]
    assert lines and all(x["night"] == ready.night_id and x["stage"] == "watcher" for x in lines)
    # the same lines as in the container log for this night
    assert [x["msg"] for x in lines] == [x["msg"] for x in container if x["night"] == ready.night_id]
    assert any("requested from outside the watcher" in x["msg"] for x in lines)


def _logged(path: Path, text: str) -> bool:
    return path.exists() and text in path.read_text()
