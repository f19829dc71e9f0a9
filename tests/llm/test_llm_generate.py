"""Generation: the modality state machine (table-driven from the facts), sampling, batching, streaming."""

from __future__ import annotations

import pytest
import torch

from moss_speech.builders.llm.generate import (
    SamplingParams,
    SequenceState,
    apply_repetition_penalty,
    generate,
    initial_mode,
    sample_token,
    stream_generate,
)
from moss_speech.builders.llm.prompt import Turn
from moss_speech.builders.llm.tokens import SpecialTokens

# The real layout's ids (the tiny checkpoint's tokenizer and config.json carry them; the code reads them from there).
SOSP, EOSP, MPAD, APAD = 151646, 16384, 151667, 512
ENDOFTEXT_ID, IM_END_ID = 151643, 151645


def forced(cfg, text: int, audio: int):
    """Logits whose argmax is (text, audio)."""
    t = torch.zeros(cfg.vocab_size)
    a = torch.zeros(cfg.audio_vocab_size)
    t[text], a[audio] = 10.0, 10.0
    return t, a


@pytest.mark.parametrize(
    "last_row,mode",
    [
        ((MPAD, 77), "audio"),  # text channel is the modality pad -> audio
        ((MPAD, APAD), "audio"),  # the text rule wins over the audio pad
        ((SOSP, APAD), "text"),  # the spoken-reply prefix starts in text mode ...
        ((100, APAD), "text"),
    ],
)
def test_initial_mode(tiny_model, last_row, mode):
    assert initial_mode(last_row, SpecialTokens.from_config(tiny_model.config)) == mode


# (mode before, last row, mode used for the step) — both checks run, in order, before the forward.
SWITCHES = [
    ("text", (SOSP, APAD), "audio"),  # ... and the first step switches to audio
    ("text", (100, APAD), "text"),
    ("audio", (MPAD, EOSP), "text"),
    ("audio", (MPAD, 5), "audio"),
    ("text", (SOSP, EOSP), "text"),  # text->audio on SOSP, then audio->text on EOSP in the same step
    ("audio", (SOSP, 5), "audio"),  # SOSP only matters in text mode
    ("text", (100, EOSP), "text"),  # EOSP only matters in audio mode
]


@pytest.mark.parametrize("before,last_row,after", SWITCHES)
def test_mode_switch_before_forward(tiny_model, before, last_row, after):
    s = SequenceState(torch.tensor([[100, APAD]]), SamplingParams.greedy(), tiny_model.config)
    s.mode, s.last_row = before, last_row
    s.begin_step()
    assert s.mode == after


def run_steps(cfg, prompt_last, picks, **params):
    s = SequenceState(torch.tensor([[100, APAD], list(prompt_last)]), SamplingParams.greedy(**params), cfg)
    out = []
    for text, audio in picks:
        s.begin_step()
        out.append(s.choose(*forced(cfg, text, audio)))
        if s.finished:
            break
    return s, out


def test_audio_mode_writes_the_pad_and_im_end_does_not_stop(tiny_model):
    cfg = tiny_model.config
    s, steps = run_steps(cfg, (SOSP, APAD), [(IM_END_ID, 9), (IM_END_ID, EOSP), (IM_END_ID, 3)])
    assert [(st.mode, st.text_token, st.audio_token) for st in steps] == [
        ("audio", MPAD, 9),
        ("audio", MPAD, EOSP),
        ("text", IM_END_ID, 3),
    ]
    assert steps[-1].finished and steps[-1].stop_reason == "stop_token"
    assert not steps[0].finished and not steps[1].finished


@pytest.mark.parametrize("stop", [ENDOFTEXT_ID, IM_END_ID])
def test_text_stop_tokens_stop_and_stay_in_output(tiny_model, stop):
    s, steps = run_steps(tiny_model.config, (100, APAD), [(5, 0), (stop, 0), (6, 0)])
    assert len(steps) == 2 and steps[-1].text_token == stop and s.stop_reason == "stop_token"
    assert s.rows[-1][0] == stop


def test_audio_logits_above_eosp_are_never_sampled(tiny_model):
    cfg = tiny_model.config
    s, steps = run_steps(cfg, (MPAD, 1), [(0, cfg.audio_vocab_size - 1)])
    assert steps[0].audio_token <= EOSP


def test_eosp_masked_before_min_new_tokens(tiny_model):
    """k < min_new_tokens masks EOSP (k 1-based), so EOSP can first appear at k = min_new_tokens."""
    cfg = tiny_model.config
    s, steps = run_steps(cfg, (MPAD, 1), [(0, EOSP)] * 4, min_new_tokens=3)
    assert [st.audio_token == EOSP for st in steps[:3]] == [False, False, True]
    assert steps[2].index == 3 and steps[3].mode == "text"  # EOSP switches the next step to text


def test_min_new_tokens_does_not_hold_back_the_text_stop(tiny_model):
    s, steps = run_steps(tiny_model.config, (100, APAD), [(IM_END_ID, 0)], min_new_tokens=5)
    assert steps[0].finished


def test_max_new_tokens(tiny_model):
    s, steps = run_steps(tiny_model.config, (100, APAD), [(5, 0)] * 10, max_new_tokens=4)
    assert len(steps) == 4 and s.stop_reason == "max_new_tokens"


def test_repetition_penalty_hf_rule():
    logits = torch.tensor([2.0, -2.0, 3.0, -1.0])
    seen = torch.tensor([True, True, False, False])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [1.0, -4.0, 3.0, -1.0]


