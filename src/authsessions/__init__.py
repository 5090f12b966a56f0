"""authsessions: server-side, database-backed, authenticated sessions for ASGI apps.

::

    from authsessions import Session, SessionMiddleware

    app = Starlette(routes=routes, middleware=[Middleware(SessionMiddleware)])

    async def login(request):
        await Session.from_request(request).authenticate(user_id)
"""

from authsessions._config import SessionConfig
from authsessions._errors import (
    SessionDataError,
    SessionError,
    SessionNotFound,
    StoreUnavailable,
    Unauthorized,
)
from authsessions._manager import SessionManager
from authsessions._middleware import SessionMiddleware
from authsessions._records import SessionData
from authsessions._session import Session

__version__ = "0.1.0"

__all__ = [
    "Session",
    "SessionConfig",
    "SessionData",
    "SessionDataError",
    "SessionError",
    "SessionManager",
    "SessionMiddleware",
    "SessionNotFound",
    "StoreUnavailable",
    "Unauthorized",
]

for _name in __all__:
    globals()[_name].__module__ = "authsessions"
del _name
