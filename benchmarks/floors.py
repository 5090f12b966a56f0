"""The store's own floor: one raw indexed lookup with the same driver, and what we add to it.

For each store this part times, interleaved in chunks:

- ``raw``: the driver alone: stdlib ``sqlite3`` on the store's WAL file,
  asyncpg ``fetchrow`` on one connection and through a pool, redis-py ``GET``
  and ``HGETALL``: the cheapest lookups the driver offers;
- ``same command``: the driver call the store makes at its core, and no more:
  asyncpg ``fetchrow`` of the store's own statement, with its statement
  timeout, on one connection; redis-py ``EVALSHA`` of the store's own read
  script, sent on one connection of a client built as the store builds its own;
- ``store.get``: authsessions' store lookup of the same session;
- ``bare`` and ``ours``: a whole authenticated read request through the bare
  app and through ``SessionMiddleware`` over that store;
- ``bare + same command``: the bare app behind a middleware that makes the
  same-command lookup before the app runs, where ours makes its own; so
  ``ours - (bare + same command)`` is what the session layer costs a request
  beyond that lookup, and the costs of running code after a network wait
  (colder caches) fall on the same code in both;
- ``same command + ours on SQLite``: that middleware in front of our
  session middleware over an SQLite store, whose lookup never waits: the
  session layer's own code run after the same network wait. It splits
  ``ours - (bare + same command)`` into the layer's share and the networked
  store's (its driver call, pool and record parsing beyond SQLite's cached
  read). On a virtual machine whose CPU halts while the loop waits, code that
  runs after the wait costs several times its warm time; this shows how much
  of the overhead is that, on code every store shares.

``store.get - raw`` is the store's own Python overhead; ``ours - bare - raw``
is all the Python work the session layer adds to a request beyond the one
database round trip. Both are taken from the cheapest raw lookup; the same
differences from the same-command floor are reported beside them (``same``),
since a fail-closed timeout and a session's command shape are costs of the
driver's, not of our Python. For the networked stores, a counting TCP relay on
127.0.0.1 also counts the round trips an authenticated read makes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any

from benchmarks import apps
from benchmarks.asgi import call, drive, drive_timed, make_scope
from benchmarks.common import (
    POSTGRES_SCHEMA,
    POSTGRES_URL,
    REDIS_PREFIX,
    REDIS_URL,
    Settings,
    StoreHandle,
    digest_of,
    ensure_postgres_schema,
    fmt_us,
    make_store,
    markdown_table,
    median,
    postgres_session_table,
    postgres_store_options,
    redis_store_options,
    sqlite_session_table,
)
from benchmarks.inprocess import sign_in

SAME_COMMAND = "raw (same command)"
"""The floor that makes the store's own driver call (see the module docstring)."""
LOOKUP_REQUEST = "bare request + same command"
"""The bare app behind a middleware that makes the same-command lookup before the app
runs, as ours does: the least a request through a session middleware on this store costs."""
LAYER_AFTER_LOOKUP = "same command + ours on SQLite"
"""That middleware in front of ours over an SQLite store: the session layer's own code after
the same network wait, with no network lookup of its own (see the module docstring)."""

CHUNK = 200
"""Calls per timed chunk; chunks of the compared operations alternate."""

Timed = Callable[[int], Awaitable[tuple[float, float]]]
"""Runs an operation ``count`` times; the mean wall-clock and CPU µs per call."""

PAYLOAD_COLUMNS = {
    "user_id": "reader",
    "ip_address": "127.0.0.1",
    "user_agent": "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) Chrome/126.0.0.0",
    "device_name": "Chrome on macOS",
    "device_type": "desktop",
    "fingerprint": "0123456789abcdef0123456789abcdef",
    "data": '{"k":"v"}',
}


