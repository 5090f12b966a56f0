"""SessionMiddleware: load the session, run the app, write what changed as the response starts."""

from __future__ import annotations

import hmac
import json
import logging
import os
import time

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from authsessions._client import describe_device, user_agent_of
from authsessions._config import SessionConfig
from authsessions._cookies import MALFORMED, SessionCookie
from authsessions._errors import SessionError, StoreUnavailable
from authsessions._records import SessionRecord
from authsessions._session import SCOPE_KEY, CookieChange, Session
from authsessions._tokens import token_digest
from authsessions.stores._base import Store
from authsessions.stores._url import DEFAULT_STORE_URL, STORE_URL_ENV, open_store

__all__ = ["SessionMiddleware"]

logger = logging.getLogger("authsessions")

# WebSocket close code 1013: "try again later", for a store that cannot be read.
_WS_TRY_AGAIN_LATER = 1013


class SessionMiddleware:
    """Pure-ASGI middleware that gives every HTTP and WebSocket request a :class:`Session`.

    Before the app runs it reads the session cookie, checks the token's shape
    (no store access for a malformed one), loads the session by the token's
    digest and checks expiry and fingerprint. When the response starts it
    writes the changed keys or a due touch in one store update, then adds
    ``Set-Cookie``, ``Cache-Control: no-store`` and ``Vary: Cookie`` as needed.
    A request that changes nothing writes nothing and gets no extra header::

        app = Starlette(routes=routes, middleware=[
            Middleware(SessionMiddleware, store="sqlite:///sessions.db"),
        ])

    Args:
        store: a :class:`~authsessions.stores.Store` (the app closes it), a
            store URL, or ``None`` for ``$AUTHSESSIONS_STORE`` or else
            ``sqlite:///sessions.db`` (the middleware closes those at shutdown).
        config: settings; ``SessionConfig()`` by default.

    Uncaught :class:`SessionError`\\ s become JSON responses with their status
    code. A store that cannot be read gives 503 and leaves the cookie alone.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        store: Store | str | None = None,
        config: SessionConfig | None = None,
    ) -> None:
        if config is not None and not isinstance(config, SessionConfig):
            raise TypeError(f"config must be a SessionConfig, got {type(config).__name__}.")
        self.app = app
        self.config = config if config is not None else SessionConfig()
        if store is None:
            store = os.environ.get(STORE_URL_ENV) or DEFAULT_STORE_URL
        if isinstance(store, str):
            self.store: Store = open_store(store)
            self._owns_store = True
        elif isinstance(store, Store):
            self.store = store
            self._owns_store = False
        else:
            raise TypeError(f"store must be a Store or a store URL, got {type(store).__name__}.")
        self._cookie = SessionCookie(self.config)
        self._absolute_ttl = (
            self.config.absolute_ttl.total_seconds() if self.config.absolute_ttl else None
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope_type = scope["type"]
        if scope_type == "http":
            await self._http(scope, receive, send)
        elif scope_type == "websocket":
            await self._websocket(scope, receive, send)
        elif scope_type == "lifespan":
            await self._lifespan(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            session = await self._load(scope)
        except StoreUnavailable as exc:
            # Fail closed, and keep the cookie: the session may be fine once the store is back.
            await _send_error(send, exc)
            return
        scope[SCOPE_KEY] = session
        response_started = False

        async def send_wrapper(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                await session.flush(save=message["status"] < 500)
                self._add_headers(message, session)
                response_started = True
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except SessionError as exc:
            if response_started:
                raise
            await _send_error(send_wrapper, exc)

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            session = await self._load(scope)
        except StoreUnavailable:
            await send({"type": "websocket.close", "code": _WS_TRY_AGAIN_LATER})
            return
        scope[SCOPE_KEY] = session
        await self.app(scope, receive, send)
        await session.flush(save=True)

    async def _load(self, scope: Scope) -> Session:
        """The request's session; anonymous, marked to clear the cookie, when it is not valid."""
        store = self.store
        if not store.is_open:
            await store.open()
        token = self._cookie.read(scope)
        if token is None:
            return Session(store=store, config=self.config, scope=scope, record=None, token=None)
        record = None
        if token != MALFORMED:
            digest = token_digest(token)
            now = time.time()
            record = await store.get(digest, now=now)
            if record is not None and not self._is_live(record, digest, now):
                record = None
            if record is not None and self._is_replayed(record, scope):
                # A cookie replayed from another kind of client: end the session for good.
                logger.warning("session %s used by a different client; ending it", record.id)
                await store.delete(record.id)
                record = None
        return Session(
            store=store,
            config=self.config,
            scope=scope,
            record=record,
            token=token if record is not None else None,
            cookie_change=CookieChange.NONE if record is not None else CookieChange.CLEAR,
        )

    def _is_live(self, record: SessionRecord, digest: str, now: float) -> bool:
        # The store found the row by this digest; comparing again in constant time
        # guards against a store that matches loosely (collation, prefix index).
        if not hmac.compare_digest(record.token_digest, digest):
            return False
        # absolute_ttl may have been shortened since this session was created.
        return self._absolute_ttl is None or record.created_at + self._absolute_ttl > now

    def _is_replayed(self, record: SessionRecord, scope: Scope) -> bool:
        return (
            self.config.validate_fingerprint
            and describe_device(user_agent_of(scope)).fingerprint != record.fingerprint
        )

    def _add_headers(self, message: Message, session: Session) -> None:
        change = session.cookie_change
        if change is CookieChange.NONE and not session.is_authenticated:
            return
        message.setdefault("headers", [])
        headers = MutableHeaders(scope=message)
        if change is CookieChange.SET:
            cookie = session.cookie_token()
            if cookie is not None:
                headers.append("set-cookie", self._cookie.header(*cookie).decode("latin-1"))
        elif change is CookieChange.CLEAR:
            headers.append("set-cookie", self._cookie.header(None).decode("latin-1"))
        # Never let a shared cache keep a response that sets a cookie or shows a user's data.
        if change is not CookieChange.NONE or "cache-control" not in headers:
            headers["cache-control"] = "no-store"
        headers.add_vary_header("Cookie")

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def receive_wrapper() -> Message:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.store.open()
                except SessionError as exc:
                    logger.error(
                        "could not open the session store at startup (%s); "
                        "requests will retry and get 503 until it opens",
                        exc,
                    )
            return message

        async def send_wrapper(message: Message) -> None:
            if message["type"].startswith("lifespan.shutdown") and self._owns_store:
                await self.store.close()
            await send(message)

        await self.app(scope, receive_wrapper, send_wrapper)


async def _send_error(send: Send, exc: SessionError) -> None:
    body = json.dumps({"detail": exc.message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": exc.status_code,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
