"""compose.yaml / compose.gpu.yaml as Compose itself resolves them (`docker compose config`),
and the Dockerfiles' rules: what every stage container gets, what only the watcher publishes,
the data root at the same path, the GPU override, secrets kept out of images and of git."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from conftest_compose import REPO, STAGES, require_engine, run  # noqa: E402

pytestmark = [pytest.mark.docker]


def config(*files: str, **env: str) -> dict:
    require_engine()
    cmd = ["docker", "compose"]
    for f in files or ("compose.yaml",):
        cmd += ["-f", str(REPO / f)]
    full = {k: v for k, v in os.environ.items() if not k.startswith("GPPY_")}
    full.update(env)
    return json.loads(run([*cmd, "config", "--format", "json"], env=full).stdout)


def seconds(text: str) -> float:
    total = 0.0
    for value, unit in re.findall(r"([\d.]+)(h|ms|m|s)", text):
        total += float(value) * {"h": 3600, "m": 60, "s": 1, "ms": 0.001}[unit]
    return total


def test_every_stage_runs_locked_down_on_the_shared_data_root():
    cfg = config(GPPY_DATA="/srv/sevendt/data", GPPY_UID="2750", GPPY_GID="2751")
    services = cfg["services"]
    assert set(services) == {"nats", *STAGES}
    for name in STAGES:
        s = services[name]
        assert s["user"] == "2750:2751"
        assert s["read_only"] is True and any(t.startswith("/tmp") for t in s["tmpfs"])
        assert s["init"] is True
        assert s["restart"] == "unless-stopped"
        assert s["healthcheck"]["test"] == ["CMD", "gppy-healthcheck"]
        assert s["depends_on"]["nats"]["condition"] == "service_healthy"
        assert [(v["type"], v["source"], v["target"]) for v in s["volumes"]] == \
            [("bind", "/srv/sevendt/data", "/srv/sevendt/data")]
        env = s["environment"]
        assert env["GPPY_CONFIG"] == "/srv/sevendt/data/path.json"
        assert env["GPPY_NATS_PASSWORD_FILE"] == "/run/secrets/nats_password"
        assert not any("PASSWORD" in k and not k.endswith("_FILE") for k in env), "a password in the environment"
        assert env["GPPY_GPU"] == "off"
        assert "nats_password" in [x["source"] for x in s["secrets"]]
        # SIGTERM lets a service finish what it holds (up to ack_wait/2 = 30 s by default).
        assert seconds(s["stop_grace_period"]) >= 60
        assert s["image"] == f"gppy-{name}:latest"
        assert s["build"]["dockerfile"] == f"services/{name}/Dockerfile"
        assert s["build"]["args"]["GPPY_UID"] == "2750"
        if name != "watcher":
            assert not s.get("ports"), f"{name} publishes a port"
    ports = services["watcher"]["ports"]
    assert [(p["host_ip"], p["target"]) for p in ports] == [("127.0.0.1", 8080)]
    assert services["watcher"]["environment"]["GPPY_API_TOKEN_FILE"] == "/run/secrets/api_token"
    nats = services["nats"]
    assert [(p["host_ip"], p["target"]) for p in nats["ports"]] == [("127.0.0.1", 4222)]
    assert [(v["type"], v["target"]) for v in nats["volumes"]] == [("volume", "/var/lib/nats")]
    assert nats["build"]["dockerfile"] == "deploy/base.Dockerfile"
    assert "ca_bundle" in [x["source"] for x in nats["build"]["secrets"]]
    assert cfg["secrets"]["ca_bundle"]["file"] == "/etc/ssl/certs/ca-certificates.crt"


def test_one_stage_tag_can_differ_from_the_rest():
    cfg = config(GPPY_TAG="2025.06.1", GPPY_SUBTRACT_TAG="2025.06.2")
    tags = {n: s["image"].rsplit(":", 1)[1] for n, s in cfg["services"].items()}
    assert tags.pop("subtract") == "2025.06.2"
    assert set(tags.values()) == {"2025.06.1"}


def test_gpu_override_reserves_a_device_for_calib_and_subtract_only():
    cfg = config("compose.yaml", "compose.gpu.yaml", GPPY_CUDA_MAJOR="11", GPPY_GPU_DEVICE="1")
    for name, s in cfg["services"].items():
        devices = (s.get("deploy") or {}).get("resources", {}).get("reservations", {}).get("devices", [])
        if name in ("calib", "subtract"):
            assert devices == [{"driver": "nvidia", "device_ids": ["1"], "capabilities": ["gpu"]}]
            assert s["build"]["args"]["VARIANT"] == "gpu" and s["build"]["args"]["CUDA_MAJOR"] == "11"
            assert s["image"] == f"gppy-{name}-gpu:latest"
            assert s["environment"]["GPPY_GPU"] == "on"
        else:
            assert not devices, name


def test_dockerfiles_share_the_base_and_keep_secrets_out():
    base = (REPO / "deploy" / "base.Dockerfile").read_text()
    assert re.search(r"^FROM \$\{DEBIAN_IMAGE\}$", base, re.M)
    for name in STAGES:
        text = (REPO / "services" / name / "Dockerfile").read_text()
        froms = re.findall(r"^FROM (\S+)", text, re.M)
        assert froms[0] == "${BASE_IMAGE}", name
        assert f'CMD ["python", "-m", "gppy_{name}"]' in text
        assert re.search(r"^USER \$\{GPPY_UID\}:\$\{GPPY_GID\}$", text, re.M)
        has_gpu = "AS gpu" in text
        assert has_gpu == (name in ("calib", "subtract")), name
    for path in [REPO / "deploy" / "base.Dockerfile", *(REPO / "services").glob("*/Dockerfile")]:
        text = "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("#"))
        for arg in re.findall(r"^ARG (\w+)", text, re.M):
            assert not re.search(r"PASSWORD|TOKEN|SECRET|CERT", arg), f"{path}: build argument {arg}"
        # the CA bundle is used only through a BuildKit secret mount
        assert "ca_bundle" not in re.sub(r"--mount=type=secret,id=ca_bundle[^\s]*|/run/secrets/ca_bundle", "", text)


def test_secrets_and_env_are_ignored_by_git_and_docker():
    for path in (".env", "deploy/secrets/nats_password", "deploy/secrets/api_token"):
        assert subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO).returncode == 0, path
    ignore = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert ignore[0] == "**" and "!deploy/secrets/" not in ignore and "!.env" not in ignore
    example = (REPO / ".env.example").read_text()
    names = set(re.findall(r"^#?(GPPY_\w+)=", example, re.M))
    used = (REPO / "compose.yaml").read_text() + (REPO / "compose.gpu.yaml").read_text()
    assert names and all(n in used for n in names), sorted(n for n in names if n not in used)
