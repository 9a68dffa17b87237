"""Content-addressed artifact storage.

Blobs are immutable and named by the sha256 of their bytes. A write goes to a temporary file in the
same directory, is fsynced, then renamed into place (and the directory fsynced), so a crash at any
moment leaves either no blob or the whole blob visible, never a torn one.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import socket
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from pathlib import Path

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1 << 20


class BlobNotFound(KeyError):
    """No blob with that digest exists."""


def check_digest(digest: str) -> str:
    """Return ``digest`` if it is a lowercase sha256 hex string; raise ValueError otherwise.

    Digests become path components, so this is the path check for every blob operation.
    """
    if not _SHA256.match(digest):
        raise ValueError(f"not a sha256 digest: {digest!r}")
    return digest


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class BlobStore(ABC):
    """Where artifacts live at rest. Implementations: local directory, S3-compatible storage."""

    @abstractmethod
    def put_file(self, path: Path, digest: str | None = None) -> str:
        """Store the file at ``path`` (read, not moved) and return its sha256."""

    def put_bytes(self, data: bytes) -> str:
        with tempfile.NamedTemporaryFile(delete=False) as tmp:
            tmp.write(data)
        try:
            return self.put_file(Path(tmp.name), sha256_bytes(data))
        finally:
            os.unlink(tmp.name)

    @abstractmethod
    def local_path(self, digest: str) -> Path:
        """A local file holding the blob (downloaded to a cache first for remote stores)."""

    def get_bytes(self, digest: str) -> bytes:
        return self.local_path(digest).read_bytes()

    @abstractmethod
    def exists(self, digest: str) -> bool: ...

    @abstractmethod
    def delete(self, digest: str) -> None: ...

    @abstractmethod
    def list_digests(self) -> Iterator[tuple[str, float]]:
        """Yield (digest, modification time) of every stored blob."""

    def cleanup_temporaries(self) -> int:
        """Remove leftovers of interrupted writes; return how many were removed."""
        return 0


class LocalBlobStore(BlobStore):
    """Blobs under ``root/sha256/ab/abcdef...``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._blobs = self.root / "sha256"
        self._tmp = self.root / "tmp"
        self._blobs.mkdir(parents=True, exist_ok=True)
        self._tmp.mkdir(parents=True, exist_ok=True)

    def _path(self, digest: str) -> Path:
        check_digest(digest)
        return self._blobs / digest[:2] / digest

    def put_file(self, path: Path, digest: str | None = None) -> str:
        # Copy through a temp file while hashing: the digest is computed from the bytes actually
        # written, so a caller-supplied digest can never name a blob with other contents.
        fd, tmp_name = tempfile.mkstemp(dir=self._tmp, prefix=temp_prefix())
        h = hashlib.sha256()
        try:
            with os.fdopen(fd, "wb") as out, open(path, "rb") as src:
                while chunk := src.read(_CHUNK):
                    h.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            actual = h.hexdigest()
            if digest is not None and digest != actual:
                raise ValueError("blob changed while it was being stored")
            return self._commit(tmp_name, actual)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)
            raise

    def put_bytes(self, data: bytes) -> str:
        # Straight into the store's own temp directory (not the system one, as the generic version
        # does): a crash mid-write leaves a temporary that the startup check removes, never a stray
        # full copy of the model in /tmp. It also writes the bytes once instead of twice.
        fd, tmp_name = tempfile.mkstemp(dir=self._tmp, prefix=temp_prefix())
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            return self._commit(tmp_name, sha256_bytes(data))
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)
            raise

    def _commit(self, tmp_name: str, digest: str) -> str:
        final = self._path(digest)
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():
            os.unlink(tmp_name)
        else:
            _crash_point("blob-temp-written")
            os.replace(tmp_name, final)
            _fsync_dir(final.parent)
            _crash_point("blob-renamed")
        return digest

    def local_path(self, digest: str) -> Path:
        p = self._path(digest)
        if not p.is_file():
            raise BlobNotFound(digest)
        return p

    def exists(self, digest: str) -> bool:
        return self._path(digest).is_file()

    def delete(self, digest: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(digest).unlink()

    def list_digests(self) -> Iterator[tuple[str, float]]:
        for sub in self._blobs.iterdir():
            if not sub.is_dir():
                continue
            for f in sub.iterdir():
                if _SHA256.match(f.name):
                    yield f.name, f.stat().st_mtime

    def cleanup_temporaries(self) -> int:
        return remove_stale_temporaries(self._tmp.iterdir())

    def spool_dir(self) -> Path:
        """A directory on the same filesystem for callers that stage uploads."""
        return self._tmp


#: Test-only crash points (tests/hardening/test_crash.py): ``SLIMSERVE_TEST_CRASH_POINT=blob-temp-written``
#: (a temporary is complete and fsynced, not renamed) or ``blob-renamed`` (the blob is in place, no catalogue row
#: names it yet) makes a write stop there, so that a SIGKILL lands at that exact point on every run. Read once
#: at import; unset in production, where the check is one string comparison per blob write (uploads and jobs,
#: never inference).
_CRASH_POINT = os.environ.get("SLIMSERVE_TEST_CRASH_POINT", "")
_CRASH_POINT_HOLD_S = 120.0


def _crash_point(name: str) -> None:
    if name == _CRASH_POINT:
        time.sleep(_CRASH_POINT_HOLD_S)  # the test kills the process meanwhile; if it does not, carry on


crash_point = _crash_point  # for other layers' crash points (compression.optimize.search)


_HOST = socket.gethostname().replace("-", "_")
#: a temporary whose writer cannot be checked (another host) is presumed abandoned after this long
STALE_TEMP_S = 3600.0


def temp_prefix() -> str:
    """Temporaries carry their writer's host and pid, so cleanup never removes a live writer's file."""
    return f"put-{_HOST}-{os.getpid()}-"


def remove_stale_temporaries(paths: Iterable[Path]) -> int:
    """Remove temporaries whose writer is gone (same host, dead pid) or that are older than STALE_TEMP_S."""
    n = 0
    now = time.time()
    for f in paths:
        parts = f.name.split("-")
        live = False
        if len(parts) >= 4 and parts[0] in ("put", ".part") and parts[1] == _HOST and parts[2].isdigit():
            live = _pid_alive(int(parts[2]))
        try:
            if live and now - f.stat().st_mtime < STALE_TEMP_S:
                continue
            f.unlink()
            n += 1
        except FileNotFoundError:
            pass
    return n


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
