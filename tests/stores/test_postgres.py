"""What only PostgresStore promises: its pool, its schema version, and failing fast.

The store contract itself is proven in test_conformance.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import re
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from authsessions import StoreUnavailable
from authsessions._records import SessionRecord
from authsessions.stores import CreateError, PostgresStore, Store, _postgres_pool, open_store
from authsessions.stores._postgres_pool import HeldConnections, _unwrapped
from authsessions.stores._postgres_sql import COMPATIBLE_FROM, MIGRATIONS, SCHEMA_VERSION
from tests.services import CONNECTIONS_NAMED, named_dsn, with_netloc
from tests.stores.records import (
    check_kept_after_racing_creates,
    make_record,
    make_update,
    new_digest,
    start_time,
    typed,
)
from tests.tcp_proxy import TcpProxy, refusing_port


@pytest.fixture
async def admin(postgres_url: str) -> AsyncIterator[asyncpg.Connection[asyncpg.Record]]:
    """A plain connection for looking at what the store did."""
    connection = await asyncpg.connect(postgres_url)
    yield connection
    await connection.close()


@pytest.fixture
async def proxy(postgres_url: str) -> AsyncIterator[TcpProxy]:
    parts = urlsplit(postgres_url)
    async with TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5432) as proxy:
        yield proxy


def dsn_through(proxy: TcpProxy, postgres_url: str, query: str = "") -> str:
    """``postgres_url``, reaching the server through ``proxy``."""
    user = urlsplit(postgres_url).username or "postgres"
    return with_netloc(postgres_url, f"{user}@127.0.0.1:{proxy.port}", query)


def impatient_store_through(
    proxy: TcpProxy, postgres_url: str, schema: str, *, max_size: int = 10, query: str = ""
) -> PostgresStore:
    """A store reaching the server through ``proxy``, giving up on anything after 1 s."""
    return PostgresStore(
        dsn_through(proxy, postgres_url, query),
        schema=schema,
        connect_timeout=1.0,
        command_timeout=1.0,
        acquire_timeout=1.0,
        max_size=max_size,
    )


BACKENDS_NAMED = "SELECT array_agg(pid) FROM pg_stat_activity WHERE application_name = $1"


async def until_gone(admin: asyncpg.Connection[asyncpg.Record], pids: list[int]) -> None:
    """Until the server has let go of the connections of ``pids`` (it notices a close
    shortly; at most 10 s)."""
    alive = "SELECT count(*) FROM pg_stat_activity WHERE pid = any($1)"
    async with asyncio.timeout(10):
        while await admin.fetchval(alive, pids):  # noqa: ASYNC110 - no event to wait for
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def table_locked(
    admin: asyncpg.Connection[asyncpg.Record], schema: str
) -> AsyncIterator[None]:
    """Every statement on the session table waits until the block ends."""
    async with admin.transaction():
        await admin.execute(f'LOCK TABLE "{schema}".authsessions_session')
        yield


async def recorded_versions(
    admin: asyncpg.Connection[asyncpg.Record], schema: str, *, set_to: int | None = None
) -> list[int]:
    """The rows of the version table (after setting them to ``set_to``, if given)."""
    table = f'"{schema}".authsessions_session_schema_version'  # the fixture's own name
    if set_to is not None:
        await admin.execute(f"UPDATE {table} SET version = $1", set_to)  # noqa: S608
    return [row["version"] for row in await admin.fetch(f"SELECT version FROM {table}")]  # noqa: S608


async def recorded_marks(
    admin: asyncpg.Connection[asyncpg.Record], schema: str
) -> list[tuple[int, int | None]]:
    """The version table's rows as (version, compatible_from)."""
    table = f'"{schema}".authsessions_session_schema_version'
    rows = await admin.fetch(f"SELECT version, compatible_from FROM {table}")  # noqa: S608
    return [(row["version"], row["compatible_from"]) for row in rows]


async def as_if_a_newer_release_migrated(
    admin: asyncpg.Connection[asyncpg.Record], schema: str, compatible_from: int | None
) -> None:
    """The version table as a release one schema ahead leaves it; ``None``: as one before
    the compatibility mark would (its table has no such column)."""
    table = f'"{schema}".authsessions_session_schema_version'
    if compatible_from is None:
        await admin.execute(f"ALTER TABLE {table} DROP COLUMN compatible_from")
        await admin.execute(f"UPDATE {table} SET version = $1", SCHEMA_VERSION + 1)  # noqa: S608
    else:
        await admin.execute(
            f"UPDATE {table} SET version = $1, compatible_from = $2",  # noqa: S608
            SCHEMA_VERSION + 1,
            compatible_from,
        )


# -- schema ---------------------------------------------------------------------------------


async def test_open_creates_the_schema_and_records_its_version(
    postgres_url: str, postgres_schema: str, admin: asyncpg.Connection[asyncpg.Record]
) -> None:
    async with PostgresStore(postgres_url, schema=postgres_schema):
        pass

    versions = await recorded_versions(admin, postgres_schema)
    indexes = await admin.fetch(
        "SELECT indexdef FROM pg_indexes WHERE schemaname = $1 AND tablename = $2",
        postgres_schema,
        "authsessions_session",
    )
    assert versions == [SCHEMA_VERSION]
    definitions = " ".join(row["indexdef"] for row in indexes)
    assert "UNIQUE INDEX authsessions_session_token_digest" in definitions
    assert "(user_id, last_active_at)" in definitions
    assert "(expires_at)" in definitions
    assert "(rotated_away_from) WHERE (rotated_away_from IS NOT NULL)" in definitions


async def session_stored_by_a_closed_store(postgres_url: str, schema: str) -> SessionRecord:
    record = make_record(now=start_time(), data={"a": 1})
    async with PostgresStore(postgres_url, schema=schema) as store:
        await store.create(record, max_sessions=10, now=record.created_at)
    return record


async def test_reopening_is_idempotent_and_keeps_sessions(
    postgres_url: str, postgres_schema: str, admin: asyncpg.Connection[asyncpg.Record]
) -> None:
    record = await session_stored_by_a_closed_store(postgres_url, postgres_schema)

    for _ in range(2):
        async with PostgresStore(postgres_url, schema=postgres_schema) as again:
            assert await again.get(record.token_digest, now=record.created_at) == record

    assert await recorded_versions(admin, postgres_schema) == [SCHEMA_VERSION]


async def as_a_third_version_schema(admin: asyncpg.Connection[asyncpg.Record], schema: str) -> None:
    """The store's schema as version 3 left it: no rotated-away digests."""
    table = f'"{schema}".authsessions_session'
    await admin.execute(
        f'DROP INDEX "{schema}".authsessions_session_rotated_away_from;'
        f"ALTER TABLE {table} DROP COLUMN rotated_away_from, DROP COLUMN rotated_away_until"
    )
    await recorded_versions(admin, schema, set_to=3)


async def test_a_first_version_schema_is_upgraded_in_place_and_keeps_its_sessions(
    postgres_url: str, postgres_schema: str, admin: asyncpg.Connection[asyncpg.Record]
) -> None:
    """A table made by the first release gains the create function and nothing is lost."""
    kept = await session_stored_by_a_closed_store(postgres_url, postgres_schema)
    t0 = kept.created_at
    await as_a_third_version_schema(admin, postgres_schema)
    await admin.execute(f'DROP FUNCTION "{postgres_schema}".authsessions_session_create')
    await admin.execute(  # the first release's version table had no compatibility mark
        f'ALTER TABLE "{postgres_schema}".authsessions_session_schema_version '
        "DROP COLUMN compatible_from"
    )
    await recorded_versions(admin, postgres_schema, set_to=1)

    async with PostgresStore(postgres_url, schema=postgres_schema) as store:
        assert await store.get(kept.token_digest, now=t0) == kept
        newer = [make_record(now=t0 + i) for i in range(1, 3)]
        for record in newer:
            await store.create(record, max_sessions=2, now=record.created_at)
        assert [r.id for r in await store.list_for_user("alice", now=t0 + 3)] == [
            newer[1].id,
            newer[0].id,
        ]

    assert await recorded_marks(admin, postgres_schema) == [(SCHEMA_VERSION, COMPATIBLE_FROM)]


async def test_a_second_version_schema_gets_the_create_function_that_keeps_the_new_session(
    postgres_url: str, postgres_schema: str, admin: asyncpg.Connection[asyncpg.Record]
) -> None:
    """Version 2's function ranked the new session with the others, so a login could evict
    the session it made when another was active later (a server's clock ahead).
    """
    kept = await session_stored_by_a_closed_store(postgres_url, postgres_schema)
    await as_a_third_version_schema(admin, postgres_schema)
    (second_version_function,) = MIGRATIONS[1]
    await admin.execute(
        f'DROP FUNCTION "{postgres_schema}".authsessions_session_create;'
        + second_version_function.format(
            table=f'"{postgres_schema}".authsessions_session',
            name="authsessions_session",
            create=f'"{postgres_schema}".authsessions_session_create',
        )
    )
    await recorded_versions(admin, postgres_schema, set_to=2)
    behind = make_record(now=kept.created_at - 10)

    async with PostgresStore(postgres_url, schema=postgres_schema) as store:
        await store.create(behind, max_sessions=1, now=behind.created_at)

        assert await store.get(behind.token_digest, now=behind.created_at) == behind
        assert await store.get(kept.token_digest, now=behind.created_at) is None

    assert await recorded_versions(admin, postgres_schema) == [SCHEMA_VERSION]


async def test_a_third_version_schema_gains_the_digests_rotated_away_and_keeps_its_sessions(
    postgres_url: str, postgres_schema: str, admin: asyncpg.Connection[asyncpg.Record]
) -> None:
    kept = await session_stored_by_a_closed_store(postgres_url, postgres_schema)
    t0 = kept.created_at
    await as_a_third_version_schema(admin, postgres_schema)

    async with PostgresStore(postgres_url, schema=postgres_schema) as store:
        assert await store.get(kept.token_digest, now=t0) == kept
        assert not await store.rotated_away_to(kept.token_digest, now=t0)
        rotation = make_update(
            now=t0 + 1,
            token_digest=new_digest(),
            expected_token_digest=kept.token_digest,
            rotated_away_until=t0 + 61,
        )
        assert await store.update(kept.id, rotation, now=t0 + 1)
        assert await store.rotated_away_to(kept.token_digest, now=t0 + 2)

    assert await recorded_marks(admin, postgres_schema) == [(SCHEMA_VERSION, COMPATIBLE_FROM)]


