"""Helpers for the compose tests: a real Docker engine, the real ``compose.yaml``, real images.

Import from a test file after putting this folder on ``sys.path``. Every stack gets its own
Compose project name (``gppytest...``), its own data root under /var/tmp (bind-mounted at
the same absolute path, owned by the pipeline user), its own secrets and its own loopback
ports; it is taken down with its volumes at the end. Leftovers of an interrupted run are
removed first. The engine is started by ``deploy/ci-docker.sh`` (CI runs it before pytest):
when it is missing the tests fail with that instruction, they never skip.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from gppy import bus
from gppy.config import Settings
from gppy.local import free_port

REPO = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO / "compose.yaml"
TAG = os.environ.get("GPPY_TEST_TAG", "pytest")
UID = int(os.environ.get("GPPY_TEST_UID", "1000"))
GID = int(os.environ.get("GPPY_TEST_GID", "1000"))
PROJECT_PREFIX = "gppytest"
STAGES = ["watcher", "calib", "astrometry", "phot", "stack", "subtract"]
ENGINE_HINT = ("the compose tests need a running Docker engine with the Compose v2 plugin: "
               "run `bash deploy/ci-docker.sh` as root first (CI's .ci/run does)")


def run(cmd: list[str], *, env: dict | None = None, timeout: float = 600.0, check: bool = True,
        cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Run a command (argument list, no shell); on failure raise with its output."""
    try:
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"{' '.join(cmd)}: no result after {timeout:.0f} s\n{exc.stdout or ''}{exc.stderr or ''}") from exc
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited with {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def require_engine() -> None:
    """Fail (never skip) with a clear message when Docker or Compose v2 is missing."""
    if shutil.which("docker") is None:
        pytest.fail(f"no `docker` command: {ENGINE_HINT}")
    info = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True,
                          timeout=60)
    if info.returncode != 0:
        pytest.fail(f"the Docker engine does not answer ({info.stderr.strip()[:300]}): {ENGINE_HINT}")
    comp = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, timeout=60)
    if comp.returncode != 0:
        pytest.fail(f"no Compose v2 plugin ({comp.stderr.strip()[:300]}): {ENGINE_HINT}")


def remove_stale_projects() -> None:
    """Remove containers, networks, volumes and data roots of earlier, interrupted test stacks
    (the compose test modules run one after the other, never two at once)."""
    out = run(["docker", "ps", "-a", "--format", '{{.ID}} {{.Label "com.docker.compose.project"}}'], check=False)
    stale = [line.split() for line in out.stdout.splitlines() if len(line.split()) == 2]
    ids = [cid for cid, proj in stale if proj.startswith(PROJECT_PREFIX)]
    if ids:
        run(["docker", "rm", "-f", "-v", *ids], check=False, timeout=120)
    for kind in ("network", "volume"):
        out = run(["docker", kind, "ls", "-q", "--filter", "label=com.docker.compose.project"], check=False)
        for name in out.stdout.split():
            proj = run(["docker", kind, "inspect", "-f", '{{index .Labels "com.docker.compose.project"}}', name],
                       check=False).stdout.strip()
            if proj.startswith(PROJECT_PREFIX):
                run(["docker", kind, "rm", name], check=False)
    for old in Path("/var/tmp").glob("gppy-compose-*"):
        shutil.rmtree(old, ignore_errors=True)


def image_env() -> dict[str, str]:
    """GPPY_VERSION / GPPY_REVISION ... as deploy/image-env.sh computes them."""
    out = run(["bash", "-c", 'eval "$(deploy/image-env.sh)"; env | grep "^GPPY_"'], timeout=60).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def build_images(services: list[str] | None = None, extra_env: dict | None = None) -> float:
    """Build the images with deploy/build.sh under the test tag; returns the seconds it took."""
    env = dict(os.environ, GPPY_TAG=TAG, GPPY_UID=str(UID), GPPY_GID=str(GID), **(extra_env or {}))
    t0 = time.monotonic()
    run(["bash", "deploy/build.sh", *(services or [])], env=env, timeout=1800)
    return time.monotonic() - t0


_BUILT_REVISIONS: set[str] = set()


