"""The benchmarked apps: one Starlette app per variant, with the same routes everywhere.

Routes (the handler bodies differ only in how they reach the session):

- ``GET /read``: read key ``k`` (authenticated read; without a cookie, the anonymous case)
- ``GET /write``: set key ``k`` to a new value
- ``GET /login``: start a new session for ``login-user`` holding ``{"k": "v"}``
- ``GET /setup``: the same for ``reader``, whose cookie the read and write scenarios send
- ``GET /login/{user}``: the same for the user the path names (a user per request stream)
- ``GET /list``, ``GET /logout-all``: authsessions only, for the scale part

``uvicorn --factory benchmarks.apps:app_from_env`` builds the variant that the
``AUTHSESSIONS_BENCH_APP`` environment variable describes (JSON, see
:func:`app_spec`), for the end-to-end part.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from authsessions import Session, SessionConfig, SessionMiddleware
from authsessions._tokens import new_token
from authsessions.stores import MemoryStore, SQLiteStore, Store

BARE = "bare"
NOOP_MIDDLEWARE = "noop-middleware"
FORWARDING_MIDDLEWARE = "forwarding-middleware"
SEND_WRAPPER_MIDDLEWARE = "send-wrapper-middleware"
SESSIONLESS = (BARE, NOOP_MIDDLEWARE, FORWARDING_MIDDLEWARE, SEND_WRAPPER_MIDDLEWARE)
"""The bare app, alone or behind a middleware that keeps no session: reference points."""
STARLETTE_COOKIE = "starlette-cookie"
STARSESSIONS_MEMORY = "starsessions-memory"
STARSESSIONS_REDIS = "starsessions-redis"
PEERS = (STARLETTE_COOKIE, STARSESSIONS_MEMORY, STARSESSIONS_REDIS)
OURS_PREFIX = "authsessions-"

SECRET_KEY = "benchmark-secret-key-not-for-production"  # noqa: S105 - a benchmark
APP_SPEC_ENV = "AUTHSESSIONS_BENCH_APP"

Handler = Callable[[Request], Any]


def ignored_cookie() -> str:
    """For the apps without sessions: a cookie like ours, so every variant parses the
    same request (a browser sends its cookies to every route).
    """
    return f"{SessionConfig().cookie_name}={new_token()}"


def ours(kind: str) -> str:
    return f"{OURS_PREFIX}{kind}"


def is_ours(variant: str) -> bool:
    return variant.startswith(OURS_PREFIX)


# -- handlers -------------------------------------------------------------------------

_counter = itertools.count()


async def bare_read(request: Request) -> PlainTextResponse:
    return PlainTextResponse("v")


async def bare_ok(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


async def peer_read(request: Request) -> PlainTextResponse:
    return PlainTextResponse(str(request.session.get("k")))


async def peer_write(request: Request) -> PlainTextResponse:
    request.session["k"] = next(_counter)
    return PlainTextResponse("ok")


def peer_login(user_id: str) -> Handler:
    async def login(request: Request) -> PlainTextResponse:
        request.session.clear()
        request.session.update({"user": user_id, "k": "v"})
        return PlainTextResponse("ok")

    return login


async def our_read(request: Request) -> PlainTextResponse:
    return PlainTextResponse(str(Session.from_request(request).get("k")))


async def our_write(request: Request) -> PlainTextResponse:
    Session.from_request(request).set("k", next(_counter))
    return PlainTextResponse("ok")


def our_login(user_id: str) -> Handler:
    async def login(request: Request) -> PlainTextResponse:
        await Session.from_request(request).authenticate_with(user_id, {"k": "v"})
        return PlainTextResponse("ok")

    return login


async def our_list(request: Request) -> PlainTextResponse:
    return PlainTextResponse(str(len(await Session.from_request(request).list_my_sessions())))


async def our_logout_all(request: Request) -> PlainTextResponse:
    await Session.from_request(request).logout_all()
    return PlainTextResponse("ok")


# -- apps -----------------------------------------------------------------------------


def _routes(read: Handler, write: Handler, login: Callable[[str], Handler]) -> list[Route]:
    return [
        Route("/read", read),
        Route("/write", write),
        Route("/login", login("login-user")),
        Route("/setup", login("reader")),
        Route("/login/{user}", _login_as_named_user(login)),
    ]


def _login_as_named_user(login: Callable[[str], Handler]) -> Handler:
    async def login_as(request: Request) -> PlainTextResponse:
        response: PlainTextResponse = await login(request.path_params["user"])(request)
        return response

    return login_as


def bare_app() -> Starlette:
    return Starlette(routes=_routes(bare_read, bare_ok, lambda _user: bare_ok))


class NoopMiddleware:
    """The least a pure-ASGI session middleware does: wrap ``send`` in a closure.

    A reference point, not a peer: what any middleware of this shape costs.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
            await send(message)

        await self.app(scope, receive, send_wrapper)


class LookupMiddleware(NoopMiddleware):
    """The least a database-backed session middleware does: one raw store lookup before
    the app runs, and the ``send`` wrapper. A floor, not a peer: it reads nothing.
    """

    def __init__(self, app: ASGIApp, lookup: Callable[[], Awaitable[Any]]) -> None:
        super().__init__(app)
        self.lookup = lookup

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self.lookup()
        await super().__call__(scope, receive, send)


