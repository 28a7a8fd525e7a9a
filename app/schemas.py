"""Request and response bodies of the v1 API."""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel, Field

from rmt_service.store import ClassifierRecord, JobRecord, VersionRecord
from rmt_service.versions import decide

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
ClassifierStatus = Literal["queued", "running", "ready", "failed", "cancelled"]


def _ts(value: float | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, tz=timezone.utc)


class ErrorDetail(BaseModel):
    code: str = Field(description="Machine-readable reason, e.g. not_ready, invalid_config.")
    message: str = Field(description="What was wrong and what to do.")


class ErrorBody(BaseModel):
    error: ErrorDetail


class Schedule(BaseModel):
    """The optimizer schedule a create runs (TuneConfig.schedule): epochs are raised until min_steps steps run."""
    n_train: int = Field(description="Training images (the upload minus the validation holdout).")
    n_holdout: int = 0
    batch_size: int
    steps_per_epoch: int
    epochs_requested: int = Field(description="config.epochs as asked.")
    min_steps: int
    epochs: int = Field(description="Epochs that will run (raised when min_steps needs more).")
    total_steps: int
    raised_by_min_steps: bool = False
    warning: str | None = Field(None, description="Says, with the numbers, when min_steps raised the epochs.")
    recipe: str | None = Field(None, description="Named schedule (fast | paper) the unset values came from.")
    learning_rate: float | None = None
    warmup_steps: int | None = None


class PreviewState(BaseModel):
    """The candidate classify answers with before the final model is published (``final: false``)."""
    model: str = Field(description="zero-shot or head: the best candidate ready so far.")
    accuracy: float | None = Field(None, description="Its validation accuracy (holdout or k-fold), when measured.")


def _schedule(values: Any) -> Schedule | None:
    return Schedule(**values) if isinstance(values, dict) else None


def _job_warnings(job: JobRecord) -> list[str]:
    """The worker's warnings; before it starts, the schedule's (epochs raised by min_steps) from the create."""
    if job.warnings is not None:
        return list(job.warnings)
    schedule = (job.progress or {}).get("schedule") or {}
    return [schedule["warning"]] if schedule.get("warning") else []


def _preview(values: Any) -> PreviewState | None:
    return PreviewState(**values) if isinstance(values, dict) and values.get("model") else None


class ClassifierCreated(BaseModel):
    classifier_id: str
    job_id: str
    status: Literal["queued"] = "queued"
    schedule: Schedule | None = Field(None, description="Epochs, min_steps and total optimizer steps this job runs.")


class JobProgress(BaseModel):
    step: int | None = None
    total_steps: int | None = None
    epoch: int | None = None
    epochs: int | None = None
    loss: float | None = None
    train_accuracy: float | None = None
    sparsity: float | None = None
    eta_seconds: float | None = Field(None, description="Seconds left to the planned end, from this build's measured "
                                                        "step times (an early stop ends sooner).")
    eta_basis: str | None = None
    stop_reason: str | None = Field(None, description="Why tuning ended before total_steps (early stop), if it did.")


class JobPublic(BaseModel):
    job_id: str
    classifier_id: str
    status: JobStatus
    progress: JobProgress | None
    error: ErrorDetail | None
    attempts: int = Field(description="Times a worker started this job (more than 1 after a worker was lost).")
    cancel_requested: bool = False
    schedule: Schedule | None = Field(None, description="Epochs, min_steps and total optimizer steps.")
    preview: PreviewState | None = Field(None, description="The preview classify answers with while this job "
                                                           "runs (null until zero-shot is ready).")
    warnings: list[str] = Field(default_factory=list, description="No mask flipped, epochs raised by min_steps, "
                                                                  "tuned below zero-shot, too few images to validate.")
    update: dict[str, Any] | None = Field(
        None, description="For a job that makes a new version (POST /v1/classifiers/{id}/versions): version_id, "
                          "served, reason, the serving and the new version's accuracy on the same held-out images, "
                          "warm_start.")
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @classmethod
    def from_record(cls, job: JobRecord) -> "JobPublic":
        values = job.progress or {}
        progress = None
        if values.get("step") is not None:  # (before the first step it holds only the schedule and preview)
            progress = JobProgress(**{k: values.get(k) for k in JobProgress.model_fields})
        return cls(job_id=job.job_id, classifier_id=job.classifier_id, status=job.status, progress=progress,
                   error=ErrorDetail(**job.error) if job.error else None, attempts=job.attempts,
                   cancel_requested=job.cancel_requested, schedule=_schedule(values.get("schedule")),
                   preview=_preview(values.get("preview")), warnings=_job_warnings(job),
                   update=values.get("update") if isinstance(values.get("update"), dict) else None,
                   created_at=_ts(job.created_at), started_at=_ts(job.started_at), finished_at=_ts(job.finished_at))


