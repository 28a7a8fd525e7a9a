"""Time to the final classifier (issue 17): where a build's time goes, which schedule to run, and what a
whole build costs in CPU-seconds against another checkout of the project.

    python bench/bench_build.py profile                 # per-step parts: student fwd, teacher fwd, VJP, views
    python bench/bench_build.py schedule --shots 4,8 --seeds 0,1,2     # schedule search on the generated world
    python bench/bench_build.py build --code /tmp/main  # CPU-s of create->final, this tree vs /tmp/main
    python bench/bench_build.py build --task plain --sizes 5x8 --n-test 60 --code /tmp/main  # another task
    python bench/bench_build.py precision               # step time fp32 vs bf16 (bf16 emulated without AVX512-BF16)

Results go to bench/RESULTS-build.md by hand (the numbers printed are what to copy); jsonl logs to /tmp.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads (see rmt_core/threads.py)


def _world_task(shots: int, seed: int, classes: list[str] | None = None):
    from bench.bench_claims import ALL_SHAPES, SHIFTS, TRAIN_SEED_OFFSET, images_of
    classes = classes or ALL_SHAPES
    return images_of(classes, shots, TRAIN_SEED_OFFSET + seed, SHIFTS["noise-cast"], 64)


# ------------------------------------------------------------------------------------------- profile
def cmd_profile(args) -> None:
    import torch

    from rmt_core.backbones import encode_class_texts, load_backbone
    from rmt_core.config import TuneConfig
    from rmt_core.masking import attach_masks, sparsity
    from rmt_core.tuning import ViewPool, class_logits, mask_gradients, train_transform, zero_shot_logits
    from bench.bench_claims import ALL_SHAPES

    bb = load_backbone("rmt-world-vit", "builtin", seed=0)
    images, labels = _world_task(4, 0)
    cfg = TuneConfig(recipe="paper")
    text = encode_class_texts(bb, ALL_SHAPES, cfg.prompt_template)
    tf = train_transform(bb.preprocess)
    masks = attach_masks(bb.model, cfg.method, cfg.mask_init, cfg.threshold, cfg.mask_conv1)
    scores = [m.scores for m in masks.values()]
    opt = torch.optim.Adam(scores, lr=8e-5)
    y = torch.tensor(labels[:32])
    batch = torch.stack([tf(im) for im in images[:32]])
    bb.model.train()

    def t(f, n=args.repeats):
        f()
        start = time.perf_counter()
        for _ in range(n):
            f()
        return 1000 * (time.perf_counter() - start) / n

    def vjp(teacher):
        logits = class_logits(bb.model, batch, text)
        mask_gradients(logits, y, teacher, scores, cfg)

    for s_ in scores:  # Adam skips parameters without a gradient: give them one to time a real update
        s_.grad = torch.zeros_like(s_)
    pool = ViewPool(images[:32], tf, 0, 16)
    rows = {
        "augment 32 images from PIL (today: every step)": t(lambda: torch.stack([tf(im) for im in images[:32]])),
        "32 views from the pool (made once)": (pool.batch(range(32), [0] * 32), t(lambda: pool.batch(range(32), [0] * 32)))[1],
        "student forward": t(lambda: class_logits(bb.model, batch, text)),
        "teacher forward (today: every step after the first flip)": t(lambda: zero_shot_logits(bb.model, batch, text)),
        "student fwd + VJP, CE only (before any flip)": t(lambda: vjp(None)),
        "student fwd + batched VJP, CE + KL": t(lambda: vjp(zero_shot_logits(bb.model, batch, text).detach() * 0 + 1)),
        "optimizer step (Adam)": t(lambda: opt.step()),
        "sparsity reading": t(lambda: sparsity(masks)),
    }
    print(f"# per step, batch 32, rmt-world-vit, {torch.get_num_threads()} threads, ms (mean of {args.repeats})")
    for k, v in rows.items():
        print(f"| {k} | {v:.1f} |")


# ------------------------------------------------------------------------------------------- schedule
def cmd_schedule(args) -> None:
    import numpy as np
    import torch

    from bench.bench_claims import ALL_SHAPES, SHIFT_SPEC, SHIFTS, Bench
    from rmt_core.config import TuneConfig
    from rmt_core.masking import bake_masks
    from rmt_core.tuning import tune

    logging.getLogger("rmt_core.tuning").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)  # one thread per run: the search compares schedules, not thread pools
    bench = Bench("rmt-world-vit", "builtin", 0, 0, args.n_test, SHIFTS["noise-cast"], SHIFT_SPEC)
    recipes = [json.loads(r) for r in args.recipes]
    out = open(args.log, "a")
    results: dict[str, dict] = {}
    for shots in [int(s) for s in args.shots.split(",")]:
        for seed in [int(s) for s in args.seeds.split(",")]:
            imgs, labels = bench.train_set(ALL_SHAPES, shots, seed)
            for r in recipes:
                cfg = TuneConfig(backbone="rmt-world-vit", epochs=1, min_steps=r["steps"], learning_rate=r["lr"],
                                 warmup_steps=r.get("warmup", 0), threshold=r.get("threshold", 5e-3), seed=seed,
                                 holdout=0.0, prompt_template="a photo of a {}.", recipe="paper")
                backbone = dataclasses.replace(bench.base, model=copy.deepcopy(bench.base.model))
                torch.manual_seed(seed)
                result = tune(backbone, imgs, labels, bench.text["all"], cfg)
                bake_masks(backbone.model)
                acc = bench.accuracy(backbone.model, "all")
                row = {"recipe": r, "shots": shots, "seed": seed, "acc": acc, "steps": result.steps,
                       "sparsity": result.sparsity, "tune_s": round(result.elapsed_s, 2)}
                out.write(json.dumps(row) + "\n")
                out.flush()
                results.setdefault(json.dumps(r), {}).setdefault(shots, []).append(acc)
                print(row, flush=True)
    print("zero-shot", bench.accuracy(bench.base.model, "all"))
    for r, per_shot in results.items():
        print(r, {s: f"{np.mean(v):.1f} ({', '.join(f'{a:.0f}' for a in v)})" for s, v in per_shot.items()})


# ------------------------------------------------------------------------------------------- build
BUILD_SNIPPET = r"""
import json, resource, sys, time, tempfile, os
sys.path.insert(0, {code!r})
started = time.monotonic()
from rmt_core.pipeline import build_classifier
from rmt_core.config import TuneConfig
from bench.bench_claims import ALL_SHAPES, SHIFTS, TRAIN_SEED_OFFSET, images_of
from rmt_core import world
# the tasks of bench_selection.py: the world's 8 shapes under the noise-cast shift; 5 of them under noise + sepia
# (`rmt sample`); the same 5 in the pretraining style, which the backbone already separates
pool, style = {{"claims": (ALL_SHAPES, SHIFTS["noise-cast"]), "sample": (list(world.DEMO_CLASSES), world.DEMO_SHIFT),
               "plain": (list(world.DEMO_CLASSES), world.PRETRAIN_STYLE)}}[{task!r}]
