"""The error tree.

    SessionError            base; carries the HTTP ``status_code`` it renders as
    ├── Unauthorized        401: the operation needs a logged-in session
    ├── SessionNotFound     404: no such session for this user
    ├── SessionDataError    500: the app stored non-JSON or too much (a ValueError too)
    └── StoreUnavailable    503: the store could not be reached or failed

Messages say what happened and what to do; they never contain a token or a digest.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = [
    "SessionDataError",
    "SessionError",
    "SessionNotFound",
    "StoreUnavailable",
    "Unauthorized",
]


class SessionError(Exception):
    """Base class of every error this library raises on purpose.

    Uncaught in a handler, ``SessionMiddleware`` renders it as JSON
    ``{"detail": message}`` with :attr:`status_code`.
    """

    status_code: int = 500
    default_message = "Session error."

    def __init__(self, message: str | None = None) -> None:
        self.message = message or self.default_message
        super().__init__(self.message)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(status_code={self.status_code}, message={self.message!r})"


class Unauthorized(SessionError):
    """Raised when an operation needs a logged-in session and the request has none."""

    status_code = 401
    default_message = "Not authenticated: sign in first."


class SessionNotFound(SessionError):
    """Raised when a session id does not exist or belongs to another user.

    The two cases are deliberately indistinguishable, so ids cannot be probed.
    """

    status_code = 404
    default_message = "No such session."


class SessionDataError(SessionError, ValueError):
    """Raised when session data cannot be stored or read back as asked.

    Values must be plain JSON (dict with string keys, list, str, int, finite
    float, bool, None) and the whole session must fit ``max_data_bytes``.
    Status 500: it signals a bug in the app, not bad client input.
    """

    status_code = 500
    default_message = "Session data error."


class StoreUnavailable(SessionError):
    """Raised when the session store cannot be reached or fails.

    Requests fail closed: they get 503 rather than an anonymous or stale answer.
    """

    status_code = 503
    default_message = "The session store is unavailable; try again shortly."


NO_STORE = (b"cache-control", b"no-store")


def error_response(exc: SessionError, kind: str = "http") -> tuple[dict[str, Any], dict[str, Any]]:
    """The ASGI start and body messages of ``{"detail": message}`` with the error's
    status, never kept by a cache (an outage's 503 or a signed-out 401 would outlive its
    cause). ``kind`` ``"websocket.http"``: as the denial of a WebSocket's handshake.
    """
    body = json.dumps({"detail": exc.message}).encode()
    start = {
        "type": f"{kind}.response.start",
        "status": exc.status_code,
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            NO_STORE,
        ],
    }
    return start, {"type": f"{kind}.response.body", "body": body}
