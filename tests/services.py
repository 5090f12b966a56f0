"""Reaching the PostgreSQL and Redis servers the tests run against.

Without them a test skips with the reason; with AUTHSESSIONS_REQUIRE_SERVICES=1
(set by CI) an unreachable service fails the test instead, so CI always
proves every store for real.
"""

from __future__ import annotations

import os
import secrets
import socket
from urllib.parse import urlsplit, urlunsplit

import pytest

POSTGRES_URL = os.environ.get(
    "AUTHSESSIONS_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test"
)
REDIS_URL = os.environ.get("AUTHSESSIONS_TEST_REDIS", "redis://127.0.0.1:6379/0")
REQUIRE_SERVICES = os.environ.get("AUTHSESSIONS_REQUIRE_SERVICES", "") not in ("", "0")


def require_port(name: str, host: str, port: int) -> None:
    """Skip (or, under AUTHSESSIONS_REQUIRE_SERVICES, fail) unless ``host:port`` accepts TCP."""
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return
    except OSError as exc:
        reason = f"{name} not reachable at {host}:{port} ({exc})"
    if REQUIRE_SERVICES:
        pytest.fail(f"{reason}, and AUTHSESSIONS_REQUIRE_SERVICES is set")
    pytest.skip(reason)


def with_netloc(url: str, netloc: str, query: str = "") -> str:
    return urlunsplit(urlsplit(url)._replace(netloc=netloc, query=query))


def named_dsn(postgres_url: str) -> tuple[str, str]:
    """``postgres_url`` with an ``application_name`` of its own, and that name: what the
    server lists of one store's connections, on a server other tests share."""
    name = f"authsessions_{secrets.token_hex(4)}"
    return with_netloc(
        postgres_url, urlsplit(postgres_url).netloc, f"application_name={name}"
    ), name


CONNECTIONS_NAMED = "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1"
