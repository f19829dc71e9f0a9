"""MOSS-Speech codec: Whisper-VQ speech encoder and streaming flow-matching + HiFT decoder."""

from .audio import AudioError
from .codec import SpeechCodec
from .streaming import DecodeWindow, ready_windows
from .voices import UnknownVoiceError, Voice, VoiceRegistry

__all__ = [
    "AudioError",
    "DecodeWindow",
    "SpeechCodec",
    "UnknownVoiceError",
    "Voice",
    "VoiceRegistry",
    "ready_windows",
]
