"""POST /v1/classifiers/{id}/classify: one image or a batch, through the cache and the micro-batcher."""
from __future__ import annotations

import logging

import numpy as np
from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from rmt_core.runtime import OnnxClassifier
from rmt_service.settings import Settings

from ..deps import CacheDep, MetricsDep, SettingsDep, StoreDep, TenantDep
from ..errors import ApiError
from ..schemas import Classification, ClassifyResponse, multipart_body
from ..uploads import PixelBudget, decode_image, read_form
from ..serving import ERRORS as _ERRORS, served_version

router = APIRouter(prefix="/v1/classifiers", tags=["classify"])
log = logging.getLogger(__name__)

_CLASSIFY_BODY = multipart_body({
    "file": {"type": "string", "format": "binary", "description": "One image."},
    "files": {"type": "array", "items": {"type": "string", "format": "binary"},
              "description": "Instead of file: a batch of images."},
})


def _prepare(blobs: list[tuple[bytes, str]], classifier: OnnxClassifier, settings: Settings) -> np.ndarray:
    """Decode and preprocess off the event loop; any bad image (or too many pixels in all) rejects the request."""
    budget = PixelBudget(settings.max_classify_pixels, "RMT_MAX_CLASSIFY_PIXELS")
    return np.stack([classifier.preprocess(decode_image(data, settings, what, budget)) for data, what in blobs])


@router.post("/{classifier_id}/classify", response_model=ClassifyResponse,
             openapi_extra=_CLASSIFY_BODY, responses=_ERRORS)
async def classify(classifier_id: str, request: Request, settings: SettingsDep, store: StoreDep,
                   tenant: TenantDep, cache: CacheDep, metrics: MetricsDep,
                   top_k: int = Query(5, ge=1, le=1000, description="Labels returned per image."),
                   min_score: float | None = Query(
                       None, ge=0.0, le=1.0,
                       description="Below this top score the answer is unknown (label null, top-k still listed). "
                                   "Default: the classifier's own, chosen on validation data, when it was created "
                                   "with config.unknown; otherwise none.")
                   ) -> ClassifyResponse:
    """Classify one image (`file`) or a batch (`files`): with the published model, or while the job still
    tunes, with the best preview ready so far (`final: false`, `model` names it)."""
    # The records database is read in the threadpool: never a blocking query on the event loop.
    record, version = await run_in_threadpool(served_version, store, classifier_id, tenant)
    model_dir = store.version_dir(version)
    if min_score is None and record.config.get("unknown"):
        manifest = version.manifest or {}
        min_score = manifest.get("min_score")
        if min_score is None:
            min_score = (manifest.get("validation") or {}).get("min_score")
    form = await read_form(request, settings, max_files=settings.max_classify_images + 1,
                           limit_name="RMT_MAX_CLASSIFY_IMAGES", limit=settings.max_classify_images)
    try:
        single, batch = form.getlist("file"), form.getlist("files")
        if (single and batch) or len(single) > 1:
            raise ApiError(400, "ambiguous_upload", "send one 'file' part, or repeated 'files' parts for a batch")
        parts = single or batch
        if not parts:
            raise ApiError(400, "no_images", "no image: send a 'file' part (or repeated 'files' parts)")
        if len(parts) > settings.max_classify_images:
            raise ApiError(413, "too_many_files", f"{len(parts)} images; one classify request takes at most "
                                                  f"{settings.max_classify_images} (RMT_MAX_CLASSIFY_IMAGES)")
        blobs, names = [], []
        for i, part in enumerate(parts):
            what = "file" if single else f"files[{i}]"
            if not isinstance(part, UploadFile):
                raise ApiError(400, "invalid_file", f"{what} is a text field; send it as a file part")
            data = await part.read(settings.max_image_bytes + 1)
            blobs.append((data, what))
            names.append(part.filename)
    finally:
        await form.close()
    try:  # the cache serves the version model_dir names: a newer published version replaces the cached one
        entry = await cache.get(classifier_id, model_dir)
    except (OSError, ValueError, RuntimeError):  # unreadable or incompatible artifact: details in the log only
        log.exception("classifier %s (%s) could not be loaded", classifier_id, model_dir)
        raise ApiError(500, "model_load_failed", f"classifier {classifier_id} could not be loaded; the operator "
                                                 "can find the details in the server log") from None
    arrays = await run_in_threadpool(_prepare, blobs, entry.classifier, settings)
    probs = await entry.batcher.submit(arrays)
    metrics.classified.inc(len(blobs))
    predictions = entry.classifier.top_k(probs, top_k)
    top = np.asarray(probs).max(axis=1)
    results = []
    for name, preds, score in zip(names, predictions, top):
        unknown = min_score is not None and float(score) < min_score
        results.append(Classification(filename=name, predictions=preds, unknown=unknown,
                                      label=None if unknown or not preds else preds[0]["label"]))
    first = results[0] if single else None
    return ClassifyResponse(version_id=version.version_id, model=version.candidate or None, final=version.final, min_score=min_score,
                            results=results, predictions=predictions[0] if single else None,
                            label=first.label if first else None, unknown=first.unknown if first else None)
