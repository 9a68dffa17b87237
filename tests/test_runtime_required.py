"""A server installed without an ONNX Runtime flavour refuses to start and says what to install.

The missing package is simulated the way Python sees a missing package: a directory on PYTHONPATH whose
``onnxruntime/__init__.py`` raises ImportError shadows the installed one. Everything else is the real
command in a real subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, free_port

INSTALL = "pip install 'slimserve[cpu]'"


@pytest.fixture(scope="module")
def without_onnxruntime(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    hide = tmp_path_factory.mktemp("no-onnxruntime")
    (hide / "onnxruntime").mkdir()
    (hide / "onnxruntime" / "__init__.py").write_text("raise ImportError('No module named onnxruntime')\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLIMSERVE_")}
    env["PYTHONPATH"] = str(hide)
    env["COLUMNS"] = "200"
    return env


def _run(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


@pytest.mark.slow  # starts processes
def test_serve_refuses_to_start_and_names_the_install_command(
    without_onnxruntime: dict[str, str], tmp_path: Path
) -> None:
    data = tmp_path / "data"
    port = str(free_port())
    out = _run(["-m", "service.cli", "serve", "--port", port, "--data-dir", str(data)], without_onnxruntime, ROOT)
    text = out.stdout + out.stderr
    assert out.returncode == 2, text
    assert "cannot start" in text and "no ONNX Runtime is installed" in text, text
    assert INSTALL in text and "'slimserve[gpu]'" in text, text
    assert "Traceback" not in text, text
    assert not data.exists()  # refused before touching the store


@pytest.mark.slow  # starts processes
def test_worker_refuses_to_start_too(without_onnxruntime: dict[str, str], tmp_path: Path) -> None:
    env = {**without_onnxruntime, "SLIMSERVE_DATA_DIR": str(tmp_path / "data")}
    out = _run(["-m", "service.cli", "worker"], env, ROOT)
    text = out.stdout + out.stderr
    assert out.returncode == 2 and INSTALL in text and "Traceback" not in text, text


@pytest.mark.slow  # starts processes
def test_create_app_raises_a_setup_error(without_onnxruntime: dict[str, str], tmp_path: Path) -> None:
    code = (
        "from service.app import create_app\n"
        "from service.errors import SetupError\n"
        "from service.settings import Settings\n"
        "try:\n"
        f"    create_app(Settings(data_dir={str(tmp_path / 'data')!r}))\n"
        "except SetupError as e:\n"
        "    print('SetupError:', e)\n"
        "else:\n"
        "    print('started')\n"
    )
    out = _run(["-c", code], without_onnxruntime, ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("SetupError: no ONNX Runtime is installed") and INSTALL in out.stdout, out.stdout


def test_the_check_passes_where_onnxruntime_is_installed() -> None:
    """The check itself, in-process with the real onnxruntime: it passes and reports the version (every other
    test starts servers through it)."""
    from backends import require_onnxruntime

    version = require_onnxruntime()
    assert version and version[0].isdigit()