async def test_a_role_that_may_create_but_does_not_own_the_table_is_told_how_to_upgrade(
    postgres_url: str, postgres_schema: str, admin: asyncpg.Connection[asyncpg.Record]
) -> None:
    """The fourth migration is the first to alter the table, which only its owner may:
    the refusal must read as a misconfiguration, and leave the table as it was."""
    kept = await session_stored_by_a_closed_store(postgres_url, postgres_schema)
    await as_a_third_version_schema(admin, postgres_schema)

    async with as_a_role_that_may_only_read_and_write(
        admin, postgres_url, postgres_schema
    ) as app_url:
        role = urlsplit(app_url).username
        await admin.execute(f'GRANT CREATE ON SCHEMA "{postgres_schema}" TO "{role}"')
        store = PostgresStore(app_url, schema=postgres_schema)
        with pytest.raises(RuntimeError) as refused:
            await store.open()

    assert str(refused.value).startswith(
        f"The session table {postgres_schema}.authsessions_session has schema version 3 and "
        f"this release needs {SCHEMA_VERSION}, which this database role may not create "
        "(must be owner of table authsessions_session)"
    )
    assert not store.is_open
    assert await recorded_versions(admin, postgres_schema) == [3]
    async with PostgresStore(postgres_url, schema=postgres_schema) as store:
        assert await store.get(kept.token_digest, now=kept.created_at) == kept


async def test_concurrent_first_opens_by_many_processes_migrate_once(
    postgres_url: str, postgres_schema: str, admin: asyncpg.Connection[asyncpg.Record]
) -> None:
    """Workers of one deployment start together; their DDL must not collide."""
    stores = [PostgresStore(postgres_url, schema=postgres_schema, min_size=1) for _ in range(6)]

    await asyncio.gather(*(store.open() for store in stores))

    assert await recorded_versions(admin, postgres_schema) == [SCHEMA_VERSION]
    await asyncio.gather(*(store.close() for store in stores))


async def test_concurrent_first_opens_of_two_tables_in_one_new_schema_both_succeed(
    postgres_url: str, postgres_schema: str
) -> None:
    """Two apps (or two stores of one) with tables of their own in one schema: both
    created the schema, and one open failed on the other's."""
    stores = [
        PostgresStore(postgres_url, schema=postgres_schema, table=table, min_size=1)
        for table in ("sessions_a", "sessions_b")
    ]

    try:
        await asyncio.gather(*(store.open() for store in stores))
        assert all(store.is_open for store in stores)
    finally:
        await asyncio.gather(*(store.close() for store in stores))


@pytest.mark.parametrize("over_a_session", [False, True], ids=["login", "login-over-a-session"])
@pytest.mark.parametrize("isolation", ["repeatable%20read", "serializable"])
async def test_concurrent_logins_keep_the_limit_whatever_the_default_isolation(
    postgres_url: str, postgres_schema: str, isolation: str, over_a_session: bool
) -> None:
    """Some databases or roles default to a stricter isolation: each login's eviction then
    read a snapshot from before the lock and missed the others' sessions (or failed to
    serialise, as a 503). A login over a live session runs in a transaction of its own,
    which must be READ COMMITTED too."""
    separator = "&" if "?" in postgres_url else "?"
    dsn = f"{postgres_url}{separator}default_transaction_isolation={isolation}"
    stores = [PostgresStore(dsn, schema=postgres_schema, max_size=2) for _ in range(4)]
    t0 = start_time()
    records = [make_record(now=t0 + i, user_id="alice") for i in range(8)]
    try:
        for store in stores:
            await store.open()
        results = await asyncio.gather(
            *(
                stores[i % 4].create(
                    record,
                    max_sessions=2,
                    now=record.created_at,
                    replaced=(new_digest(), t0 + 60) if over_a_session else None,
                )
                for i, record in enumerate(records)
            ),
            return_exceptions=True,
        )
        live = await stores[0].list_for_user("alice", now=t0 + 10)
    finally:
        await asyncio.gather(*(store.close() for store in stores))

    assert results == [None] * len(records)
    assert len(live) == 2


async def wait_until(watcher: asyncpg.Connection[asyncpg.Record], query: str, *args: Any) -> None:
    """Until ``query`` counts something: the server has no event to await instead."""
    async with asyncio.timeout(10):
        while not await watcher.fetchval(query, *args):  # noqa: ASYNC110
            await asyncio.sleep(0.02)


async def wait_until_blocked(watcher: asyncpg.Connection[asyncpg.Record], kind: str) -> None:
    """Until a statement starting with ``kind`` waits for a lock, on the test database."""
    await wait_until(
        watcher,
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
        " AND query LIKE $1 AND datname = current_database()",
        f"{kind}%",
    )


@pytest.mark.parametrize("isolation", ["repeatable%20read", "serializable"])
@pytest.mark.parametrize("operation", ["write a key", "logout"])
async def test_a_write_that_waited_for_another_servers_commit_goes_through_whatever_the_isolation(
    postgres_url: str, postgres_schema: str, isolation: str, operation: str
) -> None:
    """Under a stricter default, a statement that waited for a row another server changed
    failed to serialise: the key written (or the logout) was lost, as a 503."""
    separator = "&" if "?" in postgres_url else "?"
    dsn = f"{postgres_url}{separator}default_transaction_isolation={isolation}"
    now = start_time()
    record = make_record(now=now, data={"a": 0, "b": 0})
    other_server = await asyncpg.connect(postgres_url)
    watcher = await asyncpg.connect(postgres_url)
    try:
        async with PostgresStore(dsn, schema=postgres_schema, max_size=2) as store:
            await store.create(record, max_sessions=5, now=now)
            async with other_server.transaction():
                # Another server writes key "b" of the same session, not committed yet.
                await other_server.execute(
                    f'UPDATE "{postgres_schema}".authsessions_session'  # noqa: S608
                    """ SET data = data || '{"\\"b\\"": "1"}'::jsonb WHERE id = $1""",
                    record.id,
                )
                if operation == "logout":
                    waiting = asyncio.ensure_future(store.delete(record.id, now=now))
                else:
                    update = make_update(now=now + 1, set_keys={"a": 1}, moves_expiry=False)
                    waiting = asyncio.ensure_future(store.update(record.id, update, now=now + 1))
                await wait_until_blocked(watcher, "DELETE" if operation == "logout" else "UPDATE")
            assert await waiting is True
            found = await store.get(record.token_digest, now=now + 1)
    finally:
        await other_server.close()
        await watcher.close()

    if operation == "logout":
        assert found is None
    else:
        assert found is not None
        assert found.data == {"a": 1, "b": 1}


async def test_a_rotation_onto_a_taken_digest_in_a_transaction_leaves_the_connection_clean(
    postgres_url: str, postgres_schema: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Under a stricter default every write is a transaction of the store's own: one the
    server refused (a digest another session holds) is rolled back there, and the
    connection serves the next call, with no transaction found open by the pool."""
    separator = "&" if "?" in postgres_url else "?"
    dsn = f"{postgres_url}{separator}default_transaction_isolation=repeatable%20read"
    now = start_time()
    mine, other = make_record(now=now), make_record(now=now, user_id="bob")
    async with PostgresStore(dsn, schema=postgres_schema, max_size=1) as store:
        await store.create(mine, max_sessions=5, now=now)
        await store.create(other, max_sessions=5, now=now)
        onto_bobs = make_update(
            now=now, token_digest=other.token_digest, expected_token_digest=mine.token_digest
        )

        with pytest.raises(CreateError):
            await store.update(mine.id, onto_bobs, now=now)

        written = make_update(now=now, set_keys={"a": 1})
        assert await store.update(mine.id, written, now=now)
        found = await store.get(mine.token_digest, now=now)
    assert found is not None
    assert found.data == {"a": 1}
    assert "active transaction" not in caplog.text


@pytest.mark.parametrize("schema_exists", [False, True])
async def test_an_open_that_waited_for_another_servers_migration_opens_under_repeatable_read(
    postgres_url: str, postgres_schema: str, schema_exists: bool
) -> None:
    """Its checks under the migration lock read a snapshot from before the other server
    committed: it created the schema or the table again and failed (a 503)."""
    separator = "&" if "?" in postgres_url else "?"
    dsn = f"{postgres_url}{separator}default_transaction_isolation=repeatable%20read"
    migrating = await asyncpg.connect(postgres_url)
    watcher = await asyncpg.connect(postgres_url)
    waiting = PostgresStore(dsn, schema=postgres_schema)
    try:
        if schema_exists:
            await migrating.execute(f'CREATE SCHEMA "{postgres_schema}"')
        async with migrating.transaction():
            # Another server migrates, under the lock, as a store's open does.
            other_server = PostgresStore(postgres_url, schema=postgres_schema)
            version_table = f'"{postgres_schema}"."authsessions_session_schema_version"'
            await migrating.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
                f"authsessions migrate {postgres_schema}",
            )
            opening = asyncio.ensure_future(waiting.open())
            await wait_until(
                watcher, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
            )
            await other_server._upgrade(migrating, version_table)  # type: ignore[arg-type]
        await opening
        assert waiting.is_open
    finally:
        await waiting.close()
        await migrating.close()
        await watcher.close()


@pytest.mark.parametrize(
    "grants",
    [
        (),
        (
            'GRANT USAGE ON SCHEMA "{schema}" TO "{role}"',
            'GRANT SELECT, INSERT, UPDATE, DELETE ON "{schema}".authsessions_session TO "{role}"',
            'GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA "{schema}" TO "{role}"',
        ),
    ],
    ids=["no-usage-on-the-schema", "no-select-on-the-version-table"],
)
async def test_a_role_that_may_not_read_the_schema_version_is_told_so_not_unavailable(
    postgres_url: str, postgres_schema: str, grants: tuple[str, ...]
) -> None:
    """No retry mends it: every request answered 503 with only "42501" in the log."""
    async with PostgresStore(postgres_url, schema=postgres_schema):  # an admin migrated
        pass
    admin = await asyncpg.connect(postgres_url)
    role = f"authsessions_app_{secrets.token_hex(4)}"
    await admin.execute(f'CREATE ROLE "{role}" LOGIN')
    try:
        for grant in grants:
            await admin.execute(grant.format(schema=postgres_schema, role=role))
        server = urlsplit(postgres_url).netloc.rpartition("@")[2]
        store = PostgresStore(with_netloc(postgres_url, f"{role}@{server}"), schema=postgres_schema)
        with pytest.raises(RuntimeError, match="may not read the session table's schema version"):
            await store.open()
        assert not store.is_open
    finally:
        await admin.execute(f'DROP OWNED BY "{role}"')
        await admin.execute(f'DROP ROLE "{role}"')
        await admin.close()


@pytest.mark.parametrize(
    ("schema", "table"),
    [
        ("public", "sessions_schema_version"),
        ("public", "sessions_pkey"),
        ("public", "sessions_token_digest"),
        ("public", "sessions_user_id"),
        ("public", "sessions_expires_at"),
        ("public", "sessions_rotated_away_from"),
        ("pg_sessions", "sessions"),
        ("PG_sessions", "sessions"),
    ],
)
def test_a_name_that_would_meet_another_stores_or_postgresqls_own_is_refused(
    schema: str, table: str
) -> None:
    """A table "sessions_user_id" is the index of a store whose table is "sessions", and
    its version table "sessions_schema_version" held another store's sessions (a raw
    KeyError); a schema pg_… is PostgreSQL's to create (a 503)."""
    with pytest.raises(ValueError, match=r"pg_|must not end with"):
        PostgresStore("postgresql://127.0.0.1/test", schema=schema, table=table)


