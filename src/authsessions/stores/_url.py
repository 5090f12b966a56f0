"""Store URLs: one string in config or the environment picks and configures a store."""

from __future__ import annotations

import os
import re
import traceback
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, unquote, unquote_plus, urlsplit

if TYPE_CHECKING:
    from collections.abc import Iterator

    from authsessions.stores._base import Store

__all__ = ["DEFAULT_STORE_URL", "STORE_URL_ENV", "open_store", "redact_url", "resolve_store"]

DEFAULT_STORE_URL = "sqlite:///sessions.db"
_POSTGRES_SCHEMES = ("postgresql", "postgres")
_REDIS_SCHEMES = ("redis", "rediss", "unix", "redis+cluster", "rediss+cluster")
_SCHEMES = ("memory", "sqlite", *_POSTGRES_SCHEMES, *_REDIS_SCHEMES)
STORE_URL_ENV = "AUTHSESSIONS_STORE"


def open_store(url: str) -> Store:
    """Build the store a URL names, not yet open: ``SessionMiddleware`` and
    ``SessionManager`` open it on first use; called directly, its primitives need
    ``await store.open()`` (or ``async with store:``) first.

    Accepted forms: ``memory://``, ``sqlite:///relative.db``,
    ``sqlite:////absolute.db`` (percent-encoded: ``%20`` for a space, ``%3F`` for a
    ``?``, ``%25`` for a ``%``), ``postgresql://user@host:5432/db`` (or
    ``postgres://``), ``redis://host:6379/0`` (or ``rediss://``), and
    ``redis+cluster://host:6379`` (or ``rediss+cluster://``) for a Redis Cluster.

    Options of the store's own come in the query, and are taken out of the URL
    before the driver sees it: ``?schema=`` and ``?table=`` on a PostgreSQL URL,
    ``?prefix=`` on a Redis one (percent-encoded; ``:`` may stay as it is), as in
    ``postgresql://app@db/app?schema=auth`` or ``redis://cache:6379/0?prefix=app1:``.

    Raises:
        ValueError: the URL's scheme is unknown, the URL is malformed, or an option
            is given twice or refused by the store. The message never holds a password.
    """
    if not isinstance(url, str):
        raise ValueError(f"a store URL must be a string, got {type(url).__name__}.")
    scheme, separator, rest = url.partition("://")
    scheme = scheme.lower()
    if not separator:
        written, colon, _ = url.partition(":")
        if colon and written.lower() in _SCHEMES:
            raise ValueError(
                f"a store URL's scheme is followed by '://', as in {written.lower()}://… "
                "(sqlite:///relative.db, sqlite:////absolute/path.db)."
            )
        raise ValueError(
            "a store URL needs a scheme, e.g. sqlite:///sessions.db, memory://, "
            "postgresql://host/db or redis://host:6379/0."
        )
    if scheme == "memory":
        from authsessions.stores.memory import MemoryStore

        return MemoryStore()
    if scheme == "sqlite":
        from authsessions.stores.sqlite import SQLiteStore

        if rest and not rest.startswith("/"):
            # sqlite://localhost/x.db would open the relative path localhost/x.db.
            raise ValueError(
                "a sqlite URL names no host: sqlite:///relative.db or sqlite:////absolute/path.db."
            )
        path, _, options = rest.removeprefix("/").partition("?")
        if not path or path.endswith("/"):
            raise ValueError(
                "a sqlite URL needs a file: sqlite:///relative.db or sqlite:////absolute/path.db."
            )
        if "#" in path:
            raise ValueError(
                "a sqlite URL's path holds a '#': percent-encode it as %23 in a file name."
            )
        if options:
            raise ValueError(
                f"a sqlite URL takes no options, got '?{options:.40}': "
                "use SQLiteStore(path, timeout=...) for settings."
            )
        try:
            # Percent-encoded as in any URL: a '?' in a file name comes as %3F, a space as %20.
            path = unquote(path, errors="strict")
        except UnicodeDecodeError:
            raise ValueError(
                "a sqlite URL's path must percent-encode UTF-8, e.g. %C3%A9 for 'é'."
            ) from None
        if "\x00" in path:
            raise ValueError("a sqlite URL's path holds a NUL (%00), which no file name can.")
        return SQLiteStore(path)
    if scheme in _POSTGRES_SCHEMES:
        from authsessions.stores.postgres import PostgresStore

        url, named = _take_options(url, ("schema", "table"))
        return PostgresStore(url, **named)
    if scheme in _REDIS_SCHEMES:
        from authsessions.stores.redis import RedisStore

        url, named = _take_options(url, ("prefix",))
        return RedisStore(url, **named)
    raise ValueError(
        f"unknown store URL scheme {scheme!r}: use memory://, sqlite:///path.db, "
        "postgresql://…, redis://… or redis+cluster://…."
    )


