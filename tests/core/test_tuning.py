import pytest
import torch

from rmt_core.backbones import encode_class_texts
from rmt_core.config import TuneConfig
from rmt_core.pipeline import accuracy_and_confusion
from rmt_core.preprocess import PreprocessConfig, preprocess_batch
from rmt_core.tuning import TuningCancelled, class_logits, plan_schedule, tune
from tests.core.toys import colour_task, tiny


def _accuracy(backbone, samples, labels, text):
    cfg = PreprocessConfig.from_dict(backbone.preprocess)
    x = torch.from_numpy(preprocess_batch([img for img, _ in samples], cfg))
    with torch.no_grad():
        probs = class_logits(backbone.model, x, text).softmax(-1).numpy()
    return accuracy_and_confusion(probs, [labels.index(lab) for _, lab in samples], len(labels))[0]


@pytest.mark.parametrize("method", ["r-amt", "amt"])
def test_tuning_beats_zero_shot_on_a_separable_task(method):
    samples = colour_task(n_per_class=8)
    labels = ["blue", "green", "red"]
    backbone = tiny(seed=3)
    text = encode_class_texts(backbone, labels, "a photo of a {}.")
    zero_shot = _accuracy(backbone, samples, labels, text)
    config = TuneConfig(method=method, backbone="rmt-tiny-vit", pretrained=None, epochs=1, min_steps=40,
                        batch_size=8, learning_rate=1e-3, augment=False)
    seen = []
    result = tune(backbone, [i for i, _ in samples], [labels.index(lab) for _, lab in samples], text, config,
                  progress=seen.append)
    tuned = _accuracy(backbone, samples, labels, text)
    assert tuned >= 0.9 and tuned > zero_shot + 0.3, (zero_shot, tuned)
    assert result.sparsity > 0
    assert [p.step for p in seen] == list(range(1, result.steps + 1))
    assert seen[-1].total_steps == result.steps and seen[-1].epoch == seen[-1].epochs == result.epochs


def test_min_steps_raises_epochs_for_small_uploads_and_paper_recipe_does_not():
    config = TuneConfig(epochs=30, batch_size=32, min_steps=300)
    assert plan_schedule(40, config) == (2, 150, 300)
    assert plan_schedule(40, config.paper_recipe()) == (2, 30, 60)
    assert plan_schedule(3200, config) == (100, 30, 3000)


def test_a_run_that_flips_no_mask_says_so():
    samples = colour_task(n_per_class=2)
    labels = ["blue", "green", "red"]
    backbone = tiny()
    text = encode_class_texts(backbone, labels, "a photo of a {}.")
    config = TuneConfig(backbone="rmt-tiny-vit", pretrained=None, epochs=2, min_steps=0, batch_size=32)
    result = tune(backbone, [i for i, _ in samples], [labels.index(lab) for _, lab in samples], text, config)
    assert result.sparsity == 0.0
    assert any("NO MASK FLIPPED" in w for w in result.warnings)


def test_should_stop_cancels_between_steps():
    samples = colour_task(n_per_class=2)
    backbone = tiny()
    text = encode_class_texts(backbone, ["blue", "green", "red"], "a photo of a {}.")
    calls = []

    def stop():
        calls.append(1)
        return len(calls) > 2

    config = TuneConfig(backbone="rmt-tiny-vit", pretrained=None, epochs=5, min_steps=0, batch_size=2)
    with pytest.raises(TuningCancelled, match="step 2"):
        tune(backbone, [i for i, _ in samples], [0, 0, 1, 1, 2, 2], text, config, should_stop=stop)


