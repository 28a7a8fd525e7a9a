"""RMT_SERVING_PRECISION=int8 over a classifier the worker built (SQLite and PostgreSQL): the version records its
int8 guard, the API serves int8 exactly where it passed, and model.onnx / export come in int8 on request."""
from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import onnx
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from rmt_core.quantize import MIN_AGREEMENT
from rmt_service.settings import Settings
from tests.service.helpers import COLORS, FakeQueue, image_bytes


def _classify(client, classifier_id, images):
    out = []
    for name, data in images:
        r = client.post(f"/v1/classifiers/{classifier_id}/classify", files={"file": (name, data, "image/png")},
                        params={"top_k": 3})
        assert r.status_code == 200, r.text
        out.append(r.json())
    return out


def test_int8_serves_where_the_guard_passed_and_answers_as_fp32(tuned):
    cid = tuned["classifier_id"]
    int8_settings = tuned["settings"].model_copy(update={"serving_precision": "int8"})
    images = [(f"{c}{i}.png", image_bytes(rgb, size=(40, 40), seed=30 + i)) for i, (c, rgb) in
              enumerate(sorted(COLORS.items()))] * 2
    with TestClient(create_app(tuned["settings"], queue=FakeQueue())) as fp32_client:
        fp32 = _classify(fp32_client, cid, images)
        manifest_record = fp32_client.get(f"/v1/classifiers/{cid}").json()
        assert fp32_client.app.state.cache._entries[cid].classifier.precision == "fp32"
    with TestClient(create_app(int8_settings, queue=FakeQueue())) as int8_client:
        int8 = _classify(int8_client, cid, images)
        served = int8_client.app.state.cache._entries[cid].classifier
    version_dir = served.model_dir
    guard = json.loads((version_dir / "manifest.json").read_text())["int8"]
    assert manifest_record["status"] == "ready"
    assert {"allowed", "agreement", "accuracy_fp32", "accuracy_int8", "n"} <= set(guard)
    assert served.precision == ("int8" if guard["allowed"] else "fp32")
    same = np.mean([a["label"] == b["label"] for a, b in zip(fp32, int8)])
    if guard["allowed"]:
        assert same >= MIN_AGREEMENT
        assert max(abs(p["score"] - q["score"]) for a, b in zip(fp32, int8)
                   for p, q in zip(a["predictions"], b["predictions"])) < 0.05
    else:
        assert fp32 == int8  # fp32 served: the very same answers


def test_int8_download_and_export(tuned_client, tuned):
    cid = tuned["classifier_id"]
    fp32 = tuned_client.get(f"/v1/classifiers/{cid}/model.onnx")
    int8 = tuned_client.get(f"/v1/classifiers/{cid}/model.onnx", params={"precision": "int8"})
    assert fp32.status_code == 200 and int8.status_code == 200, int8.text
    meta = {p.key: p.value for p in onnx.load_from_string(int8.content).metadata_props}
    assert meta["precision"] == "int8" and "allowed" in json.loads(meta["int8_guard"])
    assert any(n.op_type.startswith("DynamicQuantize") for n in onnx.load_from_string(int8.content).graph.node)
    bundle = tuned_client.get(f"/v1/classifiers/{cid}/export", params={"precision": "int8"})
    assert bundle.status_code == 200
    model = onnx.load_from_string(zipfile.ZipFile(io.BytesIO(bundle.content)).read("model.onnx"))
    assert {p.key: p.value for p in model.metadata_props}["precision"] == "int8"
    bad = tuned_client.get(f"/v1/classifiers/{cid}/model.onnx", params={"precision": "fp16"})
    assert bad.status_code == 422 and "precision" in bad.text


def test_serving_precision_is_validated(tmp_path):
    with pytest.raises(ValueError, match="serving_precision 'int4'"):
        Settings(data_dir=tmp_path, serving_precision="int4")
