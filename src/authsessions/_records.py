"""What a session is, as callers see it and as stores keep it."""

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

__all__ = [
    "CheckedRecord",
    "CheckedUpdate",
    "DeviceType",
    "SessionData",
    "SessionRecord",
    "SessionUpdate",
    "StoreStats",
    "check_user_id",
    "copy_json",
    "data_size",
    "dump_json",
    "load_json",
]

DeviceType = Literal["desktop", "mobile", "tablet", "bot", "other"]
MAX_USER_ID_LENGTH = 255
# The most sessions per user, data bytes per session or sessions per cleanup batch: what
# PostgreSQL binds as an integer (int4). Beyond it a store failed as if it were down.
MAX_COUNT = 2**31 - 1


# Built once: json.dumps with any option builds a new encoder per call, and even a kept
# JSONEncoder builds its C encoder in Python on every encode(); this calls that C encoder.
_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)
_DECODER = json.JSONDecoder()
_make_c_encoder = getattr(json.encoder, "c_make_encoder", None)  # None without the C module
_encode_chunks = (
    _make_c_encoder(
        # No table of containers being encoded (it is what finds cycles): a cycle then
        # recurses until RecursionError, which callers treat as "no JSON form" as well.
        None,
        _ENCODER.default,
        json.encoder.encode_basestring_ascii,
        None,  # indent
        ":",
        ",",
        False,  # sort_keys
        False,  # skipkeys
        False,  # allow_nan
    )
    if _make_c_encoder is not None
    else None
)


def dump_json(data: Any) -> str:
    """Compact, strict JSON: the one encoding of session data everywhere.

    Raises:
        TypeError, ValueError, RecursionError: ``data`` has no JSON form (NaN, a
            set, a cycle, ...).
    """
    if _encode_chunks is None:
        return _ENCODER.encode(data)
    return "".join(_encode_chunks(data, 0))


def copy_json(value: Any) -> Any:
    """A deep copy of plain JSON: lists and dicts are copied, the rest is immutable."""
    if type(value) is list:
        return [copy_json(item) for item in value]
    if type(value) is dict:
        return {key: copy_json(item) for key, item in value.items()}
    return value


def load_json(text: str) -> Any:
    """Decode what :func:`dump_json` wrote; ``json.loads`` less its regex passes over
    surrounding whitespace, which stored data never has.
    """
    return _DECODER.raw_decode(text)[0]


def data_size(data: Mapping[str, Any]) -> int:
    """The size of session data as ``max_data_bytes`` counts it: ``len(dump_json(data))``.

    The encoding escapes every non-ASCII character, so characters and bytes
    agree. The session layer and every store measure with exactly this; a
    store that keeps data in pieces (PostgreSQL, Redis) adds up the same
    length from them: ``{}`` is 2, and each key adds its JSON text, a colon,
    its value's JSON text and, after the first, a comma.
    """
    return len(dump_json(data))


def to_datetime(timestamp: float) -> datetime:
    """A UNIX timestamp as a timezone-aware UTC datetime."""
    return datetime.fromtimestamp(timestamp, UTC)


@dataclass(frozen=True, slots=True)
class SessionData:
    """One stored session, as returned to callers.

    ``id`` is the public handle used to revoke it; the token and its digest
    never appear here.
    """

    id: str
    user_id: str
    ip_address: str | None
    user_agent: str | None
    device_name: str
    device_type: DeviceType
    fingerprint: str
    data: dict[str, Any]
    created_at: datetime
    last_active_at: datetime
    expires_at: datetime
    is_current: bool = False


@dataclass(slots=True)
class SessionRecord:
    """One session as a store keeps it.

    Times are UNIX timestamps (seconds, UTC) so the per-request path compares
    floats; :meth:`to_data` turns them into datetimes for callers. A record
    from ``Store.get`` may be shared (a cache): nobody changes it, the session
    layer included, which makes a changed copy instead.
    """

    id: str
    token_digest: str = field(repr=False)  # kept out of logs and tracebacks
    user_id: str
    ip_address: str | None
    user_agent: str | None
    device_name: str
    device_type: DeviceType
    fingerprint: str
    data: dict[str, Any]
    created_at: float
    last_active_at: float
    expires_at: float

    def with_data(self, data: dict[str, Any]) -> "SessionRecord":
        """A copy holding ``data`` (positional: this sits on the per-request path)."""
        return SessionRecord(
            self.id,
            self.token_digest,
            self.user_id,
            self.ip_address,
            self.user_agent,
            self.device_name,
            self.device_type,
            self.fingerprint,
            data,
            self.created_at,
            self.last_active_at,
            self.expires_at,
        )

    def to_data(self, *, is_current: bool = False, copy_data: bool = True) -> SessionData:
        """A caller-facing copy, without the token digest.

        ``data`` is deep-copied unless ``copy_data`` is false, which is only for
        a record fresh from a store that nobody keeps: the caller then gets the
        record's own dict, sparing a deep copy per session.
        """
        return SessionData(
            id=self.id,
            user_id=self.user_id,
            ip_address=self.ip_address,
            user_agent=self.user_agent,
            device_name=self.device_name,
            device_type=self.device_type,
            fingerprint=self.fingerprint,
            data=copy_json(self.data) if copy_data else self.data,
            created_at=to_datetime(self.created_at),
            last_active_at=to_datetime(self.last_active_at),
            expires_at=to_datetime(self.expires_at),
            is_current=is_current,
        )


