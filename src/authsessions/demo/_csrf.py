"""Cross-site request forgery defence for every form the demo posts.

Two kinds of form, two kinds of token, one check (``hmac.compare_digest``):

* Signed in: a random token kept in the session's data under ``"csrf"``,
  created at sign-in. A forged request from another site carries the session
  cookie but cannot read the page, so it cannot know the token.

* Signed out (sign in, sign up): there is no session to hold a token, yet
  these forms need one too: a forged sign-in could log the victim into the
  attacker's account ("login CSRF"). They use a *signed double-submit cookie*:
  the browser gets a random nonce in an HttpOnly cookie, and the form carries
  HMAC(server secret, nonce). The pair is tied to nothing about the victim,
  though: an attacker can fetch one from the demo himself, and whoever can
  plant a cookie in the victim's browser (a sibling subdomain, a man in the
  middle of plain HTTP) can have it submit his sign-in. Over HTTPS the nonce
  cookie is named ``__Host-...``, which browsers accept from this very host
  over HTTPS only; over plain HTTP nothing stops the planting.

So every post passes a check first (:meth:`CsrfGuard.same_origin`): what the
browser says of where the request comes from. A post whose ``Sec-Fetch-Site``
is not ``same-origin`` (or ``none``: the user's own doing), or whose
``Origin`` is not this site's, is refused. Pages cannot set these headers,
and every current browser sends ``Origin`` with a post; a client that sends
neither is no victim's browser. The secret lives in process memory, so
restarting the demo only invalidates sign-in forms left open.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import Response

from authsessions import Session

__all__ = ["FORM_FIELD", "CsrfGuard"]

FORM_FIELD = "csrf_token"
SESSION_KEY = "csrf"
COOKIE_NAME = "authsessions_demo_csrf"
_NONCE = re.compile(r"[A-Za-z0-9_-]{43}")
# Sec-Fetch-Site of a post from one of the demo's own pages, or of the user's own doing.
_OWN_SITE = frozenset({"same-origin", "none"})


class CsrfGuard:
    """Issues and checks the demo's CSRF tokens.

    Args:
        secret: the HMAC key for signed-out forms; at least 32 random bytes.
        secure_cookie: mark the nonce cookie ``Secure`` and name it ``__Host-...``
            (HTTPS deployments).
    """

    def __init__(self, secret: bytes, *, secure_cookie: bool) -> None:
        if len(secret) < 32:
            raise ValueError("the CSRF secret needs at least 32 bytes.")
        self._secret = secret
        self._secure_cookie = secure_cookie
        self._cookie_name = f"__Host-{COOKIE_NAME}" if secure_cookie else COOKIE_NAME

    # -- every post --------------------------------------------------------------------

    @staticmethod
    def same_origin(request: Request) -> bool:
        """Whether nothing the browser says puts the request's origin elsewhere.

        ``Sec-Fetch-Site``, when sent, settles it: the browser knows where the
        page came from, whatever a proxy did to the host and scheme the server
        sees. Without it, ``Origin`` must name the URL the server saw (scheme
        and host in any case, a default port spelt out or not), so behind a
        proxy a browser that sends only ``Origin`` needs the server told the
        host and scheme (uvicorn's ``--proxy-headers``).
        """
        site = request.headers.get("sec-fetch-site")
        if site is not None:
            return site in _OWN_SITE
        origin = request.headers.get("origin")
        if origin is None:
            return True
        # "null" is refused: a sandboxed frame's, or a cross-site redirect's.
        url = request.url
        try:
            parts = urlsplit(origin)
            return _origin(parts.scheme, parts.hostname, parts.port) == _origin(
                url.scheme, url.hostname, url.port
            )
        except ValueError:  # a port that is no number, a bracket left open ("http://[::1")
            return False

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

    def check_session(self, request: Request, session: Session, submitted: str) -> bool:
        """Whether a post comes from the site (:meth:`same_origin`) with ``submitted``,
        this session's token.
        """
        expected = session.get(SESSION_KEY, type=str)
        if not expected or not self.same_origin(request):
            return False
        return hmac.compare_digest(expected.encode(), submitted.encode())

    # -- signed out -------------------------------------------------------------------

    def anonymous_token(self, request: Request) -> tuple[str, str | None]:
        """The form token for a signed-out form, and a nonce to set as cookie (``None``: keep).

        The browser's nonce is reused while it is well formed, so two open
        tabs with sign-in forms both stay valid.
        """
        nonce = request.cookies.get(self._cookie_name, "")
        if _NONCE.fullmatch(nonce):
            return self._sign(nonce), None
        nonce = secrets.token_urlsafe(32)
        return self._sign(nonce), nonce

    def set_nonce_cookie(self, response: Response, nonce: str | None) -> None:
        """Send the nonce from :meth:`anonymous_token`, when it is new."""
        if nonce is not None:
            response.set_cookie(
                self._cookie_name,
                nonce,
                httponly=True,
                samesite="strict",
                secure=self._secure_cookie,
                path="/",
            )

    def check_anonymous(self, request: Request, submitted: str) -> bool:
        """Whether a post comes from the site (:meth:`same_origin`) with ``submitted``, the
        signature of the nonce in the browser's cookie.
        """
        nonce = request.cookies.get(self._cookie_name, "")
        if not _NONCE.fullmatch(nonce) or not self.same_origin(request):
            return False
        return hmac.compare_digest(self._sign(nonce).encode(), submitted.encode())

    def _sign(self, nonce: str) -> str:
        # Domain-separated, so this MAC can never be mistaken for another use of the key.
        message = b"authsessions-demo signed-out form\x00" + nonce.encode()
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()


_DEFAULT_PORTS = {"http": 80, "https": 443}


def _origin(scheme: str, host: str | None, port: int | None) -> tuple[str, str, int | None]:
    scheme = scheme.lower()
    return scheme, (host or "").lower(), port if port is not None else _DEFAULT_PORTS.get(scheme)
