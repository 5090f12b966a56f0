"""The ``authsessions`` command: run the demo, and manage sessions from a terminal.

::

    authsessions demo                      # http://127.0.0.1:8000, sessions in ./sessions.db
    authsessions migrate --store postgresql://app@db/app
    authsessions list 42 --json
    authsessions revoke-user 42            # e.g. after a password reset
    authsessions cleanup                   # cron it; expired sessions are refused anyway
    authsessions stats --json              # live sessions, users, device types

Every subcommand takes ``--store URL``, else ``$AUTHSESSIONS_STORE``, else
``sqlite:///sessions.db``. Only ``migrate`` and ``demo`` create a SQLite store;
the others refuse a file that holds none, and ``memory://`` (a store inside
one process; the demo takes it). Errors print one line on stderr and exit with 1.

click and rich come with the ``cli`` extra. The commands are built by
:func:`make_cli`, which imports them, so that without the extra :func:`main`
can say what to install instead of failing on import.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import socket
import sqlite3
import sys
import time
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from contextlib import closing, contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from authsessions import SessionData, SessionError, SessionManager, StoreUnavailable, __version__
from authsessions._records import MAX_COUNT, MAX_USER_ID_LENGTH, check_user_id
from authsessions._tokens import is_well_formed_session_id
from authsessions.stores import Store, StoreStats, open_store
from authsessions.stores._url import DEFAULT_STORE_URL, STORE_URL_ENV, redact_url

if TYPE_CHECKING:
    import click
    from rich.console import Console

__all__ = ["main", "make_cli"]

T = TypeVar("T")

CLI_EXTRA_MODULES = frozenset({"click", "rich", "uvicorn", "jinja2", "argon2", "multipart"})
INSTALL_HINT = "The authsessions command needs its extra: pip install 'authsessions[cli]'"


def main(argv: Sequence[str] | None = None) -> None:
    """Run the ``authsessions`` console script."""
    try:
        cli = make_cli()
    except ImportError as exc:
        _exit_with_install_hint(exc)
    cli.main(args=argv, prog_name="authsessions")


def _exit_with_install_hint(exc: ImportError) -> NoReturn:
    """Say which extra to install when ``exc`` is a module of it missing, else re-raise."""
    if (exc.name or "").partition(".")[0] not in CLI_EXTRA_MODULES:
        raise exc
    print(INSTALL_HINT, file=sys.stderr)
    sys.exit(1)


def make_cli() -> click.Group:
    """Build the ``authsessions`` command group.

    Raises:
        ImportError: click or rich is missing (the ``cli`` extra is not installed).
    """
    import click
    import rich  # noqa: F401 - fail now, not halfway through a command

    store_option = click.option(
        "--store",
        "store_url",
        metavar="URL",
        envvar=STORE_URL_ENV,
        default=DEFAULT_STORE_URL,
        show_default=True,
        show_envvar=True,
        help="The session store: sqlite:///file.db, postgresql://…, redis://…",
    )
    json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON, for scripts.")

    def user_id_argument(ctx: click.Context, param: click.Parameter, value: str) -> str:
        # check_user_id's own message is advice for Python callers ("pass str(user.id)").
        try:
            check_user_id(value)
        except ValueError:
            raise click.BadParameter(
                f"a user id is non-empty printable text of at most {MAX_USER_ID_LENGTH} "
                f"characters, got {value!r:.80}."
            ) from None
        return value

    class TakesAnId(click.Command):
        """A command whose argument is an id, which may start with "-" (one session id in
        64 does): after "--" any argument is an id, and so is anything shaped like a
        session id, wherever it stands. Another unknown option stays a usage error (a
        mistyped --json must not end the sessions of user "--jsn").
        """

        def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
            if "--" not in args:
                ids = [arg for arg in args if arg[:1] == "-" and is_well_formed_session_id(arg)]
                if ids:
                    args = [arg for arg in args if arg not in ids] + ["--", *ids]
            given_args = list(args)  # click's parser consumes the list it is given
            try:
                return super().parse_args(ctx, args)
            except click.NoSuchOption as exc:
                # A mistyped option: "Did you mean --json?", any long one, or one beside
                # the id already given. Advised as an id, it would end user "--jsn".
                if (
                    exc.possibilities
                    or exc.option_name.startswith("--")
                    or _gives_an_argument(self, given_args)
                ):
                    raise
                # "-5" or "-AbC" (which click reads as "-A" and more): the whole argument.
                name = exc.option_name
                given = next((arg for arg in given_args if arg.startswith(name)), name)
                raise click.UsageError(
                    f"{exc.format_message()} An id that starts with '-' goes after '--': "
                    f"{ctx.command_path} [OPTIONS] -- {given}",
                    ctx,
                ) from None

    @click.group(context_settings={"help_option_names": ["-h", "--help"]})
    @click.version_option(__version__, prog_name="authsessions")
    def cli() -> None:
        """Server-side sessions for ASGI apps: run the demo, inspect and end sessions."""

    @cli.command()
    @store_option
    @click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
    @click.option("--port", default=8000, type=click.IntRange(1, 65535), show_default=True)
    def demo(store_url: str, host: str, port: int) -> None:
        """Serve the demo web app over plain HTTP.

        Sign up, sign in, keep a preference in session data and manage your
        devices. Accounts go to demo-users.db beside a SQLite sessions file.
        """
        _serve_demo(store_url, host, port)

    @cli.command()
    @store_option
    def migrate(store_url: str) -> None:
        """Create or upgrade the store's schema; safe to run again."""
        with _library_notes() as notes:
            _run(_with_store(store_url, _nothing, create=True))
        out = _stdout()
        out.print(f"The session store at {redact_url(store_url)} is ready.")
        for note in notes:  # what was created or upgraded, or a newer schema opened
            out.print(note)

    @cli.command(name="list", cls=TakesAnId)
    @store_option
    @json_option
    @click.argument("user_id", callback=user_id_argument)
    def list_(store_url: str, as_json: bool, user_id: str) -> None:
        """List USER_ID's live sessions, most recently active first."""
        sessions = _run(_with_store(store_url, lambda s: SessionManager(s).list_for_user(user_id)))
        if as_json:
            click.echo(json.dumps([session_json(s) for s in sessions], indent=2))
        else:
            _print_sessions(_stdout(), user_id, sessions)

    @cli.command(cls=TakesAnId)
    @store_option
    @click.argument("session_id")
    def revoke(store_url: str, session_id: str) -> None:
        """End one session, by the id that `list` shows."""
        # The id's shape is checked first: a malformed one cannot exist, so skip the store.
        ended = is_well_formed_session_id(session_id) and _run(
            _with_store(store_url, lambda store: store.delete(session_id, now=time.time()))
        )
        if not ended:
            raise click.ClickException(f"no session with id {session_id!r}.")
        _stdout().print(f"Ended session {session_id}.")

    @cli.command(name="revoke-user", cls=TakesAnId)
    @store_option
    @click.argument("user_id", callback=user_id_argument)
    def revoke_user(store_url: str, user_id: str) -> None:
        """End every session of USER_ID, e.g. after a password reset."""
        ended = _run(_with_store(store_url, lambda s: SessionManager(s).revoke_all(user_id)))
        _stdout().print(f"Ended {_count(ended, 'session')} of user {user_id!r}.")

    @cli.command()
    @store_option
    @click.option("--batch-size", default=1000, type=click.IntRange(1, MAX_COUNT),
                  show_default=True, help="Sessions deleted per store call.")  # fmt: skip
    def cleanup(store_url: str, batch_size: int) -> None:
        """Delete expired sessions in batches, to reclaim space."""
        started = time.monotonic()
        deleted = _run(
            _with_store(store_url, lambda store: _cleanup_with_progress(store, batch_size))
        )
        elapsed = time.monotonic() - started
        _stdout().print(f"Deleted {_count(deleted, 'expired session')} in {elapsed:.1f} s.")

    @cli.command()
    @store_option
    @json_option
    def stats(store_url: str, as_json: bool) -> None:
        """Count live sessions, users, device types and expired sessions."""
        result = _run(_with_store(store_url, lambda store: store.stats(now=time.time())))
        if as_json:
            click.echo(json.dumps(stats_json(result), indent=2))
        else:
            _print_stats(_stdout(), redact_url(store_url), result)

    return cli


