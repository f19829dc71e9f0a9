"""Adversarial inputs for every field of the public API, against the real service and the session's real
tritonserver: each bad input must get its documented status (never INTERNAL or UNKNOWN), its message must carry
no addresses, paths, object reprs or internal model names, and the server must keep serving.

The figure in the README ("bad inputs tried vs answered with the right status") is what
`test_every_bad_input_gets_the_right_status` prints.
"""

from __future__ import annotations

import io
import re
import struct
import threading
import time

import grpc
import numpy as np
import pytest
import soundfile as sf
from service_support import ServiceProcess

from moss_speech.services.api import speech_pb2 as pb
from moss_speech.services.api import speech_pb2_grpc

pytestmark = pytest.mark.slow

C = grpc.StatusCode
LEAKS = re.compile(
    r"0x[0-9a-fA-F]{4,}|object at|Traceback|KeyError|(?:/[\w.@-]+){2,}|\b[\w.-]+:\d{3,5}\b"
    r"|(?<![\w-])(s2s|t2s|llm|vocoder|speech_encoder|ensemble)(?![\w-])|_io\."
)


def wav(samples: np.ndarray, rate: int, channels: int = 1) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples.reshape(-1, channels), rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def wav_claiming_rate(rate: int) -> bytes:
    """A valid 1 s 16 kHz WAV whose header claims `rate` Hz."""
    data = bytearray(wav(np.zeros(16000, np.float32), 16000))
    data[24:28] = struct.pack("<I", rate)
    data[28:32] = struct.pack("<I", min(rate * 2, 2**32 - 1))
    return bytes(data)


def audio(data: bytes, encoding=pb.AUDIO_ENCODING_CONTAINER, rate: int = 0, channels: int = 0) -> pb.AudioInput:
    return pb.AudioInput(data=data, format=pb.AudioFormat(encoding=encoding, sample_rate=rate, channels=channels))


def converse(**kw) -> pb.ConverseRequest:
    kw.setdefault("output", pb.OUTPUT_MODALITY_TEXT)
    return pb.ConverseRequest(**kw)


