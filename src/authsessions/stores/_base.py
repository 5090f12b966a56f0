"""The store protocol: async primitives over records, digests, ids and times.

Behaviour (expiry rules, cookies, fixation defence, size limits) lives in the
session layer; a store only keeps records, and checks a size cap it is handed
only because merging concurrent writes happens there. Every primitive takes
``now`` (a UNIX timestamp) from its caller, so tests control the clock
without sleeping.
"""

from __future__ import annotations

import abc
import ast
import asyncio
import logging
import sqlite3
from collections.abc import AsyncGenerator, Iterator
from contextlib import contextmanager, suppress
from types import TracebackType
from typing import ClassVar, Self

from authsessions._errors import StoreUnavailable
from authsessions._records import SessionRecord, SessionUpdate, StoreStats
from authsessions.stores import _checks

__all__ = [
    "CreateError",
    "DataTooLarge",
    "Store",
    "accept_newer_schema",
    "is_pool_refusal",
    "log_schema_upgrade",
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


def log_schema_upgrade(what: str, found: int, now: int) -> None:
    """Say that ``what`` (a database or table) was created (``found`` 0) or upgraded from
    schema version ``found`` to ``now``; ``authsessions migrate`` prints it."""
    if found == 0:
        logger.info("%s was created at schema version %d", what, now)
    else:
        logger.info("%s was upgraded from schema version %d to %d", what, found, now)


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
# redis-py's errors of reaching the server, whose messages name the address and the cause,
# and of the server's state (out of memory, a replica, loading, a cluster down).
_TELLING_REDIS_ERRORS = frozenset(
    {
        "ConnectionError",
        "TimeoutError",
        "AuthenticationError",
        "BusyLoadingError",
        "ClusterDownError",
        "MasterDownError",
        "OutOfMemoryError",
        "ReadOnlyError",
        "TryAgainError",
    }
)
# Replies redis-py raises as a plain ResponseError that name the server's state, never a
# command's values: a database number it lacks, snapshots it cannot write, replicas too
# few to write, a script running too long.
_TELLING_REDIS_REPLIES = ("DB index is out of range", "MISCONF ", "NOREPLICAS ", "BUSY ")
# What redis-py writes into the message of an error a pipelined command met, after the
# command itself, keys and values included ("Command # 1 (SET <prefix>d:<digest> ...) of
# pipeline caused error: <the server's reply>"): such a message tells a statement's values
# after all; only the server's reply after it may be shown.
_PIPELINE_ANNOTATION = "of pipeline caused error"


def failure_detail(exc: BaseException) -> str:
    """A driver failure for the log: its type, and its message where that cannot carry
    a request's values (a bound parameter, session data, a digest): reaching the server
    or the file, signing in, finding the database. Other messages stay out (PostgreSQL's
    SQLSTATE stands in for them), so the log never holds what a statement was given.
    """
    sqlstate = getattr(exc, "sqlstate", None)
    label = (
        f"{type(exc).__name__} ({sqlstate})" if isinstance(sqlstate, str) else type(exc).__name__
    )
    message = str(exc) if _tells_no_values(exc) else _telling_pipeline_reply(exc)
    return f"{label}: {message}" if message else label


def is_pool_refusal(exc: BaseException) -> bool:
    """Whether ``exc`` is an asyncpg pool's own refusal ("pool is closed", "pool is not
    initialized"), a fixed string: the same class also reports a connection's faults,
    and its subclass DataError quotes an argument."""
    return (
        type(exc).__module__.startswith("asyncpg")
        and type(exc).__name__ == "InterfaceError"
        and str(exc).startswith("pool is ")
    )


def _tells_no_values(exc: BaseException) -> bool:
    """Whether ``exc``'s message is safe to show: it cannot hold a statement's values."""
    sqlstate = getattr(exc, "sqlstate", None)
    if isinstance(sqlstate, str):
        return sqlstate[:2] in _TELLING_SQLSTATE_CLASSES
    if isinstance(exc, OSError | TimeoutError | sqlite3.Error):
        return True
    if is_pool_refusal(exc):
        return True
    return _PIPELINE_ANNOTATION not in str(exc) and _tells_redis_state(exc, str(exc))


def _tells_redis_state(exc: BaseException, reply: str) -> bool:
    """Whether ``exc`` is redis-py's, for a ``reply`` that names the server's state."""
    redis_classes = [cls for cls in type(exc).__mro__ if cls.__module__ == "redis.exceptions"]
    return bool(redis_classes) and (
        reply.startswith(_TELLING_REDIS_REPLIES)
        or any(cls.__name__ in _TELLING_REDIS_ERRORS for cls in redis_classes)
    )


def _telling_pipeline_reply(exc: BaseException) -> str:
    """The server's reply in a pipelined command's error, where it names the server's
    state, without redis-py's annotation (which quotes the command); else ``""``."""
    _, annotation, reply = str(exc).partition(f"{_PIPELINE_ANNOTATION}: ")
    if reply.startswith("(") and reply.endswith(",)"):
        # A cluster's pipeline writes the error's arguments: "('<the reply>',)".
        with suppress(ValueError, SyntaxError, TypeError, IndexError):
            arguments = ast.literal_eval(reply)
            reply = arguments[0] if isinstance(arguments[0], str) else ""
    return reply if annotation and _tells_redis_state(exc, reply) else ""


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
    (see :mod:`authsessions.stores._checks`) and raises ``TypeError`` or ``ValueError``
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
        """Open, and usable here: for a store whose connections belong to the event loop
        that opened it, on that loop (outside any loop: while it is not closed). Not on
        one that has closed (a test client runs each request or block on a loop of its
        own, for instance), nor on another thread's.
        """
        opened_on = self._opened_on
        if opened_on is None:
            return self._is_open
        # The running loop's identity first: a C call, where is_closed() is a Python one.
        running = asyncio._get_running_loop()
        return self._is_open and (
            opened_on is running or (running is None and not opened_on.is_closed())
        )

    def _closed_error(self) -> RuntimeError:
        """What a primitive raises when called on a store that is not open."""
        return RuntimeError(f"{self!r} is closed; open it first (await store.open()).")

    def _require_open(self) -> None:
        # As every store does: code that forgot open() would pass its tests on one that
        # did not, and fail on the first real store.
        if not self._is_open:
            raise self._closed_error()

    def _refuse_another_running_loop(self) -> None:
        """Refuse a store open on another loop that has not closed: its connections work
        only there (used here, the driver failed midway, some writes done).

        Raises:
            RuntimeError: saying so.
        """
        if self._is_open and self._opened_on is not None and not self._opened_on.is_closed():
            raise RuntimeError(
                f"{self!r} is open on another event loop (another thread's?), whose "
                "connections work only there: give each loop a store of its own, or run "
                "this call on that loop (asyncio.run_coroutine_threadsafe)."
            )

    async def open(self) -> None:
        """Connect and create the schema if missing. Calling it again does nothing.

        Callers that come while an attempt is under way share it, and its failure: with
        the server down, each would otherwise wait out a timeout of its own, in turn.
        A caller cancelled meanwhile leaves the attempt running for the others.
        """
        if self.is_open:
            return
        self._refuse_another_running_loop()
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
            self._refuse_another_running_loop()
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
    async def create(
        self,
        record: SessionRecord,
        *,
        max_sessions: int,
        now: float,
        replaced: tuple[str, float] | None = None,
    ) -> None:
        """Insert ``record`` and evict, as one atomic step.

        Afterwards the user has at most ``max_sessions`` live sessions: the
        new record always stays; the user's expired sessions are deleted, and of
        the others the least recently active beyond ``max_sessions - 1`` (however
        recent their activity: another server's clock may be ahead). Concurrent
        creates for one user never leave more than the limit.

        ``replaced``, a login's over a live session (deleted before): that session's
        token digest, which the new session keeps as the one it was rotated away from,
        and until when (see :meth:`rotated_away_to`), as a rotation's update would.
        The same browser's requests sent before the login's answer carry it.

        Raises :class:`CreateError` when the id or token digest exists already, and
        ``TypeError`` or ``ValueError`` when ``max_sessions`` is not an int from 1 to
        ``MAX_COUNT``, ``now`` is not a finite UNIX timestamp, ``replaced`` is not a
        digest and a time, or the record holds what no store keeps alike (see
        :mod:`authsessions.stores._checks`), before anything is stored.
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
        never re-creates a session. It returns ``False`` as well, in the same
        atomic step, when :attr:`~SessionUpdate.expected_token_digest` is given
        and the session is stored under another digest.

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

    async def rotated_away_to(self, token_digest: str, *, now: float) -> str | None:
        """The id of the session that was rotated away from ``token_digest`` by an update
        whose :attr:`~authsessions._records.SessionUpdate.rotated_away_until` is after
        ``now`` (or by a login's create given it as ``replaced``), else ``None``.

        Asked only of a digest :meth:`get` found no session for, so it costs nothing on
        the requests that carry a live token. ``None`` for a digest never rotated away,
        once the rotation's time has passed, and once the session has expired or been
        deleted. A session keeps one such digest, its latest rotation's: the next
        rotation (given a time) replaces it; one the store refuses (the session holds
        another digest, or is gone), or onto the digest the session holds, marks none.
        A rotation by code that gives no time (an older release's) may leave it as it
        was. This base remembers nothing: a store that does not override it answers
        ``None``, and a rotated-away token is answered as a revoked one.

        Raises ``TypeError`` or ``ValueError`` when ``token_digest`` is not a key stores
        keep or ``now`` is not a finite UNIX timestamp, before any store access.
        """
        _checks.rotated_away_to_args(token_digest, now)
        return None

    @abc.abstractmethod
    async def delete(
        self,
        session_id: str,
        *,
        now: float,
        user_id: str | None = None,
        token_digest: str | None = None,
    ) -> bool:
        """Delete one session; with ``user_id``, only if it belongs to that user; with
        ``token_digest``, only while it still holds that digest (a request ending the
        session its token named, which another request may have rotated meanwhile).

        Returns whether a live session (``expires_at > now``) was deleted. An expired
        one still stored (cleanup has not reached it yet) is deleted too, but counts as
        not found: a store that drops expired sessions by itself could not tell it apart
        from one never made.
        """

    @abc.abstractmethod
    async def delete_for_user(
        self, user_id: str, *, now: float, except_id: str | None = None
    ) -> int:
        """Delete every session of ``user_id`` but ``except_id``; returns how many of them
        were live (``expires_at > now``), as :meth:`delete` counts.
        """

    @abc.abstractmethod
    async def list_for_user(self, user_id: str, *, now: float) -> list[SessionRecord]:
        """The user's live sessions, most recently active first."""

    @abc.abstractmethod
    async def delete_expired(self, *, now: float, limit: int = 1000) -> int:
        """Delete at most ``limit`` expired sessions; returns how many were deleted.

        Callers repeat it until it returns less than ``limit``, so a large
        backlog never holds a lock or a transaction for long. ``limit`` must be an int
        from 1 to ``MAX_COUNT``, and ``now`` a finite UNIX timestamp, or nothing is
        deleted (see :mod:`authsessions.stores._checks`).
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
