"""int8 serving: the build-time guard, what it records, and what a version then serves (rmt_core/quantize.py)."""
import json
import shutil

import numpy as np
import onnx
import pytest

from rmt_core.config import TuneConfig
from rmt_core.head import Head
from rmt_core.materialize import materialize_onnx
from rmt_core.pipeline import build_classifier
from rmt_core.preprocess import PreprocessConfig, preprocess_batch
from rmt_core.int8_guard import int8_guard
from rmt_core.quantize import MAX_ACCURACY_DROP, MIN_AGREEMENT
from rmt_core.runtime import BaseRegistry, ServedClassifier, load_classifier, make_session
from rmt_core.world import sample_class

GUARD_FIELDS = {"allowed", "agreement", "accuracy_fp32", "accuracy_int8", "max_abs_dp", "n", "min_agreement",
                "max_accuracy_drop"}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A classifier built by the pipeline with a tuned mask (pinned), on the project's own backbone."""
    tmp = tmp_path_factory.mktemp("int8")
    classes = ["red circle", "blue square", "green triangle"]
    samples = [(img, name) for name in classes for img, _ in sample_class(name, 10, seed=1)]
    config = TuneConfig(backbone="rmt-world-vit", pretrained="builtin", epochs=1, min_steps=12, batch_size=8,
                        learning_rate=1e-3, holdout=0.3, select="mask")
    manifest = build_classifier(samples, config, tmp / "clf", bases_dir=tmp / "bases", device="cpu")
    test = [(img, name) for name in classes for img, _ in sample_class(name, 12, seed=7)]  # images the build never saw
    return {"tmp": tmp, "dir": tmp / "clf", "bases": tmp / "bases", "manifest": manifest, "samples": samples,
            "test": test, "labels": manifest["labels"]}


def _batch(clf, samples):
    return preprocess_batch([img for img, _ in samples], clf.preprocess_config)


def test_the_build_records_the_int8_guard_on_every_image_it_has(built):
    record = built["manifest"]["int8"]
    assert set(record) == GUARD_FIELDS
    assert record["n"] == len(built["samples"])  # training and held-out images alike
    assert record["min_agreement"] == MIN_AGREEMENT and record["max_accuracy_drop"] == MAX_ACCURACY_DROP
    assert json.loads((built["dir"] / "manifest.json").read_text())["int8"] == record
    # the rule, as recorded
    assert record["allowed"] == (record["agreement"] >= MIN_AGREEMENT
                                 and record["accuracy_int8"] >= record["accuracy_fp32"] - MAX_ACCURACY_DROP)
    assert record["allowed"], record  # a real tuned classifier on its own backbone: int8 keeps its answers


def test_int8_answers_agree_with_fp32_on_generated_images(built):
    registry = BaseRegistry(built["bases"], "cpu")
    fp32 = load_classifier(built["dir"], registry=registry)
    int8 = load_classifier(built["dir"], registry=registry, precision="int8")
    assert (fp32.precision, int8.precision) == ("fp32", "int8")
    assert int8.mode == "baked"
    assert {p["precision"] for p in registry.stats()["plans"]} == {"fp32", "int8"}  # other sessions, never mixed
    assert int8.batch_group is None  # batched with itself only: its activation scales depend on the batch
    batch = _batch(fp32, built["test"])
    p32, p8 = fp32.run(batch), int8.run(batch)
    assert (p32.argmax(1) == p8.argmax(1)).mean() >= MIN_AGREEMENT
    assert 0 < np.abs(p32 - p8).max() < 0.05  # really another computation, close to fp32
    # image by image too: int8 quantizes activations per batch
    single = np.concatenate([int8.run(batch[i:i + 1]) for i in range(len(batch))])
    assert (single.argmax(1) == p32.argmax(1)).mean() >= MIN_AGREEMENT
    # the jit setting does not apply to int8: it is baked, the setting's fp32 classifiers stay jit
    assert load_classifier(built["dir"], registry=registry, mode="jit", precision="int8").mode == "baked"


def test_a_version_without_a_passed_guard_serves_fp32(built, tmp_path):
    for name, record in (("none", None), ("failed", {**built["manifest"]["int8"], "allowed": False})):
        version = tmp_path / name
        shutil.copytree(built["dir"], version)
        manifest = json.loads((version / "manifest.json").read_text())
        manifest.pop("int8")
        if record is not None:
            manifest["int8"] = record
        (version / "manifest.json").write_text(json.dumps(manifest))
        clf = load_classifier(version, registry=BaseRegistry(built["bases"], "cpu"), precision="int8")
        assert clf.precision == "fp32", name
    with pytest.raises(ValueError, match="precision 'int4'"):
        load_classifier(built["dir"], built["bases"], precision="int4")


