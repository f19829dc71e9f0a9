"""TritonPool routing without servers: rendezvous affinity and minimal movement, least loaded for sessionless
turns, unhealthy endpoints skipped, dns:/// membership that follows the resolver."""

from __future__ import annotations

import asyncio

import pytest

from moss_speech.services.triton_pool import TritonPool, parse_targets, rendezvous


class Idle:
    """Stands in for a TritonClient where only routing is under test (no call is made)."""

    def __init__(self, url, *models):
        self.url = url

    async def close(self):
        return None


def test_parse_targets():
    assert parse_targets("a:1, b:2") == (None, ["a:1", "b:2"])
    assert parse_targets("dns:///triton-headless.ns.svc:8001") == ("triton-headless.ns.svc:8001", [])
    with pytest.raises(ValueError, match="port"):
        parse_targets("dns:///triton")


def test_rendezvous_spreads_and_moves_only_the_failed_endpoints_sessions():
    eps = [f"10.0.0.{i}:8001" for i in range(4)]
    sessions = [f"{i:032x}" for i in range(2000)]
    first = {s: rendezvous(s, eps)[0] for s in sessions}
    counts = [sum(1 for v in first.values() if v == ep) for ep in eps]
    assert max(counts) < 1.2 * min(counts)  # even within 20 %
    survivors = eps[1:]
    after = {s: rendezvous(s, survivors)[0] for s in sessions}
    moved = [s for s in sessions if first[s] != after[s]]
    assert all(first[s] == eps[0] for s in moved)  # only the failed endpoint's sessions move


def test_pick_affinity_least_loaded_and_health():
    pool = TritonPool("a:1,b:2,c:3", client_factory=Idle)
    sid = "ab" * 16
    home = pool.pick(sid)
    assert all(pool.pick(sid) == home for _ in range(5))
    pool.inflight.update({"a:1": 3, "b:2": 0, "c:3": 1})
    assert pool.pick() == "b:2"
    pool.healthy[home] = False
    assert pool.pick(sid) != home and pool.pick(sid) == rendezvous(sid, [e for e in pool.endpoints if e != home])[0]
    pool.healthy[home] = True
    assert pool.pick(sid) == home  # back when healthy again


def test_dns_membership_follows_the_resolver():
    answers = [["10.0.0.1:8001"], ["10.0.0.1:8001", "10.0.0.2:8001"], ["10.0.0.2:8001"]]

    async def main():
        pool = TritonPool("dns:///triton:8001", client_factory=Idle, resolver=lambda name: answers.pop(0))
        for want in (["10.0.0.1:8001"], ["10.0.0.1:8001", "10.0.0.2:8001"], ["10.0.0.2:8001"]):
            await pool.refresh(force=True)
            assert pool.endpoints == want

    asyncio.run(main())


class Checked(Idle):
    """A client whose readiness answers come from a shared script (endpoint -> list of bools, one per check)."""

    answers: dict[str, list[bool]] = {}

    async def ready(self, timeout):
        return self.answers[self.url].pop(0)


def test_one_slow_readiness_answer_does_not_take_a_replica_out():
    """A busy replica that misses a check keeps its traffic; `unhealthy_after` misses in a row take it out, one
    pass brings it back; a replica that has never passed stays out; a failed call takes it out at once."""
    Checked.answers = {
        "a:1": [True, False, False, True, False, False, False, True],
        "b:2": [True] * 8,
        "c:3": [False, False, False, False, False, False, False, True],
    }
    pool = TritonPool("a:1,b:2,c:3", client_factory=Checked, unhealthy_after=3)

    async def checks():
        seen = []
        for _ in range(8):
            assert await pool.ready()
            seen.append((pool.healthy["a:1"], pool.healthy["c:3"]))
        return seen

    seen = asyncio.run(checks())
    assert [a for a, _ in seen] == [True, True, True, True, True, True, False, True]
    assert [c for _, c in seen] == [False] * 7 + [True]
    Checked.answers = {"a:1": [False], "b:2": [False], "c:3": [False]}
    assert asyncio.run(pool.ready())  # one miss each: all still usable
    pool.healthy["b:2"] = False  # what a call failing with UNAVAILABLE does
    Checked.answers = {"a:1": [True], "b:2": [True], "c:3": [True]}
    asyncio.run(pool.ready())
    assert pool.healthy["b:2"]  # back at the next pass
