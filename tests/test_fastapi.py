"""FastAPI: ``app.add_middleware(SessionMiddleware)``, the ``CurrentSession`` and
``RequiredSession`` dependencies, and errors rendered without any app setup."""

from __future__ import annotations

import contextlib
import inspect
import sqlite3
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, WebSocket
from starlette.testclient import TestClient, WebSocketDenialResponse
from starlette.websockets import WebSocketDisconnect

from authsessions import SessionData, SessionMiddleware
from authsessions.fastapi import CurrentSession, RequiredSession, get_session, require_session
from authsessions.stores import MemoryStore, SQLiteStore, Store
from tests.apps.session_app import COOKIE, cookie_header, session_cookie
from tests.conftest import ClientFactory


def build_fastapi_app(store: Store | None) -> FastAPI:
    app = FastAPI()
    if store is not None:
        app.add_middleware(SessionMiddleware, store=store)

    @app.post("/login")
    async def login(session: CurrentSession, user_id: str) -> dict[str, Any]:
        await session.authenticate(user_id)
        session.set("via", "fastapi")
        return {"user_id": session.user_id}

    @app.get("/anyone")
    async def anyone(session: CurrentSession) -> dict[str, Any]:
        return {"authenticated": session.is_authenticated, "via": session.get("via")}

    @app.get("/me")
    async def me(session: RequiredSession) -> dict[str, Any]:
        return {"user_id": session.user_id, "via": session.get("via", type=str)}

    @app.post("/sessions/{session_id}/revoke")
    async def revoke(session: RequiredSession, session_id: str) -> dict[str, bool]:
        await session.revoke(session_id)
        return {"revoked": True}

    @app.get("/devices")
    async def devices(session: RequiredSession) -> list[SessionData]:
        return await session.list_my_sessions()

    @app.post("/rotate")
    async def rotate(session: CurrentSession) -> dict[str, bool]:
        await session.rotate()
        return {"rotated": True}

    @app.websocket("/ws")
    async def ws(websocket: WebSocket, session: CurrentSession) -> None:
        await websocket.accept()
        await websocket.send_json({"user_id": session.user_id})
        await websocket.close()

    @app.websocket("/ws/required")
    async def ws_required(websocket: WebSocket, session: RequiredSession) -> None:
        await websocket.accept()
        await websocket.send_json({"user_id": session.user_id})
        await websocket.close()

    @app.websocket("/ws/bad-value")
    async def ws_bad_value(websocket: WebSocket, session: CurrentSession) -> None:
        await websocket.accept()
        session.set("tags", {"a", "b"})  # a set: not JSON

    @app.websocket("/ws/keep")
    async def ws_keep(websocket: WebSocket, session: CurrentSession) -> None:
        """Sets what it is sent, until the client leaves (the usual end of a socket)."""
        await websocket.accept()
        while True:
            session.set("via", await websocket.receive_text())
            await websocket.send_text("kept")

    return app


@pytest.fixture
def fastapi_client(sqlite_store: Store, client_factory: ClientFactory) -> httpx.AsyncClient:
    return client_factory(build_fastapi_app(sqlite_store))


async def test_login_and_required_session(fastapi_client: httpx.AsyncClient) -> None:
    login = await fastapi_client.post("/login", params={"user_id": "alice"})

    assert login.status_code == 200
    assert login.json() == {"user_id": "alice"}
    cookie = session_cookie(login)
    assert cookie is not None
    assert "secure" in cookie.attributes
    me = await fastapi_client.get("/me")
    assert me.json() == {"user_id": "alice", "via": "fastapi"}
    assert (await fastapi_client.get("/anyone")).json() == {"authenticated": True, "via": "fastapi"}


async def test_a_route_may_answer_with_the_sessions_it_lists(
    fastapi_client: httpx.AsyncClient,
) -> None:
    """FastAPI builds a response model from the annotation: SessionData's fields, written
    as strings in a module SessionData no longer names, could not be resolved (a 500)."""
    await fastapi_client.post("/login", params={"user_id": "alice"})

    response = await fastapi_client.get("/devices")

    assert response.status_code == 200
    [device] = response.json()
    assert (device["user_id"], device["is_current"], device["device_type"]) == (
        "alice",
        True,
        "desktop",
    )


