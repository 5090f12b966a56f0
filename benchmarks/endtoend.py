"""End to end: uvicorn serves each variant on 127.0.0.1, ``wrk`` loads it.

Every variant runs in its own single-worker uvicorn process on a free port
(``--log-level warning``). A session is made through the server's own
``/setup`` route and ``wrk`` then sends authenticated reads with that fixed
cookie (the apps without sessions get a cookie of the same shape, which they
ignore), for a bounded time, only to 127.0.0.1. Rounds interleave the
variants in shuffled order; requests/s and latency are medians over rounds.

Beside requests/s, each round reads the server process's own CPU time (user and
system, from ``/proc``) and divides it by the requests served. The server is the
bottleneck, busy all the time, so this is requests/s turned into microseconds:
what each variant adds to a request served for real, next to what it adds in
process.
"""

from __future__ import annotations

import asyncio
import http.client
import os
import random
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import apps
from benchmarks.common import (
    ARTIFACTS,
    POSTGRES_SCHEMA,
    REDIS_PREFIX,
    REDIS_URL,
    ROOT,
    USER_AGENT,
    Settings,
    ensure_postgres_schema,
    fmt_us,
    markdown_table,
    median,
    port_open,
    postgres_store_options,
    redis_store_options,
    remove_sqlite_files,
)

_UNITS = {"us": 1.0, "ms": 1000.0, "s": 1_000_000.0}


@dataclass
class Server:
    variant: str
    port: int
    process: subprocess.Popen[bytes]
    cookie: str = ""
    sqlite_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/read"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        if self.sqlite_path is not None:
            remove_sqlite_files(self.sqlite_path)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _spec(variant: str) -> tuple[str, Path | None]:
    unique = secrets.token_hex(4)
    if variant == apps.STARSESSIONS_REDIS:
        return apps.app_spec(
            variant, url=REDIS_URL, options={"prefix": f"{REDIS_PREFIX}e2e_starsessions:"}
        ), None
    if not apps.is_ours(variant):
        return apps.app_spec(variant), None
    kind = variant.removeprefix(apps.OURS_PREFIX)
    if kind == "sqlite":
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"e2e_{unique}.db"
        return apps.app_spec(variant, url=f"sqlite:///{path}"), path
    if kind == "postgres":
        schema = f"{POSTGRES_SCHEMA}_e2e_{unique}"
        asyncio.run(ensure_postgres_schema(schema))  # dropped with the others at the end
        options, dsn = postgres_store_options(schema)
        return apps.app_spec(variant, url=dsn, options=options), None
    if kind == "redis":
        options = redis_store_options(f"{REDIS_PREFIX}e2e_{unique}:")
        return apps.app_spec(variant, url=REDIS_URL, options=options), None
    return apps.app_spec(variant), None


def start_server(variant: str) -> Server:
    spec, sqlite_path = _spec(variant)
    port = free_port()
    # The caller's PYTHONPATH is kept, so extras (uvloop, httptools) placed there are used.
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, apps.APP_SPEC_ENV: spec, "PYTHONPATH": path}
    command = [
        sys.executable, "-m", "uvicorn", "--factory", "benchmarks.apps:app_from_env",
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--log-level", "warning", "--no-access-log",
    ]  # fmt: skip
    process = subprocess.Popen(command, env=env, cwd=ROOT)  # noqa: S603 - our own command
    return Server(variant, port, process, sqlite_path=sqlite_path)


def _get(port: int, path: str, cookie: str | None = None) -> tuple[int, str, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        headers = {"User-Agent": USER_AGENT}
        if cookie:
            headers["Cookie"] = cookie
        connection.request("GET", path, headers=headers)
        response = connection.getresponse()
        return response.status, response.getheader("set-cookie") or "", response.read()
    finally:
        connection.close()


def prepare(server: Server, deadline: float) -> None:
    """Wait until the server answers, sign in, and check an authenticated read works."""
    while not port_open(f"http://127.0.0.1:{server.port}"):
        if server.process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"uvicorn for {server.variant} did not start")
        time.sleep(0.05)
    status, set_cookie, _ = _get(server.port, "/setup")
    if server.variant in (apps.BARE, apps.NOOP_MIDDLEWARE):
        server.cookie = apps.ignored_cookie()
    else:
        server.cookie = set_cookie.split(";", 1)[0]
        if status != 200 or not server.cookie:
            raise RuntimeError(f"{server.variant}: /setup gave {status} and no cookie")
    status, _, body = _get(server.port, "/read", server.cookie)
    if status != 200 or body != b"v":
        raise RuntimeError(f"{server.variant}: authenticated read gave {status} {body!r}")


