#!/usr/bin/env bash
# Create the stack's secrets once (never committed; deploy/secrets/* is git-ignored):
#   <dir>/nats_password   the NATS user's password (services and NATS read it as a compose secret)
#   <dir>/api_token       the bearer token of the watcher's HTTP API
# Usage: deploy/make-secrets.sh [DIR]   (default deploy/secrets, or $GPPY_SECRETS_DIR)
# Existing files are kept. Compose (without Swarm) bind-mounts secret files as they are, so they
# must be readable by the pipeline user: mode 0640 with group GPPY_GID (default 1000).
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:-${GPPY_SECRETS_DIR:-deploy/secrets}}"
gid="${GPPY_GID:-1000}"
mkdir -p "$dir"
for name in nats_password api_token; do
  f="$dir/$name"
  if [ -s "$f" ]; then echo "kept $f"; continue; fi
  umask 077
  # hex only: safe in nats.conf variables and HTTP headers
  od -An -tx1 -N24 /dev/urandom | tr -d ' \n' > "$f"
  chmod 0640 "$f"
  chgrp "$gid" "$f" 2>/dev/null || chmod 0644 "$f"
  echo "wrote $f"
done
