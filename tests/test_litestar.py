"""Litestar: SessionPlugin wires the middleware, a ``session`` dependency and JSON error pages."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
from asgi_lifespan import LifespanManager
from litestar import Litestar, Request, Response, WebSocket, asgi, get, post, websocket
from litestar.connection import ASGIConnection
from litestar.exceptions import WebSocketDisconnect, WebSocketException
from litestar.handlers import websocket_stream
from litestar.middleware import (
    AbstractAuthenticationMiddleware,
    AuthenticationResult,
    DefineMiddleware,
)
from litestar.params import FromPath, JSONBody
from litestar.testing import TestClient as LitestarTestClient
from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.requests import Request as StarletteRequest
from starlette.responses import JSONResponse as StarletteJSON
from starlette.routing import Route
from starlette.types import ASGIApp

from authsessions import (
    Session,
    SessionConfig,
    SessionData,
    SessionManager,
    SessionMiddleware,
    StoreUnavailable,
    Unauthorized,
)
from authsessions.litestar import CurrentSession, SessionPlugin, provide_session, require_session
from authsessions.stores import RedisStore, SQLiteStore, Store
from authsessions.stores._sqlite_schema import TABLE
from tests.apps.session_app import CHROME_MAC, cookie_header, plant_session, session_cookie


@post("/login", status_code=200)
async def login(session: CurrentSession, data: JSONBody[dict[str, str]]) -> dict[str, str | None]:
    await session.authenticate(data["user_id"])
    session.set("theme", "dark")
    return {"user": session.user_id}


@get("/me")
async def me(session: CurrentSession) -> dict[str, Any]:
    return {"user": session.user_id, "theme": session.get("theme")}


@post("/rotate", status_code=200)
async def rotate(session: CurrentSession) -> None:
    await session.rotate()


@post("/revoke/{session_id:str}", status_code=200)
async def revoke(session: CurrentSession, session_id: FromPath[str]) -> None:
    await session.revoke(session_id)


def build(store: Store | str | None) -> tuple[ASGIApp, SessionPlugin]:
    """The test app, typed as the plain ASGI app httpx and asgi-lifespan expect."""
    plugin = SessionPlugin(store=store)
    app: Any = Litestar([login, me, rotate, revoke], plugins=[plugin])
    return app, plugin


ClientFor = Callable[[ASGIApp], httpx.AsyncClient]


@pytest.fixture
async def client_for() -> AsyncIterator[ClientFor]:
    clients: list[httpx.AsyncClient] = []

    def make(app: ASGIApp) -> httpx.AsyncClient:
        transport = httpx.ASGITransport(app=app)
        client = httpx.AsyncClient(
            transport=transport, base_url="https://testserver", headers={"user-agent": CHROME_MAC}
        )
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.aclose()


async def test_login_sets_the_secure_cookie_and_the_next_request_is_signed_in(
    sqlite_store: Store, client_for: ClientFor
) -> None:
    app, _ = build(sqlite_store)
    client = client_for(app)

    response = await client.post("/login", json={"user_id": "alice"})
    me_response = await client.get("/me")

    cookie = session_cookie(response)
    assert cookie is not None
    assert {"secure", "httponly"} <= set(cookie.attributes)
    assert me_response.json() == {"user": "alice", "theme": "dark"}
    assert me_response.headers["cache-control"] == "no-store"
    assert "Cookie" in me_response.headers["vary"]


@post("/login-then-fail", status_code=200)
async def login_then_fail(session: CurrentSession) -> None:
    await session.authenticate("alice")
    raise ValueError("the rest of the login failed")


async def test_a_login_whose_handler_fails_signs_nobody_in(
    sqlite_store: Store, client_for: ClientFor
) -> None:
    """Litestar answers every error itself, inside the plugin's middleware: its 500 page
    carried the new token, and the session stayed."""
    app: Any = Litestar([login_then_fail], plugins=[SessionPlugin(store=sqlite_store)])

    response = await client_for(app).post("/login-then-fail")

    assert response.status_code == 500
    cookie = session_cookie(response)
    assert cookie is not None
    assert (cookie.value, cookie.attributes["max-age"]) == ("", "0")  # cleared, never a token
    assert await SessionManager(sqlite_store).list_for_user("alice") == []


@get("/devices")
async def devices(session: CurrentSession) -> list[SessionData]:
    return await session.list_my_sessions()


async def test_a_route_answering_with_the_sessions_it_lists_has_an_openapi_schema(
    sqlite_store: Store, client_for: ClientFor
) -> None:
    """Litestar's schema of SessionData failed on its fields' string annotations."""
    app: Any = Litestar([login, devices], plugins=[SessionPlugin(store=sqlite_store)])
    client = client_for(app)
    await client.post("/login", json={"user_id": "alice"})

    listed = await client.get("/devices")
    schema = await client.get("/schema/openapi.json")

    assert [device["user_id"] for device in listed.json()] == ["alice"]
    assert schema.status_code == 200
    assert "SessionData" in schema.json()["components"]["schemas"]


@post("/login-then-outage", status_code=200)
async def login_then_outage(session: CurrentSession) -> None:
    await session.authenticate("alice")
    raise StoreUnavailable()


async def test_a_session_errors_own_5xx_after_a_login_carries_the_new_cookie(
    sqlite_store: Store, client_for: ClientFor
) -> None:
    """As under Starlette: the plugin's handler of a SessionError answers inside the
    middleware, and was taken for a failure's error page (the new session ended)."""
    app: Any = Litestar([login_then_outage], plugins=[SessionPlugin(store=sqlite_store)])

    response = await client_for(app).post("/login-then-outage")

    assert response.status_code == 503
    cookie = session_cookie(response)
    assert cookie is not None
    assert cookie.value != ""
    assert len(await SessionManager(sqlite_store).list_for_user("alice")) == 1