# -- running store work with one-line errors --------------------------------------------


async def _with_store(
    url: str,
    work: Callable[[Store], Coroutine[Any, Any, T]],
    *,
    create: bool = False,
    memory_ok: bool = False,
) -> T:
    """Open the store at ``url`` (creating its schema, or upgrading it), run ``work``, close it.

    Without ``create``, a SQLite file that holds no store is refused rather than
    created: a mistyped path would be a new, empty store, and the command's
    "0 sessions" a false success (and an unrelated database would gain our tables).
    Without ``memory_ok``, ``memory://`` is refused: a new memory store is empty,
    and the command would report on it as if it were the app's.
    """
    import click

    from authsessions.stores.memory import MemoryStore

    store = open_store(url)
    if isinstance(store, MemoryStore) and not memory_ok:
        raise click.ClickException(
            "memory:// names a store inside one process, not one this command can reach: "
            "give the app's store (sqlite:///…, postgresql://… or redis://…)."
        )
    if not create:
        _require_sqlite_store(store, url)
        await _require_postgres_store(store, url)
    async with store:
        return await work(store)


def _require_sqlite_store(store: Store, url: str) -> None:
    """Refuse a SQLite store whose file is missing, holds no session table, or holds an
    older schema, reading it through a read-only connection, so that nothing is written
    to it.
    """
    import click

    from authsessions.stores._sqlite_schema import SCHEMA_VERSION, TABLE, _recorded_version
    from authsessions.stores.sqlite import SQLiteStore

    if not isinstance(store, SQLiteStore):
        return
    path = store.path
    create = f"create it with: authsessions migrate --store {redact_url(url)}"
    if not os.path.isfile(path):
        raise click.ClickException(f"no session store at {path} ({create}).")
    uri = f"{Path(path).resolve().as_uri()}?mode=ro"
    if _is_closed_wal_database(path):
        # Read-only, SQLite would still make the -wal and -shm files it needs, and leave
        # them beside another app's file this refuses. No -wal: nobody has it open.
        uri += "&immutable=1"
    try:
        with closing(sqlite3.connect(uri, uri=True)) as db:
            found = db.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (TABLE,)
            ).fetchone()
            version = _recorded_version(db)[0] if found is not None else 0
    except sqlite3.Error as exc:
        raise click.ClickException(f"cannot read {path} as a session store: {exc}.") from None
    if found is None:
        raise click.ClickException(
            f"no session store in {path}: the file holds no authsessions tables "
            f"(check the path, or {create})."
        )
    _require_current_schema(version, SCHEMA_VERSION, url)


