"""`SpeechCodec`: the codec in process, its eager PyTorch modules driven by the shared `CodecPipeline`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from moss_speech.builders.codec.audio import WhisperMel
from moss_speech.builders.codec.config import DEFAULT_VOICE_ID
from moss_speech.builders.codec.encoder import WhisperVQEncoder
from moss_speech.builders.codec.flow import FlowModel, PaddedFlowEncoder
from moss_speech.builders.codec.hift import HiFTGenerator
from moss_speech.builders.codec.pipeline import CodecPipeline
from moss_speech.builders.codec.streaming import DecodeWindow, chunk_bounds, ready_windows
from moss_speech.contract.audio import AudioLimits
from moss_speech.contract.streaming import StreamingConfig


class SpeechCodec(CodecPipeline):
    """The reference codec: loads every network from the codec directory (fnlp/MOSS-Speech-Codec layout).

    `flow_chunk` picks flow.pt (0) or flow-chunk-{5,25}.pt; `streaming.chunk_mask` picks chunk-causal attention in
    the flow (the reference's streaming mode) for windows. Offline `decode` always uses full attention.
    """

    backend = "torch"

    def __init__(
        self,
        codec_dir: Path | str,
        voices_dir: Path | None = None,
        streaming: StreamingConfig | None = None,
        limits: AudioLimits | None = None,
        flow_chunk: int = 0,
    ):
        super().__init__(codec_dir, streaming, voices_dir, limits)
        self.encoder = WhisperVQEncoder.from_dir(self.dir, self.encoder_cfg)
        self.mel = WhisperMel(self.pre_cfg)
        self.flow = FlowModel.from_dir(self.dir, self.flow_yaml.flow, flow_chunk, chunked=self.streaming.chunk_mask)
        self.hift = HiFTGenerator.from_dir(self.dir, self.flow_yaml.hift)
        affine = self.flow.spk_embed_affine_layer
        self.use_graphs(
            {
                "whisper_mel": self.mel,
                "speech_encoder": self.encoder,
                "flow_encoder": PaddedFlowEncoder(self.flow),
                "flow_estimator": self.flow.decoder.estimator,
                "hift": self.hift,
            },
            (affine.weight.detach(), affine.bias.detach()),
        )

    def encode_pcm(self, pcm: np.ndarray) -> np.ndarray:
        """float32 mono 16 kHz -> int64 codes, ceil(samples / 1280) of them; 30 s segments encoded separately."""
        return self.encode_batch([pcm])[0]

    def decode(self, codes: list[int] | np.ndarray, voice_id: str = DEFAULT_VOICE_ID) -> np.ndarray:
        """Offline decode of a whole utterance as one window, with full attention in the flow as the reference's
        offline path (streamed windows use chunk-causal attention, its streaming mode)."""
        codes = [int(c) for c in codes]
        window = DecodeWindow(
            tokens=codes or [0], n_context=0, n_chunk=max(1, len(codes)), first_position=0, voice_id=voice_id
        )  # validates the codes
        if not codes:
            return np.zeros(0, np.float32)
        with self.flow.attention(chunked=False), torch.inference_mode():
            return self.decode_chunk(window)

    def decode_streaming(self, codes: list[int] | np.ndarray, voice_id: str = DEFAULT_VOICE_ID) -> np.ndarray:
        """Decode an utterance window by window, as the streamer would, and concatenate."""
        codes = [int(c) for c in codes]
        windows = ready_windows(codes, 0, True, self.streaming, voice_id)
        assert [(w.chunk_position, w.chunk_position + w.n_chunk) for w in windows] == chunk_bounds(
            len(codes), self.streaming
        )
        parts = [self.decode_chunk(w) for w in windows]
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)
