#!/usr/bin/env bash
# Print (for eval) the image labels' variables: GPPY_VERSION from pyproject.toml,
# GPPY_REVISION from git (with "-dirty" when the tree has uncommitted changes), GPPY_CREATED
# GPPY_SOURCE (git remote) and GPPY_CREATED (only if set: a timestamp would change every
# image on every build); values already set in the environment win. Also COMPOSE_FILES.
set -euo pipefail
cd "$(dirname "$0")/.."
version="${GPPY_VERSION:-$(sed -n 's/^version *= *"\(.*\)"/\1/p' pyproject.toml | head -1)}"
if [ -z "${GPPY_REVISION:-}" ]; then
  if rev="$(git rev-parse --short=12 HEAD 2>/dev/null)"; then
    if [ -n "$(git status --porcelain --untracked-files=no -- shared services deploy pyproject.toml 2>/dev/null)" ]; then
      rev="$rev-dirty"
    fi
  else
    rev=unknown
  fi
else
  rev="$GPPY_REVISION"
fi
source_url="${GPPY_SOURCE:-$(git config --get remote.origin.url 2>/dev/null || true)}"
printf 'export GPPY_VERSION=%q GPPY_REVISION=%q GPPY_CREATED=%q GPPY_SOURCE=%q\n' \
  "$version" "$rev" "${GPPY_CREATED:-}" "$source_url"
echo 'COMPOSE_FILES=(-f compose.yaml); if [ "${GPPY_GPU_STACK:-0}" = 1 ]; then COMPOSE_FILES+=(-f compose.gpu.yaml); fi'
