"""What every store checks of its arguments before any store access.

Each primitive but ``Store.get`` (on every request's path) calls its ``*_args`` check
first, so a wrong-typed id, a time that is not one or a key no store keeps alike is a
``TypeError`` or ``ValueError`` in every store, and nothing is stored. The session
layer's own records and updates (``CheckedRecord``, ``CheckedUpdate``) are valid by
construction and pass after one class comparison.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import cast, get_args

from authsessions._records import (
    MAX_COUNT,
    CheckedRecord,
    CheckedUpdate,
    DeviceType,
    SessionRecord,
    SessionUpdate,
    check_user_id,
)

__all__ = [
    "create_args",
    "delete_args",
    "delete_expired_args",
    "delete_for_user_args",
    "list_for_user_args",
    "require_count",
    "require_seconds",
    "require_str",
    "require_text",
    "require_time",
    "rotated_away_to_args",
    "update_args",
]


def require_count(name: str, value: object) -> None:
    """Refuse a count a store cannot honour (``max_sessions``, ``limit``) before any store
    access: an int from 1 to :data:`~authsessions._records.MAX_COUNT`. Without it a store
    would fail as if it were down (``None``, or a count PostgreSQL cannot bind), or keep
    nothing (0).

    Raises:
        TypeError: ``value`` is not an int (a bool is not one here).
        ValueError: ``value`` is below 1 or above ``MAX_COUNT``.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}.")
    if value < 1:
        raise ValueError(f"{name} must be at least 1, got {value}.")
    if value > MAX_COUNT:
        raise ValueError(f"{name} must be at most {MAX_COUNT}, got {value}.")


def require_seconds(name: str, value: object) -> None:
    """Refuse a timeout a store cannot honour, as it is built: a positive, finite number
    of seconds. 0 made every call time out, and infinity (or NaN) let a silent server
    hold a request for ever, where a store promises ``StoreUnavailable`` instead.

    Raises:
        TypeError: ``value`` is not an int or a float (a bool is not one here).
        ValueError: ``value`` is not above 0, or not finite.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number of seconds, got {type(value).__name__}.")
    if not 0 < value < math.inf:
        raise ValueError(f"{name} must be a number of seconds above 0, got {value!r}.")


def require_time(name: str, value: object) -> float:
    """``value`` as the float a store binds, refusing what is not a finite number of
    seconds before a store writes or deletes by it. A NaN ``now`` compares false with
    every expiry in Python and SQLite, but above every one in PostgreSQL, where it would
    delete every session it reached; an infinity would do that in every store, and an
    int past 2**63 SQLite cannot bind.

    Raises:
        TypeError: ``value`` is not an int or a float (a bool is not one here).
        ValueError: ``value`` is NaN, infinite or beyond a float.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a UNIX timestamp, got {type(value).__name__}.")
    try:
        finite = math.isfinite(value)
    except OverflowError:  # an int no float holds
        finite = False
    if not finite:
        raise ValueError(f"{name} must be a finite UNIX timestamp, got {value!r:.40}.")
    return float(value)


# The times a datetime holds, years 1 to 9999: listing a session turns each into one.
_EARLIEST = datetime(1, 1, 1, tzinfo=UTC).timestamp()
_LATEST = datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC).timestamp()


def _require_stored_time(name: str, value: object) -> None:
    """Refuse a time to store that is not a finite number a ``datetime`` can hold."""
    if not _EARLIEST <= require_time(name, value) <= _LATEST:
        raise ValueError(f"{name} must be a time in the years 1 to 9999, got {value!r:.40}.")


def require_str(name: str, value: object) -> None:
    """Refuse an id argument that is not a string before any store access: stores compare
    ids each in its own way, and a ``bytes`` id matched nothing in one store (so
    ``except_id`` kept nothing) and failed as if the store were down in another.

    Raises:
        TypeError: ``value`` is not a ``str``.
    """
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__}.")


