"""SessionCookie.read: finding the session token among a request's cookies."""

from __future__ import annotations

import string

import pytest

from authsessions import SessionConfig
from authsessions._cookies import MALFORMED, MAX_LATER_TOKENS, SessionCookie
from authsessions._tokens import new_token

TOKEN = new_token()
OTHER_TOKEN = new_token()
NAME = SessionConfig().cookie_name
# What secrets.token_urlsafe draws from (RFC 4648's URL-safe alphabet), written out here.
URL_SAFE = (string.ascii_letters + string.digits + "-_").encode()


def read(*cookie_headers: str | bytes, name: str = NAME) -> str | None:
    headers = [(b"host", b"example.com"), (b"user-agent", b"test")]
    for value in cookie_headers:
        headers.append((b"cookie", value.encode("latin-1") if isinstance(value, str) else value))
    return SessionCookie(SessionConfig(cookie_name=name)).read({"headers": headers})


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ((f"{NAME}={TOKEN}",), TOKEN),
        ((f"theme=dark; {NAME}={TOKEN}",), TOKEN),
        ((f"theme=dark;{NAME}={TOKEN}; lang=en",), TOKEN),
        ((f"theme=dark;\t{NAME}={TOKEN}",), TOKEN),
        ((f"{NAME}= {TOKEN} ; lang=en",), TOKEN),
        ((f"{NAME}={TOKEN};lang=en",), TOKEN),
        ((f"{NAME}={TOKEN}\t; lang=en",), TOKEN),
        (("theme=dark", f"{NAME}={TOKEN}"), TOKEN),
        ((f"{NAME}={TOKEN}; {NAME}={OTHER_TOKEN}",), TOKEN),
        ((f"x{NAME}={OTHER_TOKEN}; {NAME}={TOKEN}",), TOKEN),
        ((f"a=x{NAME}={OTHER_TOKEN}; {NAME}={TOKEN}",), TOKEN),
        ((f"a=x {NAME}={OTHER_TOKEN}; {NAME}={TOKEN}",), TOKEN),
        ((f"a=x\t{NAME}={OTHER_TOKEN}; {NAME}={TOKEN}",), TOKEN),
        ((f"a=x {NAME}=junk; {NAME}={TOKEN}",), TOKEN),
        ((f"theme=dark ;  {NAME}={TOKEN}",), TOKEN),
        ((f"a=x {NAME}={TOKEN}",), None),
        ((), None),
        (("theme=dark",), None),
        ((f"x{NAME}={TOKEN}",), None),
        ((f"{NAME.lower()}={TOKEN}",), None),
        ((f"{NAME}",), None),
        ((f"{NAME}=",), MALFORMED),
        ((f"{NAME}={TOKEN}x",), MALFORMED),
        ((f"{NAME}={TOKEN[:-1]}",), MALFORMED),
        ((f"{NAME}={TOKEN[:-1]}!",), MALFORMED),
        ((f"{NAME}={TOKEN[:-1]}=",), MALFORMED),
        ((f"{NAME}={TOKEN[:-1]}\u00e9",), MALFORMED),
        ((f"{NAME}=junk; {NAME}={TOKEN}",), MALFORMED),
        ((f"{NAME}={TOKEN} {TOKEN}",), MALFORMED),
        ((f"{NAME}={TOKEN[:20]};{TOKEN[21:]}",), MALFORMED),
        ((f"{NAME}={TOKEN[:20]} {TOKEN[21:]}; lang=en",), MALFORMED),
    ],
    ids=[
        "alone",
        "after-another",
        "between-others-no-space",
        "after-a-tab",
        "spaces-around-the-value",
        "others-after-without-a-space",
        "a-tab-after-the-value",
        "second-cookie-header",
        "first-of-two-wins",
        "lookalike-name-before",
        "name-inside-another-value",
        "name-after-a-space-inside-another-value",
        "name-after-a-tab-inside-another-value",
        "malformed-after-a-space-inside-another-value",
        "spaces-around-the-semicolon",
        "name-only-inside-another-value",
        "no-cookie-header",
        "other-cookies-only",
        "lookalike-name-only",
        "name-is-case-sensitive",
        "name-without-value",
        "empty-value",
        "too-long",
        "too-short",
        "outside-the-alphabet",
        "base64-padding",
        "non-ascii",
        "first-is-malformed",
        "two-tokens-in-one-value",
        "a-semicolon-inside-a-token-long-value",
        "a-space-inside-a-token-long-value",
    ],
)
def test_the_token_is_read_from_the_first_pair_with_the_cookie_name(
    headers: tuple[str, ...], expected: str | None
) -> None:
    assert read(*headers) == expected


def test_a_custom_cookie_name_is_read_and_the_default_one_ignored() -> None:
    assert read(f"sid={TOKEN}", name="sid") == TOKEN
    assert read(f"{NAME}={TOKEN}", name="sid") is None
    assert read(f"xsid={TOKEN}; sid={OTHER_TOKEN}", name="sid") == OTHER_TOKEN


def test_raw_non_ascii_bytes_in_the_header_are_malformed_not_an_error() -> None:
    assert read(f"{NAME}=".encode() + TOKEN[:-1].encode() + b"\xff") == MALFORMED
    assert read(b"theme=\xff\xfe; " + f"{NAME}={TOKEN}".encode()) == TOKEN


@pytest.mark.parametrize("byte", [b for b in range(256) if b not in URL_SAFE])
def test_every_byte_outside_the_token_alphabet_makes_the_cookie_malformed(byte: int) -> None:
    """Checked before any store access: a near-token (a "." or "+" for "_" or "-") must not
    reach the store, whose failure would then answer 503 instead of clearing the cookie.
    """
    assert read(f"{NAME}=".encode() + TOKEN[:-1].encode() + bytes([byte])) == MALFORMED
    assert read(f"{NAME}=".encode() + bytes([byte]) + TOKEN[1:].encode()) == MALFORMED


def test_the_token_is_read_from_cookie_headers_only() -> None:
    cookie = SessionCookie(SessionConfig())
    pair = f"{NAME}={TOKEN}".encode()
    other_pair = f"{NAME}={OTHER_TOKEN}".encode()

    assert cookie.read({"headers": [(b"x-forwarded-cookie", pair)]}) is None
    assert cookie.read({"headers": [(b"referer", other_pair), (b"cookie", pair)]}) == TOKEN


def later(*cookie_headers: str) -> list[str]:
    headers = [(b"cookie", value.encode("latin-1")) for value in cookie_headers]
    cookie = SessionCookie(SessionConfig())
    tried = cookie.read({"headers": headers})
    assert tried is not None
    return cookie.later_tokens({"headers": headers}, tried)


def test_later_duplicates_are_the_well_formed_tokens_after_the_one_read_takes() -> None:
    """What the middleware tries when the first cookie of the name names no session."""
    assert later(f"{NAME}={TOKEN}") == []
    assert later(f"{NAME}=junk; {NAME}={TOKEN}") == [TOKEN]
    assert later(f"{NAME}={OTHER_TOKEN}; a=1", f"{NAME}= {TOKEN} ") == [TOKEN]
    # Not the pair read() took, not another cookie's name or value, not a malformed one.
    assert later(f"a=x {NAME}={OTHER_TOKEN}; {NAME}=junk; x{NAME}={TOKEN}; {NAME}=x") == []
    many = "; ".join(f"{NAME}={new_token()}" for _ in range(MAX_LATER_TOKENS + 5))
    assert len(later(many)) == MAX_LATER_TOKENS