def resolve_store(store: Store | str | None) -> tuple[Store, bool]:
    """The store an integration was given, and whether the integration owns it (must close it).

    ``None`` means ``$AUTHSESSIONS_STORE`` or else :data:`DEFAULT_STORE_URL`; a URL is
    built with :func:`open_store` and owned; a ``Store`` object stays its creator's.

    Raises:
        TypeError: ``store`` is none of these.
        ValueError: the URL is not one :func:`open_store` accepts.
    """
    from authsessions.stores._base import Store

    if store is None:
        store = os.environ.get(STORE_URL_ENV) or DEFAULT_STORE_URL
    if isinstance(store, str):
        return open_store(store), True
    if isinstance(store, Store):
        return store, False
    raise TypeError(f"store must be a Store or a store URL, got {type(store).__name__}.")


def _take_options(url: str, names: tuple[str, ...]) -> tuple[str, dict[str, Any]]:
    """``url`` without its query options named in ``names``, and their decoded values.

    Spliced as text (see :func:`_split_query`), so that everything else reaches the
    driver as written.
    """
    scheme, separator, rest = url.partition("://")
    location, query, fragment = _split_query(rest)
    if query is None:
        # After a "?" only: a password may hold "&" and "=" unescaped.
        after_a_question_mark = rest[rest.find("?") :] if "?" in rest else ""
        if any(match["name"] in names for match in QUERY_OPTION.finditer(after_a_question_mark)):
            # An "@" in the query hides it (read as a password's end): left to the driver,
            # the option would be ignored, or sent to the server as a setting.
            raise ValueError(
                f"the store URL {redact_url(url)} has an '@' after a store option: "
                "percent-encode it as %40 where it stands in the query (or a '?' in the "
                "password as %3F)."
            )
        return url, {}
    taken: dict[str, Any] = {}
    kept = []
    for option in query.split("&"):
        name, _, value = option.partition("=")
        if name not in names:
            kept.append(option)
        elif name in taken:
            raise ValueError(f"the store URL gives ?{name}= twice.")
        else:
            taken[name] = unquote(value)
    if not taken:
        return url, {}
    query = "&".join(kept)
    return f"{scheme}{separator}{location}{'?' if query else ''}{query}{fragment}", taken


def _split_query(rest: str) -> tuple[str, str | None, str]:
    """``rest`` (a URL after its "://") as the part before the query, the query (``None``
    without one) and the fragment with its "#".

    The query starts at the first "?" after the last "@": one before it may be inside
    an unescaped password, which must neither be shown nor taken for options.
    """
    start = rest.find("?", rest.rfind("@") + 1)
    if start < 0:
        return rest, None, ""
    query, hash_mark, fragment = rest[start + 1 :].partition("#")
    return rest[:start], query, f"{hash_mark}{fragment}"


def malformed_url(kind: str, shown: str, expected: str) -> ValueError:
    """The error for a URL the driver cannot parse, which never quotes the driver: its
    message may hold a piece of the password (an unescaped "/", "?" or "#" in it ends
    the host part, and the rest is read as a port or an option).
    """
    return ValueError(
        f"the {kind} URL {shown} is malformed: expected {expected} (percent-encode a '/', "
        "'?', '#' or '@' in the password, e.g. %2F for '/')."
    )


