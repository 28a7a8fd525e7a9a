"""build_classifier: images in, a published classifier directory out (candidates -> select -> write -> report).

Directory layout (one classifier version; the caller writes into a temp dir and renames it):
    manifest.json   labels, backbone, method, settings, preprocessing, base_id, mask/head file names, validation
    mask.rmt        the learned mask, when the published candidate uses one: the source of truth (artifact.py)
    head.npz        the published head (features -> logits; rmt_core/head.py)
    report.json     training history and validation details
    curve.png       training curve;  confusion.png  out-of-sample confusion matrix of the published candidate
    reliability.png the published candidate's reliability diagram (confidence vs accuracy, ECE and n)
The frozen encoder is not copied per classifier: it is the shared base ``bases_dir/<base_id>`` (base.py),
exported once per backbone weights. A self-contained model.onnx is materialised on demand (materialize.py).
"""
from __future__ import annotations

import datetime as dt
import functools
import inspect
import json
import logging
import os
import random
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .artifact import MASK_FILE  # noqa: F401  (re-exported: the file name a version's mask has)
from .artifact import LEGACY_MASK_FILE, atomic_write_bytes, entropy_bound_bytes, load_masks, write_version_files
from .candidates import OnCandidate, has_holdout, run_candidates
from .config import MIN_PER_CLASS_FOR_HOLDOUT, TuneConfig
from .head import HEAD_FILE, Head
from .images import open_image_file
from .preprocess import PreprocessConfig, preprocess_batch
from .int8_guard import int8_guard
from .quantize import GUARD_KEY as INT8_GUARD_KEY
from .quantize import GUARD_SKIPPED as INT8_GUARD_SKIPPED
from .runtime import JIT_PARITY_KEY, MANIFEST, ONNX_FILE, BaseRegistry, ServedClassifier, check_mode_parity
from .tuning import Progress, TuningCancelled  # noqa: F401  (re-exported for callers)

log = logging.getLogger(__name__)

REPORT_FILE = "report.json"


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


def _smooth(values: list[float], window: int) -> np.ndarray:
    """Trailing moving average (the first points average what exists so far)."""
    v = np.asarray(values, dtype=float)
    if window <= 1 or len(v) < 2:
        return v
    c = np.cumsum(np.insert(v, 0, 0.0))
    idx = np.arange(1, len(v) + 1)
    lo = np.maximum(0, idx - window)
    return (c[idx] - c[lo]) / (idx - lo)


def _plot_curve(history: list[dict], path: Path, reference: dict[str, float | None] | None = None) -> None:
    """Loss, train accuracy (raw and smoothed, with held-out reference lines) and sparsity per step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    window = max(1, len(steps) // 20)
    fig, ax = plt.subplots(1, 3, figsize=(12, 3.2))
    for axis, key, title in zip(ax, ("loss", "train_accuracy", "sparsity"), ("loss", "train accuracy", "sparsity %")):
        values = [h[key] for h in history]
        if key == "sparsity":
            axis.plot(steps, values)
        else:
            axis.plot(steps, values, alpha=0.3, color="tab:blue", label="per step")
            axis.plot(steps, _smooth(values, window), color="tab:blue", label=f"mean of {window}")
        axis.set_title(title)
        axis.set_xlabel("step")
    for (name, value), colour in zip((reference or {}).items(), ("tab:gray", "tab:orange")):
        if value is not None:
            ax[1].axhline(value, color=colour, linestyle="--", label=f"{name} {value:.0%}")
    ax[1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _plot_confusion(conf: np.ndarray, labels: list[str], path: Path, title: str = "") -> None:
    """Row-normalised confusion matrix (share of each true class), counts in the cells."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(labels)
    rows = conf.sum(axis=1, keepdims=True)
    share = np.divide(conf, rows, out=np.zeros(conf.shape, dtype=float), where=rows > 0)
    fig, ax = plt.subplots(figsize=(2.5 + 0.5 * n, 2 + 0.5 * n))
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), [label[:20] for label in labels], rotation=60, ha="right")
    ax.set_yticks(range(n), [label[:20] for label in labels])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title, fontsize=9)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{share[i, j]:.0%}\n({conf[i, j]})", ha="center", va="center", fontsize=7,
                    color="white" if share[i, j] > 0.6 else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _plot_reliability(calibration: dict, path: Path, title: str = "") -> None:
    """Reliability diagram: per confidence bin, accuracy against mean confidence (the diagonal is perfect
    calibration), bar widths = the bins, counts above the bars; ECE and n in the title."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bins = calibration.get("reliability") or []
    fig, ax = plt.subplots(figsize=(3.6, 3.4))
    ax.plot([0, 1], [0, 1], color="tab:gray", linestyle="--", linewidth=1, label="perfect")
    for b in bins:
        ax.bar(b["lo"], b["accuracy"], width=b["hi"] - b["lo"], align="edge", color="tab:blue", alpha=0.7,
               edgecolor="white")
        ax.plot([b["lo"], b["hi"]], [b["confidence"]] * 2, color="tab:orange", linewidth=2)
        ax.text((b["lo"] + b["hi"]) / 2, min(b["accuracy"] + 0.03, 0.97), str(b["n"]), ha="center", fontsize=6)
    ax.plot([], [], color="tab:orange", linewidth=2, label="mean confidence")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (top score)")
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=7, loc="upper left")
    ax.set_title(title or f"ECE {calibration.get('ece_after', 0):.3f} on n={calibration.get('n')}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def unknown_thresholds(config: TuneConfig, validation: dict | None) -> dict:
    """The manifest's ``min_score`` / ``max_outlier``: the config's own values win; otherwise the defaults chosen
    on the user's images when the config asks for "unknown" answers; otherwise None (always answer a label)."""
    validation = validation or {}
    out = {}
    for name in ("min_score", "max_outlier"):
        value = getattr(config, name)
        out[name] = value if value is not None else (validation.get(name) if config.unknown else None)
    return out


