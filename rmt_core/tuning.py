"""The mask-tuning loop: AMT/MMT/PMT with optional GDR, progress reported through a callback."""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T

from .backbones import Backbone
from .config import TuneConfig
from .gdr import gradient_dropout, soft_cross_entropy
from .masking import BinaryMask, attach_masks, masks_disabled, sparsity

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

    def to_dict(self) -> dict:
        return asdict(self)


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


def plan_schedule(n_images: int, config: TuneConfig) -> tuple[int, int, int]:
    """(steps per epoch, epochs, total steps), raising epochs until ``min_steps`` optimizer steps run."""
    per_epoch = max(1, math.ceil(n_images / config.batch_size))
    epochs = max(config.epochs, math.ceil(config.min_steps / per_epoch)) if config.min_steps else config.epochs
    return per_epoch, epochs, per_epoch * epochs


def mask_gradients(loss_ce: torch.Tensor, loss_kl: torch.Tensor | None, scores: list[torch.Tensor],
                   leak: float, generator: torch.Generator | None) -> list[torch.Tensor]:
    """dL_ce/dM, gradient-dropped by GDR when a KL loss is given (one graph, two vector-Jacobian products)."""
    if loss_kl is None:
        return list(torch.autograd.grad(loss_ce, scores))
    g_ce = torch.autograd.grad(loss_ce, scores, retain_graph=True)
    g_kl = torch.autograd.grad(loss_kl, scores)
    return [gradient_dropout(gc, gk, leak, generator) for gc, gk in zip(g_ce, g_kl)]


def tune(backbone: Backbone, images: Sequence[Image.Image], targets: Sequence[int], text_features: torch.Tensor,
         config: TuneConfig, progress: Callable[[Progress], None] | None = None,
         should_stop: Callable[[], bool] | None = None, device: str | torch.device = "cpu") -> TuneResult:
    """Attach masks for ``config.method`` to ``backbone.model`` and train their scores in place.

    ``images`` are decoded RGB images with class indices ``targets``; ``text_features`` are the normalised
    class embeddings. The model keeps its masks on return (bake them with masking.bake_masks).
    """
    if len(images) != len(targets) or not images:
        raise ValueError(f"need as many targets as images (got {len(images)} images, {len(targets)} targets)")
    model = backbone.model.to(device)
    text_features = text_features.to(device)
    masks = attach_masks(model, config.method, config.mask_init, config.threshold, config.mask_conv1)
    scores = [m.scores for m in masks.values()]
    optimizer = torch.optim.Adam(scores, lr=config.learning_rate, betas=(0.9, 0.999), weight_decay=0.0)
    per_epoch, epochs, total = plan_schedule(len(images), config)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    warnings: list[str] = []
    if epochs > config.epochs:
        warnings.append(f"{len(images)} images give {per_epoch} step(s) per epoch; epochs raised from "
                        f"{config.epochs} to {epochs} so that {total} >= min_steps={config.min_steps} optimizer steps run")
    transform = train_transform(backbone.preprocess, config.augment)
    generator = torch.Generator().manual_seed(config.seed)
    gdr_generator = torch.Generator(device=device).manual_seed(config.seed + 1)
    targets_t = torch.as_tensor(list(targets), dtype=torch.long)
    model.train()  # no dropout in CLIP; train mode keeps MHA off its inference fast path
    history: list[dict] = []
    started = time.monotonic()
    step = 0
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
            logits = class_logits(model, batch, text_features)
            l2 = sum(s.norm() for s in scores)
            loss_ce = F.cross_entropy(logits, y) + config.l2_weight * l2
            loss_kl = None
            if config.uses_gdr:
                with torch.no_grad(), masks_disabled(model):
                    teacher = class_logits(model, batch, text_features)
                loss_kl = soft_cross_entropy(logits, teacher, config.kl_temperature)
            grads = mask_gradients(loss_ce, loss_kl, scores, config.leak, gdr_generator)
            for s, g in zip(scores, grads):
                s.grad = g
            optimizer.step()
            scheduler.step()
            step += 1
            record = Progress(step=step, total_steps=total, epoch=epoch, epochs=epochs, loss=float(loss_ce.detach()),
                              train_accuracy=float((logits.argmax(1) == y).float().mean()),
                              sparsity=sparsity(masks), elapsed_s=time.monotonic() - started)
            history.append(record.to_dict())
            if progress is not None:
                progress(record)
    model.eval()
    final = sparsity(masks)
    if final == 0.0:
        warnings.append(f"NO MASK FLIPPED: after {total} steps every score is still above threshold="
                        f"{config.threshold}; the tuned classifier equals the zero-shot one. Raise min_steps or "
                        f"learning_rate (a score needs ~(mask_init-threshold)/lr = "
                        f"{(config.mask_init - config.threshold) / config.learning_rate:.0f} consistent steps to flip).")
    for w in warnings:
        log.warning(w)
    return TuneResult(masks=masks, steps=total, epochs=epochs, sparsity=final, history=history,
                      warnings=warnings, elapsed_s=time.monotonic() - started)
