"""A networked store that goes away: requests fail closed with 503, and recover with it.

Between each store and its server stands ``tests/tcp_proxy.py``, which cuts
every connection and refuses new ones on cue, as a crashed server or a
network partition would.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from urllib.parse import urlsplit

import pytest

from authsessions.stores import PostgresStore, RedisStore, Store
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
    assert session_cookie(during) is None
    assert cookie.value not in during.text
    assert login_during.status_code == 503
    assert after.status_code == 200
    assert after.json()["user_id"] == "alice"