PCM16 = pb.AUDIO_ENCODING_PCM16
F32 = pb.AUDIO_ENCODING_FLOAT32
CONVERSE_CASES = {
    "no input": (converse(), C.INVALID_ARGUMENT),
    "blank text": (converse(text="   \n"), C.INVALID_ARGUMENT),
    "text over max_text_chars": (converse(text="a" * 201), C.INVALID_ARGUMENT),
    "empty container": (converse(audio=audio(b"")), C.INVALID_ARGUMENT),
    "garbage container": (converse(audio=audio(b"RIFF\x00\x00garbage" * 10)), C.INVALID_ARGUMENT),
    "2 bytes PCM16 at 192 kHz": (converse(audio=audio(b"\x01\x00", PCM16, 192000)), C.INVALID_ARGUMENT),
    "1-sample WAV at 44.1 kHz": (converse(audio=audio(wav(np.array([0.1], np.float32), 44100))), C.INVALID_ARGUMENT),
    "WAV claiming 2^31-1 Hz": (converse(audio=audio(wav_claiming_rate(2**31 - 1))), C.INVALID_ARGUMENT),
    "WAV claiming 1 Hz": (converse(audio=audio(wav_claiming_rate(1))), C.INVALID_ARGUMENT),
    "WAV with 16 channels": (
        converse(audio=audio(wav(np.zeros(16000 * 16, np.float32), 16000, 16))),
        C.INVALID_ARGUMENT,
    ),
    "raw PCM16 without rate": (converse(audio=audio(b"\x00" * 3200, PCM16)), C.INVALID_ARGUMENT),
    "raw PCM16 odd bytes": (converse(audio=audio(b"\x00" * 3201, PCM16, 16000)), C.INVALID_ARGUMENT),
    "raw PCM16 negative rate": (converse(audio=audio(b"\x00" * 3200, PCM16, -16000)), C.INVALID_ARGUMENT),
    "raw PCM16 1000 channels": (converse(audio=audio(b"\x00" * 32000, PCM16, 16000, 1000)), C.INVALID_ARGUMENT),
    "raw float32 NaN": (converse(audio=audio(np.full(16000, np.nan, "<f4").tobytes(), F32, 16000)), C.INVALID_ARGUMENT),
    "raw float32 Inf": (converse(audio=audio(np.full(16000, np.inf, "<f4").tobytes(), F32, 16000)), C.INVALID_ARGUMENT),
    "unknown encoding": (converse(audio=audio(b"\x00" * 3200, 99, 16000)), C.INVALID_ARGUMENT),
    "audio over max_audio_seconds": (converse(audio=audio(b"\x00" * 2 * 8000 * 6, PCM16, 8000)), C.RESOURCE_EXHAUSTED),
    "message over max_message_bytes": (
        converse(audio=audio(b"\x00" * (2 * 1024 * 1024), PCM16, 16000)),
        C.RESOURCE_EXHAUSTED,
    ),
    "unknown output modality": (converse(text="hi", output=7), C.INVALID_ARGUMENT),
    "voice id of 10k chars": (converse(text="hi", voice="v" * 10000), C.INVALID_ARGUMENT),
    "unknown voice": (converse(text="hi", voice="no-such-voice"), (C.INVALID_ARGUMENT, C.NOT_FOUND)),
    "temperature < 0": (converse(text="hi", sampling=pb.Sampling(temperature=-1)), C.INVALID_ARGUMENT),
    "temperature NaN": (converse(text="hi", sampling=pb.Sampling(temperature=float("nan"))), C.INVALID_ARGUMENT),
    "temperature Inf": (converse(text="hi", sampling=pb.Sampling(temperature=float("inf"))), C.INVALID_ARGUMENT),
    "top_p 0": (converse(text="hi", sampling=pb.Sampling(top_p=0)), C.INVALID_ARGUMENT),
    "top_p 2": (converse(text="hi", sampling=pb.Sampling(top_p=2)), C.INVALID_ARGUMENT),
    "top_k < 0": (converse(text="hi", sampling=pb.Sampling(top_k=-1)), C.INVALID_ARGUMENT),
    "repetition_penalty 0": (converse(text="hi", sampling=pb.Sampling(repetition_penalty=0)), C.INVALID_ARGUMENT),
    "max_new_tokens 0": (converse(text="hi", sampling=pb.Sampling(max_new_tokens=0)), C.INVALID_ARGUMENT),
    "max_new_tokens 2^31-1": (converse(text="hi", sampling=pb.Sampling(max_new_tokens=2**31 - 1)), C.INVALID_ARGUMENT),
    "min_new_tokens > max_new_tokens": (
        converse(text="hi", sampling=pb.Sampling(max_new_tokens=4, min_new_tokens=5)),
        C.INVALID_ARGUMENT,
    ),
    "min_new_tokens < 0": (converse(text="hi", sampling=pb.Sampling(min_new_tokens=-1)), C.INVALID_ARGUMENT),
    "temperature 0 with do_sample": (
        converse(text="hi", sampling=pb.Sampling(temperature=0, do_sample=True)),
        C.INVALID_ARGUMENT,
    ),
    "seed 2^64-1": (converse(text="hi", sampling=pb.Sampling(seed=2**64 - 1)), C.INVALID_ARGUMENT),
    "system_prompt over the limit": (converse(text="hi", system_prompt="s" * 4001), C.INVALID_ARGUMENT),
    "unknown session": (converse(text="hi", session_id="0" * 32), C.NOT_FOUND),
    "garbage session id": (converse(text="hi", session_id="../../etc/passwd\x00" * 100), C.NOT_FOUND),
}


def _rpc(stub, name: str, request, **kw):
    return getattr(stub, name)(request, timeout=60, **kw)


def _stream(stub, messages):
    return list(stub.StreamConverse(iter(messages), timeout=60))


def _cfg(**kw):
    kw.setdefault("output", pb.OUTPUT_MODALITY_TEXT)
    return pb.StreamConverseRequest(config=pb.StreamConfig(**kw))


