"""Export the speech codec to ONNX: five graphs plus the per-voice speaker projection, with a manifest.

Split (and why):
  * `whisper_mel.onnx`     pcm [B, S] -> mel [B, 128, S/160]. Separate from the encoder because the Whisper
    log-mel has an utterance-global floor and a reflect pad at the end, so right-padding PCM in a batch would
    change the mel of the shorter items; the runtime computes it per segment (equal lengths batch together).
  * `speech_encoder.onnx`  mel [B, 128, T] -> codes [B, ceil(T/8)] int64. Fully causal, so mels of different
    lengths batch exactly with right padding (codes past an item's own length are dropped).
  * `flow_encoder.onnx`    tokens [B, T] int64 + lengths [B] -> mu [B, 80, 4T]. Prompt + window tokens,
    right-padded; `PaddedFlowEncoder` (model code, `builders.codec.flow`) masks the padding so each row equals
    `FlowModel.encode` on its own.
  * `flow_estimator.onnx`  (x, mask, mu, t, spks, cond) -> velocity. One Euler step; the 10-step CFG loop stays
    outside (as in CosyVoice2 serving) so TensorRT gets one small engine and the step count stays a setting.
  * `hift.onnx`            mel [B, 80, T], noise [B, 9, 480T] -> pcm [B, 480T]. Noise is an input (seeded by
    absolute position outside) so the graph is deterministic.
Voice conditioning stays outside the graphs: prompt codes and mel per voice, and the x-vector -> 80-d speaker
projection, whose weights go to `speaker.npz` (run once per voice in numpy).

Exported with the TorchScript exporter (`dynamo=False`, opset 17, dynamic_axes): single self-contained files,
no onnxscript dependency. Example inputs use sizes >= 2 on every dynamic axis.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from moss_speech.builders.codec.codec import SpeechCodec
from moss_speech.builders.codec.flow import PaddedFlowEncoder
from moss_speech.builders.codec.graphs import (
    ENGINE_SUFFIX,
    GRAPH_IO,
    GRAPHS,
    MANIFEST_NAME,
    SPEAKER_NAME,
    read_manifest,
)
from moss_speech.contract.streaming import StreamingConfig

__all__ = [
    "GRAPHS",
    "MANIFEST_NAME",
    "SPEAKER_NAME",
    "build_codec_engines",
    "codec_profiles",
    "export_codec_onnx",
    "read_manifest",
]
OPSET = 17


@dataclass
class ExportInfo:
    name: str
    path: str
    inputs: dict[str, list[int | str]]  # symbolic shapes: str = dynamic axis
    outputs: dict[str, list[int | str]]
    dtypes: dict[str, str]
    bytes: int
    seconds: float
    opset: int = OPSET
    extra: dict = field(default_factory=dict)


@dataclass
class _Spec:
    module: nn.Module
    example: tuple[torch.Tensor, ...]
    inputs: dict[str, list[int | str]]
    outputs: dict[str, list[int | str]]
    dtypes: dict[str, str]


def graph_specs(codec: SpeechCodec) -> dict[str, _Spec]:
    """Module, example inputs and symbolic I/O shapes of every graph (example sizes >= 2 on dynamic axes)."""
    n_mels = codec.pre_cfg.feature_size
    mels = codec.flow_yaml.flow.output_size
    ratio = codec.flow_yaml.flow.token_mel_ratio
    harm = codec.flow_yaml.hift.nb_harmonics + 1
    hop = codec.flow_yaml.hift.samples_per_frame
    fpc = codec.encoder_cfg.frames_per_code
    f32, i64 = "float32", "int64"
    t = 12  # tokens in the example
    return {
        "whisper_mel": _Spec(
            codec.mel,
            (0.1 * torch.randn(2, 2 * codec.samples_per_code_in),),
            {"pcm": ["batch", "samples"]},
            {"mel": ["batch", n_mels, "frames"]},
            {"pcm": f32, "mel": f32},
        ),
        "speech_encoder": _Spec(
            codec.encoder,
            (torch.randn(2, n_mels, 4 * fpc),),
            {"mel": ["batch", n_mels, "frames"]},
            {"codes": ["batch", "codes"]},
            {"mel": f32, "codes": i64},
        ),
        "flow_encoder": _Spec(
            PaddedFlowEncoder(codec.flow),
            (torch.randint(0, 16384, (2, t)), torch.tensor([t, t - 3])),
            {"tokens": ["batch", "tokens"], "lengths": ["batch"]},
            {"mu": ["batch", mels, "frames"]},
            {"tokens": i64, "lengths": i64, "mu": f32},
        ),
        "flow_estimator": _Spec(
            codec.flow.decoder.estimator,
            (
                torch.randn(2, mels, ratio * t),
                torch.ones(2, 1, ratio * t),
                torch.randn(2, mels, ratio * t),
                torch.rand(2),
                torch.randn(2, mels),
                torch.randn(2, mels, ratio * t),
            ),
            {
                "x": ["batch", mels, "frames"],
                "mask": ["batch", 1, "frames"],
                "mu": ["batch", mels, "frames"],
                "t": ["batch"],
                "spks": ["batch", mels],
                "cond": ["batch", mels, "frames"],
            },
            {"velocity": ["batch", mels, "frames"]},
            {k: f32 for k in ("x", "mask", "mu", "t", "spks", "cond", "velocity")},
        ),
        "hift": _Spec(
            codec.hift,
            (torch.randn(2, mels, 6), torch.randn(2, harm, 6 * hop)),
            {"mel": ["batch", mels, "frames"], "noise": ["batch", harm, "samples"]},
            {"pcm": ["batch", "samples"]},
            {"mel": f32, "noise": f32, "pcm": f32},
        ),
    }


def _dynamic_axes(spec: _Spec) -> dict[str, dict[int, str]]:
    return {
        name: {i: d for i, d in enumerate(shape) if isinstance(d, str)}
        for name, shape in {**spec.inputs, **spec.outputs}.items()
    }


def export_graph(spec: _Spec, path: Path) -> None:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TorchScript exporter deprecation / tracer warnings on shape math
        torch.onnx.export(
            spec.module,
            spec.example,
            str(path),
            input_names=list(spec.inputs),
            output_names=list(spec.outputs),
            dynamic_axes=_dynamic_axes(spec),
            opset_version=OPSET,
            dynamo=False,
            do_constant_folding=True,
        )
    onnx.checker.check_model(str(path))


def export_codec_onnx(
    codec_dir: Path | str,
    out_dir: Path | str,
    flow_chunk: int = 0,
    streaming: StreamingConfig | None = None,
    graphs: tuple[str, ...] = GRAPHS,
) -> dict[str, ExportInfo]:
    """Write the codec graphs, `speaker.npz` and `codec_onnx.json` to `out_dir`; returns ExportInfo by name.

    `flow_chunk` picks flow.pt / flow-chunk-{5,25}.pt; `streaming.chunk_mask` is baked into the flow graphs
    (recorded in the manifest, checked by the runtime).
    """
    codec_dir, out_dir = Path(codec_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    streaming = streaming or StreamingConfig()
    codec = SpeechCodec(codec_dir, streaming=streaming, flow_chunk=flow_chunk)
    torch.manual_seed(0)  # example inputs only
    infos: dict[str, ExportInfo] = {}
    for name, spec in graph_specs(codec).items():
        if name not in graphs:
            continue
        # the runtimes feed inputs by these names in this order (builders.codec.graphs)
        assert (tuple(spec.inputs), tuple(spec.outputs)) == GRAPH_IO[name], name
        path = out_dir / f"{name}.onnx"
        start = time.perf_counter()
        export_graph(spec, path)
        infos[name] = ExportInfo(
            name,
            path.name,
            spec.inputs,
            spec.outputs,
            spec.dtypes,
            path.stat().st_size,
            round(time.perf_counter() - start, 3),
        )
    affine = codec.flow.spk_embed_affine_layer
    np.savez(
        out_dir / SPEAKER_NAME,
        weight=affine.weight.detach().numpy().astype(np.float32),
        bias=affine.bias.detach().numpy().astype(np.float32),
    )
    manifest = {
        "codec_dir": str(codec_dir.resolve()),
        "flow_chunk": flow_chunk,
        "chunk_mask": streaming.chunk_mask,
        "opset": OPSET,
        "graphs": {k: asdict(v) for k, v in infos.items()},
    }
    (out_dir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
    return infos


Profile = dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]


def codec_profiles(
    codec_dir: Path | str,
    max_batch: int = 8,
    max_prompt_tokens: int = 250,
    streaming: StreamingConfig | None = None,
    max_seconds_in: int = 30,
) -> dict[str, Profile]:
    """TensorRT optimization profiles (min, opt, max) per graph, for `builders.export.tensorrt.build_engine`.

    Batch axes run 1..max_batch (the estimator 2..2*max_batch: CFG doubles the batch). Window sizes come from
    `streaming` (context + chunk + lookahead tokens); the flow graphs also see the voice prompt (up to
    `max_prompt_tokens`). The encoder takes up to one 30 s segment (longer audio is segmented by the runtime).
    """
    from moss_speech.builders.codec.config import EncoderConfig, FlowYaml, PreprocessorConfig

    codec_dir = Path(codec_dir)
    s = streaming or StreamingConfig()
    pre, enc = PreprocessorConfig.from_dir(codec_dir), EncoderConfig.from_dir(codec_dir)
    fy = FlowYaml.from_dir(codec_dir)
    spc = pre.hop_length * enc.frames_per_code
    mels, ratio, harm = fy.flow.output_size, fy.flow.token_mel_ratio, fy.hift.nb_harmonics + 1
    hop = fy.hift.samples_per_frame
    window = s.context_tokens + max(s.chunk_tokens, s.first_chunk_tokens) + s.lookahead_tokens
    tokens = max_prompt_tokens + window
    opt_b = max(1, max_batch // 2)
    max_samples = -(-max_seconds_in * pre.sampling_rate // spc) * spc
    opt_samples = min(max_samples, 10 * spc * -(-pre.sampling_rate // spc))  # ~10 s

    def seq(lo: int, opt: int, hi: int, *rest_shapes: int, batch=(1, opt_b, max_batch)):
        return tuple((b, *rest_shapes, n) for b, n in zip(batch, (lo, opt, hi), strict=True))

    est_b = (2, 2 * opt_b, 2 * max_batch)
    frames = (ratio, ratio * (tokens // 2), ratio * tokens)
    return {
        "whisper_mel": {"pcm": seq(spc, opt_samples, max_samples)},
        "speech_encoder": {
            "mel": seq(
                enc.frames_per_code, opt_samples // pre.hop_length, max_samples // pre.hop_length, pre.feature_size
            )
        },
        "flow_encoder": {
            "tokens": seq(1, tokens // 2, tokens),
            "lengths": ((1,), (opt_b,), (max_batch,)),
        },
        "flow_estimator": {
            **{k: seq(*frames, mels, batch=est_b) for k in ("x", "mu", "cond")},
            "mask": seq(*frames, 1, batch=est_b),
            "t": tuple((b,) for b in est_b),
            "spks": tuple((b, mels) for b in est_b),
        },
        "hift": {
            "mel": seq(ratio, ratio * window, ratio * window, mels),
            "noise": seq(ratio * hop, ratio * window * hop, ratio * window * hop, harm),
        },
    }


def build_codec_engines(
    codec_dir: Path | str,
    artifacts_dir: Path | str,
    graphs: tuple[str, ...] = GRAPHS,
    precision: str = "fp32",
    timing_cache: Path | str | None = None,
    **profile_kwargs,
) -> dict:
    """Build `<graph>.engine` next to each `<graph>.onnx` with `codec_profiles` (kwargs go there); returns
    EngineInfo by graph. The engines are what TensorRTCodecRuntime loads (datacenter TensorRT on a GPU; the
    TensorRT-RTX fallback only proves the build offline)."""
    from moss_speech.builders.export.tensorrt import build_engine

    artifacts_dir = Path(artifacts_dir)
    profiles = codec_profiles(codec_dir, **profile_kwargs)
    return {
        name: build_engine(
            artifacts_dir / f"{name}.onnx",
            artifacts_dir / f"{name}{ENGINE_SUFFIX}",
            profiles[name],
            precision=precision,
            timing_cache=timing_cache,
        )
        for name in graphs
    }


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description="Export the MOSS-Speech codec to ONNX")
    ap.add_argument("codec_dir", type=Path)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--flow-chunk", type=int, default=0, choices=(0, 5, 25))
    ap.add_argument("--no-chunk-mask", action="store_true", help="full attention in the flow graphs")
    args = ap.parse_args()
    infos = export_codec_onnx(
        args.codec_dir, args.out_dir, args.flow_chunk, StreamingConfig(chunk_mask=not args.no_chunk_mask)
    )
    for info in infos.values():
        print(f"{info.name:16s} {info.bytes / 1e6:8.2f} MB {info.seconds:6.2f} s  {info.inputs} -> {info.outputs}")


if __name__ == "__main__":
    main()