def test_same_seed_same_masks():
    samples = colour_task(n_per_class=3)
    labels = ["blue", "green", "red"]
    runs = []
    for _ in range(2):
        backbone = tiny()
        text = encode_class_texts(backbone, labels, "a photo of a {}.")
        config = TuneConfig(backbone="rmt-tiny-vit", pretrained=None, epochs=1, min_steps=6, batch_size=4,
                            learning_rate=1e-3)
        result = tune(backbone, [i for i, _ in samples], [labels.index(lab) for _, lab in samples], text, config)
        runs.append({k: m.scores.detach().clone() for k, m in result.masks.items()})
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_batched_gradients_equal_the_losses_autograd_gradients(temperature):
    """The closed-form logit gradients + one batched VJP == dL_ce/dM and dL_kl/dM from the losses themselves."""
    import torch.nn.functional as F

    from rmt_core.gdr import soft_cross_entropy
    from rmt_core.masking import attach_masks, masks_disabled
    from rmt_core.tuning import ce_kl_gradients

    backbone = tiny()
    model = backbone.model
    text = encode_class_texts(backbone, ["a", "b", "c", "d"], "a photo of a {}.")
    masks = attach_masks(model, "r-amt")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in masks.values():
            m.scores.copy_(0.004 + torch.rand(m.scores.shape, generator=g) * 0.01)
    scores = [m.scores for m in masks.values()]
    model.train()
    x = torch.randn(6, 3, 32, 32, generator=g)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    config = TuneConfig(method="r-amt", kl_temperature=temperature, l2_weight=1e-2)
    logits = class_logits(model, x, text)
    with torch.no_grad(), masks_disabled(model):
        teacher = class_logits(model, x, text)
    loss_ce = F.cross_entropy(logits, y) + config.l2_weight * sum(s.norm() for s in scores)
    loss_kl = soft_cross_entropy(logits, teacher, temperature)
    want_ce = torch.autograd.grad(loss_ce, scores, retain_graph=True)
    want_kl = torch.autograd.grad(loss_kl, scores, retain_graph=True)
    got_ce, got_kl = ce_kl_gradients(logits, y, teacher, scores, config)
    for a, b in zip(got_ce + got_kl, list(want_ce) + list(want_kl)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))  # float32 sums
    assert any(gk.abs().max() > 0 for gk in got_kl)


def test_schedule_reports_epochs_min_steps_and_total_with_the_warning():
    config = TuneConfig(epochs=30, batch_size=32, min_steps=300)
    plan = config.schedule(40)
    assert (plan["steps_per_epoch"], plan["epochs_requested"], plan["epochs"], plan["total_steps"]) == (2, 30, 150, 300)
    assert plan["raised_by_min_steps"] and plan["min_steps"] == 300
    assert "epochs raised by min_steps" in plan["warning"] and "150 epochs = 300 steps" in plan["warning"]
    assert "30 epochs would be 60 steps" in plan["warning"]
    big = config.schedule(3200)
    assert (big["epochs"], big["total_steps"], big["raised_by_min_steps"], big["warning"]) == (30, 3000, False, None)
    # per-class upload counts: the holdout (20% of each class, when every class has >= 5 images) does not train
    per_class = TuneConfig(holdout=0.2).schedule([10, 10, 5])
    assert (per_class["n_holdout"], per_class["n_train"]) == (5, 20)
    # as the pipeline splits: one class too small to spare images means no holdout at all
    small = TuneConfig(holdout=0.2).schedule([10, 10, 3])
    assert (small["n_holdout"], small["n_train"]) == (0, 23)
    assert plan_schedule(40, config) == (2, 150, 300)


def test_eta_uses_post_flip_step_times_not_the_cheaper_pre_flip_average():
    from rmt_core.tuning import StepTimer

    timer = StepTimer(uses_gdr=True)
    assert timer.eta(10) == (None, "")
    for _ in range(50):
        timer.record(0.1, flipped_before_step=False)
    eta, basis = timer.eta(100)
    assert basis == "pre-flip estimate" and eta == pytest.approx(100 * 0.1 * StepTimer.PRE_FLIP_FACTOR)
    for _ in range(5):
        timer.record(0.3, flipped_before_step=True)
    eta, basis = timer.eta(100)
    assert basis == "post-flip" and eta == pytest.approx(30.0)  # the overall mean (0.12/step) would say 12 s


def test_progress_reports_an_eta_that_reaches_zero():
    samples = colour_task(n_per_class=2)
    backbone = tiny()
    text = encode_class_texts(backbone, ["blue", "green", "red"], "a photo of a {}.")
    config = TuneConfig(backbone="rmt-tiny-vit", pretrained=None, epochs=1, min_steps=6, batch_size=3,
                        learning_rate=2e-3)
    seen = []
    tune(backbone, [i for i, _ in samples], [0, 0, 1, 1, 2, 2], text, config, progress=seen.append)
    assert all(p.eta_seconds is not None and p.eta_seconds >= 0 for p in seen)
    assert seen[-1].eta_seconds == 0
    assert seen[0].eta_basis == "pre-flip estimate"
    assert any(p.eta_basis == "post-flip" for p in seen)  # lr 2e-3 flips a mask after ~3 steps
