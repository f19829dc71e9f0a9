"""Realtime protocol: the client events this gateway accepts (validated with pydantic) and the server events it
sends (plain dicts built here, in one place).

Shapes follow the GA OpenAI Realtime API; the `openai` SDK's `openai.types.realtime` models are the reference and
the tests validate every event in both directions against them. Unknown fields of known events are ignored (voice
agent frameworks send options this model has no use for, such as `tracing` or `include`); options that would
change behaviour we cannot honour (tools, semantic VAD, out-of-band responses) are refused with an `error` event.
"""

from __future__ import annotations

import base64
import binascii
import secrets
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

# --- errors ---------------------------------------------------------------------------------------------------


class ProtocolError(Exception):
    """Becomes one `error` event; the connection stays open."""

    def __init__(self, code: str, message: str, param: str | None = None, type: str = "invalid_request_error") -> None:  # noqa: A002 - the protocol's field name
        super().__init__(message)
        self.code, self.message, self.param, self.type = code, message, param, type


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(10)}"


def b64decode(data: str, param: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError("invalid_base64", f"{param} is not valid base64", param) from None


# --- client events --------------------------------------------------------------------------------------------


class _In(BaseModel):
    model_config = ConfigDict(extra="ignore")


class AudioFormatIn(_In):
    type: Literal["audio/pcm", "audio/pcmu", "audio/pcma"] = "audio/pcm"
    rate: Literal[24000] | None = None


class TurnDetectionIn(_In):
    type: Literal["server_vad", "semantic_vad"]
    threshold: float | None = Field(None, ge=0.0, le=1.0)
    prefix_padding_ms: int | None = Field(None, ge=0, le=5000)
    silence_duration_ms: int | None = Field(None, ge=0, le=10000)
    create_response: bool | None = None
    interrupt_response: bool | None = None


class AudioInputIn(_In):
    format: AudioFormatIn | None = None
    turn_detection: TurnDetectionIn | None = None  # explicit null = manual turns (see fields_set)


class AudioOutputIn(_In):
    format: AudioFormatIn | None = None
    voice: str | dict[str, Any] | None = None


class AudioConfigIn(_In):
    input: AudioInputIn | None = None
    output: AudioOutputIn | None = None


Modalities = Annotated[list[Literal["audio", "text"]], Field(min_length=1, max_length=2)]
MaxTokens = int | Literal["inf"] | None


class SessionIn(_In):
    type: Literal["realtime"] | None = None
    instructions: str | None = None
    output_modalities: Modalities | None = None
    audio: AudioConfigIn | None = None
    max_output_tokens: MaxTokens = None
    tools: list[Any] | None = None


class SessionUpdate(_In):
    type: Literal["session.update"]
    event_id: str | None = None
    session: SessionIn


class InputAudioBufferAppend(_In):
    type: Literal["input_audio_buffer.append"]
    event_id: str | None = None
    audio: str


class InputAudioBufferCommit(_In):
    type: Literal["input_audio_buffer.commit"]
    event_id: str | None = None


class InputAudioBufferClear(_In):
    type: Literal["input_audio_buffer.clear"]
    event_id: str | None = None


class ContentIn(_In):
    type: Literal["input_text", "input_audio", "input_image", "output_text", "output_audio", "text", "audio"]
    text: str | None = None
    audio: str | None = None
    transcript: str | None = None


class ItemIn(_In):
    id: str | None = Field(None, max_length=64)
    type: Literal["message", "function_call", "function_call_output", "mcp_approval_response"]
    role: Literal["user", "assistant", "system"] | None = None
    content: list[ContentIn] = Field(default_factory=list, max_length=16)


class ConversationItemCreate(_In):
    type: Literal["conversation.item.create"]
    event_id: str | None = None
    previous_item_id: str | None = None
    item: ItemIn


class ConversationItemTruncate(_In):
    type: Literal["conversation.item.truncate"]
    event_id: str | None = None
    item_id: str
    content_index: int = Field(ge=0)
    audio_end_ms: int = Field(ge=0)


class ConversationItemDelete(_In):
    type: Literal["conversation.item.delete"]
    event_id: str | None = None
    item_id: str


class ConversationItemRetrieve(_In):
    type: Literal["conversation.item.retrieve"]
    event_id: str | None = None
    item_id: str


class ResponseParamsIn(_In):
    instructions: str | None = None
    output_modalities: Modalities | None = None
    max_output_tokens: MaxTokens = None
    audio: AudioConfigIn | None = None
    conversation: str | None = None
    input: list[Any] | None = None
    tools: list[Any] | None = None


class ResponseCreate(_In):
    type: Literal["response.create"]
    event_id: str | None = None
    response: ResponseParamsIn | None = None


class ResponseCancel(_In):
    type: Literal["response.cancel"]
    event_id: str | None = None
    response_id: str | None = None


class OutputAudioBufferClear(_In):
    type: Literal["output_audio_buffer.clear"]
    event_id: str | None = None


ClientEvent = Annotated[
    SessionUpdate
    | InputAudioBufferAppend
    | InputAudioBufferCommit
    | InputAudioBufferClear
    | ConversationItemCreate
    | ConversationItemTruncate
    | ConversationItemDelete
    | ConversationItemRetrieve
    | ResponseCreate
    | ResponseCancel
    | OutputAudioBufferClear,
    Field(discriminator="type"),
]
_CLIENT_EVENT: TypeAdapter[Any] = TypeAdapter(ClientEvent)
CLIENT_EVENT_TYPES = frozenset(
    m.model_fields["type"].annotation.__args__[0]  # type: ignore[union-attr]
    for m in (
        SessionUpdate,
        InputAudioBufferAppend,
        InputAudioBufferCommit,
        InputAudioBufferClear,
        ConversationItemCreate,
        ConversationItemTruncate,
        ConversationItemDelete,
        ConversationItemRetrieve,
        ResponseCreate,
        ResponseCancel,
        OutputAudioBufferClear,
    )
)


def parse_client_event(data: Any) -> Any:
    """A decoded JSON message -> one of the event models; raises ProtocolError naming the problem."""
    if not isinstance(data, dict):
        raise ProtocolError("invalid_event", "an event is a JSON object")
    kind = data.get("type")
    if not isinstance(kind, str):
        raise ProtocolError("invalid_event", "the event has no string `type`", "type")
    if kind not in CLIENT_EVENT_TYPES:
        raise ProtocolError("unknown_event_type", f"unknown client event type {kind[:64]!r}", "type")
    try:
        return _CLIENT_EVENT.validate_python(data)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(x) for x in first["loc"][1:])  # drop the discriminator tag
        raise ProtocolError("invalid_value", f"{kind}: {loc or 'event'}: {first['msg']}", loc or None) from None