def _head_for(backbone, text_features):
    from .export import ClassifierHead

    return ClassifierHead(backbone.model.visual, text_features, float(backbone.model.logit_scale.detach().exp()))


def _published_model(visual, head: Head):
    """image -> the published Head's logits, as one torch module (what model.onnx computes)."""
    import torch
    from torch import nn

    class PublishedModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.visual = visual
            for name in ("W", "b", "cache_keys", "cache_values"):
                value = getattr(head, name)
                self.register_buffer(name, None if value is None else torch.from_numpy(value.copy()))

        def forward(self, image):
            f = self.visual(image)
            f = f / f.norm(dim=-1, keepdim=True)
            out = head.scale * f @ self.W.T + self.b
            if head.has_cache:
                out = out + head.cache_alpha * torch.exp(-head.cache_beta * (1 - f @ self.cache_keys.T)) @ self.cache_values
            return out / head.temperature

    return PublishedModel()


def _drop_masks(model) -> None:
    """Remove tuned masks without baking them: the original weights come back (an unpublished mask)."""
    from torch.nn.utils import parametrize

    from .masking import _owner, find_masks

    for name in list(find_masks(model)):
        owner, attr = _owner(model, name)
        parametrize.remove_parametrizations(owner, attr, leave_parametrized=False)


def write_preview(out_dir: Path | str, shared: dict, name: str, head: Head, accuracy: float | None = None) -> dict:
    """A preview version directory: manifest.json + head.npz over the shared base, no mask (only candidates
    that use no mask can be previews). ``shared`` is what build_classifier's ``on_base`` received."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = write_version_files(out_dir, base_id=shared["base_id"], head=head)
    config = TuneConfig.from_dict(shared["config"]) if shared.get("config") else TuneConfig()
    manifest = {**shared, "candidate": name, "preview": True, "preview_accuracy": accuracy, **files,
                "sparsity": 0.0, "validation": None, **unknown_thresholds(config, None),
                "created_at": dt.datetime.now(dt.timezone.utc).isoformat()}
    write_json(out_dir / MANIFEST, manifest)
    return manifest


def load_build_backbone(config: TuneConfig, device: str = "cpu"):
    """The backbone a build with ``config`` starts from (untouched weights): one place, so a base prepared ahead
    (``prepare_base``) has the fingerprint the build will compute."""
    from .backbones import load_backbone

    return load_backbone(config.backbone, config.pretrained, device=device, seed=config.seed,
                         quick_gelu=config.quick_gelu_setting)


def prepare_base(config: TuneConfig, bases_dir: Path | str, staging: Callable[[], Path] | None = None,
                 device: str = "cpu"):
    """The shared base a build with ``config`` will tune on, exported now if ``bases_dir`` lacks it (what
    ``build_classifier`` does first, without any samples): a service calls it before the first create, so that
    create's preview does not wait for the export. Returns (BaseInfo, whether it was exported by this call)."""
    from .base import ensure_base

    backbone = load_build_backbone(config, resolve_device(device))
    bases_dir = Path(bases_dir)
    before = set(os.listdir(bases_dir)) if bases_dir.is_dir() else set()
    base = ensure_base(backbone, bases_dir, staging=staging)
    return base, base.base_id not in before


