"""End to end with real components: a private Redis, real `rmt worker` processes, real `rmt serve`.

Each test runs in well under a minute on a 2-core CPU (tiny backbone, few steps).
"""
from __future__ import annotations

import json
import signal

import httpx
import onnx
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from rmt_service.store import Store
from tests.service.helpers import (COLORS, TINY_CONFIG, free_port, image_bytes, make_settings, service_env,
                                   upload_parts, wait_for)
from tests.service.procs import Child, RedisServer, rmt, start_worker, wait_job

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("svc") / "data"


@pytest.fixture
def worker(redis_server, data_dir, tmp_path):
    child = start_worker(data_dir, redis_server.url, tmp_path / "worker.log")
    yield child
    child.stop()


@pytest.fixture
def api(redis_server, data_dir, monkeypatch):
    settings = make_settings(data_dir, broker_url=redis_server.url, job_lease_seconds=4)
    with TestClient(create_app(settings)) as client:  # the real Celery producer, talking to Redis
        yield client


def _create(api, config=None, per_class=3) -> dict:
    files, data = upload_parts(per_class=per_class)
    if config:
        data["config"] = json.dumps({**TINY_CONFIG, **config})
    response = api.post("/v1/classifiers", files=files, data=data)
    assert response.status_code == 202, response.text
    return response.json()


def _job(api, job_id) -> dict:
    return api.get(f"/v1/jobs/{job_id}").json()


def test_redis_flow_create_poll_classify_download_delete(api, worker):
    created = _create(api, per_class=5)
    seen = set()

    def poll():
        job = _job(api, created["job_id"])
        seen.add(job["status"])
        return job if job["status"] in ("succeeded", "failed", "cancelled") else None

    job = wait_for(poll, 90, interval=0.2, what="tuning job")
    assert job["status"] == "succeeded", (job, worker.log())
    assert "queued" in seen and job["progress"]["step"] == job["progress"]["total_steps"] > 0
    assert job["started_at"] and job["finished_at"] >= job["started_at"]

    clf = api.get(f"/v1/classifiers/{created['classifier_id']}").json()
    assert clf["status"] == "ready" and clf["validation"]["n_holdout"] == 2
    result = api.post(f"/v1/classifiers/{created['classifier_id']}/classify",
                      files={"file": ("r.png", image_bytes(COLORS["red"]), "image/png")})
    assert result.status_code == 200 and {p["label"] for p in result.json()["predictions"]} == {"red", "green"}
    model = api.get(f"/v1/classifiers/{created['classifier_id']}/model.onnx")
    onnx.checker.check_model(onnx.load_from_string(model.content))
    assert api.delete(f"/v1/classifiers/{created['classifier_id']}").status_code == 204
    assert api.get(f"/v1/classifiers/{created['classifier_id']}").status_code == 404


def test_kill_9_the_process_running_the_job(api, worker, data_dir):
    """The pool process dies mid-job: its lease stops being renewed, and once it expires (4 s here, on the
    database clock) the sweep re-queues the job and the next attempt finishes it."""
    created = _create(api, config={"min_steps": 40})
    job = wait_for(lambda: (lambda j: j if (j["progress"] or {}).get("step") else None)(_job(api, created["job_id"])),
                   60, what="job to report progress")
    store = Store(make_settings(data_dir))
    owner = store.get_job(created["job_id"]).lease_owner
    store.close()
    pid = int(owner.split(":")[1])
    assert pid != worker.pid  # the prefork child, not the worker's main process
    import os
    os.kill(pid, signal.SIGKILL)
    final = wait_job(lambda: _job(api, created["job_id"]), 90)
    assert final["status"] == "succeeded", (final, worker.log())
    assert final["attempts"] == 2 and job["status"] == "running"
    assert api.get(f"/v1/classifiers/{created['classifier_id']}").json()["status"] == "ready"


def test_kill_9_the_whole_worker_then_start_another(api, redis_server, data_dir, tmp_path):
    """Worker and pool die together (the message stays unacked in Redis for hours): the next worker's
    lease sweep re-queues the job, and it finishes."""
    first = start_worker(data_dir, redis_server.url, tmp_path / "w1.log")
    created = _create(api, config={"min_steps": 40})
    wait_for(lambda: (_job(api, created["job_id"])["progress"] or {}).get("step"), 60, what="progress")
    first.kill_group()
    assert _job(api, created["job_id"])["status"] == "running"
    second = start_worker(data_dir, redis_server.url, tmp_path / "w2.log")
    try:
        final = wait_job(lambda: _job(api, created["job_id"]), 90)
        assert final["status"] == "succeeded", (final, second.log())
        assert final["attempts"] == 2
    finally:
        second.stop()


