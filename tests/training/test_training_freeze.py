"""Freezing: frozen parameters get no gradient and no optimizer state, and after stage 1 text-only behaviour is
bit-identical (text logits of text-only inputs and the frozen tensors' checksums unchanged)."""

from __future__ import annotations

import pytest
import torch

from moss_speech.builders.llm.checkpoint import load_model
from moss_speech.builders.training.config import AUDIO_GROUPS, TEXT_GROUPS, TrainConfig, default_stages
from moss_speech.builders.training.data import BatchStream
from moss_speech.builders.training.freeze import checksums, group_of, make_optimizer
from moss_speech.builders.training.trainer import Trainer

PAD = 151667


def _setup(tiny_dir, samples, tmp_path, stage_index):
    stages = [
        s.model_copy(update={"batch_size": 1, "seq_len": 256, "steps": 2, "warmup_steps": 0})
        for s in default_stages(audio_lr=1e-2, text_lr=1e-2)
    ]
    cfg = TrainConfig(init=tiny_dir, out=tmp_path, data={"speech": {"path": "-"}, "text": {"path": "-"}}, stages=stages)
    model = load_model(tiny_dir).train()
    trainer = Trainer(model, cfg, samples, log=lambda _: None)
    stage = stages[stage_index]
    stream = BatchStream(samples, stage.data, 0, stage.batch_size, stage.seq_len, PAD, trainer.pad_row)
    return model, trainer, stage, stream


def _text_logits(model, samples):
    with torch.no_grad():
        return [model(s.grid[None])[0] for s in samples["text"]]


@pytest.mark.slow
def test_stage1_trains_only_speech_parts_and_text_behaviour_is_bit_identical(tiny_dir, samples, tmp_path):
    model, trainer, stage, stream = _setup(tiny_dir, samples, tmp_path, 0)
    text_before = _text_logits(model, samples)
    sums_before = checksums(model)
    opt = make_optimizer(model, stage)
    for step in range(stage.steps):
        trainer.train_step(opt, stage, step, stream.batch(step))
        if step == 0:
            # Inspect gradients of one backward (train_step clears them after the update).
            from moss_speech.builders.training.trainer import compute_loss

            compute_loss(model, stream.batch(step))[0].backward()
            for name, p in model.named_parameters():
                if group_of(name) in TEXT_GROUPS:
                    assert not p.requires_grad and p.grad is None, name
            assert any(
                p.grad is not None and p.grad.abs().sum() > 0
                for n, p in model.named_parameters()
                if group_of(n) == "audio_embed"
            )
            opt.zero_grad(set_to_none=True)
    # No optimizer state for frozen parameters; every trained parameter has its Adam moments.
    names = {id(p): n for n, p in model.named_parameters()}
    with_state = {names[id(p)] for p in opt.state}
    assert with_state and all(group_of(n) in AUDIO_GROUPS for n in with_state)
    assert with_state == {n for n, _ in model.named_parameters() if group_of(n) in AUDIO_GROUPS}
    assert {g["group"] for g in opt.param_groups} == set(AUDIO_GROUPS)

    sums_after = checksums(model)
    for name in sums_before:
        if group_of(name) in TEXT_GROUPS:
            assert sums_after[name] == sums_before[name], f"frozen {name} changed"
    assert any(sums_after[n] != sums_before[n] for n in sums_before if group_of(n) in AUDIO_GROUPS)
    for before, after in zip(text_before, _text_logits(model, samples), strict=True):
        assert torch.equal(before, after)  # bit-identical, not merely close


@pytest.mark.slow
def test_joint_stage_does_change_text_behaviour(tiny_dir, samples, tmp_path):
    """The control: the same check must fail once the trunk thaws (so the test above can fail)."""
    model, trainer, stage, stream = _setup(tiny_dir, samples, tmp_path, 1)
    text_before = _text_logits(model, samples)
    sums_before = checksums(model, ["shared_block"])
    opt = make_optimizer(model, stage)
    trainer.train_step(opt, stage, 0, stream.batch(0))
    assert checksums(model, ["shared_block"]) != sums_before
    assert not torch.equal(text_before[0], _text_logits(model, samples)[0])
    # embed_tokens and text_lm_head stay frozen in the default joint stage
    assert all(
        group_of(names) not in ("embed_tokens", "text_lm_head")
        for names in (n for g in opt.param_groups for n in g["names"])
    )
