"""What every classifier route needs: the caller's classifier, the version that serves, the error responses.

Shared by the routers, which never import each other.
"""
from __future__ import annotations

from rmt_service.store import ClassifierRecord, Store, VersionRecord

from .errors import ApiError
from .schemas import ErrorBody

ERRORS = {code: {"model": ErrorBody} for code in (400, 401, 404, 409, 413, 415, 422, 429, 503)}


def owned_classifier(store: Store, classifier_id: str, tenant: str) -> ClassifierRecord:
    record = store.get_classifier(classifier_id, tenant)
    if record is None:
        raise ApiError(404, "not_found", f"no classifier {classifier_id!r}")
    return record



def served_version(store: Store, classifier_id: str, tenant: str) -> tuple[ClassifierRecord, VersionRecord]:
    """The caller's classifier and the version classify answers with, in one query: the published one; while
    the job is queued or running, the preview (zero-shot, then the fitted head); after a failed or cancelled
    job, the preview only with config.keep_preview. 404 for another tenant's id; 409 not_ready otherwise
    (retryable while the job is active)."""
    view = store.view(classifier_id, tenant)
    if view is None:
        raise ApiError(404, "not_found", f"no classifier {classifier_id!r}")
    record, version, job = view.classifier, view.version, view.job
    status = job.status if job is not None else "failed"
    if version is not None and (version.final or status in ("queued", "running")):
        return record, version
    if status in ("queued", "running"):
        raise ApiError(409, "not_ready", f"classifier {classifier_id} is {status} and its zero-shot preview "
                                         "is not ready yet; retry in a few seconds, or follow "
                                         f"GET /v1/jobs/{record.job_id}", headers={"Retry-After": "2"})
    if version is not None and (record.config or {}).get("keep_preview"):
        return record, version
    hint = " (its preview is not served after the job ended; create with config.keep_preview=true for that)" \
        if version is not None else ""
    raise ApiError(409, "not_ready", f"classifier {classifier_id} is {status}, not ready{hint}; "
                                     f"follow GET /v1/jobs/{record.job_id}")