classes = pool[:{n_classes}]
imgs, labels = images_of(classes, {shots}, TRAIN_SEED_OFFSET + {seed}, style, 64)
test, test_labels = images_of(classes, {n_test}, 90210, style, 64)
samples = list(zip(imgs, [classes[i] for i in labels]))
out = tempfile.mkdtemp(prefix="rmt-bench-build-")
t0 = time.monotonic(); c0 = resource.getrusage(resource.RUSAGE_SELF)
manifest = build_classifier(samples, TuneConfig(seed={seed}, **{config}), out + "/v", device="cpu")
c1 = resource.getrusage(resource.RUSAGE_SELF)
wall = time.monotonic() - t0
cpu = (c1.ru_utime + c1.ru_stime) - (c0.ru_utime + c0.ru_stime)
from rmt_core.runtime import load_classifier
import numpy as np
try:
    clf = load_classifier(out + "/v", out + "/bases")
    pred = [r[0]["label"] for r in clf.classify(test, top_k=1)]
    acc = float(np.mean([p == classes[t] for p, t in zip(pred, test_labels)]))
except Exception as exc:
    acc = None; print("eval failed", exc, file=sys.stderr)
eta_error = None
try:
    hist = json.load(open(out + "/v/report.json"))["history"]
    planned = hist[-1]["total_steps"]
    at = next(h for h in hist if h["step"] >= 0.2 * planned)
    if hist[-1]["step"] > at["step"] and at["eta_seconds"]:
        # the ETA is to the planned end; an early stop ends sooner, so compare seconds per remaining step
        predicted = at["eta_seconds"] / (planned - at["step"])
        actual = (hist[-1]["elapsed_s"] - at["elapsed_s"]) / (hist[-1]["step"] - at["step"])
        eta_error = round(predicted / actual - 1, 3)
