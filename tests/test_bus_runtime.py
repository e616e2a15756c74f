"""The bus and the service runtime, with a real nats-server and real service processes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from gppy import bus
from gppy.config import Settings
from gppy.local import free_port
from gppy.messages import NightReady, StageFailed, parse

PROBE = Path(__file__).with_name("probe_service.py")


def start_probe(settings: Settings, out: Path, port: int = 0, **env) -> subprocess.Popen:
    full = dict(os.environ, GPPY_CONFIG=str(settings.config), GPPY_NATS_URL=settings.nats_url,
                GPPY_ACK_WAIT_S=str(settings.ack_wait_s), GPPY_HEARTBEAT_S=str(settings.heartbeat_s),
                GPPY_MAX_DELIVER=str(settings.max_deliver), GPPY_HTTP_PORT=str(port),
                PROBE_OUT=str(out), **{k: str(v) for k, v in env.items()})
    return subprocess.Popen([sys.executable, str(PROBE)], env=full, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def wait_until(cond, timeout=30.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def night(settings: Settings, i: int) -> NightReady:
    obs = settings.paths().path_obsdata
    d = obs / "7DT01" / f"2025-01-{i:02d}_gain2750"
    d.mkdir(parents=True, exist_ok=True)
    return NightReady(night_id=f"7DT01_{d.name}", unit="7DT01", night_dir=str(d))


async def publish_all(settings: Settings, events=(), raw: list[tuple[str, bytes]] = ()):
    nc = await bus.connect(settings, "test")
    js = nc.jetstream()
    await bus.ensure_stream(js, settings)
    for ev in events:
        await bus.publish(js, ev)
    for subject, data in raw:
        await js.publish(subject, data)
    await nc.drain()


async def stream_messages(settings: Settings, subject: str) -> list:
    nc = await bus.connect(settings, "test-read")
    js = nc.jetstream()
    out = []
    sub = await js.subscribe(subject, ordered_consumer=True)
    while True:
        try:
            msg = await sub.next_msg(timeout=1.0)
        except Exception:
            break
        out.append(msg)
    await nc.drain()
    return out


def records(out: Path, prefix: str) -> list[str]:
    return sorted(p.name for p in out.glob(f"{prefix}-*")) if out.exists() else []


def test_competing_replicas_consume_each_message_once(settings, tmp_path):
    out = tmp_path / "records"
    replicas = [start_probe(settings, out, PROBE_SLEEP=0.3) for _ in range(2)]
    try:
        events = [night(settings, i) for i in range(1, 11)]
        asyncio.run(publish_all(settings, events))
        wait_until(lambda: len(records(out, "done")) >= 10, 60, "10 messages handled")
        time.sleep(1.0)  # anything handled twice would show up now
        done = records(out, "done")
        nights = [name.split("-", 2)[2] for name in done]
        assert sorted(nights) == sorted(ev.night_id for ev in events)  # each exactly once
        pids = {name.split("-")[1] for name in done}
        assert pids == {str(p.pid) for p in replicas}  # the two replicas shared the work
        # handled messages were acknowledged: nothing pending on the consumer
        async def pending():
            nc = await bus.connect(settings, "t")
            info = await nc.jetstream().consumer_info(settings.stream, "probe-survey")
            await nc.drain()
            return info.num_pending, info.num_ack_pending
        assert asyncio.run(pending()) == (0, 0)
        # each handled message produced its output event once
        outs = asyncio.run(stream_messages(settings, "gppy.survey.night.done"))
        assert sorted(parse(m.data).night_id for m in outs) == sorted(ev.night_id for ev in events)
    finally:
        for p in replicas:
            p.terminate()
            p.wait(10)


def test_killed_replica_message_is_redelivered_to_the_other(settings, tmp_path):
    out = tmp_path / "records"
    a = start_probe(settings, out, PROBE_SLEEP=60)
    b = None
    try:
        ev = night(settings, 1)
        asyncio.run(publish_all(settings, [ev]))
        wait_until(lambda: records(out, f"start-{a.pid}"), 30, "replica A to start the message")
        b = start_probe(settings, out, PROBE_SLEEP=0)
        time.sleep(1.0)
        a.send_signal(signal.SIGKILL)
        a.wait(10)
        # A's heartbeats stop; after ack_wait the message goes to B
        wait_until(lambda: records(out, "done"), settings.ack_wait_s + 30, "redelivery to B")
        assert records(out, "done") == [f"done-{b.pid}-{ev.night_id}"]
    finally:
        for p in (a, b):
            if p and p.poll() is None:
                p.terminate()
                p.wait(10)


def test_long_job_is_not_redelivered_while_heartbeating(settings, tmp_path):
    out = tmp_path / "records"
    replicas = [start_probe(settings, out, PROBE_SLEEP=settings.ack_wait_s * 2.5) for _ in range(2)]
    try:
        ev = night(settings, 1)
        asyncio.run(publish_all(settings, [ev]))
        wait_until(lambda: records(out, "done"), settings.ack_wait_s * 5, "the long job")
        assert len(records(out, "start")) == 1  # in-progress heartbeats kept it with one replica
    finally:
        for p in replicas:
            p.terminate()
            p.wait(10)


def test_bad_messages_are_dead_lettered_with_reasons(settings, tmp_path):
    out = tmp_path / "records"
    port = free_port()
    probe = start_probe(settings, out, port=port)
    outside = tmp_path / "outside"
    outside.mkdir()
    link = settings.paths().path_obsdata / "7DT01" / "link-night"
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(outside)
    good = night(settings, 5)
    base = good.model_dump()
    cases = {
        "malformed JSON": b"{not json",
        "unknown schema_version 99": json.dumps({**base, "schema_version": 99}).encode(),
        "outside the configured data roots": json.dumps({**base, "night_dir": "/etc"}).encode(),
        "outside the configured data roots ": json.dumps({**base, "night_dir": str(link)}).encode(),
        "not absolute": json.dumps({**base, "night_dir": "../../etc"}).encode(),
        "exceeds the limit": json.dumps({**base, "targets": ["x" * 1000] * 950}).encode(),
    }
    try:
        asyncio.run(publish_all(settings, raw=[("gppy.survey.night.ready", d) for d in cases.values()]))
        asyncio.run(publish_all(settings, [good]))  # the service goes on after refusing
        wait_until(lambda: records(out, "done"), 30, "the valid message")
        wait_until(lambda: len(asyncio.run(stream_messages(settings, "gppy.dlq.probe"))) >= len(cases),
                   30, "dead letters")
        letters = [json.loads(m.data) for m in asyncio.run(stream_messages(settings, "gppy.dlq.probe"))]
        reasons = [d["reason"] for d in letters]
        for expected in cases:
            assert any(expected.strip() in r for r in reasons), (expected, reasons)
        assert records(out, "done") == [f"done-{probe.pid}-{good.night_id}"]
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        assert 'gppy_messages_total{outcome="refused",stage="probe"} 6.0' in metrics
    finally:
        probe.terminate()
        probe.wait(10)


def test_failing_handler_retried_then_dead_lettered_and_reported_once(settings, tmp_path):
    out = tmp_path / "records"
    probe = start_probe(settings, out, PROBE_FAIL=1)
    try:
        ev = night(settings, 2)
        asyncio.run(publish_all(settings, [ev]))
        wait_until(lambda: asyncio.run(stream_messages(settings, "gppy.dlq.probe")), 90, "dead letter")
        time.sleep(3.0)
        assert len(records(out, "start")) == settings.max_deliver
        letters = asyncio.run(stream_messages(settings, "gppy.dlq.probe"))
        assert len(letters) == 1 and "probe told to fail" in json.loads(letters[0].data)["reason"]
        failed = [parse(m.data) for m in asyncio.run(stream_messages(settings, "gppy.survey.stage.failed.*"))]
        assert len(failed) == 1 and isinstance(failed[0], StageFailed) and failed[0].stage == "probe"
    finally:
        probe.terminate()
        probe.wait(10)


def test_retried_publish_is_deduplicated(settings):
    ev = night(settings, 3)
    asyncio.run(publish_all(settings, [ev, ev, ev]))
    msgs = asyncio.run(stream_messages(settings, "gppy.survey.night.ready"))
    assert len(msgs) == 1


def test_sigterm_finishes_in_flight_work(settings, tmp_path):
    out = tmp_path / "records"
    probe = start_probe(settings, out, PROBE_SLEEP=2)
    ev = night(settings, 4)
    asyncio.run(publish_all(settings, [ev]))
    wait_until(lambda: records(out, "start"), 30, "start")
    probe.send_signal(signal.SIGTERM)
    assert probe.wait(30) == 0
    assert records(out, "done") == [f"done-{probe.pid}-{ev.night_id}"]


@pytest.mark.parametrize("stage", ["calib", "astrometry", "stack", "subtract", "phot", "watcher"])
def test_stage_services_start_and_answer_healthz(stage, settings, tmp_path):
    from gppy.local import stage_available

    assert stage_available(stage), f"gppy_{stage}.service is missing"
    port = free_port()
    env = dict(os.environ, GPPY_CONFIG=str(settings.config), GPPY_NATS_URL=settings.nats_url,
               GPPY_HTTP_PORT=str(port))
    proc = subprocess.Popen([sys.executable, "-m", f"gppy_{stage}"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: _ok(f"http://127.0.0.1:{port}/readyz"), 60, f"{stage} ready")
        assert httpx.get(f"http://127.0.0.1:{port}/healthz").json()["stage"] == stage
        status = httpx.get(f"http://127.0.0.1:{port}/status").json()
        assert status["connected"] is True

        async def consumers():
            nc = await bus.connect(settings, "t")
            names = [c.name async for c in _consumer_names(nc.jetstream(), settings.stream)]
            await nc.drain()
            return names
        names = asyncio.run(consumers())
        assert f"{stage}-survey" in names and f"{stage}-too" in names
    finally:
        proc.terminate()
        assert proc.wait(30) == 0


async def _consumer_names(js, stream):
    for info in await js.consumers_info(stream):
        yield info


def _ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_rerun_of_a_night_is_not_swallowed_by_deduplication(settings, tmp_path):
    """A new night-ready attempt is a new run: its events get new message ids."""
    out = tmp_path / "records"
    probe = start_probe(settings, out)
    try:
        first = night(settings, 6).model_copy(update={"attempt": 1})
        asyncio.run(publish_all(settings, [first]))
        wait_until(lambda: len(records(out, "start")) == 1, 30, "first run")
        again = first.model_copy(update={"attempt": 2})
        asyncio.run(publish_all(settings, [again]))
        wait_until(lambda: len(records(out, "start")) == 2, 30, "second run")
        time.sleep(1.0)
        outs = [parse(m.data) for m in asyncio.run(stream_messages(settings, "gppy.survey.night.done"))]
        assert sorted(o.run for o in outs) == [1, 2]
    finally:
        probe.terminate()
        probe.wait(10)


async def test_a_failure_in_another_stages_name_is_refused(settings):
    """A ``stage.failed`` whose subject names another stage than its body (a stage reporting
    on behalf of another, which NATS permissions stop when users are configured) is
    dead-lettered by the receiving runtime; a genuine one is handled."""
    from gppy.runtime import StageService

    class FailureReader(StageService):
        name = "failreader"
        consumes = ["stage.failed"]
        seen: list[str] = []

        async def handle(self, event):
            self.seen.append(f"{event.stage}: {event.reason}")
            return []

    genuine = StageFailed(night_id="7DT01_2025-01-15_gain2750", unit="7DT01", stage="astrometry", reason="genuine")
    spoof = genuine.model_copy(update={"stage": "calib", "reason": "spoofed"})
    assert genuine.subject() == "gppy.survey.stage.failed.astrometry"
    reader = FailureReader(settings)
    task = asyncio.create_task(reader.serve())
    try:
        await publish_all(settings, raw=[(genuine.subject(), spoof.to_bytes())], events=[genuine])
        deadline = time.monotonic() + 30
        letters: list = []
        while time.monotonic() < deadline and not (reader.seen and letters):
            await asyncio.sleep(0.2)
            letters = [json.loads(m.data) for m in await stream_messages(settings, "gppy.dlq.failreader")]
        assert reader.seen == ["astrometry: genuine"]
        assert len(letters) == 1 and "stage.failed of stage 'calib' published on" in letters[0]["reason"]
    finally:
        reader._stopping.set()
        await asyncio.wait_for(task, 30)
