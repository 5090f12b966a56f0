"""The demo in a real browser: Debian's Chromium, driven by Playwright, against a real server.

Two browser contexts share nothing (cookies included), so they are two
devices of one user. Screenshots of the devices page go to
``test-artifacts/`` for a person to look at.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import uvicorn
from argon2 import PasswordHasher
from playwright.async_api import Browser, BrowserContext, Page, async_playwright, expect

from authsessions.demo.app import create_app
from tests.services import REQUIRE_SERVICES

CHROMIUM = Path("/usr/bin/chromium")
# Playwright cannot download its own browser here; Debian's runs with these flags.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
LAPTOP_UA = (
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 "
    "(KHTML, like Gecko) Chrome/124.0.0.0 Safari/537.36"
)
PHONE_UA = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/17.4 Mobile/15E148 Safari/604.1"
)
PASSWORD = "correct horse battery"
NONCE_COOKIE = "authsessions_demo_csrf"


def require_chromium() -> None:
    if CHROMIUM.exists():
        return
    reason = f"{CHROMIUM} not found: apt-get install chromium"
    if REQUIRE_SERVICES:
        pytest.fail(f"{reason}, and AUTHSESSIONS_REQUIRE_SERVICES is set")
    pytest.skip(reason)


@pytest.fixture
def demo_url(tmp_path: Path) -> Iterator[str]:
    """The demo served by uvicorn in a thread, over a store in ``tmp_path``; its base URL."""
    app = create_app(
        f"sqlite:///{tmp_path / 'sessions.db'}",
        password_hasher=PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1),
    )
    # Bound here and handed over, so no other process can take the port in between.
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        for _ in range(200):
            if server.started or not thread.is_alive():
                break
            threading.Event().wait(0.05)
        assert server.started, "uvicorn did not start"
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    require_chromium()
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield browser
        finally:
            await browser.close()


async def device(browser: Browser, base_url: str, user_agent: str, *, width: int) -> Page:
    """A new browser context (its own cookies, so its own device) and a page in it."""
    context: BrowserContext = await browser.new_context(
        base_url=base_url, user_agent=user_agent, viewport={"width": width, "height": 760}
    )
    context.set_default_timeout(15_000)
    return await context.new_page()


async def sign_up(page: Page, username: str) -> None:
    await page.goto("/signup")
    await page.get_by_label("Username").fill(username)
    await page.get_by_label("Password", exact=True).fill(PASSWORD)
    await page.get_by_label("Password again").fill(PASSWORD)
    await page.get_by_role("button", name="Sign up").click()


async def test_a_device_revokes_another_in_the_browser(browser: Browser, demo_url: str) -> None:
    laptop = await device(browser, demo_url, LAPTOP_UA, width=1000)
    phone = await device(browser, demo_url, PHONE_UA, width=390)

    # The laptop signs up; the phone signs in to the same account.
    await sign_up(laptop, "alice")
    await expect(laptop.get_by_role("heading", name="Hello, alice")).to_be_visible()

    await phone.goto("/signin")
    await phone.get_by_label("Username").fill("alice")
    await phone.get_by_label("Password").fill("wrong password")
    await phone.get_by_role("button", name="Sign in").click()
    await expect(phone.get_by_role("alert")).to_have_text("Wrong username or password.")
    await phone.get_by_label("Password").fill(PASSWORD)
    await phone.get_by_role("button", name="Sign in").click()
    await expect(phone.get_by_role("heading", name="Hello, alice")).to_be_visible()

    # The laptop's devices page lists both, itself marked.
    await laptop.get_by_role("link", name="Your devices").click()
    devices = laptop.locator("li.device")
    await expect(devices).to_have_count(2)
    await expect(devices.filter(has_text="This device")).to_contain_text("Chrome on Linux")
    other = devices.filter(has_not_text="This device")
    await expect(other).to_contain_text("Safari on iOS")
    await expect(other).to_contain_text("last active just now")
    ARTIFACTS.mkdir(exist_ok=True)
    await laptop.screenshot(path=ARTIFACTS / "devices-two-devices.png", full_page=True)

    # It revokes the phone...
    await other.get_by_role("button", name="Revoke").click()
    await expect(laptop.get_by_role("status")).to_have_text("That device is signed out.")
    await expect(devices).to_have_count(1)
    await laptop.screenshot(path=ARTIFACTS / "devices-after-revoke.png", full_page=True)

    # ...whose next page load lands on the sign-in page.
    await phone.reload()
    await expect(phone.get_by_role("heading", name="Sign in")).to_be_visible()
    assert phone.url == f"{demo_url}/signin"

    # The laptop carries on, and its theme choice sticks.
    await laptop.get_by_role("link", name="Profile").click()
    await laptop.get_by_label("Dark").check()
    await laptop.get_by_role("button", name="Save").click()
    await expect(laptop.locator("body")).to_have_class("theme-dark")
    await laptop.goto("/devices")
    await expect(laptop.locator("body")).to_have_class("theme-dark")
    await laptop.screenshot(path=ARTIFACTS / "devices-dark.png", full_page=True)


async def test_a_sign_in_posted_from_another_site_is_refused(
    browser: Browser, demo_url: str
) -> None:
    """Login CSRF as an attacker would try it: a nonce and its token fetched from the demo,
    the nonce cookie planted in the victim's browser (as a sibling subdomain could), and
    the attacker's sign-in posted from his own page. The browser says where it comes from.
    """
    attacker = await device(browser, demo_url, LAPTOP_UA, width=1000)
    await sign_up(attacker, "mallory")
    await attacker.context.clear_cookies()
    await attacker.goto("/signin")
    token = await attacker.locator('input[name="csrf_token"]').get_attribute("value")
    [nonce] = [c["value"] for c in await attacker.context.cookies() if c["name"] == NONCE_COOKIE]

    victim = await device(browser, demo_url, LAPTOP_UA, width=1000)
    # Planted with the attributes that get it sent on any post, cross-site ones included.
    await victim.context.add_cookies(
        [
            {
                "name": NONCE_COOKIE,
                "value": nonce,
                "domain": "127.0.0.1",
                "path": "/",
                "sameSite": "None",
                "secure": True,
            }
        ]
    )
    evil = "http://evil.test/"
    await victim.route(
        evil,
        lambda route: route.fulfill(
            content_type="text/html",
            body=f"""<form method="post" action="{demo_url}/signin">
              <input type="hidden" name="csrf_token" value="{token}">
              <input type="hidden" name="username" value="mallory">
              <input type="hidden" name="password" value="{PASSWORD}">
              <button>Claim your prize</button></form>""",
        ),
    )
    await victim.goto(evil)
    await victim.get_by_role("button", name="Claim your prize").click()

    await expect(victim.get_by_role("heading", name="That form was refused")).to_be_visible()
    await victim.goto("/profile")
    await expect(victim.get_by_role("heading", name="Sign in")).to_be_visible()
