"""The public gRPC service (`moss_speech.v1.MossSpeech`) in front of Triton, on `grpc.aio`.

Per turn: validate → decode audio to 16 kHz → hold the session (history) → stream the ensemble's responses
to the client (text deltas, PCM16 audio chunks) → commit TURN_ROWS to the session → final message with usage
and timings. Also served: `grpc.health.v1` (SERVING only while Triton and both ensembles are ready), server
reflection, Prometheus metrics (ServiceMetrics) on their own port.

Status codes (see `to_status`): bad input (malformed protobuf included) → INVALID_ARGUMENT, unknown session or
another key's → NOT_FOUND, session in use → FAILED_PRECONDITION, audio over max_audio_seconds / message over
max_message_bytes / no session room / a per-key limit → RESOURCE_EXHAUSTED (limits with `retry-after-ms` and a
`google.rpc.RetryInfo` detail), missing or wrong API key → UNAUTHENTICATED, Triton down → UNAVAILABLE, deadline or
an idle stream → DEADLINE_EXCEEDED. Messages never carry addresses, paths, object reprs or internal model names
(`public_message`). Every response carries a request id (field `request_id`, and `x-request-id` metadata, also on
errors). Security (TLS, keys, limits, ownership): docs/security.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import re
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
from google.protobuf import duration_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import Counter
from pydantic import ValidationError

from moss_speech.contract.audio import INPUT_RATE, OUTPUT_RATE
from moss_speech.contract.sampling import FIELDS as SAMPLING_FIELDS
from moss_speech.contract.sampling import SamplingParams
from moss_speech.services.api import SERVICE_NAME, speech_pb2, speech_pb2_grpc
from moss_speech.services.audio_io import AudioError, AudioSpec, InputAudioBuffer, decode, to_pcm16
from moss_speech.services.auth import ApiKeys, AuthError, key_id_var
from moss_speech.services.guard import MalformedMessage, guarded_handler
from moss_speech.services.lifecycle import wait_for_stop_signal
from moss_speech.services.limits import Limiter, LimitError, Limits, rate_limit_metadata
from moss_speech.services.logging import get_logger, new_request_id, request_id_var, setup_logging
from moss_speech.services.metrics import ServiceMetrics
from moss_speech.services.session_store import AsyncSessionStore, SessionStoreUnavailableError, make_session_store
from moss_speech.services.sessions import (
    NoReplyError,
    SessionBusyError,
    SessionLimitError,
    SessionNotFoundError,
    TurnLease,
)
from moss_speech.services.settings import ServiceSettings
from moss_speech.services.tls import ReloadingCredentials
from moss_speech.services.tracing import Tracing
from moss_speech.services.triton_client import TritonCallError, TritonClient, TurnInput
from moss_speech.services.triton_pool import TritonPool
from moss_speech.services.voices import VoiceRPCs, is_created

log = get_logger("server")

ENCODINGS = {
    speech_pb2.AUDIO_ENCODING_UNSPECIFIED: "container",
    speech_pb2.AUDIO_ENCODING_CONTAINER: "container",
    speech_pb2.AUDIO_ENCODING_PCM16: "pcm16",
    speech_pb2.AUDIO_ENCODING_FLOAT32: "float32",
}
OUTPUTS = {
    speech_pb2.OUTPUT_MODALITY_UNSPECIFIED: "speech",
    speech_pb2.OUTPUT_MODALITY_SPEECH: "speech",
    speech_pb2.OUTPUT_MODALITY_TEXT: "text",
}
CALL_METHODS = ("Converse", "StreamConverse")  # the calls that count against the concurrent-call limits
LIVENESS_SERVICE = "liveness"  # grpc.health.v1 service name of the liveness probe
SESSION_ID_RE = re.compile(r"^[0-9a-f]{32}$")  # what SessionStore.create hands out
SESSION_IN_TEXT_RE = re.compile(r"\b[0-9a-f]{32}\b")  # session ids are bearer tokens of a conversation: not logged
MAX_VOICE_CHARS = 128
SPEECH_SAMPLES_PER_TOKEN = INPUT_RATE * 2 // 25  # 12.5 Hz speech codes
# Rows of a turn's prompt that are not history: the default system prompt (the reference appends it), the
# turn wrappers and the reply prefix. Generous: a wrong guess only drops a turn early.
PROMPT_OVERHEAD_ROWS = 160
INTERNAL_MESSAGE = "internal error"
UNAVAILABLE_MESSAGE = "the speech model is unavailable; retry shortly"


class ServiceError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


_SCRUB = (
    (re.compile(r"<[^<>]*\bat 0x[0-9a-fA-F]+>"), "<object>"),  # object reprs
    (re.compile(r"\b0x[0-9a-fA-F]{4,}\b"), "<address>"),
    (re.compile(r"\b(?:ipv[46]:)?(?:\[[0-9a-fA-F:]+\]|[A-Za-z0-9][\w.-]*):\d{2,5}\b"), "<host>"),
    (re.compile(r"(?:[A-Za-z]:)?(?:/[\w.@+-]+){2,}/?"), "<path>"),
    (re.compile(r"\bTraceback\b.*", re.S), ""),
)


def public_message(message: str, model_names: tuple[str, ...] = ()) -> str:
    """`message` without memory addresses, object reprs, host:port, file paths or the names of internal models."""
    for pattern, repl in _SCRUB:
        message = pattern.sub(repl, message)
    for name in sorted({n for n in model_names if n}, key=len, reverse=True):
        message = re.sub(rf"(?<![\w-]){re.escape(name)}(?![\w-])", "model", message)
    return message[:1000]


def to_status(e: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status for an exception raised while serving a request."""
    if isinstance(e, ServiceError):
        return e.code, e.message
    if isinstance(e, SessionStoreUnavailableError):
        return grpc.StatusCode.UNAVAILABLE, str(e)
    if isinstance(e, AuthError):
        return grpc.StatusCode.UNAUTHENTICATED, str(e)
    if isinstance(e, MalformedMessage):
        return grpc.StatusCode.INVALID_ARGUMENT, str(e)
    if isinstance(e, LimitError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, f"{e}; retry in {math.ceil(e.retry_after)} s"
    if isinstance(e, AudioError):
        code = grpc.StatusCode.RESOURCE_EXHAUSTED if e.is_resource_limit else grpc.StatusCode.INVALID_ARGUMENT
        return code, f"audio: {e}"
    if isinstance(e, SessionNotFoundError):
        return grpc.StatusCode.NOT_FOUND, str(e)
    if isinstance(e, SessionBusyError | NoReplyError):
        return grpc.StatusCode.FAILED_PRECONDITION, str(e)
    if isinstance(e, SessionLimitError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)
    if isinstance(e, ValidationError):
        errs = "; ".join(f"{'.'.join(map(str, x['loc'])) or 'sampling'}: {x['msg']}" for x in e.errors())
        return grpc.StatusCode.INVALID_ARGUMENT, f"invalid sampling parameters: {errs}"
    if isinstance(e, TritonCallError):
        if e.code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED):
            return e.code, e.message  # the model's own words about the request (scrubbed by the caller)
        if e.code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return e.code, "deadline exceeded"
        if e.code == grpc.StatusCode.CANCELLED:
            return e.code, "cancelled"
        if e.code == grpc.StatusCode.INTERNAL:
            return e.code, INTERNAL_MESSAGE
        return grpc.StatusCode.UNAVAILABLE, UNAVAILABLE_MESSAGE  # never Triton's address or connection details
    return grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE


def retry_metadata(retry_after: float, message: str) -> tuple[tuple[str, str | bytes], ...]:
    """`retry-after-ms` and a google.rpc.Status with RetryInfo (what grpcio-status clients read)."""
    ms = max(1, math.ceil(1000 * retry_after))
    try:  # googleapis-common-protos (see pyproject); without it, retry-after-ms alone
        from google.rpc import code_pb2, error_details_pb2, status_pb2
    except ImportError:
        return (("retry-after-ms", str(ms)),)
    info = error_details_pb2.RetryInfo(
        retry_delay=duration_pb2.Duration(seconds=ms // 1000, nanos=(ms % 1000) * 1_000_000)
    )
    status = status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED, message=message)  # = the call's details
    status.details.add().Pack(info)
    return (("retry-after-ms", str(ms)), ("grpc-status-details-bin", status.SerializeToString()))


def sampling_from_proto(sampling: speech_pb2.Sampling, defaults: dict[str, Any]) -> SamplingParams:
    """The one proto -> contract conversion: fields the request sets override the server's defaults.
    Raises ValidationError (-> INVALID_ARGUMENT) naming the field out of its limits."""
    overrides = {name: getattr(sampling, name) for name in SAMPLING_FIELDS if sampling.HasField(name)}
    return SamplingParams(**(defaults | overrides))


@dataclass
class TurnSpec:
    """A validated turn (everything except the user's input)."""

    output: str
    voice: str
    sampling: SamplingParams
    system_prompt: str


@dataclass
class TurnOutcome:
    text: list[str] = field(default_factory=list)
    usage: speech_pb2.Usage = field(default_factory=speech_pb2.Usage)
    timings: speech_pb2.Timings = field(default_factory=speech_pb2.Timings)


