"""The demo's accounts: a username and an argon2 hash in a SQLite file of the demo's own.

Kept deliberately plain: one connection per call, run in a worker thread so
the event loop never waits on the disk or on argon2's deliberately slow hash.
A real app keeps users in its own database; authsessions only needs their ids.
"""

from __future__ import annotations

import os
import re
import sqlite3
import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from typing import Any, TypeVar

from anyio import to_thread
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

__all__ = ["USERNAME_RULE", "AccountsUnavailable", "SignupError", "User", "UserStore"]

T = TypeVar("T")

USERNAME_RULE = "3 to 32 characters: letters, digits, '.', '_' or '-'"
_USERNAME = re.compile(r"[a-z0-9._-]{3,32}")
MIN_PASSWORD = 8
# argon2 hashes whatever it is given; a cap keeps a megabyte "password" from costing more.
MAX_PASSWORD = 256

_SCHEMA = """CREATE TABLE IF NOT EXISTS demo_user (
    id INTEGER PRIMARY KEY,
    username TEXT NOT NULL UNIQUE,
    password_hash TEXT NOT NULL,
    created_at REAL NOT NULL
)"""


class SignupError(ValueError):
    """The sign-up form cannot be accepted; the message is shown to the person."""


class AccountsUnavailable(Exception):
    """The accounts file cannot be used right now (locked, unreadable, full)."""


@dataclass(frozen=True, slots=True)
class User:
    """One account. ``id`` is what the demo hands to ``Session.authenticate``."""

    id: str
    username: str


def normalise_username(username: str) -> str:
    """Usernames compare case-insensitively and without surrounding spaces."""
    return username.strip().lower()


class UserStore:
    """Accounts in a SQLite file, with passwords hashed by argon2id.

    Args:
        path: the database file; created with its table on first use.
        hasher: argon2 settings; the library's defaults unless given.
    """

    def __init__(self, path: str | os.PathLike[str], *, hasher: PasswordHasher | None = None):
        self.path = os.fspath(path)
        self.hasher = hasher if hasher is not None else PasswordHasher()
        self._dummy_hash: str | None = None

    def __repr__(self) -> str:
        return f"UserStore({self.path!r})"

    async def create(self, username: str, password: str) -> User:
        """Add an account and return it.

        Raises:
            SignupError: the username or password breaks a rule, or the name is taken.
            AccountsUnavailable: the accounts file cannot be used.
        """
        username = normalise_username(username)
        if not _USERNAME.fullmatch(username):
            raise SignupError(f"Choose a username of {USERNAME_RULE}.")
        if not MIN_PASSWORD <= len(password) <= MAX_PASSWORD:
            raise SignupError(f"Choose a password of {MIN_PASSWORD} to {MAX_PASSWORD} characters.")
        password_hash = await to_thread.run_sync(self.hasher.hash, password)
        user_id = await _on_accounts_file(self._insert, username, password_hash)
        if user_id is None:
            raise SignupError("That username is taken; choose another.")
        return User(id=user_id, username=username)

    async def authenticate(self, username: str, password: str) -> User | None:
        """The account these credentials open, or ``None``.

        An unknown username costs one argon2 verification too, so response
        times do not reveal which usernames exist.

        Raises:
            AccountsUnavailable: the accounts file cannot be used.
        """
        username = normalise_username(username)
        row = await _on_accounts_file(self._find, username)
        if row is None or len(password) > MAX_PASSWORD:
            await to_thread.run_sync(self._verify_dummy, password)
            return None
        user_id, password_hash = row
        if not await to_thread.run_sync(self._verify, password_hash, password):
            return None
        if self.hasher.check_needs_rehash(password_hash):
            # The hasher's settings were raised since this hash was made: upgrade it now,
            # the only moment the plain password is at hand.
            new_hash = await to_thread.run_sync(self.hasher.hash, password)
            await _on_accounts_file(self._set_hash, user_id, new_hash)
        return User(id=user_id, username=username)

    # -- in the worker thread ------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=5.0)
        db.execute(_SCHEMA)
        return db

    def _insert(self, username: str, password_hash: str) -> str | None:
        with closing(self._connect()) as db, db:
            try:
                cursor = db.execute(
                    "INSERT INTO demo_user (username, password_hash, created_at) VALUES (?, ?, ?)",
                    (username, password_hash, time.time()),
                )
            except sqlite3.IntegrityError:
                return None
            return str(cursor.lastrowid)

    def _find(self, username: str) -> tuple[str, str] | None:
        with closing(self._connect()) as db:
            row = db.execute(
                "SELECT id, password_hash FROM demo_user WHERE username = ?", (username,)
            ).fetchone()
        return (str(row[0]), row[1]) if row is not None else None

    def _set_hash(self, user_id: str, password_hash: str) -> None:
        with closing(self._connect()) as db, db:
            db.execute(
                "UPDATE demo_user SET password_hash = ? WHERE id = ?", (password_hash, int(user_id))
            )

    def _verify(self, password_hash: str, password: str) -> bool:
        try:
            return self.hasher.verify(password_hash, password)
        except (VerificationError, InvalidHashError):
            return False

    def _verify_dummy(self, password: str) -> None:
        if self._dummy_hash is None:
            self._dummy_hash = self.hasher.hash("not anyone's password")
        self._verify(self._dummy_hash, password)


async def _on_accounts_file(work: Callable[..., T], *args: Any) -> T:
    """``work(*args)`` in a worker thread; a failure of the accounts file as
    :class:`AccountsUnavailable`."""
    try:
        return await to_thread.run_sync(work, *args)
    except sqlite3.Error as exc:
        raise AccountsUnavailable(str(exc)) from exc
