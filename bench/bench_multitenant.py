"""Many classifiers on one base: memory per resident classifier, load time, latency and mixed traffic, per tier.

    python bench/bench_multitenant.py [--classifiers 200] [--drop 0.05] [--seconds 30] [--parts memory,latency,traffic]
    python bench/bench_multitenant.py --classifiers 6 --parts int8       # int8 vs baked fp32 vs eager open_clip
    python bench/bench_multitenant.py --classifiers 1 --parts default --builtin  # the service path vs baked fp32

ViT-B-32 with random weights (open_clip, pretrained=None: compute and memory do not depend on weight values),
r-amt masks dropping ``--drop`` of the attention weights i.i.d. (5%: the median of real builds of the builtin
backbone in bench/claims_runs.jsonl; the paper's average is 2.56%), one zero-shot head. Tiers
(rmt_core/runtime.py SERVING_MODES): "baked" = the masked weights multiplied in at load, sessions of their own
(today's layout); "jit" = the classifier holds the positions its mask drops, the weights are formed per call.
Every measurement runs in a fresh subprocess without torch (but the eager open_clip reference of the int8 part).
Mixed traffic runs the service's cache and micro-batcher in process (no HTTP): 16 clients, each request to a
uniformly random classifier. int8 (rmt_core/quantize.py) serves the same versions with their guard skipped
(the synthetic versions have no images to judge on; their int8 agreement with fp32 is reported instead).
Mask files after the first are written with zlib level 1 (same format; level 9 took ~7 s per dense i.i.d.
mask, the bench's own overhead). ``--world DIR`` keeps the generated base and versions for another run.
Writes a section of bench/RESULTS-multitenant.md.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.results import cpu_model  # noqa: E402

ARCH = "ViT-B-32"
BUILTIN_ARCH = "rmt-world-vit"
LABELS = ["cat", "dog", "car", "tree", "boat"]
RESULTS = Path(__file__).with_name("RESULTS-multitenant.md")


def rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    return 0.0


def make_world(tmp: Path, n: int, drop: float, arch: str = ARCH, pretrained: str | None = None) -> dict:
    """A base (ViT-B-32 random weights unless said) and ``n`` r-amt version dirs with i.i.d. masks dropping
    ``drop`` of the masked weights (reused from ``tmp`` when an earlier run left the same world there)."""
    import shutil

    from rmt_core.artifact import MASK_FILE, save_masks, write_version_files
    from rmt_core.backbones import encode_class_texts, load_backbone
    from rmt_core.base import ensure_base
    from rmt_core.head import Head
    from rmt_core.masking import target_names

    saved = tmp / "world.json"
    if saved.is_file():
        world = json.loads(saved.read_text())
        if world.get("drop") == drop and len(world["versions"]) >= n and world.get("arch", ARCH) == arch:
            return {**world, "versions": world["versions"][:n]}
    t = time.perf_counter()
    backbone = load_backbone(arch, pretrained)
    base = ensure_base(backbone, tmp / "bases")
    print(f"base in {time.perf_counter() - t:.0f} s", flush=True)
    text = encode_class_texts(backbone, LABELS, "a photo of a {}.").numpy()
    head = Head.zero_shot(text, float(backbone.model.logit_scale.detach().exp()))
    params = dict(backbone.model.visual.named_parameters())
    names = target_names(backbone.model.visual, "r-amt")
    versions, first = [], None
    shutil.rmtree(tmp / "versions", ignore_errors=True)
    for i in range(n):
        out = tmp / "versions" / f"v{i}"
        out.mkdir(parents=True)
        rng = np.random.default_rng(i)
        bits = {f"visual.{k}": rng.random(tuple(params[k].shape), dtype=np.float32) >= drop for k in names}
        if first is None:  # the first as the pipeline writes it; the others: its head, their own mask (zlib 1)
            first = write_version_files(out, base_id=base.base_id, head=head, masks=bits, meta={"method": "r-amt"})
            fields = first
        else:
            shutil.copyfile(tmp / "versions" / "v0" / first["head_file"], out / first["head_file"])
            fields = {**first, "mask_bytes": save_masks(out / MASK_FILE, bits, {"method": "r-amt"}, level=1)}
        manifest = {"labels": LABELS, "preprocess": backbone.preprocess, "backbone": arch, "pretrained": pretrained,
                    "method": "r-amt", **fields}
        (out / "manifest.json").write_text(json.dumps(manifest))
        versions.append(str(out))
    masked = sum(int(np.prod(params[k].shape)) for k in names)
    world = {"bases": str(tmp / "bases"), "versions": versions, "masked_weights": masked, "drop": drop, "arch": arch,
             "mask_file_kb": first["mask_bytes"] / 1024}
    saved.write_text(json.dumps(world))
    return world


# ---- subprocess parts (no torch) ----------------------------------------------------------------------------
def _x(version: str, n: int) -> np.ndarray:
    size = json.loads((Path(version) / "manifest.json").read_text())["preprocess"]["size"]
    return np.random.default_rng(0).normal(size=(n, 3, *size)).astype(np.float32)


def _load_series(versions: list[str], load) -> tuple[dict, list]:
    """``load(version)`` for each version in turn, each run once on one image: process RSS after each and the
    load wall time of each; returns (that, the loaded classifiers)."""
    x1 = _x(versions[0], 1)
    start = rss_mb()
    loaded, points, load_s = [], [], []
    for v in versions:
        t = time.perf_counter()
        clf = load(v)
        load_s.append(time.perf_counter() - t)
        clf.run(x1)
        loaded.append(clf)
        points.append(rss_mb())
    return {"start": start, "points": points, "load_s": load_s,
            "own_bytes": [c.resident_bytes for c in loaded[:3]]}, loaded


def sub_memory(args) -> dict:
    """Load ``count`` classifiers in ``mode`` one after another: RSS after each, load wall time of each."""
    from rmt_core.runtime import BaseRegistry, load_classifier

    registry = BaseRegistry(args.bases, "cpu", return_memory=True)
    return _load_series(args.versions[:args.count], lambda v: load_classifier(v, registry=registry, mode=args.mode))[0]


def sub_latency(args) -> dict:
    """bs1 and bs32 of one classifier, baked vs jit, interleaved: CPU and wall medians."""
    from rmt_core.runtime import BaseRegistry, load_classifier

    registry = BaseRegistry(args.bases, "cpu", return_memory=True)
    v = args.versions[0]
    clfs = {"baked": load_classifier(v, registry=registry), "jit": load_classifier(v, registry=registry, mode="jit")}
    other = load_classifier(args.versions[1], registry=registry, mode="jit")  # to measure a switch of classifier
    out = {}
    for bs, repeats in ((1, args.repeats), (32, max(3, args.repeats // 8))):
        x = _x(v, bs)
        cpu = {k: [] for k in (*clfs, "jit-switch")}
        wall = {k: [] for k in cpu}
        for clf in clfs.values():
            clf.run(x)
        for _ in range(repeats):
            for name in cpu:
                if name == "jit-switch":
                    other.run(x[:1])  # the buffers now hold another classifier's weights
                    clf = clfs["jit"]
                else:
                    clf = clfs[name]
                t, w = time.process_time(), time.perf_counter()
                clf.run(x)
                cpu[name].append(time.process_time() - t)
                wall[name].append(time.perf_counter() - w)
        out[f"bs{bs}"] = {k: {"cpu": statistics.median(cpu[k]), "wall": statistics.median(wall[k])} for k in cpu}
    a, b = clfs["baked"].run(_x(v, 4)), clfs["jit"].run(_x(v, 4))
    out["parity"] = float(np.abs(a - b).max())
    return out


def _timed(fns: dict, x: np.ndarray, repeats: int) -> dict:
    """Each of ``fns`` (name -> callable on a batch) run on ``x`` ``repeats`` times, interleaved after one warm-up
    call each: median CPU and wall seconds."""
    for fn in fns.values():
        fn(x)
    cpu = {k: [] for k in fns}
    wall = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t, w = time.process_time(), time.perf_counter()
            fn(x)
            cpu[name].append(time.process_time() - t)
            wall[name].append(time.perf_counter() - w)
    return {k: {"cpu": statistics.median(cpu[k]), "wall": statistics.median(wall[k])} for k in fns}


def sub_int8(args) -> dict:
    """``count`` int8 classifiers loaded one after another (RSS after each, load time), then the first one's
    bs1/bs32 latency against the same classifier baked in fp32, and their agreement on random images."""
    from rmt_core.runtime import BaseRegistry, ServedClassifier, load_classifier

    registry = BaseRegistry(args.bases, "cpu", return_memory=True)
    out, loaded = _load_series(args.versions[:args.count],
                               lambda v: ServedClassifier(v, registry, precision="int8", check_guard=False))
    int8 = loaded[0]
    t = time.perf_counter()
    fp32 = load_classifier(args.versions[0], registry=registry)
    out.update(fp32_load_s=time.perf_counter() - t, precision=int8.precision)
    x1 = _x(args.versions[0], 1)
    for bs, repeats in ((1, args.repeats), (32, max(3, args.repeats // 8))):
        out[f"bs{bs}"] = _timed({"baked": fp32.run, "int8": int8.run}, _x(args.versions[0], bs), repeats)
    x = np.random.default_rng(1).normal(size=(64, 3, *x1.shape[2:])).astype(np.float32)
    a, b = fp32.run(x), int8.run(x)
    out["agreement"], out["max_dp"], out["n_agree"] = float((a.argmax(1) == b.argmax(1)).mean()), float(np.abs(a - b).max()), len(x)
    return out


def sub_eager(args) -> dict:
    """The same encoder in eager open_clip (torch, fp32, inference mode) with a zero-shot-like head: bs1/bs32."""
    import torch

    from rmt_core.backbones import load_backbone

    backbone = load_backbone(ARCH, None)
    visual = backbone.model.visual.eval()
    text = torch.nn.functional.normalize(torch.randn(len(LABELS), visual.output_dim, generator=torch.Generator()
                                                     .manual_seed(0)), dim=-1)

    @torch.inference_mode()
    def run(x):
        f = visual(torch.from_numpy(x))
        return torch.softmax(100 * torch.nn.functional.normalize(f, dim=-1) @ text.T, dim=-1).numpy()

    out = {"threads": torch.get_num_threads()}
    for bs, repeats in ((1, args.repeats), (32, max(3, args.repeats // 8))):
        out[f"bs{bs}"] = _timed({"eager": run}, _x(args.versions[0], bs), repeats)["eager"]
    return out


def sub_default(args) -> dict:
    """One classifier, one client, bs1 and bs32 single requests, interleaved (median CPU and wall per request):
    "service" = the path the classify route takes after preprocessing (the cache's get, then the batch group's
    micro-batcher, in the service's default settings: serving mode, precision, batch size and wait); "direct" =
    the same loaded classifier's predict called in this thread (today's baked fp32, no batcher: the lower bound);
    "service-old-wait" = the service path with the batcher's wait rule before 2026-12-03 (a request soon after
    another waited for company even from one client); "per-classifier" = a plain batcher over the classifier's
    run with that rule, as every classifier had before issue 18."""
    from app.classifier_cache import ClassifierCache, MicroBatcher, served_loader
    from rmt_core.serving import predict_mixed
    from rmt_service.settings import Settings

    default = {k: f.default for k, f in Settings.model_fields.items()}
    version = Path(args.versions[0])
    loader = served_loader(Path(args.bases), "cpu", mode=default["serving_mode"],
                           precision=default["serving_precision"])
    cache = ClassifierCache(default["classifier_cache_size"], max_bytes=default["classifier_cache_bytes"],
                            providers="cpu", batch_max_size=default["batch_max_size"],
                            batch_max_wait_ms=default["batch_max_wait_ms"], loader=loader)
    out: dict = {"mode": default["serving_mode"], "precision": default["serving_precision"],
                 "wait_ms": default["batch_max_wait_ms"]}

    async def main():
        entry = await cache.get("c0", version)
        clf = entry.classifier
        out.update(group=batch_group_name(clf), tier=getattr(clf, "mode", "?"))
        size, wait = default["batch_max_size"], default["batch_max_wait_ms"] / 1000

        class WaitsOnTraffic(MicroBatcher):  # the wait rule before 2026-12-03: soon after another request, wait
            _company = property(lambda self: True, lambda self, value: None)

        old = WaitsOnTraffic(clf.run, cache.executor, size, wait)
        old_group = WaitsOnTraffic(None, cache.executor, size, wait, run_mixed=predict_mixed)

        async def service(x):
            return (await (await cache.get("c0", version)).predict(x))[0]

        async def service_old_wait(x):
            await cache.get("c0", version)
            return (await old_group.submit(x, clf))[0]

        async def direct(x):
            return clf.predict(x)[0]

        async def per_classifier(x):
            return await old.submit(x)

        fns = {"service": service, "service-old-wait": service_old_wait, "direct": direct,
               "per-classifier": per_classifier}
        for bs, repeats in ((1, args.repeats), (32, max(3, args.repeats // 8))):
            x = _x(args.versions[0], bs)
            answers = {k: await fn(x) for k, fn in fns.items()}  # warm-up, and the answers must agree
            out[f"bs{bs}_max_dp"] = max(float(np.abs(a - answers["direct"]).max()) for a in answers.values())
            cpu = {k: [] for k in fns}
            wall = {k: [] for k in fns}
            for _ in range(repeats):
                for name, fn in fns.items():
                    t, w = time.process_time(), time.perf_counter()
                    await fn(x)
                    cpu[name].append(time.process_time() - t)
                    wall[name].append(time.perf_counter() - w)
            out[f"bs{bs}"] = {k: {"cpu": statistics.median(cpu[k]), "wall": statistics.median(wall[k])} for k in fns}
        old.close()
        old_group.close()

    asyncio.run(main())
    cache.close()
    return out


def batch_group_name(clf) -> str:
    from rmt_core.serving import batch_group

    return "own batcher (no group)" if batch_group(clf) is None else "base group"


def sub_traffic(args) -> dict:
    """16 clients for ``seconds``: each request to a uniformly random classifier of the first ``count`` (or
    always the first), through the service's cache and micro-batcher."""
    from app.classifier_cache import ClassifierCache, served_loader

    versions = [Path(v) for v in args.versions[:args.count]]
    loader = served_loader(Path(args.bases), "cpu", mode=args.mode)
    cache = ClassifierCache(capacity=args.capacity, max_bytes=args.cache_bytes, providers="cpu", loader=loader)
    x1 = _x(args.versions[0], 1)
    rng = random.Random(0)
    latencies: list[float] = []
    t0 = time.perf_counter()
    loads_before = 0

    async def warm():
        for i, v in enumerate(versions[:args.warm]):
            entry = await cache.get(f"c{i}", v)
            await entry.predict(x1)

    async def client(deadline: float):
        while time.perf_counter() < deadline:
            i = rng.randrange(len(versions))
            t = time.perf_counter()
            entry = await cache.get(f"c{i}", versions[i])
            await entry.predict(x1)
            latencies.append(time.perf_counter() - t)

    async def main():
        nonlocal t0, loads_before
        await warm()
        loads_before = len(cache)
        t0 = time.perf_counter()
        await asyncio.gather(*(client(t0 + args.seconds) for _ in range(args.clients)))

    asyncio.run(main())
    elapsed = time.perf_counter() - t0
    resident_mb = rss_mb()  # before close: closing evicts every classifier and returns their memory
    cache.close()
    lat = sorted(latencies)
    return {"requests": len(lat), "throughput": len(lat) / elapsed, "p50": lat[len(lat) // 2],
            "p99": lat[min(len(lat) - 1, int(len(lat) * 0.99))], "rss_mb": resident_mb, "cached": loads_before}


def run_sub(part: str, world: dict, **kw) -> dict:
    cmd = [sys.executable, __file__, "--sub", part, "--bases", world["bases"], "--versions", *world["versions"]]
    for k, v in kw.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    env = dict(os.environ, PYTHONPATH=str(ROOT), MALLOC_ARENA_MAX="2")
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if done.returncode:
        raise RuntimeError(f"{part} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sub")
    p.add_argument("--bases")
    p.add_argument("--versions", nargs="*")
    p.add_argument("--mode", default="jit")
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--repeats", type=int, default=24)
    p.add_argument("--seconds", type=float, default=30)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--capacity", type=int, default=1000)
    p.add_argument("--cache-bytes", type=int, default=4 << 30)
    p.add_argument("--warm", type=int, default=0)
    p.add_argument("--classifiers", type=int, default=200)
    p.add_argument("--drop", type=float, default=0.05)
    p.add_argument("--parts", default="memory,latency,traffic", help="any of memory,latency,traffic,int8,default")
    p.add_argument("--builtin", action="store_true", help="--parts default: the builtin small backbone too.")
    p.add_argument("--world", help="Keep the generated base and versions here (reused by a later run).")
    args = p.parse_args()
    if args.sub:
        print(json.dumps({"memory": sub_memory, "latency": sub_latency, "traffic": sub_traffic, "int8": sub_int8,
                          "eager": sub_eager, "default": sub_default}[args.sub](args)))
        return

    started = time.perf_counter()
    parts = set(args.parts.split(","))
    rows: list[tuple] = []
    with tempfile.TemporaryDirectory(prefix="rmt-multitenant-") as tmp:
        t = time.perf_counter()
        world = make_world(Path(args.world or tmp), args.classifiers, args.drop)
        print(f"world: {args.classifiers} classifiers in {time.perf_counter() - t:.0f} s", flush=True)
        n = args.classifiers
        if "memory" in parts:
            jit = run_sub("memory", world, mode="jit", count=n)
            baked = run_sub("memory", world, mode="baked", count=3)
            inc_jit = np.diff(jit["points"][1:])  # from the second on: the first builds the plan's sessions
            inc_baked = np.diff(baked["points"])
            session_mb = 344.0  # one whole ViT-B-32 ORT session (bench/RESULTS-layout.md)
            per_jit, per_baked = float(np.median(inc_jit)), float(np.median(inc_baked))
            total_jit = jit["points"][-1]
            rows += [
                (f"RSS per additional resident classifier, jit / one whole session ({n} loaded; baked: median of 2)",
                 f"jit {per_jit:.1f} MB (own state {jit['own_bytes'][1] / 1e6:.1f} MB) vs baked {per_baked:.0f} MB; "
                 f"mask file {world['mask_file_kb']:.0f} kB", f"**{per_jit / session_mb:.4f}**", "<= 0.05"),
                (f"{n} classifiers resident, process RSS (measured); 1,000 extrapolated from the median increment",
                 f"{total_jit / 1024:.2f} GB; 1,000: {(total_jit + per_jit * (1000 - n)) / 1024:.2f} GB",
                 f"**{total_jit / 1024:.2f} GB**", "<= 8 GB for 1,000"),
                ("warm load (plan built, mask file read, positions decoded), jit vs baked (median wall)",
                 f"{1000 * statistics.median(jit['load_s'][1:]):.0f} ms vs "
                 f"{1000 * statistics.median(baked['load_s'][1:]):.0f} ms (first on the base: jit "
                 f"{jit['load_s'][0]:.2f} s, baked {baked['load_s'][0]:.2f} s)",
                 f"**{statistics.median(jit['load_s'][1:]) / statistics.median(baked['load_s'][1:]):.3f}**",
                 "milliseconds"),
            ]
            print(rows[-3:], flush=True)
        if "latency" in parts:
            lat = run_sub("latency", world, repeats=args.repeats)
            for bs in ("bs1", "bs32"):
                r = lat[bs]
                rows.append((f"single-classifier latency {bs}, jit / baked (CPU; wall); jit right after another "
                             f"classifier ran", f"{1000 * r['jit']['cpu']:.1f} vs {1000 * r['baked']['cpu']:.1f} ms CPU; "
                             f"wall {1000 * r['jit']['wall']:.1f} vs {1000 * r['baked']['wall']:.1f} ms; after a "
                             f"switch {1000 * r['jit-switch']['wall']:.1f} ms wall",
                             f"**{r['jit']['cpu'] / r['baked']['cpu']:.3f}**", "<= 1.05 (default mode: baked)"))
            rows.append(("parity jit vs baked fp32, max abs dp", f"{lat['parity']:.1e}", f"**{lat['parity']:.1e}**",
                         "<= 1e-4"))
            print(rows[-3:], flush=True)
        if "traffic" in parts:
            single = run_sub("traffic", world, mode="baked", count=1, seconds=args.seconds, warm=1)
            mixed = run_sub("traffic", world, mode="jit", count=n, seconds=args.seconds, warm=n)
            today = run_sub("traffic", world, mode="baked", count=n, seconds=args.seconds, warm=0,
                            cache_bytes=4 << 30)
            rows += [
                (f"mixed traffic, {n} classifiers (jit, all resident), 16 clients / 16 clients on one classifier "
                 f"(baked): throughput", f"{mixed['throughput']:.1f} vs {single['throughput']:.1f} req/s "
                 f"({mixed['requests']} / {single['requests']} requests)",
                 f"**{mixed['throughput'] / single['throughput']:.2f}**", ">= 0.5"),
                ("mixed traffic p99 / single-classifier p99", f"{1000 * mixed['p99']:.0f} vs {1000 * single['p99']:.0f} ms "
                 f"(p50 {1000 * mixed['p50']:.0f} vs {1000 * single['p50']:.0f} ms); RSS {mixed['rss_mb'] / 1024:.2f} GB",
                 f"**{mixed['p99'] / single['p99']:.2f}**", "<= 3"),
                (f"today: the same mixed traffic on baked classifiers, cache bounded at 4 GB (~32 of {n} resident): "
                 f"throughput / single; p99 / single", f"{today['throughput']:.1f} req/s, p99 {1000 * today['p99']:.0f} ms "
                 f"({today['requests']} requests); RSS {today['rss_mb'] / 1024:.2f} GB",
                 f"**{today['throughput'] / single['throughput']:.2f}; {today['p99'] / single['p99']:.1f}**", "-"),
            ]
            print(rows[-3:], flush=True)
        if "default" in parts:
            worlds = [(ARCH + " random weights", world, 1)]
            if args.builtin:
                from rmt_core.backbones import resolve_pretrained

                try:
                    resolve_pretrained(BUILTIN_ARCH, "builtin")
                    worlds.append((f"{BUILTIN_ARCH} (builtin)", make_world(Path(args.world or tmp) / "builtin", 1,
                                                                          args.drop, BUILTIN_ARCH, "builtin"), 10))
                except FileNotFoundError as exc:
                    print(f"builtin backbone skipped: {exc}", flush=True)
            for label, w, more in worlds:  # a ~1 ms model: 10x the repeats, for the same noise
                d = run_sub("default", w, repeats=args.repeats * more)
                for bs in ("bs1", "bs32"):
                    r = d[bs]
                    s_, b_, o_, w_ = r["service"], r["direct"], r["per-classifier"], r["service-old-wait"]
                    rows.append((f"{label}: default path ({d['mode']} {d['precision']}, {d['group']}, wait "
                                 f"{d['wait_ms']:g} ms) / baked fp32 called directly, {bs}, one client (CPU; wall)",
                                 f"{1000 * s_['cpu']:.2f} vs {1000 * b_['cpu']:.2f} ms CPU; wall {1000 * s_['wall']:.2f} vs "
                                 f"{1000 * b_['wall']:.2f} ms. Before (wait rule before 2026-12-03): {1000 * w_['cpu']:.2f} "
                                 f"ms CPU, {1000 * w_['wall']:.2f} ms wall (CPU {w_['cpu'] / b_['cpu']:.3f}, wall "
                                 f"{w_['wall'] / b_['wall']:.3f}); pre-#18 per-classifier batcher {1000 * o_['cpu']:.2f} "
                                 f"ms CPU, {1000 * o_['wall']:.2f} ms wall ({o_['cpu'] / b_['cpu']:.3f}; "
                                 f"{o_['wall'] / b_['wall']:.3f}); max abs dp {d[bs + '_max_dp']:.0e}",
                                 f"**CPU {s_['cpu'] / b_['cpu']:.3f}; wall {s_['wall'] / b_['wall']:.3f}**", "<= 1.05"))
            print(rows[-2 * len(worlds):], flush=True)
        if "int8" in parts:
            q = run_sub("int8", world, count=min(n, 6), repeats=args.repeats)
            eager = run_sub("eager", world, repeats=args.repeats)
            session_mb = 344.0
            inc = float(np.median(np.diff(q["points"][1:]))) if len(q["points"]) > 2 else float("nan")
            for bs in ("bs1", "bs32"):
                r, e = q[bs], eager[bs]
                rows.append((f"latency {bs}: int8 vs baked fp32 vs eager open_clip (CPU; wall)",
                             f"int8 {1000 * r['int8']['cpu']:.1f} / fp32 {1000 * r['baked']['cpu']:.1f} / eager "
                             f"{1000 * e['cpu']:.1f} ms CPU; wall {1000 * r['int8']['wall']:.1f} / "
                             f"{1000 * r['baked']['wall']:.1f} / {1000 * e['wall']:.1f} ms",
                             f"**int8 {e['wall'] / r['int8']['wall']:.2f}x eager, {r['baked']['wall'] / r['int8']['wall']:.2f}x "
                             f"fp32 (wall); CPU {e['cpu'] / r['int8']['cpu']:.2f}x, {r['baked']['cpu'] / r['int8']['cpu']:.2f}x**",
                             ">= 1.5x eager at bs1" if bs == "bs1" else "-"))
            rows += [
                (f"RSS per additional int8 classifier (median increment over {len(q['points']) - 2}) / one whole "
                 f"session (344 MB)", f"{inc:.1f} MB (own weights {q['own_bytes'][-1] / 1e6:.1f} MB: int8 attention "
                 f"+ fp32 patch conv); first int8 classifier with the base's int8 shared sessions "
                 f"{q['points'][0] - q['start']:.0f} MB", f"**{inc / session_mb:.3f}**", "-"),
                ("load, int8 (quantized at load) vs baked fp32 (median wall)",
                 f"{statistics.median(q['load_s'][1:] or q['load_s']):.2f} s vs {q['fp32_load_s']:.2f} s (first int8 on "
                 f"the base: {q['load_s'][0]:.2f} s)", f"**{statistics.median(q['load_s'][1:] or q['load_s']) / q['fp32_load_s']:.1f}**", "-"),
                ("int8 vs fp32 on random images (random weights: no accuracy to judge)",
                 f"argmax agreement {q['agreement']:.3f} on {q['n_agree']}, max abs dp {q['max_dp']:.1e}",
                 f"**{q['agreement']:.3f}**", ">= 0.99 (the guard, at build)"),
            ]
            print(rows[-5:], flush=True)
    elapsed = time.perf_counter() - started
    cmd = "python bench/bench_multitenant.py " + " ".join(sys.argv[1:])
    table = "\n".join(f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows)
    key = f"drop={args.drop} n={args.classifiers} parts={args.parts}"
    section = (f"<!-- run {key} -->\n_Measured {dt.datetime.utcnow():%Y-%m-%d %H:%M} UTC on "
               f"{os.uname().machine} {cpu_model()}, {os.cpu_count()} CPU cores (shared with other jobs), `{cmd}` in {elapsed:.0f} s; "
               f"masks drop {100 * args.drop:.2f}% of {world['masked_weights']:,} masked weights._\n\n"
               "| what | measured | ratio / value | goal |\n|---|---|---|---|\n" + table + f"\n<!-- /run {key} -->\n")
    text = RESULTS.read_text() if RESULTS.exists() else "# Many classifiers on one base\n\n"
    marker, end = f"<!-- run {key} -->", f"<!-- /run {key} -->"
    if marker in text:
        text = text[:text.index(marker)] + section + text[text.index(end) + len(end) + 1:]
    else:
        text = text.rstrip() + "\n\n" + section
    RESULTS.write_text(text)
    print(section)


if __name__ == "__main__":
    main()
