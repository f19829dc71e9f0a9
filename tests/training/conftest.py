"""Fixtures for the training tests: a tiny model (real layout, real vocabularies) and a few samples of every kind."""

from __future__ import annotations

import pytest

from moss_speech.builders.llm.prompt import Turn
from moss_speech.builders.training.data import make_sample


@pytest.fixture(scope="session")
def samples(prompt_builder):
    """name -> samples: text QA (t2t), spoken question -> text (s2t), text -> spoken answer (t2s), s2s."""
    b = prompt_builder
    qa = [("one plus one", "two"), ("two plus one", "three"), ("red or blue", "blue"), ("say hi", "hi")]
    codes = [[(7 * i + j) % 500 for j in range(5 + i)] for i in range(len(qa))]
    text = [make_sample(b, [Turn("user", text=q)], answer_text=a) for q, a in qa]
    speech = []
    for i, (q, a) in enumerate(qa):
        speech.append(make_sample(b, [Turn("user", codes=codes[i])], answer_text=a))
        speech.append(make_sample(b, [Turn("user", text=q)], answer_codes=codes[(i + 1) % len(qa)]))
        speech.append(make_sample(b, [Turn("user", codes=codes[i])], answer_codes=codes[(i + 2) % len(qa)]))
    return {"text": text, "speech": speech}
