"""`rmt worker`: a Celery worker for tuning jobs, plus the lease sweep in its main process."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

from celery import signals
from celery.exceptions import SecurityWarning

from rmt_core.threads import apply_process_policy, available_cpus
from rmt_service.celery_app import QUEUE, TUNE_TASK, create_celery, queue_depth
from rmt_service.migrate import wait_until_ready
from rmt_service.settings import Settings
from rmt_service.store import Store

from .recovery import RecoveryThread
from .tasks import prepare_default_base, register_tasks, start_preload

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rmt worker", description="Run tuning jobs from the queue.")
    parser.add_argument("--data-dir", type=str, default=None, help="Data directory (default: RMT_DATA_DIR).")
    parser.add_argument("--concurrency", type=int, default=1,
                        help="Jobs run at once (each is a process; one per GPU is right).")
    parser.add_argument("--loglevel", default="info")
    parser.add_argument("--hostname", default=None, help="Celery node name (default: rmt-<pid>@<host>).")
    parser.add_argument("--quiet", action="store_true",
                        help="No Celery start-up banner and no warning about running as root (`rmt serve` starts "
                             "its worker so: the server already says where it serves and stores).")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = {"data_dir": args.data_dir} if args.data_dir else {}
    settings = Settings(**overrides)
    # before anything imports torch (the pool processes' preload does): libgomp reads OMP_* once, at load
    thread_plan = apply_process_policy(cpus=available_cpus(limit=settings.worker_threads))
    logging.basicConfig(level=args.loglevel.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    store = Store(settings)  # the main process's (the sweep's); each pool process opens its own
    wait_until_ready(store.db)  # the API or `rmt migrate` brings the schema to head; workers never migrate
    app = create_celery(settings)
    register_tasks(app)

    def enqueue(job_id: str) -> None:
        app.send_task(TUNE_TASK, args=[job_id], task_id=job_id, queue=QUEUE)

    sweeper = RecoveryThread(store, settings, enqueue, queue_depth=lambda: queue_depth(app))

    @signals.worker_ready.connect(weak=False)
    def _start_sweep(**_: object) -> None:
        sweeper.start()

    @signals.worker_process_init.connect(weak=False)
    def _fresh_connections(**_: object) -> None:
        store.db.engine.dispose(close=False)  # never share the parent's pooled connections after fork
        # torch & co. import in the background, then the default backbone's base is exported if the data
        # directory lacks it: the first job's preview comes seconds sooner, also on a fresh install
        start_preload(then=lambda: prepare_default_base(store, settings))

    @signals.worker_shutdown.connect(weak=False)
    def _stop_sweep(**_: object) -> None:
        sweeper.stop()

    log.info("tuning threads: %s", thread_plan.to_dict())
    log.info("worker on %s, records in %s, blobs in %s", _redacted(settings.effective_broker_url),
             _redacted(settings.effective_database_url), settings.data_dir)
    if args.quiet:  # Celery warns on every start as root; a local `rmt serve` on a dev machine often is root
        warnings.filterwarnings("ignore", category=SecurityWarning)
    app.worker_main([
        *(["--quiet"] if args.quiet else []),  # a celery option, before the subcommand
        "worker", "--loglevel", args.loglevel, "--concurrency", str(args.concurrency), "--pool", "prefork",
        "--queues", QUEUE, "--hostname", args.hostname or f"rmt-{os.getpid()}@%h", "--without-gossip",
        "--without-mingle",
    ])
    return 0


def _redacted(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = "***@" + rest.rsplit("@", 1)[1]
    return scheme + sep + rest


if __name__ == "__main__":
    sys.exit(main())
