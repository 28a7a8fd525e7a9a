"""Faults as tenants see them: fixed, clear messages (never a server path or raw exception text).

The API (app/errors.py) and the worker (worker/tasks.py) map exceptions through here; the details go to
the log, next to the job or request id.
"""
from __future__ import annotations

import errno
from typing import Any

NO_SPACE_MESSAGE = "no space left on the data volume"
_DISK_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
# sqlite3: "database or disk is full"; PostgreSQL: SQLSTATE 53100 disk_full, "could not extend file ...".
_DISK_FULL_TEXT = ("database or disk is full", "no space left on device", "could not extend file")


def _chain(exc: BaseException | None):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        orig = getattr(exc, "orig", None)  # SQLAlchemy's DBAPIError wraps the driver's exception
        if isinstance(orig, BaseException) and id(orig) not in seen:
            yield orig
            seen.add(id(orig))
        exc = exc.__cause__ or exc.__context__


def disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) means the data volume or the database ran out of space."""
    for item in _chain(exc):
        if isinstance(item, OSError) and item.errno in _DISK_FULL_ERRNOS:
            return True
        if getattr(item, "sqlstate", None) == "53100" or getattr(item, "pgcode", None) == "53100":
            return True
        text = str(item).lower()
        if type(item).__name__ in ("OperationalError", "DiskFull") and any(t in text for t in _DISK_FULL_TEXT):
            return True
    return False


def out_of_memory(exc: BaseException) -> bool:
    return any(isinstance(item, MemoryError) or type(item).__name__ == "OutOfMemoryError"
               or "out of memory" in str(item).lower() for item in _chain(exc))


def job_error(exc: BaseException) -> dict[str, Any]:
    """The error a failed job shows its tenant: a code and a fixed message (the log has the exception)."""
    if disk_full(exc):
        return {"code": "no_space", "message": f"{NO_SPACE_MESSAGE}; the operator must free space, then retry"}
    if out_of_memory(exc):
        return {"code": "out_of_memory", "message": "the worker ran out of memory; retry with fewer or smaller "
                                                    "images or a smaller batch_size"}
    return {"code": "tuning_failed", "message": f"tuning failed ({type(exc).__name__}); the operator can find the "
                                                "details in the worker log under this job's id"}
