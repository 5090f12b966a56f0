"""Fixtures shared by the session-layer tests: the test app and HTTP clients for it.

The store fixtures (``memory_store``, ``sqlite_store``, … and ``store``,
parametrised over ``STORE_FIXTURES``) come from ``tests/store_fixtures.py``,
so every store added there joins the conformance suite and the HTTP scenarios.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from typing import Protocol

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import BaseRoute
from starlette.types import ASGIApp

from authsessions import SessionConfig
from authsessions.stores import Store
from tests.apps.session_app import CHROME_MAC, build_app

pytest_plugins = ["tests.store_fixtures"]


class AppFactory(Protocol):
    def __call__(
        self,
        store: Store | str | None,
        config: SessionConfig | None = None,
        *,
        extra_routes: Sequence[BaseRoute] = (),
    ) -> Starlette: ...


class ClientFactory(Protocol):
    def __call__(
        self,
        app: ASGIApp,
        *,
        user_agent: str = CHROME_MAC,
        peer: tuple[str, int] = ("127.0.0.1", 123),
        base_url: str = "https://testserver",
    ) -> httpx.AsyncClient: ...


@pytest.fixture
def app_factory() -> AppFactory:
    """Builds the test app (``tests/apps/session_app.py``) around a store and a config."""
    return build_app


@pytest.fixture
async def client_factory() -> AsyncIterator[ClientFactory]:
    """Real HTTP to an ASGI app through ``httpx.ASGITransport``; one client per device.

    Clients talk https (so ``Secure`` cookies are sent back), present a
    Chrome-on-macOS User-Agent unless told otherwise, and keep cookies in
    their own jar.
    """
    clients: list[httpx.AsyncClient] = []

    def make(
        app: ASGIApp,
        *,
        user_agent: str = CHROME_MAC,
        peer: tuple[str, int] = ("127.0.0.1", 123),
        base_url: str = "https://testserver",
    ) -> httpx.AsyncClient:
        client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app, client=peer),
            base_url=base_url,
            headers={"user-agent": user_agent},
        )
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.aclose()


@pytest.fixture
def app(store: Store, app_factory: AppFactory) -> Starlette:
    """The test app over each store in turn, with the default config."""
    return app_factory(store)


@pytest.fixture
def client(app: Starlette, client_factory: ClientFactory) -> httpx.AsyncClient:
    """One browser talking to ``app``."""
    return client_factory(app)


@pytest.fixture
def frozen_clock(monkeypatch: pytest.MonkeyPatch) -> float:
    """``time.time()`` held at a whole second near the real clock, for exact instants.

    Only the wall clock stops: event loops and timeouts run on ``time.monotonic``.
    """
    now = float(int(time.time()))
    monkeypatch.setattr(time, "time", lambda: now)
    return now
