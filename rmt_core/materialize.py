"""A self-contained model.onnx from base + mask + head, without torch (onnx + numpy), for download.

The file is the base graph with the mask multiplied into its initializers and the head appended
(image [N,3,H,W] -> logits [N,C]), so it runs anywhere ONNX Runtime does. Labels, preprocessing and the
head summary go into ``metadata_props`` so the download is usable on its own.
``materialized_model_path`` keeps the files in a size-bounded on-disk cache keyed by content.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from .runtime import LEGACY_MASK_FILE, MANIFEST, ONNX_FILE

MAX_PROTO_BYTES = 2**31 - 1  # protobuf's limit for one self-contained file


class Fp32Only(ValueError):
    """A precision other than fp32 was asked of a version that predates base+mask+head (its model is fp32)."""


def materialize_onnx(version_dir: Path | str, bases_dir: Path | str, out_path: Path | str,
                     precision: str = "fp32") -> Path:
    """Write the baked classifier of ``version_dir`` to ``out_path`` (temp file + rename). ``precision="int8"``:
    the encoder's MatMul/Gemm weights dynamically quantized as int8 serving does (rmt_core/quantize.py; the
    head stays float), whatever the version's int8 guard said (the manifest in metadata_props carries it)."""
    import onnx
    from onnx import numpy_helper

    from .quantize import PRECISIONS, quantize_model

    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} must be one of {', '.join(PRECISIONS)}")

    from .artifact import load_masks
    from .base import load_base
    from .head import HEAD_FILE, Head, append_to_graph

    version_dir, out_path = Path(version_dir), Path(out_path)
    manifest = json.loads((version_dir / MANIFEST).read_text())
    base = load_base(bases_dir, manifest["base_id"])
    model = onnx.load(str(base.onnx_path), load_external_data=True)
    mask_file = manifest.get("mask_file", LEGACY_MASK_FILE)
    if mask_file and ("mask_file" in manifest or (version_dir / mask_file).is_file()):
        bits, _ = load_masks(version_dir / mask_file)
        by_init = {}
        for name, b in bits.items():
            if b.all():
                continue
            where = base.maskable.get(name)
            if where is None:
                raise ValueError(f"mask {name} has no maskable tensor in base {base.base_id}")
            by_init[where["initializer"]] = b.T if where["transpose"] else b
        for tensor in model.graph.initializer:
            if tensor.name in by_init:
                value = numpy_helper.to_array(tensor) * by_init.pop(tensor.name)
                tensor.CopyFrom(numpy_helper.from_array(value.astype(np.float32, copy=False), tensor.name))
        if by_init:
            raise ValueError(f"base {base.base_id} lacks initializers {sorted(by_init)[:3]}")
    if precision == "int8":
        model = quantize_model(model)
    head = Head.load(version_dir / manifest.get("head_file", HEAD_FILE))
    append_to_graph(model.graph, head, model.graph.output[0].name, output="logits")
    props = {
        "labels": json.dumps(manifest["labels"]),
        "preprocess": json.dumps(manifest["preprocess"], sort_keys=True),
        "head": json.dumps(head.summary(), sort_keys=True),
        "backbone": str(manifest.get("backbone", base.backbone)),
        "pretrained": str(manifest.get("pretrained", base.pretrained)),
        "base_id": base.base_id,
        "method": str(manifest.get("method", "")),
        "candidate": str(manifest.get("candidate", "")),
        "precision": precision,
        "int8_guard": json.dumps(manifest.get("int8"), sort_keys=True),
        "outputs": "logits; class probabilities = softmax(logits); labels in the order of 'labels'",
    }
    del model.metadata_props[:]
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    data = model.SerializeToString()
    if len(data) > MAX_PROTO_BYTES:
        raise ValueError(f"the baked model is {len(data)} bytes, over protobuf's 2 GiB limit for one file")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out_path.name}.", dir=out_path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, out_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out_path


def _content_key(version_dir: Path, manifest: dict) -> str:
    h = hashlib.sha256((version_dir / MANIFEST).read_bytes())
    for name in (manifest.get("mask_file"), manifest.get("head_file")):
        if name and (version_dir / name).is_file():
            h.update((version_dir / name).read_bytes())
    return h.hexdigest()[:32]


def materialized_model_path(version_dir: Path | str, bases_dir: Path | str, cache_dir: Path | str,
                            max_cache_bytes: int, precision: str = "fp32") -> Path:
    """Path of a self-contained model.onnx for ``version_dir``, materialised on first use into ``cache_dir``.

    Old directories that hold a baked model.onnx return it as it is (in fp32 only). The cache keeps the most recently
    used files within ``max_cache_bytes`` (the file just asked for is always kept, even if larger).
    """
    version_dir, cache_dir = Path(version_dir), Path(cache_dir)
    manifest = json.loads((version_dir / MANIFEST).read_text())
    if not manifest.get("base_id"):
        legacy = version_dir / ONNX_FILE
        if not legacy.is_file():
            raise FileNotFoundError(f"{version_dir} has neither a base_id nor a {ONNX_FILE}")
        if precision != "fp32":
            raise Fp32Only(f"{version_dir} predates base+mask+head versions: its model.onnx exists in fp32 only")
        return legacy
    cache_dir.mkdir(parents=True, exist_ok=True)
    suffix = "" if precision == "fp32" else f"-{precision}"
    path = cache_dir / f"{_content_key(version_dir, manifest)}{suffix}.onnx"
    if path.is_file():
        os.utime(path)  # most recently used
    else:
        materialize_onnx(version_dir, bases_dir, path, precision)
    _evict(cache_dir, max_cache_bytes, keep=path)
    return path


def _evict(cache_dir: Path, max_bytes: int, keep: Path) -> None:
    files = []
    for p in cache_dir.glob("*.onnx"):
        try:
            st = p.stat()
        except FileNotFoundError:  # evicted by another process meanwhile
            continue
        files.append((st.st_mtime, st.st_size, p))
    total = sum(size for _, size, _ in files)
    for _, size, p in sorted(files):
        if total <= max_bytes:
            break
        if p == keep:
            continue
        p.unlink(missing_ok=True)  # a reader that has it open keeps reading (POSIX)
        total -= size
