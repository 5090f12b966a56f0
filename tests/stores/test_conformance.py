"""The store contract of ``stores/_base.py``, proven against every store.

Every test asks only for the ``store`` fixture, which conftest.py
parametrises over ``STORE_FIXTURES``: a new store joins by adding its
fixture there. Time is passed explicitly (whole seconds counted from
:func:`start_time`), so nothing sleeps. A store that cannot honour a test
skips it with a reason; it never passes silently.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import math
import traceback
import types
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from authsessions._records import SessionRecord, StoreStats, data_size
from authsessions._tokens import new_session_id
from authsessions.stores import CreateError, DataTooLarge, SessionUpdate, Store
from tests.stores.records import (
    TTL,
    check_kept_after_racing_creates,
    make_record,
    make_update,
    new_digest,
    rotate_away,
    start_time,
    typed,
)


def assert_same_record(got: SessionRecord | None, want: SessionRecord) -> None:
    """Every field equal, and the data equal down to JSON types (``1`` is not ``1.0``)."""
    assert got is not None
    assert got == want
    assert typed(got.data) == typed(want.data)


async def stored_at(store: Store, record: SessionRecord, *, now: float) -> SessionRecord | None:
    """What the store holds under ``record``'s digest, looked up at ``now``."""
    return await store.get(record.token_digest, now=now)


async def listed_ids(store: Store, user_id: str, *, now: float) -> list[str]:
    return [record.id for record in await store.list_for_user(user_id, now=now)]


# -- create and get ---------------------------------------------------------------


async def test_create_then_get_returns_an_equal_record(store: Store) -> None:
    t0 = start_time()
    record = make_record(now=t0, data={"cart": [1, 2], "theme": "dark"})
    await store.create(record, max_sessions=10, now=t0)

    assert_same_record(await store.get(record.token_digest, now=t0), record)


async def test_create_then_get_keeps_missing_device_fields_as_none(store: Store) -> None:
    t0 = start_time()
    record = make_record(
        now=t0,
        ip_address=None,
        user_agent=None,
        device_name="Unknown on Unknown",
        device_type="other",
    )
    await store.create(record, max_sessions=10, now=t0)

    assert_same_record(await store.get(record.token_digest, now=t0), record)


DATA_CASES: dict[str, dict[str, Any]] = {
    "empty": {},
    "nested": {
        "a": {"b": {"c": [1, [2, [3, {"d": []}]]]}},
        "list_of_objects": [{"x": 1}, {}, []],
        "deep": {"k": {"k": {"k": {"k": {"k": {"k": {"k": {"k": "bottom"}}}}}}}},
    },
    "unicode": {
        "name": "Zoë Ångström",
        "emoji": "🔐🍪",
        "cjk": "会话",
        "rtl": "مرحبا",
        "ключ": "значение",
        "": "the empty key",
        "quotes": 'it\'s "quoted" \\ and /slashed/',
    },
    "numbers": {
        "zero": 0,
        "negative": -42,
        "big_int": 2**63 + 1,
        "beyond_double_precision": 2**53 + 1,
        "float_with_zero_fraction": 1.0,
        "half": 0.5,
        "negative_float": -2.5,
        "pi": 3.141592653589793,
        "small": 1.5e-07,
    },
    "scalars": {
        "true": True,
        "false": False,
        "none": None,
        "empty_string": "",
        "empty_list": [],
        "empty_object": {},
        "mixed_list": [1, 1.0, True, None, "1", 0, False],
    },
    "floats_in_exponent_form": {
        "large": 1e20,
        "largest": 1.7976931348623157e308,
        "tiniest": 5e-324,
    },
    "control_characters": {
        "nul": "a\x00b",
        "whitespace": "line\nbreak\ttab\r",
        "escape": "\x1b[0m",
    },
}


@pytest.mark.parametrize("data", DATA_CASES.values(), ids=DATA_CASES.keys())
async def test_data_round_trips_exactly(store: Store, data: dict[str, Any]) -> None:
    t0 = start_time()
    record = make_record(now=t0, data=copy.deepcopy(data))
    await store.create(record, max_sessions=10, now=t0)

    got = await store.get(record.token_digest, now=t0)
    assert got is not None
    assert got.data == data
    assert typed(got.data) == typed(data)
    (listed,) = await store.list_for_user(record.user_id, now=t0)
    assert typed(listed.data) == typed(data)


async def test_get_of_unknown_digest_returns_none(store: Store) -> None:
    t0 = start_time()
    await store.create(make_record(now=t0), max_sessions=10, now=t0)

    assert await store.get(new_digest(), now=t0) is None


async def test_expired_session_is_not_served_before_cleanup(store: Store) -> None:
    """A stolen or abandoned token must stop working the moment its session expires.

    Cleanup runs in batches, maybe rarely; until it does, the expired row is
    still in the store, and ``get`` alone must refuse it.
    """
    t0 = start_time()
    record = make_record(now=t0, ttl=60)
    await store.create(record, max_sessions=10, now=t0)

    assert await store.get(record.token_digest, now=t0 + 61) is None
    assert await store.list_for_user(record.user_id, now=t0 + 61) == []
    assert_same_record(await store.get(record.token_digest, now=t0 + 59), record)


async def test_session_expiring_exactly_now_counts_as_expired(store: Store) -> None:
    t0 = start_time()
    record = make_record(now=t0, ttl=60)
    await store.create(record, max_sessions=10, now=t0)

    assert await store.get(record.token_digest, now=t0 + 60) is None
    assert await store.list_for_user(record.user_id, now=t0 + 60) == []
    assert await store.get(record.token_digest, now=t0 + 59) is not None


async def test_public_session_id_does_not_work_as_a_token(store: Store) -> None:
    """Session ids are shown in "your devices" lists and sent to revoke endpoints.

    If ``get`` matched ids as well as digests, anyone who saw an id could
    present it as a cookie and take over the session.
    """
    t0 = start_time()
    record = make_record(now=t0)
    await store.create(record, max_sessions=10, now=t0)

    assert await store.get(record.id, now=t0) is None
    assert await store.get(record.user_id, now=t0) is None


@pytest.mark.parametrize(
    "probe",
    ["*", "%", "_" * 64, "?", "' OR '1'='1", "half", "upper", "trailing_space", "last_char"],
)
async def test_wildcard_or_partial_digest_matches_no_session(store: Store, probe: str) -> None:
    """A cookie is attacker-controlled: patterns or fragments must never find a session.

    A store that pattern-matched (SQL LIKE, Redis KEYS/SCAN globs) or compared
    loosely would let a forged cookie load somebody's session.
    """
    t0 = start_time()
    record = make_record(now=t0)
    await store.create(record, max_sessions=10, now=t0)
    digest = record.token_digest
    forged = {
        "half": digest[:32],
        "upper": digest.upper(),
        "trailing_space": digest + " ",
        "last_char": digest[:-1] + ("0" if digest[-1] != "0" else "1"),
    }.get(probe, probe)

    assert await store.get(forged, now=t0) is None


# -- create: collisions -----------------------------------------------------------


async def test_duplicate_token_digest_is_refused_and_the_original_kept(store: Store) -> None:
    """A create must never overwrite the session that already holds a digest.

    Otherwise whoever holds the token (the victim) would be signed in as the
    new record's user, or the new user would inherit the victim's session.
    """
    t0 = start_time()
    original = make_record(now=t0, user_id="victim", data={"role": "admin"})
    await store.create(original, max_sessions=10, now=t0)
    intruder = make_record(now=t0 + 1, user_id="intruder", data={"role": "guest"})
    intruder.token_digest = original.token_digest

    with pytest.raises(CreateError):
        await store.create(intruder, max_sessions=10, now=t0 + 1)

    assert_same_record(await store.get(original.token_digest, now=t0 + 1), original)
    assert await store.list_for_user("intruder", now=t0 + 1) == []
    assert await listed_ids(store, "victim", now=t0 + 1) == [original.id]


async def test_duplicate_session_id_is_refused_and_the_original_kept(store: Store) -> None:
    """A create must never overwrite the session that already has an id.

    Otherwise a colliding create would replace (hijack or end) another user's
    session behind the token its owner still holds.
    """
    t0 = start_time()
    original = make_record(now=t0, user_id="victim", data={"role": "admin"})
    await store.create(original, max_sessions=10, now=t0)
    intruder = make_record(now=t0 + 1, user_id="intruder")
    intruder.id = original.id

    with pytest.raises(CreateError):
        await store.create(intruder, max_sessions=10, now=t0 + 1)

    assert_same_record(await store.get(original.token_digest, now=t0 + 1), original)
    assert await store.get(intruder.token_digest, now=t0 + 1) is None
    assert await store.list_for_user("intruder", now=t0 + 1) == []


async def test_refused_create_evicts_nothing(store: Store) -> None:
    t0 = start_time()
    original = make_record(now=t0)
    await store.create(original, max_sessions=1, now=t0)
    duplicate = make_record(now=t0 + 1)
    duplicate.token_digest = original.token_digest

    with pytest.raises(CreateError):
        await store.create(duplicate, max_sessions=1, now=t0 + 1)

    assert await listed_ids(store, "alice", now=t0 + 1) == [original.id]


# -- create: eviction ---------------------------------------------------------------


COUNTS_NO_STORE_CAN_HONOUR = [
    pytest.param(0, ValueError, id="0"),
    pytest.param(-1, ValueError, id="-1"),
    pytest.param(None, TypeError, id="None"),
    pytest.param("3", TypeError, id="str"),
    pytest.param(True, TypeError, id="bool"),
    pytest.param(2.0, TypeError, id="float"),
    # PostgreSQL binds counts as int4, SQLite's integers end at 2**63 - 1.
    pytest.param(2**31, ValueError, id="2**31"),
    pytest.param(2**63, ValueError, id="2**63"),
]


@pytest.mark.parametrize(("count", "error"), COUNTS_NO_STORE_CAN_HONOUR)
async def test_create_refuses_a_max_sessions_no_store_can_honour(
    store: Store, count: Any, error: type[Exception]
) -> None:
    t0 = start_time()
    kept = make_record(now=t0)
    await store.create(kept, max_sessions=10, now=t0)
    record = make_record(now=t0)

    with pytest.raises(error, match="max_sessions"):
        await store.create(record, max_sessions=count, now=t0)

    assert await store.get(record.token_digest, now=t0) is None
    assert await listed_ids(store, "alice", now=t0) == [kept.id]


@pytest.mark.parametrize(("count", "error"), COUNTS_NO_STORE_CAN_HONOUR)
async def test_delete_expired_refuses_a_limit_no_store_can_honour(
    store: Store, count: Any, error: type[Exception]
) -> None:
    t0 = start_time()
    expired = make_record(now=t0, ttl=1)
    await store.create(expired, max_sessions=10, now=t0)
    before = await store.stats(now=t0 + 2)

    with pytest.raises(error, match="limit"):
        await store.delete_expired(now=t0 + 2, limit=count)

    assert await store.stats(now=t0 + 2) == before


TIMES_NO_STORE_CAN_DELETE_BY = [
    # PostgreSQL orders NaN above every expiry: all the sessions it reached would go.
    pytest.param(math.nan, ValueError, id="nan"),
    pytest.param(math.inf, ValueError, id="inf"),
    pytest.param(-math.inf, ValueError, id="-inf"),
    pytest.param(None, TypeError, id="None"),
    pytest.param("1700000000", TypeError, id="str"),
    pytest.param(True, TypeError, id="bool"),
    pytest.param(10**400, ValueError, id="10**400"),  # no float holds it
]


@pytest.mark.parametrize(("now", "error"), TIMES_NO_STORE_CAN_DELETE_BY)
async def test_create_refuses_a_now_that_is_not_a_finite_time(
    store: Store, now: Any, error: type[Exception]
) -> None:
    t0 = start_time()
    kept = make_record(now=t0)
    await store.create(kept, max_sessions=10, now=t0)
    record = make_record(now=t0)

    with pytest.raises(error, match="now"):
        await store.create(record, max_sessions=10, now=now)

    assert await store.get(record.token_digest, now=t0) is None
    assert await listed_ids(store, "alice", now=t0) == [kept.id]


@pytest.mark.parametrize(("now", "error"), TIMES_NO_STORE_CAN_DELETE_BY)
async def test_delete_expired_refuses_a_now_that_is_not_a_finite_time(
    store: Store, now: Any, error: type[Exception]
) -> None:
    t0 = start_time()
    live = make_record(now=t0)
    await store.create(live, max_sessions=10, now=t0)

    with pytest.raises(error, match="now"):
        await store.delete_expired(now=now)

    assert await listed_ids(store, "alice", now=t0) == [live.id]


