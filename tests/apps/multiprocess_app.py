"""A tiny app that tests/test_many_processes.py runs in several uvicorn processes at once.

Its store comes from the ``AUTHSESSIONS_STORE`` environment variable, as in a
deployment. It serves plain HTTP on loopback, so the cookie is a plain,
non-Secure ``session`` cookie.
"""

from __future__ import annotations

import asyncio
import os

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from authsessions import Session, SessionConfig, SessionMiddleware

COOKIE = "session"
CONFIG = SessionConfig(cookie_secure=False, cookie_name=COOKIE)


async def health(request: Request) -> Response:
    return JSONResponse({"pid": os.getpid()})


async def login(request: Request) -> Response:
    """``POST /login?user=<id>``: signs the user in and sets the cookie."""
    session = Session.from_request(request)
    await session.authenticate(request.query_params["user"])
    return JSONResponse({"user_id": session.user_id, "pid": os.getpid()})


async def me(request: Request) -> Response:
    """The signed-in user; 401 without a valid session."""
    session = Session.from_request(request)
    if not session.is_authenticated:
        return JSONResponse({"user_id": None, "pid": os.getpid()}, status_code=401)
    return JSONResponse({"user_id": session.user_id, "pid": os.getpid()})


async def note(request: Request) -> Response:
    """``POST /note?text=<text>[&seconds=<s>]``: keeps the text in the session (a write,
    made as the response starts, after waiting ``seconds``).
    """
    session = Session.from_request(request)
    if not session.is_authenticated:
        return JSONResponse({"pid": os.getpid()}, status_code=401)
    session.set("note", request.query_params["text"])
    await asyncio.sleep(float(request.query_params.get("seconds", "0")))
    return JSONResponse({"pid": os.getpid()})


async def logout(request: Request) -> Response:
    """Ends this session, on every process."""
    await Session.from_request(request).logout()
    return JSONResponse({"pid": os.getpid()})


async def logout_all(request: Request) -> Response:
    """Ends every session of the signed-in user, on every process."""
    await Session.from_request(request).logout_all()
    return JSONResponse({"pid": os.getpid()})


app = Starlette(
    routes=[
        Route("/health", health),
        Route("/login", login, methods=["POST"]),
        Route("/me", me),
        Route("/note", note, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/logout-all", logout_all, methods=["POST"]),
    ],
    # No store argument: the middleware reads AUTHSESSIONS_STORE.
    middleware=[Middleware(SessionMiddleware, config=CONFIG)],
)
