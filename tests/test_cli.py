"""The ``authsessions`` command line, against real stores, in process and as the console script."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib.util
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import cast
from urllib.parse import urlsplit

import asyncpg
import httpx
import pytest
from click.testing import CliRunner, Result
from redis.asyncio import Redis

from authsessions import __version__
from authsessions._client import describe_device
from authsessions._records import SessionRecord
from authsessions._tokens import new_session_id, new_token, token_digest
from authsessions.cli import INSTALL_HINT, main, make_cli
from authsessions.stores import SQLiteStore, open_store
from authsessions.stores._postgres_sql import SCHEMA_VERSION as POSTGRES_SCHEMA_VERSION
from authsessions.stores._sqlite_schema import SCHEMA_VERSION as SQLITE_SCHEMA_VERSION
from authsessions.stores._url import redact_url
from tests.services import POSTGRES_URL, REDIS_URL, require_port
from tests.stores import records
from tests.stores.test_sqlite import a_file_of_the_previous_release

CHROME_WINDOWS = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 "
    "(KHTML, like Gecko) Chrome/124.0.0.0 Safari/537.36"
)
SAFARI_IPHONE = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/17.4 Mobile/15E148 Safari/604.1"
)
CONSOLE_SCRIPT = Path(sys.executable).parent / "authsessions"


def networked_store(module: str, url: str) -> str:
    """``url`` when its store module exists and its server answers; else skip."""
    if importlib.util.find_spec(f"authsessions.stores.{module}") is None:
        pytest.skip(f"authsessions/stores/{module}.py is not written yet")
    parts = urlsplit(url)
    require_port(module, parts.hostname or "127.0.0.1", parts.port or 0)
    return url


@pytest.fixture(params=["sqlite", "postgres", "redis"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each store in turn, by URL. The servers are shared, so tests use fresh user ids.

    The SQLite file is created beforehand: the commands but ``migrate`` refuse a
    file that holds no store.
    """
    if request.param == "postgres":
        return networked_store("postgres", POSTGRES_URL)
    if request.param == "redis":
        return networked_store("redis", REDIS_URL)
    url = f"sqlite:///{tmp_path / 'sessions.db'}"
    seed(url)
    return url


@pytest.fixture
def own_store_url(store_url: str, request: pytest.FixtureRequest) -> str:
    """``store_url``, each networked store in a schema or key prefix of this test's own.

    The servers are shared with other tests (and other runs), so a command
    that counts or sweeps the whole store needs a namespace nobody else
    writes to: the URL names it, as a user of the command would.
    """
    separator = "&" if "?" in store_url else "?"
    if store_url.startswith("postgresql"):
        schema: str = request.getfixturevalue("postgres_schema")
        url = f"{store_url}{separator}schema={schema}"
        seed(url)  # the commands but migrate refuse a store that does not exist
        return url
    if store_url.startswith("redis"):
        prefix: str = request.getfixturevalue("redis_prefix")
        return f"{store_url}{separator}prefix={prefix}"
    return store_url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'sessions.db'}"


@pytest.fixture
def user() -> str:
    return f"user-{uuid.uuid4().hex[:12]}"


def make_record(
    user_id: str,
    *,
    user_agent: str = CHROME_WINDOWS,
    ip_address: str = "198.51.100.4",
    idle: float = 0.0,
    ttl: float = 3600.0,
) -> SessionRecord:
    """A session last active ``idle`` seconds ago that expires ``ttl`` seconds after that."""
    device = describe_device(user_agent)
    last_active = float(int(time.time() - idle))
    return SessionRecord(
        id=new_session_id(),
        token_digest=token_digest(new_token()),
        user_id=user_id,
        ip_address=ip_address,
        user_agent=user_agent,
        device_name=device.name,
        device_type=device.type,
        fingerprint=device.fingerprint,
        data={"csrf": "an app secret the CLI never prints"},
        created_at=last_active,
        last_active_at=last_active,
        expires_at=last_active + ttl,
    )


def seed(url: str, *records: SessionRecord) -> None:
    """Insert ``records`` through the store protocol, as the session layer would."""

    async def insert() -> None:
        async with open_store(url) as store:
            for record in records:
                # Created "as of" its own start, so an already expired record goes in too.
                await store.create(record, max_sessions=10, now=record.created_at)

    asyncio.run(insert())


def run(*args: str, env: dict[str, str | None] | None = None) -> Result:
    """The command in process, with stdout and stderr apart."""
    return CliRunner().invoke(make_cli(), list(args), env=env, catch_exceptions=False)


def listed_ids(url: str, user_id: str) -> list[str]:
    """The ids ``list --json`` prints for ``user_id``."""
    return [
        session["id"]
        for session in json.loads(run("list", user_id, "--json", "--store", url).stdout)
    ]


def assert_one_line_error(result: Result, text: str = "") -> None:
    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    assert result.stderr.startswith("Error: ")
    assert result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert not result.stderr.endswith("..\n")  # a cause's own full stop, and ours
    assert text in result.stderr


# -- migrate ------------------------------------------------------------------------------


def test_migrate_creates_the_schema_and_is_idempotent(store_url: str) -> None:
    for _ in range(2):
        result = run("migrate", "--store", store_url)
        assert result.exit_code == 0, result.output
        assert f"The session store at {redact_url(store_url)} is ready." in result.stdout


