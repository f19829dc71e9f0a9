"""Faults produced for real: Triton stopped and restarted under the service; SIGTERM drains within drain_seconds;
Triton stops cleanly after cancelled turns. Tests that stop Triton use a server of their own (`own_triton`)."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from service_support import ServiceProcess, restart_triton
from tritonharness import metric

from moss_speech.services.api import speech_pb2 as pb
from moss_speech.services.api import speech_pb2_grpc

pytestmark = pytest.mark.slow

TEXT = pb.OUTPUT_MODALITY_TEXT
SMALL = pb.Sampling(max_new_tokens=8, seed=1)
LONG = pb.Sampling(max_new_tokens=800, min_new_tokens=800, seed=3)


def ask(stub, **kw):
    return stub.Converse(pb.ConverseRequest(text="are you there", output=TEXT, sampling=SMALL), timeout=30, **kw)


def test_triton_down_unavailable_then_recovers(own_triton, tmp_path):
    triton = own_triton[-1]
    service = ServiceProcess(triton.grpc_url, tmp_path / "service.log").start()
    channel = grpc.insecure_channel(service.address)
    stub = speech_pb2_grpc.MossSpeechStub(channel)
    try:
        ask(stub)
        errors_before = service.metric("moss_speech_triton_errors_total")
        triton.stop()
        try:
            with pytest.raises(grpc.RpcError) as e:
                ask(stub)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "request_id=" in e.value.details()
            service.wait_health("NOT_SERVING", timeout=5)
            # sessions and validation keep working while Triton is away
            sid = stub.CreateSession(pb.CreateSessionRequest(), timeout=5).session_id
            with pytest.raises(grpc.RpcError) as e:
                stub.Converse(pb.ConverseRequest(session_id=sid, text="x"), timeout=30)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            assert stub.GetSession(pb.GetSessionRequest(session_id=sid), timeout=5).turns == 0  # failed turn not kept
        finally:
            own_triton.append(restart_triton(triton))
        service.wait_health("SERVING", timeout=15)  # no restart of the service needed
        r = ask(stub)
        assert r.usage.generated_tokens == 8
        assert service.metric("moss_speech_triton_errors_total") > errors_before
        assert service.metric("moss_speech_requests_total", method="Converse", status="UNAVAILABLE") >= 2
    finally:
        channel.close()
        service.stop()


def test_triton_stops_cleanly_after_cancelled_turns(own_triton, tmp_path):
    """A turn cancelled mid-stream by its client and one cut by its deadline leave nothing in flight inside
    Triton: SIGTERM then stops it like an idle server (2.51 kept a cancelled ensemble request in flight, and
    shutdown waited out the 30 s exit timeout and exited 1)."""
    triton = own_triton[-1]
    service = ServiceProcess(triton.grpc_url, tmp_path / "service.log").start()
    channel = grpc.insecure_channel(service.address)
    stub = speech_pb2_grpc.MossSpeechStub(channel)
    try:
        config = pb.StreamConfig(output=pb.OUTPUT_MODALITY_SPEECH, sampling=LONG)
        call = stub.StreamConverse(
            iter(
                [
                    pb.StreamConverseRequest(config=config),
                    pb.StreamConverseRequest(text="talk for a long time"),
                    pb.StreamConverseRequest(end_of_turn=pb.EndOfTurn()),
                ]
            ),
            timeout=120,
        )
        assert next(call).WhichOneof("kind") == "audio"  # generating, audio streaming
        call.cancel()
        with pytest.raises(grpc.RpcError) as e:  # t2s, cut by the deadline
            stub.Converse(
                pb.ConverseRequest(text="long answer please", output=pb.OUTPUT_MODALITY_SPEECH, sampling=LONG),
                timeout=1.0,
            )
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        deadline = time.monotonic() + 10
        while (metric(triton.metrics(), "moss_speech_llm_active_sequences") or 0) > 0:
            assert time.monotonic() < deadline, "llm still holds KV slots"
            time.sleep(0.1)
    finally:
        channel.close()
        service.stop()
    t0 = time.monotonic()
    code = triton.stop(timeout=30)
    took = time.monotonic() - t0
    assert code == 0 and took < 10, (code, took, "\n".join(line for line in triton.logs(20) if "in-flight" in line))


def test_sigterm_drains_open_streams_within_bound(triton, tmp_path):
    svc = ServiceProcess(triton.grpc_url, tmp_path / "drain.log", MOSS_SPEECH_DRAIN_SECONDS="4").start()
    results: dict[str, object] = {}
    try:
        channel = grpc.insecure_channel(svc.address)
        stub = speech_pb2_grpc.MossSpeechStub(channel)
        ask(stub)  # warm (imports, model configs)

        def run(name: str, tokens: int) -> None:
            sampling = pb.Sampling(max_new_tokens=tokens, min_new_tokens=tokens, seed=1)
            try:
                results[name] = stub.Converse(
                    pb.ConverseRequest(text="go", output=pb.OUTPUT_MODALITY_SPEECH, sampling=sampling), timeout=60
                )
            except grpc.RpcError as e:
                results[name] = e.code()

        threads = [threading.Thread(target=run, args=("short", 30)), threading.Thread(target=run, args=("long", 800))]
        for t in threads:
            t.start()
        time.sleep(1.0)
        t0 = time.monotonic()
        svc.proc.terminate()
        svc.proc.wait(30)
        took = time.monotonic() - t0
        for t in threads:
            t.join(30)
        assert svc.proc.returncode == 0
        assert took < 4 + 5, took  # drain bound + shutdown
        assert isinstance(results["short"], pb.ConverseResponse)  # finished during the drain
        assert results["long"] in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)  # cut at the bound
        assert "draining" in svc.logs()
        channel.close()
    finally:
        svc.stop()
