"""Faults a long-running worker meets, injected at the store/database layer: a database stall shorter than the
grace does not throw away a running job's work; a full disk ends the job ``no_space`` as soon as a write is
possible; the embedded broker does not run its connection pool dry while its disk is full."""
from __future__ import annotations

import json
import sqlite3
import threading

import pytest
from sqlalchemy import update
from sqlalchemy.exc import OperationalError

from rmt_service import jobs as jobsm
from rmt_service.db import jobs
from rmt_service.store import Sample, Store
from tests.service.helpers import make_settings
from worker import tasks
from worker.tasks import run_tune_job


class _Step:
    def __init__(self, step: int):
        self.step = step

    def to_dict(self) -> dict:
        return {"step": self.step, "total_steps": 100}


def _stalled(what: str) -> OperationalError:
    return OperationalError("UPDATE jobs ...", {}, sqlite3.OperationalError(what))


def _create(store: Store):
    record, job = store.create_classifier("t", "", [Sample(b"a", "cat", ".png"), Sample(b"b", "dog", ".png")],
                                          {"backbone": "rmt-tiny-vit", "pretrained": "builtin"})
    return record, job


class _Stall:
    """Makes the store's job writes fail (as a locked or unreachable database does) while ``on``."""

    def __init__(self, store: Store, monkeypatch, what: str = "database is locked"):
        self.on = False
        self.failed = 0
        self.renewed_after = threading.Event()
        self.what = what
        for name in ("heartbeat", "set_progress"):
            real = getattr(store, name)
            monkeypatch.setattr(store, name, self._wrap(real, name))

    def _wrap(self, real, name):
        def call(*args, **kwargs):
            if self.on:
                self.failed += 1
                raise _stalled(self.what)
            result = real(*args, **kwargs)
            if name == "heartbeat" and self.failed:
                self.renewed_after.set()
            return result
        return call


def _fake_build(steps):
    """A build_classifier that runs ``steps(progress, should_stop)`` instead of tuning, then writes a version."""
    def build_classifier(samples, config, out_dir, progress=None, should_stop=None, device="auto", **_):
        steps(progress, should_stop)
        (out_dir / "manifest.json").write_text(json.dumps({"labels": ["cat", "dog"], "candidate": "head"}))
        return {}
    return build_classifier


def _wait(predicate, what: str, limit_s: float = 60.0) -> None:
    done = threading.Event()
    for _ in range(int(limit_s * 20)):
        if predicate():
            return
        done.wait(0.05)
    raise AssertionError(f"gave up waiting for {what}")


@pytest.fixture
def fast_settings(tmp_path, database_url):
    return make_settings(tmp_path / "data", database_url=database_url, job_lease_seconds=2,
                         job_stall_grace_seconds=30)


@pytest.fixture
def fstore(fast_settings):
    from rmt_service.migrate import prepare

    prepare(fast_settings)
    s = Store(fast_settings)
    yield s
    s.close()


def test_a_stall_shorter_than_the_grace_keeps_the_jobs_work(fstore, fast_settings, monkeypatch):
    """Lease renewal and progress writes fail for a while, the lease expires and the sweep re-queues the job;
    nobody took it meanwhile, so the job carries on and publishes."""
    record, job = _create(fstore)
    stall = _Stall(fstore, monkeypatch)

    def steps(progress, should_stop):
        progress(_Step(1))
        stall.on = True
        progress(_Step(2))  # a progress write in the stall is skipped, not fatal
        _wait(lambda: stall.failed >= 3, "failed renewals")
        with fstore.db.write() as conn:  # the lease ran out during the stall, and a sweep re-queued the job
            conn.execute(update(jobs).where(jobs.c.id == job.job_id).values(lease_expires_at=0.0))
        assert jobsm.sweep(fstore.db, fast_settings.job_max_attempts, 3600)[0]["requeued"] == 1
        stall.on = False
        _wait(stall.renewed_after.is_set, "a renewal after the stall")
        progress(_Step(3))
        assert not should_stop()

    monkeypatch.setattr("rmt_core.pipeline.build_classifier", _fake_build(steps))
    assert run_tune_job(fstore, fast_settings, job.job_id) == "succeeded"
    assert fstore.current_version(record.classifier_id) is not None
    assert fstore.get_job(job.job_id).status == "succeeded"