@pytest.mark.parametrize(("now", "error"), TIMES_NO_STORE_CAN_DELETE_BY)
async def test_deletes_refuse_a_now_that_is_not_a_finite_time(
    store: Store, now: Any, error: type[Exception]
) -> None:
    t0 = start_time()
    kept = make_record(now=t0)
    await store.create(kept, max_sessions=10, now=t0)

    deletes: list[Callable[[], Awaitable[object]]] = [
        lambda: store.delete(kept.id, now=now),
        lambda: store.delete(kept.id, now=now, user_id="alice"),
        lambda: store.delete_for_user("alice", now=now),
    ]
    for delete in deletes:
        with pytest.raises(error, match="now"):
            await delete()

    assert await listed_ids(store, "alice", now=t0) == [kept.id]


async def test_an_int_now_counts_as_seconds_even_past_what_sqlite_binds(store: Store) -> None:
    t0 = start_time()
    live = make_record(now=t0)
    await store.create(live, max_sessions=10, now=int(t0))

    # Everything has expired by 2**63 seconds; SQLite binds no int that large.
    assert await store.delete_expired(now=2**63) == 1

    assert await listed_ids(store, "alice", now=t0) == []


RECORDS_NO_STORE_KEEPS_ALIKE = [
    pytest.param("id", 123, TypeError, id="int-id"),
    pytest.param("token_digest", b"digest", TypeError, id="bytes-digest"),
    pytest.param("user_id", 42, ValueError, id="int-user-id"),
    pytest.param("ip_address", 1, TypeError, id="int-ip"),
    pytest.param("device_name", None, TypeError, id="no-device-name"),
    pytest.param("data", {1: "x"}, TypeError, id="int-data-key"),
    pytest.param("data", [("a", 1)], TypeError, id="data-not-a-mapping"),
    pytest.param("created_at", math.nan, ValueError, id="nan-created-at"),
    pytest.param("last_active_at", "1700000000", TypeError, id="str-last-active-at"),
    pytest.param("expires_at", math.inf, ValueError, id="never-expiring"),
    # Past what SQLite binds and what a datetime holds: listing it failed in the others.
    pytest.param("expires_at", 2**63, ValueError, id="past-the-year-9999"),
    # PostgreSQL's text holds no NUL (it failed as if down) where the others kept it; a
    # lone surrogate has no UTF-8 form (a raw UnicodeEncodeError in SQLite and Redis).
    pytest.param("id", "a\x00b", ValueError, id="nul-in-id"),
    pytest.param("user_agent", "a\x00b", ValueError, id="nul-in-user-agent"),
    pytest.param("device_name", "a\x00b", ValueError, id="nul-in-device-name"),
    pytest.param("id", "a\ud800b", ValueError, id="surrogate-in-id"),
    pytest.param("user_agent", "a\ud800b", ValueError, id="surrogate-in-user-agent"),
    pytest.param("device_name", "a\ud800b", ValueError, id="surrogate-in-device-name"),
    # Redis took "" for "none" (a rotation to it kept the old token; its pointer pattern
    # found no such session); PostgreSQL's index holds no key past about 2.7 kB.
    pytest.param("id", "", ValueError, id="empty-id"),
    pytest.param("token_digest", "", ValueError, id="empty-digest"),
    pytest.param("id", "i" * 4000, ValueError, id="id-too-long-to-index"),
    pytest.param("token_digest", "d" * 4000, ValueError, id="digest-too-long-to-index"),
    # Redis's stats skipped a session whose type was "".
    pytest.param("device_type", "", ValueError, id="empty-device-type"),
    pytest.param("device_type", "phone", ValueError, id="unknown-device-type"),
    # JSON-encoded by two stores (which refused it), stored by the others.
    pytest.param("data", types.MappingProxyType({"a": 1}), TypeError, id="data-not-a-dict"),
]


@pytest.mark.parametrize(("field", "value", "error"), RECORDS_NO_STORE_KEEPS_ALIKE)
async def test_create_refuses_a_record_stores_would_keep_differently_or_in_part(
    store: Store, field: str, value: Any, error: type[Exception]
) -> None:
    """Each store used to do its own thing: keep it, keep half, or fail as if down."""
    t0 = start_time()
    kept = make_record(now=t0)
    await store.create(kept, max_sessions=10, now=t0)
    record = dataclasses.replace(make_record(now=t0), **{field: value})

    with pytest.raises(error, match=field):
        await store.create(record, max_sessions=10, now=t0)

    assert await listed_ids(store, "alice", now=t0) == [kept.id]
    if isinstance(record.token_digest, str):
        assert await store.get(record.token_digest, now=t0) is None
    # Nothing of it was claimed on the way (a cluster's pointers): the record, mended,
    # can be stored under the same id and digest.
    mended = dataclasses.replace(record, **{field: getattr(make_record(now=t0), field)})
    await store.create(mended, max_sessions=10, now=t0)
    assert sorted(await listed_ids(store, "alice", now=t0)) == sorted([kept.id, mended.id])


def update_with(now: float, **fields: Any) -> SessionUpdate:
    return dataclasses.replace(make_update(now=now), **fields)


UPDATES_NO_STORE_APPLIES_ALIKE = [
    pytest.param({"last_active_at": None}, ValueError, "given together", id="expiry-alone"),
    pytest.param({"expires_at": None}, ValueError, "given together", id="activity-alone"),
    pytest.param({"expires_at": math.nan}, ValueError, "expires_at", id="nan-expiry"),
    pytest.param({"expires_at": 1e15}, ValueError, "years 1 to 9999", id="past-the-year-9999"),
    pytest.param(
        {"last_active_at": None, "expires_at": None, "token_digest": new_digest()},
        ValueError,
        "token_digest",
        id="digest-without-times",
    ),
    pytest.param({"set_keys": {1: "x"}}, TypeError, "set_keys", id="int-key"),
    pytest.param({"removed_keys": {"a"}}, TypeError, "removed_keys", id="keys-not-frozen"),
    pytest.param({"removed_keys": frozenset({1})}, TypeError, "removed_keys", id="int-removed"),
    pytest.param({"token_digest": b"digest"}, TypeError, "token_digest", id="bytes-digest"),
    pytest.param({"token_digest": ""}, ValueError, "token_digest", id="empty-digest"),
    pytest.param({"token_digest": "d" * 4000}, ValueError, "token_digest", id="long-digest"),
    pytest.param(
        {"expected_token_digest": b"digest"},
        TypeError,
        "expected_token_digest",
        id="bytes-expected",
    ),
    pytest.param(
        {"expected_token_digest": ""}, ValueError, "expected_token_digest", id="empty-expected"
    ),
    pytest.param(
        {"rotated_away_until": 1.0}, ValueError, "rotated_away_until", id="notice-without-rotation"
    ),
    pytest.param(
        {"token_digest": new_digest(), "rotated_away_until": 1.0},
        ValueError,
        "expected_token_digest",
        id="notice-without-the-digest-rotated-away",
    ),
    pytest.param(
        {"token_digest": new_digest(), "expected_token_digest": "x", "rotated_away_until": "1"},
        TypeError,
        "rotated_away_until",
        id="str-notice",
    ),
    pytest.param(
        {"token_digest": new_digest(), "expected_token_digest": "x", "rotated_away_until": 1e15},
        ValueError,
        "rotated_away_until",
        id="notice-past-the-year-9999",
    ),
    pytest.param(
        {"last_active_at": None, "expires_at": None, "touch_if_last_active_by": 1.0},
        ValueError,
        "touch_if_last_active_by",
        id="cutoff-without-times",
    ),
    pytest.param(
        {"touch_if_last_active_by": "1"}, TypeError, "touch_if_last_active_by", id="str-cutoff"
    ),
    pytest.param(
        {"touch_if_last_active_by": math.nan},
        ValueError,
        "touch_if_last_active_by",
        id="nan-cutoff",
    ),
    pytest.param({"max_data_bytes": True}, TypeError, "max_data_bytes", id="bool-cap"),
    pytest.param({"max_data_bytes": "100"}, TypeError, "max_data_bytes", id="str-cap"),
]


@pytest.mark.parametrize(("fields", "error", "message"), UPDATES_NO_STORE_APPLIES_ALIKE)
async def test_update_refuses_changes_stores_would_apply_differently_or_in_part(
    store: Store, fields: dict[str, Any], error: type[Exception], message: str
) -> None:
    t0 = start_time()
    record = make_record(now=t0, data={"a": 1})
    await store.create(record, max_sessions=10, now=t0)

    with pytest.raises(error, match=message):
        await store.update(record.id, update_with(t0 + 1, **fields), now=t0 + 1)

    assert await store.get(record.token_digest, now=t0 + 1) == record


@pytest.mark.parametrize(
    ("session_id", "now", "error"),
    [(123, 0.0, TypeError), (None, math.nan, ValueError)],
    ids=["int-id", "nan-now"],
)
async def test_update_refuses_an_id_or_now_that_is_not_one(
    store: Store, session_id: Any, now: float, error: type[Exception]
) -> None:
    t0 = start_time()
    record = make_record(now=t0, ttl=10)
    await store.create(record, max_sessions=10, now=t0)

    # A NaN now found the session live in Python and Redis, long after it expired.
    with pytest.raises(error):
        await store.update(session_id or record.id, make_update(now=t0 + 20), now=now or t0 + 20)

    assert await store.get(record.token_digest, now=t0) == record


async def test_deletes_and_listings_refuse_ids_that_are_not_strings(store: Store) -> None:
    """A bytes except_id matched nothing in two stores, which then deleted the session
    it was meant to keep."""
    t0 = start_time()
    kept = make_record(now=t0)
    await store.create(kept, max_sessions=10, now=t0)
    calls: list[tuple[str, Callable[[], Awaitable[object]]]] = [
        ("session_id", lambda: store.delete(kept.id.encode(), now=t0)),  # type: ignore[arg-type]
        ("user_id", lambda: store.delete(kept.id, now=t0, user_id=5)),  # type: ignore[arg-type]
        ("token_digest", lambda: store.delete(kept.id, now=t0, token_digest=b"digest")),  # type: ignore[arg-type]
        ("except_id", lambda: store.delete_for_user("alice", now=t0, except_id=kept.id.encode())),  # type: ignore[arg-type]
        ("user_id", lambda: store.delete_for_user(5, now=t0)),  # type: ignore[arg-type]
        ("user_id", lambda: store.list_for_user(5, now=t0)),  # type: ignore[arg-type]
    ]

    for name, call in calls:
        with pytest.raises(TypeError, match=f"{name} must be a str"):
            await call()

    assert await listed_ids(store, "alice", now=t0) == [kept.id]


@pytest.mark.parametrize("text", ["a\x00b", "a\ud800b"], ids=["nul", "lone-surrogate"])
async def test_lookups_by_an_id_no_store_can_keep_are_refused_alike(
    store: Store, text: str
) -> None:
    """PostgreSQL answered a NUL id as if it were down, the others with "no such
    session"; a lone surrogate was a raw UnicodeEncodeError in some."""
    t0 = start_time()
    kept = make_record(now=t0)
    await store.create(kept, max_sessions=10, now=t0)
    calls: list[tuple[str, Callable[[], Awaitable[object]]]] = [
        ("session_id", lambda: store.delete(text, now=t0)),
        ("user_id", lambda: store.delete(kept.id, now=t0, user_id=text)),
        ("token_digest", lambda: store.delete(kept.id, now=t0, token_digest=text)),
        ("user_id", lambda: store.delete_for_user(text, now=t0)),
        ("except_id", lambda: store.delete_for_user("alice", now=t0, except_id=text)),
        ("user_id", lambda: store.list_for_user(text, now=t0)),
        ("session_id", lambda: store.update(text, make_update(now=t0), now=t0)),
    ]

    for name, call in calls:
        with pytest.raises(ValueError, match=name):
            await call()

    assert await listed_ids(store, "alice", now=t0) == [kept.id]
    assert await stored_at(store, kept, now=t0) == kept


async def test_a_delete_refuses_an_empty_token_digest(store: Store) -> None:
    """Redis's script reads "" as "whatever digest": an empty one must not get that far
    and end a session it does not name."""
    t0 = start_time()
    kept = make_record(now=t0)
    await store.create(kept, max_sessions=10, now=t0)

    with pytest.raises(ValueError, match="token_digest"):
        await store.delete(kept.id, now=t0, token_digest="")

    assert await stored_at(store, kept, now=t0) == kept


