"""API keys and tenant isolation: every /v1 route needs a key; another tenant's ids answer 404."""
from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from tests.service.helpers import FakeQueue, image_bytes, make_settings, upload_parts

ALICE = {"Authorization": "Bearer key-alice"}
BOB = {"Authorization": "Bearer key-bob"}


@pytest.fixture
def keyed(tmp_path):
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text("# tenant:key\nbob:key-bob\n")
    settings = make_settings(tmp_path / "data", api_keys="alice:key-alice", api_keys_file=keys_file)
    with TestClient(create_app(settings, queue=FakeQueue())) as client:
        yield client


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic a2V5"},
                                     {"Authorization": "Bearer "}, {"Authorization": "key-alice"}])
def test_v1_needs_a_valid_key(keyed, headers):
    for method, path in [("get", "/v1/classifiers"), ("get", "/v1/jobs/job_" + "0" * 24),
                         ("post", "/v1/classifiers"), ("delete", "/v1/classifiers/clf_" + "0" * 24)]:
        response = getattr(keyed, method)(path, headers=headers)
        assert response.status_code == 401, (method, path, response.text)
        assert response.json()["error"]["code"] == "unauthorized"
        assert response.headers["www-authenticate"] == "Bearer"
    assert keyed.get("/healthz").status_code == 200  # probes stay open


def test_tenants_are_isolated(keyed, tmp_path):
    files, data = upload_parts(per_class=1)
    created = keyed.post("/v1/classifiers", files=files, data=data, headers=ALICE)
    assert created.status_code == 202, created.text
    cid, jid = created.json()["classifier_id"], created.json()["job_id"]

    assert keyed.get(f"/v1/classifiers/{cid}", headers=ALICE).status_code == 200
    for method, path in [("get", f"/v1/classifiers/{cid}"), ("get", f"/v1/jobs/{jid}"),
                         ("delete", f"/v1/jobs/{jid}"), ("delete", f"/v1/classifiers/{cid}"),
                         ("get", f"/v1/classifiers/{cid}/model.onnx"),
                         ("get", f"/v1/classifiers/{cid}/artifacts/manifest.json")]:
        response = getattr(keyed, method)(path, headers=BOB)
        assert response.status_code == 404, (method, path, response.text)
    classify = keyed.post(f"/v1/classifiers/{cid}/classify", headers=BOB,
                          files={"file": ("a.png", image_bytes(), "image/png")})
    assert classify.status_code == 404  # not 409: bob must not learn that the id exists
    assert keyed.get("/v1/classifiers", headers=BOB).json()["total"] == 0
    assert keyed.get("/v1/classifiers", headers=ALICE).json()["total"] == 1
    # bob's attempts changed nothing
    assert keyed.get(f"/v1/jobs/{jid}", headers=ALICE).json()["status"] == "queued"


def test_queue_limit_is_per_tenant(tmp_path):
    settings = make_settings(tmp_path / "data", api_keys="alice:key-alice,bob:key-bob", max_queued_jobs=1)
    with TestClient(create_app(settings, queue=FakeQueue())) as client:
        files, data = upload_parts(per_class=1)
        assert client.post("/v1/classifiers", files=files, data=data, headers=ALICE).status_code == 202
        assert client.post("/v1/classifiers", files=files, data=data, headers=ALICE).status_code == 429
        assert client.post("/v1/classifiers", files=files, data=data, headers=BOB).status_code == 202


def test_malformed_key_list_stops_startup(tmp_path):
    with pytest.raises(ValueError, match="tenant:key"):
        create_app(make_settings(tmp_path / "data", api_keys="no-colon-here"), queue=FakeQueue())
