"""Issue 17: work done once (view pool, cached teacher), early stop, precision, honest progress."""
import numpy as np
import pytest
import torch

from rmt_core.backbones import encode_class_texts
from rmt_core.config import TuneConfig
from rmt_core.masking import mask_bits
from rmt_core.preprocess import PreprocessConfig, preprocess_batch
from rmt_core.tuning import (BF16_CPU_MIN_WIDTH, PlateauStop, ViewPool, bf16_supported, lr_factor, resolve_precision,
                             train_transform, tune, vision_width, zero_shot_logits)
from tests.core.toys import colour_task, tiny

LABELS = ["blue", "green", "red"]


def _task(n_per_class=8, seed=0):
    samples = colour_task(n_per_class=n_per_class, seed=seed)
    return [i for i, _ in samples], [LABELS.index(lab) for _, lab in samples]


def _config(**kw):
    values = dict(backbone="rmt-tiny-vit", pretrained=None, epochs=1, min_steps=40, batch_size=8,
                  learning_rate=1e-3, warmup_steps=0)
    return TuneConfig(**{**values, **kw})


def test_cached_teacher_logits_equal_recomputed_ones():
    backbone = tiny(seed=3)
    images, targets = _task()
    text = encode_class_texts(backbone, LABELS, "a photo of a {}.")
    result = tune(backbone, images, targets, text, _config(method="r-amt"))
    assert result.sparsity > 0  # the teacher was needed (a mask flipped) ...
    pool = ViewPool(images, train_transform(backbone.preprocess), seed=0, views=4)
    idx, views = [0, 5, 9, 0], [1, 3, 0, 1]

    def teacher(x):
        return zero_shot_logits(backbone.model, x, text)

    cached = pool.teacher_logits(idx, views, teacher)
    assert pool.teacher_computed == 3  # (0, 1) twice in one batch: one forward
    again = pool.teacher_logits(idx, views, teacher)
    assert pool.teacher_computed == 3  # ... and looked up, not recomputed
    recomputed = zero_shot_logits(backbone.model, pool.batch(idx, views), text)
    torch.testing.assert_close(cached, recomputed, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, cached)
    # a view's pixels depend only on (seed, image, view), not on the order views were first drawn in
    other = ViewPool(images, train_transform(backbone.preprocess), seed=0, views=4)
    assert torch.equal(other.view(9, 0), pool.view(9, 0)) and not torch.equal(pool.view(9, 0), pool.view(9, 1))


def test_a_view_is_its_seed_drawn_from_the_cpu_generator_and_leaves_every_generator_as_it_was():
    """The pool seeds torch's CPU generator alone for each view (torch.manual_seed also queued a seed for every
    accelerator, formatting a stack trace each time): the pixels are what torch.manual_seed gave, and the
    global state, CPU and CUDA's queued seeds alike, is the same after a view as before it."""
    backbone = tiny(seed=3)
    images, _ = _task()
    transform = train_transform(backbone.preprocess)
    pool = ViewPool(images, transform, seed=7, views=4)
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    view = pool.view(5, 2)
    assert torch.equal(torch.random.get_rng_state(), state)
    torch.manual_seed((7 * 1_000_003 + 5 * 1009 + 2) % (2**63 - 1))
    assert torch.equal(view, transform(images[5]))
    if not torch.cuda.is_available():  # nothing was queued for a CUDA that is not there
        from torch.cuda import _lazy_seed_tracker  # where torch.manual_seed queues its CUDA seed

        before = _lazy_seed_tracker.get_calls()
        ViewPool(images, transform, seed=8, views=4).view(1, 1)
        assert _lazy_seed_tracker.get_calls() == before


def test_gdr_runs_the_teacher_once_per_view_not_once_per_step():
    backbone = tiny(seed=3)
    images, targets = _task()
    text = encode_class_texts(backbone, LABELS, "a photo of a {}.")
    result = tune(backbone, images, targets, text, _config(method="r-amt", min_steps=60))
    assert 0 < result.teacher_forwards <= result.views_made <= len(images) * 16
    flipped_steps = sum(1 for h in result.history if h["sparsity"] > 0)
    assert result.teacher_forwards < flipped_steps * 8  # what a forward per step would have cost


def test_views_drawn_before_the_first_flip_reuse_the_students_logits_as_the_teachers(monkeypatch):
    import rmt_core.tuning as tuning

    pools = []

    class Recording(tuning.ViewPool):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            pools.append(self)

    monkeypatch.setattr(tuning, "ViewPool", Recording)
    backbone = tiny(seed=3)
    images, targets = _task()
    text = encode_class_texts(backbone, LABELS, "a photo of a {}.")
    result = tune(backbone, images, targets, text, _config(method="r-amt", min_steps=60))
    (pool,) = pools
    assert result.sparsity > 0 and result.teacher_reused > 0  # steps ran both before and after the first flip
    assert result.teacher_reused + result.teacher_forwards == len(pool._teacher) <= result.views_made
    # every stored teacher row, reused or computed, is the zero-shot model's logits of that view
    keys = sorted(pool._teacher)
    stored = torch.stack([pool._teacher[k] for k in keys])
    fresh = zero_shot_logits(backbone.model, pool.batch([i for i, _ in keys], [v for _, v in keys]), text)
    torch.testing.assert_close(stored, fresh, rtol=1e-4, atol=1e-4)
    assert result.summary()["teacher_reused"] == result.teacher_reused


