#!/usr/bin/env bash
# The issue-12 GPU check, as one command on the lent GPU machine (docs/gpu.md has the calls that carry the wheels):
#   1. what the machine has: GPUs, CUDA, TensorRT, ONNX Runtime and its providers, the build targets;
#   2. the GPU tests (markers gpu, tensorrt): CUDA and TensorRT backends, the engine build jobs and their artifacts;
#   3. bench/gpu_bench.py: fp32 vs fp16, the server's overhead, dynamic batching at concurrency 32, with the bars.
# Logs and numbers go to $OUT (the device tool's folder that comes back), else .bench/gpu. It stops at once, exit 2,
# saying what is missing, where there is no GPU or no onnxruntime-gpu.
# Usage: bash bench/gpu_check.sh            GPU_BENCH_SECONDS=8 by default (measurement time per point)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py="${PYTHON:-python3}"  # on the GPU machine: its python3 (PyTorch's), with /tmp/site first on the path
out="${OUT:-.bench/gpu}"
mkdir -p "$out"

"$py" - <<'PY' 2>&1 | tee "$out/environment.txt"
import json
import onnxruntime as ort
getattr(ort, "preload_dlls", lambda: None)()  # CUDA and cuDNN from the nvidia-* wheels, before any session
from backends import gpu, targets
print(json.dumps({**gpu.environment_report(), "targets": [t.id for t in targets.detect_targets()]}, indent=1))
PY
"$py" -c 'import sys; sys.path.insert(0, "bench"); import gpu_bench; p = gpu_bench.problem(); print("gpu_check:", p or "GPU and onnxruntime-gpu found"); sys.exit(2 if p else 0)' || exit 2

"$py" -m pytest --noconftest -p no:cacheprovider -m "gpu or tensorrt" tests/gpu -rs 2>&1 | tee "$out/gpu-tests.log"
tests_rc=${PIPESTATUS[0]}
"$py" bench/gpu_bench.py --seconds "${GPU_BENCH_SECONDS:-8}" --out "$out/gpu-bench.json" 2>&1 | tee "$out/gpu-bench.md"
bench_rc=${PIPESTATUS[0]}
echo "gpu_check: tests exit $tests_rc, bench exit $bench_rc"
exit $(( tests_rc != 0 || bench_rc != 0 ))
