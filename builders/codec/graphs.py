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
MANIFEST_NAME = "codec_onnx.json"  # flow_chunk and chunk_mask baked into the graphs, per-graph export info
SPEAKER_NAME = "speaker.npz"  # the x-vector -> speaker affine layer (weight, bias), applied once per voice
ENGINE_SUFFIX = ".engine"  # TensorRT engine of `<graph>.onnx`


def read_manifest(artifacts_dir: Path | str) -> dict:
    path = Path(artifacts_dir) / MANIFEST_NAME
    if not path.exists():
        raise FileNotFoundError(f"{MANIFEST_NAME} not found in {artifacts_dir}: run export_codec_onnx first")
    return json.loads(path.read_text())
