"""Blobs on S3-compatible object storage (AWS S3, MinIO, Ceph RGW...), through boto3.

A PUT of a whole object is atomic on S3: readers see the old object or the new one, never a part, so
content-addressed keys need no temp-and-rename dance. Reads go through a local cache directory (the
runtimes load files); cache files are written atomically too, and verified against their digest.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from model_store.blobs import (
    _CHUNK,
    BlobNotFound,
    BlobStore,
    check_digest,
    remove_stale_temporaries,
    sha256_bytes,
    temp_prefix,
)


class S3BlobStore(BlobStore):
    def __init__(
        self,
        bucket: str,
        cache_dir: Path,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str | None = None,
        client: Any = None,
    ) -> None:
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.cache = Path(cache_dir)
        self.cache.mkdir(parents=True, exist_ok=True)
        self._s3 = client or boto3.client(
            "s3",
            endpoint_url=endpoint_url,
            region_name=region,
            config=Config(retries={"max_attempts": 5, "mode": "standard"}),
        )

    def _key(self, digest: str) -> str:
        check_digest(digest)
        return f"{self.prefix}sha256/{digest[:2]}/{digest}"

    def put_file(self, path: Path, digest: str | None = None) -> str:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        actual = h.hexdigest()
        if digest is not None and digest != actual:
            raise ValueError("blob changed while it was being stored")
        if not self.exists(actual):
            self._s3.upload_file(str(path), self.bucket, self._key(actual))
        return actual

    def put_bytes(self, data: bytes) -> str:
        # One PUT from memory (atomic on S3): no temporary copy in the system temp directory, which a
        # crash would leave behind and nothing would clean up.
        actual = sha256_bytes(data)
        if not self.exists(actual):
            self._s3.put_object(Bucket=self.bucket, Key=self._key(actual), Body=data)
        return actual

    def local_path(self, digest: str) -> Path:
        key = self._key(digest)
        target = self.cache / digest
        if target.is_file():
            return target
        fd, tmp = tempfile.mkstemp(dir=self.cache, prefix="." + temp_prefix().replace("put-", "part-", 1))
        os.close(fd)
        try:
            try:
                self._s3.download_file(self.bucket, key, tmp)
            except Exception as e:
                if _is_missing(e):
                    raise BlobNotFound(digest) from None
                raise
            h = hashlib.sha256()
            with open(tmp, "rb") as f:
                while chunk := f.read(_CHUNK):
                    h.update(chunk)
            if h.hexdigest() != digest:
                raise OSError(f"blob {digest} is corrupt in the bucket (its bytes hash to {h.hexdigest()})")
            os.replace(tmp, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        return target

    def exists(self, digest: str) -> bool:
        try:
            self._s3.head_object(Bucket=self.bucket, Key=self._key(digest))
            return True
        except Exception as e:
            if _is_missing(e):
                return False
            raise

    def delete(self, digest: str) -> None:
        self._s3.delete_object(Bucket=self.bucket, Key=self._key(digest))
        with contextlib.suppress(FileNotFoundError):
            (self.cache / digest).unlink()

    def list_digests(self) -> Iterator[tuple[str, float]]:
        paginator = self._s3.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=f"{self.prefix}sha256/"):
            for obj in page.get("Contents", []):
                name = obj["Key"].rsplit("/", 1)[-1]
                with contextlib.suppress(ValueError):
                    yield check_digest(name), obj["LastModified"].timestamp()

    def cleanup_temporaries(self) -> int:
        return remove_stale_temporaries(self.cache.glob(".part-*"))


def _is_missing(e: Exception) -> bool:
    code = getattr(e, "response", {}).get("Error", {}).get("Code")
    return code in ("404", "NoSuchKey", "NotFound")
