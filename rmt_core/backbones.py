"""CLIP backbones through open_clip: our own configs, shipped weights, local checkpoints, open_clip tags."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parent / "model_configs"
WEIGHTS_DIR = Path(__file__).parent / "weights"
BUILTIN = "builtin"

_registered = False


def register_configs() -> None:
    """Make the project's model configs (model_configs/*.json) known to open_clip, once."""
    global _registered
    if not _registered:
        open_clip.add_model_config(CONFIG_DIR)
        _registered = True


@dataclass
class Backbone:
    model: Any  # open_clip.CLIP
    tokenizer: Any
    name: str
    pretrained: str | None

    @property
    def preprocess(self) -> dict:
        """open_clip's preprocessing config of these weights, JSON-ready (see rmt_core.preprocess)."""
        cfg = dict(self.model.visual.preprocess_cfg)
        size = cfg["size"]
        cfg["size"] = [size, size] if isinstance(size, int) else list(size)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()
                if k in ("size", "mean", "std", "interpolation", "resize_mode")}

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.preprocess["size"])


def resolve_pretrained(name: str, pretrained: str | None) -> str | None:
    """'builtin' -> the shipped checkpoint path; a path is checked; anything else is an open_clip tag."""
    if pretrained is None or pretrained == "":
        return None
    if pretrained == BUILTIN:
        path = WEIGHTS_DIR / f"{name}.pt"
        if not path.is_file():
            shipped = sorted(p.stem for p in WEIGHTS_DIR.glob("*.pt"))
            raise FileNotFoundError(f"backbone {name!r} has no builtin weights (shipped: {', '.join(shipped) or 'none'}); "
                                    "pass a local checkpoint path or pretrained=None for random init")
        return str(path)
    if "/" in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors")):
        if not Path(pretrained).expanduser().is_file():
            raise FileNotFoundError(f"pretrained checkpoint {pretrained!r} does not exist")
        return str(Path(pretrained).expanduser())
    return pretrained


def load_backbone(name: str, pretrained: str | None = BUILTIN, device: str | torch.device = "cpu",
                  seed: int = 0) -> Backbone:
    """Load a CLIP model by open_clip name. ``pretrained=None`` gives a seeded random init (tests)."""
    register_configs()
    if name not in open_clip.list_models():
        raise ValueError(f"backbone {name!r} is not a known open_clip model; ours: "
                         f"{', '.join(sorted(p.stem for p in CONFIG_DIR.glob('*.json')))}")
    source = resolve_pretrained(name, pretrained)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model = open_clip.create_model(name, pretrained=source, device=device)
        except RuntimeError as exc:
            raise RuntimeError(f"could not load weights {pretrained!r} for backbone {name!r}: {exc}") from exc
    model.eval()
    return Backbone(model=model, tokenizer=open_clip.get_tokenizer(name), name=name, pretrained=pretrained)


def model_config(name: str) -> dict:
    register_configs()
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ValueError(f"backbone {name!r} is not a known open_clip model")
    return json.loads(json.dumps(cfg))


@torch.no_grad()
def encode_class_texts(backbone: Backbone, labels: list[str], template: str) -> torch.Tensor:
    """L2-normalised text embeddings, one row per class (computed once per task, no grad)."""
    from .templates import class_prompt

    device = next(backbone.model.parameters()).device
    tokens = backbone.tokenizer([class_prompt(label, template) for label in labels]).to(device)
    feats = backbone.model.encode_text(tokens).float()
    return feats / feats.norm(dim=-1, keepdim=True)
