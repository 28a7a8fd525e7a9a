"""The serving cache's concurrency bugs, each reproduced (they failed on the cache before the fix).

Fast unit tests over fake classifiers: the cache takes its loader as a function, so no ONNX file is needed.
"""
from __future__ import annotations

import asyncio
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from app.classifier_cache import ClassifierCache, MicroBatcher


class _FakeClassifier:
    providers = ["fake"]

    def __init__(self, classifier_id: str, version_dir: Path | None = None):
        self.classifier_id = classifier_id
        self.version_dir = version_dir

    def run(self, batch: np.ndarray) -> np.ndarray:
        return np.full((len(batch), 2), 0.5, np.float32)


class _Loader:
    """Counts loads, how many of one id run at the same time, and can fail or stall on demand."""

    def __init__(self, delay: float = 0.0, jitter: float = 0.0, fail_first: int = 0):
        self.delay, self.jitter, self.fail_left = delay, jitter, fail_first
        self.lock = threading.Lock()
        self.loads: list[str] = []
        self.in_flight: dict[str, int] = {}
        self.max_in_flight: dict[str, int] = {}
        self.made: list[_FakeClassifier] = []

    def __call__(self, classifier_id: str, version_dir: Path) -> _FakeClassifier:
        with self.lock:
            self.loads.append(classifier_id)
            self.in_flight[classifier_id] = self.in_flight.get(classifier_id, 0) + 1
            self.max_in_flight[classifier_id] = max(self.max_in_flight.get(classifier_id, 0),
                                                    self.in_flight[classifier_id])
        try:
            time.sleep(self.delay + random.random() * self.jitter)
            with self.lock:
                if self.fail_left > 0:
                    self.fail_left -= 1
                    raise OSError("model file unreadable")
            classifier = _FakeClassifier(classifier_id, version_dir)
            with self.lock:
                self.made.append(classifier)
            return classifier
        finally:
            with self.lock:
                self.in_flight[classifier_id] -= 1


def _run(coro, debug: bool = False, timeout: float = 20.0):
    """asyncio.run in a daemon thread, so a regression (a request waiting forever) fails instead of hanging.
    debug=True: a loop-owned object touched from another thread raises RuntimeError."""
    box: dict = {}

    def target():
        try:
            box["value"] = asyncio.run(coro, debug=debug)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"the event loop was still running after {timeout}s (a request hangs)"
    if "error" in box:
        raise box["error"]
    return box.get("value")


@pytest.fixture
def new_cache():
    """ClassifierCache(capacity, loader), closed when the test ends (also when it fails)."""
    made: list[ClassifierCache] = []

    def make(loader: _Loader, capacity: int = 2) -> ClassifierCache:
        made.append(ClassifierCache(capacity=capacity, loader=loader))
        return made[-1]

    yield make
    for cache in made:
        cache.close()


def test_evict_from_a_worker_thread_is_done_on_the_event_loop(tmp_path, new_cache):
    """DELETE /v1/classifiers/{id} is a sync route: its evict runs on a threadpool thread. The old evict
    mutated the LRU there and called asyncio.Queue.put_nowait off the loop (RuntimeError in debug mode,
    a lost wake-up otherwise)."""
    cache = new_cache(_Loader(), capacity=4)
    errors: list[BaseException] = []

    async def main():
        entry = await cache.get("c1", tmp_path)
        await entry.predict(np.zeros((1, 3, 2, 2), np.float32))  # its batcher task is now waiting
        loop_thread = threading.get_ident()
        mutated_on: list[int] = []
        original = cache._entries.pop

        def recording_pop(*args):
            mutated_on.append(threading.get_ident())
            return original(*args)

        cache._entries.pop = recording_pop  # type: ignore[method-assign]

        def from_thread():
            try:
                cache.evict("c1")
            except BaseException as exc:  # noqa: BLE001 - the test reports it
                errors.append(exc)

        await asyncio.get_running_loop().run_in_executor(None, from_thread)
        await asyncio.sleep(0.05)
        assert "c1" not in cache
        assert mutated_on and set(mutated_on) == {loop_thread}, "the LRU was mutated off the event loop"
        await asyncio.wait_for(entry.batcher._task, 2)  # the batcher saw its close and stopped

    _run(main(), debug=True)
    assert not errors, errors


