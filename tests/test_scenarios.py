"""HTTP scenarios through ``SessionMiddleware``, run once for every store.

The second layer of the conformance suite (tower-sessions' ``route_tests!``):
each test drives the test app in ``tests/apps/session_app.py`` over real
HTTP (``httpx.ASGITransport``) and checks both the responses and what the
store holds afterwards. The ``store`` fixture is parametrised over
``tests/store_fixtures.py``'s ``STORE_FIXTURES``, so a new store runs all of
these by being added there.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from authsessions import (
    Session,
    SessionConfig,
    SessionData,
    SessionDataError,
    SessionManager,
    StoreUnavailable,
    Unauthorized,
)
from authsessions._session import ROTATED_AWAY_NOTICE_SECONDS
from authsessions._tokens import new_session_id, new_token, token_digest
from authsessions.stores import SessionUpdate, Store
from tests.apps.session_app import (
    COOKIE,
    FIREFOX_WINDOWS,
    SlowGate,
    cookie_header,
    plant_session,
    session_cookie,
)
from tests.conftest import AppFactory, ClientFactory

THIRTY_DAYS = int(timedelta(days=30).total_seconds())


async def live_sessions(store: Store, user_id: str) -> list[SessionData]:
    return await SessionManager(store).list_for_user(user_id)


async def count_all_rows(store: Store) -> int:
    """How many sessions the store holds, live or expired. Destructive: it empties the store.

    No store primitive counts every row, but "delete the sessions expired as of
    a far future" deletes all of them and says how many there were.
    """
    return await store.delete_expired(now=time.time() + 10**10, limit=10**6)


async def login(client: httpx.AsyncClient, user_id: str = "alice", **body: object) -> str:
    """Sign in; returns the new token (also kept in the client's cookie jar)."""
    response = await client.post("/login", json={"user_id": user_id, **body})
    assert response.status_code == 200, response.text
    cookie = session_cookie(response)
    assert cookie is not None
    return cookie.value


def assert_clears_cookie(response: httpx.Response) -> None:
    cookie = session_cookie(response)
    assert cookie is not None, f"no clearing Set-Cookie in {response.headers}"
    assert cookie.value == ""
    assert cookie.max_age == 0
    assert cookie.attributes["path"] == "/"
    assert "secure" in cookie.attributes
    assert "domain" not in cookie.attributes


# -- login and the cookie ------------------------------------------------------------------


async def test_login_sets_host_cookie_secure_httponly_lax_with_max_age(
    client: httpx.AsyncClient, store: Store
) -> None:
    response = await client.post("/login", json={"user_id": "alice"})

    assert response.status_code == 200
    cookie = session_cookie(response)
    assert cookie is not None
    assert cookie.name == "__Host-session"
    assert len(cookie.value) == 43
    assert "secure" in cookie.attributes
    assert "httponly" in cookie.attributes
    assert cookie.attributes["samesite"] == "Lax"
    assert cookie.attributes["path"] == "/"
    assert "domain" not in cookie.attributes
    assert cookie.max_age is not None
    assert cookie.max_age == THIRTY_DAYS  # the ttl, as configured
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["vary"] == "Cookie"
    body = response.json()
    assert body["authenticated"] is True
    assert body["user_id"] == "alice"
    [stored] = await live_sessions(store, "alice")
    assert stored.id == body["session"]["id"]
    assert stored.data == {}
    assert stored.device_name == "Chrome on macOS"
    assert stored.device_type == "desktop"
    assert stored.ip_address == "127.0.0.1"


async def test_next_request_is_authenticated_without_new_cookie(
    client: httpx.AsyncClient, store: Store
) -> None:
    await login(client)
    [stored] = await live_sessions(store, "alice")

    response = await client.get("/me")

    assert response.status_code == 200
    assert response.json()["authenticated"] is True
    assert response.json()["user_id"] == "alice"
    assert response.json()["session"]["id"] == stored.id
    assert session_cookie(response) is None


async def test_values_set_after_authenticate_in_the_same_request_are_kept(
    client: httpx.AsyncClient, store: Store
) -> None:
    await login(client, data={"plan": "pro"}, set={"theme": "dark"})

    response = await client.get("/me")

    assert response.json()["session"]["data"] == {"plan": "pro", "theme": "dark"}
    [stored] = await live_sessions(store, "alice")
    assert stored.data == {"plan": "pro", "theme": "dark"}


async def test_values_set_after_rotate_in_the_same_request_are_kept(
    client: httpx.AsyncClient, store: Store
) -> None:
    await login(client, data={"plan": "pro"})

    rotated = await client.post("/rotate", json={"set": {"elevated": True}})

    assert rotated.status_code == 200
    me = await client.get("/me")
    assert me.json()["session"]["data"] == {"plan": "pro", "elevated": True}
    [stored] = await live_sessions(store, "alice")
    assert stored.data == {"plan": "pro", "elevated": True}


# -- rotate -------------------------------------------------------------------------------


async def rotate_while_another_task_sets(request: Request) -> Response:
    """Sets ``before``, then rotates while a task of the same request sets ``during``."""
    session = Session.from_request(request)
    session.set("before", 1)

    async def set_during_the_rotation() -> None:
        await asyncio.sleep(0)
        session.set("during", 2)

    task = asyncio.create_task(set_during_the_rotation())
    await session.rotate()
    await task
    session.set("after", 3)
    current = session.current()
    assert current is not None
    return JSONResponse({"data": current.data})


async def test_values_set_while_rotate_waits_for_the_store_are_kept(
    store: Store, app_factory: AppFactory, client_factory: ClientFactory
) -> None:
    """A store that suspends (a network round trip) lets other tasks of the request run
    while rotate() waits: what they set must be written like any other change.
    """
    route = Route("/rotate-while-setting", rotate_while_another_task_sets, methods=["POST"])
    client = client_factory(app_factory(store, extra_routes=[route]))
    await login(client, data={"plan": "pro"})

    response = await client.post("/rotate-while-setting")

    everything = {"plan": "pro", "before": 1, "during": 2, "after": 3}
    assert response.json()["data"] == everything
    [stored] = await live_sessions(store, "alice")
    assert stored.data == everything


async def rotate_in_two_tasks_at_once(request: Request) -> Response:
    session = Session.from_request(request)
    session.set("before", 1)
    await asyncio.gather(session.rotate(), session.rotate())
    return JSONResponse({"authenticated": session.is_authenticated})


async def test_two_tasks_of_one_request_rotating_at_once_both_rotate(
    store: Store, app_factory: AppFactory, client_factory: ClientFactory
) -> None:
    """Rotations are conditional on the token they rotate away from: on a store that
    suspends, the second task's finds it gone, rotated by the first. That is this
    request's own doing, so it rotates again from there, and does not end the session.
    """
    route = Route("/rotate-twice", rotate_in_two_tasks_at_once, methods=["POST"])
    client = client_factory(app_factory(store, extra_routes=[route]))
    token = await login(client, data={"plan": "pro"})

    response = await client.post("/rotate-twice")

    assert response.json() == {"authenticated": True}
    new = session_cookie(response)
    assert new is not None
    assert new.value not in ("", token)
    assert (await client.get("/me", headers=cookie_header(token))).json()["authenticated"] is False
    me = await client.get("/me", headers=cookie_header(new.value))
    assert me.json()["session"]["data"] == {"plan": "pro", "before": 1}
    assert len(await live_sessions(store, "alice")) == 1


async def test_rotate_keeps_id_and_data_and_refreshes_expiry(
    client: httpx.AsyncClient, store: Store
) -> None:
    token, record = await plant_session(
        store, "alice", created_ago=600, expires_in=60, data={"cart": [1, 2]}
    )

    response = await client.post("/rotate", headers=cookie_header(token))

    assert response.status_code == 200
    new = session_cookie(response)
    assert new is not None
    assert new.value not in ("", token)
    assert new.max_age is not None
    assert new.max_age > THIRTY_DAYS - 5
    [stored] = await live_sessions(store, "alice")
    assert stored.id == record.id
    assert stored.data == {"cart": [1, 2]}
    assert stored.created_at.timestamp() == pytest.approx(record.created_at, abs=1)
    assert stored.expires_at > datetime.now(UTC) + timedelta(days=29)


async def test_token_stolen_before_rotate_is_rejected_and_cleared_after_it(
    client: httpx.AsyncClient, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An attacker who copied the cookie before a privilege change gains nothing after it.

    ``rotate`` replaces the token: the old one must no longer find the session. For
    ``ROTATED_AWAY_NOTICE_SECONDS`` its answer leaves the cookie alone (the same browser's
    requests sent before the rotation's answer carry it); after that it is told to drop it.
    """
    old = await login(client)
    rotated = await client.post("/rotate")
    new = session_cookie(rotated)
    assert new is not None

    replay = await client.get("/me", headers=cookie_header(old))

    assert replay.json()["authenticated"] is False
    assert "set-cookie" not in replay.headers
    fresh = await client.get("/me", headers=cookie_header(new.value))
    assert fresh.json()["authenticated"] is True
    assert len(await live_sessions(store, "alice")) == 1

    later = time.time() + ROTATED_AWAY_NOTICE_SECONDS
    monkeypatch.setattr(time, "time", lambda: later)
    replay = await client.get("/me", headers=cookie_header(old))

    assert replay.json()["authenticated"] is False
    assert_clears_cookie(replay)
    fresh = await client.get("/me", headers=cookie_header(new.value))
    assert fresh.json()["authenticated"] is True


async def test_a_devices_page_loading_as_the_session_rotates_leaves_the_new_cookie_alone(
    store: Store, app_factory: AppFactory, client_factory: ClientFactory
) -> None:
    """A page rotates while the same browser's devices page is loading with the old token.
    Its listing finds that token rotated away. Its answer, arriving after the rotation's,
    must not clear the new cookie (the user would be signed out, their rotated session
    left holding a place until it expired), must stay out of shared caches (it may show
    the user's data), and the keys it set must land, as at the end of any such request.
    """
    gate = asyncio.Event()
    loaded = asyncio.Event()

    async def slow_devices(request: Request) -> Response:
        session = Session.from_request(request)
        session.set("visited", "devices")
        name = session.get("name")
        loaded.set()
        await gate.wait()
        try:
            devices: int | None = len(await session.list_my_sessions())
        except Unauthorized:
            devices = None
        return JSONResponse({"name": name, "devices": devices})

    client = client_factory(app_factory(store, extra_routes=[Route("/devices", slow_devices)]))
    await login(client, data={"name": "Alice"})
    devices = asyncio.create_task(client.get("/devices"))
    await loaded.wait()
    rotated = await client.post("/rotate")
    assert session_cookie(rotated) is not None
    gate.set()

    answer = await devices

    assert answer.json() == {"name": "Alice", "devices": None}
    assert "set-cookie" not in answer.headers
    assert answer.headers["cache-control"] == "no-store"
    assert answer.headers["vary"] == "Cookie"
    me = await client.get("/me")  # the cookie jar's, as a browser's
    assert me.json()["authenticated"] is True
    (session,) = await live_sessions(store, "alice")
    assert session.data == {"name": "Alice", "visited": "devices"}


@pytest.mark.parametrize("first", ["unknown", "malformed"])
async def test_a_token_rotated_away_behind_another_cookie_of_the_name_is_told_apart(
    client: httpx.AsyncClient, first: str
) -> None:
    """A cookie a former ``cookie_path`` or ``cookie_domain`` left comes first; the one the
    last login set, just rotated away, second: its answer must not clear the new cookie."""
    old = await login(client)
    new = session_cookie(await client.post("/rotate"))
    assert new is not None
    stale = new_token() if first == "unknown" else "not-a-token"

    answer = await client.get("/me", headers={"cookie": f"{COOKIE}={stale}; {COOKIE}={old}"})

    assert answer.json()["authenticated"] is False
    assert "set-cookie" not in answer.headers
    unknown = await client.get("/me", headers={"cookie": f"{COOKIE}={stale}; {COOKIE}={stale}"})
    assert_clears_cookie(unknown)


async def test_a_failed_login_on_a_request_carrying_a_token_rotated_away_spares_its_cookie(
    store: Store, app_factory: AppFactory, client_factory: ClientFactory
) -> None:
    """A login on such a request whose own 500 page is answered (its new session ends
    unsent) must leave the cookie alone: the browser may hold the rotation's."""

    async def login_then_failing(request: Request) -> Response:
        await Session.from_request(request).authenticate("bob")
        return JSONResponse({"error": "boom"}, status_code=500)

    client = client_factory(
        app_factory(store, extra_routes=[Route("/login-then-failing", login_then_failing)])
    )
    old = await login(client)
    new = session_cookie(await client.post("/rotate"))
    assert new is not None

    answer = await client.get("/login-then-failing", headers=cookie_header(old))

    assert answer.status_code == 500
    assert "set-cookie" not in answer.headers
    assert (await client.get("/me", headers=cookie_header(new.value))).json()["user_id"] == "alice"
    assert [s.user_id for s in await SessionManager(store).list_for_user("bob")] == []


async def test_a_login_finding_its_token_rotated_away_spares_the_cookie_when_the_store_fails(
    store: Store,
    app_factory: AppFactory,
    client_factory: ClientFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The login ended nothing (the token no longer named the session), so its 503 must
    not clear the cookie the browser may hold the rotation's new token in."""
    gate, loaded = asyncio.Event(), asyncio.Event()

    async def slow_login(request: Request) -> Response:
        session = Session.from_request(request)
        loaded.set()
        await gate.wait()
        await session.authenticate("alice")
        return JSONResponse({})

    async def failing_create(*args: object, **kwargs: object) -> None:
        raise StoreUnavailable()

    client = client_factory(app_factory(store, extra_routes=[Route("/slow-login", slow_login)]))
    await login(client)
    signing_in = asyncio.create_task(client.get("/slow-login"))
    await loaded.wait()
    new = session_cookie(await client.post("/rotate"))
    assert new is not None
    monkeypatch.setattr(store, "create", failing_create)
    gate.set()

    answer = await signing_in

    assert answer.status_code == 503
    assert "set-cookie" not in answer.headers
    assert (await client.get("/me", headers=cookie_header(new.value))).json()["user_id"] == "alice"


async def test_keys_an_error_page_dropped_stay_dropped_when_a_later_listing_finds_a_rotation(
    store: Store, app_factory: AppFactory, client_factory: ClientFactory
) -> None:
    """A 5xx answer saves nothing; a listing in its streamed body that finds the token
    rotated away must not write the keys after all."""
    started, gate = asyncio.Event(), asyncio.Event()

    async def failing_stream(request: Request) -> Response:
        session = Session.from_request(request)
        session.set("cart", ["dropped"])

        async def body() -> AsyncIterator[bytes]:
            started.set()
            await gate.wait()
            with contextlib.suppress(Unauthorized):
                await session.list_my_sessions()
            yield b"failed"

        return StreamingResponse(body(), status_code=500)

    client = client_factory(app_factory(store, extra_routes=[Route("/failing", failing_stream)]))
    token, _ = await plant_session(store, "alice", data={"theme": "dark"})
    failing = asyncio.create_task(client.get("/failing", headers=cookie_header(token)))
    await started.wait()
    assert session_cookie(await client.post("/rotate", headers=cookie_header(token))) is not None
    gate.set()

    assert (await failing).status_code == 500
    (record,) = await live_sessions(store, "alice")
    assert record.data == {"theme": "dark"}


async def test_a_token_a_login_replaced_moments_ago_leaves_the_new_cookie_alone(
    client: httpx.AsyncClient, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Signing in again (as anyone) in a browser holding a session ends that session; the
    browser's requests sent before the login's answer still carry its token, and theirs
    must not clear the new cookie. After the notice time such a cookie is cleared."""
    old = await login(client)
    new = await login(client, "bob")
    assert await live_sessions(store, "alice") == []

    answer = await client.get("/me", headers=cookie_header(old))

    assert answer.json()["authenticated"] is False
    assert "set-cookie" not in answer.headers
    assert (await client.get("/me", headers=cookie_header(new))).json()["user_id"] == "bob"
    later = time.time() + ROTATED_AWAY_NOTICE_SECONDS
    monkeypatch.setattr(time, "time", lambda: later)
    assert_clears_cookie(await client.get("/me", headers=cookie_header(old)))


def loads_then_waits(then: Callable[[Session], None]) -> tuple[Route, asyncio.Event, asyncio.Event]:
    """``/slow``, which loads the session, sets the second event, waits for the first,
    then calls ``then`` with the session."""
    gate, loaded = asyncio.Event(), asyncio.Event()

    async def slow(request: Request) -> Response:
        session = Session.from_request(request)
        loaded.set()
        await gate.wait()
        then(session)
        return JSONResponse({})

    return Route("/slow", slow), gate, loaded


def set_cart(session: Session) -> None:
    session.set("cart", ["book"])


@pytest.mark.parametrize("writes", ["a key", "a due touch"])
async def test_a_request_in_flight_as_the_browser_signs_in_again_leaves_the_new_cookie_alone(
    store: Store,
    app_factory: AppFactory,
    client_factory: ClientFactory,
    monkeypatch: pytest.MonkeyPatch,
    writes: str,
) -> None:
    """It loaded the session the login then ended; its write finds that session gone, and
    its answer must not clear the new login's cookie."""

    def past_the_touch_interval(session: Session) -> None:
        later = time.time() + 60  # within the notice time
        monkeypatch.setattr(time, "time", lambda: later)

    slow, gate, loaded = loads_then_waits(
        set_cart if writes == "a key" else past_the_touch_interval
    )
    config = SessionConfig(touch_interval=timedelta(seconds=30))
    client = client_factory(app_factory(store, config, extra_routes=[slow]))
    await login(client)
    in_flight = asyncio.create_task(client.get("/slow"))
    await loaded.wait()
    new = await login(client, "bob")
    gate.set()

    answer = await in_flight

    assert "set-cookie" not in answer.headers
    assert (await client.get("/me", headers=cookie_header(new))).json()["user_id"] == "bob"


async def test_a_logout_carrying_a_token_rotated_away_signs_the_browser_out(
    client: httpx.AsyncClient, store: Store
) -> None:
    """The user asked to sign out from a tab whose request carried the token another tab
    had just rotated away: the session the token was rotated to ended too. Left live, the
    rotation's answer, reaching the browser after the logout's clearing cookie, kept the
    browser signed in."""
    old = await login(client)
    rotated = session_cookie(await client.post("/rotate"))
    assert rotated is not None

    answer = await client.post("/logout", headers=cookie_header(old))

    assert answer.status_code == 200
    assert_clears_cookie(answer)
    assert await live_sessions(store, "alice") == []
    after = await client.get("/me", headers=cookie_header(rotated.value))
    assert after.json()["authenticated"] is False


def drawing_first(taken: str, draw: Callable[[], str]) -> Callable[[], str]:
    """A stand-in for ``draw`` (a new token or id) that hands out ``taken`` once, then draws."""
    first = iter([taken])
    return lambda: next(first, None) or draw()


async def test_a_rotate_whose_new_token_is_taken_retries_and_leaves_the_holder_alone(
    app: Starlette,
    client: httpx.AsyncClient,
    client_factory: ClientFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """2**-256 odds, but a token must never be shared, nor its session stranded."""
    bobs_browser = client_factory(app)
    bobs_token = await login(bobs_browser, "bob", data={"mine": True})
    await login(client, "alice", data={"cart": [1]})
    monkeypatch.setattr("authsessions._session.new_token", drawing_first(bobs_token, new_token))

    rotated = await client.post("/rotate")

    new = session_cookie(rotated)
    assert new is not None
    assert new.value not in ("", bobs_token)
    alice = (await client.get("/me", headers=cookie_header(new.value))).json()
    assert (alice["user_id"], alice["session"]["data"]) == ("alice", {"cart": [1]})
    bob = (await bobs_browser.get("/me", headers=cookie_header(bobs_token))).json()
    assert (bob["user_id"], bob["session"]["data"]) == ("bob", {"mine": True})


# -- logout ----------------------------------------------------------------------------------


async def test_a_login_whose_new_id_is_taken_retries_and_leaves_the_owner_alone(
    app: Starlette,
    client: httpx.AsyncClient,
    client_factory: ClientFactory,
    store: Store,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """2**-128 odds, but a session id must never be shared or overwritten."""
    await login(client_factory(app), "bob", data={"mine": True})  # bob's own browser
    [bobs] = await live_sessions(store, "bob")
    monkeypatch.setattr(
        "authsessions._session.new_session_id", drawing_first(bobs.id, new_session_id)
    )

    await login(client, "alice")

    [alices] = await live_sessions(store, "alice")
    assert alices.id != bobs.id
    [bobs_after] = await live_sessions(store, "bob")
    assert (bobs_after.id, bobs_after.data) == (bobs.id, {"mine": True})


async def test_logout_destroys_session_and_clears_cookie(
    client: httpx.AsyncClient, store: Store
) -> None:
    token = await login(client)

    response = await client.post("/logout")

    assert response.status_code == 200
    assert response.json()["authenticated"] is False
    assert_clears_cookie(response)
    assert "httponly" in session_cookie(response).attributes  # type: ignore[union-attr]
    assert await live_sessions(store, "alice") == []
    replay = await client.get("/me", headers=cookie_header(token))
    assert replay.json()["authenticated"] is False
    assert_clears_cookie(replay)


async def test_logout_without_session_succeeds_and_sets_nothing(
    client: httpx.AsyncClient,
) -> None:
    response = await client.post("/logout")

    assert response.status_code == 200
    assert response.json()["authenticated"] is False
    assert "set-cookie" not in response.headers


async def test_logout_all_from_device_b_ends_device_a(
    app: Starlette, store: Store, client_factory: ClientFactory
) -> None:
    device_a = client_factory(app)
    device_b = client_factory(app, user_agent=FIREFOX_WINDOWS)
    bob = client_factory(app)
    await login(device_a)
    await login(device_b)
    await login(bob, "bob")

    response = await device_b.post("/logout_all")

    assert response.status_code == 200
    assert_clears_cookie(response)
    a = await device_a.get("/me")
    assert a.json()["authenticated"] is False
    assert_clears_cookie(a)
    assert await live_sessions(store, "alice") == []
    assert (await bob.get("/me")).json()["user_id"] == "bob"
    assert len(await live_sessions(store, "bob")) == 1


async def test_logout_other_keeps_only_the_current_session(
    app: Starlette, store: Store, client_factory: ClientFactory
) -> None:
    devices = [client_factory(app) for _ in range(3)]
    for device in devices:
        await login(device)
    await login(client_factory(app), "bob")
    current = (await devices[1].get("/current")).json()

    response = await devices[1].post("/logout_other")

    assert response.status_code == 200
    assert response.json()["authenticated"] is True
    assert session_cookie(response) is None
    for other in (devices[0], devices[2]):
        me = await other.get("/me")
        assert me.json()["authenticated"] is False
        assert_clears_cookie(me)
    assert [s.id for s in await live_sessions(store, "alice")] == [current["id"]]
    assert len(await live_sessions(store, "bob")) == 1


ODD_BUT_VALID_JSON: dict[str, object] = {
    "float_one": 1.0,
    "big_int": 2**63 + 1,
    "tiny": 5e-324,
    "unicode": "é \u2028 😀 \u0000 nul",
    "empty": "",
    "": "empty key",
    "dotted.key": {"$dollar": [None, True, False, [], {}]},
    "quote'and\"backslash\\": "'; DROP TABLE x; --",
}


async def test_stored_values_read_back_exactly_as_written(
    client: httpx.AsyncClient, store: Store
) -> None:
    """Whatever strict JSON ``set`` accepts, every store must give back unchanged."""
    await login(client)

    written = await client.post("/set", json=ODD_BUT_VALID_JSON)

    assert written.status_code == 200, written.text
    read = (await client.get("/me")).json()["session"]["data"]
    assert read == ODD_BUT_VALID_JSON
    [stored] = await live_sessions(store, "alice")
    assert stored.data == ODD_BUT_VALID_JSON
    assert type(stored.data["float_one"]) is float


# -- listing and revoking -------------------------------------------------------------------


async def test_list_my_sessions_orders_by_recent_activity_with_one_current(
    client: httpx.AsyncClient, store: Store
) -> None:
    oldest_token, oldest = await plant_session(store, "alice", created_ago=7200, idle_for=3600)
    _, middle = await plant_session(store, "alice", created_ago=7200, idle_for=1800)
    _, newest = await plant_session(
        store, "alice", created_ago=7200, idle_for=60, user_agent=FIREFOX_WINDOWS
    )
    await plant_session(store, "bob")

    response = await client.get("/sessions", headers=cookie_header(oldest_token))

    assert response.status_code == 200
    listed = response.json()
    # The current one is active now, so it leads with this request's time, though the
    # store last heard of it an hour ago; the others follow by what the store recorded.
    assert [s["id"] for s in listed] == [oldest.id, newest.id, middle.id]
    assert [s["is_current"] for s in listed] == [True, False, False]
    active = [datetime.fromisoformat(s["last_active_at"]) for s in listed]
    assert active == sorted(active, reverse=True)
    assert active[0] >= datetime.now(UTC) - timedelta(seconds=5)
    assert {s["user_id"] for s in listed} == {"alice"}
    assert listed[1]["device_name"] == "Firefox on Windows"
    assert oldest_token not in response.text
    again = await client.get("/sessions", headers=cookie_header(oldest_token))
    assert [s["id"] for s in again.json()] == [oldest.id, newest.id, middle.id]


async def test_list_my_sessions_leaves_out_sessions_past_a_shortened_absolute_ttl(
    store: Store, app_factory: AppFactory, client_factory: ClientFactory
) -> None:
    """Their cookies no longer sign anyone in (the middleware checks absolute_ttl on each
    request), so listing them as devices would show sessions that cannot be used.
    """
    token, this = await plant_session(store, "alice", created_ago=60)
    _, young = await plant_session(store, "alice", created_ago=1800, idle_for=30)
    old_token, _ = await plant_session(store, "alice", created_ago=7200, idle_for=10)
    client = client_factory(app_factory(store, SessionConfig(absolute_ttl=timedelta(hours=1))))

    response = await client.get("/sessions", headers=cookie_header(token))
    old = await client.get("/me", headers=cookie_header(old_token))

    assert [s["id"] for s in response.json()] == [this.id, young.id]
    assert old.json()["user_id"] is None


async def test_revoke_finds_no_session_past_a_shortened_absolute_ttl(
    store: Store, app_factory: AppFactory, client_factory: ClientFactory
) -> None:
    """Left out of the device list, as its cookie signs no one in: revoking it answered
    as if it were a live device."""
    token, _ = await plant_session(store, "alice", created_ago=60)
    _, old = await plant_session(store, "alice", created_ago=7200, idle_for=10)
    client = client_factory(app_factory(store, SessionConfig(absolute_ttl=timedelta(hours=1))))

    response = await client.post(f"/sessions/{old.id}/revoke", headers=cookie_header(token))

    assert response.status_code == 404
    assert response.json() == {"detail": "No such session."}
    assert (await client.get("/me", headers=cookie_header(token))).json()["user_id"] == "alice"


async def test_a_shortened_ttl_ends_sessions_idle_longer_than_it_at_once(
    store: Store, app_factory: AppFactory, client_factory: ClientFactory
) -> None:
    """Stores keep the expiry set under the old ttl (30 days, say): a stricter idle limit
    must hold from the next request, for sign-ins and device lists alike."""
    day = 86400
    idle_token, _ = await plant_session(
        store, "alice", created_ago=3 * day, idle_for=2 * day, expires_in=28 * day
    )
    token, this = await plant_session(store, "alice", created_ago=60, expires_in=28 * day)
    config = SessionConfig(ttl=timedelta(hours=1))
    client = client_factory(app_factory(store, config))

    refused = await client.get("/me", headers=cookie_header(idle_token))
    listed = await client.get("/sessions", headers=cookie_header(token))

    assert refused.json()["user_id"] is None
    assert_clears_cookie(refused)
    assert [s["id"] for s in listed.json()] == [this.id]
    assert [s.id for s in await SessionManager(store, config).list_for_user("alice")] == [this.id]


async def change_meanwhile(store: Store, session: Session, meanwhile: str, rotated: str) -> None:
    """What another request did to ``session`` while this one ran: ``"revoked"`` it, or
    ``"rotated away"`` its token (to the digest ``rotated``)."""
    current = session.current()
    assert current is not None
    now = time.time()
    if meanwhile == "revoked":
        await store.delete(current.id, now=now)
    else:
        (held,) = [
            r for r in await store.list_for_user(current.user_id, now=now) if r.id == current.id
        ]
        update = SessionUpdate(  # as Session.rotate() does
            token_digest=rotated,
            last_active_at=now,
            expires_at=now + 60,
            expected_token_digest=held.token_digest,
            rotated_away_until=now + ROTATED_AWAY_NOTICE_SECONDS,
        )
        assert await store.update(current.id, update, now=now)


@pytest.mark.parametrize(
    "operation",
    ["rotate", "logout", "list_my_sessions", "logout_other", "logout_all", "revoke"],
)
@pytest.mark.parametrize("meanwhile", ["revoked", "rotated away"])
async def test_a_request_whose_session_was_revoked_or_rotated_away_meanwhile_cannot_act(
    store: Store,
    app_factory: AppFactory,
    client_factory: ClientFactory,
    meanwhile: str,
    operation: str,
) -> None:
    """The user revoked a strange device, or rotated (a privilege change, a suspected
    theft), while a request of a stolen copy of the cookie was still running (a slow
    upload keeps it open as long as its sender likes): that request must not take the
    session over with a token of its own, end the user's other sessions, or list their
    devices. A logout ends the session it was rotated to: the same browser's other tab
    may have rotated it, and a sign-out must sign out (at worst the thief signs the user
    out of that one session).
    """
    rotated = token_digest(new_token())

    async def changed_then_acting(request: Request) -> Response:
        session = Session.from_request(request)
        await change_meanwhile(store, session, meanwhile, rotated)
        if operation == "list_my_sessions":
            return JSONResponse([s.id for s in await session.list_my_sessions()])
        if operation == "revoke":
            await session.revoke(other.id)
        else:
            await getattr(session, operation)()
        return JSONResponse({"done": operation})

    token, this = await plant_session(store, "alice")
    _, other = await plant_session(store, "alice", idle_for=60)
    client = client_factory(
        app_factory(store, extra_routes=[Route("/changed-then-acting", changed_then_acting)])
    )

    response = await client.get("/changed-then-acting", headers=cookie_header(token))

    # A logout succeeds without a session; the others need one.
    assert response.status_code == (200 if operation == "logout" else 401)
    assert other.id not in response.text
    if meanwhile == "revoked" or operation == "logout":
        assert_clears_cookie(response)
    else:  # the browser's request sent before a rotation's answer: its new cookie stands
        assert "set-cookie" not in response.headers
    ended = meanwhile == "revoked" or operation == "logout"
    kept = [other.id] if ended else [this.id, other.id]
    assert sorted(s.id for s in await live_sessions(store, "alice")) == sorted(kept)
    if meanwhile == "rotated away" and operation != "logout":
        assert await store.get(rotated, now=time.time()) is not None  # the user's token


@pytest.mark.parametrize("meanwhile", ["revoked", "rotated away"])
async def test_keys_set_by_a_request_whose_token_was_rotated_away_land_but_not_once_revoked(
    store: Store, app_factory: AppFactory, client_factory: ClientFactory, meanwhile: str
) -> None:
    """As the README's security model says: a rotation must not lose the writes of the
    same browser's requests still in flight; a revoke ends what the session was."""
    rotated = token_digest(new_token())

    async def changed_then_setting(request: Request) -> Response:
        session = Session.from_request(request)
        await change_meanwhile(store, session, meanwhile, rotated)
        session.set("cart", ["book"])
        return JSONResponse({})

    token, this = await plant_session(store, "alice", data={"theme": "dark"})
    client = client_factory(
        app_factory(store, extra_routes=[Route("/changed-then-setting", changed_then_setting)])
    )

    response = await client.get("/changed-then-setting", headers=cookie_header(token))

    if meanwhile == "revoked":
        assert_clears_cookie(response)
        assert await live_sessions(store, "alice") == []
    else:
        assert "set-cookie" not in response.headers  # the browser's new cookie stands
        record = await store.get(rotated, now=time.time())
        assert record is not None
        assert (record.id, record.data) == (this.id, {"theme": "dark", "cart": ["book"]})


@pytest.mark.parametrize(
    "operation", ["rotate", "list_my_sessions", "logout_other", "logout_all", "revoke"]
)
async def test_keys_set_before_an_operation_finds_the_token_rotated_away_land(
    store: Store, app_factory: AppFactory, client_factory: ClientFactory, operation: str
) -> None:
    """The operation answers 401, as the token no longer names the session; the keys the
    request set before it land, as they do at the end of a request rotated away."""
    rotated = token_digest(new_token())

    async def setting_then_acting(request: Request) -> Response:
        session = Session.from_request(request)
        session.set("cart", ["book"])
        await change_meanwhile(store, session, "rotated away", rotated)
        if operation == "revoke":
            await session.revoke(new_session_id())
        else:
            await getattr(session, operation)()
        return JSONResponse({})

    token, this = await plant_session(store, "alice", data={"theme": "dark"})
    client = client_factory(
        app_factory(store, extra_routes=[Route("/setting-then-acting", setting_then_acting)])
    )

    response = await client.get("/setting-then-acting", headers=cookie_header(token))

    assert response.status_code == 401
    assert "set-cookie" not in response.headers
    record = await store.get(rotated, now=time.time())
    assert record is not None
    assert (record.id, record.data) == (this.id, {"theme": "dark", "cart": ["book"]})


async def test_a_login_on_a_request_whose_token_was_rotated_away_meanwhile_ends_nothing(
    store: Store, app_factory: AppFactory, client_factory: ClientFactory
) -> None:
    """A stolen copy of the cookie, its request held open while the user rotated: a login
    on that request (anyone may sign in as themselves) must not end the session the
    user now holds, as a logout there does not.
    """
    rotated = token_digest(new_token())

    async def rotated_then_signing_in(request: Request) -> Response:
        session = Session.from_request(request)
        await change_meanwhile(store, session, "rotated away", rotated)
        await session.authenticate("mallory")
        return JSONResponse({"user_id": session.user_id})

    token, this = await plant_session(store, "alice")
    client = client_factory(
        app_factory(
            store, extra_routes=[Route("/rotated-then-signing-in", rotated_then_signing_in)]
        )
    )

    response = await client.get("/rotated-then-signing-in", headers=cookie_header(token))

    assert response.json() == {"user_id": "mallory"}
    assert session_cookie(response) is not None  # mallory's own new session
    assert [s.id for s in await live_sessions(store, "alice")] == [this.id]
    assert await store.get(rotated, now=time.time()) is not None  # the user's token
    assert len(await live_sessions(store, "mallory")) == 1


class UserId(enum.StrEnum):
    ALICE = "alice"


async def test_a_str_subclass_user_id_is_kept_as_a_plain_string(
    store: Store, app_factory: AppFactory, client_factory: ClientFactory
) -> None:
    """As keys are: the memory store kept the member itself, the others a plain string,
    so the id's type depended on the store and on the request."""

    async def sign_in_as_member(request: Request) -> Response:
        session = Session.from_request(request)
        await session.authenticate(UserId.ALICE)
        return JSONResponse(type(session.user_id).__name__)

    async def user_id_type(request: Request) -> Response:
        return JSONResponse(type(Session.from_request(request).user_id).__name__)

    client = client_factory(
        app_factory(
            store,
            extra_routes=[
                Route("/sign-in-as-member", sign_in_as_member, methods=["POST"]),
                Route("/user-id-type", user_id_type),
            ],
        )
    )

    signing_in = await client.post("/sign-in-as-member")
    later = await client.get("/user-id-type")

    assert (signing_in.json(), later.json()) == ("str", "str")
    assert [type(s.user_id) for s in await store.list_for_user("alice", now=time.time())] == [str]


async def test_revoke_another_device_ends_it_and_keeps_this_one(
    app: Starlette, store: Store, client_factory: ClientFactory
) -> None:
    phone = client_factory(app)
    laptop = client_factory(app)
    await login(phone)
    await login(laptop)
    phone_id = (await phone.get("/current")).json()["id"]

    response = await laptop.post(f"/sessions/{phone_id}/revoke")

    assert response.status_code == 200
    assert response.json()["authenticated"] is True
    assert session_cookie(response) is None
    me = await phone.get("/me")
    assert me.json()["authenticated"] is False
    assert_clears_cookie(me)
    remaining = [s.id for s in await live_sessions(store, "alice")]
    assert len(remaining) == 1
    assert phone_id not in remaining


async def test_revoke_own_session_clears_the_cookie(
    client: httpx.AsyncClient, store: Store
) -> None:
    await login(client)
    own_id = (await client.get("/current")).json()["id"]

    response = await client.post(f"/sessions/{own_id}/revoke")

    assert response.status_code == 200
    assert_clears_cookie(response)
    assert await live_sessions(store, "alice") == []


async def test_session_id_enumeration_through_revoke_learns_nothing(
    app: Starlette, store: Store, client_factory: ClientFactory
) -> None:
    """Revoking someone else's session and a made-up id must look exactly alike.

    Otherwise an attacker with any account could probe which session ids exist
    (and so which users are signed in), and a different answer would prove it.
    """
    mallory = client_factory(app)
    bob = client_factory(app)
    await login(mallory, "mallory")
    await login(bob, "bob")
    bob_id = (await bob.get("/current")).json()["id"]

    others = await mallory.post(f"/sessions/{bob_id}/revoke")
    unknown = await mallory.post(f"/sessions/{new_session_id()}/revoke")
    malformed = await mallory.post("/sessions/not-an-id/revoke")

    assert others.status_code == unknown.status_code == malformed.status_code == 404
    assert others.content == unknown.content == malformed.content
    assert others.json() == {"detail": "No such session."}
    assert dict(others.headers) == dict(unknown.headers)
    assert (await bob.get("/me")).json()["authenticated"] is True
    assert len(await live_sessions(store, "bob")) == 1


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/rotate"),
        ("POST", "/logout_all"),
        ("POST", "/logout_other"),
        ("GET", "/sessions"),
        ("POST", "/sessions/AAAAAAAAAAAAAAAAAAAAAA/revoke"),
    ],
)
async def test_operations_needing_a_session_answer_401_without_one(
    client: httpx.AsyncClient, method: str, path: str
) -> None:
    response = await client.request(method, path)

    assert response.status_code == 401
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"detail": "Not authenticated: sign in first."}
    assert "set-cookie" not in response.headers


async def test_current_reflects_writes_made_earlier_in_the_request(
    client: httpx.AsyncClient,
) -> None:
    await login(client, data={"keep": 1, "drop": 2})

    written = await client.post("/set", json={"theme": "dark", "keep": 10})
    removed = await client.post("/remove", json={"keys": ["drop", "never-there"]})

    assert written.json()["session"]["data"] == {"keep": 10, "drop": 2, "theme": "dark"}
    assert removed.json()["session"]["data"] == {"keep": 10, "theme": "dark"}
    assert (await client.get("/me")).json()["session"]["data"] == {"keep": 10, "theme": "dark"}


# -- cookies the server did not issue (or no longer honours) -----------------------------------


async def test_session_fixation_token_planted_before_login_is_destroyed(
    app: Starlette, store: Store, client_factory: ClientFactory
) -> None:
    """A token an attacker slips into the victim's browser must be worthless after login.

    The attacker signs in, plants their own cookie in the victim's browser,
    and waits: if login kept that session (or token), the attacker would
    share the victim's signed-in session.
    """
    attacker = client_factory(app)
    planted = await login(attacker, "victim")  # any session the attacker can get a token for
    victim = client_factory(app)

    response = await victim.post(
        "/login", json={"user_id": "victim"}, headers=cookie_header(planted)
    )

    issued = session_cookie(response)
    assert issued is not None
    assert issued.value not in ("", planted)
    replay = await attacker.get("/me", headers=cookie_header(planted))
    assert replay.json()["authenticated"] is False
    assert [s.id for s in await live_sessions(store, "victim")] == [
        response.json()["session"]["id"]
    ]


async def test_login_while_signed_in_replaces_the_session_with_empty_data(
    client: httpx.AsyncClient, store: Store
) -> None:
    old_token = await login(client, data={"cart": [1]})
    [old] = await live_sessions(store, "alice")

    new_token = await login(client, "alice")

    [new] = await live_sessions(store, "alice")
    assert new.id != old.id
    assert new.data == {}
    assert new_token != old_token
    replay = await client.get("/me", headers=cookie_header(old_token))
    assert replay.json()["authenticated"] is False


async def test_session_fixation_unknown_token_is_never_adopted(
    client: httpx.AsyncClient,
) -> None:
    """A client-chosen token must never become a session's token (no adoption)."""
    chosen = new_token()

    response = await client.post("/login", json={"user_id": "alice"}, headers=cookie_header(chosen))

    issued = session_cookie(response)
    assert issued is not None
    assert issued.value not in ("", chosen)
    assert (await client.get("/me", headers=cookie_header(chosen))).json()["authenticated"] is False


@pytest.mark.parametrize(
    "cookie",
    ["not-a-token", "", "x" * 43 + "A", "!" * 43, "A" * 42, "é" * 43],
    ids=["words", "empty", "too-long", "bad-alphabet", "too-short", "non-ascii"],
)
async def test_malformed_cookie_is_cleared_and_creates_no_row(
    client: httpx.AsyncClient, store: Store, cookie: str
) -> None:
    await plant_session(store, "alice")

    response = await client.get("/me", headers={b"cookie": f"{COOKIE}={cookie}".encode()})

    assert response.status_code == 200
    assert response.json()["authenticated"] is False
    assert_clears_cookie(response)
    assert await count_all_rows(store) == 1


async def test_bogus_session_cookie_is_cleared_and_creates_no_row(
    client: httpx.AsyncClient, store: Store
) -> None:
    """A well-formed token the server never issued must not create a session record.

    Creating rows for unknown tokens would let anyone fill the store (a DoS),
    and adopting them would allow session fixation.
    """
    await plant_session(store, "alice")

    for _ in range(3):
        response = await client.get("/me", headers=cookie_header(new_token()))
        assert response.json()["authenticated"] is False
        assert_clears_cookie(response)

    assert len(await live_sessions(store, "alice")) == 1
    assert await count_all_rows(store) == 1


async def test_expired_session_cookie_is_cleared_and_not_revived(
    client: httpx.AsyncClient, store: Store
) -> None:
    token, _ = await plant_session(store, "alice", created_ago=7200, idle_for=3600, expires_in=-5)

    response = await client.post("/set", json={"theme": "dark"}, headers=cookie_header(token))

    assert response.json()["authenticated"] is False
    assert_clears_cookie(response)
    assert await live_sessions(store, "alice") == []
    assert await count_all_rows(store) == 1  # the expired row itself, not revived, nothing new


async def test_revoked_session_cookie_is_cleared(client: httpx.AsyncClient, store: Store) -> None:
    token = await login(client)
    [stored] = await live_sessions(store, "alice")
    await SessionManager(store).revoke("alice", stored.id)

    response = await client.get("/me", headers=cookie_header(token))

    assert response.json()["authenticated"] is False
    assert_clears_cookie(response)
    assert await count_all_rows(store) == 0


async def test_login_beyond_the_limit_evicts_the_least_recently_active(
    store: Store, app_factory: AppFactory, client_factory: ClientFactory
) -> None:
    client = client_factory(app_factory(store, SessionConfig(max_sessions_per_user=2)))
    _, stale = await plant_session(store, "alice", idle_for=3600)
    _, recent = await plant_session(store, "alice", idle_for=60)

    await login(client)

    remaining = {s.id for s in await live_sessions(store, "alice")}
    assert stale.id not in remaining
    assert recent.id in remaining
    assert len(remaining) == 2


async def test_login_with_a_nul_in_the_user_agent_is_kept_alike_by_every_store(
    app: Starlette, client_factory: ClientFactory
) -> None:
    """HTTP parsers refuse a NUL in a header, but an ASGI server need not: it reached the
    store, where PostgreSQL's ``text`` cannot hold it (a 503, as if the store were down).
    """
    client = client_factory(app, user_agent=f"{FIREFOX_WINDOWS}\x00")

    await login(client)
    listed = (await client.get("/sessions")).json()

    assert [s["user_agent"] for s in listed] == [f"{FIREFOX_WINDOWS}\N{REPLACEMENT CHARACTER}"]
    assert listed[0]["device_name"] == "Firefox on Windows"


# -- concurrency -------------------------------------------------------------------------------


async def test_fifty_concurrent_requests_writing_different_keys_keep_all_fifty(
    store: Store, app_factory: AppFactory, client_factory: ClientFactory
) -> None:
    barrier = asyncio.Barrier(50)

    async def set_after_all_loaded(request: Request) -> Response:
        session = Session.from_request(request)
        # Every request holds the same loaded snapshot before any of them writes.
        await asyncio.wait_for(barrier.wait(), timeout=10)
        key = request.query_params["key"]
        session.set(key, int(key[1:]))
        return JSONResponse({"ok": True})

    app = app_factory(store, extra_routes=[Route("/barrier-set", set_after_all_loaded)])
    client = client_factory(app)
    await login(client, data={"base": True})

    responses = await asyncio.gather(
        *(client.get("/barrier-set", params={"key": f"k{i}"}) for i in range(50))
    )

    assert all(r.status_code == 200 for r in responses)
    [stored] = await live_sessions(store, "alice")
    assert stored.data == {"base": True, **{f"k{i}": i for i in range(50)}}


@pytest.mark.parametrize("writes", ["nothing", "a key"])
async def test_a_request_finding_its_due_touch_made_meanwhile_leaves_the_times_alone(
    store: Store,
    app_factory: AppFactory,
    client_factory: ClientFactory,
    monkeypatch: pytest.MonkeyPatch,
    writes: str,
) -> None:
    """Requests that loaded a session together all find its touch due: the first to
    write moves the times, once per touch interval, and the others keep them."""
    slow, gate, loaded = loads_then_waits(set_cart if writes == "a key" else lambda session: None)
    config = SessionConfig(touch_interval=timedelta(seconds=60))
    client = client_factory(app_factory(store, config, extra_routes=[slow]))
    token, _ = await plant_session(store, "alice", idle_for=120)
    in_flight = asyncio.create_task(client.get("/slow", headers=cookie_header(token)))
    await loaded.wait()
    assert (await client.get("/me", headers=cookie_header(token))).status_code == 200
    [touched] = await live_sessions(store, "alice")
    later = time.time() + 5
    monkeypatch.setattr(time, "time", lambda: later)
    gate.set()

    assert (await in_flight).status_code == 200

    [stored] = await live_sessions(store, "alice")
    assert (stored.last_active_at, stored.expires_at) == (
        touched.last_active_at,
        touched.expires_at,
    )
    assert stored.data == ({"cart": ["book"]} if writes == "a key" else {})


async def test_concurrent_writes_cannot_together_exceed_max_data_bytes(
    store: Store, app_factory: AppFactory, client_factory: ClientFactory
) -> None:
    """``max_data_bytes`` caps a session's stored data, however the writes interleave.

    Otherwise N parallel requests can store N times the limit, and every later
    ``set`` on that session fails because the session is already over it.
    """
    barrier = asyncio.Barrier(2)

    async def set_big_value(request: Request) -> Response:
        session = Session.from_request(request)
        await asyncio.wait_for(barrier.wait(), timeout=10)
        session.set(request.query_params["key"], "x" * 60)
        return JSONResponse({"ok": True})

    config = SessionConfig(max_data_bytes=100)
    app = app_factory(store, config, extra_routes=[Route("/big", set_big_value)])
    client = client_factory(app)
    await login(client)

    responses = await asyncio.gather(
        client.get("/big", params={"key": "a"}), client.get("/big", params={"key": "b"})
    )

    [stored] = await live_sessions(store, "alice")
    stored_size = len(json.dumps(stored.data, separators=(",", ":")))
    assert stored_size <= 100, (
        f"{stored_size} bytes stored under max_data_bytes=100 "
        f"(responses {[r.status_code for r in responses]})"
    )
    # Each fitted on its own: the one that came second is refused, as an app bug (500).
    assert sorted(r.status_code for r in responses) == [200, 500]
    [refused] = [r for r in responses if r.status_code == 500]
    assert "max_data_bytes=100" in refused.json()["detail"]
    assert "concurrent requests" in refused.json()["detail"]
    assert len(stored.data) == 1


async def test_rotate_refused_for_size_changes_nothing(
    store: Store, app_factory: AppFactory, client_factory: ClientFactory
) -> None:
    """A rotation carrying keys that a concurrent write pushed over the cap is all or nothing.

    The old token keeps working and the data keeps only what was stored.
    """

    async def set_then_rotate(request: Request) -> Response:
        session = Session.from_request(request)
        session.set("a", "x" * 60)  # fits this request's copy
        current = session.current()
        assert current is not None
        now = time.time()
        # Another request of the session stores a key meanwhile.
        concurrent = SessionUpdate(now, current.expires_at.timestamp(), {"b": "y" * 60})
        assert await store.update(current.id, concurrent, now=now)
        await session.rotate()
        return JSONResponse({"ok": True})

    config = SessionConfig(max_data_bytes=100)
    app = app_factory(store, config, extra_routes=[Route("/rotate-big", set_then_rotate)])
    client = client_factory(app)
    token = await login(client)

    response = await client.get("/rotate-big")

    assert response.status_code == 500
    assert "max_data_bytes=100" in response.json()["detail"]
    assert session_cookie(response) is None
    me = await client.get("/me")
    assert me.json()["authenticated"] is True
    assert client.cookies[COOKIE] == token
    [stored] = await live_sessions(store, "alice")
    assert stored.data == {"b": "y" * 60}


async def test_a_refused_rotate_leaves_the_requests_changes_to_write(
    store: Store, app_factory: AppFactory, client_factory: ClientFactory
) -> None:
    """An app that catches the refusal and drops the key that did not fit still has its
    other changes written as the response starts.
    """

    async def rotate_or_settle_for_less(request: Request) -> Response:
        session = Session.from_request(request)
        session.set("small", 1)
        session.set("big", "x" * 60)
        current = session.current()
        assert current is not None
        now = time.time()
        concurrent = SessionUpdate(now, current.expires_at.timestamp(), {"b": "y" * 60})
        assert await store.update(current.id, concurrent, now=now)
        try:
            await session.rotate()
        except SessionDataError:
            session.remove_key("big")
        return JSONResponse({"ok": True})

    config = SessionConfig(max_data_bytes=100)
    route = Route("/rotate-or-less", rotate_or_settle_for_less)
    client = client_factory(app_factory(store, config, extra_routes=[route]))
    await login(client)

    response = await client.get("/rotate-or-less")

    assert response.status_code == 200
    [stored] = await live_sessions(store, "alice")
    assert stored.data == {"b": "y" * 60, "small": 1}


async def test_twenty_concurrent_logins_leave_exactly_max_sessions(
    store: Store, app_factory: AppFactory, client_factory: ClientFactory
) -> None:
    barrier = asyncio.Barrier(20)

    async def login_together(request: Request) -> Response:
        session = Session.from_request(request)
        await asyncio.wait_for(barrier.wait(), timeout=10)
        await session.authenticate("alice")
        return JSONResponse({"ok": True})

    app = app_factory(
        store,
        SessionConfig(max_sessions_per_user=5),
        extra_routes=[Route("/barrier-login", login_together, methods=["POST"])],
    )
    clients = [client_factory(app) for _ in range(20)]

    responses = await asyncio.gather(*(c.post("/barrier-login") for c in clients))

    assert all(r.status_code == 200 for r in responses)
    assert len(await live_sessions(store, "alice")) == 5
    authenticated = [(await c.get("/me")).json()["authenticated"] for c in clients]
    assert authenticated.count(True) == 5


async def test_slow_request_overlapping_logout_does_not_resurrect_the_session(
    app: Starlette, store: Store, client_factory: ClientFactory
) -> None:
    """A request that loaded the session before a logout must not write it back after.

    Otherwise "sign out" (say, of a stolen session) could be undone by any
    request still in flight, and the slow response must also tell the
    browser to drop the cookie.
    """
    client = client_factory(app)
    token = await login(client)
    gate: SlowGate = app.state.slow_gate
    slow = asyncio.create_task(client.get("/slow", headers=cookie_header(token)))
    await asyncio.wait_for(gate.started.wait(), timeout=5)

    logout = await client.post("/logout", headers=cookie_header(token))
    assert_clears_cookie(logout)
    gate.proceed.set()
    slow_response = await asyncio.wait_for(slow, timeout=5)

    assert slow_response.status_code == 200
    assert_clears_cookie(slow_response)
    assert await live_sessions(store, "alice") == []
    assert await count_all_rows(store) == 0
    replay = await client.get("/me", headers=cookie_header(token))
    assert replay.json()["authenticated"] is False


async def test_touch_overlapping_a_rotate_does_not_send_back_the_dead_token(
    store: Store, app_factory: AppFactory, client_factory: ClientFactory
) -> None:
    """A request in flight during rotate() must not hand the browser its old token.

    Its touch re-sends the cookie; if that response landed after the rotate's,
    the browser would keep a dead token and be signed out.
    """
    app = app_factory(store, SessionConfig(touch_interval=timedelta(0)))
    client = client_factory(app)
    token = await login(client)
    gate: SlowGate = app.state.slow_gate
    slow = asyncio.create_task(client.get("/slow", headers=cookie_header(token)))
    await asyncio.wait_for(gate.started.wait(), timeout=5)

    rotated = session_cookie(await client.post("/rotate", headers=cookie_header(token)))
    gate.proceed.set()
    slow_response = await asyncio.wait_for(slow, timeout=5)

    assert rotated is not None
    assert rotated.value != token
    sent_back = session_cookie(slow_response)
    assert sent_back is None or sent_back.value != token
    me = await client.get("/me", headers=cookie_header(rotated.value))
    assert me.json()["authenticated"] is True
    assert me.json()["session"]["data"]["slow"] is True
