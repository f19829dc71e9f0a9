"""The staged trainer: packed forward, per-modality loss, per-stage freezing, resumable checkpoints.

Checkpoints are directories in the real fnlp/MOSS-Speech layout (config.json, safetensors shards, index,
tokenizer files), so `load_model(dir)` strict-loads any of them, plus `trainer_state.pt` (stage, step,
optimizer state, RNG) for resuming. Stage checkpoints are float32 by default so a resumed run repeats an
uninterrupted one exactly; `out/final` is written in the export dtype (bf16, like the released model).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from moss_speech.builders.llm.checkpoint import load_model, save_checkpoint
from moss_speech.builders.llm.model import MossSpeechForCausalLM, rope_tables
from moss_speech.builders.training.config import StageConfig, TrainConfig
from moss_speech.builders.training.data import IGNORE, Batch, BatchStream, Sample
from moss_speech.builders.training.freeze import make_optimizer

STATE_NAME = "trainer_state.pt"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "vocab.json", "merges.txt")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def packed_hidden(
    model: MossSpeechForCausalLM,
    grid: torch.Tensor,
    positions: torch.Tensor,
    doc: torch.Tensor,
    audio_tail: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The model's forward over packed sequences, up to the final norms: the same modules in the same order
    as `MossSpeechForCausalLM.forward`, with a block-diagonal causal mask so packed samples never see each
    other. The audio tail can be skipped when no row has an audio target (the tails are independent)."""
    cfg = model.config
    x = model.embed(grid)
    t = grid.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=grid.device).tril()
    allowed = causal[None] & (doc[:, :, None] == doc[:, None, :])
    mask = torch.where(allowed, 0.0, torch.finfo(x.dtype).min).to(x.dtype)[:, None]
    cos, sin = rope_tables(positions, cfg.head_dim, cfg.rope_theta, x.dtype)
    m = model.model
    h = m.shared_block(x, cos, sin, mask, None)
    text_h = m.text_norm(m.text_block(h, cos, sin, mask, None))
    audio_h = m.audio_norm(m.audio_block(h, cos, sin, mask, None)) if audio_tail else None
    return text_h, audio_h


