"""The embedded broker (kombu's SQLAlchemy transport over SQLite), made to let go of its connection on errors.

kombu's channel keeps one session for its life and does not roll it back when a commit fails: on a full disk
each failed ``_get`` left a connection checked out, holding SQLite's write lock (``BEGIN IMMEDIATE``), and the
consumer reconnected until the pool ran dry (``QueuePool limit of size 5 overflow 10 reached``) and the worker
exited, to be restarted in a loop. Here a failed operation rolls back and drops its session (the next one opens
a fresh one), and closing a channel closes its session, so the consumer just retries until space returns.

The transport has no push: an idle consumer polls the queue table, by default every second, so a job sent just
after a poll waited up to a second (half on average) before its worker saw it, the largest part of the time
from a create to its first preview. It polls every ``POLL_INTERVAL_S`` instead. kombu's poll (two ORM queries
under SQLite's write lock, ~1 ms of CPU) would then cost an idle worker ~2% of a core, so a poll first peeks
with one plain read-only SELECT on its own sqlite3 connection, and takes the ORM path only when a message may
be waiting (a peek that fails or misses a message just defers it to the next poll; kombu's ``_get`` decides).
"""
from __future__ import annotations

import contextlib
import sqlite3
from queue import Empty

from kombu.transport import TRANSPORT_ALIASES
from kombu.transport import sqlalchemy as sqla

ALIAS = "rmtsqla"
POLL_INTERVAL_S = 0.1


class Channel(sqla.Channel):
    _peek_db: sqlite3.Connection | None = None
    _peek_off = False  # not SQLite (the embedded broker always is): every poll takes kombu's path

    def _drop_session(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            with contextlib.suppress(Exception):  # the connection may be unusable: closing is what matters
                session.rollback()
            with contextlib.suppress(Exception):
                session.close()

    def _guarded(self, operation, *args, **kwargs):
        try:
            return operation(*args, **kwargs)
        except Exception:
            self._drop_session()
            raise

    def _get(self, queue):
        if not self._may_hold(queue):
            raise Empty()
        return self._guarded(super()._get, queue)

    def _may_hold(self, queue) -> bool:
        """False only when a plain read of the broker file finds no visible message on ``queue``."""
        if self._peek_off:
            return True
        try:
            if self._peek_db is None:
                bind = self.session.bind
                if bind.dialect.name != "sqlite" or not bind.url.database:
                    self._peek_off = True
                    return True
                self._peek_db = sqlite3.connect(bind.url.database, timeout=1.0, isolation_level=None,
                                                check_same_thread=False)
            row = self._peek_db.execute(
                f"SELECT 1 FROM {self.message_tablename} m JOIN {self.queue_tablename} q ON m.queue_id = q.id "
                "WHERE q.name = ? AND m.visible != 0 LIMIT 1", (queue,)).fetchone()
            return row is not None
        except Exception:  # locked, missing table, ...: kombu's path knows what to do
            self._close_peek()
            return True

    def _close_peek(self) -> None:
        peek, self._peek_db = self._peek_db, None
        if peek is not None:
            with contextlib.suppress(Exception):
                peek.close()

    def _put(self, queue, payload, **kwargs):
        return self._guarded(super()._put, queue, payload, **kwargs)

    def _purge(self, queue):
        return self._guarded(super()._purge, queue)

    def _size(self, queue):
        return self._guarded(super()._size, queue)

    def _new_queue(self, queue, **kwargs):
        return self._guarded(super()._new_queue, queue, **kwargs)

    def close(self) -> None:
        self._close_peek()
        self._drop_session()
        super().close()


class Transport(sqla.Transport):
    Channel = Channel
    # A class attribute, not a transport option: kombu hands this transport's options to create_engine.
    polling_interval = POLL_INTERVAL_S


def register() -> None:
    """Make ``rmtsqla+<sqlalchemy url>`` broker URLs use this transport."""
    TRANSPORT_ALIASES.setdefault(ALIAS, f"{__name__}:Transport")


def broker_url(url: str) -> str:
    """The URL Celery gets: the embedded SQL broker through this transport, any other broker as it is."""
    if url.startswith("sqla+"):
        register()
        return f"{ALIAS}+{url[len('sqla+'):]}"
    return url
