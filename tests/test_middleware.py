"""SessionMiddleware: headers, frugal writes, expiry, fingerprints, proxies, errors, outages,
WebSocket and lifespan.

Store-independent behaviour runs on a real SQLite file (``sqlite_store``);
the scenarios every store must pass live in ``test_scenarios.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from asgi_lifespan import LifespanManager
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.testclient import TestClient, WebSocketDenialResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from starlette.websockets import WebSocketDisconnect

from authsessions import (
    Session,
    SessionConfig,
    SessionData,
    SessionDataError,
    SessionError,
    SessionManager,
    SessionMiddleware,
    SessionNotFound,
    StoreUnavailable,
    Unauthorized,
)
from authsessions._records import SessionRecord
from authsessions._tokens import new_token, token_digest
from authsessions.stores import (
    CreateError,
    MemoryStore,
    PostgresStore,
    SessionUpdate,
    SQLiteStore,
    Store,
)
from tests.apps.session_app import (
    CHROME_MAC,
    COOKIE,
    FIREFOX_WINDOWS,
    ROUTES,
    build_app,
    cookie_header,
    plant_session,
    session_cookie,
)
from tests.conftest import AppFactory, ClientFactory

TABLE = "authsessions_session"
CHROME_MAC_119 = CHROME_MAC.replace("Chrome/120.0.0.0", "Chrome/119.0.6045.199")


async def only_session(store: Store, user_id: str = "alice") -> SessionData:
    [data] = await SessionManager(store).list_for_user(user_id)
    return data


def assert_clears_cookie(response: httpx.Response) -> None:
    cookie = session_cookie(response)
    assert cookie is not None, f"no clearing Set-Cookie in {response.headers}"
    assert cookie.is_clearing
    assert cookie.attributes["path"] == "/"
    assert "secure" in cookie.attributes


def approx_now(seconds_from_now: float) -> datetime:
    return datetime.now(UTC) + timedelta(seconds=seconds_from_now)


# -- headers ---------------------------------------------------------------------------


async def test_untouched_anonymous_request_gets_no_session_headers(
    sqlite_store: Store, app_factory: AppFactory, client_factory: ClientFactory
) -> None:
    client = client_factory(app_factory(sqlite_store))

    response = await client.get("/me")

    assert response.status_code == 200
    assert response.json()["authenticated"] is False
    assert "set-cookie" not in response.headers
    assert "vary" not in response.headers
    assert "cache-control" not in response.headers


async def test_authenticated_response_is_no_store_and_varies_on_cookie(
    sqlite_store: Store, app_factory: AppFactory, client_factory: ClientFactory
) -> None:
    token, _ = await plant_session(sqlite_store, "alice")
    client = client_factory(app_factory(sqlite_store))

    response = await client.get("/me", headers=cookie_header(token))

    assert response.json()["authenticated"] is True
    assert "set-cookie" not in response.headers
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["vary"] == "Cookie"


async def test_existing_vary_is_extended_and_cookie_responses_are_never_cached(
    sqlite_store: Store, app_factory: AppFactory, client_factory: ClientFactory
) -> None:
    async def cacheable_login(request: Request) -> Response:
        await Session.from_request(request).authenticate("alice")
        return JSONResponse(
            {}, headers={"vary": "Accept-Encoding", "cache-control": "public, max-age=600"}
        )

    app = app_factory(sqlite_store, extra_routes=[Route("/cacheable-login", cacheable_login)])
    client = client_factory(app)

    response = await client.get("/cacheable-login")

    assert session_cookie(response) is not None
    assert response.headers["vary"] == "Accept-Encoding, Cookie"
    assert response.headers["cache-control"] == "no-store"


async def test_a_cookie_response_with_several_cache_headers_of_the_apps_carries_no_store_alone(
    sqlite_store: Store, app_factory: AppFactory, client_factory: ClientFactory
) -> None:
    """Only the last Cache-Control was replaced: "public" went out beside the cookie, to
    a cache that reads the first header of a name. Vary already naming Cookie in an
    earlier header is enough."""

    async def cacheable_login(request: Request) -> Response:
        await Session.from_request(request).authenticate("alice")
        response = JSONResponse({})
        for name, value in [
            (b"cache-control", b"public"),
            (b"cache-control", b"max-age=3600"),
            (b"vary", b"Cookie"),
            (b"vary", b"Accept-Encoding"),
        ]:
            response.raw_headers.append((name, value))
        return response

    app = app_factory(sqlite_store, extra_routes=[Route("/cacheable-login", cacheable_login)])

    response = await client_factory(app).get("/cacheable-login")

    assert session_cookie(response) is not None
    assert response.headers.get_list("cache-control") == ["no-store"]
    assert response.headers.get_list("vary") == ["Cookie", "Accept-Encoding"]


@pytest.mark.parametrize(
    ("existing", "expected"),
    [
        ("Accept-Encoding", "Accept-Encoding, Cookie"),
        ("accept-encoding, cookie", "accept-encoding, cookie"),
        ("Cookie", "Cookie"),
        ("X-Cookie-Consent", "X-Cookie-Consent, Cookie"),
        ("*", "*"),
    ],
)
async def test_authenticated_response_vary_gains_cookie_exactly_once(
    sqlite_store: Store,
    app_factory: AppFactory,
    client_factory: ClientFactory,
    existing: str,
    expected: str,
) -> None:
    """A shared cache keyed without Cookie would serve one user's page to another."""

    async def page(request: Request) -> Response:
        return JSONResponse(
            {"user": Session.from_request(request).user_id}, headers={"vary": existing}
        )

    token, _ = await plant_session(sqlite_store, "alice")
    client = client_factory(app_factory(sqlite_store, extra_routes=[Route("/page", page)]))

    response = await client.get("/page", headers=cookie_header(token))

    assert response.json() == {"user": "alice"}
    assert response.headers.get_list("vary") == [expected]


async def test_a_response_object_shared_by_handlers_never_carries_a_cookie_to_another_caller(
    sqlite_store: Store, app_factory: AppFactory, client_factory: ClientFactory
) -> None:
    """Starlette sends a Response's own header list each time it is returned."""
    shared = PlainTextResponse("ok", headers={"x-app": "1"})

    async def sign_in(request: Request) -> Response:
        await Session.from_request(request).authenticate("alice")
        return shared

    async def health(request: Request) -> Response:
        return shared

    app = app_factory(
        sqlite_store,
        extra_routes=[Route("/sign-in", sign_in, methods=["POST"]), Route("/health", health)],
    )
    alice, stranger = client_factory(app), client_factory(app)
    signed_in = await alice.post("/sign-in")
    bad_cookie = await stranger.get("/health", headers=cookie_header("A" * 43))
    anonymous = await client_factory(app).get("/health")

    assert session_cookie(signed_in) is not None
    assert_clears_cookie(bad_cookie)
    assert sorted(anonymous.headers.multi_items()) == [
        ("content-length", "2"),
        ("content-type", "text/plain; charset=utf-8"),
        ("x-app", "1"),
    ]
    assert shared.raw_headers == PlainTextResponse("ok", headers={"x-app": "1"}).raw_headers


async def test_a_start_message_an_app_sends_every_time_is_never_changed() -> None:
    headers = [(b"x-app", b"1")]
    start: Message = {"type": "http.response.start", "status": 200, "headers": headers}

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            await Session.from_scope(scope).authenticate("alice")
            await send(start)
            await send({"type": "http.response.body", "body": b""})

    client = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=SessionMiddleware(app, store=MemoryStore())),
        base_url="https://testserver",
    )
    async with client:
        responses = [await client.get("/") for _ in range(2)]

    assert [len(response.headers.get_list("set-cookie")) for response in responses] == [1, 1]
    assert start == {"type": "http.response.start", "status": 200, "headers": [(b"x-app", b"1")]}
    assert start["headers"] is headers


@pytest.mark.parametrize("kind", [list, tuple, iter], ids=["list", "tuple", "iterator"])
@pytest.mark.parametrize("signed_in", [False, True], ids=["signing-in", "signed-in"])
async def test_headers_of_any_iterable_kind_are_kept_with_the_sessions(
    kind: Callable[[list[tuple[bytes, bytes]]], Any], signed_in: bool
) -> None:
    """ASGI lets an app send its headers as any iterable; one pass must not use them up."""
    store = MemoryStore()

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and not Session.from_scope(scope).is_authenticated:
            await Session.from_scope(scope).authenticate("alice")
        headers = kind([(b"x-app", b"1")])
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b""})

    client = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=SessionMiddleware(app, store=store)),
        base_url="https://testserver",
    )
    async with client:
        response = await client.get("/")
        if signed_in:
            response = await client.get("/")

    assert response.headers["x-app"] == "1"
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["vary"] == "Cookie"
    assert ("set-cookie" in response.headers) is not signed_in


async def test_cookie_clearing_response_is_no_store_and_varies_on_cookie(
    sqlite_store: Store, app_factory: AppFactory, client_factory: ClientFactory
) -> None:
    client = client_factory(app_factory(sqlite_store))

    response = await client.get("/me", headers=cookie_header("A" * 43))

    assert_clears_cookie(response)
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["vary"] == "Cookie"


@pytest.mark.parametrize(
    ("path", "secure", "http_only"), [("/app", True, False), ("/", False, True)]
)
async def test_cookie_attributes_follow_the_config_when_set_and_cleared(
    sqlite_store: Store,
    app_factory: AppFactory,
    client_factory: ClientFactory,
    path: str,
    secure: bool,
    http_only: bool,
) -> None:
    config = SessionConfig(
        cookie_name="sid",
        cookie_domain="example.com",
        cookie_path=path,
        cookie_same_site="strict",
        cookie_secure=secure,
        cookie_http_only=http_only,
    )
    client = client_factory(app_factory(sqlite_store, config))

    login = await client.post("/login", json={"user_id": "alice"})
    issued = session_cookie(login, "sid")
    assert issued is not None
    logout = await client.post("/logout", headers=cookie_header(issued.value, "sid"))
    cleared = session_cookie(logout, "sid")

    assert session_cookie(login) is None  # nothing under the default name
    assert cleared is not None
    assert cleared.is_clearing
    for cookie in (issued, cleared):
        assert cookie.attributes["domain"] == "example.com"
        assert cookie.attributes["path"] == path
        assert cookie.attributes["samesite"] == "Strict"
        assert ("secure" in cookie.attributes) is secure
        assert ("httponly" in cookie.attributes) is http_only


@pytest.mark.parametrize("stale", ["unknown", "malformed"])
async def test_an_old_cookie_of_the_same_name_sent_first_does_not_undo_the_login(
    stale: str, sqlite_store: Store, app_factory: AppFactory, client_factory: ClientFactory
) -> None:
    """A browser sends every cookie of the name whose Domain and Path match, longest Path
    first, then oldest (RFC 6265, 5.4): after cookie_domain or cookie_path changed, the old
    cookie comes first. Taken alone, it cleared the new one (the clearing cookie carries the
    new Domain and Path), so every login was undone by the next request.
    """
    config = SessionConfig(cookie_name="sid", cookie_domain="example.com")
    client = client_factory(app_factory(sqlite_store, config))
    token, _ = await plant_session(sqlite_store, "alice")
    old = new_token() if stale == "unknown" else "junk"

    response = await client.get("/me", headers={"cookie": f"sid={old}; theme=dark; sid={token}"})

    assert response.json()["authenticated"] is True
    assert session_cookie(response, "sid") is None  # the valid cookie is not cleared


async def test_an_old_cookie_past_a_shortened_ttl_sent_first_does_not_undo_the_login(
    sqlite_store: Store, app_factory: AppFactory, client_factory: ClientFactory
) -> None:
    """Its session is still stored (the store's expiry was set under the longer ttl), but
    past the new one: taken alone, it signed the user out and cleared the valid cookie."""
    config = SessionConfig(cookie_name="sid", ttl=timedelta(days=1))
    client = client_factory(app_factory(sqlite_store, config))
    old, _ = await plant_session(sqlite_store, "alice", idle_for=2 * 86400, expires_in=86400)
    token, _ = await plant_session(sqlite_store, "alice")

    response = await client.get("/me", headers={"cookie": f"sid={old}; sid={token}"})

    assert response.json()["authenticated"] is True
    assert session_cookie(response, "sid") is None  # the valid cookie is not cleared


