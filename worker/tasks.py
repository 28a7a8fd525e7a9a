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
from sqlalchemy.exc import DBAPIError

from rmt_core.config import TuneConfig
from rmt_service.celery_app import TUNE_TASK
from rmt_service.jobs import new_owner
from rmt_service.faults import disk_full, job_error
from rmt_service.settings import Settings
from rmt_service.store import Store, StoreError

log = logging.getLogger(__name__)

PROGRESS_WRITE_INTERVAL_S = 0.5
FINISH_RETRY_S = 1.0        # first wait before writing a job's end again (doubling, up to 10 s)
FINISH_PATIENCE_S = 3600.0  # how long a job's end is retried while the records database refuses writes
STALL_LOG_INTERVAL_S = 30.0


class _Heartbeat(threading.Thread):
    """Renews the lease while the job runs; notices a cancel request, a lost lease or a deleted job.

    A renewal that fails (the records database stalled, locked, failing over, full) is retried every interval;
    only when none has succeeded for ``grace_s`` is the job given up (reason "stalled"). A lease that expired
    meanwhile is taken back if the job was not claimed by another worker (rmt_service.jobs.heartbeat).
    """

    def __init__(self, store: Store, job_id: str, owner: str, lease_s: float, attempt: int | None = None,
                 grace_s: float | None = None):
        super().__init__(name=f"lease-{job_id}", daemon=True)
        self.store, self.job_id, self.owner, self.attempt = store, job_id, owner, attempt
        self.interval = min(1.0, lease_s / 4)
        self.grace_s = 3 * lease_s if grace_s is None else grace_s
        self.stop_requested = threading.Event()  # cancel asked, lease lost, job deleted, or stalled past the grace
        self.reason = ""
        self._done = threading.Event()
        self._last_ok = time.monotonic()
        self._last_log = 0.0

    def beat(self) -> None:
        state = self.store.heartbeat(self.job_id, self.owner, self.attempt)
        self._last_ok = time.monotonic()
        if state != "ok":
            self._give_up(state)

    def _give_up(self, reason: str) -> None:
        if not self.stop_requested.is_set():
            self.reason = reason
            self.stop_requested.set()

    def try_beat(self) -> bool:
        """One renewal; a failure is logged (at most every STALL_LOG_INTERVAL_S) and counts toward the grace."""
        try:
            self.beat()
            return True
        except Exception:
            stalled_s = time.monotonic() - self._last_ok
            if time.monotonic() - self._last_log >= STALL_LOG_INTERVAL_S:
                self._last_log = time.monotonic()
                log.warning("job %s: lease renewal failing for %.0fs (grace %.0fs)", self.job_id, stalled_s,
                            self.grace_s, exc_info=True)
            if stalled_s > self.grace_s:
                self._give_up("stalled")
            return False

    def beat_through_stall(self) -> None:
        """Renew once, waiting through a stall up to the grace (the last look before publishing)."""
        while not self.try_beat() and not self.stop_requested.is_set():
            self._done.wait(self.interval)

    def run(self) -> None:
        while not self._done.wait(self.interval):
            self.try_beat()

    def finish(self) -> None:
        self._done.set()
        self.join(timeout=5)


