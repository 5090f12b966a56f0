"""A networked store that goes away: requests fail closed with 503, and recover with it.

Between each store and its server stands ``tests/tcp_proxy.py``, which cuts
every connection and refuses new ones on cue, as a crashed server or a
network partition would.
"""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from urllib.parse import urlsplit

import asyncpg
import pytest
import redis.exceptions as redis_errors

from authsessions import StoreUnavailable
from authsessions._tokens import new_token
from authsessions.stores import PostgresStore, RedisStore, Store
from authsessions.stores._base import failure_detail
from tests.apps.session_app import cookie_header, session_cookie
from tests.conftest import AppFactory, ClientFactory
from tests.tcp_proxy import TcpProxy

StoreThrough = Callable[[int], Store]


Proxied = tuple[TcpProxy, StoreThrough]


@pytest.fixture
async def postgres_proxied(postgres_url: str, postgres_schema: str) -> AsyncIterator[Proxied]:
    parts = urlsplit(postgres_url)

    def through(port: int) -> Store:
        return PostgresStore(
            f"postgresql://{parts.username}@127.0.0.1:{port}{parts.path}",
            schema=postgres_schema,
            connect_timeout=1,
            command_timeout=1,
            acquire_timeout=1,
        )

    async with TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5432) as proxy:
        yield proxy, through


@pytest.fixture
async def redis_proxied(redis_url: str, redis_prefix: str) -> AsyncIterator[Proxied]:
    parts = urlsplit(redis_url)

    def through(port: int) -> Store:
        return RedisStore(
            f"redis://127.0.0.1:{port}{parts.path}",
            prefix=redis_prefix,
            socket_timeout=1,
            socket_connect_timeout=1,
        )

    async with TcpProxy(parts.hostname or "127.0.0.1", parts.port or 6379) as proxy:
        yield proxy, through


@pytest.fixture(params=["postgres_proxied", "redis_proxied"])
def proxied(request: pytest.FixtureRequest) -> Proxied:
    """A proxy in front of a real server, and how to build a store that talks through it."""
    value: Proxied = request.getfixturevalue(request.param)
    return value


async def test_a_cut_store_gives_503_keeps_the_cookie_and_the_session_survives(
    proxied: Proxied,
    app_factory: AppFactory,
    client_factory: ClientFactory,
) -> None:
    """Failing open would sign users out (or in) at random during an outage."""
    proxy, through = proxied
    async with through(proxy.port) as store:
        client = client_factory(app_factory(store))
        login = await client.post("/login", json={"user_id": "alice"})
        cookie = session_cookie(login)
        assert cookie is not None

        await proxy.drop()
        during = await client.get("/me", headers=cookie_header(cookie.value))
        login_during = await client.post("/login", json={"user_id": "bob"})
        await proxy.resume()
        after = await client.get("/me", headers=cookie_header(cookie.value))

    assert during.status_code == 503
    assert during.json() == {"detail": "The session store is unavailable; try again shortly."}
    assert during.headers["cache-control"] == "no-store"  # a cache must not serve it later
    assert session_cookie(during) is None
    assert cookie.value not in during.text
    assert login_during.status_code == 503
    assert session_cookie(login_during) is None  # alice's session could not be ended
    assert after.status_code == 200
    assert after.json()["user_id"] == "alice"


async def test_callers_that_come_while_the_store_opens_share_its_one_attempt(
    proxied: Proxied,
) -> None:
    """With the server not answering, each request queued behind the last one's attempt
    would wait out a timeout of its own: the fifth a fifth longer than the first.
    """
    proxy, through = proxied
    proxy.stall()
    alone = through(proxy.port)
    with pytest.raises(StoreUnavailable):
        await alone.open()
    one_attempt = proxy.accepted
    assert one_attempt >= 1

    store = through(proxy.port)
    results = await asyncio.gather(*(store.open() for _ in range(5)), return_exceptions=True)

    assert all(isinstance(result, StoreUnavailable) for result in results), results
    assert proxy.accepted == 2 * one_attempt
    assert not store.is_open
    proxy.unstall()
    await store.open()  # a later call tries again
    assert store.is_open
    await store.close()


async def test_a_store_down_from_startup_still_serves_requests_without_a_cookie(
    proxied: Proxied,
    app_factory: AppFactory,
    client_factory: ClientFactory,
) -> None:
    """They need no store: public pages and health checks behind the middleware stay up.
    A login, or a cookie to look up, does need it, and gets 503.
    """
    proxy, through = proxied
    store = through(proxy.port)
    client = client_factory(app_factory(store))
    await proxy.drop()

    anonymous = await client.get("/me")
    login = await client.post("/login", json={"user_id": "alice"})
    with_cookie = await client.get("/me", headers=cookie_header(new_token()))
    await proxy.resume()
    login_after = await client.post("/login", json={"user_id": "alice"})
    await store.close()

    assert anonymous.status_code == 200
    assert anonymous.json()["user_id"] is None
    assert login.status_code == 503
    assert session_cookie(login) is None  # none was sent, none to clear
    assert with_cookie.status_code == 503
    assert login_after.status_code == 200
    assert session_cookie(login_after) is not None