async def test_duplicate_cookies_that_name_no_session_are_still_cleared(
    sqlite_store: Store, app_factory: AppFactory, client_factory: ClientFactory
) -> None:
    config = SessionConfig(cookie_name="sid", cookie_domain="example.com")
    client = client_factory(app_factory(sqlite_store, config))

    response = await client.get(
        "/me", headers={"cookie": f"sid=junk; sid={new_token()}; sid={new_token()}"}
    )

    assert response.json()["authenticated"] is False
    cleared = session_cookie(response, "sid")
    assert cleared is not None
    assert cleared.is_clearing


# -- writing only what changed, and touching ------------------------------------------------


@pytest.mark.parametrize("writes", [False, True], ids=["reads", "writes"])
async def test_requests_within_touch_interval_leave_activity_and_expiry_alone(
    sqlite_store: Store, app_factory: AppFactory, client_factory: ClientFactory, writes: bool
) -> None:
    """Reads write nothing at all; writes store their keys and nothing else."""
    token, _ = await plant_session(sqlite_store, "alice", idle_for=60, expires_in=600)
    before = await only_session(sqlite_store)
    client = client_factory(app_factory(sqlite_store))

    for _ in range(3):
        if writes:
            response = await client.post(
                "/set", json={"theme": "dark"}, headers=cookie_header(token)
            )
        else:
            response = await client.get("/me", headers=cookie_header(token))
        assert response.json()["authenticated"] is True
        assert session_cookie(response) is None

    after = await only_session(sqlite_store)
    assert after.data == ({"theme": "dark"} if writes else {})
    assert (after.last_active_at, after.expires_at) == (before.last_active_at, before.expires_at)


async def test_a_write_after_touch_interval_also_slides_expiry(
    sqlite_store: Store, app_factory: AppFactory, client_factory: ClientFactory
) -> None:
    token, _ = await plant_session(sqlite_store, "alice", idle_for=301, expires_in=60)
    client = client_factory(app_factory(sqlite_store))

    response = await client.post("/set", json={"theme": "dark"}, headers=cookie_header(token))

    cookie = session_cookie(response)
    assert cookie is not None
    assert cookie.value == token
    after = await only_session(sqlite_store)
    assert after.data == {"theme": "dark"}
    assert after.last_active_at >= approx_now(-5)
    assert after.expires_at >= approx_now(timedelta(days=30).total_seconds() - 5)


async def test_touch_after_interval_resends_cookie_and_slides_expiry(
    sqlite_store: Store, app_factory: AppFactory, client_factory: ClientFactory
) -> None:
    token, _ = await plant_session(sqlite_store, "alice", idle_for=301, expires_in=60)
    client = client_factory(app_factory(sqlite_store))

    response = await client.get("/me", headers=cookie_header(token))

    cookie = session_cookie(response)
    assert cookie is not None
    assert cookie.value == token  # same token, re-sent so the browser's expiry follows
    assert cookie.max_age is not None
    assert cookie.max_age >= timedelta(days=30).total_seconds() - 5
    after = await only_session(sqlite_store)
    assert after.last_active_at >= approx_now(-5)
    assert after.expires_at >= approx_now(timedelta(days=30).total_seconds() - 5)


async def test_the_touch_is_due_the_instant_the_interval_has_passed(
    sqlite_store: Store,
    app_factory: AppFactory,
    client_factory: ClientFactory,
    frozen_clock: float,
) -> None:
    """Also what makes a zero interval touch on every request under a coarse clock."""
    token, _ = await plant_session(sqlite_store, "alice", idle_for=300, expires_in=60)
    client = client_factory(app_factory(sqlite_store))  # touch_interval: 5 minutes

    response = await client.get("/me", headers=cookie_header(token))

    assert session_cookie(response) is not None
    assert (await only_session(sqlite_store)).last_active_at.timestamp() == frozen_clock


async def test_zero_touch_interval_touches_on_every_request(
    sqlite_store: Store, app_factory: AppFactory, client_factory: ClientFactory
) -> None:
    config = SessionConfig(touch_interval=timedelta(0))
    client = client_factory(app_factory(sqlite_store, config))
    await client.post("/login", json={"user_id": "alice"})
    first = await only_session(sqlite_store)
    await asyncio.sleep(0.01)

    response = await client.get("/me")

    assert session_cookie(response) is not None
    second = await only_session(sqlite_store)
    assert second.last_active_at > first.last_active_at
    assert second.expires_at > first.expires_at


async def test_sliding_ttl_moves_expiry_to_now_plus_ttl(
    sqlite_store: Store, app_factory: AppFactory, client_factory: ClientFactory
) -> None:
    config = SessionConfig(ttl=timedelta(hours=1))
    token, _ = await plant_session(sqlite_store, "alice", idle_for=3590, expires_in=10)
    client = client_factory(app_factory(sqlite_store, config))

    response = await client.get("/me", headers=cookie_header(token))

    assert response.json()["authenticated"] is True
    after = await only_session(sqlite_store)
    assert approx_now(3595) <= after.expires_at <= approx_now(3601)
    cookie = session_cookie(response)
    assert cookie is not None
    assert cookie.max_age is not None
    assert 3590 <= cookie.max_age <= 3600


async def test_idle_session_ends_after_ttl_in_real_time(
    sqlite_store: Store, app_factory: AppFactory, client_factory: ClientFactory
) -> None:
    config = SessionConfig(ttl=timedelta(seconds=1), touch_interval=timedelta(0))
    client = client_factory(app_factory(sqlite_store, config))
    token = session_cookie(await client.post("/login", json={"user_id": "alice"}))
    assert token is not None
    assert token.max_age is not None
    assert token.max_age <= 1

    await asyncio.sleep(1.1)
    response = await client.get("/me", headers=cookie_header(token.value))

    assert response.json()["authenticated"] is False
    assert_clears_cookie(response)


@pytest.mark.parametrize("created_ago", [3601, 3600], ids=["past-it", "that-very-instant"])
async def test_absolute_ttl_ends_session_however_active(
    sqlite_store: Store,
    app_factory: AppFactory,
    client_factory: ClientFactory,
    frozen_clock: float,
    created_ago: int,
) -> None:
    """A session must end at ``created_at + absolute_ttl`` even if used every minute.

    Otherwise a stolen cookie kept busy by an attacker would live forever.
    """
    config = SessionConfig(absolute_ttl=timedelta(hours=1))
    token, _ = await plant_session(
        sqlite_store, "alice", created_ago=created_ago, idle_for=10, expires_in=86400
    )
    client = client_factory(app_factory(sqlite_store, config))

    response = await client.get("/me", headers=cookie_header(token))

    assert response.json()["authenticated"] is False
    assert_clears_cookie(response)


async def test_activity_never_extends_past_absolute_ttl(
    sqlite_store: Store, app_factory: AppFactory, client_factory: ClientFactory
) -> None:
    config = SessionConfig(ttl=timedelta(days=1), absolute_ttl=timedelta(hours=1))
    token, record = await plant_session(
        sqlite_store, "alice", created_ago=3000, idle_for=600, expires_in=60
    )
    client = client_factory(app_factory(sqlite_store, config))

    response = await client.get("/me", headers=cookie_header(token))

    after = await only_session(sqlite_store)
    assert after.last_active_at >= approx_now(-5)  # it was touched…
    assert after.expires_at.timestamp() == pytest.approx(record.created_at + 3600, abs=1)
    cookie = session_cookie(response)
    assert cookie is not None
    assert cookie.max_age is not None
    assert 590 <= cookie.max_age <= 600  # …but only up to the hard cap


async def test_rotate_never_extends_past_absolute_ttl(
    sqlite_store: Store, app_factory: AppFactory, client_factory: ClientFactory
) -> None:
    config = SessionConfig(ttl=timedelta(days=1), absolute_ttl=timedelta(hours=1))
    token, record = await plant_session(sqlite_store, "alice", created_ago=3000, expires_in=600)
    client = client_factory(app_factory(sqlite_store, config))

    response = await client.post("/rotate", headers=cookie_header(token))

    assert response.status_code == 200
    after = await only_session(sqlite_store)
    assert after.created_at.timestamp() == pytest.approx(record.created_at, abs=1)
    assert after.expires_at.timestamp() == pytest.approx(record.created_at + 3600, abs=1)


async def test_login_expiry_is_capped_by_absolute_ttl(
    sqlite_store: Store, app_factory: AppFactory, client_factory: ClientFactory
) -> None:
    config = SessionConfig(ttl=timedelta(days=30), absolute_ttl=timedelta(hours=1))
    client = client_factory(app_factory(sqlite_store, config))

    response = await client.post("/login", json={"user_id": "alice"})

    cookie = session_cookie(response)
    assert cookie is not None
    assert cookie.max_age is not None
    assert 3590 <= cookie.max_age <= 3600
    assert (await only_session(sqlite_store)).expires_at <= approx_now(3601)


# -- fingerprints ---------------------------------------------------------------------------


async def test_cookie_replayed_from_a_different_browser_ends_the_session(
    sqlite_store: Store, app_factory: AppFactory, client_factory: ClientFactory
) -> None:
    """A cookie stolen from Chrome on macOS and replayed from Firefox on Windows is refused.

    The session is deleted for good, so the thief cannot retry with a better
    User-Agent, and the owner must sign in again.
    """
    app = app_factory(sqlite_store)
    owner = client_factory(app)
    thief = client_factory(app, user_agent=FIREFOX_WINDOWS)
    token = session_cookie(await owner.post("/login", json={"user_id": "alice"}))
    assert token is not None

    stolen = await thief.get("/me", headers=cookie_header(token.value))

    assert stolen.json()["authenticated"] is False
    assert_clears_cookie(stolen)
    assert await SessionManager(sqlite_store).list_for_user("alice") == []
    assert (await owner.get("/me")).json()["authenticated"] is False


async def test_browser_update_keeps_the_session(
    sqlite_store: Store, app_factory: AppFactory, client_factory: ClientFactory
) -> None:
    app = app_factory(sqlite_store)
    before_update = client_factory(app, user_agent=CHROME_MAC_119)
    token = session_cookie(await before_update.post("/login", json={"user_id": "alice"}))
    assert token is not None
    after_update = client_factory(app, user_agent=CHROME_MAC)

    response = await after_update.get("/me", headers=cookie_header(token.value))

    assert response.json()["authenticated"] is True


async def test_different_browser_is_accepted_when_fingerprints_are_not_validated(
    sqlite_store: Store, app_factory: AppFactory, client_factory: ClientFactory
) -> None:
    app = app_factory(sqlite_store, SessionConfig(validate_fingerprint=False))
    token = session_cookie(await client_factory(app).post("/login", json={"user_id": "alice"}))
    assert token is not None
    other = client_factory(app, user_agent=FIREFOX_WINDOWS)

    response = await other.get("/me", headers=cookie_header(token.value))

    assert response.json()["authenticated"] is True
    assert session_cookie(response) is None
    assert len(await SessionManager(sqlite_store).list_for_user("alice")) == 1


class LooselyMatchingStore(MemoryStore):
    """A faulty store that answers any digest with alice's session, as a backend whose
    index or collation matched too loosely would.
    """

    async def get(self, token_digest: str, *, now: float) -> SessionRecord | None:
        sessions = await self.list_for_user("alice", now=now)
        return sessions[0] if sessions else None


async def test_a_record_for_another_digest_is_never_taken_for_the_session(
    app_factory: AppFactory, client_factory: ClientFactory
) -> None:
    store = LooselyMatchingStore()
    await plant_session(store, "alice")
    client = client_factory(app_factory(store))

    response = await client.get("/me", headers=cookie_header(new_token()))

    assert response.json()["authenticated"] is False
    assert_clears_cookie(response)
    assert len(await SessionManager(store).list_for_user("alice")) == 1


