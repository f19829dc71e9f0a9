"""Where sessions live: one async interface, two stores.

- `MemorySessionStore` (default, `sessions_backend=memory`): the in-process `SessionStore` of `sessions.py`. One
  orchestrator replica only: another replica cannot see its sessions and a restart loses them (the chart refuses
  more than one replica with it).
- `RedisSessionStore` (`sessions_backend=redis`): every replica reads and writes the same Redis, so turn 1 on
  replica A and turn 2 on replica B continue one conversation, and sessions survive restarts and rollouts.

Redis layout (prefix `moss-speech:` by default):
  `<prefix>s:<id>`     hash: `meta` (JSON of the record's scalar fields, turn lengths, the last reply's position)
                       and `rows` (every turn's int64 rows back to back); its expiry is the idle TTL, renewed on use
  `<prefix>lock:<id>`  the busy lock: a random token set with NX and a lease (`session_lock_lease_seconds`),
                       renewed while the turn runs; a replica that crashes stops renewing, so the lock expires
                       within one lease and the session serves again. Writes are fenced: a lease that expired (the
                       lock taken over) cannot overwrite the session (a Lua script checks the token and writes).
Redis unreachable -> `SessionStoreUnavailableError` (the server answers UNAVAILABLE); redis-py reconnects on the next
command, so the service recovers on its own when Redis returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import secrets
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np

from moss_speech.services.logging import get_logger
from moss_speech.services.sessions import (
    Reply,
    Session,
    SessionBusyError,
    SessionLimitError,
    SessionNotFoundError,
    SessionStore,
    TurnLease,
    _locate_reply,
    fit_history,
    truncate_last_reply,
)

log = get_logger("sessions")

UNAVAILABLE_MESSAGE = "the session store is unavailable (Redis cannot be reached); retry shortly"


class SessionStoreUnavailableError(RuntimeError):
    """The shared session store cannot be reached (-> UNAVAILABLE). The message names no address."""

    def __init__(self, message: str = UNAVAILABLE_MESSAGE) -> None:
        super().__init__(message)


class Lease(ABC):
    """A session held by one RPC; `prepare()` before each turn, `commit()` after it (see `sessions.TurnLease`)."""

    session: Session

    @abstractmethod
    async def prepare(self, budget: int | None = None) -> tuple[np.ndarray, int]: ...

    @abstractmethod
    async def commit(
        self, turn_rows: np.ndarray, generated: np.ndarray | None = None, output: str = "speech"
    ) -> None: ...


class AsyncSessionStore(ABC):
    backend: str = "?"

    @abstractmethod
    async def create(self, system_prompt: str = "", owner: str = "", max_per_owner: int = 0) -> Session: ...

    @abstractmethod
    async def get(self, session_id: str) -> Session: ...

    @abstractmethod
    async def delete(self, session_id: str) -> None: ...

    @abstractmethod
    async def truncate_reply(self, session_id: str, audio_end_ms: int) -> tuple[int, int, int]: ...

    @abstractmethod
    def hold(self, session_id: str) -> contextlib.AbstractAsyncContextManager[Lease]: ...

    async def evict_expired(self) -> int:
        return 0

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        return None


# --- in memory -------------------------------------------------------------------------------------------


class _MemoryLease(Lease):
    def __init__(self, lease: TurnLease) -> None:
        self._lease, self.session = lease, lease.session

    async def prepare(self, budget: int | None = None) -> tuple[np.ndarray, int]:
        return self._lease.prepare(budget)

    async def commit(self, turn_rows, generated=None, output="speech") -> None:
        self._lease.commit(turn_rows, generated, output)


class MemorySessionStore(AsyncSessionStore):
    """The embedded store (one replica): `sessions.SessionStore` behind the async interface."""

    backend = "memory"

    def __init__(
        self,
        ttl_seconds: float,
        max_sessions: int,
        max_context_tokens: int,
        on_change: Callable[[int], None] | None = None,
        **kw: Any,
    ) -> None:
        self.store = SessionStore(ttl_seconds, max_sessions, max_context_tokens, on_change=on_change, **kw)

    def __len__(self) -> int:
        return len(self.store)

    async def create(self, system_prompt: str = "", owner: str = "", max_per_owner: int = 0) -> Session:
        return self.store.create(system_prompt, owner, max_per_owner)

    async def get(self, session_id: str) -> Session:
        return self.store.get(session_id)

    async def delete(self, session_id: str) -> None:
        self.store.delete(session_id)

    async def truncate_reply(self, session_id: str, audio_end_ms: int) -> tuple[int, int, int]:
        return self.store.truncate_reply(session_id, audio_end_ms)

    @contextlib.asynccontextmanager
    async def hold(self, session_id: str) -> AsyncIterator[Lease]:
        with self.store.hold(session_id) as lease:
            yield _MemoryLease(lease)

    async def evict_expired(self) -> int:
        return self.store.evict_expired()


# --- Redis -----------------------------------------------------------------------------------------------

# Write the session only while the caller still holds the lock (fencing against an expired lease).
_FENCED_WRITE = """
if redis.call('get', KEYS[1]) ~= ARGV[1] then return 0 end
if redis.call('exists', KEYS[2]) == 0 then return -1 end
redis.call('hset', KEYS[2], 'meta', ARGV[2], 'rows', ARGV[3])
redis.call('pexpire', KEYS[2], ARGV[4])
return 1
"""
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"
_RENEW = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end return 0"

# Record fields stored as JSON scalars; `turns`, `last_reply`, `busy` and the monotonic clock are handled apart.
_SPECIAL = {"turns", "last_reply", "busy", "last_used"}


def encode_session(s: Session) -> tuple[str, bytes]:
    """(meta JSON, rows bytes). Every other scalar field of the record (an `owner`, say) round-trips as is."""
    meta: dict[str, Any] = {f.name: getattr(s, f.name) for f in dataclasses.fields(s) if f.name not in _SPECIAL}
    turns = [np.ascontiguousarray(t, dtype=np.int64).reshape(-1, 2) for t in s.turns]
    meta["turn_rows"] = [len(t) for t in turns]
    r = s.last_reply
    reply_ok = r is not None and bool(s.turns) and s.turns[-1] is r.rows
    meta["reply"] = (
        None
        if not reply_ok
        else {
            "start": r.start,
            "speech": r.speech,
            "eosp": None if r.eosp_row is None else [int(x) for x in r.eosp_row],
        }
    )
    rows = np.concatenate(turns).tobytes() if turns else b""
    return json.dumps(meta, separators=(",", ":")), rows


def decode_session(meta_json: str | bytes, rows: bytes) -> Session:
    meta = json.loads(meta_json)
    flat = np.frombuffer(rows, dtype=np.int64).reshape(-1, 2)
    turns: deque[np.ndarray] = deque()
    at = 0
    for n in meta.pop("turn_rows"):
        turns.append(flat[at : at + n].copy())
        at += n
    reply = meta.pop("reply")
    known = {f.name for f in dataclasses.fields(Session)}
    s = Session(**{k: v for k, v in meta.items() if k in known}, turns=turns)
    if reply is not None and turns:
        eosp = None if reply["eosp"] is None else np.asarray(reply["eosp"], dtype=np.int64)
        s.last_reply = Reply(rows=turns[-1], start=reply["start"], speech=reply["speech"], eosp_row=eosp)
    return s


class _RedisLease(Lease):
    def __init__(self, store: RedisSessionStore, session: Session, token: str) -> None:
        self.store, self.session, self.token = store, session, token

    async def prepare(self, budget: int | None = None) -> tuple[np.ndarray, int]:
        dropped = fit_history(self.session, self.store.max_context_tokens, budget)
        if dropped:
            await self.store._save(self.session, self.token)
        return self.session.history(), dropped

    async def commit(self, turn_rows, generated=None, output="speech") -> None:
        rows = np.asarray(turn_rows, dtype=np.int64).reshape(-1, 2)
        self.session.turns.append(rows)
        self.session.last_reply = _locate_reply(rows, generated, output)
        await self.store._save(self.session, self.token)


class RedisSessionStore(AsyncSessionStore):
    backend = "redis"

    def __init__(
        self,
        url: str,
        ttl_seconds: float,
        max_context_tokens: int,
        lock_lease_seconds: float = 30.0,
        prefix: str = "moss-speech:",
        timeout_seconds: float = 2.0,
        client: Any = None,
    ) -> None:
        import redis.asyncio as aioredis  # the `redis` distribution (redis-py), a base dependency
        from redis import exceptions

        self.ttl_ms = max(1, int(ttl_seconds * 1000))
        self.max_context_tokens = max_context_tokens
        self.lease_ms = max(100, int(lock_lease_seconds * 1000))
        self.prefix = prefix
        self.redis = client or aioredis.Redis.from_url(
            url,
            socket_connect_timeout=timeout_seconds,
            socket_timeout=timeout_seconds,
            health_check_interval=10,
            retry_on_timeout=False,
        )
        self._errors = (OSError, exceptions.ConnectionError, exceptions.TimeoutError)
        self._write = self.redis.register_script(_FENCED_WRITE)
        self._release = self.redis.register_script(_RELEASE)
        self._renew = self.redis.register_script(_RENEW)

    def _key(self, session_id: str) -> str:
        return f"{self.prefix}s:{session_id}"

    def _lock(self, session_id: str) -> str:
        return f"{self.prefix}lock:{session_id}"

    @contextlib.asynccontextmanager
    async def _io(self) -> AsyncIterator[None]:
        try:
            yield
        except self._errors as e:
            log.warning("session store unreachable", extra={"fields": {"error": f"{type(e).__name__}: {e}"}})
            raise SessionStoreUnavailableError() from None

    async def ping(self) -> bool:
        try:
            async with self._io():
                return bool(await self.redis.ping())
        except SessionStoreUnavailableError:
            return False

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.redis.aclose()

    async def _load(self, session_id: str) -> Session:
        async with self._io():
            meta, rows = await self.redis.hmget(self._key(session_id), ["meta", "rows"])
        if meta is None:
            raise SessionNotFoundError(session_id)
        return decode_session(meta, rows or b"")

    async def _save(self, s: Session, token: str) -> None:
        s.last_used = time.monotonic()
        s.last_used_unix = time.time()
        meta, rows = encode_session(s)
        async with self._io():
            done = await self._write(
                keys=[self._lock(s.session_id), self._key(s.session_id)], args=[token, meta, rows, self.ttl_ms]
            )
        if done == -1:
            raise SessionNotFoundError(s.session_id)
        if done != 1:
            raise SessionBusyError(
                f"session {s.session_id!r} was taken over after this turn's lock lease expired; the turn was not saved"
            )

    def _owned(self, owner: str) -> str:
        return f"{self.prefix}owner:{owner}"

    async def create(self, system_prompt: str = "", owner: str = "", max_per_owner: int = 0) -> Session:
        """A new session of `owner`; past `max_per_owner` live sessions of that owner (0 = no cap) raises
        SessionLimitError. The per-owner set drops ids whose session expired or was deleted."""
        s = Session(session_id=secrets.token_hex(16), system_prompt=system_prompt, owner=owner)
        meta, rows = encode_session(s)
        async with self._io():
            if max_per_owner:
                ids = sorted(await self.redis.smembers(self._owned(owner)))
                alive = [
                    bool(x)
                    for x in await asyncio.gather(
                        *(self.redis.exists(self._key(i.decode() if isinstance(i, bytes) else i)) for i in ids)
                    )
                ]
                gone = [i for i, a in zip(ids, alive, strict=True) if not a]
                if gone:
                    await self.redis.srem(self._owned(owner), *gone)
                if sum(alive) >= max_per_owner:
                    raise SessionLimitError(
                        f"this API key holds {max_per_owner} sessions (max_sessions_per_key); delete one first"
                    )
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hset(self._key(s.session_id), mapping={"meta": meta, "rows": rows})
                pipe.pexpire(self._key(s.session_id), self.ttl_ms)
                pipe.sadd(self._owned(owner), s.session_id)
                await pipe.execute()
        return s

    async def get(self, session_id: str) -> Session:
        s = await self._load(session_id)
        async with self._io():
            s.busy = bool(await self.redis.exists(self._lock(session_id)))
        return s

    async def delete(self, session_id: str) -> None:
        """Raises SessionNotFoundError, or SessionBusyError while a turn runs (as the in-memory store)."""
        async with self._io():
            if await self.redis.exists(self._lock(session_id)):
                if await self.redis.exists(self._key(session_id)):
                    raise SessionBusyError("the session is running a turn; delete it after the turn ends")
            if not await self.redis.delete(self._key(session_id)):
                raise SessionNotFoundError(session_id)

    async def _acquire(self, session_id: str) -> str:
        token = secrets.token_hex(16)
        async with self._io():
            if await self.redis.set(self._lock(session_id), token, nx=True, px=self.lease_ms):
                return token
            exists = await self.redis.exists(self._key(session_id))
        if not exists:
            raise SessionNotFoundError(session_id)
        raise SessionBusyError(
            f"session {session_id!r} is in use by another request or stream; a session serves one at a time"
        )

    async def _keep_lease(self, session_id: str, token: str) -> None:
        """Renew the lock every third of its lease while the turn runs."""
        while True:
            await asyncio.sleep(self.lease_ms / 3000)
            with contextlib.suppress(*self._errors):
                if not await self._renew(keys=[self._lock(session_id)], args=[token, self.lease_ms]):
                    log.warning("session lock lost", extra={"fields": {"session_id": session_id}})
                    return

    @contextlib.asynccontextmanager
    async def hold(self, session_id: str) -> AsyncIterator[Lease]:
        token = await self._acquire(session_id)
        renew: asyncio.Task | None = None
        try:
            s = await self._load(session_id)
            renew = asyncio.create_task(self._keep_lease(session_id, token))
            yield _RedisLease(self, s, token)
        finally:
            if renew:
                renew.cancel()
            with contextlib.suppress(*self._errors):
                await self._release(keys=[self._lock(session_id)], args=[token])
                await self.redis.pexpire(self._key(session_id), self.ttl_ms)  # idle TTL counts from now

    async def truncate_reply(self, session_id: str, audio_end_ms: int) -> tuple[int, int, int]:
        try:
            token = await self._acquire(session_id)
        except SessionBusyError:
            raise SessionBusyError(f"session {session_id!r} is running a turn; truncate after it finished") from None
        try:
            s = await self._load(session_id)
            kept, removed = truncate_last_reply(s, audio_end_ms)
            if removed:
                await self._save(s, token)
            return kept, removed, s.history_tokens
        finally:
            with contextlib.suppress(*self._errors):
                await self._release(keys=[self._lock(session_id)], args=[token])


def make_session_store(settings: Any, on_change: Callable[[int], None] | None = None) -> AsyncSessionStore:
    """The store `settings.sessions_backend` names (ServiceSettings)."""
    if settings.sessions_backend == "redis":
        return RedisSessionStore(
            settings.redis_url,
            settings.session_ttl_seconds,
            settings.max_context_tokens,
            lock_lease_seconds=settings.session_lock_lease_seconds,
            prefix=settings.redis_key_prefix,
        )
    return MemorySessionStore(
        settings.session_ttl_seconds, settings.max_sessions, settings.max_context_tokens, on_change=on_change
    )
