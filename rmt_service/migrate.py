"""Schema migrations (Alembic, run programmatically) and the one-time import of a file-store data dir.

``rmt migrate`` (compose's one-shot ``migrate`` service) and the API at start call ``prepare(settings)``.
On PostgreSQL the work runs under a session advisory lock, so replicas starting together migrate once
and the others wait, then find the schema at head. On SQLite the migration runs inside one
``BEGIN IMMEDIATE`` transaction, which serialises the processes sharing the file the same way.
Workers never migrate: they wait until the schema is at head (``wait_until_ready``).
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import time
from pathlib import Path
from typing import Iterator

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.engine import Connection

from .db import Database
from .settings import Settings

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
ADVISORY_LOCK_KEY = 0x524D545F4442  # "RMT_DB": one lock id for every process of this service


def _config(conn: Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    if conn is not None:
        cfg.attributes["connection"] = conn
    return cfg


def head_revision() -> str:
    return ScriptDirectory.from_config(_config()).get_current_head()


def current_revision(db: Database) -> str | None:
    with db.engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


@contextlib.contextmanager
def service_lock(db: Database) -> Iterator[None]:
    """PostgreSQL: hold the service-wide advisory lock (on its own connection) for the block."""
    if db.dialect != "postgresql":
        yield
        return
    with db.engine.connect() as conn:
        conn.execute(text("SET lock_timeout = 0"))  # wait as long as another replica migrates
        conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": ADVISORY_LOCK_KEY})
        conn.commit()
        try:
            yield
        finally:
            conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": ADVISORY_LOCK_KEY})
            conn.commit()


# SQLite: how long a migrator waits for the file's write lock while another process migrates (PostgreSQL's
# advisory lock waits without limit). The engine's own lock timeout (5 s) is for requests, which should
# fail fast; four replicas starting together on a loaded machine queue behind one migration for longer.
SQLITE_MIGRATION_WAIT_MS = 600_000


def _upgrade(db: Database) -> str:
    head = head_revision()
    with db.engine.connect() as conn, db.sqlite_lock_wait(conn, SQLITE_MIGRATION_WAIT_MS):
        conn = conn.execution_options(rmt_immediate=True)  # SQLite: BEGIN IMMEDIATE serialises migrators
        with conn.begin():
            if db.dialect == "postgresql":
                conn.execute(text("SET LOCAL statement_timeout = 0"))  # a migration may take long
            current = MigrationContext.configure(conn).get_current_revision()
            if current != head:
                log.info("migrating the records database from %s to %s", current or "empty", head)
                command.upgrade(_config(conn), "head")
    return head


def upgrade_database(url_or_db: str | Database) -> str:
    """Bring the schema to head (a no-op when it is there already). Returns the revision."""
    db = Database(url_or_db) if isinstance(url_or_db, str) else url_or_db
    try:
        with service_lock(db):
            return _upgrade(db)
    finally:
        if isinstance(url_or_db, str):
            db.dispose()


def wait_until_ready(db: Database, timeout_s: float = 120.0) -> None:
    """Block until the schema is at head (someone else migrates); raise RuntimeError after ``timeout_s``."""
    head = head_revision()
    deadline = time.monotonic() + timeout_s
    delay = 0.2
    while True:
        try:
            current = current_revision(db)
        except Exception as exc:  # database not up yet
            current = f"unreachable ({type(exc).__name__})"
        if current == head:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the records database is at {current!r}, not {head!r}: run `rmt migrate` "
                               "(compose's migrate service) first")
        time.sleep(delay)
        delay = min(delay * 2, 2.0)


def prepare(settings: Settings, db: Database | None = None) -> None:
    """Migrate, then import a file-store data dir left by an older version (once; under the same lock)."""
    from .legacy import import_legacy_data_dir

    own = db is None
    db = db or Database(settings.effective_database_url)
    try:
        with service_lock(db):
            _upgrade(db)
            import_legacy_data_dir(db, settings)
    finally:
        if own:
            db.dispose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rmt migrate",
                                     description="Create or upgrade the records database, then import a "
                                                 "file-store data dir from an older version (once).")
    parser.add_argument("--data-dir", default=None, help="Data directory (default: RMT_DATA_DIR).")
    parser.add_argument("--loglevel", default="info")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.loglevel.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings(**({"data_dir": args.data_dir} if args.data_dir else {}))
    prepare(settings)
    log.info("records database at %s", head_revision())
    return 0


if __name__ == "__main__":
    sys.exit(main())
