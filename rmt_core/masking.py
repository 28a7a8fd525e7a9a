"""Binary masks on CLIP image-encoder weights, through torch.nn.utils.parametrize.

The forward pass uses W * 1[M > alpha]; the backward pass treats the binariser as the identity
(straight-through), so dL/dM = dL/dW_eff * W. Targets are chosen by parameter name, never by
wrapping modules (a hook on attn.out_proj never fires inside nn.MultiheadAttention).
"""
from __future__ import annotations

import contextlib
import re

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

_BLOCK = r"transformer\.resblocks\.\d+\."
TARGETS = {
    "amt": [_BLOCK + r"attn\.in_proj_weight", _BLOCK + r"attn\.out_proj\.weight"],
    "mmt": [_BLOCK + r"mlp\.c_fc\.weight", _BLOCK + r"mlp\.c_proj\.weight"],
}
CONV1 = r"conv1\.weight"


class BinaryMask(nn.Module):
    """Parametrization W -> W * (hard + soft - soft.detach()): the value is W * hard, the gradient reaches
    the scores as dL/dW_eff * W."""

    def __init__(self, shape: torch.Size, init: float, threshold: float, device=None):
        super().__init__()
        self.scores = nn.Parameter(torch.full(shape, float(init), device=device, dtype=torch.float32))
        self.threshold = float(threshold)
        self.enabled = True

    def hard(self) -> torch.Tensor:
        return (self.scores > self.threshold)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return weight
        soft = self.scores.to(weight.dtype)
        # (soft - soft.detach()) is exactly 0, so the value is exactly W * hard; the gradient is W.
        return weight * (self.hard().to(weight.dtype) + (soft - soft.detach()))


def target_names(visual: nn.Module, method: str, mask_conv1: bool = True) -> list[str]:
    """Names (relative to ``visual``) of the weights a method masks. Biases, norms, embeddings never."""
    method = method.removeprefix("r-")
    names = [n for n, p in visual.named_parameters() if p.dim() >= 2]
    if method == "pmt":
        linear_or_conv = {f"{mod_name}.weight" if mod_name else "weight"
                          for mod_name, mod in visual.named_modules()
                          if isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d))}
        mha = {n for n in names if n.endswith("attn.in_proj_weight")}
        return [n for n in names if n in linear_or_conv or n in mha]
    if method not in TARGETS:
        raise ValueError(f"method={method!r}: expected amt, mmt or pmt (optionally r-)")
    patterns = TARGETS[method] + ([CONV1] if method == "amt" and mask_conv1 else [])
    chosen = [n for n in names if any(re.fullmatch(p, n) for p in patterns)]
    if not chosen:
        raise ValueError(f"method {method!r} found no target weights in this image encoder "
                         "(expected an open_clip VisionTransformer)")
    return chosen


def _owner(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    module_path, _, attr = name.rpartition(".")
    return (root.get_submodule(module_path) if module_path else root), attr


def attach_masks(model: nn.Module, method: str, init: float = 1e-2, threshold: float = 5e-3,
                 mask_conv1: bool = True) -> dict[str, BinaryMask]:
    """Freeze the whole model and put a BinaryMask on each target weight of ``model.visual``.

    Returns {full parameter name: mask module}; only the masks' scores require grad.
    """
    model.requires_grad_(False)
    visual = model.visual
    masks: dict[str, BinaryMask] = {}
    for name in target_names(visual, method, mask_conv1):
        owner, attr = _owner(visual, name)
        weight = getattr(owner, attr)
        mask = BinaryMask(weight.shape, init, threshold, device=weight.device)
        parametrize.register_parametrization(owner, attr, mask)
        masks[f"visual.{name}"] = mask
    return masks


# Fraction of (init - threshold) that a warm-started dropped entry starts below the threshold.
WARM_DROPPED_MARGIN = 0.1


def warm_start_masks(masks: dict[str, BinaryMask], bits: dict[str, np.ndarray], init: float,
                     threshold: float) -> list[str]:
    """Start tuning from an earlier mask: its kept entries at ``init``, its dropped ones just below
    ``threshold`` (a tenth of ``init``'s margin). They start dropped, but a few consistent steps bring them
    back: an update may add a class that needs them, and starting them as far below as ``init`` is above
    kept the parent's drops through a short update and lost accuracy (bench/RESULTS-versions.md). Masks
    whose name or shape the earlier mask lacks keep their fresh start. Returns the names warm-started."""
    dropped_start = float(threshold) - WARM_DROPPED_MARGIN * (float(init) - float(threshold))
    seeded = []
    for name, mask in masks.items():
        kept = bits.get(name)
        if kept is None or tuple(kept.shape) != tuple(mask.scores.shape):
            continue
        with torch.no_grad():
            kept_t = torch.from_numpy(np.ascontiguousarray(kept, dtype=bool)).to(mask.scores.device)
            mask.scores.copy_(torch.where(kept_t, torch.tensor(float(init)), torch.tensor(dropped_start)))
        seeded.append(name)
    return seeded


def find_masks(model: nn.Module) -> dict[str, BinaryMask]:
    found = {}
    for mod_name, module in model.named_modules():
        if parametrize.is_parametrized(module):
            for attr, plist in module.parametrizations.items():
                for p in plist:
                    if isinstance(p, BinaryMask):
                        found[f"{mod_name}.{attr}"] = p
    return found


@contextlib.contextmanager
def masks_disabled(model: nn.Module):
    """Temporarily run the zero-shot weights (used for GDR's teacher: no second copy of the model)."""
    masks = list(find_masks(model).values())
    for m in masks:
        m.enabled = False
    try:
        yield
    finally:
        for m in masks:
            m.enabled = True


def mask_bits(model: nn.Module) -> dict[str, np.ndarray]:
    """The binary masks (True = kept) as numpy arrays keyed by full parameter name."""
    return {name: m.hard().cpu().numpy() for name, m in find_masks(model).items()}


def sparsity(masks) -> float:
    """Percentage of masked-out entries over all mask entries (scores <= threshold)."""
    total = dropped = 0
    for m in masks.values() if isinstance(masks, dict) else masks:
        bits = m.hard() if isinstance(m, BinaryMask) else torch.as_tensor(np.asarray(m))
        total += bits.numel()
        dropped += bits.numel() - int(bits.sum())
    return 100.0 * dropped / total if total else 0.0


def bake_masks(model: nn.Module) -> nn.Module:
    """Multiply every mask into its weight and remove the mask machinery, in place.

    The result has exactly the original module structure and parameter count (peft's merge_and_unload).
    """
    for name, _ in list(find_masks(model).items()):
        owner, attr = _owner(model, name)
        parametrize.remove_parametrizations(owner, attr, leave_parametrized=True)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@torch.no_grad()
def apply_mask_bits(model: nn.Module, bits: dict[str, np.ndarray]) -> nn.Module:
    """Bake stored masks (from a mask file) into a base model's weights, in place."""
    params = dict(model.named_parameters())
    missing = sorted(set(bits) - set(params))
    if missing:
        raise ValueError(f"mask names not in this backbone: {', '.join(missing[:5])}")
    for name, b in bits.items():
        p = params[name]
        if tuple(p.shape) != tuple(b.shape):
            raise ValueError(f"mask {name} has shape {tuple(b.shape)}, weight has {tuple(p.shape)}")
        p.mul_(torch.as_tensor(np.asarray(b), device=p.device).to(p.dtype))
    return model
