"""Flow-matching decoder (CosyVoice2 `CausalMaskedDiffWithXvec` + `CausalConditionalCFM`): tokens -> mel.

Exportable pieces (no randomness inside, no data-dependent branches):
  * `PaddedFlowEncoder(flow)(tokens, lengths)` -> mu [B, 80, 4T]                 (the "flow encoder" graph)
  * `FlowModel.decoder.estimator(x, mask, mu, t, spks, cond)` -> velocity        (the "estimator" graph)
The Euler loop with classifier-free guidance runs around the estimator (`cfm_solve`, which takes the estimator
as a callable so every backend runs the same loop), with the starting noise taken from the reference's fixed
buffer (seed 0, 15000 frames) at absolute mel positions (`noise_at`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from moss_speech.builders.codec.config import (
    FLOW_DIR,
    FLOW_NOISE_FRAMES,
    FLOW_NOISE_SEED,
    FLOW_WEIGHTS_NAMES,
    CfmConfig,
    FlowConfig,
)
from moss_speech.builders.codec.estimator import CausalConditionalDecoder
from moss_speech.builders.codec.flow_encoder import UpsampleConformerEncoder
from moss_speech.builders.codec.weights import CheckpointError, load_into, read_torch_state


@lru_cache(maxsize=1)
def flow_noise(mels: int = 80) -> torch.Tensor:
    """The reference's noise buffer: torch.manual_seed(0); torch.randn(1, 80, 15000)."""
    g = torch.Generator().manual_seed(FLOW_NOISE_SEED)
    return torch.randn(1, mels, FLOW_NOISE_FRAMES, generator=g)


def noise_at(frames: torch.Tensor, mels: int = 80) -> torch.Tensor:
    """Noise for absolute mel frame indices [T] -> [1, mels, T] (wraps after 15000 frames = 300 s)."""
    return flow_noise(mels)[:, :, frames % FLOW_NOISE_FRAMES]


class CFM(nn.Module):
    def __init__(self, cfg: FlowConfig, chunk_frames: int):
        super().__init__()
        self.estimator = CausalConditionalDecoder(cfg.estimator, chunk_frames)


