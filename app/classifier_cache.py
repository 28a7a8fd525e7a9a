"""Serving: a bounded LRU of loaded classifiers, each behind a micro-batcher.

Classifiers load lazily on first use, in a thread, through one injectable function
``loader(classifier_id, version_dir) -> classifier`` (anything with ``run(batch) -> probs``); the least
recently used one is dropped when the cache is full. An id is loaded by at most one load at a time: later
requests for it await that load. A request for a newer ``version_dir`` than the cached one replaces it.

Concurrent requests for one classifier are gathered into one ``run`` call: while a batch runs, new requests
queue up, and the next batch takes all of them (up to batch_max_size), waiting at most batch_max_wait_ms for
more. Under load this approaches batched throughput; a request that arrives alone (none other in the last
0.25 s) does not wait at all.

Threading: every mutation of the LRU and of a batcher's queue happens on the event loop. ``evict`` may be
called from any thread (a sync route runs in the threadpool); off the loop it hands the work to the loop and
waits for it. A batcher's serving task survives any exception: the requests of the batch that raised get it,
later requests are served, and a task that died anyway is restarted by the next request.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from rmt_core.heap import release_free_memory

log = logging.getLogger(__name__)


TRAFFIC_WINDOW_S = 0.25
EVICT_WAIT_S = 10.0

Loader = Callable[[str, Path], Any]


def onnx_loader(providers: str = "auto") -> Loader:
    """The default loader: a published model directory's model.onnx through ONNX Runtime."""
    from rmt_core.runtime import OnnxClassifier

    def load(classifier_id: str, version_dir: Path) -> Any:
        return OnnxClassifier(version_dir, providers)

    return load


def served_loader(bases_dir: Path, providers: str = "auto") -> Loader:
    """The service's loader: base + mask + head versions over one shared BaseRegistry (bases shared between
    classifiers, released when the last one using them is collected), old model.onnx directories as they are."""
    from rmt_core.runtime import BaseRegistry, load_classifier

    registry = BaseRegistry(bases_dir, providers, return_memory=True)

    def load(classifier_id: str, version_dir: Path) -> Any:
        return load_classifier(version_dir, registry=registry)

    load.registry = registry  # type: ignore[attr-defined]  (for /readyz and tests: what is shared)
    return load


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


