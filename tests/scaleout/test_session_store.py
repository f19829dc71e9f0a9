"""The session stores behind one interface: the in-memory store and the Redis store against a real redis-server
(never a fake). Two Redis store objects stand for two orchestrator replicas."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from moss_speech.services.session_store import (
    MemorySessionStore,
    RedisSessionStore,
    SessionStoreUnavailableError,
    decode_session,
    encode_session,
)
from moss_speech.services.sessions import NoReplyError, SessionBusyError, SessionLimitError, SessionNotFoundError


def rows(n: int, v: int) -> np.ndarray:
    return np.full((n, 2), v, dtype=np.int64)


def spoken_turn() -> tuple[np.ndarray, np.ndarray]:
    """TURN_ROWS of a spoken answer: user rows, reply prefix, 6 audio rows (pad 9 in the text channel, the last
    one EOSP), two text rows, closing newline."""
    gen = np.array([[9, 100 + i] for i in range(5)] + [[9, 7], [40, 1], [41, 1]], dtype=np.int64)
    turn = np.concatenate([rows(3, 1), rows(2, 2), gen, np.array([[13, 1]])])
    return turn, gen


def make(kind: str, redis_server=None, **kw):
    if kind == "memory":
        return MemorySessionStore(kw.get("ttl", 60), 100, kw.get("max_context", 1000))
    return RedisSessionStore(
        redis_server.url, kw.get("ttl", 60), kw.get("max_context", 1000), lock_lease_seconds=kw.get("lease", 30)
    )


@pytest.fixture(params=["memory", "redis"])
def store_factory(request):
    if request.param == "memory":
        return lambda **kw: make("memory", **kw)
    server = request.getfixturevalue("redis_server")
    return lambda **kw: make("redis", server, **kw)


def test_record_round_trips_every_field():
    from moss_speech.services.sessions import Session, _locate_reply

    turn, gen = spoken_turn()
    s = Session(session_id="ab" * 16, system_prompt="sys", owner="key-1", dropped_turns=2)
    s.turns.extend([rows(4, 3), turn])
    s.last_reply = _locate_reply(turn, gen, "speech")
    back = decode_session(*encode_session(s))
    assert (back.session_id, back.system_prompt, back.owner, back.dropped_turns) == ("ab" * 16, "sys", "key-1", 2)
    assert [t.tolist() for t in back.turns] == [t.tolist() for t in s.turns]
    assert back.last_reply.rows is back.turns[-1]
    assert (back.last_reply.start, back.last_reply.speech) == (s.last_reply.start, s.last_reply.speech)


async def _conversation(store):
    s = await store.create("be brief", owner="k")
    async with store.hold(s.session_id) as lease:
        history, dropped = await lease.prepare()
        assert history.shape == (0, 2) and dropped == 0
        await lease.commit(rows(3, 1))
        assert (await lease.prepare())[0].tolist() == rows(3, 1).tolist()
        await lease.commit(rows(2, 2))
        with pytest.raises(SessionBusyError):
            async with store.hold(s.session_id):
                pass
        assert (await store.get(s.session_id)).busy
    got = await store.get(s.session_id)
    assert not got.busy and got.history_tokens == 5 and got.owner == "k" and got.system_prompt == "be brief"
    async with store.hold(s.session_id) as lease:
        history, dropped = await lease.prepare(budget=2)  # the oldest turn goes
        assert history.tolist() == rows(2, 2).tolist() and dropped == 1
    return s


def test_hold_prepare_commit_busy_and_delete(store_factory):
    async def main():
        store = store_factory()
        s = await _conversation(store)
        await store.delete(s.session_id)
        with pytest.raises(SessionNotFoundError):
            await store.get(s.session_id)
        with pytest.raises(SessionNotFoundError):
            async with store.hold("0" * 32):
                pass
        await store.close()

    asyncio.run(main())


def test_truncate_reply_and_owner_limit(store_factory):
    async def main():
        store = store_factory()
        s = await store.create(owner="k")
        turn, gen = spoken_turn()
        async with store.hold(s.session_id) as lease:
            await lease.prepare()
            await lease.commit(turn, gen, "speech")
        kept, removed, history = await store.truncate_reply(s.session_id, 200)  # 200 ms -> 3 speech tokens
        assert kept == 3 and removed == 3 and history == len(turn) - 3  # 2 audio rows + <|im_end|> replaced
        kept, removed, _ = await store.truncate_reply(s.session_id, 80)  # a later, shorter cut still works
        assert kept == 1 and removed == 2
        empty = await store.create(owner="k")
        with pytest.raises(NoReplyError):
            await store.truncate_reply(empty.session_id, 100)
        with pytest.raises(SessionLimitError):
            await store.create(owner="k", max_per_owner=2)
        await store.delete(empty.session_id)
        await store.create(owner="k", max_per_owner=2)  # the deleted one no longer counts
        await store.close()

    asyncio.run(main())


def test_two_replicas_share_sessions_and_busy_lock(redis_server):
    async def main():
        a, b = make("redis", redis_server), make("redis", redis_server)
        s = await a.create()
        async with a.hold(s.session_id) as lease:
            await lease.prepare()
            await lease.commit(rows(3, 1))
            with pytest.raises(SessionBusyError):  # the lock is cross-replica
                async with b.hold(s.session_id):
                    pass
        async with b.hold(s.session_id) as lease:  # turn 2 on the other replica continues the conversation
            history, _ = await lease.prepare()
            assert history.tolist() == rows(3, 1).tolist()
            await lease.commit(rows(2, 2))
        assert (await a.get(s.session_id)).history_tokens == 5
        await a.close()
        await b.close()

    asyncio.run(main())


def test_a_crashed_replicas_lock_expires_and_cannot_write(redis_server):
    async def main():
        crashed, other = make("redis", redis_server, lease=0.3), make("redis", redis_server, lease=0.3)
        s = await crashed.create()
        token = await crashed._acquire(s.session_id)  # held, never renewed nor released: the replica died
        with pytest.raises(SessionBusyError):
            async with other.hold(s.session_id):
                pass
        await asyncio.sleep(0.5)
        async with other.hold(s.session_id) as lease:
            await asyncio.sleep(0.5)  # longer than the lease: renewal keeps it
            await lease.commit(rows(2, 5))
        stale = await crashed._load(s.session_id)
        stale.turns.append(rows(9, 9))
        with pytest.raises(SessionBusyError):  # fenced: the expired token cannot overwrite the session
            await crashed._save(stale, token)
        assert (await other.get(s.session_id)).history_tokens == 2
        await crashed.close()
        await other.close()

    asyncio.run(main())


def test_idle_ttl_expires_sessions(store_factory):
    async def main():
        store = store_factory(ttl=0.3)
        s = await store.create()
        await asyncio.sleep(0.6)
        await store.evict_expired()
        with pytest.raises(SessionNotFoundError):
            await store.get(s.session_id)
        await store.close()

    asyncio.run(main())


def test_redis_down_is_unavailable_and_recovers_without_restart(redis_server):
    async def main():
        store = make("redis", redis_server)
        s = await store.create()
        redis_server.stop()
        with pytest.raises(SessionStoreUnavailableError) as e:
            await store.get(s.session_id)
        assert "127.0.0.1" not in str(e.value) and "unavailable" in str(e.value)
        assert not await store.ping()
        redis_server.start()  # same port, empty (no persistence): the store reconnects by itself
        t = await store.create()
        assert (await store.get(t.session_id)).session_id == t.session_id and await store.ping()
        await store.close()

    asyncio.run(main())
