"""The lease sweep: no job stays "running" without a live worker, and no queued job is forgotten.

Runs in every worker's main process and is safe to run from several at once: each recovery is a
conditional update in the database (rmt_service.jobs.sweep), so a job is re-queued by exactly one
sweeper. The queries are index ranges over the jobs that need action, so a sweep costs the same with
a hundred or a million stored jobs. Once an hour it also deletes old succeeded jobs (retention) and
blobs no record refers to; at start it removes the staging that crashed processes left (Store.clean_staging).
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from rmt_service.settings import Settings
from rmt_service.store import Store

log = logging.getLogger(__name__)

GC_INTERVAL_S = 3600.0


def sweep_interval(settings: Settings) -> float:
    """Often enough that an expired lease or a lost message waits seconds, not minutes."""
    return max(1.0, min(10.0, settings.job_lease_seconds / 4))


def recover_jobs(store: Store, enqueue: Callable[[str], None],
                 queue_depth: Callable[[], int] | None = None) -> dict[str, int]:
    """One sweep. Returns how many jobs were re-queued, failed, cancelled, re-sent or pruned."""
    return store.recover(enqueue, queue_depth)


class RecoveryThread(threading.Thread):
    """Sweeps every ``interval`` seconds until stopped; collects unreferenced blobs every hour."""

    def __init__(self, store: Store, settings: Settings, enqueue: Callable[[str], None],
                 interval: float | None = None, queue_depth: Callable[[], int] | None = None):
        super().__init__(name="rmt-lease-sweep", daemon=True)
        self.store, self.settings, self.enqueue, self.queue_depth = store, settings, enqueue, queue_depth
        self.interval = interval if interval is not None else sweep_interval(settings)
        self._stop_event = threading.Event()
        self._next_gc = time.monotonic() + 60.0

    def run(self) -> None:
        try:
            removed = self.store.clean_staging()
            if removed:
                log.info("removed %d staging entries left by stopped processes", removed)
        except Exception:
            log.exception("cleaning staging at start failed; the hourly collection retries")
        while not self._stop_event.is_set():
            try:
                recover_jobs(self.store, self.enqueue, self.queue_depth)
            except Exception:
                log.exception("lease sweep failed; retrying in %.0fs", self.interval)
            if time.monotonic() >= self._next_gc:
                self._next_gc = time.monotonic() + GC_INTERVAL_S
                try:
                    removed = self.store.collect_garbage()
                    if any(removed.values()):
                        log.info("blob collection: %s", removed)
                except Exception:
                    log.exception("blob collection failed")
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
