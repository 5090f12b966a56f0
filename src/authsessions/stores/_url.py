"""Store URLs: one string in config or the environment picks and configures a store."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING
from urllib.parse import unquote_plus

if TYPE_CHECKING:
    from authsessions.stores._base import Store

__all__ = ["DEFAULT_STORE_URL", "STORE_URL_ENV", "open_store", "redact_url", "resolve_store"]

DEFAULT_STORE_URL = "sqlite:///sessions.db"
STORE_URL_ENV = "AUTHSESSIONS_STORE"


def open_store(url: str) -> Store:
    """Build the store a URL names; it connects on first use (or ``await store.open()``).

    Accepted forms: ``memory://``, ``sqlite:///relative.db``,
    ``sqlite:////absolute.db``, ``postgresql://user@host:5432/db`` (or
    ``postgres://``), ``redis://host:6379/0`` (or ``rediss://``), and
    ``redis+cluster://host:6379`` (or ``rediss+cluster://``) for a Redis Cluster.

    Raises:
        ValueError: the URL's scheme is unknown or the URL is malformed. The
            message names the scheme only, never a password.
    """
    if not isinstance(url, str):
        raise ValueError(f"a store URL must be a string, got {type(url).__name__}.")
    scheme, separator, rest = url.partition("://")
    scheme = scheme.lower()
    if not separator:
        raise ValueError(
            "a store URL needs a scheme, e.g. sqlite:///sessions.db, memory://, "
            "postgresql://host/db or redis://host:6379/0."
        )
    if scheme == "memory":
        from authsessions.stores.memory import MemoryStore

        return MemoryStore()
    if scheme == "sqlite":
        from authsessions.stores.sqlite import SQLiteStore

        path, _, options = rest.removeprefix("/").partition("?")
        if not path:
            raise ValueError(
                "a sqlite URL needs a file: sqlite:///relative.db or sqlite:////absolute/path.db."
            )
        if options:
            raise ValueError(
                f"a sqlite URL takes no options, got '?{options:.40}': "
                "use SQLiteStore(path, timeout=...) for settings."
            )
        return SQLiteStore(path)
    if scheme in ("postgresql", "postgres"):
        from authsessions.stores.postgres import PostgresStore

        return PostgresStore(url)
    if scheme in ("redis", "rediss", "unix", "redis+cluster", "rediss+cluster"):
        from authsessions.stores.redis import RedisStore

        return RedisStore(url)
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


def redact_url(url: str) -> str:
    """``url`` with every password in it replaced by ``***``, for reprs, logs and messages:
    the one in ``user:password@`` and the value of any query option whose name holds
    "password" (libpq's ``password`` and ``sslpassword``, redis-py's ``password``).

    Spliced as text, not parsed: a password may hold an unescaped "/", "?" or "#", which
    a URL parser takes for the end of the host, showing the password as host or path.
    Everything before the last "@" is taken for the user part (more is hidden, never less).
    """
    scheme, separator, rest = url.partition("://")
    if not separator:
        return url
    at = rest.rfind("@")
    if at >= 0:
        user, colon, _password = rest[:at].partition(":")
        if colon:
            rest = f"{user}:***{rest[at:]}"
    location, question_mark, query = rest.partition("?")
    if question_mark:
        query, hash_mark, fragment = query.partition("#")
        query = "&".join(_redacted_option(option) for option in query.split("&"))
        rest = f"{location}?{query}{hash_mark}{fragment}"
    return f"{scheme}{separator}{rest}"


def _redacted_option(option: str) -> str:
    name, equals, _value = option.partition("=")
    return f"{name}=***" if equals and "password" in unquote_plus(name).lower() else option
