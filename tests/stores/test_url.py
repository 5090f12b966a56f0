"""``open_store``: one URL string (config, environment, CLI) picks and configures a store."""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

import pytest

from authsessions.stores import DEFAULT_STORE_URL, MemoryStore, SQLiteStore, Store, open_store
from authsessions.stores._url import redact_url

PASSWORD = "hunter2-s3cret"


def test_memory_url_builds_a_memory_store() -> None:
    store = open_store("memory://")

    assert isinstance(store, MemoryStore)
    assert not store.is_open


def test_memory_urls_build_independent_stores() -> None:
    assert open_store("memory://") is not open_store("memory://")


@pytest.mark.parametrize("url", ["MEMORY://", "Memory://"])
def test_scheme_is_case_insensitive(url: str) -> None:
    assert isinstance(open_store(url), MemoryStore)
    assert isinstance(open_store("SQLite:///sessions.db"), SQLiteStore)


async def test_three_slashes_name_a_file_relative_to_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)

    store = open_store("sqlite:///relative.db")

    assert isinstance(store, SQLiteStore)
    assert store.path == "relative.db"
    await opened_and_closed(store)
    assert (tmp_path / "relative.db").is_file()


def test_three_slashes_keep_relative_subdirectories() -> None:
    store = open_store("sqlite:///var/sessions.db")

    assert isinstance(store, SQLiteStore)
    assert store.path == "var/sessions.db"


async def test_four_slashes_name_an_absolute_file(tmp_path: Path) -> None:
    path = tmp_path / "absolute.db"
    url = f"sqlite:///{path}"
    assert url.startswith("sqlite:////")

    store = open_store(url)

    assert isinstance(store, SQLiteStore)
    assert store.path == str(path)
    await opened_and_closed(store)
    assert path.is_file()


def test_open_store_does_not_connect(tmp_path: Path) -> None:
    path = tmp_path / "lazy.db"

    store = open_store(f"sqlite:///{path}")

    assert not store.is_open
    assert not path.exists()


def test_default_url_is_a_sessions_db_in_the_working_directory() -> None:
    store = open_store(DEFAULT_STORE_URL)

    assert isinstance(store, SQLiteStore)
    assert store.path == "sessions.db"


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///", "sqlite:///?mode=ro"])
def test_sqlite_url_without_a_file_is_refused(url: str) -> None:
    with pytest.raises(ValueError, match=r"sqlite URL needs a file.*sqlite:///relative\.db"):
        open_store(url)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("sqlite://localhost/tmp/sessions.db", "names no host"),
        ("sqlite:///data/", "needs a file"),
        ("sqlite:///sessions.db#backup", "percent-encode it as %23"),
        ("sqlite:///sessions%00.db", "NUL"),
    ],
)
def test_a_sqlite_url_that_would_open_another_file_than_it_names_is_refused(
    url: str, message: str
) -> None:
    """Each opened a file the URL did not mean (a relative ``localhost/tmp/…``, a file
    named ``data``, one named ``sessions.db#backup``) or failed only at open (a NUL):
    refused with the URL, so the server stops at startup saying why."""
    with pytest.raises(ValueError, match=message):
        open_store(url)


def test_sqlite_memory_url_is_refused() -> None:
    with pytest.raises(ValueError, match="MemoryStore"):
        open_store("sqlite:///:memory:")