def test_a_stall_longer_than_the_grace_gives_the_job_up(tmp_path, database_url, monkeypatch):
    from rmt_service.migrate import prepare

    settings = make_settings(tmp_path / "data", database_url=database_url, job_lease_seconds=2,
                             job_stall_grace_seconds=1)
    prepare(settings)
    store = Store(settings)
    try:
        record, job = _create(store)
        stall = _Stall(store, monkeypatch)

        def steps(progress, should_stop):
            stall.on = True
            _wait(should_stop, "the job to be given up")
            stall.on = False

        monkeypatch.setattr("rmt_core.pipeline.build_classifier", _fake_build(steps))
        assert run_tune_job(store, settings, job.job_id) == "stalled"
        assert store.current_version(record.classifier_id) is None
    finally:
        store.close()


def test_disk_full_fails_the_job_no_space_once_a_write_is_possible(fstore, fast_settings, monkeypatch):
    """The build hits ENOSPC and the records database is full too: the job's end is written as soon as the
    database takes a write again, and the worker returns normally (no exception for Celery to retry)."""
    import errno

    record, job = _create(fstore)
    full = {"writes_refused": 0}
    real_finish = fstore.finish_job

    def finish_job(*args, **kwargs):
        if full["writes_refused"] < 3:
            full["writes_refused"] += 1
            raise _stalled("database or disk is full")
        return real_finish(*args, **kwargs)

    monkeypatch.setattr(fstore, "finish_job", finish_job)
    monkeypatch.setattr(tasks, "FINISH_RETRY_S", 0.01, raising=False)

    def steps(progress, should_stop):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("rmt_core.pipeline.build_classifier", _fake_build(steps))
    assert run_tune_job(fstore, fast_settings, job.job_id) == "failed"
    ended = fstore.get_job(job.job_id)
    assert ended.status == "failed" and ended.error["code"] == "no_space"
    assert full["writes_refused"] == 3


def test_the_embedded_broker_survives_failed_commits_without_running_its_pool_dry(tmp_path, monkeypatch):
    """Every failed commit on a full disk used to leave a broker connection checked out, until the consumer died
    with 'QueuePool limit of size 5 overflow 10 reached' and `rmt serve` restarted it in a loop."""
    from kombu.transport import sqlalchemy as sqla
    from sqlalchemy.orm import Session

    from rmt_service.celery_app import QUEUE, create_celery

    settings = make_settings(tmp_path / "data")
    settings.data_dir.mkdir(parents=True)
    app = create_celery(settings)
    app.conf.broker_transport_options = {**app.conf.broker_transport_options, "pool_timeout": 1}
    with app.connection_for_write() as conn:
        conn.default_channel.queue_declare(queue=QUEUE)
        # a message waits, so every poll below takes kombu's path (an empty queue is seen by a plain read first)
        conn.Producer().publish({"id": 1}, routing_key=QUEUE, serializer="json")
    real_commit = Session.commit
    disk = {"full": True}

    def commit(self):
        if disk["full"]:
            raise _stalled("database or disk is full")
        return real_commit(self)

    monkeypatch.setattr(Session, "commit", commit)
    for _ in range(20):  # the consumer reconnecting after each error: a new channel each time
        with app.connection_for_read() as conn:
            with pytest.raises(Exception):
                conn.default_channel.basic_get(QUEUE)
    disk["full"] = False
    with app.connection_for_write() as conn:
        message = conn.default_channel.basic_get(QUEUE)  # the failed takes left it in the queue
        assert message is not None and message.decode() == {"id": 1}
        message.ack()
        conn.Producer().publish({"id": 2}, routing_key=QUEUE, serializer="json")
        assert conn.default_channel.basic_get(QUEUE).decode() == {"id": 2}
    sqla.Channel._engines.clear()


