"""Candidates and one selection: never publish a classifier worse than its baseline (issue 10).

Every build can publish one of four candidates over one shared frozen base (simplest first):

    zero-shot   CLIP's own head (class text embeddings) on the base encoder's features
    head        a head fitted on the base features in about a second (numpy): a linear probe initialised
                from the class text embeddings and pulled back toward them (weight decay toward the init),
                or Tip-Adapter's training-free cache model, whichever scores better out of fold
    mask        the zero-shot head on the mask-tuned encoder's features (the configured method)
    mask+head   the fitted head on the mask-tuned encoder's features (the paper's Table 3 combination)

Validation uses every image (issue 16). Zero-shot fits nothing: every image judges it. Heads refit in
milliseconds, so they are judged by repeated NESTED stratified k-fold over ALL images (leave-one-out for
<= LOO_MAX; the head's own settings are chosen inside each outer fold, so the judgement is not flattered by
them), and the published head is then refit on all of them. A mask costs a tuning run per fit, so it is tuned on the
training split and judged on a seeded per-class holdout (only when every class has MIN_PER_CLASS_FOR_HOLDOUT
images); its head is refit on every image after judging. Without a holdout the mask is not tuned under
``select="auto"`` (it could not be judged); pinning ``select="mask"`` tunes and publishes it unvalidated.
With a class of ONE image no fold can hold an image out without removing its class: the head comes from a
prior (Tip-Adapter at its published setting) and the candidates are compared on augmented views.

Selection: a paired comparison on the same images (``paired_better``: the images where two candidates disagree, per-image
correctness, McNemar-style). The simplest candidate is the champion and each more complex one takes its place only when the
evidence favours it; a tie stays with the simpler one; leaving zero-shot, the safe default, takes stronger
evidence (ZERO_SHOT_CONFIDENCE, shared by the challengers that face it in proportion to the images each was judged
on) than choosing among fitted candidates. The published head then gets a temperature
cross-fitted on its out-of-sample logits (calibration.py) and open-set data (head.py: ``outlier_scores``), and
the report carries the default ``min_score`` / ``max_outlier`` and what they reject of the user's own images.
"""
from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from .calibration import UNKNOWN_TAIL, calibrate, nll, softmax, tolerance_min_score
from .config import CANDIDATES, MIN_PER_CLASS_FOR_HOLDOUT, TuneConfig
from .head import Head
from .threads import one_blas_thread

LOO_MAX = 10  # at most this many images: leave-one-out instead of k-fold
FOLDS = 5
WEIGHT_DECAYS = (1.0, 0.1, 0.01, 1e-3, 1e-4)  # strength of the pull toward the text-embedding init, strongest first
log = logging.getLogger(__name__)
OnCandidate = Callable[[str, Head, bool, "float | None"], None]


# ------------------------------------------------------------------------------------------- features
def encode_images(model, images: np.ndarray, batch_size: int = 64, device=None) -> np.ndarray:
    """Raw (un-normalised) image features [N, D] of preprocessed ``images`` [N, 3, H, W]: what the base
    graph outputs and what a Head consumes. Masks, when attached, are applied."""
    import torch

    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    try:
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                x = torch.as_tensor(np.asarray(images[start:start + batch_size]), device=device)
                out.append(model.encode_image(x).float().cpu().numpy())
    finally:
        model.train(was_training)
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def _normalise(features: np.ndarray) -> np.ndarray:
    f = np.asarray(features, dtype=np.float64)
    return f / np.linalg.norm(f, axis=1, keepdims=True)