@contextlib.asynccontextmanager
async def as_a_role_that_may_only_read_and_write(
    admin: asyncpg.Connection[asyncpg.Record], postgres_url: str, schema: str
) -> AsyncIterator[str]:
    """``postgres_url`` signing in as a role with rights on the store's rows and its
    function, and on nothing else (no CREATE, owning nothing): an app's role where an
    admin runs the migrations."""
    role = f"authsessions_app_{secrets.token_hex(4)}"
    await admin.execute(f'CREATE ROLE "{role}" LOGIN')
    try:
        await admin.execute(f'GRANT USAGE ON SCHEMA "{schema}" TO "{role}"')
        await admin.execute(
            f'GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA "{schema}" TO "{role}"'
        )
        await admin.execute(f'GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA "{schema}" TO "{role}"')
        server = urlsplit(postgres_url).netloc.rpartition("@")[2]
        yield with_netloc(postgres_url, f"{role}@{server}")
    finally:
        await admin.execute(f'DROP OWNED BY "{role}"')
        await admin.execute(f'DROP ROLE "{role}"')


async def test_an_app_role_without_the_right_to_create_tables_opens_a_migrated_store(
    postgres_url: str, postgres_schema: str, admin: asyncpg.Connection[asyncpg.Record]
) -> None:
    """`authsessions migrate` ran as an admin; opening needs no DDL at this schema."""
    t0 = start_time()
    record = make_record(now=t0)
    async with PostgresStore(postgres_url, schema=postgres_schema):
        pass

    async with (
        as_a_role_that_may_only_read_and_write(admin, postgres_url, postgres_schema) as app_url,
        PostgresStore(app_url, schema=postgres_schema) as store,
    ):
        await store.create(record, max_sessions=10, now=t0)
        assert await store.get(record.token_digest, now=t0) == record

    assert await recorded_marks(admin, postgres_schema) == [(SCHEMA_VERSION, COMPATIBLE_FROM)]


@pytest.mark.parametrize("taken", ["sessions", "sessions_user_id"])
async def test_a_table_name_the_app_has_taken_is_named_not_reported_unavailable(
    postgres_url: str, postgres_schema: str, admin: asyncpg.Connection[asyncpg.Record], taken: str
) -> None:
    """An app's own table (or index) of the name the store's would take: "unavailable, try
    again shortly" on every request, where retrying meets it again."""
    await admin.execute(
        f'CREATE SCHEMA "{postgres_schema}";'
        f'CREATE TABLE "{postgres_schema}"."{taken}" (id serial PRIMARY KEY)'
    )
    store = PostgresStore(postgres_url, schema=postgres_schema, table="sessions")

    with pytest.raises(RuntimeError) as refused:
        await store.open()

    assert str(refused.value) == (
        f"The session table {postgres_schema}.sessions cannot be created beside what the "
        f'schema holds (relation "{taken}" already exists). Give the store a table name '
        "of its own (table=, or ?table= in its URL), or a schema of its own."
    )
    assert not store.is_open
    columns = await admin.fetch(
        "SELECT column_name FROM information_schema.columns WHERE table_schema = $1"
        " AND table_name = $2",
        postgres_schema,
        taken,
    )
    assert [row[0] for row in columns] == ["id"]  # the app's table as it was
    async with PostgresStore(postgres_url, schema=postgres_schema, table="auth_sessions"):
        pass


async def test_an_app_role_that_may_not_upgrade_an_older_schema_is_told_how_to(
    postgres_url: str, postgres_schema: str, admin: asyncpg.Connection[asyncpg.Record]
) -> None:
    """A permanent misconfiguration, not a store that is down for a while."""
    async with PostgresStore(postgres_url, schema=postgres_schema):
        pass
    await recorded_versions(admin, postgres_schema, set_to=SCHEMA_VERSION - 1)

    async with as_a_role_that_may_only_read_and_write(
        admin, postgres_url, postgres_schema
    ) as app_url:
        store = PostgresStore(app_url, schema=postgres_schema)
        with pytest.raises(RuntimeError) as refused:
            await store.open()

    assert str(refused.value).startswith(
        f"The session table {postgres_schema}.authsessions_session has schema version "
        f"{SCHEMA_VERSION - 1} and this release needs {SCHEMA_VERSION}, which this database "
        "role may not create (permission denied for schema"
    )
    assert "Run `authsessions migrate` as a role that may" in str(refused.value)
    assert not store.is_open
    assert await recorded_versions(admin, postgres_schema) == [SCHEMA_VERSION - 1]


async def test_open_marks_the_schema_usable_from_the_oldest_version_that_can(
    postgres_url: str, postgres_schema: str, admin: asyncpg.Connection[asyncpg.Record]
) -> None:
    async with PostgresStore(postgres_url, schema=postgres_schema):
        pass

    assert await recorded_marks(admin, postgres_schema) == [(SCHEMA_VERSION, COMPATIBLE_FROM)]
    assert COMPATIBLE_FROM <= SCHEMA_VERSION


@pytest.mark.parametrize(
    ("compatible_from", "usable"),
    [(None, ""), (SCHEMA_VERSION + 1, f" and usable from version {SCHEMA_VERSION + 1}")],
    ids=["unmarked", "marked-for-newer-only"],
)
async def test_a_newer_schema_is_refused_with_a_remedy(
    postgres_url: str,
    postgres_schema: str,
    admin: asyncpg.Connection[asyncpg.Record],
    compatible_from: int | None,
    usable: str,
) -> None:
    async with PostgresStore(postgres_url, schema=postgres_schema):
        pass
    await as_if_a_newer_release_migrated(admin, postgres_schema, compatible_from)

    store = PostgresStore(postgres_url, schema=postgres_schema)
    with pytest.raises(RuntimeError) as refused:
        await store.open()

    assert str(refused.value) == (
        f"The session table {postgres_schema}.authsessions_session has schema version "
        f"{SCHEMA_VERSION + 1}{usable}, newer than this authsessions release knows "
        f"({SCHEMA_VERSION}); upgrade authsessions."
    )
    assert not store.is_open
    assert await recorded_versions(admin, postgres_schema) == [SCHEMA_VERSION + 1]


