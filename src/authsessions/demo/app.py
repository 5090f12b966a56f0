"""The demo app: sign up, sign in, a profile kept in session data, and "Your devices".

Every page renders without JavaScript; every form posts with a CSRF token
(see ``_csrf.py``) and answers with a redirect, so reloading never re-posts.
"""

from __future__ import annotations

import os
import secrets
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jinja2
from argon2 import PasswordHasher
from starlette.applications import Starlette
from starlette.datastructures import FormData
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from authsessions import (
    Session,
    SessionConfig,
    SessionMiddleware,
    SessionNotFound,
    StoreUnavailable,
    Unauthorized,
)
from authsessions._humanize import format_utc, time_ago
from authsessions.demo._csrf import FORM_FIELD, CsrfGuard
from authsessions.demo._users import (
    USERNAME_RULE,
    AccountsUnavailable,
    SignupError,
    User,
    UserStore,
)
from authsessions.stores import SQLiteStore
from authsessions.stores._url import DEFAULT_STORE_URL, STORE_URL_ENV, open_store

__all__ = ["create_app", "users_path_for"]

HERE = Path(__file__).parent
USERS_FILE = "demo-users.db"
THEMES = ("light", "dark")

# Outcomes of a form post, named in the redirect's query string so the page after
# it can say what happened without storing anything.
NOTICES = {
    "signed-up": "Welcome! Your account is ready and you are signed in.",
    "signed-out": "You are signed out.",
    "signed-out-everywhere": "You are signed out on every device.",
    "theme-saved": "Theme saved in your session.",
    "theme-unknown": "There is no such theme; yours is as it was.",
    "revoked": "That device is signed out.",
    "already-ended": "That session had already ended.",
    "others-signed-out": "Every other device is signed out.",
    "rotated": "Your session token was replaced; the old one no longer works.",
    "session-ended": "Your session had ended (signed out from another device?); sign in again.",
}

# Pages are plain HTML with one same-origin stylesheet, so the policy can be strict.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}


def users_path_for(store_url: str) -> str:
    """Where the demo keeps accounts: beside a SQLite sessions file, else in the working dir."""
    store = open_store(store_url)  # its own reading of the URL (percent-decoded)
    if isinstance(store, SQLiteStore):
        return os.path.join(os.path.dirname(store.path), USERS_FILE)
    return USERS_FILE


