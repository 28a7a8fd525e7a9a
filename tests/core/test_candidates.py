"""Candidates and selection (rmt_core/candidates.py): features in, the one classifier to publish out."""
import io
import json

import numpy as np
import pytest

from rmt_core.candidates import (PAIRED_CONFIDENCE, ZERO_SHOT_CONFIDENCE, Candidate, Selection, fit_linear_probe,
                                 paired_better, paired_evidence, pick, stratified_folds)
from rmt_core.config import TuneConfig
from rmt_core.head import Head

C, D = 4, 32
LABELS = ["a", "b", "c", "d"]


def _world(seed=0, informative_text=False):
    """Class means in feature space; the zero-shot head's text embeddings are unrelated to them unless
    ``informative_text`` (then they point roughly at the means)."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(C, D))
    text = means + 0.7 * rng.normal(size=(C, D)) if informative_text else rng.normal(size=(C, D))
    return rng, means, Head.zero_shot(text, 30.0)


def _draw(rng, means, n_per, noise=0.9):
    y = np.repeat(np.arange(C), n_per)
    return means[y] + noise * rng.normal(size=(len(y), D)), y


def _judged(name, correct):
    correct = np.asarray(correct, dtype=float)
    judged = ~np.isnan(correct)
    return Candidate(name, Head.zero_shot(np.eye(2), 1.0), "mask" in name, float(correct[judged].mean()),
                     int(judged.sum()), "k-fold", correct=correct)


def test_paired_rule_takes_a_clear_margin_and_leaves_a_tie_to_the_simpler():
    rng = np.random.default_rng(0)
    base = (rng.random(40) < 0.6).astype(float)
    better = base.copy()
    better[np.flatnonzero(base == 0)[:8]] = 1  # right on 8 images the other got wrong, wrong on none of its own
    assert paired_better(better, base) and not paired_better(base, better)
    assert not paired_better(base, base)  # a tie: no image where they differ
    # a tie in accuracy made of different images (4 wins, 4 losses) is no evidence either way
    swapped = base.copy()
    swapped[np.flatnonzero(base == 0)[:4]] = 1
    swapped[np.flatnonzero(base == 1)[:4]] = 0
    assert swapped.mean() == base.mean() and not paired_better(swapped, base)
    # 1 win of 1 disagreement on 10 images is not a clear margin: the simpler candidate stays
    small = np.array([1, 1, 1, 0, 0, 1, 1, 0, 1, 1], float)
    one_more = small.copy()
    one_more[3] = 1
    assert not paired_better(one_more, small)
    with pytest.raises(ValueError, match="same images"):
        paired_better(small, base)

    chosen, why, decisions = pick([_judged("zero-shot", base), _judged("head", better)])
    assert chosen.name == "head" and "beat zero-shot" in why and decisions[0]["switched"]
    chosen, why, _ = pick([_judged("zero-shot", base), _judged("head", swapped)])
    assert chosen.name == "zero-shot" and "simpler one stays" in why
    # masks are judged on fewer images (the holdout, NaN elsewhere): compared only where both were judged
    held = np.full(40, np.nan)
    held[-10:] = 1.0
    mask = _judged("mask", held)
    chosen, _, decisions = pick([_judged("zero-shot", base), _judged("head", better), mask])
    assert decisions[-1]["n"] == 10 and decisions[-1]["challenger"] == "mask"
    assert pick([_judged("zero-shot", base), _judged("head", better)], "zero-shot")[0].name == "zero-shot"
    with pytest.raises(ValueError, match="not built"):
        pick([_judged("zero-shot", base)], "mask")


def test_leaving_zero_shot_takes_stronger_evidence_than_choosing_among_fitted_candidates():
    """4 wins to 1 on 20 images (P(better) ~0.89) is enough to prefer one fitted candidate over another, not to
    replace zero-shot, the safe default (P >= 0.95); 6 wins to 0 (P ~0.99) replaces it."""
    base = np.array([1] * 12 + [0] * 8, float)
    some = base.copy()
    some[12:16] = 1  # 4 wins
    some[0] = 0  # 1 loss
    ev = paired_evidence(some, base)
    assert PAIRED_CONFIDENCE <= ev["p_better"] < ZERO_SHOT_CONFIDENCE, ev
    chosen, why, decisions = pick([_judged("zero-shot", base), _judged("head", some)])
    assert chosen.name == "zero-shot" and decisions[0]["needed"] == ZERO_SHOT_CONFIDENCE and "0.95" in why
    # the same margin between two fitted candidates (head vs mask+head) switches
    head = _judged("head", base)
    chosen, why, decisions = pick([_judged("zero-shot", np.zeros(20)), head, _judged("mask+head", some)])
    assert decisions[0]["switched"] and decisions[-1]["champion"] == "head" and decisions[-1]["needed"] == 0.8
    assert chosen.name == "mask+head"
    clear = base.copy()
    clear[12:18] = 1  # 6 wins, no loss
    chosen, why, _ = pick([_judged("zero-shot", base), _judged("head", clear)])
    assert chosen.name == "head" and ">= 0.95" in why


def test_challengers_that_face_zero_shot_share_its_confidence():
    """Three challengers get three chances to look lucky, so they share zero-shot's 0.95, each in proportion to
    the images it was judged on (weighted Bonferroni). 4 wins and no loss on 10 holdout images (P ~0.97)
    replaces zero-shot when the mask is the only challenger, not beside a head judged on 40 images and a second
    mask candidate (each mask needs 1 - 0.05 * 10/60); 7 wins and no loss (P ~0.996) does. The head, judged on
    every image, keeps most of the allowance (1 - 0.05 * 40/60)."""
    zs = np.full(40, np.nan)
    zs[-10:] = [1, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    lucky = zs.copy()
    lucky[-9:-5] = 1  # right on 4 holdout images zero-shot got wrong, wrong on none of its own
    head = _judged("head", np.where(np.isnan(zs), 0.0, zs))  # judged on every image, no better than zero-shot
    assert paired_better(lucky, zs) and paired_evidence(lucky, zs)["p_better"] < 1 - 0.05 / 6
    alone, _, decisions = pick([_judged("zero-shot", zs), _judged("mask", lucky)])
    assert alone.name == "mask" and decisions[0]["needed"] == 0.95
    chosen, why, decisions = pick([_judged("zero-shot", zs), head, _judged("mask", lucky), _judged("mask+head", zs)])
    assert chosen.name == "zero-shot" and [d["needed"] for d in decisions] == [0.9667, 0.9917, 0.9917]
    assert not any(d["switched"] for d in decisions) and "0.9917 for mask" in why
    clearer = lucky.copy()
    clearer[-5:-2] = 1  # three more wins: 7 to none
    chosen, why, decisions = pick([_judged("zero-shot", zs), head, _judged("mask", clearer), _judged("mask+head", zs)])
    assert chosen.name == "mask" and decisions[1]["switched"] and ">= 0.9917" in why
    # a head with 4.67 wins to none on 40 images (P ~0.98, the issue-17 5x8 build) still replaces zero-shot
    # beside two masks judged on 10 holdout images
    sure = np.array([1.0] * 10 + [0.0] * 30)
    ahead = sure.copy()
    ahead[10:15] = [1, 1, 1, 1, 2 / 3]
    assert 0.9667 < paired_evidence(ahead, sure)["p_better"] < 1 - 0.05 / 3
    chosen, _, _ = pick([_judged("zero-shot", sure), _judged("head", ahead), _judged("mask", zs), _judged("mask+head", zs)])
    assert chosen.name == "head"


def test_heads_are_judged_by_nested_cv_so_their_settings_do_not_flatter_them():
    """Each image's judging logits come from the whole head procedure (settings chosen by its own inner CV) run
    on the OTHER images only; the flat CV judged the head by the folds that had chosen its settings."""
    from rmt_core.candidates import cross_validated_head, fit_best_head

    rng, means, zs = _world(3)
    x, y = _draw(rng, means, 2)  # 8 images: leave-one-out
    fit, correct, logits, method, folds, repeats = cross_validated_head(x, y, zs, seed=0)
    assert method == "nested leave-one-out" and folds == 8 and repeats == 1
    for i in range(len(y)):
        rest = np.arange(len(y)) != i
        inner = fit_best_head(x[rest], y[rest], zs, seed=0).head
        np.testing.assert_allclose(logits[i], inner.logits(x[i:i + 1])[0], rtol=1e-5, atol=1e-5)
        assert correct[i] == float(logits[i].argmax() == y[i])
    published = fit_best_head(x, y, zs, seed=0).head  # the published head: the same procedure on every image
    np.testing.assert_allclose(fit.head.logits(x), published.logits(x), rtol=1e-5, atol=1e-5)
    # pure noise: the flat CV's pick of the best settings looks like a gain, the nested judgement does not
    gains_flat, gains_nested = [], []
    for seed in range(6):
        r = np.random.default_rng(100 + seed)
        noise, labels = r.normal(size=(6 * C, D)), np.repeat(np.arange(C), 6)
        flat = fit_best_head(noise, labels, zs, seed=seed).oof_logits.argmax(1) == labels
        _, nested, *_ = cross_validated_head(noise, labels, zs, seed=seed)
        z0 = zs.logits(noise).argmax(1) == labels
        gains_flat.append(flat.mean() - z0.mean())
        gains_nested.append(nested.mean() - z0.mean())
    assert np.mean(gains_nested) < np.mean(gains_flat), (gains_nested, gains_flat)


def test_linear_probe_fixes_an_uninformative_text_init_and_strong_decay_stays_zero_shot():
    rng, means, zs = _world()
    x, y = _draw(rng, means, 8)
    xt, yt = _draw(rng, means, 100)
    fit = fit_linear_probe(x, y, zs)
    zs_acc = (zs.logits(xt).argmax(1) == yt).mean()
    probe_acc = (fit.head.logits(xt).argmax(1) == yt).mean()
    assert probe_acc > zs_acc + 0.3, (zs_acc, probe_acc)
    assert fit.method == "k-fold" and fit.oof_logits.shape == (len(y), C)
    stiff = fit_linear_probe(x, y, zs, weight_decays=[1e4])
    np.testing.assert_allclose(stiff.head.logits(xt), zs.logits(xt), atol=0.05)  # pulled back to the init
    assert fit_linear_probe(x[:8], y[:8], zs).method == "leave-one-out"


def test_folds_are_stratified_and_seeded():
    y = np.repeat(np.arange(3), 7)
    fold = stratified_folds(y, 5, seed=1)
    assert np.array_equal(fold, stratified_folds(y, 5, seed=1))
    for c in range(3):
        assert len(set(fold[y == c])) == 5  # every class spread over every fold


def _selection(config=None, seed=0, informative_text=False, n_train=8, n_held=4, on_candidate=None):
    rng, means, zs = _world(seed, informative_text)
    x, y = _draw(rng, means, n_train)
    xh, yh = _draw(rng, means, n_held) if n_held else (None, [])
    sel = Selection(zs, LABELS, config or TuneConfig(), y, yh, train_indices=list(range(len(y))),
                    held_indices=list(range(len(y), len(y) + len(yh))), on_candidate=on_candidate)
    return sel, rng, means, (x, xh)


def test_a_destroyed_encoder_loses_to_zero_shot_and_a_clearly_better_one_wins():
    seen = []
    sel, rng, means, (x, xh) = _selection(informative_text=True, on_candidate=lambda *a: seen.append(a))
    sel.add_zero_shot(x, xh)
    sel.add_head(x, xh)
    assert [s[0] for s in seen] == ["zero-shot", "head"] and seen[0][2] is False  # previews before tuning
    noise = np.random.default_rng(9)
    sel.add_masked(noise.normal(size=x.shape), noise.normal(size=xh.shape))  # what lr=1 leaves of an encoder
    chosen, report = sel.finish()
    assert chosen.name in ("zero-shot", "head") and not chosen.uses_mask
    assert report["published_accuracy"] >= report["zero_shot_accuracy"]
    assert any("tuned below zero-shot" in w for w in report["warnings"])

    sel, rng, means, (x, xh) = _selection(seed=1)
    sel.add_zero_shot(x, xh)
    sel.add_head(x, xh)
    # the tuned encoder separates the classes perfectly (features = scaled text embeddings of the true class)
    clean = lambda n: np.repeat(sel.zero_shot.W, n, axis=0) + 0.01 * rng.normal(size=(C * n, D))  # noqa: E731
    sel.add_masked(clean(8), clean(4))
    chosen, report = sel.finish()
    assert chosen.uses_mask and report["published"] == "mask" and report["published_accuracy"] == 1.0


def test_report_has_every_field_with_consistent_values():
    sel, rng, means, (x, xh) = _selection(TuneConfig(unknown=True), informative_text=True)
    sel.add_zero_shot(x, xh)
    sel.add_head(x, xh)
    chosen, report = sel.finish(["NO MASK FLIPPED: ..."])
    for key in ("n_holdout", "zero_shot_accuracy", "tuned_accuracy", "published", "published_accuracy", "candidates",
                "validated_by", "warnings", "ece_before", "ece_after", "temperature", "min_score",
                "per_class_accuracy", "misclassified", "confusion_matrix"):
        assert key in report, key
    # heads are judged on every image (train and holdout alike), the holdout is kept for the mask only
    assert report["n_holdout"] == 16
    assert report["validated_by"] == {"method": "repeated nested k-fold", "n": 48, "folds": 5, "repeats": 3}
    assert {r["name"] for r in report["candidates"]} == {"zero-shot", "head"}
    rows = {r["name"]: r for r in report["candidates"]}
    assert rows["head"]["n"] == rows["zero-shot"]["n"] == 48 and rows["head"]["refit"] == "all 48 images"
    assert report["temperature"] == chosen.head.temperature > 0 and 0 < report["min_score"] < 1
    # the open-set reference is the class texts (one row per class), scaled so that 0.5 is the default threshold
    assert report["max_outlier"] == 0.5 and chosen.head.has_outlier and len(chosen.head.outlier_keys) == len(LABELS)
    assert chosen.head.outlier_reference == "class-text"
    assert report["unknown_defaults"]["rejected_in_distribution"]["either"] <= 0.1
    assert "NO MASK FLIPPED: ..." in report["warnings"]
    conf = np.array(report["confusion_matrix"])
    assert conf.sum() == 48 and np.trace(conf) / 48 == pytest.approx(report["published_accuracy"])
    assert len(report["misclassified"]) == 48 - np.trace(conf)
    assert all(0 <= m["index"] < 48 and m["true"] != m["predicted"] for m in report["misclassified"])


def test_without_a_holdout_heads_are_cross_validated_and_masks_are_not_tuned():
    sel, rng, means, (x, _) = _selection(n_train=3, n_held=0)
    assert not sel.wants_masks and sel.validation.method == "repeated nested k-fold"  # 12 images > LOO_MAX
    sel.add_zero_shot(x)
    head = sel.add_head(x)
    assert head.method == "repeated nested k-fold" and head.n == 12
    chosen, report = sel.finish()
    assert chosen.name in ("zero-shot", "head") and report["tuned_accuracy"] is None
    assert any("too few images to validate" in w for w in report["warnings"])
    pinned, _, _, _ = _selection(TuneConfig(select="mask"), n_train=3, n_held=0)
    assert pinned.wants_masks


# ------------------------------------------------------------------ build_classifier (a small real run)
def _build(tmp_path, name, **overrides):
    from rmt_core.pipeline import build_classifier
    from tests.core.toys import colour_task

    samples = colour_task(n_per_class=6)
    settings = dict(backbone="rmt-tiny-vit", pretrained=None, epochs=1, min_steps=12, batch_size=8,
                    learning_rate=1e-3, holdout=0.34, augment=False)
    events = []
    manifest = build_classifier(samples, TuneConfig(**{**settings, **overrides}), tmp_path / name,
                                progress=lambda p: events.append(("step", p.step)),
                                on_candidate=lambda *a: events.append(("candidate", *a)))
    return samples, manifest, events


def test_a_destructive_learning_rate_loses_to_zero_shot_and_previews_come_first(tmp_path):
    samples, manifest, events = _build(tmp_path, "wrecked", learning_rate=1.0, unknown=True)  # the largest allowed
    v = manifest["validation"]
    rows = {r["name"]: r for r in v["candidates"]}
    assert set(rows) == {"zero-shot", "head", "mask", "mask+head"}
    assert manifest["tuned_sparsity"] > 10  # lr=1 switches off a large share of the encoder
    assert v["published"] in ("zero-shot", "head") and manifest["candidate"] == v["published"]
    assert v["published_accuracy"] >= v["zero_shot_accuracy"] and manifest["sparsity"] == 0.0
    assert manifest["mask_file"] is None  # an unpublished mask is not shipped
    assert not [p for p in (tmp_path / "wrecked").iterdir() if p.suffix in (".rmt", ".rmtm")]
    # previews: zero-shot, then the fitted head, both before the first tuning step
    kinds = [e[1] if e[0] == "candidate" else "step" for e in events]
    assert kinds[:2] == ["zero-shot", "head"] and kinds[2] == "step"
    assert isinstance(events[0][2], Head) and events[0][3] is False
    # the report: every field, the published model's numbers
    for key in ("n_holdout", "zero_shot_accuracy", "tuned_accuracy", "published_accuracy", "validated_by", "warnings",
                "ece_before", "ece_after", "temperature", "min_score", "per_class_accuracy", "misclassified"):
        assert key in v, key
    assert v["validated_by"] == {"method": "repeated nested k-fold", "n": 18, "folds": 5, "repeats": 3}
    assert rows["mask"]["n"] == rows["mask+head"]["n"] == 6 and rows["mask"]["method"] == "holdout"
    assert v["tuned_accuracy"] == pytest.approx(rows["mask"]["accuracy"], abs=1e-4)
    assert 0 < v["min_score"] < 1 and v["temperature"] == manifest["head"]["temperature"]
    assert manifest["min_score"] == v["min_score"] and manifest["max_outlier"] == v["max_outlier"]
    for wrong in v["misclassified"]:
        assert samples[wrong["index"]][1] == wrong["true"] != wrong["predicted"]
    published = Head.load(tmp_path / "wrecked" / "head.npz")
    assert published.temperature == v["temperature"]
    # open-set reference: the class texts, its scale fitted on every image
    assert published.has_outlier and len(published.outlier_keys) == len({label for _, label in samples})
    assert v["max_outlier"] == 0.5
    for picture in ("confusion.png", "curve.png", "reliability.png"):
        assert (tmp_path / "wrecked" / picture).read_bytes()[:4] == b"\x89PNG"


def test_when_tuning_clearly_helps_a_tuned_candidate_is_published(tmp_path):
    """Random-init CLIP: the class text embeddings say nothing about colours (zero-shot near chance); fitted
    candidates reach ~100% on the holdout and one of them is published."""
    _, manifest, _ = _build(tmp_path, "good", min_steps=40)
    v = manifest["validation"]
    assert v["published"] != "zero-shot" and v["published_accuracy"] >= v["zero_shot_accuracy"] + 0.3
    assert v["published_accuracy"] == max(r["accuracy"] for r in v["candidates"]) or "tie" in v["why"]


def test_tip_adapter_cache_is_a_head_and_its_out_of_fold_choice_is_honest():
    from rmt_core.candidates import fit_best_head, fit_tip_adapter

    rng, means, zs = _world(seed=2)
    x, y = _draw(rng, means, 6)
    xt, yt = _draw(rng, means, 100)
    fit = fit_tip_adapter(x, y, zs)
    head = fit.head
    assert head.kind == "tip-adapter" and head.cache_keys.shape == (len(y), D) and head.has_cache
    assert (head.logits(xt).argmax(1) == yt).mean() > (zs.logits(xt).argmax(1) == yt).mean() + 0.2
    f = xt / np.linalg.norm(xt, axis=1, keepdims=True)  # the Head formula, written out
    want = zs.scale * f @ zs.W.T + head.cache_alpha * np.exp(-head.cache_beta * (1 - f @ head.cache_keys.T)) @ head.cache_values
    np.testing.assert_allclose(head.logits(xt), want, rtol=1e-4, atol=1e-3)
    best = fit_best_head(x, y, zs)
    assert best.head.kind in ("linear-probe", "tip-adapter")
    assert (best.oof_logits.argmax(1) == y).mean() >= (fit.oof_logits.argmax(1) == y).mean()


def test_config_select_unknown_and_quick_gelu_are_validated():
    assert TuneConfig().select == "auto" and TuneConfig().unknown is False and TuneConfig().quick_gelu == "auto"
    assert TuneConfig.from_dict({"select": "mask+head", "unknown": True}).select == "mask+head"
    with pytest.raises(ValueError, match="select='best'"):
        TuneConfig(select="best")
    assert TuneConfig.from_dict({"quick_gelu": True}).quick_gelu_setting is True
    assert TuneConfig.from_dict({"quick_gelu": "off"}).quick_gelu_setting is False
    assert TuneConfig().quick_gelu_setting is None
    with pytest.raises(ValueError, match="quick_gelu"):
        TuneConfig(quick_gelu="maybe")
    with pytest.raises(ValueError, match="unknown"):
        TuneConfig.from_dict({"unknown": "yes"})


def test_a_failing_preview_hook_does_not_fail_the_build():
    def broken(name, head, uses_mask, accuracy):
        raise OSError("disk full")

    sel, rng, means, (x, xh) = _selection(on_candidate=broken)
    sel.add_zero_shot(x, xh)
    sel.add_head(x, xh)
    chosen, report = sel.finish()
    assert chosen.name in ("zero-shot", "head")
    assert any("preview could not be published" in w for w in report["warnings"])


def test_without_a_holdout_the_build_skips_tuning_and_says_so(tmp_path):
    from rmt_core.pipeline import build_classifier
    from tests.core.toys import colour_task

    samples = colour_task(n_per_class=3)
    seen = []
    manifest = build_classifier(samples, TuneConfig(backbone="rmt-tiny-vit", pretrained=None, min_steps=50),
                                tmp_path / "small", progress=seen.append)
    v = manifest["validation"]
    assert v["validated_by"]["method"] == "nested leave-one-out" and v["validated_by"]["n"] == 9 and v["n_holdout"] == 0
    assert {r["name"] for r in v["candidates"]} == {"zero-shot", "head"} and manifest["steps"] == 0
    assert any("too few images to validate" in w for w in manifest["warnings"])
    assert len(seen) == 1 and seen[0].total_steps == 0 and seen[0].eta_seconds == 0


def test_a_one_shot_build_can_publish_a_head_and_says_what_decided():
    """One image per class: leave-one-out would remove each class's only example, so views judge instead."""
    rng, means, _ = _world(seed=4)
    # CLIP-like text: class embeddings close to each other (logits a few units apart at scale 100), unrelated
    # to the classes' images
    zs = Head.zero_shot(np.ones((C, D)) + 0.05 * rng.normal(size=(C, D)), 100.0)
    x, y = _draw(rng, means, 1, noise=0.3)
    sel = Selection(zs, LABELS, TuneConfig(), y, [], train_indices=list(range(C)), held_indices=[])
    assert sel.one_shot and not sel.wants_masks
    views = np.repeat(x, 4, axis=0) + 0.3 * rng.normal(size=(4 * C, D))  # what augmented views look like
    sel.add_views(views, np.repeat(np.arange(C), 4))
    sel.add_zero_shot(x)
    head = sel.add_head(x)
    assert head.method == "augmented views" and head.n == 4 * C and head.head.kind == "tip-adapter"
    chosen, report = sel.finish()
    assert chosen.name == "head" and report["published"] == "head"
    assert "prior" in report["decided_by"] and report["validated_by"]["method"] == "augmented views"
    assert any("single image" in w for w in report["warnings"])
    assert all(0 <= m["index"] < C for m in report["misclassified"])
    xt, yt = _draw(rng, means, 50, noise=0.3)
    assert (chosen.head.logits(xt).argmax(1) == yt).mean() > (zs.logits(xt).argmax(1) == yt).mean() + 0.3


