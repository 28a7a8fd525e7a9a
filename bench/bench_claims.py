"""Do the paper's qualitative claims hold on the generated world? (issue 5, part 2)

The R-AMT paper (ICCV 2023) claims, for CLIP few-shot transfer:
  1. mask tuning >> zero-shot on a downstream task the pretraining did not cover;
  2. R-AMT >= AMT on the classes it was tuned on (base);
  3. R-AMT > AMT on classes it never saw (new), because GDR keeps the general knowledge;
  4. only a few percent of the masked weights are switched off.
Real CLIP weights and datasets cannot be fetched here, so this benchmark tests the claims with the
project's own world CLIP ("rmt-world-vit", pretrained on rmt_core/world.py) on two tasks built from
that world under a rendering shift the pretraining never saw (``SHIFTS``; default "noise-cast": Gaussian
pixel noise 0.25 and a colour cast (1.0, 0.8, 0.5)):

  * shifted few-shot: all 8 shapes, K shots per class, scored on a fixed held-out test set;
  * base-to-new: tuned on 4 base shapes (K shots), scored on the base shapes and, zero-shot through the
    tuned image encoder, on the 4 new shapes (CoOp/CoCoOp protocol); H = harmonic mean of base and new.

Every method gets the same optimizer budget (``--steps`` steps at ``--lr``, batch 32, the official
augmentation); only the method differs. Runs are appended to a JSONL file so that several processes
(``--shard i/n``) can share the work and ``--report`` merges them into bench/RESULTS.md ("claims").

    python bench/bench_claims.py --quick                       # end-to-end smoke (tiny)
    python bench/bench_claims.py --shard 0/2 & python bench/bench_claims.py --shard 1/2 & wait
    python bench/bench_claims.py --followup --shard 0/2 & python bench/bench_claims.py --followup --shard 1/2 & wait
    python bench/bench_claims.py --report
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rmt_core import world  # noqa: E402
from rmt_core.backbones import encode_class_texts, load_backbone  # noqa: E402
from rmt_core.config import TuneConfig  # noqa: E402
from rmt_core.masking import bake_masks  # noqa: E402
from rmt_core.preprocess import PreprocessConfig, preprocess_batch  # noqa: E402
from rmt_core.tuning import class_logits, tune  # noqa: E402

ALL_SHAPES = list(world.SHAPES)
BASE = ["circle", "square", "triangle", "star"]
NEW = ["hexagon", "cross", "diamond", "crescent"]
# The downstream domain: sketch-like outline rendering (never in pretraining) under noise and a colour cast.
SHIFTS = {  # downstream domains the pretraining never saw (rendering styles of the same world)
    "noise-cast": world.Style(noise=0.25, colour_cast=(1.0, 0.8, 0.5)),
    "outline": world.Style(outline=True),
    "sketch": world.Style(noise=0.12, colour_cast=(1.0, 0.85, 0.6), outline=True),
}
SHIFT_SPEC = world.PRETRAIN
TEMPLATE = "a photo of a {}."
TEST_SEED = 90_210  # the test images never depend on the run's seed
TRAIN_SEED_OFFSET = 1_000  # train images of seed s come from sample_class(..., seed=1000+s)
N_TEST = 50
METHOD_ORDER = ["zero-shot", "amt", "r-amt", "pmt", "r-pmt", "mmt", "r-mmt"]
DEFAULT_RUNS = Path(__file__).with_name("claims_runs.jsonl")


@dataclasses.dataclass(frozen=True)
class Job:
    task: str  # "shifted" | "b2n"
    method: str
    shots: int
    seed: int
    leak: float = 1.0
    steps: int | None = None  # follow-up runs only: another schedule than --steps / --lr
    lr: float | None = None

    @property
    def key(self) -> tuple:
        base = (self.task, self.method, self.shots, self.seed, self.leak)
        return base if self.steps is None and self.lr is None else base + (self.steps, self.lr)


def images_of(classes: list[str], n: int, seed: int, style: world.Style, size: int,
              spec: world.WorldSpec = world.PRETRAIN) -> tuple[list, list[int]]:
    images, labels = [], []
    for label, name in enumerate(classes):
        images += [img for img, _ in world.sample_class(name, n, seed, size=size, spec=spec, style=style)]
        labels += [label] * n
    return images, labels


class Bench:
    """One loaded backbone, the fixed test sets and text features; ``run(job)`` tunes a fresh copy."""

    def __init__(self, backbone: str, pretrained: str | None, steps: int, lr: float, n_test: int,
                 style: world.Style, spec: world.WorldSpec = world.PRETRAIN):
        self.base = load_backbone(backbone, pretrained, seed=0)  # never carries masks: copies are tuned
        self.steps, self.lr, self.style, self.spec = steps, lr, style, spec
        self.size = self.base.image_size[0]
        self.pre = PreprocessConfig.from_dict(self.base.preprocess)
        self.text = {name: encode_class_texts(self.base, classes, TEMPLATE)
                     for name, classes in (("all", ALL_SHAPES), ("base", BASE), ("new", NEW))}
        self.test = {}
        for name, classes in (("all", ALL_SHAPES), ("base", BASE), ("new", NEW)):
            imgs, labels = images_of(classes, n_test, TEST_SEED, style, self.size, spec)
            self.test[name] = (torch.from_numpy(preprocess_batch(imgs, self.pre)), torch.tensor(labels))
        self._train: dict[tuple, tuple] = {}

    @torch.no_grad()
    def accuracy(self, model, split: str) -> float:
        model.eval()
        x, y = self.test[split]
        logits = torch.cat([class_logits(model, x[i:i + 200], self.text[split]) for i in range(0, len(y), 200)])
        return 100.0 * float((logits.argmax(1) == y).float().mean())

    def train_set(self, classes: list[str], shots: int, seed: int) -> tuple[list, list[int]]:
        # K-shot sets are nested (the first K of 16 per class), so shots are comparable within a seed.
        key = (tuple(classes), seed)
        if key not in self._train:
            self._train[key] = images_of(classes, 16, TRAIN_SEED_OFFSET + seed, self.style, self.size, self.spec)
        imgs, labels = self._train[key]
        keep = [i for i in range(len(labels)) if i % 16 < shots]
        return [imgs[i] for i in keep], [labels[i] for i in keep]

    def config(self, job: Job) -> TuneConfig:
        # epochs=1 + min_steps: every run takes the same number of optimizer steps (rounded up to whole epochs).
        return TuneConfig(method=job.method, backbone=self.base.name, pretrained=self.base.pretrained, epochs=1,
                          min_steps=job.steps or self.steps, learning_rate=job.lr or self.lr, batch_size=32,
                          leak=job.leak,
                          prompt_template=TEMPLATE, seed=job.seed, holdout=0.0)

    def zero_shot(self) -> dict:
        base, new = self.accuracy(self.base.model, "base"), self.accuracy(self.base.model, "new")
        return {"shifted": self.accuracy(self.base.model, "all"), "base": base, "new": new, "h": harmonic(base, new)}

    def run(self, job: Job) -> dict:
        classes, split = (ALL_SHAPES, "all") if job.task == "shifted" else (BASE, "base")
        imgs, labels = self.train_set(classes, job.shots, job.seed)
        backbone = dataclasses.replace(self.base, model=copy.deepcopy(self.base.model))  # clean copy, no masks yet
        torch.manual_seed(job.seed)
        result = tune(backbone, imgs, labels, self.text[split], self.config(job))
        bake_masks(backbone.model)
        fields = dataclasses.asdict(job)
        fields["steps_override"], fields["lr_override"] = fields.pop("steps"), fields.pop("lr")
        out = {**fields, "sparsity": result.sparsity, "steps": result.steps,
               "tune_s": round(result.elapsed_s, 1), "no_flip": result.sparsity == 0.0,
               "train_acc_last": result.history[-1]["train_accuracy"]}
        if job.task == "shifted":
            out["acc"] = self.accuracy(backbone.model, "all")
        else:
            out["base"], out["new"] = self.accuracy(backbone.model, "base"), self.accuracy(backbone.model, "new")
            out["h"] = harmonic(out["base"], out["new"])
        return out


def _style_text(style: world.Style) -> str:
    parts = ["outline rendering" if style.outline else "", f"pixel noise {style.noise:g}" if style.noise else "",
             f"colour cast {style.colour_cast}" if style.colour_cast else "",
             f"blur {style.blur:g}" if style.blur else ""]
    return ", ".join(p for p in parts if p)


def harmonic(a: float, b: float) -> float:
    return 2 * a * b / (a + b) if a + b else 0.0


def plan(shots_all: list[int], shots_extra: list[int], seeds: list[int], tasks: list[str],
         leaks: list[float], tail: bool = True) -> list[Job]:
    """AMT and R-AMT at every shot count and R-PMT / R-MMT at ``shots_extra`` first; with ``tail``, R-PMT /
    R-MMT at the remaining shot counts last (so a run cut short for time still has the core table)."""
    core, rest = [], []
    for task in tasks:
        for shots in shots_all:
            for seed in seeds:
                for method in ("amt", "r-amt", "r-pmt", "r-mmt"):
                    job = Job(task, method, shots, seed)
                    (core if method in ("amt", "r-amt") or shots in shots_extra else rest).append(job)
    for leak in leaks:  # a follow-up: R-AMT with another GDR leak, base-to-new only
        for shots in shots_extra:
            for seed in seeds:
                core.append(Job("b2n", "r-amt", shots, seed, leak))
    return core + (rest if tail else [])


def followup_plan(seeds: list[int], shots: int = 16) -> list[Job]:
    """The one investigation of R-AMT vs AMT on base-to-new: the service's longer, gentler schedule (300 steps
    at lr 8e-5, so GDR acts over more steps after the first flips) and a weaker GDR (leak 0.5)."""
    jobs = []
    for seed in seeds:
        jobs += [Job("b2n", "amt", shots, seed, 1.0, 300, 8e-5), Job("b2n", "r-amt", shots, seed, 1.0, 300, 8e-5),
                 Job("b2n", "r-amt", shots, seed, 0.5)]
    return jobs


def load_runs(paths: list[Path]) -> list[dict]:
    runs = {}
    for path in paths:
        if path.is_file():
            for line in path.read_text().splitlines():
                if line.strip():
                    r = json.loads(line)
                    runs[json.dumps([r.get("key"), r.get("setup")])] = r
    return list(runs.values())


def _ms(values: list[float]) -> str:
    if not values:
        return "—"
    return f"{np.mean(values):.1f} ± {np.std(values):.1f}"


def is_followup(r: dict) -> bool:
    return r.get("method") != "zero-shot" and (r.get("steps_override") is not None or r["leak"] != 1.0)


def report(runs: list[dict], meta: dict) -> str:
    zs = next((r for r in runs if r.get("method") == "zero-shot"), None)
    tuned = [r for r in runs if r.get("method") != "zero-shot" and not is_followup(r)]
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in tuned:
        groups[(r["task"], r["method"], r["shots"], r["leak"])].append(r)
    shots = sorted({r["shots"] for r in tuned})

    def order(key):
        task, method, k, leak = key
        return (METHOD_ORDER.index(method), -leak, k)

    lines = [meta["intro"], "", f"**Shifted few-shot task** (8 shapes, accuracy % on {meta['n_test'] * 8} test "
             "images, mean ± std over seeds; sparsity = % of the method's masked weights switched off)", "",
             "| method | " + " | ".join(f"{k}-shot" for k in shots) + f" | sparsity ({max(shots)}-shot) | seeds |",
             "|---|" + "---|" * (len(shots) + 2)]
    if zs:
        lines.append("| zero-shot | " + " | ".join(f"{zs['shifted']:.1f}" for _ in shots) + " | 0 | — |")
    for method, leak in sorted({(m, lk) for (t, m, _, lk) in groups if t == "shifted"},
                               key=lambda ml: order(("", ml[0], 0, ml[1]))):
        cells, sp, nseeds = [], "—", set()
        for k in shots:
            g = groups.get(("shifted", method, k, leak), [])
            cells.append(_ms([r["acc"] for r in g]))
            nseeds.add(len(g)) if g else None
            if g and k == max(shots):
                sp = f"{np.mean([r['sparsity'] for r in g]):.2f}%"
        name = method.upper() + ("" if leak == 1.0 else f" (l={leak:g})")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {sp} | {','.join(map(str, sorted(nseeds)))} |")

    lines += ["", "**Base-to-new** (tuned on circle/square/triangle/star; new = hexagon/cross/diamond/crescent, "
              f"zero-shot prompts through the tuned encoder; 4-way each, {meta['n_test'] * 4} test images per split; "
              "base / new / H, mean ± std over seeds)", "",
              "| method | shots | base | new | H | sparsity | seeds |", "|---|---|---|---|---|---|---|"]
    if zs:
        lines.append(f"| zero-shot | 0 | {zs['base']:.1f} | {zs['new']:.1f} | {zs['h']:.1f} | 0 | — |")
    for key in sorted((k for k in groups if k[0] == "b2n"), key=lambda k: (k[2], order(k))):
        g = groups[key]
        _, method, k, leak = key
        name = method.upper() + ("" if leak == 1.0 else f" (l={leak:g})")
        lines.append(f"| {name} | {k} | {_ms([r['base'] for r in g])} | {_ms([r['new'] for r in g])} | "
                     f"{_ms([r['h'] for r in g])} | {np.mean([r['sparsity'] for r in g]):.2f}% | {len(g)} |")
    follow = [r for r in runs if is_followup(r)]
    if follow:
        lines += ["", "**Follow-up** (base-to-new, same task; one change each against the main schedule)", "",
                  "| variant | method | shots | base | new | H | sparsity | seeds |",
                  "|---|---|---|---|---|---|---|---|"]
        fgroups: dict[tuple, list[dict]] = defaultdict(list)
        for r in follow:
            fgroups[(r.get("steps_override"), r.get("lr_override"), r["leak"], r["method"], r["shots"])].append(r)
        for (steps, lr, leak, method, k), g in sorted(fgroups.items(),
                                                      key=lambda kv: (str(kv[0][0]), -kv[0][2], kv[0][3])):
            variant = f"{steps} steps, lr {lr:g}" if steps else f"GDR leak l={leak:g}"
            lines.append(f"| {variant} | {method.upper()} | {k} | {_ms([r['base'] for r in g])} | "
                         f"{_ms([r['new'] for r in g])} | {_ms([r['h'] for r in g])} | "
                         f"{np.mean([r['sparsity'] for r in g]):.2f}% | {len(g)} |")
    return "\n".join(lines)


def claims_summary(runs: list[dict]) -> str:
    """Per-claim verdicts computed from the runs (paired by seed and shots where both methods ran)."""
    zs = next((r for r in runs if r.get("method") == "zero-shot"), None)
    by = {(r["task"], r["method"], r["shots"], r["seed"], r["leak"]): r for r in runs
          if r.get("method") != "zero-shot" and not is_followup(r)}
    out = []

    def paired(task, field, a, b):
        pairs = [(by[(task, a, k, s, 1.0)][field], by[(task, b, k, s, 1.0)][field])
                 for (t, m, k, s, lk) in by if t == task and m == a and lk == 1.0 and (task, b, k, s, 1.0) in by]
        return pairs

    if zs:
        shifted = [r for r in runs
                   if r.get("task") == "shifted" and r["method"] in ("amt", "r-amt") and not is_followup(r)]
        top = max((r["shots"] for r in shifted), default=None)
        tuned = [r["acc"] for r in shifted if r["shots"] == top]
        if tuned:
            out.append(f"1. tuned >> zero-shot (shifted task, AMT/R-AMT {top}-shot): {np.mean(tuned):.1f}% vs "
                       f"{zs['shifted']:.1f}% zero-shot ({np.mean(tuned) - zs['shifted']:+.1f} points).")
    for field, label, n in (("base", "R-AMT >= AMT on base", 2), ("new", "R-AMT > AMT on new", 3),
                            ("h", "R-AMT vs AMT, H", 0)):
        pairs = paired("b2n", field, "r-amt", "amt")
        if pairs:
            d = np.array([a - b for a, b in pairs])
            wins = int((d > 0).sum())
            out.append(f"{str(n) + '. ' if n else '- '}{label}: mean difference R-AMT - AMT = {d.mean():+.2f} points "
                       f"over {len(d)} paired runs (R-AMT higher in {wins}, equal in {int((d == 0).sum())}).")
    sp = [r["sparsity"] for r in runs if r.get("method") in ("amt", "r-amt") and not is_followup(r)]
    if sp:
        out.append(f"4. few weights masked: AMT/R-AMT switch off {np.mean(sp):.2f}% of the masked weights on average "
                   f"(max {np.max(sp):.2f}%).")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny end-to-end run (1 seed, shots 1 and 4, 20 steps)")
    p.add_argument("--backbone", default="rmt-world-vit")
    p.add_argument("--pretrained", default="builtin", help="'builtin', a checkpoint path, or 'none' (random init)")
    p.add_argument("--shots", default="1,2,4,8,16")
    p.add_argument("--extra-shots", default="4,16", help="shot counts at which R-PMT and R-MMT run first")
    p.add_argument("--no-tail", action="store_true", help="skip R-PMT / R-MMT at the other shot counts")
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--tasks", default="shifted,b2n")
    p.add_argument("--shift", default="noise-cast", choices=sorted(SHIFTS), help="the downstream rendering style")
    p.add_argument("--leaks", default="", help="extra R-AMT leak values to try on base-to-new")
    p.add_argument("--followup", action="store_true", help="run only the follow-up (see followup_plan)")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--n-test", type=int, default=N_TEST)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--shard", default="0/1", help="i/n: run every n-th job starting at i")
    p.add_argument("--runs", type=Path, default=DEFAULT_RUNS, help="JSONL of finished runs (appended, resumable)")
    p.add_argument("--report", action="store_true", help="only merge the runs into bench/RESULTS.md")
    p.add_argument("--no-write", action="store_true", help="print the table, do not touch bench/RESULTS.md")
    args = p.parse_args(argv)
    ints = lambda s: [int(v) for v in s.split(",") if v]  # noqa: E731
    if args.quick:
        args.shots, args.extra_shots, args.seeds, args.steps, args.lr, args.n_test = "1,4", "4", "1", 20, 1e-3, 10
        if args.runs == DEFAULT_RUNS:
            args.runs = Path("/tmp/bench_claims_quick.jsonl")
            args.runs.unlink(missing_ok=True)
    torch.set_num_threads(args.threads)
    # "epochs raised" is expected here and "no mask flipped" is recorded per run (no_flip)
    logging.getLogger("rmt_core.tuning").setLevel(logging.ERROR)
    pretrained = None if args.pretrained == "none" else args.pretrained
    shift = SHIFTS[args.shift]
    meta_setup = {"backbone": args.backbone, "pretrained": args.pretrained, "steps": args.steps, "lr": args.lr,
                  "n_test": args.n_test, "shift": args.shift, "style": dataclasses.asdict(shift),
                  "spec": dataclasses.asdict(SHIFT_SPEC)}
    meta_setup = json.loads(json.dumps(meta_setup))  # as it reads back from the JSONL (tuples become lists)

    if not args.report:
        index, count = (int(v) for v in args.shard.split("/"))
        jobs = plan(ints(args.shots), ints(args.extra_shots), ints(args.seeds), args.tasks.split(","),
                    [float(v) for v in args.leaks.split(",") if v], tail=not args.no_tail)
        if args.followup:
            jobs = followup_plan(ints(args.seeds), max(ints(args.extra_shots)))
        done = {json.dumps(r["key"]) for r in load_runs([args.runs]) if r.get("setup") == meta_setup}
        mine = [j for i, j in enumerate(jobs) if i % count == index and json.dumps(list(j.key)) not in done]
        started = time.monotonic()
        bench = Bench(args.backbone, pretrained, args.steps, args.lr, args.n_test, shift, SHIFT_SPEC)
        print(f"setup {time.monotonic() - started:.1f}s; {len(mine)} jobs in shard {args.shard}", flush=True)
        with args.runs.open("a") as fh:
            if index == 0 and json.dumps(["zero-shot"]) not in done:
                fh.write(json.dumps({"method": "zero-shot", "key": ["zero-shot"], "setup": meta_setup,
                                     **bench.zero_shot()}) + "\n")
                fh.flush()
            for job in mine:
                r = bench.run(job)
                fh.write(json.dumps({**r, "key": list(job.key), "setup": meta_setup}) + "\n")
                fh.flush()
                score = f"{r['acc']:.1f}" if "acc" in r else f"base {r['base']:.1f} new {r['new']:.1f}"
                print(f"[{time.monotonic() - started:6.0f}s] {job.task} {job.method} l={job.leak:g} K={job.shots} "
                      f"seed={job.seed}: {score} sparsity {r['sparsity']:.2f}% ({r['steps']} steps, {r['tune_s']}s)",
                      flush=True)
        if count > 1:
            return 0

    runs = [r for r in load_runs([args.runs]) if r.get("setup") == meta_setup]
    intro = (f"Backbone `{args.backbone}` (pretrained={args.pretrained}). Domain shift: world shapes rendered "
             f"with the \"{args.shift}\" style ({_style_text(shift)}), never seen in pretraining; "
             f"prompt \"{TEMPLATE}\". Train shots from `world.sample_class(seed=1000+seed)`, test set fixed "
             f"(seed {TEST_SEED}, {args.n_test} images per class). Every method: {args.steps} optimizer steps "
             f"(epochs raised to reach them), Adam lr {args.lr:g} cosine, batch 32, mask init 1e-2 / threshold "
             f"5e-3, GDR leak 1.0, official augmentation. Produced by `bench/bench_claims.py`.")
    table = report(runs, {"intro": intro, "n_test": args.n_test})
    text = table + "\n\n" + claims_summary(runs)
    print(text)
    if not args.no_write and not args.quick:
        from bench.results import write_section

        write_section("claims", text + ("\n\n" + args_analysis if (args_analysis := ANALYSIS.strip()) else ""))
    return 0


# Written after reading the recorded runs (bench/claims_runs.jsonl); rerunning with another setup needs a new one.
ANALYSIS = """
**Analysis.** Compute: 120 main runs (all 5 methods incl. R-PMT/R-MMT at every shot count, 3 seeds) took 19 min
on 2 processes x 1 thread, the follow-up 5 min; nothing was cut. On this world and at this scale two of the four
claims hold and two do not.

