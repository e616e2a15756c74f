"""NATS users and subject permissions (deploy/nats/users.conf) on a real nats-server started by
the deployment's entry point (deploy/nats/entrypoint.sh), with per-service password files.

Every service may publish its own events and nothing else; it may use its own consumers and
key-value keys only; it may not purge the stream, delete messages or change the stream. The
deployment configs parse, compose gives each stage its own user (and, with
deploy/nats/compose.users.yaml, its own password and not the operator's).
A whole night processed with these users is in test_badinput_night.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nats
import pytest
import yaml
from nats.js import api

sys.path.insert(0, str(Path(__file__).parent))

from conftest_faults import OPERATOR, REPO, SERVICES, SecureNats  # noqa: E402

from gppy import bus  # noqa: E402
from gppy.config import Settings  # noqa: E402
from gppy.local import free_port, nats_server_binary  # noqa: E402
from gppy.messages import (  # noqa: E402
    DifferenceDone,
    FrameCalibrated,
    FrameSolved,
    NightDone,
    NightPlan,
    NightReady,
    PhotometryDone,
    StackDone,
    StageFailed,
)

N = "7DT01_2025-01-15_gain2750"
D = "/data/obsdata/7DT01/2025-01-15_gain2750"
P = "/data/processed/T1/7DT01/r/calib_7DT01_T1_20250116_010000_r_100.fits"
EVENTS = {
    "night.ready": NightReady(night_id=N, unit="7DT01", night_dir=D),
    "night.plan": NightPlan(night_id=N, unit="7DT01", night_dir=D, frames=[]),
    "frame.calibrated": FrameCalibrated(night_id=N, unit="7DT01", path=P, weight_path=P, mask_path=P, raw_path=P,
                                        object="T1", filter="r", exptime=100, date_obs="2025-01-16T01:00:00",
                                        visit="v"),
    "frame.solved": FrameSolved(night_id=N, unit="7DT01", path=P, weight_path=P, mask_path=P, object="T1",
                                filter="r", exptime=100, date_obs="2025-01-16T01:00:00", visit="v"),
    "phot.done": PhotometryDone(night_id=N, unit="7DT01", image_path=P, image_kind="single"),
    "stack.done": StackDone(night_id=N, unit="7DT01", path=P, weight_path=P, mask_path=P, object="T1", filter="r",
                            visit="v", input_paths=[P]),
    "diff.done": DifferenceDone(night_id=N, unit="7DT01", science_path=P, object="T1", filter="r"),
    "night.done": NightDone(night_id=N, unit="7DT01", night_dir=D, status="done"),
}
OWN = {"watcher": {"night.ready", "night.done"}, "calib": {"night.plan", "frame.calibrated"},
       "astrometry": {"frame.solved"}, "phot": {"phot.done"}, "stack": {"stack.done"},
       "subtract": {"diff.done"}}
CONSUMES = {"calib": ["night.ready"], "astrometry": ["frame.calibrated"], "phot": ["frame.solved"],
            "stack": ["night.plan"], "subtract": ["phot.done"], "watcher": ["night.plan"]}


@pytest.fixture(scope="module")
def secure_nats(tmp_path_factory):
    work = tmp_path_factory.mktemp("secure-nats")
    server = SecureNats(work)
    port = free_port()
    proc = server.start(port, work / "store")
    yield server, f"nats://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=20)


def settings_for(server: SecureNats, url: str, user: str) -> Settings:
    return Settings(nats_url=url, nats_user=user, nats_password_file=server.password_file(user), log_json=False)


async def connect(server, url, user, errors=None):
    async def on_error(exc):
        if errors is not None:
            errors.append(str(exc))
    s = settings_for(server, url, user)
    return await nats.connect(url, user=user, password=s.secret("nats_password"), name=f"test-{user}",
                              error_cb=on_error, allow_reconnect=False, connect_timeout=5)


async def refused(coro, errors: list[str] | None = None) -> bool:
    """True when the operation fails; a permissions violation reported to the connection's
    error callback (``errors``) counts at once (the request itself would only time out)."""
    n = len(errors) if errors is not None else 0
    task = asyncio.ensure_future(coro)
    while not task.done():
        if errors is not None and any("permissions violation" in e.lower() for e in errors[n:]):
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            return True
        await asyncio.sleep(0.02)
    return task.exception() is not None


def test_deployment_configs_parse(tmp_path):
    env = dict(os.environ, NATS_USER=OPERATOR, NATS_PASSWORD="x", NATS_SERVER_NAME="t", NATS_MAX_FILE_STORE="1GB",
               NATS_ROUTES="[]", **{f"NATS_PASSWORD_{s.upper()}": s for s in SERVICES})
    for conf in ("nats.conf", "cluster.conf"):
        out = subprocess.run([nats_server_binary(), "-t", "-c", str(REPO / "deploy" / "nats" / conf)], env=env,
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0 and "is valid" in out.stdout + out.stderr, (conf, out.stdout, out.stderr)


def test_each_user_logs_in_with_its_own_password_only(secure_nats):
    server, url = secure_nats

    async def main():
        for user in [OPERATOR, *SERVICES]:
            nc = await connect(server, url, user)
            assert nc.is_connected
            await nc.close()
            other = "calib" if user != "calib" else "phot"
            with pytest.raises(Exception):  # noqa: B017 - any refusal (authorization violation)
                await nats.connect(url, user=user, password=server.password(other), allow_reconnect=False,
                                   connect_timeout=5, max_reconnect_attempts=0)
        with pytest.raises(Exception):  # noqa: B017
            await nats.connect(url, allow_reconnect=False, connect_timeout=5, max_reconnect_attempts=0)
    asyncio.run(main())


def test_a_stage_publishes_only_its_own_events(secure_nats):
    server, url = secure_nats

    async def main():
        op = await connect(server, url, OPERATOR)
        ojs = op.jetstream()
        await bus.ensure_stream(ojs, settings_for(server, url, OPERATOR))
        before = (await ojs.stream_info("GPPY")).state.messages
        accepted = 0
        for user in SERVICES:
            errors: list[str] = []
            nc = await connect(server, url, user, errors)
            js = nc.jetstream(timeout=3.0)
            for kind, ev in EVENTS.items():
                ev = ev.model_copy(update={"unit": f"U{user}"})
                ok = not await refused(js.publish(ev.subject(), ev.to_bytes()), errors)
                assert ok == (kind in OWN[user]), (user, kind, ok)
                accepted += ok
            failed = StageFailed(night_id=N, unit="7DT01", stage=user, reason="test")
            assert not await refused(js.publish(failed.subject(), failed.to_bytes()), errors)
            assert not await refused(js.publish(f"gppy.dlq.{user}", b"{}"), errors)
            other = "calib" if user != "calib" else "phot"
            assert await refused(js.publish(f"gppy.dlq.{other}", b"{}"), errors)
            # a failure in another stage's name: refused on that stage's subject, and (below, in
            # test_runtime_refuses_a_failure_in_another_stages_name) refused by the runtime on
            # one's own subject
            spoof = StageFailed(night_id=N, unit="7DT01", stage=other, reason="spoofed")
            assert await refused(js.publish(spoof.subject(), spoof.to_bytes()), errors)
            assert any("permissions violation" in e.lower() for e in errors), errors
            await nc.close()
        after = (await ojs.stream_info("GPPY")).state.messages
        assert after - before == accepted + 2 * len(SERVICES)
        await op.close()
    asyncio.run(main())


def test_a_stage_uses_only_its_own_consumers_and_cannot_damage_the_stream(secure_nats):
    server, url = secure_nats

    async def main():
        for user in SERVICES:
            errors: list[str] = []
            nc = await connect(server, url, user, errors)
            js = nc.jetstream(timeout=3.0)
            s = settings_for(server, url, user)
            await bus.ensure_stream(js, s)  # the same configuration: nothing to change, allowed
            for lane in bus.LANES:
                sub = await bus.ensure_consumer(js, s, user, lane, CONSUMES[user])
                with contextlib.suppress(TimeoutError, nats.errors.TimeoutError):
                    for msg in await sub.fetch(1, timeout=0.3):
                        await msg.ack_sync()  # acknowledging its own messages is allowed
            assert not errors, errors
            other = "calib" if user != "calib" else "phot"
            if user == "watcher":  # reads every stage's consumer (its stall check, the API's queues)
                await refused(js.consumer_info("GPPY", f"{other}-too"), errors)  # may not exist yet
                assert not errors, errors
            else:
                assert await refused(js.consumer_info("GPPY", f"{other}-too"), errors)
            cfg = api.ConsumerConfig(durable_name=f"{other}-spy", ack_policy=api.AckPolicy.EXPLICIT)
            assert await refused(js.add_consumer("GPPY", cfg), errors)
            assert await refused(js.add_consumer("GPPY", api.ConsumerConfig()), errors)  # an ephemeral reader
            assert await refused(js.purge_stream("GPPY"), errors)
            assert await refused(js.delete_msg("GPPY", 1), errors)
            assert await refused(js.delete_stream("GPPY"), errors)
            assert await refused(js.delete_consumer("GPPY", f"{user}-too"), errors)
            stream = api.StreamConfig(name="GPPY", subjects=["gppy.>"], max_age=1.0)
            if user != "watcher":
                assert await refused(js.update_stream(stream), errors)
            await nc.close()
    asyncio.run(main())


def test_key_value_buckets_are_per_service(secure_nats):
    server, url = secure_nats

    async def main():
        op = await connect(server, url, OPERATOR)
        ojs = op.jetstream()
        for b in ("gppy-services", "GPPY_nights", "gppy-stack-visits"):
            await bus.kv_bucket(ojs, b)
        for user in SERVICES:
            errors: list[str] = []
            nc = await connect(server, url, user, errors)
            js = nc.jetstream(timeout=3.0)
            presence = await js.key_value("gppy-services")
            await presence.put(f"{user}.host-1", b"{}")
            other = "calib" if user != "calib" else "phot"
            assert await refused(presence.put(f"{other}.host-1", b"{}"), errors)
            ledger_ok = not await refused(js.key_value("GPPY_nights"), errors)
            assert ledger_ok == (user == "watcher"), user
            if user == "watcher":
                ledger = await js.key_value("GPPY_nights")
                await ledger.put("n.x", b"{}")
                assert (await ledger.get("n.x")).value == b"{}"
                assert "n.x" in await ledger.keys()
            visits_ok = not await refused(js.key_value("gppy-stack-visits"), errors)
            assert visits_ok == (user == "stack"), user
            await nc.close()
        await op.close()
    asyncio.run(main())


def test_entrypoint_falls_back_to_the_shared_password_without_a_service_secret(tmp_path):
    server = SecureNats(tmp_path)
    (server.secrets / "nats_password_phot").unlink()
    port = free_port()
    proc = server.start(port, tmp_path / "store")
    url = f"nats://127.0.0.1:{port}"
    try:
        async def main():
            nc = await nats.connect(url, user="phot", password=server.password(OPERATOR), allow_reconnect=False)
            await nc.close()
            nc = await connect(server, url, "calib")  # the others keep their own
            await nc.close()
        asyncio.run(main())
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    assert shutil.which("bash")


def test_compose_gives_each_stage_its_own_user_and_password():
    base = yaml.safe_load((REPO / "compose.yaml").read_text())
    for svc in SERVICES:
        env = base["services"][svc]["environment"]
        assert env["GPPY_NATS_USER"] == svc, svc
        assert env["GPPY_NATS_PASSWORD_FILE"].startswith("/run/secrets/")
        assert not any("PASSWORD" in k and not k.endswith("_FILE") for k in env), env  # no secret in env
    assert base["services"]["nats"]["environment"]["GPPY_NATS_USER"] != "calib"
    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!override", lambda loader, node: loader.construct_sequence(node))
    users = yaml.load((REPO / "deploy" / "nats" / "compose.users.yaml").read_text(), Loader=Loader)  # noqa: S506
    for svc in SERVICES:
        s = users["services"][svc]
        assert s["environment"]["GPPY_NATS_PASSWORD_FILE"] == f"/run/secrets/nats_password_{svc}"
        assert "nats_password" not in list(s["secrets"]), s  # not the operator's password
        assert f"nats_password_{svc}" in list(s["secrets"])
    assert set(users["services"]["nats"]["secrets"]) == {"nats_password", *[f"nats_password_{s}" for s in SERVICES]}
