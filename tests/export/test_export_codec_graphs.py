"""Each exported codec graph vs its PyTorch module, at shapes other than the export examples.

Tolerances (fp32, CPU onnxruntime vs eager torch; measured on the tiny codec in brackets):
  * whisper_mel     max abs 1e-4 on log-mel values of order 1      [~1e-5: DFT-as-conv summation order]
  * speech_encoder  codes identical (argmin over the codebook)     [identical]
  * flow_encoder    max abs 1e-4 on mu of order 2                  [~1e-6]
  * flow_estimator  max abs 1e-4 on velocities of order 2          [~2e-6]
  * hift            max abs 1e-5 on PCM within +-0.99              [~1e-7]
All are far below what a real error produces (wrong mask/padding/axis: differences of order 0.1-1).
"""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

pytest_plugins = ["tests.export.codec_fixtures"]
pytestmark = [pytest.mark.usefixtures("codec_single_thread"), pytest.mark.slow]  # one codec ONNX export for the module

MEL_ATOL = 1e-4
FLOW_ATOL = 1e-4
HIFT_ATOL = 1e-5
GRAPHS = ("whisper_mel", "speech_encoder", "flow_encoder", "flow_estimator", "hift")


def session(codec_onnx_dir, name):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(codec_onnx_dir / f"{name}.onnx"), opts, providers=["CPUExecutionProvider"])


def maxdiff(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def test_export_writes_graphs_manifest_and_speaker(codec_onnx_dir, codec_export_infos, codec_ref):
    assert set(codec_export_infos) == set(GRAPHS)
    manifest = json.loads((codec_onnx_dir / "codec_onnx.json").read_text())
    assert manifest["chunk_mask"] is True and manifest["flow_chunk"] == 0 and set(manifest["graphs"]) == set(GRAPHS)
    for name, info in codec_export_infos.items():
        model = onnx.load(str(codec_onnx_dir / info.path))
        assert not list(codec_onnx_dir.glob("*.onnx.data")), "weights must live inside the .onnx files"
        io = {v.name: v for v in [*model.graph.input, *model.graph.output]}
        assert set(io) == set(info.inputs) | set(info.outputs), name
        for tensor, shape in {**info.inputs, **info.outputs}.items():
            dims = io[tensor].type.tensor_type.shape.dim
            assert len(dims) == len(shape), (name, tensor)
            for d, want in zip(dims, shape, strict=True):
                # dynamic axes stay symbolic (a fixed batch or length would break batching)
                assert (d.dim_param != "") if isinstance(want, str) else (d.dim_value == want), (name, tensor, d)
    with np.load(codec_onnx_dir / "speaker.npz") as f:
        affine = codec_ref.flow.spk_embed_affine_layer
        np.testing.assert_array_equal(f["weight"], affine.weight.detach().numpy())


def test_whisper_mel_parity(codec_onnx_dir, codec_ref, codec_speechlike):
    pcm = np.stack([codec_speechlike(1.6, seed=s) for s in (1, 2, 3)])  # batch 3, 25600 samples (export used 2 x 2560)
    got = session(codec_onnx_dir, "whisper_mel").run(None, {"pcm": pcm})[0]
    with torch.no_grad():
        want = codec_ref.mel(torch.from_numpy(pcm)).numpy()
    assert got.shape == want.shape == (3, 128, 160)
    assert maxdiff(got, want) <= MEL_ATOL


def test_speech_encoder_codes_identical(codec_onnx_dir, codec_ref):
    sess = session(codec_onnx_dir, "speech_encoder")
    for batch, frames in ((1, 8), (3, 200), (2, 3000)):  # 3000 frames = a full 30 s segment
        mel = torch.randn(batch, 128, frames, generator=torch.Generator().manual_seed(frames))
        got = sess.run(None, {"mel": mel.numpy()})[0]
        with torch.no_grad():
            want = codec_ref.encoder(mel).numpy()
        assert got.dtype == np.int64 and got.shape == want.shape == (batch, frames // 8)
        np.testing.assert_array_equal(got, want)


def flow_batch(lengths, seed=0):
    tokens = torch.randint(0, 16384, (len(lengths), max(lengths)), generator=torch.Generator().manual_seed(seed))
    for b, n in enumerate(lengths):
        tokens[b, n:] = 0
    return tokens


def test_flow_encoder_padded_rows_equal_unpadded_encode(codec_onnx_dir, codec_ref):
    lengths = [41, 23, 57, 9]  # crosses the 25-token attention chunk; one row shorter than a chunk
    tokens = flow_batch(lengths)
    got = session(codec_onnx_dir, "flow_encoder").run(None, {"tokens": tokens.numpy(), "lengths": np.array(lengths)})[0]
    assert got.shape == (4, 80, 4 * 57)
    for b, n in enumerate(lengths):
        with torch.no_grad():
            want = codec_ref.flow.encode(tokens[b : b + 1, :n], torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 3))
        assert maxdiff(got[b, :, : 4 * n], want[0]) <= FLOW_ATOL, n


def test_flow_encoder_tolerance_catches_unmasked_padding(codec_onnx_dir, codec_ref):
    # the same graph told that every row is full length: padding leaks into rows 1 and 3 -> far outside the bound
    lengths = [41, 23, 57, 9]
    tokens = flow_batch(lengths)
    full = np.full(4, 57)
    got = session(codec_onnx_dir, "flow_encoder").run(None, {"tokens": tokens.numpy(), "lengths": full})[0]
    with torch.no_grad():
        want = codec_ref.flow.encode(tokens[1:2, :23], torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 3))
    assert maxdiff(got[1, :, : 4 * 23], want[0]) > 100 * FLOW_ATOL


