"""WebSockets: the session is read as the socket opens and written as it ends."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable
from typing import cast

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from authsessions._errors import SessionError, StoreUnavailable, error_response
from authsessions._session import SCOPE_KEY, Session

__all__ = ["HANDLER_FAILED", "finish_saves", "serve_websocket", "session_error_in"]

logger = logging.getLogger("authsessions")

# Close codes: 1013 "try again later" (a store that cannot be read), 1008 "policy
# violation" (a session error such as Unauthorized), 1011 "internal error".
_TRY_AGAIN_LATER = 1013
_POLICY_VIOLATION = 1008
_INTERNAL_ERROR = 1011

# Set in the scope by a framework that answers a handler's failure itself (Litestar closes
# the socket with 4500 and returns): the handler failed, though the app call ended well.
HANDLER_FAILED = "authsessions.websocket_handler_failed"

# The ASGI extension with which a server lets the app deny a handshake with an HTTP
# response of its own, instead of the server's bare 403.
_DENIAL_RESPONSE = "websocket.http.response"


async def serve_websocket(
    app: ASGIApp,
    session_loading: Awaitable[Session],
    scope: Scope,
    receive: Receive,
    send: Send,
    saves: set[asyncio.Task[None]],
) -> None:
    """Run ``app`` on a WebSocket with the session ``session_loading`` gives, then save
    what the handler set, unless a server error ended it while the client was there.

    A save runs as a task of its own, added to ``saves`` until it is done: a server
    cancelling the handler (its shutdown) does not cancel it, and the middleware waits
    for it before the store closes.
    """
    try:
        session = await session_loading
    except StoreUnavailable as exc:
        await _refuse(scope, send, exc, accepted=False)
        return
    scope[SCOPE_KEY] = session
    client_left = accepted = False

    async def receive_noting_departure() -> Message:
        nonlocal client_left
        message = await receive()
        if message["type"] == "websocket.disconnect":
            client_left = True
        return message

    async def send_noting_departure(message: Message) -> None:
        # A handler that only sends learns of it here: the server's send fails.
        nonlocal client_left, accepted
        try:
            await send(message)
        except OSError:
            client_left = True
            raise
        if message["type"] == "websocket.accept":
            accepted = True

    try:
        await app(scope, receive_noting_departure, send_noting_departure)
    except (SessionError, BaseExceptionGroup) as raised:
        error = session_error_in(raised)
        if error is None:  # a task group's failures, not all of them session errors
            # A group (a SessionError is its own error). A cancellation among its failures
            # is the server's, as below: what was set stays.
            group = cast("BaseExceptionGroup[BaseException]", raised)
            cancelled = group.split(asyncio.CancelledError)[0] is not None
            await _save_changes(session, saves, save=client_left or cancelled)
            raise
        # Where an HTTP request gets a response with the error's status, the socket
        # is closed (before the handshake, refused), instead of failing the server's
        # ASGI call with a traceback. After the client left, what was set stays, as
        # whatever else ends the handler then.
        await _save_changes(session, saves, save=client_left or error.status_code < 500)
        if error.status_code >= 500 and not isinstance(error, StoreUnavailable):
            logger.error("a WebSocket handler failed: %s", error.message)  # the app's mistake
        await _refuse(scope, send, error, accepted=accepted)
        return
    except asyncio.CancelledError:
        # The server gave up on the task (its shutdown's grace period ran out, a timeout):
        # not the handler's failure, and the client may have been told of what it set.
        await _save_changes(session, saves, save=True)
        raise
    except Exception:
        # After the client left: the usual end of a socket, which each framework raises as
        # an exception of its own (Starlette's, Litestar's). Whatever ends the handler
        # after it, nobody is left to answer: what the handler set stays. Else nothing is
        # saved, and a task the handler left running may set nothing more.
        await _save_changes(session, saves, save=client_left)
        raise
    # A failure the framework answered itself saves nothing, as one raised here would not.
    await _save_changes(session, saves, save=client_left or not scope.get(HANDLER_FAILED))


def session_error_in(raised: BaseException) -> SessionError | None:
    """The :class:`SessionError` ``raised`` is, or the first of a group (as a task group
    raises) that holds nothing else; else ``None``."""
    if isinstance(raised, SessionError):
        return raised
    if not isinstance(raised, BaseExceptionGroup):
        return None
    session_errors, others = raised.split(SessionError)
    if session_errors is None or others is not None:
        return None
    first: BaseException = session_errors
    while isinstance(first, BaseExceptionGroup):
        first = first.exceptions[0]
    assert isinstance(first, SessionError)  # split() left nothing else
    return first


async def _refuse(scope: Scope, send: Send, error: SessionError, *, accepted: bool) -> None:
    """Close the socket for ``error``; before the handshake, deny it with the error's own
    HTTP response where the server lets the app (else the server answers 403)."""
    with contextlib.suppress(RuntimeError, OSError):  # the socket closed already
        if not accepted and _DENIAL_RESPONSE in (scope.get("extensions") or {}):
            for message in error_response(error, kind="websocket.http"):
                await send(message)
            return
        if isinstance(error, StoreUnavailable):
            code = _TRY_AGAIN_LATER
        elif error.status_code >= 500:
            code = _INTERNAL_ERROR
        else:
            code = _POLICY_VIOLATION
        # A close frame's reason holds at most 123 bytes of UTF-8.
        reason = error.message.encode()[:123].decode(errors="ignore")
        await send({"type": "websocket.close", "code": code, "reason": reason})


async def _save_changes(session: Session, saves: set[asyncio.Task[None]], *, save: bool) -> None:
    write = session.pending_write(save=save)
    if write is None:
        return
    saving = asyncio.ensure_future(_logging_failure(write))
    saves.add(saving)
    saving.add_done_callback(saves.discard)
    # Shielded: the server's cancellation (its shutdown) may arrive while the store works,
    # and the save must go on; the middleware waits for it before the store closes.
    await asyncio.shield(saving)


async def finish_saves(saves: set[asyncio.Task[None]]) -> None:
    """Wait for the saves of WebSockets the server cancelled as it shuts down: to be
    called before the store closes."""
    if saves:
        await asyncio.wait(set(saves))


async def _logging_failure(write: Awaitable[None]) -> None:
    try:
        await write
    except Exception as exc:
        # The socket is closed: nobody is left to answer, so say it in the log.
        detail = exc.message if isinstance(exc, SessionError) else repr(exc)
        logger.warning("session changes of a WebSocket were not saved: %s", detail)
