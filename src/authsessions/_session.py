"""The request-scoped session handle and the changes it holds until the response starts."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Mapping
from dataclasses import replace
from typing import Any, Literal, TypeVar, overload

from starlette.types import Scope

from authsessions._client import client_ip, device_of, user_agent_of
from authsessions._config import SessionConfig
from authsessions._errors import SessionDataError, SessionNotFound, StoreUnavailable, Unauthorized
from authsessions._records import (
    CheckedRecord,
    CheckedUpdate,
    SessionData,
    SessionRecord,
    SessionUpdate,
    check_user_id,
    copy_json,
    data_size,
    to_datetime,
    within_lifetimes,
)
from authsessions._tokens import (
    is_well_formed_session_id,
    new_session_id,
    new_token,
    token_digest,
)
from authsessions._values import MAX_NESTING, plain_json_copy, read_as, require_text
from authsessions.stores._base import CreateError, DataTooLarge, Store
from authsessions.stores._checks import require_str

__all__ = ["SCOPE_KEY", "CookieChange", "Session"]

logger = logging.getLogger("authsessions")

T = TypeVar("T")
D = TypeVar("D")
SCOPE_KEY = "authsessions.session"

_NO_DATA: dict[str, Any] = {}  # never changed: a session without a record takes no writes
_REMOVED = object()  # a key's pending change: removed
# How long a store tells a token rotated away from a revoked one. Requests the browser
# sent before the rotation's answer still carry it, and a cookie cleared in their answer
# could arrive after the new one and sign the user out. Longer than the 60 s proxies
# commonly give a request.
ROTATED_AWAY_NOTICE_SECONDS = 120.0
_CONTAINERS = (list, dict)  # the JSON values a caller could change: get() hands out copies


# What the response must do to the session cookie. Strings, not an Enum: on Python 3.11
# each Enum member lookup costs about 70 ns, and the per-request path makes several.
# "spare": the request's token was rotated away moments ago (see rotated_away_to): the
# cookie is left alone, the browser may hold the new one, and the answer is kept out of
# shared caches as a signed-in user's is (the request may have shown the session's data).
CookieChange = Literal["keep", "set", "clear", "spare"]


class Session:
    """The current request's session, from ``Session.from_request(request)``.

    Reads and ``set``/``remove_key`` are synchronous and touch only memory;
    ``SessionMiddleware`` writes the changed keys when the response starts.
    Everything that must reach the store at once is ``async``::

        async def login(request):
            session = Session.from_request(request)
            user = await check_password(...)
            await session.authenticate(user.id)       # new token, cookie set
            session.set("theme", "dark")              # kept: flushed after the handler
            return RedirectResponse("/", 303)

    Extracting a session does not require a logged-in user: check
    :attr:`is_authenticated` or :attr:`user_id`.
    """

    __slots__ = (
        "_changes",
        "_config",
        "_connection",
        "_cookie_change",
        "_cookie_if_unsent",
        "_data",
        "_flushed",
        "_record",
        "_rotated_to",
        "_store",
        "_token",
        "_turns",
    )

    def __init__(
        self,
        store: Store,
        config: SessionConfig,
        scope: Scope,
        record: SessionRecord | None,
        token: str | None,
        cookie_change: CookieChange,
    ) -> None:
        # Built by SessionMiddleware on every request; apps get it from from_request().
        self._store = store
        self._config = config
        # Not the scope itself: it holds this session, and that cycle would leave every
        # request's scope and session to the garbage collector instead of freeing them.
        # A tuple, not a dict: only a login reads it, and every request builds it.
        self._connection = (scope["type"], scope["headers"], scope.get("client"))
        # The record may be shared with other requests (a store's cache), so it is never
        # changed here: new times or a new token replace it, and the data is copied before
        # a key changes. From here on the data is read from _data, never the record's.
        self._record = record
        self._data: dict[str, Any] = record.data if record is not None else _NO_DATA
        self._token = token
        self._cookie_change = cookie_change
        # Keys set (to their value) or removed (to _REMOVED) in this request, to write.
        self._changes: dict[str, Any] | None = None
        # The response has started (the socket has ended): nothing more can be written.
        self._flushed = False
        self._turns: asyncio.Lock | None = None  # see _turn(); made when first needed
        # (_rotated_to, with the cookie "spare": the session the token was rotated away to;
        # set only then, so that other requests pay nothing for it.)

    def __repr__(self) -> str:
        if self._record is None:
            return "<Session anonymous>"
        return f"<Session id={self._record.id!r} user_id={self._record.user_id!r}>"

    # -- getting one -----------------------------------------------------------

    @classmethod
    def from_scope(cls, scope: Scope) -> Session:
        """The session ``SessionMiddleware`` attached to this ASGI scope.

        Raises:
            RuntimeError: ``SessionMiddleware`` is not installed around this app.
        """
        try:
            session: Session = scope[SCOPE_KEY]
        except KeyError:
            raise RuntimeError(
                "No session on this request: add SessionMiddleware to the app, e.g. "
                "Starlette(middleware=[Middleware(SessionMiddleware)]) or "
                "app.add_middleware(SessionMiddleware). It must wrap whatever reads the "
                "session: first in middleware=[...], or the last add_middleware() call."
            ) from None
        return session

    @classmethod
    def from_request(cls, request: Any) -> Session:
        """The session of a Starlette ``Request`` or ``WebSocket`` (anything with ``.scope``).

        Raises:
            RuntimeError: ``SessionMiddleware`` is not installed around this app.
        """
        try:
            session: Session = request.scope[SCOPE_KEY]
        except KeyError:
            return cls.from_scope(request.scope)  # raises, explaining
        return session

    # -- reading -----------------------------------------------------------------

    @property
    def user_id(self) -> str | None:
        """The authenticated user's id, or ``None``."""
        return self._record.user_id if self._record is not None else None

    @property
    def is_authenticated(self) -> bool:
        """Whether a valid session exists for this request."""
        return self._record is not None

    def current(self) -> SessionData | None:
        """A copy of the whole session, including writes made earlier in this request."""
        return self._current_data() if self._record is not None else None

    @overload
    def get(self, key: str, type: None = None, default: Any = None) -> Any: ...
    @overload
    def get(self, key: str, type: type[T], default: None = None) -> T | None: ...
    @overload
    def get(self, key: str, type: type[T], default: D) -> T | D: ...
    @overload  # a form no type[...] expresses: a union, Optional, Literal
    def get(self, key: str, type: object, default: Any = None) -> Any: ...

    def get(self, key: str, type: Any = None, default: Any = None) -> Any:
        """The value under ``key``, or ``default`` without a session or without the key.

        With ``type``, the value is converted strictly (no "1" to 1):
        ``session.get("cart", type=Cart)`` accepts plain JSON types and, with
        pydantic installed, dataclasses, TypedDicts and models. Mutating a
        returned list or dict changes nothing stored: call :meth:`set`.

        Raises:
            SessionDataError: the stored value does not fit ``type``, or ``key`` is not a
                string (as :meth:`set` says).
        """
        if self._record is None:
            return default
        try:
            value = self._data[key]
        except (KeyError, TypeError):  # TypeError: unhashable
            # Checked only on a miss: every stored key is a string.
            if key.__class__ is not str:
                _plain_key(key)
            return default
        if value.__class__ in _CONTAINERS:
            value = copy_json(value)
        return value if type is None else read_as(value, type, key)

    # -- writing, in memory --------------------------------------------------------

    def set(self, key: str, value: Any) -> None:
        """Store a plain-JSON value under ``key``; written when the response starts.

        Does nothing without a session. Only changed keys are written, so
        concurrent requests writing different keys both keep theirs.

        Raises:
            SessionDataError: ``value`` is not plain JSON, or the session's data
                would exceed ``max_data_bytes``. The session is left unchanged.
            RuntimeError: the response has started (in a background task or a
                streaming body), so the change could no longer be written.
        """
        if self._record is None:
            return
        if self._flushed:
            raise self._too_late("set")
        if key.__class__ is not str:
            key = _plain_key(key)
        if not key.isascii():
            require_text(key, f"session key {key!r}")
        value = plain_json_copy(value, f"the value for session key {key!r}")
        self._check_fits({**self._data, key: value}, f"setting session key {key!r}")
        self._own_data()[key] = value
        self._change(key, value)

    def remove_key(self, key: str) -> None:
        """Remove ``key``; written when the response starts. No-op without a session or key
        (on a WebSocket, the key is removed from the store even when the data the socket
        read as it opened lacked it: another request may have set it since).

        Raises:
            SessionDataError: ``key`` is not a string.
            RuntimeError: the response has started (see :meth:`set`).
        """
        if self._record is None:
            return
        if key.__class__ is not str:
            key = _plain_key(key)
        # A request's data is as fresh as its load: a key it lacks needs no write. A
        # socket's may be hours old, and another request may have set the key since.
        if key not in self._data and self._connection[0] != "websocket":
            return
        if self._flushed:
            raise self._too_late("remove_key")
        self._own_data().pop(key, None)
        self._change(key, _REMOVED)

    # -- acting on the store -------------------------------------------------------

    async def authenticate(self, user_id: str) -> None:
        """Start a new session for ``user_id`` with empty data; see :meth:`authenticate_with`."""
        await self.authenticate_with(user_id, {})

    async def authenticate_with(self, user_id: str, data: Mapping[str, Any]) -> None:
        """Start a new session for ``user_id`` holding ``data``, and set its cookie.

        Any current session is destroyed first, so a token planted before
        login is worthless afterwards (session fixation). When the user then
        has more than ``max_sessions_per_user`` sessions, the least recently
        active ones end, in the same atomic step as the insert.

        Raises:
            SessionDataError: ``data`` is not a mapping of plain JSON, or too large.
            StoreUnavailable: the store failed; the request's cookie is cleared if
                its session had already ended here, and kept otherwise.
            RuntimeError: on a WebSocket, or after the response started (see
                :meth:`set`): no cookie could carry the new token. Nothing changed,
                unless the response started while the store worked: then the new
                session has ended.
        """
        check_user_id(user_id)
        # The plain string, as keys are kept: a subclass (a StrEnum member) lived on in
        # this request and in the memory store, where the others read back a str.
        user_id = str.__str__(user_id)
        if not isinstance(data, Mapping):
            raise SessionDataError(f"session data must be a mapping, got {type(data).__name__}.")
        # Its own dict is one level above the values, each held to set()'s limit.
        initial = plain_json_copy(
            dict(data), "the initial session data", max_nesting=MAX_NESTING + 1
        )
        self._check_fits(initial, "the initial session data")
        async with self._turn():
            self._refuse_cookie_change("authenticate")
            ended: str | None = None  # the digest of the session this login ends
            if (record := self._record) is not None:
                # As for logout: not a session this request's token no longer names
                # (rotated away, by the user who now holds it), whose cookie is spared.
                if await self._end_if_still_named(record):
                    self._end()  # if the new session cannot be made, the ended one's goes
                    ended = record.token_digest
                else:
                    await self._end_found_gone(record)
            if not self._store.is_open:
                await self._store.open()  # a request without a cookie left it unopened
            now = time.time()
            # The browser's requests sent before this login's answer carry the token it
            # replaced: their answers must not clear the new cookie.
            replaced = None if ended is None else (ended, now + ROTATED_AWAY_NOTICE_SECONDS)
            config = self._config
            kind, headers, client = self._connection
            connection: Scope = {"type": kind, "headers": headers, "client": client}
            device = device_of(connection)
            ip_address = client_ip(
                connection,
                config.trusted_networks,
                unix_socket_trusted=config.trusts_unix_socket,
            )
            user_agent = user_agent_of(connection) or None
            for _attempt in range(3):
                token = new_token()
                record = CheckedRecord(
                    id=new_session_id(),
                    token_digest=token_digest(token),
                    user_id=user_id,
                    ip_address=ip_address,
                    user_agent=user_agent,
                    device_name=device.name,
                    device_type=device.type,
                    fingerprint=device.fingerprint,
                    data=initial,
                    created_at=now,
                    last_active_at=now,
                    expires_at=self._expiry(created_at=now, now=now),
                )
                try:
                    await self._store.create(
                        record,
                        max_sessions=config.max_sessions_per_user,
                        now=now,
                        replaced=replaced,
                    )
                except CreateError:  # 2**-128 odds, but never overwrite someone's session
                    continue
                except asyncio.CancelledError:
                    # The store may make it all the same (a thread's work goes on, a server
                    # may have committed), and no response will carry its token.
                    await self._end_unsent(self._end_if_still_named(record), record.id)
                    raise
                self._record = record
                self._data = initial
                self._changes = None  # nothing of an earlier session's goes into this one
                self._token = token
                # What the cookie the request carried needs should no response carry the
                # new one: a spared cookie stays spared (see end_unsent_token).
                self._cookie_if_unsent = "spare" if self._cookie_change == "spare" else "clear"
                self._cookie_change = "set"
                await self._refuse_if_unsent("authenticate")
                return
            raise RuntimeError("could not create a session with a fresh id three times in a row")

    async def rotate(self) -> None:
        """Issue a new token and refresh the expiry, keeping the session id and data.

        Use it after privilege changes. The old token stops working at once.
        Values set earlier in the request are written in the same step; any that
        another task of the request sets while it waits, as the response starts.

        Raises:
            Unauthorized: there is no session (or it ended meanwhile).
            SessionDataError: with what concurrent requests stored meanwhile, the
                values set earlier would exceed ``max_data_bytes``; nothing changed.
            StoreUnavailable: the store failed.
            RuntimeError: on a WebSocket, or after the response started (see
                :meth:`set`), nothing changed (if the response started while the store
                worked, the session has ended); or three new tokens in a row were
                other sessions' (never seen with random tokens; a broken random
                source, say).
        """
        self._require_session()
        self._refuse_cookie_change("rotate")
        async with self._turn():
            await self._rotate()

    async def _rotate(self) -> None:
        self._refuse_cookie_change("rotate")  # again: the response may have started
        now = time.time()
        for _attempt in range(3):
            # Again on each attempt: another task may have ended the session meanwhile.
            record = self._require_session()
            token = new_token()
            digest = token_digest(token)
            # Conditional on the token this request holds: one rotated away meanwhile (a
            # stolen copy's, held open) must not take the session over with one of its own.
            changes = self._pending_update(
                now,
                moves_expiry=True,
                token_digest=digest,
                expected=record.token_digest,
                rotated_away_until=now + ROTATED_AWAY_NOTICE_SECONDS,
            )
            # Keys set while the store works (by another task of this request) are changes
            # still to write; those written now are not, unless the write fails.
            written, self._changes = self._changes, None
            try:
                updated = await self._update(record, changes, now)
            except BaseException as exc:
                self._unwrite(record, written)
                if isinstance(exc, CreateError):
                    continue  # 2**-256 odds, but never take another session's token
                if isinstance(exc, asyncio.CancelledError):
                    # As for a login's: ended while it holds the new token, if it took it.
                    ending = self._store.delete(
                        record.id, now=time.time(), user_id=record.user_id, token_digest=digest
                    )
                    if await self._end_unsent(ending, record.id) and self._record is record:
                        self._end()  # else a handler that goes on still saw it signed in
                raise
            break
        else:
            raise RuntimeError("could not rotate to a fresh token three times in a row")
        if not updated:
            self._unwrite(record, written)  # for _end_found_gone to write, if it may
            await self._end_found_gone(record)
            raise Unauthorized("This session has ended; sign in again.")
        self._record = self._renewed(record, changes, token_digest=digest)
        self._token = token
        self._cookie_change = "set"
        await self._refuse_if_unsent("rotate")

    async def logout(self) -> None:
        """Destroy the current session and clear its cookie; succeeds silently without one.

        A token rotated away moments ago (by the same browser's other tab, as like as
        not) destroys the session it was rotated to: that tab's answer, reaching the
        browser after this one, must not keep it signed in.

        Raises:
            StoreUnavailable: the store failed; the session still exists.
        """
        async with self._turn():
            record = self._record
            if record is not None:
                if not await self._end_if_still_named(record):
                    # Its token rotated away meanwhile, as like as not by this browser's
                    # other tab, whose new cookie may reach the browser after this
                    # answer's clearing one: the session it was rotated to ends too.
                    await self._end_rotated_to(
                        await self._store.rotated_away_to(record.token_digest, now=time.time())
                    )
                if self._record is record:
                    self._end()
            elif self._cookie_change == "spare":
                await self._end_rotated_to(getattr(self, "_rotated_to", None))  # as above
                self._end()

    async def logout_all(self) -> None:
        """Destroy every session of the current user, this one included, and clear the cookie.

        Raises:
            Unauthorized: there is no session (or it ended meanwhile).
            SessionDataError: its token was rotated away meanwhile, and the keys set
                earlier in the request (then written at once), merged with what concurrent
                requests stored, would exceed ``max_data_bytes``.
            StoreUnavailable: the store failed.
        """
        async with self._turn():
            record = await self._require_live_session()
            await self._store.delete_for_user(record.user_id, now=time.time())
            self._end()

    async def logout_other(self) -> None:
        """Destroy every session of the current user except this one.

        Raises:
            Unauthorized: there is no session (or it ended meanwhile).
            SessionDataError: its token was rotated away meanwhile, and the keys set
                earlier in the request (then written at once), merged with what concurrent
                requests stored, would exceed ``max_data_bytes``.
            StoreUnavailable: the store failed.
        """
        async with self._turn():
            record = await self._require_live_session()
            await self._store.delete_for_user(record.user_id, now=time.time(), except_id=record.id)

    async def list_my_sessions(self) -> list[SessionData]:
        """The user's live sessions, most recently active first: this one, active now
        (its ``last_active_at`` is this request's time, where the store's moves once per
        ``touch_interval``), with ``is_current``, then the others.

        Raises:
            Unauthorized: there is no session (or it ended meanwhile: the user's devices
                are not shown to a session they revoked during its request).
            SessionDataError: its token was rotated away meanwhile, and the keys set
                earlier in the request (then written at once), merged with what concurrent
                requests stored, would exceed ``max_data_bytes``.
            StoreUnavailable: the store failed.
        """
        # In turn: a rotation or a login of the same request, waiting for the store, would
        # have its new token read here as this session ended.
        async with self._turn():
            record = self._require_session()
            now = time.time()
            config = self._config
            records = within_lifetimes(
                await self._store.list_for_user(record.user_id, now=now),
                config.ttl_seconds,
                config.absolute_ttl_seconds,
                now,
            )
            if not any(
                stored.id == record.id and stored.token_digest == record.token_digest
                for stored in records
            ):  # ended meanwhile, or its token rotated away: no longer this request's
                await self._end_found_gone(record)
                raise Unauthorized()
            current = replace(self._current_data(), last_active_at=to_datetime(now))
        # The others are fresh from the store and dropped here, so their data is handed
        # over; this session's own record stays with the session, so its data is copied.
        return [
            current,
            *(stored.to_data(copy_data=False) for stored in records if stored.id != record.id),
        ]

    async def revoke(self, session_id: str) -> None:
        """Destroy one session of the current user (this one too, which clears the cookie).

        Raises:
            TypeError: ``session_id`` is not a string (as :meth:`SessionManager.revoke
                <authsessions.SessionManager.revoke>` says).
            Unauthorized: there is no session (or it ended meanwhile).
            SessionNotFound: no session has this id, or it is another user's
                (indistinguishable on purpose).
            SessionDataError: its token was rotated away meanwhile, and the keys set
                earlier in the request (then written at once), merged with what concurrent
                requests stored, would exceed ``max_data_bytes``.
            StoreUnavailable: the store failed.
        """
        require_str("session_id", session_id)
        async with self._turn():
            record = await self._require_live_session()
            now = time.time()
            if (
                not is_well_formed_session_id(session_id)
                or (session_id != record.id and not await self._lists(record, session_id, now))
                or not await self._store.delete(session_id, now=now, user_id=record.user_id)
            ):
                raise SessionNotFound()
            if session_id == record.id:
                self._end()

    async def _lists(self, record: SessionRecord, session_id: str, now: float) -> bool:
        """Whether :meth:`list_my_sessions` would list ``session_id`` among the sessions of
        ``record``'s user: one the store keeps, whose lifetime the config has ended since
        it was written (a shorter ``ttl``, an ``absolute_ttl`` set), is not found either."""
        config = self._config
        records = await self._store.list_for_user(record.user_id, now=now)
        live = within_lifetimes(records, config.ttl_seconds, config.absolute_ttl_seconds, now)
        return any(stored.id == session_id for stored in live)

    # -- for the middleware ----------------------------------------------------------
    # (SessionMiddleware also reads _record and _cookie_change directly, on every response.)

    def cookie_token(self) -> tuple[str, int] | None:
        """The token to send and its Max-Age, when the cookie must be set."""
        if self._cookie_change != "set" or self._record is None or self._token is None:
            return None
        # Rounded: counted a moment after the expiry was set, a 30-day session would
        # otherwise say 2591999.
        return self._token, max(0, round(self._record.expires_at - time.time()))

    def pending_write(self, *, save: bool) -> Awaitable[None] | None:
        """The store write this request owes (changed keys, a due touch), or ``None``.

        Called once, as the response starts; an untouched session within the
        touch interval owes nothing, so the common request never awaits here.
        With ``save=False`` (an error response) nothing is written. Awaiting the
        write raises :class:`SessionDataError` when the changed keys, merged
        with what concurrent requests stored, would exceed ``max_data_bytes``.
        """
        if self._flushed:
            return None
        self._flushed = True
        record = self._record
        if record is None or not save:
            return None
        now = time.time()
        touch_due = now - record.last_active_at >= self._config.touch_interval_seconds
        if not (touch_due or self._changes):
            return None
        return self._write(record, now, touch_due=touch_due)

    async def _write(self, record: SessionRecord, now: float, *, touch_due: bool) -> None:
        # Within the touch interval a write leaves the times alone, as a read does: the
        # store then need not rewrite its expiry index.
        changes = self._pending_update(now, moves_expiry=touch_due)
        self._changes = None
        # One coroutine, the except clause in it: a second costs every write.
        try:
            if not await self._update(record, changes, now):
                # Ended meanwhile (logout elsewhere, expiry): its changes must not bring it
                # back.
                logger.info(
                    "session %s ended during the request; its changes were dropped", record.id
                )
                # A login in the same browser may have ended it: then its cookie is spared.
                await self._end_found_gone(record)
                return
            if self._record is not record:
                return  # a task of this request logged out meanwhile: that stands
            if touch_due:  # else the record's times and token are still the stored ones
                self._record = record = self._renewed(record, changes)
            # Re-send the cookie so the browser's expiry follows the store's, unless a
            # concurrent rotate() replaced this token: the browser's new cookie must not
            # be overwritten by a dead one. One extra read, once per touch_interval.
            if touch_due and self._cookie_change == "keep":
                try:
                    still_named = await self._store.get(record.token_digest, now=now)
                except StoreUnavailable:
                    # The write is done: a 503 would deny it. The cookie's expiry catches
                    # up at the next touch.
                    logger.warning(
                        "session %s: the store failed after its write, before its cookie "
                        "could be renewed; the app's answer stands",
                        record.id,
                    )
                    return
                if still_named is not None:
                    self._cookie_change = "set"
        except StoreUnavailable:
            if changes.changes_data:
                raise
            # Only the "last active" touch, on a store that could be read: the app's answer
            # stands (a 503 would deny a done request), and the next request touches.
            logger.warning(
                "session %s: the store failed during its last-active touch; the app's "
                "answer stands, and the next request tries again",
                record.id,
            )

    async def end_unsent_token(self) -> None:
        """End the session a login or rotation of this request gave a new token, when no
        response will carry it (the app failed, or was cancelled, before its response
        started).

        Kept, that session would hold a place among its user's sessions until it expired,
        where each failed login pushes out a device the user still has. A store failure
        here is logged, not raised: the app's own failure is the one to report. From here
        on, what needs a response (a login, a rotation, a key set) is refused, as after
        one: a task the request left running would otherwise make such a session anew.
        """
        self._flushed = True
        record = self._record
        if self._cookie_change != "set" or record is None:
            return
        self._forget()
        # Unset but by a login: a rotation's new token, unsent, leaves no session behind it.
        self._cookie_change = getattr(self, "_cookie_if_unsent", "clear")
        await self._end_unsent(self._store.delete(record.id, now=time.time()), record.id)

    # -- internals -------------------------------------------------------------

    async def _update(self, record: SessionRecord, changes: SessionUpdate, now: float) -> bool:
        """``Store.update``, with a refused size cap as :class:`SessionDataError`."""
        try:
            return await self._store.update(record.id, changes, now=now)
        except DataTooLarge as exc:
            # set() checked this request's own copy; the store saw every request's keys.
            raise SessionDataError(
                f"this request's session changes were not saved: merged with what concurrent "
                f"requests of this session stored meanwhile, the data would be {exc.size} "
                f"bytes, over max_data_bytes={self._config.max_data_bytes}. Together they "
                "exceeded the limit; store less per session or raise the limit."
            ) from None

    def _check_fits(self, data: dict[str, Any], what: str) -> None:
        size = data_size(data)
        if size > self._config.max_data_bytes:
            raise SessionDataError(
                f"{what} would make the session data {size} bytes, over "
                f"max_data_bytes={self._config.max_data_bytes}; store less or raise the limit."
            )

    def _change(self, key: str, value: Any) -> None:
        if self._changes is None:
            self._changes = {}
        self._changes[key] = value

    def _own_data(self) -> dict[str, Any]:
        """This request's data, to change: a copy of the (maybe shared) record's.

        Copied again after each write, when ``_changes`` starts afresh, as the
        written data may be shared again. One level deep is enough: values
        are only ever replaced whole, and :meth:`get` hands out copies.
        """
        if self._changes is None:
            self._data = dict(self._data)
        return self._data

    def _current_data(self) -> SessionData:
        assert self._record is not None
        return self._record.with_data(self._data).to_data(is_current=True)

    def _renewed(
        self, record: SessionRecord, changes: SessionUpdate, *, token_digest: str | None = None
    ) -> SessionRecord:
        """``record`` with the times and token ``changes`` left in the store."""
        return SessionRecord(
            record.id,
            token_digest or record.token_digest,
            record.user_id,
            record.ip_address,
            record.user_agent,
            record.device_name,
            record.device_type,
            record.fingerprint,
            self._data,
            record.created_at,
            record.last_active_at if changes.last_active_at is None else changes.last_active_at,
            record.expires_at if changes.expires_at is None else changes.expires_at,
        )

    def _turn(self) -> asyncio.Lock:
        """Turns for the request's tasks at changing the session it holds (a login, a
        rotation, a logout, a revocation) or checking it against the store (a listing, a
        logout of the others): each reads that session, waits for the store, then acts on
        what it read, so two at once would act on a session the other had replaced (a
        rotation conditional on a token the other rotated away; a login overwritten by a
        rotation of the session it replaced; a new token taken for the session ended).
        """
        turns = self._turns
        if turns is None:
            turns = self._turns = asyncio.Lock()
        return turns

    def _require_session(self) -> SessionRecord:
        if self._record is None:
            raise Unauthorized()
        return self._record

    async def _require_live_session(self) -> SessionRecord:
        """The session, found again in the store before it acts on its user's other
        sessions: one revoked, or whose token was rotated away, while its request ran (a
        slow upload keeps a request open as long as its sender likes) must not end the
        user's devices.
        """
        record = self._require_session()
        if await self._store.get(record.token_digest, now=time.time()) is None:
            await self._end_found_gone(record)
            raise Unauthorized()
        return record

    def _unwrite(self, record: SessionRecord, written: dict[str, Any] | None) -> None:
        """Put back the changes a write of ``record``'s session took but did not make."""
        if written is not None and self._record is record:
            self._changes = {**written, **(self._changes or {})}

    async def _end_found_gone(self, record: SessionRecord) -> None:
        """This request's session, found ended in the store or its token rotated away:
        no longer this request's. The cookie is cleared unless the token was rotated away,
        when the browser may hold the new one already; then the keys the request set so
        far are written, as they would have been at its end (see the README's security
        model: a rotation must not lose the same browser's writes in flight), unless the
        response has started: its write was made, or dropped with an error page.

        Raises:
            SessionDataError: those keys, merged with what concurrent requests stored,
                would exceed ``max_data_bytes``; the session is no longer this request's
                all the same.
        """
        now = time.time()
        holder = await self._store.rotated_away_to(record.token_digest, now=now)
        if self._record is not record:  # a new login of another task's
            return
        if holder is None:
            self._end()
            return
        try:
            if self._changes and not self._flushed:
                changes = self._pending_update(now, moves_expiry=False)
                self._changes = None
                await self._update(record, changes, now)
        finally:
            if self._record is record:
                self._spare(holder)

    async def _end_unsent(self, ending: Awaitable[bool], session_id: str) -> bool:
        """Await ``ending``, the delete of session ``session_id``, whose new token no
        response will carry, and return whether it deleted the session; a store failure
        is logged, not raised (the request's own failure or cancellation is the one to
        report)."""
        try:
            # Shielded: a cancelled request's cancellation may be delivered again here.
            return await asyncio.shield(ending)
        except StoreUnavailable:
            logger.warning(
                "session %s, whose new token was never sent, is left to expire", session_id
            )
            return False

    async def _end_if_still_named(self, record: SessionRecord) -> bool:
        """Delete ``record``'s session from the store while its token still names it, in
        one step: a rotation by another request between a check and the delete would
        have had the delete end the session the rotated token now holds. Returns whether
        a live session was deleted.
        """
        return await self._store.delete(
            record.id, now=time.time(), user_id=record.user_id, token_digest=record.token_digest
        )

    def _refuse_cookie_change(self, operation: str) -> None:
        """Refuse, before any store access, what would need a cookie no response can carry."""
        if self._connection[0] == "websocket":
            raise RuntimeError(
                f"{operation}() sets a cookie, which a WebSocket cannot carry; do it in an "
                "HTTP request."
            )
        if self._flushed:
            raise self._too_late(operation)

    async def _refuse_if_unsent(self, operation: str) -> None:
        """After the store took a new token: if the response started meanwhile (a task
        of the request's own raced it), no cookie will carry the token, so its session
        ends, as for a token an error page left unsent."""
        if self._flushed:
            await self.end_unsent_token()
            raise self._too_late(operation)

    def _too_late(self, operation: str) -> RuntimeError:
        # A rotate or login here would end the session the browser holds and never send
        # the new cookie; a key set here would be dropped without a word.
        return RuntimeError(
            f"{operation}() after the response started (in a background task or a "
            "streaming body; or after a WebSocket ended) could not reach the store or the "
            "cookie; call it in the handler, before it returns the response."
        )

    def _expiry(self, *, created_at: float, now: float) -> float:
        expires_at = now + self._config.ttl_seconds
        if self._config.absolute_ttl_seconds is not None:
            expires_at = min(expires_at, created_at + self._config.absolute_ttl_seconds)
        return expires_at

    def _pending_update(
        self,
        now: float,
        *,
        moves_expiry: bool,
        token_digest: str | None = None,
        expected: str | None = None,
        rotated_away_until: float | None = None,
    ) -> SessionUpdate:
        record = self._record
        assert record is not None
        changes = self._changes
        if changes is None:
            set_keys: dict[str, Any] = {}
            removed_keys: frozenset[str] = frozenset()
        elif _REMOVED in changes.values():
            set_keys = {key: value for key, value in changes.items() if value is not _REMOVED}
            removed_keys = frozenset(key for key, value in changes.items() if value is _REMOVED)
        else:
            # The usual case, keys set and none removed. No copy: the callers hand the dict
            # over (set() starts a new one), so keys set while the store works are not in it.
            set_keys, removed_keys = changes, frozenset()
        last_active_at = expires_at = touch_if_last_active_by = None
        if moves_expiry:
            last_active_at, expires_at = now, self._expiry(created_at=record.created_at, now=now)
            # A touch moves the times once per interval, however many requests found it
            # due together; a rotation's only never steps them back.
            touch_if_last_active_by = (
                now if token_digest is not None else now - self._config.touch_interval_seconds
            )
        return CheckedUpdate(
            last_active_at,
            expires_at,
            set_keys,
            removed_keys,
            token_digest,
            self._config.max_data_bytes,
            expected,
            rotated_away_until,
            touch_if_last_active_by,
        )

    def _forget(self) -> None:
        self._record = None
        self._data = _NO_DATA
        self._token = None
        self._changes = None

    def _end(self) -> None:
        self._forget()
        self._cookie_change = "clear"

    def _spare(self, holder: str) -> None:
        """No longer this request's session, its token rotated away to session ``holder``:
        the cookie stays."""
        self._forget()
        self._cookie_change = "spare"
        self._rotated_to = holder

    async def _end_rotated_to(self, holder: str | None) -> None:
        """End session ``holder``, the one this request's token was rotated away to, if any."""
        if holder is not None:
            await self._store.delete(holder, now=time.time())


def _plain_key(key: object) -> str:
    """A key that is not exactly a ``str`` as the plain string JSON stores: a ``str``
    subclass (a ``StrEnum`` member) would otherwise live on in this request's data and in a
    store's cache, where a read from the store gives ``str``.

    Raises:
        SessionDataError: ``key`` is not a string.
    """
    if not isinstance(key, str):
        raise SessionDataError(f"session keys are strings, got {type(key).__name__}.")
    return str.__str__(key)
