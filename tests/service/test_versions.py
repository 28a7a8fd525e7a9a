"""A classifier's versions: which serves (one decision), listing, serving/rollback, updates, feedback."""
from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from rmt_service.store import Store
from rmt_service.versions import decide
from tests.service.helpers import COLORS, FakeQueue, count_rows, image_bytes, make_settings, upload_parts
from worker.tasks import run_tune_job


def _error(response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code, response.text
    return response.json()["error"]["message"]


def _run(settings, job_id: str) -> str:
    store = Store(settings)
    try:
        return run_tune_job(store, settings, job_id)
    finally:
        store.close()


@pytest.fixture
def built(settings, queue):
    """A freshly tuned two-class classifier of this test's own (it gets new versions)."""
    with TestClient(create_app(settings, queue=queue)) as c:
        files, data = upload_parts(per_class=5)
        created = c.post("/v1/classifiers", files=files, data=data).json()
        assert _run(settings, created["job_id"]) == "succeeded"
        yield c, created["classifier_id"]


def _png(color: str, seed: int) -> tuple[str, tuple[str, bytes, str]]:
    return ("files", (f"{color}-{seed}.png", image_bytes(COLORS[color], seed=seed), "image/png"))


def _classify(client, cid: str, color: str = "red") -> dict:
    response = client.post(f"/v1/classifiers/{cid}/classify",
                           files={"file": ("x.png", image_bytes(COLORS[color], seed=99), "image/png")})
    assert response.status_code == 200, response.text
    return response.json()


def _multipart(data: dict) -> list:
    """Form fields as multipart parts (a request without files would otherwise go urlencoded)."""
    parts = []
    for key, value in data.items():
        for item in value if isinstance(value, list) else [value]:
            parts.append((key, (None, item)))
    return parts


def _update(client, settings, cid: str, files=(), labels=(), **data) -> dict:
    response = client.post(f"/v1/classifiers/{cid}/versions",
                           files=list(files) + _multipart({"labels": list(labels), **data}))
    assert response.status_code == 202, response.text
    job_id = response.json()["job_id"]
    assert _run(settings, job_id) == "succeeded"
    return client.get(f"/v1/jobs/{job_id}").json()


# ------------------------------------------------------------------ the one decision
def test_decide_serves_final_then_preview_only_while_the_build_runs(store):
    from rmt_service.jobs import JobRecord
    from rmt_service.store import ClassifierRecord, VersionRecord

    record = ClassifierRecord("clf_" + "0" * 24, "t", "job_" + "0" * 24, "", ["a", "b"], {}, 4, 0.0)
    preview = VersionRecord("ver_p", record.classifier_id, "zero-shot", False, "versions/p", None, {}, [], 0.0)
    final = VersionRecord("ver_f", record.classifier_id, "mask", True, "versions/f", None, {}, [], 0.0)

    def job(status):
        return JobRecord(job_id=record.job_id, classifier_id=record.classifier_id, tenant="t", status=status,
                         progress=None, warnings=None, error=None, attempts=1, cancel_requested=False,
                         created_at=0.0, started_at=None, finished_at=None)

    assert decide(record, job("failed"), final) .version is final and decide(record, None, final).status == "ready"
    assert decide(record, job("running"), preview).version is preview
    assert decide(record, job("running"), None).retry and decide(record, job("queued"), None).version is None
    ended = decide(record, job("failed"), preview)
    assert ended.version is None and ended.status == "failed" and "keep_preview" in ended.reason
    record.config = {"keep_preview": True}
    assert decide(record, job("cancelled"), preview).version is preview


# ------------------------------------------------------------------ list, classify names its version, serve
def test_versions_list_and_classify_names_the_serving_version(built):
    client, cid = built
    versions = client.get(f"/v1/classifiers/{cid}/versions").json()["versions"]
    serving = [v for v in versions if v["serving"]]
    assert len(serving) == 1 and serving[0]["final"] and serving[0]["source"] == "build"
    assert serving[0]["images"] == {"green": 5, "red": 5} and serving[0]["labels"] == ["green", "red"]
    assert [v["created_at"] for v in versions] == sorted((v["created_at"] for v in versions), reverse=True)
    answer = _classify(client, cid)
    assert answer["version_id"] == serving[0]["version_id"]
    assert client.get(f"/v1/classifiers/{cid}").json()["version_id"] == serving[0]["version_id"]


def test_unknown_and_foreign_versions_are_404_and_change_nothing(built, settings):
    client, cid = built
    serving = _classify(client, cid)["version_id"]
    _error(client.post(f"/v1/classifiers/{cid}/versions/ver_{'0' * 24}/serve"), 404, "not_found")
    _error(client.get(f"/v1/classifiers/clf_{'0' * 24}/versions"), 404, "not_found")
    # another classifier's version cannot be served through this one
    files, data = upload_parts(per_class=5)
    other = client.post("/v1/classifiers", files=files, data=data).json()
    assert _run(settings, other["job_id"]) == "succeeded"
    foreign = _classify(client, other["classifier_id"])["version_id"]
    _error(client.post(f"/v1/classifiers/{cid}/versions/{foreign}/serve"), 404, "not_found")
    assert _classify(client, cid)["version_id"] == serving


def test_another_tenants_classifier_is_invisible(tmp_path, database_url):
    settings = make_settings(tmp_path / "data", database_url=database_url, api_keys="alice:ka,bob:kb")
    with TestClient(create_app(settings, queue=FakeQueue())) as c:
        files, data = upload_parts(per_class=5)
        created = c.post("/v1/classifiers", files=files, data=data, headers={"Authorization": "Bearer ka"}).json()
        assert _run(settings, created["job_id"]) == "succeeded"
        cid, bob = created["classifier_id"], {"Authorization": "Bearer kb"}
        alice = {"Authorization": "Bearer ka"}
        version = c.get(f"/v1/classifiers/{cid}/versions", headers=alice).json()["versions"][0]["version_id"]
        _error(c.get(f"/v1/classifiers/{cid}/versions", headers=bob), 404, "not_found")
        _error(c.post(f"/v1/classifiers/{cid}/versions/{version}/serve", headers=bob), 404, "not_found")
        _error(c.get(f"/v1/classifiers/{cid}/feedback", headers=bob), 404, "not_found")
        _error(c.post(f"/v1/classifiers/{cid}/feedback", headers=bob, data={"label": "red"},
                      files={"file": ("a.png", image_bytes(COLORS["red"]), "image/png")}), 404, "not_found")
        _error(c.post(f"/v1/classifiers/{cid}/versions", headers=bob, data={"remove_labels": ["red"]}),
               404, "not_found")
        assert count_rows(settings, "feedback") == 0 and count_rows(settings, "jobs") == 1


def test_a_preview_cannot_be_served(built, settings):
    client, cid = built
    preview = [v for v in client.get(f"/v1/classifiers/{cid}/versions").json()["versions"] if not v["final"]]
    assert preview, "the build published a zero-shot preview first"
    _error(client.post(f"/v1/classifiers/{cid}/versions/{preview[0]['version_id']}/serve"), 409, "not_servable")


# ------------------------------------------------------------------ feedback
def test_feedback_is_recorded_listed_and_its_image_kept(built, settings):
    client, cid = built
    serving = _classify(client, cid)["version_id"]
    image = image_bytes(COLORS["green"], seed=7)
    response = client.post(f"/v1/classifiers/{cid}/feedback", data={"label": "green", "prediction": "red"},
                           files={"file": ("wrong.png", image, "image/png")})
    assert response.status_code == 201, response.text
    feedback_id = response.json()["feedback_id"]
    listed = client.get(f"/v1/classifiers/{cid}/feedback").json()["feedback"]
    assert [(f["feedback_id"], f["label"], f["prediction"], f["version_id"]) for f in listed] == \
        [(feedback_id, "green", "red", serving)]
    assert client.get(listed[0]["image"]).content == image
    _error(client.post(f"/v1/classifiers/{cid}/feedback", data={"label": ""},
                       files={"file": ("a.png", image, "image/png")}), 400, "invalid_label")
    _error(client.post(f"/v1/classifiers/{cid}/feedback", data={"label": "green"},
                       files={"file": ("a.png", b"not an image", "image/png")}), 415, "not_an_image")
    assert count_rows(settings, "feedback") == 1


def test_feedback_on_a_deleted_classifier_is_404_and_delete_cascades(built, settings):
    client, cid = built
    client.post(f"/v1/classifiers/{cid}/feedback", data={"label": "green"},
                files={"file": ("a.png", image_bytes(COLORS["green"], seed=3), "image/png")})
    assert client.delete(f"/v1/classifiers/{cid}").status_code == 204
    _error(client.post(f"/v1/classifiers/{cid}/feedback", data={"label": "green"},
                       files={"file": ("a.png", image_bytes(COLORS["green"]), "image/png")}), 404, "not_found")
    _error(client.get(f"/v1/classifiers/{cid}/feedback"), 404, "not_found")
    for table in ("feedback", "classifier_versions", "uploads", "jobs", "classifiers"):
        assert count_rows(settings, table) == 0, table
    assert not (settings.data_dir / "blobs" / "uploads" / cid).exists()


# ------------------------------------------------------------------ updates
def test_update_adds_a_class_warm_starts_and_serves(built, settings):
    client, cid = built
    parent = _classify(client, cid)["version_id"]
    files = [_png("blue", i) for i in range(5)]
    job = _update(client, settings, cid, files, ["blue"] * 5)
    report = job["update"]
    assert job["status"] == "succeeded" and report["added_classes"] == ["blue"] and report["added_images"] == 5
    assert report["compared_on"] > 0 and report["new_accuracy"] is not None and report["parent_accuracy"] is not None
    # judged on the build's own holdout (never trained on by either) plus the new class's held-out images
    assert report["compared_images"] == "images the serving version never trained on"
    assert report["warm_start"] == {"from_version": parent, "masks": report["warm_start"]["masks"]}
    assert report["warm_start"]["masks"] > 0
    versions = client.get(f"/v1/classifiers/{cid}/versions").json()["versions"]
    new = next(v for v in versions if v["version_id"] == report["version_id"])
    assert new["source"] == "update" and new["parent_version_id"] == parent and new["final"]
    assert new["images"] == {"blue": 5, "green": 5, "red": 5} and new["labels"] == ["blue", "green", "red"]
    assert new["warm_start"]["from_version"] == parent and new["change"]["served"] == report["served"]
    if report["served"]:  # the parent cannot name blue: the new version wins the blue held-out images
        assert new["serving"] and _classify(client, cid)["version_id"] == new["version_id"]
        assert client.get(f"/v1/classifiers/{cid}").json()["labels"] == ["blue", "green", "red"]


def test_a_worse_update_is_kept_but_not_served(built, settings, monkeypatch):
    import worker.updates as updates

    client, cid = built
    parent = _classify(client, cid)["version_id"]
    parent_dir = str(Store(settings).version_dir(Store(settings).current_version(cid)))
    # the new version scores 0.5 and its parent 1.0 on the same held-out images
    monkeypatch.setattr(updates, "accuracy_on",
                        lambda version_dir, bases_dir, samples: 1.0 if str(version_dir) == parent_dir else 0.5)
    job = _update(client, settings, cid, [_png("red", 50 + i) for i in range(3)], ["green"] * 3)
    report = job["update"]
    assert report["served"] is False and report["parent_accuracy"] == 1.0 and report["new_accuracy"] == 0.5
    assert "50.0% vs 100.0%" in report["reason"] and "stays" in report["reason"]
    assert _classify(client, cid)["version_id"] == parent
    versions = {v["version_id"]: v for v in client.get(f"/v1/classifiers/{cid}/versions").json()["versions"]}
    assert versions[report["version_id"]]["serving"] is False and versions[parent]["serving"]
    # the user can still roll forward to it on purpose
    assert client.post(f"/v1/classifiers/{cid}/versions/{report['version_id']}/serve").status_code == 200
    assert _classify(client, cid)["version_id"] == report["version_id"]
    # and config.force serves a worse one at once
    forced = _update(client, settings, cid, [_png("red", 60)], ["green"], config=json.dumps({"force": True}))
    assert forced["update"]["served"] and forced["update"]["forced"]
    assert _classify(client, cid)["version_id"] == forced["update"]["version_id"]


def test_bad_updates_are_refused_and_store_nothing(built, settings):
    client, cid = built
    jobs_before, uploads_before = count_rows(settings, "jobs"), count_rows(settings, "uploads")
    url = f"/v1/classifiers/{cid}/versions"
    message = _error(client.post(url, files=_multipart({"remove_labels": ["red"]})), 422, "too_few_classes")
    assert "at least two" in message
    _error(client.post(url, files=_multipart({"remove_labels": ["purple"]})), 422, "unknown_label")
    _error(client.post(url, files=_multipart({"include_feedback": "false"})), 422, "nothing_to_change")
    _error(client.post(url, files=_multipart({"include_feedback": "true"})), 422, "nothing_to_change")  # none yet
    _error(client.post(url, files=_multipart({"remove_labels": ["red"], "config": "{"})), 422, "invalid_config")
    _error(client.post(url, files=[_png("blue", 1)]), 400, "labels_mismatch")
    _error(client.post(f"/v1/classifiers/clf_{'0' * 24}/versions", files=_multipart({"remove_labels": ["red"]})),
           404, "not_found")
    assert count_rows(settings, "jobs") == jobs_before and count_rows(settings, "uploads") == uploads_before
    # new settings alone are a change: a retrain of the same images
    assert client.post(url, files=_multipart({"config": json.dumps({"epochs": 2})})).status_code == 202
    assert count_rows(settings, "jobs") == jobs_before + 1 and count_rows(settings, "uploads") == uploads_before


def test_an_update_beyond_the_tenants_job_limit_answers_429_and_stores_nothing(built, settings):
    client, cid = built
    url = f"/v1/classifiers/{cid}/versions"
    for _ in range(settings.max_queued_jobs):  # queued, never run: each holds one of the tenant's job slots
        assert client.post(url, files=_multipart({"config": json.dumps({"epochs": 2})})).status_code == 202
    jobs_before, uploads_before = count_rows(settings, "jobs"), count_rows(settings, "uploads")
    versions_before = client.get(url).json()["versions"]
    response = client.post(url, files=[_png("blue", 7), _png("blue", 8)] + _multipart({"labels": ["blue", "blue"]}))
    message = _error(response, 429, "too_many_jobs")
    assert f"the limit is {settings.max_queued_jobs}" in message and response.headers["retry-after"]
    assert count_rows(settings, "jobs") == jobs_before and count_rows(settings, "uploads") == uploads_before
    assert client.get(url).json()["versions"] == versions_before
    serving = next(v["version_id"] for v in versions_before if v["serving"])
    assert _classify(client, cid)["version_id"] == serving  # the serving version keeps answering


def test_retrain_with_feedback_stores_each_image_once(built, settings):
    client, cid = built
    image = image_bytes(COLORS["green"], seed=0)  # the same bytes as the first green training image
    uploads_dir = settings.data_dir / "blobs" / "uploads" / cid
    blobs_before = sorted(p.name for p in uploads_dir.iterdir())
    for _ in range(2):
        client.post(f"/v1/classifiers/{cid}/feedback", data={"label": "red", "prediction": "green"},
                    files={"file": ("again.png", image, "image/png")})
    job = _update(client, settings, cid, include_feedback="true", config=json.dumps({"force": True}))
    assert job["update"]["feedback_images"] == 2
    versions = client.get(f"/v1/classifiers/{cid}/versions").json()["versions"]
    new = next(v for v in versions if v["version_id"] == job["update"]["version_id"])
    # the corrected image moved from green to red: one image, one label, one blob
    assert new["images"] == {"green": 4, "red": 6}
    assert sorted(p.name for p in uploads_dir.iterdir()) == blobs_before


def test_serving_choice_survives_restart_and_is_seen_by_a_second_api(built, settings, tmp_path):
    import httpx

    from tests.service.helpers import free_port, service_env, wait_for
    from tests.service.procs import Child, rmt

    client, cid = built
    first = _classify(client, cid)["version_id"]
    second = _update(client, settings, cid, [_png("red", 70)], ["red"],
                     config=json.dumps({"force": True}))["update"]["version_id"]
    assert _classify(client, cid)["version_id"] == second
    port = free_port()
    env = service_env(RMT_DATABASE_URL=settings.database_url or "", RMT_DEVICE="cpu")
    api = Child(rmt("serve", "--port", str(port), "--data-dir", str(settings.data_dir), "--worker", "no"), env,
                tmp_path / "api2.log")
    base = f"http://127.0.0.1:{port}"
    try:
        def up() -> bool:
            try:
                return httpx.get(f"{base}/readyz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(up, 90, what="second API ready")

        def classify_there() -> str:
            r = httpx.post(f"{base}/v1/classifiers/{cid}/classify", timeout=30,
                           files={"file": ("x.png", image_bytes(COLORS["red"], seed=99), "image/png")})
            assert r.status_code == 200, r.text
            return r.json()["version_id"]

        assert classify_there() == second  # (its cache now holds the second version)
        assert client.post(f"/v1/classifiers/{cid}/versions/{first}/serve").status_code == 200  # rollback on A
        assert classify_there() == first  # B follows the row, not its cache
        r = httpx.post(f"{base}/v1/classifiers/{cid}/versions/{second}/serve", timeout=30)  # roll forward on B
        assert r.status_code == 200 and r.json()["serving"] and r.json()["version_id"] == second
        assert _classify(client, cid)["version_id"] == second
    finally:
        api.stop()
    with TestClient(create_app(settings, queue=FakeQueue())) as restarted:
        assert _classify(restarted, cid)["version_id"] == second


# ------------------------------------------------------------------ a class added by name
def test_a_class_added_by_name_serves_at_once(built, settings):
    client, cid = built
    parent = _classify(client, cid)["version_id"]
    response = client.post(f"/v1/classifiers/{cid}/classes", json={"name": "blue"})
    assert response.status_code == 201, response.text
    version = response.json()
    assert version["serving"] and version["source"] == "class_by_name" and version["parent_version_id"] == parent
    assert version["labels"] == ["green", "red", "blue"] and version["images"] == {"green": 5, "red": 5, "blue": 0}
    assert version["change"]["prompt"] == "a photo of a blue."
    answer = client.post(f"/v1/classifiers/{cid}/classify", params={"top_k": 3},
                         files={"file": ("x.png", image_bytes(COLORS["blue"]), "image/png")}).json()
    assert answer["version_id"] == version["version_id"]
    assert sorted(p["label"] for p in answer["predictions"]) == ["blue", "green", "red"]
    # the parent's int8 guard judged the old head: the new version must not inherit its verdict
    store = Store(settings)
    try:
        manifests = {v: store.get_version(cid, v).manifest for v in (parent, version["version_id"])}
    finally:
        store.close()
    assert "allowed" in manifests[parent]["int8"] and manifests[version["version_id"]]["int8"]["allowed"] is False

    _error(client.post(f"/v1/classifiers/{cid}/classes", json={"name": "blue"}), 409, "class_exists")
    _error(client.post(f"/v1/classifiers/{cid}/classes", json={"name": " "}), 400, "invalid_label")
    _error(client.post(f"/v1/classifiers/clf_{'0' * 24}/classes", json={"name": "zebra"}), 404, "not_found")
    # a trained update needs images of the name-only class (or its removal)
    _error(client.post(f"/v1/classifiers/{cid}/versions", files=[_png("red", 80)] + _multipart({"labels": ["red"]})),
           422, "needs_images")
    # rolling back drops the class again
    assert client.post(f"/v1/classifiers/{cid}/versions/{parent}/serve").status_code == 200
    assert client.get(f"/v1/classifiers/{cid}").json()["labels"] == ["green", "red"]


# ------------------------------------------------------------------ the schema
def test_a_0001_database_upgrades_and_its_rows_keep_their_meaning(settings):
    from alembic import command
    from sqlalchemy import text

    from rmt_service.db import Database
    from rmt_service.migrate import _config, upgrade_database

    db = Database(settings.effective_database_url)
    try:
        with db.engine.connect() as conn, conn.begin():
            command.upgrade(_config(conn), "0001")
        cid, vid = "clf_" + "1" * 24, "ver_" + "1" * 24
        with db.engine.connect() as conn, conn.begin():
            conn.execute(text("INSERT INTO classifiers (id, tenant, name, labels, config, n_images, created_at, job_id, "
                              "current_version_id) VALUES (:c, 'default', '', '[\"a\", \"b\"]', '{}', 2, 1.0, "
                              "'job_000000000000000000000000', :v)"), {"c": cid, "v": vid})
            conn.execute(text("INSERT INTO classifier_versions (version_id, classifier_id, candidate, final, blob_key, "
                              "manifest, files, created_at) VALUES (:v, :c, 'mask', true, 'versions/x', "
                              "'{\"labels\": [\"a\", \"b\"]}', '[]', 1.0)"), {"c": cid, "v": vid})
            for i, label in enumerate(["a", "b"]):
                conn.execute(text("INSERT INTO uploads (classifier_id, idx, blob_key, label, original_name) "
                                  "VALUES (:c, :i, :k, :l, '')"), {"c": cid, "i": i, "k": f"uploads/{cid}/{i}", "l": label})
        upgrade_database(db)
    finally:
        db.dispose()
    store = Store(settings)
    try:
        [info] = store.list_versions(cid, "default")
        assert info.serving and info.version.source == "build" and info.version.samples is None
        assert info.images == {"a": 1, "b": 1}
        assert store.job_spec("job_" + "0" * 24) == ("build", None)
    finally:
        store.close()


def test_before_the_first_build_there_is_nothing_to_change(client, settings):
    files, data = upload_parts(per_class=5)
    cid = client.post("/v1/classifiers", files=files, data=data).json()["classifier_id"]
    assert client.get(f"/v1/classifiers/{cid}/versions").json() == {"versions": []}
    _error(client.post(f"/v1/classifiers/{cid}/classes", json={"name": "blue"}), 409, "not_ready")
    uploads_dir = settings.data_dir / "blobs" / "uploads" / cid
    before = sorted(p.name for p in uploads_dir.iterdir())
    _error(client.post(f"/v1/classifiers/{cid}/versions", files=[_png("blue", 1)] + _multipart({"labels": ["blue"]})),
           409, "not_ready")
    assert count_rows(settings, "jobs") == 1 and count_rows(settings, "classifier_versions") == 0
    assert sorted(p.name for p in uploads_dir.iterdir()) == before  # the refused image was not kept
