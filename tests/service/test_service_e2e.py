"""The service against a real tritonserver serving the real (tiny) repository: modes, sessions, bad input,
cancellation, deadlines, metrics, health, reflection."""

from __future__ import annotations

import io
import json
import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest
import soundfile as sf
from tritonharness import metric

from moss_speech.services.api import speech_pb2 as pb
from moss_speech.services.metrics import LLM_ACTIVE_SEQUENCES

pytestmark = pytest.mark.slow  # a real tritonserver (and service)
SPEECH, TEXT = pb.OUTPUT_MODALITY_SPEECH, pb.OUTPUT_MODALITY_TEXT
SMALL = pb.Sampling(max_new_tokens=8, seed=1)


def wav(seconds: float = 1.0, rate: int = 22050, channels: int = 1, fmt: str = "WAV") -> bytes:
    t = np.arange(int(rate * seconds)) / rate
    x = (0.3 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t))).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, np.stack([x] * channels, 1) if channels > 1 else x, rate, format=fmt, subtype="PCM_16")
    return buf.getvalue()


def audio_in(data: bytes | None = None, **fmt) -> pb.AudioInput:
    return pb.AudioInput(data=wav() if data is None else data, format=pb.AudioFormat(**fmt))


def llm_active(triton) -> float:
    return metric(triton.metrics(), LLM_ACTIVE_SEQUENCES) or 0.0


def wait_llm_idle(triton, timeout: float = 10.0) -> float:
    t0 = time.monotonic()
    while llm_active(triton) > 0:
        assert time.monotonic() - t0 < timeout, "llm still holds KV slots"
        time.sleep(0.05)
    return time.monotonic() - t0


def stream_requests(cfg: pb.StreamConfig, turns: list[bytes | str], chunk: int = 8192):
    yield pb.StreamConverseRequest(config=cfg)
    for turn in turns:
        if isinstance(turn, str):
            yield pb.StreamConverseRequest(text=turn)
        else:
            for i in range(0, len(turn), chunk):
                yield pb.StreamConverseRequest(audio=turn[i : i + chunk])
        yield pb.StreamConverseRequest(end_of_turn=pb.EndOfTurn())


# --- modes ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("speech_in", [True, False], ids=["audio_in", "text_in"])
@pytest.mark.parametrize("output", [SPEECH, TEXT], ids=["speech_out", "text_out"])
def test_converse_every_mode(stub, speech_in, output):
    req = pb.ConverseRequest(output=output, sampling=SMALL)
    if speech_in:
        req.audio.CopyFrom(audio_in(wav(1.0, 44100, channels=2)))
    else:
        req.text = "hello there"
    r, call = stub.Converse.with_call(req, timeout=60)
    assert len(r.request_id) == 32
    assert dict(call.initial_metadata())["x-request-id"] == r.request_id
    assert r.usage.generated_tokens == 8 and r.usage.stop_reason == "max_new_tokens"
    assert r.usage.prompt_tokens > 0 and r.timings.total_ms > 0
    if output == SPEECH:
        assert r.sample_rate == 24000 and len(r.audio_pcm16) > 0 and len(r.audio_pcm16) % 2 == 0
        assert r.timings.time_to_first_audio_ms > 0 and r.timings.real_time_factor > 0
        assert r.timings.audio_seconds == pytest.approx(len(r.audio_pcm16) / 2 / 24000)
    else:
        assert r.text and not r.audio_pcm16


@pytest.mark.parametrize("raw", ["pcm16", "float32", "flac"])
def test_converse_raw_and_flac_audio(stub, raw):
    x = (0.3 * np.sin(np.arange(8000) / 5)).astype(np.float32)
    if raw == "pcm16":
        a = audio_in((x * 32767).astype("<i2").tobytes(), encoding=pb.AUDIO_ENCODING_PCM16, sample_rate=8000)
    elif raw == "float32":
        a = audio_in(x.astype("<f4").tobytes(), encoding=pb.AUDIO_ENCODING_FLOAT32, sample_rate=48000, channels=1)
    else:
        a = audio_in(wav(0.5, 16000, fmt="FLAC"))
    r = stub.Converse(pb.ConverseRequest(audio=a, output=TEXT, sampling=SMALL), timeout=60)
    assert r.usage.generated_tokens == 8


def test_stream_speech_chunks_in_order_and_final(stub):
    cfg = pb.StreamConfig(
        output=SPEECH,
        sampling=pb.Sampling(max_new_tokens=24, seed=2),
        input_format=pb.AudioFormat(encoding=pb.AUDIO_ENCODING_CONTAINER),
    )
    responses = list(stub.StreamConverse(stream_requests(cfg, [wav(1.0)]), timeout=60))
    audio = [r.audio for r in responses if r.WhichOneof("kind") == "audio"]
    assert [a.sequence for a in audio] == list(range(len(audio))) and len(audio) >= 2
    assert all(a.sample_rate == 24000 for a in audio)
    final = responses[-1]
    assert final.WhichOneof("kind") == "final" and final.final.usage.generated_tokens == 24
    assert {r.request_id for r in responses} == {final.request_id}
    assert final.final.timings.time_to_first_audio_ms < final.final.timings.total_ms


