"""Codec runtime: batched speech encoding and batched stateless window decoding behind one interface.

One numpy pipeline (`CodecRuntime`) drives five graphs through a backend:
  * `torch`        the codec's own modules (plus the padded flow-encoder wrapper the export uses)
  * `onnxruntime`  the ONNX files written by `export_codec_onnx`
  * `tensorrt`     serialized engines built from those files (UNVERIFIED: needs a GPU; see TensorRTGraph)

encode_pcm(list of 16 kHz float32 PCM) -> list of int64 codes: each input is cut into 30 s segments and
padded to 1280 samples, its mel is computed per segment (same-length segments batch together: the Whisper mel
floor is utterance-global), then every segment's mel goes through the encoder in one right-padded batch
(causal encoder, so padding never changes an item's codes).

decode_windows(list of DecodeWindow) -> list of PCM (n_chunk * 1920 samples each): the flow encoder and the
10-step Euler/CFG loop run over all windows at once (right-padded, with lengths/masks), HiFT runs once per
group of windows with the same token count (its convolutions are not causal, so padding would reach the chunk
of a final window). Voice conditioning (prompt codes, prompt mel, speaker projection) is computed once per voice.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from moss_speech.builders.codec.audio import AudioInput, PromptMel, load_audio
from moss_speech.builders.codec.config import (
    VOICES_DIR,
    XVECTOR_DIM,
    AudioLimits,
    CodecSizes,
    EncoderConfig,
    FlowYaml,
    PreprocessorConfig,
    StreamingConfig,
)
from moss_speech.builders.codec.flow import noise_at
from moss_speech.builders.codec.hift import source_noise
from moss_speech.builders.codec.streaming import DecodeWindow
from moss_speech.builders.codec.voices import Voice, VoiceRegistry
from moss_speech.builders.codec.xvector import XVectorExtractor

BACKENDS = ("torch", "onnxruntime", "tensorrt")
# graph name -> (input names, output names); the contract between export_codec_onnx and the runtimes
GRAPH_IO: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "whisper_mel": (("pcm",), ("mel",)),
    "speech_encoder": (("mel",), ("codes",)),
    "flow_encoder": (("tokens", "lengths"), ("mu",)),
    "flow_estimator": (("x", "mask", "mu", "t", "spks", "cond"), ("velocity",)),
    "hift": (("mel", "noise"), ("pcm",)),
}

Graph = Callable[..., np.ndarray]  # keyword inputs by graph input name -> the single output


@dataclass(frozen=True)
class VoiceCond:
    """What a voice contributes to every window: prompt codes [P], prompt mel [80, rP], speaker [80]."""

    voice: Voice
    spks: np.ndarray


class CodecRuntime(CodecSizes):
    backend = "base"

    def __init__(
        self,
        codec_dir: Path | str,
        graphs: dict[str, Graph],
        speaker: tuple[np.ndarray, np.ndarray],
        streaming: StreamingConfig | None = None,
        voices_dir: Path | None = None,
        limits: AudioLimits | None = None,
    ):
        self.dir = Path(codec_dir)
        missing = set(GRAPH_IO) - set(graphs)
        if missing:
            raise ValueError(f"{self.backend} runtime lacks graphs {sorted(missing)}")
        self.graphs = graphs
        self.streaming = streaming or StreamingConfig()
        self.limits = limits or AudioLimits()
        self.pre_cfg = PreprocessorConfig.from_dir(self.dir)
        self.encoder_cfg = EncoderConfig.from_dir(self.dir)
        self.flow_yaml = FlowYaml.from_dir(self.dir)
        self._spk_w, self._spk_b = speaker
        self._prompt_mel = PromptMel(self.flow_yaml.feat_extractor)
        self._xvector = XVectorExtractor.from_dir(self.dir)
        self.voices = VoiceRegistry(self._voice_from_file, Path(voices_dir or self.dir / VOICES_DIR))
        self._conds: dict[str, VoiceCond] = {}
        self._lock = threading.Lock()
        cfm = self.flow_yaml.flow.cfm_params
        t_span = torch.linspace(0, 1, cfm.n_timesteps + 1, dtype=torch.float32)
        if cfm.t_scheduler == "cosine":
            t_span = 1 - torch.cos(t_span * 0.5 * torch.pi)
        self._t_span = t_span.numpy()  # same float32 values as FlowModel.solve

    # ---- construction
    @classmethod
    def from_artifacts(
        cls,
        codec_dir: Path | str,
        artifacts_dir: Path | str,
        backend: str = "onnxruntime",
        streaming: StreamingConfig | None = None,
        **kwargs,
    ) -> CodecRuntime:
        """The runtime for `backend` over a codec dir and the artifacts `export_codec_onnx` wrote there.

        kwargs go to the backend: `threads`/`providers` (onnxruntime), `device` (tensorrt), `voices_dir`,
        `limits` (all). The flow settings baked into the graphs (flow_chunk, chunk_mask) are read from the
        manifest; a `streaming` config that disagrees raises.
        """
        from moss_speech.builders.export.onnx_codec import read_manifest

        manifest = read_manifest(artifacts_dir)
        streaming = streaming or StreamingConfig(chunk_mask=manifest["chunk_mask"])
        if streaming.chunk_mask != manifest["chunk_mask"]:
            raise ValueError(
                f"streaming.chunk_mask={streaming.chunk_mask} but the graphs in {artifacts_dir} were exported "
                f"with chunk_mask={manifest['chunk_mask']}"
            )
        if backend == "torch":
            return TorchCodecRuntime(codec_dir, streaming=streaming, flow_chunk=manifest["flow_chunk"], **kwargs)
        if backend == "onnxruntime":
            return OnnxCodecRuntime(codec_dir, artifacts_dir, streaming=streaming, **kwargs)
        if backend == "tensorrt":
            return TensorRTCodecRuntime(codec_dir, artifacts_dir, streaming=streaming, **kwargs)
        raise ValueError(f"unknown codec backend {backend!r}; choose one of {BACKENDS}")

    # ---- encoder
    def encode_pcm(self, pcms: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Batch of float32 mono 16 kHz PCM -> int64 codes per item, ceil(samples / 1280) each."""
        seg_len = self.pre_cfg.chunk_length * self.input_rate
        spc = self.samples_per_code_in
        segments: list[tuple[int, np.ndarray]] = []  # (item, PCM padded to a multiple of 1280)
        for i, pcm in enumerate(pcms):
            pcm = np.asarray(pcm, dtype=np.float32).reshape(-1)
            for start in range(0, len(pcm), seg_len):
                piece = pcm[start : start + seg_len]
                segments.append((i, np.pad(piece, (0, (-len(piece)) % spc))))
        out: list[list[np.ndarray]] = [[] for _ in pcms]
        if not segments:
            return [np.zeros(0, np.int64) for _ in pcms]
        by_len: dict[int, list[int]] = defaultdict(list)
        for k, (_, piece) in enumerate(segments):
            by_len[len(piece)].append(k)
        mels: list[np.ndarray] = [np.empty(0)] * len(segments)
        for idx in by_len.values():
            batch = self.graphs["whisper_mel"](pcm=np.stack([segments[k][1] for k in idx]))
            for k, mel in zip(idx, batch, strict=True):
                mels[k] = mel
        frames = max(m.shape[-1] for m in mels)
        batch = np.zeros((len(mels), mels[0].shape[0], frames), np.float32)
        for k, mel in enumerate(mels):
            batch[k, :, : mel.shape[-1]] = mel
        codes = self.graphs["speech_encoder"](mel=batch)
        fpc = self.encoder_cfg.frames_per_code
        for k, (i, _) in enumerate(segments):
            out[i].append(codes[k, : mels[k].shape[-1] // fpc])
        return [np.concatenate(c).astype(np.int64) if c else np.zeros(0, np.int64) for c in out]

    def encode(self, audio: AudioInput, sample_rate: int | None = None) -> np.ndarray:
        return self.encode_pcm([load_audio(audio, sample_rate, self.input_rate, self.limits)])[0]

    # ---- voices
    def make_voice(self, voice_id: str, audio: AudioInput, sample_rate: int | None = None) -> Voice:
        """Same recipe as SpeechCodec.make_voice, with this runtime's encoder."""
        pcm16 = load_audio(audio, sample_rate, self.input_rate, self.limits)
        pcm24 = load_audio(audio, sample_rate, self.sample_rate, self.limits)
        codes = self.encode_pcm([pcm16])[0]
        with torch.inference_mode():
            mel = self._prompt_mel(torch.from_numpy(pcm24)[None])[0].numpy()
        ratio = self.flow_yaml.flow.token_mel_ratio
        n = min(mel.shape[1] // ratio, len(codes))
        xvec = self._xvector(pcm16) if self._xvector is not None else np.zeros(XVECTOR_DIM, np.float32)
        return Voice(voice_id, codes[:n], np.ascontiguousarray(mel[:, : ratio * n]), xvec)

    def _voice_from_file(self, voice_id: str, path: Path) -> Voice:
        return self.make_voice(voice_id, path)

    def voice_cond(self, voice_id: str) -> VoiceCond:
        voice = self.voices.get(voice_id)
        cond = self._conds.get(voice_id)
        if cond is None or cond.voice is not voice:  # new or replaced via voices.add
            x = voice.xvector.astype(np.float32)
            x = x / max(float(np.linalg.norm(x)), 1e-12)  # F.normalize
            cond = VoiceCond(voice, (self._spk_w @ x + self._spk_b).astype(np.float32))
            with self._lock:
                self._conds[voice_id] = cond
        return cond

    # ---- decoder
    def decode_windows(self, windows: Sequence[DecodeWindow]) -> list[np.ndarray]:
        """PCM of each window's new chunk: float32 [n_chunk * 1920] at 24 kHz, as SpeechCodec.decode_chunk."""
        if not windows:
            return []
        ratio = self.flow_yaml.flow.token_mel_ratio
        conds = [self.voice_cond(w.voice_id) for w in windows]
        seqs = [np.concatenate([c.voice.prompt_codes, np.asarray(w.tokens, np.int64)]) for w, c in zip(
            windows, conds, strict=True)]
        n, width = len(windows), max(len(s) for s in seqs)
        tokens = np.zeros((n, width), np.int64)
        for b, s in enumerate(seqs):
            tokens[b, : len(s)] = s
        lengths = np.array([len(s) for s in seqs], np.int64)
        mu = self.graphs["flow_encoder"](tokens=tokens, lengths=lengths)
        frames = ratio * width
        mels = mu.shape[1]
        mask = (np.arange(frames)[None, :] < ratio * lengths[:, None]).astype(np.float32)[:, None, :]
        cond = np.zeros((n, mels, frames), np.float32)
        z = np.zeros((n, mels, frames), np.float32)
        for b, (w, c) in enumerate(zip(windows, conds, strict=True)):
            p = ratio * len(c.voice.prompt_codes)
            cond[b, :, :p] = c.voice.prompt_mel
            idx = torch.cat([torch.arange(p), p + ratio * w.first_position + torch.arange(ratio * len(w.tokens))])
            z[b, :, : len(idx)] = noise_at(idx, mels)[0].numpy()
        spks = np.stack([c.spks for c in conds])
        mel = self._solve(mu, mask, spks, cond, z)
        return self._vocode(windows, [mel[b, :, ratio * len(c.voice.prompt_codes) : ratio * len(s)] for b, (c, s) in
                                      enumerate(zip(conds, seqs, strict=True))])

    def _solve(self, mu, mask, spks, cond, z) -> np.ndarray:
        """FlowModel.solve over a batch: Euler steps, CFG as a doubled batch (second half unconditional)."""
        n = mu.shape[0]
        w = np.float32(self.flow_yaml.flow.cfm_params.inference_cfg_rate)
        mu2 = np.concatenate([mu, np.zeros_like(mu)])
        spks2 = np.concatenate([spks, np.zeros_like(spks)])
        cond2 = np.concatenate([cond, np.zeros_like(cond)])
        mask2 = np.concatenate([mask, mask])
        x, t = z, self._t_span[0]
        for step in range(1, len(self._t_span)):
            dt = self._t_span[step] - t
            v = self.graphs["flow_estimator"](
                x=np.concatenate([x, x]), mask=mask2, mu=mu2, t=np.full(2 * n, t, np.float32), spks=spks2,
                cond=cond2,
            )
            x = x + dt * ((np.float32(1.0) + w) * v[:n] - w * v[n:])
            t = t + dt
        return x

    def _vocode(self, windows: Sequence[DecodeWindow], mels: list[np.ndarray]) -> list[np.ndarray]:
        spt = self.samples_per_token
        harm = self.flow_yaml.hift.nb_harmonics + 1
        groups: dict[int, list[int]] = defaultdict(list)
        for b, w in enumerate(windows):
            groups[len(w.tokens)].append(b)
        out: list[np.ndarray] = [np.empty(0)] * len(windows)
        for n_tok, idx in groups.items():
            noise = np.concatenate([source_noise(windows[b].first_position, n_tok, harm, spt).numpy() for b in idx])
            pcm = self.graphs["hift"](mel=np.stack([mels[b] for b in idx]), noise=noise)
            for row, b in zip(pcm, idx, strict=True):
                w = windows[b]
                out[b] = np.ascontiguousarray(row[w.n_context * spt : (w.n_context + w.n_chunk) * spt])
        return out


# ------------------------------------------------------------------------------------------------------------
# torch
# ------------------------------------------------------------------------------------------------------------
class TorchGraph:
    def __init__(self, module: torch.nn.Module, inputs: tuple[str, ...]):
        self.module, self.inputs = module, inputs

    @torch.inference_mode()
    def __call__(self, **feeds: np.ndarray) -> np.ndarray:
        return self.module(*(torch.from_numpy(np.ascontiguousarray(feeds[k])) for k in self.inputs)).numpy()


class TorchCodecRuntime(CodecRuntime):
    """The reference: the codec's modules in eager mode, driven by the same batched pipeline."""

    backend = "torch"

    def __init__(self, codec_dir: Path | str, streaming: StreamingConfig | None = None, flow_chunk: int = 0,
                 threads: int | None = None, **kwargs):
        from moss_speech.builders.codec.codec import SpeechCodec
        from moss_speech.builders.export.onnx_codec import PaddedFlowEncoder

        if threads:
            torch.set_num_threads(threads)
        streaming = streaming or StreamingConfig()
        self.codec = SpeechCodec(Path(codec_dir), streaming=streaming, flow_chunk=flow_chunk)
        modules = {
            "whisper_mel": self.codec.mel,
            "speech_encoder": self.codec.encoder,
            "flow_encoder": PaddedFlowEncoder(self.codec.flow),
            "flow_estimator": self.codec.flow.decoder.estimator,
            "hift": self.codec.hift,
        }
        graphs = {k: TorchGraph(m, GRAPH_IO[k][0]) for k, m in modules.items()}
        affine = self.codec.flow.spk_embed_affine_layer
        speaker = (affine.weight.detach().numpy(), affine.bias.detach().numpy())
        super().__init__(codec_dir, graphs, speaker, streaming=streaming, **kwargs)


# ------------------------------------------------------------------------------------------------------------
# onnxruntime
# ------------------------------------------------------------------------------------------------------------
class OrtGraph:
    def __init__(self, path: Path, threads: int | None = None, providers: list[str] | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        providers = providers or ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(path), opts, providers=providers)
        self.inputs = tuple(i.name for i in self.session.get_inputs())

    def __call__(self, **feeds: np.ndarray) -> np.ndarray:
        return self.session.run(None, {k: np.ascontiguousarray(feeds[k]) for k in self.inputs})[0]


def _load_speaker(artifacts_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    from moss_speech.builders.export.onnx_codec import SPEAKER_NAME

    with np.load(artifacts_dir / SPEAKER_NAME) as f:
        return f["weight"], f["bias"]


class OnnxCodecRuntime(CodecRuntime):
    backend = "onnxruntime"

    def __init__(self, codec_dir: Path | str, artifacts_dir: Path | str, threads: int | None = None,
                 providers: list[str] | None = None, **kwargs):
        artifacts_dir = Path(artifacts_dir)
        graphs = {k: OrtGraph(artifacts_dir / f"{k}.onnx", threads, providers) for k in GRAPH_IO}
        for k, g in graphs.items():
            if g.inputs != GRAPH_IO[k][0]:
                raise ValueError(f"{k}.onnx inputs {g.inputs} != expected {GRAPH_IO[k][0]}")
        super().__init__(codec_dir, graphs, _load_speaker(artifacts_dir), **kwargs)


# ------------------------------------------------------------------------------------------------------------
# TensorRT (UNVERIFIED: written against the TensorRT 10 Python API; executing engines needs a GPU, which the
# CI machines lack. Only the ONNX parse + engine build is tested, via builders.export.tensorrt.build_engine.)
# ------------------------------------------------------------------------------------------------------------
ENGINE_SUFFIX = ".engine"


class TensorRTGraph:
    """One deserialized engine: numpy in -> numpy out through torch CUDA tensors (device memory + stream)."""

    def __init__(self, path: Path, device: str = "cuda"):
        try:
            import tensorrt as trt
        except ImportError:  # TensorRT-RTX ships the same API under another name
            import tensorrt_rtx_bindings as trt

        self.trt, self.device = trt, torch.device(device)
        logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(logger).deserialize_cuda_engine(path.read_bytes())
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = tuple(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.output = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)

    def __call__(self, **feeds: np.ndarray) -> np.ndarray:
        keep = []
        for name in self.inputs:
            t = torch.from_numpy(np.ascontiguousarray(feeds[name])).to(self.device)
            keep.append(t)
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
        shape = tuple(self.context.get_tensor_shape(self.output))
        dtype = torch.int64 if self.engine.get_tensor_dtype(self.output) == self.trt.DataType.INT64 else torch.float32
        out = torch.empty(shape, dtype=dtype, device=self.device)
        self.context.set_tensor_address(self.output, out.data_ptr())
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"TensorRT execution failed for {self.output}")
        stream.synchronize()
        return out.cpu().numpy()


class TensorRTCodecRuntime(CodecRuntime):
    """Same pipeline over `<graph>.engine` files next to the ONNX files (`build_codec_engines`). UNVERIFIED."""

    backend = "tensorrt"

    def __init__(self, codec_dir: Path | str, artifacts_dir: Path | str, device: str = "cuda", **kwargs):
        artifacts_dir = Path(artifacts_dir)
        graphs = {k: TensorRTGraph(artifacts_dir / f"{k}{ENGINE_SUFFIX}", device) for k in GRAPH_IO}
        super().__init__(codec_dir, graphs, _load_speaker(artifacts_dir), **kwargs)
