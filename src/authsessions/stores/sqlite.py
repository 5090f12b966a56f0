"""A store in a SQLite file: the embedded default, shared by the processes of one machine.

Reads run on the event loop's thread through the standard ``sqlite3`` module:
in WAL mode a reader never waits for a writer, and an indexed lookup costs a
few microseconds, far less than handing it to a thread (about 100 µs, as
aiosqlite does). Writes may wait for another process's write lock, so they
run on one dedicated writer thread with its own connection: the event loop
never blocks on a lock. The rare read that finds the database busy (WAL
recovery after a crash) is retried on the writer thread, which may wait.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from authsessions._records import SessionRecord, SessionUpdate, StoreStats, dump_json
from authsessions.stores._base import (
    CreateError,
    DataTooLarge,
    Store,
    store_unavailable,
    translate_errors,
)

__all__ = ["SQLiteStore"]

T = TypeVar("T")

TABLE = "authsessions_session"
COLUMNS = (
    "id, token_digest, user_id, ip_address, user_agent, device_name, device_type,"
    " fingerprint, data, created_at, last_active_at, expires_at"
)

# Each entry upgrades the schema by one version; PRAGMA user_version records how far a file got.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        f"""CREATE TABLE {TABLE} (
            id TEXT PRIMARY KEY,
            token_digest TEXT NOT NULL UNIQUE,
            user_id TEXT NOT NULL,
            ip_address TEXT,
            user_agent TEXT,
            device_name TEXT NOT NULL,
            device_type TEXT NOT NULL,
            fingerprint TEXT NOT NULL,
            data TEXT NOT NULL,
            created_at REAL NOT NULL,
            last_active_at REAL NOT NULL,
            expires_at REAL NOT NULL
        )""",
        f"CREATE INDEX {TABLE}_user_id ON {TABLE} (user_id, last_active_at)",
        f"CREATE INDEX {TABLE}_expires_at ON {TABLE} (expires_at)",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)

_SQLITE_BUSY_CODES = {sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED}

_SELECT_BY_DIGEST = f"SELECT {COLUMNS} FROM {TABLE} WHERE token_digest = ? AND expires_at > ?"
_SELECT_BY_USER = (
    f"SELECT {COLUMNS} FROM {TABLE} WHERE user_id = ? AND expires_at > ?"
    " ORDER BY last_active_at DESC, created_at DESC"
)
# The expired count is a range of the expires_at index; the live counts read the rows.
_COUNT_USERS_AND_EXPIRED = (
    f"SELECT (SELECT COUNT(DISTINCT user_id) FROM {TABLE} WHERE expires_at > ?1),"
    f" (SELECT COUNT(*) FROM {TABLE} WHERE expires_at <= ?1)"
)
_COUNT_BY_DEVICE_TYPE = (
    f"SELECT device_type, COUNT(*) FROM {TABLE} WHERE expires_at > ? GROUP BY device_type"
)


class SQLiteStore(Store):
    """Sessions in a SQLite database file (WAL mode), created with its schema on open.

    Several processes on one machine may share the file::

        store = SQLiteStore("/var/lib/myapp/sessions.db")

    Args:
        path: the database file; created if missing.
        timeout: seconds a write waits for another connection's lock before
            failing with ``StoreUnavailable``.
    """

    def __init__(
        self, path: str | os.PathLike[str] = "sessions.db", *, timeout: float = 5.0
    ) -> None:
        self.path = os.fspath(path)
        if self.path in ("", ":memory:") or self.path.startswith("file::memory:"):
            raise ValueError(
                "SQLiteStore needs a file so its reader and writer connections share it; "
                "use MemoryStore for an in-memory store."
            )
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout!r}.")
        self.timeout = timeout
        self._reader: sqlite3.Connection | None = None
        self._writer: sqlite3.Connection | None = None
        self._writer_thread: ThreadPoolExecutor | None = None

    def __repr__(self) -> str:
        return f"SQLiteStore({self.path!r})"

    # -- opening -------------------------------------------------------------

    async def _open(self) -> None:
        self._writer_thread = ThreadPoolExecutor(1, thread_name_prefix="authsessions-sqlite")
        try:
            await self._write(self._connect_writer)
            with translate_errors("SQLite", sqlite3.Error):
                # timeout=0: a read that meets a lock is retried on the writer thread
                # instead of blocking the event loop.
                reader = sqlite3.connect(
                    self.path, timeout=0, isolation_level=None, check_same_thread=False
                )
                reader.execute("PRAGMA query_only = ON")
            self._reader = reader
        except BaseException:
            await self._close()
            raise

    def _connect_writer(self) -> None:
        writer = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)
        try:
            _enable_wal(writer, timeout=self.timeout)
            # WAL with synchronous=NORMAL survives an app crash; only a power loss can
            # drop the last commits, which for sessions means signing in again.
            writer.execute("PRAGMA synchronous = NORMAL")
            _migrate(writer)
        except BaseException:
            writer.close()
            raise
        self._writer = writer

    async def _close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        pool, self._writer_thread = self._writer_thread, None
        if pool is not None:
            if self._writer is not None:
                await asyncio.get_running_loop().run_in_executor(pool, self._writer.close)
                self._writer = None
            pool.shutdown(wait=False)

    # -- reads, on the event loop -------------------------------------------

    async def get(self, token_digest: str, *, now: float) -> SessionRecord | None:
        params = (token_digest, now)
        rows = self._read_now(_SELECT_BY_DIGEST, params)
        if rows is None:
            rows = await self._read_when_free(_SELECT_BY_DIGEST, params)
        return _record(rows[0]) if rows else None

    async def list_for_user(self, user_id: str, *, now: float) -> list[SessionRecord]:
        params = (user_id, now)
        rows = self._read_now(_SELECT_BY_USER, params)
        if rows is None:
            rows = await self._read_when_free(_SELECT_BY_USER, params)
        return [_record(row) for row in rows]

    def _read_now(self, sql: str, params: tuple[Any, ...]) -> list[Any] | None:
        """Run a SELECT on the loop's thread; ``None`` in the rare case the file is busy."""
        reader = self._connection(self._reader)
        try:
            # fetchall() finishes the statement, so no read transaction stays open.
            return reader.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            # sqlite_errorcode is the extended code (e.g. SQLITE_BUSY_RECOVERY); its low byte
            # is the primary one.
            if getattr(exc, "sqlite_errorcode", 0) & 0xFF in _SQLITE_BUSY_CODES:
                return None
            raise store_unavailable("SQLite", exc) from exc

    async def _read_when_free(self, sql: str, params: tuple[Any, ...]) -> list[Any]:
        """Run a SELECT on the writer thread, whose connection waits out locks."""
        return await self._write(
            lambda: self._connection(self._writer).execute(sql, params).fetchall()
        )

    # -- counting, on a thread and connection of its own ------------------------

    async def stats(self, *, now: float) -> StoreStats:
        """Counts from two aggregate queries in one read transaction (a consistent snapshot).

        They read the whole table, so they run on a worker thread with a
        read-only connection of their own: neither the event loop nor the
        writer thread (and the requests queued on it) waits for them.

        Raises:
            StoreUnavailable: the database could not be read.
        """
        self._connection(self._reader)  # refuses a closed store
        with translate_errors("SQLite", sqlite3.Error):
            return await asyncio.to_thread(self._count, now)

    def _count(self, now: float) -> StoreStats:
        db = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)
        try:
            db.execute("PRAGMA query_only = ON")
            db.execute("BEGIN")
            users, expired = db.execute(_COUNT_USERS_AND_EXPIRED, (now,)).fetchone()
            by_type: list[tuple[str, int]] = db.execute(_COUNT_BY_DEVICE_TYPE, (now,)).fetchall()
            db.execute("COMMIT")
        finally:
            db.close()
        return StoreStats(
            live_sessions=sum(count for _, count in by_type),
            users=users,
            by_device_type=dict(by_type),
            expired_sessions=expired,
        )

    # -- writes, on the writer thread -----------------------------------------

    async def create(self, record: SessionRecord, *, max_sessions: int, now: float) -> None:
        values = (
            record.id, record.token_digest, record.user_id, record.ip_address, record.user_agent,
            record.device_name, record.device_type, record.fingerprint, dump_json(record.data),
            record.created_at, record.last_active_at, record.expires_at,
        )  # fmt: skip

        def create() -> None:
            with _transaction(self._connection(self._writer)) as db:
                try:
                    db.execute(
                        f"INSERT INTO {TABLE} ({COLUMNS}) VALUES ({', '.join('?' * 12)})", values
                    )
                except sqlite3.IntegrityError as exc:
                    raise CreateError(record.id) from exc
                db.execute(
                    f"""DELETE FROM {TABLE} WHERE user_id = ?1 AND id NOT IN (
                        SELECT id FROM {TABLE} WHERE user_id = ?1 AND expires_at > ?2
                        ORDER BY last_active_at DESC, created_at DESC LIMIT ?3)""",
                    (record.user_id, now, max_sessions),
                )

        await self._write(create)

    async def update(self, session_id: str, changes: SessionUpdate, *, now: float) -> bool:
        def update() -> bool:
            with _transaction(self._connection(self._writer)) as db:
                assignments = ["last_active_at = ?", "expires_at = ?"]
                params: list[Any] = [changes.last_active_at, changes.expires_at]
                if changes.token_digest is not None:
                    assignments.append("token_digest = ?")
                    params.append(changes.token_digest)
                if changes.changes_data:
                    row = db.execute(
                        f"SELECT data FROM {TABLE} WHERE id = ? AND expires_at > ?",
                        (session_id, now),
                    ).fetchone()
                    if row is None:
                        return False
                    data: dict[str, Any] = json.loads(row[0])
                    for key in changes.removed_keys:
                        data.pop(key, None)
                    data.update(changes.set_keys)
                    data_json = dump_json(data)
                    cap = changes.size_cap
                    # len(dump_json(data)) is data_size(data), without encoding twice.
                    if cap is not None and len(data_json) > cap:
                        raise DataTooLarge(len(data_json), cap)  # rolls the transaction back
                    assignments.append("data = ?")
                    params.append(data_json)
                cursor = db.execute(
                    f"UPDATE {TABLE} SET {', '.join(assignments)} WHERE id = ? AND expires_at > ?",
                    (*params, session_id, now),
                )
                return cursor.rowcount == 1

        return await self._write(update)

    async def delete(self, session_id: str, *, user_id: str | None = None) -> bool:
        params: tuple[str, ...]
        if user_id is None:
            sql, params = f"DELETE FROM {TABLE} WHERE id = ?", (session_id,)
        else:
            sql, params = f"DELETE FROM {TABLE} WHERE id = ? AND user_id = ?", (session_id, user_id)
        return await self._write(lambda: self._execute(sql, params) == 1)

    async def delete_for_user(self, user_id: str, *, except_id: str | None = None) -> int:
        return await self._write(
            lambda: self._execute(
                f"DELETE FROM {TABLE} WHERE user_id = ? AND id IS NOT ?", (user_id, except_id)
            )
        )

    async def delete_expired(self, *, now: float, limit: int = 1000) -> int:
        return await self._write(
            lambda: self._execute(
                f"DELETE FROM {TABLE} WHERE id IN"
                f" (SELECT id FROM {TABLE} WHERE expires_at <= ? LIMIT ?)",
                (now, limit),
            )
        )

    def _execute(self, sql: str, params: Sequence[Any]) -> int:
        return self._connection(self._writer).execute(sql, params).rowcount

    async def _write(self, work: Callable[[], T]) -> T:
        if self._writer_thread is None:
            raise RuntimeError(f"{self!r} is closed; open it first (await store.open()).")
        with translate_errors("SQLite", sqlite3.Error):
            return await asyncio.get_running_loop().run_in_executor(self._writer_thread, work)

    def _connection(self, connection: sqlite3.Connection | None) -> sqlite3.Connection:
        if connection is None:
            raise RuntimeError(f"{self!r} is closed; open it first (await store.open()).")
        return connection


