"""LLM runtime on a TensorRT engine of the graph from `builders.export.onnx_llm`.

UNVERIFIED: written from the TensorRT 10 Python API docs (`ICudaEngine.get_tensor_profile_shape`,
`IExecutionContext.set_optimization_profile_async`, `set_input_shape`, `set_tensor_address`,
`execute_async_v3`) and never run: the project's CI has no GPU and no datacenter `tensorrt` wheel. The
conformance test skips it there; a GPU session must run tests/runtime/test_runtime_conformance.py with
`tensorrt` importable before anyone relies on it.

Layout mirrors the onnxruntime runtime, on the GPU with torch CUDA tensors:
  cache     [L, 2, slots, kv_heads, max_context, head_dim], each slot left-aligned (preallocated once)
  scratch   flat buffers sized for the engine's profile maxima, viewed per call (no per-step allocation):
            the gathered past (decode), `new_kv`, both logits
  contexts  one per optimization profile: decode (one new token) and prefill (a whole prompt, empty past),
            as `builders.export.tensorrt.llm_profiles` builds them
Decode steps with more slots than the decode profile's max batch run in chunks.
"""

from __future__ import annotations

import mmap
import os

import torch

from moss_speech.builders.config import MossSpeechConfig
from moss_speech.builders.llm.generate import ContextLengthError, check_context
from moss_speech.model_repository.runtime.base import LLMRuntime

_INPUTS = ("grid", "position_ids", "attention_mask", "past_kv")


def _torch_dtype(trt, dtype) -> torch.dtype:
    table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.BF16: torch.bfloat16}
    if dtype not in table:
        raise ValueError(f"past_kv has TensorRT type {dtype}; this runtime serves fp32/fp16/bf16 engines")
    return table[dtype]


