"""A store in PostgreSQL, shared by every app server, through an asyncpg pool.

Every primitive is one statement, so one round trip (but a login over a
live session: a transaction of two, see ``create``). ``create`` calls a
function that the schema defines beside the table: it takes a
transaction-scoped advisory lock per user, inserts, then evicts, so
concurrent logins never leave a user above the limit. The eviction needs a
snapshot taken once the lock is held, so that it sees every session
committed by the creators before it (a single statement's snapshot predates
its wait for the lock); a PL/pgSQL function gives each of its statements a
snapshot of its own, in one round trip where a client-side transaction
takes four. The schema is created on open and versioned in a one-row table
beside it; an advisory lock makes concurrent opens by many processes safe.

Times are ``double precision`` UNIX seconds rather than ``timestamptz``: the
protocol speaks floats, callers choose ``now`` (tests run a clock of their
own), and a float survives the round trip bit for bit, where ``timestamptz``
would round it to the microsecond.

``data`` is a ``jsonb`` object mapping the JSON text of each top-level key
to the JSON text of its value (``(data->>'"theme"')::jsonb`` reads ``theme``).
``jsonb`` itself would rewrite numbers (``1e20`` reads back as a 21-digit
integer) and refuses ``\\u0000`` in strings and keys; JSON text keeps every
key and value exact, while the key-level patch stays one ``jsonb`` expression.
The same texts give the size ``max_data_bytes`` caps (``data_size``, the
length of the compact JSON object) without decoding anything: 2 for ``{}``,
plus for each key its text, a colon, its value's text and, after the first,
a comma. The texts are ASCII, so ``octet_length`` counts characters.
"""

from __future__ import annotations

import asyncio
import contextlib
import operator
import os
import re
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

from authsessions._records import (
    MAX_COUNT,
    SessionRecord,
    SessionUpdate,
    StoreStats,
    dump_json,
    load_json,
)
from authsessions.stores import _checks
from authsessions.stores._base import (
    CreateError,
    DataTooLarge,
    Store,
    accept_newer_schema,
    is_pool_refusal,
    log_schema_upgrade,
    store_unavailable,
    translate_errors,
)
from authsessions.stores._postgres_pool import Borrowed, HeldConnections, PooledConnections
from authsessions.stores._postgres_sql import COMPATIBLE_FROM, MIGRATIONS, SCHEMA_VERSION, Sql
from authsessions.stores._url import (
    QUERY_OPTION,
    malformed_url,
    query_values,
    redact_url,
    tls_loading_error,
    unusable_tls_files,
)

if TYPE_CHECKING:
    import asyncpg

__all__ = ["PostgresStore"]

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,39}")
# What the relations the store makes beside its table are named after it: "{table}{suffix}".
_NAMED_AFTER_THE_TABLE = (
    "_schema_version",
    "_pkey",
    "_token_digest",
    "_user_id",
    "_expires_at",
    "_rotated_away_from",
)


