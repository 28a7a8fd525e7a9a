"""int8 serving: ONNX Runtime dynamic quantization, and the guard that decides whether a version may serve it.

A classifier served in int8 runs every segment of its chain (rmt_core/segments.py: the base's shared stretches
and its own masked ones, the mask multiplied in first) through ``onnxruntime.quantization.quantize_dynamic``:
MatMul/Gemm weights stored as int8 (per tensor, symmetric), activations quantized to uint8 per call
(``DynamicQuantizeMatMul``: the u8s8 kernels, VNNI where the CPU has it). The head stays in float.
Activations are quantized with one scale per tensor over the whole batch, so an int8 answer can depend a
little on the other images of its batch: the guard therefore checks int8 both image by image and in batches.

The guard (``int8_guard``) runs when a version is built (rmt_core/pipeline.py) on the classifier's own images
and is recorded in its manifest under ``"int8"``: argmax agreement with fp32 >= ``MIN_AGREEMENT`` and accuracy
at most ``MAX_ACCURACY_DROP`` below fp32's. A version serves int8 only where it says ``"allowed": true``
(runtime.load_classifier(..., precision="int8")); every other version serves fp32.
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

PRECISIONS = ("fp32", "int8")
GUARD_KEY = "int8"           # the manifest field the guard's result is recorded in
MIN_AGREEMENT = 0.99         # argmax agreement with fp32 on the classifier's own images
MAX_ACCURACY_DROP = 0.005    # int8 accuracy may trail fp32's by at most half a point
GUARD_BATCH = 32             # the batched half of the guard runs chunks of this size (the service's batch size)
QUANTIZED_OPS = ("MatMul", "Gemm")


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


def _predict(clf, batch: np.ndarray, chunk: int) -> np.ndarray:
    return np.concatenate([clf.run(batch[i:i + chunk]) for i in range(0, len(batch), chunk)])


def int8_guard(version_dir: Path | str, bases_dir: Path | str, batch: np.ndarray, targets: Sequence[int],
               min_agreement: float = MIN_AGREEMENT, max_accuracy_drop: float = MAX_ACCURACY_DROP) -> dict:
    """Serve ``version_dir`` in fp32 and in int8 on ``batch`` (preprocessed images [N,3,H,W] with their
    class indices ``targets``) and decide whether int8 may serve it: the record to store in the manifest,
    {"allowed", "agreement", "accuracy_fp32", "accuracy_int8", "max_abs_dp", "n", "min_agreement",
    "max_accuracy_drop"}. int8 runs once image by image and once in batches of ``GUARD_BATCH``; agreement and
    int8 accuracy are the worse of the two. A failure to quantize is recorded (``"error"``), never raised:
    the version then serves fp32."""
    from .runtime import BaseRegistry, ServedClassifier

    batch = np.asarray(batch, dtype=np.float32)
    targets = np.asarray(targets, dtype=np.int64)
    if batch.ndim != 4 or len(batch) == 0 or len(batch) != len(targets):
        raise ValueError(f"the int8 guard needs images [N,3,H,W] with N >= 1 targets; got {batch.shape} and "
                         f"{targets.shape[0]} targets")
    record: dict = {"allowed": False, "n": int(len(batch)), "min_agreement": min_agreement,
                    "max_accuracy_drop": max_accuracy_drop}
    registry = BaseRegistry(bases_dir, "cpu", shared_arena=False)
    fp32 = ServedClassifier(version_dir, registry, precision="fp32")
    try:
        reference = _predict(fp32, batch, GUARD_BATCH)
    finally:
        fp32.close()
    try:
        int8 = ServedClassifier(version_dir, registry, precision="int8", check_guard=False)
    except Exception as exc:  # noqa: BLE001 - recorded: the version serves fp32
        logging.getLogger(__name__).warning("int8 quantization of %s failed: %s", version_dir, exc)
        return {**record, "error": f"{type(exc).__name__}: {exc}"[:500]}
    try:
        batched = _predict(int8, batch, GUARD_BATCH)
        single = _predict(int8, batch, 1)
    finally:
        int8.close()
    expected = reference.argmax(1)
    agreement = min(float((batched.argmax(1) == expected).mean()), float((single.argmax(1) == expected).mean()))
    accuracy_fp32 = float((expected == targets).mean())
    accuracy_int8 = min(float((batched.argmax(1) == targets).mean()), float((single.argmax(1) == targets).mean()))
    record.update(agreement=agreement, accuracy_fp32=accuracy_fp32, accuracy_int8=accuracy_int8,
                  max_abs_dp=float(max(np.abs(batched - reference).max(), np.abs(single - reference).max())))
    # 1e-9: accuracies are ratios of counts; a drop of exactly the bound is allowed
    record["allowed"] = bool(agreement >= min_agreement and accuracy_int8 >= accuracy_fp32 - max_accuracy_drop - 1e-9)
    return record
