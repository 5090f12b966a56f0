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

from authsessions import SessionManager
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
        manager = LifespanManager(module.app)
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


async def test_litestar_quickstart_signs_in(client_for: Any) -> None:
    async with await client_for("Litestar") as client:
        before = await client.get("/me")
        await client.post("/login")
        after = await client.get("/me")

    assert before.json() == {"user": None}
    assert after.json() == {"user": "42"}


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


def test_the_testing_example_signs_in_through_the_starlette_quickstart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The block under "Testing an app", run against the Starlette quickstart's app."""
    match = re.search(
        r"^## Testing an app\n.*?```python\n(.*?)```", README.read_text(), re.S | re.M
    )
    assert match is not None, "no testing example in README.md"
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("AUTHSESSIONS_STORE", raising=False)
    module = types.ModuleType("readme_testing")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    exec(compile(quickstart("Starlette"), "README:Starlette", "exec"), vars(module))  # noqa: S102

    # Its own assertion is the test: a signed-in /me.
    exec(compile(match.group(1), "README:testing", "exec"), {"app": module.app})  # noqa: S102
