"""Every LLM runtime against the PyTorch reference: prefill, batched decode over slots of different
lengths in any order, slot reuse, and context errors. New runtimes join through RUNTIME_FACTORIES."""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import pytest
import torch

from moss_speech.builders.llm.generate import ContextLengthError, SamplingParams, SequenceState, generate
from moss_speech.builders.llm.prompt import Turn
from moss_speech.model_repository.runtime.base import NoFreeSlotError

ATOL = 1e-4  # fp32 logits


def torch_runtime(tiny_dir, tiny_model, **kw):
    from moss_speech.model_repository.runtime.torch_llm import TorchLLMRuntime

    return TorchLLMRuntime(tiny_model, **kw)


@functools.cache
def _tiny_model_on_cuda(tiny_dir: str):
    from moss_speech.builders.llm.model import MossSpeechForCausalLM

    return MossSpeechForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32, device="cuda")


def torch_cuda_runtime(tiny_dir, tiny_model, cuda_graphs=True, **kw):
    """The same runtime with the model and KV cache on a GPU, decode steps replayed as CUDA graphs: logits come
    back on the CPU, within fp32 tolerance of the CPU reference (TF32 stays off: PyTorch's default for matmuls)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    from moss_speech.model_repository.runtime.torch_llm import TorchLLMRuntime

    return TorchLLMRuntime(_tiny_model_on_cuda(str(tiny_dir)), cuda_graphs=cuda_graphs, **kw)


def torch_cuda_eager_runtime(tiny_dir, tiny_model, **kw):
    return torch_cuda_runtime(tiny_dir, tiny_model, cuda_graphs=False, **kw)


@functools.cache
def _tiny_llm_onnx(tiny_dir: str) -> str:
    """The tiny model exported once per session, beside the tiny checkpoint (a pytest tmp dir)."""
    from moss_speech.builders.export.onnx_llm import export_llm_onnx
    from moss_speech.builders.llm.model import MossSpeechForCausalLM

    model = MossSpeechForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    return export_llm_onnx(model, Path(tiny_dir).parent / "onnx-llm-conformance" / "llm.onnx").path


def onnxruntime_runtime(tiny_dir, tiny_model, **kw):
    from moss_speech.model_repository.runtime.ort_llm import OrtLLMRuntime

    return OrtLLMRuntime(_tiny_llm_onnx(str(tiny_dir)), tiny_model.config, **kw)


@functools.cache
def _tiny_llm_engine(tiny_dir: str, max_batch: int, max_context: int) -> str:
    from moss_speech.builders.export.tensorrt import build_engine, llm_profiles
    from moss_speech.builders.llm.model import MossSpeechForCausalLM

    onnx_path = Path(_tiny_llm_onnx(tiny_dir))
    cfg = MossSpeechForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).config
    engine = onnx_path.with_name(f"llm-b{max_batch}-c{max_context}.plan")
    return build_engine(
        onnx_path, engine, llm_profiles(cfg, max_batch, max_context), precision="fp32", backend="tensorrt"
    ).path


def tensorrt_runtime(tiny_dir, tiny_model, **kw):
    if importlib.util.find_spec("tensorrt") is None or not torch.cuda.is_available():
        pytest.skip("needs a GPU and the tensorrt package")
    from moss_speech.model_repository.runtime.trt_llm import TrtLLMRuntime

    engine = _tiny_llm_engine(str(tiny_dir), kw.get("max_slots", 8), kw["max_context"])
    return TrtLLMRuntime(engine, tiny_model.config, **kw)


RUNTIME_FACTORIES = {
    "torch": torch_runtime,
    "torch-cuda": torch_cuda_runtime,
    "torch-cuda-eager": torch_cuda_eager_runtime,
    "onnxruntime": onnxruntime_runtime,
    "tensorrt": tensorrt_runtime,
}


@pytest.fixture(params=sorted(RUNTIME_FACTORIES))
def make_runtime(request, tiny_dir, tiny_model):
    return lambda **kw: RUNTIME_FACTORIES[request.param](tiny_dir, tiny_model, **kw)


def prompts(builder):
    return [builder.build([Turn("user", codes=list(range(3, 3 + n)))], "speech") for n in (4, 19, 9)]


@pytest.mark.slow
def test_prefill_and_decode_match_full_recompute(make_runtime, tiny_model, prompt_builder):
    rt = make_runtime(max_slots=4, max_context=256)
    ps = prompts(prompt_builder)
    slots = [rt.acquire() for _ in ps]
    for slot, p in zip(slots, ps, strict=True):
        text, audio = rt.prefill(slot, p)
        ref_t, ref_a = tiny_model(p[None], last_only=True)
        torch.testing.assert_close(text, ref_t[0], atol=ATOL, rtol=0)
        torch.testing.assert_close(audio, ref_a[0], atol=ATOL, rtol=0)
    order = [slots[2], slots[0], slots[1]]  # not the cache's own order
    seqs = {s: p for s, p in zip(slots, ps, strict=True)}
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        rows = torch.stack([torch.randint(0, 5000, (len(order),), generator=g), torch.full((len(order),), 512)], dim=-1)
        text, audio = rt.decode(order, rows)
        for i, s in enumerate(order):
            seqs[s] = torch.cat([seqs[s], rows[i : i + 1]])
            ref_t, ref_a = tiny_model(seqs[s][None], last_only=True)
            torch.testing.assert_close(text[i], ref_t[0], atol=ATOL, rtol=0)
            torch.testing.assert_close(audio[i], ref_a[0], atol=ATOL, rtol=0)
    assert [rt.length(s) for s in slots] == [p.shape[0] + 5 for p in ps]


@pytest.mark.slow
def test_slots_are_reused_and_exhaustion_is_reported(make_runtime, prompt_builder):
    rt = make_runtime(max_slots=2, max_context=128)
    a, b = rt.acquire(), rt.acquire()
    with pytest.raises(NoFreeSlotError):
        rt.acquire()
    p = prompts(prompt_builder)[0]
    first = rt.prefill(a, p)
    rt.release(a)
    c = rt.acquire()
    assert rt.length(c) == 0
    again = rt.prefill(c, p)  # a reused slot carries nothing over
    torch.testing.assert_close(again[0], first[0])
    rt.release(b)
    assert rt.free_slots == 1


@pytest.mark.slow
def test_context_errors_name_both_numbers(make_runtime, prompt_builder):
    rt = make_runtime(max_slots=1, max_context=32)
    p = prompts(prompt_builder)[1]
    slot = rt.acquire()
    with pytest.raises(ContextLengthError, match=rf"{p.shape[0]} tokens.*32 tokens"):
        rt.prefill(slot, p)


@pytest.mark.slow
def test_greedy_generation_through_runtime_matches_reference(make_runtime, tiny_model, prompt_builder):
    """The state machine driven by runtime logits gives the reference's tokens."""
    rt = make_runtime(max_slots=2, max_context=256)
    p = prompts(prompt_builder)[0]
    params = SamplingParams.greedy(max_new_tokens=10)
    ref = generate(tiny_model, [p], params)[0]
    state = SequenceState(p, params, tiny_model.config)
    slot = rt.acquire()
    state.begin_step()
    step = state.choose(*rt.prefill(slot, p))
    while not step.finished:
        state.begin_step()
        text, audio = rt.decode([slot], torch.tensor([state.last_row]))
        step = state.choose(text[0], audio[0])
    assert state.rows == [tuple(r) for r in ref.rows.tolist()]
