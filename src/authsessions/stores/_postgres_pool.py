"""How ``PostgresStore`` borrows a connection for one call.

asyncpg's ``Pool.acquire`` and ``Pool.release`` cost about as much CPU as
the query itself (release runs in a task under ``asyncio.shield``). So from
its own pool the store keeps the connections it has used in a free list,
and takes the most recently used one back without asking the pool. A
connection leaves the free list for the pool, which resets it or terminates
it, after any error or cancellation, when a call is waiting for the pool,
when it has sat unused for a while, every so often so that the pool's own
housekeeping (``max_queries``) still applies, and when the store closes.

A connection that failed itself (lost, or out of step with the server), as
opposed to a statement the server refused or a timeout, is terminated, and
so are the idle ones, ours and the pool's, which most likely failed with it
(a server restart, a network cut): the next calls get new connections
instead of failing one by one. A connection the server closed while it sat
idle is noticed when it is taken and replaced, though one the server is
closing just then (its farewell read, its socket not yet closed) can still
fail that one call.

An app's own pool is acquired from and released to on every call instead:
connections held out of it could starve the app's queries, and would make
its ``Pool.close()`` wait for ever.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from typing import TypeAlias

    import asyncpg

    Connection: TypeAlias = asyncpg.pool.PoolConnectionProxy[asyncpg.Record]

__all__ = ["Borrowed", "HeldConnections", "PooledConnections"]

IDLE_SECONDS = 30.0
"""How long a connection may sit unused in the free list before going back to the pool."""

RETURN_EVERY = 1000
"""One call in this many returns its connection to the pool, for the pool's housekeeping."""

_LOST_SQLSTATES = ("08", "57P")
"""Connection exceptions, and the server ending the session (shutdown, idle timeout, ...)."""


class PooledConnections:
    """A connection from the pool for every call, waiting at most ``timeout`` for it.

    ``asyncio.timeout`` rather than ``pool.acquire(timeout=...)``: the latter
    wraps every acquisition in a task (``wait_for``), a cost on each call.
    """

    __slots__ = ("_pool", "_timeout")

    def __init__(self, pool: asyncpg.Pool[asyncpg.Record], timeout: float) -> None:
        self._pool = pool
        self._timeout = timeout

    def borrow(self) -> Borrowed:
        """``async with connections.borrow() as conn:`` one connection for one call."""
        return Borrowed(self)

    async def take(self) -> Connection:
        async with asyncio.timeout(self._timeout):
            return await self._pool.acquire()

    async def keep(self, connection: Connection) -> None:
        """Take back ``connection`` after a call that succeeded."""
        await self.give_back(connection)

    async def drop(self, connection: Connection, error: BaseException) -> None:
        """Take back ``connection`` after a call that raised ``error`` (or was cancelled).

        After a cancellation, a failure to take it back (the pool's release timing out
        on a silent server, having terminated the connection) is not raised: it would
        replace the cancellation, which the caller must see as such.
        """
        if isinstance(error, Exception):
            await self._take_back(connection, error)
            return
        with contextlib.suppress(Exception):
            await self._take_back(connection, error)

    async def _take_back(self, connection: Connection, error: BaseException) -> None:
        await self.give_back(connection)

    async def give_back(self, connection: Connection) -> None:
        """Release ``connection`` to the pool, which resets it or, if that fails, terminates it."""
        # Bounded too: after a statement timeout, release waits for the cancellation.
        await self._pool.release(connection, timeout=self._timeout)

    async def fetchrow(self, sql: str, *args: Any, seconds: float) -> asyncpg.Record | None:
        """``sql``'s first row (or ``None``) on a connection borrowed for it."""
        async with self.borrow() as connection:
            return await connection.fetchrow(sql, *args, timeout=seconds)

    async def close(self) -> None:
        """Give back every connection held; the pool's owner closes the pool."""


