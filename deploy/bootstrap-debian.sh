#!/usr/bin/env bash
# Make the base image `debian:bookworm-slim` available to the local Docker engine without a
# container registry: debootstrap a minimal Debian 12 from a Debian package mirror, trim it the
# way the official slim image is trimmed, and `docker import` it under the same name.
#
#   deploy/bootstrap-debian.sh            # build it unless the engine already has the image
#   deploy/bootstrap-debian.sh --force    # rebuild it even if present
#   deploy/bootstrap-debian.sh --try-pull # first try `docker pull` (sites that reach a registry)
#
# Environment: GPPY_DEBIAN_MIRROR (default http://deb.debian.org/debian; an internal mirror or
# apt proxy works too), GPPY_DEBIAN_SECURITY (default http://deb.debian.org/debian-security),
# GPPY_BASE_DEBIAN (image name, default debian:bookworm-slim). Needs root (debootstrap).
# Behind a TLS-intercepting proxy with an https mirror, install the proxy's CA into the host's
# /etc/ssl/certs first (update-ca-certificates); debootstrap uses the host's trust store.
set -euo pipefail

IMAGE="${GPPY_BASE_DEBIAN:-debian:bookworm-slim}"
MIRROR="${GPPY_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SECURITY="${GPPY_DEBIAN_SECURITY:-http://deb.debian.org/debian-security}"
SUITE=bookworm
force=0
try_pull=0
for arg in "$@"; do
  case "$arg" in
    --force) force=1 ;;
    --try-pull) try_pull=1 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "bootstrap-debian: unknown argument $arg" >&2; exit 2 ;;
  esac
done

log() { echo "bootstrap-debian: $*" >&2; }

if [ "$force" = 0 ] && docker image inspect "$IMAGE" >/dev/null 2>&1; then
  log "$IMAGE already present"
  exit 0
fi
if [ "$try_pull" = 1 ] && timeout 120 docker pull "$IMAGE"; then
  log "pulled $IMAGE"
  exit 0
fi

if [ "$(id -u)" != 0 ]; then
  log "debootstrap needs root"; exit 1
fi
if ! command -v debootstrap >/dev/null; then
  log "installing debootstrap"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null \
    || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null; }
fi

work="$(mktemp -d /var/tmp/gppy-debootstrap.XXXXXX)"
trap 'rm -rf --one-file-system "$work"' EXIT
root="$work/rootfs"
t0=$(date +%s)
log "debootstrap --variant=minbase $SUITE from $MIRROR"
debootstrap --variant=minbase "$SUITE" "$root" "$MIRROR" > "$work/debootstrap.log" 2>&1 \
  || { tail -30 "$work/debootstrap.log" >&2; log "debootstrap failed"; exit 1; }

# The trimming of the official slim image: no documentation, manual pages or locales are
# installed by later apt-get runs either, and apt keeps no package caches.
mkdir -p "$root/etc/dpkg/dpkg.cfg.d" "$root/etc/apt/apt.conf.d"
cat > "$root/etc/dpkg/dpkg.cfg.d/docker" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
EOF
cat > "$root/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
cat > "$root/etc/apt/apt.conf.d/docker-no-languages" <<'EOF'
Acquire::Languages "none";
EOF
cat > "$root/etc/apt/apt.conf.d/docker-gzip-indexes" <<'EOF'
Acquire::GzipIndexes "true";
EOF
cat > "$root/etc/apt/apt.conf.d/docker-autoremove-suggests" <<'EOF'
Apt::AutoRemove::SuggestsImportant "false";
EOF
rm -f "$root/etc/apt/sources.list"
mkdir -p "$root/etc/apt/sources.list.d"
cat > "$root/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $MIRROR
Suites: $SUITE $SUITE-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $SECURITY
Suites: $SUITE-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
find "$root/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete 2>/dev/null || true
find "$root/usr/share/doc" -mindepth 1 -type d -empty -delete 2>/dev/null || true
rm -rf "$root/usr/share/man/"* "$root/usr/share/info/"* "$root/usr/share/groff/"* \
       "$root/usr/share/lintian/"* "$root/var/cache/apt/"*.bin "$root/var/cache/apt/archives/"*.deb \
       "$root/var/lib/apt/lists/"* "$root/var/log/"*.log "$root/var/log/apt/"* "$root/tmp/"* \
       "$root/var/cache/debconf/"*-old "$root/var/lib/dpkg/"*-old
find "$root/usr/share/locale" -mindepth 1 -maxdepth 1 -not -name locale.alias -exec rm -rf {} + 2>/dev/null || true
: > "$root/etc/machine-id"
echo "$SUITE" > "$root/etc/hostname"

log "importing as $IMAGE"
tar --numeric-owner --xattrs -C "$root" -c . | docker import \
  --change 'CMD ["bash"]' \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --message "debootstrap --variant=minbase $SUITE ($MIRROR), slimmed by gppy deploy/bootstrap-debian.sh" \
  - "$IMAGE" >/dev/null
log "done in $(( $(date +%s) - t0 )) s: $(docker image inspect -f '{{.Id}} {{.Size}} bytes' "$IMAGE")"
