"""The created voice's prompt cap: the loudest contiguous stretch of `VoiceLimits.prompt_tokens` tokens is kept,
codes and mel cut at the same token boundaries, the x-vector still from the whole recording."""

from __future__ import annotations

import numpy as np
import pytest

from moss_speech.builders.codec import SpeechCodec
from moss_speech.builders.codec.voices import loudest_segment
from moss_speech.contract.audio import load_audio
from moss_speech.contract.voices import VoiceLimits

from .voice_support import espeak

SPT = 1280  # 16 kHz samples per token


def test_loudest_segment_picks_the_stretch_without_silence():
    rng = np.random.default_rng(0)
    pcm = np.zeros(30 * SPT, np.float32)
    pcm[12 * SPT : 20 * SPT] = 0.3 * rng.standard_normal(8 * SPT)  # speech at tokens 12..19
    assert loudest_segment(pcm, SPT, 30, 8) == 12
    assert loudest_segment(pcm, SPT, 30, 30) == 0 and loudest_segment(pcm, SPT, 30, 50) == 0
    # a pause inside a slightly louder stretch loses to a steady one (levels in dB, not energy)
    pcm[:] = 0
    pcm[0 : 10 * SPT] = 0.3 * rng.standard_normal(10 * SPT)
    pcm[4 * SPT : 5 * SPT] = 0
    pcm[15 * SPT : 25 * SPT] = 0.25 * rng.standard_normal(10 * SPT)
    assert loudest_segment(pcm, SPT, 30, 10) == 15


def test_default_cap_is_the_builtin_prompt_length(tiny_bundle):
    codec = SpeechCodec(tiny_bundle / "codec")
    assert len(codec.voices.get("default").prompt_codes) == VoiceLimits().prompt_tokens


@pytest.mark.slow  # encodes an 8 s recording twice on the tiny codec
def test_capped_voice_is_a_slice_of_the_whole_one(tiny_bundle, tmp_path):
    codec = SpeechCodec(tiny_bundle / "codec")
    rec = espeak(tmp_path / "m3.wav", voice="en+m3")
    whole = codec.make_voice("whole", rec)
    keep = VoiceLimits().prompt_tokens
    capped = codec.make_voice("capped", rec, prompt_tokens=keep)
    assert len(whole.prompt_codes) > 4 * keep  # an 8 s recording, 100 tokens
    assert len(capped.prompt_codes) == keep and capped.prompt_mel.shape == (80, 4 * keep)
    start = loudest_segment(load_audio(rec, None, 16000, codec.limits), SPT, len(whole.prompt_codes), keep)
    assert start > 0  # espeak starts with a little silence, so the kept stretch does not start at token 0
    np.testing.assert_array_equal(capped.prompt_codes, whole.prompt_codes[start : start + keep])
    np.testing.assert_array_equal(capped.prompt_mel, whole.prompt_mel[:, 4 * start : 4 * (start + keep)])
    np.testing.assert_array_equal(capped.xvector, whole.xvector)  # the whole recording