def ensure_images(services: list[str] | None = None) -> float:
    """The images of ``services`` (compose service names; all by default) for this source tree,
    built at most once per test run: nothing is built when this process built them already or
    when every image already carries the tree's clean git revision (another compose test module
    of this run built it); otherwise :func:`build_images`. Returns the seconds spent building."""
    env = image_env()
    rev = env["GPPY_REVISION"]
    wanted = services or ["nats", *STAGES]
    images = [f"gppy-{'base' if s == 'nats' else s}:{TAG}" for s in wanted]
    key = f"{rev}:{','.join(sorted(wanted))}"
    if key in _BUILT_REVISIONS:
        return 0.0
    if not rev.endswith("-dirty") and rev != "unknown":
        labels = [run(["docker", "image", "inspect", "-f",
                       '{{index .Config.Labels "org.opencontainers.image.revision"}}', img], check=False)
                  for img in images]
        if all(r.returncode == 0 and r.stdout.strip() == rev for r in labels):
            _BUILT_REVISIONS.add(key)
            return 0.0
    seconds = build_images(services, extra_env={k: env[k] for k in ("GPPY_VERSION", "GPPY_REVISION")})
    _BUILT_REVISIONS.add(key)
    return seconds


def make_data_root() -> Path:
    """A fresh data root outside /tmp (containers mount a tmpfs there), e.g.
    /var/tmp/gppy-compose-XXXX/data, traversable by the pipeline user."""
    top = Path(tempfile.mkdtemp(prefix="gppy-compose-", dir="/var/tmp"))
    top.chmod(0o755)
    data = top / "data"
    data.mkdir()
    return data


def chown_tree(path: Path, uid: int = UID, gid: int = GID) -> None:
    """Hand a tree to the pipeline user (what an operator does once for the data root)."""
    os.chown(path, uid, gid)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            with contextlib.suppress(FileNotFoundError):
                os.chown(os.path.join(root, name), uid, gid, follow_symlinks=False)