class SessionAuthentication(AbstractAuthenticationMiddleware):
    """The app's own middleware, building ``request.user`` from the session."""

    async def authenticate_request(
        self, connection: ASGIConnection[Any, Any, Any, Any]
    ) -> AuthenticationResult:
        return AuthenticationResult(user=provide_session(connection.scope).user_id, auth=None)


async def test_the_apps_own_middleware_sees_the_session(
    sqlite_store: Store, client_for: ClientFor
) -> None:
    """The plugin's middleware ran inside the app's, which found no session on any
    request, where adding SessionMiddleware by hand is refused."""

    @post("/login", status_code=200, exclude_from_auth=True)
    async def login(session: CurrentSession) -> None:
        await session.authenticate("alice")

    @get("/whoami")
    async def whoami(request: Request[Any, Any, Any]) -> dict[str, Any]:
        return {"user": request.user}

    app: Any = Litestar(
        [login, whoami],
        middleware=[DefineMiddleware(SessionAuthentication)],
        plugins=[SessionPlugin(store=sqlite_store)],
    )
    client = client_for(app)

    assert (await client.post("/login")).status_code == 200
    response = await client.get("/whoami")

    assert response.status_code == 200, response.text
    assert response.json() == {"user": "alice"}


async def test_session_errors_render_as_json_with_their_status(
    sqlite_store: Store, client_for: ClientFor
) -> None:
    """Litestar turns unknown exceptions into 500; the plugin keeps 401 and 404 meaningful."""
    app, _ = build(sqlite_store)
    client = client_for(app)

    anonymous = await client.post("/rotate")
    await client.post("/login", json={"user_id": "alice"})
    unknown = await client.post("/revoke/AAAAAAAAAAAAAAAAAAAAAA")

    assert (anonymous.status_code, anonymous.json()) == (
        401,
        {"detail": "Not authenticated: sign in first."},
    )
    assert (unknown.status_code, unknown.json()) == (404, {"detail": "No such session."})


async def test_the_require_session_guard_answers_401_until_the_user_signs_in(
    sqlite_store: Store, client_for: ClientFor
) -> None:
    """The handler never runs for a signed-out request, nor for a cookie whose session
    ended: that one's cookie is cleared as well.
    """
    ran: list[str | None] = []

    @get("/devices", guards=[require_session])
    async def devices(session: CurrentSession) -> list[str]:
        ran.append(session.user_id)
        return [s.device_name for s in await session.list_my_sessions()]

    app: Any = Litestar([login, devices], plugins=[SessionPlugin(store=sqlite_store)])
    client = client_for(app)

    signed_out = await client.get("/devices")
    await client.post("/login", json={"user_id": "alice"})
    signed_in = await client.get("/devices")
    await SessionManager(sqlite_store).revoke_all("alice")
    revoked = await client.get("/devices")

    assert (signed_out.status_code, signed_out.json()) == (
        401,
        {"detail": "Not authenticated: sign in first."},
    )
    assert (signed_in.status_code, signed_in.json()) == (200, ["Chrome on macOS"])
    assert revoked.status_code == 401
    cleared = session_cookie(revoked)
    assert cleared is not None
    assert cleared.is_clearing
    assert ran == ["alice"]


