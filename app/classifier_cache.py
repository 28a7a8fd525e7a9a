"""Serving: a bounded LRU of loaded classifiers, their requests micro-batched per base.

Classifiers load lazily on first use, in a thread, through one injectable function
``loader(classifier_id, version_dir) -> classifier`` (anything with ``run(batch) -> probs``; ``predict(batch) ->
(probs, outlier)`` where it has one); the least recently used ones are dropped when the cache would exceed its
count or byte bound, counting the loads in flight. An id is loaded by at most one load at a time: later
requests for it await that load. Which version serves: see ``ClassifierCache``.

Concurrent requests are gathered into one call per batch group (rmt_core/serving.py: classifiers of one base
and mask set share the runs of their shared segments; a classifier without a group is its own group): while a
batch runs, new requests queue up, and the next batch takes all of them (up to batch_max_size), waiting at
most batch_max_wait_ms for more. Under load this approaches batched throughput; a request that arrives alone
(none other in the last 0.25 s) does not wait at all, and neither does one client's stream of requests (each
sent after the last was answered): once a wait gathered nobody, the batcher waits again only after a request
arrived while others were in flight. Each request is answered ``(probs, outlier or None)``.

Threading: every mutation of the LRU and of a batcher's queue happens on the event loop. ``evict`` may be
called from any thread (a sync route runs in the threadpool); off the loop it hands the work to the loop and
waits for it. A batcher's serving task survives any exception: the requests of the batch that raised get it,
later requests are served, and a task that died anyway is restarted by the next request. Memory freed by an
evicted classifier is returned to the system (malloc_trim) in a thread of its own once the classifier is
really freed (no entry, batch or request holds it).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
import weakref
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from rmt_core.heap import release_free_memory
from rmt_core.serving import batch_group, predict_mixed

log = logging.getLogger(__name__)


TRAFFIC_WINDOW_S = 0.25
PROMOTE_WINDOW_S = 60.0
EVICT_WAIT_S = 10.0

Loader = Callable[[str, Path], Any]


def onnx_loader(providers: str = "auto") -> Loader:
    """The default loader: a published model directory's model.onnx through ONNX Runtime."""
    from rmt_core.runtime import OnnxClassifier

    def load(classifier_id: str, version_dir: Path) -> Any:
        return OnnxClassifier(version_dir, providers)

    return load


