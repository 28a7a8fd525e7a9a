"""ONNX export of a baked classifier (image encoder + normalised class embeddings + logit scale)."""
from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .torch_export import no_mha_fastpath
from .masking import find_masks
from .runtime import make_session, softmax


class ExportParityError(RuntimeError):
    """ONNX Runtime disagrees with torch on the exported model: nothing is published."""


class ClassifierHead(nn.Module):
    """image -> logit_scale * norm(visual(image)) @ class_embeddings.T  (what the ONNX file computes)."""

    def __init__(self, visual: nn.Module, text_features: torch.Tensor, logit_scale: float):
        super().__init__()
        self.visual = visual
        self.register_buffer("class_embeddings", text_features.detach().float().clone())
        self.register_buffer("logit_scale", torch.tensor(float(logit_scale)))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        feats = self.visual(image)
        feats = feats / feats.norm(dim=-1, keepdim=True)
        return self.logit_scale * feats @ self.class_embeddings.T


def export_onnx(head: ClassifierHead, path: Path | str, opset: int = 17) -> Path:
    """Write ``head`` to ``path`` (temp file + rename) with a dynamic batch axis. Masks must be baked first."""
    if find_masks(head):
        raise ValueError("the model still carries masks: bake them (masking.bake_masks) before export")
    path = Path(path)
    head = head.eval().cpu()
    size = head.visual.image_size if hasattr(head.visual, "image_size") else (224, 224)
    size = (size, size) if isinstance(size, int) else tuple(size)
    example = torch.zeros(2, 3, *size)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".onnx", dir=path.parent)
    os.close(fd)
    try:
        with no_mha_fastpath(), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)  # MHA's shape checks, constant per model
            torch.onnx.export(head, (example,), tmp, input_names=["image"], output_names=["logits"],
                              dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
                              opset_version=opset, dynamo=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _compare_with_torch(model: nn.Module, run, what: str, batch: torch.Tensor | None, atol: float,
                        seed: int) -> float:
    """Class probabilities of ``model`` (image -> logits) against ``run`` (float32 image batch -> probabilities)
    on ``batch`` (a seeded random one of the model's image size when None); max |dp|, or ExportParityError
    naming ``what`` when it exceeds ``atol``."""
    model = model.eval().cpu()
    if batch is None:
        size = model.visual.image_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        batch = torch.randn(3, 3, *size, generator=torch.Generator().manual_seed(seed))
    expected = torch.softmax(model(batch.float()), dim=-1).numpy()
    got = run(batch.float().numpy())
    diff = float(np.abs(expected - got).max())
    if not diff <= atol:
        raise ExportParityError(f"{what} differs from torch by {diff:.3g} (> {atol}) on class probabilities")
    return diff


@torch.no_grad()
def check_parity(head: ClassifierHead, onnx_path: Path | str, batch: torch.Tensor | None = None,
                 atol: float = 1e-3, seed: int = 0) -> float:
    """Run torch and ONNX Runtime (CPU) on the same batch; return max |dp| over class probabilities.

    Raises ExportParityError when it exceeds ``atol``.
    """
    session = make_session(onnx_path, "cpu")
    return _compare_with_torch(head, lambda images: softmax(session.run(None, {"image": images})[0]),
                               "ONNX Runtime", batch, atol, seed)


@torch.no_grad()
def check_served_parity(model: nn.Module, version_dir: Path | str, bases_dir: Path | str,
                        batch: torch.Tensor | None = None, atol: float = 1e-3, seed: int = 0, served=None) -> float:
    """Serve ``version_dir`` the way the service will (shared base sessions, mask baked at load, numpy head)
    and compare its class probabilities with ``model`` (image -> logits, masks baked) on one batch.
    ``served``: the version already loaded that way (the caller keeps and closes it); otherwise loaded here.

    Returns max |dp|; raises ExportParityError when it exceeds ``atol``.
    """
    from .runtime import BaseRegistry, given_or_loaded, load_classifier

    with given_or_loaded(served, lambda: load_classifier(
            version_dir, bases_dir, BaseRegistry(bases_dir, "cpu", shared_arena=False))) as served:
        return _compare_with_torch(model, served.run, "the served classifier", batch, atol, seed)
