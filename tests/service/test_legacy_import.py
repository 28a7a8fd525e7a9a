"""A data dir written by the JSON-file store (the code before the records database) is imported on first start."""
from __future__ import annotations

import json
import time

from fastapi.testclient import TestClient

from app.main import create_app
from rmt_service.legacy import MARKER
from rmt_service.store import Store
from tests.service.helpers import FakeQueue, count_rows, image_bytes
from tests.service.legacy_file_store import ClassifierStore, JobRecord, Sample, write_json_atomic


def _old_data_dir(root):
    """Four classifiers as the old store wrote them: ready, queued, running (lease held), failed."""
    old = ClassifierStore(root)
    samples = [Sample(image_bytes(seed=i), label, ".png", f"{label}{i}.png")
               for i, label in enumerate(["cat", "cat", "dog", "dog"])]
    made = {}
    for state in ("ready", "queued", "running", "failed"):
        record, job = old.create_classifier("default", state, samples, {"method": "r-amt", "epochs": 3})
        made[state] = (record, job)
        time.sleep(0.01)  # distinct created_at, so the listing order is known
    ready, ready_job = made["ready"]
    build = old.new_build_dir(ready.classifier_id)
    write_json_atomic(build / "manifest.json", {"labels": ["cat", "dog"], "method": "r-amt", "sparsity": 1.5})
    (build / "mask.rmtm").write_bytes(b"RMTM old mask")
    old.publish(ready.classifier_id, build)

    def succeed(j: JobRecord):
        j.status, j.finished_at, j.attempts = "succeeded", time.time(), 1

    def run(j: JobRecord):
        j.status, j.lease_owner, j.lease_expires_at, j.attempts = "running", "oldhost:1:x", time.time() + 99, 1

    def fail(j: JobRecord):
        j.status, j.finished_at, j.error = "failed", time.time(), {"code": "tuning_failed", "message": "boom"}
    old.update_job(ready_job.job_id, succeed)
    old.update_job(made["running"][1].job_id, run)
    old.update_job(made["failed"][1].job_id, fail)
    return made


def test_a_file_store_data_dir_is_imported_once(tmp_path, settings):
    made = _old_data_dir(settings.data_dir)
    queue = FakeQueue()
    with TestClient(create_app(settings, queue=queue)) as client:
        page = client.get("/v1/classifiers").json()
        assert page["total"] == 4
        assert [c["name"] for c in page["items"]] == ["failed", "running", "queued", "ready"]
        status = {c["name"]: c["status"] for c in page["items"]}
        assert status == {"ready": "ready", "queued": "queued", "running": "queued", "failed": "failed"}
        ready = made["ready"][0].classifier_id
        clf = client.get(f"/v1/classifiers/{ready}").json()
        assert clf["labels"] == ["cat", "dog"] and clf["n_images"] == 4 and clf["sparsity"] == 1.5
        assert clf["config"]["epochs"] == 3 and clf["artifacts"]["files"] == ["manifest.json", "mask.rmtm"]
        mask = client.get(f"/v1/classifiers/{ready}/artifacts/mask.rmtm")
        assert mask.status_code == 200 and mask.content == b"RMTM old mask"
        failed = client.get(f"/v1/jobs/{made['failed'][1].job_id}").json()
        assert failed["status"] == "failed" and failed["error"]["message"] == "boom"
        running = client.get(f"/v1/jobs/{made['running'][1].job_id}").json()
        assert running["status"] == "queued" and running["attempts"] == 1  # its old lease meant nothing here
        assert client.get("/metrics").text.count('rmt_jobs{status="queued"} 2.0') == 1

    store = Store(settings)
    try:
        samples = store.samples(made["queued"][0].classifier_id)
        assert [label for _, label in samples] == ["cat", "cat", "dog", "dog"]
        assert samples[0][0].read_bytes() == image_bytes(seed=0)
        assert str(samples[0][0]).startswith(str(settings.data_dir / "blobs" / "uploads"))
        sent = []
        assert store.recover(sent.append)["resent"] == 1 and sent == [made["running"][1].job_id]
    finally:
        store.close()
    marker = json.loads((settings.data_dir / MARKER).read_text())
    assert marker["classifiers"] == 4 and marker["versions"] == 1 and marker["skipped"] == 0

    with TestClient(create_app(settings, queue=FakeQueue())):  # a second start imports nothing again
        pass
    assert count_rows(settings, "classifiers") == 4 and count_rows(settings, "jobs") == 4
