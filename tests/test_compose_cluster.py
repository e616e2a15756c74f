"""Several hosts: a two-node NATS cluster with JetStream (deploy/compose.cluster.yaml, the
configuration each host of a multi-host deployment runs) and a stage connected to the other
node than the publisher. A night-ready published through node A is taken by calib connected
to node B, and calib's answer is read back through node A.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from conftest_compose import (  # noqa: E402
    REPO,
    ComposeStack,
    build_images,
    chown_tree,
    make_data_root,
    remove_stale_projects,
    require_engine,
    stream_subjects,
    wait_for,
)

from gppy import bus, naming  # noqa: E402
from gppy.local import free_port  # noqa: E402
from gppy.messages import NightReady, parse  # noqa: E402

pytestmark = [pytest.mark.docker, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    require_engine()
    remove_stale_projects()
    build_images(["nats", "calib"])
    data = make_data_root()
    (data / "factory").mkdir()
    (data / "obsdata" / "7DT01").mkdir(parents=True)
    (data / "path.json").write_text('{"path_base": "%s"}' % (data / "factory"))
    chown_tree(data)
    b_port = free_port()
    stack = ComposeStack(data, files=[REPO / "deploy" / "compose.cluster.yaml"],
                         env_extra={"GPPY_NATS_B_PORT": str(b_port)})
    stack.b_port = b_port
    logs = tmp_path_factory.mktemp("compose-logs") / "cluster.log"
    try:
        stack.up("nats", "nats-b")
        stack.wait_healthy(["nats", "nats-b"], timeout=120)
        yield stack
    finally:
        stack.destroy(keep_logs=logs)
        shutil.rmtree(data.parent, ignore_errors=True)


def on_node_b(stack: ComposeStack) -> ComposeStack:
    return ComposeStack(stack.data_root, files=stack.files, env_extra=stack.env_extra, project=stack.project,
                        nats_port=stack.b_port, api_port=stack.api_port)


def test_two_node_cluster_carries_work_between_nodes(cluster):
    node_b = on_node_b(cluster)

    async def routes_and_stream(js, settings):
        await bus.ensure_stream(js, settings)
        return (await js.stream_info(settings.stream)).cluster

    # JetStream needs its meta leader (both nodes of a two-node cluster) before a stream exists.
    def stream_ready():
        try:
            return cluster.nats(routes_and_stream)
        except Exception:
            return None

    info = wait_for(stream_ready, 90, "the JetStream cluster to accept the stream", interval=2.0)
    assert info is not None and info.name == "gppy"

    async def seen_from_b(js, settings):
        return (await js.stream_info(settings.stream)).config.name

    assert node_b.nats(seen_from_b) == "GPPY", "node B does not see the stream created through node A"

    # calib connected to node B
    cluster.up("calib", no_deps=True, env={"GPPY_NATS_URL": "nats://nats-b:4222"})
    cluster.wait_healthy(["calib"], timeout=180)
    wait_for(lambda: cluster.exec("calib", "gppy-healthcheck", "http://127.0.0.1:8080/readyz",
                                  check=False).returncode == 0, 120, "calib (on node B) ready")
    empty = cluster.data_root / "obsdata" / "7DT01" / "2025-03-01_gain2750"
    empty.mkdir()
    chown_tree(empty)
    ev = NightReady(night_id=naming.night_id("7DT01", empty), unit="7DT01", night_dir=str(empty))

    async def publish(js, settings):
        await bus.publish(js, ev, settings.subject_prefix)

    cluster.nats(publish)  # through node A

    async def answers(js, settings):
        out = []
        for m in await stream_subjects(js, settings, f"{settings.subject_prefix}.*.>"):
            if ".dlq." not in m.subject:
                e = parse(m.data)
                if e.night_id == ev.night_id and e.kind != "night.ready":
                    out.append(e)
        return out

    got = wait_for(lambda: cluster.nats(answers), 180, "calib's answer, read through node A", interval=2.0)
    assert {e.kind for e in got} <= {"stage.failed", "night.plan"}
    assert all(getattr(e, "stage", "calib") == "calib" for e in got)

    async def calib_consumer(js, settings):
        return await js.consumer_info(settings.stream, "calib-survey")

    info = cluster.nats(calib_consumer)
    assert info.delivered.consumer_seq == 1 and info.num_ack_pending == 0 and info.num_pending == 0