def test_at_one_shot_zero_shot_is_calibrated_on_the_images_not_on_the_harder_views():
    """Zero-shot fits nothing, so every original image is an honest sample for its temperature and min_score;
    augmented views (which judge the candidates at 1 shot) are harder than what users send, and a T fitted on
    them made every score too low."""
    from rmt_core.calibration import calibrate

    rng, means, zs = _world(seed=5, informative_text=True)
    x, y = _draw(rng, means, 1, noise=0.3)
    sel = Selection(zs, LABELS, TuneConfig(), y, [], train_indices=list(range(C)), held_indices=[])
    views = np.repeat(x, 8, axis=0) + 2.5 * rng.normal(size=(8 * C, D))  # much harder than the images
    sel.add_views(views, np.repeat(np.arange(C), 8))
    zero = sel.add_zero_shot(x)
    assert zero.method == "augmented views" and zero.n == 8 * C  # views still judge the comparison
    assert zero.calibration["n"] == C and zero.calibration["source"].startswith("every image")
    assert zero.head.temperature == calibrate(zs.logits(x).astype(np.float64), y)["temperature"]
    assert calibrate(zero.logits, sel.row_targets)["n"] == 8 * C  # not what decided
    sel.add_head(x)
    chosen, report = sel.finish()
    assert chosen.name == "zero-shot"
    rejected = report["unknown_defaults"]["rejected_in_distribution"]
    assert rejected["n"] == C and rejected["either"] <= 0.25  # the same rows (the images) for both thresholds


