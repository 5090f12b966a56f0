"""The SQLite store's table and its migrations: a table beside it records how far a file
got, and the oldest version whose code can use it as it stands.

Not ``PRAGMA user_version``: that is the whole file's, and an app that keeps its sessions
in its own database may count its own migrations there.
"""

from __future__ import annotations

import sqlite3

from authsessions.stores._base import accept_newer_schema, log_schema_upgrade
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
# What a record holds, as reads and inserts name it. Not the rotated-away columns: get
# reads only these, and a file of the first builds is known by holding them.
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
    # The digest a session's latest rotation left, for rotated_away_to. Columns of the
    # row, not a table of their own: they go with the session however it goes, and a
    # rotation sets them in its own UPDATE. Added without a default, which SQLite does
    # without rewriting a row. The index holds only rows a rotation marked, so no other
    # write touches it.
    (
        f"ALTER TABLE {TABLE} ADD COLUMN rotated_away_from TEXT",
        f"ALTER TABLE {TABLE} ADD COLUMN rotated_away_until REAL",
        f"CREATE INDEX {TABLE}_rotated_away_from ON {TABLE} (rotated_away_from)"
        " WHERE rotated_away_from IS NOT NULL",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)
# The oldest schema version whose code can use this one as it stands, recorded beside the
# version for releases that know only an older one (see accept_newer_schema).
# The second migration only replaced an index: code written for version 1 runs on it
# unchanged. The third only added columns that may be NULL, and an index: every release
# names the columns it reads and inserts, so older code runs on it unchanged too. Its
# rotations leave a digest marked by an earlier one as it was, until that one's time,
# which rotated_away_to allows (a rotation "may" end the previous one's time). A
# migration that changes what older code reads or writes sets it to its own version.
COMPATIBLE_FROM = 1
SCHEMA_TABLE = f"{TABLE}_schema"


def migrate(db: sqlite3.Connection) -> None:
    with transaction(db):
        version, compatible_from, recorded = _recorded_version(db)
        if version > SCHEMA_VERSION:
            accept_newer_schema("The session database", version, compatible_from, SCHEMA_VERSION)
            return
        for statements in MIGRATIONS[version:]:
            for statement in statements:
                db.execute(statement)
        if version < SCHEMA_VERSION or not recorded:
            db.execute(f"DROP TABLE IF EXISTS {SCHEMA_TABLE}")
            db.execute(
                f"CREATE TABLE {SCHEMA_TABLE} "
                "(version INTEGER NOT NULL, compatible_from INTEGER NOT NULL)"
            )
            db.execute(
                f"INSERT INTO {SCHEMA_TABLE} (version, compatible_from) VALUES (?, ?)",
                (SCHEMA_VERSION, COMPATIBLE_FROM),
            )
    if version < SCHEMA_VERSION:
        log_schema_upgrade("The session database", version, SCHEMA_VERSION)


def _recorded_version(db: sqlite3.Connection) -> tuple[int, int | None, bool]:
    """The file's schema version, the oldest version marked able to use it (``None`` if
    unmarked), and whether both are recorded as this release records them.

    The first builds kept the version in ``PRAGMA user_version``, which an app sharing
    the file may have changed since: a file of theirs (the session table, no version
    recorded) is read from what it holds, and recorded anew as it upgrades.
    """
    if "version" in {row[1] for row in db.execute(f"PRAGMA table_info({SCHEMA_TABLE})")}:
        row = db.execute(f"SELECT version, compatible_from FROM {SCHEMA_TABLE}").fetchone()
        if row is not None:
            return int(row[0]), int(row[1]), True
    # SQLite's names ignore case, and a view or an index takes a table's name too.
    kinds = [
        kind
        for (kind,) in db.execute(
            "SELECT type FROM sqlite_master WHERE name = ? COLLATE NOCASE", (TABLE,)
        )
    ]
    if not kinds:
        return 0, None, False
    indexes = {
        name
        for (name,) in db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = ? COLLATE NOCASE",
            (TABLE,),
        )
    }
    columns = {row[1] for row in db.execute(f"PRAGMA table_info({TABLE})")}
    user_index = {f"{TABLE}_user", f"{TABLE}_user_id"} & indexes
    if kinds != ["table"] or not user_index or not set(COLUMNS.split(", ")) <= columns:
        # Not retried as "unavailable": it fails the same way until someone acts.
        raise RuntimeError(
            f"The database holds a {kinds[0]} {TABLE} that is not this library's session "
            "table: give the sessions a file of their own."
        )
    # The second migration replaced the index on (user_id, last_active_at) by one on user_id.
    # The first builds went no further, and every later release records its version.
    return (2 if f"{TABLE}_user" in user_index else 1), None, False