def _end(store: Store, job_id: str, owner: str, status: str, error: dict[str, str] | None = None) -> bool:
    """Write the job's end, retrying while the records database refuses writes (full, locked, stalled):
    the job shows its real outcome as soon as a write is possible, instead of "running" until its lease is
    swept. False when someone else's outcome stands (the lease was taken)."""
    wait, deadline = FINISH_RETRY_S, time.monotonic() + FINISH_PATIENCE_S
    while True:
        try:
            return store.finish_job(job_id, owner, status, error)
        except DBAPIError as exc:
            if time.monotonic() >= deadline:
                log.error("job %s: could not record its end (%s) for %.0fs; the lease sweep recovers it",
                          job_id, status, FINISH_PATIENCE_S)
                return False
            log.warning("job %s: recording its end (%s) failed (%s); retrying in %.0fs", job_id, status,
                        "no space" if disk_full(exc) else type(exc).__name__, wait)
            time.sleep(wait)
            wait = min(10.0, wait * 2)


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
            try:
                self.store.set_progress(self.job_id, self.owner, values, self.warnings)
            except DBAPIError as exc:  # a stalled or full database: the next write carries the same values
                log.warning("job %s: progress not recorded (%s)", self.job_id, type(exc).__name__)

    def progress(self, progress: Any) -> None:
        values = progress.to_dict()
        step, total = values.get("step") or 0, values.get("total_steps") or 0
        if "eta_seconds" not in values:
            elapsed = values.get("elapsed_s") or 0.0
            values["eta_seconds"] = round(elapsed / step * (total - step), 1) if step and total >= step else None
        self.values = values
        now = time.monotonic()
        if now - self._last < PROGRESS_WRITE_INTERVAL_S and step != total and not values.get("stop_reason"):
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
        except (StoreError, DBAPIError) as exc:  # lease lost, classifier deleted (the heartbeat stops the build)
            log.warning("job %s: preview %s not published (%s)", self.report.job_id, name, exc)  # or a stall
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
    if "base_staging" in params:  # a new base is staged with the other blobs, so a crash leaves nothing unowned
        kwargs["base_staging"] = store.blobs.base_staging
    if previews is not None and "on_base" in params and "on_candidate" in params:
        kwargs.update(on_base=previews.on_base, on_candidate=previews)
    if "run_int8_guard" in params:  # RMT_INT8_GUARD=false: versions serve fp32 only, builds skip the guard's passes
        kwargs["run_int8_guard"] = store.settings.int8_guard
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
        _end(store, job_id, owner, "failed", {"code": "classifier_deleted",
                                              "message": "the classifier was deleted before tuning finished"})
        return "failed"
    kind, spec = store.job_spec(job_id)
    current = store.current_version(job.classifier_id)
    if kind == "build" and current is not None and current.final:  # published, then the record was lost
        _end(store, job_id, owner, "succeeded")
        return "succeeded"

    heartbeat = _Heartbeat(store, job_id, owner, settings.job_lease_seconds, attempt=job.attempts,
                           grace_s=settings.stall_grace_seconds)
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
        heartbeat.beat_through_stall()  # one last look: cancelled or taken over during export?
        if heartbeat.stop_requested.is_set():
            raise TuningCancelled(heartbeat.reason)
        report.write(warnings=[*report.warnings, *((manifest or {}).get("warnings") or [])])  # the job shows them too
        # Blob first, then one transaction: version row + job succeeded, only while we hold the lease.
        _publish_through_stall(store, job.classifier_id, build_dir, job_id, owner, heartbeat)
        return "succeeded"
    except TuningCancelled:
        if heartbeat.reason == "cancelled":
            _end(store, job_id, owner, "cancelled")
            return "cancelled"
        log.warning("job %s: stopped (%s)", job_id, heartbeat.reason or "cancelled")
        return heartbeat.reason or "cancelled"
    except SoftTimeLimitExceeded:
        _end(store, job_id, owner, "failed", {
            "code": "time_limit",
            "message": f"tuning ran past the {settings.job_time_limit_seconds}s limit (RMT_JOB_TIME_LIMIT_SECONDS); "
                       "use fewer epochs or images"})
        return "failed"
    except StoreError as exc:
        if heartbeat.reason or store.get_classifier(job.classifier_id) is None:
            log.warning("job %s: not published (%s)", job_id, exc)
            _end(store, job_id, owner, "failed", {"code": "classifier_deleted",
                                                  "message": "the classifier was deleted during tuning"})
            return heartbeat.reason or "failed"
        log.exception("job %s: publishing failed", job_id)
        _end(store, job_id, owner, "failed", {"code": "publish_failed",
                                              "message": "the tuned classifier could not be stored; retry"})
        return "failed"
    except Exception as exc:
        log.exception("job %s failed", job_id)
        if _classifier_gone(store, job.classifier_id):
            error = {"code": "classifier_deleted", "message": "the classifier was deleted during tuning"}
        else:  # a fixed message per kind of fault (disk full, out of memory, ...): no paths or raw text
            error = job_error(exc)
        _end(store, job_id, owner, "failed", error)
        return "failed"
    finally:
        heartbeat.finish()
        if build_dir is not None:
            store.discard(build_dir)