def require_text(name: str, value: object) -> None:
    """:func:`require_str`, and refuse a string not every store keeps or looks up alike: one
    holding a NUL character, which PostgreSQL's ``text`` cannot hold (it failed as if the
    store were down, where the others kept it), or a lone surrogate, which has no UTF-8
    form (a raw ``UnicodeEncodeError`` in SQLite and Redis, after a cluster had claimed
    the session's pointers). Session data needs no such check: its keys and values are
    kept as JSON text, which escapes both.

    Raises:
        TypeError: ``value`` is not a ``str``.
        ValueError: ``value`` holds a NUL character or a lone surrogate.
    """
    require_str(name, value)
    text = cast(str, value)
    if "\x00" in text:
        raise ValueError(f"{name} must not contain a NUL character.")
    if not text.isascii():
        try:
            text.encode()
        except UnicodeEncodeError:
            raise ValueError(f"{name} must not contain a lone surrogate.") from None


# The longest session id or token digest a store keeps (the library's own are 22 and 64
# characters): PostgreSQL's index holds no key past about 2.7 kB.
MAX_KEY_LENGTH = 255

_DEVICE_TYPES = frozenset(get_args(DeviceType))


def _require_key(name: str, value: object) -> None:
    """:func:`require_text`, and refuse a session id or token digest that is empty (Redis
    reads "" as none) or longer than ``MAX_KEY_LENGTH``.
    """
    require_text(name, value)
    length = len(cast(str, value))
    if not 0 < length <= MAX_KEY_LENGTH:
        raise ValueError(f"{name} must hold 1 to {MAX_KEY_LENGTH} characters, got {length}.")


def check_record(record: SessionRecord) -> None:
    """Refuse a record that a store would keep differently from another, or only in part,
    before any store access (``create``; see :func:`create_args`).

    Raises:
        TypeError, ValueError: naming the field.
    """
    if not isinstance(record, SessionRecord):
        raise TypeError(f"record must be a SessionRecord, got {type(record).__name__}.")
    for name in ("id", "token_digest"):
        _require_key(f"record.{name}", getattr(record, name))
    for name in ("device_name", "device_type", "fingerprint"):
        require_text(f"record.{name}", getattr(record, name))
    if record.device_type not in _DEVICE_TYPES:
        raise ValueError(
            f"record.device_type must be one of {sorted(_DEVICE_TYPES)}, "
            f"got {record.device_type!r:.40}."
        )
    check_user_id(record.user_id)
    for name in ("ip_address", "user_agent"):
        if getattr(record, name) is not None:
            require_text(f"record.{name}", getattr(record, name))
    if not isinstance(record.data, dict):  # JSON-encoded as it is by some stores
        raise TypeError(f"record.data must be a dict, got {type(record.data).__name__}.")
    _require_string_keys("record.data", record.data)
    for name in ("created_at", "last_active_at", "expires_at"):
        _require_stored_time(f"record.{name}", getattr(record, name))


def create_args(
    record: SessionRecord, max_sessions: object, now: object, replaced: object = None
) -> float:
    """What ``Store.create`` checks before any store access; returns ``now`` as a float.

    The session layer's logins pass unchecked: it built the record (a
    :class:`CheckedRecord`), took ``max_sessions`` from a checked config, ``now``
    from the clock and ``replaced`` from a stored record.
    """
    if record.__class__ is CheckedRecord:
        return cast(float, now)
    check_record(record)
    require_count("max_sessions", max_sessions)
    if replaced is not None:
        if not isinstance(replaced, tuple) or len(replaced) != 2:
            raise TypeError("replaced must be a (token digest, time) tuple, or None.")
        _require_key("replaced's token digest", replaced[0])
        _require_stored_time("replaced's time", replaced[1])
        if replaced[0] == record.token_digest:
            raise ValueError("replaced names the new record's own token digest.")
    return require_time("now", now)


