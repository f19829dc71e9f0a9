"""Triton adapter of the `llm` model: decoupled, continuous batching in the library's `Engine`.

Requests only register a job and return; the engine's scheduler thread streams responses. A request whose
only input is `CANCEL_REQUEST_ID` cancels the job with that request id (Triton 2.51 does not tell a decoupled
step inside an ensemble that its client cancelled; see docs/contracts.md). With several `llm` instances in one
tritonserver (one per GPU), the control request reaches any of them: an instance that does not own the job posts
it on a per-server cancel board (marker files in /dev/shm, `CancelBoard`) that every instance polls for its own
jobs, so the owner stops it within ~20 ms. Tensor names come from
`moss_speech.contract.tensors`; the window travels as `moss_speech.contract.window.Window`.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import torch
import triton_python_backend_utils as pb_utils
from pydantic import ValidationError

from moss_speech.builders.llm.generate import ContextLengthError
from moss_speech.builders.llm.prompt import PromptBuilder, Turn
from moss_speech.contract import metrics as M
from moss_speech.contract import tensors as T
from moss_speech.contract.metrics import LLM_ACTIVE_SEQUENCES, LLM_KV_SLOTS
from moss_speech.contract.sampling import SamplingParams
from moss_speech.contract.window import Window
from moss_speech.model_repository.adapters.common import (
    array_input,
    artifact_path,
    error_response,
    instance_device,
    model_parameters,
    serving_config,
    string_input,
    string_tensor,
    tensors,
)
from moss_speech.model_repository.runtime.factory import load_llm_runtime
from moss_speech.model_repository.runtime.scheduler import Engine, QueueFullError, Request, Update

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
NO_ROWS = np.zeros((1, 0, 2), dtype=np.int64)
CANCEL_POLL_SECONDS = 0.02
CANCEL_MARKER_TTL = 60.0  # markers nobody took (the job had already ended) are dropped after this


class CancelBoard:
    """Cancel requests shared by the `llm` instances of one tritonserver: one marker file per request id in a
    directory named after the server's pid (instances are processes of that server; two servers on one host do
    not share a board)."""

    def __init__(self, model: str, root: str | None = None):
        base = Path(root or ("/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()))
        self.dir = base / f"moss-speech-cancel-{os.getppid()}-{model}"
        self.dir.mkdir(parents=True, exist_ok=True)

    def _path(self, request_id: str) -> Path:
        return self.dir / hashlib.sha256(request_id.encode()).hexdigest()[:32]

    def post(self, request_id: str) -> None:
        self._path(request_id).touch()
        now = time.time()
        for old in self.dir.iterdir():
            try:
                if now - old.stat().st_mtime > CANCEL_MARKER_TTL:
                    old.unlink()
            except FileNotFoundError:
                pass

    def take(self, request_id: str) -> bool:
        try:
            self._path(request_id).unlink()
            return True
        except FileNotFoundError:
            return False


class TritonPythonModel:
    def initialize(self, args):
        params = model_parameters(args)
        serving = serving_config(params)
        # A KIND_GPU instance runs the torch runtime on the GPU Triton gave it (onnxruntime/TensorRT pick their own).
        device = instance_device(args)
        runtime = load_llm_runtime(
            serving, params["checkpoint_dir"], artifact_path(args, params, "llm_artifact"), device=device
        )
        where = f" on {device}" if serving.llm_runtime == "torch" else ""
        pb_utils.Logger.log_info(f"llm: {runtime.name} runtime{where}, {serving.max_slots} KV slots")
        # Every token id (stop ids, chat markers, pads, SOSP/EOSP) from the checkpoint's files, read once here.
        prompts = PromptBuilder.from_dir(params["checkpoint_dir"], runtime.config)
        self.family = pb_utils.MetricFamily(
            name=LLM_ACTIVE_SEQUENCES, description="sequences holding a KV slot", kind=pb_utils.MetricFamily.GAUGE
        )
        self.gauge = self.family.Metric(labels={"model": T.LLM.name})
        self.slots_family = pb_utils.MetricFamily(
            name=LLM_KV_SLOTS, description="KV slots (most sequences at once)", kind=pb_utils.MetricFamily.GAUGE
        )
        self.slots_gauge = self.slots_family.Metric(labels={"model": T.LLM.name})
        self.slots_gauge.set(serving.max_slots)
        self._cache_metrics()
        self.engine = Engine(
            runtime, prompts, serving.streaming(), serving.max_queue, on_step=self._on_step, tokens=prompts.tokens
        )
        self.engine.start()
        self.board = CancelBoard(args.get("model_name", T.LLM.name))
        self._stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch_cancels, name="llm-cancel-board", daemon=True)
        self._watcher.start()

    def _cache_metrics(self) -> None:
        labels = {"model": T.LLM.name}
        counter, gauge = pb_utils.MetricFamily.COUNTER, pb_utils.MetricFamily.GAUGE
        self.cache_families = [
            pb_utils.MetricFamily(
                name=M.LLM_PREFIX_CACHE_HITS, description="prompts that reused a cached prefix", kind=counter
            ),
            pb_utils.MetricFamily(
                name=M.LLM_PREFIX_CACHE_MISSES, description="prompts computed from the start", kind=counter
            ),
            pb_utils.MetricFamily(
                name=M.LLM_PREFIX_CACHE_EVICTIONS, description="cached prefixes evicted", kind=counter
            ),
            pb_utils.MetricFamily(
                name=M.LLM_PREFIX_CACHE_REUSED_ROWS, description="prompt rows not recomputed", kind=counter
            ),
            pb_utils.MetricFamily(name=M.LLM_PREFIX_CACHE_ROWS, description="rows held by cached prefixes", kind=gauge),
        ]
        self.cache_metrics = [f.Metric(labels=labels) for f in self.cache_families]
        self._cache_seen = (0, 0, 0, 0)

    def _on_step(self, active: int) -> None:
        self.gauge.set(active)
        rt = self.engine.runtime
        st = rt.cache_stats
        now = (st.hits, st.misses, st.evictions, st.reused_rows)
        for metric, new, old in zip(self.cache_metrics, now, self._cache_seen, strict=False):
            if new > old:
                metric.increment(new - old)
        self._cache_seen = now
        self.cache_metrics[4].set(rt.cached_rows)

    def _watch_cancels(self) -> None:
        """Take cancel markers other instances posted for this instance's jobs."""
        while not self._stop.wait(CANCEL_POLL_SECONDS):
            for request_id in self.engine.request_ids():
                if self.board.take(request_id):
                    self.engine.cancel(request_id)

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                cancel_id = string_input(pb_utils, request, T.CANCEL_REQUEST_ID.name)
                if cancel_id is not None:
                    if self.engine.owns(cancel_id):
                        self.engine.cancel(cancel_id)
                    else:  # another instance of this server may own it (several GPUs)
                        self.board.post(cancel_id)
                    sender.send(flags=FINAL)
                    continue
                job = self._request(request)
                self.engine.submit(job, emit=Responder(sender, job.voice_id), is_cancelled=sender.is_cancelled)
            except QueueFullError as e:
                sender.send(error_response(pb_utils, str(e), "UNAVAILABLE"), flags=FINAL)
            except (ValueError, ValidationError, ContextLengthError) as e:
                sender.send(error_response(pb_utils, f"invalid request: {e}"), flags=FINAL)
        return None

    def _request(self, request) -> Request:
        params = json.loads(request.parameters() or "{}")
        request_id = str(params.get("request_id") or request.request_id() or uuid.uuid4().hex)
        codes = array_input(pb_utils, request, T.CODES.name)
        text = string_input(pb_utils, request, T.TEXT.name)
        if (codes is None) == (text is None):
            raise ValueError(f"exactly one of {T.CODES.name} (speech) and {T.TEXT.name} must be given")
        if codes is not None:
            codes = codes.reshape(-1)
            if codes.size == 0:
                raise ValueError("the spoken turn is empty (no speech codes)")
            turn = Turn("user", codes=codes.tolist())
        else:
            if not text.strip():
                raise ValueError("the text turn is empty")
            turn = Turn("user", text=text)
        history = array_input(pb_utils, request, T.HISTORY.name)
        if history is not None:
            history = torch.from_numpy(np.ascontiguousarray(history.reshape(-1, 2), dtype=np.int64))
        output = string_input(pb_utils, request, T.OUTPUT_MODALITY.name) or "speech"
        sampling = SamplingParams.from_json(string_input(pb_utils, request, T.SAMPLING.name))
        return Request(
            request_id,
            turn,
            output,
            history,
            sampling,
            voice_id=string_input(pb_utils, request, T.VOICE.name) or "default",
            system_prompt=string_input(pb_utils, request, T.SYSTEM_PROMPT.name) or None,
            session_id=str(params.get("session_id") or "") or None,
        )

    def finalize(self):
        self._stop.set()
        self.engine.stop()


