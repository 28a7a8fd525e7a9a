"""Keeping a serving process's resident memory close to what its live ORT sessions need (glibc only;
elsewhere every function here is a no-op).

ONNX Runtime sessions of a ViT-B-32 are ~400 MiB each. Run from several threads, glibc gives every
thread its own malloc arena, and memory freed by an evicted session stays mapped in them: measured
here, two live sessions after two evictions held 1.7 GiB instead of 0.8 GiB. Two arenas and a trim
after each eviction keep RSS proportional to the cache size.

glibc also serves an allocation from the heap once it is below its "mmap threshold", and raises that
threshold (up to 32 MiB) every time a larger mmap'd block is freed; freed heap blocks below the top stay
resident. Loading a classifier allocates and frees its baked tensors, ONNX Runtime's copies of them and the
segment protobufs (MBs each), so with the dynamic threshold every load left about half its size resident
as freed heap (bench/RESULTS-layout.md: 165-231 MB per ViT-B-32 r-amt classifier, 125 MB with the fixed
threshold). ``return_freed_memory`` fixes the threshold at 1 MiB: such blocks are mmap'd and go back to
the system when freed. Only for a serving process: every large malloc then costs an mmap, and a CPU torch
training step measured +24% slower with it (ViT-B-32, batch 16).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os

log = logging.getLogger(__name__)

_M_ARENA_MAX = -8
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 20


def _libc():
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name)
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:
        return None


_LIBC = _libc()


def limit_malloc_arenas(arenas: int = 2) -> bool:
    """Call before the process starts threads; True if glibc accepted it. An arena limit set in the environment
    (``MALLOC_ARENA_MAX``, as the API image does; glibc applied it at start) is left as the operator set it."""
    if _LIBC is None or os.environ.get("MALLOC_ARENA_MAX"):
        return False
    ok = bool(_LIBC.mallopt(_M_ARENA_MAX, arenas))
    log.debug("malloc arenas limited to %d: %s", arenas, ok)
    return ok


def release_free_memory() -> None:
    """Return freed heap pages to the OS (after an ORT session is dropped)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


@functools.cache
def return_freed_memory() -> bool:
    """Blocks >= 1 MiB are mmap'd and returned to the OS when freed (process-wide, set once); True if set.
    A threshold set in the environment (``GLIBC_TUNABLES=glibc.malloc.mmap_threshold=...``) is kept."""
    if "glibc.malloc.mmap_threshold" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    ok = _LIBC is not None and bool(_LIBC.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    log.debug("malloc mmap threshold fixed at %d bytes: %s", MMAP_THRESHOLD, ok)
    return ok
