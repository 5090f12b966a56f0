"""A small Starlette app that exercises every ``Session`` operation over HTTP, plus helpers.

Each route does one thing to the session and answers JSON describing the
session afterwards, so a test reads the outcome from the response and the
store, never from the app's internals.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route, WebSocketRoute
from starlette.websockets import WebSocket

from authsessions import Session, SessionConfig, SessionData, SessionMiddleware
from authsessions._client import describe_device
from authsessions._tokens import new_session_id, new_token, token_digest
from authsessions.stores import SessionRecord, Store

__all__ = [
    "CHROME_MAC",
    "COOKIE",
    "FIREFOX_WINDOWS",
    "SetCookie",
    "SlowGate",
    "build_app",
    "cookie_header",
    "plant_session",
    "session_cookie",
    "session_json",
    "set_cookies",
]

COOKIE = "__Host-session"

CHROME_MAC = (
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 "
    "(KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36"
)
FIREFOX_WINDOWS = "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:121.0) Gecko/20100101 Firefox/121.0"


# -- the app ---------------------------------------------------------------------


def session_json(data: SessionData | None) -> dict[str, Any] | None:
    """A ``SessionData`` as JSON; times as ISO 8601 strings."""
    if data is None:
        return None
    return {
        "id": data.id,
        "user_id": data.user_id,
        "ip_address": data.ip_address,
        "user_agent": data.user_agent,
        "device_name": data.device_name,
        "device_type": data.device_type,
        "fingerprint": data.fingerprint,
        "data": data.data,
        "created_at": data.created_at.isoformat(),
        "last_active_at": data.last_active_at.isoformat(),
        "expires_at": data.expires_at.isoformat(),
        "is_current": data.is_current,
    }


def _state(session: Session) -> dict[str, Any]:
    return {
        "authenticated": session.is_authenticated,
        "user_id": session.user_id,
        "session": session_json(session.current()),
    }


async def _body(request: Request) -> dict[str, Any]:
    if not await request.body():
        return {}
    body: dict[str, Any] = await request.json()
    return body


async def login(request: Request) -> Response:
    """Body: ``{"user_id": ..., "data"?: {...}, "set"?: {...}}``; ``set`` runs after login."""
    session = Session.from_request(request)
    body = await _body(request)
    if "data" in body:
        await session.authenticate_with(body["user_id"], body["data"])
    else:
        await session.authenticate(body["user_id"])
    for key, value in body.get("set", {}).items():
        session.set(key, value)
    return JSONResponse(_state(session))


async def me(request: Request) -> Response:
    return JSONResponse(_state(Session.from_request(request)))


async def set_keys(request: Request) -> Response:
    """Body: a mapping of keys to set; answers the session as ``current()`` then sees it."""
    session = Session.from_request(request)
    for key, value in (await _body(request)).items():
        session.set(key, value)
    return JSONResponse(_state(session))


async def remove_keys(request: Request) -> Response:
    """Body: ``{"keys": [...]}``."""
    session = Session.from_request(request)
    for key in (await _body(request))["keys"]:
        session.remove_key(key)
    return JSONResponse(_state(session))


async def rotate(request: Request) -> Response:
    """Body: ``{"set"?: {...}}``, applied after the rotation."""
    session = Session.from_request(request)
    await session.rotate()
    for key, value in (await _body(request)).get("set", {}).items():
        session.set(key, value)
    return JSONResponse(_state(session))


async def logout(request: Request) -> Response:
    session = Session.from_request(request)
    await session.logout()
    return JSONResponse(_state(session))


async def logout_all(request: Request) -> Response:
    session = Session.from_request(request)
    await session.logout_all()
    return JSONResponse(_state(session))


async def logout_other(request: Request) -> Response:
    session = Session.from_request(request)
    await session.logout_other()
    return JSONResponse(_state(session))


async def list_sessions(request: Request) -> Response:
    sessions = await Session.from_request(request).list_my_sessions()
    return JSONResponse([session_json(data) for data in sessions])


async def revoke(request: Request) -> Response:
    session = Session.from_request(request)
    await session.revoke(request.path_params["session_id"])
    return JSONResponse(_state(session))


async def current(request: Request) -> Response:
    return JSONResponse(session_json(Session.from_request(request).current()))


@dataclass
class SlowGate:
    """Lets a test hold ``/slow`` after it loaded its session, until the test says go."""

    started: asyncio.Event
    proceed: asyncio.Event


async def slow(request: Request) -> Response:
    """Loads the session, waits for the test, then sets ``{"slow": true}``."""
    session = Session.from_request(request)
    gate: SlowGate = request.app.state.slow_gate
    gate.started.set()
    await asyncio.wait_for(gate.proceed.wait(), timeout=10)
    session.set("slow", True)
    return JSONResponse(_state(session))


async def websocket_endpoint(websocket: WebSocket) -> None:
    """Reports the session, tries to sign in (which a WebSocket cannot), then sets a key."""
    session = Session.from_request(websocket)
    await websocket.accept()
    await websocket.send_json(
        {
            "user_id": session.user_id,
            "theme": session.get("theme"),
            "authenticated": session.is_authenticated,
        }
    )
    try:
        await session.authenticate("mallory")
    except RuntimeError as exc:
        await websocket.send_json({"authenticate": "refused", "error": str(exc)})
    else:
        await websocket.send_json({"authenticate": "allowed"})
    message = await websocket.receive_json()
    session.set("from_websocket", message)
    await websocket.close()


ROUTES: list[BaseRoute] = [
    Route("/login", login, methods=["POST"]),
    Route("/me", me),
    Route("/set", set_keys, methods=["POST"]),
    Route("/remove", remove_keys, methods=["POST"]),
    Route("/rotate", rotate, methods=["POST"]),
    Route("/logout", logout, methods=["POST"]),
    Route("/logout_all", logout_all, methods=["POST"]),
    Route("/logout_other", logout_other, methods=["POST"]),
    Route("/sessions", list_sessions),
    Route("/sessions/{session_id}/revoke", revoke, methods=["POST"]),
    Route("/current", current),
    Route("/slow", slow),
    WebSocketRoute("/ws", websocket_endpoint),
]


def build_app(
    store: Store | str | None,
    config: SessionConfig | None = None,
    *,
    extra_routes: Sequence[BaseRoute] = (),
) -> Starlette:
    """The test app wrapped in ``SessionMiddleware`` with ``store`` and ``config``."""
    app = Starlette(
        routes=[*extra_routes, *ROUTES],
        middleware=[Middleware(SessionMiddleware, store=store, config=config)],
    )
    app.state.slow_gate = SlowGate(started=asyncio.Event(), proceed=asyncio.Event())
    return app


# -- cookies -----------------------------------------------------------------------


@dataclass(frozen=True)
class SetCookie:
    """One ``Set-Cookie`` header, parsed; attribute names lower-cased, flags map to ``""``."""

    name: str
    value: str
    attributes: Mapping[str, str]
    raw: str

    @property
    def max_age(self) -> int | None:
        value = self.attributes.get("max-age")
        return int(value) if value is not None else None

    @property
    def is_clearing(self) -> bool:
        return self.value == "" and self.max_age == 0


def set_cookies(response: httpx.Response) -> list[SetCookie]:
    parsed = []
    for raw in response.headers.get_list("set-cookie"):
        pair, *attributes = (part.strip() for part in raw.split(";"))
        name, _, value = pair.partition("=")
        attrs: dict[str, str] = {}
        for attribute in attributes:
            key, _, attr_value = attribute.partition("=")
            attrs[key.strip().lower()] = attr_value.strip()
        parsed.append(SetCookie(name=name, value=value, attributes=attrs, raw=raw))
    return parsed


def session_cookie(response: httpx.Response, name: str = COOKIE) -> SetCookie | None:
    """The response's ``Set-Cookie`` for the session cookie; fails if there are several."""
    found = [cookie for cookie in set_cookies(response) if cookie.name == name]
    assert len(found) <= 1, f"several Set-Cookie headers for {name}: {found}"
    return found[0] if found else None


