"""GET /v1/classifiers/{id}/export: a portable zip bundle that runs anywhere with numpy + onnxruntime + Pillow.

The bundle holds model.onnx (the self-contained baked model), labels.txt (one label per output, in order),
preprocess.json (resize, crop and normalisation), manifest.json and a README.md whose example script is
run by the tests against the server's own answers.
"""
from __future__ import annotations

import json
import tempfile
import threading
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, Query
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, StreamingResponse

from rmt_service.store import Store

from ..access import ERRORS as _ERRORS, served_version
from ..errors import ApiError
from ..deps import StoreDep, TenantDep

router = APIRouter(prefix="/v1/classifiers", tags=["classifiers"])

Precision = Annotated[Literal["fp32", "int8"], Query(
    description="fp32 (default), or int8: the encoder's MatMul/Gemm weights dynamically quantized as "
                "RMT_SERVING_PRECISION=int8 serves them (the manifest's int8 field says whether the build's "
                "guard passed: agreement with fp32 >= 99%, accuracy within 0.5 point).")]

EXAMPLE = '''\
import json, sys
import numpy as np, onnxruntime as ort
from PIL import Image

pre = json.load(open("preprocess.json")); labels = open("labels.txt", encoding="utf-8").read().splitlines()
(h, w), resample = pre["size"], getattr(Image.Resampling, pre["interpolation"].upper())
img = Image.open(sys.argv[1]).convert("RGB"); W, H = img.size
if pre["resize_mode"] == "squash": img = img.resize((w, h), resample)
else:  # shortest side to h, then a centre crop
    img = img.resize((h, int(h * H / W)) if W <= H else (int(h * W / H), h), resample)
    left, top = round((img.width - w) / 2), round((img.height - h) / 2); img = img.crop((left, top, left + w, top + h))
x = ((np.asarray(img, np.float32) / 255 - pre["mean"]) / pre["std"]).transpose(2, 0, 1)[None].astype(np.float32)
session = ort.InferenceSession("model.onnx", providers=["CPUExecutionProvider"])
logits = session.run(None, {session.get_inputs()[0].name: x})[0][0]
p = np.exp(logits - logits.max()); p /= p.sum()
for i in np.argsort(-p)[:5]: print(f"{labels[i]}\\t{p[i]:.6f}")
'''

README = """# {name}

A few-shot image classifier exported from the RMT classifier service ({classifier_id}).
Labels: {labels}. Backbone {backbone} ({pretrained}), method {method}.

| file | what |
|---|---|
| `model.onnx` | the model: input `[N, 3, {h}, {w}]` float32 (preprocessed as below), output class logits `[N, {n}]` |
| `labels.txt` | one label per line, in the order of the model's outputs |
| `preprocess.json` | resize (`resize_mode`, `interpolation`), crop size and the mean/std to normalise with |
| `manifest.json` | how it was made: settings, sparsity, validation report |

Softmax over the logits gives the probabilities the service returns. Run it with numpy, onnxruntime and Pillow
(`pip install numpy onnxruntime pillow`) as `python classify.py photo.jpg`, where `classify.py` is:

```python
{example}```
"""


# Materialised models are rebuilt from base + mask + head on demand; keep the recent ones, within this size.
MATERIALIZED_CACHE_BYTES = 4 << 30


_building: dict[str, tuple[threading.Lock, int]] = {}  # version dir -> (its lock, threads using it)
_building_lock = threading.Lock()


@contextmanager
def _single_flight(key: str):
    """One thread at a time per ``key``: N concurrent downloads of a model not yet materialised build it once,
    the others wait and then find it cached."""
    with _building_lock:
        lock, users = _building.get(key, (None, 0))
        lock = lock or threading.Lock()
        _building[key] = (lock, users + 1)
    try:
        with lock:
            yield
    finally:
        with _building_lock:
            lock, users = _building[key]
            if users <= 1:
                del _building[key]
            else:
                _building[key] = (lock, users - 1)


