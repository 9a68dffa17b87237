#!/usr/bin/env bash
# The Python packages the server needs that the lent GPU machine lacks (its image has numpy, onnx, httpx, h11,
# prometheus-client, rich, typer, uvloop, pytest, cuda-bindings...; docs/gpu.md), as CPython 3.12 x86-64 wheels
# in the folder .whl0 at the repository root (.gitignore has /.whl*/), for one `run` call that carries it.
# onnxruntime-gpu itself comes from ../shared/tools/ort-gpu-wheel.sh (.whl1 ... .whl5). Versions are this
# checkout's tested ones.
# Usage: bench/gpu_wheels.sh   (from the repository root; needs PyPI)
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
PACKAGES=(
  fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 httptools==0.9.0
  pydantic==2.14.4 pydantic_core==2.50.5 pydantic-settings==2.16.3 python-dotenv==1.2.4
  typing-inspection==0.4.5 annotated-types==0.8.0 python-multipart==0.0.34
  SQLAlchemy==2.1.9 greenlet==3.5.6 alembic==1.20.1 Mako==1.4.3 orjson==3.13.0
)
rm -rf .whl0
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 \
  -d .whl0 "${PACKAGES[@]}"
echo "ready: $(ls .whl0 | wc -l) wheels in .whl0 ($(du -sh .whl0 | cut -f1))"
