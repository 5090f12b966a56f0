"""Session values: only strict JSON goes in, typed reads come out strictly.

Every operation runs inside a real request through ``SessionMiddleware`` (the
``run`` fixture), and the store is checked afterwards: a rejected value must
leave both the in-memory session and the stored one as they were.
"""

from __future__ import annotations

import copy
import enum
import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, Protocol, assert_type

import httpx
import pytest
from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from typing_extensions import TypedDict

from authsessions import Session, SessionConfig, SessionDataError, SessionManager
from authsessions._tokens import token_digest
from authsessions._values import MAX_NESTING
from authsessions.stores import SQLiteStore, Store
from tests.apps.session_app import cookie_header, plant_session, session_cookie
from tests.conftest import AppFactory, ClientFactory

Action = Callable[[Session], Any]


@dataclass
class Outcome:
    """What an action did inside a request: its result or its error, and the response."""

    response: httpx.Response
    value: Any = None
    error: Exception | None = None
    data_after: dict[str, Any] | None = None


class Runner(Protocol):
    async def __call__(
        self,
        action: Action,
        *,
        data: dict[str, Any] | None = ...,
        signed_in: bool = ...,
        config: SessionConfig | None = ...,
    ) -> Outcome: ...


@pytest.fixture
def run(sqlite_store: Store, app_factory: AppFactory, client_factory: ClientFactory) -> Runner:
    """Run ``action(session)`` in one real request, signed in with ``data`` (or anonymous)."""

    async def runner(
        action: Action,
        *,
        data: dict[str, Any] | None = None,
        signed_in: bool = True,
        config: SessionConfig | None = None,
    ) -> Outcome:
        outcome_fields: dict[str, Any] = {}

        async def handler(request: Request) -> Response:
            session = Session.from_request(request)
            try:
                result = action(session)
                if inspect.isawaitable(result):
                    result = await result
                outcome_fields["value"] = result
            except Exception as exc:
                outcome_fields["error"] = exc
            current = session.current()
            outcome_fields["data_after"] = current.data if current is not None else None
            return JSONResponse({})

        app = app_factory(sqlite_store, config, extra_routes=[Route("/run", handler)])
        headers: dict[str, str] = {}
        if signed_in:
            token, _ = await plant_session(sqlite_store, "alice", data=data or {})
            headers = cookie_header(token)
        response = await client_factory(app).get("/run", headers=headers)
        assert response.status_code == 200, response.text
        return Outcome(response=response, **outcome_fields)

    return runner


async def stored_data(store: Store, user_id: str = "alice") -> dict[str, Any]:
    [session] = await SessionManager(store).list_for_user(user_id)
    return session.data


class Opaque:
    pass


def _deep(levels: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(levels):
        value = [value]
    return value


DEEP = _deep(100_000)  # deeper than json can encode: a RecursionError must not escape
CYCLIC_LIST: list[Any] = []
CYCLIC_LIST.append(CYCLIC_LIST)
CYCLIC_DICT: dict[str, Any] = {}
CYCLIC_DICT["self"] = CYCLIC_DICT


class Level(enum.IntEnum):
    HIGH = 3


class Name(str):
    pass


class Ratio(float):
    pass


# -- set ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        {1, 2},
        frozenset({1}),
        b"bytes",
        bytearray(b"x"),
        (1, 2),
        [1, (2, 3)],
        float("nan"),
        float("inf"),
        -float("inf"),
        {1: "non-str key"},
        {"nested": {2: "x"}},
        {"a": [{"b": {1, 2}}]},
        Opaque(),
        datetime(2024, 1, 1, tzinfo=UTC),
        1 + 2j,
        DEEP,
        _deep(MAX_NESTING),
        {"a": _deep(600)},  # taken, and then read back as a RecursionError, every request
        "smile \ud83d",  # JavaScript's "😀".slice(0, 1), as request.json() hands it on
        {"tags": ["ok", "x\udc00"]},
        CYCLIC_LIST,
        {"a": CYCLIC_DICT},
        Ratio("nan"),
        10**5000,  # Python will not write an int past 4300 digits
    ],
    ids=[
        "set",
        "frozenset",
        "bytes",
        "bytearray",
        "tuple",
        "nested-tuple",
        "nan",
        "inf",
        "-inf",
        "int-key",
        "nested-int-key",
        "deep-set",
        "object",
        "datetime",
        "complex",
        "too-deep",
        "nested-past-the-limit",
        "nested-600-deep-in-a-dict",
        "lone-surrogate",
        "lone-surrogate-in-a-list",
        "list-holding-itself",
        "dict-holding-itself",
        "float-subclass-nan",
        "int-past-4300-digits",
    ],
)
async def test_set_rejects_what_strict_json_cannot_hold_and_changes_nothing(
    run: Runner, sqlite_store: Store, value: object
) -> None:
    outcome = await run(lambda s: s.set("theme", value), data={"theme": "light"})

    assert isinstance(outcome.error, SessionDataError)
    assert isinstance(outcome.error, ValueError)
    assert "'theme'" in str(outcome.error)
    assert outcome.data_after == {"theme": "light"}
    assert await stored_data(sqlite_store) == {"theme": "light"}
    assert session_cookie(outcome.response) is None


