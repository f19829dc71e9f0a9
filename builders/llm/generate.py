"""Generation: the modality state machine, sampling, and a streaming iterator over decode steps.

Per sequence, step k = 1..max_new_tokens:
  before the forward   text mode and last text == SOSP -> audio; then audio mode and last audio == EOSP -> text
  after the forward    audio logits >= EOSP+1 -> -inf; EOSP -> -inf while k < min_new_tokens;
                       repetition penalty per channel over that channel's whole history (prompt included);
                       temperature -> top-k -> top-p; both heads sampled every step
  the new row          audio mode writes the modality pad in the text channel (so <|im_end|> cannot stop it)
  stop                 the row's text is a stop id (the row stays in the output)
Every id (SOSP, EOSP, pads, stop ids) comes from the checkpoint through `SpecialTokens`.
`SequenceState` holds all of that for one sequence, so any batching scheme (the in-process batch below, the
Triton continuous-batching scheduler) drives the same rules.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from moss_speech.builders.config import MossSpeechConfig
from moss_speech.builders.llm.kv import StaticKVCache
from moss_speech.builders.llm.model import MossSpeechForCausalLM
from moss_speech.builders.llm.tokens import SpecialTokens
from moss_speech.contract.sampling import SamplingParams

Mode = Literal["text", "audio"]


@dataclass(frozen=True)
class Step:
    """One generated row. `mode` is the modality in effect for this step."""

    index: int  # 1-based step k
    mode: Mode
    text_token: int
    audio_token: int
    finished: bool
    stop_reason: str | None = None  # "stop_token" | "max_new_tokens" | "context"


def initial_mode(last_row: Sequence[int], tokens: SpecialTokens) -> Mode:
    if last_row[0] == tokens.modality_pad_id:
        return "audio"
    return "text"  # an audio channel holding the audio pad means a text row; the text rule above wins


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """HF rule on the tokens seen so far: negative logits are multiplied by p, others divided."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """One token from 1-D logits: greedy argmax, or temperature -> top-k -> top-p -> multinomial."""
    if not params.do_sample:
        return int(torch.argmax(logits))
    logits = logits / params.temperature
    if 0 < params.top_k < logits.numel():
        # Ties at the k-th value are kept (as HF does): the candidate set is every logit >= that value.
        kth = torch.topk(logits, params.top_k).values[-1]
        candidates = torch.nonzero(logits >= kth).squeeze(-1)
    else:
        candidates = torch.nonzero(logits > float("-inf")).squeeze(-1)
    sub = logits[candidates]
    if params.top_p < 1.0:
        # HF: sort ascending, drop tokens whose cumulative probability is <= 1 - top_p, keep the top one.
        order = torch.argsort(sub)
        cum = torch.softmax(sub[order], dim=-1).cumsum(-1)
        drop = cum <= 1 - params.top_p
        drop[-1] = False
        sub = sub.clone()
        sub[order[drop]] = float("-inf")
    probs = torch.softmax(sub.float(), dim=-1)
    return int(candidates[torch.multinomial(probs, 1, generator=generator)])


@dataclass
class SequenceState:
    """Everything one sequence's generation needs between steps."""

    prompt: torch.Tensor  # [L, 2]
    params: SamplingParams
    cfg: MossSpeechConfig
    tokens: SpecialTokens | None = None  # the checkpoint's ids; None: from config.json alone
    mode: Mode = "text"
    step: int = 0
    last_row: tuple[int, int] = (0, 0)
    finished: bool = False
    stop_reason: str | None = None
    rows: list[tuple[int, int]] = field(default_factory=list)
    generator: torch.Generator = field(default_factory=torch.Generator)
    text_seen: torch.Tensor | None = None
    audio_seen: torch.Tensor | None = None

    def __post_init__(self):
        if self.prompt.ndim != 2 or self.prompt.shape[1] != 2 or self.prompt.shape[0] == 0:
            raise ValueError(f"a prompt grid is [length >= 1, 2], got {list(self.prompt.shape)}")
        if self.tokens is None:
            self.tokens = SpecialTokens.from_config(self.cfg)
        self.last_row = (int(self.prompt[-1, 0]), int(self.prompt[-1, 1]))
        self.mode = initial_mode(self.last_row, self.tokens)
        seed = self.params.seed if self.params.seed is not None else int.from_bytes(os.urandom(7), "little")
        self.generator.manual_seed(seed)
        if self.params.repetition_penalty != 1.0:
            self.text_seen = torch.zeros(self.cfg.vocab_size, dtype=torch.bool)
            self.audio_seen = torch.zeros(self.cfg.audio_vocab_size, dtype=torch.bool)
            self.text_seen[self.prompt[:, 0].clamp(0, self.cfg.vocab_size - 1)] = True
            self.audio_seen[self.prompt[:, 1].clamp(0, self.cfg.audio_vocab_size - 1)] = True

    def begin_step(self) -> None:
        """Advance k and apply the mode switches that happen before the forward."""
        self.step += 1
        if self.mode == "text" and self.last_row[0] == self.tokens.sosp_id:
            self.mode = "audio"
        if self.mode == "audio" and self.last_row[1] == self.tokens.eosp_id:
            self.mode = "text"

    def choose(self, text_logits: torch.Tensor, audio_logits: torch.Tensor, context_left: int | None = None) -> Step:
        """Pick this step's row from the last-position logits of both heads (1-D each)."""
        tok, p = self.tokens, self.params
        text_logits, audio_logits = text_logits.float(), audio_logits.float().clone()
        audio_logits[tok.audio_code_limit :] = float("-inf")
        if self.step < p.min_new_tokens:
            audio_logits[tok.eosp_id] = float("-inf")
        if self.text_seen is not None:
            text_logits = apply_repetition_penalty(text_logits, self.text_seen, p.repetition_penalty)
            audio_logits = apply_repetition_penalty(audio_logits, self.audio_seen, p.repetition_penalty)
        text = sample_token(text_logits, p, self.generator)
        audio = sample_token(audio_logits, p, self.generator)
        if self.mode == "audio":
            text = tok.modality_pad_id
        self.last_row = (text, audio)
        self.rows.append(self.last_row)
        if self.text_seen is not None:
            self.text_seen[text] = True
            self.audio_seen[audio] = True
        if tok.is_stop(text):
            self.finished, self.stop_reason = True, "stop_token"
        elif self.step >= p.max_new_tokens:
            self.finished, self.stop_reason = True, "max_new_tokens"
        elif context_left is not None and context_left <= 0:
            self.finished, self.stop_reason = True, "context"
        return Step(self.step, self.mode, text, audio, self.finished, self.stop_reason)


