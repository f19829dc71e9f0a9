import random

import numpy as np
import pytest
from pydantic import ValidationError

from moss_speech.builders.codec import DecodeWindow, SpeechCodec, UnknownVoiceError, ready_windows
from moss_speech.builders.codec.streaming import chunk_bounds
from moss_speech.contract.streaming import StreamingConfig

# Bound for streamed-vs-offline decoding with the default window (20 context, 5 chunk, 3 lookahead tokens).
# Not bit-exact: offline decoding uses full attention in the flow (the reference's offline path), windows use
# chunk-causal attention (its streaming mode) and see 20 tokens of history and 3 of future, their chunk masks
# start at the window, and HiFT integrates the harmonic phase from the window start. Measured on the tiny codec:
# 22.8 dB (28.3 dB when offline also used chunk masks). 20 dB keeps the error near 10 % of the signal amplitude,
# while any misalignment (wrong noise position, sample offset, wrong chunk cut) drives the SNR towards 0 dB.
MIN_STREAM_SNR_DB = 20.0
CODES = [int(c) for c in np.random.default_rng(7).integers(0, 16384, 37)]


def snr_db(ref: np.ndarray, test: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(ref**2) / max(np.sum((ref - test) ** 2), 1e-30)))


@pytest.fixture(scope="module")
def offline(codec):
    return codec.decode(CODES)


@pytest.fixture(scope="module")
def streamed(codec):
    return codec.decode_streaming(CODES)


@pytest.mark.slow
def test_offline_length_and_sanity(codec, offline):
    assert offline.dtype == np.float32 and offline.shape == (len(CODES) * 1920,)
    assert np.isfinite(offline).all() and offline.std() > 1e-4 and np.abs(offline).max() <= 0.99
    other = codec.decode(CODES[:10] + [(c + 977) % 16384 for c in CODES[10:]])
    assert snr_db(offline[: 8 * 1920], other[: 8 * 1920]) > 20  # causal-ish: early audio barely moves
    assert snr_db(offline[15 * 1920 :], other[15 * 1920 :]) < 10  # tokens matter


@pytest.mark.slow
def test_streamed_matches_offline_within_bound(codec, offline, streamed):
    assert streamed.shape == offline.shape
    assert snr_db(offline, streamed) >= MIN_STREAM_SNR_DB


@pytest.mark.slow
def test_bound_is_sensitive_to_misalignment(codec, offline, streamed):
    shifted = np.concatenate([streamed[240:], np.zeros(240, np.float32)])  # 10 ms off
    assert snr_db(offline, shifted) < MIN_STREAM_SNR_DB
    w = ready_windows(CODES, 0, True, codec.streaming)[3]
    wrong_pos = w.model_copy(update={"first_position": w.first_position + 1})
    s = slice(w.chunk_position * 1920, (w.chunk_position + w.n_chunk) * 1920)
    assert snr_db(offline[s], codec.decode_chunk(wrong_pos)) < MIN_STREAM_SNR_DB


def test_no_clicks_at_chunk_boundaries(codec, streamed):
    jumps = np.abs(np.diff(streamed))
    bounds = [end * 1920 for _, end in chunk_bounds(len(CODES), codec.streaming)][:-1]
    inside = np.delete(jumps, [b - 1 for b in bounds])
    limit = np.percentile(inside, 99.9)
    assert all(jumps[b - 1] <= limit for b in bounds), ([jumps[b - 1] for b in bounds], limit)


@pytest.mark.slow
def test_decode_chunk_returns_exactly_the_chunk_and_is_stateless(tiny_codec_dir, codec, streamed):
    windows = ready_windows(CODES, 0, True, codec.streaming)
    assert windows[-1].finalize and not any(w.finalize for w in windows[:-1])
    fresh = SpeechCodec(tiny_codec_dir)  # another "instance" decoding in a different order
    order = list(range(len(windows)))
    random.Random(0).shuffle(order)
    parts = {i: fresh.decode_chunk(windows[i]) for i in order}
    for i, w in enumerate(windows):
        assert parts[i].shape == (w.n_chunk * 1920,)
    np.testing.assert_array_equal(np.concatenate([parts[i] for i in range(len(windows))]), streamed)


def test_ready_windows_incremental_equals_batch(codec):
    cfg = codec.streaming
    emitted, got = 0, []
    for n in range(1, len(CODES) + 1):
        ws = ready_windows(CODES[:n], emitted, n == len(CODES), cfg)
        got += ws
        emitted = ws[-1].chunk_position + ws[-1].n_chunk if ws else emitted
    assert got == ready_windows(CODES, 0, True, cfg)
    assert all(
        w.n_lookahead == cfg.lookahead_tokens
        for w in got
        if not w.finalize and w.chunk_position + w.n_chunk + cfg.lookahead_tokens <= len(CODES)
    )


def test_first_chunk_size_is_configurable():
    cfg = StreamingConfig(first_chunk_tokens=2, chunk_tokens=5)
    assert chunk_bounds(13, cfg) == [(0, 2), (2, 7), (7, 12), (12, 13)]
    ws = ready_windows(list(range(5)), 0, False, cfg)
    assert [(w.n_chunk, w.n_lookahead) for w in ws] == [(2, 3)]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"tokens": [1, 2, 3], "n_context": 2, "n_chunk": 2, "first_position": 0},
        {"tokens": [1, 2, 3], "n_context": 0, "n_chunk": 2, "first_position": 0, "finalize": True},
        {"tokens": [1, 16384], "n_context": 0, "n_chunk": 2, "first_position": 0},
        {"tokens": [1, 2], "n_context": 0, "n_chunk": 2, "first_position": -1},
        {"tokens": [1, 2], "n_context": 0, "n_chunk": 0, "first_position": 0},
    ],
)
def test_bad_windows_rejected(kwargs):
    with pytest.raises(ValidationError):
        DecodeWindow(**kwargs)


def test_window_round_trips_as_json():
    w = DecodeWindow(tokens=[5, 6, 7, 8], n_context=1, n_chunk=2, first_position=40, voice_id="v", finalize=False)
    assert DecodeWindow.model_validate_json(w.model_dump_json()) == w
    assert w.n_lookahead == 1 and w.chunk_position == 41


def test_voice_registry(codec):
    v = codec.voices.get("default")
    assert codec.voices.get("default") is v  # cached
    assert v.prompt_mel.shape == (80, 4 * len(v.prompt_codes)) and v.xvector.shape == (192,)
    assert np.abs(v.xvector).sum() > 0  # came from the campplus ONNX
    with pytest.raises(UnknownVoiceError, match="default"):
        codec.voices.get("nobody")


@pytest.mark.slow
def test_voice_changes_the_output(codec, offline):
    t = np.arange(24000 * 2) / 24000
    other = codec.make_voice("hum", (0.2 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 24000)
    codec.voices.add(other)
    assert snr_db(offline, codec.decode(CODES, "hum")) < 20