@pytest.mark.parametrize("now", [math.nan, None], ids=["nan", "None"])
async def test_listings_and_stats_refuse_a_now_that_is_not_a_time(store: Store, now: Any) -> None:
    """Some stores answered a NaN or None with every session, others with none."""
    await store.create(make_record(now=start_time()), max_sessions=10, now=start_time())

    with pytest.raises((TypeError, ValueError), match="now must be"):
        await store.list_for_user("alice", now=now)
    with pytest.raises((TypeError, ValueError), match="now must be"):
        await store.stats(now=now)


async def test_a_taken_digest_is_refused_without_showing_it(store: Store) -> None:
    """An app that logs the traceback of a CreateError must not print the digest."""
    t0 = start_time()
    first = make_record(now=t0)
    await store.create(first, max_sessions=10, now=t0)
    second = dataclasses.replace(make_record(now=t0), token_digest=first.token_digest)

    with pytest.raises(CreateError) as refused:
        await store.create(second, max_sessions=10, now=t0)

    assert first.token_digest not in "".join(traceback.format_exception(refused.value))


async def test_the_largest_counts_are_honoured(store: Store) -> None:
    t0 = start_time()
    live, expired = make_record(now=t0), make_record(now=t0, user_id="bob", ttl=1)
    for record in (live, expired):
        await store.create(record, max_sessions=2**31 - 1, now=t0)

    assert await store.delete_expired(now=t0 + 2, limit=2**31 - 1) == 1

    assert await listed_ids(store, "alice", now=t0 + 2) == [live.id]
    assert await listed_ids(store, "bob", now=t0 + 2) == []


async def test_create_evicts_the_least_recently_active_beyond_the_limit(store: Store) -> None:
    t0 = start_time()
    old = [make_record(now=t0 + i) for i in range(4)]
    for record in old:
        await store.create(record, max_sessions=10, now=record.created_at)
    new = make_record(now=t0 + 4)

    await store.create(new, max_sessions=3, now=t0 + 4)

    assert await listed_ids(store, "alice", now=t0 + 4) == [new.id, old[3].id, old[2].id]
    assert await store.get(old[0].token_digest, now=t0 + 4) is None
    assert await store.get(old[1].token_digest, now=t0 + 4) is None


async def test_eviction_ranks_by_last_activity_not_creation(store: Store) -> None:
    t0 = start_time()
    first, second, third = (make_record(now=t0 + i) for i in range(3))
    for record in (first, second, third):
        await store.create(record, max_sessions=10, now=record.created_at)
    assert await store.update(first.id, make_update(now=t0 + 3), now=t0 + 3)
    new = make_record(now=t0 + 4)

    await store.create(new, max_sessions=3, now=t0 + 4)

    assert await listed_ids(store, "alice", now=t0 + 4) == [new.id, first.id, third.id]


async def test_limit_of_one_keeps_only_the_new_session(store: Store) -> None:
    t0 = start_time()
    records = [make_record(now=t0 + i) for i in range(3)]
    for record in records:
        await store.create(record, max_sessions=1, now=record.created_at)
        assert await listed_ids(store, "alice", now=record.created_at) == [record.id]

    for record in records[:-1]:
        assert await store.get(record.token_digest, now=t0) is None


async def test_the_new_session_is_never_evicted(store: Store) -> None:
    """Another server's clock a few seconds ahead (or a clock stepped back) can leave the
    user's other sessions more recently active than the one being created: a login must
    still keep the session it made, and evict among the others.
    """
    t0 = start_time()
    ahead = [make_record(now=t0 + 10 + i) for i in range(3)]
    for record in ahead:
        await store.create(record, max_sessions=10, now=record.created_at)
    new = make_record(now=t0)

    await store.create(new, max_sessions=2, now=t0)

    assert await listed_ids(store, "alice", now=t0) == [ahead[2].id, new.id]
    assert await store.get(new.token_digest, now=t0) is not None

    newest = make_record(now=t0 + 1)
    await store.create(newest, max_sessions=1, now=t0 + 1)

    assert await listed_ids(store, "alice", now=t0 + 1) == [newest.id]


async def test_eviction_leaves_other_users_sessions_alone(store: Store) -> None:
    t0 = start_time()
    bobs = [make_record(now=t0 + i, user_id="bob", ttl=TTL if i else 100) for i in range(3)]
    for record in bobs:
        await store.create(record, max_sessions=10, now=record.created_at)
    alices = [make_record(now=t0 + 200 + i) for i in range(3)]

    for record in alices:
        await store.create(record, max_sessions=1, now=record.created_at)

    assert await listed_ids(store, "alice", now=t0 + 202) == [alices[-1].id]
    assert await listed_ids(store, "bob", now=t0 + 202) == [bobs[2].id, bobs[1].id]
    # bob's expired session is bob's business (and cleanup's), not alice's login's.
    assert_same_record(await store.get(bobs[0].token_digest, now=t0), bobs[0])


async def test_create_removes_the_users_expired_sessions(store: Store) -> None:
    t0 = start_time()
    expired = make_record(now=t0, ttl=10)
    await store.create(expired, max_sessions=10, now=t0)
    new = make_record(now=t0 + 20)

    await store.create(new, max_sessions=10, now=t0 + 20)

    # Looked up at a time when it was still live: it is gone, not merely expired.
    assert await store.get(expired.token_digest, now=t0) is None
    assert await store.delete(expired.id, now=t0) is False
    assert await listed_ids(store, "alice", now=t0 + 20) == [new.id]


async def test_expired_sessions_do_not_count_toward_the_limit(store: Store) -> None:
    t0 = start_time()
    lasting = make_record(now=t0)
    short = [make_record(now=t0 + 1 + i, ttl=10) for i in range(2)]
    for record in (lasting, *short):
        await store.create(record, max_sessions=10, now=record.created_at)
    new = make_record(now=t0 + 30)

    await store.create(new, max_sessions=2, now=t0 + 30)

    assert await listed_ids(store, "alice", now=t0 + 30) == [new.id, lasting.id]


async def test_create_counts_a_session_expiring_exactly_now_as_expired(store: Store) -> None:
    t0 = start_time()
    lasting = make_record(now=t0)
    edge = make_record(now=t0 + 1, ttl=9)  # expires at t0 + 10
    for record in (lasting, edge):
        await store.create(record, max_sessions=10, now=record.created_at)
    new = make_record(now=t0 + 10)

    await store.create(new, max_sessions=2, now=t0 + 10)

    # Ranked as live, the edge session would have evicted the lasting one.
    assert await listed_ids(store, "alice", now=t0 + 10) == [new.id, lasting.id]
    assert await store.get(edge.token_digest, now=t0) is None


async def test_equal_activity_ranks_the_more_recently_created_first(store: Store) -> None:
    t0 = start_time()
    # Five, so that a store iterating an unordered set cannot pass by chance, stored out of
    # creation order, so that one listing in insertion (or storage) order cannot either.
    records = [make_record(now=t0 + i, last_active_at=t0 + 10) for i in range(5)]
    for i in (2, 0, 4, 1, 3):
        await store.create(records[i], max_sessions=10, now=t0 + 10)

    newest_created_first = [record.id for record in reversed(records)]
    assert await listed_ids(store, "alice", now=t0 + 10) == newest_created_first

    new = make_record(now=t0 + 11)
    await store.create(new, max_sessions=3, now=t0 + 11)

    assert await listed_ids(store, "alice", now=t0 + 11) == [new.id, *newest_created_first[:2]]


# -- update -------------------------------------------------------------------------


async def test_update_patches_data_key_by_key(store: Store) -> None:
    t0 = start_time()
    record = make_record(
        now=t0, data={"keep": 1, "change": "old", "drop": True, "nested": {"a": 1}}
    )
    await store.create(record, max_sessions=10, now=t0)

    changed = await store.update(
        record.id,
        make_update(
            now=t0 + 1,
            set_keys={"change": "new", "added": [1, 2.0]},
            removed_keys=frozenset({"drop", "never_there"}),
        ),
        now=t0 + 1,
    )

    assert changed is True
    got = await store.get(record.token_digest, now=t0 + 1)
    assert got is not None
    assert typed(got.data) == typed(
        {"keep": 1, "change": "new", "nested": {"a": 1}, "added": [1, 2.0]}
    )


async def test_update_replaces_a_nested_value_whole(store: Store) -> None:
    t0 = start_time()
    record = make_record(now=t0, data={"prefs": {"theme": "dark", "lang": "en"}})
    await store.create(record, max_sessions=10, now=t0)

    update = make_update(now=t0 + 1, set_keys={"prefs": {"lang": "fr"}})
    assert await store.update(record.id, update, now=t0 + 1)

    got = await store.get(record.token_digest, now=t0 + 1)
    assert got is not None
    assert got.data == {"prefs": {"lang": "fr"}}


@pytest.mark.parametrize("data", DATA_CASES.values(), ids=DATA_CASES.keys())
async def test_updated_values_round_trip_exactly(store: Store, data: dict[str, Any]) -> None:
    t0 = start_time()
    record = make_record(now=t0, data={"untouched": 1.0})
    await store.create(record, max_sessions=10, now=t0)

    update = make_update(now=t0 + 1, set_keys={"value": copy.deepcopy(data)})
    assert await store.update(record.id, update, now=t0 + 1)

    got = await store.get(record.token_digest, now=t0 + 1)
    assert got is not None
    assert typed(got.data) == typed({"untouched": 1.0, "value": data})


async def test_update_without_data_changes_keeps_the_data(store: Store) -> None:
    t0 = start_time()
    record = make_record(now=t0, data={"cart": [1, 2], "n": 1.5})
    await store.create(record, max_sessions=10, now=t0)

    assert await store.update(record.id, make_update(now=t0 + 1), now=t0 + 1)

    got = await store.get(record.token_digest, now=t0 + 1)
    assert got is not None
    assert typed(got.data) == typed(record.data)


async def test_update_moves_activity_and_expiry_only(store: Store) -> None:
    t0 = start_time()
    record = make_record(now=t0, ttl=60, data={"a": 1})
    await store.create(record, max_sessions=10, now=t0)

    assert await store.update(record.id, make_update(now=t0 + 50, ttl=60), now=t0 + 50)

    # Past the old expiry, before the new one.
    got = await store.get(record.token_digest, now=t0 + 100)
    want = copy.deepcopy(record)
    want.last_active_at = t0 + 50
    want.expires_at = t0 + 110
    assert_same_record(got, want)
    assert await store.get(record.token_digest, now=t0 + 110) is None


async def test_update_without_times_changes_the_data_and_keeps_the_times(store: Store) -> None:
    t0 = start_time()
    record = make_record(now=t0, ttl=60, data={"a": 1})
    await store.create(record, max_sessions=10, now=t0)

    update = make_update(now=t0 + 50, set_keys={"b": 2}, moves_expiry=False)
    assert await store.update(record.id, update, now=t0 + 50)

    want = copy.deepcopy(record)
    want.data = {"a": 1, "b": 2}
    assert_same_record(await store.get(record.token_digest, now=t0 + 59), want)
    (listed,) = await store.list_for_user(record.user_id, now=t0 + 59)
    assert (listed.last_active_at, listed.expires_at) == (t0, t0 + 60)
    # The expiry did not slide: the session ends when it would have.
    assert await store.get(record.token_digest, now=t0 + 60) is None


async def test_update_without_times_or_data_only_says_whether_the_session_is_live(
    store: Store,
) -> None:
    t0 = start_time()
    record = make_record(now=t0, ttl=60, data={"a": 1})
    await store.create(record, max_sessions=10, now=t0)

    assert await store.update(record.id, make_update(now=t0 + 1, moves_expiry=False), now=t0 + 1)
    assert_same_record(await store.get(record.token_digest, now=t0 + 1), record)

    late = make_update(now=t0 + 60, set_keys={"b": 2}, moves_expiry=False)
    assert not await store.update(record.id, late, now=t0 + 60)
    assert_same_record(await store.get(record.token_digest, now=t0 + 59), record)


async def test_update_can_shorten_the_expiry(store: Store) -> None:
    t0 = start_time()
    record = make_record(now=t0)
    await store.create(record, max_sessions=10, now=t0)

    assert await store.update(record.id, make_update(now=t0 + 1, ttl=9), now=t0 + 1)

    assert await store.get(record.token_digest, now=t0 + 9) is not None
    assert await store.get(record.token_digest, now=t0 + 10) is None


