"""A store in this process's memory, for tests and single-process development.

Every primitive but ``delete_expired`` runs without awaiting, so each is atomic
on the event loop; a cleanup lets requests run after every hundred sessions.
Data is kept as JSON text, as a database would keep it, so no caller can
change a stored session by mutating an object it was handed.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import heapq
import itertools
from collections.abc import Iterable
from typing import Any

from authsessions._records import SessionRecord, SessionUpdate, StoreStats, dump_json, load_json
from authsessions.stores import _checks
from authsessions.stores._base import CreateError, DataTooLarge, Store

__all__ = ["MemoryStore"]

_CLEANUP_STEP = 100
"""Sessions a cleanup removes between two turns of the event loop (0.1 to 0.2 ms of work)."""


@dataclasses.dataclass(slots=True)
class _Row:
    record: SessionRecord
    data_json: str
    rotated_away_from: str | None = None
    rotated_away_until: float = 0.0


class MemoryStore(Store):
    """Sessions in a dict: fast, and gone when the process exits.

    Not shared between processes or app servers; use ``SQLiteStore``,
    ``PostgresStore`` or ``RedisStore`` for that.
    """

    def __init__(self) -> None:
        self._rows: dict[str, _Row] = {}
        self._ids_by_digest: dict[str, str] = {}
        self._ids_by_rotated_away_digest: dict[str, str] = {}
        self._ids_by_user: dict[str, set[str]] = {}
        # Sessions filed by the minute they expire in, and a heap of those minutes: a
        # cleanup reads only expired sessions (and the current minute's), where a scan of
        # the dict would pass every live session again in each batch.
        self._ids_by_expiry_minute: dict[int, dict[str, None]] = {}
        self._expiry_minutes: list[int] = []

    def __repr__(self) -> str:
        return f"MemoryStore(<{len(self._rows)} sessions>)"

    async def create(
        self,
        record: SessionRecord,
        *,
        max_sessions: int,
        now: float,
        replaced: tuple[str, float] | None = None,
    ) -> None:
        self._require_open()
        now = _checks.create_args(record, max_sessions, now, replaced)
        if record.id in self._rows or record.token_digest in self._ids_by_digest:
            raise CreateError(record.id)
        row = self._rows[record.id] = _Row(record.with_data({}), dump_json(record.data))
        if replaced is not None:
            self._mark_rotated_away(record.id, row, *replaced)
        self._ids_by_digest[record.token_digest] = record.id
        self._ids_by_user.setdefault(record.user_id, set()).add(record.id)
        self._file_expiry(record.id, record.expires_at)
        others = [row for row in self._rows_of(record.user_id) if row.record.id != record.id]
        for row in others:
            if row.record.expires_at <= now:
                self._remove(row.record.id)
        live = (row for row in others if row.record.expires_at > now)
        for row in _most_recent_first(live)[max_sessions - 1 :]:
            self._remove(row.record.id)

    async def get(self, token_digest: str, *, now: float) -> SessionRecord | None:
        if not self._is_open:  # written out: every request runs this
            raise self._closed_error()
        session_id = self._ids_by_digest.get(token_digest)
        if session_id is None:
            return None
        row = self._rows[session_id]
        if row.record.expires_at <= now:
            return None
        return _materialise(row)

    async def update(self, session_id: str, changes: SessionUpdate, *, now: float) -> bool:
        self._require_open()
        now = _checks.update_args(session_id, changes, now)
        row = self._rows.get(session_id)
        if row is None or row.record.expires_at <= now:
            return False
        expected = changes.expected_token_digest
        if expected is not None and row.record.token_digest != expected:
            return False
        digest = changes.token_digest
        if digest is not None and self._ids_by_digest.get(digest, session_id) != session_id:
            raise CreateError(session_id)
        if changes.changes_data:
            data: dict[str, Any] = load_json(row.data_json)
            for key in changes.removed_keys:
                data.pop(key, None)
            data.update(changes.set_keys)
            data_json = dump_json(data)
            cap = changes.size_cap
            # len(dump_json(data)) is data_size(data), without encoding the data twice.
            if cap is not None and len(data_json) > cap:
                raise DataTooLarge(len(data_json), cap)
            row.data_json = data_json
        record = row.record
        if changes.token_digest is not None:
            del self._ids_by_digest[record.token_digest]
            if (
                changes.rotated_away_until is not None
                and changes.token_digest != record.token_digest
            ):
                self._mark_rotated_away(
                    session_id, row, record.token_digest, changes.rotated_away_until
                )
            record.token_digest = changes.token_digest
            self._ids_by_digest[record.token_digest] = session_id
        cutoff = changes.touch_if_last_active_by
        if (
            changes.last_active_at is not None
            and changes.expires_at is not None
            and (cutoff is None or record.last_active_at <= cutoff)
        ):
            del self._ids_by_expiry_minute[_minute(record.expires_at)][session_id]
            record.last_active_at = changes.last_active_at
            record.expires_at = changes.expires_at
            self._file_expiry(session_id, record.expires_at)
        return True

    async def rotated_away_to(self, token_digest: str, *, now: float) -> str | None:
        self._require_open()
        now = _checks.rotated_away_to_args(token_digest, now)
        session_id = self._ids_by_rotated_away_digest.get(token_digest)
        row = None if session_id is None else self._rows[session_id]
        if row is not None and row.rotated_away_until > now and row.record.expires_at > now:
            return session_id
        return None

    async def delete(
        self,
        session_id: str,
        *,
        now: float,
        user_id: str | None = None,
        token_digest: str | None = None,
    ) -> bool:
        self._require_open()
        now = _checks.delete_args(session_id, user_id, token_digest, now)
        row = self._rows.get(session_id)
        if (
            row is None
            or (user_id is not None and row.record.user_id != user_id)
            or (token_digest is not None and row.record.token_digest != token_digest)
        ):
            return False
        self._remove(session_id)
        return row.record.expires_at > now

    async def delete_for_user(
        self, user_id: str, *, now: float, except_id: str | None = None
    ) -> int:
        self._require_open()
        now = _checks.delete_for_user_args(user_id, except_id, now)
        doomed = [sid for sid in self._ids_by_user.get(user_id, ()) if sid != except_id]
        live = sum(self._rows[sid].record.expires_at > now for sid in doomed)
        for session_id in doomed:
            self._remove(session_id)
        return live

    async def list_for_user(self, user_id: str, *, now: float) -> list[SessionRecord]:
        self._require_open()
        now = _checks.list_for_user_args(user_id, now)
        live = (row for row in self._rows_of(user_id) if row.record.expires_at > now)
        return [_materialise(row) for row in _most_recent_first(live)]

    async def delete_expired(self, *, now: float, limit: int = 1000) -> int:
        self._require_open()
        now = _checks.delete_expired_args(now, limit)
        current = _minute(now)
        deleted = 0
        while deleted < limit:
            step = min(_CLEANUP_STEP, limit - deleted)
            removed = self._remove_from_past_minutes(current, step)
            deleted += removed
            if removed < step:
                break
            # Requests go on between steps: a batch in one go held them up for its whole length.
            await asyncio.sleep(0)
        if deleted < limit:
            # The current minute has expired in part: one pass finds its expired sessions,
            # where a pass per step would go over its live ones again each time.
            in_current = self._ids_by_expiry_minute.get(current, {})
            expired = (sid for sid in in_current if self._rows[sid].record.expires_at <= now)
            doomed = list(itertools.islice(expired, limit - deleted))
            for start in range(0, len(doomed), _CLEANUP_STEP):
                if start:
                    await asyncio.sleep(0)
                for session_id in doomed[start : start + _CLEANUP_STEP]:
                    row = self._rows.get(session_id)  # a request may have ended it meanwhile
                    if row is not None and row.record.expires_at <= now:
                        self._remove(session_id)
                        deleted += 1
        return deleted

    async def stats(self, *, now: float) -> StoreStats:
        """Counts over every session in the dict: O(sessions), for admin tools."""
        self._require_open()
        now = _checks.require_time("now", now)
        live = [row.record for row in self._rows.values() if row.record.expires_at > now]
        return StoreStats(
            live_sessions=len(live),
            users=len({record.user_id for record in live}),
            by_device_type=dict(collections.Counter(record.device_type for record in live)),
            expired_sessions=len(self._rows) - len(live),
        )

    def _rows_of(self, user_id: str) -> list[_Row]:
        return [self._rows[session_id] for session_id in self._ids_by_user.get(user_id, ())]

    def _file_expiry(self, session_id: str, expires_at: float) -> None:
        minute = _minute(expires_at)
        ids = self._ids_by_expiry_minute.get(minute)
        if ids is None:
            ids = self._ids_by_expiry_minute[minute] = {}
            heapq.heappush(self._expiry_minutes, minute)
        ids[session_id] = None

    def _remove_from_past_minutes(self, current: int, count: int) -> int:
        """Remove at most ``count`` sessions filed under minutes before ``current``, all
        of them expired, earliest minute first."""
        removed = 0
        minutes = self._expiry_minutes
        while minutes and minutes[0] < current and removed < count:
            ids = self._ids_by_expiry_minute[minutes[0]]
            # popitem() takes the last one filed, with no scan: iterating would pass every
            # slot emptied by the steps before again.
            for _ in range(min(count - removed, len(ids))):
                self._forget(ids.popitem()[0])
                removed += 1
            if not ids:
                del self._ids_by_expiry_minute[heapq.heappop(minutes)]
        return removed

    def _remove(self, session_id: str) -> None:
        expires_at = self._rows[session_id].record.expires_at
        del self._ids_by_expiry_minute[_minute(expires_at)][session_id]
        self._forget(session_id)

    def _forget(self, session_id: str) -> None:
        """Remove a session from every index but the expiry minutes'."""
        row = self._rows.pop(session_id)
        del self._ids_by_digest[row.record.token_digest]
        self._forget_rotated_away(row)
        user_ids = self._ids_by_user[row.record.user_id]
        user_ids.discard(session_id)
        if not user_ids:
            del self._ids_by_user[row.record.user_id]

    def _mark_rotated_away(self, session_id: str, row: _Row, digest: str, until: float) -> None:
        """Remember that ``row``'s session was rotated away from ``digest`` until ``until``:
        its latest such digest, in place of any earlier one."""
        self._forget_rotated_away(row)
        # One session per digest rotated away from (two never share one, but with random
        # tokens): forgetting either must not find the other's gone.
        if (before := self._ids_by_rotated_away_digest.get(digest)) is not None:
            self._rows[before].rotated_away_from = None
        row.rotated_away_from, row.rotated_away_until = digest, until
        self._ids_by_rotated_away_digest[digest] = session_id

    def _forget_rotated_away(self, row: _Row) -> None:
        if row.rotated_away_from is not None:
            del self._ids_by_rotated_away_digest[row.rotated_away_from]
            row.rotated_away_from = None


def _minute(timestamp: float) -> int:
    return int(timestamp // 60)


def _most_recent_first(rows: Iterable[_Row]) -> list[_Row]:
    return sorted(
        rows, key=lambda row: (row.record.last_active_at, row.record.created_at), reverse=True
    )


def _materialise(row: _Row) -> SessionRecord:
    return row.record.with_data(load_json(row.data_json))
