"""A store in a SQLite file: the embedded default, shared by the processes of one machine.

Reads run on the event loop's thread through the standard ``sqlite3`` module:
in WAL mode a reader never waits for a writer, and an indexed lookup costs a
few microseconds, far less than handing it to a thread (about 100 µs, as
aiosqlite does). ``get`` also keeps the sessions it read, for as long as
no other connection (the writer thread's, another process's) has committed
since. On Linux it learns that from the WAL-index header, read where SQLite
maps it in this process (see ``_wal_index``): the same bytes SQLite compares
when a read begins, for a tenth of a microsecond. Elsewhere it asks
``PRAGMA data_version``, a read transaction with two file-lock system calls.
A write on the event loop changes only its own session in what is kept (a
login that evicts, or a logout everywhere, all of the user's), when the
header shows that its commit was the only one since (see
``_after_own_commit``); otherwise it empties it. An update whose session is
kept merges into that record instead of reading the row again, when the
header it reads under the write lock is still the one the kept records were
read under (see ``_kept_at_lock``).

A write is one short transaction. It runs on the event loop too, on the
same connection as the reads (so its page cache outlives its own commits),
which never waits for a lock: in WAL mode with ``synchronous=NORMAL`` a
commit writes to the WAL without an fsync. When the file is locked, the same
work is retried on one dedicated writer thread whose connection waits for the
lock, so the event loop never blocks on one (see ``_sqlite_writer``). That
thread also runs the writes that may touch many rows, and checkpoints the WAL
(which fsyncs) once requests have added so many pages to it, mostly while
they go on writing (see ``_checkpoints``), and whenever one of its own
commits finds the WAL past ``BULK_CHECKPOINT_PAGES``. The first commit after
any checkpoint that copied the whole WAL starts the WAL over and fsyncs its
header, so that commit runs there too. The rare read that finds the database
busy (WAL recovery after a crash) is retried there as well.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import sqlite3
import threading
import time
import weakref
from asyncio import _get_running_loop
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar, cast

from authsessions._errors import StoreUnavailable
from authsessions._records import (
    CheckedUpdate,
    SessionRecord,
    SessionUpdate,
    StoreStats,
    dump_json,
    load_json,
)
from authsessions.stores import _checks
from authsessions.stores._base import (
    CreateError,
    DataTooLarge,
    Store,
    logger,
    store_unavailable,
    translate_errors,
)
from authsessions.stores._record_cache import CacheChange, RecordCache, UsersSessions
from authsessions.stores._sqlite_schema import COLUMNS, TABLE, migrate
from authsessions.stores._sqlite_support import (
    GuardedConnection,
    WriteRefused,
    enable_wal,
    is_busy,
    is_read_only,
    transaction,
)
from authsessions.stores._sqlite_writer import WriterThread
from authsessions.stores._wal_index import WalIndexHeader

__all__ = ["SQLiteStore"]

T = TypeVar("T")

_DATA = 8  # the position of data in COLUMNS
# The constraint failures that mean an id or digest is taken (CreateError); any other
# (a record the checks let through) fails as any other driver error does.
_TAKEN = frozenset({sqlite3.SQLITE_CONSTRAINT_PRIMARYKEY, sqlite3.SQLITE_CONSTRAINT_UNIQUE})

# The writer thread's own automatic checkpoint, in WAL pages (about 40 MB). A cleanup batch
# deletes rows scattered over every index and adds a few thousand pages to the WAL: at
# SQLite's default of 1000 pages each batch would copy all of them into the database, and
# fsync, inside its commit. Checkpointing every few batches instead copies a page once
# however many batches changed it: under read load a cleanup went from about 8,000 to
# 13,000 sessions a second, its median batch taking a third as long.
BULK_CHECKPOINT_PAGES = 10_000

# The most rows delete_for_user deletes on the event loop (one short write, as a logout is);
# more go to the writer thread. Well above max_sessions_per_user's default of 10.
INLINE_DELETE_ROWS = 32

# The shortest time between two reconnects of a store whose file SQLite opened read-only
# (see SQLiteStore._reconnect_all), in seconds: each closes the connection reads use.
RECONNECT_INTERVAL = 5.0

# What the WAL file is cut back to when it restarts after a checkpoint, in bytes: a cleanup
# grows it to about BULK_CHECKPOINT_PAGES, and without a limit it would keep that size.
WAL_SIZE_LIMIT = 8 << 20

_SELECT_BY_DIGEST = f"SELECT {COLUMNS} FROM {TABLE} WHERE token_digest = ? AND expires_at > ?"
_INSERT = f"INSERT INTO {TABLE} ({COLUMNS}) VALUES ({', '.join('?' * 12)})"
# A login over a live session marks the digest it replaced in its own INSERT, as a
# rotation does in its UPDATE: atomic with the row, and gone with it. A statement of its
# own, so that every other login's INSERT neither names nor writes the rotated-away
# columns (nor the partial index on them).
_INSERT_REPLACED = (
    f"INSERT INTO {TABLE} ({COLUMNS}, rotated_away_from, rotated_away_until)"
    f" VALUES ({', '.join('?' * 14)})"
)
_WrittenRow = tuple[str, dict[str, Any] | None, float, float, str]
"""What an update left in a row: its data as JSON and, when that changed, as the record a
get would read holds it; the times and the token digest."""
_SELECT_FOR_UPDATE = (
    f"SELECT data, last_active_at, expires_at, token_digest FROM {TABLE}"
    " WHERE id = ? AND expires_at > ?"
)
# A login's read of the user's other sessions, newest first: whether each is live.
_SELECT_USERS_OTHERS = (
    f"SELECT rowid, expires_at > ? FROM {TABLE} WHERE user_id = ? AND id != ?"
    " ORDER BY last_active_at DESC, created_at DESC"
)
# A session to delete: only the owner's, and only while it holds the digest, where either
# is given.
_SELECT_TO_DELETE = (
    f"SELECT expires_at FROM {TABLE} WHERE id = ?"
    " AND (? IS NULL OR user_id = ?) AND (? IS NULL OR token_digest = ?)"
)
# Over the partial index on rotated_away_from: "= ?" is never true of a NULL.
_SELECT_ROTATED_AWAY = (
    f"SELECT id FROM {TABLE} WHERE rotated_away_from = ? AND rotated_away_until > ?"
    " AND expires_at > ? LIMIT 1"
)
_SELECT_BY_USER = (
    f"SELECT {COLUMNS} FROM {TABLE} WHERE user_id = ? AND expires_at > ?"
    " ORDER BY last_active_at DESC, created_at DESC"
)
# The expired count is a range of the expires_at index; the live counts read the rows.
_COUNT_USERS_AND_EXPIRED = (
    f"SELECT (SELECT COUNT(DISTINCT user_id) FROM {TABLE} WHERE expires_at > ?),"
    f" (SELECT COUNT(*) FROM {TABLE} WHERE expires_at <= ?)"
)
_COUNT_FOR_USER = f"SELECT COUNT(*) FROM {TABLE} WHERE user_id = ?"
_COUNT_BY_DEVICE_TYPE = (
    f"SELECT device_type, COUNT(*) FROM {TABLE} WHERE expires_at > ? GROUP BY device_type"
)


MAX_TIMEOUT = (2**31 - 1) // 1000
"""The longest ``timeout`` in seconds (24 days): SQLite counts it in milliseconds, in a C int."""

# The open stores, whose connections are closed while the process forks (see
# SQLiteStore._close_for_fork); what one could not close is kept in the child, never closed.
_OPEN_STORES: weakref.WeakSet[SQLiteStore] = weakref.WeakSet()
_LEFT_IN_THE_PARENT: list[object] = []
# In a child: the files a store of the parent held open across the fork, which no
# connection here can use soundly (see SQLiteStore._close_for_fork).
_FILES_LEFT_OPEN_AT_FORK: set[str] = set()
_get_ident = threading.get_ident


def _before_fork() -> None:
    for store in list(_OPEN_STORES):
        store._close_for_fork()


def _after_fork_in_the_parent() -> None:
    for store in list(_OPEN_STORES):
        store._reopen_after_fork()


def _after_fork_in_the_child() -> None:
    for store in list(_OPEN_STORES):
        store._left_in_the_parent()
    _OPEN_STORES.clear()


if hasattr(os, "register_at_fork"):  # not on Windows
    os.register_at_fork(
        before=_before_fork,
        after_in_parent=_after_fork_in_the_parent,
        after_in_child=_after_fork_in_the_child,
    )


class SQLiteStore(Store):
    """Sessions in a SQLite database file (WAL mode), created with its schema on open.

    Several processes on one machine may share the file::

        store = SQLiteStore("/var/lib/myapp/sessions.db")

    Args:
        path: the database file; created if missing.
        timeout: seconds a write waits for another connection's lock before
            failing with ``StoreUnavailable``, counted from when it was asked for
            (up to 50 ms more, for one that waited that little for writes ahead).
    """

    def __init__(
        self, path: str | os.PathLike[str] = "sessions.db", *, timeout: float = 5.0
    ) -> None:
        self.path = os.fspath(path)
        if self.path in ("", ":memory:") or self.path.startswith("file::memory:"):
            raise ValueError(
                "SQLiteStore needs a file so its event-loop and writer connections share it; "
                "use MemoryStore for an in-memory store."
            )
        if self.path.startswith("file:"):
            # Where SQLite is built to take URIs it would open another file than this one,
            # and the command line's checks would look at this one.
            raise ValueError(
                f"SQLiteStore takes a file path, not a SQLite URI: got {self.path!r} (a file "
                f"whose name starts with 'file:' is './{self.path}')."
            )
        if not 0 < timeout <= MAX_TIMEOUT:
            # SQLite waits for a lock a number of milliseconds held in a 32-bit integer: a
            # longer wait overflowed to none at all, and inf or nan failed every write.
            raise ValueError(
                f"timeout must be a number of seconds above 0 and at most {MAX_TIMEOUT:,}, "
                f"got {timeout!r}."
            )
        # Every connection, however late it is made (stats, a reopened one), opens this
        # file, not whatever a relative path names after the process changed directory.
        self._file = os.path.abspath(self.path)
        self.timeout = timeout
        # On the event loop's thread: reads, and writes that need not wait for a lock. One
        # connection for both: its page cache stays valid across its own commits, where a
        # reader of its own would read the pages of every session written back from the file.
        self._loop_db: sqlite3.Connection | None = None
        self._cache = RecordCache()
        self._wal_index: WalIndexHeader | None = None
        # The WAL-index header as the event loop's latest write took the write lock.
        self._version_at_write: object = None
        # Writes that wait for a lock or change many rows, and checkpoints.
        self._writer = WriterThread(self._closed_error, timeout)
        self._reconnecting: asyncio.Task[None] | None = None  # see _reconnect_all
        self._reconnected_at = -RECONNECT_INTERVAL
        self._closed_for_fork = False  # by _close_for_fork, until the fork is over
        # The event loop that uses the loop's connection (and the record cache), and its
        # thread: see _claim_loop_db.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._claim_lock = threading.Lock()
        self._counting = 0  # stats() connections open on worker threads
        self._counting_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"SQLiteStore({self.path!r})"

    # -- opening -------------------------------------------------------------

    async def _open(self) -> None:
        if self._file in _FILES_LEFT_OPEN_AT_FORK:
            raise RuntimeError(
                f"{self!r} cannot open in this process: it was forked while the parent had "
                "the file open, from a thread other than the one using the parent's store, "
                "or while stats() counted (SQLite's lock table came along, with the "
                "parent's locks marked as held). Fork before opening the store, or from the "
                "thread that uses it, or use multiprocessing's 'spawn' start method."
            )
        try:
            await self._writer.open(
                self._connect_writer, functools.partial(self._connect_writer, again=True)
            )
            with translate_errors("SQLite", sqlite3.Error):
                self._open_loop_db()
        except BaseException:
            await self._close()
            raise
        self._writer.count_pages(self._wal_index)
        _OPEN_STORES.add(self)

    def _close_for_fork(self) -> None:
        """Close the connections, once the writer thread's work in hand is done, as the
        process forks: none may be open then.

        SQLite keeps each file's locks in a table of the process, which a child inherits
        with the parent's locks marked as held, though none is held there: the child's
        own connections would then take no lock at all, and once the parent closed its
        last one, it would checkpoint and remove the WAL under the child.

        Only where the thread that last used the event loop's connection forks, which is
        then inside ``fork()``, not inside a statement: closing it under a loop running
        on another thread crashed the process. Left open otherwise, or while ``stats()``
        holds a connection of its own, with a warning; the child then refuses to open
        the file (see _open).
        """
        if self._loop_thread != _get_ident() or self._counting:
            logger.warning(
                "%r kept its connections open as the process forked (another thread "
                "forked, or stats() was counting): the child cannot use the file.",
                self,
            )
            return
        try:
            self._writer.close_connection_for_fork()
        except Exception as exc:
            logger.warning(
                "%r could not close its connections as the process forked: %s", self, exc
            )
            return
        # The header lives in a mapping the last connection takes with it.
        self._writer.count_pages(None)
        self._wal_index = None
        self._cache.clear()
        if self._loop_db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._loop_db.close()
            self._loop_db = None
        self._closed_for_fork = True

    def _reopen_after_fork(self) -> None:
        """In the process that forked: the connections :meth:`_close_for_fork` closed,
        opened again without waiting for any lock (the event loop's opens on first use
        if it cannot now). If the writer's cannot, the store is closed, to open afresh.
        """
        if not self._closed_for_fork:
            return
        self._closed_for_fork = False
        try:
            # The file is in WAL mode and migrated since the store opened.
            self._writer.reconnect_after_fork()
        except Exception as exc:
            logger.warning("%r could not open again after the process forked: %s", self, exc)
            _OPEN_STORES.discard(self)
            self._writer.abandon()
            self._writer = WriterThread(self._closed_error, self.timeout)
            self._mark_closed()
            return
        with contextlib.suppress(sqlite3.Error):
            self._open_loop_db()
            self._writer.count_pages(self._wal_index)

    def _left_in_the_parent(self) -> None:
        """In a process forked while this store was open: closed here, to open afresh.

        The writer thread does not exist here, so work handed to it never ended. Where
        the connections were left open for the fork, they are the parent's (SQLite
        forbids using one across a fork): kept and never closed, as closing the last
        connection to a file checkpoints it, under locks that SQLite would believe this
        process holds.
        """
        if not self._closed_for_fork:
            _LEFT_IN_THE_PARENT.append((self._loop_db, self._writer, self._wal_index))
            _FILES_LEFT_OPEN_AT_FORK.add(self._file)
        self._closed_for_fork = False
        self._loop_db = self._wal_index = None
        self._cache.clear()
        self._writer = WriterThread(self._closed_error, self.timeout)
        self._counting, self._counting_lock = 0, threading.Lock()  # another thread's, if held
        self._reconnecting, self._reconnected_at = None, -RECONNECT_INTERVAL  # the parent's
        self._mark_closed()
        self._opening = None

    def _open_loop_db(self) -> None:
        db = _connect_loop_db(self._file)
        try:
            # What makes a commit cheap enough for the event loop: no fsync (see
            # _connect_writer), and no checkpoint (it fsyncs) inside a commit; the writer
            # thread checkpoints instead.
            db.execute("PRAGMA synchronous = NORMAL")
            db.execute("PRAGMA wal_autocheckpoint = 0")
            db.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")
            # A first read maps -shm into this process; the connection, open until
            # close(), keeps that mapping in place while the header is read from it.
            db.execute("PRAGMA data_version").fetchone()
            wal_index = WalIndexHeader.find(self._file)
        except BaseException:
            db.close()
            raise
        if wal_index is not None:
            db.refuse_write = self._write_locked
        self._loop_db, self._wal_index = db, wal_index
        # The opener's, as a claim would make it (see _claim_loop_db and _close_for_fork);
        # no loop's, reopened after a fork outside any loop.
        with self._claim_lock:
            self._loop_thread, self._loop = _get_ident(), _get_running_loop()

    def _write_locked(self) -> bool:
        """Whether to refuse the write the event loop's connection began: one whose commit
        would start the WAL over (and fsync) goes to the writer thread. Called once the
        write lock is held, when no other commit can change the WAL-index header.
        """
        wal_index = self._wal_index
        assert wal_index is not None
        self._version_at_write = wal_index.version()
        return wal_index.all_checkpointed()

    def _reopen_loop_db(self) -> None:
        """Replace the event loop's connection, left inside a transaction by a ROLLBACK that
        failed: reads on it would see that transaction's uncommitted writes.
        """
        stuck = self._loop_db
        self._loop_db = self._wal_index = None
        self._cache.clear()
        try:
            self._open_loop_db()  # before the old one closes, so -shm stays mapped
        finally:
            if stuck is not None:
                with contextlib.suppress(sqlite3.Error):
                    stuck.close()  # rolls back what it still holds

    def _connect_writer(self, *, again: bool = False) -> sqlite3.Connection:
        writer = sqlite3.connect(self._file, timeout=self.timeout, isolation_level=None)
        try:
            if not again:  # both take the write lock, which a reopen must not wait for
                enable_wal(writer, timeout=self.timeout)
                migrate(writer)
            # WAL with synchronous=NORMAL survives an app crash; only a power loss can
            # drop the last commits, which for sessions means signing in again.
            writer.execute("PRAGMA synchronous = NORMAL")
            writer.execute(f"PRAGMA wal_autocheckpoint = {BULK_CHECKPOINT_PAGES}")
            writer.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")
        except BaseException:
            writer.close()
            raise
        return writer

    async def _close(self) -> None:
        _OPEN_STORES.discard(self)
        self._wal_index = None  # before the connections that keep its mapping close
        self._cache.clear()
        if self._loop_db is not None:
            self._loop_db.close()
            self._loop_db = None
        await self._writer.close()

    # -- reads, on the event loop -------------------------------------------

    async def get(self, token_digest: str, *, now: float) -> SessionRecord | None:
        if _get_running_loop() is self._loop or self._claim_loop_db():
            db = self._loop_db
            if db is None:
                db = self._connection(db)
            try:
                # Read before the row: see RecordCache.put.
                wal_index = self._wal_index
                version = (
                    wal_index.version()
                    if wal_index is not None
                    else db.execute("PRAGMA data_version").fetchone()[0]
                )
                cache = self._cache
                record = cache.get(version, token_digest)
                if record is None:
                    rows = db.execute(_SELECT_BY_DIGEST, (token_digest, now)).fetchall()
                    if not rows:
                        # Misses are not kept: any client can send unknown tokens, which
                        # would crowd out the sessions that do exist.
                        return None
                    record = _record(rows[0])
                    cache.put(token_digest, record, rows[0][_DATA])
                elif record.expires_at <= now:
                    return None  # as the SELECT's "expires_at > ?" would
                return record
            except sqlite3.Error as exc:
                if not is_busy(exc):
                    raise store_unavailable("SQLite", exc)  # noqa: B904 (it chains itself)
        else:
            self._require_open()
        # The file is busy, or another thread's loop has the connection: the writer thread's
        # connection waits the lock out.
        rows = await self._read_when_free(_SELECT_BY_DIGEST, (token_digest, now))
        return _record(rows[0]) if rows else None

    def _claim_loop_db(self) -> bool:
        """Whether this loop may use the event loop's connection (and the record cache),
        which only one loop at a time uses: made this one's unless another loop, running
        now (on another thread), has it. Another thread's calls (an admin job's
        ``asyncio.run`` beside the app's loop) go to the writer thread instead: sharing
        the connection, one thread's transaction began inside the other's, and one
        reopening it under the other's statement crashed the process.
        """
        loop = asyncio.get_running_loop()
        with self._claim_lock:  # two threads claiming at once must not both have it
            holder = self._loop
            if holder is not None and holder is not loop and holder.is_running():
                return False
            self._loop_thread, self._loop = _get_ident(), loop
            return True

    async def close(self) -> None:
        """Release connections. The store can be opened again afterwards.

        Raises:
            RuntimeError: the store is in use by an event loop running on another thread
                (see :meth:`_claim_loop_db`), whose statement the close would cut short.
        """
        holder = self._loop
        if (
            self.is_open
            and holder is not None
            and holder is not asyncio.get_running_loop()
            and holder.is_running()
        ):
            raise RuntimeError(
                f"{self!r} is in use by an event loop running on another thread: close it "
                "on that loop (asyncio.run_coroutine_threadsafe), or give each thread a "
                "store of its own."
            )
        await super().close()

    async def list_for_user(self, user_id: str, *, now: float) -> list[SessionRecord]:
        now = _checks.list_for_user_args(user_id, now)
        params = (user_id, now)
        rows = self._read_now(_SELECT_BY_USER, params)
        if rows is None:
            rows = await self._read_when_free(_SELECT_BY_USER, params)
        return [_record(row) for row in rows]

    async def rotated_away_to(self, token_digest: str, *, now: float) -> str | None:
        now = _checks.rotated_away_to_args(token_digest, now)
        params = (token_digest, now, now)
        rows = self._read_now(_SELECT_ROTATED_AWAY, params)
        if rows is None:
            rows = await self._read_when_free(_SELECT_ROTATED_AWAY, params)
        return rows[0][0] if rows else None

    def _read_now(self, sql: str, params: tuple[Any, ...]) -> list[Any] | None:
        """Run a SELECT on the loop's thread; ``None`` in the rare case the file is busy."""
        if _get_running_loop() is not self._loop and not self._claim_loop_db():
            return None
        db = self._connection(self._loop_db)
        try:
            # fetchall() finishes the statement, so no read transaction stays open.
            return db.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            if is_busy(exc):
                return None
            raise store_unavailable("SQLite", exc)  # noqa: B904 (it chains itself)

    async def _read_when_free(self, sql: str, params: tuple[Any, ...]) -> list[Any]:
        """Run a SELECT on the writer thread, whose connection waits out locks."""
        return await self._writer.run(lambda db: db.execute(sql, params).fetchall())

    # -- counting, on a thread and connection of its own ------------------------

    async def stats(self, *, now: float) -> StoreStats:
        """Counts from two aggregate queries in one read transaction (a consistent snapshot).

        They read the whole table, so they run on a worker thread with a
        read-only connection of their own: neither the event loop nor the
        writer thread (and the requests queued on it) waits for them.

        Raises:
            StoreUnavailable: the database could not be read.
        """
        now = _checks.require_time("now", now)
        self._require_open()
        # Counted before the thread has it: a fork meanwhile leaves the connections open.
        # Counted out by the thread, or here if it never began (cancelled before).
        began: list[bool] = []
        with self._counting_lock:
            self._counting += 1
        try:
            with translate_errors("SQLite", sqlite3.Error):
                return await asyncio.to_thread(self._count, now, began)
        finally:
            with self._counting_lock:
                if not began:
                    began.append(False)  # too late for the thread to begin
                    self._counting -= 1

    def _count(self, now: float, began: list[bool]) -> StoreStats:
        with self._counting_lock:
            if began:  # its caller gave up before it began
                raise asyncio.CancelledError
            began.append(True)
        try:
            db = sqlite3.connect(self._file, timeout=self.timeout, isolation_level=None)
            try:
                db.execute("PRAGMA query_only = ON")
                db.execute("BEGIN")
                users, expired = db.execute(_COUNT_USERS_AND_EXPIRED, (now, now)).fetchone()
                by_type: list[tuple[str, int]] = db.execute(
                    _COUNT_BY_DEVICE_TYPE, (now,)
                ).fetchall()
                db.execute("COMMIT")
            finally:
                db.close()
        finally:
            with self._counting_lock:
                self._counting -= 1
        return StoreStats(
            live_sessions=sum(count for _, count in by_type),
            users=users,
            by_device_type=dict(by_type),
            expired_sessions=expired,
        )

    # -- writes: on the event loop when the file is free, else on the writer thread --

    async def create(
        self,
        record: SessionRecord,
        *,
        max_sessions: int,
        now: float,
        replaced: tuple[str, float] | None = None,
    ) -> None:
        now = _checks.create_args(record, max_sessions, now, replaced)
        values: tuple[Any, ...] = (
            record.id, record.token_digest, record.user_id, record.ip_address, record.user_agent,
            record.device_name, record.device_type, record.fingerprint, dump_json(record.data),
            record.created_at, record.last_active_at, record.expires_at,
        )  # fmt: skip
        insert = _INSERT
        if replaced is not None:
            # Another row marked with the same digest (never, with random tokens) is left
            # as it is: each row's mark goes with its row, and rotated_away_to finds any.
            insert = _INSERT_REPLACED
            values += replaced

        def create(db: sqlite3.Connection) -> int:
            with transaction(db) as sql:
                try:
                    sql.execute(insert, values)
                except sqlite3.IntegrityError as exc:
                    if exc.sqlite_errorcode not in _TAKEN:
                        raise
                    raise CreateError(record.id) from None
                # The user's other sessions, newest first: the expired ones go, and the live
                # ones past the newest max_sessions - 1. Chosen here rather than by one
                # DELETE with a NOT IN subquery, which cost about 30 µs even when it found
                # nothing to delete (most logins), where this read costs 3 to 6 µs.
                kept = 0
                evicted = []
                for rowid, live in sql.execute(
                    _SELECT_USERS_OTHERS, (now, record.user_id, record.id)
                ):
                    if live and kept < max_sessions - 1:
                        kept += 1
                    else:
                        evicted.append((rowid,))
                if evicted:
                    sql.executemany(f"DELETE FROM {TABLE} WHERE rowid = ?", evicted)
                return len(evicted)

        # A new row is in no cache; the evicted ones are the user's, not known by id.
        users_sessions = (UsersSessions(record.user_id),)
        await self._write(create, lambda evicted: users_sessions if evicted else ())

    async def update(self, session_id: str, changes: SessionUpdate, *, now: float) -> bool:
        now = _checks.update_args(session_id, changes, now)
        written: list[_WrittenRow] = []

        def update(db: sqlite3.Connection) -> bool:
            with transaction(db) as sql:
                kept = self._kept_at_lock(db, session_id, now)
                if kept is not None:
                    record, stored_data = kept
                    last_active_at, expires_at = record.last_active_at, record.expires_at
                    stored_digest = record.token_digest
                else:
                    row = sql.execute(_SELECT_FOR_UPDATE, (session_id, now)).fetchone()
                    if row is None:
                        return False
                    stored_data, last_active_at, expires_at, stored_digest = row
                expected = changes.expected_token_digest
                if expected is not None and stored_digest != expected:
                    return False
                # Only columns whose value changes are set: a commit that rewrites a row as
                # it was writes no page, and the cache must know whether this one did (see
                # _after_own_commit).
                assignments: list[str] = []
                params: list[Any] = []
                new_times: tuple[float, float] | None = None
                if (
                    changes.expires_at is not None
                    and (
                        changes.last_active_at != last_active_at or changes.expires_at != expires_at
                    )
                    and (
                        (cutoff := changes.touch_if_last_active_by) is None
                        or last_active_at <= cutoff
                    )
                ):
                    # Left out otherwise: setting expires_at rewrites its index, a third
                    # of a write's cost.
                    assignments += ("last_active_at = ?", "expires_at = ?")
                    params += (changes.last_active_at, changes.expires_at)
                    # Read back as a SELECT would: REAL columns give floats. (The times
                    # come together: _checks.update_args saw to it.)
                    new_times = (
                        float(cast(float, changes.last_active_at)),
                        float(changes.expires_at),
                    )
                if changes.token_digest is not None and changes.token_digest != stored_digest:
                    assignments.append("token_digest = ?")
                    params.append(changes.token_digest)
                    if changes.rotated_away_until is not None:
                        # In the same UPDATE: marked only if the rotation applies. Replaces
                        # the previous rotation's mark, as a session keeps one.
                        assignments += ("rotated_away_from = ?", "rotated_away_until = ?")
                        params += (stored_digest, changes.rotated_away_until)
                new_data: dict[str, Any] | None = None
                if changes.changes_data:
                    # A copy one level deep is enough: keys are only removed or set whole.
                    data: dict[str, Any] = (
                        dict(kept[0].data) if kept is not None else load_json(stored_data)
                    )
                    for key in changes.removed_keys:
                        data.pop(key, None)
                    data.update(changes.set_keys)
                    data_json = dump_json(data)
                    cap = changes.size_cap
                    # len(dump_json(data)) is data_size(data), without encoding twice.
                    if cap is not None and len(data_json) > cap:
                        raise DataTooLarge(len(data_json), cap)  # rolls the transaction back
                    if data_json != stored_data:
                        assignments.append("data = ?")
                        params.append(data_json)
                        stored_data = data_json
                        # For the cache, as get would read it: from the JSON, since a caller
                        # may change its values after the write, which the session layer's
                        # own updates never do.
                        new_data = (
                            data if changes.__class__ is CheckedUpdate else load_json(data_json)
                        )
                if assignments:
                    try:
                        sql.execute(
                            f"UPDATE {TABLE} SET {', '.join(assignments)} WHERE id = ?",
                            (*params, session_id),
                        )
                    except sqlite3.IntegrityError as exc:
                        if exc.sqlite_errorcode not in _TAKEN:
                            raise
                        raise CreateError(session_id) from None  # rolls the transaction back
                    if new_times is not None:
                        last_active_at, expires_at = new_times
                    if changes.token_digest is not None:
                        stored_digest = changes.token_digest
                    written.append(
                        (stored_data, new_data, last_active_at, expires_at, stored_digest)
                    )
                return True

        return await self._write(update, lambda _live: self._as_written(session_id, written))

    def _kept_at_lock(
        self, db: sqlite3.Connection, session_id: str, now: float
    ) -> tuple[SessionRecord, str] | None:
        """The cached record of the live session ``session_id`` and its data as JSON, when
        they are what its row holds: ``db`` is the event loop's connection, its transaction
        holds the write lock, and the WAL-index header it read then is the cache's version
        (nobody committed since the records were read, and nobody can before this commit).
        Saves the write reading the row again. Never on the writer thread: the header is
        only read on the loop's connection.
        """
        version = self._version_at_write
        if db is not self._loop_db or version is None or version != self._cache.version:
            return None
        kept = self._cache.kept(session_id)
        if kept is None or kept[0].expires_at <= now:
            return None  # the SELECT decides, as for a session not kept
        return kept

    def _as_written(self, session_id: str, written: list[_WrittenRow]) -> Sequence[CacheChange]:
        """What ``update`` did to the session ``session_id`` (``written``: the columns it
        set, when it set any), for the cache: its record as the row now is when the cache
        holds it (the session's next request reads it), else its id, to forget.
        """
        kept = self._cache.kept(session_id)
        if kept is None or not written:
            return (session_id,)
        data_json, new_data, last_active_at, expires_at, token_digest = written[0]
        before = kept[0]
        record = SessionRecord(
            session_id, token_digest, before.user_id, before.ip_address, before.user_agent,
            before.device_name, before.device_type, before.fingerprint,
            before.data if new_data is None else new_data,
            before.created_at, last_active_at, expires_at,
        )  # fmt: skip
        return ((record, data_json),)

    async def delete(
        self,
        session_id: str,
        *,
        now: float,
        user_id: str | None = None,
        token_digest: str | None = None,
    ) -> bool:
        now = _checks.delete_args(session_id, user_id, token_digest, now)

        def delete(db: sqlite3.Connection) -> bool:
            with transaction(db) as sql:
                found = sql.execute(
                    _SELECT_TO_DELETE, (session_id, user_id, user_id, token_digest, token_digest)
                ).fetchone()
                if found is None:
                    return False
                sql.execute(f"DELETE FROM {TABLE} WHERE id = ?", (session_id,))
                return bool(found[0] > now)

        return await self._write(delete, lambda _deleted: (session_id,))

    async def delete_for_user(
        self, user_id: str, *, now: float, except_id: str | None = None
    ) -> int:
        now = _checks.delete_for_user_args(user_id, except_id, now)
        count_live = (
            f"SELECT COUNT(*) FROM {TABLE} WHERE user_id = ? AND id IS NOT ? AND expires_at > ?"
        )
        delete_rows = f"DELETE FROM {TABLE} WHERE user_id = ? AND id IS NOT ?"

        def delete(db: sqlite3.Connection) -> tuple[int, int]:
            """How many live sessions went, and how many rows."""
            with transaction(db) as sql:
                (live,) = sql.execute(count_live, (user_id, except_id, now)).fetchone()
                return live, sql.execute(delete_rows, (user_id, except_id)).rowcount

        # A user's sessions are few (max_sessions_per_user): one short write on the event
        # loop, like a logout. Many (a raised cap, rows written by other means) go to the
        # writer thread, so that the loop's share of a write stays short. The count only
        # sizes the work: the DELETE removes whatever is there when it runs.
        counted = self._read_now(_COUNT_FOR_USER, (user_id,))
        if counted is not None and counted[0][0] <= INLINE_DELETE_ROWS:
            users_sessions = (UsersSessions(user_id),)
            live, _rows = await self._write(
                delete, lambda deleted: users_sessions if deleted[1] else ()
            )
            return live
        live, _rows = await self._on_writer(self._writer.write_many_rows, delete)
        return live

    async def delete_expired(self, *, now: float, limit: int = 1000) -> int:
        now = _checks.delete_expired_args(now, limit)
        sql = (
            f"DELETE FROM {TABLE} WHERE id IN"
            f" (SELECT id FROM {TABLE} WHERE expires_at <= ? LIMIT ?)"
        )
        return await self._on_writer(
            self._writer.write_many_rows, lambda db: db.execute(sql, (now, limit)).rowcount
        )

    async def _write(
        self,
        work: Callable[[sqlite3.Connection], T],
        changed: Callable[[T], Sequence[CacheChange]],
    ) -> T:
        """Run ``work`` (one transaction) on the event loop if the file is free.

        A "busy" on the event loop's connection comes before the work changed
        anything, so the same work is then run on the writer thread, which
        waits for the lock up to ``timeout``. ``changed`` tells from the work's
        result which sessions it may have changed (see :meth:`RecordCache.advance`):
        the cache keeps the others.
        """
        writer = self._writer
        asked_at = None
        if writer.finishing:
            # Queue behind the checkpoint's finish here, to run on the loop once it is done:
            # handed to the thread, each write would wait for the GIL both ways, from a loop
            # kept busy by the others (under 16 request streams, 18% of logins did). The
            # wait counts towards the timeout, which the finish's own write may fill.
            asked_at = time.monotonic()
            await writer.wait_for_finish()
        # While the checkpoint's finish is due, writes go to the thread, the first to run
        # it: the first commit after it may start the WAL over and fsync. After anyone
        # else's checkpoint, the connection itself refuses such a commit (see _open_loop_db).
        if not writer.finish_due() and (_get_running_loop() is self._loop or self._claim_loop_db()):
            db = self._connection(self._loop_db)
            self._version_at_write = None
            changes_before = db.total_changes
            try:
                result = work(db)
            except WriteRefused:
                pass  # its commit would have started the WAL over: on the thread instead
            except sqlite3.Error as exc:
                if db.in_transaction:
                    with translate_errors("SQLite", sqlite3.Error):
                        self._reopen_loop_db()
                # Busy or read-only, the work was refused before it changed anything: the
                # thread runs it, waiting for the lock, or on connections opened anew.
                if not (is_busy(exc) or is_read_only(exc)):
                    # It may have taken effect (a COMMIT that failed after its write), which
                    # PRAGMA data_version, counting other connections' commits only, misses.
                    self._cache.clear()
                    raise store_unavailable("SQLite", exc)  # noqa: B904 (it chains itself)
            else:
                writer.checkpoints.wrote()
                try:
                    self._after_own_commit(db.total_changes != changes_before, changed(result))
                except BaseException:
                    self._cache.clear()
                    raise
                writer.copy_if_due()
                return result
        else:
            self._require_open()
        # The thread's commit changes the version the next get reads, which empties the cache.
        return await self._on_writer(functools.partial(writer.write, asked_at=asked_at), work)

    async def _on_writer(
        self,
        hand_over: Callable[[Callable[[sqlite3.Connection], T]], Awaitable[T]],
        work: Callable[[sqlite3.Connection], T],
    ) -> T:
        """``hand_over(work)`` (to the writer thread); refused for a connection SQLite opened
        read-only (see :meth:`_reconnect_all`), once more on connections opened anew."""
        try:
            return await hand_over(work)
        except StoreUnavailable as exc:
            cause = exc.__cause__
            if not (isinstance(cause, sqlite3.Error) and is_read_only(cause)):
                raise
            if not self._reconnect_may_help():
                raise
            # Only where the event loop's connection may be closed: not under another
            # thread's loop (see _claim_loop_db).
            if _get_running_loop() is not self._loop and not self._claim_loop_db():
                raise
        await self._reconnect_all()
        return await hand_over(work)

    def _reconnect_may_help(self) -> bool:
        """Whether connections opened anew could write: the process may write the file now
        (its ``-wal`` and ``-shm``, or the folder to make them in, beside the file a
        symlink names, as SQLite keeps them), and no reconnect was tried in the last
        :data:`RECONNECT_INTERVAL` (another connection of the process to the file, which
        keeps the state read-only, would make each one fail). Else a reconnect would
        only close the connection reads use.
        """
        if time.monotonic() - self._reconnected_at < RECONNECT_INTERVAL:
            return False
        file = os.path.realpath(self._file)
        folder_needed = False
        for path in (file, f"{file}-wal", f"{file}-shm"):
            if os.path.exists(path):
                if not os.access(path, os.W_OK):
                    return False
            else:
                folder_needed = True
        return not folder_needed or os.access(os.path.dirname(file), os.W_OK)

    async def _reconnect_all(self) -> None:
        """Close the store's connections, then open them anew.

        SQLite opens a file the process may not write (a read-only mount, another
        user's ``-shm``, a restored file's owner) read-only, without a word, and the
        process's connections to it share that state while any of them stays open:
        closed all at once, they can write once the file can be written. Requests
        that come meanwhile get 503.
        """
        reconnecting = self._reconnecting
        if reconnecting is None:
            self._reconnected_at = time.monotonic()
            # A task of its own: a caller cancelled meanwhile (a client gone) must not stop
            # it halfway, with one connection closed and reads reopening theirs.
            self._reconnecting = reconnecting = asyncio.ensure_future(self._reopen_all())
            reconnecting.add_done_callback(lambda done: done.cancelled() or done.exception())
        await asyncio.shield(reconnecting)

    async def _reopen_all(self) -> None:
        try:
            self._wal_index = None  # before the connections that keep its mapping close
            self._writer.count_pages(None)
            self._cache.clear()
            db, self._loop_db = self._loop_db, None
            if db is not None:
                db.close()
            await self._writer.reconnect()
            # None opened meanwhile (a fork reopens it), and the store still open.
            if self._is_open and self._loop_db is None:
                with translate_errors("SQLite", sqlite3.Error):
                    self._open_loop_db()
                self._writer.count_pages(self._wal_index)
        finally:
            self._reconnecting = None

    def _after_own_commit(self, wrote: bool, changed: Sequence[CacheChange]) -> None:
        """Keep the cached records of the sessions the event loop's commit left as they were,
        when nobody else committed since they were read; else empty the cache.

        ``wrote``: the commit changed rows, and so wrote pages (the store's writes never
        rewrite a row as it was, which SQLite would not write). Then the WAL-index header
        counts exactly one commit more than when the write took the lock; else it is the
        same header, byte for byte. Anything else means another commit came between the
        lock's release and the header's read here. A header WAL recovery rebuilt in that
        moment counts from 0 and could pass, if just as many other commits followed (near
        the count of a new ``-shm`` file), as recoveries can fool SQLite's own readers (see
        ``_wal_index``).
        """
        cache, wal_index = self._cache, self._wal_index
        if wal_index is None:
            # PRAGMA data_version does not count a connection's own commits; anyone else's
            # since the cached records were read, the next get sees as a new version.
            cache.advance(cache.version, changed)
        elif self._version_at_write != cache.version:
            cache.clear()  # someone committed before this write took the lock
        else:
            locked_at, now = self._version_at_write, wal_index.version()
            if WalIndexHeader.commits_between(locked_at, now) == 1 if wrote else now == locked_at:
                cache.advance(now, changed)
            else:
                cache.clear()

    def _connection(self, connection: sqlite3.Connection | None) -> sqlite3.Connection:
        """``connection`` (the event loop's); when there is none, opened again if the store
        is open: replacing one left in a transaction failed (see :meth:`_reopen_loop_db`),
        and each call tries until the file opens.
        """
        if connection is not None:
            return connection
        if not self._is_open:
            raise self._closed_error()
        if self._reconnecting is not None:
            # Opened now, it would share the read-only state of the connection the writer
            # thread is closing (see _reconnect_all).
            raise StoreUnavailable()
        with translate_errors("SQLite", sqlite3.Error):
            self._open_loop_db()
        # The writer's schedule may hold no header, or one whose mapping went with every
        # connection (a fork, see _reopen_after_fork).
        self._writer.count_pages(self._wal_index)
        assert self._loop_db is not None
        return self._loop_db


def _connect_loop_db(path: str) -> GuardedConnection:
    # timeout=0: whatever meets a lock is retried on the writer thread instead of blocking
    # the event loop. check_same_thread=False: close() may run on another thread.
    return sqlite3.connect(
        path, timeout=0, isolation_level=None, check_same_thread=False, factory=GuardedConnection
    )


def _record(row: Sequence[Any]) -> SessionRecord:
    # Positional, in COLUMNS order: this runs on every authenticated request.
    return SessionRecord(
        row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7],
        load_json(row[8]), row[9], row[10], row[11],
    )  # fmt: skip