def test_the_require_session_guard_refuses_a_websocket_with_policy_violation(
    sqlite_store: Store,
) -> None:
    accepted: list[bool] = []

    @websocket("/ws/guarded", guards=[require_session])
    async def ws_guarded(socket: WebSocket[Any, Any, Any]) -> None:
        accepted.append(True)
        await socket.accept()
        await socket.send_text("signed in")
        await socket.close()

    app = Litestar([login, ws_guarded], plugins=[SessionPlugin(store=sqlite_store)])
    with LitestarTestClient(app, base_url="https://testserver.local") as client:
        with (
            pytest.raises(WebSocketDisconnect) as closed,
            client.websocket_connect("/ws/guarded"),
        ):
            pytest.fail("the WebSocket was accepted")
        token = session_cookie(client.post("/login", json={"user_id": "alice"}))
        assert token is not None
        # The cookie by hand: the client sends its Secure cookies over https only.
        with client.websocket_connect("/ws/guarded", headers=cookie_header(token.value)) as ws:
            greeting = ws.receive_text()

    assert (closed.value.code, closed.value.detail) == (1008, "Not authenticated: sign in first.")
    assert greeting == "signed in"
    assert accepted == [True]


async def test_the_apps_own_handler_of_a_session_error_answers_http_requests(
    sqlite_store: Store, client_for: ClientFor
) -> None:
    """The plugin only fills in where the app has no handler of its own, and passes
    session errors on to the middleware on WebSockets alone.
    """

    def styled(request: Request[Any, Any, Any], exc: Unauthorized) -> Response[dict[str, str]]:
        return Response({"error": "please sign in"}, status_code=401)

    app: Any = Litestar(
        [rotate],
        plugins=[SessionPlugin(store=sqlite_store)],
        exception_handlers={Unauthorized: styled},
    )

    response = await client_for(app).post("/rotate")

    assert (response.status_code, response.json()) == (401, {"error": "please sign in"})


async def test_an_unreadable_store_gives_503_and_keeps_the_cookie(
    tmp_path: Path, client_for: ClientFor
) -> None:
    path = tmp_path / "sessions.db"
    async with SQLiteStore(path) as store:
        app, _ = build(store)
        client = client_for(app)
        token = session_cookie(await client.post("/login", json={"user_id": "alice"}))
        assert token is not None
        with contextlib.closing(sqlite3.connect(path)) as db, db:
            db.execute(f"ALTER TABLE {TABLE} RENAME TO moved_away")

        down = await client.get("/me", headers=cookie_header(token.value))
        with contextlib.closing(sqlite3.connect(path)) as db, db:
            db.execute(f"ALTER TABLE moved_away RENAME TO {TABLE}")
        back = await client.get("/me", headers=cookie_header(token.value))

    assert down.status_code == 503
    assert session_cookie(down) is None
    assert back.json()["user"] == "alice"


async def test_a_store_built_from_a_url_opens_at_startup_and_closes_at_shutdown(
    tmp_path: Path,
) -> None:
    app, plugin = build(f"sqlite:///{tmp_path / 'sessions.db'}")

    async with LifespanManager(app):
        opened = plugin.store.is_open
    assert opened
    assert not plugin.store.is_open


async def test_a_store_object_is_left_open_for_its_owner(sqlite_store: Store) -> None:
    app, _ = build(sqlite_store)

    async with LifespanManager(app):
        pass

    assert sqlite_store.is_open
    assert await SessionManager(sqlite_store).list_for_user("nobody") == []


class RecordingHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


