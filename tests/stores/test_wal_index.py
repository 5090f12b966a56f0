"""The WAL-index header SQLiteStore's cache is checked by, against real commits of other processes.

The cache's own behaviour, under this check and under ``PRAGMA data_version``,
is in test_sqlite.py.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import sqlite3
import struct
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from authsessions.stores import SQLiteStore
from authsessions.stores._sqlite_schema import TABLE
from authsessions.stores._wal_index import WalIndexHeader
from tests.stores import ON_LINUX_ONLY, linux_only
from tests.stores.records import make_record, start_time

REGION_SIZE = 32768  # of the WAL index, mapped one region at a time


def shm_size(store: SQLiteStore) -> int:
    """Bytes of the WAL index (a stat: no descriptor is opened on the file)."""
    return os.stat(f"{store.path}-shm").st_size


def copies_of(first: bytes, second: bytes) -> ctypes.Array[ctypes.c_char]:
    """A buffer of our own laid out as the header's two 48-byte copies."""
    buffer = (ctypes.c_char * 96)()
    buffer.raw = first + second
    return buffer


# -- reading the two copies ----------------------------------------------------------------


def test_equal_copies_are_the_version() -> None:
    buffer = copies_of(b"a" * 48, b"a" * 48)
    header = WalIndexHeader(buffer)

    assert header.version() == header.version() == b"a" * 96

    buffer.raw = b"b" * 96  # a commit rewrote both copies
    assert header.version() == b"b" * 96


def test_copies_that_differ_are_a_version_equal_to_none() -> None:
    """A writer halfway through (second copy written, first not yet): no cache may trust
    this moment, so the version matches neither what came before nor itself later."""
    before = b"a" * 48
    buffer = copies_of(before, before)
    header = WalIndexHeader(buffer)
    settled = header.version()

    buffer.raw = before + b"b" * 48
    halfway = header.version()

    assert halfway != settled
    assert halfway != header.version()
    assert not isinstance(halfway, bytes)


def header_version(commits: int) -> bytes:
    """A settled version whose iChange (the word at byte 8) is ``commits``."""
    copy = bytes(8) + struct.pack("=I", commits) + bytes(36)
    return WalIndexHeader(copies_of(copy, copy)).version()  # type: ignore[return-value]


@pytest.mark.parametrize(
    ("earlier", "later", "between"),
    [(7, 8, 1), (7, 7, 0), (7, 10, 3), (2**32 - 1, 0, 1), (2**32 - 2, 1, 3)],
    ids=["one", "none", "three", "wrapped-one", "wrapped-three"],
)
def test_commits_between_counts_on_across_the_counters_wrap(
    earlier: int, later: int, between: int
) -> None:
    """iChange is a 32-bit counter: after 2**32 commits it starts again from 0, and the
    commit that wraps it is one commit like any other."""
    assert WalIndexHeader.commits_between(header_version(earlier), header_version(later)) == (
        between
    )


def test_commits_between_a_torn_version_is_unknown() -> None:
    torn = WalIndexHeader(copies_of(b"a" * 48, b"b" * 48)).version()

    assert WalIndexHeader.commits_between(torn, header_version(1)) is None
    assert WalIndexHeader.commits_between(header_version(1), torn) is None


def test_a_buffer_of_another_size_is_refused() -> None:
    with pytest.raises(ValueError, match="96 bytes"):
        WalIndexHeader((ctypes.c_char * 48)())
    with pytest.raises(ValueError, match="4 bytes"):
        WalIndexHeader(copies_of(b"a" * 48, b"a" * 48), (ctypes.c_char * 8)())


def test_without_the_checkpoint_info_the_wal_is_never_taken_for_checkpointed() -> None:
    """Unknown counts as not checkpointed: taken as checkpointed, every write of the store
    would go to its writer thread."""
    header = WalIndexHeader(copies_of(bytes(48), bytes(48)))  # mxFrame 0: an empty WAL

    assert header.frames() == 0
    assert not header.all_checkpointed()


# -- finding SQLite's own mapping ----------------------------------------------------------


