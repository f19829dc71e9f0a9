"""The codec pipeline, written once for every backend: audio -> codes, voices, stateless windows -> PCM.

`CodecPipeline` drives five graphs (`graphs.GRAPH_IO`); its subclasses only say how a graph runs: the in-process
codec (`SpeechCodec`) passes its eager modules, the codec runtimes pass onnxruntime sessions or TensorRT engines.
A graph is any callable taking torch tensors in GRAPH_IO order and returning one tensor. Everything else lives
here: segmenting and batching audio for the encoder, voice conditioning, window assembly (prompt + window tokens,
right-padded), solver noise seeded by absolute position, the CFG Euler solve, HiFT noise and trimming.

encode_batch(16 kHz PCMs) -> codes: each input is cut into 30 s segments padded to 1280 samples; mels are
computed per segment (equal lengths batch: the Whisper log-mel floor is utterance-global and its reflect pad
sits at the end, so right-padding PCM would change shorter items), then every segment goes through the encoder
in one right-padded batch (causal encoder, so padding never changes an item's codes).

decode_windows(windows) -> PCM of each new chunk: the flow encoder and the solver run over all windows at once
(right-padded, with lengths and masks), HiFT once per group of windows with the same token count (its
convolutions are not causal, so padding would reach the chunk of a final window).
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from moss_speech.builders.codec.audio import AudioInput, PromptMel
from moss_speech.builders.codec.config import (
    VOICES_DIR,
    XVECTOR_DIM,
    CodecSizes,
    EncoderConfig,
    FlowYaml,
    PreprocessorConfig,
)
from moss_speech.builders.codec.flow import cfm_solve, noise_at, project_speaker
from moss_speech.builders.codec.graphs import GRAPH_IO
from moss_speech.builders.codec.hift import source_noise
from moss_speech.builders.codec.streaming import DecodeWindow
from moss_speech.builders.codec.voices import Voice, VoiceRegistry, loudest_segment
from moss_speech.builders.codec.xvector import XVectorExtractor
from moss_speech.contract.audio import AudioLimits, load_audio
from moss_speech.contract.streaming import StreamingConfig

Graph = Callable[..., torch.Tensor]  # inputs in GRAPH_IO order -> the single output


@dataclass(frozen=True)
class VoiceCond:
    """What a voice adds to every window, as tensors: prompt codes [P], prompt mel [80, rP], speaker [80]."""

    voice: Voice
    codes: torch.Tensor
    mel: torch.Tensor
    spks: torch.Tensor


class CodecPipeline(CodecSizes):
    """Subclasses call `__init__`, then `use_graphs` with their five graphs and the speaker affine layer."""

    backend = "base"

    def __init__(
        self,
        codec_dir: Path | str,
        streaming: StreamingConfig | None = None,
        voices_dir: Path | str | None = None,
        limits: AudioLimits | None = None,
    ):
        self.dir = Path(codec_dir)
        self.streaming = streaming or StreamingConfig()
        self.limits = limits or AudioLimits()
        self.pre_cfg = PreprocessorConfig.from_dir(self.dir)
        self.encoder_cfg = EncoderConfig.from_dir(self.dir)
        self.flow_yaml = FlowYaml.from_dir(self.dir)
        self.prompt_mel = PromptMel(self.flow_yaml.feat_extractor)
        self.xvector = XVectorExtractor.from_dir(self.dir)
        self.voices = VoiceRegistry(self._voice_from_file, Path(voices_dir or self.dir / VOICES_DIR))
        self.graphs: dict[str, Graph] = {}
        self._conds: dict[str, VoiceCond] = {}
        self._lock = threading.Lock()

    def use_graphs(self, graphs: Mapping[str, Graph], speaker: tuple[torch.Tensor, torch.Tensor]) -> None:
        """The five graphs by GRAPH_IO name, and the speaker affine layer (weight [80, 192], bias [80])."""
        missing = set(GRAPH_IO) - set(graphs)
        if missing:
            raise ValueError(f"{self.backend} codec lacks graphs {sorted(missing)}")
        self.graphs = dict(graphs)
        self.speaker = speaker

    # ---- encoder
    @torch.inference_mode()
    def encode_batch(self, pcms: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Batch of float32 mono 16 kHz PCM -> int64 codes per item, ceil(samples / 1280) each."""
        seg_len = self.pre_cfg.chunk_length * self.input_rate
        spc = self.samples_per_code_in
        segments: list[tuple[int, torch.Tensor]] = []  # (item, PCM padded to a multiple of 1280)
        for i, pcm in enumerate(pcms):
            pcm = torch.from_numpy(np.ascontiguousarray(pcm, dtype=np.float32).reshape(-1))
            for start in range(0, len(pcm), seg_len):
                piece = pcm[start : start + seg_len]
                segments.append((i, F.pad(piece, (0, (-len(piece)) % spc))))
        if not segments:
            return [np.zeros(0, np.int64) for _ in pcms]
        by_len: dict[int, list[int]] = defaultdict(list)
        for k, (_, piece) in enumerate(segments):
            by_len[len(piece)].append(k)
        mels: list[torch.Tensor] = [torch.empty(0)] * len(segments)
        for idx in by_len.values():
            batch = self.graphs["whisper_mel"](torch.stack([segments[k][1] for k in idx]))
            for k, mel in zip(idx, batch, strict=True):
                mels[k] = mel
        padded = pad_sequence([m.T for m in mels], batch_first=True).transpose(1, 2)  # [B, 128, frames]
        codes = self.graphs["speech_encoder"](padded.contiguous())
        fpc = self.encoder_cfg.frames_per_code
        out: list[list[torch.Tensor]] = [[] for _ in pcms]
        for k, (i, _) in enumerate(segments):
            out[i].append(codes[k, : mels[k].shape[-1] // fpc])
        return [torch.cat(c).numpy().astype(np.int64) if c else np.zeros(0, np.int64) for c in out]

    def encode(self, audio: AudioInput, sample_rate: int | None = None) -> np.ndarray:
        return self.encode_batch([load_audio(audio, sample_rate, self.input_rate, self.limits)])[0]

    # ---- voices
    def make_voice(
        self, voice_id: str, audio: AudioInput, sample_rate: int | None = None, prompt_tokens: int | None = None
    ) -> Voice:
        """A prompt recording -> prompt codes, the 24 kHz prompt mel cut to whole tokens, and its x-vector.

        `prompt_tokens` caps the prompt (created voices: `VoiceLimits.prompt_tokens`; built-in voices keep the
        whole recording): the loudest contiguous stretch of that many tokens is kept, codes and mel cut at the
        same token boundaries (the codes come from the whole recording, so they are the codes those tokens get
        in context). The x-vector always uses the whole recording."""
        pcm16 = load_audio(audio, sample_rate, self.input_rate, self.limits)
        pcm24 = load_audio(audio, sample_rate, self.sample_rate, self.limits)
        codes = self.encode_batch([pcm16])[0]
        with torch.inference_mode():
            mel = self.prompt_mel(torch.from_numpy(pcm24)[None])[0].numpy()
        ratio = self.flow_yaml.flow.token_mel_ratio
        n = min(mel.shape[1] // ratio, len(codes))
        keep = n if prompt_tokens is None else min(n, prompt_tokens)
        start = loudest_segment(pcm16, self.samples_per_code_in, n, keep)
        xvec = self.xvector(pcm16) if self.xvector is not None else np.zeros(XVECTOR_DIM, np.float32)
        return Voice(
            voice_id,
            codes[start : start + keep].copy(),
            np.ascontiguousarray(mel[:, ratio * start : ratio * (start + keep)]),
            xvec,
        )

    def _voice_from_file(self, voice_id: str, path: Path) -> Voice:
        return self.make_voice(voice_id, path)

    @torch.inference_mode()
    def voice_cond(self, voice_id: str) -> VoiceCond:
        """The voice's conditioning, computed once per voice (and again if `voices.add` replaced it)."""
        voice = self.voices.get(voice_id)
        cond = self._conds.get(voice_id)
        if cond is None or cond.voice is not voice:
            # copies (torch.tensor): a voice's arrays may be read-only, and the cache must not alias them
            spks = project_speaker(torch.tensor(voice.xvector, dtype=torch.float32)[None], *self.speaker)[0]
            codes = torch.tensor(voice.prompt_codes, dtype=torch.long)
            cond = VoiceCond(voice, codes, torch.tensor(voice.prompt_mel, dtype=torch.float32), spks)
            with self._lock:
                self._conds[voice_id] = cond
        return cond

    # ---- decoder
    @torch.inference_mode()
    def decode_windows(self, windows: Sequence[DecodeWindow]) -> list[np.ndarray]:
        """PCM of each window's new chunk: float32 [n_chunk * 1920] at 24 kHz. Stateless: any window, any order."""
        if not windows:
            return []
        ratio = self.flow_yaml.flow.token_mel_ratio
        conds = [self.voice_cond(w.voice_id) for w in windows]
        pairs = list(zip(windows, conds, strict=True))
        seqs = [torch.cat([c.codes, torch.tensor(w.tokens, dtype=torch.long)]) for w, c in pairs]  # prompt + window
        lengths = torch.tensor([len(s) for s in seqs])
        mu = self.graphs["flow_encoder"](pad_sequence(seqs, batch_first=True), lengths)  # [B, 80, r * width]
        mels, frames = mu.shape[1], mu.shape[2]
        mask = (torch.arange(frames)[None, :] < ratio * lengths[:, None]).to(mu.dtype)[:, None, :]
        cond, z = torch.zeros_like(mu), torch.zeros_like(mu)
        for b, (w, c) in enumerate(pairs):
            p = c.mel.shape[1]
            cond[b, :, :p] = c.mel
            # the prompt's frames take noise from frame 0, the window's from its absolute position after it
            idx = torch.cat([torch.arange(p), p + ratio * w.first_position + torch.arange(ratio * len(w.tokens))])
            z[b, :, : len(idx)] = noise_at(idx, mels)[0]
        spks = torch.stack([c.spks for c in conds])
        mel = cfm_solve(self.graphs["flow_estimator"], self.flow_yaml.flow.cfm_params, mu, mask, spks, cond, z)
        # each window's own frames: after its prompt, before its padding
        return self._vocode(windows, [mel[b, :, c.mel.shape[1] : ratio * len(seqs[b])] for b, c in enumerate(conds)])

    def _vocode(self, windows: Sequence[DecodeWindow], mels: list[torch.Tensor]) -> list[np.ndarray]:
        """HiFT per group of equal-length windows, with source noise by absolute token position; keep the chunk."""
        spt = self.samples_per_token
        harm = self.flow_yaml.hift.nb_harmonics + 1
        groups: dict[int, list[int]] = defaultdict(list)
        for b, w in enumerate(windows):
            groups[len(w.tokens)].append(b)
        out: list[np.ndarray] = [np.empty(0, np.float32)] * len(windows)
        for n_tok, idx in groups.items():
            noise = torch.cat([source_noise(windows[b].first_position, n_tok, harm, spt) for b in idx])
            pcm = self.graphs["hift"](torch.stack([mels[b] for b in idx]), noise)
            for row, b in zip(pcm, idx, strict=True):
                w = windows[b]
                out[b] = row[w.n_context * spt : (w.n_context + w.n_chunk) * spt].numpy().copy()
        return out

    def decode_chunk(self, window: DecodeWindow) -> np.ndarray:
        """Exactly the PCM of the window's new chunk: float32 [n_chunk * 1920] at 24 kHz."""
        return self.decode_windows([window])[0]
