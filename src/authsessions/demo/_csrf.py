"""Cross-site request forgery defence for every form the demo posts.

Two kinds of form, two kinds of token, one check (``hmac.compare_digest``):

* Signed in: a random token kept in the session's data under ``"csrf"``,
  created at sign-in. A forged request from another site carries the session
  cookie but cannot read the page, so it cannot know the token.

* Signed out (sign in, sign up): there is no session to hold a token, yet
  these forms need one too: a forged sign-in could log the victim into the
  attacker's account ("login CSRF"). They use a *signed double-submit cookie*:
  the browser gets a random nonce in an HttpOnly cookie, and the form carries
  HMAC(server secret, nonce). A plain double-submit cookie (the same value in
  cookie and form) falls to anyone who can plant a cookie, e.g. from a sibling
  subdomain or over plain HTTP; planting one is useless here, since the
  matching form value needs the server's secret. The secret lives in process
  memory, so restarting the demo only invalidates sign-in forms left open.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

from starlette.requests import Request
from starlette.responses import Response

from authsessions import Session

__all__ = ["FORM_FIELD", "CsrfGuard"]

FORM_FIELD = "csrf_token"
SESSION_KEY = "csrf"
COOKIE_NAME = "authsessions_demo_csrf"
_NONCE = re.compile(r"[A-Za-z0-9_-]{43}")


class CsrfGuard:
    """Issues and checks the demo's CSRF tokens.

    Args:
        secret: the HMAC key for signed-out forms; at least 32 random bytes.
        secure_cookie: mark the nonce cookie ``Secure`` (HTTPS deployments).
    """

    def __init__(self, secret: bytes, *, secure_cookie: bool) -> None:
        if len(secret) < 32:
            raise ValueError("the CSRF secret needs at least 32 bytes.")
        self._secret = secret
        self._secure_cookie = secure_cookie

    # -- signed in -------------------------------------------------------------------

    @staticmethod
    def issue_session_token(session: Session) -> str:
        """Give the session a fresh token (at sign-in) and return it."""
        token = secrets.token_urlsafe(32)
        session.set(SESSION_KEY, token)
        return token

    @classmethod
    def session_token(cls, session: Session) -> str:
        """The session's token; issued now if the session has none yet."""
        return session.get(SESSION_KEY, type=str) or cls.issue_session_token(session)

    @staticmethod
    def check_session(session: Session, submitted: str) -> bool:
        """Whether ``submitted`` is this session's token."""
        expected = session.get(SESSION_KEY, type=str)
        if not expected:
            return False
        return hmac.compare_digest(expected.encode(), submitted.encode())

    # -- signed out -------------------------------------------------------------------

    def anonymous_token(self, request: Request) -> tuple[str, str | None]:
        """The form token for a signed-out form, and a nonce to set as cookie (``None``: keep).

        The browser's nonce is reused while it is well formed, so two open
        tabs with sign-in forms both stay valid.
        """
        nonce = request.cookies.get(COOKIE_NAME, "")
        if _NONCE.fullmatch(nonce):
            return self._sign(nonce), None
        nonce = secrets.token_urlsafe(32)
        return self._sign(nonce), nonce

    def set_nonce_cookie(self, response: Response, nonce: str | None) -> None:
        """Send the nonce from :meth:`anonymous_token`, when it is new."""
        if nonce is not None:
            response.set_cookie(
                COOKIE_NAME,
                nonce,
                httponly=True,
                samesite="strict",
                secure=self._secure_cookie,
                path="/",
            )

    def check_anonymous(self, request: Request, submitted: str) -> bool:
        """Whether ``submitted`` is the signature of the nonce in the browser's cookie."""
        nonce = request.cookies.get(COOKIE_NAME, "")
        if not _NONCE.fullmatch(nonce):
            return False
        return hmac.compare_digest(self._sign(nonce).encode(), submitted.encode())

    def _sign(self, nonce: str) -> str:
        # Domain-separated, so this MAC can never be mistaken for another use of the key.
        message = b"authsessions-demo signed-out form\x00" + nonce.encode()
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()