# -- client IP behind proxies -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("trusted", "peer", "headers", "expected"),
    [
        ((), "10.0.0.1", {"x-forwarded-for": "203.0.113.9"}, "10.0.0.1"),
        (("10.0.0.0/8",), "192.0.2.1", {"x-forwarded-for": "203.0.113.9"}, "192.0.2.1"),
        (("10.0.0.0/8",), "192.0.2.1", {"x-real-ip": "203.0.113.9"}, "192.0.2.1"),
        (
            ("10.0.0.0/8",),
            "10.0.0.1",
            {"x-forwarded-for": "198.51.100.7, 203.0.113.9, 10.0.0.2"},
            "203.0.113.9",
        ),
        (("10.0.0.0/8",), "10.0.0.1", {"x-real-ip": "203.0.113.9"}, "203.0.113.9"),
        (("10.0.0.0/8",), "10.0.0.1", {}, "10.0.0.1"),
    ],
    ids=[
        "no-trusted-proxies",
        "untrusted-peer-xff",
        "untrusted-peer-x-real-ip",
        "trusted-peer-rightmost-untrusted-hop",
        "trusted-peer-x-real-ip",
        "trusted-peer-no-header",
    ],
)
async def test_spoofed_forwarding_headers_are_believed_only_from_trusted_proxies(
    sqlite_store: Store,
    app_factory: AppFactory,
    client_factory: ClientFactory,
    trusted: tuple[str, ...],
    peer: str,
    headers: dict[str, str],
    expected: str,
) -> None:
    """A client must not be able to choose the IP its session records by sending headers.

    Only a peer inside ``trusted_proxies`` is believed, and then only the
    right-most hop it did not add itself (left-most hops are client-written).
    """
    app = app_factory(sqlite_store, SessionConfig(trusted_proxies=trusted))
    client = client_factory(app, peer=(peer, 4321))

    response = await client.post("/login", json={"user_id": "alice"}, headers=headers)

    assert response.json()["session"]["ip_address"] == expected
    assert (await only_session(sqlite_store)).ip_address == expected


# -- errors -------------------------------------------------------------------------------------


async def test_session_errors_render_as_json_and_keep_cookie_changes_made_before(
    sqlite_store: Store, app_factory: AppFactory, client_factory: ClientFactory
) -> None:
    async def login_then_404(request: Request) -> Response:
        session = Session.from_request(request)
        await session.authenticate("alice")
        await session.revoke("AAAAAAAAAAAAAAAAAAAAAA")
        return JSONResponse({})

    async def logout_then_401(request: Request) -> Response:
        session = Session.from_request(request)
        await session.logout()
        await session.rotate()
        return JSONResponse({})

    app = app_factory(
        sqlite_store,
        extra_routes=[
            Route("/login-then-404", login_then_404, methods=["POST"]),
            Route("/logout-then-401", logout_then_401, methods=["POST"]),
        ],
    )
    client = client_factory(app)

    not_found = await client.post("/login-then-404")

    assert not_found.status_code == 404
    assert not_found.headers["content-type"] == "application/json"
    assert not_found.json() == {"detail": SessionNotFound().message}
    issued = session_cookie(not_found)
    assert issued is not None
    assert len(issued.value) == 43
    assert (await client.get("/me")).json()["authenticated"] is True

    unauthorized = await client.post("/logout-then-401")

    assert unauthorized.status_code == 401
    assert unauthorized.json() == {"detail": "Not authenticated: sign in first."}
    assert_clears_cookie(unauthorized)
    assert await SessionManager(sqlite_store).list_for_user("alice") == []


async def test_session_data_error_renders_as_500_json_and_saves_nothing(
    sqlite_store: Store, app_factory: AppFactory, client_factory: ClientFactory
) -> None:
    async def bad_value(request: Request) -> Response:
        session = Session.from_request(request)
        session.set("fine", 1)
        session.set("bad", {1, 2})
        return JSONResponse({})

    token, _ = await plant_session(sqlite_store, "alice")
    client = client_factory(
        app_factory(sqlite_store, extra_routes=[Route("/bad", bad_value, methods=["POST"])])
    )

    response = await client.post("/bad", headers=cookie_header(token))

    assert response.status_code == 500
    assert response.headers["content-type"] == "application/json"
    assert "not JSON-serialisable" in response.json()["detail"]
    assert set(response.json()) == {"detail"}
    assert session_cookie(response) is None
    assert (await only_session(sqlite_store)).data == {}


class RefusingTheFirstRotation(MemoryStore):
    """Answers the first rotation as if its new token were another session's, after
    another request logged the session out: what a retry then meets."""

    def __init__(self) -> None:
        super().__init__()
        self.refused = False

    async def update(self, session_id: str, changes: SessionUpdate, *, now: float) -> bool:
        if changes.token_digest is not None and not self.refused:
            self.refused = True
            await self.delete(session_id, now=now)  # another request's logout, meanwhile
            raise CreateError(session_id)
        return await super().update(session_id, changes, now=now)


async def test_a_rotate_retried_after_a_logout_elsewhere_answers_401(
    app_factory: AppFactory, client_factory: ClientFactory
) -> None:
    """The retry finds no session to rotate: Unauthorized, as a rotate after a logout."""
    store = RefusingTheFirstRotation()

    async def rotate(request: Request) -> Response:
        await Session.from_request(request).rotate()
        return JSONResponse({})

    token, _ = await plant_session(store, "alice")
    app = app_factory(store, extra_routes=[Route("/race", rotate, methods=["POST"])])

    response = await client_factory(app).post("/race", headers=cookie_header(token))

    assert (response.status_code, response.json()) == (
        401,
        {"detail": "This session has ended; sign in again."},
    )
    assert_clears_cookie(response)
    assert store.refused
    assert await SessionManager(store).list_for_user("alice") == []


class YieldingAroundWrites(MemoryStore):
    """Lets other tasks run before an update is applied, after an update that applied,
    and after a delete, as a networked store's round trips do (a Redis Cluster's pipeline
    after its script, which an update that changed nothing skips)."""

    async def update(self, session_id: str, changes: SessionUpdate, *, now: float) -> bool:
        for _ in range(3):
            await asyncio.sleep(0)
        updated = await super().update(session_id, changes, now=now)
        for _ in range(3 if updated else 0):
            await asyncio.sleep(0)
        return updated

    async def delete(self, session_id: str, **kwargs: Any) -> bool:
        deleted = await super().delete(session_id, **kwargs)
        for _ in range(3):
            await asyncio.sleep(0)
        return deleted


async def test_two_rotations_at_once_in_one_request_both_happen_in_turn(
    app_factory: AppFactory, client_factory: ClientFactory
) -> None:
    """The second used to find the token rotated away by the first, whose store write had
    finished but whose task had not yet taken the new record: it ended the session, and
    with it the values the request had set."""
    store = YieldingAroundWrites()

    async def rotate_twice(request: Request) -> Response:
        session = Session.from_request(request)
        session.set("before", 1)
        results = await asyncio.gather(session.rotate(), session.rotate(), return_exceptions=True)
        return JSONResponse([repr(result) for result in results])

    token, _ = await plant_session(store, "alice", data={"plan": "pro"})
    app = app_factory(store, extra_routes=[Route("/rotate-twice", rotate_twice, methods=["POST"])])
    client = client_factory(app)

    response = await client.post("/rotate-twice", headers=cookie_header(token))

    assert response.json() == ["None", "None"]
    new = session_cookie(response)
    assert new is not None
    assert new.value not in ("", token)
    [stored] = await SessionManager(store).list_for_user("alice")
    assert stored.data == {"plan": "pro", "before": 1}
    me = await client.get("/me", headers=cookie_header(new.value))
    assert me.json()["session"]["data"] == {"plan": "pro", "before": 1}


async def test_a_rotation_beside_a_logout_leaves_nothing_for_the_next_login(
    app_factory: AppFactory, client_factory: ClientFactory
) -> None:
    """The values the rotation took to write were kept as still to write after the logout
    ended the session, and a login later in the request wrote them into the new user's."""
    store = YieldingAroundWrites()

    async def logout_beside_rotate_then_login(request: Request) -> Response:
        session = Session.from_request(request)
        session.set("alice_secret", "s3cr3t")
        await asyncio.gather(session.logout(), session.rotate(), return_exceptions=True)
        await session.authenticate("mallory")
        return JSONResponse({})

    token, _ = await plant_session(store, "alice")
    route = Route("/switch", logout_beside_rotate_then_login, methods=["POST"])
    response = await client_factory(app_factory(store, extra_routes=[route])).post(
        "/switch", headers=cookie_header(token)
    )

    assert response.status_code == 200
    assert await SessionManager(store).list_for_user("alice") == []
    [mallorys] = await SessionManager(store).list_for_user("mallory")
    assert mallorys.data == {}


@pytest.mark.parametrize("beside", ["authenticate", "logout"])
async def test_a_login_or_logout_beside_a_rotation_takes_its_turn(
    app_factory: AppFactory, client_factory: ClientFactory, beside: str
) -> None:
    """Started while the rotation waited for the store, a login was overwritten by the
    rotated session as the rotation ended (its session orphaned, a dead cookie sent),
    and a logout looked up the token being rotated away and ended nothing."""
    store = YieldingAroundWrites()

    async def rotate_beside(request: Request) -> Response:
        session = Session.from_request(request)
        session.set("alice_secret", "s3cr3t")
        other = session.authenticate("mallory") if beside == "authenticate" else session.logout()
        await asyncio.gather(session.rotate(), other)
        return JSONResponse({"user_id": session.user_id})

    token, _ = await plant_session(store, "alice")
    client = client_factory(
        app_factory(store, extra_routes=[Route("/both", rotate_beside, methods=["POST"])])
    )

    response = await client.post("/both", headers=cookie_header(token))

    manager = SessionManager(store)
    assert await manager.list_for_user("alice") == []
    if beside == "logout":
        assert response.json() == {"user_id": None}
        assert_clears_cookie(response)
        return
    assert response.json() == {"user_id": "mallory"}
    [mallorys] = await manager.list_for_user("mallory")
    assert mallorys.data == {}
    new = session_cookie(response)
    assert new is not None
    me = await client.get("/me", headers=cookie_header(new.value))
    assert me.json()["user_id"] == "mallory"


class YieldingAroundEveryCall(YieldingAroundWrites):
    """Lets other tasks run before a read, a login and a listing too, as every call to a
    networked store does."""

    async def get(self, token_digest: str, *, now: float) -> SessionRecord | None:
        for _ in range(3):
            await asyncio.sleep(0)
        return await super().get(token_digest, now=now)

    async def create(
        self,
        record: SessionRecord,
        *,
        max_sessions: int,
        now: float,
        replaced: tuple[str, float] | None = None,
    ) -> None:
        for _ in range(3):
            await asyncio.sleep(0)
        await super().create(record, max_sessions=max_sessions, now=now, replaced=replaced)

    async def list_for_user(self, user_id: str, *, now: float) -> list[SessionRecord]:
        for _ in range(3):
            await asyncio.sleep(0)
        return await super().list_for_user(user_id, now=now)


@pytest.mark.parametrize("change", ["rotate", "authenticate"])
@pytest.mark.parametrize("beside", ["list_my_sessions", "logout_other"])
async def test_listing_or_ending_the_others_beside_a_token_change_takes_its_turn(
    app_factory: AppFactory, client_factory: ClientFactory, change: str, beside: str
) -> None:
    """Started while a rotation or a login of the same request waited for the store, each
    found the session's old token gone and took it for ended: the user was signed out (the
    cookie cleared, the new token never sent) and the session left where no cookie reaches."""
    store = YieldingAroundEveryCall()

    async def change_beside(request: Request) -> Response:
        session = Session.from_request(request)
        changing = session.rotate() if change == "rotate" else session.authenticate("alice")
        await asyncio.gather(changing, getattr(session, beside)())
        return JSONResponse({"user_id": session.user_id})

    token, _ = await plant_session(store, "alice")
    await plant_session(store, "alice")  # another device
    client = client_factory(
        app_factory(store, extra_routes=[Route("/both", change_beside, methods=["POST"])])
    )

    response = await client.post("/both", headers=cookie_header(token))

    assert response.json() == {"user_id": "alice"}
    new = session_cookie(response)
    assert new is not None
    assert new.value not in ("", token)
    me = await client.get("/me", headers=cookie_header(new.value))
    assert me.json()["user_id"] == "alice"
    others = 1 if beside == "list_my_sessions" else 0
    assert len(await SessionManager(store).list_for_user("alice")) == 1 + others


class HoldingTheTouch(MemoryStore):
    """Applies a touch, then answers it only once ``go_on`` is set: a slow network store's
    reply, overtaken by a logout from a task of the same request."""

    def __init__(self) -> None:
        super().__init__()
        self.touching = asyncio.Event()
        self.go_on = asyncio.Event()

    async def update(self, session_id: str, changes: SessionUpdate, *, now: float) -> bool:
        updated = await super().update(session_id, changes, now=now)
        if changes.expires_at is not None:
            self.touching.set()
            await self.go_on.wait()
        return updated


class CommitsThenAnswersLate(MemoryStore):
    """A store whose rotation commits, then whose answer comes late (a server that
    committed; a writer thread whose work goes on)."""

    answers_late = False

    async def update(self, session_id: str, changes: SessionUpdate, *, now: float) -> bool:
        updated = await super().update(session_id, changes, now=now)
        if self.answers_late and changes.token_digest is not None:
            await asyncio.sleep(0.5)
        return updated