@dataclass(slots=True)
class SessionUpdate:
    """A change to one live session, applied atomically by ``Store.update``, which only
    reads it (not frozen: a frozen dataclass costs half a microsecond more to build, on
    every write).

    ``set_keys`` replaces top-level keys of ``data`` (values are plain JSON),
    ``removed_keys`` deletes them; keys not named are left as they are in the
    store, so concurrent requests writing different keys both keep theirs.
    ``max_data_bytes``, when not ``None``, caps the :func:`data_size` of the
    data as merged in the store (see :attr:`size_cap`). The other fields,
    when not ``None``, replace the stored column.

    ``last_active_at`` and ``expires_at`` are both given (activity: the
    expiry slides, and so does the store's own expiry of the session) or both
    ``None``: a data write within the touch interval, which leaves the times
    as stored, so that a store need not rewrite its expiry index for it. A
    new ``token_digest`` always comes with times.

    ``expected_token_digest``, when not ``None``, makes the update conditional: it
    applies only while the session is stored under that digest, and otherwise changes
    nothing and reports the session gone. A rotation names the digest it rotates away
    from, so a request whose token was rotated away meanwhile (a stolen copy's, held
    open) cannot take the session over, however the two interleave.

    ``rotated_away_until``, when not ``None``, comes with a new ``token_digest`` and an
    ``expected_token_digest``: the store remembers the digest rotated away until that
    time, for :meth:`~authsessions.stores.Store.rotated_away_to`. Requests the browser
    sent before the rotation's answer carry the old token; told apart from a revoked one,
    they are answered without clearing the cookie the rotation set.

    ``touch_if_last_active_by``, when not ``None``, comes with times and makes them
    conditional: they apply only while the stored ``last_active_at`` is at or before it,
    and otherwise stay as stored while the rest of the update applies. A touch names
    ``now - touch_interval``: of the requests that loaded a session together and all
    found its touch due, only the first to write moves the times, and a request's time
    never replaces a later one stored meanwhile (another server's clock may be behind).
    """

    last_active_at: float | None
    expires_at: float | None
    set_keys: Mapping[str, Any] = field(default_factory=dict)
    removed_keys: frozenset[str] = frozenset()
    token_digest: str | None = field(default=None, repr=False)  # kept out of logs
    max_data_bytes: int | None = None
    expected_token_digest: str | None = field(default=None, repr=False)
    rotated_away_until: float | None = None
    touch_if_last_active_by: float | None = None

    @property
    def changes_data(self) -> bool:
        return bool(self.set_keys or self.removed_keys)

    @property
    def size_cap(self) -> int | None:
        """The cap the store must check the merged data against; ``None``: no check.

        Only an update that sets keys can make the data grow, so one that
        only removes keys, or changes no data, is never refused: a session
        already over the cap (the limit was lowered) can always shrink.
        """
        return self.max_data_bytes if self.set_keys else None


class CheckedRecord(SessionRecord):
    """A :class:`SessionRecord` the session layer built at a login, valid by construction
    (its user id and data were checked as they came in): stores skip checking it again."""

    __slots__ = ()


class CheckedUpdate(SessionUpdate):
    """A :class:`SessionUpdate` the session layer built, valid by construction (keys and
    values were checked as they were set): stores skip checking it again on every write.
    Its values are private copies nobody changes afterwards, so a store may keep them."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class StoreStats:
    """Counts across a whole store at one moment, from ``Store.stats``."""

    live_sessions: int
    """Sessions that have not expired."""
    users: int
    """Distinct users with at least one live session."""
    by_device_type: Mapping[str, int]
    """Live sessions per device type ("desktop", "mobile", ...); types without any are absent."""
    expired_sessions: int | None
    """Expired sessions still stored: what cleanup would remove; ``None`` from a store
    that cannot count them (see :attr:`Store.counts_expired_sessions
    <authsessions.stores.Store.counts_expired_sessions>`)."""


def within_lifetimes(
    records: list[SessionRecord],
    ttl_seconds: float | None,
    absolute_ttl_seconds: float | None,
    now: float,
) -> list[SessionRecord]:
    """``records`` without those idle longer than ``ttl`` or older than ``absolute_ttl``
    (either ``None``: not known here), which the middleware refuses.

    Stores know only each session's own expiry, set when either may have been longer (or
    ``absolute_ttl`` unset).
    """
    return [
        record
        for record in records
        if (ttl_seconds is None or record.last_active_at + ttl_seconds > now)
        and (absolute_ttl_seconds is None or record.created_at + absolute_ttl_seconds > now)
    ]


def check_user_id(user_id: object) -> None:
    """Refuse a user id no session can have, before any store access.

    Raises:
        ValueError: not a non-empty printable string of at most
            ``MAX_USER_ID_LENGTH`` characters (an int among them: stores
            compare ids as strings, each in its own way).
    """
    # Printable only: every store can keep it, and it is safe in logs and admin tables.
    if (
        not isinstance(user_id, str)
        or not user_id
        or len(user_id) > MAX_USER_ID_LENGTH
        or not user_id.isprintable()
    ):
        raise ValueError(
            f"user_id must be a non-empty printable string of at most {MAX_USER_ID_LENGTH} "
            f"characters, got {user_id!r:.80}; pass str(user.id) for numeric ids."
        )
