# syntax=docker/dockerfile:1
#
# slimserve images. Two final targets (cpu is the default, last stage):
#
#   docker build --target cpu -t slimserve:0.1.0-cpu .
#   docker build --target gpu -t slimserve:0.1.0-gpu .
#
# (or scripts/build-image.sh, which also works with podman/buildah). Both run `slimserve serve` as an
# unprivileged user, listen on 0.0.0.0:8000 (HTTP) and 8001 (gRPC) and keep their store under
# /var/lib/slimserve (a volume).
# No model, variant or TensorRT engine is baked into an image: models are uploaded at run time and
# live in the store (local volume, or PostgreSQL + S3).
#
# The GPU target installs onnxruntime-gpu INSTEAD OF onnxruntime (the `gpu` extra, never `cpu`):
# with both installed the CUDA execution provider disappears.

ARG PYTHON_IMAGE=python:3.12-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04

# ---------------------------------------------------------------------------------------------------
# wheel: build the slimserve wheel from the source tree (pure Python, so one wheel serves both targets)
# ---------------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS wheel
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY . /src
RUN python3 -m pip wheel --no-deps --wheel-dir /dist /src \
    && python3 -c "import glob, sys; w = glob.glob('/dist/slimserve-*.whl'); sys.exit(len(w) != 1)"

# ---------------------------------------------------------------------------------------------------
# gpu-venv: slimserve[gpu,postgres,s3] (onnxruntime-gpu + tensorrt-cu13) on the CUDA base's Python 3.12
# ---------------------------------------------------------------------------------------------------
FROM ${CUDA_IMAGE} AS gpu-venv
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 DEBIAN_FRONTEND=noninteractive
ARG EXTRAS=gpu,postgres,s3
# tensorrt-cu13 on PyPI is a stub whose install fetches the real tensorrt-cu13-libs wheel from NVIDIA's
# index; name it as an extra index so pip takes the wheel directly (set to "" for a mirror that has it).
ARG NVIDIA_PIP_INDEX=https://pypi.nvidia.com
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
COPY --from=wheel /dist /dist
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN python3 -m venv /opt/slimserve \
    && whl="$(find /dist -name 'slimserve-*.whl')" \
    && /opt/slimserve/bin/pip install ${NVIDIA_PIP_INDEX:+--extra-index-url "${NVIDIA_PIP_INDEX}"} "${whl}[${EXTRAS}]" \
    && if /opt/slimserve/bin/pip show onnxruntime >/dev/null 2>&1; then \
         echo "onnxruntime (CPU) must not be installed next to onnxruntime-gpu" >&2; exit 1; fi \
    && /opt/slimserve/bin/python -c "import onnxruntime, service.app" \
    && /opt/slimserve/bin/pip uninstall --yes pip

# ---------------------------------------------------------------------------------------------------
# gpu: the GPU serving / worker image (CUDA 13 + cuDNN runtime from the base; needs the NVIDIA runtime)
# ---------------------------------------------------------------------------------------------------
FROM ${CUDA_IMAGE} AS gpu
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="slimserve" \
      org.opencontainers.image.description="KServe v2 inference server for compressed ONNX models (CUDA, TensorRT)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 slimserve \
    && useradd --system --no-log-init --uid 10001 --gid 10001 --home-dir /home/slimserve --create-home \
       --shell /usr/sbin/nologin slimserve \
    && install -d -o 10001 -g 10001 -m 0750 /var/lib/slimserve
COPY --from=gpu-venv /opt/slimserve /opt/slimserve
ENV PATH=/opt/slimserve/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    SLIMSERVE_HOST=0.0.0.0 \
    SLIMSERVE_PORT=8000 \
    SLIMSERVE_GRPC_PORT=8001 \
    SLIMSERVE_DATA_DIR=/var/lib/slimserve
WORKDIR /var/lib/slimserve
VOLUME ["/var/lib/slimserve"]
USER 10001:10001
EXPOSE 8000 8001
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os,sys,urllib.request as r; u='http://127.0.0.1:%s/v2/health/live' % os.environ.get('SLIMSERVE_PORT','8000'); sys.exit(0 if r.urlopen(u,timeout=4).status==200 else 1)"]
ENTRYPOINT ["slimserve"]
CMD ["serve"]
# ---------------------------------------------------------------------------------------------------
# cpu-venv: a virtualenv with slimserve[cpu,postgres,s3] (onnxruntime), built where pip may compile
# ---------------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS cpu-venv
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
ARG EXTRAS=cpu,postgres,s3
COPY --from=wheel /dist /dist
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN python3 -m venv /opt/slimserve \
    && whl="$(find /dist -name 'slimserve-*.whl')" \
    && /opt/slimserve/bin/pip install "${whl}[${EXTRAS}]" \
    && /opt/slimserve/bin/python -c "import onnxruntime, service.app" \
    && /opt/slimserve/bin/pip uninstall --yes pip

# ---------------------------------------------------------------------------------------------------
# cpu: the CPU serving image
# ---------------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS cpu
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="slimserve" \
      org.opencontainers.image.description="KServe v2 inference server for compressed ONNX models (CPU, ONNX Runtime)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 slimserve \
    && useradd --system --no-log-init --uid 10001 --gid 10001 --home-dir /home/slimserve --create-home \
       --shell /usr/sbin/nologin slimserve \
    && install -d -o 10001 -g 10001 -m 0750 /var/lib/slimserve
COPY --from=cpu-venv /opt/slimserve /opt/slimserve
ENV PATH=/opt/slimserve/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    SLIMSERVE_HOST=0.0.0.0 \
    SLIMSERVE_PORT=8000 \
    SLIMSERVE_GRPC_PORT=8001 \
    SLIMSERVE_DATA_DIR=/var/lib/slimserve
WORKDIR /var/lib/slimserve
VOLUME ["/var/lib/slimserve"]
USER 10001:10001
EXPOSE 8000 8001
# Liveness only (readiness waits for models; orchestrators probe /v2/health/ready themselves). Python's
# urllib, so no curl in the image; the health routes need no token and answer on every listener.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os,sys,urllib.request as r; u='http://127.0.0.1:%s/v2/health/live' % os.environ.get('SLIMSERVE_PORT','8000'); sys.exit(0 if r.urlopen(u,timeout=4).status==200 else 1)"]
ENTRYPOINT ["slimserve"]
CMD ["serve"]

