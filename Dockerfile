# steinpix images (BuildKit; see docs/docker.md):
#
#   full (default target): steinpix with the real ilastik 1.3.3post3, the ilastik version in
#         steinbock's image, so that `--engine ilastik` inside the container gives steinbock's
#         files. linux/amd64 only (ilastik 1.3.3 has no arm64 Linux release).
#   slim: steinpix with the built-in engine only. linux/amd64 and linux/arm64.
#
#   docker build -t steinpix .
#   docker build --target slim -t steinpix:slim .
#   docker run --rm -u "$(id -u):$(id -g)" -v "$PWD:/data" steinpix classify ilastik run
#
# Offline builds (no registry, no PyPI; tests/docker_images.py builds the test images so) replace
# what is downloaded with local images:
#   --build-arg BASE_IMAGE=IMG     any Debian-like image with python3 -m venv (default below)
#   --build-arg WHEELS_IMAGE=IMG   an image with wheels in /wheels, plus
#   --build-arg PIP_NO_INDEX=1     so that pip installs only from them
#   --build-arg ILASTIK_IMAGE=IMG  an image with an unpacked ilastik in /opt/ilastik
#   --build-arg GUI_PACKAGES=      skip the apt install of the GUI libraries

ARG BASE_IMAGE=python:3.11-slim-bookworm
ARG WHEELS_IMAGE=no-wheels
ARG ILASTIK_IMAGE=ilastik-download

########## wheels for pip: none by default (pip uses PyPI) ##########

FROM scratch AS no-wheels
WORKDIR /wheels

FROM ${WHEELS_IMAGE} AS wheels

########## slim: steinpix and its built-in engine ##########

# hadolint ignore=DL3006
FROM ${BASE_IMAGE} AS slim

ARG UID=1000
ARG GID=1000
# pip's own settings, for RUN only (not kept in the image): e.g. PIP_NO_INDEX=1, PIP_INDEX_URL
ARG PIP_NO_INDEX
ARG PIP_INDEX_URL

ENV PYTHONDONTWRITEBYTECODE="1" \
    PYTHONUNBUFFERED="1" \
    PIP_NO_CACHE_DIR="1" \
    PIP_DISABLE_PIP_VERSION_CHECK="1" \
    LANG="C.UTF-8" \
    NUMBA_CACHE_DIR="/opt/numba-cache" \
    PATH="/opt/steinpix/bin:${PATH}"

RUN groupadd --gid "${GID}" steinpix \
    && useradd --uid "${UID}" --gid "${GID}" --create-home --shell /bin/bash steinpix \
    && mkdir /data \
    && chown steinpix:steinpix /data

COPY docker/steinpix-entrypoint /usr/local/bin/steinpix-entrypoint

# The build context (.dockerignore lets only the package sources and the example through) and
# the wheels are mounted, not copied, so neither stays in a layer. Running the built-in engine
# once on the example compiles its numba kernels into NUMBA_CACHE_DIR, so that containers start
# at once instead of compiling for half a minute; the cache is world-writable because numba only
# uses a cache folder it can write to, and containers run as any uid:gid. steinpix-entrypoint
# chooses the CPU that numba compiles for (not the build machine's: see the script), here and
# when a container runs. The libraries' own test suites (about 120 MB) are left out.
WORKDIR /tmp/steinpix/examples/imc-mock
RUN --mount=type=bind,target=/tmp/steinpix,rw \
    --mount=type=bind,from=wheels,source=/wheels,target=/tmp/wheels \
    python3 -m venv /opt/steinpix \
    && pip install --find-links /tmp/wheels /tmp/steinpix \
    && steinpix-entrypoint --version \
    && steinpix-entrypoint classify ilastik prepare --cropsize 50 --seed 1 -v WARNING > /dev/null \
    && steinpix-entrypoint classify ilastik run --ilp pretrained.ilp -v WARNING > /dev/null \
    && chmod -R a+rwX "${NUMBA_CACHE_DIR}" \
    && find /opt/steinpix/lib -type d -name tests -path "*/site-packages/*" -prune \
        -exec rm -rf {} +

# numeric, so that Kubernetes and others can tell it is not root
USER ${UID}:${GID}
WORKDIR /data
ENTRYPOINT ["steinpix-entrypoint"]

########## ilastik: download, check, unpack (this stage's layers stay out of the image) ##########

FROM debian:bookworm-slim AS ilastik-download

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

# hadolint ignore=DL3006
FROM ${ILASTIK_IMAGE} AS ilastik

########## full (default): slim plus ilastik and the libraries of its GUI ##########

FROM slim AS full

ARG UID=1000
ARG GID=1000
# X11 and OpenGL libraries that ilastik's bundled Qt loads for the GUI (`steinpix apps ilastik
# --docker`); headless runs need none of them
ARG GUI_PACKAGES="libdbus-1-3 libegl1 libfontconfig1 libfreetype6 libgl1 libglib2.0-0 libice6 \
libsm6 libx11-6 libx11-xcb1 libxcb-icccm4 libxcb-image0 libxcb-keysyms1 libxcb-randr0 \
libxcb-render-util0 libxcb-shape0 libxcb-xinerama0 libxcb-xkb1 libxcb1 libxcomposite1 \
libxcursor1 libxdamage1 libxext6 libxi6 libxkbcommon-x11-0 libxrandr2 libxrender1 libxss1 \
libxtst6"

USER root
# hadolint ignore=DL3008,SC2086
RUN if [ -n "${GUI_PACKAGES}" ]; then \
        apt-get update \
        && apt-get install -y --no-install-recommends ${GUI_PACKAGES} \
        && rm -rf /var/lib/apt/lists/*; \
    fi

COPY --from=ilastik /opt/ilastik /opt/ilastik

USER ${UID}:${GID}