class Responder:
    """Turns engine updates into Triton responses: one per speech window (at least one per update)."""

    def __init__(self, sender, voice_id: str):
        self.sender = sender
        self.voice_id = voice_id
        self.chunks = 0  # audio chunk index
        self.responses = 0  # response index: clients order by it

    def __call__(self, update: Update) -> None:
        if update.error is not None:
            self.sender.send(error_response(pb_utils, f"generation failed: {update.error}", "INTERNAL"), flags=FINAL)
            return
        if update.final and update.usage and update.usage.get("stop_reason") == "cancelled":
            # The final flag alone: a cancelled job's response with outputs makes the ensemble schedule a vocoder
            # step for a request that is going away, and tritonserver 2.51 then keeps the ensemble request in
            # flight for good (SIGTERM waits out the exit timeout and exits 1; docs/triton-notes.md).
            self.sender.send(flags=FINAL)
            return
        windows = update.windows or [None]
        for i, window in enumerate(windows):
            first, last = i == 0, i == len(windows) - 1
            outputs = tensors(pb_utils, self._window(window).to_tensors()) + [
                pb_utils.Tensor(T.TEXT_TOKENS.name, np.array([update.text_tokens if first else []], dtype=np.int64)),
                string_tensor(pb_utils, T.TEXT_DELTA.name, update.text_delta if first else ""),
                pb_utils.Tensor(
                    T.ROWS.name, np.array([update.rows], dtype=np.int64).reshape(1, -1, 2) if first else NO_ROWS
                ),
                pb_utils.Tensor(
                    T.TURN_ROWS.name,
                    update.turn_rows.numpy()[None] if last and update.turn_rows is not None else NO_ROWS,
                ),
                pb_utils.Tensor(T.FINAL.name, np.array([[update.final and last]], dtype=np.bool_)),
                string_tensor(pb_utils, T.USAGE.name, json.dumps(update.usage) if last and update.usage else ""),
            ]
            flags = FINAL if update.final and last else 0
            self.sender.send(pb_utils.InferenceResponse(output_tensors=outputs), flags=flags)

    def _window(self, window) -> Window:
        """The engine's window (or None: this response carries no speech) as the contract's Window."""
        if window is None:
            out = Window(response_index=self.responses, voice_id=self.voice_id)
        else:
            out = Window(
                n_context=window.n_context,
                n_chunk=window.n_chunk,
                first_position=window.first_position,
                finalize=window.finalize,
                chunk_index=self.chunks,
                has_window=True,
                response_index=self.responses,
                tokens=tuple(window.tokens),
                voice_id=self.voice_id,
            )
            self.chunks += 1
        self.responses += 1
        return out
