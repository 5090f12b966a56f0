"""SessionMiddleware: load the session, run the app, write what changed as the response starts."""

from __future__ import annotations

import asyncio
import hmac
import logging
import sys
import time
from collections.abc import Awaitable
from typing import Literal

from starlette.middleware.errors import ServerErrorMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from authsessions._client import device_of
from authsessions._config import SessionConfig
from authsessions._cookies import MALFORMED, SessionCookie
from authsessions._errors import NO_STORE, SessionError, StoreUnavailable, error_response
from authsessions._records import SessionRecord
from authsessions._session import SCOPE_KEY, Session
from authsessions._tokens import token_digest
from authsessions._websocket import finish_saves, serve_websocket
from authsessions.stores._base import Store
from authsessions.stores._url import resolve_store
from authsessions.stores.memory import MemoryStore

__all__ = ["SessionMiddleware", "open_at_startup"]

logger = logging.getLogger("authsessions")

_SERVER_ERROR_MIDDLEWARE_CALL = ServerErrorMiddleware.__call__.__code__

_VARY_COOKIE = (b"vary", b"Cookie")
_NO_STORE_VARY_COOKIE = [NO_STORE, _VARY_COOKIE]  # added by concatenation, never changed
_CACHING_HEADERS = frozenset({b"cache-control", b"vary"})


