"""A store in Redis or Redis Cluster, through redis-py's asyncio client.

Layout, for a key prefix ``P`` and a user's tag ``T`` (128 bits of the
SHA-256 of the user id, so any id makes a valid, fixed-size hash tag)::

    P{T}:s:<session id>   hash: the record's columns, and one field per data key
    P{T}:u                sorted set: the user's session ids, scored by last activity
    Pd:<token digest>     string "T:<session id>": where the digest's session lives
    Pi:<session id>       string "T": whose session an id is
    Pr:<token digest>     string "T:<session id>": the session rotated away from it

Everything of one user shares the tag, hence one cluster slot, so every
per-user or per-session change is one Lua script: create with its eviction,
a key-level data patch (``HSET``/``HDEL`` of single fields, so no JSON is
decoded in Lua and values read back exactly, and the ``max_data_bytes`` cap is
measured from the fields' texts), rotation, deletes. A cookie's
digest says nothing about its user, so the two pointer keys, hashed to
slots of their own, lead from a digest or an id to the user's slot. They
are hints: each read checks the record's own digest, expiry and owner, so a
stale pointer finds nothing. Pointers are written before the script that
makes them true and removed after the one that makes them false. On a
single server the scripts write and remove them themselves, so a login, an
update and a logout are one round trip each.

A rotation may keep the digest it rotates away from for a while (see
``rotated_away_to``): the hash records it (field ``ra``) and until when
(``ru``), one per session, its latest rotation's, and a third pointer leads
from it to the session for that long. A login over a live session keeps that
session's digest alike, from its create (``replaced``). A hint too: the
answer is yes only while the session is live and still keeps that digest. In
a cluster a rotation writes it after the script, as it makes it true, and a
login with the two pointers it claims before its script (no extra round
trip). During a rolling deploy an
older release reads past the two fields, and its scripts, knowing nothing of
this pointer, leave it to expire as it names a session they deleted.

``get`` is one round trip: on a single server, one script follows the
pointer to the record, sent on one of a few connections the store keeps
from the client's pool between reads (``_redis_connections.py``); in a
cluster the record may sit on another node, so this process remembers where
each digest's session lives (a bounded cache of immutable facts) and reads
the hash directly, paying a second round trip only the first time it sees a
digest.

Every key expires when its session does (``PEXPIRE`` with the session's
remaining life as the caller's clock counts it; a rotated-away digest's
pointer sooner, when its time ends); the index lives as long as
its longest session and each script that walks it drops ids whose hash has
gone. Redis forgets expired sessions by itself, so ``delete_expired`` only
sweeps the indexes: it deletes sessions that are expired by the caller's
clock but not yet by Redis's, and counts index entries of sessions Redis
already dropped as deleted too. The scripts are in ``_redis_scripts.py``.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import secrets
from contextlib import aclosing, contextmanager
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import unquote, urlsplit

from authsessions._records import (
    DeviceType,
    SessionRecord,
    SessionUpdate,
    StoreStats,
    dump_json,
    load_json,
)
from authsessions.stores import _checks
from authsessions.stores import _redis_scripts as lua
from authsessions.stores._base import (
    CreateError,
    DataTooLarge,
    Store,
    failure_detail,
    logger,
    store_unavailable,
    translate_errors,
)
from authsessions.stores._redis_connections import ReadConnections
from authsessions.stores._url import (
    exception_chain,
    malformed_url,
    query_values,
    redact_url,
    tls_loading_error,
    unusable_tls_files,
)

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Iterator, Mapping

    from redis.asyncio import Redis
    from redis.asyncio.cluster import RedisCluster

__all__ = ["RedisStore"]

DEFAULT_PREFIX = "authsessions:"
_CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
# Where redis-py loads the TLS files, as it connects but before any network traffic, and
# the URL options naming them.
_REDIS_TLS_LOADER = "RedisSSLContext.get"
_TLS_FILE_OPTIONS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")
# What redis-py says of a cluster client's server that is not in cluster mode.
_NOT_A_CLUSTER = "Cluster mode is not enabled on this node"
_TAG_LENGTH = 32
_CACHE_SIZE = 10_000
_SCAN_BATCH = 1000
# User indexes one cleanup script sweeps: enough to spread a round trip over several
# sessions, few enough that Redis (one thread) serves live requests between calls. Measured
# on 200,000 expired sessions, one per user, with reads running: 10 gave 19,000 sessions/s
# with reads at 230 µs (p50), 100 gave 37,000/s with reads at 1.2 ms (one index per call,
# with the SCAN restarted on each call, had done 1,500/s).
_SWEEP_BATCH = 10
# What the update script answers when the new token digest is another session's.
_DIGEST_TAKEN = -1
# What the scripts get for the key prefix in a cluster, where they leave the pointers alone.
_CLUSTER_POINTERS = "{"


_NO_CAP = 2**31 - 1
"""The built client's connection cap when none is given: none at all, in effect."""


