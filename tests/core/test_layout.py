"""A classifier = shared base + mask + head: serving, sharing, materialised downloads, old layouts."""
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from rmt_core.artifact import load_masks, write_version_files
from rmt_core.backbones import encode_class_texts
from rmt_core.base import BASE_JSON, architecture_of, ensure_base, fingerprint
from rmt_core.export import ClassifierHead, export_onnx
from rmt_core.head import Head
from rmt_core.masking import apply_mask_bits, target_names
from rmt_core.materialize import materialize_onnx, materialized_model_path
from rmt_core.runtime import BaseRegistry, OnnxClassifier, ServedClassifier, load_classifier, make_session
from rmt_core.segments import partition
from tests.core.toys import tiny

LABELS = ["cat", "dog", "truck"]
DATA = Path(__file__).parent / "data"


def _random_bits(backbone, seed: int, drop: float = 0.05, method: str = "r-amt") -> dict:
    rng = np.random.default_rng(seed)
    visual = backbone.model.visual
    params = dict(visual.named_parameters())
    return {f"visual.{n}": rng.random(tuple(params[n].shape)) > drop for n in target_names(visual, method)}


def _version(tmp: Path, name: str, backbone, base, bits: dict | None) -> Path:
    """A version directory as the pipeline writes it (manifest + mask + head)."""
    out = tmp / name
    out.mkdir()
    text = encode_class_texts(backbone, LABELS, "a photo of a {}.").numpy()
    head = Head.zero_shot(text, float(backbone.model.logit_scale.detach().exp()))
    fields = write_version_files(out, base_id=base.base_id, head=head, masks=bits, meta={"method": "r-amt"})
    manifest = {"labels": LABELS, "preprocess": backbone.preprocess, "backbone": backbone.name,
                "pretrained": backbone.pretrained, "method": "r-amt", **fields}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def _baked_reference(bits: dict | None, path: Path) -> Path:
    """Today's layout: the whole classifier baked into one ONNX file by torch."""
    backbone = tiny()
    if bits:
        apply_mask_bits(backbone.model, bits)
    text = encode_class_texts(backbone, LABELS, "a photo of a {}.")
    head = ClassifierHead(backbone.model.visual, text, float(backbone.model.logit_scale.detach().exp()))
    return export_onnx(head, path)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("layout")
    backbone = tiny()
    base = ensure_base(backbone, tmp / "bases")
    bits_a, bits_b = _random_bits(backbone, 1), _random_bits(backbone, 2, drop=0.2)
    x = torch.randn(3, 3, *backbone.image_size, generator=torch.Generator().manual_seed(0)).numpy()
    return {"tmp": tmp, "backbone": backbone, "base": base, "bases": tmp / "bases", "x": x,
            "a": _version(tmp, "a", backbone, base, bits_a), "b": _version(tmp, "b", backbone, base, bits_b),
            "zero": _version(tmp, "zero", backbone, base, None),
            "unflipped": _version(tmp, "unflipped", backbone, base, {k: np.ones_like(v) for k, v in bits_a.items()}),
            "bits_a": bits_a, "bits_b": bits_b}


def test_base_is_exported_once_and_maps_every_maskable_weight(world):
    base, backbone = world["base"], world["backbone"]
    assert base.base_id == fingerprint(backbone.model.visual, architecture_of(backbone))
    assert base.base_id != fingerprint(backbone.model.visual, "rmt-tiny-vit-wide")
    stamp = (base.path / "base.onnx").stat().st_mtime_ns
    assert ensure_base(tiny(), world["bases"]).path == base.path  # same weights: reused, not rewritten
    assert (base.path / "base.onnx").stat().st_mtime_ns == stamp
    assert ensure_base(tiny(seed=1), world["bases"]).base_id != base.base_id  # other weights: another base
    inits = {t.name: onnx.numpy_helper.to_array(t)
             for t in onnx.load(str(base.onnx_path), load_external_data=True).graph.initializer}
    params = dict(backbone.model.named_parameters())
    assert set(world["bits_a"]) <= set(base.maskable)
    for name, where in base.maskable.items():
        value = params[name].detach().numpy()
        np.testing.assert_array_equal(inits[where["initializer"]], value.T if where["transpose"] else value)
    assert not [p for p in world["bases"].iterdir() if p.name.startswith(".")]  # no temp dir left behind


