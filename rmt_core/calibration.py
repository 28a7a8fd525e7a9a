"""Scores that mean something: temperature scaling, expected calibration error, a default ``min_score``.

numpy only. Temperature scaling (Guo et al., 2017) divides a classifier's logits by one scalar T fitted
to minimise the negative log-likelihood of held-out labels; the argmax, hence accuracy, never changes, and
T is folded into the head (``Head.temperature``) so it costs nothing at inference.
"""
from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np

N_BINS = 15
# Bounds on T. Beyond ~20 CLIP's logits (scale 100) carry less than a tenth of a logit between classes and
# every score is ~1/C; below 0.05 a head's logits are multiplied twentyfold. The data-dependent upper bound
# (``collapse_bound``) is usually the tighter one.
T_RANGE = (0.05, 20.0)
# The mean top score T may not push below chance + this share of (1 - chance): scores never collapse to uniform.
COLLAPSE_FLOOR = 0.2
# Each default "unknown" threshold may turn this share of in-distribution images into "unknown" (both together
# ~5%), and is placed so that it does so with at least TOLERANCE_CONFIDENCE when estimated from few images.
UNKNOWN_TAIL = 0.025
TOLERANCE_CONFIDENCE = 0.9


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def nll(logits: np.ndarray, targets: np.ndarray, temperature: float = 1.0, smoothing: float = 0.0) -> float:
    """Mean negative log-likelihood of ``targets`` under softmax(logits / T); with ``smoothing`` = e the target
    is 1 - e on the label and e spread over the other classes."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    rows = np.arange(len(z))
    on_label = log_p[rows, np.asarray(targets)]
    if not smoothing:
        return float(-np.mean(on_label))
    others = (log_p.sum(axis=1) - on_label) / max(z.shape[1] - 1, 1)
    return float(-np.mean((1 - smoothing) * on_label + smoothing * others))


def collapse_bound(logits: np.ndarray, floor: float = COLLAPSE_FLOOR, bounds: tuple[float, float] = T_RANGE) -> float:
    """The largest T in ``bounds`` at which the mean top score of softmax(logits / T) is still at least
    chance + ``floor`` * (1 - chance): a larger T would make every answer read "no idea" whatever the image."""
    logits = np.asarray(logits, dtype=np.float64)
    if len(logits) == 0:
        return bounds[1]
    chance = 1.0 / logits.shape[1]
    want = chance + floor * (1 - chance)
    mean_top = lambda t: float(softmax(logits / t).max(axis=1).mean())  # noqa: E731  (decreasing in t)
    if mean_top(bounds[1]) >= want:
        return bounds[1]
    if mean_top(bounds[0]) < want:  # logits with no spread at all: nothing to protect
        return bounds[0]
    lo, hi = math.log(bounds[0]), math.log(bounds[1])
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mean_top(math.exp(mid)) >= want else (lo, mid)
    return float(math.exp(lo))


def fit_temperature(logits: np.ndarray, targets, bounds: tuple[float, float] = T_RANGE, iters: int = 80,
                    prior: bool = True) -> float:
    """The T in ``bounds`` minimising NLL(logits / T): golden-section search on log T.

    NLL is convex in 1/T (a log-sum-exp of functions linear in 1/T minus a linear term), so it is unimodal in
    log T and the search finds the global minimum within the bounds. Returns 1.0 without data.

    The targets are smoothed by 1/(n+2) (Laplace's rule of succession): when every validation answer is right,
    plain NLL is minimised by T -> 0 (certainty from a handful of images); smoothed, the fitted confidence
    stays near (n+1)/(n+2). With hundreds of samples the smoothing is negligible.

    With ``prior`` the objective adds (log T)^2 / n: a weak pull toward T = 1 that a handful of images cannot
    overrule by much (T = 100 from 10 images was the failure this guards), negligible at hundreds. The upper
    bound is lowered to ``collapse_bound``: scores never collapse to uniform.
    """
    logits = np.asarray(logits, dtype=np.float64)
    targets = np.asarray(targets)
    if len(targets) == 0:
        return 1.0
    n = len(targets)
    smoothing = 1.0 / (n + 2)
    bounds = (bounds[0], max(bounds[0], min(bounds[1], collapse_bound(logits, bounds=bounds))))
    weight = 1.0 / n if prior else 0.0

    def objective(log_t: float) -> float:
        return nll(logits, targets, math.exp(log_t), smoothing) + weight * log_t ** 2

    lo, hi = math.log(bounds[0]), math.log(bounds[1])
    ratio = (math.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = objective(a), objective(b)
    for _ in range(iters):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = objective(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = objective(b)
    return float(math.exp((lo + hi) / 2))


def confidence_bins(confidence: np.ndarray, n_bins: int) -> np.ndarray:
    """Each top score's equal-width bin: (k/n, (k+1)/n], 1.0 in the last one (ECE, its floor, the diagram)."""
    return np.minimum((confidence * n_bins).astype(int), n_bins - 1)


def expected_calibration_error(probs: np.ndarray, targets, n_bins: int = N_BINS) -> float:
    """ECE: sum over equal-width confidence bins of (share of samples) * |accuracy - mean confidence|."""
    probs = np.asarray(probs, dtype=np.float64)
    targets = np.asarray(targets)
    if len(targets) == 0:
        return 0.0
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == targets
    bins = confidence_bins(confidence, n_bins)
    ece = 0.0
    for k in range(n_bins):
        in_bin = bins == k
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(ece)


def ece_sampling_floor(probs: np.ndarray, n_bins: int = N_BINS, draws: int = 200, seed: int = 0) -> float:
    """The ECE that a perfectly calibrated classifier with these very scores would read on this many images:
    labels drawn from the scores themselves, the estimator's mean over ``draws`` (seeded: the same scores give
    the same floor). Binned ECE is biased upward by sampling alone: ~0.07 on 250 images of 5 classes with top
    scores near 0.5, ~0.2 on 20. A measured ECE near this floor is as good as that many images can show."""
    probs = np.asarray(probs, dtype=np.float64)
    n = len(probs)
    if n == 0:
        return 0.0
    rng = np.random.default_rng(seed)
    cum = np.cumsum(probs, axis=1)
    cum[:, -1] = 1.0  # rounding: every draw lands on a class
    confidence, predicted = probs.max(axis=1), probs.argmax(axis=1)
    # the bins depend on the scores only, not on the labels: one (images x bins) indicator for every draw;
    # a bin's share * |accuracy - confidence| = |right answers - summed confidence| / n
    in_bin = np.zeros((n, n_bins))
    in_bin[np.arange(n), confidence_bins(confidence, n_bins)] = 1.0
    confidence_sums = confidence @ in_bin
    eces = []
    for start in range(0, draws, 50):  # draws in chunks: memory stays ~50 x n x classes
        labels = (rng.random((min(50, draws - start), n, 1)) > cum).sum(axis=2)
        eces.append(np.abs((labels == predicted).astype(np.float64) @ in_bin - confidence_sums).sum(axis=1) / n)
    return float(np.concatenate(eces).mean())


def cross_fitted_probs(logits: np.ndarray, targets, folds: int = 5, seed: int = 0, fit=None) -> np.ndarray:
    """Probabilities where each sample's temperature was fitted on the other folds: an honest 'after' for ECE
    (fitting T and measuring ECE on the same samples flatters the fit). ``fit(logits, targets) -> T`` defaults
    to ``fit_temperature`` (another estimator can be judged by the same rule: bench/bench_temperature.py)."""
    fit = fit or fit_temperature
    logits = np.asarray(logits, dtype=np.float64)
    targets = np.asarray(targets)
    n = len(targets)
    folds = max(2, min(folds, n))
    order = np.random.default_rng(seed).permutation(n)
    out = np.empty_like(logits)
    for k in range(folds):
        held = order[k::folds]
        rest = np.setdiff1d(order, held)
        t = fit(logits[rest], targets[rest]) if len(rest) else 1.0
        out[held] = softmax(logits[held] / t)
    return out


def default_min_score(probs: np.ndarray, targets, keep: float = 0.95) -> dict:
    """A default threshold for answering "unknown": the score below which only ``1 - keep`` of the right
    answers on validation data fall (so 95% of correct answers survive), never below chance (1/C).

    Validation data has no out-of-distribution images, so the threshold is set by what it costs on known
    classes; the dict also says what it would have done on validation: the share of right answers kept and
    of wrong answers turned into "unknown".
    """
    probs = np.asarray(probs, dtype=np.float64)
    targets = np.asarray(targets)
    n_classes = probs.shape[1]
    top = probs.max(axis=1)
    correct = probs.argmax(axis=1) == targets
    chance = 1.0 / n_classes
    if correct.any():
        threshold = float(np.quantile(top[correct], 1.0 - keep, method="lower"))
        # k right answers cannot vouch for a confidence above 1 - 1/(k+1) (saturated scores would otherwise ask
        # for 1.0 and turn every new image into "unknown")
        threshold = min(threshold, 1.0 - 1.0 / (int(correct.sum()) + 1))
    else:
        threshold = chance
    threshold = max(threshold, chance)
    accepted = top >= threshold
    return {
        "min_score": round(threshold, 4),
        "kept_correct": float(accepted[correct].mean()) if correct.any() else None,
        "rejected_wrong": float((~accepted[~correct]).mean()) if (~correct).any() else None,
        "rule": f"score below which {1 - keep:.0%} of correct validation answers fall (at least 1/classes)",
    }


def tolerance_factor(n: int, quantile: float = 1.0 - UNKNOWN_TAIL,
                     confidence: float = TOLERANCE_CONFIDENCE) -> float:
    """k of the one-sided normal tolerance bound mean + k * sd (sd with n - 1) that lies above the ``quantile``
    of the distribution with probability ``confidence`` when mean and sd come from n samples (the standard
    approximation, NIST/SEMATECH e-Handbook 7.2.6.3). Grows as n shrinks: 3.75 at n = 5, 2.94 at 10, 2.23 at
    80, -> z(quantile) = 1.96. This is the small-n safeguard: a 97.5th percentile read off 5 images is mostly
    noise, the bound widens by how much."""
    if n < 2:
        raise ValueError(f"a tolerance bound needs at least 2 samples, got {n}")
    z_p, z_g = NormalDist().inv_cdf(quantile), NormalDist().inv_cdf(confidence)
    a = 1.0 - z_g ** 2 / (2.0 * (n - 1))
    b = z_p ** 2 - z_g ** 2 / n
    if a <= 0:  # n = 2 with a high confidence: the approximation breaks down; the exact factor is huge
        return float("inf")
    return float((z_p + math.sqrt(max(z_p ** 2 - a * b, 0.0))) / a)


def tolerance_min_score(top_scores, n_classes: int, n_effective: int | None = None, tail: float = UNKNOWN_TAIL,
                        confidence: float = TOLERANCE_CONFIDENCE) -> float:
    """A default ``min_score`` from out-of-sample top scores: the lower of their ``tail`` quantile and a lower
    normal tolerance bound of that quantile on the logit scale (mean - k * sd of log(p / (1 - p)), k from
    ``tolerance_factor`` for ``n_effective`` independent images, default every score), never below chance and
    never above 1 - 1/(n+1) (n right answers cannot vouch for more). With 10 images the empirical 2.5th
    percentile is the smallest of them, a coin toss away from the true one; the bound widens by how much the
    estimate can be off, so in-distribution images are not rejected by a threshold read off too few."""
    top = np.asarray(top_scores, dtype=np.float64)
    top = top[~np.isnan(top)]
    chance = 1.0 / n_classes
    if len(top) == 0:
        return chance
    threshold = float(np.quantile(top, tail, method="lower"))
    n = len(top) if n_effective is None else int(n_effective)
    if n >= 2 and len(top) >= 2:
        logit = np.log(np.clip(top, 1e-6, 1 - 1e-6)) - np.log(np.clip(1 - top, 1e-6, 1 - 1e-6))
        k = tolerance_factor(n, 1.0 - tail, confidence)
        if math.isfinite(k):
            bound = float(logit.mean() - k * logit.std(ddof=1))
            threshold = min(threshold, 1.0 / (1.0 + math.exp(-bound)))
        else:
            threshold = chance
    else:  # one image: nothing to estimate a spread from
        threshold = chance
    threshold = min(threshold, 1.0 - 1.0 / (len(top) + 1))
    return max(threshold, chance)


def reliability(probs: np.ndarray, targets, n_bins: int = 10) -> list[dict]:
    """The reliability diagram's data: per non-empty confidence bin, its range, count, mean confidence and
    accuracy (what the picture in reliability.png shows)."""
    probs = np.asarray(probs, dtype=np.float64)
    targets = np.asarray(targets)
    if len(targets) == 0:
        return []
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == targets
    bins = confidence_bins(confidence, n_bins)
    return [{"lo": k / n_bins, "hi": (k + 1) / n_bins, "n": int((bins == k).sum()),
             "confidence": round(float(confidence[bins == k].mean()), 4),
             "accuracy": round(float(correct[bins == k].mean()), 4)}
            for k in range(n_bins) if (bins == k).any()]


def calibrate(logits: np.ndarray, targets, want_min_score: bool = False, source: str = "validation",
              fit=None) -> dict:
    """Fit T on ``logits`` (out-of-sample logits of every image the candidate was judged on), report ECE
    before and (cross-fitted) after with the number of images behind them, optionally a min_score.

    The fitted T is kept only when it helps out of sample on BOTH counts: the cross-fitted NLL and the
    cross-fitted ECE (each sample scored with a T fitted on the other folds) must beat T = 1. On a handful of
    images a model that is already calibrated gets a noisy T that makes it worse; an over-confident one
    (zero-shot CLIP under a domain shift: T of 5-15) passes easily. Otherwise T stays 1 and
    ``temperature_kept`` says why. T always lies within ``bounds`` (T_RANGE, lowered so scores never collapse).
    """
    logits = np.asarray(logits, dtype=np.float64)
    targets = np.asarray(targets)
    upper = max(T_RANGE[0], min(T_RANGE[1], collapse_bound(logits)))
    fit = fit or fit_temperature  # ``fit(logits, targets) -> T``: the estimator the keep rule judges
    fitted = fit(logits, targets)
    crossed = cross_fitted_probs(logits, targets, fit=fit)
    plain = softmax(logits)
    nll_crossed = float(-np.mean(np.log(np.clip(crossed[np.arange(len(targets)), targets], 1e-12, None))))
    nll_plain = nll(logits, targets)
    ece_before = expected_calibration_error(plain, targets)
    ece_crossed = expected_calibration_error(crossed, targets)
    better_nll, better_ece = nll_crossed < nll_plain, ece_crossed < ece_before
    helps = better_nll and better_ece
    temperature = fitted if helps else 1.0
    if helps:
        why = "fitted T lowers both the cross-fitted NLL and the cross-fitted ECE"
    else:
        worse = [name for name, ok in (("NLL", better_nll), ("ECE", better_ece)) if not ok]
        why = f"T = 1: a fitted T did not lower the {' or the '.join(worse)} out of sample (cross-fitted)"
    shown = crossed if helps else plain
    report = {
        "temperature": round(temperature, 5),
        "fitted_temperature": round(fitted, 5),
        "bounds": [T_RANGE[0], round(upper, 5)],
        "temperature_kept": why,
        "ece_before": round(ece_before, 4),
        "ece_after": round(ece_crossed if helps else ece_before, 4),
        "ece_after_in_sample": round(expected_calibration_error(softmax(logits / temperature), targets), 4),
        # what a perfectly calibrated classifier with the reported scores would read on these n images
        "ece_floor": round(ece_sampling_floor(shown), 4) if len(targets) else None,
        "nll_before": round(nll_plain, 4),
        "nll_after": round(nll_crossed if helps else nll_plain, 4),
        "mean_top_score": round(float(shown.max(axis=1).mean()), 4) if len(targets) else None,
        "n": int(len(targets)),
        "source": source,
        "reliability": reliability(shown, targets),
    }
    if want_min_score:
        report["unknown"] = default_min_score(softmax(logits / temperature), targets)
        report["min_score"] = report["unknown"]["min_score"]
    return report
