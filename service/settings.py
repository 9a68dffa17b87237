"""Service settings, read from SLIMSERVE_* environment variables (or passed in by tests)."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from model_store import ModelStore, open_store
from service.tensors import TensorLimits


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SLIMSERVE_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    #: serve management (/v1, repository, docs) on its own port; inference then refuses them
    management_port: int | None = Field(None, ge=1, le=65535)
    #: serve /metrics on its own port
    metrics_port: int | None = Field(None, ge=1, le=65535)
    #: the gRPC listener (Triton's GRPCInferenceService, grpc.health.v1, reflection) on the same host; 0: off
    grpc_port: int = Field(8001, ge=0, le=65535)
    #: on SIGTERM, how long in-flight requests may take to finish
    shutdown_timeout_s: float = Field(30.0, ge=0)
    #: the local store: catalog.db (SQLite), blobs/ and engines/ (TensorRT engine cache)
    data_dir: Path = Path("./data")
    #: SQLAlchemy URL; default: SQLite inside data_dir. PostgreSQL: postgresql+psycopg://user@host/db
    database_url: str | None = None
    #: the local blob directory (default: data_dir/blobs); with S3, the local read cache
    blob_dir: Path | None = None

    #: S3-compatible object storage for blobs (blob_dir then only caches reads)
    s3_bucket: str | None = None
    s3_prefix: str = ""
    s3_endpoint_url: str | None = None
    s3_region: str | None = None

    admin_token: SecretStr | None = None
    admin_token_file: Path | None = None
    inference_token: SecretStr | None = None
    inference_token_file: Path | None = None
    #: a file holding the database URL (it carries credentials: mount it from a Secret)
    database_url_file: Path | None = None

    max_upload_bytes: int = Field(512 * 1024 * 1024, ge=1024)
    max_infer_body_bytes: int = Field(256 * 1024 * 1024, ge=1024)
    #: elements in one input tensor of an inference request
    max_tensor_elements: int = Field(1 << 28, ge=1)
    #: elements in one BYTES (string) input tensor (each is a Python object in the server), and bytes in one element
    max_bytes_elements: int = Field(1 << 16, ge=1)
    max_bytes_element_len: int = Field(1 << 20, ge=1)
    #: request head (request line and headers) cap, and header-field count cap: 431 beyond them
    max_header_bytes: int = Field(64 * 1024, ge=1024)
    max_headers: int = Field(100, ge=4)
    #: a connection whose request headers are not complete this long after it opened (or after the first byte
    #: of a later request) is answered 408 and closed; one that sends nothing is closed
    header_timeout_s: float = Field(10.0, gt=0)
    #: an idle kept-alive connection is closed after this long
    keep_alive_timeout_s: float = Field(5.0, gt=0)
    #: compression jobs queued or running at once; more are refused with 429
    max_pending_jobs: int = Field(16, ge=1)

    #: defaults for models whose upload config does not say (a config may not exceed the server's limits)
    default_max_batch_size: int = Field(32, ge=0)
    default_instances: int = Field(1, ge=1, le=64)
    default_max_queue_size: int = Field(1024, ge=1)
    #: a model whose warm-up inference takes longer is refused (endless loops, compute bombs)
    warmup_timeout_s: float = Field(60.0, gt=0)
    #: ONNX Runtime intra-op threads per instance (0: the usable cores divided by the instances)
    intra_op_threads: int = Field(0, ge=0)
    #: a request whose predicted compute time is at most this runs on the event loop instead of an instance
    #: thread, when nothing is queued and an instance is idle (and the other conditions in service/scheduler.py);
    #: 0: never
    inline_max_us: int = Field(100, ge=0, le=1_000_000)
    #: the most TensorRT builder workspace a model's config may ask for (backend_options.workspace_bytes)
    max_workspace_bytes: int = Field(4 << 30, ge=1 << 20)

    #: how often (seconds) a replica polls the catalogue for changes made elsewhere (versions, variants, load
    #: state); a request that finds the catalogue ahead wakes the sync at once. Also a loading variant's Retry-After
    sync_interval_s: float = Field(2.0, gt=0)
    #: orphan blobs younger than this are left alone by the collector (and by the startup check): the grace
    #: protects an upload whose blob is written but whose catalogue row is not committed yet
    gc_grace_s: float = Field(300.0, ge=0)
    #: how often (seconds) each replica writes its traffic-policy counters to the catalogue and the decider
    #: evaluates promotion and rollback rules
    traffic_interval_s: float = Field(10.0, gt=0)
    #: shadow samples waiting to be mirrored to candidates; a sample offered to a full queue is dropped and counted
    shadow_queue_size: int = Field(256, ge=1, le=65536)
    #: uvicorn's log level
    log_level: str = "info"
    #: the event loop: "auto" (uvloop when installed, as uvicorn picks) or "asyncio" (the standard library's)
    event_loop: Literal["auto", "asyncio"] = "auto"

    #: job worker processes the server starts itself (0: run `slimserve worker` separately)
    job_workers: int = Field(1, ge=0, le=16)
    #: a job's lease; a worker that stops renewing it for this long is presumed dead
    job_lease_s: float = Field(30.0, ge=2.0)
    #: attempts before an interrupted job is failed instead of resumed
    job_max_attempts: int = Field(3, ge=1, le=20)
    #: the engine build targets the server's own job workers (and `slimserve worker`) claim builds for: auto (this
    #: machine's CPU and GPUs), none, or a comma-separated list of this machine's targets (backends/targets.py)
    worker_targets: str = "auto"
    #: build ONNX Runtime's offline-optimized CPU engine for onnxruntime-cpu variants (a model's config
    #: `cpu_engine` decides for its own variants); the plain model serves until the engine is built
    cpu_engines: bool = False

    @model_validator(mode="after")
    def _defaults(self) -> Settings:
        if self.grpc_port and self.grpc_port in (self.port, self.management_port, self.metrics_port):
            raise ValueError(f"SLIMSERVE_GRPC_PORT {self.grpc_port} is also an HTTP port: give gRPC its own (0: off)")
        if self.admin_token is None and self.admin_token_file is not None:
            self.admin_token = SecretStr(self.admin_token_file.read_text().strip())
        if self.inference_token is None and self.inference_token_file is not None:
            self.inference_token = SecretStr(self.inference_token_file.read_text().strip())
        if self.database_url is None and self.database_url_file is not None:
            self.database_url = self.database_url_file.read_text().strip()
        return self

    @property
    def tensor_limits(self) -> TensorLimits:
        return TensorLimits(self.max_tensor_elements, self.max_bytes_elements, self.max_bytes_element_len)

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'catalog.db').resolve()}"

    @property
    def resolved_blob_dir(self) -> Path:
        return (self.blob_dir or self.data_dir / "blobs").resolve()

    def threads_per_instance(self, instances: int) -> int:
        if self.intra_op_threads:
            return self.intra_op_threads
        return max(1, usable_cpus() // max(1, instances))

    def open_store(self) -> ModelStore:
        return open_store(
            self.resolved_database_url,
            self.resolved_blob_dir,
            self.s3_bucket,
            self.s3_prefix,
            self.s3_endpoint_url,
            self.s3_region,
        )


def usable_cpus(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """CPUs this process may use: the affinity mask (taskset / cgroup cpusets), capped by the cgroup's CPU quota
    (Kubernetes ``limits.cpu``), not the machine's count: threads beyond them only contend (or are throttled)."""
    try:
        cpus = max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_quota(cgroup_root)
    return cpus if quota is None else max(1, min(cpus, math.ceil(quota - 1e-9)))


def cgroup_cpu_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs' worth of time the cgroup may use per period (quota / period), or None without a limit.

    cgroup v2: ``cpu.max`` ("max 100000" or "150000 100000"); v1: ``cpu/cpu.cfs_quota_us`` (-1: none) over
    ``cpu/cpu.cfs_period_us`` (also looked for directly under ``root``)."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / max(1, int(period))
    except (OSError, ValueError):
        pass
    for folder in (root / "cpu", root / "cpu,cpuacct", root):
        try:
            quota_us = int((folder / "cpu.cfs_quota_us").read_text())
            period_us = int((folder / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return None if quota_us <= 0 else quota_us / max(1, period_us)
    return None
