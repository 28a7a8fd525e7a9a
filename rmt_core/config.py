"""Every setting of one tuning run, as one validated dataclass (no torch here)."""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

METHODS = ("r-amt", "amt", "r-pmt", "pmt", "r-mmt", "mmt")
# What a build can publish, simplest first: near-ties in validation accuracy go to the earlier one.
CANDIDATES = ("zero-shot", "head", "mask", "mask+head")
QUICK_GELU = {"auto": None, "on": True, "off": False}
MIN_PER_CLASS_FOR_HOLDOUT = 5  # classes with fewer images are never held out

# Bounds on what one run may ask for (a service adds its own cap on total optimizer steps, see
# TuneConfig.schedule). (low, high, low excluded?) for floats, [low, high] for integers. The API's schema is
# generated from these (app/openapi.py). threshold is alpha, the score a weight must exceed to stay: scores start
# at mask_init > alpha and the L2 term pulls them towards 0, so a negative alpha could never mask anything out.
FLOAT_RANGES: dict[str, tuple[float, float, bool]] = {
    "mask_init": (0.0, 10.0, True), "threshold": (0.0, 10.0, False), "leak": (0.0, 1.0, False),
    "kl_temperature": (0.0, 100.0, True), "l2_weight": (0.0, 10.0, False), "learning_rate": (0.0, 1.0, True),
    "holdout": (0.0, 0.9, False), "parity_atol": (0.0, 1.0, True),
}
MAX_EPOCHS = 1000
MAX_MIN_STEPS = 100_000
INT_RANGES: dict[str, tuple[int, int]] = {
    "epochs": (1, MAX_EPOCHS), "min_steps": (0, MAX_MIN_STEPS), "batch_size": (1, 1024), "seed": (0, 2**32 - 1),
    "warmup_steps": (0, MAX_MIN_STEPS), "eval_every": (0, MAX_MIN_STEPS), "patience": (1, 1000),
}
OPTIONAL_UNIT_FLOATS = ("min_score", "max_outlier")  # null or a number in [0, 1]
PRECISIONS = ("auto", "fp32", "bf16")
# Named schedules. A field left unset (None) takes its recipe's value, so a stored config (always concrete)
# reloads unchanged. "paper": the official lr with the service's 300-step floor, the default: no shorter
# schedule searched on the generated world (bench/RESULTS-build.md, "schedule") kept its held-out accuracy;
# a higher lr flips more weights on fewer steps' evidence. Builds save their steps by stopping early instead.
# "fast": 5x fewer steps for a user who trades accuracy (-7 points there) for time.
RECIPES: dict[str, dict[str, Any]] = {
    "paper": {"learning_rate": 8e-5, "min_steps": 300, "warmup_steps": 0},
    "fast": {"learning_rate": 2e-4, "min_steps": 60, "warmup_steps": 5},
}
RECIPE_FIELDS = {"learning_rate": float, "min_steps": int, "warmup_steps": int}
MAX_TEMPLATE_LENGTH = 200
MAX_NAME_LENGTH = 200


def check_prompt_template(template: Any) -> None:
    """A prompt template is short printable text with exactly one '{}' (the class name) and no other braces:
    it goes through str.format, where '{0.__class__}' or a stray '{' would be an attack or a crash."""
    if not isinstance(template, str):
        raise ValueError("prompt_template must be a string")
    if len(template) > MAX_TEMPLATE_LENGTH:
        raise ValueError(f"prompt_template is {len(template)} characters; the limit is {MAX_TEMPLATE_LENGTH}")
    if template.count("{}") != 1 or template.replace("{}", "").count("{") or template.replace("{}", "").count("}"):
        raise ValueError(f"prompt_template={template!r} must contain exactly one '{{}}' (the class name) "
                         "and no other braces")
    if not all(ch.isprintable() for ch in template):
        raise ValueError("prompt_template contains control characters")


