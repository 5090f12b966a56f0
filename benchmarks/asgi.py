"""Driving an ASGI app directly: a hand-built scope, receive and send, no HTTP client."""

from __future__ import annotations

import resource
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.types import ASGIApp, Message

from benchmarks.common import USER_AGENT

_REQUEST: Message = {"type": "http.request", "body": b"", "more_body": False}


async def _receive() -> Message:
    return _REQUEST


async def _discard(message: Message) -> None:
    pass


def make_scope(path: str, cookie: str | None = None, *, method: str = "GET") -> dict[str, Any]:
    """A scope as uvicorn would build it for a browser's GET (copy it per request)."""
    headers = [
        (b"host", b"127.0.0.1:8000"),
        (b"user-agent", USER_AGENT.encode("latin-1")),
        (b"accept", b"text/html,application/xhtml+xml"),
        (b"accept-language", b"en-GB,en;q=0.9"),
    ]
    if cookie is not None:
        headers.append((b"cookie", cookie.encode("latin-1")))
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode("ascii"),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 51234),
        "server": ("127.0.0.1", 8000),
        "state": {},
    }


@dataclass
class Response:
    status: int = 0
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""

    def header(self, name: str) -> list[str]:
        key = name.lower().encode("latin-1")
        return [value.decode("latin-1") for header, value in self.headers if header == key]

    def cookie(self) -> str | None:
        """The first ``name=value`` this response sets (for sending it back)."""
        for value in self.header("set-cookie"):
            pair = value.split(";", 1)[0].strip()
            if pair.split("=", 1)[1] not in ("", "''", '""'):
                return pair
        return None


async def call(app: ASGIApp, scope: dict[str, Any]) -> Response:
    """One request, keeping the response (for setup and validation, not for timing)."""
    response = Response()

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            response.status = message["status"]
            response.headers = list(message.get("headers", []))
        elif message["type"] == "http.response.body":
            response.body += message.get("body", b"")

    await app(dict(scope), _receive, send)
    return response


async def drive(app: ASGIApp, scope: dict[str, Any], count: int) -> int:
    """Nanoseconds that ``count`` sequential requests take (a fresh scope copy each)."""
    return (await drive_timed(app, scope, count))[0]


async def drive_timed(app: ASGIApp, scope: dict[str, Any], count: int) -> tuple[int, int, int]:
    """Wall-clock, CPU and system-CPU nanoseconds (this process, all threads) of ``count``
    requests.

    On a shared machine the CPU time is the steadier measure of our own work;
    it leaves out time spent waiting, including a database server's work. The
    system time is the kernel's share of it: system calls, such as a SQLite
    commit's file locks and writes.
    """
    clock, cpu = time.perf_counter_ns, time.process_time_ns
    receive, send = _receive, _discard
    start, start_cpu, start_system = clock(), cpu(), _system_ns()
    for _ in range(count):
        await app(dict(scope), receive, send)
    return clock() - start, cpu() - start_cpu, _system_ns() - start_system


@dataclass
class Timing:
    """Nanoseconds, summed over requests: wall clock, CPU and system CPU (see
    :func:`drive_timed`)."""

    wall: int = 0
    cpu: int = 0
    system: int = 0

    def add(self, measured: tuple[int, int, int]) -> None:
        self.wall += measured[0]
        self.cpu += measured[1]
        self.system += measured[2]


async def drive_paired(
    app: ASGIApp,
    scope: dict[str, Any],
    reference: ASGIApp,
    reference_scope: dict[str, Any],
    count: int,
    chunk: int,
    *,
    lead_in: int = 0,
    settle: Callable[[], Awaitable[None]] | None = None,
) -> tuple[Timing, Timing]:
    """``count`` requests to ``app`` and as many to ``reference``, in runs of ``chunk``
    requests, in the order reference, app, app, reference, reference, app, …: the times
    of each side, summed.

    On a guest whose speed changes from one moment to the next (seen here: the bare route
    at 11 µs in one batch of 500 and 25 µs in another, minutes apart), both sides then run
    at the same speeds, and the ratio of their sums holds where a ratio of separate
    batches' times does not. Each side goes first in half the pairs of runs.

    ``lead_in`` requests, untimed, start every run of either side: a run then finds the
    CPU's caches as its own requests leave them, not as the other side's left them. In
    runs of 25 without them, one guest charged a SQLite write's footprint to the bare
    app's next run (the write came out at 6.34x, 6.66x in runs of 500), and another
    charged the bare run's to our read's first requests (1.75x, where five led-in
    requests gave 1.69x and runs of 500 1.64x).

    ``settle``, awaited after each of ``app``'s runs, waits for work those requests left
    on another thread, so that it does not slow ``reference``'s run: its CPU time counts
    as ``app``'s, its wall time as nobody's (it overlaps later requests when serving).
    """
    ours, theirs = Timing(), Timing()

    async def our_run(size: int) -> None:
        await drive(app, scope, lead_in)
        ours.add(await drive_timed(app, scope, size))
        if settle is not None:
            cpu, system = time.process_time_ns(), _system_ns()
            await settle()
            ours.cpu += time.process_time_ns() - cpu
            ours.system += _system_ns() - system

    async def their_run(size: int) -> None:
        await drive(reference, reference_scope, lead_in)
        theirs.add(await drive_timed(reference, reference_scope, size))

    for turn in range(-(-count // chunk)):
        size = min(chunk, count - turn * chunk)
        if turn % 2:
            await our_run(size)
            await their_run(size)
        else:
            await their_run(size)
            await our_run(size)
    return ours, theirs


def _system_ns() -> int:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_stime * 1e9)


async def time_each(app: ASGIApp, scope: dict[str, Any], count: int) -> list[float]:
    """Per-request durations in µs (for latency distributions)."""
    clock = time.perf_counter_ns
    receive, send = _receive, _discard
    samples = []
    for _ in range(count):
        start = clock()
        await app(dict(scope), receive, send)
        samples.append((clock() - start) / 1000)
    return samples