class _transaction:
    """``BEGIN IMMEDIATE`` … ``COMMIT``, rolled back on any error.

    IMMEDIATE takes the write lock up front, so a read-modify-write inside
    cannot interleave with another connection's.
    """

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> sqlite3.Connection:
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, exc_type: object, exc: object, traceback: object) -> None:
        self.db.execute("ROLLBACK" if exc_type is not None else "COMMIT")


def _enable_wal(db: sqlite3.Connection, *, timeout: float) -> None:
    """Switch the file to WAL, retrying while another connection is switching it too.

    SQLite answers a lock it could deadlock on with SQLITE_BUSY at once, without
    its busy handler: two processes opening a new file together meet exactly that.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            db.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode & 0xFF not in _SQLITE_BUSY_CODES or time.monotonic() > deadline:
                raise
            time.sleep(0.01)  # on the writer thread, never the event loop


def _migrate(db: sqlite3.Connection) -> None:
    with _transaction(db):
        (version,) = db.execute("PRAGMA user_version").fetchone()
        if version > SCHEMA_VERSION:
            raise RuntimeError(
                f"The session database has schema version {version}, newer than this "
                f"authsessions release knows ({SCHEMA_VERSION}); upgrade authsessions."
            )
        for statements in MIGRATIONS[version:]:
            for statement in statements:
                db.execute(statement)
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def _record(row: Sequence[Any]) -> SessionRecord:
    # Positional, in COLUMNS order: this runs on every authenticated request.
    return SessionRecord(
        row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7],
        json.loads(row[8]), row[9], row[10], row[11],
    )  # fmt: skip