async def test_a_caller_cancelled_while_the_store_opens_leaves_the_attempt_to_the_others(
    proxied: Proxied,
) -> None:
    proxy, through = proxied
    proxy.stall()
    store = through(proxy.port)
    first = asyncio.ensure_future(store.open())
    second = asyncio.ensure_future(store.open())
    await asyncio.sleep(0.1)  # both waiting on the attempt's stalled connection
    assert proxy.accepted
    connected = proxy.accepted
    first.cancel()
    proxy.unstall()

    await second

    assert first.cancelled()
    assert store.is_open
    assert proxy.accepted == connected  # the same attempt went on, no second one began
    await store.close()


# -- what the log says about a driver's failure -------------------------------------

SECRET = "digest=0f3a… data={'card': '4111'}"


@pytest.mark.parametrize(
    ("error", "logged"),
    [
        # Reaching the server, signing in: the message names the address or the cause.
        (OSError("connection refused"), "OSError: connection refused"),
        (sqlite3.OperationalError("database is locked"), "OperationalError: database is locked"),
        (
            asyncpg.InvalidPasswordError("password authentication failed for user app"),
            "InvalidPasswordError (28P01): password authentication failed for user app",
        ),
        (
            redis_errors.ConnectionError("Error 111 connecting"),
            "ConnectionError: Error 111 connecting",
        ),
        (redis_errors.ConnectionError(""), "ConnectionError"),
        # The server's state, which an operator must see to act on.
        (
            redis_errors.ReadOnlyError("You can't write against a read only replica."),
            "ReadOnlyError: You can't write against a read only replica.",
        ),
        (
            redis_errors.OutOfMemoryError("command not allowed when used memory > 'maxmemory'."),
            "OutOfMemoryError: command not allowed when used memory > 'maxmemory'.",
        ),
        (
            redis_errors.ResponseError("MISCONF Redis is configured to save RDB snapshots"),
            "ResponseError: MISCONF Redis is configured to save RDB snapshots",
        ),
        (
            redis_errors.ResponseError("NOREPLICAS Not enough good replicas to write."),
            "ResponseError: NOREPLICAS Not enough good replicas to write.",
        ),
        # Anything else may quote what a statement was given: the type (and SQLSTATE) only.
        (asyncpg.UniqueViolationError(SECRET), "UniqueViolationError (23505)"),
        (asyncpg.InterfaceError(SECRET), "InterfaceError"),
        (asyncpg.InternalClientError(SECRET), "InternalClientError"),
        (redis_errors.ResponseError(SECRET), "ResponseError"),
        (redis_errors.NoPermissionError(SECRET), "NoPermissionError"),
        (
            redis_errors.ReadOnlyError(
                f"Command # 1 (SET {SECRET}) of pipeline caused error: You can't write against"
                " a read only replica."
            ),
            "ReadOnlyError: You can't write against a read only replica.",
        ),
        (
            redis_errors.ResponseError(
                f"Command # 1 (SET {SECRET}) of pipeline caused error: {SECRET}"
            ),
            "ResponseError",
        ),
        (  # as a cluster's pipeline writes it
            redis_errors.ResponseError(
                f"Command # 1 (SET {SECRET}) of pipeline caused error: ('NOREPLICAS Not"
                " enough good replicas to write.',)"
            ),
            "ResponseError: NOREPLICAS Not enough good replicas to write.",
        ),
        (
            redis_errors.ResponseError(
                f"Command # 1 (SET {SECRET}) of pipeline caused error: ('{SECRET}',)"
            ),
            "ResponseError",
        ),
        (ValueError(SECRET), "ValueError"),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, BaseException) else None,
)
def test_a_failure_is_logged_without_what_a_statement_was_given(
    error: BaseException, logged: str
) -> None:
    assert failure_detail(error) == logged


def test_an_app_that_configures_no_logging_still_sees_why_the_store_failed() -> None:
    """uvicorn configures only its own loggers: with a do-nothing handler of the library's,
    each 503 went out with its cause (a mistyped host, a refused connection) printed
    nowhere."""
    script = """
import asyncio
from authsessions import StoreUnavailable
from authsessions.stores import PostgresStore

async def main():
    try:
        await PostgresStore("postgresql://postgres@127.0.0.1:1/test", connect_timeout=2).open()
    except StoreUnavailable:
        print("503")

asyncio.run(main())
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )

    assert done.stdout == "503\n"
    assert "the PostgreSQL session store failed: ConnectionRefusedError" in done.stderr