# What an update that finds the session touched since its cutoff still does: all but the
# times. "new" stands for a fresh digest, "held" for the session's own.
UPDATES_AFTER_A_TOUCH = {
    "touch": {},
    "data": {"set_keys": {"b": 2}, "removed_keys": frozenset({"a"})},
    "capped-data": {"set_keys": {"b": 2}, "max_data_bytes": 1000},
    "new-digest": {"token_digest": "new"},
    "rotation": {"token_digest": "new", "expected_token_digest": "held"},
    "rotation-remembering-the-digest": {
        "token_digest": "new",
        "expected_token_digest": "held",
        "rotated_away_until": "soon",
    },
}


@pytest.mark.parametrize("fields", UPDATES_AFTER_A_TOUCH.values(), ids=UPDATES_AFTER_A_TOUCH.keys())
async def test_an_update_finding_the_session_touched_since_its_cutoff_keeps_the_times(
    store: Store, fields: dict[str, Any]
) -> None:
    """Requests that loaded a session together all find its touch due; only the first
    to write moves the times, and the others apply the rest of what they change."""
    t0 = start_time()
    record = make_record(now=t0, data={"a": 1})
    await store.create(record, max_sessions=10, now=t0)
    first = update_with(t0 + 100, touch_if_last_active_by=t0 + 40)
    assert await store.update(record.id, first, now=t0 + 100)
    named = {"new": new_digest(), "held": record.token_digest, "soon": t0 + 160}
    fields = {name: named.get(value, value) if isinstance(value, str) else value
              for name, value in fields.items()}  # fmt: skip

    second = update_with(t0 + 101, touch_if_last_active_by=t0 + 41, **fields)
    assert await store.update(record.id, second, now=t0 + 101)

    digest = second.token_digest or record.token_digest
    got = await store.get(digest, now=t0 + 101)
    assert got is not None
    assert (got.last_active_at, got.expires_at) == (t0 + 100, t0 + 100 + TTL)
    assert got.data == ({"b": 2} if "removed_keys" in fields else {"a": 1, **second.set_keys})
    (listed,) = await store.list_for_user("alice", now=t0 + 101)
    assert (listed.id, listed.last_active_at) == (record.id, t0 + 100)
    if second.token_digest is not None:
        assert await store.get(record.token_digest, now=t0 + 101) is None
    remembered = "rotated_away_until" in fields
    assert await store.rotated_away_to(record.token_digest, now=t0 + 101) == (
        record.id if remembered else None
    )
    # The session ends when the first touch set, neither later nor sooner.
    assert await store.get(digest, now=t0 + 99 + TTL) is not None
    assert await store.get(digest, now=t0 + 100 + TTL) is None


async def test_an_update_never_steps_the_times_back(store: Store) -> None:
    """A server whose clock is behind, touching after one whose clock is ahead, leaves the
    later times; a cutoff at the stored time itself still applies."""
    t0 = start_time()
    record = make_record(now=t0)
    await store.create(record, max_sessions=10, now=t0)
    assert await store.update(record.id, make_update(now=t0 + 100), now=t0 + 100)

    behind = update_with(t0 + 99, touch_if_last_active_by=t0 + 99)
    assert await store.update(record.id, behind, now=t0 + 99)
    got = await store.get(record.token_digest, now=t0 + 100)
    assert got is not None
    assert (got.last_active_at, got.expires_at) == (t0 + 100, t0 + 100 + TTL)

    at_the_cutoff = update_with(t0 + 130, touch_if_last_active_by=t0 + 100)
    assert await store.update(record.id, at_the_cutoff, now=t0 + 130)
    got = await store.get(record.token_digest, now=t0 + 130)
    assert got is not None
    assert (got.last_active_at, got.expires_at) == (t0 + 130, t0 + 130 + TTL)


async def test_a_conditional_touch_of_a_session_that_is_not_live_returns_false(
    store: Store,
) -> None:
    t0 = start_time()
    record = make_record(now=t0, ttl=60)
    await store.create(record, max_sessions=10, now=t0)
    late = update_with(t0 + 60, touch_if_last_active_by=t0 + 30)

    assert not await store.update(record.id, late, now=t0 + 60)
    assert not await store.update(new_session_id(), late, now=t0 + 60)
    assert await store.get(record.token_digest, now=t0 + 59) == record


async def test_rotated_out_token_no_longer_loads_the_session(store: Store) -> None:
    """After rotation a stolen copy of the previous token must be worthless.

    Rotation is how a session sheds a token that may have leaked (after
    login, privilege changes); if the old digest still matched, it would not.
    """
    t0 = start_time()
    record = make_record(now=t0, data={"a": 1})
    await store.create(record, max_sessions=10, now=t0)
    rotated = new_digest()

    update = make_update(now=t0 + 1, token_digest=rotated, set_keys={"b": 2})
    assert await store.update(record.id, update, now=t0 + 1)

    assert await store.get(record.token_digest, now=t0 + 1) is None
    got = await store.get(rotated, now=t0 + 1)
    assert got is not None
    assert (got.id, got.token_digest, got.user_id) == (record.id, rotated, record.user_id)
    assert got.data == {"a": 1, "b": 2}
    (listed,) = await store.list_for_user(record.user_id, now=t0 + 1)
    assert listed.token_digest == rotated


async def test_a_digest_rotated_away_is_told_apart_until_its_time_passes(store: Store) -> None:
    """A request the browser sent before a rotation's answer must not clear its new
    cookie: the store names the session its digest was rotated away to (which a logout
    with it ends), for as long as the caller asked.
    """
    t0 = start_time()
    record = make_record(now=t0)
    other = make_record(now=t0)
    for each in (record, other):
        await store.create(each, max_sessions=10, now=t0)

    rotated = await rotate_away(store, record, now=t0 + 1, until=t0 + 61)

    assert await store.get(record.token_digest, now=t0 + 2) is None
    assert await store.rotated_away_to(record.token_digest, now=t0 + 2) == record.id
    assert await store.rotated_away_to(record.token_digest, now=t0 + 60)
    assert not await store.rotated_away_to(record.token_digest, now=t0 + 61)
    # The digest in use, another session's, and one never stored were not rotated away.
    for digest in (rotated, other.token_digest, new_digest()):
        assert not await store.rotated_away_to(digest, now=t0 + 2)
    assert await store.get(rotated, now=t0 + 2) is not None


async def test_a_login_over_a_session_keeps_its_digest_as_rotated_away(store: Store) -> None:
    """A login replaces the session the browser held (deleted first): the new session
    keeps that session's digest as rotated away from, for as long as asked, as a rotation
    would, so that the browser's requests still carrying it are told apart."""
    t0 = start_time()
    replaced = make_record(now=t0)
    await store.create(replaced, max_sessions=10, now=t0)
    assert await store.delete(replaced.id, now=t0 + 1)
    login = make_record(now=t0 + 1)

    await store.create(
        login, max_sessions=10, now=t0 + 1, replaced=(replaced.token_digest, t0 + 61)
    )

    assert await store.get(replaced.token_digest, now=t0 + 2) is None
    assert await store.rotated_away_to(replaced.token_digest, now=t0 + 2) == login.id
    assert not await store.rotated_away_to(replaced.token_digest, now=t0 + 61)
    assert not await store.rotated_away_to(login.token_digest, now=t0 + 2)
    assert_same_record(await stored_at(store, login, now=t0 + 2), login)
    # The login's own rotation replaces the mark, as any rotation's does.
    rotated = await rotate_away(store, login, now=t0 + 3, until=t0 + 63)
    assert await store.rotated_away_to(login.token_digest, now=t0 + 4)
    assert not await store.rotated_away_to(replaced.token_digest, now=t0 + 4)
    assert await store.get(rotated, now=t0 + 4) is not None


async def test_a_login_over_a_session_forgets_its_digest_with_the_new_session(
    store: Store,
) -> None:
    t0 = start_time()
    replaced, login = make_record(now=t0), make_record(now=t0)
    await store.create(login, max_sessions=10, now=t0, replaced=(replaced.token_digest, t0 + 61))
    assert await store.rotated_away_to(replaced.token_digest, now=t0 + 1)

    assert await store.delete(login.id, now=t0 + 1)

    assert not await store.rotated_away_to(replaced.token_digest, now=t0 + 2)


@pytest.mark.parametrize(
    ("replaced", "error"),
    [
        (("d" * 64,), TypeError),
        (["d" * 64, 1.0], TypeError),
        (("", 1.0), ValueError),
        ((b"d", 1.0), TypeError),
        (("d" * 64, math.nan), ValueError),
        (("d" * 64, "1"), TypeError),
    ],
    ids=["one-item", "list", "empty-digest", "bytes-digest", "nan-time", "str-time"],
)
async def test_create_refuses_a_replaced_session_that_is_not_a_digest_and_a_time(
    store: Store, replaced: Any, error: type[Exception]
) -> None:
    t0 = start_time()
    record = make_record(now=t0)

    with pytest.raises(error, match="replaced"):
        await store.create(record, max_sessions=10, now=t0, replaced=replaced)

    assert await store.get(record.token_digest, now=t0) is None


async def test_create_refuses_a_replaced_session_under_its_own_digest(store: Store) -> None:
    t0 = start_time()
    record = make_record(now=t0)

    with pytest.raises(ValueError, match="own token digest"):
        await store.create(record, max_sessions=10, now=t0, replaced=(record.token_digest, t0 + 60))

    assert await store.get(record.token_digest, now=t0) is None


async def test_a_digest_rotated_away_is_forgotten_with_its_session(store: Store) -> None:
    """A session that expired, or was deleted, rotated no live session away: its old
    token is answered as any dead one, its cookie cleared."""
    t0 = start_time()
    expiring = make_record(now=t0)
    deleted = make_record(now=t0)
    for each in (expiring, deleted):
        await store.create(each, max_sessions=10, now=t0)

    for each in (expiring, deleted):
        await rotate_away(store, each, now=t0 + 1, until=t0 + 10 * TTL)
    assert await store.delete(deleted.id, now=t0 + 2)

    assert not await store.rotated_away_to(deleted.token_digest, now=t0 + 2)
    assert await store.rotated_away_to(expiring.token_digest, now=t0 + TTL)
    assert not await store.rotated_away_to(expiring.token_digest, now=t0 + 1 + TTL)


async def test_a_rotation_without_a_notice_time_leaves_no_digest_rotated_away(store: Store) -> None:
    t0 = start_time()
    record = make_record(now=t0)
    await store.create(record, max_sessions=10, now=t0)

    await rotate_away(store, record, now=t0 + 1, until=None)

    assert not await store.rotated_away_to(record.token_digest, now=t0 + 2)


async def test_the_latest_rotation_names_the_digest_rotated_away(store: Store) -> None:
    t0 = start_time()
    record = make_record(now=t0)
    await store.create(record, max_sessions=10, now=t0)

    first = await rotate_away(store, record, now=t0 + 1, until=t0 + 61)
    await rotate_away(
        store, dataclasses.replace(record, token_digest=first), now=t0 + 2, until=t0 + 62
    )

    assert await store.rotated_away_to(first, now=t0 + 3)
    assert not await store.rotated_away_to(first, now=t0 + 62)


async def test_a_refused_rotation_leaves_nothing_rotated_away(store: Store) -> None:
    """A rotation that does not apply (the session holds another digest, or is gone)
    must not mark the digest it named: that digest was never this session's."""
    t0 = start_time()
    record = make_record(now=t0)
    await store.create(record, max_sessions=10, now=t0)
    stale = new_digest()

    update = make_update(
        now=t0 + 1,
        token_digest=new_digest(),
        expected_token_digest=stale,
        rotated_away_until=t0 + 61,
    )
    assert not await store.update(record.id, update, now=t0 + 1)
    assert not await store.update(new_session_id(), update, now=t0 + 1)

    assert not await store.rotated_away_to(stale, now=t0 + 2)
    assert not await store.rotated_away_to(record.token_digest, now=t0 + 2)
    assert await store.get(record.token_digest, now=t0 + 2) is not None


@pytest.mark.parametrize(
    ("digest", "now", "error"),
    [(b"digest", 0.0, TypeError), ("", 0.0, ValueError), ("d", math.nan, ValueError)],
    ids=["bytes-digest", "empty-digest", "nan-now"],
)
async def test_rotated_away_to_refuses_a_digest_or_now_that_is_not_one(
    store: Store, digest: Any, now: float, error: type[Exception]
) -> None:
    with pytest.raises(error):
        await store.rotated_away_to(digest, now=now)


