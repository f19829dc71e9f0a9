"""Speaker x-vector: CAM++ (`flow/campplus.onnx`) on mean-normalised Kaldi fbank of the 16 kHz prompt.

Runs once per voice, with onnxruntime on CPU. The tiny codec ships a random ONNX graph with the real
signature: input [1, frames, 80] float32 -> output [1, 192] float32.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moss_speech.builders.codec.audio import kaldi_fbank
from moss_speech.builders.codec.config import CAMPPLUS_NAME, FBANK_BINS, FBANK_SAMPLE_RATE, FLOW_DIR, XVECTOR_DIM


class XVectorExtractor:
    def __init__(self, onnx_path: Path):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, pcm_16k: np.ndarray) -> np.ndarray:
        feat = kaldi_fbank(pcm_16k, FBANK_SAMPLE_RATE, FBANK_BINS)
        feat = feat - feat.mean(axis=0, keepdims=True)
        out = self.session.run(None, {self.input_name: feat[None].astype(np.float32)})[0]
        return np.asarray(out, dtype=np.float32).reshape(-1)

    @classmethod
    def from_dir(cls, codec_dir: Path) -> XVectorExtractor | None:
        path = codec_dir / FLOW_DIR / CAMPPLUS_NAME
        return cls(path) if path.exists() else None


def write_tiny_campplus(path: Path, seed: int = 0) -> None:
    """A random stand-in for CAM++ with the real I/O: per-bin variance over time, then a 80 -> 192 affine map.

    Not the mean: the input is mean-normalised over time, so its mean is ~0 for every speaker and the x-vector
    would be the bias whatever the recording (a cloned voice could not differ from the default one)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((FBANK_BINS, XVECTOR_DIM)) / np.sqrt(FBANK_BINS)).astype(np.float32)
    b = (0.1 * rng.standard_normal(XVECTOR_DIM)).astype(np.float32)
    axes = numpy_helper.from_array(np.array([1], dtype=np.int64), "axes")
    nodes = [
        helper.make_node("Mul", ["input", "input"], ["squared"]),
        helper.make_node("ReduceMean", ["squared", "axes"], ["pooled"], keepdims=0),
        helper.make_node("MatMul", ["pooled", "W"], ["proj"]),
        helper.make_node("Add", ["proj", "B"], ["output"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_campplus",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", "frames", FBANK_BINS])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", XVECTOR_DIM])],
        initializer=[numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B"), axes],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