class RedisStore(Store):
    """Sessions in Redis, or in a Redis Cluster, under a key prefix.

    ::

        store = RedisStore("redis://cache:6379/0")
        store = RedisStore("redis+cluster://node1:6379")   # or cluster=True
        store = RedisStore(client=app_redis)                # the app keeps closing it

    Args:
        url: ``redis://``, ``rediss://``, ``unix://``, or ``redis+cluster://`` /
            ``rediss+cluster://`` for a cluster; its password never appears in
            reprs or errors.
        prefix: prepended to every key, so the store can share a database.
            Braces are refused: they would pin every key to one cluster slot.
        client: a ``redis.asyncio`` ``Redis`` or ``RedisCluster`` built with
            ``decode_responses=True``, to use instead of building one; the store
            never closes it. While open, the store keeps up to four of its pool's
            connections for reads (fewer from a pool capped below 32, none below 8)
            and gives them back on close.
        cluster: ``True`` for a cluster, ``False`` for a single server, ``None``
            to ask the server on open.
        socket_timeout: seconds a command may wait for its reply.
        socket_connect_timeout: seconds to establish a connection.
        max_connections: cap on the built client's connections (``None``: no cap, but
            the server's ``maxclients``); a call beyond it fails at once with
            ``StoreUnavailable``. A URL's ``?max_connections=`` sets it too.

    A failed command is not retried: the caller gets
    :class:`~authsessions.StoreUnavailable` once the timeouts pass.

    Raises:
        ImportError: redis-py is not installed.
        TypeError: a timeout that is not a number.
        ValueError: neither ``url`` nor ``client``, a malformed URL, a client that
            returns bytes, a prefix with braces, a timeout that is not positive and
            finite, or an option in the URL that redis-py does not take.
    """

    counts_expired_sessions = False  # Redis drops expired sessions by itself
    _bound_to_loop = True  # redis-py's connections belong to the loop that opened them

    def __init__(
        self,
        url: str | None = None,
        *,
        prefix: str = DEFAULT_PREFIX,
        client: Redis | RedisCluster | None = None,
        cluster: bool | None = None,
        socket_timeout: float = 2.0,
        socket_connect_timeout: float = 2.0,
        max_connections: int | None = None,
    ) -> None:
        self._driver = _import_redis()
        if (url is None) == (client is None):
            raise ValueError("RedisStore needs a url or a client (exactly one of them).")
        if "{" in prefix or "}" in prefix:
            raise ValueError(f"the key prefix must not contain braces, got {prefix!r}.")
        _checks.require_seconds("socket_timeout", socket_timeout)
        _checks.require_seconds("socket_connect_timeout", socket_connect_timeout)
        self._shown_url = "<app client>"
        if url is not None:
            scheme, separator, rest = url.partition("://")
            if scheme.lower() in _CLUSTER_SCHEMES:
                url, cluster = f"{_CLUSTER_SCHEMES[scheme.lower()]}{separator}{rest}", True
            self._shown_url = redact_url(f"{scheme}{separator}{rest}")  # as given
            self._check_url(url, shown_as=self._shown_url)
            if not cluster:  # a cluster's URL may carry options of RedisCluster's own
                self._check_url_options(url)
        elif client is not None:
            if not client.get_encoder().decode_responses:
                raise ValueError("RedisStore needs a client built with decode_responses=True.")
            cluster = isinstance(client, self._driver.RedisCluster)
        self._url = url
        self._given_client = client
        self._cluster = cluster
        self.prefix = prefix
        self._client_options: dict[str, Any] = {
            "socket_timeout": socket_timeout,
            "socket_connect_timeout": socket_connect_timeout,
            "max_connections": max_connections,
            "decode_responses": True,
            # One attempt: a retried script may already have run (a create would then
            # refuse its own session); failing fast gives the caller its 503 promptly.
            "retry": self._driver.Retry(self._driver.NoBackoff(), 0),
        }
        if self._driver.MaintNotificationsConfig is not None:
            # With maintenance notifications on (redis-py's default since 7), the pool
            # hands out a connection the server closed while it sat idle (its timeout, a
            # restart) without the check that would reconnect it: with no retry, the
            # command fails. Off, the pool checks each connection as it takes it.
            self._client_options["maint_notifications_config"] = (
                self._driver.MaintNotificationsConfig(enabled=False)
            )
        if max_connections is None:
            # No cap, as said: redis-py's own default (100 since 6, per cluster node) made a
            # burst of requests on a fresh process fail at once with 503s. An int, which
            # RedisCluster wants.
            self._client_options["max_connections"] = _NO_CAP
        if url is not None and cluster:
            # RedisCluster takes options of its own, and refuses any other only as it is
            # built: built here unconnected, not first at open as its own TypeError.
            try:
                self._build(cluster=True)
            except TypeError as exc:
                raise ValueError(
                    f"the Redis URL has an option redis-py does not take: {exc}"
                ) from None
            except self._driver.RedisClusterException as exc:
                # A database number, say, which a cluster has only one of: a ValueError,
                # as the middleware refuses such a URL at startup, saying why.
                raise ValueError(f"the Redis cluster URL is refused: {exc}") from None
        self._errors = (self._driver.RedisError, self._driver.RedisClusterException, OSError)
        self._client: Redis | RedisCluster | None = None
        self._reads: ReadConnections | None = None  # a single server's per-request reads
        # Where sessions live, learnt from pointers: never changes for a digest or an id.
        self._digest_locations: dict[str, tuple[str, str]] = {}
        self._id_tags: dict[str, str] = {}
        # delete_expired's pass over the user indexes, kept between calls with the same
        # `now`: each goes on where the last one stopped, and a pass ends with its SCAN.
        self._sweep: AsyncGenerator[str] | None = None
        self._sweep_pending: list[str] = []
        self._sweep_now: float | None = None
        self._sweep_lock = asyncio.Lock()  # made again at each opening: it binds to a loop

    def _check_url(self, url: str, *, shown_as: str) -> None:
        """Refuse a URL redis-py cannot parse as :func:`malformed_url` (redis-py's own
        message may quote the password), and one whose database is no number.
        """
        try:
            options = self._driver.parse_url(url)
        except ValueError:
            raise malformed_url("Redis", shown_as, "redis://[user:password@]host:port/db") from None
        # redis-py reads the path as the database number, and takes database 0 for a path
        # that is none: redis://cache/sessions would share database 0 with anything.
        parts = urlsplit(url)
        database = unquote(parts.path).removeprefix("/").removesuffix("/")
        if parts.scheme in ("redis", "rediss") and database:
            one_number = "/" not in database  # redis-py read /1/2 as database 12
            if one_number and "db" not in options:
                try:
                    int(database)
                except ValueError:
                    one_number = False
            if not one_number:
                raise ValueError(
                    f"the Redis URL {shown_as} names a database that is not a number: "
                    "expected redis://host:port/0 (or no path, for database 0)."
                )
        for name in ("socket_timeout", "socket_connect_timeout"):
            seconds = options.get(name)
            # 0: every call timed out at once; inf (or nan): a silent server held it for ever.
            if seconds is not None and not 0 < seconds < math.inf:
                raise ValueError(
                    f"the Redis URL {shown_as} sets {name} to {seconds}: give a number of "
                    "seconds above 0, or leave it out."
                )

    def _check_url_options(self, url: str) -> None:
        """Refuse, here, an option in ``url`` that redis-py would only reject as it first
        connects (with a ``TypeError`` of its own), by building a connection unconnected.
        """
        pool = self._driver.Redis.from_url(url).connection_pool
        try:
            pool.connection_class(**pool.connection_kwargs)
        except TypeError as exc:
            raise ValueError(f"the Redis URL has an option redis-py does not take: {exc}") from None

    def __repr__(self) -> str:
        where = redact_url(self._url) if self._url is not None else "<app client>"
        return f"RedisStore({where!r}, prefix={self.prefix!r})"

    @property
    def is_cluster(self) -> bool:
        """Whether the store talks to a Redis Cluster (known once open)."""
        return bool(self._cluster)

    # -- opening -------------------------------------------------------------------

    async def _open(self) -> None:
        with translate_errors("Redis", *self._errors), self._refusing_what_no_retry_mends():
            client = self._given_client or self._build(cluster=bool(self._cluster))
            try:
                if self._cluster is None and not await self._is_a_cluster(client):
                    self._cluster = False
                elif self._cluster is None:
                    await client.aclose()
                    self._cluster, client = True, self._build(cluster=True)
                await client.ping()
                await self._warn_if_evicting(client)
            except BaseException:
                if client is not self._given_client:
                    await client.aclose()
                raise
        self._client = client
        self._sweep_lock = asyncio.Lock()
        if not self._cluster:
            self._reads = ReadConnections(
                cast("Redis", client).connection_pool,
                reply_error=self._driver.ResponseError,
                connection_errors=(self._driver.ConnectionError, OSError),
            )
        register = client.register_script
        self._create = register(lua.LUA_HELPERS + lua.CREATE)
        self._update = register(lua.LUA_HELPERS + lua.UPDATE)
        self._delete = register(lua.LUA_HELPERS + lua.DELETE)
        self._delete_for_user = register(lua.LUA_HELPERS + lua.DELETE_FOR_USER)
        self._list = register(lua.RECORD_JSON + lua.LIST)
        self._delete_expired = register(lua.LUA_HELPERS + lua.DELETE_EXPIRED)
        self._follow = register(lua.RECORD_JSON + lua.FOLLOW)
        self._read = register(lua.RECORD_JSON + lua.READ)
        self._rotated_away = register(lua.KEEPS_ROTATED_AWAY + lua.ROTATED_AWAY)
        self._keeps_rotated_away = register(lua.KEEPS_ROTATED_AWAY + lua.KEEPS_ROTATED_AWAY_ON)

    @contextmanager
    def _refusing_what_no_retry_mends(self) -> Iterator[None]:
        """Name a mistake in the URL the first connection shows, which no retry mends: as
        an outage every request was a 503, logged with no word of the cause. A TLS file
        redis-py cannot load ("Error 2 connecting to host:port"), or a cluster URL for a
        server not in cluster mode.
        """
        try:
            yield
        except (self._driver.RedisError, self._driver.RedisClusterException, OSError) as exc:
            if self._url is None:
                raise
            if any(str(seen) == _NOT_A_CLUSTER for seen in exception_chain(exc)):
                raise ValueError(
                    f"the Redis server of {self._shown_url} is not in cluster mode: name it "
                    "with redis:// (or rediss://), not redis+cluster://, and without "
                    "cluster=True."
                ) from None
            loading = tls_loading_error(exc, _REDIS_TLS_LOADER)
            if loading is None:
                raise
            given = query_values(self._url)
            named = [(option, given[option]) for option in _TLS_FILE_OPTIONS if given.get(option)]
            raise unusable_tls_files("Redis", self._url, named, loading) from None

    async def _warn_if_evicting(self, client: Redis | RedisCluster) -> None:
        """Say so where the server evicts keys once full: any of a session's keys can go
        (they all expire, so even a ``volatile-*`` policy takes them), and then a logout
        everywhere or the per-user limit misses sessions whose index went, while their
        tokens still work. ``INFO`` refused to the app's user says nothing."""
        try:
            reply: dict[str, Any] = await client.info("memory")
        except self._driver.ResponseError:  # refused to the app's user, or by a proxy
            return
        # A cluster's answer is each node's, by node.
        nodes = [reply] if "maxmemory_policy" in reply else list(reply.values())
        for node in nodes:
            policy = node.get("maxmemory_policy", "noeviction")
            if node.get("maxmemory") and policy != "noeviction":
                logger.warning(
                    "the Redis server of %s evicts keys once full (maxmemory-policy %s): "
                    "sessions, their pointers or a user's index can vanish, and a logout "
                    "everywhere or the per-user session limit then misses sessions that "
                    "still sign in. Set maxmemory-policy noeviction (a full server then "
                    "refuses writes, answered 503), or give sessions a server of their own.",
                    self._shown_url,
                    policy,
                )
                return

    async def _is_a_cluster(self, client: Redis | RedisCluster) -> bool:
        """Whether the server is a cluster node, asked with ``INFO``; a user refused it (as
        Redis advises for an app's user: ``-@dangerous``) is asked with ``CLUSTER INFO``,
        which a server not in a cluster refuses as such."""
        try:
            return bool((await client.info("cluster")).get("cluster_enabled"))
        except self._driver.NoPermissionError:
            pass
        try:
            await client.execute_command("CLUSTER INFO")
        except self._driver.NoPermissionError:
            raise
        except self._driver.ResponseError:
            return False  # "This instance has cluster support disabled"
        return True

    def _build(self, *, cluster: bool) -> Redis | RedisCluster:
        assert self._url is not None
        factory = self._driver.RedisCluster if cluster else self._driver.Redis
        client: Redis | RedisCluster = factory.from_url(self._url, **self._client_options)
        return client

    def _forget_connections(self) -> None:
        self._drop_sweep()  # a cleanup call in progress fails on the closed client
        self._client = self._reads = None
        self._digest_locations.clear()
        self._id_tags.clear()

    async def _close(self) -> None:
        client, reads = self._client, self._reads
        self._forget_connections()
        if reads is not None:
            with translate_errors("Redis", *self._errors):
                await reads.close()  # a client the app gave gets its connections back
        if client is not None and client is not self._given_client:
            with translate_errors("Redis", *self._errors):
                await client.aclose()

    def _require_client(self) -> Redis | RedisCluster:
        if self._client is None:
            raise self._closed_error()
        return self._client

    # -- keys ------------------------------------------------------------------------

    def _session_prefix(self, tag: str) -> str:
        return f"{self.prefix}{{{tag}}}:s:"

    def _index(self, tag: str) -> str:
        return f"{self.prefix}{{{tag}}}:u"

    def _answer(self, tag: str) -> str:
        """A key of one call's own, in ``tag``'s slot, where a delete keeps its answer for a
        client's retry (see ``_redis_scripts.RETRY_ANSWER_MS``)."""
        return f"{self.prefix}{{{tag}}}:a:{secrets.token_hex(8)}"

    def _digest_key(self, digest: str) -> str:
        return f"{self.prefix}d:{digest}"

    def _id_key(self, session_id: str) -> str:
        return f"{self.prefix}i:{session_id}"

    def _rotated_away_key(self, digest: str) -> str:
        return f"{self.prefix}r:{digest}"

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
        self._require_client()
        tag = _tag(record.user_id)
        ttl = _ttl_ms(record.expires_at, now)
        prefix = self._session_prefix(tag)
        keys = [prefix + record.id, self._index(tag)]
        fields, kept_ms = _fields(record), 0
        if replaced is not None:
            # Kept as a rotation's update keeps the digest it rotates away from.
            fields += ["ra", replaced[0], "ru", replaced[1]]
            kept_ms = _kept_ms(replaced[1], now, ttl)
        args = [now, ttl, max_sessions, prefix, record.id, record.last_active_at,
                self._pointer_prefix, record.token_digest, tag,
                kept_ms if kept_ms and not self._cluster else "", *fields]  # fmt: skip
        with translate_errors("Redis", *self._errors):
            # On a single server the script claims the pointers itself: one round trip.
            pointers = (
                await self._claim_pointers(record, tag, ttl, replaced, kept_ms)
                if self._cluster
                else ()
            )
            evicted = await self._create(keys=keys, args=args)
            if evicted is None:
                await self._unlink(pointers)
                raise CreateError(record.id)
            await self._drop_pointers(evicted)
        self._remember(record.token_digest, tag, record.id)

    async def _claim_pointers(
        self,
        record: SessionRecord,
        tag: str,
        ttl: int,
        replaced: tuple[str, float] | None,
        kept_ms: int,
    ) -> tuple[str, ...]:
        """In a cluster, where they live on other nodes: the new session's two pointers,
        claimed before its script runs, so that a colliding digest or id fails before
        anything of the user's changes. A login's over a live session writes the pointer of
        the digest it keeps as rotated away from in the same round trip (a hint: until the
        script, the session it names keeps nothing); a refused create removes it with the
        others, as nothing else names that digest (the session holding it was deleted).
        """
        pointers: tuple[str, ...] = (self._digest_key(record.token_digest), self._id_key(record.id))
        async with self._require_client().pipeline(transaction=False) as pipe:
            pipe.set(pointers[0], f"{tag}:{record.id}", nx=True, px=ttl)
            pipe.set(pointers[1], tag, nx=True, px=ttl)
            if replaced is not None and kept_ms:
                pointers += (self._rotated_away_key(replaced[0]),)
                pipe.set(pointers[2], f"{tag}:{record.id}", px=kept_ms)
            claimed = await pipe.execute()
        if not all(claimed):
            await self._unlink(key for key, ok in zip(pointers, claimed, strict=True) if ok)
            raise CreateError(record.id)
        return pointers

    async def get(self, token_digest: str, *, now: float) -> SessionRecord | None:
        # Every authenticated request runs this: no context managers of our own here.
        client = self._require_client()
        known = self._digest_locations.get(token_digest)
        keys: tuple[str, ...]
        for attempt in (1, 2):
            location = known
            try:
                if location is None and not self._cluster:
                    script, keys = self._follow, (self._digest_key(token_digest), self.prefix)
                else:
                    if location is None:
                        digest_key = self._digest_key(token_digest)
                        pointer = cast("str | None", await client.get(digest_key))
                        if pointer is None:
                            return None
                        location = _location(pointer)
                    script, keys = self._read, (self._session_prefix(location[0]) + location[1],)
                try:
                    # EVALSHA itself: the Script object's call adds layers, and an import.
                    if self._reads is not None:
                        text = await self._reads.read("EVALSHA", script.sha, 1, *keys)
                    else:
                        text = await client.execute_command("EVALSHA", script.sha, 1, *keys)
                except self._driver.NoScriptError:  # a restarted or flushed server
                    text = await script(keys=keys[:1], args=keys[1:])
                break
            except self._errors as exc:
                # A cluster node's pool hands out, unchecked, connections the node closed
                # while they sat idle (its timeout, a restart); the client drops one that
                # fails. Reads change nothing: once more, on another.
                if attempt == 1 and self._cluster and isinstance(exc, self._driver.ConnectionError):
                    continue
                raise store_unavailable("Redis", exc)  # noqa: B904 (it chains itself)
        row = load_json(text) if text is not None else None
        if row is None or row[2] != token_digest or float(row[11]) <= now:
            self._digest_locations.pop(token_digest, None)
            return None
        if row[0] is not None:  # the pointer FOLLOW went by
            location = _location(row[0])
        if location is not None and (known is None or row[1] not in self._id_tags):
            self._remember(token_digest, *location)
        return _record(row)

    async def update(self, session_id: str, changes: SessionUpdate, *, now: float) -> bool:
        now = _checks.update_args(session_id, changes, now)
        client, new_digest = self._require_client(), changes.token_digest
        # _checks.update_args saw that a new digest comes with times.
        ttl = None if changes.expires_at is None else _ttl_ms(changes.expires_at, now)
        removed = ["d:" + dump_json(key) for key in changes.removed_keys]
        # Encoded before any command: a value no JSON holds is refused with nothing written
        # (a cluster's claim of the new digest's pointer would have stayed behind).
        data_fields = _data_fields(changes.set_keys)
        in_cluster, cap = bool(self._cluster), changes.size_cap
        expected, until = changes.expected_token_digest, changes.rotated_away_until
        with translate_errors("Redis", *self._errors):
            tag = await self._tag_of(session_id)
            if tag is None:
                return False
            session_key = self._session_prefix(tag) + session_id
            if new_digest is not None and in_cluster:
                pointer, digest_key = f"{tag}:{session_id}", self._digest_key(new_digest)
                if not await client.set(digest_key, pointer, nx=True, px=ttl):
                    if await client.get(digest_key) != pointer:
                        # Taken; but a session expired, or not under the digest it must
                        # hold, is just gone, as the script says.
                        expires_at, stored_digest = await client.hmget(session_key, ["ea", "td"])
                        if (
                            expires_at is None
                            or float(expires_at) <= now
                            or expected not in (None, stored_digest)
                        ):
                            return False
                        raise CreateError(session_id)
                    if await client.hget(session_key, "td") == new_digest:
                        # The digest it holds: no rotation, and no clash.
                        new_digest = until = None
                    # Else this call's own claim, which a client's retry after a lost reply
                    # found taken: the rotation goes on.
            # _checks.update_args saw that a rotation's time comes with a new digest.
            kept_ms = 0 if until is None else _kept_ms(until, now, cast("int", ttl))
            reply: str | int | list[Any] | None = await self._update(
                keys=[session_key, self._index(tag)],
                args=[now, _or_empty(ttl), session_id, _or_empty(changes.last_active_at),
                      _or_empty(changes.expires_at),
                      new_digest or "", self._pointer_prefix, tag,
                      "" if cap is None else cap, expected or "", _or_empty(until), kept_ms,
                      _or_empty(changes.touch_if_last_active_by),
                      len(removed), *removed, *data_fields],
            )  # fmt: skip
            old_digest: str | int | None
            kept_before, times_kept = None, False
            if not isinstance(reply, list):
                old_digest = reply
            elif len(reply) == 2:  # a rotation keeping the digest it left
                old_digest, kept_before = reply
            else:  # last active since the cutoff: the times stayed as stored
                old_digest, kept_before, ttl = reply[0], reply[1], int(reply[2])
                times_kept = True
                if new_digest is None and not in_cluster:
                    return True  # the script renewed the pointers with the times
                # In a cluster, the pointers follow the session's own TTL all the same:
                # this may be a retry whose first run moved the times, but never got here.
            if not isinstance(old_digest, str):  # not live (None), taken, or refused (its size)
                if old_digest == _DIGEST_TAKEN:  # only on a single server: nothing to unlink
                    raise CreateError(session_id)
                if new_digest is not None and in_cluster:
                    await self._unlink([self._digest_key(new_digest)])
                if old_digest is not None and cap is not None:
                    raise DataTooLarge(old_digest, cap)
                self._id_tags.pop(session_id, None)
                return False
            if in_cluster and ttl is not None:
                # The pointers follow the session's new expiry; a rotated-out digest goes.
                # Until a later touch renews them, pointers that missed this keep their
                # earlier expiry; a rotated-out digest left behind names nothing live.
                # A digest kept as rotated away from gains its pointer here, after the
                # script that keeps it (missed, its token is answered as a revoked one),
                # and the one kept before loses its own (left, it names what the session
                # no longer keeps, and expires with that one's time).
                with self._after_the_script(
                    "the pointers of a Redis session keep their earlier expiry"
                ):
                    async with client.pipeline(transaction=False) as pipe:
                        pipe.pexpire(self._id_key(session_id), ttl)
                        if new_digest is None:
                            pipe.pexpire(self._digest_key(old_digest), ttl)
                        else:
                            pipe.delete(self._digest_key(old_digest))
                            if times_kept:  # claimed with this call's expiry, not the kept one
                                pipe.pexpire(self._digest_key(new_digest), ttl)
                        if kept_before:
                            pipe.delete(self._rotated_away_key(kept_before))
                        if kept_before is not None and kept_ms:
                            pipe.set(
                                self._rotated_away_key(old_digest),
                                f"{tag}:{session_id}",
                                px=kept_ms,
                            )
                        await pipe.execute()
        if new_digest is not None:
            self._digest_locations.pop(old_digest, None)
        return True

    async def delete(
        self,
        session_id: str,
        *,
        now: float,
        user_id: str | None = None,
        token_digest: str | None = None,
    ) -> bool:
        now = _checks.delete_args(session_id, user_id, token_digest, now)
        self._require_client()
        with translate_errors("Redis", *self._errors):
            tag = _tag(user_id) if user_id is not None else await self._tag_of(session_id)
            if tag is None:
                return False
            deleted = await self._delete(
                keys=[self._session_prefix(tag) + session_id, self._index(tag), self._answer(tag)],
                args=[session_id, "0" if user_id is None else "1", user_id or "",
                      self._pointer_prefix, now, token_digest or ""],
            )  # fmt: skip
            if deleted is None:
                return False
            digest, live, kept = deleted
            await self._drop_pointers([session_id, digest, kept])
        return int(live) == 1

    async def rotated_away_to(self, token_digest: str, *, now: float) -> str | None:
        """One script on a single server; in a cluster, where the session may sit on
        another node than the pointer, two round trips (asked only for unknown tokens).
        """
        now = _checks.rotated_away_to_args(token_digest, now)
        client = self._require_client()
        key = self._rotated_away_key(token_digest)
        with translate_errors("Redis", *self._errors):
            if not self._cluster:
                found = await self._rotated_away(keys=[key], args=[self.prefix, token_digest, now])
                return None if found is None else str(found)
            pointer = cast("str | None", await self._read_once_more_if_closed(client.get, key))
            if pointer is None:
                return None
            tag, session_id = _location(pointer)
            session_key = self._session_prefix(tag) + session_id
            found = await self._read_once_more_if_closed(
                self._keeps_rotated_away, keys=[session_key], args=[token_digest, now]
            )
        return None if found is None else session_id

    async def _read_once_more_if_closed(
        self, read: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any
    ) -> Any:
        """``read(*args, **kwargs)``, once more after a ConnectionError: as in :meth:`get`,
        a cluster node's pool hands out, unchecked, connections the node closed while they
        sat idle.
        """
        try:
            return await read(*args, **kwargs)
        except self._driver.ConnectionError:
            return await read(*args, **kwargs)

    async def delete_for_user(
        self, user_id: str, *, now: float, except_id: str | None = None
    ) -> int:
        now = _checks.delete_for_user_args(user_id, except_id, now)
        self._require_client()
        tag = _tag(user_id)
        with translate_errors("Redis", *self._errors):
            live, *deleted = await self._delete_for_user(
                keys=[self._index(tag), self._answer(tag)],
                args=[self._session_prefix(tag), except_id or "", self._pointer_prefix, now],
            )
            await self._drop_pointers(deleted)
        return int(live)

    async def list_for_user(self, user_id: str, *, now: float) -> list[SessionRecord]:
        now = _checks.list_for_user_args(user_id, now)
        self._require_client()
        tag = _tag(user_id)
        with translate_errors("Redis", *self._errors):
            hashes = await self._list(keys=[self._index(tag)], args=[self._session_prefix(tag)])
        records = [_record(load_json(text)) for text in hashes]
        live = [record for record in records if record.expires_at > now]
        live.sort(key=lambda record: (record.last_active_at, record.created_at), reverse=True)
        return live

    async def delete_expired(self, *, now: float, limit: int = 1000) -> int:
        """Sweep the user indexes, many per script call, going on from where the previous
        call with the same ``now`` stopped; see :meth:`Store.delete_expired`.
        """
        now = _checks.delete_expired_args(now, limit)
        client = self._require_client()
        removed = 0
        async with self._sweep_lock:  # one pass at a time: its SCAN is shared
            if now != self._sweep_now:
                # Indexes swept earlier may hold sessions expired by this `now`: start over.
                await self._end_sweep()
                self._sweep_now = now
            if self._sweep is None and not self._sweep_pending:  # a new pass
                pattern = f"{_glob_escape(self.prefix)}{{{'?' * _TAG_LENGTH}}}:u"
                scan = client.scan_iter(match=pattern, count=_SCAN_BATCH)
                self._sweep = cast("AsyncGenerator[str]", scan)
            try:
                with translate_errors("Redis", *self._errors):
                    while removed < limit and (indexes := await self._next_indexes()):
                        result = await self._delete_expired(
                            keys=indexes, args=[now, limit - removed, self._pointer_prefix]
                        )
                        removed += int(result[0])
                        # Indexes the limit cut short come first in the next call.
                        self._sweep_pending[:0] = indexes[int(result[1]) :]
                        await self._drop_pointers(result[2:], or_raise=True)
            except BaseException:
                await self._end_sweep()
                raise
        return removed

    async def _next_indexes(self) -> list[str]:
        """The pass's next user indexes, as many as one script may name: in a cluster one
        (each index hashes to its own slot), else ``_SWEEP_BATCH``; empty once it is over.
        """
        wanted = 1 if self._cluster else _SWEEP_BATCH
        indexes, self._sweep_pending = self._sweep_pending[:wanted], self._sweep_pending[wanted:]
        while self._sweep is not None and len(indexes) < wanted:
            try:
                indexes.append(await anext(self._sweep))
            except StopAsyncIteration:
                self._sweep = None
        return indexes

    async def _end_sweep(self) -> None:
        if (sweep := self._drop_sweep()) is not None:
            await sweep.aclose()

    def _drop_sweep(self) -> AsyncGenerator[str] | None:
        sweep, self._sweep, self._sweep_pending = self._sweep, None, []
        return sweep

    async def stats(self, *, now: float) -> StoreStats:
        """Counts from reading every session: O(sessions) time and memory, for admin use only.

        SCANs the prefix's session keys (never ``KEYS``; in a cluster, on every
        primary), ``_SCAN_BATCH`` at a time, and reads each batch's owner, device
        type and expiry in one pipelined round trip. Keys and users seen are
        remembered (SCAN may return a key twice). Not a snapshot: sessions
        created or ended meanwhile may or may not count. ``expired_sessions`` is
        ``None``: Redis drops expired sessions itself, so what cleanup would
        remove is unknown.

        Raises:
            StoreUnavailable: a command failed or timed out.
        """
        now = _checks.require_time("now", now)
        client = self._require_client()
        pattern = f"{_glob_escape(self.prefix)}{{{'?' * _TAG_LENGTH}}}:s:*"
        seen: set[str] = set()
        users: set[str] = set()
        by_type: dict[str, int] = {}
        with translate_errors("Redis", *self._errors):
            scan = cast("AsyncGenerator[str]", client.scan_iter(match=pattern, count=_SCAN_BATCH))
            async with aclosing(scan) as keys:
                batch: list[str] = []
                async for key in keys:
                    if key not in seen:
                        seen.add(key)
                        batch.append(key)
                    if len(batch) == _SCAN_BATCH:
                        await self._tally(batch, now, users, by_type)
                        batch = []
                await self._tally(batch, now, users, by_type)
        return StoreStats(sum(by_type.values()), len(users), by_type, expired_sessions=None)

    async def _tally(
        self, keys: list[str], now: float, users: set[str], by_type: dict[str, int]
    ) -> None:
        """Count the live sessions among ``keys`` into ``users`` and ``by_type``."""
        if not keys:
            return
        async with self._require_client().pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.hmget(key, ["uid", "dt", "ea"])
            rows: list[list[str | None]] = await pipe.execute()
        for user_id, device_type, expires_at in rows:
            # A hash that went between SCAN and HMGET reads as three None.
            if user_id and device_type and expires_at and float(expires_at) > now:
                users.add(user_id)
                by_type[device_type] = by_type.get(device_type, 0) + 1

    # -- pointers and the location cache ---------------------------------------------

    async def _tag_of(self, session_id: str) -> str | None:
        tag = self._id_tags.get(session_id)
        if tag is None:
            tag = cast("str | None", await self._require_client().get(self._id_key(session_id)))
            if tag is not None:
                _put(self._id_tags, session_id, tag)
        return tag

    def _remember(self, digest: str, tag: str, session_id: str) -> None:
        _put(self._digest_locations, digest, (tag, session_id))
        _put(self._id_tags, session_id, tag)

    @property
    def _pointer_prefix(self) -> str:
        """For the scripts: the key prefix on a single server, where they change the
        pointers themselves; ``"{"`` in a cluster, where the pointers live on other nodes
        (no key prefix holds a brace, and ``""`` is a prefix).
        """
        return _CLUSTER_POINTERS if self._cluster else self.prefix

    async def _drop_pointers(self, ended: list[str], *, or_raise: bool = False) -> None:
        """Forget the pointers of deleted sessions (a flat list of id, digest, digest
        rotated away from or ``""``, id, ...), and remove them in a cluster (a single
        server's scripts removed them already), as far as the nodes holding them answer;
        ``or_raise``: a failure is raised, for a cleanup that should stop rather than meet
        the same silent node batch after batch.
        """
        keys = []
        for session_id, digest, kept in zip(ended[::3], ended[1::3], ended[2::3], strict=True):
            keys += [self._id_key(session_id), self._digest_key(digest)]
            if kept:
                keys.append(self._rotated_away_key(kept))
            self._id_tags.pop(session_id, None)
            self._digest_locations.pop(digest, None)
        if self._cluster and or_raise:
            await self._unlink(keys)
        elif self._cluster:
            # A pointer left behind names nothing live (``get`` checks the digest the
            # session holds, ``rotated_away_to`` the one it keeps) and expires when the
            # session, or the time it kept a digest for, would have.
            count = len(ended) // 3
            with self._after_the_script(
                f"the pointers of {count} ended Redis sessions will expire instead"
            ):
                await self._unlink(keys)

    @contextmanager
    def _after_the_script(self, outcome: str) -> Iterator[None]:
        """Log, not raise, the failure of the pointer work that follows a script that
        succeeded in a cluster: what the script did stands, and a 503 would say it did not.
        """
        try:
            yield
        except self._errors as exc:
            logger.warning("%s: %s", outcome, failure_detail(exc))

    async def _unlink(self, keys: Iterable[str]) -> None:
        if keys := list(keys):
            await self._require_client().delete(*keys)