def test_migrate_says_what_it_created_and_what_it_upgraded(tmp_path: Path) -> None:
    """An operator upgrading ahead of a deploy sees which schema versions it went between."""
    created, upgraded = tmp_path / "created.db", tmp_path / "upgraded.db"
    a_file_of_the_previous_release(upgraded, records.make_record(now=records.start_time()))

    first = run("migrate", "--store", f"sqlite:///{created}")
    again = run("migrate", "--store", f"sqlite:///{created}")
    upgrade = run("migrate", "--store", f"sqlite:///{upgraded}")

    assert f"was created at schema version {SQLITE_SCHEMA_VERSION}\n" in first.stdout
    assert "schema version" not in again.stdout
    assert f"from schema version 2 to {SQLITE_SCHEMA_VERSION}\n" in upgrade.stdout


# -- list ---------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [["list", "42"], ["stats"], ["revoke-user", "42"], ["cleanup"]])
def test_only_migrate_upgrades_an_older_schema(tmp_path: Path, command: list[str]) -> None:
    """The others upgraded it without a word: on a large PostgreSQL table, an upgrade may
    build an index while the app's requests wait, which an operator runs when they choose.
    """
    path = tmp_path / "previous.db"
    record = records.make_record(now=records.start_time())
    a_file_of_the_previous_release(path, record)
    url = f"sqlite:///{path}"

    refused = run(*command, "--store", url)
    with contextlib.closing(sqlite3.connect(path)) as db:
        recorded = db.execute("SELECT version FROM authsessions_session_schema").fetchall()
    upgraded = run("migrate", "--store", url)

    assert_one_line_error(
        refused,
        f"the session store's schema is version 2, older than this release's "
        f"{SQLITE_SCHEMA_VERSION}; this command changes no schema. Upgrade it with: "
        f"authsessions migrate --store {url} (the app upgrades it too",
    )
    assert recorded == [(2,)]
    assert upgraded.exit_code == 0
    assert run(*command, "--store", url).exit_code == 0


def test_only_migrate_upgrades_an_older_postgresql_schema(postgres_schema: str) -> None:
    url = f"{POSTGRES_URL}?schema={postgres_schema}"
    assert run("migrate", "--store", url).exit_code == 0
    older = POSTGRES_SCHEMA_VERSION - 1
    table = f'"{postgres_schema}".authsessions_session_schema_version'

    async def versions(set_to: int | None = None) -> list[int]:
        connection = await asyncpg.connect(POSTGRES_URL)
        try:
            if set_to is not None:
                await connection.execute(f"UPDATE {table} SET version = $1", set_to)  # noqa: S608
            return [row[0] for row in await connection.fetch(f"SELECT version FROM {table}")]  # noqa: S608
        finally:
            await connection.close()

    asyncio.run(versions(set_to=older))
    refused = run("list", "42", "--store", url)

    assert_one_line_error(refused, f"the session store's schema is version {older}, older ")
    assert asyncio.run(versions()) == [older]


def test_a_newer_schema_is_reported_as_the_store_says_it(tmp_path: Path) -> None:
    """Not as an internal error ("RuntimeError: …"): the operator is to upgrade authsessions."""
    url = f"sqlite:///{tmp_path / 'newer.db'}"
    seed(url)
    with contextlib.closing(sqlite3.connect(tmp_path / "newer.db")) as db, db:
        db.execute("UPDATE authsessions_session_schema SET version = 99, compatible_from = 99")

    result = run("list", "42", "--store", url)

    assert_one_line_error(result)
    assert result.stderr.startswith("Error: The session database has schema version 99")


def test_a_warning_the_store_logs_is_printed_by_a_command_that_succeeds(
    redis_url: str, redis_prefix: str
) -> None:
    """A Redis that evicts keys once full: `migrate`, run to check a store before a deploy,
    said only that it was ready."""

    async def configure(settings: dict[str, str]) -> dict[str, str]:
        admin = Redis.from_url(redis_url)
        try:
            before = cast("dict[str, str]", await admin.config_get(*settings))
            for name, value in settings.items():
                await admin.config_set(name, value)
            return before
        finally:
            await admin.aclose()

    before = asyncio.run(configure({"maxmemory": str(1 << 30), "maxmemory-policy": "allkeys-lru"}))
    try:
        result = run("migrate", "--store", f"{redis_url}?prefix={redis_prefix}")
    finally:
        asyncio.run(configure(before))

    assert result.exit_code == 0, result.output
    assert "is ready." in result.stdout
    assert result.stderr.startswith("Warning: the Redis server of ")
    assert "maxmemory-policy allkeys-lru" in result.stderr


def test_list_prints_a_table_of_live_sessions(store_url: str, user: str) -> None:
    desktop = make_record(user, idle=180)
    phone = make_record(user, user_agent=SAFARI_IPHONE, ip_address="2001:db8::5")
    expired = make_record(user, idle=7200, ttl=3600)
    seed(store_url, expired, desktop, phone)
    result = run("list", user, "--store", store_url)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert f"Sessions of user {user!r}" in lines[0]
    assert "Last active" in result.stdout
    assert "Expires" in result.stdout
    (desktop_line,) = [line for line in lines if desktop.id in line]
    assert "Chrome on Windows (desktop)" in desktop_line
    assert "198.51.100.4" in desktop_line
    assert "3 minutes ago" in desktop_line
    assert " UTC" in desktop_line
    (phone_line,) = [line for line in lines if phone.id in line]
    assert "Safari on iOS (mobile)" in phone_line
    assert "just now" in phone_line
    assert lines.index(phone_line) < lines.index(desktop_line)  # most recent first
    assert expired.id not in result.stdout


