"""Training samples on the 2-channel grid, loss targets per modality, packing and deterministic shuffling.

Samples are built with the serving `PromptBuilder`: the prompt is exactly what serving feeds the model
(`build(turns, output)`, reply prefix included) and the answer rows are appended after it, so training and
serving share one prompt format.

Targets are next-row prediction: row t's text head predicts row t+1's text token and its audio head row t+1's
audio token. Only rows t+1 inside the final assistant answer are targets (the first answer row through its
<|im_end|>; the trailing "\\n" and everything before the answer are context only). Per modality, following
the generation state machine:
  * target row is an audio row (text channel = modality pad): audio loss only. In audio mode generation forces
    the text channel to the pad, so a text loss there would train a prediction that is never used.
  * target row is a text row: text loss only. In text mode the sampled audio token is ignored as input, and a
    text row's audio channel is the 512 filler.
So a spoken answer trains: text head -> SOSP (when SOSP is part of the answer), audio head -> codes and EOSP,
text head -> <|im_end|> after EOSP.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from moss_speech.builders.llm.prompt import PromptBuilder, Turn

IGNORE = -100


@dataclass(frozen=True)
class Sample:
    grid: torch.Tensor  # [L, 2] long
    answer_start: int  # first target row (the first answer row)
    answer_end: int  # last target row (the answer's <|im_end|>)
    kind: str = ""  # "t2t", "s2t", "t2s", "s2s" (for logs and mixing)

    def targets(self, modality_pad: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(text_targets, audio_targets), each [L], IGNORE where no loss. Index t holds row t+1's token."""
        n = self.grid.shape[0]
        text_t = torch.full((n,), IGNORE, dtype=torch.long)
        audio_t = torch.full((n,), IGNORE, dtype=torch.long)
        nxt = self.grid[self.answer_start : self.answer_end + 1]  # target rows
        is_audio = nxt[:, 0] == modality_pad
        src = slice(self.answer_start - 1, self.answer_end)  # rows that predict them
        text_t[src] = torch.where(is_audio, IGNORE, nxt[:, 0])
        audio_t[src] = torch.where(is_audio, nxt[:, 1], IGNORE)
        return text_t, audio_t


def make_sample(
    builder: PromptBuilder,
    turns: Sequence[Turn],
    answer_text: str | None = None,
    answer_codes: Sequence[int] | None = None,
    system_prompt: str | None = None,
) -> Sample:
    """A conversation (`turns`, user and earlier turns) plus the assistant answer to learn, as text or codes."""
    if (answer_text is None) == (answer_codes is None):
        raise ValueError("give exactly one of answer_text, answer_codes")
    output = "text" if answer_text is not None else "speech"
    prompt = builder.build(turns, output, system_prompt=system_prompt)
    im_end = builder.encode("<|im_end|>")
    if output == "text":
        answer = builder.text_rows(builder.encode(f"{answer_text}<|im_end|>\n"))
    else:
        # The serving prefix already ends with the [SOSP, 512] row: the answer starts with the first code.
        body = builder.audio_rows(answer_codes)[1:]
        answer = torch.cat([body, builder.text_rows(builder.encode("<|im_end|>\n"))])
    grid = torch.cat([prompt, answer])
    ends = (answer[:, 0] == im_end[0]).nonzero()
    if len(im_end) != 1 or len(ends) == 0:
        raise ValueError("the answer has no <|im_end|> row")
    user_kind = "s" if any(t.codes is not None for t in turns) else "t"
    return Sample(grid, prompt.shape[0], prompt.shape[0] + int(ends[-1]), f"{user_kind}2{output[0]}")


@dataclass
class Batch:
    grid: torch.Tensor  # [B, S, 2]
    positions: torch.Tensor  # [B, S], restart at 0 in every packed sample (as each would be served alone)
    doc: torch.Tensor  # [B, S] sample index inside its sequence; -1 for padding rows
    text_targets: torch.Tensor  # [B, S]
    audio_targets: torch.Tensor  # [B, S]

    @property
    def n_targets(self) -> int:
        return int((self.text_targets != IGNORE).sum() + (self.audio_targets != IGNORE).sum())


def pack(samples: Sequence[Sample], seq_len: int, modality_pad: int, pad_row: tuple[int, int]) -> list[Batch]:
    """Greedy packing in the given order: a sample goes into the current sequence if it fits, else it starts a
    new one. Samples never attend to each other (the trainer masks attention by `doc`). Returns one [1, S]
    Batch per packed sequence."""
    seqs: list[list[Sample]] = []
    used = seq_len
    for s in samples:
        n = s.grid.shape[0]
        if n > seq_len:
            raise ValueError(f"a {s.kind} sample of {n} rows does not fit seq_len {seq_len}")
        if used + n > seq_len:
            seqs.append([])
            used = 0
        seqs[-1].append(s)
        used += n
    out = []
    for seq in seqs:
        grid = torch.tensor(pad_row, dtype=torch.long).repeat(seq_len, 1)
        pos = torch.zeros(seq_len, dtype=torch.long)
        doc = torch.full((seq_len,), -1, dtype=torch.long)
        tt = torch.full((seq_len,), IGNORE, dtype=torch.long)
        at = torch.full((seq_len,), IGNORE, dtype=torch.long)
        at_row = 0
        for i, s in enumerate(seq):
            n = s.grid.shape[0]
            grid[at_row : at_row + n] = s.grid
            pos[at_row : at_row + n] = torch.arange(n)
            doc[at_row : at_row + n] = i
            tt[at_row : at_row + n], at[at_row : at_row + n] = s.targets(modality_pad)
            at_row += n
        out.append(Batch(grid[None], pos[None], doc[None], tt[None], at[None]))
    return out