def _import_redis() -> Any:
    try:
        from types import SimpleNamespace

        from redis.asyncio import Redis
        from redis.asyncio.cluster import RedisCluster
        from redis.asyncio.connection import parse_url
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff
        from redis.exceptions import (
            ConnectionError,
            NoPermissionError,
            NoScriptError,
            RedisClusterException,
            RedisError,
            ResponseError,
        )
    except ImportError as exc:
        raise ImportError("RedisStore needs redis-py: pip install 'authsessions[redis]'") from exc
    maint_notifications_config: Any
    try:
        from redis.maint_notifications import MaintNotificationsConfig

        maint_notifications_config = MaintNotificationsConfig
    except ImportError:  # redis-py before 7: no such notifications
        maint_notifications_config = None
    return SimpleNamespace(
        Redis=Redis, RedisCluster=RedisCluster, Retry=Retry, NoBackoff=NoBackoff,
        RedisError=RedisError, RedisClusterException=RedisClusterException,
        NoScriptError=NoScriptError, ResponseError=ResponseError, ConnectionError=ConnectionError,
        NoPermissionError=NoPermissionError, parse_url=parse_url,
        MaintNotificationsConfig=maint_notifications_config,
    )  # fmt: skip


def _put(cache: dict[str, Any], key: str, value: Any) -> None:
    # Oldest out first: a forgotten location costs one extra read, once.
    if len(cache) >= _CACHE_SIZE and key not in cache:
        del cache[next(iter(cache))]
    cache[key] = value


