"""The session cookie: reading it from a request, writing it on a response."""

from __future__ import annotations

from starlette.types import Scope

from authsessions._config import SessionConfig
from authsessions._tokens import TOKEN_LENGTH, is_well_formed_token_bytes

__all__ = ["MALFORMED", "SessionCookie"]

_SPACE_OR_TAB = frozenset(b" \t")
_SEMICOLON = ord(";")

MAX_LATER_TOKENS = 3
"""At most this many more store reads for one request's duplicate session cookies."""

MALFORMED = ""
"""What :meth:`SessionCookie.read` returns for a cookie that is present but not a token."""


class SessionCookie:
    """Reads and writes one configured cookie; its attributes are joined once, here."""

    __slots__ = ("_attributes", "_clearing", "_prefix", "_token_end", "name")

    def __init__(self, config: SessionConfig) -> None:
        self.name = config.cookie_name
        self._prefix = f"{config.cookie_name}=".encode("ascii")
        self._token_end = len(self._prefix) + TOKEN_LENGTH
        attributes = f"; Path={config.cookie_path}"
        if config.cookie_domain is not None:
            attributes += f"; Domain={config.cookie_domain}"
        if config.cookie_http_only:
            attributes += "; HttpOnly"
        if config.cookie_secure:
            attributes += "; Secure"
        attributes += f"; SameSite={config.cookie_same_site.capitalize()}"
        self._attributes = attributes
        self._clearing = (
            f"{self.name}=; Max-Age=0; Expires=Thu, 01 Jan 1970 00:00:00 GMT{attributes}"
        ).encode("latin-1")

    def read(self, scope: Scope) -> str | None:
        """The token the request carries: ``None`` without the cookie, :data:`MALFORMED`
        when the cookie is there but is not shaped like a token (no store is asked then).
        """
        prefix, end = self._prefix, self._token_end
        for name, value in scope["headers"]:
            if name != b"cookie":
                continue
            if value.startswith(prefix) and (len(value) == end or value[end : end + 1] == b";"):
                # What a browser sends: our cookie first, the token, then nothing or ";".
                # No search and nothing to strip (a token holds no ";" and no space).
                token = value[len(prefix) : end]
            else:
                start = 0 if value.startswith(prefix) else value.find(prefix)
                while start > 0 and not _starts_a_pair(value, start):
                    start = value.find(prefix, start + 1)
                if start == -1:
                    continue
                token = value[start + len(prefix) :].partition(b";")[0].strip()
            return token.decode("ascii") if is_well_formed_token_bytes(token) else MALFORMED
        return None

    def later_tokens(self, scope: Scope, tried: str) -> list[str]:
        """The well-formed tokens of the pairs with our name but ``tried`` (the one
        :meth:`read` took), at most :data:`MAX_LATER_TOKENS`, for when that one names no
        session.

        A browser sends every cookie of the name whose Domain and Path match, longest Path
        first, then oldest (RFC 6265, 5.4): once ``cookie_domain`` or ``cookie_path`` has
        changed, the old cookie comes before the one the last login set. Only called after
        a miss, so the usual request never gets here.
        """
        name, skipped = self.name.encode("ascii"), tried.encode("ascii")
        tokens: list[str] = []
        for header_name, value in scope["headers"]:
            if header_name != b"cookie":
                continue
            for pair in value.split(b";"):
                pair_name, equals, pair_value = pair.partition(b"=")
                token = pair_value.strip()
                if (
                    equals
                    and pair_name.lstrip(b" \t") == name
                    and is_well_formed_token_bytes(token)
                    and token != skipped
                ):
                    tokens.append(token.decode("ascii"))
                    if len(tokens) == MAX_LATER_TOKENS:
                        return tokens
        return tokens

    def header(self, token: str | None, max_age: int = 0) -> bytes:
        """A ``Set-Cookie`` value carrying ``token``, or clearing the cookie when it is ``None``."""
        if token is None:
            return self._clearing
        return f"{self.name}={token}; Max-Age={max_age}{self._attributes}".encode("latin-1")


def _starts_a_pair(value: bytes, start: int) -> bool:
    """Whether the cookie name found at ``start`` begins a pair, after ``;`` and spaces.

    "a__Host-session=" is another cookie, and so is "a=x __Host-session=": browsers keep
    spaces inside a value, so a cookie any subdomain may set could carry a token there.
    """
    # Walked back, not sliced: a header of many near-miss names must not cost its square.
    index = start - 1
    while index >= 0 and value[index] in _SPACE_OR_TAB:
        index -= 1
    return index < 0 or value[index] == _SEMICOLON
