"""A classifier's versions: list them, make a new one (images, classes, feedback), serve one; feedback."""
from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse
from starlette.datastructures import UploadFile

from rmt_core.config import TuneConfig
from rmt_service.store import QuotaExceeded, Sample
from rmt_service.versions import VersionError, VersionInfo, published_accuracy

from ..access import ERRORS, too_many_jobs
from ..deps import MetricsDep, QueueDep, SettingsDep, StoreDep, TenantDep
from ..errors import ApiError
from ..queue import BrokerUnavailable
from ..schemas import (ClassByName, FeedbackCreated, FeedbackList, FeedbackPublic, UpdateQueued, VersionList,
                       VersionPublic, _ts, multipart_body)
from ..uploads import (_check_allowed, _read_upload, _validate_images, clean_label, decode_image, display_name,
                       image_extension, read_config_json, read_form)

router = APIRouter(prefix="/v1/classifiers", tags=["versions"])

_STATUS = {"not_found": 404, "not_servable": 409, "not_ready": 409, "unknown_label": 422, "too_few_classes": 422,
           "nothing_to_change": 422, "class_exists": 409, "no_text_tower": 409, "needs_images": 422}

_UPDATE_BODY = multipart_body({
    "files": {"type": "array", "items": {"type": "string", "format": "binary"},
              "description": "Images to add; repeat the part once per image."},
    "labels": {"type": "array", "items": {"type": "string"},
               "description": "One label per file, in order; a label the classifier does not have adds a class."},
    "remove_labels": {"type": "array", "items": {"type": "string"}, "description": "Classes to drop."},
    "include_feedback": {"type": "boolean", "description": "true: add the recorded feedback images."},
    "config": {"type": "object", "description": "Settings over the serving version's; force=true serves the new "
                                                "version even if it is worse on the held-out images."},
}, encoding={"config": {"contentType": "application/json"}})
_FEEDBACK_BODY = multipart_body({
    "file": {"type": "string", "format": "binary", "description": "The image that was classified."},
    "label": {"type": "string", "description": "Its right label."},
    "prediction": {"type": "string", "description": "The label the classifier gave it (optional)."},
}, one_of_required=[("file", "label")])


def _error(exc: VersionError) -> ApiError:
    return ApiError(_STATUS.get(exc.code, 409), exc.code, str(exc))


def version_public(info: VersionInfo) -> VersionPublic:
    version = info.version
    manifest = version.manifest or {}
    return VersionPublic(version_id=version.version_id, created_at=_ts(version.created_at), final=version.final,
                         serving=info.serving, labels=info.labels, published=version.candidate or None,
                         published_accuracy=published_accuracy(manifest), parent_version_id=version.parent_version_id,
                         source=version.source, images=info.images, warm_start=manifest.get("warm_start"),
                         change=manifest.get("change"))


@router.get("/{classifier_id}/versions", response_model=VersionList, responses=ERRORS)
def list_versions(classifier_id: str, store: StoreDep, tenant: TenantDep) -> VersionList:
    """The classifier's versions, newest first; `serving` marks the one classify answers with."""
    infos = store.list_versions(classifier_id, tenant)
    if infos is None:
        raise ApiError(404, "not_found", f"no classifier {classifier_id!r}")
    return VersionList(versions=[version_public(i) for i in infos])


@router.post("/{classifier_id}/versions/{version_id}/serve", response_model=VersionPublic, responses=ERRORS)
async def serve_version(classifier_id: str, version_id: str, store: StoreDep, tenant: TenantDep) -> VersionPublic:
    """Serve this version from now on (rollback or roll forward); every replica, across restarts."""
    try:
        await run_in_threadpool(store.serve_version, classifier_id, version_id, tenant)
    except VersionError as exc:
        raise _error(exc) from None
    infos = await run_in_threadpool(store.list_versions, classifier_id, tenant)
    return version_public(next(i for i in infos or [] if i.version.version_id == version_id))