def _tag(user_id: str) -> str:
    return hashlib.sha256(user_id.encode()).hexdigest()[:_TAG_LENGTH]


def _or_empty(value: float | None) -> float | str:
    return "" if value is None else value


# The longest TTL given to a key (about 285,000 years): Redis refuses an expiry past a
# 64-bit count of milliseconds, and did so half-way through a script, after its writes.
_MAX_TTL_MS = 2**53


def _ttl_ms(expires_at: float, now: float) -> int:
    # Counted from the caller's clock, so a clock that differs from Redis's (or a test's
    # own clock) still gives the key exactly the session's remaining life.
    return min(max(1, math.ceil((expires_at - now) * 1000)), _MAX_TTL_MS)


def _kept_ms(until: float, now: float, ttl: int) -> int:
    # No longer than the session lives: past that, the pointer would name nothing.
    return max(0, min(math.ceil((until - now) * 1000), ttl))


def _location(pointer: str) -> tuple[str, str]:
    tag, _, session_id = pointer.partition(":")
    return tag, session_id


def _glob_escape(text: str) -> str:
    return "".join("\\" + char if char in "*?[]\\" else char for char in text)


def _data_fields(data: Mapping[str, Any]) -> list[str]:
    # Field names are JSON too: any key, even one with a lone surrogate, is plain ASCII.
    return [
        text for key, value in data.items() for text in ("d:" + dump_json(key), dump_json(value))
    ]


def _fields(record: SessionRecord) -> list[Any]:
    fields: list[Any] = [
        "id", record.id, "uid", record.user_id, "td", record.token_digest,
        "dn", record.device_name, "dt", record.device_type, "fp", record.fingerprint,
        "ca", record.created_at, "la", record.last_active_at, "ea", record.expires_at,
    ]  # fmt: skip
    if record.ip_address is not None:
        fields += ["ip", record.ip_address]
    if record.user_agent is not None:
        fields += ["ua", record.user_agent]
    return fields + _data_fields(record.data)


def _record(row: list[Any]) -> SessionRecord:
    """A session from a RECORD_JSON text's array (decoded), positionally."""
    return SessionRecord(
        row[1], row[2], row[3], row[4], row[5], row[6], cast(DeviceType, row[7]), row[8],
        row[12], float(row[9]), float(row[10]), float(row[11]),
    )  # fmt: skip
