"""What exporting torch modules to ONNX needs, for every exporter here (base encoder, text tower, baked model)."""
from __future__ import annotations

import contextlib


@contextlib.contextmanager
def no_mha_fastpath():
    import torch

    # nn.MultiheadAttention's inference fast path exports as aten::_native_multi_head_attention, which the
    # TorchScript exporter cannot lower.
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)