class SessionMiddleware:
    """Pure-ASGI middleware that gives every HTTP and WebSocket request a :class:`Session`.

    Before the app runs it reads the session cookie, checks the token's shape
    (no store access for a malformed one), loads the session by the token's
    digest and checks expiry and fingerprint. When the response starts it
    writes the changed keys or a due touch in one store update, then adds
    ``Set-Cookie``, ``Cache-Control: no-store`` and ``Vary: Cookie`` as needed.
    A request that changes nothing writes nothing (but one "last active" touch
    per ``touch_interval``), and an anonymous one gets no extra header::

        app = Starlette(routes=routes, middleware=[
            Middleware(SessionMiddleware, store="sqlite:///sessions.db"),
        ])

    Args:
        store: a :class:`~authsessions.stores.Store` (the app closes it), a
            store URL, or ``None`` for ``$AUTHSESSIONS_STORE`` or else
            ``sqlite:///sessions.db`` (the middleware closes those at shutdown). A URL
            no store takes raises its ``ValueError`` as the store opens: at startup,
            which fails, or else at the first request that needs the store.
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
        try:
            self.store, self._owns_store = resolve_store(store)
        except ValueError as exc:
            # A URL no store takes (often from the environment). Starlette and FastAPI
            # build their middleware as the server's lifespan call comes: raised here, it
            # took the app for one without lifespan support (uvicorn's "auto"), skipped
            # the app's own startup and served 500s. Opened at startup, it stops the
            # server, saying why.
            self.store, self._owns_store = _RefusedStore(exc), True
        self._cookie = SessionCookie(self.config)
        self._socket_saves: set[asyncio.Task[None]] = set()  # see serve_websocket
        # Only a store of its own can be the wrong one (see _check_placement).
        self._placement_checked = not self._owns_store

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self._placement_checked:
            self._check_placement(scope)
        if scope["type"] != "http":
            if scope["type"] == "websocket":
                loading = self._load(scope, self._cookie.read(scope))
                await serve_websocket(self.app, loading, scope, receive, send, self._socket_saves)
            elif scope["type"] == "lifespan":
                await self._lifespan(scope, receive, send)
            else:
                await self.app(scope, receive, send)
            return
        # Every request pays for this path: keep it flat and free of needless awaits.
        token = self._cookie.read(scope)
        store = self.store
        try:
            if token and store.is_open:  # a token (MALFORMED is the empty string)
                # The usual authenticated request, written out here: a coroutine of our own
                # around the store's read would cost every such request.
                now = time.time()
                digest = token_digest(token)
                record = await store.get(digest, now=now)
                if record is None:
                    session = await self._not_found(scope, token, digest, now)
                else:
                    checked = self._checked(scope, token, digest, record, now)
                    if checked is None:
                        session = await self._end_replayed(scope, record)
                    elif checked is False:
                        session = await self._not_found(scope, token, digest, now)
                    else:
                        session = checked
            elif token is None:
                session = self._anonymous(scope)
            else:
                session = await self._load(scope, token)
        except StoreUnavailable as exc:
            # Fail closed, and keep the cookie: the session may be fine once the store is back.
            await _send_error(send, exc)
            return
        scope[SCOPE_KEY] = session
        session_send = _SessionSend(self, session, send)
        try:
            await self.app(scope, receive, session_send)
        except SessionError as exc:
            if session_send.response_started:
                if session_send.answered is exc:
                    return  # answered with its status already, in a mounted app's place
                raise
            start, body = error_response(exc)
            try:
                await session_send(start)  # writes what the session owes, as for the app's
                await session_send(body)
            except (Exception, asyncio.CancelledError):
                await _end_if_unsent(session, session_send)
                raise
        except (Exception, asyncio.CancelledError):
            await _end_if_unsent(session, session_send)
            raise
        else:
            if not session_send.response_started:  # inline: every request comes here
                # An app that answered nothing: the server's own 500 carries no cookie.
                await session.end_unsent_token()

    def _check_placement(self, scope: Scope) -> None:
        """Refuse to run as a Litestar route's middleware with a store of its own.

        Litestar builds route middleware once per route, inside its router (whose
        scope names the route's handler): every instance would open a store of its
        own, and a login on one route would be unknown on the next.
        """
        if scope["type"] == "lifespan":
            return  # a lifespan never reaches route middleware
        handler = scope.get("route_handler")
        # A route that hands requests to an ASGI app of its own (Litestar's asgi(), a
        # mounted Starlette or FastAPI app) names it too: that app's own middleware is fine.
        if handler is not None and not hasattr(handler, "is_mount"):
            raise TypeError(
                "SessionMiddleware was added to a Litestar app's middleware, which Litestar "
                "builds once per route: each would open a store of its own. Use "
                "authsessions.litestar.SessionPlugin(store=...) instead."
            )
        self._placement_checked = True

    async def _load(self, scope: Scope, token: str | None) -> Session:
        """The session ``token`` (read from the cookie) names; anonymous, marked to clear the
        cookie, when it is not valid (see :meth:`_not_found` for one rotated away). Opens
        the store on first use, and only for a token: a request without one needs no store
        (unless it logs in).
        """
        if token is None:
            return self._anonymous(scope)
        now = time.time()
        if token == MALFORMED:
            return await self._not_found(scope, token, None, now)
        store = self.store
        if not store.is_open:
            await store.open()
        digest = token_digest(token)
        session = await self._named(scope, token, digest, now)
        return session if session is not None else await self._not_found(scope, token, digest, now)

    async def _named(self, scope: Scope, token: str, digest: str, now: float) -> Session | None:
        """The session ``token`` names, when it is valid for this request (anonymous, and
        the cookie cleared, when another kind of client replays it); ``None`` when it names
        no valid session."""
        record = await self.store.get(digest, now=now)
        if record is None:
            return None
        checked = self._checked(scope, token, digest, record, now)
        if checked is None:
            return await self._end_replayed(scope, record)
        return None if checked is False else checked

    async def _not_found(self, scope: Scope, token: str, digest: str | None, now: float) -> Session:
        """When ``token`` (``digest``, ``None`` when malformed) named no valid session: the
        first other session cookie of the request that names one (see
        :meth:`SessionCookie.later_tokens`; taking only the first, an old cookie left by a
        former ``cookie_domain`` or ``cookie_path`` would clear the valid one on every
        request). Else anonymous, and the cookie cleared unless one of them was rotated
        away moments ago: the browser, whose request was sent before the rotation's
        answer, may hold the new cookie already.
        """
        others = [(other, token_digest(other)) for other in self._cookie.later_tokens(scope, token)]
        store = self.store
        if others and not store.is_open:
            await store.open()
        for other, other_digest in others:
            if (session := await self._named(scope, other, other_digest, now)) is not None:
                return session
        tried = [other_digest for _, other_digest in others]
        if digest is not None:
            tried.insert(0, digest)
        for each in tried:
            if (holder := await store.rotated_away_to(each, now=now)) is not None:
                return self._spared(scope, holder)
        return self._cleared(scope)

    def _checked(
        self, scope: Scope, token: str, digest: str, record: SessionRecord, now: float
    ) -> Session | Literal[False] | None:
        """The session of ``record`` (what the store found for ``digest``) when it is valid
        for this request; ``False`` when it is not (past a ``ttl`` or ``absolute_ttl``
        shortened since the store's expiry was set): as where the store found none, a
        later cookie of the request may name the valid session (see :meth:`_not_found`);
        ``None`` when another kind of client replays the cookie (see :meth:`_end_replayed`).
        """
        config = self.config
        # The checks are written out here, not called: every authenticated request runs them.
        if (
            # The store found the row by this digest; comparing again in constant time
            # guards against a store that matches loosely (collation, prefix index).
            not hmac.compare_digest(record.token_digest, digest)
            # ttl and absolute_ttl may have been shortened since the store's expiry was set.
            or record.last_active_at + config.ttl_seconds <= now
            or (
                config.absolute_ttl_seconds is not None
                and record.created_at + config.absolute_ttl_seconds <= now
            )
        ):
            return False
        if config.validate_fingerprint and device_of(scope).fingerprint != record.fingerprint:
            return None
        return Session(self.store, config, scope, record, token, "keep")

    async def _end_replayed(self, scope: Scope, record: SessionRecord) -> Session:
        """A cookie replayed from another kind of client: end its session for good."""
        logger.warning("session %s used by a different client; ending it", record.id)
        await self.store.delete(record.id, now=time.time())
        return self._cleared(scope)

    def _anonymous(self, scope: Scope) -> Session:
        return Session(self.store, self.config, scope, None, None, "keep")

    def _spared(self, scope: Scope, holder: str) -> Session:
        """Anonymous, its token rotated away moments ago to session ``holder``: the cookie
        stays (see CookieChange)."""
        session = Session(self.store, self.config, scope, None, None, "spare")
        session._rotated_to = holder
        return session

    def _cleared(self, scope: Scope) -> Session:
        """Anonymous, and the response clears the cookie the request carried."""
        return Session(self.store, self.config, scope, None, None, "clear")

    def _with_headers(self, message: Message, session: Session) -> Message:
        """``message`` (a response start) with the session's headers added.

        A copy, never the app's own message or header list: a Response object returned
        by several handlers sends one list every time, an ASGI app may send one message
        dict every time, and a cookie added to either would go to every later caller.
        """
        # The session's state is read directly, not through properties: every response
        # with a session comes here.
        change = session._cookie_change
        if change == "keep" and session._record is None:
            return message
        sent = message.get("headers") or []
        if sent.__class__ is not list:
            sent = list(sent)  # a tuple, or any iterable, which one pass would use up
        message = {**message}
        if change == "keep" or change == "spare":
            for name, _ in sent:
                if name in _CACHING_HEADERS:
                    break
            else:
                # The usual case, a signed-in user's response without either header.
                message["headers"] = sent + _NO_STORE_VARY_COOKIE
                return message
            headers = sent.copy()
        else:
            cookie = session.cookie_token() if change == "set" else None
            set_cookie = self._cookie.header(*cookie) if cookie else self._cookie.header(None)
            headers = [*sent, (b"set-cookie", set_cookie)]
        # A shared cache must never keep a response that sets a cookie or shows a user's data.
        # Header names in ASGI messages are lower-case.
        if change != "keep" and change != "spare":  # "set" or "clear"
            # Instead of every one of the app's own: a cache may read only the first.
            headers = [header for header in headers if header[0] != b"cache-control"]
        cache_control, vary, varies = False, -1, False
        for index, (name, value) in enumerate(headers):
            if name == b"cache-control":
                cache_control = True
            elif name == b"vary":
                vary, varies = index, varies or _varies_on_cookie(value)
        if not cache_control:
            headers.append(NO_STORE)
        if vary < 0:
            headers.append(_VARY_COOKIE)
        elif not varies:
            headers[vary] = (b"vary", headers[vary][1] + b", Cookie")
        message["headers"] = headers
        return message

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        received = failure_sent = False

        async def receive_wrapper() -> Message:
            nonlocal received, failure_sent
            received = True
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self._open_at_startup(send)
                except Exception:
                    failure_sent = True
                    raise
            elif message["type"] == "lifespan.shutdown":
                await finish_saves(self._socket_saves)  # before the app closes its store
            return message

        async def send_wrapper(message: Message) -> None:
            if failure_sent and message["type"] == "lifespan.startup.failed":
                # The app answering our failure with its own: the server has ours, and
                # takes a second for a protocol error.
                return
            if message["type"].startswith("lifespan.shutdown") and self._owns_store:
                await self.store.close()
            await send(message)

        try:
            try:
                await self.app(scope, receive_wrapper, send_wrapper)
            except Exception as exc:
                # An app without lifespan support refuses the scope, naming it, before its
                # first receive (as Django's does): the middleware runs the lifespan for the
                # store it owns, which would otherwise never be closed. Any other failure
                # is the app's startup failing (Starlette builds its middleware then).
                if received or not self._owns_store or "lifespan" not in str(exc):
                    raise
                logger.info(
                    "the app refused the lifespan (%s): the session store opens at startup "
                    "and closes at shutdown all the same",
                    exc,
                )
                await self._run_lifespan_alone(receive, send)
        finally:
            if self._owns_store:  # no shutdown comes after the app's own startup failed
                await self.store.close()

    async def _open_at_startup(self, send: Send) -> None:
        try:
            await open_at_startup(self.store)
        except Exception as exc:
            # A store no retry mends (a malformed URL, an option the server refuses, a
            # newer schema): the server stops, saying why. Raised alone, it took the app
            # for one without lifespan support (uvicorn's "auto"), skipped the app's own
            # startup and served 500s.
            failed = f"the session store could not be opened: {exc}"
            await send({"type": "lifespan.startup.failed", "message": failed})
            raise

    async def _run_lifespan_alone(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await self._open_at_startup(send)
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                try:
                    await finish_saves(self._socket_saves)
                    await self.store.close()
                except Exception as exc:
                    failed = f"the session store could not be closed: {exc}"
                    await send({"type": "lifespan.shutdown.failed", "message": failed})
                    raise
                await send({"type": "lifespan.shutdown.complete"})
                return


class _SessionSend:
    """The ``send`` the app gets: when the response starts, it writes what the session
    owes and adds the session's headers.

    A plain callable that hands back the server's own awaitable, not a coroutine
    function: a message with nothing to add costs a call, not a coroutine.
    """

    __slots__ = (
        "_middleware",
        "_send",
        "_session",
        "answered",
        "replaced_by_error",
        "response_started",
    )

    def __init__(self, middleware: SessionMiddleware, session: Session, send: Send) -> None:
        self._middleware = middleware
        self._session = session
        self._send = send
        self.response_started = False
        self.replaced_by_error = False
        self.answered: SessionError | None = None

    def __call__(self, message: Message) -> Awaitable[None]:
        if self.replaced_by_error:
            return _nothing()  # the app's response was replaced by an error response
        if message["type"] != "http.response.start" or self.response_started:
            # A second start (an app's error handler after its response began) is the
            # server's to refuse: the first carried what the session owed.
            return self._send(message)
        if (
            message["status"] == 500
            and isinstance(error := sys.exc_info()[1], SessionError)
            and self.answered is None
            and _sent_by_starlettes_error_middleware()
        ):
            # The error middleware of a Starlette or FastAPI app inside this one (mounted,
            # or wrapped from outside), answering one of ours with its 500 page before it
            # raises it on: the error's own answer instead, as where no such middleware
            # stands between. An app's own handler of the error answers as it likes.
            return self._answer(error)
        self.response_started = True
        session = self._session
        if session._record is None and session._cookie_change == "keep":
            session._flushed = True  # a login from now on could not send its cookie
            return self._send(message)  # nothing to write, no header to add
        failed = message["status"] >= 500
        if (
            failed
            and session._cookie_change == "set"
            and not isinstance(sys.exc_info()[1], SessionError)
        ):
            # An error page answered inside this middleware (a framework's own, Litestar's
            # always) after a login or rotation: as where the error reaches us, no page of
            # a failure signs the client in, and the new token's session ends. A
            # SessionError's own answer (ours, or a framework's handler of it) carries the
            # new token: the store holds its session.
            return self._start_after(session.end_unsent_token(), message)
        write = session.pending_write(save=not failed)
        if write is not None:
            return self._start_after(write, message)
        return self._send(self._middleware._with_headers(message, session))

    async def _answer(self, error: SessionError) -> None:
        start, body = error_response(error)
        self.answered = error
        await self(start)  # the session's write and headers, as for an error raised to us
        if not self.replaced_by_error:  # else that write failed, and was answered
            await self._send(body)
        self.replaced_by_error = True  # the mounted app's page goes nowhere

    async def _start_after(self, write: Awaitable[None], message: Message) -> None:
        try:
            await write
        except SessionError as exc:
            # Answer here instead of raising into the app: its own error handlers
            # would see a started response and send a bare 500.
            self.replaced_by_error = True
            start, body = error_response(exc)
            await self._send(self._middleware._with_headers(start, self._session))
            await self._send(body)
            return
        except BaseException:
            # Cancelled (a timeout, a client gone) while the store worked: nothing reached
            # the server, so a new token was never sent either (see end_unsent_token).
            self.response_started = False
            raise
        await self._send(self._middleware._with_headers(message, self._session))


async def open_at_startup(store: Store) -> None:
    """Open ``store`` as the app starts; if it is down, say so and start all the same:
    requests retry the store and get 503 until it opens (a crash loop would serve none).
    """
    try:
        await store.open()
    except SessionError as exc:
        logger.error(
            "could not open the session store at startup (%s); "
            "requests will retry and get 503 until it opens",
            exc,
        )


class _RefusedStore(MemoryStore):
    """Stands for a store URL the middleware refused: opening it raises the refusal."""

    def __init__(self, refusal: ValueError) -> None:
        super().__init__()
        self._refusal = refusal

    def __repr__(self) -> str:
        return f"<refused store URL: {self._refusal}>"

    async def _open(self) -> None:
        raise ValueError(*self._refusal.args)


async def _end_if_unsent(session: Session, session_send: _SessionSend) -> None:
    """When no response started: end the session of a new token that none will carry. An
    error page built outside the middleware carries no cookie, and a cancelled request (a
    timeout, a client gone) sends none at all."""
    if not session_send.response_started:
        await session.end_unsent_token()


async def _nothing() -> None:
    pass


def _sent_by_starlettes_error_middleware() -> bool:
    """Whether the exception being handled was caught in Starlette's ServerErrorMiddleware
    (the first frame of its traceback), which sends its 500 page and then raises it on."""
    traceback = sys.exc_info()[2]
    return traceback is not None and traceback.tb_frame.f_code is _SERVER_ERROR_MIDDLEWARE_CALL


async def _send_error(send: Send, exc: SessionError) -> None:
    for message in error_response(exc):
        await send(message)


def _varies_on_cookie(vary: bytes) -> bool:
    return any(field.strip().lower() in (b"cookie", b"*") for field in vary.split(b","))