class PostgresStore(Store):
    """Sessions in a PostgreSQL table, created (and upgraded) on open.

    The store builds its own asyncpg pool from ``dsn``, or borrows the
    app's::

        store = PostgresStore("postgresql://app@db/app", max_size=20)
        store = PostgresStore(pool=app_pool)  # the app keeps closing it

    Args:
        dsn: a libpq-style URL; its password never appears in reprs or errors.
        pool: an asyncpg pool to use instead of building one; the store never
            closes it, and the pool's own settings govern connecting.
        schema: the schema holding the table; created when missing.
        table: the table's name; the version table is ``<table>_schema_version``.
        min_size: connections the store's own pool keeps open.
        max_size: the most connections the store's own pool opens.
        connect_timeout: seconds to establish a connection.
        command_timeout: seconds one statement may take.
        acquire_timeout: seconds to wait for a free connection (or to connect), and for
            a statement that timed out to be cancelled.

    An unreachable server or an exhausted pool gives
    :class:`~authsessions.StoreUnavailable` once these timeouts pass, never
    a hang: a server that stops answering mid-statement, after
    ``command_timeout`` and up to ``acquire_timeout`` more, while the pool
    waits for the statement's cancellation.

    The store keeps the idle connections of its own pool at hand between
    calls, sparing the pool's costly acquire and release; an app's pool is
    acquired from and released to on every call, so the app always gets its
    connections back (see ``_postgres_pool``).

    Raises:
        ImportError: asyncpg is not installed.
        TypeError: a size that is not an int, or a timeout that is not a number.
        ValueError: neither ``dsn`` nor ``pool``, or an invalid name, size or timeout;
            on open, a DSN asyncpg cannot parse.
        RuntimeError: on open, a ``pool`` never initialised (``create_pool`` not
            awaited) or already closed.
    """

    _bound_to_loop = True  # asyncpg's connections belong to the loop that opened them

    def __init__(
        self,
        dsn: str | None = None,
        *,
        pool: asyncpg.Pool[asyncpg.Record] | None = None,
        schema: str = "public",
        table: str = "authsessions_session",
        min_size: int = 1,
        max_size: int = 10,
        connect_timeout: float = 5.0,
        command_timeout: float = 5.0,
        acquire_timeout: float = 5.0,
    ) -> None:
        self._asyncpg = _import_asyncpg()
        if (dsn is None) == (pool is None):
            raise ValueError("PostgresStore needs a dsn or a pool (exactly one of them).")
        for what, name in (("schema", schema), ("table", table)):
            if not _IDENTIFIER.fullmatch(name):
                raise ValueError(
                    f"{what} must be a plain identifier of at most 40 characters "
                    f"(letters, digits, _), got {name!r}."
                )
        if schema.lower().startswith("pg_"):
            raise ValueError(
                f"schema names starting with pg_ are PostgreSQL's own, got {schema!r}."
            )
        if table.endswith(_NAMED_AFTER_THE_TABLE):
            # Another store's table "sessions" would name its index or version table so.
            raise ValueError(
                f"table must not end with {', '.join(_NAMED_AFTER_THE_TABLE)}: the store "
                f"names its indexes and version table so, got {table!r}."
            )
        min_size, max_size = _pool_size("min_size", min_size), _pool_size("max_size", max_size)
        if not 0 <= min_size <= max_size or max_size < 1:
            raise ValueError(
                f"need 0 <= min_size <= max_size and max_size >= 1, got {min_size}, {max_size}."
            )
        _checks.require_seconds("connect_timeout", connect_timeout)
        _checks.require_seconds("command_timeout", command_timeout)
        _checks.require_seconds("acquire_timeout", acquire_timeout)
        if dsn is not None and urllib.parse.urlsplit(dsn).netloc.count("@") > 1:
            # asyncpg ends the password at the first "@", and takes the rest of it for the
            # host: a lookup of a name that is part of the password, then 503s.
            raise _malformed_dsn(dsn)
        self._dsn = dsn
        self._given_pool = pool
        self.schema = schema
        self.table = table
        self.min_size = min_size
        self.max_size = max_size
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.acquire_timeout = acquire_timeout
        self._qualified = f'"{schema}"."{table}"'
        self._create_function = f'"{schema}"."{table}_create"'
        self._needs_read_committed = False  # learnt as the store opens
        self._sql = Sql.for_table(self._qualified, self._create_function)
        self._errors: tuple[type[BaseException], ...] = (
            self._asyncpg.PostgresError,
            self._asyncpg.InterfaceError,
            self._asyncpg.InternalClientError,  # a connection out of step with its server
            OSError,  # refused, reset, and TimeoutError (a connect, statement or acquire timeout)
        )
        self._pool: asyncpg.Pool[asyncpg.Record] | None = None
        self._connections: PooledConnections | None = None

    def __repr__(self) -> str:
        where = redact_url(self._dsn) if self._dsn is not None else "<app pool>"
        return f"PostgresStore({where!r}, table='{self.schema}.{self.table}')"

    # -- opening -------------------------------------------------------------------

    async def _open(self) -> None:
        with translate_errors("PostgreSQL", *self._errors):
            if self._given_pool is not None:
                pool = self._given_pool
            else:
                with self._refusing_a_malformed_dsn():
                    pool = await self._asyncpg.create_pool(
                        self._dsn,
                        min_size=self.min_size,
                        max_size=self.max_size,
                        timeout=self.connect_timeout,
                        command_timeout=self.command_timeout,
                        reset=_keep_connection_state,
                    )
            try:
                # With min_size=0 the pool connects, so parses the DSN, only here.
                with self._refusing_a_malformed_dsn(), self._refusing_an_unusable_pool():
                    async with PooledConnections(pool, self.acquire_timeout).borrow() as conn:
                        await self._migrate(conn)
                        # Every write counts on each statement reading a snapshot of its
                        # own, as only READ COMMITTED does: under another default (a
                        # database's, a role's, the DSN's) concurrent logins went past
                        # max_sessions, and a write or logout that waited for a row another
                        # server changed failed to serialise (a 503, the change lost).
                        self._needs_read_committed = (
                            await conn.fetchval(
                                "SHOW default_transaction_isolation",
                                timeout=self.command_timeout,
                            )
                            != "read committed"
                        )
            except BaseException:
                if pool is not self._given_pool:
                    pool.terminate()
                raise
        self._pool = pool
        if pool is self._given_pool:
            # The app's pool serves the app too: holding its connections could starve it.
            self._connections = PooledConnections(pool, self.acquire_timeout)
        else:
            self._connections = HeldConnections(pool, self.acquire_timeout, max_idle=self.max_size)

    async def _created_version(self) -> int | None:
        """The schema version of the session table (0 where none is recorded), ``None``
        when there is no such table, asked on a connection of its own without creating
        or upgrading anything: for the command line, where a mistyped ``?schema=`` or
        ``?table=`` would otherwise make a new, empty store, and a read would upgrade
        the schema unasked. This release's version with a pool of the app's, which only
        the app's own code is given.
        """
        if self._dsn is None:
            return SCHEMA_VERSION
        version_table = f'"{self.schema}"."{self.table}_schema_version"'
        with translate_errors("PostgreSQL", *self._errors), self._refusing_a_malformed_dsn():
            # command_timeout bounds the close too: a server gone silent held it for ever.
            conn = await self._asyncpg.connect(
                self._dsn, timeout=self.connect_timeout, command_timeout=self.command_timeout
            )
            try:
                found = await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", self._qualified)
                recorded = await self._recorded_schema(conn, version_table) if found else None
            finally:
                await conn.close()
        if not found:
            return None
        return 0 if recorded is None else recorded[0]

    @contextlib.contextmanager
    def _refusing_a_malformed_dsn(self) -> Iterator[None]:
        """Turn asyncpg's complaint about the DSN into :func:`malformed_url` (its own may
        quote the password). asyncpg parses the DSN only as it connects, and has no public
        way to parse it beforehand.
        """
        try:
            yield
        except ValueError as exc:  # asyncpg's ClientConfigurationError is one too
            if self._dsn is None:
                raise
            if str(exc).startswith(_TLS_COMPLAINTS):
                # Of a well-formed URL's TLS options or files, never quoting the password;
                # on one line, its HINT after it.
                raise ValueError(
                    f"the PostgreSQL URL {redact_url(self._dsn)} cannot be used: "
                    + " ".join(str(exc).split())
                ) from None
            raise _malformed_dsn(self._dsn) from None
        except OSError as exc:
            loading = tls_loading_error(exc, _ASYNCPG_TLS_LOADER)
            if self._dsn is None or loading is None:
                raise  # a connection's own failure: unavailable, as any outage is
            # A file the URL or the environment names, which no retry brings: said once
            # at startup with the file's name, not a 503 on every request logged with none.
            raise unusable_tls_files(
                "PostgreSQL", self._dsn, _tls_files(self._dsn), loading
            ) from None
        except self._asyncpg.PostgresError as exc:
            refused = self._refused_url_option(exc)
            if refused is None:
                raise
            raise refused from None

    @contextlib.contextmanager
    def _refusing_an_unusable_pool(self) -> Iterator[None]:
        """Name an app's pool that was never initialised (``create_pool`` not awaited) or
        is already closed: a mistake in the app, which "unavailable, try again shortly"
        would hide behind a 503 on every request.
        """
        try:
            yield
        except self._asyncpg.InterfaceError as exc:
            # The pool's own refusal only: the same class from a connection lost under a
            # transaction, and its subclasses, are outages.
            if self._given_pool is None or not is_pool_refusal(exc):
                raise
            raise RuntimeError(
                f"PostgresStore cannot use the pool it was given ({exc}): pass it"
                " `await asyncpg.create_pool(...)`, and close the pool after the store."
            ) from exc

    def _refused_url_option(self, exc: Exception) -> ValueError | None:
        """The error for an option of the URL the server refused as the connection started,
        ``None`` for any other failure. asyncpg sends the options it does not know itself
        as server settings, so a mistyped ``?sslmod=`` reached the server, and failing
        the same way on every try, it read as "unavailable, try again shortly".
        """
        what = _REFUSED_SETTING.get(str(getattr(exc, "sqlstate", "")))
        if self._dsn is None or what is None:
            return None
        named = re.search(r'"([^"]*)"', str(exc))
        if named is None:
            return None
        # The server quotes the setting's name (case-insensitive: "timezone" comes back as
        # "TimeZone"), or for some the value it refuses (`role "x" does not exist`).
        quoted = named[1].lower()
        for match in QUERY_OPTION.finditer(self._dsn):
            # Decoded as asyncpg decodes them, "+" as a space.
            name, _, value = (urllib.parse.unquote_plus(part) for part in match[0].partition("="))
            if quoted in (name.lower(), value.lower()):
                option = repr(name)
                break
            if name.lower() == "options":
                # libpq's server command line, which the server reads as settings of its own.
                for setting, setting_value in _COMMAND_LINE_SETTING.findall(value):
                    if quoted in (setting.lower(), setting_value.lower()):
                        option = f"'options' (its setting {setting!r})"
                        break
                else:
                    continue
                break
        else:
            return None
        # The option by its name alone: its value may be a password under a mistyped name.
        return ValueError(
            f"the PostgreSQL URL's option {option} is {what}. Options asyncpg does not "
            "know itself reach the server as settings; see asyncpg.connect for the ones it "
            "knows (sslmode, say)."
        )

    async def _migrate(self, conn: asyncpg.pool.PoolConnectionProxy[asyncpg.Record]) -> None:
        version_table = f'"{self.schema}"."{self.table}_schema_version"'
        # READ COMMITTED whatever the default: what the checks under the lock read must be
        # what the server that held it committed, not a snapshot from before it.
        async with self._transaction(conn):
            # A store at this release's schema (or a newer one it may use) needs no DDL,
            # nor the lock: the app's role need not be allowed to create tables when an
            # admin ran `authsessions migrate`.
            try:
                recorded = await self._recorded_schema(conn, version_table)
            except self._asyncpg.InsufficientPrivilegeError as exc:
                # Not "unavailable, retry": it fails the same way until someone else acts.
                raise RuntimeError(
                    f"This database role may not read the session table's schema version "
                    f"{self.schema}.{self.table}_schema_version ({exc}). Grant it USAGE on "
                    f"the schema {self.schema} and SELECT on that table."
                ) from exc
            if self._needs_no_migration(recorded):
                return
            try:
                upgraded_from = await self._upgrade(conn, version_table)
            except (
                self._asyncpg.DuplicateTableError,  # a table or an index
                self._asyncpg.DuplicateFunctionError,
            ) as exc:
                # The app's own, of the same name: retrying would meet it again.
                raise RuntimeError(
                    f"The session table {self.schema}.{self.table} cannot be created beside "
                    f"what the schema holds ({exc}). Give the store a table name of its own "
                    "(table=, or ?table= in its URL), or a schema of its own."
                ) from exc
            except self._asyncpg.InsufficientPrivilegeError as exc:
                # Not "unavailable, retry": it fails the same way until someone else acts.
                found = "no schema" if recorded is None else f"schema version {recorded[0]}"
                raise RuntimeError(
                    f"The session table {self.schema}.{self.table} has {found} and this "
                    f"release needs {SCHEMA_VERSION}, which this database role may not "
                    f"create ({exc}). Run `authsessions migrate` as a role that may, or "
                    "grant this one CREATE on the schema."
                ) from exc
        if upgraded_from is not None:
            log_schema_upgrade(
                f"The session table {self.schema}.{self.table}", upgraded_from, SCHEMA_VERSION
            )

    async def _upgrade(
        self, conn: asyncpg.pool.PoolConnectionProxy[asyncpg.Record], version_table: str
    ) -> int | None:
        """Bring the schema up to this release's, inside the caller's transaction; returns
        the version it found (0: none), or ``None`` when another server had done it."""
        timeout = self.command_timeout
        # Serialises concurrent opens (many workers starting at once): DDL races on
        # the catalogs otherwise, even with IF NOT EXISTS. Keyed on the schema, which
        # stores of other tables may be creating too, then on the table, as releases
        # before this one did.
        await conn.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended($1, 0)),"
            " pg_advisory_xact_lock(hashtextextended($2, 0))",
            f"authsessions migrate {self.schema}",
            f"authsessions migrate {self.schema}.{self.table}",
            timeout=timeout,
        )
        if not await conn.fetchval(
            "SELECT 1 FROM pg_namespace WHERE nspname = $1", self.schema, timeout=timeout
        ):
            await conn.execute(f'CREATE SCHEMA "{self.schema}"', timeout=timeout)
        await conn.execute(
            f"CREATE TABLE IF NOT EXISTS {version_table} (version integer NOT NULL)",
            timeout=timeout,
        )
        # Again under the lock: another server may have migrated since.
        recorded = await self._recorded_schema(conn, version_table)
        if self._needs_no_migration(recorded):
            return None
        version = 0 if recorded is None else recorded[0]
        for statements in MIGRATIONS[version:]:
            for statement in statements:
                sql = statement.format(
                    table=self._qualified, name=self.table, create=self._create_function
                )
                await conn.execute(sql, timeout=timeout)
        await conn.execute(
            f"ALTER TABLE {version_table} ADD COLUMN IF NOT EXISTS compatible_from integer",
            timeout=timeout,
        )
        await conn.execute(f"DELETE FROM {version_table}", timeout=timeout)
        await conn.execute(
            f"INSERT INTO {version_table} (version, compatible_from) VALUES ($1, $2)",
            SCHEMA_VERSION,
            COMPATIBLE_FROM,
            timeout=timeout,
        )
        return version

    async def _recorded_schema(
        self, conn: asyncpg.pool.PoolConnectionProxy[asyncpg.Record], version_table: str
    ) -> tuple[int, int | None] | None:
        """The schema version recorded and the oldest one marked able to use it; ``None``
        when there is no version table yet, (0, None) when it is empty.
        """
        timeout = self.command_timeout
        if await conn.fetchval("SELECT to_regclass($1)", version_table, timeout=timeout) is None:
            return None
        # compatible_from is missing from tables no release marked yet, so it is read
        # through to_jsonb. Not `SELECT *`: its result type changes when a migration adds
        # the column, and asyncpg, having prepared it before on the same connection (an
        # app's pool), failed inside the transaction with "cached plan must not change
        # result type".
        newest = await conn.fetchrow(
            f"SELECT version, (to_jsonb(v) ->> 'compatible_from')::integer"
            f" FROM {version_table} AS v ORDER BY version DESC LIMIT 1",
            timeout=timeout,
        )
        return (0, None) if newest is None else (newest[0], newest[1])

    def _needs_no_migration(self, recorded: tuple[int, int | None] | None) -> bool:
        """Whether the schema ``recorded`` is this release's, or a newer one it may use.

        Raises:
            RuntimeError: a newer schema not marked usable by this release.
        """
        if recorded is None or recorded[0] < SCHEMA_VERSION:
            return False
        version, compatible_from = recorded
        if version > SCHEMA_VERSION:
            accept_newer_schema(
                f"The session table {self.schema}.{self.table}",
                version,
                compatible_from,
                SCHEMA_VERSION,
            )
        return True

    def _forget_connections(self) -> None:
        pool, self._pool = self._pool, None
        self._connections = None
        if pool is not None and pool is not self._given_pool:
            # Their sockets, at least; what else they hold went with the loop.
            with contextlib.suppress(Exception):
                pool.terminate()

    async def _close(self) -> None:
        pool, self._pool = self._pool, None
        connections, self._connections = self._connections, None
        with translate_errors("PostgreSQL", *self._errors):
            if connections is not None:
                await connections.close()  # the pool's close waits for every connection
            if pool is not None and pool is not self._given_pool:
                await pool.close()

    def _borrow(self) -> Borrowed:
        if self._connections is None:
            raise self._closed_error()
        return self._connections.borrow()

    # -- primitives ------------------------------------------------------------------

    async def create(
        self,
        record: SessionRecord,
        *,
        max_sessions: int,
        now: float,
        replaced: tuple[str, float] | None = None,
    ) -> None:
        now = _checks.create_args(record, max_sessions, now, replaced)
        sql, timeout = self._sql, self.command_timeout
        with translate_errors("PostgreSQL", *self._errors):
            try:
                async with (
                    self._borrow() as conn,
                    # A login over a live session also marks the new session (see
                    # Sql.remember_replaced): one transaction, so that no session is ever
                    # created without its mark. Rare, so its BEGIN and COMMIT round trips
                    # are affordable; at READ COMMITTED whatever the default, as the
                    # function needs (see _read_committed). Every other login stays one
                    # statement, one round trip.
                    self._read_committed(conn) if replaced is None else self._transaction(conn),
                ):
                    await conn.execute(
                        sql.create,
                        record.id, record.token_digest, record.user_id, record.ip_address,
                        record.user_agent, record.device_name, record.device_type,
                        record.fingerprint, _encode_data(record.data), record.created_at,
                        record.last_active_at, record.expires_at,
                        f"{self._qualified} {record.user_id}", now, max_sessions,
                        timeout=timeout,
                    )  # fmt: skip
                    if replaced is not None:
                        await conn.execute(
                            sql.remember_replaced, replaced[0], replaced[1], record.id,
                            timeout=timeout,
                        )  # fmt: skip
            # Only the function's insert can raise it (the mark's columns are in no unique
            # index), and the transaction, if any, has rolled back: nothing was created.
            except self._asyncpg.UniqueViolationError:
                # Not chained: the violation's detail shows the taken digest.
                raise CreateError(record.id) from None

    def _read_committed(
        self, conn: asyncpg.pool.PoolConnectionProxy[asyncpg.Record]
    ) -> contextlib.AbstractAsyncContextManager[object]:
        """A READ COMMITTED transaction where connections default to another level."""
        if self._needs_read_committed:
            return self._transaction(conn)
        return contextlib.nullcontext()

    @contextlib.asynccontextmanager
    async def _transaction(
        self, conn: asyncpg.pool.PoolConnectionProxy[asyncpg.Record]
    ) -> AsyncIterator[None]:
        """A READ COMMITTED transaction, each of its statements bounded by
        ``command_timeout``, on a connection borrowed with ``_borrow()``.

        Not asyncpg's ``transaction()``: after a statement timed out or was cancelled,
        its ROLLBACK first waits for the statement's cancellation, bounded only by the
        pool's own ``command_timeout``, which an app's pool may not have: on a silent
        server the call never returned.
        """
        timeout = self.command_timeout
        await conn.execute("BEGIN ISOLATION LEVEL READ COMMITTED", timeout=timeout)
        try:
            yield
        except BaseException:
            await self._roll_back(conn)
            raise
        await conn.execute("COMMIT", timeout=timeout)

    async def _roll_back(self, conn: asyncpg.pool.PoolConnectionProxy[asyncpg.Record]) -> None:
        """End a failed transaction: ours to end, since the pool's release, finding it
        open, logs it as an error. ROLLBACK first waits for a timed-out or cancelled
        statement's cancellation; both within ``acquire_timeout``, as the release would
        wait, and a connection that cannot is terminated, as the release would do.
        """
        try:
            async with asyncio.timeout(self.acquire_timeout):
                await conn.execute("ROLLBACK")
        except Exception:
            with contextlib.suppress(self._asyncpg.InterfaceError):  # already given back
                conn.terminate()

    async def get(self, token_digest: str, *, now: float) -> SessionRecord | None:
        # Every authenticated request runs this: no context managers of our own here.
        connections = self._connections
        if connections is None:
            raise self._closed_error()
        try:
            row = await connections.fetchrow(
                self._sql.get, token_digest, now, seconds=self.command_timeout
            )
        except self._errors as exc:
            raise store_unavailable("PostgreSQL", exc)  # noqa: B904 (it chains itself)
        return _record(row) if row is not None else None

    async def update(self, session_id: str, changes: SessionUpdate, *, now: float) -> bool:
        now = _checks.update_args(session_id, changes, now)
        sql = self._sql
        cap, expected = changes.size_cap, changes.expected_token_digest
        cutoff = changes.touch_if_last_active_by
        if (
            cutoff is not None
            and changes.token_digest is None
            and expected is None
            and not changes.changes_data
        ):
            # A touch and nothing else: one another request made since writes no row.
            with translate_errors("PostgreSQL", *self._errors):
                async with self._borrow() as conn, self._read_committed(conn):
                    status = await conn.execute(
                        sql.due_touch, session_id, changes.last_active_at, changes.expires_at,
                        now, cutoff, timeout=self.command_timeout,
                    )  # fmt: skip
                    if _count(status) == 1:
                        return True
                    live: bool = await conn.fetchval(
                        sql.is_live, session_id, now, timeout=self.command_timeout
                    )
            return live
        args: tuple[Any, ...] = (
            session_id, changes.last_active_at, changes.expires_at, changes.token_digest, now,
            cutoff,
        )  # fmt: skip
        if changes.changes_data or expected is not None:
            removed = [dump_json(key) for key in changes.removed_keys]
            args += (removed, _encode_data(changes.set_keys))
        # The capped and guarded patches answer with whether they changed the row and the
        # data's size; the others with a row count.
        measured = True
        if expected is not None:
            # With the largest cap there is when none is asked for: nothing to refuse.
            args += (MAX_COUNT if cap is None else cap, expected)
            # A "rotation" onto the digest the session holds rotates nothing away.
            if changes.rotated_away_until is None or changes.token_digest == expected:
                statement = sql.guarded_patch
            else:
                statement, args = sql.remembering_patch, (*args, changes.rotated_away_until)
        elif cap is not None:
            statement, args = sql.capped_patch, (*args, cap)
        else:
            statement, measured = (sql.patch if changes.changes_data else sql.touch), False
        with translate_errors("PostgreSQL", *self._errors):
            try:
                async with self._borrow() as conn, self._read_committed(conn):
                    if not measured:
                        status = await conn.execute(statement, *args, timeout=self.command_timeout)
                        return _count(status) == 1
                    row = await conn.fetchrow(statement, *args, timeout=self.command_timeout)
            except self._asyncpg.UniqueViolationError:  # only a new digest can collide
                raise CreateError(session_id) from None  # its detail shows the digest
        assert row is not None  # a SELECT of two subqueries gives one row
        patched, size = row
        # Raised outside the borrowing: a refusal is no reason to give the connection up.
        if not patched and size is not None and cap is not None:
            raise DataTooLarge(size, cap)
        return bool(patched)

    async def rotated_away_to(self, token_digest: str, *, now: float) -> str | None:
        now = _checks.rotated_away_to_args(token_digest, now)
        # No transaction: one read, whatever the isolation, sees one snapshot.
        with translate_errors("PostgreSQL", *self._errors):
            async with self._borrow() as conn:
                found: str | None = await conn.fetchval(
                    self._sql.rotated_away_to, token_digest, now, timeout=self.command_timeout
                )
        return found

    async def delete(
        self,
        session_id: str,
        *,
        now: float,
        user_id: str | None = None,
        token_digest: str | None = None,
    ) -> bool:
        now = _checks.delete_args(session_id, user_id, token_digest, now)
        deleted = await self._fetchval(self._sql.delete, session_id, now, user_id, token_digest)
        return deleted is True

    async def delete_for_user(
        self, user_id: str, *, now: float, except_id: str | None = None
    ) -> int:
        now = _checks.delete_for_user_args(user_id, except_id, now)
        return int(await self._fetchval(self._sql.delete_for_user, user_id, now, except_id))

    async def list_for_user(self, user_id: str, *, now: float) -> list[SessionRecord]:
        now = _checks.list_for_user_args(user_id, now)
        with translate_errors("PostgreSQL", *self._errors):
            async with self._borrow() as conn:
                rows = await conn.fetch(
                    self._sql.list_for_user, user_id, now, timeout=self.command_timeout
                )
        return [_record(row) for row in rows]

    async def delete_expired(self, *, now: float, limit: int = 1000) -> int:
        now = _checks.delete_expired_args(now, limit)
        # SKIP LOCKED: two cleanup jobs at once split the backlog instead of queueing.
        return int(await self._fetchval(self._sql.delete_expired, now, limit))

    async def stats(self, *, now: float) -> StoreStats:
        """Counts from one aggregate statement, so one consistent snapshot.

        The expired count reads a range of the ``expires_at`` index; the live
        counts read every live row, which is fine for an admin tool.

        Raises:
            StoreUnavailable: the server failed or could not be reached.
        """
        now = _checks.require_time("now", now)
        with translate_errors("PostgreSQL", *self._errors):
            async with self._borrow() as conn:
                row = await conn.fetchrow(self._sql.stats, now, timeout=self.command_timeout)
        assert row is not None  # aggregates always give one row
        expired, users, types, counts = row
        return StoreStats(
            live_sessions=sum(counts or ()),
            users=users,
            by_device_type=dict(zip(types or (), counts or (), strict=True)),
            expired_sessions=expired,
        )

    async def _fetchval(self, sql: str, *args: Any) -> Any:
        """The first column of the first row ``sql`` returns, at READ COMMITTED."""
        with translate_errors("PostgreSQL", *self._errors):
            async with self._borrow() as conn, self._read_committed(conn):
                return await conn.fetchval(sql, *args, timeout=self.command_timeout)