async def test_a_store_down_at_startup_is_logged_and_retried_by_requests(
    tmp_path: Path, client_for: ClientFor
) -> None:
    """As in Starlette: the app starts, answers 503 where it needs the store, and recovers
    once the store can open; refusing to start would turn a store's blip into a crash loop.
    """
    folder = tmp_path / "not-yet"
    app, plugin = build(f"sqlite:///{folder / 'sessions.db'}")

    handler = RecordingHandler()
    logger = logging.getLogger("authsessions")  # Litestar's logging config stops propagation
    logger.addHandler(handler)
    try:
        async with LifespanManager(app):
            client = client_for(app)
            anonymous = await client.get("/me")
            login_down = await client.post("/login", json={"user_id": "alice"})
            folder.mkdir()
            login_back = await client.post("/login", json={"user_id": "alice"})
    finally:
        logger.removeHandler(handler)

    assert any(
        "could not open the session store at startup" in r.getMessage() for r in handler.records
    )
    assert anonymous.status_code == 200
    assert anonymous.json()["user"] is None
    assert login_down.status_code == 503
    assert login_down.headers["cache-control"] == "no-store"  # as Starlette's error responses
    assert login_back.status_code == 200
    assert session_cookie(login_back) is not None
    assert not plugin.store.is_open  # closed at shutdown


class PassThrough:
    """A middleware of the app's own, after ours in the list."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)


@pytest.mark.parametrize("store", ["memory://", None])
@pytest.mark.parametrize("after_ours", [[], [PassThrough]])
async def test_the_middleware_in_a_litestar_apps_list_points_to_the_plugin(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    client_for: ClientFor,
    store: str | None,
    after_ours: list[Any],
) -> None:
    """Litestar builds it per route: each would keep sessions of its own (with
    ``memory://``, a login on one route is unknown on the next).
    """
    monkeypatch.chdir(tmp_path)
    middleware: Any = SessionMiddleware  # Starlette's ASGI types, structurally Litestar's

    @get("/plain")
    async def plain() -> str:
        return "no session asked for"

    app: Any = Litestar(
        [plain], middleware=[DefineMiddleware(middleware, store=store), *after_ours], debug=True
    )
    response = await client_for(app).get("/plain")

    assert response.status_code == 500
    assert "SessionPlugin" in response.text


async def test_the_middleware_around_a_whole_litestar_app_is_one_and_works(
    client_for: ClientFor,
) -> None:
    """Wrapping the app once (as when mounting it under Starlette) is a single middleware."""

    @post("/in", status_code=200)
    async def sign_in(request: Request[Any, Any, Any]) -> None:
        await Session.from_request(request).authenticate("alice")

    @get("/who")
    async def who(request: Request[Any, Any, Any]) -> dict[str, str | None]:
        return {"user": Session.from_request(request).user_id}

    litestar_app: Any = Litestar([sign_in, who])
    app: Any = SessionMiddleware(litestar_app, store="memory://")
    client = client_for(app)
    cookie = session_cookie(await client.post("/in"))
    assert cookie is not None

    response = await client.get("/who", headers=cookie_header(cookie.value))

    assert response.json() == {"user": "alice"}


async def test_an_asgi_app_with_its_own_middleware_mounted_under_litestar_works(
    tmp_path: Path, client_for: ClientFor
) -> None:
    """Litestar names a mount's handler in the scope too: the check took the mounted
    app's own middleware for one added to Litestar's list, and refused every request."""

    async def signs_in_on_post(scope: Any, receive: Any, send: Any) -> None:
        session = Session.from_scope(scope)
        if scope["method"] == "POST":
            await session.authenticate("alice")
        await StarletteJSON({"user": session.user_id})(scope, receive, send)

    with_sessions = SessionMiddleware(
        signs_in_on_post, store=f"sqlite:///{tmp_path / 'sessions.db'}"
    )

    @asgi("/api", is_mount=True, copy_scope=False)
    async def mounted(scope: Any, receive: Any, send: Any) -> None:
        await with_sessions(scope, receive, send)

    client = client_for(cast(Any, Litestar([mounted])))
    cookie = session_cookie(await client.post("/api"))
    assert cookie is not None

    response = await client.get("/api", headers=cookie_header(cookie.value))

    assert response.json() == {"user": "alice"}


@pytest.mark.parametrize("copy_scope", [False, True])
async def test_a_session_error_in_a_starlette_app_mounted_under_litestar_keeps_its_status(
    sqlite_store: Store, copy_scope: bool
) -> None:
    """The Starlette app's error middleware answers it with its 500 page, then raises it
    on: the error's own answer instead, also where the mount copies the scope (Litestar
    3's default), which hid the mounted app from a look at the scope. (Litestar's own
    error handling, between the two, then tells the server of an error after the
    response started.)"""

    async def signed_in_only(request: StarletteRequest) -> StarletteJSON:
        await Session.from_request(request).list_my_sessions()
        return StarletteJSON({})

    sub = Starlette(routes=[Route("/{rest:path}", signed_in_only)])

    @asgi("/v1", is_mount=True, copy_scope=copy_scope)
    async def mounted(scope: Any, receive: Any, send: Any) -> None:
        await sub(scope, receive, send)

    app = Litestar([mounted], plugins=[SessionPlugin(store=sqlite_store)])
    transport = httpx.ASGITransport(app=cast(Any, app), raise_app_exceptions=False)

    async with httpx.AsyncClient(transport=transport, base_url="https://testserver") as client:
        response = await client.get("/v1/devices")

    assert response.status_code == 401
    assert "detail" in response.json()


@websocket("/ws/keep")
async def ws_keep(socket: WebSocket[Any, Any, Any], session: CurrentSession) -> None:
    """Sets what it is sent until the client leaves (the usual end of a socket)."""
    await socket.accept()
    while True:
        session.set("theme", await socket.receive_text())
        await socket.send_text("kept")


def test_what_a_websocket_set_is_kept_when_the_client_leaves(sqlite_store: Store) -> None:
    """Litestar says so with its own WebSocketDisconnect, not Starlette's."""
    plugin = SessionPlugin(store=sqlite_store)
    app = Litestar([login, me, ws_keep], plugins=[plugin])
    with LitestarTestClient(app, base_url="https://testserver.local") as client:
        client.headers["user-agent"] = CHROME_MAC
        token = session_cookie(client.post("/login", json={"user_id": "alice"}))
        assert token is not None

        def send_then_leave() -> None:
            # The cookie by hand: the client sends its Secure cookies over https only.
            with client.websocket_connect("/ws/keep", headers=cookie_header(token.value)) as ws:
                ws.send_text("solarized")
                assert ws.receive_text() == "kept"

        with contextlib.suppress(Exception):  # the handler's disconnect, re-raised or not
            send_then_leave()
        me_after = client.get("/me", headers=cookie_header(token.value))

    assert me_after.json() == {"user": "alice", "theme": "solarized"}


