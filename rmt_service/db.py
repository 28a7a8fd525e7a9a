"""The records database: SQLAlchemy 2 tables, the engine, transactions, and the database clock.

SQLite (a file in the data dir) for the embedded ``rmt serve``; PostgreSQL at scale. Every mutable
fact lives here; files are immutable blobs (rmt_service.blobs) that rows point to by key.

Times are float seconds since the epoch, taken from the *database's* clock (``db_now()``) wherever
two processes compare them (leases, re-sends, retention), so hosts with skewed clocks agree.
"""
from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from sqlalchemy import (JSON, BigInteger, Boolean, Float, ForeignKey, Index, Integer, MetaData, String, Text,
                        create_engine, event)
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.sql.expression import FunctionElement

log = logging.getLogger(__name__)

NAMING = {"ix": "ix_%(table_name)s_%(column_0_N_name)s", "uq": "uq_%(table_name)s_%(column_0_N_name)s",
          "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s", "pk": "pk_%(table_name)s"}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Tenant(Base):
    """A tenant's quota and its counters (the row create locks, so quota check + create are one step)."""
    __tablename__ = "tenants"
    tenant: Mapped[str] = mapped_column(String(200), primary_key=True)
    max_active_jobs: Mapped[int | None] = mapped_column(Integer, nullable=True)  # None = the service default
    n_classifiers: Mapped[int] = mapped_column(BigInteger, default=0, nullable=False)
    created_at: Mapped[float] = mapped_column(Float, nullable=False)


class Classifier(Base):
    __tablename__ = "classifiers"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(200), nullable=False)
    name: Mapped[str] = mapped_column(Text, nullable=False, default="")
    labels: Mapped[list] = mapped_column(JSON, nullable=False)
    config: Mapped[dict] = mapped_column(JSON, nullable=False)
    n_images: Mapped[int] = mapped_column(Integer, nullable=False)
    created_at: Mapped[float] = mapped_column(Float, nullable=False)
    job_id: Mapped[str] = mapped_column(String(40), nullable=False)
    current_version_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    __table_args__ = (Index("ix_classifiers_tenant_created", "tenant", "created_at", "id"),)


class ClassifierVersion(Base):
    """A published artifact directory (immutable blob) of a classifier: a preview or the final one."""
    __tablename__ = "classifier_versions"
    version_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    classifier_id: Mapped[str] = mapped_column(String(40), ForeignKey("classifiers.id", ondelete="CASCADE"),
                                               nullable=False)
    candidate: Mapped[str] = mapped_column(String(40), nullable=False, default="")
    final: Mapped[bool] = mapped_column(Boolean, nullable=False, default=True)
    blob_key: Mapped[str] = mapped_column(String(300), nullable=False)
    base_id: Mapped[str | None] = mapped_column(String(200), nullable=True)
    manifest: Mapped[dict] = mapped_column(JSON, nullable=False)
    files: Mapped[list] = mapped_column(JSON, nullable=False)
    created_at: Mapped[float] = mapped_column(Float, nullable=False)
    # what made it (rmt_service.versions.SOURCES), from which version, and from which uploads (their idx;
    # None: the classifier's first n_images uploads, i.e. what the build job had)
    source: Mapped[str] = mapped_column(String(20), nullable=False, default="build", server_default="build")
    parent_version_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    samples: Mapped[list | None] = mapped_column(JSON(none_as_null=True), nullable=True)
    __table_args__ = (Index("ix_versions_classifier", "classifier_id", "created_at"),
                      Index("ix_versions_base", "base_id"))


