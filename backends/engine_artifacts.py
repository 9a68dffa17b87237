"""Engine artifacts: one engine's files as one blob (an uncompressed tar), and back into a folder.

Every builder ships the same layout: ``manifest.json`` (the engine key, the file to load, what the build measured)
plus the builder's files: ``model.ort`` or ``model.onnx`` (ONNX Runtime CPU), the TensorRT execution provider's
cache folder (``*.engine``, ``*.profile``, ``*.timing``), or ``engine.plan`` (native TensorRT). A folder is the
unit because the TRT EP's cache is one, and because a serving replica loads from files. The tar is
deterministic (sorted names, zero times, no owners), so two builds of the same bytes are the same blob.

The standard library's ``tarfile`` does the format; the checks around it are ours because an archive is only as
trustworthy as the store it came from: only plain files and folders, relative names without ``..``, a bounded
member count and size, and ``tarfile``'s own ``data`` filter on top. A folder is installed by unpacking into a
temporary sibling and renaming it into place, so a crash never leaves a half-unpacked engine where a loader looks.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tarfile
import tempfile
import uuid
from pathlib import Path, PurePosixPath
from typing import Any

MANIFEST = "manifest.json"
MAX_MEMBERS = 1000
MAX_DEPTH = 4
#: a cap on what one artifact may unpack to (the TRT EP cache of a large model is a few GiB at most)
DEFAULT_MAX_BYTES = 32 << 30


class ArtifactError(ValueError):
    """The archive is not an engine artifact this release can unpack safely."""


def pack(src: Path, manifest: dict[str, Any], out: Path) -> None:
    """Write ``src``'s files and ``manifest`` to the tar ``out``. Links and special files are refused."""
    files: list[tuple[str, Path]] = []
    for path in sorted(Path(src).rglob("*")):
        rel = path.relative_to(src).as_posix()
        if path.is_symlink() or not (path.is_file() or path.is_dir()):
            raise ArtifactError(f"{rel}: only plain files and folders go into an engine artifact")
        if path.is_file():
            if rel == MANIFEST:
                raise ArtifactError(f"{MANIFEST} is written by pack(), not taken from the build folder")
            files.append((_checked_name(rel), path))
    body = json.dumps(manifest, sort_keys=True, indent=1).encode()
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(_info(MANIFEST, len(body)), io.BytesIO(body))
        for name, path in files:
            with path.open("rb") as f:
                tar.addfile(_info(name, path.stat().st_size), f)


def _info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    info.mtime = 0
    return info


def _checked_name(name: str) -> str:
    p = PurePosixPath(name)
    if p.is_absolute() or not p.parts or ".." in p.parts or "\\" in name or len(p.parts) > MAX_DEPTH:
        raise ArtifactError(f"unsafe member name {name!r} in an engine artifact")
    return p.as_posix()


def read_manifest(archive: Path) -> dict[str, Any]:
    with _open(archive) as tar:
        return _manifest(tar)


def _open(archive: Path) -> tarfile.TarFile:
    try:
        return tarfile.open(archive, "r:")  # uncompressed only: no decompression bombs
    except (tarfile.TarError, OSError) as e:
        raise ArtifactError(f"not an engine artifact: {e}") from None


def _manifest(tar: tarfile.TarFile) -> dict[str, Any]:
    try:
        member = tar.getmember(MANIFEST)
        f = tar.extractfile(member)
        data = json.loads(f.read(1 << 20)) if f is not None else None
    except (KeyError, ValueError, tarfile.TarError) as e:
        raise ArtifactError(f"the engine artifact has no readable {MANIFEST}: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("key"), dict) or not isinstance(data.get("load"), str):
        raise ArtifactError(f"{MANIFEST} must be an object naming the engine's key and the file to load")
    _checked_name(data["load"])
    return data


def unpack(archive: Path, dest: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> dict[str, Any]:
    """Extract into the empty folder ``dest`` after checking every member; returns the manifest."""
    with _open(archive) as tar:
        members = tar.getmembers()
        if len(members) > MAX_MEMBERS:
            raise ArtifactError(f"the engine artifact has {len(members)} members, more than {MAX_MEMBERS}")
        total = 0
        for m in members:
            _checked_name(m.name)
            if not (m.isfile() or m.isdir()):
                raise ArtifactError(f"{m.name!r} is not a plain file or folder")
            total += m.size
            if total > max_bytes:
                raise ArtifactError(f"the engine artifact unpacks to more than {max_bytes} bytes")
        manifest = _manifest(tar)
        if manifest["load"] not in {m.name for m in members if m.isfile()} and not any(
            m.name.startswith(manifest["load"].rstrip("/") + "/") for m in members
        ):
            raise ArtifactError(f"{MANIFEST} names {manifest['load']!r}, which the artifact does not hold")
        tar.extractall(dest, members=members, filter="data")
    return manifest


def install(archive: Path, folder: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> dict[str, Any]:
    """Make ``folder`` hold the unpacked artifact (idempotent; concurrent installers are safe): unpack into a
    temporary sibling, then rename it into place. Returns the manifest."""
    folder = Path(folder)
    if (folder / MANIFEST).is_file():
        return json.loads((folder / MANIFEST).read_text())
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.{os.getpid()}.{uuid.uuid4().hex[:6]}."))
    try:
        manifest = unpack(archive, tmp, max_bytes)
        try:
            tmp.rename(folder)
        except OSError:
            if not (folder / MANIFEST).is_file():  # a folder without a manifest is debris: replace it
                shutil.rmtree(folder, ignore_errors=True)
                tmp.rename(folder)
        return manifest
    finally:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(tmp)