def served_loader(bases_dir: Path, providers: str = "auto", shared_min_bytes: int | None = None,
                  mode: str = "baked", precision: str = "fp32") -> Loader:
    """The service's loader: base + mask + head versions over one shared BaseRegistry (bases shared between
    classifiers, released when the last one using them is collected), old model.onnx directories as they are.
    ``precision="int8"``: versions whose int8 guard passed serve int8 (rmt_core/quantize.py)."""
    from rmt_core.runtime import BaseRegistry, load_classifier

    registry = BaseRegistry(bases_dir, providers, return_memory=True, shared_min_bytes=shared_min_bytes)

    def load(classifier_id: str, version_dir: Path, tier: str | None = None) -> Any:
        # "auto": a classifier starts in the JIT tier; the cache promotes the busy ones (tier="baked")
        return load_classifier(version_dir, registry=registry, mode=tier or ("jit" if mode == "auto" else mode),
                               precision=precision)

    load.registry = registry  # type: ignore[attr-defined]  (for /readyz and tests: what is shared)
    load.promotes = mode == "auto"  # type: ignore[attr-defined]
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
    """Gathers [n,3,H,W] requests into single calls.

    Plain (``run(batch) -> probs``): every request is for one model; the batch is concatenated and split.
    Mixed (``run_mixed([(owner, batch), ...]) -> [result, ...]``): each request names its ``owner`` (the
    classifier), and the run answers each request on its own (rmt_core/serving.py: the shared segments of
    a base run once for all owners). The serving cache uses one mixed batcher per batch group.
    """

    def __init__(self, run: Callable[[np.ndarray], np.ndarray] | None, executor: ThreadPoolExecutor,
                 max_batch: int, max_wait_s: float, on_batch: Callable[[int], None] | None = None,
                 run_mixed: Callable[[list], list] | None = None):
        if (run is None) == (run_mixed is None):
            raise ValueError("a MicroBatcher takes run or run_mixed, exactly one")
        self._run = run
        self._run_mixed = run_mixed
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
        self._in_flight = 0  # requests submitted and not yet answered
        # Does waiting for company pay? Off once a wait gathered nobody (one client sending request after request
        # paid the whole wait on each: bench/RESULTS-multitenant.md); on again when a request arrives while others
        # are in flight (more than one client).
        self._company = True

    def _call(self, items: list) -> list:
        """Per item (batch, owner): its answer. Runs in the executor."""
        if self._run_mixed is not None:
            return self._run_mixed([(owner, batch) for batch, owner in items])
        batch = items[0][0] if len(items) == 1 else np.concatenate([b for b, _ in items])
        probs = self._run(batch)
        out, start = [], 0
        for b, _ in items:
            out.append(probs[start:start + len(b)])
            start += len(b)
        return out

    async def submit(self, batch: np.ndarray, owner: Any = None) -> Any:
        """The answer for ``batch`` (of ``owner`` in a mixed batcher), computed with whatever else is waiting."""
        loop = asyncio.get_running_loop()
        if self._closed:  # evicted while this request held it: run alone rather than fail
            return (await loop.run_in_executor(self._executor, self._call, [(batch, owner)]))[0]
        if self._loop is not loop:  # first use, or a new event loop (a test client's portal)
            self._loop, self._queue, self._task = loop, asyncio.Queue(), None
        if self._task is None or self._task.done():  # first use, or the serving task died: (re)start it
            if self._task is not None and not self._task.cancelled() and self._task.exception() is not None:
                log.error("micro-batcher task had died; restarting it", exc_info=self._task.exception())
            self._task = loop.create_task(self._serve(), name="micro-batcher")
        now = time.monotonic()
        self._traffic = now - self._last_submit < TRAFFIC_WINDOW_S
        self._last_submit = now
        if self._in_flight:
            self._company = True
        future = loop.create_future()
        self._queue.put_nowait((batch, owner, future))
        self._in_flight += 1
        try:
            return await future
        finally:
            self._in_flight -= 1

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
                if count < self.max_batch and self.max_wait_s > 0 and self._traffic and self._company:
                    await asyncio.sleep(self.max_wait_s)
                    alone = count
                    count = self._drain(items, count)
                    self._company = count > alone
                await self._serve_batch(items)
            except asyncio.CancelledError:
                self._fail(items, RuntimeError("the classifier was unloaded while this request waited"))
                raise
            except Exception as exc:  # never let one batch stop the classifier: fail its requests, serve on
                log.exception("micro-batch of %d request(s) failed", len(items))
                self._fail(items, exc)
            finally:
                del first, items  # what an evicted classifier's last batch held is freed now, not at the next one

    async def _serve_batch(self, items: list) -> None:
        items = [item for item in items if not item[2].done()]  # a cancelled request (client gone) is skipped
        if not items:
            return
        shapes = {b.shape[1:] for b, _, _ in items}
        if len(shapes) > 1:  # shapes differ (requests preprocessed differently): each runs on its own
            for item in items:
                await self._serve_batch([item])  # one item: one shape, no recursion
            return
        loop = asyncio.get_running_loop()
        try:
            answers = await loop.run_in_executor(self._executor, self._call, [(b, o) for b, o, _ in items])
        except Exception as exc:
            self._fail(items, exc)
            return
        if self._on_batch is not None:
            try:
                self._on_batch(sum(len(b) for b, _, _ in items))
            except Exception:  # metrics must never cost an answer
                log.exception("micro-batch callback failed")
        for (_, _, future), answer in zip(items, answers):
            if not future.done():
                future.set_result(answer)

    @staticmethod
    def _fail(items: list, exc: BaseException) -> None:
        for item in items:
            if not item[-1].done():
                item[-1].set_exception(exc)

    def close(self) -> None:
        """Stop serving after the queued requests; safe from any thread."""
        self._closed = True
        queue, loop = self._queue, self._loop
        if queue is not None and loop is not None and not loop.is_closed():  # a closed loop serves nothing
            _call_on_loop(loop, lambda: queue.put_nowait(None))


@dataclass
class CachedClassifier:
    classifier: Any
    batcher: MicroBatcher  # the batcher of its batch group (shared with the classifiers of one base and mask set)
    version_dir: Path | None = None
    version: Any = None    # what the caller named the version by (the route: its record), for the answer
    nbytes: int = 0        # what it holds beyond the shared base (the byte bound counts this)
    group: Any = None
    uses: int = 0          # requests since window_start (RMT_SERVING_MODE=auto promotes busy JIT classifiers)
    window_start: float = 0.0

    async def predict(self, batch: np.ndarray) -> tuple[np.ndarray, Any]:
        """(probs, outlier or None) for a preprocessed batch, batched with other requests of its group."""
        return await self.batcher.submit(batch, self.classifier)


