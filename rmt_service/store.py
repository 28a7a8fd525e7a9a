"""The store: the one facade app/ and worker/ use for classifiers, versions, uploads and jobs.

Records live in the database (rmt_service.db), files are immutable blobs (rmt_service.blobs), job
transitions go through the state machine (rmt_service.jobs). Writes that touch both put the blobs
first and then commit one transaction that makes them visible, so a crash in between leaves only
an unreferenced blob, which ``collect_garbage`` removes later; a reader never sees half of anything.
Ids are generated here; a record carries its tenant and lookups with another tenant answer None
(the API's 404), so one tenant cannot even learn that another's id exists.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Iterable

from sqlalchemy import bindparam, delete, insert, select, text, tuple_, update
from sqlalchemy.engine import Connection

from . import jobs as jobsm
from .blobs import BlobError, BlobStore
from .db import Database, bases, classifiers, db_now, job_counts, jobs, lock_timeout_ms, tenants, uploads, versions
from .jobs import ACTIVE_STATUSES, JOB_STATUSES, TERMINAL_STATUSES, JobRecord  # noqa: F401 (re-exported)
from .records import (  # noqa: F401 (re-exported: the store's public names)
    _CLASSIFIER_ID, _JOB_ID, _FILE_NAME, MANIFEST, new_classifier_id, new_job_id, new_version_id, is_classifier_id,
    is_job_id, StoreError, NotReady, QuotaExceeded, Sample, ClassifierRecord, VersionRecord, ClassifierView,
    _CLF_COLS, _VER_COLS, _classifier, _version, CURSOR_PATTERN, _CURSOR, encode_cursor, decode_cursor)
from .settings import Settings
from .versions import VersionsMixin, content_address

log = logging.getLogger(__name__)


def _by_id(query, with_tenant: bool):
    """``query`` for the classifier whose id (and tenant) is bound at execution: see ``_id_params``."""
    query = query.where(classifiers.c.id == bindparam("classifier_id"))
    return query.where(classifiers.c.tenant == bindparam("tenant")) if with_tenant else query


@functools.cache
def _record_by_id(with_tenant: bool):
    return _by_id(select(*_CLF_COLS), with_tenant)


def _id_params(classifier_id: str, tenant: str | None) -> dict:
    return {"classifier_id": classifier_id} if tenant is None else {"classifier_id": classifier_id, "tenant": tenant}


class Store(VersionsMixin):
    """Records (database) + blobs (data dir volume) + the job state machine, for one process."""

    def __init__(self, settings: Settings, db: Database | None = None):
        self.settings = settings
        self.db = db or Database(settings.effective_database_url, lock_timeout_s=settings.database_lock_timeout_seconds)
        self.blobs = BlobStore(settings.data_dir)
        self._served: OrderedDict[tuple[str, str | None], tuple[int, ClassifierView]] = OrderedDict()
        self._served_lock = threading.Lock()

    def close(self) -> None:
        self.db.dispose()

    # ---------------------------------------------------------------- classifiers
    def create_classifier(self, tenant: str, name: str, samples: list[Sample], config: dict[str, Any],
                          max_active_jobs: int | None = None, progress: dict[str, Any] | None = None
                          ) -> tuple[ClassifierRecord, JobRecord]:
        """Store uploads, then in one transaction: check the tenant's quota, insert classifier, uploads, job
        (with ``progress`` as the queued job's first progress, e.g. the schedule a create reports).

        Raises QuotaExceeded (nothing stored) when the tenant already has its limit of active jobs.
        """
        if not samples:
            raise StoreError("a classifier needs images")
        classifier_id, job_id = new_classifier_id(), new_job_id()
        labels = sorted({s.label for s in samples})
        keys = [self.blobs.upload_key(classifier_id, i, s.ext) for i, s in enumerate(samples)]
        dir_key = self.blobs.uploads_dir_key(classifier_id)
        self.blobs.put_files(dir_key, {k.rsplit("/", 1)[1]: s.data for k, s in zip(keys, samples)})
        try:
            with self.db.write() as conn:
                self._check_quota(conn, tenant, max_active_jobs)
                now = float(conn.execute(select(db_now())).scalar_one())
                conn.execute(classifiers.insert().values(
                    id=classifier_id, tenant=tenant, name=name, labels=labels, config=config,
                    n_images=len(samples), created_at=now, job_id=job_id, current_version_id=None))
                conn.execute(uploads.insert(), [
                    {"classifier_id": classifier_id, "idx": i, "blob_key": key, "label": s.label,
                     "original_name": s.original_name[:255], "sha256": content_address(s.data)} for i, (key, s) in enumerate(zip(keys, samples))])
                jobsm.insert(conn, job_id, classifier_id, tenant, self.settings.job_resend_seconds, progress)
                conn.execute(update(tenants).where(tenants.c.tenant == tenant)
                             .values(n_classifiers=tenants.c.n_classifiers + 1))
                job = jobsm.get(conn, job_id)
        except BaseException:
            self.blobs.delete(dir_key)
            raise
        record = ClassifierRecord(classifier_id=classifier_id, tenant=tenant, job_id=job_id, name=name,
                                  labels=labels, config=config, n_images=len(samples), created_at=now)
        return record, job

    def _check_quota(self, conn: Connection, tenant: str, max_active_jobs: int | None = None) -> None:
        """Inside a write transaction: lock the tenant's row and raise QuotaExceeded (nothing written yet) when it
        already has its limit of queued or running jobs (``max_active_jobs`` overrides the stored limit)."""
        limit = self._lock_tenant(conn, tenant)
        if max_active_jobs is not None:
            limit = max_active_jobs
        active = jobsm.count_active(conn, tenant)
        if active >= limit:
            raise QuotaExceeded(active, limit)

    def _lock_tenant(self, conn: Connection, tenant: str) -> int:
        """Create the tenant's row if needed and lock it for this transaction; returns its active-job limit."""
        if self.db.dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as upsert
        else:
            from sqlalchemy.dialects.sqlite import insert as upsert
        conn.execute(upsert(tenants).values(tenant=tenant, n_classifiers=0, created_at=db_now())
                     .on_conflict_do_nothing(index_elements=["tenant"]))
        query = select(tenants.c.max_active_jobs).where(tenants.c.tenant == tenant)
        if self.db.dialect == "postgresql":
            query = query.with_for_update()
        quota = conn.execute(query).scalar_one()
        return self.settings.max_queued_jobs if quota is None else int(quota)

    def quota_state(self, tenant: str) -> tuple[int, int]:
        """(active jobs, limit) for a tenant, read without locking: the API's early answer before an upload."""
        with self.db.read() as conn:
            quota = conn.execute(select(tenants.c.max_active_jobs).where(tenants.c.tenant == tenant)).scalar()
            active = jobsm.count_active(conn, tenant)
        return active, self.settings.max_queued_jobs if quota is None else int(quota)

    def set_quota(self, tenant: str, max_active_jobs: int | None) -> None:
        with self.db.write() as conn:
            self._lock_tenant(conn, tenant)
            conn.execute(update(tenants).where(tenants.c.tenant == tenant).values(max_active_jobs=max_active_jobs))

    def get_classifier(self, classifier_id: str, tenant: str | None = None) -> ClassifierRecord | None:
        """The record, or None if the id is unknown, malformed, or belongs to another tenant."""
        if not is_classifier_id(classifier_id):
            return None
        with self.db.read() as conn:
            row = conn.execute(_record_by_id(tenant is not None), _id_params(classifier_id, tenant)).first()
        return None if row is None else _classifier(row._mapping)

    @staticmethod
    @functools.cache
    def _view_query():
        """The classifier + job + version select (immutable: ``.where`` returns a new one), built once per
        process: its ~60 labelled columns were a third of each classify request's records lookup (0.345 ->
        0.235 ms). It reads only the module's tables, so every Store shares it."""
        ver = [c.label("v_" + c.name) for c in _VER_COLS]
        job = [c.label("j_" + c.name) for c in jobsm._COLUMNS]
        return (select(*_CLF_COLS, *job, *ver)
                .select_from(classifiers.outerjoin(jobs, jobs.c.id == classifiers.c.job_id)
                             .outerjoin(versions, versions.c.version_id == classifiers.c.current_version_id)))

    @staticmethod
    @functools.cache
    def _view_by_id(with_tenant: bool):
        """The view select for one id (and tenant), its values bound per call: one statement object, so
        SQLAlchemy neither copies it (``.where``) nor walks its ~60 columns for a cache key on each request
        (``view``: 297 -> 160 us here, bench/RESULTS-multitenant.md)."""
        return _by_id(Store._view_query(), with_tenant)

    @staticmethod
    def _view(row) -> ClassifierView:
        m = row._mapping
        job = None
        if m["j_id"] is not None:
            job = JobRecord(job_id=m["j_id"], **{f.name: m["j_" + f.name] for f in dataclasses.fields(JobRecord)
                                                  if f.name != "job_id"})
        return ClassifierView(_classifier(m), job, _version(m, "v_"))

    def view(self, classifier_id: str, tenant: str | None = None) -> ClassifierView | None:
        """Classifier + job + current version in one query (what GET /v1/classifiers/{id} shows)."""
        if not is_classifier_id(classifier_id):
            return None
        with self.db.read() as conn:
            row = conn.execute(self._view_by_id(tenant is not None), _id_params(classifier_id, tenant)).first()
        return None if row is None else self._view(row)

    SERVED_VIEWS = 4096  # views kept by served_view (a few kB each)

    def served_view(self, classifier_id: str, tenant: str | None = None) -> ClassifierView | None:
        """``view``, for the request path that reads it on every call (classify): the view read last for this id
        is answered again while the database's change stamp says nothing was committed since it was read (any
        commit by any process changes the stamp: a publish, a job's progress, a delete), so a publish is still
        seen by the next request. Without a stamp (PostgreSQL) every call reads the records. The view is shared
        between callers: read it, do not change it."""
        stamp = self.db.change_stamp()
        if stamp is None:
            return self.view(classifier_id, tenant)
        key = (classifier_id, tenant)
        with self._served_lock:
            hit = self._served.get(key)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        view = self.view(classifier_id, tenant)
        with self._served_lock:
            if view is None:
                self._served.pop(key, None)
            else:
                self._served[key] = (stamp, view)
                self._served.move_to_end(key)
                while len(self._served) > self.SERVED_VIEWS:
                    self._served.popitem(last=False)
        return view

    def list_classifiers(self, tenant: str, limit: int = 50, cursor: str | None = None, offset: int = 0
                         ) -> tuple[list[ClassifierView], int, str | None]:
        """A tenant's classifiers, newest first: (page, total, next_cursor or None at the end).

        Keyset pagination on the (tenant, created_at, id) index: every page costs the same however many
        classifiers exist. ``offset`` is kept for old clients (it costs what it skips).
        """
        query = self._view_query().where(classifiers.c.tenant == tenant)
        if cursor:
            created_at, classifier_id = decode_cursor(cursor)
            query = query.where(tuple_(classifiers.c.created_at, classifiers.c.id) < tuple_(created_at, classifier_id))
        query = query.order_by(classifiers.c.created_at.desc(), classifiers.c.id.desc()).limit(limit + 1)
        if offset:
            query = query.offset(offset)
        with self.db.read() as conn:
            rows = conn.execute(query).all()
            total = conn.execute(select(tenants.c.n_classifiers).where(tenants.c.tenant == tenant)).scalar()
        page = [self._view(r) for r in rows[:limit]]
        next_cursor = None
        if len(rows) > limit and page:
            last = page[-1].classifier
            next_cursor = encode_cursor(last.created_at, last.classifier_id)
        return page, int(total or 0), next_cursor

    def samples(self, classifier_id: str) -> list[tuple[Path, str]]:
        """(stored image path, label) pairs for the tuning pipeline, in upload order."""
        with self.db.read() as conn:
            rows = conn.execute(select(uploads.c.blob_key, uploads.c.label)
                                .where(uploads.c.classifier_id == classifier_id).order_by(uploads.c.idx)).all()
        if not rows:
            raise StoreError(f"classifier {classifier_id} has no uploads (deleted?)")
        return [(self.blobs.path(r.blob_key), r.label) for r in rows]

    def delete_classifier(self, classifier_id: str, tenant: str | None = None) -> bool:
        """Remove a classifier, its uploads, versions and job in one transaction, then their blobs.

        A worker still running its job finds the job gone at its next heartbeat and stops; its publish
        (if it gets that far) finds no classifier and is rolled back.
        """
        if not is_classifier_id(classifier_id):
            return False
        with self.db.write() as conn:
            query = select(classifiers.c.tenant, classifiers.c.job_id).where(classifiers.c.id == classifier_id)
            if tenant is not None:
                query = query.where(classifiers.c.tenant == tenant)
            row = conn.execute(query).first()
            if row is None:
                return False
            version_keys = conn.execute(select(versions.c.blob_key)
                                        .where(versions.c.classifier_id == classifier_id)).scalars().all()
            jobsm.delete_for_classifier(conn, row.job_id)
            self.delete_versions_records(conn, classifier_id)  # update jobs and feedback too
            conn.execute(delete(uploads).where(uploads.c.classifier_id == classifier_id))
            conn.execute(delete(versions).where(versions.c.classifier_id == classifier_id))
            conn.execute(delete(classifiers).where(classifiers.c.id == classifier_id))
            conn.execute(update(tenants).where(tenants.c.tenant == row.tenant)
                         .values(n_classifiers=tenants.c.n_classifiers - 1))
        for key in [self.blobs.uploads_dir_key(classifier_id), *version_keys]:
            try:
                self.blobs.delete(key)
            except OSError as exc:  # collected later by collect_garbage
                log.warning("could not remove blob %s: %s", key, exc)
        return True

    # ---------------------------------------------------------------- versions
    def current_version(self, classifier_id: str) -> VersionRecord | None:
        if not is_classifier_id(classifier_id):
            return None
        with self.db.read() as conn:
            row = conn.execute(select(*_VER_COLS).select_from(
                classifiers.join(versions, versions.c.version_id == classifiers.c.current_version_id))
                .where(classifiers.c.id == classifier_id)).first()
        return None if row is None else _version(row._mapping)

    def version_dir(self, version: VersionRecord) -> Path:
        return self.blobs.path(version.blob_key)

    def model_dir(self, classifier_id: str) -> Path | None:
        """The current version's artifact directory (immutable), or None until one is published."""
        version = self.current_version(classifier_id)
        return None if version is None else self.version_dir(version)

    def artifact_path(self, classifier_id: str, name: str, version: VersionRecord | None = None) -> Path | None:
        """A published artifact by a name the version lists (never a user path), or None."""
        version = version or self.current_version(classifier_id)
        if version is None or name not in version.files or not _FILE_NAME.match(name):
            return None
        path = self.version_dir(version) / name
        return path if path.is_file() else None

    def new_build_dir(self, classifier_id: str) -> Path:
        """An empty staging directory on the blob volume (so publishing it is a rename)."""
        if not is_classifier_id(classifier_id):
            raise StoreError(f"{classifier_id!r} is not a classifier id")
        return self.blobs.staging_dir(f"build-{classifier_id}")

    def discard(self, build_dir: Path) -> None:
        self.blobs.discard(Path(build_dir))

    def publish_version(self, classifier_id: str, build_dir: Path, *, job_id: str | None = None,
                        owner: str | None = None, final: bool = True, candidate: str | None = None,
                        serve: bool | None = None, source: str = "build", parent_version_id: str | None = None,
                        samples: list[int] | None = None, version_id: str | None = None) -> VersionRecord:
        """Make a complete build directory a version of the classifier: blob first, then one transaction.

        With ``job_id``/``owner`` and ``final``, the same transaction ends the job as succeeded, and only if
        the caller still holds its lease: a worker that lost its lease (frozen, then resumed) cannot publish,
        so one job publishes once. A preview (``final=False``) becomes current only while no final version
        exists (with ``job_id``/``owner``, only while the caller holds the job's lease). Raises StoreError (and
        removes the blob) when the classifier is gone or the lease was lost. ``serve`` (an update's verdict)
        overrides that: True makes it current, False leaves the serving version as it is.
        """
        build_dir = Path(build_dir)
        manifest_path = build_dir / MANIFEST
        if not manifest_path.is_file():
            raise StoreError(f"the build has no {MANIFEST}; refusing to publish an incomplete build")
        manifest = json.loads(manifest_path.read_text())
        files = sorted(p.name for p in build_dir.iterdir() if p.is_file() and _FILE_NAME.match(p.name))
        version_id = version_id or new_version_id()
        key = self.blobs.version_key(version_id)
        try:
            self.blobs.put_dir(build_dir, key)
        except BlobError as exc:
            raise StoreError(str(exc)) from exc
        candidate = candidate or str(manifest.get("candidate") or manifest.get("method") or "")
        base_id = manifest.get("base_id")
        try:
            with self.db.write() as conn:
                now = float(conn.execute(select(db_now())).scalar_one())
                current = conn.execute(select(classifiers.c.current_version_id, versions.c.final).select_from(
                    classifiers.outerjoin(versions, versions.c.version_id == classifiers.c.current_version_id))
                    .where(classifiers.c.id == classifier_id)).first()
                if current is None:
                    raise StoreError(f"classifier {classifier_id} no longer exists")
                if final and job_id is not None:
                    if not jobsm.finish_in(conn, job_id, owner or "", "succeeded"):
                        raise StoreError(f"job {job_id} is no longer held by this worker; not publishing")
                elif job_id is not None and not jobsm.holds(conn, job_id, owner or ""):
                    raise StoreError(f"job {job_id} is no longer held by this worker; no preview")
                if base_id:
                    self._register_base(conn, str(base_id), manifest, now)
                conn.execute(versions.insert().values(
                    version_id=version_id, classifier_id=classifier_id, candidate=candidate[:40], final=final,
                    blob_key=key, base_id=base_id, manifest=manifest, files=files, created_at=now, source=source,
                    parent_version_id=parent_version_id, samples=samples))
                if serve is None:
                    serve = final or current.current_version_id is None or not current.final
                if serve:
                    conn.execute(update(classifiers).where(classifiers.c.id == classifier_id)
                                 .values(current_version_id=version_id))
        except BaseException:
            self.blobs.unput(key, build_dir)  # back in staging: the caller may retry (a stalled database)
            raise
        return VersionRecord(version_id, classifier_id, candidate[:40], final, key, base_id, manifest, files, now,
                             source, parent_version_id, samples)

    def _register_base(self, conn: Connection, base_id: str, manifest: dict[str, Any], now: float) -> None:
        """Record the base a version uses, and check its blob is there, inside the publishing transaction.

        Idempotent under concurrency (two jobs publishing their first version on a new backbone: one inserts,
        the other's insert does nothing). The row is then locked for the transaction, so a collection that
        removes this base (``_collect_base``, which deletes the row first) runs wholly before or after; after,
        the blob is gone and the publish is refused instead of pointing a version at a missing base.
        """
        try:
            key = self.blobs.base_key(base_id)
        except BlobError:
            return
        self._insert_base_row(conn, base_id, str(manifest.get("backbone") or ""),
                              str(manifest.get("pretrained") or ""), key, now)
        if not self.db.is_sqlite:  # SQLite's write transaction already holds the database's one write lock
            conn.execute(select(bases.c.base_id).where(bases.c.base_id == base_id).with_for_update())
        if not self.blobs.path(key).is_dir():
            raise StoreError(f"base {base_id} is no longer stored (collected while this job ran); retry the job")

    def register_base(self, base_id: str, backbone: str, pretrained: str | None) -> None:
        """Record a base exported before any version uses it (the worker prepares the default backbone's base at
        start). Idempotent; StoreError if its blob is not stored. Collection treats it like any unused base: kept
        while younger than the base grace or while a queued or running job tunes on its backbone."""
        with self.db.write() as conn:
            now = float(conn.execute(select(db_now())).scalar_one())
            self._register_base(conn, base_id, {"backbone": backbone, "pretrained": pretrained or ""}, now)

    def _insert_base_row(self, conn: Connection, base_id: str, backbone: str, pretrained: str, key: str,
                         now: float) -> None:
        values = dict(base_id=base_id, backbone=backbone, pretrained=pretrained, blob_key=key, created_at=now)
        if self.db.is_sqlite:
            from sqlalchemy.dialects.sqlite import insert as dialect_insert
        elif self.db.dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as dialect_insert
        else:  # no portable upsert: check, then insert (a race here ends in the caller's retry)
            if conn.execute(select(bases.c.base_id).where(bases.c.base_id == base_id)).first() is None:
                conn.execute(insert(bases).values(**values))
            return
        conn.execute(dialect_insert(bases).values(**values).on_conflict_do_nothing(index_elements=["base_id"]))

    @property
    def bases_dir(self) -> Path:
        return self.blobs.bases_dir

    # ---------------------------------------------------------------- jobs
    def get_job(self, job_id: str, tenant: str | None = None) -> JobRecord | None:
        if not is_job_id(job_id):
            return None
        with self.db.read() as conn:
            return jobsm.get(conn, job_id, tenant)

    def count_active_jobs(self, tenant: str) -> int:
        with self.db.read() as conn:
            return jobsm.count_active(conn, tenant)

    def cancel_job(self, job_id: str, tenant: str | None = None) -> JobRecord | None:
        if not is_job_id(job_id):
            return None
        return jobsm.request_cancel(self.db, job_id, tenant)

    def job_counts(self) -> dict[str, int]:
        return jobsm.counts(self.db)

    def claim(self, job_id: str, owner: str) -> tuple[str, JobRecord | None]:
        if not is_job_id(job_id):
            return "missing", None
        return jobsm.claim(self.db, job_id, owner, self.settings.job_lease_seconds, self.settings.job_max_attempts)

    def heartbeat(self, job_id: str, owner: str, attempt: int | None = None) -> str:
        return jobsm.heartbeat(self.db, job_id, owner, self.settings.job_lease_seconds, attempt)

    def set_progress(self, job_id: str, owner: str, progress: dict[str, Any],
                     warnings: list[str] | None = None) -> bool:
        return jobsm.set_progress(self.db, job_id, owner, progress, warnings)

    def finish_job(self, job_id: str, owner: str, status: str, error: dict[str, str] | None = None) -> bool:
        return jobsm.finish(self.db, job_id, owner, status, error)

    def recover(self, enqueue: Callable[[str], None], queue_depth: Callable[[], int] | None = None
                ) -> dict[str, int]:
        """One sweep: expired leases, lost broker messages, retention. Sends what needs sending.

        A queued job past its resend time is re-sent only when the broker's queue (``queue_depth``) holds
        fewer messages than there are queued jobs, and only as many as are missing: while a burst of creates
        waits behind a busy worker, every job's message is still queued and nothing is multiplied.
        """
        resend_limit = None
        if queue_depth is not None:
            try:
                depth = queue_depth()
                with self.db.read() as conn:
                    resend_limit = max(0, jobsm.count_queued(conn) - depth)
            except Exception as exc:  # the broker cannot say: re-send as before (duplicates are harmless)
                log.warning("could not compare the broker's queue with the queued jobs: %s", exc)
        counts, send = jobsm.sweep(self.db, self.settings.job_max_attempts, self.settings.job_resend_seconds,
                                   resend_limit=resend_limit)
        for job_id in send:
            try:
                enqueue(job_id)
            except Exception as exc:  # broker down: the job stays queued and is re-sent by a later sweep
                log.warning("could not send job %s: %s", job_id, exc)
        counts["pruned"] = jobsm.prune(self.db, self.settings.job_retention_seconds)
        for outcome in ("requeued", "failed", "cancelled", "resent"):
            if counts[outcome]:
                log.warning("lease sweep: %d job(s) %s", counts[outcome], outcome)
        return counts

    # ---------------------------------------------------------------- upkeep
    def _active_classifiers(self, ids: list[str]) -> set[str]:
        """Those of ``ids`` whose job is queued or running (their build directories are theirs)."""
        with self.db.read() as conn:
            return set(conn.execute(select(jobs.c.classifier_id).where(
                jobs.c.classifier_id.in_(ids), jobs.c.status.in_(ACTIVE_STATUSES))).scalars().all())

    def clean_staging(self, grace_s: float = 3600.0) -> int:
        """Remove staging nothing live owns: builds of jobs no longer queued or running, uploads and base exports
        of processes that died (at once on this host; after ``grace_s`` for another host's), and crashed base
        exports of older releases. Run at start-up and by every collection."""
        tmp_names = [p.name for p in self.blobs.tmp.iterdir() if p.name.startswith("build-clf_")]
        ids = sorted({n[len("build-"):].split("-", 1)[0] for n in tmp_names})
        owned: set[str] = set()
        for chunk in _chunks(ids, 500):
            owned |= self._active_classifiers(chunk)
        removed = self.blobs.cleanup_tmp(grace_s, build_owned=owned.__contains__)
        return removed + self.blobs.cleanup_base_staging()

    def _bases_in_use(self, conn: Connection) -> set[tuple[str, str]]:
        """(backbone, pretrained) of every queued or running job: the bases those jobs tune on or will."""
        rows = conn.execute(select(classifiers.c.config).select_from(
            jobs.join(classifiers, classifiers.c.id == jobs.c.classifier_id))
            .where(jobs.c.status.in_(ACTIVE_STATUSES))).scalars().all()
        return {(str((c or {}).get("backbone") or ""), str((c or {}).get("pretrained") or "")) for c in rows}

    def _base_identity(self, conn: Connection, base_id: str) -> tuple[str, str] | None:
        """(backbone, pretrained) of a stored base, from its row or its base.json; None if neither says."""
        row = conn.execute(select(bases.c.backbone, bases.c.pretrained).where(bases.c.base_id == base_id)).first()
        if row is not None and row.backbone:
            return row.backbone, row.pretrained or ""
        try:
            meta = json.loads((self.blobs.path(self.blobs.base_key(base_id)) / "base.json").read_text())
        except (OSError, ValueError, BlobError):
            return None
        return str(meta.get("backbone") or ""), str(meta.get("pretrained") or "")

    def _collect_base(self, base_id: str, key: str) -> bool:
        """Remove one base no version and no queued or running job uses; False if it is (still) in use.

        The row is deleted first (inserted first if the base was never registered), which locks it against a
        concurrent publish (``_register_base``); the blob is renamed away before the commit. A publish thus
        either committed before (its version keeps the base) or finds the blob gone and is refused.
        """
        trash = None
        try:
            with self.db.write() as conn:
                now = float(conn.execute(select(db_now())).scalar_one())
                identity = self._base_identity(conn, base_id)
                self._insert_base_row(conn, base_id, "", "", key, now)
                conn.execute(delete(bases).where(bases.c.base_id == base_id))
                in_use = conn.execute(select(versions.c.version_id).where(versions.c.base_id == base_id)
                                      .limit(1)).first() is not None
                if not in_use:
                    wanted = self._bases_in_use(conn)
                    # A base that does not say what it is may belong to any job: kept while any job is active.
                    in_use = bool(wanted) and (identity is None or identity in wanted)
                if in_use:
                    raise _InUse
                trash = self.blobs.take_away(key)
        except _InUse:  # rolled back: the row stays as it was
            return False
        except BaseException:
            if trash is not None:
                self.blobs.restore(trash, key)
            raise
        if trash is not None:
            self.blobs.delete_taken(trash)
        return True

    def collect_garbage(self, grace_s: float = 3600.0, base_grace_s: float | None = None) -> dict[str, int]:
        """Remove blobs no row refers to, older than ``grace_s`` (writes in flight are younger), and staging
        nothing live owns (``clean_staging``).

        A base is removed only when no version refers to it and no queued or running job tunes on its backbone
        and weights (and it is older than ``base_grace_s``, default 7 days: exporting one again is expensive).
        """
        base_grace_s = 7 * 86400.0 if base_grace_s is None else base_grace_s
        removed = {"uploads": 0, "versions": 0, "bases": 0, "tmp": self.clean_staging(max(grace_s, 3600.0))}
        checks = {
            "uploads": lambda ids: select(classifiers.c.id).where(classifiers.c.id.in_(ids)),
            "versions": lambda ids: select(versions.c.version_id).where(versions.c.version_id.in_(ids)),
            "bases": lambda ids: select(versions.c.base_id).where(versions.c.base_id.in_(ids)).distinct(),
        }
        for kind, check in checks.items():
            keys = list(self.blobs.iter_keys(kind, older_than_s=base_grace_s if kind == "bases" else grace_s))
            for chunk in _chunks(keys, 500):
                ids = [k.split("/", 1)[1] for k in chunk]
                with self.db.read() as conn:
                    alive = set(conn.execute(check(ids)).scalars().all())
                for key, ident in zip(chunk, ids):
                    if ident in alive:
                        continue
                    if kind == "bases":
                        if not self._collect_base(ident, key):
                            continue
                    else:
                        self.blobs.delete(key)
                    removed[kind] += 1
        return removed

    def check_ready(self) -> None:
        """Raise unless the database answers and the blob volume is writable."""
        with self.db.read() as conn:
            conn.execute(text("SELECT 1"))
        self.blobs.check_writable()

    check_writable = check_ready

    def check_space(self) -> None:
        """Raise NotReady when the data volume has less free space than RMT_MIN_FREE_BYTES."""
        free = self.blobs.free_bytes()
        if free < self.settings.min_free_bytes:
            raise NotReady(f"the data volume has {free} bytes free, below RMT_MIN_FREE_BYTES="
                           f"{self.settings.min_free_bytes}")

    def check_records_writable(self, wait_s: float = 1.0) -> None:
        """Raise unless the records database takes a write now (not locked past ``wait_s``, not read-only).

        The write is real (a job counter set to itself, on the tables a create writes) and rolled back.
        """
        wait_ms = lock_timeout_ms(wait_s)
        with self.db.engine.connect() as conn, self.db.sqlite_lock_wait(conn, wait_ms):
            transaction = conn.execution_options(rmt_immediate=True).begin()
            try:
                if self.db.dialect == "postgresql":
                    conn.exec_driver_sql(f"SET LOCAL lock_timeout = {wait_ms}")
                    conn.exec_driver_sql("LOCK TABLE tenants, classifiers, uploads, jobs, job_counts "
                                         "IN ROW EXCLUSIVE MODE")
                conn.execute(update(job_counts).where(job_counts.c.status == "queued")
                             .values(n=job_counts.c.n))
            finally:
                transaction.rollback()


class _InUse(Exception):
    """Rolls back a collection that found its blob in use."""


def _chunks(items: list, size: int) -> Iterable[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]
