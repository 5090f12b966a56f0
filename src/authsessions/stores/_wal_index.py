"""The WAL-index header of a SQLite database, read where SQLite itself maps it in this process.

In WAL mode every commit, by any connection of any process, rewrites this
header (https://sqlite.org/walformat.html, "The WAL-Index Header"): the last
frame, page count, checksums, salts and a change counter. Comparing it with
an earlier copy is how SQLite itself decides, as a read transaction begins,
whether the database changed, and what ``PRAGMA data_version`` reports. Read
here, it costs a 96-byte copy instead of a read transaction with its two
file-lock system calls. Its frame count, with the checkpoint's progress
that follows the header in the same mapping, also tells SQLiteStore how long
the WAL is and whether the next commit will start it over.

The header is found in SQLite's own mapping of the ``-shm`` file, listed in
``/proc/self/maps``: no descriptor is opened on that file, since closing one
would release SQLite's POSIX locks on it (every descriptor a process closes
releases the process's locks on the file). The mapping stays in place for as
long as any connection of this process has the database open.

What this check cannot see, SQLite's own readers cannot see either: a header
rebuilt by recovery (after a writer died between its two copies) starts from
zero, so two such recoveries around a commit, each with an empty WAL, can
bring back bytes seen before. ``PRAGMA data_version`` and SQLite's page cache
are fooled the same way.
"""

from __future__ import annotations

import os
import struct
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import ctypes

__all__ = ["WalIndexHeader"]

_COPY_SIZE = 48  # the header is kept twice, one copy after the other
_VERSION = struct.pack("=I", 3007000)  # iVersion, native byte order, since SQLite 3.7.0
_I_CHANGE = 8  # the offset of iChange, which each commit adds one to
_read_word = struct.Struct("=I").unpack_from
_IS_INIT = 12  # the offset of isInit, 1 once the header was built
_MX_FRAME_WORD = 4  # the 32-bit word of mxFrame, the WAL's last valid frame (0: an empty WAL)
_SALT_WORD = 8  # aSalt[0]: a restart of the WAL (mxFrame back to 0) adds one to it
_N_BACKFILL_SIZE = 4  # nBackfill, first of the checkpoint info that follows the two copies


class WalIndexHeader:
    """A version of the whole database that every commit changes, for a cache to compare;
    and how long the WAL is, and how much of it a checkpoint copied.

    The owner must keep a connection to the database open for as long as it
    calls any method, from any thread: that connection keeps SQLite's mapping
    (and its shared lock on ``-shm``, which stops another process from
    replacing the file) in place.
    """

    __slots__ = ("_backfilled", "_copies", "_words")

    def __init__(
        self,
        copies: ctypes.Array[ctypes.c_char],
        backfilled: ctypes.Array[ctypes.c_char] | None = None,
    ) -> None:
        if len(copies) != 2 * _COPY_SIZE:
            raise ValueError(f"the header's two copies take {2 * _COPY_SIZE} bytes")
        if backfilled is not None and len(backfilled) != _N_BACKFILL_SIZE:
            raise ValueError(f"nBackfill takes {_N_BACKFILL_SIZE} bytes")
        self._copies = copies
        # Native 32-bit words, as SQLite keeps them: indexing one reads it in place.
        self._words = memoryview(copies).cast("B").cast("I")
        # nBackfill: the frames a checkpoint copied into the database.
        self._backfilled = (
            None if backfilled is None else memoryview(backfilled).cast("B").cast("I")
        )

    @classmethod
    def find(cls, database_path: str) -> WalIndexHeader | None:
        """The header of the database at ``database_path``, which must be in WAL mode and
        already read by a connection of this process; ``None`` where it cannot be found
        (no ``/proc``, another SQLite build's layout, the mapping listed twice).
        """
        try:
            import ctypes  # some Python builds lack it; data_version works there
        except ImportError:
            return None
        shm_path = os.path.realpath(database_path) + "-shm"
        starts = []
        try:
            with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
                for line in maps:
                    # start-end perms offset dev inode path; the path may hold spaces
                    fields = line.rstrip("\n").split(maxsplit=5)
                    if len(fields) == 6 and fields[5] == shm_path:
                        addresses, perms, offset = fields[0], fields[1], fields[2]
                        start, end = (int(address, 16) for address in addresses.split("-"))
                        if perms[3] == "s" and int(offset, 16) == 0 and end - start >= 4096:
                            starts.append(start)
        except OSError:
            return None
        if len(starts) != 1:
            return None
        copies = (ctypes.c_char * (2 * _COPY_SIZE)).from_address(starts[0])
        current = copies.raw
        if current[:4] != _VERSION or current[_IS_INIT] != 1:
            return None
        backfilled = (ctypes.c_char * _N_BACKFILL_SIZE).from_address(starts[0] + 2 * _COPY_SIZE)
        return cls(copies, backfilled)

    def version(self) -> object:
        """The header as it is now; while a commit is writing it, a version equal to none
        before or after (two copies that differ mean a writer is halfway through).

        SQLite writes the second copy first and the first last, so a commit that has
        finished shows in both copies to every later read.
        """
        copies = self._copies.raw
        if copies[:_COPY_SIZE] == copies[_COPY_SIZE:]:
            return copies
        return object()

    @staticmethod
    def commits_between(earlier: object, later: object) -> int | None:
        """How many commits came between two versions (by the header's ``iChange``, modulo
        2**32); ``None`` if either was read while a commit was writing it.

        Every commit that writes a page adds exactly one, whichever connection makes it
        (``walFrames`` in SQLite's ``wal.c``); a transaction that changed no page writes
        nothing and counts nothing. Restarting the WAL and checkpoints leave it as it is;
        WAL recovery rebuilds the header from 0, as a new ``-shm`` file starts.
        """
        if type(earlier) is not bytes or type(later) is not bytes:
            return None
        count: int = _read_word(later, _I_CHANGE)[0] - _read_word(earlier, _I_CHANGE)[0]
        return count % (1 << 32)

    def frames(self) -> int:
        """How many frames (page writes) the WAL holds since it last restarted.

        Read from one copy without a check: while a commit is writing the header it
        may be that commit's count or the one before.
        """
        frames: int = self._words[_MX_FRAME_WORD]
        return frames

    def generation(self) -> int:
        """A number that changes each time the WAL starts over (the first salt of its
        header): frames counted under one generation are not in the WAL of another, however
        long that one has grown since.
        """
        salt: int = self._words[_SALT_WORD]
        return salt

    def all_checkpointed(self) -> bool:
        """Whether every frame of the WAL is in the database too (an empty WAL included):
        the next commit that writes a page, by whichever connection, may then start the
        WAL over, writing its header and fsyncing it (it does unless a reader still holds
        a snapshot in the WAL). ``False`` when this header was made without ``backfilled``.
        """
        backfilled = self._backfilled
        # At or past: a restart resets mxFrame a moment before nBackfill.
        return backfilled is not None and backfilled[0] >= self._words[_MX_FRAME_WORD]
