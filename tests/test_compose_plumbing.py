"""The deployment mechanics with a real Docker engine and the real compose.yaml.

NATS (JetStream, authentication, the persistent volume) comes from compose.yaml as it is; the
worker is a stand-in stage (tests/conftest_compose_probe.py: the real service runtime with a
handler that only records which container handled which message) declared with
``extends: compose.yaml/calib``, so it runs exactly like a stage: non-root, read-only root,
tmpfs /tmp, the data root bind-mounted at the same path, the password as a compose secret,
the health check. On it: two replicas share the work; the image is replaced with
``up -d --no-deps --build`` while messages are in flight and none is lost or handled twice;
``down`` + ``up`` keeps the stream, the consumers and a key-value bucket.
The same sequence with the real stages is in test_compose_pipeline.py.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
from pathlib import Path

import nats
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from conftest_compose import (  # noqa: E402
    GID,
    REPO,
    TAG,
    UID,
    ComposeStack,
    build_images,
    chown_tree,
    make_data_root,
    remove_stale_projects,
    require_engine,
    stream_subjects,
    wait_for,
)

from gppy import bus  # noqa: E402
from gppy.messages import NightReady  # noqa: E402

pytestmark = [pytest.mark.docker, pytest.mark.timeout(900)]

N_MESSAGES = 16
PROBE_SLEEP_S = 4.0

OVERRIDE = """
services:
  cprobe:
    extends:
      file: {compose}
      service: calib
    image: gppy-cprobe:{tag}-${{PROBE_REV:-1}}
    build:
      context: {repo}
      dockerfile: !reset null
      dockerfile_inline: |
        ARG BASE_IMAGE
        FROM $${{BASE_IMAGE}}
        ARG PROBE_REV
        LABEL org.gppy.probe-revision=$${{PROBE_REV}}
      args:
        PROBE_REV: "${{PROBE_REV:-1}}"
    command: ["python", "/opt/probe/probe.py"]
    environment:
      PROBE_OUT: {out}
      PROBE_SLEEP: "{sleep}"
      # the probe is no pipeline stage: it connects as the operator user, not with calib's
      # per-service subject permissions (deploy/nats/users.conf)
      GPPY_NATS_USER: ${{GPPY_NATS_USER:-gppy}}
    volumes:
      - type: bind
        source: {probe}
        target: /opt/probe/probe.py
        read_only: true