class Artifacts(BaseModel):
    mask_bytes: int | None = None
    onnx_bytes: int | None = None
    files: list[str] = Field(default_factory=list, description="Names under /v1/classifiers/{id}/artifacts/.")


class ClassifierPublic(BaseModel):
    classifier_id: str
    name: str
    status: ClassifierStatus
    job_id: str
    labels: list[str]
    n_images: int
    backbone: str | None
    pretrained: str | None
    method: str | None
    config: dict[str, Any]
    sparsity: float | None = None
    artifacts: Artifacts | None = None
    validation: dict[str, Any] | None = Field(
        None, description="zero_shot_accuracy, tuned_accuracy, n_holdout (when images were held out).")
    parity_max_abs_diff: float | None = None
    warnings: list[str] = Field(default_factory=list)
    error: ErrorDetail | None = None
    final: bool | None = Field(None, description="true: the published model answers classify; false: a preview "
                                                 "(see preview); null: nothing answers yet.")
    preview: PreviewState | None = Field(None, description="The preview answering while the job runs.")
    schedule: Schedule | None = Field(None, description="The job's schedule (epochs, min_steps, total steps).")
    version_id: str | None = Field(None, description="The version classify answers with (null: none yet); "
                                                     "GET /v1/classifiers/{id}/versions lists them all.")
    created_at: datetime
    ready_at: datetime | None = None

    @classmethod
    def from_view(cls, record: ClassifierRecord, job: JobRecord | None,
                  current: VersionRecord | None) -> "ClassifierPublic":
        """What GET shows: status and the serving version as rmt_service.versions.decide says."""
        serving = decide(record, job, current)
        version = serving.version
        out = cls.from_record(record, job, version.manifest if version else None, list(version.files) if version
                              else [], final=version.final if version else True, status=serving.status)
        if version is not None:
            out.version_id = version.version_id
        return out

    @classmethod
    def from_record(cls, record: ClassifierRecord, job: JobRecord | None, manifest: dict[str, Any] | None,
                    files: list[str], final: bool = True, status: str | None = None) -> "ClassifierPublic":
        if status is None:  # (from_view passes decide's; this keeps old callers working)
            status = "ready" if manifest is not None and final else \
                "failed" if job is None or job.status == "succeeded" else job.status
        config = (manifest or {}).get("config") or record.config
        error = ErrorDetail(**job.error) if job is not None and job.error else None
        if job is None and manifest is None:
            error = ErrorDetail(code="job_missing", message="this classifier has no job record; delete and recreate it")
        out = cls(classifier_id=record.classifier_id, name=record.name, status=status, job_id=record.job_id,
                  labels=list((manifest or {}).get("labels") or record.labels), n_images=record.n_images, backbone=config.get("backbone"),
                  pretrained=config.get("pretrained"), method=config.get("method"), config=config,
                  error=error, created_at=_ts(record.created_at))
        job_values = (job.progress or {}) if job is not None else {}
        out.schedule = _schedule(job_values.get("schedule") or (manifest or {}).get("schedule"))
        out.warnings = _job_warnings(job) if job is not None else []
        if manifest is not None and not final:
            out.final = False
            out.preview = _preview(job_values.get("preview")) or PreviewState(
                model=str(manifest.get("candidate") or "zero-shot"), accuracy=manifest.get("preview_accuracy"))
            out.artifacts = Artifacts(files=files)
            return out
        if manifest is not None:
            out.final = True
            out.sparsity = manifest.get("sparsity")
            out.artifacts = Artifacts(mask_bytes=manifest.get("mask_bytes"), onnx_bytes=manifest.get("onnx_bytes"),
                                      files=files)
            out.validation = manifest.get("validation")
            out.parity_max_abs_diff = manifest.get("parity_max_abs_diff")
            out.warnings = list(dict.fromkeys([*(manifest.get("warnings") or []), *out.warnings]))
            out.ready_at = _ts(job.finished_at) if job is not None else None
        return out


class ClassifierList(BaseModel):
    items: list[ClassifierPublic]
    total: int
    limit: int
    offset: int
    next_cursor: str | None = Field(None, description="Pass as ?cursor= for the next page; null on the last page.")


