"""Instructions per request, counted by valgrind's callgrind: a measure the machine's load
and speed do not move.

Time on a shared virtual machine drifts by half between minutes, and the ratio of two
variants with it (a run of the in-process part on a slow, busy host gives other ratios than
one on a fast, idle host). The instructions a request executes do not: each variant runs in
a Python process of its own under callgrind with counting off, warms every scenario up, then
runs one batch of each scenario inside ``operator.call``, the only function callgrind counts
in (``--toggle-collect``), dumping the batch's count as the call returns (``--dump-after``).
Nothing else calls ``operator.call``. Instructions are not time (a cache miss costs the same
count as a hit), so this part stands beside the timed ones, not in their place.

A SQLite store's writer thread does part of a write's or login's work: the checkpoint
that copies the WAL into the database once requests have added about 1,000 pages to it
(``_checkpoints.py``). Each of its jobs runs inside ``operator.methodcaller``'s call,
which callgrind also toggles collection on (``toggle-collect`` is per thread), and each
batch counts the checkpoints its own pages set off: it ends by waiting for them
(``Variant.settle``), and a dump as ``operator.call`` is entered discards what the thread
did before the batch (the warm-up's). A batch of 1,000 data writes, one page each, sets
off exactly one checkpoint, wherever in its schedule the WAL stood: the count is the
write's share at the steady rate. Until the thirty-first round, the thread was not
counted at all.

Two more reference points are counted here only: ``forwarding-middleware``, the
least any middleware costs (one layer awaiting the app), and ``send-wrapper-middleware``,
the least one that may add a header to the response costs (that layer and the cheapest
``send`` wrapper there is).

For PostgreSQL and Redis, ``lookup-<store>`` is the bare app behind a middleware that makes
the store's own command before the app runs (as in ``floors.py``): ours minus it is the
session layer's own work around the one round trip, in instructions.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import operator
import shutil
import subprocess
import sys
import tempfile
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

from authsessions.stores import SQLiteStore
from benchmarks import apps, floors
from benchmarks.asgi import drive
from benchmarks.common import ROOT, Settings, digest_of, make_store, markdown_table
from benchmarks.inprocess import (
    SCENARIO_TITLES,
    SCENARIOS,
    Variant,
    open_variant,
    sign_in,
    validate,
    variant_names,
)

LOOKUP_PREFIX = "lookup-"
"""``lookup-postgres``: the bare app behind a middleware making PostgresStore's own command."""


def lookup(kind: str) -> str:
    return f"{LOOKUP_PREFIX}{kind}"


def run(settings: Settings, kinds: list[str]) -> dict[str, Any]:
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        print("  note: skipping instruction counts: valgrind is not installed")
        return {}
    names = variant_names(kinds)
    # Counted here only: what any middleware costs, to the instruction (see apps.py).
    position = names.index(apps.NOOP_MIDDLEWARE)
    names[position:position] = list(apps.MIDDLEWARE_FLOORS)
    names += [lookup(kind) for kind in kinds if kind in ("postgres", "redis")]
    counts: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="callgrind-") as folder:
        # One child per core: callgrind runs a process on one thread.
        pending = list(names)
        running: list[tuple[str, subprocess.Popen[str], Path]] = []
        while pending or running:
            while pending and len(running) < 2:
                name = pending.pop(0)
                out = Path(folder) / name
                out.mkdir()
                running.append((name, _start(valgrind, name, settings, out), out))
            name, child, out = running.pop(0)
            stdout, _ = child.communicate()
            if child.returncode != 0:
                print(f"  warning: {name}: the counting process failed ({child.returncode})")
                continue
            scenarios = json.loads(stdout.strip().splitlines()[-1])
            counts[name] = _per_request(out, scenarios, settings.instruction_requests)
    return {"requests": settings.instruction_requests, "variants": counts}


def _start(valgrind: str, name: str, settings: Settings, out: Path) -> subprocess.Popen[str]:
    command = [
        valgrind, "--tool=callgrind", "--collect-atstart=no",
        "--toggle-collect=_operator_call", "--toggle-collect=methodcaller_call",
        "--dump-before=_operator_call", "--dump-after=_operator_call",
        f"--callgrind-out-file={out}/counts.%p", sys.executable, "-m", "benchmarks.instructions",
        name, str(settings.instruction_warmup), str(settings.instruction_requests),
    ]  # fmt: skip
    return subprocess.Popen(  # noqa: S603 - valgrind on our own module
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )


