"""Shared fixtures: a real nats-server with JetStream, data roots and settings."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from gppy.config import Settings
from gppy.local import free_port, nats_server_binary, wait_for_port


class NatsServer:
    def __init__(self, store: Path, port: int | None = None):
        self.store = store
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> NatsServer:
        self.store.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen([nats_server_binary(), "-js", "-a", "127.0.0.1", "-p", str(self.port),
                                      "-sd", str(self.store)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        wait_for_port(self.port)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture
def nats_server(tmp_path):
    server = NatsServer(tmp_path / "nats-store").start()
    yield server
    server.stop()


@pytest.fixture
def data_root(tmp_path) -> Path:
    """A v1-style data root with a path.json; returns the path.json."""
    base = tmp_path / "root" / "factory"
    (tmp_path / "root" / "obsdata").mkdir(parents=True)
    base.mkdir(parents=True)
    cfg = tmp_path / "root" / "path.json"
    cfg.write_text(json.dumps({"path_base": str(base)}))
    return cfg


@pytest.fixture
def settings(nats_server, data_root) -> Settings:
    return Settings(config=data_root, nats_url=nats_server.url, ack_wait_s=5, heartbeat_s=1,
                    max_deliver=3, log_json=False)