def collate(items: Sequence[Batch]) -> Batch:
    return Batch(
        *(
            torch.cat([getattr(b, f) for b in items])
            for f in ("grid", "positions", "doc", "text_targets", "audio_targets")
        )
    )


def epoch_samples(sources: dict[str, list[Sample]], weights: dict[str, float], seed: int, epoch: int) -> list[Sample]:
    """One epoch of a stage's mixture, shuffled. A weight w repeats every sample floor(w) times and adds a seeded
    subset for the fraction. Depends only on (seed, epoch), so a resumed run sees the same order."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    pool: list[Sample] = []
    for name in sorted(weights):
        items, w = sources[name], weights[name]
        pool += list(items) * int(w)
        extra = math.floor((w - int(w)) * len(items) + 0.5)
        if extra:
            pool += [items[i] for i in torch.randperm(len(items), generator=gen)[:extra].tolist()]
    return [pool[i] for i in torch.randperm(len(pool), generator=gen).tolist()]


class BatchStream:
    """Deterministic stream of batches for one stage: epoch e = shuffle(seed, e), packed, cut into batches
    (a short last batch is dropped; batches never straddle epochs). `batch(step)` is a pure function of step,
    which is what makes resuming exact."""

    def __init__(
        self,
        sources: dict[str, list[Sample]],
        weights: dict[str, float],
        seed: int,
        batch_size: int,
        seq_len: int,
        modality_pad: int,
        pad_row: tuple[int, int],
    ):
        self.sources, self.weights, self.seed = sources, weights, seed
        self.batch_size, self.seq_len, self.modality_pad, self.pad_row = batch_size, seq_len, modality_pad, pad_row
        self._counts: list[int] = []  # batches per epoch, filled as epochs are packed
        self._cached: tuple[int, list[Batch]] | None = None  # only the current epoch is kept

    def _packed(self, e: int) -> list[Batch]:
        if self._cached is None or self._cached[0] != e:
            samples = epoch_samples(self.sources, self.weights, self.seed, e)
            self._cached = (e, pack(samples, self.seq_len, self.modality_pad, self.pad_row))
        return self._cached[1]

    def _count(self, e: int) -> int:
        while len(self._counts) <= e:
            n = len(self._packed(len(self._counts))) // self.batch_size
            if n == 0:
                raise ValueError(f"one epoch packs into fewer than batch_size={self.batch_size} sequences")
            self._counts.append(n)
        return self._counts[e]

    def batch(self, step: int) -> Batch:
        e, first = 0, 0
        while step >= first + self._count(e):
            first += self._count(e)
            e += 1
        i = step - first
        return collate(self._packed(e)[i * self.batch_size : (i + 1) * self.batch_size])


def load_jsonl(
    path: Path, builder: PromptBuilder, encode_audio: Callable[[Path], Sequence[int]] | None = None
) -> list[Sample]:
    """Samples from a JSONL file, one conversation a line:
    {"turns": [{"role": "user", "text": "..."} | {"role": "user", "codes": [..]} | {"role": "user", "audio": "q.wav"}],
     "answer": {"text": "..."} | {"codes": [..]} | {"audio": "a.wav"}, "system": "optional system prompt"}
    Audio paths are relative to the JSONL file and encoded to codes with `encode_audio` (the speech encoder)."""

    def codes_of(item: dict, where: str) -> Sequence[int] | None:
        if "audio" in item:
            if encode_audio is None:
                raise ValueError(f"{where}: names an audio file but no codec is configured")
            return [int(c) for c in encode_audio(path.parent / item["audio"])]
        return item.get("codes")

    samples = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            row = json.loads(line)
            turns = [Turn(t["role"], text=t.get("text"), codes=codes_of(t, where)) for t in row["turns"]]
            ans = row["answer"]
            samples.append(
                make_sample(
                    builder,
                    turns,
                    answer_text=ans.get("text"),
                    answer_codes=codes_of(ans, where),
                    system_prompt=row.get("system"),
                )
            )
        except (KeyError, TypeError, ValueError, json.JSONDecodeError) as e:
            raise ValueError(f"{where}: bad sample ({e})") from e
    if not samples:
        raise ValueError(f"{path}: no samples")
    return samples
