"""Where one classify request spends its time beyond the model run, server side, in one process.

    .venv/bin/python bench/bench_http_phases.py [--work /tmp/rmt-bench-http] [--repeats 60]

Uses the store bench/bench_http.py left in ``--work`` (run it first). The app (create_app) is called as an
ASGI application in this process, without a socket or uvicorn's HTTP parser, and each step of the classify
route is timed on its own on the same request, interleaved, median wall and CPU of ``--repeats``:
the records lookup, multipart parsing, JPEG decoding, preprocessing, the micro-batched model run (cache get +
the batch group's batcher) against the same loaded classifier called directly, the response (top-k,
pydantic model, JSON). The reference of bench_http's ratios (the baked model.onnx in raw ONNX Runtime, bs1)
is timed beside; every other round runs the steps in reverse order (a step right after a model run finds the
CPU caches cold). Prints a table (markdown) to paste into a RESULTS file.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from starlette.requests import Request

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_http import BOUNDARY, jpeg_224, multipart  # noqa: E402


def scope_for(path: str, body: bytes, method: str = "POST") -> dict:
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
            "path": path, "raw_path": path.encode(), "query_string": b"top_k=1", "root_path": "",
            "headers": [(b"host", b"bench"), (b"content-type", f"multipart/form-data; boundary={BOUNDARY}".encode()),
                        (b"content-length", str(len(body)).encode())],
            "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80), "state": {}}


def receiver(body: bytes):
    sent = False

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # the client never disconnects

    return receive


async def call_app(app, path: str, body: bytes, method: str = "POST") -> bytes:
    out = []

    async def send(message):
        out.append(message)

    await app(scope_for(path, body, method), receiver(body), send)
    if out[0]["status"] != 200:
        raise RuntimeError(f"HTTP {out[0]['status']}: {out[1].get('body', b'')[:300]!r}")
    return b"".join(m.get("body", b"") for m in out[1:])


def preprocess_before(img, cfg) -> np.ndarray:
    """rmt_core.preprocess.preprocess_image before 2026-12-03 (float image, normalized copy, transposed copy)."""
    from rmt_core.preprocess import _INTERPOLATION, _resize_shortest

    resample = _INTERPOLATION[cfg.interpolation]
    height, width = cfg.size
    img = _resize_shortest(img, height, resample)
    w, h = img.size
    top, left = int(round((h - height) / 2.0)), int(round((w - width) / 2.0))
    img = img.crop((left, top, left + width, top + height))
    arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    arr = (arr - np.asarray(cfg.mean, np.float32)) / np.asarray(cfg.std, np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--work", type=Path, default=Path("/tmp/rmt-bench-http"))
    p.add_argument("--repeats", type=int, default=60)
    p.add_argument("--batches", type=lambda v: [int(b) for b in v.split(",") if b], default=[8, 16, 32],
                   help="batch sizes whose per-image cost is measured (served chain vs raw baked model)")
    p.add_argument("--batch-repeats", type=int, default=3)
    args = p.parse_args()

    from pydantic import TypeAdapter

    from app.access import served_version
    from app.classifier_cache import MicroBatcher
    from rmt_core.serving import predict_mixed
    from app.main import create_app
    from app.routers.classify import _prepare
    from app.schemas import Classification, ClassifyResponse
    from app.uploads import PixelBudget, decode_all
    from rmt_core.runtime import OnnxClassifier
    from rmt_service.settings import Settings
    from rmt_service.store import Store

    settings = Settings(_env_file=None, data_dir=args.work / "data", classifier_cache_size=2)
    app = create_app(settings)
    store: Store = app.state.store
    cache = app.state.cache
    page = store.list_classifiers("default")[0]
    if not page:
        raise SystemExit(f"no classifier in {args.work / 'data'}: run bench/bench_http.py --work {args.work} first")
    classifier_id = page[-1].classifier.classifier_id  # the oldest: the one bench_http measures
    path = f"/v1/classifiers/{classifier_id}/classify"
    image = jpeg_224()
    body = multipart(image)
    raw = OnnxClassifier(args.work / "vit-b-32", providers="cpu")
    adapter = TypeAdapter(ClassifyResponse)
    batch_costs: dict[int, dict] = {}

    async def run() -> dict:
        record, version = served_version(store, classifier_id, "default")
        entry = await cache.get(classifier_id, store.version_dir(version), version=version)
        clf = entry.classifier
        blobs = [(image, "file (x.jpg)")]
        x = _prepare(blobs, clf, settings)
        probs, outlier = clf.predict(x)

        async def whole():
            await call_app(app, path, body)

        async def read_classifier():  # GET /v1/classifiers/{id}: the store and tenant dependencies, no model
            await call_app(app, path.rsplit("/", 1)[0], b"", "GET")

        async def records():
            served_version(store, classifier_id, "default")

        async def records_old():
            store._view_select = None  # the select built again, as on every call before 2026-12-03
            served_version(store, classifier_id, "default")

        async def form():
            request = Request(scope_for(path, body), receiver(body))
            parsed = await request.form(max_files=10, max_fields=74, max_part_size=1024 * 1024)
            await parsed.getlist("file")[0].read(settings.max_image_bytes + 1)
            await parsed.close()

        async def decode():
            decode_all(blobs, settings, PixelBudget(settings.max_classify_pixels, "x"))

        img = decode_all(blobs, settings)[0]

        async def preprocess():
            np.stack([clf.preprocess(img)])

        async def preprocess_old():
            np.stack([preprocess_before(img, clf.preprocess_config)])

        if not np.array_equal(clf.preprocess(img), preprocess_before(img, clf.preprocess_config)):
            raise SystemExit("preprocessing changed its output")

        class WaitsOnTraffic(MicroBatcher):  # the wait rule before 2026-12-03
            _company = property(lambda self: True, lambda self, value: None)

        old_group = WaitsOnTraffic(None, cache.executor, cache.batch_max_size, cache.batch_max_wait_s,
                                   run_mixed=predict_mixed)

        async def batcher_old():
            await cache.get(classifier_id, store.version_dir(version), version=version)
            await old_group.submit(x, clf)

        async def batcher():
            await (await cache.get(classifier_id, store.version_dir(version), version=version)).predict(x)

        async def direct():
            clf.predict(x)

        async def reference():
            raw.run(x)

        async def respond():
            predictions = clf.top_k(probs, 1)
            results = [Classification(filename="x.jpg", predictions=predictions[0], unknown=False,
                                      outlier_score=None if outlier is None else round(float(outlier[0]), 4),
                                      label=predictions[0][0]["label"])]
            resp = ClassifyResponse(version_id=version.version_id, model=version.candidate or None,
                                    final=version.final, min_score=None, max_outlier=None, results=results,
                                    predictions=predictions[0], label=results[0].label, unknown=False)
            json.dumps(adapter.dump_python(resp, mode="json"), ensure_ascii=False, allow_nan=False,
                       separators=(",", ":")).encode()

        fns = {"whole request (ASGI, in process)": whole,
               "reference: raw ORT baked model.onnx bs1": reference,
               "model: served classifier's predict, direct": direct,
               "model: cache get + micro-batcher (thread hop)": batcher,
               "model: cache get + micro-batcher, wait rule before": batcher_old,
               "GET /v1/classifiers/{id} (ASGI; store + tenant dependencies, no model)": read_classifier,
               "records lookup (SQLite)": records, "records lookup, select built per call as before": records_old,
               "multipart parse + read part": form, "JPEG decode (224x224)": decode, "preprocess": preprocess,
               "preprocess as before": preprocess_old, "response: top-k, pydantic, JSON": respond}
        for fn in fns.values():
            await fn()
        cpu = {k: [] for k in fns}
        wall = {k: [] for k in fns}
        for i in range(args.repeats):  # every other round in reverse order: a step right after a model run
            for name, fn in (reversed(fns.items()) if i % 2 else fns.items()):  # finds cold caches
                t, w = time.process_time(), time.perf_counter()
                await fn()
                cpu[name].append(time.process_time() - t)
                wall[name].append(time.perf_counter() - w)
        result = {k: (statistics.median(wall[k]), statistics.median(cpu[k])) for k in fns}
        for bs in args.batches:  # what a micro-batch of bs costs per image, served chain vs the raw baked model
            xb = np.repeat(x, bs, axis=0)
            clf.predict(xb)
            raw.run(xb)
            per = {"served": [], "raw": []}
            for _ in range(args.batch_repeats):
                for name, fn in (("served", clf.predict), ("raw", raw.run)):
                    w = time.perf_counter()
                    fn(xb)
                    per[name].append((time.perf_counter() - w) / bs)
            batch_costs[bs] = {k: statistics.median(v) for k, v in per.items()}
        return result

    out = asyncio.run(run())
    cache.close()
    ref = out["reference: raw ORT baked model.onnx bs1"][0]
    lines = ["| step | wall ms | CPU ms | wall / raw ORT bs1 |", "|---|---|---|---|"]
    for name, (w, c) in out.items():
        lines.append(f"| {name} | {1000 * w:.2f} | {1000 * c:.2f} | {w / ref:.3f} |")
    print(f"{os.cpu_count()} CPU cores, {args.repeats} repeats, interleaved; medians")
    print("\n".join(lines))
    if batch_costs:
        raw32 = batch_costs.get(32, {}).get("raw")
        print("\n| batch | served ms / image | raw ORT ms / image | served / raw | served / raw bs32 |\n|---|---|---|---|---|")
        for bs, c in batch_costs.items():
            print(f"| {bs} | {1000 * c['served']:.1f} | {1000 * c['raw']:.1f} | {c['served'] / c['raw']:.3f} | "
                  + (f"{c['served'] / raw32:.3f} |" if raw32 else "- |"))


if __name__ == "__main__":
    main()
