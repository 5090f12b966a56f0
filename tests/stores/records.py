"""Building store records for the store tests, with fresh ids and digests every time."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Mapping
from typing import Any

from authsessions._records import DeviceType, SessionRecord, SessionUpdate
from authsessions._tokens import new_session_id, new_token, token_digest
from authsessions.stores import Store

__all__ = [
    "TTL",
    "make_record",
    "make_update",
    "new_digest",
    "rotate_away",
    "start_time",
    "typed",
]

TTL = 3600.0
"""Lifetime of a record built here, in seconds."""


def start_time() -> float:
    """A whole-second "now" near the real clock.

    Tests count from it with whole seconds, so every timestamp survives a
    store that keeps times to the second, and records expire (for the test)
    in the real future, which keeps stores that also set a native TTL honest.
    """
    return float(int(time.time()))


def new_digest() -> str:
    """The digest of a fresh token, as the session layer would store it."""
    return token_digest(new_token())


def make_record(
    *,
    now: float,
    user_id: str = "alice",
    data: Mapping[str, Any] | None = None,
    ttl: float = TTL,
    last_active_at: float | None = None,
    ip_address: str | None = "203.0.113.7",
    user_agent: str | None = "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_4) Chrome/124.0",
    device_name: str = "Chrome on macOS",
    device_type: DeviceType = "desktop",
    fingerprint: str = "f" * 64,
) -> SessionRecord:
    """A session created at ``now`` that expires ``ttl`` seconds later."""
    return SessionRecord(
        id=new_session_id(),
        token_digest=new_digest(),
        user_id=user_id,
        ip_address=ip_address,
        user_agent=user_agent,
        device_name=device_name,
        device_type=device_type,
        fingerprint=fingerprint,
        data=dict(data) if data is not None else {},
        created_at=now,
        last_active_at=now if last_active_at is None else last_active_at,
        expires_at=now + ttl,
    )


def make_update(
    *,
    now: float,
    ttl: float = TTL,
    set_keys: Mapping[str, Any] | None = None,
    removed_keys: frozenset[str] = frozenset(),
    token_digest: str | None = None,
    max_data_bytes: int | None = None,
    moves_expiry: bool = True,
    expected_token_digest: str | None = None,
    rotated_away_until: float | None = None,
) -> SessionUpdate:
    """Activity at ``now``: the session's expiry slides to ``now + ttl``; without
    ``moves_expiry``, a write that leaves the times as stored.
    """
    return SessionUpdate(
        last_active_at=now if moves_expiry else None,
        expires_at=now + ttl if moves_expiry else None,
        set_keys=dict(set_keys) if set_keys is not None else {},
        removed_keys=removed_keys,
        token_digest=token_digest,
        max_data_bytes=max_data_bytes,
        expected_token_digest=expected_token_digest,
        rotated_away_until=rotated_away_until,
    )


async def rotate_away(
    store: Store, record: SessionRecord, *, now: float, until: float | None
) -> str:
    """Rotate ``record``'s session from the digest ``record`` holds to a new one, as the
    session layer does, remembering the old one as rotated away until ``until``; returns
    the new digest."""
    rotated = new_digest()
    update = make_update(
        now=now,
        token_digest=rotated,
        expected_token_digest=record.token_digest,
        rotated_away_until=until,
    )
    assert await store.update(record.id, update, now=now)
    return rotated


def typed(value: Any) -> str:
    """``value`` as canonical JSON, so ``1`` and ``1.0`` (or ``1`` and ``True``) differ.

    ``==`` treats them as equal; a store that turns a float into an int does not.
    Keys are sorted: JSON objects are unordered and some databases reorder them.
    """
    return json.dumps(value, sort_keys=True, allow_nan=False)


def check_kept_after_racing_creates(
    kept_ids: list[str], created: list[SessionRecord], limit: int
) -> None:
    """The user's sessions after ``created`` raced to be stored with ``max_sessions=limit``.

    Which ones stay depends on the order the creates ran in: each keeps its own session
    and the ``limit - 1`` most recently active others, so the most recent one always stays.
    """
    assert len(kept_ids) == limit
    assert set(kept_ids) <= {record.id for record in created}
    assert created[-1].id in kept_ids


async def read_and_write_until(
    done: threading.Event, store: Store, records: list[SessionRecord], now: float
) -> int:
    """Look up and write ``records``' sessions in turn, as requests would, until ``done``
    is set (by another thread); returns how many turns ran. Each must find its session.
    """
    served = 0
    while not done.is_set():
        record = records[served % len(records)]
        assert await store.get(record.token_digest, now=now) is not None
        update = make_update(now=now + 1, set_keys={"n": served})
        assert await store.update(record.id, update, now=now + 1)
        served += 1
        await asyncio.sleep(0)
    return served
