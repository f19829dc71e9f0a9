"""Every token id comes from the checkpoint: the real layout keeps the real ids, a small vocabulary uses its own."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from moss_speech.builders.config import MossSpeechConfig
from moss_speech.builders.llm.checkpoint import load_model, save_checkpoint, steer_to_stop
from moss_speech.builders.llm.generate import SamplingParams, SequenceState, generate, left_pad
from moss_speech.builders.llm.prompt import PromptBuilder, Turn
from moss_speech.builders.llm.tokenizer import load_tokenizer
from moss_speech.builders.llm.tokens import SpecialTokens
from moss_speech.contract.serving import ConfigError
from moss_speech.model_repository.runtime.scheduler import Engine, Request
from moss_speech.model_repository.runtime.torch_llm import TorchLLMRuntime

REAL = dict(
    stop_ids=(151643, 151645),
    text_pad_id=151643,
    sosp_id=151646,
    modality_pad_id=151667,
    eosp_id=16384,
    audio_pad_id=512,
    im_start_id=151644,
    im_end_id=151645,
)
# write_tiny_checkpoint(small_vocab=True): 256 byte tokens, then Qwen's special tokens in their order
SMALL = dict(
    stop_ids=(256, 258),
    text_pad_id=256,
    sosp_id=259,
    modality_pad_id=280,
    eosp_id=16384,
    audio_pad_id=512,
    im_start_id=257,
    im_end_id=258,
)


def copy_ckpt(src, dst, **edits):
    """A copy of a checkpoint's small files (weights not needed to read ids) with JSON edits: {file: dict|None}."""
    dst.mkdir()
    for f in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / f, dst / f)
    for name, change in edits.items():
        file = dst / f"{name}.json"
        if change is None:
            file.unlink()
        else:
            file.write_text(json.dumps(json.loads(file.read_text()) | change))
    return dst


def test_real_layout_ids_are_the_real_ones(tiny_dir):
    tokens = SpecialTokens.from_dir(tiny_dir)
    assert tokens == SpecialTokens(**REAL)
    # config.json alone gives the same FSM ids and stop set (what in-process callers without a directory get)
    alone = SpecialTokens.from_config(MossSpeechConfig.from_dir(tiny_dir))
    assert set(alone.stop_ids) == set(tokens.stop_ids) and alone.text_pad_id == tokens.text_pad_id
    assert PromptBuilder.from_dir(tiny_dir).tokens == tokens