class FlowModel(nn.Module):
    def __init__(self, cfg: FlowConfig, chunked: bool = True):
        super().__init__()
        self.cfg = cfg
        self.input_embedding = nn.Embedding(cfg.vocab_size, cfg.input_size)
        self.spk_embed_affine_layer = nn.Linear(cfg.spk_embed_dim, cfg.output_size)
        self.encoder = UpsampleConformerEncoder(cfg.encoder, cfg.pre_lookahead_len)
        self.encoder_proj = nn.Linear(cfg.encoder.output_size, cfg.output_size)
        self.chunked = chunked
        self.decoder = CFM(cfg, cfg.estimator.static_chunk_size if chunked else 0)

    @contextmanager
    def attention(self, chunked: bool) -> Iterator[None]:
        """Run with chunk-causal attention (the reference's streaming mode) or full attention (its offline
        mode: `token2wav(stream=False)` calls `flow.inference(streaming=False)`)."""
        saved = self.chunked, self.decoder.estimator.chunk
        self.chunked = chunked
        self.decoder.estimator.chunk = self.cfg.estimator.static_chunk_size if chunked else 0
        try:
            yield
        finally:
            self.chunked, self.decoder.estimator.chunk = saved

    def speaker(self, xvector: torch.Tensor) -> torch.Tensor:
        """x-vector [B, 192] -> [B, 80]."""
        return project_speaker(xvector, self.spk_embed_affine_layer.weight, self.spk_embed_affine_layer.bias)

    def encode(
        self,
        tokens: torch.Tensor,
        lookahead: torch.Tensor | None = None,
        lookahead_mask: torch.Tensor | None = None,
        lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tokens [B, T] (prompt + window), lookahead [B, L] with mask [B, L] (0 = end of speech; None: no
        lookahead, as past a window's last token) -> mu [B, 80, rT]. `lengths` [B]: rows are right-padded to T
        and row b's first r*lengths[b] frames equal its unpadded encoding."""
        x = self.input_embedding(tokens.clamp(min=0))
        ctx = mask = valid = None
        if lookahead is not None:
            ctx = self.input_embedding(lookahead.clamp(min=0))
            mask = lookahead_mask.unsqueeze(-1).to(x.dtype)
        if lengths is not None:
            valid = torch.arange(tokens.shape[1], device=tokens.device)[None, :] < lengths[:, None]
        h = self.encoder(x, ctx, mask, self.chunked, valid)
        return self.encoder_proj(h).transpose(1, 2)

    @classmethod
    def from_dir(cls, codec_dir: Path, cfg: FlowConfig, chunk: int = 0, chunked: bool = True) -> FlowModel:
        """Load flow.pt (chunk 0) or flow-chunk-{5,25}.pt. Non-strict like the reference: keys the network
        does not
        use are ignored (returned in `ignored_keys`); missing or mis-shaped keys fail."""
        if chunk not in FLOW_WEIGHTS_NAMES:
            raise CheckpointError(f"no flow checkpoint for chunk size {chunk}; have {sorted(FLOW_WEIGHTS_NAMES)}")
        name = FLOW_WEIGHTS_NAMES[chunk]
        model = cls(cfg, chunked=chunked)
        state = read_torch_state(codec_dir / FLOW_DIR / name)
        model.ignored_keys = load_into(model, state, f"{FLOW_DIR}/{name}", strict_unexpected=False)
        return model.eval()


class PaddedFlowEncoder(nn.Module):
    """The flow-encoder graph: tokens [B, T] (prompt + window, right-padded), lengths [B] -> mu [B, 80, rT].

    A module of its own so it exports with exactly these two inputs; the attention mode (chunk-causal or full)
    is the wrapped flow's (`FlowModel.attention`).
    """

    def __init__(self, flow: FlowModel):
        super().__init__()
        self.flow = flow

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.flow.encode(tokens, lengths=lengths)


def project_speaker(xvector: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x-vector [B, 192] -> speaker embedding [B, 80]: L2-normalised, then the flow's affine layer."""
    return F.linear(F.normalize(xvector, dim=1), weight, bias)


def time_span(cfm: CfmConfig, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The n_timesteps + 1 solver times in [0, 1] (cosine schedule as the reference)."""
    t_span = torch.linspace(0, 1, cfm.n_timesteps + 1, dtype=dtype)
    return 1 - torch.cos(t_span * 0.5 * torch.pi) if cfm.t_scheduler == "cosine" else t_span


Estimator = Callable[..., torch.Tensor]  # (x, mask, mu, t, spks, cond) -> velocity, any backend


def cfm_solve(
    estimator: Estimator,
    cfm: CfmConfig,
    mu: torch.Tensor,
    mask: torch.Tensor,
    spks: torch.Tensor,
    cond: torch.Tensor,
    z: torch.Tensor,
) -> torch.Tensor:
    """Euler ODE from noise z to mel with classifier-free guidance, over a batch of right-padded rows.

    mu, cond, z [B, 80, T]; mask [B, 1, T] (1 = real frame); spks [B, 80]. CFG runs as one doubled estimator
    batch whose second half is unconditional (mu, speaker and cond zeroed), as the reference does.
    """
    n = mu.shape[0]
    t_span = time_span(cfm, mu.dtype)
    mask2 = torch.cat([mask, mask])
    mu2 = torch.cat([mu, torch.zeros_like(mu)])
    spks2 = torch.cat([spks, torch.zeros_like(spks)])
    cond2 = torch.cat([cond, torch.zeros_like(cond)])
    w = cfm.inference_cfg_rate
    x, t = z, t_span[0]
    for step in range(1, len(t_span)):
        dt = t_span[step] - t
        v = estimator(torch.cat([x, x]), mask2, mu2, t.expand(2 * n), spks2, cond2)
        x = x + dt * ((1.0 + w) * v[:n] - w * v[n:])
        t = t + dt
    return x
