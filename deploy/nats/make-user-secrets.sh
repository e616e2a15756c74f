#!/usr/bin/env bash
# Create one NATS password per service (never committed; deploy/secrets/* is git-ignored):
#   <dir>/nats_password_<service>   for watcher calib astrometry phot stack subtract
# Usage: deploy/nats/make-user-secrets.sh [DIR]   (default deploy/secrets, or $GPPY_SECRETS_DIR)
# Then: docker compose -f compose.yaml -f deploy/nats/compose.users.yaml up -d
# Existing files are kept. Mode 0640, group GPPY_GID (compose bind-mounts secrets as they are).
set -euo pipefail
cd "$(dirname "$0")/../.."
dir="${1:-${GPPY_SECRETS_DIR:-deploy/secrets}}"
gid="${GPPY_GID:-1000}"
mkdir -p "$dir"
for svc in watcher calib astrometry phot stack subtract; do
  f="$dir/nats_password_$svc"
  if [ -s "$f" ]; then echo "kept $f"; continue; fi
  umask 077
  od -An -tx1 -N24 /dev/urandom | tr -d ' \n' > "$f"   # hex: safe in nats.conf variables
  chmod 0640 "$f"
  chgrp "$gid" "$f" 2>/dev/null || chmod 0644 "$f"
  echo "wrote $f"
done