EOT = pb.StreamConverseRequest(end_of_turn=pb.EndOfTurn())
STREAM_CASES = {
    "stream: empty": ([], C.INVALID_ARGUMENT),
    "stream: audio before config": ([pb.StreamConverseRequest(audio=b"\x00\x00")], C.INVALID_ARGUMENT),
    "stream: config twice": ([_cfg(), _cfg()], C.INVALID_ARGUMENT),
    "stream: empty message": ([_cfg(), pb.StreamConverseRequest()], C.INVALID_ARGUMENT),
    "stream: end_of_turn without input": ([_cfg(), EOT], C.INVALID_ARGUMENT),
    "stream: text then audio": (
        [_cfg(), pb.StreamConverseRequest(text="hi"), pb.StreamConverseRequest(audio=b"\x00\x00")],
        C.INVALID_ARGUMENT,
    ),
    "stream: text over the limit in pieces": (
        [_cfg()] + [pb.StreamConverseRequest(text="a" * 50)] * 5 + [EOT],
        C.INVALID_ARGUMENT,
    ),
    "stream: container audio over the buffer": (
        [_cfg()] + [pb.StreamConverseRequest(audio=b"\x00" * 1_000_000)] * 20 + [EOT],
        C.RESOURCE_EXHAUSTED,
    ),
    "stream: raw audio without rate": ([_cfg(input_format=pb.AudioFormat(encoding=PCM16))], C.INVALID_ARGUMENT),
    "stream: 2 bytes PCM16 at 192 kHz": (
        [
            _cfg(input_format=pb.AudioFormat(encoding=PCM16, sample_rate=192000)),
            pb.StreamConverseRequest(audio=b"\x01\x00"),
            EOT,
        ],
        C.INVALID_ARGUMENT,
    ),
    "stream: 1-sample WAV": (
        [_cfg(), pb.StreamConverseRequest(audio=wav(np.array([0.1], np.float32), 44100)), EOT],
        C.INVALID_ARGUMENT,
    ),
    "stream: WAV claiming 2^31-1 Hz": (
        [_cfg(), pb.StreamConverseRequest(audio=wav_claiming_rate(2**31 - 1)), EOT],
        C.INVALID_ARGUMENT,
    ),
    "stream: unknown session": ([_cfg(session_id="f" * 32)], C.NOT_FOUND),
    "stream: system_prompt over the limit": ([_cfg(system_prompt="s" * 4001)], C.INVALID_ARGUMENT),
    "stream: max_new_tokens over the cap": ([_cfg(sampling=pb.Sampling(max_new_tokens=100000))], C.INVALID_ARGUMENT),
}


class Tally:
    def __init__(self) -> None:
        self.tried = self.right = 0
        self.wrong: list[str] = []
        self.leaks: list[str] = []

    def check(self, name: str, fn, expected) -> None:
        expected = expected if isinstance(expected, tuple) else (expected,)
        self.tried += 1
        try:
            fn()
            code, details = C.OK, ""
        except grpc.RpcError as e:
            code, details = e.code(), e.details() or ""
        if code in expected:
            self.right += 1
        else:
            self.wrong.append(f"{name}: {code.name} {details!r}")
        if LEAKS.search(details.split(" [request_id=")[0]):
            self.leaks.append(f"{name}: {details!r}")


def _raw(channel: grpc.Channel, method: str, client_streaming: bool, payload: bytes):
    path = f"/moss_speech.v1.MossSpeech/{method}"
    if client_streaming:
        call = channel.stream_stream(path, request_serializer=None, response_deserializer=None)
        return lambda: list(call(iter([payload]), timeout=30))
    call = channel.unary_unary(path, request_serializer=None, response_deserializer=None)
    return lambda: call(payload, timeout=30)


