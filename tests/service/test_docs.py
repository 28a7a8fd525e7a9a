"""/docs and /redoc work offline, and the OpenAPI document is typed (auth scheme, config, named responses)."""
from __future__ import annotations

import dataclasses
import re

import pytest

from rmt_core.config import METHODS, TuneConfig
from tests.service.helpers import image_bytes


@pytest.fixture
def spec(client) -> dict:
    return client.get("/openapi.json").json()


def test_bearer_scheme_declared_on_every_v1_operation(spec):
    assert spec["components"]["securitySchemes"]["HTTPBearer"] == {
        "type": "http", "scheme": "bearer", "description": spec["components"]["securitySchemes"]["HTTPBearer"][
            "description"]}
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            if path.startswith("/v1/"):
                assert op.get("security") == [{"HTTPBearer": []}], (method, path)
            else:  # probes and metrics need no key
                assert "security" not in op, (method, path)


def test_config_is_a_typed_schema_generated_from_tune_config(spec):
    body = spec["paths"]["/v1/classifiers"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert body["schema"]["properties"]["config"] == {"$ref": "#/components/schemas/TuneConfig"}
    assert body["encoding"]["config"]["contentType"] == "application/json"
    schema = spec["components"]["schemas"]["TuneConfig"]
    fields = {f.name: f for f in dataclasses.fields(TuneConfig)}
    assert set(schema["properties"]) == set(fields)
    assert schema["additionalProperties"] is False
    assert schema["properties"]["method"]["enum"] == list(METHODS)
    assert schema["properties"]["epochs"]["type"] == "integer"
    # unset (null) = the recipe's value (issue 17)
    assert [t["type"] for t in schema["properties"]["learning_rate"]["anyOf"]] == ["number", "null"]
    assert schema["properties"]["augment"]["type"] == "boolean"
    for name, f in fields.items():
        assert schema["properties"][name]["description"] == f.metadata["help"], name
    assert schema["properties"]["epochs"]["default"] == TuneConfig().epochs


def test_responses_are_named_models_not_unions(spec):
    classify = spec["paths"]["/v1/classifiers/{classifier_id}/classify"]["post"]["responses"]["200"]
    assert classify["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ClassifyResponse"}
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            for code, response in op["responses"].items():
                schema = response.get("content", {}).get("application/json", {}).get("schema")
                if path.startswith("/v1/") and code.startswith("2") and schema:
                    assert set(schema) == {"$ref"}, (method, path, code, schema)
    result = spec["components"]["schemas"]["Classification"]
    assert set(result["properties"]) == {"filename", "label", "unknown", "predictions"}


_URL_ATTR = re.compile(r'(?:src|href|spec-url|data-openapi-url)="([^"]*)"')


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_load_only_from_this_server(client, page):
    response = client.get(page)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    csp = response.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp and "connect-src 'self'" in csp
    assert "<script>" not in response.text  # no inline script: the CSP forbids it
    urls = _URL_ATTR.findall(response.text)
    assert len(urls) >= 3
    for url in urls:
        assert url.startswith("/") and not url.startswith("//"), url
        asset = client.get(url)
        assert asset.status_code == 200 and len(asset.content) > 0, url
    assert "cdn" not in response.text.lower()


def test_swagger_bundle_and_redoc_are_the_vendored_files_with_licences(client):
    from app.routers.docs import STATIC

    vendor = STATIC / "vendor"
    for folder, files in {"swagger-ui": ("LICENSE", "NOTICE", "swagger-ui-bundle.js", "swagger-ui.css"),
                          "redoc": ("LICENSE", "redoc.standalone.js")}.items():
        for name in files:
            assert (vendor / folder / name).stat().st_size > 0, (folder, name)
    js = client.get("/docs-assets/vendor/swagger-ui/swagger-ui-bundle.js")
    assert js.content == (vendor / "swagger-ui" / "swagger-ui-bundle.js").read_bytes()
    assert b"cdn.redoc.ly" not in (vendor / "redoc" / "redoc.standalone.js").read_bytes()
    init = client.get("/docs-assets/docs/swagger-init.js").text
    assert "validatorUrl: null" in init  # Swagger UI would otherwise send the spec to validator.swagger.io


def test_openapi_is_served_to_keyed_servers_without_a_key(tmp_path, queue):
    """The docs must render before anyone has typed a key into Authorize."""
    from fastapi.testclient import TestClient

    from app.main import create_app
    from tests.service.helpers import make_settings

    with TestClient(create_app(make_settings(tmp_path / "d", api_keys="acme:secret"), queue=queue)) as c:
        assert c.get("/openapi.json").status_code == 200
        assert c.get("/docs").status_code == 200
        assert c.get("/v1/classifiers").status_code == 401
        assert c.get("/v1/classifiers", headers={"Authorization": "Bearer secret"}).status_code == 200


def test_classify_results_carry_file_names(tuned_client, tuned):
    url = f"/v1/classifiers/{tuned['classifier_id']}/classify"
    files = [("files", (f"photo-{i}.png", image_bytes(seed=i), "image/png")) for i in range(3)]
    batch = tuned_client.post(url, files=files, params={"top_k": 1}).json()
    assert [r["filename"] for r in batch["results"]] == ["photo-0.png", "photo-1.png", "photo-2.png"]
    assert batch["predictions"] is None
    one = tuned_client.post(url, files={"file": ("cat.png", image_bytes(), "image/png")}).json()
    assert one["results"][0]["filename"] == "cat.png"
    assert one["predictions"] == one["results"][0]["predictions"]