def test_small_vocab_checkpoint_is_consistent(tiny_small_dir):
    cfg = MossSpeechConfig.from_dir(tiny_small_dir)
    tok = load_tokenizer(tiny_small_dir)
    gen = json.loads((tiny_small_dir / "generation_config.json").read_text())
    tokens = SpecialTokens.from_dir(tiny_small_dir)
    assert tokens == SpecialTokens(**SMALL)
    assert cfg.vocab_size == 288 and tok.get_vocab_size() <= cfg.vocab_size
    # config.json, generation_config.json and the tokenizer agree on every id
    assert (cfg.sosp_token_id, cfg.modality_pad_token_id) == (
        tok.token_to_id("<|object_ref_start|>"),
        tok.token_to_id("<think>"),
    )
    assert cfg.bos_token_id == gen["bos_token_id"] == gen["pad_token_id"] == tok.token_to_id("<|endoftext|>")
    assert cfg.eos_token_id == tok.token_to_id("<|im_end|>")
    assert gen["eos_token_id"] == [tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|im_end|>")]
    assert load_model(tiny_small_dir).text_lm_head.weight.shape[0] == 288


@pytest.mark.parametrize(
    "gen_eos,config_eos,want",
    [
        (258, 258, (258, 256)),  # an int; <|endoftext|> and <|im_end|> always stop (the reference loop)
        ([258], 258, (258, 256)),
        ([260, 258], 258, (260, 258, 256)),  # a declared extra stop id is honoured
        (None, [261, 258], (261, 258, 256)),  # no generation_config.json: config.json's list
    ],
)
def test_stop_ids_from_generation_config_then_config(tiny_small_dir, tmp_path, gen_eos, config_eos, want):
    gen = None if gen_eos is None else {"eos_token_id": gen_eos}
    d = copy_ckpt(tiny_small_dir, tmp_path / "c", config={"eos_token_id": config_eos}, generation_config=gen)
    assert SpecialTokens.from_dir(d).stop_ids == want


@pytest.mark.parametrize(
    "edits,match",
    [
        ({"generation_config": {"eos_token_id": [400]}}, r"stop id 400 is outside the text vocabulary \[0, 288\)"),
        ({"generation_config": {"eos_token_id": [280]}}, "modality pad id 280 is also a stop id"),
        ({"config": {"sosp_token_id": 280}}, "sosp and modality pad share id 280"),
        ({"generation_config": "not json"}, "generation_config.json is not valid JSON"),
    ],
)
def test_bad_ids_are_clear_errors(tiny_small_dir, tmp_path, edits, match):
    raw = edits.pop("generation_config", ...)
    d = copy_ckpt(tiny_small_dir, tmp_path / "c", **edits)
    if raw == "not json":
        (d / "generation_config.json").write_text("{")
    elif raw is not ...:
        (d / "generation_config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=match):
        SpecialTokens.from_dir(d)


def test_a_tokenizer_without_chat_markers_is_refused(tiny_small_dir, tmp_path):
    d = copy_ckpt(tiny_small_dir, tmp_path / "c")
    data = json.loads((d / "tokenizer.json").read_text())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != "<|im_end|>"]
    (d / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"no <\|im_end\|> token"):
        SpecialTokens.from_dir(d)


def test_small_vocab_prompts_use_only_its_own_ids(tiny_small_dir):
    b = PromptBuilder.from_dir(tiny_small_dir)
    grid = b.build([Turn("user", codes=[11, 22]), Turn("assistant", text="ok"), Turn("user", text="hi")], "speech")
    assert int(grid[:, 0].max()) < 288
    assert grid[0].tolist() == [SMALL["im_start_id"], 512] and grid[-1].tolist() == [SMALL["sosp_id"], 512]
    audio = grid[grid[:, 0] == SMALL["modality_pad_id"]]
    assert audio[:, 1].tolist() == [11, 22, 16384]
    rows, mask = left_pad([grid, grid[:3]], MossSpeechConfig.from_dir(tiny_small_dir), b.tokens)
    assert rows[1, 0].tolist() == [SMALL["text_pad_id"], 512] and mask[1, 0] == 0
    text = b.decode_text([SMALL["im_start_id"], *b.encode("hi"), SMALL["im_end_id"], SMALL["text_pad_id"]])
    assert text == "hi"


def forced(size: int, index: int) -> torch.Tensor:
    t = torch.zeros(size)
    t[index] = 10.0
    return t


@pytest.mark.parametrize("ckpt,other", [("tiny_dir", SMALL), ("tiny_small_dir", REAL)], ids=["real", "small"])
def test_fsm_switches_and_stops_on_the_checkpoint_ids(request, ckpt, other):
    """The same walk (spoken answer, EOSP, end token) with each layout's ids; the other layout's end id is an
    ordinary token."""
    path = request.getfixturevalue(ckpt)
    cfg, tokens = MossSpeechConfig.from_dir(path), SpecialTokens.from_dir(path)
    other_end = other["im_end_id"] % cfg.vocab_size
    s = SequenceState(torch.tensor([[5, 512], [tokens.sosp_id, 512]]), SamplingParams.greedy(), cfg, tokens)
    picks = [(tokens.im_end_id, 9), (other_end, tokens.eosp_id), (other_end, 3), (tokens.im_end_id, 4)]
    steps = []
    for text, audio in picks:
        s.begin_step()
        steps.append(s.choose(forced(cfg.vocab_size, text), forced(cfg.audio_vocab_size, audio)))
        if s.finished:
            break
    assert [(st.mode, st.text_token) for st in steps] == [
        ("audio", tokens.modality_pad_id),
        ("audio", tokens.modality_pad_id),
        ("text", other_end),
        ("text", tokens.im_end_id),
    ]
    assert s.stop_reason == "stop_token" and steps[-1].finished


@pytest.fixture(scope="module")
def stopping_small(tiny_small_dir, tmp_path_factory):
    """The small-vocabulary checkpoint steered to end its answers (nothing trained)."""
    d = tmp_path_factory.mktemp("small-stop")
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(tiny_small_dir / f, d / f)
    tokens = SpecialTokens.from_dir(tiny_small_dir)
    save_checkpoint(steer_to_stop(load_model(tiny_small_dir), tokens.im_end_id, tokens.eosp_id), d)
    return d


@pytest.mark.slow
def test_small_vocab_generation_stops_on_its_end_token(stopping_small):
    model = load_model(stopping_small)
    b = PromptBuilder.from_dir(stopping_small, model.config)
    prompt = b.continue_conversation(None, Turn("user", codes=[1, 2, 3]), "speech")
    res = generate(model, [prompt], SamplingParams.greedy(max_new_tokens=40, min_new_tokens=4), b.tokens)[0]
    assert res.stop_reason == "stop_token" and len(res.steps) == 5
    assert res.rows[-1, 0] == SMALL["im_end_id"] and res.rows[-2, 1] == SMALL["eosp_id"]
    assert [s.mode for s in res.steps] == ["audio"] * 4 + ["text"] and len(res.speech_codes) == 3
    # the scheduler (what the llm model runs inside tritonserver) agrees row for row and closes the turn
    engine = Engine(TorchLLMRuntime(model, max_slots=1, max_context=256), b)
    updates = []
    engine.submit(
        Request(
            "x",
            Turn("user", codes=[1, 2, 3]),
            "speech",
            params=SamplingParams.greedy(max_new_tokens=40, min_new_tokens=4),
        ),
        updates.append,
    )
    while not (updates and updates[-1].final):
        engine.step()
    assert [list(r) for u in updates for r in u.rows] == res.rows.tolist()
    assert updates[-1].usage["stop_reason"] == "stop_token"
    turn_rows = updates[-1].turn_rows
    assert turn_rows[-1].tolist() == [b.encode("\n")[0], 512]  # closed by its own <|im_end|>, then "\n"
    assert turn_rows[-2].tolist() == [SMALL["im_end_id"], res.rows[-1, 1].item()]