@pytest.mark.parametrize("shared_min_bytes", [0, None])
def test_two_classifiers_on_one_base_equal_their_own_baked_models(world, shared_min_bytes):
    registry = BaseRegistry(world["bases"], "cpu", shared_min_bytes=shared_min_bytes, keep_idle=0)
    a = load_classifier(world["a"], world["bases"], registry)
    b = load_classifier(world["b"], world["bases"], registry)
    x = world["x"]
    for clf, bits, name in ((a, world["bits_a"], "a"), (b, world["bits_b"], "b")):
        ref = make_session(_baked_reference(bits, world["tmp"] / f"ref-{name}-{shared_min_bytes}.onnx"), "cpu")
        np.testing.assert_allclose(clf.logits(x), ref.run(None, {"image": x})[0], rtol=1e-4, atol=1e-4)
    assert not np.allclose(a.logits(x), b.logits(x))
    # both run on the same plan: the shared segments are one set of sessions
    stats = registry.stats()
    assert len(stats["plans"]) == 1 and stats["plans"][0]["refs"] == 2
    if shared_min_bytes == 0:  # toy weights are small: force the split so the chain is exercised
        assert stats["plans"][0]["shared_sessions"] >= 2 and a.own_sessions >= 2
        shared_a = {id(s) for seg, s in a._chain if seg.kind == "shared"}
        shared_b = {id(s) for seg, s in b._chain if seg.kind == "shared"}
        assert shared_a == shared_b
    a.close()
    assert registry.stats()["plans"][0]["refs"] == 1
    b.close()
    assert registry.stats() == {"bases": [], "plans": []}


def test_segments_pass_only_activations_and_know_their_shapes(world):
    """Constants never cross a cut (torch writes an Identity for a parameter equal to another, e.g. every
    LayerNorm weight of a fresh model; each segment reading one gets its own copy, which ORT folds), and every
    value that does cross carries the shape the base's shape inference found, so ORT can fuse inside a
    segment as it does in the whole graph."""
    graph = onnx.load(str(world["base"].onnx_path), load_external_data=False).graph
    registry = BaseRegistry(world["bases"], "cpu")
    loaded = registry.base(world["base"].base_id)
    masked = frozenset(loaded.info.maskable[n]["initializer"] for n in world["bits_a"])
    segments = partition(graph, masked, shared_min_bytes=0)
    assert len(segments) >= 4 and {s.kind for s in segments} == {"own", "shared"}
    aliases = [n for n in graph.node if n.op_type == "Identity" and n.input[0] in {t.name for t in graph.initializer}]
    assert aliases, "the toy base no longer has aliased parameters: this test checks nothing"
    constant = {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output
                                                      if n.op_type in ("Constant", "Identity") and
                                                      all(i in {t.name for t in graph.initializer} for i in n.input)}
    produced = {"image"}
    for seg in segments:
        assert not set(seg.inputs) & constant, seg.inputs
        assert set(seg.inputs) <= produced  # every input was produced earlier in the chain
        for name in seg.inputs:
            t = loaded.types[name]
            assert t.tensor_type.HasField("shape"), name  # a rank, possibly 0, and its dims
        produced |= set(seg.outputs)
        masked_here = {n for n in seg.initializers if n in masked}
        assert (seg.kind == "own") == bool(masked_here) and set(seg.masked) == masked_here
    assert {n for s in segments for n in s.masked} == masked
    assert [o.name for o in graph.output][0] in produced


def test_nothing_masked_builds_no_encoder_tensors_of_its_own(world):
    registry = BaseRegistry(world["bases"], "cpu", shared_min_bytes=0)
    zero = load_classifier(world["zero"], world["bases"], registry)
    unflipped = load_classifier(world["unflipped"], world["bases"], registry)
    for clf in (zero, unflipped):
        assert isinstance(clf, ServedClassifier)
        assert clf.masked == frozenset() and clf.own_sessions == 0 and clf.own_tensor_bytes == 0
        assert len(clf._chain) == 1  # the whole base, one session
    assert zero._chain[0][1] is unflipped._chain[0][1]  # the same base session
    assert registry.stats()["plans"] == [{"base_id": world["base"].base_id, "masked": 0, "precision": "fp32", "refs": 2,
                                          "shared_sessions": 1, "segments": 1}]
    ref = make_session(_baked_reference(None, world["tmp"] / "ref-zero.onnx"), "cpu")
    np.testing.assert_allclose(zero.logits(world["x"]), ref.run(None, {"image": world["x"]})[0], rtol=1e-4, atol=1e-4)


