"""Tokens, digests and session ids; what the store and the callers may (never) see of them."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import re
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from authsessions import SessionData, SessionManager
from authsessions._tokens import (
    is_well_formed_session_id,
    is_well_formed_token_bytes,
    new_session_id,
    new_token,
    token_digest,
)
from authsessions.stores import SQLiteStore
from tests.apps.session_app import COOKIE, cookie_header, session_cookie
from tests.conftest import AppFactory, ClientFactory
from tests.stores.records import make_record, make_update, start_time

URL_SAFE = re.compile(r"[A-Za-z0-9_-]+")


def test_tokens_are_43_url_safe_characters() -> None:
    for _ in range(200):
        token = new_token()
        assert len(token) == 43
        assert URL_SAFE.fullmatch(token)
        assert is_well_formed_token_bytes(token.encode())


def test_session_ids_are_22_url_safe_characters() -> None:
    for _ in range(200):
        session_id = new_session_id()
        assert len(session_id) == 22
        assert URL_SAFE.fullmatch(session_id)
        assert is_well_formed_session_id(session_id)
        assert not is_well_formed_token_bytes(session_id.encode())


def test_session_ids_never_start_with_a_dash() -> None:
    """One id in 64 would otherwise be read as an option by `authsessions revoke ID`."""
    assert not any(new_session_id().startswith("-") for _ in range(5000))


def test_tokens_and_ids_do_not_repeat() -> None:
    tokens = {new_token() for _ in range(5000)}
    ids = {new_session_id() for _ in range(5000)}

    assert len(tokens) == 5000
    assert len(ids) == 5000


def test_token_digest_is_hex_sha256_of_the_token() -> None:
    token = new_token()

    digest = token_digest(token)

    assert digest == hashlib.sha256(token.encode("ascii")).hexdigest()
    assert re.fullmatch(r"[0-9a-f]{64}", digest)
    assert token_digest(token) == digest
    assert token_digest(new_token()) != digest


@pytest.mark.parametrize(
    "value",
    [
        "",
        "A" * 42,
        "A" * 44,
        "A" * 42 + "=",
        "A" * 42 + "+",
        "A" * 42 + "/",
        "A" * 42 + " ",
        "A" * 42 + "é",
        "A" * 43 + "\n",
        hashlib.sha256(b"x").hexdigest(),
    ],
    ids=["empty", "short", "long", "padding", "plus", "slash", "space", "non-ascii", "newline",
         "a-digest"],
)  # fmt: skip
def test_malformed_tokens_are_recognised(value: str) -> None:
    # As a server hands a header's bytes over, one byte per character (latin-1).
    assert not is_well_formed_token_bytes(value.encode("latin-1"))


@pytest.mark.parametrize("value", ["", "A" * 21, "A" * 23, "A" * 21 + "!", None, 12345, "A" * 43])
def test_malformed_session_ids_are_recognised(value: object) -> None:
    assert not is_well_formed_session_id(value)


def test_session_data_never_carries_the_token_or_its_digest() -> None:
    names = {f.name for f in dataclasses.fields(SessionData)}

    assert not any("token" in name or "digest" in name for name in names)


def test_what_a_store_is_handed_shows_no_digest_in_its_repr() -> None:
    """Records and updates reach custom stores, which may log them."""
    record = make_record(now=start_time())
    update = make_update(now=start_time(), token_digest=token_digest(new_token()))

    assert record.token_digest not in repr(record)
    assert update.token_digest is not None
    assert update.token_digest not in repr(update)


def all_bytes_in(directory: Path) -> bytes:
    """Everything the store wrote: the database, its WAL and shared-memory files."""
    return b"".join(path.read_bytes() for path in directory.iterdir() if path.is_file())


async def test_database_leak_cannot_be_replayed_as_cookies(
    tmp_path: Path, app_factory: AppFactory, client_factory: ClientFactory
) -> None:
    """The store keeps only the token's SHA-256, so a stolen database yields no cookie.

    The raw token must appear nowhere in the file (or its WAL), and what is
    there (the digest, the public id) does not work as a cookie.
    """
    path = tmp_path / "sessions.db"
    async with SQLiteStore(path) as store:
        client = client_factory(app_factory(store))
        response = await client.post("/login", json={"user_id": "alice"})
        issued = session_cookie(response)
        assert issued is not None
        token = issued.value
        [stored] = await SessionManager(store).list_for_user("alice")

        assert token.encode() not in all_bytes_in(tmp_path)
        with contextlib.closing(sqlite3.connect(path)) as db, db:
            rows = db.execute("SELECT id, token_digest FROM authsessions_session").fetchall()
        assert rows == [(stored.id, token_digest(token))]
        assert token not in repr(stored)
        assert token_digest(token) not in repr(stored)

        for leaked in (token_digest(token), stored.id):
            replay = await client.get("/me", headers=cookie_header(leaked))
            assert replay.json()["authenticated"] is False
        assert (await client.get("/me", headers=cookie_header(token))).json()["authenticated"]


@contextmanager
def broken(path: Path) -> Iterator[None]:
    """Make every query on the live database fail, then repair it."""
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("ALTER TABLE authsessions_session RENAME TO away")
        yield
        db.execute("ALTER TABLE away RENAME TO authsessions_session")
    finally:
        db.close()


async def test_malformed_cookie_never_reaches_the_store(
    tmp_path: Path, app_factory: AppFactory, client_factory: ClientFactory
) -> None:
    """Garbage cookies are answered from the token's shape alone, without a store query.

    A flood of junk cookies then costs no database work. Proven by behaviour:
    with the store broken, a token-shaped cookie gets 503 (the store was
    asked), while malformed ones are still answered normally (it was not).
    """
    path = tmp_path / "sessions.db"
    async with SQLiteStore(path) as store:
        client = client_factory(app_factory(store))
        assert (await client.get("/me", headers=cookie_header(new_token()))).status_code == 200

        with broken(path):
            token_shaped = await client.get("/me", headers=cookie_header(new_token()))
            malformed = [
                await client.get("/me", headers={"cookie": f"{COOKIE}={value}"})
                for value in ("junk", "A" * 44, "A" * 42 + "!", "' OR 1=1 --")
            ]

    assert token_shaped.status_code == 503
    for response in malformed:
        assert response.status_code == 200
        assert response.json()["authenticated"] is False
        cookie = session_cookie(response)
        assert cookie is not None
        assert cookie.is_clearing


async def test_request_without_the_cookie_never_reaches_the_store(
    tmp_path: Path, app_factory: AppFactory, client_factory: ClientFactory
) -> None:
    path = tmp_path / "sessions.db"
    async with SQLiteStore(path) as store:
        client = client_factory(app_factory(store))
        await client.get("/me")

        with broken(path):
            response = await client.get("/me", headers={"cookie": "other=1; session=x"})

    assert response.status_code == 200
    assert "set-cookie" not in response.headers
