"""Telling, without asking SQLite, whether anything was written to a WAL file (Linux).

Every commit in WAL mode appends to the ``-wal`` file with ``write()``, in any
process. The kernel queues an inotify event for each such write before the
writer's call returns, so a non-blocking look at the queue afterwards cannot
miss a commit that has finished. That look is one ``poll`` system call; the
alternative, ``PRAGMA data_version``, is a read transaction with two file-lock
system calls and SQLite's statement machinery (3 µs on a quiet machine, about
15 µs under load).

Only the kernel's inotify is used: no descriptor is ever opened on the WAL or
``-shm`` files themselves (closing one would release this process's POSIX
locks on them, which SQLite relies on).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import select
import struct
import sys

__all__ = ["WalWrites"]

_IN_MODIFY = 0x002
_IN_MOVE_SELF = 0x800
_IN_DELETE_SELF = 0x400
_IN_IGNORED = 0x8000
_IN_Q_OVERFLOW = 0x4000
_IN_NONBLOCK = os.O_NONBLOCK
_IN_CLOEXEC = os.O_CLOEXEC
_WATCHED = _IN_MODIFY | _IN_MOVE_SELF | _IN_DELETE_SELF
# After these the watch no longer follows the file SQLite writes to.
_WATCH_LOST = _IN_MOVE_SELF | _IN_DELETE_SELF | _IN_IGNORED | _IN_Q_OVERFLOW
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len (of a name, which a file watch lacks)


class WalWrites:
    """Writes to one WAL file since the last :meth:`happened` (an inotify watch)."""

    __slots__ = ("_fd", "_poll")

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._poll = select.poll()
        self._poll.register(fd, select.POLLIN)

    @classmethod
    def watch(cls, database_path: str) -> WalWrites | None:
        """A watch on ``database_path``'s WAL file; ``None`` where inotify is not to be had
        (not Linux, no WAL file, the per-user limit of inotify instances reached).
        """
        if not sys.platform.startswith("linux"):
            return None
        libc_name = ctypes.util.find_library("c")
        if libc_name is None:
            return None
        libc = ctypes.CDLL(libc_name, use_errno=True)
        fd = libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        if fd < 0:
            return None
        # SQLite names the WAL after the database's real path.
        wal = os.fsencode(os.path.realpath(database_path) + "-wal")
        if libc.inotify_add_watch(fd, ctypes.c_char_p(wal), _WATCHED) < 0:
            os.close(fd)
            return None
        return cls(fd)

    def happened(self) -> bool:
        """Whether anything wrote to the file since the last call (or the watch was lost:
        then always ``True``, so a caller that trusts nothing then stays correct).
        """
        if self._fd < 0:
            return True
        if not self._poll.poll(0):
            return False
        try:
            events = os.read(self._fd, 1 << 16)
        except BlockingIOError:  # pragma: no cover - poll said there was something
            return True
        # A watch on a file has no names: every event is the bare 16-byte header. Events
        # left unread (over 64 KiB of them) only make the next call say True again.
        if len(events) % _EVENT.size or any(
            mask & _WATCH_LOST for _wd, mask, _cookie, _length in _EVENT.iter_unpack(events)
        ):
            self.close()
        return True

    @property
    def is_lost(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        if self._fd >= 0:
            self._poll.unregister(self._fd)
            os.close(self._fd)
            self._fd = -1