def _threads_for_the_tower(build: Callable[..., dict]) -> Callable[..., dict]:
    """On a CPU, a build on a narrow vision tower runs on one torch intra-op thread (threads.build_threads: a
    second one only burned CPU there); the process's thread count is back as it was afterwards."""

    @functools.wraps(build)
    def run(*args, **kwargs) -> dict:
        import torch

        from .backbones import model_config
        from .threads import build_threads, torch_threads

        bound = inspect.signature(build).bind(*args, **kwargs)
        bound.apply_defaults()
        device = bound.arguments["device"] = resolve_device(bound.arguments["device"])
        threads = torch.get_num_threads()
        if device == "cpu":
            try:
                width = (model_config(bound.arguments["config"].backbone).get("vision_cfg") or {}).get("width")
            except ValueError:  # an unknown backbone: the build itself says so, after checking the samples
                width = None
            threads = build_threads(width if isinstance(width, int) else None, threads)
        with torch_threads(threads):
            return build(*bound.args, **bound.kwargs)

    return run


@_threads_for_the_tower
def build_classifier(samples: Sequence[tuple], config: TuneConfig, out_dir: Path | str,
                     progress: Callable[[Progress], None] | None = None,
                     should_stop: Callable[[], bool] | None = None, device: str = "auto",
                     on_candidate: OnCandidate | None = None, bases_dir: Path | str | None = None,
                     on_base: Callable[[dict], None] | None = None,
                     base_staging: Callable[[], Path] | None = None, initial_bits: dict | None = None,
                     run_int8_guard: bool = True) -> dict:
    """Tune a classifier from ``samples`` = [(image path or PIL image, label), ...] into ``out_dir``.

    Candidates (zero-shot, a head fitted on frozen features, the mask-tuned encoder, a head on it) are
    judged on validation data and the best is published (rmt_core.candidates); ``on_candidate(name, head,
    uses_mask, accuracy)`` is called as each is ready, zero-shot and the head before tuning starts, so a
    service can publish previews. The backbone's base is ensured in ``bases_dir`` (default: a ``bases``
    folder beside ``out_dir``) before tuning; ``on_base(fields)`` is then called once with the manifest fields
    every version of this build shares (labels, preprocess, base_id, ...), which ``write_preview`` needs to
    turn an ``on_candidate`` head into a servable version directory. ``base_staging`` gives the directory a
    new base is exported into (see base.ensure_base). Returns the manifest. Raises
    TuningCancelled, ValueError (bad input), ExportParityError (the served path disagrees with torch).
    ``initial_bits`` warm-starts mask tuning from an earlier version's mask (tuning.tune).
    ``run_int8_guard=False`` skips the int8 guard (the version then records why and serves fp32 only): the
    guard serves the version on the CPU three times over every image, the largest part of a build on a GPU
    worker (bench/RESULTS-build.md), and only int8 serving needs it.
    """
    import torch

    from .backbones import encode_class_texts
    from .base import ensure_base
    from .export import check_served_parity
    from .masking import bake_masks, mask_bits
    from .tuning import PlateauStop, tune

    started = time.monotonic()
    out_dir = Path(out_dir)
    bases_dir = Path(bases_dir) if bases_dir is not None else out_dir.parent / "bases"
    out_dir.mkdir(parents=True, exist_ok=True)
    labels = validate_samples(samples)
    index = {label: i for i, label in enumerate(labels)}
    counts = [sum(1 for _, label in samples if label == name) for name in labels]
    # a holdout only when every class can spare images; otherwise every image trains and heads are k-folded
    train, held = split_holdout(samples, config.holdout, config.seed) if has_holdout(counts, config) else (list(samples), [])
    position = {id(sample): i for i, sample in enumerate(samples)}
    device = resolve_device(device)
    torch.manual_seed(config.seed)

    backbone = load_build_backbone(config, device)
    preprocess = PreprocessConfig.from_dict(backbone.preprocess)
    base = ensure_base(backbone, bases_dir, staging=base_staging)  # before tuning: the base is the untouched encoder
    if on_base is not None:
        on_base({"labels": labels, "backbone": config.backbone, "pretrained": config.pretrained,
                 "method": config.method, "config": config.to_dict(), "preprocess": preprocess.to_dict(),
                 "base_id": base.base_id, "quick_gelu": backbone.quick_gelu})
    text_features = encode_class_texts(backbone, labels, config.prompt_template)
    zero_shot = Head.zero_shot(text_features.cpu().numpy(), float(backbone.model.logit_scale.detach().exp()),
                               prompt_template=config.prompt_template)

    train_images = [_load(x) for x, _ in train]
    train_targets = [index[label] for _, label in train]
    held_batch = preprocess_batch([_load(x) for x, _ in held], preprocess) if held else None
    held_targets = [index[label] for _, label in held]

    ready: dict[str, float | None] = {}  # validation accuracy of each candidate built so far

    def announce(name, head, uses_mask, accuracy):
        ready[name] = accuracy
        if on_candidate is not None:
            on_candidate(name, head, uses_mask, accuracy)

    def tune_masks():
        # the holdout scores the mask while it tunes; the best candidate already built is what it must beat
        scored = [a for a in ready.values() if a is not None]
        # a pinned mask is published whatever the others score: only its own plateau can end it early
        best_other = max(scored) if scored and config.select == "auto" else None
        stop_rule = PlateauStop(len(held_targets), best_other=best_other, patience=config.patience)
        return tune(backbone, train_images, train_targets, text_features, config, progress=progress,
                    should_stop=should_stop, device=device,
                    validation=(held_batch, held_targets) if held else None, stop_rule=stop_rule,
                    initial_bits=initial_bits or None)

    train_batch = preprocess_batch(train_images, preprocess)
    run = run_candidates(backbone.model, zero_shot, labels, config, train_batch,
                         train_targets, held_batch, held_targets, tune_masks, on_candidate=announce,
                         train_indices=[position[id(s)] for s in train], held_indices=[position[id(s)] for s in held],
                         extra_warnings=[], started=started)
    result, published = run.tuning, run.published
    if result is None and progress is not None:  # the mask was not tuned (nothing could judge it): say we're done
        progress(Progress(step=0, total_steps=0, epoch=0, epochs=0, loss=0.0, train_accuracy=0.0, sparsity=0.0,
                          elapsed_s=time.monotonic() - started, eta_seconds=0.0,
                          eta_basis="not tuned: too few images per class to judge a mask"))
    bits = mask_bits(backbone.model) if published.uses_mask else {}
    files = write_version_files(out_dir, base_id=base.base_id, head=published.head, masks=bits or None,
                                meta={"backbone": config.backbone, "method": config.method})
    if published.uses_mask:
        bake_masks(backbone.model)
    else:
        _drop_masks(backbone.model)
    backbone.model.cpu()
    head = _published_model(backbone.model.visual, published.head)

    manifest = {
        "labels": labels,
        "backbone": config.backbone,
        "pretrained": config.pretrained,
        "method": config.method,
        "config": config.to_dict(),
        "preprocess": preprocess.to_dict(),
        "candidate": published.name,
        **files,  # base_id, mask_file, head_file, their sizes, head summary
        "quick_gelu": backbone.quick_gelu,
        "sparsity": result.sparsity if published.uses_mask else 0.0,
        "tuned_sparsity": result.sparsity if result is not None else None,
        "mask_entries": int(sum(b.size for b in bits.values())),
        "mask_entropy_bound_bytes": round(entropy_bound_bytes(bits), 1) if bits else 0.0,
        "parity_max_abs_diff": None,
        "n_train": len(train),
        "schedule": config.schedule(len(train)),
        "steps": result.steps if result is not None else 0,
        "tuning": result.summary() if result is not None else None,  # steps run vs planned, why it stopped
        "epochs": result.epochs if result is not None else 0,
        "warnings": run.validation["warnings"],
        # classify's default thresholds for "unknown" (config.unknown, or the config's own values); None = none
        **unknown_thresholds(config, run.validation),
        "validation": None,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(),
    }
    write_json(out_dir / MANIFEST, manifest)  # the runtime reads it; parity and validation are added below
    # what will be served (base sessions + mask baked at load + numpy head) against the tuned torch model
    # (loaded once for the three checks below: each load builds the classifier's own sessions again)
    parity_batch = torch.from_numpy(held_batch[:4]) if held_batch is not None else None
    served = ServedClassifier(out_dir, BaseRegistry(bases_dir, "cpu", shared_arena=False))
    try:
        manifest["parity_max_abs_diff"] = check_served_parity(head, out_dir, bases_dir, parity_batch,
                                                              atol=config.parity_atol, seed=config.seed, served=served)
        # may the jit tier (RMT_SERVING_MODE=jit|auto) serve it? its probabilities against baked fp32, real images
        manifest[JIT_PARITY_KEY] = check_mode_parity(
            out_dir, bases_dir, (held_batch if held_batch is not None else train_batch)[:4], baked=served)
        # may this version serve int8 (RMT_SERVING_PRECISION=int8)? judged on every image the build has
        manifest[INT8_GUARD_KEY] = int8_guard(
            out_dir, bases_dir, np.concatenate([train_batch, held_batch]) if held_batch is not None else train_batch,
            train_targets + held_targets, fp32=served) if run_int8_guard else dict(INT8_GUARD_SKIPPED)
    finally:
        served.close()

    history = result.history if result is not None else []
    validation = run.validation
    report = {"history": history, "validation": {**validation, "labels": labels}}
    manifest["validation"] = {k: v for k, v in validation.items() if k not in ("confusion_matrix", "calibration")}
    if validation.get("confusion_matrix") is not None and validation["published_accuracy"] is not None:
        _plot_confusion(np.asarray(validation["confusion_matrix"]), labels, out_dir / "confusion.png",
                        title=f"{published.name}: accuracy {validation['published_accuracy']:.1%} "
                              f"({published.method}, n={published.n})")
    if validation.get("calibration"):
        cal = validation["calibration"]
        _plot_reliability(cal, out_dir / "reliability.png",
                          title=f"{published.name}: ECE {cal['ece_after']:.3f} (before T: {cal['ece_before']:.3f}), "
                                f"n={cal['n']}, T={cal['temperature']:.2f}"
                                + (f"; a calibrated model reads ~{cal['ece_floor']:.3f} on n={cal['n']}"
                                   if cal.get("ece_floor") is not None else ""))
    if history:
        _plot_curve(history, out_dir / "curve.png", reference={
            "zero-shot (held out)": validation.get("zero_shot_accuracy"),
            "tuned (held out)": validation.get("tuned_accuracy")})
    manifest["elapsed_s"] = round(time.monotonic() - started, 2)
    write_json(out_dir / REPORT_FILE, report)
    write_json(out_dir / MANIFEST, manifest)
    return manifest