async def test_a_sqlite_uri_as_the_path_is_refused_and_a_file_so_named_can_be_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite built to take URIs would open uri.db for "file:uri.db", which no check of
    the path "file:uri.db" sees.
    """
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="not a SQLite URI"):
        open_store("sqlite:///file:uri.db")

    async with open_store("sqlite:///./file:named.db"):
        pass
    assert sorted(name for name in os.listdir(tmp_path) if name.endswith(".db")) == [
        "file:named.db"
    ]


@pytest.mark.parametrize(
    "url",
    ["mysql://app@db/app", "http://example.com/", "file:///tmp/x.db", "sqlite3:///x.db", "://x"],
)
def test_unknown_scheme_is_refused_with_the_accepted_forms(url: str) -> None:
    with pytest.raises(ValueError, match="unknown store URL scheme") as raised:
        open_store(url)

    assert "memory://" in str(raised.value)
    assert "sqlite:///" in str(raised.value)


@pytest.mark.parametrize("url", ["", "sessions.db", "/var/lib/sessions.db", "memory"])
def test_url_without_a_scheme_is_refused(url: str) -> None:
    with pytest.raises(ValueError, match="needs a scheme"):
        open_store(url)


@pytest.mark.parametrize(
    "url",
    [
        f"mysql://admin:{PASSWORD}@db.internal/app",
        f"mongodb+srv://admin:{PASSWORD}@cluster0.example.net/app",
        f"admin:{PASSWORD}@db.internal:5432/app",
        f"postgresql:/admin:{PASSWORD}@db.internal/app",
        f"redis//:{PASSWORD}@cache:6379/0",
    ],
    ids=["unknown-scheme", "unknown-scheme-srv", "no-scheme", "one-slash", "no-colon"],
)
def test_refused_url_never_echoes_its_password(url: str) -> None:
    """Error messages end up in logs, tracebacks and error pages; credentials must not."""
    with pytest.raises(ValueError, match="store URL") as raised:
        open_store(url)

    assert PASSWORD not in str(raised.value)
    assert PASSWORD not in repr(raised.value)
    assert raised.value.__cause__ is None or PASSWORD not in str(raised.value.__cause__)


NETWORKED = [
    ("postgresql://app:{}@db.internal:5432/app", "authsessions.stores.postgres", "PostgresStore"),
    ("postgres://app:{}@db.internal/app", "authsessions.stores.postgres", "PostgresStore"),
    ("redis://:{}@cache:6379/0", "authsessions.stores.redis", "RedisStore"),
    ("rediss://default:{}@cache:6380/1", "authsessions.stores.redis", "RedisStore"),
]


@pytest.mark.parametrize(
    ("template", "module", "class_name"),
    NETWORKED,
    ids=["postgresql", "postgres", "redis", "rediss"],
)
def test_networked_url_builds_its_store_without_showing_the_password(
    template: str, module: str, class_name: str
) -> None:
    """A store's repr lands in logs and debug pages; it must not carry the DSN's password."""
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not part of this tree yet")

    store = open_store(template.format(PASSWORD))

    assert type(store).__name__ == class_name
    assert not store.is_open
    assert PASSWORD not in repr(store)
    assert PASSWORD not in str(store)


async def opened_and_closed(store: Store) -> None:
    async with store:
        assert store.is_open
    assert not store.is_open


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://app:pw@db:5432/app", "postgresql://app:***@db:5432/app"),
        ("postgresql://db/app?password=pw", "postgresql://db/app?password=***"),
        (
            "postgresql://db/app?sslmode=require&sslpassword=pw&application_name=x",
            "postgresql://db/app?sslmode=require&sslpassword=***&application_name=x",
        ),
        ("postgresql://db/app?PASSWORD=pw", "postgresql://db/app?PASSWORD=***"),
        ("postgresql://db/app?pass%77ord=pw", "postgresql://db/app?pass%77ord=***"),
        ("redis://:pw@cache:6379/0", "redis://:***@cache:6379/0"),
        ("redis://cache:6379/0?password=pw&db=1", "redis://cache:6379/0?password=***&db=1"),
        ("rediss+cluster://u:pw@node:7000", "rediss+cluster://u:***@node:7000"),
        ("sqlite:///sessions.db", "sqlite:///sessions.db"),
        ("postgresql://db/app?sslmode=require", "postgresql://db/app?sslmode=require"),
        ("postgresql://[::1/app?password=pw", "postgresql://[::1/app?password=***"),
        ("postgresql://app:pa#ss@db/app", "postgresql://app:***@db/app"),
        ("postgresql://app:pa?ss/x@db/app", "postgresql://app:***@db/app"),
        ("postgresql://app:p@ss@db/app", "postgresql://app:***@db/app"),
        ("postgresql:///app?host=/tmp&password=pw", "postgresql:///app?host=/tmp&password=***"),
        ("postgresql://app@db/app", "postgresql://app@db/app"),
        # An unescaped "#" or "&" in a password option's value: what follows is hidden
        # up to the next option.
        ("redis://cache/0?password=pw#frag", "redis://cache/0?password=***"),
        ("postgresql://db/app?password=Tr0ub4dor&3horse", "postgresql://db/app?password=***"),
        (
            "rediss://c:6379/0?ssl_ca_certs=/ca.pem&password=Tr0ub#3horse&db=1",
            "rediss://c:6379/0?ssl_ca_certs=/ca.pem&password=***&db=1",
        ),
    ],
)
def test_redact_url_hides_every_password(url: str, shown: str) -> None:
    assert redact_url(url) == shown


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (
            "postgresql://pg.example.com/app?user=admin@server&password=pw",
            "postgresql://pg.example.com/app?user=admin@server&password=***",
        ),
        (
            "postgresql://db/app?password=pw&application_name=ops@laptop",
            "postgresql://db/app?password=***&application_name=ops@laptop",
        ),
        (
            "redis://cache/0?password=pw&client_name=web@host1",
            "redis://cache/0?password=***&client_name=web@host1",
        ),
    ],
    ids=["user-with-at", "option-after", "redis"],
)
def test_redact_url_hides_a_query_password_when_the_query_holds_an_at_sign(
    url: str, shown: str
) -> None:
    """An "@" may stand unescaped in a query (an Azure user "admin@server", an
    application name): the password option beside it is hidden all the same."""
    assert redact_url(url) == shown


@pytest.mark.parametrize(
    ("dsn", "shown"),
    [
        (
            f"host=db user=app password={PASSWORD} dbname=app",
            "host=db user=app password=*** dbname=app",
        ),
        (f"host=db password = '{PASSWORD} x' port=5432", "host=db password = *** port=5432"),
        # libpq reads a backslash as escaping the next character, a space included.
        (f"host=db password=a\\ {PASSWORD}\\\\ dbname=app", "host=db password=*** dbname=app"),
    ],
    ids=["word", "quoted", "escaped"],
)
def test_redact_url_hides_the_password_of_a_libpq_key_value_string(dsn: str, shown: str) -> None:
    """libpq's other connection string form; PostgresStore's repr and its "malformed"
    error both show the DSN through redact_url."""
    assert redact_url(dsn) == shown


@pytest.mark.parametrize(
    "url",
    [
        f"postgresql://app:{PASSWORD}@db/app?schema=auth&application_name=ops@laptop",
        f"redis://:{PASSWORD}@cache:6379/0?prefix=app1:&client_name=web@host1",
    ],
    ids=["postgres", "redis"],
)
def test_a_store_option_before_an_at_sign_in_the_query_is_refused_not_ignored(url: str) -> None:
    """The "@" reads as the end of a password, so the query seemed to start after it:
    ``?schema=`` and ``?prefix=`` were left to the driver, which ignored the one (sessions
    in "public") and refused the other as no option of its own."""
    with pytest.raises(ValueError, match="percent-encode it as %40") as raised:
        open_store(url)
    assert PASSWORD not in str(raised.value)
    assert open_store(url.replace("ops@laptop", "ops%40laptop").replace("web@host1", "web%40host1"))


@pytest.mark.skipif(importlib.util.find_spec("redis") is None, reason="redis-py not installed")
def test_a_password_that_holds_what_looks_like_a_store_option_is_taken_as_it_is() -> None:
    """ "&" and "=" may stand unescaped in a password: only a "?" starts the options."""
    store = open_store("redis://app:Xk2&prefix=9q@cache:6379/0")
    assert store.prefix == "authsessions:"  # type: ignore[attr-defined]
    assert "Xk2" not in repr(store)


def test_a_sqlite_url_with_options_is_refused_not_silently_ignored() -> None:
    with pytest.raises(ValueError, match=r"takes no options, got '\?mode=ro'"):
        open_store("sqlite:///sessions.db?mode=ro")


@pytest.mark.skipif(importlib.util.find_spec("redis") is None, reason="redis-py not installed")
@pytest.mark.parametrize("scheme", ["redis", "redis+cluster"])
def test_a_redis_url_option_redis_py_does_not_take_is_refused_when_the_store_is_built(
    scheme: str,
) -> None:
    """Not on the first connect, as the driver's own TypeError (RedisCluster, which
    takes options of its own, raised it at open)."""
    with pytest.raises(ValueError, match=r"does not take.*'foo'") as raised:
        open_store(f"{scheme}://:{PASSWORD}@127.0.0.1:6379/0?foo=bar")
    assert PASSWORD not in str(raised.value)
    assert open_store(f"{scheme}://127.0.0.1:6379/0?health_check_interval=5&socket_keepalive=true")


@pytest.mark.skipif(importlib.util.find_spec("asyncpg") is None, reason="asyncpg not installed")
def test_a_postgresql_url_names_the_schema_and_table_out_of_the_drivers_sight() -> None:
    store = open_store(
        f"postgresql://app:{PASSWORD}@db/app?sslmode=disable&schema=auth&table=web_sessions"
    )

    assert (store.schema, store.table) == ("auth", "web_sessions")  # type: ignore[attr-defined]
    assert repr(store) == (
        "PostgresStore('postgresql://app:***@db/app?sslmode=disable', table='auth.web_sessions')"
    )


@pytest.mark.skipif(importlib.util.find_spec("redis") is None, reason="redis-py not installed")
@pytest.mark.parametrize(
    ("url", "prefix", "shown"),
    [
        ("redis://cache:6379/0?prefix=app1:", "app1:", "redis://cache:6379/0"),
        (
            "redis://cache/0?db=1&prefix=a%26b%3A&health_check_interval=5#f",
            "a&b:",
            "redis://cache/0?db=1&health_check_interval=5#f",
        ),
        ("rediss://node:7000?prefix=", "", "rediss://node:7000"),
        (f"redis://:{PASSWORD}%3F@cache/0?prefix=p:", "p:", "redis://:***@cache/0"),
    ],
)
def test_a_redis_url_names_the_key_prefix_out_of_the_drivers_sight(
    url: str, prefix: str, shown: str
) -> None:
    store = open_store(url)

    assert store.prefix == prefix  # type: ignore[attr-defined]
    assert repr(store) == f"RedisStore({shown!r}, prefix={prefix!r})"


@pytest.mark.parametrize(
    ("url", "text"),
    [
        ("postgresql://db/app?schema=bad-name", "schema must be a plain identifier"),
        ("postgresql://db/app?table=", "table must be a plain identifier"),
        ("postgresql://db/app?schema=a&schema=b", "gives ?schema= twice"),
        ("redis://cache/0?prefix=app{1}:", "must not contain braces"),
        ("redis://cache/0?prefix=a&prefix=b", "gives ?prefix= twice"),
    ],
)
def test_a_stores_url_option_is_checked_as_its_constructor_checks_it(url: str, text: str) -> None:
    with pytest.raises(ValueError, match=re.escape(text)):
        open_store(url)


@pytest.mark.skipif(importlib.util.find_spec("redis") is None, reason="redis-py not installed")
def test_an_option_lookalike_inside_an_unescaped_password_is_not_taken() -> None:
    """Without a "?" after the last "@", a "?" may belong to the password (or the "@" to
    the query): taking an option from there would cut the URL and show the password's
    tail in the option's error. It is refused, and the password not shown.
    """
    for url in ("postgresql://app:pw?schema=sec-ret@db/app", "redis://:pw?prefix={sec-ret@cache/0"):
        with pytest.raises(ValueError, match="a '\\?' in the password as %3F") as raised:
            open_store(url)
        assert "sec-ret" not in str(raised.value)


def test_a_store_option_of_another_store_is_left_to_the_driver() -> None:
    """?schema= means nothing to Redis: redis-py refuses it, as any option it does not take."""
    with pytest.raises(ValueError, match="does not take"):
        open_store("redis://cache/0?schema=auth")


async def test_a_sqlite_url_path_is_percent_decoded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As in any URL: a space, a '?' (else taken for options) and a '%' itself encoded."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my app").mkdir()

    store = open_store("sqlite:///my%20app/why%3F%2525.db")

    assert store.path == "my app/why?%25.db"  # type: ignore[attr-defined]
    await opened_and_closed(store)
    assert (tmp_path / "my app" / "why?%25.db").is_file()


def test_a_sqlite_url_path_that_decodes_to_no_text_is_refused() -> None:
    with pytest.raises(ValueError, match=r"percent-encode UTF-8, e\.g\. %C3%A9"):
        open_store("sqlite:///sessions%FF.db")


@pytest.mark.parametrize("url", ["sqlite:/sessions.db", "sqlite:sessions.db", "SQLite:/x.db"])
def test_a_known_scheme_without_its_slashes_is_told_so(url: str) -> None:
    """ "needs a scheme" misled: the scheme was there."""
    with pytest.raises(
        ValueError, match=r"^a store URL's scheme is followed by '://', as in sqlite://"
    ):
        open_store(url)


def test_a_url_of_a_known_scheme_with_one_slash_too_few_names_that_scheme() -> None:
    with pytest.raises(ValueError, match=r"as in postgresql://…"):
        open_store("postgresql:/db")
