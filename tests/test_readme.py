"""The README's quickstarts are real code: each one runs and behaves as its text says."""

from __future__ import annotations

import asyncio
import re
import sys
import types
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from litestar import WebSocket as LitestarWebSocket
from litestar import websocket
from litestar.testing import TestClient as LitestarTestClient
from starlette.routing import WebSocketRoute
from starlette.testclient import TestClient as StarletteTestClient
from starlette.websockets import WebSocket as StarletteWebSocket

from authsessions import Session, SessionManager
from authsessions.litestar import provide_session
from authsessions.stores import SQLiteStore
from tests.apps.session_app import plant_session

README = Path(__file__).resolve().parent.parent / "README.md"
CHROME = "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) Chrome/120.0.0.0 Safari/537.36"


def quickstart(framework: str) -> str:
    """The Python block under the README heading ``## Quickstart: <framework>``."""
    text = README.read_text()
    match = re.search(rf"^## Quickstart: {framework}\n.*?```python\n(.*?)```", text, re.S | re.M)
    assert match is not None, f"no quickstart for {framework} in README.md"
    return match.group(1)


def with_state_per_request(app: Any) -> Any:
    """Each request gets a shallow copy of the lifespan state, as ASGI servers give it:
    asgi-lifespan hands every request the one dict, where Litestar keeps per-request flags
    (whether the response started, so an error after one 401 would look like a crash).
    """

    async def copying_state(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan" and "state" in scope:
            scope = {**scope, "state": dict(scope["state"])}
        await app(scope, receive, send)

    return copying_state


@pytest.fixture
async def client_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Any]:
    """Runs a quickstart in an empty working directory (its sessions.db lands there)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("AUTHSESSIONS_STORE", raising=False)
    managers: list[LifespanManager] = []

    async def make(framework: str) -> httpx.AsyncClient:
        # A real module: frameworks resolve annotations through sys.modules.
        module = types.ModuleType(f"readme_{framework.lower()}")
        monkeypatch.setitem(sys.modules, module.__name__, module)
        exec(compile(quickstart(framework), f"README:{framework}", "exec"), vars(module))  # noqa: S102
        manager = LifespanManager(with_state_per_request(module.app))
        managers.append(manager)
        await manager.__aenter__()
        return httpx.AsyncClient(
            transport=httpx.ASGITransport(app=manager.app),
            base_url="https://testserver",
            headers={"user-agent": CHROME},
        )

    yield make
    for manager in reversed(managers):
        await manager.__aexit__(None, None, None)


async def test_starlette_quickstart_signs_in_and_keeps_the_theme(client_for: Any) -> None:
    async with await client_for("Starlette") as client:
        before = await client.get("/me")
        login = await client.post("/login", data={"email": "ada@example.com", "password": "pw"})
        after = await client.get("/me")

    assert before.status_code == 401
    assert login.status_code == 303
    assert after.json() == {"user": "42", "theme": "dark"}


async def test_fastapi_quickstart_lists_and_revokes_devices(client_for: Any) -> None:
    async with await client_for("FastAPI") as client:
        signed_out = await client.get("/devices")
        await client.post("/login", params={"user_id": "42"})
        devices = (await client.get("/devices")).json()
        unknown = await client.post("/devices/AAAAAAAAAAAAAAAAAAAAAA/revoke")

    assert signed_out.status_code == 401
    assert [device["this_device"] for device in devices] == [True]
    assert devices[0]["device"] == "Chrome on macOS"
    assert unknown.status_code == 404


async def test_litestar_quickstart_signs_in_and_guards_the_devices(client_for: Any) -> None:
    async with await client_for("Litestar") as client:
        before = await client.get("/me")
        signed_out = await client.get("/devices")
        await client.post("/login")
        after = await client.get("/me")
        devices = await client.get("/devices")

    assert before.json() == {"user": None}
    assert (signed_out.status_code, signed_out.json()) == (
        401,
        {"detail": "Not authenticated: sign in first."},
    )
    assert after.json() == {"user": "42"}
    assert devices.json() == ["Chrome on macOS"]


def test_the_manager_example_revokes_a_users_sessions_and_sweeps_expired_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The block under "Outside a request": a whole script, run as written."""
    match = re.search(r"Outside a request.*?```python\n(.*?)```", README.read_text(), re.S)
    assert match is not None, "no SessionManager example in README.md"
    monkeypatch.chdir(tmp_path)

    async def plant() -> None:
        async with SQLiteStore("sessions.db") as store:
            await plant_session(store, "42")
            await plant_session(store, "42")
            await plant_session(store, "7")
            await plant_session(store, "8", expires_in=-60)

    asyncio.run(plant())
    exec(compile(match.group(1), "README:SessionManager", "exec"), {"__name__": "readme"})  # noqa: S102

    async def users_left() -> list[str]:
        async with SQLiteStore("sessions.db") as store:
            manager = SessionManager(store)
            listed = [await manager.list_for_user(user) for user in ("42", "7", "8")]
            return [session.user_id for sessions in listed for session in sessions]

    assert asyncio.run(users_left()) == ["7"]
    assert capsys.readouterr().out == "1 expired sessions removed\n"


