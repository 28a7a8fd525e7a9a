"""Job leases: who is running a job, and whether that worker is still alive.

A running job's record names its owner (host:pid:nonce) and a lease expiry that the owner renews.
A lease is dead when it expired, or at once when the owner is a process on this host that no longer
exists (a worker killed with -9 is noticed without waiting out the lease).
"""
from __future__ import annotations

import os
import socket
import time
import uuid

from rmt_core.store import JobRecord

HOST = socket.gethostname()


def new_owner() -> str:
    return f"{HOST}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _owner_process_gone(owner: str) -> bool:
    host, _, rest = owner.partition(":")
    pid_text = rest.partition(":")[0]
    if host != HOST or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # exists, owned by someone else
        return False
    return _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def lease_dead(job: JobRecord, now: float | None = None) -> bool:
    """True when a running job's worker is gone: its lease expired or its process no longer exists."""
    if job.status != "running":
        return False
    now = time.time() if now is None else now
    if job.lease_owner is None or job.lease_expired(now):
        return True
    return _owner_process_gone(job.lease_owner)
