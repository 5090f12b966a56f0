"""The store protocol: async primitives over records, digests, ids and times.

Behaviour (expiry rules, cookies, fixation defence, size limits) lives in the
session layer; a store only keeps records, and checks a size cap it is handed
only because merging concurrent writes happens there. Every primitive takes
``now`` (a UNIX timestamp) from its caller, so tests control the clock
without sleeping.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import math
import sqlite3
from collections.abc import AsyncGenerator, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from types import TracebackType
from typing import ClassVar, Self, cast

from authsessions._errors import StoreUnavailable
from authsessions._records import (
    MAX_COUNT,
    CheckedRecord,
    CheckedUpdate,
    SessionRecord,
    SessionUpdate,
    StoreStats,
    check_user_id,
)

__all__ = [
    "CreateError",
    "DataTooLarge",
    "Store",
    "accept_newer_schema",
    "store_unavailable",
    "translate_errors",
]


logger = logging.getLogger("authsessions")


class CreateError(Exception):
    """Internal signal: ``Store.create`` met an existing id or token digest, or
    ``Store.update`` a new token digest another session holds.
    """


class DataTooLarge(Exception):
    """Internal signal: ``Store.update`` refused data that would exceed ``max_data_bytes``.

    ``size`` is the merged data's :func:`~authsessions._records.data_size`,
    ``limit`` the cap it exceeds. The session layer turns it into
    :class:`~authsessions.SessionDataError`.
    """

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"the merged session data would be {size} bytes, over {limit}")
        self.size = size
        self.limit = limit


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
    if isinstance(value, bool) or not isinstance(value, _NUMBERS):
        raise TypeError(f"{name} must be a UNIX timestamp, got {type(value).__name__}.")
    try:
        finite = math.isfinite(value)
    except OverflowError:  # an int no float holds
        finite = False
    if not finite:
        raise ValueError(f"{name} must be a finite UNIX timestamp, got {value!r:.40}.")
    return float(value)


_NUMBERS = (int, float)
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


def check_record(record: SessionRecord) -> None:
    """Refuse a record that a store would keep differently from another, or only in part,
    before any store access (``create``; see :func:`check_create_args`).

    Raises:
        TypeError, ValueError: naming the field.
    """
    if not isinstance(record, SessionRecord):
        raise TypeError(f"record must be a SessionRecord, got {type(record).__name__}.")
    for name in ("id", "token_digest", "device_name", "device_type", "fingerprint"):
        require_str(f"record.{name}", getattr(record, name))
    check_user_id(record.user_id)
    for name in ("ip_address", "user_agent"):
        if getattr(record, name) is not None:
            require_str(f"record.{name}", getattr(record, name))
    _require_string_keys("record.data", record.data)
    for name in ("created_at", "last_active_at", "expires_at"):
        _require_stored_time(f"record.{name}", getattr(record, name))


def check_create_args(record: SessionRecord, max_sessions: object, now: object) -> float:
    """What ``Store.create`` checks before any store access; returns ``now`` as a float.

    The session layer's logins pass unchecked: it built the record (a
    :class:`CheckedRecord`), took ``max_sessions`` from a checked config and ``now``
    from the clock.
    """
    if record.__class__ is CheckedRecord:
        return cast(float, now)
    check_record(record)
    require_count("max_sessions", max_sessions)
    return require_time("now", now)


def check_update_args(session_id: object, changes: SessionUpdate, now: object) -> float:
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
    require_str("session_id", session_id)
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
        require_str("changes.token_digest", changes.token_digest)
    if changes.max_data_bytes is not None:
        require_count("changes.max_data_bytes", changes.max_data_bytes)
    return require_time("now", now)


def check_delete_args(session_id: object, user_id: object) -> None:
    """What ``Store.delete`` checks before any store access."""
    require_str("session_id", session_id)
    if user_id is not None:
        require_str("user_id", user_id)


def check_delete_for_user_args(user_id: object, except_id: object) -> None:
    """What ``Store.delete_for_user`` checks before any store access."""
    require_str("user_id", user_id)
    if except_id is not None:
        require_str("except_id", except_id)


def check_list_for_user_args(user_id: object, now: object) -> float:
    """What ``Store.list_for_user`` checks before any store access; returns ``now``."""
    require_str("user_id", user_id)
    return require_time("now", now)


def check_delete_expired_args(now: object, limit: object) -> float:
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


def accept_newer_schema(what: str, version: int, compatible_from: int | None, known: int) -> None:
    """Let this release use ``what`` (a database or table) at schema ``version``, newer
    than the ``known`` one, only if the release that upgraded it marked it usable from
    ``known`` or earlier (its migration kept what older code reads and writes: an index,
    say), and log that it does. In a rolling deploy, servers of the older release then
    keep starting.

    Raises:
        RuntimeError: not marked usable by this release (or not marked at all); nothing
            is changed, since writing to a table a newer release reshaped could corrupt
            sessions.
    """
    if compatible_from is None or compatible_from > known:
        usable = "" if compatible_from is None else f" and usable from version {compatible_from}"
        raise RuntimeError(
            f"{what} has schema version {version}{usable}, newer than this authsessions "
            f"release knows ({known}); upgrade authsessions."
        )
    logger.info(
        "%s has schema version %d, newer than this release knows (%d) but marked usable "
        "from version %d: opening it as it is",
        what,
        version,
        known,
        compatible_from,
    )


def store_unavailable(store_name: str, exc: BaseException) -> StoreUnavailable:
    """The :class:`StoreUnavailable` for a driver failure; raise it as it is (not ``from``).

    The failure is logged here with the store and what an operator needs of it
    (see :func:`failure_detail`); the error itself carries only the generic
    message, since it may reach a client as a 503 body and the driver's details
    (hosts, table names) must not. It is chained to ``exc`` only where that tells
    no statement's values: a traceback an app logs would print a constraint
    failure's row, token digest included.
    """
    logger.warning("the %s session store failed: %s", store_name, failure_detail(exc))
    error = StoreUnavailable()
    error.__cause__ = exc if _tells_no_values(exc) else None
    error.__suppress_context__ = True
    return error


# SQLSTATE classes whose messages name the server, the role or the database, never a
# statement's values: connection exception, invalid authorization, invalid catalog name,
# insufficient resources, operator intervention.
_TELLING_SQLSTATE_CLASSES = frozenset({"08", "28", "3D", "53", "57"})
# redis-py's errors of reaching the server, whose messages name the address and the cause.
_TELLING_REDIS_ERRORS = frozenset({"ConnectionError", "TimeoutError", "AuthenticationError"})


def failure_detail(exc: BaseException) -> str:
    """A driver failure for the log: its type, and its message where that cannot carry
    a request's values (a bound parameter, session data, a digest): reaching the server
    or the file, signing in, finding the database. Other messages stay out (PostgreSQL's
    SQLSTATE stands in for them), so the log never holds what a statement was given.
    """
    name = type(exc).__name__
    sqlstate = getattr(exc, "sqlstate", None)
    if isinstance(sqlstate, str):
        if _tells_no_values(exc):
            return f"{name} ({sqlstate}): {exc}"
        return f"{name} ({sqlstate})"
    return f"{name}: {exc}" if _tells_no_values(exc) and str(exc) else name


def _tells_no_values(exc: BaseException) -> bool:
    """Whether ``exc``'s message is safe to show: it cannot hold a statement's values."""
    sqlstate = getattr(exc, "sqlstate", None)
    if isinstance(sqlstate, str):
        return sqlstate[:2] in _TELLING_SQLSTATE_CLASSES
    return isinstance(exc, OSError | TimeoutError | sqlite3.Error) or any(
        cls.__module__ == "redis.exceptions" and cls.__name__ in _TELLING_REDIS_ERRORS
        for cls in type(exc).__mro__
    )


@contextmanager
def translate_errors(store_name: str, *driver_errors: type[BaseException]) -> Iterator[None]:
    """Re-raise the driver's own failures as :class:`StoreUnavailable` (see
    :func:`store_unavailable`)."""
    try:
        yield
    except driver_errors as exc:
        raise store_unavailable(store_name, exc)  # noqa: B904 (it chains itself)


class Store(abc.ABC):
    """Where sessions live. Subclasses implement the primitives; the base supplies opening.

    A store is an async context manager, opens itself once (idempotently) and
    can be closed and reopened::

        async with SQLiteStore("sessions.db") as store:
            record = await store.get(digest, now=time.time())

    Every primitive raises :class:`~authsessions.StoreUnavailable` when the
    backend fails, never the driver's own exception. Every primitive but
    :meth:`get`, which is on every request's path, first checks its arguments
    (the ``check_*_args`` functions) and raises ``TypeError`` or ``ValueError``
    before any store access: the types of ids, keys and counts, finite times
    (those it stores, in the years a ``datetime`` holds), not the JSON values of
    session data (the session layer checks those as they are set). The session
    layer's own records and updates (``CheckedRecord``, ``CheckedUpdate``) pass
    without a second check.
    """

    counts_expired_sessions: ClassVar[bool] = True
    """Whether :meth:`stats` counts expired sessions (``expired_sessions`` is ``None``
    when not): a store that drops them itself cannot say what cleanup would remove."""
    _is_open: bool = False
    _opening: asyncio.Future[None] | None = None
    _bound_to_loop: ClassVar[bool] = False
    """Whether the store's connections belong to the event loop that opened it."""
    _opened_on: asyncio.AbstractEventLoop | None = None
    _closing_with_loop: AsyncGenerator[None] | None = None
    _opening_token: object | None = None

    @property
    def is_open(self) -> bool:
        """Open, and usable here: not on connections of an event loop that has closed
        (a test client runs each request or block on a loop of its own, for instance).
        """
        opened_on = self._opened_on
        # The running loop's identity first: a C call, where is_closed() is a Python one.
        return self._is_open and (
            opened_on is None
            or opened_on is asyncio._get_running_loop()
            or not opened_on.is_closed()
        )

    def _closed_error(self) -> RuntimeError:
        """What a primitive raises when called on a store that is not open."""
        return RuntimeError(f"{self!r} is closed; open it first (await store.open()).")

    async def open(self) -> None:
        """Connect and create the schema if missing. Calling it again does nothing.

        Callers that come while an attempt is under way share it, and its failure: with
        the server down, each would otherwise wait out a timeout of its own, in turn.
        A caller cancelled meanwhile leaves the attempt running for the others.
        """
        if self.is_open:
            return
        if self._is_open:  # opened on a loop that closed without closing it (see below)
            self._drop_opening_of_closed_loop()
        attempt = self._attempt_under_way()
        if attempt is None:
            attempt = self._opening = asyncio.ensure_future(self._open_and_mark_open())
            # Retrieved here, so a failure nobody is left to await is not logged as lost.
            attempt.add_done_callback(lambda done: done.cancelled() or done.exception())
        await asyncio.shield(attempt)

    async def _open_and_mark_open(self) -> None:
        await self._open()
        self._is_open = True
        if self._bound_to_loop:
            self._opened_on = asyncio.get_running_loop()
            # Started here, so the loop tracks it and closes it as the loop shuts down
            # (asyncio.run and test clients' portals do): the connections then close
            # while their loop still runs, instead of being dropped with it.
            if getattr(self._opened_on, "_asyncgens_shutdown_called", False):
                return  # too late for it: the loop closes no more generators
            self._closing_with_loop = guard = self._close_with_loop(opening := object())
            self._opening_token = opening
            await anext(guard)

    async def _close_with_loop(self, opening: object) -> AsyncGenerator[None]:
        try:
            yield
        finally:
            # Only the opening it was started for: after a close (and maybe a reopen)
            # this generator was dropped, and the loop closes it whenever it gets to it.
            if self._opening_token is opening and self._is_open:
                await self._close_as_loop_ends()

    async def _close_as_loop_ends(self) -> None:
        self._mark_closed()
        try:
            await self._close()
        except Exception as exc:  # the loop is ending: say so, and drop what is left
            logger.warning(
                "the session store did not close cleanly as its event loop ended: %s", exc
            )
            self._forget_connections()

    def _mark_closed(self) -> None:
        """Not open, and no generator left to close this opening with its loop."""
        self._is_open = False
        self._opening_token = self._closing_with_loop = None

    def _drop_opening_of_closed_loop(self) -> None:
        """Closed, for an opening whose event loop has closed: nothing of it can be awaited
        now, so its connections are dropped, not closed.
        """
        self._mark_closed()
        self._forget_connections()

    def _attempt_under_way(self) -> asyncio.Future[None] | None:
        """The attempt to open that is under way on the running loop, if any."""
        attempt = self._opening
        if (
            attempt is None
            or attempt.done()
            or attempt.get_loop() is not asyncio.get_running_loop()
        ):
            return None
        return attempt

    async def close(self) -> None:
        """Release connections. The store can be opened again afterwards.

        An open under way (its callers may have given up on it) ends first, within
        the store's own timeouts, so that what it opens is closed too.
        """
        attempt = self._attempt_under_way()
        if attempt is not None:
            await asyncio.wait([attempt])
        if self.is_open:
            self._mark_closed()
            await self._close()
        elif self._is_open:
            self._drop_opening_of_closed_loop()

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def _open(self) -> None:  # noqa: B027 - stores without connections need nothing
        """Connect and create the schema; called once per open."""

    async def _close(self) -> None:  # noqa: B027
        """Release what ``_open`` acquired."""

    def _forget_connections(self) -> None:  # noqa: B027 - stores not bound to a loop keep theirs
        """Drop what ``_open`` acquired on an event loop that has closed since, without
        awaiting anything: its connections cannot be closed properly any more.
        """

    @abc.abstractmethod
    async def create(self, record: SessionRecord, *, max_sessions: int, now: float) -> None:
        """Insert ``record`` and evict, as one atomic step.

        Afterwards the user has at most ``max_sessions`` live sessions: the
        new record always stays; the user's expired sessions are deleted, and of
        the others the least recently active beyond ``max_sessions - 1`` (however
        recent their activity: another server's clock may be ahead). Concurrent
        creates for one user never leave more than the limit.

        Raises :class:`CreateError` when the id or token digest exists already, and
        ``TypeError`` or ``ValueError`` when ``max_sessions`` is not an int from 1 to
        ``MAX_COUNT`` (see :func:`require_count`) or ``now`` is not a finite UNIX
        timestamp (see :func:`require_time`), before anything is stored.
        """

    @abc.abstractmethod
    async def get(self, token_digest: str, *, now: float) -> SessionRecord | None:
        """The live session stored under ``token_digest``; ``None`` when missing or expired.

        The record may be shared with other callers (a store may cache it, as
        ``SQLiteStore`` does): treat it, its ``data`` included, as read-only.
        """

    @abc.abstractmethod
    async def update(self, session_id: str, changes: SessionUpdate, *, now: float) -> bool:
        """Apply ``changes`` to a live session atomically.

        Data changes are key-level: keys the update does not name keep their
        stored values. Without times (a data write within the touch
        interval) the activity time, the expiry and any expiry the store
        keeps itself (a key's TTL) stay as they are. Returns ``False``,
        changing nothing, when the session is gone or expired: an update
        never re-creates a session.

        With a :attr:`~SessionUpdate.size_cap` (``max_data_bytes`` on an
        update that sets keys), the store measures the data as merged, with
        :func:`~authsessions._records.data_size`, in the same atomic step, so
        concurrent updates that each fit cannot together exceed the cap.

        Raises:
            DataTooLarge: the merged data would exceed the cap; nothing changed
                (neither the data nor the times nor the digest).
            CreateError: the new :attr:`~SessionUpdate.token_digest` is another
                stored session's; nothing changed (the caller draws a new token).
        """

    @abc.abstractmethod
    async def delete(self, session_id: str, *, user_id: str | None = None) -> bool:
        """Delete one session; with ``user_id``, only if it belongs to that user.

        Returns whether a session was deleted.
        """

    @abc.abstractmethod
    async def delete_for_user(self, user_id: str, *, except_id: str | None = None) -> int:
        """Delete every session of ``user_id`` but ``except_id``; returns how many."""

    @abc.abstractmethod
    async def list_for_user(self, user_id: str, *, now: float) -> list[SessionRecord]:
        """The user's live sessions, most recently active first."""

    @abc.abstractmethod
    async def delete_expired(self, *, now: float, limit: int = 1000) -> int:
        """Delete at most ``limit`` expired sessions; returns how many were deleted.

        Callers repeat it until it returns less than ``limit``, so a large
        backlog never holds a lock or a transaction for long. ``limit`` must be an int
        from 1 to ``MAX_COUNT`` (see :func:`require_count`), and ``now`` a finite UNIX
        timestamp (see :func:`require_time`), or nothing is deleted.
        """

    @abc.abstractmethod
    async def stats(self, *, now: float) -> StoreStats:
        """Counts across the whole store as of ``now``, for admin tools and ``authsessions stats``.

        Live sessions are those with ``expires_at > now``; ``expired_sessions``
        counts the stored ones that are not, i.e. what :meth:`delete_expired`
        would remove (``None`` from a store that cannot count them: see
        :attr:`counts_expired_sessions`). It may read every
        session, so it belongs in admin screens and jobs, never on the
        request path.

        Raises:
            StoreUnavailable: the backend failed.
        """
