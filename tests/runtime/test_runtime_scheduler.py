"""Continuous batching engine: served answers equal in-process generation, concurrent requests share steps
and each equals its solo result, cancellation frees the slot, history rows round-trip."""

from __future__ import annotations

import threading

import pytest
import torch

from moss_speech.builders.llm.generate import ContextLengthError, SamplingParams, generate
from moss_speech.builders.llm.prompt import Turn
from moss_speech.model_repository.runtime.scheduler import Engine, Request
from moss_speech.model_repository.runtime.torch_llm import TorchLLMRuntime


class Collector:
    def __init__(self):
        self.updates = []
        self.done = threading.Event()

    def __call__(self, update):
        self.updates.append(update)
        if update.final:
            self.done.set()

    @property
    def rows(self):
        return [r for u in self.updates for r in u.rows]


def engine_for(tiny_model, prompt_builder, slots=4, **kw):
    return Engine(TorchLLMRuntime(tiny_model, max_slots=slots, max_context=512), prompt_builder, **kw)


def run(engine, requests):
    out = [Collector() for _ in requests]
    for r, c in zip(requests, out, strict=True):
        engine.submit(r, c)
    while not all(c.done.is_set() for c in out):
        engine.step()
    return out


def speech_request(i, n_new=14, **kw):
    return Request(
        f"r{i}",
        Turn("user", codes=[(7 * i + k) % 1000 for k in range(3 + 2 * i)]),
        "speech",
        params=SamplingParams.greedy(max_new_tokens=n_new),
        **kw,
    )


@pytest.mark.slow
def test_served_answer_equals_in_process_generation(tiny_model, prompt_builder):
    engine = engine_for(tiny_model, prompt_builder)
    req = speech_request(1)
    (c,) = run(engine, [req])
    prompt = prompt_builder.continue_conversation(None, req.turn, "speech")
    ref = generate(tiny_model, [prompt], req.params)[0]
    assert c.rows == [tuple(r) for r in ref.rows.tolist()]
    final = c.updates[-1]
    assert final.final and final.usage["generated_tokens"] == len(ref.steps)
    assert final.usage["prompt_tokens"] == prompt.shape[0] and final.usage["stop_reason"] == ref.stop_reason
    # the speech windows cover every generated code exactly once, in order
    chunks = [w.tokens[w.n_context : w.n_context + w.n_chunk] for u in c.updates for w in u.windows]
    assert [t for ch in chunks for t in ch] == ref.speech_codes
    assert chunks[0] and len(chunks[0]) == engine.streaming.first_chunk_tokens
    assert engine.runtime.free_slots == 4


@pytest.mark.slow
def test_concurrent_requests_share_steps_and_equal_solo(tiny_model, prompt_builder):
    reqs = [speech_request(i, n_new=10 + i) for i in range(4)]
    reqs.append(Request("t", Turn("user", text="hello?"), "text", params=SamplingParams(seed=3, max_new_tokens=9)))
    solo = [run(engine_for(tiny_model, prompt_builder), [r])[0].rows for r in reqs]
    engine = engine_for(tiny_model, prompt_builder, slots=4)  # 5 requests, 4 slots: one waits for a free slot
    together = run(engine, reqs)
    assert [c.rows for c in together] == solo
    assert engine.max_batch_seen == 4


def test_cancellation_stops_within_a_step_and_frees_the_slot(tiny_model, prompt_builder):
    engine = engine_for(tiny_model, prompt_builder, slots=2)
    c = Collector()
    engine.submit(speech_request(2, n_new=200), c)
    for _ in range(3):
        engine.step()
    assert engine.runtime.free_slots == 1
    steps_before = engine._running[0].state.step
    engine.cancel("r2")
    engine.step()
    assert c.done.is_set() and c.updates[-1].usage["stop_reason"] == "cancelled"
    assert c.updates[-1].usage["generated_tokens"] == len(c.rows) == steps_before  # no step ran after the cancel
    assert engine.runtime.free_slots == 2 and engine.active == 0


def test_client_side_cancel_flag(tiny_model, prompt_builder):
    engine = engine_for(tiny_model, prompt_builder)
    c, flag = Collector(), {"on": False}
    engine.submit(speech_request(3, n_new=100), c, is_cancelled=lambda: flag["on"])
    engine.step()
    flag["on"] = True
    engine.step()
    assert c.done.is_set() and engine.runtime.free_slots == 4


@pytest.mark.slow
def test_history_rows_extend_the_next_prompt(tiny_model, prompt_builder):
    engine = engine_for(tiny_model, prompt_builder)
    first = speech_request(1, n_new=6)
    (c1,) = run(engine, [first])
    history = c1.updates[-1].turn_rows
    second = Request(
        "r2", Turn("user", text="and then?"), "text", history=history, params=SamplingParams.greedy(max_new_tokens=5)
    )
    (c2,) = run(engine, [second])
    expected_prompt = torch.cat([history, prompt_builder.continue_conversation(None, second.turn, "text")])
    assert c2.updates[-1].usage["prompt_tokens"] == expected_prompt.shape[0]
    ref = generate(tiny_model, [expected_prompt], second.params)[0]
    assert c2.rows == [tuple(r) for r in ref.rows.tolist()]


def test_too_long_prompt_is_refused_before_queueing(tiny_model, prompt_builder):
    engine = Engine(TorchLLMRuntime(tiny_model, max_slots=1, max_context=64), prompt_builder)
    with pytest.raises(ContextLengthError, match="served context of 64 tokens"):
        engine.submit(speech_request(1), Collector())
    assert engine.active == 0


def test_background_thread_serves_requests(tiny_model, prompt_builder):
    engine = engine_for(tiny_model, prompt_builder).start()
    try:
        cs = [Collector() for _ in range(3)]
        for i, c in enumerate(cs):
            engine.submit(speech_request(i, n_new=8), c)
        assert all(c.done.wait(60) for c in cs)
    finally:
        engine.stop()