def wal_database(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("CREATE TABLE IF NOT EXISTS t (x)")
    return db


@linux_only
def test_the_header_moves_with_every_commit_of_another_connection(tmp_path: Path) -> None:
    path = tmp_path / "wal.db"
    reader, writer = wal_database(path), sqlite3.connect(path, isolation_level=None)
    try:
        header = WalIndexHeader.find(str(path))
        assert header is not None
        seen = [header.version()]
        for value in range(3):
            writer.execute("INSERT INTO t VALUES (?)", (value,))
            seen.append(header.version())
            reader.execute("SELECT COUNT(*) FROM t").fetchone()  # a read changes nothing
            assert header.version() == seen[-1]
        assert len(set(seen)) == len(seen)
    finally:
        reader.close()
        writer.close()


@linux_only
def test_frames_and_checkpoint_progress_are_what_sqlite_counts(tmp_path: Path) -> None:
    path = tmp_path / "wal.db"
    reader, writer = wal_database(path), sqlite3.connect(path, isolation_level=None)
    try:
        writer.execute("PRAGMA wal_autocheckpoint = 0")
        header = WalIndexHeader.find(str(path))
        assert header is not None
        writer.execute("INSERT INTO t VALUES (-1)")
        generation = header.generation()
        for value in range(50):
            writer.execute("INSERT INTO t VALUES (?)", (value,))
        assert not header.all_checkpointed()
        # The log column: frames in the WAL, which a PASSIVE checkpoint copies but keeps.
        _, logged, copied = writer.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        assert header.frames() == logged == copied >= 50
        assert header.all_checkpointed()
        assert header.generation() == generation  # the same WAL, all of it copied

        writer.execute("INSERT INTO t VALUES (50)")  # everything was copied: a restart
        assert 0 < header.frames() < 5
        assert not header.all_checkpointed()
        assert header.generation() != generation
    finally:
        reader.close()
        writer.close()


@linux_only
def test_a_link_to_the_database_finds_the_same_header(tmp_path: Path) -> None:
    path = tmp_path / "wal.db"
    (tmp_path / "link.db").symlink_to(path)
    db = wal_database(path)
    try:
        found, through_link = (
            WalIndexHeader.find(str(path)),
            WalIndexHeader.find(str(tmp_path / "link.db")),
        )
        assert found is not None
        assert through_link is not None
        assert found.version() == through_link.version()
    finally:
        db.close()


def test_no_header_without_a_connection_of_this_process(tmp_path: Path) -> None:
    """With the last connection closed SQLite unmaps the file: nothing may be read there."""
    path = tmp_path / "wal.db"
    wal_database(path).close()

    assert WalIndexHeader.find(str(path)) is None


def test_no_header_for_a_database_not_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "rollback.db"
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("CREATE TABLE t (x)")
        assert WalIndexHeader.find(str(path)) is None
    finally:
        db.close()


# -- SQLiteStore against another process that commits -----------------------------------

# Sets the session's data to {"i": i} for i = 1, 2, ... in one transaction each, through a
# connection of its own, printing i once the commit returned. In step mode it waits for a
# line on stdin after each one. Only every `restart_every` commits does it checkpoint and
# restart the WAL (new salts): in between, the WAL index outgrows its first 32 KiB region
# (4,062 frames), and SQLite maps more regions.
WRITER = """
import sqlite3, sys
path, table, session_id, count, restart_every, step = sys.argv[1:7]
update = "UPDATE " + table + " SET data = ? WHERE id = ?"
db = sqlite3.connect(path, isolation_level=None, timeout=10)
db.execute("PRAGMA synchronous = NORMAL")
db.execute("PRAGMA wal_autocheckpoint = 0")
for i in range(1, int(count) + 1):
    db.execute(update, ('{"i": %d}' % i, session_id))
    print(i, flush=True)
    if i % int(restart_every) == 0:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    if step == "step" and not sys.stdin.readline():
        break
db.close()
"""


@pytest.fixture
async def header_store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    if sys.platform != "linux":
        pytest.skip(ON_LINUX_ONLY)
    async with SQLiteStore(tmp_path / "sessions.db") as store:
        assert store._wal_index is not None
        yield store


def start_writer(
    store: SQLiteStore, session_id: str, *, count: int, restart_every: int, step: bool
) -> subprocess.Popen[str]:
    mode = "step" if step else "run"
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            WRITER,
            store.path,
            TABLE,
            session_id,
            str(count),
            str(restart_every),
            mode,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


async def test_every_commit_of_another_process_is_seen_by_the_next_get(
    header_store: SQLiteStore,
) -> None:
    """Commit, then get, in lock step: a get after a commit returned never answers from
    before it, while the WAL index grows past its first region and after the WAL restarts.
    """
    t0 = start_time()
    record = make_record(now=t0, data={"i": 0})
    await header_store.create(record, max_sessions=10, now=t0)
    assert await header_store.get(record.token_digest, now=t0) == record

    writer = start_writer(header_store, record.id, count=6000, restart_every=5000, step=True)
    assert writer.stdin is not None
    assert writer.stdout is not None
    try:
        for line in writer.stdout:
            got = await header_store.get(record.token_digest, now=t0)
            assert got is not None
            assert got.data == {"i": int(line)}
            writer.stdin.write("next\n")
            writer.stdin.flush()
    finally:
        writer.stdin.close()
        assert writer.wait(timeout=60) == 0
    assert int(line) == 6000
    assert shm_size(header_store) > REGION_SIZE


async def test_gets_while_another_process_commits_never_go_back(
    header_store: SQLiteStore,
) -> None:
    """The writer runs free, so gets also meet its header halfway written. Each get must
    show at least the last commit the writer had announced when the get began.
    """
    t0 = start_time()
    record = make_record(now=t0, data={"i": 0})
    await header_store.create(record, max_sessions=10, now=t0)
    announced = 0

    writer = start_writer(header_store, record.id, count=20_000, restart_every=6000, step=False)
    assert writer.stdout is not None
    stdout = writer.stdout

    def follow() -> None:
        nonlocal announced
        for line in stdout:
            announced = int(line)

    follower = threading.Thread(target=follow)
    follower.start()
    gets = 0
    try:
        while follower.is_alive():
            before = announced
            got = await header_store.get(record.token_digest, now=t0)
            assert got is not None
            assert got.data["i"] >= before
            gets += 1
            if gets % 100 == 0:
                await asyncio.sleep(0)
    finally:
        follower.join(timeout=60)
        assert writer.wait(timeout=60) == 0
    assert announced == 20_000
    got = await header_store.get(record.token_digest, now=t0)
    assert got is not None
    assert got.data == {"i": 20_000}
    assert shm_size(header_store) > REGION_SIZE


def run_python(code: str, *args: str) -> str:
    """Run ``code`` in another process (whose descriptors on SQLite's files are its own)."""
    completed = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, check=True
    )
    return completed.stdout


