"""Session stores: where sessions live, behind one small protocol.

Pick one by URL with :func:`open_store`, or build it directly::

    from authsessions.stores import SQLiteStore, open_store

    store = open_store("sqlite:///sessions.db")      # the embedded default
    store = open_store("postgresql://app@db/app")    # shared by many app servers
    store = open_store("redis://cache:6379/0")

A new store subclasses :class:`Store` and implements its eight primitives,
each speaking only in records, token digests, session ids and times, and
a ninth, :meth:`Store.rotated_away_to`, whose default (remembering nothing)
answers a token rotated away moments ago as a revoked one, its cookie cleared::

    class DictStore(Store):
        async def get(self, token_digest, *, now):
            record = self.rows.get(token_digest)
            return record if record and record.expires_at > now else None
        ...

and proves itself by passing the conformance suite in ``tests/stores``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from authsessions._records import SessionRecord, SessionUpdate, StoreStats
from authsessions.stores._base import CreateError, DataTooLarge, Store
from authsessions.stores._url import DEFAULT_STORE_URL, open_store
from authsessions.stores.memory import MemoryStore
from authsessions.stores.sqlite import SQLiteStore

if TYPE_CHECKING:
    from authsessions.stores.postgres import PostgresStore
    from authsessions.stores.redis import RedisStore

__all__ = [
    "DEFAULT_STORE_URL",
    "CreateError",
    "DataTooLarge",
    "MemoryStore",
    "PostgresStore",
    "RedisStore",
    "SQLiteStore",
    "SessionRecord",
    "SessionUpdate",
    "Store",
    "StoreStats",
    "open_store",
]


def __getattr__(name: str) -> Any:
    # The networked stores import their drivers only when asked for.
    if name == "PostgresStore":
        from authsessions.stores.postgres import PostgresStore

        return PostgresStore
    if name == "RedisStore":
        from authsessions.stores.redis import RedisStore

        return RedisStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
