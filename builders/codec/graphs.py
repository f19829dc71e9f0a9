"""The codec's graphs as files: names, inputs and outputs, and the artifacts next to them.

The contract between the exporter (`builders.export.onnx_codec` writes these files) and the codec runtimes
(`model_repository.runtime.codec_runtime` loads them). It lives with the model code so that a runtime reads built
artifacts without importing the export side. Torch-free.
"""

from __future__ import annotations

import json
from pathlib import Path

# graph name -> (input names, output names); a graph is called with its inputs in this order
GRAPH_IO: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "whisper_mel": (("pcm",), ("mel",)),
    "speech_encoder": (("mel",), ("codes",)),
    "flow_encoder": (("tokens", "lengths"), ("mu",)),
    "flow_estimator": (("x", "mask", "mu", "t", "spks", "cond"), ("velocity",)),
    "hift": (("mel", "noise"), ("pcm",)),
}
GRAPHS = tuple(GRAPH_IO)
ENCODER_GRAPHS = ("whisper_mel", "speech_encoder")  # 16 kHz PCM -> codes (speech encoder, voice creation)
DECODER_GRAPHS = ("flow_encoder", "flow_estimator", "hift")  # windows -> 24 kHz PCM (vocoder)
# Which graphs each served codec model holds and loads (the voice model reads the speech encoder's folder).
MODEL_GRAPHS = {"speech_encoder": ENCODER_GRAPHS, "vocoder": DECODER_GRAPHS}
MANIFEST_NAME = "codec_onnx.json"  # flow_chunk and chunk_mask baked into the graphs, per-graph export info
SPEAKER_NAME = "speaker.npz"  # the x-vector -> speaker affine layer (weight, bias), applied once per voice
ENGINE_SUFFIX = ".engine"  # TensorRT engine of `<graph>.onnx`
# Built-in voices' conditioning (prompt codes, prompt mel, x-vector), one `<voice id>.npz` each, computed at build
# time with the encoder graphs, so a vocoder needs no encoder graph to serve its built-in voices.
VOICES_NAME = "voices"
VOICE_ARRAYS = ("prompt_codes", "prompt_mel", "xvector")


def graph_of(path: Path | str) -> str | None:
    """The graph a codec artifact file belongs to (`hift.onnx`, `hift.onnx.data`, `hift.engine` -> `hift`)."""
    stem = Path(path).name.split(".")[0]
    return stem if stem in GRAPH_IO else None


def present_graphs(artifacts_dir: Path | str, suffix: str) -> tuple[str, ...]:
    """The graphs whose `<graph><suffix>` file is in `artifacts_dir`, in GRAPH_IO order."""
    return tuple(g for g in GRAPH_IO if (Path(artifacts_dir) / f"{g}{suffix}").is_file())


def read_manifest(artifacts_dir: Path | str) -> dict:
    path = Path(artifacts_dir) / MANIFEST_NAME
    if not path.exists():
        raise FileNotFoundError(f"{MANIFEST_NAME} not found in {artifacts_dir}: run export_codec_onnx first")
    return json.loads(path.read_text())