- **Only a few percent masked — holds.** AMT/R-AMT switch off mostly 2-8% of the weights they mask (mean 5.0%,
  max 11.4%). More is not better: across runs accuracy falls as sparsity rises (Pearson r = -0.53 on the
  shifted task, -0.76 for new classes); the 1-shot seed-3 runs mask 8-9% and lose half their accuracy.
- **R-AMT >= AMT on base — holds, weakly.** +1.8 points on average over 15 paired runs (R-AMT higher in 11),
  which is inside the seed spread.
- **Tuned >> zero-shot — does not hold.** AMT/R-AMT beat zero-shot (41.0%) only from 8 shots on, by at most
  +5 points at 16 shots, and are *worse* at 1-4 shots; on the 4 base classes they stay near zero-shot (52%).
  R-MMT is the best method here (48.2% at 16 shots, never far below zero-shot).
- **R-AMT > AMT on new — does not hold.** New-class accuracy collapses for both (56.5% zero-shot -> ~29% at
  16 shots, chance 25%), and R-AMT - AMT = +0.1 point. R-MMT keeps far more (43% at 16 shots, 56-58% at 1-2).

**Why (one investigation).** The follow-up changed one thing at a time on base-to-new 16-shot: the service's
longer, gentler schedule (300 steps at lr 8e-5) and a weaker GDR (leak 0.5). Neither moves new-class accuracy
(29.0% and 28.8% vs 28.8%), so GDR's strength is not what limits it. Two properties of the method as run here
are the likely reasons (argued from the code, not measured separately): (1) GDR's KL gradient is exactly zero
until the first mask flips (the teacher equals the student), and with Adam every score whose CE gradient keeps
its sign moves ~lr per step, so scores cross the threshold nearly together — most flips are decided before GDR
can act; (2) under Adam, dropping an element's gradient with probability 1-p scales its normalised step only by
about sqrt(p), so GDR slows conflicting scores rather than
stopping them. The backbone matters too: a 4.6M-parameter CLIP pretrained for 15 CPU minutes has little spare
capacity, the shift (pixel noise 0.25) asks for denoising that deleting weights cannot add (final training-batch
accuracy at 16 shots is only ~30% on the 8-way task: the masks under-fit), and its attention weights evidently
carry the shape knowledge the new classes need (masking the MLP instead, R-MMT, keeps it). So this world
reproduces the paper's sparsity and its base-class ordering, not its headline gains; the claims are about
ViT-B/16 CLIP on real data, which `rmt eval` (CoOp protocol) measures where weights and data exist.
"""

if __name__ == "__main__":
    raise SystemExit(main())