def model_onnx_path(store: Store, model_dir: Path, precision: str = "fp32") -> Path:
    """The self-contained ONNX model of a published version: materialised from the shared base, the mask and
    the head (labels, preprocessing and head in metadata_props) and cached; older versions' own model.onnx."""
    from rmt_core.materialize import Fp32Only, materialized_model_path

    try:
        with _single_flight(str(Path(model_dir).resolve())):
            return materialized_model_path(model_dir, store.bases_dir, store.settings.data_dir / "cache" / "onnx",
                                           MATERIALIZED_CACHE_BYTES, precision)
    except Fp32Only:
        raise ApiError(409, "fp32_only", "this version predates base+mask+head classifiers: its model exists in "
                                         "fp32 only") from None


def write_bundle(model_dir: Path, onnx_path: Path, classifier_id: str, name: str, out) -> None:
    """Write the export zip of the version in ``model_dir`` (model: ``onnx_path``) to the file object ``out``."""
    manifest = json.loads((model_dir / "manifest.json").read_text())
    labels = list(manifest["labels"])
    preprocess = dict(manifest["preprocess"])
    h, w = (preprocess["size"], preprocess["size"]) if isinstance(preprocess["size"], int) else preprocess["size"]
    preprocess.setdefault("interpolation", "bicubic")
    preprocess.setdefault("resize_mode", "shortest")
    readme = README.format(name=name or classifier_id, classifier_id=classifier_id, labels=", ".join(labels),
                           backbone=manifest.get("backbone"), pretrained=manifest.get("pretrained"),
                           method=manifest.get("method"), h=h, w=w, n=len(labels), example=EXAMPLE)
    with zipfile.ZipFile(out, "w") as zf:
        # float weights barely compress: store the model, deflate the small text files
        zf.write(onnx_path, "model.onnx", compress_type=zipfile.ZIP_STORED)
        for arcname, text in (("labels.txt", "\n".join(labels) + "\n"),
                              ("preprocess.json", json.dumps(preprocess, indent=2) + "\n"),
                              ("manifest.json", json.dumps(manifest, indent=2) + "\n"),
                              ("README.md", readme)):
            zf.writestr(arcname, text, compress_type=zipfile.ZIP_DEFLATED)


def _iter_file(handle, chunk: int = 1 << 20):
    try:
        while data := handle.read(chunk):
            yield data
    finally:
        handle.close()


@router.get("/{classifier_id}/export", response_class=StreamingResponse, responses={
    **_ERRORS, 200: {"content": {"application/zip": {"schema": {"type": "string", "format": "binary"}}},
                     "description": "model.onnx, labels.txt, preprocess.json, manifest.json, README.md"}})
async def export_classifier(classifier_id: str, store: StoreDep, tenant: TenantDep,
                            precision: Precision = "fp32") -> StreamingResponse:
    """A zip to run the classifier anywhere: ONNX model, labels, preprocessing and a numpy example."""
    record, version = await run_in_threadpool(served_version, store, classifier_id, tenant)  # not on the loop
    model_dir = store.version_dir(version)
    # built in a temporary file (unlinked already): the model may be hundreds of MB, never held in memory
    onnx_path = await run_in_threadpool(model_onnx_path, store, model_dir, precision)
    handle = tempfile.TemporaryFile()
    try:
        await run_in_threadpool(write_bundle, model_dir, onnx_path, classifier_id, record.name, handle)
        size = handle.tell()
        handle.seek(0)
    except BaseException:
        handle.close()
        raise
    return StreamingResponse(_iter_file(handle), media_type="application/zip", headers={
        "Content-Disposition": f'attachment; filename="{classifier_id}.zip"', "Content-Length": str(size)})


@router.get("/{classifier_id}/model.onnx", response_class=FileResponse, responses=_ERRORS)
def download_model(classifier_id: str, store: StoreDep, tenant: TenantDep,
                   precision: Precision = "fp32") -> FileResponse:
    """The baked ONNX model (input: normalized [N,3,H,W] float32; output: class logits; labels and
    preprocessing in its metadata_props)."""
    _, version = served_version(store, classifier_id, tenant)
    path = model_onnx_path(store, store.version_dir(version), precision)  # materialised from base + mask + head (a sync route: in a thread)
    return FileResponse(path, media_type="application/octet-stream", filename=f"{classifier_id}.onnx")
