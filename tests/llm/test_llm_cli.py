"""`moss-speech checkpoint tiny` and `moss-speech generate` as a user runs them (subprocesses)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from moss_speech.builders.llm.generate import SamplingParams, generate
from moss_speech.builders.llm.model import MossSpeechForCausalLM
from moss_speech.builders.llm.prompt import PromptBuilder, Turn


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moss_speech.cli.main", *args], capture_output=True, text=True)


@pytest.mark.slow
def test_tiny_checkpoint_then_generate_matches_the_library(tmp_path):
    assert cli("checkpoint", "tiny", "--out", str(tmp_path), "--no-codec", "--seed", "3").returncode == 0
    out = cli(
        "generate", "--checkpoint", str(tmp_path), "--codes", "5,6,7,8", "--greedy", "--max-new-tokens", "9", "--json"
    )
    assert out.returncode == 0, out.stderr
    answer = json.loads(out.stdout)
    model = MossSpeechForCausalLM.from_pretrained(tmp_path)
    prompt = PromptBuilder.from_dir(tmp_path).build([Turn("user", codes=[5, 6, 7, 8])], "speech")
    ref = generate(model, [prompt], SamplingParams.greedy(max_new_tokens=9))[0]
    assert answer["speech_codes"] == ref.speech_codes and answer["generated_tokens"] == 9
    assert answer["prompt_tokens"] == prompt.shape[0]


@pytest.mark.slow
def test_generate_reports_a_bad_checkpoint_in_one_line(tmp_path):
    out = cli("generate", "--checkpoint", str(tmp_path), "--text", "hi")
    assert out.returncode == 2 and "no config.json" in out.stderr and "Traceback" not in out.stderr