def test_outlier_score_is_higher_for_classes_the_classifier_was_not_built_on_in_the_generated_world():
    """The builtin world CLIP: shapes the classifier was built on vs shapes it never saw. The score is the
    distance to the nearest class text, scaled on the training images so that 0.5 (the default max_outlier) is a
    tolerance bound: few in-distribution images above it, most unseen shapes above it, even from 2 per class."""
    from rmt_core import world
    from rmt_core.backbones import encode_class_texts, load_backbone
    from rmt_core.candidates import encode_images
    from rmt_core.preprocess import PreprocessConfig, preprocess_batch

    backbone = load_backbone("rmt-world-vit", "builtin", seed=0)
    pre = PreprocessConfig.from_dict(backbone.preprocess)

    def features(classes, n, seed):
        images = [im for c in classes for im, _ in world.sample_class(c, n, seed, size=backbone.image_size[0])]
        return encode_images(backbone.model, preprocess_batch(images, pre))

    built_on = ["red circle", "blue square", "green triangle", "yellow star"]
    never_seen = ["purple hexagon", "orange cross", "pink diamond", "brown crescent"]
    text = encode_class_texts(backbone, built_on, "a photo of a {}.").numpy()
    for shots in (2, 8):
        train = features(built_on, shots, seed=1)
        head = Head.zero_shot(text, 100.0).with_outlier(train)
        assert head.outlier_reference == "class-text" and len(head.outlier_keys) == len(built_on)
        inside = head.outlier_scores(features(built_on, 25, seed=2))
        outside = head.outlier_scores(features(never_seen, 25, seed=3))
        assert inside.shape == outside.shape == (100,) and 0 <= inside.min() and outside.max() <= 1
        auroc = (outside[:, None] > inside[None, :]).mean()
        assert auroc > 0.9 and outside.mean() > inside.mean() + 0.3, (shots, auroc, inside.mean(), outside.mean())
        assert (inside > 0.5).mean() <= 0.1 and (outside > 0.5).mean() >= 0.5, (shots, inside, outside)
        assert (head.outlier_scores(train) > 0.5).mean() <= 0.1  # the images it was built from
    again = Head.from_bytes(head.to_bytes())  # stored in head.npz (float16 keys), same scores
    np.testing.assert_allclose(again.outlier_scores(train[:3]), head.outlier_scores(train[:3]), atol=1e-3)
    assert again.outlier_reference == "class-text"
    # a class added by its text alone: its images are not outliers any more
    grown = head.with_class(encode_class_texts(backbone, ["purple hexagon"], "a photo of a {}.").numpy()[0])
    hexagons = features(["purple hexagon"], 25, seed=3)
    assert len(grown.outlier_keys) == 5 and grown.outlier_scores(hexagons).mean() < head.outlier_scores(hexagons).mean() - 0.3
    assert Head.zero_shot(text, 100.0).outlier_scores(train) is None  # an old head: no score
    # a head stored before issue 16 (training images as the reference, no outlier_reference) still loads and scores
    old = Head(W=head.W, scale=100.0, outlier_keys=train, outlier_center=0.2, outlier_width=0.05)
    with np.load(io.BytesIO(old.to_bytes())) as z:
        arrays = {k: z[k] for k in z.files}
    header = json.loads(arrays["header"].tobytes())
    del header["outlier_reference"]
    arrays["header"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    header_less = Head.from_bytes(buf.getvalue())
    assert header_less.outlier_reference == "images" and header_less.outlier_scores(train).max() < 0.05


def _reference_fit(f, z0, y, n_classes, weight_decay, start=None, max_iter=3000, tol=1e-6):
    """The probe's solver as first written: Nesterov's iteration on (Delta, b) in feature space."""
    from rmt_core.calibration import softmax

    n, _ = f.shape
    onehot = np.eye(n_classes)[y]
    delta, b = (np.zeros((n_classes, f.shape[1])), np.zeros(n_classes)) if start is None else (start[0].copy(),
                                                                                                 start[1].copy())
    step = 1.0 / (1.0 + 2.0 * weight_decay)
    momentum = (1 - np.sqrt(2 * weight_decay * step)) / (1 + np.sqrt(2 * weight_decay * step))
    prev_delta, prev_b = delta.copy(), b.copy()
    for _ in range(max_iter):
        look_delta, look_b = delta + momentum * (delta - prev_delta), b + momentum * (b - prev_b)
        r = (softmax(z0 + f @ look_delta.T + look_b) - onehot) / n
        g_delta, g_b = r.T @ f + 2 * weight_decay * look_delta, r.sum(0) + 2 * weight_decay * look_b
        prev_delta, prev_b = delta, b
        delta, b = look_delta - step * g_delta, look_b - step * g_b
        if np.sqrt((g_delta ** 2).sum() + (g_b ** 2).sum()) < tol:
            break
    return delta, b


def test_problems_solved_together_are_each_the_fit_it_would_be_alone():
    """A k-fold's folds iterate as one stack (_fit_residuals): problems of different sizes (padded to the
    largest), warm starts and weight decays each get the reference fit, stopped where that problem alone
    stops (one converges long before the others), beside a problem with more images than dimensions."""
    from rmt_core.candidates import _fit_residuals, _normalise

    rng = np.random.default_rng(11)
    c, d = 5, 24
    protos = rng.standard_normal((c, d))
    problems = []
    for n, spread, warm in [(12, 1.0, False), (19, 3.0, True), (25, 0.5, False), (40, 1.0, True)]:
        y = np.concatenate([np.arange(c), rng.integers(0, c, n - c)])
        f = _normalise(protos[y] + spread * rng.standard_normal((n, d)))
        z0 = 2.0 * rng.standard_normal((n, c))
        start = (0.1 * rng.standard_normal((c, d)), 0.1 * rng.standard_normal(c)) if warm else None
        problems.append((f, z0, y, start))
    problems.insert(1, (problems[0][0][:3], problems[0][1][:3], problems[0][2][:3], None))  # converges first
    for wd in (1e-3, 0.1):
        got = _fit_residuals(problems, c, wd)
        for (f, z0, y, start), (delta, b) in zip(problems, got):
            want = _reference_fit(f, z0, y, c, wd, start=start)
            assert np.abs(delta - want[0]).max() < 1e-9 and np.abs(b - want[1]).max() < 1e-9, (len(y), wd)
    iterations = []
    for f, z0, y, start in problems[:3]:  # they stop at different steps: the stack really lets one go early
        for cap in range(1, 3000):
            if np.allclose(_reference_fit(f, z0, y, c, 0.1, start=start, max_iter=cap)[0],
                           _reference_fit(f, z0, y, c, 0.1, start=start, max_iter=cap + 1)[0], rtol=0, atol=0):
                iterations.append(cap)
                break
    assert len(set(iterations)) == 3, iterations


@pytest.mark.parametrize("n, d", [(40, 64), (64, 16)])  # fewer images than dimensions (the Gram path), and more
@pytest.mark.parametrize("warm", [False, True])
def test_the_probe_solver_follows_the_feature_space_iteration(n, d, warm):
    """_fit_residual runs Nesterov's iteration through the Gram matrix where there are fewer images than
    dimensions: the same iterates, so the same fit as in feature space, also from another fold's warm start
    and with duplicated images (a singular Gram matrix)."""
    from rmt_core.candidates import _fit_residual, _normalise

    rng = np.random.default_rng(n + d)
    c = 4
    protos = rng.standard_normal((c, d))
    y = np.concatenate([np.arange(c), rng.integers(0, c, n // 2 - c)])
    f = _normalise(protos[y] + rng.standard_normal((len(y), d)))
    f, y = np.concatenate([f, f]), np.concatenate([y, y])  # every image twice
    z0 = 3.0 * rng.standard_normal((len(y), c))
    start = (0.1 * rng.standard_normal((c, d)), 0.1 * rng.standard_normal(c)) if warm else None
    for wd in (1e-4, 1e-2, 1.0):
        got, want = _fit_residual(f, z0, y, c, wd, start=start), _reference_fit(f, z0, y, c, wd, start=start)
        assert np.abs(got[0] - want[0]).max() < 1e-9 and np.abs(got[1] - want[1]).max() < 1e-9, wd
        moved = np.abs(want[0] - (start[0] if warm else 0)).max()
        assert moved > 1e-3  # a real fit, not the start handed back
