"""A faithful re-implementation of the official R-AMT training step, for the tuning-step benchmark.

As in the paper's code: a separate frozen zero-shot copy of CLIP runs the teacher forward with autograd on,
and the two losses each get a full ``.backward()`` through the student graph, with the mask gradients read
from ``.grad`` in between. The update law (GDR, Adam) is the same as rmt_core.tuning's.
"""
from __future__ import annotations

import torch.nn.functional as F

from rmt_core.gdr import gradient_dropout, soft_cross_entropy
from rmt_core.backbones import load_backbone
from rmt_core.tuning import class_logits


def make_teacher(name: str, pretrained=None, seed: int = 0):
    """The zero-shot model as its own loaded copy (the official code keeps two CLIPs).

    Not a deepcopy of a masked model: parametrize's classes are shared by copies, so un-masking a copy
    would strip the original's parametrization too.
    """
    teacher = load_backbone(name, pretrained, seed=seed).model
    teacher.requires_grad_(False)
    return teacher.train()


def official_step(student, teacher, x, y, text, scores, optimizer, config, generator):
    logits = class_logits(student, x, text)
    zs_logits = class_logits(teacher, x, text)  # autograd on, as in the official trainer
    loss_ce = F.cross_entropy(logits, y) + config.l2_weight * sum(s.norm() for s in scores)
    loss_kl = soft_cross_entropy(logits, zs_logits.detach(), config.kl_temperature)
    optimizer.zero_grad()
    loss_kl.backward(retain_graph=True)
    g_kl = [s.grad.clone() for s in scores]
    optimizer.zero_grad()
    loss_ce.backward()
    for s, gk in zip(scores, g_kl):
        s.grad = gradient_dropout(s.grad, gk, config.leak, generator)
    optimizer.step()
    return float(loss_ce)
