"""The mask-tuning loop: AMT/MMT/PMT with optional GDR, progress reported through a callback."""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Protocol, Sequence

import numpy as np

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T

from .backbones import Backbone
from .config import TuneConfig
from .gdr import gradient_dropout
from .masking import BinaryMask, attach_masks, masks_disabled, sparsity, warm_start_masks

log = logging.getLogger(__name__)


class TuningCancelled(RuntimeError):
    """should_stop() asked the loop to stop; nothing was published."""


@dataclass
class Progress:
    step: int
    total_steps: int
    epoch: int
    epochs: int
    loss: float
    train_accuracy: float
    sparsity: float
    elapsed_s: float
    eta_seconds: float | None = None  # see StepTimer
    eta_basis: str = ""  # "post-flip" (measured) | "pre-flip estimate" | "" (no step measured yet)
    planned_steps: int | None = None  # the schedule's steps; a run that stops early ends before them
    stop_reason: str | None = None  # set on the last record of a run the stop rule ended early

    def to_dict(self) -> dict:
        return asdict(self)


class StepTimer:
    """ETA from the measured time per step *after masks flip*.

    Before any mask flips, GDR has no teacher to run and steps are cheaper; averaging them in made early ETAs
    far too low. Once a mask has flipped, the ETA is the mean of the last ``window`` post-flip steps times the
    steps left. Before that it is the pre-flip mean times ``PRE_FLIP_FACTOR`` for GDR methods, labelled as an
    estimate: after the flip a step adds the KL's second vector to the VJP, the holdout checks and the teacher
    pass over views first drawn after the flip (few: the pre-flip steps' own logits are kept as the teacher's).
    Measured post/pre-flip step time ratio with that reuse: 1.27-1.42 builtin, 1.54 ViT-B-32 (5x8,
    bench/RESULTS-build.md "ETA").
    """

    PRE_FLIP_FACTOR = 1.4

    def __init__(self, uses_gdr: bool, window: int = 20):
        self.uses_gdr, self.window = uses_gdr, window
        self.pre: list[float] = []
        self.post: list[float] = []

    def record(self, seconds: float, flipped_before_step: bool) -> None:
        (self.post if flipped_before_step else self.pre).append(seconds)

    def eta(self, steps_left: int) -> tuple[float | None, str]:
        if self.post:
            recent = self.post[-self.window:]
            return steps_left * sum(recent) / len(recent), "post-flip"
        if self.pre:
            recent = self.pre[-self.window:]
            factor = self.PRE_FLIP_FACTOR if self.uses_gdr else 1.0
            return steps_left * factor * sum(recent) / len(recent), "pre-flip estimate"
        return None, ""


@dataclass
class TuneResult:
    masks: dict[str, BinaryMask]
    steps: int
    epochs: int
    sparsity: float
    history: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0
    planned_steps: int = 0
    stop_reason: str = "completed"  # or why the stop rule ended it early (steps < planned_steps)
    precision: str = "fp32"
    checks: list[dict] = field(default_factory=list)  # holdout accuracy of the mask candidate per check
    views_made: int = 0
    teacher_forwards: int = 0  # images the teacher ran on (each cached view once)
    teacher_reused: int = 0  # views whose teacher logits were the student's own before any mask flipped
    threads: int = 0  # torch intra-op threads the loop ran on

    def summary(self) -> dict:
        """What the manifest records about the tuning run."""
        return {"steps": self.steps, "planned_steps": self.planned_steps, "stop_reason": self.stop_reason,
                "precision": self.precision, "checks": self.checks, "views_made": self.views_made,
                "teacher_forwards": self.teacher_forwards, "teacher_reused": self.teacher_reused,
                "threads": self.threads,
                "seconds": round(self.elapsed_s, 2)}


