"""SessionManager over every store: listing, revoking, and sweeping expired sessions.

Sessions are planted directly in the store with times the test chooses, so
expiry needs no sleeping.
"""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path

import pytest

from authsessions import SessionConfig, SessionManager, SessionNotFound
from authsessions._tokens import new_session_id
from authsessions.stores import MemoryStore, SQLiteStore, Store
from tests.apps.session_app import FIREFOX_WINDOWS, plant_session


async def test_list_for_user_is_most_recent_first_and_only_live_sessions(store: Store) -> None:
    _, old = await plant_session(store, "alice", created_ago=900, idle_for=600)
    _, new = await plant_session(
        store, "alice", created_ago=900, idle_for=5, user_agent=FIREFOX_WINDOWS
    )
    await plant_session(store, "alice", created_ago=900, idle_for=1, expires_in=-1)
    await plant_session(store, "bob")

    listed = await SessionManager(store).list_for_user("alice")

    assert [s.id for s in listed] == [new.id, old.id]
    assert [s.is_current for s in listed] == [False, False]
    assert listed[0].device_name == "Firefox on Windows"
    assert listed[0].user_agent == FIREFOX_WINDOWS
    for data, record in zip(listed, (new, old), strict=True):
        assert data.user_id == "alice"
        for moment, expected in (
            (data.created_at, record.created_at),
            (data.last_active_at, record.last_active_at),
            (data.expires_at, record.expires_at),
        ):
            assert moment.utcoffset() == timedelta(0)
            assert moment.timestamp() == pytest.approx(expected, abs=1)


async def test_list_for_user_leaves_out_sessions_past_the_configs_absolute_ttl(
    store: Store,
) -> None:
    """As the middleware refuses their cookies, and list_my_sessions leaves them out."""
    _, young = await plant_session(store, "alice", created_ago=1800, idle_for=30)
    await plant_session(store, "alice", created_ago=7200, idle_for=10)

    hour = SessionConfig(absolute_ttl=timedelta(hours=1))
    listed = await SessionManager(store, hour).list_for_user("alice")
    without_cap = await SessionManager(store).list_for_user("alice")

    assert [s.id for s in listed] == [young.id]
    assert len(without_cap) == 2


async def test_list_for_user_leaves_out_sessions_idle_past_a_given_configs_ttl_only(
    store: Store,
) -> None:
    """A config given is the app's: its ttl says which sessions the middleware still takes.
    Without one, the default's 30 days may not be the app's (the command line builds its
    manager so), and a session the app still serves must be listed."""
    day = 86400
    _, recent = await plant_session(store, "alice", idle_for=60, expires_in=89 * day)
    _, idle = await plant_session(store, "alice", idle_for=40 * day, expires_in=50 * day)

    ninety_days = SessionConfig(ttl=timedelta(days=90))
    thirty_days = SessionConfig(ttl=timedelta(days=30))

    assert [s.id for s in await SessionManager(store).list_for_user("alice")] == [
        recent.id,
        idle.id,
    ]
    assert len(await SessionManager(store, ninety_days).list_for_user("alice")) == 2
    assert [s.id for s in await SessionManager(store, thirty_days).list_for_user("alice")] == [
        recent.id
    ]


async def test_list_for_user_leaves_out_a_session_whose_absolute_ttl_ends_now(
    store: Store, frozen_clock: float
) -> None:
    await plant_session(store, "alice", created_ago=3600, idle_for=10)

    hour = SessionConfig(absolute_ttl=timedelta(hours=1))

    assert await SessionManager(store, hour).list_for_user("alice") == []


async def test_list_for_unknown_user_is_empty(store: Store) -> None:
    assert await SessionManager(store).list_for_user("nobody") == []


async def test_revoke_ends_one_session_of_the_user(store: Store) -> None:
    _, doomed = await plant_session(store, "alice")
    _, kept = await plant_session(store, "alice")
    manager = SessionManager(store)

    await manager.revoke("alice", doomed.id)

    assert [s.id for s in await manager.list_for_user("alice")] == [kept.id]
    assert await store.get(doomed.token_digest, now=time.time()) is None


@pytest.mark.parametrize(
    "target",
    ["other-users", "unknown", "malformed", "empty", "token-digest"],
)
async def test_revoke_raises_session_not_found_and_changes_nothing(
    store: Store, target: str
) -> None:
    """Wrong user, unknown id and garbage must all look the same: no id probing."""
    _, alices = await plant_session(store, "alice")
    _, bobs = await plant_session(store, "bob")
    session_id = {
        "other-users": bobs.id,
        "unknown": new_session_id(),
        "malformed": "'; DROP TABLE x; --",
        "empty": "",
        "token-digest": bobs.token_digest,
    }[target]

    with pytest.raises(SessionNotFound) as raised:
        await SessionManager(store).revoke("alice", session_id)

    assert raised.value.message == SessionNotFound().message
    assert [s.id for s in await SessionManager(store).list_for_user("alice")] == [alices.id]
    assert [s.id for s in await SessionManager(store).list_for_user("bob")] == [bobs.id]


