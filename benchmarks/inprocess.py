"""Per-request cost in process: every variant driven directly, each paired with the bare app.

For each repetition, every (variant, scenario) pair runs one batch of
sequential requests, in a freshly shuffled order, and so does the bare app
beside it: the two take turns every few dozen requests (``drive_paired``),
so that a guest whose speed changes from one moment to the next runs both
at the same speeds; a few untimed requests start each run, so that it finds
the CPU's caches as its own requests leave them. A variant's ratio is the
median over repetitions of its batch's time over the bare app's beside it;
its time, the median over repetitions of the mean per-request time of its
batches (the bare app's, over every batch it ran beside a variant).

Batches of each variant alone, shuffled, left its ratio to the drift: in four
runs on one guest, the no-op middleware (1.08x of the bare route in
instructions) came out anywhere from 0.995x to 1.31x, where paired batches in
the same minutes gave 1.069x to 1.087x.
"""

from __future__ import annotations

import contextlib
import gc
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from statistics import mean
from typing import Any

from starlette.types import ASGIApp

from authsessions.stores import SQLiteStore
from authsessions.stores._sqlite_writer import _done as wait_until_done
from benchmarks import apps
from benchmarks.asgi import Timing, call, drive, drive_paired, make_scope
from benchmarks.common import (
    REDIS_PREFIX,
    REDIS_URL,
    Settings,
    StoreHandle,
    fmt_us,
    make_store,
    markdown_table,
    median,
    port_open,
)

SCENARIOS = ("read", "write", "anon", "login")
SCENARIO_TITLES = {
    "read": "authenticated read",
    "write": "authenticated write",
    "anon": "no cookie",
    "login": "login",
}


@dataclass
class Variant:
    name: str
    app: ASGIApp
    cookie: str | None = None
    """The ``Cookie`` header the read and write scenarios send."""
    handle: StoreHandle | None = None
    closers: list[Callable[[], Awaitable[Any]]] = field(default_factory=list)

    async def settle(self) -> None:
        """Wait for work this variant's requests left running on another thread.

        A SQLite store's writer thread copies the WAL into the database once writes
        have added enough to it (a checkpoint's copy), beside the requests. Left
        running, it would compete with whatever ran next, the bare app's run beside
        this variant's, for the CPU; its CPU is this variant's (see ``drive_paired``).
        """
        if self.handle is None or not isinstance(self.handle.store, SQLiteStore):
            return
        writer = self.handle.store._writer
        # Only what is under way: a hop to the thread for nothing would cost the variant
        # a thread's wake-up, in CPU, after every run.
        copying = writer._copying
        if copying is not None and not copying.done():
            await wait_until_done(copying)
        await writer.wait_for_finish()

    def scope(self, scenario: str) -> dict[str, Any]:
        if scenario == "read":
            return make_scope("/read", self.cookie)
        if scenario == "write":
            return make_scope("/write", self.cookie)
        if scenario == "anon":
            return make_scope("/read")
        if scenario == "login":
            return make_scope("/login")
        raise ValueError(scenario)

    async def close(self) -> None:
        for closer in self.closers:
            with contextlib.suppress(Exception):
                await closer()
        if self.handle is not None:
            await self.handle.cleanup()


async def sign_in(app: ASGIApp, path: str = "/setup") -> str:
    """Log in through the app itself (``reader``, or whom ``path`` names); the cookie set."""
    response = await call(app, make_scope(path))
    cookie = response.cookie()
    if response.status != 200 or cookie is None:
        raise RuntimeError(f"{path} gave {response.status} and no cookie: {response.headers}")
    return cookie


def variant_names(kinds: list[str]) -> list[str]:
    """The bare app, the no-op middleware, the peers (starsessions-redis only when Redis
    answers) and authsessions over each store kind.
    """
    names = [apps.BARE, apps.NOOP_MIDDLEWARE, apps.STARLETTE_COOKIE, apps.STARSESSIONS_MEMORY]
    if port_open(REDIS_URL):
        names.append(apps.STARSESSIONS_REDIS)
    else:
        print(f"  note: skipping starsessions-redis: Redis not reachable at {REDIS_URL}")
    return names + [apps.ours(kind) for kind in kinds]


async def open_variant(name: str) -> Variant:
    """The variant called ``name``, signed in (its read and write scenarios have a cookie)."""
    if name == apps.BARE:
        variant = Variant(name, apps.bare_app())
    elif name == apps.NOOP_MIDDLEWARE:
        variant = Variant(name, apps.noop_middleware_app())
    elif name in apps.MIDDLEWARE_FLOORS:
        variant = Variant(name, apps.middleware_floor_app(name))
    elif name == apps.STARLETTE_COOKIE:
        variant = Variant(name, apps.starlette_cookie_app())
    elif name == apps.STARSESSIONS_MEMORY:
        variant = Variant(name, apps.starsessions_app(apps.starsessions_memory_store()))
    elif name == apps.STARSESSIONS_REDIS:
        store = apps.starsessions_redis_store(REDIS_URL, f"{REDIS_PREFIX}starsessions:")
        variant = Variant(name, apps.starsessions_app(store))
        variant.closers.append(store._connection.aclose)
    elif apps.is_ours(name):
        kind = name.removeprefix(apps.OURS_PREFIX)
        handle = await make_store(kind, label=f"inprocess_{kind}")
        variant = Variant(name, apps.authsessions_app(handle.store), handle=handle)
    else:
        raise ValueError(f"unknown variant {name!r}")
    if name in apps.SESSIONLESS:
        variant.cookie = apps.ignored_cookie()
    else:
        variant.cookie = await sign_in(variant.app)
    return variant


