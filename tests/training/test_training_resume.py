"""Resuming repeats an uninterrupted run exactly; every checkpoint strict-loads in the real layout; the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from moss_speech.builders.llm.checkpoint import INDEX_NAME, load_model
from moss_speech.builders.training.config import TrainConfig, default_stages
from moss_speech.builders.training.trainer import STATE_NAME, Trainer


def _cfg(tiny_dir, out):
    stages = [
        s.model_copy(update={"batch_size": 1, "seq_len": 256, "steps": 3, "warmup_steps": 1})
        for s in default_stages(audio_lr=1e-2, text_lr=1e-3)
    ]
    return TrainConfig(init=tiny_dir, out=out, data={"speech": {"path": "-"}, "text": {"path": "-"}}, stages=stages)


@pytest.mark.slow
def test_resume_gives_the_same_result_as_an_uninterrupted_run(tiny_dir, samples, tmp_path):
    quiet = {"log": lambda _: None}
    full_cfg = _cfg(tiny_dir, tmp_path / "full")
    Trainer(load_model(tiny_dir), full_cfg, samples, **quiet).run()

    cut_cfg = _cfg(tiny_dir, tmp_path / "cut")
    assert Trainer(load_model(tiny_dir), cut_cfg, samples, **quiet).run(stop_after_steps=4) is None
    ckpt = tmp_path / "cut" / "interrupted"
    state = torch.load(ckpt / STATE_NAME, weights_only=False)
    assert (state["stage"], state["step"]) == (1, 1) and state["optimizer"]["state"]  # mid-joint, Adam state kept
    resumed = Trainer.resume(ckpt, cut_cfg, samples, **quiet)
    resumed.run()

    a = load_model(tmp_path / "full" / "2-joint").state_dict()
    b = load_model(tmp_path / "cut" / "2-joint").state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed.history == json.loads((tmp_path / "full" / "final" / "training_log.json").read_text())
    # the untrained start differs from the result (the comparison above is not vacuous)
    assert not torch.equal(load_model(tiny_dir).state_dict()["model.audio_embed.weight"], a["model.audio_embed.weight"])


@pytest.mark.slow
def test_trained_checkpoint_is_in_the_real_layout_and_strict_loads(tiny_dir, samples, tmp_path):
    """Via the console command, from a YAML recipe and JSONL data, as a user would run it."""
    from moss_speech.cli.main import main

    speech = [
        {"turns": [{"role": "user", "codes": [1, 2, 3, 4]}], "answer": {"text": "hi"}},
        {"turns": [{"role": "user", "text": "hi"}], "answer": {"codes": [9, 8, 7]}},
    ]
    text = [{"turns": [{"role": "user", "text": "one plus one"}], "answer": {"text": "two"}}]
    (tmp_path / "speech.jsonl").write_text("\n".join(json.dumps(x) for x in speech) + "\n")
    (tmp_path / "text.jsonl").write_text("\n".join(json.dumps(x) for x in text) + "\n")
    recipe = {
        "init": str(tiny_dir),
        "out": "run",
        "seed": 1,
        "data": {"speech": {"path": "speech.jsonl"}, "text": {"path": "text.jsonl"}},
        "stages": [
            {
                "name": "frozen",
                "steps": 1,
                "batch_size": 1,
                "seq_len": 512,
                "train": {"audio_embed": 1e-3, "audio_block": 1e-3, "audio_norm": 1e-3, "audio_lm_head": 1e-3},
                "data": {"speech": 1},
            },
            {
                "name": "joint",
                "steps": 1,
                "batch_size": 1,
                "seq_len": 512,
                "train": {"audio_embed": 1e-3, "shared_block": 1e-4},
                "data": {"speech": 1, "text": 1},
            },
        ],
    }
    (tmp_path / "recipe.json").write_text(json.dumps(recipe))
    assert main(["train", "--config", str(tmp_path / "recipe.json")]) == 0
    final = tmp_path / "run" / "final"
    index = json.loads((final / INDEX_NAME).read_text())
    ref = json.loads((tiny_dir / INDEX_NAME).read_text())
    assert sorted(index["weight_map"]) == sorted(ref["weight_map"])  # the real key names, nothing more
    assert (final / "tokenizer.json").is_file() and (final / "config.json").is_file()
    model = load_model(final)  # strict
    assert next(iter(model.state_dict().values())).dtype == torch.float32
    for stage_dir in ("1-frozen", "2-joint"):
        load_model(tmp_path / "run" / stage_dir)
    from safetensors import safe_open

    shard = next(iter(set(index["weight_map"].values())))
    with safe_open(final / shard, framework="pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.bfloat16  # exported like the released model
