"""The tune task's logic in-process (real pipeline, tiny backbone): idempotence, leases, cancel, recovery."""
from __future__ import annotations

import subprocess
import threading
import time

import pytest

from rmt_core.config import TuneConfig
from rmt_core.store import JobRecord, Sample
from tests.service.helpers import COLORS, TINY_CONFIG, image_bytes, wait_for
from worker.leases import HOST, lease_dead
from worker.recovery import recover_jobs, requeue_after_seconds
from worker.tasks import run_tune_job


def _create(store, config=None, per_class=3):
    samples = [Sample(image_bytes(COLORS[label], seed=i), label, ".png")
               for label in ("red", "green") for i in range(per_class)]
    config = config or TuneConfig.from_dict(TINY_CONFIG).to_dict()
    return store.create_classifier("t", "", samples, config)


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _set_running(store, job_id, owner, lease_s=60.0, attempts=1):
    def mutate(j: JobRecord):
        j.status, j.lease_owner, j.lease_expires_at, j.attempts = "running", owner, time.time() + lease_s, attempts
        j.started_at = time.time()
    store.update_job(job_id, mutate)


def test_success_then_redelivery_is_a_no_op(store, settings):
    record, job = _create(store)
    assert run_tune_job(store, settings, job.job_id) == "succeeded"
    model = store.model_dir(record.classifier_id)
    stamp = (model / "model.onnx").stat().st_mtime_ns
    assert run_tune_job(store, settings, job.job_id) == "done"
    assert (model / "model.onnx").stat().st_mtime_ns == stamp
    final = store.get_job(job.job_id)
    assert final.status == "succeeded" and final.attempts == 1 and final.lease_owner is None
    assert list(store.tmp_dir.iterdir()) == []


def test_job_held_by_a_live_worker_is_left_alone(store, settings):
    _, job = _create(store)
    _set_running(store, job.job_id, owner=f"{HOST}:1:live")  # pid 1 always exists
    assert run_tune_job(store, settings, job.job_id) == "held"
    assert store.get_job(job.job_id).lease_owner == f"{HOST}:1:live"


def test_dead_worker_is_taken_over_at_once(store, settings):
    record, job = _create(store)
    _set_running(store, job.job_id, owner=f"{HOST}:{_dead_pid()}:gone")  # lease still valid for a minute
    assert lease_dead(store.get_job(job.job_id))
    assert run_tune_job(store, settings, job.job_id) == "succeeded"
    assert store.get_job(job.job_id).attempts == 2 and store.model_dir(record.classifier_id) is not None


def test_crash_after_publish_does_not_rebuild(store, settings):
    record, job = _create(store)
    assert run_tune_job(store, settings, job.job_id) == "succeeded"
    stamp = (store.model_dir(record.classifier_id) / "model.onnx").stat().st_mtime_ns
    _set_running(store, job.job_id, owner=f"{HOST}:{_dead_pid()}:gone")  # as if it died before recording success
    assert run_tune_job(store, settings, job.job_id) == "succeeded"
    assert (store.model_dir(record.classifier_id) / "model.onnx").stat().st_mtime_ns == stamp


def test_too_many_attempts_fail_with_a_clear_message(store, settings):
    _, job = _create(store)
    _set_running(store, job.job_id, owner=f"{HOST}:{_dead_pid()}:gone", attempts=settings.job_max_attempts)
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
    assert "no-such-backbone" in final.error["message"]
    assert store.model_dir(record.classifier_id) is None and list(store.tmp_dir.iterdir()) == []


def test_cancel_stops_a_running_job(store, settings):
    config = TuneConfig.from_dict({**TINY_CONFIG, "min_steps": 400}).to_dict()  # long enough to catch running
    record, job = _create(store, config=config)
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.setdefault("v", run_tune_job(store, settings, job.job_id)))
    thread.start()
    wait_for(lambda: (store.get_job(job.job_id).progress or {}).get("step"), 60, what="first progress")
    store.update_job(job.job_id, lambda j: setattr(j, "cancel_requested", True))
    thread.join(30)
    assert outcome["v"] == "cancelled"
    final = store.get_job(job.job_id)
    assert final.status == "cancelled" and final.finished_at and final.progress["step"] < 400
    assert store.model_dir(record.classifier_id) is None and list(store.tmp_dir.iterdir()) == []


def test_deleted_job_is_ignored(store, settings):
    record, job = _create(store)
    store.delete_classifier(record.classifier_id)
    assert run_tune_job(store, settings, job.job_id) == "missing"


@pytest.mark.parametrize("attempts, cancel, expected", [(1, False, "requeued"), (3, False, "failed"),
                                                         (1, True, "cancelled")])
def test_sweep_recovers_dead_leases(store, settings, attempts, cancel, expected):
    _, job = _create(store)
    _set_running(store, job.job_id, owner="elsewhere:123:x", lease_s=-1, attempts=attempts)  # expired
    if cancel:
        store.update_job(job.job_id, lambda j: setattr(j, "cancel_requested", True))
    sent = []
    counts = recover_jobs(store, settings, sent.append)
    assert counts[expected] == 1
    final = store.get_job(job.job_id)
    assert final.lease_owner is None
    assert final.status == {"requeued": "queued", "failed": "failed", "cancelled": "cancelled"}[expected]
    assert sent == ([job.job_id] if expected == "requeued" else [])
    assert recover_jobs(store, settings, sent.append)[expected] == 0  # exactly once


def test_sweep_leaves_live_jobs_and_resends_forgotten_ones(store, settings):
    _, live = _create(store)
    _set_running(store, live.job_id, owner="elsewhere:123:x", lease_s=60)
    _, queued = _create(store)
    sent = []
    assert recover_jobs(store, settings, sent.append) == {"requeued": 0, "failed": 0, "cancelled": 0, "resent": 0}
    later = time.time() + requeue_after_seconds(settings) + 1
    counts = recover_jobs(store, settings, sent.append, now=later)
    # by then the forgotten queued job is sent again, and the live job's lease has expired too
    assert counts["resent"] == 1 and counts["requeued"] == 1
    assert sorted(sent) == sorted([queued.job_id, live.job_id])


def test_sweep_survives_a_dead_broker(store, settings):
    _, job = _create(store)
    _set_running(store, job.job_id, owner="elsewhere:1:x", lease_s=-1)

    def refuse(_):
        raise ConnectionError("broker down")
    assert recover_jobs(store, settings, refuse)["requeued"] == 1
    assert store.get_job(job.job_id).status == "queued"  # the next "resent" sweep will deliver it
