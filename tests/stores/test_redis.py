"""What only RedisStore promises: key layout and TTLs, tidy indexes, clusters, failing fast.

The store contract itself is proven in test_conformance.py, on a single
server and on a three-node cluster. Key names below follow the layout the
module's docstring documents.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import secrets
import subprocess
import sys
import time
import traceback
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster

import authsessions.stores.redis
from authsessions import SessionManager, StoreUnavailable
from authsessions._records import SessionRecord, SessionUpdate, StoreStats
from authsessions.stores import CreateError, DataTooLarge, RedisStore, open_store
from authsessions.stores._redis_scripts import DELETE_EXPIRED, LUA_HELPERS
from tests.store_fixtures import delete_prefixed
from tests.stores.records import (
    TTL,
    check_kept_after_racing_creates,
    make_record,
    make_update,
    new_digest,
    rotate_away,
    start_time,
)
from tests.tcp_proxy import TcpProxy, refusing_port


@dataclass
class Setup:
    """A store, a second store on the same keys (another process), and a raw client."""

    store: RedisStore
    other: RedisStore
    raw: Redis | RedisCluster
    prefix: str

    def keys(self, record: SessionRecord) -> dict[str, str]:
        tag = hashlib.sha256(record.user_id.encode()).hexdigest()[:32]
        return {
            "session": f"{self.prefix}{{{tag}}}:s:{record.id}",
            "index": f"{self.prefix}{{{tag}}}:u",
            "digest": f"{self.prefix}d:{record.token_digest}",
            "id": f"{self.prefix}i:{record.id}",
        }

    def rotated_away_key(self, digest: str) -> str:
        return f"{self.prefix}r:{digest}"

    @staticmethod
    def location(record: SessionRecord) -> str:
        """What a pointer to ``record``'s session holds."""
        return f"{hashlib.sha256(record.user_id.encode()).hexdigest()[:32]}:{record.id}"

    async def all_keys(self) -> list[str]:
        """The store's keys, but the answers deletes keep for a client's retry, which hold
        no session and expire in a minute (see ``RETRY_ANSWER_MS``)."""
        keys = self.raw.scan_iter(match=self.prefix + "*", count=1000)
        return [key async for key in keys if ":a:" not in key]

    async def rotate_away(self, record: SessionRecord, *, now: float, until: float) -> str:
        """Rotate ``record``'s session to a new digest (which ``record`` takes), keeping
        the one it held as rotated away from until ``until``; returns that one."""
        left, record.token_digest = record.token_digest, new_digest()
        update = make_update(
            now=now,
            ttl=30,
            token_digest=record.token_digest,
            expected_token_digest=left,
            rotated_away_until=until,
        )
        assert await self.store.update(record.id, update, now=now)
        return left


@pytest.fixture(params=["single", "cluster"])
def redis_target(request: pytest.FixtureRequest) -> str:
    """A single server's URL, then the cluster's: the same checks run on both."""
    fixture = "redis_url" if request.param == "single" else "redis_cluster_url"
    url: str = request.getfixturevalue(fixture)
    return url


@pytest.fixture
async def setup(redis_target: str) -> AsyncIterator[Setup]:
    prefix = f"authsessions-test-{secrets.token_hex(6)}:"
    raw: Redis | RedisCluster
    if "+cluster" in redis_target:
        raw = RedisCluster.from_url(redis_target.replace("+cluster", ""), decode_responses=True)
    else:
        raw = Redis.from_url(redis_target, decode_responses=True)
    try:
        async with (
            RedisStore(redis_target, prefix=prefix) as store,
            RedisStore(redis_target, prefix=prefix) as other,
        ):
            setup = Setup(store, other, raw, prefix)
            yield setup
        if keys := await setup.all_keys():
            await raw.delete(*keys)
    finally:
        await raw.aclose()


# -- keys and their TTLs ----------------------------------------------------------------------


async def test_every_key_expires_with_its_session(setup: Setup) -> None:
    """Redis must forget a session by itself when it expires: no key outlives it."""
    t0 = start_time()
    record = make_record(now=t0, ttl=60)
    await setup.store.create(record, max_sessions=10, now=t0)
    keys = setup.keys(record)

    for key in keys.values():
        assert 50_000 < await setup.raw.pttl(key) <= 60_000, key

    assert await setup.store.update(record.id, make_update(now=t0, ttl=9), now=t0)
    for name in ("session", "digest", "id"):
        assert 0 < await setup.raw.pttl(keys[name]) <= 9_000, name
    assert sorted(await setup.all_keys()) == sorted(keys.values())


def test_a_keys_ttl_never_ends_before_its_session() -> None:
    """Key TTLs are whole milliseconds, rounded up: a key rounded down would vanish (and
    its session with it) up to a millisecond before the session's expiry."""
    now = 1_700_000_000.0
    assert authsessions.stores.redis._ttl_ms(now + 1.5015, now) == 1502
    assert authsessions.stores.redis._ttl_ms(now + 0.0015, now) == 2


async def test_a_now_far_before_the_sessions_times_is_applied_whole(
    setup: Setup,
) -> None:
    """A finite ``now`` far enough back made a TTL longer than Redis takes: the update
    script's PEXPIRE failed after its writes, so the caller saw StoreUnavailable while the
    data and times had changed (and the TTL and index had not); a create failed too."""
    t0 = start_time()
    record = make_record(now=t0, data={"a": 1})
    await setup.store.create(make_record(now=t0), max_sessions=10, now=-1e16)
    await setup.store.create(record, max_sessions=10, now=t0)
    update = make_update(now=t0 + 5, ttl=95, set_keys={"a": 2})

    assert await setup.store.update(record.id, update, now=-1e16) is True

    found = await setup.store.get(record.token_digest, now=t0)
    assert found is not None
    assert (found.data, found.last_active_at, found.expires_at) == ({"a": 2}, t0 + 5, t0 + 100)


async def test_the_users_index_lives_as_long_as_the_longest_session(setup: Setup) -> None:
    """A shorter session must not shorten the index: once it expired, the longer sessions
    would drop out of listings, "log out everywhere" and the per-user limit.
    """
    t0 = start_time()
    lasting = make_record(now=t0, ttl=3600)
    short = make_record(now=t0 + 1, ttl=9)
    for record in (lasting, short):
        await setup.store.create(record, max_sessions=10, now=record.created_at)
    index = setup.keys(lasting)["index"]
    assert await setup.raw.pttl(index) > 3_000_000

    assert await setup.store.update(short.id, make_update(now=t0 + 2, ttl=5), now=t0 + 2)

    assert await setup.raw.pttl(index) > 3_000_000


async def test_a_write_without_times_leaves_every_keys_ttl_alone(setup: Setup) -> None:
    t0 = start_time()
    record = make_record(now=t0, ttl=60)
    await setup.store.create(record, max_sessions=10, now=t0)
    keys = setup.keys(record)
    assert await setup.store.update(record.id, make_update(now=t0, ttl=9), now=t0)

    write = make_update(now=t0 + 1, set_keys={"k": "v"}, moves_expiry=False)
    assert await setup.store.update(record.id, write, now=t0 + 1)

    # Not slid back to a minute, as an update with times would have.
    for name in ("session", "digest", "id"):
        assert 0 < await setup.raw.pttl(keys[name]) <= 9_000, name
    got = await setup.store.get(record.token_digest, now=t0 + 1)
    assert got is not None
    assert got.data == {"k": "v"}
    assert got.expires_at == t0 + 9


async def test_rotation_moves_the_digest_pointer(setup: Setup) -> None:
    t0 = start_time()
    record = make_record(now=t0, ttl=60)
    await setup.store.create(record, max_sessions=10, now=t0)
    old = setup.keys(record)
    rotated = new_digest()

    update = make_update(now=t0, ttl=30, token_digest=rotated)
    assert await setup.store.update(record.id, update, now=t0)

    record.token_digest = rotated
    new = setup.keys(record)
    assert await setup.raw.exists(old["digest"]) == 0
    assert 20_000 < await setup.raw.pttl(new["digest"]) <= 30_000
    assert sorted(await setup.all_keys()) == sorted(new.values())


async def test_a_digest_rotated_away_from_points_to_its_session_for_as_long_as_kept(
    setup: Setup,
) -> None:
    """Its pointer expires when the time it is kept for ends, or the session does if
    sooner; the next rotation's kept digest replaces it, and one kept for no time at all
    gets none."""
    t0 = start_time()
    record = make_record(now=t0, ttl=60)
    await setup.store.create(record, max_sessions=10, now=t0)

    first = await setup.rotate_away(record, now=t0, until=t0 + 20)
    pointer = setup.rotated_away_key(first)
    assert await setup.raw.get(pointer) == setup.location(record)
    assert 10_000 < await setup.raw.pttl(pointer) <= 20_000
    assert sorted(await setup.all_keys()) == sorted([*setup.keys(record).values(), pointer])

    second = await setup.rotate_away(record, now=t0, until=t0 + 100)
    pointer = setup.rotated_away_key(second)
    assert 20_000 < await setup.raw.pttl(pointer) <= 30_000  # the session's 30 s
    assert sorted(await setup.all_keys()) == sorted([*setup.keys(record).values(), pointer])
    assert not await setup.other.rotated_away_to(first, now=t0)
    assert await setup.other.rotated_away_to(second, now=t0)

    third = await setup.rotate_away(record, now=t0, until=t0)
    assert sorted(await setup.all_keys()) == sorted(setup.keys(record).values())
    assert not await setup.other.rotated_away_to(second, now=t0)
    assert not await setup.other.rotated_away_to(third, now=t0)


async def test_a_pointer_naming_a_session_that_does_not_keep_the_digest_says_nothing(
    setup: Setup,
) -> None:
    """In a cluster a pointer may outlive what made it true (its node did not answer as
    the session moved on): the session's own fields decide."""
    t0 = start_time()
    record = make_record(now=t0)
    await setup.store.create(record, max_sessions=10, now=t0)
    stray = new_digest()
    await setup.raw.set(setup.rotated_away_key(stray), setup.location(record), px=60_000)

    assert not await setup.store.rotated_away_to(stray, now=t0)  # it keeps none
    kept = await setup.rotate_away(record, now=t0, until=t0 + 60)
    assert not await setup.store.rotated_away_to(stray, now=t0)  # it keeps another
    assert await setup.store.rotated_away_to(kept, now=t0)


