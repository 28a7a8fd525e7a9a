"""The JSON-file ClassifierStore as it was before the records database (kept verbatim, test fixture only):

Everything durable lives under one data directory::

    <root>/classifiers/<classifier_id>/classifier.json   who owns it, name, labels, requested config
                                      /uploads/00000.png  the images, under generated names
                                      /uploads.json       [{file, label, original_name}]
                                      /model/             the published artifacts (manifest.json, model.onnx, ...)
    <root>/jobs/<job_id>.json                             job record: status, progress, lease, error
    <root>/jobs/<job_id>.lock                             flock for read-modify-write of that record
    <root>/tmp/                                           staging; renamed into place when complete

Every file is written to a temporary name and renamed, and a classifier (uploads) or a model directory
appears by one ``rename`` of a complete directory, so a reader never sees half of anything. Ids are
generated here and checked against a strict pattern before they touch a path, so user input never
becomes a path. A record carries its tenant; lookups with another tenant answer ``None`` (the API's
404), so one tenant cannot even learn that another's id exists.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import re
import secrets
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
ACTIVE_STATUSES = ("queued", "running")
TERMINAL_STATUSES = ("succeeded", "failed", "cancelled")

_CLASSIFIER_ID = re.compile(r"^clf_[0-9a-f]{24}$")
_JOB_ID = re.compile(r"^job_[0-9a-f]{24}$")
_UPLOAD_EXT = re.compile(r"^\.[a-z0-9]{1,5}$")
ARTIFACT_NAMES = ("manifest.json", "report.json", "model.onnx", "mask.rmtm", "confusion.png", "curve.png")


def new_classifier_id() -> str:
    return "clf_" + secrets.token_hex(12)


def new_job_id() -> str:
    return "job_" + secrets.token_hex(12)


def is_classifier_id(value: str) -> bool:
    return bool(_CLASSIFIER_ID.match(value or ""))


def is_job_id(value: str) -> bool:
    return bool(_JOB_ID.match(value or ""))


@dataclass
class Sample:
    """One upload to store: validated bytes, its label, and the extension of its real format."""
    data: bytes
    label: str
    ext: str = ".img"
    original_name: str = ""


class _Record:
    """JSON round trip for the store's records; unknown keys (from a newer version) are ignored."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]):
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


def _read_owned(record_cls, path: Path, tenant: str | None):
    """The record at ``path``, or None when it is missing or belongs to another tenant."""
    values = _read_json(path)
    if values is None:
        return None
    record = record_cls.from_dict(values)
    return None if tenant is not None and record.tenant != tenant else record


@dataclass
class ClassifierRecord(_Record):
    classifier_id: str
    tenant: str
    job_id: str
    name: str
    labels: list[str]
    config: dict[str, Any]
    n_images: int
    created_at: float


@dataclass
class JobRecord(_Record):
    """A tuning job. ``lease_*`` is renewed by the worker running it; an expired lease means the worker died."""
    job_id: str
    classifier_id: str
    tenant: str
    status: str = "queued"
    progress: dict[str, Any] | None = None
    error: dict[str, str] | None = None
    created_at: float = 0.0
    enqueued_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    updated_at: float = 0.0
    attempts: int = 0
    lease_owner: str | None = None
    lease_expires_at: float | None = None
    cancel_requested: bool = False

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES

    def request_cancel(self) -> bool:
        """A store.update_job mutation: a queued job ends now, a running one is asked to stop."""
        if self.is_terminal:
            return False
        self.cancel_requested = True
        if self.status == "queued":
            self.status, self.finished_at = "cancelled", time.time()
        return True

    def lease_expired(self, now: float | None = None) -> bool:
        return self.lease_expires_at is None or self.lease_expires_at <= (time.time() if now is None else now)


class StoreError(RuntimeError):
    """The data directory is not in the state an operation needs (missing classifier, double publish)."""


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary sibling, fsync, rename: readers see the old file or the new one, never a mix."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_json_atomic(path: Path, obj: Any) -> None:
    write_bytes_atomic(path, json.dumps(obj, indent=1, ensure_ascii=False).encode("utf-8"))


def _read_json(path: Path) -> Any | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None