async def test_a_refused_open_leaves_the_apps_connection_outside_any_transaction(
    postgres_url: str,
    postgres_schema: str,
    admin: asyncpg.Connection[asyncpg.Record],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The refusal is raised inside the migration's transaction, which is rolled back
    there: left to the pool's release, asyncpg logged it as an error."""
    async with PostgresStore(postgres_url, schema=postgres_schema):
        pass
    await as_if_a_newer_release_migrated(admin, postgres_schema, None)
    pool = await asyncpg.create_pool(postgres_url, min_size=1, max_size=1)
    try:
        with pytest.raises(RuntimeError, match="newer than this authsessions release knows"):
            await PostgresStore(pool=pool, schema=postgres_schema).open()
        async with pool.acquire() as connection:
            assert not connection.is_in_transaction()
    finally:
        await pool.close()
    assert "active transaction" not in caplog.text


async def test_a_newer_schema_marked_usable_by_this_release_is_used_as_it_is(
    postgres_url: str,
    postgres_schema: str,
    admin: asyncpg.Connection[asyncpg.Record],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A rolling deploy: a server of this release restarts after a newer one migrated."""
    t0 = start_time()
    record = make_record(now=t0)
    async with PostgresStore(postgres_url, schema=postgres_schema) as store:
        await store.create(record, max_sessions=10, now=t0)
    await as_if_a_newer_release_migrated(admin, postgres_schema, SCHEMA_VERSION)

    with caplog.at_level("INFO", logger="authsessions"):
        async with PostgresStore(postgres_url, schema=postgres_schema) as store:
            assert await store.get(record.token_digest, now=t0) == record
            assert await store.update(record.id, make_update(now=t0 + 1), now=t0 + 1)

    assert await recorded_versions(admin, postgres_schema) == [SCHEMA_VERSION + 1]
    assert f"newer than this release knows ({SCHEMA_VERSION}) but marked usable" in caplog.text


async def test_tables_with_other_names_are_separate_stores(
    postgres_url: str, postgres_schema: str
) -> None:
    t0 = start_time()
    record = make_record(now=t0)
    async with (
        PostgresStore(postgres_url, schema=postgres_schema, table="app_a") as a,
        PostgresStore(postgres_url, schema=postgres_schema, table="app_b") as b,
    ):
        await a.create(record, max_sessions=10, now=t0)

        assert await a.get(record.token_digest, now=t0) == record
        assert await b.get(record.token_digest, now=t0) is None
        assert await b.delete_for_user("alice", now=t0) == 0


@pytest.mark.parametrize("name", ['x"; DROP TABLE y; --', "1starts_with_digit", "a" * 41, ""])
def test_unsafe_table_and_schema_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="identifier"):
        PostgresStore("postgresql://localhost/db", table=name)
    with pytest.raises(ValueError, match="identifier"):
        PostgresStore("postgresql://localhost/db", schema=name)


@pytest.mark.parametrize(
    ("min_size", "max_size", "refused"),
    [(0, 0, "max_size >= 1"), (3, 2, "min_size <= max_size"), (-1, 2, "0 <= min_size")],
)
def test_pool_sizes_no_pool_can_have_are_refused_when_the_store_is_built(
    min_size: int, max_size: int, refused: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(refused)):
        PostgresStore("postgresql://localhost/db", min_size=min_size, max_size=max_size)


@pytest.mark.parametrize(
    ("option", "value", "error"),
    [
        ("max_size", 2.5, TypeError),  # asyncpg's own TypeError, only as the store opened
        ("min_size", True, TypeError),
        ("command_timeout", math.inf, ValueError),  # a silent server held calls for ever
        ("acquire_timeout", math.nan, ValueError),
        ("connect_timeout", 0, ValueError),
        ("connect_timeout", "5", TypeError),
    ],
)
def test_sizes_and_timeouts_no_store_can_honour_are_refused_when_it_is_built(
    option: str, value: object, error: type[Exception]
) -> None:
    with pytest.raises(error, match=option):
        PostgresStore("postgresql://localhost/db", **{option: value})  # type: ignore[arg-type]


def test_a_size_of_any_integer_type_is_taken_as_an_int() -> None:
    """A numpy integer, say: not an int, but an integer (``__index__``)."""

    class Integer:
        def __index__(self) -> int:
            return 3

    store = PostgresStore("postgresql://localhost/db", min_size=Integer(), max_size=Integer())  # type: ignore[arg-type]

    assert (store.min_size, store.max_size) == (3, 3)
    assert type(store.max_size) is int


async def test_data_jsonb_alone_would_mangle_round_trips_exactly(
    postgres_store: Store,
) -> None:
    """``jsonb`` turns 1e300 into a 301-digit integer and refuses NUL, even in keys."""
    t0 = start_time()
    data = {"nul\x00key": "nul\x00value", "huge": 1e300, "exact": 0.1, "int": 10**20}
    record = make_record(now=t0, data=data)
    await postgres_store.create(record, max_sessions=10, now=t0)
    update = make_update(now=t0, set_keys={"more\x00": [1e20]}, removed_keys=frozenset({"int"}))
    assert await postgres_store.update(record.id, update, now=t0)

    found = await postgres_store.get(record.token_digest, now=t0)

    assert found is not None
    assert typed(found.data) == typed(
        {"nul\x00key": "nul\x00value", "huge": 1e300, "exact": 0.1, "more\x00": [1e20]}
    )


async def test_a_touch_another_request_made_since_its_cutoff_writes_no_row_version(
    postgres_url: str, postgres_schema: str, admin: asyncpg.Connection[asyncpg.Record]
) -> None:
    """Of the requests that found a touch due together, only the first writes: the others
    leave the row as it is, where a rewrite with the same values is a new row version."""
    t0 = start_time()
    record = make_record(now=t0)
    async with PostgresStore(postgres_url, schema=postgres_schema) as store:
        await store.create(record, max_sessions=10, now=t0)
        first = dataclasses.replace(make_update(now=t0 + 100), touch_if_last_active_by=t0 + 40)
        assert await store.update(record.id, first, now=t0 + 100)
        version_of_the_row = (
            f'SELECT xmin::text FROM "{postgres_schema}".authsessions_session WHERE id = $1'  # noqa: S608
        )
        touched = await admin.fetchval(version_of_the_row, record.id)

        later = dataclasses.replace(make_update(now=t0 + 101), touch_if_last_active_by=t0 + 41)
        assert await store.update(record.id, later, now=t0 + 101)

        assert await admin.fetchval(version_of_the_row, record.id) == touched


async def test_a_touch_waiting_for_a_concurrent_logout_finds_the_session_gone(
    postgres_url: str, postgres_schema: str, admin: asyncpg.Connection[asyncpg.Record]
) -> None:
    """The touch writes no row when the session was touched since its cutoff, and then
    asks whether it is live: in a statement of its own, as the touch's snapshot, taken
    while the logout's delete was not yet committed, still held the row."""
    t0 = start_time()
    record = make_record(now=t0)
    async with PostgresStore(postgres_url, schema=postgres_schema) as store:
        await store.create(record, max_sessions=10, now=t0)
        logout = admin.transaction()
        await logout.start()
        await admin.execute(
            f'DELETE FROM "{postgres_schema}".authsessions_session WHERE id = $1',  # noqa: S608
            record.id,
        )
        touch = dataclasses.replace(make_update(now=t0 + 100), touch_if_last_active_by=t0 + 40)
        touching = asyncio.create_task(store.update(record.id, touch, now=t0 + 100))
        watcher = await asyncpg.connect(postgres_url)  # admin's transaction sees no change
        try:
            await wait_until_blocked(watcher, "%UPDATE")  # alone, or in a WITH
        finally:
            await watcher.close()
        await logout.commit()

        assert await asyncio.wait_for(touching, timeout=5) is False


# -- a login over a live session ------------------------------------------------------------


async def test_a_login_over_a_session_whose_mark_fails_creates_nothing(
    postgres_url: str, postgres_schema: str, admin: asyncpg.Connection[asyncpg.Record]
) -> None:
    """The create function cannot take the replaced digest (its signature is fixed), so a
    second statement marks the new session: both in one transaction, or a failure between
    them leaves a session whose browser's requests in flight are answered as dead ones."""
    t0 = start_time()
    login = make_record(now=t0)
    table = f'"{postgres_schema}".authsessions_session'
    async with PostgresStore(postgres_url, schema=postgres_schema) as store:
        await admin.execute(
            f'CREATE FUNCTION "{postgres_schema}".refuse() RETURNS trigger LANGUAGE plpgsql'
            " AS $$BEGIN RAISE EXCEPTION 'refused'; END$$;"
            f" CREATE TRIGGER refuse BEFORE UPDATE ON {table}"
            f' FOR EACH ROW EXECUTE FUNCTION "{postgres_schema}".refuse()'
        )

        with pytest.raises(StoreUnavailable):
            await store.create(login, max_sessions=10, now=t0, replaced=(new_digest(), t0 + 60))

        assert await admin.fetchval(f"SELECT count(*) FROM {table}") == 0  # noqa: S608
        # A login over no session writes once, so the trigger never fires.
        await store.create(login, max_sessions=10, now=t0)
        assert await store.get(login.token_digest, now=t0) == login


@pytest.mark.parametrize("taken", ["id", "token digest"])
async def test_a_login_over_a_session_under_a_taken_name_is_refused_and_marks_nothing(
    postgres_store: Store, taken: str
) -> None:
    """The unique violation raised inside the transaction is still a CreateError, and the
    transaction's rollback leaves the connection fit for the next call."""
    t0 = start_time()
    kept, login, replaced_digest = make_record(now=t0), make_record(now=t0), new_digest()
    await postgres_store.create(kept, max_sessions=10, now=t0)
    if taken == "id":
        login = dataclasses.replace(login, id=kept.id)
    else:
        login = dataclasses.replace(login, token_digest=kept.token_digest)

    for _ in range(3):  # over the few connections the store holds
        with pytest.raises(CreateError):
            await postgres_store.create(
                login, max_sessions=10, now=t0, replaced=(replaced_digest, t0 + 60)
            )

    assert not await postgres_store.rotated_away_to(replaced_digest, now=t0)
    assert await postgres_store.get(kept.token_digest, now=t0) == kept
    again = make_record(now=t0)
    await postgres_store.create(again, max_sessions=10, now=t0, replaced=(replaced_digest, t0 + 60))
    assert await postgres_store.rotated_away_to(replaced_digest, now=t0)


async def test_a_login_over_a_session_that_times_out_leaves_nothing_and_the_store_recovers(
    postgres_url: str, postgres_schema: str, admin: asyncpg.Connection[asyncpg.Record]
) -> None:
    """A statement timing out inside the transaction: the rollback waits for its
    cancellation, and the connection goes back to the pool, not terminated as lost."""
    dsn, name = named_dsn(postgres_url)
    t0 = start_time()
    kept, login, replaced_digest = make_record(now=t0), make_record(now=t0), new_digest()
    store = PostgresStore(
        dsn, schema=postgres_schema, max_size=1, command_timeout=0.3, acquire_timeout=2
    )
    async with asyncio.timeout(10), store:
        await store.create(kept, max_sessions=10, now=t0)
        (pid,) = await admin.fetchval(BACKENDS_NAMED, name)
        async with table_locked(admin, postgres_schema):
            with pytest.raises(StoreUnavailable) as raised:
                await store.create(
                    login, max_sessions=10, now=t0, replaced=(replaced_digest, t0 + 60)
                )
            assert isinstance(raised.value.__cause__, TimeoutError)

        assert await store.get(login.token_digest, now=t0) is None
        assert not await store.rotated_away_to(replaced_digest, now=t0)
        await store.create(login, max_sessions=10, now=t0, replaced=(replaced_digest, t0 + 60))
        assert await store.rotated_away_to(replaced_digest, now=t0)
        assert await admin.fetchval(BACKENDS_NAMED, name) == [pid]


# -- the pool -------------------------------------------------------------------------------


async def test_pool_sizes_bound_the_connections_used(
    postgres_url: str, postgres_schema: str, admin: asyncpg.Connection[asyncpg.Record]
) -> None:
    dsn, name = named_dsn(postgres_url)
    count = CONNECTIONS_NAMED
    t0 = start_time()
    async with PostgresStore(dsn, schema=postgres_schema, min_size=2, max_size=3) as store:
        assert await admin.fetchval(count, name) == 2
        record = make_record(now=t0)
        await store.create(record, max_sessions=10, now=t0)

        found = await asyncio.gather(*(store.get(record.token_digest, now=t0) for _ in range(40)))

        assert found == [record] * 40
        assert 2 <= await admin.fetchval(count, name) <= 3
    assert await admin.fetchval(count, name) == 0


async def test_an_exhausted_pool_gives_store_unavailable_within_the_timeout(
    postgres_url: str, postgres_schema: str
) -> None:
    """A pool that is used up must not queue requests for ever: they get 503 promptly."""
    pool = await asyncpg.create_pool(postgres_url, min_size=1, max_size=1)
    store = PostgresStore(pool=pool, schema=postgres_schema, acquire_timeout=0.5)
    await store.open()
    t0 = start_time()

    async with pool.acquire():
        started = time.monotonic()
        with pytest.raises(StoreUnavailable) as raised:
            # Bounded: a store that waited for the pool for ever would hang the test.
            await asyncio.wait_for(store.get(make_record(now=t0).token_digest, now=t0), 10)
        assert time.monotonic() - started < 5
    assert isinstance(raised.value.__cause__, TimeoutError)

    assert await store.get(make_record(now=t0).token_digest, now=t0) is None
    await store.close()
    # The app's pool is the app's to close.
    assert await pool.fetchval("SELECT 1") == 1
    await pool.close()


async def test_an_apps_pool_gets_its_connection_back_after_every_call(
    postgres_url: str, postgres_schema: str
) -> None:
    """The store holds no connection of an app's pool between calls: the app needs them."""
    pool = await asyncpg.create_pool(postgres_url, min_size=1, max_size=1)
    t0 = start_time()
    record = make_record(now=t0)
    async with PostgresStore(pool=pool, schema=postgres_schema, acquire_timeout=1) as store:
        await store.create(record, max_sessions=10, now=t0)
        assert await store.get(record.token_digest, now=t0) == record

        async with pool.acquire(timeout=0.5) as connection:
            assert await connection.fetchval("SELECT 1") == 1
        # The app may even close its pool first, without waiting for the store.
        await asyncio.wait_for(pool.close(), timeout=5)


async def test_a_store_opens_again_on_the_apps_connection_that_migrated_its_table(
    postgres_url: str, postgres_schema: str
) -> None:
    """The migration read the version table with ``SELECT *``, which asyncpg had
    prepared on that connection before it added a column: opening the store again there
    (a restart of the app's sessions, a second store of the same table) failed with
    "cached plan must not change result type", as unavailable."""
    pool = await asyncpg.create_pool(postgres_url, min_size=1, max_size=1)
    t0 = start_time()
    record = make_record(now=t0)
    try:
        async with PostgresStore(pool=pool, schema=postgres_schema) as store:
            await store.create(record, max_sessions=10, now=t0)
        async with PostgresStore(pool=pool, schema=postgres_schema) as store:
            assert await store.get(record.token_digest, now=t0) == record
    finally:
        await pool.close()


async def test_an_apps_pool_never_awaited_is_named_not_reported_unavailable(
    postgres_url: str, postgres_schema: str
) -> None:
    """``create_pool`` without ``await`` is the app's mistake: "unavailable, try again
    shortly" on every request would hide it. The store opens once the pool is ready."""
    pool = asyncpg.create_pool(postgres_url, min_size=1, max_size=1)
    store = PostgresStore(pool=pool, schema=postgres_schema)

    with pytest.raises(RuntimeError, match=r"pool is not initialized.*await asyncpg\.create_pool"):
        await store.open()
    assert not store.is_open

    await pool
    try:
        async with store:
            t0 = start_time()
            assert await store.get(make_record(now=t0).token_digest, now=t0) is None
    finally:
        await pool.close()


async def test_an_apps_pool_already_closed_is_named_not_reported_unavailable(
    postgres_url: str, postgres_schema: str
) -> None:
    pool = await asyncpg.create_pool(postgres_url, min_size=1, max_size=1)
    await pool.close()
    store = PostgresStore(pool=pool, schema=postgres_schema)

    with pytest.raises(RuntimeError, match=r"pool is closed.*close the pool after the store"):
        await store.open()
    assert not store.is_open


async def test_an_apps_pool_closed_under_an_open_store_is_named_in_the_log(
    postgres_url: str, postgres_schema: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Closing the pool before the store fails every call closed (a 503 each), and the log
    says why, where a bare "InterfaceError" left an operator to guess."""
    pool = await asyncpg.create_pool(postgres_url, min_size=1, max_size=1)
    t0 = start_time()
    async with PostgresStore(pool=pool, schema=postgres_schema) as store:
        await pool.close()
        with caplog.at_level("WARNING", logger="authsessions"):
            with pytest.raises(StoreUnavailable):
                await store.get(make_record(now=t0).token_digest, now=t0)
            with pytest.raises(StoreUnavailable):
                await store.delete_for_user("someone", now=t0)
    # Warnings only: another test may have left the root logger at INFO, and the store's
    # opening said it created the table.
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == ["the PostgreSQL session store failed: InterfaceError: pool is closed"] * 2


async def test_an_apps_pool_losing_its_connection_while_the_store_opens_is_unavailable(
    postgres_url: str, postgres_schema: str, admin: asyncpg.Connection[asyncpg.Record]
) -> None:
    """A connection lost under the open's transaction (a restart, a failover) is an outage
    to retry, not the app's pool misused: asyncpg reports it leaving the transaction with
    the same InterfaceError class as a closed pool."""
    pool = await asyncpg.create_pool(postgres_url, min_size=1, max_size=1)
    upgrading = await asyncpg.connect(postgres_url)
    store = PostgresStore(pool=pool, schema=postgres_schema)
    try:
        # Another server's schema upgrade holds the lock: the open waits in its transaction.
        await upgrading.execute(
            "SELECT pg_advisory_lock(hashtextextended($1, 0))",
            f"authsessions migrate {postgres_schema}.authsessions_session",
        )
        opening = asyncio.ensure_future(store.open())
        waiting = "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
        for _ in range(100):
            if (pid := await admin.fetchval(waiting)) is not None:
                break
            await asyncio.sleep(0.05)
        assert pid is not None
        await admin.execute("SELECT pg_terminate_backend($1)", pid)

        with pytest.raises(StoreUnavailable):
            await asyncio.wait_for(opening, 10)
        assert not store.is_open
    finally:
        await upgrading.close()
        await pool.close()


async def test_an_apps_pool_without_a_command_timeout_gets_the_stores(
    postgres_url: str, postgres_schema: str, admin: asyncpg.Connection[asyncpg.Record]
) -> None:
    """An app's pool made without ``command_timeout`` must not make the store's calls wait
    for ever: the store's own timeout applies to its reads and its writes alike."""
    pool = await asyncpg.create_pool(postgres_url, min_size=1, max_size=2)
    t0 = start_time()
    record = make_record(now=t0)
    try:
        store = PostgresStore(pool=pool, schema=postgres_schema, command_timeout=0.5)
        async with store:
            await store.create(record, max_sessions=10, now=t0)
            async with table_locked(admin, postgres_schema):
                for call in (
                    lambda: store.get(record.token_digest, now=t0),
                    lambda: store.delete_for_user("alice", now=t0),
                ):
                    # Without the store's timeout the call waits for the lock: wait_for's
                    # TimeoutError, not StoreUnavailable.
                    with pytest.raises(StoreUnavailable):
                        await asyncio.wait_for(call(), 10)
            assert await store.get(record.token_digest, now=t0) == record
    finally:
        pool.terminate()


async def test_a_write_in_a_transaction_that_timed_out_is_rolled_back_by_the_store(
    postgres_url: str,
    postgres_schema: str,
    admin: asyncpg.Connection[asyncpg.Record],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A login over a session is a transaction of the store's own: timed out (here behind
    a lock), it was left open for the pool's release to roll back, which asyncpg logged
    as an error ("Resetting connection with an active transaction")."""
    pool = await asyncpg.create_pool(postgres_url, min_size=1, max_size=1)
    t0 = start_time()
    old, new = make_record(now=t0), make_record(now=t0)
    try:
        store = PostgresStore(pool=pool, schema=postgres_schema, command_timeout=0.5)
        async with store:
            await store.create(old, max_sessions=10, now=t0)
            async with table_locked(admin, postgres_schema):
                with pytest.raises(StoreUnavailable):
                    await asyncio.wait_for(
                        store.create(
                            new, max_sessions=10, now=t0, replaced=(old.token_digest, t0 + 120)
                        ),
                        10,
                    )
            assert await store.get(new.token_digest, now=t0) is None
            async with pool.acquire() as connection:
                assert not connection.is_in_transaction()
    finally:
        await pool.close()
    assert "active transaction" not in caplog.text


async def test_an_exhausted_own_pool_gives_store_unavailable_within_the_timeout(
    postgres_url: str, postgres_schema: str, admin: asyncpg.Connection[asyncpg.Record]
) -> None:
    t0 = start_time()
    record = make_record(now=t0)
    store = PostgresStore(
        postgres_url, schema=postgres_schema, max_size=1, acquire_timeout=0.5, command_timeout=5
    )
    async with store:
        await store.create(record, max_sessions=10, now=t0)
        async with table_locked(admin, postgres_schema):
            waiting = asyncio.ensure_future(store.get(record.token_digest, now=t0))
            await asyncio.sleep(0.1)  # it holds the only connection, waiting for the lock

            started = time.monotonic()
            with pytest.raises(StoreUnavailable) as raised:
                await store.get(record.token_digest, now=t0)
            assert time.monotonic() - started < 2
            assert isinstance(raised.value.__cause__, TimeoutError)

        assert await waiting == record
        assert await store.get(record.token_digest, now=t0) == record


async def test_a_call_waiting_for_the_pool_gets_the_connection_a_finished_call_frees(
    postgres_url: str, postgres_schema: str, admin: asyncpg.Connection[asyncpg.Record]
) -> None:
    """A finished call must hand its connection to a waiting one, not keep it idle."""
    t0 = start_time()
    record = make_record(now=t0)
    store = PostgresStore(postgres_url, schema=postgres_schema, max_size=1, acquire_timeout=2)
    async with store:
        await store.create(record, max_sessions=10, now=t0)
        async with table_locked(admin, postgres_schema):
            first = asyncio.ensure_future(store.get(record.token_digest, now=t0))
            await asyncio.sleep(0.1)
            second = asyncio.ensure_future(store.get(record.token_digest, now=t0))
            await asyncio.sleep(0.1)  # waiting for the pool now

        started = time.monotonic()
        assert list(await asyncio.gather(first, second)) == [record, record]
        assert time.monotonic() - started < 1


async def test_connections_idle_for_long_go_back_to_the_pool(
    postgres_url: str, postgres_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once traffic drops, the free list shrinks: its oldest connection goes back to the
    pool (which closes it in time) instead of being held for ever."""
    # Half a minute in the store; a fifth of a second here, or the test would wait for it.
    monkeypatch.setattr(_postgres_pool, "IDLE_SECONDS", 0.2)
    t0 = start_time()
    record = make_record(now=t0)
    async with PostgresStore(postgres_url, schema=postgres_schema, min_size=0, max_size=3) as store:
        await store.create(record, max_sessions=10, now=t0)
        connections = await idle_connections(store, 3)
        await asyncio.sleep(0.3)  # longer than IDLE_SECONDS: every one of them idle for long

        assert await store.get(record.token_digest, now=t0) == record

        # The read took the newest and put it back; the oldest went to the pool.
        assert len(connections._idle) == 2


async def test_one_call_in_return_every_gives_its_connection_to_the_pool(
    postgres_url: str, postgres_schema: str, admin: asyncpg.Connection[asyncpg.Record]
) -> None:
    """Every RETURN_EVERY calls a connection goes back to the pool, so that the pool's own
    housekeeping still reaches connections the store would otherwise keep for ever: here,
    a connection the pool was told to expire is closed once it comes back."""
    dsn, name = named_dsn(postgres_url)
    t0 = start_time()
    record = make_record(now=t0)
    async with PostgresStore(dsn, schema=postgres_schema, min_size=1, max_size=1) as store:
        await store.create(record, max_sessions=10, now=t0)
        (pid,) = await admin.fetchval(BACKENDS_NAMED, name)
        assert store._pool is not None
        await store._pool.expire_connections()  # the pool closes it when it gets it back

        for _ in range(_postgres_pool.RETURN_EVERY):
            assert await store.get(record.token_digest, now=t0) == record

        await until_gone(admin, [pid])
        assert await store.get(record.token_digest, now=t0) == record


async def test_a_read_that_times_out_or_is_cancelled_hands_back_its_idle_connection(
    postgres_url: str, postgres_schema: str, admin: asyncpg.Connection[asyncpg.Record]
) -> None:
    """get runs on a free-list connection directly (its fast path): a failed or cancelled
    read must still give that connection to the pool, or a one-connection pool is gone."""
    t0 = start_time()
    record = make_record(now=t0)
    store = PostgresStore(
        postgres_url, schema=postgres_schema, max_size=1, command_timeout=0.3, acquire_timeout=1
    )
    async with asyncio.timeout(10), store:  # a connection never given back hangs the close
        await store.create(record, max_sessions=10, now=t0)
        for _ in range(3):  # the connection sits in the free list between reads
            assert await store.get(record.token_digest, now=t0) == record
        async with table_locked(admin, postgres_schema):
            with pytest.raises(StoreUnavailable):
                await store.get(record.token_digest, now=t0)
            reading = asyncio.ensure_future(store.get(record.token_digest, now=t0))
            await asyncio.sleep(0.1)
            reading.cancel()
            with pytest.raises(asyncio.CancelledError):
                await reading
        for _ in range(3):
            assert await store.get(record.token_digest, now=t0) == record


def test_data_decodes_as_one_json_text_exactly() -> None:
    """get joins the stored key and value texts into one object to decode it at once."""
    from authsessions._records import dump_json
    from authsessions.stores.postgres import _decode_data, _encode_data

    data = {
        "k": "v",
        'q"\\/': [1e20, -0.0, None, {"n": True}],
        "\u0000\ud800\u00e9": "\u4e2d",
        "": {},
        "1": 1,
    }
    # As PostgreSQL's jsonb output writes the stored object: spaced, keys reordered.
    stored = json.loads(_encode_data(data))
    text = "{" + ", ".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in stored.items()) + "}"
    decoded = _decode_data(text)
    assert decoded == data
    assert dump_json(decoded) == dump_json(data)  # -0.0, 1e20 and the rest, exactly
    assert _decode_data("{}") == {}


async def test_a_cancelled_call_does_not_hand_its_connection_to_the_next(
    postgres_url: str, postgres_schema: str, admin: asyncpg.Connection[asyncpg.Record]
) -> None:
    """A cancelled query leaves its connection cancelling, maybe mid-transaction."""
    t0 = start_time()
    kept = make_record(now=t0)
    cancelled = make_record(now=t0 + 1)
    store = PostgresStore(postgres_url, schema=postgres_schema, max_size=1, acquire_timeout=2)
    async with store:
        await store.create(kept, max_sessions=10, now=t0)
        async with table_locked(admin, postgres_schema):
            creating = asyncio.ensure_future(
                store.create(cancelled, max_sessions=10, now=cancelled.created_at)
            )
            await asyncio.sleep(0.1)  # inside its transaction, waiting for the lock
            creating.cancel()
            with pytest.raises(asyncio.CancelledError):
                await creating

        for _ in range(3):
            assert await store.get(kept.token_digest, now=t0 + 1) == kept
        assert [record.id for record in await store.list_for_user("alice", now=t0 + 1)] == [kept.id]
        again = make_record(now=t0 + 2)
        await store.create(again, max_sessions=10, now=t0 + 2)
        assert await store.get(again.token_digest, now=t0 + 2) == again


async def test_closing_waits_for_running_calls_and_leaves_no_connection_open(
    postgres_url: str, postgres_schema: str, admin: asyncpg.Connection[asyncpg.Record]
) -> None:
    dsn, name = named_dsn(postgres_url)
    t0 = start_time()
    record = make_record(now=t0)
    store = PostgresStore(dsn, schema=postgres_schema, min_size=1, max_size=3)
    await store.open()
    await store.create(record, max_sessions=10, now=t0)
    await asyncio.gather(*(store.get(record.token_digest, now=t0) for _ in range(3)))
    assert await admin.fetchval(CONNECTIONS_NAMED, name) == 3

    async with table_locked(admin, postgres_schema):
        running = asyncio.ensure_future(store.get(record.token_digest, now=t0))
        await asyncio.sleep(0.1)
        closing = asyncio.ensure_future(store.close())
        await asyncio.sleep(0.1)
        assert not closing.done()  # the running call still has its connection

    async with asyncio.timeout(5):
        assert await running == record
        await closing
    assert await admin.fetchval(CONNECTIONS_NAMED, name) == 0


async def test_open_store_builds_a_postgres_store_from_a_url(postgres_url: str) -> None:
    store = open_store(postgres_url)
    assert isinstance(store, PostgresStore)
    assert open_store(postgres_url.replace("postgresql://", "postgres://", 1)) is not store


# -- failures ---------------------------------------------------------------------------------


async def test_an_unreachable_server_gives_store_unavailable_at_open() -> None:
    with refusing_port() as port:
        store = PostgresStore(f"postgresql://postgres@127.0.0.1:{port}/test", connect_timeout=1)
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await store.open()
    assert time.monotonic() - started < 5
    assert not store.is_open


@pytest.mark.parametrize("pool", ["own", "apps"])
async def test_a_silent_server_gives_store_unavailable_within_the_timeouts(
    postgres_url: str, postgres_schema: str, proxy: TcpProxy, pool: str
) -> None:
    """A server that stops answering (a network partition) must not hang requests, on an
    app's pool (made without timeouts of its own) too: releasing the connection after the
    failed call is bounded by the store's timeout as well."""
    t0 = start_time()
    record = make_record(now=t0)
    apps_pool = None
    if pool == "own":
        store = impatient_store_through(proxy, postgres_url, postgres_schema)
    else:
        dsn = dsn_through(proxy, postgres_url)
        apps_pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
        store = PostgresStore(
            pool=apps_pool, schema=postgres_schema, command_timeout=0.5, acquire_timeout=1.0
        )
    try:
        async with store:
            await store.create(record, max_sessions=10, now=t0)
            proxy.stall()

            started = time.monotonic()
            with pytest.raises(StoreUnavailable):
                await asyncio.wait_for(store.get(record.token_digest, now=t0), 10)
            assert time.monotonic() - started < 5

            proxy.unstall()
            assert await store.get(record.token_digest, now=t0) == record
    finally:
        proxy.unstall()
        if apps_pool is not None:
            apps_pool.terminate()


async def test_asking_for_the_schema_version_gives_up_on_a_silent_server(
    postgres_url: str, postgres_schema: str, proxy: TcpProxy
) -> None:
    """The command line asks it before any command: the query timed out, and then closing
    its connection waited for the server for ever."""
    store = impatient_store_through(proxy, postgres_url, postgres_schema)
    proxy.stall_at(b"to_regclass")  # connected; then the server stops answering
    started = time.monotonic()
    try:
        with pytest.raises(StoreUnavailable):
            await asyncio.wait_for(store._created_version(), 10)
    finally:
        proxy.unstall()
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("write", ["login over a session", "update at repeatable read"])
async def test_a_write_in_a_transaction_on_an_apps_pool_does_not_hang_on_a_silent_server(
    postgres_url: str, postgres_schema: str, proxy: TcpProxy, write: str
) -> None:
    """asyncpg's transaction, rolling back after the statement timed out, first waits for
    the statement's cancellation, bounded only by the pool's own command_timeout: on an
    app's pool made without one, the call never returned."""
    t0 = start_time()
    old = make_record(now=t0)
    dsn = dsn_through(proxy, postgres_url)
    settings = {"default_transaction_isolation": "repeatable read"}
    apps_pool = await asyncpg.create_pool(
        dsn, min_size=1, max_size=2, server_settings=settings if "repeatable" in write else None
    )
    store = PostgresStore(
        pool=apps_pool, schema=postgres_schema, command_timeout=0.5, acquire_timeout=1.0
    )
    try:
        async with store:
            await store.create(old, max_sessions=10, now=t0)
            proxy.stall()
            if write == "login over a session":
                running: Awaitable[object] = store.create(
                    make_record(now=t0),
                    max_sessions=10,
                    now=t0,
                    replaced=(old.token_digest, t0 + 120),
                )
            else:
                running = store.update(old.id, make_update(now=t0, set_keys={"a": 1}), now=t0)

            started = time.monotonic()
            with pytest.raises(StoreUnavailable):
                await asyncio.wait_for(running, 10)
            assert time.monotonic() - started < 5

            proxy.unstall()
            assert await store.get(old.token_digest, now=t0) is not None
    finally:
        proxy.unstall()
        apps_pool.terminate()


@pytest.mark.parametrize(
    "stalls_at", ["its first statement", "the migration", "the isolation check"]
)
async def test_opening_on_an_apps_pool_does_not_hang_on_a_silent_server(
    postgres_url: str, postgres_schema: str, proxy: TcpProxy, stalls_at: str
) -> None:
    """On an app's pool made without a command_timeout, the open's migration ran in
    asyncpg's transaction (whose BEGIN, and whose ROLLBACK after a timeout, were bounded
    by nothing) and its isolation check had no timeout: on a silent server the open,
    and so the app's startup or first request, never returned."""
    apps_pool = await asyncpg.create_pool(dsn_through(proxy, postgres_url), min_size=1)
    store = PostgresStore(
        pool=apps_pool, schema=postgres_schema, command_timeout=0.5, acquire_timeout=1.0
    )
    try:
        if stalls_at == "its first statement":
            proxy.stall()
        elif stalls_at == "the migration":
            proxy.stall_at(b"pg_advisory_xact_lock")
        else:
            # Migrated by another server: the open goes straight on to the check.
            async with PostgresStore(postgres_url, schema=postgres_schema):
                pass
            proxy.stall_at(b"SHOW default_transaction_isolation")

        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await asyncio.wait_for(store.open(), 10)
        assert time.monotonic() - started < 5
        assert not store.is_open

        proxy.unstall()
        record = make_record(now=start_time())
        async with store:
            await store.create(record, max_sessions=10, now=record.created_at)
            assert await store.get(record.token_digest, now=record.created_at) == record
    finally:
        proxy.unstall()
        apps_pool.terminate()


@pytest.mark.parametrize("call", ["get", "update"])
async def test_a_call_cancelled_while_the_server_is_silent_ends_cancelled(
    postgres_url: str, postgres_schema: str, proxy: TcpProxy, call: str
) -> None:
    """The connection's release, after the cancellation, times out on a silent server:
    its TimeoutError replaced the cancellation, and a cancelled request (a timeout around
    it, a task group, a shutdown) ended as a store outage instead."""
    t0 = start_time()
    record = make_record(now=t0)
    dsn = dsn_through(proxy, postgres_url)
    store = PostgresStore(dsn, schema=postgres_schema, command_timeout=5.0, acquire_timeout=1.0)
    try:
        async with store:
            await store.create(record, max_sessions=10, now=t0)
            proxy.stall()
            changes = make_update(now=t0, set_keys={"a": 1})
            running: Awaitable[object] = (
                store.get(record.token_digest, now=t0)
                if call == "get"
                else store.update(record.id, changes, now=t0)
            )
            task = asyncio.ensure_future(running)
            await asyncio.sleep(0.2)
            task.cancel()
            await asyncio.wait([task], timeout=10)

            ended_as = "cancelled" if task.cancelled() else repr(task.exception())
            assert ended_as == "cancelled"
            proxy.unstall()
            assert await store.get(record.token_digest, now=t0) is not None
    finally:
        proxy.unstall()


async def test_dropped_connections_give_store_unavailable_then_the_store_recovers(
    postgres_url: str, postgres_schema: str, proxy: TcpProxy
) -> None:
    t0 = start_time()
    record = make_record(now=t0, data={"a": 1})
    store = impatient_store_through(proxy, postgres_url, postgres_schema, max_size=2)
    async with store:
        await store.create(record, max_sessions=10, now=t0)
        await proxy.drop()

        for operation in (
            store.get(record.token_digest, now=t0),
            store.update(record.id, make_update(now=t0, set_keys={"b": 2}), now=t0),
            store.create(make_record(now=t0), max_sessions=10, now=t0),
        ):
            started = time.monotonic()
            with pytest.raises(StoreUnavailable) as raised:
                await operation
            assert time.monotonic() - started < 5
            assert isinstance(raised.value.__cause__, OSError | asyncpg.PostgresError)

        await proxy.resume()
        assert await store.get(record.token_digest, now=t0) == record
        assert await store.update(record.id, make_update(now=t0, set_keys={"b": 2}), now=t0)


@pytest.mark.parametrize("when", ["at-once", "once-seen"])
@pytest.mark.parametrize("cause", ["network", "server"])
async def test_connections_broken_while_idle_are_replaced(
    postgres_url: str,
    postgres_schema: str,
    proxy: TcpProxy,
    admin: asyncpg.Connection[asyncpg.Record],
    cause: str,
    when: str,
) -> None:
    """Idle connections die unseen (a server restart, a network cut, an idle timeout).

    Right away, one call may still meet a connection the server is closing
    (its farewell read, its socket not yet closed); once the sockets are
    closed, every broken connection is noticed when taken and no call fails.
    """
    name = f"authsessions_{secrets.token_hex(4)}"
    t0 = start_time()
    record = make_record(now=t0)
    store = impatient_store_through(
        proxy, postgres_url, postgres_schema, max_size=3, query=f"application_name={name}"
    )
    async with store:
        await store.create(record, max_sessions=10, now=t0)
        # Calls at once leave three connections idle (in the store, or in its pool).
        found = await asyncio.gather(*(store.get(record.token_digest, now=t0) for _ in range(3)))
        assert found == [record] * 3
        pids = await admin.fetchval(BACKENDS_NAMED, name)
        assert len(pids) == 3

        if cause == "network":
            await proxy.drop()
            await proxy.resume()
        else:
            terminate = "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            await admin.execute(f"{terminate} WHERE application_name = $1", name)

        if when == "at-once":
            with contextlib.suppress(StoreUnavailable):
                assert await store.get(record.token_digest, now=t0) == record
        else:
            # Until the server has let go of those connections (the pool may open others).
            alive = "SELECT count(*) FROM pg_stat_activity WHERE pid = any($1)"
            for _ in range(250):
                if not await admin.fetchval(alive, pids):
                    break
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.05)
        # Every call from now on succeeds: the broken connections are all replaced.
        for _ in range(3):
            assert await store.get(record.token_digest, now=t0) == record
        found = await asyncio.gather(*(store.get(record.token_digest, now=t0) for _ in range(3)))
        assert found == [record] * 3
        assert await store.update(record.id, make_update(now=t0, set_keys={"b": 2}), now=t0)
        await store.create(make_record(now=t0), max_sessions=10, now=t0)


async def test_the_password_never_shows_in_reprs_or_errors() -> None:
    with refusing_port() as port:
        store = PostgresStore(
            f"postgresql://app:s3cret-pw@127.0.0.1:{port}/test?password=s3cret-pw"
            "&sslpassword=s3cret-pw",
            connect_timeout=1,
        )
        with pytest.raises(StoreUnavailable) as raised:
            await store.open()

    assert "s3cret-pw" not in repr(store)
    assert "app:***@127.0.0.1" in repr(store)
    assert "s3cret-pw" not in str(raised.value)
    assert "s3cret-pw" not in repr(raised.value.__cause__)


@pytest.mark.parametrize("min_size", [1, 0])
@pytest.mark.parametrize("password", ["s3cret/PW", "s3cret?PW", "s3cret#PW"])
async def test_a_password_asyncpg_misreads_never_shows_in_the_error(
    password: str, min_size: int
) -> None:
    """An unescaped "/", "?" or "#" ends the host part: asyncpg reads the password's tail
    as a port or an option, and its message quotes it. (min_size=0 connects later.)"""
    store = PostgresStore(f"postgresql://app:{password}@127.0.0.1:5432/test", min_size=min_size)

    with pytest.raises(ValueError, match="is malformed") as raised:
        await store.open()

    assert "app:***@127.0.0.1:5432/test" in str(raised.value)
    assert "s3cret" not in str(raised.value)
    assert "PW" not in str(raised.value)
    assert raised.value.__cause__ is None
    assert raised.value.__suppress_context__
    assert not store.is_open


@pytest.mark.parametrize("min_size", [1, 0])
@pytest.mark.parametrize(
    ("option", "refusal"),
    [
        ("sslmod=disable", "'sslmod' is no setting PostgreSQL knows"),
        ("statement_timeout=soon", "'statement_timeout' is given a value the server refuses"),
        ("timezone=Mars/Olympus", "'timezone' is given a value the server refuses"),
        ("server_version=1", "'server_version' is a setting that cannot be changed per"),
        ("pasword=hunter2", "'pasword' is no setting PostgreSQL knows"),
        ("role=nosuchrole", "'role' is given a value the server refuses"),
        (
            "options=-c%20statement_timeout%3Dsoon",
            "'options' \\(its setting 'statement_timeout'\\) is given a value the server",
        ),
        ("options=--sslmod%3Ddisable", "'options' \\(its setting 'sslmod'\\) is no setting"),
        ("options=-c+role%3Dnosuchrole", "'options' \\(its setting 'role'\\) is given a value"),
        (
            "options=-c%20work_mem%3D64MB%20-cpasword%3Dhunter2",
            "'options' \\(its setting 'pasword'\\) is no setting PostgreSQL knows",
        ),
    ],
    ids=[
        "mistyped-name",
        "bad-value",
        "named-otherwise-by-the-server",
        "fixed",
        "secret",
        "value-quoted",
        "in-options",
        "in-options-long-form",
        "in-options-value-quoted",
        "in-options-second-secret",
    ],
)
async def test_an_option_the_server_refuses_is_named_not_reported_as_unavailable(
    postgres_url: str, option: str, refusal: str, min_size: int
) -> None:
    """asyncpg hands the options it does not know to the server as settings: a mistyped
    one failed every open as "unavailable; try again shortly", which no retry mends."""
    separator = "&" if "?" in postgres_url else "?"
    url = f"{postgres_url}{separator}{option}&password=s3cret-pw"
    store = PostgresStore(url, min_size=min_size)

    with pytest.raises(ValueError, match=refusal) as raised:
        await store.open()

    assert "s3cret-pw" not in str(raised.value)
    assert "hunter2" not in str(raised.value)
    assert raised.value.__cause__ is None
    assert not store.is_open


async def test_a_server_setting_given_as_a_url_option_is_still_taken(
    postgres_url: str, postgres_schema: str
) -> None:
    separator = "&" if "?" in postgres_url else "?"
    url = f"{postgres_url}{separator}application_name=sessions-test"
    async with PostgresStore(url, schema=postgres_schema) as store:
        record = make_record(now=start_time())
        await store.create(record, max_sessions=1, now=record.created_at)
        assert await store.get(record.token_digest, now=record.created_at) is not None


async def test_a_tls_setting_the_host_cannot_meet_is_named_not_called_malformed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """asyncpg refuses a missing root certificate (``verify-full`` looks for one in
    ``~/.postgresql``) with the class it refuses a DSN it cannot parse with: the URL was
    called malformed, with advice on escaping the password."""
    monkeypatch.setenv("HOME", str(tmp_path))  # a home without ~/.postgresql/root.crt
    monkeypatch.delenv("PGSSLROOTCERT", raising=False)
    url = "postgresql://app:s3cret-pw@127.0.0.1:5432/test?sslmode=verify-full"
    store = PostgresStore(url)

    with pytest.raises(ValueError, match="cannot be used") as raised:
        await store.open()

    message = str(raised.value)
    assert message.startswith(
        "the PostgreSQL URL postgresql://app:***@127.0.0.1:5432/test?sslmode=verify-full"
        f' cannot be used: root certificate file "{tmp_path}/.postgresql/root.crt" does not'
        " exist or cannot be accessed HINT: Provide the certificate file"
    )
    assert "malformed" not in message
    assert "s3cret-pw" not in message
    assert not store.is_open


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ("sslmode=verify-full&sslrootcert={missing}/root.crt", "sslrootcert={missing}/root.crt"),
        (
            "sslmode=require&sslcert={missing}/c.crt&sslkey={missing}/c%20key",
            "sslcert={missing}/c.crt, sslkey={missing}/c key",
        ),
        (  # an "@" in the query (as in an Azure user name) hid the file's option
            "sslmode=verify-full&sslrootcert={missing}/root.crt&application_name=ops@laptop",
            "sslrootcert={missing}/root.crt",
        ),
    ],
)
async def test_a_tls_file_the_url_names_and_that_is_missing_is_named_at_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, options: str, named: str
) -> None:
    """asyncpg reads the files as it connects and raises the ssl module's bare
    FileNotFoundError: taken for an outage, every request was a 503 logged as "[Errno 2]
    No such file or directory", no file named."""
    monkeypatch.delenv("PGSSLROOTCERT", raising=False)
    missing = tmp_path / "nowhere"
    url = f"postgresql://app:s3cret-pw@127.0.0.1:5432/test?{options.format(missing=missing)}"
    store = PostgresStore(url)

    with pytest.raises(ValueError, match="cannot be used") as raised:
        await store.open()

    message = str(raised.value)
    assert f"cannot read {named.format(missing=missing)} ([Errno 2]" in message
    assert "s3cret-pw" not in message
    assert not store.is_open