def test_list_json_is_for_scripts(store_url: str, user: str) -> None:
    older, newer = make_record(user, idle=60), make_record(user, user_agent=SAFARI_IPHONE)
    seed(store_url, older, newer)
    result = run("list", "--json", user, "--store", store_url)
    assert result.exit_code == 0, result.output
    listed = json.loads(result.stdout)
    assert [s["id"] for s in listed] == [newer.id, older.id]
    assert listed[0]["device_name"] == "Safari on iOS"
    assert listed[0]["device_type"] == "mobile"
    assert listed[1]["ip_address"] == "198.51.100.4"
    assert listed[1]["expires_at"].endswith("+00:00")
    # The app's data and the token digest stay out of a listing.
    assert "csrf" not in result.stdout
    assert older.token_digest not in result.stdout


def test_printed_values_are_never_read_as_markup(sqlite_url: str) -> None:
    """User ids and device names (from User-Agent headers, which anyone writes) may hold
    brackets; read as rich markup they would vanish, or end the command.
    """
    seed(sqlite_url, make_record("[/red]", user_agent="[bold]Evil[/bold] [/]"))

    empty = run("list", "[bold]x", "--store", sqlite_url)
    table = run("list", "[/red]", "--store", sqlite_url)

    assert empty.stdout == "No live sessions for user '[bold]x'.\n"
    assert table.exit_code == 0, table.output
    assert "Sessions of user '[/red]'" in table.stdout


def test_printed_values_are_never_read_as_emoji_codes(sqlite_url: str) -> None:
    """Nor as rich's ":name:" emoji codes, which would print another user id or device."""
    agent = "MyApp:fire:/1.0 CFNetwork/1.0 Darwin/20.0"  # parsed as "MyApp:fire: on iOS"
    seed(sqlite_url, make_record("ops:fire:team", user_agent=agent))

    table = run("list", "ops:fire:team", "--store", sqlite_url)
    empty = run("list", "x:fire:", "--store", sqlite_url)
    ended = run("revoke-user", "ops:fire:team", "--store", sqlite_url)

    assert table.exit_code == 0, table.output
    assert "Sessions of user 'ops:fire:team'" in table.stdout
    assert "MyApp:fire: on iOS (mobile)" in table.stdout
    assert empty.stdout == "No live sessions for user 'x:fire:'.\n"
    assert ended.stdout == "Ended 1 session of user 'ops:fire:team'.\n"


def test_list_of_a_user_without_sessions(store_url: str, user: str) -> None:
    result = run("list", user, "--store", store_url)
    assert result.exit_code == 0, result.output
    assert result.stdout == f"No live sessions for user {user!r}.\n"
    assert listed_ids(store_url, user) == []


# -- revoke and revoke-user -----------------------------------------------------------------


def test_revoke_ends_one_session(store_url: str, user: str) -> None:
    doomed, kept = make_record(user), make_record(user)
    seed(store_url, doomed, kept)
    result = run("revoke", doomed.id, "--store", store_url)
    assert result.exit_code == 0, result.output
    assert result.stdout == f"Ended session {doomed.id}.\n"
    assert listed_ids(store_url, user) == [kept.id]
    assert_one_line_error(run("revoke", doomed.id, "--store", store_url), "no session with id")


@pytest.mark.parametrize("session_id", ["AAAAAAAAAAAAAAAAAAAAAA", "not-an-id", "' OR 1=1 --"])
def test_revoke_of_an_unknown_id_fails_in_one_line(store_url: str, session_id: str) -> None:
    assert_one_line_error(run("revoke", session_id, "--store", store_url), repr(session_id))


@pytest.mark.parametrize("url", ["postgresql://127.0.0.1:1/x", "sqlite:///no-such-store.db"])
def test_revoke_of_an_id_no_session_can_have_never_reaches_the_store(url: str) -> None:
    result = run("revoke", "not-an-id", "--store", url)

    assert_one_line_error(result)
    assert result.stderr == "Error: no session with id 'not-an-id'.\n"


def test_revoke_user_ends_every_session_of_that_user_only(store_url: str, user: str) -> None:
    other = f"{user}-other"
    seed(store_url, make_record(user), make_record(user), make_record(other))
    result = run("revoke-user", user, "--store", store_url)
    assert result.exit_code == 0, result.output
    assert result.stdout == f"Ended 2 sessions of user {user!r}.\n"
    assert listed_ids(store_url, user) == []
    assert len(listed_ids(store_url, other)) == 1
    again = run("revoke-user", user, "--store", store_url)
    assert again.stdout == f"Ended 0 sessions of user {user!r}.\n"


@pytest.mark.parametrize(
    "command", [["list"], ["revoke"], ["revoke-user"], ["revoke-user", "--store", "sqlite:///x"]]
)
def test_a_mistyped_option_is_a_usage_error_not_an_id(command: list[str]) -> None:
    result = run(*command, "--force")

    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    assert "Usage: " in result.stderr
    assert "No such option '--force'" in result.stderr


@pytest.mark.parametrize("command", [["list", "42"], ["revoke", "AAAAAAAAAAAAAAAAAAAAAA"]])
def test_an_option_mistyped_close_to_a_real_one_gets_click_s_suggestion(
    command: list[str],
) -> None:
    result = run(*command, "--stor", "sqlite:///x")

    assert result.exit_code == 2, result.output
    assert "Did you mean" in result.stderr
    assert "'--store'" in result.stderr
    assert "goes after '--'" not in result.stderr