except (OSError, KeyError, StopIteration):
    pass
step_s = {{"pre": [], "post": []}}  # seconds per step before / after the first flip (each step's own time)
try:
    prev_t, prev_sp = 0.0, 0.0
    for h in hist:
        step_s["post" if prev_sp > 0 else "pre"].append(h["elapsed_s"] - prev_t)
        prev_t, prev_sp = h["elapsed_s"], h["sparsity"]
except NameError:
    pass
step_means = {{k: round(sum(v) / len(v), 4) if v else None for k, v in step_s.items()}}
print(json.dumps({{"wall_s": round(wall, 2), "eta_error_at_20pct": eta_error, "step_s_pre_post_flip": step_means, "cpu_s": round(cpu, 2), "candidate": manifest["candidate"],
    "steps": manifest["steps"], "tuning": manifest.get("tuning"), "test_acc": acc,
    "published_accuracy": (manifest.get("validation") or {{}}).get("published_accuracy")}}))
"""


def _busy(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def cmd_build(args) -> None:
    # variants of this tree, to measure one lever alone: (code, apply the thread policy?, config overrides)
    variants = {"this": (str(ROOT), True, {}), "this-spinning": (str(ROOT), False, {}),
                "this-no-early-stop": (str(ROOT), True, {"early_stop": False}),
                "this-fp32": (str(ROOT), True, {"precision": "fp32"}),
                "this-bf16": (str(ROOT), True, {"precision": "bf16"}),
                "this-1thread": (str(ROOT), 1, {}), "this-2threads": (str(ROOT), True, {})}
    codes = {name: variants[name] for name in args.variants.split(",")}
    if args.code:  # today's code had no process policy; --code-policy gives it one (an A/B of a later lever)
        codes["main"] = (args.code, args.code_policy, {})
    log = open(args.log, "a")
    for n_classes, shots in [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]:
        for seed in [int(s) for s in args.seeds.split(",")]:
            for neighbour in ([False, True] if args.busy else [False]):
                for name, (code, policy, config) in codes.items():
                    busy = _busy(os.cpu_count() or 1) if neighbour else []
                    try:
                        # no OMP_* from this shell: without the policy a run gets libgomp's default (spin, then sleep)
                        env = {k: v for k, v in os.environ.items() if not k.startswith("OMP_")}
                        env["PYTHONPATH"] = code
                        snippet = BUILD_SNIPPET.format(code=code, n_classes=n_classes, shots=shots, seed=seed,
                                                       task=args.task, n_test=args.n_test,
                                                       config=repr({**json.loads(args.config), **config}))
                        if name == "this-2threads":  # every CPU whatever the tower's width (the rule before)
                            snippet = "import rmt_core.threads as t; t.PARALLEL_MIN_WIDTH = 0\n" + snippet
                        if policy:  # what `rmt tune` / the worker do at process start (an int: that many CPUs)
                            cpus = "" if policy is True else f"cpus={int(policy)}"
                            snippet = ("from rmt_core.threads import apply_process_policy; "
                                       f"apply_process_policy({cpus})\n" + snippet)

                        c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
                        t0 = time.monotonic()
                        proc = subprocess.run([sys.executable, "-c", snippet], env=env, capture_output=True,
                                              text=True, cwd=code)
                        wall = time.monotonic() - t0
                        c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
                    finally:
                        for p in busy:
                            p.kill()
                            p.wait()
                    if proc.returncode:
                        print(proc.stderr[-2000:])
                        continue
                    inner = json.loads(proc.stdout.strip().splitlines()[-1])
                    row = {"code": name, "task": args.task, "size": f"{n_classes}x{shots}", "seed": seed,
                           "busy": neighbour,
                           "process_wall_s": round(wall, 2),
                           "process_cpu_s": round((c1.ru_utime + c1.ru_stime) - (c0.ru_utime + c0.ru_stime), 2),
                           **inner}
                    log.write(json.dumps(row) + "\n")
                    log.flush()
                    print(json.dumps(row), flush=True)


# ------------------------------------------------------------------------------------------- precision
def cmd_precision(args) -> None:
    import torch

    from rmt_core.backbones import encode_class_texts, load_backbone
    from rmt_core.config import TuneConfig
    from rmt_core.masking import attach_masks
    from rmt_core.tuning import (autocast, bf16_supported, class_logits, mask_gradients, train_transform,
                                  zero_shot_logits)
    from bench.bench_claims import ALL_SHAPES

    if args.threads:
        torch.set_num_threads(args.threads)
    bb = load_backbone(args.backbone, None if args.backbone != "rmt-world-vit" else "builtin", seed=0)
    images, labels = _world_task(4, 0)
    cfg = TuneConfig(recipe="paper")
    text = encode_class_texts(bb, ALL_SHAPES, cfg.prompt_template)
    tf = train_transform(bb.preprocess)
    masks = attach_masks(bb.model, cfg.method, cfg.mask_init, cfg.threshold, cfg.mask_conv1)
    scores = [m.scores for m in masks.values()]
    batch = torch.stack([tf(im.resize(bb.image_size)) for im in images[:32]])
    y = torch.tensor(labels[:32])
    device = args.device
    bb.model.to(device)
    batch, y, text = batch.to(device), y.to(device), text.to(device)
    bb.model.train()
    where = (torch.cuda.get_device_name() if device == "cuda" else
             f"{torch.get_num_threads()} threads, torch CPU capability {torch.backends.cpu.get_cpu_capability()}")
    print(f"# {args.backbone}, batch 32, {device} ({where}), native bf16 here: {bf16_supported(device)}, "
          f"ms (median of {args.repeats})")
    sync = _synchronizer(device)

    def step(precision):
        with autocast(precision, device):
            logits = class_logits(bb.model, batch, text)
        mask_gradients(logits.float(), y, None, scores, cfg)
        sync()

    def teacher(precision):  # what tune() runs once per cached view: eval, inference mode, masks off
        with autocast(precision, device):
            zero_shot_logits(bb.model, batch, text)
        sync()

    parts = {"student fwd + VJP": step, "teacher forward": teacher}
    # fp32 and bf16 interleaved, median per call: a shared machine's load shifts under a run, and
    # interleaving puts both precisions under the same load
    times: dict[tuple[str, str], list[float]] = {}
    for part, f in parts.items():
        for precision in ("fp32", "bf16"):
            f(precision)  # warm-up (oneDNN primitive creation, weight casts)
        for _ in range(args.repeats):
            for precision in ("fp32", "bf16"):
                start = time.perf_counter()
                f(precision)
                times.setdefault((part, precision), []).append(1000 * (time.perf_counter() - start))
    print("| backbone | part | fp32 ms | bf16 ms | bf16 / fp32 |")
    for part in parts:
        a, b = (statistics.median(times[(part, p)]) for p in ("fp32", "bf16"))
        print(f"| {args.backbone} | {part} | {a:.1f} | {b:.1f} | {b / a:.2f} |", flush=True)


# ------------------------------------------------------------------------------------------- gpu
def _synchronizer(device: str):
    """What to call before reading a clock: waits for the GPU's queued work on CUDA, nothing on the CPU."""
    import torch

    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


