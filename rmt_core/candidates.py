"""Candidates and one selection: never publish a classifier worse than its baseline (issue 10).

Every build can publish one of four candidates over one shared frozen base (simplest first):

    zero-shot   CLIP's own head (class text embeddings) on the base encoder's features
    head        a head fitted on the base features in about a second (numpy): a linear probe initialised
                from the class text embeddings and pulled back toward them (weight decay toward the init),
                or Tip-Adapter's training-free cache model, whichever scores better out of fold
    mask        the zero-shot head on the mask-tuned encoder's features (the configured method)
    mask+head   the fitted head on the mask-tuned encoder's features (the paper's Table 3 combination)

Validation. When every class has at least MIN_PER_CLASS_FOR_HOLDOUT images, a seeded per-class holdout is
set aside before anything is fitted and all four candidates are scored on it. Otherwise every image trains,
heads are scored by k-fold (leave-one-out for <= LOO_MAX images) on the frozen features, which costs
milliseconds, and zero-shot on all images (it fits nothing). A mask cannot be cross-validated at that price
(one tuning run per fold), so without a holdout the mask candidates are not tuned at all under
``select="auto"``: they could not be judged, and an unjudged model is never published automatically. The
report says so; pinning ``select="mask"`` tunes and publishes it unvalidated.

Selection: the best validation accuracy wins; a candidate within one validation sample (1/n) of the best
counts as a tie and ties go to the simpler candidate (zero-shot < head < mask < mask+head), since fewer
fitted parameters generalise more predictably from a small validation set. The published head then gets a
temperature fitted on its validation logits (calibration.py), baked into ``Head.temperature``.
"""
from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from .calibration import calibrate, nll, softmax
from .config import CANDIDATES, MIN_PER_CLASS_FOR_HOLDOUT, TuneConfig
from .head import Head

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
    Nesterov's accelerated gradient with step 1/L converges without a line search.
    """
    n, d = f.shape
    onehot = np.eye(n_classes)[y]
    delta, b = (np.zeros((n_classes, d)), np.zeros(n_classes)) if start is None else (start[0].copy(), start[1].copy())
    step = 1.0 / (1.0 + 2.0 * weight_decay)
    momentum = (1 - np.sqrt(2 * weight_decay * step)) / (1 + np.sqrt(2 * weight_decay * step))
    prev_delta, prev_b = delta.copy(), b.copy()
    for _ in range(max_iter):
        look_delta = delta + momentum * (delta - prev_delta)
        look_b = b + momentum * (b - prev_b)
        p = softmax(z0 + f @ look_delta.T + look_b)
        r = (p - onehot) / n
        g_delta = r.T @ f + 2 * weight_decay * look_delta
        g_b = r.sum(0) + 2 * weight_decay * look_b
        prev_delta, prev_b = delta, b
        delta, b = look_delta - step * g_delta, look_b - step * g_b
        if np.sqrt((g_delta ** 2).sum() + (g_b ** 2).sum()) < tol:
            break
    return delta, b


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
        oof = np.empty((len(y), c))
        for j in range(k):
            train, held = fold != j, fold == j
            if not train.any():
                oof[held] = z0[held]
                continue
            delta, b = warm[j] = _fit_residual(f[train], z0[train], y[train], c, wd, start=warm.get(j))
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


# --------------------------------------------------------------------------------------- selection
@dataclass
class Candidate:
    name: str  # one of config.CANDIDATES
    head: Head  # calibrated (temperature set) once validated
    uses_mask: bool
    accuracy: float | None = None
    n: int = 0
    method: str = "not validated"  # holdout | k-fold | leave-one-out | all images | not validated
    logits: np.ndarray | None = None  # uncalibrated validation logits, rows aligned with Selection.val_targets
    calibration: dict | None = None
    ready_s: float | None = None  # seconds from the start of the build until this candidate existed

    def row(self) -> dict:
        return {"name": self.name, "kind": self.head.kind, "uses_mask": self.uses_mask,
                "accuracy": None if self.accuracy is None else round(self.accuracy, 4), "n": self.n,
                "method": self.method, "ready_s": None if self.ready_s is None else round(self.ready_s, 2)}


def pick(candidates: Sequence[Candidate], select: str = "auto") -> tuple[Candidate, str]:
    """(chosen candidate, why). ``select`` pins a candidate by name; "auto" takes the best validated
    accuracy, and any candidate within one validation sample (1/n) of it that is simpler wins the tie."""
    by_name = {c.name: c for c in candidates}
    if select != "auto":
        if select not in by_name:
            raise ValueError(f"select={select!r}: that candidate was not built (built: {', '.join(by_name)})")
        return by_name[select], f"pinned by config.select={select!r}"
    scored = [c for c in candidates if c.accuracy is not None]
    if not scored:
        return by_name["zero-shot"], "no candidate could be validated: zero-shot, which fits nothing"
    best = max(c.accuracy for c in scored)
    n = min(c.n for c in scored)
    tolerance = 1.0 / max(n, 1) + 1e-9
    order = {name: i for i, name in enumerate(CANDIDATES)}
    chosen = min((c for c in scored if c.accuracy >= best - tolerance), key=lambda c: order[c.name])
    top = max(scored, key=lambda c: (c.accuracy, -order[c.name]))
    if chosen is top:
        return chosen, f"best validation accuracy ({chosen.accuracy:.3f} on {chosen.n} images)"
    return chosen, (f"within one validation image of the best ({top.name} {top.accuracy:.3f} vs {chosen.accuracy:.3f} "
                    f"on {n} images): the simpler candidate wins the tie")


@dataclass
class Validation:
    """How candidates are judged. ``held`` empty = no holdout (k-fold on features for heads)."""

    method: str  # "holdout" | "k-fold" | "leave-one-out"
    n: int
    folds: int | None = None


def has_holdout(class_counts: Sequence[int], config: TuneConfig) -> bool:
    """A holdout exists when the config asks for one and every class has enough images to spare some."""
    return config.holdout > 0 and min(class_counts) >= MIN_PER_CLASS_FOR_HOLDOUT


@dataclass
class Selection:
    """Builds the candidates step by step (cheap ones first, each announced through ``on_candidate`` as soon
    as it exists) and picks the one to publish.

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
        if self.holdout:
            self.validation = Validation("holdout", len(self.held_targets))
            self.val_targets = self.held_targets
            self.val_indices = list(self.held_indices) if self.held_indices is not None else None
        else:
            method, k = validation_folds(len(self.train_targets))
            self.validation = Validation(method, len(self.train_targets), min(k, len(self.train_targets)))
            self.val_targets = self.train_targets
            self.val_indices = list(self.train_indices) if self.train_indices is not None else None

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
        if candidate.logits is not None:
            candidate.calibration = calibrate(candidate.logits, self.val_targets, want_min_score=self.config.unknown)
            candidate.head.temperature = candidate.calibration["temperature"]
        self.candidates[candidate.name] = candidate
        if self.on_candidate is not None:
            try:
                self.on_candidate(candidate.name, candidate.head, candidate.uses_mask, candidate.accuracy)
            except Exception:  # a preview that could not be published must not fail the build
                log.exception("on_candidate(%s) failed; the build goes on", candidate.name)
                self.warnings.append(f"the {candidate.name} preview could not be published (see the worker log)")
        return candidate

    def _scored(self, name: str, head: Head, uses_mask: bool, logits: np.ndarray, method: str) -> Candidate:
        acc = float((logits.argmax(1) == self.val_targets).mean()) if len(self.val_targets) else None
        return Candidate(name, head, uses_mask, acc, len(self.val_targets), method, logits)

    def add_zero_shot(self, train_features: np.ndarray, held_features: np.ndarray | None = None) -> Candidate:
        head = copy.deepcopy(self.zero_shot)
        feats = held_features if self.holdout else train_features
        method = "holdout" if self.holdout else "all images"  # zero-shot fits nothing: every image validates it
        return self._add(self._scored("zero-shot", head, False, head.logits(feats).astype(np.float64), method))

    def _head_candidate(self, name: str, uses_mask: bool, train_features, held_features) -> Candidate:
        fit = fit_best_head(train_features, self.train_targets, self.zero_shot, seed=self.config.seed)
        if self.holdout:
            return self._scored(name, fit.head, uses_mask, fit.head.logits(held_features).astype(np.float64),
                                "holdout")
        return self._scored(name, fit.head, uses_mask, fit.oof_logits, fit.method)

    def add_head(self, train_features: np.ndarray, held_features: np.ndarray | None = None) -> Candidate:
        return self._add(self._head_candidate("head", False, train_features, held_features))

    def add_masked(self, train_features: np.ndarray, held_features: np.ndarray | None = None) -> list[Candidate]:
        """The mask-tuned encoder's features: the zero-shot head on them ("mask") and a probe on them."""
        if not self.can_judge_masks:
            head = copy.deepcopy(self.zero_shot)
            fit = fit_best_head(train_features, self.train_targets, self.zero_shot, seed=self.config.seed)
            return [self._add(Candidate("mask", head, True)), self._add(Candidate("mask+head", fit.head, True))]
        zs = copy.deepcopy(self.zero_shot)
        mask = self._scored("mask", zs, True, zs.logits(held_features).astype(np.float64), "holdout")
        return [self._add(mask), self._add(self._head_candidate("mask+head", True, train_features, held_features))]

    # ---- choosing ------------------------------------------------------------------------------------
    def finish(self, extra_warnings: Sequence[str] = ()) -> tuple[Candidate, dict]:
        """(published candidate, the report's ``validation`` dict)."""
        chosen, why = pick(list(self.candidates.values()), self.config.select)
        warnings = [*extra_warnings, *self.warnings]
        zs, mask = self.candidates.get("zero-shot"), self.candidates.get("mask")
        if not self.can_judge_masks:
            counts = np.bincount(np.concatenate([self.train_targets, self.held_targets]), minlength=len(self.labels))
            few = [self.labels[i] for i in np.flatnonzero(counts < MIN_PER_CLASS_FOR_HOLDOUT)]
            reason = ("holdout is 0" if self.config.holdout <= 0 else
                      f"{len(few)} class(es) have fewer than {MIN_PER_CLASS_FOR_HOLDOUT} images "
                      f"(e.g. {few[0]!r})" if few else "no holdout")
            if self.config.select in ("mask", "mask+head"):
                warnings.append(f"too few images to validate: {reason}, so the mask-tuned candidate "
                                f"{self.config.select!r} is published UNVALIDATED because config.select pins it")
            else:
                warnings.append(f"too few images to validate mask tuning: {reason}; heads were judged by "
                                f"{self.validation.method} on {self.validation.n} images and the mask was not tuned "
                                f"(upload >= {MIN_PER_CLASS_FOR_HOLDOUT} images per class to have it judged, or pin "
                                "config.select='mask')")
        if mask is not None and zs is not None and mask.accuracy is not None and mask.accuracy < zs.accuracy:
            warnings.append(f"tuned below zero-shot: the mask-tuned encoder scored {mask.accuracy:.3f} vs zero-shot "
                            f"{zs.accuracy:.3f} on {mask.n} holdout images")
        if chosen.accuracy is not None and chosen.n < 20:
            warnings.append(f"validated on only {chosen.n} images: accuracies move in steps of {1 / chosen.n:.2f}")
        report = {
            "published": chosen.name,
            "published_accuracy": chosen.accuracy,
            "published_kind": chosen.head.kind,
            "uses_mask": chosen.uses_mask,
            "why": why,
            "select": self.config.select,
            "candidates": [c.row() for c in self.candidates.values()],
            "validated_by": {"method": self.validation.method, "n": self.validation.n,
                             **({"folds": self.validation.folds} if self.validation.folds else {})},
            "n_holdout": len(self.held_targets),
            "zero_shot_accuracy": zs.accuracy if zs else None,
            "tuned_accuracy": mask.accuracy if mask else None,
            "warnings": warnings,
            "temperature": chosen.head.temperature,
            "ece_before": None, "ece_after": None, "min_score": None,
        }
        if chosen.calibration is not None:
            cal = chosen.calibration
            report |= {"ece_before": cal["ece_before"], "ece_after": cal["ece_after"], "calibration": cal,
                       "min_score": cal.get("min_score")}
        if chosen.logits is not None and len(self.val_targets):
            report |= self._errors(chosen)
        return chosen, report

    def _errors(self, chosen: Candidate) -> dict:
        pred = chosen.logits.argmax(1)
        y = self.val_targets
        c = len(self.labels)
        conf = np.zeros((c, c), dtype=int)
        np.add.at(conf, (y, pred), 1)
        per_class = {self.labels[i]: (round(float(conf[i, i] / conf[i].sum()), 4) if conf[i].sum() else None)
                     for i in range(c)}
        probs = softmax(chosen.logits / chosen.head.temperature)
        wrong = []
        for row in np.flatnonzero(pred != y):
            wrong.append({"index": int(self.val_indices[row]) if self.val_indices is not None else int(row),
                          "true": self.labels[y[row]], "predicted": self.labels[pred[row]],
                          "score": round(float(probs[row, pred[row]]), 4)})
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
