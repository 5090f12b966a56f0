"""A TCP proxy for fault tests: it stands between a store and its server and can fail on cue.

::

    async with TcpProxy("127.0.0.1", 5432) as proxy:
        store = PostgresStore(f"postgresql://postgres@127.0.0.1:{proxy.port}/test")
        await proxy.drop()     # open connections reset, new ones refused
        await proxy.resume()   # accepting again, on the same port
        proxy.stall()          # connections stay open, bytes stop flowing
        proxy.unstall()
        proxy.lose_reply_to(b"marker")  # that request is served, its reply never arrives
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator
from types import TracebackType
from typing import Self

__all__ = ["TcpProxy", "refusing_port"]


@contextlib.contextmanager
def refusing_port() -> Iterator[int]:
    """A loopback port that refuses connections: bound (so nobody else takes it), not listening."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        yield held.getsockname()[1]


class TcpProxy:
    """Forwards ``127.0.0.1:<port>`` to ``host:port``, on the running event loop."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.port = 0
        self.accepted = 0
        """Client connections accepted so far."""
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._pumps: set[asyncio.Task[None]] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._losing: bytes | None = None
        self._stalling_at: bytes | None = None

    async def __aenter__(self) -> Self:
        await self.resume()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.drop()

    @property
    def connections(self) -> int:
        """Client connections currently open through the proxy."""
        return len(self._writers) // 2

    async def resume(self) -> None:
        """Accept connections again (the first call picks a free port, later ones reuse it)."""
        if self._server is None:
            self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
            self.port = self._server.sockets[0].getsockname()[1]

    async def drop(self) -> None:
        """Reset every open connection and refuse new ones until :meth:`resume`."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        for pump in list(self._pumps):
            pump.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)
        self._writers.clear()

    def stall(self) -> None:
        """Keep connections open but forward nothing: a server that stopped answering."""
        self._flowing.clear()

    def stall_at(self, marker: bytes) -> None:
        """Forward until a request holds ``marker``, then :meth:`stall`, holding that
        request back. Once only."""
        self._stalling_at = marker

    def unstall(self) -> None:
        """Forward again, including what was held back while stalled."""
        self._stalling_at = None
        self._flowing.set()

    def lose_reply_to(self, marker: bytes) -> None:
        """Forward the next request that holds ``marker``, then reset its connection as the
        server's reply comes: the server did the work, and the client never hears of it
        (a network cut at the worst moment). Once only."""
        self._losing = marker

    async def _accept(
        self, client_reader: asyncio.StreamReader, client: asyncio.StreamWriter
    ) -> None:
        self.accepted += 1
        try:
            server_reader, server = await asyncio.open_connection(*self.target)
        except OSError:
            client.transport.abort()
            return
        self._writers |= {client, server}
        reply_lost = asyncio.Event()
        pumps = [
            asyncio.ensure_future(self._pump(client_reader, server, marks=reply_lost)),
            asyncio.ensure_future(self._pump(server_reader, client, unless=reply_lost)),
        ]
        self._pumps.update(pumps)
        try:
            # When either side closes, close both: a half-open relay would hide the failure.
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
                self._pumps.discard(pump)
            for writer in (client, server):
                writer.transport.abort()
                self._writers.discard(writer)

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        marks: asyncio.Event | None = None,
        unless: asyncio.Event | None = None,
    ) -> None:
        """Forward ``reader`` to ``writer``: a request holding the marker to lose the reply
        to sets ``marks``, and a reply coming once ``unless`` is set ends the connection."""
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                if self._stalling_at is not None and self._stalling_at in data:
                    self._stalling_at = None
                    self._flowing.clear()
                await self._flowing.wait()
                if unless is not None and unless.is_set():
                    return  # the caller resets both sides
                if marks is not None and self._losing is not None and self._losing in data:
                    self._losing = None
                    marks.set()
                writer.write(data)
                await writer.drain()