@pytest.mark.parametrize(
    "value",
    ["café", "\U0001f600 and \u00e9", {"tags": ["\U0001f600", "\u2603"]}],
    ids=["accent", "emoji", "emoji-in-a-list"],
)
async def test_set_takes_any_whole_characters_and_reads_them_back_typed(
    run: Runner, sqlite_store: Store, value: object
) -> None:
    def action(session: Session) -> None:
        session.set("text", value)
        session.get("text", type=type(value))

    outcome = await run(action)

    assert outcome.error is None
    assert outcome.data_after == {"text": value}
    assert await stored_data(sqlite_store) == {"text": value}


async def test_set_takes_values_nested_as_deep_as_the_limit(
    run: Runner, sqlite_store: Store
) -> None:
    value = _deep(MAX_NESTING - 1)  # a list in a list..., MAX_NESTING of them

    outcome = await run(lambda s: s.set("tree", value))

    assert outcome.error is None
    assert outcome.data_after == {"tree": value}
    assert await stored_data(sqlite_store) == {"tree": value}


@pytest.mark.parametrize("key", [1, None, ("a",), b"key"], ids=["int", "none", "tuple", "bytes"])
async def test_set_rejects_non_string_keys(run: Runner, sqlite_store: Store, key: object) -> None:
    outcome = await run(lambda s: s.set(key, 1))  # type: ignore[arg-type]

    assert isinstance(outcome.error, SessionDataError)
    assert outcome.data_after == {}
    assert await stored_data(sqlite_store) == {}


@pytest.mark.parametrize("key", [1, None, ["a"], b"a"], ids=["int", "none", "list", "bytes"])
async def test_get_refuses_non_string_keys_as_set_does(run: Runner, key: object) -> None:
    """It returned the default (an int, bytes) or raised a bare "unhashable type" (a list),
    where set() and remove_key() say what keys are."""
    outcome = await run(lambda s: s.get(key), data={"a": 1, "1": 2})  # type: ignore[call-overload]

    assert isinstance(outcome.error, SessionDataError)
    assert "session keys are strings" in str(outcome.error)


async def test_set_refuses_a_key_holding_a_lone_surrogate(run: Runner, sqlite_store: Store) -> None:
    """As a value's (and a login's initial data's keys): no UTF-8 JSON could show it."""

    def action(session: Session) -> None:
        session.set("theme", "dark")
        session.set("half an emoji \ud83d", 1)

    outcome = await run(action)

    assert isinstance(outcome.error, SessionDataError)
    assert "lone surrogate" in str(outcome.error)
    assert outcome.data_after == {"theme": "dark"}
    assert await stored_data(sqlite_store) == {"theme": "dark"}  # the rest of the request's


