"""The tune task's logic in-process (real pipeline, tiny backbone): idempotence, leases, cancel, recovery."""
from __future__ import annotations

import threading

from sqlalchemy import select, update

from rmt_core.config import TuneConfig
from rmt_service import jobs as jobsm
from rmt_service.db import db_now, jobs
from rmt_service.store import Sample
from tests.service.helpers import COLORS, TINY_CONFIG, image_bytes, wait_for
from worker.recovery import recover_jobs
from worker.tasks import run_tune_job


def _create(store, config=None, per_class=3):
    samples = [Sample(image_bytes(COLORS[label], seed=i), label, ".png")
               for label in ("red", "green") for i in range(per_class)]
    config = config or TuneConfig.from_dict(TINY_CONFIG).to_dict()
    return store.create_classifier("t", "", samples, config)


def _set_running(store, job_id, owner, lease_s=60.0, attempts=1):
    """As if a worker ``owner`` had claimed the job, its lease ending ``lease_s`` from now (database clock)."""
    with store.db.write() as conn:
        old = conn.execute(select(jobs.c.status).where(jobs.c.id == job_id)).scalar_one()
        conn.execute(update(jobs).where(jobs.c.id == job_id).values(
            status="running", lease_owner=owner, lease_expires_at=db_now() + lease_s, attempts=attempts,
            started_at=db_now()))
        jobsm._bump(conn, old, "running")


def _uploads_left(store) -> list:
    return list(store.blobs.tmp.iterdir())


def test_success_then_redelivery_is_a_no_op(store, settings):
    record, job = _create(store)
    assert run_tune_job(store, settings, job.job_id) == "succeeded"
    version = store.current_version(record.classifier_id)
    assert version.final and "manifest.json" in version.files
    # the final version, after the previews (zero-shot, and the fitted head if it validated better)
    published = sorted(p.name for p in (store.blobs.root / "versions").iterdir())
    assert version.version_id in published and 2 <= len(published) <= 3
    assert run_tune_job(store, settings, job.job_id) == "done"
    assert store.current_version(record.classifier_id).version_id == version.version_id
    final = store.get_job(job.job_id)
    assert final.status == "succeeded" and final.attempts == 1 and final.lease_owner is None
    assert _uploads_left(store) == []
    assert sorted(p.name for p in (store.blobs.root / "versions").iterdir()) == published  # nothing new


def test_job_held_by_a_live_lease_is_left_alone(store, settings):
    _, job = _create(store)
    _set_running(store, job.job_id, owner="other-host:1:live")
    assert run_tune_job(store, settings, job.job_id) == "held"
    assert store.get_job(job.job_id).lease_owner == "other-host:1:live"


def test_expired_lease_is_taken_over(store, settings):
    """Liveness is the lease alone (no pid checks across hosts): once it expires, the next delivery takes over."""
    record, job = _create(store)
    _set_running(store, job.job_id, owner="other-host:123:gone", lease_s=-1)
    assert run_tune_job(store, settings, job.job_id) == "succeeded"
    assert store.get_job(job.job_id).attempts == 2 and store.model_dir(record.classifier_id) is not None


def test_a_published_classifier_is_not_rebuilt(store, settings):
    record, job = _create(store)
    assert run_tune_job(store, settings, job.job_id) == "succeeded"
    version = store.current_version(record.classifier_id).version_id
    _set_running(store, job.job_id, owner="other-host:1:gone", lease_s=-1)  # as if its success were lost
    assert run_tune_job(store, settings, job.job_id) == "succeeded"
    assert store.current_version(record.classifier_id).version_id == version


def test_too_many_attempts_fail_with_a_clear_message(store, settings):
    _, job = _create(store)
    _set_running(store, job.job_id, owner="other-host:1:gone", lease_s=-1, attempts=settings.job_max_attempts)
    assert run_tune_job(store, settings, job.job_id) == "failed"
    final = store.get_job(job.job_id)
    assert final.status == "failed" and final.error["code"] == "worker_lost"
    assert "attempts" in final.error["message"] and final.finished_at is not None


