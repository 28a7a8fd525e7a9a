"""POST /v1/classifiers/{id}/classify: one image or a batch, through the cache and the micro-batcher."""
from __future__ import annotations

import asyncio
import logging
import weakref

import numpy as np
from anyio import CapacityLimiter, to_thread
from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from rmt_core.runtime import OnnxClassifier
from rmt_core.threads import available_cpus
from rmt_service.settings import Settings

from ..access import ERRORS as _ERRORS, served_version
from ..deps import CacheDep, MetricsDep, SettingsDep, StoreDep, TenantDep
from ..errors import ApiError
from ..schemas import Classification, ClassifyResponse, multipart_body
from ..uploads import PixelBudget, decode_all, display_name, read_form

router = APIRouter(prefix="/v1/classifiers", tags=["classify"])
log = logging.getLogger(__name__)

_CLASSIFY_BODY = multipart_body({
    "file": {"type": "string", "format": "binary", "description": "One image."},
    "files": {"type": "array", "items": {"type": "string", "format": "binary"}, "minItems": 1,
              "description": "Instead of file: a batch of images."},
}, one_of_required=[("file",), ("files",)])


_PREPARE_SLOTS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, CapacityLimiter] = weakref.WeakKeyDictionary()


def _prepare_slots() -> CapacityLimiter:
    """At most one decode + preprocess per CPU at a time (per event loop: a test client runs its own).
    It is CPU work under the GIL for the most part: 16 requests decoding in 16 threads of the request
    threadpool only traded the GIL and the cores back and forth (bench/RESULTS-multitenant.md)."""
    loop = asyncio.get_running_loop()
    slots = _PREPARE_SLOTS.get(loop)
    if slots is None:
        slots = _PREPARE_SLOTS[loop] = CapacityLimiter(available_cpus())
    return slots


def _prepare(blobs: list[tuple[bytes, str]], classifier: OnnxClassifier, settings: Settings) -> np.ndarray:
    """Decode and preprocess off the event loop; any bad image (or too many pixels in all) rejects the request."""
    budget = PixelBudget(settings.max_classify_pixels, "RMT_MAX_CLASSIFY_PIXELS")
    return np.stack([classifier.preprocess(image) for image in decode_all(blobs, settings, budget)])


def _threshold(name: str, query: float | None, config: dict, manifest: dict) -> float | None:
    """The request's value, else the classifier config's own, else the default the build chose on the user's
    images (stored in the manifest when the config asked for unknown answers; older manifests kept min_score
    only in their validation), else None."""
    if query is not None:
        return query
    if config.get(name) is not None:
        return float(config[name])
    if not config.get("unknown"):
        return None
    value = manifest.get(name)
    if value is None:
        value = (manifest.get("validation") or {}).get(name)
    return None if value is None else float(value)


@router.post("/{classifier_id}/classify", response_model=ClassifyResponse,
             openapi_extra=_CLASSIFY_BODY, responses=_ERRORS)
async def classify(classifier_id: str, request: Request, settings: SettingsDep, store: StoreDep,
                   tenant: TenantDep, cache: CacheDep, metrics: MetricsDep,
                   top_k: int = Query(5, ge=1, le=1000, description="Labels returned per image."),
                   min_score: float | None = Query(
                       None, ge=0.0, le=1.0,
                       description="Below this top score the answer is unknown (label null, top-k still listed). "
                                   "Default: the classifier config's min_score, else the default chosen on its own "
                                   "images when it was created with config.unknown; otherwise none."),
                   max_outlier: float | None = Query(
                       None, ge=0.0, le=1.0,
                       description="Above this outlier_score the answer is unknown. Default: the classifier "
                                   "config's max_outlier, else the default chosen on its own images when it was "
                                   "created with config.unknown; otherwise none."),
                   ) -> ClassifyResponse:
    """Classify one image (`file`) or a batch (`files`): with the published model, or while the job still
    tunes, with the best preview ready so far (`final: false`, `model` names it). Every result carries an
    `outlier_score`; `unknown` is true when it exceeds `max_outlier` or the top score is below `min_score`."""
    # The records database is read in the threadpool: never a blocking query on the event loop.
    record, version = await run_in_threadpool(served_version, store, classifier_id, tenant)
    model_dir = store.version_dir(version)
    min_score_asked, max_outlier_asked = min_score, max_outlier
    min_score = _threshold("min_score", min_score_asked, record.config, version.manifest or {})
    max_outlier = _threshold("max_outlier", max_outlier_asked, record.config, version.manifest or {})
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
            what = f"{'file' if single else f'files[{i}]'} ({display_name(getattr(part, 'filename', None))})"
            if not isinstance(part, UploadFile):
                raise ApiError(400, "invalid_file", f"{what} is a text field; send it as a file part")
            data = await part.read(settings.max_image_bytes + 1)
            blobs.append((data, what))
            names.append(part.filename)
    finally:
        await form.close()

    def serving_now():  # asked by the cache (in a thread) when it holds another version than this request's
        _, current = served_version(store, classifier_id, tenant)
        return store.version_dir(current), current

    try:  # the version serving now: a request that resolved an older one just before a publish gets the newer one
        entry = await cache.get(classifier_id, model_dir, version=version, resolve=serving_now)
    except (OSError, ValueError, RuntimeError):  # unreadable or incompatible artifact: details in the log only
        log.exception("classifier %s (%s) could not be loaded", classifier_id, model_dir)
        raise ApiError(500, "model_load_failed", f"classifier {classifier_id} could not be loaded; the operator "
                                                 "can find the details in the server log") from None
    if entry.version is not None and entry.version.version_id != version.version_id:  # the version serving now
        version = entry.version
        min_score = _threshold("min_score", min_score_asked, record.config, version.manifest or {})
        max_outlier = _threshold("max_outlier", max_outlier_asked, record.config, version.manifest or {})
    arrays = await to_thread.run_sync(_prepare, blobs, entry.classifier, settings, limiter=_prepare_slots())
    probs, outlier = await entry.predict(arrays)  # through the micro-batcher of its base, mixed with others
    metrics.classified.inc(len(blobs))
    predictions = entry.classifier.top_k(probs, top_k)
    top = np.asarray(probs).max(axis=1)
    results = []
    for i, (name, preds, score) in enumerate(zip(names, predictions, top)):
        far = None if outlier is None else round(float(outlier[i]), 4)
        unknown = ((min_score is not None and float(score) < min_score)
                   or (max_outlier is not None and far is not None and far > max_outlier))
        results.append(Classification(filename=name, predictions=preds, unknown=unknown, outlier_score=far,
                                      label=None if unknown or not preds else preds[0]["label"]))
    first = results[0] if single else None
    return ClassifyResponse(version_id=version.version_id, model=version.candidate or None, final=version.final,
                            min_score=min_score, max_outlier=max_outlier,
                            results=results, predictions=predictions[0] if single else None,
                            label=first.label if first else None, unknown=first.unknown if first else None)
