"""One `/v1/realtime` WebSocket: the Realtime conversation state machine over one service session.

State: the session config (instructions, modalities, formats, voice, turn detection), the input audio buffer with
its VAD, the conversation items, the user items not yet answered (`pending`), and at most one active response
(an asyncio task streaming one `StreamConverse` turn).

Turns: a response sends every pending user item as one service turn (audio items concatenated, or text items
joined; a mix is refused). A completed response moves them into the model's history (the service session); a
cancelled or failed one leaves them pending, so the next response answers them together with what came after
(the service never commits a cancelled turn, so this keeps the user's words).
Barge-in: with server VAD and `interrupt_response`, speech starting during a response cancels it
(`response.done` status cancelled, reason turn_detected). `conversation.item.truncate` on the last completed answer
cuts it in the model's history to what was played (`TruncateReply`).
Errors become `error` events; the socket stays open.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

from moss_speech.services.logging import get_logger
from moss_speech.services.realtime import events as ev
from moss_speech.services.realtime.audio import FORMATS, PCM_RATE, Format, Resampler, resample
from moss_speech.services.realtime.bridge import Bridge, TurnRequest
from moss_speech.services.realtime.events import ProtocolError
from moss_speech.services.realtime.metrics import RealtimeMetrics
from moss_speech.services.realtime.settings import RealtimeSettings
from moss_speech.services.realtime.vad import VAD_RATE, Endpointer, VadConfig

log = get_logger("realtime")

MIN_COMMIT_MS = 100  # as the Realtime API: a commit needs at least 100 ms of audio
GRPC_ERRORS = {  # service status -> (error type, code)
    grpc.StatusCode.INVALID_ARGUMENT: ("invalid_request_error", "invalid_value"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: ("invalid_request_error", "resource_exhausted"),
    grpc.StatusCode.FAILED_PRECONDITION: ("invalid_request_error", "conflict"),
    grpc.StatusCode.NOT_FOUND: ("invalid_request_error", "session_not_found"),
    grpc.StatusCode.UNAUTHENTICATED: ("invalid_request_error", "unauthenticated"),
    grpc.StatusCode.PERMISSION_DENIED: ("invalid_request_error", "permission_denied"),
    grpc.StatusCode.DEADLINE_EXCEEDED: ("server_error", "timeout"),
    grpc.StatusCode.UNAVAILABLE: ("server_error", "service_unavailable"),
}


def grpc_error(e: grpc.RpcError) -> ProtocolError:
    code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
    kind, name = GRPC_ERRORS.get(code, ("server_error", "server_error"))
    details = (e.details() if hasattr(e, "details") else "") or ""
    if kind == "server_error" and code not in GRPC_ERRORS:
        details = "the speech service failed"  # INTERNAL and unknown statuses: no internals to the client
    return ProtocolError(name, details, type=kind)


@dataclass
class Config:
    instructions: str = ""
    modalities: list[str] = field(default_factory=lambda: ["audio"])
    in_format: Format = FORMATS["audio/pcm"]
    out_format: Format = FORMATS["audio/pcm"]
    vad: VadConfig | None = field(default_factory=VadConfig)
    voice: str = "default"
    max_output_tokens: int | str = "inf"


@dataclass
class Item:
    id: str
    role: str  # user | assistant
    kind: str  # audio | text
    text: str = ""  # user text, or the answer's transcript / text
    pcm: np.ndarray | None = None  # user audio, int16 at `rate`
    rate: int = PCM_RATE
    in_model: bool = False  # part of the service session's history
    audio_ms: float = 0.0  # assistant: audio sent
    status: str = "completed"

    def content(self) -> list[dict[str, Any]]:
        if self.role == "user":
            return [
                {"type": "input_audio", "transcript": None}
                if self.kind == "audio"
                else {"type": "input_text", "text": self.text}
            ]
        return [
            {"type": "output_audio", "transcript": self.text}
            if self.kind == "audio"
            else {"type": "output_text", "text": self.text}
        ]

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "realtime.item",
            "type": "message",
            "role": self.role,
            "status": self.status,
            "content": self.content(),
        }


@dataclass
class Response:
    id: str
    item: Item
    modalities: list[str]
    voice: str
    out_format: Format
    turn: TurnRequest
    items: list[str]  # the user items this response answers
    started: float
    max_output_tokens: int | str
    task: asyncio.Task | None = None
    reason: str | None = None  # why it was cancelled
    last_delta_at: float = 0.0


class Connection:
    def __init__(
        self, ws, bridge: Bridge, settings: RealtimeSettings, metrics: RealtimeMetrics, metadata: tuple, model: str
    ) -> None:
        self.ws, self.bridge, self.settings, self.metrics = ws, bridge, settings, metrics
        self.metadata, self.model = metadata, model
        self.session_id = ""
        self.conversation_id = ev.new_id("conv")
        self.realtime_id = ev.new_id("sess")
        self.config = Config(voice=settings.default_voice, vad=self._default_vad())
        self.items: OrderedDict[str, Item] = OrderedDict()
        self.pending: list[str] = []
        self.response: Response | None = None
        self.last_answer: str | None = None  # the item that is the service session's last turn
        self.voices: list[str] = []
        self._send_lock = asyncio.Lock()
        self._after_cancel = False  # the last response did not complete (the service may still hold the session)
        self._reset_input()

    def _default_vad(self) -> VadConfig:
        s = self.settings
        return VadConfig(
            threshold=s.vad_threshold,
            prefix_padding_ms=s.vad_prefix_padding_ms,
            silence_duration_ms=s.vad_silence_duration_ms,
        )

    # --- plumbing -----------------------------------------------------------------------------------------
    async def send(self, event: dict[str, Any]) -> None:
        data = json.dumps(event)
        async with self._send_lock:  # one writer at a time; shielded so a cancelled response never cuts a frame
            await asyncio.shield(self.ws.send(data))

    async def send_error(self, e: ProtocolError, client_event_id: str | None = None) -> None:
        self.metrics.errors.labels(e.code).inc()
        await self.send(ev.error_event(e, client_event_id))

    async def run(self) -> None:
        try:
            self.session_id = await self.bridge.create_session(self.metadata)
            self.voices = await self.bridge.voices(self.metadata)
        except grpc.RpcError as e:
            await self.send_error(grpc_error(e))
            await self.ws.close(1011, "speech service unavailable")
            return
        await self.send(ev.event("session.created", session=self.session_dict()))
        try:
            async for message in self.ws:
                await self.handle(message)
        finally:
            await self._cancel_response("client_cancelled", wait=True)
            if self.session_id:
                try:
                    await self.bridge.delete_session(self.session_id, self.metadata)
                except grpc.RpcError:
                    pass  # evicted by the service's idle TTL anyway

    async def handle(self, message: str | bytes) -> None:
        client_event_id = None
        try:
            if isinstance(message, bytes):
                raise ProtocolError("invalid_event", "binary messages are not part of the protocol; send JSON text")
            try:
                data = json.loads(message)
            except ValueError:
                raise ProtocolError("invalid_json", "the message is not valid JSON") from None
            if isinstance(data, dict) and isinstance(data.get("event_id"), str):
                client_event_id = data["event_id"][:128]
            e = ev.parse_client_event(data)
            self.metrics.events.labels(e.type).inc()
            await getattr(self, "on_" + e.type.replace(".", "_"))(e)
        except ProtocolError as err:
            await self.send_error(err, client_event_id)
        except grpc.RpcError as err:
            await self.send_error(grpc_error(err), client_event_id)

    # --- session ------------------------------------------------------------------------------------------
    def session_dict(self) -> dict[str, Any]:
        c = self.config
        fmt = lambda f: {"type": f.type, "rate": f.rate} if f.type == "audio/pcm" else {"type": f.type}  # noqa: E731
        return {
            "type": "realtime",
            "object": "realtime.session",
            "id": self.realtime_id,
            "model": self.model,
            "output_modalities": c.modalities,
            "instructions": c.instructions,
            "max_output_tokens": c.max_output_tokens,
            "tools": [],
            "tool_choice": "auto",
            "audio": {
                "input": {
                    "format": fmt(c.in_format),
                    "turn_detection": c.vad.as_dict() if c.vad else None,
                    "transcription": None,
                    "noise_reduction": None,
                },
                "output": {"format": fmt(c.out_format), "voice": c.voice, "speed": 1.0},
            },
        }

    def _voice(self, voice: Any) -> str:
        if not isinstance(voice, str):
            raise ProtocolError(
                "unsupported", "custom voice objects are not supported; use a voice id", "session.audio.output.voice"
            )
        if self.voices and voice not in self.voices:
            raise ProtocolError(
                "invalid_value",
                f"unknown voice {voice[:64]!r}; voices: {', '.join(self.voices)}",
                "session.audio.output.voice",
            )
        return voice

    @staticmethod
    def _modalities(m: list[str]) -> list[str]:
        return ["audio"] if "audio" in m else ["text"]  # audio output always carries its transcript

    async def on_session_update(self, e: ev.SessionUpdate) -> None:
        s, c = e.session, self.config
        new = Config(**vars(c))
        if s.tools:
            raise ProtocolError("unsupported", "tools are not supported by this model", "session.tools")
        if s.instructions is not None:
            if len(s.instructions) > self.settings.max_text_chars:
                raise ProtocolError(
                    "invalid_value",
                    f"instructions are longer than {self.settings.max_text_chars} characters",
                    "session.instructions",
                )
            new.instructions = s.instructions
        if s.output_modalities is not None:
            new.modalities = self._modalities(s.output_modalities)
        if s.max_output_tokens is not None:
            new.max_output_tokens = s.max_output_tokens
        if s.audio and s.audio.input:
            i = s.audio.input
            if i.format is not None:
                new.in_format = FORMATS[i.format.type]
            if "turn_detection" in i.model_fields_set:
                td = i.turn_detection
                if td is not None and td.type != "server_vad":
                    raise ProtocolError(
                        "unsupported",
                        "only server_vad turn detection is supported (or null)",
                        "session.audio.input.turn_detection.type",
                    )
                if td is None:
                    new.vad = None
                else:
                    base = c.vad or self._default_vad()
                    new.vad = VadConfig(
                        **{
                            k: v if v is not None else getattr(base, k)
                            for k, v in {
                                "threshold": td.threshold,
                                "prefix_padding_ms": td.prefix_padding_ms,
                                "silence_duration_ms": td.silence_duration_ms,
                                "create_response": td.create_response,
                                "interrupt_response": td.interrupt_response,
                            }.items()
                        }
                    )
        if s.audio and s.audio.output:
            o = s.audio.output
            if o.format is not None:
                new.out_format = FORMATS[o.format.type]
            if o.voice is not None:
                new.voice = self._voice(o.voice)
        input_changed = new.in_format != c.in_format or (new.vad is None) != (c.vad is None) or new.vad != c.vad
        self.config = new
        if input_changed:
            self._reset_input()
        await self.send(ev.event("session.updated", session=self.session_dict()))

    # --- input audio --------------------------------------------------------------------------------------
    def _reset_input(self) -> None:
        self.buffer: list[np.ndarray] = []
        self.buffer_samples = 0
        self.stream_samples = 0  # input samples since the input (format / VAD) was last set up
        self.buffer_start = 0  # stream position (samples) of buffer[0][0]
        self.speech_item: str | None = None
        c = self.config
        self.endpointer = Endpointer(c.vad) if c.vad else None
        self.to_vad = Resampler(c.in_format.rate, VAD_RATE, quality="QQ") if c.vad else None

    def _ms(self, samples: int) -> int:
        return int(round(1000 * samples / self.config.in_format.rate))

    def _pending_seconds(self) -> float:
        return sum(
            len(self.items[i].pcm) / self.items[i].rate
            for i in self.pending
            if i in self.items and self.items[i].pcm is not None
        )

    async def on_input_audio_buffer_append(self, e: ev.InputAudioBufferAppend) -> None:
        fmt = self.config.in_format
        if len(e.audio) > self.settings.max_append_bytes * 4 // 3 + 4:
            raise ProtocolError(
                "input_audio_buffer_append_too_large",
                f"an append carries at most {self.settings.max_append_bytes} bytes of audio",
                "audio",
            )
        data = ev.b64decode(e.audio, "audio")
        if len(data) > self.settings.max_append_bytes:
            raise ProtocolError(
                "input_audio_buffer_append_too_large",
                f"an append carries at most {self.settings.max_append_bytes} bytes of audio",
                "audio",
            )
        if len(data) % fmt.width:
            raise ProtocolError(
                "invalid_audio", f"{len(data)} bytes is not a whole number of {fmt.type} samples", "audio"
            )
        pcm = fmt.to_pcm16(data)
        limit = self.settings.max_buffer_seconds
        if (self.buffer_samples + len(pcm)) / fmt.rate + self._pending_seconds() > limit:
            if self.endpointer is None or self.speech_item is None:
                raise ProtocolError(
                    "input_audio_buffer_too_large",
                    f"input audio would exceed {limit:g} s; commit or clear the buffer",
                    "audio",
                )
            await self._speech_stopped(self._ms(self.stream_samples))  # VAD: end the turn at the limit
        self.buffer.append(pcm)
        self.buffer_samples += len(pcm)
        self.stream_samples += len(pcm)
        if self.endpointer is None:
            return
        for v in self.endpointer.feed(self.to_vad(pcm)):
            if v.kind == "start":
                await self._speech_started(v.ms)
            elif self.speech_item is not None:
                await self._speech_stopped(v.ms)
        if self.speech_item is None:
            self._trim_preroll()

    def _trim_preroll(self) -> None:
        """Without speech, keep only the prefix padding (plus VAD lag) so the buffer stays small."""
        keep = int(
            self.config.in_format.rate * ((self.config.vad.prefix_padding_ms if self.config.vad else 0) + 200) / 1000
        )
        if self.buffer_samples > 2 * keep:
            pcm = np.concatenate(self.buffer)[-keep:]
            self.buffer, self.buffer_samples = [pcm], len(pcm)
            self.buffer_start = self.stream_samples - len(pcm)

    async def _speech_started(self, audio_start_ms: int) -> None:
        self.speech_item = ev.new_id("item")
        start = int(audio_start_ms * self.config.in_format.rate / 1000)
        if start > self.buffer_start and self.buffer:  # drop audio before the padded onset
            pcm = np.concatenate(self.buffer)[start - self.buffer_start :]
            self.buffer, self.buffer_samples, self.buffer_start = [pcm], len(pcm), start
        await self.send(
            ev.event("input_audio_buffer.speech_started", audio_start_ms=audio_start_ms, item_id=self.speech_item)
        )
        if self.response and self.config.vad and self.config.vad.interrupt_response:
            self.metrics.barge_ins.inc()
            await self._cancel_response("turn_detected")

    async def _speech_stopped(self, audio_end_ms: int) -> None:
        item_id, self.speech_item = self.speech_item, None
        if self.endpointer:
            self.endpointer.reset()
        await self.send(ev.event("input_audio_buffer.speech_stopped", audio_end_ms=audio_end_ms, item_id=item_id))
        await self._commit(item_id)
        if self.config.vad and self.config.vad.create_response and self.response is None:
            await self._start_response(None)

    async def _commit(self, item_id: str | None) -> None:
        rate = self.config.in_format.rate
        if self._ms(self.buffer_samples) < MIN_COMMIT_MS:
            raise ProtocolError(
                "input_audio_buffer_commit_empty",
                f"buffer too small: {self._ms(self.buffer_samples)} ms of audio, at least "
                f"{MIN_COMMIT_MS} ms are needed",
            )
        pcm = np.concatenate(self.buffer)
        self.buffer, self.buffer_samples, self.buffer_start = [], 0, self.stream_samples
        item = Item(id=item_id or ev.new_id("item"), role="user", kind="audio", pcm=pcm, rate=rate)
        previous = next(reversed(self.items), None)
        await self._add_item(item)
        await self.send(ev.event("input_audio_buffer.committed", item_id=item.id, previous_item_id=previous))
        await self._announce(item, previous)

    async def on_input_audio_buffer_commit(self, e: ev.InputAudioBufferCommit) -> None:
        item_id, self.speech_item = self.speech_item, None
        if self.endpointer:
            self.endpointer.reset()
        await self._commit(item_id)

    async def on_input_audio_buffer_clear(self, e: ev.InputAudioBufferClear) -> None:
        self.buffer, self.buffer_samples, self.buffer_start = [], 0, self.stream_samples
        self.speech_item = None
        if self.endpointer:
            self.endpointer.reset()
        await self.send(ev.event("input_audio_buffer.cleared"))

    async def on_output_audio_buffer_clear(self, e: ev.OutputAudioBufferClear) -> None:
        raise ProtocolError(
            "unsupported",
            "output_audio_buffer.clear is for WebRTC/SIP; over a WebSocket the client "
            "owns playback: send response.cancel and conversation.item.truncate",
        )

    # --- conversation items ---------------------------------------------------------------------------------
    async def _add_item(self, item: Item) -> None:
        if item.role == "user":
            if len(self.pending) >= self.settings.max_pending_items:
                raise ProtocolError(
                    "too_many_items",
                    f"{self.settings.max_pending_items} user items already wait for a response; create one first",
                )
            self.pending.append(item.id)
        self.items[item.id] = item
        while len(self.items) > self.settings.max_items:  # forget the oldest (metadata only: they are answered)
            old = next(iter(self.items))
            if old in self.pending:
                break
            del self.items[old]

    async def _announce(self, item: Item, previous: str | None) -> None:
        await self.send(ev.event("conversation.item.added", previous_item_id=previous, item=item.as_dict()))
        await self.send(ev.event("conversation.item.done", previous_item_id=previous, item=item.as_dict()))

    async def on_conversation_item_create(self, e: ev.ConversationItemCreate) -> None:
        it = e.item
        if it.type != "message" or it.role != "user":
            raise ProtocolError(
                "unsupported",
                "only user messages can be added to the conversation "
                "(this model keeps no injected assistant, system or tool items)",
                "item.role",
            )
        last = next(reversed(self.items), None)
        if e.previous_item_id not in (None, last) and not (e.previous_item_id == "root" and last is None):
            raise ProtocolError(
                "unsupported", "items can only be appended at the end of the conversation", "previous_item_id"
            )
        if it.id and it.id in self.items:
            raise ProtocolError("invalid_value", f"item id {it.id!r} already exists", "item.id")
        kinds = {c.type for c in it.content}
        if not kinds or not kinds <= {"input_text", "input_audio"} or len(kinds) > 1:
            raise ProtocolError(
                "invalid_value",
                "a user message holds input_text parts or input_audio parts (not both, at least one)",
                "item.content",
            )
        if kinds == {"input_text"}:
            text = "\n".join(c.text or "" for c in it.content)
            if not text.strip():
                raise ProtocolError("invalid_value", "the message text is empty", "item.content")
            if len(text) > self.settings.max_text_chars:
                raise ProtocolError(
                    "invalid_value",
                    f"the message text is longer than {self.settings.max_text_chars} characters",
                    "item.content",
                )
            item = Item(id=it.id or ev.new_id("item"), role="user", kind="text", text=text)
        else:
            fmt = self.config.in_format
            parts = []
            for c in it.content:
                data = ev.b64decode(c.audio or "", "item.content.audio")
                if len(data) % fmt.width or not data:
                    raise ProtocolError(
                        "invalid_audio", f"input_audio is not whole {fmt.type} samples", "item.content.audio"
                    )
                parts.append(fmt.to_pcm16(data))
            pcm = np.concatenate(parts)
            if len(pcm) / fmt.rate + self._pending_seconds() > self.settings.max_buffer_seconds:
                raise ProtocolError(
                    "input_audio_buffer_too_large",
                    f"unanswered audio would exceed {self.settings.max_buffer_seconds:g} s",
                )
            item = Item(id=it.id or ev.new_id("item"), role="user", kind="audio", pcm=pcm, rate=fmt.rate)
        await self._add_item(item)
        await self._announce(item, last)

    def _item(self, item_id: str) -> Item:
        item = self.items.get(item_id)
        if item is None:
            raise ProtocolError("item_not_found", f"no item {item_id[:64]!r} in this conversation", "item_id")
        return item

    async def on_conversation_item_retrieve(self, e: ev.ConversationItemRetrieve) -> None:
        await self.send(ev.event("conversation.item.retrieved", item=self._item(e.item_id).as_dict()))

    async def on_conversation_item_delete(self, e: ev.ConversationItemDelete) -> None:
        item = self._item(e.item_id)
        if item.in_model:
            raise ProtocolError(
                "unsupported",
                "this item is already in the model's history, which keeps whole "
                "turns; only unanswered items can be deleted (answers can be truncated)",
                "item_id",
            )
        if self.response and (item.id in self.response.items or item.id == self.response.item.id):
            raise ProtocolError("conflict", "the item belongs to the active response; cancel it first", "item_id")
        del self.items[item.id]
        if item.id in self.pending:
            self.pending.remove(item.id)
        await self.send(ev.event("conversation.item.deleted", item_id=item.id))

    async def on_conversation_item_truncate(self, e: ev.ConversationItemTruncate) -> None:
        item = self._item(e.item_id)
        if item.role != "assistant" or item.kind != "audio" or e.content_index != 0:
            raise ProtocolError(
                "invalid_value",
                "only the audio content (content_index 0) of an assistant message can be truncated",
                "item_id",
            )
        if e.audio_end_ms > item.audio_ms + 1:
            raise ProtocolError(
                "invalid_value",
                f"audio_end_ms {e.audio_end_ms} is beyond the item's {item.audio_ms:.0f} ms of audio",
                "audio_end_ms",
            )
        if self.response and self.response.item is item:
            raise ProtocolError("conflict", "the response is still running; cancel it before truncating", "item_id")
        if item.in_model:
            if item.id != self.last_answer or self.response is not None:
                raise ProtocolError(
                    "unsupported", "only the last answer can be truncated, before the next response starts", "item_id"
                )
            await self.bridge.truncate(self.session_id, e.audio_end_ms, self.metadata)
        item.audio_ms = float(e.audio_end_ms)
        item.text = ""  # as the Realtime API: no transcript the user did not hear
        await self.send(
            ev.event("conversation.item.truncated", item_id=item.id, content_index=0, audio_end_ms=e.audio_end_ms)
        )

    # --- responses ------------------------------------------------------------------------------------------
    async def on_response_create(self, e: ev.ResponseCreate) -> None:
        await self._start_response(e.response)

    async def on_response_cancel(self, e: ev.ResponseCancel) -> None:
        r = self.response
        if r is None or (e.response_id and e.response_id != r.id):
            raise ProtocolError(
                "response_cancel_not_active",
                "there is no active response to cancel"
                if r is None
                else f"response {e.response_id[:64]!r} is not active",
                "response_id",
            )
        await self._cancel_response("client_cancelled")

    def _turn_input(self) -> tuple[list[str], bytes | None, int, str | None]:
        items = [self.items[i] for i in self.pending if i in self.items]
        if not items:
            raise ProtocolError("no_input", "nothing to answer: add a user message or commit audio first")
        kinds = {i.kind for i in items}
        if len(kinds) > 1:
            raise ProtocolError(
                "invalid_value",
                "the unanswered user items mix text and audio; one response answers one kind (delete some items)",
            )
        ids = [i.id for i in items]
        if kinds == {"text"}:
            return ids, None, PCM_RATE, "\n".join(i.text for i in items)
        rate = max(i.rate for i in items)
        pcm = np.concatenate([resample(i.pcm, i.rate, rate) for i in items])
        return ids, pcm.astype("<i2").tobytes(), rate, None

    async def _start_response(self, params: ev.ResponseParamsIn | None) -> None:
        if self.response is not None:
            raise ProtocolError(
                "conversation_already_has_active_response",
                f"response {self.response.id} is in progress; cancel it or wait for response.done",
            )
        c = self.config
        p = params or ev.ResponseParamsIn()
        if p.conversation not in (None, "auto") or p.input is not None:
            raise ProtocolError(
                "unsupported",
                "out-of-band responses (conversation 'none', custom input) are not supported",
                "response.conversation",
            )
        if p.tools:
            raise ProtocolError("unsupported", "tools are not supported by this model", "response.tools")
        if p.instructions is not None and len(p.instructions) > self.settings.max_text_chars:
            raise ProtocolError("invalid_value", "instructions are too long", "response.instructions")
        modalities = self._modalities(p.output_modalities) if p.output_modalities else c.modalities
        voice, out_format = c.voice, c.out_format
        if p.audio and p.audio.output:
            voice = self._voice(p.audio.output.voice) if p.audio.output.voice is not None else voice
            out_format = FORMATS[p.audio.output.format.type] if p.audio.output.format else out_format
        max_tokens = p.max_output_tokens if p.max_output_tokens is not None else c.max_output_tokens
        ids, pcm, rate, text = self._turn_input()
        output = "speech" if modalities == ["audio"] else "text"
        turn = TurnRequest(
            output=output,
            voice=voice,
            max_new_tokens=None if max_tokens == "inf" else int(max_tokens),
            system_prompt=p.instructions if p.instructions is not None else c.instructions,
            audio_pcm16=pcm,
            audio_rate=rate,
            text=text,
            after_cancel=self._after_cancel,
        )
        item = Item(
            id=ev.new_id("item"), role="assistant", kind="audio" if output == "speech" else "text", status="in_progress"
        )
        r = Response(
            id=ev.new_id("resp"),
            item=item,
            modalities=modalities,
            voice=voice,
            out_format=out_format,
            turn=turn,
            items=ids,
            started=time.perf_counter(),
            max_output_tokens=max_tokens,
        )
        self.response = r
        r.task = asyncio.create_task(self._run_response(r))

    async def _cancel_response(self, reason: str, wait: bool = False) -> None:
        r = self.response
        if r is None or r.task is None:
            return
        r.reason = r.reason or reason
        r.task.cancel()
        if wait:
            await asyncio.gather(r.task, return_exceptions=True)

    def _fmt(self, f: Format) -> dict[str, Any]:
        return {"type": f.type, "rate": f.rate} if f.type == "audio/pcm" else {"type": f.type}

    def _response_obj(self, r: Response, status: str, **kw: Any) -> dict[str, Any]:
        output = [] if status == "in_progress" else [r.item.as_dict()]
        return ev.response_obj(
            r.id,
            self.conversation_id,
            status,
            r.modalities,
            r.voice,
            self._fmt(r.out_format),
            output,
            max_output_tokens=r.max_output_tokens,
            **kw,
        )

    async def _run_response(self, r: Response) -> None:
        item, audio = r.item, r.item.kind == "audio"
        previous = next(reversed(self.items), None)
        ids = {"response_id": r.id, "item_id": item.id, "output_index": 0, "content_index": 0}
        status, reason, error, usage = "completed", None, None, None
        to_out = Resampler(PCM_RATE, r.out_format.rate)
        part_open = False
        t_first = None
        try:
            await self.send(ev.event("response.created", response=self._response_obj(r, "in_progress")))
            self.items[item.id] = item
            await self.send(
                ev.event("response.output_item.added", response_id=r.id, output_index=0, item=item.as_dict())
            )
            await self.send(ev.event("conversation.item.added", previous_item_id=previous, item=item.as_dict()))
            part = {"type": "audio", "transcript": ""} if audio else {"type": "text", "text": ""}
            await self.send(ev.event("response.content_part.added", part=part, **{k: v for k, v in ids.items()}))
            part_open = True
            final = None
            async for msg in self.bridge.converse(
                self.session_id, r.turn, self.metadata, self.settings.response_timeout_seconds
            ):
                kind = msg.WhichOneof("kind")
                if kind == "text" and msg.text.text:
                    item.text += msg.text.text
                    name = "response.output_audio_transcript.delta" if audio else "response.output_text.delta"
                    await self.send(ev.event(name, delta=msg.text.text, **ids))
                elif kind == "audio" and audio and msg.audio.pcm16:
                    pcm = np.frombuffer(msg.audio.pcm16, dtype="<i2")
                    wire = r.out_format.from_pcm16(to_out(pcm))
                    item.audio_ms += 1000 * len(pcm) / PCM_RATE
                    if t_first is None:
                        t_first = time.perf_counter()
                        self.metrics.time_to_first_audio.observe(t_first - r.started)
                    await self.send(
                        ev.event("response.output_audio.delta", delta=base64.b64encode(wire).decode(), **ids)
                    )
                    r.last_delta_at = time.perf_counter()
                elif kind == "final":
                    final = msg.final
            tail = to_out(np.zeros(0, np.int16), last=True) if audio else None  # the resampler's delay line
            if tail is not None and len(tail):
                await self.send(
                    ev.event(
                        "response.output_audio.delta",
                        delta=base64.b64encode(r.out_format.from_pcm16(tail)).decode(),
                        **ids,
                    )
                )
            if final is not None:
                u = final.usage
                usage = ev.usage_obj(
                    int(u.prompt_tokens), int(u.generated_tokens), r.turn.audio_pcm16 is not None, audio
                )
                if u.stop_reason in ("max_new_tokens", "context"):
                    status, reason = "incomplete", "max_output_tokens"
            for i in r.items:
                if i in self.items:
                    self.items[i].in_model = True
            self.pending = [i for i in self.pending if i not in r.items]
            item.in_model, self.last_answer = True, item.id
        except asyncio.CancelledError:
            status, reason = "cancelled", r.reason or "client_cancelled"
        except grpc.RpcError as e:
            err = grpc_error(e)
            log.info(
                "response failed",
                extra={"fields": {"response_id": r.id, "status": e.code().name, "details": e.details()}},
            )
            status, error = "failed", {"type": err.type, "code": err.code}
            if e.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED):
                self.pending = [i for i in self.pending if i not in r.items]  # the same input would fail again
            await self._quietly(self.send_error(err))
        except Exception:  # noqa: BLE001 - one response failing must not end the connection
            log.exception("response failed")
            status, error = "failed", {"type": "server_error", "code": "server_error"}
            await self._quietly(
                self.send_error(ProtocolError("server_error", "the response failed", type="server_error"))
            )
        finally:
            item.status = {"completed": "completed", "incomplete": "incomplete"}.get(status, "incomplete")
            self.response = None  # before the done events: a client may answer response.done at once
            self._after_cancel = status in ("cancelled", "failed")
            self.metrics.responses.labels(status).inc()
            await self._quietly(self._finish(r, ids, part_open, status, reason=reason, error=error, usage=usage))
            limits = ev.rate_limits_event(r.turn.rate_limits) if r.turn.rate_limits else None
            if limits:
                await self._quietly(self.send(limits))

    @staticmethod
    async def _quietly(coro) -> None:
        try:
            await coro
        except Exception:  # noqa: BLE001 - the socket is gone; nothing left to tell
            pass

    async def _finish(self, r: Response, ids: dict[str, Any], part_open: bool, status: str, **kw: Any) -> None:
        item, audio = r.item, r.item.kind == "audio"
        if part_open:
            if audio:
                await self.send(ev.event("response.output_audio.done", **ids))
                await self.send(ev.event("response.output_audio_transcript.done", transcript=item.text, **ids))
                part = {"type": "audio", "transcript": item.text}
            else:
                await self.send(ev.event("response.output_text.done", text=item.text, **ids))
                part = {"type": "text", "text": item.text}
            await self.send(ev.event("response.content_part.done", part=part, **ids))
            await self.send(
                ev.event("response.output_item.done", response_id=r.id, output_index=0, item=item.as_dict())
            )
            await self.send(ev.event("conversation.item.done", item=item.as_dict()))
        await self.send(ev.event("response.done", response=self._response_obj(r, status, **kw)))
