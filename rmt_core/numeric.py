"""Small numpy helpers shared by the serving modules (runtime, serving), kept apart so neither imports the other."""
from __future__ import annotations

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in the logits' own dtype (float32 from ONNX Runtime stays float32)."""
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)