def test_flow_estimator_parity_with_padding_mask(codec_onnx_dir, codec_ref):
    g = torch.Generator().manual_seed(3)
    b, t = 4, 212  # > the 100-frame attention chunk
    x, mu, cond = (torch.randn(b, 80, t, generator=g) for _ in range(3))
    mask = torch.ones(b, 1, t)
    mask[1, :, 150:] = 0
    mask[3, :, 37:] = 0
    tt, spks = torch.rand(b, generator=g), torch.randn(b, 80, generator=g)
    feeds = dict(x=x, mask=mask, mu=mu, t=tt, spks=spks, cond=cond)
    got = session(codec_onnx_dir, "flow_estimator").run(None, {k: v.numpy() for k, v in feeds.items()})[0]
    with torch.no_grad():
        want = codec_ref.flow.decoder.estimator(x, mask, mu, tt, spks, cond).numpy()
    assert got.shape == (b, 80, t)
    assert maxdiff(got, want) <= FLOW_ATOL
    with torch.no_grad():  # masked frames do not reach the valid part: row 3 alone, unpadded, gives the same
        alone = codec_ref.flow.decoder.estimator(
            *(v[3:4, ..., :37] if v.dim() == 3 else v[3:4] for v in (x, mask, mu, tt, spks, cond))
        )
    assert maxdiff(got[3, :, :37], alone[0]) <= FLOW_ATOL


@pytest.mark.parametrize("batch,frames", [(1, 7), (3, 33)])
def test_hift_parity(codec_onnx_dir, codec_ref, batch, frames):
    g = torch.Generator().manual_seed(frames)
    mel = torch.randn(batch, 80, frames, generator=g) - 4.0
    noise = torch.randn(batch, 9, frames * 480, generator=g)
    got = session(codec_onnx_dir, "hift").run(None, {"mel": mel.numpy(), "noise": noise.numpy()})[0]
    with torch.no_grad():
        want = codec_ref.hift(mel, noise).numpy()
    assert got.shape == (batch, frames * 480) and np.abs(want).max() > 1e-3
    assert maxdiff(got, want) <= HIFT_ATOL
