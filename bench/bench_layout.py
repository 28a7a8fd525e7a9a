"""Classifier layout benchmark: base + mask + head (shared base) against one baked ONNX file per classifier.

    python bench/bench_layout.py [--classifiers 6] [--loaded 50] [--repeats 4] [--latency-repeats 40]
                                 [--parts disk,memory,cold,latency,parity,ort,builtin]

ViT-B-32 with random weights (compute and memory do not depend on weight values), r-amt masks with ~5%
of the attention weights (+ conv1) masked out, zero-shot head; the builtin backbone for disk/latency/parity.
Memory is measured in fresh subprocesses (RSS from /proc/self/status after load + one bs1 classify), with
``--loaded`` classifiers (50) really loaded at once in one process;
"today" = the pre-change layout: a torch-exported baked model.onnx per classifier, one ORT session each.
Timings are CPU seconds of the process (time.process_time, ORT threads never spin), interleaved, median:
on a shared machine CPU time is steadier than wall time and measures the same work.
Writes bench/RESULTS-layout.md.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ARCH = "ViT-B-32"
LABELS = ["cat", "dog", "car", "tree", "boat"]
DROP = 0.05
RESULTS = Path(__file__).with_name("RESULTS-layout.md")


def rss_mb() -> dict:
    out = {}
    for line in open("/proc/self/status"):
        if line.startswith(("VmRSS", "RssAnon", "RssFile")):
            key, value = line.split(":")
            out[key] = int(value.split()[0]) / 1024
    return out


# ---- setup (main process, torch) ------------------------------------------------------------------------
def make_world(tmp: Path, arch: str, n_classifiers: int, legacy: int) -> dict:
    """A base, ``n_classifiers`` r-amt version dirs (random ~5% masks) and ``legacy`` old-layout dirs."""
    import torch

    from rmt_core.artifact import write_version_files
    from rmt_core.backbones import encode_class_texts, load_backbone
    from rmt_core.base import ensure_base
    from rmt_core.export import ClassifierHead, export_onnx
    from rmt_core.head import Head
    from rmt_core.masking import apply_mask_bits, target_names

    pretrained = "builtin" if arch == "rmt-world-vit" else None
    backbone = load_backbone(arch, pretrained)
    t = time.perf_counter()
    base = ensure_base(backbone, tmp / "bases")
    base_export_s = time.perf_counter() - t
    text = encode_class_texts(backbone, LABELS, "a photo of a {}.")
    scale = float(backbone.model.logit_scale.detach().exp())
    head = Head.zero_shot(text.numpy(), scale)
    visual = backbone.model.visual
    params = dict(visual.named_parameters())
    names = target_names(visual, "r-amt")
    versions, bits_of = [], {}
    for i in range(n_classifiers + 1):  # the last one flips nothing (a zero-shot or unselected-mask version)
        out = tmp / "versions" / f"v{i}"
        out.mkdir(parents=True)
        rng = np.random.default_rng(i)
        bits = None if i == n_classifiers else {f"visual.{n}": rng.random(tuple(params[n].shape)) > DROP for n in names}
        fields = write_version_files(out, base_id=base.base_id, head=head, masks=bits, meta={"method": "r-amt"})
        manifest = {"labels": LABELS, "preprocess": backbone.preprocess, "backbone": arch, "pretrained": pretrained,
                    "method": "r-amt", **fields}
        (out / "manifest.json").write_text(json.dumps(manifest))
        versions.append(out)
        bits_of[str(out)] = bits
    legacy_dirs = []
    t = time.perf_counter()
    for i in range(legacy):  # today's layout: the masked model baked and exported whole, per classifier
        out = tmp / "legacy" / f"l{i}"
        out.mkdir(parents=True)
        shutil.copy(versions[i] / "manifest.json", out / "manifest.json")
        manifest = json.loads((out / "manifest.json").read_text())
        for key in ("base_id", "mask_file", "head_file", "layout"):
            manifest.pop(key)
        (out / "manifest.json").write_text(json.dumps(manifest))
        if i == 0:
            model = load_backbone(arch, pretrained)
            apply_mask_bits(model.model, bits_of[str(versions[0])])
            export_onnx(ClassifierHead(model.model.visual, text, scale), out / "model.onnx")
            tuned_model = ClassifierHead(model.model.visual, text, scale).eval()
        else:  # the same bytes per classifier (size and load cost do not depend on the mask's values)
            shutil.copy(legacy_dirs[0] / "model.onnx", out / "model.onnx")
        legacy_dirs.append(out)
    export_s = (time.perf_counter() - t)
    return {"base": base, "versions": versions, "legacy": legacy_dirs, "tuned_model": tuned_model if legacy else None,
            "base_export_s": base_export_s, "legacy_export_s": export_s, "backbone": backbone}


# ---- subprocess workers (no torch imported) -------------------------------------------------------------
def worker(args) -> None:
    from rmt_core.runtime import BaseRegistry, load_classifier

    dirs = [Path(p) for p in args.dirs]
    size = json.loads((dirs[0] / "manifest.json").read_text())["preprocess"]["size"]
    x1 = np.random.default_rng(0).normal(size=(1, 3, *size)).astype(np.float32)
    before = rss_mb()
    loaded, points = [], []
    registry = BaseRegistry(args.bases, return_memory=True)
    t = time.perf_counter()
    for d in dirs:
        clf = load_classifier(d, registry=registry)
        clf.run(x1)
        loaded.append(clf)
        points.append(rss_mb()["VmRSS"])
    elapsed = time.perf_counter() - t
    after = rss_mb()
    print(json.dumps({"before": before, "after": after, "points": points, "elapsed_s": elapsed,
                      "registry": registry.stats(), "threads": len(os.listdir("/proc/self/task")),
                      "own_bytes": [getattr(c, "own_tensor_bytes", None) for c in loaded]}))


def run_worker(bases: Path, dirs: list[Path]) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--bases", str(bases), "--dirs", *map(str, dirs)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT).stdout
    return json.loads(out.strip().splitlines()[-1])


def ort_worker(args) -> None:
    """Shared initializers the way ORT offers them: one OrtValue per tensor in every session (add_initializer)."""
    import onnx
    import onnxruntime as ort

    from rmt_core.base import BaseInfo, external_layout
    from rmt_core.runtime import session_options

    info = BaseInfo.load(args.bases)
    model = onnx.load(str(info.onnx_path), load_external_data=False)
    data = np.memmap(info.path / "base.onnx.data", dtype=np.uint8, mode="r")
    arrays = {n: data[o:o + ln].view(dt).reshape(s) for n, (o, ln, dt, s) in external_layout(model).items()}
    masked = [v["initializer"] for k, v in info.maskable.items() if ".attn." in k or "conv1" in k]
    shared = {n: ort.OrtValue.ortvalue_from_numpy(a) for n, a in arrays.items() if n not in masked}
    x1 = np.random.default_rng(0).normal(size=(1, 3, *info.preprocess["size"])).astype(np.float32)
    rng = np.random.default_rng(0)
    before, sessions, keep = rss_mb(), [], []
    for _ in range(args.n):
        options = session_options()
        if args.no_prepack:
            options.add_session_config_entry("session.disable_prepacking", "1")
        own = {n: ort.OrtValue.ortvalue_from_numpy(arrays[n] * (rng.random(arrays[n].shape, dtype=np.float32) > DROP))
               for n in masked}
        for name, value in {**shared, **own}.items():
            options.add_initializer(name, value)
        s = ort.InferenceSession(str(info.onnx_path), sess_options=options, providers=["CPUExecutionProvider"])
        s.run(None, {"image": x1})
        sessions.append(s)
        keep.append(own)
    after = rss_mb()
    t1 = []
    for _ in range(args.repeats):
        t = time.process_time()
        sessions[0].run(None, {"image": x1})
        t1.append(time.process_time() - t)
    print(json.dumps({"before": before, "after": after, "bs1_cpu_s": statistics.median(t1)}))


# ---- parts ----------------------------------------------------------------------------------------------
def interleaved(fns: dict, repeats: int) -> tuple[dict, dict]:
    """Median CPU seconds and median wall seconds per call of each fn, the fns called in turn."""
    for fn in fns.values():
        fn()
    cpu, wall = {k: [] for k in fns}, {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t, w = time.process_time(), time.perf_counter()
            fn()
            cpu[name].append(time.process_time() - t)
            wall[name].append(time.perf_counter() - w)
    return ({k: statistics.median(v) for k, v in cpu.items()}, {k: statistics.median(v) for k, v in wall.items()})


def cpu_interleaved(fns: dict, repeats: int) -> dict:
    return interleaved(fns, repeats)[0]


def part_disk(world, rows, arch):
    full = (world["legacy"][0] / "model.onnx").stat().st_size
    v = world["versions"][0]
    per = sum(p.stat().st_size for p in v.iterdir())
    m = json.loads((v / "manifest.json").read_text())
    base_bytes = sum(p.stat().st_size for p in world["base"].path.iterdir())
    rows.append((f"disk per additional classifier ({arch}, r-amt {100 * DROP:.0f}% masked i.i.d.: mask "
                 f"{m['mask_bytes'] / 1e3:.0f} kB + head {m['head_bytes'] / 1e3:.1f} kB + manifest) / full baked ONNX",
                 f"{per / 1e3:.0f} kB / {full / 1e6:.1f} MB (base once: {base_bytes / 1e6:.1f} MB)",
                 per / full, "<= 0.02"))


def part_memory(world, rows, n: int, legacy_n: int, arch: str, loaded: int = 50):
    """RSS of ``loaded`` r-amt classifiers in one fresh process (the ``n`` distinct masks, copied into more
    version dirs: memory does not depend on the mask's values and every dir is its own classifier), against
    ``legacy_n`` of today's sessions (extrapolated: 50 of them would not fit this machine)."""
    bases = world["bases"]
    old = run_worker(bases, world["legacy"][:legacy_n])
    old_per = np.diff([old["before"]["VmRSS"]] + old["points"])
    old_session = float(np.mean(old_per[1:])) if legacy_n > 1 else float(old_per[0])
    dirs = list(world["versions"][:n])
    for i in range(loaded - n):
        clone = world["tmp"] / "clones" / f"c{i}"
        shutil.copytree(world["versions"][i % n], clone)
        dirs.append(clone)
    new = run_worker(bases, dirs)
    new_per = np.diff(new["points"])  # the first includes the shared base
    new_extra = float(np.median(new_per))
    new_first = new["points"][0] - new["before"]["VmRSS"]
    zs = run_worker(bases, [world["versions"][-1], world["versions"][-1]])
    rows.append(("resident memory per additional loaded classifier (r-amt, median increment over "
                 f"{len(dirs) - 1}) / one full ORT session today",
                 f"{new_extra:.0f} MB / {old_session:.0f} MB  (first classifier on a base: {new_first:.0f} MB incl. "
                 f"the shared segments; own masked tensors {new['own_bytes'][0] / 1e6:.0f} MB)",
                 new_extra / old_session, "<= 0.40"))
    total_old = old["before"]["VmRSS"] + loaded * old_session
    rows.append((f"{loaded} {arch} r-amt classifiers loaded at once, server RSS (measured; today's extrapolated "
                 f"from {legacy_n} sessions); ORT threads in the process",
                 f"{new['after']['VmRSS'] / 1024:.2f} GB vs today {total_old / 1024:.1f} GB; {new['threads']} threads",
                 new["after"]["VmRSS"] / 1024, "<= 8 GB"))
    rows.append(("a classifier whose mask flipped nothing: encoder tensors/sessions of its own",
                 f"own bytes {zs['own_bytes']}, {zs['registry']['plans']}", 0, "none"))
    return {"old": old, "new": new, "zero_shot": zs}


def part_cold(world, rows, repeats: int):
    """Cold first classify: load + bs1 classify of a classifier not loaded yet (its base already serving)."""
    from rmt_core.runtime import BaseRegistry, OnnxClassifier, load_classifier

    x1 = np.random.default_rng(0).normal(size=(1, 3, *world["backbone"].image_size)).astype(np.float32)
    registry = BaseRegistry(world["bases"], return_memory=True)
    warm = load_classifier(world["versions"][0], registry=registry)  # the base is in use by another classifier
    warm.run(x1)
    warm_zs = load_classifier(world["versions"][-1], registry=registry)  # ... and by a zero-shot one
    warm_zs.run(x1)
    new_t, old_t, zs_t = [], [], []
    for i in range(repeats):
        t = time.perf_counter()
        c = load_classifier(world["versions"][1 + i % (len(world["versions"]) - 2)], registry=registry)
        c.run(x1)
        new_t.append(time.perf_counter() - t)
        del c
        t = time.perf_counter()
        c = OnnxClassifier(world["legacy"][i % len(world["legacy"])], providers="auto")
        c.run(x1)
        old_t.append(time.perf_counter() - t)
        del c
        t = time.perf_counter()
        c = load_classifier(world["versions"][-1], registry=registry)
        c.run(x1)
        zs_t.append(time.perf_counter() - t)
        del c
    new, old, zs = statistics.median(new_t), statistics.median(old_t), statistics.median(zs_t)
    rows.append(("cold first classify of a not-yet-loaded classifier (load + bs1; its base already serving) / "
                 "today's cold load + bs1 (wall, median)",
                 f"{new:.2f} s vs {old:.2f} s (zero-shot / nothing flipped: {zs:.2f} s)", new / old, "<= 0.5"))
    del warm, warm_zs
    t = time.perf_counter()
    load_classifier(world["versions"][0], registry=BaseRegistry(world["bases"], return_memory=True)).run(x1)
    rows.append(("cold first classify when no classifier on its base is loaded yet (builds the shared segments, "
                 "once per process and base)", f"{time.perf_counter() - t:.2f} s", None, "-"))


def part_latency(world, rows, repeats: int, arch: str, size: int):
    from rmt_core.runtime import BaseRegistry, OnnxClassifier, load_classifier

    registry = BaseRegistry(world["bases"], return_memory=True)
    new = load_classifier(world["versions"][0], registry=registry)
    zs = load_classifier(world["versions"][-1], registry=registry)
    old = OnnxClassifier(world["legacy"][0], providers="auto")
    for bs in (1, 32):
        x = np.random.default_rng(bs).normal(size=(bs, 3, size, size)).astype(np.float32)
        np.testing.assert_allclose(new.logits(x), old.logits(x), rtol=1e-3, atol=1e-3)
        t, w = interleaved({"old": lambda: old.logits(x), "new": lambda: new.logits(x),
                            "zs": lambda: zs.logits(x)}, repeats if bs == 1 else max(3, repeats // 10))
        rows.append((f"classify latency {arch} bs{bs}, new layout / today's baked session (CPU s, median)",
                     f"{t['new'] * 1e3:.1f} ms vs {t['old'] * 1e3:.1f} ms (nothing-flipped on the base session: "
                     f"{t['zs'] / t['old']:.3f}x); wall {w['new'] * 1e3:.1f} vs {w['old'] * 1e3:.1f} ms = "
                     f"{w['new'] / w['old']:.3f}x", t["new"] / t["old"], "1.00 +- 0.03"))


def part_parity(world, rows, arch: str, size: int):
    import torch

    from rmt_core.materialize import materialize_onnx
    from rmt_core.runtime import make_session, softmax

    out = world["tmp"] / f"materialized-{arch}.onnx"
    t = time.perf_counter()
    materialize_onnx(world["versions"][0], world["bases"], out)
    took = time.perf_counter() - t
    x = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = torch.softmax(world["tuned_model"](x), -1).numpy()
    got = softmax(make_session(out, "cpu").run(None, {"image": x.numpy()})[0])
    rows.append((f"model.onnx materialised on demand ({arch}, {out.stat().st_size / 1e6:.1f} MB in {took:.1f} s, no torch): "
                 "parity with the tuned torch model, max |dp|", f"{float(np.abs(got - expected).max()):.2g}",
                 float(np.abs(got - expected).max()), "<= 1e-3 (parity_atol)"))


def part_ort(world, rows, n: int):
    """What ORT's own initializer sharing gives, and why the layout is not that (see rmt_core/segments.py)."""
    from rmt_core.runtime import OnnxClassifier

    res = {}
    for prepack in (True, False):
        cmd = [sys.executable, __file__, "--ort-worker", "--bases", str(world["base"].path), "--n", str(n),
               "--repeats", "5"] + ([] if prepack else ["--no-prepack"])
        res[prepack] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
                                  .stdout.strip().splitlines()[-1])
    old = OnnxClassifier(world["legacy"][0], providers="auto")
    x1 = np.random.default_rng(0).normal(size=(1, 3, *world["backbone"].image_size)).astype(np.float32)
    base_t = cpu_interleaved({"old": lambda: old.logits(x1)}, 5)["old"]
    for prepack, r in res.items():
        per = (r["after"]["VmRSS"] - r["before"]["VmRSS"]) / n
        rows.append((f"ORT add_initializer, one shared OrtValue per tensor, {n} sessions, prepacking "
                     f"{'on' if prepack else 'off (session.disable_prepacking)'}: RSS per session; bs1 latency vs baked",
                     f"{per:.0f} MB/session (incl. own masked tensors, and the mmap'd base counted once), "
                     f"bs1 {r['bs1_cpu_s'] * 1e3:.0f} ms vs {base_t * 1e3:.0f} ms", r["bs1_cpu_s"] / base_t,
                     "rejected" if prepack else "rejected"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="disk,memory,cold,latency,parity,ort,builtin")
    parser.add_argument("--arch", default=ARCH, help="the large backbone (random weights)")
    parser.add_argument("--classifiers", type=int, default=6, help="new-layout classifiers loaded at once")
    parser.add_argument("--legacy", type=int, default=3, help="today's sessions loaded at once")
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--latency-repeats", type=int, default=40, help="bs1 calls per layout (bs32: a tenth)")
    parser.add_argument("--loaded", type=int, default=50, help="classifiers loaded at once for the memory row")
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--ort-worker", action="store_true")
    parser.add_argument("--no-prepack", action="store_true")
    parser.add_argument("--n", type=int, default=3)
    parser.add_argument("--bases")
    parser.add_argument("--dirs", nargs="*")
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.ort_worker:
        return ort_worker(args)
    import torch

    torch.set_num_threads(2)
    parts = set(args.parts.split(","))
    rows: list[tuple] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        arch = args.arch
        world = make_world(tmp / "b32", arch, args.classifiers, max(args.legacy, 1))
        size = world["backbone"].image_size[0]
        world["bases"], world["tmp"] = tmp / "b32" / "bases", tmp
        print(f"setup: base export {world['base_export_s']:.1f} s, today's export {world['legacy_export_s']:.1f} s",
              flush=True)
        rows.append((f"{arch} base export, once per backbone weights (today: an export per classifier)",
                     f"{world['base_export_s']:.1f} s", None, "-"))
        if "disk" in parts:
            part_disk(world, rows, arch)
        if "memory" in parts:
            part_memory(world, rows, args.classifiers, args.legacy, arch, args.loaded)
        if "cold" in parts:
            part_cold(world, rows, args.repeats)
        if "latency" in parts:
            part_latency(world, rows, args.latency_repeats, arch, size)
        if "parity" in parts:
            part_parity(world, rows, arch, size)
        if "ort" in parts:
            part_ort(world, rows, 3)
        for r in rows:
            print(r, flush=True)
        if "builtin" in parts:
            small = make_world(tmp / "builtin", "rmt-world-vit", 2, 1)
            small["bases"], small["tmp"] = tmp / "builtin" / "bases", tmp
            size = small["backbone"].image_size[0]
            part_disk(small, rows, "rmt-world-vit")
            part_latency(small, rows, args.latency_repeats * 4, "rmt-world-vit", size)
            part_parity(small, rows, "rmt-world-vit", size)
    table = ["| what | measured | ratio / value | goal |", "|---|---|---|---|"]
    for what, measured, ratio, goal in rows:
        value = "" if ratio is None else (f"**{ratio:.3g}**" if isinstance(ratio, float) else f"**{ratio}**")
        table.append(f"| {what} | {measured} | {value} | {goal} |")
    from bench.results import machine

    text = (f"_Measured {dt.date.today().isoformat()} on {machine()} (shared with other jobs), "
            f"`python bench/bench_layout.py --classifiers {args.classifiers} --legacy {args.legacy} "
            f"--repeats {args.repeats} --latency-repeats {args.latency_repeats} --loaded {args.loaded}` "
            f"in {time.perf_counter() - started:.0f} s._\n\n" + "\n".join(table) + "\n")
    print(text)
    marker_start, marker_end = "<!-- bench_layout -->", "<!-- /bench_layout -->"
    old = RESULTS.read_text() if RESULTS.exists() else ""
    if marker_start in old:
        head, rest = old.split(marker_start, 1)
        tail = rest.split(marker_end, 1)[1] if marker_end in rest else ""
        RESULTS.write_text(head + marker_start + "\n" + text + marker_end + tail)
    else:
        RESULTS.write_text("# Classifier layout: shared base + mask + head\n\n" + marker_start + "\n" + text
                           + marker_end + "\n")


if __name__ == "__main__":
    main()