def examples_for_testing() -> list[str]:
    """The Python blocks under "Testing an app": Starlette's, Litestar's, the WebSocket's."""
    match = re.search(r"^## Testing an app\n(.*?)^## ", README.read_text(), re.S | re.M)
    assert match is not None, "no testing section in README.md"
    blocks = re.findall(r"```python\n(.*?)```", match.group(1), re.S)
    assert len(blocks) == 3, blocks
    return blocks


def quickstart_app(framework: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The app of a quickstart, run in an empty working directory."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("AUTHSESSIONS_STORE", raising=False)
    module = types.ModuleType(f"readme_testing_{framework.lower()}")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    exec(compile(quickstart(framework), f"README:{framework}", "exec"), vars(module))  # noqa: S102
    return module.app


@pytest.mark.parametrize(("framework", "block"), [("Starlette", 0), ("Litestar", 1)])
def test_the_testing_examples_sign_in_through_their_quickstarts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, framework: str, block: int
) -> None:
    """Each block under "Testing an app", run against its framework's quickstart app."""
    app = quickstart_app(framework, tmp_path, monkeypatch)

    # Its own assertion is the test: a signed-in /me.
    exec(compile(examples_for_testing()[block], "README:testing", "exec"), {"app": app})  # noqa: S102


@pytest.mark.parametrize("framework", ["Starlette", "Litestar"])
def test_the_websocket_example_passes_the_cookie_the_test_client_leaves_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, framework: str
) -> None:
    """Signed out on a plain ``websocket_connect`` (what the README says the test clients
    do), signed in with the README's cookie header.
    """
    app = quickstart_app(framework, tmp_path, monkeypatch)
    seen: list[str | None] = []

    async def starlette_socket(socket: StarletteWebSocket) -> None:
        seen.append(Session.from_scope(socket.scope).user_id)
        await socket.accept()
        await socket.close()

    async def litestar_socket(socket: LitestarWebSocket[Any, Any, Any]) -> None:
        seen.append(provide_session(socket.scope).user_id)
        await socket.accept()
        await socket.close()

    client: Any
    if framework == "Starlette":
        app.router.routes.append(WebSocketRoute("/ws", starlette_socket))
        client = StarletteTestClient(app, base_url="https://testserver")
        login = {"data": {"email": "ada@example.com", "password": "pw"}}
    else:
        app.register(websocket("/ws")(litestar_socket))
        client = LitestarTestClient(app, base_url="https://testserver.local")
        login = {}
    with client:
        client.post("/login", **login)
        with client.websocket_connect("/ws"):
            pass
        exec(compile(examples_for_testing()[2], "README:websocket", "exec"), {"client": client})  # noqa: S102

    assert seen == [None, "42"]