def _per_request(out: Path, scenarios: list[str], requests: int) -> dict[str, float]:
    """Each scenario's count per request, from the numbered dumps: two per batch, in order,
    the first (as it begins) holding what a thread counted before it, the second the batch.
    """
    dumps = sorted(out.glob("counts.*.*"), key=lambda path: int(path.suffix[1:]))
    if len(dumps) != 2 * len(scenarios):
        raise RuntimeError(f"{len(dumps)} callgrind dumps for {len(scenarios)} batches in {out}")
    return {
        scenario: _total(dump) / requests
        for scenario, dump in zip(scenarios, dumps[1::2], strict=True)
    }


def _total(dump: Path) -> int:
    for line in dump.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith("totals:"):
            return int(line.split()[1])
    raise RuntimeError(f"no totals in {dump}")


# -- in the counted process -------------------------------------------------------------


async def _open(name: str, stack: AsyncExitStack) -> tuple[Variant, tuple[str, ...]]:
    if not name.startswith(LOOKUP_PREFIX):
        variant = await open_variant(name)
        stack.push_async_callback(variant.close)
        await validate(variant)
        return variant, SCENARIOS
    kind = name.removeprefix(LOOKUP_PREFIX)
    handle = await make_store(kind, label=f"instructions_{kind}")
    stack.push_async_callback(handle.cleanup)
    cookie = await sign_in(apps.authsessions_app(handle.store))
    command = await floors.same_command(kind, stack, handle, digest_of(cookie.partition("=")[2]))
    variant = Variant(name, apps.lookup_middleware_app(command), apps.ignored_cookie())
    return variant, ("read",)


def _count_in_child(name: str, warmup: int, requests: int) -> None:
    loop = asyncio.new_event_loop()
    stack = AsyncExitStack()
    try:
        variant, scenarios = loop.run_until_complete(_open(name, stack))
        _count_writer_thread(variant)
        scopes = {scenario: variant.scope(scenario) for scenario in scenarios}
        for scope in scopes.values():
            loop.run_until_complete(drive(variant.app, scope, warmup))
        loop.run_until_complete(variant.settle())
        for scope in scopes.values():
            batch = _batch(variant, scope, requests)
            operator.call(loop.run_until_complete, batch)  # counted: see the module docstring
    finally:
        with contextlib.suppress(Exception):
            loop.run_until_complete(stack.aclose())
        loop.close()
    print(json.dumps(list(scopes)))


async def _batch(variant: Variant, scope: dict[str, Any], requests: int) -> None:
    """``requests`` requests, then the checkpoints they set off on a writer thread."""
    await drive(variant.app, scope, requests)
    await variant.settle()
    store = None if variant.handle is None else variant.handle.store
    if isinstance(store, SQLiteStore) and store._writer.finish_due():
        # The copy ended with pages written meanwhile: the finish its next write would run.
        await store._writer._finish_checkpoint_then(lambda db: None)


def _count_writer_thread(variant: Variant) -> None:
    """Run each job of a SQLite store's writer thread inside ``methodcaller``'s call,
    which callgrind counts in on that thread (see the module docstring)."""
    store = None if variant.handle is None else variant.handle.store
    if not isinstance(store, SQLiteStore):
        return
    pool = store._writer._pool
    assert pool is not None
    submit, counted = pool.submit, operator.methodcaller("__call__")

    def submit_counted(job: Any, /, *args: Any, **kwargs: Any) -> Any:
        return submit(counted, functools.partial(job, *args, **kwargs))

    pool.submit = submit_counted  # type: ignore[method-assign]


def table(results: dict[str, Any]) -> str:
    """Thousands of instructions per request (ratio to the bare app)."""
    variants = results["variants"]
    bare = variants[apps.BARE]
    header = ["variant"] + [SCENARIO_TITLES[s] for s in SCENARIOS]
    rows = []
    for name, counts in variants.items():
        row = [name]
        for scenario in SCENARIOS:
            count = counts.get(scenario)
            row.append(
                "-" if count is None else f"{count / 1000:.1f}k ({count / bare[scenario]:.2f}x)"
            )
        rows.append(row)
    return markdown_table(header, rows)


if __name__ == "__main__":
    _count_in_child(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