@pytest.mark.parametrize("columns", [80, 200])
def test_list_on_a_narrow_terminal_shows_ids_and_addresses_whole(
    store_url: str, user: str, columns: int
) -> None:
    """An address has no space to wrap at: rich cut it to "2001:db8:…" at 80 columns."""
    ipv6 = "2001:db8:1234:5678:9abc:def0:1234:5678"
    first, second = make_record(user, ip_address=ipv6), make_record(user, ip_address="203.0.113.9")
    seed(store_url, first, second)

    shown = run(
        "list", user, "--store", store_url, env={"TTY_COMPATIBLE": "1", "COLUMNS": str(columns)}
    )

    assert shown.exit_code == 0, shown.output
    for whole in (first.id, second.id, ipv6, "203.0.113.9"):
        assert whole in shown.stdout
    assert "…" not in shown.stdout
    assert ("┃" in shown.stdout) == (columns == 200)  # a table where it fits, else blocks


@pytest.mark.parametrize("ip_address", ["203.0.113.9", "2001:db8:1234:5678:9abc:def0:1234:5678"])
def test_list_cuts_nothing_short_at_any_terminal_width(
    sqlite_url: str, user: str, ip_address: str
) -> None:
    """Where the table's narrowest form just fitted, rich shrank the columns that wrap
    below their longest word: the expiry read "2027-01…"."""
    seed(sqlite_url, make_record(user, user_agent=CHROME_WINDOWS, ip_address=ip_address))

    for columns in range(60, 131):
        shown = run(
            "list",
            user,
            "--store",
            sqlite_url,
            env={"TTY_COMPATIBLE": "1", "COLUMNS": str(columns)},
        )

        assert shown.exit_code == 0, shown.output
        assert "…" not in shown.stdout, (columns, shown.stdout)


@pytest.mark.parametrize(
    "arguments",
    [
        ["--jsn", "42"],
        ["42", "-x"],
        ["--store", "sqlite:///x", "42", "-x"],
        ["-x", "--", "42"],
        ["-x", "--", "-42"],
    ],
)
def test_a_mistyped_option_is_never_advised_as_an_id(arguments: list[str]) -> None:
    """Advised as an id after "--", "--jsn" would end the sessions of user "--jsn", and the
    id given (42) would be dropped."""
    result = run("revoke-user", *arguments)

    assert result.exit_code == 2, result.output
    assert "No such option" in result.stderr
    assert "goes after '--'" not in result.stderr


def test_an_id_that_starts_with_a_dash_goes_after_a_double_dash(store_url: str, user: str) -> None:
    dashed = f"-{user}"
    seed(store_url, make_record(dashed), make_record(dashed))

    refused = run("revoke-user", "--store", store_url, dashed)
    listed = run("list", "--json", "--store", store_url, "--", dashed)
    ended = run("revoke-user", "--store", store_url, "--", dashed)

    assert refused.exit_code == 2, refused.output
    assert "An id that starts with '-' goes after '--': " in refused.stderr
    assert f"revoke-user [OPTIONS] -- {dashed}\n" in refused.stderr
    assert len(json.loads(listed.stdout)) == 2
    assert ended.stdout == f"Ended 2 sessions of user {dashed!r}.\n"


def test_a_session_id_that_starts_with_a_dash_needs_no_double_dash(
    store_url: str, user: str
) -> None:
    """One session id in 64 starts with "-"; `list` shows it, and `revoke` takes it as shown."""
    first, second = make_record(user), make_record(user)
    first = dataclasses.replace(first, id="-" + first.id[1:])
    second = dataclasses.replace(second, id="-" + second.id[1:])
    seed(store_url, first, second)

    anywhere = run("revoke", first.id, "--store", store_url)
    after_dashes = run("revoke", "--store", store_url, "--", second.id)

    assert anywhere.stdout == f"Ended session {first.id}.\n"
    assert after_dashes.stdout == f"Ended session {second.id}.\n"
    assert listed_ids(store_url, user) == []


@pytest.mark.parametrize("command", ["list", "revoke-user"])
@pytest.mark.parametrize("user_id", ["", "a\tb", "x" * 256])
def test_a_user_id_no_session_can_have_is_a_usage_error_in_the_terms_of_the_cli(
    sqlite_url: str, command: str, user_id: str
) -> None:
    seed(sqlite_url)

    result = run(command, "--store", sqlite_url, user_id)

    assert result.exit_code == 2, result.output
    assert "Invalid value for 'USER_ID': a user id is non-empty printable text" in result.stderr
    assert "str(user.id)" not in result.stderr


# -- cleanup and stats ----------------------------------------------------------------------


def test_cleanup_deletes_expired_sessions_in_batches(own_store_url: str, user: str) -> None:
    live = make_record(user)
    # One expired session per user: creating a session evicts its user's expired ones.
    expired = [make_record(f"{user}-{n}", idle=7200, ttl=3600) for n in range(3)]
    seed(own_store_url, live, *expired)
    result = run("cleanup", "--batch-size", "2", "--store", own_store_url)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("Deleted 3 expired sessions in ")
    assert result.stdout.rstrip().endswith(" s.")
    assert listed_ids(own_store_url, user) == [live.id]


def test_cleanup_refuses_a_batch_size_no_store_can_honour(sqlite_url: str) -> None:
    seed(sqlite_url)

    result = run("cleanup", "--batch-size", str(2**31), "--store", sqlite_url)

    assert result.exit_code == 2, result.output
    assert "Invalid value for '--batch-size'" in result.stderr

    zero = run("cleanup", "--batch-size", "0", "--store", sqlite_url)

    assert zero.exit_code == 2, zero.output
    assert "Invalid value for '--batch-size'" in zero.stderr