class Prediction(BaseModel):
    label: str
    score: float


class Classification(BaseModel):
    filename: str | None = Field(None, description="The uploaded part's file name, as the client sent it.")
    label: str | None = Field(None, description="The top label, or null when the answer is unknown.")
    unknown: bool = Field(False, description="true when outlier_score is above max_outlier or the top score is "
                                             "below min_score (label is null).")
    outlier_score: float | None = Field(
        None, description="0-1, higher = less like the classes this classifier was built for (cosine distance to "
                          "the nearest class text embedding in the backbone's space, scaled on the training images "
                          "so that 0.5 is a 90%-confidence upper bound of their 97.5th percentile; classifiers "
                          "built before that measure the distance to the nearest training image). null for "
                          "classifiers built before outlier scores existed.")
    predictions: list[Prediction] = Field(description="The top-k labels, best first (also when unknown).")


class ClassifyResponse(BaseModel):
    """One shape for both uploads: ``results`` has one entry per image, in upload order."""
    version_id: str | None = Field(None, description="The classifier version that answered.")
    model: str | None = Field(None, description="The candidate that answered: zero-shot, head, mask, mask+head.")
    final: bool = Field(True, description="false while a preview answers (the job is still tuning); true once "
                                          "the published model answers.")
    min_score: float | None = Field(None, description="The top-score threshold applied (the query's, else the "
                                                      "classifier config's, else its default when it was built "
                                                      "with unknown); null = none.")
    max_outlier: float | None = Field(None, description="The outlier-score threshold applied (the query's, else "
                                                        "the classifier config's, else its default when it was "
                                                        "built with unknown); null = none.")
    results: list[Classification]
    predictions: list[Prediction] | None = Field(
        None, description="Only for a single `file` upload: the same as results[0].predictions.")
    label: str | None = Field(None, description="Only for a single `file` upload: results[0].label.")
    unknown: bool | None = Field(None, description="Only for a single `file` upload: results[0].unknown.")


VersionSource = Literal["build", "update", "class_by_name", "rollback"]


class VersionPublic(BaseModel):
    version_id: str
    created_at: datetime
    final: bool = Field(description="false for a preview published while the build job ran.")
    serving: bool = Field(description="true for the one version classify answers with.")
    labels: list[str]
    published: str | None = Field(None, description="The candidate it publishes: zero-shot, head, mask, mask+head.")
    published_accuracy: float | None = Field(None, description="Its accuracy on the validation images.")
    parent_version_id: str | None = Field(None, description="The version it was made from.")
    source: VersionSource
    images: dict[str, int] = Field(description="Images per class it was built from.")
    warm_start: dict[str, Any] | None = Field(None, description="Mask tuning started from the parent's mask.")
    change: dict[str, Any] | None = Field(None, description="What changed against the parent (added images, "
                                                            "classes, feedback, the comparison that decided).")


class VersionList(BaseModel):
    versions: list[VersionPublic] = Field(description="Newest first.")


class ClassByName(BaseModel):
    name: str = Field(description="The new class's label.", min_length=1, max_length=1000)
    prompt: str | None = Field(None, description="The text to embed; default: the classifier's prompt template "
                                                 "around the name (\"a photo of a zebra.\").", max_length=1000)


class UpdateQueued(BaseModel):
    classifier_id: str
    job_id: str
    status: Literal["queued"] = "queued"


class FeedbackCreated(BaseModel):
    feedback_id: str


class FeedbackPublic(BaseModel):
    feedback_id: str
    label: str = Field(description="The right label.")
    prediction: str | None = Field(None, description="The label the classifier gave.")
    version_id: str | None = Field(None, description="The version serving when it was recorded.")
    created_at: datetime
    image: str = Field(description="Where its image is (GET).")


class FeedbackList(BaseModel):
    feedback: list[FeedbackPublic] = Field(description="Newest first.")


def multipart_body(properties: dict, encoding: dict | None = None, one_of_required: list | None = None) -> dict:
    """OpenAPI ``openapi_extra`` for a route that reads its multipart form by hand (request.form());
    ``one_of_required``: the alternative sets of parts a request carries (exactly one of them)."""
    media: dict = {"schema": {"type": "object", "properties": properties}}
    if one_of_required:
        media["schema"]["oneOf"] = [{"required": list(parts)} for parts in one_of_required]
    if encoding:
        media["encoding"] = encoding
    return {"requestBody": {"required": True, "content": {"multipart/form-data": media}}}
