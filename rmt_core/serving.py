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

from .numeric import softmax


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


def probe_layout(classifier: Any) -> dict | None:
    """How each value passed between the segments of ``classifier``'s chain depends on the batch, found by
    running the chain on 2 images and on the same 2 plus a third:
    ("rows", axis, per, order) for activations: ``per`` entries per image along ``axis`` (a ViT's blocks run
    [tokens, batch, width], attention [tokens, batch * heads, ...], flattened [tokens * batch, width]), stored
    image-major (``order`` "image": [n * per + p]) or image-minor ("inner": [p * N + n]);
    ("linear", offset, slope) for integer values that follow the batch size (the shapes a Reshape is given);
    ("same",) for values that do not change. None when a value changes otherwise (its rows cannot be split):
    such chains are not mixed."""
    h, w = classifier.input_size
    x = np.random.default_rng(0).standard_normal((3, 3, h, w)).astype(np.float32)
    runs = {}
    for n in (2, 3):
        env = {classifier.input_name: x[:n]}
        for i, (seg, _) in enumerate(classifier.chain):
            env.update(zip(seg.outputs, classifier.run_segment(i, {k: env[k] for k in seg.inputs})))
        runs[n] = env
    layout: dict[str, tuple] = {}
    for seg, _ in classifier.chain:
        for name in (*seg.inputs, *seg.outputs):
            a, b = np.asarray(runs[2][name]), np.asarray(runs[3][name])
            if a.shape != b.shape:
                diff = [k for k in range(a.ndim) if a.shape[k] != b.shape[k]] if a.ndim == b.ndim else []
                if len(diff) != 1 or a.shape[diff[0]] % 2 or a.shape[diff[0]] // 2 * 3 != b.shape[diff[0]]:
                    return None
                axis, per = diff[0], a.shape[diff[0]] // 2
                for order in ("image", "inner"):  # the 2-image run must be the first 2 images of the 3-image run
                    how = ("rows", axis, per, order)
                    if np.allclose(_rows(b, how, slice(0, 2), 3), a, rtol=1e-4, atol=1e-5):
                        layout[name] = how
                        break
                else:
                    return None
            elif np.array_equal(a, b):
                layout[name] = ("same",)
            elif np.issubdtype(a.dtype, np.integer):
                slope = b - a
                layout[name] = ("linear", a - 2 * slope, slope)
            else:
                return None
    return layout


def _rows(value: np.ndarray, how: tuple, rows: slice, total: int) -> np.ndarray:
    """The part of ``value`` (computed for a mixed batch of ``total`` images) that belongs to images ``rows``."""
    if how[0] == "rows":
        _, axis, per, order = how
        v = np.moveaxis(value, axis, 0)
        if order == "image":
            part = v[rows.start * per:rows.stop * per]
        else:
            part = v.reshape(per, total, *v.shape[1:])[:, rows].reshape(per * (rows.stop - rows.start), *v.shape[1:])
        return np.ascontiguousarray(np.moveaxis(part, 0, axis))
    if how[0] == "linear":
        return np.asarray(how[1] + how[2] * (rows.stop - rows.start), dtype=value.dtype)  # 0-d stays an array
    return value


def _joined(parts: list[np.ndarray], how: tuple, total: int) -> np.ndarray:
    if how[0] == "rows":
        _, axis, per, order = how
        if order == "image":
            return np.concatenate(parts, axis=axis)
        moved = [np.moveaxis(p, axis, 0) for p in parts]
        blocks = [m.reshape(per, m.shape[0] // per, *m.shape[1:]) for m in moved]
        joined = np.concatenate(blocks, axis=1)
        return np.ascontiguousarray(np.moveaxis(joined.reshape(per * total, *joined.shape[2:]), 0, axis))
    if how[0] == "linear":
        return np.asarray(how[1] + how[2] * total, dtype=parts[0].dtype)
    return parts[0]


def _run_group(classifiers: list, batches: list[np.ndarray]) -> list[tuple[np.ndarray, Any]]:
    """The chain of one group over the rows of all ``classifiers``: shared segments once, own ones per slice."""
    first = classifiers[0]
    sizes = [len(b) for b in batches]
    bounds = np.cumsum([0, *sizes])
    total = int(bounds[-1])
    env = {first.input_name: np.concatenate([c._checked_batch(b) for c, b in zip(classifiers, batches)])}
    last_use, layout = first.last_use, first.batch_layout
    for i, (seg, _) in enumerate(first.chain):
        if seg.kind == "shared":
            outs = first.run_segment(i, {n: env[n] for n in seg.inputs})
        else:
            parts = []
            for j, clf in enumerate(classifiers):
                rows = slice(int(bounds[j]), int(bounds[j + 1]))
                parts.append(clf.run_segment(i, {n: _rows(env[n], layout[n], rows, total) for n in seg.inputs}))
            outs = [_joined([p[k] for p in parts], layout[name], total) for k, name in enumerate(seg.outputs)]
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