def tls_loading_error(exc: BaseException, loader: str) -> OSError | None:
    """The :class:`OSError` that ``exc`` is, or was raised from, when the function
    ``loader`` raised it (a qualified name: the driver's own code that loads the TLS
    files, before any network traffic); ``None`` for a connection's error (a missing Unix
    socket is a FileNotFoundError too).
    """
    for seen in exception_chain(exc):
        frames = [frame for frame, _ in traceback.walk_tb(seen.__traceback__)]
        if isinstance(seen, OSError) and frames and frames[-1].f_code.co_qualname == loader:
            return seen
    return None


def exception_chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, then the error it was raised from, and so on."""
    seen: BaseException | None = exc
    while seen is not None:
        yield seen
        seen = seen.__cause__ or seen.__context__


def unusable_tls_files(
    kind: str, url: str, named: list[tuple[str, str]], exc: OSError
) -> ValueError:
    """The error for TLS files the driver could not load as it connected, raising ``exc``
    (which names no file; see :func:`tls_loading_error`): no retry mends it. It names the
    files of ``named`` (option or variable name, path) that cannot be read, else all.
    """
    reason = " ".join(str(exc).split())
    unreadable = [f"{name}={path}" for name, path in named if not os.access(path, os.R_OK)]
    if unreadable:
        complaint = f"cannot read {', '.join(unreadable)} ({reason})"
    elif named:
        complaint = f"{reason}, in one of {', '.join(f'{name}={path}' for name, path in named)}"
    else:
        complaint = f"{reason}, in a TLS file it reads by default"
    return ValueError(f"the {kind} URL {redact_url(url)} cannot be used: {complaint}.")


def query_values(url: str) -> dict[str, str]:
    """The decoded values of the options in ``url``'s query, split as the drivers split it
    (``urllib.parse``), to name the files they read: not :func:`_split_query`, whose query
    starts after the last "@", and so found none in ``?user=admin@server&sslrootcert=…``.
    """
    return dict(parse_qsl(urlsplit(url).query))


# An option after a "?" or "&": its name, and its value up to the next "&" that starts
# another option (a "name=" follows it). A password's value may hold an unescaped "&" or
# "#": what follows it up to there is taken for the value (more is hidden, never less).
QUERY_OPTION = re.compile(r"(?<=[?&])(?P<name>[^?&#=]*)=(?:[^&]|&(?![^?&#=]*=))*")
# A libpq key=value connection string's password: a word (where a backslash escapes the
# next character, a space too), or a quoted string.
_CONNINFO_PASSWORD = re.compile(
    r"(?P<name>\b\w*password\s*=\s*)(?:'(?:[^'\\]|\\.)*'?|(?:\\.|[^\s\\])*\\?)",
    re.IGNORECASE | re.DOTALL,
)


def redact_url(url: str) -> str:
    """``url`` with every password in it replaced by ``***``, for reprs, logs and messages:
    the one in ``user:password@`` and the value of any query option whose name holds
    "password" (libpq's ``password`` and ``sslpassword``, redis-py's ``password``).

    Spliced as text, not parsed: a password may hold an unescaped "/", "?" or "#", which
    a URL parser takes for the end of the host, showing the password as host or path.
    Everything before the last "@" is taken for the user part (more is hidden, never less),
    and every ``name=value`` after a "?" or "&" for a query option, even one before that
    "@" (an "@" may stand unescaped in the query). A string without "://" is read as
    libpq's ``key=value`` form: its ``password=`` value is hidden.
    """
    scheme, separator, rest = url.partition("://")
    if not separator:
        # Not a URL: perhaps libpq's other form, "host=db user=app password=secret".
        return _CONNINFO_PASSWORD.sub(r"\g<name>***", url)
    at = rest.rfind("@")
    if at >= 0:
        user, colon, _password = rest[:at].partition(":")
        if colon:
            rest = f"{user}:***{rest[at:]}"
    # Every option that follows a "?" or "&", wherever it stands: the last "@" may be in
    # the query ("?user=admin@server&password=…"), and then no "?" comes after it.
    return f"{scheme}{separator}{QUERY_OPTION.sub(_redacted_option, rest)}"


def _redacted_option(match: re.Match[str]) -> str:
    name = match["name"]
    return f"{name}=***" if "password" in unquote_plus(name).lower() else match[0]