async def test_set_accepts_plain_json_and_stores_a_copy(run: Runner, sqlite_store: Store) -> None:
    value: dict[str, Any] = {
        "s": "ünïcode",
        "i": 2**53,
        "f": -1.5,
        "b": False,
        "n": None,
        "l": [1, "two", [3.0], {"four": 4}],
        "d": {"deep": {"deeper": []}},
    }

    def action(session: Session) -> None:
        session.set("value", value)
        value["l"].append("mutated after set")

    outcome = await run(action)

    assert outcome.error is None
    expected = {**value, "l": [1, "two", [3.0], {"four": 4}]}
    assert outcome.data_after == {"value": expected}
    assert await stored_data(sqlite_store) == {"value": expected}


@pytest.mark.parametrize(
    "value", [2**63, -(2**63) - 1, 10**4299], ids=["2**63", "-2**63-1", "4300-digits"]
)
async def test_set_takes_ints_of_any_size_json_writes(
    run: Runner, sqlite_store: Store, value: int
) -> None:
    outcome = await run(lambda s: s.set("n", value))

    assert outcome.error is None
    assert await stored_data(sqlite_store) == {"n": value}


async def test_set_stores_subclasses_of_json_scalars_as_the_plain_values(
    run: Runner, sqlite_store: Store
) -> None:
    def action(session: Session) -> None:
        session.set("level", Level.HIGH)
        session.set("name", Name("alice"))
        session.set("ratio", Ratio(0.5))

    outcome = await run(action)

    assert outcome.error is None
    stored = await stored_data(sqlite_store)
    assert stored == {"level": 3, "name": "alice", "ratio": 0.5}
    assert [type(value) for value in stored.values()] == [int, str, float]
    assert outcome.data_after is not None
    assert [type(value) for value in outcome.data_after.values()] == [int, str, float]


class Key(enum.StrEnum):
    THEME = "theme-key"


async def test_set_stores_str_subclass_keys_as_plain_strings(
    run: Runner, sqlite_store: Store
) -> None:
    """A ``StrEnum`` member as a key reads back as the plain string in this request, in
    the store, and from the SQLite store's cache, which keeps the session layer's writes.
    """

    def action(session: Session) -> None:
        session.set(Key.THEME, "dark")
        session.set(Name("name-key"), "alice")

    outcome = await run(action, data={"a": 1})

    assert outcome.error is None
    assert outcome.data_after is not None
    assert [(type(key), key) for key in outcome.data_after] == [
        (str, "a"),
        (str, "theme-key"),
        (str, "name-key"),
    ]
    [stored] = await SessionManager(sqlite_store).list_for_user("alice")
    assert isinstance(sqlite_store, SQLiteStore)
    kept = sqlite_store._cache.kept(stored.id)
    assert kept is not None  # the request read the session, and its write kept it
    assert [type(key) for key in kept[0].data] == [type(key) for key in stored.data] == [str] * 3


async def test_max_data_bytes_is_enforced_with_a_message_naming_the_limit(
    run: Runner, sqlite_store: Store
) -> None:
    config = SessionConfig(max_data_bytes=100)

    outcome = await run(lambda s: s.set("big", "x" * 200), data={"small": 1}, config=config)

    assert isinstance(outcome.error, SessionDataError)
    assert "max_data_bytes=100" in str(outcome.error)
    assert outcome.data_after == {"small": 1}
    assert await stored_data(sqlite_store) == {"small": 1}


async def test_max_data_bytes_counts_the_whole_session_not_one_value(
    run: Runner, sqlite_store: Store
) -> None:
    config = SessionConfig(max_data_bytes=100)

    def action(session: Session) -> list[str]:
        results = []
        for key in ("a", "b", "c"):
            try:
                session.set(key, "y" * 30)
                results.append("ok")
            except SessionDataError:
                results.append("refused")
        return results

    outcome = await run(action, config=config)

    assert outcome.value == ["ok", "ok", "refused"]
    assert await stored_data(sqlite_store) == {"a": "y" * 30, "b": "y" * 30}


async def test_initial_data_may_nest_its_values_as_deep_as_set_takes(
    run: Runner, sqlite_store: Store
) -> None:
    """The data's own dict was counted as a level of its values: a value set() takes
    was refused at login."""
    value = _deep(MAX_NESTING - 1)  # as deep as set() takes

    taken = await run(lambda s: s.authenticate_with("bob", {"tree": value}), signed_in=False)
    refused = await run(lambda s: s.authenticate_with("bob", {"tree": [value]}), signed_in=False)

    assert taken.error is None
    assert await stored_data(sqlite_store, "bob") == {"tree": value}
    assert isinstance(refused.error, SessionDataError)
    assert f"more than {MAX_NESTING + 1} deep" in str(refused.error)


