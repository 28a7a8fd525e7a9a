import pytest
import torch
from torch import nn

from rmt_core.masking import (BinaryMask, apply_mask_bits, attach_masks, bake_masks, find_masks, mask_bits,
                              masks_disabled, sparsity, target_names)
from tests.core.toys import METHODS, TOY_BACKBONES, tiny


def test_straight_through_gradient_is_weight_times_effective_weight_gradient():
    torch.manual_seed(0)
    lin = nn.Linear(6, 4)
    lin.requires_grad_(False)
    w = lin.weight.detach().clone()
    mask = BinaryMask(w.shape, init=0.01, threshold=0.005)
    with torch.no_grad():
        mask.scores.copy_(torch.rand(w.shape) * 0.01)  # about half below threshold
    torch.nn.utils.parametrize.register_parametrization(lin, "weight", mask)
    x = torch.randn(5, 6)
    w_eff = lin.weight  # the parametrized value
    assert torch.equal(w_eff, w * (mask.scores > 0.005).float())
    out = lin(x)
    upstream = torch.randn_like(out)
    (out * upstream).sum().backward()
    # dL/dW_eff for y = x W^T + b is upstream^T x
    dl_dweff = upstream.T @ x
    torch.testing.assert_close(mask.scores.grad, dl_dweff * w, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", TOY_BACKBONES)
def test_targets_follow_the_method(name):
    visual = tiny(name).model.visual
    amt = target_names(visual, "r-amt")
    assert "conv1.weight" in amt
    assert all(n == "conv1.weight" or n.endswith(("attn.in_proj_weight", "attn.out_proj.weight")) for n in amt)
    assert "conv1.weight" not in target_names(visual, "amt", mask_conv1=False)
    mmt = target_names(visual, "mmt")
    assert mmt and all(n.endswith(("mlp.c_fc.weight", "mlp.c_proj.weight")) for n in mmt)
    pmt = target_names(visual, "pmt")
    assert set(amt) | set(mmt) <= set(pmt)
    for names in (amt, mmt, pmt):  # never biases, norms, embeddings, the projection
        assert not any(("bias" in n) or ("ln_" in n) or ("embedding" in n) or n == "proj" for n in names)


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="method"):
        target_names(tiny().model.visual, "lora")


@pytest.mark.parametrize("name", TOY_BACKBONES)
@pytest.mark.parametrize("method", METHODS)
def test_bake_gives_original_structure_and_same_outputs(name, method):
    backbone = tiny(name)
    model = backbone.model
    reference_keys = {k: v.shape for k, v in model.state_dict().items()}
    reference_modules = [(n, type(m)) for n, m in model.named_modules()]
    reference_count = sum(p.numel() for p in model.parameters())
    expected_targets = {f"visual.{n}" for n in target_names(model.visual, method)}
    masks = attach_masks(model, method)
    assert set(masks) == expected_targets
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(m.scores) for m in masks.values()}  # only the scores train
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in masks.values():
            m.scores.copy_(torch.rand(m.scores.shape, generator=g) * 0.011)  # ~45% masked out
    x = torch.randn(2, 3, *backbone.image_size)
    with torch.no_grad():
        masked_out = model.encode_image(x)
        with masks_disabled(model):
            zero_shot = model.encode_image(x)
    assert not torch.allclose(masked_out, zero_shot)
    bake_masks(model)
    assert not find_masks(model)
    assert {k: v.shape for k, v in model.state_dict().items()} == reference_keys
    assert [(n, type(m)) for n, m in model.named_modules()] == reference_modules
    assert sum(p.numel() for p in model.parameters()) == reference_count
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(x), masked_out, rtol=1e-5, atol=1e-5)


def test_stored_mask_bits_rebuild_the_baked_weights():
    backbone = tiny()
    attach_masks(backbone.model, "r-amt")
    for m in find_masks(backbone.model).values():
        with torch.no_grad():
            m.scores.copy_(torch.rand(m.scores.shape) * 0.011)
    bits = mask_bits(backbone.model)
    assert 30 < sparsity(bits) < 60
    bake_masks(backbone.model)
    fresh = tiny()
    apply_mask_bits(fresh.model, bits)
    baked = dict(backbone.model.named_parameters())
    rebuilt = dict(fresh.model.named_parameters())
    assert baked.keys() == rebuilt.keys()
    for name in baked:
        assert torch.equal(baked[name], rebuilt[name]), name


def test_sparsity_counts_entries_at_or_below_threshold():
    m = BinaryMask((2, 5), init=0.01, threshold=0.005)
    with torch.no_grad():
        m.scores[0, :3] = 0.005  # == threshold is masked out
        m.scores[1, 0] = -1.0
    assert sparsity({"a": m}) == pytest.approx(40.0)
