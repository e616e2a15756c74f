"""No secret in the repository or in any image layer; credentials only from the environment or
secret files.

The scanner looks for token patterns (Slack ``xox?-`` tokens, AWS access keys and secret keys,
GitHub tokens, private keys) and for credential assignments with a random-looking value; it
also looks for the actual local secret values (``deploy/secrets/*``, git-ignored) when they
exist. It runs over every file ``git ls-files`` lists, and over every layer of the images the
compose stack built (``docker save`` of the ``gppy-*`` images, read as tar streams, plus each
image's configuration: environment, labels, history); where no image is built, over the build
context the Dockerfiles see (what ``.dockerignore`` lets through).
"""

from __future__ import annotations

import fnmatch
import io
import json
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from gppy.config import Settings

REPO = Path(__file__).resolve().parents[1]

PATTERNS = {
    "slack token": rb"xox[abposr]-\d{6,}-\d{6,}-[0-9A-Za-z-]{10,}",
    "slack webhook": rb"hooks\.slack\.com/services/T[0-9A-Z]{6,}/B[0-9A-Z]{6,}/[0-9A-Za-z]{16,}",
    "AWS access key": rb"(?<![A-Z0-9])(?:AKIA|ASIA)[0-9A-Z]{16}(?![A-Z0-9])",
    "AWS secret key": rb"(?i)aws_?secret_?(?:access_?)?key[\"']?\s*[:=]\s*[\"']?[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+])",
    "GitHub token": rb"(?:gh[pousr]_[0-9A-Za-z]{36}|github_pat_[0-9A-Za-z_]{60,})",
    # the marker followed by a key body (parsers carry the marker alone)
    "private key": rb"-----BEGIN (?:RSA |EC |DSA |OPENSSH |ENCRYPTED |PGP )?PRIVATE KEY(?: BLOCK)?-----"
                   rb"\s*(?:[A-Za-z0-9+/=:,-]+\s*){0,4}[A-Za-z0-9+/=\s]{64,}",
    "credential assignment": rb"(?i)(?<![a-z0-9])(?:password|passwd|secret|token|api_?key)[A-Za-z_]*[\"']?\s*[:=]\s*[\"']?"
                             rb"(?=[A-Za-z0-9+_=-]*\d[A-Za-z0-9+_=-]*\d[A-Za-z0-9+_=-]*\d)"
                             rb"(?=[A-Za-z0-9+_=-]*[A-Za-z][A-Za-z0-9+_=-]*[A-Za-z][A-Za-z0-9+_=-]*[A-Za-z])"
                             rb"[A-Za-z0-9+_=-]{16,}(?![A-Za-z0-9+_=-])",
}
COMBINED = re.compile(b"|".join(b"(?P<p%d>%s)" % (i, b"(?i:" + p[4:] + b")" if p.startswith(b"(?i)") else p)
                                 for i, p in enumerate(PATTERNS.values())))
NAMES = list(PATTERNS)
BINARY = (".so", ".pyc", ".a", ".o", ".png", ".jpg", ".gif", ".fits", ".fz", ".npy", ".npz", ".gz", ".xz",
          ".zip", ".whl", ".bz2", ".mo", ".ttf", ".otf", ".woff", ".woff2", ".pdf", ".ico", ".db")
MAX_BYTES = 4 << 20


def local_secrets() -> list[bytes]:
    """The secret values of this checkout (deploy/secrets/*, git-ignored), if any."""
    out = []
    for p in (REPO / "deploy" / "secrets").glob("*"):
        if p.is_file() and p.name != "README.md":
            with __import__("contextlib").suppress(OSError):
                value = p.read_bytes().strip()
                if len(value) >= 12:
                    out.append(value)
    return out


