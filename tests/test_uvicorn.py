"""One real server: the test app under uvicorn on 127.0.0.1 (or a Unix socket), spoken to
by httpx.

Plain HTTP, so the cookie is configured without Secure (and without the
``__Host-`` prefix that needs it). The middleware builds its store from a
URL, so uvicorn's lifespan opens and closes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging.handlers
import socket
import sqlite3
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Literal

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket
from websockets.asyncio.client import connect

from authsessions import Session, SessionConfig, SessionManager
from authsessions.stores import SQLiteStore
from tests.apps.session_app import CHROME_MAC, build_app, session_cookie

CONFIG = SessionConfig(cookie_secure=False, cookie_name="session")


@contextlib.asynccontextmanager
async def serving(app: Starlette, unix_socket: Path | None = None) -> AsyncIterator[str]:
    """``app`` under uvicorn on a port the OS picked, its ``host:port``; or on
    ``unix_socket``, its path."""
    if unix_socket is None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        host, port = sock.getsockname()
        address = f"{host}:{port}"
    else:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(unix_socket))
        address = str(unix_socket)
    server = uvicorn.Server(uvicorn.Config(app, lifespan="on", log_level="warning"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        async with asyncio.timeout(10):
            while not server.started:
                if task.done():
                    task.result()  # surfaces the reason the server did not start
                await asyncio.sleep(0.01)
        yield address
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, timeout=10)
        sock.close()


@pytest.fixture
async def server_url(tmp_path: Path) -> AsyncIterator[str]:
    """A uvicorn server running the test app."""
    async with serving(build_app(f"sqlite:///{tmp_path / 'sessions.db'}", CONFIG)) as address:
        yield f"http://{address}"


async def test_login_read_and_logout_through_a_real_server(server_url: str, tmp_path: Path) -> None:
    assert (tmp_path / "sessions.db").exists()  # lifespan startup opened the store
    async with httpx.AsyncClient(base_url=server_url) as client:
        anonymous = await client.get("/me")
        assert anonymous.json()["authenticated"] is False
        assert "set-cookie" not in anonymous.headers

        login = await client.post("/login", json={"user_id": "alice", "set": {"theme": "dark"}})
        cookie = session_cookie(login, "session")
        assert cookie is not None
        assert "httponly" in cookie.attributes
        assert "secure" not in cookie.attributes
        assert client.cookies.get("session") == cookie.value

        me = await client.get("/me")
        assert me.json()["user_id"] == "alice"
        assert me.json()["session"]["data"] == {"theme": "dark"}
        assert me.json()["session"]["ip_address"] == "127.0.0.1"
        assert me.headers["cache-control"] == "no-store"

        logout = await client.post("/logout")
        cleared = session_cookie(logout, "session")
        assert cleared is not None
        assert cleared.is_clearing
        assert "session" not in client.cookies

        replay = await client.get("/me", headers={"cookie": f"session={cookie.value}"})
        assert replay.json()["authenticated"] is False

    with contextlib.closing(sqlite3.connect(tmp_path / "sessions.db")) as db, db:
        assert db.execute("SELECT count(*) FROM authsessions_session").fetchone() == (0,)


@pytest.mark.parametrize(
    ("trusted_proxies", "recorded"), [(("unix",), "203.0.113.9"), ((), None)], ids=str
)
async def test_a_proxy_on_a_unix_socket_passes_on_the_clients_address_when_trusted(
    tmp_path: Path, trusted_proxies: tuple[str, ...], recorded: str | None
) -> None:
    """nginx in front of uvicorn --uds: the server reports no peer, so only a config that
    trusts the socket believes the address the proxy forwards."""
    config = dataclasses.replace(CONFIG, trusted_proxies=trusted_proxies)
    app = build_app(SQLiteStore(tmp_path / "sessions.db"), config)
    with tempfile.TemporaryDirectory(dir="/tmp") as short:  # a socket path holds 107 bytes
        async with (
            serving(app, Path(short) / "app.sock") as path,
            httpx.AsyncClient(
                transport=httpx.AsyncHTTPTransport(uds=path),
                base_url="http://app.internal",
                headers={"x-forwarded-for": "198.51.100.1, 203.0.113.9"},
            ) as client,
        ):
            await client.post("/login", json={"user_id": "alice"})
            me = await client.get("/me")

    assert me.json()["user_id"] == "alice"
    assert me.json()["session"]["ip_address"] == recorded


async def push_only(websocket: WebSocket) -> None:
    """Sets a key, then only sends: it learns the client left from a failing send."""
    session = Session.from_scope(websocket.scope)
    await websocket.accept()
    session.set("theme", "pushed")
    while True:
        await websocket.send_text("tick")
        await asyncio.sleep(0.01)


async def test_a_websocket_that_only_sends_keeps_what_it_set_when_the_client_leaves(
    tmp_path: Path,
) -> None:
    """No disconnect message reaches such a handler; the server's send fails instead."""
    store = SQLiteStore(tmp_path / "sessions.db")
    app = build_app(store, CONFIG, extra_routes=[WebSocketRoute("/push", push_only)])
    agent = {"user-agent": CHROME_MAC}
    async with serving(app) as address:
        async with httpx.AsyncClient(base_url=f"http://{address}", headers=agent) as client:
            login = await client.post("/login", json={"user_id": "alice"})
        cookie = session_cookie(login, "session")
        assert cookie is not None
        async with connect(
            f"ws://{address}/push",
            additional_headers={"cookie": f"session={cookie.value}"},
            user_agent_header=CHROME_MAC,
        ) as ws:
            assert await ws.recv() == "tick"
        for _ in range(500):  # until the handler's next send has failed (10 s at most)
            [session] = await SessionManager(store).list_for_user("alice")
            if session.data:
                break
            await asyncio.sleep(0.02)
    await store.close()

    assert session.data == {"theme": "pushed"}


