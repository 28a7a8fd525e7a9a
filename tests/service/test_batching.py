"""Micro-batching and the LRU: concurrent requests share ORT calls; the cache stays bounded."""
from __future__ import annotations

import asyncio
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from app.classifier_cache import ClassifierCache, MicroBatcher, served_loader
from rmt_service.store import Store


class _SlowModel:
    """Records batch sizes; the sleep stands in for an ORT call so requests pile up meanwhile."""

    def __init__(self, delay=0.05):
        self.calls: list[int] = []
        self.delay = delay
        self.lock = threading.Lock()

    def run(self, batch):
        with self.lock:
            self.calls.append(len(batch))
        threading.Event().wait(self.delay)
        return batch.reshape(len(batch), -1)[:, :2] * 2.0


def test_concurrent_requests_are_batched_and_answered_in_order():
    model = _SlowModel()
    batcher = MicroBatcher(model.run, ThreadPoolExecutor(1), max_batch=8, max_wait_s=0.002)

    async def main():
        inputs = [np.full((1, 3, 2, 2), i, np.float32) for i in range(16)]
        return inputs, await asyncio.gather(*(batcher.submit(x) for x in inputs))

    inputs, outputs = asyncio.run(main())
    for x, y in zip(inputs, outputs):
        assert y.shape == (1, 2) and np.all(y == x[0, 0, 0, 0] * 2)
    assert sum(model.calls) == 16 and max(model.calls) == 8 and len(model.calls) <= 4


def test_a_lone_request_does_not_wait_but_a_stream_of_requests_is_gathered():
    model = _SlowModel(delay=0.0)
    batcher = MicroBatcher(model.run, ThreadPoolExecutor(1), max_batch=8, max_wait_s=0.5)

    async def lone():
        start = asyncio.get_running_loop().time()
        await batcher.submit(np.ones((1, 3, 2, 2), np.float32))
        return asyncio.get_running_loop().time() - start

    assert asyncio.run(lone()) < 0.25  # no 0.5 s wait for company that is not coming

    async def stream():  # requests 50 ms apart: each waits, so the later ones join one batch
        async def later(i):
            await asyncio.sleep(0.05 * i)
            return await batcher.submit(np.full((1, 3, 2, 2), i, np.float32))
        return await asyncio.gather(*(later(i) for i in range(4)))

    model.calls.clear()
    outputs = asyncio.run(stream())
    assert [float(y[0, 0]) for y in outputs] == [0.0, 2.0, 4.0, 6.0]
    assert len(model.calls) < 4


def test_a_failing_batch_fails_its_requests_only():
    calls = []

    def run(batch):
        calls.append(len(batch))
        if len(calls) == 1:
            raise RuntimeError("ORT exploded")
        return np.zeros((len(batch), 2))

    batcher = MicroBatcher(run, ThreadPoolExecutor(1), max_batch=4, max_wait_s=0)

    async def main():
        first = await asyncio.gather(batcher.submit(np.zeros((1, 3, 2, 2))), return_exceptions=True)
        second = await batcher.submit(np.zeros((2, 3, 2, 2)))
        return first, second

    first, second = asyncio.run(main())
    assert isinstance(first[0], RuntimeError) and second.shape == (2, 2)


def test_lru_keeps_at_most_capacity_sessions(tuned, tmp_path):
    store = Store(tuned["settings"])
    source = store.model_dir(tuned["classifier_id"])
    bases_dir = store.bases_dir
    store.close()
    dirs = []
    for i in range(4):
        shutil.copytree(source, tmp_path / f"m{i}")
        dirs.append(tmp_path / f"m{i}")
    cache = ClassifierCache(capacity=2, providers="cpu", loader=served_loader(bases_dir, "cpu"))

    async def main():
        for i, d in enumerate(dirs):
            entry = await cache.get(f"c{i}", d)
            x = entry.classifier.preprocess(Image.new("RGB", (40, 40)))
            probs, outlier = await entry.batcher.submit(x[None])  # the classifier's predict
            assert probs.shape == (1, 2) and outlier.shape == (1,) and 0 <= outlier[0] <= 1
        assert len(cache) == 2 and "c3" in cache and "c2" in cache and "c0" not in cache
        await cache.get("c2", dirs[2])  # hit: c2 becomes most recent, c3 is next out
        await cache.get("c0", dirs[0])
        assert "c2" in cache and "c0" in cache and "c3" not in cache
        cache.evict("c0")
        assert "c0" not in cache

    asyncio.run(main())
    cache.close()


def test_only_the_serving_loader_changes_the_process_malloc_threshold(tmp_path, monkeypatch):
    """Returning freed blocks >= 1 MiB to the OS is process-wide and makes every large malloc an mmap: the API's
    loader sets it (a load otherwise leaves ~0.5x its size resident), a registry made elsewhere (the worker's
    parity check, beside torch training) does not."""
    import rmt_core.runtime as runtime

    calls = []
    monkeypatch.setattr(runtime, "return_freed_memory", lambda: calls.append(1) or True)
    runtime.BaseRegistry(tmp_path, "cpu")
    assert calls == []
    loader = served_loader(tmp_path, "cpu")
    assert calls == [1] and loader.registry.bases_dir == tmp_path