def scan_bytes(data: bytes, where: str, secrets: list[bytes]) -> list[str]:
    hits = []
    for m in COMBINED.finditer(data):
        kind = NAMES[int(m.lastgroup[1:])]
        hits.append(f"{where}: {kind}: {m.group(0)[:60]!r}")
    for s in secrets:
        if s in data:
            hits.append(f"{where}: a local secret value (deploy/secrets)")
    return hits


def test_the_scanner_finds_what_it_looks_for():
    # built from pieces, so that this file itself holds none of them
    planted = [b"SLACK=xox" + b"b-123456789012-1234567890123-AbCdEfGhIjKlMnOp",
               b"key AKIA" + b"IOSFODNN7EXAMPLE here",
               b"aws_secret_access_key = " + b"wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
               b"-----BEGIN OPENSSH PRIVATE KEY-----\n" + b"b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW\n",
               b"gh" + b"p_" + b"a1" * 18,
               b'nats_password: "' + b'3f9c2a71b0d84e5f6a7b8c9d"', b"API_TOKEN=" + b"8c1d4e0f5a6b7c8d9e0f1a2b3c4d5e6f"]
    for sample in planted:
        assert scan_bytes(sample, "x", []), sample
    fakes = [b'token="xoxb-test-token"', b'password="not-the-password"', b"GPPY_NATS_PASSWORD_FILE: "
             b"/run/secrets/nats_password", b"password: $NATS_PASSWORD_CALIB", b"TOKEN = \"s3cret-token\"",
             b"api_token_file: Path | None = None", b'publicKeyToken="1fc8b3b9a1e18e3b"', b'"-----BEGIN EC PRIVATE KEY-----"; /* parser */']
    for sample in fakes:
        assert not scan_bytes(sample, "x", []), sample
    assert scan_bytes(b"the value abcdef0123456789abcdef is here", "x", [b"abcdef0123456789abcdef"])


def test_no_secret_in_the_repository():
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    secrets = local_secrets()
    hits = []
    n = 0
    for name in files.decode().split("\0"):
        p = REPO / name
        if not name or not p.is_file() or name.endswith(BINARY) or p.stat().st_size > MAX_BYTES:
            continue
        n += 1
        hits += scan_bytes(p.read_bytes(), name, secrets)
    assert n > 100
    assert not hits, hits


def _images() -> list[str]:
    if shutil.which("docker") is None:
        return []
    out = subprocess.run(["docker", "images", "-q", "--filter", "reference=gppy-*"], capture_output=True, text=True,
                         timeout=60)
    return sorted(set(out.stdout.split())) if out.returncode == 0 else []


def _scan_layer(fileobj, where: str, secrets: list[bytes], hits: list[str]) -> int:
    n = 0
    with tarfile.open(fileobj=fileobj, mode="r|*") as layer:
        for m in layer:
            if not m.isfile() or m.size > MAX_BYTES or m.name.endswith(BINARY):
                continue
            f = layer.extractfile(m)
            if f is None:
                continue
            data = f.read()
            if data.startswith(b"\x7fELF"):  # compiled programs and libraries of the distribution
                continue                      # (libgnutls carries its self-test key): not ours
            n += 1
            hits += scan_bytes(data, f"{where}:{m.name}", secrets)
    return n


def scan_images(ids: list[str]) -> tuple[int, int, list[str]]:
    """(layers, files) scanned in ``docker save`` of the images, and the hits."""
    secrets = local_secrets()
    hits: list[str] = []
    layers = files = 0
    proc = subprocess.Popen(["docker", "save", *ids], stdout=subprocess.PIPE)
    try:
        with tarfile.open(fileobj=proc.stdout, mode="r|") as outer:
            for m in outer:
                if not m.isfile():
                    continue
                f = outer.extractfile(m)
                head = f.peek(512)[:512] if hasattr(f, "peek") else b""
                if m.name.endswith(".json") or m.size < 64 * 1024 and not head.startswith(b"\x1f\x8b"):
                    data = f.read()
                    if data[:1] in (b"{", b"["):  # image configuration, manifest, index: env, labels, history
                        hits += scan_bytes(data, f"image config {m.name}", secrets)
                        continue
                    f = io.BytesIO(data)
                try:
                    files += _scan_layer(f, f"layer {m.name[:40]}", secrets, hits)
                    layers += 1
                except tarfile.TarError:
                    hits += scan_bytes(f.read() if hasattr(f, "read") else b"", m.name, secrets)
    finally:
        proc.stdout.close()
        assert proc.wait(timeout=300) == 0
    return layers, files, hits


