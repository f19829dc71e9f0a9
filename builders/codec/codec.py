"""`SpeechCodec`: the codec as the serving stack uses it (encode audio, decode stateless windows, voices)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from moss_speech.builders.codec.audio import AudioInput, PromptMel, WhisperMel, load_audio
from moss_speech.builders.codec.config import (
    DEFAULT_VOICE_ID,
    VOICES_DIR,
    XVECTOR_DIM,
    AudioLimits,
    CodecSizes,
    EncoderConfig,
    FlowYaml,
    PreprocessorConfig,
    StreamingConfig,
)
from moss_speech.builders.codec.encoder import WhisperVQEncoder
from moss_speech.builders.codec.flow import FlowModel, noise_at
from moss_speech.builders.codec.hift import HiFTGenerator, source_noise
from moss_speech.builders.codec.streaming import DecodeWindow, chunk_bounds, ready_windows
from moss_speech.builders.codec.voices import Voice, VoiceRegistry
from moss_speech.builders.codec.xvector import XVectorExtractor


class SpeechCodec(CodecSizes):
    def __init__(
        self,
        codec_dir: Path,
        voices_dir: Path | None = None,
        streaming: StreamingConfig | None = None,
        limits: AudioLimits | None = None,
        flow_chunk: int = 0,
    ):
        codec_dir = Path(codec_dir)
        self.dir = codec_dir
        self.streaming = streaming or StreamingConfig()
        self.limits = limits or AudioLimits()
        self.encoder_cfg = EncoderConfig.from_dir(codec_dir)
        self.pre_cfg = PreprocessorConfig.from_dir(codec_dir)
        self.flow_yaml = FlowYaml.from_dir(codec_dir)
        self.encoder = WhisperVQEncoder.from_dir(codec_dir, self.encoder_cfg)
        self.mel = WhisperMel(self.pre_cfg)
        self.flow = FlowModel.from_dir(
            codec_dir, self.flow_yaml.flow, flow_chunk, chunked=self.streaming.chunk_mask
        )
        self.hift = HiFTGenerator.from_dir(codec_dir, self.flow_yaml.hift)
        self.prompt_mel = PromptMel(self.flow_yaml.feat_extractor)
        self.xvector = XVectorExtractor.from_dir(codec_dir)
        self.voices = VoiceRegistry(self._voice_from_file, voices_dir or codec_dir / VOICES_DIR)

    # ---- encoder
    # --------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode_pcm(self, pcm: np.ndarray) -> np.ndarray:
        """float32 mono 16 kHz -> int64 codes, ceil(samples / 1280) of them; 30 s segments encoded
        separately."""
        seg = self.pre_cfg.chunk_length * self.input_rate
        codes = []
        for start in range(0, len(pcm), seg):
            piece = torch.from_numpy(np.ascontiguousarray(pcm[start : start + seg], dtype=np.float32))
            piece = torch.nn.functional.pad(piece, (0, (-piece.shape[0]) % self.samples_per_code_in))
            codes.append(self.encoder(self.mel(piece[None]))[0])
        return torch.cat(codes).numpy().astype(np.int64)

    def encode(self, audio: AudioInput, sample_rate: int | None = None) -> np.ndarray:
        return self.encode_pcm(load_audio(audio, sample_rate, self.input_rate, self.limits))

    # ---- voices
    # ---------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def make_voice(self, voice_id: str, audio: AudioInput, sample_rate: int | None = None) -> Voice:
        pcm16 = load_audio(audio, sample_rate, self.input_rate, self.limits)
        pcm24 = load_audio(audio, sample_rate, self.sample_rate, self.limits)
        codes = self.encode_pcm(pcm16)
        mel = self.prompt_mel(torch.from_numpy(pcm24)[None])[0].numpy()
        ratio = self.flow_yaml.flow.token_mel_ratio
        n = min(mel.shape[1] // ratio, len(codes))
        xvec = self.xvector(pcm16) if self.xvector is not None else np.zeros(XVECTOR_DIM, np.float32)
        return Voice(voice_id, codes[:n], np.ascontiguousarray(mel[:, : ratio * n]), xvec)

    def _voice_from_file(self, voice_id: str, path: Path) -> Voice:
        return self.make_voice(voice_id, path)

    # ---- decoder
    # --------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def render(self, tokens: list[int], first_position: int, voice_id: str) -> np.ndarray:
        """Flow + HiFT over prompt + `tokens` (absolute positions from `first_position`) -> PCM of all
        tokens."""
        voice = self.voices.get(voice_id)
        ratio = self.flow_yaml.flow.token_mel_ratio
        la = self.flow_yaml.flow.pre_lookahead_len
        p = len(voice.prompt_codes)
        seq = torch.tensor(np.concatenate([voice.prompt_codes, np.asarray(tokens, np.int64)]))[None]
        # lookahead tokens are part of the window itself, so the pre-lookahead context past its end is empty
        mu = self.flow.encode(seq, torch.zeros(1, la, dtype=torch.long), torch.zeros(1, la))
        spks = self.flow.speaker(torch.from_numpy(voice.xvector)[None])
        cond = torch.zeros_like(mu)
        cond[:, :, : ratio * p] = torch.from_numpy(voice.prompt_mel)
        frames = torch.cat(
            [torch.arange(ratio * p), ratio * p + ratio * first_position + torch.arange(ratio * len(tokens))]
        )
        mel = self.flow.solve(mu, spks, cond, noise_at(frames, mu.shape[1]))[:, :, ratio * p :]
        noise = source_noise(
            first_position, len(tokens), self.flow_yaml.hift.nb_harmonics + 1, self.samples_per_token
        )
        return self.hift(mel, noise)[0].numpy()

    def decode_chunk(self, window: DecodeWindow) -> np.ndarray:
        """Exactly the PCM of the window's new chunk: float32 [n_chunk * 1920] at 24 kHz."""
        pcm = self.render(window.tokens, window.first_position, window.voice_id)
        s = self.samples_per_token
        return pcm[window.n_context * s : (window.n_context + window.n_chunk) * s]

    def decode(self, codes: list[int] | np.ndarray, voice_id: str = DEFAULT_VOICE_ID) -> np.ndarray:
        """Offline decode of a whole utterance in one pass, with full attention in the flow as the reference's
        offline path (streamed windows use chunk-causal attention, its streaming mode)."""
        codes = [int(c) for c in codes]
        DecodeWindow(
            tokens=codes or [0], n_context=0, n_chunk=max(1, len(codes)), first_position=0
        )  # validate
        if not codes:
            return np.zeros(0, np.float32)
        with self.flow.attention(chunked=False):
            return self.render(codes, 0, voice_id)

    def decode_streaming(self, codes: list[int] | np.ndarray, voice_id: str = DEFAULT_VOICE_ID) -> np.ndarray:
        """Decode an utterance window by window, as the streamer would, and concatenate."""
        codes = [int(c) for c in codes]
        windows = ready_windows(codes, 0, True, self.streaming, voice_id)
        assert [(w.chunk_position, w.chunk_position + w.n_chunk) for w in windows] == chunk_bounds(
            len(codes), self.streaming
        )
        parts = [self.decode_chunk(w) for w in windows]
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)