async def test_current_session_does_not_require_a_login(fastapi_client: httpx.AsyncClient) -> None:
    response = await fastapi_client.get("/anyone")

    assert response.status_code == 200
    assert response.json() == {"authenticated": False, "via": None}
    assert "set-cookie" not in response.headers


async def test_required_session_answers_401_json_without_a_login(
    fastapi_client: httpx.AsyncClient,
) -> None:
    response = await fastapi_client.get("/me")

    assert response.status_code == 401
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"detail": "Not authenticated: sign in first."}


async def test_unauthorized_from_a_session_method_answers_401(
    fastapi_client: httpx.AsyncClient,
) -> None:
    response = await fastapi_client.post("/rotate")

    assert response.status_code == 401
    assert response.json() == {"detail": "Not authenticated: sign in first."}


async def test_session_not_found_answers_404_json(fastapi_client: httpx.AsyncClient) -> None:
    await fastapi_client.post("/login", params={"user_id": "alice"})

    response = await fastapi_client.post("/sessions/AAAAAAAAAAAAAAAAAAAAAA/revoke")

    assert response.status_code == 404
    assert response.json() == {"detail": "No such session."}
    assert (await fastapi_client.get("/me")).status_code == 200


async def test_store_unavailable_answers_503_json_and_keeps_the_cookie(
    tmp_path: Path, client_factory: ClientFactory
) -> None:
    path = tmp_path / "sessions.db"
    async with SQLiteStore(path) as store:
        client = client_factory(build_fastapi_app(store))
        login = await client.post("/login", params={"user_id": "alice"})
        token = session_cookie(login)
        assert token is not None

        db = sqlite3.connect(path, isolation_level=None)
        db.execute("ALTER TABLE authsessions_session RENAME TO away")
        try:
            response = await client.get("/me", headers=cookie_header(token.value))
        finally:
            db.execute("ALTER TABLE away RENAME TO authsessions_session")
            db.close()

        assert response.status_code == 503
        assert set(response.json()) == {"detail"}
        assert "set-cookie" not in response.headers
        assert (await client.get("/me", headers=cookie_header(token.value))).status_code == 200


async def test_missing_middleware_names_session_middleware(client_factory: ClientFactory) -> None:
    client = client_factory(build_fastapi_app(None))

    with pytest.raises(RuntimeError, match="SessionMiddleware"):
        await client.get("/anyone")


async def test_session_errors_in_a_mounted_sub_app_answer_with_their_status(
    client_factory: ClientFactory,
) -> None:
    """The sub-app's own error middleware answered them first, with a 500, and raised
    them on to the server."""
    app = build_fastapi_app(MemoryStore())
    sub = FastAPI()

    @sub.get("/me")
    async def me(session: RequiredSession) -> dict[str, Any]:
        return {"user_id": session.user_id}

    @sub.post("/revoke/{session_id}")
    async def revoke(session: RequiredSession, session_id: str) -> dict[str, Any]:
        await session.revoke(session_id)
        return {}

    @sub.post("/keep-a-set")
    async def keep_a_set(session: RequiredSession) -> dict[str, Any]:
        session.set("tags", {"a", "b"})  # not JSON: a SessionDataError, a 500 of ours
        return {}

    app.mount("/v1", sub)
    client = client_factory(app)

    signed_out = await client.get("/v1/me")
    token = session_cookie(await client.post("/login", params={"user_id": "alice"}))
    assert token is not None
    unknown = await client.post("/v1/revoke/no-such-session", headers=cookie_header(token.value))
    not_json = await client.post("/v1/keep-a-set", headers=cookie_header(token.value))

    assert (signed_out.status_code, signed_out.headers["cache-control"]) == (401, "no-store")
    assert "detail" in signed_out.json()
    assert unknown.status_code == 404
    assert "detail" in unknown.json()
    # Was the sub-app's plain-text "Internal Server Error".
    assert not_json.status_code == 500
    assert "set" in not_json.json()["detail"]