class Job(Base):
    __tablename__ = "jobs"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    classifier_id: Mapped[str] = mapped_column(String(40), nullable=False)
    tenant: Mapped[str] = mapped_column(String(200), nullable=False)
    status: Mapped[str] = mapped_column(String(16), nullable=False)
    progress: Mapped[dict | None] = mapped_column(JSON(none_as_null=True), nullable=True)
    warnings: Mapped[list | None] = mapped_column(JSON(none_as_null=True), nullable=True)
    error: Mapped[dict | None] = mapped_column(JSON(none_as_null=True), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    sends: Mapped[int] = mapped_column(Integer, nullable=False, default=1)  # broker messages sent for it
    resend_at: Mapped[float] = mapped_column(Float, nullable=False)  # queued and not started by then: send again
    lease_owner: Mapped[str | None] = mapped_column(String(200), nullable=True)
    lease_expires_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    created_at: Mapped[float] = mapped_column(Float, nullable=False)
    enqueued_at: Mapped[float] = mapped_column(Float, nullable=False)
    started_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    updated_at: Mapped[float] = mapped_column(Float, nullable=False)
    # build: the classifier's first build; update: a new version from the serving one (spec says how)
    kind: Mapped[str] = mapped_column(String(20), nullable=False, default="build", server_default="build")
    spec: Mapped[dict | None] = mapped_column(JSON(none_as_null=True), nullable=True)
    __table_args__ = (
        Index("ix_jobs_tenant_status", "tenant", "status"),           # quota: a tenant's active jobs
        Index("ix_jobs_status_lease", "status", "lease_expires_at"),  # sweep: expired leases
        Index("ix_jobs_status_resend", "status", "resend_at"),        # sweep: queued jobs whose message was lost
        Index("ix_jobs_status_finished", "status", "finished_at"),    # retention
        Index("ix_jobs_tenant_created", "tenant", "created_at", "id"),
        Index("ix_jobs_classifier", "classifier_id"),
    )


class JobCount(Base):
    """Jobs per status, kept by the state machine in the same transaction as each transition (/metrics)."""
    __tablename__ = "job_counts"
    status: Mapped[str] = mapped_column(String(16), primary_key=True)
    n: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)


class Upload(Base):
    __tablename__ = "uploads"
    classifier_id: Mapped[str] = mapped_column(String(40), ForeignKey("classifiers.id", ondelete="CASCADE"),
                                               primary_key=True)
    idx: Mapped[int] = mapped_column(Integer, primary_key=True)
    blob_key: Mapped[str] = mapped_column(String(300), nullable=False)
    label: Mapped[str] = mapped_column(Text, nullable=False)
    original_name: Mapped[str] = mapped_column(Text, nullable=False, default="")
    # content address of the image: an image added again (an update, a feedback) reuses its row and blob
    sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    __table_args__ = (Index("ix_uploads_classifier_sha256", "classifier_id", "sha256"),)


class Feedback(Base):
    """An image classify got wrong, with the right label: used only by an update that asks for it."""
    __tablename__ = "feedback"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    classifier_id: Mapped[str] = mapped_column(String(40), ForeignKey("classifiers.id", ondelete="CASCADE"),
                                               nullable=False)
    blob_key: Mapped[str] = mapped_column(String(300), nullable=False)
    sha256: Mapped[str] = mapped_column(String(64), nullable=False)
    label: Mapped[str] = mapped_column(Text, nullable=False)
    prediction: Mapped[str | None] = mapped_column(Text, nullable=True)
    version_id: Mapped[str | None] = mapped_column(String(40), nullable=True)  # the version that answered
    created_at: Mapped[float] = mapped_column(Float, nullable=False)
    __table_args__ = (Index("ix_feedback_classifier_created", "classifier_id", "created_at"),)


class BaseModel(Base):
    """A shared frozen encoder (one backbone + weights), exported once; versions refer to it by base_id."""
    __tablename__ = "bases"
    base_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    backbone: Mapped[str] = mapped_column(String(200), nullable=False, default="")
    pretrained: Mapped[str] = mapped_column(Text, nullable=False, default="")
    blob_key: Mapped[str] = mapped_column(String(300), nullable=False)
    created_at: Mapped[float] = mapped_column(Float, nullable=False)


classifiers = Classifier.__table__
versions = ClassifierVersion.__table__
jobs = Job.__table__
job_counts = JobCount.__table__
uploads = Upload.__table__
tenants = Tenant.__table__
bases = BaseModel.__table__
feedback = Feedback.__table__


