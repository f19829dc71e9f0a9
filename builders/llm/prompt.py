"""The 2-channel prompt grid: each row is (text token, audio token).

Text rows carry the audio pad (512 in the real checkpoint) in the audio channel. An audio turn of n codes is
n + 2 rows: text channel [SOSP, modality pad x (n+1)], audio channel [audio pad, codes..., EOSP]. Turns are wrapped
as `<|im_start|>{role}\\n ... <|im_end|>\\n`; the reply prefix is `<|im_start|>assistant\\n`, plus a
[SOSP, audio pad] row when the answer is spoken. Every id comes from the checkpoint (`SpecialTokens`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from tokenizers import Tokenizer

from moss_speech.builders.config import MossSpeechConfig
from moss_speech.builders.llm.tokenizer import load_tokenizer
from moss_speech.builders.llm.tokens import SpecialTokens

Modality = Literal["speech", "text"]

# The reference's default system prompts, by output modality.
DEFAULT_SYSTEM_PROMPTS: dict[str, str] = {
    "speech": "You are a helpful assistant. Respond with spoken outputs.",
    "text": "You are a helpful assistant. Respond with text outputs.",
}
# Text the reference decoder substitutes for two MOSS tokens.
TEXT_REPLACEMENTS = {"<|empty|>": ".", "<|end_empty|>": ":"}


@dataclass(frozen=True)
class Turn:
    """One conversation turn: text, speech codes, or raw grid rows (e.g. a generated answer)."""

    role: str
    text: str | None = None
    codes: Sequence[int] | None = None
    rows: torch.Tensor | None = None  # [n, 2], used verbatim between the turn's header and <|im_end|>

    def __post_init__(self):
        given = sum(x is not None for x in (self.text, self.codes, self.rows))
        if given != 1:
            raise ValueError(f"a turn has exactly one of text, codes, rows (got {given})")


class PromptBuilder:
    def __init__(self, tokenizer: Tokenizer, config: MossSpeechConfig, tokens: SpecialTokens | None = None):
        self.tokenizer = tokenizer
        self.cfg = config
        # None: chat markers from this tokenizer, stop ids from config.json (no generation_config.json at hand)
        self.tokens = tokens or SpecialTokens.from_parts(config, tokenizer)

    @classmethod
    def from_dir(
        cls, path: str | Path, config: MossSpeechConfig | None = None, tokens: SpecialTokens | None = None
    ) -> PromptBuilder:
        tokenizer = load_tokenizer(path)
        config = config or MossSpeechConfig.from_dir(path)
        return cls(tokenizer, config, tokens or SpecialTokens.from_dir(path, config, tokenizer))

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def text_rows(self, ids: Sequence[int]) -> torch.Tensor:
        ids_t = torch.as_tensor(list(ids), dtype=torch.long)
        return torch.stack([ids_t, torch.full_like(ids_t, self.tokens.audio_pad_id)], dim=-1)

    def audio_rows(self, codes: Sequence[int]) -> torch.Tensor:
        tok = self.tokens
        codes = [int(c) for c in codes]
        if any(not 0 <= c < tok.eosp_id for c in codes):
            raise ValueError(f"speech codes must be in [0, {tok.eosp_id})")
        n = len(codes)
        text = [tok.sosp_id] + [tok.modality_pad_id] * (n + 1)
        audio = [tok.audio_pad_id] + codes + [tok.eosp_id]
        return torch.tensor([text, audio], dtype=torch.long).T.contiguous()

    def turn_rows(self, turn: Turn) -> torch.Tensor:
        if turn.text is not None:  # one encode call for the whole wrapped turn, as a chat template does
            return self.text_rows(self.encode(f"<|im_start|>{turn.role}\n{turn.text}<|im_end|>\n"))
        body = self.audio_rows(turn.codes) if turn.codes is not None else turn.rows
        head = self.text_rows(self.encode(f"<|im_start|>{turn.role}\n"))
        tail = self.text_rows(self.encode("<|im_end|>\n"))
        return torch.cat([head, body.to(torch.long), tail])

    def reply_prefix(self, output: Modality) -> torch.Tensor:
        rows = self.text_rows(self.encode("<|im_start|>assistant\n"))
        if output == "speech":
            rows = torch.cat([rows, self.text_rows([self.tokens.sosp_id])])
        return rows

    def build(
        self,
        turns: Sequence[Turn],
        output: Modality,
        system_prompt: str | None = None,
        reference_system_order: bool = True,
    ) -> torch.Tensor:
        """Prompt grid [L, 2] for `turns` followed by the reply prefix.

        With no system turn and no `system_prompt`, the default system prompt for `output` is used; the
        reference appends that default *after* the conversation (a quirk kept for exact compatibility unless
        `reference_system_order=False`). An explicit `system_prompt` goes first.
        """
        if output not in DEFAULT_SYSTEM_PROMPTS:
            raise ValueError(f"output modality must be 'speech' or 'text', got {output!r}")
        turns = list(turns)
        has_system = any(t.role == "system" for t in turns)
        if system_prompt is not None:
            turns.insert(0, Turn("system", text=system_prompt))
        elif not has_system:
            default = Turn("system", text=DEFAULT_SYSTEM_PROMPTS[output])
            turns = turns + [default] if reference_system_order else [default] + turns
        parts = [self.turn_rows(t) for t in turns] + [self.reply_prefix(output)]
        return torch.cat(parts)

    def continue_conversation(
        self, history: torch.Tensor | None, turn: Turn, output: Modality, system_prompt: str | None = None
    ) -> torch.Tensor:
        """Prompt for one more turn after `history` (rows of earlier exchanges, see `exchange_rows`).

        Same rules as `build`: an explicit system prompt goes first, otherwise the default one is appended after
        the conversation, as the reference does.
        """
        if output not in DEFAULT_SYSTEM_PROMPTS:
            raise ValueError(f"output modality must be 'speech' or 'text', got {output!r}")
        parts = []
        if system_prompt is not None:
            parts.append(self.turn_rows(Turn("system", text=system_prompt)))
        if history is not None and history.numel():
            if history.ndim != 2 or history.shape[1] != 2:
                raise ValueError(f"history rows must be [n, 2], got {list(history.shape)}")
            parts.append(history.to(torch.long))
        parts.append(self.turn_rows(turn))
        if system_prompt is None:
            parts.append(self.turn_rows(Turn("system", text=DEFAULT_SYSTEM_PROMPTS[output])))
        parts.append(self.reply_prefix(output))
        return torch.cat(parts)

    def exchange_rows(self, turn: Turn, output: Modality, generated: torch.Tensor) -> torch.Tensor:
        """History rows of one finished exchange: the user turn, then the assistant turn (reply prefix, the
        generated rows, closed with <|im_end|> if generation stopped early, and the turn's newline)."""
        rows = [self.turn_rows(turn), self.reply_prefix(output), generated.to(torch.long)]
        closed = generated.numel() and int(generated[-1, 0]) == self.tokens.im_end_id
        rows.append(self.text_rows(self.encode("\n" if closed else "<|im_end|>\n")))
        return torch.cat(rows)

    def decode_text(self, ids: Sequence[int]) -> str:
        """Text of generated text-channel tokens (pads, SOSP and the chat markers dropped)."""
        skip = self.tokens.text_markers
        text = self.tokenizer.decode([int(i) for i in ids if int(i) not in skip], skip_special_tokens=False)
        for token, replacement in TEXT_REPLACEMENTS.items():
            text = text.replace(token, replacement)
        return text
