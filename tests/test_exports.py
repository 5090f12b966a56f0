"""The public surface: each ``__all__`` is honest, and every name API.md promises exists."""

from __future__ import annotations

import dataclasses
import inspect
import subprocess
import sys
import typing
from datetime import datetime, timedelta
from types import ModuleType

import pytest

import authsessions
import authsessions.fastapi
import authsessions.stores

API_ROOT_NAMES = {
    "SessionMiddleware",
    "Session",
    "SessionData",
    "SessionConfig",
    "SessionManager",
    "SessionError",
    "Unauthorized",
    "SessionNotFound",
    "SessionDataError",
    "StoreUnavailable",
}
API_STORE_NAMES = {
    "Store",
    "MemoryStore",
    "SQLiteStore",
    "PostgresStore",
    "RedisStore",
    "open_store",
}


def test_root_all_is_sorted_and_unique() -> None:
    assert authsessions.__all__ == sorted(authsessions.__all__)
    assert len(set(authsessions.__all__)) == len(authsessions.__all__)


@pytest.mark.parametrize("name", authsessions.__all__)
def test_root_names_are_importable_and_read_as_authsessions(name: str) -> None:
    exported = getattr(authsessions, name)

    assert exported.__module__ == "authsessions"
    assert repr(exported) == f"<class 'authsessions.{name}'>"


@pytest.mark.parametrize(
    ("exported", "field_name", "field_type"),
    [
        (authsessions.SessionData, "created_at", datetime),
        (authsessions.SessionConfig, "ttl", timedelta),
    ],
    ids=["SessionData", "SessionConfig"],
)
def test_the_fields_of_a_public_dataclass_resolve_where_it_reads_as_defined(
    exported: type, field_name: str, field_type: type
) -> None:
    """Frameworks read them (FastAPI's response models, Litestar's OpenAPI schema) in the
    module ``__module__`` names: annotations kept as strings there were unresolvable."""
    assert typing.get_type_hints(exported)[field_name] is field_type
    assert not [field.name for field in dataclasses.fields(exported) if isinstance(field.type, str)]


def test_root_exports_exactly_what_api_md_lists() -> None:
    assert set(authsessions.__all__) == API_ROOT_NAMES


@pytest.mark.parametrize(
    "module", [authsessions.stores, authsessions.fastapi], ids=lambda m: m.__name__
)
def test_every_name_in_a_public_modules_all_resolves(module: ModuleType) -> None:
    for name in module.__all__:
        assert getattr(module, name) is not None, name
    assert len(set(module.__all__)) == len(module.__all__)


def test_stores_export_what_api_md_lists() -> None:
    assert set(authsessions.stores.__all__) >= API_STORE_NAMES
    for name in API_STORE_NAMES - {"open_store"}:
        assert issubclass(getattr(authsessions.stores, name), authsessions.stores.Store)


def test_fastapi_exports_current_session() -> None:
    from authsessions.fastapi import CurrentSession, RequiredSession

    assert "CurrentSession" in authsessions.fastapi.__all__
    assert CurrentSession.__origin__ is authsessions.Session  # type: ignore[attr-defined]
    assert RequiredSession.__origin__ is authsessions.Session  # type: ignore[attr-defined]


def test_unknown_store_attribute_raises_attribute_error() -> None:
    with pytest.raises(AttributeError, match="NoSuchStore"):
        authsessions.stores.NoSuchStore  # noqa: B018


SYNC_MEMBERS = ["current", "get", "set", "remove_key"]
ASYNC_MEMBERS = [
    "authenticate",
    "authenticate_with",
    "rotate",
    "logout",
    "logout_all",
    "logout_other",
    "list_my_sessions",
    "revoke",
]


@pytest.mark.parametrize("name", SYNC_MEMBERS)
def test_session_reads_and_in_memory_writes_are_sync(name: str) -> None:
    member = getattr(authsessions.Session, name)

    assert callable(member)
    assert not inspect.iscoroutinefunction(member)


@pytest.mark.parametrize("name", ASYNC_MEMBERS)
def test_session_store_operations_are_async(name: str) -> None:
    assert inspect.iscoroutinefunction(getattr(authsessions.Session, name))


def test_session_properties_and_constructors() -> None:
    assert isinstance(authsessions.Session.user_id, property)
    assert isinstance(authsessions.Session.is_authenticated, property)
    assert isinstance(inspect.getattr_static(authsessions.Session, "from_request"), classmethod)
    assert isinstance(inspect.getattr_static(authsessions.Session, "from_scope"), classmethod)


def test_get_signature_matches_the_contract() -> None:
    parameters = inspect.signature(authsessions.Session.get).parameters

    assert list(parameters)[:4] == ["self", "key", "type", "default"]
    assert parameters["type"].default is None
    assert parameters["default"].default is None


def test_middleware_options_are_keyword_only() -> None:
    parameters = inspect.signature(authsessions.SessionMiddleware.__init__).parameters

    assert parameters["store"].kind is inspect.Parameter.KEYWORD_ONLY
    assert parameters["config"].kind is inspect.Parameter.KEYWORD_ONLY
    assert parameters["store"].default is None
    assert parameters["config"].default is None


def test_session_data_is_a_frozen_dataclass_with_the_documented_fields() -> None:
    fields = {f.name for f in dataclasses.fields(authsessions.SessionData)}

    assert fields == {
        "id",
        "user_id",
        "ip_address",
        "user_agent",
        "device_name",
        "device_type",
        "fingerprint",
        "data",
        "created_at",
        "last_active_at",
        "expires_at",
        "is_current",
    }
    assert authsessions.SessionData.__dataclass_params__.frozen  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (authsessions.SessionError, 500),
        (authsessions.Unauthorized, 401),
        (authsessions.SessionNotFound, 404),
        (authsessions.SessionDataError, 500),
        (authsessions.StoreUnavailable, 503),
    ],
)
def test_error_tree_and_status_codes(error: type[authsessions.SessionError], status: int) -> None:
    assert issubclass(error, authsessions.SessionError)
    assert error.status_code == status
    instance = error("custom message")
    assert instance.message == "custom message"
    assert "custom message" in repr(instance)
    assert str(status) in repr(instance)
    assert error().message  # every error has a default message


def test_session_data_error_is_also_a_value_error() -> None:
    assert issubclass(authsessions.SessionDataError, ValueError)


@pytest.mark.parametrize("name", ["list_for_user", "revoke", "revoke_all", "cleanup_expired"])
def test_session_manager_operations_are_async(name: str) -> None:
    assert inspect.iscoroutinefunction(getattr(authsessions.SessionManager, name))


def test_store_base_is_an_async_context_manager_with_close() -> None:
    store = authsessions.stores.Store

    assert inspect.iscoroutinefunction(store.close)
    assert inspect.iscoroutinefunction(store.__aenter__)
    assert inspect.iscoroutinefunction(store.__aexit__)
    assert not inspect.iscoroutinefunction(authsessions.stores.open_store)


def test_importing_the_package_loads_no_optional_driver() -> None:
    # The networked stores import their drivers lazily, so a SQLite-only app needs neither.
    code = (
        "import sys, authsessions, authsessions.stores; "
        "loaded = sorted({'asyncpg', 'redis', 'pydantic', 'fastapi'} & set(sys.modules)); "
        "print(loaded); sys.exit(1 if loaded else 0)"
    )

    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )

    assert result.returncode == 0, result.stdout + result.stderr
