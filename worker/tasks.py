"""The tune task: receives a job id, claims the job, tunes through rmt_core, publishes a version.

Idempotent under redelivery (acks_late): a job that is finished, or running under a live lease, is
left alone; a classifier with a published final version is never rebuilt; a job whose lease expired
(its worker died or froze) is taken over. The lease is renewed every second by a heartbeat thread, so
a long step (loading a backbone, exporting) never looks like a crash, and the publish commits only
while this worker still holds the lease (one job, one publish).
"""
from __future__ import annotations

import inspect
import logging
import threading
import time
from typing import Any, Callable

from celery import Task
from celery.exceptions import SoftTimeLimitExceeded

from rmt_core.config import TuneConfig
from rmt_service.jobs import new_owner
from rmt_service.faults import job_error
from rmt_service.settings import Settings
from rmt_service.store import Store, StoreError

from .celery_app import TUNE_TASK

log = logging.getLogger(__name__)

PROGRESS_WRITE_INTERVAL_S = 0.5


class _Heartbeat(threading.Thread):
    """Renews the lease while the job runs; notices a cancel request, a lost lease or a deleted job."""

    def __init__(self, store: Store, job_id: str, owner: str, lease_s: float):
        super().__init__(name=f"lease-{job_id}", daemon=True)
        self.store, self.job_id, self.owner = store, job_id, owner
        self.interval = min(1.0, lease_s / 4)
        self.stop_requested = threading.Event()  # cancel asked, lease lost, or job deleted
        self.reason = ""
        self._done = threading.Event()

    def beat(self) -> None:
        state = self.store.heartbeat(self.job_id, self.owner)
        if state != "ok":
            self.reason = state
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


class _JobReport:
    """What the job record shows while it runs: progress, plus the schedule, the preview and warnings.

    Every write replaces the progress JSON, so the schedule (set at create) and the preview ride along.
    """

    def __init__(self, store: Store, job_id: str, owner: str, schedule: dict[str, Any] | None):
        self.store, self.job_id, self.owner = store, job_id, owner
        self.values: dict[str, Any] = {}
        self.schedule = schedule
        self.preview: dict[str, Any] | None = None
        self.warnings: list[str] = [schedule["warning"]] if schedule and schedule.get("warning") else []
        self._last = 0.0
        self._lock = threading.Lock()

    def write(self, warnings: list[str] | None = None) -> None:
        with self._lock:
            if warnings is not None:
                self.warnings = list(dict.fromkeys(warnings))
            values = {**self.values, "schedule": self.schedule, "preview": self.preview}
            self.store.set_progress(self.job_id, self.owner, values, self.warnings)

    def progress(self, progress: Any) -> None:
        values = progress.to_dict()
        step, total = values.get("step") or 0, values.get("total_steps") or 0
        if "eta_seconds" not in values:
            elapsed = values.get("elapsed_s") or 0.0
            values["eta_seconds"] = round(elapsed / step * (total - step), 1) if step and total >= step else None
        self.values = values
        now = time.monotonic()
        if now - self._last < PROGRESS_WRITE_INTERVAL_S and step != total:
            return
        self._last = now
        self.write()


class _Previews:
    """``on_candidate`` for build_classifier: publishes zero-shot, then the fitted head if it validates better,
    as preview versions (final=False) while this worker holds the lease, so classify answers at once."""

    def __init__(self, store: Store, classifier_id: str, report: _JobReport):
        self.store, self.classifier_id, self.report = store, classifier_id, report
        self.shared: dict[str, Any] | None = None  # manifest fields from on_base (labels, base_id, ...)

    def on_base(self, shared: dict[str, Any]) -> None:
        self.shared = shared

    def __call__(self, name: str, head: Any, uses_mask: bool, accuracy: float | None) -> None:
        from rmt_core.pipeline import write_preview

        if uses_mask or self.shared is None:
            return  # a preview serves the shared base as it is: no mask
        current = self.report.preview
        if current is not None and not (accuracy is not None and (current["accuracy"] is None
                                                                  or accuracy > current["accuracy"])):
            return  # the preview answering now validated at least as well (near-ties stay with the simpler)
        build_dir = self.store.new_build_dir(self.classifier_id)
        try:
            write_preview(build_dir, self.shared, name, head, accuracy)
            self.store.publish_version(self.classifier_id, build_dir, job_id=self.report.job_id,
                                       owner=self.report.owner, final=False, candidate=name)
        except StoreError as exc:  # lease lost or classifier deleted: the heartbeat stops the build
            log.warning("job %s: preview %s not published (%s)", self.report.job_id, name, exc)
            return
        finally:
            self.store.discard(build_dir)
        log.info("job %s: preview %s published (validation accuracy %s)", self.report.job_id, name, accuracy)
        self.report.preview = {"model": name, "accuracy": accuracy}
        self.report.write()


