"""The API matches its own OpenAPI document: the holes found by schemathesis one by one (TestClient), then
schemathesis itself, with every check, against a real `rmt serve`."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import httpx
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from rmt_core.config import FLOAT_RANGES, INT_RANGES
from tests.service.helpers import (TINY_CONFIG, FakeQueue, free_port, make_settings, service_env, upload_parts,
                                   wait_for)
from tests.service.procs import ROOT, Child, rmt


@pytest.fixture
def api(tmp_path):
    queue = FakeQueue()
    with TestClient(create_app(make_settings(tmp_path / "data"), queue=queue)) as client:
        client.queue = queue
        yield client


def _create(api, config) -> httpx.Response:
    files, data = upload_parts(per_class=3)
    return api.post("/v1/classifiers", files=files, data={**data, "config": config})


def test_negative_threshold_is_refused_with_the_field_named(api):
    response = _create(api, json.dumps({"threshold": -0.5}))
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "invalid_config" and "threshold" in response.json()["error"]["message"]
    assert api.queue.sent == []


def test_deeply_nested_config_is_422_not_500(api):
    for config in ("[" * 5000 + "]" * 5000, '{"a":' * 2000 + "1" + "}" * 2000, '{"method": [[["amt"]]]}'):
        response = _create(api, config)
        assert response.status_code == 422, response.text[:300]
        error = response.json()["error"]
        assert error["code"] == "invalid_config" and "nested" in error["message"]
    assert api.queue.sent == []


def test_metrics_are_documented_as_the_prometheus_text_they_are(api):
    spec = api.get("/openapi.json").json()
    content = spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert list(content) == ["text/plain"]
    assert api.get("/metrics").headers["content-type"].startswith("text/plain")


@pytest.mark.parametrize("path, methods", [
    ("/v1/classifiers", {"GET", "POST"}),
    ("/v1/classifiers/clf_000000000000000000000000", {"GET", "DELETE"}),
    ("/v1/jobs/job_000000000000000000000000", {"GET", "DELETE"}),
])
def test_405_lists_every_method_of_the_path(api, path, methods):
    response = api.request("OPTIONS", path)
    assert response.status_code == 405
    assert set(response.headers["allow"].replace(" ", "").split(",")) == methods


def test_config_schema_carries_the_bounds_tune_config_enforces(api):
    fields = api.get("/openapi.json").json()["components"]["schemas"]["TuneConfig"]["properties"]
    # a field that may be left unset (null: its recipe's value) carries its bounds on the number branch
    fields = {name: next((t for t in f.get("anyOf", ()) if t.get("type") != "null"), f) for name, f in fields.items()}
    for name, (low, high, low_open) in FLOAT_RANGES.items():
        assert fields[name]["maximum"] == high, name
        assert fields[name]["exclusiveMinimum" if low_open else "minimum"] == low, name
    for name, (low, high) in INT_RANGES.items():
        assert (fields[name]["minimum"], fields[name]["maximum"]) == (low, high), name
    assert fields["threshold"]["minimum"] == 0


def test_create_body_schema_requires_images(api):
    spec = api.get("/openapi.json").json()
    body = spec["paths"]["/v1/classifiers"]["post"]["requestBody"]
    schema = body["content"]["multipart/form-data"]["schema"]
    assert body["required"] is True
    assert schema["oneOf"] == [{"required": ["files", "labels"]}, {"required": ["archive"]}]
    assert schema["properties"]["files"]["minItems"] == 1


def test_cursor_format_is_documented_and_what_the_api_returns(api):
    spec = api.get("/openapi.json").json()
    cursor = next(p for p in spec["paths"]["/v1/classifiers"]["get"]["parameters"] if p["name"] == "cursor")
    pattern = cursor["schema"].get("pattern") or cursor["schema"]["anyOf"][0]["pattern"]
    for _ in range(3):
        assert _create(api, "{}").status_code == 202
    page = api.get("/v1/classifiers", params={"limit": 2}).json()
    assert re.search(pattern, page["next_cursor"])
    rest = api.get("/v1/classifiers", params={"limit": 2, "cursor": page["next_cursor"]}).json()
    assert len(rest["items"]) == 1 and rest["next_cursor"] is None
    # Any cursor of the documented form is a position in the list: a page, possibly empty, never an error.
    made_up = api.get("/v1/classifiers", params={"cursor": "1.5_clf_" + "0" * 24})
    assert made_up.status_code == 200 and made_up.json()["items"] == []
    assert api.get("/v1/classifiers", params={"cursor": "not a cursor"}).status_code == 422


# ----------------------------------------------------------------------------------- schemathesis
API_KEY = "schema-test-key"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`rmt serve` with an API key (so the auth checks have something to check) and no worker: a create that
    passes every check stays queued instead of tuning on a shared machine."""
    tmp = tmp_path_factory.mktemp("schema")
    port = free_port()
    child = Child(rmt("serve", "--port", str(port), "--data-dir", str(tmp / "data"), "--worker", "no"),
                  service_env(RMT_DEVICE="cpu", RMT_API_KEYS=f"acme:{API_KEY}", RMT_MAX_QUEUED_JOBS="1000"),
                  tmp / "serve.log")
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(f"{base}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return child.proc.poll() is not None

    try:
        wait_for(up, 60, what="rmt serve to answer /healthz")
        assert child.proc.poll() is None, child.log()
        yield {"url": base, "child": child, "tmp": tmp}
    finally:
        child.stop(40)


@pytest.mark.integration
@pytest.mark.slow
def test_schemathesis_all_checks_pass_against_rmt_serve(server):
    """Half the generated ids are real classifiers and jobs (created here, queued: no worker), so the answers
    about real objects are checked too, not only 404s; the other half stay random."""
    tmp = server["tmp"]
    auth = {"Authorization": f"Bearer {API_KEY}"}
    classifiers, jobs = [], []
    with httpx.Client(base_url=server["url"], headers=auth, timeout=60) as http:
        for _ in range(4):
            files, data = upload_parts(per_class=3)
            created = http.post("/v1/classifiers", files=files, data={**data, "config": json.dumps(TINY_CONFIG)})
            assert created.status_code == 202, created.text
            classifiers.append(created.json()["classifier_id"])
            jobs.append(created.json()["job_id"])
    config = tmp / "schemathesis.toml"
    config.write_text((ROOT / "tests" / "schemathesis.toml").read_text() + f"""
[dictionaries.classifiers]
values = {json.dumps(classifiers)}

[dictionaries.jobs]
values = {json.dumps(jobs)}

[parameters]
"path.classifier_id" = {{ dictionary = "classifiers", probability = 0.5 }}
"path.job_id" = {{ dictionary = "jobs", probability = 0.5 }}
""")
    run = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "--config-file", str(config),
         "run", f"{server['url']}/openapi.json", "--header", f"Authorization: Bearer {API_KEY}",
         "--no-color"],
        cwd=tmp, capture_output=True, text=True, timeout=900)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-12000:]
    selected = re.search(r"Selected:\s+(\d+)/(\d+)", output)
    tested = re.search(r"Tested:\s+(\d+)", output)
    assert selected and tested and selected[1] == selected[2] == tested[1], output[-3000:]  # every operation ran
    generated = re.search(r"(\d+) generated, (\d+) passed", output)
    assert generated and int(generated[1]) > 20 * int(tested[1]), output[-3000:]
    assert "Traceback" not in server["child"].log(1_000_000), server["child"].log()
    with httpx.Client(base_url=server["url"], headers=auth, timeout=60) as http:  # the real ids were used
        states = [http.get(f"/v1/jobs/{job}").json().get("status") for job in jobs]
    assert any(state != "queued" for state in states), states
