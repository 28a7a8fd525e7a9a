"""The int8 guard: whether a version may serve int8 (rmt_core/quantize.py says how int8 is served).

It lives apart from quantize.py because it serves the version through rmt_core/runtime.py, which imports
quantize.py to build its int8 sessions: one module would make an import cycle.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from .quantize import GUARD_BATCH, MAX_ACCURACY_DROP, MIN_AGREEMENT
from .runtime import BaseRegistry, ServedClassifier, given_or_loaded


def _predict(clf, batch: np.ndarray, chunk: int) -> np.ndarray:
    return np.concatenate([clf.run(batch[i:i + chunk]) for i in range(0, len(batch), chunk)])


def int8_guard(version_dir: Path | str, bases_dir: Path | str, batch: np.ndarray, targets: Sequence[int],
               min_agreement: float = MIN_AGREEMENT, max_accuracy_drop: float = MAX_ACCURACY_DROP,
               fp32: ServedClassifier | None = None) -> dict:
    """Serve ``version_dir`` in fp32 and in int8 on ``batch`` (preprocessed images [N,3,H,W] with their
    class indices ``targets``) and decide whether int8 may serve it: the record to store in the manifest,
    {"allowed", "agreement", "accuracy_fp32", "accuracy_int8", "max_abs_dp", "n", "min_agreement",
    "max_accuracy_drop"}. int8 runs once image by image and once in batches of ``GUARD_BATCH``; agreement and
    int8 accuracy are the worse of the two. A failure to quantize is recorded (``"error"``), never raised:
    the version then serves fp32. ``fp32``: the version already served in fp32 (the caller keeps and closes it);
    otherwise loaded here."""
    batch = np.asarray(batch, dtype=np.float32)
    targets = np.asarray(targets, dtype=np.int64)
    if batch.ndim != 4 or len(batch) == 0 or len(batch) != len(targets):
        raise ValueError(f"the int8 guard needs images [N,3,H,W] with N >= 1 targets; got {batch.shape} and "
                         f"{targets.shape[0]} targets")
    record: dict = {"allowed": False, "n": int(len(batch)), "min_agreement": min_agreement,
                    "max_accuracy_drop": max_accuracy_drop}
    with given_or_loaded(fp32, lambda: ServedClassifier(
            version_dir, BaseRegistry(bases_dir, "cpu", shared_arena=False), precision="fp32")) as fp32:
        registry = fp32.registry
        reference = _predict(fp32, batch, GUARD_BATCH)
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
