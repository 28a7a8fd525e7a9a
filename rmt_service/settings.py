"""Service configuration: the one place that reads the environment (``RMT_*`` variables or .env).

The API and the worker both build a ``Settings`` and pass it down; nothing else reads os.environ.
"""
from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RMT_", env_file=".env", extra="ignore", allow_inf_nan=False)

    data_dir: Path = Field(Path("./data"), description="Blob volume (uploads, artifacts, bases) and the embedded SQLite.")
    database_url: str = Field(
        "",
        description="Records database (SQLAlchemy URL). Empty = SQLite file data_dir/rmt.sqlite; "
        "postgresql+psycopg://user:pass@host/db at scale.",
    )
    database_migrate: bool = Field(
        True, description="The API brings the database schema to head at start (under a database lock, so "
                          "replicas do not race); false where a one-shot `rmt migrate` step owns it.")
    database_lock_timeout_seconds: float = Field(
        5.0, description="Longest wait for a database lock; past it the request answers 503 (retryable) instead "
                         "of hanging behind a frozen process.")
    broker_url: str = Field(
        "",
        description="Celery broker. Empty = embedded local broker (SQLite under data_dir); "
        "redis://host:6379/0 at scale.",
    )
    min_free_bytes: int = Field(
        1024 * 1024 * 1024, ge=0,
        description="Free space the data volume keeps: below it /readyz answers 503 (creates, uploads and base "
                    "exports would soon fail with no space), so a balancer stops sending work before the disk fills.")
    api_keys: str = Field("", description="Comma-separated tenant:key pairs. Empty = no auth (loopback only).")
    api_keys_file: Path | None = Field(None, description="File with one tenant:key pair per line.")
    allow_insecure_bind: bool = Field(False, description="Allow binding a non-loopback address with no API keys.")

    # Upload limits
    max_upload_bytes: int = Field(200 * 1024 * 1024, gt=0, description="Cap on one create request's body.")
    max_files: int = Field(2000, gt=0, description="Cap on images per classifier.")
    max_image_bytes: int = Field(20 * 1024 * 1024, gt=0, description="Cap on one image file.")
    max_image_pixels: int = Field(40_000_000, gt=0, description="Decompression-bomb guard (width*height).")
    max_classes: int = Field(1000, gt=0, description="Cap on classes per classifier.")
    max_label_length: int = Field(100, gt=0, description="Cap on a label's length in characters.")
    max_request_pixels: int = Field(
        1_000_000_000, gt=0, description="Cap on the decoded pixels of all images of one create request together.")
    max_archive_members: int = Field(10_000, gt=0, description="Cap on the entries of an uploaded zip (files, "
                                                                  "folders and skipped metadata together).")
    max_classify_images: int = Field(64, gt=0, description="Cap on images in one classify request.")
    max_classify_pixels: int = Field(
        200_000_000, gt=0, description="Cap on the decoded pixels of all images of one classify request together.")
    max_tune_steps: int = Field(
        20_000, gt=0, description="Cap on one job's optimizer steps (epochs x batches, raised by min_steps); a "
                                  "create asking for more answers 422.")
    max_queued_jobs: int = Field(20, gt=0, description="Per-tenant cap on queued+running jobs (429 beyond).")

    # Tuning defaults (a create request's config overrides these)
    default_backbone: str = Field("rmt-world-vit", description="open_clip model name.")
    default_pretrained: str = Field("builtin", description="'builtin', a local checkpoint path, or an open_clip tag.")
    allowed_backbones: str = Field(
        "rmt-world-vit,rmt-tiny-vit,rmt-tiny-vit-wide",
        description="Comma-separated backbones a create request may choose (default_backbone is always allowed).")
    allowed_pretrained: str = Field(
        "builtin,none", description="Comma-separated pretrained values a create request may choose ('none' = "
                                    "random init; default_pretrained is always allowed). Checkpoint paths belong "
                                    "here only if the operator trusts them: the worker loads them.")
    prepare_default_base: bool = Field(
        True, description="A worker starting on a data directory that lacks the default backbone's shared base "
                          "exports it in the background, so the first create's preview does not wait for it.")
    device: str = Field("auto", description="Worker torch device: auto | cpu | cuda | cuda:N.")
    worker_threads: int = Field(
        0, ge=0, description="Threads one tuning job may use; 0 = the CPUs the worker process gets (affinity and "
                             "cgroup quota). Set it below the core count to leave cores to a co-located API.")

    # Jobs
    job_lease_seconds: int = Field(
        30, gt=0, description="A running job renews its lease every second; a lease expired on the database clock "
                        "means its worker is gone (crash, kill, freeze) and the job is recovered.")
    job_stall_grace_seconds: float | None = Field(
        None, gt=0, description="How long a running job rides out a records database it cannot write (stalled, "
                                "locked, failing over) before giving its work up. Empty = 3 leases. If its lease "
                                "expired meanwhile and no other worker took the job, the job carries on.")
    job_time_limit_seconds: int = Field(6 * 3600, gt=0, description="Hard limit for one tuning job.")
    job_max_attempts: int = Field(3, ge=1, description="Redeliveries after a worker crash before the job fails.")
    job_resend_seconds: float = Field(
        30.0, gt=0, description="A queued job no worker has started by then is sent to the broker again (a lost "
                          "message), then after 2x, 4x ... up to 10 minutes; duplicates are harmless.")
    job_retention_seconds: float = Field(
        7 * 86400.0, ge=0, description="Succeeded jobs are deleted this long after they finish (the classifier stays; "
                                 "failed and cancelled jobs stay with their classifier).")

    # Serving
    classifier_cache_size: int = Field(
        1000, ge=1, description="Most classifiers kept loaded (least recently used dropped first); "
                                "classifier_cache_bytes bounds them too.")
    classifier_cache_bytes: int = Field(
        4 << 30, gt=0, description="Most bytes the loaded classifiers hold beyond their shared bases (a ViT-B-32 "
                                   "r-amt classifier ~120 MB, a zero-shot or head-only one its head; the bases "
                                   "themselves are not counted).")
    serving_mode: str = Field(
        "baked", description="How loaded classifiers hold their masked weights: baked (multiplied in at load, "
                             "sessions of their own: the lowest latency, ~120 MB per ViT-B-32 r-amt classifier) "
                             "| jit (only the positions the mask drops, weights formed per call: ~6 MB each; "
                             "bench/RESULTS-multitenant.md) | auto (jit, and a classifier asked "
                             "serving_promote_after times within a minute is reloaded baked).")
    serving_precision: str = Field(
        "fp32", description="fp32 | int8: serve every classifier whose version passed the int8 guard at build "
                            "(argmax agreement with fp32 >= 99% and accuracy within 0.5 point on its own images, "
                            "recorded in the manifest's int8 field) in int8 (ONNX Runtime dynamic quantization; "
                            "the guard's versions only, the others fp32; an int8 classifier is baked whatever "
                            "serving_mode says).")
    int8_guard: bool = Field(
        True, description="Workers: run the int8 guard at the end of every build (the version may then serve "
                          "int8 where serving_precision=int8). It serves the new version on the CPU three times "
                          "over every image: on a GPU worker the largest part of a build (bench/RESULTS-build.md). "
                          "false: builds skip it, and their versions serve fp32 only.")
    serving_promote_after: int = Field(
        100, ge=1, description="serving_mode=auto: requests within a minute that make a JIT classifier baked.")
    ort_providers: str = Field("auto", description="auto | cpu | cuda")
    batch_max_size: int = Field(32, ge=1, description="Micro-batching: most images in one ORT call.")
    batch_max_wait_ms: float = Field(2.0, ge=0, le=1000, description="Micro-batching: longest wait for more requests.")

    @field_validator("serving_mode")
    @classmethod
    def _known_mode(cls, value: str) -> str:
        if value not in ("baked", "jit", "auto"):
            raise ValueError(f"serving_mode {value!r} must be baked, jit or auto")
        return value

    @field_validator("serving_precision")
    @classmethod
    def _known_precision(cls, value: str) -> str:
        if value not in ("fp32", "int8"):
            raise ValueError(f"serving_precision {value!r} must be fp32 or int8")
        return value

    @field_validator("data_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    def tenant_keys(self) -> dict[str, str]:
        """Map key -> tenant from api_keys and api_keys_file; raise ValueError on a malformed pair."""
        pairs = [p for p in self.api_keys.split(",") if p.strip()]
        if self.api_keys_file is not None:
            pairs += [line for line in self.api_keys_file.read_text().splitlines()
                      if line.strip() and not line.lstrip().startswith("#")]
        keys: dict[str, str] = {}
        for pair in pairs:
            tenant, sep, key = pair.strip().partition(":")
            if not sep or not tenant or not key:
                raise ValueError(f"RMT_API_KEYS entry {pair.strip()!r} is not tenant:key")
            keys[key] = tenant
        return keys

    def backbone_allow_list(self) -> list[str]:
        names = [n.strip() for n in self.allowed_backbones.split(",") if n.strip()]
        return list(dict.fromkeys([self.default_backbone, *names]))

    def pretrained_allow_list(self) -> list[str | None]:
        """Allowed ``pretrained`` values; None stands for 'none' (random init)."""
        names = [n.strip() for n in self.allowed_pretrained.split(",") if n.strip()]
        return list(dict.fromkeys([self.default_pretrained, *(None if n.lower() in ("none", "null") else n
                                                              for n in names)]))

    @property
    def stall_grace_seconds(self) -> float:
        return float(self.job_stall_grace_seconds or 3 * self.job_lease_seconds)

    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.data_dir / 'rmt.sqlite'}"

    @property
    def effective_broker_url(self) -> str:
        if self.broker_url:
            return self.broker_url
        return f"sqla+sqlite:///{self.data_dir / 'broker.sqlite'}"