class MossSpeechServicer(VoiceRPCs, speech_pb2_grpc.MossSpeechServicer):  # voice RPCs: services/voices.py
    def __init__(
        self,
        settings: ServiceSettings,
        triton: TritonClient,
        sessions: AsyncSessionStore,
        metrics: ServiceMetrics,
        limiter: Limiter | None = None,
    ) -> None:
        self.settings, self.triton, self.sessions, self.metrics = settings, triton, sessions, metrics
        self.tracing = Tracing.from_endpoint(settings.otlp_endpoint)  # off (no-op) when the endpoint is empty
        self.voice_ids: list[str] = []  # refreshed by the health loop; [] = Triton does not list them
        self.served_context: int | None = None  # the llm's max_context, read from Triton (health loop)
        self.limiter = limiter or Limiter(
            Limits(
                settings.max_streams,
                settings.max_streams_per_key,
                settings.turns_per_minute_per_key,
                settings.audio_seconds_per_minute_per_key,
            )
        )
        # Decoding/resampling is CPU work: off the event loop, on a small pool (calls are bounded by max_streams).
        self.audio_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="audio-decode")
        self.key_requests = Counter(
            "moss_speech_key_requests",
            "RPCs by API key id (never the key) and status.",
            ["key_id", "method", "status"],
            registry=metrics.registry,
        )
        self.model_names = (
            settings.s2s_model,
            settings.t2s_model,
            settings.llm_model,
            settings.vocoder_model,
            "speech_encoder",
            "ensemble",
        )

    # --- limits derived from what is served ---------------------------------------------------------------
    def max_new_tokens_cap(self) -> int:
        cap = self.settings.max_new_tokens_limit
        return min(cap, self.served_context - PROMPT_OVERHEAD_ROWS) if self.served_context else cap

    def history_budget(self, spec: TurnSpec, audio: np.ndarray | None, text: str | None) -> int | None:
        """History rows this turn can send so that the prompt fits the served context with room for the answer:
        a conversation drops its oldest turns instead of failing every turn once the context is full."""
        if not self.served_context:
            return None
        user = math.ceil(audio.size / SPEECH_SAMPLES_PER_TOKEN) if audio is not None else len((text or "").encode())
        system = len(spec.system_prompt.encode())  # tokens <= UTF-8 bytes
        answer = min(spec.sampling.max_new_tokens, self.served_context // 4)
        return max(0, self.served_context - PROMPT_OVERHEAD_ROWS - user - system - answer)

    async def decode_audio(self, data: bytes, spec: AudioSpec) -> np.ndarray:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.audio_pool, decode, data, spec, self.settings.max_audio_seconds)

    def account_turn(self, audio: np.ndarray | None) -> None:
        seconds = audio.size / INPUT_RATE if audio is not None else 0.0
        self.limiter.turn(key_id_var.get(), seconds)

    # --- sessions of the caller's key ----------------------------------------------------------------------
    async def owned(self, session_id: str):
        """The caller's session; another key's session is as unknown as one never created (NOT_FOUND)."""
        if not SESSION_ID_RE.match(session_id):
            raise ServiceError(
                grpc.StatusCode.NOT_FOUND, "unknown session (never created, deleted, or evicted after its idle TTL)"
            )
        s = await self.sessions.get(session_id)
        if s.owner != key_id_var.get():
            raise SessionNotFoundError(session_id)
        return s

    # --- validation ---------------------------------------------------------------------------------------
    def _spec(
        self, output: int, voice: str, sampling: speech_pb2.Sampling, system_prompt: str, session: TurnLease | None
    ) -> TurnSpec:
        if output not in OUTPUTS:
            raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, f"unknown output modality {output}")
        if len(voice) > MAX_VOICE_CHARS:
            raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, f"voice id longer than {MAX_VOICE_CHARS} characters")
        self._check_system_prompt(system_prompt)
        voice = voice or self.settings.default_voice
        if self.voice_ids and voice not in self.voice_ids and not is_created(voice):  # created: require_voice
            raise ServiceError(
                grpc.StatusCode.INVALID_ARGUMENT, f"unknown voice {voice!r}; known voices: {', '.join(self.voice_ids)}"
            )
        params = sampling_from_proto(sampling, self.settings.sampling_defaults())
        cap = self.max_new_tokens_cap()
        if params.max_new_tokens > cap:
            raise ServiceError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"max_new_tokens {params.max_new_tokens} is over the limit of {cap} "
                "(max_new_tokens_limit and the served context)",
            )
        if params.min_new_tokens > params.max_new_tokens:
            raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, "min_new_tokens is larger than max_new_tokens")
        system_prompt = system_prompt or (session.session.system_prompt if session else "")
        return TurnSpec(OUTPUTS[output], voice, params, system_prompt)

    def _check_system_prompt(self, prompt: str) -> None:
        if len(prompt) > self.settings.max_system_prompt_chars:
            raise ServiceError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"system_prompt is {len(prompt)} characters, limit max_system_prompt_chars="
                f"{self.settings.max_system_prompt_chars}",
            )

    def _text(self, text: str) -> str:
        if not text.strip():
            raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, "text input is empty")
        if len(text) > self.settings.max_text_chars:
            raise ServiceError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"text is {len(text)} characters, limit max_text_chars={self.settings.max_text_chars} "
                "(env MOSS_SPEECH_MAX_TEXT_CHARS)",
            )
        return text

    @staticmethod
    def _audio_spec(fmt: speech_pb2.AudioFormat) -> AudioSpec:
        if fmt.encoding not in ENCODINGS:
            raise AudioError("bad_format", f"unknown audio encoding {fmt.encoding}")
        return AudioSpec(ENCODINGS[fmt.encoding], fmt.sample_rate, fmt.channels or 1)

    @contextlib.asynccontextmanager
    async def _maybe_hold(self, session_id: str):
        if not session_id:
            yield None
            return
        await self.owned(session_id)
        async with self.sessions.hold(session_id) as lease:
            yield lease

    # --- one turn -----------------------------------------------------------------------------------------
    async def _turn(
        self,
        request_id: str,
        spec: TurnSpec,
        lease: TurnLease | None,
        context: grpc.aio.ServicerContext,
        *,
        audio: np.ndarray | None = None,
        text: str | None = None,
        t_input: float | None = None,
    ) -> AsyncIterator[tuple[str, Any]]:
        """Yields ("text", str), ("audio", AudioChunk) and finally ("final", TurnOutcome)."""
        t0 = t_input if t_input is not None else time.perf_counter()
        await self.require_voice(spec.voice)  # a created voice: exists and is the caller's, else NOT_FOUND
        history, dropped = (
            await lease.prepare(self.history_budget(spec, audio, text)) if lease else (np.zeros((0, 2), np.int64), 0)
        )
        if dropped:
            self.metrics.context_truncations.inc()
        timeout = self.settings.request_timeout_seconds
        remaining = context.time_remaining()
        if remaining is not None:
            timeout = min(timeout, max(remaining, 0.001))
        tt = self.tracing.start_turn(request_id, "s2s" if audio is not None else "t2s", started=t0)
        turn = TurnInput(
            request_id=request_id,
            history=history,
            output=spec.output,
            sampling=spec.sampling,
            voice=spec.voice,
            system_prompt=spec.system_prompt,
            audio=audio,
            text=text,
            trace_headers=tt.headers(),
            session_id=lease.session.session_id if lease else "",
        )
        out = TurnOutcome()
        audio_samples, seq = 0, 0
        t_first_audio = t_first_text = None
        generated: list[np.ndarray] = []  # the answer's grid rows, so TruncateReply can find them in TURN_ROWS
        fit = {"history": history, "dropped": dropped}
        try:
            async for chunk in self._fitting(turn, lease, timeout, fit):
                history, dropped = fit["history"], fit["dropped"]
                tt.mark("first_token")
                if chunk.new_rows is not None:
                    generated.append(chunk.new_rows)
                if chunk.text_delta:
                    t_first_text = t_first_text or time.perf_counter()
                    out.text.append(chunk.text_delta)
                    yield "text", chunk.text_delta
                if chunk.audio is not None and chunk.audio.size:
                    t_first_audio = t_first_audio or time.perf_counter()
                    tt.mark("first_audio")
                    audio_samples += chunk.audio.size
                    yield (
                        "audio",
                        speech_pb2.AudioChunk(pcm16=to_pcm16(chunk.audio), sample_rate=OUTPUT_RATE, sequence=seq),
                    )
                    seq += 1
                if chunk.final:
                    if lease and chunk.turn_rows is not None:
                        await lease.commit(
                            chunk.turn_rows, np.concatenate(generated) if generated else None, spec.output
                        )
                    usage = chunk.usage
                    out.usage = speech_pb2.Usage(
                        prompt_tokens=int(usage.get("prompt_tokens", 0)),
                        generated_tokens=int(usage.get("generated_tokens", 0)),
                        stop_reason=str(usage.get("stop_reason", "")),
                        history_tokens=len(history),
                        context_truncated=dropped > 0,
                        dropped_turns=dropped,
                    )
                    t_end = time.perf_counter()
                    audio_s = audio_samples / OUTPUT_RATE
                    out.timings = speech_pb2.Timings(
                        time_to_first_audio_ms=1000 * (t_first_audio - t0) if t_first_audio else 0.0,
                        time_to_first_text_ms=1000 * (t_first_text - t0) if t_first_text else 0.0,
                        total_ms=1000 * (t_end - t0),
                        audio_seconds=audio_s,
                        real_time_factor=(t_end - t0) / audio_s if audio_s else 0.0,
                        triton_ttft_ms=float(usage.get("ttft_ms", 0.0) or 0.0),
                    )
                    if t_first_audio:
                        self.metrics.time_to_first_audio.observe(t_first_audio - t0)
                        self.metrics.real_time_factor.observe(out.timings.real_time_factor)
                    channel = "audio" if spec.output == "speech" else "text"
                    self.metrics.generated_tokens.labels(channel).inc(out.usage.generated_tokens)
                    log.info(
                        "turn done",
                        extra={
                            "fields": {
                                "output": spec.output,
                                "generated_tokens": out.usage.generated_tokens,
                                "stop_reason": out.usage.stop_reason,
                                "ttfa_ms": round(out.timings.time_to_first_audio_ms, 1),
                                "total_ms": round(out.timings.total_ms, 1),
                                "history_tokens": len(history),
                                "dropped_turns": dropped,
                            }
                        },
                    )
                    tt.done(
                        generated_tokens=out.usage.generated_tokens,
                        stop_reason=out.usage.stop_reason,
                        ttfa_ms=out.timings.time_to_first_audio_ms,
                    )
                    yield "final", out
                    return
        except TritonCallError as e:
            self.metrics.triton_errors.labels(e.kind).inc()
            raise
        finally:
            tt.close()

    async def _fitting(
        self, turn: TurnInput, lease: TurnLease | None, timeout: float, fit: dict[str, Any]
    ) -> AsyncIterator[Any]:
        """`triton.generate`; when the prompt does not fit the served context before anything streamed (the
        budget is an estimate), drop older turns and try again: a conversation never gets stuck."""
        for attempt in range(4):
            started = False
            try:
                async for chunk in self.triton.generate(turn, timeout):
                    started = True
                    yield chunk
                return
            except TritonCallError as e:
                if started or lease is None or not len(turn.history) or "does not fit" not in e.message or attempt == 3:
                    raise
            history, dropped = await lease.prepare(len(turn.history) // 2 if attempt < 2 else 0)
            fit["history"], fit["dropped"] = history, fit["dropped"] + dropped
            turn = dataclasses.replace(turn, history=history)
            self.metrics.context_truncations.inc()
            log.info("prompt over the served context; dropped old turns", extra={"fields": {"dropped": dropped}})

    async def _record(self, method: str, mode: str, code: grpc.StatusCode) -> None:
        self.metrics.requests.labels(method, mode, code.name).inc()
        self.key_requests.labels(key_id_var.get() or "-", method, code.name).inc()

    async def _fail(
        self, context: grpc.aio.ServicerContext, method: str, mode: str, e: BaseException, request_id: str
    ) -> None:
        code, message = to_status(e)
        message = public_message(message, self.model_names)
        await self._record(method, mode, code)
        internal = code == grpc.StatusCode.INTERNAL
        (log.error if internal else log.info)(
            "request failed",
            exc_info=internal,
            extra={
                "fields": {
                    "method": method,
                    "status": code.name,
                    "error": SESSION_IN_TEXT_RE.sub("<session>", message),
                    **({"detail": f"{type(e).__name__}: {e}"} if internal or isinstance(e, TritonCallError) else {}),
                }
            },
        )
        details = f"{message} [request_id={request_id}]"
        trailing = retry_metadata(e.retry_after, details) if isinstance(e, LimitError) else ()
        await context.abort(code, details, trailing_metadata=trailing)

    @staticmethod
    async def _start(context: grpc.aio.ServicerContext) -> str:
        rid = new_request_id()
        request_id_var.set(rid)
        await context.send_initial_metadata((("x-request-id", rid),))
        return rid

    async def _idle_bounded(self, requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
        """The client's messages; a client silent for stream_idle_seconds while we wait for it ends the stream
        (idle streams cannot pin sessions or call slots). Time spent streaming an answer does not count."""
        it = aiter(requests)
        idle = self.settings.stream_idle_seconds
        while True:
            try:
                msg = await asyncio.wait_for(anext(it), idle)
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise ServiceError(
                    grpc.StatusCode.DEADLINE_EXCEEDED, f"stream idle: no message for {idle:g} s (stream_idle_seconds)"
                ) from None
            yield msg

    # --- RPCs ---------------------------------------------------------------------------------------------
    async def Converse(self, request: speech_pb2.ConverseRequest, context: grpc.aio.ServicerContext):
        rid = await self._start(context)
        kind = request.WhichOneof("input")
        mode = "s2s" if kind == "audio" else "t2s"
        try:
            if kind is None:
                raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, "request has neither audio nor text")
            audio = text = None
            if kind == "audio":
                audio = await self.decode_audio(request.audio.data, self._audio_spec(request.audio.format))
            else:
                text = self._text(request.text)
            self.account_turn(audio)
            t_input = time.perf_counter()
            async with self._maybe_hold(request.session_id) as lease:
                spec = self._spec(request.output, request.voice, request.sampling, request.system_prompt, lease)
                texts, pcm = [], []
                outcome = TurnOutcome()
                async for what, value in self._turn(rid, spec, lease, context, audio=audio, text=text, t_input=t_input):
                    if what == "text":
                        texts.append(value)
                    elif what == "audio":
                        pcm.append(value.pcm16)
                    else:
                        outcome = value
            await self._record("Converse", mode, grpc.StatusCode.OK)
            return speech_pb2.ConverseResponse(
                request_id=rid,
                session_id=request.session_id,
                text="".join(texts),
                audio_pcm16=b"".join(pcm),
                sample_rate=OUTPUT_RATE,
                usage=outcome.usage,
                timings=outcome.timings,
            )
        except asyncio.CancelledError:
            await self._record("Converse", mode, grpc.StatusCode.CANCELLED)
            log.info("client cancelled", extra={"fields": {"method": "Converse"}})
            raise
        except Exception as e:  # noqa: BLE001 - every failure becomes a status, the server keeps serving
            await self._fail(context, "Converse", mode, e, rid)

    async def StreamConverse(self, request_iterator, context: grpc.aio.ServicerContext):
        rid = await self._start(context)
        mode = "none"
        self.metrics.active_streams.inc()
        request_iterator = self._idle_bounded(request_iterator)
        try:
            first = await anext(request_iterator, None)
            if first is None or first.WhichOneof("kind") != "config":
                raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, "the first message must be a StreamConfig")
            cfg = first.config
            audio_spec = self._audio_spec(cfg.input_format)
            audio_spec.check()
            async with self._maybe_hold(cfg.session_id) as lease:
                spec = self._spec(cfg.output, cfg.voice, cfg.sampling, cfg.system_prompt, lease)
                buffer = InputAudioBuffer(
                    audio_spec, self.settings.max_audio_seconds, self.settings.max_audio_buffer_bytes
                )
                text: str | None = None
                turn_index = 0

                async def run_turn():
                    nonlocal text, turn_index, mode
                    if text is None and buffer.size == 0:
                        raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, "end_of_turn without audio or text")
                    t_input = time.perf_counter()
                    if text is not None:
                        turn_text, turn_audio, mode = self._text(text), None, "t2s"
                    else:
                        turn_text, turn_audio, mode = None, await self.decode_audio(buffer.take(), audio_spec), "s2s"
                    text = None
                    self.account_turn(turn_audio)
                    turn_id = f"{rid}-{turn_index}"
                    request_id_var.set(turn_id)
                    async for what, value in self._turn(
                        turn_id, spec, lease, context, audio=turn_audio, text=turn_text, t_input=t_input
                    ):
                        if what == "text":
                            yield speech_pb2.StreamConverseResponse(
                                request_id=turn_id, text=speech_pb2.TextDelta(text=value)
                            )
                        elif what == "audio":
                            yield speech_pb2.StreamConverseResponse(request_id=turn_id, audio=value)
                        else:
                            yield speech_pb2.StreamConverseResponse(
                                request_id=turn_id,
                                final=speech_pb2.TurnResult(
                                    session_id=cfg.session_id,
                                    text="".join(value.text),
                                    usage=value.usage,
                                    timings=value.timings,
                                    turn_index=turn_index,
                                ),
                            )
                    turn_index += 1

                async for msg in request_iterator:
                    kind = msg.WhichOneof("kind")
                    if kind == "audio":
                        if text is not None:
                            raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, "a turn is either text or audio")
                        buffer.add(msg.audio)
                    elif kind == "text":
                        if buffer.size:
                            raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, "a turn is either text or audio")
                        text = (text or "") + msg.text
                        if len(text) > self.settings.max_text_chars:
                            raise ServiceError(
                                grpc.StatusCode.INVALID_ARGUMENT,
                                f"streamed text of this turn is over max_text_chars={self.settings.max_text_chars}",
                            )
                    elif kind == "end_of_turn":
                        async for response in run_turn():
                            yield response
                    else:
                        raise ServiceError(
                            grpc.StatusCode.INVALID_ARGUMENT,
                            "StreamConfig is only allowed as the first message"
                            if kind == "config"
                            else "empty stream message",
                        )
                if text is not None or buffer.size:  # the client closed without end_of_turn: finish that turn
                    async for response in run_turn():
                        yield response
            # The key's per-minute limits after this call's turns, for clients that pace themselves.
            context.set_trailing_metadata(rate_limit_metadata(self.limiter.remaining(key_id_var.get())))
            await self._record("StreamConverse", mode, grpc.StatusCode.OK)
        except asyncio.CancelledError:
            await self._record("StreamConverse", mode, grpc.StatusCode.CANCELLED)
            log.info("client cancelled", extra={"fields": {"method": "StreamConverse"}})
            raise
        except Exception as e:  # noqa: BLE001
            await self._fail(context, "StreamConverse", mode, e, rid)
        finally:
            self.metrics.active_streams.dec()

    def _session_msg(self, rid: str, s) -> speech_pb2.Session:
        return speech_pb2.Session(
            request_id=rid,
            session_id=s.session_id,
            turns=len(s.turns),
            history_tokens=s.history_tokens,
            dropped_turns=s.dropped_turns,
            idle_ttl_seconds=self.settings.session_ttl_seconds,
            created_unix=s.created_unix,
            last_used_unix=s.last_used_unix,
            busy=s.busy,
        )

    async def CreateSession(self, request, context):
        rid = await self._start(context)
        try:
            self._check_system_prompt(request.system_prompt)
            s = await self.sessions.create(
                system_prompt=request.system_prompt,
                owner=key_id_var.get(),
                max_per_owner=self.settings.max_sessions_per_key,
            )
            log.info("session created")  # the id is a bearer of the conversation: DEBUG only
            log.debug("session id", extra={"fields": {"session_id": s.session_id}})
            await self._record("CreateSession", "none", grpc.StatusCode.OK)
            return self._session_msg(rid, s)
        except Exception as e:  # noqa: BLE001
            await self._fail(context, "CreateSession", "none", e, rid)

    async def GetSession(self, request, context):
        rid = await self._start(context)
        try:
            s = await self.owned(request.session_id)
            await self._record("GetSession", "none", grpc.StatusCode.OK)
            return self._session_msg(rid, s)
        except Exception as e:  # noqa: BLE001
            await self._fail(context, "GetSession", "none", e, rid)

    async def DeleteSession(self, request, context):
        rid = await self._start(context)
        try:
            await self.owned(request.session_id)
            await self.sessions.delete(request.session_id)
            await self._record("DeleteSession", "none", grpc.StatusCode.OK)
            return speech_pb2.DeleteSessionResponse(request_id=rid, session_id=request.session_id)
        except Exception as e:  # noqa: BLE001
            await self._fail(context, "DeleteSession", "none", e, rid)

    async def TruncateReply(self, request, context):
        rid = await self._start(context)
        try:
            if request.audio_end_ms < 0:
                raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, "audio_end_ms must be >= 0")
            await self.owned(request.session_id)
            kept, removed, history = await self.sessions.truncate_reply(request.session_id, request.audio_end_ms)
            log.info("reply truncated", extra={"fields": {"speech_tokens": kept, "removed_rows": removed}})
            await self._record("TruncateReply", "none", grpc.StatusCode.OK)
            return speech_pb2.TruncateReplyResponse(
                request_id=rid,
                session_id=request.session_id,
                speech_tokens=kept,
                removed_rows=removed,
                history_tokens=history,
            )
        except Exception as e:  # noqa: BLE001
            await self._fail(context, "TruncateReply", "none", e, rid)


