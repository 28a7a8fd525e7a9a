"""GET /v1/classifiers/{id}/export: the bundle is complete, and its README example, run as a user would run it
in a fresh process, gives the server's own answers."""
from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import zipfile

import onnx
import pytest

from tests.service.helpers import COLORS, image_bytes


@pytest.fixture(scope="module")
def bundle_bytes(tuned):
    from fastapi.testclient import TestClient

    from app.main import create_app
    from tests.service.helpers import FakeQueue

    with TestClient(create_app(tuned["settings"], queue=FakeQueue())) as c:
        response = c.get(f"/v1/classifiers/{tuned['classifier_id']}/export")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/zip"
    assert f'filename="{tuned["classifier_id"]}.zip"' in response.headers["content-disposition"]
    assert int(response.headers["content-length"]) == len(response.content)
    return response.content


def test_bundle_holds_model_labels_preprocessing_and_readme(bundle_bytes, tuned_client, tuned):
    zf = zipfile.ZipFile(io.BytesIO(bundle_bytes))
    assert sorted(zf.namelist()) == ["README.md", "labels.txt", "manifest.json", "model.onnx", "preprocess.json"]
    clf = tuned_client.get(f"/v1/classifiers/{tuned['classifier_id']}").json()
    assert zf.read("labels.txt").decode().splitlines() == clf["labels"]
    pre = json.loads(zf.read("preprocess.json"))
    assert {"size", "mean", "std", "interpolation", "resize_mode"} <= set(pre)
    model = onnx.load_from_string(zf.read("model.onnx"))
    assert model.graph.output[0].type.tensor_type.shape.dim[1].dim_value == len(clf["labels"])
    manifest = json.loads(zf.read("manifest.json"))
    if manifest.get("base_id"):  # materialised from base + mask + head: the model describes itself
        meta = {p.key: p.value for p in model.metadata_props}
        assert json.loads(meta["labels"]) == clf["labels"] and json.loads(meta["preprocess"]) == manifest["preprocess"]
    readme = zf.read("README.md").decode()
    assert "```python" in readme and "onnxruntime" in readme


def test_readme_example_reproduces_the_servers_classify(bundle_bytes, tuned_client, tuned, tmp_path):
    zipfile.ZipFile(io.BytesIO(bundle_bytes)).extractall(tmp_path)
    example = re.search(r"```python\n(.*?)```", (tmp_path / "README.md").read_text(), re.S).group(1)
    assert len(example.strip().splitlines()) <= 16
    (tmp_path / "classify.py").write_text(example)
    # square, portrait and landscape inputs exercise the resize + centre crop; the server decodes the same bytes
    images = {"square.png": image_bytes(COLORS["red"], size=(40, 40), seed=3),
              "portrait.png": image_bytes(COLORS["green"], size=(37, 61), seed=5),
              "landscape.jpg": image_bytes((120, 90, 200), size=(70, 45), fmt="JPEG", seed=7)}
    for name, data in images.items():
        (tmp_path / name).write_bytes(data)
        run = subprocess.run([sys.executable, "classify.py", name], cwd=tmp_path, capture_output=True, text=True,
                             timeout=120)
        assert run.returncode == 0, run.stderr
        local = [(label, float(score)) for label, score in (line.split("\t") for line in run.stdout.splitlines())]
        server = tuned_client.post(f"/v1/classifiers/{tuned['classifier_id']}/classify",
                                   files={"file": (name, data, "image/png")}, params={"top_k": 5}).json()
        remote = [(p["label"], p["score"]) for p in server["predictions"]]
        assert [label for label, _ in local] == [label for label, _ in remote], (name, local, remote)
        for (_, a), (_, b) in zip(local, remote):
            assert abs(a - b) < 1e-5, (name, local, remote)


def test_export_of_unknown_or_unready_classifier(client, tuned_client):
    assert tuned_client.get("/v1/classifiers/clf_000000000000000000000000/export").status_code == 404
    from tests.service.helpers import upload_parts

    files, data = upload_parts()
    created = client.post("/v1/classifiers", files=files, data=data).json()  # queued, never run (FakeQueue)
    response = client.get(f"/v1/classifiers/{created['classifier_id']}/export")
    assert response.status_code == 409 and response.json()["error"]["code"] == "not_ready"


def test_downloaded_model_carries_labels_and_preprocessing(tuned_client, tuned):
    """GET .../model.onnx is self-describing: labels, preprocessing and the head in metadata_props."""
    download = tuned_client.get(f"/v1/classifiers/{tuned['classifier_id']}/model.onnx")
    assert download.status_code == 200
    meta = {p.key: p.value for p in onnx.load_from_string(download.content).metadata_props}
    clf = tuned_client.get(f"/v1/classifiers/{tuned['classifier_id']}").json()
    assert json.loads(meta["labels"]) == clf["labels"]
    assert {"size", "mean", "std"} <= set(json.loads(meta["preprocess"]))
    assert "head" in meta and "logits" in meta["outputs"]