# ------------------------------------------------------------------------------------ the linear probe
def _fit_residual(f: np.ndarray, z0: np.ndarray, y: np.ndarray, n_classes: int, weight_decay: float,
                  start: tuple[np.ndarray, np.ndarray] | None = None, max_iter: int = 3000,
                  tol: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """min over (Delta [C, D], b [C]) of  CE(z0 + f @ Delta.T + b, y) + weight_decay * (|Delta|^2 + |b|^2).

    ``f`` are L2-normalised features and ``z0`` the zero-shot logits, so Delta is the change of the head in
    logit units and weight decay pulls it back toward the text-embedding init. Strongly convex with gradient
    Lipschitz constant <= 1 + 2 * weight_decay (softmax CE's Hessian <= I/2 per sample, |[f, 1]|^2 = 2):
    Nesterov's accelerated gradient with step 1/L converges without a line search. One problem of
    ``_fit_residuals``.
    """
    return _fit_residuals([(f, z0, y, start)], n_classes, weight_decay, max_iter=max_iter, tol=tol)[0]


Problem = tuple[np.ndarray, np.ndarray, np.ndarray, "tuple[np.ndarray, np.ndarray] | None"]  # f, z0, y, warm start


def _fit_residuals(problems: Sequence[Problem], n_classes: int, weight_decay: float, max_iter: int = 3000,
                   tol: float = 1e-6) -> list[tuple[np.ndarray, np.ndarray]]:
    """``_fit_residual`` of each (f, z0, y, start) in ``problems`` (one weight decay): the same iterates, each
    stopped where it alone would stop.

    With theta = [Delta, b] and f1 = [f, 1], each step adds a combination of f1's rows to theta and shrinks the
    whole of it, so every iterate is theta_k = A_k @ f1 + c_k * theta_0 (theta_0 the warm start). Where there
    are fewer images than feature dimensions (few-shot uploads) the iteration runs on A [C, n] and the scalar c
    through the n x n Gram matrix: the same iterates as in feature space (to rounding), ~2x faster at n = 128,
    D = 512 (bench: the head's nested k-fold took 12 s on 160 ViT-B-32 images, most of it here). Those problems
    (a k-fold's folds) also iterate together, stacked: numpy's per-call cost, not arithmetic, is what a step of
    one [8, ~100] problem costs, so five folds in one stack take ~2.4x less CPU than one after another
    (bench/RESULTS-build.md).
    """
    out: list = [None] * len(problems)
    stacked = []
    for i, (f, z0, y, start) in enumerate(problems):
        if f.shape[0] <= f.shape[1] + 1:
            stacked.append(i)
        else:  # many images: feature space is the smaller one
            out[i] = _fit_in_feature_space(f, z0, y, n_classes, weight_decay, start, max_iter, tol)
    if stacked:
        fits = _fit_through_gram([problems[i] for i in stacked], n_classes, weight_decay, max_iter, tol)
        for i, fit in zip(stacked, fits):
            out[i] = fit
    return out


def _steps(weight_decay: float) -> tuple[float, float, float]:
    """Nesterov's step 1/L, momentum for strong convexity 2 * weight_decay, and the decay's gradient factor."""
    step = 1.0 / (1.0 + 2.0 * weight_decay)
    momentum = (1 - np.sqrt(2 * weight_decay * step)) / (1 + np.sqrt(2 * weight_decay * step))
    return step, momentum, 2 * weight_decay


def _fit_in_feature_space(f, z0, y, n_classes, weight_decay, start, max_iter, tol):
    n, d = f.shape
    onehot = np.eye(n_classes)[y]
    theta = np.zeros((n_classes, d + 1))
    if start is not None:
        theta[:, :d], theta[:, d] = start
    step, momentum, decay = _steps(weight_decay)
    f1 = np.concatenate([f, np.ones((n, 1))], axis=1)
    prev = theta.copy()
    for _ in range(max_iter):
        look = theta + momentum * (theta - prev)
        g = (softmax(z0 + f1 @ look.T) - onehot).T @ f1 / n + decay * look
        prev, theta = theta, look - step * g
        if np.sqrt((g ** 2).sum()) < tol:
            break
    return theta[:, :d], theta[:, d]


def _fit_through_gram(problems: Sequence[Problem], n_classes: int, weight_decay: float, max_iter: int,
                      tol: float) -> list[tuple[np.ndarray, np.ndarray]]:
    """The Gram-space iteration of K problems at once, padded to the largest n (a padded image has zero
    features, zero logits and zero weight, so it changes no sum). Arrays are [K, C, n]: the softmax's
    reductions run over the class axis with the images contiguous. A problem leaves the stack at the step
    where it converges, with the iterate it alone would have had."""
    k_all, d, c_all = len(problems), problems[0][0].shape[1], n_classes
    n_max = max(f.shape[0] for f, *_rest in problems)
    f1 = np.zeros((k_all, n_max, d + 1))
    z0 = np.zeros((k_all, c_all, n_max))
    onehot = np.zeros((k_all, c_all, n_max))
    weight = np.zeros((k_all, 1, n_max))  # 1/n on a problem's images, 0 on padding
    theta0 = np.zeros((k_all, c_all, d + 1))
    for k, (f, z, y, start) in enumerate(problems):
        n = f.shape[0]
        f1[k, :n, :d], f1[k, :n, d] = f, 1.0
        z0[k, :, :n] = np.asarray(z).T
        onehot[k, np.asarray(y), np.arange(n)] = 1.0
        weight[k, 0, :n] = 1.0 / n
        if start is not None:
            theta0[k, :, :d], theta0[k, :, d] = start
    step, momentum, decay = _steps(weight_decay)
    gram = f1 @ f1.transpose(0, 2, 1)  # symmetric, so A @ gram is (gram @ A.T).T
    s0 = theta0 @ f1.transpose(0, 2, 1)  # [K, C, n]: theta_0's logits
    t0_sq = (theta0 ** 2).sum(axis=(1, 2))
    a = prev_a = np.zeros((k_all, c_all, n_max))
    ga = prev_ga = np.zeros((k_all, c_all, n_max))  # a @ gram, updated along with a (one product a step)
    c = prev_c = np.ones((k_all, 1, 1))
    done_a, done_c = np.zeros_like(a), np.ones_like(c)
    live = np.arange(k_all)
    for _ in range(max_iter):
        look_a = a + momentum * (a - prev_a)
        look_ga = ga + momentum * (ga - prev_ga)
        look_c = c + momentum * (c - prev_c)
        p = z0 + look_ga  # the logits, then in place their softmax, then the CE's gradient per image
        p += look_c * s0
        p -= p.max(axis=1, keepdims=True)
        np.exp(p, out=p)
        p /= p.sum(axis=1, keepdims=True)
        p -= onehot
        p *= weight
        g = p + decay * look_a
        g_gram = g @ gram
        gc = decay * look_c
        # the gradient is g @ f1 + gc * theta_0; its squared norm through the Gram matrix
        norm_sq = (g_gram * g + (2 * gc) * (g * s0)).sum(axis=(1, 2)) + (gc * gc)[:, 0, 0] * t0_sq
        prev_a, prev_c, prev_ga = a, c, ga
        a, c, ga = look_a - step * g, look_c - step * gc, look_ga - step * g_gram
        converged = norm_sq < tol * tol
        if converged.any():
            done_a[live[converged]], done_c[live[converged]] = a[converged], c[converged]
            keep = ~converged
            live = live[keep]
            if not len(live):
                break
            a, c, ga, prev_a, prev_c, prev_ga = (v[keep] for v in (a, c, ga, prev_a, prev_c, prev_ga))
            gram, z0, onehot, weight, s0, t0_sq = (v[keep] for v in (gram, z0, onehot, weight, s0, t0_sq))
    if len(live):  # those that ran out of iterations
        done_a[live], done_c[live] = a, c
    theta = done_a @ f1 + done_c * theta0
    return [(theta[k, :, :d], theta[k, :, d]) for k in range(k_all)]


def stratified_folds(targets: Sequence[int], folds: int, seed: int = 0) -> np.ndarray:
    """Fold id per sample: each class's samples are shuffled (seeded) and dealt round-robin over the folds."""
    targets = np.asarray(targets)
    rng = np.random.default_rng(seed)
    fold = np.empty(len(targets), dtype=int)
    offset = 0
    for c in np.unique(targets):
        idx = np.flatnonzero(targets == c)
        rng.shuffle(idx)
        fold[idx] = (np.arange(len(idx)) + offset) % folds
        offset += len(idx)  # keeps folds balanced in size when classes are small
    return fold


def validation_folds(n: int) -> tuple[str, int]:
    """('leave-one-out', n) for at most LOO_MAX samples, else ('k-fold', FOLDS)."""
    return ("leave-one-out", n) if n <= LOO_MAX else ("k-fold", FOLDS)


@dataclass
class ProbeFit:
    head: Head
    weight_decay: float
    oof_logits: np.ndarray  # out-of-fold logits of the chosen weight decay (k-fold validation)
    folds: int
    method: str
    seconds: float


@one_blas_thread()
def fit_linear_probe(features: np.ndarray, targets: Sequence[int], zero_shot: Head, seed: int = 0,
                     weight_decays: Sequence[float] = WEIGHT_DECAYS) -> ProbeFit:
    """A linear head on raw ``features``, initialised from (and decayed toward) ``zero_shot``'s class embeddings.

    The weight decay is chosen by out-of-fold accuracy (then NLL) over ``weight_decays``, ties to the strongest;
    the returned head is refitted on all samples with it. ``oof_logits`` are that weight decay's out-of-fold
    logits: the head's k-fold validation when there is no holdout (slightly optimistic: the weight decay was
    chosen on the same folds).
    """
    started = time.monotonic()
    y = np.asarray(targets, dtype=int)
    f = _normalise(features)
    z0 = zero_shot.scale * f @ zero_shot.W.T.astype(np.float64) + zero_shot.b
    c = zero_shot.n_classes
    method, k = validation_folds(len(y))
    fold = np.arange(len(y)) if method == "leave-one-out" else stratified_folds(y, k, seed)
    k = int(fold.max()) + 1
    best = None
    oof_by_wd = {}
    warm: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for wd in weight_decays:  # strongest first: each fold's fit warm-starts the next, weaker one
        oof = z0.copy()  # a fold with nothing left to train on keeps the zero-shot logits
        fitted = [j for j in range(k) if (fold != j).any()]
        fits = _fit_residuals([(f[fold != j], z0[fold != j], y[fold != j], warm.get(j)) for j in fitted], c, wd)
        for j, (delta, b) in zip(fitted, fits):  # the folds of one weight decay iterate together
            warm[j] = (delta, b)
            held = fold == j
            oof[held] = z0[held] + f[held] @ delta.T + b
        oof_by_wd[wd] = oof
        acc = float((oof.argmax(1) == y).mean())
        key = (acc, -nll(oof, y))
        if best is None or key > best[0]:
            best = (key, wd)
    wd = best[1]
    delta, b = _fit_residual(f, z0, y, c, wd, start=warm.get(0))
    head = Head(W=zero_shot.W + delta / zero_shot.scale, b=zero_shot.b + b, scale=zero_shot.scale,
                kind="linear-probe", meta={"weight_decay": wd, "init": "class text embeddings", "n_fit": int(len(y))})
    return ProbeFit(head=head, weight_decay=wd, oof_logits=oof_by_wd[wd], folds=k, method=method,
                    seconds=time.monotonic() - started)


# ---------------------------------------------------------------------------------- Tip-Adapter cache
TIP_ALPHAS = (0.003, 0.01, 0.03, 0.1, 0.3)  # times the logit scale: Tip-Adapter's alpha=1 at CLIP's scale 100
TIP_BETAS = (1.0, 3.0, 5.5, 10.0, 20.0)


def _cache_logits(f_query: np.ndarray, f_keys: np.ndarray, onehot: np.ndarray, beta: float) -> np.ndarray:
    return np.exp(-beta * (1.0 - f_query @ f_keys.T)) @ onehot


@one_blas_thread()
def fit_tip_adapter(features: np.ndarray, targets: Sequence[int], zero_shot: Head, seed: int = 0,
                    alphas: Sequence[float] = TIP_ALPHAS, betas: Sequence[float] = TIP_BETAS) -> ProbeFit:
    """Tip-Adapter's training-free cache model (Zhang et al., 2022): zero-shot logits plus
    alpha * exp(-beta * (1 - f @ K.T)) @ V with K the normalised training features and V their one-hot labels.

    alpha and beta are chosen by out-of-fold accuracy (then NLL): each fold is scored with a cache built from
    the other folds only.
    """
    started = time.monotonic()
    y = np.asarray(targets, dtype=int)
    f = _normalise(features)
    c = zero_shot.n_classes
    onehot = np.eye(c)[y]
    z0 = zero_shot.scale * f @ zero_shot.W.T.astype(np.float64) + zero_shot.b
    method, k = validation_folds(len(y))
    fold = np.arange(len(y)) if method == "leave-one-out" else stratified_folds(y, k, seed)
    k = int(fold.max()) + 1
    best = None
    for beta in betas:
        cache = np.zeros((len(y), c))
        for j in range(k):
            held, train = fold == j, fold != j
            if train.any():
                cache[held] = _cache_logits(f[held], f[train], onehot[train], beta)
        for alpha in alphas:
            oof = z0 + alpha * zero_shot.scale * cache
            key = ((oof.argmax(1) == y).mean(), -nll(oof, y))
            if best is None or key > best[0]:
                best = (key, alpha, beta, oof)
    _, alpha, beta, oof = best
    head = Head(W=zero_shot.W, b=zero_shot.b, scale=zero_shot.scale, cache_keys=f.astype(np.float32),
                cache_values=onehot.astype(np.float32), cache_alpha=alpha * zero_shot.scale, cache_beta=beta,
                kind="tip-adapter", meta={"alpha": alpha * zero_shot.scale, "beta": beta, "n_fit": int(len(y))})
    return ProbeFit(head=head, weight_decay=0.0, oof_logits=oof, folds=k, method=method,
                    seconds=time.monotonic() - started)


def fit_best_head(features: np.ndarray, targets: Sequence[int], zero_shot: Head, seed: int = 0) -> ProbeFit:
    """The linear probe or the Tip-Adapter cache, whichever scores better out of fold on these samples (the
    probe on ties: it does not keep the training features)."""
    y = np.asarray(targets, dtype=int)
    fits = [fit_linear_probe(features, y, zero_shot, seed), fit_tip_adapter(features, y, zero_shot, seed)]
    return max(fits, key=lambda fit: ((fit.oof_logits.argmax(1) == y).mean(), -nll(fit.oof_logits, y),
                                      fit.head.kind == "linear-probe"))


# ------------------------------------------------------------------------------- the paired rule
PAIRED_CONFIDENCE = 0.8  # P(the more complex candidate is better) needed to leave the simpler one
# ... and to leave zero-shot, the safe default that fits nothing. Publishing a fitted candidate that is worse than
# zero-shot costs the user more than missing a small gain: on the bench (issue 16) 3 of 42 heads favoured at
# P >= 0.8 on 20-80 images lost to zero-shot on test, and the gains missed at 0.95 were within a few points.
ZERO_SHOT_CONFIDENCE = 0.95


def _beta_above_half(a: float, b: float, grid: int = 4001) -> float:
    """P(p > 1/2) for p ~ Beta(a, b), a, b >= 1 (numerically: no scipy in the core)."""
    x = np.linspace(0.0, 1.0, grid)[1:-1]
    log_pdf = (a - 1) * np.log(x) + (b - 1) * np.log1p(-x)
    w = np.exp(log_pdf - log_pdf.max())
    return float(w[x > 0.5].sum() / w.sum())


def paired_evidence(correct_a, correct_b) -> dict:
    """How strongly per-image scores ``correct_a`` beat ``correct_b`` on the SAME images (rows aligned;
    NaN = not judged, dropped pairwise). Scores are 1/0 correctness or its mean over CV repeats.

    McNemar's view, made Bayesian: only images where the two disagree carry evidence. With W = the summed
    margin on images where A is ahead and L = where B is, the chance that A is right more often than B on
    such images is P(p > 1/2) under p ~ Beta(W + 1, L + 1) (a uniform prior). 1 win to 0 gives 0.75, 2 to 0
    0.88, 3 to 1 0.81, 30 to 10 ~1.0: how few the images are is part of the answer, which a fixed "one image"
    margin could not say."""
    a, b = np.asarray(correct_a, dtype=np.float64), np.asarray(correct_b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired scores need the same images: shapes {a.shape} and {b.shape}")
    both = ~(np.isnan(a) | np.isnan(b))
    diff = a[both] - b[both]
    n = int(both.sum())
    wins, losses = float(diff[diff > 0].sum()), float(-diff[diff < 0].sum())
    return {"n": n, "diff": round(float(diff.mean()), 4) if n else 0.0,
            "p_better": round(_beta_above_half(wins + 1, losses + 1), 4) if n else None,
            "wins": round(wins, 2), "losses": round(losses, 2)}


def paired_better(correct_a, correct_b, confidence: float = PAIRED_CONFIDENCE) -> bool:
    """True when the evidence on the same images favours A over B: A is ahead on average and
    ``paired_evidence`` puts P(A better) at ``confidence`` or more. A tie (no image where they differ) is False, so
    the caller keeps the simpler candidate unless the other one earned the switch. Pure (numpy only): the
    early stop and the version comparison reuse it."""
    ev = paired_evidence(correct_a, correct_b)
    return ev["p_better"] is not None and ev["diff"] > 0 and ev["p_better"] >= confidence


# --------------------------------------------------------------------------------------- selection
CV_REPEATS = 3  # repeated stratified k-fold for heads (leave-one-out is deterministic: one repeat)
CV_REPEAT_MAX_N = 400  # above this many images one k-fold repeat is evidence enough (and cheaper)
VIEWS_PER_IMAGE = 4  # augmented views per image that judge 1-shot builds
PRIOR_ALPHA, PRIOR_BETA = 0.01, 5.5  # Tip-Adapter's published setting (alpha 1 at CLIP's logit scale 100)


def fit_prior_head(features: np.ndarray, targets: Sequence[int], zero_shot: Head) -> Head:
    """The head for a build where some class has ONE image: no fold can hold an image out without removing
    its class, so nothing can choose settings from the data. Tip-Adapter's cache at its published setting
    (a training-free prior; bench/RESULTS-selection.md measures it against zero-shot at 1 shot)."""
    y = np.asarray(targets, dtype=int)
    f = _normalise(features)
    onehot = np.eye(zero_shot.n_classes)[y]
    return Head(W=zero_shot.W, b=zero_shot.b, scale=zero_shot.scale, cache_keys=f.astype(np.float32),
                cache_values=onehot.astype(np.float32), cache_alpha=PRIOR_ALPHA * zero_shot.scale,
                cache_beta=PRIOR_BETA, kind="tip-adapter",
                meta={"alpha": PRIOR_ALPHA * zero_shot.scale, "beta": PRIOR_BETA, "n_fit": int(len(y)),
                      "settings": "prior (1 image in some class)"})


@dataclass
class Candidate:
    name: str  # one of config.CANDIDATES
    head: Head  # what is published: refit on every image it may see, calibrated, with its open-set data
    uses_mask: bool
    accuracy: float | None = None  # mean of ``correct`` over the rows it was judged on
    n: int = 0  # rows judged
    method: str = "not validated"  # "repeated nested k-fold" | "nested leave-one-out" | "holdout" | "all images" | "augmented views"
    logits: np.ndarray | None = None  # [rows, C] out-of-sample logits, NaN rows where not judged
    calibration: dict | None = None
    ready_s: float | None = None  # seconds from the start of the build until this candidate existed
    correct: np.ndarray | None = None  # [rows] per-row correctness in [0, 1] (mean over CV repeats), NaN = not judged
    refit: str | None = None  # what the published head was fitted on, when not what was judged
    features: np.ndarray | None = None  # raw features of every image, as this candidate's head receives them
    # [images, C] logits of the ORIGINAL images where the rows are augmented views (1 shot) and the candidate fits
    # nothing (zero-shot): its calibration and min_score come from these. Views are harder than the images a
    # user sends (zero-shot was right on 9-35% of the views, 38-100% of the originals, 41-86% of the test
    # images on the bench) and a T fitted on them made every score too low (test ECE 0.26-0.46 on "plain").
    original_logits: np.ndarray | None = None

    def row(self) -> dict:
        return {"name": self.name, "kind": self.head.kind, "uses_mask": self.uses_mask,
                "accuracy": None if self.accuracy is None else round(self.accuracy, 4), "n": self.n,
                "method": self.method, "ready_s": None if self.ready_s is None else round(self.ready_s, 2),
                **({"refit": self.refit} if self.refit else {})}


def pick(candidates: Sequence[Candidate], select: str = "auto", confidence: float = PAIRED_CONFIDENCE,
         zero_shot_confidence: float = ZERO_SHOT_CONFIDENCE) -> tuple[Candidate, str, list[dict]]:
    """(chosen candidate, why, the paired comparisons that decided). ``select`` pins a candidate by name.

    "auto": the simplest candidate (config.CANDIDATES order) is the champion; each more complex candidate
    challenges the champion on the images both were judged on and takes its place only when
    ``paired_better`` says the evidence favours it. Fewer fitted parameters generalise more predictably, so a
    tie stays with the simpler one; a clear margin does not. Leaving zero-shot (the safe default: it fits
    nothing, so its validation is exact) takes ``zero_shot_confidence`` for the whole family of challengers
    that face it (weighted Bonferroni): each gets a share of 1 - zero_shot_confidence in proportion to the
    images it was judged on, so three challengers do not triple the chance that a lucky one replaces the safe
    default (on the bench a mask with 4 wins and no loss on 10 holdout images, P = 0.97, lost 7 points on
    test), and a head judged on every image keeps most of the allowance. The weights are fixed by the counts
    before any comparison. Choosing among fitted candidates takes ``confidence``."""
    by_name = {c.name: c for c in candidates}
    if select != "auto":
        if select not in by_name:
            raise ValueError(f"select={select!r}: that candidate was not built (built: {', '.join(by_name)})")
        return by_name[select], f"pinned by config.select={select!r}", []
    order = {name: i for i, name in enumerate(CANDIDATES)}
    scored = sorted((c for c in candidates if c.correct is not None and c.n > 0), key=lambda c: order[c.name])
    if not scored:
        return by_name["zero-shot"], "no candidate could be validated: zero-shot, which fits nothing", []
    champion, decisions = scored[0], []
    judged = sum(c.n for c in scored[1:])
    leave_zero_shot = {c.name: round(1 - (1 - zero_shot_confidence) * c.n / judged, 4) for c in scored[1:]}
    for challenger in scored[1:]:
        ev = paired_evidence(challenger.correct, champion.correct)
        need = leave_zero_shot[challenger.name] if champion.name == "zero-shot" else confidence
        won = ev["p_better"] is not None and ev["diff"] > 0 and ev["p_better"] >= need
        decisions.append({"challenger": challenger.name, "champion": champion.name, **ev, "needed": need,
                          "switched": won})
        if won:
            champion = challenger
    if not decisions:
        why = f"the only judged candidate ({champion.accuracy:.3f} on {champion.n})"
    elif champion is scored[0]:
        need = (", ".join(f"{d['needed']} for {d['challenger']}" for d in decisions)
                if champion.name == "zero-shot" else confidence)
        why = (f"no candidate beat {champion.name} by a paired margin (P(better) >= {need}) on the same "
               f"images: the simpler one stays")
    else:
        d = [d for d in decisions if d["challenger"] == champion.name][-1]
        why = (f"{champion.name} beat {d['champion']} on the same {d['n']} images ({d['wins']} wins, {d['losses']} "
               f"losses, +{d['diff']:.3f}; P(better) = {d['p_better']:.2f} >= {d['needed']})")
        later = [x for x in decisions if x["champion"] == champion.name and not x["switched"]]
        if later:
            why += "; " + ", ".join(f"{x['challenger']} did not beat it (P = {x['p_better']})" for x in later)
    return champion, why, decisions


@dataclass
class Validation:
    """How candidates are judged."""

    method: str  # "repeated nested k-fold" | "nested leave-one-out" | "augmented views"  (heads); masks: "holdout"
    n: int
    folds: int | None = None
    repeats: int | None = None


def has_holdout(class_counts: Sequence[int], config: TuneConfig) -> bool:
    """A holdout (for judging the mask, whose tuning is too dear to cross-validate) exists when the config asks
    for one and every class has enough images to spare some."""
    return config.holdout > 0 and min(class_counts) >= MIN_PER_CLASS_FOR_HOLDOUT


@one_blas_thread()
def cross_validated_head(features: np.ndarray, targets: np.ndarray, zero_shot: Head, seed: int = 0
                         ) -> tuple[ProbeFit, np.ndarray, np.ndarray, str, int, int]:
    """(fit on all images, per-image correctness averaged over repeats, logits of the first repeat,
    method, folds, repeats): NESTED repeated stratified k-fold (leave-one-out for <= LOO_MAX images).

    The head's own settings (probe or cache, weight decay, alpha/beta) are chosen by a k-fold over the images it
    is fitted on (``fit_best_head``). Judging it by that same k-fold's out-of-fold logits scored the best of
    ~30 settings on the very folds that chose it: on the bench the head looked 3-20 points better than zero-shot
    where it was not (issue 16: three heads published that lost on test). Here each outer fold's images are
    predicted by the WHOLE procedure (settings chosen by an inner k-fold) run on the other folds only: what the
    published head, refit the same way on every image, will do on a new one."""
    y = np.asarray(targets, dtype=int)
    method, k = validation_folds(len(y))
    repeats = 1 if method == "leave-one-out" or len(y) > CV_REPEAT_MAX_N else CV_REPEATS
    correct = np.zeros(len(y))
    first_logits = None
    for r in range(repeats):
        fold = np.arange(len(y)) if method == "leave-one-out" else stratified_folds(y, k, seed + r)
        logits = np.empty((len(y), zero_shot.n_classes))
        for j in range(int(fold.max()) + 1):
            train, held = fold != j, fold == j
            inner = fit_best_head(features[train], y[train], zero_shot, seed=seed + r)
            logits[held] = inner.head.logits(features[held])
        correct += logits.argmax(1) == y
        if first_logits is None:
            first_logits, folds = logits, int(fold.max()) + 1
    fit = fit_best_head(features, y, zero_shot, seed=seed)  # the published head: same procedure, every image
    return (fit, correct / repeats, first_logits, ("repeated nested k-fold" if repeats > 1 else f"nested {method}"),
            folds, repeats)


@dataclass
class Selection:
    """Builds the candidates step by step (cheap ones first, each announced through ``on_candidate`` as soon
    as it exists) and picks the one to publish.

    Every image judges: zero-shot (fits nothing) on all of them, heads by repeated stratified k-fold over all
    of them (train and holdout alike: they are refit in milliseconds), the mask candidates on the holdout
    their tuning never saw. With a class of ONE image (1 shot), rows are augmented views of the images
    instead (``add_views``) and the head comes from a prior (``fit_prior_head``).

    ``train_targets`` / ``held_targets`` are class indices; ``held_indices`` / ``train_indices`` are the
    positions of those images in the caller's upload list (for the misclassified-samples list).
    """

    zero_shot: Head
    labels: list[str]
    config: TuneConfig
    train_targets: Sequence[int]
    held_targets: Sequence[int] = ()
    train_indices: Sequence[int] | None = None
    held_indices: Sequence[int] | None = None
    on_candidate: OnCandidate | None = None
    started: float = field(default_factory=time.monotonic)
    candidates: dict[str, Candidate] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def __post_init__(self):
        self.train_targets = np.asarray(self.train_targets, dtype=int)
        self.held_targets = np.asarray(self.held_targets, dtype=int)
        self.holdout = len(self.held_targets) > 0
        self.targets = np.concatenate([self.train_targets, self.held_targets])
        self.n_train = len(self.train_targets)
        indices = None
        if self.train_indices is not None:
            indices = list(self.train_indices) + list(self.held_indices or [])
        self.indices = indices
        counts = np.bincount(self.targets, minlength=len(self.labels))
        self.one_shot = bool(counts.min() < 2)
        self.view_targets: np.ndarray | None = None
        self.view_sources: np.ndarray | None = None
        self.view_features: np.ndarray | None = None
        method, k = validation_folds(len(self.targets))
        if self.one_shot:
            self.validation = Validation("augmented views", 0)
        elif method == "leave-one-out" or len(self.targets) > CV_REPEAT_MAX_N:
            self.validation = Validation(f"nested {method}", len(self.targets), min(k, len(self.targets)), 1)
        else:
            self.validation = Validation("repeated nested k-fold", len(self.targets), k, CV_REPEATS)
        self.decisions: list[dict] = []

    # ---- rows ----------------------------------------------------------------------------------------
    @property
    def row_targets(self) -> np.ndarray:
        """The targets of the rows candidates are judged on: every image, or its views at 1 shot."""
        return self.view_targets if self.one_shot else self.targets

    @property
    def val_targets(self) -> np.ndarray:  # the name earlier callers use
        return self.row_targets

    def add_views(self, features: np.ndarray, sources: Sequence[int]) -> None:
        """Raw base features of augmented views; ``sources[i]`` = position (train then held) of the image
        view i came from. Judges 1-shot builds, where no image can be held out without removing its class."""
        self.view_sources = np.asarray(sources, dtype=int)
        self.view_targets = self.targets[self.view_sources]
        self.view_features = np.asarray(features)
        self.validation = Validation("augmented views", len(self.view_targets))

    # ---- building ------------------------------------------------------------------------------------
    @property
    def can_judge_masks(self) -> bool:
        return self.holdout

    @property
    def wants_masks(self) -> bool:
        """Whether tuning is worth running: its candidates can be judged, or the user pinned one."""
        return self.can_judge_masks or self.config.select in ("mask", "mask+head")

    def _add(self, candidate: Candidate) -> Candidate:
        candidate.ready_s = time.monotonic() - self.started
        if candidate.features is not None and len(candidate.features):
            candidate.head.with_outlier(candidate.features, reference=self.zero_shot.W)
        if candidate.original_logits is not None:
            candidate.calibration = calibrate(candidate.original_logits, self.targets,
                                              source="every image (zero-shot fits nothing: all are out of sample)")
            candidate.head.temperature = candidate.calibration["temperature"]
        elif candidate.logits is not None:
            judged = ~np.isnan(candidate.logits).any(axis=1)
            source = ("augmented views of the training images (optimistic: the head has seen their originals)"
                      if candidate.method == "augmented views" else f"{candidate.method}, out of sample")
            candidate.calibration = calibrate(candidate.logits[judged], self.row_targets[judged], source=source)
            candidate.head.temperature = candidate.calibration["temperature"]
        self.candidates[candidate.name] = candidate
        if self.on_candidate is not None:
            try:
                self.on_candidate(candidate.name, candidate.head, candidate.uses_mask, candidate.accuracy)
            except Exception:  # a preview that could not be published must not fail the build
                log.exception("on_candidate(%s) failed; the build goes on", candidate.name)
                self.warnings.append(f"the {candidate.name} preview could not be published (see the worker log)")
        return candidate

    def _judged(self, name: str, head: Head, uses_mask: bool, logits: np.ndarray, correct: np.ndarray,
                method: str, features: np.ndarray, refit: str | None = None) -> Candidate:
        judged = ~np.isnan(correct)
        acc = float(correct[judged].mean()) if judged.any() else None
        return Candidate(name, head, uses_mask, acc, int(judged.sum()), method, logits, correct=correct,
                         refit=refit, features=features)

    def _rows(self, values: np.ndarray, where: np.ndarray) -> np.ndarray:
        """[rows, ...] filled with NaN except ``where`` (a boolean over rows) = ``values``."""
        out = np.full((len(self.row_targets), *values.shape[1:]), np.nan)
        out[where] = values
        return out

    @staticmethod
    def _all(train_features, held_features) -> np.ndarray:
        return train_features if held_features is None or not len(held_features) else np.concatenate(
            [train_features, held_features])

    def add_zero_shot(self, train_features: np.ndarray, held_features: np.ndarray | None = None) -> Candidate:
        head = copy.deepcopy(self.zero_shot)
        feats = self._all(train_features, held_features)
        rows = self.view_features if self.one_shot and self.view_features is not None else feats
        if self.one_shot and self.view_features is None:
            return self._add(Candidate("zero-shot", head, False, features=feats))
        logits = head.logits(rows).astype(np.float64)
        correct = (logits.argmax(1) == self.row_targets).astype(float)
        method = "augmented views" if self.one_shot else "all images"  # zero-shot fits nothing: every image judges it
        candidate = self._judged("zero-shot", head, False, logits, correct, method, feats)
        if self.one_shot:
            candidate.original_logits = head.logits(feats).astype(np.float64)
        return self._add(candidate)

    def add_head(self, train_features: np.ndarray, held_features: np.ndarray | None = None) -> Candidate:
        feats = self._all(train_features, held_features)
        if self.one_shot:
            head = fit_prior_head(feats, self.targets, self.zero_shot)
            if self.view_features is None:
                return self._add(Candidate("head", head, False, features=feats))
            logits = head.logits(self.view_features).astype(np.float64)
            correct = (logits.argmax(1) == self.row_targets).astype(float)
            return self._add(self._judged("head", head, False, logits, correct, "augmented views", feats))
        fit, correct, logits, method, _, _ = cross_validated_head(feats, self.targets, self.zero_shot, self.config.seed)
        return self._add(self._judged("head", fit.head, False, logits, correct, method, feats,
                                      refit=f"all {len(self.targets)} images"))

    def add_masked(self, train_features: np.ndarray, held_features: np.ndarray | None = None) -> list[Candidate]:
        """The mask-tuned encoder's features: the zero-shot head on them ("mask") and a head on them, judged on
        the holdout the tuning never saw; the head is then refit on every image."""
        feats = self._all(train_features, held_features)
        if not self.can_judge_masks:
            head = copy.deepcopy(self.zero_shot)
            fitted = (fit_prior_head(feats, self.targets, self.zero_shot) if self.one_shot else
                      fit_best_head(feats, self.targets, self.zero_shot, seed=self.config.seed).head)
            return [self._add(Candidate("mask", head, True, features=feats)),
                    self._add(Candidate("mask+head", fitted, True, features=feats))]
        held = np.zeros(len(self.targets), bool)
        held[self.n_train:] = True
        zs = copy.deepcopy(self.zero_shot)
        z = zs.logits(held_features).astype(np.float64)
        mask = self._judged("mask", zs, True, self._rows(z, held),
                            self._rows((z.argmax(1) == self.held_targets).astype(float), held), "holdout", feats)
        on_train = fit_best_head(train_features, self.train_targets, self.zero_shot, seed=self.config.seed)
        h = on_train.head.logits(held_features).astype(np.float64)
        everything = fit_best_head(feats, self.targets, self.zero_shot, seed=self.config.seed)
        mask_head = self._judged("mask+head", everything.head, True, self._rows(h, held),
                                 self._rows((h.argmax(1) == self.held_targets).astype(float), held), "holdout", feats,
                                 refit=f"all {len(self.targets)} images (judged as fitted on the {self.n_train} "
                                       "training images)")
        return [self._add(mask), self._add(mask_head)]

    # ---- choosing ------------------------------------------------------------------------------------
    def finish(self, extra_warnings: Sequence[str] = ()) -> tuple[Candidate, dict]:
        """(published candidate, the report's ``validation`` dict)."""
        chosen, why, decisions = pick(list(self.candidates.values()), self.config.select)
        self.decisions = decisions
        warnings = [*extra_warnings, *self.warnings]
        zs, mask = self.candidates.get("zero-shot"), self.candidates.get("mask")
        if not self.can_judge_masks:
            counts = np.bincount(self.targets, minlength=len(self.labels))
            few = [self.labels[i] for i in np.flatnonzero(counts < MIN_PER_CLASS_FOR_HOLDOUT)]
            reason = ("holdout is 0" if self.config.holdout <= 0 else
                      f"{len(few)} class(es) have fewer than {MIN_PER_CLASS_FOR_HOLDOUT} images "
                      f"(e.g. {few[0]!r})" if few else "no holdout")
            if self.config.select in ("mask", "mask+head"):
                warnings.append(f"too few images to validate: {reason}, so the mask-tuned candidate "
                                f"{self.config.select!r} is published UNVALIDATED because config.select pins it")
            else:
                warnings.append(f"too few images to validate mask tuning: {reason}; heads were judged by "
                                f"{self.validation.method} on {self.validation.n} rows and the mask was not tuned "
                                f"(upload >= {MIN_PER_CLASS_FOR_HOLDOUT} images per class to have it judged, or pin "
                                "config.select='mask')")
        if self.one_shot:
            warnings.append("a class has a single image: the head's settings come from a prior (Tip-Adapter's "
                            "published alpha/beta) and candidates were compared on augmented views of the images, "
                            "which flatters any fitted head; treat the accuracies as optimistic")
        if mask is not None and zs is not None and mask.accuracy is not None and zs.correct is not None:
            held = ~np.isnan(mask.correct)
            zs_held = float(zs.correct[held].mean())
            if mask.accuracy < zs_held:
                warnings.append(f"tuned below zero-shot: the mask-tuned encoder scored {mask.accuracy:.3f} vs "
                                f"zero-shot {zs_held:.3f} on {mask.n} holdout images")
        if chosen.accuracy is not None and chosen.n < 20:
            warnings.append(f"validated on only {chosen.n} images: accuracies move in steps of {1 / chosen.n:.2f}")
        report = {
            "published": chosen.name,
            "published_accuracy": chosen.accuracy,
            "published_kind": chosen.head.kind,
            "uses_mask": chosen.uses_mask,
            "why": why,
            "decided_by": ("pinned" if self.config.select != "auto" else
                           "prior + augmented views (1 image in some class)" if self.one_shot else
                           "paired comparison on the same images (Bayesian McNemar)"),
            "comparisons": decisions,
            "select": self.config.select,
            "candidates": [c.row() for c in self.candidates.values()],
            "validated_by": {"method": self.validation.method, "n": self.validation.n,
                             **({"folds": self.validation.folds} if self.validation.folds else {}),
                             **({"repeats": self.validation.repeats} if self.validation.repeats else {})},
            "n_holdout": len(self.held_targets),
            "zero_shot_accuracy": zs.accuracy if zs else None,
            "tuned_accuracy": mask.accuracy if mask else None,
            "warnings": warnings,
            "temperature": chosen.head.temperature,
            "ece_before": None, "ece_after": None, "min_score": None, "max_outlier": None,
        }
        if chosen.refit:
            report["refit"] = chosen.refit
        if chosen.calibration is not None:
            cal = chosen.calibration
            report |= {"ece_before": cal["ece_before"], "ece_after": cal["ece_after"], "calibration": cal,
                       "ece_n": cal["n"], "ece_floor": cal.get("ece_floor"),
                       "mean_top_score": cal["mean_top_score"]}
        report |= self._unknown_defaults(chosen)
        if chosen.logits is not None and len(self.row_targets):
            report |= self._errors(chosen)
        return chosen, report

    def _unknown_defaults(self, chosen: Candidate) -> dict:
        """Default min_score and max_outlier, set on the user's own images so that together they turn at most
        ~5% of in-distribution images into "unknown", with a small-n safeguard: each is an upper (lower) normal
        tolerance bound, at 90% confidence, of the 97.5th (2.5th) percentile of what the user's images score.

        max_outlier is 0.5: the open-set score is fitted so (``head.fit_outlier``) on the distances of every
        image to the class texts, which do not depend on the images, so each is an honest in-distribution
        sample. min_score comes from the out-of-sample top scores (``calibration.tolerance_min_score``; at one
        image per class zero-shot's are those of the images themselves, a fitted head's those of augmented views,
        counted as the images they came from). With 5-10 images a
        plain percentile is read off the one or two most extreme of them and rejected 20-48% of new
        in-distribution images on the bench; the bound widens by how far such an estimate can be off. The
        report says what the pair rejects of the user's own images."""
        out: dict = {}
        c = len(self.labels)
        outlier = None
        if chosen.head.has_outlier and chosen.features is not None and len(chosen.features):
            outlier = chosen.head.outlier_scores(chosen.features).astype(np.float64)
            out["max_outlier"] = 0.5
        top = None
        same_rows = not self.one_shot  # outlier scores are per image; top scores per row (views at 1 shot)
        if chosen.original_logits is not None:
            top = softmax(chosen.original_logits / chosen.head.temperature).max(axis=1)
            out["min_score"] = round(tolerance_min_score(top, c), 4)
            same_rows = True
        elif chosen.logits is not None:
            judged = ~np.isnan(chosen.logits).any(axis=1)
            probs = softmax(chosen.logits[judged] / chosen.head.temperature)
            top = np.full(len(self.row_targets), np.nan)
            top[judged] = probs.max(axis=1)
            images = (len(np.unique(self.view_sources[judged])) if self.one_shot and self.view_sources is not None
                      else int(judged.sum()))
            out["min_score"] = round(tolerance_min_score(top[judged], c, n_effective=images), 4)
        rejected: dict = {"n": None}
        if outlier is not None:
            rejected["by_outlier"] = round(float((outlier > out["max_outlier"]).mean()), 4)
        if top is not None:
            judged = ~np.isnan(top)
            rejected["by_score"] = round(float((top[judged] < out["min_score"]).mean()), 4)
            if outlier is not None and same_rows:  # every image
                both = judged & ((outlier > out["max_outlier"]) | (top < out["min_score"]))
                rejected["either"] = round(float(both[judged].mean()), 4)
                rejected["n"] = int(judged.sum())
        out["unknown_defaults"] = {
            "min_score": out.get("min_score"), "max_outlier": out.get("max_outlier"),
            "rejected_in_distribution": rejected,
            "rule": (f"each threshold is a 90%-confidence tolerance bound of the {UNKNOWN_TAIL:.1%} tail of the "
                     "user's own images (distances to the class texts; out-of-sample top scores), so together they "
                     "reject at most ~5% of images like them even when estimated from a handful"),
        }
        return out

    def _errors(self, chosen: Candidate) -> dict:
        judged = ~np.isnan(chosen.logits).any(axis=1)
        rows = np.flatnonzero(judged)
        pred = chosen.logits[judged].argmax(1)
        y = self.row_targets[judged]
        c = len(self.labels)
        conf = np.zeros((c, c), dtype=int)
        np.add.at(conf, (y, pred), 1)
        per_class = {self.labels[i]: (round(float(conf[i, i] / conf[i].sum()), 4) if conf[i].sum() else None)
                     for i in range(c)}
        probs = softmax(chosen.logits[judged] / chosen.head.temperature)
        wrong = []
        for k in np.flatnonzero(pred != y):
            row = int(rows[k])
            image = int(self.view_sources[row]) if self.one_shot and self.view_sources is not None else row
            wrong.append({"index": int(self.indices[image]) if self.indices is not None else image,
                          "true": self.labels[y[k]], "predicted": self.labels[pred[k]],
                          "score": round(float(probs[k, pred[k]]), 4)})
        return {"per_class_accuracy": per_class, "confusion_matrix": conf.tolist(), "misclassified": wrong}




# ------------------------------------------------------------------------------------- one build's run
@dataclass
class CandidateRun:
    published: Candidate
    validation: dict  # the manifest's "validation"
    tuning: object | None  # tuning.TuneResult when the mask was tuned, else None
    selection: Selection


def run_candidates(model, zero_shot: Head, labels: list[str], config: TuneConfig, train_batch: np.ndarray,
                   train_targets: Sequence[int], held_batch: np.ndarray | None, held_targets: Sequence[int],
                   tune_fn: Callable[[], object], on_candidate: OnCandidate | None = None,
                   train_indices: Sequence[int] | None = None, held_indices: Sequence[int] | None = None,
                   extra_warnings: Sequence[str] = (), started: float | None = None) -> CandidateRun:
    """Every candidate of one build, cheap ones first, and the selection.

    ``model`` is the CLIP model whose image features the heads read; ``*_batch`` are preprocessed images
    (eval transform); ``tune_fn()`` attaches masks to ``model``, tunes them in place and returns the
    TuneResult; it is only called when its candidates can be judged or are pinned (``Selection.wants_masks``).
    ``on_candidate(name, head, uses_mask, accuracy)`` fires as each candidate is ready: zero-shot and the
    fitted head before tuning starts, so a service can answer with them at once.
    """
    selection = Selection(zero_shot, labels, config, train_targets, held_targets, train_indices=train_indices,
                          held_indices=held_indices, on_candidate=on_candidate,
                          **({"started": started} if started is not None else {}))
    has_held = held_batch is not None and len(held_targets) > 0
    base_train = encode_images(model, train_batch)
    base_held = encode_images(model, held_batch) if has_held else None
    if selection.one_shot:
        everything = train_batch if not has_held else np.concatenate([train_batch, held_batch])
        views, sources = augmented_views(everything, VIEWS_PER_IMAGE, seed=config.seed)
        selection.add_views(encode_images(model, views), sources)
    selection.add_zero_shot(base_train, base_held)
    selection.add_head(base_train, base_held)
    tuning = None
    warnings = list(extra_warnings)
    if selection.wants_masks:
        tuning = tune_fn()
        warnings += list(getattr(tuning, "warnings", []))
        selection.add_masked(encode_images(model, train_batch), encode_images(model, held_batch) if has_held else None)
    chosen, validation = selection.finish(warnings)
    return CandidateRun(chosen, validation, tuning, selection)


def augmented_views(batch: np.ndarray, per_image: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``per_image`` random views of each preprocessed image [N, 3, H, W]: a resized crop of 60-90% of the
    side at a random place, flipped half the time (the training augmentation's family, a little milder).
    Returns (views [N * per_image, 3, H, W], the source image of each view)."""
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(seed)
    n, _, h, w = batch.shape
    out = np.empty((n * per_image, *batch.shape[1:]), dtype=np.float32)
    sources = np.repeat(np.arange(n), per_image)
    for row, i in enumerate(sources):
        side = rng.uniform(0.6, 0.9)
        ch, cw = max(1, int(round(h * side))), max(1, int(round(w * side)))
        top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        crop = torch.from_numpy(np.ascontiguousarray(batch[i:i + 1, :, top:top + ch, left:left + cw]))
        view = F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False)[0]
        if rng.random() < 0.5:
            view = view.flip(-1)
        out[row] = view.numpy()
    return out, sources
