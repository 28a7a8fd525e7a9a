"""How many threads this process may run, and waits that sleep instead of spin (issue 17).

A build beside busy neighbours used to burn 3.75x its quiet CPU time: OpenMP's worker threads spin-wait
between parallel regions (libgomp spins for ~300k iterations by default) and torch sized its pools to the
host's cores, not to the CPU the process is given. So a process that tunes:

* sizes its pools to ``available_cpus()``: the smaller of the CPUs it may run on (sched_getaffinity) and
  its cgroup CPU quota (cgroup v2 ``cpu.max``, v1 ``cpu.cfs_quota_us / cpu.cfs_period_us``), rounded up;
* sets ``OMP_WAIT_POLICY=PASSIVE`` (idle OpenMP threads sleep) and ``OMP_NUM_THREADS``. libgomp reads both
  once, when torch is first imported, so ``apply_process_policy`` must run at process start, before any
  import of torch: the worker's ``main`` and the CLI's library commands call it first thing.

Values the user set in the environment win: these are documented process-level knobs, not settings.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, MutableMapping

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup_cpu_quota(root: Path = CGROUP_ROOT) -> float | None:
    """CPUs' worth of time the cgroup may use per period (e.g. 1.5), or None when unlimited/unreadable."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]  # cgroup v2: "max 100000" | "150000 100000"
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    for v1 in (root / "cpu", root / "cpu,cpuacct", root):
        try:
            quota_us = int((v1 / "cpu.cfs_quota_us").read_text())
            period_us = int((v1 / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us
    return None


def affinity_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def available_cpus(affinity: int | None = None, quota: float | None = None, read_quota: bool = True,
                   limit: int = 0) -> int:
    """CPUs this process really gets: min(affinity, ceil(cgroup quota), ``limit`` when > 0), at least 1.

    ``affinity`` / ``quota`` inject readings (tests); by default they are read from the system.
    """
    cpus = affinity if affinity is not None else affinity_cpus()
    if quota is None and read_quota:
        quota = cgroup_cpu_quota()
    if quota is not None and quota > 0:
        cpus = min(cpus, math.ceil(quota - 1e-9))
    if limit > 0:
        cpus = min(cpus, limit)
    return max(1, int(cpus))


@dataclass(frozen=True)
class ThreadPlan:
    """Thread counts for one tuning process."""

    cpus: int  # what the process gets (affinity, quota, configured limit)
    torch_threads: int  # torch intra-op pool (the tuning's forward/backward)
    torch_interop_threads: int  # torch inter-op pool: tuning runs one op graph at a time
    ort_intra_threads: int  # ORT sessions the worker builds (parity check)

    def to_dict(self) -> dict:
        return {"cpus": self.cpus, "torch_threads": self.torch_threads,
                "torch_interop_threads": self.torch_interop_threads, "ort_intra_threads": self.ort_intra_threads}


def plan_threads(cpus: int) -> ThreadPlan:
    """One thread per CPU the process gets, for torch's intra-op pool and ORT; no inter-op parallelism
    (a tuning step is a chain of ops; extra pools only add threads that compete for the same cores)."""
    cpus = max(1, int(cpus))
    return ThreadPlan(cpus=cpus, torch_threads=cpus, torch_interop_threads=1, ort_intra_threads=cpus)


def apply_process_policy(env: MutableMapping[str, str] | None = None, cpus: int | None = None) -> ThreadPlan:
    """Process-start knobs for a process that will run torch: passive OpenMP waits and pools sized to the
    CPUs it gets. Call before torch is imported; the user's own OMP_* values are kept."""
    env = os.environ if env is None else env
    plan = plan_threads(cpus if cpus is not None else available_cpus())
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env.setdefault("OMP_NUM_THREADS", str(plan.torch_threads))
    return plan


def apply_torch_threads(plan: ThreadPlan) -> None:
    """Size torch's pools (after import). The inter-op pool can only be sized before torch first uses it,
    so a second call keeps whatever the first set."""
    import torch

    if torch.get_num_threads() != plan.torch_threads:
        torch.set_num_threads(plan.torch_threads)
    try:
        torch.set_num_interop_threads(plan.torch_interop_threads)
    except RuntimeError:  # the pool already started: torch sizes it once per process, the first size stays
        log.debug("torch inter-op pool already started; keeping its size")


# A second intra-op thread pays only for a wide enough vision tower. On 2 cores (batch 32, student fwd + VJP;
# bench/RESULTS-build.md) the builtin rmt-world-vit (width 128) stepped as fast on one thread as on two
# (84 vs 87 ms: the second thread only doubled the CPU), and a whole 5x8 build on one thread took less CPU
# *and* less wall time; ViT-S-32 (width 384) stepped 1.5x faster on two. Narrower towers build on one thread.
PARALLEL_MIN_WIDTH = 384


def build_threads(width: int | None, threads: int) -> int:
    """Intra-op threads for a CPU build on a vision tower ``width`` wide when the process may use ``threads``:
    one below ``PARALLEL_MIN_WIDTH``, all of them from there on (and for a tower of unknown width)."""
    threads = max(1, int(threads))
    return 1 if width is not None and width < PARALLEL_MIN_WIDTH else threads


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[int]:
    """torch's intra-op pool at ``n`` threads inside the block, the size it had before after it."""
    import torch

    before = torch.get_num_threads()
    if n != before:
        torch.set_num_threads(n)
    try:
        yield n
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


@functools.lru_cache(maxsize=1)
def _blas_controller():
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()  # the BLAS libraries loaded by now (numpy's OpenBLAS; torch's, where imported)


@contextlib.contextmanager
def one_blas_thread() -> Iterator[None]:
    """numpy's BLAS on one thread inside the block, as it was after. The few-shot heads' products are tiny
    ([~100, 512] @ [512, 10]); OpenBLAS still splits those above ~128k multiply-adds over every core, which
    doubled their CPU time without making them faster (bench/RESULTS-build.md)."""
    with _blas_controller().limit(limits=1, user_api="blas"):
        yield
