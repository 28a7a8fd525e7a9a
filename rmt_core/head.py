"""The head: the small tail that turns raw image features into class logits (numpy only, no torch).

    f      = features / ||features||
    logits = (scale * f @ W.T + b  [+ cache_alpha * exp(-cache_beta * (1 - f @ K.T)) @ V]) / temperature

W [C, D] and b [C] are the linear part (the zero-shot head is W = normalised class text embeddings,
b = 0, scale = CLIP's logit scale); K [M, D] / V [M, C] are an optional Tip-Adapter cache of
normalised training features and their one-hot labels.

The head also owns the open-set score (``outlier_scores``): how far an image's features lie from the classes
the classifier knows, as the cosine distance to the nearest of its reference rows (``outlier_keys``, stored in
float16): the class text embeddings (``outlier_reference`` "class-text", issue 16: on the bench they separate
unseen classes far better than the nearest training image did, AUROC 0.996 / 0.758 vs 0.904 / 0.573) or, in
heads built before that, the training images ("images"). The distance is mapped to [0, 1] by a logistic curve
fitted on the distances of the images the classifier was built from (``fit_outlier``): 0.5 at an upper
tolerance bound of their 97.5th percentile (normal, 90% confidence: with 5 images the bound sits 3.7 standard
deviations above their mean, with 80 images 2.2), one logit per standard deviation. Class names the backbone's
text side does not understand leave the scale honest but the separation weak.

A head is stored as a small ``.npz`` (never pickled) and, for a self-contained model.onnx, appended to a base
graph whose output is raw features (``append_to_graph``).
"""
from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .calibration import UNKNOWN_TAIL, tolerance_factor
from .files import atomic_write_bytes

HEAD_FILE = "head.npz"
_FORMAT = 1


def _f32(a) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(a, dtype=np.float32))