@dataclass
class ComposeStack:
    """One Compose project of the real compose.yaml (plus optional override files)."""

    data_root: Path
    files: list[Path] = field(default_factory=list)
    env_extra: dict[str, str] = field(default_factory=dict)
    project: str = field(default_factory=lambda: f"{PROJECT_PREFIX}{uuid.uuid4().hex[:8]}")
    nats_port: int = field(default_factory=free_port)
    api_port: int = field(default_factory=free_port)

    def __post_init__(self) -> None:
        self.secrets_dir = self.data_root.parent / "secrets"
        self.secrets_dir.mkdir(exist_ok=True)
        for name in ("nats_password", "api_token"):
            f = self.secrets_dir / name
            if not f.exists():
                f.write_text(uuid.uuid4().hex + uuid.uuid4().hex[:16] + "\n")
                os.chown(f, 0, GID)
                f.chmod(0o640)
        self.password = (self.secrets_dir / "nats_password").read_text().strip()
        self.api_token = (self.secrets_dir / "api_token").read_text().strip()

    # ------------------------------------------------------------ compose
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(image_env())
        env.update(GPPY_PROJECT=self.project, GPPY_TAG=TAG, GPPY_UID=str(UID), GPPY_GID=str(GID),
                   GPPY_DATA=str(self.data_root), GPPY_SECRETS_DIR=str(self.secrets_dir),
                   GPPY_NATS_PORT=str(self.nats_port), GPPY_API_PORT=str(self.api_port),
                   GPPY_HEALTH_INTERVAL="2s", GPPY_TMPFS_SIZE="1g")
        env.update(self.env_extra)
        return env

    def compose(self, *args: str, timeout: float = 600.0, check: bool = True, env: dict | None = None):
        cmd = ["docker", "compose", "-f", str(COMPOSE_FILE)]
        for f in self.files:
            cmd += ["-f", str(f)]
        cmd += ["-p", self.project, *args]
        full = self.env()
        full.update(env or {})
        return run(cmd, env=full, timeout=timeout, check=check)

    def up(self, *services: str, scale: dict[str, int] | None = None, no_deps: bool = False,
           build: bool = False, env: dict | None = None, timeout: float = 600.0) -> None:
        args = ["up", "-d", "--no-color", "--pull", "never"]
        if no_deps:
            args.append("--no-deps")
        if build:
            args.append("--build")
        else:
            args.append("--no-build")
        for svc, n in (scale or {}).items():
            args += ["--scale", f"{svc}={n}"]
        self.compose(*args, *services, env=env, timeout=timeout)

    def ps(self, *services: str, all_: bool = False) -> list[dict]:
        args = ["ps", "--format", "json"] + (["-a"] if all_ else []) + list(services)
        out = self.compose(*args).stdout.strip()
        if not out:
            return []
        if out.startswith("["):
            return json.loads(out)
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def wait_healthy(self, services: list[str], timeout: float = 180.0, count: dict[str, int] | None = None) -> None:
        """Wait until every container of ``services`` runs and its health check passes."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            rows = self.ps(*services, all_=True)
            by: dict[str, list[dict]] = {}
            for r in rows:
                by.setdefault(r["Service"], []).append(r)
            bad = []
            for svc in services:
                want = (count or {}).get(svc, 1)
                running = [r for r in by.get(svc, []) if r.get("State") == "running"]
                healthy = [r for r in running if r.get("Health") in ("healthy", "")]
                if len(healthy) < want:
                    states = [f"{r['Name']}:{r.get('State')}/{r.get('Health')}" for r in by.get(svc, [])]
                    bad.append(f"{svc} ({len(healthy)}/{want} healthy: {', '.join(states) or 'no container'})")
                for r in by.get(svc, []):
                    if r.get("State") in ("exited", "dead") or "restarting" in str(r.get("State")):
                        logs = self.compose("logs", "--no-color", "--tail", "40", svc, check=False).stdout
                        raise AssertionError(f"{r['Name']} is {r.get('State')} (exit {r.get('ExitCode')}):\n{logs}")
            if not bad:
                return
            last = "; ".join(bad)
            time.sleep(1.0)
        raise AssertionError(f"not healthy after {timeout:.0f} s: {last}")

    def container_ids(self, service: str) -> list[str]:
        return self.compose("ps", "-q", service).stdout.split()

    def inspect(self, cid: str) -> dict:
        return json.loads(run(["docker", "inspect", cid]).stdout)[0]

    def exec(self, service: str, *cmd: str, index: int = 1, check: bool = True):
        return self.compose("exec", "-T", "--index", str(index), service, *cmd, check=check)

    def logs(self, *services: str) -> str:
        return self.compose("logs", "--no-color", "--timestamps", *services, check=False, timeout=120).stdout

    def down(self, volumes: bool = False, timeout: float = 300.0) -> None:
        args = ["down", "--remove-orphans", "-t", "60"] + (["-v"] if volumes else [])
        self.compose(*args, timeout=timeout)

    def destroy(self, keep_logs: Path | None = None) -> None:
        """Take the project down with its volumes; optionally save the logs first."""
        if keep_logs is not None:
            with contextlib.suppress(Exception):
                keep_logs.write_text(self.logs())
        with contextlib.suppress(Exception):
            self.down(volumes=True)

    # ------------------------------------------------------------ NATS from the host
    def settings(self, config: Path | None = None) -> Settings:
        cfg = config or (self.data_root / "path.json")
        return Settings(config=cfg, nats_url=f"nats://127.0.0.1:{self.nats_port}", nats_user="gppy",
                        nats_password=self.password, log_json=False)

    def nats(self, coro_fn, config: Path | None = None):
        """Run ``coro_fn(js, settings)`` against the stack's NATS (authenticated) and return its result."""
        settings = self.settings(config)

        async def main():
            nc = await bus.connect(settings, "gppy-compose-test")
            try:
                return await coro_fn(nc.jetstream(), settings)
            finally:
                with contextlib.suppress(Exception):
                    await nc.drain()

        return asyncio.run(main())


async def stream_subjects(js, settings: Settings, subject: str) -> list:
    """Every message of the stream on ``subject`` (wildcards allowed), oldest first."""
    info = await js.stream_info(settings.stream)
    total = info.state.messages
    out = []
    if total == 0:
        return out
    sub = await js.subscribe(subject, ordered_consumer=True, stream=settings.stream)
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=2.0)
            except Exception:
                break
            out.append(msg)
            if msg.metadata and msg.metadata.num_pending == 0:
                break
    finally:
        await sub.unsubscribe()
    return out


def wait_for(cond, timeout: float, what: str, interval: float = 1.0):
    """Poll ``cond()`` until it returns a truthy value; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)