class TrtLLMRuntime(LLMRuntime):
    name = "tensorrt"

    def __init__(
        self,
        engine_path: str | os.PathLike,
        config: MossSpeechConfig,
        max_slots: int = 8,
        max_context: int | None = None,
        device: str | torch.device = "cuda",
    ):
        import tensorrt as trt  # datacenter TensorRT (Triton container); raises ImportError elsewhere

        if not torch.cuda.is_available():
            raise RuntimeError("TrtLLMRuntime needs a CUDA GPU")
        self.trt = trt
        self.device = torch.device(device)
        self.logger = trt.Logger(trt.Logger.WARNING)
        # Deserialize from a read-only mapping of the file: no host copy of the whole engine is made.
        with open(engine_path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as plan:
            self.engine = trt.Runtime(self.logger).deserialize_cuda_engine(plan)
        if self.engine is None:
            raise RuntimeError(
                f"TensorRT could not deserialize {engine_path} (built by another TensorRT version, or by TensorRT-RTX?)"
            )
        names = {self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)}
        missing = set(_INPUTS + ("text_logits", "audio_logits", "new_kv")) - names
        if missing:
            raise ValueError(f"{engine_path} lacks tensors {sorted(missing)}: not an LLM engine of onnx_llm")

        # Profiles: decode = the one whose grid takes one new token, prefill = the one taking the most.
        maxima = [
            tuple(self.engine.get_tensor_profile_shape("grid", p)[2])
            for p in range(self.engine.num_optimization_profiles)
        ]
        self.decode_profile = min(range(len(maxima)), key=lambda p: (maxima[p][1], -maxima[p][0]))
        self.prefill_profile = max(range(len(maxima)), key=lambda p: maxima[p][1])
        self.max_batch = maxima[self.decode_profile][0]
        self.engine_context = tuple(self.engine.get_tensor_profile_shape("attention_mask", self.decode_profile)[2])[1]
        self.max_prompt = maxima[self.prefill_profile][1]
        # Prefix reuse prefills the rest of a prompt after a kept past: that needs a profile taking both a past
        # (> 0) and several new tokens (a chunked-prefill profile). Engines without one serve without the cache.
        pasts = [
            tuple(self.engine.get_tensor_profile_shape("past_kv", p)[2])[4]
            for p in range(self.engine.num_optimization_profiles)
        ]
        chunked = [p for p in range(len(maxima)) if maxima[p][1] > 1 and pasts[p] > 0]
        self.chunk_profile = max(chunked, key=lambda p: (pasts[p], maxima[p][1])) if chunked else None
        if max_context is not None and max_context > self.engine_context:
            raise ValueError(
                f"max_context {max_context} exceeds the engine's decode profile max of {self.engine_context} tokens"
            )
        # Default: the engine's decode profile max, which the build took from the serving config.
        super().__init__(config, max_slots, max_context or min(self.engine_context, config.max_position_embeddings))

        L, kv, d = config.num_layer_instances, config.num_key_value_heads, config.head_dim
        self.kv_shape = (L, kv, d)
        self.dtype = _torch_dtype(trt, self.engine.get_tensor_dtype("past_kv"))
        dev = self.device
        self.cache = torch.zeros(L, 2, max_slots, kv, self.max_context, d, dtype=self.dtype, device=dev)
        b = min(self.max_batch, max_slots)
        # Flat scratch, viewed per call as a contiguous prefix of the needed shape.
        self._past = torch.empty(max(1, L * 2 * b * kv * (self.max_context - 1) * d), dtype=self.dtype, device=dev)
        # new_kv of the longest prompt this runtime accepts (a prompt's K/V cannot land in the strided slot
        # region directly), or of one decode step.
        self._new = torch.empty(
            L * 2 * kv * d * max(b, min(self.max_prompt, self.max_context)), dtype=self.dtype, device=dev
        )
        self._text = torch.empty(max(b, 1) * config.vocab_size, dtype=torch.float32, device=dev)
        self._audio = torch.empty(max(b, 1) * config.audio_vocab_size, dtype=torch.float32, device=dev)

        self.prefix_cache = self.chunk_profile is not None
        self.stream = torch.cuda.Stream(device=dev)
        self.contexts = {}
        for p in {self.decode_profile, self.prefill_profile} | ({self.chunk_profile} - {None}):
            ctx = self.engine.create_execution_context()
            if not ctx.set_optimization_profile_async(p, self.stream.cuda_stream):
                raise RuntimeError(f"could not select optimization profile {p}")
            self.contexts[p] = ctx
        self.stream.synchronize()

    # --- helpers ---------------------------------------------------------------------------------------------
    @staticmethod
    def _view(flat: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        n = 1
        for s in shape:
            n *= s
        return flat[:n].view(shape)

    def _execute(self, profile: int, inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> None:
        ctx = self.contexts[profile]
        for name, t in inputs.items():
            if not ctx.set_input_shape(name, tuple(t.shape)):
                raise RuntimeError(f"TensorRT refused shape {tuple(t.shape)} for {name} (profile {profile})")
            ctx.set_tensor_address(name, t.data_ptr())
        for name, t in outputs.items():
            want = tuple(ctx.get_tensor_shape(name))
            if want != tuple(t.shape):
                raise RuntimeError(f"{name}: engine computes {want}, buffer is {tuple(t.shape)}")
            ctx.set_tensor_address(name, t.data_ptr())
        if not ctx.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")

    def _outputs(self, b: int, t: int) -> dict[str, torch.Tensor]:
        L, kv, d = self.kv_shape
        return {
            "text_logits": self._view(self._text, (b, self.config.vocab_size)),
            "audio_logits": self._view(self._audio, (b, self.config.audio_vocab_size)),
            "new_kv": self._view(self._new, (L, 2, b, kv, t, d)),
        }

    # --- LLMRuntime -----------------------------------------------------------------------------------------
    def prefill(self, slot: int, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if grid.shape[0] > self.max_prompt:
            raise ContextLengthError(
                f"prompt of {grid.shape[0]} tokens does not fit the TensorRT engine's "
                f"prefill profile max of {self.max_prompt} tokens"
            )
        check_context(grid.shape[0], self.engine_context, "the TensorRT engine's decode profile max")
        return super().prefill(slot, grid)

    @torch.no_grad()
    def _prefill(self, slot, grid, start=0):
        n = grid.shape[0]
        L, kv, d = self.kv_shape
        with torch.cuda.stream(self.stream):
            # The kept prefix's K/V as the past (zero volume for a fresh slot: a valid, non-null address).
            past = self._view(self._past, (L, 2, 1, kv, start, d))
            if start:
                past.copy_(self.cache[:, :, slot : slot + 1, :, :start])
            inputs = {
                "grid": grid[None].to(self.device, non_blocking=False),
                "position_ids": torch.arange(start, start + n, device=self.device)[None],
                "attention_mask": torch.ones(1, start + n, dtype=torch.long, device=self.device),
                "past_kv": past,
            }
            out = self._outputs(1, n)
            self._execute(self.chunk_profile if start else self.prefill_profile, inputs, out)
            self.cache[:, :, slot, :, start : start + n].copy_(out["new_kv"][:, :, 0])
            text, audio = out["text_logits"][0].cpu(), out["audio_logits"][0].cpu()
        self.stream.synchronize()
        return text, audio

    @torch.no_grad()
    def _decode(self, slots, rows):
        texts, audios = [], []
        for i in range(0, len(slots), self.max_batch):
            t, a = self._decode_chunk(slots[i : i + self.max_batch], rows[i : i + self.max_batch])
            texts.append(t)
            audios.append(a)
        return torch.cat(texts), torch.cat(audios)

    def _decode_chunk(self, slots: list[int], rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        L, kv, d = self.kv_shape
        b = len(slots)
        lengths_list = [self._lengths[s] for s in slots]
        p = max(lengths_list)
        with torch.cuda.stream(self.stream):
            idx = torch.tensor(slots, dtype=torch.long, device=self.device)
            lengths = torch.tensor(lengths_list, dtype=torch.long, device=self.device)
            past = self._view(self._past, (L, 2, b, kv, p, d))
            torch.index_select(self.cache[:, :, :, :, :p], 2, idx, out=past)  # gather live slots' past
            mask = (torch.arange(p + 1, device=self.device)[None] < lengths[:, None]).long()
            mask[:, p] = 1  # the new token
            inputs = {
                "grid": rows[:, None].to(self.device),
                "position_ids": lengths[:, None].contiguous(),
                "attention_mask": mask,
                "past_kv": past,
            }
            out = self._outputs(b, 1)
            self._execute(self.decode_profile, inputs, out)
            # Two advanced indices around a slice: the target is [B, L, 2, kv, D].
            self.cache[:, :, idx, :, lengths] = out["new_kv"][:, :, :, :, 0].permute(2, 0, 1, 3, 4)
            text, audio = out["text_logits"].cpu(), out["audio_logits"].cpu()
        self.stream.synchronize()
        return text, audio
