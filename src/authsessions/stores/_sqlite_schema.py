"""The SQLite store's table and its migrations: ``PRAGMA user_version`` records how far a
file got, and a table beside it the oldest version whose code can use it as it stands.
"""

from __future__ import annotations

import sqlite3

from authsessions.stores._base import accept_newer_schema
from authsessions.stores._sqlite_support import transaction

__all__ = [
    "COLUMNS",
    "COMPATIBLE_FROM",
    "MIGRATIONS",
    "SCHEMA_TABLE",
    "SCHEMA_VERSION",
    "TABLE",
    "migrate",
]

TABLE = "authsessions_session"
COLUMNS = (
    "id, token_digest, user_id, ip_address, user_agent, device_name, device_type,"
    " fingerprint, data, created_at, last_active_at, expires_at"
)
# Each entry upgrades the schema by one version.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        f"""CREATE TABLE {TABLE} (
            id TEXT PRIMARY KEY,
            token_digest TEXT NOT NULL UNIQUE,
            user_id TEXT NOT NULL,
            ip_address TEXT,
            user_agent TEXT,
            device_name TEXT NOT NULL,
            device_type TEXT NOT NULL,
            fingerprint TEXT NOT NULL,
            data TEXT NOT NULL,
            created_at REAL NOT NULL,
            last_active_at REAL NOT NULL,
            expires_at REAL NOT NULL
        )""",
        f"CREATE INDEX {TABLE}_user_id ON {TABLE} (user_id, last_active_at)",
        f"CREATE INDEX {TABLE}_expires_at ON {TABLE} (expires_at)",
    ),
    # A user's sessions are few, so ordering them needs no index; with last_active_at in
    # it, every touch rewrote an index page too (a write took 71 µs instead of 48 µs).
    (
        f"DROP INDEX {TABLE}_user_id",
        f"CREATE INDEX {TABLE}_user ON {TABLE} (user_id)",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)
# The oldest schema version whose code can use this one as it stands, recorded beside
# PRAGMA user_version for releases that know only an older one (see accept_newer_schema).
# The second migration only replaced an index: code written for version 1 runs on it
# unchanged. A migration that changes what older code reads or writes sets it to its own
# version.
COMPATIBLE_FROM = 1
SCHEMA_TABLE = f"{TABLE}_schema"


def migrate(db: sqlite3.Connection) -> None:
    with transaction(db):
        (version,) = db.execute("PRAGMA user_version").fetchone()
        if version > SCHEMA_VERSION:
            accept_newer_schema(
                "The session database", version, _compatible_from(db), SCHEMA_VERSION
            )
            return
        for statements in MIGRATIONS[version:]:
            for statement in statements:
                db.execute(statement)
        if version < SCHEMA_VERSION:
            db.execute(
                f"CREATE TABLE IF NOT EXISTS {SCHEMA_TABLE} (compatible_from INTEGER NOT NULL)"
            )
            db.execute(f"DELETE FROM {SCHEMA_TABLE}")
            db.execute(
                f"INSERT INTO {SCHEMA_TABLE} (compatible_from) VALUES (?)",
                (COMPATIBLE_FROM,),
            )
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def _compatible_from(db: sqlite3.Connection) -> int | None:
    """The oldest schema version the file's release marked usable, ``None`` if unmarked."""
    if not db.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (SCHEMA_TABLE,)
    ).fetchone():
        return None
    row = db.execute(f"SELECT compatible_from FROM {SCHEMA_TABLE}").fetchone()
    return None if row is None else int(row[0])