async def test_initial_data_is_held_to_the_same_rules(run: Runner) -> None:
    config = SessionConfig(max_data_bytes=50)

    too_big = await run(
        lambda s: s.authenticate_with("bob", {"big": "x" * 100}), signed_in=False, config=config
    )
    not_json = await run(lambda s: s.authenticate_with("bob", {"s": {1}}), signed_in=False)
    not_mapping = await run(
        lambda s: s.authenticate_with("bob", [("a", 1)]),  # type: ignore[arg-type]
        signed_in=False,
    )

    for outcome in (too_big, not_json, not_mapping):
        assert isinstance(outcome.error, SessionDataError)
        assert outcome.data_after is None
        assert session_cookie(outcome.response) is None
    assert "max_data_bytes=50" in str(too_big.error)


@pytest.mark.parametrize("user_id", ["", "x" * 256, "al\x00ice", "bob\n", 42, None])
async def test_authenticate_rejects_user_ids_no_store_can_keep(
    run: Runner, sqlite_store: Store, user_id: Any
) -> None:
    """Empty, overlong, non-string and control-character ids are refused before any write:
    PostgreSQL cannot store NUL, and newlines would forge lines in logs and admin tables."""
    outcome = await run(lambda s: s.authenticate(user_id), signed_in=False)

    assert isinstance(outcome.error, ValueError)
    assert not isinstance(outcome.error, SessionDataError)
    assert "user_id" in str(outcome.error)
    assert session_cookie(outcome.response) is None
    assert (await sqlite_store.stats(now=time.time())).live_sessions == 0


async def test_authenticate_takes_the_longest_user_id_every_store_keeps(
    run: Runner, sqlite_store: Store
) -> None:
    longest = "x" * 255

    outcome = await run(lambda s: s.authenticate(longest), signed_in=False)

    assert outcome.error is None
    assert session_cookie(outcome.response) is not None
    assert len(await SessionManager(sqlite_store).list_for_user(longest)) == 1


async def test_set_without_session_is_a_no_op(run: Runner, sqlite_store: Store) -> None:
    outcome = await run(lambda s: s.set("theme", "dark"), signed_in=False)

    assert outcome.error is None
    assert outcome.data_after is None
    assert "set-cookie" not in outcome.response.headers
    assert await SessionManager(sqlite_store).list_for_user("alice") == []


# -- remove_key ---------------------------------------------------------------------------------


async def test_remove_key_removes_and_is_written(run: Runner, sqlite_store: Store) -> None:
    outcome = await run(lambda s: s.remove_key("drop"), data={"drop": 1, "keep": 2})

    assert outcome.data_after == {"keep": 2}
    assert await stored_data(sqlite_store) == {"keep": 2}


async def test_remove_key_refuses_a_key_that_is_not_a_string(
    run: Runner, sqlite_store: Store
) -> None:
    """Not merely "not there": an object equal to a stored key would remove it."""

    class LooksLikeDrop:
        def __eq__(self, other: object) -> bool:
            return other == "drop"

        def __hash__(self) -> int:
            return hash("drop")

    outcome = await run(lambda s: s.remove_key(LooksLikeDrop()), data={"drop": 1})  # type: ignore[arg-type]

    assert isinstance(outcome.error, SessionDataError)
    assert await stored_data(sqlite_store) == {"drop": 1}


async def test_remove_key_of_missing_key_is_a_no_op(run: Runner, sqlite_store: Store) -> None:
    outcome = await run(lambda s: s.remove_key("never-there"), data={"keep": 2})

    assert outcome.error is None
    assert outcome.data_after == {"keep": 2}
    assert session_cookie(outcome.response) is None
    assert await stored_data(sqlite_store) == {"keep": 2}