def rebuild_onnx(model_dir: Path | str, out_path: Path | str | None = None, device: str = "cpu",
                 bases_dir: Path | str | None = None, precision: str = "fp32") -> Path:
    """A self-contained model.onnx from the classifier's source of truth (base + mask + head).

    Base+mask+head directories are materialised without torch (materialize.py; ``bases_dir`` defaults to
    a ``bases`` folder beside the directory; ``precision="int8"`` quantizes the encoder as int8 serving does);
    old directories are re-exported from the backbone weights (fp32 only).
    """
    from .backbones import encode_class_texts, load_backbone
    from .export import check_parity, export_onnx
    from .masking import apply_mask_bits

    model_dir = Path(model_dir)
    manifest = json.loads((model_dir / MANIFEST).read_text())
    if manifest.get("base_id"):
        from .materialize import materialize_onnx

        bases_dir = Path(bases_dir) if bases_dir is not None else model_dir.parent / "bases"
        return materialize_onnx(model_dir, bases_dir, Path(out_path) if out_path else model_dir / ONNX_FILE,
                                precision)
    if precision != "fp32":
        from .materialize import Fp32Only

        raise Fp32Only(f"{model_dir} predates base+mask+head classifiers: it exports in fp32 only")
    config = TuneConfig.from_dict(manifest["config"])
    backbone = load_backbone(config.backbone, config.pretrained, device=device, seed=config.seed,
                             quick_gelu=manifest.get("quick_gelu", config.quick_gelu_setting))
    if (model_dir / LEGACY_MASK_FILE).is_file():  # a published candidate without a mask has no mask file
        bits, _ = load_masks(model_dir / LEGACY_MASK_FILE)
        apply_mask_bits(backbone.model, bits)
    if (model_dir / HEAD_FILE).is_file():
        head = _published_model(backbone.model.visual, Head.load(model_dir / HEAD_FILE))
    else:  # classifiers built before heads existed: the zero-shot head
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
