"""The shared pipeline's pieces on the eager modules: the padded flow encoder, the batched CFG solve, batched
windows. The backends (onnxruntime, TensorRT) run the same code, so these pin what every backend computes.

Bounds: rows of a padded batch equal the row alone within 1e-5 (measured ~1e-6: GEMM blocking only); padding
that leaks gives differences of order 0.1-1.
"""

import numpy as np
import pytest
import torch

from moss_speech.builders.codec import ready_windows
from moss_speech.builders.codec.flow import PaddedFlowEncoder, cfm_solve

ATOL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on shared cores a second spinning thread makes these many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def maxdiff(a, b) -> float:
    return float((a.double() - b.double()).abs().max())


@pytest.fixture(scope="module")
def tokens():
    lengths = [41, 23, 57, 9]  # crosses the 25-token attention chunk; one row shorter than a chunk
    t = torch.randint(0, 16384, (len(lengths), max(lengths)), generator=torch.Generator().manual_seed(0))
    for b, n in enumerate(lengths):
        t[b, n:] = 0
    return t, torch.tensor(lengths)


@pytest.mark.parametrize("chunked", [True, False])
@torch.inference_mode()
def test_padded_flow_encoder_rows_equal_unpadded(codec, tokens, chunked):
    t, lengths = tokens
    with codec.flow.attention(chunked=chunked):
        got = PaddedFlowEncoder(codec.flow)(t, lengths)
        for b, n in enumerate(lengths.tolist()):
            alone = codec.flow.encode(t[b : b + 1, :n], torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 3))
            assert maxdiff(got[b, :, : 4 * n], alone[0]) <= ATOL
        leaky = codec.flow.encode(t, lengths=torch.full_like(lengths, t.shape[1]))  # padding not masked
        assert maxdiff(leaky[1, :, : 4 * 23], got[1, :, : 4 * 23]) > 100 * ATOL


@torch.inference_mode()
def test_no_lookahead_is_the_zero_lookahead(codec, tokens):
    t = tokens[0][:1]
    want = codec.flow.encode(t, torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 3))
    assert torch.equal(codec.flow.encode(t), want)
    assert torch.equal(codec.flow.encode(t, lengths=torch.tensor([t.shape[1]])), want)


@torch.inference_mode()
def test_cfm_solve_batched_rows_equal_rows_alone(codec):
    g = torch.Generator().manual_seed(1)
    frames = [108, 64]  # > the 100-frame estimator chunk, and a padded row
    mu, cond, z = (torch.randn(2, 80, max(frames), generator=g) for _ in range(3))
    spks = torch.randn(2, 80, generator=g)
    mask = (torch.arange(max(frames))[None, :] < torch.tensor(frames)[:, None]).float()[:, None, :]
    estimator, cfm = codec.flow.decoder.estimator, codec.flow_yaml.flow.cfm_params
    both = cfm_solve(estimator, cfm, mu, mask, spks, cond, z)
    for b, n in enumerate(frames):
        row = (x[b : b + 1, :, :n] for x in (mu, mask, cond, z))
        m, k, c, zz = row
        alone = cfm_solve(estimator, cfm, m, k, spks[b : b + 1], c, zz)
        assert maxdiff(both[b, :, :n], alone[0]) <= 10 * ATOL  # ten Euler steps of the bound above


def test_decode_windows_batched_equals_one_by_one(codec):
    codes = [int(c) for c in np.random.default_rng(3).integers(0, 16384, 14)]
    windows = ready_windows(codes, 0, True, codec.streaming)  # chunks of 5, 5, 4: three lengths
    assert len({len(w.tokens) for w in windows}) > 1  # several HiFT groups and padded flow rows
    batched = codec.decode_windows(windows)
    for w, pcm in zip(windows, batched, strict=True):
        single = codec.decode_chunk(w)
        assert pcm.shape == single.shape == (w.n_chunk * 1920,)
        assert np.abs(pcm - single).max() <= ATOL and np.abs(single).max() > 1e-3