def train_transform(preprocess: dict, augment: bool = True) -> Callable[[Image.Image], torch.Tensor]:
    """The official recipe's augmentation: RandomResizedCrop(scale 0.5-1, bicubic) + flip + CLIP norm."""
    size = preprocess["size"][0]
    norm = [T.ToTensor(), T.Normalize(preprocess["mean"], preprocess["std"])]
    if not augment:
        return T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size), *norm])
    return T.Compose([
        T.RandomResizedCrop(size, scale=(0.5, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        *norm,
    ])


def class_logits(model, images: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """logit_scale.exp() * norm(image features) @ norm(text features).T"""
    feats = model.encode_image(images)
    feats = feats / feats.norm(dim=-1, keepdim=True)
    return model.logit_scale.exp() * feats @ text_features.T


def zero_shot_logits(model, images: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """The teacher: the same model with its masks switched off (no second copy), in inference mode so
    nn.MultiheadAttention takes its fused fast path; it is only a target, never differentiated."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), masks_disabled(model):
            return class_logits(model, images, text_features)
    finally:
        model.train(was_training)


def plan_schedule(n_images: int, config: TuneConfig) -> tuple[int, int, int]:
    """(steps per epoch, epochs, total steps), raising epochs until ``min_steps`` optimizer steps run
    (TuneConfig.schedule has the whole report)."""
    plan = config.schedule(n_images)
    return plan["steps_per_epoch"], plan["epochs"], plan["total_steps"]


def _vjp(logits: torch.Tensor, scores: list[torch.Tensor], vectors: torch.Tensor) -> list[torch.Tensor]:
    """J^T v for each row v of ``vectors`` [k, N, C], in one batched backward pass (vmap over grad_outputs)."""
    try:
        grads = torch.autograd.grad(logits, scores, grad_outputs=vectors, is_grads_batched=True)
    except RuntimeError:  # an op without a batching rule: fall back to one backward pass per vector
        grads = [torch.stack(g) for g in zip(*(
            torch.autograd.grad(logits, scores, grad_outputs=v, retain_graph=True) for v in vectors))]
    return list(grads)


def ce_kl_gradients(logits: torch.Tensor, targets: torch.Tensor, teacher_logits: torch.Tensor | None,
                    scores: list[torch.Tensor], config: TuneConfig) -> tuple[list, list | None]:
    """(g_ce, g_kl) for each mask score tensor; g_kl is None without a teacher.

    g_ce = dL_ce/dM with L_ce = CE(logits, y) + l2_weight * sum_k ||M_k||_2, and for GDR g_kl = dL_kl/dM with
    L_kl = T^2 * KL against ``teacher_logits`` (gdr.soft_cross_entropy, the official loss). Both are
    vector-Jacobian products through the same student graph: dCE/dlogits = (softmax - onehot)/N and
    dL_kl/dlogits = T * (softmax(s/T) - softmax(t/T))/N are
    closed forms, so one batched backward pass gives both. ``teacher_logits=None`` under GDR means the student
    still is the zero-shot model (no mask flipped), where L_kl's gradient is zero: GDR runs with g_kl = 0.
    """
    n, c = logits.shape
    probs = logits.detach().softmax(-1)
    v_ce = (probs - F.one_hot(targets, c).to(probs.dtype)) / n
    if config.uses_gdr and teacher_logits is not None:
        t = config.kl_temperature
        v_kl = ((logits.detach() / t).softmax(-1) - (teacher_logits / t).softmax(-1)) * (t / n)
        g_ce, g_kl = zip(*(g.unbind(0) for g in _vjp(logits, scores, torch.stack([v_ce, v_kl]))))
    else:
        g_ce = [g[0] for g in _vjp(logits, scores, v_ce[None])]
        g_kl = None
    if config.l2_weight:
        g_ce = [g + config.l2_weight * s.detach() / s.detach().norm().clamp_min(1e-12) for g, s in zip(g_ce, scores)]
    return list(g_ce), (list(g_kl) if g_kl is not None else None)


def mask_gradients(logits: torch.Tensor, targets: torch.Tensor, teacher_logits: torch.Tensor | None,
                   scores: list[torch.Tensor], config: TuneConfig,
                   generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """The update direction for each mask score tensor: g_ce, gradient-dropped by GDR for r-* methods."""
    g_ce, g_kl = ce_kl_gradients(logits, targets, teacher_logits, scores, config)
    if not config.uses_gdr:
        return g_ce
    if g_kl is None:
        g_kl = [torch.zeros_like(g) for g in g_ce]
    return [gradient_dropout(gc, gk, config.leak, generator) for gc, gk in zip(g_ce, g_kl)]


def train_step(model, masks: dict[str, BinaryMask], batch: torch.Tensor, targets: torch.Tensor,
               text_features: torch.Tensor, optimizer: torch.optim.Optimizer, config: TuneConfig,
               generator: torch.Generator | None = None,
               any_flipped: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on the mask scores; returns (student logits, L_ce) for reporting.

    ``any_flipped``: whether some mask is already 0 (the caller may know it from the last sparsity reading);
    None = look at the masks.
    """
    scores = [m.scores for m in masks.values()]
    logits = class_logits(model, batch, text_features)
    teacher = None
    if any_flipped is None:
        any_flipped = config.uses_gdr and any(not bool(m.hard().all()) for m in masks.values())
    if config.uses_gdr and any_flipped:
        teacher = zero_shot_logits(model, batch, text_features)
    loss_ce = update_scores(logits, targets, teacher, scores, optimizer, config, generator)
    return logits.detach(), loss_ce


def update_scores(logits: torch.Tensor, targets: torch.Tensor, teacher_logits: torch.Tensor | None,
                  scores: list[torch.Tensor], optimizer: torch.optim.Optimizer, config: TuneConfig,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """One optimizer step on the mask scores from the student's ``logits``; returns L_ce (for reporting)."""
    grads = mask_gradients(logits, targets, teacher_logits, scores, config, generator)
    with torch.no_grad():
        loss_ce = F.cross_entropy(logits, targets) + config.l2_weight * sum(s.norm() for s in scores)
    for s, g in zip(scores, grads):
        s.grad = g
    optimizer.step()
    return loss_ce


class ViewPool:
    """Each training image's augmented views, made once per build, and the teacher's logits for each view.

    A step draws for every image in its batch one of ``views`` views (seeded); a view is made the first time
    it is drawn (from its own seed, so a view's pixels do not depend on the order it was first drawn in) and
    kept. GDR's teacher is the frozen zero-shot model, so its logits for a view never change: they are
    computed the first time a flipped student needs them and looked up after that, instead of a teacher
    forward pass every step. ``views`` is bounded so the pool stays within ``max_bytes``.
    """

    def __init__(self, images: Sequence[Image.Image], transform: Callable[[Image.Image], torch.Tensor], seed: int,
                 views: int, augment: bool = True, max_bytes: int = 512 * 2**20, view_shape: Sequence[int] = ()):
        self.images, self.transform, self.seed = images, transform, seed
        view_bytes = 4 * max(1, int(np.prod(view_shape))) if len(view_shape) else 1
        self.views = 1 if not augment else max(1, min(views, max_bytes // max(1, len(images) * view_bytes)))
        self._views: dict[tuple[int, int], torch.Tensor] = {}
        self._teacher: dict[tuple[int, int], torch.Tensor] = {}
        self.views_made = 0
        self.teacher_computed = 0
        self.teacher_reused = 0  # views whose teacher logits came from a pre-flip student pass

    def view(self, i: int, v: int) -> torch.Tensor:
        key = (i, v)
        if key not in self._views:
            with torch.random.fork_rng(devices=[]):  # torchvision draws from the global CPU generator
                # that generator alone: torch.manual_seed also queues a seed for every accelerator, which
                # formats a stack trace each call while CUDA is not initialised (~0.25 ms a view, 0.3 s of an
                # 8x16 build: bench/RESULTS-build.md) and outlives fork_rng, which restores only the CPU's state
                torch.random.default_generator.manual_seed((self.seed * 1_000_003 + i * 1009 + v) % (2**63 - 1))
                self._views[key] = self.transform(self.images[i])
            self.views_made += 1
        return self._views[key]

    def batch(self, idx: Sequence[int], view_ids: Sequence[int]) -> torch.Tensor:
        return torch.stack([self.view(i, v) for i, v in zip(idx, view_ids)])

    def remember_teacher(self, idx: Sequence[int], view_ids: Sequence[int], logits: torch.Tensor) -> None:
        """Keep ``logits`` [len(idx), C] as the teacher's logits of these views, for views not yet held.

        Only valid for logits of the zero-shot model: tune() passes the student's own logits from steps before
        any mask flipped, when every mask bit is 1 and the student computes exactly the zero-shot weights
        (BinaryMask: W * 1, up to the kernel path: the teacher's inference-mode attention). Each view drawn
        before the first flip then never needs a teacher forward pass after it.
        """
        out = logits.detach().float().cpu()
        for row, key in enumerate(zip(idx, view_ids)):
            if key not in self._teacher:
                self._teacher[key] = out[row]
                self.teacher_reused += 1

    def teacher_logits(self, idx: Sequence[int], view_ids: Sequence[int],
                       compute: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """[len(idx), C] teacher logits; ``compute(views)`` runs the teacher on the views not seen before."""
        keys = list(zip(idx, view_ids))
        missing = list(dict.fromkeys(k for k in keys if k not in self._teacher))
        if missing:
            out = compute(torch.stack([self.view(i, v) for i, v in missing])).float().cpu()
            self._teacher.update(zip(missing, out))
            self.teacher_computed += len(missing)
        return torch.stack([self._teacher[k] for k in keys])


# ---------------------------------------------------------------------------------------- stopping
class StopRule(Protocol):
    """Decides, after each holdout check of the mask candidate, whether more steps can still matter."""

    def observe(self, step: int, accuracy: float, total_steps: int) -> str | None:
        """None = go on; otherwise the reason to stop (recorded in the report)."""


@dataclass
class PlateauStop:
    """Stop when the mask's holdout accuracy has not improved for ``patience`` checks (``plateau``), or
    sooner, after half as many checks, when it trails ``best_other`` (the best candidate already built,
    zero-shot or head) by more than the selection's tie tolerance (``cannot catch``): a mask within one
    validation image of a simpler candidate loses the tie anyway (candidates.pick). Never before
    ``min_fraction`` of the planned steps; tune() only consults it once a mask has flipped (before that the
    mask is the zero-shot model). Deterministic: it sees only the accuracies.
    """

    n_validation: int
    best_other: float | None = None
    patience: int = 3
    min_fraction: float = 0.3
    best: float = -1.0
    since_best: int = 0

    def observe(self, step: int, accuracy: float, total_steps: int) -> str | None:
        if accuracy > self.best + 1e-9:
            self.best, self.since_best = accuracy, 0
        else:
            self.since_best += 1
        if step < self.min_fraction * total_steps:
            return None
        tolerance = 1.0 / max(1, self.n_validation)
        if (self.best_other is not None and self.best + tolerance < self.best_other - 1e-9
                and self.since_best >= max(1, self.patience // 2)):
            return (f"cannot catch: best mask holdout accuracy {self.best:.3f} trails the best candidate so far "
                    f"({self.best_other:.3f}) by more than one validation image and stopped improving")
        if self.since_best >= self.patience:
            return f"plateau: no holdout improvement in {self.since_best} checks (best {self.best:.3f})"
        return None


# ---------------------------------------------------------------------------------------- precision
def cpu_flags(path: str = "/proc/cpuinfo") -> set[str]:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        log.debug("no %s: assuming no bf16 instructions", path)
    return set()


BF16_CPU_FLAGS = {"avx512_bf16", "amx_bf16"}


def bf16_supported(device: str | torch.device, flags: set[str] | None = None) -> bool:
    """Whether bf16 runs natively: CUDA with bf16, or a CPU with AVX512-BF16 / AMX-BF16 (emulated bf16 on
    other CPUs is slower than fp32)."""
    kind = torch.device(device).type
    if kind == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if kind == "cpu":
        return bool(BF16_CPU_FLAGS & (cpu_flags() if flags is None else flags))
    return False


# bf16 autocast on a CPU pays only where the matrix products are large enough to beat the casts autocast adds
# around them: on an AVX512-BF16 CPU (2 cores, batch 32, fwd + VJP; bench/RESULTS-build.md) it was 1.2-1.5x
# *slower* than fp32 for the builtin rmt-world-vit (width 128) and 2.2x faster from ViT-S-32 (width 384) up.
# So 'auto' picks bf16 on a CPU only from this vision width, the smallest measured faster.
BF16_CPU_MIN_WIDTH = 384


def vision_width(model) -> int | None:
    """The vision transformer's width (open_clip VisionTransformer), or None for other towers."""
    transformer = getattr(getattr(model, "visual", None), "transformer", None)
    width = getattr(transformer, "width", None)
    return int(width) if isinstance(width, int) else None


def resolve_precision(requested: str, device: str | torch.device, flags: set[str] | None = None,
                      width: int | None = None) -> str:
    """'fp32' | 'bf16' for a config's ``precision`` on ``device``; ValueError for bf16 the hardware lacks.

    'auto' is bf16 on CUDA with bf16, and on a CPU with native bf16 only for a vision tower at least
    ``BF16_CPU_MIN_WIDTH`` wide (``width``; None = unknown, fp32), where it was measured faster. 'bf16' by name
    runs wherever the hardware has it."""
    supported = bf16_supported(device, flags)
    if requested == "bf16" and not supported:
        raise ValueError(f"precision='bf16' asked for, but {torch.device(device).type} here has no native bf16 "
                         f"(CPU needs one of {', '.join(sorted(BF16_CPU_FLAGS))}); use 'auto' or 'fp32'")
    if requested == "fp32" or not supported:
        return "fp32"
    if requested == "auto" and torch.device(device).type == "cpu" and (width or 0) < BF16_CPU_MIN_WIDTH:
        return "fp32"
    return "bf16"


def autocast(precision: str, device: str | torch.device):
    if precision != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total`` (the paper's cosine)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(step - warmup, span) / span))


def holdout_accuracy(model, images: torch.Tensor, targets: torch.Tensor, text_features: torch.Tensor,
                     precision: str = "fp32", batch_size: int = 256) -> float:
    """The "mask" candidate's accuracy: the zero-shot head on the (masked) encoder's features."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), autocast(precision, images.device):
            pred = torch.cat([class_logits(model, images[i:i + batch_size], text_features).argmax(1)
                              for i in range(0, len(images), batch_size)])
    finally:
        model.train(was_training)
    return float((pred == targets).float().mean())


VIEWS_PER_IMAGE = 16


def tune(backbone: Backbone, images: Sequence[Image.Image], targets: Sequence[int], text_features: torch.Tensor,
         config: TuneConfig, progress: Callable[[Progress], None] | None = None,
         should_stop: Callable[[], bool] | None = None, device: str | torch.device = "cpu",
         validation: tuple[torch.Tensor, Sequence[int]] | None = None, stop_rule: StopRule | None = None,
         cpu_flag_set: set[str] | None = None, initial_bits: dict | None = None) -> TuneResult:
    """Attach masks for ``config.method`` to ``backbone.model`` and train their scores in place.

    ``initial_bits`` (name -> kept bits of an earlier version's mask) warm-starts the scores
    (masking.warm_start_masks); without it every score starts at ``config.mask_init``.

    ``images`` are decoded RGB images with class indices ``targets``; ``text_features`` are the normalised
    class embeddings. ``validation`` = (preprocessed holdout images, their targets): with it and
    ``config.early_stop``, the mask is scored every ``eval_every`` steps and ``stop_rule`` (default
    PlateauStop) may end the run early; the result says why it stopped. The model keeps its masks on return
    (bake them with masking.bake_masks).
    """
    if len(images) != len(targets) or not images:
        raise ValueError(f"need as many targets as images (got {len(images)} images, {len(targets)} targets)")
    precision = resolve_precision(config.precision, device, cpu_flag_set, vision_width(backbone.model))
    model = backbone.model.to(device)
    text_features = text_features.to(device)
    masks = attach_masks(model, config.method, config.mask_init, config.threshold, config.mask_conv1)
    if initial_bits:
        warm_start_masks(masks, initial_bits, config.mask_init, config.threshold)
    scores = [m.scores for m in masks.values()]
    optimizer = torch.optim.Adam(scores, lr=config.learning_rate, betas=(0.9, 0.999), weight_decay=0.0)
    plan = config.schedule(len(images))
    epochs, total = plan["epochs"], plan["total_steps"]
    warmup = min(config.warmup_steps, max(0, total - 1))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, warmup))
    warnings: list[str] = [plan["warning"]] if plan["warning"] else []
    size = backbone.preprocess["size"]
    pool = ViewPool(images, train_transform(backbone.preprocess, config.augment), config.seed, VIEWS_PER_IMAGE,
                    config.augment, view_shape=(3, *size) if isinstance(size, (list, tuple)) else (3, size, size))
    generator = torch.Generator().manual_seed(config.seed)
    gdr_generator = torch.Generator(device=device).manual_seed(config.seed + 1)
    targets_t = torch.as_tensor(list(targets), dtype=torch.long)
    checking = validation is not None and len(validation[1]) > 0 and config.early_stop
    if checking:
        val_images = torch.as_tensor(np.asarray(validation[0])).to(device)
        val_targets = torch.as_tensor(list(validation[1]), dtype=torch.long, device=device)
        stop_rule = stop_rule or PlateauStop(len(val_targets), patience=config.patience)
    eval_every = config.eval_every or max(1, math.ceil(total / 20))  # a check costs a forward of the holdout

    def teacher(views: torch.Tensor) -> torch.Tensor:
        with autocast(precision, device):
            return zero_shot_logits(model, views.to(device), text_features)

    model.train()  # no dropout in CLIP; train mode keeps MHA off its inference fast path
    history: list[dict] = []
    checks: list[dict] = []
    started = time.monotonic()
    timer = StepTimer(config.uses_gdr)
    step = 0
    stop_reason, stopped = "completed", False
    current_sparsity = sparsity(masks)  # read once per step, after the update; the next step reuses it
    for epoch in range(1, epochs + 1):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images), config.batch_size):
            if should_stop is not None and should_stop():
                raise TuningCancelled(f"stopped at step {step}/{total}")
            step_started = time.monotonic()
            idx = order[start:start + config.batch_size].tolist()
            view_ids = torch.randint(0, pool.views, (len(idx),), generator=generator).tolist()
            batch = pool.batch(idx, view_ids).to(device)
            y = targets_t[idx].to(device)
            flipped_before = current_sparsity > 0
            teacher_logits = None
            if config.uses_gdr and flipped_before:
                teacher_logits = pool.teacher_logits(idx, view_ids, teacher).to(device)
            with autocast(precision, device):
                logits = class_logits(model, batch, text_features)
            logits = logits.float()
            if config.uses_gdr and not flipped_before:  # the student is still the zero-shot model
                pool.remember_teacher(idx, view_ids, logits)
            loss_ce = update_scores(logits, y, teacher_logits, scores, optimizer, config, gdr_generator)
            scheduler.step()
            step += 1
            current_sparsity = sparsity(masks)
            reason = None
            # before the first flip the mask *is* zero-shot: its score says nothing about where tuning goes
            if checking and current_sparsity > 0 and (step % eval_every == 0 or step == total):
                acc = holdout_accuracy(model, val_images, val_targets, text_features, precision)
                checks.append({"step": step, "accuracy": acc})
                reason = stop_rule.observe(step, acc, total) if step < total else None
            timer.record(time.monotonic() - step_started, flipped_before)
            eta, basis = timer.eta(total - step)
            record = Progress(step=step, total_steps=total, epoch=epoch, epochs=epochs, loss=float(loss_ce.detach()),
                              train_accuracy=float((logits.detach().argmax(1) == y).float().mean()),
                              sparsity=current_sparsity, elapsed_s=time.monotonic() - started,
                              eta_seconds=None if eta is None else round(eta, 2), eta_basis=basis,
                              planned_steps=total)
            if reason is not None:
                stop_reason, stopped = reason, True
                record.eta_seconds, record.eta_basis, record.stop_reason = 0.0, "stopped early", reason
            history.append(record.to_dict())
            if progress is not None:
                progress(record)
            if stopped:
                break
        if stopped:
            break
    model.eval()
    final = current_sparsity
    if final == 0.0:
        warnings.append(f"NO MASK FLIPPED: after {step} steps every score is still above threshold="
                        f"{config.threshold}; the tuned classifier equals the zero-shot one. Raise min_steps or "
                        f"learning_rate (a score needs ~(mask_init-threshold)/lr = "
                        f"{(config.mask_init - config.threshold) / config.learning_rate:.0f} consistent steps to flip).")
    for w in warnings:
        # the min_steps floor is the designed default for small uploads: a line in the log, not a warning
        log.log(logging.INFO if w == plan["warning"] else logging.WARNING, w)
    return TuneResult(masks=masks, steps=step, epochs=epoch, sparsity=final, history=history,
                      warnings=warnings, elapsed_s=time.monotonic() - started, planned_steps=total,
                      stop_reason=stop_reason, precision=precision, checks=checks,
                      views_made=pool.views_made, teacher_forwards=pool.teacher_computed,
                      teacher_reused=pool.teacher_reused,
                      threads=torch.get_num_threads())