async def test_an_update_guarded_by_another_sessions_digest_is_refused(store: Store) -> None:
    """Naming the digest the session holds as the new one looked, on a single Redis
    server, like a retry of a rotation that ran already: the update went through, and
    the other session's digest no longer found it."""
    t0 = start_time()
    alice = make_record(now=t0, user_id="alice", data={"a": 1})
    bob = make_record(now=t0, user_id="bob", data={"b": 1})
    await store.create(alice, max_sessions=10, now=t0)
    await store.create(bob, max_sessions=10, now=t0)

    update = make_update(
        now=t0 + 1,
        token_digest=alice.token_digest,
        set_keys={"c": 1},
        expected_token_digest=bob.token_digest,
    )
    assert not await store.update(alice.id, update, now=t0 + 1)

    got_alice = await store.get(alice.token_digest, now=t0 + 1)
    got_bob = await store.get(bob.token_digest, now=t0 + 1)
    assert got_alice is not None
    assert got_alice.data == {"a": 1}
    assert got_bob is not None
    assert got_bob.id == bob.id


async def test_an_update_naming_the_digest_the_session_holds_is_no_rotation(store: Store) -> None:
    """``CreateError`` is for a digest another session holds; a session's own is no clash."""
    t0 = start_time()
    record = make_record(now=t0, data={"a": 1})
    await store.create(record, max_sessions=10, now=t0)

    update = make_update(
        now=t0 + 1,
        token_digest=record.token_digest,
        set_keys={"b": 2},
        expected_token_digest=record.token_digest,
        rotated_away_until=t0 + 61,
    )
    assert await store.update(record.id, update, now=t0 + 1)

    got = await store.get(record.token_digest, now=t0 + 1)
    assert got is not None
    assert (got.id, got.data, got.last_active_at) == (record.id, {"a": 1, "b": 2}, t0 + 1)
    assert not await store.rotated_away_to(record.token_digest, now=t0 + 1)
    (listed,) = await store.list_for_user(record.user_id, now=t0 + 1)
    assert listed.token_digest == record.token_digest


@pytest.mark.parametrize("with_data", [False, True], ids=["times-only", "with-data"])
async def test_rotating_onto_another_sessions_digest_is_refused_and_changes_nothing(
    store: Store, with_data: bool
) -> None:
    """Never reachable with random tokens, but a store must not hand one session's token
    to another, nor strand the holder: every store refuses, so the caller draws again.
    """
    t0 = start_time()
    holder = make_record(now=t0, user_id="alice", data={"a": 1})
    rotating = make_record(now=t0, user_id="bob", data={"keep": "v", "drop": 1})
    for record in (holder, rotating):
        await store.create(record, max_sessions=10, now=t0)

    update = make_update(
        now=t0 + 5,
        token_digest=holder.token_digest,
        set_keys={"new": 2} if with_data else None,
        removed_keys=frozenset({"drop"}) if with_data else frozenset(),
    )
    with pytest.raises(CreateError):
        await store.update(rotating.id, update, now=t0 + 5)

    assert_same_record(await stored_at(store, holder, now=t0 + 5), holder)
    assert_same_record(await stored_at(store, rotating, now=t0 + 5), rotating)
    (listed,) = await store.list_for_user("bob", now=t0 + 5)
    assert_same_record(listed, rotating)
    rotated = new_digest()
    assert await store.update(
        rotating.id, make_update(now=t0 + 6, token_digest=rotated), now=t0 + 6
    )
    assert await store.get(rotated, now=t0 + 6) is not None
    assert_same_record(await stored_at(store, holder, now=t0 + 6), holder)


async def test_update_of_missing_session_returns_false_and_creates_nothing(store: Store) -> None:
    """``update`` is not an upsert: an unknown id must not become a session."""
    t0 = start_time()
    digest = new_digest()

    update = make_update(now=t0, token_digest=digest, set_keys={"role": "admin"})
    changed = await store.update(new_session_id(), update, now=t0)

    assert changed is False
    assert await store.get(digest, now=t0) is None
    assert await store.delete_expired(now=t0 + 10 * TTL) == 0


async def test_update_of_expired_session_returns_false_and_changes_nothing(store: Store) -> None:
    """Activity on an expired session must not extend it back to life."""
    t0 = start_time()
    record = make_record(now=t0, ttl=60, data={"a": 1})
    await store.create(record, max_sessions=10, now=t0)
    rotated = new_digest()

    update = make_update(now=t0 + 60, token_digest=rotated, set_keys={"a": 2, "b": 3})
    changed = await store.update(record.id, update, now=t0 + 60)

    assert changed is False
    assert await store.get(record.token_digest, now=t0 + 60) is None
    assert await store.get(rotated, now=t0 + 60) is None
    # Seen from before the expiry, the record is exactly as it was.
    assert_same_record(await store.get(record.token_digest, now=t0), record)


async def test_update_of_expired_session_onto_a_taken_digest_returns_false(store: Store) -> None:
    """An expired session is not rotated onto anything: the answer is that it is gone, as
    for any other update (a cluster claimed the digest first, and raised CreateError)."""
    t0 = start_time()
    expired = make_record(now=t0, ttl=10)
    holder = make_record(now=t0)
    for record in (expired, holder):
        await store.create(record, max_sessions=10, now=t0)

    update = make_update(now=t0 + 20, token_digest=holder.token_digest)
    assert await store.update(expired.id, update, now=t0 + 20) is False

    assert_same_record(await stored_at(store, holder, now=t0 + 20), holder)
    assert_same_record(await store.get(expired.token_digest, now=t0), expired)


async def test_update_after_logout_cannot_resurrect_the_session(store: Store) -> None:
    """A request still in flight when the user signs out must not bring the session back.

    Its flush arrives after the delete; an update that re-created the row
    would silently undo the logout (or a revocation after a password reset).
    """
    t0 = start_time()
    record = make_record(now=t0, data={"a": 1})
    await store.create(record, max_sessions=10, now=t0)
    assert await store.delete(record.id, now=t0) is True
    rotated = new_digest()

    update = make_update(now=t0 + 1, token_digest=rotated, set_keys={"a": 2})
    changed = await store.update(record.id, update, now=t0 + 1)

    assert changed is False
    assert await store.get(record.token_digest, now=t0 + 1) is None
    assert await store.get(rotated, now=t0 + 1) is None
    assert await store.list_for_user(record.user_id, now=t0 + 1) == []
    assert await store.delete(record.id, now=t0 + 1) is False


async def test_update_touches_only_the_named_session(store: Store) -> None:
    t0 = start_time()
    target, sibling = make_record(now=t0, data={"a": 1}), make_record(now=t0, data={"a": 1})
    for record in (target, sibling):
        await store.create(record, max_sessions=10, now=t0)

    update = make_update(now=t0 + 5, token_digest=new_digest(), set_keys={"a": 2})
    assert await store.update(target.id, update, now=t0 + 5)

    assert_same_record(await store.get(sibling.token_digest, now=t0 + 5), sibling)


# -- update: conditional on the token digest --------------------------------------------

CONDITIONAL_UPDATES = {
    "touch": {},
    # Due: the session was last active before 2096. PostgreSQL ran such a touch unguarded.
    "due-touch": {"touch_if_last_active_by": 4e9},
    "data": {"set_keys": {"b": 2}, "removed_keys": frozenset({"a"})},
    "capped-data": {"set_keys": {"b": 2}, "max_data_bytes": 1000},
    "rotation": {"token_digest": "new"},
    "rotation-with-capped-data": {
        "token_digest": "new",
        "set_keys": {"b": 2},
        "removed_keys": frozenset({"a"}),
        "max_data_bytes": 1000,
    },
}


def conditional_update(now: float, expected: str, fields: dict[str, Any]) -> SessionUpdate:
    """``fields`` at ``now``, applied only under ``expected``; a new digest for "new"."""
    if fields.get("token_digest") == "new":
        fields = {**fields, "token_digest": new_digest()}
    return update_with(now, expected_token_digest=expected, **fields)


@pytest.mark.parametrize("fields", CONDITIONAL_UPDATES.values(), ids=CONDITIONAL_UPDATES.keys())
async def test_an_update_conditional_on_the_held_digest_applies(
    store: Store, fields: dict[str, Any]
) -> None:
    t0 = start_time()
    record = make_record(now=t0, data={"a": 1})
    await store.create(record, max_sessions=10, now=t0)
    update = conditional_update(t0 + 5, record.token_digest, fields)

    assert await store.update(record.id, update, now=t0 + 5)

    got = await store.get(update.token_digest or record.token_digest, now=t0 + 5)
    assert got is not None
    assert (got.id, got.last_active_at) == (record.id, t0 + 5)
    assert got.data == ({"b": 2} if "removed_keys" in fields else {"a": 1, **update.set_keys})


@pytest.mark.parametrize("fields", CONDITIONAL_UPDATES.values(), ids=CONDITIONAL_UPDATES.keys())
async def test_an_update_conditional_on_another_digest_changes_nothing(
    store: Store, fields: dict[str, Any]
) -> None:
    """The request of a token rotated away (a stolen copy's, held open) rotates or
    writes conditionally on it: the session is gone, for it, in the same atomic step."""
    t0 = start_time()
    record = make_record(now=t0, data={"a": 1})
    await store.create(record, max_sessions=10, now=t0)
    update = conditional_update(t0 + 5, new_digest(), fields)

    assert await store.update(record.id, update, now=t0 + 5) is False

    assert_same_record(await stored_at(store, record, now=t0 + 5), record)
    if update.token_digest is not None:
        assert await store.get(update.token_digest, now=t0 + 5) is None
        # Nothing of it was claimed on the way (a cluster's pointer): it can be used.
        rotated = make_update(now=t0 + 6, token_digest=update.token_digest)
        assert await store.update(record.id, rotated, now=t0 + 6)
        assert await store.get(update.token_digest, now=t0 + 6) is not None


async def test_a_rotation_conditional_on_a_rotated_out_digest_fails(store: Store) -> None:
    """Two rotations from one token: the first wins, the second finds it gone."""
    t0 = start_time()
    record = make_record(now=t0)
    await store.create(record, max_sessions=10, now=t0)
    first, second = new_digest(), new_digest()

    won = make_update(now=t0 + 1, token_digest=first, expected_token_digest=record.token_digest)
    lost = make_update(now=t0 + 2, token_digest=second, expected_token_digest=record.token_digest)
    assert await store.update(record.id, won, now=t0 + 1)
    assert await store.update(record.id, lost, now=t0 + 2) is False

    assert await store.get(second, now=t0 + 2) is None
    got = await store.get(first, now=t0 + 2)
    assert got is not None
    assert got.last_active_at == t0 + 1


async def test_a_conditional_rotation_onto_a_taken_digest_under_another_is_just_gone(
    store: Store,
) -> None:
    """Not under the digest it must hold, the session is gone for the caller, whatever else
    the update asks: every store answers ``False``, where one (a cluster, which claims the
    new digest first) raised :class:`CreateError`."""
    t0 = start_time()
    rotating, holder = make_record(now=t0), make_record(now=t0)
    for record in (rotating, holder):
        await store.create(record, max_sessions=10, now=t0)

    update = make_update(
        now=t0 + 1, token_digest=holder.token_digest, expected_token_digest=new_digest()
    )
    assert await store.update(rotating.id, update, now=t0 + 1) is False

    assert_same_record(await stored_at(store, rotating, now=t0 + 1), rotating)
    assert_same_record(await stored_at(store, holder, now=t0 + 1), holder)


# -- update: the size cap -------------------------------------------------------------


@pytest.mark.parametrize("data", DATA_CASES.values(), ids=DATA_CASES.keys())
async def test_merged_data_exactly_at_the_cap_is_accepted_one_byte_over_refused(
    store: Store, data: dict[str, Any]
) -> None:
    """Every store measures merged data exactly as ``data_size`` does, down to the byte.

    The session layer checks a request's own copy with ``data_size``; a store
    that counted otherwise (unescaped UTF-8, other separators, a lost key)
    would refuse what the session accepted, or keep more than the cap.
    """
    t0 = start_time()
    record = make_record(now=t0, data=copy.deepcopy(data))
    await store.create(record, max_sessions=10, now=t0)
    added = {"pad": "x" * 10, 'ключ/\x00"': ["é", 1.5, {"/": None}]}
    cap = data_size({**data, **added})

    too_tight = make_update(now=t0 + 1, set_keys=added, max_data_bytes=cap - 1)
    with pytest.raises(DataTooLarge) as refused:
        await store.update(record.id, too_tight, now=t0 + 1)
    assert (refused.value.size, refused.value.limit) == (cap, cap - 1)
    assert_same_record(await stored_at(store, record, now=t0 + 1), record)

    exact = make_update(now=t0 + 2, set_keys=added, max_data_bytes=cap)
    assert await store.update(record.id, exact, now=t0 + 2)
    got = await stored_at(store, record, now=t0 + 2)
    assert got is not None
    assert typed(got.data) == typed({**data, **added})
    assert data_size(got.data) == cap