async def test_an_expired_session_cleanup_has_not_reached_is_neither_revoked_nor_counted(
    store: Store,
) -> None:
    """Every store answers alike, whether it keeps expired sessions until cleanup (SQL,
    memory) or drops them by itself (Redis): an app's "no such device" and "logged out
    of N devices" do not depend on the store.
    """
    # Live first: a store may sweep a user's expired sessions when it creates one.
    _, live = await plant_session(store, "alice", expires_in=60)
    _, expired = await plant_session(store, "alice", created_ago=7200, idle_for=60, expires_in=-1)
    _, also_expired = await plant_session(
        store, "alice", created_ago=7200, idle_for=60, expires_in=-1
    )
    manager = SessionManager(store)

    with pytest.raises(SessionNotFound):
        await manager.revoke("alice", expired.id)
    assert await manager.revoke_all("alice") == 1

    assert await manager.list_for_user("alice") == []
    for record in (live, expired, also_expired):  # gone, not merely hidden
        assert await store.get(record.token_digest, now=record.created_at) is None


async def test_a_session_past_a_given_configs_lifetimes_is_neither_revoked_nor_counted(
    store: Store,
) -> None:
    """The store keeps it (its expiry was set under a longer ttl, or before absolute_ttl
    was), but list_for_user leaves it out as the middleware refuses it: "no such device"
    and "logged out of N devices" must agree with that list."""
    _, live = await plant_session(store, "alice", created_ago=1800, idle_for=30)
    _, too_old = await plant_session(store, "alice", created_ago=7200, idle_for=10)
    _, other_too_old = await plant_session(store, "alice", created_ago=7300, idle_for=10)
    manager = SessionManager(store, SessionConfig(absolute_ttl=timedelta(hours=1)))

    with pytest.raises(SessionNotFound):
        await manager.revoke("alice", too_old.id)
    assert await manager.revoke_all("alice", except_id=other_too_old.id) == 1

    for record in (live, too_old):  # gone, not merely hidden
        assert await store.get(record.token_digest, now=record.created_at) is None
    assert await store.get(other_too_old.token_digest, now=time.time()) is not None


async def test_revoke_all_ends_every_session_of_the_user(store: Store) -> None:
    for _ in range(3):
        await plant_session(store, "alice")
    _, bobs = await plant_session(store, "bob")
    manager = SessionManager(store)

    assert await manager.revoke_all("alice") == 3

    assert await manager.list_for_user("alice") == []
    assert [s.id for s in await manager.list_for_user("bob")] == [bobs.id]
    assert await manager.revoke_all("alice") == 0


async def test_revoke_all_except_one(store: Store) -> None:
    _, keep = await plant_session(store, "alice")
    for _ in range(2):
        await plant_session(store, "alice")
    manager = SessionManager(store)

    assert await manager.revoke_all("alice", except_id=keep.id) == 2

    assert [s.id for s in await manager.list_for_user("alice")] == [keep.id]


@pytest.mark.parametrize("user_id", [42, "", "a\nb", None])
async def test_a_user_id_no_session_can_have_is_refused_and_nothing_changes(
    store: Store, user_id: object
) -> None:
    """An int above all: each store read it its own way (SQLite matched "42", the memory
    store nothing, PostgreSQL and Redis failed), and a revoke after a password reset that
    silently ends nothing is the worst of them.
    """
    _, session = await plant_session(store, "42")
    manager = SessionManager(store)

    with pytest.raises(ValueError, match=r"str\(user.id\)"):
        await manager.revoke_all(user_id)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"str\(user.id\)"):
        await manager.list_for_user(user_id)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"str\(user.id\)"):
        await manager.revoke(user_id, session.id)  # type: ignore[arg-type]

    assert [s.id for s in await manager.list_for_user("42")] == [session.id]


async def test_revoke_all_refuses_an_except_id_that_is_not_a_string(store: Store) -> None:
    """SQLite's ``id IS NOT 7`` excludes nothing: the session meant to stay would end too."""
    _, keep = await plant_session(store, "alice")
    manager = SessionManager(store)

    with pytest.raises(TypeError, match="except_id"):
        await manager.revoke_all("alice", except_id=7)  # type: ignore[arg-type]

    assert [s.id for s in await manager.list_for_user("alice")] == [keep.id]


async def test_cleanup_expired_deletes_only_expired_sessions(store: Store) -> None:
    # Live first: a store may sweep a user's expired sessions when it creates one.
    _, live = await plant_session(store, "alice", expires_in=60)
    expired = [
        (await plant_session(store, user, created_ago=7200, idle_for=3600, expires_in=-ago))[1]
        for user, ago in (("alice", 1), ("alice", 3600), ("bob", 60))
    ]

    removed = await SessionManager(store).cleanup_expired()

    assert removed == 3
    assert [s.id for s in await SessionManager(store).list_for_user("alice")] == [live.id]
    for record in expired:  # gone, not merely hidden: even "before expiry" finds nothing
        assert await store.get(record.token_digest, now=record.expires_at - 10) is None
    assert await store.delete_expired(now=time.time() + 10**10) == 1  # only `live` was left


