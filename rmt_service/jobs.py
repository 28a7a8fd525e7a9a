"""The job state machine: every transition of a tuning job, and nothing else writes a job's status.

    queued ──claim──▶ running ──finish──▶ succeeded | failed | cancelled
      │  ▲                │
      │  └──lease expired─┘ (sweep: re-queued, or failed after max attempts, or cancelled if asked)
      └──cancel──▶ cancelled

Each transition is one conditional ``UPDATE ... WHERE id = :id AND status = :from [AND lease_owner = :me]``
in a transaction; it either happens exactly once or reports that someone else got there first. Lease
deadlines and every other time two processes compare come from the database's clock (``db_now()``), so
no host's clock matters. A lease owner is ``host:pid:<uuid4>``, new for every claim: unique across hosts
and containers (the host and pid are for people reading it; liveness is decided only by lease expiry,
renewed every second by the running worker's heartbeat).

Jobs per status are counted in ``job_counts`` in the same transaction as the transition (``/metrics``
reads one small table instead of counting every job).
"""
from __future__ import annotations

import dataclasses
import os
import socket
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, delete, func, select, update
from sqlalchemy.engine import Connection

from .db import Database, db_now, job_counts, jobs

JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
ACTIVE_STATUSES = ("queued", "running")
TERMINAL_STATUSES = ("succeeded", "failed", "cancelled")
SWEEP_BATCH = 500


