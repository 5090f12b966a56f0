"""WebSockets: the session is read as the socket opens and written as it ends."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from authsessions._errors import SessionError, StoreUnavailable
from authsessions._session import SCOPE_KEY, Session

__all__ = ["HANDLER_FAILED", "serve_websocket"]

logger = logging.getLogger("authsessions")

# Close codes: 1013 "try again later" (a store that cannot be read), 1008 "policy
# violation" (a session error such as Unauthorized), 1011 "internal error".
_TRY_AGAIN_LATER = 1013
_POLICY_VIOLATION = 1008
_INTERNAL_ERROR = 1011

# Set in the scope by a framework that answers a handler's failure itself (Litestar closes
# the socket with 4500 and returns): the handler failed, though the app call ended well.
HANDLER_FAILED = "authsessions.websocket_handler_failed"


async def serve_websocket(
    app: ASGIApp, session_loading: Awaitable[Session], scope: Scope, receive: Receive, send: Send
) -> None:
    """Run ``app`` on a WebSocket with the session ``session_loading`` gives, then save
    what the handler set, unless a server error ended it while the client was there.
    """
    try:
        session = await session_loading
    except StoreUnavailable:
        await send({"type": "websocket.close", "code": _TRY_AGAIN_LATER})
        return
    scope[SCOPE_KEY] = session
    client_left = False

    async def receive_noting_departure() -> Message:
        nonlocal client_left
        message = await receive()
        if message["type"] == "websocket.disconnect":
            client_left = True
        return message

    async def send_noting_departure(message: Message) -> None:
        # A handler that only sends learns of it here: the server's send fails.
        nonlocal client_left
        try:
            await send(message)
        except OSError:
            client_left = True
            raise

    try:
        await app(scope, receive_noting_departure, send_noting_departure)
    except SessionError as exc:
        # Where an HTTP request gets a response with the error's status, the socket
        # is closed (before the handshake, refused), instead of failing the server's
        # ASGI call with a traceback.
        await _save_changes(session, save=exc.status_code < 500)
        if isinstance(exc, StoreUnavailable):
            code = _TRY_AGAIN_LATER
        elif exc.status_code >= 500:  # the app's mistake (data that cannot be stored)
            code = _INTERNAL_ERROR
            logger.error("a WebSocket handler failed: %s", exc.message)
        else:
            code = _POLICY_VIOLATION
        # A close frame's reason holds at most 123 bytes of UTF-8.
        reason = exc.message.encode()[:123].decode(errors="ignore")
        with contextlib.suppress(RuntimeError, OSError):  # the socket closed already
            await send({"type": "websocket.close", "code": code, "reason": reason})
        return
    except asyncio.CancelledError:
        # The server gave up on the task (its shutdown's grace period ran out, a timeout):
        # not the handler's failure, and the client may have been told of what it set.
        # Shielded: the cancellation may be delivered again while the store works.
        try:
            await asyncio.shield(_save_changes(session, save=True))
        except Exception as exc:  # the cancellation is the one to pass on
            logger.warning("session changes of a cancelled WebSocket were not saved: %r", exc)
        raise
    except Exception:
        if client_left:
            # The usual end of a socket, which each framework raises as an exception
            # of its own (Starlette's, Litestar's). Whatever ends the handler after it,
            # nobody is left to answer: what the handler set stays.
            await _save_changes(session, save=True)
        else:
            # Nothing is saved, and a task the handler left running may set nothing more.
            await _save_changes(session, save=False)
        raise
    # A failure the framework answered itself saves nothing, as one raised here would not.
    await _save_changes(session, save=client_left or not scope.get(HANDLER_FAILED))


async def _save_changes(session: Session, *, save: bool) -> None:
    write = session.pending_write(save=save)
    if write is not None:
        try:
            await write
        except SessionError as exc:
            # The socket is closed: nobody is left to answer, so say it in the log.
            logger.warning("session changes of a WebSocket were not saved: %s", exc.message)