async def test_remove_key_without_session_is_a_no_op(run: Runner) -> None:
    outcome = await run(lambda s: s.remove_key("anything"), signed_in=False)

    assert outcome.error is None
    assert "set-cookie" not in outcome.response.headers


async def test_set_then_remove_in_one_request_leaves_the_key_absent(
    run: Runner, sqlite_store: Store
) -> None:
    def action(session: Session) -> None:
        session.set("k", 1)
        session.remove_key("k")
        session.set("other", 2)

    await run(action, data={"k": 0})

    assert await stored_data(sqlite_store) == {"other": 2}


# -- get --------------------------------------------------------------------------------------

STORED = {
    "int": 1,
    "str_int": "1",
    "bool": True,
    "float": 1.5,
    "list": [1, 2],
    "mixed_list": [1, "2"],
    "dict": {"a": 1},
    "none": None,
    "cart": {"items": [1, 2], "total": 3.5},
    "bad_cart": {"items": ["1"], "total": 3.5},
    "huge_int": 10**400,
}


async def read(run: Runner, key: str, type_: Any) -> Outcome:
    return await run(lambda s: s.get(key, type=type_), data=STORED)


@pytest.mark.parametrize(
    ("key", "type_", "expected"),
    [
        ("int", int, 1),
        ("int", None, 1),
        ("str_int", str, "1"),
        ("bool", bool, True),
        ("float", float, 1.5),
        ("list", list, [1, 2]),
        ("dict", dict, {"a": 1}),
        ("list", list[int], [1, 2]),
        ("dict", dict[str, int], {"a": 1}),
    ],
)
async def test_get_returns_values_of_the_right_type(
    run: Runner, key: str, type_: Any, expected: object
) -> None:
    outcome = await read(run, key, type_)

    assert outcome.error is None
    assert outcome.value == expected
    assert type(outcome.value) is type(expected)


async def test_get_accepts_an_int_as_float(run: Runner) -> None:
    outcome = await read(run, "int", float)

    assert outcome.value == 1.0
    assert type(outcome.value) is float


@pytest.mark.parametrize(
    ("key", "type_"),
    [
        ("str_int", int),
        ("int", str),
        ("bool", int),
        ("bool", float),
        ("int", bool),
        ("float", int),
        ("list", dict),
        ("dict", list),
        ("none", int),
        ("mixed_list", list[int]),
        ("str_int", list[int]),
        ("huge_int", float),  # no float holds it
        ("huge_int", float | None),  # nor read through pydantic, which made it inf
    ],
    ids=lambda p: getattr(p, "__name__", str(p)),
)
async def test_get_converts_strictly(run: Runner, key: str, type_: Any) -> None:
    """No "1" -> 1, no True -> 1: a lenient read would hide corrupt or forged data."""
    outcome = await read(run, key, type_)

    assert isinstance(outcome.error, SessionDataError)
    assert repr(key) in str(outcome.error)


@dataclass
class Cart:
    items: list[int]
    total: float
    note: str = ""


class CartDict(TypedDict):
    items: list[int]
    total: float


class CartModel(BaseModel):
    items: list[int]
    total: float


async def test_get_converts_to_a_dataclass(run: Runner) -> None:
    outcome = await read(run, "cart", Cart)

    assert outcome.value == Cart(items=[1, 2], total=3.5)


async def test_get_converts_to_a_typeddict(run: Runner) -> None:
    outcome = await read(run, "cart", CartDict)

    assert outcome.value == {"items": [1, 2], "total": 3.5}


async def test_get_converts_to_a_pydantic_model(run: Runner) -> None:
    outcome = await read(run, "cart", CartModel)

    assert isinstance(outcome.value, CartModel)
    assert outcome.value.items == [1, 2]


@pytest.mark.parametrize("type_", [Cart, CartDict, CartModel], ids=lambda t: t.__name__)
async def test_structured_types_are_converted_strictly_too(run: Runner, type_: Any) -> None:
    outcome = await read(run, "bad_cart", type_)

    assert isinstance(outcome.error, SessionDataError)
    assert "'bad_cart'" in str(outcome.error)


async def test_get_returns_default_for_a_missing_key(run: Runner) -> None:
    outcome = await run(
        lambda s: (s.get("missing"), s.get("missing", default=7), s.get("missing", int, 7)),
        data=STORED,
    )

    assert outcome.value == (None, 7, 7)