@websocket_stream("/ws/feed")
async def ws_feed(session: CurrentSession) -> AsyncGenerator[str, None]:
    """Keeps a key, sends a tick, then finds the user signed out (a liveness check)."""
    session.set("theme", "solarized")
    yield "tick"
    raise Unauthorized("signed out meanwhile")


def test_a_session_error_in_a_streaming_websocket_closes_it_as_in_a_plain_one(
    sqlite_store: Store,
) -> None:
    """Litestar runs a stream in a task group, which raises its error in a group: the
    socket was closed with Litestar's own 4500, and what the stream set was dropped."""
    app = Litestar([login, me, ws_feed], plugins=[SessionPlugin(store=sqlite_store)])
    with LitestarTestClient(app, base_url="https://testserver.local") as client:
        client.headers["user-agent"] = CHROME_MAC
        token = session_cookie(client.post("/login", json={"user_id": "alice"}))
        assert token is not None

        with client.websocket_connect("/ws/feed", headers=cookie_header(token.value)) as ws:
            tick = ws.receive_text()
            with pytest.raises(WebSocketDisconnect) as closed:
                ws.receive_text()
        me_after = client.get("/me", headers=cookie_header(token.value))

    assert tick == "tick"
    assert (closed.value.code, closed.value.detail) == (1008, "signed out meanwhile")
    assert me_after.json() == {"user": "alice", "theme": "solarized"}


@websocket("/ws/required")
async def ws_required(socket: WebSocket[Any, Any, Any], session: CurrentSession) -> None:
    """Lists the user's sessions before accepting: Unauthorized when signed out."""
    await session.list_my_sessions()
    await socket.accept()


