"""SessionStore alone: history order, context truncation, TTL, busy, isolation, max_sessions."""

from __future__ import annotations

import numpy as np
import pytest

from moss_speech.services.sessions import SessionBusyError, SessionNotFoundError, SessionStore


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def rows(n: int, v: int) -> np.ndarray:
    return np.full((n, 2), v, dtype=np.int64)


def test_history_accumulates_in_order_and_sessions_are_isolated():
    store = SessionStore(ttl_seconds=60, max_sessions=10, max_context_tokens=1000)
    a, b = store.create(), store.create()
    for v in (1, 2):
        with store.hold(a.session_id) as lease:
            lease.prepare()
            lease.commit(rows(3, v))
    with store.hold(b.session_id) as lease:
        assert lease.prepare()[0].shape == (0, 2)
        lease.commit(rows(2, 9))
    with store.hold(a.session_id) as lease:
        history, dropped = lease.prepare()
        assert history[:, 0].tolist() == [1, 1, 1, 2, 2, 2]
        assert dropped == 0
    assert store.get(b.session_id).history()[:, 0].tolist() == [9, 9]


def test_oldest_turns_dropped_past_context_and_reported():
    store = SessionStore(ttl_seconds=60, max_sessions=10, max_context_tokens=10)
    s = store.create()
    with store.hold(s.session_id) as lease:  # several turns in one hold (a stream)
        for v in (1, 2, 3):
            assert lease.prepare()[1] == 0
            lease.commit(rows(4, v))
        history, dropped = lease.prepare()  # 12 rows > 10: turn 1 goes
        assert dropped == 1
        assert history[:, 0].tolist() == [2] * 4 + [3] * 4
    assert store.get(s.session_id).dropped_turns == 1


def test_failed_turn_leaves_history_unchanged():
    store = SessionStore(ttl_seconds=60, max_sessions=10, max_context_tokens=100)
    s = store.create()
    with pytest.raises(RuntimeError), store.hold(s.session_id):
        raise RuntimeError("triton down")
    assert store.get(s.session_id).history_tokens == 0
    assert not store.get(s.session_id).busy


def test_second_concurrent_turn_is_refused():
    store = SessionStore(ttl_seconds=60, max_sessions=10, max_context_tokens=100)
    s = store.create()
    with store.hold(s.session_id):
        with pytest.raises(SessionBusyError), store.hold(s.session_id):
            pass
    with store.hold(s.session_id):  # free again
        pass


def test_idle_ttl_evicts_but_not_while_busy():
    clock = Clock()
    counts = []
    store = SessionStore(ttl_seconds=10, max_sessions=10, max_context_tokens=100, clock=clock, on_change=counts.append)
    idle, busy = store.create(), store.create()
    with store.hold(busy.session_id):
        clock.t = 11
        assert store.evict_expired() == 1
        with pytest.raises(SessionNotFoundError):
            store.get(idle.session_id)
        assert store.get(busy.session_id)
    assert counts[-1] == 1


def test_max_sessions_evicts_least_recently_used():
    store = SessionStore(ttl_seconds=60, max_sessions=2, max_context_tokens=100)
    a, b = store.create(), store.create()
    store.hold(a.session_id).__enter__()  # a stays busy, b is the only idle one
    c = store.create()
    assert {s for s in (a.session_id, c.session_id)} <= set(store._sessions)
    with pytest.raises(SessionNotFoundError):
        store.get(b.session_id)


def test_delete_unknown_raises():
    store = SessionStore(ttl_seconds=60, max_sessions=2, max_context_tokens=100)
    with pytest.raises(SessionNotFoundError):
        store.delete("nope")
