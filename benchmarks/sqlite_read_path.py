"""What one session lookup costs on SQLite: SQLiteStore.get vs raw sqlite3 vs aiosqlite.

SQLiteStore reads on the event loop's thread through ``sqlite3`` (see the
docstring of ``authsessions/stores/sqlite.py``); this checks what that buys
over handing each read to a thread, as aiosqlite does. Every variant runs the
same indexed ``SELECT … WHERE token_digest = ? AND expires_at > ?`` against
the same WAL file, for digests that exist.

Run: ``.venv/bin/python benchmarks/sqlite_read_path.py [--sessions N] [--ops N]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiosqlite

from authsessions._records import SessionRecord
from authsessions._tokens import new_session_id, new_token, token_digest
from authsessions.stores import SQLiteStore
from authsessions.stores._sqlite_schema import COLUMNS, TABLE

SQL = f"SELECT {COLUMNS} FROM {TABLE} WHERE token_digest = ? AND expires_at > ?"  # noqa: S608
REPEATS = 7


def make_record(user: int, now: float) -> SessionRecord:
    return SessionRecord(
        id=new_session_id(),
        token_digest=token_digest(new_token()),
        user_id=f"user{user}",
        ip_address="203.0.113.7",
        user_agent="Mozilla/5.0 (Macintosh; Intel Mac OS X 14_4) Chrome/124.0",
        device_name="Chrome on macOS",
        device_type="desktop",
        fingerprint="f" * 64,
        data={"cart": [1, 2, 3], "theme": "dark", "csrf": new_token()},
        created_at=now,
        last_active_at=now,
        expires_at=now + 86400,
    )


def per_op_us(timings: list[float], ops: int) -> tuple[float, float]:
    """(median, best) microseconds per operation over the repeats."""
    per_op = [seconds / ops * 1e6 for seconds in timings]
    return statistics.median(per_op), min(per_op)


Variant = tuple[str, Callable[[str], Awaitable[object]], int]


async def run_rounds(variants: list[Variant], digests: list[str]) -> dict[str, list[float]]:
    """Seconds per batch for each variant, in interleaved rounds so load spreads evenly."""
    timings: dict[str, list[float]] = {name: [] for name, _, _ in variants}
    for _ in range(REPEATS):
        for name, work, ops in variants:
            batch = [random.choice(digests) for _ in range(ops)]  # noqa: S311
            started = time.perf_counter()
            for digest in batch:
                await work(digest)
            timings[name].append(time.perf_counter() - started)
    return timings


def synchronous(work: Callable[[str], object]) -> Callable[[str], Awaitable[object]]:
    """A blocking call as a coroutine, so every variant pays the same ``await`` per lookup."""

    async def call(digest: str) -> object:
        return work(digest)

    return call


async def main(sessions: int, ops: int) -> None:
    now = time.time()
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "sessions.db"
        async with SQLiteStore(path) as store:
            records = [make_record(i % (sessions // 5 or 1), now) for i in range(sessions)]
            for record in records:
                await store.create(record, max_sessions=10, now=now)
            digests = [record.token_digest for record in records]

            raw = sqlite3.connect(path, isolation_level=None)
            raw.execute("PRAGMA query_only = ON")

            def raw_select(digest: str) -> object:
                return raw.execute(SQL, (digest, now)).fetchone()

            def raw_select_and_build(digest: str) -> object:
                row = raw.execute(SQL, (digest, now)).fetchone()
                return SessionRecord(
                    row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7],
                    json.loads(row[8]), row[9], row[10], row[11],
                )  # fmt: skip

            async def store_get(digest: str) -> object:
                record = await store.get(digest, now=now)
                assert record is not None
                return record

            async with aiosqlite.connect(path, isolation_level=None) as adb:

                async def aiosqlite_fetchone(digest: str) -> object:
                    async with adb.execute(SQL, (digest, now)) as cursor:
                        return await cursor.fetchone()

                async def aiosqlite_fetchall(digest: str) -> object:
                    return await adb.execute_fetchall(SQL, (digest, now))

                thread_ops = max(ops // 10, 100)
                variants: list[Variant] = [
                    ("raw sqlite3 SELECT (fetchone)", synchronous(raw_select), ops),
                    ("raw sqlite3 SELECT + SessionRecord", synchronous(raw_select_and_build), ops),
                    ("await SQLiteStore.get", store_get, ops),
                    ("aiosqlite execute_fetchall", aiosqlite_fetchall, thread_ops),
                    ("aiosqlite execute + fetchone", aiosqlite_fetchone, thread_ops),
                ]
                timings = await run_rounds(variants, digests)
            raw.close()

    medians = {name: per_op_us(timings[name], ops) for name, _, ops in variants}
    baseline, best_baseline = medians["raw sqlite3 SELECT (fetchone)"]
    print(
        f"SQLite {sqlite3.sqlite_version}, Python {sys.version.split()[0]}, "
        f"{sessions} sessions; µs per lookup, median and best of {REPEATS} interleaved rounds"
    )
    print(f"{'variant':<36} {'median':>8} {'vs raw':>7} {'best':>8} {'vs raw':>7}")
    for name, (median, best) in medians.items():
        print(
            f"{name:<36} {median:>8.1f} {median / baseline:>6.1f}x"
            f" {best:>8.1f} {best / best_baseline:>6.1f}x"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=5000)
    parser.add_argument("--ops", type=int, default=20000)
    arguments = parser.parse_args()
    asyncio.run(main(arguments.sessions, arguments.ops))
