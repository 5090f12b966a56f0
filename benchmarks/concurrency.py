"""Requests under concurrency, in process: many request streams at once on one event loop.

The per-request part drives one request at a time. Here ``streams`` tasks each
drive a batch of sequential requests at the same time, as a busy server's event
loop interleaves its connections: stores then meet their own concurrency (a
PostgreSQL pool shared by waiting requests, Redis connections, SQLite writes
queueing behind the writer thread's checkpoints). Each scenario runs twice:
every stream sending the same cookie (the writes go to one session and the
logins to one user, the worst case for a store's per-session and per-user
locking), and every stream with a session and a user of its own, as real
traffic spreads (what then queues is the store's connections, not its rows).
A last scenario mixes them: every stream reads its own session but one, which
writes its own (a store that forgets every cached session on a write shows it
here). Each repetition runs every (variant, scenario) pair once, in shuffled order,
each right beside a batch of the bare app's (which of the two goes first alternates):
the result is the median requests per second, and as its share of the bare app's the
median of each batch's rate over the bare app's beside it, which holds where the
machine's speed moves between batches (as the in-process part's ratios do).
"""

from __future__ import annotations

import asyncio
import gc
import random
import time
from typing import Any

from benchmarks import apps
from benchmarks.asgi import call, drive, make_scope
from benchmarks.common import Settings, median
from benchmarks.inprocess import (
    SCENARIO_TITLES,
    Variant,
    open_variant,
    scenario_table,
    sign_in,
    validate,
    variant_names,
)

SHARED = ("read", "write", "login")
SPREAD_SUFFIX = "-spread"
MIXED = "mixed-spread"
SCENARIOS = (*SHARED, *(f"{scenario}{SPREAD_SUFFIX}" for scenario in SHARED), MIXED)
"""The shared scenarios (one cookie, one session, one user for every stream), then each
spread (a session and a user per stream), then reads beside one stream's writes."""

Scopes = list[dict[str, Any]]


async def stream_scopes(variant: Variant, streams: int) -> dict[str, Scopes]:
    """Each scenario's request scope for every stream.

    The spread logins are of other users than the spread sessions, as the shared
    login's user is not the shared session's: logging a user in again and again
    evicts that user's oldest sessions, which would leave the reads and writes
    anonymous (and cheap).
    """
    scopes = {scenario: [variant.scope(scenario)] * streams for scenario in SHARED}
    # The route the spread logins take, so that both logins cost the app the same.
    scopes["login"] = [make_scope("/login/login-user")] * streams
    if variant.name in apps.SESSIONLESS:
        cookies = [apps.ignored_cookie() for _ in range(streams)]
    else:
        cookies = [await sign_in(variant.app, f"/login/reader-{i}") for i in range(streams)]
    scopes["read-spread"] = [make_scope("/read", cookie) for cookie in cookies]
    scopes["write-spread"] = [make_scope("/write", cookie) for cookie in cookies]
    scopes["login-spread"] = [make_scope(f"/login/login-user-{i}") for i in range(streams)]
    scopes[MIXED] = scopes["read-spread"][:-1] + scopes["write-spread"][-1:]
    return scopes


async def still_signed_in(variant: Variant, scopes: dict[str, Scopes]) -> None:
    """Every stream's session still holds its key after the runs (the writes changed it)."""
    for scope in scopes["read"][:1] + scopes["read-spread"]:
        response = await call(variant.app, scope)
        if response.status != 200 or response.body == b"None":
            raise RuntimeError(f"{variant.name}: a stream's session no longer reads back")


async def _requests_per_second(variant: Variant, scopes: Scopes, count: int) -> float:
    start = time.perf_counter()
    await asyncio.gather(*(drive(variant.app, scope, count) for scope in scopes))
    return len(scopes) * count / (time.perf_counter() - start)


async def run(settings: Settings, kinds: list[str]) -> dict[str, Any]:
    names = [name for name in variant_names(kinds) if name != apps.NOOP_MIDDLEWARE]
    variants = []
    streams, count = settings.concurrency_streams, settings.concurrency_requests
    scopes: dict[str, dict[str, Scopes]] = {}
    try:
        for name in names:
            variants.append(await open_variant(name))
            await validate(variants[-1])
            scopes[name] = await stream_scopes(variants[-1], streams)
        warm_up = max(1, count // 10)
        for variant in variants:  # warm-up: pools filled, statements prepared
            for scenario in SCENARIOS:
                await _requests_per_second(variant, scopes[variant.name][scenario], warm_up)
        bare = next(variant for variant in variants if variant.name == apps.BARE)
        samples: dict[tuple[str, str], list[float]] = {
            (v.name, s): [] for v in variants for s in SCENARIOS
        }
        shares: dict[tuple[str, str], list[float]] = {key: [] for key in samples}
        pairs = [(v, s) for v in variants if v is not bare for s in SCENARIOS]
        order = random.Random(7)  # noqa: S311 - only an ordering
        for _rep in range(settings.concurrency_reps):
            order.shuffle(pairs)
            for turn, (variant, scenario) in enumerate(pairs):
                rates: dict[str, float] = {}
                for side in (variant, bare) if turn % 2 else (bare, variant):
                    gc.collect()
                    side_scopes = scopes[side.name][scenario]
                    rates[side.name] = await _requests_per_second(side, side_scopes, count)
                    await side.settle()  # its checkpoint's copy must not slow the other side
                samples[variant.name, scenario].append(rates[variant.name])
                samples[apps.BARE, scenario].append(rates[apps.BARE])
                shares[variant.name, scenario].append(rates[variant.name] / rates[apps.BARE])
        for variant in variants:
            await still_signed_in(variant, scopes[variant.name])
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
        results["scenarios"][scenario] = {
            v.name: {
                "per_second": median(samples[v.name, scenario]),
                "share": median(shares[v.name, scenario]) if v is not bare else 1.0,
            }
            for v in variants
        }
    return results


def table(results: dict[str, Any]) -> str:
    """Requests per second (share of the bare app's)."""
    streams = results["streams"]
    titles = {
        "read": f"{SCENARIO_TITLES['read']}, one session",
        "write": f"{SCENARIO_TITLES['write']}, one session",
        "login": "login, one user",
        "read-spread": f"{SCENARIO_TITLES['read']}, {streams} sessions",
        "write-spread": f"{SCENARIO_TITLES['write']}, {streams} sessions",
        "login-spread": f"login, {streams} users",
        MIXED: f"{streams} sessions, one of them writing",
    }
    return scenario_table(
        results,
        SCENARIOS,
        lambda cell: f"{cell['per_second']:,.0f}/s ({cell['share'] * 100:.0f}%)",
        titles,
    )
