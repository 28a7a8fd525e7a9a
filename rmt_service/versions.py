"""A classifier is a sequence of versions and exactly one serves: which one, and what status that gives.

The one place that decides which version classify answers with and what status a classifier shows
(``decide``), used by every route and schema; and the records behind the user's versions (``VersionsMixin``,
part of the Store): listing them, serving one (rollback / roll forward), update jobs, classes added by
name, feedback, and images stored once per classifier by content address.

The serving choice is ``classifiers.current_version_id``: a database row, so it survives restarts and every
API replica reads the same one (their classifier caches reload when the version directory changes).
"""
from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, func, select, update

from .db import classifiers, db_now, feedback, jobs, uploads, versions
from .records import (MANIFEST, _VER_COLS, ClassifierRecord, StoreError, VersionRecord, _version,
                      is_classifier_id, new_job_id)

if TYPE_CHECKING:
    from .jobs import JobRecord

SOURCES = ("build", "update", "class_by_name", "rollback")
ACTIVE = ("queued", "running")


class VersionError(RuntimeError):
    """A version operation that cannot be done as asked; ``code`` is the API's error code."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Serving:
    """What a classifier shows and answers with: its status, the version classify uses (None: nothing
    answers, ``reason`` says why, ``retry`` when waiting helps)."""
    status: str
    version: "VersionRecord | None"
    reason: str = ""
    retry: bool = False

    @property
    def preview(self) -> bool:
        return self.version is not None and not self.version.final


def decide(record: "ClassifierRecord", job: "JobRecord | None", current: "VersionRecord | None") -> Serving:
    """The version classify answers with and the status shown, from the classifier, its build job and the
    version ``current_version_id`` points at.

    A final version serves and the classifier is ready (whatever later update jobs do). Before one exists, the
    preview (zero-shot, then the fitted head) serves while the build job is queued or running, and after a
    failed or cancelled job only with config.keep_preview.
    """
    cid = record.classifier_id
    if current is not None and current.final:
        return Serving("ready", current)
    status = job.status if job is not None else "failed"
    if status == "succeeded":  # succeeded but its model is gone: should not happen
        status = "failed"
    if current is not None and (status in ACTIVE or (record.config or {}).get("keep_preview")):
        return Serving(status, current)
    if status in ACTIVE:
        return Serving(status, None, f"classifier {cid} is {status} and its zero-shot preview is not ready yet; "
                                     f"retry in a few seconds, or follow GET /v1/jobs/{record.job_id}", retry=True)
    hint = " (its preview is not served after the job ended; create with config.keep_preview=true for that)" \
        if current is not None else ""
    return Serving(status, None, f"classifier {cid} is {status}, not ready{hint}; follow GET /v1/jobs/{record.job_id}")


def content_address(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def new_feedback_id() -> str:
    return "fb_" + secrets.token_hex(12)


def published_accuracy(manifest: dict[str, Any] | None) -> float | None:
    validation = (manifest or {}).get("validation") or {}
    value = validation.get("published_accuracy")
    return None if value is None else float(value)


@dataclass
class VersionInfo:
    """One version as the versions list shows it."""
    version: "VersionRecord"
    serving: bool
    labels: list[str]
    images: dict[str, int]


@dataclass
class FeedbackRecord:
    feedback_id: str
    classifier_id: str
    blob_key: str
    label: str
    prediction: str | None
    version_id: str | None
    created_at: float


class VersionsMixin:
    """The Store's version records (mixed into rmt_service.store.Store; uses its db, blobs and settings)."""

    # ------------------------------------------------------------ samples of a version
    def version_sample_idx(self, conn, classifier_id: str, version: "VersionRecord | None") -> list[int]:
        """The upload rows a version was built from: its own list, else (a build) the first n_images."""
        if version is not None and version.samples is not None:
            return [int(i) for i in version.samples]
        n = conn.execute(select(classifiers.c.n_images).where(classifiers.c.id == classifier_id)).scalar_one()
        return list(range(int(n)))

    def _upload_rows(self, conn, classifier_id: str, idx: list[int] | None = None) -> dict[int, Any]:
        query = select(uploads.c.idx, uploads.c.blob_key, uploads.c.label, uploads.c.sha256).where(
            uploads.c.classifier_id == classifier_id)
        return {r.idx: r for r in conn.execute(query)} if idx is None else \
            {r.idx: r for r in conn.execute(query) if r.idx in set(idx)}

    def version_samples(self, classifier_id: str, version: "VersionRecord") -> list[tuple[Any, str]]:
        """(stored image path, label) of a version's images, in upload order (the order its build saw)."""
        return [(path, label) for _, path, label in self.version_samples_indexed(classifier_id, version)]

    def version_samples_indexed(self, classifier_id: str, version: "VersionRecord") -> list[tuple[int, Any, str]]:
        """(upload idx, stored image path, label) of a version's images, in upload order."""
        with self.db.read() as conn:
            idx = self.version_sample_idx(conn, classifier_id, version)
            rows = self._upload_rows(conn, classifier_id)
        return [(i, self.blobs.path(rows[i].blob_key), rows[i].label) for i in sorted(idx) if i in rows]

    # ------------------------------------------------------------ listing and serving
    def list_versions(self, classifier_id: str, tenant: str | None = None) -> list[VersionInfo] | None:
        """The classifier's versions, newest first (None: no such classifier for this tenant)."""
        if not is_classifier_id(classifier_id):
            return None
        with self.db.read() as conn:
            query = select(classifiers.c.current_version_id, classifiers.c.n_images).where(
                classifiers.c.id == classifier_id)
            if tenant is not None:
                query = query.where(classifiers.c.tenant == tenant)
            row = conn.execute(query).first()
            if row is None:
                return None
            records = [_version(r._mapping) for r in conn.execute(
                select(*_VER_COLS).where(versions.c.classifier_id == classifier_id)
                .order_by(versions.c.created_at.desc(), versions.c.version_id.desc()))]
            labels_of = {r.idx: r.label for r in conn.execute(
                select(uploads.c.idx, uploads.c.label).where(uploads.c.classifier_id == classifier_id))}
        out = []
        for version in records:
            idx = version.samples if version.samples is not None else range(int(row.n_images))
            counts: dict[str, int] = {}
            for i in idx:
                label = labels_of.get(int(i))
                if label is not None:
                    counts[label] = counts.get(label, 0) + 1
            labels = list((version.manifest or {}).get("labels") or sorted(counts))
            out.append(VersionInfo(version, version.version_id == row.current_version_id, labels,
                                   {label: counts.get(label, 0) for label in labels}))
        return out

    def serve_version(self, classifier_id: str, version_id: str, tenant: str | None = None) -> "VersionRecord":
        """Make a final version the one classify answers with (rollback or roll forward), for every replica.

        Raises VersionError (not_found for an unknown id or another tenant's; not_servable for a preview).
        """
        if not is_classifier_id(classifier_id):
            raise VersionError("not_found", f"no classifier {classifier_id!r}")
        with self.db.write() as conn:
            query = select(classifiers.c.id).where(classifiers.c.id == classifier_id)
            if tenant is not None:
                query = query.where(classifiers.c.tenant == tenant)
            if conn.execute(query).first() is None:
                raise VersionError("not_found", f"no classifier {classifier_id!r}")
            row = conn.execute(select(*_VER_COLS).where(versions.c.version_id == version_id,
                                                        versions.c.classifier_id == classifier_id)).first()
            if row is None:
                raise VersionError("not_found", f"classifier {classifier_id} has no version {version_id!r}; "
                                                f"GET /v1/classifiers/{classifier_id}/versions lists them")
            version = _version(row._mapping)
            if not version.final:
                raise VersionError("not_servable", f"version {version_id} is a preview of a build; only final "
                                                   "versions can be served")
            conn.execute(update(classifiers).where(classifiers.c.id == classifier_id)
                         .values(current_version_id=version_id))
        return version

    # ------------------------------------------------------------ images by content address
    def put_image(self, classifier_id: str, data: bytes, ext: str) -> tuple[str, str]:
        """Store an image once per classifier: the blob of an upload or feedback with the same content, else a
        new one named by its content. Returns (blob key, sha256)."""
        digest = content_address(data)
        with self.db.write() as conn:
            self._address_uploads(conn, classifier_id)
            key = conn.execute(select(uploads.c.blob_key).where(uploads.c.classifier_id == classifier_id,
                                                                uploads.c.sha256 == digest).limit(1)).scalar()
            if key is None:
                key = conn.execute(select(feedback.c.blob_key).where(feedback.c.classifier_id == classifier_id,
                                                                     feedback.c.sha256 == digest).limit(1)).scalar()
        if key is not None and self.blobs.path(key).is_file():
            return key, digest
        key = self.blobs.content_key(classifier_id, digest, ext)
        self.blobs.put_file(key, data)
        return key, digest

    def put_images(self, classifier_id: str, images: list[tuple[bytes, str]]) -> tuple[list[tuple[str, str]], list[str]]:
        """put_image for each (bytes, ext): ((key, sha256) per image, the keys written by this call)."""
        stored, written = [], []
        for data, ext in images:
            key, digest = self.put_image(classifier_id, data, ext)
            if key == self.blobs.content_key(classifier_id, digest, ext) and key not in written and \
                    not self._referenced(classifier_id, key):
                written.append(key)
            stored.append((key, digest))
        return stored, written

    def _referenced(self, classifier_id: str, key: str) -> bool:
        with self.db.read() as conn:
            return conn.execute(select(uploads.c.idx).where(uploads.c.classifier_id == classifier_id,
                                                            uploads.c.blob_key == key).limit(1)).first() is not None \
                or conn.execute(select(feedback.c.id).where(feedback.c.classifier_id == classifier_id,
                                                            feedback.c.blob_key == key).limit(1)).first() is not None

    def discard_images(self, classifier_id: str, keys: list[str]) -> None:
        """Remove images put_images wrote for a request that was then refused (no row refers to them)."""
        for key in keys:
            if not self._referenced(classifier_id, key):
                self.blobs.delete(key)

    def _address_uploads(self, conn, classifier_id: str) -> None:
        """Give uploads stored before content addresses (schema 0001) theirs, once, from their blobs."""
        missing = conn.execute(select(uploads.c.idx, uploads.c.blob_key).where(
            uploads.c.classifier_id == classifier_id, uploads.c.sha256.is_(None))).all()
        for row in missing:
            path = self.blobs.path(row.blob_key)
            if path.is_file():
                conn.execute(update(uploads).where(uploads.c.classifier_id == classifier_id,
                                                   uploads.c.idx == row.idx)
                             .values(sha256=content_address(path.read_bytes())))

    def _add_upload(self, conn, classifier_id: str, blob_key: str, digest: str, label: str, name: str,
                    existing: dict[tuple[str, str], int], next_idx: list[int]) -> int:
        """The upload row for (image, label): an existing one with the same content and label, else a new one."""
        found = existing.get((digest, label))
        if found is not None:
            return found
        idx = next_idx[0]
        next_idx[0] += 1
        conn.execute(uploads.insert().values(classifier_id=classifier_id, idx=idx, blob_key=blob_key, label=label,
                                             original_name=name[:255], sha256=digest))
        existing[(digest, label)] = idx
        return idx

    # ------------------------------------------------------------ update jobs
    def create_update_job(self, classifier_id: str, tenant: str, added: list[tuple[str, str, str, str]],
                          remove_labels: list[str], include_feedback: bool, config: dict[str, Any],
                          max_active_jobs: int | None = None) -> "JobRecord":
        """Queue a job building a new version from the serving one's images plus ``added`` ((blob key, sha256,
        label, file name), already stored by put_image), without ``remove_labels``, with the feedback images
        when ``include_feedback``. The sample set is fixed here, so the job builds what was asked even if
        more feedback arrives. Raises VersionError for a request that cannot make a classifier, QuotaExceeded.
        """
        from . import jobs as jobsm
        with self.db.write() as conn:
            clf = conn.execute(select(classifiers.c.id, classifiers.c.current_version_id, classifiers.c.config,
                                      classifiers.c.labels).where(classifiers.c.id == classifier_id,
                                                                  classifiers.c.tenant == tenant)).first()
            if clf is None:
                raise VersionError("not_found", f"no classifier {classifier_id!r}")
            serving = self._serving_final(conn, classifier_id, clf.current_version_id)
            labels_now = set((serving.manifest or {}).get("labels") or [])
            unknown = sorted(set(remove_labels) - labels_now)
            if unknown:
                raise VersionError("unknown_label", f"remove_labels names classes the serving version does not "
                                                    f"have: {unknown}; it has {sorted(labels_now)}")
            added_labels = {label for _, _, label, _ in added}
            rows_now = self._upload_rows(conn, classifier_id)
            with_images = {rows_now[i].label for i in self.version_sample_idx(conn, classifier_id, serving)
                           if i in rows_now}
            name_only = sorted(labels_now - with_images - set(remove_labels) - added_labels)
            if name_only:
                raise VersionError("needs_images", f"class(es) {name_only} were added by name and have no images; "
                                                   "a trained version needs images of every class: add some, or "
                                                   "remove_labels them")
            self._check_quota(conn, tenant, max_active_jobs)
            self._address_uploads(conn, classifier_id)
            rows = self._upload_rows(conn, classifier_id)
            existing = {(r.sha256, r.label): i for i, r in rows.items() if r.sha256}
            next_idx = [max(rows, default=-1) + 1]
            sample_idx = [i for i in self.version_sample_idx(conn, classifier_id, serving)
                          if i in rows and rows[i].label not in remove_labels]
            new_idx = [self._add_upload(conn, classifier_id, key, digest, label, name, existing, next_idx)
                       for key, digest, label, name in added]
            feedback_ids: list[str] = []
            new_digests = {digest for _, digest, _, _ in added}
            if include_feedback:
                for fb in conn.execute(select(feedback.c.id, feedback.c.blob_key, feedback.c.sha256, feedback.c.label)
                                       .where(feedback.c.classifier_id == classifier_id)
                                       .order_by(feedback.c.created_at)):
                    if fb.label in remove_labels:
                        continue
                    new_idx.append(self._add_upload(conn, classifier_id, fb.blob_key, fb.sha256, fb.label,
                                                    f"feedback {fb.id}", existing, next_idx))
                    new_digests.add(fb.sha256)
                    feedback_ids.append(fb.id)
            # the same image sent again under another label is a correction: its old label goes
            samples = sorted({i for i in sample_idx if not (rows[i].sha256 and rows[i].sha256 in new_digests)}
                             | set(new_idx))
            labels_after = {self._label_of(conn, classifier_id, i, rows) for i in samples}
            if len(labels_after) < 2:
                raise VersionError("too_few_classes", f"the new version would have {len(labels_after)} class(es) "
                                                      f"({sorted(labels_after)}); a classifier needs at least two")
            settings_changed = {k: v for k, v in config.items() if k != "force"} != \
                ((serving.manifest or {}).get("config") or {})
            if not added and not remove_labels and not feedback_ids and not settings_changed and not config.get("force"):
                raise VersionError("nothing_to_change", "send files+labels, remove_labels, include_feedback=true "
                                                        "(with feedback recorded) or new config settings; nothing "
                                                        "would change")
            job_id = new_job_id()
            spec = {"parent_version_id": serving.version_id, "samples": samples, "config": config,
                    "added": len(added), "removed_labels": sorted(set(remove_labels)),
                    "feedback_ids": feedback_ids}
            jobsm.insert(conn, job_id, classifier_id, tenant, self.settings.job_resend_seconds, None)
            conn.execute(update(jobs).where(jobs.c.id == job_id).values(kind="update", spec=spec))
            return jobsm.get(conn, job_id)

    def _label_of(self, conn, classifier_id: str, idx: int, rows: dict[int, Any]) -> str:
        if idx in rows:
            return rows[idx].label
        return conn.execute(select(uploads.c.label).where(uploads.c.classifier_id == classifier_id,
                                                          uploads.c.idx == idx)).scalar_one()

    def _serving_final(self, conn, classifier_id: str, current_version_id: str | None) -> "VersionRecord":
        row = None if current_version_id is None else conn.execute(
            select(*_VER_COLS).where(versions.c.version_id == current_version_id)).first()
        version = None if row is None else _version(row._mapping)
        if version is None or not version.final:
            raise VersionError("not_ready", f"classifier {classifier_id} has no published version yet; a new "
                                            "version starts from the serving one (wait for the build job)")
        return version

    def job_spec(self, job_id: str) -> tuple[str, dict[str, Any] | None]:
        """(kind, spec) of a job: build, or update with what to build."""
        with self.db.read() as conn:
            row = conn.execute(select(jobs.c.kind, jobs.c.spec).where(jobs.c.id == job_id)).first()
        return ("build", None) if row is None else (row.kind, row.spec)

    def get_version(self, classifier_id: str, version_id: str) -> "VersionRecord | None":
        with self.db.read() as conn:
            row = conn.execute(select(*_VER_COLS).where(versions.c.version_id == version_id,
                                                        versions.c.classifier_id == classifier_id)).first()
        return None if row is None else _version(row._mapping)

    def samples_by_idx(self, classifier_id: str, idx: list[int]) -> list[tuple[Any, str]]:
        with self.db.read() as conn:
            rows = self._upload_rows(conn, classifier_id)
        missing = [i for i in idx if i not in rows]
        if missing:
            raise StoreError(f"classifier {classifier_id} lost uploads {missing[:5]} (deleted?)")
        return [(self.blobs.path(rows[i].blob_key), rows[i].label) for i in idx]

    # ------------------------------------------------------------ a class added by name
    def add_class_by_name(self, classifier_id: str, tenant: str, name: str, prompt: str | None
                          ) -> "VersionRecord":
        """A new serving version: the serving one plus a class whose head row is the text tower's embedding of
        ``prompt`` (default: the classifier's prompt template around ``name``). No training; the rest is kept.
        VersionError: not_found, not_ready (nothing published), class_exists, no_text_tower."""
        import shutil

        from rmt_core.head import Head
        from rmt_core.templates import DEFAULT_TEMPLATE, class_prompt
        from rmt_core.text import text_encoder
        view = self.view(classifier_id, tenant)
        if view is None:
            raise VersionError("not_found", f"no classifier {classifier_id!r}")
        with self.db.read() as conn:
            serving = self._serving_final(conn, classifier_id, view.classifier.current_version_id)
            samples = self.version_sample_idx(conn, classifier_id, serving)
        manifest = dict(serving.manifest or {})
        labels = list(manifest.get("labels") or [])
        if name in labels:
            raise VersionError("class_exists", f"the serving version already has a class {name!r}")
        head_file, base_id = manifest.get("head_file"), manifest.get("base_id")
        if not head_file or not base_id:
            raise VersionError("no_text_tower", "this classifier's version predates base+mask+head versions; add "
                                                "the class with images (POST .../versions)")
        try:
            encoder = text_encoder(str(self.bases_dir / base_id))
        except FileNotFoundError:
            raise VersionError("no_text_tower", f"the base {base_id} was exported before bases carried a text "
                                                "tower; add the class with images (POST .../versions)") from None
        template = (manifest.get("config") or {}).get("prompt_template") or DEFAULT_TEMPLATE
        prompt = prompt or class_prompt(name, template)
        source_dir = self.version_dir(serving)
        head = Head.load(source_dir / head_file).with_class(encoder.encode([prompt])[0])
        build_dir = self.new_build_dir(classifier_id)
        try:
            for file_name in serving.files:
                if file_name not in (MANIFEST, head_file):
                    shutil.copyfile(source_dir / file_name, build_dir / file_name)
            manifest.update(labels=[*labels, name], head=head.summary(), head_bytes=head.save(build_dir / head_file),
                            change={"added_class_by_name": name, "prompt": prompt}, warm_start=None,
                            # the int8 guard judged the old head, not this one: this version serves fp32
                            int8={"allowed": False, "reason": "a class added by name: the int8 guard did not run"})
            (build_dir / MANIFEST).write_text(json.dumps(manifest, indent=2))
            try:
                return self.publish_version(classifier_id, build_dir, final=True, serve=True, source="class_by_name",
                                            parent_version_id=serving.version_id, samples=samples)
            except StoreError:
                raise VersionError("not_found", f"no classifier {classifier_id!r}") from None
        finally:
            self.discard(build_dir)

    # ------------------------------------------------------------ feedback
    def add_feedback(self, classifier_id: str, tenant: str, data: bytes, ext: str, label: str,
                     prediction: str | None) -> FeedbackRecord:
        """Record an image with its right label (blob first, then the row). VersionError not_found when the
        classifier is gone or another tenant's."""
        if self.get_classifier(classifier_id, tenant) is None:
            raise VersionError("not_found", f"no classifier {classifier_id!r}")
        key, digest = self.put_image(classifier_id, data, ext)
        feedback_id = new_feedback_id()
        with self.db.write() as conn:
            clf = conn.execute(select(classifiers.c.current_version_id).where(
                classifiers.c.id == classifier_id, classifiers.c.tenant == tenant)).first()
            if clf is None:  # deleted meanwhile; its blobs went with it (or go with collect_garbage)
                raise VersionError("not_found", f"no classifier {classifier_id!r}")
            now = float(conn.execute(select(db_now())).scalar_one())
            conn.execute(feedback.insert().values(id=feedback_id, classifier_id=classifier_id, blob_key=key,
                                                  sha256=digest, label=label, prediction=prediction,
                                                  version_id=clf.current_version_id, created_at=now))
        return FeedbackRecord(feedback_id, classifier_id, key, label, prediction, clf.current_version_id, now)

    def list_feedback(self, classifier_id: str, tenant: str | None = None) -> list[FeedbackRecord] | None:
        if self.get_classifier(classifier_id, tenant) is None:
            return None
        with self.db.read() as conn:
            rows = conn.execute(select(feedback).where(feedback.c.classifier_id == classifier_id)
                                .order_by(feedback.c.created_at.desc())).all()
        return [FeedbackRecord(r.id, r.classifier_id, r.blob_key, r.label, r.prediction, r.version_id, r.created_at)
                for r in rows]

    def feedback_image(self, classifier_id: str, feedback_id: str, tenant: str | None = None):
        """The stored image path of one feedback, or None."""
        if self.get_classifier(classifier_id, tenant) is None:
            return None
        with self.db.read() as conn:
            key = conn.execute(select(feedback.c.blob_key).where(feedback.c.id == feedback_id,
                                                                 feedback.c.classifier_id == classifier_id)).scalar()
        return None if key is None else self.blobs.path(key)

    def count_feedback(self, classifier_id: str) -> int:
        with self.db.read() as conn:
            return int(conn.execute(select(func.count()).select_from(feedback)
                                    .where(feedback.c.classifier_id == classifier_id)).scalar_one())

    def delete_versions_records(self, conn, classifier_id: str) -> list[str]:
        """Inside delete_classifier's transaction: the classifier's feedback and every job (build and updates)."""
        from . import jobs as jobsm

        conn.execute(delete(feedback).where(feedback.c.classifier_id == classifier_id))
        job_ids = conn.execute(select(jobs.c.id).where(jobs.c.classifier_id == classifier_id)).scalars().all()
        for job_id in job_ids:
            jobsm.delete_for_classifier(conn, job_id)
        return list(job_ids)

