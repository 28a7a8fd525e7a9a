"""What every classifier route needs: the caller's classifier, the version that serves (the decision itself:
rmt_service.versions), the error responses. Shared by the routers, which never import each other."""
from __future__ import annotations

from rmt_service.store import ClassifierRecord, Store, VersionRecord
from rmt_service.versions import decide

from .errors import ApiError
from .schemas import ErrorBody

ERRORS = {code: {"model": ErrorBody} for code in (400, 401, 404, 409, 413, 415, 422, 429, 503)}


def too_many_jobs(active: int, limit: int) -> ApiError:
    """The 429 of every route that queues a job (create, new version) when the tenant is at its job limit."""
    return ApiError(429, "too_many_jobs", f"{active} jobs are queued or running; the limit is {limit}. "
                                          "Wait for one to finish.", headers={"Retry-After": "30"})


def owned_classifier(store: Store, classifier_id: str, tenant: str) -> ClassifierRecord:
    record = store.get_classifier(classifier_id, tenant)
    if record is None:
        raise ApiError(404, "not_found", f"no classifier {classifier_id!r}")
    return record


def served_version(store: Store, classifier_id: str, tenant: str) -> tuple[ClassifierRecord, VersionRecord]:
    """The caller's classifier and the version classify answers with, in one query (rmt_service.versions.decide).
    404 for another tenant's id; 409 not_ready otherwise (retryable while the build job is active)."""
    view = store.served_view(classifier_id, tenant)
    if view is None:
        raise ApiError(404, "not_found", f"no classifier {classifier_id!r}")
    serving = decide(view.classifier, view.job, view.version)
    if serving.version is None:
        raise ApiError(409, "not_ready", serving.reason, headers={"Retry-After": "2"} if serving.retry else None)
    return view.classifier, serving.version