@dataclass
class TuneConfig:
    """Settings of a mask-tuning run. Defaults follow the official R-AMT recipe except where a field says
    why the service differs (small uploads need a minimum number of optimizer steps)."""

    method: str = field(default="r-amt", metadata={"help": f"One of {', '.join(METHODS)}. r-* adds GDR."})
    backbone: str = field(default="rmt-world-vit", metadata={"help": "open_clip model name."})
    pretrained: str | None = field(
        default="builtin",
        metadata={"help": "'builtin' (weights shipped in rmt_core/weights), a local checkpoint path, an open_clip "
                          "tag (needs the weights cached on a connected machine), or None for random init."})
    mask_conv1: bool = field(default=True, metadata={"help": "AMT also masks the patch-embedding conv (official code)."})
    mask_init: float = field(default=1e-2, metadata={"help": "Initial value of every mask score."})
    threshold: float = field(default=5e-3, metadata={"help": "alpha: a weight is kept where its score > alpha."})
    leak: float = field(default=1.0, metadata={"help": "GDR leak l in [0,1]; 0 = plain mask tuning."})
    kl_temperature: float = field(default=1.0, metadata={"help": "Temperature of the GDR soft-target loss."})
    l2_weight: float = field(default=1e-4, metadata={"help": "Weight of sum_k ||M_k||_2 added to the CE loss."})
    recipe: str = field(
        default="paper",
        metadata={"help": "Named schedule giving learning_rate, min_steps and warmup_steps where they are not set: "
                          "'paper' (lr 8e-5, 300-step floor) or 'fast' (lr 2e-4, 60-step floor, 5 warm-up steps: "
                          "5x fewer steps, lower accuracy on the project's benchmark)."})
    learning_rate: float | None = field(
        default=None, metadata={"help": "Adam lr (paper: 8e-5; 3e-5 ImageNet-scale). Unset: the recipe's."})
    epochs: int = field(default=30, metadata={"help": "Passes over the training images."})
    min_steps: int | None = field(
        default=None,
        metadata={"help": "Lower bound on optimizer steps. Adam moves a score ~lr per step, so a score needs "
                          "(mask_init-threshold)/lr steps to flip; 30 epochs of a 40-image upload at the paper's lr "
                          "are 30 steps and flip nothing. Epochs are raised until this many steps run. 0 = no floor "
                          "(the paper's schedule). Unset: the recipe's."})
    warmup_steps: int | None = field(
        default=None, metadata={"help": "Linear lr warm-up steps before the cosine decay. Unset: the recipe's."})
    early_stop: bool = field(
        default=True,
        metadata={"help": "Score the mask on the holdout every eval_every steps and stop once it has stopped "
                          "improving or cannot catch the best candidate already built; the report says why."})
    eval_every: int = field(default=0, metadata={"help": "Steps between holdout checks; 0 = about 20 per run."})
    patience: int = field(default=3, metadata={"help": "Holdout checks without improvement before stopping."})
    precision: str = field(
        default="auto",
        metadata={"help": "'auto' (bf16 autocast on CUDA with bf16, and on CPUs with AVX512-BF16/AMX for vision towers "
                          "at least 384 wide, where it was measured faster; else fp32), "
                          "'fp32', or 'bf16' (refused where the hardware lacks it)."})
    batch_size: int = field(default=32, metadata={"help": "Images per optimizer step."})
    prompt_template: str = field(default="a photo of a {}.", metadata={"help": "Text prompt; '{}' is the class name."})
    seed: int = field(default=0, metadata={"help": "Seeds sampling, augmentation and GDR's dropout."})
    holdout: float = field(
        default=0.2,
        metadata={"help": "Fraction of each class held out for the validation report (only for classes with "
                          "at least 5 images; 0 disables)."})
    augment: bool = field(default=True, metadata={"help": "RandomResizedCrop(scale 0.5-1, bicubic) + h-flip."})
    parity_atol: float = field(default=1e-3, metadata={"help": "Export parity: max |torch - ORT| on probabilities."})
    quick_gelu: str = field(
        default="auto",
        metadata={"help": "'auto' | 'on' | 'off' (JSON true/false also accepted): QuickGELU activations. OpenAI's "
                          "CLIP weights were trained with them; 'auto' detects OpenAI checkpoints (tag, file name "
                          "containing 'openai', TorchScript archive). A plain state dict of OpenAI weights needs 'on'."})
    select: str = field(
        default="auto",
        metadata={"help": f"Which candidate to publish: 'auto' (the best on validation data, near-ties to the "
                          f"simpler) or one of {', '.join(CANDIDATES)}."})
    unknown: bool = field(
        default=False,
        metadata={"help": "Answer 'unknown' below a score threshold: a default min_score is chosen on validation "
                          "data and stored with the classifier."})
    min_score: float | None = field(
        default=None,
        metadata={"help": "Answer 'unknown' below this top score (0-1), overriding the default chosen on "
                          "validation data; a classify request's min_score overrides it in turn."})
    max_outlier: float | None = field(
        default=None,
        metadata={"help": "Answer 'unknown' above this outlier score (0-1: how unlike the training images), "
                          "overriding the default chosen on validation data; a request's max_outlier overrides it."})
    keep_preview: bool = field(
        default=False,
        metadata={"help": "If the job fails or is cancelled, keep answering classify with the preview model "
                          "(zero-shot or the fitted head) instead of 409."})

    def __post_init__(self) -> None:
        if self.recipe not in RECIPES:
            raise ValueError(f"recipe={self.recipe!r} must be one of {', '.join(RECIPES)}")
        filled = []
        for name, value in RECIPES[self.recipe].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
                filled.append(name)
        self._from_recipe = frozenset(filled)  # not a field: which values the caller left to the recipe
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r} must be one of {', '.join(PRECISIONS)}")
        self.method = str(self.method).lower()
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r} is not one of {', '.join(METHODS)}")
        self._check_ranges()
        if isinstance(self.quick_gelu, bool):
            self.quick_gelu = "on" if self.quick_gelu else "off"
        if self.quick_gelu not in QUICK_GELU:
            raise ValueError(f"quick_gelu={self.quick_gelu!r} must be one of auto, on, off")
        if self.select not in ("auto", *CANDIDATES):
            raise ValueError(f"select={self.select!r} must be 'auto' or one of {', '.join(CANDIDATES)}")
        for name in OPTIONAL_UNIT_FLOATS:
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{name}={value!r} must be a number in [0, 1] or null")
            setattr(self, name, float(value))
        if self.mask_init <= self.threshold:
            raise ValueError(
                f"mask_init={self.mask_init} must be > threshold={self.threshold}, or every weight starts masked out")

    def _check_ranges(self) -> None:
        """Every number finite and in a range that bounds the work of one run; the template well-formed."""
        for name, (low, high, low_open) in FLOAT_RANGES.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name}={value!r} must be a finite number")
            if value > high or value < low or (low_open and value == low):
                raise ValueError(f"{name}={value} must be in {'(' if low_open else '['}{low}, {high}]")
        for name, (low, high) in INT_RANGES.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ValueError(f"{name}={value!r} must be an integer in [{low}, {high}]")
        check_prompt_template(self.prompt_template)
        for name in ("backbone", "pretrained"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not 0 < len(value) <= MAX_NAME_LENGTH):
                raise ValueError(f"{name} must be a non-empty string of at most {MAX_NAME_LENGTH} characters")

    @property
    def uses_gdr(self) -> bool:
        return self.method.startswith("r-")

    @property
    def target(self) -> str:
        """'amt' | 'mmt' | 'pmt': which weights carry masks."""
        return self.method.removeprefix("r-")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TuneConfig":
        """Build from user input; unknown keys and bad types raise ValueError naming the field."""
        if not isinstance(values, dict):
            raise ValueError("config must be a JSON object")
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"unknown config field(s): {', '.join(unknown)}; known: {', '.join(known)}")
        clean: dict[str, Any] = {}
        for name, value in values.items():
            default = known[name].default
            try:
                if value is None and name in ("pretrained", *OPTIONAL_UNIT_FLOATS, *RECIPE_FIELDS):
                    clean[name] = None
                elif name in OPTIONAL_UNIT_FLOATS:
                    if isinstance(value, bool) or not isinstance(value, (int, float)):
                        raise TypeError
                    clean[name] = float(value)
                elif name in RECIPE_FIELDS:
                    kind = RECIPE_FIELDS[name]
                    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
                        raise TypeError
                    clean[name] = kind(value)
                elif name == "quick_gelu" and isinstance(value, bool):
                    clean[name] = value
                elif isinstance(default, bool):
                    if not isinstance(value, bool):
                        raise TypeError
                    clean[name] = value
                elif isinstance(default, int):
                    if isinstance(value, bool) or not isinstance(value, int):
                        raise TypeError
                    clean[name] = value
                elif isinstance(default, float):
                    if isinstance(value, bool) or not isinstance(value, (int, float)):
                        raise TypeError
                    clean[name] = float(value)
                else:
                    if not isinstance(value, str):
                        raise TypeError
                    clean[name] = value
            except TypeError:
                expected = RECIPE_FIELDS[name].__name__ if name in RECIPE_FIELDS else type(default).__name__
                raise ValueError(f"config field {name!r} has the wrong type: {value!r} "
                                 f"(expected {expected})") from None
        return cls(**clean)

    @property
    def quick_gelu_setting(self) -> bool | None:
        """For backbones.load_backbone: None = detect, True/False = forced."""
        return QUICK_GELU[self.quick_gelu]

    def n_holdout(self, class_counts: Sequence[int]) -> int:
        """How many of these per-class image counts ``pipeline.split_holdout`` holds out."""
        if self.holdout <= 0:
            return 0
        return sum(max(1, round(self.holdout * n)) for n in class_counts if n >= MIN_PER_CLASS_FOR_HOLDOUT)

    def schedule(self, n_train: int | Sequence[int]) -> dict[str, Any]:
        """The optimizer schedule for ``n_train`` training images (or per-class upload counts, from which the
        holdout is subtracted): what a create reports before any training runs.

        Epochs are raised until at least ``min_steps`` optimizer steps run; ``warning`` says so with numbers.
        """
        if isinstance(n_train, int):
            n_images, held = n_train, 0
        else:
            counts = [int(n) for n in n_train]
            # as the pipeline splits: a holdout only when every class can spare images (candidates.has_holdout)
            held = self.n_holdout(counts) if counts and min(counts) >= MIN_PER_CLASS_FOR_HOLDOUT else 0
            n_images = sum(counts) - held
        if n_images < 1:
            raise ValueError(f"n_train={n_images}: need at least one training image")
        per_epoch = max(1, math.ceil(n_images / self.batch_size))
        epochs = max(self.epochs, math.ceil(self.min_steps / per_epoch)) if self.min_steps else self.epochs
        total = per_epoch * epochs
        warning = None
        if epochs > self.epochs:
            warning = (f"epochs raised by min_steps: {n_images} training images give {per_epoch} step(s) per epoch, "
                       f"so {self.epochs} epochs would be {per_epoch * self.epochs} steps; running {epochs} epochs = "
                       f"{total} steps >= min_steps={self.min_steps}")
        return {"n_train": n_images, "n_holdout": held, "batch_size": self.batch_size, "steps_per_epoch": per_epoch,
                "epochs_requested": self.epochs, "min_steps": self.min_steps, "epochs": epochs,
                "total_steps": total, "raised_by_min_steps": epochs > self.epochs, "warning": warning,
                "recipe": self.recipe, "learning_rate": self.learning_rate, "warmup_steps": self.warmup_steps}

    def paper_recipe(self) -> "TuneConfig":
        """The official schedule: the paper's lr (unless set), no step floor, no warm-up."""
        lr = RECIPES["paper"]["learning_rate"] if "learning_rate" in self._from_recipe else self.learning_rate
        return dataclasses.replace(self, recipe="paper", learning_rate=lr, min_steps=0, warmup_steps=0)
