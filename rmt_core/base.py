"""The shared base: the frozen image encoder of one (backbone, weights), exported to ONNX once.

A base is content-addressed by a fingerprint of its weights, so every classifier tuned from the same
backbone and weights points at the same directory:

    <bases_dir>/<base_id>/
        base.onnx        graph: image [N, 3, H, W] -> features [N, D] (raw, not normalised)
        base.onnx.data   the large initializers, raw little-endian, each 64-byte aligned (mmap-able)
        base.json        backbone, pretrained, preprocess, feature dim, and for every maskable parameter
                         the ONNX initializer that holds it (``maskable``: name -> {initializer, transpose})
        text.onnx, text.json, the BPE vocabulary: the text tower (rmt_core.text), when the tokenizer is CLIP's

The exporter renames and transposes weights (a Linear's weight becomes ``onnx::MatMul_123`` = W.T), so
the map from torch parameter to initializer is found by value and checked to be one-to-one; a mask
bit for ``visual.X`` then lands on ``initializer`` (transposed when ``transpose``). The directory is
written to a staging directory and renamed into place; an existing base is reused, never rewritten. Where
that staging lives is the caller's to decide (``ensure_base(staging=...)``: the service stages it with its
other blobs, so it knows what a crash left behind); alone, a hidden temp directory beside the bases.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .torch_export import no_mha_fastpath  # noqa: F401  (re-exported for older callers)

log = logging.getLogger(__name__)

BASE_ONNX = "base.onnx"
BASE_DATA = "base.onnx.data"
BASE_JSON = "base.json"
BASE_FORMAT = 2          # part of the fingerprint: a new export format gives new base ids (2: + text tower)
EXTERNAL_MIN_BYTES = 1024
ALIGN = 64
INPUT_NAME = "image"
OUTPUT_NAME = "features"


@dataclass(frozen=True)
class BaseInfo:
    """What base.json says, plus where the base lives."""

    base_id: str
    path: Path
    backbone: str
    pretrained: str | None
    preprocess: dict
    feature_dim: int
    maskable: dict  # full torch parameter name ("visual....") -> {"initializer": str, "transpose": bool}
    opset: int

    @property
    def onnx_path(self) -> Path:
        return self.path / BASE_ONNX

    @classmethod
    def load(cls, base_dir: Path | str) -> "BaseInfo":
        base_dir = Path(base_dir)
        meta_path = base_dir / BASE_JSON
        if not meta_path.is_file():
            raise FileNotFoundError(f"{base_dir} is not a base directory (no {BASE_JSON})")
        meta = json.loads(meta_path.read_text())
        return cls(base_id=meta["base_id"], path=base_dir, backbone=meta["backbone"], pretrained=meta["pretrained"],
                   preprocess=meta["preprocess"], feature_dim=int(meta["feature_dim"]), maskable=meta["maskable"],
                   opset=int(meta["opset"]))


def fingerprint(visual, architecture: str = "") -> str:
    """sha256 over the image encoder's parameter and buffer names, dtypes, shapes and bytes.

    ``architecture`` names what the weights do not show (the backbone's config name).
    """
    import torch

    h = hashlib.sha256(f"rmt-base-v{BASE_FORMAT}|{architecture}".encode())
    # The activation is architecture, not weights: the same (OpenAI) weights under QuickGELU and nn.GELU are two
    # networks (backbones.wants_quick_gelu). Only QuickGELU is hashed, so existing GELU base ids stay valid.
    if any(type(m).__name__ == "QuickGELU" for m in visual.modules()):
        h.update(b"activation=QuickGELU|")
    state = visual.state_dict()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:32]


def architecture_of(backbone) -> str:
    """The open_clip config name: settings such as pooling change the graph but not the weights' shapes."""
    return backbone.name


def base_dir_for(bases_dir: Path | str, base_id: str) -> Path:
    return Path(bases_dir) / base_id


def load_base(bases_dir: Path | str, base_id: str) -> BaseInfo:
    return BaseInfo.load(base_dir_for(bases_dir, base_id))


def ensure_base(backbone, bases_dir: Path | str, opset: int = 17,
                staging: Callable[[], Path] | None = None) -> BaseInfo:
    """The base of ``backbone`` in ``bases_dir``: reused when its fingerprint is there, exported once otherwise.

    ``backbone.model`` must carry its original weights (no masks attached, nothing baked in). ``staging()``
    gives the empty directory to export into, on the same filesystem as ``bases_dir`` (default: a hidden
    temp directory inside it); it is renamed into place when complete, removed on failure.
    """
    from .masking import find_masks

    if find_masks(backbone.model):
        raise ValueError("the backbone carries masks: export the base from untouched weights (before tuning)")
    visual = backbone.model.visual
    base_id = fingerprint(visual, architecture_of(backbone))
    bases_dir = Path(bases_dir)
    final = base_dir_for(bases_dir, base_id)
    if (final / BASE_JSON).is_file():
        return BaseInfo.load(final)
    bases_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(staging()) if staging is not None else Path(tempfile.mkdtemp(prefix=f".{base_id}.", dir=bases_dir))
    try:
        _export(backbone, base_id, tmp, opset)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a base is read by every process that serves
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / BASE_JSON).is_file():  # not "someone else won the race": a real failure
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            log.info("base %s was written concurrently; reusing it", base_id)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return BaseInfo.load(final)


