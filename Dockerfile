# syntax=docker/dockerfile:1
#
# steinpix with the real ilastik 1.3.3post3, the ilastik version in steinbock's image, so that
# `--engine ilastik` inside the container gives the same files as steinbock.
#
#   docker build -t steinpix .
#   docker run --rm -u "$(id -u):$(id -g)" -v "$PWD:/data" steinpix classify ilastik run
#
# See docs/ilastik-and-docker.md.

ARG PYTHON_VERSION=3.11

########## ilastik: download, check, unpack (this stage's layers stay out of the image) ##########

FROM debian:bookworm-slim AS ilastik

ARG ILASTIK_VERSION=1.3.3post3
ARG ILASTIK_URL=https://files.ilastik.org/ilastik-${ILASTIK_VERSION}-Linux.tar.bz2
# sha256 of the tarball. ilastik publishes no checksum for this release that we could find, so
# there is no default: the build prints the sha256 it computed and records it in
# /opt/ilastik/SHA256SUMS. With --build-arg ILASTIK_SHA256=<hex> the build fails on any other file.
ARG ILASTIK_SHA256=""

# Debian's stable packages, not pinned: pins of a stable release's security updates break builds
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends bzip2 ca-certificates curl \
    && rm -rf /var/lib/apt/lists/*

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

RUN curl -fsSL --retry 5 --retry-delay 10 -o /tmp/ilastik.tar.bz2 "${ILASTIK_URL}" \
    && actual="$(sha256sum /tmp/ilastik.tar.bz2 | cut -d ' ' -f 1)" \
    && echo "ilastik ${ILASTIK_VERSION} tarball sha256: ${actual}" \
    && if [ -n "${ILASTIK_SHA256}" ]; then \
           echo "${ILASTIK_SHA256}  /tmp/ilastik.tar.bz2" | sha256sum --check --strict -; \
       else \
           echo "WARNING: ILASTIK_SHA256 is not set; the tarball was not verified" >&2; \
       fi \
    && mkdir -p /opt/ilastik \
    && tar -xjf /tmp/ilastik.tar.bz2 -C /opt/ilastik --strip-components=1 --no-same-owner \
    && rm /tmp/ilastik.tar.bz2 \
    && echo "${actual}  ilastik-${ILASTIK_VERSION}-Linux.tar.bz2" > /opt/ilastik/SHA256SUMS \
    && test -x /opt/ilastik/run_ilastik.sh

########## steinpix ##########

FROM python:${PYTHON_VERSION}-slim-bookworm

ARG UID=1000
ARG GID=1000

ENV PYTHONDONTWRITEBYTECODE="1" \
    PYTHONUNBUFFERED="1" \
    PIP_NO_CACHE_DIR="1" \
    PIP_DISABLE_PIP_VERSION_CHECK="1" \
    LANG="C.UTF-8" \
    NUMBA_CACHE_DIR="/opt/numba-cache"

# X11 and OpenGL libraries that ilastik's bundled Qt loads for the GUI (`steinpix apps ilastik
# --docker`); headless runs need none of them
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        libdbus-1-3 libegl1 libfontconfig1 libfreetype6 libgl1 libglib2.0-0 libice6 libsm6 \
        libx11-6 libx11-xcb1 libxcb-icccm4 libxcb-image0 libxcb-keysyms1 libxcb-randr0 \
        libxcb-render-util0 libxcb-shape0 libxcb-xinerama0 libxcb-xkb1 libxcb1 libxcomposite1 \
        libxcursor1 libxdamage1 libxext6 libxi6 libxkbcommon-x11-0 libxrandr2 libxrender1 \
        libxss1 libxtst6 \
    && rm -rf /var/lib/apt/lists/*

COPY --from=ilastik /opt/ilastik /opt/ilastik

RUN groupadd --gid "${GID}" steinpix \
    && useradd --uid "${UID}" --gid "${GID}" --create-home --shell /bin/bash steinpix \
    && mkdir /data \
    && chown steinpix:steinpix /data

# .dockerignore lets only the package sources and the example through. Running the built-in
# engine once compiles its numba kernels into NUMBA_CACHE_DIR, so that containers start in about
# a second instead of compiling for half a minute; the cache is world-writable because numba
# only uses a cache folder it can write to, and containers run as any uid:gid.
COPY . /tmp/steinpix
WORKDIR /tmp/steinpix/examples/imc-mock
RUN pip install "/tmp/steinpix[docker]" \
    && steinpix --version \
    && steinpix classify ilastik prepare --cropsize 50 --seed 1 -v WARNING > /dev/null \
    && steinpix classify ilastik run --ilp pretrained.ilp -v WARNING > /dev/null \
    && chmod -R a+rwX "${NUMBA_CACHE_DIR}" \
    && rm -rf /tmp/steinpix

# numeric, so that Kubernetes and others can tell it is not root
USER ${UID}:${GID}
WORKDIR /data
ENTRYPOINT ["steinpix"]