async def test_a_login_over_a_session_points_from_its_digest_for_as_long_as_kept(
    setup: Setup,
) -> None:
    """A login over a live session keeps that session's digest as a rotation would: its
    pointer lasts the time asked, or the new session's life if shorter, and goes with
    the new session; one kept for no time at all gets none."""
    t0 = start_time()
    replaced, login = new_digest(), make_record(now=t0, ttl=60)

    await setup.store.create(login, max_sessions=10, now=t0, replaced=(replaced, t0 + 20))

    pointer = setup.rotated_away_key(replaced)
    assert await setup.raw.get(pointer) == setup.location(login)
    assert 10_000 < await setup.raw.pttl(pointer) <= 20_000
    assert sorted(await setup.all_keys()) == sorted([*setup.keys(login).values(), pointer])
    assert await setup.other.rotated_away_to(replaced, now=t0)

    longer, outliving = new_digest(), make_record(now=t0, ttl=30)
    await setup.store.create(outliving, max_sessions=10, now=t0, replaced=(longer, t0 + 100))
    assert 20_000 < await setup.raw.pttl(setup.rotated_away_key(longer)) <= 30_000

    assert await setup.store.delete(login.id, now=t0)
    assert await setup.store.delete(outliving.id, now=t0)
    assert await setup.all_keys() == []
    assert not await setup.other.rotated_away_to(replaced, now=t0)

    past, late = new_digest(), make_record(now=t0)
    await setup.store.create(late, max_sessions=10, now=t0, replaced=(past, t0))
    assert sorted(await setup.all_keys()) == sorted(setup.keys(late).values())
    assert not await setup.other.rotated_away_to(past, now=t0)


async def test_a_refused_login_over_a_session_leaves_no_pointer_of_its_digest(
    setup: Setup,
) -> None:
    """In a cluster the kept digest's pointer is written with the claimed ones, before the
    script: a refused create removes it too."""
    t0 = start_time()
    record = make_record(now=t0)
    await setup.store.create(record, max_sessions=10, now=t0)
    keys_before = sorted(await setup.all_keys())
    clash, replaced = make_record(now=t0), new_digest()
    clash.id = record.id

    with pytest.raises(CreateError):
        await setup.store.create(clash, max_sessions=10, now=t0, replaced=(replaced, t0 + 60))

    assert sorted(await setup.all_keys()) == keys_before
    assert not await setup.other.rotated_away_to(replaced, now=t0)


@pytest.mark.parametrize("ending", ["delete", "delete_for_user", "eviction", "delete_expired"])
async def test_the_pointer_of_a_digest_rotated_away_goes_with_its_session(
    setup: Setup, ending: str
) -> None:
    t0 = start_time()
    record = make_record(now=t0, ttl=60)
    await setup.store.create(record, max_sessions=10, now=t0)
    left = await setup.rotate_away(record, now=t0, until=t0 + 20)
    assert await setup.raw.exists(setup.rotated_away_key(left)) == 1

    if ending == "delete":
        assert await setup.store.delete(record.id, now=t0)
    elif ending == "delete_for_user":
        assert await setup.store.delete_for_user(record.user_id, now=t0) == 1
    elif ending == "eviction":
        newer = make_record(now=t0 + 1)
        await setup.store.create(newer, max_sessions=1, now=t0 + 1)
        await setup.store.delete(newer.id, now=t0 + 1)
    else:
        assert await setup.store.delete_expired(now=t0 + 30) == 1

    assert await setup.all_keys() == []
    assert not await setup.other.rotated_away_to(left, now=t0 + 1)


async def test_rotated_away_to_on_a_single_server_is_one_command(
    redis_url: str, redis_prefix: str
) -> None:
    t0 = start_time()
    raw = Redis.from_url(redis_url, decode_responses=True)
    record = make_record(now=t0)
    async with RedisStore(redis_url, prefix=redis_prefix) as store:
        await store.create(record, max_sessions=10, now=t0)
        rotation = make_update(
            now=t0,
            token_digest=new_digest(),
            expected_token_digest=record.token_digest,
            rotated_away_until=t0 + 60,
        )
        assert await store.update(record.id, rotation, now=t0)
        await store.rotated_away_to(new_digest(), now=t0)  # loads the script

        asked = store.rotated_away_to(record.token_digest, now=t0)
        assert await commands_sent(raw, redis_prefix, asked) == ["EVALSHA"]
        assert await store.rotated_away_to(record.token_digest, now=t0)
    await raw.aclose()


async def test_keys_of_evicted_and_deleted_sessions_are_removed(setup: Setup) -> None:
    """Logins beyond the limit must not leave pointers or index entries behind."""
    t0 = start_time()
    records = [make_record(now=t0 + i) for i in range(12)]
    for record in records:
        await setup.store.create(record, max_sessions=3, now=record.created_at)

    kept = records[-3:]
    assert sorted(await setup.all_keys()) == sorted(
        {key for record in kept for key in setup.keys(record).values()}
    )
    assert await setup.raw.zcard(setup.keys(kept[0])["index"]) == 3

    assert await setup.store.delete(kept[0].id, now=record.created_at)
    assert await setup.store.delete_for_user("alice", now=record.created_at) == 2
    assert await setup.all_keys() == []


async def test_the_index_never_lists_a_session_redis_dropped(setup: Setup) -> None:
    """Redis expires hashes on its own; the index must not keep or show their ids."""
    t0 = start_time()
    records = [make_record(now=t0 + i) for i in range(3)]
    for record in records:
        await setup.store.create(record, max_sessions=10, now=record.created_at)
    dropped = setup.keys(records[0])
    await setup.raw.delete(dropped["session"])  # as if its TTL had run out

    listed = await setup.store.list_for_user("alice", now=t0 + 3)

    assert [record.id for record in listed] == [records[2].id, records[1].id]
    assert await setup.raw.zrange(dropped["index"], 0, -1) == [records[1].id, records[2].id]
    assert await setup.store.get(records[0].token_digest, now=t0) is None
    assert await setup.store.update(records[0].id, make_update(now=t0 + 3), now=t0 + 3) is False


@pytest.mark.parametrize("operation", ["delete", "delete_for_user", "create"])
async def test_scripts_that_meet_a_session_redis_dropped_drop_its_index_entry(
    setup: Setup, operation: str
) -> None:
    """Each script that reads a user's sessions tidies the index of those already gone,
    instead of leaving the entry for a cleanup that may not run for a long time."""
    t0 = start_time()
    gone, kept = make_record(now=t0), make_record(now=t0)
    for record in (gone, kept):
        await setup.store.create(record, max_sessions=10, now=t0)
    index = setup.keys(kept)["index"]
    # As if Redis had expired it: the hash and its pointers share one TTL.
    for name in ("session", "digest", "id"):
        await setup.raw.delete(setup.keys(gone)[name])

    left = [kept.id]
    if operation == "delete":
        assert await setup.store.delete(gone.id, now=t0, user_id="alice") is False
    elif operation == "delete_for_user":
        assert await setup.store.delete_for_user("alice", now=t0, except_id=kept.id) == 0
    else:
        new = make_record(now=t0)
        await setup.store.create(new, max_sessions=10, now=t0)
        left.append(new.id)

    assert sorted(await setup.raw.zrange(index, 0, -1)) == sorted(left)


async def test_delete_expired_sweeps_indexes_of_sessions_redis_dropped(setup: Setup) -> None:
    t0 = start_time()
    gone, expired, live = (make_record(now=t0, user_id=user, ttl=10) for user in "abc")
    live.expires_at = t0 + 3600
    for record in (gone, expired, live):
        await setup.store.create(record, max_sessions=10, now=t0)
    # As if Redis had expired them: the hash and its pointers share one TTL.
    for name in ("session", "digest", "id"):
        await setup.raw.delete(setup.keys(gone)[name])

    assert await setup.store.delete_expired(now=t0 + 10) == 2

    assert await setup.raw.exists(setup.keys(gone)["index"], setup.keys(expired)["index"]) == 0
    assert sorted(await setup.all_keys()) == sorted(setup.keys(live).values())


async def test_delete_expired_sweeps_many_indexes_per_script_and_goes_on_between_calls(
    setup: Setup,
) -> None:
    """A backlog of one session per user costs a script call per batch of users, not per
    user (in a cluster, per user: each index has its own slot), and calls cut short by the
    limit go on with the same SCAN instead of starting over. (Counted by the servers:
    other clients running scripts meanwhile would blur it.)
    """
    t0 = start_time()
    for i in range(30):
        record = make_record(now=t0, user_id=f"u{i}", ttl=10)
        await setup.store.create(record, max_sessions=10, now=t0)
    await setup.raw.script_load(LUA_HELPERS + DELETE_EXPIRED)  # else a first EVALSHA fails
    one_pass, cursor = 0, None  # SCAN calls of one pass over the indexes
    if not setup.store.is_cluster:
        pattern = f"{setup.prefix}{{{'?' * 32}}}:u"
        while cursor != 0:
            cursor, _ = await setup.raw.scan(cursor or 0, match=pattern, count=1000)
            one_pass += 1
    before = await command_calls(setup.raw, "evalsha", "scan")

    counts = [await setup.store.delete_expired(now=t0 + 10, limit=7) for _ in range(6)]

    after = await command_calls(setup.raw, "evalsha", "scan")
    assert counts == [7, 7, 7, 7, 2, 0]
    assert await setup.all_keys() == []
    if setup.store.is_cluster:
        assert after["evalsha"] - before["evalsha"] == 30
    else:
        # One script per call that found something; the sixth call's new pass finds nothing.
        assert after["evalsha"] - before["evalsha"] == 5
        assert after["scan"] - before["scan"] <= 2 * one_pass


async def test_an_index_named_twice_in_a_sweep_counts_its_sessions_once(
    redis_url: str, redis_prefix: str
) -> None:
    """SCAN may return a key twice, so one script's batch can name an index twice."""
    t0 = start_time()
    raw = Redis.from_url(redis_url, decode_responses=True)
    records = [make_record(now=t0 + i, ttl=10) for i in range(3)]
    async with RedisStore(redis_url, prefix=redis_prefix) as store:
        for record in records:
            await store.create(record, max_sessions=10, now=record.created_at)
        index = f"{redis_prefix}{{{hashlib.sha256(b'alice').hexdigest()[:32]}}}:u"
        assert await raw.zcard(index) == 3

        found, swept, *ended = await raw.eval(
            LUA_HELPERS + DELETE_EXPIRED, 2, index, index, t0 + 20, 100, redis_prefix
        )

        assert (found, swept) == (3, 2)
        assert sorted(ended[::3]) == sorted(record.id for record in records)
        assert [key async for key in raw.scan_iter(match=redis_prefix + "*")] == []
    await raw.aclose()


