"""The padded decode steps CUDA graphs replay (batch bucket, key span rounded up, padded rows on a scratch slot)
compute what the plain eager step computes. Here on the CPU, where the same steps run without capture; the
captured replay itself is checked on a GPU (`torch-cuda` in test_runtime_conformance.py)."""

from __future__ import annotations

import torch

from moss_speech.builders.llm.prompt import Turn
from moss_speech.model_repository.runtime.torch_llm import TorchLLMRuntime

ATOL = 1e-4  # fp32 logits, as every runtime against the reference (sums in another order)


def test_padded_steps_match_eager_steps(tiny_model, prompt_builder):
    eager = TorchLLMRuntime(tiny_model, max_slots=4, max_context=256, cuda_graphs=False)
    padded = TorchLLMRuntime(tiny_model, max_slots=4, max_context=256, cuda_graphs=True)
    assert padded.graphs is not None and padded.graphs.scratch == 4 and padded.cache.buffer.shape[2] == 5
    padded.graphs.span_step = 32  # several spans within a short test
    prompts = [prompt_builder.build([Turn("user", codes=list(range(3, 3 + n)))], "speech") for n in (4, 23, 9)]
    slots = {}
    for rt in (eager, padded):
        slots[rt] = [rt.acquire() for _ in prompts]
        for s, p in zip(slots[rt], prompts, strict=True):
            rt.prefill(s, p)
    assert slots[eager] == slots[padded] and padded.graphs.scratch not in slots[padded]
    g = torch.Generator().manual_seed(0)
    # Batches of 3 (bucket 4: one padded row), 2 and 1, in orders that are not the cache's own.
    orders = [[2, 0, 1], [1, 2], [0], [2, 0, 1], [1, 0]] * 4
    for order in orders:
        rows = torch.stack([torch.randint(0, 5000, (len(order),), generator=g), torch.full((len(order),), 512)], -1)
        ref_t, ref_a = eager.decode(order, rows)
        got_t, got_a = padded.decode(order, rows)
        torch.testing.assert_close(got_t, ref_t, atol=ATOL, rtol=0)
        torch.testing.assert_close(got_a, ref_a, atol=ATOL, rtol=0)
    assert padded.cache.lengths[:4].tolist() == eager.cache.lengths.tolist()
    assert [padded.length(s) for s in range(3)] == [eager.length(s) for s in range(3)]
    assert len({span for _, span in padded.graphs.steps}) >= 2 and {b for b, _ in padded.graphs.steps} == {1, 2, 4}
