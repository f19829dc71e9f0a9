"""KV prefix reuse: a finished turn's K/V stays cached and the next turn of the conversation prefills only what
follows the shared prefix. Greedy output is token-identical with and without the cache, for every runtime that
keeps KV (TensorRT through the same interface: skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch

from moss_speech.builders.llm.generate import SamplingParams
from moss_speech.builders.llm.prompt import Turn
from moss_speech.model_repository.runtime.scheduler import Engine, Request
from tests.runtime.test_runtime_conformance import RUNTIME_FACTORIES
from tests.runtime.test_runtime_scheduler import run

ATOL = 1e-4


@pytest.fixture(params=sorted(RUNTIME_FACTORIES))
def make_runtime(request, tiny_dir, tiny_model):
    return lambda **kw: RUNTIME_FACTORIES[request.param](tiny_dir, tiny_model, **kw)


def conversation(engine: Engine, turns: int, system_prompt: str | None = None, tag: str = "c") -> list:
    """Greedy multi-turn conversation; returns each turn's (rows, usage)."""
    history = None
    finals = []
    seed = ord(tag[0])
    for i in range(turns):
        codes = [(11 * i + 7 * seed + k) % 900 for k in range(5 + i)]
        req = Request(
            f"{tag}{i}",
            Turn("user", codes=codes),
            "speech",
            history=history,
            params=SamplingParams.greedy(max_new_tokens=12),
            system_prompt=system_prompt,
            session_id=tag,
        )
        (c,) = run(engine, [req])
        final = c.updates[-1]
        assert final.error is None and final.turn_rows is not None
        finals.append((c.rows, final.usage))
        history = final.turn_rows if history is None else torch.cat([history, final.turn_rows])
    return finals


@pytest.mark.slow
def test_prefix_prefill_equals_full_prefill(make_runtime, prompt_builder):
    """A slot acquired for a prompt that extends a cached one reuses that prefix; logits equal a fresh prefill."""
    rt = make_runtime(max_slots=2, max_context=256)
    first = prompt_builder.build([Turn("user", codes=list(range(3, 40)))], "speech", system_prompt="be brief")
    longer = torch.cat([first, prompt_builder.turn_rows(Turn("user", codes=list(range(50, 70))))])
    a = rt.acquire()
    rt.prefill(a, first)
    rt.release(a, keep=True)
    assert rt.cached_slots == 1 and rt.cached_rows == first.shape[0] and rt.free_slots == 2
    slot, reused = rt.acquire_for(longer)
    assert (slot, reused) == (a, first.shape[0])
    text, audio = rt.prefill(slot, longer)
    ref = make_runtime(max_slots=1, max_context=256)
    ref.prefix_cache = False
    rt_text, rt_audio = ref.prefill(ref.acquire(), longer)
    torch.testing.assert_close(text, rt_text, atol=ATOL, rtol=0)
    torch.testing.assert_close(audio, rt_audio, atol=ATOL, rtol=0)
    assert rt.cache_stats.hits == 1 and rt.cache_stats.reused_rows == first.shape[0]


@pytest.mark.parametrize("system_prompt", [None, "you are terse"])
@pytest.mark.slow
def test_greedy_conversation_token_identical_with_and_without_cache(make_runtime, prompt_builder, system_prompt):
    """Four greedy turns: every turn's rows are identical with the cache on and off, and turns 2.. hit it."""
    cached = Engine(make_runtime(max_slots=2, max_context=512), prompt_builder)
    plain = Engine(make_runtime(max_slots=2, max_context=512), prompt_builder, prefix_cache=False)
    with_cache = conversation(cached, 4, system_prompt)
    without = conversation(plain, 4, system_prompt)
    assert [rows for rows, _ in with_cache] == [rows for rows, _ in without]
    assert [u["cached_tokens"] for _, u in without] == [0, 0, 0, 0]
    reused = [u["cached_tokens"] for _, u in with_cache]
    assert reused[0] == 0 and all(r > 0 for r in reused[1:])
    if system_prompt is not None:  # the whole previous prompt and answer are a prefix of the next prompt
        for (rows, usage), (_, nxt) in zip(with_cache, with_cache[1:], strict=False):
            assert nxt["cached_tokens"] == usage["prompt_tokens"] + len(rows) - 1
    stats = cached.runtime.cache_stats
    assert (stats.hits, stats.misses) == (3, 1)
    assert plain.runtime.cache_stats.hits == 0 and plain.runtime.cached_slots == 0


@pytest.mark.slow
def test_lru_eviction_bounds_the_cache(make_runtime, prompt_builder):
    """Cached slots are idle slots of the preallocated cache: a new conversation evicts the least recently used
    one; interleaved conversations keep hitting while they fit."""
    engine = Engine(make_runtime(max_slots=2, max_context=512), prompt_builder)
    for tag in "abc":  # three conversations, two slots: the third evicts the first
        conversation(engine, 1, f"conversation {tag}", tag=tag)
    rt = engine.runtime
    assert rt.cached_slots == 2 and rt.cache_stats.evictions == 1
    assert rt.cached_rows <= 2 * rt.max_context
    # all slots busy with cached entries: a request still gets a slot (eviction), never NoFreeSlotError
    assert rt.free_slots == 2
    _, usage = conversation(engine, 1, "another one entirely", tag="d")[0]
    assert usage["cached_tokens"] == 0 and rt.cache_stats.evictions == 2


def test_cancelled_or_failed_jobs_do_not_stay_cached(tiny_model, prompt_builder):
    from moss_speech.model_repository.runtime.torch_llm import TorchLLMRuntime

    engine = Engine(TorchLLMRuntime(tiny_model, max_slots=2, max_context=512), prompt_builder)
    req = Request("x", Turn("user", codes=[1, 2, 3]), "speech", params=SamplingParams.greedy(max_new_tokens=50))
    engine.submit(req, lambda u: None)
    engine.step()
    engine.cancel("x")
    engine.step()
    assert engine.runtime.cached_slots == 0 and engine.runtime.free_slots == 2