def test_a_released_plan_is_kept_idle_for_the_next_classifier_then_dropped(world):
    registry = BaseRegistry(world["bases"], "cpu", shared_min_bytes=0, keep_idle=1)
    a = load_classifier(world["a"], world["bases"], registry)
    shared = [s for seg, s in a._chain if seg.kind == "shared"]
    a.close()
    assert [p["refs"] for p in registry.stats()["plans"]] == [0]  # idle, not rebuilt by the next load
    b = load_classifier(world["b"], world["bases"], registry)
    assert [s for seg, s in b._chain if seg.kind == "shared"] == shared
    b.close()
    zero = load_classifier(world["zero"], world["bases"], registry)  # another plan: the whole-base session
    zero.close()  # two idle plans, one kept: the older one goes
    assert [(p["masked"], p["refs"]) for p in registry.stats()["plans"]] == [(0, 0)]


def test_materialised_model_carries_metadata_and_matches_served_outputs(world, tmp_path):
    path = materialize_onnx(world["a"], world["bases"], tmp_path / "model.onnx")
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    props = {p.key: p.value for p in model.metadata_props}
    assert json.loads(props["labels"]) == LABELS
    assert json.loads(props["preprocess"]) == world["backbone"].preprocess
    assert json.loads(props["head"])["kind"] == "zero-shot" and props["base_id"] == world["base"].base_id
    assert not (tmp_path / "model.onnx.data").exists() and len(model.graph.output) == 1
    served = load_classifier(world["a"], world["bases"], BaseRegistry(world["bases"], "cpu"))
    got = make_session(path, "cpu").run(None, {"image": world["x"]})[0]
    np.testing.assert_allclose(got, served.logits(world["x"]), rtol=1e-4, atol=1e-4)
    # the base graph has exactly the baked model's nodes: materialising adds only the head's few nodes
    ref = onnx.load(str(_baked_reference(world["bits_a"], tmp_path / "ref.onnx")))
    assert len(model.graph.node) <= len(ref.graph.node) + 6


def test_materialised_cache_is_bounded_and_reused(world, tmp_path):
    cache = tmp_path / "cache"
    first = materialized_model_path(world["a"], world["bases"], cache, max_cache_bytes=10**9)
    stamp = first.stat().st_mtime_ns
    assert materialized_model_path(world["a"], world["bases"], cache, 10**9) == first
    assert first.stat().st_ino and first.stat().st_size > 0
    second = materialized_model_path(world["b"], world["bases"], cache, max_cache_bytes=first.stat().st_size)
    assert second != first and second.is_file() and not first.exists()  # over the bound: least recent goes
    assert [p.name for p in cache.iterdir()] == [second.name]
    assert stamp  # (the reuse above did not rewrite the file)


def test_deleting_a_classifier_never_touches_the_base(world, tmp_path):
    version = shutil.copytree(world["a"], tmp_path / "doomed")
    before = sorted((p.name, p.stat().st_size) for p in world["base"].path.iterdir())
    registry = BaseRegistry(world["bases"], "cpu")
    clf = load_classifier(version, world["bases"], registry)
    clf.close()
    shutil.rmtree(version)
    assert sorted((p.name, p.stat().st_size) for p in world["base"].path.iterdir()) == before
    assert (world["base"].path / BASE_JSON).is_file()
    load_classifier(world["b"], world["bases"], registry).run(world["x"])