def lookup_middleware_app(lookup: Callable[[], Awaitable[Any]]) -> Starlette:
    return Starlette(
        routes=_routes(bare_read, bare_ok, lambda _user: bare_ok),
        middleware=[Middleware(LookupMiddleware, lookup=lookup)],
    )


def noop_middleware_app() -> Starlette:
    return _bare_app_behind(NoopMiddleware)


class ForwardingMiddleware:
    """The least any ASGI middleware costs: one more layer, which awaits the app."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


class SendWrapperMiddleware(ForwardingMiddleware):
    """The least a middleware that may add a header to the response costs: one more layer
    and the cheapest ``send`` wrapper there is, a plain function handing back the server's
    own awaitable (no coroutine of its own, no object to build).
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        def wrapped_send(message: Message) -> Awaitable[None]:
            return send(message)

        await self.app(scope, receive, wrapped_send)


MIDDLEWARE_FLOORS: dict[str, type[ForwardingMiddleware]] = {
    FORWARDING_MIDDLEWARE: ForwardingMiddleware,
    SEND_WRAPPER_MIDDLEWARE: SendWrapperMiddleware,
}
"""Reference middlewares counted in the instructions part only, by variant name."""


def middleware_floor_app(variant: str) -> Starlette:
    """The bare app behind the :data:`MIDDLEWARE_FLOORS` middleware called ``variant``."""
    return _bare_app_behind(MIDDLEWARE_FLOORS[variant])


def _bare_app_behind(middleware: type[NoopMiddleware] | type[ForwardingMiddleware]) -> Starlette:
    return Starlette(
        routes=_routes(bare_read, bare_ok, lambda _user: bare_ok),
        middleware=[Middleware(middleware)],
    )


def starlette_cookie_app() -> Starlette:
    from starlette.middleware.sessions import SessionMiddleware as CookieSessionMiddleware

    return Starlette(
        routes=_routes(peer_read, peer_write, peer_login),
        middleware=[Middleware(CookieSessionMiddleware, secret_key=SECRET_KEY)],
    )


def starsessions_app(store: Any) -> Starlette:
    """starsessions as its README wires it: its middleware, then the autoload middleware."""
    from starsessions import SessionAutoloadMiddleware
    from starsessions import SessionMiddleware as StarSessionMiddleware

    return Starlette(
        routes=_routes(peer_read, peer_write, peer_login),
        middleware=[
            Middleware(
                StarSessionMiddleware,
                store=store,
                lifetime=timedelta(days=30),
                rolling=True,
                cookie_https_only=False,
            ),
            Middleware(SessionAutoloadMiddleware),
        ],
    )


def starsessions_memory_store() -> Any:
    from starsessions import InMemoryStore

    return InMemoryStore()


def starsessions_redis_store(url: str, prefix: str) -> Any:
    from redis.asyncio import Redis
    from starsessions.stores.redis import RedisStore

    return RedisStore(connection=Redis.from_url(url), prefix=prefix)


def authsessions_app(
    store: Store,
    config: SessionConfig | None = None,
    *,
    lookup_first: Callable[[], Awaitable[Any]] | None = None,
) -> Starlette:
    """Our app; with ``lookup_first``, behind a :class:`LookupMiddleware` making that lookup
    (the session layer's code run after a network wait that is not its own).
    """
    routes = _routes(our_read, our_write, our_login)
    routes += [Route("/list", our_list), Route("/logout-all", our_logout_all)]
    middleware = [Middleware(SessionMiddleware, store=store, config=config or SessionConfig())]
    if lookup_first is not None:
        middleware.insert(0, Middleware(LookupMiddleware, lookup=lookup_first))
    return Starlette(routes=routes, middleware=middleware)


# -- for uvicorn ------------------------------------------------------------------------


def app_spec(variant: str, *, url: str = "", options: dict[str, str] | None = None) -> str:
    """The environment value that makes :func:`app_from_env` build ``variant``."""
    return json.dumps({"variant": variant, "url": url, "options": options or {}})


def store_from_spec(kind: str, url: str, options: dict[str, str]) -> Store:
    if kind == "memory":
        return MemoryStore()
    if kind == "sqlite":
        return SQLiteStore(url.removeprefix("sqlite:///"))
    if kind == "postgres":
        from authsessions.stores.postgres import PostgresStore

        return PostgresStore(url, **options)  # type: ignore[arg-type]
    if kind == "redis":
        from authsessions.stores.redis import RedisStore

        return RedisStore(url, **options)  # type: ignore[arg-type]
    raise ValueError(f"unknown store kind {kind!r}")


def app_from_env() -> Starlette:
    spec = json.loads(os.environ[APP_SPEC_ENV])
    variant: str = spec["variant"]
    if variant == BARE:
        return bare_app()
    if variant == NOOP_MIDDLEWARE:
        return noop_middleware_app()
    if variant == STARLETTE_COOKIE:
        return starlette_cookie_app()
    if variant == STARSESSIONS_MEMORY:
        return starsessions_app(starsessions_memory_store())
    if variant == STARSESSIONS_REDIS:
        return starsessions_app(starsessions_redis_store(spec["url"], spec["options"]["prefix"]))
    if is_ours(variant):
        kind = variant.removeprefix(OURS_PREFIX)
        return authsessions_app(store_from_spec(kind, spec["url"], spec["options"]))
    raise ValueError(f"unknown variant {variant!r}")
