"""ONNX Runtime classifier over a baked model directory (no torch)."""
from __future__ import annotations

import ctypes
import json
import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .preprocess import PreprocessConfig, preprocess_batch, preprocess_image

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
ONNX_FILE = "model.onnx"


def _cuda_usable() -> bool:
    """CUDA is offered only if ORT was built with it AND the driver library loads (else ORT logs an error)."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def make_session(model_path: Path | str, providers: str = "auto") -> ort.InferenceSession:
    """An ORT session on CUDA when it really works, CPU otherwise; ``providers`` is auto | cpu | cuda."""
    if providers not in ("auto", "cpu", "cuda"):
        raise ValueError(f"providers={providers!r} must be auto, cpu or cuda")
    wanted = ["CPUExecutionProvider"]
    if providers in ("auto", "cuda") and _cuda_usable():
        wanted.insert(0, "CUDAExecutionProvider")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Idle ORT threads spin by default and take the CPU from the server's request decoding between batches.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(model_path), sess_options=options, providers=wanted)
    if providers == "cuda" and "CUDAExecutionProvider" not in session.get_providers():
        log.warning("CUDA was asked for but ONNX Runtime runs on %s", session.get_providers())
    return session


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


class OnnxClassifier:
    """A published classifier: labels + preprocessing from manifest.json, the baked model from model.onnx."""

    def __init__(self, model_dir: Path | str, providers: str = "auto"):
        self.model_dir = Path(model_dir)
        manifest_path = self.model_dir / MANIFEST
        if not manifest_path.is_file():
            raise FileNotFoundError(f"{self.model_dir} is not a classifier directory (no {MANIFEST})")
        self.manifest = json.loads(manifest_path.read_text())
        self.labels: list[str] = list(self.manifest["labels"])
        self.preprocess_config = PreprocessConfig.from_dict(self.manifest["preprocess"])
        self.session = make_session(self.model_dir / ONNX_FILE, providers)
        self._input = self.session.get_inputs()[0].name

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    @property
    def input_size(self) -> tuple[int, int]:
        return self.preprocess_config.size

    def preprocess(self, img) -> np.ndarray:
        return preprocess_image(img, self.preprocess_config)

    def logits(self, batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if batch.ndim != 4 or batch.shape[1:] != (3, *self.input_size):
            raise ValueError(f"batch has shape {batch.shape}; expected [N, 3, {self.input_size[0]}, {self.input_size[1]}]")
        return self.session.run(None, {self._input: batch})[0]

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Preprocessed batch [N,3,H,W] -> class probabilities [N,C]."""
        return softmax(self.logits(batch))

    def top_k(self, probs: np.ndarray, top_k: int = 5) -> list[list[dict]]:
        k = max(1, min(int(top_k), len(self.labels)))
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        return [[{"label": self.labels[j], "score": float(row[j])} for j in idx] for row, idx in zip(probs, order)]

    def classify(self, images, top_k: int = 5) -> list[list[dict]]:
        return self.top_k(self.run(preprocess_batch(images, self.preprocess_config)), top_k)
