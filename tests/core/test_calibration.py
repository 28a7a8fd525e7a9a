"""Temperature scaling, ECE and the default min_score (rmt_core/calibration.py)."""
import numpy as np
import pytest

from rmt_core.calibration import (calibrate, cross_fitted_probs, default_min_score, ece_sampling_floor,
                                  expected_calibration_error,
                                  fit_temperature, nll, softmax, tolerance_factor, tolerance_min_score)
from rmt_core.head import Head


def _overconfident(n=3000, classes=5, true_t=3.0, seed=0):
    """Labels drawn from softmax(z / true_t): logits z are true_t times too sharp."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 4, (n, classes))
    p = softmax(z / true_t)
    y = np.array([rng.choice(classes, p=row) for row in p])
    return z, y


def test_fitted_temperature_recovers_the_true_one_and_minimises_nll():
    z, y = _overconfident(true_t=3.0)
    t = fit_temperature(z, y)
    assert t == pytest.approx(3.0, rel=0.1)
    for other in (t * 0.8, t * 1.25):
        assert nll(z, y, t) < nll(z, y, other)
    assert fit_temperature(z[:0], y[:0]) == 1.0


def test_ece_by_hand_and_temperature_lowers_it():
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.6, 0.4]])
    y = np.array([0, 1, 0, 0])
    # bin of 0.9: accuracy 1/2 vs confidence 0.9; bin of 0.6: accuracy 1 vs 0.6 -> 0.5 * 0.4 + 0.5 * 0.4
    assert expected_calibration_error(probs, y) == pytest.approx(0.4)
    z, y = _overconfident()
    before = expected_calibration_error(softmax(z), y)
    after = expected_calibration_error(cross_fitted_probs(z, y), y)
    assert before > 0.15 and after < 0.05


def test_calibrate_reports_and_never_changes_the_argmax():
    z, y = _overconfident(n=500)
    report = calibrate(z, y, want_min_score=True)
    assert report["ece_after"] < report["ece_before"] and report["nll_after"] < report["nll_before"]
    assert report["temperature"] > 1 and report["n"] == 500
    assert 1 / 5 <= report["min_score"] < 1
    assert np.array_equal(softmax(z / report["temperature"]).argmax(1), z.argmax(1))


def test_the_ece_floor_is_what_a_calibrated_classifier_reads_on_that_many_images():
    """Binned ECE is biased upward on few images; the floor is that bias for the scores at hand."""
    z, _ = _overconfident(n=4000, true_t=1.0, seed=3)
    probs = softmax(z / 3.0)  # top scores spread over the bins
    small, large = ece_sampling_floor(probs[:250]), ece_sampling_floor(probs)
    assert 0.04 < small < 0.12 and large < small / 2.5  # shrinks ~ 1/sqrt(n)
    assert ece_sampling_floor(probs[:250]) == small  # seeded: the same scores give the same floor
    # independent label sets drawn from the scores (a calibrated classifier, fresh test sets): their ECE
    # scatters around the floor, not around 0
    rng = np.random.default_rng(11)
    measured = [expected_calibration_error(probs[:250], [rng.choice(5, p=row) for row in probs[:250]])
                for _ in range(40)]
    assert np.mean(measured) == pytest.approx(small, rel=0.2)
    # sure and right: nothing to scatter
    assert ece_sampling_floor(np.eye(4)[[0, 1, 2, 3, 0]]) == 0.0 and ece_sampling_floor(np.zeros((0, 3))) == 0.0
    # an over-confident classifier reads far above its floor; calibrate() reports the floor of what it shows
    z, y = _overconfident(n=300)
    report = calibrate(z, y)
    shown = cross_fitted_probs(z, y) if report["temperature"] != 1.0 else softmax(z)
    assert report["ece_floor"] == pytest.approx(ece_sampling_floor(shown), abs=1e-4)
    assert report["ece_before"] > 3 * ece_sampling_floor(softmax(z))


def test_min_score_keeps_95_percent_of_right_answers_and_rejects_some_wrong_ones():
    z, y = _overconfident(n=2000, true_t=1.0)
    probs = softmax(z)
    chosen = default_min_score(probs, y)
    top, correct = probs.max(1), probs.argmax(1) == y
    kept = (top[correct] >= chosen["min_score"] - 1e-4).mean()
    assert kept == pytest.approx(0.95, abs=0.01) and chosen["kept_correct"] == pytest.approx(kept, abs=0.01)
    assert chosen["rejected_wrong"] > 0.05  # wrong answers score lower than right ones
    assert default_min_score(np.full((4, 4), 0.25), np.array([1, 2, 3, 0]))["min_score"] == 0.25  # never below chance


def test_head_temperature_divides_the_logits_at_no_extra_cost():
    rng = np.random.default_rng(0)
    head = Head.zero_shot(rng.normal(size=(3, 8)), 50.0)
    feats = rng.normal(size=(4, 8))
    plain = head.logits(feats)
    head.temperature = 2.5
    np.testing.assert_allclose(head.logits(feats), plain / 2.5, rtol=1e-6)
    assert Head.from_bytes(head.to_bytes()).temperature == 2.5


def test_perfect_validation_does_not_drive_the_temperature_to_certainty():
    z = np.array([[4.0, 0.0, 0.0], [0.0, 5.0, 0.0], [0.0, 0.0, 3.0], [6.0, 0.0, 1.0]])
    y = np.array([0, 1, 2, 0])
    t = fit_temperature(z, y)
    top = softmax(z / t).max(1)
    assert 0.5 < top.mean() < 0.97  # about (n+1)/(n+2) = 5/6, not 1.0
    assert calibrate(z, y, want_min_score=True)["min_score"] < 1


def test_a_calibrated_model_keeps_t_1_and_an_overconfident_one_gets_fitted():
    """On 16 images a fitted T mostly hurts a model that is already calibrated; the cross-fitted NLL test
    keeps T = 1 there and still applies the fit to an over-confident model."""
    rng = np.random.default_rng(0)

    def draw(t):
        z = rng.normal(0, 3, (16, 8))
        return z, np.array([rng.choice(8, p=row) for row in softmax(z / t)])

    kept = sum(calibrate(*draw(1.0))["temperature"] == 1.0 for _ in range(40))
    fitted = sum(calibrate(*draw(10.0))["temperature"] > 3 for _ in range(40))
    assert kept >= 30 and fitted >= 37


def test_temperature_never_leaves_its_bounds_nor_collapses_scores_to_uniform():
    """Out-of-fold logits that are mostly wrong (a 1-shot head that never saw the class) pull T upward
    without limit; the fit stays within T_RANGE and never below the collapse floor."""
    from rmt_core.calibration import COLLAPSE_FLOOR, T_RANGE, collapse_bound

    rng = np.random.default_rng(3)
    for classes in (2, 5, 20):
        z = rng.normal(0, 8, (10, classes))
        y = (z.argmax(1) + 1) % classes  # every answer wrong: unbounded NLL wants T -> infinity
        report = calibrate(z, y)
        t = report["fitted_temperature"]
        assert T_RANGE[0] <= t <= report["bounds"][1] <= T_RANGE[1]
        assert t == pytest.approx(collapse_bound(z), rel=1e-3) or t < collapse_bound(z)
        chance = 1 / classes
        assert softmax(z / t).max(1).mean() >= chance + COLLAPSE_FLOOR * (1 - chance) - 1e-6
    certain = np.eye(4)[[0, 1, 2, 3]] * 1e-6  # no spread at all: T cannot sharpen it past its lower bound
    assert T_RANGE[0] <= fit_temperature(certain, np.arange(4)) <= T_RANGE[1]


def test_a_temperature_that_worsens_held_out_ece_is_dropped_even_when_nll_improves():
    # 12 images where the cross-fitted T lowers NLL (2.61 -> 1.40) but raises ECE (0.405 -> 0.474)
    rng = np.random.default_rng(21)
    z = rng.normal(0, 3, (12, 3))
    y = rng.integers(0, 3, 12)
    report = calibrate(z, y)
    assert report["fitted_temperature"] > 2  # the fit wanted a T ...
    assert report["temperature"] == 1.0 and "ECE" in report["temperature_kept"]  # ... and was refused
    assert report["ece_after"] == report["ece_before"] and report["n"] == 12
    z, y = _overconfident(n=400)
    kept = calibrate(z, y)  # an over-confident model: both get better, T is kept
    assert kept["temperature"] > 1 and kept["ece_after"] < kept["ece_before"] and kept["nll_after"] < kept["nll_before"]
    assert sum(b["n"] for b in kept["reliability"]) == 400 and kept["mean_top_score"] < softmax(z).max(1).mean()


def test_tolerance_bound_covers_the_quantile_with_its_confidence_even_from_five_samples():
    """The small-n safeguard of the unknown thresholds: mean + k(n) * sd lies above the true 97.5th percentile in
    ~90% of draws at every n, where the plain sample percentile (the largest of 5) does so in ~12%."""
    assert tolerance_factor(5) > tolerance_factor(10) > tolerance_factor(80) > 1.96
    assert tolerance_factor(100000) == pytest.approx(1.96, abs=0.02)
    with pytest.raises(ValueError, match="at least 2"):
        tolerance_factor(1)
    rng = np.random.default_rng(0)
    true_q = 1.959964
    for n in (5, 10, 40):
        draws = rng.normal(size=(4000, n))
        bound = draws.mean(1) + tolerance_factor(n) * draws.std(1, ddof=1)
        assert 0.87 <= (bound > true_q).mean() <= 0.93, n
        if n == 5:
            assert (np.quantile(draws, 0.975, axis=1, method="higher") > true_q).mean() < 0.2


def test_default_min_score_from_few_images_rejects_few_new_right_answers():
    """Top scores of in-distribution images (logit-normal): a min_score read off 8 images as their 2.5th
    percentile (the smallest) rejects ~11% of new ones on average; the tolerance bound stays under the 2.5%
    target on average, never rises above that percentile and never drops below chance."""
    rng = np.random.default_rng(1)
    new = 1 / (1 + np.exp(-rng.normal(1.5, 0.6, 200000)))
    plain, bounded = [], []
    for _ in range(400):
        top = 1 / (1 + np.exp(-rng.normal(1.5, 0.6, 8)))
        t = tolerance_min_score(top, n_classes=10)
        assert 0.1 <= t <= np.quantile(top, 0.025, method="lower")
        plain.append((new < np.quantile(top, 0.025, method="lower")).mean())
        bounded.append((new < t).mean())
    assert np.mean(plain) > 0.08 and np.mean(bounded) < 0.025, (np.mean(plain), np.mean(bounded))
    assert tolerance_min_score([0.9], n_classes=4) == 0.25  # one image: no spread to estimate, chance
    assert tolerance_min_score(np.full(50, 0.999), n_classes=2) <= 1 - 1 / 51  # saturated scores stay reachable
    # views of 3 images count as 3 images, not 12: a wider bound
    views = 1 / (1 + np.exp(-rng.normal(1.0, 0.8, 12)))
    assert tolerance_min_score(views, 5, n_effective=3) <= tolerance_min_score(views, 5)