# ---------------------------------------------------------------- the database clock
class db_now(FunctionElement):
    """Seconds since the epoch on the database server's clock, as a float (one clock for every host)."""
    type = Float()
    inherit_cache = True


@compiles(db_now, "postgresql")
def _pg_now(element, compiler, **kw) -> str:
    return "CAST(EXTRACT(EPOCH FROM statement_timestamp()) AS DOUBLE PRECISION)"  # stable within a statement


@compiles(db_now, "sqlite")
def _sqlite_now(element, compiler, **kw) -> str:
    return "((julianday('now') - 2440587.5) * 86400.0)"


@compiles(db_now)
def _default_now(element, compiler, **kw) -> str:
    return "CAST(EXTRACT(EPOCH FROM CURRENT_TIMESTAMP) AS DOUBLE PRECISION)"


# ---------------------------------------------------------------- engine and transactions
class Database:
    """An engine plus the two kinds of transaction the store uses: read and write.

    On SQLite a write transaction starts with ``BEGIN IMMEDIATE`` (takes the write lock up front, so a
    read-then-write such as the quota check cannot be overtaken by another process); readers never block
    writers (WAL). On PostgreSQL writes use row locks / conditional updates under READ COMMITTED.
    """

    def __init__(self, url: str, echo: bool = False, pool_size: int = 5, lock_timeout_s: float = 5.0):
        self.url = url
        self.engine = make_engine(url, echo=echo, pool_size=pool_size, lock_timeout_s=lock_timeout_s)
        self.lock_timeout_ms = lock_timeout_ms(lock_timeout_s)
        self.dialect = self.engine.dialect.name
        self._stamp_lock = threading.Lock()
        self._stamp_conn: sqlite3.Connection | None = None
        path = sqlite_file(url)
        self._stamp_path = path if path and not path.startswith("file:") else None

    def change_stamp(self) -> int | None:
        """A number that differs from the one before whenever any connection, of this process or another,
        has committed to the database since: SQLite's ``PRAGMA data_version``, read on a connection of its own
        that never writes (a few microseconds). None where there is no such number (PostgreSQL, an in-memory
        SQLite): callers then read the records. Read it *before* the records it vouches for: a commit between
        the two makes the next stamp differ, so nothing older than a commit is ever taken as current."""
        if self._stamp_path is None:
            return None
        with self._stamp_lock:
            try:
                if self._stamp_conn is None:
                    self._stamp_conn = sqlite3.connect(self._stamp_path, check_same_thread=False,
                                                       isolation_level=None)
                return int(self._stamp_conn.execute("PRAGMA data_version").fetchone()[0])
            except sqlite3.Error:  # the file went away or cannot be read: no stamp, so nobody trusts a copy
                log.warning("SQLite change stamp unavailable", exc_info=True)
                self._close_stamp()
                return None

    def _close_stamp(self) -> None:
        conn, self._stamp_conn = self._stamp_conn, None
        if conn is not None:
            conn.close()

    @property
    def is_sqlite(self) -> bool:
        return self.dialect == "sqlite"

    @contextlib.contextmanager
    def sqlite_lock_wait(self, conn: Connection, wait_ms: int) -> Iterator[None]:
        """SQLite: ``conn`` waits up to ``wait_ms`` for the file's locks inside the block, then goes back to the
        engine's own timeout before the pooled connection serves anyone else. Set on the driver's connection
        (through SQLAlchemy a PRAGMA would begin a transaction). Nothing on PostgreSQL."""
        driver = conn.connection.driver_connection if self.is_sqlite else None
        if driver is None:
            yield
            return
        driver.execute(f"PRAGMA busy_timeout={wait_ms}")
        try:
            yield
        finally:
            driver.execute(f"PRAGMA busy_timeout={self.lock_timeout_ms}")

    @contextlib.contextmanager
    def write(self) -> Iterator[Connection]:
        with self.engine.connect() as conn:
            conn = conn.execution_options(rmt_immediate=True)
            with conn.begin():
                yield conn

    @contextlib.contextmanager
    def read(self) -> Iterator[Connection]:
        with self.engine.connect() as conn:
            with conn.begin():
                yield conn

    def now(self) -> float:
        with self.read() as conn:
            return float(conn.execute(db_now().select()).scalar_one())

    def dispose(self) -> None:
        with self._stamp_lock:
            self._close_stamp()
        self.engine.dispose()