def test_cleanup_deletes_as_many_per_store_call_as_asked(
    sqlite_url: str, user: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    seed(sqlite_url, *[make_record(f"{user}-{n}", idle=7200, ttl=3600) for n in range(3)])
    limits: list[int] = []
    delete_expired = SQLiteStore.delete_expired

    async def counted(self: SQLiteStore, *, now: float, limit: int = 1000) -> int:
        limits.append(limit)
        return await delete_expired(self, now=now, limit=limit)

    monkeypatch.setattr(SQLiteStore, "delete_expired", counted)

    result = run("cleanup", "--batch-size", "2", "--store", sqlite_url)

    assert result.stdout.startswith("Deleted 3 expired sessions in "), result.output
    assert limits == [2, 2]


def test_cleanup_off_a_terminal_writes_its_result_alone(own_store_url: str, user: str) -> None:
    """Run from cron or a pipe: no progress bar, nothing on stderr."""
    seed(own_store_url, *[make_record(f"{user}-{n}", idle=7200, ttl=3600) for n in range(3)])

    result = run("cleanup", "--batch-size", "2", "--store", own_store_url)

    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    assert re.fullmatch(r"Deleted 3 expired sessions in \d+\.\d s\.\n", result.stdout)


def test_cleanup_shows_progress_on_a_terminal(own_store_url: str, user: str) -> None:
    seed(own_store_url, *[make_record(f"{user}-{n}", idle=7200, ttl=3600) for n in range(5)])
    # TTY_COMPATIBLE makes rich treat the captured stderr as a terminal.
    result = run(
        "cleanup", "--batch-size", "2", "--store", own_store_url, env={"TTY_COMPATIBLE": "1"}
    )
    assert result.exit_code == 0, result.output
    assert "Deleted 5 expired sessions in " in result.stdout
    # The bar goes to stderr, and nothing of it to the result a script reads.
    assert "Deleting expired sessions" in result.stderr
    assert re.fullmatch(r"Deleted 5 expired sessions in \d+\.\d s\.\n", result.stdout)


def test_stats_counts_sessions_users_and_device_types(own_store_url: str, user: str) -> None:
    seed(
        own_store_url,
        make_record(user),
        make_record(user, user_agent=SAFARI_IPHONE),
        make_record(f"{user}-2"),
        make_record(f"{user}-3", idle=7200, ttl=3600),
    )
    # Redis drops expired sessions by itself, so its store cannot count them (documented).
    expired = None if own_store_url.startswith("redis") else 1
    result = run("stats", "--json", "--store", own_store_url)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {
        "live_sessions": 3,
        "users": 2,
        "by_device_type": {"desktop": 2, "mobile": 1},
        "expired_sessions": expired,
    }
    assert list(json.loads(result.stdout)["by_device_type"]) == ["desktop", "mobile"]
    table = run("stats", "--store", own_store_url)
    assert table.exit_code == 0, table.output
    awaiting = (
        "expired sessions not counted (the store drops them itself)"
        if expired is None
        else "1 expired session awaiting cleanup"
    )
    assert f"3 live sessions of 2 users; {awaiting}." in table.stdout
    assert "desktop" in table.stdout


def test_stats_of_an_empty_store(own_store_url: str) -> None:
    result = run("stats", "--store", own_store_url)
    assert result.exit_code == 0, result.output
    expired = (
        "expired sessions not counted (the store drops them itself)"
        if own_store_url.startswith("redis")
        else "0 expired sessions awaiting cleanup"
    )
    assert f"0 live sessions of 0 users; {expired}." in result.stdout
    assert "Device type" not in result.stdout


# -- choosing the store -----------------------------------------------------------------------


def test_store_comes_from_the_environment_then_the_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, user: str
) -> None:
    env_url = f"sqlite:///{tmp_path / 'from-env.db'}"
    seed(env_url, make_record(user))
    listed = run("list", user, "--json", env={"AUTHSESSIONS_STORE": env_url})
    assert len(json.loads(listed.stdout)) == 1
    monkeypatch.chdir(tmp_path)
    default = run("migrate", env={"AUTHSESSIONS_STORE": None})
    assert default.exit_code == 0, default.output
    assert "sqlite:///sessions.db is ready" in default.stdout
    assert (tmp_path / "sessions.db").exists()


@pytest.mark.parametrize(
    ("url", "text"),
    [
        ("nosuch://x", "Error: unknown store URL scheme 'nosuch'"),
        ("sessions.db", "Error: a store URL needs a scheme"),
        ("sqlite://", "Error: a sqlite URL needs a file"),
        ("sqlite:////nonexistent-dir/sessions.db", ""),
        ("postgresql://127.0.0.1:1/x", ""),
        ("redis://127.0.0.1:1/0", ""),
    ],
)
@pytest.mark.parametrize("command", [["migrate"], ["list", "42"], ["stats"], ["cleanup"]])
def test_bad_or_unreachable_store_fails_in_one_line(
    url: str, text: str, command: list[str]
) -> None:
    result = run(*command, "--store", url)

    assert_one_line_error(result)
    assert result.stderr.startswith(text or "Error: ")


def test_a_directory_is_no_session_store(tmp_path: Path) -> None:
    result = run("stats", "--store", f"sqlite:///{tmp_path}")

    assert_one_line_error(result, f"no session store at {tmp_path} (create it with: ")


def test_an_unrelated_database_left_mid_write_is_read_without_a_change(tmp_path: Path) -> None:
    """Its WAL holds commits not yet in the main file (its program crashed): a read-write
    open would checkpoint them into the file and remove the WAL, changing another
    program's database.
    """
    path = tmp_path / "app.db"
    crash = (
        "import os, sqlite3, sys\n"
        "db = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
        "db.execute('PRAGMA journal_mode=WAL')\n"
        "db.execute('CREATE TABLE notes (body TEXT)')\n"
        "db.execute(\"INSERT INTO notes VALUES ('kept')\")\n"
        "os._exit(0)\n"
    )
    subprocess.run([sys.executable, "-c", crash, str(path)], check=True, timeout=30)
    wal = Path(f"{path}-wal")
    before = (path.read_bytes(), wal.read_bytes())

    result = run("list", "42", "--store", f"sqlite:///{path}")

    assert_one_line_error(result, "the file holds no authsessions tables")
    assert (path.read_bytes(), wal.read_bytes()) == before


