"""Faults on the compose stack: stage containers killed mid-job and NATS restarted, in one night.

The same small simulated night as the local fault tests (tests/test_faults_*.py: 6 science
frames of 1024x768 in 2 visits) runs on the real compose.yaml with the real stage images
(the ones the other compose tests build; :func:`conftest_compose.ensure_images` builds them
only when they do not carry this tree's revision). An override file only shortens the
acknowledgement wait and the watcher's quiet period (``conftest_faults.FAULT_ENV``) and
points the watcher's Slack client at a stand-in on the host.

While the night runs, each stage container is killed with SIGKILL while it holds a message
(seen on its ``/status``), two ways:

* ``docker kill`` (what an operator or an orchestrator does): Docker then leaves the
  container stopped whatever its restart policy, and ``docker compose up -d`` brings it back;
* a crash: the container's init (and with it every process inside) SIGKILLed from the host,
  as the kernel's OOM killer would; the restart policy (``unless-stopped``) brings it back.

The NATS container is killed (SIGKILL) in the middle of the night, kept down a few seconds and
brought back with ``docker compose up -d``: its JetStream store is on the ``nats-data``
volume. The night is then audited exactly as the local fault scenarios are
(:func:`conftest_faults.audit` / :func:`conftest_faults.assert_clean`): every frame and visit
in its final state exactly once, nothing half-written under a final name, the ledger right,
Slack told of the start and the end once and of no failure, the raw tree unchanged, the
products right against the simulator's truth. A last test puts a duplicated product and a
half-written file into the night's tree and checks that the same audit refuses it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from conftest_compose import (  # noqa: E402
    ComposeStack,
    chown_tree,
    ensure_images,
    make_data_root,
    remove_stale_projects,
    require_engine,
    run,
    wait_for,
)
from conftest_faults import (  # noqa: E402
    FAULT_ENV,
    Fault,
    Night,
    Pipeline,
    SlackStandIn,
    _singles,
    _stacks,
    assert_clean,
    audit,
    save_figures,
    simulate_night,
    tree_checksums,
)

pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.timeout(1500)]

STAGES = ["watcher", "calib", "astrometry", "phot", "stack", "subtract"]
#: When each container is killed: seconds into a job it holds, or (a callable) when it holds
#: one and the callable says so. A stage's 1st, 3rd... kill is a ``docker kill`` followed by
#: ``docker compose up -d``; its 2nd, 4th... a crash that the restart policy recovers from.
#: ``nats`` is restarted while phot holds a message, once calib has been killed.
#: Jobs here last 0.3-3 s (astrometry, phot; the shorter on an idle machine) to ~5 s (subtract); a second kill
#: that finds no job long enough before the night ends is reported as missed (the first kills
#: come early in a job and are never missed). Calib holds one message for the whole night: its
#: first kill comes as soon as it holds it (while it builds the masters), its second once some
#: frames were announced, which a fast machine may reduce all before the kill can be made.
KILLS = {"calib": [0.0, "some frames announced"], "astrometry": [0.0, 0.3], "phot": [0.5, 1.5],
         "stack": [0.3], "subtract": [0.5, 1.0], "watcher": [0.0], "nats": ["after calib's kill"]}
NATS_DOWN_S = 3.0
NIGHT_TIMEOUT_S = float(os.environ.get("GPPY_TEST_NIGHT_TIMEOUT", "900"))



# ---------------------------------------------------------------------------- Slack from a container
class Relay:
    """A TCP relay from the Docker host's bridge address (``host-gateway`` for the containers)
    to the Slack stand-in, which listens on the loopback interface only."""

    def __init__(self, host: str, target_port: int):
        self.target_port = target_port
        self.server = socket.create_server((host, 0))
        self.port = self.server.getsockname()[1]
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()  # Slack down: the connection is refused, as Slack's would be
                continue
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.closed = True
        with contextlib.suppress(OSError):
            self.server.close()


def bridge_gateway() -> str:
    """The address ``host-gateway`` stands for: the gateway of Docker's default bridge."""
    out = run(["docker", "network", "inspect", "bridge", "-f", "{{range .IPAM.Config}}{{.Gateway}}{{end}}"])
    return out.stdout.strip().split()[0]