def _resident_bytes(classifier: Any) -> int:
    try:
        return max(0, int(getattr(classifier, "resident_bytes", 0) or 0))
    except (TypeError, ValueError):
        return 0


class ClassifierCache:
    """classifier id -> loaded classifier, least recently used dropped first, bounded by count and by bytes.

    The bounds cover what loads in flight will hold, too: a load reserves its room (its size guessed from the
    classifiers loaded before it) before it starts, and waits when loads in flight already fill the cache.
    An evicted classifier is freed once the last request holding it is answered; the freed heap is then
    given back to the system in a thread of its own, never on the event loop.

    Versions: ``get(id, version_dir, version, resolve)``. When the cache holds (or loads) another version of
    the id than the request names, ``resolve()`` (run in a thread: it reads the records) says which version
    serves now, and the cache follows that: a request that resolved its version just before a newer one was
    published is answered by the newer one, and the cache never goes back to the older one; a rollback
    (an older version serving again) is followed too. Without ``resolve`` the requested version wins.
    """

    def __init__(self, capacity: int, providers: str = "auto", batch_max_size: int = 32,
                 batch_max_wait_ms: float = 2.0, ort_threads: int = 2, metrics=None,
                 loader: Loader | None = None, max_bytes: int | None = None, promote_after: int = 100):
        self.capacity = max(1, capacity)
        self.max_bytes = max_bytes if max_bytes and max_bytes > 0 else None
        self.providers = providers
        self.batch_max_size = batch_max_size
        self.batch_max_wait_s = batch_max_wait_ms / 1000.0
        self.loader: Loader = loader or onnx_loader(providers)
        self._entries: OrderedDict[str, CachedClassifier] = OrderedDict()
        self._loading: dict[str, tuple[Path, asyncio.Task]] = {}  # id -> the one load in flight for it
        self._evictions: dict[str, int] = {}  # id -> times evicted: a load that overlapped one is not kept
        self._reserved: dict[str, int] = {}  # id -> bytes reserved by its load in flight
        self._room_waiters: list[asyncio.Future] = []
        self._groups: dict[Any, tuple[MicroBatcher, int]] = {}  # batch group -> (its batcher, entries in it)
        self._loaded_bytes: list[int] = []  # the sizes of recent loads: the guess for the next one
        self.promote_after = max(1, promote_after)
        self._promoting: dict[str, asyncio.Task] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._load_executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="load")
        self._trim_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="trim")
        self._trim_pending = threading.Event()
        # Model runs happen here, not in the request threadpool, so they never queue behind decoding.
        self.executor = ThreadPoolExecutor(max_workers=max(1, ort_threads), thread_name_prefix="ort")
        self.metrics = metrics
        self._lock = threading.Lock()  # guards _loop only

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, classifier_id: str) -> bool:
        return classifier_id in self._entries

    @property
    def nbytes(self) -> int:
        """Bytes held by the cached classifiers (beyond the shared bases)."""
        return sum(e.nbytes for e in self._entries.values())

    async def get(self, classifier_id: str, version_dir: Path, version: Any = None,
                  resolve: Callable[[], tuple[Path, Any]] | None = None) -> CachedClassifier:
        """The loaded classifier for ``version_dir`` (or the version serving now: see the class), loading it
        (once, however many ask) if needed."""
        loop = asyncio.get_running_loop()
        with self._lock:
            self._loop = loop
        version_dir = Path(version_dir)
        resolved = resolve is None
        for _ in range(8):  # a few rounds at most: each either returns or waits for a load to finish
            entry = self._entries.get(classifier_id)
            if entry is not None and entry.version_dir in (None, version_dir):
                self._entries.move_to_end(classifier_id)
                self._event("hit")
                self._note_use(classifier_id, entry)
                return entry
            loading = self._loading.get(classifier_id)
            if loading is not None and loading[1].get_loop() is not loop:  # begun on a loop that has ended
                loading = None
            other = (entry is not None) or (loading is not None and loading[0] != version_dir)
            if other and not resolved:  # the cache holds another version: which one serves now?
                version_dir, version = await loop.run_in_executor(None, resolve)
                version_dir, resolved = Path(version_dir), True
                continue
            if loading is None:
                if entry is not None:  # another version serves now: from now on, this one
                    self._drop(classifier_id)
                task = loop.create_task(self._load(classifier_id, version_dir, version), name=f"load-{classifier_id}")
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
        self._unreserve(classifier_id)
        if not task.cancelled() and task.exception() is not None:
            log.warning("loading classifier %s failed: %r", classifier_id, task.exception())

    # -- tiers -----------------------------------------------------------------------------------------------

    def _note_use(self, classifier_id: str, entry: CachedClassifier) -> None:
        """With a loader that promotes (RMT_SERVING_MODE=auto): a JIT classifier asked ``promote_after`` times
        within PROMOTE_WINDOW_S is reloaded baked (its own sessions: the lowest latency, ~its masked tensors in
        memory) in the background; requests keep being served by the JIT entry meanwhile."""
        if not getattr(self.loader, "promotes", False) or getattr(entry.classifier, "mode", None) != "jit":
            return
        now = time.monotonic()
        if now - entry.window_start > PROMOTE_WINDOW_S:
            entry.window_start, entry.uses = now, 0
        entry.uses += 1
        if entry.uses >= self.promote_after and classifier_id not in self._promoting:
            task = asyncio.get_running_loop().create_task(self._promote(classifier_id, entry))
            self._promoting[classifier_id] = task
            task.add_done_callback(lambda t, cid=classifier_id: self._promoted(cid, t))

    def _promoted(self, classifier_id: str, task: asyncio.Task) -> None:
        if self._promoting.get(classifier_id) is task:
            del self._promoting[classifier_id]
        if not task.cancelled() and task.exception() is not None:
            log.warning("promoting classifier %s failed: %r", classifier_id, task.exception())

    async def _promote(self, classifier_id: str, entry: CachedClassifier) -> None:
        key = f"{classifier_id}\0baked"  # a reservation of its own: the JIT entry stays until the swap
        await self._reserve(key)
        try:
            loop = asyncio.get_running_loop()
            classifier = await loop.run_in_executor(self._load_executor, lambda: self.loader(
                classifier_id, entry.version_dir, tier="baked"))
        finally:
            self._unreserve(key)
        if self._entries.get(classifier_id) is not entry:  # evicted, deleted or replaced meanwhile: not kept
            return
        self._watch_free(classifier)
        group = batch_group(classifier)
        promoted = CachedClassifier(classifier, self._batcher_for(group), entry.version_dir, entry.version,
                                    _resident_bytes(classifier), group)
        self._drop(classifier_id)
        self._entries[classifier_id] = promoted
        self._event("promotion")
        log.info("classifier %s promoted to the baked tier", classifier_id)
        for old_id in list(self._entries):
            if not self._over() or old_id == classifier_id:
                break
            self._evict_lru(old_id)
        self._update_size()

    # -- room ------------------------------------------------------------------------------------------------

    def _guess_bytes(self) -> int:
        recent = self._loaded_bytes[-16:]
        return max(recent) if recent else 0

    def _over(self, extra_count: int = 0, extra_bytes: int = 0) -> bool:
        count = len(self._entries) + len(self._reserved) + extra_count
        if count > self.capacity:
            return True
        if self.max_bytes is None:
            return False
        return self.nbytes + sum(self._reserved.values()) + extra_bytes > self.max_bytes

    async def _reserve(self, classifier_id: str) -> None:
        """Make room for one more classifier (evicting the least recently used), waiting while loads in flight
        fill the cache; then count it as held until its load ends."""
        guess = self._guess_bytes()
        while True:
            for old_id in list(self._entries):
                if not self._over(1, guess):
                    break
                self._evict_lru(old_id)
            # Room, or nothing left to evict and no other load to wait for (one classifier larger than the
            # byte bound still loads: alone).
            if not self._over(1, guess) or not self._reserved:
                break
            waiter = asyncio.get_running_loop().create_future()
            self._room_waiters.append(waiter)
            await waiter
        self._reserved[classifier_id] = guess

    def _unreserve(self, classifier_id: str) -> None:
        if self._reserved.pop(classifier_id, None) is not None:
            waiters, self._room_waiters = self._room_waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    def _evict_lru(self, old_id: str) -> None:
        self._drop(old_id)
        self._event("eviction")
        log.info("evicted classifier %s from the cache", old_id)
        self._update_size()

    # -- load ------------------------------------------------------------------------------------------------

    async def _load(self, classifier_id: str, version_dir: Path, version: Any) -> CachedClassifier:
        self._event("miss")
        evictions = self._evictions.get(classifier_id, 0)
        await self._reserve(classifier_id)  # before loading: never hold more than the bounds, loads included
        loop = asyncio.get_running_loop()
        classifier = await loop.run_in_executor(self._load_executor, self.loader, classifier_id, version_dir)
        log.info("loaded classifier %s from %s on %s", classifier_id, version_dir.name,
                 getattr(classifier, "providers", "?"))
        self._watch_free(classifier)
        nbytes = _resident_bytes(classifier)
        self._loaded_bytes = [*self._loaded_bytes[-15:], nbytes]
        group = batch_group(classifier)
        entry = CachedClassifier(classifier, self._batcher_for(group), version_dir, version, nbytes, group,
                                 uses=1, window_start=time.monotonic())  # the request that loaded it is a use
        self._unreserve(classifier_id)
        if self._evictions.get(classifier_id, 0) != evictions:  # deleted while it loaded: answer, don't keep
            self._leave_group(group, entry.batcher)
            return entry
        self._drop(classifier_id)  # defensive: never overwrite a live entry without closing it
        self._entries[classifier_id] = entry
        for old_id in list(self._entries):  # its real size may exceed the guess
            if not self._over() or old_id == classifier_id:
                break
            self._evict_lru(old_id)
        self._update_size()
        return entry

    def _batcher_for(self, group: Any) -> MicroBatcher:
        """The group's batcher (made on first use), counted as used by one more entry. A classifier without a
        group gets a batcher of its own (its group is the entry)."""
        key = group if group is not None else object()
        batcher, users = self._groups.get(key, (None, 0))
        if batcher is None:
            batcher = MicroBatcher(None, self.executor, self.batch_max_size, self.batch_max_wait_s,
                                   on_batch=self._observe_batch, run_mixed=predict_mixed)
        self._groups[key] = (batcher, users + 1)
        batcher.group_key = key  # type: ignore[attr-defined]
        return batcher

    def _leave_group(self, group: Any, batcher: MicroBatcher | None = None) -> None:
        key = batcher.group_key if batcher is not None else group  # type: ignore[attr-defined]
        found = self._groups.get(key)
        if found is None:
            return
        batcher, users = found
        if users <= 1:  # the group's last classifier: its batcher stops after the requests it holds
            del self._groups[key]
            batcher.close()
        else:
            self._groups[key] = (batcher, users - 1)

    def _watch_free(self, classifier: Any) -> None:
        """When ``classifier`` is really freed (no entry, batch or request holds it), give the freed heap back."""
        try:
            weakref.finalize(classifier, self._after_free)
        except TypeError:  # not weak-referenceable: nothing to watch
            pass

    def _after_free(self) -> None:
        if self._trim_pending.is_set():  # one trim returns whatever was freed before it runs
            return
        self._trim_pending.set()
        try:
            self._trim_executor.submit(self._trim)
        except RuntimeError:  # the cache is closed
            self._trim_pending.clear()

    def _trim(self) -> None:
        self._trim_pending.clear()
        release_free_memory()

    def _drop(self, classifier_id: str) -> bool:
        entry = self._entries.pop(classifier_id, None)
        if entry is None:
            return False
        self._leave_group(entry.group, entry.batcher)
        return True

    def evict(self, classifier_id: str) -> None:
        """Drop ``classifier_id`` (deleted, or replaced). Safe from any thread: the work runs on the loop."""
        with self._lock:
            loop = self._loop
        _call_on_loop(loop, lambda: self._evict_now(classifier_id))

    def _evict_now(self, classifier_id: str) -> None:
        if classifier_id in self._loading:
            self._evictions[classifier_id] = self._evictions.get(classifier_id, 0) + 1
        if self._drop(classifier_id):
            self._update_size()

    def close(self) -> None:
        for classifier_id in list(self._entries):
            self.evict(classifier_id)
        self.executor.shutdown(wait=False, cancel_futures=True)
        self._load_executor.shutdown(wait=False, cancel_futures=True)
        self._trim_executor.shutdown(wait=False, cancel_futures=True)

    def _event(self, kind: str) -> None:
        if self.metrics is not None:
            self.metrics.cache_events.labels(kind).inc()

    def _observe_batch(self, size: int) -> None:
        if self.metrics is not None:
            self.metrics.batch_size.observe(size)

    def _update_size(self) -> None:
        if self.metrics is not None:
            self.metrics.cache_size.set(len(self._entries))