class ClassifierStore:
    """The data directory: classifiers (uploads + published model) and job records."""

    def __init__(self, root: Path | str):
        self.root = Path(root).resolve()
        self.classifiers_dir = self.root / "classifiers"
        self.jobs_dir = self.root / "jobs"
        self.tmp_dir = self.root / "tmp"
        for d in (self.classifiers_dir, self.jobs_dir, self.tmp_dir):
            d.mkdir(parents=True, exist_ok=True)

    # ---------------------------------------------------------------- paths
    def classifier_dir(self, classifier_id: str) -> Path:
        if not is_classifier_id(classifier_id):
            raise StoreError(f"{classifier_id!r} is not a classifier id")
        return self.classifiers_dir / classifier_id

    def _job_path(self, job_id: str) -> Path:
        if not is_job_id(job_id):
            raise StoreError(f"{job_id!r} is not a job id")
        return self.jobs_dir / f"{job_id}.json"

    def model_dir(self, classifier_id: str) -> Path | None:
        """The published artifact directory, or None until the job has published one."""
        if not is_classifier_id(classifier_id):
            return None
        path = self.classifiers_dir / classifier_id / "model"
        return path if (path / "manifest.json").is_file() else None

    def artifact_path(self, classifier_id: str, name: str) -> Path | None:
        """A published artifact by its fixed name (never a user path), or None."""
        model = self.model_dir(classifier_id)
        if model is None or name not in ARTIFACT_NAMES:
            return None
        path = model / name
        return path if path.is_file() else None

    # ---------------------------------------------------------------- classifiers
    def create_classifier(self, tenant: str, name: str, samples: list[Sample], config: dict[str, Any],
                          now: float | None = None) -> tuple[ClassifierRecord, JobRecord]:
        """Store validated uploads and a queued job; the classifier appears all at once or not at all."""
        if not samples:
            raise StoreError("a classifier needs images")
        now = time.time() if now is None else now
        classifier_id, job_id = new_classifier_id(), new_job_id()
        labels = sorted({s.label for s in samples})
        record = ClassifierRecord(classifier_id=classifier_id, tenant=tenant, job_id=job_id, name=name,
                                  labels=labels, config=config, n_images=len(samples), created_at=now)
        job = JobRecord(job_id=job_id, classifier_id=classifier_id, tenant=tenant, status="queued",
                        created_at=now, enqueued_at=now, updated_at=now)
        staging = Path(self._new_tmp_dir("create"))
        try:
            uploads = staging / "uploads"
            uploads.mkdir()
            index = []
            for i, sample in enumerate(samples):
                ext = sample.ext.lower() if _UPLOAD_EXT.match(sample.ext.lower()) else ".img"
                filename = f"{i:05d}{ext}"
                with open(uploads / filename, "wb") as fh:
                    fh.write(sample.data)
                    fh.flush()
                    os.fsync(fh.fileno())
                index.append({"file": filename, "label": sample.label, "original_name": sample.original_name[:255]})
            write_json_atomic(staging / "uploads.json", index)
            write_json_atomic(staging / "classifier.json", record.to_dict())
            # The job record first: a worker that finds a job whose classifier is missing fails it cleanly,
            # while a classifier without a job record would have no status at all.
            write_json_atomic(self._job_path(job_id), job.to_dict())
            os.rename(staging, self.classifier_dir(classifier_id))
            _fsync_dir(self.classifiers_dir)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            self._remove_job(job_id)
            raise
        return record, job

    def get_classifier(self, classifier_id: str, tenant: str | None = None) -> ClassifierRecord | None:
        """The record, or None if the id is unknown, malformed, or belongs to another tenant."""
        if not is_classifier_id(classifier_id):
            return None
        return _read_owned(ClassifierRecord, self.classifiers_dir / classifier_id / "classifier.json", tenant)

    def list_classifiers(self, tenant: str | None, limit: int = 50, offset: int = 0
                         ) -> tuple[list[ClassifierRecord], int]:
        """A tenant's classifiers, newest first, and their total count."""
        records = []
        for path in self.classifiers_dir.iterdir():
            if not is_classifier_id(path.name):
                continue
            record = self.get_classifier(path.name, tenant)
            if record is not None:
                records.append(record)
        records.sort(key=lambda r: (r.created_at, r.classifier_id), reverse=True)
        return records[offset:offset + limit], len(records)

    def samples(self, classifier_id: str) -> list[tuple[Path, str]]:
        """(stored image path, label) pairs for the tuning pipeline."""
        directory = self.classifier_dir(classifier_id)
        index = _read_json(directory / "uploads.json")
        if index is None:
            raise StoreError(f"classifier {classifier_id} has no uploads (deleted?)")
        return [(directory / "uploads" / item["file"], item["label"]) for item in index]

    def delete_classifier(self, classifier_id: str) -> bool:
        """Remove a classifier, its uploads, artifacts and job record; False if it did not exist."""
        record = self.get_classifier(classifier_id)
        if record is None:
            return False
        trash = self.tmp_dir / f"deleted-{classifier_id}-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(self.classifier_dir(classifier_id), trash)  # gone for readers in one step
        except FileNotFoundError:
            return False
        self._remove_job(record.job_id)
        shutil.rmtree(trash, ignore_errors=True)
        return True

    # ---------------------------------------------------------------- building and publishing
    def _new_tmp_dir(self, kind: str) -> str:
        path = self.tmp_dir / f"{kind}-{uuid.uuid4().hex}"
        path.mkdir()
        return str(path)

    def new_build_dir(self, classifier_id: str) -> Path:
        """An empty staging directory on the same filesystem as the classifier (so publish is a rename)."""
        self.classifier_dir(classifier_id)  # validates the id
        return Path(self._new_tmp_dir(f"build-{classifier_id}"))

    def publish(self, classifier_id: str, build_dir: Path) -> Path:
        """Move a complete build directory into place as the classifier's model, atomically.

        Raises StoreError if the classifier was deleted meanwhile or already has a model (the caller
        keeps the published one: publishing is idempotent by refusing to replace).
        """
        build_dir = Path(build_dir)
        if build_dir.parent != self.tmp_dir:
            raise StoreError(f"{build_dir} is not a build directory of this store")
        if not (build_dir / "manifest.json").is_file():
            raise StoreError(f"{build_dir} has no manifest.json; refusing to publish an incomplete build")
        target = self.classifier_dir(classifier_id) / "model"
        if not target.parent.is_dir():
            raise StoreError(f"classifier {classifier_id} no longer exists")
        for path in build_dir.iterdir():
            if path.is_file():
                with open(path, "rb") as fh:
                    os.fsync(fh.fileno())
        try:
            os.rename(build_dir, target)  # fails if target exists and is not empty
        except OSError as exc:
            if target.exists():
                raise StoreError(f"classifier {classifier_id} already has a published model") from exc
            raise StoreError(f"could not publish classifier {classifier_id}: {exc}") from exc
        _fsync_dir(target.parent)
        return target

    def discard(self, build_dir: Path) -> None:
        if Path(build_dir).parent == self.tmp_dir:
            shutil.rmtree(build_dir, ignore_errors=True)

    def cleanup_tmp(self, older_than_s: float, now: float | None = None) -> int:
        """Remove staging directories left by crashed processes; returns how many."""
        now = time.time() if now is None else now
        removed = 0
        for path in self.tmp_dir.iterdir():
            with contextlib.suppress(FileNotFoundError):
                if now - path.stat().st_mtime > older_than_s:
                    if path.is_dir():
                        shutil.rmtree(path, ignore_errors=True)
                    else:
                        path.unlink()
                    removed += 1
        return removed

    # ---------------------------------------------------------------- jobs
    def get_job(self, job_id: str, tenant: str | None = None) -> JobRecord | None:
        if not is_job_id(job_id):
            return None
        return _read_owned(JobRecord, self._job_path(job_id), tenant)

    @contextlib.contextmanager
    def _job_lock(self, job_id: str) -> Iterator[None]:
        lock_path = self._job_path(job_id).with_suffix(".lock")
        with open(lock_path, "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def update_job(self, job_id: str, mutate: Callable[[JobRecord], Any]) -> JobRecord | None:
        """Read-modify-write a job record under its lock: a compare-and-set between the API and workers.

        ``mutate`` changes the record in place; if it returns False the record is left as it was.
        Returns the record as stored afterwards, or None if the job does not exist.
        """
        path = self._job_path(job_id)
        if not path.exists():
            return None
        with self._job_lock(job_id):
            values = _read_json(path)
            if values is None:  # deleted while we waited for the lock
                return None
            job = JobRecord.from_dict(values)
            if mutate(job) is False:
                return job
            job.updated_at = time.time()
            write_json_atomic(path, job.to_dict())
            return job

    def iter_jobs(self, statuses: tuple[str, ...] | None = None, tenant: str | None = None) -> Iterator[JobRecord]:
        for path in self.jobs_dir.glob("job_*.json"):
            job = self.get_job(path.stem)
            if job is None:
                continue
            if statuses is not None and job.status not in statuses:
                continue
            if tenant is not None and job.tenant != tenant:
                continue
            yield job

    def count_active_jobs(self, tenant: str | None = None) -> int:
        return sum(1 for _ in self.iter_jobs(ACTIVE_STATUSES, tenant))

    def _remove_job(self, job_id: str) -> None:
        path = self._job_path(job_id)
        for p in (path, path.with_suffix(".lock")):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()

    # ---------------------------------------------------------------- health
    def check_writable(self) -> None:
        """Raise OSError unless a file can be written, read back and removed in the data directory."""
        probe = self.tmp_dir / f".probe-{uuid.uuid4().hex}"
        write_bytes_atomic(probe, b"ok")
        try:
            if probe.read_bytes() != b"ok":
                raise OSError(f"{probe} did not read back")
        finally:
            probe.unlink()
