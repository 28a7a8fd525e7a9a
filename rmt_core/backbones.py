"""CLIP backbones through open_clip: our own configs, shipped weights, local checkpoints, open_clip tags."""
from __future__ import annotations

import json
import logging
import os
import zipfile
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
    quick_gelu: bool = False  # built with QuickGELU activations (OpenAI-trained weights need them)

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
    require_cached_weights(name, pretrained)
    return pretrained


def require_cached_weights(name: str, tag: str) -> None:
    """An open_clip tag is usable only if its weights are already on this machine: nothing is ever downloaded.

    Checked before open_clip is asked (open_clip would retry a hub download for a minute, then raise a
    traceback), with the Hugging Face hub switched to offline mode for the rest of the process.
    """
    from huggingface_hub import constants

    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True  # read at call time; the variable alone is read only at import
    register_configs()
    cfg = open_clip.get_pretrained_cfg(name, tag)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(name) if name in open_clip.list_models() else []
        raise ValueError(f"pretrained={tag!r} is neither a checkpoint file, 'builtin', nor an open_clip tag of "
                         f"{name} (its tags: {', '.join(tags) or 'none'})")
    cached = None
    if cfg.get("hf_hub"):
        try:
            cached = open_clip.pretrained.download_pretrained(cfg)  # offline: the cached file or an error
        except Exception:
            cached = None
    elif cfg.get("url"):
        path = Path.home() / ".cache" / "clip" / os.path.basename(cfg["url"])  # open_clip's URL cache
        cached = str(path) if path.is_file() else None
    if not cached:
        raise FileNotFoundError(
            f"the {name} weights {tag!r} are not on this machine and rmt never downloads: pass a local checkpoint "
            f"file, e.g. --pretrained /models/{name}-{tag}.bin (README: 'Real CLIP weights, offline'), "
            f"or use the shipped backbone (--backbone rmt-world-vit --pretrained builtin)")


def is_torchscript_archive(path: str | Path) -> bool:
    """OpenAI distributes its CLIP checkpoints as TorchScript archives (a zip with a ``code/`` folder)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any("/code/" in f"/{entry}" for entry in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def wants_quick_gelu(name: str, pretrained: str | None, source: str | None) -> bool:
    """Whether weights were trained with QuickGELU: OpenAI's CLIPs were, open_clip's LAION ones were not.

    A ``-quickgelu`` model name says so; an open_clip tag says so in its pretrained config (the ``openai`` tag
    does, but open_clip only *warns* when the model config disagrees); a checkpoint file is taken to be
    OpenAI's when its file name contains "openai" or it is a TorchScript archive (OpenAI's own .pt format).
    A plain state dict cannot tell: pass ``quick_gelu`` explicitly (TuneConfig.quick_gelu) for those.
    """
    if name.lower().endswith("-quickgelu"):
        return True
    if not pretrained or source is None:
        return False
    if Path(source).is_file():
        return "openai" in Path(source).name.lower() or is_torchscript_archive(source)
    try:
        return bool(open_clip.get_pretrained_cfg(name, source).get("quick_gelu", False))
    except Exception:  # an unknown tag: open_clip raises its own error when loading
        return False


def load_backbone(name: str, pretrained: str | None = BUILTIN, device: str | torch.device = "cpu",
                  seed: int = 0, quick_gelu: bool | None = None) -> Backbone:
    """Load a CLIP model by open_clip name. ``pretrained=None`` gives a seeded random init (tests).

    ``quick_gelu``: None = detect (``wants_quick_gelu``); True/False forces the activation. Every feature, the
    GDR teacher and the tuned model are computed by this network, so a wrong activation is wrong everywhere.
    """
    register_configs()
    if name not in open_clip.list_models():
        raise ValueError(f"backbone {name!r} is not a known open_clip model; ours: "
                         f"{', '.join(sorted(p.stem for p in CONFIG_DIR.glob('*.json')))}")
    source = resolve_pretrained(name, pretrained)
    use_quick_gelu = wants_quick_gelu(name, pretrained, source) if quick_gelu is None else bool(quick_gelu)
    if quick_gelu is None and use_quick_gelu:
        log.info("backbone %s with weights %r: building the QuickGELU variant (OpenAI-trained weights)",
                 name, pretrained)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model = open_clip.create_model(name, pretrained=source, device=device, force_quick_gelu=use_quick_gelu)
        except RuntimeError as exc:
            raise RuntimeError(f"could not load weights {pretrained!r} for backbone {name!r}: {exc}") from exc
    model.eval()
    return Backbone(model=model, tokenizer=open_clip.get_tokenizer(name), name=name, pretrained=pretrained,
                    quick_gelu=use_quick_gelu)


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