def test_repetition_penalty_covers_prompt_and_pads(tiny_model):
    cfg = tiny_model.config
    s = SequenceState(torch.tensor([[100, APAD], [MPAD, 7]]), SamplingParams.greedy(repetition_penalty=1.5), cfg)
    assert s.text_seen[100] and s.text_seen[MPAD] and s.audio_seen[APAD] and s.audio_seen[7]
    s.begin_step()
    t = torch.zeros(cfg.vocab_size)
    a = torch.zeros(cfg.audio_vocab_size)
    a[7], a[8] = 1.2, 1.0  # 7 was seen: 1.2 / 1.5 = 0.8 < 1.0
    step = s.choose(t, a)
    assert step.audio_token == 8
    assert s.audio_seen[8]  # the new token joins the history


def test_greedy_ties_go_to_lowest_index():
    logits = torch.tensor([0.0, 5.0, 1.0, 5.0])
    assert sample_token(logits, SamplingParams.greedy(), torch.Generator()) == 1


def test_top_k_and_top_p_restrict_the_candidates():
    logits = torch.tensor([5.0, 4.9, 0.0, -3.0, 4.8])
    gen = torch.Generator().manual_seed(0)
    draws = {sample_token(logits, SamplingParams(top_k=2, top_p=1.0, temperature=1.0), gen) for _ in range(200)}
    assert draws == {0, 1}
    draws = {sample_token(logits, SamplingParams(top_k=0, top_p=0.3, temperature=1.0), gen) for _ in range(200)}
    assert draws == {0}


def speech_prompt(builder, codes):
    return builder.build([Turn("user", codes=codes)], "speech")


@pytest.mark.slow
def test_greedy_is_deterministic_and_sampling_reproducible_by_seed(tiny_model, prompt_builder):
    prompt = speech_prompt(prompt_builder, [3, 1, 4, 1, 5, 9, 2, 6])
    g1 = generate(tiny_model, [prompt], SamplingParams.greedy(max_new_tokens=12))[0]
    g2 = generate(tiny_model, [prompt], SamplingParams.greedy(max_new_tokens=12))[0]
    assert torch.equal(g1.rows, g2.rows)
    p = dict(max_new_tokens=12, temperature=1.0, top_k=0, top_p=1.0)
    s1 = generate(tiny_model, [prompt], SamplingParams(seed=7, **p))[0]
    s2 = generate(tiny_model, [prompt], SamplingParams(seed=7, **p))[0]
    s3 = generate(tiny_model, [prompt], SamplingParams(seed=8, **p))[0]
    assert torch.equal(s1.rows, s2.rows)
    assert not torch.equal(s1.rows, s3.rows)


@pytest.mark.slow
def test_spoken_reply_starts_in_audio_mode(tiny_model, prompt_builder):
    res = generate(tiny_model, [speech_prompt(prompt_builder, [1, 2, 3])], SamplingParams.greedy(max_new_tokens=5))[0]
    assert res.steps[0].mode == "audio" and res.rows[0, 0] == MPAD
    text_prompt = prompt_builder.build([Turn("user", text="hi")], "text")
    res = generate(tiny_model, [text_prompt], SamplingParams.greedy(max_new_tokens=5))[0]
    assert res.steps[0].mode == "text"


@pytest.mark.parametrize("sampling", [False, True])
@pytest.mark.slow
def test_batched_generation_equals_each_alone(tiny_model, prompt_builder, sampling):
    prompts = [speech_prompt(prompt_builder, list(range(1, 1 + n))) for n in (2, 15)]
    prompts.append(prompt_builder.build([Turn("user", text="what time is it?")], "text"))
    if sampling:
        params = [SamplingParams(seed=i, max_new_tokens=12, temperature=1.0) for i in range(len(prompts))]
    else:
        params = [SamplingParams.greedy(max_new_tokens=12, repetition_penalty=1.3)] * len(prompts)
    batched = generate(tiny_model, prompts, params)
    for prompt, p, res in zip(prompts, params, batched, strict=True):
        alone = generate(tiny_model, [prompt], p)[0]
        assert torch.equal(res.rows, alone.rows)
        assert len(res.steps) == 12


@pytest.mark.slow
def test_stream_yields_each_step_as_generate_returns(tiny_model, prompt_builder):
    prompt = speech_prompt(prompt_builder, [5, 6, 7])
    params = SamplingParams.greedy(max_new_tokens=9)
    streamed = [out[0] for out in stream_generate(tiny_model, [prompt], params)]
    assert [s.index for s in streamed] == list(range(1, 10))
    final = generate(tiny_model, [prompt], params)[0]
    assert [[s.text_token, s.audio_token] for s in streamed] == final.rows.tolist()


def test_prompt_longer_than_context_is_refused(tiny_model, prompt_builder):
    from moss_speech.builders.llm.generate import ContextLengthError

    n = tiny_model.config.max_position_embeddings
    prompt = speech_prompt(prompt_builder, [1] * n)
    with pytest.raises(ContextLengthError, match=rf"{prompt.shape[0]} tokens.*{n} tokens"):
        generate(tiny_model, [prompt], SamplingParams.greedy(max_new_tokens=2))


def test_invalid_sampling_parameters_are_rejected():
    from pydantic import ValidationError

    # temperature 0 alone means greedy (moss_speech.contract.sampling); sampling at temperature 0 is invalid
    for bad in (
        {"temperature": -1},
        {"temperature": 0, "do_sample": True},
        {"top_p": 1.5},
        {"top_k": -1},
        {"max_new_tokens": 0},
        {"unknown": 1},
    ):
        with pytest.raises(ValidationError):
            SamplingParams(**bad)