def update_args(session_id: object, changes: SessionUpdate, now: object) -> float:
    """What ``Store.update`` checks before any store access; returns ``now`` as a float.

    It refuses an update a store would apply only in part, or differently from another
    (Redis stored a lone expiry, and then no read of the session worked).

    Raises:
        TypeError, ValueError: naming the argument or field.
    """
    if changes.__class__ is CheckedUpdate:
        # The session layer's, on every write and touch: it built the update (checked as
        # keys were set), took the id from a stored record and now from the clock.
        return cast(float, now)
    require_text("session_id", session_id)
    if not isinstance(changes, SessionUpdate):
        raise TypeError(f"changes must be a SessionUpdate, got {type(changes).__name__}.")
    last_active_at, expires_at = changes.last_active_at, changes.expires_at
    if (last_active_at is None) != (expires_at is None):
        raise ValueError("last_active_at and expires_at must be given together, or neither.")
    if last_active_at is not None:
        _require_stored_time("changes.last_active_at", last_active_at)
        _require_stored_time("changes.expires_at", expires_at)
    elif changes.token_digest is not None:
        raise ValueError("a new token_digest comes with last_active_at and expires_at.")
    _require_string_keys("changes.set_keys", changes.set_keys)
    if not isinstance(changes.removed_keys, frozenset):
        raise TypeError("changes.removed_keys must be a frozenset of str.")
    for key in changes.removed_keys:
        require_str("a key in changes.removed_keys", key)
    if changes.token_digest is not None:
        _require_key("changes.token_digest", changes.token_digest)
    if changes.expected_token_digest is not None:
        _require_key("changes.expected_token_digest", changes.expected_token_digest)
    if changes.max_data_bytes is not None:
        require_count("changes.max_data_bytes", changes.max_data_bytes)
    if changes.rotated_away_until is not None:
        if changes.token_digest is None or changes.expected_token_digest is None:
            raise ValueError(
                "changes.rotated_away_until comes with a new token_digest and the "
                "expected_token_digest it rotates away from."
            )
        _require_stored_time("changes.rotated_away_until", changes.rotated_away_until)
    if changes.touch_if_last_active_by is not None:
        if last_active_at is None:
            raise ValueError(
                "changes.touch_if_last_active_by comes with last_active_at and expires_at."
            )
        _require_stored_time("changes.touch_if_last_active_by", changes.touch_if_last_active_by)
    return require_time("now", now)


def rotated_away_to_args(token_digest: object, now: object) -> float:
    """What ``Store.rotated_away_to`` checks before any store access; returns ``now``."""
    _require_key("token_digest", token_digest)
    return require_time("now", now)


def delete_args(session_id: object, user_id: object, token_digest: object, now: object) -> float:
    """What ``Store.delete`` checks before any store access; returns ``now``."""
    require_text("session_id", session_id)
    if user_id is not None:
        require_text("user_id", user_id)
    if token_digest is not None:
        _require_key("token_digest", token_digest)
    return require_time("now", now)


def delete_for_user_args(user_id: object, except_id: object, now: object) -> float:
    """What ``Store.delete_for_user`` checks before any store access; returns ``now``."""
    require_text("user_id", user_id)
    if except_id is not None:
        require_text("except_id", except_id)
    return require_time("now", now)


def list_for_user_args(user_id: object, now: object) -> float:
    """What ``Store.list_for_user`` checks before any store access; returns ``now``."""
    require_text("user_id", user_id)
    return require_time("now", now)


def delete_expired_args(now: object, limit: object) -> float:
    """What ``Store.delete_expired`` checks before any store access; returns ``now``."""
    require_count("limit", limit)
    return require_time("now", now)


def _require_string_keys(name: str, data: object) -> None:
    # PostgreSQL and Redis keep each top-level key apart (a jsonb key, a hash field): a
    # key of another type made a session no store could read back.
    if not isinstance(data, Mapping):
        raise TypeError(f"{name} must be a mapping, got {type(data).__name__}.")
    for key in data:
        require_str(f"a key in {name}", key)
