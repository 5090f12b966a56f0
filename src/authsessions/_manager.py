"""Session operations outside a request: admin screens, jobs, the command line."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from authsessions._config import SessionConfig
from authsessions._errors import SessionNotFound
from authsessions._records import SessionData, SessionRecord, check_user_id, within_lifetimes
from authsessions._tokens import is_well_formed_session_id
from authsessions.stores._base import Store
from authsessions.stores._checks import require_count, require_str

__all__ = ["SessionManager"]


class SessionManager:
    """Lists and ends sessions by user or id, and sweeps expired ones::

        manager = SessionManager(store)
        for session in await manager.list_for_user("42"):
            print(session.device_name, session.last_active_at)
        await manager.revoke_all("42")           # e.g. after a password reset
        removed = await manager.cleanup_expired()

    The store is opened on first use; closing it stays with its owner.
    """

    def __init__(self, store: Store, config: SessionConfig | None = None) -> None:
        if not isinstance(store, Store):
            raise TypeError(f"store must be a Store, got {type(store).__name__}.")
        if config is not None and not isinstance(config, SessionConfig):
            raise TypeError(f"config must be a SessionConfig, got {type(config).__name__}.")
        self.store = store
        self.config = config if config is not None else SessionConfig()
        # The default ttl need not be the app's (a longer one keeps sessions the default
        # would call idle): only a config given says which sessions the app still takes.
        self._ttl_known = config is not None

    async def _store(self) -> Store:
        if not self.store.is_open:
            await self.store.open()
        return self.store

    async def list_for_user(self, user_id: str) -> list[SessionData]:
        """The user's live sessions, most recently active first (none idle longer than the
        ``ttl`` of a config given, or older than the config's ``absolute_ttl``, whose
        cookies the middleware refuses).

        Raises:
            ValueError: ``user_id`` is not a string a session could have (an int: pass
                ``str(user.id)``).
            StoreUnavailable: the store failed.
        """
        check_user_id(user_id)
        store = await self._store()
        now = time.time()
        records = self._within_lifetimes(await store.list_for_user(user_id, now=now), now)
        # Fresh from the store and dropped here: each record's data can be handed over.
        return [record.to_data(copy_data=False) for record in records]

    def _within_lifetimes(self, records: list[SessionRecord], now: float) -> list[SessionRecord]:
        config = self.config
        ttl = config.ttl_seconds if self._ttl_known else None
        return within_lifetimes(records, ttl, config.absolute_ttl_seconds, now)

    async def _ended_by_lifetimes(self, store: Store, user_id: str, now: float) -> set[str]:
        """The ids of the user's sessions the store keeps but the config's lifetimes have
        ended (shortened, or set, since they were written): not listed, so not found by
        the calls that end sessions either. Asked of the store only when a config can
        end any."""
        if not self._ttl_known and self.config.absolute_ttl_seconds is None:
            return set()
        records = await store.list_for_user(user_id, now=now)
        live = {record.id for record in self._within_lifetimes(records, now)}
        return {record.id for record in records} - live

    async def revoke(self, user_id: str, session_id: str) -> None:
        """End one session of ``user_id``.

        Raises:
            ValueError: ``user_id`` is not a string a session could have.
            TypeError: ``session_id`` is not a string.
            SessionNotFound: no such session, or it belongs to another user, or its
                lifetime under a config given has ended (as :meth:`list_for_user` leaves
                it out).
            StoreUnavailable: the store failed.
        """
        check_user_id(user_id)
        require_str("session_id", session_id)
        store = await self._store()
        now = time.time()
        if (
            not is_well_formed_session_id(session_id)
            or session_id in await self._ended_by_lifetimes(store, user_id, now)
            or not await store.delete(session_id, now=now, user_id=user_id)
        ):
            raise SessionNotFound()

    async def revoke_all(self, user_id: str, *, except_id: str | None = None) -> int:
        """End every session of ``user_id`` (but ``except_id``); returns how many ended,
        counting only those :meth:`list_for_user` would list.

        Raises:
            ValueError: ``user_id`` is not a string a session could have (an int: pass
                ``str(user.id)``; stores would each read it their own way).
            TypeError: ``except_id`` is neither a session id string nor ``None``.
            StoreUnavailable: the store failed.
        """
        check_user_id(user_id)
        if except_id is not None:
            require_str("except_id", except_id)
        store = await self._store()
        now = time.time()
        ended_before = await self._ended_by_lifetimes(store, user_id, now)
        ended_before.discard(except_id or "")
        deleted = await store.delete_for_user(user_id, now=now, except_id=except_id)
        # Gone too, but not counted: they had ended already (another call may have deleted
        # some of them meanwhile, hence the floor).
        return max(0, deleted - len(ended_before))

    async def cleanup_expired(
        self, *, batch_size: int = 1000, on_batch: Callable[[int], object] | None = None
    ) -> int:
        """Delete the sessions that had expired when it started, in batches; returns how
        many were deleted.

        Expired sessions are already rejected on every request; this only
        reclaims space. Each batch is its own short operation and the event
        loop runs between batches, so live traffic keeps being served.
        ``on_batch``, when given, is called with each batch's count as it
        completes (the last one may be 0), e.g. to advance a progress bar::

            await manager.cleanup_expired(on_batch=lambda n: bar.advance(task, n))

        Raises:
            TypeError: ``batch_size`` is not an int, or ``on_batch`` is not callable.
            ValueError: ``batch_size`` is below 1.
            StoreUnavailable: the store failed (batches done so far stay done).
        """
        require_count("batch_size", batch_size)
        if on_batch is not None and not callable(on_batch):
            # Checked first: it would fail only after the first batch was deleted.
            raise TypeError(f"on_batch must be callable, got {type(on_batch).__name__}.")
        store = await self._store()
        # One `now` for the whole run: what expired by the start goes (later expiries wait
        # for the next run), and a store may go on with one pass over its sessions.
        now = time.time()
        total = 0
        while True:
            deleted = await store.delete_expired(now=now, limit=batch_size)
            total += deleted
            if on_batch is not None:
                on_batch(deleted)
            if deleted < batch_size:
                return total
            await asyncio.sleep(0)
