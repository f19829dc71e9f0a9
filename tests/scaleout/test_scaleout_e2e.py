"""Scale-out end to end on loopback: two real tritonservers (the session `cpu_repo`), two real service processes
sharing one real redis-server.

- sessionless turns spread over both Tritons (counted from each server's `nv_inference_request_success`);
- a session's turns, alternating between the two service replicas, stay on one Triton and hit its prefix cache;
- that Triton killed -> the session continues on the other with the same output as an undisturbed conversation;
- one service replica killed -> the next turn on the other replica continues the session.
"""

from __future__ import annotations

import signal
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from moss_speech.contract.metrics import LLM_PREFIX_CACHE_HITS
from moss_speech.services.api import speech_pb2 as pb
from moss_speech.services.api import speech_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "service"))
from service_support import ServiceProcess, start_triton  # noqa: E402
from tritonharness import metric  # noqa: E402

pytestmark = pytest.mark.slow

TEXT = pb.OUTPUT_MODALITY_TEXT
GREEDY = pb.Sampling(max_new_tokens=8, temperature=0.0)
QUESTIONS = ["hello there", "and then what?", "tell me more", "thanks"]


def llm_requests(triton) -> float:
    return metric(triton.metrics(), "nv_inference_request_success", model="llm") or 0.0


def cache_hits(triton) -> float:
    return metric(triton.metrics(), LLM_PREFIX_CACHE_HITS) or 0.0


@pytest.fixture(scope="module")
def cluster(cpu_repo, tmp_path_factory):
    from tests.scaleout.redis_support import RedisServer

    tmp = tmp_path_factory.mktemp("scaleout")
    redis = RedisServer(tmp / "redis").start()
    with ThreadPoolExecutor(2) as ex:
        tritons = list(ex.map(lambda _: start_triton(cpu_repo), range(2)))
    url = ",".join(f"127.0.0.1:{t.grpc_port}" for t in tritons)
    env = {
        "MOSS_SPEECH_SESSIONS_BACKEND": "redis",
        "MOSS_SPEECH_REDIS_URL": redis.url,
        "MOSS_SPEECH_MAX_CONTEXT_TOKENS": "4096",
        "MOSS_SPEECH_SESSION_LOCK_LEASE_SECONDS": "5",
    }
    services = [ServiceProcess(url, tmp / f"service{i}.log", **env) for i in range(2)]
    with ThreadPoolExecutor(2) as ex:
        list(ex.map(lambda s: s.start(), services))
    yield {"tritons": tritons, "services": services, "redis": redis}
    for s in services:
        s.stop()
    for t in tritons:
        if t.proc is not None and t.proc.poll() is None:
            t.stop()
    redis.stop()


def stub(service) -> speech_pb2_grpc.MossSpeechStub:
    return speech_pb2_grpc.MossSpeechStub(grpc.insecure_channel(service.address))


def turn(service, session_id: str, text: str) -> pb.ConverseResponse:
    return stub(service).Converse(
        pb.ConverseRequest(session_id=session_id, text=text, output=TEXT, sampling=GREEDY), timeout=120
    )


def test_sessionless_turns_spread_over_both_tritons(cluster):
    tritons, services = cluster["tritons"], cluster["services"]
    before = [llm_requests(t) for t in tritons]
    with ThreadPoolExecutor(8) as ex:  # c = 8 over the two service replicas
        list(
            ex.map(
                lambda i: stub(services[i % 2]).Converse(
                    pb.ConverseRequest(text=f"question {i}", output=TEXT, sampling=GREEDY), timeout=120
                ),
                range(16),
            )
        )
    counts = [llm_requests(t) - b for t, b in zip(tritons, before, strict=True)]
    assert sum(counts) == 16 and min(counts) >= 4, counts  # both replicas serve (even would be 8 / 8)


def test_session_follows_its_triton_across_replicas_and_survives_failures(cluster):
    tritons, services = cluster["tritons"], cluster["services"]
    # The reference: one undisturbed conversation.
    ref_id = stub(services[0]).CreateSession(pb.CreateSessionRequest()).session_id
    reference = [turn(services[i % 2], ref_id, q).text for i, q in enumerate(QUESTIONS)]

    sid = stub(services[0]).CreateSession(pb.CreateSessionRequest()).session_id
    requests0, hits0 = [llm_requests(t) for t in tritons], [cache_hits(t) for t in tritons]
    got = [turn(services[0], sid, QUESTIONS[0]).text, turn(services[1], sid, QUESTIONS[1]).text]  # A then B
    served = [llm_requests(t) - r for t, r in zip(tritons, requests0, strict=True)]
    home = served.index(2)
    assert served[1 - home] == 0, served  # both turns on one Triton, whichever replica took them
    assert cache_hits(tritons[home]) - hits0[home] >= 1  # turn 2 reused turn 1's K/V

    tritons[home].send_signal(signal.SIGKILL)  # its sessions move to the other Triton
    tritons[home].wait(30)
    got.append(turn(services[0], sid, QUESTIONS[2]).text)
    assert got == reference[:3]  # the moved session answers exactly as the undisturbed one

    services[0].stop()  # one service replica gone: the other continues the session from Redis
    last = turn(services[1], sid, QUESTIONS[3])
    assert [*got, last.text] == reference
    session = stub(services[1]).GetSession(pb.GetSessionRequest(session_id=sid))
    assert session.turns == 4
