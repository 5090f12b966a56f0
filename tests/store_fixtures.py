"""Store fixtures for every test (loaded by ``tests/conftest.py``): a new store is one fixture away.

The PostgreSQL and Redis stores need their servers (``tests/services.py``);
each test gets its own schema or key prefix, removed afterwards. The Redis
Cluster is three ``redis-server`` processes this run starts and stops itself.
"""

from __future__ import annotations

import functools
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from authsessions.stores import MemoryStore, PostgresStore, RedisStore, SQLiteStore, Store
from tests.services import POSTGRES_URL, REDIS_URL, REQUIRE_SERVICES, require_port

STORE_FIXTURES = [
    "memory_store",
    "sqlite_store",
    "postgres_store",
    "redis_store",
    "redis_cluster_store",
]


@pytest.fixture
async def memory_store() -> AsyncIterator[Store]:
    async with MemoryStore() as store:
        yield store


@pytest.fixture
async def sqlite_store(tmp_path: Path) -> AsyncIterator[Store]:
    async with SQLiteStore(tmp_path / "sessions.db") as store:
        yield store


# -- PostgreSQL ---------------------------------------------------------------------------


def address(url: str, default_port: int) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or default_port


@pytest.fixture
def postgres_url() -> str:
    """The test server's URL; skips (or fails under CI) when it is not reachable."""
    require_port("PostgreSQL", *address(POSTGRES_URL, 5432))
    return POSTGRES_URL


@pytest.fixture
async def postgres_schema(postgres_url: str) -> AsyncIterator[str]:
    """A schema name of this test's own; the schema is dropped afterwards."""
    schema = f"authsessions_test_{secrets.token_hex(6)}"
    yield schema
    connection = await asyncpg.connect(postgres_url)
    try:
        await connection.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await connection.close()


@pytest.fixture
async def postgres_store(postgres_url: str, postgres_schema: str) -> AsyncIterator[Store]:
    async with PostgresStore(postgres_url, schema=postgres_schema, max_size=4) as store:
        yield store


# -- Redis --------------------------------------------------------------------------------


@pytest.fixture
def redis_url() -> str:
    """The test server's URL; skips (or fails under CI) when it is not reachable."""
    require_port("Redis", *address(REDIS_URL, 6379))
    return REDIS_URL


async def delete_prefixed(client: Redis | RedisCluster, prefix: str) -> None:
    """Delete every key under ``prefix`` (on every node of a cluster), then close ``client``."""
    try:
        keys = [key async for key in client.scan_iter(match=prefix + "*", count=1000)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


@pytest.fixture
async def redis_prefix(redis_url: str) -> AsyncIterator[str]:
    """A key prefix of this test's own; its keys are deleted afterwards."""
    prefix = f"authsessions-test-{secrets.token_hex(6)}:"
    yield prefix
    await delete_prefixed(Redis.from_url(redis_url), prefix)


@pytest.fixture
async def redis_store(redis_url: str, redis_prefix: str) -> AsyncIterator[Store]:
    async with RedisStore(redis_url, prefix=redis_prefix) as store:
        yield store


def free_cluster_port(taken: frozenset[int] = frozenset()) -> int:
    """A port that is free, and whose cluster bus port (+10000) is free too, neither of
    them ``taken`` (nor the bus port of one taken)."""
    for _ in range(100):
        port = 20000 + secrets.randbelow(20000)
        if {port, port + 10000} & (taken | {other + 10000 for other in taken}):
            continue
        try:
            for candidate in (port, port + 10000):
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for a Redis Cluster node")


def wait_for(condition: str, check: Callable[[], bool], *, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {condition}")
        time.sleep(0.05)


def cluster_node_ready(cli: str, port: int) -> bool:
    info = subprocess.run(
        [cli, "-p", str(port), "cluster", "info"], capture_output=True, text=True, check=False
    )
    return "cluster_state:ok" in info.stdout


class LocalRedisCluster:
    """Three cluster-enabled ``redis-server`` processes (no replicas) on free ports.

    tests/conftest.py re-exports this module's fixtures, so pytest holds two
    copies of the session fixture below; they share one cluster, stopped when
    the last of them is torn down.
    """

    url: str | None = None
    nodes: list[subprocess.Popen[bytes]] = []  # noqa: RUF012 - one cluster per run
    users = 0

    @classmethod
    def start(cls, server: str, cli: str, directory: Path) -> str:
        if cls.url is None:
            ports: list[int] = []
            for _ in range(3):  # three draws may meet, as one did once in a run
                ports.append(free_cluster_port(frozenset(ports)))
            for port in ports:
                node_dir = directory / str(port)
                node_dir.mkdir()
                cls.nodes.append(
                    subprocess.Popen(
                        [server, "--port", str(port), "--bind", "127.0.0.1",
                         "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                         "--dir", str(node_dir), "--save", "", "--appendonly", "no"],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                )  # fmt: skip
            for port in ports:
                wait_for(f"redis-server on {port}", functools.partial(accepts, port))
            subprocess.run(
                [cli, "--cluster", "create", *(f"127.0.0.1:{port}" for port in ports),
                 "--cluster-replicas", "0", "--cluster-yes"],
                capture_output=True, check=True, timeout=60,
            )  # fmt: skip
            for port in ports:
                wait_for("the cluster to agree", functools.partial(cluster_node_ready, cli, port))
            cls.url = f"redis+cluster://127.0.0.1:{ports[0]}"
        cls.users += 1
        return cls.url

    @classmethod
    def release(cls) -> None:
        cls.users = max(0, cls.users - 1)
        if cls.users:
            return
        for node in cls.nodes:
            node.terminate()
        for node in cls.nodes:
            try:
                node.wait(timeout=5)
            except subprocess.TimeoutExpired:
                node.kill()
                node.wait()
        cls.nodes.clear()
        cls.url = None


@pytest.fixture(scope="session")
def redis_cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A three-node Redis Cluster of this test run's own, as a ``redis+cluster://`` URL."""
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if server is None or cli is None:
        reason = "redis-server and redis-cli are needed to start a Redis Cluster"
        if REQUIRE_SERVICES:
            pytest.fail(f"{reason}, and AUTHSESSIONS_REQUIRE_SERVICES is set")
        pytest.skip(reason)
    try:
        yield LocalRedisCluster.start(server, cli, tmp_path_factory.mktemp("redis-cluster"))
    finally:
        LocalRedisCluster.release()


def accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


@pytest.fixture
async def redis_cluster_store(redis_cluster_url: str) -> AsyncIterator[Store]:
    prefix = f"authsessions-test-{secrets.token_hex(6)}:"
    async with RedisStore(redis_cluster_url, prefix=prefix) as store:
        yield store
    plain_url = redis_cluster_url.replace("+cluster", "")
    await delete_prefixed(RedisCluster.from_url(plain_url), prefix)


@pytest.fixture(params=STORE_FIXTURES)
def store(request: pytest.FixtureRequest) -> Store:
    """Each store in turn, open and empty."""
    store: Store = request.getfixturevalue(request.param)
    return store