def test_stream_text_deltas(stub):
    cfg = pb.StreamConfig(output=TEXT, sampling=SMALL)
    responses = list(stub.StreamConverse(stream_requests(cfg, ["what is up"]), timeout=60))
    deltas = [r.text.text for r in responses if r.WhichOneof("kind") == "text"]
    assert deltas and "".join(deltas) == responses[-1].final.text


# --- sessions --------------------------------------------------------------------------------------------------
def test_three_turn_session_keeps_history_isolated(stub):
    a = stub.CreateSession(pb.CreateSessionRequest(), timeout=10).session_id
    b = stub.CreateSession(pb.CreateSessionRequest(), timeout=10).session_id
    history = []
    for i, turn in enumerate([audio_in(), "and then?", audio_in(wav(0.7, 8000))]):
        req = pb.ConverseRequest(session_id=a, output=TEXT if i % 2 else SPEECH, sampling=SMALL)
        if isinstance(turn, str):
            req.text = turn
        else:
            req.audio.CopyFrom(turn)
        r = stub.Converse(req, timeout=60)
        history.append(r.usage.history_tokens)
        assert r.session_id == a
    s = stub.GetSession(pb.GetSessionRequest(session_id=a), timeout=10)
    assert history[0] == 0 < history[1] < history[2]  # every turn adds its TURN_ROWS
    assert s.turns == 3 and s.history_tokens > history[2] and not s.busy and s.request_id
    # the other session saw none of it
    r = stub.Converse(pb.ConverseRequest(session_id=b, text="hi", output=TEXT, sampling=SMALL), timeout=60)
    assert r.usage.history_tokens == 0
    assert stub.GetSession(pb.GetSessionRequest(session_id=b), timeout=10).turns == 1


def test_stream_multi_turn_and_context_truncation(stub):
    """MAX_CONTEXT_TOKENS=128: six turns in one stream overflow it; the oldest turns go and the result says so."""
    sid = stub.CreateSession(pb.CreateSessionRequest(), timeout=10).session_id
    cfg = pb.StreamConfig(session_id=sid, output=TEXT, sampling=SMALL)
    finals = [
        r.final
        for r in stub.StreamConverse(stream_requests(cfg, ["one", "two", "three", "four", "five", "six"]), timeout=120)
        if r.WhichOneof("kind") == "final"
    ]
    assert [f.turn_index for f in finals] == [0, 1, 2, 3, 4, 5]
    assert all(f.usage.history_tokens <= 128 for f in finals)
    truncated = [f for f in finals if f.usage.context_truncated]
    assert truncated and all(f.usage.dropped_turns >= 1 for f in truncated)
    s = stub.GetSession(pb.GetSessionRequest(session_id=sid), timeout=10)
    assert s.dropped_turns == sum(f.usage.dropped_turns for f in finals) and s.turns < 6


def test_two_streams_on_one_session_fail_precondition(stub, triton):
    sid = stub.CreateSession(pb.CreateSessionRequest(), timeout=10).session_id
    gate = threading.Event()

    def first_stream():
        yield pb.StreamConverseRequest(config=pb.StreamConfig(session_id=sid, output=TEXT, sampling=SMALL))
        gate.wait(30)

    call = stub.StreamConverse(first_stream(), timeout=60)
    time.sleep(0.5)  # the first stream now holds the session
    with pytest.raises(grpc.RpcError) as e:
        list(stub.StreamConverse(stream_requests(pb.StreamConfig(session_id=sid, output=TEXT), ["x"]), timeout=30))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.RpcError) as e:
        stub.Converse(pb.ConverseRequest(session_id=sid, text="x"), timeout=30)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    gate.set()
    assert list(call) == []  # closed without a turn
    stub.Converse(pb.ConverseRequest(session_id=sid, text="now", output=TEXT, sampling=SMALL), timeout=60)


def test_delete_session(stub):
    sid = stub.CreateSession(pb.CreateSessionRequest(), timeout=10).session_id
    assert stub.DeleteSession(pb.DeleteSessionRequest(session_id=sid), timeout=10).session_id == sid
    with pytest.raises(grpc.RpcError) as e:
        stub.GetSession(pb.GetSessionRequest(session_id=sid), timeout=10)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