def cookie_header(token: str, name: str = COOKIE) -> dict[str, str]:
    """Headers carrying ``token`` as the session cookie (bypassing any cookie jar)."""
    return {"cookie": f"{name}={token}"}


# -- sessions made directly in the store, with times the test controls ------------------


async def plant_session(
    store: Store,
    user_id: str,
    *,
    user_agent: str = CHROME_MAC,
    created_ago: float = 0.0,
    idle_for: float = 0.0,
    expires_in: float = 3600.0,
    data: Mapping[str, Any] | None = None,
    max_sessions: int = 100,
) -> tuple[str, SessionRecord]:
    """Create a session as a login ``created_ago`` seconds ago would have; returns its token.

    ``idle_for`` is the time since its last activity, ``expires_in`` the time
    until its (sliding) expiry, negative for an expired session.
    """
    if not store.is_open:
        await store.open()
    now = time.time()
    token = new_token()
    device = describe_device(user_agent)
    record = SessionRecord(
        id=new_session_id(),
        token_digest=token_digest(token),
        user_id=user_id,
        ip_address="192.0.2.10",
        user_agent=user_agent,
        device_name=device.name,
        device_type=device.type,
        fingerprint=device.fingerprint,
        data=dict(data or {}),
        created_at=now - created_ago,
        last_active_at=now - idle_for,
        expires_at=now + expires_in,
    )
    # An already-expired record is created as of just before it expired: stores evict
    # a user's expired sessions on create, which would remove it at once.
    await store.create(record, max_sessions=max_sessions, now=min(now, record.expires_at - 1))
    return token, record
