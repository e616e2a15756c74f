"""Prometheus metrics of a stage replica and of the watcher, over HTTP, against the backlog the
test created on a real nats-server; and the example scrape config and alert rules in deploy/
name only metrics that exist."""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import httpx  # noqa: E402
import yaml  # noqa: E402
from conftest_ops import running_service  # noqa: E402
from conftest_watcher import UNIT, Publisher, SimNight, night_dir, running_watcher, wait_for, watcher_settings  # noqa: E402

from gppy.local import free_port  # noqa: E402
from gppy.messages import Event  # noqa: E402
from gppy.runtime import StageService  # noqa: E402
from gppy_watcher.service import adhoc_night_ready  # noqa: E402

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$")


def samples(text: str) -> dict[str, float]:
    """``name{labels}`` -> value of a Prometheus text exposition."""
    out = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m:
            out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


def families(text: str) -> set[str]:
    return {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}


class HeldStack(StageService):
    """Stands in for the stack stage: takes a frame and holds it until released."""

    name = "stack"
    consumes = ["frame.solved"]

    def __init__(self, settings, gate: asyncio.Event):
        super().__init__(settings)
        self.gate = gate
        self.presence_every_s = 0.2

    async def handle(self, event: Event) -> list[Event]:
        await self.gate.wait()
        return []


async def test_stage_and_watcher_metrics_follow_the_backlog(settings):
    s = watcher_settings(settings, http_port=free_port(), http_host="127.0.0.1")
    w = settings.model_copy(update={"http_port": free_port(), "http_host": "127.0.0.1", "concurrency": 1})
    ready = adhoc_night_ready(s, UNIT, night_dir(s, "2025-01-05_gain2750"))
    sim = SimNight.make(s, ready, {"A": [0, 1, 2, 3]})
    gate = asyncio.Event()
    stage = HeldStack(w, gate)
    async with running_watcher(s), running_service(stage), Publisher(s) as pub, \
            httpx.AsyncClient(timeout=10) as c:
        await pub(*[sim.solved(f) for f in sim.frames])

        async def stage_metrics():
            m = samples((await c.get(f"http://127.0.0.1:{w.http_port}/metrics")).text)
            ok = (m.get('gppy_queue_pending{lane="survey",stage="stack"}') == 3
                  and m.get('gppy_queue_ack_pending{lane="survey",stage="stack"}') == 1
                  and m.get('gppy_inflight{stage="stack"}') == 1)
            return m if ok else None

        await wait_for(stage_metrics, 30, "the stage's backlog metrics: 3 waiting, 1 in progress")

        async def watcher_metrics(pending, ack, workers):
            text = (await c.get(f"http://127.0.0.1:{s.http_port}/metrics")).text
            m = samples(text)
            ok = (m.get('gppy_stage_pending{stage="stack"}'), m.get('gppy_stage_ack_pending{stage="stack"}'),
                  m.get('gppy_stage_workers{stage="stack"}')) == (pending, ack, workers)
            return text if ok else None

        watcher_text = await wait_for(lambda: watcher_metrics(3, 1, 1), 30, "the watcher's view of the stack stage")
        gate.set()
        m = await wait_for(lambda: _handled(c, w.http_port, 4), 30, "four frames handled")
        assert m['gppy_handle_seconds_count{stage="stack"}'] == 4 and m['gppy_inflight{stage="stack"}'] == 0
        await wait_for(lambda: watcher_metrics(0, 0, 1), 30, "the backlog drained")
        stage_text = (await c.get(f"http://127.0.0.1:{w.http_port}/metrics")).text

    # every metric the example alert rules use is exported by a service or the watcher
    exported = families(stage_text) | families(watcher_text)
    rules = yaml.safe_load((DEPLOY / "prometheus-rules.yml").read_text())
    used = set()
    for group in rules["groups"]:
        for rule in group["rules"]:
            used |= set(re.findall(r"\bgppy_[a-z_]+", rule["expr"]))
    used = {re.sub(r"_(bucket|count|sum)$", "", u) if u.endswith(("_bucket", "_count", "_sum")) and
            re.sub(r"_(bucket|count|sum)$", "", u) in exported else u for u in used}
    used = {u[:-6] if u.endswith("_total") and u[:-6] in exported else u for u in used}
    assert used and used <= exported, used - exported
    cfg = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    assert all((DEPLOY / f).is_file() for f in cfg["rule_files"])


async def _handled(c, port, n):
    m = samples((await c.get(f"http://127.0.0.1:{port}/metrics")).text)
    return m if m.get('gppy_messages_total{outcome="ok",stage="stack"}') == n else None