@websocket("/ws/fail")
async def ws_fail(socket: WebSocket[Any, Any, Any], session: CurrentSession) -> None:
    """Sets a key, then fails the way it is sent."""
    await socket.accept()
    session.set("theme", "set before the error")
    how = await socket.receive_text()
    if how == "unknown session":
        await session.revoke("AAAAAAAAAAAAAAAAAAAAAA")  # SessionNotFound, 404
    elif how == "bad value":
        session.set("tags", {"a set"})  # SessionDataError, 500
    else:
        await session.list_my_sessions()  # StoreUnavailable once the table is gone


def test_a_session_error_before_accept_refuses_the_websocket_with_policy_violation(
    sqlite_store: Store,
) -> None:
    """As under Starlette; Litestar alone closes every exception with 4500. The app's own
    exception hooks still see the error.
    """
    seen: list[Exception] = []
    app = Litestar(
        [ws_required],
        plugins=[SessionPlugin(store=sqlite_store)],
        after_exception=[lambda exc, scope: seen.append(exc)],
    )
    with (
        LitestarTestClient(app, base_url="https://testserver.local") as client,
        pytest.raises(WebSocketDisconnect) as closed,
        client.websocket_connect("/ws/required"),
    ):
        pytest.fail("the WebSocket was accepted")

    assert (closed.value.code, closed.value.detail) == (1008, "Not authenticated: sign in first.")
    assert [type(exc).__name__ for exc in seen] == ["Unauthorized"]


def socket_closed_after(
    app: Litestar,
    path: str,
    text: str,
    *,
    before_sending: Callable[[], None] | None = None,
    before_reading_back: Callable[[], None] | None = None,
) -> tuple[WebSocketDisconnect, Any]:
    """Sign in, open the socket at ``path`` with the session's cookie, send ``text`` and
    expect the server to close it; returns how it closed and what ``/me`` reads afterwards.
    """
    with LitestarTestClient(app, base_url="https://testserver.local") as client:
        client.headers["user-agent"] = CHROME_MAC
        token = session_cookie(client.post("/login", json={"user_id": "alice"}))
        assert token is not None
        with client.websocket_connect(path, headers=cookie_header(token.value)) as ws:
            if before_sending is not None:
                before_sending()
            ws.send_text(text)
            with pytest.raises(WebSocketDisconnect) as closed:
                ws.receive_text()
        if before_reading_back is not None:
            before_reading_back()
        me_after = client.get("/me")
    return closed.value, me_after.json()


@pytest.mark.parametrize(
    ("how", "code", "reason", "saved"),
    [
        ("unknown session", 1008, "No such session.", True),
        ("bad value", 1011, "the value for session key 'tags'", False),
    ],
)
def test_a_session_error_in_a_websocket_closes_it_with_its_code_and_saves_as_http_would(
    sqlite_store: Store, how: str, code: int, reason: str, saved: bool
) -> None:
    """A 4xx error keeps what the handler set before it, as an HTTP 4xx response does;
    a 5xx one (the app's mistake) drops it and is logged.
    """
    app = Litestar([login, me, ws_fail], plugins=[SessionPlugin(store=sqlite_store)])
    handler = RecordingHandler()
    logger = logging.getLogger("authsessions")  # Litestar's logging config stops propagation
    logger.addHandler(handler)
    try:
        closed, me_after = socket_closed_after(app, "/ws/fail", how)
    finally:
        logger.removeHandler(handler)

    assert closed.code == code
    assert reason in closed.detail
    assert me_after["theme"] == ("set before the error" if saved else "dark")
    logged = [r.getMessage() for r in handler.records]
    assert any("a WebSocket handler failed" in m for m in logged) == (code == 1011)


def test_a_store_down_in_a_websocket_closes_it_with_try_again_later(tmp_path: Path) -> None:
    path = tmp_path / "sessions.db"
    app = Litestar([login, me, ws_fail], plugins=[SessionPlugin(store=f"sqlite:///{path}")])

    def rename_table(old: str, new: str) -> None:
        with contextlib.closing(sqlite3.connect(path)) as db, db:
            db.execute(f"ALTER TABLE {old} RENAME TO {new}")

    closed, me_after = socket_closed_after(
        app,
        "/ws/fail",
        "read the store",
        before_sending=lambda: rename_table(TABLE, "moved_away"),
        before_reading_back=lambda: rename_table("moved_away", TABLE),
    )

    assert closed.code == 1013
    assert "unavailable" in closed.detail
    assert me_after == {"user": "alice", "theme": "dark"}