def test_redis_down_create_503_classify_works_then_recovers(api, worker, redis_server):
    created = _create(api)
    assert wait_job(lambda: _job(api, created["job_id"]), 90)["status"] == "succeeded"
    url = f"/v1/classifiers/{created['classifier_id']}/classify"

    before = api.get("/v1/classifiers").json()["total"]
    redis_server.stop()
    try:
        files, data = upload_parts(per_class=2)
        down = api.post("/v1/classifiers", files=files, data=data)
        assert down.status_code == 503 and down.json()["error"]["code"] == "broker_unavailable"
        assert api.get("/readyz").status_code == 503
        assert api.get("/v1/classifiers").json()["total"] == before  # the 503 stored nothing
        ok = api.post(url, files={"file": ("g.png", image_bytes(COLORS["green"]), "image/png")})
        assert ok.status_code == 200 and len(ok.json()["predictions"]) == 2
    finally:
        redis_server.start()  # same port, empty (no persistence)

    again = api.post("/v1/classifiers", files=files, data=data)
    assert again.status_code == 202, again.text
    assert api.get("/readyz").status_code == 200
    final = wait_job(lambda: _job(api, again.json()["job_id"]), 90)  # the worker reconnected by itself
    assert final["status"] == "succeeded", (final, worker.log())


def test_embedded_rmt_serve_end_to_end(tmp_path):
    """`rmt serve` alone: API + Celery worker child on the SQLite broker, no Redis anywhere."""
    port = free_port()
    server = Child(rmt("serve", "--port", str(port), "--data-dir", str(tmp_path / "data")),
                   service_env(RMT_JOB_LEASE_SECONDS="4", RMT_DEVICE="cpu"), tmp_path / "serve.log")
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _up(base), 60, what="rmt serve to answer /healthz")
        with httpx.Client(base_url=base, timeout=30) as http:
            assert http.get("/readyz").json()["checks"]["broker"] == "ok"
            files, data = upload_parts(per_class=3)
            created = http.post("/v1/classifiers", files=files, data=data)
            assert created.status_code == 202, created.text
            job_id, cid = created.json()["job_id"], created.json()["classifier_id"]
            final = wait_job(lambda: http.get(f"/v1/jobs/{job_id}").json(), 90)
            assert final["status"] == "succeeded", (final, server.log())
            result = http.post(f"/v1/classifiers/{cid}/classify", params={"top_k": 1},
                               files=[("files", ("a.png", image_bytes(COLORS["red"]), "image/png")),
                                      ("files", ("b.png", image_bytes(COLORS["green"]), "image/png"))])
            assert result.status_code == 200 and len(result.json()["results"]) == 2
            onnx.checker.check_model(onnx.load_from_string(http.get(f"/v1/classifiers/{cid}/model.onnx").content))
            assert http.delete(f"/v1/classifiers/{cid}").status_code == 204
        assert (tmp_path / "data" / "broker.sqlite").is_file()
    finally:
        server.signal(signal.SIGTERM)  # what docker and service managers send; SIGINT is Ctrl-C
        code = server.proc.wait(40)
    assert code == 0, server.log()
    assert "tuning worker stopped" in server.log()


def _up(base: str) -> bool:
    try:
        return httpx.get(f"{base}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_cancel_a_running_job(api, worker):
    created = _create(api, config={"min_steps": 200})
    wait_for(lambda: (_job(api, created["job_id"])["progress"] or {}).get("step"), 60, what="progress")
    response = api.delete(f"/v1/jobs/{created['job_id']}")
    assert response.status_code == 202 and response.json()["cancel_requested"] is True
    final = wait_job(lambda: _job(api, created["job_id"]), 30)
    assert final["status"] == "cancelled", (final, worker.log())
    assert final["progress"]["step"] < 200
    clf = api.get(f"/v1/classifiers/{created['classifier_id']}").json()
    assert clf["status"] == "cancelled" and clf["artifacts"] is None


def test_a_lost_broker_message_is_sent_again(redis_server, data_dir, tmp_path):
    """The queue loses a job's message (Redis flushed before any worker took it): the lease sweep of the next
    worker sends it again once its resend time has passed, and the job finishes instead of waiting forever."""
    import redis

    settings = make_settings(data_dir, broker_url=redis_server.url, job_lease_seconds=4, job_resend_seconds=2)
    with TestClient(create_app(settings)) as api:
        created = _create(api)
        redis.Redis(port=redis_server.port).flushall()  # the message is gone; the job row says "queued"
        assert _job(api, created["job_id"])["status"] == "queued"
        child = start_worker(data_dir, redis_server.url, tmp_path / "w.log")
        try:
            final = wait_job(lambda: _job(api, created["job_id"]), 120)
            assert final["status"] == "succeeded", (final, child.log())
        finally:
            child.stop()
    assert "resent" in child.log_path.read_text()
