"""Serving: a bounded LRU of ONNX Runtime classifiers, each behind a micro-batcher.

Sessions load lazily on first use (in a thread, one load per id at a time) and the least recently
used one is dropped when the cache is full. Concurrent requests for one classifier are gathered into
one ORT call: while a batch runs, new requests queue up, and the next batch takes all of them (up to
batch_max_size), waiting at most batch_max_wait_ms for more. Under load this approaches batched ORT
throughput; a request that arrives alone (none other in the last 0.25 s) does not wait at all.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from rmt_core.runtime import OnnxClassifier

from .memory import release_free_memory

log = logging.getLogger(__name__)


TRAFFIC_WINDOW_S = 0.25


class MicroBatcher:
    """Gathers [n,3,H,W] requests for one classifier into single ``classifier.run`` calls."""

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
            self._loop, self._queue = loop, asyncio.Queue()
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
        loop = asyncio.get_running_loop()
        while True:
            first = await self._queue.get()
            if first is None:
                return
            items = [first]
            count = self._drain(items, len(first[0]))
            # Wait for company only when requests are coming in close together; a lone request runs at once.
            if count < self.max_batch and self.max_wait_s > 0 and self._traffic:
                await asyncio.sleep(self.max_wait_s)
                count = self._drain(items, count)
            items = [(b, f) for b, f in items if not f.cancelled()]
            if not items:
                continue
            batch = items[0][0] if len(items) == 1 else np.concatenate([b for b, _ in items])
            try:
                probs = await loop.run_in_executor(self._executor, self._run, batch)
            except Exception as exc:
                for _, future in items:
                    if not future.done():
                        future.set_exception(exc)
                continue
            if self._on_batch is not None:
                self._on_batch(len(batch))
            start = 0
            for b, future in items:
                if not future.done():
                    future.set_result(probs[start:start + len(b)])
                start += len(b)

    def close(self) -> None:
        self._closed = True
        if self._queue is not None:
            self._queue.put_nowait(None)


@dataclass
class CachedClassifier:
    classifier: OnnxClassifier
    batcher: MicroBatcher


class ClassifierCache:
    """classifier id -> loaded ONNX classifier + its batcher, least recently used dropped first."""

    def __init__(self, capacity: int, providers: str = "auto", batch_max_size: int = 32,
                 batch_max_wait_ms: float = 2.0, ort_threads: int = 2, metrics=None):
        self.capacity = max(1, capacity)
        self.providers = providers
        self.batch_max_size = batch_max_size
        self.batch_max_wait_s = batch_max_wait_ms / 1000.0
        self._entries: OrderedDict[str, CachedClassifier] = OrderedDict()
        self._loading: dict[str, asyncio.Lock] = {}
        # ORT calls run here, not in the request threadpool, so model runs never queue behind decoding.
        self.executor = ThreadPoolExecutor(max_workers=max(1, ort_threads), thread_name_prefix="ort")
        self.metrics = metrics

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, classifier_id: str) -> bool:
        return classifier_id in self._entries

    async def get(self, classifier_id: str, model_dir: Path) -> CachedClassifier:
        entry = self._entries.get(classifier_id)
        if entry is not None:
            self._entries.move_to_end(classifier_id)
            self._event("hit")
            return entry
        lock = self._loading.setdefault(classifier_id, asyncio.Lock())
        async with lock:
            entry = self._entries.get(classifier_id)
            if entry is not None:  # loaded by the request we waited for
                self._entries.move_to_end(classifier_id)
                self._event("hit")
                return entry
            self._event("miss")
            self._make_room()  # before loading: never hold capacity + 1 sessions at once
            loop = asyncio.get_running_loop()
            classifier = await loop.run_in_executor(None, OnnxClassifier, model_dir, self.providers)
            log.info("loaded classifier %s on %s", classifier_id, classifier.providers)
            batcher = MicroBatcher(classifier.run, self.executor, self.batch_max_size, self.batch_max_wait_s,
                                   on_batch=self._observe_batch)
            entry = CachedClassifier(classifier, batcher)
            self._entries[classifier_id] = entry
            self._make_room(keep=classifier_id, limit=self.capacity)  # others may have loaded meanwhile
        self._loading.pop(classifier_id, None)
        self._update_size()
        return entry

    def _make_room(self, keep: str | None = None, limit: int | None = None) -> None:
        """Drop least recently used entries until at most ``limit`` (default capacity - 1) remain."""
        limit = self.capacity - 1 if limit is None else limit
        evicted = False
        for old_id in list(self._entries):
            if len(self._entries) <= limit:
                break
            if old_id == keep:
                continue
            old = self._entries.pop(old_id)
            old.batcher.close()
            del old
            evicted = True
            self._event("eviction")
            log.info("evicted classifier %s from the cache", old_id)
        if evicted:
            release_free_memory()

    def evict(self, classifier_id: str) -> None:
        entry = self._entries.pop(classifier_id, None)
        if entry is not None:
            entry.batcher.close()
            del entry
            release_free_memory()
            self._update_size()

    def close(self) -> None:
        for classifier_id in list(self._entries):
            self.evict(classifier_id)
        self.executor.shutdown(wait=False, cancel_futures=True)

    def _event(self, kind: str) -> None:
        if self.metrics is not None:
            self.metrics.cache_events.labels(kind).inc()

    def _observe_batch(self, size: int) -> None:
        if self.metrics is not None:
            self.metrics.batch_size.observe(size)

    def _update_size(self) -> None:
        if self.metrics is not None:
            self.metrics.cache_size.set(len(self._entries))
