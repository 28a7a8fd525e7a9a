"""One-time import of a data dir written by the JSON-file store (before the records database).

The old layout::

    <data_dir>/classifiers/<classifier_id>/classifier.json   tenant, name, labels, config, created_at, job_id
                                          /uploads/00000.png  + uploads.json [{file, label, original_name}]
                                          /model/             published artifacts (manifest.json, ...)
    <data_dir>/jobs/<job_id>.json                             status, progress, error, attempts, times

Each classifier becomes rows (classifier, uploads, job, a final version when it had a model) and blobs
(files hard-linked, or copied across filesystems, into blobs/uploads/<id>/ and blobs/versions/<id>/).
A job the old store had running is queued again (its lease meant nothing to the new service). The old
files are left in place (delete them once satisfied); ``legacy-import.json`` in the data dir records the
import so it runs once, and classifiers already in the database are skipped, so a crash mid-way resumes.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

from sqlalchemy import select, update

from . import jobs as jobsm
from .blobs import BlobStore
from .db import Database, classifiers, jobs, tenants, uploads, versions
from .settings import Settings

log = logging.getLogger(__name__)

MARKER = "legacy-import.json"
_CLASSIFIER_ID = re.compile(r"^clf_[0-9a-f]{24}$")
_JOB_ID = re.compile(r"^job_[0-9a-f]{24}$")
_FILE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def _read(path: Path) -> Any | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError, OSError):
        return None


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _stage(blobs: BlobStore, files: dict[str, Path]) -> Path:
    staging = blobs.staging_dir("legacy")
    for name, src in files.items():
        _link_or_copy(src, staging / name)
    return staging


def import_legacy_data_dir(db: Database, settings: Settings) -> dict[str, int] | None:
    """Import once; returns counts, or None when there is nothing to import (or it was done)."""
    root = Path(settings.data_dir)
    old = root / "classifiers"
    if (root / MARKER).exists() or not old.is_dir():
        return None
    blobs = BlobStore(root)
    counts = {"classifiers": 0, "jobs": 0, "versions": 0, "skipped": 0}
    for directory in sorted(old.iterdir()):
        if not _CLASSIFIER_ID.match(directory.name):
            continue
        try:
            if _import_one(db, blobs, root, directory, counts):
                counts["classifiers"] += 1
        except Exception:
            counts["skipped"] += 1
            log.exception("legacy import: could not import %s; left as it was", directory.name)
    with db.write() as conn:
        jobsm.recount(conn)
    (root / MARKER).write_text(json.dumps({"imported_at": time.time(), **counts}, indent=1))
    log.warning("imported %d classifier(s) from the file store (%d skipped); the old files in %s and %s can "
                "be removed", counts["classifiers"], counts["skipped"], old, root / "jobs")
    return counts


def _import_one(db: Database, blobs: BlobStore, root: Path, directory: Path, counts: dict[str, int]) -> bool:
    cid = directory.name
    record = _read(directory / "classifier.json")
    index = _read(directory / "uploads.json")
    if not isinstance(record, dict) or not isinstance(index, list):
        raise ValueError("classifier.json or uploads.json missing or unreadable")
    with db.read() as conn:
        if conn.execute(select(classifiers.c.id).where(classifiers.c.id == cid)).first() is not None:
            return False  # imported by an earlier, interrupted run
    job_id = str(record.get("job_id") or "")
    job = _read(root / "jobs" / f"{job_id}.json") if _JOB_ID.match(job_id) else None
    tenant = str(record.get("tenant") or "default")

    files, rows = {}, []
    for i, item in enumerate(index):
        name = str(item.get("file", ""))
        if not _FILE.match(name) or not (directory / "uploads" / name).is_file():
            raise ValueError(f"upload {name!r} is missing")
        key = blobs.upload_key(cid, i, os.path.splitext(name)[1])
        files[key.rsplit("/", 1)[1]] = directory / "uploads" / name
        rows.append({"classifier_id": cid, "idx": i, "blob_key": key, "label": str(item.get("label", "")),
                     "original_name": str(item.get("original_name", ""))[:255]})
    upload_key = blobs.uploads_dir_key(cid)
    blobs.put_dir(_stage(blobs, files), upload_key)

    version = None
    model = directory / "model"
    if (model / "manifest.json").is_file():
        from .store import new_version_id

        version_id = new_version_id()
        names = {p.name: p for p in model.iterdir() if p.is_file() and _FILE.match(p.name)}
        key = blobs.version_key(version_id)
        blobs.put_dir(_stage(blobs, names), key)
        manifest = _read(model / "manifest.json") or {}
        version = {"version_id": version_id, "classifier_id": cid, "final": True, "blob_key": key,
                   "candidate": str(manifest.get("candidate") or manifest.get("method") or "legacy")[:40],
                   "base_id": manifest.get("base_id"), "manifest": manifest, "files": sorted(names),
                   "created_at": float((job or {}).get("finished_at") or record.get("created_at") or time.time())}

    created_at = float(record.get("created_at") or time.time())
    now = time.time()
    try:
        with db.write() as conn:
            _ensure_tenant(db, conn, tenant)
            conn.execute(classifiers.insert().values(
                id=cid, tenant=tenant, name=str(record.get("name") or ""), labels=list(record.get("labels") or []),
                config=dict(record.get("config") or {}), n_images=int(record.get("n_images") or len(rows)),
                created_at=created_at, job_id=job_id or "job_" + "0" * 24, current_version_id=None))
            conn.execute(uploads.insert(), rows)
            if job is not None:
                status = str(job.get("status") or "failed")
                if status not in jobsm.JOB_STATUSES:
                    status = "failed"
                if version is not None and status != "succeeded":
                    status = "succeeded"  # a model was published: the old store's job died after that
                requeue = status == "running"
                conn.execute(jobs.insert().values(
                    id=job_id, classifier_id=cid, tenant=tenant, status="queued" if requeue else status,
                    progress=job.get("progress"), warnings=None, error=job.get("error"),
                    attempts=int(job.get("attempts") or 0), sends=1, resend_at=now if requeue else now + 30,
                    lease_owner=None, lease_expires_at=None, cancel_requested=bool(job.get("cancel_requested")),
                    created_at=float(job.get("created_at") or created_at),
                    enqueued_at=float(job.get("enqueued_at") or created_at),
                    started_at=job.get("started_at"), finished_at=job.get("finished_at"), updated_at=now))
                counts["jobs"] += 1
            if version is not None:
                conn.execute(versions.insert().values(**version))
                conn.execute(update(classifiers).where(classifiers.c.id == cid)
                             .values(current_version_id=version["version_id"]))
                counts["versions"] += 1
            conn.execute(update(tenants).where(tenants.c.tenant == tenant)
                         .values(n_classifiers=tenants.c.n_classifiers + 1))
    except BaseException:
        blobs.delete(upload_key)
        if version is not None:
            blobs.delete(version["blob_key"])
        raise
    return True


def _ensure_tenant(db: Database, conn, tenant: str) -> None:
    if conn.execute(select(tenants.c.tenant).where(tenants.c.tenant == tenant)).first() is None:
        conn.execute(tenants.insert().values(tenant=tenant, n_classifiers=0, created_at=time.time()))
