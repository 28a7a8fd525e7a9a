import pytest
import torch

from rmt_core.gdr import gradient_dropout, keep_probability, soft_cross_entropy


def test_keep_probability_matches_the_case_formula():
    g_ce = torch.tensor([0.3, -0.2, 0.3, -0.1, 0.5, 0.0])
    g_kl = torch.tensor([0.1, -0.5, -0.1, 0.3, -0.5, 0.7])
    p = keep_probability(g_ce, g_kl)
    # same sign -> 1; opposite -> |g_ce| / (|g_ce| + |g_kl|); g_ce == 0 -> 1/2 (sgn 0), irrelevant to the update
    expected = torch.tensor([1.0, 1.0, 0.3 / 0.4, 0.1 / 0.4, 0.5, 0.5])
    torch.testing.assert_close(p, expected, atol=1e-6, rtol=0)


def test_leak_zero_is_plain_mask_tuning():
    g_ce, g_kl = torch.randn(1000), torch.randn(1000)
    assert torch.equal(gradient_dropout(g_ce, g_kl, leak=0.0), g_ce)


def test_full_leak_keeps_conflicting_elements_at_rate_p():
    gen = torch.Generator().manual_seed(0)
    n = 200_000
    g_ce = torch.full((n,), 0.3)
    g_kl = torch.full((n,), -0.1)  # conflict: P = 0.3 / 0.4 = 0.75
    out = gradient_dropout(g_ce, g_kl, leak=1.0, generator=gen)
    kept = (out != 0).float().mean().item()
    assert kept == pytest.approx(0.75, abs=0.005)  # ~7 standard errors
    assert torch.all((out == 0) | (out == g_ce))  # the KL gradient never enters the update
    agree = gradient_dropout(torch.full((n,), 0.3), torch.full((n,), 0.2), leak=1.0, generator=gen)
    assert torch.equal(agree, torch.full((n,), 0.3))


def test_partial_leak_scales_dropped_elements():
    gen = torch.Generator().manual_seed(0)
    g_ce = torch.full((50_000,), -2.0)
    g_kl = torch.full((50_000,), 2.0)  # P = 1/2
    out = gradient_dropout(g_ce, g_kl, leak=0.4, generator=gen)
    assert torch.equal(out.unique(), torch.tensor([-2.0, -2.0 * 0.6]))  # g kept, (1 - l) * g dropped
    assert (out == -2.0).float().mean().item() == pytest.approx(0.5, abs=0.01)


def test_soft_cross_entropy_is_the_teacher_weighted_log_likelihood():
    s = torch.tensor([[1.0, 2.0, 0.5]])
    t = torch.tensor([[0.0, 1.0, 3.0]])
    expected = -(torch.softmax(t, -1) * torch.log_softmax(s, -1)).sum()
    torch.testing.assert_close(soft_cross_entropy(s, t), expected)
    # its gradient w.r.t. student logits is softmax(s) - softmax(t)
    s.requires_grad_(True)
    soft_cross_entropy(s, t).backward()
    torch.testing.assert_close(s.grad, torch.softmax(s.detach(), -1) - torch.softmax(t, -1))
