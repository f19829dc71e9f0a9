"""Status mapping of the service without Triton: exceptions -> gRPC status (`to_status`), model error messages ->
status (`model_error`, fed with the messages the adapters really send), Triton RPC failures (`rpc_error`) and the
proto -> contract sampling conversion. The served paths are covered end to end in tests/service."""

from __future__ import annotations

import grpc
import pytest
from pydantic import ValidationError

from moss_speech.contract.audio import AudioError
from moss_speech.contract.sampling import SamplingParams
from moss_speech.services.api import speech_pb2 as pb
from moss_speech.services.server import ServiceError, sampling_from_proto, to_status
from moss_speech.services.sessions import (
    NoReplyError,
    SessionBusyError,
    SessionLimitError,
    SessionNotFoundError,
)
from moss_speech.services.triton_client import TritonCallError, model_error, rpc_error

Code = grpc.StatusCode
ENSEMBLE = "in ensemble 's2s', "  # how tritonserver prefixes an error of a composing model


def validation_error() -> ValidationError:
    with pytest.raises(ValidationError) as e:
        SamplingParams(top_p=2.0)
    return e.value


@pytest.mark.parametrize(
    "exc, code, words",
    [
        (ServiceError(Code.INVALID_ARGUMENT, "text input is empty"), Code.INVALID_ARGUMENT, "text input is empty"),
        (AudioError("decode", "cannot decode the audio"), Code.INVALID_ARGUMENT, "audio: cannot decode"),
        (AudioError("too_long", "6.0 s is over max_audio_seconds 5"), Code.RESOURCE_EXHAUSTED, "max_audio_seconds"),
        (SessionNotFoundError("abc"), Code.NOT_FOUND, "abc"),
        (SessionBusyError("session abc is in use"), Code.FAILED_PRECONDITION, "in use"),
        (NoReplyError("no spoken answer to truncate"), Code.FAILED_PRECONDITION, "no spoken answer"),
        (SessionLimitError("max_sessions reached"), Code.RESOURCE_EXHAUSTED, "max_sessions"),
        (
            TritonCallError(Code.UNAVAILABLE, "Triton at x:1 is unavailable", "unavailable"),
            Code.UNAVAILABLE,
            "unavailable",
        ),
        (RuntimeError("boom"), Code.INTERNAL, "internal error"),  # details go to the log, never to the client
    ],
    ids=["service", "bad_audio", "long_audio", "no_session", "busy", "no_reply", "session_limit", "triton", "other"],
)
def test_exceptions_map_to_their_status(exc, code, words):
    got_code, message = to_status(exc)
    assert got_code == code and words in message


def test_sampling_validation_names_the_field_and_leaks_no_internals():
    code, message = to_status(validation_error())
    assert code == Code.INVALID_ARGUMENT
    assert message.startswith("invalid sampling parameters: top_p:") and "pydantic" not in message.lower()
    assert "Traceback" not in message and "/" not in message.split(":", 1)[1].replace("http", "")


def test_sampling_from_proto_overrides_only_the_fields_set():
    defaults = SamplingParams(max_new_tokens=64, temperature=0.8).model_dump()
    got = sampling_from_proto(pb.Sampling(top_k=5, seed=3), defaults)
    assert (got.top_k, got.seed, got.max_new_tokens, got.temperature) == (5, 3, 64, 0.8)
    assert sampling_from_proto(pb.Sampling(), defaults) == SamplingParams(**defaults)
    with pytest.raises(ValidationError, match="top_k"):
        sampling_from_proto(pb.Sampling(top_k=-1), defaults)


def context_message() -> str:
    from moss_speech.builders.llm.generate import ContextLengthError, check_context

    with pytest.raises(ContextLengthError) as e:
        check_context(1300, 1024, "the served context")
    return f"invalid request: {e.value}"  # as the llm adapter words it


# (message a model sends, status, metrics kind); every producer is named.
MODEL_ERRORS = {
    # llm adapter: request checks, sampling validation, context, full queue, failed step
    "both_inputs": ("invalid request: exactly one of CODES (speech) and TEXT must be given", Code.INVALID_ARGUMENT),
    "empty_turn": ("invalid request: the text turn is empty", Code.INVALID_ARGUMENT),
    "sampling": (
        "invalid request: 1 validation error for SamplingParams\ntop_p\n  Input should be less than or equal to 1",
        Code.INVALID_ARGUMENT,
    ),
    "context": (None, Code.RESOURCE_EXHAUSTED),  # filled from check_context below
    "queue_full": ("64 requests are already waiting (max_queue 64)", Code.UNAVAILABLE),
    "step_failed": ("generation failed: RuntimeError: onnxruntime error", Code.INTERNAL),
    # speech_encoder
    "empty_audio": ("AUDIO is empty", Code.INVALID_ARGUMENT),
    "nan_audio": ("AUDIO contains NaN or Inf", Code.INVALID_ARGUMENT),
    "long_audio": (
        "AUDIO has 960000 samples; the limit is 480000 (max_audio_seconds, `moss-speech build --max-audio-seconds`)",
        Code.RESOURCE_EXHAUSTED,
    ),
    # vocoder
    "unknown_voice": ("unknown voice 'nobody'; known voices: default", Code.INVALID_ARGUMENT),
    "vocoder_failed": ("vocoder failed: shape mismatch", Code.INTERNAL),
    # tritonserver itself
    "no_model": ("Request for unknown model: 's2s' is not found", Code.UNAVAILABLE),
}


@pytest.mark.parametrize("case", list(MODEL_ERRORS))
def test_model_error_messages_map_to_their_status(case):
    message, code = MODEL_ERRORS[case]
    message = message or context_message()
    for wording in (message, ENSEMBLE + message):  # called directly or through an ensemble
        err = model_error(wording)
        assert err.code == code, (wording, err.code)
        assert err.message == wording  # the client sees the model's own words


class FakeRpcError(grpc.aio.AioRpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


@pytest.mark.parametrize(
    "code, want, kind",
    [
        (Code.DEADLINE_EXCEEDED, Code.DEADLINE_EXCEEDED, "deadline"),
        (Code.CANCELLED, Code.CANCELLED, "cancelled"),
        (Code.UNAVAILABLE, Code.UNAVAILABLE, "unavailable"),
        (Code.INTERNAL, Code.UNAVAILABLE, "rpc_error"),  # any other transport failure: retryable
    ],
)
def test_rpc_errors_map_to_their_status(code, want, kind):
    err = rpc_error(FakeRpcError(code, "connection refused"), "triton:8001")
    assert (err.code, err.kind) == (want, kind)
    if want == Code.UNAVAILABLE:
        assert "triton:8001" in err.message or code.name in err.message
