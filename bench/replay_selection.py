"""Replay selection rules on stored bench_selection runs: what would another rule have published? (issue 16)

Each run stores every candidate's per-image validation correctness (``correct``) and, since 2026-12-04, its
out-of-sample logits (``logits``, T = 1) and ``row_targets``. Rules:

  * acc     the service's rule (``candidates.pick``): paired evidence on 0/1 answers, 0.95 to leave zero-shot
            shared by the challengers in proportion to the images each was judged on, 0.8 between fitted ones;
  * ll      the thresholds before that sharing (0.95 / 0.8) on per-image log-loss: each candidate's probabilities cross-fitted
            (``calibration.cross_fitted_probs``: T fitted on the other folds), P(mean loss difference > 0)
            by a Bayesian bootstrap over the images;
  * ll+acc  ll, and the challenger is not behind on 0/1 answers on the same images.

    python bench/replay_selection.py bench/selection_runs_defaults_n200.jsonl
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rmt_core.calibration import cross_fitted_probs  # noqa: E402
from rmt_core.candidates import PAIRED_CONFIDENCE, ZERO_SHOT_CONFIDENCE, Candidate, paired_evidence, pick  # noqa: E402
from rmt_core.config import CANDIDATES  # noqa: E402
from rmt_core.head import Head  # noqa: E402


def log_losses(run: dict, name: str) -> np.ndarray:
    """Per-row out-of-sample log-loss of candidate ``name`` with a cross-fitted T; NaN where not judged."""
    rows = run["logits"][name]
    y = np.asarray(run["row_targets"])
    judged = np.array([r is not None for r in rows])
    out = np.full(len(rows), np.nan)
    if judged.sum() >= 2:
        p = cross_fitted_probs(np.array([r for r in rows if r is not None], float), y[judged])
        out[judged] = -np.log(np.clip(p[np.arange(len(p)), y[judged]], 1e-12, None))
    return out


def bootstrap_p(d: np.ndarray, draws: int = 4000, seed: int = 0) -> float:
    """P(mean of d > 0) under a Bayesian bootstrap (Dirichlet weights over the images)."""
    if not len(d):
        return 0.0
    w = np.random.default_rng(seed).dirichlet(np.ones(len(d)), draws)
    return float(((w @ d) > 0).mean())


def published(run: dict, rule: str) -> str:
    names = [n for n in CANDIDATES if n in run["correct"]]
    if rule == "acc":
        dummy = Head.zero_shot(np.eye(1, dtype=np.float32), 1.0)
        correct = {n: np.array([np.nan if v is None else v for v in run["correct"][n]], float) for n in names}
        cands = [Candidate(n, dummy, n.startswith("mask"), n=int((~np.isnan(c)).sum()), correct=c)
                 for n, c in correct.items()]
        return pick(cands)[0].name
    loss = {n: log_losses(run, n) for n in names}
    champion = names[0]
    for challenger in names[1:]:
        need = ZERO_SHOT_CONFIDENCE if champion == "zero-shot" else PAIRED_CONFIDENCE
        a, b = loss[challenger], loss[champion]
        both = ~(np.isnan(a) | np.isnan(b))
        won = bootstrap_p(b[both] - a[both]) >= need
        if rule == "ll+acc":
            won = won and paired_evidence(run["correct"][challenger], run["correct"][champion])["diff"] >= 0
        if won:
            champion = challenger
    return champion


def main(argv=None) -> int:
    files = argv if argv is not None else sys.argv[1:]
    runs = [r for f in files for r in map(json.loads, Path(f).read_text().splitlines()) if "logits" in r]
    print(f"{len(runs)} runs with logits\n\n| rule | pub / best (by shots) | published < zero-shot on test |\n|---|---|---|")
    for rule in ("acc", "ll", "ll+acc"):
        ratios, below, by_shots = [], [], {}
        for r in runs:
            name, t = published(r, rule), r["test"]
            ratio = t[name] / max(t.values())
            ratios.append(ratio)
            by_shots.setdefault(r["shots"], []).append(ratio)
            if t[name] < t["zero-shot"] - 1e-9:
                below.append(f"{r['task']} {r['shots']}/{r['seed']} {name} {100 * (t[name] - t['zero-shot']):+.1f}")
        shots = ", ".join(f"{k}: {np.mean(v):.3f}" for k, v in sorted(by_shots.items()))
        print(f"| {rule} | {np.mean(ratios):.3f} ({shots}) | {len(below)} of {len(runs)}"
              + (f": {'; '.join(below)}" if below else "") + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
