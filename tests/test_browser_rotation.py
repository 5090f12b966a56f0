"""A rotation while the same browser has a request in flight, in a real browser.

Debian's Chromium, driven by Playwright, against the test app under uvicorn: the
browser's own cookie jar takes each answer's ``Set-Cookie`` in the order the answers
arrive, which is what signed users out when a request sent before a rotation answered
after it with a clearing cookie.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from playwright.async_api import Browser
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from authsessions import Session, SessionConfig, Unauthorized
from tests.apps.session_app import build_app
from tests.test_demo_browser import browser  # noqa: F401 - the fixture
from tests.test_uvicorn import serving

CONFIG = SessionConfig(cookie_secure=False, cookie_name="session")


async def test_a_request_in_flight_as_the_page_rotates_leaves_the_browser_signed_in(
    browser: Browser,  # noqa: F811 - the fixture
    tmp_path: Path,
) -> None:
    loaded, gate = asyncio.Event(), asyncio.Event()

    async def slow_devices(request: Request) -> Response:
        session = Session.from_request(request)
        loaded.set()
        await gate.wait()
        try:
            return JSONResponse({"devices": len(await session.list_my_sessions())})
        except Unauthorized:
            return JSONResponse({"devices": None}, status_code=401)

    app = build_app(
        f"sqlite:///{tmp_path / 'sessions.db'}",
        CONFIG,
        extra_routes=[Route("/slow-devices", slow_devices)],
    )
    async with serving(app) as address:
        context = await browser.new_context(base_url=f"http://{address}")
        page = await context.new_page()
        await page.goto("/me")
        signed_in = await page.evaluate(
            """fetch('/login', {method: 'POST', headers: {'content-type': 'application/json'},
                                body: JSON.stringify({user_id: 'alice'})})
                 .then(r => r.json()).then(state => state.authenticated)"""
        )
        assert signed_in is True
        # Not awaited: evaluate() would wait for the promise it is handed back.
        await page.evaluate(
            "() => { window.devices = fetch('/slow-devices').then(r => r.status); }"
        )
        await asyncio.wait_for(loaded.wait(), 10)

        rotated = await page.evaluate(
            "fetch('/rotate', {method: 'POST', body: '{}'}).then(r => r.status)"
        )
        assert rotated == 200
        gate.set()

        assert await page.evaluate("window.devices") == 401
        me = await page.evaluate("fetch('/me').then(r => r.json())")
        assert me["authenticated"] is True
        assert me["user_id"] == "alice"
        await context.close()
