"""Which activation a backbone is built with: OpenAI-trained weights need QuickGELU (issue 10)."""
import os

import pytest
import torch
from open_clip.transformer import QuickGELU
from torch import nn

from rmt_core.backbones import load_backbone, wants_quick_gelu


def _activations(model) -> set[type]:
    return {type(block.mlp.gelu) for block in model.visual.transformer.resblocks}


def test_vit_b_16_from_a_saved_openai_state_dict_gets_quick_gelu_and_a_plain_one_does_not(tmp_path):
    """The README's `--backbone ViT-B-16 --pretrained /models/ViT-B-16-openai.bin`, with a random-init state
    dict standing in for OpenAI's weights (no download): same weights, the activation follows the checkpoint."""
    source = load_backbone("ViT-B-16", None, seed=0).model
    openai_file = tmp_path / "ViT-B-16-openai.bin"
    torch.save(source.state_dict(), openai_file)
    plain_file = tmp_path / "vit_b_16_laion.bin"
    os.link(openai_file, plain_file)  # the same bytes under a name that says nothing about OpenAI

    openai = load_backbone("ViT-B-16", str(openai_file))
    assert openai.quick_gelu and _activations(openai.model) == {QuickGELU}
    torch.testing.assert_close(openai.model.state_dict(), source.state_dict(), rtol=0, atol=0)
    del openai
    plain = load_backbone("ViT-B-16", str(plain_file))
    assert not plain.quick_gelu and _activations(plain.model) == {nn.GELU}


def test_explicit_setting_overrides_detection_on_a_small_config(tmp_path):
    """The same rule on the tiny config (fast): quick_gelu=True/False wins over the file name."""
    path = tmp_path / "tiny.pt"
    torch.save(load_backbone("rmt-tiny-vit", None).model.state_dict(), path)
    assert _activations(load_backbone("rmt-tiny-vit", str(path)).model) == {nn.GELU}
    forced = load_backbone("rmt-tiny-vit", str(path), quick_gelu=True)
    assert forced.quick_gelu and _activations(forced.model) == {QuickGELU}
    openai_path = tmp_path / "tiny-openai.pt"
    os.link(path, openai_path)
    assert _activations(load_backbone("rmt-tiny-vit", str(openai_path), quick_gelu=False).model) == {nn.GELU}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # the activation changes the features: this is not a cosmetic setting
        a = load_backbone("rmt-tiny-vit", str(path)).model.encode_image(x)
        b = forced.model.encode_image(x)
    assert not torch.allclose(a, b, atol=1e-4)


@pytest.mark.parametrize("name, pretrained, source, expected", [
    ("ViT-B-16-quickgelu", None, None, True),
    ("ViT-B-16", "openai", "openai", True),  # open_clip's tag config says quick_gelu; it only warns otherwise
    ("ViT-B-16", "laion2b_s34b_b88k", "laion2b_s34b_b88k", False),
    ("ViT-B-16", None, None, False),
])
def test_quick_gelu_detection_from_names_and_tags(name, pretrained, source, expected):
    assert wants_quick_gelu(name, pretrained, source) is expected


def test_the_same_weights_under_quick_gelu_are_another_base(tmp_path):
    from rmt_core.base import fingerprint

    path = tmp_path / "tiny.pt"
    torch.save(load_backbone("rmt-tiny-vit", None).model.state_dict(), path)
    plain = load_backbone("rmt-tiny-vit", str(path)).model.visual
    quick = load_backbone("rmt-tiny-vit", str(path), quick_gelu=True).model.visual
    assert fingerprint(plain) == fingerprint(load_backbone("rmt-tiny-vit", str(path)).model.visual)
    assert fingerprint(plain) != fingerprint(quick)
