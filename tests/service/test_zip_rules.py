"""The API applies the documented zip rule (tests/zip_rules.py); the web page is tested on the same cases."""
from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from tests.service.helpers import FakeQueue, image_bytes, make_settings, zip_bytes
from tests.zip_rules import CASES, materialise


@pytest.fixture
def api(tmp_path):
    with TestClient(create_app(make_settings(tmp_path / "data"), queue=FakeQueue())) as client:
        yield client


@pytest.mark.parametrize("case", list(CASES))
def test_the_api_applies_the_zip_rule(api, case):
    entries, expected = CASES[case]
    archive = zip_bytes(materialise(entries, image_bytes()))
    response = api.post("/v1/classifiers", files={"archive": ("set.zip", archive, "application/zip")},
                        data={"config": '{"epochs": 1}'})
    if isinstance(expected, dict):
        assert response.status_code == 202, response.text
        detail = api.get(f"/v1/classifiers/{response.json()['classifier_id']}").json()
        assert detail["labels"] == sorted(expected) and detail["n_images"] == sum(expected.values())
    else:
        code, words = expected
        assert response.status_code == 400, response.text
        assert response.json()["error"]["code"] == code and words in response.json()["error"]["message"]


def test_every_side_names_the_same_image_extensions():
    import re

    from rmt_client._common import IMAGE_SUFFIXES as CLIENT
    from rmt_core.images import IMAGE_SUFFIXES
    from tests.service.procs import ROOT

    js = (ROOT / "app" / "static" / "ui" / "zip.js").read_text()
    page = re.compile(re.search(r"const IMAGE_EXT = /(.+)/i;", js)[1], re.IGNORECASE)
    assert set(CLIENT) == set(IMAGE_SUFFIXES)
    assert all(page.search(f"a{suffix}") and page.search(f"a{suffix.upper()}") for suffix in IMAGE_SUFFIXES)
    assert not any(page.search(name) for name in ("Thumbs.db", "desktop.ini", "notes.txt", "a.heic", "png"))