@pytest.mark.parametrize(
    "command",
    [["list", "42"], ["revoke", "AAAAAAAAAAAAAAAAAAAAAA"], ["revoke-user", "42"], ["cleanup"],
     ["stats"], ["stats", "--json"]],
)  # fmt: skip
def test_a_missing_sqlite_store_is_refused_not_created(
    command: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A mistyped path would be a new, empty store: "Ended 0 sessions", a false success."""
    monkeypatch.chdir(tmp_path)

    default = run(*command, env={"AUTHSESSIONS_STORE": None})
    mistyped = run(*command, "--store", "sqlite:///sesions.db")
    no_dir = run(*command, "--store", "sqlite:///nodir/sessions.db")

    assert_one_line_error(
        default,
        "no session store at sessions.db "
        "(create it with: authsessions migrate --store sqlite:///sessions.db).",
    )
    assert_one_line_error(mistyped, "no session store at sesions.db")
    assert_one_line_error(no_dir, "no session store at nodir/sessions.db")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "command",
    [["list", "42"], ["revoke", "AAAAAAAAAAAAAAAAAAAAAA"], ["revoke-user", "42"], ["cleanup"],
     ["stats"]],
)  # fmt: skip
def test_a_missing_postgresql_store_is_refused_not_created(
    command: list[str], postgres_schema: str
) -> None:
    """A mistyped ?schema= or ?table= made a new, empty store in the app's database, and
    the command's "Ended 0 sessions" was a false success."""
    url = networked_store("postgres", POSTGRES_URL)
    separator = "&" if "?" in url else "?"
    mistyped = f"{url}{separator}schema={postgres_schema}"

    result = run(*command, "--store", mistyped)

    assert_one_line_error(
        result, f"no session store in schema {postgres_schema!r} (create it with: "
    )
    assert not asyncio.run(_schema_exists(postgres_schema))


async def _schema_exists(schema: str) -> bool:
    import asyncpg

    connection = await asyncpg.connect(POSTGRES_URL)
    try:
        found = await connection.fetchval("SELECT 1 FROM pg_namespace WHERE nspname = $1", schema)
    finally:
        await connection.close()
    return found is not None


@pytest.mark.parametrize("journal_mode", ["delete", "wal"])
@pytest.mark.parametrize("command", [["list", "42"], ["revoke-user", "42"], ["stats"]])
def test_a_sqlite_file_without_a_store_is_left_alone(
    command: list[str], tmp_path: Path, journal_mode: str
) -> None:
    """In WAL mode too: read-only, SQLite made the -wal and -shm files it needs."""
    path = tmp_path / "app.db"
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute(f"PRAGMA journal_mode={journal_mode}")
        db.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY)")
        db.commit()
    before = path.read_bytes()

    result = run(*command, "--store", f"sqlite:///{path}")

    assert_one_line_error(result, f"no session store in {path}: the file holds no authsessions")
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app.db"]


def test_a_file_that_is_not_a_database_is_refused_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("not a database\n")

    result = run("stats", "--store", f"sqlite:///{path}")

    assert_one_line_error(result, f"cannot read {path} as a session store: file is not a database")
    assert path.read_text() == "not a database\n"


def test_commands_read_a_store_another_process_holds_open(sqlite_url: str, user: str) -> None:
    """Its WAL and shared-memory files exist meanwhile: the read-only check reads through them."""
    record = make_record(user)

    async def list_while_open() -> list[str]:
        async with open_store(sqlite_url) as store:
            await store.create(record, max_sessions=10, now=record.created_at)
            return await asyncio.to_thread(listed_ids, sqlite_url, user)

    assert asyncio.run(list_while_open()) == [record.id]


@pytest.mark.parametrize(
    "command",
    [["migrate"], ["list", "42"], ["revoke", "AAAAAAAAAAAAAAAAAAAAAA"], ["revoke-user", "42"],
     ["cleanup"], ["stats"]],
)  # fmt: skip
def test_a_memory_store_is_refused_as_out_of_reach(command: list[str]) -> None:
    """A new memory store is empty: every command would report on nothing, and succeed."""
    result = run(*command, "--store", "memory://")

    assert_one_line_error(result, "memory:// names a store inside one process")


def test_a_store_that_cannot_be_used_is_reported_without_retry_advice(tmp_path: Path) -> None:
    """ "Try again shortly" suits an app's 503; a command's cause is mostly its own URL."""
    not_a_database = tmp_path / "notes.txt"
    not_a_database.write_text("not a database\n")
    no_database = urlsplit(networked_store("postgres", POSTGRES_URL))._replace(
        path="/authsessions_no_such_database"
    )

    results = {
        "file is not a database": run("migrate", "--store", f"sqlite:///{not_a_database}"),
        "unable to open database file": run(
            "migrate", "--store", f"sqlite:///{tmp_path / 'nodir' / 'sessions.db'}"
        ),
        'database "authsessions_no_such_database" does not exist': run(
            "stats", "--store", no_database.geturl()
        ),
    }

    for cause, result in results.items():
        assert_one_line_error(result, f"Error: cannot use the session store: {cause}.")
        assert "try again" not in result.stderr


