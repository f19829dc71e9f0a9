"""Samples, loss targets per modality and per turn, packing, deterministic shuffling, the recipe schema."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from moss_speech.builders.llm.prompt import Turn
from moss_speech.builders.training.config import StageConfig, TrainConfig, default_stages
from moss_speech.builders.training.data import IGNORE, BatchStream, epoch_samples, make_sample, pack
from moss_speech.builders.training.trainer import compute_loss, packed_hidden

PAD, SOSP, EOSP, APAD = 151667, 151646, 16384, 512
IM_END = 151645


def test_text_answer_targets_only_the_answer_on_the_text_head(prompt_builder):
    b = prompt_builder
    s = make_sample(b, [Turn("user", text="hello")], answer_text="hi there")
    prompt = b.build([Turn("user", text="hello")], "text")
    assert torch.equal(s.grid[: prompt.shape[0]], prompt)  # the serving prompt, verbatim
    text_t, audio_t = s.targets(PAD)
    answer = b.encode("hi there<|im_end|>")
    p = prompt.shape[0]
    # row p-1 (last prompt row) predicts the first answer token ... the row before <|im_end|> predicts it
    assert text_t[p - 1 : p - 1 + len(answer)].tolist() == answer
    assert (text_t[: p - 1] == IGNORE).all() and (text_t[p - 1 + len(answer) :] == IGNORE).all()
    assert (audio_t == IGNORE).all()
    assert s.kind == "t2t"


def test_spoken_answer_targets_codes_on_audio_head_and_im_end_after_eosp(prompt_builder):
    b = prompt_builder
    codes = [5, 6, 7]
    s = make_sample(b, [Turn("user", text="hello")], answer_codes=codes)
    prompt = b.build([Turn("user", text="hello")], "speech")
    p = prompt.shape[0]
    assert prompt[-1].tolist() == [SOSP, APAD]
    assert s.grid[p : p + 4].tolist() == [[PAD, 5], [PAD, 6], [PAD, 7], [PAD, EOSP]]
    assert s.grid[p + 4, 0] == IM_END
    text_t, audio_t = s.targets(PAD)
    # audio mode: rows SOSP, c1, c2, c3 predict c1, c2, c3, EOSP on the audio head; no text loss (forced pad)
    assert audio_t[p - 1 : p + 3].tolist() == [5, 6, 7, EOSP]
    assert (text_t[p - 1 : p + 3] == IGNORE).all()
    # the EOSP row switches generation to text: its text head predicts <|im_end|>, the audio channel is ignored
    assert text_t[p + 3] == IM_END and audio_t[p + 3] == IGNORE
    assert (text_t != IGNORE).sum() == 1 and (audio_t != IGNORE).sum() == 4
    assert s.kind == "t2s"


def test_user_speech_turn_and_earlier_assistant_turns_are_never_targets(prompt_builder):
    b = prompt_builder
    turns = [Turn("user", codes=[1, 2, 3]), Turn("assistant", text="earlier"), Turn("user", codes=[4, 5])]
    s = make_sample(b, turns, answer_text="ok")
    text_t, audio_t = s.targets(PAD)
    p = b.build(turns, "text").shape[0]
    assert (text_t[: p - 1] == IGNORE).all() and (audio_t == IGNORE).all()
    want = b.encode("ok<|im_end|>")
    assert text_t[p - 1 : p - 1 + len(want)].tolist() == want
    assert s.kind == "s2t"


@pytest.mark.slow
def test_loss_is_text_ce_on_text_answer_rows_plus_audio_ce_on_audio_answer_rows(tiny_model, samples):
    """compute_loss against a by-hand loss from the full forward: both heads, answer rows only."""
    for s in (samples["speech"][2], samples["speech"][0]):  # s2s, s2t
        batch = pack([s], 160, PAD, (151643, APAD))[0]
        with torch.no_grad():
            loss, stats = compute_loss(tiny_model, batch)
            text_logits, audio_logits = tiny_model(s.grid[None])
        p, e = s.answer_start, s.answer_end
        terms = []
        for t in range(p - 1, e):  # row t predicts answer row t+1
            nxt_text, nxt_audio = s.grid[t + 1].tolist()
            if nxt_text == PAD:
                terms.append(torch.nn.functional.cross_entropy(audio_logits[0, t], torch.tensor(nxt_audio)))
            else:
                terms.append(torch.nn.functional.cross_entropy(text_logits[0, t], torch.tensor(nxt_text)))
        assert stats["text_targets"] + stats["audio_targets"] == len(terms) == e - p + 1
        torch.testing.assert_close(loss, torch.stack(terms).mean(), atol=1e-4, rtol=1e-5)


@pytest.mark.slow
def test_packing_restarts_positions_and_matches_unpacked_forward(tiny_model, samples):
    a, b = samples["text"][0], samples["speech"][2]
    batch = pack([a, b], a.grid.shape[0] + b.grid.shape[0] + 3, PAD, (151643, APAD))
    assert len(batch) == 1
    bt = batch[0]
    la = a.grid.shape[0]
    assert bt.positions[0, :la].tolist() == list(range(la)) and bt.positions[0, la] == 0
    assert bt.doc[0, -3:].tolist() == [-1, -1, -1] and (bt.text_targets[0, -3:] == IGNORE).all()
    with torch.no_grad():
        text_h, audio_h = packed_hidden(tiny_model, bt.grid, bt.positions, bt.doc)
        for s, lo in ((a, 0), (b, la)):
            n = s.grid.shape[0]
            ref_text, ref_audio = tiny_model(s.grid[None])
            torch.testing.assert_close(tiny_model.text_lm_head(text_h[0, lo : lo + n]), ref_text[0], atol=1e-4, rtol=0)
            torch.testing.assert_close(
                tiny_model.audio_lm_head(audio_h[0, lo : lo + n]), ref_audio[0], atol=1e-4, rtol=0
            )


def test_packing_keeps_order_and_rejects_oversized_samples(samples):
    items = samples["speech"]
    longest = max(s.grid.shape[0] for s in items)
    packed = pack(items, longest, PAD, (151643, APAD))
    assert len(packed) >= 2
    with pytest.raises(ValueError, match="does not fit"):
        pack(items, longest - 1, PAD, (151643, APAD))


def test_shuffle_is_deterministic_and_mixes_by_weight(samples):
    one = epoch_samples(samples, {"text": 1.0, "speech": 0.5}, seed=3, epoch=0)
    again = epoch_samples(samples, {"text": 1.0, "speech": 0.5}, seed=3, epoch=0)
    other = epoch_samples(samples, {"text": 1.0, "speech": 0.5}, seed=3, epoch=1)
    assert [id(s) for s in one] == [id(s) for s in again]
    assert [id(s) for s in one] != [id(s) for s in other]
    assert len(one) == len(samples["text"]) + round(0.5 * len(samples["speech"]))
    twice = epoch_samples(samples, {"text": 2.0}, seed=3, epoch=0)
    assert len(twice) == 2 * len(samples["text"])
    s1 = BatchStream(samples, {"text": 1.0, "speech": 1.0}, 0, 2, 256, PAD, (151643, APAD))
    s2 = BatchStream(samples, {"text": 1.0, "speech": 1.0}, 0, 2, 256, PAD, (151643, APAD))
    for step in (7, 0, 3, 7):  # random access gives the same batch as a fresh stream
        assert torch.equal(s1.batch(step).grid, s2.batch(step).grid)


def test_recipe_schema_defaults_and_errors(tmp_path):
    stages = default_stages()
    assert [s.name for s in stages] == ["frozen", "joint"]
    assert set(stages[0].frozen_groups()) == {"embed_tokens", "shared_block", "text_block", "text_norm", "text_lm_head"}
    assert set(stages[1].train) >= {"shared_block", "text_block", "audio_embed"}
    assert stages[1].train["shared_block"] < stages[1].train["audio_embed"]
    with pytest.raises(ValidationError, match="undefined data sources"):
        TrainConfig(init="x", out="y", data={"text": {"path": "t.jsonl"}})  # default stages need "speech"
    with pytest.raises(ValidationError):
        StageConfig(name="s", steps=1, train={"not_a_group": 1e-3}, data={"a": 1})
    with pytest.raises(ValidationError, match="leave it out to freeze"):
        StageConfig(name="s", steps=1, train={"audio_embed": 0.0}, data={"a": 1})
    f = tmp_path / "r.yaml"
    f.write_text("init: ckpt\nout: run\ndata:\n  speech: {path: s.jsonl}\n  text: {path: t.jsonl}\n")
    cfg = TrainConfig.from_file(f)
    assert cfg.init == tmp_path / "ckpt" and cfg.data["speech"].path == tmp_path / "s.jsonl"