async def test_refused_update_changes_nothing(store: Store) -> None:
    """A write refused for size must not half-apply: no removal, no rotation, no touch."""
    t0 = start_time()
    record = make_record(now=t0, data={"keep": "v", "drop": 1})
    await store.create(record, max_sessions=10, now=t0)
    rotated = new_digest()

    update = make_update(
        now=t0 + 5,
        ttl=10,
        set_keys={"big": "x" * 100},
        removed_keys=frozenset({"drop"}),
        token_digest=rotated,
        max_data_bytes=50,
    )
    with pytest.raises(DataTooLarge):
        await store.update(record.id, update, now=t0 + 5)

    assert_same_record(await stored_at(store, record, now=t0 + 5), record)
    assert await store.get(rotated, now=t0 + 5) is None
    (listed,) = await store.list_for_user(record.user_id, now=t0 + 5)
    assert_same_record(listed, record)
    small = make_update(now=t0 + 6, set_keys={"small": 1}, max_data_bytes=50)
    assert await store.update(record.id, small, now=t0 + 6)


async def test_a_replaced_value_counts_at_its_new_size_only(store: Store) -> None:
    t0 = start_time()
    record = make_record(now=t0, data={"cart": "x" * 40})
    await store.create(record, max_sessions=10, now=t0)
    cap = data_size(record.data)

    same_size = make_update(now=t0 + 1, set_keys={"cart": "y" * 40}, max_data_bytes=cap)
    assert await store.update(record.id, same_size, now=t0 + 1)
    larger = make_update(now=t0 + 2, set_keys={"cart": "y" * 41}, max_data_bytes=cap)
    with pytest.raises(DataTooLarge):
        await store.update(record.id, larger, now=t0 + 2)

    got = await stored_at(store, record, now=t0 + 2)
    assert got is not None
    assert got.data == {"cart": "y" * 40}


async def test_a_removed_key_does_not_count_toward_the_cap(store: Store) -> None:
    """A write that drops a large key and adds a small one is measured after the removal.

    Counting the removed key too would refuse a write that leaves the data under the cap.
    """
    t0 = start_time()
    record = make_record(now=t0, data={"big": "x" * 100, "keep": 1})
    await store.create(record, max_sessions=10, now=t0)
    after = {"keep": 1, "small": 2}

    update = make_update(
        now=t0 + 1,
        set_keys={"small": 2},
        removed_keys=frozenset({"big"}),
        max_data_bytes=data_size(after),
    )
    assert await store.update(record.id, update, now=t0 + 1)

    got = await stored_at(store, record, now=t0 + 1)
    assert got is not None
    assert got.data == after


async def test_removing_keys_is_allowed_even_when_the_data_is_over_the_cap(store: Store) -> None:
    """A session over the cap (the limit was lowered since) must always be able to shrink.

    Refusing removals would leave it stuck: every later write refused too.
    """
    t0 = start_time()
    record = make_record(now=t0, data={"a": "x" * 50, "b": "y" * 50, "c": 1})
    await store.create(record, max_sessions=10, now=t0)

    update = make_update(now=t0 + 1, removed_keys=frozenset({"a"}), max_data_bytes=20)
    assert await store.update(record.id, update, now=t0 + 1)

    got = await stored_at(store, record, now=t0 + 1)
    assert got is not None
    assert got.data == {"b": "y" * 50, "c": 1}
    assert data_size(got.data) > 20


async def test_update_without_data_changes_ignores_the_cap(store: Store) -> None:
    t0 = start_time()
    record = make_record(now=t0, data={"a": "x" * 100})
    await store.create(record, max_sessions=10, now=t0)
    rotated = new_digest()

    touch = make_update(now=t0 + 1, max_data_bytes=10)
    assert await store.update(record.id, touch, now=t0 + 1)
    rotation = make_update(now=t0 + 2, token_digest=rotated, max_data_bytes=10)
    assert await store.update(record.id, rotation, now=t0 + 2)

    got = await store.get(rotated, now=t0 + 2)
    assert got is not None
    assert (got.data, got.last_active_at, got.expires_at) == (record.data, t0 + 2, t0 + 2 + TTL)


@pytest.mark.parametrize("elapsed", [10, 20], ids=["expiring-exactly-now", "expired-before"])
async def test_update_of_a_session_that_is_not_live_returns_false_whatever_the_cap(
    store: Store, elapsed: int
) -> None:
    """A session expiring exactly now is as dead for a capped write as for a read.

    Capped writes take their own path in some stores (a size check before the write);
    it must not let a write that fits, or one that does not, reach a session ``get``
    already refuses to serve.
    """
    t0 = start_time()
    expired = make_record(now=t0, ttl=10)
    await store.create(expired, max_sessions=10, now=t0)
    now = t0 + elapsed

    for session_id in (expired.id, new_session_id()):
        for set_keys in ({"big": "x" * 100}, {"small": 1}):
            update = make_update(now=now, set_keys=set_keys, max_data_bytes=50)
            assert await store.update(session_id, update, now=now) is False

    assert await store.get(expired.token_digest, now=now) is None
    assert await store.list_for_user(expired.user_id, now=now) == []


async def test_concurrent_updates_cannot_together_exceed_the_cap(store: Store) -> None:
    """Each write fits on its own; the store, merging them, must stop at the cap.

    A check against each request's own copy lets N concurrent requests store
    N times the limit.
    """
    t0 = start_time()
    record = make_record(now=t0)
    await store.create(record, max_sessions=10, now=t0)
    value = "x" * 20
    cap = data_size({f"k{i}": value for i in range(3)})  # room for exactly three keys

    results = await asyncio.gather(
        *(
            store.update(
                record.id,
                make_update(now=t0 + 1, set_keys={f"k{i}": value}, max_data_bytes=cap),
                now=t0 + 1,
            )
            for i in range(10)
        ),
        return_exceptions=True,
    )

    assert results.count(True) == 3, results
    assert all(isinstance(result, DataTooLarge) for result in results if result is not True)
    got = await stored_at(store, record, now=t0 + 1)
    assert got is not None
    assert len(got.data) == 3
    assert data_size(got.data) == cap


# -- delete -------------------------------------------------------------------------


async def test_delete_removes_the_session(store: Store) -> None:
    t0 = start_time()
    record, other = make_record(now=t0), make_record(now=t0)
    for each in (record, other):
        await store.create(each, max_sessions=10, now=t0)

    assert await store.delete(record.id, now=t0) is True

    assert await store.get(record.token_digest, now=t0) is None
    assert await listed_ids(store, "alice", now=t0) == [other.id]
    assert await store.delete(record.id, now=t0) is False


async def test_delete_of_unknown_id_returns_false(store: Store) -> None:
    t0 = start_time()
    record = make_record(now=t0)
    await store.create(record, max_sessions=10, now=t0)

    assert await store.delete(new_session_id(), now=t0) is False
    assert await store.delete(new_session_id(), now=t0, user_id="alice") is False
    assert await store.get(record.token_digest, now=t0) is not None


async def test_delete_by_the_owner_removes_the_session(store: Store) -> None:
    t0 = start_time()
    record = make_record(now=t0)
    await store.create(record, max_sessions=10, now=t0)

    assert await store.delete(record.id, now=t0, user_id="alice") is True
    assert await store.get(record.token_digest, now=t0) is None


async def test_delete_of_an_expired_session_not_yet_cleaned_up_counts_as_not_found(
    store: Store,
) -> None:
    """Ending a session that has expired, still stored until cleanup reaches it, reports
    what every store can say alike: not found. One that drops expired sessions itself
    (Redis, by TTL) cannot tell them apart from ones never made; and an app's "no such
    device" must not depend on the store. The row goes all the same.
    """
    t0 = start_time()
    ended = make_record(now=t0, ttl=10)
    owned = make_record(now=t0, ttl=10)
    for record in (ended, owned):
        await store.create(record, max_sessions=10, now=t0)

    assert await store.delete(ended.id, now=t0 + 10) is False
    assert await store.delete(owned.id, now=t0 + 11, user_id="alice") is False

    for record in (ended, owned):
        assert await store.get(record.token_digest, now=t0 + 1) is None
    assert await listed_ids(store, "alice", now=t0 + 1) == []
    assert await store.delete_expired(now=t0 + 11) == 0


async def test_delete_for_user_counts_only_live_sessions_and_deletes_the_expired_too(
    store: Store,
) -> None:
    t0 = start_time()
    expired = [make_record(now=t0 + i, ttl=10 - i) for i in range(2)]
    live = [make_record(now=t0 + i, ttl=100) for i in range(3)]
    for record in (*expired, *live):
        await store.create(record, max_sessions=10, now=t0 + 3)

    assert await store.delete_for_user("alice", now=t0 + 10, except_id=live[0].id) == 2

    assert await listed_ids(store, "alice", now=t0 + 1) == [live[0].id]
    assert await store.delete_expired(now=t0 + 10) == 0
    assert await store.delete_for_user("alice", now=t0 + 10) == 1


async def test_delete_by_digest_ends_the_session_only_while_it_holds_that_digest(
    store: Store,
) -> None:
    """A request ending the session its token named must not end it once another request
    has rotated the token: the session is then the new token holder's."""
    t0 = start_time()
    rotated, kept = make_record(now=t0), make_record(now=t0)
    for record in (rotated, kept):
        await store.create(record, max_sessions=10, now=t0)
    holder_digest = new_digest()
    assert await store.update(
        rotated.id, make_update(now=t0 + 1, token_digest=holder_digest), now=t0 + 1
    )

    assert await store.delete(rotated.id, now=t0 + 1, token_digest=rotated.token_digest) is False
    assert await store.delete(kept.id, now=t0 + 1, token_digest=holder_digest) is False
    assert (
        await store.delete(kept.id, now=t0 + 1, user_id="bob", token_digest=kept.token_digest)
        is False
    )
    assert await listed_ids(store, "alice", now=t0 + 1) == [rotated.id, kept.id]

    assert await store.delete(rotated.id, now=t0 + 1, token_digest=holder_digest) is True
    assert (
        await store.delete(kept.id, now=t0 + 1, user_id="alice", token_digest=kept.token_digest)
        is True
    )
    assert await listed_ids(store, "alice", now=t0 + 1) == []
    assert await store.get(holder_digest, now=t0 + 1) is None


async def test_revoking_another_users_session_by_id_is_refused(store: Store) -> None:
    """Session ids are visible; knowing one must not let another user end that session.

    ``delete(id, user_id=...)`` backs "revoke my session": without the owner
    check it is an insecure direct object reference.
    """
    t0 = start_time()
    victim = make_record(now=t0, user_id="victim")
    await store.create(victim, max_sessions=10, now=t0)

    assert await store.delete(victim.id, now=t0, user_id="mallory") is False
    assert await store.delete(victim.id, now=t0, user_id="Victim") is False

    assert_same_record(await store.get(victim.token_digest, now=t0), victim)


async def test_delete_for_user_deletes_every_session_and_counts(store: Store) -> None:
    t0 = start_time()
    alices = [make_record(now=t0 + i) for i in range(3)]
    bob = make_record(now=t0, user_id="bob")
    for record in (*alices, bob):
        await store.create(record, max_sessions=10, now=t0 + 3)

    assert await store.delete_for_user("alice", now=t0 + 3) == 3

    assert await store.list_for_user("alice", now=t0 + 3) == []
    for record in alices:
        assert await store.get(record.token_digest, now=t0 + 3) is None
    assert_same_record(await store.get(bob.token_digest, now=t0 + 3), bob)
    assert await store.delete_for_user("alice", now=t0 + 3) == 0