async def test_a_damaged_session_in_a_sweep_deletes_nothing_of_its_batch(setup: Setup) -> None:
    """The script reads before it deletes: an error part-way (a hash whose expiry is not a
    number) must not leave the pointers of sessions it deleted without telling the store."""
    t0 = start_time()
    records = [make_record(now=t0, user_id=f"u{i}", ttl=10) for i in range(5)]
    for record in records:
        await setup.store.create(record, max_sessions=10, now=t0)
    await setup.raw.hset(setup.keys(records[2])["session"], "ea", "soon")
    keys_before = sorted(await setup.all_keys())

    with pytest.raises(StoreUnavailable):
        await setup.store.delete_expired(now=t0 + 10)

    if not setup.store.is_cluster:  # all five users in one script
        assert sorted(await setup.all_keys()) == keys_before
    for record in records:  # a session and its pointers go together or not at all
        keys = setup.keys(record)
        present = [await setup.raw.exists(keys[name]) for name in ("session", "digest", "id")]
        assert present in ([0, 0, 0], [1, 1, 1])
    assert await setup.raw.exists(setup.keys(records[2])["session"])


async def test_closing_the_store_during_a_cleanup_ends_it_and_a_reopened_store_finishes(
    setup: Setup,
) -> None:
    # Expired by the clock cleanup_expired reads, still kept by Redis for another 10 s.
    then = start_time() - 100
    for i in range(60):
        record = make_record(now=then, user_id=f"u{i}", ttl=10)
        await setup.store.create(record, max_sessions=10, now=then)
    manager = SessionManager(setup.store)
    cleanup = asyncio.create_task(manager.cleanup_expired(batch_size=5))
    while setup.store._sweep is None:  # noqa: ASYNC110 - no event to wait for: the pass began
        await asyncio.sleep(0)

    await setup.store.close()

    with pytest.raises((RuntimeError, StoreUnavailable)):
        await cleanup
    assert setup.store._client is None
    async with setup.store:
        left = await manager.cleanup_expired()
    assert 0 < left <= 60  # cut short: what it had not reached is still there
    assert await setup.all_keys() == []


async def test_a_delete_for_an_owner_refuses_a_session_whose_hash_names_another(
    setup: Setup,
) -> None:
    """Keys are filed under a hash of the user id, so another user's id looks elsewhere;
    the script's own check of the owner is what stands when the tags meet."""
    record = make_record(now=start_time(), user_id="bob")
    await setup.store.create(record, max_sessions=5, now=record.created_at)
    session_key = setup.keys(record)["session"]
    await setup.raw.hset(session_key, "uid", "mallory")

    assert not await setup.store.delete(record.id, now=record.created_at, user_id="bob")
    assert await setup.raw.exists(session_key) == 1


async def test_a_refused_rotation_leaves_no_pointer_behind(setup: Setup) -> None:
    """In a cluster the new digest's pointer is written before the script; a refusal removes it."""
    t0 = start_time()
    record = make_record(now=t0, data={"a": 1})
    await setup.store.create(record, max_sessions=10, now=t0)
    keys_before = sorted(await setup.all_keys())
    rotated = new_digest()

    update = make_update(
        now=t0 + 1, token_digest=rotated, set_keys={"b": "x" * 100}, max_data_bytes=50
    )
    with pytest.raises(DataTooLarge):
        await setup.store.update(record.id, update, now=t0 + 1)

    assert sorted(await setup.all_keys()) == keys_before
    assert await setup.other.get(record.token_digest, now=t0 + 1) == record


@pytest.mark.parametrize("id_pointer_lost", [False, True], ids=["id-taken", "id-pointer-lost"])
async def test_a_refused_create_leaves_no_pointer_behind(
    setup: Setup, id_pointer_lost: bool
) -> None:
    """In a cluster a new session's pointers are claimed before its script; a create refused
    for a taken id removes those it claimed, whether the claim itself failed or (the id's
    pointer gone before its session) the script refused."""
    t0 = start_time()
    record = make_record(now=t0)
    await setup.store.create(record, max_sessions=10, now=t0)
    keys = setup.keys(record)
    if id_pointer_lost:
        await setup.raw.delete(keys["id"])
    clash = make_record(now=t0)
    clash.id = record.id

    with pytest.raises(CreateError):
        await setup.store.create(clash, max_sessions=10, now=t0)

    left = {name: key for name, key in keys.items() if not (id_pointer_lost and name == "id")}
    assert sorted(await setup.all_keys()) == sorted(left.values())
    assert await setup.other.get(clash.token_digest, now=t0) is None
    assert await setup.other.get(record.token_digest, now=t0) == record


# -- stats ----------------------------------------------------------------------------------------