async def _keep_connection_state(connection: asyncpg.Connection[asyncpg.Record]) -> None:
    """Skip asyncpg's reset query on release: the store sets no session state.

    Open transactions are still rolled back by the pool; advisory locks here
    are transaction-scoped. This saves a round trip on every call.
    """


# asyncpg's complaints, as their messages begin, about TLS settings and files: the same
# exception class as a DSN it cannot parse, whose message may hold a piece of a password.
_TLS_COMPLAINTS = (
    "root certificate file ",
    "`sslmode` parameter",
    "`sslnegotiation` parameter",
    "Unsupported TLS version",
    "No such TLS version",
    "direct TLS requires",
    "cannot determine location of user PostgreSQL configuration directory",
)


# Where asyncpg loads the TLS files, as it connects but before any network traffic.
_ASYNCPG_TLS_LOADER = "_parse_connect_dsn_and_args"
# The TLS files asyncpg reads as it connects: the URL's options, else the environment's.
_TLS_FILE_OPTIONS = {
    "sslrootcert": "PGSSLROOTCERT",
    "sslcert": "PGSSLCERT",
    "sslkey": "PGSSLKEY",
    "sslcrl": "PGSSLCRL",
}


def _tls_files(dsn: str) -> list[tuple[str, str]]:
    """The TLS files asyncpg reads for ``dsn``, each by the option or variable naming it."""
    given = query_values(dsn)
    named = []
    for option, variable in _TLS_FILE_OPTIONS.items():
        name, path = (
            (option, given[option]) if option in given else (variable, os.environ.get(variable))
        )
        if path and path != "system":
            named.append((name, path))
    return named


