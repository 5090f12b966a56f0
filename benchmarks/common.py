"""What every benchmark part shares: run settings, services, stores, statistics.

The networked stores (PostgreSQL, Redis) are optional: a part that needs one
that is not importable or not reachable prints why and skips it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import math
import os
import secrets
import socket
import sqlite3
import statistics
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from authsessions.stores import MemoryStore, SQLiteStore, Store

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts" / "benchmarks"

POSTGRES_URL = os.environ.get(
    "AUTHSESSIONS_BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test"
)
REDIS_URL = os.environ.get("AUTHSESSIONS_BENCH_REDIS", "redis://127.0.0.1:6379/0")
POSTGRES_SCHEMA = "authsessions_bench"
"""Every PostgreSQL table the benchmarks make lives in this schema, dropped afterwards."""
REDIS_PREFIX = "bench:"
"""Every Redis key the benchmarks make starts with this, deleted afterwards."""

USER_AGENT = (
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 "
    "(KHTML, like Gecko) Chrome/126.0.0.0 Safari/537.36"
)
SESSION_COOKIE = "__Host-session"
"""authsessions' default cookie name (the benchmarks use the default ``SessionConfig``)."""
PEER_COOKIE = "session"


@dataclass(frozen=True)
class Settings:
    """How long and how big each part runs; ``quick`` finishes in about a minute."""

    quick: bool
    inprocess_reps: int
    inprocess_batch: int
    """Requests per variant and scenario in one repetition, and as many of the bare app's."""
    inprocess_chunk: int
    """Requests in one run of either side, within a paired batch (see ``drive_paired``)."""
    inprocess_lead_in: int
    """Untimed requests that start each run, so that it starts warm (see ``drive_paired``)."""
    inprocess_warmup: int
    floor_lookups: int
    concurrency_streams: int
    concurrency_requests: int
    """Requests per stream in one timed batch."""
    concurrency_reps: int
    e2e_rounds: int
    e2e_seconds: float
    """Whole seconds (wrk's unit) per variant and round."""
    e2e_warmup: float
    e2e_connections: int
    instruction_warmup: int
    instruction_requests: int
    """Requests per counted batch (each variant and scenario), under callgrind."""
    scale_sizes: tuple[int, ...]
    scale_lookups: int
    user_session_counts: tuple[int, ...]
    user_op_reps: int
    cleanup_size: int
    cleanup_timeout: float
    bulk_create_timeout: float

    @classmethod
    def for_mode(cls, *, quick: bool) -> Settings:
        if quick:
            return cls(
                quick=True,
                inprocess_reps=4,
                inprocess_batch=150,
                inprocess_chunk=25,
                inprocess_lead_in=5,
                inprocess_warmup=100,
                floor_lookups=1_000,
                concurrency_streams=16,
                concurrency_requests=20,
                concurrency_reps=2,
                e2e_rounds=1,
                e2e_seconds=2.0,
                e2e_warmup=0.0,
                e2e_connections=16,
                instruction_warmup=100,
                instruction_requests=100,
                scale_sizes=(1_000, 5_000),
                scale_lookups=500,
                user_session_counts=(1, 10, 100),
                user_op_reps=3,
                cleanup_size=5_000,
                cleanup_timeout=3.0,
                bulk_create_timeout=20.0,
            )
        return cls(
            quick=False,
            inprocess_reps=21,
            inprocess_batch=500,
            inprocess_chunk=25,
            inprocess_lead_in=5,
            inprocess_warmup=500,
            floor_lookups=20_000,
            concurrency_streams=16,
            concurrency_requests=150,
            concurrency_reps=7,
            e2e_rounds=9,
            e2e_seconds=2.0,
            e2e_warmup=1.0,
            e2e_connections=16,
            instruction_warmup=300,
            instruction_requests=1000,
            scale_sizes=(1_000, 100_000, 1_000_000),
            scale_lookups=3_000,
            user_session_counts=(1, 10, 100, 1000),
            user_op_reps=15,
            cleanup_size=1_000_000,
            cleanup_timeout=240.0,
            bulk_create_timeout=600.0,
        )


# -- services and optional stores ---------------------------------------------------


def port_open(url: str) -> bool:
    parts = urllib.parse.urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 0), 1.0):
            return True
    except OSError:
        return False


def optional_store_class(kind: str) -> tuple[type[Store] | None, str]:
    """The PostgresStore or RedisStore class, or ``None`` and why it cannot be used."""
    url = POSTGRES_URL if kind == "postgres" else REDIS_URL
    cls: type[Store]
    try:
        if kind == "postgres":
            from authsessions.stores.postgres import PostgresStore

            cls = PostgresStore
        else:
            from authsessions.stores.redis import RedisStore

            cls = RedisStore
    except ImportError as exc:
        return None, f"authsessions.stores.{kind} is not importable ({exc})"
    if not port_open(url):
        return None, f"{kind} is not reachable at {url}"
    return cls, ""