def _export(backbone, base_id: str, out: Path, opset: int) -> None:
    import onnx
    import torch

    from .masking import target_names

    visual = backbone.model.visual
    was_training = visual.training
    visual.eval()
    example = torch.zeros(2, 3, *backbone.image_size)
    raw = out / "raw.onnx"
    try:
        with no_mha_fastpath(), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)  # MHA's shape checks, constant per model
            torch.onnx.export(visual, (example.to(next(visual.parameters()).device),),
                              str(raw), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                              opset_version=opset, dynamo=False)
    finally:
        visual.train(was_training)
    model = onnx.load(str(raw))
    raw.unlink()

    candidates = sorted({n for m in ("amt", "mmt", "pmt") for n in target_names(visual, m)})
    params = {n: p.detach().cpu().numpy() for n, p in visual.named_parameters()}
    maskable = map_parameters(model, {f"visual.{n}": params[n] for n in candidates},
                              others={f"visual.{n}": a for n, a in params.items() if n not in candidates})
    feature_dim = int(_feature_dim(visual, example))
    write_external(model, out / BASE_ONNX, BASE_DATA)
    from .text import export_text_tower

    has_text = export_text_tower(backbone, out, opset)  # classes added by name, embedded without torch
    meta = {"text": has_text, "base_id": base_id, "format": BASE_FORMAT, "backbone": backbone.name, "pretrained": backbone.pretrained,
            "preprocess": backbone.preprocess, "feature_dim": feature_dim, "input": INPUT_NAME, "output": OUTPUT_NAME,
            "opset": opset, "maskable": maskable,
            "bytes": (out / BASE_ONNX).stat().st_size + (out / BASE_DATA).stat().st_size}
    (out / BASE_JSON).write_text(json.dumps(meta, indent=2, sort_keys=True))


def _feature_dim(visual, example) -> int:
    import torch

    with torch.no_grad():
        return visual(example[:1].to(next(visual.parameters()).device)).shape[-1]


def map_parameters(model, wanted: dict[str, np.ndarray], others: dict[str, np.ndarray] | None = None) -> dict:
    """{torch name: {"initializer", "transpose"}} found by value; ValueError unless every map is one-to-one.

    An initializer that also equals some other parameter (the exporter deduplicates equal tensors) is
    refused: masking it would silently change that other parameter too.
    """
    from onnx import numpy_helper

    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    by_shape: dict[tuple, list[str]] = {}
    for name, arr in inits.items():
        by_shape.setdefault(arr.shape, []).append(name)
    result, used = {}, {}
    for pname, value in wanted.items():
        hits = []
        for transpose, v in ((False, value), (True, value.T if value.ndim == 2 else None)):
            if v is None:
                continue
            hits += [(n, transpose) for n in by_shape.get(v.shape, []) if np.array_equal(inits[n], v)]
        if len(hits) != 1:
            raise ValueError(f"parameter {pname} matches {len(hits)} ONNX initializers by value (expected exactly one)")
        init, transpose = hits[0]
        if init in used:
            raise ValueError(f"parameters {used[init]} and {pname} share ONNX initializer {init}")
        for oname, other in (others or {}).items():
            if other.shape == value.shape and np.array_equal(other, value):
                raise ValueError(f"parameter {pname} equals {oname}; the exporter may have merged them into {init}")
        used[init] = pname
        result[pname] = {"initializer": init, "transpose": transpose}
    return result


def write_external(model, path: Path, data_name: str) -> None:
    """Save ``model`` with every initializer >= EXTERNAL_MIN_BYTES in one aligned raw file beside it."""
    import onnx
    from onnx import TensorProto, numpy_helper

    offset = 0
    with open(path.parent / data_name, "wb") as fh:
        for tensor in model.graph.initializer:
            arr = numpy_helper.to_array(tensor)
            if arr.nbytes < EXTERNAL_MIN_BYTES:
                continue
            pad = (-offset) % ALIGN
            fh.write(b"\0" * pad)
            offset += pad
            data = np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
            fh.write(data)
            tensor.ClearField("raw_data")
            for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
                tensor.ClearField(field)
            tensor.data_location = TensorProto.EXTERNAL
            del tensor.external_data[:]
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(len(data)))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            offset += len(data)
    onnx.save_model(model, str(path))


def external_layout(model) -> dict[str, tuple[int, int, np.dtype, tuple]]:
    """{initializer name: (offset, length, dtype, shape)} for the initializers stored in the data file."""
    from onnx import helper

    out = {}
    for tensor in model.graph.initializer:
        if tensor.data_location != 1:  # TensorProto.EXTERNAL
            continue
        info = {e.key: e.value for e in tensor.external_data}
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type))
        out[tensor.name] = (int(info.get("offset", 0)), int(info["length"]), dtype, tuple(tensor.dims))
    return out
