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


def test_bf16_on_cuda_matches_fp32_within_noise():
    """The bf16 guard of tests/core/test_tuning_speed.py on the GPU: the same build in bf16 autocast and in fp32
    on CUDA flips nearly the same weights and scores the same on held-out images."""
    from rmt_core.masking import mask_bits
    from rmt_core.preprocess import PreprocessConfig, preprocess_batch
    from rmt_core.tuning import holdout_accuracy

    if not bf16_supported("cuda"):
        pytest.skip("this GPU has no bf16")
    samples = colour_task(n_per_class=8)
    held = colour_task(n_per_class=5, seed=7)
    results = {}
    for precision in ("fp32", "bf16"):
        backbone = tiny(seed=3)
        text = encode_class_texts(backbone, LABELS, "a photo of a {}.")
        config = TuneConfig(backbone="rmt-tiny-vit", pretrained=None, epochs=1, min_steps=30, batch_size=8,
                            learning_rate=1e-3, warmup_steps=0, early_stop=False, precision=precision)
        result = tune(backbone, [i for i, _ in samples], [LABELS.index(lab) for _, lab in samples], text, config,
                      device="cuda")
        assert result.precision == precision
        x = torch.from_numpy(preprocess_batch([i for i, _ in held], PreprocessConfig.from_dict(backbone.preprocess)))
        y = torch.tensor([LABELS.index(lab) for _, lab in held])
        accuracy = holdout_accuracy(backbone.model, x.to("cuda"), y.to("cuda"), text.to("cuda"))
        results[precision] = (mask_bits(backbone.model), accuracy, result.sparsity)
    (bits32, acc32, sp32), (bits16, acc16, sp16) = results["fp32"], results["bf16"]
    total = sum(b.size for b in bits32.values())
    differ = sum(int((bits32[k] != bits16[k]).sum()) for k in bits32)
    assert sp32 > 0 and differ / total < 0.01, (differ, total, sp32, sp16)
    assert abs(acc32 - acc16) <= 1 / len(held) + 1e-9, (acc32, acc16)
