"""Micro-batching and the LRU: concurrent requests share ORT calls; the cache stays bounded."""
from __future__ import annotations

import asyncio
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
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
    patient = MicroBatcher(model.run, ThreadPoolExecutor(1), max_batch=8, max_wait_s=3600)

    async def lone():  # waiting for company that is not coming would take the hour: wait_for would give up
        return await asyncio.wait_for(patient.submit(np.ones((1, 3, 2, 2), np.float32)), timeout=120)

    assert asyncio.run(lone()).shape == (1, 2) and model.calls == [1]

    batcher = MicroBatcher(model.run, ThreadPoolExecutor(1), max_batch=8, max_wait_s=0.5)

    async def stream():  # requests 50 ms apart: each waits, so the later ones join one batch
        async def later(i):
            await asyncio.sleep(0.05 * i)
            return await batcher.submit(np.full((1, 3, 2, 2), i, np.float32))
        return await asyncio.gather(*(later(i) for i in range(4)))

    model.calls.clear()
    outputs = asyncio.run(stream())
    assert [float(y[0, 0]) for y in outputs] == [0.0, 2.0, 4.0, 6.0]
    assert len(model.calls) < 4


def test_one_clients_stream_stops_waiting_for_company_until_requests_overlap(monkeypatch):
    """A client that sends each request after the last was answered has nobody to wait for: after one wait that
    gathered nobody the batcher stops waiting, and waits again once requests arrive while others are in flight."""
    model = _SlowModel(delay=0.0)
    batcher = MicroBatcher(model.run, ThreadPoolExecutor(1), max_batch=8, max_wait_s=0.01)
    waits = []
    real_sleep = asyncio.sleep

    async def counted_sleep(seconds, *a, **kw):
        if seconds == batcher.max_wait_s:
            waits.append(seconds)
        return await real_sleep(seconds, *a, **kw)

    monkeypatch.setattr(asyncio, "sleep", counted_sleep)

    async def main():
        stream = [await batcher.submit(np.full((1, 3, 2, 2), i, np.float32)) for i in range(6)]
        waited_in_stream = len(waits)
        burst = await asyncio.gather(*(batcher.submit(np.full((1, 3, 2, 2), i, np.float32)) for i in range(4)))
        return stream, waited_in_stream, burst

    stream, waited_in_stream, burst = asyncio.run(main())
    assert [float(y[0, 0]) for y in stream] == [2.0 * i for i in range(6)]
    assert [float(y[0, 0]) for y in burst] == [0.0, 2.0, 4.0, 6.0]
    assert waited_in_stream == 1  # the second request waited (it came soon after the first), nobody joined
    assert model.calls[:6] == [1] * 6 and model.calls[6:] == [4]
    assert len(waits) == 2  # the overlapping burst waits for company again


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
            probs, outlier = await entry.predict(x[None])  # the classifier's predict, through its group's batcher
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


@pytest.fixture(scope="module")
def many_on_one_base(tmp_path_factory):
    """Five mask-tuned classifiers and a zero-shot one on one toy base, split into shared and own segments."""
    from tests.core.test_layout import _random_bits, _version
    from tests.core.toys import tiny
    from rmt_core.base import ensure_base

    tmp = tmp_path_factory.mktemp("many")
    backbone = tiny()
    base = ensure_base(backbone, tmp / "bases")
    dirs = {f"m{i}": _version(tmp, f"m{i}", backbone, base, _random_bits(backbone, 10 + i, drop=0.3))
            for i in range(5)}
    dirs["zero"] = _version(tmp, "zero", backbone, base, None)
    x = np.random.default_rng(0).standard_normal((6, 3, *backbone.image_size)).astype(np.float32)
    return {"bases": tmp / "bases", "dirs": dirs, "x": x}


@pytest.mark.parametrize("mode", ["baked", "jit"])
def test_mixed_traffic_under_eviction_never_answers_with_another_classifiers_model(many_on_one_base, monkeypatch,
                                                                                   mode):
    """Capacity 3 for six classifiers: requests to random classifiers evict each other while their batches mix.
    Each answer must be what its own classifier gives alone."""
    import random

    bases, dirs, x = many_on_one_base["bases"], many_on_one_base["dirs"], many_on_one_base["x"]
    loader = served_loader(bases, "cpu", shared_min_bytes=0, mode=mode)
    alone = {}
    for cid, d in dirs.items():
        clf = loader(cid, d)
        alone[cid] = [clf.predict(x[i:i + 1])[0] for i in range(len(x))]
        del clf
    for i in range(len(x)):  # the classifiers answer differently: a wrong one cannot pass for the right one
        rows = [alone[cid][i] for cid in dirs]
        assert min(np.abs(p - q).max() for j, p in enumerate(rows) for q in rows[j + 1:]) > 1e-4
    import rmt_core.serving as serving

    groups = []
    run_group = serving._run_group
    monkeypatch.setattr(serving, "_run_group", lambda clfs, batches: groups.append(len(clfs)) or run_group(clfs, batches))
    cache = ClassifierCache(capacity=3, providers="cpu", loader=loader, batch_max_wait_ms=5)
    random.seed(3)

    async def request(cid: str, i: int):
        await asyncio.sleep(random.random() * 0.05)
        entry = await cache.get(cid, dirs[cid])
        probs, outlier = await entry.predict(x[i:i + 1])
        return cid, i, probs

    async def main():
        answers = []
        for _ in range(6):
            answers += await asyncio.gather(*(request(random.choice(list(dirs)), random.randrange(len(x)))
                                              for _ in range(16)))
        return answers

    try:
        answers = asyncio.run(main())
    finally:
        cache.close()
    for cid, i, probs in answers:
        np.testing.assert_allclose(probs, alone[cid][i], rtol=1e-5, atol=1e-6, err_msg=f"{cid} image {i}")
    assert len(answers) == 96 and groups and max(groups) > 1, "no batch mixed classifiers"


def test_the_byte_bound_holds_for_loads_in_flight_too():
    """Classifiers of 100 bytes, a bound of 250: never more than two held, however many load at once."""
    class Sized:
        resident_bytes = 100

        def run(self, batch):
            return np.zeros((len(batch), 2), np.float32)

    peaks = []
    cache = None

    def loader(cid, version_dir):
        threading.Event().wait(0.02)
        peaks.append(cache.nbytes + sum(cache._reserved.values()))
        return Sized()

    cache = ClassifierCache(capacity=100, max_bytes=250, loader=loader)

    async def main():
        for i in range(3):
            await cache.get(f"c{i}", Path(f"/v/{i}"))
        assert cache.nbytes <= 250 and len(cache) == 2
        await asyncio.gather(*(cache.get(f"d{i}", Path(f"/w/{i}")) for i in range(5)))
        assert cache.nbytes <= 250 and len(cache) == 2

    try:
        asyncio.run(main())
    finally:
        cache.close()
    assert max(peaks) <= 250, peaks
