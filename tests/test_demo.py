"""The demo app (``authsessions.demo``) driven over ASGI, as two browsers would."""

from __future__ import annotations

import asyncio
import os
import re
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, closing
from pathlib import Path
from typing import Literal

import httpx
import pytest
from argon2 import PasswordHasher
from starlette.applications import Starlette
from starlette.types import Message

from authsessions.demo._csrf import CsrfGuard
from authsessions.demo.app import NOTICES, create_app, users_path_for

DESKTOP_UA = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 "
    "(KHTML, like Gecko) Chrome/124.0.0.0 Safari/537.36"
)
PHONE_UA = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/17.4 Mobile/15E148 Safari/604.1"
)
PASSWORD = "correct horse battery"
COOKIE = "authsessions_demo"
NONCE_COOKIE = "authsessions_demo_csrf"
# argon2's defaults take about half a second here; the tests only need a real argon2 hash.
FAST_HASHER = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
_TOKEN = re.compile(r'name="csrf_token" value="([^"]+)"')


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    """Run the app's ASGI lifespan as a server would, so the middleware closes its store."""
    to_app: asyncio.Queue[Message] = asyncio.Queue()
    from_app: asyncio.Queue[Message] = asyncio.Queue()
    scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    task = asyncio.create_task(app(scope, to_app.get, from_app.put))
    await to_app.put({"type": "lifespan.startup"})
    assert (await from_app.get())["type"] == "lifespan.startup.complete"
    try:
        yield
    finally:
        await to_app.put({"type": "lifespan.shutdown"})
        assert (await from_app.get())["type"] == "lifespan.shutdown.complete"
        await task


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[Starlette]:
    app = create_app(f"sqlite:///{tmp_path / 'sessions.db'}", password_hasher=FAST_HASHER)
    async with lifespan(app):
        yield app


def browser(
    app: Starlette, user_agent: str = DESKTOP_UA, base_url: str = "http://demo.test"
) -> httpx.AsyncClient:
    """A client keeping cookies, like one browser (one device)."""
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app, client=("203.0.113.7", 50000)),
        base_url=base_url,
        headers={"user-agent": user_agent},
    )