@pytest.mark.parametrize("lifespan", ["auto", "on"])
@pytest.mark.parametrize(
    ("url", "told"),
    [
        # An unescaped "/": refused as the store opens.
        ("postgresql://app:s3cret/PW@127.0.0.1:5432/test", "the PostgreSQL URL"),
        # No store's scheme: refused as the middleware is built, which Starlette does as
        # the lifespan call comes.
        ("postgresql+asyncpg://app:s3cret@127.0.0.1:5432/test", "unknown store URL scheme"),
    ],
    ids=["malformed", "unknown-scheme"],
)
async def test_a_store_the_app_cannot_use_stops_the_server_saying_why(
    lifespan: Literal["auto", "on"], url: str, told: str
) -> None:
    """A misconfigured store, which no retry mends, raised out of the lifespan: uvicorn's
    "auto" took the app for one without lifespan support, skipped its own startup, and
    served a 500 for every request with a cookie."""
    started_by_the_app: list[bool] = []

    @contextlib.asynccontextmanager
    async def app_lifespan(app: Starlette) -> AsyncIterator[None]:
        started_by_the_app.append(True)
        yield

    app = build_app(url, CONFIG)
    app.router.lifespan_context = app_lifespan
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, lifespan=lifespan, log_level="warning"))
    said = logging.handlers.BufferingHandler(capacity=100)
    logging.getLogger("uvicorn.error").addHandler(said)

    try:
        # In this task: SystemExit out of another would stop the event loop itself.
        with pytest.raises(SystemExit) as exited:
            async with asyncio.timeout(10):
                await server.serve(sockets=[sock])
    finally:
        logging.getLogger("uvicorn.error").removeHandler(said)
        sock.close()
    said_text = "\n".join(record.getMessage() for record in said.buffer)

    assert exited.value.code == 3  # uvicorn's "startup failed"
    assert not server.started
    assert started_by_the_app == []
    assert f"the session store could not be opened: {told}" in said_text
    assert "s3cret" not in said_text
