"""Answering a batch that mixes classifiers: the segments they share run once for all of them.

Classifiers of one base that mask the same set of weights run the same chain of segments (rmt_core/segments.py):
the shared segments (the unmasked MLP stretches of an r-amt ViT, two thirds of its FLOPs; the whole base for
zero-shot and head-only classifiers) are the same sessions for every one of them, so a micro-batch that mixes
such classifiers runs each shared segment once on every row, and each classifier's own segments and head on
its rows only. ``batch_group`` names that set; a classifier without one (an old baked model.onnx, a
single-session chain) is answered on its own.

Every request gets ``(probs, outlier)``: outlier is ``head.outlier_scores(features)`` where the head has that,
else None.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .runtime import softmax


def batch_group(classifier: Any) -> Any:
    """Requests for classifiers with equal (non-None) groups may share a batch."""
    return getattr(classifier, "batch_group", None)


def _outlier(head: Any, features: np.ndarray | None):
    scores = getattr(head, "outlier_scores", None)
    if scores is None or features is None:
        return None
    return scores(features)


def predict_one(classifier: Any, batch: np.ndarray) -> tuple[np.ndarray, Any]:
    """(probs, outlier) of one classifier for ``batch`` [N,3,H,W]."""
    predict = getattr(classifier, "predict", None)
    if predict is not None:
        return predict(batch)
    return classifier.run(batch), None


def _split(result: tuple[np.ndarray, Any], sizes: Sequence[int]) -> list[tuple[np.ndarray, Any]]:
    probs, outlier = result
    out, start = [], 0
    for n in sizes:
        out.append((probs[start:start + n], None if outlier is None else outlier[start:start + n]))
        start += n
    return out


def predict_mixed(requests: Sequence[tuple[Any, np.ndarray]]) -> list[tuple[np.ndarray, Any]]:
    """Per request (classifier, batch): (probs, outlier), in order. Requests for one classifier are answered
    in one call; classifiers of one ``batch_group`` share the runs of their shared segments."""
    by_classifier: dict[int, list[int]] = {}
    for i, (clf, _) in enumerate(requests):
        by_classifier.setdefault(id(clf), []).append(i)
    groups: dict[Any, list[int]] = {}  # group key -> ids of classifiers, in order of first request
    for key in by_classifier:
        clf = requests[by_classifier[key][0]][0]
        group = batch_group(clf)
        groups.setdefault(("solo", key) if group is None else ("group", group), []).append(key)

    results: list[tuple[np.ndarray, Any] | None] = [None] * len(requests)
    for (kind, _), members in groups.items():
        batches = {key: [requests[i][1] for i in by_classifier[key]] for key in members}
        joined = {key: bs[0] if len(bs) == 1 else np.concatenate(bs) for key, bs in batches.items()}
        if kind == "group" and len(members) > 1:
            answers = _run_group([requests[by_classifier[k][0]][0] for k in members], [joined[k] for k in members])
        else:
            answers = [predict_one(requests[by_classifier[k][0]][0], joined[k]) for k in members]
        for key, answer in zip(members, answers):
            for i, part in zip(by_classifier[key], _split(answer, [len(b) for b in batches[key]])):
                results[i] = part
    return results  # type: ignore[return-value]


def _run_group(classifiers: list, batches: list[np.ndarray]) -> list[tuple[np.ndarray, Any]]:
    """The chain of one group over the rows of all ``classifiers``: shared segments once, own ones per slice."""
    first = classifiers[0]
    sizes = [len(b) for b in batches]
    bounds = np.cumsum([0, *sizes])
    env = {first.input_name: np.concatenate([c._checked_batch(b) for c, b in zip(classifiers, batches)])}
    last_use = first.last_use
    for i, (seg, shared_session) in enumerate(first.chain):
        if seg.kind == "shared":
            outs = shared_session.run(seg.outputs, {n: env[n] for n in seg.inputs})
        else:
            parts = []
            for j, clf in enumerate(classifiers):
                session = clf.chain[i][1]
                rows = slice(bounds[j], bounds[j + 1])
                parts.append(session.run(seg.outputs, {n: env[n][rows] for n in seg.inputs}))
            outs = [np.concatenate([p[k] for p in parts]) for k in range(len(seg.outputs))]
        env.update(zip(seg.outputs, outs))
        for n in seg.inputs:
            if last_use[n] == i and n != first.output_name:
                env.pop(n, None)
    features = env[first.output_name]
    answers = []
    for j, clf in enumerate(classifiers):
        f = features[bounds[j]:bounds[j + 1]]
        answers.append((softmax(clf.head.logits(f)), _outlier(clf.head, f)))
    return answers