def _schedule(config: TuneConfig, samples: list) -> dict[str, Any]:
    counts: dict[str, int] = {}
    for _, label in samples:
        counts[label] = counts.get(label, 0) + 1
    return config.schedule(list(counts.values()))


def _build_kwargs(build_classifier: Callable, store: Store, previews: _Previews | None) -> dict[str, Any]:
    """Optional arguments the installed pipeline takes (the shared bases live on the blob volume)."""
    params = inspect.signature(build_classifier).parameters
    kwargs: dict[str, Any] = {"bases_dir": store.bases_dir} if "bases_dir" in params else {}
    if previews is not None and "on_base" in params and "on_candidate" in params:
        kwargs.update(on_base=previews.on_base, on_candidate=previews)
    return kwargs


def run_tune_job(store: Store, settings: Settings, job_id: str) -> str:
    """Run one job to an end state (or leave it to whoever holds it). Returns the outcome, for logs and tests."""
    wait_for_preload()
    from rmt_core.pipeline import TuningCancelled, build_classifier  # torch: only in the process that tunes

    owner = new_owner()
    outcome, job = store.claim(job_id, owner)
    if outcome != "run" or job is None:
        log.info("job %s: %s, nothing to do", job_id, outcome)
        return outcome
    classifier = store.get_classifier(job.classifier_id)
    if classifier is None:
        store.finish_job(job_id, owner, "failed", {"code": "classifier_deleted",
                                                   "message": "the classifier was deleted before tuning finished"})
        return "failed"
    kind, spec = store.job_spec(job_id)
    current = store.current_version(job.classifier_id)
    if kind == "build" and current is not None and current.final:  # published, then the record was lost
        store.finish_job(job_id, owner, "succeeded")
        return "succeeded"

    heartbeat = _Heartbeat(store, job_id, owner, settings.job_lease_seconds)
    heartbeat.start()
    build_dir = None
    try:
        if kind == "update":  # a new version from the serving one (worker/updates.py)
            from .updates import run_update

            report = _JobReport(store, job_id, owner, None)
            report.write()
            return run_update(store, settings, job_id, owner, job.classifier_id, spec or {}, heartbeat, report,
                              _build_kwargs(build_classifier, store, None))
        build_dir = store.new_build_dir(job.classifier_id)  # inside: a full disk here fails the job too
        config = TuneConfig.from_dict(classifier.config)
        samples = store.samples(job.classifier_id)
        log.info("job %s: tuning %s (%d images, %d classes, attempt %d)", job_id, job.classifier_id,
                 len(samples), len(classifier.labels), job.attempts)
        report = _JobReport(store, job_id, owner, _schedule(config, samples))
        report.write()
        previews = _Previews(store, job.classifier_id, report)
        manifest = build_classifier(samples, config, build_dir, progress=report.progress,
                                    should_stop=heartbeat.stop_requested.is_set, device=settings.device,
                                    **_build_kwargs(build_classifier, store, previews))
        heartbeat.beat()  # one last look: cancelled or taken over during export?
        if heartbeat.stop_requested.is_set():
            raise TuningCancelled(heartbeat.reason)
        report.write(warnings=[*report.warnings, *((manifest or {}).get("warnings") or [])])  # the job shows them too
        # Blob first, then one transaction: version row + job succeeded, only while we hold the lease.
        store.publish_version(job.classifier_id, build_dir, job_id=job_id, owner=owner, final=True)
        return "succeeded"
    except TuningCancelled:
        if heartbeat.reason == "cancelled":
            store.finish_job(job_id, owner, "cancelled")
            return "cancelled"
        log.warning("job %s: stopped (%s)", job_id, heartbeat.reason or "cancelled")
        return heartbeat.reason or "cancelled"
    except SoftTimeLimitExceeded:
        store.finish_job(job_id, owner, "failed", {
            "code": "time_limit",
            "message": f"tuning ran past the {settings.job_time_limit_seconds}s limit (RMT_JOB_TIME_LIMIT_SECONDS); "
                       "use fewer epochs or images"})
        return "failed"
    except StoreError as exc:
        if heartbeat.reason or store.get_classifier(job.classifier_id) is None:
            log.warning("job %s: not published (%s)", job_id, exc)
            store.finish_job(job_id, owner, "failed", {"code": "classifier_deleted",
                                                       "message": "the classifier was deleted during tuning"})
            return heartbeat.reason or "failed"
        log.exception("job %s: publishing failed", job_id)
        store.finish_job(job_id, owner, "failed", {"code": "publish_failed",
                                                   "message": "the tuned classifier could not be stored; retry"})
        return "failed"
    except Exception as exc:
        log.exception("job %s failed", job_id)
        if store.get_classifier(job.classifier_id) is None:
            error = {"code": "classifier_deleted", "message": "the classifier was deleted during tuning"}
        else:  # a fixed message per kind of fault (disk full, out of memory, ...): no paths or raw text
            error = job_error(exc)
        store.finish_job(job_id, owner, "failed", error)
        return "failed"
    finally:
        heartbeat.finish()
        if build_dir is not None:
            store.discard(build_dir)