def _validation(n_per_class=5, seed=7):
    samples = colour_task(n_per_class=n_per_class, seed=seed)
    backbone = tiny(seed=3)
    x = preprocess_batch([i for i, _ in samples], PreprocessConfig.from_dict(backbone.preprocess))
    return torch.from_numpy(x), [LABELS.index(lab) for _, lab in samples]


def test_early_stop_is_deterministic_and_says_why():
    images, targets = _task()
    runs = []
    for _ in range(2):
        backbone = tiny(seed=3)
        text = encode_class_texts(backbone, LABELS, "a photo of a {}.")
        rule = PlateauStop(n_validation=15, best_other=None, patience=2, min_fraction=0.1)
        result = tune(backbone, images, targets, text, _config(min_steps=201, eval_every=5), validation=_validation(),
                      stop_rule=rule)
        runs.append((result, mask_bits(backbone.model)))
    (a, bits_a), (b, bits_b) = runs
    assert a.stop_reason.startswith("plateau") and a.steps < a.planned_steps == 201
    assert (a.steps, a.stop_reason, a.checks) == (b.steps, b.stop_reason, b.checks)
    assert all(np.array_equal(bits_a[k], bits_b[k]) for k in bits_a)
    assert a.summary()["stop_reason"] == a.stop_reason and a.summary()["planned_steps"] == 201
    assert a.history[-1]["eta_basis"] == "stopped early" and a.history[-1]["step"] == a.steps


def test_a_mask_that_cannot_catch_the_best_candidate_stops():
    images, targets = _task()
    backbone = tiny(seed=3)
    text = encode_class_texts(backbone, LABELS, "a photo of a {}.")
    x, y = _validation()
    wrong = [(t + 1) % 3 for t in y]  # a holdout the mask can only get wrong, and a head that got 0.9 on it
    rule = PlateauStop(n_validation=15, best_other=0.9, patience=4, min_fraction=0.1)
    result = tune(backbone, images, targets, text, _config(min_steps=201, eval_every=5), validation=(x, wrong),
                  stop_rule=rule)
    assert result.stop_reason.startswith("cannot catch") and result.steps < 201


def test_plateau_rule_waits_for_min_fraction_and_patience():
    rule = PlateauStop(n_validation=10, best_other=None, patience=2, min_fraction=0.5)
    assert [rule.observe(s, a, 100) for s, a in [(10, 0.5), (20, 0.5), (30, 0.5)]] == [None, None, None]
    assert rule.observe(50, 0.5, 100).startswith("plateau")
    rule = PlateauStop(n_validation=10, best_other=0.9, patience=4, min_fraction=0.0)
    assert rule.observe(10, 0.85, 100) is None  # within one validation image: it may still tie
    rule = PlateauStop(n_validation=10, best_other=0.9, patience=4, min_fraction=0.0)
    assert rule.observe(10, 0.5, 100) is None and rule.observe(20, 0.5, 100) is None
    assert rule.observe(30, 0.5, 100).startswith("cannot catch")


def test_bf16_only_where_the_hardware_has_it_and_the_run_records_precision():
    assert bf16_supported("cpu", {"avx2", "avx512f"}) is False
    assert bf16_supported("cpu", {"avx512f", "avx512_bf16"}) is True
    assert bf16_supported("cpu", {"amx_bf16", "amx_tile"}) is True
    wide = BF16_CPU_MIN_WIDTH
    assert resolve_precision("auto", "cpu", {"avx2"}, width=768) == "fp32"
    assert resolve_precision("auto", "cpu", {"avx512_bf16"}, width=wide) == "bf16"
    assert resolve_precision("fp32", "cpu", {"avx512_bf16"}, width=768) == "fp32"
    with pytest.raises(ValueError, match="bf16"):
        resolve_precision("bf16", "cpu", {"avx2"})
    images, targets = _task(n_per_class=2)
    # 'bf16' by name runs on any CPU with native bf16, the tiny test tower included
    for flags, precision, expected in (({"avx2"}, "auto", "fp32"), ({"avx512_bf16"}, "bf16", "bf16")):
        backbone = tiny(seed=3)
        text = encode_class_texts(backbone, LABELS, "a photo of a {}.")
        result = tune(backbone, images, targets, text, _config(min_steps=3, precision=precision), cpu_flag_set=flags)
        assert result.precision == expected == result.summary()["precision"]


