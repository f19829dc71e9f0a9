"""CodecRuntime (onnxruntime and torch backends) against the codec's own encode_pcm / decode_chunk.

Bounds:
  * encoder: codes identical (speech-like synthetic signal, espeak-ng speech when installed, > 30 s input).
  * decode_windows vs SpeechCodec.decode_chunk: max abs diff <= 1e-4 and SNR >= 60 dB per window
    [measured ~1e-7, ~120 dB]. fp32 reassociation through the 10 Euler steps is the only expected error;
    a wrong noise position, sample offset or leaking padding gives errors of the order of the signal (< 20 dB).
  * batched vs one-by-one decode_windows: max abs diff <= 1e-5 [measured <= 1e-7: GEMM blocking only].
"""

import numpy as np
import pytest

from moss_speech.builders.codec import DecodeWindow, UnknownVoiceError, ready_windows
from moss_speech.contract.streaming import StreamingConfig
from moss_speech.model_repository.runtime.codec_runtime import CodecRuntime

pytest_plugins = ["tests.export.codec_fixtures"]
pytestmark = [pytest.mark.usefixtures("codec_single_thread"), pytest.mark.slow]  # one codec ONNX export for the module

DECODE_ATOL = 1e-4
MIN_SNR_DB = 60.0
BATCH_ATOL = 1e-5
CODES = [int(c) for c in np.random.default_rng(7).integers(0, 16384, 37)]


def snr_db(ref: np.ndarray, test: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / max(np.sum((ref - test) ** 2), 1e-30)))


def assert_close_pcm(ref: np.ndarray, got: np.ndarray) -> None:
    assert got.dtype == np.float32 and got.shape == ref.shape
    assert np.abs(ref).max() > 1e-3  # not trivially silent
    assert np.abs(ref - got).max() <= DECODE_ATOL and snr_db(ref, got) >= MIN_SNR_DB


@pytest.fixture(scope="module")
def pcms(codec_speechlike):
    # 3.1 s, 0.5 s, a few samples, 31 s (two 30 s segments) of speech-like audio
    return [codec_speechlike(3.1, 1), codec_speechlike(0.5, 2), codec_speechlike(0.004, 3), codec_speechlike(31, 4)]


@pytest.fixture(scope="module")
def ref_codes(codec_ref, pcms):
    return [codec_ref.encode_pcm(p) for p in pcms]


@pytest.fixture(scope="module")
def windows(codec_ref):
    # first window (no context), a short-context one, two steady ones (same length: one HiFT batch), the final one
    ws = ready_windows(CODES, 0, True, codec_ref.streaming)
    ws = [ws[0], ws[2], ws[4], ws[5], ws[-1]]
    assert len({len(w.tokens) for w in ws}) == 4 and ws[-1].finalize and ws[0].n_context == 0
    return ws


@pytest.fixture(scope="module")
def ref_chunks(codec_ref, windows):
    return [codec_ref.decode_chunk(w) for w in windows]


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_encode_pcm_batched_codes_identical(request, pcms, ref_codes, backend):
    rt = request.getfixturevalue(f"codec_{'ort' if backend == 'onnxruntime' else 'torch'}_runtime")
    got = rt.encode_pcm(pcms)
    for pcm, codes, want in zip(pcms, got, ref_codes, strict=True):
        assert codes.dtype == np.int64 and len(codes) == -(-len(pcm) // 1280)
        np.testing.assert_array_equal(codes, want)
    assert len(np.unique(got[3])) > 20  # real variety, so equality is not trivial
    for pcm, codes in zip(pcms[:3], got, strict=False):  # the 31 s item is compared above already
        np.testing.assert_array_equal(rt.encode_pcm([pcm])[0], codes)


def test_encode_espeak_speech_identical(codec_ort_runtime, codec_ref, codec_espeak):
    speech = codec_espeak("The quick brown fox jumps over the lazy dog. Serving speech on Triton.")
    if speech is None:
        pytest.skip("espeak-ng / sox not installed")
    got = codec_ort_runtime.encode_pcm([speech, speech[: len(speech) // 3]])
    np.testing.assert_array_equal(got[0], codec_ref.encode_pcm(speech))
    np.testing.assert_array_equal(got[1], codec_ref.encode_pcm(speech[: len(speech) // 3]))
    assert len(np.unique(got[0])) > 10


def test_encode_pcm_empty(codec_ort_runtime):
    assert codec_ort_runtime.encode_pcm([]) == []
    out = codec_ort_runtime.encode_pcm([np.zeros(0, np.float32), np.zeros(1280, np.float32)])
    assert out[0].shape == (0,) and out[1].shape == (1,)


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_decode_windows_matches_decode_chunk(request, windows, ref_chunks, backend):
    rt = request.getfixturevalue(f"codec_{'ort' if backend == 'onnxruntime' else 'torch'}_runtime")
    got = rt.decode_windows(windows)  # all windows of the utterance in one call (mixed lengths)
    for ref, pcm in zip(ref_chunks, got, strict=True):
        assert_close_pcm(ref, pcm)


def test_decode_windows_batched_equals_one_by_one(codec_ort_runtime, windows):
    batched = codec_ort_runtime.decode_windows(windows)
    for w, b in zip(windows, batched, strict=True):
        single = codec_ort_runtime.decode_windows([w])[0]
        assert np.abs(single - b).max() <= BATCH_ATOL


def test_decode_windows_two_voices_in_one_batch(codec_ort_runtime, codec_ref, codec_speechlike, windows):
    # a second voice with a longer prompt: different prompt lengths pad the flow batch differently
    voice = codec_ref.make_voice("other", codec_speechlike(2.3, 9), 16000)
    assert len(voice.prompt_codes) != len(codec_ref.voices.get("default").prompt_codes)
    codec_ref.voices.add(voice)
    codec_ort_runtime.voices.add(voice)
    mixed = [w.model_copy(update={"voice_id": "other"}) if i % 2 else w for i, w in enumerate(windows)]
    got = codec_ort_runtime.decode_windows(mixed)
    for w, pcm in zip(mixed, got, strict=True):
        assert_close_pcm(codec_ref.decode_chunk(w), pcm)
    assert snr_db(got[1], codec_ort_runtime.decode_windows([windows[1]])[0]) < 20  # the voice matters


def test_bound_catches_a_wrong_noise_position(codec_ort_runtime, windows, ref_chunks):
    w = windows[2]
    moved = w.model_copy(update={"first_position": w.first_position + 1})
    got = codec_ort_runtime.decode_windows([moved])[0]
    assert snr_db(ref_chunks[2], got) < MIN_SNR_DB and np.abs(ref_chunks[2] - got).max() > DECODE_ATOL


def test_runtime_errors(codec_tiny_dir, codec_onnx_dir, codec_ort_runtime):
    with pytest.raises(ValueError, match="unknown codec backend"):
        CodecRuntime.from_artifacts(codec_tiny_dir, codec_onnx_dir, backend="tflite")
    with pytest.raises(ValueError, match="chunk_mask"):
        CodecRuntime.from_artifacts(codec_tiny_dir, codec_onnx_dir, streaming=StreamingConfig(chunk_mask=False))
    with pytest.raises(FileNotFoundError, match="codec_onnx.json"):
        CodecRuntime.from_artifacts(codec_tiny_dir, codec_tiny_dir)
    assert codec_ort_runtime.decode_windows([]) == []
    with pytest.raises(UnknownVoiceError):
        codec_ort_runtime.decode_windows(
            [DecodeWindow(tokens=[1, 2, 3], n_context=0, n_chunk=3, first_position=0, voice_id="nobody")]
        )
