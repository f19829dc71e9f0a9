"""The gateway's side of the public gRPC API: one channel per process, calls per connection.

A connection's conversation is one service session (CreateSession at connect, DeleteSession at close); each
response is one `StreamConverse` call carrying one turn. Cancelling that call is how a response is cancelled: the
service then cancels the Triton request, which stops within one decode step and frees its KV slot. The client's
`authorization` header travels as gRPC metadata so API keys, when the service checks them, work unchanged.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moss_speech.services.api import speech_pb2, speech_pb2_grpc
from moss_speech.services.limits import parse_rate_limit_metadata

AUDIO_PIECE = 256 * 1024  # bytes per StreamConverse audio message (well under the service's max_message_bytes)
BUSY_RETRIES = 200  # the service releases a cancelled turn's session once Triton confirmed the cancel: retry
BUSY_WAIT = 0.05


@dataclass
class TurnRequest:
    output: str  # "speech" | "text"
    voice: str
    system_prompt: str
    max_new_tokens: int | None
    audio_pcm16: bytes | None = None  # mono int16 LE at audio_rate
    audio_rate: int = 24000
    text: str | None = None
    after_cancel: bool = False  # the previous turn was cancelled: the service may still be releasing the session
    rate_limits: dict[str, dict[str, float]] | None = None  # the key's limits the service reported after the turn


@dataclass(frozen=True)
class ServiceTLS:
    """How the gateway verifies (and, under mTLS, identifies itself to) a service that serves TLS."""

    ca_file: str
    cert_file: str = ""
    key_file: str = ""
    server_name: str = ""

    def credentials(self) -> grpc.ChannelCredentials:
        # Read once at start: a rotated CA or client certificate reaches the gateway with its next restart.
        read = lambda path: open(path, "rb").read() if path else None  # noqa: E731
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("service_tls_cert_file and service_tls_key_file go together (mTLS)")
        return grpc.ssl_channel_credentials(
            root_certificates=read(self.ca_file),
            private_key=read(self.key_file),
            certificate_chain=read(self.cert_file),
        )


class Bridge:
    def __init__(self, target: str, tls: ServiceTLS | None = None) -> None:
        self.target = target
        options = [
            ("grpc.max_send_message_length", 16 * 1024 * 1024),
            ("grpc.max_receive_message_length", 16 * 1024 * 1024),
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 1000),
        ]
        if tls is None:
            self.channel = grpc.aio.insecure_channel(target, options=options)
        else:
            if tls.server_name:
                options.append(("grpc.ssl_target_name_override", tls.server_name))
            self.channel = grpc.aio.secure_channel(target, tls.credentials(), options=options)
        self.stub = speech_pb2_grpc.MossSpeechStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()

    async def serving(self, timeout: float = 2.0) -> bool:
        try:
            r = await self.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
            return r.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.RpcError:
            return False

    async def voices(self, metadata: tuple, timeout: float = 5.0) -> list[str]:
        r = await self.stub.ListVoices(speech_pb2.ListVoicesRequest(), metadata=metadata, timeout=timeout)
        return [v.voice_id for v in r.voices]

    async def create_session(self, metadata: tuple, timeout: float = 5.0) -> str:
        return (
            await self.stub.CreateSession(speech_pb2.CreateSessionRequest(), metadata=metadata, timeout=timeout)
        ).session_id

    async def delete_session(self, session_id: str, metadata: tuple, timeout: float = 5.0) -> None:
        await self.stub.DeleteSession(
            speech_pb2.DeleteSessionRequest(session_id=session_id), metadata=metadata, timeout=timeout
        )

    async def truncate(
        self, session_id: str, audio_end_ms: int, metadata: tuple, timeout: float = 5.0
    ) -> speech_pb2.TruncateReplyResponse:
        return await self.stub.TruncateReply(
            speech_pb2.TruncateReplyRequest(session_id=session_id, audio_end_ms=audio_end_ms),
            metadata=metadata,
            timeout=timeout,
        )

    async def _wait_idle(self, session_id: str, metadata: tuple) -> None:
        """Until the session runs no turn (bounded by BUSY_RETRIES x BUSY_WAIT)."""
        for _ in range(BUSY_RETRIES):
            s = await self.stub.GetSession(
                speech_pb2.GetSessionRequest(session_id=session_id), metadata=metadata, timeout=5.0
            )
            if not s.busy:
                return
            await asyncio.sleep(BUSY_WAIT)

    async def converse(
        self, session_id: str, turn: TurnRequest, metadata: tuple, timeout: float
    ) -> AsyncIterator[speech_pb2.StreamConverseResponse]:
        """Stream one turn's responses. Leaving the iteration early (cancellation) cancels the call."""
        sampling = speech_pb2.Sampling()
        if turn.max_new_tokens is not None:
            sampling.max_new_tokens = turn.max_new_tokens
        config = speech_pb2.StreamConfig(
            session_id=session_id,
            voice=turn.voice,
            system_prompt=turn.system_prompt,
            sampling=sampling,
            output=speech_pb2.OUTPUT_MODALITY_TEXT if turn.output == "text" else speech_pb2.OUTPUT_MODALITY_SPEECH,
            input_format=speech_pb2.AudioFormat(
                encoding=speech_pb2.AUDIO_ENCODING_PCM16, sample_rate=turn.audio_rate, channels=1
            ),
        )

        def requests():
            yield speech_pb2.StreamConverseRequest(config=config)
            if turn.text is not None:
                yield speech_pb2.StreamConverseRequest(text=turn.text)
            else:
                data = turn.audio_pcm16 or b""
                for i in range(0, len(data), AUDIO_PIECE):
                    yield speech_pb2.StreamConverseRequest(audio=data[i : i + AUDIO_PIECE])
            yield speech_pb2.StreamConverseRequest(end_of_turn=speech_pb2.EndOfTurn())

        if turn.after_cancel:
            await self._wait_idle(session_id, metadata)
        for attempt in range(BUSY_RETRIES + 1):
            call = self.stub.StreamConverse(requests(), metadata=metadata, timeout=timeout)
            try:
                first = True
                async for msg in call:
                    first = False
                    yield msg
                turn.rate_limits = parse_rate_limit_metadata(await call.trailing_metadata())
                return
            except grpc.aio.AioRpcError as e:
                # A refused stream can also surface as INTERNAL ("Internal error from Core") when the service
                # aborts it while our audio is still being written: both mean "not started", so retry.
                busy = (e.code() == grpc.StatusCode.FAILED_PRECONDITION and "in use" in (e.details() or "")) or (
                    e.code() == grpc.StatusCode.INTERNAL and "from Core" in (e.details() or "")
                )
                if not (first and busy and attempt < BUSY_RETRIES):
                    raise
                await asyncio.sleep(BUSY_WAIT)
                await self._wait_idle(session_id, metadata)
            finally:
                call.cancel()  # no-op once finished; stops the turn when we leave early
