"""Recording checks of CreateVoice (contract.voices, services.voices.decode_recording): each failure names the
problem; a good espeak-ng recording passes. Torch-free, no server."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from moss_speech.contract.voices import VoiceLimits, VoiceRecordingError, check_name, check_recording, is_created
from moss_speech.services.api import speech_pb2 as pb
from moss_speech.services.voices import decode_recording

from .voice_support import espeak, read

LIMITS = VoiceLimits()


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    path = espeak(tmp_path_factory.mktemp("val") / "f3.wav")
    pcm, rate = read(path)
    return path, pcm, rate


def test_good_recording_passes(speech):
    _, pcm, rate = speech
    assert 4 < check_recording(pcm, rate) < 10


@pytest.mark.parametrize(
    "case,words",
    [
        ("short", "too short"),
        ("long", "too long"),
        ("zeros", "silent"),
        ("whisper", "silent"),
        ("clipped", "clipped"),
        ("nan", "NaN"),
        ("bad_rate", "sample rate"),
    ],
)
def test_bad_recordings_name_the_problem(speech, case, words):
    _, pcm, rate = speech
    pcm, rate = {
        "short": (pcm[: int(2.9 * rate)], rate),
        "long": (np.tile(pcm, 8)[: int(30.5 * rate)], rate),
        "zeros": (np.zeros(5 * rate, np.float32), rate),
        "whisper": (pcm * 0.002, rate),
        "clipped": (np.clip(pcm * 30, -1, 1), rate),
        "nan": (np.where(np.arange(pcm.size) == 7, np.nan, pcm), rate),
        "bad_rate": (pcm, 0),
    }[case]
    with pytest.raises(VoiceRecordingError, match=words):
        check_recording(pcm, rate)


def test_limits_are_inclusive_at_3_and_30_seconds(speech):
    _, pcm, rate = speech
    assert check_recording(pcm[: 3 * rate], rate) == pytest.approx(3.0)
    assert check_recording(np.tile(pcm, 8)[: 30 * rate], rate) == pytest.approx(30.0)


@pytest.mark.parametrize(
    "name,description,words",
    [
        ("", "", "empty"),
        ("x" * 65, "", "characters"),
        ("a\nb", "", "control"),
        ("ok", "d" * 501, "description"),
    ],
)
def test_names(name, description, words):
    with pytest.raises(VoiceRecordingError, match=words):
        check_name(name, description)


def test_decode_keeps_the_recording_rate_and_samples(speech, tmp_path):
    path, pcm, rate = speech
    got, got_rate = decode_recording(pb.AudioInput(data=path.read_bytes()), LIMITS)
    assert got_rate == rate
    np.testing.assert_array_equal(got, pcm)
    raw = (pcm * 32767).astype("<i2").tobytes()
    got, got_rate = decode_recording(
        pb.AudioInput(data=raw, format=pb.AudioFormat(encoding=pb.AUDIO_ENCODING_PCM16, sample_rate=rate)), LIMITS
    )
    assert got_rate == rate and got.size == pcm.size
    flac = tmp_path / "x.flac"
    sf.write(str(flac), pcm, rate)
    assert decode_recording(pb.AudioInput(data=flac.read_bytes()), LIMITS)[0].size == pcm.size


@pytest.mark.parametrize(
    "audio,words",
    [
        (pb.AudioInput(data=b""), "empty"),
        (pb.AudioInput(data=b"not audio" * 50), "cannot decode"),
        (pb.AudioInput(data=b"\0\0" * 100, format=pb.AudioFormat(encoding=pb.AUDIO_ENCODING_PCM16)), "sample_rate"),
        (
            pb.AudioInput(data=b"\0" * 3, format=pb.AudioFormat(encoding=pb.AUDIO_ENCODING_PCM16, sample_rate=16000)),
            "whole number",
        ),
        (pb.AudioInput(data=b"\0\0", format=pb.AudioFormat(encoding=99)), "encoding"),
    ],
)
def test_unsupported_input_is_named(audio, words):
    with pytest.raises(VoiceRecordingError, match=words):
        decode_recording(audio, LIMITS)


def test_long_files_get_the_too_long_message(speech, tmp_path):
    _, pcm, rate = speech
    path = tmp_path / "long.wav"
    sf.write(str(path), np.tile(pcm, 20), rate)  # > 2 x 30 s: refused while decoding, same message
    with pytest.raises(VoiceRecordingError, match="too long"):
        decode_recording(pb.AudioInput(data=path.read_bytes()), LIMITS)


def test_created_ids():
    assert is_created("vc_" + "0" * 24) and not is_created("default") and not is_created("vc_../x")