"""


@pytest.fixture(scope="module")
def probe_stack(tmp_path_factory):
    require_engine()
    remove_stale_projects()
    seconds = build_images(["nats"])
    print(f"base image build: {seconds:.1f} s")
    data = make_data_root()
    (data / "factory").mkdir()
    (data / "obsdata" / "7DT01").mkdir(parents=True)
    out = data / "probe-out"
    out.mkdir()
    (data / "path.json").write_text(json.dumps({"path_base": str(data / "factory")}))
    chown_tree(data)
    override = data.parent / "compose.probe.yaml"
    override.write_text(OVERRIDE.format(compose=REPO / "compose.yaml", repo=REPO, tag=TAG, out=out,
                                        sleep=PROBE_SLEEP_S, probe=REPO / "tests" / "conftest_compose_probe.py"))
    stack = ComposeStack(data, files=[override], env_extra={"PROBE_REV": "1"})
    logs = tmp_path_factory.mktemp("compose-logs") / "probe-stack.log"
    try:
        stack.up("nats")
        stack.wait_healthy(["nats"], timeout=120)
        yield stack
    finally:
        stack.destroy(keep_logs=logs)
        print(f"compose logs: {logs}")
        shutil.rmtree(data.parent, ignore_errors=True)


def nights(stack: ComposeStack, first: int, n: int) -> list[NightReady]:
    obs = stack.data_root / "obsdata" / "7DT01"
    events = []
    for i in range(first, first + n):
        d = obs / f"2025-02-{i:02d}_gain2750"
        d.mkdir(exist_ok=True)
        events.append(NightReady(night_id=f"7DT01_{d.name}", unit="7DT01", night_dir=str(d)))
    return events


def publish(stack: ComposeStack, events: list[NightReady]) -> None:
    async def go(js, settings):
        await bus.ensure_stream(js, settings)
        for ev in events:
            await bus.publish(js, ev, settings.subject_prefix)

    stack.nats(go)


def consumer(stack: ComposeStack, durable: str = "cprobe-survey"):
    async def go(js, settings):
        return await js.consumer_info(settings.stream, durable)

    return stack.nats(go)


def records(stack: ComposeStack, kind: str) -> list[tuple[str, str]]:
    """(night_id, host) of every start/done record the probes wrote."""
    out = []
    for p in (stack.data_root / "probe-out").glob(f"{kind}-*"):
        rest = p.name[len(kind) + 1:]
        night_id, host, _ns = rest.rsplit("-", 2)
        out.append((night_id, host))
    return out


def hostnames(stack: ComposeStack, service: str) -> set[str]:
    return {stack.inspect(cid)["Config"]["Hostname"] for cid in stack.container_ids(service)}


def test_nats_refuses_unauthenticated_clients(probe_stack):
    async def anonymous():
        nc = await nats.connect(f"nats://127.0.0.1:{probe_stack.nats_port}", connect_timeout=3,
                                allow_reconnect=False, max_reconnect_attempts=0)
        await nc.close()

    with pytest.raises(Exception, match="Authorization Violation"):
        asyncio.run(anonymous())

    async def wrong_password():
        nc = await nats.connect(f"nats://127.0.0.1:{probe_stack.nats_port}", user="gppy",
                                password="not-the-password", connect_timeout=3, allow_reconnect=False,
                                max_reconnect_attempts=0)
        await nc.close()

    with pytest.raises(Exception, match="Authorization Violation"):
        asyncio.run(wrong_password())

    async def jetstream(js, settings):
        return await js.account_info()

    assert probe_stack.nats(jetstream) is not None  # the right password: JetStream answers


def test_replicas_share_work_survive_an_image_swap_and_a_restart(probe_stack):
    stack = probe_stack
    stack.up("cprobe", scale={"cprobe": 2}, build=True, no_deps=True)
    stack.wait_healthy(["cprobe"], count={"cprobe": 2}, timeout=180)
    first_gen = hostnames(stack, "cprobe")
    assert len(first_gen) == 2

    batch = nights(stack, 1, N_MESSAGES)
    publish(stack, batch)
    # Both replicas busy at once: the work is shared.
    wait_for(lambda: consumer(stack).num_ack_pending >= 2, 60, "two messages in flight at once", 0.2)

    # Replace the image while messages are in flight: new tag content (label), same service.
    stack.up("cprobe", scale={"cprobe": 2}, build=True, no_deps=True, env={"PROBE_REV": "2"})
    stack.wait_healthy(["cprobe"], count={"cprobe": 2}, timeout=180)
    second_gen = hostnames(stack, "cprobe")
    assert not (second_gen & first_gen), "the swap did not replace the containers"
    for cid in stack.container_ids("cprobe"):
        labels = stack.inspect(stack.inspect(cid)["Image"])["Config"]["Labels"]
        assert labels["org.gppy.probe-revision"] == "2"

    def finished():
        info = consumer(stack)
        return info.num_pending == 0 and info.num_ack_pending == 0 and len(records(stack, "done")) >= N_MESSAGES

    wait_for(finished, 240, f"all {N_MESSAGES} messages handled")

    starts, dones = records(stack, "start"), records(stack, "done")
    ids = sorted(ev.night_id for ev in batch)
    assert sorted(n for n, _ in starts) == ids, "a message was started twice or never"
    assert sorted(n for n, _ in dones) == ids, "a message was finished twice or never"
    hosts = {h for _, h in dones}
    assert len(hosts & first_gen) == 2, f"both first replicas worked: {hosts}, first generation {first_gen}"
    assert hosts & second_gen, f"the new image took over the rest of the work: {hosts}, new {second_gen}"
    info = consumer(stack)
    assert info.delivered.consumer_seq == N_MESSAGES, "a message was delivered more than once"
    assert info.num_redelivered == 0
    assert info.ack_floor.consumer_seq == N_MESSAGES

    async def done_events(js, settings):
        return [json.loads(m.data)["night_id"] for m in await stream_subjects(js, settings, "gppy.*.night.done")]

    assert sorted(stack.nats(done_events)) == ids, "night.done published once per message"
    # Files written by the containers belong to the pipeline user.
    for p in (stack.data_root / "probe-out").iterdir():
        st = p.stat()
        assert (st.st_uid, st.st_gid) == (UID, GID), p

    # ---- down + up: the stream, the consumer and a key-value bucket survive (named volume).
    async def before(js, settings):
        kv = await bus.kv_bucket(js, "gppy-compose-test")
        await kv.put("marker", b"kept across down/up")
        return (await js.stream_info(settings.stream)).state

    state = stack.nats(before)
    stack.down()
    assert stack.ps(all_=True) == []
    stack.up("nats", "cprobe", scale={"cprobe": 2}, env={"PROBE_REV": "2"})
    stack.wait_healthy(["nats", "cprobe"], count={"cprobe": 2}, timeout=180)
    for i in (1, 2):
        wait_for(lambda i=i: stack.exec("cprobe", "gppy-healthcheck", "http://127.0.0.1:8080/readyz",
                                         index=i, check=False).returncode == 0, 60, f"cprobe #{i} ready")

    async def after(js, settings):
        kv = await js.key_value("gppy-compose-test")
        return (await js.stream_info(settings.stream)).state, (await kv.get("marker")).value

    state2, marker = stack.nats(after)
    assert (state2.messages, state2.last_seq) == (state.messages, state.last_seq)
    assert marker == b"kept across down/up"
    info = consumer(stack)
    assert info.delivered.consumer_seq == N_MESSAGES and info.num_pending == 0
    # The restarted stack works and still handles each new message exactly once.
    extra = nights(stack, N_MESSAGES + 1, 2)
    publish(stack, extra)
    wait_for(lambda: len(records(stack, "done")) >= N_MESSAGES + 2 and consumer(stack).num_ack_pending == 0,
             120, "the two messages published after the restart")
    all_ids = sorted(ev.night_id for ev in batch + extra)
    assert sorted(n for n, _ in records(stack, "start")) == all_ids
    assert sorted(n for n, _ in records(stack, "done")) == all_ids
    assert consumer(stack).num_redelivered == 0