async def test_a_tls_file_the_environment_names_and_that_holds_no_certificate_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, postgres_url: str
) -> None:
    not_a_certificate = tmp_path / "root.crt"
    not_a_certificate.write_text("not a certificate\n")
    monkeypatch.setenv("PGSSLROOTCERT", str(not_a_certificate))
    store = PostgresStore(
        with_netloc(postgres_url, urlsplit(postgres_url).netloc, "sslmode=require")
    )

    with pytest.raises(ValueError, match="no certificate or crl found") as raised:
        await store.open()

    assert str(raised.value).endswith(f", in one of PGSSLROOTCERT={not_a_certificate}.")


async def test_a_missing_unix_socket_is_an_outage_not_a_tls_file() -> None:
    """Also a FileNotFoundError from asyncpg's connect: the server is not running there."""
    store = PostgresStore("postgresql://postgres@/test?host=/nonexistent-socket-dir")

    with pytest.raises(StoreUnavailable):
        await store.open()


@pytest.mark.parametrize(
    "dsn",
    [
        "postgresql://postgres:s3c@retPW@127.0.0.1:5432/test",
        "postgresql://app@tenant:s3c-retPW@127.0.0.1:5432/test",
    ],
)
def test_an_unescaped_at_sign_in_the_user_part_is_refused_as_malformed(dsn: str) -> None:
    """asyncpg ends the user part at the first "@" and took the rest for the host: a
    lookup of part of the password, then a 503 on every request."""
    with pytest.raises(ValueError, match="is malformed") as raised:
        PostgresStore(dsn)

    message = str(raised.value)
    assert "percent-encode a '/', '?', '#' or '@'" in message
    assert "retPW" not in message