def test_the_embedded_broker_polls_often_and_an_empty_poll_is_one_plain_read(tmp_path, monkeypatch):
    """A job waited up to a second (kombu's default poll) before the embedded worker saw it; the broker now polls
    every POLL_INTERVAL_S, and an empty poll does not run kombu's ORM queries under the write lock (which would
    cost an idle worker ~2% of a core at that rate). A message is still delivered, once, in order."""
    from kombu.transport import sqlalchemy as sqla
    from sqlalchemy.orm import Session

    from rmt_service.celery_app import QUEUE, create_celery
    from rmt_service.sqla_broker import POLL_INTERVAL_S

    settings = make_settings(tmp_path / "data")
    settings.data_dir.mkdir(parents=True)
    app = create_celery(settings)
    orm_queries = []
    real_execute = Session.execute
    monkeypatch.setattr(Session, "execute", lambda self, *a, **k: (orm_queries.append(a), real_execute(self, *a, **k))[1])
    with app.connection_for_read() as conn:
        assert conn.transport.polling_interval == POLL_INTERVAL_S < 1.0
        channel = conn.default_channel
        channel.queue_declare(queue=QUEUE)
        channel.queue_declare(queue="elsewhere")
        orm_queries.clear()
        for _ in range(5):
            assert channel.basic_get(QUEUE) is None
        assert orm_queries == []
        conn.Producer().publish({"id": 1}, routing_key=QUEUE, serializer="json")
        conn.Producer().publish({"id": 2}, routing_key=QUEUE, serializer="json")
        conn.Producer().publish({"id": 9}, routing_key="elsewhere", serializer="json")  # not this queue's
        got = [channel.basic_get(QUEUE) for _ in range(3)]
        assert [m.decode() for m in got[:2]] == [{"id": 1}, {"id": 2}] and got[2] is None
    sqla.Channel._engines.clear()


def test_a_burst_of_creates_sends_one_message_each_while_the_queue_holds_them(store, tmp_path):
    """Jobs wait behind a busy worker past their resend time: their messages are still queued, so none is sent
    again; when the queue holds fewer messages than there are queued jobs, only as many as are missing are."""
    from sqlalchemy import update as sql_update

    from rmt_service.db import db_now
    from rmt_service.celery_app import create_celery, queue_depth

    created = [_create(store)[1].job_id for _ in range(5)]
    with store.db.write() as conn:  # all of them past their resend time
        conn.execute(sql_update(jobs).values(resend_at=db_now() - 1))
    sent: list[str] = []
    assert store.recover(sent.append, queue_depth=lambda: len(created))["resent"] == 0 and sent == []
    store.claim(created[0], "w")  # a worker took one message: the other four are still in the queue
    assert store.recover(sent.append, queue_depth=lambda: 4)["resent"] == 0 and sent == []
    assert store.recover(sent.append, queue_depth=lambda: 2)["resent"] == 2  # two messages were lost
    assert store.recover(sent.append, queue_depth=lambda: 0)["resent"] == 2  # the two not re-sent yet
    assert sorted(sent) == sorted(created[1:])

    settings = make_settings(tmp_path / "broker")  # the depth of the real embedded broker's queue
    settings.data_dir.mkdir(parents=True)
    app = create_celery(settings)
    assert queue_depth(app) == 0
    app.send_task("rmt.tune", args=["job_x"], queue="rmt")
    assert queue_depth(app) == 1


def test_a_swept_lease_is_taken_back_only_if_nobody_claimed_the_job(store):
    _, job = _create(store)
    assert store.claim(job.job_id, "a")[0] == "run"
    attempt = store.get_job(job.job_id).attempts
    with store.db.write() as conn:
        conn.execute(update(jobs).where(jobs.c.id == job.job_id).values(lease_expires_at=0.0))
    assert jobsm.sweep(store.db, 3, 3600)[0]["requeued"] == 1
    assert store.heartbeat(job.job_id, "a") == "lease_lost"  # without its attempt: as before
    assert store.heartbeat(job.job_id, "a", attempt) == "ok"  # nobody took it: ours again
    again = store.get_job(job.job_id)
    assert again.status == "running" and again.lease_owner == "a" and store.job_counts()["running"] == 1
    with store.db.write() as conn:
        conn.execute(update(jobs).where(jobs.c.id == job.job_id).values(lease_expires_at=0.0))
    jobsm.sweep(store.db, 3, 3600)
    assert store.claim(job.job_id, "b")[0] == "run"  # another worker took it
    assert store.heartbeat(job.job_id, "a", attempt) == "lease_lost"
    assert store.get_job(job.job_id).lease_owner == "b"