# --- server events --------------------------------------------------------------------------------------------


def event(kind: str, **fields: Any) -> dict[str, Any]:
    return {"type": kind, "event_id": new_id("event"), **fields}


def error_event(e: ProtocolError, client_event_id: str | None = None) -> dict[str, Any]:
    return event(
        "error",
        error={"type": e.type, "code": e.code, "message": e.message, "param": e.param, "event_id": client_event_id},
    )


def user_item(item_id: str, content: list[dict[str, Any]], status: str = "completed") -> dict[str, Any]:
    return {
        "id": item_id,
        "object": "realtime.item",
        "type": "message",
        "role": "user",
        "status": status,
        "content": content,
    }


def assistant_item(item_id: str, part: str, status: str, transcript: str | None = None) -> dict[str, Any]:
    content = (
        []
        if status == "in_progress"
        else [
            {"type": "output_audio", "transcript": transcript or ""}
            if part == "audio"
            else {"type": "output_text", "text": transcript or ""}
        ]
    )
    return {
        "id": item_id,
        "object": "realtime.item",
        "type": "message",
        "role": "assistant",
        "status": status,
        "content": content,
    }


def response_obj(
    response_id: str,
    conversation_id: str,
    status: str,
    modalities: list[str],
    voice: str,
    out_format: dict[str, Any],
    output: list[dict[str, Any]],
    *,
    reason: str | None = None,
    error: dict[str, Any] | None = None,
    usage: dict[str, Any] | None = None,
    max_output_tokens: int | str = "inf",
) -> dict[str, Any]:
    r: dict[str, Any] = {
        "id": response_id,
        "object": "realtime.response",
        "conversation_id": conversation_id,
        "status": status,
        "output": output,
        "output_modalities": modalities,
        "max_output_tokens": max_output_tokens,
        "audio": {"output": {"format": out_format, "voice": voice}},
        "usage": usage,
        "status_details": None
        if status in ("in_progress", "completed")
        else {"type": status, "reason": reason, "error": error},
    }
    return r


def usage_obj(input_tokens: int, output_tokens: int, audio_in: bool, audio_out: bool) -> dict[str, Any]:
    return {
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "total_tokens": input_tokens + output_tokens,
        "input_token_details": {
            "audio_tokens": input_tokens if audio_in else 0,
            "text_tokens": 0 if audio_in else input_tokens,
            "cached_tokens": 0,
        },
        "output_token_details": {
            "audio_tokens": output_tokens if audio_out else 0,
            "text_tokens": 0 if audio_out else output_tokens,
        },
    }


def rate_limits_event(limits: dict[str, dict[str, float]]) -> dict[str, Any] | None:
    """`rate_limits.updated` from the service's per-key limits: its turns per minute are the Realtime `requests`
    limit (the protocol names only requests and tokens; the audio-seconds limit has no name there)."""
    turns = limits.get("turns")
    if not turns or "limit" not in turns:
        return None
    return event(
        "rate_limits.updated",
        rate_limits=[
            {
                "name": "requests",
                "limit": int(turns["limit"]),
                "remaining": int(turns.get("remaining", 0)),
                "reset_seconds": round(float(turns.get("reset", 0.0)), 3),
            }
        ],
    )
