"""Core benchmarks; every number is a ratio measured in this one run (absolute times drift on shared CPUs).

    python bench/bench_core.py [--parts serving,zero-cost,step,mask] [--repeats N]

serving    ORT classifier vs eager open_clip (same ViT-B-32, random init: compute does not depend on
           weights), batch 1 and 32.                                             goal >= 1.5x at bs1
zero-cost  tuned (masked, baked) vs untuned classifier latency in ORT.           goal 1.00 +- 0.03
step       rmt_core's tuning step vs the official step (bench/official_step.py),
           same update law, before and after the first mask flips.            goal <= 0.8x time
mask       mask file size vs the entropy bound of the mask.                      goal <= 1.3x
Results go to bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.official_step import make_teacher, official_step  # noqa: E402
from bench.results import interleaved, write_section  # noqa: E402
from rmt_core.artifact import encode_masks, entropy_bound_bytes  # noqa: E402
from rmt_core.backbones import encode_class_texts, load_backbone  # noqa: E402
from rmt_core.config import TuneConfig  # noqa: E402
from rmt_core.export import ClassifierHead, export_onnx  # noqa: E402
from rmt_core.masking import attach_masks, bake_masks, find_masks, mask_bits, sparsity  # noqa: E402
from rmt_core.runtime import make_session  # noqa: E402
from rmt_core.tuning import train_step  # noqa: E402

ARCH = "ViT-B-32"
LABELS = ["cat", "dog", "car", "tree", "boat"]


def _head(backbone):
    text = encode_class_texts(backbone, LABELS, "a photo of a {}.")
    return ClassifierHead(backbone.model.visual, text, float(backbone.model.logit_scale.detach().exp())).eval()


def _scramble(masks, drop: float, seed: int = 0) -> None:
    """Put ~``drop`` of the scores below the threshold (a plausible tuned mask for timing purposes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in masks.values():
            below = torch.rand(m.scores.shape, generator=g) < drop
            m.scores.copy_(torch.where(below, torch.full_like(m.scores, 1e-3), m.scores))


def bench_serving(repeats: int, tmp: Path) -> str:
    backbone = load_backbone(ARCH, None)
    head = _head(backbone)
    export_onnx(head, tmp / "plain.onnx")
    session = make_session(tmp / "plain.onnx", "cpu")
    rows = []
    for bs in (1, 32):
        x = torch.randn(bs, 3, 224, 224)
        xn = x.numpy()
        model = backbone.model.eval()
        text = head.class_embeddings

        def eager():
            with torch.no_grad():
                f = model.encode_image(x)
                return model.logit_scale.exp() * (f / f.norm(dim=-1, keepdim=True)) @ text.T

        def ort():
            return session.run(None, {"image": xn})[0]

        np.testing.assert_allclose(ort(), eager().numpy(), rtol=1e-3, atol=1e-3)
        t = interleaved({"eager": eager, "ort": ort}, repeats if bs == 1 else max(3, repeats // 4))
        rows.append(f"| serving {ARCH} bs{bs} | eager open_clip {t['eager'] * 1e3:.1f} ms | ORT {t['ort'] * 1e3:.1f} ms "
                    f"| **{t['eager'] / t['ort']:.2f}x** faster | {'>= 1.5x at bs1' if bs == 1 else '-'} |")
        print(rows[-1], flush=True)
    return "\n".join(rows)


def bench_zero_cost(repeats: int, tmp: Path) -> str:
    plain = load_backbone(ARCH, None)
    export_onnx(_head(plain), tmp / "untuned.onnx")
    tuned = load_backbone(ARCH, None)
    masks = attach_masks(tuned.model, "r-amt")
    _scramble(masks, 0.05)
    drop = sparsity(masks)
    bake_masks(tuned.model)
    export_onnx(_head(tuned), tmp / "tuned.onnx")
    s_plain, s_tuned = make_session(tmp / "untuned.onnx", "cpu"), make_session(tmp / "tuned.onnx", "cpu")
    rows = []
    for bs in (1, 32):
        xn = np.random.default_rng(0).standard_normal((bs, 3, 224, 224)).astype(np.float32)
        t = interleaved({"untuned": lambda: s_plain.run(None, {"image": xn}),
                         "tuned": lambda: s_tuned.run(None, {"image": xn})},
                        repeats if bs == 1 else max(3, repeats // 4))
        rows.append(f"| zero extra cost bs{bs} ({drop:.1f}% masked) | untuned {t['untuned'] * 1e3:.1f} ms | "
                    f"tuned {t['tuned'] * 1e3:.1f} ms | **{t['tuned'] / t['untuned']:.3f}** tuned/untuned | 1.00 +- 0.03 |")
        print(rows[-1], flush=True)
    return "\n".join(rows)


def bench_step(repeats: int, batch: int = 8) -> str:
    config = TuneConfig(method="r-amt", backbone=ARCH, pretrained=None)
    x = torch.randn(batch, 3, 224, 224)
    y = torch.arange(batch) % len(LABELS)
    rows = []
    for phase, drop in (("before any mask flips", 0.0), ("after masks flip (~3%)", 0.03)):
        ours_bb, ref_bb = load_backbone(ARCH, None), load_backbone(ARCH, None)
        text = encode_class_texts(ours_bb, LABELS, "a photo of a {}.")
        ours_masks = attach_masks(ours_bb.model, "r-amt")
        ref_masks = attach_masks(ref_bb.model, "r-amt")
        teacher = make_teacher(ARCH)
        ours_masks_scores = [m.scores for m in ours_masks.values()]
        ref_scores = [m.scores for m in ref_masks.values()]
        if drop:
            _scramble(ours_masks, drop)
            _scramble(ref_masks, drop)
        ours_bb.model.train()
        ref_bb.model.train()
        # learning rate 0 keeps the masks (and so the phase) fixed while timing; the work per step is the same
        opt_ours = torch.optim.Adam(ours_masks_scores, lr=0.0)
        opt_ref = torch.optim.Adam(ref_scores, lr=0.0)
        gen_a, gen_b = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
        t = interleaved({
            "official": lambda: official_step(ref_bb.model, teacher, x, y, text, ref_scores, opt_ref, config, gen_b),
            "ours": lambda: train_step(ours_bb.model, ours_masks, x, y, text, opt_ours, config, gen_a),
        }, repeats, warmup=1)
        rows.append(f"| tuning step {ARCH} bs{batch}, {phase} | official {t['official']:.2f} s | ours {t['ours']:.2f} s "
                    f"| **{t['ours'] / t['official']:.2f}x** time | <= 0.8x |")
        print(rows[-1], flush=True)
    return "\n".join(rows)


def bench_mask(_: int) -> str:
    rows = []
    backbone = load_backbone(ARCH, None)
    masks = attach_masks(backbone.model, "r-amt")
    for drop in (0.005, 0.03, 0.10):
        _scramble(masks, drop, seed=int(drop * 1000))
        bits = mask_bits(backbone.model)
        size, bound = len(encode_masks(bits)), entropy_bound_bytes(bits)
        n = sum(b.size for b in bits.values())
        rows.append(f"| mask file, {ARCH} r-amt, {sparsity(bits):.1f}% masked (i.i.d.) | {n / 8 / 1e6:.2f} MB as raw bits "
                    f"| {size / 1e3:.1f} kB file vs {bound / 1e3:.1f} kB bound | **{size / bound:.3f}x** bound | <= 1.3x |")
        print(rows[-1], flush=True)
    demo_masks = sorted((Path(__file__).resolve().parents[1] / "runs").glob("demo-data/classifiers/*/model/mask.rmtm"))
    for tuned in demo_masks[-1:]:  # the classifier `make demo` tuned, when it has run
        from rmt_core.artifact import load_masks

        bits, _ = load_masks(tuned)
        size, bound = tuned.stat().st_size, entropy_bound_bytes(bits)
        rows.append(f"| mask file, the demo's tuned classifier, {sparsity(bits):.2f}% masked | "
                    f"{sum(b.size for b in bits.values()) / 8 / 1e3:.1f} kB raw | {size / 1e3:.2f} kB vs {bound / 1e3:.2f} kB bound "
                    f"| **{size / max(bound, 1):.3f}x** bound | <= 1.3x |")
        print(rows[-1], flush=True)
    assert not find_masks(load_backbone("rmt-tiny-vit", None).model)
    return "\n".join(rows)


PARTS = {"serving": bench_serving, "zero-cost": bench_zero_cost, "step": bench_step, "mask": bench_mask}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    header = "| what | baseline | ours | ratio | goal |\n|---|---|---|---|---|\n"
    with tempfile.TemporaryDirectory() as tmp:
        for part in args.parts.split(","):
            fn = PARTS[part]
            needs_tmp = part in ("serving", "zero-cost")
            rows = fn(args.repeats, Path(tmp)) if needs_tmp else fn(args.repeats if part != "step" else max(2, args.repeats // 7))
            write_section(f"core-{part}", header + rows)


if __name__ == "__main__":
    main()
