"""The HTTP contract and every error path, through FastAPI's TestClient (the broker is a recording double)."""
from __future__ import annotations

import io
import json

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from tests.service.helpers import (COLORS, TINY_CONFIG, count_rows, image_bytes, make_settings, upload_parts,
                                   zip_bytes)


def _error(response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    if code is not None:
        assert body["error"]["code"] == code, body
    return body["error"]


def _nothing_stored(settings, queue) -> None:
    assert queue.sent == []
    assert count_rows(settings, "classifiers") == 0 and count_rows(settings, "jobs") == 0
    assert count_rows(settings, "uploads") == 0
    blobs = settings.data_dir / "blobs"
    assert list((blobs / "uploads").iterdir()) == [] and list((blobs / "tmp").iterdir()) == []


# ------------------------------------------------------------------ create: the happy paths
def test_create_with_files_queues_a_job(client, queue, settings):
    files, data = upload_parts(per_class=3)
    response = client.post("/v1/classifiers", files=files, data={**data, "name": "colours"})
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["status"] == "queued" and body["classifier_id"].startswith("clf_")
    assert response.headers["location"] == f"/v1/jobs/{body['job_id']}"
    assert queue.sent == [body["job_id"]]  # the message is the job id, nothing else

    job = client.get(f"/v1/jobs/{body['job_id']}").json()
    assert job["status"] == "queued" and job["classifier_id"] == body["classifier_id"]
    assert job["progress"] is None and job["error"] is None and job["started_at"] is None

    clf = client.get(f"/v1/classifiers/{body['classifier_id']}").json()
    assert clf["status"] == "queued" and clf["name"] == "colours"
    assert clf["labels"] == ["green", "red"] and clf["n_images"] == 6
    assert clf["backbone"] == "rmt-tiny-vit" and clf["method"] == "r-amt" and clf["config"]["epochs"] == 1

    stored = sorted(p.name for p in (settings.data_dir / "blobs" / "uploads" / body["classifier_id"]).iterdir())
    assert stored == [f"{i:05d}.png" for i in range(6)]  # generated names, never the client's


def test_create_with_archive_and_wrapper_folder(client, queue):
    archive = zip_bytes({
        "shapes/": None, "shapes/red/": None, "shapes/red/a.png": image_bytes(COLORS["red"]),
        "shapes/red/b.jpg": image_bytes(COLORS["red"], fmt="JPEG"), "shapes/blue/c.png": image_bytes(COLORS["blue"]),
        "__MACOSX/shapes/._a.png": b"junk", "shapes/.DS_Store": b"junk",
    })
    response = client.post("/v1/classifiers", files={"archive": ("set.zip", archive, "application/zip")},
                           data={"config": json.dumps(TINY_CONFIG)})
    assert response.status_code == 202, response.text
    clf = client.get(f"/v1/classifiers/{response.json()['classifier_id']}").json()
    assert clf["labels"] == ["blue", "red"] and clf["n_images"] == 3


def test_unicode_labels_are_kept(client):
    files = [("files", (f"{i}.png", image_bytes(seed=i), "image/png")) for i in range(4)]
    labels = ["chat noir", "chat noir", "Schäferhund 🐕", "Schäferhund 🐕"]
    response = client.post("/v1/classifiers", files=files, data={"labels": labels, "config": json.dumps(TINY_CONFIG)})
    assert response.status_code == 202, response.text
    clf = client.get(f"/v1/classifiers/{response.json()['classifier_id']}").json()
    assert clf["labels"] == sorted(set(labels))


def test_list_is_paginated_newest_first(client):
    ids = []
    for _ in range(3):
        files, data = upload_parts(per_class=1)
        ids.append(client.post("/v1/classifiers", files=files, data=data).json()["classifier_id"])
    page = client.get("/v1/classifiers", params={"limit": 2}).json()
    assert page["total"] == 3 and [c["classifier_id"] for c in page["items"]] == ids[::-1][:2]
    assert page["next_cursor"]
    rest = client.get("/v1/classifiers", params={"limit": 2, "cursor": page["next_cursor"]}).json()
    assert [c["classifier_id"] for c in rest["items"]] == ids[:1] and rest["next_cursor"] is None
    old_style = client.get("/v1/classifiers", params={"limit": 2, "offset": 2}).json()
    assert [c["classifier_id"] for c in old_style["items"]] == ids[:1]
    _error(client.get("/v1/classifiers", params={"cursor": "not-a-cursor"}), 422, "invalid_request")
    _error(client.get("/v1/classifiers", params={"limit": 0}), 422, "invalid_request")


# ------------------------------------------------------------------ create: bad input changes nothing
def _files(n=4, labels=None, content=None):
    files = [("files", (f"{i}.png", content if content is not None else image_bytes(seed=i), "image/png"))
             for i in range(n)]
    return files, {"labels": labels if labels is not None else ["a", "b"] * (n // 2)}


@pytest.mark.parametrize("mutate, status, code", [
    (lambda f, d: (f, {"labels": ["a"]}), 400, "labels_mismatch"),
    (lambda f, d: (f, {"labels": ["a"] * 4}), 400, "too_few_classes"),
    (lambda f, d: (f, {"labels": ["a", "b", "a", " "]}), 400, "invalid_label"),
    (lambda f, d: (f, {"labels": ["a", "b", "a", "x" * 101]}), 400, "invalid_label"),
    (lambda f, d: (f, {"labels": ["a", "b", "a", "bad\x07label"]}), 400, "invalid_label"),
    (lambda f, d: (f[:1] + [("files", ("z.png", b"", "image/png"))] + f[2:], d), 400, "empty_file"),
    (lambda f, d: (f[:1] + [("files", ("x.png", b"not an image at all", "image/png"))] + f[2:], d),
     415, "not_an_image"),
    (lambda f, d: (f[:1] + [("files", ("t.png", image_bytes(size=(64, 64))[:80], "image/png"))] + f[2:], d),
     415, "corrupt_image"),
    (lambda f, d: (f, {**d, "config": "{not json"}), 422, "invalid_config"),
    (lambda f, d: (f, {**d, "config": json.dumps({"method": "magic"})}), 422, "invalid_config"),
    (lambda f, d: (f, {**d, "config": json.dumps({"epochs": "ten"})}), 422, "invalid_config"),
    (lambda f, d: (f, {**d, "config": json.dumps({"learning_rat": 0.1})}), 422, "invalid_config"),
    (lambda f, d: (f, {**d, "config": json.dumps({"pretrained": "/etc/passwd"})}), 422, "invalid_config"),
    (lambda f, d: (f, {**d, "config": json.dumps([1, 2])}), 422, "invalid_config"),
    (lambda f, d: ([], {}), 400, "no_images"),
    (lambda f, d: (f, {**d, "name": "n" * 201}), 400, "invalid_name"),
])
def test_bad_create_requests(client, queue, settings, mutate, status, code):
    files, data = mutate(*_files())
    if not files:
        response = client.post("/v1/classifiers", data={"labels": ["a"]}, files={"dummy": ("", b"", "text/plain")})
    else:
        response = client.post("/v1/classifiers", files=files, data=data)
    error = _error(response, status, code)
    assert error["message"]
    _nothing_stored(settings, queue)


def test_config_error_names_the_field(client):
    files, data = _files()
    error = _error(client.post("/v1/classifiers", files=files,
                               data={**data, "config": json.dumps({"leak": 3})}), 422, "invalid_config")
    assert "leak" in error["message"]


def test_decompression_bomb_is_refused_from_the_header(client, queue, settings):
    big = io.BytesIO()
    Image.new("L", (9000, 9000)).save(big, "PNG")  # 81 MP > 40 MP default; compresses to a few kB
    files, data = _files()
    files[0] = ("files", ("bomb.png", big.getvalue(), "image/png"))
    _error(client.post("/v1/classifiers", files=files, data=data), 413, "too_many_pixels")
    _nothing_stored(settings, queue)


def test_caps_on_bytes_and_files(tmp_path, queue):
    from fastapi.testclient import TestClient

    from app.main import create_app
    
    settings = make_settings(tmp_path / "d", max_image_bytes=2000, max_files=4, max_upload_bytes=50_000)
    with TestClient(create_app(settings, queue=queue)) as client:
        files, data = _files()
        files[1] = ("files", ("big.png", image_bytes(size=(40, 40), fmt="BMP"), "image/bmp"))
        _error(client.post("/v1/classifiers", files=files, data=data), 413, "image_too_large")
        files, data = _files(n=6, labels=["a", "b"] * 3)
        _error(client.post("/v1/classifiers", files=files, data=data), 413, "too_many_files")
        huge = [("files", (f"{i}.bin", b"x" * 1900, "image/png")) for i in range(40)]
        _error(client.post("/v1/classifiers", files=huge, data={"labels": ["a"] * 40}), 413, "payload_too_large")
        _nothing_stored(settings, queue)


def test_oversize_body_is_refused_while_streaming(tmp_path, queue):
    """No Content-Length (chunked): the cap is enforced on the bytes as they arrive."""
    from fastapi.testclient import TestClient

    from app.main import create_app
    
    settings = make_settings(tmp_path / "d", max_upload_bytes=10_000)
    with TestClient(create_app(settings, queue=queue)) as client:
        def body():
            for _ in range(100):
                yield b"x" * 1000
        response = client.post("/v1/classifiers", content=body(),
                               headers={"content-type": "multipart/form-data; boundary=abc"})
        _error(response, 413, "payload_too_large")
        _nothing_stored(settings, queue)


@pytest.mark.parametrize("entries, status, code", [
    ({"../evil/a.png": image_bytes(), "red/b.png": image_bytes()}, 400, "unsafe_archive_path"),
    ({"/abs/a.png": image_bytes(), "red/b.png": image_bytes()}, 400, "unsafe_archive_path"),
    ({"red/..\\..\\x.png": image_bytes(), "blue/b.png": image_bytes()}, 400, "unsafe_archive_path"),
    ({"loose.png": image_bytes(), "red/b.png": image_bytes()}, 400, "archive_layout"),
    ({"red/a.png": image_bytes(), "blue/": None, "green/c.png": image_bytes()}, 400, "empty_class"),
    ({"red/a.png": image_bytes(), "red/b.png": image_bytes()}, 400, "too_few_classes"),
    ({"red/a.png": image_bytes(), "blue/b.png": b"GIF89a-truncated"}, 415, None),
])
def test_bad_archives(client, queue, settings, entries, status, code):
    response = client.post("/v1/classifiers", files={"archive": ("a.zip", zip_bytes(entries), "application/zip")})
    _error(response, status, code)
    _nothing_stored(settings, queue)
    assert not (settings.data_dir.parent / "evil").exists()


def test_not_a_zip_and_both_modes(client, queue, settings):
    _error(client.post("/v1/classifiers", files={"archive": ("a.zip", b"PK\x03\x04garbage", "application/zip")}),
           400, "bad_archive")
    files, data = _files()
    files.append(("archive", ("a.zip", zip_bytes({"a/x.png": image_bytes()}), "application/zip")))
    _error(client.post("/v1/classifiers", files=files, data=data), 400, "ambiguous_upload")
    _error(client.post("/v1/classifiers", json={"files": []}), 415, "unsupported_media_type")
    _nothing_stored(settings, queue)


def test_too_many_queued_jobs_answers_429(client, queue, settings):
    for _ in range(settings.max_queued_jobs):
        files, data = upload_parts(per_class=1)
        assert client.post("/v1/classifiers", files=files, data=data).status_code == 202
    files, data = upload_parts(per_class=1)
    response = client.post("/v1/classifiers", files=files, data=data)
    _error(response, 429, "too_many_jobs")
    assert response.headers["retry-after"]
    assert len(queue.sent) == settings.max_queued_jobs


def test_broker_down_answers_503_and_stores_nothing(client, queue, settings):
    queue.down = True
    files, data = upload_parts(per_class=2)
    response = client.post("/v1/classifiers", files=files, data=data)
    _error(response, 503, "broker_unavailable")
    _nothing_stored(settings, queue)
    assert client.get("/readyz").status_code == 503
    queue.down = False
    assert client.post("/v1/classifiers", files=files, data=data).status_code == 202
    assert client.get("/readyz").json()["checks"] == {"store": "ok", "space": "ok", "records": "ok", "broker": "ok"}


# ------------------------------------------------------------------ jobs
def test_cancel_a_queued_job(client):
    files, data = upload_parts(per_class=1)
    created = client.post("/v1/classifiers", files=files, data=data).json()
    response = client.delete(f"/v1/jobs/{created['job_id']}")
    assert response.status_code == 200 and response.json()["status"] == "cancelled"
    assert response.json()["finished_at"] is not None
    assert client.delete(f"/v1/jobs/{created['job_id']}").json()["status"] == "cancelled"  # idempotent
    assert client.get(f"/v1/classifiers/{created['classifier_id']}").json()["status"] == "cancelled"
    _error(client.post(f"/v1/classifiers/{created['classifier_id']}/classify",
                       files={"file": ("a.png", image_bytes(), "image/png")}), 409, "not_ready")


@pytest.mark.parametrize("path", ["/v1/jobs/job_000000000000000000000000", "/v1/jobs/../../etc/passwd",
                                  "/v1/jobs/nope", "/v1/classifiers/clf_000000000000000000000000",
                                  "/v1/classifiers/..%2F..%2Fjobs", "/v1/classifiers/clf_x/model.onnx"])
def test_unknown_ids_answer_404(client, path):
    _error(client.get(path), 404)


# ------------------------------------------------------------------ a tuned classifier
def test_ready_classifier_shows_its_report(tuned_client, tuned):
    clf = tuned_client.get(f"/v1/classifiers/{tuned['classifier_id']}").json()
    assert clf["status"] == "ready"
    files = set(clf["artifacts"]["files"])  # base + mask + head: the encoder is the shared base, not a file here
    assert {"manifest.json", "head.npz", "curve.png", "confusion.png"} <= files and "model.onnx" not in files
    assert ("mask.rmt" in files) == bool(clf["artifacts"]["mask_bytes"])  # a mask ships when the candidate uses one
    assert clf["validation"]["n_holdout"] == 2  # 5 per class, holdout 0.2 -> 1 per class
    assert 0 <= clf["validation"]["tuned_accuracy"] <= 1 and "zero_shot_accuracy" in clf["validation"]
    assert clf["parity_max_abs_diff"] < 1e-3 and 0 <= clf["sparsity"] <= 100
    job = tuned_client.get(f"/v1/jobs/{tuned['job_id']}").json()
    assert job["status"] == "succeeded" and job["attempts"] == 1
    assert job["progress"]["step"] == job["progress"]["total_steps"] and job["progress"]["eta_seconds"] == 0
    _error(tuned_client.delete(f"/v1/jobs/{tuned['job_id']}"), 409, "job_finished")


def test_classify_one_and_a_batch(tuned_client, tuned):
    url = f"/v1/classifiers/{tuned['classifier_id']}/classify"
    one = tuned_client.post(url, files={"file": ("r.png", image_bytes(COLORS["red"]), "image/png")})
    assert one.status_code == 200, one.text
    preds = one.json()["predictions"]
    assert {p["label"] for p in preds} == {"green", "red"} and abs(sum(p["score"] for p in preds) - 1) < 1e-4
    assert preds[0]["score"] >= preds[1]["score"]

    batch = tuned_client.post(url, params={"top_k": 1}, files=[
        ("files", (f"{i}.jpg", image_bytes(c, size=(50, 30), fmt="JPEG"), "image/jpeg"))
        for i, c in enumerate([COLORS["red"], COLORS["green"], COLORS["blue"]])])
    assert batch.status_code == 200, batch.text
    results = batch.json()["results"]
    assert len(results) == 3 and all(len(r["predictions"]) == 1 for r in results)


def test_classify_matches_the_downloaded_model(tuned_client, tuned):
    """What the API answers is what the ONNX file computes (same preprocessing, same weights)."""
    from rmt_core.runtime import load_classifier
    from rmt_service.store import Store

    download = tuned_client.get(f"/v1/classifiers/{tuned['classifier_id']}/model.onnx")
    assert download.status_code == 200 and download.headers["content-type"] == "application/octet-stream"
    session = ort.InferenceSession(download.content, providers=["CPUExecutionProvider"])
    store = Store(tuned["settings"])
    model_dir = store.model_dir(tuned["classifier_id"])
    reference = load_classifier(model_dir, store.bases_dir, providers="cpu")
    store.close()
    img = image_bytes(COLORS["green"], size=(64, 48))
    x = reference.preprocess(Image.open(io.BytesIO(img)).convert("RGB"))[None]
    logits = session.run(None, {session.get_inputs()[0].name: x})[0][0]
    probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    api = tuned_client.post(f"/v1/classifiers/{tuned['classifier_id']}/classify",
                            files={"file": ("g.png", img, "image/png")}).json()["predictions"]
    for p in api:
        assert abs(p["score"] - probs[reference.labels.index(p["label"])]) < 1e-5


def test_artifacts_download(tuned_client, tuned):
    base = f"/v1/classifiers/{tuned['classifier_id']}/artifacts"
    curve = tuned_client.get(f"{base}/curve.png")
    assert curve.status_code == 200 and curve.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert tuned_client.get(f"{base}/report.json").json()["validation"]["n_holdout"] == 2
    _error(tuned_client.get(f"{base}/classifier.json"), 404)
    _error(tuned_client.get(f"{base}/..%2Fclassifier.json"), 404)


@pytest.mark.parametrize("files, params, status, code", [
    ({"file": ("x.png", b"definitely not", "image/png")}, {}, 415, "not_an_image"),
    ({"file": ("x.png", b"", "image/png")}, {}, 400, "empty_file"),
    ({}, {}, 400, "no_images"),
    ({"file": ("x.png", image_bytes(), "image/png")}, {"top_k": 0}, 422, "invalid_request"),
])
def test_bad_classify_requests(tuned_client, tuned, files, params, status, code):
    url = f"/v1/classifiers/{tuned['classifier_id']}/classify"
    response = tuned_client.post(url, files=files or {"other": ("a", b"a", "text/plain")}, params=params)
    _error(response, status, code)


def test_top_k_larger_than_labels_returns_all(tuned_client, tuned):
    url = f"/v1/classifiers/{tuned['classifier_id']}/classify"
    r = tuned_client.post(url, params={"top_k": 50}, files={"file": ("x.png", image_bytes(), "image/png")})
    assert len(r.json()["predictions"]) == 2


def test_delete_removes_everything(client, queue, settings):
    files, data = upload_parts(per_class=1)
    created = client.post("/v1/classifiers", files=files, data=data).json()
    assert client.delete(f"/v1/classifiers/{created['classifier_id']}").status_code == 204
    _error(client.get(f"/v1/classifiers/{created['classifier_id']}"), 404)
    _error(client.get(f"/v1/jobs/{created['job_id']}"), 404)
    _error(client.delete(f"/v1/classifiers/{created['classifier_id']}"), 404)
    assert count_rows(settings, "classifiers") == 0 and count_rows(settings, "uploads") == 0
    assert list((settings.data_dir / "blobs" / "uploads").iterdir()) == []


def test_health_metrics_and_docs(tuned_client, tuned):
    assert tuned_client.get("/healthz").json() == {"status": "ok"}
    assert tuned_client.get("/readyz").status_code == 200
    tuned_client.post(f"/v1/classifiers/{tuned['classifier_id']}/classify",
                      files={"file": ("x.png", image_bytes(), "image/png")})
    text = tuned_client.get("/metrics").text
    assert 'rmt_jobs{status="succeeded"} 1.0' in text
    assert "rmt_classified_images_total 1.0" in text and "rmt_classify_batch_size_count" in text
    assert 'route="/v1/classifiers/{classifier_id}/classify"' in text
    assert tuned_client.get("/docs").status_code == 200
    paths = tuned_client.get("/openapi.json").json()["paths"]
    assert "multipart/form-data" in paths["/v1/classifiers"]["post"]["requestBody"]["content"]


def test_metrics_cardinality_is_bounded(client):
    import random
    import string

    rng = random.Random(0)
    for i in range(40):
        method = "".join(rng.choice(string.ascii_uppercase) for _ in range(6))
        client.request(method, f"/v1/{rng.random()}/x{i}")
        client.get(f"/nothing/{i}")
    text = client.get("/metrics").text
    lines = [line for line in text.splitlines() if line.startswith("rmt_http_requests_total{")]
    methods = {line.split('method="')[1].split('"')[0] for line in lines}
    routes = {line.split('route="')[1].split('"')[0] for line in lines}
    assert methods <= {"GET", "POST", "DELETE", "other"} and "other" in methods
    assert routes <= {"unmatched", "/metrics"}


def test_classify_serves_the_current_version(client, settings, tuned):
    """A preview is served while the job runs; once the final version is published the next request loads it."""
    import shutil

    from rmt_service.store import Store

    source = Store(tuned["settings"])
    tuned_dir = source.model_dir(tuned["classifier_id"])
    base_id = source.current_version(tuned["classifier_id"]).base_id
    if base_id:  # the version refers to a shared base: this data dir needs it too
        shutil.copytree(source.blobs.path(source.blobs.base_key(base_id)),
                        settings.data_dir / "blobs" / "bases" / base_id, dirs_exist_ok=True)
    source.close()
    files, data = upload_parts(per_class=1)
    created = client.post("/v1/classifiers", files=files, data=data).json()
    cid = created["classifier_id"]
    store = Store(settings)
    try:
        assert store.claim(created["job_id"], "w")[0] == "run"

        def publish(final: bool):
            build = store.new_build_dir(cid)
            for path in tuned_dir.iterdir():
                shutil.copy(path, build / path.name)
            return store.publish_version(cid, build, final=final, job_id=created["job_id"] if final else None,
                                         owner="w")

        preview = publish(False)
        url = f"/v1/classifiers/{cid}/classify"
        one = {"file": ("r.png", image_bytes(COLORS["red"]), "image/png")}
        assert client.post(url, files=one).status_code == 200
        assert client.get(f"/v1/classifiers/{cid}").json()["status"] == "running"
        cache = client.app.state.cache
        assert cache._entries[cid].classifier.model_dir == store.blobs.path(preview.blob_key)
        final = publish(True)
        assert client.post(url, files=one).status_code == 200
        assert cache._entries[cid].classifier.model_dir == store.blobs.path(final.blob_key)
        assert client.get(f"/v1/classifiers/{cid}").json()["status"] == "ready"
    finally:
        store.close()


def test_a_frozen_lock_holder_hangs_nothing(tmp_path, database_url, queue):
    """A process frozen inside a write transaction (the old store's stuck flock): cancel answers 503 after the
    lock timeout instead of waiting forever, and probes, reads and listings answer meanwhile."""
    from fastapi.testclient import TestClient
    from sqlalchemy import select

    from app.main import create_app
    from rmt_service.db import Database, jobs

    settings = make_settings(tmp_path / "d", database_url=database_url, database_lock_timeout_seconds=1)
    with TestClient(create_app(settings, queue=queue)) as client:
        files, data = upload_parts(per_class=1)
        job_id = client.post("/v1/classifiers", files=files, data=data).json()["job_id"]
        holder = Database(settings.effective_database_url)
        try:
            with holder.engine.connect() as conn:
                conn = conn.execution_options(rmt_immediate=True)  # SQLite: the write lock
                frozen = conn.begin()
                conn.execute(select(jobs.c.id).where(jobs.c.id == job_id).with_for_update())  # PostgreSQL: the row
                # 503 after the 1 s lock timeout, not a wait for the holder (which never lets go by itself)
                _error(client.delete(f"/v1/jobs/{job_id}"), 503, "database_unavailable")
                assert client.get("/healthz").status_code == 200
                assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "queued"
                assert client.get("/v1/classifiers").json()["total"] == 1
                assert client.get("/metrics").status_code == 200
                frozen.rollback()
        finally:
            holder.dispose()
        assert client.delete(f"/v1/jobs/{job_id}").json()["status"] == "cancelled"
