"""The parts of SQLiteStore that work on a bare connection: transactions, locks, the row cache."""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from authsessions._records import SessionRecord

__all__ = [
    "CacheChange",
    "GuardedConnection",
    "RecordCache",
    "UsersSessions",
    "WriteRefused",
    "checkpoint",
    "checkpoint_then",
    "enable_wal",
    "is_busy",
    "start_wal_over",
    "transaction",
]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class UsersSessions:
    """Every session of one user, for :meth:`RecordCache.advance` to forget (a write that
    deleted some of them, not known by id)."""

    user_id: str


CacheChange = str | tuple[SessionRecord, int] | UsersSessions
"""What a write did to the cache's sessions, for :meth:`RecordCache.advance`."""

_BUSY_CODES = {sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED}


def is_busy(exc: sqlite3.Error) -> bool:
    """Whether SQLite refused for a lock held elsewhere, so nothing was done and a retry may work.

    ``sqlite_errorcode`` is the extended code (e.g. SQLITE_BUSY_RECOVERY); its low
    byte is the primary one.
    """
    return getattr(exc, "sqlite_errorcode", 0) & 0xFF in _BUSY_CODES


class WriteRefused(Exception):
    """A :class:`GuardedConnection` refused the transaction it had just begun; nothing
    was changed, and the caller may run the same work on another connection."""


class GuardedConnection(sqlite3.Connection):
    """A connection whose :class:`transaction` asks ``refuse_write`` whether to go on, once
    ``BEGIN IMMEDIATE`` holds the write lock and nothing else can change the WAL.
    """

    refuse_write: Callable[[], bool] | None = None


class transaction:
    """``BEGIN IMMEDIATE`` … ``COMMIT``, rolled back on any error, the COMMIT's own included.

    IMMEDIATE takes the write lock up front, so a read-modify-write inside
    cannot interleave with another connection's, and on a connection that does
    not wait for locks the only "busy" comes from the BEGIN, before any work.
    """

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> sqlite3.Connection:
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        refuse_write = getattr(db, "refuse_write", None)
        if refuse_write is not None and refuse_write():
            db.execute("ROLLBACK")
            raise WriteRefused
        return db

    def __exit__(self, exc_type: object, exc: object, traceback: object) -> None:
        if exc_type is not None:
            self.db.execute("ROLLBACK")
            return
        try:
            self.db.execute("COMMIT")
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


class RecordCache:
    """Records of the session table by token digest, trusted only while nothing was committed
    but the store's own writes, whose rows it forgets.

    Each lookup passes :meth:`get` a version of the whole database that every
    commit by another connection changes (the store's writer thread, another
    process): the WAL-index header, or ``PRAGMA data_version`` on the event
    loop's connection. An unchanged version proves every cached record is still
    what the table holds. After a commit of its own on the event loop, the
    store either moves the cache to the version that commit made, forgetting
    the sessions it changed (:meth:`advance`), or, when it cannot tell that
    nobody else committed, empties it (:meth:`clear`). A hit hands out the
    cached record itself, which callers treat as read-only (see
    ``Store.get``): no JSON decode, no copy.

    Bounded in rows and in characters of data (sessions may hold up to
    ``max_data_bytes`` each). When full it is simply emptied: a commit
    elsewhere empties it anyway, and a hit pays no recency bookkeeping.
    """

    __slots__ = ("_chars", "_entries", "_rows", "_users", "_version", "max_chars", "max_rows")

    def __init__(self, *, max_rows: int = 10_000, max_chars: int = 16 << 20) -> None:
        self.max_rows = max_rows
        self.max_chars = max_chars
        self._rows: dict[str, SessionRecord] = {}
        # session id -> its token digest and data length, to forget a session by id
        self._entries: dict[str, tuple[str, int]] = {}
        self._users: dict[str, set[str]] = {}  # user id -> the ids of the user's kept sessions
        self._chars = 0
        self._version: object = None

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def version(self) -> object:
        """The version the kept records were read under (``None`` when there are none)."""
        return self._version

    def get(self, version: object, token_digest: str) -> SessionRecord | None:
        """The record kept for ``token_digest``; none at all unless ``version`` is the
        one the kept records were read under (otherwise they are dropped, and this version
        becomes theirs).
        """
        if version != self._version:
            self.clear()
            self._version = version
            return None
        return self._rows.get(token_digest)

    def put(self, token_digest: str, record: SessionRecord, data_chars: int) -> None:
        """Keep ``record``, read after the latest :meth:`get`.

        A commit between that ``get`` and the read only makes the record
        newer than its version says, and the next ``get`` drops it.
        """
        if record.id in self._entries:
            # Kept under another digest: a commit came between that get and the read.
            self._forget(record.id)
        if data_chars > self.max_chars:
            return
        if len(self._rows) >= self.max_rows or self._chars + data_chars > self.max_chars:
            self._rows.clear()
            self._entries.clear()
            self._users.clear()
            self._chars = 0
        self._rows[token_digest] = record
        self._entries[record.id] = (token_digest, data_chars)
        self._users.setdefault(record.user_id, set()).add(record.id)
        self._chars += data_chars

    def kept(self, session_id: str) -> SessionRecord | None:
        """The record kept for the session ``session_id``, if any."""
        entry = self._entries.get(session_id)
        return None if entry is None else self._rows.get(entry[0])

    def advance(self, version: object, changes: Sequence[CacheChange]) -> None:
        """The one commit since the kept version was the store's own, which made ``version``
        and changed only the sessions ``changes`` names: a session id, to forget; a
        session's record as the commit left it with its data's length, to keep instead;
        or a user, whose sessions to forget.
        """
        for change in changes:
            if isinstance(change, str):
                self._forget(change)
            elif isinstance(change, UsersSessions):
                for session_id in tuple(self._users.get(change.user_id, ())):
                    self._forget(session_id)
            else:
                self.put(change[0].token_digest, *change)
        self._version = version

    def _forget(self, session_id: str) -> None:
        entry = self._entries.pop(session_id, None)
        if entry is None:
            return
        record = self._rows.pop(entry[0], None)
        self._chars -= entry[1]
        if record is not None:
            user_sessions = self._users.get(record.user_id)
            if user_sessions is not None:
                user_sessions.discard(session_id)
                if not user_sessions:
                    del self._users[record.user_id]

    def clear(self) -> None:
        """Forget every row and the version they were read under."""
        self._rows.clear()
        self._entries.clear()
        self._users.clear()
        self._chars = 0
        self._version = None