async def test_a_key_value_dsn_never_shows_its_password() -> None:
    """libpq's "host=… password=…" form, which asyncpg does not take: the store's repr and
    the "malformed" error quote the DSN, without its password."""
    store = PostgresStore("host=127.0.0.1 dbname=test user=postgres password=s3cret-pw")

    assert "s3cret-pw" not in repr(store)
    with pytest.raises(ValueError, match="is malformed") as raised:
        await store.open()

    assert "s3cret-pw" not in str(raised.value)
    assert "password=***" in str(raised.value)
    assert not store.is_open


# -- concurrency across processes -------------------------------------------------------------


async def test_creates_from_several_pools_respect_the_limit(
    postgres_url: str, postgres_schema: str
) -> None:
    """The per-user lock lives in the database, so app servers racing on logins agree."""
    t0 = start_time()
    stores = [PostgresStore(postgres_url, schema=postgres_schema, max_size=3) for _ in range(4)]
    await asyncio.gather(*(store.open() for store in stores))
    records = [make_record(now=t0 + i) for i in range(20)]

    await asyncio.gather(
        *(
            stores[i % 4].create(record, max_sessions=5, now=record.created_at)
            for i, record in enumerate(records)
        )
    )

    listed = await stores[0].list_for_user("alice", now=t0 + 20)
    check_kept_after_racing_creates([record.id for record in listed], records, 5)
    await asyncio.gather(*(store.close() for store in stores))


