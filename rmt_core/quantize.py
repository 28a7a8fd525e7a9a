"""int8 serving: ONNX Runtime dynamic quantization, and the guard that decides whether a version may serve it.

A classifier served in int8 runs every segment of its chain (rmt_core/segments.py: the base's shared stretches
and its own masked ones, the mask multiplied in first) through ``onnxruntime.quantization.quantize_dynamic``:
MatMul/Gemm weights stored as int8 (per tensor, symmetric), activations quantized to uint8 per call
(``DynamicQuantizeMatMul``: the u8s8 kernels, VNNI where the CPU has it). The head stays in float.
Activations are quantized with one scale per tensor over the whole batch, so an int8 answer can depend a
little on the other images of its batch: the guard therefore checks int8 both image by image and in batches.

The guard (``int8_guard.int8_guard``, a module above rmt_core/runtime.py, which imports this one) runs when a version is built (rmt_core/pipeline.py) on the classifier's own images
and is recorded in its manifest under ``"int8"``: argmax agreement with fp32 >= ``MIN_AGREEMENT`` and accuracy
at most ``MAX_ACCURACY_DROP`` below fp32's. A version serves int8 only where it says ``"allowed": true``
(runtime.load_classifier(..., precision="int8")); every other version serves fp32.
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np

PRECISIONS = ("fp32", "int8")
GUARD_KEY = "int8"           # the manifest field the guard's result is recorded in
MIN_AGREEMENT = 0.99         # argmax agreement with fp32 on the classifier's own images
MAX_ACCURACY_DROP = 0.005    # int8 accuracy may trail fp32's by at most half a point
GUARD_BATCH = 32             # the batched half of the guard runs chunks of this size (the service's batch size)
QUANTIZED_OPS = ("MatMul", "Gemm")
# what a version built without the guard records (a worker with RMT_INT8_GUARD=false): it serves fp32 only
GUARD_SKIPPED = {"allowed": False, "reason": "the int8 guard did not run: the build was made with it turned off "
                                             "(RMT_INT8_GUARD=false); this version serves fp32"}


class _NoPreprocessAdvice(logging.Filter):
    """quantize_dynamic logs a root-logger warning advising its pre-processing script on every call."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()


_quiet = _NoPreprocessAdvice()  # installed on the root logger once, never removed (loads quantize in threads)


def quantize_model(model):
    """``model`` (an onnx ModelProto with its weights inside) with MatMul/Gemm weights dynamically quantized
    to int8 (a new ModelProto; the input is left as it was)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    logging.getLogger().addFilter(_quiet)  # a no-op when it is there already
    with tempfile.TemporaryDirectory(prefix="rmt-int8-") as tmp:
        out = Path(tmp) / "model.int8.onnx"
        quantize_dynamic(model, out, op_types_to_quantize=list(QUANTIZED_OPS), per_channel=False,
                         weight_type=QuantType.QInt8)
        return onnx.load(str(out))


def initializer_bytes(model) -> int:
    """Bytes of ``model``'s initializers (what its session holds as weights, before prepacking)."""
    from onnx import helper

    total = 0
    for t in model.graph.initializer:
        total += int(np.prod(t.dims, dtype=np.int64)) * np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
    return total


def guard_allows(manifest: dict | None) -> bool:
    """Whether a version's manifest records a passed int8 guard."""
    record = (manifest or {}).get(GUARD_KEY)
    return isinstance(record, dict) and record.get("allowed") is True