def _require_current_schema(version: int, current: int, url: str) -> None:
    """Refuse a store whose schema is older than this release's: only ``migrate`` upgrades
    it, when an operator chose to (on a large PostgreSQL table, an upgrade may build an
    index while requests wait)."""
    import click

    if version < current:
        raise click.ClickException(
            f"the session store's schema is version {version}, older than this release's "
            f"{current}; this command changes no schema. Upgrade it with: authsessions "
            f"migrate --store {redact_url(url)} (the app upgrades it too, as it opens the "
            "store)."
        )


def _is_closed_wal_database(path: str) -> bool:
    """Whether ``path`` is a database in WAL mode without a ``-wal`` file beside it."""
    try:
        with open(path, "rb") as file:
            header = file.read(20)
    except OSError:
        return False
    # The header's read and write versions, 2 in WAL mode.
    return header[18:20] == b"\x02\x02" and not os.path.exists(f"{path}-wal")


async def _require_postgres_store(store: Store, url: str) -> None:
    """Refuse a PostgreSQL store whose table does not exist, or whose schema is older than
    this release's, asking without creating or upgrading anything."""
    import click

    from authsessions.stores._postgres_sql import SCHEMA_VERSION
    from authsessions.stores.postgres import PostgresStore

    if not isinstance(store, PostgresStore):
        return
    version = await store._created_version()
    if version is None:
        raise click.ClickException(
            f"no session store in schema {store.schema!r} (create it with: authsessions "
            f"migrate --store {redact_url(url)}; or check ?schema= and ?table=, which "
            f"named the table {store.table!r})."
        )
    _require_current_schema(version, SCHEMA_VERSION, url)


