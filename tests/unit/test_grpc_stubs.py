"""The committed gRPC stubs are exactly what service/grpc/generate.py makes from the committed protos."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.grpc import generate


def test_stubs_regenerate_byte_for_byte(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools", reason="grpcio-tools (the test extra) is not installed")
    fresh = {p.name: p.read_bytes() for p in generate.generate(tmp_path)}
    committed = {p.name: p.read_bytes() for p in generate.OUT.iterdir() if p.suffix in (".py", ".pyi")}
    assert sorted(fresh) == sorted(committed)
    stale = [name for name, data in fresh.items() if committed[name] != data]
    assert not stale, f"regenerate with `python -m service.grpc.generate`: {stale} differ"


def test_stubs_import_as_a_package_beside_tritonclients_own() -> None:
    pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is not installed")
    import tritonclient.grpc.service_pb2 as theirs  # registers Triton's (older) protos in the default pool

    from service.grpc._generated import grpc_service_pb2, grpc_service_pb2_grpc  # noqa: F401 - imports in the package

    assert theirs.ModelInferRequest is not grpc_service_pb2.ModelInferRequest
    wire = theirs.ModelInferRequest(model_name="m", id="x").SerializeToString()
    assert grpc_service_pb2.ModelInferRequest.FromString(wire).id == "x"  # one wire format
    assert "protos/grpc_service.proto" not in grpc_service_pb2.DESCRIPTOR.name  # registered as Triton names it
