"""Voice RPCs: CreateVoice, ListVoices, GetVoice, DeleteVoice, and the per-turn check of a created voice id.

The service does no model work and keeps no voice state: it decodes and validates the recording
(`contract.voices.check_recording`, a clear INVALID_ARGUMENT before any Triton call), then calls the Triton model
`voice`, which computes the conditioning with the served codec graphs and writes it to the voice store every
vocoder instance reads (model_repository/adapters/voice.py, builders/codec/voice_store.py). So a voice survives a
restart of the service or of Triton, and every replica of either sees it.

Ownership: a created voice carries the API key id of its creator (`services.auth.key_id_var`); another key gets
NOT_FOUND for it (in a turn, GetVoice, DeleteVoice), and ListVoices shows each key only its own voices.
Torch-free (the service image has no torch).
"""

from __future__ import annotations

import io
import json
import re
from typing import Any

import grpc
import numpy as np
import tritonclient.grpc.aio as grpcclient
from tritonclient.grpc import InferInput, InferRequestedOutput
from tritonclient.utils import InferenceServerException

from moss_speech.contract import tensors as T
from moss_speech.contract.audio import AudioError, AudioLimits, load_audio
from moss_speech.contract.voices import VoiceLimits, VoiceRecordingError, check_name, check_recording, is_created
from moss_speech.services.api import speech_pb2
from moss_speech.services.audio_io import RAW_DTYPES, AudioSpec
from moss_speech.services.auth import key_id_var
from moss_speech.services.logging import get_logger
from moss_speech.services.triton_client import CHANNEL_ARGS

log = get_logger("voices")

_STATUS = re.compile(r"\b(INVALID_ARGUMENT|NOT_FOUND|RESOURCE_EXHAUSTED|INTERNAL): (.*)", re.S)
CALL_TIMEOUT = 120.0  # a create encodes up to 30 s of audio (seconds on a CPU)


class VoiceError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def as_service_error(e: VoiceError | VoiceRecordingError):
    """The server's ServiceError (imported late: server.py imports this module)."""
    from moss_speech.services.server import ServiceError

    if isinstance(e, VoiceRecordingError):
        return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, str(e))
    return ServiceError(e.code, e.message)


def owner() -> str:
    """The caller's API key id ("" / "anonymous" when the service runs without keys)."""
    return key_id_var.get()


def decode_recording(audio: speech_pb2.AudioInput, limits: VoiceLimits) -> tuple[np.ndarray, int]:
    """AudioInput -> float32 mono PCM at the recording's own rate (the voice model resamples it exactly as the
    in-process codec resamples a file), and that rate. Raises VoiceRecordingError."""
    from moss_speech.services.server import ENCODINGS  # the one proto -> encoding table

    if audio.format.encoding not in ENCODINGS:
        raise VoiceRecordingError(f"unknown audio encoding {audio.format.encoding}")
    spec = AudioSpec(ENCODINGS[audio.format.encoding], audio.format.sample_rate, audio.format.channels or 1)
    data = bytes(audio.data)
    if not data:
        raise VoiceRecordingError("recording is empty")
    try:
        spec.check()
        # decode a little past the limit so a long recording gets check_recording's "too long" message
        decode_limits = AudioLimits(
            max_seconds=2 * limits.max_seconds, max_bytes=spec.max_bytes(2 * limits.max_seconds)
        )
        if spec.encoding == "container":
            import soundfile as sf

            try:
                rate = int(sf.info(io.BytesIO(data)).samplerate)
            except Exception:  # noqa: BLE001 - soundfile raises several types; load_audio words the error
                rate = 16000
            pcm = load_audio(data, None, rate, decode_limits)
        else:
            dtype = RAW_DTYPES[spec.encoding]
            if len(data) % (dtype.itemsize * spec.channels):
                raise VoiceRecordingError(f"{len(data)} bytes is not a whole number of {spec.encoding} frames")
            rate = spec.sample_rate
            pcm = load_audio(np.frombuffer(data, dtype=dtype).reshape(-1, spec.channels), rate, rate, decode_limits)
    except AudioError as e:
        if e.kind == "too_long":
            raise VoiceRecordingError(f"recording is too long: at most {limits.max_seconds:g} s") from None
        raise VoiceRecordingError(f"recording: {e}") from None
    return pcm, rate


