"""What only SQLiteStore promises: WAL, its schema version, locking and failure behaviour.

The store contract itself is proven in test_conformance.py.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import gc
import itertools
import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, astuple, replace
from pathlib import Path
from typing import Any, cast

import pytest

from authsessions import StoreUnavailable
from authsessions._records import (
    CheckedRecord,
    CheckedUpdate,
    SessionRecord,
    SessionUpdate,
    dump_json,
)
from authsessions.stores import CreateError, DataTooLarge, SQLiteStore
from authsessions.stores import _checkpoints as checkpoints_module
from authsessions.stores import _sqlite_writer as writer_module
from authsessions.stores import sqlite as sqlite_module
from authsessions.stores._checkpoints import CHECKPOINT_EVERY, CHECKPOINT_PAGES
from authsessions.stores._record_cache import RecordCache
from authsessions.stores._sqlite_schema import (
    COLUMNS,
    COMPATIBLE_FROM,
    MIGRATIONS,
    SCHEMA_TABLE,
    SCHEMA_VERSION,
    TABLE,
    migrate,
)
from authsessions.stores._sqlite_support import (
    GuardedConnection,
    checkpoint,
    checkpoint_then,
    start_wal_over,
    transaction,
)
from authsessions.stores._wal_index import WalIndexHeader
from tests.stores import ON_LINUX_ONLY, linux_only
from tests.stores.records import (
    TTL,
    make_record,
    make_update,
    new_digest,
    rotate_away,
    start_time,
    typed,
)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "sessions.db"


@pytest.fixture
async def impatient_store(db_path: Path) -> AsyncIterator[SQLiteStore]:
    """An open store whose writes give up on a held lock after 0.2 s."""
    async with SQLiteStore(db_path, timeout=0.2) as store:
        yield store


def pragma(path: Path, name: str) -> Any:
    db = sqlite3.connect(path)
    try:
        return db.execute(f"PRAGMA {name}").fetchone()[0]
    finally:
        db.close()


@contextmanager
def loop_db_replaced(store: SQLiteStore, stand_in: object) -> Iterator[None]:
    """The store's event-loop connection replaced by ``stand_in`` for the block."""
    real, store._loop_db = store._loop_db, cast(sqlite3.Connection, stand_in)
    try:
        yield
    finally:
        store._loop_db = real


@contextmanager
def write_lock(path: Path) -> Iterator[sqlite3.Connection]:
    """Another connection (as another process would) holding the database's write lock."""
    db = sqlite3.connect(path, isolation_level=None, timeout=0)
    try:
        db.execute("BEGIN IMMEDIATE")
        yield db
        if db.in_transaction:
            db.execute("ROLLBACK")
    finally:
        db.close()


# -- file, WAL and schema ---------------------------------------------------------------


async def test_database_is_in_wal_mode(impatient_store: SQLiteStore, db_path: Path) -> None:
    assert pragma(db_path, "journal_mode") == "wal"


def recorded_schema(path: Path) -> list[tuple[int, int]]:
    """The store's schema table: its version and the oldest one marked able to use it."""
    db = sqlite3.connect(path)
    try:
        return db.execute(f"SELECT version, compatible_from FROM {SCHEMA_TABLE}").fetchall()  # noqa: S608
    finally:
        db.close()


async def test_schema_version_is_recorded(impatient_store: SQLiteStore, db_path: Path) -> None:
    assert SCHEMA_VERSION >= 1
    assert recorded_schema(db_path) == [(SCHEMA_VERSION, COMPATIBLE_FROM)]
    assert COMPATIBLE_FROM <= SCHEMA_VERSION
    assert pragma(db_path, "user_version") == 0  # the file's, not the store's


def an_apps_database(path: Path, user_version: int) -> None:
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE app_users (id INTEGER PRIMARY KEY, name TEXT)")
    db.execute(f"PRAGMA user_version = {user_version}")
    db.commit()
    db.close()


@pytest.mark.parametrize("user_version", [0, 1, SCHEMA_VERSION, SCHEMA_VERSION + 5])
async def test_an_apps_own_database_keeps_its_user_version_and_holds_sessions_too(
    db_path: Path, user_version: int
) -> None:
    """``PRAGMA user_version`` is the whole file's, and an app may count its migrations in
    it: the store took it for its own, so it overwrote 0, took the version it has now
    for a table never created (every login a 503), and a higher one for a newer
    release's ("upgrade authsessions")."""
    an_apps_database(db_path, user_version)
    t0 = start_time()
    record = make_record(now=t0)

    async with SQLiteStore(db_path) as store:
        await store.create(record, max_sessions=10, now=t0)
    async with SQLiteStore(db_path) as store:
        assert await store.get(record.token_digest, now=t0) == record

    assert pragma(db_path, "user_version") == user_version
    assert recorded_schema(db_path) == [(SCHEMA_VERSION, COMPATIBLE_FROM)]


async def test_a_relative_path_keeps_naming_the_file_it_named_when_the_store_was_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default, ``sessions.db``, is relative: a later connection (stats, a reopened
    one) opened it again in whatever directory the process had moved to."""
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    monkeypatch.chdir(first)
    t0 = start_time()
    async with SQLiteStore("sessions.db") as store:
        await store.create(make_record(now=t0), max_sessions=10, now=t0)
        monkeypatch.chdir(second)

        assert (await store.stats(now=t0)).live_sessions == 1
        assert repr(store) == "SQLiteStore('sessions.db')"

    assert os.listdir(second) == []


async def test_writes_that_meet_a_held_lock_each_fail_within_the_timeout(db_path: Path) -> None:
    """They queue on the one writer thread: each waited its whole timeout only once those
    ahead of it had waited theirs, the eighth after four seconds with timeout=0.5, and a
    close at shutdown waited for all of them."""
    t0 = start_time()
    records = [make_record(now=t0, user_id=f"user-{i}") for i in range(8)]
    store = SQLiteStore(db_path, timeout=0.5)
    await store.open()
    for record in records:
        await store.create(record, max_sessions=10, now=t0)

    with write_lock(db_path):
        started = time.monotonic()
        results = await asyncio.gather(
            *(
                store.update(record.id, make_update(now=t0 + 1, set_keys={"k": 1}), now=t0 + 1)
                for record in records
            ),
            return_exceptions=True,
        )
        waited = time.monotonic() - started
    await store.close()

    assert all(isinstance(result, StoreUnavailable) for result in results), results
    assert waited < 2.0  # one timeout and some slack, where eight in turn took 4 s


@linux_only
async def test_a_write_queued_behind_a_checkpoints_finish_fails_within_the_timeout(
    db_path: Path,
) -> None:
    """It waited for the finish (whose own write waited for the lock), then its whole
    timeout again on the writer thread: about twice the timeout, 10 s by default."""
    async with SQLiteStore(db_path, timeout=0.5) as store:
        t0, record = await one_session(store)
        await copy_held_back_by_a_reader(store, record.id)
        assert store._writer.finish_due()

        async def write_after(delay: float) -> float:
            await asyncio.sleep(delay)
            asked = time.monotonic()
            with pytest.raises(StoreUnavailable):
                await store.update(record.id, data_write(1), now=t0)
            return time.monotonic() - asked

        with write_lock(db_path):
            finishing, queued = await asyncio.gather(write_after(0), write_after(0.05))

    assert finishing < 0.5 + 0.25
    assert queued < 0.5 + 0.25  # where it took 0.95 s


def run_in_a_process_of_its_own(script: str, db_path: Path) -> subprocess.CompletedProcess[str]:
    """``script`` run by a Python of its own (forks, at-fork hooks), given ``db_path``."""
    return subprocess.run(
        [sys.executable, "-c", script, str(db_path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).parents[2],
        check=False,
    )


_FORKED_AFTER_USE = """
import asyncio, os, sys
from authsessions import SessionManager
from authsessions.stores import SQLiteStore
from tests.stores.records import make_record, start_time

store = SQLiteStore(sys.argv[1], timeout=1)
# A job at import in the server's master process (gunicorn --preload), leaving it open.
asyncio.run(SessionManager(store).cleanup_expired())
pid = os.fork()
if pid == 0:
    async def worker() -> None:
        t0 = start_time()
        await asyncio.wait_for(SessionManager(store).cleanup_expired(), 10)  # the thread
        for i in range(300):  # past a checkpoint, which the thread runs too
            record = make_record(now=t0, user_id="child", data={"pad": "x" * 2000})
            await asyncio.wait_for(store.create(record, max_sessions=1, now=t0), 10)
        await store.close()
    try:
        asyncio.run(worker())
    except BaseException as exc:
        print("child:", repr(exc), flush=True)
        os._exit(1)
    os._exit(0)
_, status = os.waitpid(pid, 0)
async def read_in_the_parent() -> int:
    sessions = await SessionManager(store).list_for_user("child")
    await store.close()
    return len(sessions)
assert asyncio.run(read_in_the_parent()) == 1
sys.exit(os.waitstatus_to_exitcode(status))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork() here")
def test_a_store_opened_before_a_fork_opens_afresh_in_the_child(db_path: Path) -> None:
    """SQLite forbids using a connection across a fork, and the writer thread does not
    exist in the child: work handed to it (a cleanup, a checkpoint) never ended there."""
    done = run_in_a_process_of_its_own(_FORKED_AFTER_USE, db_path)

    assert done.returncode == 0, done.stdout + done.stderr
    assert "forked" not in done.stderr  # its connections closed for the fork, as they should


_PARENT_CLOSES_WHILE_THE_CHILD_RUNS = """
import asyncio, os, sys
from authsessions.stores import SQLiteStore
from tests.stores.records import make_record, make_update, start_time

store = SQLiteStore(sys.argv[1], timeout=1)
now = start_time()
kept = make_record(now=now, user_id="parent")
asyncio.run(store.open())
asyncio.run(store.create(kept, max_sessions=5, now=now))
ready_read, ready_write = os.pipe()
go_read, go_write = os.pipe()
pid = os.fork()
if pid == 0:
    async def child() -> bool:
        await store.open()
        record = make_record(now=now, user_id="child")
        await store.create(record, max_sessions=5, now=now)
        assert await store.get(record.token_digest, now=now) is not None
        os.write(ready_write, record.id.encode() + b"\\n")
        os.read(go_read, 1)  # meanwhile the parent closed its store; another process revoked
        revoked = await store.get(record.token_digest, now=now + 1) is None
        later = make_record(now=now, user_id="child-later")
        await store.create(later, max_sessions=5, now=now)  # must reach the file
        await store.close()
        return revoked
    try:
        os._exit(0 if asyncio.run(child()) else 3)
    except BaseException as exc:
        print("child:", repr(exc), flush=True)
        os._exit(1)
session_id = os.read(ready_read, 100).decode().strip()
# The parent goes on with its store after the fork, then closes it (or lets it go).
assert asyncio.run(store.get(kept.token_digest, now=now)) is not None
update = make_update(now=now + 1, set_keys={"after": "fork"})
assert asyncio.run(store.update(kept.id, update, now=now + 1))
asyncio.run(store.close())
async def revoke_elsewhere() -> None:
    async with SQLiteStore(sys.argv[1]) as admin:
        assert await admin.delete(session_id, now=now)
asyncio.run(revoke_elsewhere())
os.write(go_write, b"x")
_, status = os.waitpid(pid, 0)
async def read_back() -> list[str]:
    async with SQLiteStore(sys.argv[1]) as reader:
        found = await reader.get(kept.token_digest, now=now + 1)
        assert found is not None and found.data.get("after") == "fork", found
        return [s.user_id for user in ("child", "child-later")
                for s in await reader.list_for_user(user, now=now + 1)]
assert asyncio.run(read_back()) == ["child-later"]
sys.exit(os.waitstatus_to_exitcode(status))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork() here")
def test_a_child_is_sound_after_the_parent_closes_the_store_it_forked_with(
    db_path: Path,
) -> None:
    """SQLite keeps a file's locks in a table of the process, which a child inherits with
    the parent's locks marked as held: the child's own connections took no lock, so the
    parent's close removed the WAL under it, and it served a session revoked since."""
    done = run_in_a_process_of_its_own(_PARENT_CLOSES_WHILE_THE_CHILD_RUNS, db_path)

    assert done.returncode == 0, done.stdout + done.stderr


_FORKED_FROM_ANOTHER_THREAD = """
import asyncio, os, sys, threading
from authsessions.stores import SQLiteStore
from tests.stores.records import make_record, read_and_write_until, start_time

store = SQLiteStore(sys.argv[1], timeout=2)
forked = threading.Event()

def fork_again_and_again() -> None:  # as multiprocessing.Pool's handler thread does
    for _ in range(30):
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
    forked.set()

async def serve() -> int:
    await store.open()
    now = start_time()
    records = [make_record(now=now, user_id=f"user-{i}") for i in range(10)]
    for record in records:
        await store.create(record, max_sessions=5, now=now)
    forking = threading.Thread(target=fork_again_and_again)
    forking.start()
    served = await read_and_write_until(forked, store, records, now)
    forking.join()
    await store.close()
    return served

print("served", asyncio.run(serve()), flush=True)
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork() here")
def test_a_fork_from_another_thread_leaves_the_event_loops_connections_alone(
    db_path: Path,
) -> None:
    """Closed under the event loop's feet (a statement under way on another thread), its
    connection crashed the process: another thread's fork leaves them open, and says so."""
    done = run_in_a_process_of_its_own(_FORKED_FROM_ANOTHER_THREAD, db_path)

    assert done.returncode == 0, done.stdout + done.stderr
    assert "served" in done.stdout
    assert "kept its connections open as the process forked" in done.stderr


_USED_FROM_ANOTHER_THREAD = """
import asyncio, os, sys, threading, time
from authsessions.stores import SQLiteStore
from tests.stores.records import make_record, read_and_write_until, start_time

store = SQLiteStore(sys.argv[1], timeout=2)
now = start_time()
records = [make_record(now=now, user_id=f"user-{i}") for i in range(10)]

async def sign_in() -> None:
    await store.open()
    for record in records:
        await store.create(record, max_sessions=5, now=now)

asyncio.run(sign_in())  # opened on this thread, then served from another (a server's)
stop = threading.Event()

def serve() -> None:
    asyncio.run(read_and_write_until(stop, store, records, now))

serving = threading.Thread(target=serve)
serving.start()
time.sleep(0.2)
for _ in range(30):
    pid = os.fork()
    if pid == 0:
        async def open_in_the_child() -> None:
            await SQLiteStore(sys.argv[1]).open()
        try:
            asyncio.run(open_in_the_child())
        except RuntimeError as exc:
            os._exit(0 if "cannot open in this process" in str(exc) else 4)
        os._exit(5)  # it opened, on a lock table whose locks it does not hold
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, status
stop.set()
serving.join()
print("served", flush=True)
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork() here")
def test_a_fork_from_the_thread_that_opened_the_store_leaves_another_threads_loop_alone(
    db_path: Path,
) -> None:
    """The store opened on one thread and served from another's event loop: a fork from
    the first closed the connection under the second's statement (a crash). The child
    then refuses the file, whose lock table it inherited, instead of hanging on it."""
    done = run_in_a_process_of_its_own(_USED_FROM_ANOTHER_THREAD, db_path)

    assert done.returncode == 0, done.stdout + done.stderr
    assert "served" in done.stdout


_FORKED_WHILE_ANOTHER_PROCESS_WRITES = """
import asyncio, os, subprocess, sys, time
from authsessions.stores import SQLiteStore
from tests.stores.records import make_record, start_time

HOLD_THE_WRITE_LOCK = (
    "import sqlite3, sys, time\\n"
    "db = sqlite3.connect(sys.argv[1], isolation_level=None)\\n"
    "db.execute('BEGIN IMMEDIATE'); print('locked', flush=True)\\n"
    "time.sleep(2); db.execute('COMMIT')\\n"
)
store = SQLiteStore(sys.argv[1], timeout=5)
asyncio.run(store.open())
holder = subprocess.Popen(
    [sys.executable, "-c", HOLD_THE_WRITE_LOCK, sys.argv[1]], stdout=subprocess.PIPE, text=True
)
assert holder.stdout.readline().strip() == "locked"
started = time.monotonic()
pid = os.fork()
if pid == 0:
    os._exit(0)
took = time.monotonic() - started
os.waitpid(pid, 0)
holder.wait()
assert store.is_open

async def still_serving() -> None:
    now = start_time()
    record = make_record(now=now)
    await store.create(record, max_sessions=5, now=now)
    assert await store.get(record.token_digest, now=now) is not None
    await store.close()

asyncio.run(still_serving())
print(f"fork took {took:.3f} s", flush=True)
sys.exit(0 if took < 1 else 3)
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork() here")
def test_a_fork_while_another_process_holds_the_write_lock_neither_waits_nor_closes(
    db_path: Path,
) -> None:
    """The parent's connections, opened again after the fork, migrated the schema again:
    the fork waited out the store's timeout, then left the store closed."""
    done = run_in_a_process_of_its_own(_FORKED_WHILE_ANOTHER_PROCESS_WRITES, db_path)

    assert done.returncode == 0, done.stdout + done.stderr


async def test_reopening_an_existing_database_is_idempotent(db_path: Path) -> None:
    t0 = start_time()
    record = make_record(now=t0, data={"a": 1})
    async with SQLiteStore(db_path) as first:
        await first.create(record, max_sessions=10, now=t0)

    for _ in range(2):
        async with SQLiteStore(db_path) as again:
            assert await again.get(record.token_digest, now=t0) == record

    assert recorded_schema(db_path) == [(SCHEMA_VERSION, COMPATIBLE_FROM)]


async def test_first_opens_of_a_new_file_by_two_stores_both_succeed(db_path: Path) -> None:
    first, second = SQLiteStore(db_path), SQLiteStore(db_path)
    try:
        await asyncio.gather(first.open(), second.open())

        assert first.is_open
        assert second.is_open
        assert recorded_schema(db_path) == [(SCHEMA_VERSION, COMPATIBLE_FROM)]
    finally:
        await first.close()
        await second.close()


def test_two_connections_migrating_a_new_file_at_once_take_turns(db_path: Path) -> None:
    """Two processes opening a new file together: the one that read version 0 second must
    not create the table again ("table authsessions_session already exists"), so a
    migration holds the write lock from its read of the version to its commit.
    """
    first = sqlite3.connect(db_path, isolation_level=None)
    second = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
    errors: list[BaseException] = []

    def migrate_second() -> None:
        try:
            migrate(second)
        except BaseException as exc:  # the thread's failure, for the test to see
            errors.append(exc)

    other_process = threading.Thread(target=migrate_second)

    class MigratedOverAfterReadingTheVersion(WrappedConnection):
        def execute(self, sql: str, params: Any = ()) -> Any:
            cursor = self.db.execute(sql, params)
            if sql.startswith("PRAGMA table_info") and other_process.ident is None:
                other_process.start()
                other_process.join(0.5)  # long enough to migrate, unless it waits for us
            return cursor

    try:
        first.execute("PRAGMA journal_mode = WAL")

        migrate(cast(sqlite3.Connection, MigratedOverAfterReadingTheVersion(first)))
        other_process.join(10)

        assert other_process.ident is not None
        assert not other_process.is_alive()
        assert errors == []
    finally:
        first.close()
        second.close()
    assert recorded_schema(db_path) == [(SCHEMA_VERSION, COMPATIBLE_FROM)]


