"""SQLiteStore's cache of the session rows it read, and what its own writes do to it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from authsessions._records import SessionRecord

__all__ = ["CacheChange", "RecordCache", "UsersSessions"]


@dataclass(frozen=True, slots=True)
class UsersSessions:
    """Every session of one user, for :meth:`RecordCache.advance` to forget (a write that
    deleted some of them, not known by id)."""

    user_id: str


CacheChange = str | tuple[SessionRecord, str] | UsersSessions
"""What a write did to the cache's sessions, for :meth:`RecordCache.advance`."""


class RecordCache:
    """Records of the session table by token digest, trusted only while nothing was committed
    but the store's own writes, whose sessions it replaces or forgets.

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

    Each record's data is kept twice: decoded in the record, for lookups, and as
    the JSON the row holds, for the store's next write to that session to merge
    into without reading the row again (see ``SQLiteStore.update``). Bounded in
    rows and in characters of that JSON (sessions may hold up to
    ``max_data_bytes`` each). When full it is simply emptied: a commit
    elsewhere empties it anyway, and a hit pays no recency bookkeeping.
    """

    __slots__ = ("_chars", "_entries", "_rows", "_users", "_version", "max_chars", "max_rows")

    def __init__(self, *, max_rows: int = 10_000, max_chars: int = 16 << 20) -> None:
        self.max_rows = max_rows
        self.max_chars = max_chars
        self._rows: dict[str, SessionRecord] = {}
        # session id -> its token digest and data as JSON, to find or forget a session by id
        self._entries: dict[str, tuple[str, str]] = {}
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

    def put(self, token_digest: str, record: SessionRecord, data_json: str) -> None:
        """Keep ``record``, read after the latest :meth:`get`, whose row holds ``data_json``.

        A commit between that ``get`` and the read only makes the record
        newer than its version says, and the next ``get`` drops it.
        """
        data_chars = len(data_json)
        kept = self._entries.get(record.id)
        if kept is not None:
            chars = self._chars + data_chars - len(kept[1])
            if (
                kept[0] == token_digest
                and self._rows[token_digest].user_id == record.user_id
                and chars <= self.max_chars
            ):
                # The usual replacement, by the store's own write: the same row and user.
                self._rows[token_digest] = record
                self._entries[record.id] = (token_digest, data_json)
                self._chars = chars
                return
            # Kept under another digest (a commit came between that get and the read), or
            # anything else: forgotten, then kept as if new.
            self._forget(record.id)
        if data_chars > self.max_chars:
            return
        if len(self._rows) >= self.max_rows or self._chars + data_chars > self.max_chars:
            self._empty()
        self._rows[token_digest] = record
        self._entries[record.id] = (token_digest, data_json)
        self._users.setdefault(record.user_id, set()).add(record.id)
        self._chars += data_chars

    def kept(self, session_id: str) -> tuple[SessionRecord, str] | None:
        """The record kept for the session ``session_id`` and its data as JSON, if any."""
        entry = self._entries.get(session_id)
        return None if entry is None else (self._rows[entry[0]], entry[1])

    def advance(self, version: object, changes: Sequence[CacheChange]) -> None:
        """The one commit since the kept version was the store's own, which made ``version``
        and changed only the sessions ``changes`` names: a session id, to forget; a
        session's record as the commit left it with its data as JSON, to keep instead;
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
        # _rows, _entries and _users always hold the same sessions.
        user_id = self._rows.pop(entry[0]).user_id
        self._chars -= len(entry[1])
        user_sessions = self._users[user_id]
        user_sessions.discard(session_id)
        if not user_sessions:
            del self._users[user_id]

    def clear(self) -> None:
        """Forget every row and the version they were read under."""
        self._empty()
        self._version = None

    def _empty(self) -> None:
        self._rows.clear()
        self._entries.clear()
        self._users.clear()
        self._chars = 0