def _malformed_dsn(dsn: str) -> ValueError:
    return malformed_url(
        "PostgreSQL",
        redact_url(dsn),
        "postgresql://[user:password@]host[:port]/database[?option=value]",
    )


def _pool_size(name: str, size: object) -> int:
    """``size`` as the int asyncpg takes: any integer (a numpy one too), not a float or bool.

    Raises:
        TypeError: ``size`` is not an integer.
    """
    if not isinstance(size, bool):
        with contextlib.suppress(TypeError):
            return operator.index(size)  # type: ignore[arg-type]
    raise TypeError(f"{name} must be an int, got {type(size).__name__}.")


def _import_asyncpg() -> Any:
    try:
        import asyncpg
    except ImportError as exc:
        raise ImportError(
            "PostgresStore needs asyncpg: pip install 'authsessions[postgres]'"
        ) from exc
    return asyncpg


# A setting in the "options" connection parameter: "-c name=value" or "--name=value".
_COMMAND_LINE_SETTING = re.compile(r"(?:(?<!\S)-c\s*|(?<!\S)--)([\w.-]+)=(\S*)")

# What the server answers, as a connection starts, to a setting asyncpg passed on from the
# URL's options: no such setting, or not a value it takes.
_REFUSED_SETTING = {
    "42704": "no setting PostgreSQL knows",
    "22023": "given a value the server refuses",
    "55P02": "a setting that cannot be changed per connection",
    "42501": "a setting this role may not change",
}


def _encode_data(data: Any) -> str:
    return dump_json({dump_json(key): dump_json(value) for key, value in data.items()})


def _count(status: str) -> int:
    """The row count of a command tag such as ``DELETE 3``."""
    return int(status.rpartition(" ")[2])


def _record(row: asyncpg.Record) -> SessionRecord:
    # Positional, in the order _postgres_sql selects: this runs on every authenticated request.
    return SessionRecord(
        row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7],
        _decode_data(row[8]), row[9], row[10], row[11],
    )  # fmt: skip


def _decode_data(text: str) -> dict[str, Any]:
    """The data from ``data::text``: its keys' and values' JSON texts, joined into one
    JSON object and decoded in one go (joining in SQL would cost the server more).
    """
    texts: dict[str, str] = load_json(text)
    if not texts:
        return {}
    decoded: dict[str, Any] = load_json("{" + ",".join(map(":".join, texts.items())) + "}")
    return decoded
