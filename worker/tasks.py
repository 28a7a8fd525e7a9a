"""The tune task: receives a job id, re-reads the store, tunes through rmt_core, publishes atomically.

Idempotent under redelivery (acks_late): a job that is finished, or running under a live lease, is
left alone; a published model is never rebuilt; a job whose worker died is taken over. The lease is
renewed by a heartbeat thread, so a long step (loading a backbone, exporting) never looks like a crash.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

from celery import Task
from celery.exceptions import SoftTimeLimitExceeded

from rmt_core.config import TuneConfig
from rmt_service.settings import Settings
from rmt_core.store import ClassifierStore, JobRecord, StoreError

from .celery_app import TUNE_TASK
from .leases import lease_dead, new_owner

log = logging.getLogger(__name__)

PROGRESS_WRITE_INTERVAL_S = 0.5


class _Heartbeat(threading.Thread):
    """Renews the lease while the job runs; notices a cancel request or a lost lease."""

    def __init__(self, store: ClassifierStore, job_id: str, owner: str, lease_s: float):
        super().__init__(name=f"lease-{job_id}", daemon=True)
        self.store, self.job_id, self.owner, self.lease_s = store, job_id, owner, lease_s
        self.interval = min(1.0, lease_s / 4)
        self.stop_requested = threading.Event()  # cancel asked, lease lost, or job deleted
        self.reason = ""
        self._done = threading.Event()

    def beat(self) -> None:
        def renew(job: JobRecord) -> bool:
            if job.status != "running" or job.lease_owner != self.owner:
                self.reason = "lease_lost"
                return False
            if job.cancel_requested:
                self.reason = "cancelled"
            job.lease_expires_at = time.time() + self.lease_s
            return True

        if self.store.update_job(self.job_id, renew) is None:
            self.reason = "deleted"
        if self.reason:
            self.stop_requested.set()

    def run(self) -> None:
        while not self._done.wait(self.interval):
            try:
                self.beat()
            except Exception:
                log.exception("lease renewal for %s failed", self.job_id)

    def finish(self) -> None:
        self._done.set()
        self.join(timeout=5)


def _claim(store: ClassifierStore, settings: Settings, job_id: str, owner: str) -> tuple[str, JobRecord | None]:
    """Take the job if nobody live holds it. Returns (outcome, record): run | done | held | failed | missing."""
    outcome = {"value": "run"}

    def mutate(job: JobRecord) -> bool:
        now = time.time()
        if job.is_terminal:
            outcome["value"] = "done"
            return False
        if job.status == "running" and not lease_dead(job, now):
            outcome["value"] = "held"
            return False
        if job.cancel_requested:
            job.status, job.finished_at, job.lease_owner, job.lease_expires_at = "cancelled", now, None, None
            outcome["value"] = "done"
            return True
        if job.attempts >= settings.job_max_attempts:
            job.status, job.finished_at, job.lease_owner, job.lease_expires_at = "failed", now, None, None
            job.error = {"code": "worker_lost",
                         "message": f"the worker running this job stopped {job.attempts} time(s) (crash, kill or "
                                    f"out of memory); giving up after {settings.job_max_attempts} attempts"}
            outcome["value"] = "failed"
            return True
        job.status, job.attempts = "running", job.attempts + 1
        job.lease_owner, job.lease_expires_at = owner, now + settings.job_lease_seconds
        job.started_at = job.started_at or now
        job.error = None
        return True

    record = store.update_job(job_id, mutate)
    return ("missing", None) if record is None else (outcome["value"], record)


def _finish(store: ClassifierStore, job_id: str, owner: str, status: str,
            error: dict[str, str] | None = None, progress: dict[str, Any] | None = None) -> None:
    def mutate(job: JobRecord) -> bool:
        if job.is_terminal or job.lease_owner != owner:
            return False  # someone else took over; their outcome stands
        job.status, job.error, job.finished_at = status, error, time.time()
        job.lease_owner, job.lease_expires_at = None, None
        if progress is not None:
            job.progress = progress
        return True

    store.update_job(job_id, mutate)


def _progress_writer(store: ClassifierStore, job_id: str, owner: str) -> Callable[[Any], None]:
    last = {"t": 0.0}

    def report(progress: Any) -> None:
        values = progress.to_dict()
        step, total = values.get("step") or 0, values.get("total_steps") or 0
        elapsed = values.get("elapsed_s") or 0.0
        values["eta_seconds"] = round(elapsed / step * (total - step), 1) if step and total >= step else None
        now = time.monotonic()
        if now - last["t"] < PROGRESS_WRITE_INTERVAL_S and step != total:
            return
        last["t"] = now

        def mutate(job: JobRecord) -> bool:
            if job.status != "running" or job.lease_owner != owner:
                return False
            job.progress = values
            return True

        store.update_job(job_id, mutate)

    return report


def run_tune_job(store: ClassifierStore, settings: Settings, job_id: str) -> str:
    """Run one job to an end state (or leave it to whoever holds it). Returns the outcome, for logs and tests."""
    from rmt_core.pipeline import TuningCancelled, build_classifier  # torch: only in the process that tunes

    owner = new_owner()
    outcome, job = _claim(store, settings, job_id, owner)
    if outcome != "run" or job is None:
        log.info("job %s: %s, nothing to do", job_id, outcome)
        return outcome
    classifier = store.get_classifier(job.classifier_id)
    if classifier is None:
        _finish(store, job_id, owner, "failed", {"code": "classifier_deleted",
                                                 "message": "the classifier was deleted before tuning finished"})
        return "failed"
    if store.model_dir(job.classifier_id) is not None:  # published by an attempt that died right after
        _finish(store, job_id, owner, "succeeded")
        return "succeeded"

    heartbeat = _Heartbeat(store, job_id, owner, settings.job_lease_seconds)
    heartbeat.start()
    build_dir = store.new_build_dir(job.classifier_id)
    try:
        config = TuneConfig.from_dict(classifier.config)
        samples = store.samples(job.classifier_id)
        log.info("job %s: tuning %s (%d images, %d classes, attempt %d)", job_id, job.classifier_id,
                 len(samples), len(classifier.labels), job.attempts)
        build_classifier(samples, config, build_dir, progress=_progress_writer(store, job_id, owner),
                         should_stop=heartbeat.stop_requested.is_set, device=settings.device)
        heartbeat.beat()  # one last look: cancelled or taken over during export?
        if heartbeat.stop_requested.is_set():
            raise TuningCancelled(heartbeat.reason)
        try:
            store.publish(job.classifier_id, build_dir)
        except StoreError:
            if store.model_dir(job.classifier_id) is None:
                raise
            log.info("job %s: model already published by another attempt", job_id)
        _finish(store, job_id, owner, "succeeded")
        return "succeeded"
    except TuningCancelled:
        if heartbeat.reason == "cancelled":
            _finish(store, job_id, owner, "cancelled")
            return "cancelled"
        log.warning("job %s: stopped (%s)", job_id, heartbeat.reason or "cancelled")
        return heartbeat.reason or "cancelled"
    except SoftTimeLimitExceeded:
        _finish(store, job_id, owner, "failed", {
            "code": "time_limit",
            "message": f"tuning ran past the {settings.job_time_limit_seconds}s limit (RMT_JOB_TIME_LIMIT_SECONDS); "
                       "use fewer epochs or images"})
        return "failed"
    except Exception as exc:
        log.exception("job %s failed", job_id)
        if store.get_classifier(job.classifier_id) is None:
            _finish(store, job_id, owner, "failed", {"code": "classifier_deleted",
                                                     "message": "the classifier was deleted during tuning"})
        else:
            _finish(store, job_id, owner, "failed", {"code": "tuning_failed",
                                                     "message": f"{type(exc).__name__}: {exc}"})
        return "failed"
    finally:
        heartbeat.finish()
        store.discard(build_dir)


class TuneTask(Task):
    """rmt.tune(job_id). The store is opened once per worker process."""

    name = TUNE_TASK
    acks_late = True
    reject_on_worker_lost = True
    ignore_result = True
    _store: ClassifierStore | None = None

    @property
    def settings(self) -> Settings:
        return self.app.rmt_settings

    @property
    def store(self) -> ClassifierStore:
        if self._store is None:
            self._store = ClassifierStore(self.settings.data_dir)
        return self._store

    def run(self, job_id: str) -> str:
        if not isinstance(job_id, str):
            log.error("rmt.tune got %r; expected a job id", job_id)
            return "missing"
        return run_tune_job(self.store, self.settings, job_id)


def register_tasks(app) -> TuneTask:
    return app.register_task(TuneTask())
