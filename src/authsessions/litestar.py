"""Litestar integration: one plugin adds the middleware, a ``session`` dependency and error pages.

::

    from litestar import Litestar, get
    from authsessions.litestar import CurrentSession, SessionPlugin, require_session

    @get("/me")
    async def me(session: CurrentSession) -> dict[str, str | None]:
        return {"user": session.user_id}

    @get("/devices", guards=[require_session])  # 401 when signed out
    async def devices(session: CurrentSession) -> list[str]:
        return [s.device_name for s in await session.list_my_sessions()]

    app = Litestar([me, devices], plugins=[SessionPlugin(store="sqlite:///sessions.db")])
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, MutableMapping
from typing import Any, cast

from litestar import Litestar, Request, Response
from litestar.config.app import AppConfig
from litestar.connection import ASGIConnection
from litestar.di import NamedDependency, Provide
from litestar.enums import ScopeType
from litestar.exceptions import HTTPException, WebSocketException
from litestar.handlers import BaseRouteHandler
from litestar.middleware import DefineMiddleware
from litestar.plugins import InitPlugin
from litestar.types import Scope

from authsessions._config import SessionConfig
from authsessions._errors import SessionError, Unauthorized
from authsessions._middleware import SessionMiddleware, open_at_startup
from authsessions._session import Session
from authsessions._websocket import HANDLER_FAILED, finish_saves, session_error_in
from authsessions.stores._base import Store
from authsessions.stores._url import resolve_store

__all__ = ["CurrentSession", "SessionPlugin", "provide_session", "require_session"]

CurrentSession = NamedDependency[Session]
"""Annotation for the ``session`` parameter SessionPlugin provides, signed in or not."""


def provide_session(scope: Scope) -> Session:
    """The request's :class:`Session` (HTTP or WebSocket), for Litestar's dependency injection.

    Raises:
        RuntimeError: ``SessionMiddleware`` is not installed.
    """
    return Session.from_scope(cast("MutableMapping[str, Any]", scope))


async def require_session(
    connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler
) -> None:
    """A guard: the route answers 401 when nobody is signed in (a WebSocket is refused
    with 1008), as ``RequiredSession`` does in FastAPI. Give it to a route, a router or
    the app: ``guards=[require_session]``.

    Raises:
        Unauthorized: there is no valid session.
        RuntimeError: ``SessionMiddleware`` is not installed.
    """
    # A coroutine function though it never awaits: Litestar runs a plain ``def`` guard
    # in its thread pool.
    if not provide_session(connection.scope).is_authenticated:
        raise Unauthorized()


def session_error_response(request: Request[Any, Any, Any], exc: SessionError) -> Response[Any]:
    """``{"detail": message}`` with the error's status code, never kept by a cache, as in
    Starlette and FastAPI.
    """
    return Response(
        {"detail": exc.message},
        status_code=exc.status_code,
        headers={"Cache-Control": "no-store"},
    )


def pass_session_errors_on_websockets(exc: Exception, scope: Scope) -> None:
    """Let a WebSocket handler's :class:`SessionError` go on to ``SessionMiddleware``, and
    tell it of any other failure Litestar answers itself.

    Litestar's exception handlers are for HTTP only: it would close the socket
    with 4500 and have the middleware save changes a 5xx error must drop. Raised
    from this hook (Litestar runs it before closing), the error reaches the
    middleware, which closes with 1008, 1013 or 1011 as under Starlette.
    """
    if scope["type"] != ScopeType.WEBSOCKET:
        return
    if session_error_in(exc) is not None:  # one, or a task group's of nothing else
        raise exc
    # Any other error Litestar answers itself, closing the socket, and the handler's call
    # ends without it: say that it failed, so that (as under Starlette, and as an HTTP 500)
    # what the handler set is not saved. A WebSocketException (a WebSocketDisconnect too)
    # is a close the app chose, and an HTTP 4xx error keeps what was set, as over HTTP.
    if isinstance(exc, WebSocketException) or (
        isinstance(exc, HTTPException) and exc.status_code < 500
    ):
        return
    cast("MutableMapping[str, Any]", scope)[HANDLER_FAILED] = True


class _RouteSessionMiddleware(SessionMiddleware):
    """``SessionMiddleware`` as the plugin adds it, one per route: the lifespan never
    passes through these, so the saves of their WebSockets go into one set the plugin
    waits for at shutdown, before the store closes."""

    def __init__(
        self,
        app: Any,
        *,
        store: Store,
        config: SessionConfig,
        socket_saves: set[asyncio.Task[None]],
    ) -> None:
        super().__init__(app, store=store, config=config)
        self._socket_saves = socket_saves


class SessionPlugin(InitPlugin):
    """Sessions for a Litestar app.

    Adds :class:`SessionMiddleware`, a ``session`` dependency (declare a
    ``session: CurrentSession`` parameter), and renders uncaught
    :class:`SessionError`\\ s as JSON with their status code (Litestar would
    otherwise answer 500); on a WebSocket they close it with the codes they
    give under Starlette (Litestar would close with 4500; list this plugin after
    any whose ``after_exception`` hooks must see those). The store opens at
    startup (if it is down, the app starts all the same and requests get 503
    until it opens); one built from a URL (or the default) is closed at
    shutdown. Add this plugin, not ``SessionMiddleware`` itself: Litestar
    builds middleware once per route.

    Args:
        store: a :class:`~authsessions.stores.Store`, a store URL, or ``None``
            for ``$AUTHSESSIONS_STORE`` or else ``sqlite:///sessions.db``.
        config: settings; ``SessionConfig()`` by default.
    """

    def __init__(
        self, *, store: Store | str | None = None, config: SessionConfig | None = None
    ) -> None:
        # Litestar builds a middleware stack per route: resolve the store once, here,
        # so every stack shares one store instead of opening one each.
        self.store, self._owns_store = resolve_store(store)
        self.config = config if config is not None else SessionConfig()
        self._socket_saves: set[asyncio.Task[None]] = set()

    def on_app_init(self, app_config: AppConfig) -> AppConfig:
        # SessionMiddleware speaks Starlette's (structurally equal) ASGI types.
        middleware: Any = _RouteSessionMiddleware
        # First, so outermost: the app's own middleware (one that authenticates from the
        # session, say) runs inside it and finds the session loaded.
        app_config.middleware.insert(
            0,
            DefineMiddleware(
                middleware, store=self.store, config=self.config, socket_saves=self._socket_saves
            ),
        )
        app_config.dependencies.setdefault(
            "session", Provide(provide_session, sync_to_thread=False)
        )
        app_config.exception_handlers.setdefault(SessionError, session_error_response)
        # Last so far, so that the app's own hooks still see the error; a plugin listed
        # after this one adds its hooks after it, and they miss a WebSocket's.
        app_config.after_exception.append(pass_session_errors_on_websockets)
        app_config.on_startup.append(self._open_store)
        # Last so far, so that it ends first at shutdown: before the app's own lifespan
        # managers and every on_shutdown hook, any of which may close the store (a plugin
        # listed after this one adds its managers after it).
        app_config.lifespan.append(self._finishing_socket_saves)
        if self._owns_store:
            app_config.on_shutdown.append(self.store.close)
        return app_config

    async def _open_store(self) -> None:
        await open_at_startup(self.store)

    @contextlib.asynccontextmanager
    async def _finishing_socket_saves(self, _app: Litestar) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await finish_saves(self._socket_saves)