async def test_delete_for_user_keeps_the_excepted_session(store: Store) -> None:
    t0 = start_time()
    alices = [make_record(now=t0 + i) for i in range(3)]
    for record in alices:
        await store.create(record, max_sessions=10, now=t0 + 3)

    assert await store.delete_for_user("alice", now=t0 + 3, except_id=alices[1].id) == 2

    assert await listed_ids(store, "alice", now=t0 + 3) == [alices[1].id]
    assert_same_record(await store.get(alices[1].token_digest, now=t0 + 3), alices[1])


async def test_delete_for_user_ignores_an_except_id_of_another_user(store: Store) -> None:
    t0 = start_time()
    alice, bob = make_record(now=t0), make_record(now=t0, user_id="bob")
    for record in (alice, bob):
        await store.create(record, max_sessions=10, now=t0)

    assert await store.delete_for_user("alice", now=t0, except_id=bob.id) == 1

    assert await store.list_for_user("alice", now=t0) == []
    assert await listed_ids(store, "bob", now=t0) == [bob.id]


async def test_delete_for_user_without_sessions_returns_zero(store: Store) -> None:
    t0 = start_time()
    record = make_record(now=t0)
    await store.create(record, max_sessions=10, now=t0)

    assert await store.delete_for_user("nobody", now=t0) == 0
    assert await store.delete_for_user("nobody", now=t0, except_id=record.id) == 0
    assert await listed_ids(store, "alice", now=t0) == [record.id]


# -- list_for_user --------------------------------------------------------------------


async def test_list_for_user_orders_most_recently_active_first(store: Store) -> None:
    t0 = start_time()
    first, second, third = (make_record(now=t0 + i) for i in range(3))
    for record in (first, second, third):
        await store.create(record, max_sessions=10, now=record.created_at)
    assert await listed_ids(store, "alice", now=t0 + 3) == [third.id, second.id, first.id]

    assert await store.update(first.id, make_update(now=t0 + 5), now=t0 + 5)

    listed = await store.list_for_user("alice", now=t0 + 5)
    assert [record.id for record in listed] == [first.id, third.id, second.id]
    assert_same_record(listed[1], third)
    assert listed[0].last_active_at == t0 + 5


async def test_list_for_user_excludes_expired_and_other_users(store: Store) -> None:
    t0 = start_time()
    live = make_record(now=t0)
    expired = make_record(now=t0 + 1, ttl=10)
    bob = make_record(now=t0 + 2, user_id="bob")
    for record in (live, expired, bob):
        await store.create(record, max_sessions=10, now=record.created_at)

    listed = await store.list_for_user("alice", now=t0 + 20)

    assert len(listed) == 1
    assert_same_record(listed[0], live)


async def test_list_for_unknown_user_is_empty(store: Store) -> None:
    t0 = start_time()
    await store.create(make_record(now=t0), max_sessions=10, now=t0)

    assert await store.list_for_user("nobody", now=t0) == []


async def test_user_ids_are_compared_exactly(store: Store) -> None:
    t0 = start_time()
    users = ["alice", "Alice", "alice ", "ålice", "42", "o'brien"]
    records = {user: make_record(now=t0, user_id=user) for user in users}
    for record in records.values():
        await store.create(record, max_sessions=1, now=t0)

    for user, record in records.items():
        listed = await store.list_for_user(user, now=t0)
        assert [each.id for each in listed] == [record.id]
        assert_same_record(listed[0], record)


@pytest.mark.parametrize("pattern", ["*", "%", "a*", "al%", "_lice", "?lice", "[a]lice", ".*"])
async def test_wildcard_user_id_never_reaches_other_users_sessions(
    store: Store, pattern: str
) -> None:
    """User ids can come from user input (sign-up names); patterns must stay literal.

    A store that built SQL LIKE or Redis glob patterns from them would let a
    user named ``*`` list, or sign out, everybody.
    """
    t0 = start_time()
    alice, bob = make_record(now=t0), make_record(now=t0, user_id="bob")
    for record in (alice, bob):
        await store.create(record, max_sessions=10, now=t0)

    assert await store.list_for_user(pattern, now=t0) == []
    assert await store.delete_for_user(pattern, now=t0) == 0

    attacker = make_record(now=t0 + 1, user_id=pattern)
    await store.create(attacker, max_sessions=1, now=t0 + 1)
    assert await listed_ids(store, pattern, now=t0 + 1) == [attacker.id]
    assert await store.delete_for_user(pattern, now=t0 + 1) == 1
    assert await listed_ids(store, "alice", now=t0 + 1) == [alice.id]
    assert await listed_ids(store, "bob", now=t0 + 1) == [bob.id]


# -- delete_expired -------------------------------------------------------------------


async def test_delete_expired_deletes_only_expired_sessions(store: Store) -> None:
    t0 = start_time()
    expired = [make_record(now=t0, user_id=f"user{i}", ttl=ttl) for i, ttl in enumerate((5, 9, 10))]
    live = [make_record(now=t0, user_id=f"user{i}", ttl=11) for i in range(2)]
    for record in (*expired, *live):
        await store.create(record, max_sessions=10, now=t0)

    # The last of the expired ones expires exactly at the cut: it counts.
    assert await store.delete_expired(now=t0 + 10) == 3
    assert await store.delete_expired(now=t0 + 10) == 0

    for record in expired:
        assert await store.get(record.token_digest, now=t0) is None
    for record in live:
        assert_same_record(await store.get(record.token_digest, now=t0 + 10), record)


async def test_delete_expired_keeps_live_sessions(store: Store) -> None:
    t0 = start_time()
    expired = make_record(now=t0, ttl=10)
    live = [make_record(now=t0, user_id=f"user{i}") for i in range(3)]
    for record in (expired, *live):
        await store.create(record, max_sessions=10, now=t0)

    assert await store.delete_expired(now=t0 + 20) == 1

    assert await store.get(expired.token_digest, now=t0) is None
    for record in live:
        assert_same_record(await store.get(record.token_digest, now=t0 + 20), record)


async def test_delete_expired_with_nothing_expired_returns_zero(store: Store) -> None:
    t0 = start_time()
    record = make_record(now=t0)
    await store.create(record, max_sessions=10, now=t0)

    assert await store.delete_expired(now=t0 + 1) == 0
    assert await store.get(record.token_digest, now=t0 + 1) is not None


async def test_delete_expired_respects_the_limit_and_drains_a_backlog(store: Store) -> None:
    t0 = start_time()
    expired = [make_record(now=t0, user_id=f"user{i % 3}", ttl=10) for i in range(7)]
    live = [make_record(now=t0, user_id=f"user{i}") for i in range(2)]
    for record in (*expired, *live):
        await store.create(record, max_sessions=10, now=t0)

    counts = [await store.delete_expired(now=t0 + 20, limit=3) for _ in range(4)]

    assert counts == [3, 3, 1, 0]
    for record in expired:
        assert await store.get(record.token_digest, now=t0) is None
    for record in live:
        assert await store.get(record.token_digest, now=t0 + 20) is not None


async def test_delete_expired_at_a_later_now_reaches_every_session_again(store: Store) -> None:
    """A call cut short by its limit, then a drain at a later time: everything expired by
    then goes, also where the first call had already looked (it found nothing expired
    there yet)."""
    t0 = start_time()
    for i in range(12):
        for ttl in (10, 20):
            record = make_record(now=t0, user_id=f"user{i}", ttl=ttl)
            await store.create(record, max_sessions=10, now=t0)

    assert await store.delete_expired(now=t0 + 10, limit=5) == 5
    drained = [await store.delete_expired(now=t0 + 20, limit=4) for _ in range(6)]
    again = await store.delete_expired(now=t0 + 20, limit=4)

    assert drained[:5] == [4, 4, 4, 4, 3]
    assert sum(drained) == 19
    assert again == 0


async def test_delete_expired_goes_by_the_expiry_an_update_moved(store: Store) -> None:
    t0 = start_time()
    extended = make_record(now=t0, ttl=10)
    shortened = make_record(now=t0, user_id="bob", ttl=7200)
    for record in (extended, shortened):
        await store.create(record, max_sessions=10, now=t0)
    assert await store.update(extended.id, make_update(now=t0 + 5, ttl=3600), now=t0 + 5)
    assert await store.update(shortened.id, make_update(now=t0 + 5, ttl=15), now=t0 + 5)

    assert await store.delete_expired(now=t0 + 600) == 1
    assert await store.get(shortened.token_digest, now=t0 + 5) is None
    assert await store.get(extended.token_digest, now=t0 + 600) is not None
    assert await store.delete_expired(now=t0 + 3605) == 1
    assert await store.get(extended.token_digest, now=t0 + 5) is None


async def test_delete_expired_counts_only_sessions_still_stored(store: Store) -> None:
    t0 = start_time()
    records = [make_record(now=t0, user_id=f"user{i % 2}", ttl=10) for i in range(6)]
    for record in records:
        await store.create(record, max_sessions=10, now=t0)
    assert await store.delete(records[0].id, now=t0)
    assert await store.delete_for_user("user1", now=t0) == 3

    assert await store.delete_expired(now=t0 + 20) == 2
    assert await store.delete_expired(now=t0 + 20) == 0


async def test_delete_expired_reaches_expiries_minutes_apart_across_batches(store: Store) -> None:
    t0 = start_time()
    ttls = [90 * i + 10 for i in range(10)]  # fifteen minutes, created latest expiry first
    records = [make_record(now=t0, user_id=f"user{i}", ttl=ttl) for i, ttl in enumerate(ttls)]
    for record in reversed(records):
        await store.create(record, max_sessions=10, now=t0)
    cut = 90 * 6 + 10  # the seventh expires exactly then: it counts

    counts = [await store.delete_expired(now=t0 + cut, limit=3) for _ in range(4)]

    assert counts == [3, 3, 1, 0]
    for record, ttl in zip(records, ttls, strict=True):
        stored = await store.get(record.token_digest, now=t0)
        assert (stored is None) == (ttl <= cut), ttl


async def test_delete_expired_lets_other_tasks_run_during_a_large_batch(store: Store) -> None:
    """Live traffic goes on while a cleanup runs: a batch of hundreds does not hold the
    event loop from its start to its end."""
    t0 = start_time()
    for i in range(300):
        await store.create(make_record(now=t0, user_id=f"user{i}", ttl=10), max_sessions=10, now=t0)
    turns = 0

    async def count_turns() -> None:
        nonlocal turns
        while True:
            await asyncio.sleep(0)
            turns += 1

    counter = asyncio.create_task(count_turns())
    await asyncio.sleep(0)
    try:
        before = turns
        assert await store.delete_expired(now=t0 + 20, limit=300) == 300
        turns_during = turns - before
    finally:
        counter.cancel()

    assert turns_during > 0


# -- stats ----------------------------------------------------------------------------


def none_expired(store: Store) -> int | None:
    """What ``expired_sessions`` says of a store without expired sessions."""
    return 0 if store.counts_expired_sessions else None


async def test_stats_of_an_empty_store_are_zero(store: Store) -> None:
    assert await store.stats(now=start_time()) == StoreStats(0, 0, {}, none_expired(store))


async def test_stats_count_live_sessions_users_and_device_types(store: Store) -> None:
    t0 = start_time()
    records = [
        make_record(now=t0),
        make_record(now=t0, device_type="mobile"),
        make_record(now=t0, user_id="bob", device_type="mobile"),
        make_record(now=t0, user_id="carol", device_type="tablet", ttl=10),
        make_record(now=t0, user_id="dave", ttl=20),  # expires exactly at t0 + 20
        make_record(now=t0, user_id="erin", device_type="bot", ttl=21),
    ]
    for record in records:
        await store.create(record, max_sessions=10, now=t0)

    before = await store.stats(now=t0)
    after = await store.stats(now=t0 + 20)

    assert (before.live_sessions, before.users) == (6, 5)
    assert dict(before.by_device_type) == {"desktop": 2, "mobile": 2, "tablet": 1, "bot": 1}
    # Expired sessions count as neither live sessions nor users, expiring now included.
    assert (after.live_sessions, after.users) == (4, 3)
    assert dict(after.by_device_type) == {"desktop": 1, "mobile": 2, "bot": 1}


async def test_stats_count_expired_sessions_until_cleanup(store: Store) -> None:
    t0 = start_time()
    expired = [make_record(now=t0, user_id=f"user{i}", ttl=10 + i) for i in range(3)]
    live = make_record(now=t0, ttl=30)
    for record in (*expired, live):
        await store.create(record, max_sessions=10, now=t0)
    if not store.counts_expired_sessions:
        # It drops expired sessions by itself, so what cleanup would remove is unknown.
        assert await store.stats(now=t0 + 12) == StoreStats(1, 1, {"desktop": 1}, None)
        return

    # The last one expires exactly at t0 + 12: it counts.
    assert (await store.stats(now=t0 + 12)).expired_sessions == 3
    assert (await store.stats(now=t0 + 11)).expired_sessions == 2
    assert await store.delete_expired(now=t0 + 12) == 3

    assert await store.stats(now=t0 + 12) == StoreStats(1, 1, {"desktop": 1}, 0)