async def interleave(
    operations: dict[str, Timed], total: int
) -> tuple[dict[str, float], dict[str, float]]:
    """Median per-call wall and CPU µs of each operation, in alternating chunks of ``CHUNK``."""
    wall: dict[str, list[float]] = {name: [] for name in operations}
    cpu: dict[str, list[float]] = {name: [] for name in operations}
    for _ in range(max(1, total // CHUNK)):
        for name, operation in operations.items():
            wall_us, cpu_us = await operation(CHUNK)
            wall[name].append(wall_us)
            cpu[name].append(cpu_us)
    return (
        {name: median(values) for name, values in wall.items()},
        {name: median(values) for name, values in cpu.items()},
    )


def per_call_sync(work: Callable[[], Any]) -> Timed:
    async def timed(count: int) -> tuple[float, float]:
        clock, cpu = time.perf_counter_ns, time.process_time_ns
        start, start_cpu = clock(), cpu()
        for _ in range(count):
            work()
        return (clock() - start) / count / 1000, (cpu() - start_cpu) / count / 1000

    return timed


def per_call_async(work: Callable[[], Awaitable[Any]]) -> Timed:
    async def timed(count: int) -> tuple[float, float]:
        clock, cpu = time.perf_counter_ns, time.process_time_ns
        start, start_cpu = clock(), cpu()
        for _ in range(count):
            await work()
        return (clock() - start) / count / 1000, (cpu() - start_cpu) / count / 1000

    return timed


def per_request(app: Any, scope: dict[str, Any]) -> Timed:
    async def timed(count: int) -> tuple[float, float]:
        wall, cpu, _ = await drive_timed(app, scope, count)
        return wall / count / 1000, cpu / count / 1000

    return timed


# -- a relay that counts round trips ---------------------------------------------------------


class RoundTripCounter:
    """A TCP relay on 127.0.0.1 that counts request/response turns per connection.

    A turn starts whenever the client sends after the server last spoke (or
    first), so a pipelined batch or one Bind/Execute/Sync is one round trip.
    """

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.turns = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection(self.host, self.port)
        state = {"last": "server"}

        async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter, side: str) -> None:
            with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                while data := await source.read(65536):
                    if side == "client" and state["last"] != "client":
                        self.turns += 1
                    state["last"] = side
                    sink.write(data)
                    await sink.drain()
            sink.close()

        for task in (
            asyncio.create_task(pump(reader, upstream_writer, "client")),
            asyncio.create_task(pump(upstream_reader, writer, "server")),
        ):
            self._tasks.add(task)


def _relayed(url: str, port: int) -> str:
    scheme, _, rest = url.partition("://")
    userinfo, _, hostpart = rest.rpartition("@")
    _hostport, slash, path = hostpart.partition("/")
    prefix = f"{userinfo}@" if userinfo else ""
    return f"{scheme}://{prefix}127.0.0.1:{port}{slash}{path}"


async def count_round_trips(kind: str, requests: int = 50) -> dict[str, float]:
    """Round trips per authenticated read (within the touch interval) and per write."""
    from authsessions.stores import Store

    upstream = POSTGRES_URL if kind == "postgres" else REDIS_URL
    host_port = upstream.partition("://")[2].rpartition("@")[2].partition("/")[0]
    host, _, port = host_port.partition(":")
    counter = RoundTripCounter(host, int(port or (5432 if kind == "postgres" else 6379)))
    relay_port = await counter.start()
    store: Store
    if kind == "postgres":
        from authsessions.stores.postgres import PostgresStore

        schema = f"{POSTGRES_SCHEMA}_roundtrips"
        await ensure_postgres_schema(schema)
        options, dsn = postgres_store_options(schema)
        store = PostgresStore(_relayed(dsn, relay_port), **options)  # type: ignore[arg-type]
    else:
        from authsessions.stores.redis import RedisStore

        options = redis_store_options(f"{REDIS_PREFIX}roundtrips:")
        store = RedisStore(_relayed(REDIS_URL, relay_port), **options)  # type: ignore[arg-type]
    result: dict[str, float] = {}
    try:
        app = apps.authsessions_app(store)
        cookie = await sign_in(app)
        for scenario, path in (("read", "/read"), ("write", "/write"), ("anon", "/read")):
            scope = make_scope(path, None if scenario == "anon" else cookie)
            await drive(app, scope, 20)  # connections opened, statements prepared
            counter.turns = 0
            await drive(app, scope, requests)
            result[scenario] = counter.turns / requests
        counter.turns = 0
        for _ in range(requests):
            await call(app, make_scope("/login"))
        result["login"] = counter.turns / requests
    finally:
        with contextlib.suppress(Exception):
            await store.close()
        await counter.close()
    return result


# -- the floors, per store ----------------------------------------------------------------


async def _sqlite_raw(stack: AsyncExitStack, handle: StoreHandle, digest: str) -> dict[str, Timed]:
    assert handle.path is not None
    table = sqlite_session_table(handle.path)
    assert table is not None, "no session table in the SQLite file"
    connection = sqlite3.connect(handle.path, isolation_level=None, check_same_thread=False)
    stack.callback(connection.close)
    by_id = f"SELECT * FROM {table} WHERE id = ?"  # noqa: S608 - the store's own table
    by_digest = f"SELECT * FROM {table} WHERE token_digest = ?"  # noqa: S608
    (session_id,) = connection.execute(f"SELECT id FROM ({by_digest})", (digest,)).fetchone()  # noqa: S608
    return {
        "raw (primary key)": per_call_sync(
            lambda: connection.execute(by_id, (session_id,)).fetchall()
        ),
        "raw (token digest)": per_call_sync(
            lambda: connection.execute(by_digest, (digest,)).fetchall()
        ),
    }


async def _postgres_raw(
    stack: AsyncExitStack, handle: StoreHandle, digest: str
) -> dict[str, Callable[[], Awaitable[Any]]]:
    import asyncpg

    assert handle.schema is not None
    table = await postgres_session_table(handle.schema)
    assert table is not None, "no session table in the benchmark schema"
    connection = await asyncpg.connect(POSTGRES_URL)
    stack.push_async_callback(connection.close)
    # Like PostgresStore's pool: no reset query when a connection goes back.
    pool = await asyncpg.create_pool(POSTGRES_URL, min_size=1, max_size=2, reset=_no_reset)
    stack.push_async_callback(pool.close)
    by_digest = f"SELECT * FROM {table} WHERE token_digest = $1"  # noqa: S608 - the store's table
    store: Any = handle.store
    same, timeout = store._sql.get, store.command_timeout  # its statement, its timeout
    return {
        "raw (one connection)": lambda: connection.fetchrow(by_digest, digest),
        "raw (pool)": lambda: pool.fetchrow(by_digest, digest),
        SAME_COMMAND: lambda: connection.fetchrow(same, digest, time.time(), timeout=timeout),
    }


async def _no_reset(connection: object) -> None:
    pass


async def _redis_raw(
    stack: AsyncExitStack, handle: StoreHandle
) -> dict[str, Callable[[], Awaitable[Any]]]:
    """``GET`` of a value as long as a session, and ``HGETALL`` of the store's own session hash
    (the command the store's cached-location read sends; found by scanning its prefix).
    """
    from redis.asyncio import Redis

    client: Any = Redis.from_url(REDIS_URL)
    stack.push_async_callback(client.aclose)
    key = f"{REDIS_PREFIX}floor"
    await client.set(key, json.dumps({**PAYLOAD_COLUMNS, "expires_at": time.time() + 86400}))
    # On a connection kept from the pool, as the store sends its reads: through the client,
    # each command also takes a connection from the pool and gives it back, which cost
    # more than the store's whole get and made "store.get - raw" negative.
    kept = await _on_kept_connection(stack, client)
    operations: dict[str, Callable[[], Awaitable[Any]]] = {"raw (GET)": lambda: kept("GET", key)}
    prefix = handle.options.get("prefix", REDIS_PREFIX)
    session_hash: bytes | None = None
    async for found in client.scan_iter(match=f"{prefix}*", count=1000):
        if await client.type(found) == b"hash":
            session_hash = found
            break
    if session_hash is not None:
        operations["raw (HGETALL)"] = lambda: kept("HGETALL", session_hash)
        # The store's cached-location read: its script, sent as the store sends it (on a
        # connection kept from the pool of a client built like its own).
        from authsessions.stores import _redis_scripts as lua

        store: Any = handle.store
        like_store: Any = Redis.from_url(REDIS_URL, **store._client_options)
        stack.push_async_callback(like_store.aclose)
        sha = await like_store.script_load(lua.RECORD_JSON + lua.READ)
        send = await _on_kept_connection(stack, like_store)
        hash_key = session_hash.decode()
        operations[SAME_COMMAND] = lambda: send("EVALSHA", sha, 1, hash_key)
    return operations


async def _on_kept_connection(stack: AsyncExitStack, client: Any) -> Callable[..., Awaitable[Any]]:
    """A function that sends one command on a connection kept from ``client``'s pool (given
    back when ``stack`` closes), as the store sends its reads."""
    connection = await client.connection_pool.get_connection()
    stack.push_async_callback(client.connection_pool.release, connection)

    async def send(*command: Any) -> Any:
        await connection.send_command(*command, check_health=False)
        return await connection.read_response()

    return send


async def same_command(
    kind: str, stack: AsyncExitStack, handle: StoreHandle, digest: str
) -> Callable[[], Awaitable[Any]]:
    """The store's own command for the session of ``digest`` (see :data:`SAME_COMMAND`)."""
    if kind == "postgres":
        return (await _postgres_raw(stack, handle, digest))[SAME_COMMAND]
    if kind == "redis":
        return (await _redis_raw(stack, handle))[SAME_COMMAND]
    raise ValueError(f"no same-command lookup for {kind!r}")


async def measure_store(kind: str, settings: Settings) -> dict[str, Any]:
    handle = await make_store(kind, label=f"floor_{kind}")
    async with AsyncExitStack() as stack:
        stack.push_async_callback(handle.cleanup)
        app = apps.authsessions_app(handle.store)
        cookie = await sign_in(app)
        digest = digest_of(cookie.partition("=")[2])
        raw_lookups: dict[str, Callable[[], Awaitable[Any]]] = {}
        if kind == "postgres":
            raw_lookups = await _postgres_raw(stack, handle, digest)
        elif kind == "redis":
            raw_lookups = await _redis_raw(stack, handle)
        raw = {name: per_call_async(lookup) for name, lookup in raw_lookups.items()}
        if kind == "sqlite":
            raw = await _sqlite_raw(stack, handle, digest)
        bare = apps.bare_app()
        store = handle.store
        same_scope = make_scope("/read", apps.ignored_cookie())
        operations = {
            **raw,
            "store.get": per_call_async(lambda: store.get(digest, now=time.time())),
            "bare request": per_request(bare, same_scope),
            "our request": per_request(app, make_scope("/read", cookie)),
        }
        if SAME_COMMAND in raw:
            wait = raw_lookups[SAME_COMMAND]
            operations[LOOKUP_REQUEST] = per_request(apps.lookup_middleware_app(wait), same_scope)
            sqlite = await make_store("sqlite", label=f"floor_{kind}_layer")
            stack.push_async_callback(sqlite.cleanup)
            layer_app = apps.authsessions_app(sqlite.store, lookup_first=wait)
            layer_cookie = await sign_in(layer_app)
            operations[LAYER_AFTER_LOOKUP] = per_request(
                layer_app, make_scope("/read", layer_cookie)
            )
        for operation in operations.values():  # warm-up: caches, prepared statements
            await operation(CHUNK)
        timings, cpu = await interleave(operations, settings.floor_lookups)
    cheapest = [name for name in raw if name != SAME_COMMAND]
    raw_floor = min((timings[name] for name in cheapest), default=0.0)
    raw_cpu = min((cpu[name] for name in cheapest), default=0.0)
    result: dict[str, Any] = {
        "timings_us": timings,
        "cpu_us": cpu,
        "raw_floor_us": raw_floor,
        "raw_floor_name": min(cheapest, key=lambda name: timings[name]) if cheapest else "",
        "store_overhead_us": timings["store.get"] - raw_floor,
        "request_overhead_us": timings["our request"] - timings["bare request"] - raw_floor,
        # CPU time is our process's own work, steady on a busy machine; the server's is not in it.
        "store_overhead_cpu_us": cpu["store.get"] - raw_cpu,
        "request_overhead_cpu_us": cpu["our request"] - cpu["bare request"] - raw_cpu,
    }
    if SAME_COMMAND in raw:
        same_cpu = cpu[SAME_COMMAND]
        result["same_command_cpu_us"] = same_cpu
        result["store_overhead_same_cpu_us"] = cpu["store.get"] - same_cpu
        result["request_overhead_same_cpu_us"] = cpu["our request"] - cpu["bare request"] - same_cpu
        # The whole request against the same request whose middleware makes the same lookup
        # at the same point: what runs after the network wait is the same code in both.
        result["request_overhead_lookup_cpu_us"] = cpu["our request"] - cpu[LOOKUP_REQUEST]
        result["request_overhead_lookup_us"] = timings["our request"] - timings[LOOKUP_REQUEST]
        result["layer_after_lookup_cpu_us"] = cpu[LAYER_AFTER_LOOKUP] - cpu[LOOKUP_REQUEST]
        result["store_after_lookup_cpu_us"] = cpu["our request"] - cpu[LAYER_AFTER_LOOKUP]
    if kind in ("postgres", "redis"):
        result["round_trips"] = await count_round_trips(kind)
    return result


async def run(settings: Settings, kinds: list[str]) -> dict[str, Any]:
    return {kind: await measure_store(kind, settings) for kind in kinds}


def table(results: dict[str, Any]) -> str:
    rows = []
    for kind, result in results.items():
        timings = result["timings_us"]
        raw = ", ".join(
            f"{name.removeprefix('raw ')} {fmt_us(value)}"
            for name, value in timings.items()
            if name.startswith("raw")
        )
        trips = result.get("round_trips")
        rows.append(
            [
                kind,
                raw or "-",
                fmt_us(timings["store.get"]),
                fmt_us(result["store_overhead_us"]) if raw else "-",
                f"{fmt_us(timings['our request'])} vs {fmt_us(timings['bare request'])}",
                fmt_us(result["request_overhead_us"]),
                fmt_us(result["request_overhead_cpu_us"]),
                (
                    f"{fmt_us(result['request_overhead_same_cpu_us'])} "
                    f"(store.get {fmt_us(result['store_overhead_same_cpu_us'])})"
                    if "same_command_cpu_us" in result
                    else "-"
                ),
                (
                    f"{fmt_us(result['request_overhead_lookup_cpu_us'])} "
                    f"(wall {fmt_us(result['request_overhead_lookup_us'])})"
                    if "request_overhead_lookup_cpu_us" in result
                    else "-"
                ),
                (
                    f"{fmt_us(result['layer_after_lookup_cpu_us'])} / "
                    f"{fmt_us(result['store_after_lookup_cpu_us'])}"
                    if "layer_after_lookup_cpu_us" in result
                    else "-"
                ),
                (
                    f"{trips['read']:.2f} / {trips['write']:.2f} / {trips['anon']:.2f} / "
                    f"{trips['login']:.2f}"
                    if trips
                    else "-"
                ),
            ]
        )
    header = [
        "store",
        "raw driver lookup",
        "store.get",
        "store.get - raw",
        "read request: ours vs bare",
        "ours - bare - raw (wall)",
        "ours - bare - raw (CPU)",
        "ours - bare - same command (CPU)",
        "ours - (bare + same command) (CPU)",
        "of which the layer / the store (CPU)",
        "round trips read / write / anon / login",
    ]
    return markdown_table(header, rows)
