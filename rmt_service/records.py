"""The records the store hands out and the ids it makes: one module below both the store and its versions
mixin (rmt_service.versions), so neither imports the other's internals."""
from __future__ import annotations

import dataclasses
import re
import secrets
from dataclasses import dataclass
from typing import Any

from .db import classifiers, versions
from .jobs import JobRecord

_CLASSIFIER_ID = re.compile(r"^clf_[0-9a-f]{24}$")
_JOB_ID = re.compile(r"^job_[0-9a-f]{24}$")
_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
MANIFEST = "manifest.json"


def new_classifier_id() -> str:
    return "clf_" + secrets.token_hex(12)


def new_job_id() -> str:
    return "job_" + secrets.token_hex(12)


def new_version_id() -> str:
    return "ver_" + secrets.token_hex(12)


def is_classifier_id(value: str) -> bool:
    return bool(_CLASSIFIER_ID.match(value or ""))


def is_job_id(value: str) -> bool:
    return bool(_JOB_ID.match(value or ""))


class StoreError(RuntimeError):
    """The records are not in the state an operation needs (missing classifier, lease lost, bad build)."""


class NotReady(RuntimeError):
    """The service would refuse work now (no space, records not writable); /readyz answers 503."""


class QuotaExceeded(StoreError):
    def __init__(self, active: int, limit: int):
        super().__init__(f"{active} jobs are queued or running; the limit is {limit}")
        self.active, self.limit = active, limit


@dataclass
class Sample:
    """One upload to store: validated bytes, its label, and the extension of its real format."""
    data: bytes
    label: str
    ext: str = ".img"
    original_name: str = ""


@dataclass
class ClassifierRecord:
    classifier_id: str
    tenant: str
    job_id: str
    name: str
    labels: list[str]
    config: dict[str, Any]
    n_images: int
    created_at: float
    current_version_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class VersionRecord:
    version_id: str
    classifier_id: str
    candidate: str
    final: bool
    blob_key: str
    base_id: str | None
    manifest: dict[str, Any]
    files: list[str]
    created_at: float
    source: str = "build"
    parent_version_id: str | None = None
    samples: list[int] | None = None


@dataclass
class ClassifierView:
    """A classifier with its job (None once pruned) and its current version (None until one is published)."""
    classifier: ClassifierRecord
    job: JobRecord | None
    version: VersionRecord | None


_CLF_COLS = [classifiers.c.id, classifiers.c.tenant, classifiers.c.job_id, classifiers.c.name,
             classifiers.c.labels, classifiers.c.config, classifiers.c.n_images, classifiers.c.created_at,
             classifiers.c.current_version_id]
_VER_COLS = [versions.c.version_id, versions.c.classifier_id, versions.c.candidate, versions.c.final,
             versions.c.blob_key, versions.c.base_id, versions.c.manifest, versions.c.files, versions.c.created_at,
             versions.c.source, versions.c.parent_version_id, versions.c.samples]


def _classifier(m) -> ClassifierRecord:
    return ClassifierRecord(classifier_id=m["id"], tenant=m["tenant"], job_id=m["job_id"], name=m["name"],
                            labels=list(m["labels"]), config=dict(m["config"]), n_images=m["n_images"],
                            created_at=m["created_at"], current_version_id=m["current_version_id"])


def _version(m, prefix: str = "") -> VersionRecord | None:
    if m[prefix + "version_id"] is None:
        return None
    return VersionRecord(**{f.name: m[prefix + f.name] for f in dataclasses.fields(VersionRecord)})


# A cursor is "<created_at>_<classifier_id>" of the last row of a page: readable, and every string of this form is
# a position in the list (the next page starts after it), so the API can document it as a pattern.
CURSOR_PATTERN = r"^[0-9]{1,20}(\.[0-9]{1,20})?_clf_[0-9a-f]{24}$"
_CURSOR = re.compile(CURSOR_PATTERN)


def encode_cursor(created_at: float, classifier_id: str) -> str:
    text = repr(float(created_at))  # the shortest text that reads back as the same float: no row skipped
    if not re.fullmatch(r"[0-9]{1,20}(\.[0-9]{1,20})?", text):  # not a clock time (exponent, sign)
        text = f"{max(0.0, float(created_at)):.6f}"
    return f"{text}_{classifier_id}"


def decode_cursor(cursor: str) -> tuple[float, str]:
    """(created_at, id) from a cursor; ValueError if it is not of the documented form."""
    if not _CURSOR.match(cursor):
        raise ValueError("cursor is not a next_cursor this API returned (<created_at>_clf_<24 hex digits>)")
    created_at, classifier_id = cursor.split("_", 1)
    return float(created_at), classifier_id
