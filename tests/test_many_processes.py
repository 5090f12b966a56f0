"""Two real app servers on one store: a session is one session everywhere.

Each case starts two uvicorn processes running ``tests/apps/multiprocess_app.py``
on the same store (a SQLite file, a PostgreSQL database, Redis) and talks to
them over real HTTP, sending the cookie by hand as a browser would.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import pytest

from tests.apps.multiprocess_app import COOKIE

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def admin_execute(url: str, sql: str) -> None:
    connection = await asyncpg.connect(url)
    try:
        await connection.execute(sql)
    finally:
        await connection.close()


@pytest.fixture(params=["sqlite", "postgres", "redis"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A store URL both servers use: a fresh SQLite file or database, or Redis."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'sessions.db'}"
    elif request.param == "postgres":
        server: str = request.getfixturevalue("postgres_url")
        database = f"authsessions_mp_{secrets.token_hex(6)}"
        maintenance = urlunsplit(urlsplit(server)._replace(path="/postgres"))
        asyncio.run(admin_execute(maintenance, f'CREATE DATABASE "{database}"'))
        try:
            yield urlunsplit(urlsplit(server)._replace(path=f"/{database}"))
        finally:
            drop = f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'
            asyncio.run(admin_execute(maintenance, drop))
    else:
        # Redis is shared: the test's user is its own, and logging out removes its keys.
        yield request.getfixturevalue("redis_url")


def wait_until_ready(base_url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{base_url} exited early:\n{log.read_text()}")
        try:
            if httpx.get(f"{base_url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{base_url} did not become ready:\n{log.read_text()}")


@pytest.fixture
def servers(store_url: str, tmp_path: Path) -> Iterator[list[str]]:
    """Two uvicorn processes serving the app on ``store_url``; killed afterwards."""
    processes: list[subprocess.Popen[bytes]] = []
    base_urls: list[str] = []
    try:
        for number in range(2):
            port = free_port()
            log = tmp_path / f"server{number}.log"
            with log.open("wb") as output:
                processes.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "uvicorn", "tests.apps.multiprocess_app:app",
                         "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
                        cwd=ROOT,
                        env={**os.environ, "AUTHSESSIONS_STORE": store_url},
                        stdout=output,
                        stderr=subprocess.STDOUT,
                    )
                )  # fmt: skip
            base_urls.append(f"http://127.0.0.1:{port}")
        for number, (base_url, process) in enumerate(zip(base_urls, processes, strict=True)):
            wait_until_ready(base_url, process, tmp_path / f"server{number}.log")
        yield base_urls
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


class Browser:
    """Sends the session cookie by hand, as the test says, never from a cookie jar."""

    def __init__(self, client: httpx.Client) -> None:
        self.client = client

    def __call__(self, method: str, url: str, token: str | None = None) -> httpx.Response:
        self.client.cookies.clear()
        headers = {"cookie": f"{COOKIE}={token}"} if token is not None else {}
        return self.client.request(method, url, headers=headers)


# One browser: a session's cookie sent with another User-Agent is a replay, and ends it.
BROWSER_HEADERS = {"user-agent": "Mozilla/5.0 (X11; Linux x86_64) Firefox/128.0"}


@pytest.fixture
def as_browser() -> Iterator[Browser]:
    with httpx.Client(headers=BROWSER_HEADERS, timeout=10) as client:
        yield Browser(client)


def test_logout_everywhere_reaches_every_process(servers: list[str], as_browser: Browser) -> None:
    first, second = servers
    user = f"user-{secrets.token_hex(4)}"

    login = as_browser("POST", f"{first}/login?user={user}")
    assert login.status_code == 200
    token = login.cookies[COOKIE]

    seen = as_browser("GET", f"{second}/me", token)
    assert seen.status_code == 200
    assert seen.json()["user_id"] == user
    assert seen.json()["pid"] != login.json()["pid"]
    assert as_browser("GET", f"{first}/me", token).json()["user_id"] == user

    assert as_browser("POST", f"{second}/logout-all", token).status_code == 200

    rejected = as_browser("GET", f"{first}/me", token)
    assert rejected.status_code == 401
    assert rejected.json()["user_id"] is None
    assert f"{COOKIE}=" in rejected.headers["set-cookie"]
    assert as_browser("GET", f"{second}/me", token).status_code == 401


def test_a_logout_elsewhere_is_seen_by_a_process_that_writes_meanwhile(
    servers: list[str], as_browser: Browser
) -> None:
    """The first process keeps the sessions it read (SQLite's cache) across its own
    writes. The second ends one of them while the first is inside a request whose write
    comes after: that session must not be kept.
    """
    first, second = servers
    tokens = []
    for user in (f"writer-{secrets.token_hex(4)}", f"reader-{secrets.token_hex(4)}"):
        login = as_browser("POST", f"{first}/login?user={user}")
        assert login.status_code == 200
        tokens.append(login.cookies[COOKIE])
    writer, reader = tokens
    for text in ("before", "again"):
        assert as_browser("GET", f"{first}/me", reader).status_code == 200
        assert as_browser("POST", f"{first}/note?text={text}", writer).status_code == 200
    assert as_browser("GET", f"{first}/me", reader).status_code == 200

    def slow_note() -> int:
        with httpx.Client(headers=BROWSER_HEADERS, timeout=10) as client:
            url = f"{first}/note?text=during&seconds=1"
            return client.post(url, headers={"cookie": f"{COOKIE}={writer}"}).status_code

    with ThreadPoolExecutor(1) as pool:
        noting = pool.submit(slow_note)
        time.sleep(0.3)  # the request has read its session and waits to write
        assert as_browser("POST", f"{second}/logout", reader).status_code == 200
        assert noting.result() == 200

    assert as_browser("GET", f"{first}/me", reader).status_code == 401
    assert as_browser("GET", f"{first}/me", writer).status_code == 200
