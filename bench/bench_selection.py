"""Does selection publish the right classifier? (issue 10)

For each task x shots x seed, the build's own code path (rmt_core.candidates.run_candidates with the
service defaults: r-amt, holdout 0.2, lr 8e-5, 30 epochs / min_steps 300) picks a candidate on its own
validation data; then every candidate is scored on a fixed test set the build never saw:

  * published test accuracy >= zero-shot test accuracy in every run (goal: no run below; ties allowed);
  * published / best candidate in hindsight >= 0.95 on average. Where the build had no holdout (< 5 images per
    class) it does not tune a mask; for the hindsight comparison the mask is tuned anyway (same config) so the
    "best in hindsight" includes what the build declined to build;
  * time to the head candidate (from the start of the build, backbone load included), goal <= 30 s for
    5 classes x 16 images with the builtin backbone;
  * ECE of the published head on the test set, before (T = 1) and after the temperature fitted on validation
    data: lower in >= 90% of runs.

Tasks: the claims task (8 world shapes under the noise-cast shift, bench_claims.py) at 1/2/4/8/16 shots and the
sample set (`rmt sample`: 5 shapes under noise + sepia, 16 images per class).

    nice python bench/bench_selection.py                 # everything, appends bench/selection_runs.jsonl
    python bench/bench_selection.py --shots 1 16 --seeds 1   # a subset
    python bench/bench_selection.py --report             # bench/RESULTS-selection.md from the runs file
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import platform
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_claims import ALL_SHAPES, TEMPLATE, TEST_SEED, TRAIN_SEED_OFFSET, images_of  # noqa: E402

from rmt_core import world  # noqa: E402
from rmt_core.backbones import encode_class_texts, load_backbone  # noqa: E402
from rmt_core.calibration import expected_calibration_error, softmax  # noqa: E402
from rmt_core.candidates import encode_images, fit_linear_probe, has_holdout, run_candidates  # noqa: E402
from rmt_core.config import TuneConfig  # noqa: E402
from rmt_core.head import Head  # noqa: E402
from rmt_core.pipeline import split_holdout  # noqa: E402
from rmt_core.preprocess import PreprocessConfig, preprocess_batch  # noqa: E402
from rmt_core.tuning import tune  # noqa: E402

RUNS = Path(__file__).with_name("selection_runs.jsonl")
RESULTS = Path(__file__).with_name("RESULTS-selection.md")
TASKS = {"claims": (ALL_SHAPES, world.Style(noise=0.25, colour_cast=(1.0, 0.8, 0.5))),
         "sample": (list(world.DEMO_CLASSES), world.DEMO_SHIFT)}
N_TEST = 50


def run_one(task: str, shots: int, seed: int, backbone_name: str = "rmt-world-vit", pretrained: str = "builtin",
            hindsight: bool = True) -> dict:
    classes, style = TASKS[task]
    started = time.monotonic()
    base = load_backbone(backbone_name, pretrained, seed=0)
    size = base.image_size[0]
    pre = PreprocessConfig.from_dict(base.preprocess)
    text = encode_class_texts(base, classes, TEMPLATE)
    imgs, targets = images_of(classes, shots, TRAIN_SEED_OFFSET + seed, style, size)
    samples = list(zip(imgs, [classes[t] for t in targets]))
    config = TuneConfig(backbone=backbone_name, pretrained=pretrained, prompt_template=TEMPLATE, seed=seed)
    counts = Counter(label for _, label in samples)
    train, held = (split_holdout(samples, config.holdout, config.seed) if has_holdout(list(counts.values()), config)
                   else (samples, []))
    index = {c: i for i, c in enumerate(classes)}
    y_train, y_held = [index[lab] for _, lab in train], [index[lab] for _, lab in held]
    zero_shot = Head.zero_shot(text.numpy(), float(base.model.logit_scale.detach().exp()))
    model = base.model
    torch.manual_seed(seed)

    def tune_fn():
        return tune(base, [img for img, _ in train], y_train, text, config)

    run = run_candidates(model, zero_shot, classes, config, preprocess_batch([i for i, _ in train], pre), y_train,
                         preprocess_batch([i for i, _ in held], pre) if held else None, y_held, tune_fn,
                         started=started)
    build_s = time.monotonic() - started

    test_imgs, test_y = images_of(classes, N_TEST, TEST_SEED, style, size)
    test_batch = preprocess_batch(test_imgs, pre)
    test_y = np.asarray(test_y)
    tuned_model = model if run.tuning is not None else None
    if tuned_model is None and hindsight:  # what the build declined to tune, for the hindsight comparison only
        tuned_bb = copy.copy(base)
        tuned_bb.model = tuned_model = copy.deepcopy(model)  # untouched: the build did not tune
        tune(tuned_bb, [img for img, _ in train], y_train, text, config)
    with torch.no_grad():
        from rmt_core.masking import masks_disabled

        if run.tuning is not None:
            with masks_disabled(model):
                base_test = encode_images(model, test_batch)
        else:
            base_test = encode_images(model, test_batch)
        tuned_test = encode_images(tuned_model, test_batch) if tuned_model is not None else None

    def acc(head, feats):
        return float((head.logits(feats).argmax(1) == test_y).mean())

    test_acc = {}
    for name, cand in run.selection.candidates.items():
        feats = tuned_test if cand.uses_mask else base_test
        test_acc[name] = acc(cand.head, feats)
    if run.tuning is None and tuned_test is not None:
        train_batch = preprocess_batch([i for i, _ in train], pre)
        test_acc["mask"] = acc(zero_shot, tuned_test)
        probe = fit_linear_probe(encode_images(tuned_model, train_batch), y_train, zero_shot, seed=seed)
        test_acc["mask+head"] = acc(probe.head, tuned_test)
    published = run.published
    feats = tuned_test if published.uses_mask else base_test
    logits = published.head.logits(feats).astype(np.float64) * published.head.temperature  # T = 1
    ece_before = expected_calibration_error(softmax(logits), test_y)
    ece_after = expected_calibration_error(softmax(logits / published.head.temperature), test_y)
    best = max(test_acc, key=test_acc.get)
    v = run.validation
    return {
        "task": task, "shots": shots, "seed": seed, "classes": len(classes), "n_images": len(samples),
        "validated_by": v["validated_by"], "published": published.name,
        "validation": {r["name"]: r["accuracy"] for r in v["candidates"]},
        "test": test_acc, "published_test": test_acc[published.name], "zero_shot_test": test_acc["zero-shot"],
        "best_in_hindsight": best, "best_test": test_acc[best],
        "ratio_to_best": test_acc[published.name] / test_acc[best] if test_acc[best] else 1.0,
        "temperature": published.head.temperature, "ece_test_before": ece_before, "ece_test_after": ece_after,
        "head_ready_s": run.selection.candidates["head"].ready_s, "build_s": build_s,
        "tuned": run.tuning is not None, "hindsight_tuned": run.tuning is None and tuned_model is not None,
        "warnings": v["warnings"],
    }


def _old_rule(run: dict) -> bool:
    """Measured before calibration kept T only when it lowers the cross-fitted NLL (commit f3b9516)."""
    return run.get("calibration_rule", "").startswith("T always")


def report(runs: list[dict]) -> str:
    lines = [f"_Measured {dt.date.today()} on {platform.machine()}, CPython {platform.python_version()}, "
             f"torch threads 1 (2 shared CPU cores). Service defaults: r-amt, holdout 0.2, lr 8e-5, 30 epochs, "
             f"min_steps 300; builtin `rmt-world-vit`. Test sets: {N_TEST} images per class, never seen by the build._",
             "", "Test accuracy % of every candidate. Without a holdout (< 5 images per class) the build does not tune a "
             "mask; its mask columns were then tuned after the build with the same config, for the hindsight "
             "comparison only (— = not tuned at all). **published** is what the build chose on its own validation "
             "data; T is the temperature it kept.", "",
             "| task | shots | seed | validated by | published | zero-shot | head | mask | mask+head | "
             "published / best | T | ECE test before → after | head ready (s) |",
             "|---|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in sorted(runs, key=lambda r: (r["task"], r["shots"], r["seed"])):
        t = r["test"]
        cell = lambda k: f"{100 * t[k]:.1f}" if k in t else "—"  # noqa: E731
        vb = r["validated_by"]
        lines.append(f"| {r['task']} | {r['shots']} | {r['seed']} | {vb['method']} n={vb['n']} | **{r['published']}** | "
                     f"{cell('zero-shot')} | {cell('head')} | {cell('mask')} | {cell('mask+head')} | "
                     f"{r['ratio_to_best']:.3f} | {r['temperature']:.2f}{'*' if _old_rule(r) else ''} | "
                     f"{r['ece_test_before']:.3f} → {r['ece_test_after']:.3f} | "
                     f"{r['head_ready_s']:.1f} |")
    n = len(runs)
    below = [r for r in runs if r["published_test"] < r["zero_shot_test"] - 1e-9]
    ratio = float(np.mean([r["ratio_to_best"] for r in runs])) if runs else float("nan")
    ece_lower = sum(r["ece_test_after"] < r["ece_test_before"] for r in runs)
    ece_kept = sum(r["temperature"] == 1.0 for r in runs)  # T = 1 kept: the cross-fitted NLL saw no gain
    timing = [r["head_ready_s"] for r in runs if r["task"] == "sample" and r["shots"] == 16]
    lines += ["", "| goal | measured | met |", "|---|---|---|",
              f"| published >= zero-shot (test) in every run | {n - len(below)} of {n} runs | "
              f"{'yes' if not below else 'NO'} |",
              f"| published / best in hindsight >= 0.95 on average | {ratio:.3f} | {'yes' if ratio >= 0.95 else 'NO'} |",
              f"| ECE (test) lower after temperature in >= 90% of runs | {ece_lower} of {n} "
              f"({100 * ece_lower / max(n, 1):.0f}%; T kept at 1 in {ece_kept}, higher in "
              f"{sum(r['ece_test_after'] > r['ece_test_before'] for r in runs)}) | "
              f"{'yes' if ece_lower >= 0.9 * n else 'NO'} |"]
    new_rule = [r for r in runs if not _old_rule(r)]
    if len(new_rule) < n:
        lower = sum(r["ece_test_after"] < r["ece_test_before"] for r in new_rule)
        lines.append(f"| the same, runs measured with the current calibration rule only | {lower} of {len(new_rule)} "
                     f"(T kept at 1 in {sum(r['temperature'] == 1.0 for r in new_rule)}) | "
                     f"{'yes' if lower >= 0.9 * len(new_rule) else 'NO'} |")
    if timing:
        lines.append(f"| head candidate ready <= 30 s (5 classes x 16 images, backbone load included) | "
                     f"max {max(timing):.1f} s over {len(timing)} runs | {'yes' if max(timing) <= 30 else 'NO'} |")
    if any(_old_rule(r) for r in runs):
        starred_mask = [r for r in runs if _old_rule(r) and r["published"] != "zero-shot"]
        lines += ["", "\\* measured before the calibration rule of commit f3b9516 (a fitted T is kept only when it lowers "
                  "the cross-fitted NLL); selection and accuracies do not depend on it. In every re-measured run that "
                  "published zero-shot the rule kept the fitted T, so starred zero-shot rows are unaffected"
                  + (f"; {len(starred_mask)} starred non-zero-shot row(s) could differ." if starred_mask else
                     " (all starred rows published zero-shot).")]
    if below:
        lines += ["", "Runs below zero-shot on the test set: " + ", ".join(
            f"{r['task']} {r['shots']}-shot seed {r['seed']} ({r['published']} {100 * r['published_test']:.1f} vs "
            f"{100 * r['zero_shot_test']:.1f})" for r in below)]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="+", default=["sample", "claims"], choices=list(TASKS))
    p.add_argument("--shots", nargs="+", type=int, default=[1, 2, 4, 8, 16])
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    p.add_argument("--no-hindsight", action="store_true", help="Do not tune masks the build declined to tune.")
    p.add_argument("--runs", type=Path, default=RUNS)
    p.add_argument("--report", action="store_true", help="Only rewrite the results table from --runs.")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if not args.report:
        done = set()
        if args.runs.is_file():
            done = {(r["task"], r["shots"], r["seed"]) for r in map(json.loads, args.runs.read_text().splitlines())}
        for task in args.tasks:
            for shots in ([16] if task == "sample" else args.shots):
                for seed in args.seeds:
                    if (task, shots, seed) in done:
                        continue
                    r = run_one(task, shots, seed, hindsight=not args.no_hindsight)
                    print(json.dumps({k: r[k] for k in ("task", "shots", "seed", "published", "published_test",
                                                        "zero_shot_test", "best_test", "head_ready_s", "build_s")}),
                          flush=True)
                    with args.runs.open("a") as fh:
                        fh.write(json.dumps(r) + "\n")
    runs = [json.loads(line) for line in args.runs.read_text().splitlines()] if args.runs.is_file() else []
    text = "# Selection benchmark (issue 10)\n\nWritten by `bench/bench_selection.py`.\n\n" + report(runs) + "\n"
    notes = "\n## Reading the numbers"  # hand-written analysis below the table survives a re-report
    if RESULTS.is_file() and notes in RESULTS.read_text():
        text += notes + RESULTS.read_text().split(notes, 1)[1]
    RESULTS.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
