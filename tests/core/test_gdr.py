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


def _official_kl(student, teacher, t):
    """The official R-AMT distillation loss, written as the authors' code writes it (KL, batchmean, * T * T)."""
    import torch.nn.functional as F

    return F.kl_div(F.log_softmax(student / t, dim=1), F.softmax(teacher / t, dim=1), reduction="batchmean") * t * t


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_closed_form_kl_gradient_equals_the_official_losss_autograd_gradient(temperature):
    """GDR's g_kl (closed-form logit gradient + VJP) == d/dM of the official T^2-scaled KL at every T, so GDR's
    keep probabilities are the official ones for any kl_temperature."""
    from rmt_core.backbones import encode_class_texts
    from rmt_core.config import TuneConfig
    from rmt_core.masking import attach_masks, masks_disabled
    from rmt_core.tuning import ce_kl_gradients, class_logits
    from tests.core.toys import tiny

    backbone = tiny()
    model = backbone.model
    text = encode_class_texts(backbone, ["a", "b", "c"], "a photo of a {}.")
    masks = attach_masks(model, "r-amt")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in masks.values():
            m.scores.copy_(0.004 + torch.rand(m.scores.shape, generator=g) * 0.01)  # some masks flipped
    scores = [m.scores for m in masks.values()]
    model.train()
    x = torch.randn(5, 3, 32, 32, generator=g)
    logits = class_logits(model, x, text)
    with torch.no_grad(), masks_disabled(model):
        teacher = class_logits(model, x, text)
    want = torch.autograd.grad(_official_kl(logits, teacher, temperature), scores, retain_graph=True)
    config = TuneConfig(method="r-amt", kl_temperature=temperature, l2_weight=0.0)
    _, got = ce_kl_gradients(logits, torch.tensor([0, 1, 2, 0, 1]), teacher, scores, config)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3 * float(b.abs().max()))  # float32 sums; T off = x2, x4
    # and the loss itself is the official one up to the teacher's entropy (a constant): same value gap at any s
    s2 = logits.detach() + 0.3
    gap = lambda s: float(soft_cross_entropy(s, teacher, temperature) - _official_kl(s, teacher, temperature))  # noqa: E731
    assert gap(logits.detach()) == pytest.approx(gap(s2), abs=1e-4)
