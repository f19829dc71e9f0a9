import io

import numpy as np
import pytest
import soundfile as sf
import torch

from moss_speech.builders.codec.audio import PromptMel, WhisperMel, slaney_mel_filters
from moss_speech.builders.codec.config import PreprocessorConfig, PromptMelConfig
from moss_speech.contract.audio import AudioError, AudioLimits, load_audio


@pytest.mark.parametrize(
    ("audio", "rate", "kind"),
    [
        (np.zeros(0, np.float32), 16000, "empty"),
        (np.array([0.1, np.nan, 0.2], np.float32), 16000, "non_finite"),
        (np.array([0.1, np.inf], np.float32), 16000, "non_finite"),
        (np.zeros(16000 * 3, np.float32), 16000, "too_long"),
        (b"RIFF\x00\x00garbage-not-audio", None, "undecodable"),
        (np.zeros(100, np.uint8), 16000, "bad_format"),
        (np.zeros(100, np.float32), 0, "bad_format"),
        (np.zeros((2, 2, 100), np.float32), 16000, "bad_format"),
    ],
)
def test_bad_audio_raises_audio_error(audio, rate, kind):
    with pytest.raises(AudioError) as err:
        load_audio(audio, rate, 16000, AudioLimits(max_seconds=2.0))
    assert err.value.kind == kind
    assert isinstance(err.value, ValueError) and str(err.value)
    assert err.value.is_resource_limit == (kind == "too_long")


def test_codec_encode_maps_bad_audio(codec):
    with pytest.raises(AudioError, match="NaN"):
        codec.encode(np.full(1600, np.nan, np.float32), 16000)


def test_stereo_int16_any_rate_is_resampled_to_mono():
    rate = 44100
    t = np.arange(rate) / rate
    left = (0.5 * np.sin(2 * np.pi * 440 * t) * 32767).astype(np.int16)
    stereo = np.stack([left, left], axis=1)
    out = load_audio(stereo, rate, 16000)
    assert out.dtype == np.float32 and out.ndim == 1
    assert abs(len(out) - 16000) <= 1
    assert 0.45 < np.abs(out).max() < 0.55
    buf = io.BytesIO()
    sf.write(buf, stereo, rate, format="WAV")
    from_file = load_audio(buf.getvalue(), None, 16000)
    np.testing.assert_allclose(from_file, out, atol=1e-4)


def test_whisper_mel_matches_complex_stft_reference():
    cfg = PreprocessorConfig()
    pcm = torch.randn(1, 16000) * 0.1
    ours = WhisperMel(cfg)(pcm)
    spec = torch.stft(pcm, 400, 160, window=torch.hann_window(400), return_complex=True)
    power = spec[..., :-1].abs() ** 2
    fb = torch.from_numpy(slaney_mel_filters(16000, 400, 128, 0, 8000))
    log = torch.clamp(fb @ power, min=1e-10).log10()
    ref = (torch.maximum(log, log.max() - 8.0) + 4.0) / 4.0
    assert ours.shape == (1, 128, 100)
    torch.testing.assert_close(ours, ref, atol=2e-4, rtol=1e-4)


def test_slaney_filters_are_triangles_with_slaney_area():
    fb = slaney_mel_filters(16000, 400, 128, 0, 8000)
    assert fb.shape == (128, 201) and (fb >= 0).all()
    assert (fb.sum(axis=1) > 0).all()  # every filter covers at least one bin
    freqs = np.linspace(0, 8000, 201)
    peak = freqs[fb.argmax(axis=1)]
    assert np.all(np.diff(peak) >= 0)  # centers increase


def test_prompt_mel_frames_and_values():
    cfg = PromptMelConfig()
    pcm = torch.randn(1, 24000) * 0.1
    mel = PromptMel(cfg)(pcm)
    assert mel.shape == (1, 80, 24000 // 480)
    spec = torch.stft(
        torch.nn.functional.pad(pcm[None], (720, 720), mode="reflect")[0],
        1920,
        480,
        window=torch.hann_window(1920),
        center=False,
        return_complex=True,
    )
    mag = torch.sqrt(spec.real**2 + spec.imag**2 + 1e-9)
    fb = torch.from_numpy(slaney_mel_filters(24000, 1920, 80, 0, 8000))
    torch.testing.assert_close(mel, torch.log(torch.clamp(fb @ mag, min=1e-5)), atol=1e-3, rtol=1e-4)
