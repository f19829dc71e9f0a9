"""Async Triton client for the `s2s` / `t2s` ensembles (docs/contracts.md), on `tritonclient.grpc.aio`.

One turn = one bidi stream carrying one request (request parameter `request_id`, empty final responses on), read
until the response with Triton's final flag. Failures become `TritonCallError` with the gRPC status the public
API should return. When a turn is abandoned before its final response (client cancel/disconnect, deadline),
`generate` sends the cancel control request to `llm` (`CANCEL_REQUEST_ID`), because tritonserver 2.51 does not
forward a stream cancellation to the decoupled LLM step inside an ensemble, then reads the stream to its final
response instead of cancelling it: a cancelled ensemble request can stay in flight in 2.51 for good.

The channel reconnects with a short backoff so the service recovers within about a second of Triton returning.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import tritonclient.grpc.aio as grpcclient
from tritonclient.grpc import InferInput
from tritonclient.utils import InferenceServerException

from moss_speech.contract import tensors as T
from moss_speech.contract.sampling import SamplingParams
from moss_speech.services.logging import get_logger

log = get_logger("triton")

MAX_MESSAGE = 2**31 - 1
# After the cancel control request the job ends within one step; a stream still open after this long is
# cancelled (the gRPC deadline of a stream is the same backstop past the turn's own deadline).
DRAIN_SECONDS = 5.0
CHANNEL_ARGS = [
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    # reconnect quickly after Triton restarts (gRPC's default backoff grows to 120 s)
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.keepalive_time_ms", 30000),
    ("grpc.keepalive_timeout_ms", 10000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]

# Model error messages that mean the request was too big (RESOURCE_EXHAUSTED; checked first: the llm words a
# context overflow "invalid request: prompt ... does not fit"), bad (INVALID_ARGUMENT) or that Triton cannot take it
# now (UNAVAILABLE, retryable). tests/unit/test_service_status.py feeds it every producer's wording.
_RESOURCE_HINTS = (
    "does not fit",
    "context of",
    "no free slot",
    "noFreeSlot",
    "too long",
    "exceeds",
    "longer than",
    "the limit is",
)
_INVALID_HINTS = (
    "unknown voice",
    "validation error",
    "invalid",
    "must be",
    "sampling",
    "not a valid",
    "is empty",
    "nan or inf",
)
_UNAVAILABLE_HINTS = (
    "unknown model",
    "is not found",
    "not ready",
    "unavailable",
    "failed to connect",
    "already waiting",
)


class TritonCallError(Exception):
    """A failed Triton call, with the status the public API returns and a metrics label."""

    def __init__(self, code: grpc.StatusCode, message: str, kind: str) -> None:
        super().__init__(message)
        self.code, self.message, self.kind = code, message, kind


def model_error(message: str) -> TritonCallError:
    """Map an error response of a model (stream callback's `(None, error)`) to a status."""
    low = message.lower()
    if any(h.lower() in low for h in _RESOURCE_HINTS):
        return TritonCallError(grpc.StatusCode.RESOURCE_EXHAUSTED, message, "model_resource")
    if any(h.lower() in low for h in _INVALID_HINTS):
        return TritonCallError(grpc.StatusCode.INVALID_ARGUMENT, message, "model_invalid_argument")
    if any(h.lower() in low for h in _UNAVAILABLE_HINTS):
        return TritonCallError(grpc.StatusCode.UNAVAILABLE, message, "model_unavailable")
    return TritonCallError(grpc.StatusCode.INTERNAL, message, "model_error")


def rpc_error(e: grpc.aio.AioRpcError, url: str) -> TritonCallError:
    code = e.code()
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return TritonCallError(code, "deadline exceeded while waiting for Triton", "deadline")
    if code == grpc.StatusCode.CANCELLED:
        return TritonCallError(code, "Triton call cancelled", "cancelled")
    if code == grpc.StatusCode.UNAVAILABLE:
        return TritonCallError(code, f"Triton at {url} is unavailable: {e.details()}", "unavailable")
    return TritonCallError(grpc.StatusCode.UNAVAILABLE, f"Triton call failed ({code.name}): {e.details()}", "rpc_error")


@dataclass
class TurnInput:
    """One user turn for an ensemble (docs/contracts.md inputs)."""

    request_id: str
    history: np.ndarray  # int64 [rows, 2]
    output: str  # "speech" | "text"
    sampling: SamplingParams
    voice: str
    system_prompt: str = ""
    audio: np.ndarray | None = None  # float32 16 kHz mono -> s2s
    text: str | None = None  # -> t2s
    trace_headers: dict[str, str] | None = None  # W3C traceparent for Triton's tracing (services.tracing)
    session_id: str = ""  # routes the turn (services.triton_pool) and keys the llm's KV prefix cache


@dataclass
class TurnChunk:
    """One ensemble response, decoded."""

    audio: np.ndarray | None = None  # float32 24 kHz, None when the response has none
    audio_seq: int = -1
    text_delta: str = ""
    text_tokens: int = 0
    rows: int = 0
    new_rows: np.ndarray | None = None  # the `rows` generated grid rows themselves, [rows, 2] int64
    turn_rows: np.ndarray | None = None
    final: bool = False
    usage: dict[str, Any] = field(default_factory=dict)


def _bytes_input(value: str) -> np.ndarray:
    return np.array([value.encode()], dtype=np.object_)


def _read_chunk(result: Any) -> TurnChunk:
    response = result.get_response()
    params = response.parameters
    chunk = TurnChunk(final="triton_final_response" in params and params["triton_final_response"].bool_param)
    if not response.outputs:
        return chunk  # empty final response
    get = result.as_numpy
    audio, seq = get(T.AUDIO_CHUNK.name), get(T.AUDIO_SEQ.name)
    if audio is not None and audio.size:
        chunk.audio = audio.reshape(-1).astype(np.float32, copy=False)
        chunk.audio_seq = int(seq.reshape(-1)[0]) if seq is not None and seq.size else -1
    delta = get(T.TEXT_DELTA.name)
    if delta is not None and delta.size:
        chunk.text_delta = b"".join(x if isinstance(x, bytes) else str(x).encode() for x in delta.reshape(-1)).decode(
            "utf-8", errors="replace"
        )
    tokens, rows = get(T.TEXT_TOKENS.name), get(T.ROWS.name)
    chunk.text_tokens = int(tokens.size) if tokens is not None else 0
    chunk.rows = int(rows.reshape(-1, 2).shape[0]) if rows is not None and rows.size else 0
    if chunk.rows:
        chunk.new_rows = rows.reshape(-1, 2).astype(np.int64)
    turn_rows = get(T.TURN_ROWS.name)
    if turn_rows is not None and turn_rows.size:
        chunk.turn_rows = turn_rows.reshape(-1, 2).astype(np.int64)
    final = get(T.FINAL.name)
    if final is not None and final.size and bool(final.reshape(-1)[0]):
        chunk.final = True
    usage = get(T.USAGE.name)
    if usage is not None and usage.size and usage.reshape(-1)[0]:
        try:
            chunk.usage = json.loads(usage.reshape(-1)[0])
        except (ValueError, TypeError):
            chunk.usage = {}
    return chunk


async def _next(stream: Any) -> tuple[Any, Any] | None:
    """The stream's next (result, error), None at its end (a task result, so a read can outlive its reader)."""
    try:
        return await stream.__anext__()
    except StopAsyncIteration:
        return None


class TritonClient:
    def __init__(
        self,
        url: str,
        s2s_model: str = T.S2S.name,
        t2s_model: str = T.T2S.name,
        llm_model: str = T.LLM.name,
        vocoder_model: str = T.VOCODER.name,
    ) -> None:
        self.url = url
        self.s2s_model, self.t2s_model, self.llm_model, self.vocoder_model = (
            s2s_model,
            t2s_model,
            llm_model,
            vocoder_model,
        )
        self._client = grpcclient.InferenceServerClient(url, channel_args=CHANNEL_ARGS)
        self._batch: dict[str, bool] = {}  # model -> whether its inputs carry a batch dimension
        self._open_turns: set[str] = set()  # request ids whose Triton stream is still open

    async def close(self) -> None:
        # Let abandoned turns finish their drain first: closing the channel under them cancels their streams.
        deadline = time.monotonic() + DRAIN_SECONDS + 1
        while self._open_turns and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        await self._client.close()

    async def ready(self, timeout: float = 2.0) -> bool:
        """Server ready and both ensembles loaded."""
        try:
            if not await self._client.is_server_ready(client_timeout=timeout):
                return False
            for model in (self.s2s_model, self.t2s_model):
                if not await self._client.is_model_ready(model, client_timeout=timeout):
                    return False
            return True
        except (TimeoutError, InferenceServerException, grpc.aio.AioRpcError):
            return False

    async def voices(self, timeout: float = 5.0) -> list[str]:
        """Voice ids from the vocoder's config parameter `voices` (comma-separated or JSON list); [] if none."""
        try:
            config = await self._client.get_model_config(self.vocoder_model, as_json=True, client_timeout=timeout)
        except InferenceServerException as e:
            raise TritonCallError(
                grpc.StatusCode.UNAVAILABLE, f"cannot read the vocoder config: {e}", "unavailable"
            ) from None
        raw = config.get("config", {}).get("parameters", {}).get("voices", {}).get("string_value", "")
        if not raw:
            return []
        try:
            ids = json.loads(raw)
        except ValueError:
            ids = raw.split(",")
        return [str(v).strip() for v in ids if str(v).strip()]

    async def _batched(self, model: str) -> bool:
        if model not in self._batch:
            try:
                config = await self._client.get_model_config(model, as_json=True, client_timeout=5.0)
                self._batch[model] = int(config.get("config", {}).get("max_batch_size", 0) or 0) > 0
            except InferenceServerException as e:
                raise TritonCallError(
                    grpc.StatusCode.UNAVAILABLE, f"Triton at {self.url} is unavailable: {e}", "unavailable"
                ) from None
        return self._batch[model]

    async def _inputs(self, turn: TurnInput, model: str) -> list[InferInput]:
        arrays: dict[T.Tensor, np.ndarray] = {}
        if turn.audio is not None:
            arrays[T.AUDIO] = np.ascontiguousarray(turn.audio, dtype=np.float32).reshape(-1)
        else:
            arrays[T.TEXT] = _bytes_input(turn.text or "")
        arrays[T.HISTORY] = np.ascontiguousarray(turn.history, dtype=np.int64).reshape(-1, 2)
        arrays[T.OUTPUT_MODALITY] = _bytes_input(turn.output)
        arrays[T.SAMPLING] = _bytes_input(turn.sampling.to_json())  # the one contract -> tensor conversion
        arrays[T.VOICE] = _bytes_input(turn.voice)
        arrays[T.SYSTEM_PROMPT] = _bytes_input(turn.system_prompt)
        batched = await self._batched(model)
        inputs = []
        for spec, value in arrays.items():
            if batched:
                value = value[None]
            t = InferInput(spec.name, list(value.shape), spec.wire_type)
            t.set_data_from_numpy(value)
            inputs.append(t)
        return inputs

    async def generate(self, turn: TurnInput, timeout: float | None) -> AsyncIterator[TurnChunk]:
        """Stream the ensemble's responses for one turn; the last yielded chunk has `final=True`.

        Raises TritonCallError. If the consumer stops early (exception, cancellation, aclose) or `timeout` passes,
        the cancel control request is sent to `llm` and the stream is read to its final response (`_abandon`).
        """
        model = self.s2s_model if turn.audio is not None else self.t2s_model
        inputs = await self._inputs(turn, model)
        finished = asyncio.Event()

        async def requests():
            params = {"request_id": turn.request_id, "triton_enable_empty_final_response": True}
            if turn.session_id:
                params["session_id"] = turn.session_id
            yield {"model_name": model, "inputs": inputs, "request_id": turn.request_id, "parameters": params}
            await finished.wait()  # keep our side open until the final response

        # The turn's deadline is kept here, not as the stream's gRPC deadline: a deadline cancels the stream.
        backstop = None if timeout is None else timeout + DRAIN_SECONDS
        stream = self._client.stream_infer(requests(), stream_timeout=backstop, headers=turn.trace_headers or None)
        self._open_turns.add(turn.request_id)
        deadline = None if timeout is None else time.monotonic() + timeout
        got_final = False
        pending: asyncio.Task | None = None  # a read still in flight when the turn is abandoned
        try:
            while True:
                pending = asyncio.ensure_future(_next(stream))
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                if not (await asyncio.wait({pending}, timeout=left))[0]:
                    raise TritonCallError(
                        grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded while waiting for Triton", "deadline"
                    )
                item, pending = pending.result(), None
                if item is None:
                    raise TritonCallError(
                        grpc.StatusCode.UNAVAILABLE,
                        "Triton closed the stream before the final response",
                        "stream_closed",
                    )
                result, error = item
                if error is not None:
                    got_final = True  # an error response ends the request inside Triton
                    raise model_error(str(error.message() if hasattr(error, "message") else error))
                chunk = _read_chunk(result)
                got_final = chunk.final
                yield chunk
                if got_final:
                    return
        except grpc.aio.AioRpcError as e:
            raise rpc_error(e, self.url) from None
        finally:

            def closed(_: object = None) -> None:
                finished.set()
                self._open_turns.discard(turn.request_id)

            if got_final:
                closed()
            else:
                abandon = asyncio.ensure_future(self._abandon(stream, pending, turn.request_id))
                abandon.add_done_callback(closed)
                await asyncio.shield(abandon)  # shielded: this often runs while our own task is being cancelled

    async def _abandon(self, stream: Any, pending: asyncio.Task | None, request_id: str) -> None:
        """End a turn nobody reads any more: the control request stops the llm job, which then sends its final
        flag; reading the stream to that final response lets the ensemble request complete inside Triton."""
        await self.cancel(request_id)
        try:
            async with asyncio.timeout(DRAIN_SECONDS):
                while True:
                    item = await (pending or _next(stream))
                    pending = None
                    if item is None or item[1] is not None or _read_chunk(item[0]).final:
                        return
        except grpc.aio.AioRpcError:
            return  # the stream already ended (deadline backstop, Triton gone)
        except TimeoutError:
            log.warning(
                "no final response after the cancel; cancelling the stream",
                extra={"fields": {"request_id": request_id}},
            )
            stream.cancel()

    async def cancel(self, request_id: str, timeout: float = 5.0) -> bool:
        """The cancel control request to `llm`: it stops the job with `request_id` and frees its KV slot."""
        value = np.array([request_id.encode()], dtype=np.object_)
        try:
            if await self._batched(self.llm_model):
                value = value[None]
            t = InferInput(T.CANCEL_REQUEST_ID.name, list(value.shape), T.CANCEL_REQUEST_ID.wire_type)
            t.set_data_from_numpy(value)
            done = asyncio.Event()

            async def requests():
                yield {
                    "model_name": self.llm_model,
                    "inputs": [t],
                    "request_id": f"cancel-{request_id}",
                    "parameters": {"triton_enable_empty_final_response": True},
                }
                await done.wait()

            t0 = time.perf_counter()
            stream = self._client.stream_infer(requests(), stream_timeout=timeout)
            try:
                async for result, error in stream:
                    if error is not None:
                        log.warning("cancel control request failed", extra={"fields": {"error": str(error)}})
                        return False
                    if _read_chunk(result).final:
                        break
            finally:
                done.set()
            log.info(
                "cancelled llm job",
                extra={
                    "fields": {"cancelled_request_id": request_id, "ms": round(1000 * (time.perf_counter() - t0), 1)}
                },
            )
            return True
        except (grpc.aio.AioRpcError, InferenceServerException, TritonCallError) as e:
            log.warning("cancel control request failed", extra={"fields": {"error": str(e)}})
            return False
