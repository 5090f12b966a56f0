"""A few redis-py connections kept aside for the per-request read, on a single server."""

from __future__ import annotations

import collections
import contextlib
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from redis.asyncio.connection import AbstractConnection, ConnectionPool

__all__ = ["ReadConnections"]


class ReadConnections:
    """Connections borrowed from a client's pool and kept between reads.

    ``Redis.execute_command`` takes a connection from the pool and gives it back
    around every command, behind a lock, a retry wrapper and observability hooks:
    a fifth of an authenticated read request's instructions. A read here sends its
    command on a kept connection and reads the reply there. A connection goes back
    on the shelf only after its whole reply was read (a server error is a whole
    reply too), so a command never meets an earlier command's reply; one that
    failed or was cancelled half-way is disconnected and handed back to the pool.

    Only for read-only commands: a kept connection the server closed while it sat
    idle (a restart, a client timeout) fails its first command, which is then sent
    once more on a connection from the pool, as the pool itself reconnects a stale
    one it hands out.

    Kept connections are the pool's in use: a pool capped at fewer than
    ``8 * max_idle`` connections (an app's client, say) gets proportionally fewer
    kept from it, and one capped below 8 none at all (each read then takes a
    connection and gives it back), so the app's and the store's other commands
    always find one.
    """

    __slots__ = ("_closed", "_connection_errors", "_idle", "_max_idle", "_pool", "_reply_error")

    def __init__(
        self,
        pool: ConnectionPool,
        *,
        reply_error: type[Exception],
        connection_errors: tuple[type[BaseException], ...],
        max_idle: int = 4,
    ) -> None:
        self._pool = pool
        self._reply_error = reply_error
        self._connection_errors = connection_errors
        self._max_idle = min(max_idle, getattr(pool, "max_connections", 0) // 8)
        self._idle: collections.deque[AbstractConnection] = collections.deque()
        self._closed = False

    async def read(self, *args: Any) -> Any:
        """The reply to the read-only command ``args`` (redis-py's ``execute_command`` form)."""
        idle = self._idle
        if idle:
            connection = idle.pop()
            try:
                return await self._call(connection, args)
            except TimeoutError:
                raise  # a slow server: failing within one timeout matters more
            except self._connection_errors:
                pass  # closed while it sat idle, most likely: once more, on a fresh one
        # get_connection() carries a deprecation decorator that hides its types.
        taken: AbstractConnection = await cast("Any", self._pool).get_connection()
        return await self._call(taken, args)

    async def _call(self, connection: AbstractConnection, args: tuple[Any, ...]) -> Any:
        try:
            await connection.send_command(*args, check_health=False)
            reply = await connection.read_response()
        except self._reply_error:
            if not self._shelve(connection):
                await self._pool.release(connection)
            raise
        except BaseException:
            # Broken, timed out or cancelled mid-reply: whatever is left on it is not
            # the next command's reply.
            with contextlib.suppress(Exception):
                await connection.disconnect()
            await self._pool.release(connection)
            raise
        if not self._shelve(connection):
            await self._pool.release(connection)
        return reply

    def _shelve(self, connection: AbstractConnection) -> bool:
        """Keep ``connection`` for the next read; ``False`` when there is no room for it."""
        if self._closed or len(self._idle) >= self._max_idle:
            return False
        self._idle.append(connection)
        return True

    async def close(self) -> None:
        """Hand every kept connection back to the pool; later reads go to the pool."""
        self._closed = True
        idle, self._idle = list(self._idle), collections.deque()
        for connection in idle:
            await self._pool.release(connection)
