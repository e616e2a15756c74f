"""A message that kills its worker every time (a poison message: a crash, the OOM killer) is
given up after max_deliver deaths, reported (stage.failed + dead letter with the reason) and
not lost in silence; the service's other work goes on.

A minimal stage whose handler SIGKILLs its own process on one message runs under a supervisor
loop that restarts it at once (what ``restart: unless-stopped`` does); real nats-server.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from conftest_faults import save_row  # noqa: E402

from gppy import bus  # noqa: E402
from gppy.messages import NightReady  # noqa: E402

POISON = '''
import os, signal
from pathlib import Path
from gppy.runtime import StageService, run_service

class Poison(StageService):
    name = "poison"
    consumes = ["night.ready"]

    async def handle(self, event):
        if event.night_dir.endswith("poison"):
            os.kill(os.getpid(), signal.SIGKILL)
        Path(os.environ["POISON_OUT"], event.night_id).touch()
        return []

run_service(Poison)
'''


async def _publish(settings, *events):
    nc = await bus.connect(settings, "test")
    js = nc.jetstream()
    await bus.ensure_stream(js, settings)
    for ev in events:
        await bus.publish(js, ev)
    await nc.close()


async def _messages(settings, subject: str) -> list[dict]:
    nc = await bus.connect(settings, "test-read")
    js = nc.jetstream()
    out = []
    info = await js.stream_info(settings.stream)
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        try:
            m = await js.get_msg(settings.stream, seq)
        except Exception:
            continue
        if m.subject.endswith(subject):
            out.append(json.loads(m.data))
    await nc.close()
    return out


def test_a_message_that_kills_its_worker_every_time_is_given_up_and_reported(settings, tmp_path):
    script = tmp_path / "poison_service.py"
    script.write_text(POISON)
    out = tmp_path / "done"
    out.mkdir()
    obs = settings.paths().path_obsdata / "7DT01"
    bad = NightReady(night_id="7DT01_poison", unit="7DT01", night_dir=str(obs / "poison"))
    good = NightReady(night_id="7DT01_good", unit="7DT01", night_dir=str(obs / "good"))
    env = dict(os.environ, GPPY_CONFIG=str(settings.config), GPPY_NATS_URL=settings.nats_url,
               GPPY_ACK_WAIT_S=str(settings.ack_wait_s), GPPY_HEARTBEAT_S=str(settings.heartbeat_s),
               GPPY_MAX_DELIVER=str(settings.max_deliver), GPPY_HTTP_PORT="0", POISON_OUT=str(out))
    asyncio.run(_publish(settings, bad, good))
    deaths = 0
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:  # the supervisor restarts a dead worker at once
                assert proc.returncode == -9, proc.returncode
                deaths += 1
                proc = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
            if (out / good.night_id).exists() and asyncio.run(_messages(settings, "dlq.poison")):
                break
            time.sleep(0.2)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    t_end = time.time()
    letters = asyncio.run(_messages(settings, "dlq.poison"))
    failed = [m for m in asyncio.run(_messages(settings, "stage.failed.poison")) if m["stage"] == "poison"]
    assert deaths == settings.max_deliver, deaths
    assert len(letters) == 1 and "died each time" in letters[0]["reason"], letters
    assert letters[0]["delivered"] == settings.max_deliver + 1
    assert len(failed) == 1 and failed[0]["item_path"] == bad.night_dir and "died" in failed[0]["reason"]
    assert (out / good.night_id).exists() and not (out / bad.night_id).exists()
    assert Path(bad.night_dir).parent == obs
    save_row({"scenario": "a message that kills its worker every time (probe stage)",
              "faults": {"poison-message deaths": deaths}, "bad_inputs": 1, "frames": None, "frames_lost": 0,
              "duplicates": 0, "duplicate_events": None, "half_written": None, "stale_parts": None,
              "recover_median_s": round(t_end - t0, 1), "recover_max_s": round(t_end - t0, 1), "night_s": None,
              "state": "given up, reported", "slack_failure_lines": None, "raw_changed": None})