def _call_on_loop(loop: asyncio.AbstractEventLoop | None, fn: Callable[[], None], wait_s: float = EVICT_WAIT_S) -> None:
    """Run ``fn`` on ``loop``'s thread: now if we are on it (or it no longer runs), else scheduled and waited for."""
    if loop is None or loop.is_closed() or not loop.is_running() or _on_loop(loop):
        fn()
        return
    done: concurrent.futures.Future = concurrent.futures.Future()

    def call() -> None:
        try:
            fn()
            done.set_result(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
            done.set_exception(exc)

    try:
        loop.call_soon_threadsafe(call)
    except RuntimeError:  # the loop closed between the check and the call
        fn()
        return
    done.result(timeout=wait_s)


class MicroBatcher:
    """Gathers [n,3,H,W] requests for one classifier into single ``run`` calls."""

    def __init__(self, run: Callable[[np.ndarray], np.ndarray], executor: ThreadPoolExecutor,
                 max_batch: int, max_wait_s: float, on_batch: Callable[[int], None] | None = None):
        self._run = run
        self._executor = executor
        self.max_batch = max(1, max_batch)
        self.max_wait_s = max(0.0, max_wait_s)
        self._on_batch = on_batch
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._last_submit = float("-inf")
        self._traffic = False  # did the newest request arrive soon after the one before it?

    async def submit(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities for ``batch``, computed together with whatever else is waiting."""
        loop = asyncio.get_running_loop()
        if self._closed:  # evicted while this request held it: run alone rather than fail
            return await loop.run_in_executor(self._executor, self._run, batch)
        if self._loop is not loop:  # first use, or a new event loop (a test client's portal)
            self._loop, self._queue, self._task = loop, asyncio.Queue(), None
        if self._task is None or self._task.done():  # first use, or the serving task died: (re)start it
            if self._task is not None and not self._task.cancelled() and self._task.exception() is not None:
                log.error("micro-batcher task had died; restarting it", exc_info=self._task.exception())
            self._task = loop.create_task(self._serve(), name="micro-batcher")
        now = time.monotonic()
        self._traffic = now - self._last_submit < TRAFFIC_WINDOW_S
        self._last_submit = now
        future = loop.create_future()
        self._queue.put_nowait((batch, future))
        return await future

    def _drain(self, items: list, count: int) -> int:
        while count < self.max_batch and not self._queue.empty():
            item = self._queue.get_nowait()
            if item is None:  # close(): finish what came before it, then stop
                self._queue.put_nowait(None)
                break
            items.append(item)
            count += len(item[0])
        return count

    async def _serve(self) -> None:
        while True:
            first = await self._queue.get()
            if first is None:
                return
            items = [first]
            try:
                count = self._drain(items, len(first[0]))
                # Wait for company only when requests are coming in close together; a lone request runs at once.
                if count < self.max_batch and self.max_wait_s > 0 and self._traffic:
                    await asyncio.sleep(self.max_wait_s)
                    count = self._drain(items, count)
                await self._serve_batch(items)
            except asyncio.CancelledError:
                self._fail(items, RuntimeError("the classifier was unloaded while this request waited"))
                raise
            except Exception as exc:  # never let one batch stop the classifier: fail its requests, serve on
                log.exception("micro-batch of %d request(s) failed", len(items))
                self._fail(items, exc)

    async def _serve_batch(self, items: list) -> None:
        items = [(b, f) for b, f in items if not f.done()]  # a cancelled request (client gone) is skipped
        if not items:
            return
        try:
            batch = items[0][0] if len(items) == 1 else np.concatenate([b for b, _ in items])
        except ValueError:  # shapes differ (requests preprocessed differently): each runs on its own
            for item in items:
                await self._serve_batch([item])  # one item: no concatenation, no recursion
            return
        loop = asyncio.get_running_loop()
        try:
            probs = await loop.run_in_executor(self._executor, self._run, batch)
        except Exception as exc:
            self._fail(items, exc)
            return
        if self._on_batch is not None:
            try:
                self._on_batch(len(batch))
            except Exception:  # metrics must never cost an answer
                log.exception("micro-batch callback failed")
        start = 0
        for b, future in items:
            if not future.done():  # ``run`` may answer a tuple of per-row arrays (predict: probs, outlier scores)
                future.set_result(tuple(None if part is None else part[start:start + len(b)] for part in probs)
                                  if isinstance(probs, tuple) else probs[start:start + len(b)])
            start += len(b)

    @staticmethod
    def _fail(items: list, exc: BaseException) -> None:
        for _, future in items:
            if not future.done():
                future.set_exception(exc)

    def close(self) -> None:
        """Stop serving after the queued requests; safe from any thread."""
        self._closed = True
        queue, loop = self._queue, self._loop
        if queue is not None and loop is not None and not loop.is_closed():  # a closed loop serves nothing
            _call_on_loop(loop, lambda: queue.put_nowait(None))


@dataclass
class CachedClassifier:
    classifier: Any
    batcher: MicroBatcher
    version_dir: Path | None = None


class ClassifierCache:
    """classifier id -> loaded classifier + its batcher, least recently used dropped first."""

    def __init__(self, capacity: int, providers: str = "auto", batch_max_size: int = 32,
                 batch_max_wait_ms: float = 2.0, ort_threads: int = 2, metrics=None,
                 loader: Loader | None = None):
        self.capacity = max(1, capacity)
        self.providers = providers
        self.batch_max_size = batch_max_size
        self.batch_max_wait_s = batch_max_wait_ms / 1000.0
        self.loader: Loader = loader or onnx_loader(providers)
        self._entries: OrderedDict[str, CachedClassifier] = OrderedDict()
        self._loading: dict[str, tuple[Path, asyncio.Task]] = {}  # id -> the one load in flight for it
        self._evictions: dict[str, int] = {}  # id -> times evicted: a load that overlapped one is not kept
        self._loop: asyncio.AbstractEventLoop | None = None
        self._load_executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="load")
        # Model runs happen here, not in the request threadpool, so they never queue behind decoding.
        self.executor = ThreadPoolExecutor(max_workers=max(1, ort_threads), thread_name_prefix="ort")
        self.metrics = metrics
        self._lock = threading.Lock()  # guards _loop only

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, classifier_id: str) -> bool:
        return classifier_id in self._entries

    async def get(self, classifier_id: str, version_dir: Path) -> CachedClassifier:
        """The loaded classifier for ``version_dir``, loading it (once, however many ask) if needed."""
        loop = asyncio.get_running_loop()
        with self._lock:
            self._loop = loop
        version_dir = Path(version_dir)
        for _ in range(8):  # a few rounds at most: each either returns or waits for a load to finish
            entry = self._entries.get(classifier_id)
            if entry is not None and entry.version_dir in (None, version_dir):
                self._entries.move_to_end(classifier_id)
                self._event("hit")
                return entry
            loading = self._loading.get(classifier_id)
            if loading is not None and loading[1].get_loop() is not loop:  # begun on a loop that has ended
                loading = None
            if loading is None:
                if entry is not None:  # a newer version was published: serve it from now on
                    self._drop(classifier_id)
                task = loop.create_task(self._load(classifier_id, version_dir), name=f"load-{classifier_id}")
                self._loading[classifier_id] = (version_dir, task)
                task.add_done_callback(lambda t, cid=classifier_id: self._load_done(cid, t))
                loading = (version_dir, task)
            loaded_dir, task = loading
            # shield: a request whose client went away must not cancel the load others wait on
            result = await asyncio.shield(task)
            if loaded_dir == version_dir:
                return result
        raise RuntimeError(f"classifier {classifier_id} kept changing version while loading")

    def _load_done(self, classifier_id: str, task: asyncio.Task) -> None:
        current = self._loading.get(classifier_id)
        if current is not None and current[1] is task:  # always, success or not: no lock left behind
            del self._loading[classifier_id]
            self._evictions.pop(classifier_id, None)
        if not task.cancelled() and task.exception() is not None:
            log.warning("loading classifier %s failed: %r", classifier_id, task.exception())

    async def _load(self, classifier_id: str, version_dir: Path) -> CachedClassifier:
        self._event("miss")
        evictions = self._evictions.get(classifier_id, 0)
        self._make_room(limit=self.capacity - 1)  # before loading: never hold capacity + 1 sessions at once
        loop = asyncio.get_running_loop()
        classifier = await loop.run_in_executor(self._load_executor, self.loader, classifier_id, version_dir)
        log.info("loaded classifier %s from %s on %s", classifier_id, version_dir.name,
                 getattr(classifier, "providers", "?"))
        # predict: (probs, outlier scores); a classifier object without it (a test double) answers probs alone
        batcher = MicroBatcher(getattr(classifier, "predict", None) or classifier.run, self.executor, self.batch_max_size, self.batch_max_wait_s,
                               on_batch=self._observe_batch)
        entry = CachedClassifier(classifier, batcher, version_dir)
        if self._evictions.get(classifier_id, 0) != evictions:  # deleted while it loaded: answer, don't keep
            batcher.close()
            return entry
        self._drop(classifier_id)  # defensive: never overwrite a live entry without closing it
        self._entries[classifier_id] = entry
        self._make_room(keep=classifier_id, limit=self.capacity)  # others may have loaded meanwhile
        self._update_size()
        return entry

    def _drop(self, classifier_id: str) -> bool:
        entry = self._entries.pop(classifier_id, None)
        if entry is None:
            return False
        entry.batcher.close()
        return True

    def _make_room(self, keep: str | None = None, limit: int | None = None) -> None:
        """Drop least recently used entries until at most ``limit`` (default capacity - 1) remain."""
        limit = self.capacity - 1 if limit is None else limit
        evicted = False
        for old_id in list(self._entries):
            if len(self._entries) <= limit:
                break
            if old_id == keep:
                continue
            self._drop(old_id)
            evicted = True
            self._event("eviction")
            log.info("evicted classifier %s from the cache", old_id)
        if evicted:
            release_free_memory()
            self._update_size()

    def evict(self, classifier_id: str) -> None:
        """Drop ``classifier_id`` (deleted, or replaced). Safe from any thread: the work runs on the loop."""
        with self._lock:
            loop = self._loop
        _call_on_loop(loop, lambda: self._evict_now(classifier_id))

    def _evict_now(self, classifier_id: str) -> None:
        if classifier_id in self._loading:
            self._evictions[classifier_id] = self._evictions.get(classifier_id, 0) + 1
        if self._drop(classifier_id):
            release_free_memory()
            self._update_size()

    def close(self) -> None:
        for classifier_id in list(self._entries):
            self.evict(classifier_id)
        self.executor.shutdown(wait=False, cancel_futures=True)
        self._load_executor.shutdown(wait=False, cancel_futures=True)

    def _event(self, kind: str) -> None:
        if self.metrics is not None:
            self.metrics.cache_events.labels(kind).inc()

    def _observe_batch(self, size: int) -> None:
        if self.metrics is not None:
            self.metrics.batch_size.observe(size)

    def _update_size(self) -> None:
        if self.metrics is not None:
            self.metrics.cache_size.set(len(self._entries))
