"""The text tower without torch: the BPE tokenizer and the ONNX text encoder match open_clip; head rows by name."""
from __future__ import annotations

import numpy as np
import pytest

from rmt_core.head import Head
from rmt_core.templates import class_prompt

LABELS = ["zebra", "Golden Retriever", "café au lait", "x_ray", "3d printer", "it's a dog!", "naïve  résumé", "a" * 90]


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    from rmt_core.backbones import load_backbone
    from rmt_core.base import ensure_base

    backbone = load_backbone("rmt-tiny-vit", None, device="cpu", seed=0)
    return backbone, ensure_base(backbone, tmp_path_factory.mktemp("bases"))


def test_tokens_and_features_match_open_clip(tiny_base):
    from rmt_core.backbones import encode_class_texts
    from rmt_core.text import TextEncoder

    backbone, base = tiny_base
    encoder = TextEncoder(base.path)
    prompts = [class_prompt(label) for label in LABELS]
    np.testing.assert_array_equal(encoder.tokenizer(prompts), backbone.tokenizer(prompts).numpy())
    expected = encode_class_texts(backbone, LABELS, "a photo of a {}.").numpy()
    np.testing.assert_allclose(encoder.encode(prompts), expected, atol=1e-5)


def test_a_base_without_a_text_tower_says_so(tmp_path):
    from rmt_core.text import TextEncoder

    with pytest.raises(FileNotFoundError, match="no text tower"):
        TextEncoder(tmp_path)


def test_head_with_class_keeps_old_scores_and_adds_a_zero_shot_row():
    rng = np.random.default_rng(0)
    head = Head(W=rng.normal(size=(3, 8)) * 2.0, b=np.array([0.1, -0.2, 0.4]), scale=10.0,
                cache_keys=rng.normal(size=(5, 8)), cache_values=np.eye(5, 3), cache_alpha=0.5, kind="linear-probe")
    text = rng.normal(size=8)
    grown = head.with_class(text)
    features = rng.normal(size=(4, 8))
    np.testing.assert_allclose(grown.logits(features)[:, :3], head.logits(features), rtol=1e-5, atol=1e-5)
    assert grown.n_classes == 4 and grown.cache_values.shape == (5, 4) and not grown.cache_values[:, 3].any()
    np.testing.assert_allclose(np.linalg.norm(grown.W[3]), np.linalg.norm(head.W, axis=1).mean(), rtol=1e-5)
    np.testing.assert_allclose(grown.W[3] / np.linalg.norm(grown.W[3]), text / np.linalg.norm(text), rtol=1e-5)
    with pytest.raises(ValueError, match="expected \\(8,\\)"):
        head.with_class(np.ones(7))
