"""The mask-tuning loop: AMT/MMT/PMT with optional GDR, progress reported through a callback."""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

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

    def to_dict(self) -> dict:
        return asdict(self)


class StepTimer:
    """ETA from the measured time per step *after masks flip*.

    Before any mask flips, GDR has no teacher to run and steps are cheaper; averaging them in made early ETAs
    far too low. Once a mask has flipped, the ETA is the mean of the last ``window`` post-flip steps times the
    steps left. Before that it is the pre-flip mean times ``PRE_FLIP_FACTOR`` for GDR methods (the teacher
    forward pass they will add), labelled as an estimate.
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
    grads = mask_gradients(logits, targets, teacher, scores, config, generator)
    with torch.no_grad():
        loss_ce = F.cross_entropy(logits, targets) + config.l2_weight * sum(s.norm() for s in scores)
    for s, g in zip(scores, grads):
        s.grad = g
    optimizer.step()
    return logits.detach(), loss_ce


def tune(backbone: Backbone, images: Sequence[Image.Image], targets: Sequence[int], text_features: torch.Tensor,
         config: TuneConfig, progress: Callable[[Progress], None] | None = None,
         should_stop: Callable[[], bool] | None = None, device: str | torch.device = "cpu",
         initial_bits: dict | None = None) -> TuneResult:
    """Attach masks for ``config.method`` to ``backbone.model`` and train their scores in place.

    ``initial_bits`` (name -> kept bits of an earlier version's mask) warm-starts the scores
    (masking.warm_start_masks); without it every score starts at ``config.mask_init``.

    ``images`` are decoded RGB images with class indices ``targets``; ``text_features`` are the normalised
    class embeddings. The model keeps its masks on return (bake them with masking.bake_masks).
    """
    if len(images) != len(targets) or not images:
        raise ValueError(f"need as many targets as images (got {len(images)} images, {len(targets)} targets)")
    model = backbone.model.to(device)
    text_features = text_features.to(device)
    masks = attach_masks(model, config.method, config.mask_init, config.threshold, config.mask_conv1)
    if initial_bits:
        warm_start_masks(masks, initial_bits, config.mask_init, config.threshold)
    scores = [m.scores for m in masks.values()]
    optimizer = torch.optim.Adam(scores, lr=config.learning_rate, betas=(0.9, 0.999), weight_decay=0.0)
    plan = config.schedule(len(images))
    epochs, total = plan["epochs"], plan["total_steps"]
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    warnings: list[str] = [plan["warning"]] if plan["warning"] else []
    transform = train_transform(backbone.preprocess, config.augment)
    generator = torch.Generator().manual_seed(config.seed)
    gdr_generator = torch.Generator(device=device).manual_seed(config.seed + 1)
    targets_t = torch.as_tensor(list(targets), dtype=torch.long)
    model.train()  # no dropout in CLIP; train mode keeps MHA off its inference fast path
    history: list[dict] = []
    started = time.monotonic()
    timer = StepTimer(config.uses_gdr)
    step = 0
    current_sparsity = sparsity(masks)  # read once per step, after the update; the next step reuses it
    for epoch in range(1, epochs + 1):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images), config.batch_size):
            if should_stop is not None and should_stop():
                raise TuningCancelled(f"cancelled at step {step} of {total}")
            idx = order[start:start + config.batch_size]
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
                batch = torch.stack([transform(images[i]) for i in idx.tolist()]).to(device)
            y = targets_t[idx].to(device)
            step_started = time.monotonic()
            flipped_before = current_sparsity > 0
            logits, loss_ce = train_step(model, masks, batch, y, text_features, optimizer, config, gdr_generator,
                                         any_flipped=current_sparsity > 0)
            scheduler.step()
            step += 1
            current_sparsity = sparsity(masks)
            timer.record(time.monotonic() - step_started, flipped_before)
            eta, basis = timer.eta(total - step)
            record = Progress(step=step, total_steps=total, epoch=epoch, epochs=epochs, loss=float(loss_ce.detach()),
                              train_accuracy=float((logits.argmax(1) == y).float().mean()),
                              sparsity=current_sparsity, elapsed_s=time.monotonic() - started,
                              eta_seconds=None if eta is None else round(eta, 2), eta_basis=basis)
            history.append(record.to_dict())
            if progress is not None:
                progress(record)
    model.eval()
    final = current_sparsity
    if final == 0.0:
        warnings.append(f"NO MASK FLIPPED: after {total} steps every score is still above threshold="
                        f"{config.threshold}; the tuned classifier equals the zero-shot one. Raise min_steps or "
                        f"learning_rate (a score needs ~(mask_init-threshold)/lr = "
                        f"{(config.mask_init - config.threshold) / config.learning_rate:.0f} consistent steps to flip).")
    for w in warnings:
        # the min_steps floor is the designed default for small uploads: a line in the log, not a warning
        log.log(logging.INFO if w == plan["warning"] else logging.WARNING, w)
    return TuneResult(masks=masks, steps=total, epochs=epochs, sparsity=final, history=history,
                      warnings=warnings, elapsed_s=time.monotonic() - started)