def test_an_exception_in_on_batch_does_not_stop_the_batcher():
    """An exception outside the executor call (here the on_batch metrics callback) killed the serving task:
    this request and every later one for the classifier waited forever."""
    calls = []

    def on_batch(size: int) -> None:
        calls.append(size)
        if len(calls) == 1:
            raise ValueError("metrics backend broke")

    batcher = MicroBatcher(lambda b: np.ones((len(b), 2)), ThreadPoolExecutor(1), max_batch=4, max_wait_s=0,
                           on_batch=on_batch)

    async def main():
        first = await asyncio.wait_for(batcher.submit(np.zeros((1, 3, 2, 2))), 2)
        second = await asyncio.wait_for(batcher.submit(np.zeros((2, 3, 2, 2))), 2)
        return first, second

    first, second = _run(main())
    assert first.shape == (1, 2) and second.shape == (2, 2)
    assert calls == [1, 2]


def test_batches_that_cannot_be_concatenated_are_served_one_by_one():
    """np.concatenate of requests with different shapes raised outside the executor call: the task died."""
    seen = []

    def run(batch):
        seen.append(batch.shape)
        return np.full((len(batch), 2), batch.shape[-1], np.float32)

    batcher = MicroBatcher(run, ThreadPoolExecutor(1), max_batch=8, max_wait_s=0.05)

    async def main():
        await batcher.submit(np.zeros((1, 3, 2, 2), np.float32))  # traffic: the next ones wait for company
        a = batcher.submit(np.zeros((1, 3, 2, 2), np.float32))
        b = batcher.submit(np.zeros((1, 3, 4, 4), np.float32))
        both = await asyncio.wait_for(asyncio.gather(a, b, return_exceptions=True), 2)
        later = await asyncio.wait_for(batcher.submit(np.zeros((1, 3, 2, 2), np.float32)), 2)
        return both, later

    (a, b), later = _run(main())
    assert float(a[0, 0]) == 2.0 and float(b[0, 0]) == 4.0
    assert float(later[0, 0]) == 2.0


def test_a_dead_serving_task_is_restarted_by_the_next_request():
    batcher = MicroBatcher(lambda b: np.ones((len(b), 2)), ThreadPoolExecutor(1), max_batch=4, max_wait_s=0)

    async def main():
        await batcher.submit(np.zeros((1, 3, 2, 2)))
        batcher._task.cancel()  # whatever killed it
        await asyncio.sleep(0)
        return await asyncio.wait_for(batcher.submit(np.zeros((1, 3, 2, 2))), 2)

    assert _run(main()).shape == (1, 2)


def test_a_failed_load_leaves_no_lock_behind_and_the_next_request_loads(tmp_path, new_cache):
    loader = _Loader(fail_first=1)
    cache = new_cache(loader)

    async def main():
        with pytest.raises(OSError):
            await cache.get("c1", tmp_path)
        assert not cache._loading, "a failed load left its lock (one per failing id, forever)"
        entry = await cache.get("c1", tmp_path)
        assert isinstance(entry.classifier, _FakeClassifier)
        assert not cache._loading

    _run(main())
    assert loader.loads == ["c1", "c1"]


def test_concurrent_requests_share_one_load(tmp_path, new_cache):
    loader = _Loader(delay=0.05)
    cache = new_cache(loader)

    async def main():
        entries = await asyncio.gather(*(cache.get("c1", tmp_path) for _ in range(10)))
        assert len({id(e) for e in entries}) == 1

    _run(main())
    assert loader.loads == ["c1"]


def test_under_eviction_an_id_never_loads_twice_at_once_and_no_session_leaks(tmp_path, new_cache):
    """Capacity 1 and two ids requested at random: the old cache dropped an id's lock after its load, so a
    request that had waited on that lock and a newer one could load the id side by side; the second insert
    overwrote the first entry without closing it (a leaked ORT session)."""
    random.seed(7)
    loader = _Loader(delay=0.001, jitter=0.01)
    cache = new_cache(loader, capacity=1)
    returned = []

    async def request(cid: str):
        await asyncio.sleep(random.random() * 0.05)
        entry = await cache.get(cid, tmp_path)
        returned.append(entry)
        await entry.predict(np.zeros((1, 3, 2, 2), np.float32))

    async def main():
        for _ in range(15):
            await asyncio.gather(*(request(random.choice("ab")) for _ in range(12)))

    _run(main())
    assert max(loader.max_in_flight.values()) == 1, f"concurrent loads of one id: {loader.max_in_flight}"
    live = {id(e) for e in cache._entries.values()}
    leaked = {id(e) for e in returned if id(e) not in live and not e.batcher._closed}
    assert not leaked, f"{len(leaked)} dropped entries were never closed (leaked sessions)"
    assert len(cache) <= 1


