"""Restarting the watcher (a real process, killed with SIGKILL, then stopped with SIGTERM) in
the middle of a night loses nothing and queues nothing twice."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))

from conftest_watcher import (  # noqa: E402
    UNIT,
    Publisher,
    SimNight,
    SlackStandIn,
    dones,
    ledger_record,
    night_dir,
    readies,
    wait_for,
    write_raw,
)

from gppy import naming  # noqa: E402
from gppy.local import free_port  # noqa: E402
from gppy.messages import NightPlan  # noqa: E402


class WatcherProcess:
    def __init__(self, settings, slack: SlackStandIn, log: Path):
        self.port = free_port()
        self.env = dict(os.environ, GPPY_CONFIG=str(settings.config), GPPY_NATS_URL=settings.nats_url,
                        GPPY_QUIET_PERIOD_S="1", GPPY_POLL_INTERVAL_S="0.3", GPPY_UNITS=json.dumps([UNIT]),
                        GPPY_LOG_JSON="false", GPPY_ACK_WAIT_S="5", GPPY_MAX_DELIVER="3",
                        GPPY_HTTP_PORT=str(self.port), GPPY_SLACK_TOKEN=slack.token,
                        GPPY_SLACK_BASE_URL=slack.base_url)
        self.log = log
        self.proc: subprocess.Popen | None = None

    async def start(self) -> None:
        with open(self.log, "a") as fh:
            self.proc = subprocess.Popen([sys.executable, "-m", "gppy_watcher"], env=self.env, stdout=fh,
                                         stderr=subprocess.STDOUT)
        await wait_for(self._ready, 60, "the watcher process to be ready")

    async def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"watcher exited with {self.proc.returncode}: {self.log.read_text()[-3000:]}")
        try:
            async with httpx.AsyncClient() as client:
                r = await client.get(f"http://127.0.0.1:{self.port}/readyz", timeout=1)
            return r.status_code == 200
        except httpx.HTTPError:
            return False

    async def nights(self) -> list[dict]:
        async with httpx.AsyncClient() as client:
            return (await client.get(f"http://127.0.0.1:{self.port}/nights", timeout=5)).json()

    def kill(self, sig=signal.SIGKILL) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=60)


async def test_restart_mid_night_loses_nothing_and_queues_nothing_twice(settings, tmp_path):
    slack = SlackStandIn().up()
    s = settings
    n1 = night_dir(s, "2025-01-10_gain2750")
    n2 = night_dir(s, "2025-01-11_gain2750")
    id1, id2 = naming.night_id(UNIT, n1), naming.night_id(UNIT, n2)
    watcher = WatcherProcess(s, slack, tmp_path / "watcher.log")
    try:
        await watcher.start()
        for i in range(4):
            write_raw(n1, i)
        ready1 = (await wait_for(lambda: readies(s, id1), 60, "night 1 to be queued"))[0]
        sim = SimNight.make(s, ready1, {"A": [0, 1, 2, 3]})
        events = sim.all_events()
        async with Publisher(s) as pub:
            await pub(*events[:7])  # the plan and two frames
            await wait_for(lambda: _progress(s, id1, "phot_single", 2), 60, "two frames to be followed")
            for i in range(2):  # night 2 is being copied when the watcher dies
                write_raw(n2, 10 + i)
            await wait_for(lambda: _state(s, id2, ("seen", "waiting")), 60, "night 2 to be seen")
            assert watcher.kill(signal.SIGKILL) == -signal.SIGKILL
            await pub(*events[7:-1])  # the stages go on while the watcher is down
            for i in range(2, 4):
                write_raw(n2, 10 + i)
            await watcher.start()
            ready2 = (await wait_for(lambda: readies(s, id2), 60, "night 2 to be queued"))[0]
            await pub(events[-1])
            done1 = await wait_for(lambda: dones(s, id1), 60, "night 1 to end")
            # a graceful stop while night 2 is being processed, then its plan arrives
            nights = {n["night_id"]: n for n in await watcher.nights()}
            assert nights[id1]["state"] == "done" and nights[id2]["state"] == "queued"
            assert watcher.kill(signal.SIGTERM) == 0
            await pub(NightPlan(night_id=id2, unit=UNIT, night_dir=str(n2), frames=[]))
            await watcher.start()
            done2 = await wait_for(lambda: dones(s, id2), 60, "night 2 to end")
            await wait_for(lambda: sum("Processing complete" in t for t in slack.texts()) >= 2, 30,
                           "the finish messages")
            # an operator re-queues night 2 over the HTTP API: a new run, attempt 2
            async with httpx.AsyncClient() as client:
                r = await client.post(f"http://127.0.0.1:{watcher.port}/nights/{id2}/requeue",
                                      json={"filters": ["m425"]}, timeout=10)
            assert r.status_code == 200 and r.json()["state"] == "queued" and r.json()["run"] == 2
            requeued = await wait_for(lambda: _n_readies(s, id2, 2), 30, "the re-queued night-ready event")
    finally:
        if watcher.proc and watcher.proc.poll() is None:
            watcher.kill(signal.SIGTERM)
        slack.down()
    assert [r.attempt for r in await readies(s, id1)] == [1]
    assert [(r.attempt, r.filters) for r in requeued] == [(1, None), (2, ["m425"])]
    assert [d.status for d in done1] == ["done"] and [d.status for d in done2] == ["done"]
    rec2 = await ledger_record(s, id2)
    total = sum(p.stat().st_size for p in n2.iterdir())
    assert ready2.night_dir == str(n2) and rec2["snapshot"] == {"size": total, "count": 4, "fits": 4}
    summary = json.loads(Path(done1[0].summary_path).read_text())
    assert summary["frames"]["planned"] == 4 and summary["frames"]["photometry_ok"] == 4
    assert summary["stages"]["stack"]["done"] == 1 and summary["stages"]["phot_difference"]["done"] == 1
    assert summary["failures"] == [] and summary["outstanding_at_end"] == []
    rows = list(csv.reader(s.paths().unit_log(UNIT).open()))
    assert [r[0] for r in rows] == ["date", str(n1), str(n2)]
    texts = slack.texts()
    assert sum(t.startswith("[gpPy/7DT] Start processing 7DT01 2025-01-10_gain2750") for t in texts) == 1
    assert sum("Processing complete 7DT01 2025-01-10_gain2750: 4/4 frames" in t for t in texts) == 1


async def _progress(s, nid, stage, n):
    rec = await ledger_record(s, nid)
    return rec and rec["progress"].get(stage, {}).get("done") == n


async def _n_readies(s, nid, n):
    out = await readies(s, nid)
    return out if len(out) >= n else None


async def _state(s, nid, states):
    rec = await ledger_record(s, nid)
    return rec and rec["state"] in states
