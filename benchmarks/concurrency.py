"""Requests under concurrency, in process: many request streams at once on one event loop.

The per-request part drives one request at a time. Here ``streams`` tasks each
drive a batch of sequential requests at the same time, as a busy server's event
loop interleaves its connections: stores then meet their own concurrency (a
PostgreSQL pool shared by waiting requests, Redis connections, SQLite writes
queueing behind the writer thread's checkpoints). Every stream of a variant
sends the same cookie: the writes go to one session and the logins to one
user, the worst case for a store's per-session and per-user locking. Each
repetition runs every (variant, scenario) pair once, in shuffled order; the
result is the median requests per second, and its share of the bare app's.
"""

from __future__ import annotations

import asyncio
import gc
import random
import time
from typing import Any

from benchmarks import apps
from benchmarks.asgi import drive
from benchmarks.common import Settings, median
from benchmarks.inprocess import Variant, open_variant, scenario_table, validate, variant_names

SCENARIOS = ("read", "write", "login")


async def _requests_per_second(variant: Variant, scenario: str, streams: int, count: int) -> float:
    scope = variant.scope(scenario)
    start = time.perf_counter()
    await asyncio.gather(*(drive(variant.app, scope, count) for _ in range(streams)))
    return streams * count / (time.perf_counter() - start)


async def run(settings: Settings, kinds: list[str]) -> dict[str, Any]:
    names = [name for name in variant_names(kinds) if name != apps.NOOP_MIDDLEWARE]
    variants = []
    try:
        for name in names:
            variants.append(await open_variant(name))
            await validate(variants[-1])
        streams, count = settings.concurrency_streams, settings.concurrency_requests
        pairs = [(variant, scenario) for variant in variants for scenario in SCENARIOS]
        for variant, scenario in pairs:  # warm-up: pools filled, statements prepared
            await _requests_per_second(variant, scenario, streams, max(1, count // 10))
        samples: dict[tuple[str, str], list[float]] = {(v.name, s): [] for v, s in pairs}
        order = random.Random(7)  # noqa: S311 - only an ordering
        for _rep in range(settings.concurrency_reps):
            order.shuffle(pairs)
            for variant, scenario in pairs:
                gc.collect()
                rate = await _requests_per_second(variant, scenario, streams, count)
                samples[variant.name, scenario].append(rate)
    finally:
        for variant in variants:
            await variant.close()
    results: dict[str, Any] = {
        "streams": streams,
        "requests": count,
        "variants": [v.name for v in variants],
        "scenarios": {},
    }
    for scenario in SCENARIOS:
        bare = median(samples[apps.BARE, scenario])
        results["scenarios"][scenario] = {
            v.name: {
                "per_second": median(samples[v.name, scenario]),
                "share": median(samples[v.name, scenario]) / bare,
            }
            for v in variants
        }
    return results


def table(results: dict[str, Any]) -> str:
    """Requests per second (share of the bare app's)."""
    return scenario_table(
        results, SCENARIOS, lambda cell: f"{cell['per_second']:,.0f}/s ({cell['share'] * 100:.0f}%)"
    )