STORE_KINDS = ("memory", "sqlite", "postgres", "redis")


def available_store_kinds(*, announce: bool = True) -> list[str]:
    kinds = ["memory", "sqlite"]
    for kind in ("postgres", "redis"):
        cls, why = optional_store_class(kind)
        if cls is None:
            if announce:
                print(f"  note: skipping authsessions {kind} store: {why}")
        else:
            kinds.append(kind)
    return kinds


def postgres_dsn(schema: str) -> str:
    """The benchmark DSN; asyncpg turns unknown query parameters into server settings."""
    separator = "&" if "?" in POSTGRES_URL else "?"
    return f"{POSTGRES_URL}{separator}search_path={schema}"


def _keyword(cls: type, *names: str) -> str | None:
    parameters = inspect.signature(cls).parameters
    return next((name for name in names if name in parameters), None)


@dataclass
class StoreHandle:
    """A store built for a benchmark, and what removing its traces takes."""

    kind: str
    store: Store
    url: str
    """A URL (or spec) from which another process can build an equivalent store."""
    options: dict[str, str] = field(default_factory=dict)
    """Keyword options the store was built with (a Redis prefix, a table name)."""
    path: Path | None = None
    """The SQLite file."""
    schema: str | None = None
    """The PostgreSQL schema holding the store's tables."""

    async def cleanup(self) -> None:
        with contextlib.suppress(Exception):
            await self.store.close()
        if self.path is not None:
            remove_sqlite_files(self.path)
        if self.schema is not None:
            await drop_postgres_schema(self.schema)
        if self.kind == "redis" and self.options.get("prefix", "").startswith(REDIS_PREFIX):
            await delete_redis_keys(self.options["prefix"])