def new_owner() -> str:
    """A lease owner id: unique per claim on any host or container; host and pid only help people."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex}"


@dataclass
class JobRecord:
    job_id: str
    classifier_id: str
    tenant: str
    status: str = "queued"
    progress: dict[str, Any] | None = None
    warnings: list[str] | None = None
    error: dict[str, str] | None = None
    created_at: float = 0.0
    enqueued_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    updated_at: float = 0.0
    attempts: int = 0
    sends: int = 1
    resend_at: float = 0.0
    lease_owner: str | None = None
    lease_expires_at: float | None = None
    cancel_requested: bool = False

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_row(cls, row) -> "JobRecord":
        m = row._mapping
        return cls(job_id=m["id"], **{f.name: m[f.name] for f in dataclasses.fields(cls) if f.name != "job_id"})


_COLUMNS = [jobs.c.id] + [jobs.c[f.name] for f in dataclasses.fields(JobRecord) if f.name != "job_id"]


def worker_lost_error(attempts: int, max_attempts: int) -> dict[str, str]:
    return {"code": "worker_lost",
            "message": f"the worker running this job stopped {attempts} time(s) (crash, kill or out of memory); "
                       f"giving up after {max_attempts} attempts"}


# ---------------------------------------------------------------- helpers
def _bump(conn: Connection, old: str | None, new: str | None, n: int = 1) -> None:
    """Move ``n`` jobs between status counters (in a fixed order, so concurrent transitions never deadlock)."""
    if old == new or n == 0:
        return
    deltas = {}
    if old is not None:
        deltas[old] = -n
    if new is not None:
        deltas[new] = deltas.get(new, 0) + n
    for status in sorted(deltas):
        conn.execute(update(job_counts).where(job_counts.c.status == status)
                     .values(n=job_counts.c.n + deltas[status]))


def get(conn: Connection, job_id: str, tenant: str | None = None) -> JobRecord | None:
    query = select(*_COLUMNS).where(jobs.c.id == job_id)
    if tenant is not None:
        query = query.where(jobs.c.tenant == tenant)
    row = conn.execute(query).first()
    return None if row is None else JobRecord.from_row(row)


def insert(conn: Connection, job_id: str, classifier_id: str, tenant: str, resend_s: float,
           progress: dict[str, Any] | None = None) -> None:
    """A new queued job (inside the create transaction)."""
    now = db_now()
    conn.execute(jobs.insert().values(
        id=job_id, classifier_id=classifier_id, tenant=tenant, status="queued", attempts=0, sends=1,
        cancel_requested=False, created_at=now, enqueued_at=now, updated_at=now, resend_at=now + resend_s,
        progress=progress))
    _bump(conn, None, "queued")


def holds(conn: Connection, job_id: str, owner: str) -> bool:
    """Whether ``owner`` runs the job under its lease (read inside the caller's transaction)."""
    return conn.execute(select(jobs.c.id).where(jobs.c.id == job_id, jobs.c.status == "running",
                                                 jobs.c.lease_owner == owner)).first() is not None


def count_queued(conn: Connection) -> int:
    """Every queued job (an index range on (status, resend_at))."""
    return int(conn.execute(select(func.count()).select_from(jobs).where(jobs.c.status == "queued")).scalar_one())


def count_active(conn: Connection, tenant: str) -> int:
    """A tenant's queued + running jobs (an index range, bounded by the quota)."""
    return int(conn.execute(select(func.count()).select_from(jobs).where(
        jobs.c.tenant == tenant, jobs.c.status.in_(ACTIVE_STATUSES))).scalar_one())


def delete_for_classifier(conn: Connection, job_id: str) -> None:
    row = conn.execute(select(jobs.c.status).where(jobs.c.id == job_id)).first()
    if row is None:
        return
    if conn.execute(delete(jobs).where(jobs.c.id == job_id, jobs.c.status == row.status)).rowcount:
        _bump(conn, row.status, None)


def counts(db: Database) -> dict[str, int]:
    with db.read() as conn:
        found = {r.status: int(r.n) for r in conn.execute(select(job_counts.c.status, job_counts.c.n))}
    return {s: found.get(s, 0) for s in JOB_STATUSES}


def recount(conn: Connection) -> None:
    """Rebuild job_counts from the jobs (after a bulk import; a full count, so never on a request path)."""
    found = {r.status: int(r.n) for r in conn.execute(
        select(jobs.c.status, func.count().label("n")).group_by(jobs.c.status))}
    for status in JOB_STATUSES:
        conn.execute(update(job_counts).where(job_counts.c.status == status).values(n=found.get(status, 0)))


# ---------------------------------------------------------------- worker transitions
def claim(db: Database, job_id: str, owner: str, lease_s: float, max_attempts: int
          ) -> tuple[str, JobRecord | None]:
    """Take the job unless someone live holds it. Returns (outcome, record):
    run (it is ours now) | done (finished or cancelled) | held (a live lease) | failed (attempts used up) | missing.
    """
    now = db_now()
    runnable = and_(jobs.c.id == job_id, jobs.c.cancel_requested.is_(False), jobs.c.attempts < max_attempts)
    take = dict(status="running", attempts=jobs.c.attempts + 1, lease_owner=owner, lease_expires_at=now + lease_s,
                started_at=func.coalesce(jobs.c.started_at, now), error=None, updated_at=now)
    with db.write() as conn:
        if conn.execute(update(jobs).where(runnable, jobs.c.status == "queued").values(**take)).rowcount:
            _bump(conn, "queued", "running")
            return "run", get(conn, job_id)
        if conn.execute(update(jobs).where(runnable, jobs.c.status == "running", jobs.c.lease_expires_at < now)
                        .values(**take)).rowcount:
            return "run", get(conn, job_id)
        job = get(conn, job_id)
        if job is None:
            return "missing", None
        if job.is_terminal:
            return "done", job
        stale = and_(jobs.c.id == job_id, jobs.c.status == job.status)
        if job.status == "running":
            stale = and_(stale, jobs.c.lease_expires_at < now)
        if job.cancel_requested:
            end = dict(status="cancelled", finished_at=now, lease_owner=None, lease_expires_at=None, updated_at=now)
            outcome = "done"
        elif job.attempts >= max_attempts:
            end = dict(status="failed", finished_at=now, lease_owner=None, lease_expires_at=None, updated_at=now,
                       error=worker_lost_error(job.attempts, max_attempts))
            outcome = "failed"
        else:
            return "held", job
        if not conn.execute(update(jobs).where(stale).values(**end)).rowcount:
            return "held", get(conn, job_id)
        _bump(conn, job.status, end["status"])
        return outcome, get(conn, job_id)


def heartbeat(db: Database, job_id: str, owner: str, lease_s: float, attempt: int | None = None) -> str:
    """Renew our lease. Returns ok | cancelled (asked to stop) | lease_lost (someone took over) | deleted.

    With ``attempt`` (the job's attempts when we claimed it), a lease that expired while we could not renew it
    (a database stall) and that the sweep re-queued is taken back, as long as no one claimed the job since:
    the work done so far is not thrown away. A worker that claims it later finds it held and leaves it.
    """
    now = db_now()
    with db.write() as conn:
        row = conn.execute(update(jobs).where(jobs.c.id == job_id, jobs.c.status == "running",
                                              jobs.c.lease_owner == owner)
                           .values(lease_expires_at=now + lease_s, updated_at=now)
                           .returning(jobs.c.cancel_requested)).first()
        if row is not None:
            return "cancelled" if row.cancel_requested else "ok"
        if attempt is not None and conn.execute(update(jobs).where(
                jobs.c.id == job_id, jobs.c.status == "queued", jobs.c.lease_owner.is_(None),
                jobs.c.attempts == attempt, jobs.c.cancel_requested.is_(False))
                .values(status="running", lease_owner=owner, lease_expires_at=now + lease_s,
                        updated_at=now)).rowcount:
            _bump(conn, "queued", "running")
            return "ok"
        exists = conn.execute(select(jobs.c.id).where(jobs.c.id == job_id)).first()
        return "lease_lost" if exists else "deleted"


def set_progress(db: Database, job_id: str, owner: str, progress: dict[str, Any],
                 warnings: list[str] | None = None) -> bool:
    values: dict[str, Any] = {"progress": progress, "updated_at": db_now()}
    if warnings is not None:
        values["warnings"] = warnings
    with db.write() as conn:
        return bool(conn.execute(update(jobs).where(jobs.c.id == job_id, jobs.c.status == "running",
                                                    jobs.c.lease_owner == owner).values(**values)).rowcount)


def finish_in(conn: Connection, job_id: str, owner: str, status: str, error: dict[str, str] | None = None,
              progress: dict[str, Any] | None = None) -> bool:
    """End our running job (inside a caller's transaction, e.g. together with a publish)."""
    assert status in TERMINAL_STATUSES
    now = db_now()
    values: dict[str, Any] = dict(status=status, error=error, finished_at=now, lease_owner=None,
                                  lease_expires_at=None, updated_at=now)
    if progress is not None:
        values["progress"] = progress
    done = conn.execute(update(jobs).where(jobs.c.id == job_id, jobs.c.status == "running",
                                           jobs.c.lease_owner == owner).values(**values)).rowcount
    if done:
        _bump(conn, "running", status)
    return bool(done)


def finish(db: Database, job_id: str, owner: str, status: str, error: dict[str, str] | None = None,
           progress: dict[str, Any] | None = None) -> bool:
    """End our running job; False when it is no longer ours (someone else's outcome stands)."""
    with db.write() as conn:
        return finish_in(conn, job_id, owner, status, error, progress)


# ---------------------------------------------------------------- API transitions
def request_cancel(db: Database, job_id: str, tenant: str | None = None) -> JobRecord | None:
    """A queued job ends now; a running one is asked to stop (its worker ends it within seconds)."""
    now = db_now()
    scope = [jobs.c.id == job_id] + ([jobs.c.tenant == tenant] if tenant is not None else [])
    with db.write() as conn:
        if conn.execute(update(jobs).where(*scope, jobs.c.status == "queued").values(
                status="cancelled", cancel_requested=True, finished_at=now, updated_at=now)).rowcount:
            _bump(conn, "queued", "cancelled")
        else:
            conn.execute(update(jobs).where(*scope, jobs.c.status == "running", jobs.c.cancel_requested.is_(False))
                         .values(cancel_requested=True, updated_at=now))
        return get(conn, job_id, tenant)


# ---------------------------------------------------------------- the sweep
def resend_delay(sends: int, base_s: float, max_s: float = 600.0) -> float:
    """How long a queued job waits for a worker before its message is sent again: base, 2x, 4x ... max."""
    return min(max_s, base_s * (2 ** max(0, sends - 1)))


def sweep(db: Database, max_attempts: int, resend_s: float, resend_limit: int | None = None
          ) -> tuple[dict[str, int], list[str]]:
    """Recover expired leases and lost messages (at most ``resend_limit`` of those, the longest waiting first).
    Returns (counts, job ids to send to the broker).

    Both queries are index ranges ((status, lease_expires_at) and (status, resend_at)) over the jobs that
    need action, so the cost does not grow with the number of jobs ever stored.
    """
    result = {"requeued": 0, "failed": 0, "cancelled": 0, "resent": 0}
    send: list[str] = []
    with db.read() as conn:
        # The database's time as a plain value: an index bound (a volatile clock function in the WHERE clause
        # would be evaluated row by row instead).
        now = float(conn.execute(select(db_now())).scalar_one())
        expired = conn.execute(select(jobs.c.id, jobs.c.lease_owner, jobs.c.attempts, jobs.c.cancel_requested)
                               .where(jobs.c.status == "running", jobs.c.lease_expires_at < now)
                               .limit(SWEEP_BATCH)).all()
        limit = SWEEP_BATCH if resend_limit is None else min(SWEEP_BATCH, resend_limit)
        forgotten = conn.execute(select(jobs.c.id, jobs.c.sends)
                                 .where(jobs.c.status == "queued", jobs.c.resend_at < now)
                                 .order_by(jobs.c.resend_at).limit(limit)).all() if limit > 0 else []
    for row in expired:
        now = db_now()
        same = and_(jobs.c.id == row.id, jobs.c.status == "running", jobs.c.lease_expires_at < now,
                    jobs.c.lease_owner.is_(None) if row.lease_owner is None else jobs.c.lease_owner == row.lease_owner)
        gone = dict(lease_owner=None, lease_expires_at=None, updated_at=now)
        if row.cancel_requested:
            outcome, values = "cancelled", dict(gone, status="cancelled", finished_at=now)
        elif row.attempts >= max_attempts:
            outcome, values = "failed", dict(gone, status="failed", finished_at=now,
                                             error=worker_lost_error(row.attempts, max_attempts))
        else:
            outcome, values = "requeued", dict(gone, status="queued", enqueued_at=now, sends=jobs.c.sends + 1,
                                               resend_at=now + resend_s)
        with db.write() as conn:
            if conn.execute(update(jobs).where(same).values(**values)).rowcount:
                _bump(conn, "running", values["status"])
                result[outcome] += 1
                if outcome == "requeued":
                    send.append(row.id)
    for row in forgotten:
        now = db_now()
        with db.write() as conn:
            if conn.execute(update(jobs).where(jobs.c.id == row.id, jobs.c.status == "queued",
                                               jobs.c.resend_at < now, jobs.c.sends == row.sends)
                            .values(sends=row.sends + 1, enqueued_at=now,
                                    resend_at=now + resend_delay(row.sends + 1, resend_s))).rowcount:
                result["resent"] += 1
                send.append(row.id)
    return result, send


def prune(db: Database, retention_s: float, batch: int = 500) -> int:
    """Delete succeeded jobs finished more than ``retention_s`` ago (their classifier's version stays).

    At most ``batch`` per call, so a sweep stays short while a backlog (after an upgrade) drains.

    Failed and cancelled jobs are kept while their classifier exists: they are its only explanation.
    """
    with db.read() as conn:  # an index range on (status, finished_at); an empty one costs nothing
        cutoff = float(conn.execute(select(db_now())).scalar_one()) - retention_s
        ids = conn.execute(select(jobs.c.id).where(jobs.c.status == "succeeded", jobs.c.finished_at < cutoff)
                           .limit(batch)).scalars().all()
    if not ids:
        return 0
    with db.write() as conn:  # by primary key (a sub-select here made PostgreSQL scan the whole table)
        removed = conn.execute(delete(jobs).where(jobs.c.id.in_(ids), jobs.c.status == "succeeded")).rowcount
        _bump(conn, "succeeded", None, removed)
    return removed