def test_old_model_dir_with_baked_onnx_still_serves(world, tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    _baked_reference(world["bits_a"], old / "model.onnx")
    shutil.copy(DATA / "old-format-v1.rmtm", old / "mask.rmtm")
    (old / "manifest.json").write_text(json.dumps({"labels": LABELS, "preprocess": world["backbone"].preprocess,
                                                   "backbone": "rmt-tiny-vit", "method": "r-amt"}))
    clf = load_classifier(old, world["bases"], BaseRegistry(world["bases"], "cpu"))
    assert isinstance(clf, OnnxClassifier)
    served = load_classifier(world["a"], world["bases"], BaseRegistry(world["bases"], "cpu"))
    np.testing.assert_allclose(clf.run(world["x"]), served.run(world["x"]), atol=1e-5)
    assert materialized_model_path(old, world["bases"], tmp_path / "cache", 10**9) == old / "model.onnx"


def test_a_named_mask_file_that_is_missing_is_an_error(world, tmp_path):
    version = shutil.copytree(world["a"], tmp_path / "broken")
    (version / json.loads((version / "manifest.json").read_text())["mask_file"]).unlink()
    with pytest.raises(FileNotFoundError):
        load_classifier(version, world["bases"], BaseRegistry(world["bases"], "cpu"))


def test_old_rmtm_mask_file_serves_on_a_base(world, tmp_path):
    bits, meta = load_masks(DATA / "old-format-v1.rmtm")
    assert meta == {"backbone": "rmt-tiny-vit", "method": "r-amt"}
    version = tmp_path / "v1mask"
    version.mkdir()
    shutil.copy(DATA / "old-format-v1.rmtm", version / "mask.rmtm")
    head = Head.load(world["a"] / "head.npz")
    head.save(version / "head.npz")
    manifest = json.loads((world["a"] / "manifest.json").read_text())
    manifest.pop("mask_file")  # manifests before the new codec named no mask file: mask.rmtm is the default
    (version / "manifest.json").write_text(json.dumps(manifest))
    clf = load_classifier(version, world["bases"], BaseRegistry(world["bases"], "cpu"))
    assert len(clf.masked) == 2  # in_proj and conv1 flip; out_proj is all ones
    full = {n: np.ones(tuple(p.shape), bool) for n, p in world["backbone"].model.named_parameters()
            if n in world["base"].maskable}
    ref_bits = {**full, **bits}
    ref = make_session(_baked_reference(ref_bits, tmp_path / "ref.onnx"), "cpu")
    np.testing.assert_allclose(clf.logits(world["x"]), ref.run(None, {"image": world["x"]})[0], rtol=1e-4, atol=1e-4)


def test_a_classifier_with_one_own_session_runs_its_head_inside_it(world):
    """Small backbones run as one session per masked classifier; the head is appended to it (as in today's baked
    model) and must give what the numpy head gives on the session's features."""
    registry = BaseRegistry(world["bases"], "cpu")  # default threshold: the toy base is one own segment
    a = load_classifier(world["a"], world["bases"], registry)
    assert a.own_sessions == 1 and a._head_in_session
    session = a._chain[0][1]
    assert [o.name for o in session.get_outputs()][0] == "rmt_logits"
    x = world["x"]
    np.testing.assert_allclose(a.logits(x), a.head.logits(a.features(x)), rtol=1e-5, atol=1e-5)
    zero = load_classifier(world["zero"], world["bases"], registry)
    assert not zero._head_in_session  # the shared base session carries no classifier's head
    np.testing.assert_allclose(zero.logits(x), zero.head.logits(zero.features(x)), rtol=1e-6, atol=1e-6)


def test_small_batches_run_the_chain_bound_to_reused_buffers_and_stay_exact_under_threads(world):
    """The second call of a batch shape (<= BIND_MAX_BATCH) runs through IO bindings into reused buffers; it
    must give exactly what the plain chain gives, including when threads call at once (each call takes its
    own buffer set) and for shapes that keep the plain path."""
    from concurrent.futures import ThreadPoolExecutor

    from rmt_core.runtime import BIND_MAX_BATCH

    registry = BaseRegistry(world["bases"], "cpu", shared_min_bytes=0)
    a = load_classifier(world["a"], world["bases"], registry)
    assert len(a._chain) > 2
    rng = np.random.default_rng(5)
    batches = [rng.normal(size=(n, 3, *world["backbone"].image_size)).astype(np.float32)
               for n in (1, 1, 2, 3, 1, 2, BIND_MAX_BATCH + 1)]
    plain = [a.features(b) for b in batches]  # first call per shape: the plain path, which learns the shapes
    assert set(a._shapes) == {b.shape for b in batches if b.shape[0] <= BIND_MAX_BATCH}
    bound = [a.features(b) for b in batches]
    for p, b in zip(plain, bound):
        np.testing.assert_array_equal(p, b)
    assert set(a._bound) == set(a._shapes)  # the bound path ran for every learned shape
    assert (BIND_MAX_BATCH + 1, 3, *world["backbone"].image_size) not in a._bound
    with ThreadPoolExecutor(6) as pool:
        for _ in range(3):
            got = list(pool.map(a.features, batches * 3))
            for p, g in zip(plain * 3, got):
                np.testing.assert_array_equal(p, g)
    assert all(len(idle) <= 2 for idle in a._bound.values())
    out = a.features(batches[0])
    out[:] = 0  # a caller owns what it gets: the next call is not affected
    np.testing.assert_array_equal(a.features(batches[0]), plain[0])


def test_mixed_batches_return_what_each_classifier_returns_alone(world, tmp_path, monkeypatch):
    """A micro-batch that mixes classifiers of one base and mask set runs the shared segments once over every
    row and each classifier's own segments and head on its rows: each request gets what its classifier gives
    alone. Classifiers of another group (zero-shot) in the same batch are answered on their own."""
    import rmt_core.serving as serving

    registry = BaseRegistry(world["bases"], "cpu", shared_min_bytes=0)
    c = _version(tmp_path, "c", world["backbone"], world["base"], _random_bits(world["backbone"], 3, drop=0.5))
    a, b, c = (load_classifier(d, world["bases"], registry) for d in (world["a"], world["b"], c))
    zero = load_classifier(world["zero"], world["bases"], registry)
    assert a.batch_group is not None and a.batch_group == b.batch_group == c.batch_group
    assert zero.batch_group is not None and zero.batch_group != a.batch_group
    groups = []
    real = serving._run_group
    monkeypatch.setattr(serving, "_run_group", lambda clfs, batches: groups.append(len(clfs)) or real(clfs, batches))
    x = np.concatenate([world["x"], world["x"][::-1] * 0.5])
    requests = [(a, x[0:1]), (b, x[1:3]), (zero, x[0:2]), (a, x[2:3]), (c, x[3:6]), (b, x[5:6]), (zero, x[4:5])]
    got = serving.predict_mixed(requests)
    assert groups == [3], "a, b and c did not run as one group"
    for (clf, batch), (probs, outlier) in zip(requests, got):
        alone, _ = clf.predict(batch)
        assert probs.shape == alone.shape
        np.testing.assert_allclose(probs, alone, rtol=1e-5, atol=1e-6)
        assert outlier is None  # these heads score no outliers
    # the answers are told apart: another classifier's probabilities would fail the check above
    assert not np.allclose(a.predict(x[0:1])[0], b.predict(x[0:1])[0], atol=1e-4)


def test_predict_mixed_answers_classifiers_without_a_group_one_by_one(world):
    registry = BaseRegistry(world["bases"], "cpu")  # the toy base: one own session per classifier, no group
    a, b = (load_classifier(world[k], world["bases"], registry) for k in ("a", "b"))
    assert a.batch_group is None
    from rmt_core.serving import predict_mixed

    x = world["x"]
    got = predict_mixed([(a, x[:1]), (b, x), (a, x[1:])])
    np.testing.assert_allclose(got[0][0], a.predict(x[:1])[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[1][0], b.predict(x)[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[2][0], a.predict(x[1:])[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shared_min_bytes", [0, None])
def test_every_fp32_mode_equals_the_baked_model(world, shared_min_bytes):
    """The JIT tier (weights formed per call from the positions the mask drops) gives the baked fp32 model's
    probabilities to 1e-4, alone and after serving other classifiers from the same per-thread buffers, and
    holds only those positions."""
    registry = BaseRegistry(world["bases"], "cpu", shared_min_bytes=shared_min_bytes)
    x = world["x"]
    baked = {k: load_classifier(world[k], world["bases"], registry) for k in ("a", "b", "zero")}
    jit = {k: load_classifier(world[k], world["bases"], registry, mode="jit") for k in ("a", "b", "zero")}
    assert jit["a"].mode == "jit" and jit["zero"].mode == "baked"  # nothing masked: the shared base as it is
    ref = make_session(_baked_reference(world["bits_a"], world["tmp"] / f"ref-jit-{shared_min_bytes}.onnx"), "cpu")
    from rmt_core.runtime import softmax

    expected_a = softmax(ref.run(None, {"image": x})[0])
    for order in (("a", "b", "a", "zero", "b", "a"),):  # switching classifiers restores and re-zeroes the buffers
        for k in order:
            np.testing.assert_allclose(jit[k].predict(x)[0], baked[k].predict(x)[0], rtol=0, atol=1e-4)
            np.testing.assert_allclose(jit[k].run(x[:1]), baked[k].run(x[:1]), rtol=0, atol=1e-4)
    np.testing.assert_allclose(jit["a"].run(x), expected_a, rtol=0, atol=1e-4)
    dropped = sum(int((~bits).sum()) for bits in world["bits_a"].values())
    assert jit["a"].own_tensor_bytes == dropped * 4 < baked["a"].own_tensor_bytes / 4


def test_jit_and_baked_classifiers_mix_in_one_batch(world):
    from rmt_core.serving import predict_mixed

    registry = BaseRegistry(world["bases"], "cpu", shared_min_bytes=0)
    a = load_classifier(world["a"], world["bases"], registry, mode="jit")
    b = load_classifier(world["b"], world["bases"], registry)
    a_baked = load_classifier(world["a"], world["bases"], registry)
    assert a.batch_group == b.batch_group is not None
    x = world["x"]
    got = predict_mixed([(a, x[:2]), (b, x[1:]), (a, x[2:])])
    np.testing.assert_allclose(got[0][0], a_baked.predict(x[:2])[0], rtol=0, atol=1e-4)
    np.testing.assert_allclose(got[1][0], b.predict(x[1:])[0], rtol=0, atol=1e-5)
    np.testing.assert_allclose(got[2][0], a_baked.predict(x[2:])[0], rtol=0, atol=1e-4)


def test_predict_answers_outlier_scores_from_the_features_the_head_receives(world, tmp_path):
    """predict = (probs, outlier): in the head-in-session path the session's features feed the open-set score,
    in the numpy path the chain's; an old head without open-set data answers None."""
    import shutil

    registry = BaseRegistry(world["bases"], "cpu")
    x = world["x"]
    for name in ("a", "zero"):
        plain = load_classifier(world[name], world["bases"], registry)
        probs, outlier = plain.predict(x)
        assert outlier is None and np.allclose(probs, plain.run(x))
        version = tmp_path / name
        shutil.copytree(world[name], version)
        head = Head.load(version / "head.npz")
        head.with_outlier(plain.features(x[:2]))  # "built from" the first two images
        head.save(version / "head.npz")
        served = load_classifier(version, world["bases"], registry)
        assert served._head_in_session == (name == "a")
        probs, outlier = served.predict(x)
        np.testing.assert_allclose(probs, served.run(x), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(outlier, head.outlier_scores(served.features(x)), atol=1e-4)
        assert outlier[:2].max() < 0.1  # the images it was built from are not outliers


def test_the_build_time_mode_check_passes_jit_and_catches_a_jit_that_answers_otherwise(world, monkeypatch):
    """check_mode_parity (run by every build) compares the jit tier with baked fp32 on one image and a batch;
    a jit path that forms the wrong weights is refused, a version masking nothing needs no check."""
    from rmt_core.runtime import JIT_PARITY_ATOL, check_mode_parity

    ok = check_mode_parity(world["a"], world["bases"], world["x"])
    assert ok["allowed"] and ok["max_abs_dp"] <= JIT_PARITY_ATOL and ok["n"] == 3
    assert check_mode_parity(world["zero"], world["bases"], world["x"]) is None
    with pytest.raises(ValueError, match="images"):
        check_mode_parity(world["a"], world["bases"], world["x"][0])

    real = ServedClassifier._weights

    def wrong(self, seg):  # the jit tier forming the base's unmasked weights: what a broken scatter would do
        return {n: self._plan.base_values[n] for n in real(self, seg)}

    monkeypatch.setattr(ServedClassifier, "_weights", wrong)
    bad = check_mode_parity(world["a"], world["bases"], world["x"])
    assert not bad["allowed"] and bad["max_abs_dp"] > JIT_PARITY_ATOL


def test_a_version_whose_jit_check_failed_is_served_baked_in_jit_mode(world, tmp_path):
    from rmt_core.runtime import JIT_PARITY_KEY

    version = tmp_path / "refused"
    shutil.copytree(world["a"], version)
    manifest = json.loads((version / "manifest.json").read_text())
    manifest[JIT_PARITY_KEY] = {"max_abs_dp": 0.3, "atol": 1e-4, "n": 3, "allowed": False}
    (version / "manifest.json").write_text(json.dumps(manifest))
    registry = BaseRegistry(world["bases"], "cpu")
    refused = load_classifier(version, world["bases"], registry, mode="jit")
    assert refused.mode == "baked"
    baked = load_classifier(world["a"], world["bases"], registry)
    np.testing.assert_array_equal(refused.run(world["x"]), baked.run(world["x"]))
    assert load_classifier(world["a"], world["bases"], registry, mode="jit").mode == "jit"
