"""Sending job ids to the broker, and telling whether the broker is reachable."""
from __future__ import annotations

import logging

from kombu.exceptions import OperationalError

from rmt_service.settings import Settings
from rmt_service.celery_app import QUEUE, TUNE_TASK, create_celery

log = logging.getLogger(__name__)


class BrokerUnavailable(RuntimeError):
    """The broker did not accept the message (down, unreachable, refusing)."""


class JobQueue:
    """The API's side of the queue: a Celery producer that only ever sends a job id."""

    def __init__(self, settings: Settings):
        self.celery = create_celery(settings)

    def enqueue(self, job_id: str) -> None:
        try:
            # One quick retry re-opens a pooled connection that went stale (broker restarted);
            # a broker that is really down answers in well under a second.
            self.celery.send_task(TUNE_TASK, args=[job_id], task_id=job_id, queue=QUEUE, retry=True,
                                  retry_policy={"max_retries": 1, "interval_start": 0.1,
                                                "interval_step": 0.2, "interval_max": 0.3})
        except (OperationalError, OSError, ConnectionError) as exc:
            log.warning("broker refused job %s: %s", job_id, exc)
            raise BrokerUnavailable(str(exc)) from exc

    def ping(self) -> None:
        """Raise BrokerUnavailable unless a connection to the broker opens now."""
        try:
            with self.celery.connection_for_write() as conn:
                conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0.2, timeout=2)
                with conn.channel() as channel:  # a real round trip (SQL transports connect lazily)
                    channel.queue_declare(queue=QUEUE, durable=True, auto_delete=False)
        except Exception as exc:  # kombu raises transport-specific errors here
            raise BrokerUnavailable(str(exc)) from exc

    def close(self) -> None:
        self.celery.close()