async def open_variants(kinds: list[str]) -> list[Variant]:
    """Every variant of :func:`variant_names`, signed in."""
    return [await open_variant(name) for name in variant_names(kinds)]


async def validate(variant: Variant) -> None:
    """Each scenario does what it claims before it is timed."""
    for scenario in SCENARIOS:
        response = await call(variant.app, variant.scope(scenario))
        problem = ""
        if response.status != 200:
            problem = f"status {response.status}"
        elif scenario == "read" and response.body != b"v":
            problem = f"read {response.body!r}, not b'v': the session was not loaded"
        elif (
            scenario == "login"
            and variant.name not in apps.SESSIONLESS
            and response.cookie() is None
        ):
            problem = "no session cookie set"
        elif (
            apps.is_ours(variant.name)
            and scenario in ("read", "anon")
            and response.header("set-cookie")
        ):
            problem = f"unexpected Set-Cookie {response.header('set-cookie')}"
        if problem:
            raise RuntimeError(f"{variant.name} / {scenario}: {problem}")


async def run(settings: Settings, kinds: list[str]) -> dict[str, Any]:
    variants = await open_variants(kinds)
    try:
        for variant in variants:
            await validate(variant)
        bare = next(variant for variant in variants if variant.name == apps.BARE)
        scopes = {(v.name, s): v.scope(s) for v in variants for s in SCENARIOS}
        for variant in variants:
            for scenario in SCENARIOS:
                await drive(variant.app, scopes[variant.name, scenario], settings.inprocess_warmup)
        samples: dict[tuple[str, str], list[Timing]] = {key: [] for key in scopes}
        ratios: dict[tuple[str, str], list[float]] = {key: [] for key in scopes}
        cpu_ratios: dict[tuple[str, str], list[float]] = {key: [] for key in scopes}
        pairs = [(v, s) for v in variants if v is not bare for s in SCENARIOS]
        order = random.Random(4)  # noqa: S311 - only an ordering
        for _rep in range(settings.inprocess_reps):
            order.shuffle(pairs)
            for variant, scenario in pairs:
                gc.collect()
                key, bare_key = (variant.name, scenario), (apps.BARE, scenario)
                ours, theirs = await drive_paired(
                    variant.app,
                    scopes[key],
                    bare.app,
                    scopes[bare_key],
                    settings.inprocess_batch,
                    settings.inprocess_chunk,
                    lead_in=settings.inprocess_lead_in,
                    settle=variant.settle,
                )
                samples[key].append(ours)
                samples[bare_key].append(theirs)
                ratios[key].append(ours.wall / theirs.wall)
                cpu_ratios[key].append(ours.cpu / theirs.cpu)
    finally:
        for variant in variants:
            await variant.close()
    per_request = settings.inprocess_batch * 1000  # ns per batch -> µs per request
    results: dict[str, Any] = {"variants": [v.name for v in variants], "scenarios": {}}
    for scenario in SCENARIOS:
        cells: dict[str, Any] = {}
        for variant in variants:
            key = variant.name, scenario
            wall = [timing.wall / per_request for timing in samples[key]]
            cells[variant.name] = {
                "median_us": median(wall),
                "min_us": min(wall),
                "max_us": max(wall),
                "ratio": median(ratios[key]) if variant is not bare else 1.0,
                "cpu_us": median([timing.cpu / per_request for timing in samples[key]]),
                "cpu_ratio": median(cpu_ratios[key]) if variant is not bare else 1.0,
                # A mean, not a median: the kernel counts this time in clock ticks (4 ms
                # here, 8 µs over a batch of 500), which only the total resolves.
                "system_us": mean(timing.system / per_request for timing in samples[key]),
            }
        results["scenarios"][scenario] = cells
    return results


def table(results: dict[str, Any], *, cpu: bool = False) -> str:
    """Median per request (ratio to bare); ``cpu``: this process's CPU time instead."""
    value, ratio = ("cpu_us", "cpu_ratio") if cpu else ("median_us", "ratio")
    return scenario_table(
        results, SCENARIOS, lambda cell: f"{fmt_us(cell[value])} ({cell[ratio]:.2f}x)"
    )


def scenario_table(
    results: dict[str, Any],
    scenarios: tuple[str, ...],
    text: Callable[[dict[str, Any]], str],
    titles: dict[str, str] = SCENARIO_TITLES,
) -> str:
    """A row per variant, a column per scenario (headed by its title), each cell ``text``
    of its results.
    """
    header = ["variant"] + [titles[s] for s in scenarios]
    rows = [
        [name] + [text(results["scenarios"][scenario][name]) for scenario in scenarios]
        for name in results["variants"]
    ]
    return markdown_table(header, rows)
