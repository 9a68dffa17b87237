"""The README's quickstart runs as written (server address substituted) against a real server."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import Server, ServerFactory
from tests.onnx_models import mlp

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


@pytest.fixture(scope="module")
def quick(server_factory: ServerFactory) -> Server:
    return server_factory()


def test_quickstart_curl_then_tritonclient(quick: Server, tmp_path: Path) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    (tmp_path / "model.onnx").write_bytes(mlp())
    bash = _blocks("bash")[1]  # the quickstart block (the first is set-up)
    commands = [c for c in re.split(r"\n(?!\s)", bash.replace("\\\n", " ")) if c.strip() and not c.startswith("#")]
    assert [c.split()[0] for c in commands] == ["curl", "curl"]
    for cmd in commands:
        cmd = cmd.replace("http://127.0.0.1:8000", quick.url)
        out = subprocess.run(shlex.split(cmd), cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and '"error"' not in out.stdout, (cmd, out.stdout, out.stderr)
    assert '"model_name":"mlp"' in out.stdout.replace(" ", "")

    for module, address in (("tritonclient.http", quick.url.removeprefix("http://")), ("tritonclient.grpc", None)):
        code = next(b for b in _blocks("python") if module in b)
        code = code.replace("127.0.0.1:8000", address) if address else code.replace("8001", str(quick.grpc_port))
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert out.stdout.count("[[") == 1  # printed the probabilities array