async def _nothing(store: Store) -> None:
    """Opening the store is the whole of ``migrate``."""


def _run(work: Coroutine[Any, Any, T]) -> T:
    with one_line_errors():
        return asyncio.run(work)


@contextmanager
def one_line_errors() -> Iterator[None]:
    """Turn the failures a user can cause or fix into ``click.ClickException`` (one line, exit 1).

    Anything else is a bug, yet still shown as one line: a command line tool
    that prints a traceback for a typo in a URL teaches people to ignore it.
    """
    import click

    # The failure the library logs is the one this reports: kept here, not printed as
    # well (where nothing configured logging, Python would print it to stderr). A
    # command that succeeds prints them: a store that evicts keys, say.
    library_log, logged = logging.getLogger("authsessions"), _Warnings()
    library_log.addHandler(logged)
    try:
        yield
    except click.ClickException:
        raise
    except StoreUnavailable as exc:
        # Its message is made for an app's 503s ("try again shortly"); here the cause is
        # most often the command's own store URL: a path, a role, a database name.
        cause = exc.__cause__
        if cause is None:
            # Not chained where the driver's message could hold a statement's values; the
            # log line says what failed without them ("ReadOnlySQLTransactionError").
            said = logged.messages[-1] if logged.messages else exc.message
            raise click.ClickException(_first_line(said)) from None
        said = _first_line(str(cause)).rstrip(".") if str(cause) else type(cause).__name__
        raise click.ClickException(f"cannot use the session store: {said}.") from None
    except SessionError as exc:
        message = _first_line(exc.message)
        if exc.__cause__ is not None and str(exc.__cause__):
            # An operator can act on the driver's words ("unable to open database file").
            message += f" Cause: {_first_line(str(exc.__cause__))}"
        raise click.ClickException(message) from None
    except ImportError as exc:  # a driver the store's extra brings; its message names it
        raise click.ClickException(f"cannot load this store ({exc}).") from None
    except ValueError as exc:  # open_store: an unknown scheme or a malformed URL
        raise click.ClickException(_first_line(str(exc))) from None
    except Exception as exc:
        message = _first_line(str(exc))
        if type(exc) is not RuntimeError:
            message = f"{type(exc).__name__}: {message}"
        # Else where a store says what to do: a newer schema than this release knows, a
        # role that may not upgrade it, a table of that name that is not a session table.
        raise click.ClickException(message) from None
    else:
        for message in logged.messages:
            click.echo(f"Warning: {message}", err=True)
    finally:
        library_log.removeHandler(logged)


