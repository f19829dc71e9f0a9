"""The demo recipe's checkpoints carry their own vocabulary consistently: config.json, generation_config.json and
the tokenizer agree, and every checkpoint the trainer writes from it keeps the same ids (so each one serves and
stops on its own end token; the served check is tests/serving/test_serving_small_vocab.py)."""

from __future__ import annotations

import json

from moss_speech.builders.config import MossSpeechConfig
from moss_speech.builders.llm.checkpoint import load_model
from moss_speech.builders.llm.generate import SamplingParams, generate
from moss_speech.builders.llm.prompt import Turn
from moss_speech.builders.llm.tokenizer import load_tokenizer
from moss_speech.builders.llm.tokens import SpecialTokens
from moss_speech.builders.training.config import StageConfig, TrainConfig
from moss_speech.builders.training.data import make_sample
from moss_speech.builders.training.demo import question, write_demo_checkpoint
from moss_speech.builders.training.trainer import Trainer


def test_demo_checkpoint_ids_are_consistent_and_survive_training(tmp_path):
    init = tmp_path / "init"
    builder, model = write_demo_checkpoint(init, seed=0)
    cfg, tok = MossSpeechConfig.from_dir(init), load_tokenizer(init)
    gen = json.loads((init / "generation_config.json").read_text())
    tokens = SpecialTokens.from_dir(init)
    assert tokens == builder.tokens
    # the demo's word vocabulary: every special id small, named consistently by all three files
    assert cfg.vocab_size < 100 and max(tokens.stop_ids) < cfg.vocab_size
    assert cfg.sosp_token_id == tok.token_to_id("<|object_ref_start|>") == tokens.sosp_id
    assert cfg.modality_pad_token_id == tok.token_to_id("<think>") == tokens.modality_pad_id
    assert gen["eos_token_id"] == [tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|im_end|>")]
    assert set(tokens.stop_ids) == set(gen["eos_token_id"]) and tokens.im_end_id == cfg.eos_token_id

    samples = {
        "text": [
            make_sample(builder, [Turn("user", text=question("anna", r))], answer_text=v)
            for r, v in (("color", "red"), ("city", "paris"))
        ]
    }
    stage = StageConfig(
        name="text",
        steps=2,
        train={"text_lm_head": 1e-2},
        data={"text": 1.0},
        batch_size=1,
        seq_len=128,
        warmup_steps=1,
    )
    run = TrainConfig(init=init, out=tmp_path / "run", data={"text": {"path": "-"}}, stages=[stage])
    final = Trainer(model, run, samples, log=lambda _: None).run()
    for ckpt in (tmp_path / "run" / "1-text", final):
        assert SpecialTokens.from_dir(ckpt) == tokens, ckpt
    trained = load_model(final)
    prompt = builder.build([Turn("user", text=question("anna", "color"))], "text")
    res = generate(trained, [prompt], SamplingParams.greedy(max_new_tokens=3), SpecialTokens.from_dir(final))[0]
    assert max(res.text_tokens) < cfg.vocab_size