def a_file_of_the_first_builds(path: Path, version: int, record: SessionRecord) -> None:
    """A file as the first builds left it at schema ``version``: they kept the version in
    ``PRAGMA user_version``, and from version 2 marked it usable in a one-column table."""
    db = sqlite3.connect(path, isolation_level=None)
    try:
        for statements in MIGRATIONS[:version]:
            for statement in statements:
                db.execute(statement)
        if version >= 2:
            db.execute(f"CREATE TABLE {SCHEMA_TABLE} (compatible_from INTEGER NOT NULL)")
            db.execute(f"INSERT INTO {SCHEMA_TABLE} VALUES (1)")  # noqa: S608 - constants
        db.execute(
            f"INSERT INTO {TABLE} ({COLUMNS}) VALUES ({', '.join('?' * 12)})",  # noqa: S608 - constants
            (*astuple(record)[:8], json.dumps(record.data), *astuple(record)[9:]),
        )
        db.execute(f"PRAGMA user_version = {version}")
    finally:
        db.close()


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("apps_user_version", [None, 0, 1, 3])
async def test_a_file_of_the_first_builds_is_upgraded_keeping_its_sessions(
    db_path: Path, version: int, apps_user_version: int | None, caplog: pytest.LogCaptureFixture
) -> None:
    """Read from what the file holds, not from ``PRAGMA user_version``, which an app
    sharing the file may have set since (``None``: left as the store set it): at 0 the
    table was created again, at 1 an index dropped that was gone, at 3 the file taken for
    a newer release's."""
    t0 = start_time()
    record = make_record(now=t0, data={"a": 1})
    a_file_of_the_first_builds(db_path, version, record)
    if apps_user_version is not None:
        an_apps_database(db_path, apps_user_version)
    user_version = pragma(db_path, "user_version")

    with caplog.at_level("INFO", logger="authsessions"):
        async with SQLiteStore(db_path) as store:
            assert await store.get(record.token_digest, now=t0) == record
            assert [r.id for r in await store.list_for_user("alice", now=t0)] == [record.id]
            await rotate_away(store, record, now=t0 + 1, until=t0 + 61)
            assert await store.rotated_away_to(record.token_digest, now=t0 + 2)

    # Never "newer than this release knows": the upgrade, and only it.
    assert caplog.messages == [
        f"The session database was upgraded from schema version {version} to {SCHEMA_VERSION}"
    ]
    assert recorded_schema(db_path) == [(SCHEMA_VERSION, COMPATIBLE_FROM)]
    assert pragma(db_path, "user_version") == user_version
    db = sqlite3.connect(db_path)
    indexes = {
        name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")
    }
    db.close()
    assert f"{TABLE}_user" in indexes
    assert f"{TABLE}_user_id" not in indexes


@pytest.mark.parametrize(
    ("made", "kind"),
    [
        (f"CREATE TABLE {TABLE} (id INTEGER PRIMARY KEY, payload TEXT)", "table"),
        (f"CREATE TABLE {TABLE.title()} (id INTEGER PRIMARY KEY, payload TEXT)", "table"),
        (f"CREATE VIEW {TABLE} AS SELECT 1 AS id, 'x' AS payload", "view"),
    ],
    ids=["table", "other-case", "view"],
)
async def test_an_apps_table_of_the_session_tables_name_is_named_not_reported_unavailable(
    db_path: Path, made: str, kind: str
) -> None:
    """Another library's table of that name (SQLite's names ignore case), or a view, in
    the app's database: taken for a file of the first builds, it was upgraded, or created
    again (a 503 on every request)."""
    db = sqlite3.connect(db_path)
    db.execute(made)
    db.commit()
    db.close()
    store = SQLiteStore(db_path)

    with pytest.raises(RuntimeError) as refused:
        await store.open()

    assert str(refused.value) == (
        f"The database holds a {kind} {TABLE} that is not this library's session table: "
        "give the sessions a file of their own."
    )
    assert not store.is_open
    db = sqlite3.connect(db_path)
    columns = [row[1] for row in db.execute(f"PRAGMA table_info({TABLE})")]
    db.close()
    assert columns == ["id", "payload"]  # the app's as it was


def as_if_a_newer_release_migrated(path: Path, compatible_from: int) -> None:
    """The file as a release one schema ahead leaves it."""
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute(
            f"UPDATE {SCHEMA_TABLE} SET version = ?, compatible_from = ?",  # noqa: S608
            (SCHEMA_VERSION + 1, compatible_from),
        )
    finally:
        db.close()


async def test_database_with_a_newer_schema_is_refused(db_path: Path) -> None:
    """A newer release may have changed the table; writing to it could corrupt sessions."""
    async with SQLiteStore(db_path):
        pass
    as_if_a_newer_release_migrated(db_path, SCHEMA_VERSION + 1)
    store = SQLiteStore(db_path)

    with pytest.raises(RuntimeError) as refused:
        await store.open()

    assert str(refused.value) == (
        f"The session database has schema version {SCHEMA_VERSION + 1} and usable from "
        f"version {SCHEMA_VERSION + 1}, newer than this authsessions release knows "
        f"({SCHEMA_VERSION}); upgrade authsessions."
    )
    assert not store.is_open
    assert recorded_schema(db_path) == [(SCHEMA_VERSION + 1, SCHEMA_VERSION + 1)]


