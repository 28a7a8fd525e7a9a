"""The one Celery configuration, built from Settings (the API uses it to send, the worker to consume).

Messages carry only a job id (JSON); all state is in the records database (rmt_service.store). Jobs are
long and run one at a time per process: acks_late + reject_on_worker_lost + prefetch 1, so a job whose
worker dies goes back to the queue instead of being lost. Results are never stored in a backend: the job record is the result.
"""
from __future__ import annotations

from celery import Celery

from rmt_service.settings import Settings

from .sqla_broker import broker_url

TUNE_TASK = "rmt.tune"
QUEUE = "rmt"


def transport_options(settings: Settings) -> dict:
    url = settings.effective_broker_url
    if url.startswith("sqla+"):
        # The SQL transport hands its options to SQLAlchemy's create_engine, so only engine arguments here:
        # the API and the worker share one SQLite file; wait for its lock instead of failing.
        return {"connect_args": {"timeout": 30}}
    return {
        # Redis redelivers an unacked message after this long even if its worker is still running it;
        # a job may run up to the time limit, so the timeout must be longer. A worker that died is
        # handled sooner by the lease sweep (worker.recovery), not by this timeout.
        "visibility_timeout": settings.job_time_limit_seconds + 4 * settings.job_lease_seconds,
        "socket_connect_timeout": 3,
    }


def create_celery(settings: Settings) -> Celery:
    limit = settings.job_time_limit_seconds
    app = Celery("rmt", broker=broker_url(settings.effective_broker_url), set_as_current=False)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=True,
        task_store_errors_even_if_ignored=False,
        task_default_queue=QUEUE,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_time_limit=limit,
        task_soft_time_limit=max(1, limit - min(60, limit // 10)),
        worker_send_task_events=False,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=3,
        broker_transport_options=transport_options(settings),
    )
    app.rmt_settings = settings
    return app


def queue_depth(app: Celery) -> int:
    """Messages waiting in the job queue (not counting those a worker has taken and not yet acknowledged)."""
    with app.connection_for_read() as conn:
        with conn.channel() as channel:
            return int(channel.queue_declare(queue=QUEUE, durable=True, auto_delete=False).message_count)
