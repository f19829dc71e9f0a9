"""MOSS-Speech codec: Whisper-VQ speech encoder and streaming flow-matching + HiFT decoder."""

from moss_speech.builders.codec.audio import AudioError
from moss_speech.builders.codec.codec import SpeechCodec
from moss_speech.builders.codec.streaming import DecodeWindow, ready_windows
from moss_speech.builders.codec.voices import UnknownVoiceError, Voice, VoiceRegistry

__all__ = [
    "AudioError",
    "DecodeWindow",
    "SpeechCodec",
    "UnknownVoiceError",
    "Voice",
    "VoiceRegistry",
    "ready_windows",
]