async def test_a_newer_schema_marked_usable_by_this_release_is_used_as_it_is(
    db_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A rolling deploy: a server of this release restarts after a newer one migrated."""
    t0 = start_time()
    record = make_record(now=t0)
    async with SQLiteStore(db_path) as store:
        await store.create(record, max_sessions=10, now=t0)
    as_if_a_newer_release_migrated(db_path, SCHEMA_VERSION)

    with caplog.at_level("INFO", logger="authsessions"):
        async with SQLiteStore(db_path) as store:
            assert await store.get(record.token_digest, now=t0) == record
            assert await store.update(record.id, make_update(now=t0 + 1), now=t0 + 1)

    assert recorded_schema(db_path) == [(SCHEMA_VERSION + 1, SCHEMA_VERSION)]
    assert f"newer than this release knows ({SCHEMA_VERSION}) but marked usable" in caplog.text


def a_file_of_the_previous_release(path: Path, record: SessionRecord) -> None:
    """A file as the release before the rotated-away columns left it: schema version 2,
    recorded as this release records it, holding ``record``."""
    db = sqlite3.connect(path, isolation_level=None)
    try:
        for statements in MIGRATIONS[:2]:
            for statement in statements:
                db.execute(statement)
        db.execute(
            f"CREATE TABLE {SCHEMA_TABLE} "
            "(version INTEGER NOT NULL, compatible_from INTEGER NOT NULL)"
        )
        db.execute(f"INSERT INTO {SCHEMA_TABLE} VALUES (2, 1)")  # noqa: S608 - constants
        db.execute(
            f"INSERT INTO {TABLE} ({COLUMNS}) VALUES ({', '.join('?' * 12)})",  # noqa: S608 - constants
            (*astuple(record)[:8], json.dumps(record.data), *astuple(record)[9:]),
        )
    finally:
        db.close()


async def test_a_file_of_the_previous_release_is_upgraded_keeping_its_sessions(
    db_path: Path,
) -> None:
    """Its sessions load and rotate as before, and now remember the digest rotated away."""
    t0 = start_time()
    record = make_record(now=t0, data={"a": 1})
    a_file_of_the_previous_release(db_path, record)

    async with SQLiteStore(db_path) as store:
        assert await store.get(record.token_digest, now=t0) == record
        rotated = await rotate_away(store, record, now=t0 + 1, until=t0 + 61)
        assert await store.rotated_away_to(record.token_digest, now=t0 + 2)
        got = await store.get(rotated, now=t0 + 2)
        assert got == replace(
            record, token_digest=rotated, last_active_at=t0 + 1, expires_at=t0 + 1 + TTL
        )

    assert recorded_schema(db_path) == [(SCHEMA_VERSION, COMPATIBLE_FROM)]
    db = sqlite3.connect(db_path)
    indexes = {
        name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")
    }
    db.close()
    assert f"{TABLE}_rotated_away_from" in indexes


async def test_the_previous_release_runs_on_the_upgraded_file(db_path: Path) -> None:
    """A rolling deploy: servers of the release before go on using the file this one
    upgraded. They name the columns they insert and read, so the new ones are NULL in
    their rows, and their rotations leave an earlier mark to run out its time.
    """
    t0 = start_time()
    record = make_record(now=t0)
    async with SQLiteStore(db_path) as store:
        await store.create(record, max_sessions=10, now=t0)
        marked = await rotate_away(store, record, now=t0 + 1, until=t0 + 61)
    assert COMPATIBLE_FROM <= 2
    older = make_record(now=t0)
    db = sqlite3.connect(db_path, isolation_level=None)
    try:
        # What the previous release's create and rotating update run, as they ran them.
        db.execute(
            f"INSERT INTO {TABLE} ({COLUMNS}) VALUES ({', '.join('?' * 12)})",  # noqa: S608 - constants
            (*astuple(older)[:8], json.dumps(older.data), *astuple(older)[9:]),
        )
        later = new_digest()
        db.execute(f"UPDATE {TABLE} SET token_digest = ? WHERE id = ?", (later, record.id))  # noqa: S608
    finally:
        db.close()

    async with SQLiteStore(db_path) as store:
        assert await store.get(older.token_digest, now=t0 + 2) == older
        assert not await store.rotated_away_to(older.token_digest, now=t0 + 2)
        assert await store.get(later, now=t0 + 2) is not None
        assert await store.rotated_away_to(record.token_digest, now=t0 + 2)
        assert not await store.rotated_away_to(marked, now=t0 + 2)
        assert not await store.rotated_away_to(record.token_digest, now=t0 + 61)


@pytest.mark.parametrize("path", [":memory:", "file::memory:", "file::memory:?cache=shared"])
def test_in_memory_database_is_refused(path: str) -> None:
    with pytest.raises(ValueError, match="MemoryStore"):
        SQLiteStore(path)


def test_empty_path_is_refused() -> None:
    """SQLite opens ``""`` as a private temporary database per connection.

    The reader and the writer would each get their own, so every read would
    fail (no table) or miss what was written: like ``:memory:``, refuse it.
    """
    with pytest.raises(ValueError, match="MemoryStore"):
        SQLiteStore("")


@pytest.mark.parametrize("timeout", [0, -1.0, float("nan"), float("inf"), 3e6])
def test_a_timeout_sqlite_cannot_wait_is_refused(db_path: Path, timeout: float) -> None:
    """SQLite waits a number of milliseconds held in a C int: 3e6 s overflowed to no wait
    at all, and inf or nan failed every write with an OverflowError or ValueError."""
    with pytest.raises(ValueError, match="timeout must be a number of seconds above 0"):
        SQLiteStore(db_path, timeout=timeout)


async def test_the_longest_timeout_is_taken_and_waits(db_path: Path) -> None:
    now = start_time()
    record = make_record(now=now)
    async with SQLiteStore(db_path, timeout=sqlite_module.MAX_TIMEOUT) as store:
        await store.create(record, max_sessions=1, now=now)
        holder = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
        holder.execute("BEGIN IMMEDIATE")
        released = threading.Timer(0.3, holder.execute, ("ROLLBACK",))
        released.start()
        try:
            update = make_update(now=now + 1, set_keys={"k": 1})
            assert await store.update(record.id, update, now=now + 1)
        finally:
            released.join()
            holder.close()


def test_default_path_and_repr() -> None:
    store = SQLiteStore()

    assert store.path == "sessions.db"
    assert repr(store) == "SQLiteStore('sessions.db')"
    assert not store.is_open


async def test_unopened_store_says_to_open_it(db_path: Path) -> None:
    store = SQLiteStore(db_path)
    t0 = start_time()

    with pytest.raises(RuntimeError, match="open it first"):
        await store.get(new_digest(), now=t0)
    with pytest.raises(RuntimeError, match="open it first"):
        await store.create(make_record(now=t0), max_sessions=10, now=t0)


async def test_sub_second_timestamps_are_kept_exactly(impatient_store: SQLiteStore) -> None:
    t0 = start_time() + 0.123456789
    record = make_record(now=t0, last_active_at=t0 + 0.000001)

    await impatient_store.create(record, max_sessions=10, now=t0)

    assert await impatient_store.get(record.token_digest, now=t0) == record


# -- several connections ----------------------------------------------------------------


async def test_two_stores_on_one_file_see_each_others_writes(db_path: Path) -> None:
    t0 = start_time()
    record = make_record(now=t0, data={"a": 1})
    async with SQLiteStore(db_path) as one, SQLiteStore(db_path) as two:
        await one.create(record, max_sessions=10, now=t0)
        assert await two.get(record.token_digest, now=t0) == record

        rotated = new_digest()
        update = make_update(now=t0 + 1, token_digest=rotated, set_keys={"b": 2})
        assert await two.update(record.id, update, now=t0 + 1)
        assert await one.get(record.token_digest, now=t0 + 1) is None
        got = await one.get(rotated, now=t0 + 1)
        assert got is not None
        assert got.data == {"a": 1, "b": 2}

        assert await one.delete(record.id, now=t0 + 1)
        assert await two.get(rotated, now=t0 + 1) is None
        assert await two.list_for_user(record.user_id, now=t0 + 1) == []


async def test_two_stores_on_one_file_share_the_session_limit(db_path: Path) -> None:
    """Two app processes logging one user in at once must still respect the limit."""
    t0 = start_time()
    records = [make_record(now=t0 + i) for i in range(20)]
    async with SQLiteStore(db_path) as one, SQLiteStore(db_path) as two:
        await asyncio.gather(
            *(
                (one if i % 2 else two).create(record, max_sessions=3, now=record.created_at)
                for i, record in enumerate(records)
            )
        )

        listed = await one.list_for_user("alice", now=t0 + 20)
    assert [record.id for record in listed] == [record.id for record in records[:-4:-1]]


async def test_concurrent_updates_from_two_stores_keep_every_key(db_path: Path) -> None:
    t0 = start_time()
    record = make_record(now=t0)
    async with SQLiteStore(db_path) as one, SQLiteStore(db_path) as two:
        await one.create(record, max_sessions=10, now=t0)

        await asyncio.gather(
            *(
                (one if i % 2 else two).update(
                    record.id, make_update(now=t0 + 1, set_keys={f"k{i}": i}), now=t0 + 1
                )
                for i in range(20)
            )
        )

        got = await two.get(record.token_digest, now=t0 + 1)
    assert got is not None
    assert got.data == {f"k{i}": i for i in range(20)}


# -- locking ----------------------------------------------------------------------------


DIRTY_UPDATE = f"UPDATE {TABLE} SET data = '{{\"dirty\":true}}' WHERE id = ?"  # noqa: S608
SELECT_DATA = f"SELECT data FROM {TABLE} WHERE id = ?"  # noqa: S608
REVOKE = f"DELETE FROM {TABLE} WHERE id = ?"  # noqa: S608
DIRTY_INSERT = (
    f"INSERT INTO {TABLE} (id, token_digest, user_id, device_name, device_type,"  # noqa: S608
    " fingerprint, data, created_at, last_active_at, expires_at)"
    " VALUES (?, ?, 'alice', 'x', 'other', 'f', '{}', ?, ?, ?)"
)


async def test_reads_answer_while_another_connection_holds_the_write_lock(
    impatient_store: SQLiteStore, db_path: Path
) -> None:
    t0, record = await one_session(impatient_store)
    uncommitted = make_record(now=t0)

    with write_lock(db_path) as other:
        other.execute(DIRTY_UPDATE, (record.id,))
        other.execute(
            DIRTY_INSERT,
            (uncommitted.id, uncommitted.token_digest, t0, t0, uncommitted.expires_at),
        )

        # Committed state only: no dirty read, and no waiting.
        assert await impatient_store.get(record.token_digest, now=t0) == record
        assert await impatient_store.get(uncommitted.token_digest, now=t0) is None
        assert await impatient_store.list_for_user("alice", now=t0) == [record]


def test_a_commit_that_fails_leaves_no_transaction_open(tmp_path: Path) -> None:
    """SQLite keeps the transaction open when its COMMIT fails (a deferred foreign key
    here, a lock elsewhere): left so, it would hold the write lock, and the next
    ``BEGIN IMMEDIATE`` on the connection would fail.
    """
    db = sqlite3.connect(tmp_path / "commit.db", isolation_level=None)
    db.execute("PRAGMA foreign_keys = ON")
    db.execute("CREATE TABLE parent (id INTEGER PRIMARY KEY)")
    db.execute(
        "CREATE TABLE child (parent_id INTEGER"
        " REFERENCES parent (id) DEFERRABLE INITIALLY DEFERRED)"
    )

    with pytest.raises(sqlite3.IntegrityError), transaction(db):
        db.execute("INSERT INTO child VALUES (1)")  # no such parent: refused at COMMIT

    assert not db.in_transaction
    assert db.execute("SELECT count(*) FROM child").fetchone()[0] == 0
    with transaction(db):
        db.execute("INSERT INTO parent VALUES (1)")
    assert db.execute("SELECT count(*) FROM parent").fetchone()[0] == 1
    db.close()


def test_a_statement_left_unfinished_in_a_transaction_holds_no_read_after_it(
    tmp_path: Path,
) -> None:
    """A transaction's statements share its connection's one cursor (``statements``): a
    SELECT read only in part must not keep a snapshot open past the COMMIT, which would
    hold every later frame of the WAL back from checkpoints.
    """
    path = tmp_path / "cursor.db"
    db = sqlite3.connect(
        path, isolation_level=None, check_same_thread=False, factory=GuardedConnection
    )
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("CREATE TABLE t (n INTEGER)")
    db.executemany("INSERT INTO t VALUES (?)", [(n,) for n in range(100)])
    with transaction(db) as sql:
        assert sql is db.statements
        sql.execute("INSERT INTO t VALUES (100)")
        assert sql.execute("SELECT n FROM t ORDER BY n").fetchone() == (0,)  # 100 more
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("INSERT INTO t VALUES (101)")
        busy, logged, copied = other.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    finally:
        other.close()
        db.close()
    assert (busy, logged, copied) == (0, 0, 0)  # every frame copied, and the WAL emptied


WRITES = ["create", "update", "delete", "delete_for_user", "delete_expired"]


async def write(store: SQLiteStore, operation: str, session_id: str, now: float) -> None:
    """One write primitive, by name, as a request or a cleanup job would call it."""
    if operation == "create":
        await store.create(make_record(now=now), max_sessions=10, now=now)
    elif operation == "update":
        await store.update(session_id, make_update(now=now, set_keys={"x": 1}), now=now)
    elif operation == "delete":
        await store.delete(session_id, now=now)
    elif operation == "delete_for_user":
        await store.delete_for_user("alice", now=now)
    else:
        await store.delete_expired(now=now + 10**6)


@pytest.mark.parametrize("operation", WRITES)
async def test_write_fails_with_store_unavailable_once_the_lock_timeout_passes(
    impatient_store: SQLiteStore, db_path: Path, operation: str
) -> None:
    t0 = start_time()
    record = make_record(now=t0, data={"a": 1})
    await impatient_store.create(record, max_sessions=10, now=t0)

    with write_lock(db_path):
        started = time.monotonic()
        with pytest.raises(StoreUnavailable) as raised:
            await write(impatient_store, operation, record.id, t0)
        elapsed = time.monotonic() - started

    assert elapsed < 5.0  # timeout=0.2; generous for a loaded machine
    assert isinstance(raised.value.__cause__, sqlite3.OperationalError)
    # Nothing was half-done, and the store writes again once the lock is gone.
    assert await impatient_store.list_for_user("alice", now=t0) == [record]
    assert await impatient_store.update(
        record.id, make_update(now=t0 + 1, set_keys={"b": 2}), now=t0 + 1
    )


async def test_write_waits_for_the_lock_and_succeeds_when_it_is_released(db_path: Path) -> None:
    t0 = start_time()
    record = make_record(now=t0)
    async with SQLiteStore(db_path, timeout=30) as store:
        with write_lock(db_path) as other:
            creating = asyncio.create_task(store.create(record, max_sessions=10, now=t0))
            await asyncio.sleep(0.05)

            # The event loop is free while the write waits on its own thread.
            assert await store.list_for_user("alice", now=t0) == []
            assert not creating.done()
            other.execute("ROLLBACK")

            await asyncio.wait_for(creating, timeout=10)

        assert await store.get(record.token_digest, now=t0) == record


async def test_refused_create_releases_the_write_lock(
    impatient_store: SQLiteStore, db_path: Path
) -> None:
    t0, record = await one_session(impatient_store)

    with pytest.raises(CreateError):
        await impatient_store.create(record, max_sessions=10, now=t0)

    # write_lock() has timeout=0: it fails at once if the store kept its transaction open.
    with write_lock(db_path):
        pass


async def test_only_a_taken_id_or_digest_is_a_create_error(
    impatient_store: SQLiteStore, db_path: Path
) -> None:
    """The session layer answers CreateError by drawing a new token: any other
    constraint failure must not look like one (here a record past the checks, as only
    the session layer's own are)."""
    t0 = time.time()
    broken = CheckedRecord(**{**asdict(make_record(now=t0)), "device_name": None})

    with pytest.raises(StoreUnavailable):
        await impatient_store.create(broken, max_sessions=10, now=t0)

    assert await impatient_store.list_for_user("alice", now=t0) == []


async def test_opening_while_another_connection_holds_the_write_lock_fails_cleanly(
    impatient_store: SQLiteStore, db_path: Path
) -> None:
    second = SQLiteStore(db_path, timeout=0.2)

    with write_lock(db_path), pytest.raises(StoreUnavailable):
        await second.open()

    assert not second.is_open
    await second.open()
    await second.close()


async def test_opening_a_file_another_connection_reads_in_rollback_mode_gives_up_in_time(
    db_path: Path,
) -> None:
    """Switching a file to WAL needs it to itself. A switch that meets another switching
    connection is retried, but only until the store's timeout has passed: a reader that
    keeps the file busy (another program, still in rollback-journal mode) must not keep
    open() waiting for good.
    """
    reader = sqlite3.connect(db_path, isolation_level=None)
    reader.execute("CREATE TABLE other_program (x)")
    reader.execute("BEGIN")
    reader.execute("SELECT * FROM other_program").fetchall()  # a read lock until COMMIT
    store = SQLiteStore(db_path, timeout=0.2)
    try:
        with pytest.raises(StoreUnavailable):
            await asyncio.wait_for(store.open(), timeout=5)
        assert pragma(db_path, "journal_mode") == "delete"
    finally:
        reader.close()
        await store.close()

    async with store:  # the file to itself now
        assert pragma(db_path, "journal_mode") == "wal"


# -- the read path ----------------------------------------------------------------------


async def test_the_event_loops_connection_never_waits_and_never_checkpoints(
    impatient_store: SQLiteStore,
) -> None:
    """Reads and the writes that need not wait run on the event loop, on one connection.

    Its busy timeout must be 0: sqlite3.connect() defaults to 5 seconds, and
    a read or write that met a lock (WAL recovery after a crash, another
    writer) would freeze every request of the process for that long; the
    writer thread waits instead. No fsync in a commit (synchronous=NORMAL in
    WAL), and no automatic checkpoint inside a commit (it fsyncs).
    """
    db = impatient_store._loop_db
    assert db is not None

    assert db.execute("PRAGMA busy_timeout").fetchone()[0] == 0
    assert db.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    assert db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0


class BusyReader:
    """Stands in for the event loop's connection and finds the database busy every time."""

    in_transaction = False
    total_changes = 0

    def __init__(self, code: int) -> None:
        self.code = code
        self.calls = 0

    def execute(self, sql: str, params: Any = ()) -> Any:
        self.calls += 1
        exc = sqlite3.OperationalError("database is locked")
        exc.sqlite_errorcode = self.code
        raise exc

    @property
    def statements(self) -> BusyReader:
        """The cursor a transaction runs on (as a GuardedConnection's): this ``execute``."""
        return self

    def close(self) -> None:
        pass


class WrappedConnection:
    """The event loop's connection, of which a subclass changes ``execute``."""

    def __init__(self, db: sqlite3.Connection | None) -> None:
        assert db is not None
        self.db = db

    @property
    def statements(self) -> WrappedConnection:
        """The cursor a transaction runs on (as a GuardedConnection's): this ``execute``."""
        return self

    @property
    def in_transaction(self) -> bool:
        return self.db.in_transaction

    @property
    def total_changes(self) -> int:
        return self.db.total_changes

    def set_trace_callback(self, callback: Callable[[str], object] | None) -> None:
        self.db.set_trace_callback(callback)

    def close(self) -> None:
        self.db.close()


class BusyForWrites(WrappedConnection):
    """Reads run, every write finds the database busy (and so goes to the writer thread)."""

    refused = 0

    def execute(self, sql: str, params: Any = ()) -> Any:
        if sql.lstrip().startswith(("SELECT", "PRAGMA")):
            return self.db.execute(sql, params)
        self.refused += 1
        return BusyReader(sqlite3.SQLITE_BUSY).execute(sql, params)


@pytest.mark.parametrize(
    "code",
    [
        sqlite3.SQLITE_BUSY,
        sqlite3.SQLITE_LOCKED,
        sqlite3.SQLITE_BUSY_RECOVERY,
    ],
    ids=["BUSY", "LOCKED", "BUSY_RECOVERY"],
)
async def test_busy_read_is_retried_on_the_writer(impatient_store: SQLiteStore, code: int) -> None:
    """Python reports SQLite's extended codes (e.g. 261, SQLITE_BUSY_RECOVERY, after a crash).

    Each of them means "busy", and the read must be retried, not failed.
    """
    t0, record = await one_session(impatient_store)
    busy = BusyReader(code)
    with loop_db_replaced(impatient_store, busy):
        got = await impatient_store.get(record.token_digest, now=t0)
        listed = await impatient_store.list_for_user("alice", now=t0)

    assert busy.calls == 2
    assert got == record
    assert listed == [record]


async def test_other_read_errors_are_not_retried(impatient_store: SQLiteStore) -> None:
    busy = BusyReader(sqlite3.SQLITE_IOERR)
    with loop_db_replaced(impatient_store, busy), pytest.raises(StoreUnavailable):
        await impatient_store.get(new_digest(), now=start_time())

    assert busy.calls == 1


# -- digests rotated away ---------------------------------------------------------------


async def test_only_a_rotation_names_the_rotated_away_columns(
    impatient_store: SQLiteStore,
) -> None:
    """get and an ordinary update, on every request's path, cost what they did; a
    rotation marks the digest it left in the UPDATE that leaves it."""
    t0, record = await one_session(impatient_store)
    store = impatient_store

    with statements_on_the_loop(store) as ordinary:
        assert await store.get(record.token_digest, now=t0) == record
        assert await store.update(record.id, make_update(now=t0 + 1, set_keys={"b": 2}), now=t0 + 1)
        assert await store.get(record.token_digest, now=t0 + 1) is not None
    with statements_on_the_loop(store) as rotating:
        await rotate_away(store, record, now=t0 + 2, until=t0 + 62)

    assert ordinary
    assert not [sql for sql in ordinary if "rotated_away" in sql]
    (marking,) = [sql for sql in rotating if "rotated_away" in sql]
    assert marking.startswith(f"UPDATE {TABLE} SET ")  # noqa: S608 - a prefix, not run
    columns = ("token_digest", "rotated_away_from", "rotated_away_until")
    assert all(f" {column} = " in marking for column in columns)


async def test_a_rotation_that_finds_the_file_busy_marks_the_digest_on_the_writer_thread(
    impatient_store: SQLiteStore,
) -> None:
    t0, record = await one_session(impatient_store)
    busy = BusyForWrites(impatient_store._loop_db)
    with loop_db_replaced(impatient_store, busy):
        rotated = await rotate_away(impatient_store, record, now=t0 + 1, until=t0 + 61)

    assert busy.refused == 1
    assert await impatient_store.rotated_away_to(record.token_digest, now=t0 + 2)
    assert await impatient_store.get(rotated, now=t0 + 2) is not None


async def test_a_busy_lookup_of_a_digest_rotated_away_is_retried_on_the_writer(
    impatient_store: SQLiteStore,
) -> None:
    t0, record = await one_session(impatient_store)
    await rotate_away(impatient_store, record, now=t0 + 1, until=t0 + 61)
    busy = BusyReader(sqlite3.SQLITE_BUSY)
    with loop_db_replaced(impatient_store, busy):
        assert await impatient_store.rotated_away_to(record.token_digest, now=t0 + 2)
        assert not await impatient_store.rotated_away_to(new_digest(), now=t0 + 2)

    assert busy.calls == 2


async def test_only_a_login_over_a_session_names_the_rotated_away_columns_in_its_insert(
    impatient_store: SQLiteStore,
) -> None:
    """Every other login runs the statements it did; one over a live session marks the
    digest it replaced in its own INSERT, no statement more."""
    store, t0 = impatient_store, start_time()
    replaced = new_digest()

    with statements_on_the_loop(store) as ordinary:
        await store.create(make_record(now=t0), max_sessions=10, now=t0)
    with statements_on_the_loop(store) as replacing:
        await store.create(
            make_record(now=t0), max_sessions=10, now=t0, replaced=(replaced, t0 + 60)
        )

    assert ordinary
    assert not [sql for sql in ordinary if "rotated_away" in sql]
    assert len(replacing) == len(ordinary)
    (marking,) = [sql for sql in replacing if "rotated_away" in sql]
    assert marking.startswith(f"INSERT INTO {TABLE} (")
    assert await store.rotated_away_to(replaced, now=t0 + 1)


async def test_a_login_over_a_session_that_finds_the_file_busy_marks_the_digest_on_the_writer(
    impatient_store: SQLiteStore,
) -> None:
    t0, replaced = start_time(), new_digest()
    record = make_record(now=t0)
    busy = BusyForWrites(impatient_store._loop_db)
    with loop_db_replaced(impatient_store, busy):
        await impatient_store.create(record, max_sessions=10, now=t0, replaced=(replaced, t0 + 60))

    assert busy.refused == 1
    assert await impatient_store.rotated_away_to(replaced, now=t0 + 1)
    assert await impatient_store.get(record.token_digest, now=t0 + 1) == record


async def test_a_login_over_a_session_that_is_refused_marks_nothing(
    impatient_store: SQLiteStore,
) -> None:
    t0, record = await one_session(impatient_store)
    replaced = new_digest()
    taken = replace(make_record(now=t0), token_digest=record.token_digest)

    with pytest.raises(CreateError):
        await impatient_store.create(taken, max_sessions=10, now=t0, replaced=(replaced, t0 + 60))

    assert not await impatient_store.rotated_away_to(replaced, now=t0 + 1)


async def test_a_login_evicted_takes_the_digest_it_replaced_with_it(
    impatient_store: SQLiteStore,
) -> None:
    t0, replaced = start_time(), new_digest()
    await impatient_store.create(
        make_record(now=t0), max_sessions=10, now=t0, replaced=(replaced, t0 + 3 * TTL)
    )

    await impatient_store.create(make_record(now=t0 + 1), max_sessions=1, now=t0 + 1)

    assert not await impatient_store.rotated_away_to(replaced, now=t0 + 2)


@pytest.mark.parametrize("going", ["delete", "delete_for_user", "delete_expired", "evicted"])
async def test_a_session_that_goes_takes_its_digest_rotated_away_with_it(
    impatient_store: SQLiteStore, going: str
) -> None:
    """The mark is the session row's: nothing is left behind to clean up, even where the
    time the rotation asked for outlives the session."""
    t0, record = await one_session(impatient_store)
    store = impatient_store
    await rotate_away(store, record, now=t0 + 1, until=t0 + 3 * TTL)

    if going == "delete":
        assert await store.delete(record.id, now=t0 + 2)
    elif going == "delete_for_user":
        assert await store.delete_for_user("alice", now=t0 + 2) == 1
    elif going == "delete_expired":
        assert await store.delete_expired(now=t0 + 1 + TTL) == 1
    else:
        await store.create(make_record(now=t0 + 2), max_sessions=1, now=t0 + 2)

    # Within the rotation's time, and (but once expired) the session's.
    asked_at = t0 + 1 + TTL if going == "delete_expired" else t0 + 2
    assert not await store.rotated_away_to(record.token_digest, now=asked_at)
    db = sqlite3.connect(store.path)
    try:
        marked = db.execute(
            f"SELECT COUNT(*) FROM {TABLE} WHERE rotated_away_from IS NOT NULL"  # noqa: S608
        ).fetchone()
    finally:
        db.close()
    assert marked == (0,)


# -- the row cache of get ---------------------------------------------------------------


@contextmanager
def statements_on_the_loop(store: SQLiteStore) -> Iterator[list[str]]:
    """The SQL the event loop's connection runs meanwhile, as SQLite traces it."""
    db = store._loop_db
    assert db is not None
    statements: list[str] = []
    db.set_trace_callback(statements.append)
    try:
        yield statements
    finally:
        db.set_trace_callback(None)


# The two ways the store learns that nothing was committed since a record was cached.
WAL_INDEX, DATA_VERSION = "wal-index header", "PRAGMA data_version"


@pytest.fixture(params=[WAL_INDEX, DATA_VERSION])
async def caching_store(
    db_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[SQLiteStore]:
    """An open store whose writes give up on a held lock after 0.2 s, checking its cache
    the one way or the other.
    """
    async with SQLiteStore(db_path, timeout=0.2) as store:
        if request.param == WAL_INDEX:
            if sys.platform != "linux":
                pytest.skip(ON_LINUX_ONLY)
            assert store._wal_index is not None, "the WAL-index header was not found"
        else:
            # As where /proc/self/maps is missing.
            store._wal_index = None
            store._writer.count_pages(None)
            cast(GuardedConnection, store._loop_db).refuse_write = None
        yield store


def cache_hit(store: SQLiteStore) -> list[str]:
    """What a get served from the cache runs on the reader: the check, no SELECT."""
    return [] if store._wal_index is not None else ["PRAGMA data_version"]


async def cached(store: SQLiteStore, digest: str, now: float) -> SessionRecord | None:
    """``store.get``, asserting that it came from the cache."""
    with statements_on_the_loop(store) as statements:
        got = await store.get(digest, now=now)
    assert statements == cache_hit(store)
    return got


async def test_a_repeated_get_is_served_from_the_cache(caching_store: SQLiteStore) -> None:
    t0 = start_time()
    record = make_record(now=t0, data={"a": 1})
    await caching_store.create(record, max_sessions=10, now=t0)

    with statements_on_the_loop(caching_store) as statements:
        assert await caching_store.get(record.token_digest, now=t0) == record
    assert statements[:-1] == cache_hit(caching_store)
    assert statements[-1].startswith("SELECT")

    assert await cached(caching_store, record.token_digest, t0) == record


async def test_a_hit_hands_out_the_record_read_by_the_miss(caching_store: SQLiteStore) -> None:
    """No decode and no copy per hit: callers treat records from get as read-only
    (the session layer's side of that is in tests/test_session_values.py).
    """
    t0 = start_time()
    record = make_record(now=t0, data={"cart": [1], "theme": "dark"})
    await caching_store.create(record, max_sessions=10, now=t0)

    first = await caching_store.get(record.token_digest, now=t0)
    second = await cached(caching_store, record.token_digest, t0)

    assert first is not None
    assert second is first
    assert second.data == {"cart": [1], "theme": "dark"}


async def test_expiry_is_checked_on_a_cache_hit(caching_store: SQLiteStore) -> None:
    t0 = start_time()
    record = make_record(now=t0, ttl=60)
    await caching_store.create(record, max_sessions=10, now=t0)
    assert await caching_store.get(record.token_digest, now=t0) == record

    assert await cached(caching_store, record.token_digest, t0 + 59.999) == record
    # expires_at > now, exactly as the SELECT says it.
    assert await cached(caching_store, record.token_digest, t0 + 60) is None
    assert await cached(caching_store, record.token_digest, t0 + 61) is None


async def test_a_miss_is_not_cached(caching_store: SQLiteStore) -> None:
    """A session created right after a lookup found nothing must be found at once."""
    t0 = start_time()
    record = make_record(now=t0)

    assert await caching_store.get(record.token_digest, now=t0) is None
    assert len(caching_store._cache) == 0
    await caching_store.create(record, max_sessions=10, now=t0)

    assert await caching_store.get(record.token_digest, now=t0) == record


async def test_a_commit_by_another_store_on_the_file_empties_the_cache(
    caching_store: SQLiteStore, db_path: Path
) -> None:
    """Another process commits through its own connection: the same mechanism.

    tests/test_many_processes.py runs real processes.
    """
    t0 = start_time()
    record = make_record(now=t0, data={"a": 1})
    one = caching_store
    async with SQLiteStore(db_path) as two:
        await one.create(record, max_sessions=10, now=t0)
        assert await one.get(record.token_digest, now=t0) == record
        assert await cached(one, record.token_digest, t0) == record

        assert await two.update(record.id, make_update(now=t0 + 1, set_keys={"b": 2}), now=t0 + 1)
        got = await one.get(record.token_digest, now=t0 + 1)
        assert got is not None
        assert got.data == {"a": 1, "b": 2}
        assert got.expires_at == t0 + 1 + TTL
        assert await cached(one, record.token_digest, t0 + 1) == got

        rotated = new_digest()
        assert await two.update(
            record.id, make_update(now=t0 + 2, token_digest=rotated), now=t0 + 2
        )
        assert await one.get(record.token_digest, now=t0 + 2) is None
        assert await one.get(rotated, now=t0 + 2) is not None
        assert await cached(one, rotated, t0 + 2) is not None

        assert await two.delete(record.id, now=t0 + 2)
        assert await one.get(rotated, now=t0 + 2) is None


def as_another_program(db_path: Path, sql: str, session_id: str) -> int:
    """Run ``sql`` on the session through a connection of its own; the rows it changed."""
    other = sqlite3.connect(db_path, isolation_level=None)
    try:
        changed: int = other.execute(sql, (session_id,)).rowcount
        return changed
    finally:
        other.close()


def write_as_another_program(db_path: Path, session_id: str) -> None:
    """Set the session's data to ``{"dirty": true}``."""
    as_another_program(db_path, DIRTY_UPDATE, session_id)


async def test_a_commit_by_any_program_on_the_file_empties_the_cache(
    caching_store: SQLiteStore, db_path: Path
) -> None:
    t0 = start_time()
    record = make_record(now=t0, data={"a": 1})
    await caching_store.create(record, max_sessions=10, now=t0)
    assert await caching_store.get(record.token_digest, now=t0) == record
    assert await cached(caching_store, record.token_digest, t0) == record

    write_as_another_program(db_path, record.id)

    got = await caching_store.get(record.token_digest, now=t0)
    assert got is not None
    assert got.data == {"dirty": True}


@pytest.mark.parametrize("path", ["inline", "writer thread"])
async def test_the_stores_own_writes_are_seen_at_once(
    caching_store: SQLiteStore, path: str
) -> None:
    """A write on the event loop replaces or forgets the cached record of the session it
    changed; the writer thread's moves the version.
    """
    t0 = start_time()
    store = caching_store
    busy, loop_db = BusyForWrites(store._loop_db), store._loop_db
    if path == "writer thread":
        store._loop_db = cast(sqlite3.Connection, busy)  # every write falls back to the thread
    try:
        record = make_record(now=t0, data={"a": 1})
        await store.create(record, max_sessions=10, now=t0)
        assert await store.get(record.token_digest, now=t0) == record
        assert await cached(store, record.token_digest, t0) == record

        # update: the new data and times at once
        assert await store.update(record.id, make_update(now=t0 + 1, set_keys={"a": 2}), now=t0)
        got = await store.get(record.token_digest, now=t0 + 1)
        assert got is not None
        assert (got.data, got.last_active_at) == ({"a": 2}, t0 + 1)
        assert await cached(store, record.token_digest, t0 + 1) == got

        # rotation: the old digest misses at once
        rotated = new_digest()
        assert await store.update(record.id, make_update(now=t0 + 2, token_digest=rotated), now=t0)
        assert await store.get(record.token_digest, now=t0 + 2) is None
        assert await store.get(rotated, now=t0 + 2) is not None
        assert await cached(store, rotated, t0 + 2) is not None

        # delete: gone at once
        assert await store.delete(record.id, now=t0 + 2)
        assert await store.get(rotated, now=t0 + 2) is None

        # delete_for_user
        other = make_record(now=t0)
        await store.create(other, max_sessions=10, now=t0)
        assert await store.get(other.token_digest, now=t0) == other
        assert await cached(store, other.token_digest, t0) == other
        assert await store.delete_for_user("alice", now=t0) == 1
        assert await store.get(other.token_digest, now=t0) is None
    finally:
        store._loop_db = loop_db
    assert (busy.refused > 0) == (path == "writer thread")


async def cache_two_sessions(store: SQLiteStore, t0: float) -> tuple[SessionRecord, SessionRecord]:
    """Two sessions of two users, created and read: both in the cache."""
    written = make_record(now=t0, user_id="writer", data={"a": 1})
    other = make_record(now=t0, user_id="bystander", data={"b": 1})
    for record in (written, other):
        await store.create(record, max_sessions=10, now=t0)
        assert await store.get(record.token_digest, now=t0) == record
    assert await cached(store, other.token_digest, t0) == other
    return written, other


def assert_cache_consistent(store: SQLiteStore) -> None:
    """The cache's indexes (by session id, by user, the data's length) name what it keeps,
    and the JSON it keeps for each is its record's data."""
    cache = store._cache
    rows = cache._rows
    assert len(rows) == len(cache._entries)
    assert {record.id: digest for digest, record in rows.items()} == {
        session_id: digest for session_id, (digest, _) in cache._entries.items()
    }
    users: dict[str, set[str]] = {}
    for record in rows.values():
        users.setdefault(record.user_id, set()).add(record.id)
    assert cache._users == users
    assert cache._chars == sum(len(data_json) for _, data_json in cache._entries.values())
    for digest, data_json in cache._entries.values():
        assert typed(json.loads(data_json)) == typed(rows[digest].data)


async def written_as_stored(store: SQLiteStore, digest: str, now: float) -> SessionRecord:
    """The record the store's own write left in its cache, which must be the row as stored."""
    kept = await cached(store, digest, now)
    reader = sqlite3.connect(store.path)
    try:
        row = reader.execute(sqlite_module._SELECT_BY_DIGEST, (digest, now)).fetchone()
    finally:
        reader.close()
    stored = sqlite_module._record(row)
    assert kept is not None
    assert kept == stored
    assert store._cache._entries[kept.id] == (digest, row[sqlite_module._DATA])
    assert typed(kept.data) == typed(stored.data)
    assert type(kept.last_active_at) is type(kept.expires_at) is float
    return kept


@pytest.mark.parametrize("update_class", [SessionUpdate, CheckedUpdate])
async def test_the_stores_own_writes_keep_the_other_sessions_cached(
    caching_store: SQLiteStore, update_class: type[SessionUpdate]
) -> None:
    """Each write on the event loop changes only its own session in the cache, which then
    holds the row as written: in a mix of reads and writes, every session stays cached.
    The session layer's own updates (``CheckedUpdate``) are kept without decoding the
    JSON written, any other from it."""
    t0 = start_time()
    store = caching_store
    written, other = await cache_two_sessions(store, t0)

    # a data write within the touch interval, a touch, both, a key removed, a rotation
    updates = [
        make_update(now=t0, set_keys={"a": 2}, moves_expiry=False),
        make_update(now=t0 + 1),
        make_update(now=t0 + 2, set_keys={"b": [1, "é"]}),
        make_update(now=t0 + 2, removed_keys=frozenset({"a"}), moves_expiry=False),
    ]
    for update in updates:
        update = update_class(*astuple(update))
        assert await store.update(written.id, update, now=t0)
        assert await cached(store, other.token_digest, t0) == other
        await written_as_stored(store, written.token_digest, t0)
    rotated = new_digest()
    assert await store.update(written.id, make_update(now=t0 + 3, token_digest=rotated), now=t0)
    assert await cached(store, other.token_digest, t0) == other
    assert await store.get(written.token_digest, now=t0) is None
    got = await written_as_stored(store, rotated, t0)
    assert (got.data, got.last_active_at, got.expires_at) == ({"b": [1, "é"]}, t0 + 3, t0 + 3 + TTL)

    # a delete, a login that evicts nobody
    assert await store.delete(written.id, now=t0)
    assert await cached(store, other.token_digest, t0 + 1) == other
    assert await store.get(rotated, now=t0 + 1) is None
    await store.create(make_record(now=t0, user_id="writer"), max_sessions=10, now=t0)
    assert await cached(store, other.token_digest, t0 + 1) == other
    assert_cache_consistent(store)


async def test_what_the_cache_keeps_of_a_write_is_what_a_read_gives(
    caching_store: SQLiteStore,
) -> None:
    """A caller of Store.update may change its values after the write, or pass values JSON
    turns into others (tuples, integer keys, integer times): the cache keeps what was
    stored.
    """
    t0 = start_time()
    store = caching_store
    written, _ = await cache_two_sessions(store, t0)
    roles = ["user"]
    update = SessionUpdate(
        int(t0) + 1, int(t0) + 1 + TTL, set_keys={"roles": roles, "pair": (1, 2), "n": {5: 1}}
    )
    assert await store.update(written.id, update, now=t0)
    roles.append("admin")
    kept = await written_as_stored(store, written.token_digest, t0)
    assert kept.data == {"a": 1, "roles": ["user"], "pair": [1, 2], "n": {"5": 1}}


async def test_writes_of_many_sessions_of_a_user_forget_that_users_cached_sessions(
    caching_store: SQLiteStore,
) -> None:
    """A login that evicts a user's oldest session, and logging a user out everywhere,
    delete rows the store does not know by id: every cached session of that user goes,
    the other users' stay.
    """
    t0 = start_time()
    store = caching_store
    written, other = await cache_two_sessions(store, t0)
    writers_second = make_record(now=t0, user_id="writer")
    await store.create(writers_second, max_sessions=10, now=t0)
    assert await store.get(writers_second.token_digest, now=t0) == writers_second

    await store.create(make_record(now=t0 + 1, user_id="writer"), max_sessions=1, now=t0 + 1)
    assert await cached(store, other.token_digest, t0 + 1) == other
    assert await store.get(written.token_digest, now=t0 + 1) is None
    assert await store.get(writers_second.token_digest, now=t0 + 1) is None

    third = make_record(now=t0, user_id="third")
    await store.create(third, max_sessions=10, now=t0)
    assert await store.get(third.token_digest, now=t0) == third
    assert await store.delete_for_user("bystander", now=t0) == 1
    assert await cached(store, third.token_digest, t0) == third
    assert_cache_consistent(store)
    assert "bystander" not in store._cache._users
    assert await store.get(other.token_digest, now=t0 + 1) is None


async def test_an_update_that_changes_nothing_writes_nothing(caching_store: SQLiteStore) -> None:
    """The same values again: no page is written (a commit that rewrites a row as it was
    writes none, so the store must not count on one), and the cache stays.
    """
    t0 = start_time()
    store = caching_store
    written, other = await cache_two_sessions(store, t0)
    assert await store.update(written.id, make_update(now=t0, set_keys={"a": 1}), now=t0)
    same_times = SessionUpdate(
        last_active_at=written.last_active_at, expires_at=written.expires_at, set_keys={"a": 1}
    )
    with wal_frames_added(store) as added:
        assert await store.update(written.id, same_times, now=t0)
        assert await store.update(
            written.id, make_update(now=t0, token_digest=written.token_digest), now=t0
        )
        assert await store.update(written.id, SessionUpdate(None, None), now=t0)
    assert added() == 0
    assert await cached(store, other.token_digest, t0) == other
    assert await store.get(written.token_digest, now=t0) == written
    assert not await store.update(written.id, SessionUpdate(None, None), now=t0 + TTL)  # expired


@contextmanager
def wal_frames_added(store: SQLiteStore) -> Iterator[Callable[[], int]]:
    """The frames commits add to the WAL while the block runs (none may restart it)."""
    if sys.platform != "linux":
        pytest.skip(ON_LINUX_ONLY)
    header = WalIndexHeader.find(store.path)
    assert header is not None, "the WAL-index header was not found"
    generation, frames = header.generation(), header.frames()

    def added() -> int:
        assert header.generation() == generation, "the WAL started over"
        return header.frames() - frames

    yield added


def revoke_as_another_program(db_path: Path, session_id: str) -> None:
    assert as_another_program(db_path, REVOKE, session_id) == 1


async def test_a_commit_elsewhere_before_the_stores_write_empties_the_cache(
    caching_store: SQLiteStore, db_path: Path
) -> None:
    """A session revoked by another program is never served from the cache, whatever the
    store writes afterwards."""
    t0 = start_time()
    store = caching_store
    written, other = await cache_two_sessions(store, t0)
    revoke_as_another_program(db_path, other.id)
    assert await store.update(written.id, make_update(now=t0, set_keys={"a": 2}), now=t0)
    assert await store.get(other.token_digest, now=t0) is None


class HeaderReadAfterACommitElsewhere:
    """The store's WAL-index header, which lets another program commit just before the
    header is read after the store's own commit (the first read after it takes the lock).

    ``recovered``: that header, and every one after it, then counts as many commits as
    the one read in the lock, as one rebuilt by WAL recovery (which counts from 0) can.
    """

    def __init__(
        self,
        header: WalIndexHeader,
        commit_elsewhere: Callable[[], None],
        *,
        recovered: bool = False,
    ) -> None:
        self.header = header
        self.commit_elsewhere = commit_elsewhere
        self.recovered = recovered
        self.reads: list[object] = []

    def version(self) -> object:
        if len(self.reads) == 1:
            self.commit_elsewhere()
        version = self.header.version()
        if self.recovered and self.reads:
            assert isinstance(version, bytes)
            in_the_lock = cast(bytes, self.reads[0])
            count = in_the_lock[8:12]  # iChange, in each of the header's two copies
            version = version[:8] + count + version[12:56] + count + version[60:]
        self.reads.append(version)
        return version

    def all_checkpointed(self) -> bool:
        return self.header.all_checkpointed()


@linux_only
@pytest.mark.parametrize(
    ("write", "recovered"),
    [
        ("changes the row", False),
        ("rewrites the row as it was", False),
        ("rewrites the row as it was", True),
    ],
    ids=["a commit", "no commit", "no commit, a recovered header"],
)
async def test_a_commit_elsewhere_right_after_the_stores_write_empties_the_cache(
    db_path: Path, write: str, recovered: bool
) -> None:
    """Between the store's commit and its read of the header, another program's commit:
    one commit more than the store's own, whether or not the store's wrote a page; or a
    header that counts none more but is not the one the store's write began with.
    """
    t0 = start_time()
    async with SQLiteStore(db_path) as store:
        written, other = await cache_two_sessions(store, t0)
        header = store._wal_index
        assert header is not None
        racing = HeaderReadAfterACommitElsewhere(
            header, lambda: revoke_as_another_program(db_path, other.id), recovered=recovered
        )
        store._wal_index = cast(WalIndexHeader, racing)
        value = 2 if write == "changes the row" else 1
        try:
            assert await store.update(
                written.id, make_update(now=t0, set_keys={"a": value}, moves_expiry=False), now=t0
            )
            assert len(racing.reads) == 2
            assert await store.get(other.token_digest, now=t0) is None
        finally:
            store._wal_index = header


@pytest.mark.parametrize("check", [WAL_INDEX, DATA_VERSION])
async def test_the_cache_is_emptied_on_close(
    db_path: Path, monkeypatch: pytest.MonkeyPatch, check: str
) -> None:
    """data_version numbers belong to one connection: a reopened store's new reader may
    count from the same number as the old one did, while the file changed in between.
    The WAL-index header is no such number, but the cache is emptied all the same."""
    if check == DATA_VERSION:
        # As where /proc/self/maps is missing, for both opens of the store.
        monkeypatch.setattr(WalIndexHeader, "find", classmethod(lambda cls, path: None))
    elif sys.platform != "linux":
        pytest.skip(ON_LINUX_ONLY)
    t0 = start_time()
    record = make_record(now=t0, data={"a": 1})
    store = SQLiteStore(db_path)
    async with store:
        assert (store._wal_index is None) == (check == DATA_VERSION)
        await store.create(record, max_sessions=10, now=t0)
        assert await store.get(record.token_digest, now=t0) == record
    async with SQLiteStore(db_path) as other:
        assert await other.update(record.id, make_update(now=t0, set_keys={"a": 2}), now=t0)

    async with store:
        got = await store.get(record.token_digest, now=t0)
    assert got is not None
    assert got.data == {"a": 2}


async def test_the_cache_is_bounded_in_rows_and_in_data(caching_store: SQLiteStore) -> None:
    t0 = start_time()
    store = caching_store
    store._cache.max_rows = 3
    store._cache.max_chars = 1000
    records = [make_record(now=t0, user_id=f"user{i}", data={"i": i}) for i in range(5)]
    large = make_record(now=t0, user_id="large", data={"x": "y" * 1000})
    for record in [*records, large]:
        await store.create(record, max_sessions=10, now=t0)

    for record in records:
        assert await store.get(record.token_digest, now=t0) == record
        assert 1 <= len(store._cache) <= 3
        assert_cache_consistent(store)
    assert await store.get(large.token_digest, now=t0) == large
    with statements_on_the_loop(store) as statements:
        assert await store.get(large.token_digest, now=t0) == large
    # read again: larger than the whole cache may hold
    assert statements[-1].startswith("SELECT")
    assert_cache_consistent(store)

    # a write whose record fills the cache's data bound by itself: kept alone
    last = records[-1]
    assert await store.get(last.token_digest, now=t0) == last
    assert len(store._cache) > 1
    filler = "y" * (1000 - len(dump_json({**last.data, "x": ""})))
    update = make_update(now=t0, set_keys={"x": filler}, moves_expiry=False)
    assert await store.update(last.id, update, now=t0)
    assert await cached(store, last.token_digest, t0) is not None
    assert len(store._cache) == 1
    assert_cache_consistent(store)


async def test_a_session_kept_under_an_old_digest_is_replaced() -> None:
    """A commit between a lookup's version read and its SELECT (a rotation elsewhere) can
    hand the cache a session it keeps under another digest: it keeps one of them."""
    cache = RecordCache()
    t0 = start_time()
    record = make_record(now=t0)
    rotated = replace(record, token_digest=new_digest())
    assert cache.get("version", record.token_digest) is None
    cache.put(record.token_digest, record, '{"a":1}')
    cache.put(rotated.token_digest, rotated, '{"a":12}')
    assert cache.get("version", record.token_digest) is None
    assert cache.get("version", rotated.token_digest) is rotated
    assert len(cache) == 1
    assert (cache._chars, cache._entries) == (8, {record.id: (rotated.token_digest, '{"a":12}')})


def test_a_kept_session_is_replaced_by_its_newer_record() -> None:
    """In place when the store's own write replaced it; else forgotten and kept as new, so
    the indexes by user and the bound hold."""
    cache = RecordCache(max_chars=20)
    t0 = start_time()
    record = make_record(now=t0, data={"a": 1})
    digest = record.token_digest
    assert cache.get("version", digest) is None
    cache.put(digest, record, '{"a":1}')
    newer = replace(record, data={"a": 22})
    cache.put(digest, newer, '{"a":22}')
    assert cache.get("version", digest) is newer
    assert (cache._chars, cache._users) == (8, {record.user_id: {record.id}})
    # The same id and digest under another user: a row deleted and written again.
    moved = replace(record, user_id="bob")
    cache.put(digest, moved, '{"a":1}')
    assert cache.get("version", digest) is moved
    assert (cache._chars, cache._users) == (7, {"bob": {record.id}})
    too_large = '{"a":"' + "x" * 20 + '"}'
    cache.put(digest, replace(moved, data=json.loads(too_large)), too_large)
    assert cache.get("version", digest) is None
    assert (len(cache), cache._chars, cache._entries, cache._users) == (0, 0, {}, {})


class CommitThenFail(WrappedConnection):
    """The event loop's connection, whose COMMIT takes effect and then reports an error."""

    def execute(self, sql: str, params: Any = ()) -> Any:
        cursor = self.db.execute(sql, params)
        if sql == "COMMIT":
            exc = sqlite3.OperationalError("disk I/O error")
            exc.sqlite_errorcode = sqlite3.SQLITE_IOERR
            raise exc
        return cursor

    @property
    def refuse_write(self) -> Any:
        return getattr(self.db, "refuse_write", None)


async def test_a_write_that_failed_after_its_commit_empties_the_cache(
    caching_store: SQLiteStore,
) -> None:
    """PRAGMA data_version does not count the connection's own commits: a write that took
    effect but failed must not leave its session's old record cached."""
    t0 = start_time()
    store = caching_store
    written, _ = await cache_two_sessions(store, t0)
    assert await store.get(written.token_digest, now=t0) == written
    loop_db = store._loop_db
    store._loop_db = cast(sqlite3.Connection, CommitThenFail(loop_db))
    try:
        with pytest.raises(StoreUnavailable):
            await store.update(written.id, make_update(now=t0, set_keys={"a": 2}), now=t0)
    finally:
        store._loop_db = loop_db
    got = await store.get(written.token_digest, now=t0)
    assert got is not None
    assert got.data == {"a": 2}


@pytest.mark.parametrize("write", ["inline", "cleanup"])
async def test_a_commit_of_the_writer_thread_before_a_write_empties_the_cache(
    caching_store: SQLiteStore, write: str
) -> None:
    """The writer thread's commit, then the event loop's write with no lookup between: the
    cache must not move on from before the thread's commit."""
    t0 = start_time()
    store = caching_store
    written, _ = await cache_two_sessions(store, t0)
    ending = make_record(now=t0, user_id="ending", ttl=10)
    await store.create(ending, max_sessions=10, now=t0)
    assert await store.get(ending.token_digest, now=t0) == ending
    if write == "inline":
        busy, loop_db = BusyForWrites(store._loop_db), store._loop_db
        store._loop_db = cast(sqlite3.Connection, busy)
        try:
            assert await store.delete(ending.id, now=t0)
        finally:
            store._loop_db = loop_db
        assert busy.refused > 0
    else:
        # The cleanup's DELETE goes to the writer thread whatever the file's state.
        assert await store.delete_expired(now=t0 + 10) == 1
    assert await store.update(written.id, make_update(now=t0, set_keys={"a": 2}), now=t0)
    assert await store.get(ending.token_digest, now=t0) is None


def stored_data(db_path: Path, session_id: str) -> Any:
    """The session's data as its row holds it, read by a connection of its own."""
    reader = sqlite3.connect(db_path)
    try:
        (data,) = reader.execute(SELECT_DATA, (session_id,)).fetchone()
    finally:
        reader.close()
    return json.loads(data)


def reads_a_row_to_update(statements: list[str]) -> bool:
    return any(sql.startswith(sqlite_module._SELECT_FOR_UPDATE[:30]) for sql in statements)


async def test_a_write_to_a_kept_session_merges_into_the_kept_row_without_reading_it(
    caching_store: SQLiteStore, db_path: Path
) -> None:
    """Under the write lock, a header that is the cache's version proves the kept row is
    the stored one: the update merges into it. ``PRAGMA data_version`` proves nothing
    inside a transaction, so there the row is read."""
    t0 = start_time()
    store = caching_store
    written, other = await cache_two_sessions(store, t0)
    with statements_on_the_loop(store) as statements:
        update = make_update(now=t0 + 1, set_keys={"b": [2]}, removed_keys=frozenset({"a"}))
        assert await store.update(written.id, update, now=t0 + 1)
        assert await store.update(written.id, make_update(now=t0 + 2, set_keys={"c": 3}), now=t0)
    assert any(sql.startswith("UPDATE") for sql in statements)
    assert reads_a_row_to_update(statements) == (store._wal_index is None)
    assert stored_data(db_path, written.id) == {"b": [2], "c": 3}
    kept = await written_as_stored(store, written.token_digest, t0 + 2)
    assert (kept.data, kept.last_active_at) == ({"b": [2], "c": 3}, t0 + 2)
    assert await cached(store, other.token_digest, t0) == other
    assert_cache_consistent(store)


async def test_a_write_after_a_commit_elsewhere_merges_into_the_row_as_committed(
    caching_store: SQLiteStore, db_path: Path
) -> None:
    """The kept row is older than the stored one: merging into it would lose the other
    program's change."""
    t0 = start_time()
    store = caching_store
    written, _ = await cache_two_sessions(store, t0)
    write_as_another_program(db_path, written.id)
    with statements_on_the_loop(store) as statements:
        assert await store.update(written.id, make_update(now=t0, set_keys={"b": 2}), now=t0)
    assert reads_a_row_to_update(statements)
    assert stored_data(db_path, written.id) == {"dirty": True, "b": 2}
    got = await store.get(written.token_digest, now=t0)
    assert got is not None
    assert got.data == {"dirty": True, "b": 2}


@linux_only
async def test_a_write_refused_on_the_loop_reads_the_row_on_the_writer_thread(
    db_path: Path,
) -> None:
    """The event loop's connection refused the write (its commit would start the WAL over)
    after it saw the cache's version under the lock; another program commits before the
    writer thread takes the lock: the thread reads the row, never the kept record."""
    async with SQLiteStore(db_path, timeout=0.2) as store:
        t0 = start_time()
        written, _ = await cache_two_sessions(store, t0)
        loop_db = cast(GuardedConnection, store._loop_db)
        refused: list[bool] = []

        def refuse_after_reading_the_version() -> bool:
            store._write_locked()
            refused.append(True)
            return True

        on_thread = store._writer.write

        async def after_a_commit_elsewhere(
            work: Callable[[sqlite3.Connection], Any], *, asked_at: float | None = None
        ) -> Any:
            write_as_another_program(db_path, written.id)
            return await on_thread(work, asked_at=asked_at)

        loop_db.refuse_write = refuse_after_reading_the_version
        store._writer.write = after_a_commit_elsewhere  # type: ignore[method-assign]
        try:
            assert await store.update(written.id, make_update(now=t0, set_keys={"b": 2}), now=t0)
        finally:
            loop_db.refuse_write = store._write_locked
            del store._writer.write
        assert refused == [True]
        assert stored_data(db_path, written.id) == {"dirty": True, "b": 2}


async def test_a_commit_elsewhere_just_before_the_write_takes_its_lock_is_merged_into(
    caching_store: SQLiteStore, db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another program commits after everything the store read before its write, and just
    before its BEGIN IMMEDIATE: only a header read once the lock is held shows it."""
    t0 = start_time()
    store = caching_store
    written, _ = await cache_two_sessions(store, t0)
    loop_db = cast(GuardedConnection, store._loop_db)
    statements = loop_db.statements

    class CommitElsewhereBeforeBegin:
        def execute(self, sql: str, params: Any = ()) -> Any:
            if sql == "BEGIN IMMEDIATE":
                monkeypatch.undo()
                write_as_another_program(db_path, written.id)
            return statements.execute(sql, params)

    monkeypatch.setattr(loop_db, "statements", CommitElsewhereBeforeBegin())
    assert await store.update(written.id, make_update(now=t0, set_keys={"b": 2}), now=t0)
    assert stored_data(db_path, written.id) == {"dirty": True, "b": 2}


async def test_a_commit_elsewhere_right_after_a_lookups_select_is_merged_into(
    caching_store: SQLiteStore, db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The record a lookup keeps may be older than the version it is kept under only if
    that version was read after the SELECT: it is read before, so the write reads the row."""
    t0 = start_time()
    store = caching_store
    record = make_record(now=t0, data={"a": 1})
    await store.create(record, max_sessions=10, now=t0)
    loop_db = store._loop_db
    assert loop_db is not None
    select = loop_db.execute

    class CommitElsewhereAfterFetching:
        def __init__(self, cursor: sqlite3.Cursor) -> None:
            self.cursor = cursor

        def fetchall(self) -> list[Any]:
            rows = self.cursor.fetchall()
            write_as_another_program(db_path, record.id)
            return rows

    def select_then_commit_elsewhere(sql: str, params: Any = ()) -> Any:
        if sql == sqlite_module._SELECT_BY_DIGEST:
            monkeypatch.undo()
            return CommitElsewhereAfterFetching(select(sql, params))
        return select(sql, params)

    monkeypatch.setattr(loop_db, "execute", select_then_commit_elsewhere)
    assert await store.get(record.token_digest, now=t0) == record  # as it was read
    assert await store.update(record.id, make_update(now=t0, set_keys={"b": 2}), now=t0)
    assert stored_data(db_path, record.id) == {"dirty": True, "b": 2}


# Another process adding 1 to the session's key "p", each time in one statement, with a pause
# after each so that the store's writes find the file free as often as not.
INCREMENTING_PROGRAM = f"""
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=10)
for _ in range(int(sys.argv[3])):
    db.execute(
        "UPDATE {TABLE} SET data = json_set(data, '$.p', json_extract(data, '$.p') + 1)"
        " WHERE id = ?",
        (sys.argv[2],),
    )
    time.sleep(0.0001)
"""  # noqa: S608


async def test_another_processs_changes_survive_the_stores_writes_to_other_keys(
    db_path: Path,
) -> None:
    """While another process keeps changing one key, the store reads the session and writes
    another key, over and over: a write that merged into a record older than the row would
    take the other process's key back. The tests above pin each ordering that could; this
    one lets two real processes interleave as they will.
    """
    increments = 3000  # long enough to overlap a busy machine's store loop many times
    t0 = start_time()
    record = make_record(now=t0, data={"p": 0})
    async with SQLiteStore(db_path, timeout=10) as store:
        await store.create(record, max_sessions=10, now=t0)
        other = await asyncio.create_subprocess_exec(
            sys.executable, "-c", INCREMENTING_PROGRAM, str(db_path), record.id, str(increments)
        )
        writes = 0
        try:
            while other.returncode is None and writes < 200_000:
                assert await store.get(record.token_digest, now=t0) is not None
                writes += 1
                update = make_update(now=t0, set_keys={"l": writes}, moves_expiry=False)
                assert await store.update(record.id, update, now=t0)
                # A pause, as between requests: the other process's busy handler backs off
                # in milliseconds, and writes without one would starve it. Blocking, as the
                # event loop's timers are coarser; then a turn of the loop, which hears of
                # the other process's exit.
                time.sleep(0.0001)  # noqa: ASYNC251
                await asyncio.sleep(0)
        finally:
            assert await asyncio.wait_for(other.wait(), timeout=60) == 0
        assert writes > 50, "the two processes hardly overlapped"
    assert stored_data(db_path, record.id) == {"p": increments, "l": writes}


async def close_reaching_the_writer_thread(store: SQLiteStore) -> asyncio.Task[None]:
    """``store.close()`` in a task, once it has begun the writer thread's close."""
    closing = asyncio.create_task(store.close())
    for _ in range(100):
        if store._writer._pool is None:
            return closing
        await asyncio.sleep(0)
    pytest.fail("close() did not reach the writer thread")


@pytest.mark.parametrize("operation", ["update", "delete_expired"])
async def test_work_queued_on_the_writer_thread_runs_before_close_ends_its_connection(
    db_path: Path, operation: str
) -> None:
    """A close queues behind what the writer thread has in hand: that work still runs."""
    t0 = start_time()
    record = make_record(now=t0, data={"a": 1}, ttl=10)
    store = SQLiteStore(db_path, timeout=5)
    await store.open()
    try:
        await store.create(record, max_sessions=10, now=t0)
        with write_lock(db_path) as other, writer_thread_held(store):
            # The file is locked, so the update goes to the thread too.
            working: asyncio.Task[bool | int]
            if operation == "update":
                update = make_update(now=t0, set_keys={"b": 2})
                working = asyncio.create_task(store.update(record.id, update, now=t0))
            else:
                working = asyncio.create_task(store.delete_expired(now=t0 + 10))
            await asyncio.sleep(0)  # submitted to the thread, behind what holds it
            other.execute("ROLLBACK")
            closing = await close_reaching_the_writer_thread(store)
            assert not working.done()
        assert await asyncio.wait_for(working, timeout=10) == (True if operation == "update" else 1)
        await asyncio.wait_for(closing, timeout=10)
    finally:
        await store.close()
    if operation == "update":
        assert stored_data(db_path, record.id) == {"a": 1, "b": 2}
    else:
        async with SQLiteStore(db_path) as reopened:
            assert await reopened.get(record.token_digest, now=t0) is None


async def test_a_store_opened_again_while_its_close_waits_for_the_writer_thread_works(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request reopening the store (the middleware opens a closed store on use) while
    a close waits for the writer thread's work in hand: the close's end dropped the new
    writer connection, leaving a store "open" whose every writer-thread job raised."""
    t0 = start_time()
    store = SQLiteStore(db_path)
    await store.open()
    try:
        for _ in range(3):
            await store.create(make_record(now=t0, user_id="bob"), max_sessions=10, now=t0)
        with writer_thread_held(store):
            closing = await close_reaching_the_writer_thread(store)
            await store.open()
        await asyncio.wait_for(closing, timeout=10)

        assert store.is_open
        assert await store.delete_expired(now=t0) == 0  # on the writer thread
        monkeypatch.setattr(sqlite_module, "INLINE_DELETE_ROWS", 1)  # there too
        assert await store.delete_for_user("bob", now=t0) == 3
    finally:
        await store.close()


def open_descriptors_on(path: str) -> int:
    """How many of this process's file descriptors are open on ``path`` (Linux)."""
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc to list open files")
    target = os.path.realpath(path)
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/self/fd/{fd}") == target
    return count


async def test_the_store_leaves_the_shm_file_to_sqlite(db_path: Path) -> None:
    """A descriptor this process opened and closed on ``-shm`` would release SQLite's
    POSIX locks on it, letting another process rebuild the WAL index under us.
    """
    async with SQLiteStore(db_path) as store:
        t0 = start_time()
        await store.create(make_record(now=t0), max_sessions=10, now=t0)
        await store.get(new_digest(), now=t0)
        # SQLite's connections in one process share one descriptor per file.
        assert open_descriptors_on(f"{db_path}-shm") == 1


# -- writes on the event loop -----------------------------------------------------------


@pytest.mark.parametrize("operation", ["create", "update", "delete"])
async def test_a_locked_file_sends_the_write_to_the_writer_thread_and_the_loop_runs_on(
    db_path: Path, operation: str
) -> None:
    t0 = start_time()
    record = make_record(now=t0)
    new = make_record(now=t0)
    async with SQLiteStore(db_path, timeout=30) as store:
        await store.create(record, max_sessions=10, now=t0)
        ticks: list[float] = []

        async def tick() -> None:
            while True:
                ticks.append(time.monotonic())
                await asyncio.sleep(0.005)

        async def run_write() -> None:
            if operation == "create":
                await store.create(new, max_sessions=10, now=t0)
            elif operation == "update":
                update = make_update(now=t0 + 1, set_keys={"b": 2})
                assert await store.update(record.id, update, now=t0 + 1)
            else:
                assert await store.delete(record.id, now=t0 + 1)

        ticker = asyncio.create_task(tick())
        try:
            with write_lock(db_path) as other:
                writing = asyncio.create_task(run_write())
                await asyncio.sleep(0.2)
                assert not writing.done()
                other.execute("ROLLBACK")
                await asyncio.wait_for(writing, timeout=10)
        finally:
            ticker.cancel()

        gaps = [later - earlier for earlier, later in itertools.pairwise(ticks)]
        assert len(ticks) >= 10
        assert max(gaps) < 0.1  # sleeps of 5 ms; the lock was held for 200 ms
        if operation == "create":
            assert await store.get(new.token_digest, now=t0) == new
        elif operation == "update":
            got = await store.get(record.token_digest, now=t0 + 1)
            assert got is not None
            assert got.data == {"b": 2}
        else:
            assert await store.get(record.token_digest, now=t0) is None


@pytest.mark.parametrize("operation", ["create", "update", "delete"])
async def test_busy_inline_write_is_retried_on_the_writer_thread(
    impatient_store: SQLiteStore, operation: str
) -> None:
    t0 = start_time()
    record = make_record(now=t0, data={"a": 1})
    await impatient_store.create(record, max_sessions=10, now=t0)
    busy = BusyReader(sqlite3.SQLITE_BUSY)
    with loop_db_replaced(impatient_store, busy):
        await write(impatient_store, operation, record.id, t0)

    assert busy.calls == 1
    listed = await impatient_store.list_for_user("alice", now=t0)
    expected = {"create": 2, "update": 1, "delete": 0}[operation]
    assert len(listed) == expected


async def test_other_inline_write_errors_are_not_retried(impatient_store: SQLiteStore) -> None:
    t0 = start_time()
    record = make_record(now=t0, data={"a": 1})
    await impatient_store.create(record, max_sessions=10, now=t0)
    failing = BusyReader(sqlite3.SQLITE_IOERR)
    with loop_db_replaced(impatient_store, failing), pytest.raises(StoreUnavailable) as raised:
        await impatient_store.update(record.id, make_update(now=t0, set_keys={"b": 2}), now=t0)

    assert failing.calls == 1
    assert isinstance(raised.value.__cause__, sqlite3.OperationalError)
    assert await impatient_store.get(record.token_digest, now=t0) == record


class RollbackFails(WrappedConnection):
    """ROLLBACK fails and leaves the transaction open (as a disk error might)."""

    def execute(self, sql: str, params: Any = ()) -> Any:
        if sql == "ROLLBACK":
            raise sqlite3.OperationalError("disk I/O error")
        return self.db.execute(sql, params)


async def test_a_transaction_left_open_by_a_failed_rollback_does_not_outlive_the_write(
    impatient_store: SQLiteStore, db_path: Path
) -> None:
    """Reads share the connection: left open, the transaction would keep them on its old
    snapshot (and hold the write lock), so the store starts over on a new connection.
    """
    t0 = start_time()
    store = impatient_store
    record = make_record(now=t0, data={"a": 1})
    await store.create(record, max_sessions=10, now=t0)
    stuck = cast(sqlite3.Connection, RollbackFails(store._loop_db))
    store._loop_db = stuck

    # Inside the transaction the size cap refuses the merged data; the ROLLBACK fails.
    too_big = make_update(now=t0 + 1, set_keys={"a": "x" * 200}, max_data_bytes=100)
    with pytest.raises(StoreUnavailable):
        await store.update(record.id, too_big, now=t0 + 1)

    # Another program's commit is seen, and the store's own writes go through.
    write_as_another_program(db_path, record.id)
    got = await store.get(record.token_digest, now=t0 + 1)
    assert got is not None
    assert got.data == {"dirty": True}
    assert await store.update(record.id, make_update(now=t0 + 2, set_keys={"b": 3}), now=t0 + 2)
    got = await store.get(record.token_digest, now=t0 + 2)
    assert got is not None
    assert got.data == {"dirty": True, "b": 3}
    assert store._loop_db is not stuck


async def test_a_transaction_a_failed_rollback_left_open_on_the_writer_thread_ends_with_it(
    impatient_store: SQLiteStore, db_path: Path
) -> None:
    """The writer thread's connection, left inside its transaction, held the file's write
    lock: every later write of the store failed ("cannot start a transaction within a
    transaction"), and every other process's ("database is locked"), until a restart."""
    t0 = start_time()
    store = impatient_store
    record = make_record(now=t0, data={"a": 1})
    await store.create(record, max_sessions=10, now=t0)
    stuck = cast(sqlite3.Connection, RollbackFails(store._writer._db))
    store._writer._db = stuck

    with loop_db_replaced(store, BusyForWrites(store._loop_db)):  # writes go to the thread
        too_big = make_update(now=t0 + 1, set_keys={"a": "x" * 200}, max_data_bytes=100)
        with pytest.raises(StoreUnavailable):
            await store.update(record.id, too_big, now=t0 + 1)

        write_as_another_program(db_path, record.id)
        assert await store.update(record.id, make_update(now=t0 + 2, set_keys={"b": 3}), now=t0 + 2)

    got = await store.get(record.token_digest, now=t0 + 2)
    assert got is not None
    assert got.data == {"dirty": True, "b": 3}
    assert store._writer._db is not stuck


@linux_only
async def test_a_checkpoints_finish_whose_write_left_its_transaction_open_lets_go_of_the_lock(
    impatient_store: SQLiteStore, db_path: Path
) -> None:
    """The same, for a write that runs on the writer thread after a checkpoint's finish."""
    t0, record = await one_session(impatient_store)
    await copy_held_back_by_a_reader(impatient_store, record.id)
    assert impatient_store._writer.finish_due()
    stuck = cast(sqlite3.Connection, RollbackFails(impatient_store._writer._db))
    impatient_store._writer._db = stuck

    too_big = make_update(now=t0 + 1, set_keys={"a": "x" * 200}, max_data_bytes=100)
    with pytest.raises(StoreUnavailable):
        await impatient_store.update(record.id, too_big, now=t0 + 1)

    write_as_another_program(db_path, record.id)
    changes = make_update(now=t0 + 2, set_keys={"b": 3})
    assert await impatient_store.update(record.id, changes, now=t0 + 2)
    got = await impatient_store.get(record.token_digest, now=t0 + 2)
    assert got is not None
    assert got.data["dirty"] is True
    assert impatient_store._writer._db is not stuck


async def test_a_connection_that_could_not_be_replaced_is_opened_again_by_the_next_call(
    impatient_store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The replacement of a connection left in a transaction can fail too (out of file
    descriptors): each call must then fail as a store failure does, and the store recover
    once a connection opens, instead of taking itself for closed.
    """
    t0 = start_time()
    store = impatient_store
    record = make_record(now=t0, data={"a": 1})
    await store.create(record, max_sessions=10, now=t0)
    store._loop_db = cast(sqlite3.Connection, RollbackFails(store._loop_db))
    connect = sqlite_module._connect_loop_db
    refusals = iter([True, True])

    def connect_unless_refused(path: str) -> Any:
        if next(refusals, False):
            raise sqlite3.OperationalError("unable to open database file")
        return connect(path)

    monkeypatch.setattr(sqlite_module, "_connect_loop_db", connect_unless_refused)
    too_big = make_update(now=t0 + 1, set_keys={"a": "x" * 200}, max_data_bytes=100)
    with pytest.raises(StoreUnavailable):
        await store.update(record.id, too_big, now=t0 + 1)  # the ROLLBACK and reopen fail

    with pytest.raises(StoreUnavailable):
        await store.get(record.token_digest, now=t0 + 1)  # the second refusal

    assert store.is_open
    assert await store.get(record.token_digest, now=t0 + 1) == record
    assert await store.update(record.id, make_update(now=t0 + 2, set_keys={"b": 2}), now=t0 + 2)
    assert await store.list_for_user("alice", now=t0 + 2) != []


@contextmanager
def writer_thread_held(store: SQLiteStore) -> Iterator[None]:
    """The store's writer thread busy until the block ends: what queues there waits."""
    assert store._writer._pool is not None
    release = threading.Event()
    store._writer._pool.submit(release.wait, 10)
    try:
        yield
    finally:
        release.set()


# The limit against the user's 3 sessions, all counted (the kept one too).
@pytest.mark.parametrize(
    "inline_rows", [32, 3, 2], ids=["more than they have", "as many as they have", "fewer"]
)
async def test_logging_a_user_out_everywhere_runs_on_the_loop_unless_they_have_many_sessions(
    impatient_store: SQLiteStore, monkeypatch: pytest.MonkeyPatch, inline_rows: int
) -> None:
    """A few rows are one short write on the event loop; many wait for the writer thread."""
    monkeypatch.setattr(sqlite_module, "INLINE_DELETE_ROWS", inline_rows)
    t0 = start_time()
    kept = make_record(now=t0)
    for record in (kept, make_record(now=t0), make_record(now=t0)):
        await impatient_store.create(record, max_sessions=10, now=t0)

    with writer_thread_held(impatient_store):
        deleting = asyncio.create_task(
            impatient_store.delete_for_user("alice", now=t0, except_id=kept.id)
        )
        await asyncio.sleep(0.1)
        done_while_held = deleting.done()
    deleted = await deleting

    assert done_while_held == (inline_rows >= 3)
    assert deleted == 2
    assert await impatient_store.list_for_user("alice", now=t0) == [kept]


async def test_inline_and_writer_thread_updates_together_keep_every_key(db_path: Path) -> None:
    """Read-modify-write stays atomic between the two paths (BEGIN IMMEDIATE on both)."""
    t0 = start_time()
    record = make_record(now=t0)
    async with SQLiteStore(db_path) as inline, SQLiteStore(db_path) as threaded:
        await inline.create(record, max_sessions=10, now=t0)
        real = threaded._loop_db
        threaded._loop_db = cast(sqlite3.Connection, BusyForWrites(real))
        try:
            await asyncio.gather(
                *(
                    (threaded if i % 2 else inline).update(
                        record.id, make_update(now=t0 + 1, set_keys={f"k{i}": i}), now=t0 + 1
                    )
                    for i in range(40)
                )
            )
        finally:
            threaded._loop_db = real

        got = await inline.get(record.token_digest, now=t0 + 1)
    assert got is not None
    assert got.data == {f"k{i}": i for i in range(40)}


async def one_session(store: SQLiteStore) -> tuple[float, SessionRecord]:
    """A session created in ``store`` now, and that now."""
    t0 = start_time()
    record = make_record(now=t0)
    await store.create(record, max_sessions=10, now=t0)
    return t0, record


def wal_of(store: SQLiteStore) -> WalIndexHeader:
    """The WAL-index header ``store`` reads (Linux only)."""
    assert store._wal_index is not None, "the WAL-index header was not found"
    return store._wal_index


def wal_size(path: Path) -> int:
    return os.path.getsize(f"{path}-wal")


def has_wal(path: Path) -> bool:
    return os.path.exists(f"{path}-wal")


async def test_the_wal_stays_bounded_under_inline_writes(
    caching_store: SQLiteStore, db_path: Path
) -> None:
    """The inline connection never checkpoints; the writer thread does, once the WAL holds
    CHECKPOINT_PAGES pages (or, where its size cannot be read, every CHECKPOINT_EVERY writes),
    and writes wait for it once the WAL holds twice that.
    """
    t0 = start_time()
    records = [make_record(now=t0) for _ in range(5)]
    for record in records:
        await caching_store.create(record, max_sessions=10, now=t0)
    page_size = pragma(db_path, "page_size")

    largest = 0
    for i in range(2 * CHECKPOINT_PAGES):
        now = t0 + i / 1000
        update = make_update(now=now, set_keys={"i": i})
        assert await caching_store.update(records[i % 5].id, update, now=now)
        largest = max(largest, wal_size(db_path))

    # An update that moves the expiry adds 2 pages: without checkpoints the WAL would reach
    # 4 * CHECKPOINT_PAGES. A frame is a page and a 24-byte header.
    assert largest < (2 * CHECKPOINT_PAGES + 8) * (page_size + 24)


@contextmanager
def counting_calls(monkeypatch: pytest.MonkeyPatch, name: str) -> Iterator[list[int]]:
    """Counts the calls of the writer thread module's ``name`` (one entry each) in the block."""
    taken: list[int] = []
    real = getattr(writer_module, name)

    def counted(*args: Any) -> Any:
        taken.append(1)
        return real(*args)

    with monkeypatch.context() as patch:
        patch.setattr(writer_module, name, counted)
        yield taken


def counting_checkpoints(monkeypatch: pytest.MonkeyPatch) -> AbstractContextManager[list[int]]:
    """Counts the checkpoints the writer thread begins: each with a copy."""
    return counting_calls(monkeypatch, "copy_wal")


def counting_finishes(monkeypatch: pytest.MonkeyPatch) -> AbstractContextManager[list[int]]:
    """Counts the finishes of checkpoints whose copy could not start the WAL over."""
    return counting_calls(monkeypatch, "checkpoint_then")


@contextmanager
def reader_holding_a_snapshot(path: Path) -> Iterator[None]:
    """Another connection inside a read transaction: the WAL cannot start over under it."""
    reader = sqlite3.connect(path, isolation_level=None)
    try:
        reader.execute("BEGIN")
        reader.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
        yield
    finally:
        reader.close()


def data_write(value: int) -> SessionUpdate:
    """A write within the touch interval: it changes the data and leaves the times."""
    return make_update(now=0, set_keys={"i": value}, moves_expiry=False)


def copy_done(store: SQLiteStore) -> None:
    """Wait for the checkpoint's copy, if one is under way: the next write finishes it."""
    if store._writer._copying is not None:
        store._writer._copying.result()


async def write_until_a_copy_begins(store: SQLiteStore, session_id: str) -> None:
    """Data writes until the store hands the writer thread a checkpoint's copy."""
    for i in itertools.count():
        assert await store.update(session_id, data_write(i), now=start_time())
        if store._writer._copying is not None:
            return


async def a_failing_finish_with_writes_behind_it(
    store: SQLiteStore, session_id: str, t0: float
) -> None:
    """A checkpoint's finish whose own write is over the data cap, with three writes queued
    behind it (the writer thread held until they are): that one fails, they succeed.
    """
    too_large = make_update(
        now=0, set_keys={"big": "x" * 100}, moves_expiry=False, max_data_bytes=10
    )
    with writer_thread_held(store):
        finishing = asyncio.create_task(store.update(session_id, too_large, now=t0))
        await asyncio.sleep(0.05)
        waiting = [
            asyncio.create_task(store.update(session_id, data_write(i), now=t0)) for i in range(3)
        ]
        await asyncio.sleep(0.05)
    with pytest.raises(DataTooLarge):
        await finishing
    assert all(await asyncio.gather(*waiting))


async def write_data(store: SQLiteStore, session_id: str, count: int) -> None:
    """``count`` data writes, one WAL page each; a checkpoint's copy, once begun, is done
    before the next (in a running app, a few writes later).
    """
    for i in range(count):
        assert await store.update(session_id, data_write(i), now=start_time())
        copy_done(store)


@linux_only
async def test_a_checkpoint_waits_for_pages_not_writes(
    impatient_store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A data write adds one page to the WAL: counting writes had them checkpoint (and
    fsync) every 250 pages, where logins, six pages each, did so every 1,500.
    """
    _t0, record = await one_session(impatient_store)

    with counting_checkpoints(monkeypatch) as taken:
        await write_data(impatient_store, record.id, CHECKPOINT_PAGES // 2)
        assert taken == []
        assert impatient_store._writer._copying is None

        await write_data(impatient_store, record.id, CHECKPOINT_PAGES)
        assert len(taken) == 1

    # The checkpoint restarted the WAL: the pages counted since are the writes after it.
    wal_index = wal_of(impatient_store)
    assert wal_index.frames() < CHECKPOINT_PAGES


@linux_only
async def test_writes_go_on_while_the_checkpoint_copies_and_wait_only_when_overdue(
    impatient_store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The checkpoint's copy fsyncs everything the WAL took since the last one; requests
    keep writing on the event loop meanwhile. Should the copy take as long as writing
    CHECKPOINT_PAGES more pages, writes queue behind it, so the WAL stays bounded: at
    twice CHECKPOINT_PAGES.
    """
    t0, record = await one_session(impatient_store)
    wal_index = wal_of(impatient_store)
    recording = RecordingWrites(impatient_store._loop_db)
    impatient_store._loop_db = cast(sqlite3.Connection, recording)
    try:
        with counting_finishes(monkeypatch) as taken:
            with writer_thread_held(impatient_store):
                # Each write a task, as a request's: one on the loop is done once the loop
                # has turned, and the first that is not waits for the thread.
                writes = 0
                while writes < 5 * CHECKPOINT_PAGES:
                    waiting = asyncio.create_task(
                        impatient_store.update(record.id, data_write(writes), now=t0)
                    )
                    await asyncio.sleep(0)
                    if not waiting.done():
                        break
                    assert waiting.result()
                    writes += 1
                copying = impatient_store._writer._copying
                assert copying is not None
                assert not copying.done()  # queued behind what holds the thread
                assert recording.writes.count("COMMIT") == writes  # every write on the loop
                assert writes > CHECKPOINT_PAGES  # well past where the copy began
                assert wal_index.frames() <= 2 * CHECKPOINT_PAGES + 10  # where waiting began

                await asyncio.sleep(0.05)
                assert not waiting.done()  # overdue: behind the copy, on the thread
            assert await waiting
            assert recording.writes.count("COMMIT") == writes
            assert len(taken) == 1  # it finished the checkpoint
    finally:
        impatient_store._loop_db = recording.db
    assert wal_index.frames() < 5  # and started the WAL over


@linux_only
async def test_a_request_cancelled_before_the_finish_ran_leaves_it_to_the_next_write(
    impatient_store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store follows the writer thread's job, not the request that awaits it."""
    t0, record = await one_session(impatient_store)
    await copy_held_back_by_a_reader(impatient_store, record.id)
    with counting_finishes(monkeypatch) as taken:
        with writer_thread_held(impatient_store):
            finishing = asyncio.create_task(
                impatient_store.update(record.id, data_write(-1), now=t0)
            )
            await asyncio.sleep(0.05)  # queued on the held thread
            finishing.cancel()
            with pytest.raises(asyncio.CancelledError):
                await finishing
        await asyncio.sleep(0.05)  # the thread's word on the job it never ran
        assert taken == []

        assert await impatient_store.update(record.id, data_write(0), now=t0)
        assert len(taken) == 1
    wal_index = wal_of(impatient_store)
    assert wal_index.frames() < 5  # the WAL started over


@linux_only
async def test_writes_that_find_the_file_busy_still_start_the_checkpoint(
    impatient_store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process holding the write lock sends every write to the thread."""
    _t0, record = await one_session(impatient_store)
    busy, loop_db = BusyForWrites(impatient_store._loop_db), impatient_store._loop_db
    impatient_store._loop_db = cast(sqlite3.Connection, busy)
    try:
        with counting_checkpoints(monkeypatch) as taken:
            await write_data(impatient_store, record.id, CHECKPOINT_PAGES + 10)
            assert len(taken) == 1
    finally:
        impatient_store._loop_db = loop_db
    assert busy.refused > CHECKPOINT_PAGES


def wal_salt(path: str) -> bytes:
    """The salts in the WAL file's own header: new each time the WAL starts over."""
    with open(f"{path}-wal", "rb") as wal:
        return wal.read(24)[16:24]


class CountingRestarts(WrappedConnection):
    """Runs everything, and counts the commits that started the WAL over."""

    def __init__(self, db: sqlite3.Connection | None, path: str) -> None:
        super().__init__(db)
        self.path = path
        self.restarts = 0

    def execute(self, sql: str, params: Any = ()) -> Any:
        before = wal_salt(self.path) if sql == "COMMIT" else b""
        cursor = self.db.execute(sql, params)
        if sql == "COMMIT" and wal_salt(self.path) != before:
            self.restarts += 1
        return cursor


@contextmanager
def counting_restarts_on_the_loop(store: SQLiteStore) -> Iterator[CountingRestarts]:
    """The store's event-loop connection, counting its commits that start the WAL over."""
    counting = CountingRestarts(store._loop_db, store.path)
    store._loop_db = cast(sqlite3.Connection, counting)
    try:
        yield counting
    finally:
        store._loop_db = counting.db


async def test_without_the_wal_index_header_the_loop_never_starts_the_wal_over(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the header the loop's connection cannot see a checkpoint's progress, so
    its checkpoints stay one step, writes queueing behind them. A copy in the
    background would leave the commit that starts the WAL over (and fsyncs) to the
    event loop whenever a write came after the copy took everything but before the
    store heard of it (here the thread is slow to report back, as behind a busy loop).
    """
    monkeypatch.setattr(WalIndexHeader, "find", classmethod(lambda cls, path: None))

    def slow_to_report(db: sqlite3.Connection) -> None:
        checkpoint(db)
        time.sleep(0.2)

    monkeypatch.setattr(checkpoints_module, "checkpoint", slow_to_report)
    t0 = start_time()
    record = make_record(now=t0)
    async with SQLiteStore(db_path) as store:
        await store.create(record, max_sessions=10, now=t0)
        with counting_restarts_on_the_loop(store) as counting:
            for i in itertools.count():
                assert await store.update(record.id, data_write(i), now=t0)
                if store._writer.checkpoints.due():
                    break
            await asyncio.sleep(0.05)  # a quiet moment, as between requests
            assert await store.update(record.id, data_write(-1), now=t0)
    assert counting.restarts == 0


async def test_without_the_header_a_checkpoint_comes_once_every_so_many_writes(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the WAL's length cannot be read, a checkpoint comes every CHECKPOINT_EVERY
    writes, counted afresh after each: counted on, every write after the first
    CHECKPOINT_EVERY would take a checkpoint of its own, and its fsync, on the writer thread.
    """
    monkeypatch.setattr(WalIndexHeader, "find", classmethod(lambda cls, path: None))
    async with SQLiteStore(db_path, timeout=0.2) as store:
        t0, record = await one_session(store)
        with counting_finishes(monkeypatch) as taken:
            for i in range(3 * CHECKPOINT_EVERY + 10):
                assert await store.update(record.id, data_write(i), now=t0)
    assert len(taken) == 3  # 3 * CHECKPOINT_EVERY + 10 writes after the login


@linux_only
async def test_a_copy_no_request_wrote_during_starts_the_wal_over_itself(
    impatient_store: SQLiteStore, db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between requests (a server that is not saturated) the copy takes every frame, and
    the writer thread starts the WAL over right after: no request waits for any of it.
    """
    t0, record = await one_session(impatient_store)
    db = sqlite3.connect(db_path)
    db.execute("PRAGMA user_version = 7")  # an app's, sharing the file
    db.commit()
    db.close()
    wal_index = wal_of(impatient_store)
    with counting_finishes(monkeypatch) as finishes:
        await write_until_a_copy_begins(impatient_store, record.id)
        generation = wal_index.generation()
        copy_done(impatient_store)
        assert wal_index.generation() != generation  # started over
        assert wal_index.frames() < 5

        recording = RecordingWrites(impatient_store._loop_db)
        impatient_store._loop_db = cast(sqlite3.Connection, recording)
        try:
            assert await impatient_store.update(record.id, data_write(-1), now=t0)
        finally:
            impatient_store._loop_db = recording.db
        assert recording.writes[0] == "BEGIN IMMEDIATE"  # on the loop, nothing to wait for
        assert recording.writes[-1] == "COMMIT"
    assert finishes == []
    assert impatient_store._writer._copying is None
    assert impatient_store._writer.checkpoints.counted() < 5
    got = await impatient_store.get(record.token_digest, now=t0)
    assert got is not None
    assert got.data["i"] == -1
    # The page it committed to start the WAL over is the header as it was.
    assert pragma(db_path, "user_version") == 7


@linux_only
async def test_a_copy_goes_again_over_what_came_while_it_ran(
    impatient_store: SQLiteStore, db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write lands during the copy's first round; the second finds a quiet moment."""
    t0, record = await one_session(impatient_store)
    wal_index = wal_of(impatient_store)
    rounds: list[int] = []

    def written_to_during_the_first(db: sqlite3.Connection) -> None:
        checkpoint(db)
        rounds.append(1)
        if len(rounds) == 1:  # another process's write, as the round ends
            other = sqlite3.connect(db_path, isolation_level=None)
            try:
                other.execute("PRAGMA wal_autocheckpoint = 0")
                other.execute(f"UPDATE {TABLE} SET device_name = device_name || '.'")  # noqa: S608
            finally:
                other.close()

    monkeypatch.setattr(checkpoints_module, "checkpoint", written_to_during_the_first)
    with counting_finishes(monkeypatch) as finishes:
        await write_until_a_copy_begins(impatient_store, record.id)
        generation = wal_index.generation()
        copy_done(impatient_store)
        assert rounds == [1, 1]
        assert wal_index.generation() != generation  # the second round started it over
        assert await impatient_store.update(record.id, data_write(-1), now=t0)
    assert finishes == []


@linux_only
async def test_a_copy_whose_restart_another_commit_forestalled_leaves_a_finish(
    impatient_store: SQLiteStore, db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another connection, inside its write transaction as the copy took every frame,
    commits first: on the snapshot it began with, its commit cannot start the WAL over,
    and the copy's own commit then only adds a page. The WAL goes on, and a request has
    to finish the checkpoint: the store must not count it as done.
    """
    t0, record = await one_session(impatient_store)
    wal_index = wal_of(impatient_store)
    # Another process's, as far as SQLite is concerned; committed from the writer thread.
    other = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)

    def forestalled(db: sqlite3.Connection, *, wait_ms: int) -> None:
        other.execute("COMMIT")
        start_wal_over(db, wait_ms=wait_ms)

    monkeypatch.setattr(checkpoints_module, "start_wal_over", forestalled)
    monkeypatch.setattr(checkpoints_module, "COPY_ROUNDS", 1)
    try:
        other.execute("PRAGMA wal_autocheckpoint = 0")
        with writer_thread_held(impatient_store):
            await write_until_a_copy_begins(impatient_store, record.id)
            other.execute("BEGIN IMMEDIATE")
            other.execute(f"UPDATE {TABLE} SET device_name = device_name || '.'")  # noqa: S608
        generation = wal_index.generation()
        copy_done(impatient_store)
    finally:
        other.close()
    assert wal_index.generation() == generation  # not started over
    assert impatient_store._writer.finish_due()

    assert await impatient_store.update(record.id, data_write(-1), now=t0)  # the finish
    assert wal_index.generation() != generation
    assert wal_index.frames() < 5


@linux_only
async def test_writes_during_a_finish_wait_for_it_and_then_run_on_the_loop(
    impatient_store: SQLiteStore,
) -> None:
    """Queued on the writer thread instead, each would wait for the GIL both ways from a
    loop that the other requests keep busy.
    """
    t0, record = await one_session(impatient_store)
    await copy_held_back_by_a_reader(impatient_store, record.id)
    recording = RecordingWrites(impatient_store._loop_db)
    impatient_store._loop_db = cast(sqlite3.Connection, recording)
    try:
        with writer_thread_held(impatient_store):
            finishing = asyncio.create_task(
                impatient_store.update(record.id, data_write(-1), now=t0)
            )
            await asyncio.sleep(0.05)  # the finish, with its write, queued on the thread
            waiting = [
                asyncio.create_task(impatient_store.update(record.id, data_write(i), now=t0))
                for i in range(5)
            ]
            await asyncio.sleep(0.05)
            assert not any(task.done() for task in waiting)
            assert recording.writes == []
        assert await finishing
        assert all(await asyncio.gather(*waiting))
    finally:
        impatient_store._loop_db = recording.db
    assert recording.writes.count("COMMIT") == 5  # each on the loop, after the finish
    got = await impatient_store.get(record.token_digest, now=t0)
    assert got is not None
    assert got.data["i"] == 4


async def test_a_write_between_a_finish_and_its_bookkeeping_does_not_finish_again(
    impatient_store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The thread is done with the finish, and the loop has not yet heard (its word waits
    in the loop's queue): a write that comes then runs as after the finish, not as the
    first of another.
    """
    t0, record = await one_session(impatient_store)
    await copy_held_back_by_a_reader(impatient_store, record.id)
    with counting_finishes(monkeypatch) as finishes:
        finishing = asyncio.create_task(impatient_store.update(record.id, data_write(1), now=t0))
        await asyncio.sleep(0)  # the finish handed to the thread
        job = impatient_store._writer._finishing
        assert job is not None
        job.result(timeout=5)  # done there; the loop, blocked here, has not run its word
        assert await impatient_store.update(record.id, data_write(2), now=t0)
        assert await finishing

    assert finishes == [1]
    got = await impatient_store.get(record.token_digest, now=t0)
    assert got is not None
    assert got.data["i"] == 2


@linux_only
async def test_a_finish_whose_write_fails_lets_the_writes_behind_it_run_and_logs_nothing(
    impatient_store: SQLiteStore, caplog: pytest.LogCaptureFixture
) -> None:
    """The failure is the request's own to hear (here its data is over the cap); the writes
    that waited run, and no unheard failure is left for asyncio to log.
    """
    t0, record = await one_session(impatient_store)
    await copy_held_back_by_a_reader(impatient_store, record.id)
    await a_failing_finish_with_writes_behind_it(impatient_store, record.id, t0)
    gc.collect()
    await asyncio.sleep(0)
    unheard = [r.getMessage() for r in caplog.records if "never retrieved" in r.getMessage()]
    assert [message for message in unheard if "DataTooLarge" in message] == []


@linux_only
async def test_a_copy_that_started_the_wal_over_is_taken_in_without_the_loop_turning(
    impatient_store: SQLiteStore,
) -> None:
    """Writes on the loop do not suspend: a run of them in one coroutine must still see the
    copy end, and begin the next checkpoint when due.
    """
    t0, record = await one_session(impatient_store)
    wal_index = wal_of(impatient_store)
    await write_until_a_copy_begins(impatient_store, record.id)
    copy_done(impatient_store)
    copying = impatient_store._writer._copying
    assert copying is not None
    assert copying.result() is not None  # started the WAL over, not yet taken in

    largest = 0
    for i in range(4 * CHECKPOINT_PAGES):
        assert await impatient_store.update(record.id, data_write(i), now=t0)
        largest = max(largest, wal_index.frames())
    assert largest < 2 * CHECKPOINT_PAGES + 8


@linux_only
async def test_a_copy_does_not_wait_long_for_a_write_lock_held_elsewhere(
    db_path: Path,
) -> None:
    """Another process holds the write lock as the copy would start the WAL over: it gives
    up within RESTART_WAIT_MS (a finish will do it), where waiting the store's whole
    timeout would hold up everything queued on the writer thread.
    """
    async with SQLiteStore(db_path, timeout=5.0) as store:
        _t0, record = await one_session(store)
        other = sqlite3.connect(db_path, isolation_level=None)
        try:
            with writer_thread_held(store):
                await write_until_a_copy_begins(store, record.id)
                other.execute("BEGIN IMMEDIATE")
            started = time.monotonic()
            copy_done(store)
            waited = time.monotonic() - started
        finally:
            other.close()
        assert waited < 2.0
        assert store._writer.finish_due()


@linux_only
async def test_after_the_copy_started_the_wal_over_writes_wait_the_stores_timeout_for_a_lock(
    db_path: Path,
) -> None:
    """The copy waits only RESTART_WAIT_MS for the write lock on the writer thread's
    connection; afterwards that connection must wait the store's timeout again, or a write
    meeting another process's lock there would fail after 20 ms.
    """
    async with SQLiteStore(db_path, timeout=5.0) as store:
        t0, record = await one_session(store)
        wal_index = wal_of(store)
        with writer_thread_held(store):  # the copy waits until the generation is read
            await write_until_a_copy_begins(store, record.id)
            generation = wal_index.generation()
        copy_done(store)
        assert wal_index.generation() != generation  # the copy started the WAL over

        with write_lock(db_path) as other:
            writing = asyncio.create_task(store.update(record.id, data_write(-1), now=t0))
            await asyncio.sleep(0.3)
            assert not writing.done()  # still waiting for the lock on the writer thread
            other.execute("ROLLBACK")
            assert await asyncio.wait_for(writing, timeout=10)
        got = await store.get(record.token_digest, now=t0)
        assert got is not None
        assert got.data["i"] == -1


async def test_without_the_header_a_finish_whose_write_changed_nothing_still_starts_the_wal_over(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its write failed (data over the cap) or changed no page: its commit cannot start the
    WAL over, and the writes that waited for it run on the loop, where without the header
    nothing would refuse the restarting commit (and its fsync).
    """
    monkeypatch.setattr(WalIndexHeader, "find", classmethod(lambda cls, path: None))
    async with SQLiteStore(db_path, timeout=0.2) as store:
        t0, record = await one_session(store)
        while not store._writer.checkpoints.due():
            assert await store.update(record.id, data_write(0), now=t0)
        with counting_restarts_on_the_loop(store) as counting:
            await a_failing_finish_with_writes_behind_it(store, record.id, t0)
    assert counting.restarts == 0


@linux_only
async def test_a_checkpoint_held_back_by_a_reader_is_not_retried_on_every_write(
    impatient_store: SQLiteStore, db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader on an old snapshot keeps the WAL from restarting, so it stays past
    CHECKPOINT_PAGES: the next attempt waits for that many pages more, as after one that
    copied everything, instead of every write hopping to the writer thread to try again.
    """
    _t0, record = await one_session(impatient_store)
    with reader_holding_a_snapshot(db_path), counting_checkpoints(monkeypatch) as taken:
        await write_data(impatient_store, record.id, CHECKPOINT_PAGES * 5 // 2)

        wal_index = wal_of(impatient_store)
        assert wal_index.frames() > 2 * CHECKPOINT_PAGES  # the WAL never restarted
        assert len(taken) == 2


class CheckpointsFail(WrappedConnection):
    """The writer thread's connection, whose checkpoints fail (as on a disk I/O error)."""

    failures = 0

    def execute(self, sql: str, params: Any = ()) -> Any:
        if sql.startswith("PRAGMA wal_checkpoint"):
            self.failures += 1
            exc = sqlite3.OperationalError("disk I/O error")
            exc.sqlite_errorcode = sqlite3.SQLITE_IOERR
            raise exc
        return self.db.execute(sql, params)


async def test_checkpoints_that_fail_let_the_wal_grow_and_fail_no_write(
    caching_store: SQLiteStore, db_path: Path
) -> None:
    """A checkpoint only keeps the WAL short: one that fails leaves it to grow until the
    next, and the request whose write it ran before (its finish) still succeeds.
    """
    store = caching_store
    t0, record = await one_session(store)
    # Enough for two checkpoints, by pages or, without the header, by writes.
    threshold = CHECKPOINT_PAGES if store._wal_index is not None else CHECKPOINT_EVERY
    writes = 2 * threshold + 10
    failing = CheckpointsFail(store._writer._db)
    store._writer._db = cast(sqlite3.Connection, failing)
    try:
        for i in range(writes):
            assert await store.update(record.id, data_write(i), now=t0)
            copying = store._writer._copying
            if copying is not None:  # done before the next write, which may finish it
                concurrent.futures.wait([copying])
    finally:
        store._writer._db = failing.db

    assert failing.failures >= 2
    assert wal_size(db_path) > writes * pragma(db_path, "page_size")  # a page for each write
    got = await store.get(record.token_digest, now=t0)
    assert got is not None
    assert got.data["i"] == writes - 1


async def test_the_writer_thread_checkpoints_every_so_many_pages(
    impatient_store: SQLiteStore,
) -> None:
    """Not at SQLite's default of 1000: every cleanup batch would copy and fsync its pages."""
    pages = await impatient_store._writer.run(
        lambda db: db.execute("PRAGMA wal_autocheckpoint").fetchone()[0]
    )

    assert pages == sqlite_module.BULK_CHECKPOINT_PAGES > 1000


async def test_the_wal_stays_bounded_under_a_cleanup(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer thread checkpoints once its batches have added BULK_CHECKPOINT_PAGES."""
    t0 = start_time()
    async with SQLiteStore(db_path) as store:
        for i in range(3000):
            record = make_record(now=t0 - 2 * TTL, user_id=f"user{i}")
            await store.create(record, max_sessions=10, now=t0 - 2 * TTL)
    # Closing the last connection checkpointed and removed the WAL: the cleanup starts on none.
    assert not has_wal(db_path)
    threshold = 64
    monkeypatch.setattr(sqlite_module, "BULK_CHECKPOINT_PAGES", threshold)
    page_size = pragma(db_path, "page_size")

    largest = deleted = 0
    async with SQLiteStore(db_path) as store:
        while count := await store.delete_expired(now=t0, limit=100):
            deleted += count
            largest = max(largest, wal_size(db_path))

    assert deleted == 3000
    # A batch of 100 adds about 50 pages here; the 30 batches without a checkpoint would
    # leave over 2000 pages in the WAL, and SQLite's default of 1000 over 1000.
    assert largest < (threshold + 3 * 100) * page_size


class RecordingWrites(WrappedConnection):
    """Runs everything, and keeps the write statements the event loop's connection ran."""

    def __init__(self, db: sqlite3.Connection | None) -> None:
        super().__init__(db)
        self.writes: list[str] = []
        self.refuse_write = getattr(db, "refuse_write", None)

    def execute(self, sql: str, params: Any = ()) -> Any:
        if not sql.lstrip().startswith(("SELECT", "PRAGMA")):
            self.writes.append(sql)
        return self.db.execute(sql, params)


async def checkpoint_by_another_connection(store: SQLiteStore, session_id: str) -> None:
    db = sqlite3.connect(store.path, isolation_level=None)
    try:
        _, logged, copied = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    finally:
        db.close()
    assert logged == copied > 0


async def copy_held_back_by_a_reader(store: SQLiteStore, session_id: str) -> None:
    """The store's copy done, but unable to take every frame (another connection read
    them meanwhile): the next write finishes the checkpoint.
    """
    # A copy begun before the reader (the writes that set the test up may leave one under
    # way) could take every frame the reader's snapshot leaves it: none may be running.
    copy_done(store)
    with reader_holding_a_snapshot(Path(store.path)):
        await write_until_a_copy_begins(store, session_id)
        copy_done(store)
    assert store._writer.finish_due()


@linux_only
async def test_the_commit_that_starts_the_wal_over_runs_on_the_writer_thread(
    impatient_store: SQLiteStore,
) -> None:
    """Once another connection's checkpoint copied the whole WAL, the next commit starts
    the WAL over and fsyncs its header: never on the event loop. Its connection finds out
    once its transaction has begun (no checkpoint can land in between), and hands over.
    """
    t0, record = await one_session(impatient_store)
    assert await impatient_store.update(record.id, data_write(0), now=t0)
    await checkpoint_by_another_connection(impatient_store, record.id)
    wal_index = wal_of(impatient_store)
    assert wal_index.all_checkpointed()

    recording = RecordingWrites(impatient_store._loop_db)
    impatient_store._loop_db = cast(sqlite3.Connection, recording)
    try:
        assert await impatient_store.update(record.id, data_write(1), now=t0)
        assert recording.writes == ["BEGIN IMMEDIATE", "ROLLBACK"]  # then the thread's turn
        assert not wal_index.all_checkpointed()
        assert 0 < wal_index.frames() < 5  # started over

        recording.writes.clear()
        assert await impatient_store.update(record.id, data_write(2), now=t0)
        assert recording.writes[0] == "BEGIN IMMEDIATE"  # the WAL in use again: inline
        assert recording.writes[-1] == "COMMIT"
        got = await impatient_store.get(record.token_digest, now=t0)
        assert got is not None
        assert got.data["i"] == 2
    finally:
        impatient_store._loop_db = recording.db


@linux_only
async def test_a_cleanups_pages_do_not_count_towards_the_requests_checkpoint(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch adds hundreds of pages to the WAL: counted towards CHECKPOINT_PAGES, the
    requests between batches would each take a checkpoint. The writer connection's own,
    at BULK_CHECKPOINT_PAGES, is there for them.
    """
    t0 = start_time()
    live = make_record(now=t0)
    async with SQLiteStore(db_path) as store:
        for i in range(6000):
            record = make_record(now=t0 - 2 * TTL, user_id=f"user{i}")
            await store.create(record, max_sessions=10, now=t0 - 2 * TTL)
        await store.create(live, max_sessions=10, now=t0)

    largest = 0
    async with SQLiteStore(db_path) as store:
        wal_index = wal_of(store)
        with counting_checkpoints(monkeypatch) as taken:
            for i in itertools.count():
                if not await store.delete_expired(now=t0, limit=1000):
                    break
                largest = max(largest, wal_index.frames())
                assert await store.update(live.id, data_write(i), now=t0)

    assert largest > CHECKPOINT_PAGES
    assert taken == []


@linux_only
async def test_pages_are_counted_afresh_once_the_wal_started_over(
    impatient_store: SQLiteStore, db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkpoint held back by a reader counts on from the WAL's length then; once the
    WAL started over (here after another connection's checkpoint), from its start.
    """
    _t0, record = await one_session(impatient_store)
    with counting_checkpoints(monkeypatch) as taken:
        with reader_holding_a_snapshot(db_path):
            await write_data(impatient_store, record.id, CHECKPOINT_PAGES + 10)
            assert len(taken) == 1  # held back: the WAL keeps every page
        await checkpoint_by_another_connection(impatient_store, record.id)

        await write_data(impatient_store, record.id, CHECKPOINT_PAGES + 10)
        assert len(taken) == 2


@linux_only
async def test_pages_are_counted_afresh_once_the_wal_started_over_and_outgrew_the_mark(
    impatient_store: SQLiteStore, db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another connection checkpoints, starts the WAL over and writes more pages than the
    WAL held when this store last tried: all of them are new, though the WAL is longer.
    """
    _t0, record = await one_session(impatient_store)
    wal_index = wal_of(impatient_store)
    with counting_checkpoints(monkeypatch) as taken:
        with reader_holding_a_snapshot(db_path):
            await write_data(impatient_store, record.id, CHECKPOINT_PAGES + 10)
        assert len(taken) == 1  # held back: counting goes on from about CHECKPOINT_PAGES
        mark = wal_index.frames()

        other = sqlite3.connect(db_path, isolation_level=None)
        one_page = f"UPDATE {TABLE} SET data = ? WHERE id = ?"  # noqa: S608 - our table
        try:
            other.execute("PRAGMA wal_autocheckpoint = 0")
            other.execute("PRAGMA wal_checkpoint(PASSIVE)")
            for i in range(mark + CHECKPOINT_PAGES // 2):
                other.execute(one_page, (f'{{"i":{i}}}', record.id))
        finally:
            other.close()
        assert mark < wal_index.frames() < mark + CHECKPOINT_PAGES  # a count from the mark: not due

        await write_data(impatient_store, record.id, 2)  # the copy, then the finish
        assert len(taken) == 2


@linux_only
async def test_a_cleanup_queued_behind_a_checkpoint_moves_the_count_on_once(
    impatient_store: SQLiteStore,
) -> None:
    """The pages of work that ran on the writer thread after the checkpoint, before the
    event loop took its result, are the cleanup's own: counted out once, not twice.
    """
    t0 = start_time()
    for i in range(2000):
        expired = make_record(now=t0 - 2 * TTL, user_id=f"user{i}")
        await impatient_store.create(expired, max_sessions=10, now=t0 - 2 * TTL)
    record = make_record(now=t0)
    await impatient_store.create(record, max_sessions=10, now=t0)
    await copy_held_back_by_a_reader(impatient_store, record.id)
    writer_thread = impatient_store._writer._pool
    wal_index = impatient_store._wal_index
    assert writer_thread is not None
    assert wal_index is not None

    write = asyncio.create_task(impatient_store.update(record.id, data_write(-1), now=t0))
    cleanup = asyncio.create_task(impatient_store.delete_expired(now=t0, limit=2000))
    await asyncio.sleep(0)  # both handed to the writer thread, the checkpoint first
    writer_thread.submit(lambda: None).result()  # both ran before the loop sees either
    assert await write
    assert await cleanup == 2000

    assert 0 <= impatient_store._writer.checkpoints.counted() < 10  # the write's pages
    assert not impatient_store._writer.checkpoints.due()


@linux_only
async def test_a_cleanup_queued_before_a_finish_moves_the_count_on_once(
    impatient_store: SQLiteStore, db_path: Path
) -> None:
    """The other order: the finish's word reaches the loop before the cleanup's, its mark
    already past the cleanup's pages (a reader keeps the WAL from starting over).
    """
    t0 = start_time()
    for i in range(2000):
        expired = make_record(now=t0 - 2 * TTL, user_id=f"user{i}")
        await impatient_store.create(expired, max_sessions=10, now=t0 - 2 * TTL)
    _t0, record = await one_session(impatient_store)
    writer_thread = impatient_store._writer._pool
    assert writer_thread is not None
    with reader_holding_a_snapshot(db_path):
        await copy_held_back_by_a_reader(impatient_store, record.id)
        cleanup = asyncio.create_task(impatient_store.delete_expired(now=t0, limit=2000))
        write = asyncio.create_task(impatient_store.update(record.id, data_write(-1), now=t0))
        await asyncio.sleep(0)  # both handed to the writer thread, the cleanup first
        writer_thread.submit(lambda: None).result()
        assert await write
        assert await cleanup == 2000

        assert 0 <= impatient_store._writer.checkpoints.counted() < 10


@pytest.mark.parametrize("reopened", [True, False])
def test_checkpoints_go_on_on_another_loop_once_a_finish_outlived_its_own(
    db_path: Path, monkeypatch: pytest.MonkeyPatch, reopened: bool
) -> None:
    """A finish still running when its event loop ended cannot tell that loop; the store,
    used on another loop (closed and opened again there, or not), must still finish its
    checkpoints.
    """
    if sys.platform != "linux":
        pytest.skip(ON_LINUX_ONLY)
    store = SQLiteStore(db_path, timeout=0.2)
    gate = threading.Event()

    def held_finish(db: sqlite3.Connection, work: Any) -> Any:
        gate.wait(10)
        return checkpoint_then(db, work)

    async def first_loop() -> None:
        await store.open()
        t0, record = await one_session(store)
        await copy_held_back_by_a_reader(store, record.id)
        with monkeypatch.context() as patch:
            patch.setattr(writer_module, "checkpoint_then", held_finish)
            finishing = asyncio.create_task(store.update(record.id, data_write(1), now=t0))
            await asyncio.sleep(0.05)
        assert store._writer._finishing is not None
        assert not finishing.done()  # left behind when this loop ends

    asyncio.run(first_loop())
    gate.set()
    assert store._writer._pool is not None
    store._writer._pool.submit(lambda: None).result()  # the finish ran; its loop is gone

    async def second_loop() -> None:
        if reopened:
            await store.close()
        async with store:
            t0, record = await one_session(store)
            await copy_held_back_by_a_reader(store, record.id)
            held_back = store._writer._copying
            assert await store.update(record.id, data_write(2), now=t0)  # finishes it
            assert store._writer._copying is not held_back

    asyncio.run(second_loop())


async def test_the_wal_file_shrinks_back_after_a_cleanup(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkpoint empties the WAL but keeps its file; the next restart cuts it back."""
    t0 = start_time()
    page_size = 4096
    monkeypatch.setattr(sqlite_module, "BULK_CHECKPOINT_PAGES", 64)
    monkeypatch.setattr(sqlite_module, "WAL_SIZE_LIMIT", 16 * page_size)
    async with SQLiteStore(db_path) as store:
        for i in range(1000):
            record = make_record(now=t0 - 2 * TTL, user_id=f"user{i}")
            await store.create(record, max_sessions=10, now=t0 - 2 * TTL)
        # The WAL file's largest size during the cleanup: the writer's own checkpoints may
        # start it over (and cut it back) between batches, the last one included.
        during_cleanup = 0
        while await store.delete_expired(now=t0, limit=100):
            during_cleanup = max(during_cleanup, wal_size(db_path))
        # Whether the cleanup's own last checkpoint came after its last batch depends on
        # where the WAL stood when it began: one more, so that it did.
        await checkpoint_by_another_connection(store, "")
        # The first write after it starts the WAL over (a login adds 5 pages to it).
        live = make_record(now=t0)
        await store.create(live, max_sessions=10, now=t0)

        assert during_cleanup > 32 * page_size
        assert wal_size(db_path) <= 16 * page_size
        assert await store.get(live.token_digest, now=t0) == live


# -- damaged files ----------------------------------------------------------------------


def fill_with_garbage(path: Path) -> None:
    path.write_bytes(os.urandom(8192))


def scribble_over_pages(path: Path) -> None:
    """Overwrite every page but the first (the schema) and the store's schema table's (its
    one row): the file still opens, and the session table and its indexes are garbage."""
    page_size = pragma(path, "page_size")
    db = sqlite3.connect(path)
    try:
        (spared,) = db.execute(
            "SELECT rootpage FROM sqlite_master WHERE name = ?", (SCHEMA_TABLE,)
        ).fetchone()
    finally:
        db.close()
    size = path.stat().st_size
    assert size > 3 * page_size
    with path.open("r+b") as file:
        for page in range(2, size // page_size + 1):
            if page != spared:
                file.seek((page - 1) * page_size)
                file.write(b"\xff" * page_size)


async def test_file_that_is_not_a_database_gives_store_unavailable(db_path: Path) -> None:
    fill_with_garbage(db_path)
    store = SQLiteStore(db_path)

    with pytest.raises(StoreUnavailable) as raised:
        await store.open()

    assert isinstance(raised.value.__cause__, sqlite3.DatabaseError)
    assert str(db_path) not in raised.value.message  # details go to the log, not to clients
    assert not store.is_open


async def test_damaged_pages_give_store_unavailable(db_path: Path) -> None:
    t0 = start_time()
    records = [make_record(now=t0, user_id=f"user{i}", data={"x": "y" * 200}) for i in range(40)]
    async with SQLiteStore(db_path) as store:
        for record in records:
            await store.create(record, max_sessions=10, now=t0)
    scribble_over_pages(db_path)

    async with SQLiteStore(db_path) as store:
        with pytest.raises(StoreUnavailable):
            await store.get(records[0].token_digest, now=t0)
        with pytest.raises(StoreUnavailable):
            await store.list_for_user("user1", now=t0)
        with pytest.raises(StoreUnavailable):
            await store.create(make_record(now=t0), max_sessions=10, now=t0)
        with pytest.raises(StoreUnavailable):  # on a thread and connection of its own
            await store.stats(now=t0)


@pytest.mark.parametrize("where", ["directory", "missing_parent"])
async def test_unopenable_path_gives_store_unavailable(
    tmp_path: Path, where: str, caplog: pytest.LogCaptureFixture
) -> None:
    if where == "directory":
        path = tmp_path / "sessions.db"
        path.mkdir()
    else:
        path = tmp_path / "missing" / "sessions.db"
    store = SQLiteStore(path)

    with (
        caplog.at_level("WARNING", logger="authsessions"),
        pytest.raises(StoreUnavailable) as raised,
    ):
        await store.open()

    assert isinstance(raised.value.__cause__, sqlite3.OperationalError)
    assert not store.is_open
    # The operator learns why, not only the error's type.
    assert "OperationalError: unable to open database file" in caplog.text


async def test_an_event_loop_connection_that_cannot_open_gives_store_unavailable(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer thread's connection opened and the event loop's did not (out of file
    descriptors, say): open() fails as any store failure does, and leaves the store
    closed, its writer thread's connection closed again.
    """

    def unable_to_open(path: str) -> Any:
        raise sqlite3.OperationalError("unable to open database file")

    monkeypatch.setattr(sqlite_module, "_connect_loop_db", unable_to_open)
    store = SQLiteStore(db_path)

    with pytest.raises(StoreUnavailable) as raised:
        await store.open()

    assert isinstance(raised.value.__cause__, sqlite3.OperationalError)
    assert not store.is_open
    assert store._writer._db is None
    monkeypatch.undo()
    async with store:  # opens once the connection does
        t0, record = await one_session(store)
        assert await store.get(record.token_digest, now=t0) == record


@contextmanager
def mount_of_its_own(folder: Path) -> Iterator[Callable[[str], None]]:
    """``folder`` bind-mounted over itself, and a function remounting it ``"ro"`` or
    ``"rw"``: a file system made read-only under an open store, as an operator's mistake
    (or a restore with another owner) makes it."""
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        pytest.skip("a read-only bind mount needs root on Linux")
    if subprocess.run(["mount", "--bind", folder, folder], capture_output=True).returncode:
        pytest.skip("mount --bind is not allowed here")

    def remount(mode: str) -> None:
        subprocess.run(["mount", "-o", f"remount,bind,{mode}", folder], check=True)

    try:
        yield remount
    finally:
        subprocess.run(["umount", folder], check=True)


@contextlib.asynccontextmanager
async def another_process_holding(path: Path) -> AsyncIterator[None]:
    """Another process (a worker of the app) with the SQLite file open, which keeps its
    ``-wal`` and ``-shm`` in place."""
    holding = (
        "import sqlite3, sys; db = sqlite3.connect(sys.argv[1]);"
        " db.execute('SELECT count(*) FROM authsessions_session').fetchall();"
        " print('open', flush=True); sys.stdin.read()"
    )
    other = await asyncio.create_subprocess_exec(
        sys.executable, "-c", holding, str(path), stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert other.stdout is not None
        assert await other.stdout.readline() == b"open\n"
        yield
    finally:
        await other.communicate(b"")


def files_open_under(folder: Path) -> list[str]:
    """The files under ``folder`` this process has open."""
    opened = (os.path.realpath(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd"))
    return [name for name in opened if name.startswith(f"{folder}/")]


@contextlib.asynccontextmanager
async def opened_while_read_only(
    folder: Path, kept: SessionRecord, opened_as: Path | None = None
) -> AsyncIterator[tuple[SQLiteStore, Callable[[str], None]]]:
    """A store opened on ``folder``'s ``sessions.db`` (holding ``kept``), by that path or
    ``opened_as``, while the folder is mounted read-only, and the function remounting it
    ``"ro"`` or ``"rw"``."""
    path = folder / "sessions.db"
    async with SQLiteStore(path) as creating:
        await creating.create(kept, max_sessions=10, now=kept.created_at)
    # Another worker keeps -wal and -shm there, so the file opens read-only. Started before
    # the mount: files open for writing under it would refuse the read-only remount.
    async with another_process_holding(path):
        store = SQLiteStore(opened_as or path)
        with mount_of_its_own(folder) as remount:
            try:
                remount("ro")
                await store.open()
                yield store, remount
            finally:
                remount("rw")
                await store.close()


async def reads_beside_failing_writes(store: SQLiteStore, digest: str, now: float) -> int:
    """How many of 200 reads of the session ``digest`` failed while touches of it failed."""
    failed = 0
    record = await store.get(digest, now=now)
    assert record is not None

    async def read() -> None:
        nonlocal failed
        for _ in range(100):
            try:
                assert await store.get(digest, now=now) is not None
            except StoreUnavailable:
                failed += 1
            await asyncio.sleep(0)

    async def touch() -> None:
        for step in range(20):
            update = SessionUpdate(last_active_at=now + step, expires_at=now + TTL + step)
            with contextlib.suppress(StoreUnavailable):
                await store.update(record.id, update, now=now)
            await asyncio.sleep(0)

    await asyncio.gather(read(), read(), touch())
    return failed


@pytest.mark.parametrize("opened_as", ["the file", "a symlink in a read-only folder"])
async def test_a_store_opened_while_its_file_was_read_only_writes_once_it_is_writable(
    tmp_path: Path, opened_as: str
) -> None:
    """SQLite opens a file it may not write read-only, without a word, and a process's
    connections to the file share that state while any of them is open: every write was
    a 503 until the process restarted. (SQLite keeps -wal and -shm beside the file a
    symlink names: what may be written is judged there.)"""
    t0 = start_time()
    kept, fresh, expired = make_record(now=t0), make_record(now=t0), make_record(now=t0 - 2 * TTL)
    data, links = tmp_path / "sessions", tmp_path / "links"
    data.mkdir()
    links.mkdir()
    (links / "sessions.db").symlink_to(data / "sessions.db")
    link = links / "sessions.db" if opened_as != "the file" else None
    async with contextlib.AsyncExitStack() as mounts:
        if link is not None:
            mounts.enter_context(mount_of_its_own(links))("ro")
        async with opened_while_read_only(data, kept, link) as (store, remount):
            await written_once_writable(store, remount, kept, fresh, expired)
    async with SQLiteStore(data / "sessions.db") as reading:
        assert await reading.get(fresh.token_digest, now=t0) == fresh


async def written_once_writable(
    store: SQLiteStore,
    remount: Callable[[str], None],
    kept: SessionRecord,
    fresh: SessionRecord,
    expired: SessionRecord,
) -> None:
    """Writes to ``store``, opened read-only, fail without failing reads; once the folder is
    writable (``remount``), the first of them succeed."""
    t0 = kept.created_at
    with pytest.raises(StoreUnavailable):
        await store.create(make_record(now=t0), max_sessions=10, now=t0)
    with pytest.raises(StoreUnavailable):  # on the writer thread
        await store.delete_expired(now=t0, limit=10)
    # While it stays read-only, failing writes leave reads alone (connections opened
    # anew would be read-only too, and reads meanwhile 503s).
    assert await reads_beside_failing_writes(store, kept.token_digest, t0) == 0
    remount("rw")
    # The first writes after the fix succeed, on the event loop and the thread.
    await store.create(fresh, max_sessions=10, now=t0)
    await store.create(expired, max_sessions=10, now=expired.created_at)
    assert await store.delete_expired(now=t0, limit=10) == 1


async def test_a_close_while_the_connections_reopen_leaves_none_open(tmp_path: Path) -> None:
    """The writer thread's reopened connection was kept after close() had let go of the
    old one: the file stayed open (a mount could not go), and an open() meanwhile would
    find a connection of another thread."""
    t0 = start_time()
    folder = tmp_path / "sessions"
    folder.mkdir()
    async with opened_while_read_only(folder, make_record(now=t0)) as (store, remount):
        remount("rw")
        reopen = store._writer._reconnect

        def slow_reopen() -> sqlite3.Connection:
            time.sleep(0.3)  # as on a slow disk: the close comes meanwhile
            return reopen()

        store._writer._reconnect = slow_reopen
        write = asyncio.ensure_future(store.create(make_record(now=t0), max_sessions=10, now=t0))
        await asyncio.sleep(0.1)
        await store.close()
        with contextlib.suppress(StoreUnavailable, RuntimeError):
            await write
        assert store._writer._db is None
        assert not files_open_under(folder)


async def test_a_write_cancelled_while_the_connections_reopen_leaves_them_reopened(
    tmp_path: Path,
) -> None:
    """The reconnect ran in the write's own task: cancelled with it (a client gone), it
    stopped halfway, and writes stayed 503s until the next reconnect was allowed."""
    t0 = start_time()
    folder = tmp_path / "sessions"
    folder.mkdir()
    kept = make_record(now=t0)
    async with opened_while_read_only(folder, kept) as (store, remount):
        assert await store.get(kept.token_digest, now=t0) == kept
        remount("rw")
        reconnecting = asyncio.Event()
        reconnect_all = store._reconnect_all

        async def noted_reconnect_all() -> None:
            reconnecting.set()
            await reconnect_all()

        store._reconnect_all = noted_reconnect_all  # type: ignore[method-assign]
        # The writer thread busy (a cleanup's batch, say): the reconnect waits its turn.
        busy = store._writer._pool.submit(time.sleep, 0.3)  # type: ignore[union-attr]
        write = asyncio.ensure_future(store.create(make_record(now=t0), max_sessions=10, now=t0))
        await reconnecting.wait()
        await asyncio.sleep(0)
        write.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await write
        await asyncio.wrap_future(busy)
        await asyncio.sleep(0.1)  # the reconnect, done on its own
        fresh = make_record(now=t0)
        await store.create(fresh, max_sessions=10, now=t0)
        assert await store.get(fresh.token_digest, now=t0) == fresh


_FORKED_WHILE_THE_CONNECTIONS_REOPEN = """
import asyncio, gc, os, subprocess, sys, time
from authsessions.stores import SQLiteStore
from tests.stores.records import make_record, start_time

path = sys.argv[1]
folder = os.path.dirname(path)

def files_open() -> list[str]:
    opened = (os.path.realpath(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd"))
    return [name for name in opened if name.startswith(folder + "/")]

async def main() -> None:
    t0 = start_time()
    store = SQLiteStore(path)
    await store.open()  # read-only: the folder is mounted so
    subprocess.run(["mount", "-o", "remount,bind,rw", folder], check=True)
    store._writer._pool.submit(time.sleep, 0.3)  # the writer thread busy, as with a cleanup
    write = asyncio.ensure_future(store.create(make_record(now=t0), max_sessions=10, now=t0))
    while store._reconnecting is None:
        await asyncio.sleep(0)
    gc.collect()
    gc.disable()  # what the store closes, not what the collector would
    reading, writing = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(writing, repr(files_open()).encode())
        os._exit(0)
    os.close(writing)
    await write
    await store.close()
    in_parent = files_open()
    os.waitpid(pid, 0)
    in_child = os.read(reading, 10_000).decode()
    print("child", in_child, "parent", in_parent, flush=True)
    assert in_child == "[]", "a connection crossed the fork"
    assert not in_parent, "close() left connections open"

asyncio.run(main())
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork() here")
async def test_a_fork_while_the_connections_reopen_leaves_none_to_cross_it(
    tmp_path: Path,
) -> None:
    """The writer thread's reconnect, queued behind other work as the process forked,
    opened a connection the fork did not close (the child inherited it, and the parent's
    close() missed it), and the event loop's was opened twice."""
    folder = tmp_path / "sessions"
    folder.mkdir()
    path = folder / "sessions.db"
    t0 = start_time()
    async with SQLiteStore(path) as creating:
        await creating.create(make_record(now=t0), max_sessions=10, now=t0)
    async with another_process_holding(path):
        with mount_of_its_own(folder) as remount:
            try:
                remount("ro")
                done = await asyncio.to_thread(
                    run_in_a_process_of_its_own, _FORKED_WHILE_THE_CONNECTIONS_REOPEN, path
                )
            finally:
                remount("rw")

    assert done.returncode == 0, done.stdout + done.stderr
    assert "child [] parent []" in done.stdout


def test_two_threads_each_on_a_loop_of_its_own_share_one_store(db_path: Path) -> None:
    """An app's loop and an admin job's loop (``asyncio.run`` on a thread) at the same
    time, each thread starting loop after loop: they shared the event loop's connection,
    a transaction begun by one failed inside the other's, and one reopening the
    connection under the other's statement crashed the process."""
    t0 = start_time()
    store = SQLiteStore(db_path, timeout=10)
    records = [make_record(now=t0, user_id=f"user{n}") for n in range(10)]

    async def create_all() -> None:
        await store.open()
        for record in records:
            await store.create(record, max_sessions=10, now=t0)

    asyncio.run(create_all())
    failures: list[BaseException] = []
    written: dict[str, set[str]] = {record.id: set() for record in records}

    def serve(worker: int) -> None:
        async def requests(batch: int) -> None:
            for n in range(batch * 10, batch * 10 + 10):
                record, key = records[n % len(records)], f"w{worker}-{n}"
                update = make_update(now=t0 + 1, set_keys={key: n}, moves_expiry=False)
                assert await store.update(record.id, update, now=t0 + 1)
                written[record.id].add(key)
                found = await store.get(record.token_digest, now=t0 + 1)
                assert found is not None
                assert key in found.data
                await asyncio.sleep(0)

        try:
            for batch in range(100):  # a loop of its own for each batch, as each job's
                asyncio.run(requests(batch))
        except BaseException as exc:  # reported by the test below
            failures.append(exc)

    threads = [threading.Thread(target=serve, args=(worker,)) for worker in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)

    async def stored() -> dict[str, set[str]]:
        found = {}
        for record in records:
            got = await store.get(record.token_digest, now=t0 + 1)
            assert got is not None
            found[record.id] = set(got.data)
        await store.close()
        return found

    assert failures == []
    assert all(written[id_] <= keys for id_, keys in asyncio.run(stored()).items())


def test_a_store_in_use_by_another_threads_running_loop_is_not_closed_under_it(
    db_path: Path,
) -> None:
    """An admin job's ``async with store`` on a thread of its own closed the app's store
    as it ended, under a statement of the app's loop (which crashed the process)."""
    t0 = start_time()
    store = SQLiteStore(db_path)
    record = make_record(now=t0)
    app_loop = asyncio.new_event_loop()
    app_thread = threading.Thread(target=app_loop.run_forever, daemon=True)
    app_thread.start()

    def on_app_loop(call: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(call, app_loop).result(timeout=30)

    try:
        on_app_loop(store.open())
        on_app_loop(store.create(record, max_sessions=10, now=t0))

        with pytest.raises(RuntimeError, match="in use by an event loop running on another"):
            asyncio.run(store.close())

        assert on_app_loop(store.get(record.token_digest, now=t0)) == record
        on_app_loop(store.close())
    finally:
        app_loop.call_soon_threadsafe(app_loop.stop)
        app_thread.join(timeout=10)
        app_loop.close()
    assert not store.is_open
