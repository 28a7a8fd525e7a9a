import json

import numpy as np
import onnx
import pytest
import torch

from rmt_core.backbones import encode_class_texts
from rmt_core.config import TuneConfig
from rmt_core.export import ClassifierHead, ExportParityError, check_parity, export_onnx
from rmt_core.masking import attach_masks, bake_masks, find_masks
from rmt_core.pipeline import build_classifier, rebuild_onnx
from rmt_core.runtime import OnnxClassifier, make_session
from tests.core.toys import TOY_BACKBONES, colour_task, tiny

LABELS = ["cat", "dog", "truck"]


def _head(backbone):
    text = encode_class_texts(backbone, LABELS, "a photo of a {}.")
    return ClassifierHead(backbone.model.visual, text, float(backbone.model.logit_scale.detach().exp()))


@pytest.mark.parametrize("name", TOY_BACKBONES)
def test_masked_baked_and_onnx_logits_agree_and_graph_is_unchanged(name, tmp_path):
    plain = _head(tiny(name))
    export_onnx(plain, tmp_path / "plain.onnx")

    backbone = tiny(name)
    attach_masks(backbone.model, "r-amt")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in find_masks(backbone.model).values():
            m.scores.copy_(torch.rand(m.scores.shape, generator=g) * 0.0105)
    head = _head(backbone)
    x = torch.randn(4, 3, *backbone.image_size, generator=g)
    with torch.no_grad():
        masked = head(x)
    with pytest.raises(ValueError, match="bake"):
        export_onnx(head, tmp_path / "refused.onnx")
    bake_masks(backbone.model)
    with torch.no_grad():
        baked = head(x)
    torch.testing.assert_close(baked, masked, rtol=1e-5, atol=1e-5)
    export_onnx(head, tmp_path / "tuned.onnx")
    got = make_session(tmp_path / "tuned.onnx", "cpu").run(None, {"image": x.numpy()})[0]
    np.testing.assert_allclose(got, masked.numpy(), rtol=1e-4, atol=1e-4)
    # zero extra cost: same parameter count, same ONNX graph size as the unmasked model
    assert sum(p.numel() for p in head.parameters()) == sum(p.numel() for p in plain.parameters())
    assert len(onnx.load(tmp_path / "tuned.onnx").graph.node) == len(onnx.load(tmp_path / "plain.onnx").graph.node)
    assert not (tmp_path / "refused.onnx").exists()
    # dynamic batch axis
    assert make_session(tmp_path / "tuned.onnx", "cpu").run(None, {"image": x[:1].numpy()})[0].shape == (1, 3)


def test_parity_check_catches_a_wrong_model(tmp_path):
    head = _head(tiny())
    export_onnx(head, tmp_path / "m.onnx")
    assert check_parity(head, tmp_path / "m.onnx") < 1e-5
    with torch.no_grad():
        head.class_embeddings.mul_(-1)
    with pytest.raises(ExportParityError):
        check_parity(head, tmp_path / "m.onnx")


def test_build_classifier_writes_a_complete_directory_and_mask_rebuilds_it(tmp_path):
    samples = colour_task(n_per_class=6)
    config = TuneConfig(backbone="rmt-tiny-vit", pretrained=None, epochs=1, min_steps=12, batch_size=8,
                        learning_rate=1e-3, holdout=0.34, select="mask")  # pinned: the mask path is under test
    manifest = build_classifier(samples, config, tmp_path / "clf")
    files = {p.name for p in (tmp_path / "clf").iterdir()}
    assert {"manifest.json", "mask.rmtm", "model.onnx", "report.json", "curve.png", "confusion.png"} <= files
    assert json.loads((tmp_path / "clf" / "manifest.json").read_text()) == manifest
    assert manifest["labels"] == ["blue", "green", "red"]
    assert manifest["validation"]["n_holdout"] == 6
    assert manifest["n_train"] == 12
    assert manifest["mask_bytes"] == (tmp_path / "clf" / "mask.rmtm").stat().st_size

    clf = OnnxClassifier(tmp_path / "clf", providers="cpu")
    images = [img for img, _ in samples[:5]]
    before = clf.classify(images, top_k=3)
    rebuild_onnx(tmp_path / "clf", tmp_path / "rebuilt.onnx")
    rebuilt = make_session(tmp_path / "rebuilt.onnx", "cpu")
    batch = np.stack([clf.preprocess(i) for i in images])
    np.testing.assert_allclose(rebuilt.run(None, {"image": batch})[0], clf.logits(batch), rtol=1e-5, atol=1e-5)
    assert [p[0]["label"] for p in before] == [p[0]["label"] for p in clf.classify(images, top_k=3)]


def test_fewer_than_two_classes_is_refused(tmp_path):
    samples = [s for s in colour_task(n_per_class=3) if s[1] == "red"]
    with pytest.raises(ValueError, match="at least 2 classes"):
        build_classifier(samples, TuneConfig(backbone="rmt-tiny-vit", pretrained=None), tmp_path / "x")