def _classifier_gone(store: Store, classifier_id: str) -> bool:
    try:
        return store.get_classifier(classifier_id) is None
    except DBAPIError:  # the database cannot say now (stalled, full): the fault itself is the answer
        return False


def _publish_through_stall(store: Store, classifier_id: str, build_dir, job_id: str, owner: str,
                           heartbeat: _Heartbeat) -> None:
    """The final publish, retried while the records database is stalled (not full: that is the job's end)
    and the heartbeat has not given the job up; the build directory is back in staging after each failure."""
    from rmt_core.tuning import TuningCancelled

    while True:
        try:
            store.publish_version(classifier_id, build_dir, job_id=job_id, owner=owner, final=True)
            return
        except DBAPIError as exc:
            if disk_full(exc) or heartbeat.stop_requested.is_set() or not build_dir.is_dir():
                raise
            log.warning("job %s: publishing waits for the records database (%s)", job_id, type(exc).__name__)
            heartbeat.beat_through_stall()
            if heartbeat.stop_requested.is_set():
                raise TuningCancelled(heartbeat.reason) from exc


PRELOAD_MODULES = ("torch", "rmt_core.backbones", "rmt_core.base", "rmt_core.candidates", "rmt_core.tuning",
                   "rmt_core.export", "rmt_core.masking", "rmt_core.pipeline")


def preload_tuning(then: Callable[[], Any] | None = None) -> None:
    """Import torch and the tuning modules ahead of the first job (about 6 s on a small CPU), so the first
    create's zero-shot preview waits only for its own work; then run ``then`` (the worker prepares the default
    base). Run in a thread of each pool process: a job that arrives meanwhile waits for all of it, never runs a
    second copy beside it."""
    import importlib

    started = time.monotonic()
    try:
        for name in PRELOAD_MODULES:
            importlib.import_module(name)
    except Exception:  # the job's own import will raise it where it can be reported
        log.exception("preloading the tuning modules failed")
        return
    log.debug("tuning modules preloaded in %.1fs", time.monotonic() - started)
    if then is not None:
        try:
            then()
        except (FileNotFoundError, ValueError) as exc:  # e.g. default weights not on this machine: the job says so
            log.warning("nothing prepared ahead of the first job: %s", exc)
        except Exception:  # a job on that backbone exports the base itself, and says what is wrong
            log.exception("preparing ahead of the first job failed")


def prepare_default_base(store: Store, settings: Settings) -> str | None:
    """Export the default backbone's shared base if the data directory lacks it, and record it.

    A create with the default config then finds its base and publishes its zero-shot preview without the export
    (about a second for the builtin backbone on a small CPU, seconds for a ViT-B). Safe beside anything else:
    the export is staged in the blob store and renamed into place (a concurrent export of the same base by
    another worker or job leaves one), the row is an idempotent insert, and collection may remove the base again
    only when no version and no queued or running job uses it and it is older than the base grace. Returns the
    base id (None when switched off: ``RMT_PREPARE_DEFAULT_BASE=0``)."""
    if not settings.prepare_default_base:
        return None
    from rmt_core.pipeline import prepare_base

    started = time.monotonic()
    config = TuneConfig.from_dict({"backbone": settings.default_backbone, "pretrained": settings.default_pretrained})
    base, exported = prepare_base(config, store.bases_dir, staging=store.blobs.base_staging)
    store.register_base(base.base_id, config.backbone, config.pretrained)
    log.info("default base %s (%s, pretrained %s) %s in %.1fs", base.base_id, config.backbone, config.pretrained,
             "exported" if exported else "already stored", time.monotonic() - started)
    return base.base_id


_preload: dict[str, threading.Thread | None] = {"thread": None}


def start_preload(then: Callable[[], Any] | None = None) -> threading.Thread:
    thread = threading.Thread(target=preload_tuning, args=(then,), name="preload-tuning", daemon=True)
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