@contextmanager
def _library_notes() -> Iterator[list[str]]:
    """The library's informational log messages while it runs, gathered to be printed."""
    notes: list[str] = []

    class Gather(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno < logging.WARNING:  # warnings: see one_line_errors
                notes.append(record.getMessage())

    library_log, gather = logging.getLogger("authsessions"), Gather(logging.INFO)
    level = library_log.level
    library_log.setLevel(logging.INFO)
    library_log.addHandler(gather)
    try:
        yield notes
    finally:
        library_log.removeHandler(gather)
        library_log.setLevel(level)


class _Warnings(logging.Handler):
    """Keeps the messages of the warnings (or worse) logged, instead of printing them."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else "(no message)"


# -- what the commands compute ----------------------------------------------------------


async def _cleanup_with_progress(store: Store, batch_size: int) -> int:
    """``SessionManager.cleanup_expired``, reporting each batch to a progress bar.

    On a terminal the bar shows the batches as they go, against the store's
    count of expired sessions. A store that cannot count them (Redis, which
    drops them itself) is not asked, and there the bar just pulses. Off a
    terminal there is no bar, and no count.
    """
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    stderr = _stdout(stderr=True)
    progress = Progress(
        SpinnerColumn(),
        TextColumn("Deleting expired sessions"),
        BarColumn(),
        TextColumn("{task.completed:,} deleted"),
        TimeElapsedColumn(),
        console=stderr,
        transient=True,
        disable=not stderr.is_terminal,
    )
    total = None
    if stderr.is_terminal and store.counts_expired_sessions:
        total = (await store.stats(now=time.time())).expired_sessions or None
    with progress:
        task = progress.add_task("cleanup", total=total)
        return await SessionManager(store).cleanup_expired(
            batch_size=batch_size, on_batch=lambda deleted: progress.advance(task, deleted)
        )


def _serve_demo(store_url: str, host: str, port: int) -> None:
    try:  # not checked by make_cli: only the demo needs them, and they cost a start
        import uvicorn

        from authsessions.demo.app import create_app, users_path_for
    except ImportError as exc:
        _exit_with_install_hint(exc)

    with one_line_errors():
        app = create_app(store_url)
        # Open once before serving: a bad URL or an unreachable store fails here, in one
        # line, rather than as a 503 on every page; it also creates the schema.
        asyncio.run(_with_store(store_url, _nothing, create=True, memory_ok=True))
        listening = _listening_socket(host, port)
    out = _stdout()
    shown_host = f"[{host}]" if ":" in host else host  # an IPv6 address, as a URL has it
    out.print(f"authsessions demo on http://{shown_host}:{port}/ (Ctrl+C stops it)")
    out.print(f"  sessions: {redact_url(store_url)}   accounts: {users_path_for(store_url)}")
    if host not in ("127.0.0.1", "localhost", "::1"):
        out.print("  warning: plain HTTP; do not expose the demo beyond this machine.")
    # The app reads the client's address itself (trusted_proxies): uvicorn's own reading
    # of X-Forwarded-For, on by default for 127.0.0.1, would replace the peer with it.
    config = uvicorn.Config(app, host=host, port=port, log_level="info", proxy_headers=False)
    with suppress(KeyboardInterrupt):  # Ctrl+C is how the demo stops
        uvicorn.Server(config).run(sockets=[listening])


def _listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to ``host``:``port``, before the banner says where the demo is: on
    a taken port uvicorn failed only after the banner and the app's startup, with exit
    code 3.
    """
    import click

    ipv6 = ":" in host
    try:
        return socket.create_server(
            (host, port),
            family=socket.AF_INET6 if ipv6 else socket.AF_INET,
            # "::" serves IPv4 too, as uvicorn's own socket did.
            dualstack_ipv6=ipv6 and host == "::" and socket.has_dualstack_ipv6(),
        )
    except OSError as exc:
        # Without what create_server adds to it: the address, which the message has.
        reason = (exc.strerror or str(exc)).partition(" (while attempting to bind")[0]
        raise click.ClickException(
            f"cannot serve the demo on {host}:{port}: {reason}. Pass --port (and --host) to "
            "serve it elsewhere."
        ) from None


# -- printing ---------------------------------------------------------------------------


def session_json(session: SessionData) -> dict[str, Any]:
    """What ``list --json`` prints of a session: everything but its app data."""
    return {
        "id": session.id,
        "user_id": session.user_id,
        "device_name": session.device_name,
        "device_type": session.device_type,
        "ip_address": session.ip_address,
        "user_agent": session.user_agent,
        "created_at": session.created_at.isoformat(),
        "last_active_at": session.last_active_at.isoformat(),
        "expires_at": session.expires_at.isoformat(),
    }


def stats_json(stats: StoreStats) -> dict[str, Any]:
    """What ``stats --json`` prints: every count, device types most common first, and
    ``null`` for expired sessions a store does not count.
    """
    fields = {field.name: getattr(stats, field.name) for field in dataclasses.fields(stats)}
    return {**fields, "by_device_type": dict(_by_count(stats.by_device_type))}


def _by_count(counts: Mapping[str, int]) -> list[tuple[str, int]]:
    return sorted(counts.items(), key=lambda item: (-item[1], item[0]))


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def _stdout(*, stderr: bool = False) -> Console:
    from rich.console import Console

    # No markup and no emoji codes: printed values may hold brackets or ":name:", and
    # device names come from User-Agent headers, which anyone can write.
    console = Console(stderr=stderr, highlight=False, markup=False, emoji=False)
    if not console.is_terminal:
        # Piped into grep or a file: never wrap a session id across lines.
        console.width = 200
    return console


def _gives_an_argument(command: click.Command, args: list[str]) -> bool:
    """Whether ``args`` hold an argument of ``command`` besides its options and their
    values (after a "--", everything is one).
    """
    import click

    taking_values = {
        name
        for param in command.params
        if isinstance(param, click.Option) and not param.is_flag and not param.count
        for name in param.opts
    }
    values_next = False
    for arg in args:
        if values_next:
            values_next = False
        elif arg == "--":
            return arg is not args[-1]  # whatever follows is an argument
        elif arg.startswith("-"):
            values_next = arg in taking_values
        else:
            return True
    return False


def _print_sessions(console: Console, user_id: str, sessions: list[SessionData]) -> None:
    from rich.measure import Measurement
    from rich.table import Table

    from authsessions._humanize import format_utc, time_ago

    if not sessions:
        console.print(f"No live sessions for user {user_id!r}.")
        return
    rows = [
        (
            session.id,
            f"{session.device_name} ({session.device_type})",
            session.ip_address or "-",
            time_ago(session.last_active_at),
            format_utc(session.expires_at),
        )
        for session in sessions
    ]
    title = f"Sessions of user {user_id!r}"
    table = Table(title=title, title_justify="left")
    # The id and the address are what an admin copies or decides by: never cut short,
    # where the columns with spaces in them wrap, and fold a word they cannot wrap at
    # (rich may shrink them below their longest word, and would cut it short).
    table.add_column("ID", no_wrap=True)
    table.add_column("Device", overflow="fold")
    table.add_column("IP", no_wrap=True)
    table.add_column("Last active", overflow="fold")
    table.add_column("Expires", overflow="fold")
    for row in rows:
        table.add_row(*row)
    # Measured without the console's width, which the measure would be clamped to.
    unbounded = console.options.update_width(sys.maxsize)
    if Measurement.get(console, unbounded, table).minimum <= console.width:
        console.print(table)
        return
    # Too narrow a terminal for the table whole (an IPv6 address at 80 columns): a block
    # per session, each value on a line of its own.
    console.print(title, style="italic", markup=False)
    for session_id, device, ip_address, last_active, expires in rows:
        console.print(
            f"\n{session_id}\n  Device: {device}\n  IP: {ip_address}\n"
            f"  Last active: {last_active}\n  Expires: {expires}",
            markup=False,
            highlight=False,
            overflow="fold",
        )


def _print_stats(console: Console, where: str, stats: StoreStats) -> None:
    from rich.table import Table

    console.print(f"Session store: {where}")
    expired = (
        f"{_count(stats.expired_sessions, 'expired session')} awaiting cleanup"
        if stats.expired_sessions is not None
        else "expired sessions not counted (the store drops them itself)"
    )
    console.print(
        f"{_count(stats.live_sessions, 'live session')} of {_count(stats.users, 'user')}; "
        f"{expired}."
    )
    if stats.by_device_type:
        table = Table("Device type", "Live sessions")
        for kind, count in _by_count(stats.by_device_type):
            table.add_row(kind, f"{count:,}")
        console.print(table)


if __name__ == "__main__":  # python -m authsessions.cli, as the console script
    main()