class _timed_build_phases:
    """Seconds spent in each top-level phase of build_classifier, by wrapping the functions it calls, inside a
    ``with`` block (put back on leaving it). Candidates include the mask tuning; the checks (parity, jit parity,
    int8 guard) run on the CPU."""

    def __enter__(self):
        import rmt_core.base as base_mod
        import rmt_core.export as export_mod
        import rmt_core.pipeline as pipeline
        import rmt_core.tuning as tuning_mod

        self.seconds: dict[str, float] = {}
        self._undo = []
        for label, module, name in (("load backbone", pipeline, "load_build_backbone"),
                                    ("base export", base_mod, "ensure_base"),
                                    ("candidates", pipeline, "run_candidates"),
                                    ("of which tuning", tuning_mod, "tune"),
                                    ("served parity", export_mod, "check_served_parity"),
                                    ("jit parity", pipeline, "check_mode_parity"),
                                    ("int8 guard", pipeline, "int8_guard")):
            self._wrap(label, module, name)
        return self

    def _wrap(self, label, module, name):
        original = getattr(module, name)

        def timed(*a, **k):
            t0 = time.monotonic()
            try:
                return original(*a, **k)
            finally:
                self.seconds[label] = self.seconds.get(label, 0.0) + time.monotonic() - t0

        setattr(module, name, timed)
        self._undo.append((module, name, original))

    def __exit__(self, *exc):
        for module, name, original in self._undo:
            setattr(module, name, original)