@pytest.fixture
async def desktop(app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    async with browser(app) as client:
        yield client


@pytest.fixture
async def phone(app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    async with browser(app, PHONE_UA) as client:
        yield client


async def csrf_token(client: httpx.AsyncClient, path: str) -> str:
    """The CSRF token in the forms of the page at ``path``."""
    page = await client.get(path)
    assert page.status_code == 200, page.text
    match = _TOKEN.search(page.text)
    assert match, f"no CSRF token on {path}"
    return match.group(1)


async def post_form(
    client: httpx.AsyncClient, page: str, action: str, **fields: str
) -> httpx.Response:
    """Submit a form of ``page`` to ``action``, with the token that page carries."""
    return await client.post(action, data={"csrf_token": await csrf_token(client, page), **fields})


async def sign_up(client: httpx.AsyncClient, username: str = "alice") -> httpx.Response:
    return await post_form(
        client,
        "/signup",
        "/signup",
        username=username,
        password=PASSWORD,
        password_again=PASSWORD,
    )


async def sign_in(
    client: httpx.AsyncClient, username: str = "alice", password: str = PASSWORD
) -> httpx.Response:
    return await post_form(client, "/signin", "/signin", username=username, password=password)


def account_fields(action: str, username: str) -> dict[str, str]:
    """The fields that open ``username``'s account through ``action``: sign in or sign up."""
    fields = {"username": username, "password": PASSWORD}
    return {**fields, "password_again": PASSWORD} if action == "/signup" else fields


def cookie_attributes(response: httpx.Response, name: str) -> set[str]:
    """The attributes of the cookie ``name`` that ``response`` sets, lower-cased."""
    (set_cookie,) = (
        header
        for header in response.headers.get_list("set-cookie")
        if header.startswith(f"{name}=")
    )
    return {attribute.strip().lower() for attribute in set_cookie.split(";")[1:]}


def stored_hash(users: Path, username: str) -> str:
    """The password hash the demo's accounts file holds for ``username``."""
    with closing(sqlite3.connect(users)) as db:
        row = db.execute(
            "SELECT password_hash FROM demo_user WHERE username = ?", (username,)
        ).fetchone()
    return str(row[0])


async def test_sign_up_signs_in_and_shows_the_profile(desktop: httpx.AsyncClient) -> None:
    response = await sign_up(desktop, "Alice")
    assert response.status_code == 303
    assert response.headers["location"] == "/profile?notice=signed-up"
    set_cookie = response.headers["set-cookie"]
    assert set_cookie.startswith(f"{COOKIE}=")
    assert "httponly" in set_cookie.lower()
    assert "secure" not in set_cookie.lower()  # the demo serves plain HTTP on purpose

    profile = await desktop.get("/profile")
    assert profile.status_code == 200
    assert "Hello, alice" in profile.text
    assert "This session started" in profile.text
    assert "It expires" in profile.text
    assert "in 30 days" in profile.text
    assert "Chrome on Windows" in profile.text


async def test_sign_in_after_sign_out(desktop: httpx.AsyncClient) -> None:
    await sign_up(desktop)
    signed_out = await post_form(desktop, "/profile", "/signout")
    assert signed_out.headers["location"] == "/signin?notice=signed-out"
    assert (await desktop.get("/profile")).headers["location"] == "/signin"

    response = await sign_in(desktop, "ALICE ")  # usernames ignore case and spaces
    assert response.status_code == 303
    assert response.headers["location"] == "/profile"
    assert "Hello, alice" in (await desktop.get("/profile")).text


async def test_wrong_password_and_unknown_user_get_the_same_error(
    desktop: httpx.AsyncClient, phone: httpx.AsyncClient
) -> None:
    await sign_up(desktop)
    wrong_password = await sign_in(phone, "alice", "not the password")
    unknown_user = await sign_in(phone, "mallory", PASSWORD)
    for response in (wrong_password, unknown_user):
        assert response.status_code == 400
        assert "Wrong username or password." in response.text
        assert COOKIE not in response.cookies
    assert (await phone.get("/profile")).headers["location"] == "/signin"


async def test_sign_up_refuses_taken_names_and_mismatched_passwords(
    desktop: httpx.AsyncClient, phone: httpx.AsyncClient
) -> None:
    await sign_up(desktop)
    taken = await sign_up(phone, "alice")
    assert taken.status_code == 400
    assert "That username is taken" in taken.text
    mismatched = await post_form(
        phone, "/signup", "/signup", username="bob", password=PASSWORD, password_again="other"
    )
    assert mismatched.status_code == 400
    assert "The two passwords differ" in mismatched.text
    short = await post_form(
        phone, "/signup", "/signup", username="bob", password="short", password_again="short"
    )
    assert "Choose a password" in short.text


@pytest.mark.parametrize(
    ("username", "password", "error"),
    [
        ("ab", PASSWORD, "Choose a username of 3 to 32 characters"),
        ("a" * 33, PASSWORD, "Choose a username of 3 to 32 characters"),
        ("alice", "p" * 7, "Choose a password of 8 to 256 characters."),
        # argon2 hashes any length; the cap keeps a huge "password" from costing more.
        ("alice", "p" * 257, "Choose a password of 8 to 256 characters."),
    ],
    ids=["name of 2", "name of 33", "password of 7", "password of 257"],
)
async def test_sign_up_refuses_names_and_passwords_past_the_limits(
    desktop: httpx.AsyncClient, username: str, password: str, error: str
) -> None:
    response = await post_form(
        desktop, "/signup", "/signup", username=username, password=password, password_again=password
    )
    assert response.status_code == 400
    assert error in response.text
    assert COOKIE not in response.cookies


@pytest.mark.parametrize(
    ("username", "password"),
    [("abc", PASSWORD), ("a" * 32, PASSWORD), ("alice", "p" * 8), ("alice", "p" * 256)],
    ids=["name of 3", "name of 32", "password of 8", "password of 256"],
)
async def test_sign_up_accepts_names_and_passwords_at_the_limits(
    desktop: httpx.AsyncClient, username: str, password: str
) -> None:
    response = await post_form(
        desktop, "/signup", "/signup", username=username, password=password, password_again=password
    )
    assert response.status_code == 303
    assert COOKIE in response.cookies


# Sign-up signs in too: a forged sign-up form would log the victim into an account the attacker
# named and knows the password of, as surely as a forged sign-in form.
SIGNED_OUT_FORMS = ["/signin", "/signup"]


@pytest.mark.parametrize("action", SIGNED_OUT_FORMS)
async def test_login_csrf_missing_or_forged_token_is_refused(
    desktop: httpx.AsyncClient, action: str
) -> None:
    """A forged sign-in or sign-up form would log the victim into the attacker's account."""
    await sign_up(desktop)
    await post_form(desktop, "/profile", "/signout")
    await desktop.get(action)  # the browser now holds a nonce cookie
    # The account the post would open: alice's own, or a new one (alice is taken).
    account = account_fields(action, "alice" if action == "/signin" else "bob")
    for fields in ({}, {"csrf_token": "forged"}):
        response = await desktop.post(action, data={**account, **fields})
        assert response.status_code == 403
        assert "That form was refused" in response.text
        assert COOKIE not in response.cookies


@pytest.mark.parametrize("action", SIGNED_OUT_FORMS)
async def test_login_csrf_planted_cookie_without_the_secret_is_refused(
    app: Starlette, tmp_path: Path, action: str
) -> None:
    """A planted nonce needs the token this demo signs for it: another key's is refused."""
    async with browser(app) as victim:
        token = await csrf_token(victim, action)
        nonce = "A" * 43  # the attacker's planted nonce, with a token signed by another key
        other = create_app(f"sqlite:///{tmp_path / 'other.db'}", password_hasher=FAST_HASHER)
        async with lifespan(other), browser(other) as attacker:
            attacker.cookies.set(NONCE_COOKIE, nonce)
            forged = await csrf_token(attacker, action)
        victim.cookies.set(NONCE_COOKIE, nonce)
        for submitted in (forged, token):
            response = await victim.post(action, data={"csrf_token": submitted})
            assert response.status_code == 403


# What a browser sends with a form posted from another site's page: not every browser sends
# Sec-Fetch-Site, and "null" is the Origin of a sandboxed frame.
CROSS_SITE_POSTS = [
    {"origin": "https://evil.test", "sec-fetch-site": "cross-site"},
    {"origin": "https://evil.test"},
    {"origin": "null"},
    {"sec-fetch-site": "cross-site"},
    {"origin": "http://sub.demo.test", "sec-fetch-site": "same-site"},  # a sibling subdomain
    # Another port is another origin: whatever else listens on this host.
    {"origin": "http://demo.test:8080"},
    # A port that is no number names no origin, so not this one.
    {"origin": "http://demo.test:abc"},
]
OWN_PAGE_POST = {"origin": "http://demo.test", "sec-fetch-site": "same-origin"}


@pytest.mark.parametrize("action", SIGNED_OUT_FORMS)
@pytest.mark.parametrize("headers", CROSS_SITE_POSTS)
async def test_login_csrf_with_a_pair_from_the_demo_itself_is_refused(
    app: Starlette, headers: dict[str, str], action: str
) -> None:
    """The token is tied to nothing about the victim: the attacker fetches a nonce and its
    token from the demo, plants the nonce cookie in the victim's browser (a sibling
    subdomain can) and has it post his sign-in from his page. What gives him away is
    where the browser says the post comes from.
    """
    async with browser(app) as attacker:
        await sign_up(attacker, "mallory")
        attacker.cookies.clear()
        token = await csrf_token(attacker, action)
        nonce = attacker.cookies[NONCE_COOKIE]
    async with browser(app) as victim:
        victim.cookies.set(NONCE_COOKIE, nonce)
        # His account, or through sign-up a new one he names (mallory is taken).
        username = "mallory" if action == "/signin" else "mallory2"
        fields = {"csrf_token": token, **account_fields(action, username)}

        forged = await victim.post(action, data=fields, headers=headers)
        after_forged = await victim.get("/profile")
        own_page = await victim.post(action, data=fields, headers=OWN_PAGE_POST)

    assert forged.status_code == 403
    assert COOKIE not in forged.cookies
    assert after_forged.headers["location"] == "/signin"
    assert own_page.status_code == 303  # the same pair, posted from the demo's own page


# What a browser sends with a form posted from the demo's own page behind a proxy.
OWN_PAGE_POSTS_BEHIND_A_PROXY = [
    # TLS ended at a proxy that did not pass the scheme on: the browser still knows.
    {"origin": "https://demo.test", "sec-fetch-site": "same-origin"},
    # A proxy that passed its own host name on (nginx's default Host $proxy_host).
    {"origin": "http://demo.example", "sec-fetch-site": "same-origin"},
    # A browser without Sec-Fetch-Site: the origin as written, its default port spelt out.
    {"origin": "HTTP://Demo.Test:80"},
]
# A post the user started himself, not any page (no page can make a browser send this).
USERS_OWN_POST = {"sec-fetch-site": "none"}


@pytest.mark.parametrize(
    ("headers", "accepted"),
    [(headers, False) for headers in CROSS_SITE_POSTS[:2]]
    + [(headers, True) for headers in [*OWN_PAGE_POSTS_BEHIND_A_PROXY, USERS_OWN_POST]],
)
async def test_a_signed_in_form_is_taken_from_the_demos_own_page_only(
    desktop: httpx.AsyncClient, headers: dict[str, str], accepted: bool
) -> None:
    await sign_up(desktop)
    token = await csrf_token(desktop, "/profile")

    posted = await desktop.post(
        "/profile", data={"csrf_token": token, "theme": "dark"}, headers=headers
    )

    assert posted.status_code == (303 if accepted else 403)
    theme = "theme-dark" if accepted else "theme-light"
    assert theme in (await desktop.get("/profile")).text


async def test_over_https_the_nonce_cookie_is_host_prefixed(tmp_path: Path) -> None:
    """``__Host-``: a cookie only this host can set, over HTTPS, so none can be planted."""
    app = create_app(
        f"sqlite:///{tmp_path / 'sessions.db'}", secure_cookies=True, password_hasher=FAST_HASHER
    )
    async with lifespan(app), browser(app, base_url="https://demo.test") as client:
        page = await client.get("/signup")
        signed_up = await sign_up(client)
        profile = await client.get("/profile")

    nonce_cookie = page.headers["set-cookie"]
    assert nonce_cookie.startswith("__Host-authsessions_demo_csrf=")
    assert {"secure", "path=/"} <= {a.strip().lower() for a in nonce_cookie.split(";")}
    assert "domain" not in nonce_cookie.lower()
    assert signed_up.status_code == 303
    assert "Hello, alice" in profile.text


async def test_the_nonce_cookie_is_hidden_from_scripts_and_other_sites(
    desktop: httpx.AsyncClient,
) -> None:
    """HttpOnly: no script in the page reads the nonce. SameSite=Strict: no post from another
    site carries it, a second line behind the origin check. Path=/: every form sees it.
    """
    page = await desktop.get("/signin")
    assert {"httponly", "samesite=strict", "path=/"} <= cookie_attributes(page, NONCE_COOKIE)


async def test_a_malformed_nonce_cookie_is_replaced(desktop: httpx.AsyncClient) -> None:
    """A nonce the demo never issued (a mangled or planted cookie) can never pass the check:
    signed and kept, it would leave that browser unable to sign up or in at all.
    """
    # Kept where the demo's own nonce is, so the nonce the reply sets replaces it.
    desktop.cookies.set(NONCE_COOKIE, "x", domain="demo.test")
    page = await desktop.get("/signup")
    assert page.cookies.get(NONCE_COOKIE) not in (None, "x")
    assert (await sign_up(desktop)).status_code == 303


@pytest.mark.parametrize("store_url", ["nosuch://x", "no scheme", "sqlite:///s.db?timeout=3"])
def test_a_bad_store_url_is_refused_when_the_app_is_built(store_url: str) -> None:
    """Starlette builds middleware, and so the store, on the app's first call: unchecked,
    a bad URL gave an app whose every page answered 500."""
    with pytest.raises(ValueError, match="URL"):
        create_app(store_url, password_hasher=FAST_HASHER)


def test_the_csrf_secret_needs_32_bytes() -> None:
    # The HMAC-SHA256 key of the signed-out forms: a shorter key is weaker than the MAC.
    with pytest.raises(ValueError, match="at least 32 bytes"):
        CsrfGuard(b"k" * 31, secure_cookie=False)
    CsrfGuard(b"k" * 32, secure_cookie=False)


async def test_signed_in_forms_need_the_session_token(
    desktop: httpx.AsyncClient, phone: httpx.AsyncClient
) -> None:
    await sign_up(desktop)
    await sign_in(phone)
    # The phone's token is valid for the phone's session only.
    phone_token = await csrf_token(phone, "/profile")
    for fields in ({}, {"csrf_token": phone_token}):
        response = await desktop.post("/profile", data={"theme": "dark", **fields})
        assert response.status_code == 403
    for action in ("/devices/all", "/devices/others", "/devices/rotate", "/signout"):
        assert (await desktop.post(action, data={"csrf_token": "x"})).status_code == 403
    assert "theme-light" in (await desktop.get("/profile")).text
    assert len(re.findall(r'class="device[ "]', (await phone.get("/devices")).text)) == 2


async def test_theme_persists_in_session_data(
    desktop: httpx.AsyncClient, phone: httpx.AsyncClient
) -> None:
    await sign_up(desktop)
    await sign_in(phone)
    saved = await post_form(desktop, "/profile", "/profile", theme="dark")
    assert saved.headers["location"] == "/profile?notice=theme-saved"
    assert 'class="theme-dark"' in (await desktop.get("/devices")).text
    assert 'class="theme-dark"' in (await desktop.get("/profile")).text
    # The theme lives in one session's data: the other device keeps its own.
    assert 'class="theme-light"' in (await phone.get("/profile")).text
    # Not a theme: refused, and said so.
    refused = await post_form(desktop, "/profile", "/profile", theme="<script>")
    assert refused.headers["location"] == "/profile?notice=theme-unknown"
    assert "There is no such theme" in (await desktop.get(refused.headers["location"])).text
    assert 'class="theme-dark"' in (await desktop.get("/profile")).text


async def test_devices_page_lists_both_clients(
    desktop: httpx.AsyncClient, phone: httpx.AsyncClient
) -> None:
    await sign_up(desktop)
    await sign_in(phone)
    page = (await desktop.get("/devices")).text
    assert "Chrome on Windows" in page
    assert "Safari on iOS" in page
    assert page.count("This device") == 1
    assert "203.0.113.7" in page
    assert "last active just now" in page
    assert "active now" in page
    assert page.count(">Revoke</button>") == 1  # on the other device only


async def listed_device_id(client: httpx.AsyncClient, *, current: bool) -> str:
    """The session id /devices shows for this device, or for the one other device."""
    page = (await client.get("/devices")).text
    kind = "device current" if current else "device"
    (session_id,) = re.findall(rf'<li class="{kind}" data-session-id="([^"]+)"', page)
    return str(session_id)


async def revoke(client: httpx.AsyncClient, session_id: str) -> httpx.Response:
    return await post_form(client, "/devices", "/devices/revoke", session_id=session_id)


async def test_revoking_this_devices_own_session_signs_it_out(
    desktop: httpx.AsyncClient,
) -> None:
    # The page has no button for it, but the id is on the page and a post may name it.
    await sign_up(desktop)
    own_id = await listed_device_id(desktop, current=True)
    response = await revoke(desktop, own_id)
    assert response.headers["location"] == "/signin?notice=signed-out"
    assert (await desktop.get("/profile")).headers["location"] == "/signin"


async def test_revoke_signs_the_other_device_out(
    desktop: httpx.AsyncClient, phone: httpx.AsyncClient
) -> None:
    await sign_up(desktop)
    await sign_in(phone)
    phone_id = await listed_device_id(desktop, current=False)
    response = await revoke(desktop, phone_id)
    assert response.headers["location"] == "/devices?notice=revoked"
    assert (await phone.get("/profile")).headers["location"] == "/signin"
    assert (await desktop.get("/profile")).status_code == 200
    again = await revoke(desktop, phone_id)
    assert again.headers["location"] == "/devices?notice=already-ended"


async def test_rotate_replaces_the_token(desktop: httpx.AsyncClient, app: Starlette) -> None:
    await sign_up(desktop)
    old_token = desktop.cookies[COOKIE]
    response = await post_form(desktop, "/devices", "/devices/rotate")
    assert response.headers["location"] == "/devices?notice=rotated"
    assert desktop.cookies[COOKIE] != old_token
    assert (await desktop.get("/profile")).status_code == 200
    async with browser(app) as thief:
        thief.cookies.set(COOKIE, old_token)
        assert (await thief.get("/profile")).headers["location"] == "/signin"


async def test_sign_out_everywhere_else_keeps_this_device(
    desktop: httpx.AsyncClient, phone: httpx.AsyncClient
) -> None:
    await sign_up(desktop)
    await sign_in(phone)
    response = await post_form(desktop, "/devices", "/devices/others")
    assert response.headers["location"] == "/devices?notice=others-signed-out"
    assert (await desktop.get("/profile")).status_code == 200
    assert (await phone.get("/profile")).headers["location"] == "/signin"


async def test_sign_out_everywhere(desktop: httpx.AsyncClient, phone: httpx.AsyncClient) -> None:
    await sign_up(desktop)
    await sign_in(phone)
    response = await post_form(phone, "/devices", "/devices/all")
    assert response.headers["location"] == "/signin?notice=signed-out-everywhere"
    for client in (desktop, phone):
        assert (await client.get("/devices")).headers["location"] == "/signin"


async def test_signed_out_visitors_are_sent_to_sign_in(desktop: httpx.AsyncClient) -> None:
    for path in ("/", "/profile", "/devices"):
        response = await desktop.get(path)
        assert response.status_code == 303
        assert response.headers["location"] == "/signin"
    # A signed-out post is not a forgery worth a 403: there is nothing to act on.
    assert (await desktop.post("/devices/all")).headers["location"] == "/signin"


async def test_signed_in_visitors_are_sent_from_the_signed_out_forms_to_the_profile(
    desktop: httpx.AsyncClient,
) -> None:
    await sign_up(desktop)
    for path in SIGNED_OUT_FORMS:
        response = await desktop.get(path)
        assert response.status_code == 303
        assert response.headers["location"] == "/profile"


@pytest.mark.parametrize("extra", ["a file", "eleven fields"])
async def test_sign_in_refuses_uploads_and_long_field_lists(
    desktop: httpx.AsyncClient, phone: httpx.AsyncClient, extra: str
) -> None:
    """The forms have a handful of short fields: more, or any file, is refused outright."""
    await sign_up(desktop)
    token = await csrf_token(phone, "/signin")
    fields = {"csrf_token": token, "username": "alice", "password": PASSWORD}
    if extra == "a file":
        refused = await phone.post("/signin", data=fields, files={"avatar": ("a.png", b"PNG")})
    else:
        padding = {f"extra{n}": "x" for n in range(8)}  # 11 fields in all
        refused = await phone.post("/signin", data={**fields, **padding})
    assert refused.status_code == 400
    assert COOKIE not in refused.cookies
    # The same credentials alone sign in.
    assert (await phone.post("/signin", data=fields)).status_code == 303


async def test_pages_carry_security_headers_and_the_stylesheet(
    desktop: httpx.AsyncClient,
) -> None:
    page = await desktop.get("/signin")
    assert "form-action 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-content-type-options"] == "nosniff"
    assert '<link rel="stylesheet" href="/static/demo.css">' in page.text
    css = await desktop.get("/static/demo.css")
    assert css.status_code == 200
    assert css.headers["content-type"].startswith("text/css")


# The store reads a URL's scheme in any case: the accounts file must follow it.
# Its path percent-decoded, as the store reads it.
@pytest.mark.parametrize(
    ("store_url", "folder"),
    [
        ("sqlite:///var/sessions.db", "var"),
        ("SQLite:///var/sessions.db", "var"),
        ("sqlite:///my%20var/sessions.db", "my var"),
    ],
)
def test_accounts_are_kept_beside_a_sqlite_sessions_file(store_url: str, folder: str) -> None:
    assert users_path_for(store_url) == os.path.join(folder, "demo-users.db")


def test_accounts_of_other_stores_are_kept_in_the_working_directory() -> None:
    assert users_path_for("redis://localhost:6379/0") == "demo-users.db"


class CountingHasher(PasswordHasher):
    """The tests' fast argon2 settings, counting the verifications made."""

    def __init__(self) -> None:
        super().__init__(time_cost=1, memory_cost=1024, parallelism=1)
        self.verifications = 0

    def verify(self, hash: str | bytes, password: str | bytes) -> Literal[True]:
        self.verifications += 1
        return super().verify(hash, password)


async def test_an_unknown_name_costs_a_verification_like_a_wrong_password(
    tmp_path: Path,
) -> None:
    """Else the time a failed sign-in takes would tell which usernames have accounts."""
    hasher = CountingHasher()
    app = create_app(f"sqlite:///{tmp_path / 'sessions.db'}", password_hasher=hasher)
    # A wrong password, an unknown name, and a password longer than any account's (checked
    # against the dummy hash, not alice's).
    attempts = [("alice", "not the password"), ("mallory", PASSWORD), ("alice", "p" * 257)]
    verifications = []
    async with lifespan(app), browser(app) as desktop, browser(app) as phone:
        await sign_up(desktop)
        for username, password in attempts:
            before = hasher.verifications
            assert (await sign_in(phone, username, password)).status_code == 400
            verifications.append(hasher.verifications - before)
    assert verifications == [1, 1, 1]


async def test_signing_in_upgrades_a_hash_made_with_weaker_settings(tmp_path: Path) -> None:
    """Raised argon2 settings reach each account at its next sign-in, the only moment the
    password is at hand.
    """
    sessions = f"sqlite:///{tmp_path / 'sessions.db'}"
    users = tmp_path / "users.db"
    stronger = PasswordHasher(time_cost=2, memory_cost=2048, parallelism=1)
    before = create_app(sessions, users_path=users, password_hasher=FAST_HASHER)
    async with lifespan(before), browser(before) as client:
        await sign_up(client)
    assert stronger.check_needs_rehash(stored_hash(users, "alice"))

    after = create_app(sessions, users_path=users, password_hasher=stronger)
    async with lifespan(after), browser(after) as client:
        assert (await sign_in(client)).status_code == 303

    upgraded = stored_hash(users, "alice")
    assert not stronger.check_needs_rehash(upgraded)
    assert stronger.verify(upgraded, PASSWORD)


# -- failures get pages ---------------------------------------------------------------------


@pytest.mark.parametrize("page", ["/signin", "/profile"])
async def test_a_malformed_origin_is_refused_not_a_server_error(
    desktop: httpx.AsyncClient, page: str
) -> None:
    await sign_up(desktop, "origin-user")
    if page == "/signin":
        await post_form(desktop, "/profile", "/signout")
    token = await csrf_token(desktop, page)
    fields = account_fields("/signin", "origin-user") if page == "/signin" else {"theme": "dark"}

    posted = await desktop.post(
        page, data={"csrf_token": token, **fields}, headers={"origin": "http://[::1"}
    )

    assert posted.status_code == 403
    assert "That form was refused" in posted.text


def replace_with_a_folder(path: str) -> None:
    """A file SQLite cannot open in its place."""
    Path(path).unlink(missing_ok=True)
    Path(path).mkdir()


async def test_an_accounts_file_that_cannot_be_opened_gets_a_page(
    app: Starlette, desktop: httpx.AsyncClient, tmp_path: Path
) -> None:
    """It was a bare 500 and a traceback."""
    token = await csrf_token(desktop, "/signin")
    replace_with_a_folder(users_path_for(f"sqlite:///{tmp_path / 'sessions.db'}"))

    posted = await desktop.post(
        "/signin", data={"csrf_token": token, **account_fields("/signin", "alice")}
    )

    assert posted.status_code == 503
    assert posted.headers["content-type"].startswith("text/html")
    assert "Try again in a moment" in posted.text


async def test_a_sign_up_whose_session_cannot_be_made_says_the_account_exists(
    desktop: httpx.AsyncClient, tmp_path: Path
) -> None:
    """It answered the library's JSON 503, and a second try said the name was taken."""
    with closing(sqlite3.connect(tmp_path / "sessions.db")) as db, db:
        db.execute("ALTER TABLE authsessions_session RENAME TO moved_away")
    try:
        failed = await sign_up(desktop, "bob")
    finally:
        with closing(sqlite3.connect(tmp_path / "sessions.db")) as db, db:
            db.execute("ALTER TABLE moved_away RENAME TO authsessions_session")

    assert failed.status_code == 503
    assert "Your account was created, but you could not be signed in." in failed.text
    assert (await sign_in(desktop, "bob")).headers["location"] == "/profile"


async def test_a_form_of_a_session_another_device_ends_meanwhile_sends_to_sign_in(
    desktop: httpx.AsyncClient, phone: httpx.AsyncClient
) -> None:
    """The session was loaded and the form's token checked, then the other device signed
    everyone out before this one acted on it: a JSON 401, where a page belongs."""
    await sign_up(desktop, "carol")
    await sign_in(phone, "carol")
    token = await csrf_token(desktop, "/devices")

    async def body_sent_in_two_parts() -> AsyncIterator[bytes]:
        yield b"csrf_token="
        ended = await post_form(phone, "/devices", "/devices/all")  # the session loaded
        assert ended.headers["location"] == "/signin?notice=signed-out-everywhere"
        yield token.encode()

    posted = await desktop.post(
        "/devices/others",
        content=body_sent_in_two_parts(),
        headers={"content-type": "application/x-www-form-urlencoded"},
    )

    assert posted.status_code == 303
    assert posted.headers["location"] == "/signin?notice=session-ended"
    assert NOTICES["session-ended"] in (await desktop.get(posted.headers["location"])).text
    assert (await desktop.get("/profile")).headers["location"] == "/signin"
