"""The PostgreSQL store's SQL: the schema's migrations, and the statements built for one
table.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["COMPATIBLE_FROM", "MIGRATIONS", "SCHEMA_VERSION", "Sql"]

_COLUMNS = (
    "id, token_digest, user_id, ip_address, user_agent, device_name, device_type,"
    " fingerprint, data::text, created_at, last_active_at, expires_at"
)

# The session-creating function's versions share their signature and first steps.
_CREATE_SIGNATURE = """FUNCTION {create}(
            p_id text, p_token_digest text, p_user_id text, p_ip_address text,
            p_user_agent text, p_device_name text, p_device_type text, p_fingerprint text,
            p_data text, p_created_at double precision, p_last_active_at double precision,
            p_expires_at double precision, p_lock text, p_now double precision,
            p_max_sessions integer
        ) RETURNS void LANGUAGE plpgsql AS $body$"""
_LOCK_AND_INSERT = """
        BEGIN
            -- One creator per user at a time; each statement after the lock reads a
            -- snapshot of its own, so the eviction sees every earlier creator's session.
            PERFORM pg_advisory_xact_lock(hashtextextended(p_lock, 0));
            INSERT INTO {table} (id, token_digest, user_id, ip_address, user_agent,
                device_name, device_type, fingerprint, data, created_at, last_active_at,
                expires_at)
            VALUES (p_id, p_token_digest, p_user_id, p_ip_address, p_user_agent,
                p_device_name, p_device_type, p_fingerprint, p_data::jsonb, p_created_at,
                p_last_active_at, p_expires_at);"""

# Each entry upgrades the schema by one version. {table} is the quoted, schema-qualified
# table; {name} its bare name, for index names (PostgreSQL keeps indexes in its schema);
# {create} the quoted, schema-qualified name of the function that creates a session.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE {table} (
            id text PRIMARY KEY,
            token_digest text NOT NULL,
            user_id text NOT NULL,
            ip_address text,
            user_agent text,
            device_name text NOT NULL,
            device_type text NOT NULL,
            fingerprint text NOT NULL,
            data jsonb NOT NULL,
            created_at double precision NOT NULL,
            last_active_at double precision NOT NULL,
            expires_at double precision NOT NULL
        )""",
        'CREATE UNIQUE INDEX "{name}_token_digest" ON {table} (token_digest)',
        'CREATE INDEX "{name}_user_id" ON {table} (user_id, last_active_at)',
        'CREATE INDEX "{name}_expires_at" ON {table} (expires_at)',
    ),
    (
        "CREATE "
        + _CREATE_SIGNATURE
        + _LOCK_AND_INSERT
        + """
            DELETE FROM {table} WHERE user_id = p_user_id AND id NOT IN (
                SELECT id FROM {table} WHERE user_id = p_user_id AND expires_at > p_now
                ORDER BY last_active_at DESC, created_at DESC LIMIT p_max_sessions);
        END
        $body$""",
    ),
    (
        # The new session stays, and the eviction ranks the user's others only: with
        # another server's clock ahead, they could rank above it (the same signature, so
        # servers of the previous release call it unchanged).
        "CREATE OR REPLACE "
        + _CREATE_SIGNATURE
        + _LOCK_AND_INSERT
        + """
            DELETE FROM {table} WHERE user_id = p_user_id AND id <> p_id AND id NOT IN (
                SELECT id FROM {table}
                WHERE user_id = p_user_id AND id <> p_id AND expires_at > p_now
                ORDER BY last_active_at DESC, created_at DESC LIMIT p_max_sessions - 1);
        END
        $body$""",
    ),
    (
        # The digest the session's latest rotation left, kept until the notice time it
        # was given. Nullable without a default: PostgreSQL adds them without rewriting the
        # table, and existing sessions hold none. The index holds only the rows that have
        # one, so only a rotation's write pays for it.
        "ALTER TABLE {table} ADD COLUMN rotated_away_from text,"
        " ADD COLUMN rotated_away_until double precision",
        'CREATE INDEX "{name}_rotated_away_from" ON {table} (rotated_away_from)'
        " WHERE rotated_away_from IS NOT NULL",
    ),
)

SCHEMA_VERSION = len(MIGRATIONS)
# The oldest schema version whose code can use this one as it stands, recorded in the
# version table for releases that know only an older one (see accept_newer_schema). The
# third migration replaced the create function keeping its signature: code written for
# version 2 runs on it unchanged. The fourth added nullable columns, which older code
# neither names (it selects, inserts and updates by column) nor needs: its rotations leave
# them as they are, as this release's rotations without a notice time do. A migration that
# changes what older code reads or writes sets it to its own version.
COMPATIBLE_FROM = 2


