"""When and how SQLiteStore's writer thread checkpoints the WAL: once requests added so many pages.

Commits write pages to the WAL without an fsync; a checkpoint fsyncs the WAL
(writing out every page added since the last one: its time grows with
them), copies the pages into the database and fsyncs that. Only the first
commit after a checkpoint that copied everything starts the WAL over, which
keeps it short. So the writer thread checkpoints while requests go on
writing (the copy), and starts the WAL over itself if a round of it went
by with no write. Otherwise a finish follows that requests queue behind: it
copies what they added meanwhile (a few fsyncs of little) and its commit
starts the WAL over. A checkpoint begins after as many pages as SQLite's own
automatic one would wait for, not after a number of writes: a data write
adds one page, a touch two, a login about six.

Pages are read from the WAL-index header (see ``_wal_index``). Work that
changes many rows (a cleanup) runs on the writer thread, whose connection
checkpoints by itself; its pages are not the requests' and are not counted.
Where the header cannot be read, writes are counted instead.
"""

from __future__ import annotations

import sqlite3
from concurrent.futures import Future

from authsessions.stores._sqlite_support import checkpoint, start_wal_over
from authsessions.stores._wal_index import WalIndexHeader

__all__ = [
    "CHECKPOINT_EVERY",
    "CHECKPOINT_PAGES",
    "COPY_ROUNDS",
    "RESTART_WAIT_MS",
    "CheckpointSchedule",
    "WalPosition",
    "copy_wal",
    "started_wal_over",
]

# The pages requests add to the WAL between two checkpoints: SQLite's own default (about
# 4 MB). Counted in writes (250), data writes paid the fixed cost four times as often as
# this, logins at 1,500 pages.
CHECKPOINT_PAGES = 1000

# Where the WAL's size cannot be read, writes between two checkpoints.
CHECKPOINT_EVERY = 250

# How often the checkpoint's copy goes again over what requests wrote while it ran, each
# time a shorter fsync, for a moment with no write in it to start the WAL over. Logins one
# every 0.5 ms: 15 of 15 checkpoints left a finish for a request to wait for after one
# round, 5 of 15 after three; at saturation no worse (8,500-8,900 -> 8,900-9,100 a second).
COPY_ROUNDS = 3

# How long the copy waits for the write lock to start the WAL over, in milliseconds: the
# event loop's writes hold it for microseconds; another process's may hold it far longer,
# and then a finish does it, rather than everything queued on the writer thread waiting.
RESTART_WAIT_MS = 20

WalPosition = tuple[int, int]
"""Where the WAL ends: its generation (which a restart changes) and its frames."""


class CheckpointSchedule:
    """Counts what requests added to the WAL since the writer thread last checkpointed it.

    Used on the event loop, but :meth:`position` (read on the writer thread,
    where the work it measures ran).
    """

    __slots__ = ("_generation", "_mark", "_threshold", "_wal_index", "_writes")

    def __init__(self, wal_index: WalIndexHeader | None) -> None:
        self._wal_index = wal_index
        self._threshold = CHECKPOINT_EVERY if wal_index is None else CHECKPOINT_PAGES
        self._writes = 0
        # The frame after which pages count, in the WAL of that generation: where the WAL
        # ended after the last checkpoint, moved on past the pages bulk work added since.
        self._generation = self._mark = 0

    def counted(self) -> int:
        """Pages requests added since the last checkpoint (writes, without the header)."""
        wal_index = self._wal_index
        if wal_index is None:
            return self._writes
        generation = wal_index.generation()
        if generation != self._generation:  # the WAL started over since: count afresh
            self._generation, self._mark = generation, 0
        return wal_index.frames() - self._mark

    def due(self) -> bool:
        """Whether a checkpoint should begin."""
        return self.counted() >= self._threshold

    def overdue(self) -> bool:
        """Whether writes should wait for a checkpoint still copying: twice as much counted."""
        return self.counted() >= 2 * self._threshold

    def wrote(self) -> None:
        """A request's write committed."""
        self._writes += 1

    def position(self) -> WalPosition | None:
        """Where the WAL ends now; ``None`` without the header."""
        wal_index = self._wal_index
        return None if wal_index is None else (wal_index.generation(), wal_index.frames())

    def checkpointed(self, ended_at: WalPosition | None) -> None:
        """A checkpoint was tried; the WAL ended at ``ended_at`` after it (and after the
        write that followed it). Pages count from there: one that could not copy every
        page (a reader on an old snapshot) left the WAL as long, and the next waits for as
        many new pages as after one that could.
        """
        self._writes = 0
        if ended_at is not None:
            self._generation, self._mark = ended_at

    def skip(self, before: WalPosition | None, after: WalPosition | None) -> None:
        """The pages added between ``before`` and ``after`` (bulk work's) do not count."""
        if before is None or after is None:
            return
        (generation, start), (generation_after, end) = before, after
        if generation_after != generation:  # the work started the WAL over: all it holds
            start = 0  # is the work's
        if generation_after != self._generation:
            self._generation, self._mark = generation_after, 0
        # Only what lies past the mark: a checkpoint taken in since (the work ran before
        # it on the writer thread) may have moved the mark past some or all of it.
        self._mark += max(0, end - max(start, self._mark))


def copy_wal(db: sqlite3.Connection, wal_index: WalIndexHeader) -> WalPosition | None:
    """The checkpoint's copy, on the writer thread. If no request wrote while it ran, it
    took every frame: it then starts the WAL over too, and the WAL's position after that
    is returned; ``None`` when a finish is still needed.
    """
    for _ in range(COPY_ROUNDS):
        checkpoint(db)
        if wal_index.all_checkpointed():
            generation = wal_index.generation()
            start_wal_over(db, wait_ms=RESTART_WAIT_MS)
            if wal_index.generation() != generation:
                return wal_index.generation(), wal_index.frames()
    return None


def started_wal_over(copying: Future[WalPosition | None]) -> bool:
    """Whether a copy that is done started the WAL over itself."""
    return not copying.cancelled() and copying.exception() is None and copying.result() is not None
