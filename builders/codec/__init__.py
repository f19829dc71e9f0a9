"""MOSS-Speech codec: Whisper-VQ speech encoder and streaming flow-matching + HiFT decoder."""

from moss_speech.builders.codec.codec import SpeechCodec
from moss_speech.builders.codec.streaming import DecodeWindow, ready_windows
from moss_speech.builders.codec.voices import UnknownVoiceError, Voice, VoiceRegistry
from moss_speech.contract.audio import AudioError

__all__ = [
    "AudioError",
    "DecodeWindow",
    "SpeechCodec",
    "UnknownVoiceError",
    "Voice",
    "VoiceRegistry",
    "ready_windows",
]