@dataclass
class Head:
    """Features -> logits. ``kind`` names where it came from ("zero-shot", "linear-probe", "tip-adapter", ...)."""

    W: np.ndarray
    b: np.ndarray | None = None
    scale: float = 1.0
    cache_keys: np.ndarray | None = None    # K [M, D], rows L2-normalised
    cache_values: np.ndarray | None = None  # V [M, C]
    cache_alpha: float = 0.0
    cache_beta: float = 1.0
    temperature: float = 1.0
    kind: str = "zero-shot"
    meta: dict = field(default_factory=dict)  # JSON-able extras (prompt template, fit settings, ...)
    outlier_keys: np.ndarray | None = None  # [M, D] normalised open-set reference rows (class texts or images)
    outlier_center: float = 0.0  # cosine distance that scores 0.5
    outlier_width: float = 1.0   # logistic width of the distance -> score map
    outlier_reference: str = "images"  # what outlier_keys are: "class-text" | "images" (heads before issue 16)

    def __post_init__(self):
        self.W = _f32(self.W)
        if self.W.ndim != 2:
            raise ValueError(f"W has shape {self.W.shape}; expected [classes, feature_dim]")
        n_classes, dim = self.W.shape
        self.b = np.zeros(n_classes, np.float32) if self.b is None else _f32(self.b).reshape(-1)
        if self.b.shape != (n_classes,):
            raise ValueError(f"b has shape {self.b.shape}; expected ({n_classes},)")
        if (self.cache_keys is None) != (self.cache_values is None):
            raise ValueError("a cache needs both cache_keys and cache_values (or neither)")
        if self.cache_keys is not None:
            self.cache_keys, self.cache_values = _f32(self.cache_keys), _f32(self.cache_values)
            m = self.cache_keys.shape[0]
            if self.cache_keys.shape != (m, dim) or self.cache_values.shape != (m, n_classes):
                raise ValueError(f"cache shapes K {self.cache_keys.shape}, V {self.cache_values.shape} do not fit "
                                 f"W {self.W.shape}; expected K [M, {dim}] and V [M, {n_classes}]")
        self.scale, self.cache_alpha, self.cache_beta = float(self.scale), float(self.cache_alpha), float(self.cache_beta)
        self.temperature = float(self.temperature)
        if not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature} must be > 0")
        if self.outlier_keys is not None:
            self.outlier_keys = np.ascontiguousarray(np.asarray(self.outlier_keys, dtype=np.float16))
            if self.outlier_keys.ndim != 2 or self.outlier_keys.shape[1] != dim or len(self.outlier_keys) == 0:
                raise ValueError(f"outlier_keys have shape {self.outlier_keys.shape}; expected [M>0, {dim}]")
        self.outlier_center, self.outlier_width = float(self.outlier_center), float(self.outlier_width)
        if not self.outlier_width > 0:
            raise ValueError(f"outlier_width={self.outlier_width} must be > 0")
        if self.outlier_reference not in OUTLIER_REFERENCES:
            raise ValueError(f"outlier_reference={self.outlier_reference!r}; expected one of {OUTLIER_REFERENCES}")

    @classmethod
    def zero_shot(cls, text_features, logit_scale: float, **meta) -> "Head":
        """CLIP's own classifier: normalised class text embeddings and the logit scale."""
        w = _f32(text_features)
        w = w / np.linalg.norm(w, axis=1, keepdims=True)
        return cls(W=w, scale=float(logit_scale), kind="zero-shot", meta=dict(meta))

    @property
    def n_classes(self) -> int:
        return self.W.shape[0]

    @property
    def dim(self) -> int:
        return self.W.shape[1]

    @property
    def has_cache(self) -> bool:
        return self.cache_keys is not None and self.cache_alpha != 0.0

    def logits(self, features: np.ndarray) -> np.ndarray:
        """Raw image features [N, D] -> logits [N, C] (float32)."""
        f = np.asarray(features, dtype=np.float32)
        if f.ndim != 2 or f.shape[1] != self.dim:
            raise ValueError(f"features have shape {f.shape}; expected [N, {self.dim}]")
        f = f / np.linalg.norm(f, axis=1, keepdims=True)
        out = self.scale * (f @ self.W.T) + self.b
        if self.has_cache:
            affinity = np.exp(-self.cache_beta * (1.0 - f @ self.cache_keys.T))
            out = out + self.cache_alpha * (affinity @ self.cache_values)
        return (out / self.temperature).astype(np.float32)

    @property
    def has_outlier(self) -> bool:
        return self.outlier_keys is not None

    def outlier_distances(self, features: np.ndarray) -> np.ndarray:
        """Cosine distance [N] of each raw feature row to the nearest reference row (``outlier_keys``)."""
        f = np.asarray(features, dtype=np.float32)
        if f.ndim != 2 or f.shape[1] != self.dim:
            raise ValueError(f"features have shape {f.shape}; expected [N, {self.dim}]")
        f = f / np.linalg.norm(f, axis=1, keepdims=True)
        return 1.0 - (f @ self.outlier_keys.astype(np.float32).T).max(axis=1)

    def outlier_scores(self, features: np.ndarray) -> np.ndarray | None:
        """Raw image features [N, D] -> [N] in [0, 1], higher = less like the images this head was built from;
        None for a head without open-set data (built before it existed)."""
        if self.outlier_keys is None:
            return None
        return distance_to_score(self.outlier_distances(features), self.outlier_center, self.outlier_width)

    def with_outlier(self, features: np.ndarray, reference: np.ndarray | None = None) -> "Head":
        """This head with open-set data fitted on ``features`` (raw features of the images it was built from):
        distances to ``reference`` [C, D], the class text embeddings (default: this head's own class rows, which
        ARE the text embeddings for a zero-shot head; a build passes the zero-shot head's, as a fitted head's rows
        have moved)."""
        keys, center, width = fit_outlier(features, self.W if reference is None else reference)
        self.outlier_keys, self.outlier_center, self.outlier_width = keys.astype(np.float16), center, width
        self.outlier_reference = "class-text"
        return self

    def summary(self) -> dict:
        """What a manifest or metadata_props says about the head (no arrays)."""
        return {"kind": self.kind, "classes": self.n_classes, "dim": self.dim, "scale": self.scale,
                "temperature": self.temperature, "cache_size": 0 if self.cache_keys is None else int(self.cache_keys.shape[0]),
                "cache_alpha": self.cache_alpha, "cache_beta": self.cache_beta,
                "outlier_keys": 0 if self.outlier_keys is None else int(self.outlier_keys.shape[0]),
                **({"outlier_reference": self.outlier_reference} if self.outlier_keys is not None else {}),
                **({"meta": self.meta} if self.meta else {})}

    def with_class(self, text_feature: np.ndarray) -> "Head":
        """This head plus one class known only by its text embedding (zero-shot for that class).

        The new row is the normalised embedding scaled to the mean norm of the existing rows, with their mean
        bias, so a fitted head's scores and the new class's are on the same footing; a cache (Tip-Adapter)
        gets a zero column (no image votes for the new class). A class-text open-set reference gains the new
        class's text (an image of it is not an outlier); an image reference cannot be extended and is dropped.
        """
        row = _f32(text_feature).reshape(-1)
        if row.shape != (self.dim,):
            raise ValueError(f"text feature has shape {row.shape}; expected ({self.dim},)")
        row = row / np.linalg.norm(row) * float(np.linalg.norm(self.W, axis=1).mean())
        values = None if self.cache_values is None else \
            np.concatenate([self.cache_values, np.zeros((self.cache_values.shape[0], 1), np.float32)], axis=1)
        outlier = {}
        if self.outlier_keys is not None and self.outlier_reference == "class-text":
            text = row / np.linalg.norm(row)
            outlier = {"outlier_keys": np.concatenate([self.outlier_keys.astype(np.float32), text[None]]),
                       "outlier_center": self.outlier_center, "outlier_width": self.outlier_width,
                       "outlier_reference": "class-text"}
        return Head(W=np.concatenate([self.W, row[None]]), b=np.append(self.b, self.b.mean()), scale=self.scale,
                    cache_keys=self.cache_keys, cache_values=values, cache_alpha=self.cache_alpha,
                    cache_beta=self.cache_beta, temperature=self.temperature, kind=self.kind, meta=dict(self.meta),
                    **outlier)

    # ---- storage -------------------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        arrays = {"W": self.W, "b": self.b}
        if self.cache_keys is not None:
            arrays |= {"cache_keys": self.cache_keys, "cache_values": self.cache_values}
        if self.outlier_keys is not None:
            arrays["outlier_keys"] = self.outlier_keys
        header = {"format": _FORMAT, "kind": self.kind, "scale": self.scale, "cache_alpha": self.cache_alpha,
                  "cache_beta": self.cache_beta, "temperature": self.temperature, "meta": self.meta,
                  "outlier_center": self.outlier_center, "outlier_width": self.outlier_width,
                  "outlier_reference": self.outlier_reference}
        arrays["header"] = np.frombuffer(json.dumps(header, sort_keys=True).encode(), dtype=np.uint8)
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "Head":
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                header = json.loads(z["header"].tobytes())
                arrays = {k: z[k] for k in z.files if k != "header"}
        except (ValueError, KeyError, OSError) as exc:
            raise ValueError(f"not a head file: {exc}") from exc
        if header.get("format") != _FORMAT:
            raise ValueError(f"head file format {header.get('format')} is not supported (expected {_FORMAT})")
        return cls(W=arrays["W"], b=arrays["b"], scale=header["scale"], cache_keys=arrays.get("cache_keys"),
                   cache_values=arrays.get("cache_values"), cache_alpha=header["cache_alpha"],
                   cache_beta=header["cache_beta"], temperature=header["temperature"], kind=header["kind"],
                   meta=header.get("meta") or {}, outlier_keys=arrays.get("outlier_keys"),
                   outlier_center=header.get("outlier_center", 0.0), outlier_width=header.get("outlier_width", 1.0),
                   outlier_reference=header.get("outlier_reference", "images"))

    def save(self, path: Path | str) -> int:
        """Write atomically; returns the file size in bytes."""
        data = self.to_bytes()
        atomic_write_bytes(path, data)
        return len(data)

    @classmethod
    def load(cls, path: Path | str) -> "Head":
        return cls.from_bytes(Path(path).read_bytes())


