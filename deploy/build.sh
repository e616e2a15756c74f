#!/usr/bin/env bash
# Build every image of the stack (the base first, then the six stage images on top of it),
# labelled with the version from pyproject.toml and the git revision of the source tree.
#   deploy/build.sh                 # all images
#   deploy/build.sh subtract        # one stage image (on the existing base)
#   GPPY_TAG=2025.06.1 deploy/build.sh
# Extra arguments after `--` go to `docker compose build` (e.g. -- --no-cache).
# Without registry access the Debian base is bootstrapped locally first.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(deploy/image-env.sh)"
if ! docker image inspect "${GPPY_DEBIAN_IMAGE:-debian:bookworm-slim}" >/dev/null 2>&1; then
  deploy/bootstrap-debian.sh
fi
services=()
while [ $# -gt 0 ]; do
  if [ "$1" = "--" ]; then shift; break; fi
  services+=("$1"); shift
done
# A stage built alone needs the base image of the same tag: build it first when it is missing.
base="${GPPY_IMAGE_PREFIX:-gppy-}base:${GPPY_TAG:-latest}"
if [ ${#services[@]} -gt 0 ] && [[ " ${services[*]} " != *" nats "* ]] \
   && ! docker image inspect "$base" >/dev/null 2>&1; then
  services=(nats "${services[@]}")
fi
export COMPOSE_BAKE="${COMPOSE_BAKE:-false}"   # no buildx plugin needed: Compose's own builder
exec docker compose "${COMPOSE_FILES[@]}" build "$@" "${services[@]}"