def build_context_files() -> list[Path]:
    """Files of the build context that .dockerignore lets through (its ``**`` then ``!`` rules)."""
    rules = [r.strip() for r in (REPO / ".dockerignore").read_text().splitlines() if r.strip() and not
             r.startswith("#")]
    out = []
    for p in REPO.rglob("*"):
        if not p.is_file() or ".venv" in p.parts or ".git" in p.parts:
            continue
        rel = p.relative_to(REPO).as_posix()
        keep = True
        for rule in rules:
            neg = rule.startswith("!")
            pat = rule[1:] if neg else rule
            pat = pat.rstrip("/")
            match = (fnmatch.fnmatch(rel, pat) or fnmatch.fnmatch(rel, pat + "/*") or rel.startswith(pat + "/")
                     or pat == "**")
            if match:
                keep = neg
        if keep:
            out.append(p)
    return out


def test_no_secret_in_any_image_layer_or_build_context():
    ids = _images()
    if ids:  # the compose stack's images are built: every layer and configuration
        layers, files, hits = scan_images(ids)
        assert layers >= 3 and files > 1000, (layers, files)
    else:  # not built here: what the Dockerfiles' build context can put into an image
        secrets = local_secrets()
        ctx = build_context_files()
        assert any(p.name == "pyproject.toml" for p in ctx) and not any("secrets" in p.parts for p in ctx)
        hits = [h for p in ctx if not p.name.endswith(BINARY) for h in scan_bytes(p.read_bytes(), str(p), secrets)]
    assert not hits, "\n".join(hits[:30])


def test_credentials_come_only_from_the_environment_or_secret_files(tmp_path, monkeypatch):
    secret_fields = [k for k in Settings.model_fields if re.search(r"password|token|secret", k)
                     and not k.endswith("_file")]
    assert {"nats_password", "api_token", "slack_token"} <= set(secret_fields)
    for k in secret_fields:
        assert Settings.model_fields[k].default is None, k  # no built-in credential
        assert f"{k}_file" in Settings.model_fields, k     # every one can come from a secret file
        f = tmp_path / k
        f.write_text("from-a-file\n")
        monkeypatch.setenv(f"GPPY_{k.upper()}_FILE", str(f))
        assert Settings().secret(k) == "from-a-file"
        monkeypatch.setenv(f"GPPY_{k.upper()}", "from-the-env")
        assert Settings().secret(k) == "from-the-env"
        monkeypatch.delenv(f"GPPY_{k.upper()}")
        monkeypatch.delenv(f"GPPY_{k.upper()}_FILE")
    # path.json is data, not a place for credentials: its "settings" may not carry them
    cfg = json.loads((REPO / "shared" / "gppy" / "data").joinpath("path.json").read_text()) \
        if (REPO / "shared" / "gppy" / "data" / "path.json").exists() else {}
    assert not any(re.search(r"password|token|secret", k) for k in (cfg.get("settings") or {}))


@pytest.mark.parametrize("pattern", ["GPPY_NATS_PASSWORD:", "GPPY_API_TOKEN:", "NATS_PASSWORD="])
def test_compose_never_puts_a_credential_value_in_the_environment(pattern):
    for f in [REPO / "compose.yaml", REPO / "compose.gpu.yaml", REPO / "deploy" / "compose.cluster.yaml",
              REPO / "deploy" / "nats" / "compose.users.yaml"]:
        if f.exists():
            assert pattern not in f.read_text(), (f, pattern)