@dataclass(frozen=True, slots=True)
class Sql:
    """The statements for one table, built once."""

    get: str
    list_for_user: str
    create: str
    remember_replaced: str
    touch: str
    due_touch: str
    is_live: str
    patch: str
    capped_patch: str
    guarded_patch: str
    remembering_patch: str
    rotated_away_to: str
    delete: str
    delete_for_user: str
    delete_expired: str
    stats: str

    @classmethod
    def for_table(cls, t: str, create: str) -> Sql:
        def times(row: str, cutoff: int) -> str:
            # The times $2 and $3, unless none are given or the row was last active after
            # the cutoff (see SessionUpdate.touch_if_last_active_by): then those stored, which
            # lets PostgreSQL update the row in place (HOT) when no indexed column changes.
            kept = f"{row}last_active_at > ${cutoff}::double precision"
            return (
                f"last_active_at = CASE WHEN {kept} THEN {row}last_active_at"
                f" ELSE coalesce($2, {row}last_active_at) END,"
                f" expires_at = CASE WHEN {kept} THEN {row}expires_at"
                f" ELSE coalesce($3, {row}expires_at) END"
            )

        update = f"UPDATE {{t}} SET {times('', 6)}, token_digest = coalesce($4, token_digest)"
        update += "{data} WHERE id = $1 AND expires_at > $5"
        merged = "(data - $7::text[]) || $8::text::jsonb"

        def capped_patch(guard: str, remember: str = "") -> str:
            # The patch, refused when the merged data's size exceeds $9. FOR UPDATE locks
            # the row before the size is taken, and reads its newest version: a concurrent
            # patch is waited for and measured, never merged past. Returns whether the row
            # changed and the size (NULL when the session is not live).
            return (
                f"WITH target AS (SELECT id, {merged} AS data FROM {t}"
                f" WHERE id = $1 AND expires_at > $5{guard} FOR UPDATE),"
                " sized AS (SELECT id, data, (SELECT coalesce(1 + count(*)"
                " + sum(octet_length(key) + 1 + octet_length(value)), 2)"
                " FROM jsonb_each_text(target.data)) AS size FROM target),"
                f" patched AS (UPDATE {t} AS s SET {times('s.', 6)},"
                f" token_digest = coalesce($4, s.token_digest), data = sized.data{remember}"
                " FROM sized"
                " WHERE s.id = sized.id AND sized.size <= $9 RETURNING 1)"
                " SELECT (SELECT count(*) FROM patched), (SELECT size FROM sized)"
            )

        return cls(
            get=f"SELECT {_COLUMNS} FROM {t} WHERE token_digest = $1 AND expires_at > $2",
            list_for_user=f"SELECT {_COLUMNS} FROM {t} WHERE user_id = $1 AND expires_at > $2"
            " ORDER BY last_active_at DESC, created_at DESC",
            create=f"SELECT {create}({', '.join(f'${n}' for n in range(1, 16))})",
            # A login over a live session: the new session $3 remembers that session's
            # digest $1 until $2, as a rotation's remembering patch would. Run after the
            # create function in its transaction, as the function's signature is fixed
            # (older releases call it too), so it cannot take them.
            remember_replaced=f"UPDATE {t} SET rotated_away_from = $1, rotated_away_until = $2"
            " WHERE id = $3",
            # A touch leaves ``data`` alone, so a large TOASTed value is not rewritten.
            touch=update.format(t=t, data=""),
            # A touch of the times $2 and $3 alone, due while the row was last active by $5,
            # writes no row when another request touched it since (then is_live tells, in a
            # statement of its own: this one's snapshot would still see a row a concurrent
            # logout deleted as it waited).
            due_touch=f"UPDATE {t} SET last_active_at = $2, expires_at = $3"
            " WHERE id = $1 AND expires_at > $4 AND last_active_at <= $5",
            is_live=f"SELECT EXISTS (SELECT FROM {t} WHERE id = $1 AND expires_at > $2)",
            patch=update.format(t=t, data=f", data = {merged}"),
            capped_patch=capped_patch(""),
            # Applied only while the session holds the digest $10 (a conditional rotation),
            # with any cap: rare, so it need not spare the data a rewrite.
            guarded_patch=capped_patch(" AND token_digest = $10"),
            # A rotation with a notice time: also remembers the digest rotated away ($10, the
            # one the guard found) until $11, in the same statement, so never without it.
            remembering_patch=capped_patch(
                " AND token_digest = $10",
                ", rotated_away_from = $10, rotated_away_until = $11",
            ),
            # Not the session's once it has expired, as for every other read.
            rotated_away_to=f"SELECT id FROM {t} WHERE rotated_away_from = $1"
            " AND rotated_away_until > $2 AND expires_at > $2 LIMIT 1",
            # Only the owner $3 and only while it holds the digest $4, where either is
            # given (the id finds the row). Whether the session was live; NULL if none.
            delete=f"DELETE FROM {t} WHERE id = $1 AND ($3::text IS NULL OR user_id = $3)"
            " AND ($4::text IS NULL OR token_digest = $4) RETURNING expires_at > $2",
            delete_for_user=f"WITH gone AS (DELETE FROM {t} WHERE user_id = $1"
            " AND id IS DISTINCT FROM $3 RETURNING expires_at)"
            " SELECT count(*) FROM gone WHERE expires_at > $2",
            # The batch chosen once (MATERIALIZED): as an IN subquery, a plan that ran it
            # again for each row (a semi join, on stale statistics) took the next rows
            # each time, past $2, the rows deleted so far being skipped as locked.
            delete_expired=f"WITH doomed AS MATERIALIZED (SELECT id FROM {t}"
            " WHERE expires_at <= $1 LIMIT $2 FOR UPDATE SKIP LOCKED),"
            f" gone AS (DELETE FROM {t} AS s USING doomed WHERE s.id = doomed.id RETURNING 1)"
            " SELECT count(*) FROM gone",
            # One statement, so one snapshot; the expired count is an expires_at index range.
            stats=f"SELECT e.n, u.n, d.types, d.counts"
            f" FROM (SELECT count(*) AS n FROM {t} WHERE expires_at <= $1) AS e,"
            f" (SELECT count(DISTINCT user_id) AS n FROM {t} WHERE expires_at > $1) AS u,"
            " (SELECT array_agg(device_type) AS types, array_agg(n) AS counts FROM"
            f" (SELECT device_type, count(*) AS n FROM {t} WHERE expires_at > $1"
            " GROUP BY device_type) AS g) AS d",
        )
