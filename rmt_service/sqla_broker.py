"""The embedded broker (kombu's SQLAlchemy transport over SQLite), made to let go of its connection on errors.

kombu's channel keeps one session for its life and does not roll it back when a commit fails: on a full disk
each failed ``_get`` left a connection checked out, holding SQLite's write lock (``BEGIN IMMEDIATE``), and the
consumer reconnected until the pool ran dry (``QueuePool limit of size 5 overflow 10 reached``) and the worker
exited, to be restarted in a loop. Here a failed operation rolls back and drops its session (the next one opens
a fresh one), and closing a channel closes its session, so the consumer just retries until space returns.
"""
from __future__ import annotations

import contextlib

from kombu.transport import TRANSPORT_ALIASES
from kombu.transport import sqlalchemy as sqla

ALIAS = "rmtsqla"


class Channel(sqla.Channel):
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
        return self._guarded(super()._get, queue)

    def _put(self, queue, payload, **kwargs):
        return self._guarded(super()._put, queue, payload, **kwargs)

    def _purge(self, queue):
        return self._guarded(super()._purge, queue)

    def _size(self, queue):
        return self._guarded(super()._size, queue)

    def _new_queue(self, queue, **kwargs):
        return self._guarded(super()._new_queue, queue, **kwargs)

    def close(self) -> None:
        self._drop_session()
        super().close()


class Transport(sqla.Transport):
    Channel = Channel


def register() -> None:
    """Make ``rmtsqla+<sqlalchemy url>`` broker URLs use this transport."""
    TRANSPORT_ALIASES.setdefault(ALIAS, f"{__name__}:Transport")


def broker_url(url: str) -> str:
    """The URL Celery gets: the embedded SQL broker through this transport, any other broker as it is."""
    if url.startswith("sqla+"):
        register()
        return f"{ALIAS}+{url[len('sqla+'):]}"
    return url
