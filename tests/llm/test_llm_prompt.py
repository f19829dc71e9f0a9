"""Prompt grid rows for a known conversation, written out from the facts."""

from __future__ import annotations

import torch

from moss_speech.builders.llm.prompt import DEFAULT_SYSTEM_PROMPTS, Turn

SOSP, EOSP, MPAD, APAD = 151646, 16384, 151667, 512
IM_START, IM_END = 151644, 151645


def segments(builder, grid):
    """Split a grid into ('text', decoded string) and ('audio', codes) runs."""
    out = []
    for text, audio in grid.tolist():
        kind = "audio" if text == MPAD else "text"
        if not out or out[-1][0] != kind:
            out.append((kind, []))
        out[-1][1].append((text, audio))
    result = []
    for kind, rows in out:
        if kind == "text":
            assert all(a == APAD for _, a in rows), "text rows carry the audio pad"
            ids = [t for t, _ in rows]
            result.append(("text", builder.tokenizer.decode(ids, skip_special_tokens=False)))
        else:
            result.append(("audio", [a for _, a in rows]))
    return result


def test_two_turn_conversation_rows(prompt_builder):
    turns = [Turn("user", codes=[11, 22, 33]), Turn("assistant", text="Hello there."), Turn("user", codes=[44])]
    grid = prompt_builder.build(turns, "speech")
    assert grid.dtype == torch.long and grid.shape[1] == 2
    sys_text = DEFAULT_SYSTEM_PROMPTS["speech"]
    assert segments(prompt_builder, grid) == [
        ("text", "<|im_start|>user\n<|object_ref_start|>"),
        ("audio", [11, 22, 33, EOSP]),
        ("text", "<|im_end|>\n<|im_start|>assistant\nHello there.<|im_end|>\n<|im_start|>user\n<|object_ref_start|>"),
        ("audio", [44, EOSP]),
        # reference quirk: the default system turn goes after the conversation
        ("text", f"<|im_end|>\n<|im_start|>system\n{sys_text}<|im_end|>\n<|im_start|>assistant\n<|object_ref_start|>"),
    ]
    # The audio turn's n + 2 rows: [SOSP, pad x (n+1)] over [512, codes..., EOSP]
    first_sosp = grid[:, 0].tolist().index(SOSP)
    assert grid[first_sosp : first_sosp + 5].tolist() == [
        [SOSP, APAD],
        [MPAD, 11],
        [MPAD, 22],
        [MPAD, 33],
        [MPAD, EOSP],
    ]
    assert grid[0].tolist() == [IM_START, APAD]
    assert grid[-1].tolist() == [SOSP, APAD]  # spoken reply prefix ends with [SOSP, 512]


def test_text_reply_and_explicit_system_prompt(prompt_builder):
    grid = prompt_builder.build([Turn("user", text="hi")], "text", system_prompt="Be brief.")
    assert segments(prompt_builder, grid) == [
        ("text", "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    ]


def test_generated_rows_as_history(prompt_builder):
    rows = torch.tensor([[MPAD, 5], [MPAD, EOSP], [IM_END, 9]])
    grid = prompt_builder.build([Turn("assistant", rows=rows)], "text", system_prompt="s")
    assert any(torch.equal(grid[i : i + 3], rows) for i in range(grid.shape[0] - 2))


def test_bad_codes_and_turns_are_rejected(prompt_builder):
    import pytest

    with pytest.raises(ValueError, match="speech codes"):
        prompt_builder.build([Turn("user", codes=[EOSP])], "speech")
    with pytest.raises(ValueError, match="exactly one"):
        Turn("user", text="a", codes=[1])
    with pytest.raises(ValueError, match="output modality"):
        prompt_builder.build([Turn("user", text="a")], "video")


def test_decode_text_maps_moss_tokens(prompt_builder):
    ids = prompt_builder.encode("Hi<|empty|> there<|end_empty|>") + [MPAD, IM_END]
    assert prompt_builder.decode_text(ids) == "Hi. there:"
