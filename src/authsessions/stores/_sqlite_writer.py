"""SQLiteStore's writer thread: the writes the event loop must not wait for, and when the WAL
is checkpointed and what requests wait for then (see ``_checkpoints``).
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from authsessions.stores._base import translate_errors
from authsessions.stores._checkpoints import (
    RESTART_WAIT_MS,
    CheckpointSchedule,
    WalPosition,
    copy_wal,
    started_wal_over,
)
from authsessions.stores._sqlite_support import checkpoint_then, start_wal_over
from authsessions.stores._wal_index import WalIndexHeader

__all__ = ["WriterThread"]

T = TypeVar("T")


class WriterThread:
    """One thread with a connection of its own, which waits out other connections' locks.

    It runs the writes the event loop's connection found locked, those that may
    change many rows, and the checkpoints: a copy that requests do not wait for,
    then, unless the copy started the WAL over itself, a finish that they queue
    behind (see ``_checkpoints``). Each is the thread's job while it is in hand.
    Everything but the thread's own work is called on the event loop.

    Args:
        closed_error: what to raise when asked to work while closed.
        timeout: the longest a request's write waits for another connection's lock,
            in seconds, from the moment it is handed to the thread.
    """

    def __init__(self, closed_error: Callable[[], Exception], timeout: float) -> None:
        self._closed_error = closed_error
        self._timeout = timeout
        self._pool: ThreadPoolExecutor | None = None
        self._db: sqlite3.Connection | None = None
        self._reconnect: Callable[[], sqlite3.Connection] = _not_opened
        self._replaced: sqlite3.Connection | None = None  # the last one reconnect() closed
        self._wal_index: WalIndexHeader | None = None
        self.checkpoints = CheckpointSchedule(None)
        self._copying: Future[WalPosition | None] | None = None
        self._finishing: Future[Any] | None = None
        self._finishing_told: asyncio.AbstractEventLoop | None = None  # hears of its end

    async def open(
        self,
        connect: Callable[[], sqlite3.Connection],
        reconnect: Callable[[], sqlite3.Connection],
    ) -> None:
        """Start the thread and open its connection there with ``connect``; ``reconnect``
        opens it again on the file it set up (after a fork, or see :meth:`reconnect`).
        """
        self._reconnect = reconnect
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="authsessions-sqlite")
        self._db = await self._on_thread(connect)

    def count_pages(self, wal_index: WalIndexHeader | None) -> None:
        """Schedule checkpoints by the pages ``wal_index`` shows requests adding; by writes
        without it. Kept while the store is open: the header stays mapped for as long as
        this thread's connection is open.
        """
        self._wal_index = wal_index
        self.checkpoints = CheckpointSchedule(wal_index)

    async def close(self) -> None:
        self.count_pages(None)
        self._copying = self._finishing = None  # the connection's close, below, runs after them
        self._finishing_told = None
        # Both let go of at once: an open while this close waits (a request reopening the
        # store) sets new ones, which the end of this close must leave alone.
        pool, self._pool = self._pool, None
        db, self._db = self._db, None
        if pool is not None:
            try:
                if db is not None:
                    # Queued behind the thread's work in hand, which took the connection
                    # as it was submitted (see run).
                    await asyncio.get_running_loop().run_in_executor(pool, db.close)
            finally:
                pool.shutdown(wait=False)

    def close_connection_for_fork(self) -> None:
        """Close the thread's connection once the work in hand is done, blocking: a process
        about to fork must hold no connection to the file (see ``SQLiteStore``). The
        caller lets go of the WAL-index header after this, before its own connection.
        """
        pool = self._pool
        if pool is not None:
            # The connection the thread holds when it gets here: a reconnect queued ahead
            # may replace the one held now.
            pool.submit(self._close_held).result()

    def _close_held(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            db.close()

    def reconnect_after_fork(self) -> None:
        """In the process that forked: open the thread's connection again, blocking."""
        if self._pool is not None:
            self._db = self._pool.submit(self._reconnect).result()

    def abandon(self) -> None:
        """Let the thread go without awaiting it, its connection closed already."""
        self.count_pages(None)
        pool, self._pool, self._db = self._pool, None, None
        if pool is not None:
            pool.shutdown(wait=False)

    async def run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``work`` on the thread's connection; its errors as ``StoreUnavailable``.

        The connection is taken now, not when the thread gets to the work: a close
        queued behind it lets go of it at once.
        """
        db = self._connection()

        def on_thread() -> T:
            connection = self._fresh(db)
            try:
                return work(connection)
            except BaseException:
                self._released_if_stuck(connection)
                raise

        return await self._on_thread(on_thread)

    async def reconnect(self) -> None:
        """Close the thread's connection, then open it anew, once the work in hand is done
        (see ``SQLiteStore._reconnect_all``). Work handed over meanwhile runs on the new one.
        """
        pool = self._pool
        if pool is None:
            raise self._closed_error()

        def reconnect() -> None:
            db = self._db
            if self._pool is not pool or db is None:
                return  # closed meanwhile: the close let go of the connection
            self._replaced = db
            db.close()
            self._reopen_in_place_of(db)  # if it fails, the next work tries again

        with translate_errors("SQLite", sqlite3.Error):
            # Shielded: cancelled while queued, the reconnect would never run.
            await asyncio.shield(asyncio.wrap_future(pool.submit(reconnect)))

    def _fresh(self, db: sqlite3.Connection) -> sqlite3.Connection:
        """On the thread: the connection for work handed over with ``db``, which is the one
        opened anew when a reconnect has closed ``db`` since (opened here, if it failed)."""
        if db is not self._replaced:
            return db
        if self._db is db:
            self._reopen_in_place_of(db)
        return self._db if self._db is not None else db  # None: the store is closing

    def _released_if_stuck(self, db: sqlite3.Connection) -> None:
        """On the thread, after work on ``db`` failed or suppressed a failure: a ROLLBACK
        that failed too (a disk error) leaves its transaction open, and the write lock held
        against every process until this one ends. Closing the connection lets go of it;
        the next work gets one opened anew (see :meth:`_fresh`).
        """
        if not db.in_transaction:
            return
        self._replaced = db
        with contextlib.suppress(sqlite3.Error):
            db.close()
        if self._db is db:
            with contextlib.suppress(sqlite3.Error):  # else the next work tries again
                self._reopen_in_place_of(db)

    def _reopen_in_place_of(self, closed: sqlite3.Connection) -> None:
        """On the thread: the connection opened anew, in place of ``closed``; closed again
        at once if the thread was closed meanwhile (which let go of ``closed`` only)."""
        pool, reopened = self._pool, self._reconnect()
        if self._pool is pool and self._db is closed:
            self._db = reopened
        else:
            reopened.close()

    async def write(
        self, work: Callable[[sqlite3.Connection], T], *, asked_at: float | None = None
    ) -> T:
        """Run ``work`` (a request's write) on the thread, after the checkpoint's finish when
        it is due; its lock timeout counted from ``asked_at`` (``time.monotonic()``), or
        from now."""
        work = self._within_timeout(work, asked_at)
        finish_due = self.finish_due()
        self.copy_if_due()
        if finish_due:
            return await self._finish_checkpoint_then(work)
        result = await self.run(work)
        self.checkpoints.wrote()
        return result

    async def write_many_rows(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``work`` on the thread: one statement that may change many rows, or where
        a count must match what goes, a transaction around one (a user's many sessions at
        once, which is rare; never a cleanup's every batch, see below).

        Its connection checkpoints by itself once the WAL passes the store's
        bulk threshold, so the pages ``work`` adds are not counted towards the
        requests' checkpoint: each batch of a cleanup would take one of its own.

        Its pages are those between where the WAL ended before and after it, so
        pages another connection commits while the statement waits for the write
        lock count as its own too, and the requests' checkpoint comes that much
        later. Reading where they start under the lock would need ``BEGIN`` and
        ``COMMIT`` of their own: two more waits for the GIL on a thread whose event
        loop is busy, which made a cleanup under read load take 1.3 to 3.2 times as
        long (thirteenth round in ``benchmarks/HISTORY.md``).
        """
        schedule, bounded = self.checkpoints, self._within_timeout(work)

        def run(db: sqlite3.Connection) -> tuple[T, WalPosition | None, WalPosition | None]:
            before = schedule.position()
            return bounded(db), before, schedule.position()

        result, before, after = await self.run(run)
        schedule.skip(before, after)
        return result

    def _within_timeout(
        self, work: Callable[[sqlite3.Connection], T], asked_at: float | None = None
    ) -> Callable[[sqlite3.Connection], T]:
        """``work``, waiting for a lock only what is left of the timeout from ``asked_at``
        (else from now) when the thread gets to it: queued behind others that each waited
        theirs, the last of many writes meeting a held lock failed after all of their
        timeouts (and a close at shutdown waited as long).
        """
        timeout_ms = round(self._timeout * 1000)
        deadline = (time.monotonic() if asked_at is None else asked_at) + self._timeout

        def within_timeout(db: sqlite3.Connection) -> T:
            left_ms = round((deadline - time.monotonic()) * 1000)
            if left_ms >= timeout_ms - min(timeout_ms // 10, 50):
                # Little was ahead of it: the whole timeout, 50 ms over at most. Setting
                # one and back is two statements more, each a wait for the GIL when the
                # event loop is busy: a cleanup of a million under read load took 213 s
                # instead of 114 s.
                return work(db)
            db.execute(f"PRAGMA busy_timeout = {max(left_ms, 0)}")
            try:
                return work(db)
            finally:
                db.execute(f"PRAGMA busy_timeout = {timeout_ms}")

        return within_timeout

    @property
    def finishing(self) -> bool:
        """Whether a checkpoint's finish is under way on the thread."""
        return self._finishing is not None and not self._finishing.done()

    async def wait_for_finish(self) -> None:
        """Return once no checkpoint's finish is under way on the thread."""
        finishing = self._finishing
        while finishing is not None and not finishing.done():
            await _done(finishing)
            finishing = self._finishing

    def finish_due(self) -> bool:
        """Whether writes go to the thread for the checkpoint's finish (or queue behind it):
        its copy is done and could not start the WAL over itself (requests wrote while it
        ran), or the WAL has grown twice as long as a checkpoint waits for (a disk slow to
        take the copy); without the header, as soon as a checkpoint is due. Not once a
        finish is in hand, under way or done and not yet taken in on the loop (a write
        in between would run a second one), unless that loop closed before it could.

        A copy that ended having started the WAL over is taken in here, before every
        write: the event loop may not turn between writes (they do not suspend).
        """
        finishing = self._finishing
        if finishing is not None:
            told = self._finishing_told
            if not (finishing.done() and told is not None and told.is_closed()):
                return False
            self._finishing = None  # done, but its loop closed before hearing of it
        copying = self._copying
        if copying is None:
            return self._wal_index is None and self.checkpoints.due()
        if not copying.done():
            return self.checkpoints.overdue()
        if started_wal_over(copying):
            self._copying = None
            self.checkpoints.checkpointed(copying.result())
            return False
        return True

    def copy_if_due(self) -> None:
        """Start the checkpoint's copy once requests have added enough to the WAL.

        Only where the WAL-index header is read: without it the event loop's
        connection cannot see that a copy took everything, and its next commit
        would start the WAL over there. The checkpoint is then one step.
        """
        pool, wal_index = self._pool, self._wal_index
        if (
            self._copying is None
            and wal_index is not None
            and pool is not None
            and self.checkpoints.due()
        ):
            db = self._connection()
            self._copying = pool.submit(lambda: copy_wal(self._fresh(db), wal_index))

    async def _finish_checkpoint_then(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """The checkpoint's finish, then ``work``, on the thread.

        The schedule follows the thread's job, not the request awaiting it: if that
        request is cancelled, the finish still counts once it has run, and the next
        write runs it if it never began.
        """
        pool = self._pool
        if pool is None:
            raise self._closed_error()
        schedule, loop = self.checkpoints, asyncio.get_running_loop()
        copying = self._copying  # the copy this finishes, if any
        ended_at: list[WalPosition | None] = []  # once it ran
        db = self._connection()  # taken now, as run() does

        def checkpoint_then_work() -> T:
            connection = self._fresh(db)
            try:
                return checkpoint_then(connection, work)
            finally:
                try:
                    # Whatever the write did (it may have failed, or changed nothing), the
                    # WAL starts over here: left to the next commit, that could be the
                    # event loop's (where the WAL-index header is not read, nothing would
                    # refuse it there).
                    start_wal_over(connection, wait_ms=RESTART_WAIT_MS)
                    # Here, not once the loop resumes: work queued behind this on the
                    # thread may have added pages by then.
                    ended_at.append(schedule.position())
                finally:
                    self._released_if_stuck(connection)  # start_wal_over suppresses errors

        def finished() -> None:
            if self._finishing is job:
                self._finishing = None
            if ended_at:
                if self._copying is copying:  # not one begun since
                    self._copying = None  # done: the finish ran after it on the same thread
                schedule.checkpointed(ended_at[0])

        # Under way while not done (whether or not this loop still runs to hear of it).
        self._finishing = job = pool.submit(checkpoint_then_work)
        self._finishing_told = loop
        # Asked for before the awaiting below, so it runs before the request resumes.
        _on_loop_when_done(job, loop, finished)
        with translate_errors("SQLite", sqlite3.Error):
            return await asyncio.wrap_future(job)

    async def _on_thread(self, work: Callable[[], T]) -> T:
        if self._pool is None:
            raise self._closed_error()
        with translate_errors("SQLite", sqlite3.Error):
            return await asyncio.get_running_loop().run_in_executor(self._pool, work)

    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            raise self._closed_error()
        return self._db


async def _done(job: Future[Any]) -> None:
    """Wait until the thread's ``job`` is done, whatever it returned or raised: that is for
    the request that awaits it to hear.
    """
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def wake() -> None:
        if not done.done():  # a waiter cancelled meanwhile
            done.set_result(None)

    _on_loop_when_done(job, loop, wake)
    await done


def _on_loop_when_done(
    job: Future[Any], loop: asyncio.AbstractEventLoop, callback: Callable[[], None]
) -> None:
    """Run ``callback`` on ``loop`` once the thread's ``job`` is done (at once if it is);
    not at all if the loop has closed by then.
    """

    def on_job_done(_: Future[Any]) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(callback)

    job.add_done_callback(on_job_done)


def _not_opened() -> sqlite3.Connection:
    raise RuntimeError("the writer thread was never opened")