async def test_a_cleanup_skips_the_sessions_another_cleanup_holds(
    postgres_url: str, postgres_schema: str, admin: asyncpg.Connection[asyncpg.Record]
) -> None:
    """Processes clean up at the same time: one must delete what the others do not hold
    rather than wait for their rows (or time out on them), and leave those for later."""
    t0 = start_time()
    records = [make_record(now=t0, user_id=f"user{i}", ttl=10) for i in range(4)]
    async with PostgresStore(postgres_url, schema=postgres_schema, command_timeout=5) as store:
        for record in records:
            await store.create(record, max_sessions=10, now=t0)
        table = f'"{postgres_schema}".authsessions_session'
        hold = f"SELECT 1 FROM {table} WHERE id = $1 FOR UPDATE"  # noqa: S608
        async with admin.transaction():  # another cleanup, holding one of the rows
            await admin.execute(hold, records[0].id)

            assert await asyncio.wait_for(store.delete_expired(now=t0 + 20), 10) == 3

        assert await store.delete_expired(now=t0 + 20) == 1


async def test_a_cleanup_batch_on_stale_statistics_deletes_at_most_its_limit(
    postgres_url: str, postgres_schema: str, admin: asyncpg.Connection[asyncpg.Record]
) -> None:
    """Statistics taken of the emptied table (one page, no rows) led the planner to run
    the batch's LIMIT subquery again for each row, each time taking the next expired rows
    (those deleted so far skipped as locked): one batch of 5 deleted all 30."""
    t0 = start_time()
    async with PostgresStore(postgres_url, schema=postgres_schema) as store:
        first = make_record(now=t0, user_id="first", ttl=60)
        await store.create(first, max_sessions=5, now=t0)
        await store.delete(first.id, now=t0)
        await admin.execute(f'ANALYZE "{postgres_schema}".authsessions_session')
        for i in range(30):
            record = make_record(now=t0, user_id=f"user{i}", ttl=60)
            await store.create(record, max_sessions=5, now=t0)

        assert await store.delete_expired(now=t0 + 3600, limit=5) == 5
        left = await admin.fetchval(
            f'SELECT count(*) FROM "{postgres_schema}".authsessions_session'  # noqa: S608
        )
        assert left == 25


