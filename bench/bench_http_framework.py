"""Per-request server CPU of the classify route with the model taken out, in process (no socket), A/B across trees.

    .venv/bin/python bench/bench_http_framework.py --work /tmp/rmt-bench-http [--trees A B] [--rounds 6]
    .venv/bin/python bench/bench_http_framework.py --work ... --profile classify   # cProfile, this tree

Uses the store bench/bench_http.py left in ``--work`` (run it, or its build_model + populate, first). The app
(create_app) is called as an ASGI application; the micro-batcher's model run is replaced by a stub that
returns the real model's answer for that image (computed once), so what is timed is everything a request costs
the server besides ONNX Runtime: framework routing, dependencies, thread hops, validation, the route's steps
(records lookup, multipart, JPEG decode, preprocess, response), middlewares, metrics. CPU is process time (all
threads: the threadpool's work counts), per request:

  - classify, one at a time;
  - classify, 16 concurrent (asyncio.gather: what 16 clients make the event loop and the threadpool do);
  - GET /v1/classifiers/{id} (framework + records lookup).

With ``--trees`` each tree (a checkout of this repository) is measured in its own subprocess, alternating
A B A B ... for ``--rounds``, and the medians of the per-round means are printed side by side: two code
versions compared in one run.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]


def measure(work: Path, repeats: int, profile: str | None, only: str | None = None) -> dict:
    sys.path.insert(0, str(HERE))
    from bench.bench_http import jpeg_224, multipart
    from bench.bench_http_phases import call_app

    import app.classifier_cache as cc
    from app.main import create_app
    from rmt_service.settings import Settings

    real = cc.predict_mixed
    memo: dict = {}

    def stub(items):  # the model's answer for this image, computed once (all requests send the same image)
        key = id(items[0][0])  # (owner, batch): the classifier
        if key not in memo:
            memo[key] = real(items[:1])[0]
        return [memo[key] for _ in items]

    cc.predict_mixed = stub
    settings = Settings(_env_file=None, data_dir=work / "data", classifier_cache_size=2)
    app = create_app(settings)
    store = app.state.store
    page = store.list_classifiers("default")[0]
    classifier_id = page[-1].classifier.classifier_id
    path = f"/v1/classifiers/{classifier_id}/classify"
    body = multipart(jpeg_224())

    async def classify():
        await call_app(app, path, body)

    async def classify16():
        await asyncio.gather(*(call_app(app, path, body) for _ in range(16)))

    async def get():
        await call_app(app, path.rsplit("/", 1)[0], b"", "GET")

    ops = {"classify, 1 at a time": (classify, 1), "classify, 16 concurrent": (classify16, 16),
           "GET /v1/classifiers/{id}": (get, 1)}
    if only:
        ops = {k: v for k, v in ops.items() if only in k}

    async def run() -> dict:
        for fn, _ in ops.values():
            for _ in range(5):
                await fn()
        if profile:
            import cProfile
            import pstats

            fn, n = ops[{"classify": "classify, 1 at a time", "classify16": "classify, 16 concurrent",
                         "get": "GET /v1/classifiers/{id}"}[profile]]
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(repeats):
                await fn()
            prof.disable()
            stats = pstats.Stats(prof)
            stats.sort_stats("cumulative").print_stats(60)
            stats.sort_stats("tottime").print_stats(40)
            return {}
        out = {}
        for name, (fn, n) in ops.items():
            t, w = time.process_time(), time.perf_counter()
            for _ in range(repeats):
                await fn()
            out[name] = ((time.process_time() - t) / repeats / n, (time.perf_counter() - w) / repeats / n)
        return out

    try:
        return asyncio.run(run())
    finally:
        app.state.cache.close()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--work", type=Path, default=Path("/tmp/rmt-bench-http"))
    p.add_argument("--repeats", type=int, default=200, help="requests per op per round")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--trees", nargs="+", type=Path, help="checkouts to compare (default: this one)")
    p.add_argument("--profile", choices=["classify", "classify16", "get"])
    p.add_argument("--only", help="measure only the ops whose name contains this (e.g. to run one under py-spy)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child or args.profile:
        print(json.dumps(measure(args.work, args.repeats, args.profile, args.only)))
        return
    trees = [t.resolve() for t in (args.trees or [HERE])]
    runs: dict[Path, list[dict]] = {t: [] for t in trees}
    for r in range(args.rounds):
        for tree in (trees if r % 2 == 0 else trees[::-1]):
            env = {**os.environ, "PYTHONPATH": str(tree)}
            out = subprocess.run([sys.executable, str(tree / "bench" / "bench_http_framework.py"), "--child",
                                  "--work", str(args.work), "--repeats", str(args.repeats)],
                                 cwd=tree, env=env, capture_output=True, text=True, check=True)
            runs[tree].append(json.loads(out.stdout.strip().splitlines()[-1]))
    names = list(runs[trees[0]][0])
    print(f"{os.cpu_count()} CPU cores; {args.rounds} rounds x {args.repeats} requests per op, trees alternating; "
          "medians of the per-round means, ms per request, CPU (all threads) / wall")
    print("| op | " + " | ".join(str(t) for t in trees) + " |")
    print("|---|" + "---|" * len(trees))
    for name in names:
        cells = []
        for t in trees:
            cpu = statistics.median(1000 * run[name][0] for run in runs[t])
            wall = statistics.median(1000 * run[name][1] for run in runs[t])
            spread = [1000 * run[name][0] for run in runs[t]]
            cells.append(f"{cpu:.3f} / {wall:.3f} (CPU {min(spread):.3f}-{max(spread):.3f})")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
