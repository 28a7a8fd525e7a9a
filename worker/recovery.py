"""The lease sweep: no job stays "running" without a live worker, and no queued job is forgotten.

Runs in every worker's main process (and is safe to run from several at once: each change is a
compare-and-set under the job's lock, so a job is re-queued by exactly one sweeper).
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from rmt_service.settings import Settings
from rmt_core.store import ClassifierStore, JobRecord

from .leases import lease_dead

log = logging.getLogger(__name__)

STALE_TMP_SECONDS = 24 * 3600


def requeue_after_seconds(settings: Settings) -> float:
    """A queued job not picked up for this long is sent again (the broker may have lost the message).

    Duplicates are harmless: a task that finds its job running or finished returns at once.
    """
    return max(600.0, 10.0 * settings.job_lease_seconds)


def recover_jobs(store: ClassifierStore, settings: Settings, enqueue: Callable[[str], None],
                 now: float | None = None) -> dict[str, int]:
    """One sweep. Returns how many jobs were re-queued, failed, cancelled or re-sent."""
    now = time.time() if now is None else now
    counts = {"requeued": 0, "failed": 0, "cancelled": 0, "resent": 0}
    for job in list(store.iter_jobs(("queued", "running"))):
        outcome: dict[str, str] = {}

        def mutate(j: JobRecord) -> bool:
            if j.status == "running" and lease_dead(j, now):
                j.lease_owner, j.lease_expires_at = None, None
                if j.cancel_requested:
                    j.status, j.finished_at = "cancelled", now
                    outcome["result"] = "cancelled"
                elif j.attempts >= settings.job_max_attempts:
                    j.status, j.finished_at = "failed", now
                    j.error = {"code": "worker_lost",
                               "message": f"the worker running this job stopped {j.attempts} time(s) "
                                          f"(crash, kill or out of memory); giving up after "
                                          f"{settings.job_max_attempts} attempts"}
                    outcome["result"] = "failed"
                else:
                    j.status, j.enqueued_at = "queued", now
                    outcome["result"] = "requeued"
                return True
            if j.status == "queued" and now - j.enqueued_at > requeue_after_seconds(settings):
                j.enqueued_at = now
                outcome["result"] = "resent"
                return True
            return False

        store.update_job(job.job_id, mutate)
        result = outcome.get("result")
        if result is None:
            continue
        counts[result] += 1
        log.warning("job %s: %s by the lease sweep", job.job_id, result)
        if result in ("requeued", "resent"):
            try:
                enqueue(job.job_id)
            except Exception as exc:  # broker down: the next sweep sends it again
                log.warning("could not re-send job %s: %s", job.job_id, exc)
    store.cleanup_tmp(STALE_TMP_SECONDS, now)
    return counts


class RecoveryThread(threading.Thread):
    """Sweeps every ``interval`` seconds until stopped."""

    def __init__(self, store: ClassifierStore, settings: Settings, enqueue: Callable[[str], None],
                 interval: float | None = None):
        super().__init__(name="rmt-lease-sweep", daemon=True)
        self.store, self.settings, self.enqueue = store, settings, enqueue
        self.interval = interval if interval is not None else max(1.0, settings.job_lease_seconds / 4)
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                recover_jobs(self.store, self.settings, self.enqueue)
            except Exception:
                log.exception("lease sweep failed; retrying in %.0fs", self.interval)
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