def _update_config(raw: Any, serving_config: dict[str, Any], settings) -> dict[str, Any]:
    """The user's settings over the serving version's, validated; ``force`` rides along outside TuneConfig."""
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        user: dict[str, Any] = {}
    elif not isinstance(raw, str):
        raise ApiError(422, "invalid_config", "config must be a JSON object sent as a text form part")
    else:
        user = read_config_json(raw)
    force = user.pop("force", False)
    if not isinstance(force, bool):
        raise ApiError(422, "invalid_config", f"config.force must be true or false, not {force!r}")
    values = {**serving_config, **user}
    _check_allowed(values, settings)
    try:
        config = TuneConfig.from_dict(values).to_dict()
    except ValueError as exc:
        raise ApiError(422, "invalid_config", f"config: {exc}") from None
    return {**config, "force": force}


@router.post("/{classifier_id}/versions", status_code=202, response_model=UpdateQueued,
             openapi_extra=_UPDATE_BODY, responses=ERRORS)
async def create_version(classifier_id: str, request: Request, response: Response, settings: SettingsDep,
                         store: StoreDep, queue: QueueDep, tenant: TenantDep, metrics: MetricsDep) -> UpdateQueued:
    """Queue a new version: the serving one's images plus these changes. It serves only if it is not worse on
    the same held-out images (or config.force); the job's `update` says which and why."""
    view = await run_in_threadpool(store.view, classifier_id, tenant)
    if view is None:
        raise ApiError(404, "not_found", f"no classifier {classifier_id!r}")
    form = await read_form(request, settings, max_files=settings.max_files + 1)
    try:
        files, labels = form.getlist("files"), form.getlist("labels")
        if len(files) > settings.max_files:
            raise ApiError(413, "too_many_files", f"{len(files)} files; the limit is {settings.max_files} "
                                                  "(RMT_MAX_FILES)")
        if len(labels) != len(files):
            raise ApiError(400, "labels_mismatch", f"got {len(files)} files and {len(labels)} labels; send one "
                                                   "'labels' value per file, in order")
        samples = []
        for i, (upload, raw_label) in enumerate(zip(files, labels)):
            if not isinstance(upload, UploadFile) or not isinstance(raw_label, str):
                raise ApiError(400, "invalid_file", f"files[{i}] must be a file part and labels[{i}] a text field")
            label = clean_label(raw_label, settings, f"labels[{i}]")
            data = await _read_upload(upload, settings.max_image_bytes, f"files[{i}]")
            samples.append(Sample(data=data, label=label, original_name=display_name(upload.filename)))
        remove = []
        for i, raw in enumerate(form.getlist("remove_labels")):
            if not isinstance(raw, str):
                raise ApiError(400, "invalid_label", f"remove_labels[{i}] must be a text field")
            remove.append(clean_label(raw, settings, f"remove_labels[{i}]"))
        raw_feedback = form.get("include_feedback") or "false"
        if not isinstance(raw_feedback, str) or raw_feedback.lower() not in ("true", "false", "1", "0"):
            raise ApiError(400, "invalid_request", "include_feedback must be true or false")
        include_feedback = raw_feedback.lower() in ("true", "1")
        raw_config = form.get("config")
    finally:
        await form.close()
    await run_in_threadpool(_validate_images, samples, settings)
    serving_config = (view.version.manifest or {}).get("config") if view.version is not None else None
    config = _update_config(raw_config, serving_config or view.classifier.config, settings)

    def store_and_queue():
        stored, written = store.put_images(classifier_id, [(s.data, s.ext) for s in samples])
        added = [(key, digest, s.label, s.original_name) for (key, digest), s in zip(stored, samples)]
        try:
            return store.create_update_job(classifier_id, tenant, added, remove, include_feedback, config)
        except BaseException:  # a refused request stores nothing
            store.discard_images(classifier_id, written)
            raise

    try:
        job = await run_in_threadpool(store_and_queue)
    except VersionError as exc:
        raise _error(exc) from None
    except QuotaExceeded as exc:
        raise too_many_jobs(exc.active, exc.limit) from None
    try:
        await run_in_threadpool(queue.enqueue, job.job_id)
    except BrokerUnavailable:  # the job stays queued; the recovery sweep sends it again
        pass
    metrics.jobs_created.inc()
    response.headers["Location"] = f"/v1/jobs/{job.job_id}"
    return UpdateQueued(classifier_id=classifier_id, job_id=job.job_id)