def compute_loss(model: MossSpeechForCausalLM, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean cross-entropy over all targets of both heads (text targets on the text head, audio targets on the
    audio head). Heads run only on rows that have a target: the 16k-wide audio head is the costly part."""
    text_sel = batch.text_targets != IGNORE
    audio_sel = batch.audio_targets != IGNORE
    n_text, n_audio = int(text_sel.sum()), int(audio_sel.sum())
    text_h, audio_h = packed_hidden(model, batch.grid, batch.positions, batch.doc, audio_tail=n_audio > 0)
    total = text_h.new_zeros((), dtype=torch.float32)
    stats = {"text_targets": n_text, "audio_targets": n_audio}
    if n_text:
        ce = F.cross_entropy(
            model.text_lm_head(text_h[text_sel]).float(), batch.text_targets[text_sel], reduction="sum"
        )
        total = total + ce
        stats["text_loss"] = ce.item() / n_text
    if n_audio:
        ce = F.cross_entropy(
            model.audio_lm_head(audio_h[audio_sel]).float(), batch.audio_targets[audio_sel], reduction="sum"
        )
        total = total + ce
        stats["audio_loss"] = ce.item() / n_audio
    loss = total / max(1, n_text + n_audio)
    stats["loss"] = loss.item()
    return loss, stats


def lr_factor(stage: StageConfig, step: int) -> float:
    if step < stage.warmup_steps:
        return (step + 1) / stage.warmup_steps
    if stage.schedule == "constant":
        return 1.0
    progress = (step - stage.warmup_steps) / max(1, stage.steps - stage.warmup_steps)
    return stage.min_lr_ratio + (1 - stage.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class Trainer:
    def __init__(
        self,
        model: MossSpeechForCausalLM,
        cfg: TrainConfig,
        sources: dict[str, list[Sample]],
        on_stage_end: Callable[[int, StageConfig, MossSpeechForCausalLM], None] | None = None,
        log: Callable[[str], None] = print,
    ):
        self.model, self.cfg, self.sources = model, cfg, sources
        self.on_stage_end, self.log = on_stage_end, log
        self.history: list[dict] = []
        self.start_stage, self.start_step = 0, 0
        self._resume_state: dict | None = None
        mc = model.config
        self.pad_row = (mc.bos_token_id, mc.audio_pad_token_id)  # filler rows after the last packed sample
        torch.manual_seed(cfg.seed)

    # ---- resuming -----------------------------------------------------------------------------------------
    @classmethod
    def resume(cls, ckpt: str | Path, cfg: TrainConfig, sources: dict[str, list[Sample]], **kw) -> Trainer:
        """Continue from a checkpoint directory written by `save`: strict-loaded weights + trainer state."""
        ckpt = Path(ckpt)
        state = torch.load(ckpt / STATE_NAME, weights_only=False)
        stages = [s.model_dump() for s in cfg.stages]
        if state["stages"] != stages:
            raise ValueError(f"{ckpt} was written by a different recipe (its stages differ from this config's)")
        trainer = cls(load_model(ckpt, dtype=torch.float32).train(), cfg, sources, **kw)
        trainer.start_stage, trainer.start_step = state["stage"], state["step"]
        if trainer.start_stage < len(cfg.stages) and trainer.start_step >= cfg.stages[trainer.start_stage].steps:
            trainer.start_stage, trainer.start_step = trainer.start_stage + 1, 0  # a finished stage: go on
        trainer.history = state["history"]
        trainer._resume_state = state
        torch.set_rng_state(state["rng"])
        return trainer

    def save(
        self, path: Path, stage: int, step: int, optimizer: torch.optim.Optimizer | None, dtype: str | None = None
    ) -> Path:
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        save_checkpoint(self.model, tmp, dtype=DTYPES[dtype or self.cfg.checkpoint_dtype])
        for name in TOKENIZER_FILES:
            if (self.cfg.init / name).is_file():
                shutil.copy(self.cfg.init / name, tmp / name)
        torch.save(
            {
                "stage": stage,
                "step": step,
                "stages": [s.model_dump() for s in self.cfg.stages],
                "optimizer": optimizer.state_dict() if optimizer is not None else None,
                "rng": torch.get_rng_state(),
                "history": self.history,
            },
            tmp / STATE_NAME,
        )
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)  # a crash mid-save never leaves a half-written checkpoint under the real name
        return path

    # ---- training -----------------------------------------------------------------------------------------
    def stage_dir(self, i: int) -> Path:
        return self.cfg.out / f"{i + 1}-{self.cfg.stages[i].name}"

    def run(self, stop_after_steps: int | None = None) -> Path | None:
        """Run the remaining stages. `stop_after_steps` stops (after saving) once that many optimizer steps
        have run in this call — for tests of resuming. Returns out/final, or None when stopped early."""
        done = 0
        self.model.train()
        for i in range(self.start_stage, len(self.cfg.stages)):
            stage = self.cfg.stages[i]
            first = self.start_step if i == self.start_stage else 0
            opt = make_optimizer(self.model, stage)
            state = self._resume_state
            if state is not None and i == state["stage"] and state["optimizer"] is not None:
                opt.load_state_dict(state["optimizer"])
            self._resume_state = None
            frozen = stage.frozen_groups()
            self.log(
                f"stage {i + 1} {stage.name!r}: steps {first}..{stage.steps}, trained "
                f"{ {g: lr for g, lr in stage.train.items()} }, frozen {frozen}, data {stage.data}"
            )
            stream = BatchStream(
                self.sources,
                stage.data,
                self.cfg.seed * 100 + i,
                stage.batch_size,
                stage.seq_len,
                self.model.config.modality_pad_token_id,
                self.pad_row,
            )
            t0 = time.time()
            for step in range(first, stage.steps):
                stats = self.train_step(opt, stage, step, stream.batch(step))
                if (step + 1) % self.cfg.log_every == 0 or step + 1 == stage.steps:
                    self.history.append({"stage": stage.name, "step": step + 1, **stats})
                    parts = " ".join(f"{k} {v:.4f}" for k, v in stats.items() if k.endswith("loss"))
                    self.log(f"  [{stage.name}] step {step + 1}/{stage.steps} {parts} ({time.time() - t0:.1f}s)")
                done += 1
                if self.cfg.save_every and (step + 1) % self.cfg.save_every == 0 and step + 1 < stage.steps:
                    self.save(self.cfg.out / f"{i + 1}-{stage.name}-step{step + 1}", i, step + 1, opt)
                if stop_after_steps is not None and done >= stop_after_steps and step + 1 < stage.steps:
                    self.save(self.cfg.out / "interrupted", i, step + 1, opt)
                    return None
            self.save(self.stage_dir(i), i, stage.steps, None)
            if self.on_stage_end is not None:
                self.on_stage_end(i, stage, self.model)
                self.model.train()
        final = self.save(self.cfg.out / "final", len(self.cfg.stages), 0, None, dtype=self.cfg.export_dtype)
        (final / "training_log.json").write_text(json.dumps(self.history, indent=1) + "\n")
        return final

    def train_step(self, opt: torch.optim.Optimizer, stage: StageConfig, step: int, batch: Batch) -> dict:
        factor = lr_factor(stage, step)
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * factor
        loss, stats = compute_loss(self.model, batch)
        loss.backward()
        if stage.grad_clip is not None:
            params = [p for g in opt.param_groups for p in g["params"]]
            stats["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, stage.grad_clip, foreach=False))
        opt.step()
        opt.zero_grad(set_to_none=True)
        return stats
