#!/usr/bin/env bash
# Build the wheel, install it in a clean virtualenv and import every package from outside the
# repository, so a file missing from the package cannot hide behind the working copy.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$root/.venv/bin/python" -m pip wheel -q --no-deps -w "$work/dist" "$root"
python3 -m venv "$work/venv"
whl=$(ls "$work"/dist/slimserve-*.whl)
"$work/venv/bin/pip" install -q "${whl}[cpu]"
cd "$work"
"$work/venv/bin/python" - <<'PY'
import importlib, pathlib
for name in ["service", "service.app", "service.routes.v2", "service.cli", "backends", "backends.onnxruntime_backend",
             "model_store", "compression", "compression.metrics", "service.grpc.server", "service.grpc.generate"]:
    mod = importlib.import_module(name)
    assert "site-packages" in str(pathlib.Path(mod.__file__)), (name, mod.__file__)
from service.app import create_app
from service.settings import Settings
create_app(Settings(data_dir=pathlib.Path("data")))
print("wheel-check: packages import from the installed wheel")
PY
"$work/venv/bin/slimserve" --help >/dev/null
"$work/venv/bin/python" -c 'import sys, zipfile
bad = [n for n in zipfile.ZipFile(sys.argv[1]).namelist() if n.startswith(("tests/", "deploy/", "bench/"))]
sys.exit(f"leaked into the wheel: {bad[:5]}" if bad else 0)' "$whl"
echo "wheel-check: ok"
