"""Scores that mean something: temperature scaling, expected calibration error, a default ``min_score``.

numpy only. Temperature scaling (Guo et al., 2017) divides a classifier's logits by one scalar T fitted
to minimise the negative log-likelihood of held-out labels; the argmax, hence accuracy, never changes, and
T is folded into the head (``Head.temperature``) so it costs nothing at inference.
"""
from __future__ import annotations

import math

import numpy as np

N_BINS = 15
T_RANGE = (1e-2, 1e2)


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


def fit_temperature(logits: np.ndarray, targets, bounds: tuple[float, float] = T_RANGE, iters: int = 80) -> float:
    """The T in ``bounds`` minimising NLL(logits / T): golden-section search on log T.

    NLL is convex in 1/T (a log-sum-exp of functions linear in 1/T minus a linear term), so it is unimodal in
    log T and the search finds the global minimum within the bounds. Returns 1.0 without data.

    The targets are smoothed by 1/(n+2) (Laplace's rule of succession): when every validation answer is right,
    plain NLL is minimised by T -> 0 (certainty from a handful of images); smoothed, the fitted confidence
    stays near (n+1)/(n+2). With hundreds of samples the smoothing is negligible.
    """
    logits = np.asarray(logits, dtype=np.float64)
    targets = np.asarray(targets)
    if len(targets) == 0:
        return 1.0
    smoothing = 1.0 / (len(targets) + 2)
    lo, hi = math.log(bounds[0]), math.log(bounds[1])
    ratio = (math.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = nll(logits, targets, math.exp(a), smoothing), nll(logits, targets, math.exp(b), smoothing)
    for _ in range(iters):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = nll(logits, targets, math.exp(a), smoothing)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = nll(logits, targets, math.exp(b), smoothing)
    return float(math.exp((lo + hi) / 2))


def expected_calibration_error(probs: np.ndarray, targets, n_bins: int = N_BINS) -> float:
    """ECE: sum over equal-width confidence bins of (share of samples) * |accuracy - mean confidence|."""
    probs = np.asarray(probs, dtype=np.float64)
    targets = np.asarray(targets)
    if len(targets) == 0:
        return 0.0
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == targets
    bins = np.minimum((confidence * n_bins).astype(int), n_bins - 1)  # (k/n, (k+1)/n], 1.0 in the last bin
    ece = 0.0
    for k in range(n_bins):
        in_bin = bins == k
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(ece)


def cross_fitted_probs(logits: np.ndarray, targets, folds: int = 5, seed: int = 0) -> np.ndarray:
    """Probabilities where each sample's temperature was fitted on the other folds: an honest 'after' for ECE
    (fitting T and measuring ECE on the same samples flatters the fit)."""
    logits = np.asarray(logits, dtype=np.float64)
    targets = np.asarray(targets)
    n = len(targets)
    folds = max(2, min(folds, n))
    order = np.random.default_rng(seed).permutation(n)
    out = np.empty_like(logits)
    for k in range(folds):
        held = order[k::folds]
        rest = np.setdiff1d(order, held)
        t = fit_temperature(logits[rest], targets[rest]) if len(rest) else 1.0
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


def calibrate(logits: np.ndarray, targets, want_min_score: bool = False) -> dict:
    """Fit T on ``logits`` (validation), report ECE before and (cross-fitted) after, optionally a min_score.

    The fitted T is kept only when it helps out of sample: the cross-fitted NLL (each sample scored with a T
    fitted on the other folds) must beat the NLL at T = 1. On a handful of images a model that is already
    calibrated (a mask-tuned encoder usually is) gets a noisy T that makes it worse; an over-confident one
    (zero-shot CLIP under a domain shift: T of 5-15) passes easily. Otherwise T stays 1 and ``temperature_kept``
    says why.
    """
    logits = np.asarray(logits, dtype=np.float64)
    targets = np.asarray(targets)
    fitted = fit_temperature(logits, targets)
    crossed = cross_fitted_probs(logits, targets)
    nll_crossed = float(-np.mean(np.log(np.clip(crossed[np.arange(len(targets)), targets], 1e-12, None))))
    nll_plain = nll(logits, targets)
    helps = nll_crossed < nll_plain
    temperature = fitted if helps else 1.0
    ece_before = expected_calibration_error(softmax(logits), targets)
    report = {
        "temperature": round(temperature, 5),
        "fitted_temperature": round(fitted, 5),
        "temperature_kept": ("fitted T lowers the cross-fitted NLL" if helps else
                             "T = 1: a fitted T did not lower the NLL out of sample (cross-fitted)"),
        "ece_before": round(ece_before, 4),
        "ece_after": round(expected_calibration_error(crossed, targets) if helps else ece_before, 4),
        "ece_after_in_sample": round(expected_calibration_error(softmax(logits / temperature), targets), 4),
        "nll_before": round(nll_plain, 4),
        "nll_after": round(nll_crossed if helps else nll_plain, 4),
        "n": int(len(targets)),
    }
    if want_min_score:
        report["unknown"] = default_min_score(softmax(logits / temperature), targets)
        report["min_score"] = report["unknown"]["min_score"]
    return report