class VoiceClient:
    """Calls of the Triton `voice` model, on an endpoint the service's TritonPool picks (a comma list or a
    `dns:///` name works as for turns; voices live in a folder every Triton shares, so any endpoint serves them)."""

    def __init__(self, pool: Any, model: str = T.VOICE_MODEL.name) -> None:
        self.pool, self.model = pool, model
        self._clients: dict[str, grpcclient.InferenceServerClient] = {}

    async def _client(self) -> grpcclient.InferenceServerClient:
        await self.pool.refresh()
        ep = self.pool.pick()  # healthy, least loaded
        if ep not in self._clients:
            self._clients[ep] = grpcclient.InferenceServerClient(ep, channel_args=CHANNEL_ARGS)
        return self._clients[ep]

    async def call(
        self, op: str, args: dict[str, Any], pcm: np.ndarray | None = None, timeout: float = CALL_TIMEOUT
    ) -> dict[str, Any]:
        arrays = {
            T.VOICE_OP: np.array([[op.encode()]], dtype=np.object_),
            T.VOICE_ARGS: np.array([[json.dumps(args).encode()]], dtype=np.object_),
        }
        if pcm is not None:
            arrays[T.VOICE_PCM] = np.ascontiguousarray(pcm, dtype=np.float32).reshape(1, -1)
        inputs = []
        for spec, value in arrays.items():
            t = InferInput(spec.name, list(value.shape), spec.wire_type)
            t.set_data_from_numpy(value)
            inputs.append(t)
        try:
            client = await self._client()
        except Exception as e:  # noqa: BLE001 - no endpoint: the pool's UNAVAILABLE
            log.warning("no Triton endpoint for a voice call", extra={"fields": {"error": str(e)}})
            raise VoiceError(grpc.StatusCode.UNAVAILABLE, "the voice model is unavailable; retry later") from None
        try:
            result = await client.infer(
                self.model, inputs, outputs=[InferRequestedOutput(T.VOICE_INFO.name)], client_timeout=timeout
            )
        except InferenceServerException as e:
            raise self._error(e) from None
        return json.loads(result.as_numpy(T.VOICE_INFO.name).reshape(-1)[0])

    def _error(self, e: InferenceServerException) -> VoiceError:
        text = e.message() or str(e)
        m = _STATUS.search(text)
        if m:
            return VoiceError(getattr(grpc.StatusCode, m.group(1)), m.group(2).strip())
        log.warning("voice model call failed", extra={"fields": {"error": text}})
        return VoiceError(grpc.StatusCode.UNAVAILABLE, "the voice model is unavailable; retry later")

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()


def voice_msg(info: dict[str, Any], default_voice: str, request_id: str = "") -> speech_pb2.Voice:
    return speech_pb2.Voice(
        voice_id=info["voice_id"],
        is_default=info["voice_id"] == default_voice,
        name=info.get("name", ""),
        description=info.get("description", ""),
        builtin=bool(info.get("builtin")),
        duration_seconds=float(info.get("duration_seconds", 0.0)),
        created_unix=float(info.get("created_unix", 0.0)),
        prompt_tokens=int(info.get("prompt_tokens", 0)),
        request_id=request_id,
    )


class VoiceRPCs:
    """Mixed into `MossSpeechServicer` (uses its settings, triton, _start, _record and _fail)."""

    voice_limits = VoiceLimits()
    _voice_client: VoiceClient | None = None

    @property
    def voice_client(self) -> VoiceClient:
        if self._voice_client is None:
            self._voice_client = VoiceClient(self.triton)  # the TritonPool of the turns
        return self._voice_client

    async def require_voice(self, voice: str) -> None:
        """Before a turn: a created voice id must exist and belong to the caller (NOT_FOUND otherwise)."""
        if is_created(voice):
            try:
                await self.voice_client.call("get", {"owner": owner(), "voice_id": voice}, timeout=10.0)
            except VoiceError as e:
                raise as_service_error(e) from None

    async def _voice_rpc(self, method: str, context, work):
        rid = await self._start(context)
        try:
            response = await work(rid)
            await self._record(method, "none", grpc.StatusCode.OK)
            return response
        except (VoiceRecordingError, VoiceError) as e:
            await self._fail(context, method, "none", as_service_error(e), rid)
        except Exception as e:  # noqa: BLE001
            await self._fail(context, method, "none", e, rid)

    async def CreateVoice(self, request: speech_pb2.CreateVoiceRequest, context):
        async def work(rid: str):
            check_name(request.name, request.description, self.voice_limits)
            if not request.HasField("audio"):
                raise VoiceRecordingError("request has no recording (audio)")
            pcm, rate = decode_recording(request.audio, self.voice_limits)
            check_recording(pcm, rate, self.voice_limits)
            info = await self.voice_client.call(
                "create",
                {"owner": owner(), "name": request.name, "description": request.description, "sample_rate": rate},
                pcm,
            )
            log.info(
                "voice created",
                extra={"fields": {"voice_id": info["voice_id"], "seconds": info.get("duration_seconds")}},
            )
            return voice_msg(info, self.settings.default_voice, rid)

        return await self._voice_rpc("CreateVoice", context, work)

    async def GetVoice(self, request: speech_pb2.GetVoiceRequest, context):
        async def work(rid: str):
            info = await self.voice_client.call("get", {"owner": owner(), "voice_id": request.voice_id})
            return voice_msg(info, self.settings.default_voice, rid)

        return await self._voice_rpc("GetVoice", context, work)

    async def DeleteVoice(self, request: speech_pb2.DeleteVoiceRequest, context):
        async def work(rid: str):
            await self.voice_client.call("delete", {"owner": owner(), "voice_id": request.voice_id})
            log.info("voice deleted", extra={"fields": {"voice_id": request.voice_id}})
            return speech_pb2.DeleteVoiceResponse(request_id=rid, voice_id=request.voice_id)

        return await self._voice_rpc("DeleteVoice", context, work)

    async def ListVoices(self, request, context):
        async def work(rid: str):
            try:
                infos = (await self.voice_client.call("list", {"owner": owner()}, timeout=10.0))["voices"]
            except VoiceError:  # a repository without the voice model: the vocoder's built-in list
                ids = await self.triton.voices() or [self.settings.default_voice]
                infos = [{"voice_id": v, "name": v, "builtin": True} for v in ids]
            builtin = [i["voice_id"] for i in infos if i.get("builtin")]
            if builtin and builtin != [self.settings.default_voice]:
                self.voice_ids = builtin
            return speech_pb2.ListVoicesResponse(
                request_id=rid, voices=[voice_msg(i, self.settings.default_voice) for i in infos]
            )

        return await self._voice_rpc("ListVoices", context, work)
