# syntax=docker/dockerfile:1
# The warmstart service image. Two variants from one file:
#
#   docker build -t warmstart:cpu .                                  # onnxruntime on CPU
#   docker build -t warmstart:gpu --build-arg VARIANT=gpu .          # CUDA base, onnxruntime-gpu, torch CUDA engine
#   docker build -t warmstart:train --build-arg VARIANT=train .      # + training's dependencies (torch, torchrun)
#   docker run -p 50051:50051 -p 9464:9464 -v "$PWD/models:/models:ro" warmstart:cpu
#
# The cpu and gpu images serve artifacts; they do not train (training's dependencies are not
# in them). The train image is the cpu one plus the `train` extra: the training Job
# (ops/kubernetes/training-job.yaml) runs torchrun in it. Put a model repository (`make run`
# leaves one in models/) on the /models volume.
#
# The build stages run the Makefile's install steps (`make install`): the same pip lines in
# the same order, with the service's extras only — tests/ops/test_dockerfile.py checks it.

ARG VARIANT=cpu
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# onnxruntime-gpu and torch's CUDA wheels need CUDA 12 with cuDNN 9 on the host driver.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

# --- bases: the Python the venv is built with is the Python it runs with --------------------
FROM ${PYTHON_IMAGE} AS base-cpu
ENV PYTHON=python3.11

FROM ${PYTHON_IMAGE} AS base-train
ENV PYTHON=python3.11

FROM ${CUDA_IMAGE} AS base-gpu
# Ubuntu 24.04's Python is 3.12 (pyproject.toml admits 3.11 and 3.12).
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
ENV PYTHON=python3

# --- build: a virtual environment holding warmstart and its runtime dependencies -------------
FROM base-cpu AS build-cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY protos/ protos/
COPY service/ service/
COPY training/ training/
RUN "$PYTHON" -m venv /opt/venv \
    && /opt/venv/bin/python -m pip install --quiet --upgrade pip \
    && /opt/venv/bin/python -m pip install --quiet "."

FROM base-gpu AS build-gpu
ARG TORCH_SPEC=torch==2.13.0
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY protos/ protos/
COPY service/ service/
COPY training/ training/
RUN "$PYTHON" -m venv /opt/venv \
    && /opt/venv/bin/python -m pip install --quiet --upgrade pip \
    && /opt/venv/bin/python -m pip install --quiet "${TORCH_SPEC}" \
    && /opt/venv/bin/python -m pip install --quiet ".[torch-engine]"

FROM base-train AS build-train
ARG TORCH_SPEC=torch==2.13.0
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY protos/ protos/
COPY service/ service/
COPY training/ training/
RUN "$PYTHON" -m venv /opt/venv \
    && /opt/venv/bin/python -m pip install --quiet --upgrade pip \
    && /opt/venv/bin/python -m pip install --quiet "${TORCH_SPEC}" \
    && /opt/venv/bin/python -m pip install --quiet ".[train]"

FROM build-${VARIANT} AS build

# --- runtime: the venv, a health probe, a non-root user ------------------------------------
FROM base-${VARIANT} AS runtime
ARG VARIANT
LABEL org.opencontainers.image.title="warmstart" \
      org.opencontainers.image.description="Few-shot recommendation adaptation service (gRPC + Prometheus metrics)" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.warmstart.variant="${VARIANT}"
RUN groupadd --system --gid 10001 warmstart \
    && useradd --system --uid 10001 --gid warmstart --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin warmstart \
    && mkdir -p /models \
    && chown warmstart:warmstart /models
COPY --from=build /opt/venv /opt/venv
COPY scripts/healthcheck.py /opt/warmstart/healthcheck.py
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    WARMSTART_MODEL_REPOSITORY=/models \
    WARMSTART_PORT=50051 \
    WARMSTART_METRICS_PORT=9464
VOLUME ["/models"]
USER 10001:10001
WORKDIR /opt/warmstart
EXPOSE 50051 9464
# grpc.health.v1 Check on the gRPC port: healthy once a model is loaded and warmed up.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "/opt/warmstart/healthcheck.py"]
# SIGTERM drains (in-flight requests finish within --grace-period-s); give `docker stop -t` more.
STOPSIGNAL SIGTERM
ENTRYPOINT ["python", "-m", "service.server"]