def sqlite_file(url: str) -> str | None:
    """The database file of a SQLite URL (as written after ``///``), None for in-memory or non-SQLite URLs."""
    if not url.startswith("sqlite") or "///" not in url:
        return None
    path = url.split("///", 1)[1]
    return path if path and path != ":memory:" else None


def lock_timeout_ms(seconds: float) -> int:
    """A lock timeout in whole milliseconds, at least 1 (0 would mean "wait forever" to PostgreSQL)."""
    return max(1, int(seconds * 1000))


def use_wal(cursor: Any, timeout_s: float) -> None:
    """Put the SQLite file in WAL mode (kept in the file: later connections find it there). Switching a new
    file's journal mode takes its exclusive lock, and SQLite answers "database is locked" at once, without
    its busy handler, to a connection that asks while another one is switching: replicas that migrate a new
    file together failed ~1 start in 400 on a loaded machine (tests/service/test_store.py). The switch is
    idempotent, so it is retried until ``timeout_s``, the connection's own lock timeout."""
    deadline = time.monotonic() + timeout_s
    delay = 0.005
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
        time.sleep(delay)
        delay = min(2 * delay, 0.1)


def make_engine(url: str, echo: bool = False, pool_size: int = 5, lock_timeout_s: float = 5.0) -> Engine:
    """An engine on which no statement waits for a lock longer than ``lock_timeout_s``: a process frozen
    while holding one (SIGSTOP, a hung host) delays the others that long at most, then they get an error
    (the API answers 503, retryable) instead of hanging a thread."""
    lock_ms = lock_timeout_ms(lock_timeout_s)
    if url.startswith("sqlite"):
        path = sqlite_file(url)
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        # Every connection the pool opens is kept (the same cap of pool_size + 20 at once): an overflow connection
        # was closed at check-in, so a burst of more than pool_size concurrent reads (16 classify requests
        # arriving together) opened and closed a connection, with its four PRAGMAs, per read. A kept SQLite
        # connection is a file handle and its page cache (bench/RESULTS-multitenant.md: 16 concurrent classify
        # requests, in process, 4.34 -> 3.60 ms CPU each).
        engine = create_engine(url, echo=echo, connect_args={"timeout": lock_timeout_s, "check_same_thread": False},
                               pool_size=pool_size + 20, max_overflow=0, pool_pre_ping=False)

        @event.listens_for(engine, "connect")
        def _sqlite_connect(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None  # SQLAlchemy's begin event emits BEGIN itself
            cursor = dbapi_conn.cursor()
            use_wal(cursor, lock_timeout_s)
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute(f"PRAGMA busy_timeout={lock_ms}")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Connection) -> None:
            immediate = conn.get_execution_options().get("rmt_immediate")
            conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

        return engine
    connect_args: dict[str, Any] = {}
    if url.startswith("postgresql"):
        # The server also ends a transaction left idle (its client frozen) and caps any statement. Options
        # already in the URL (e.g. a search_path) are kept.
        parsed = make_url(url)
        options = " ".join(filter(None, [parsed.query.get("options", ""), f"-c lock_timeout={lock_ms}",
                                         *PG_SESSION_OPTIONS]))
        # client_encoding: a cluster created without a UTF-8 locale (SQL_ASCII) otherwise hands text back as
        # bytes, which SQLAlchemy's own version probe cannot read (seen with a Debian-built server in compose).
        connect_args = {"connect_timeout": 5, "options": options, "client_encoding": "utf8"}
    return create_engine(url, echo=echo, pool_pre_ping=True, pool_size=pool_size, max_overflow=10,
                         connect_args=connect_args)


PG_SESSION_OPTIONS = ("-c statement_timeout=60000", "-c idle_in_transaction_session_timeout=60000")