PRELOAD_MODULES = ("torch", "rmt_core.backbones", "rmt_core.base", "rmt_core.candidates", "rmt_core.tuning",
                   "rmt_core.export", "rmt_core.masking", "rmt_core.pipeline")


def preload_tuning() -> None:
    """Import torch and the tuning modules ahead of the first job (about 6 s on a small CPU), so the first
    create's zero-shot preview waits only for its own work. Run in a thread of each pool process: a job that
    arrives meanwhile waits on the same imports, never on a second copy."""
    import importlib

    started = time.monotonic()
    try:
        for name in PRELOAD_MODULES:
            importlib.import_module(name)
    except Exception:  # the job's own import will raise it where it can be reported
        log.exception("preloading the tuning modules failed")
        return
    log.debug("tuning modules preloaded in %.1fs", time.monotonic() - started)


_preload: dict[str, threading.Thread | None] = {"thread": None}


def start_preload() -> threading.Thread:
    thread = threading.Thread(target=preload_tuning, name="preload-tuning", daemon=True)
    _preload["thread"] = thread
    thread.start()
    return thread


def wait_for_preload() -> None:
    """Let a preload in progress finish before this thread imports the same modules: two threads importing
    torchvision's circular imports at once deadlock (Python raises _DeadlockError in one of them)."""
    thread = _preload["thread"]
    if thread is not None and thread is not threading.current_thread():
        thread.join()


class TuneTask(Task):
    """rmt.tune(job_id). The store is opened once per worker process."""

    name = TUNE_TASK
    acks_late = True
    reject_on_worker_lost = True
    ignore_result = True
    _store: Store | None = None

    @property
    def settings(self) -> Settings:
        return self.app.rmt_settings

    @property
    def store(self) -> Store:
        if self._store is None:  # in the pool process (after fork): its own engine and connections
            self._store = Store(self.settings)
        return self._store

    def run(self, job_id: str) -> str:
        if not isinstance(job_id, str):
            log.error("rmt.tune got %r; expected a job id", job_id)
            return "missing"
        return run_tune_job(self.store, self.settings, job_id)


def register_tasks(app) -> TuneTask:
    return app.register_task(TuneTask())
