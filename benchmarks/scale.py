"""Scale: lookups against many stored sessions, per-user operations, and cleanup under load.

For each store:

1. Lookup cost (``store.get`` of random stored sessions) with 1 thousand,
   100 thousand and 1 million sessions stored (quick mode caps the sizes),
   each in turns with lookups on a second store of 1 thousand, against
   which it is reported as a ratio (the guest's drift cancels). A store that
   keeps a cache of the rows it read (SQLite) is measured again with both
   stores' caches emptied before each lookup: the index's own cost. Sessions
   are bulk-inserted straight through the driver where the schema is known
   (SQLite, PostgreSQL) or its key layout (Redis), else through
   ``Store.create``.
2. ``list_my_sessions`` and ``logout_all`` requests for a user holding 1, 10,
   100 and 1000 sessions, on that full store.
3. ``SessionManager.cleanup_expired`` of a million expired sessions in a
   fresh store, while a task in the same event loop keeps sending
   authenticated reads through the middleware: their latency during the
   cleanup against a baseline before it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import gc
import random
import secrets
import sqlite3
import time
from collections.abc import Callable
from typing import Any

from authsessions import SessionManager
from authsessions.stores import SessionRecord, Store
from benchmarks import apps
from benchmarks.asgi import call, make_scope
from benchmarks.common import (
    POSTGRES_URL,
    REDIS_URL,
    SESSION_COOKIE,
    Settings,
    StoreHandle,
    digest_of,
    fmt_us,
    gather_limited,
    make_store,
    markdown_table,
    median,
    percentile,
    postgres_session_table,
    sqlite_session_table,
    synthetic_digest,
    synthetic_id,
)
from benchmarks.inprocess import sign_in

DAY = 86400.0
SQLITE_CHUNK = 50_000
POSTGRES_CHUNK = 50_000
REDIS_CHUNK = 2_000
_REDIS_BULK_LOAD = """
local n = tonumber(ARGV[1])
local template = {}
for i = 2, n + 1 do template[#template + 1] = ARGV[i] end
for i = n + 2, #ARGV, 12 do
  local key, index, ttl = ARGV[i], ARGV[i + 1], ARGV[i + 11]
  redis.call('HSET', key, unpack(template))
  redis.call('HSET', key, 'id', ARGV[i + 5], 'uid', ARGV[i + 6], 'td', ARGV[i + 7],
             'ca', ARGV[i + 8], 'la', ARGV[i + 9], 'ea', ARGV[i + 10])
  redis.call('PEXPIRE', key, ttl)
  redis.call('ZADD', index, ARGV[i + 9], ARGV[i + 5])
  redis.call('PEXPIRE', index, ttl)
  redis.call('SET', ARGV[i + 2], ARGV[i + 4] .. ':' .. ARGV[i + 5], 'PX', ttl)
  redis.call('SET', ARGV[i + 3], ARGV[i + 4], 'PX', ttl)
end
return 0
"""
CREATE_CONCURRENCY = 32


def make_record(template: SessionRecord, index: int, salt: str, *, expired: bool) -> SessionRecord:
    now = time.time()
    created = now - 2 * DAY if expired else now
    return dataclasses.replace(
        template,
        id=synthetic_id(index, salt),
        token_digest=synthetic_digest(index, salt),
        user_id=f"bulk-{salt}-{index}",
        created_at=created,
        last_active_at=created,
        expires_at=now - DAY if expired else now + 30 * DAY,
    )


VARYING = ("id", "token_digest", "user_id", "created_at", "last_active_at", "expires_at")
"""The columns a synthetic session changes; every other column is copied from a real row."""


# -- bulk insertion ---------------------------------------------------------------------------


class BulkInserter:
    """Adds synthetic sessions to one store, as fast as its driver allows.

    SQLite and PostgreSQL rows are copies of one row that the store itself
    wrote (so its encodings of data and times are kept), with the id, token
    digest, user and times changed; other stores go through ``Store.create``.
    """

    def __init__(self, handle: StoreHandle, template: SessionRecord, settings: Settings) -> None:
        self.handle = handle
        self.template = template
        self.settings = settings
        self.salt = secrets.token_hex(3)
        self.choose = random.Random(16)  # noqa: S311 - which rows to look up
        self.count = 0
        self.method = "Store.create"

    async def grow_to(self, target: int, *, expired: bool = False) -> int:
        """Insert until ``target`` synthetic sessions exist; returns how many exist."""
        if target <= self.count:
            return self.count
        start, kind = self.count, self.handle.kind
        if kind == "sqlite" and self._sqlite(start, target, expired=expired):
            self.method = "sqlite3 executemany"
        elif kind == "postgres" and await self._postgres(start, target, expired=expired):
            self.method = "asyncpg COPY"
        elif kind == "redis" and await self._redis(start, target, expired=expired):
            self.method = "Lua bulk load"
        else:
            await self._create(start, target, expired=expired)
        if self.count == target and not expired:
            await self._check(target - 1)
        return self.count

    def record(self, index: int, *, expired: bool) -> SessionRecord:
        return make_record(self.template, index, self.salt, expired=expired)

    def rows(
        self, template_row: dict[str, Any], start: int, stop: int, *, expired: bool
    ) -> list[tuple[Any, ...]]:
        columns = list(template_row)
        rows = []
        for index in range(start, stop):
            record = self.record(index, expired=expired)
            row = dict(template_row)
            for name in VARYING:
                row[name] = _like(template_row[name], getattr(record, name))
            rows.append(tuple(row[name] for name in columns))
        return rows

    async def _check(self, index: int) -> None:
        found = await self.handle.store.get(synthetic_digest(index, self.salt), now=time.time())
        if (
            found is None
            or found.user_id != f"bulk-{self.salt}-{index}"
            or found.data != {"k": "v"}
        ):
            raise RuntimeError(f"{self.handle.kind}: bulk-inserted session {index} reads {found}")

    def _sqlite(self, start: int, stop: int, *, expired: bool) -> bool:
        assert self.handle.path is not None
        table = sqlite_session_table(self.handle.path)
        if table is None:
            return False
        connection = sqlite3.connect(self.handle.path, isolation_level=None, timeout=30)
        try:
            cursor = connection.execute(
                f"SELECT * FROM {table} WHERE id = ?",  # noqa: S608 - the store's table
                (self.template.id,),
            )
            names = [column[0] for column in cursor.description]
            template_row = dict(zip(names, cursor.fetchone(), strict=True))
            if not set(VARYING) <= set(names):
                return False
            sql = (
                f"INSERT INTO {table} ({', '.join(names)})"  # noqa: S608
                f" VALUES ({', '.join('?' * len(names))})"
            )
            for chunk in range(start, stop, SQLITE_CHUNK):
                rows = self.rows(
                    template_row, chunk, min(stop, chunk + SQLITE_CHUNK), expired=expired
                )
                connection.execute("BEGIN IMMEDIATE")
                connection.executemany(sql, rows)
                connection.execute("COMMIT")
                self.count = chunk + len(rows)
        finally:
            connection.close()
        return True

    async def _postgres(self, start: int, stop: int, *, expired: bool) -> bool:
        import asyncpg

        assert self.handle.schema is not None
        table = await postgres_session_table(self.handle.schema)
        if table is None:
            return False
        connection = await asyncpg.connect(POSTGRES_URL)
        try:
            found = await connection.fetchrow(
                f"SELECT * FROM {table} WHERE id = $1",  # noqa: S608 - the store's table
                self.template.id,
            )
            if found is None or not set(VARYING) <= set(found.keys()):
                return False
            template_row = dict(found.items())
            schema_name, table_name = (part.strip('"') for part in table.split("."))
            for chunk in range(start, stop, POSTGRES_CHUNK):
                rows = self.rows(
                    template_row, chunk, min(stop, chunk + POSTGRES_CHUNK), expired=expired
                )
                await connection.copy_records_to_table(
                    table_name, records=rows, columns=list(template_row), schema_name=schema_name
                )
                self.count = chunk + len(rows)
            await connection.execute(f"ANALYZE {table}")
        finally:
            await connection.close()
        return True

    async def _redis(self, start: int, stop: int, *, expired: bool) -> bool:
        """Write the keys ``RedisStore.create`` would write, copied from a real session,
        in one Lua script per chunk (pipelined commands cost Python time per command).

        Uses the store's (private) key layout; ``grow_to`` checks a lookup
        afterwards, and a store without that layout falls back to ``create``.
        """
        from redis.asyncio import Redis

        store: Any = self.handle.store
        try:
            from authsessions.stores.redis import _tag

            keys = store._session_prefix, store._index, store._digest_key, store._id_key
        except (ImportError, AttributeError):
            return False
        session_prefix, index_key, digest_key, id_key = keys
        client: Any = Redis.from_url(REDIS_URL, decode_responses=True)
        try:
            template_tag = _tag(self.template.user_id)
            fields: dict[str, Any] = await client.hgetall(
                session_prefix(template_tag) + self.template.id
            )
            if not fields or not {"id", "uid", "td", "ca", "la", "ea"} <= set(fields):
                return False
            now = time.time()
            template = [item for pair in fields.items() for item in pair]
            load = client.register_script(_REDIS_BULK_LOAD)
            for chunk in range(start, stop, REDIS_CHUNK):
                args: list[Any] = [len(template), *template]
                for index in range(chunk, min(stop, chunk + REDIS_CHUNK)):
                    r = self.record(index, expired=expired)
                    tag = _tag(r.user_id)
                    # Expired by our clock but kept by Redis's for a day, as a create
                    # "in the past" would leave it.
                    ttl = int(DAY * 1000) if expired else int((r.expires_at - now) * 1000)
                    args += [
                        session_prefix(tag) + r.id, index_key(tag), digest_key(r.token_digest),
                        id_key(r.id), tag, r.id, r.user_id, r.token_digest,
                        repr(r.created_at), repr(r.last_active_at), repr(r.expires_at), ttl,
                    ]  # fmt: skip
                await load(args=args)
                self.count = min(stop, chunk + REDIS_CHUNK)
        finally:
            await client.aclose()
        return True

    async def _create(self, start: int, stop: int, *, expired: bool) -> None:
        store = self.handle.store
        deadline = time.monotonic() + self.settings.bulk_create_timeout
        step = 2_000
        for chunk in range(start, stop, step):
            if time.monotonic() > deadline:
                print(
                    f"  note: {self.handle.kind}: stopped creating at {self.count} sessions "
                    f"(bulk_create_timeout {self.settings.bulk_create_timeout:.0f} s)"
                )
                return
            indexes = range(chunk, min(stop, chunk + step))
            records = [self.record(index, expired=expired) for index in indexes]
            # An expired record is created "in the past", so the store keeps it for cleanup.
            if self.handle.kind == "memory":  # nothing to wait for: no tasks needed
                for record in records:
                    await store.create(record, max_sessions=10, now=record.created_at)
            else:
                calls = [
                    (lambda r=r: store.create(r, max_sessions=10, now=r.created_at))
                    for r in records
                ]
                await gather_limited(calls, CREATE_CONCURRENCY)
            self.count = chunk + len(records)


def _like(example: Any, value: Any) -> Any:
    """``value`` in the representation the store used for ``example`` (float, int, datetime)."""
    if isinstance(example, datetime.datetime):
        return datetime.datetime.fromtimestamp(value, datetime.UTC)
    if isinstance(example, int) and not isinstance(value, str):
        return int(value)
    return value


# -- 1. lookups -------------------------------------------------------------------------------


LOOKUP_ROUNDS = 10
"""Each size's lookups are taken in this many batches, each beside a batch on the small
store (see :func:`measure_lookups`)."""


async def measure_lookups(
    inserter: BulkInserter, beside: BulkInserter, count: int, *, uncached: bool = False
) -> dict[str, float]:
    """p50 and p99 of ``count`` lookups of random stored sessions, and their cost against a
    store of few sessions (``beside``) looked up in the same minutes.

    Lookups of each store are taken in turns, batch by batch, and the ratio is the median
    of each pair of batches' medians: on a guest whose speed moves, sizes measured minutes
    apart (the millionth session is stored minutes after the thousandth) differ by the
    guest's drift as well as by the store's size; the ratio keeps only the size's share.

    ``uncached``: both stores' row caches are emptied before each lookup (untimed), so
    that every lookup reads the index, as a store too large for its cache mostly does.
    """
    samples: list[float] = []
    ratios: list[float] = []
    batch = max(1, count // LOOKUP_ROUNDS)
    for turn in range(LOOKUP_ROUNDS):
        ours, theirs = (inserter, beside) if turn % 2 else (beside, inserter)
        first = await _lookup_batch(ours, batch, uncached=uncached)
        second = await _lookup_batch(theirs, batch, uncached=uncached)
        large, small = (first, second) if ours is inserter else (second, first)
        samples += large
        ratios.append(median(large) / median(small))
    return {
        "p50_us": median(samples),
        "p99_us": percentile(samples, 0.99),
        "vs_small": median(ratios),
    }


async def _lookup_batch(
    inserter: BulkInserter, count: int, *, uncached: bool = False
) -> list[float]:
    """Durations in µs of ``count`` lookups of random sessions ``inserter`` stored."""
    store = inserter.handle.store
    digests = [
        synthetic_digest(inserter.choose.randrange(inserter.count), inserter.salt)
        for _ in range(count)
    ]
    empty_cache = row_cache_emptier(store) if uncached else None
    gc.collect()
    samples = []
    clock = time.perf_counter_ns
    misses = 0
    for digest in digests:
        if empty_cache is not None:
            empty_cache()
        start = clock()
        found = await store.get(digest, now=time.time())
        samples.append((clock() - start) / 1000)
        misses += found is None
    if misses:
        raise RuntimeError(f"{inserter.handle.kind}: {misses} lookups of stored sessions missed")
    return samples


def row_cache_emptier(store: Store) -> Callable[[], None] | None:
    """What empties ``store``'s cache of the rows it read, for a store that keeps one
    (SQLiteStore's, which is private: no API offers to empty it)."""
    cache = getattr(store, "_cache", None)
    return None if cache is None else cache.clear


# -- 2. per-user operations ----------------------------------------------------------------------


async def give_user_sessions(
    store: Store, template: SessionRecord, user_id: str, count: int
) -> str:
    """``count`` sessions for ``user_id``; the cookie of one of them."""
    now = time.time()
    token = secrets.token_urlsafe(32)
    records = [
        dataclasses.replace(
            template,
            id=secrets.token_urlsafe(16),
            token_digest=digest_of(token) if index == 0 else secrets.token_hex(32),
            user_id=user_id,
            data={"k": "v"},
            created_at=now - index,
            last_active_at=now - index,
            expires_at=now + 30 * DAY,
        )
        for index in range(count)
    ]
    calls = [(lambda r=r: store.create(r, max_sessions=count + 10, now=now)) for r in records]
    await gather_limited(calls, CREATE_CONCURRENCY)
    return f"{SESSION_COOKIE}={token}"


async def measure_user_operations(
    handle: StoreHandle, app: Any, template: SessionRecord, settings: Settings
) -> dict[int, dict[str, float]]:
    results: dict[int, dict[str, float]] = {}
    for count in settings.user_session_counts:
        user_id = f"many-{count}-{secrets.token_hex(3)}"
        cookie = await give_user_sessions(handle.store, template, user_id, count)
        reps = settings.user_op_reps if count < 1000 else max(3, settings.user_op_reps // 3)
        list_samples = []
        for _ in range(reps):
            start = time.perf_counter_ns()
            response = await call(app, make_scope("/list", cookie))
            list_samples.append((time.perf_counter_ns() - start) / 1000)
            if response.body != str(count).encode():
                raise RuntimeError(f"/list for {count} sessions said {response.body!r}")
        logout_samples = []
        for rep in range(max(2, reps // 2)):
            if rep:
                cookie = await give_user_sessions(handle.store, template, user_id, count)
            start = time.perf_counter_ns()
            response = await call(app, make_scope("/logout-all", cookie))
            logout_samples.append((time.perf_counter_ns() - start) / 1000)
            left = await handle.store.list_for_user(user_id, now=time.time())
            if response.status != 200 or left:
                raise RuntimeError(f"/logout-all for {count}: {response.status}, {len(left)} left")
        results[count] = {"list_us": median(list_samples), "logout_all_us": median(logout_samples)}
    return results


# -- 3. cleanup under load ----------------------------------------------------------------------


async def _read_latencies(app: Any, cookie: str, until: asyncio.Task[Any] | float) -> list[float]:
    """Authenticated reads, one after another, until the task ends or the time passes.

    Each latency counts from the moment the request is ready to run, so time
    the event loop spends elsewhere (on the cleanup) is in it, as it would be
    for a request arriving then.
    """
    scope = make_scope("/read", cookie)
    samples = []
    clock = time.perf_counter_ns
    while not (until.done() if isinstance(until, asyncio.Task) else time.monotonic() > until):
        start = clock()
        await asyncio.sleep(0)
        response = await call(app, scope)
        samples.append((clock() - start) / 1000)
        if response.body != b"v":
            raise RuntimeError(f"an authenticated read during cleanup gave {response.body!r}")
    return samples


async def signed_in(handle: StoreHandle, settings: Settings) -> tuple[Any, str, BulkInserter]:
    """Our app over the store, the cookie of a session it made, and an inserter that
    copies that session's stored row.
    """
    app = apps.authsessions_app(handle.store)
    cookie = await sign_in(app)
    template = await handle.store.get(digest_of(cookie.partition("=")[2]), now=time.time())
    assert template is not None
    return app, cookie, BulkInserter(handle, template, settings)


async def measure_cleanup(kind: str, settings: Settings) -> dict[str, Any]:
    handle = await make_store(kind, label=f"cleanup_{kind}")
    try:
        app, cookie, inserter = await signed_in(handle, settings)
        start = time.perf_counter()
        inserted = await inserter.grow_to(settings.cleanup_size, expired=True)
        insert_seconds = time.perf_counter() - start
        gc.collect()
        baseline = await _read_latencies(app, cookie, time.monotonic() + 1.0)
        print(
            f"  {kind}: {inserted} expired sessions stored ({inserter.method}, "
            f"{insert_seconds:.1f} s); cleaning up under load",
            flush=True,
        )
        deleted = _count_deletions(handle.store, time.monotonic() + settings.cleanup_timeout)
        manager = SessionManager(handle.store)
        started = time.perf_counter()
        cleanup = asyncio.create_task(manager.cleanup_expired())
        during = await _read_latencies(app, cookie, cleanup)
        try:
            await cleanup
            timed_out = False
        except _TimeLimit:
            timed_out = True
        seconds = time.perf_counter() - started
        survived = (await call(app, make_scope("/read", cookie))).body == b"v"
    finally:
        await handle.cleanup()
    return {
        "expired": inserted,
        "insert_method": inserter.method,
        "insert_seconds": insert_seconds,
        "deleted": deleted[0],
        "seconds": seconds,
        "timed_out": timed_out,
        "live_session_kept": survived,
        "baseline": _latency_summary(baseline),
        "during": _latency_summary(during),
    }


class _TimeLimit(Exception):
    """Raised between two cleanup batches once the part's time is up."""


def _count_deletions(store: Store, deadline: float) -> list[int]:
    """Wrap this store object's ``delete_expired``: count what a cleanup deleted so far,
    and stop the cleanup between batches at ``deadline``.

    (Not ``asyncio.wait_for``: redis-py 8.1 swallows the cancellation it relies on.)
    """
    deleted = [0]
    original = store.delete_expired

    async def counting(*, now: float, limit: int = 1000) -> int:
        count = await original(now=now, limit=limit)
        deleted[0] += count
        if count >= limit and time.monotonic() > deadline:
            raise _TimeLimit
        return count

    store.delete_expired = counting  # type: ignore[method-assign]
    return deleted


def _latency_summary(samples: list[float]) -> dict[str, float]:
    return {
        "requests": len(samples),
        "p50_us": median(samples),
        "p99_us": percentile(samples, 0.99),
        "max_us": max(samples, default=float("nan")),
    }


# -- the part --------------------------------------------------------------------------------


async def measure_store(kind: str, settings: Settings) -> dict[str, Any]:
    handle = await make_store(kind, label=f"scale_{kind}")
    small_handle = await make_store(kind, label=f"scale_small_{kind}")
    result: dict[str, Any] = {"lookups": {}}
    try:
        app, _cookie, inserter = await signed_in(handle, settings)
        _app, _cookie, small = await signed_in(small_handle, settings)
        await small.grow_to(settings.scale_sizes[0])
        for size in settings.scale_sizes:
            start = time.perf_counter()
            reached = await inserter.grow_to(size)
            print(
                f"  {kind}: {reached} sessions stored ({inserter.method}, "
                f"{time.perf_counter() - start:.1f} s)",
                flush=True,
            )
            result["lookups"][reached] = await measure_lookups(
                inserter, small, settings.scale_lookups
            )
            if row_cache_emptier(handle.store) is not None:
                result.setdefault("uncached_lookups", {})[reached] = await measure_lookups(
                    inserter, small, settings.scale_lookups, uncached=True
                )
            if reached < size:
                break
        result["insert_method"] = inserter.method
        result["stored"] = inserter.count
        result["users"] = await measure_user_operations(handle, app, inserter.template, settings)
    finally:
        await small_handle.cleanup()
        await handle.cleanup()
    result["cleanup"] = await measure_cleanup(kind, settings)
    return result


async def run(settings: Settings, kinds: list[str]) -> dict[str, Any]:
    results = {}
    for kind in kinds:
        print(f"  scale: {kind}", flush=True)
        try:
            results[kind] = await measure_store(kind, settings)
        except Exception as exc:  # one store failing (a flushed Redis) spoils only its row
            print(f"  error: scale part for {kind} failed: {exc!r}", flush=True)
        gc.collect()
    return results


UNCACHED = "{kind}, row cache emptied"
"""The label of a store's lookups with its row cache emptied before each one."""


def lookup_series(results: dict[str, Any]) -> dict[str, dict[Any, dict[str, float]]]:
    """Each store's lookups by size, under its name; a store with a row cache also under
    :data:`UNCACHED`, with its cache emptied before each lookup."""
    series = {}
    for kind, result in results.items():
        series[kind] = result["lookups"]
        if "uncached_lookups" in result:
            series[UNCACHED.format(kind=kind)] = result["uncached_lookups"]
    return series


def tables(results: dict[str, Any]) -> str:
    sizes = sorted({size for result in results.values() for size in result["lookups"]})
    lookup_rows = [
        [label]
        + [
            (
                f"{fmt_us(cell['p50_us'])} (p99 {fmt_us(cell['p99_us'])}; {cell['vs_small']:.2f}x)"
                if (cell := lookups.get(size))
                else "-"
            )
            for size in sizes
        ]
        for label, lookups in lookup_series(results).items()
    ]
    lookups = markdown_table(["store"] + [f"{size:,} sessions" for size in sizes], lookup_rows)
    counts = sorted({count for result in results.values() for count in result["users"]})
    user_rows = [
        [kind, operation] + [fmt_us(result["users"][count][key]) for count in counts]
        for kind, result in results.items()
        for operation, key in (("list_my_sessions", "list_us"), ("logout_all", "logout_all_us"))
    ]
    users = markdown_table(
        ["store", "request"] + [f"{count} sessions" for count in counts], user_rows
    )
    cleanup_rows = []
    for kind, result in results.items():
        c = result["cleanup"]
        rate = c["deleted"] / c["seconds"] if c["seconds"] else float("nan")
        stopped = " (stopped at the time limit)" if c["timed_out"] else ""
        cleanup_rows.append(
            [
                kind,
                f"{c['expired']:,}",
                f"{c['deleted']:,} in {c['seconds']:.1f} s{stopped}, {rate:,.0f}/s",
                f"{c['baseline']['p50_us']:.0f} / {c['baseline']['p99_us']:.0f} / "
                f"{c['baseline']['max_us']:.0f}",
                f"{c['during']['p50_us']:.0f} / {c['during']['p99_us']:.0f} / "
                f"{c['during']['max_us']:.0f}",
                f"{c['during']['requests']:,}",
                "yes" if c["live_session_kept"] else "NO",
            ]
        )
    cleanup = markdown_table(
        [
            "store",
            "expired sessions",
            "cleanup_expired",
            "read µs before: p50 / p99 / max",
            "read µs during: p50 / p99 / max",
            "reads served during",
            "live session kept",
        ],
        cleanup_rows,
    )
    return f"{lookups}\n\n{users}\n\n{cleanup}"