async def test_a_rotation_that_timed_out_after_it_took_leaves_the_request_signed_out(
    app_factory: AppFactory, client_factory: ClientFactory
) -> None:
    """The cancelled rotation ends the session holding the new token no response will
    carry: the handler, going on, still saw it signed in."""
    store = CommitsThenAnswersLate()
    token, _ = await plant_session(store, "alice")

    async def rotate_within_a_deadline(request: Request) -> JSONResponse:
        session = Session.from_request(request)
        store.answers_late = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(session.rotate(), 0.1)
        live = await SessionManager(store).list_for_user("alice")
        return JSONResponse({"authenticated": session.is_authenticated, "live": len(live)})

    app = Starlette(
        routes=[Route("/rotate", rotate_within_a_deadline)],
        middleware=[Middleware(SessionMiddleware, store=store)],
    )
    response = await client_factory(app).get("/rotate", headers=cookie_header(token))

    assert response.json() == {"authenticated": False, "live": 0}
    assert_clears_cookie(response)


async def test_a_second_response_start_leaves_the_session_the_first_signed_in() -> None:
    """An app's error handler sending a 500 after its response began: the server refuses
    it, but the new session, whose token the first start carried, had been ended."""
    store = MemoryStore()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await Session.from_scope(scope).authenticate("alice")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        try:
            await send({"type": "http.response.body", "body": b"x", "more_body": True})
            raise ValueError("failed mid-body")
        except ValueError:
            await send({"type": "http.response.start", "status": 500, "headers": []})

    sent: list[Message] = []

    async def server_send(message: Message) -> None:
        if message["type"] == "http.response.start" and sent:
            raise RuntimeError("the response has already started")
        sent.append(message)

    scope = {
        "type": "http",
        "method": "GET",
        "path": "/",
        "headers": [(b"user-agent", CHROME_MAC.encode())],
        "client": ("127.0.0.1", 123),
    }
    with pytest.raises(RuntimeError, match="already started"):
        await SessionMiddleware(app, store=store)(
            scope, receiving({"type": "http.request"}), server_send
        )

    (start,) = (message for message in sent if message["type"] == "http.response.start")
    assert any(name == b"set-cookie" for name, _ in start["headers"])
    assert len(await SessionManager(store).list_for_user("alice")) == 1


async def test_a_logout_while_the_touch_is_written_leaves_the_session_ended(
    app_factory: AppFactory, client_factory: ClientFactory
) -> None:
    """The touch's late reply must not bring back the session the task ended."""
    store = HoldingTheTouch()
    seen_after: list[bool] = []

    async def read_then_log_out_in_a_task(request: Request) -> Response:
        session = Session.from_request(request)

        async def log_out_during_the_touch() -> None:
            await store.touching.wait()
            await session.logout()
            store.go_on.set()

        task = asyncio.create_task(log_out_during_the_touch())
        return JSONResponse({}, background=BackgroundTask(_after, task, session, seen_after))

    token, _ = await plant_session(store, "alice", idle_for=600)
    app = app_factory(store, extra_routes=[Route("/race", read_then_log_out_in_a_task)])

    response = await client_factory(app).get("/race", headers=cookie_header(token))

    assert response.status_code == 200
    cookie = session_cookie(response)
    assert cookie is not None
    assert cookie.is_clearing
    assert seen_after == [False]
    assert await SessionManager(store).list_for_user("alice") == []


async def _after(task: asyncio.Task[None], session: Session, seen: list[bool]) -> None:
    await task
    seen.append(session.is_authenticated)


@pytest.mark.parametrize("session_id", [None, 5, b"AAAAAAAAAAAAAAAAAAAAAA"])
async def test_revoke_refuses_a_session_id_that_is_not_a_string(
    sqlite_store: Store,
    app_factory: AppFactory,
    client_factory: ClientFactory,
    session_id: object,
) -> None:
    """A TypeError, as SessionManager.revoke gives: a caller's bug, not a 404 for the user."""
    refused: list[str] = []

    async def revoke_with(request: Request) -> Response:
        try:
            await Session.from_request(request).revoke(session_id)  # type: ignore[arg-type]
        except TypeError as exc:
            refused.append(str(exc))
        return JSONResponse({})

    token, kept = await plant_session(sqlite_store, "alice")
    app = app_factory(sqlite_store, extra_routes=[Route("/revoke", revoke_with, methods=["POST"])])
    client = client_factory(app)

    assert (await client.post("/revoke", headers=cookie_header(token))).status_code == 200

    assert refused == [f"session_id must be a str, got {type(session_id).__name__}."]
    assert [s.id for s in await SessionManager(sqlite_store).list_for_user("alice")] == [kept.id]


async def test_from_request_without_middleware_names_session_middleware(
    client_factory: ClientFactory,
) -> None:
    async def handler(request: Request) -> Response:
        Session.from_request(request)
        return JSONResponse({})

    client = client_factory(Starlette(routes=[Route("/", handler)]))

    with pytest.raises(RuntimeError, match="SessionMiddleware"):
        await client.get("/")
    with pytest.raises(RuntimeError, match="SessionMiddleware"):
        Session.from_scope({"type": "http", "headers": []})


async def test_middleware_reading_the_session_from_outside_is_told_the_order(
    sqlite_store: Store, client_factory: ClientFactory
) -> None:
    """add_middleware wraps the app in the one added last: the advice to add
    SessionMiddleware, which was there, kept the order wrong."""

    class LoadUser:
        def __init__(self, app: ASGIApp) -> None:
            self.app = app

        async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
            Session.from_scope(scope)
            await self.app(scope, receive, send)

    app = Starlette(routes=[Route("/", lambda _request: JSONResponse({}))])
    app.add_middleware(SessionMiddleware, store=sqlite_store)
    app.add_middleware(LoadUser)

    with pytest.raises(RuntimeError, match=r"must wrap whatever reads the session: first in"):
        await client_factory(app).get("/")


# -- a failing store: fail closed, keep the cookie, recover --------------------------------------


@contextmanager
def table_renamed_away(path: Path) -> Iterator[None]:
    """Break the live database under the app (as a botched migration would), then repair it."""
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute(f"ALTER TABLE {TABLE} RENAME TO {TABLE}_away")
        yield
        db.execute(f"ALTER TABLE {TABLE}_away RENAME TO {TABLE}")
    finally:
        db.close()


@contextmanager
def write_lock_held(path: Path) -> Iterator[None]:
    """Another connection holds the database's write lock (a long transaction elsewhere)."""
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("BEGIN IMMEDIATE")
        yield
        db.execute("ROLLBACK")
    finally:
        db.close()


async def test_store_outage_answers_503_and_keeps_the_cookie_until_recovery(
    tmp_path: Path, app_factory: AppFactory, client_factory: ClientFactory
) -> None:
    """Fail closed: no anonymous or stale answer while the store is broken, and no logout.

    Clearing the cookie during an outage would sign every user out for good.
    """
    path = tmp_path / "sessions.db"
    async with SQLiteStore(path) as store:
        token, _ = await plant_session(store, "alice", data={"theme": "dark"})
        client = client_factory(app_factory(store))
        assert (await client.get("/me", headers=cookie_header(token))).json()["authenticated"]

        with table_renamed_away(path):
            response = await client.get("/me", headers=cookie_header(token))

            assert response.status_code == 503
            assert response.headers["content-type"] == "application/json"
            assert set(response.json()) == {"detail"}
            assert "set-cookie" not in response.headers

        recovered = await client.get("/me", headers=cookie_header(token))
        assert recovered.status_code == 200
        assert recovered.json()["session"]["data"] == {"theme": "dark"}


async def test_corrupt_database_file_at_startup_answers_503_then_recovers(
    tmp_path: Path, client_factory: ClientFactory
) -> None:
    path = tmp_path / "sessions.db"
    async with SQLiteStore(path) as seeding:
        token, _ = await plant_session(seeding, "alice")
    moved = tmp_path / "sessions.db.moved"
    path.rename(moved)
    path.write_bytes(os.urandom(8192))
    app = build_app(f"sqlite:///{path}")
    client = client_factory(app)

    async with LifespanManager(app):  # startup logs the failure instead of crashing the app
        broken = await client.get("/me", headers=cookie_header(token))

        assert broken.status_code == 503
        assert "set-cookie" not in broken.headers
        path.unlink()
        moved.rename(path)

        recovered = await client.get("/me", headers=cookie_header(token))

        assert recovered.status_code == 200
        assert recovered.json()["user_id"] == "alice"


async def test_failed_flush_turns_the_response_into_503(
    tmp_path: Path, app_factory: AppFactory, client_factory: ClientFactory
) -> None:
    """The handler ran, but its changes could not be saved: the client must not see success."""
    path = tmp_path / "sessions.db"
    async with SQLiteStore(path, timeout=0.2) as store:
        token, _ = await plant_session(store, "alice", data={"theme": "light"})
        client = client_factory(app_factory(store))

        with write_lock_held(path):
            response = await client.post(
                "/set", json={"theme": "dark"}, headers=cookie_header(token)
            )

        assert response.status_code == 503
        assert set(response.json()) == {"detail"}
        assert "set-cookie" not in response.headers
        after = await client.get("/me", headers=cookie_header(token))
        assert after.json()["session"]["data"] == {"theme": "light"}


