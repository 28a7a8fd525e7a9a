"""Gradient Dropout Regularity (R-AMT, ICCV 2023), per element of each mask tensor.

P = (1 + sgn(g_ce) * (g_ce + g_kl) / (|g_ce| + |g_kl| + eps)) / 2   -- 1 when the two signs agree,
    |g_ce| / (|g_ce| + |g_kl|) when they conflict.
g = ((1 - l) + l * 1[P > U]) * g_ce,  U ~ Uniform(0, 1) i.i.d.
The KL gradient never enters the update: it only decides which CE elements are dropped.
"""
from __future__ import annotations

import torch

EPS = 1e-8


def keep_probability(g_ce: torch.Tensor, g_kl: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    return 0.5 * (1.0 + torch.sign(g_ce) * (g_ce + g_kl) / (g_ce.abs() + g_kl.abs() + eps))


def gradient_dropout(g_ce: torch.Tensor, g_kl: torch.Tensor, leak: float,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    if leak == 0.0:
        return g_ce
    p = keep_probability(g_ce, g_kl)
    u = torch.rand(g_ce.shape, generator=generator, device=g_ce.device, dtype=g_ce.dtype)
    return ((1.0 - leak) + leak * (p > u).to(g_ce.dtype)) * g_ce


def soft_cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                       temperature: float = 1.0) -> torch.Tensor:
    """The official GDR loss: T^2 * KL(softmax(t/T) || softmax(s/T)), batch mean (Hinton's distillation).

    Written as the soft-target cross-entropy T^2 * CE(softmax(t/T), s/T), which differs from the KL by the
    teacher's entropy, a constant, so both have the same gradient T * (softmax(s/T) - softmax(t/T)) / N. The
    T^2 keeps that gradient's size independent of T; without it GDR's keep probabilities change with T.
    """
    target = torch.softmax(teacher_logits / temperature, dim=-1)
    ce = -(target * torch.log_softmax(student_logits / temperature, dim=-1)).sum(-1).mean()
    return temperature ** 2 * ce