def test_a_new_version_dir_replaces_the_cached_classifier(tmp_path, new_cache):
    """When a classifier publishes a new version, the next request serves it (the old one is closed)."""
    loader = _Loader()
    cache = new_cache(loader)
    v1, v2 = tmp_path / "v1", tmp_path / "v2"

    async def main():
        old = await cache.get("c1", v1)
        new = await cache.get("c1", v2)
        assert new is not old and new.classifier.version_dir == v2 and old.batcher._closed
        assert (await cache.get("c1", v2)) is new

    _run(main())
    assert loader.loads == ["c1", "c1"]


def test_a_classifier_deleted_while_it_loads_is_not_kept(tmp_path, new_cache):
    loader = _Loader(delay=0.2)
    cache = new_cache(loader)

    async def main():
        pending = asyncio.ensure_future(cache.get("c1", tmp_path))
        await asyncio.sleep(0.05)
        await asyncio.get_running_loop().run_in_executor(None, cache.evict, "c1")  # DELETE meanwhile
        entry = await pending  # the request in flight still gets an answer...
        assert (await entry.predict(np.zeros((1, 3, 2, 2), np.float32)))[0].shape == (1, 2)
        assert "c1" not in cache and entry.batcher._closed  # ...but the deleted classifier is not cached

    _run(main())


# ---- issue 15, serving cache: each test below failed on the cache before its fix ---------------------------


class _Tracked:
    """A fake classifier that counts how many of its kind are alive (held by anything) at once."""

    alive = 0
    lock = threading.Lock()

    def __init__(self, classifier_id: str, version_dir: Path, run_delay: float = 0.0):
        self.classifier_id, self.version_dir, self.run_delay = classifier_id, version_dir, run_delay
        self.runs_finished = 0
        with _Tracked.lock:
            _Tracked.alive += 1

    def __del__(self):
        with _Tracked.lock:
            _Tracked.alive -= 1

    def run(self, batch: np.ndarray) -> np.ndarray:
        time.sleep(self.run_delay)
        self.runs_finished += 1
        return np.full((len(batch), 2), 0.5, np.float32)


class _TrackingLoader:
    """Keeps no reference to what it made; records, at every load, how many classifiers were held."""

    def __init__(self, delay: float = 0.0, run_delay: float = 0.0):
        self.delay, self.run_delay = delay, run_delay
        self.lock = threading.Lock()
        self.loads: list[tuple[str, Path]] = []
        self.in_flight = 0
        self.peak_held = 0
        self.cache = None  # when set: the peak of what the cache holds (cached + loading) is recorded too
        self.peak_cached = 0

    def __call__(self, classifier_id: str, version_dir: Path) -> _Tracked:
        with self.lock:
            self.loads.append((classifier_id, version_dir))
            self.in_flight += 1
        try:
            time.sleep(self.delay)
            classifier = _Tracked(classifier_id, version_dir, self.run_delay)
            with self.lock:  # the loads in flight will each hold one more classifier in a moment
                self.peak_held = max(self.peak_held, _Tracked.alive + self.in_flight - 1)
                if self.cache is not None:
                    self.peak_cached = max(self.peak_cached, len(self.cache._entries) + self.in_flight)
            return classifier
        finally:
            with self.lock:
                self.in_flight -= 1


def test_a_request_that_resolved_an_older_version_never_makes_the_cache_go_back(tmp_path, new_cache):
    """A request resolves the preview v1, v2 is published, a request for v2 loads it, then the slow v1 request
    reaches the cache: the old cache loaded v1 again (v1 -> v2 -> v1) and served the older model. Now a version
    other than the cached one is checked against what serves now (``resolve``), and the cache follows that."""
    loader = _TrackingLoader()
    cache = new_cache(loader)
    v1, v2 = tmp_path / "v1", tmp_path / "v2"
    serving = {"now": (v1, "v1")}

    def resolve():
        return serving["now"]

    async def main():
        first = await cache.get("c1", v1, version="v1", resolve=resolve)
        assert first.version == "v1"
        serving["now"] = (v2, "v2")  # published
        newer = await cache.get("c1", v2, version="v2", resolve=resolve)
        late = await cache.get("c1", v1, version="v1", resolve=resolve)  # resolved before the publish
        assert late is newer and late.version == "v2" and late.classifier.version_dir == v2
        serving["now"] = (v1, "v1")  # a rollback: what serves now decides, not which version is newer
        rolled = await cache.get("c1", v1, version="v1", resolve=resolve)
        assert rolled.version == "v1"

    _run(main())
    assert [d.name for _, d in loader.loads] == ["v1", "v2", "v1"]


