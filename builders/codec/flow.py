"""Flow-matching decoder (CosyVoice2 `CausalMaskedDiffWithXvec` + `CausalConditionalCFM`): tokens -> mel.

Exportable pieces (no randomness inside, no data-dependent branches):
  * `FlowModel.encode(tokens, lookahead, lookahead_mask)` -> mu [B, 80, 4T]      (the "flow encoder" graph)
  * `FlowModel.decoder.estimator(x, mask, mu, t, spks, cond)` -> velocity        (the "estimator" graph)
The Euler loop with classifier-free guidance runs around the estimator (`solve`), with the starting noise
taken from the reference's fixed buffer (seed 0, 15000 frames) at absolute mel positions.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from moss_speech.builders.codec.config import FLOW_DIR, FLOW_NOISE_FRAMES, FLOW_NOISE_SEED, FLOW_WEIGHTS_NAMES, FlowConfig
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
        return self.spk_embed_affine_layer(F.normalize(xvector, dim=1))

    def encode(
        self, tokens: torch.Tensor, lookahead: torch.Tensor, lookahead_mask: torch.Tensor
    ) -> torch.Tensor:
        """tokens [B, T] (prompt + window), lookahead [B, L] with mask [B, L] (0 = end of speech) -> mu [B,
        80, rT]."""
        x = self.input_embedding(tokens.clamp(min=0))
        ctx = self.input_embedding(lookahead.clamp(min=0))
        h = self.encoder(x, ctx, lookahead_mask.unsqueeze(-1).to(x.dtype), self.chunked)
        return self.encoder_proj(h).transpose(1, 2)

    @torch.inference_mode()
    def solve(
        self, mu: torch.Tensor, spks: torch.Tensor, cond: torch.Tensor, z: torch.Tensor
    ) -> torch.Tensor:
        """Euler ODE from noise z to mel with classifier-free guidance; all [1, 80, T] except spks [1, 80]."""
        cfm = self.cfg.cfm_params
        n = cfm.n_timesteps
        t_span = torch.linspace(0, 1, n + 1, dtype=mu.dtype)
        if cfm.t_scheduler == "cosine":
            t_span = 1 - torch.cos(t_span * 0.5 * torch.pi)
        mask = torch.ones(2, 1, mu.shape[-1], dtype=mu.dtype)
        mu2 = torch.cat([mu, torch.zeros_like(mu)])  # second row: unconditional (mu, speaker, cond zeroed)
        spks2 = torch.cat([spks, torch.zeros_like(spks)])
        cond2 = torch.cat([cond, torch.zeros_like(cond)])
        x, t = z, t_span[0]
        w = cfm.inference_cfg_rate
        for step in range(1, n + 1):
            dt = t_span[step] - t
            v = self.decoder.estimator(torch.cat([x, x]), mask, mu2, t.expand(2), spks2, cond2)
            x = x + dt * ((1.0 + w) * v[:1] - w * v[1:])
            t = t + dt
        return x

    @classmethod
    def from_dir(cls, codec_dir: Path, cfg: FlowConfig, chunk: int = 0, chunked: bool = True) -> FlowModel:
        """Load flow.pt (chunk 0) or flow-chunk-{5,25}.pt. Non-strict like the reference: keys the network
        does not
        use are ignored (returned in `ignored_keys`); missing or mis-shaped keys fail."""
        if chunk not in FLOW_WEIGHTS_NAMES:
            raise CheckpointError(
                f"no flow checkpoint for chunk size {chunk}; have {sorted(FLOW_WEIGHTS_NAMES)}"
            )
        name = FLOW_WEIGHTS_NAMES[chunk]
        model = cls(cfg, chunked=chunked)
        state = read_torch_state(codec_dir / FLOW_DIR / name)
        model.ignored_keys = load_into(model, state, f"{FLOW_DIR}/{name}", strict_unexpected=False)
        return model.eval()