# -- without the driver -----------------------------------------------------------------------


def test_stores_import_without_asyncpg_and_the_store_names_the_extra() -> None:
    code = (
        "import sys; sys.modules['asyncpg'] = None\n"
        "import authsessions.stores\n"
        "from authsessions.stores import PostgresStore\n"
        "try:\n"
        "    PostgresStore('postgresql://localhost/db')\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=30
    )
    assert "pip install 'authsessions[postgres]'" in result.stdout


async def test_reads_reach_the_connection_behind_the_pools_proxy(
    postgres_url: str, postgres_schema: str
) -> None:
    """The per-request read skips the proxy's wrapper through asyncpg's own ``_con``;
    an asyncpg release that renamed it would still work, only slower: this says so.
    """
    t0 = start_time()
    record = make_record(now=t0)
    async with PostgresStore(postgres_url, schema=postgres_schema) as store:
        await store.create(record, max_sessions=10, now=t0)
        assert await store.get(record.token_digest, now=t0) == record
        connections = store._connections
        assert isinstance(connections, HeldConnections)
        proxy, _ = connections._idle[-1]
        assert isinstance(_unwrapped(proxy), asyncpg.Connection)


async def idle_connections(store: PostgresStore, count: int) -> HeldConnections:
    """The store's free list, holding ``count`` connections (taken at once, then kept)."""
    connections = store._connections
    assert isinstance(connections, HeldConnections)
    taken = [await connections.take() for _ in range(count)]
    for connection in taken:
        await connections.keep(connection)
    assert len(connections._idle) == count
    return connections


@pytest.mark.parametrize(
    "error",
    [
        ConnectionResetError("reset by peer"),
        # SQLSTATE 57P01: the server ending the session (a restart), not refusing a statement.
        asyncpg.AdminShutdownError("terminating connection due to administrator command"),
    ],
    ids=["connection-reset", "server-shutdown"],
)
async def test_a_lost_connection_takes_the_idle_ones_with_it(
    postgres_url: str, postgres_schema: str, error: BaseException
) -> None:
    """A socket that failed, or a session the server ended, most likely went with its
    siblings (a network cut, a restart): the next calls must get new connections, not fail
    one by one on the old ones.
    """
    t0 = start_time()
    record = make_record(now=t0)
    async with PostgresStore(postgres_url, schema=postgres_schema, min_size=0) as store:
        await store.create(record, max_sessions=10, now=t0)
        connections = await idle_connections(store, 3)
        siblings = [_unwrapped(proxy) for proxy, _ in connections._idle]
        failed = await connections.take()

        await connections.drop(failed, error)

        assert not connections._idle
        assert all(connection is None or connection.is_closed() for connection in siblings)
        assert await store.get(record.token_digest, now=t0) == record


async def test_a_lost_connection_expires_the_pools_idle_ones_too(
    postgres_url: str, postgres_schema: str, admin: asyncpg.Connection[asyncpg.Record]
) -> None:
    """Not only the store's free list: the connections idle in the pool itself failed with
    the lost one just as likely, and the pool must replace them before handing them out."""
    dsn, name = named_dsn(postgres_url)
    t0 = start_time()
    async with PostgresStore(dsn, schema=postgres_schema, min_size=3, max_size=3) as store:
        connections = store._connections
        assert isinstance(connections, HeldConnections)
        pids = await admin.fetchval(BACKENDS_NAMED, name)
        assert len(pids) == 3
        assert not connections._idle  # all three sit in the pool itself
        failed = await connections.take()

        await connections.drop(failed, ConnectionResetError("reset by peer"))
        await asyncio.gather(*(store.get(new_digest(), now=t0) for _ in range(3)))

        await until_gone(admin, pids)  # the pool closes each expired one as it hands it out


async def test_a_refused_statement_leaves_the_idle_connections_alone(
    postgres_url: str, postgres_schema: str
) -> None:
    t0 = start_time()
    record = make_record(now=t0)
    async with PostgresStore(postgres_url, schema=postgres_schema, min_size=0) as store:
        await store.create(record, max_sessions=10, now=t0)
        connections = await idle_connections(store, 3)
        failed = await connections.take()

        await connections.drop(failed, asyncpg.UniqueViolationError("duplicate key"))

        assert len(connections._idle) == 2
        kept = [_unwrapped(proxy) for proxy, _ in connections._idle]
        assert all(connection is not None and not connection.is_closed() for connection in kept)


async def test_a_connection_out_of_step_with_its_server_gives_store_unavailable(
    postgres_store: PostgresStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """asyncpg's own protocol errors (no SQLSTATE, no OSError) fail closed like the rest."""

    async def out_of_step(*args: Any, **kwargs: Any) -> None:
        raise asyncpg.InternalClientError("unexpected message")

    monkeypatch.setattr(HeldConnections, "fetchrow", out_of_step)

    with pytest.raises(StoreUnavailable):
        await postgres_store.get(new_digest(), now=start_time())


async def test_the_log_says_why_the_server_refused_but_never_a_statements_values(
    postgres_url: str, postgres_store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    """An operator needs the reason (here, no such database); a value a statement was
    given (a user id, a digest, session data) must not reach the log.
    """
    parts = urlsplit(postgres_url)
    missing = PostgresStore(
        urlunsplit(parts._replace(path="/authsessions_no_such_db")), connect_timeout=5
    )
    with caplog.at_level("WARNING", logger="authsessions"), pytest.raises(StoreUnavailable):
        await missing.open()
    assert 'InvalidCatalogNameError (3D000): database "authsessions_no_such_db"' in caplog.text

    caplog.clear()
    with caplog.at_level("WARNING", logger="authsessions"), pytest.raises(StoreUnavailable):
        # get, on every request's path, leaves argument checks to its caller.
        await postgres_store.get(4242424242, now=start_time())  # type: ignore[arg-type]
    assert "DataError (22000)" in caplog.text
    assert "4242424242" not in caplog.text


async def test_a_close_during_an_open_its_caller_gave_up_on_leaves_the_store_closed(
    postgres_url: str, postgres_schema: str
) -> None:
    """The open waits for another server's schema upgrade (its advisory lock); a request
    timeout gives up on it and shutdown closes the store. The open, which other callers
    share and so goes on, must not leave a pool behind a store its owner closed.
    """
    store = PostgresStore(postgres_url, schema=postgres_schema, connect_timeout=5)
    upgrading = await asyncpg.connect(postgres_url)
    try:
        await upgrading.execute(
            "SELECT pg_advisory_lock(hashtextextended($1, 0))",
            f"authsessions migrate {postgres_schema}.authsessions_session",
        )
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(store.open(), 0.3)
        closing = asyncio.ensure_future(store.close())
        await asyncio.sleep(0.1)
        assert not closing.done()  # it waits for the open under way
        await upgrading.execute("SELECT pg_advisory_unlock_all()")
        await closing
    finally:
        await upgrading.close()

    assert not store.is_open
    assert store._pool is None


def test_a_store_that_cannot_close_as_its_loop_ends_says_so_in_one_line(
    postgres_url: str, postgres_schema: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The server stopped answering: the close the loop's end runs fails within the
    timeouts, and the log gets one line of ours, not asyncio's traceback of a failed
    generator; what is left is dropped.
    """
    proxy_loop = asyncio.new_event_loop()
    proxy_thread = threading.Thread(target=proxy_loop.run_forever, daemon=True)
    proxy_thread.start()
    parts = urlsplit(postgres_url)
    proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    asyncio.run_coroutine_threadsafe(proxy.resume(), proxy_loop).result(5)

    async def open_then_lose_the_server() -> PostgresStore:
        store = impatient_store_through(proxy, postgres_url, postgres_schema)
        await store.open()
        proxy_loop.call_soon_threadsafe(proxy.stall)
        return store  # not closed: the loop's end closes it

    try:
        with caplog.at_level("WARNING"):
            store = asyncio.run(open_then_lose_the_server())
    finally:
        proxy_loop.call_soon_threadsafe(proxy.unstall)
        asyncio.run_coroutine_threadsafe(proxy.drop(), proxy_loop).result(5)
        proxy_loop.call_soon_threadsafe(proxy_loop.stop)
        proxy_thread.join(5)
        proxy_loop.close()

    assert "did not close cleanly as its event loop ended" in caplog.text
    assert "closing of asynchronous generator" not in caplog.text
    assert store._pool is None
