"""FastAPI integration: the session as a dependency.

::

    from authsessions.fastapi import CurrentSession

    @app.get("/me")
    async def me(session: CurrentSession):
        if not session.is_authenticated:
            raise HTTPException(401)
        return {"user": session.user_id}
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends
from starlette.requests import HTTPConnection

from authsessions._errors import Unauthorized
from authsessions._session import Session

__all__ = ["CurrentSession", "RequiredSession", "get_session", "require_session"]


# Both are coroutine functions though they never await: FastAPI runs a plain ``def``
# dependency in its thread pool, a hop that cost more than the request's own work.


async def get_session(connection: HTTPConnection) -> Session:
    """The request's :class:`Session` (HTTP or WebSocket).

    Raises:
        RuntimeError: ``SessionMiddleware`` is not installed.
    """
    return Session.from_scope(connection.scope)


async def require_session(session: Annotated[Session, Depends(get_session)]) -> Session:
    """The request's session, or 401 when nobody is signed in.

    Built on :func:`get_session`, so a test's ``app.dependency_overrides[get_session]``
    serves both.

    Raises:
        Unauthorized: there is no valid session.
    """
    if not session.is_authenticated:
        raise Unauthorized()
    return session


CurrentSession = Annotated[Session, Depends(get_session)]
"""The current session, signed in or not."""

RequiredSession = Annotated[Session, Depends(require_session)]
"""The current session; the route answers 401 when nobody is signed in."""