def test_bad_backbone_fails_the_job(store, settings):
    config = TuneConfig.from_dict({**TINY_CONFIG, "backbone": "no-such-backbone"}).to_dict()
    record, job = _create(store, config=config)
    assert run_tune_job(store, settings, job.job_id) == "failed"
    final = store.get_job(job.job_id)
    assert final.status == "failed" and final.error["code"] == "tuning_failed"
    # a fixed message naming the kind of error; the exception's own text stays in the worker log
    assert "ValueError" in final.error["message"] and "worker log" in final.error["message"]
    assert store.model_dir(record.classifier_id) is None and _uploads_left(store) == []


def test_cancel_stops_a_running_job(store, settings):
    config = TuneConfig.from_dict({**TINY_CONFIG, "min_steps": 400}).to_dict()  # long enough to catch running
    record, job = _create(store, config=config)
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.setdefault("v", run_tune_job(store, settings, job.job_id)))
    thread.start()
    wait_for(lambda: (store.get_job(job.job_id).progress or {}).get("step"), 60, what="first progress")
    assert store.cancel_job(job.job_id).cancel_requested
    thread.join(30)
    assert outcome["v"] == "cancelled"
    final = store.get_job(job.job_id)
    assert final.status == "cancelled" and final.finished_at and final.progress["step"] < 400
    # only a preview was published (classify serves it after a cancel only with config.keep_preview)
    assert not store.current_version(record.classifier_id).final and _uploads_left(store) == []


def test_deleted_during_tuning_stops_and_publishes_nothing(store, settings):
    config = TuneConfig.from_dict({**TINY_CONFIG, "min_steps": 400}).to_dict()
    record, job = _create(store, config=config)
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.setdefault("v", run_tune_job(store, settings, job.job_id)))
    thread.start()
    wait_for(lambda: (store.get_job(job.job_id).progress or {}).get("step"), 60, what="first progress")
    assert store.delete_classifier(record.classifier_id)
    thread.join(30)
    assert outcome["v"] == "deleted" and store.get_job(job.job_id) is None
    assert list((store.blobs.root / "versions").iterdir()) == [] and _uploads_left(store) == []
    assert store.job_counts() == dict.fromkeys(jobsm.JOB_STATUSES, 0)


def test_deleted_job_is_ignored(store, settings):
    record, job = _create(store)
    store.delete_classifier(record.classifier_id)
    assert run_tune_job(store, settings, job.job_id) == "missing"


def test_sweep_leaves_live_jobs_and_requeues_expired_ones(store, settings):
    _, live = _create(store)
    _set_running(store, live.job_id, owner="elsewhere:123:x", lease_s=60)
    _, dead = _create(store)
    _set_running(store, dead.job_id, owner="elsewhere:124:x", lease_s=-1)
    sent = []
    counts = recover_jobs(store, sent.append)
    assert counts["requeued"] == 1 and counts["resent"] == 0 and sent == [dead.job_id]
    assert store.get_job(live.job_id).lease_owner == "elsewhere:123:x"
    assert run_tune_job(store, settings, dead.job_id) == "succeeded"


def test_a_worker_with_the_int8_guard_off_skips_it_and_its_versions_serve_fp32(store, settings, monkeypatch):
    """RMT_INT8_GUARD=false: the build never runs the guard (on a GPU worker its CPU passes are the largest part
    of a build), and the version says why it serves fp32 only; with the default the guard runs."""
    import json

    import rmt_core.pipeline as pipeline
    from rmt_core.quantize import GUARD_SKIPPED
    from rmt_core.runtime import load_classifier

    ran = []
    real_guard = pipeline.int8_guard

    def counted_guard(*args, **kwargs):
        ran.append(args[0])
        return real_guard(*args, **kwargs)

    monkeypatch.setattr(pipeline, "int8_guard", counted_guard)
    store.settings = store.settings.model_copy(update={"int8_guard": False})
    record, job = _create(store)
    assert run_tune_job(store, settings, job.job_id) == "succeeded"
    model_dir = store.model_dir(record.classifier_id)
    assert json.loads((model_dir / "manifest.json").read_text())["int8"] == GUARD_SKIPPED
    assert ran == []
    assert load_classifier(model_dir, store.bases_dir, providers="cpu", precision="int8").precision == "fp32"

    store.settings = store.settings.model_copy(update={"int8_guard": True})
    record, job = _create(store)
    assert run_tune_job(store, settings, job.job_id) == "succeeded"
    assert len(ran) == 1 and "agreement" in json.loads((store.model_dir(record.classifier_id) / "manifest.json")
                                                       .read_text())["int8"]
