"""The UI's routes without a browser: what is served, with which headers, and GET /v1/info."""
from __future__ import annotations

import os
import re

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.routers.ui import CSP, UI_DIR
from rmt_core.config import METHODS
from tests.service.helpers import FakeQueue, make_settings, upload_parts

MARKUP_SINKS = re.compile(r"\.(innerHTML|outerHTML)\s*=|insertAdjacentHTML|document\.write|\beval\(|new Function\(")


@pytest.fixture(autouse=True)
def _no_developer_env(monkeypatch, tmp_path):
    for key in [k for k in os.environ if k.startswith("RMT_")]:
        monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)  # no ./.env either


@pytest.fixture
def client(tmp_path):
    with TestClient(create_app(make_settings(tmp_path / "data"), queue=FakeQueue())) as c:
        yield c


def test_index_and_modules_are_served_with_a_csp_that_forbids_inline_script(client):
    index = client.get("/")
    assert index.status_code == 200 and index.headers["content-type"].startswith("text/html")
    csp = index.headers["content-security-policy"]
    assert csp == CSP and "script-src 'self';" in csp and "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert "frame-ancestors 'none'" in csp and index.headers["x-content-type-options"] == "nosniff"
    assert "<script type=\"module\" src=\"ui/app.js\"></script>" in index.text
    for name in sorted(p.name for p in UI_DIR.glob("*.js")):
        module = client.get(f"/ui/{name}")
        assert module.status_code == 200 and module.headers["content-type"].startswith("text/javascript"), name
        assert not MARKUP_SINKS.search(module.text), f"{name} writes markup"
    assert client.get("/ui/style.css").headers["content-type"].startswith("text/css")


@pytest.mark.parametrize("path", ["/ui/nope.js", "/ui/..%2Fmain.py", "/ui/%2e%2e%2fschemas.py", "/ui/index.htm"])
def test_only_the_shipped_files_are_served(client, path):
    response = client.get(path)
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"


def test_no_inline_script_or_style_in_the_page():
    html = (UI_DIR / "index.html").read_text()
    assert "<script>" not in html and "<style" not in html
    assert not re.search(r"<[^>]+\s(on\w+|style)=", html)


def test_docs_keep_working_without_the_ui_csp(client):
    assert "content-security-policy" not in {k.lower() for k in client.get("/openapi.json").headers}


def test_info_lists_what_a_create_may_choose(client):
    info = client.get("/v1/info").json()
    assert info["methods"] == list(METHODS) and info["backbones"][0] == info["default_backbone"] == "rmt-world-vit"
    assert info["defaults"]["epochs"] == 30 and info["defaults"]["method"] == "r-amt"
    assert info["auth_required"] is False and info["limits"]["max_files"] == 2000
    assert info["pretrained"] == ["builtin", None] and info["candidates"][0] == "zero-shot"


def test_info_never_shows_a_checkpoint_path(tmp_path):
    settings = make_settings(tmp_path / "data", default_pretrained="/models/secret/ViT-B-16.bin",
                             allowed_pretrained="builtin,none,/models/other.pt")
    with TestClient(create_app(settings, queue=FakeQueue())) as c:
        response = c.get("/v1/info")
    assert response.json()["pretrained"] == ["builtin", None] and "/models" not in response.text


def test_info_needs_the_key_when_keys_are_set(tmp_path):
    settings = make_settings(tmp_path / "data", api_keys="team:k1")
    with TestClient(create_app(settings, queue=FakeQueue())) as c:
        assert c.get("/v1/info").status_code == 401
        assert c.get("/").status_code == 200  # the page itself is public: it asks for the key
        assert c.get("/v1/info", headers={"Authorization": "Bearer k1"}).json()["auth_required"] is True


def test_an_uploaded_image_is_served_to_its_owner_only(tmp_path):
    settings = make_settings(tmp_path / "data", api_keys="team:k1,other:k2")
    with TestClient(create_app(settings, queue=FakeQueue())) as c:
        files, data = upload_parts(per_class=2)
        created = c.post("/v1/classifiers", files=files, data=data, headers={"Authorization": "Bearer k1"}).json()
        url = f"/v1/classifiers/{created['classifier_id']}/samples"
        third = c.get(f"{url}/2", headers={"Authorization": "Bearer k1"})
        assert third.status_code == 200 and third.headers["content-type"] == "image/png"
        assert third.content == files[2][1][1]  # upload order: the report's misclassified[].index points here
        assert "sandbox" in third.headers["content-security-policy"] and third.headers["x-content-type-options"] == "nosniff"
        assert c.get(f"{url}/4", headers={"Authorization": "Bearer k1"}).status_code == 404
        assert c.get(f"{url}/-1", headers={"Authorization": "Bearer k1"}).status_code == 404
        assert c.get(f"{url}/0", headers={"Authorization": "Bearer k2"}).status_code == 404  # another tenant's
        assert c.get(f"{url}/0").status_code == 401