# --- bad input: each gets its status, and the server keeps serving ----------------------------------------------
BAD = {
    "no_input": (pb.ConverseRequest(), grpc.StatusCode.INVALID_ARGUMENT, "neither"),
    "empty_text": (pb.ConverseRequest(text="  "), grpc.StatusCode.INVALID_ARGUMENT, "empty"),
    "long_text": (pb.ConverseRequest(text="x" * 201), grpc.StatusCode.INVALID_ARGUMENT, "max_text_chars"),
    "empty_audio": (pb.ConverseRequest(audio=audio_in(b"")), grpc.StatusCode.INVALID_ARGUMENT, "empty"),
    "corrupt_audio": (
        pb.ConverseRequest(audio=audio_in(b"RIFF" + bytes(range(256)) * 4)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "decode",
    ),
    "raw_no_rate": (
        pb.ConverseRequest(audio=audio_in(b"\x00\x01" * 800, encoding=pb.AUDIO_ENCODING_PCM16)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "sample_rate",
    ),
    "absurd_rate": (
        pb.ConverseRequest(audio=audio_in(b"\x00\x01" * 800, encoding=pb.AUDIO_ENCODING_PCM16, sample_rate=5_000_000)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "sample_rate",
    ),
    "odd_pcm_bytes": (
        pb.ConverseRequest(audio=audio_in(b"\x00" * 801, encoding=pb.AUDIO_ENCODING_PCM16, sample_rate=16000)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "frames",
    ),
    "too_long_audio": (
        pb.ConverseRequest(audio=audio_in(wav(6.0, 8000))),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "max_audio_seconds",
    ),
    "too_big_message": (
        pb.ConverseRequest(audio=audio_in(b"\x00" * (1024 * 1024 + 10))),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "larger than max",
    ),
    "bad_temperature": (
        pb.ConverseRequest(text="hi", sampling=pb.Sampling(temperature=-1)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "temperature",
    ),
    "bad_top_p": (
        pb.ConverseRequest(text="hi", sampling=pb.Sampling(top_p=2)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "top_p",
    ),
    "min_over_max": (
        pb.ConverseRequest(text="hi", sampling=pb.Sampling(max_new_tokens=0)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "max_new_tokens",
    ),
    "bad_output": (pb.ConverseRequest(text="hi", output=7), grpc.StatusCode.INVALID_ARGUMENT, "output modality"),
    "unknown_session": (pb.ConverseRequest(text="hi", session_id="nope"), grpc.StatusCode.NOT_FOUND, "session"),
    "unknown_voice": (
        pb.ConverseRequest(text="hi", voice="nobody", sampling=SMALL),
        grpc.StatusCode.INVALID_ARGUMENT,
        "voice",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_converse_input(stub, case):
    req, code, words = BAD[case]
    with pytest.raises(grpc.RpcError) as e:
        stub.Converse(req, timeout=60)
    assert e.value.code() == code, e.value.details()
    assert words in e.value.details()
    if code != grpc.StatusCode.RESOURCE_EXHAUSTED or case != "too_big_message":
        assert "request_id=" in e.value.details()
    ok = stub.Converse(pb.ConverseRequest(text="still there?", output=TEXT, sampling=SMALL), timeout=60)
    assert ok.usage.generated_tokens == 8


@pytest.mark.parametrize(
    "messages, words",
    [
        ([pb.StreamConverseRequest(text="hi")], "first message"),
        (
            [pb.StreamConverseRequest(config=pb.StreamConfig()), pb.StreamConverseRequest(end_of_turn=pb.EndOfTurn())],
            "without audio or text",
        ),
        (
            [pb.StreamConverseRequest(config=pb.StreamConfig()), pb.StreamConverseRequest(config=pb.StreamConfig())],
            "only allowed as the first",
        ),
        (
            [
                pb.StreamConverseRequest(
                    config=pb.StreamConfig(
                        input_format=pb.AudioFormat(encoding=pb.AUDIO_ENCODING_FLOAT32, sample_rate=-5)
                    )
                )
            ],
            "sample_rate",
        ),
        ([pb.StreamConverseRequest(config=pb.StreamConfig(sampling=pb.Sampling(top_k=-1)))], "top_k"),
    ],
    ids=["no_config", "empty_turn", "second_config", "bad_rate", "bad_sampling"],
)
def test_bad_stream_input(stub, messages, words):
    with pytest.raises(grpc.RpcError) as e:
        list(stub.StreamConverse(iter(messages), timeout=30))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in e.value.details()


def test_stream_audio_over_limit_resource_exhausted(stub):
    cfg = pb.StreamConfig(output=TEXT, input_format=pb.AudioFormat(encoding=pb.AUDIO_ENCODING_PCM16, sample_rate=16000))
    with pytest.raises(grpc.RpcError) as e:
        list(stub.StreamConverse(stream_requests(cfg, [b"\x00\x00" * 16000 * 6], chunk=64000), timeout=30))
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_audio_seconds" in e.value.details()


# --- cancellation and deadlines -------------------------------------------------------------------------------
LONG = pb.Sampling(max_new_tokens=800, min_new_tokens=800, seed=3)


def test_client_cancel_mid_stream_frees_llm_slot(stub, service, triton):
    cfg = pb.StreamConfig(output=SPEECH, sampling=LONG)
    call = stub.StreamConverse(stream_requests(cfg, ["talk for a long time"]), timeout=120)
    first = next(call)
    assert first.WhichOneof("kind") == "audio"
    assert llm_active(triton) >= 1  # generating
    call.cancel()
    took = wait_llm_idle(triton, timeout=5)
    assert took < 5
    time.sleep(0.3)
    logs = [json.loads(line) for line in service.logs().splitlines() if line.startswith("{")]
    cancelled = [x for x in logs if x["msg"] == "cancelled llm job"]
    assert any(x["cancelled_request_id"] == first.request_id for x in cancelled)
    assert service.metric("moss_speech_requests_total", method="StreamConverse", status="CANCELLED") >= 1


def test_deadline_exceeded_cancels_llm_job(stub, triton):
    with pytest.raises(grpc.RpcError) as e:
        stub.Converse(pb.ConverseRequest(text="long answer please", output=SPEECH, sampling=LONG), timeout=1.0)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_llm_idle(triton, timeout=5)


# --- voices, health, reflection, metrics ---------------------------------------------------------------------
def test_list_voices(stub):
    r = stub.ListVoices(pb.ListVoicesRequest(), timeout=10)
    assert r.request_id and [v.voice_id for v in r.voices if v.is_default] == ["default"]


def test_health_and_reflection(service):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    assert service.health() == "SERVING"
    with grpc.insecure_channel(service.address) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        reply = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in reply.list_services_response.service}
    assert {"moss_speech.v1.MossSpeech", "grpc.health.v1.Health"} <= names


def test_metrics_reflect_traffic(stub, service):
    before = service.metric("moss_speech_requests_total", method="Converse", mode="t2s", status="OK") or 0
    ttfa_before = service.metric("moss_speech_time_to_first_audio_seconds_count") or 0
    stub.Converse(pb.ConverseRequest(text="count me", output=SPEECH, sampling=SMALL), timeout=60)
    with pytest.raises(grpc.RpcError):  # one refused request, so the test does not depend on the others
        stub.Converse(pb.ConverseRequest(output=SPEECH), timeout=60)
    stub.CreateSession(pb.CreateSessionRequest(), timeout=10)
    text = service.metrics()
    assert metric(text, "moss_speech_requests_total", method="Converse", mode="t2s", status="OK") == before + 1
    assert metric(text, "moss_speech_time_to_first_audio_seconds_count") == ttfa_before + 1
    assert metric(text, "moss_speech_real_time_factor_count") >= 1
    assert metric(text, "moss_speech_generated_tokens_total", channel="audio") >= 8
    assert metric(text, "moss_speech_requests_total", status="INVALID_ARGUMENT") >= 1
    assert metric(text, "moss_speech_active_streams") == 0
    assert metric(text, "moss_speech_sessions") >= 1
    assert urllib.request.urlopen(f"http://localhost:{service.metrics_port}/metrics", timeout=5).status == 200


def test_running_service_exports_every_registry_family(service):
    """The chart's autoscaling rules are checked against `ServiceMetrics`' registry (tests/helm); this ties that
    registry to what the running service really serves on its metrics port."""
    from moss_speech.services.metrics import ACTIVE_STREAMS, ServiceMetrics

    def families(text: str) -> set[str]:
        return {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}

    contracted = families(ServiceMetrics().exposition().decode())
    exported = families(service.metrics())
    assert ACTIVE_STREAMS in contracted and contracted <= exported, sorted(contracted - exported)


# --- the `moss-speech ask` client --------------------------------------------------------------------------------
@pytest.mark.parametrize("source", ["audio", "text"])
def test_ask_cli_streams_answer_to_wav(service, tmp_path, source):
    import subprocess
    import sys

    out = tmp_path / "answer.wav"
    question = tmp_path / "q.wav"
    question.write_bytes(wav(1.0, 16000))
    src = ["--audio", str(question)] if source == "audio" else ["--text", "hello"]
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "moss_speech.cli.main",
            "ask",
            *src,
            "--out",
            str(out),
            "--server",
            service.address,
            "--plaintext",
            "--new-session",
            "--max-new-tokens",
            "16",
            "--seed",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "time to first audio" in r.stderr and "real-time factor" in r.stderr and "session:" in r.stderr
    data, rate = sf.read(out)
    assert rate == 24000 and len(data) > 0
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "moss_speech.cli.main",
            "ask",
            "--text",
            "hi",
            "--server",
            service.address,
            "--plaintext",
            "--session",
            "missing",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 1 and "NOT_FOUND" in bad.stderr
