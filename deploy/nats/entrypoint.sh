#!/bin/bash
# Start nats-server with deploy/nats/nats.conf (or the file given as GPPY_NATS_CONF).
# The password is read from the secret file (GPPY_NATS_PASSWORD_FILE, a compose secret) into
# the environment of the server process only; nats.conf refers to it as $NATS_PASSWORD.
set -euo pipefail
pw_file="${GPPY_NATS_PASSWORD_FILE:-/run/secrets/nats_password}"
if [ -z "${NATS_PASSWORD:-}" ]; then
  if [ ! -r "$pw_file" ]; then
    echo "gppy-nats: no password: $pw_file is missing or unreadable (see deploy/secrets/README.md)" >&2
    exit 1
  fi
  NATS_PASSWORD="$(tr -d '\r\n' < "$pw_file")"
fi
if [ -z "$NATS_PASSWORD" ]; then
  echo "gppy-nats: the password file $pw_file is empty" >&2
  exit 1
fi
export NATS_PASSWORD
# Per-service users (users.conf): NATS_PASSWORD_<SERVICE> from the secret
# nats_password_<service> next to the shared one; without it the service's user takes the
# shared password (its subject permissions still apply).
secrets_dir="$(dirname "$pw_file")"
for svc in watcher calib astrometry phot stack subtract; do
  var="NATS_PASSWORD_${svc^^}"
  if [ -z "${!var:-}" ]; then
    f="$secrets_dir/nats_password_$svc"
    if [ -r "$f" ] && [ -s "$f" ]; then
      printf -v "$var" '%s' "$(tr -d '\r\n' < "$f")"
    else
      printf -v "$var" '%s' "$NATS_PASSWORD"
    fi
  fi
  export "${var?}"
done
export NATS_USER="${GPPY_NATS_USER:-gppy}"
export NATS_SERVER_NAME="${NATS_SERVER_NAME:-$(hostname)}"
export NATS_MAX_FILE_STORE="${NATS_MAX_FILE_STORE:-20GB}"
# Cluster nodes (deploy/nats/cluster.conf): GPPY_NATS_ROUTES=host:port,host:port becomes the
# route list with the route user's credentials, in the server's environment only.
if [ -n "${GPPY_NATS_ROUTES:-}" ]; then
  routes=""
  IFS=',' read -ra hosts <<< "$GPPY_NATS_ROUTES"
  for h in "${hosts[@]}"; do
    h="${h// /}"
    [ -n "$h" ] && routes="${routes:+$routes, }nats://route:${NATS_PASSWORD}@${h#nats://}"
  done
  export NATS_ROUTES="[$routes]"
fi
exec nats-server -c "${GPPY_NATS_CONF:-/etc/gppy/nats.conf}" "$@"
