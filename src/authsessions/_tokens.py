"""Tokens, their digests and session ids.

The browser holds a token; the store only ever sees its SHA-256 digest, so a
leaked database cannot be replayed as cookies. Session ids are public handles
for "manage my devices" and are unrelated to the token.
"""

from __future__ import annotations

import hashlib
import re
import secrets

TOKEN_BYTES = 32
SESSION_ID_BYTES = 16

_TOKEN_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-"
# token_urlsafe(n) yields ceil(n * 4 / 3) characters of the URL-safe alphabet, unpadded.
TOKEN_LENGTH = 43
# Maps every byte of the alphabet to 0 and every other byte to 1: a token translates to zeros.
_OUTSIDE_ALPHABET = bytes(0 if byte in _TOKEN_ALPHABET else 1 for byte in range(256))
_ALL_INSIDE = bytes(TOKEN_LENGTH)
_SESSION_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{22}")


def new_token() -> str:
    """A fresh cookie token with 256 bits from the OS's CSPRNG."""
    return secrets.token_urlsafe(TOKEN_BYTES)


def new_session_id() -> str:
    """A fresh public session id with 128 bits of randomness.

    Never starting with "-", so it can be pasted after a command (``authsessions
    revoke ID``) without being read as an option.
    """
    while True:
        session_id = secrets.token_urlsafe(SESSION_ID_BYTES)
        if not session_id.startswith("-"):
            return session_id


# Copied for each digest, not built: building one looks SHA-256 up in OpenSSL each time,
# which the copy skips. Never updated itself, so copies from any thread are alike.
_EMPTY_SHA256 = hashlib.sha256()


def token_digest(token: str) -> str:
    """The hex SHA-256 digest under which a token's session is stored."""
    digest = _EMPTY_SHA256.copy()
    digest.update(token.encode("ascii"))
    return digest.hexdigest()


def is_well_formed_token_bytes(value: bytes) -> bool:
    """Whether a raw header value has the exact shape of a token, before any decoding
    (checked before any store access)."""
    # A plain table lookup per byte: cheaper than deleting the alphabet, which builds a table.
    return len(value) == TOKEN_LENGTH and value.translate(_OUTSIDE_ALPHABET) == _ALL_INSIDE


def is_well_formed_session_id(value: object) -> bool:
    """Whether ``value`` has the exact shape of a session id."""
    return isinstance(value, str) and _SESSION_ID_PATTERN.fullmatch(value) is not None