async def test_cleanup_expired_refuses_an_on_batch_it_cannot_call_before_deleting(
    store: Store,
) -> None:
    _, expired = await plant_session(store, "alice", created_ago=7200, expires_in=-1)

    with pytest.raises(TypeError, match="on_batch must be callable"):
        await SessionManager(store).cleanup_expired(on_batch=5)  # type: ignore[arg-type]

    assert await store.get(expired.token_digest, now=expired.expires_at - 10) is not None


async def test_cleanup_expired_works_through_many_batches(store: Store) -> None:
    await plant_session(store, "alice")
    for i in range(7):  # each older than the last, so planting one never sweeps another
        await plant_session(store, "alice", created_ago=100, expires_in=-1 - i)

    assert await SessionManager(store).cleanup_expired(batch_size=2) == 7
    assert await SessionManager(store).cleanup_expired(batch_size=2) == 0
    assert len(await SessionManager(store).list_for_user("alice")) == 1


async def test_cleanup_expired_reports_each_batch(store: Store) -> None:
    await plant_session(store, "alice")
    for i in range(5):
        await plant_session(store, "alice", created_ago=100, expires_in=-1 - i)
    batches: list[int] = []
    total = [0]

    def progress(count: int) -> int:  # a progress bar's update returns something; ignored
        batches.append(count)
        total[0] += count
        return total[0]

    deleted = await SessionManager(store).cleanup_expired(batch_size=2, on_batch=progress)

    assert deleted == 5
    assert batches == [2, 2, 1]


class NowRecordingStore(MemoryStore):
    """A memory store that notes the ``now`` of each ``delete_expired`` call."""

    def __init__(self) -> None:
        super().__init__()
        self.nows: list[float] = []

    async def delete_expired(self, *, now: float, limit: int = 1000) -> int:
        self.nows.append(now)
        return await super().delete_expired(now=now, limit=limit)


async def test_cleanup_expired_uses_one_now_for_the_whole_run() -> None:
    """What expires during a run waits for the next one, and a store may go on with one
    pass over its sessions (RedisStore does) instead of starting over for every batch."""
    store = NowRecordingStore()
    for i in range(5):
        await plant_session(store, f"user{i}", created_ago=100, expires_in=-1)

    assert await SessionManager(store).cleanup_expired(batch_size=2) == 5

    assert len(store.nows) == 3
    assert len(set(store.nows)) == 1


@pytest.mark.parametrize(
    ("batch_size", "error"),
    [(0, ValueError), (-1, ValueError), ("10", TypeError), (1.5, TypeError), (True, TypeError),
     (None, TypeError)],
)  # fmt: skip
async def test_cleanup_expired_rejects_a_batch_size_that_is_no_count(
    batch_size: object, error: type[Exception]
) -> None:
    """Named as the caller named it: not the store's own "limit", nor a raw comparison."""
    store = MemoryStore()
    await plant_session(store, "alice", created_ago=100, expires_in=-1)

    with pytest.raises(error, match=r"^batch_size must be"):
        await SessionManager(store).cleanup_expired(batch_size=batch_size)  # type: ignore[arg-type]

    assert (await store.stats(now=time.time())).expired_sessions == 1


async def test_manager_opens_its_store_on_first_use(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "sessions.db")
    assert not store.is_open

    assert await SessionManager(store).list_for_user("alice") == []

    assert store.is_open
    await store.close()


def test_manager_needs_a_store_object() -> None:
    with pytest.raises(TypeError, match="Store"):
        SessionManager("sqlite:///sessions.db")  # type: ignore[arg-type]


@pytest.mark.parametrize("config", [{"ttl": 1}, "ttl=1", SessionConfig])
def test_manager_needs_a_session_config_object(config: object) -> None:
    """As the middleware does: a dict would be kept unchecked, to fail wherever it is read."""
    with pytest.raises(TypeError, match=r"^config must be a SessionConfig, got "):
        SessionManager(MemoryStore(), config=config)  # type: ignore[arg-type]


@pytest.mark.parametrize("session_id", [None, 5, b"AAAAAAAAAAAAAAAAAAAAAA"])
async def test_revoke_refuses_a_session_id_that_is_not_a_string(
    store: Store, session_id: object
) -> None:
    """A TypeError, as revoke_all's except_id gives: not a SessionNotFound for a caller's bug."""
    _, kept = await plant_session(store, "alice")
    manager = SessionManager(store)

    with pytest.raises(TypeError, match=r"^session_id must be a str"):
        await manager.revoke("alice", session_id)  # type: ignore[arg-type]

    assert [s.id for s in await manager.list_for_user("alice")] == [kept.id]
