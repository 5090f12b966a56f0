"""The parts of SQLiteStore that work on a bare connection: transactions, locks, checkpoints."""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = [
    "GuardedConnection",
    "WriteRefused",
    "checkpoint",
    "checkpoint_then",
    "enable_wal",
    "is_busy",
    "start_wal_over",
    "transaction",
]

T = TypeVar("T")


_BUSY_CODES = {sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED}


def is_busy(exc: sqlite3.Error) -> bool:
    """Whether SQLite refused for a lock held elsewhere, so nothing was done and a retry may work.

    ``sqlite_errorcode`` is the extended code (e.g. SQLITE_BUSY_RECOVERY); its low
    byte is the primary one.
    """
    return getattr(exc, "sqlite_errorcode", 0) & 0xFF in _BUSY_CODES


def is_read_only(exc: sqlite3.Error) -> bool:
    """Whether SQLite refused a write on a connection it opened read-only: it does so,
    without a word, when the process may not write the file as the connection opens."""
    return getattr(exc, "sqlite_errorcode", 0) & 0xFF == sqlite3.SQLITE_READONLY


class WriteRefused(Exception):
    """A :class:`GuardedConnection` refused the transaction it had just begun; nothing
    was changed, and the caller may run the same work on another connection."""


class GuardedConnection(sqlite3.Connection):
    """A connection whose :class:`transaction` asks ``refuse_write`` whether to go on, once
    ``BEGIN IMMEDIATE`` holds the write lock and nothing else can change the WAL, and runs
    its statements on one cursor, ``statements``.
    """

    refuse_write: Callable[[], bool] | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # A transaction's statements go through this one cursor (see transaction): each
        # Connection.execute makes and registers a cursor of its own.
        self.statements = self.cursor()


class transaction:
    """``BEGIN IMMEDIATE`` … ``COMMIT``, rolled back on any error, the COMMIT's own included.

    IMMEDIATE takes the write lock up front, so a read-modify-write inside
    cannot interleave with another connection's, and on a connection that does
    not wait for locks the only "busy" comes from the BEGIN, before any work.

    Entered, it gives the cursor to run the transaction's statements on: a
    :class:`GuardedConnection`'s own, else a new one. ``Connection.execute`` makes and
    registers a cursor for every statement: a write of one key ran 1.3% fewer
    instructions without (262.8k against 266.1k a request, the SQLite write scenario of
    ``benchmarks/instructions.py``). A statement left unfinished on it is reset by the
    next, at the latest the ``COMMIT`` or ``ROLLBACK``, so none keeps a read open after.
    """

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> sqlite3.Cursor:
        db = self.db
        cursor: sqlite3.Cursor | None = getattr(db, "statements", None)
        if cursor is None:
            cursor = db.cursor()
        self.cursor = cursor
        cursor.execute("BEGIN IMMEDIATE")
        refuse_write = getattr(db, "refuse_write", None)
        if refuse_write is not None and refuse_write():
            cursor.execute("ROLLBACK")
            raise WriteRefused
        return cursor

    def __exit__(self, exc_type: object, exc: object, traceback: object) -> None:
        if exc_type is not None:
            self.cursor.execute("ROLLBACK")
            return
        try:
            self.cursor.execute("COMMIT")
        except BaseException:
            # A failed COMMIT can leave the transaction open, holding the write lock;
            # the caller may retry the work elsewhere, so nothing of it may survive.
            if self.db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    self.db.execute("ROLLBACK")
            raise


def checkpoint(db: sqlite3.Connection) -> None:
    """Copy the WAL into the database file (PASSIVE: waits for nobody).

    It fsyncs the WAL first, writing out every page commits added since the
    last checkpoint (commits do not fsync), then the database file.
    """
    # A checkpoint that fails only lets the WAL grow until the next one.
    with contextlib.suppress(sqlite3.Error):
        db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()


def start_wal_over(db: sqlite3.Connection, *, wait_ms: int) -> None:
    """Commit one page, the database header as it was: after a checkpoint that copied every
    frame, that commit starts the WAL over (and fsyncs its header) here, instead of in
    whichever commit comes next. No reader sees a change.

    It waits at most ``wait_ms`` for the write lock, and gives up quietly: another
    connection's commit may come first (then this one only adds a page), or a reader
    may hold the WAL; the caller checks whether the WAL started over.
    """
    (waits,) = db.execute("PRAGMA busy_timeout").fetchone()
    db.execute(f"PRAGMA busy_timeout = {int(wait_ms)}")
    try:
        with contextlib.suppress(sqlite3.Error), transaction(db):
            (version,) = db.execute("PRAGMA user_version").fetchone()
            db.execute(f"PRAGMA user_version = {int(version)}")
    finally:
        db.execute(f"PRAGMA busy_timeout = {int(waits)}")


def checkpoint_then(db: sqlite3.Connection, work: Callable[[sqlite3.Connection], T]) -> T:
    """:func:`checkpoint`, then run ``work``.

    When the checkpoint copied everything, the next commit restarts the WAL
    from its beginning and fsyncs the WAL header once; running ``work`` right
    here makes that commit, and its fsync, happen on this thread.
    """
    checkpoint(db)
    return work(db)


def enable_wal(db: sqlite3.Connection, *, timeout: float) -> None:
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
            if not is_busy(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)  # on the writer thread, never the event loop
