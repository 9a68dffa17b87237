"""Engine artifacts: packing is deterministic, unpacking refuses whatever could escape its folder or exhaust the
disk, and installing is atomic and idempotent."""

from __future__ import annotations

import io
import json
import tarfile
import threading
from pathlib import Path

import pytest

from backends.engine_artifacts import MANIFEST, ArtifactError, install, pack, read_manifest, unpack

MANIFEST_DATA = {"digest": "d" * 64, "key": {"builder": "onnxruntime-cpu"}, "load": "model.onnx"}


def _build_dir(root: Path) -> Path:
    src = root / "src"
    (src / "trt").mkdir(parents=True)
    (src / "model.onnx").write_bytes(b"graph")
    (src / "trt" / "a.engine").write_bytes(b"\x00" * 1000)
    return src


def test_round_trip_and_deterministic_bytes(tmp_path: Path) -> None:
    src = _build_dir(tmp_path)
    pack(src, MANIFEST_DATA, tmp_path / "a.tar")
    (src / "model.onnx").touch()  # a later mtime must not change the artifact
    pack(src, MANIFEST_DATA, tmp_path / "b.tar")
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
    assert read_manifest(tmp_path / "a.tar") == MANIFEST_DATA
    dest = tmp_path / "out"
    dest.mkdir()
    assert unpack(tmp_path / "a.tar", dest) == MANIFEST_DATA
    assert (dest / "model.onnx").read_bytes() == b"graph"
    assert (dest / "trt" / "a.engine").stat().st_size == 1000
    assert json.loads((dest / MANIFEST).read_text()) == MANIFEST_DATA


def test_pack_refuses_links_and_a_manifest_of_its_own(tmp_path: Path) -> None:
    src = _build_dir(tmp_path)
    (src / "link").symlink_to("/etc/passwd")
    with pytest.raises(ArtifactError, match="plain files"):
        pack(src, MANIFEST_DATA, tmp_path / "x.tar")
    (src / "link").unlink()
    (src / MANIFEST).write_text("{}")
    with pytest.raises(ArtifactError, match="written by pack"):
        pack(src, MANIFEST_DATA, tmp_path / "x.tar")


def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes]], manifest: dict | None = MANIFEST_DATA) -> Path:  # type: ignore[type-arg]
    with tarfile.open(path, "w") as tar:
        if manifest is not None:
            body = json.dumps(manifest).encode()
            info = tarfile.TarInfo(MANIFEST)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return path


def _file(name: str, data: bytes = b"x") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def _special(name: str, kind: bytes, target: str = "") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info, b""


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ([_file("../escape")], "unsafe member name"),
        ([_file("/etc/cron.d/x")], "unsafe member name"),
        ([_file("a/../../b")], "unsafe member name"),
        ([_file("a/b/c/d/e/f")], "unsafe member name"),
        ([_special("model.onnx", tarfile.SYMTYPE, "/etc/passwd")], "not a plain file"),
        ([_special("model.onnx", tarfile.LNKTYPE, "manifest.json")], "not a plain file"),
        ([_special("dev", tarfile.CHRTYPE)], "not a plain file"),
        ([_file("other.onnx")], "does not hold"),
    ],
)
def test_hostile_archives_are_refused_before_anything_is_written(
    tmp_path: Path, members: list[tuple[tarfile.TarInfo, bytes]], message: str
) -> None:
    archive = _tar(tmp_path / "bad.tar", members)
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(ArtifactError, match=message):
        unpack(archive, dest)
    assert list(dest.iterdir()) == []
    assert not (tmp_path / "escape").exists()


def test_size_count_manifest_and_compression_limits(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    dest.mkdir()
    big = _tar(tmp_path / "big.tar", [_file("model.onnx", b"x" * 5000)])
    with pytest.raises(ArtifactError, match="more than 4096 bytes"):
        unpack(big, dest, max_bytes=4096)
    many = _tar(tmp_path / "many.tar", [_file("model.onnx")] + [_file(f"f{i}") for i in range(1001)])
    with pytest.raises(ArtifactError, match="members"):
        unpack(many, dest)
    with pytest.raises(ArtifactError, match=f"no readable {MANIFEST}"):
        unpack(_tar(tmp_path / "none.tar", [_file("model.onnx")], manifest=None), dest)
    with pytest.raises(ArtifactError, match="naming the engine's key"):
        unpack(_tar(tmp_path / "nokey.tar", [_file("model.onnx")], manifest={"load": "model.onnx"}), dest)
    with tarfile.open(tmp_path / "gz.tar.gz", "w:gz") as tar:  # compressed archives are not engine artifacts
        info, data = _file("model.onnx")
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ArtifactError, match="not an engine artifact"):
        unpack(tmp_path / "gz.tar.gz", dest)
    assert list(dest.iterdir()) == []


def test_install_is_atomic_idempotent_and_safe_when_concurrent(tmp_path: Path) -> None:
    src = _build_dir(tmp_path)
    pack(src, MANIFEST_DATA, tmp_path / "a.tar")
    folder = tmp_path / "engines" / "onnxruntime-cpu" / ("d" * 64)
    results: list[object] = []

    def go() -> None:
        try:
            results.append(install(tmp_path / "a.tar", folder))
        except Exception as e:  # pragma: no cover - the assertion below shows it
            results.append(e)

    threads = [threading.Thread(target=go) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [MANIFEST_DATA] * 4
    assert (folder / "model.onnx").read_bytes() == b"graph"
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no temporary folders left behind
    (folder / "model.onnx").write_bytes(b"kept")  # installed once: a second install does not unpack again
    assert install(tmp_path / "a.tar", folder) == MANIFEST_DATA
    assert (folder / "model.onnx").read_bytes() == b"kept"


def test_a_folder_left_without_its_manifest_is_replaced(tmp_path: Path) -> None:
    src = _build_dir(tmp_path)
    pack(src, MANIFEST_DATA, tmp_path / "a.tar")
    folder = tmp_path / "engine"
    folder.mkdir()
    (folder / "partial").write_bytes(b"debris of an older release")
    assert install(tmp_path / "a.tar", folder) == MANIFEST_DATA
    assert not (folder / "partial").exists() and (folder / "model.onnx").exists()