def _fragile_head(clf, batch: np.ndarray) -> Head:
    """Two classes split by a direction along which these images' fp32 features differ only by 1e-4 of their
    main spread (a direction orthogonal to every difference between them, tilted by 1e-4 towards the main
    one): fp32 decides on differences far below int8's rounding, so int8 answers close to a coin flip there."""
    f = clf.features(batch)
    f = f / np.linalg.norm(f, axis=1, keepdims=True)
    centred = f - f.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=True)
    rank = int(np.linalg.matrix_rank(centred))
    assert rank < f.shape[1], "needs fewer images than feature dimensions"
    v = vt[rank] + 1e-4 * vt[0]  # vt[rank]: no image differs from another along it
    v /= np.linalg.norm(v)
    m = float(np.median(f @ v))
    return Head(W=np.stack([v, -v]).astype(np.float32), b=np.array([-m, m], np.float32) * 100.0, scale=100.0)


def test_the_guard_rejects_a_classifier_int8_cannot_keep(built, tmp_path):
    """A real classifier whose class margins on its images lie far below int8's error: agreement really fails
    (the thresholds are the defaults, nothing is stubbed); the untouched classifier passes on the same images."""
    clf = ServedClassifier(built["dir"], BaseRegistry(built["bases"], "cpu"))
    batch = _batch(clf, built["samples"])
    version = tmp_path / "fragile"
    shutil.copytree(built["dir"], version)
    manifest = json.loads((version / "manifest.json").read_text())
    _fragile_head(clf, batch).save(version / manifest["head_file"])
    manifest["labels"] = ["above", "below"]
    (version / "manifest.json").write_text(json.dumps(manifest))
    fragile = ServedClassifier(version, BaseRegistry(built["bases"], "cpu"))
    targets = np.concatenate([fragile.run(batch[i:i + 32]) for i in range(0, len(batch), 32)]).argmax(1)
    assert 0.3 < targets.mean() < 0.7  # fp32 splits the images between the two classes
    record = int8_guard(version, built["bases"], batch, targets)
    assert record["allowed"] is False, record
    assert record["agreement"] < MIN_AGREEMENT and record["accuracy_fp32"] == 1.0
    assert record["accuracy_int8"] < record["accuracy_fp32"] - MAX_ACCURACY_DROP
    manifest["int8"] = record
    (version / "manifest.json").write_text(json.dumps(manifest))
    assert load_classifier(version, built["bases"], precision="int8").precision == "fp32"

    ok = int8_guard(built["dir"], built["bases"], batch, [built["labels"].index(name) for _, name in built["samples"]])
    assert ok["allowed"] is True and ok["agreement"] >= MIN_AGREEMENT
    with pytest.raises(ValueError, match="int8 guard needs images"):
        int8_guard(version, built["bases"], batch, targets[:-1])


def test_int8_export_runs_anywhere_and_agrees(built, tmp_path):
    fp32_path = materialize_onnx(built["dir"], built["bases"], tmp_path / "fp32.onnx")
    int8_path = materialize_onnx(built["dir"], built["bases"], tmp_path / "int8.onnx", precision="int8")
    ops = {n.op_type for n in onnx.load(str(int8_path)).graph.node}
    assert "DynamicQuantizeLinear" in ops or "DynamicQuantizeMatMul" in ops
    props = {p.key: p.value for p in onnx.load(str(int8_path)).metadata_props}
    assert props["precision"] == "int8" and json.loads(props["labels"]) == built["labels"]
    assert int8_path.stat().st_size < 0.5 * fp32_path.stat().st_size
    clf = load_classifier(built["dir"], built["bases"], providers="cpu")
    batch = _batch(clf, built["test"])
    a = make_session(fp32_path, "cpu").run(None, {"image": batch})[0]
    b = make_session(int8_path, "cpu").run(None, {"image": batch})[0]
    assert (a.argmax(1) == b.argmax(1)).mean() >= MIN_AGREEMENT
    with pytest.raises(ValueError, match="precision"):
        materialize_onnx(built["dir"], built["bases"], tmp_path / "x.onnx", precision="fp16")
    assert PreprocessConfig.from_dict(json.loads(props["preprocess"])) == clf.preprocess_config