@dataclass
class GenerationResult:
    rows: torch.Tensor  # [N, 2] generated rows, the stopping row included
    steps: list[Step]
    stop_reason: str
    prompt_tokens: int
    eosp_token_id: int

    @property
    def text_tokens(self) -> list[int]:
        return [s.text_token for s in self.steps if s.mode == "text"]

    @property
    def speech_codes(self) -> list[int]:
        """Audio-mode codes, EOSP excluded: what the vocoder speaks."""
        return [s.audio_token for s in self.steps if s.mode == "audio" and s.audio_token < self.eosp_token_id]


class ContextLengthError(ValueError):
    pass


def check_context(prompt_len: int, limit: int, what: str = "the model's context") -> None:
    if prompt_len >= limit:
        raise ContextLengthError(
            f"prompt of {prompt_len} tokens does not fit {what} of {limit} tokens "
            f"(at least one token must be generated)"
        )


def left_pad(
    prompts: Sequence[torch.Tensor], cfg: MossSpeechConfig, tokens: SpecialTokens | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, L, 2] grid padded on the left (text pad, audio pad) and the [B, L] attention mask."""
    tokens = tokens or SpecialTokens.from_config(cfg)
    length = max(p.shape[0] for p in prompts)
    grid = torch.empty(len(prompts), length, 2, dtype=torch.long)
    grid[..., 0], grid[..., 1] = tokens.text_pad_id, tokens.audio_pad_id
    mask = torch.zeros(len(prompts), length, dtype=torch.long)
    for i, p in enumerate(prompts):
        grid[i, length - p.shape[0] :] = p
        mask[i, length - p.shape[0] :] = 1
    return grid, mask


@torch.no_grad()
def stream_generate(
    model: MossSpeechForCausalLM,
    prompts: Sequence[torch.Tensor],
    params: SamplingParams | Sequence[SamplingParams],
    tokens: SpecialTokens | None = None,
) -> Iterator[list[Step | None]]:
    """Generate for a batch of prompt grids; yields one list per step with each sequence's new `Step`
    (None once that sequence has finished). Left padding, per-sequence positions and one static KV cache.
    `tokens`: the checkpoint's ids (`SpecialTokens.from_dir`); None reads them from config.json alone."""
    cfg = model.config
    tokens = tokens or SpecialTokens.from_config(cfg)
    params = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
    limit = cfg.max_position_embeddings
    for p in prompts:
        check_context(p.shape[0], limit)
    states = [SequenceState(p.to(torch.long).cpu(), sp, cfg, tokens) for p, sp in zip(prompts, params, strict=True)]
    grid, mask = left_pad([s.prompt for s in states], cfg, tokens)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    steps = min(limit - grid.shape[1], max(s.params.max_new_tokens for s in states))
    cache = StaticKVCache(
        cfg.num_layer_instances,
        len(states),
        cfg.num_key_value_heads,
        grid.shape[1] + steps,
        cfg.head_dim,
        dtype,
        device,
    )
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    inputs, mask = grid.to(device), mask.to(device)
    for _ in range(steps):
        live = [s for s in states if not s.finished]
        for s in live:
            s.begin_step()
        text_logits, audio_logits = model(inputs, positions.to(device), mask, cache, last_only=True)
        out: list[Step | None] = []
        for i, s in enumerate(states):
            if s.finished:
                out.append(None)
                continue
            context_left = limit - (int(mask[i].sum()) + 1)
            out.append(s.choose(text_logits[i].cpu(), audio_logits[i].cpu(), context_left))
        yield out
        if all(s.finished for s in states):
            return
        inputs = torch.tensor([list(s.last_row) for s in states], dtype=torch.long, device=device)[:, None]
        positions = positions[:, -1:] + 1
        mask = torch.cat([mask, torch.ones(len(states), 1, dtype=mask.dtype, device=device)], dim=1)


def generate(
    model: MossSpeechForCausalLM,
    prompts: Sequence[torch.Tensor],
    params: SamplingParams | Sequence[SamplingParams],
    tokens: SpecialTokens | None = None,
) -> list[GenerationResult]:
    per_seq: list[list[Step]] = [[] for _ in prompts]
    for out in stream_generate(model, prompts, params, tokens):
        for i, step in enumerate(out):
            if step is not None:
                per_seq[i].append(step)
    return [
        GenerationResult(
            torch.tensor([[s.text_token, s.audio_token] for s in steps], dtype=torch.long),
            steps,
            steps[-1].stop_reason or "max_new_tokens",
            int(p.shape[0]),
            model.config.eosp_token_id,
        )
        for p, steps in zip(prompts, per_seq, strict=True)
    ]
