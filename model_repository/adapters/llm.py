"""Triton adapter of the `llm` model: decoupled, continuous batching in the library's `Engine`.

Requests only register a job and return; the engine's scheduler thread streams responses. A request whose
only input is `CANCEL_REQUEST_ID` cancels the job with that request id (Triton 2.51 does not tell a decoupled
step inside an ensemble that its client cancelled; see docs/contracts.md).
"""

from __future__ import annotations

import json
import uuid

import numpy as np
import torch
import triton_python_backend_utils as pb_utils
from pydantic import ValidationError

from moss_speech.builders.llm.generate import ContextLengthError, SamplingParams
from moss_speech.builders.llm.prompt import PromptBuilder, Turn
from moss_speech.model_repository.runtime.factory import load_llm_runtime
from moss_speech.model_repository.runtime.scheduler import Engine, QueueFullError, Request, Update
from moss_speech.model_repository.adapters.common import (
    LLM_ACTIVE_SEQUENCES,
    LLM_KV_SLOTS,
    array_input,
    artifact_path,
    error_response,
    model_parameters,
    serving_config,
    string_input,
    string_tensor,
)

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
NO_ROWS = np.zeros((1, 0, 2), dtype=np.int64)


class TritonPythonModel:
    def initialize(self, args):
        params = model_parameters(args)
        serving = serving_config(params)
        runtime = load_llm_runtime(serving, params["checkpoint_dir"], artifact_path(args, params, "llm_artifact"))
        # Every token id (stop ids, chat markers, pads, SOSP/EOSP) from the checkpoint's files, read once here.
        prompts = PromptBuilder.from_dir(params["checkpoint_dir"], runtime.config)
        self.family = pb_utils.MetricFamily(name=LLM_ACTIVE_SEQUENCES, description="sequences holding a KV slot",
                                            kind=pb_utils.MetricFamily.GAUGE)
        self.gauge = self.family.Metric(labels={"model": "llm"})
        self.slots_family = pb_utils.MetricFamily(name=LLM_KV_SLOTS, description="KV slots (most sequences at once)",
                                                  kind=pb_utils.MetricFamily.GAUGE)
        self.slots_gauge = self.slots_family.Metric(labels={"model": "llm"})
        self.slots_gauge.set(serving.max_slots)
        self.engine = Engine(runtime, prompts, serving.streaming(), serving.max_queue, on_step=self.gauge.set,
                             tokens=prompts.tokens)
        self.engine.start()

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                cancel_id = string_input(pb_utils, request, "CANCEL_REQUEST_ID")
                if cancel_id is not None:
                    self.engine.cancel(cancel_id)
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
        codes = array_input(pb_utils, request, "CODES")
        text = string_input(pb_utils, request, "TEXT")
        if (codes is None) == (text is None):
            raise ValueError("exactly one of CODES (speech) and TEXT must be given")
        if codes is not None:
            codes = codes.reshape(-1)
            if codes.size == 0:
                raise ValueError("the spoken turn is empty (no speech codes)")
            turn = Turn("user", codes=codes.tolist())
        else:
            if not text.strip():
                raise ValueError("the text turn is empty")
            turn = Turn("user", text=text)
        history = array_input(pb_utils, request, "HISTORY")
        if history is not None:
            history = torch.from_numpy(np.ascontiguousarray(history.reshape(-1, 2), dtype=np.int64))
        output = string_input(pb_utils, request, "OUTPUT_MODALITY") or "speech"
        sampling = SamplingParams.model_validate_json(string_input(pb_utils, request, "SAMPLING") or "{}")
        return Request(request_id, turn, output, history, sampling,
                       voice_id=string_input(pb_utils, request, "VOICE") or "default",
                       system_prompt=string_input(pb_utils, request, "SYSTEM_PROMPT") or None)

    def finalize(self):
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
        windows = update.windows or [None]
        for i, window in enumerate(windows):
            first, last = i == 0, i == len(windows) - 1
            tensors = self._window(window) + [
                pb_utils.Tensor("TEXT_TOKENS", np.array([update.text_tokens if first else []], dtype=np.int64)),
                string_tensor(pb_utils, "TEXT_DELTA", update.text_delta if first else ""),
                pb_utils.Tensor("ROWS", np.array([update.rows], dtype=np.int64).reshape(1, -1, 2) if first
                                else NO_ROWS),
                pb_utils.Tensor("TURN_ROWS", update.turn_rows.numpy()[None] if last and update.turn_rows is not None
                                else NO_ROWS),
                pb_utils.Tensor("FINAL", np.array([[update.final and last]], dtype=np.bool_)),
                string_tensor(pb_utils, "USAGE", json.dumps(update.usage) if last and update.usage else ""),
            ]
            flags = FINAL if update.final and last else 0
            self.sender.send(pb_utils.InferenceResponse(output_tensors=tensors), flags=flags)

    def _window(self, window) -> list:
        if window is None:
            tokens, meta = [], [0, 0, 0, 0, -1, 0, self.responses]
        else:
            tokens = window.tokens
            meta = [window.n_context, window.n_chunk, window.first_position, int(window.finalize), self.chunks, 1,
                    self.responses]
            self.chunks += 1
        self.responses += 1
        return [pb_utils.Tensor("WINDOW_TOKENS", np.array([tokens], dtype=np.int64).reshape(1, -1)),
                pb_utils.Tensor("WINDOW_META", np.array([meta], dtype=np.int64)),
                string_tensor(pb_utils, "VOICE_ID", self.voice_id)]