async def test_the_header_is_the_one_in_the_shm_file(header_store: SQLiteStore) -> None:
    """The mapping found is SQLite's map of this database's -shm, not some other one.
    (Read by another process: a descriptor opened and closed here would drop SQLite's locks.)
    """
    t0 = start_time()
    await header_store.create(make_record(now=t0), max_sessions=10, now=t0)
    assert header_store._wal_index is not None

    in_file = run_python(
        "import sys; print(open(sys.argv[1] + '-shm', 'rb').read(96).hex())", header_store.path
    )

    assert header_store._wal_index.version() == bytes.fromhex(in_file)


# Rewrites copy [1] of the header (one byte of iChange), as a writer killed between its two
# copies would leave it.
TEAR = """
import mmap, os, sys
fd = os.open(sys.argv[1] + "-shm", os.O_RDWR)
shm = mmap.mmap(fd, 4096)
shm[56] ^= 0x55
shm.close()
os.close(fd)
"""


async def test_a_torn_header_is_never_trusted_and_recovery_brings_the_cache_back(
    header_store: SQLiteStore,
) -> None:
    t0 = start_time()
    record = make_record(now=t0, data={"a": 1})
    await header_store.create(record, max_sessions=10, now=t0)
    assert await header_store.get(record.token_digest, now=t0) == record
    reader = header_store._loop_db
    assert reader is not None
    statements: list[str] = []
    reader.set_trace_callback(statements.append)

    run_python(TEAR, header_store.path)
    # The reader's SELECT finds the copies differ and rebuilds the WAL index (recovery).
    assert await header_store.get(record.token_digest, now=t0) == record
    assert any(sql.startswith("SELECT") for sql in statements), statements
    statements.clear()
    # Rebuilt, the header is one nothing was cached under: read once more, then cached.
    assert await header_store.get(record.token_digest, now=t0) == record
    assert any(sql.startswith("SELECT") for sql in statements), statements
    statements.clear()
    assert await header_store.get(record.token_digest, now=t0) == record
    assert statements == []


@linux_only
async def test_a_store_closing_leaves_the_other_store_on_the_file_reading_fresh(
    tmp_path: Path,
) -> None:
    """Both stores' connections share SQLite's one mapping, which stays while any is open."""
    t0 = start_time()
    record = make_record(now=t0, data={"a": 1})
    path = tmp_path / "sessions.db"
    async with SQLiteStore(path) as staying:
        async with SQLiteStore(path) as leaving:
            await leaving.create(record, max_sessions=10, now=t0)
            assert await staying.get(record.token_digest, now=t0) == record
        assert staying._wal_index is not None

        run_python(
            "import sqlite3, sys; sqlite3.connect(sys.argv[1], isolation_level=None)"
            ".execute('UPDATE ' + sys.argv[2] + ' SET data = ?', ('{}',))",
            str(path),
            TABLE,
        )

        got = await staying.get(record.token_digest, now=t0)
    assert got is not None
    assert got.data == {}


async def test_another_process_cannot_take_the_file_out_of_wal_mode(
    header_store: SQLiteStore,
) -> None:
    """The header is how every commit shows, for as long as the file stays in WAL mode:
    leaving it needs every other connection closed, the store's included.
    """
    answer = run_python(
        "import sqlite3, sys\n"
        "try:\n"
        "    print(sqlite3.connect(sys.argv[1], timeout=0.2)"
        ".execute('PRAGMA journal_mode = DELETE').fetchone()[0])\n"
        "except sqlite3.OperationalError as exc:\n"
        "    print(exc)",
        header_store.path,
    )

    assert answer.strip() == "database is locked"
    assert header_store._wal_index is not None