def test_missing_store_driver_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    if importlib.util.find_spec("authsessions.stores.postgres") is None:
        pytest.skip("authsessions/stores/postgres.py is not written yet")
    monkeypatch.setitem(sys.modules, "asyncpg", None)  # as if the extra were not installed
    assert_one_line_error(
        run("list", "42", "--store", "postgresql://127.0.0.1:1/x"),
        "pip install 'authsessions[postgres]'",
    )


def test_url_passwords_are_not_printed() -> None:
    store_url = networked_store("postgres", POSTGRES_URL)
    # The server trusts local connections: both options are taken, and the store opens.
    separator = "&" if "?" in store_url else "?"
    url = f"{store_url}{separator}password=s3cret-pw&sslpassword=s3cret-pw"

    result = run("migrate", "--store", url)

    assert result.exit_code == 0, result.output
    assert "s3cret-pw" not in result.output
    assert "password=***&sslpassword=***" in result.stdout

    stats = run("stats", "--store", url)

    assert stats.exit_code == 0, stats.output
    assert "s3cret-pw" not in stats.output
    assert "password=***&sslpassword=***" in stats.stdout


def test_url_passwords_are_not_printed_when_the_query_holds_an_at_sign() -> None:
    """An "@" may stand in a query option's value (an application name, an Azure user
    "admin@server"): the password option is hidden all the same."""
    store_url = networked_store("postgres", POSTGRES_URL)
    parts = urlsplit(store_url)
    # No user part and no port: nothing before the query that would hide it by chance.
    url = (
        f"postgresql://{parts.hostname}{parts.path}?user={parts.username or 'postgres'}"
        "&password=s3cret-pw&application_name=ops@laptop"
    )

    for command in ("migrate", "stats"):
        result = run(command, "--store", url)

        assert result.exit_code == 0, result.output
        assert "s3cret-pw" not in result.output
        assert "password=***&application_name=ops@laptop" in result.stdout


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://postgres:s3cret/PW@127.0.0.1:5432/test",
        "postgresql://postgres:s3cret?PW@127.0.0.1:5432/test",
        "postgresql://postgres:s3cret#PW@127.0.0.1:5432/test",
        "redis://u:s3cret/PW@127.0.0.1:6379/0",
        "redis://:s3cret#PW@127.0.0.1:6379/0",
        "redis+cluster://u:s3cret?PW@127.0.0.1:6379/0",
    ],
)
def test_a_password_the_drivers_misread_is_not_printed(url: str) -> None:
    result = run("stats", "--store", url)

    assert_one_line_error(result, "is malformed")
    assert "s3cret" not in result.output
    assert "PW" not in result.output
    assert ":***@127.0.0.1:" in result.stderr


def test_a_store_failure_with_no_cause_to_show_says_what_the_log_said(
    postgres_schema: str,
) -> None:
    """A driver error whose message may hold a statement's values is not chained; the
    line said only "unavailable; try again shortly", and the log line that named the
    failure was kept out of the output."""
    url = networked_store("postgres", POSTGRES_URL)
    separator = "&" if "?" in url else "?"
    url = f"{url}{separator}schema={postgres_schema}"
    assert run("migrate", "--store", url).exit_code == 0

    result = run("revoke-user", "alice", "--store", f"{url}&default_transaction_read_only=on")

    assert_one_line_error(result, "ReadOnlySQLTransactionError (25006)")


def test_demo_with_a_bad_store_fails_in_one_line() -> None:
    assert_one_line_error(run("demo", "--store", "nosuch://x"), "unknown store URL scheme")


def test_main_without_the_cli_extra_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "click", None)  # makes `import click` fail
    with pytest.raises(SystemExit) as exit_info:
        main(["list", "42"])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == f"{INSTALL_HINT}\n"


