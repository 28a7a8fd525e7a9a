"""build_classifier: images in, a published classifier directory out (tune -> bake -> export -> report).

Directory layout (one classifier; the caller writes into a temp dir and renames it):
    manifest.json   labels, backbone, method, settings, preprocessing, sparsity, sizes, validation
    mask.rmtm       the learned mask: the source of truth (see artifact.py)
    model.onnx      base weights x mask, baked; rebuilt from the two above by ``rebuild_onnx``
    report.json     training history and validation details
    curve.png       training curve;  confusion.png  holdout confusion matrix (when a holdout exists)
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import random
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .artifact import atomic_write_bytes, entropy_bound_bytes, load_masks, save_masks
from .config import TuneConfig
from .images import open_image_file
from .preprocess import PreprocessConfig, preprocess_batch
from .runtime import MANIFEST, ONNX_FILE, OnnxClassifier
from .tuning import Progress, TuningCancelled  # noqa: F401  (re-exported for callers)

log = logging.getLogger(__name__)

MASK_FILE = "mask.rmtm"
REPORT_FILE = "report.json"
MIN_PER_CLASS_FOR_HOLDOUT = 5


def write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=2, sort_keys=True).encode())


def resolve_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def split_holdout(samples: Sequence[tuple], fraction: float, seed: int) -> tuple[list, list]:
    """Per class with >= 5 images, hold out round(fraction*n) (at least 1) images, seeded."""
    by_class: dict[str, list] = defaultdict(list)
    for sample in samples:
        by_class[sample[1]].append(sample)
    rng = random.Random(seed)
    train, held = [], []
    for label in sorted(by_class):
        items = list(by_class[label])
        if fraction > 0 and len(items) >= MIN_PER_CLASS_FOR_HOLDOUT:
            rng.shuffle(items)
            k = max(1, round(fraction * len(items)))
            held += items[:k]
            items = items[k:]
        train += items
    return train, held


def validate_samples(samples: Sequence[tuple]) -> list[str]:
    """Sorted class labels; ValueError when fewer than 2 classes."""
    labels = sorted({label for _, label in samples})
    if len(labels) < 2:
        raise ValueError(f"need at least 2 classes with images, got {len(labels)}")
    return labels


def _load(item):
    return item if hasattr(item, "convert") else open_image_file(item)


def accuracy_and_confusion(probs: np.ndarray, targets: Sequence[int], n_classes: int) -> tuple[float, np.ndarray]:
    pred = probs.argmax(1)
    conf = np.zeros((n_classes, n_classes), dtype=int)
    for t, p in zip(targets, pred):
        conf[t, p] += 1
    return float((pred == np.asarray(targets)).mean()), conf


def _plot_curve(history: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, ax = plt.subplots(1, 3, figsize=(12, 3.2))
    for axis, key, title in zip(ax, ("loss", "train_accuracy", "sparsity"), ("loss", "train accuracy", "sparsity %")):
        axis.plot(steps, [h[key] for h in history])
        axis.set_title(title)
        axis.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _plot_confusion(conf: np.ndarray, labels: list[str], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(labels)
    fig, ax = plt.subplots(figsize=(2 + 0.5 * n, 1.5 + 0.5 * n))
    ax.imshow(conf, cmap="Blues")
    ax.set_xticks(range(n), [label[:20] for label in labels], rotation=60, ha="right")
    ax.set_yticks(range(n), [label[:20] for label in labels])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(conf[i, j]), ha="center", va="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _head_for(backbone, text_features):
    from .export import ClassifierHead

    return ClassifierHead(backbone.model.visual, text_features, float(backbone.model.logit_scale.detach().exp()))


def build_classifier(samples: Sequence[tuple], config: TuneConfig, out_dir: Path | str,
                     progress: Callable[[Progress], None] | None = None,
                     should_stop: Callable[[], bool] | None = None, device: str = "auto") -> dict:
    """Tune a classifier from ``samples`` = [(image path or PIL image, label), ...] into ``out_dir``.

    Returns the manifest. Raises TuningCancelled, ValueError (bad input), ExportParityError.
    """
    import torch

    from .backbones import encode_class_texts, load_backbone
    from .export import check_parity, export_onnx
    from .masking import bake_masks, mask_bits
    from .tuning import tune

    started = time.monotonic()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    labels = validate_samples(samples)
    index = {label: i for i, label in enumerate(labels)}
    train, held = split_holdout(samples, config.holdout, config.seed)
    device = resolve_device(device)
    torch.manual_seed(config.seed)

    backbone = load_backbone(config.backbone, config.pretrained, device=device, seed=config.seed)
    preprocess = PreprocessConfig.from_dict(backbone.preprocess)
    text_features = encode_class_texts(backbone, labels, config.prompt_template)

    held_batch = held_targets = None
    zero_shot_acc = None
    if held:
        held_batch = preprocess_batch([_load(x) for x, _ in held], preprocess)
        held_targets = [index[label] for _, label in held]
        with torch.no_grad():
            from .tuning import class_logits
            zs = class_logits(backbone.model, torch.from_numpy(held_batch).to(device), text_features)
        zero_shot_acc, _ = accuracy_and_confusion(zs.softmax(-1).cpu().numpy(), held_targets, len(labels))

    result = tune(backbone, [_load(x) for x, _ in train], [index[label] for _, label in train], text_features,
                  config, progress=progress, should_stop=should_stop, device=device)

    bits = mask_bits(backbone.model)
    mask_bytes = save_masks(out_dir / MASK_FILE, bits, {"backbone": config.backbone, "method": config.method})
    bake_masks(backbone.model)
    backbone.model.cpu()
    head = _head_for(backbone, text_features.cpu())
    export_onnx(head, out_dir / ONNX_FILE)
    parity_batch = torch.from_numpy(held_batch[:4]) if held_batch is not None else None
    parity = check_parity(head, out_dir / ONNX_FILE, parity_batch, atol=config.parity_atol, seed=config.seed)

    manifest = {
        "labels": labels,
        "backbone": config.backbone,
        "pretrained": config.pretrained,
        "method": config.method,
        "config": config.to_dict(),
        "preprocess": preprocess.to_dict(),
        "sparsity": result.sparsity,
        "mask_entries": int(sum(b.size for b in bits.values())),
        "mask_bytes": mask_bytes,
        "mask_entropy_bound_bytes": round(entropy_bound_bytes(bits), 1),
        "onnx_bytes": (out_dir / ONNX_FILE).stat().st_size,
        "parity_max_abs_diff": parity,
        "n_train": len(train),
        "steps": result.steps,
        "epochs": result.epochs,
        "warnings": result.warnings,
        "validation": None,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(),
    }
    write_json(out_dir / MANIFEST, manifest)  # the runtime reads it; validation is added below

    report = {"history": result.history, "validation": None}
    if held:
        clf = OnnxClassifier(out_dir, providers="cpu")
        tuned_acc, conf = accuracy_and_confusion(clf.run(held_batch), held_targets, len(labels))
        validation = {"n_holdout": len(held), "zero_shot_accuracy": zero_shot_acc, "tuned_accuracy": tuned_acc}
        manifest["validation"] = validation
        report["validation"] = {**validation, "confusion_matrix": conf.tolist(), "labels": labels}
        _plot_confusion(conf, labels, out_dir / "confusion.png")
    _plot_curve(result.history, out_dir / "curve.png")
    manifest["elapsed_s"] = round(time.monotonic() - started, 2)
    write_json(out_dir / REPORT_FILE, report)
    write_json(out_dir / MANIFEST, manifest)
    return manifest


def rebuild_onnx(model_dir: Path | str, out_path: Path | str | None = None, device: str = "cpu") -> Path:
    """Re-derive model.onnx from base weights + mask.rmtm (the mask is the source of truth)."""
    from .backbones import encode_class_texts, load_backbone
    from .export import check_parity, export_onnx
    from .masking import apply_mask_bits

    model_dir = Path(model_dir)
    manifest = json.loads((model_dir / MANIFEST).read_text())
    config = TuneConfig.from_dict(manifest["config"])
    bits, _ = load_masks(model_dir / MASK_FILE)
    backbone = load_backbone(config.backbone, config.pretrained, device=device, seed=config.seed)
    apply_mask_bits(backbone.model, bits)
    text_features = encode_class_texts(backbone, manifest["labels"], config.prompt_template)
    head = _head_for(backbone, text_features)
    out_path = Path(out_path) if out_path else model_dir / ONNX_FILE
    export_onnx(head, out_path)
    check_parity(head, out_path, atol=config.parity_atol)
    return out_path


def samples_from_folders(root: Path | str) -> list[tuple[Path, str]]:
    """One sub-folder per class, images inside (hidden files skipped)."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root} is not a directory")
    exts = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
    samples = []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(f for f in class_dir.iterdir() if f.suffix.lower() in exts and not f.name.startswith("."))
        if not files:
            raise ValueError(f"class folder {class_dir.name!r} has no images")
        samples += [(f, class_dir.name) for f in files]
    return samples