def test_auto_keeps_small_towers_in_fp32_on_a_bf16_cpu():
    """bf16 autocast on an AVX512-BF16 CPU was measured slower than fp32 for narrow towers (the builtin
    backbone, width 128) and faster from width 384: 'auto' follows the measurement, so the same build runs in
    the same precision on CPUs with and without bf16, and CUDA keeps bf16 whatever the width."""
    backbone = tiny(seed=3)
    assert vision_width(backbone.model) == 64 < BF16_CPU_MIN_WIDTH
    for flags in ({"avx2"}, {"avx512_bf16"}, {"amx_bf16", "avx512_bf16"}):
        assert resolve_precision("auto", "cpu", flags, width=vision_width(backbone.model)) == "fp32"
        assert resolve_precision("auto", "cpu", flags, width=None) == "fp32"  # unknown tower: as measured, fp32
    assert resolve_precision("auto", "cpu", {"avx512_bf16"}, width=BF16_CPU_MIN_WIDTH - 1) == "fp32"
    assert resolve_precision("auto", "cpu", {"avx512_bf16"}, width=768) == "bf16"
    assert resolve_precision("bf16", "cpu", {"avx512_bf16"}, width=64) == "bf16"  # by name: as asked
    images, targets = _task(n_per_class=2)
    text = encode_class_texts(backbone, LABELS, "a photo of a {}.")
    result = tune(backbone, images, targets, text, _config(min_steps=3), cpu_flag_set={"avx512_bf16"})
    assert result.precision == "fp32"


def test_warmup_then_cosine():
    assert [round(lr_factor(s, 10, 2), 3) for s in (0, 1, 2)] == [0.5, 1.0, 1.0]
    assert lr_factor(9, 10, 2) < 0.1 and lr_factor(5, 10, 0) == pytest.approx(0.5)


def test_progress_shows_planned_steps_and_an_eta_that_shrinks():
    backbone = tiny(seed=3)
    images, targets = _task()
    text = encode_class_texts(backbone, LABELS, "a photo of a {}.")
    seen = []
    tune(backbone, images, targets, text, _config(min_steps=30, early_stop=False), progress=seen.append)
    assert all(p.planned_steps == p.total_steps == 30 and p.eta_seconds is not None for p in seen)
    etas = [p.eta_seconds for p in seen]
    assert etas[-1] == 0.0
    # "monotone-ish": measured step times wobble, but the ETA at each quarter is below the one before
    quarters = [etas[i] for i in (0, 7, 15, 22, 29)]
    assert all(later <= earlier * 1.5 for earlier, later in zip(quarters, quarters[1:])), quarters
    assert quarters[-1] < quarters[0]


def test_bf16_matches_fp32_within_noise():
    """The guard for bf16 autocast: the same build in bf16 (native on an AVX512-BF16 CPU, emulated on one
    without: the flags are injected) flips nearly the same weights and scores the same on held-out images as
    fp32."""
    images, targets = _task()
    x, y = _validation()
    results = {}
    for flags in ({"avx2"}, {"avx512_bf16"}):
        backbone = tiny(seed=3)
        text = encode_class_texts(backbone, LABELS, "a photo of a {}.")
        precision = "bf16" if "avx512_bf16" in flags else "fp32"
        result = tune(backbone, images, targets, text, _config(min_steps=30, early_stop=False, precision=precision),
                      cpu_flag_set=flags)
        from rmt_core.tuning import holdout_accuracy
        results[result.precision] = (mask_bits(backbone.model), holdout_accuracy(backbone.model, x, torch.tensor(y), text),
                                     result.sparsity)
    (bits32, acc32, sp32), (bits16, acc16, sp16) = results["fp32"], results["bf16"]
    total = sum(b.size for b in bits32.values())
    differ = sum(int((bits32[k] != bits16[k]).sum()) for k in bits32)
    assert sp32 > 0 and differ / total < 0.01, (differ, total, sp32, sp16)
    assert abs(acc32 - acc16) <= 1 / len(y) + 1e-9, (acc32, acc16)


def test_an_early_stopped_build_records_why_and_when(tmp_path):
    from rmt_core.pipeline import build_classifier

    samples = colour_task(n_per_class=8)  # 8 per class: a holdout of 2 per class scores the mask as it tunes
    config = TuneConfig(backbone="rmt-tiny-vit", pretrained=None, epochs=1, min_steps=120, batch_size=8,
                        learning_rate=1e-3, warmup_steps=0, eval_every=4, patience=2, seed=1)
    manifest = build_classifier(samples, config, tmp_path / "v", device="cpu")
    tuning = manifest["tuning"]
    assert tuning["planned_steps"] == 120 and manifest["steps"] == tuning["steps"] < 120
    assert tuning["stop_reason"].split(":")[0] in ("plateau", "cannot catch")
    assert tuning["precision"] in ("fp32", "bf16") and tuning["checks"][-1]["step"] == tuning["steps"]