async def test_stats_follow_rotations_updates_and_deletes(store: Store) -> None:
    t0 = start_time()
    first, second = make_record(now=t0), make_record(now=t0, device_type="mobile")
    bob = make_record(now=t0, user_id="bob")
    for record in (first, second, bob):
        await store.create(record, max_sessions=10, now=t0)

    update = make_update(now=t0 + 1, token_digest=new_digest(), set_keys={"a": 1})
    assert await store.update(first.id, update, now=t0 + 1)
    assert await store.delete(bob.id, now=t0 + 1)

    stats = await store.stats(now=t0 + 1)
    assert (stats.live_sessions, stats.users) == (2, 1)
    assert dict(stats.by_device_type) == {"desktop": 1, "mobile": 1}
    await store.delete_for_user("alice", now=t0 + 1)
    assert await store.stats(now=t0 + 1) == StoreStats(0, 0, {}, none_expired(store))


# -- returned records: shared read-only from get, owned from list_for_user ----------------


async def test_a_record_from_get_is_not_changed_by_later_writes(store: Store) -> None:
    """Records from ``get`` may be shared (a cache), and a request keeps its own for its
    whole life: a store replaces what it hands out, it never edits it in place.
    """
    t0 = start_time()
    record = make_record(now=t0, data={"cart": [1, 2], "prefs": {"theme": "dark"}})
    await store.create(record, max_sessions=10, now=t0)
    got = await store.get(record.token_digest, now=t0)
    assert got is not None
    snapshot = copy.deepcopy(got)

    changes = make_update(now=t0 + 1, set_keys={"cart": [3]}, removed_keys=frozenset({"prefs"}))
    assert await store.update(record.id, changes, now=t0 + 1)
    assert await store.update(
        record.id, make_update(now=t0 + 2, token_digest=new_digest()), now=t0 + 2
    )

    assert got == snapshot


async def test_mutating_a_listed_record_does_not_change_the_store(store: Store) -> None:
    t0 = start_time()
    record = make_record(now=t0, data={"cart": [1, 2], "prefs": {"theme": "dark"}})
    await store.create(record, max_sessions=10, now=t0)

    (listed,) = await store.list_for_user("alice", now=t0)
    listed.data["cart"].append(3)
    listed.data["prefs"]["theme"] = "light"
    listed.data["injected"] = True
    listed.expires_at = t0 + 10 * TTL
    listed.user_id = "mallory"

    assert_same_record(await store.get(record.token_digest, now=t0), record)
    assert await listed_ids(store, "mallory", now=t0) == []


async def test_listed_records_hold_data_of_their_own_every_time(store: Store) -> None:
    """Callers hand listed records' data out uncopied (``to_data(copy_data=False)``)."""
    t0 = start_time()
    record = make_record(now=t0, data={"cart": [1, 2], "prefs": {"theme": "dark"}})
    await store.create(record, max_sessions=10, now=t0)

    (first,) = await store.list_for_user("alice", now=t0)
    (second,) = await store.list_for_user("alice", now=t0)
    assert first.data is not second.data
    assert first.data["cart"] is not second.data["cart"]
    first.data["cart"].append(3)
    first.data["prefs"]["theme"] = "light"
    first.data["injected"] = True

    assert typed(second.data) == typed(record.data)
    (third,) = await store.list_for_user("alice", now=t0)
    assert_same_record(third, record)
    assert_same_record(await store.get(record.token_digest, now=t0), record)


async def test_mutating_the_created_record_afterwards_does_not_change_the_store(
    store: Store,
) -> None:
    t0 = start_time()
    record = make_record(now=t0, data={"cart": [1, 2], "prefs": {"theme": "dark"}})
    original = copy.deepcopy(record)
    await store.create(record, max_sessions=10, now=t0)

    record.data["cart"].append(3)
    record.data["prefs"]["theme"] = "light"
    record.expires_at = t0 + 10 * TTL

    assert_same_record(await store.get(original.token_digest, now=t0), original)


async def test_mutating_update_values_afterwards_does_not_change_the_store(store: Store) -> None:
    t0 = start_time()
    record = make_record(now=t0)
    await store.create(record, max_sessions=10, now=t0)
    cart = [1, 2]

    assert await store.update(record.id, make_update(now=t0, set_keys={"cart": cart}), now=t0)
    cart.append(3)

    got = await store.get(record.token_digest, now=t0)
    assert got is not None
    assert got.data == {"cart": [1, 2]}


# -- concurrency ----------------------------------------------------------------------


async def test_concurrent_updates_of_different_keys_all_survive(store: Store) -> None:
    t0 = start_time()
    record = make_record(now=t0, data={"base": 0})
    await store.create(record, max_sessions=10, now=t0)

    results = await asyncio.gather(
        *(
            store.update(record.id, make_update(now=t0 + 1, set_keys={f"k{i}": i}), now=t0 + 1)
            for i in range(50)
        )
    )

    assert results == [True] * 50
    got = await store.get(record.token_digest, now=t0 + 1)
    assert got is not None
    assert got.data == {"base": 0, **{f"k{i}": i for i in range(50)}}


async def test_concurrent_sets_and_removals_all_apply(store: Store) -> None:
    t0 = start_time()
    record = make_record(now=t0, data={f"old{i}": i for i in range(20)})
    await store.create(record, max_sessions=10, now=t0)
    updates = [make_update(now=t0 + 1, removed_keys=frozenset({f"old{i}"})) for i in range(20)]
    updates += [make_update(now=t0 + 1, set_keys={f"new{i}": [i]}) for i in range(20)]

    await asyncio.gather(*(store.update(record.id, update, now=t0 + 1) for update in updates))

    got = await store.get(record.token_digest, now=t0 + 1)
    assert got is not None
    assert got.data == {f"new{i}": [i] for i in range(20)}


@pytest.mark.parametrize("cap", [None, 1000], ids=["uncapped", "capped"])
async def test_concurrent_rotation_and_data_update_both_apply(
    store: Store, cap: int | None
) -> None:
    t0 = start_time()
    record = make_record(now=t0, data={"a": 1})
    await store.create(record, max_sessions=10, now=t0)
    rotated = new_digest()
    patch = make_update(now=t0 + 1, set_keys={"b": 2}, max_data_bytes=cap)

    await asyncio.gather(
        store.update(record.id, make_update(now=t0 + 1, token_digest=rotated), now=t0 + 1),
        store.update(record.id, patch, now=t0 + 1),
    )

    got = await store.get(rotated, now=t0 + 1)
    assert got is not None
    assert got.data == {"a": 1, "b": 2}
    assert await store.get(record.token_digest, now=t0 + 1) is None


async def test_concurrent_creates_for_one_user_respect_the_limit(store: Store) -> None:
    t0 = start_time()
    records = [make_record(now=t0 + i) for i in range(20)]

    await asyncio.gather(
        *(store.create(record, max_sessions=5, now=record.created_at) for record in records)
    )

    check_kept_after_racing_creates(await listed_ids(store, "alice", now=t0 + 20), records, 5)
    assert await store.delete_for_user("alice", now=t0 + 20) == 5


async def test_concurrent_creates_with_one_token_digest_admit_exactly_one(store: Store) -> None:
    """Two logins racing on one digest must not both believe they own it.

    A check-then-insert create would let both succeed, the later silently
    taking over the token the earlier one's user was handed.
    """
    t0 = start_time()
    digest = new_digest()
    records = [make_record(now=t0, user_id=f"user{i}") for i in range(10)]
    for record in records:
        record.token_digest = digest

    results = await asyncio.gather(
        *(store.create(record, max_sessions=10, now=t0) for record in records),
        return_exceptions=True,
    )

    winners = [record for record, result in zip(records, results, strict=True) if result is None]
    assert len(winners) == 1
    assert all(isinstance(result, CreateError) for result in results if result is not None)
    assert_same_record(await store.get(digest, now=t0), winners[0])
    for record in records:
        expected = [record.id] if record is winners[0] else []
        assert await listed_ids(store, record.user_id, now=t0) == expected


@pytest.mark.parametrize("cap", [None, 1000], ids=["uncapped", "capped"])
@pytest.mark.parametrize("update_first", [True, False], ids=["update-first", "delete-first"])
async def test_update_racing_delete_never_brings_the_session_back(
    store: Store, update_first: bool, cap: int | None
) -> None:
    t0 = start_time()
    for round_ in range(10):
        record = make_record(now=t0 + round_, data={"a": 1})
        await store.create(record, max_sessions=10, now=t0 + round_)
        rotated = new_digest()
        update = store.update(
            record.id,
            make_update(
                now=t0 + round_, token_digest=rotated, set_keys={"a": 2}, max_data_bytes=cap
            ),
            now=t0 + round_,
        )
        delete = store.delete(record.id, now=t0 + round_)

        if update_first:
            _, deleted = await asyncio.gather(update, delete)
        else:
            deleted, _ = await asyncio.gather(delete, update)

        assert deleted is True
        assert await store.get(record.token_digest, now=t0 + round_) is None
        assert await store.get(rotated, now=t0 + round_) is None
        assert await store.list_for_user("alice", now=t0 + round_) == []


# -- opening and closing ----------------------------------------------------------------


async def test_async_with_opens_and_closes_the_store(store: Store) -> None:
    await store.close()
    assert not store.is_open
    t0 = start_time()
    record = make_record(now=t0)

    async with store as entered:
        assert entered is store
        assert store.is_open
        await store.create(record, max_sessions=10, now=t0)
        assert await store.get(record.token_digest, now=t0) is not None

    assert not store.is_open


async def test_a_closed_store_refuses_every_primitive_until_reopened(store: Store) -> None:
    """The memory store served while closed: code that forgot ``open()`` passed its tests
    there and failed on the first real store."""
    t0 = start_time()
    record = make_record(now=t0)
    await store.create(record, max_sessions=10, now=t0)
    await store.close()
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: store.create(make_record(now=t0), max_sessions=10, now=t0),
        lambda: store.get(record.token_digest, now=t0),
        lambda: store.update(record.id, make_update(now=t0 + 1, set_keys={"a": 1}), now=t0 + 1),
        lambda: store.delete(record.id, now=t0 + 1),
        lambda: store.delete_for_user("alice", now=t0 + 1),
        lambda: store.list_for_user("alice", now=t0),
        lambda: store.delete_expired(now=t0 + 10 * TTL),
        lambda: store.stats(now=t0),
    ]

    for call in calls:
        with pytest.raises(RuntimeError, match="open it first"):
            await call()

    await store.open()
    assert_same_record(await store.get(record.token_digest, now=t0), record)


async def test_reopened_store_works_and_keeps_its_sessions(store: Store) -> None:
    t0 = start_time()
    record = make_record(now=t0, data={"a": [1.0]})
    await store.create(record, max_sessions=10, now=t0)

    await store.close()
    await store.open()

    assert store.is_open
    assert_same_record(await store.get(record.token_digest, now=t0), record)
    assert await store.update(record.id, make_update(now=t0 + 1, set_keys={"b": 2}), now=t0 + 1)
    second = make_record(now=t0 + 2)
    await store.create(second, max_sessions=10, now=t0 + 2)
    assert await listed_ids(store, "alice", now=t0 + 2) == [second.id, record.id]


async def test_opening_twice_is_harmless(store: Store) -> None:
    t0 = start_time()
    record = make_record(now=t0)
    await store.create(record, max_sessions=10, now=t0)

    await store.open()
    await asyncio.gather(store.open(), store.open())

    assert store.is_open
    assert_same_record(await store.get(record.token_digest, now=t0), record)


async def test_concurrent_first_opens_open_once(store: Store) -> None:
    await store.close()

    await asyncio.gather(*(store.open() for _ in range(5)))

    assert store.is_open
    t0 = start_time()
    record = make_record(now=t0)
    await store.create(record, max_sessions=10, now=t0)
    assert await store.get(record.token_digest, now=t0) is not None


async def test_closing_twice_is_harmless(store: Store) -> None:
    await store.close()
    await store.close()

    assert not store.is_open
    await store.open()
    assert store.is_open