def test_a_late_request_for_an_older_version_waits_for_the_newer_load(tmp_path, new_cache):
    """v2 is loading when a request that resolved v1 arrives: the old cache waited for v2, then dropped it and
    loaded v1."""
    loader = _TrackingLoader(delay=0.1)
    cache = new_cache(loader)
    v1, v2 = tmp_path / "v1", tmp_path / "v2"

    async def main():
        loading = asyncio.ensure_future(cache.get("c1", v2, version="v2", resolve=lambda: (v2, "v2")))
        await asyncio.sleep(0.02)
        late = await cache.get("c1", v1, version="v1", resolve=lambda: (v2, "v2"))
        assert late is await loading and late.version == "v2"

    _run(main())
    assert [d.name for _, d in loader.loads] == ["v2"]


def test_memory_is_returned_after_the_evicted_classifier_is_freed_and_off_the_event_loop(tmp_path, new_cache,
                                                                                         monkeypatch):
    """The old cache trimmed the heap on the event loop right after dropping an entry, while the batcher was still
    running the evicted classifier (nothing freed yet: the trim returned nothing, and stalled every request)."""
    import app.classifier_cache as classifier_cache
    import weakref

    trims: list[tuple[int, bool]] = []
    evicted: dict = {}
    monkeypatch.setattr(classifier_cache, "release_free_memory",
                        lambda: trims.append((threading.get_ident(), evicted["ref"]() is None)))
    cache = new_cache(_TrackingLoader(run_delay=0.3), capacity=1)

    async def main():
        loop_thread = threading.get_ident()
        entry = await cache.get("c1", tmp_path / "a")
        evicted["ref"] = weakref.ref(entry.classifier)
        running = asyncio.ensure_future(entry.predict(np.zeros((1, 3, 2, 2), np.float32)))
        del entry
        await asyncio.sleep(0.05)  # c1's batch is running
        await cache.get("c2", tmp_path / "b")  # evicts c1
        assert not trims, "memory was trimmed while the evicted classifier still ran a batch"
        assert (await running)[0].shape == (1, 2)
        del running
        for _ in range(100):
            if trims:
                break
            await asyncio.sleep(0.02)
        return loop_thread

    loop_thread = _run(main())
    assert trims, "no trim after the evicted classifier was freed"
    assert all(thread != loop_thread for thread, _ in trims), "the heap was trimmed on the event loop"
    assert all(freed for _, freed in trims), "the heap was trimmed before the evicted classifier was freed"


def test_concurrent_loads_never_hold_more_than_capacity(tmp_path, new_cache):
    """Capacity 2, two loaded, two more requested at once: each load made room for itself alone, so both
    loads ran beside a kept entry and three classifiers were held."""
    loader = _TrackingLoader(delay=0.1)
    cache = new_cache(loader, capacity=2)

    async def main():
        for cid in ("c0", "c1"):
            await cache.get(cid, tmp_path / cid)
        loader.peak_held = 0
        entries = await asyncio.gather(cache.get("c2", tmp_path / "c2"), cache.get("c3", tmp_path / "c3"))
        assert {e.classifier.classifier_id for e in entries} == {"c2", "c3"}
        assert len(cache) <= 2

    _run(main())
    assert loader.peak_held <= 2, f"{loader.peak_held} classifiers held with capacity 2"


def test_more_concurrent_loads_than_capacity_wait_for_a_slot(tmp_path, new_cache):
    """Six loads at once with capacity 2: four wait (the requests holding an evicted entry are still answered)."""
    loader = _TrackingLoader(delay=0.05)
    cache = new_cache(loader, capacity=2)
    loader.cache = cache

    async def main():
        entries = await asyncio.gather(*(cache.get(f"c{i}", tmp_path / f"c{i}") for i in range(6)))
        assert [e.classifier.classifier_id for e in entries] == [f"c{i}" for i in range(6)]
        for e in entries:  # every request is answered, also by an entry evicted since
            assert (await e.predict(np.zeros((1, 3, 2, 2), np.float32)))[0].shape == (1, 2)
        assert len(cache) <= 2

    _run(main())
    assert loader.peak_cached <= 2, f"the cache held {loader.peak_cached} classifiers with capacity 2"


def test_concurrent_exports_materialise_model_onnx_once(tmp_path, monkeypatch):
    """N concurrent downloads of a model not yet materialised each built it (N x the CPU and the disk)."""
    import json
    import types

    import rmt_core.materialize as materialize
    from app.routers.export import model_onnx_path

    builds = []

    def slow_build(version_dir, bases_dir, out_path, precision="fp32"):
        builds.append(out_path)
        time.sleep(0.2)
        Path(out_path).write_bytes(b"onnx")
        return Path(out_path)

    monkeypatch.setattr(materialize, "materialize_onnx", slow_build)
    version_dir = tmp_path / "versions" / "v1"
    version_dir.mkdir(parents=True)
    (version_dir / "manifest.json").write_text(json.dumps({"base_id": "b1", "labels": ["a", "b"]}))
    store = types.SimpleNamespace(bases_dir=tmp_path / "bases",
                                  settings=types.SimpleNamespace(data_dir=tmp_path / "data"))
    with ThreadPoolExecutor(8) as pool:
        paths = list(pool.map(lambda _: model_onnx_path(store, version_dir), range(8)))
    assert len(set(paths)) == 1 and paths[0].read_bytes() == b"onnx"
    assert len(builds) == 1, f"materialised {len(builds)} times"