@pytest.mark.parametrize("missing", ["uvicorn", "jinja2"])
def test_demo_without_the_rest_of_the_cli_extra_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], missing: str
) -> None:
    """click and rich often come with other tools: the demo's own modules, imported only
    as it starts, failed with a traceback."""
    monkeypatch.setitem(sys.modules, missing, None)
    monkeypatch.delitem(sys.modules, "authsessions.demo.app", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--store", "memory://", "--port", "1"])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == f"{INSTALL_HINT}\n"


# -- the real console script ------------------------------------------------------------------


def console_script(
    *args: str, cwd: Path, command: Sequence[str] = (str(CONSOLE_SCRIPT),)
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ}
    env.pop("AUTHSESSIONS_STORE", None)
    return subprocess.run(
        [*command, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_console_script_lists_and_revokes(tmp_path: Path, user: str) -> None:
    record = make_record(user)
    seed(f"sqlite:///{tmp_path / 'sessions.db'}", record)  # the default store, in cwd
    listed = console_script("list", user, "--json", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert [s["id"] for s in json.loads(listed.stdout)] == [record.id]
    revoked = console_script("revoke", record.id, cwd=tmp_path)
    assert (revoked.returncode, revoked.stdout) == (0, f"Ended session {record.id}.\n")
    again = console_script("revoke", record.id, cwd=tmp_path)
    assert again.returncode == 1
    assert again.stderr == f"Error: no session with id {record.id!r}.\n"


def test_console_script_reports_an_unreachable_store_in_one_line(tmp_path: Path) -> None:
    result = console_script("list", "42", "--store", "postgresql://127.0.0.1:1/x", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.startswith("Error: ")
    assert result.stderr.count("\n") == 1, result.stderr


def test_python_m_authsessions_cli_runs_the_command(tmp_path: Path) -> None:
    """It ran nothing and exited 0: a cron job's revocation would never have happened."""
    module = (sys.executable, "-m", "authsessions.cli")
    refused = console_script("revoke-user", "42", cwd=tmp_path, command=module)
    version = console_script("--version", cwd=tmp_path, command=module)

    assert refused.returncode == 1
    assert refused.stderr.startswith("Error: no session store at "), refused.stderr
    assert (version.returncode, version.stdout) == (0, f"authsessions, version {__version__}\n")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@contextlib.contextmanager
def serving_demo(cwd: Path, *options: str) -> Iterator[tuple[str, list[str]]]:
    """``authsessions demo`` as a real process on a free port: its base URL, and a list
    that holds the lines it printed once it has stopped.
    """
    port = free_port()
    process = subprocess.Popen(
        [str(CONSOLE_SCRIPT), "demo", "--port", str(port), *options],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base_url = f"http://127.0.0.1:{port}"
    printed: list[str] = []
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(f"{base_url}/signin", timeout=1).close()  # noqa: S310
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"the demo did not start:\n{process.communicate()[0]}")
                time.sleep(0.1)
        yield base_url, printed
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=10)
        printed += output.splitlines()


@pytest.fixture
def demo_server(tmp_path: Path) -> Iterator[str]:
    with serving_demo(tmp_path, "--store", "sqlite:///sessions.db") as (base_url, _):
        yield base_url


def test_demo_command_serves_the_demo(demo_server: str, tmp_path: Path) -> None:
    with urllib.request.urlopen(f"{demo_server}/signin", timeout=5) as page:  # noqa: S310
        body = page.read().decode()
        cookies = page.headers.get_all("set-cookie")
    assert "<h1>Sign in</h1>" in body
    assert any(cookie.startswith("authsessions_demo_csrf=") for cookie in cookies)
    assert (tmp_path / "sessions.db").exists()


def test_demo_serves_a_memory_store_and_warns_when_reachable_from_elsewhere(
    tmp_path: Path,
) -> None:
    everywhere = "0.0.0.0"  # noqa: S104 - the warning's case; the test reaches it on loopback
    with serving_demo(tmp_path, "--store", "memory://", "--host", everywhere) as (url, printed):
        signin = urllib.request.urlopen(f"{url}/signin", timeout=5)  # noqa: S310
        signin.close()
        assert signin.status == 200

    assert "  warning: plain HTTP; do not expose the demo beyond this machine." in printed


def test_demo_banner_hides_the_store_password(tmp_path: Path, postgres_schema: str) -> None:
    store_url = networked_store("postgres", POSTGRES_URL)
    separator = "&" if "?" in store_url else "?"
    url = f"{store_url}{separator}schema={postgres_schema}&password=s3cret-pw"

    with serving_demo(tmp_path, "--store", url) as (_, printed):
        pass

    banner = "\n".join(printed)
    assert "s3cret-pw" not in banner
    assert f"sessions: {redact_url(url)}" in banner
    assert "password=***" in banner
    assert "warning" not in banner  # on 127.0.0.1 by default


def test_demo_refuses_a_port_it_cannot_be_reached_on() -> None:
    # A store that fails at once: were the port taken, the command would stop there, not serve.
    result = run("demo", "--port", "0", "--store", "nosuch://x")

    assert result.exit_code == 2, result.output
    assert "Invalid value for '--port'" in result.stderr


def test_demo_on_a_taken_port_says_so_before_any_banner(tmp_path: Path) -> None:
    """uvicorn found the port taken only after the banner and the app's startup, and
    exited with code 3 under a log line."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = console_script("demo", "--port", str(port), "--store", "memory://", cwd=tmp_path)

    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == (
        f"Error: cannot serve the demo on 127.0.0.1:{port}: Address already in use. "
        "Pass --port (and --host) to serve it elsewhere.\n"
    )


def test_demo_on_a_host_that_does_not_resolve_says_so(tmp_path: Path) -> None:
    result = console_script(
        "demo", "--host", "nosuchhost.invalid", "--port", str(free_port()), "--store", "memory://",
        cwd=tmp_path,
    )  # fmt: skip

    assert result.returncode == 1
    assert result.stderr.startswith("Error: cannot serve the demo on nosuchhost.invalid:")
    assert "Unknown error" not in result.stderr
    assert "while attempting" not in result.stderr


def test_demo_stopped_with_ctrl_c_exits_cleanly_and_shows_an_ipv6_address_as_a_url(
    tmp_path: Path,
) -> None:
    """Ctrl+C is how the demo stops: it exited 1 with click's "Aborted!"."""
    port = free_port()
    process = subprocess.Popen(
        [str(CONSOLE_SCRIPT), "demo", "--host", "::1", "--port", str(port), "--store", "memory://"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(f"http://[::1]:{port}/signin", timeout=1).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"the demo did not start:\n{process.communicate()[0]}")
                time.sleep(0.1)
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=10)
    finally:
        process.kill()

    assert process.returncode == 0, output
    assert "Aborted" not in output
    assert f"authsessions demo on http://[::1]:{port}/" in output


async def test_the_demo_keeps_the_peer_address_whatever_a_forwarded_header_says(
    tmp_path: Path,
) -> None:
    # uvicorn's default would believe X-Forwarded-For from 127.0.0.1 and hand its text on
    # as the peer; the demo trusts no proxy, so the header must change nothing.
    from tests.test_demo import sign_up

    spoofed = "<not an ip> " + "A" * 3000
    with serving_demo(tmp_path, "--store", "sqlite:///sessions.db") as (base_url, _):
        async with httpx.AsyncClient(
            base_url=base_url, headers={"x-forwarded-for": spoofed}
        ) as client:
            assert (await sign_up(client)).status_code == 303
            page = (await client.get("/devices")).text

    assert "AAAA" not in page
    assert "127.0.0.1 ·" in page