def distance_to_score(distance: np.ndarray, center: float, width: float) -> np.ndarray:
    """Logistic map of nearest-neighbour distances to [0, 1] (0.5 at ``center``)."""
    z = np.clip((np.asarray(distance, dtype=np.float64) - center) / width, -50, 50)
    return (1.0 / (1.0 + np.exp(-z))).astype(np.float32)


OUTLIER_REFERENCES = ("class-text", "images")
MIN_OUTLIER_WIDTH = 1e-3


def fit_outlier(features: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, float, float]:
    """(normalised keys, center, width) of the open-set score: keys are the normalised ``reference`` rows (class
    text embeddings); the logistic curve puts 0.5 (``center``) at the upper tolerance bound of the 97.5th
    percentile of the ``features``' own distances (raw features of the images the classifier was built from; the
    reference does not depend on them, so each distance is an honest in-distribution sample) and moves one logit
    per standard deviation of those distances (``width``). A score above 0.5 reads "further from every class
    than, with 90% confidence, all but 2.5% of images like the classifier's own"."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) == 0:
        raise ValueError(f"features have shape {f.shape}; expected [N>0, D]")
    ref = np.asarray(reference, dtype=np.float64)
    if ref.ndim != 2 or ref.shape[1] != f.shape[1] or len(ref) == 0:
        raise ValueError(f"reference has shape {ref.shape}; expected [C>0, {f.shape[1]}]")
    keys = ref / np.linalg.norm(ref, axis=1, keepdims=True)
    d = 1.0 - (f / np.linalg.norm(f, axis=1, keepdims=True) @ keys.T).max(axis=1)
    if len(d) < 2:  # one image: no spread to learn from; 0.1 of cosine distance beyond it scores 0.5
        return keys.astype(np.float32), float(d[0]) + 0.1, 0.05
    sd = max(float(d.std(ddof=1)), MIN_OUTLIER_WIDTH)
    k = tolerance_factor(len(d), 1.0 - UNKNOWN_TAIL)
    center = float(d.mean()) + (k if math.isfinite(k) else 10.0) * sd
    return keys.astype(np.float32), center, sd


def append_to_graph(graph, head: Head, features: str, output: str = "logits", prefix: str = "head/") -> None:
    """Append ``head`` to an ONNX GraphProto in place: ``features`` (a value [N, D]) -> ``output`` [N, C].

    The graph's existing outputs are replaced by ``output``. Only standard opset >= 13 ops are used
    (ReduceL2 with axes as an attribute is valid in opsets 13-17; opset 18 moved axes to an input).
    """
    from onnx import TensorProto, helper, numpy_helper

    def const(name, value):
        graph.initializer.append(numpy_helper.from_array(np.asarray(value, dtype=np.float32), prefix + name))
        return prefix + name

    def node(op, inputs, name, **attrs):
        graph.node.append(helper.make_node(op, inputs, [prefix + name], name=prefix + name, **attrs))
        return prefix + name

    norm = node("ReduceL2", [features], "norm", axes=[1], keepdims=1)
    f = node("Div", [features, norm], "normalised")
    # scale is folded into W (one MatMul, one Add): scale * f @ W.T == f @ (scale * W).T
    lin = node("MatMul", [f, const("weight_t", (head.scale * head.W).T)], "linear")
    out = node("Add", [lin, const("bias", head.b)], "biased")
    if head.has_cache:
        sim = node("MatMul", [f, const("cache_keys_t", head.cache_keys.T)], "cache_sim")
        # exp(-beta * (1 - s)) = exp(beta * s - beta)
        arg = node("Sub", [node("Mul", [sim, const("cache_beta", head.cache_beta)], "cache_bs"),
                           const("cache_beta_c", head.cache_beta)], "cache_arg")
        aff = node("Exp", [arg], "cache_affinity")
        cache = node("MatMul", [aff, const("cache_values_alpha", head.cache_alpha * head.cache_values)], "cache")
        out = node("Add", [out, cache], "with_cache")
    graph.node.append(helper.make_node("Div", [out, const("temperature", head.temperature)], [output],
                                       name=prefix + "logits"))
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(output, TensorProto.FLOAT, ["batch", head.n_classes]))