@router.post("/{classifier_id}/classes", status_code=201, response_model=VersionPublic, responses=ERRORS)
async def add_class_by_name(classifier_id: str, body: ClassByName, settings: SettingsDep, store: StoreDep,
                            tenant: TenantDep) -> VersionPublic:
    """Add a class known only by its name: a new version serving at once, its head row from the text tower
    (zero-shot for that class; no images, no training), everything else kept."""
    name = clean_label(body.name, settings, "name")
    prompt = None
    if body.prompt is not None and body.prompt.strip():
        prompt = clean_label(body.prompt, settings, "prompt")
    try:
        version = await run_in_threadpool(store.add_class_by_name, classifier_id, tenant, name, prompt)
    except VersionError as exc:
        raise _error(exc) from None
    infos = await run_in_threadpool(store.list_versions, classifier_id, tenant)
    return version_public(next(i for i in infos or [] if i.version.version_id == version.version_id))


@router.post("/{classifier_id}/feedback", status_code=201, response_model=FeedbackCreated,
             openapi_extra=_FEEDBACK_BODY, responses=ERRORS)
async def add_feedback(classifier_id: str, request: Request, settings: SettingsDep, store: StoreDep,
                       tenant: TenantDep) -> FeedbackCreated:
    """Record an image the classifier got wrong, with its right label (used by an update that asks for it)."""
    if await run_in_threadpool(store.get_classifier, classifier_id, tenant) is None:
        raise ApiError(404, "not_found", f"no classifier {classifier_id!r}")
    form = await read_form(request, settings, max_files=2)
    try:
        file, label, prediction = form.get("file"), form.get("label"), form.get("prediction")
        if not isinstance(file, UploadFile):
            raise ApiError(400, "no_images", "send the image as a 'file' part")
        if not isinstance(label, str):
            raise ApiError(400, "invalid_label", "send the right label as a 'label' text field")
        label = clean_label(label, settings, "label")
        if prediction is not None:
            if not isinstance(prediction, str):
                raise ApiError(400, "invalid_label", "prediction must be a text field")
            prediction = clean_label(prediction, settings, "prediction") if prediction.strip() else None
        data = await _read_upload(file, settings.max_image_bytes, "file")
    finally:
        await form.close()
    await run_in_threadpool(decode_image, data, settings, "file")
    try:
        record = await run_in_threadpool(store.add_feedback, classifier_id, tenant, data, image_extension(data),
                                         label, prediction)
    except VersionError as exc:
        raise _error(exc) from None
    return FeedbackCreated(feedback_id=record.feedback_id)


@router.get("/{classifier_id}/feedback", response_model=FeedbackList, responses=ERRORS)
def list_feedback(classifier_id: str, store: StoreDep, tenant: TenantDep) -> FeedbackList:
    """The feedback recorded for this classifier, newest first (images under feedback/{id}/image)."""
    records = store.list_feedback(classifier_id, tenant)
    if records is None:
        raise ApiError(404, "not_found", f"no classifier {classifier_id!r}")
    return FeedbackList(feedback=[FeedbackPublic(
        feedback_id=r.feedback_id, label=r.label, prediction=r.prediction, version_id=r.version_id,
        created_at=_ts(r.created_at), image=f"/v1/classifiers/{classifier_id}/feedback/{r.feedback_id}/image")
        for r in records])


@router.get("/{classifier_id}/feedback/{feedback_id}/image", response_class=FileResponse, responses=ERRORS)
def feedback_image(classifier_id: str, feedback_id: str, store: StoreDep, tenant: TenantDep) -> FileResponse:
    """The image of one feedback."""
    path = store.feedback_image(classifier_id, feedback_id, tenant)
    if path is None or not path.is_file():
        raise ApiError(404, "not_found", f"no feedback {feedback_id!r} on classifier {classifier_id!r}")
    return FileResponse(path, media_type="application/octet-stream")