async def test_typed_reads_have_the_static_types_of_what_they_return(run: Runner) -> None:
    """Checked by mypy over this file (assert_type) and at run time: a default of the
    type read gives that type, not Optional; a union, Optional or Literal is taken."""

    def reads(session: Session) -> tuple[object, ...]:
        theme = session.get("theme", type=str, default="light")
        assert_type(theme, str)
        count = session.get("int", type=int)
        assert_type(count, int | None)
        either = session.get("str_int", type=int | str)
        mode = session.get("mode", type=Literal["light", "dark"], default="dark")
        return theme, count, either, mode

    outcome = await run(reads, data=STORED)

    assert outcome.error is None
    assert outcome.value == ("light", 1, "1", "dark")


async def test_get_returns_default_without_a_session(run: Runner) -> None:
    outcome = await run(
        lambda s: (s.get("int"), s.get("int", default="d"), s.get("int", type=int, default=3)),
        signed_in=False,
    )

    assert outcome.value == (None, "d", 3)


async def test_get_of_a_stored_null_is_none_not_the_default(run: Runner) -> None:
    outcome = await run(lambda s: s.get("none", default="d"), data=STORED)

    assert outcome.value is None


async def test_mutating_a_read_value_does_not_change_what_is_stored(
    run: Runner, sqlite_store: Store
) -> None:
    def action(session: Session) -> None:
        session.get("list").append(3)
        session.set("other", True)  # forces a write of the session

    await run(action, data={"list": [1, 2]})

    assert await stored_data(sqlite_store) == {"list": [1, 2], "other": True}


async def test_current_returns_a_copy(run: Runner, sqlite_store: Store) -> None:
    def action(session: Session) -> tuple[Any, Any]:
        snapshot = session.current()
        assert snapshot is not None
        snapshot.data["injected"] = True
        snapshot.data["list"].append(3)
        return session.get("injected"), session.get("list")

    outcome = await run(action, data={"list": [1, 2]})

    assert outcome.value == (None, [1, 2])
    assert await stored_data(sqlite_store) == {"list": [1, 2]}


async def test_get_converts_to_a_type_that_cannot_be_hashed(run: Runner) -> None:
    """Metadata pydantic does not know is legal, and leaves the type unhashable: the
    check for plain types and the adapters' cache raised TypeError (a 500)."""
    seconds = Annotated[int, {"unit": "s"}]

    outcome = await run(lambda s: s.get("timeout", type=seconds), data={"timeout": 30})

    assert outcome.error is None
    assert outcome.value == 30


async def test_get_with_a_type_nothing_can_convert_to_raises_session_data_error(
    run: Runner,
) -> None:
    outcome = await read(run, "dict", Opaque)

    assert isinstance(outcome.error, SessionDataError)


async def test_a_record_the_store_shares_between_requests_is_never_changed(
    sqlite_store: Store, app_factory: AppFactory, client_factory: ClientFactory
) -> None:
    """SQLiteStore hands every request the same cached record: what one request
    changes goes to the store, never into that shared object.
    """
    token, _ = await plant_session(
        sqlite_store, "alice", data={"list": [1, 2], "gone": 1}, idle_for=3600
    )
    shared = await sqlite_store.get(token_digest(token), now=time.time())
    assert shared is not None
    snapshot = copy.deepcopy(shared)
    seen: dict[str, Any] = {}

    async def handler(request: Request) -> Response:
        session = Session.from_request(request)
        seen["shared"] = session._record is shared
        session.get("list").append(3)
        session.set("new", {"a": [1]})
        session.remove_key("gone")
        await session.rotate()
        session.set("after", 1)
        return JSONResponse({})

    app = app_factory(sqlite_store, None, extra_routes=[Route("/change", handler)])
    response = await client_factory(app).get("/change", headers=cookie_header(token))

    assert response.status_code == 200
    assert seen["shared"] is True
    assert shared == snapshot
    assert await stored_data(sqlite_store) == {"list": [1, 2], "new": {"a": [1]}, "after": 1}