async def test_a_failed_touch_alone_lets_the_apps_answer_through(
    tmp_path: Path,
    app_factory: AppFactory,
    client_factory: ClientFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A store that reads but cannot write (its write lock held, a full disk, a read-only
    file): a read was a 503 once its "last active" touch was due, so within a
    touch_interval every signed-in user was locked out, though nothing of theirs was lost."""
    path = tmp_path / "sessions.db"
    config = SessionConfig(touch_interval=timedelta(0))  # every request touches
    async with SQLiteStore(path, timeout=0.2) as store:
        token, record = await plant_session(store, "alice", data={"theme": "dark"}, idle_for=60)
        client = client_factory(app_factory(store, config))

        with write_lock_held(path):
            response = await client.get("/me", headers=cookie_header(token))

        assert response.status_code == 200
        assert response.json()["session"]["data"] == {"theme": "dark"}
        assert "set-cookie" not in response.headers  # the expiry did not move
        assert f"session {record.id}: the store failed during its last-active touch" in (
            caplog.text
        )
        stored = await store.get(record.token_digest, now=time.time())
        assert stored is not None
        assert stored.last_active_at == record.last_active_at
        touched = await client.get("/me", headers=cookie_header(token))  # the next one does
        assert session_cookie(touched) is not None


class DownAfterAnUpdate(MemoryStore):
    """Applies an update, then fails the next read: a network store whose connection
    drops between a write's round trip and the next."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False

    async def update(self, session_id: str, changes: SessionUpdate, *, now: float) -> bool:
        updated = await super().update(session_id, changes, now=now)
        self.down = True
        return updated

    async def get(self, token_digest: str, *, now: float) -> SessionRecord | None:
        if self.down:
            raise StoreUnavailable()
        return await super().get(token_digest, now=now)


async def test_a_saved_write_stands_when_the_cookies_recheck_fails(
    app_factory: AppFactory, client_factory: ClientFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """With a touch due, a write is followed by a read that decides whether to renew the
    cookie: its failure came after the keys were stored, and was answered as a 503."""
    store = DownAfterAnUpdate()
    token, record = await plant_session(store, "alice", idle_for=600)
    client = client_factory(app_factory(store))

    response = await client.post("/set", json={"cart": [1, 2]}, headers=cookie_header(token))

    assert response.status_code == 200
    assert session_cookie(response) is None  # not renewed: the next touch does
    assert f"session {record.id}: the store failed after its write" in caplog.text
    store.down = False
    stored = await store.get(record.token_digest, now=time.time())
    assert stored is not None
    assert stored.data == {"cart": [1, 2]}
    assert stored.last_active_at > record.last_active_at


async def test_failed_flush_is_503_even_when_the_app_handles_store_unavailable(
    tmp_path: Path, client_factory: ClientFactory
) -> None:
    """Apps (FastAPI ones especially) register handlers to style errors; that must not
    turn a store outage into an opaque 500."""

    async def styled(request: Request, exc: Exception) -> Response:
        return JSONResponse({"error": "try later"}, status_code=503)

    path = tmp_path / "sessions.db"
    async with SQLiteStore(path, timeout=0.2) as store:
        token, _ = await plant_session(store, "alice")
        app = Starlette(
            routes=ROUTES,
            middleware=[Middleware(SessionMiddleware, store=store)],
            exception_handlers={StoreUnavailable: styled},
        )
        client = client_factory(app)

        with write_lock_held(path):
            try:
                response = await client.post("/set", json={"a": 1}, headers=cookie_header(token))
            except RuntimeError as exc:  # what the app re-raised instead of answering
                pytest.fail(f"no response, the app raised {exc!r}")

        assert response.status_code == 503


@pytest.mark.parametrize("placement", ["in the app's middleware", "around the app"])
async def test_an_apps_own_handler_answering_a_session_error_with_a_500_page_stands(
    memory_store: Store, client_factory: ClientFactory, placement: str
) -> None:
    """Only a 500 page whose error is raised on (a mounted app's error middleware's) is
    answered in its place: an app's handler answering one deliberately is the app's call.
    It was replaced by the error's own 404."""

    async def house_page(request: Request, exc: Exception) -> Response:
        return HTMLResponse("<h1>Something went wrong</h1>", status_code=500)

    async def revoke_unknown(request: Request) -> Response:
        await Session.from_request(request).revoke("no-such-session")
        return JSONResponse({})

    token, _ = await plant_session(memory_store, "alice")
    inside = placement == "in the app's middleware"
    app: ASGIApp = Starlette(
        routes=[Route("/revoke-unknown", revoke_unknown)],
        middleware=[Middleware(SessionMiddleware, store=memory_store)] if inside else [],
        exception_handlers={SessionError: house_page},
    )
    if not inside:
        app = SessionMiddleware(app, store=memory_store)

    response = await client_factory(app).get("/revoke-unknown", headers=cookie_header(token))

    assert (response.status_code, response.text) == (500, "<h1>Something went wrong</h1>")
    assert await memory_store.get(token_digest(token), now=time.time()) is not None


async def test_a_session_error_inside_an_app_the_middleware_wraps_from_outside_is_answered(
    memory_store: Store, client_factory: ClientFactory
) -> None:
    """``SessionMiddleware(app)``: the app's own error middleware answers the error with
    its 500 page and raises it on, as a mounted app's does; the error's answer instead."""
    token, _ = await plant_session(memory_store, "alice")
    middleware = SessionMiddleware(Starlette(routes=ROUTES), store=memory_store)

    response = await client_factory(middleware).post(
        "/sessions/no-such-session/revoke", headers=cookie_header(token)
    )

    assert (response.status_code, response.json()) == (404, {"detail": "No such session."})


async def test_a_failed_flush_after_rotate_still_hands_over_the_new_token(
    tmp_path: Path, app_factory: AppFactory, client_factory: ClientFactory
) -> None:
    """The rotation reached the store, so the old token is dead: the error response must
    carry the new one (and say it varies by cookie), or the user is signed out.
    """
    path = tmp_path / "sessions.db"
    lock = contextlib.ExitStack()

    async def rotate_then_set(request: Request) -> Response:
        session = Session.from_request(request)
        await session.rotate()
        session.set("k", 1)
        lock.enter_context(write_lock_held(path))  # the flush as the response starts fails
        return JSONResponse({})

    route = Route("/rotate-then-set", rotate_then_set, methods=["POST"])
    async with SQLiteStore(path, timeout=0.2) as store:
        token, _ = await plant_session(store, "alice")
        client = client_factory(app_factory(store, extra_routes=[route]))

        with lock:
            response = await client.post("/rotate-then-set", headers=cookie_header(token))

        assert response.status_code == 503
        cookie = session_cookie(response)
        assert cookie is not None
        assert cookie.value not in ("", token)
        assert response.headers["vary"] == "Cookie"
        me = await client.get("/me", headers=cookie_header(cookie.value))
        assert me.json()["user_id"] == "alice"


async def test_a_session_error_after_the_response_started_is_raised_not_answered() -> None:
    """A second response start would break the ASGI protocol; the server reports the error."""

    async def starts_then_refuses(scope: Scope, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        raise Unauthorized()

    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    async def receive() -> Message:
        return {"type": "http.request", "body": b""}

    scope: Scope = {"type": "http", "method": "GET", "path": "/", "headers": []}
    with pytest.raises(Unauthorized):
        await SessionMiddleware(starts_then_refuses, store=MemoryStore())(scope, receive, send)

    assert [message["type"] for message in sent] == ["http.response.start"]


# -- after the response started ---------------------------------------------------------------

AFTER_THE_RESPONSE: dict[str, Callable[[Session], Awaitable[None] | None]] = {
    "rotate": lambda session: session.rotate(),
    "authenticate": lambda session: session.authenticate("mallory"),
    "set": lambda session: session.set("late", 1),
    "remove_key": lambda session: session.remove_key("theme"),
}


def late_route(operation: str) -> Route:
    """``/late``: answers at once, then runs ``operation`` in a background task."""

    async def late(request: Request) -> Response:
        session = Session.from_request(request)

        async def act() -> None:
            outcome = AFTER_THE_RESPONSE[operation](session)
            if outcome is not None:
                await outcome

        return PlainTextResponse("ok", background=BackgroundTask(act))

    return Route("/late", late)


@pytest.mark.parametrize("operation", list(AFTER_THE_RESPONSE))
async def test_what_needs_the_response_is_refused_after_it_started_and_changes_nothing(
    sqlite_store: Store, app_factory: AppFactory, client_factory: ClientFactory, operation: str
) -> None:
    """A rotate there ended the browser's session and never sent the new cookie; a key
    set there was dropped without a word."""
    token, _ = await plant_session(sqlite_store, "alice", data={"theme": "dark"})
    client = client_factory(app_factory(sqlite_store, extra_routes=[late_route(operation)]))

    with pytest.raises(RuntimeError, match=rf"{operation}\(\) after the response started"):
        await client.get("/late", headers=cookie_header(token))

    me = await client.get("/me", headers=cookie_header(token))
    assert me.json()["user_id"] == "alice"
    assert me.json()["session"]["data"] == {"theme": "dark"}
    assert [s.user_id for s in await SessionManager(sqlite_store).list_for_user("mallory")] == []


async def test_a_logout_after_the_response_started_still_ends_the_session(
    sqlite_store: Store, app_factory: AppFactory, client_factory: ClientFactory
) -> None:
    async def late(request: Request) -> Response:
        return PlainTextResponse(
            "ok", background=BackgroundTask(Session.from_request(request).logout)
        )

    token, _ = await plant_session(sqlite_store, "alice")
    client = client_factory(app_factory(sqlite_store, extra_routes=[Route("/late", late)]))

    assert (await client.get("/late", headers=cookie_header(token))).status_code == 200

    assert (await client.get("/me", headers=cookie_header(token))).json()["user_id"] is None


async def test_a_login_after_an_anonymous_response_started_is_refused(
    sqlite_store: Store, app_factory: AppFactory, client_factory: ClientFactory
) -> None:
    client = client_factory(app_factory(sqlite_store, extra_routes=[late_route("authenticate")]))

    with pytest.raises(RuntimeError, match=r"authenticate\(\) after the response started"):
        await client.get("/late")

    assert await SessionManager(sqlite_store).list_for_user("mallory") == []


@pytest.mark.parametrize("operation", ["authenticate", "rotate"])
async def test_a_new_token_no_response_will_carry_leaves_no_session_behind(
    sqlite_store: Store, app_factory: AppFactory, client_factory: ClientFactory, operation: str
) -> None:
    """An unhandled error after a login or rotation: Starlette's 500, built outside this
    middleware, carries no cookie. A session kept for that token would push out one of
    the user's devices at each such failure, until it expired."""

    async def fails_after(request: Request) -> Response:
        session = Session.from_request(request)
        await (session.authenticate("alice") if operation == "authenticate" else session.rotate())
        raise RuntimeError("the app failed")

    _, first = await plant_session(sqlite_store, "alice")
    token, second = await plant_session(sqlite_store, "alice")
    client = client_factory(app_factory(sqlite_store, extra_routes=[Route("/fails", fails_after)]))
    headers = cookie_header(token) if operation == "rotate" else {}

    with pytest.raises(RuntimeError, match="the app failed"):
        await client.get("/fails", headers=headers)

    # A login's new session is gone and the devices stay; a rotated one, which no
    # browser can name any more, has ended.
    left = {s.id for s in await SessionManager(sqlite_store).list_for_user("alice")}
    assert left == ({first.id, second.id} if operation == "authenticate" else {first.id})


@pytest.mark.parametrize("operation", ["authenticate", "rotate"])
async def test_an_error_page_answered_inside_the_middleware_carries_no_new_token(
    sqlite_store: Store, app_factory: AppFactory, client_factory: ClientFactory, operation: str
) -> None:
    """A 500 that Starlette's own exception handling builds inside this middleware (as
    Litestar answers every error): it carried the new token, signing in with a page of a
    failure, while the keys set with it were dropped."""

    async def fails_after(request: Request) -> Response:
        session = Session.from_request(request)
        await (session.authenticate("alice") if operation == "authenticate" else session.rotate())
        session.set("half", "done")
        raise HTTPException(500, "the app failed")

    _, first = await plant_session(sqlite_store, "alice")
    token, _ = await plant_session(sqlite_store, "alice")
    client = client_factory(app_factory(sqlite_store, extra_routes=[Route("/fails", fails_after)]))

    response = await client.get("/fails", headers=cookie_header(token))

    assert response.status_code == 500
    # The cookie the request carried named a session this request ended: cleared.
    [set_cookie] = response.headers.get_list("set-cookie")
    assert "Max-Age=0" in set_cookie
    assert response.headers["cache-control"] == "no-store"
    left = {s.id for s in await SessionManager(sqlite_store).list_for_user("alice")}
    assert left == {first.id}  # the login's destroyed second; the rotation ended it


async def test_a_session_errors_own_5xx_answer_after_a_login_carries_the_new_cookie(
    sqlite_store: Store, app_factory: AppFactory, client_factory: ClientFactory
) -> None:
    """Unlike a failure's error page: the store holds the session, and the 503 says only
    that something later in the request could not reach the store."""

    async def signs_in_then_meets_an_outage(request: Request) -> Response:
        await Session.from_request(request).authenticate("alice")
        raise StoreUnavailable()

    route = Route("/outage-after-login", signs_in_then_meets_an_outage)
    client = client_factory(app_factory(sqlite_store, extra_routes=[route]))

    response = await client.get("/outage-after-login")

    assert response.status_code == 503
    cookie = session_cookie(response)
    assert cookie is not None
    [session] = await SessionManager(sqlite_store).list_for_user("alice")
    stored = await sqlite_store.get(token_digest(cookie.value), now=time.time())
    assert stored is not None
    assert stored.id == session.id


@pytest.mark.parametrize("operation", list(AFTER_THE_RESPONSE))
async def test_what_needs_the_response_is_refused_in_a_task_outliving_a_failed_request(
    sqlite_store: Store, app_factory: AppFactory, client_factory: ClientFactory, operation: str
) -> None:
    """No response will carry a cookie or write a change once the app has failed: a login
    there left a session no browser holds, taking one of the user's places."""
    go_on = asyncio.Event()
    outcomes: list[BaseException | None] = []

    async def act(session: Session) -> None:
        await go_on.wait()
        try:
            outcome = AFTER_THE_RESPONSE[operation](session)
            if outcome is not None:
                await outcome
        except RuntimeError as exc:
            outcomes.append(exc)
        else:
            outcomes.append(None)

    async def fails_leaving_a_task(request: Request) -> Response:
        request.app.state.task = asyncio.ensure_future(act(Session.from_request(request)))
        raise RuntimeError("the app failed")

    token, _ = await plant_session(sqlite_store, "alice", data={"theme": "dark"})
    app = app_factory(sqlite_store, extra_routes=[Route("/fails", fails_leaving_a_task)])
    client = client_factory(app)

    with pytest.raises(RuntimeError, match="the app failed"):
        await client.get("/fails", headers=cookie_header(token))
    go_on.set()
    await app.state.task

    [refused] = outcomes
    assert refused is not None
    assert f"{operation}() after the response started" in str(refused)
    me = await client.get("/me", headers=cookie_header(token))
    assert me.json()["session"]["data"] == {"theme": "dark"}
    assert len(await SessionManager(sqlite_store).list_for_user("alice")) == 1
    assert await SessionManager(sqlite_store).list_for_user("mallory") == []


async def test_a_login_of_an_app_that_sends_no_response_leaves_no_session_behind(
    sqlite_store: Store,
) -> None:
    """The server answers 500 itself, without the cookie: the new session would hold one
    of the user's places until it expired, as after an app that fails."""

    async def answers_nothing(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await Session.from_scope(scope).authenticate("alice")

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    sent: list[Message] = []
    scope: Scope = {
        "type": "http", "method": "GET", "scheme": "https", "path": "/", "query_string": b"",
        "headers": [(b"user-agent", CHROME_MAC.encode())], "client": ("127.0.0.1", 123),
    }  # fmt: skip
    _, kept = await plant_session(sqlite_store, "alice")

    await SessionMiddleware(answers_nothing, store=sqlite_store)(scope, receive, collecting(sent))

    assert sent == []
    assert [s.id for s in await SessionManager(sqlite_store).list_for_user("alice")] == [kept.id]


def answering_504_after(app: ASGIApp, *, seconds: float) -> ASGIApp:
    """``app`` behind a timeout that cancels its request and answers 504 instead."""

    async def timed(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        try:
            await asyncio.wait_for(app(scope, receive, send), timeout=seconds)
        except TimeoutError:
            await send({"type": "http.response.start", "status": 504, "headers": []})
            await send({"type": "http.response.body", "body": b""})

    return timed


@pytest.mark.parametrize("operation", ["authenticate", "rotate"])
async def test_a_new_token_of_a_cancelled_request_leaves_no_session_behind(
    sqlite_store: Store, app_factory: AppFactory, client_factory: ClientFactory, operation: str
) -> None:
    """A request cancelled after a login or rotation (a timeout around the app, a server
    that cancels on disconnect) sends no cookie, as an app that failed sends none: its
    session must end as it does then."""

    async def slow_after(request: Request) -> Response:
        session = Session.from_request(request)
        await (session.authenticate("alice") if operation == "authenticate" else session.rotate())
        await asyncio.sleep(30)  # cancelled here
        return Response("never sent")

    app = app_factory(sqlite_store, extra_routes=[Route("/slow-after", slow_after)])

    _, first = await plant_session(sqlite_store, "alice")
    token, second = await plant_session(sqlite_store, "alice")
    client = client_factory(answering_504_after(app, seconds=0.5))
    headers = cookie_header(token) if operation == "rotate" else {}

    response = await client.get("/slow-after", headers=headers)

    assert response.status_code == 504
    assert session_cookie(response) is None
    left = {s.id for s in await SessionManager(sqlite_store).list_for_user("alice")}
    assert left == ({first.id, second.id} if operation == "authenticate" else {first.id})


class LockTakenMidRequest:
    """Another process's connection to the file at ``path``: a handler calls :meth:`take`
    to hold its write lock, so that the store's next write waits; :meth:`get` sends the
    request (to an app answering 504 at 0.3 s) and lets go of the lock at 0.6 s."""

    def __init__(self, path: str) -> None:
        self.db = sqlite3.connect(path, isolation_level=None)

    def take(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    async def get(
        self, client: httpx.AsyncClient, url: str, headers: dict[str, str]
    ) -> httpx.Response:
        async def release_later() -> None:
            await asyncio.sleep(0.6)
            self.db.execute("ROLLBACK")

        release = asyncio.create_task(release_later())
        try:
            return await client.get(url, headers=headers)
        finally:
            await release
            self.db.close()


@pytest.mark.parametrize("operation", ["authenticate", "rotate"])
async def test_a_request_cancelled_while_the_response_start_writes_leaves_no_new_token(
    sqlite_store: SQLiteStore,
    app_factory: AppFactory,
    client_factory: ClientFactory,
    operation: str,
) -> None:
    """Cancelled while the values set after a login or rotation are written, as the
    response starts: nothing reached the server, so the new token was never sent."""
    lock = LockTakenMidRequest(sqlite_store.path)

    async def then_set(request: Request) -> Response:
        session = Session.from_request(request)
        await (session.authenticate("alice") if operation == "authenticate" else session.rotate())
        session.set("theme", "dark")
        lock.take()  # the write below waits
        return Response("never sent")

    app = app_factory(sqlite_store, extra_routes=[Route("/then-set", then_set)])
    _, first = await plant_session(sqlite_store, "alice")
    token, second = await plant_session(sqlite_store, "alice")
    client = client_factory(answering_504_after(app, seconds=0.3))
    headers = cookie_header(token) if operation == "rotate" else {}
    response = await lock.get(client, "/then-set", headers)

    assert response.status_code == 504
    assert session_cookie(response) is None
    left = {s.id for s in await SessionManager(sqlite_store).list_for_user("alice")}
    assert left == ({first.id, second.id} if operation == "authenticate" else {first.id})


@pytest.mark.parametrize("operation", ["authenticate", "rotate"])
async def test_a_request_cancelled_while_the_store_takes_its_new_token_leaves_no_session(
    sqlite_store: SQLiteStore,
    app_factory: AppFactory,
    client_factory: ClientFactory,
    operation: str,
) -> None:
    """Cancelled while the login's create or the rotation's update waits for the write
    lock: the writer thread still makes it once the lock is free, and no response carries
    its token. The session stayed, holding one of the user's places, until it expired."""
    lock = LockTakenMidRequest(sqlite_store.path)

    async def act(request: Request) -> Response:
        session = Session.from_request(request)
        lock.take()  # the store's write waits
        await (session.authenticate("alice") if operation == "authenticate" else session.rotate())
        return Response("never sent")

    config = SessionConfig(max_sessions_per_user=2)
    app = app_factory(sqlite_store, config, extra_routes=[Route("/act", act)])
    _, first = await plant_session(sqlite_store, "alice")
    token, second = await plant_session(sqlite_store, "alice")
    client = client_factory(answering_504_after(app, seconds=0.3))
    headers = cookie_header(token) if operation == "rotate" else {}
    response = await lock.get(client, "/act", headers)

    assert response.status_code == 504
    assert session_cookie(response) is None
    # Queued on the writer thread behind the cancelled request's write, which it awaits.
    await sqlite_store.delete_expired(now=time.time())
    left = {s.id for s in await SessionManager(sqlite_store).list_for_user("alice")}
    # The login took place, its eviction with it (as for a login whose app then fails),
    # and the rotation; neither's session stays, since no one holds its token.
    assert left == ({second.id} if operation == "authenticate" else {first.id})


async def test_a_request_cancelled_while_a_session_errors_answer_writes_leaves_no_session(
    sqlite_store: SQLiteStore, app_factory: AppFactory, client_factory: ClientFactory
) -> None:
    """A SessionError after a login is answered by the middleware, whose response start
    writes the keys set since: cancelled there, the new token was never sent."""
    lock = LockTakenMidRequest(sqlite_store.path)

    async def login_then_not_found(request: Request) -> Response:
        session = Session.from_request(request)
        await session.authenticate("alice")
        session.set("theme", "dark")
        lock.take()  # the response start's write waits
        raise SessionNotFound()

    app = app_factory(sqlite_store, extra_routes=[Route("/act", login_then_not_found)])
    client = client_factory(answering_504_after(app, seconds=0.3))
    response = await lock.get(client, "/act", {})

    assert response.status_code == 504
    assert session_cookie(response) is None
    await sqlite_store.delete_expired(now=time.time())  # behind the request's writes
    assert await SessionManager(sqlite_store).list_for_user("alice") == []


class HoldingNewTokens(MemoryStore):
    """Holds a login's create and a rotation's update until ``go_on`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.go_on = asyncio.Event()

    async def create(
        self,
        record: SessionRecord,
        *,
        max_sessions: int,
        now: float,
        replaced: tuple[str, float] | None = None,
    ) -> None:
        await self.go_on.wait()
        await super().create(record, max_sessions=max_sessions, now=now, replaced=replaced)

    async def update(self, session_id: str, changes: SessionUpdate, *, now: float) -> bool:
        if changes.token_digest is not None:
            await self.go_on.wait()
        return await super().update(session_id, changes, now=now)


@pytest.mark.parametrize("operation", ["authenticate", "rotate"])
async def test_a_new_token_the_response_overtook_ends_its_session(
    client_factory: ClientFactory, operation: str
) -> None:
    """A task of the request signs in or rotates; the response starts while the store
    works, so no cookie will carry the new token, and the session no browser can name
    ends."""
    store = HoldingNewTokens()
    store.go_on.set()
    token, _ = await plant_session(store, "alice")
    store.go_on.clear()
    tasks: list[asyncio.Task[None]] = []

    async def act_in_a_task(request: Request) -> Response:
        session = Session.from_request(request)
        act = session.rotate() if operation == "rotate" else session.authenticate("alice")
        tasks.append(asyncio.create_task(act))
        await asyncio.sleep(0)  # the task is now waiting for the store
        return PlainTextResponse("ok")

    client = client_factory(build_app(store, extra_routes=[Route("/race", act_in_a_task)]))
    headers = cookie_header(token) if operation == "rotate" else {}
    response = await client.get("/race", headers=headers)
    store.go_on.set()

    with pytest.raises(RuntimeError, match=rf"{operation}\(\) after the response started"):
        await tasks[0]
    assert session_cookie(response) is None
    left = await SessionManager(store).list_for_user("alice")
    assert len(left) == (0 if operation == "rotate" else 1)  # the planted one stays


class DownForDeletes(MemoryStore):
    async def delete(self, session_id: str, **_: object) -> bool:
        raise StoreUnavailable()


async def test_the_apps_error_is_raised_when_an_unsent_tokens_session_cannot_be_ended(
    client_factory: ClientFactory, caplog: pytest.LogCaptureFixture
) -> None:
    async def fails_after_login(request: Request) -> Response:
        await Session.from_request(request).authenticate("alice")
        raise RuntimeError("the app failed")

    store = DownForDeletes()
    client = client_factory(build_app(store, extra_routes=[Route("/fails", fails_after_login)]))

    with (
        caplog.at_level("WARNING", logger="authsessions"),
        pytest.raises(RuntimeError, match="the app failed"),
    ):
        await client.get("/fails")

    assert "whose new token was never sent, is left to expire" in caplog.text
    assert len(await SessionManager(store).list_for_user("alice")) == 1


class RotatedDuringTheEnd(MemoryStore):
    """Once armed, another request rotates a session's token just after this request
    looks the session up, or just before it deletes it: between a look and a delete."""

    def __init__(self) -> None:
        super().__init__()
        self.armed = False
        self.rotated_to = token_digest(new_token())

    async def _rotate(self, session_id: str) -> None:
        if self.armed:
            self.armed = False
            now = time.time()
            update = SessionUpdate(
                token_digest=self.rotated_to, last_active_at=now, expires_at=now + 60
            )
            assert await self.update(session_id, update, now=now)

    async def get(self, token_digest: str, *, now: float) -> SessionRecord | None:
        record = await super().get(token_digest, now=now)
        if record is not None:
            await self._rotate(record.id)
        return record

    async def delete(self, session_id: str, **kwargs: Any) -> bool:
        await self._rotate(session_id)
        return await super().delete(session_id, **kwargs)


@pytest.mark.parametrize("ending", ["logout", "authenticate"])
async def test_a_rotation_between_ending_a_session_and_its_delete_keeps_the_session(
    client_factory: ClientFactory, ending: str
) -> None:
    """The rotated token's holder keeps the session: a logout (or a login over it) on a
    request of the old token ends only that request's cookie, however the two interleave.
    """
    store = RotatedDuringTheEnd()

    async def ends_the_session(request: Request) -> Response:
        session = Session.from_request(request)
        store.armed = True
        if ending == "logout":
            await session.logout()
        else:
            await session.authenticate("mallory")
        return JSONResponse({"user_id": session.user_id})

    token, planted = await plant_session(store, "alice")
    client = client_factory(build_app(store, extra_routes=[Route("/end", ends_the_session)]))

    response = await client.get("/end", headers=cookie_header(token))

    assert response.status_code == 200
    assert not store.armed  # the rotation did happen
    holder = await store.get(store.rotated_to, now=time.time())
    assert holder is not None
    assert holder.id == planted.id


# -- WebSocket ----------------------------------------------------------------------------------


def test_websocket_sees_the_session_and_cannot_authenticate() -> None:
    # A MemoryStore: TestClient cancels the app task as soon as the socket closes, which
    # would cut short a store write that has to leave the event loop (SQLite's thread).
    app = build_app(MemoryStore())
    with TestClient(app, base_url="https://testserver") as client:
        login = client.post("/login", json={"user_id": "alice", "data": {"theme": "dark"}})
        token = login.cookies[COOKIE]

        with client.websocket_connect("/ws", headers=cookie_header(token)) as ws:
            hello = ws.receive_json()
            refused = ws.receive_json()
            ws.send_json({"hello": "there"})
            with pytest.raises(WebSocketDisconnect):
                ws.receive_json()

        me = client.get("/me", headers=cookie_header(token))

    assert hello == {"user_id": "alice", "theme": "dark", "authenticated": True}
    assert refused["authenticate"] == "refused"
    assert "WebSocket" in refused["error"]
    assert "RuntimeError" not in refused["error"]
    assert me.json()["user_id"] == "alice"  # the refused authenticate ended nothing
    assert me.json()["session"]["data"] == {"theme": "dark", "from_websocket": {"hello": "there"}}


def test_websocket_without_session_is_anonymous() -> None:
    with (
        TestClient(build_app(MemoryStore()), base_url="https://testserver") as client,
        client.websocket_connect("/ws") as ws,
    ):
        hello = ws.receive_json()
        ws.receive_json()
        ws.send_json(1)

    assert hello == {"user_id": None, "theme": None, "authenticated": False}


def test_websocket_is_refused_with_try_again_later_while_the_store_is_down(
    tmp_path: Path,
) -> None:
    path = tmp_path / "sessions.db"
    store = SQLiteStore(path)
    with TestClient(build_app(store), base_url="https://testserver") as client:
        token = client.post("/login", json={"user_id": "alice"}).cookies[COOKIE]

        with (
            table_renamed_away(path),
            pytest.raises(WebSocketDenialResponse) as refused,
            client.websocket_connect("/ws", headers=cookie_header(token)),
        ):
            pytest.fail("the WebSocket was accepted while the store was down")

        with client.websocket_connect("/ws", headers=cookie_header(token)) as ws:
            hello = ws.receive_json()
            ws.receive_json()
            ws.send_json(1)
        client.portal.call(store.close)  # type: ignore[union-attr]

    assert (refused.value.status_code, refused.value.headers["cache-control"]) == (503, "no-store")
    assert hello["user_id"] == "alice"


def test_a_websocket_with_a_malformed_cookie_never_reaches_the_store(tmp_path: Path) -> None:
    path = tmp_path / "sessions.db"
    store = SQLiteStore(path)
    with TestClient(build_app(store), base_url="https://testserver") as client:
        client.post("/login", json={"user_id": "alice"})

        # Down, the store would refuse the socket (1013): it is never asked.
        with (
            table_renamed_away(path),
            client.websocket_connect("/ws", headers={"cookie": f"{COOKIE}=junk"}) as ws,
        ):
            hello = ws.receive_json()
            ws.receive_json()
            ws.send_json(1)
        client.portal.call(store.close)  # type: ignore[union-attr]

    assert hello == {"user_id": None, "theme": None, "authenticated": False}


# -- lifespan and the default store ----------------------------------------------------------------


def count_rows(path: Path) -> int:
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        (count,) = db.execute("SELECT count(*) FROM authsessions_session").fetchone()
    assert isinstance(count, int)
    return count


async def test_store_built_from_url_opens_at_startup_and_closes_at_shutdown(
    tmp_path: Path, client_factory: ClientFactory
) -> None:
    path = tmp_path / "from-url.db"
    middleware = SessionMiddleware(Starlette(routes=ROUTES), store=f"sqlite:///{path}")
    assert not middleware.store.is_open
    assert not path.exists()

    async with LifespanManager(middleware):
        assert middleware.store.is_open
        assert count_rows(path) == 0  # schema created at startup
        client = client_factory(middleware)
        response = await client.post("/login", json={"user_id": "alice"})
        assert response.status_code == 200

    assert not middleware.store.is_open
    assert count_rows(path) == 1


async def startup_failing_with(middleware: SessionMiddleware, error: str) -> list[Message]:
    """What ``middleware`` sends the server at a lifespan startup that fails with a
    ``ValueError`` matching ``error``."""
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "lifespan.startup"}

    async def send(message: Message) -> None:
        sent.append(message)

    with pytest.raises(ValueError, match=error):
        await middleware({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)
    return sent


async def test_a_store_that_cannot_open_fails_the_startup_once_whatever_the_app_sends() -> None:
    """An app whose lifespan answers any failure with its own ``startup.failed`` must
    not send the server a second one (a state error to the server).
    """
    malformed = "postgresql://app:s3cret/PW@127.0.0.1:5432/test"  # an unescaped "/"
    middleware = SessionMiddleware(Starlette(), store=malformed)

    async def app_failing_in_its_own_words(scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await receive()
        except Exception:
            await send({"type": "lifespan.startup.failed", "message": "the app's own words"})
            raise

    middleware.app = app_failing_in_its_own_words

    sent = await startup_failing_with(middleware, "PostgreSQL URL")

    assert [message["type"] for message in sent] == ["lifespan.startup.failed"]
    assert sent[0]["message"].startswith("the session store could not be opened: ")


async def test_a_store_built_from_url_is_closed_when_the_apps_own_startup_fails(
    tmp_path: Path,
) -> None:
    """No shutdown comes after a failed startup: the store opened for it stayed open."""

    @contextlib.asynccontextmanager
    async def failing_startup(app: Starlette) -> AsyncIterator[None]:
        raise RuntimeError("the app's own startup failed")
        yield

    app = Starlette(routes=ROUTES, lifespan=failing_startup)
    middleware = SessionMiddleware(app, store=f"sqlite:///{tmp_path / 'sessions.db'}")

    with pytest.raises(RuntimeError, match="the app's own startup failed"):
        async with LifespanManager(middleware):
            pass

    assert not middleware.store.is_open


async def http_only(scope: Scope, receive: Receive, send: Send) -> None:
    """An app without lifespan support, refusing it as Django's ASGI handler does."""
    if scope["type"] != "http":
        raise ValueError(f"only HTTP, not {scope['type']}")
    session = Session.from_request(Request(scope))
    await JSONResponse({"signed in": session.is_authenticated})(scope, receive, send)


async def test_a_store_built_from_url_opens_and_closes_around_an_app_without_lifespan(
    tmp_path: Path, client_factory: ClientFactory
) -> None:
    """The middleware runs the lifespan for the store it owns: it was never closed (a
    SQLite store left its write-ahead log behind, unmerged)."""
    path = tmp_path / "sessions.db"
    middleware = SessionMiddleware(http_only, store=f"sqlite:///{path}")

    async with LifespanManager(middleware):
        assert middleware.store.is_open
        response = await client_factory(middleware).get("/")
        assert response.json() == {"signed in": False}

    assert not middleware.store.is_open
    assert not (tmp_path / "sessions.db-wal").exists()


async def test_an_app_failing_before_its_first_lifespan_receive_fails_the_startup(
    tmp_path: Path,
) -> None:
    """Not taken for an app without lifespan support: a Starlette app builds its
    middleware before its first receive, and a middleware refusing its settings there
    must stop the server (under ``--lifespan on``) as it did."""

    class NeedsASecret:
        def __init__(self, app: ASGIApp) -> None:
            raise RuntimeError("SECRET_KEY is not set")

        async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
            raise AssertionError("never built")

    app = Starlette(routes=ROUTES, middleware=[Middleware(NeedsASecret)])
    middleware = SessionMiddleware(app, store=f"sqlite:///{tmp_path / 'sessions.db'}")

    async def receive() -> Message:
        return {"type": "lifespan.startup"}

    with pytest.raises(RuntimeError, match="SECRET_KEY"):
        await middleware({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, receive)  # type: ignore[arg-type]

    assert not middleware.store.is_open


async def test_an_app_without_lifespan_is_left_to_the_server_with_a_store_of_the_apps() -> None:
    """A store the app passed is the app's to open and close: the server learns that the
    app has no lifespan support, as without the middleware."""
    middleware = SessionMiddleware(http_only, store=MemoryStore())

    with pytest.raises(ValueError, match="only HTTP, not lifespan"):
        await middleware({"type": "lifespan", "asgi": {"version": "3.0"}}, None, None)  # type: ignore[arg-type]


async def test_unopened_store_object_is_opened_on_first_request(
    tmp_path: Path, client_factory: ClientFactory
) -> None:
    store = SQLiteStore(tmp_path / "sessions.db")
    client = client_factory(build_app(store))  # no lifespan: ASGITransport sends none

    response = await client.post("/login", json={"user_id": "alice"})

    assert response.status_code == 200
    assert store.is_open
    assert len(await SessionManager(store).list_for_user("alice")) == 1
    await store.close()


async def test_store_passed_as_object_is_left_open_at_shutdown() -> None:
    store = MemoryStore()
    middleware = SessionMiddleware(Starlette(routes=ROUTES), store=store)

    async with LifespanManager(middleware):
        assert store.is_open

    assert store.is_open
    await store.close()


async def test_default_store_is_sessions_db_in_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, client_factory: ClientFactory
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("AUTHSESSIONS_STORE", raising=False)
    middleware = SessionMiddleware(Starlette(routes=ROUTES))
    assert isinstance(middleware.store, SQLiteStore)

    async with LifespanManager(middleware):
        await client_factory(middleware).post("/login", json={"user_id": "alice"})

    assert count_rows(tmp_path / "sessions.db") == 1


async def test_default_store_comes_from_authsessions_store_env_var(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, client_factory: ClientFactory
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AUTHSESSIONS_STORE", "sqlite:///from-env.db")
    middleware = SessionMiddleware(Starlette(routes=ROUTES))

    async with LifespanManager(middleware):
        await client_factory(middleware).post("/login", json={"user_id": "alice"})

    assert count_rows(tmp_path / "from-env.db") == 1
    assert not (tmp_path / "sessions.db").exists()


async def test_other_scope_types_pass_through_untouched() -> None:
    seen: list[str] = []

    async def app(scope: dict[str, object], receive: object, send: object) -> None:
        seen.append(str(scope["type"]))

    middleware = SessionMiddleware(app, store=MemoryStore())  # type: ignore[arg-type]
    await middleware({"type": "custom"}, None, None)  # type: ignore[arg-type]

    assert seen == ["custom"]
    assert not middleware.store.is_open


def test_invalid_arguments_are_rejected_at_construction() -> None:
    with pytest.raises(TypeError, match="SessionConfig"):
        SessionMiddleware(Starlette(), store=MemoryStore(), config={"ttl": 1})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Store"):
        SessionMiddleware(Starlette(), store=42)  # type: ignore[arg-type]


async def test_a_store_url_no_store_takes_is_refused_as_the_store_opens() -> None:
    """Not as the middleware is built: Starlette and FastAPI build it as the lifespan call
    comes, and an error raised there made uvicorn take the app for one without lifespan
    support (see test_uvicorn). At startup the server stops; without a lifespan, each
    request that needs the store fails with the same reason."""
    middleware = SessionMiddleware(Starlette(routes=ROUTES), store="mysql://nope")

    sent = await startup_failing_with(middleware, "scheme")

    assert [message["type"] for message in sent] == ["lifespan.startup.failed"]
    assert "scheme" in sent[0]["message"]
    client = TestClient(middleware, base_url="https://testserver", raise_server_exceptions=True)
    with pytest.raises(ValueError, match="scheme"):
        client.post("/login", json={"user_id": "alice"})


async def test_a_request_leaves_no_reference_cycle_behind(
    sqlite_store: SQLiteStore, app_factory: AppFactory
) -> None:
    """Every request's scope and session are freed when it ends, not by the garbage
    collector later (a cycle per request made Python collect every few hundred).
    """
    token, _ = await plant_session(sqlite_store, "alice")
    app = app_factory(sqlite_store, None)

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    def scope(cookie: bytes | None) -> Scope:
        headers = [(b"host", b"testserver"), (b"user-agent", CHROME_MAC.encode())]
        if cookie is not None:
            headers.append((b"cookie", cookie))
        return {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
            "method": "GET", "scheme": "https", "path": "/me", "raw_path": b"/me",
            "query_string": b"", "root_path": "", "headers": headers,
            "client": ("127.0.0.1", 123), "server": ("testserver", 443), "state": {},
        }  # fmt: skip

    cookies = [f"{COOKIE}={token}".encode(), None, f"{COOKIE}=malformed".encode()]
    sent: list[Message] = []
    for cookie in cookies:  # warm up: first requests fill caches
        await app(scope(cookie), receive, send)
    gc.collect()
    gc.disable()
    try:
        sent.clear()
        for cookie in cookies * 10:
            await app(scope(cookie), receive, send)
        assert [m["status"] for m in sent if m["type"] == "http.response.start"] == [200] * 30
        sent.clear()
        gc.set_debug(gc.DEBUG_SAVEALL)
        unreachable = gc.collect()
        garbage = [type(obj).__name__ for obj in gc.garbage]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()

    assert unreachable == 0, garbage


class ClientLeft(Exception):
    """How some framework might tell its handler that the client went away."""


def behind_the_middleware(app: Any, store: MemoryStore) -> tuple[TestClient, dict[str, str], str]:
    """A test client of the bare socket ``app`` behind the middleware (no lifespan: the app
    serves sockets alone), and the headers and token of a signed-in browser (a session
    planted in ``store``, holding ``{"theme": "dark"}``).
    """

    async def plant() -> str:
        token, _ = await plant_session(store, "alice", data={"theme": "dark"})
        return token

    token = asyncio.run(plant())
    headers = {**cookie_header(token), "user-agent": CHROME_MAC}
    client = TestClient(SessionMiddleware(app, store=store), base_url="https://testserver")
    return client, headers, token


def socket_scope(token: str) -> Scope:
    """A WebSocket's scope carrying ``token``, from a server that offers no extensions."""
    return {
        "type": "websocket",
        "path": "/",
        "headers": [
            (b"cookie", f"{COOKIE}={token}".encode()),
            (b"user-agent", CHROME_MAC.encode()),
        ],
        "client": ("127.0.0.1", 123),
    }


def collecting(sent: list[Message]) -> Send:
    """A server's ``send`` keeping what the app sends in ``sent``."""

    async def send(message: Message) -> None:
        sent.append(message)

    return send


def receiving(*messages: Message) -> Receive:
    """A server's ``receive`` handing the app ``messages``, then waiting for ever."""
    pending = list(messages)

    async def receive() -> Message:
        if not pending:
            await asyncio.Event().wait()
        return pending.pop(0)

    return receive


@pytest.mark.parametrize(
    "ends_it", [ClientLeft(), SessionDataError("a later value could not be stored")]
)
async def test_a_websocket_keeps_what_it_set_whatever_exception_ends_it_once_the_client_left(
    ends_it: Exception,
) -> None:
    """Starlette raises its WebSocketDisconnect, Litestar its own, others theirs: what
    tells the client left is the ASGI disconnect message the app received. Whatever
    ends the handler then, a session error's 5xx too, nobody is left to answer."""
    store = MemoryStore()
    token, _ = await plant_session(store, "alice", data={"theme": "dark"})
    sent: list[Message] = []

    async def bare_socket_app(scope: Scope, receive: Receive, send: Send) -> None:
        session = Session.from_scope(scope)
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        session.set("theme", (await receive())["text"])
        assert (await receive())["type"] == "websocket.disconnect"
        raise ends_it

    receive = receiving(
        {"type": "websocket.connect"},
        {"type": "websocket.receive", "text": "solarized"},
        {"type": "websocket.disconnect", "code": 1001},
    )
    middleware = SessionMiddleware(bare_socket_app, store=store)
    if isinstance(ends_it, ClientLeft):  # not swallowed: only its changes were written first
        with pytest.raises(ClientLeft):
            await middleware(socket_scope(token), receive, collecting(sent))
    else:
        await middleware(socket_scope(token), receive, collecting(sent))

    assert (await only_session(store)).data == {"theme": "solarized"}


@pytest.mark.parametrize("accepted", [False, True], ids=["before-accept", "after-accept"])
async def test_a_session_error_in_a_task_group_closes_the_websocket_as_one_alone(
    accepted: bool,
) -> None:
    """A task group raises its tasks' errors as an ExceptionGroup (Litestar's streaming
    handlers run in one): it was taken for another failure, and the server dropped the
    socket with no close frame."""
    store = MemoryStore()
    token, _ = await plant_session(store, "alice")
    sent: list[Message] = []

    async def grouped_app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()  # websocket.connect
        if accepted:
            await send({"type": "websocket.accept"})
        raise ExceptionGroup("a task group", [Unauthorized("sign in again")])

    middleware = SessionMiddleware(grouped_app, store=store)
    await middleware(
        socket_scope(token), receiving({"type": "websocket.connect"}), collecting(sent)
    )

    assert sent[-1] == {"type": "websocket.close", "code": 1008, "reason": "sign in again"}


async def test_a_websocket_whose_task_group_the_server_cancelled_keeps_what_it_set() -> None:
    """A cancellation that reaches the handler inside a task group comes out of it in a
    group: it was taken for the handler's failure, and what the socket set was dropped."""
    store = MemoryStore()
    token, _ = await plant_session(store, "alice", data={"theme": "dark"})

    async def grouped_app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        Session.from_scope(scope).set("theme", "solarized")
        raise BaseExceptionGroup("a task group", [asyncio.CancelledError()])

    middleware = SessionMiddleware(grouped_app, store=store)
    with pytest.raises(BaseExceptionGroup):
        await middleware(socket_scope(token), receiving({"type": "websocket.connect"}), _ignore)

    assert (await only_session(store)).data == {"theme": "solarized"}


async def test_a_websocket_refused_before_accept_is_denied_with_the_errors_response() -> None:
    """Where the server offers the denial extension: a signed-out client and a store
    outage got the same bare 403 from the server, which a client cannot tell apart."""
    store = MemoryStore()
    token, _ = await plant_session(store, "alice")
    sent: list[Message] = []

    async def refusing_app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()  # websocket.connect
        raise Unauthorized()

    scope = {**socket_scope(token), "extensions": {"websocket.http.response": {}}}
    middleware = SessionMiddleware(refusing_app, store=store)
    await middleware(scope, receiving({"type": "websocket.connect"}), collecting(sent))

    start, body = sent
    assert (start["type"], start["status"]) == ("websocket.http.response.start", 401)
    assert (body["type"], json.loads(body["body"])) == (
        "websocket.http.response.body",
        {"detail": Unauthorized().message},
    )


async def test_shutdown_waits_for_the_save_of_a_websocket_the_server_cancelled(
    postgres_url: str, postgres_schema: str
) -> None:
    """The client left, and the socket's save waits for a row another transaction holds,
    when the server's shutdown cancels the task: the save was cut short, and what the
    socket set was lost."""

    async def socket_app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await Starlette()(scope, receive, send)
            return
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        Session.from_scope(scope).set("theme", "solarized")
        await receive()  # websocket.disconnect: the client left

    url = f"{postgres_url}?schema={postgres_schema}"
    middleware = SessionMiddleware(socket_app, store=url)
    admin = await asyncpg.connect(postgres_url)
    try:
        async with LifespanManager(middleware):
            token, record = await plant_session(middleware.store, "alice", data={"theme": "dark"})
            holding = admin.transaction()
            await holding.start()
            await admin.execute(
                f'SELECT 1 FROM "{postgres_schema}".authsessions_session WHERE id = $1'  # noqa: S608
                " FOR UPDATE",
                record.id,
            )
            receive = receiving({"type": "websocket.connect"}, {"type": "websocket.disconnect"})
            serving = asyncio.create_task(middleware(socket_scope(token), receive, _ignore))
            await asyncio.sleep(0.2)  # the save waits for the row
            serving.cancel()
            with pytest.raises(asyncio.CancelledError):
                await serving
            # The shutdown waits for the save, which waits for the row.
            asyncio.get_running_loop().call_later(0.3, asyncio.ensure_future, holding.commit())
    finally:
        await admin.close()

    async with PostgresStore(postgres_url, schema=postgres_schema) as store:
        assert (await only_session(store)).data == {"theme": "solarized"}


async def _ignore(message: Message) -> None:
    pass


async def test_a_websocket_the_server_cancels_keeps_what_it_set() -> None:
    """A server whose shutdown grace period runs out cancels the socket's task: that is
    not the handler's failure, and the client may have been told of the change already.
    """
    store = MemoryStore()
    token, _ = await plant_session(store, "alice", data={"theme": "dark"})
    changed = asyncio.Event()

    async def long_lived_socket_app(scope: Scope, receive: Any, send: Any) -> None:
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        Session.from_scope(scope).set("theme", "solarized")
        await send({"type": "websocket.send", "text": "saved"})
        changed.set()
        await asyncio.Event().wait()  # serving the client until the server gives up

    receive = receiving({"type": "websocket.connect"})
    serving = asyncio.create_task(
        SessionMiddleware(long_lived_socket_app, store=store)(socket_scope(token), receive, _ignore)
    )
    await changed.wait()
    serving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await serving

    assert (await only_session(store)).data == {"theme": "solarized"}


async def test_a_websocket_removes_a_key_another_request_set_after_it_opened() -> None:
    """Its data is what the session held as it opened, which may be hours old: a removal
    of a key it lacks was dropped, and the key set over HTTP meanwhile stayed."""
    store = MemoryStore()
    token, _ = await plant_session(store, "alice", data={"theme": "dark"})
    opened, set_meanwhile = asyncio.Event(), asyncio.Event()

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        session = Session.from_scope(scope)
        if scope["type"] == "http":
            session.set("draft", "unsent")
            await send({"type": "http.response.start", "status": 204, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        opened.set()
        await set_meanwhile.wait()
        session.remove_key("draft")  # the client sent it
        session.remove_key("never-set")
        await send({"type": "websocket.close", "code": 1000})

    middleware = SessionMiddleware(app, store=store)
    socket = asyncio.create_task(
        middleware(socket_scope(token), receiving({"type": "websocket.connect"}), _ignore)
    )
    await opened.wait()
    http_scope = {**socket_scope(token), "type": "http", "method": "POST", "path": "/draft"}
    await middleware(http_scope, receiving({"type": "http.request"}), _ignore)
    assert (await only_session(store)).data == {"theme": "dark", "draft": "unsent"}
    set_meanwhile.set()
    await socket

    assert (await only_session(store)).data == {"theme": "dark"}


def test_a_websocket_cannot_rotate_the_token_it_cannot_hand_over() -> None:
    """A new token would reach the store but never the browser: it would be signed out."""
    store = MemoryStore()
    refusals: list[str] = []

    async def rotating_socket_app(scope: Scope, receive: Any, send: Any) -> None:
        session = Session.from_scope(scope)
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        try:
            await session.rotate()
        except RuntimeError as exc:
            refusals.append(str(exc))
        await send({"type": "websocket.close", "code": 1000})

    client, headers, token = behind_the_middleware(rotating_socket_app, store)
    with client.websocket_connect("/", headers=headers):
        pass
    [session] = asyncio.run(SessionManager(store).list_for_user("alice"))

    assert len(refusals) == 1
    assert "WebSocket" in refusals[0]
    assert asyncio.run(store.get(token_digest(token), now=time.time())) is not None  # unrotated
    assert session.data == {"theme": "dark"}


def test_a_websocket_handler_that_fails_with_the_client_there_saves_nothing() -> None:
    """A server error is not the socket's usual end: what the handler set is dropped,
    as an HTTP request's 500 drops it, and a task it left running may set nothing more
    (accepted, the key was dropped without a word).
    """
    store = MemoryStore()
    sessions: list[Session] = []

    async def failing_socket_app(scope: Scope, receive: Any, send: Any) -> None:
        session = Session.from_scope(scope)
        sessions.append(session)
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        session.set("theme", "half-done")
        raise ValueError("a bug in the handler")

    client, headers, _ = behind_the_middleware(failing_socket_app, store)
    with (
        pytest.raises(ValueError, match="a bug in the handler"),
        client.websocket_connect("/", headers=headers),
    ):
        pass

    [session] = asyncio.run(SessionManager(store).list_for_user("alice"))
    assert session.data == {"theme": "dark"}
    with pytest.raises(RuntimeError, match=r"set\(\) after the response started"):
        sessions[0].set("late", 1)


def test_a_websocket_closed_for_a_session_error_gets_a_reason_a_close_frame_can_hold() -> None:
    """A close frame's reason holds at most 123 bytes of UTF-8: a longer one (here cut
    inside a three-byte character) must be shortened to whole characters.
    """
    store = MemoryStore()
    message = "Sign in again — " * 20

    async def refusing_socket_app(scope: Scope, receive: Any, send: Any) -> None:
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        raise Unauthorized(message)

    client, headers, _ = behind_the_middleware(refusing_socket_app, store)
    with (
        pytest.raises(WebSocketDisconnect) as closed,
        client.websocket_connect("/", headers=headers) as socket,
    ):
        socket.receive_text()

    reason = closed.value.reason
    assert closed.value.code == 1008
    assert 0 < len(reason.encode()) <= 123
    assert message.startswith(reason)
