"""One store over several event loops: a test client runs each request (without ``with``)
or each ``with`` block on an event loop of its own, which is closed afterwards.

PostgreSQL's and Redis's connections belong to the loop that opened them; the store
opens again on the next loop instead of failing with "Event loop is closed".
"""

from __future__ import annotations

import asyncio
import gc
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import asyncpg
import pytest
from starlette.testclient import TestClient

from authsessions import SessionManager
from authsessions.stores import PostgresStore, RedisStore, SQLiteStore, Store
from tests.apps.session_app import CHROME_MAC, build_app
from tests.services import CONNECTIONS_NAMED, named_dsn
from tests.stores.records import make_record

StoreMaker = Callable[[], Store]
T = TypeVar("T")


@pytest.fixture(params=["sqlite", "postgres", "redis"])
def make_store(request: pytest.FixtureRequest) -> StoreMaker:
    if request.param == "postgres":
        url, schema = (request.getfixturevalue(n) for n in ("postgres_url", "postgres_schema"))
        return lambda: PostgresStore(url, schema=schema)
    if request.param == "redis":
        url, prefix = (request.getfixturevalue(n) for n in ("redis_url", "redis_prefix"))
        return lambda: RedisStore(url, prefix=prefix)
    path = request.getfixturevalue("tmp_path") / "sessions.db"
    return lambda: SQLiteStore(path)


def client_for(store: Store) -> TestClient:
    return TestClient(
        build_app(store), base_url="https://testserver", headers={"user-agent": CHROME_MAC}
    )


def test_each_request_on_a_loop_of_its_own(make_store: StoreMaker) -> None:
    """``TestClient(app)`` without ``with``: the first pattern FastAPI's testing guide shows."""
    store = make_store()
    client = client_for(store)

    login = client.post("/login", json={"user_id": "alice"})
    me = client.get("/me")
    again = client.get("/me")

    assert login.status_code == 200
    assert me.json()["user_id"] == "alice"
    assert again.json()["user_id"] == "alice"


def test_one_store_object_across_test_clients(make_store: StoreMaker) -> None:
    """A module-level app and store, a client per test: each ``with`` block a new loop."""
    store = make_store()
    with client_for(store) as first:
        first.post("/login", json={"user_id": "alice"})
        cookies = dict(first.cookies)
    with client_for(store) as second:
        second.cookies.update(cookies)
        me = second.get("/me")

    assert me.json()["user_id"] == "alice"


def test_a_store_closes_with_the_loop_that_opened_it(
    postgres_url: str, postgres_schema: str
) -> None:
    """Dropped with a closed loop, a pool's connections would stay open on the server until
    garbage collection: a module-level store, one test client per test, and PostgreSQL
    soon refuses connections (it did within 15 clients of a pool of 10).
    """

    # The store's connections alone, by a name of their own: the server is shared.
    dsn, name = named_dsn(postgres_url)

    async def server_connections() -> int:
        counting = await asyncpg.connect(postgres_url)
        try:
            count: int = await counting.fetchval(CONNECTIONS_NAMED, name)
            return count
        finally:
            await counting.close()

    store = PostgresStore(dsn, schema=postgres_schema, min_size=5, max_size=5)
    before = asyncio.run(server_connections())
    assert before == 0
    gc.disable()  # the leak hid behind a collection now and then
    try:
        for _ in range(4):
            with client_for(store) as client:
                assert client.post("/login", json={"user_id": "alice"}).status_code == 200
            assert not store.is_open  # closed as its loop shut down
    finally:
        gc.enable()

    assert asyncio.run(server_connections()) == 0


def test_a_store_open_on_another_threads_loop_is_refused_before_any_change(
    make_store: StoreMaker,
) -> None:
    """An admin job on a loop of its own, beside an app whose loop opened the store and
    runs on: PostgreSQL's driver failed midway (and broke a connection of the pool), and
    Redis ran the revoke, then failed, so the caller was told it had not happened.
    SQLite's connections belong to no loop: it serves both."""
    store = make_store()
    app_loop = asyncio.new_event_loop()
    app_thread = threading.Thread(target=app_loop.run_forever, daemon=True)
    app_thread.start()

    def on_app_loop(call: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(call, app_loop).result(timeout=30)

    async def ids(user_id: str) -> list[str]:
        return [s.id for s in await SessionManager(store).list_for_user(user_id)]

    try:
        t0 = time.time()
        kept, revoked = make_record(now=t0), make_record(now=t0)
        on_app_loop(store.open())
        for record in (kept, revoked):
            on_app_loop(store.create(record, max_sessions=10, now=t0))

        if store._bound_to_loop:
            with pytest.raises(RuntimeError, match="open on another event loop"):
                asyncio.run(SessionManager(store).revoke("alice", revoked.id))
            with pytest.raises(RuntimeError, match="open on another event loop"):
                asyncio.run(store.close())
            assert sorted(on_app_loop(ids("alice"))) == sorted([kept.id, revoked.id])
        else:
            asyncio.run(SessionManager(store).revoke("alice", revoked.id))
            assert on_app_loop(ids("alice")) == [kept.id]
        on_app_loop(store.close())
    finally:
        app_loop.call_soon_threadsafe(app_loop.stop)
        app_thread.join(timeout=10)
        app_loop.close()
