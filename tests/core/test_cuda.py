"""Tuning on CUDA (issue 17; run by bench/gpu_check.sh on a GPU machine, skipped elsewhere)."""
import pytest
import torch

from rmt_core.backbones import encode_class_texts
from rmt_core.config import TuneConfig
from rmt_core.tuning import bf16_supported, tune
from tests.core.toys import colour_task, tiny

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
LABELS = ["blue", "green", "red"]


def test_tuning_runs_on_cuda_in_the_precision_the_device_supports():
    samples = colour_task(n_per_class=8)
    backbone = tiny(seed=3)
    text = encode_class_texts(backbone, LABELS, "a photo of a {}.")
    config = TuneConfig(backbone="rmt-tiny-vit", pretrained=None, epochs=1, min_steps=40, batch_size=8,
                        learning_rate=1e-3, warmup_steps=0, augment=False)
    result = tune(backbone, [i for i, _ in samples], [LABELS.index(lab) for _, lab in samples], text, config,
                  device="cuda")
    assert result.precision == ("bf16" if bf16_supported("cuda") else "fp32")
    assert all(m.scores.is_cuda for m in result.masks.values())
    assert result.sparsity > 0