def cmd_gpu(args) -> None:
    """create -> final on CUDA for a random-weights backbone, tuning images/s, served latency bs1/bs32."""
    import tempfile

    import numpy as np
    import torch

    from rmt_core import world
    from rmt_core.config import TuneConfig
    from rmt_core.pipeline import build_classifier
    from rmt_core.runtime import load_classifier

    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu: torch sees no CUDA device")
    sync = _synchronizer(device)
    classes = [f"{c} {s}" for s in world.SHAPES for c in ("red", "blue")][:args.classes]
    samples = []
    for name in classes:
        samples += [(img, name) for img, _ in world.sample_class(name, args.shots, 1, size=224)]
    config = TuneConfig(backbone=args.backbone, pretrained=None, seed=0, early_stop=not args.no_early_stop)
    out = Path(tempfile.mkdtemp(prefix="rmt-gpu-check-"))
    # --builds 2: a second build in the same process and bases folder = a warm worker (base exported, CUDA up)
    for build in range(1, args.builds + 1):
        with _timed_build_phases() as phases:
            sync()
            started = time.monotonic()
            manifest = build_classifier(samples, config, out / f"v{build}", device=device)
            create_to_final = time.monotonic() - started
        tuning = manifest.get("tuning") or {}
        steps = tuning.get("steps") or 0
        seen = steps * min(config.batch_size, manifest["n_train"])
        img_s = seen / tuning["seconds"] if tuning.get("seconds") else float("nan")
        which = "" if args.builds == 1 else (" (first build: exports the base)" if build == 1 else
                                             f" (build {build}: warm worker, base already exported)")
        print(f"| create -> final{which}, {args.backbone} random weights, {args.classes} classes x {args.shots} "
              f"shots, {device} | {create_to_final:.1f} s | {steps} of {tuning.get('planned_steps')} steps "
              f"({tuning.get('stop_reason')}), {tuning.get('precision')}, published {manifest['candidate']} |")
        print(f"| tuning throughput | {img_s:.1f} img/s | paper: 14.3 img/s (ratio {img_s / 14.3:.1f}x) |")
        inside = sum(v for k, v in phases.seconds.items() if k != "of which tuning")  # tuning is inside candidates
        print("| where the build's time went | " + ", ".join(f"{k} {v:.1f} s" for k, v in phases.seconds.items())
              + f", rest {create_to_final - inside:.1f} s | tuning is inside candidates |", flush=True)
    clf = load_classifier(out / f"v{args.builds}", out / "bases", providers=device)
    # ORT falls back to the CPU where its CUDA provider is missing (CPU onnxruntime wheel): say what served.
    served_on = ",".join(p.replace("ExecutionProvider", "") for p in clf.providers)
    x = np.random.default_rng(0).standard_normal((32, 3, *clf.input_size)).astype(np.float32)
    for bs in (1, 32):
        batch = x[:bs]
        for _ in range(3):
            clf.run(batch)
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            clf.run(batch)
            times.append(time.perf_counter() - t0)
        print(f"| served latency, batch {bs} | p50 {1000 * float(np.median(times)):.1f} ms | "
              f"{bs / float(np.median(times)):.0f} img/s, ORT on {served_on} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("profile")
    a.add_argument("--repeats", type=int, default=10)
    a = sub.add_parser("schedule")
    a.add_argument("--shots", default="4,8")
    a.add_argument("--seeds", default="0,1,2")
    a.add_argument("--n-test", type=int, default=30)
    a.add_argument("--log", default="/tmp/i17/schedule.jsonl")
    a.add_argument("--threads", type=int, default=1)
    a.add_argument("--recipes", nargs="+", default=[
        '{"lr": 8e-5, "steps": 300}', '{"lr": 5e-4, "steps": 60, "warmup": 5}', '{"lr": 5e-4, "steps": 30, "warmup": 3}',
        '{"lr": 1e-3, "steps": 30, "warmup": 3}', '{"lr": 1e-3, "steps": 60, "warmup": 5}',
        '{"lr": 2.5e-4, "steps": 60, "warmup": 5}'])
    a = sub.add_parser("build")
    a.add_argument("--code", default=None, help="another checkout (e.g. main) to run beside this tree")
    a.add_argument("--sizes", default="5x8,10x16", help="classes x shots")
    a.add_argument("--seeds", default="0")
    a.add_argument("--busy", action="store_true", help="also beside one busy-loop process per core")
    a.add_argument("--variants", default="this", help="this,this-spinning,this-no-early-stop,this-fp32,this-bf16,"
                   "this-1thread,this-2threads")
    a.add_argument("--config", default="{}", help='TuneConfig overrides for every code, e.g. '
                   '\'{"backbone": "ViT-B-32", "pretrained": null}\' (random weights)')
    a.add_argument("--task", default="claims", choices=("claims", "sample", "plain"),
                   help="claims: the world's 8 shapes under noise-cast (10x16 is 8 classes); sample / plain: 5 shapes")
    a.add_argument("--n-test", type=int, default=30, help="test images per class")
    a.add_argument("--code-policy", action="store_true",
                   help="apply this tree's process policy to --code too (a checkout that has rmt_core.threads)")
    a.add_argument("--log", default="/tmp/i17/build.jsonl")
    a = sub.add_parser("precision")
    a.add_argument("--backbone", default="rmt-world-vit")
    a.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    a.add_argument("--repeats", type=int, default=5)
    a.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    a = sub.add_parser("gpu")
    a.add_argument("--backbone", default="ViT-B-16")
    a.add_argument("--classes", type=int, default=10)
    a.add_argument("--shots", type=int, default=16)
    a.add_argument("--repeats", type=int, default=20)
    a.add_argument("--no-early-stop", action="store_true")
    a.add_argument("--builds", type=int, default=1, help="builds in one process sharing the bases (2: a warm worker)")
    a.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                   help="cpu: a dry run of this command's code path on a machine without a GPU")
    args = p.parse_args(argv)
    {"profile": cmd_profile, "schedule": cmd_schedule, "build": cmd_build, "precision": cmd_precision,
     "gpu": cmd_gpu}[args.cmd](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