def create_app(
    store_url: str | None = None,
    *,
    secure_cookies: bool = False,
    users_path: str | os.PathLike[str] | None = None,
    csrf_secret: bytes | None = None,
    password_hasher: PasswordHasher | None = None,
) -> Starlette:
    """Build the demo app over the session store at ``store_url``.

    Args:
        store_url: a store URL; ``$AUTHSESSIONS_STORE`` or ``sqlite:///sessions.db``
            when ``None``.
        secure_cookies: send cookies with ``Secure``; only when served over HTTPS.
        users_path: the accounts file; ``demo-users.db`` beside a SQLite sessions
            file (else in the working directory) when ``None``.
        csrf_secret: the HMAC key for signed-out forms; random per process when ``None``.
        password_hasher: argon2 settings; argon2-cffi's defaults when ``None``
            (tests pass cheaper ones).

    Raises:
        ValueError: ``store_url`` is not a store URL.
    """
    url = store_url or os.environ.get(STORE_URL_ENV) or DEFAULT_STORE_URL
    # Starlette builds its middleware (and so the store) on the app's first call: check the
    # URL here, so that a bad one is this ValueError, not a 500 on every page. The store
    # built for the check connects to nothing and is dropped.
    open_store(url)
    # The demo serves plain HTTP on localhost, where browsers drop Secure cookies and
    # __Host- names; production must keep SessionConfig's defaults (Secure, __Host-session).
    config = (
        SessionConfig()
        if secure_cookies
        else SessionConfig(cookie_secure=False, cookie_name="authsessions_demo")
    )
    demo = _Demo(
        users=UserStore(
            users_path if users_path is not None else users_path_for(url), hasher=password_hasher
        ),
        csrf=CsrfGuard(csrf_secret or secrets.token_bytes(32), secure_cookie=secure_cookies),
    )
    routes = [
        Route("/", demo.home, name="home"),
        Route("/signup", demo.signup_page, name="signup"),
        Route("/signup", demo.signup, methods=["POST"]),
        Route("/signin", demo.signin_page, name="signin"),
        Route("/signin", demo.signin, methods=["POST"]),
        Route("/signout", demo.signout, methods=["POST"], name="signout"),
        Route("/profile", demo.profile_page, name="profile"),
        Route("/profile", demo.save_theme, methods=["POST"]),
        Route("/devices", demo.devices_page, name="devices"),
        Route("/devices/revoke", demo.revoke, methods=["POST"], name="revoke"),
        Route("/devices/others", demo.logout_other, methods=["POST"], name="logout_other"),
        Route("/devices/all", demo.logout_all, methods=["POST"], name="logout_all"),
        Route("/devices/rotate", demo.rotate, methods=["POST"], name="rotate"),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    return Starlette(
        routes=routes,
        middleware=[Middleware(SessionMiddleware, store=url, config=config)],
        # Pages, not the library's JSON: a session ended by another device while this
        # request ran, or a store that is down.
        exception_handlers={
            Unauthorized: demo.session_ended,
            StoreUnavailable: demo.unavailable,
            AccountsUnavailable: demo.unavailable,
        },
    )


def _redirect(path: str, notice: str | None = None) -> RedirectResponse:
    # 303 turns the POST into a GET, so reloading the next page never re-submits.
    return RedirectResponse(f"{path}?notice={notice}" if notice else path, status_code=303)


def _field(form: FormData, name: str) -> str:
    value = form.get(name)
    return value if isinstance(value, str) else ""


class _Demo:
    """The demo's endpoints, sharing the account store, CSRF guard and templates."""

    def __init__(self, *, users: UserStore, csrf: CsrfGuard) -> None:
        self.users = users
        self.csrf = csrf
        env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(HERE / "templates"),
            autoescape=True,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        env.filters["ago"] = time_ago
        env.filters["utc"] = format_utc
        self.templates = Jinja2Templates(env=env)

    # -- rendering ---------------------------------------------------------------------

    def _page(
        self, request: Request, template: str, status_code: int = 200, **context: Any
    ) -> Response:
        session = Session.from_request(request)
        notice = NOTICES.get(request.query_params.get("notice", ""))
        context = {"notice": notice, "error": None, "theme": "light", **context}
        if session.is_authenticated:
            theme = session.get("theme", type=str)
            context.update(
                username=session.get("username", type=str) or session.user_id,
                user_id=session.user_id,
                theme=theme if theme in THEMES else "light",
                csrf_token=self.csrf.session_token(session),
            )
        return self.templates.TemplateResponse(
            request, template, context, status_code=status_code, headers=SECURITY_HEADERS
        )

    def _anonymous_form(
        self, request: Request, template: str, status_code: int = 200, **context: Any
    ) -> Response:
        token, new_nonce = self.csrf.anonymous_token(request)
        response = self._page(request, template, status_code, form_token=token, **context)
        self.csrf.set_nonce_cookie(response, new_nonce)
        return response

    def _forbidden(self, request: Request) -> Response:
        return self._page(request, "forbidden.html", status_code=403)

    def _unavailable_page(self, request: Request, message: str | None = None) -> Response:
        # Rendered without the session: showing it signed in would set its CSRF token, a
        # write to the store that just failed.
        context = {"notice": None, "error": None, "theme": "light", "message": message}
        return self.templates.TemplateResponse(
            request,
            "unavailable.html",
            context,
            status_code=503,
            headers={**SECURITY_HEADERS, "Retry-After": "5"},
        )

    async def unavailable(self, request: Request, exc: Exception) -> Response:
        return self._unavailable_page(request)

    async def session_ended(self, request: Request, exc: Exception) -> Response:
        return _redirect("/signin", "session-ended")

    async def _form(self, request: Request) -> FormData:
        # A handful of short fields at most: refuse uploads and long field lists outright.
        return await request.form(max_files=0, max_fields=10)

    # -- signed out --------------------------------------------------------------------

    async def home(self, request: Request) -> Response:
        signed_in = Session.from_request(request).is_authenticated
        return _redirect("/profile" if signed_in else "/signin")

    async def signin_page(self, request: Request) -> Response:
        if Session.from_request(request).is_authenticated:
            return _redirect("/profile")
        return self._anonymous_form(request, "signin.html", username="")

    async def signup_page(self, request: Request) -> Response:
        if Session.from_request(request).is_authenticated:
            return _redirect("/profile")
        return self._anonymous_form(request, "signup.html", username="", rule=USERNAME_RULE)

    async def signin(self, request: Request) -> Response:
        form = await self._form(request)
        if not self.csrf.check_anonymous(request, _field(form, FORM_FIELD)):
            return self._forbidden(request)
        username = _field(form, "username")
        user = await self.users.authenticate(username, _field(form, "password"))
        if user is None:
            # One message for an unknown name and a wrong password: no probing for accounts.
            return self._anonymous_form(
                request,
                "signin.html",
                status_code=400,
                username=username,
                error="Wrong username or password.",
            )
        await self._start_session(request, user)
        return _redirect("/profile")

    async def signup(self, request: Request) -> Response:
        form = await self._form(request)
        if not self.csrf.check_anonymous(request, _field(form, FORM_FIELD)):
            return self._forbidden(request)
        username = _field(form, "username")
        password = _field(form, "password")
        try:
            if password != _field(form, "password_again"):
                raise SignupError("The two passwords differ; type the same one twice.")
            user = await self.users.create(username, password)
        except SignupError as exc:
            return self._anonymous_form(
                request,
                "signup.html",
                status_code=400,
                username=username,
                rule=USERNAME_RULE,
                error=str(exc),
            )
        try:
            await self._start_session(request, user)
        except StoreUnavailable:
            return self._unavailable_page(
                request,
                "Your account was created, but you could not be signed in. "
                "Sign in with it in a moment.",
            )
        return _redirect("/profile", "signed-up")

    async def _start_session(self, request: Request, user: User) -> None:
        session = Session.from_request(request)
        # authenticate() ends any session this browser had and issues a fresh token,
        # so a token planted before sign-in is worthless after it (session fixation).
        await session.authenticate(user.id)
        session.set("username", user.username)
        self.csrf.issue_session_token(session)

    # -- signed in ---------------------------------------------------------------------

    async def _signed_in_form(self, request: Request) -> tuple[Session, FormData] | Response:
        """The session and form of a signed-in post, or the response refusing it."""
        session = Session.from_request(request)
        if not session.is_authenticated:
            return _redirect("/signin")
        form = await self._form(request)
        if not self.csrf.check_session(request, session, _field(form, FORM_FIELD)):
            return self._forbidden(request)
        return session, form

    async def signout(self, request: Request) -> Response:
        checked = await self._signed_in_form(request)
        if isinstance(checked, Response):
            return checked
        await checked[0].logout()
        return _redirect("/signin", "signed-out")

    async def profile_page(self, request: Request) -> Response:
        current = Session.from_request(request).current()
        if current is None:
            return _redirect("/signin")
        return self._page(request, "profile.html", current=current, themes=THEMES)

    async def save_theme(self, request: Request) -> Response:
        checked = await self._signed_in_form(request)
        if isinstance(checked, Response):
            return checked
        session, form = checked
        theme = _field(form, "theme")
        if theme not in THEMES:
            return _redirect("/profile", "theme-unknown")
        session.set("theme", theme)
        return _redirect("/profile", "theme-saved")

    async def devices_page(self, request: Request) -> Response:
        session = Session.from_request(request)
        if not session.is_authenticated:
            return _redirect("/signin")
        sessions = await session.list_my_sessions()
        return self._page(request, "devices.html", sessions=sessions, now=datetime.now(UTC))

    async def revoke(self, request: Request) -> Response:
        checked = await self._signed_in_form(request)
        if isinstance(checked, Response):
            return checked
        session, form = checked
        try:
            await session.revoke(_field(form, "session_id"))
        except SessionNotFound:
            return _redirect("/devices", "already-ended")
        if not session.is_authenticated:  # this device revoked itself
            return _redirect("/signin", "signed-out")
        return _redirect("/devices", "revoked")

    async def logout_other(self, request: Request) -> Response:
        checked = await self._signed_in_form(request)
        if isinstance(checked, Response):
            return checked
        await checked[0].logout_other()
        return _redirect("/devices", "others-signed-out")

    async def logout_all(self, request: Request) -> Response:
        checked = await self._signed_in_form(request)
        if isinstance(checked, Response):
            return checked
        await checked[0].logout_all()
        return _redirect("/signin", "signed-out-everywhere")

    async def rotate(self, request: Request) -> Response:
        checked = await self._signed_in_form(request)
        if isinstance(checked, Response):
            return checked
        await checked[0].rotate()
        return _redirect("/devices", "rotated")