def test_every_bad_input_gets_the_right_status(service, stub) -> None:
    t = Tally()
    for name, (request, expected) in CONVERSE_CASES.items():
        t.check(f"Converse: {name}", lambda r=request: _rpc(stub, "Converse", r), expected)
    for name, (messages, expected) in STREAM_CASES.items():
        t.check(name, lambda m=messages: _stream(stub, m), expected)
    sid = stub.CreateSession(pb.CreateSessionRequest(), timeout=10).session_id
    session_cases = {
        "GetSession: empty id": (lambda: _rpc(stub, "GetSession", pb.GetSessionRequest()), C.NOT_FOUND),
        "GetSession: 1 MB id": (
            lambda: _rpc(stub, "GetSession", pb.GetSessionRequest(session_id="x" * 900_000)),
            C.NOT_FOUND,
        ),
        "DeleteSession: unknown": (
            lambda: _rpc(stub, "DeleteSession", pb.DeleteSessionRequest(session_id="a" * 32)),
            C.NOT_FOUND,
        ),
        "TruncateReply: negative": (
            lambda: _rpc(stub, "TruncateReply", pb.TruncateReplyRequest(session_id=sid, audio_end_ms=-5)),
            C.INVALID_ARGUMENT,
        ),
        "TruncateReply: no reply yet": (
            lambda: _rpc(stub, "TruncateReply", pb.TruncateReplyRequest(session_id=sid, audio_end_ms=10)),
            C.FAILED_PRECONDITION,
        ),
        "TruncateReply: unknown session": (
            lambda: _rpc(stub, "TruncateReply", pb.TruncateReplyRequest(session_id="b" * 32)),
            C.NOT_FOUND,
        ),
        "CreateSession: system_prompt over the limit": (
            lambda: _rpc(stub, "CreateSession", pb.CreateSessionRequest(system_prompt="s" * 4001)),
            C.INVALID_ARGUMENT,
        ),
    }
    for name, (fn, expected) in session_cases.items():
        t.check(name, fn, expected)
    # A malformed protobuf body for every method of the service (new RPCs included).
    with grpc.insecure_channel(service.address) as channel:
        for method in pb.DESCRIPTOR.services_by_name["MossSpeech"].methods:
            for label, payload in (
                ("truncated varint", b"\x0a\xff\xff\xff"),
                ("bad wire type", b"\x0f\x01"),
                ("length past the end", b"\x12\x7f\x00"),
            ):
                t.check(
                    f"{method.name}: malformed protobuf ({label})",
                    _raw(channel, method.name, method.client_streaming, payload),
                    C.INVALID_ARGUMENT,
                )
    stub.DeleteSession(pb.DeleteSessionRequest(session_id=sid), timeout=10)

    print(
        f"\nADVERSARIAL: {t.tried} bad inputs tried, {t.right} answered with the right status; "
        f"wrong: {t.wrong}; leaks: {t.leaks}"
    )
    assert not t.wrong and not t.leaks
    assert service.health() == "SERVING"
    r = stub.Converse(converse(text="still there?"), timeout=60)
    assert r.usage.generated_tokens > 0


def test_delete_during_a_turn_is_refused_cleanly(service, stub) -> None:
    """DeleteSession while a turn runs on the session: FAILED_PRECONDITION, the turn finishes and commits, the
    session can be deleted afterwards (never INTERNAL)."""
    sid = stub.CreateSession(pb.CreateSessionRequest(), timeout=10).session_id
    result: dict = {}

    def turn():
        result["r"] = stub.Converse(
            converse(text="a long answer", session_id=sid, sampling=pb.Sampling(max_new_tokens=8)), timeout=60
        )

    th = threading.Thread(target=turn)
    th.start()
    codes = []
    deadline = time.monotonic() + 30
    while th.is_alive() and time.monotonic() < deadline:
        try:
            stub.DeleteSession(pb.DeleteSessionRequest(session_id=sid), timeout=10)
            codes.append(C.OK)
            break
        except grpc.RpcError as e:
            codes.append(e.code())
            assert e.code() == C.FAILED_PRECONDITION or (e.code() == C.NOT_FOUND and not th.is_alive()), e.details()
        time.sleep(0.01)
    th.join(60)
    assert result["r"].usage.generated_tokens > 0
    assert C.FAILED_PRECONDITION in codes or codes == [C.OK]
    if C.OK not in codes:
        stub.DeleteSession(pb.DeleteSessionRequest(session_id=sid), timeout=10)


def test_long_conversation_drops_old_turns_instead_of_getting_stuck(triton, tmp_path) -> None:
    """A history budget larger than the served context (1024 rows here) would make every turn fail once the
    context is full; the service derives the budget from the served context and drops old turns."""
    svc = ServiceProcess(
        triton.grpc_url, tmp_path / "svc.log", MOSS_SPEECH_MAX_CONTEXT_TOKENS="4096", MOSS_SPEECH_MAX_TEXT_CHARS="4000"
    ).start()
    try:
        with grpc.insecure_channel(svc.address) as ch:
            s = speech_pb2_grpc.MossSpeechStub(ch)
            sid = s.CreateSession(pb.CreateSessionRequest(), timeout=10).session_id
            dropped = 0
            for i in range(8):
                r = s.Converse(
                    converse(
                        text=f"turn {i} " + "word " * 40,
                        session_id=sid,
                        sampling=pb.Sampling(max_new_tokens=200, min_new_tokens=200),
                    ),
                    timeout=120,
                )
                dropped += r.usage.dropped_turns
                assert r.usage.generated_tokens > 0
            assert dropped > 0
            assert r.usage.history_tokens + r.usage.generated_tokens < 1024
    finally:
        svc.stop()