def parse_wrk(output: str) -> dict[str, float]:
    def duration(label: str) -> float:
        match = re.search(rf"^\s*{label}\s+([\d.]+)(us|ms|s)\s*$", output, re.MULTILINE)
        return float(match.group(1)) * _UNITS[match.group(2)] if match else float("nan")

    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    errors = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    socket_errors = re.search(r"Socket errors:.*", output)
    return {
        "rps": float(rps.group(1)) if rps else float("nan"),
        "p50_us": duration("50%"),
        "p99_us": duration("99%"),
        "bad_responses": float(errors.group(1)) if errors else 0.0,
        "socket_errors": 1.0 if socket_errors else 0.0,
    }


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of process ``pid`` so far; NaN where ``/proc`` is missing."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            # Fields after the command (which may hold spaces), from the third one on.
            fields = stat.read().rpartition(")")[2].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_wrk(server: Server, seconds: float, connections: int) -> dict[str, float]:
    wrk = shutil.which("wrk")
    assert wrk is not None
    command = [
        wrk, "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency",
        "--timeout", "5s", "-H", f"User-Agent: {USER_AGENT}",
    ]  # fmt: skip
    if server.cookie:
        command += ["-H", f"Cookie: {server.cookie}"]
    command.append(server.url)
    cpu_before = cpu_seconds(server.process.pid)
    completed = subprocess.run(  # noqa: S603 - wrk, against 127.0.0.1 only
        command, capture_output=True, text=True, timeout=seconds + 30, check=True
    )
    result = parse_wrk(completed.stdout)
    served = re.search(r"(\d+) requests in", completed.stdout)
    cpu = cpu_seconds(server.process.pid) - cpu_before
    result["cpu_us"] = cpu / int(served.group(1)) * 1e6 if served else float("nan")
    return result


def run(settings: Settings, kinds: list[str]) -> dict[str, Any]:
    if shutil.which("wrk") is None:
        print("  note: skipping end to end: wrk is not installed (apt-get install -y wrk)")
        return {}
    variants = [apps.BARE, apps.STARLETTE_COOKIE, apps.STARSESSIONS_MEMORY]
    if port_open(REDIS_URL):
        variants.append(apps.STARSESSIONS_REDIS)
    variants += [apps.ours(kind) for kind in kinds]
    rounds: list[dict[str, dict[str, float]]] = []
    with ExitStack() as stack:
        servers = []
        for variant in variants:
            server = start_server(variant)
            stack.callback(server.stop)
            servers.append(server)
        deadline = time.monotonic() + 60
        for server in servers:
            prepare(server, deadline)
        if settings.e2e_warmup:
            for server in servers:
                run_wrk(server, settings.e2e_warmup, settings.e2e_connections)
        order = random.Random(8)  # noqa: S311 - only an ordering
        for _round in range(settings.e2e_rounds):
            order.shuffle(servers)
            rounds.append({})
            for server in servers:
                result = run_wrk(server, settings.e2e_seconds, settings.e2e_connections)
                if result["bad_responses"] or result["socket_errors"]:
                    print(f"  warning: {server.variant}: wrk saw errors: {result}")
                rounds[-1][server.variant] = result

    def over_rounds(variant: str, key: str) -> float:
        return median([results[variant][key] for results in rounds])

    return {
        "connections": settings.e2e_connections,
        "seconds": settings.e2e_seconds * settings.e2e_rounds,
        "rounds": settings.e2e_rounds,
        "server": _server_description(),
        "variants": {
            variant: {
                "rps": over_rounds(variant, "rps"),
                "p50_us": over_rounds(variant, "p50_us"),
                "p99_us": over_rounds(variant, "p99_us"),
                # Each round's ratio to the bare app in that round, so slow drift cancels.
                "ratio": median([r[variant]["rps"] / r[apps.BARE]["rps"] for r in rounds]),
                "cpu_us": over_rounds(variant, "cpu_us"),
                # The bare server's CPU per request over this one's: the share of bare
                # requests/s this server would reach were CPU all that limits it.
                "cpu_ratio": median(
                    [r[apps.BARE]["cpu_us"] / r[variant]["cpu_us"] for r in rounds]
                ),
            }
            for variant in variants
        },
    }


def _server_description() -> str:
    import importlib.util

    import uvicorn

    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    http_impl = "httptools" if importlib.util.find_spec("httptools") else "h11"
    return f"uvicorn {uvicorn.__version__} ({loop} loop, {http_impl} parser), 1 worker"


def table(results: dict[str, Any]) -> str:
    rows = [
        [
            variant,
            f"{cell['rps']:.0f}",
            f"{cell['ratio'] * 100:.0f}%",
            fmt_us(cell["p50_us"]),
            fmt_us(cell["p99_us"]),
            _cpu_cell(cell),
        ]
        for variant, cell in results["variants"].items()
    ]
    header = ["variant", "requests/s", "of bare", "p50", "p99", "server CPU per request"]
    return markdown_table(header, rows)


def _cpu_cell(cell: dict[str, float]) -> str:
    """``137 µs (87%)``: the server's CPU per request, and bare's as a share of it."""
    cpu_us = cell.get("cpu_us", float("nan"))
    if cpu_us != cpu_us:  # NaN: no /proc here
        return "-"
    return f"{fmt_us(cpu_us)} ({cell['cpu_ratio'] * 100:.0f}%)"