class SignedInStandIn:
    """What a test puts in place of the session dependency."""

    user_id = "stand-in"
    is_authenticated = True

    def get(self, key: str, default: object = None, **options: object) -> object:
        return "the stand-in's"


async def test_one_override_of_get_session_serves_both_session_dependencies(
    client_factory: ClientFactory,
) -> None:
    """FastAPI's ``dependency_overrides[get_session]`` reached CurrentSession routes, while
    RequiredSession ones read the request themselves and answered 401."""
    app = build_fastapi_app(MemoryStore())
    app.dependency_overrides[get_session] = SignedInStandIn
    client = client_factory(app)

    optional = await client.get("/anyone")
    required = await client.get("/me")

    assert optional.json() == {"authenticated": True, "via": "the stand-in's"}
    assert (required.status_code, required.json()) == (
        200,
        {"user_id": "stand-in", "via": "the stand-in's"},
    )


def test_current_session_works_on_websockets() -> None:
    with TestClient(build_fastapi_app(MemoryStore()), base_url="https://testserver") as client:
        token = client.post("/login", params={"user_id": "alice"}).cookies[COOKIE]

        with client.websocket_connect("/ws", headers=cookie_header(token)) as ws:
            message = ws.receive_json()

    assert message == {"user_id": "alice"}


def test_the_session_dependencies_run_on_the_event_loop() -> None:
    """FastAPI hands a plain ``def`` dependency to its thread pool: a thread hop on every
    request (it doubled a request's cost) and a token of the pool the app's own sync code
    needs. A coroutine function it awaits in place.
    """
    assert inspect.iscoroutinefunction(get_session)
    assert inspect.iscoroutinefunction(require_session)


def test_a_session_error_on_a_websocket_denies_its_handshake_with_the_errors_response() -> None:
    """Not a failed ASGI call with a traceback in the server's log: what an HTTP request
    would get, 401, where the server lets the app deny the handshake with a response."""
    app = build_fastapi_app(MemoryStore())
    with (
        TestClient(app, base_url="https://testserver") as client,
        pytest.raises(WebSocketDenialResponse) as denied,
        client.websocket_connect("/ws/required"),
    ):
        pass

    assert denied.value.status_code == 401
    assert denied.value.json() == {"detail": "Not authenticated: sign in first."}


def test_what_a_websocket_set_is_kept_when_the_client_leaves() -> None:
    store = MemoryStore()
    with TestClient(build_fastapi_app(store), base_url="https://testserver") as client:
        token = client.post("/login", params={"user_id": "alice"}).cookies[COOKIE]

        def send_then_leave() -> None:
            with client.websocket_connect("/ws/keep", headers=cookie_header(token)) as ws:
                ws.send_text("socket")
                assert ws.receive_text() == "kept"

        # The handler's next receive raises WebSocketDisconnect, which goes on up once the
        # session's changes are written; the test client re-raises it here unless its own
        # cancellation of the app, as it leaves, lands while the save runs (a task of its
        # own, shielded). That it is not swallowed is tested on the middleware itself.
        with contextlib.suppress(WebSocketDisconnect):
            send_then_leave()
        me = client.get("/me", headers=cookie_header(token))

    assert me.json()["via"] == "socket"


def test_a_bug_in_a_websocket_handler_closes_it_as_an_internal_error_and_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """1011, not 1013 "try again later" (clients that retry would reconnect in a loop),
    and the server's log tells the developer what went wrong.
    """
    store = MemoryStore()
    with TestClient(build_fastapi_app(store), base_url="https://testserver") as client:
        token = client.post("/login", params={"user_id": "alice"}).cookies[COOKIE]
        with (
            caplog.at_level("ERROR", logger="authsessions"),
            client.websocket_connect("/ws/bad-value", headers=cookie_header(token)) as ws,
            pytest.raises(WebSocketDisconnect) as closed,
        ):
            ws.receive_text()

    assert closed.value.code == 1011
    assert "a WebSocket handler failed: the value for session key 'tags'" in caplog.text