def test_create_app_limits_malloc_arenas_like_rmt_serve(settings, queue, monkeypatch):
    """``uvicorn --factory app.main:create_app`` (documented) skipped the arena limit only `rmt serve` set."""
    import rmt_core.heap as heap

    calls = []

    class _FakeLibc:
        def mallopt(self, param, value):
            calls.append((param, value))
            return 1

        def malloc_trim(self, pad):
            return 1

    monkeypatch.setattr(heap, "_LIBC", _FakeLibc())
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    from app.main import create_app

    create_app(settings, queue=queue)
    assert (heap._M_ARENA_MAX, 2) in calls
    calls.clear()
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")  # the operator's (or the image's) own setting wins
    create_app(settings, queue=queue)
    assert all(param != heap._M_ARENA_MAX for param, _ in calls)


def test_the_api_image_sets_the_malloc_environment():
    """In the environment glibc applies them before the first thread, whatever the entry point. Only the API's:
    the mmap threshold slows torch training (rmt_core/heap.py), so the worker image keeps glibc's defaults."""
    text = (Path(__file__).resolve().parents[2] / "docker" / "Dockerfile.api").read_text()
    assert "MALLOC_ARENA_MAX=2" in text
    assert "GLIBC_TUNABLES=glibc.malloc.mmap_threshold=1048576" in text


class _TieredLoader:
    """A loader that promotes (RMT_SERVING_MODE=auto): JIT first, baked when the cache asks for it."""

    promotes = True

    def __init__(self):
        self.loads: list[tuple[str, str]] = []

    def __call__(self, classifier_id: str, version_dir: Path, tier: str | None = None):
        self.loads.append((classifier_id, tier or "jit"))
        classifier = _Tracked(classifier_id, version_dir)
        classifier.mode = tier or "jit"
        return classifier


def test_a_busy_jit_classifier_is_promoted_to_baked_and_a_quiet_one_is_not(tmp_path, new_cache):
    loader = _TieredLoader()
    cache = new_cache(loader, capacity=4)
    cache.promote_after = 5

    async def main():
        for _ in range(4):
            await cache.get("quiet", tmp_path / "q", version="q1")
        for _ in range(5):
            entry = await cache.get("busy", tmp_path / "b", version="b1")
            assert (await entry.predict(np.zeros((1, 3, 2, 2), np.float32)))[0].shape == (1, 2)
        for _ in range(100):  # the promotion loads in the background
            if not cache._promoting:
                break
            await asyncio.sleep(0.01)
        busy, quiet = await cache.get("busy", tmp_path / "b"), await cache.get("quiet", tmp_path / "q")
        assert busy.classifier.mode == "baked" and busy.version == "b1" and busy.version_dir == tmp_path / "b"
        assert quiet.classifier.mode == "jit"
        assert (await busy.predict(np.zeros((1, 3, 2, 2), np.float32)))[0].shape == (1, 2)

    _run(main())
    assert loader.loads.count(("busy", "baked")) == 1


def test_a_promotion_that_finishes_after_a_new_version_is_not_kept(tmp_path, new_cache):
    loader = _TieredLoader()
    cache = new_cache(loader, capacity=4)
    cache.promote_after = 1
    slow = threading.Event()
    real = loader.__call__

    def slow_baked(classifier_id, version_dir, tier=None):
        if tier == "baked":
            slow.wait(2)
        return real(classifier_id, version_dir, tier)

    cache.loader = slow_baked
    slow_baked.promotes = True

    async def main():
        await cache.get("c1", tmp_path / "v1")
        await cache.get("c1", tmp_path / "v1")  # starts the promotion of v1
        newer = await cache.get("c1", tmp_path / "v2")  # v2 published meanwhile
        slow.set()
        for _ in range(200):
            if not cache._promoting:
                break
            await asyncio.sleep(0.01)
        assert cache._entries["c1"].classifier.version_dir == tmp_path / "v2", "the stale v1 promotion was kept"
        assert newer.classifier.version_dir == tmp_path / "v2"

    _run(main())