async def test_stats_scan_only_this_prefix_in_batches(
    setup: Setup, redis_target: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(authsessions.stores.redis, "_SCAN_BATCH", 3)
    t0 = start_time()
    records = [
        make_record(now=t0, user_id=f"user{i}", device_type="mobile" if i % 3 else "desktop")
        for i in range(10)
    ]
    records.append(make_record(now=t0, user_id="user0"))
    for record in records:
        await setup.store.create(record, max_sessions=10, now=t0)
    # Keys under a longer prefix belong to another store, as does a stray key.
    async with RedisStore(redis_target, prefix=f"{setup.prefix}other:") as neighbour:
        await neighbour.create(make_record(now=t0, user_id="user1"), max_sessions=10, now=t0)
    await setup.raw.set(f"{setup.prefix}s:not-a-session", "1")

    stats = await setup.other.stats(now=t0)

    assert stats == StoreStats(11, 10, {"desktop": 5, "mobile": 6}, None)


async def test_stats_count_a_key_scan_returns_twice_once(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SCAN may return a key twice (the keyspace rehashed meanwhile). A real rehash cannot be
    brought about on cue, so the client's scan_iter is made to repeat every key."""
    t0 = start_time()
    for record in (make_record(now=t0), make_record(now=t0, user_id="bob")):
        await setup.store.create(record, max_sessions=10, now=t0)
    client = setup.store._client
    assert client is not None
    scan_iter = client.scan_iter

    def every_key_twice(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        async def keys() -> AsyncIterator[Any]:
            async for key in scan_iter(*args, **kwargs):
                yield key
                yield key

        return keys()

    monkeypatch.setattr(client, "scan_iter", every_key_twice)

    assert await setup.store.stats(now=t0) == StoreStats(2, 2, {"desktop": 2}, None)


# -- several processes --------------------------------------------------------------------------


async def test_a_remembered_location_never_serves_a_rotated_out_token(setup: Setup) -> None:
    """A process caches where a digest's session lives; another process may rotate it."""
    t0 = start_time()
    record = make_record(now=t0, data={"a": 1})
    await setup.store.create(record, max_sessions=10, now=t0)
    assert await setup.other.get(record.token_digest, now=t0) == record
    rotated = new_digest()

    assert await setup.store.update(record.id, make_update(now=t0, token_digest=rotated), now=t0)

    assert await setup.other.get(record.token_digest, now=t0) is None
    found = await setup.other.get(rotated, now=t0)
    assert found is not None
    assert found.id == record.id
    assert await setup.store.delete(record.id, now=t0)
    assert await setup.other.get(rotated, now=t0) is None
    assert await setup.other.update(record.id, make_update(now=t0), now=t0) is False


async def test_creates_from_two_processes_respect_the_limit(setup: Setup) -> None:
    t0 = start_time()
    records = [make_record(now=t0 + i) for i in range(20)]

    await asyncio.gather(
        *(
            (setup.store, setup.other)[i % 2].create(record, max_sessions=5, now=record.created_at)
            for i, record in enumerate(records)
        )
    )

    listed = await setup.other.list_for_user("alice", now=t0 + 20)
    check_kept_after_racing_creates([record.id for record in listed], records, 5)
    assert len(await setup.all_keys()) == 5 * 3 + 1


async def test_updates_from_two_processes_keep_every_key(setup: Setup) -> None:
    t0 = start_time()
    record = make_record(now=t0)
    await setup.store.create(record, max_sessions=10, now=t0)

    await asyncio.gather(
        *(
            (setup.store, setup.other)[i % 2].update(
                record.id, make_update(now=t0 + 1, set_keys={f"k{i}": i}), now=t0 + 1
            )
            for i in range(50)
        )
    )

    found = await setup.store.get(record.token_digest, now=t0 + 1)
    assert found is not None
    assert found.data == {f"k{i}": i for i in range(50)}


# -- the cluster ----------------------------------------------------------------------------------


@pytest.fixture
async def raw_cluster(redis_cluster_url: str) -> AsyncIterator[RedisCluster]:
    """A plain redis-py cluster client on the test cluster, for looking behind the store."""
    raw = RedisCluster.from_url(redis_cluster_url.replace("+cluster", ""), decode_responses=True)
    yield raw
    await raw.aclose()


async def test_a_cluster_timing_out_a_login_logs_no_token_digest(
    redis_cluster_url: str, raw_cluster: RedisCluster, caplog: pytest.LogCaptureFixture
) -> None:
    """redis-py writes a failed pipelined command, keys and values included, into its
    error's message; the store logged that message (a TimeoutError's, deemed safe) and
    chained the error, so the new token's digest reached the log and any traceback."""
    # As short as the default "authsessions:": redis-py cuts the command it quotes at 100
    # characters, and a longer prefix cut the digest off.
    prefix = f"as-{secrets.token_hex(5)}:"
    t0 = start_time()
    record = make_record(now=t0)
    try:
        async with RedisStore(redis_cluster_url, prefix=prefix, socket_timeout=0.3) as store:
            # Nodes that stop answering writes for a moment: the pointer claim times out.
            await raw_cluster.execute_command(
                "CLIENT PAUSE", "1500", "WRITE", target_nodes=RedisCluster.ALL_NODES
            )
            with (
                caplog.at_level("WARNING", logger="authsessions"),
                pytest.raises(StoreUnavailable) as failed,
            ):
                await store.create(record, max_sessions=10, now=t0)
    finally:
        await raw_cluster.execute_command("CLIENT UNPAUSE", target_nodes=RedisCluster.ALL_NODES)
        if keys := [key async for key in raw_cluster.scan_iter(match=prefix + "*")]:
            await raw_cluster.delete(*keys)

    assert "TimeoutError" in caplog.text
    assert record.token_digest not in caplog.text
    assert record.token_digest not in "".join(traceback.format_exception(failed.value))


@dataclass
class PointersApart:
    """A cluster session whose node holds neither of its pointers, so that the nodes of
    the pointers alone can stop answering writes."""

    store: RedisStore
    raw: RedisCluster
    record: SessionRecord
    keys: dict[str, str]
    pointer_nodes: list[ClusterNode]

    async def pause_pointer_nodes(self) -> None:
        await self.raw.execute_command(
            "CLIENT PAUSE", "2000", "WRITE", target_nodes=self.pointer_nodes
        )

    async def unpause(self) -> None:
        await self.raw.execute_command("CLIENT UNPAUSE", target_nodes=RedisCluster.ALL_NODES)


async def test_a_cluster_rotation_refused_for_a_value_no_json_holds_claims_no_pointer(
    redis_cluster_url: str, raw_cluster: RedisCluster
) -> None:
    """The new digest's pointer was claimed before the data was encoded: refused, the
    update left it naming the session until its expiry."""
    prefix = f"as-{secrets.token_hex(5)}:"
    t0 = start_time()
    record, rotated = make_record(now=t0), new_digest()
    refused = SessionUpdate(
        t0 + 1, t0 + TTL, {"x": {1, 2}}, token_digest=rotated,
        expected_token_digest=record.token_digest,
    )  # fmt: skip
    try:
        async with RedisStore(redis_cluster_url, prefix=prefix) as store:
            await store.create(record, max_sessions=10, now=t0)
            with pytest.raises(TypeError):
                await store.update(record.id, refused, now=t0 + 1)
            left = await raw_cluster.get(store._digest_key(rotated))
            assert await store.get(record.token_digest, now=t0 + 1) == record
    finally:
        if leftover := [key async for key in raw_cluster.scan_iter(match=prefix + "*")]:
            await raw_cluster.delete(*leftover)
    assert left is None


@pytest.fixture
async def pointers_apart(
    redis_cluster_url: str, raw_cluster: RedisCluster
) -> AsyncIterator[PointersApart]:
    prefix = f"as-{secrets.token_hex(5)}:"
    t0 = start_time()
    await raw_cluster.initialize()  # its map of slots to nodes

    def node_of(key: str) -> ClusterNode:
        node = raw_cluster.get_node_from_key(key)
        assert node is not None
        return node

    async with RedisStore(redis_cluster_url, prefix=prefix, socket_timeout=0.3) as store:
        setup = Setup(store, store, raw_cluster, prefix)
        while True:
            record = make_record(now=t0, user_id=f"user-{secrets.token_hex(4)}")
            keys = setup.keys(record)
            pointer_nodes = [node_of(keys["digest"]), node_of(keys["id"])]
            if node_of(keys["session"]) not in pointer_nodes:
                break
        await store.create(record, max_sessions=10, now=t0)
        apart = PointersApart(store, raw_cluster, record, keys, pointer_nodes)
        try:
            yield apart
        finally:
            await apart.unpause()
            if leftover := [key async for key in raw_cluster.scan_iter(match=prefix + "*")]:
                await raw_cluster.delete(*leftover)


@pytest.mark.parametrize("ending", ["logout", "revoke_all"])
async def test_a_cluster_ends_a_session_though_the_nodes_of_its_pointers_stop_answering(
    pointers_apart: PointersApart, caplog: pytest.LogCaptureFixture, ending: str
) -> None:
    """In a cluster the pointers live on other nodes than the session, and go after its
    script has ended it. Their nodes failing then raised StoreUnavailable for a session
    already gone: a logout answered 503 though it had logged out."""
    store, record, keys = pointers_apart.store, pointers_apart.record, pointers_apart.keys
    now = record.last_active_at
    await pointers_apart.pause_pointer_nodes()
    with caplog.at_level("WARNING", logger="authsessions"):
        if ending == "logout":
            assert await store.delete(record.id, now=now, token_digest=record.token_digest)
        else:
            assert await store.delete_for_user(record.user_id, now=now) == 1
    await pointers_apart.unpause()

    raw = pointers_apart.raw
    assert await raw.exists(keys["session"]) == 0
    assert await raw.exists(keys["digest"]) == 1  # left behind, to expire
    assert await store.get(record.token_digest, now=now) is None
    assert await store.list_for_user(record.user_id, now=now) == []
    assert "the pointers of 1 ended Redis sessions will expire instead" in caplog.text
    assert record.token_digest not in caplog.text


async def test_a_cluster_cleanup_stops_when_the_nodes_of_the_pointers_stop_answering(
    pointers_apart: PointersApart,
) -> None:
    """A cleanup is no request: it stops at a silent node, which it would otherwise wait
    out once per user index, and the sessions its scripts removed stay removed."""
    store, record, keys = pointers_apart.store, pointers_apart.record, pointers_apart.keys
    await pointers_apart.pause_pointer_nodes()
    with pytest.raises(StoreUnavailable):
        await store.delete_expired(now=record.expires_at + 1, limit=1000)
    await pointers_apart.unpause()

    assert await pointers_apart.raw.exists(keys["session"]) == 0


async def test_a_cluster_keeps_a_touch_though_the_nodes_of_its_pointers_stop_answering(
    pointers_apart: PointersApart, caplog: pytest.LogCaptureFixture
) -> None:
    """A touch moves the pointers' expiry after its script has written the session: their
    nodes failing then answered 503 for a write that was kept."""
    store, record = pointers_apart.store, pointers_apart.record
    later = record.last_active_at + 5
    touch = SessionUpdate(last_active_at=later, expires_at=later + 3600, set_keys={"theme": "dark"})
    await pointers_apart.pause_pointer_nodes()
    with caplog.at_level("WARNING", logger="authsessions"):
        assert await store.update(record.id, touch, now=later)
    await pointers_apart.unpause()

    found = await store.get(record.token_digest, now=later)
    assert found is not None
    assert (found.data["theme"], found.expires_at) == ("dark", later + 3600)
    assert "keep their earlier expiry" in caplog.text
    assert record.token_digest not in caplog.text


async def twelve_users(store: RedisStore, t0: float) -> list[SessionRecord]:
    """One session each for twelve users: enough to land on every node of the cluster."""
    records = [make_record(now=t0, user_id=f"user{i}") for i in range(12)]
    for record in records:
        await store.create(record, max_sessions=10, now=t0)
    return records


async def test_a_users_keys_share_a_slot_and_users_spread_over_nodes(
    redis_cluster_url: str, raw_cluster: RedisCluster
) -> None:
    t0 = start_time()
    raw = raw_cluster
    prefix = f"authsessions-test-{secrets.token_hex(6)}:"
    async with RedisStore(redis_cluster_url, prefix=prefix) as store:
        records = await twelve_users(store, t0)
        setup = Setup(store, store, raw, prefix)

        nodes = set()
        for record in records:
            keys = setup.keys(record)
            slot = await raw.cluster_keyslot(keys["session"])
            assert await raw.cluster_keyslot(keys["index"]) == slot
            node = raw.get_node_from_key(keys["session"])
            assert node is not None
            nodes.add(node.name)
            assert await store.get(record.token_digest, now=t0) == record
    assert len(nodes) > 1


async def command_calls(raw: Redis | RedisCluster, *commands: str) -> dict[str, int]:
    """How often the server, or each of the cluster's primaries, ran each command."""
    calls = dict.fromkeys(commands, 0)
    if isinstance(raw, RedisCluster):
        await raw.initialize()
        all_stats = [
            await raw.info("commandstats", target_nodes=node) for node in raw.get_primaries()
        ]
    else:
        all_stats = [await raw.info("commandstats")]
    for stats in all_stats:
        for command in commands:
            calls[command] += stats.get(f"cmdstat_{command}", {}).get("calls", 0)
    return calls


async def test_reads_survive_a_flushed_script_cache(setup: Setup) -> None:
    """get sends EVALSHA itself: a server that forgot the scripts (restarted, flushed)
    must still answer, by the pointer (a digest new to the process) and by the cached
    location alike."""
    t0 = start_time()
    record = make_record(now=t0, data={"k": "v"})
    await setup.store.create(record, max_sessions=10, now=t0)
    assert await setup.store.get(record.token_digest, now=t0) == record  # location cached
    await setup.raw.script_flush()  # on every primary, in a cluster

    assert await setup.store.get(record.token_digest, now=t0) == record
    await setup.raw.script_flush()  # on every primary, in a cluster
    assert await setup.other.get(record.token_digest, now=t0) == record  # by the pointer
    assert await setup.other.get(record.token_digest, now=t0) == record


@pytest.mark.parametrize("absent", [True, False])
async def test_a_read_returns_every_column_exactly(setup: Setup, absent: bool) -> None:
    """The scripts send a session as one JSON text, its columns by position: none may
    shift, absent ones read back as None, and data keys and values come back exact."""
    t0 = start_time() + 0.123456789
    data = {
        "k": "v",
        'quote"and\\slash/': [1e20, -0.0, 1.5, None, True],
        "\u00e9\u0000\ud800": {"nested": {"x": "</script>"}},
        "": "",
    }
    record = make_record(
        now=t0,
        data=data,
        ip_address=None if absent else "2001:db8::1",
        user_agent=None if absent else 'Mozilla/5.0 (X11) \u00e9\u4e2d "q" \\ /',
        device_name="Firefox on Linux \u00e9",
        device_type="mobile",
    )
    await setup.store.create(record, max_sessions=10, now=t0)
    for store in (setup.other, setup.other, setup.store):  # by the pointer, then cached
        assert await store.get(record.token_digest, now=t0) == record
    (listed,) = await setup.store.list_for_user(record.user_id, now=t0)
    assert listed == record


async def test_an_authenticated_read_is_one_command_once_the_digest_is_known(
    redis_cluster_url: str, raw_cluster: RedisCluster
) -> None:
    """One round trip per request; a process pays a second only for a digest new to it."""
    t0 = start_time()
    raw = raw_cluster
    record = make_record(now=t0)
    prefix = f"authsessions-test-{secrets.token_hex(6)}:"
    async with (
        RedisStore(redis_cluster_url, prefix=prefix) as creator,
        RedisStore(redis_cluster_url, prefix=prefix) as newcomer,
    ):
        await creator.create(record, max_sessions=10, now=t0)
        await creator.get(record.token_digest, now=t0)  # loads the script on that node
        await newcomer.open()
        spent = []
        for store in (creator, newcomer, newcomer):
            before = await command_calls(raw, "evalsha", "get")
            assert await store.get(record.token_digest, now=t0) == record
            after = await command_calls(raw, "evalsha", "get")
            spent.append({command: after[command] - before[command] for command in after})

    one_script = {"evalsha": 1, "get": 0}
    assert spent == [one_script, {"evalsha": 1, "get": 1}, one_script]


async def commands_sent(raw: Redis, mentioning: str, action: Awaitable[Any]) -> list[str]:
    """The commands clients sent (not scripts) that mention ``mentioning``, while
    ``action`` ran: MONITOR's view, so a pipeline counts each of its commands.
    """
    marker = f"end-{secrets.token_hex(4)}"
    sent = []
    async with raw.monitor() as monitor:
        await action
        await raw.echo(marker)
        while marker not in (seen := await monitor.next_command())["command"]:
            if seen["client_type"] != "lua" and mentioning in seen["command"]:
                sent.append(seen["command"].split()[0].upper())
    return sent


async def test_a_login_on_a_single_server_is_one_command_evictions_included(
    redis_url: str, redis_prefix: str
) -> None:
    t0 = start_time()
    raw = Redis.from_url(redis_url, decode_responses=True)
    first, second = make_record(now=t0), make_record(now=t0 + 1)
    async with RedisStore(redis_url, prefix=redis_prefix) as store:
        await store.create(first, max_sessions=1, now=t0)  # loads the script

        evicting = store.create(second, max_sessions=1, now=t0 + 1)
        assert await commands_sent(raw, redis_prefix, evicting) == ["EVALSHA"]

        assert await store.get(first.token_digest, now=t0 + 1) is None
        assert await store.get(second.token_digest, now=t0 + 1) == second
        keys = {key async for key in raw.scan_iter(match=redis_prefix + "*")}
    await raw.aclose()
    assert {f"{redis_prefix}d:{second.token_digest}", f"{redis_prefix}i:{second.id}"} <= keys
    assert not any(first.id in key or first.token_digest in key for key in keys)


async def test_a_login_over_a_session_on_a_single_server_is_one_command(
    redis_url: str, redis_prefix: str
) -> None:
    t0 = start_time()
    raw = Redis.from_url(redis_url, decode_responses=True)
    first, second, replaced = make_record(now=t0), make_record(now=t0), new_digest()
    async with RedisStore(redis_url, prefix=redis_prefix) as store:
        await store.create(first, max_sessions=10, now=t0)  # loads the script

        login = store.create(second, max_sessions=10, now=t0, replaced=(replaced, t0 + 60))
        assert await commands_sent(raw, redis_prefix, login) == ["EVALSHA"]

        assert await store.rotated_away_to(replaced, now=t0)
    await raw.aclose()


async def test_logouts_on_a_single_server_are_one_command_each(
    redis_url: str, redis_prefix: str
) -> None:
    t0 = start_time()
    raw = Redis.from_url(redis_url, decode_responses=True)
    records = [make_record(now=t0 + i) for i in range(4)]
    async with RedisStore(redis_url, prefix=redis_prefix) as store:
        for record in records:
            await store.create(record, max_sessions=10, now=record.created_at)
        # Load both scripts: after a flush, a script's first EVALSHA fails and is sent again.
        await store.delete(records[0].id, now=record.created_at)
        await store.delete_for_user("nobody", now=record.created_at)

        one = store.delete(records[1].id, now=record.created_at)
        assert await commands_sent(raw, redis_prefix, one) == ["EVALSHA"]
        others = store.delete_for_user("alice", now=record.created_at, except_id=records[3].id)
        assert await commands_sent(raw, redis_prefix, others) == ["EVALSHA"]

        keys = {key async for key in raw.scan_iter(match=redis_prefix + "*")}
    await raw.aclose()
    assert {key for key in keys if ":d:" in key or ":i:" in key} == {
        f"{redis_prefix}d:{records[3].token_digest}",
        f"{redis_prefix}i:{records[3].id}",
    }


async def test_stats_scan_every_primary_and_never_send_keys(
    redis_cluster_url: str, raw_cluster: RedisCluster
) -> None:
    t0 = start_time()
    raw = raw_cluster
    prefix = f"authsessions-test-{secrets.token_hex(6)}:"
    async with RedisStore(redis_cluster_url, prefix=prefix) as store:
        await twelve_users(store, t0)
        before = await command_calls(raw, "scan", "keys")
        stats = await store.stats(now=t0)
        after = await command_calls(raw, "scan", "keys")
        keys = [key async for key in raw.scan_iter(match=prefix + "*", count=1000)]
        await raw.delete(*keys)

    assert (stats.live_sessions, stats.users) == (12, 12)
    assert after["keys"] == before["keys"]
    assert after["scan"] - before["scan"] >= 3  # one cursor per primary, at least


async def test_a_cluster_is_recognised_from_a_plain_url(redis_cluster_url: str) -> None:
    t0 = start_time()
    record = make_record(now=t0)
    plain = redis_cluster_url.replace("redis+cluster://", "redis://")
    async with RedisStore(plain, prefix=f"authsessions-test-{secrets.token_hex(6)}:") as store:
        assert store.is_cluster
        await store.create(record, max_sessions=10, now=t0)
        assert await store.get(record.token_digest, now=t0) == record


async def test_a_user_refused_dangerous_commands_opens_a_store_from_a_plain_url(
    redis_target: str, redis_prefix: str
) -> None:
    """Redis's own advice for an app's user, ``-@dangerous``, refuses ``INFO``, which told a
    cluster from a single server: such a user could open no store from a URL (every
    request a 503), nor say ``cluster=False`` in one."""
    in_cluster = "+cluster" in redis_target
    plain = redis_target.replace("+cluster", "")
    admin: Redis | RedisCluster = (
        RedisCluster.from_url(plain) if in_cluster else Redis.from_url(plain)
    )
    name, password = f"authsessions-test-{secrets.token_hex(4)}", secrets.token_hex(8)
    on_every_node: dict[str, Any] = {"target_nodes": RedisCluster.ALL_NODES} if in_cluster else {}
    rules = ("on", f">{password}", "~*", "+@all", "-@dangerous")
    await admin.execute_command("ACL", "SETUSER", name, *rules, **on_every_node)
    t0 = start_time()
    record = make_record(now=t0)
    try:
        url = plain.replace("://", f"://{name}:{password}@", 1)
        async with RedisStore(url, prefix=redis_prefix) as store:
            assert store.is_cluster is in_cluster
            await store.create(record, max_sessions=10, now=t0)
            assert await store.get(record.token_digest, now=t0) == record
            assert await store.delete(record.id, now=t0)
    finally:
        await admin.acl_deluser(name, **on_every_node)
        await admin.aclose()


@pytest.mark.parametrize("scheme", ["rediss", "rediss+cluster"])
async def test_a_tls_file_the_url_names_and_that_is_missing_is_named_at_open(
    scheme: str, tmp_path: Path, redis_url: str
) -> None:
    """redis-py loads the files as it connects, and said "Error 2 connecting to host:port.
    No such file or directory": taken for an outage, every request was a 503."""
    missing = tmp_path / "nowhere"
    where = redis_url.partition("://")[2].partition("/")[0]
    url = (
        f"{scheme}://app:s3cret-pw@{where}/0?ssl_certfile={missing}/c.pem"
        f"&ssl_keyfile={missing}/k%20ey&client_name=ops@laptop"  # an "@" hid the options
    )
    store = RedisStore(url)

    with pytest.raises(ValueError, match="cannot be used") as raised:
        await store.open()

    message = str(raised.value)
    assert message.endswith(
        f" cannot be used: cannot read ssl_certfile={missing}/c.pem, "
        f"ssl_keyfile={missing}/k ey ([Errno 2] No such file or directory)."
    )
    assert "s3cret-pw" not in message
    assert not store.is_open


async def test_a_tls_file_that_holds_no_certificate_is_named_at_open(
    tmp_path: Path, redis_url: str
) -> None:
    not_a_certificate = tmp_path / "ca.pem"
    not_a_certificate.write_text("not a certificate\n")
    where = redis_url.partition("://")[2].partition("/")[0]
    store = RedisStore(f"rediss://{where}/0?ssl_ca_certs={not_a_certificate}")

    with pytest.raises(ValueError, match="no certificate or crl found") as raised:
        await store.open()

    assert str(raised.value).endswith(f", in one of ssl_ca_certs={not_a_certificate}.")


async def test_a_missing_unix_socket_is_an_outage_not_a_tls_file(tmp_path: Path) -> None:
    """Also "Error 2 ... No such file or directory" from redis-py's connect."""
    store = RedisStore(f"unix://{tmp_path}/no-such.sock")

    with pytest.raises(StoreUnavailable):
        await store.open()


@pytest.mark.parametrize("how", ["scheme", "argument"])
async def test_a_cluster_url_for_a_single_server_is_named_at_open(
    redis_url: str, redis_prefix: str, how: str
) -> None:
    """redis-py's words for it were dropped: the store was "unavailable" (every request a
    503), logged as a bare "RedisClusterException"."""
    where = redis_url.partition("://")[2]
    url, cluster = (
        (f"redis+cluster://{where}", None) if how == "scheme" else (f"redis://{where}", True)
    )
    store = RedisStore(url, prefix=redis_prefix, cluster=cluster)

    with pytest.raises(ValueError, match="not in cluster mode") as raised:
        await store.open()

    assert str(raised.value) == (
        f"the Redis server of {url} is not in cluster mode: name it with redis:// (or "
        "rediss://), not redis+cluster://, and without cluster=True."
    )
    assert not store.is_open


def test_open_store_accepts_cluster_urls() -> None:
    for url in ("redis+cluster://127.0.0.1:7000", "rediss+cluster://127.0.0.1:7000"):
        store = open_store(url)
        assert isinstance(store, RedisStore)
        assert store.is_cluster
    single = open_store("redis://127.0.0.1:6379/0")
    assert isinstance(single, RedisStore)
    assert not single.is_cluster


@pytest.mark.parametrize(
    "url", ["redis+cluster://127.0.0.1:7000/2", "redis+cluster://127.0.0.1:7000?db=2"]
)
def test_a_cluster_url_naming_a_database_is_refused_as_a_bad_url(url: str) -> None:
    """A cluster has one database: redis-py's own exception escaped the middleware's
    check of the URL, and the server served 500s instead of stopping at startup."""
    with pytest.raises(ValueError, match="'db' must be 0"):
        open_store(url)


@pytest.mark.parametrize("policy", ["noeviction", "allkeys-lru", "volatile-ttl"])
async def test_a_server_that_evicts_keys_once_full_is_named_at_open(
    redis_url: str, redis_prefix: str, policy: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Every key of a session expires, so even a volatile policy takes them: a user's index
    gone, a logout everywhere missed sessions that still signed in."""
    admin = Redis.from_url(redis_url)
    before = cast("dict[str, str]", await admin.config_get("maxmemory", "maxmemory-policy"))
    try:
        await admin.config_set("maxmemory", str(1 << 30))
        await admin.config_set("maxmemory-policy", policy)
        async with RedisStore(redis_url, prefix=redis_prefix):
            pass
    finally:
        await admin.config_set("maxmemory", before["maxmemory"])
        await admin.config_set("maxmemory-policy", before["maxmemory-policy"])
        await admin.aclose()

    warned = [r.getMessage() for r in caplog.records if "evicts keys" in r.getMessage()]
    if policy == "noeviction":
        assert warned == []
    else:
        assert len(warned) == 1
        assert f"maxmemory-policy {policy}" in warned[0]


# -- options ---------------------------------------------------------------------------------------


async def test_a_store_without_a_key_prefix_finds_and_ends_sessions_from_another_process(
    redis_url: str,
) -> None:
    """An empty prefix (``?prefix=``) on a single server: the scripts once took it for a
    cluster's and wrote no pointers, so only the process holding the session's location
    in memory found it, no other could revoke it, and a rotated token found nothing.
    """
    now = start_time()
    record = make_record(now=now, user_id=f"no-prefix-{secrets.token_hex(6)}")
    rotated = new_digest()
    raw = Redis.from_url(redis_url, decode_responses=True)

    async def keys_left() -> list[str]:
        # No prefix sets this test's keys apart: they are found by its session's id,
        # digests and user (whose keys share a slot tag, named by no other test).
        found = [key async for key in raw.scan_iter(match=f"*{record.id}*", count=1000)]
        found += [
            key for key in (f"d:{record.token_digest}", f"d:{rotated}") if await raw.exists(key)
        ]
        return found

    try:
        async with (
            open_store(f"{redis_url}?prefix=") as store,
            RedisStore(redis_url, prefix="") as other,
        ):
            assert isinstance(store, RedisStore)
            assert store.prefix == ""
            await store.create(record, max_sessions=5, now=now)
            assert await other.get(record.token_digest, now=now) == record

            update = make_update(now=now + 1, token_digest=rotated)
            assert await store.update(record.id, update, now=now + 1)
            assert await other.get(record.token_digest, now=now + 1) is None
            assert (await other.get(rotated, now=now + 1)) is not None

            assert await other.delete(record.id, now=now + 1)
            assert await store.get(rotated, now=now + 1) is None
            assert await keys_left() == []
    finally:
        if leftover := await keys_left():
            await raw.delete(*leftover)
        await raw.aclose()


def test_concurrent_cleanups_go_on_after_the_store_opens_again_on_a_new_event_loop(
    redis_url: str, redis_prefix: str
) -> None:
    """The store opens again on a new event loop once its first has closed; the lock its
    cleanups take turns at must not stay bound to the first.
    """
    store = RedisStore(redis_url, prefix=redis_prefix)

    async def two_cleanups_at_once(user: str, *, then_close: bool) -> list[int]:
        await store.open()  # again on the second loop, the first one's connections gone
        now = start_time()
        for index in range(6):
            record = make_record(now=now, user_id=f"{user}-{index}", ttl=5)
            await store.create(record, max_sessions=5, now=now)
        counts = await asyncio.gather(
            store.delete_expired(now=now + 10, limit=3),
            store.delete_expired(now=now + 10, limit=3),
        )
        if then_close:
            await store.close()
        return list(counts)

    assert sum(asyncio.run(two_cleanups_at_once("first-loop", then_close=False))) == 6
    assert sum(asyncio.run(two_cleanups_at_once("second-loop", then_close=True))) == 6


async def test_an_apps_client_is_used_and_left_open(redis_url: str, redis_prefix: str) -> None:
    t0 = start_time()
    record = make_record(now=t0)
    client = Redis.from_url(redis_url, decode_responses=True)

    async with RedisStore(client=client, prefix=redis_prefix) as store:
        await store.create(record, max_sessions=10, now=t0)
        assert await store.get(record.token_digest, now=t0) == record

    assert await client.ping()
    await client.aclose()


def test_a_client_returning_bytes_is_refused() -> None:
    with pytest.raises(ValueError, match="decode_responses=True"):
        RedisStore(client=Redis())


@pytest.mark.parametrize("prefix", ["app{1}:", "}"])
def test_a_prefix_with_braces_is_refused(prefix: str) -> None:
    """A brace would make the prefix the hash tag: every key in one cluster slot."""
    with pytest.raises(ValueError, match="braces"):
        RedisStore("redis://127.0.0.1:6379/0", prefix=prefix)


def test_the_password_never_shows_in_the_repr() -> None:
    store = RedisStore("redis://app:s3cret-pw@127.0.0.1:6379/0?password=s3cret-pw")
    assert "s3cret-pw" not in repr(store)
    assert "app:***@127.0.0.1" in repr(store)
    assert "password=***" in repr(store)


@pytest.mark.parametrize("scheme", ["redis", "redis+cluster"])
@pytest.mark.parametrize("password", ["s3cret/PW", "s3cret?PW", "s3cret#PW"])
def test_a_password_redis_py_misreads_is_refused_without_showing_it(
    scheme: str, password: str
) -> None:
    """An unescaped "/", "?" or "#" ends the host part: redis-py reads the password's tail
    as a port, and its message quotes it."""
    with pytest.raises(ValueError, match="is malformed") as raised:
        RedisStore(f"{scheme}://u:{password}@127.0.0.1:6379/0")

    assert f"{scheme}://u:***@127.0.0.1:6379/0" in str(raised.value)
    assert "s3cret" not in str(raised.value)
    assert "PW" not in str(raised.value)
    assert raised.value.__cause__ is None
    assert raised.value.__suppress_context__


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379/abc",
        "redis://127.0.0.1/sessions",
        "redis+cluster://node:7000/x",
        "redis://127.0.0.1/1/2",
    ],
)
def test_a_database_that_is_not_a_number_is_refused_when_the_store_is_built(url: str) -> None:
    """redis-py would take database 0 for it, shared with whatever else lives there (and
    database 12 for /1/2)."""
    with pytest.raises(ValueError, match="names a database that is not a number"):
        RedisStore(url)


@pytest.mark.parametrize(
    "url", ["redis://127.0.0.1:6379/1", "redis://127.0.0.1:6379", "redis://127.0.0.1:6379/"]
)
def test_a_database_number_or_none_is_taken(url: str) -> None:
    assert RedisStore(url)


@pytest.mark.parametrize(
    "option",
    ["socket_timeout=0", "socket_connect_timeout=-1", "socket_timeout=inf", "socket_timeout=nan"],
)
def test_a_url_timeout_of_no_time_is_refused_when_the_store_is_built(option: str) -> None:
    """Every call timed out at once (the server started, and answered 503s), or a silent
    server held it for ever."""
    with pytest.raises(ValueError, match="above 0"):
        RedisStore(f"redis://127.0.0.1:6379/0?{option}")


@pytest.mark.parametrize(
    ("option", "value", "error"),
    [
        ("socket_timeout", math.inf, ValueError),  # a silent server held calls for ever
        ("socket_connect_timeout", math.nan, ValueError),
        ("socket_timeout", True, TypeError),
    ],
)
def test_a_timeout_no_store_can_honour_is_refused_when_it_is_built(
    option: str, value: object, error: type[Exception]
) -> None:
    with pytest.raises(error, match=option):
        RedisStore("redis://127.0.0.1:6379/0", **{option: value})  # type: ignore[arg-type]


# -- failures -------------------------------------------------------------------------------------


@pytest.fixture
async def proxy(redis_url: str) -> AsyncIterator[TcpProxy]:
    async with TcpProxy("127.0.0.1", int(redis_url.rsplit(":", 1)[1].split("/")[0])) as proxy:
        yield proxy


async def test_an_unreachable_server_gives_store_unavailable_at_open() -> None:
    with refusing_port() as port:
        store = RedisStore(f"redis://127.0.0.1:{port}/0", socket_connect_timeout=1)
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await store.open()
    assert time.monotonic() - started < 5
    assert not store.is_open


class RunningOneCommandTwice(RedisCluster):
    """Runs the next command that holds ``marker`` twice, as the client's own retry does
    when the first reply is lost on its way back: the caller sees the second answer."""

    marker: str | None = None
    repeated = ""

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        if self.marker is not None and args[0] == self.repeated and self.marker in args:
            self.marker = None
            await super().execute_command(*args, **kwargs)
        return await super().execute_command(*args, **kwargs)


def running_one_command_twice(redis_cluster_url: str, repeated: str) -> RunningOneCommandTwice:
    """A client of the test cluster that runs the next ``repeated`` command holding its
    ``marker`` twice."""
    client = cast(
        "RunningOneCommandTwice",
        RunningOneCommandTwice.from_url(
            redis_cluster_url.replace("+cluster", ""), decode_responses=True
        ),
    )
    client.repeated = repeated
    return client


@pytest.mark.parametrize("retried", ["SET", "EVALSHA"], ids=["pointer-claim", "script"])
async def test_a_cluster_login_and_rotation_stand_after_the_clients_retry(
    redis_cluster_url: str, redis_prefix: str, retried: str
) -> None:
    """On a cluster a rotation first claims its new digest's pointer on another node: a
    retried claim found it taken by itself, and the rotation went on as a touch,
    answering True with the old token still valid and the new one naming nothing. (A
    login claims its pointers in one pipeline, which this client does not run twice: its
    script is.)"""
    client = running_one_command_twice(redis_cluster_url, retried)
    t0 = start_time()
    record = make_record(now=t0)
    try:
        async with RedisStore(client=client, prefix=redis_prefix) as store:
            if retried == "EVALSHA":
                client.marker = record.token_digest
            await store.create(record, max_sessions=10, now=t0)
            assert client.marker is None  # the login's script ran twice
            assert await store.list_for_user("alice", now=t0) == [record]

            rotated = new_digest()
            client.marker = f"{redis_prefix}d:{rotated}" if retried == "SET" else rotated
            rotation = make_update(
                now=t0 + 1,
                token_digest=rotated,
                expected_token_digest=record.token_digest,
                rotated_away_until=t0 + 61,
            )
            assert await store.update(record.id, rotation, now=t0 + 1)
            assert client.marker is None  # the claim, or the script, ran twice
            assert await store.get(record.token_digest, now=t0 + 1) is None
            assert await store.rotated_away_to(record.token_digest, now=t0 + 1)
            found = await store.get(rotated, now=t0 + 1)
            assert found is not None
            assert found.id == record.id
    finally:
        await delete_prefixed(client, redis_prefix)


async def test_a_cluster_touch_renews_the_pointers_after_the_clients_retry(
    redis_cluster_url: str, redis_prefix: str
) -> None:
    """Its script run twice, the second run finds the times moved (by the first) since
    its cutoff: the pointers, which a cluster renews after the script, must still follow
    the session. They kept their old expiry, and once it passed, the session was lost to
    every process that did not know where it lives."""
    client = running_one_command_twice(redis_cluster_url, "EVALSHA")
    t0 = start_time()
    record = make_record(now=t0, ttl=10)
    try:
        async with RedisStore(client=client, prefix=redis_prefix) as store:
            await store.create(record, max_sessions=10, now=t0)
            # Run once first: a server that has yet to load the script refuses the first
            # run, which is then not run again.
            assert await store.update(record.id, SessionUpdate(None, None), now=t0)
            client.marker = record.id
            touch = SessionUpdate(t0 + 1, t0 + 3601, touch_if_last_active_by=t0)
            assert await store.update(record.id, touch, now=t0 + 1)
            assert client.marker is None  # the script ran twice

            keys = [key async for key in client.scan_iter(match=f"{redis_prefix}*")]
            lifetimes = {key.removeprefix(redis_prefix): await client.pttl(key) for key in keys}
    finally:
        await delete_prefixed(client, redis_prefix)

    assert len(lifetimes) >= 3  # the session, its id's pointer and its digest's
    assert all(ms > 3_000_000 for ms in lifetimes.values()), lifetimes


async def test_a_cluster_rotation_keeping_the_stored_times_gives_the_new_pointer_their_expiry(
    redis_cluster_url: str, redis_prefix: str
) -> None:
    """A rotation finding the session touched since its cutoff keeps the stored times:
    the new digest's pointer, claimed with the rotation's own (shorter) expiry, kept it,
    and the session was lost once it passed to every process not knowing where it lives."""
    t0 = start_time()
    record = make_record(now=t0)
    async with RedisStore(redis_cluster_url, prefix=redis_prefix) as store:
        try:
            await store.create(record, max_sessions=10, now=t0)
            touch = SessionUpdate(t0 + 100, t0 + 100 + TTL, touch_if_last_active_by=t0 + 40)
            assert await store.update(record.id, touch, now=t0 + 100)
            rotated = new_digest()
            rotation = SessionUpdate(
                t0 + 101,
                t0 + 161,  # a server with a shorter ttl, say, in a rolling deploy
                token_digest=rotated,
                expected_token_digest=record.token_digest,
                touch_if_last_active_by=t0 + 50,
            )
            assert await store.update(record.id, rotation, now=t0 + 101)

            client = store._require_client()
            pointer_ms = await client.pttl(store._digest_key(rotated))
        finally:
            await delete_prefixed(store._require_client(), redis_prefix)

    assert pointer_ms > 60_000


async def test_a_cluster_login_over_a_session_stands_after_the_clients_retry(
    redis_cluster_url: str, redis_prefix: str
) -> None:
    """Its script run twice, the second run finds the login done: it keeps the digest of
    the session it replaced, pointer included."""
    client = running_one_command_twice(redis_cluster_url, "EVALSHA")
    t0 = start_time()
    record, replaced = make_record(now=t0), new_digest()
    try:
        async with RedisStore(client=client, prefix=redis_prefix) as store:
            client.marker = record.token_digest
            await store.create(record, max_sessions=10, now=t0, replaced=(replaced, t0 + 60))
            assert client.marker is None  # the login's script ran twice
            assert await store.list_for_user("alice", now=t0) == [record]
            assert await store.rotated_away_to(replaced, now=t0)
    finally:
        await delete_prefixed(client, redis_prefix)


async def test_a_database_the_server_lacks_is_named_in_the_log(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis has 16 databases unless told otherwise: ``/99`` failed every open with a bare
    "ResponseError" in the log."""
    store = RedisStore(redis_url.rsplit("/", 1)[0] + "/99")

    with caplog.at_level("WARNING", logger="authsessions"), pytest.raises(StoreUnavailable):
        await store.open()

    assert caplog.messages == [
        "the Redis session store failed: ResponseError: DB index is out of range"
    ]
    assert not store.is_open


async def test_a_server_refusing_writes_without_replicas_is_named_in_the_log(
    redis_cluster_url: str, redis_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """``min-replicas-to-write`` unmet refuses every login and touch: logged as a bare
    "ResponseError", the 503s were unexplained. (The test run's own cluster, whose
    settings no other process shares.)"""
    admin = RedisCluster.from_url(redis_cluster_url.replace("+cluster", ""))
    t0 = start_time()
    async with RedisStore(redis_cluster_url, prefix=redis_prefix) as store:
        await admin.config_set("min-replicas-to-write", 1, target_nodes=RedisCluster.ALL_NODES)
        try:
            with caplog.at_level("WARNING", logger="authsessions"), pytest.raises(StoreUnavailable):
                await store.create(make_record(now=t0), max_sessions=10, now=t0)
        finally:
            await admin.config_set("min-replicas-to-write", 0, target_nodes=RedisCluster.ALL_NODES)
            await admin.aclose()

    assert caplog.messages == [
        "the Redis session store failed: ResponseError: NOREPLICAS Not enough good replicas"
        " to write."
    ]


async def test_dropped_connections_give_store_unavailable_then_the_store_recovers(
    proxy: TcpProxy, redis_prefix: str
) -> None:
    t0 = start_time()
    record = make_record(now=t0, data={"a": 1})
    url = f"redis://127.0.0.1:{proxy.port}/0"
    async with RedisStore(url, prefix=redis_prefix, socket_timeout=1) as store:
        await store.create(record, max_sessions=10, now=t0)
        await proxy.drop()

        for operation in (
            store.get(record.token_digest, now=t0),
            store.update(record.id, make_update(now=t0, set_keys={"b": 2}), now=t0),
            store.create(make_record(now=t0), max_sessions=10, now=t0),
            store.list_for_user("alice", now=t0),
        ):
            started = time.monotonic()
            with pytest.raises(StoreUnavailable):
                await operation
            assert time.monotonic() - started < 5

        await proxy.resume()
        assert await store.update(record.id, make_update(now=t0, set_keys={"b": 2}), now=t0)
        found = await store.get(record.token_digest, now=t0)
        assert found is not None
        assert found.data == {"a": 1, "b": 2}


async def test_a_login_and_a_rotation_whose_replies_were_lost_stand_after_the_clients_retry(
    proxy: TcpProxy, redis_prefix: str
) -> None:
    """An app's client retries a command whose reply was lost (redis-py's default): the
    script ran, and ran again. The login's retry refused its own session as a duplicate
    (the session layer made a second one, a ghost that no cookie holds), and the
    rotation's found the new token where it wanted the old (the user signed out)."""
    t0 = start_time()
    record = make_record(now=t0)
    client = Redis(host="127.0.0.1", port=proxy.port, decode_responses=True)
    assert client.get_retry() is not None  # the default: retried after a lost connection
    try:
        async with RedisStore(client=client, prefix=redis_prefix) as store:
            proxy.lose_reply_to(record.token_digest.encode())
            await store.create(record, max_sessions=10, now=t0)
            assert await store.list_for_user("alice", now=t0) == [record]

            rotated = new_digest()
            proxy.lose_reply_to(rotated.encode())
            rotation = make_update(
                now=t0 + 1,
                set_keys={"a": 1},
                token_digest=rotated,
                expected_token_digest=record.token_digest,
                rotated_away_until=t0 + 61,
            )
            assert await store.update(record.id, rotation, now=t0 + 1)
            assert await store.get(record.token_digest, now=t0 + 1) is None
            assert await store.rotated_away_to(record.token_digest, now=t0 + 1)
            found = await store.get(rotated, now=t0 + 1)
            assert found is not None
            assert (found.id, found.data) == (record.id, {"a": 1})
            assert proxy.accepted >= 3  # each lost reply cost its connection
    finally:
        await client.aclose()


async def test_a_login_over_a_session_whose_reply_was_lost_stands_after_the_clients_retry(
    proxy: TcpProxy, redis_prefix: str
) -> None:
    t0 = start_time()
    record, replaced = make_record(now=t0), new_digest()
    client = Redis(host="127.0.0.1", port=proxy.port, decode_responses=True)
    try:
        async with RedisStore(client=client, prefix=redis_prefix) as store:
            proxy.lose_reply_to(record.token_digest.encode())
            await store.create(record, max_sessions=10, now=t0, replaced=(replaced, t0 + 60))
            assert await store.list_for_user("alice", now=t0) == [record]
            assert await store.rotated_away_to(replaced, now=t0)
            assert proxy.accepted >= 2  # the lost reply cost its connection
    finally:
        await client.aclose()


async def test_a_logout_and_a_logout_everywhere_whose_replies_were_lost_count_what_they_ended(
    proxy: TcpProxy, redis_prefix: str
) -> None:
    """The client's retry found nothing left to delete: a revoke answered "not found" for
    the session it had ended, and a logout everywhere 0."""
    t0 = start_time()
    records = [make_record(now=t0 + i) for i in range(4)]
    client = Redis(host="127.0.0.1", port=proxy.port, decode_responses=True)
    try:
        async with RedisStore(client=client, prefix=redis_prefix) as store:
            for record in records:
                await store.create(record, max_sessions=10, now=t0 + 4)
            proxy.lose_reply_to(records[3].id.encode())
            assert await store.delete(records[3].id, now=t0 + 4, user_id="alice")
            proxy.lose_reply_to(records[0].id.encode())
            ended = await store.delete_for_user("alice", now=t0 + 4, except_id=records[0].id)
            assert ended == 2
            assert await store.list_for_user("alice", now=t0 + 4) == [records[0]]
            assert proxy.accepted >= 3  # each lost reply cost its connection
            answers = [key async for key in client.scan_iter(match=f"{redis_prefix}*:a:*")]
            assert len(answers) == 2
            for answer in answers:
                assert 0 < await client.pttl(answer) <= 60_000
            # A delete of its own, not a retry, is answered anew.
            assert not await store.delete(records[3].id, now=t0 + 4, user_id="alice")
            assert await store.delete_for_user("alice", now=t0 + 4, except_id=records[0].id) == 0
    finally:
        await client.aclose()


async def test_a_cluster_logout_run_twice_by_the_clients_retry_reports_what_it_ended(
    redis_cluster_url: str, redis_prefix: str
) -> None:
    """Its pointers, on other nodes, went only after a True answer: they stayed."""
    client = running_one_command_twice(redis_cluster_url, "EVALSHA")
    t0 = start_time()
    record = make_record(now=t0)
    try:
        async with RedisStore(client=client, prefix=redis_prefix) as store:
            await store.create(record, max_sessions=10, now=t0)
            # Run once first: a server that has yet to load the script refuses the first
            # run, which is then not run again.
            assert not await store.delete("nothing-here", now=t0, user_id="alice")
            client.marker = record.id
            assert await store.delete(record.id, now=t0, user_id="alice")
            assert client.marker is None  # the script ran twice
            assert await store.list_for_user("alice", now=t0) == []
            left = [key async for key in client.scan_iter(match=f"{redis_prefix}*")]
            assert [key for key in left if ":a:" not in key] == []
    finally:
        await delete_prefixed(client, redis_prefix)


async def test_a_silent_server_gives_store_unavailable_within_the_timeout(
    proxy: TcpProxy, redis_prefix: str
) -> None:
    t0 = start_time()
    record = make_record(now=t0)
    url = f"redis://127.0.0.1:{proxy.port}/0"
    async with RedisStore(url, prefix=redis_prefix, socket_timeout=0.5) as store:
        await store.create(record, max_sessions=10, now=t0)
        proxy.stall()

        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await store.get(record.token_digest, now=t0)
        assert time.monotonic() - started < 5

        proxy.unstall()
        assert await store.get(record.token_digest, now=t0) == record


async def test_reads_on_kept_connections_the_server_closed_go_on_without_an_error(
    proxy: TcpProxy, redis_prefix: str
) -> None:
    """Reads keep their connections between calls; a restart or a server-side timeout
    closes them while they sit idle, and the next read must not turn that into a 503."""
    t0 = start_time()
    record = make_record(now=t0)
    url = f"redis://127.0.0.1:{proxy.port}/0"
    async with RedisStore(url, prefix=redis_prefix) as store:
        await store.create(record, max_sessions=10, now=t0)
        await asyncio.gather(*(store.get(record.token_digest, now=t0) for _ in range(3)))
        await proxy.drop()  # every connection through the proxy is reset
        await proxy.resume()

        for _ in range(5):
            assert await store.get(record.token_digest, now=t0) == record


async def test_connections_the_server_closed_while_idle_do_not_fail_the_next_calls(
    redis_url: str, redis_prefix: str
) -> None:
    """A server-side ``timeout`` or a restart closes the pool's connections while they sit
    idle, cleanly (unlike a reset, nothing tells the client until it reads): the next
    reads and writes must reconnect, not answer 503."""
    name = f"authsessions-test-{secrets.token_hex(4)}"
    separator = "&" if "?" in redis_url else "?"
    t0 = start_time()
    records = [make_record(now=t0, user_id=f"user-{i}") for i in range(5)]
    admin = Redis.from_url(redis_url, decode_responses=True)
    try:
        async with RedisStore(
            f"{redis_url}{separator}client_name={name}", prefix=redis_prefix
        ) as store:
            for record in records:
                await store.create(record, max_sessions=10, now=t0)
            await asyncio.gather(  # several connections, in the pool and kept for reads
                *(store.get(record.token_digest, now=t0) for record in records),
                *(store.update(record.id, make_update(now=t0), now=t0) for record in records),
            )
            clients = [c for c in await admin.client_list() if c["name"] == name]
            assert len(clients) > 1
            for client in clients:
                await admin.client_kill_filter(_id=client["id"])

            results = await asyncio.gather(
                *(store.get(record.token_digest, now=t0) for record in records),
                *(
                    store.update(record.id, make_update(now=t0 + 1, set_keys={"b": 2}), now=t0 + 1)
                    for record in records
                ),
                return_exceptions=True,
            )
    finally:
        await admin.aclose()

    assert [r for r in results if isinstance(r, BaseException)] == []


async def close_the_clients_connections(cluster_url: str) -> None:
    """Every node closes its clients' connections, as it does with those idle past its
    timeout: the store's pools still hold them."""
    admin = RedisCluster.from_url(cluster_url.replace("redis+cluster", "redis"))
    try:
        await admin.client_kill_filter(
            _type="normal", skipme=True, target_nodes=RedisCluster.ALL_NODES
        )
    finally:
        await admin.aclose()


async def test_cluster_reads_on_connections_the_nodes_closed_while_idle_go_on(
    redis_cluster_url: str, redis_prefix: str
) -> None:
    """A cluster node's pool hands out its connections unchecked: the first read on one
    the node closed while it sat idle must go again on another, not answer 503."""
    t0 = start_time()
    records = [make_record(now=t0, user_id=f"user-{i}") for i in range(5)]
    async with RedisStore(redis_cluster_url, prefix=redis_prefix) as store:
        for record in records:
            await store.create(record, max_sessions=10, now=t0)
        await asyncio.gather(*(store.get(r.token_digest, now=t0) for r in records))
        store._digest_locations.clear()  # the pointer's read too, then the session's
        await close_the_clients_connections(redis_cluster_url)

        results = await asyncio.gather(
            *(store.get(record.token_digest, now=t0) for record in records),
            return_exceptions=True,
        )

    assert results == records


async def test_cluster_rotated_away_reads_on_connections_the_nodes_closed_while_idle_go_on(
    redis_cluster_url: str, redis_prefix: str
) -> None:
    """The request this answer spares (its token rotated away moments ago) must not get a
    503 because a node closed an idle connection: the pointer and the session it reads
    seldom sit on the node ``get`` just used."""
    t0 = start_time()
    records = [make_record(now=t0, user_id=f"user-{i}") for i in range(5)]
    async with RedisStore(redis_cluster_url, prefix=redis_prefix) as store:
        for record in records:
            await store.create(record, max_sessions=10, now=t0)
            await rotate_away(store, record, now=t0 + 1, until=t0 + 61)
        for record in records:  # a connection to every node, idle in its pool
            assert await store.rotated_away_to(record.token_digest, now=t0 + 2)
        await close_the_clients_connections(redis_cluster_url)

        results = await asyncio.gather(
            *(store.rotated_away_to(record.token_digest, now=t0 + 2) for record in records),
            return_exceptions=True,
        )

    assert results == [record.id for record in records]


async def test_a_read_cancelled_mid_reply_leaves_nothing_for_the_next_read(
    proxy: TcpProxy, redis_prefix: str
) -> None:
    """A read cancelled after its command went out (its request's client went away)
    leaves a reply on the way: the next read must get its own reply, not that one."""
    t0 = start_time()
    first, second = make_record(now=t0), make_record(now=t0, user_id="bob")
    url = f"redis://127.0.0.1:{proxy.port}/0"
    async with RedisStore(url, prefix=redis_prefix) as store:
        for record in (first, second):
            await store.create(record, max_sessions=10, now=t0)
            assert await store.get(record.token_digest, now=t0) == record
        proxy.stall()
        cancelled = asyncio.ensure_future(store.get(first.token_digest, now=t0))
        await asyncio.sleep(0.1)  # the command is on its way; nothing comes back
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        proxy.unstall()

        for _ in range(3):
            assert await store.get(second.token_digest, now=t0) == second


async def test_a_read_finishing_after_close_gives_its_connection_back(
    proxy: TcpProxy, redis_prefix: str
) -> None:
    """A read still waiting on a kept connection when the store closes must hand it to the
    pool when it ends, not keep it on a shelf nobody empties: the app's client would be a
    connection short for good."""
    t0 = start_time()
    record = make_record(now=t0)
    # A cap of 8 keeps exactly one connection for reads.
    client = Redis.from_url(
        f"redis://127.0.0.1:{proxy.port}/0", decode_responses=True, max_connections=8
    )
    try:
        store = RedisStore(client=client, prefix=redis_prefix)
        await store.open()
        await store.create(record, max_sessions=10, now=t0)
        assert await store.get(record.token_digest, now=t0) == record  # kept afterwards
        reads = store._reads
        assert reads is not None
        assert len(reads._idle) == 1
        proxy.stall()
        reading = asyncio.ensure_future(store.get(record.token_digest, now=t0))
        while reads._idle:  # noqa: ASYNC110 - no event to wait for: the read takes it
            await asyncio.sleep(0)

        await store.close()
        proxy.unstall()
        assert await asyncio.wait_for(reading, 10) == record

        # Every connection is free again: as many blocking commands as the cap allows.
        await asyncio.wait_for(
            asyncio.gather(
                *(client.blpop([redis_prefix + "nothing"], timeout=0.01) for _ in range(8))
            ),
            10,
        )
    finally:
        await client.aclose()


@pytest.mark.parametrize("server", ["single", "cluster"])
async def test_a_burst_of_calls_is_not_capped_without_max_connections(
    request: pytest.FixtureRequest, redis_prefix: str, server: str
) -> None:
    """``None`` means no cap, as documented: left to redis-py, its pool allowed 100 (a
    cluster's, per node) and failed the 101st call at once, so a burst of requests on a
    fresh process got 503s."""
    url = request.getfixturevalue("redis_url" if server == "single" else "redis_cluster_url")
    t0 = start_time()
    record = make_record(now=t0)
    async with RedisStore(url, prefix=redis_prefix) as store:
        await store.create(record, max_sessions=10, now=t0)

        listed = await asyncio.gather(
            *(store.list_for_user(record.user_id, now=t0) for _ in range(150))
        )

    assert [len(each) for each in listed] == [1] * 150


@pytest.mark.parametrize("max_connections", [1, 8, 32])
async def test_reads_leave_an_apps_capped_client_connections_to_spare(
    redis_url: str, redis_prefix: str, max_connections: int
) -> None:
    """Reads keep connections of the app's client only where its cap leaves room: the
    app's own commands and the store's writes still find one, even with one allowed,
    and closing the store hands every kept one back."""
    t0 = start_time()
    record = make_record(now=t0)
    client = Redis.from_url(redis_url, decode_responses=True, max_connections=max_connections)
    try:
        async with RedisStore(client=client, prefix=redis_prefix) as store:
            await store.create(record, max_sessions=10, now=t0)
            for _ in range(3):
                await asyncio.gather(
                    *(store.get(record.token_digest, now=t0) for _ in range(max_connections))
                )
                assert await client.ping()
                assert await store.update(record.id, make_update(now=t0), now=t0)
            await client.script_flush()  # an error reply, on a kept connection
            assert await store.get(record.token_digest, now=t0) == record
        # Every connection is free again: as many blocking commands as the cap allows.
        await asyncio.gather(
            *(
                client.blpop([redis_prefix + "nothing"], timeout=0.01)
                for _ in range(max_connections)
            )
        )
    finally:
        await client.aclose()


# -- without the driver ---------------------------------------------------------------------------


def test_stores_import_without_redis_and_the_store_names_the_extra() -> None:
    code = (
        "import sys; sys.modules['redis'] = None\n"
        "import authsessions.stores\n"
        "from authsessions.stores import RedisStore\n"
        "try:\n"
        "    RedisStore('redis://localhost')\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=30
    )
    assert "pip install 'authsessions[redis]'" in result.stdout


async def test_the_log_says_why_the_server_could_not_be_reached(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with refusing_port() as port:
        store = RedisStore(f"redis://127.0.0.1:{port}/0", socket_connect_timeout=1)
        with caplog.at_level("WARNING", logger="authsessions"), pytest.raises(StoreUnavailable):
            await store.open()

    assert f"ConnectionError: Error 111 connecting to 127.0.0.1:{port}" in caplog.text
