"""One real server: the test app under uvicorn on 127.0.0.1, spoken to over TCP by httpx.

Plain HTTP, so the cookie is configured without Secure (and without the
``__Host-`` prefix that needs it). The middleware builds its store from a
URL, so uvicorn's lifespan opens and closes it.
"""

from __future__ import annotations

import asyncio
import socket
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import uvicorn

from authsessions import SessionConfig
from tests.apps.session_app import build_app, session_cookie

CONFIG = SessionConfig(cookie_secure=False, cookie_name="session")


@pytest.fixture
async def server_url(tmp_path: Path) -> AsyncIterator[str]:
    """A uvicorn server running the test app, on a port the OS picked."""
    app = build_app(f"sqlite:///{tmp_path / 'sessions.db'}", CONFIG)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    host, port = sock.getsockname()
    server = uvicorn.Server(uvicorn.Config(app, lifespan="on", log_level="warning"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        async with asyncio.timeout(10):
            while not server.started:
                if task.done():
                    task.result()  # surfaces the reason the server did not start
                await asyncio.sleep(0.01)
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, timeout=10)
        sock.close()


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

    with sqlite3.connect(tmp_path / "sessions.db") as db:
        assert db.execute("SELECT count(*) FROM authsessions_session").fetchone() == (0,)
    db.close()
