"""Created voices in process: the store round trip, the vocoder's registry filled from the store on a miss,
the same audio on two codec instances, deletion, and a cloned voice that differs from the default one."""

from __future__ import annotations

import numpy as np
import pytest

from moss_speech.builders.codec import SpeechCodec, UnknownVoiceError
from moss_speech.builders.codec.streaming import DecodeWindow
from moss_speech.builders.codec.voice_store import VoiceStore, new_voice_id
from moss_speech.contract.voices import VoiceLimits, is_created

from .voice_support import espeak

pytestmark = pytest.mark.slow  # builds four tiny codecs and decodes with each (minutes on the shared CPUs)

PROMPT = VoiceLimits().prompt_tokens  # created voices are capped like the served ones
CODES = [int(c) for c in np.random.default_rng(3).integers(0, 4096, 40)]


@pytest.fixture(scope="module")
def codec(tiny_bundle):
    return SpeechCodec(tiny_bundle / "codec")


@pytest.fixture(scope="module")
def recording(tmp_path_factory):
    return espeak(tmp_path_factory.mktemp("voice") / "m3.wav", voice="en+m3")


@pytest.fixture(scope="module")
def stored(codec, recording, tmp_path_factory):
    store = VoiceStore(tmp_path_factory.mktemp("store"))
    voice = codec.make_voice(new_voice_id(), recording, prompt_tokens=PROMPT)
    record = store.save(
        voice.voice_id, "m3", "espeak en+m3", "key-a", 5.0, voice.prompt_codes, voice.prompt_mel, voice.xvector
    )
    return store, voice, record


def test_store_round_trip(stored):
    store, voice, record = stored
    assert is_created(record.voice_id)
    got, arrays = store.conditioning(record.voice_id)
    assert got == record
    np.testing.assert_array_equal(arrays["prompt_codes"], voice.prompt_codes)
    np.testing.assert_array_equal(arrays["prompt_mel"], voice.prompt_mel)
    np.testing.assert_array_equal(arrays["xvector"], voice.xvector)
    assert [r.voice_id for r in store.records("key-a")] == [record.voice_id]
    assert store.records("key-b") == []


def test_store_refuses_ids_that_are_not_created_ids(stored):
    store, _, _ = stored
    for bad in ("default", "../x", "vc_../../etc", "vc_" + "g" * 24):
        assert not store.exists(bad)
        with pytest.raises(KeyError):
            store.record(bad)


def test_cloned_voice_differs_from_default(codec, stored):
    _, voice, _ = stored
    default = codec.voices.get("default")
    assert np.abs(voice.xvector - default.xvector).max() > 1e-2
    codec.voices.add(voice)
    a = codec.decode_streaming(CODES, "default")
    b = codec.decode_streaming(CODES, voice.voice_id)
    assert a.shape == b.shape
    assert np.abs(a - b).max() > 1e-3


@pytest.mark.slow
def test_two_instances_decode_a_stored_voice_identically(tiny_bundle, codec, stored):
    store, voice, record = stored
    windows = [DecodeWindow(tokens=CODES[:13], n_context=0, n_chunk=10, first_position=0, voice_id=record.voice_id)]
    outs = []
    for _ in range(2):  # two vocoder instances: fresh codecs, each filling its cache from the store
        other = SpeechCodec(tiny_bundle / "codec")
        other.voices.store = store
        outs.append(other.decode_windows(windows)[0])
    codec.voices.add(voice.__class__(record.voice_id, voice.prompt_codes, voice.prompt_mel, voice.xvector))
    in_process = codec.decode_windows(windows)[0]
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_array_equal(outs[0], in_process)


def test_deleted_voice_is_unknown_at_once(tiny_bundle, codec, recording, tmp_path):
    store = VoiceStore(tmp_path)
    voice = codec.make_voice(new_voice_id(), recording, prompt_tokens=PROMPT)
    store.save(voice.voice_id, "x", "", "", 5.0, voice.prompt_codes, voice.prompt_mel, voice.xvector)
    other = SpeechCodec(tiny_bundle / "codec")
    other.voices.store = store
    assert other.voices.get(voice.voice_id).prompt_codes.size
    store.delete(voice.voice_id)
    with pytest.raises(UnknownVoiceError) as err:
        other.voices.get(voice.voice_id)
    assert voice.voice_id not in err.value.known  # created ids are never listed to whoever asks
    assert list(tmp_path.iterdir()) == []