@websocket("/ws/ends")
async def ws_ends(socket: WebSocket[Any, Any, Any], session: CurrentSession) -> None:
    """Sets a key, then ends as it is sent: with a bug of its own, or a chosen close."""
    await socket.accept()
    session.set("theme", "set before the end")
    if await socket.receive_text() == "bug":
        raise ValueError("a bug in the handler")
    raise WebSocketException(detail="bye", code=4001)


@pytest.mark.parametrize(
    ("how", "code", "theme"), [("bug", 4500, "dark"), ("close", 4001, "set before the end")]
)
def test_a_websocket_handler_that_fails_with_the_client_there_saves_nothing(
    sqlite_store: Store, how: str, code: int, theme: str
) -> None:
    """As under Starlette, and as an HTTP 500 does. Litestar answers a handler's bug
    itself (it closes with 4500) and returns: that is no socket that ended well. A
    WebSocketException is a close the app chose, which keeps what was set, as under
    Starlette.
    """
    app = Litestar([login, me, ws_ends], plugins=[SessionPlugin(store=sqlite_store)])

    closed, me_after = socket_closed_after(app, "/ws/ends", how)

    assert closed.code == code
    assert me_after == {"user": "alice", "theme": theme}


@websocket("/ws/set-then-wait")
async def ws_set_then_wait(socket: WebSocket[Any, Any, Any], session: CurrentSession) -> None:
    await socket.accept()
    session.set("theme", "solarized")
    await socket.receive_text()  # until the client leaves


@pytest.mark.parametrize("owner", ["plugin", "app"])
async def test_shutdown_waits_for_the_save_of_a_websocket_the_server_cancelled(
    redis_url: str, redis_prefix: str, owner: str
) -> None:
    """As under Starlette. The plugin's middleware runs per route, so no lifespan passes
    through it: the store (closed by the plugin, or by the app's own hook) closed under
    the save, and what the socket set was lost."""
    store = RedisStore(redis_url, prefix=redis_prefix)
    plugin = SessionPlugin(
        store=f"{redis_url}?prefix={redis_prefix}" if owner == "plugin" else store
    )
    app: Any = Litestar(
        [ws_set_then_wait],
        plugins=[plugin],
        on_shutdown=[] if owner == "plugin" else [store.close],
    )
    admin = Redis.from_url(redis_url)
    leaving = asyncio.Event()

    async def receive() -> dict[str, Any]:
        if not connected:
            connected.append(True)
            return {"type": "websocket.connect"}
        await leaving.wait()
        return {"type": "websocket.disconnect", "code": 1001}

    async def send(message: Any) -> None:
        pass

    connected: list[bool] = []
    try:
        async with LifespanManager(app):
            token, _ = await plant_session(plugin.store, "alice", data={"theme": "dark"})
            scope = {
                "type": "websocket",
                "path": "/ws/set-then-wait",
                "raw_path": b"/ws/set-then-wait",
                "root_path": "",
                "query_string": b"",
                "headers": [
                    (b"cookie", f"{SessionConfig().cookie_name}={token}".encode()),
                    (b"user-agent", CHROME_MAC.encode()),
                ],
                "client": ("127.0.0.1", 123),
                "server": ("testserver", 443),
                "scheme": "wss",
                "subprotocols": [],
            }
            serving = asyncio.create_task(app(scope, receive, send))
            await asyncio.sleep(0.1)  # accepted, the key set
            await admin.client_pause(500, all=False)  # writes wait half a second
            leaving.set()  # the client leaves: the save waits for the server
            await asyncio.sleep(0.1)
            serving.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await serving
    finally:
        await admin.aclose()

    assert not plugin.store.is_open
    async with RedisStore(redis_url, prefix=redis_prefix) as reopened:
        (session,) = await SessionManager(reopened).list_for_user("alice")
        assert session.data == {"theme": "solarized"}
