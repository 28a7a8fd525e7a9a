"""/v1/classifiers: create (upload + queue tuning), list, read, delete, download artifacts."""
from __future__ import annotations

from fastapi import APIRouter, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse

from rmt_service.store import CURSOR_PATTERN, ClassifierView, QuotaExceeded

from ..access import ERRORS as _ERRORS, served_version, too_many_jobs
from ..deps import CacheDep, MetricsDep, QueueDep, SettingsDep, StoreDep, TenantDep
from ..errors import ApiError
from ..openapi import TUNE_CONFIG_REF
from ..queue import BrokerUnavailable
from ..schemas import ClassifierCreated, ClassifierList, ClassifierPublic, multipart_body
from ..uploads import parse_create

router = APIRouter(prefix="/v1/classifiers", tags=["classifiers"])

_CREATE_BODY = multipart_body({
    "files": {"type": "array", "items": {"type": "string", "format": "binary"}, "minItems": 1,
              "description": "Images; repeat the part once per image."},
    "labels": {"type": "array", "items": {"type": "string"}, "minItems": 1,
               "description": "One label per file, in the same order."},
    "archive": {"type": "string", "format": "binary",
                "description": "Instead of files+labels: a zip with one top-level folder per class."},
    "name": {"type": "string", "description": "A name for people; optional."},
    "config": {"$ref": TUNE_CONFIG_REF},
}, encoding={"config": {"contentType": "application/json"}}, one_of_required=[("files", "labels"), ("archive",)])
_MEDIA = {".json": "application/json", ".png": "image/png", ".onnx": "application/octet-stream",
          ".rmtm": "application/octet-stream"}


def public(view: ClassifierView) -> ClassifierPublic:
    return ClassifierPublic.from_view(view.classifier, view.job, view.version)


@router.post("", status_code=202, response_model=ClassifierCreated, openapi_extra=_CREATE_BODY,
             responses=_ERRORS)
async def create_classifier(request: Request, response: Response, settings: SettingsDep, store: StoreDep,
                            queue: QueueDep, tenant: TenantDep, metrics: MetricsDep) -> ClassifierCreated:
    """Upload example images and queue the tuning job that turns them into a classifier."""
    active, limit = await run_in_threadpool(store.quota_state, tenant)  # early answer, before the upload
    if active >= limit:
        raise too_many_jobs(active, limit)
    parsed = await parse_create(request, settings)
    try:  # the authoritative check: quota and create in one transaction
        record, job = await run_in_threadpool(store.create_classifier, tenant, parsed.name, parsed.samples,
                                              parsed.config, None, {"schedule": parsed.schedule})
    except QuotaExceeded as exc:
        raise too_many_jobs(exc.active, exc.limit) from None
    try:
        await run_in_threadpool(queue.enqueue, job.job_id)
    except BrokerUnavailable:
        await run_in_threadpool(store.delete_classifier, record.classifier_id)  # a create either happens or not
        raise ApiError(503, "broker_unavailable", "the job queue is unreachable, nothing was created; retry "
                                                  "shortly (classifying with ready classifiers still works)",
                       headers={"Retry-After": "10"}) from None
    metrics.jobs_created.inc()
    response.headers["Location"] = f"/v1/jobs/{job.job_id}"
    return ClassifierCreated(classifier_id=record.classifier_id, job_id=job.job_id, schedule=parsed.schedule)


@router.get("", response_model=ClassifierList, responses=_ERRORS)
def list_classifiers(store: StoreDep, tenant: TenantDep, limit: int = Query(50, ge=1, le=500),
                     cursor: str | None = Query(None, max_length=200, pattern=CURSOR_PATTERN,
                                                description="next_cursor of the previous page (keyset pagination): "
                                                            "`<created_at>_<classifier_id>` of the last item seen; "
                                                            "the page holds the classifiers created before it."),
                     offset: int = Query(0, ge=0, le=10_000, description="Deprecated: use cursor.")
                     ) -> ClassifierList:
    """The caller's classifiers, newest first; follow next_cursor for the next page."""
    try:
        views, total, next_cursor = store.list_classifiers(tenant, limit=limit, cursor=cursor, offset=offset)
    except ValueError as exc:
        raise ApiError(422, "invalid_request", str(exc)) from None
    return ClassifierList(items=[public(v) for v in views], total=total, limit=limit, offset=offset,
                          next_cursor=next_cursor)


@router.get("/{classifier_id}", response_model=ClassifierPublic, responses=_ERRORS)
def read_classifier(classifier_id: str, store: StoreDep, tenant: TenantDep) -> ClassifierPublic:
    """One classifier: labels, settings, status, sparsity, artifact sizes, validation report."""
    view = store.view(classifier_id, tenant)
    if view is None:
        raise ApiError(404, "not_found", f"no classifier {classifier_id!r}")
    return public(view)


@router.delete("/{classifier_id}", status_code=204, responses=_ERRORS)
async def delete_classifier(classifier_id: str, store: StoreDep, tenant: TenantDep, cache: CacheDep) -> Response:
    """Delete a classifier, its images and artifacts; a running job stops at its next heartbeat."""
    if not await run_in_threadpool(store.delete_classifier, classifier_id, tenant):
        raise ApiError(404, "not_found", f"no classifier {classifier_id!r}")
    cache.evict(classifier_id)  # on the event loop, which owns the cache
    return Response(status_code=204)


@router.get("/{classifier_id}/artifacts/{name}", response_class=FileResponse, responses=_ERRORS)
def download_artifact(classifier_id: str, name: str, store: StoreDep, tenant: TenantDep) -> FileResponse:
    """A published artifact of the current version: manifest.json, report.json, the mask, the head, pictures."""
    _, version = served_version(store, classifier_id, tenant)
    path = store.artifact_path(classifier_id, name, version)
    if path is None:
        available = ", ".join(version.files)
        raise ApiError(404, "not_found", f"no artifact {name!r}; available: {available}")
    return FileResponse(path, media_type=_MEDIA.get(path.suffix, "application/octet-stream"),
                        filename=f"{classifier_id}-{name}")