class HeldConnections(PooledConnections):
    """Connections of the store's own pool, kept in a free list between calls."""

    __slots__ = (
        "_closed",
        "_idle",
        "_interface_error",
        "_max_idle",
        "_postgres_error",
        "_uses",
        "_waiting",
    )

    def __init__(self, pool: asyncpg.Pool[asyncpg.Record], timeout: float, *, max_idle: int):
        from asyncpg import InterfaceError, PostgresError  # the store has imported it already

        super().__init__(pool, timeout)
        # (connection, monotonic time it became idle); the newest at the right.
        self._idle: collections.deque[tuple[Connection, float]] = collections.deque()
        self._max_idle = max_idle
        self._interface_error = InterfaceError
        self._postgres_error = PostgresError
        self._waiting = 0  # calls waiting for the pool, which a finished call must feed
        self._uses = 0
        self._closed = False

    async def take(self) -> Connection:
        idle = self._idle
        while idle:
            connection = idle.pop()[0]
            if self._is_open(connection):
                return connection
            await self.give_back(connection)  # a no-op, or the pool terminates it
        self._waiting += 1
        try:
            return await super().take()
        finally:
            self._waiting -= 1

    async def keep(self, connection: Connection) -> None:
        surplus = self._shelve(connection)
        if surplus is not None:
            await self.give_back(surplus)

    async def fetchrow(self, sql: str, *args: Any, seconds: float) -> asyncpg.Record | None:
        # Borrowed's work without its layers: the per-request read runs here. The statement
        # goes to the connection itself, not through the pool's proxy, whose wrapper costs
        # about as much again as this whole method; the proxy still goes back to the pool.
        idle = self._idle
        if not idle:
            return await super().fetchrow(sql, *args, seconds=seconds)
        entry = idle.pop()
        proxy = entry[0]
        connection = _unwrapped(proxy)
        if connection is None or connection.is_closed():
            idle.append(entry)  # take() gives it back to the pool, and goes on
            return await super().fetchrow(sql, *args, seconds=seconds)
        try:
            row = await connection.fetchrow(sql, *args, timeout=seconds)
        except BaseException as exc:
            await self.drop(proxy, exc)
            raise
        surplus = self._shelve(proxy)
        if surplus is not None:
            await self.give_back(surplus)
        return row

    def _shelve(self, connection: Connection) -> Connection | None:
        """Put ``connection`` in the free list; the one to give back to the pool, if any."""
        idle = self._idle
        self._uses += 1
        if self._uses >= RETURN_EVERY:
            self._uses = 0
            return connection
        if self._waiting or self._closed or len(idle) >= self._max_idle:
            return connection
        now = time.monotonic()
        idle.append((connection, now))
        # The oldest idle connection has not been needed for a while: traffic has
        # dropped, so let the pool close it once it has been idle long enough.
        if idle[0][1] < now - IDLE_SECONDS:
            return idle.popleft()[0]
        return None

    async def _take_back(self, connection: Connection, error: BaseException) -> None:
        if self._lost(connection, error):
            # Not worth a graceful close, nor trusting the pool's reset (which runs no
            # query here). The pool opens new connections when they are next needed, and
            # replaces those idle in it too; a call in flight that succeeds has just
            # proven its connection, so keeps it.
            self._terminate(connection)
            idle, self._idle = self._idle, collections.deque()
            for suspect, _ in idle:
                self._terminate(suspect)
            await self._pool.expire_connections()
        else:
            # The server refused the statement, or the call timed out or was cancelled:
            # the pool's release waits for the cancellation (bounded), or terminates.
            await self.give_back(connection)

    async def close(self) -> None:
        """Give back every idle connection; calls still running give theirs back when done."""
        self._closed = True
        idle, self._idle = list(self._idle), collections.deque()
        # A connection that fails to reset is terminated by the pool; nothing to report.
        await asyncio.gather(*(self.give_back(conn) for conn, _ in idle), return_exceptions=True)

    def _lost(self, connection: Connection, error: BaseException) -> bool:
        """Whether ``error`` says the connection itself failed, not only its statement."""
        if isinstance(error, TimeoutError | asyncio.CancelledError):
            return False
        if isinstance(error, self._postgres_error):
            return error.sqlstate.startswith(_LOST_SQLSTATES) or not self._is_open(connection)
        return True  # the socket (OSError), the protocol (InterfaceError, InternalClientError)

    def _is_open(self, connection: Connection) -> bool:
        try:
            return not connection.is_closed()
        except self._interface_error:  # the pool took it back already, when it was lost
            return False

    def _terminate(self, connection: Connection) -> None:
        # InterfaceError: the pool took it back already, when it was lost.
        with contextlib.suppress(self._interface_error):
            connection.terminate()  # hands its slot back to the pool


def _unwrapped(proxy: Connection) -> asyncpg.Connection[asyncpg.Record] | None:
    """The connection behind a pool's proxy; ``None`` once the pool has taken it back.

    ``_con`` is asyncpg's own (private) attribute; were it ever renamed, calls
    would take the general path (``take``), and only the speed-up is lost.
    """
    connection: asyncpg.Connection[asyncpg.Record] | None = getattr(proxy, "_con", None)
    return connection


class Borrowed:
    """One connection for one call: kept after success, given back to the pool after any error."""

    __slots__ = ("_connection", "_connections")

    def __init__(self, connections: PooledConnections) -> None:
        self._connections = connections

    async def __aenter__(self) -> Connection:
        self._connection = await self._connections.take()
        return self._connection

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        # After an error or a cancellation the connection may be broken, mid-transaction or
        # cancelling a query: only the pool knows how to make it safe, or it is terminated.
        if exc is None:
            await self._connections.keep(self._connection)
        else:
            await self._connections.drop(self._connection, exc)