def remove_sqlite_files(path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


async def ensure_postgres_schema(schema: str = POSTGRES_SCHEMA) -> None:
    import asyncpg

    connection = await asyncpg.connect(POSTGRES_URL)
    try:
        await connection.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
    finally:
        await connection.close()


async def drop_postgres_schema(schema: str) -> None:
    import asyncpg

    connection = await asyncpg.connect(POSTGRES_URL)
    try:
        await connection.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await connection.close()


async def drop_benchmark_schemas() -> None:
    """Every schema a benchmark made, including ones a crashed run left behind."""
    import asyncpg

    connection = await asyncpg.connect(POSTGRES_URL)
    try:
        schemas = await connection.fetch(
            "SELECT nspname FROM pg_namespace WHERE nspname LIKE $1", f"{POSTGRES_SCHEMA}%"
        )
        for row in schemas:
            await connection.execute(f'DROP SCHEMA IF EXISTS "{row[0]}" CASCADE')
    finally:
        await connection.close()


async def delete_redis_keys(prefix: str = REDIS_PREFIX) -> int:
    from redis.asyncio import Redis

    client = Redis.from_url(REDIS_URL)
    deleted = 0
    try:
        batch: list[bytes] = []
        async for key in client.scan_iter(match=f"{prefix}*", count=5000):
            batch.append(key)
            if len(batch) >= 5000:
                deleted += await client.unlink(*batch)
                batch.clear()
        if batch:
            deleted += await client.unlink(*batch)
    finally:
        await client.aclose()
    return deleted


async def postgres_session_table(schema: str) -> str | None:
    """The quoted name of the table in ``schema`` that has a ``token_digest`` column."""
    import asyncpg

    connection = await asyncpg.connect(POSTGRES_URL)
    try:
        tables = await connection.fetch(
            "SELECT table_name FROM information_schema.columns"
            " WHERE table_schema = $1 AND column_name = 'token_digest'",
            schema,
        )
    finally:
        await connection.close()
    return f'"{schema}"."{tables[0][0]}"' if len(tables) == 1 else None


def sqlite_session_table(path: Path) -> str | None:
    """The name of the table in the SQLite file that has a ``token_digest`` column."""
    connection = sqlite3.connect(path)
    try:
        names = [row[0] for row in connection.execute("SELECT name FROM sqlite_master")]
        tables = [
            name
            for name in names
            if any(
                column[1] == "token_digest"
                for column in connection.execute("SELECT * FROM pragma_table_info(?)", (name,))
            )
        ]
    finally:
        connection.close()
    return tables[0] if len(tables) == 1 else None


def redis_store_options(prefix: str) -> dict[str, str]:
    from authsessions.stores.redis import RedisStore

    keyword = _keyword(RedisStore, "prefix", "key_prefix", "namespace")
    return {keyword: prefix} if keyword else {}


def postgres_store_options(schema: str) -> tuple[dict[str, str], str]:
    """Keyword options and DSN that put the store's tables in ``schema``.

    ``PostgresStore(schema=...)`` when it takes one, else the schema goes on the
    connection's search path.
    """
    from authsessions.stores.postgres import PostgresStore

    if _keyword(PostgresStore, "schema"):
        return {"schema": schema}, POSTGRES_URL
    return {}, postgres_dsn(schema)


async def make_store(kind: str, *, label: str = "bench") -> StoreHandle:
    """A fresh, open, empty store of ``kind`` that leaves nothing behind after cleanup."""
    unique = f"{label}_{secrets.token_hex(4)}"
    if kind == "memory":
        store: Store = MemoryStore()
        await store.open()
        return StoreHandle(kind, store, "memory://")
    if kind == "sqlite":
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{unique}.db"
        store = SQLiteStore(path)
        await store.open()
        return StoreHandle(kind, store, f"sqlite:///{path}", path=path)
    if kind == "postgres":
        from authsessions.stores.postgres import PostgresStore

        # A schema per store keeps benchmarks apart from anything else on the server.
        schema = f"{POSTGRES_SCHEMA}_{secrets.token_hex(6)}"  # identifiers are short
        await ensure_postgres_schema(schema)
        options, dsn = postgres_store_options(schema)
        store = PostgresStore(dsn, **options)  # type: ignore[arg-type]
        await store.open()
        return StoreHandle(kind, store, dsn, options, schema=schema)
    if kind == "redis":
        from authsessions.stores.redis import RedisStore

        options = redis_store_options(f"{REDIS_PREFIX}{unique}:")
        if not options:
            print("  note: RedisStore takes no key prefix; its keys are removed by user instead")
        store = RedisStore(REDIS_URL, **options)  # type: ignore[arg-type]
        await store.open()
        return StoreHandle(kind, store, REDIS_URL, options)
    raise ValueError(f"unknown store kind {kind!r}")


async def cleanup_services() -> None:
    """Remove every schema and key the benchmarks may have made (also after a crash)."""
    if port_open(POSTGRES_URL):
        with contextlib.suppress(Exception):
            await drop_benchmark_schemas()
    if port_open(REDIS_URL):
        with contextlib.suppress(Exception):
            await delete_redis_keys()


# -- tokens and records ----------------------------------------------------------------


def digest_of(token: str) -> str:
    return hashlib.sha256(token.encode("ascii")).hexdigest()


def synthetic_digest(index: int, salt: str = "") -> str:
    """A stable, unique token digest for bulk-inserted sessions (no real token needed)."""
    return hashlib.sha256(f"bench-token-{salt}-{index}".encode()).hexdigest()


def synthetic_id(index: int, salt: str = "") -> str:
    """A unique 22-character public session id."""
    return hashlib.blake2b(f"{salt}-{index}".encode(), digest_size=16).hexdigest()[:22]


# -- statistics -------------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def percentile(values: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile (``fraction`` in 0..1)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    # ceil(fraction * n), the nearest rank (round() rounds x.5 to even: one rank too high
    # whenever fraction * n is an odd whole number, e.g. the p99 of 500 samples).
    rank = min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered) - 1e-9) - 1))
    return ordered[rank]


def time_calls_us(call: Callable[[], Any], count: int) -> list[float]:
    """Per-call durations in µs of a synchronous ``call``."""
    clock = time.perf_counter_ns
    samples = []
    for _ in range(count):
        start = clock()
        call()
        samples.append((clock() - start) / 1000)
    return samples


async def time_awaits_us(call: Callable[[], Awaitable[Any]], count: int) -> list[float]:
    """Per-call durations in µs of an async ``call``."""
    clock = time.perf_counter_ns
    samples = []
    for _ in range(count):
        start = clock()
        await call()
        samples.append((clock() - start) / 1000)
    return samples


def fmt_us(value: float) -> str:
    if value != value:  # NaN
        return "-"
    if value >= 1000:
        return f"{value / 1000:.2f} ms"
    if value >= 100:
        return f"{value:.0f} µs"
    return f"{value:.1f} µs"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    lines.extend("| " + " | ".join(row) + " |" for row in rows)
    return "\n".join(lines)


async def gather_limited(calls: Sequence[Callable[[], Awaitable[Any]]], limit: int) -> None:
    """Run ``calls`` with at most ``limit`` in flight."""
    semaphore = asyncio.Semaphore(limit)

    async def one(call: Callable[[], Awaitable[Any]]) -> None:
        async with semaphore:
            await call()

    await asyncio.gather(*(one(call) for call in calls))