# ---------------------------------------------------------------------------- the adapter
class ComposePipeline(Pipeline):
    """What :func:`conftest_faults.audit` and :meth:`Pipeline.kill_while_busy` need, on a
    compose stack: the night's ledger and events (from the stack's NATS, as the operator),
    the Slack stand-in, the faults list, each stage's ``/status`` (from its container's
    address on the compose network) and the kills."""

    def __init__(self, stack: ComposeStack, night: Night, workdir: Path, slack: SlackStandIn):
        # Pipeline.__init__ would make a local stack: only its attributes are set here.
        self.stack = stack
        self.night = night
        self.slack = slack
        self.workdir = workdir
        self.settings = stack.settings(night.config)
        self.faults: list[Fault] = []
        self.t_start = time.time()
        self.http = httpx.Client(timeout=1.0)
        self._ip: dict[str, tuple[float, str]] = {}
        self.kills: dict[str, int] = {}

    # ------------------------------------------------------------ containers
    def container(self, service: str) -> str:
        return f"{self.stack.project}-{service}-1"

    def state(self, service: str) -> dict:
        return self.stack.inspect(self.container(service))["State"]

    def ip(self, service: str, refresh: bool = False) -> str:
        """The container's address on the compose network (looked up at most once a second)."""
        t, addr = self._ip.get(service, (0.0, ""))
        if refresh or not addr and time.monotonic() - t > 1.0:
            out = run(["docker", "inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}",
                       self.container(service)], check=False)
            addr = out.stdout.split()[0] if out.returncode == 0 and out.stdout.split() else ""
            self._ip[service] = (time.monotonic(), addr)
        return addr

    def status(self, stage: str) -> dict | None:
        addr = self.ip(stage)
        if not addr:
            return None
        try:
            r = self.http.get(f"http://{addr}:8080/status")
            return r.json() if r.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            self._ip[stage] = (time.monotonic(), "")  # the container may have a new address
            return None

    def busy(self, stage: str) -> bool:
        if stage == "nats":  # "in the middle of the night": while phot holds a message
            return super().busy("phot")
        return super().busy(stage)

    def wait_ready(self, stage: str, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            addr = self.ip(stage)
            with contextlib.suppress(httpx.HTTPError):
                if addr and self.http.get(f"http://{addr}:8080/readyz").status_code == 200:
                    return
            time.sleep(0.2)
        raise AssertionError(f"{stage} not ready {timeout:.0f} s after its restart")

    # ------------------------------------------------------------ faults
    def kill_stage(self, stage: str, note: str = "") -> Fault:
        if stage == "nats":
            return self.restart_nats(NATS_DOWN_S, note)
        n = self.kills[stage] = self.kills.get(stage, 0) + 1
        name = self.container(stage)
        info = self.stack.inspect(name)
        before, restarts = info["State"], info["RestartCount"]
        assert before["Running"], f"{name} is not running: {before}"
        t0 = time.time()
        if n % 2 == 1:
            run(["docker", "kill", name])  # SIGKILL by default
            st = self.state(stage)
            assert not st["Running"] and st["ExitCode"] == 128 + signal.SIGKILL, (name, st)
            self.stack.up(stage, no_deps=True)
            how = "docker kill; docker compose up -d"
        else:
            os.kill(int(before["Pid"]), signal.SIGKILL)  # its init: everything in the container dies

            def back() -> bool:  # restarted, not in the policy's back-off ("restarting") any more
                st = self.stack.inspect(name)
                return (st["RestartCount"] > restarts and st["State"]["Running"] and not st["State"]["Restarting"]
                        and st["State"]["StartedAt"] != before["StartedAt"])

            wait_for(back, 60, f"the restart policy to restart {name}", interval=0.1)
            how = "crash (SIGKILL of the container's init from the host); restart policy"
        after = self.state(stage)
        assert after["Running"] and after["StartedAt"] != before["StartedAt"], (name, after)
        self.ip(stage, refresh=True)
        fault = Fault("sigkill", stage, t0, time.time(), f"{note}; {how}")
        if stage == "watcher":  # it publishes little: recovered when its replacement is ready
            def ready():
                with contextlib.suppress(AssertionError):
                    self.wait_ready(stage)
                    fault.recovered_s = round(time.time() - fault.end, 2)
            threading.Thread(target=ready, daemon=True).start()
        self.faults.append(fault)
        return fault

    def restart_nats(self, down_s: float = NATS_DOWN_S, note: str = "") -> Fault:
        """SIGKILL the NATS container (no clean shutdown), keep it down, ``up -d`` it again."""
        name = self.container("nats")
        before = self.state("nats")
        t0 = time.time()
        run(["docker", "kill", name])
        assert self.state("nats")["ExitCode"] == 128 + signal.SIGKILL
        time.sleep(down_s)
        self.stack.up("nats", no_deps=True)
        after = self.state("nats")
        assert after["Running"] and after["StartedAt"] != before["StartedAt"], after
        fault = Fault("nats-restart", "nats", t0, time.time(), f"{note}; down {down_s:.0f} s; docker kill, up -d")
        self.faults.append(fault)
        return fault

    def close(self) -> None:
        self.http.close()


# ---------------------------------------------------------------------------- the night
@pytest.fixture(scope="module")
def compose_night(tmp_path_factory):
    """The killed night, audited; the stack stays up for the tests (the audit reads its NATS)."""
    require_engine()
    remove_stale_projects()
    t_module = time.monotonic()
    built = ensure_images()
    data = make_data_root()
    logs = tmp_path_factory.mktemp("compose-logs") / "faults-stack.log"
    slack = SlackStandIn().up()
    relay = Relay(bridge_gateway(), slack.port)
    stack = pipe = None
    try:
        night = simulate_night(data, seed=5)
        # The night's folder appears only once the stack is healthy (moved in with one rename,
        # as a completely copied night does), so that the first kills find every stage at work.
        staged = data / ".staging" / night.night_dir.name
        staged.parent.mkdir()
        os.rename(night.night_dir, staged)
        chown_tree(data)
        override = data.parent / "compose.faults.yaml"  # JSON is YAML
        services = {s: {"environment": dict(FAULT_ENV)} for s in STAGES}
        services["watcher"]["environment"].update(GPPY_SLACK_TOKEN=slack.token,
                                                  GPPY_SLACK_BASE_URL=f"http://host.docker.internal:{relay.port}/api/")
        services["watcher"]["extra_hosts"] = ["host.docker.internal:host-gateway"]
        override.write_text(json.dumps({"services": services}, indent=1))
        stack = ComposeStack(data, files=[override])
        pipe = ComposePipeline(stack, night, logs.parent, slack)  # audit.json next to the logs
        t_up = time.monotonic()
        stack.up()
        stack.wait_healthy(["nats", *STAGES], timeout=300)
        up_s = time.monotonic() - t_up
        os.rename(staged, night.night_dir)
        raw_before = tree_checksums(night.night_dir)
        pipe.t_start = time.time()

        def announced():
            """after some of its frames were announced"""
            return len(_singles(night.processed)) >= 1

        def calib_killed():
            """while phot holds a message, after calib's kill"""
            return any(f.target == "calib" for f in pipe.faults)

        special = {"some frames announced": announced, "after calib's kill": calib_killed}
        delays = {s: [special.get(d, d) if isinstance(d, str) else d for d in v] for s, v in KILLS.items()}
        missed = pipe.kill_while_busy(delays, timeout=NIGHT_TIMEOUT_S)
        rec = pipe.wait_terminal(timeout=NIGHT_TIMEOUT_S)
        result = audit("SIGKILL of each stage container mid-job and a NATS restart (compose stack)", night, pipe,
                       rec, raw_before)
        restarts = {s: stack.inspect(pipe.container(s))["RestartCount"] for s in ["nats", *STAGES]}
        extra = {"missed": missed, "stack": "compose", "images_built_s": round(built, 1), "stack_up_s": round(up_s, 1),
                 "restart_counts": restarts}
        save_figures(result, extra)
        yield result, extra, pipe, night, raw_before
    finally:
        if pipe is not None:
            pipe.close()
        if stack is not None:
            stack.destroy(keep_logs=logs)
        relay.close()
        slack.down()
        print(f"compose logs: {logs}; module time {time.monotonic() - t_module:.0f} s")
        shutil.rmtree(data.parent, ignore_errors=True)


# ---------------------------------------------------------------------------- tests
def test_every_stage_container_was_killed_mid_job_and_nats_restarted(compose_night):
    a, extra, *_ = compose_night
    targets = [f["target"] for f in a.faults]
    assert set(targets) == {"nats", *STAGES}, (targets, extra["missed"])
    kinds = [f["kind"] for f in a.faults]
    assert kinds.count("nats-restart") == 1 and kinds.count("sigkill") == len(a.faults) - 1
    assert len(a.faults) >= 8, (targets, extra["missed"])
    # both ways back were taken: compose up -d after docker kill (Docker itself leaves a killed
    # container down), the restart policy after a crash (and only then)
    crashes = {s: sum(f["target"] == s and "restart policy" in f["note"] for f in a.faults) for s in STAGES}
    assert sum(crashes.values()) >= 1, [f["note"] for f in a.faults]
    assert {s: extra["restart_counts"][s] for s in STAGES} == crashes, (extra["restart_counts"], crashes)
    assert extra["restart_counts"]["nats"] == 0
    print(json.dumps({"faults": [(f["target"], f["note"], f["recovered_s"]) for f in a.faults], **extra,
                      "night_s": round(a.duration_s, 1)}, indent=1))


def test_night_ends_as_if_nothing_happened(compose_night):
    a, *_ = compose_night
    assert_clean(a)


def test_products_still_right_against_the_truth(compose_night):
    a, *_ = compose_night
    assert a.astrometry_worst_arcsec < 0.10, a.astrometry_worst_arcsec
    assert a.zp_worst_mag < 0.05, a.zp_worst_mag


def test_every_fault_was_recovered_from(compose_night):
    a, *_ = compose_night
    assert all(f["recovered_s"] is not None for f in a.faults), a.faults


def test_the_audit_refuses_a_duplicated_or_half_written_product(compose_night, tmp_path):
    """The audit that passed above, on the same night with one single and one stack copied
    under a second final name and a truncated file under a final name: it must fail."""
    _, _, pipe, night, raw_before = compose_night
    single = _singles(night.processed)[0]
    stack_img = _stacks(night.processed)[0]
    planted = [single.with_name(single.name.replace(".fits", "_copy.fits")),
               stack_img.with_name(stack_img.name.replace(".com.fits", "_copy.com.fits")),
               single.with_name(single.name.replace(".fits", "_cut.weight.fits"))]
    shutil.copyfile(single, planted[0])
    shutil.copyfile(stack_img, planted[1])
    planted[2].write_bytes(single.with_name(single.name.replace(".fits", ".weight.fits")).read_bytes()[:20000])
    workdir, pipe.workdir = pipe.workdir, tmp_path  # keep the real night's audit.json
    rec = pipe.record()
    try:
        b = audit("control", night, pipe, rec, raw_before, truth_quality=False)
    finally:
        pipe.workdir = workdir
        for p in planted:
            p.unlink()
    assert any(single.name in d or planted[0].name in d for d in b.duplicate_products), b.duplicate_products
    assert any(planted[1].name in d for d in b.duplicate_products), b.duplicate_products
    assert [Path(p).name for p in b.incomplete_files] == [planted[2].name], b.incomplete_files
    with pytest.raises(AssertionError):
        assert_clean(b)