class Service:
    """The gRPC server with health, reflection, metrics and a background Triton readiness loop."""

    def __init__(
        self, settings: ServiceSettings, metrics: ServiceMetrics | None = None, host: str | None = None
    ) -> None:
        self.settings = settings
        self.host = host or settings.bind_address  # `moss-speech up` binds loopback
        self.metrics = metrics or ServiceMetrics()
        # One client per Triton endpoint, requests balanced over them (services/triton_pool.py).
        self.triton = TritonPool(
            settings.triton_url,
            settings.s2s_model,
            settings.t2s_model,
            settings.llm_model,
            settings.vocoder_model,
            resolve_seconds=settings.triton_resolve_seconds,
        )
        self.sessions = make_session_store(settings, on_change=self.metrics.sessions.set)
        self.servicer = MossSpeechServicer(settings, self.triton, self.sessions, self.metrics)
        self.health = health.aio.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.health_server: grpc.aio.Server | None = None
        self.tls: ReloadingCredentials | None = None
        self.keys: ApiKeys | None = None
        self.port = 0
        self._loop_task: asyncio.Task | None = None
        self.triton_ready = False

    def _security(self) -> None:
        """Load the key file and the TLS files (a clear error at start-up when they are missing)."""
        st = self.settings
        self.keys = ApiKeys(st.api_keys_file) if st.auth == "api_keys" else None
        if not st.plaintext:
            self.tls = ReloadingCredentials(st.tls_cert_file, st.tls_key_file, st.tls_client_ca_file)

    async def start(self, serve_metrics: bool = True) -> int:
        st = self.settings
        self._security()
        limit = st.max_message_bytes
        self.server = grpc.aio.server(
            options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)]
        )
        self.server.add_generic_rpc_handlers(
            (
                guarded_handler(
                    speech_pb2.DESCRIPTOR.services_by_name["MossSpeech"],
                    self.servicer,
                    self.keys,
                    self.servicer.limiter,
                    CALL_METHODS,
                    retry_metadata,
                ),
            )
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        if st.reflection:
            reflection.enable_server_reflection(
                [SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
                self.server,
            )
        address = f"{self.host}:{st.grpc_port}"
        if self.tls is not None:
            self.port = self.server.add_secure_port(address, self.tls.credentials())
        else:
            self.port = self.server.add_insecure_port(address)
        if st.health_port:  # plaintext, health only: kubelet gRPC probes cannot speak TLS
            self.health_server = grpc.aio.server()
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.health_server)
            self.health_server.add_insecure_port(f"{self.host}:{st.health_port}")
        await self._set_health(False)
        # Liveness is the process's own health (its event loop answers), never Triton's: a Triton outage must not
        # restart orchestrators. Readiness ('' and the API's name) follows Triton.
        await self.health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        await self.server.start()
        if self.health_server is not None:
            await self.health_server.start()
        if serve_metrics:
            self.metrics.serve(st.metrics_port, addr=st.metrics_bind_address if self.host == "[::]" else self.host)
        self._loop_task = asyncio.create_task(self._health_loop())
        log.info(
            "serving",
            extra={
                "fields": {
                    "address": self.host,
                    "port": self.port,
                    "metrics_port": st.metrics_port,
                    "health_port": st.health_port,
                    "tls": self.tls is not None,
                    "mtls": bool(self.tls and st.tls_client_ca_file),
                    "auth": st.auth,
                    "reflection": st.reflection,
                }
            },
        )
        if self.tls is None:
            log.warning("plaintext gRPC (MOSS_SPEECH_PLAINTEXT=true): use only on loopback or a trusted network")
        if self.keys is None:
            log.warning("no authentication (MOSS_SPEECH_AUTH=none): anyone who reaches the port can use it")
        return self.port

    async def _read_served_context(self) -> int | None:
        """The llm's max_context from its `serving` config parameter (what `moss-speech build` wrote)."""
        import tritonclient.grpc.aio as grpcclient

        client = grpcclient.InferenceServerClient(self.triton.client().url)
        try:
            config = await client.get_model_config(self.settings.llm_model, as_json=True, client_timeout=5.0)
            raw = config.get("config", {}).get("parameters", {}).get("serving", {}).get("string_value", "")
            value = int(json.loads(raw).get("max_context", 0)) if raw else 0
            return value or None
        except Exception as e:  # noqa: BLE001 - an older repository or Triton going away: keep the settings' budget
            log.info("served context unknown", extra={"fields": {"error": type(e).__name__}})
            return None
        finally:
            await client.close()

    async def _set_health(self, ready: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def _health_loop(self) -> None:
        while True:
            ready = await self.triton.ready()
            if ready != self.triton_ready:
                log.info(
                    "triton ready" if ready else "triton not ready",
                    extra={"fields": {"triton_url": self.settings.triton_url}},
                )
                if ready:
                    self.servicer.served_context = await self._read_served_context()
                    with contextlib.suppress(TritonCallError):
                        self.servicer.voice_ids = await self.triton.voices()
                else:
                    self.metrics.triton_errors.labels("not_ready").inc()
            self.triton_ready = ready
            self.metrics.triton_ready.set(1.0 if ready else 0.0)
            await self._set_health(ready)
            with contextlib.suppress(SessionStoreUnavailableError):
                await self.sessions.evict_expired()
            await asyncio.sleep(self.settings.health_check_seconds)

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting, let open RPCs finish for at most `grace` (drain_seconds) seconds, then cancel them."""
        grace = self.settings.drain_seconds if grace is None else grace
        if self._loop_task:
            self._loop_task.cancel()
        await self.health.enter_graceful_shutdown()
        log.info("draining", extra={"fields": {"grace_seconds": grace}})
        if self.server:
            await self.server.stop(grace)
        if self.health_server:
            await self.health_server.stop(0)
        self.servicer.audio_pool.shutdown(wait=False, cancel_futures=True)
        await self.triton.close()
        self.servicer.tracing.shutdown()  # flush pending spans
        log.info("stopped")


async def serve(settings: ServiceSettings) -> None:
    """Run until SIGTERM/SIGINT, then drain within settings.drain_seconds."""
    setup_logging(settings.log_level, settings.log_format)
    service = Service(settings)
    await service.start()
    await wait_for_stop_signal()
    await service.stop()
