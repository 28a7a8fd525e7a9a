import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from rmt_core.backbones import encode_class_texts
from rmt_core.export import ClassifierHead
from rmt_core.head import Head, append_to_graph
from rmt_core.runtime import make_session
from tests.core.toys import tiny

LABELS = ["cat", "dog", "truck"]


def _cached_head(dim=16, classes=3, m=6, seed=0):
    rng = np.random.default_rng(seed)
    keys = rng.normal(size=(m, dim))
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    return Head(W=rng.normal(size=(classes, dim)), b=rng.normal(size=classes), scale=7.5,
                cache_keys=keys, cache_values=np.eye(classes)[rng.integers(0, classes, m)],
                cache_alpha=0.7, cache_beta=3.0, temperature=1.3, kind="tip-adapter", meta={"shots": 2})


def test_zero_shot_head_matches_the_torch_classifier_head():
    backbone = tiny()
    text = encode_class_texts(backbone, LABELS, "a photo of a {}.")
    scale = float(backbone.model.logit_scale.detach().exp())
    torch_head = ClassifierHead(backbone.model.visual, text, scale).eval()
    x = torch.randn(4, 3, *backbone.image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = torch_head(x).numpy()
        features = backbone.model.visual(x).numpy()
    head = Head.zero_shot(text.numpy(), scale)
    np.testing.assert_allclose(head.logits(features), expected, rtol=1e-5, atol=1e-5)
    assert head.kind == "zero-shot" and np.all(head.b == 0)


def test_save_load_round_trip_without_pickle(tmp_path):
    head = _cached_head()
    size = head.save(tmp_path / "head.npz")
    assert size == (tmp_path / "head.npz").stat().st_size
    with np.load(tmp_path / "head.npz", allow_pickle=False) as z:  # would raise on an object array
        assert set(z.files) == {"W", "b", "cache_keys", "cache_values", "header"}
    got = Head.load(tmp_path / "head.npz")
    feats = np.random.default_rng(1).normal(size=(5, 16)).astype(np.float32)
    np.testing.assert_array_equal(got.logits(feats), head.logits(feats))
    assert got.summary() == head.summary()
    with pytest.raises(ValueError, match="head file"):
        Head.from_bytes(b"not an npz")


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="expected"):
        Head(W=np.zeros((3, 4)), b=np.zeros(2))
    with pytest.raises(ValueError, match="both"):
        Head(W=np.zeros((3, 4)), cache_keys=np.zeros((2, 4)))
    with pytest.raises(ValueError, match="temperature"):
        Head(W=np.zeros((3, 4)), temperature=0)


@pytest.mark.parametrize("cached", [False, True])
def test_head_appended_to_an_onnx_graph_equals_numpy(cached, tmp_path):
    head = _cached_head() if cached else Head(W=np.random.default_rng(2).normal(size=(3, 16)), scale=50.0)
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["features"])], "base",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
                              [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 16])])
    append_to_graph(graph, head, "features")
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    onnx.save(model, tmp_path / "m.onnx")
    feats = np.random.default_rng(3).normal(size=(4, 16)).astype(np.float32)
    got = make_session(tmp_path / "m.onnx", "cpu").run(None, {"x": feats})[0]
    np.testing.assert_allclose(got, head.logits(feats), rtol=1e-5, atol=1e-5)
