"""Continuous batching: concurrent requests share batched decode steps on one `LLMRuntime`.

One scheduler thread loops: admit waiting jobs into free KV slots (prefill, first step), run ONE batched
decode step for every running job, hand each job's new output to its `emit` callback, and drop finished or
cancelled jobs (their slots are freed at once). New requests join between steps. The generation rules are
`SequenceState`'s, so a served answer equals the in-process one token for token.

Each `Update` carries what a client needs from that step: new text tokens and their text, the speech windows
that became decodable (the vocoder's stateless contract), the new grid rows; the final one adds usage and the
exchange's history rows.

Prefix reuse: a job that finishes cleanly leaves its slot's K/V cached in the runtime (see `LLMRuntime`); the next
job whose prompt starts with those rows (the next turn of that conversation) prefills only what follows them.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from moss_speech.builders.codec.streaming import DecodeWindow, ready_windows
from moss_speech.builders.llm.generate import SamplingParams, SequenceState, Step, check_context
from moss_speech.builders.llm.prompt import Modality, PromptBuilder, Turn
from moss_speech.builders.llm.tokens import SpecialTokens
from moss_speech.contract.streaming import StreamingConfig
from moss_speech.model_repository.runtime.base import LLMRuntime


class QueueFullError(RuntimeError):
    """More requests are waiting than the engine accepts (answer RESOURCE_EXHAUSTED)."""


@dataclass
class Update:
    text_tokens: list[int] = field(default_factory=list)
    text_delta: str = ""
    windows: list[DecodeWindow] = field(default_factory=list)
    rows: list[tuple[int, int]] = field(default_factory=list)
    final: bool = False
    usage: dict | None = None
    turn_rows: torch.Tensor | None = None  # final only: history rows of this exchange
    error: Exception | None = None


@dataclass
class Request:
    request_id: str
    turn: Turn  # the user's new turn (speech codes or text)
    output: Modality = "speech"
    history: torch.Tensor | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    voice_id: str = "default"
    system_prompt: str | None = None
    session_id: str | None = None  # prefix-cache key: a conversation reuses only its own cached K/V


@dataclass
class _Job:
    req: Request
    emit: Callable[[Update], None]
    is_cancelled: Callable[[], bool]
    prompt: torch.Tensor
    state: SequenceState
    slot: int = -1
    cached_rows: int = 0  # prompt rows whose K/V came from the prefix cache
    submitted: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    speech: list[int] = field(default_factory=list)
    emitted_speech: int = 0
    text_ids: list[int] = field(default_factory=list)
    text_sent: str = ""
    pending_rows: list[tuple[int, int]] = field(default_factory=list)  # rows not yet sent
    cancelled: bool = False


class Engine:
    def __init__(
        self,
        runtime: LLMRuntime,
        prompts: PromptBuilder,
        streaming: StreamingConfig | None = None,
        max_queue: int = 64,
        on_step: Callable[[int], None] | None = None,
        tokens: SpecialTokens | None = None,
        prefix_cache: bool = True,
    ):
        self.runtime = runtime
        runtime.prefix_cache = runtime.prefix_cache and prefix_cache  # a runtime may not support it (TensorRT)
        self.prompts = prompts
        self.tokens = tokens or prompts.tokens  # the checkpoint's ids: stop ids, SOSP/EOSP, pads
        self.streaming = streaming or StreamingConfig()
        self.max_queue = max_queue
        self.on_step = on_step  # called with the number of live sequences after every step (metrics)
        self.cfg = runtime.config
        self._waiting: deque[_Job] = deque()
        self._running: list[_Job] = []
        self._cancel_ids: set[str] = set()
        self._cv = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.max_batch_seen = 0  # largest decode batch so far (tests, diagnostics)

    # --- API -----------------------------------------------------------------------------------------------
    def submit(
        self, req: Request, emit: Callable[[Update], None], is_cancelled: Callable[[], bool] = lambda: False
    ) -> None:
        """Queue a request; raises ContextLengthError / QueueFullError / ValueError before queueing."""
        prompt = self.prompts.continue_conversation(req.history, req.turn, req.output, req.system_prompt)
        check_context(prompt.shape[0], self.runtime.max_context, "the served context")
        job = _Job(req, emit, is_cancelled, prompt, SequenceState(prompt, req.params, self.cfg, self.tokens))
        with self._cv:
            if len(self._waiting) >= self.max_queue:
                raise QueueFullError(f"{len(self._waiting)} requests are already waiting (max_queue {self.max_queue})")
            self._waiting.append(job)
            self._cv.notify()

    def cancel(self, request_id: str) -> None:
        with self._cv:
            self._cancel_ids.add(request_id)
            self._cv.notify()

    @property
    def active(self) -> int:
        return len(self._running)

    def owns(self, request_id: str) -> bool:
        """Whether a job with this id is waiting or running here (cancel routing between instances)."""
        with self._cv:
            jobs = list(self._running) + list(self._waiting)
        return any(j.req.request_id == request_id for j in jobs)

    def request_ids(self) -> list[str]:
        with self._cv:
            return [j.req.request_id for j in list(self._running) + list(self._waiting)]

    def start(self) -> Engine:
        self._thread = threading.Thread(target=self._loop, name="llm-scheduler", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        if self._thread:
            self._thread.join(timeout)

    # --- scheduler -----------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stop and not self._waiting and not self._running:
                    self._cv.wait()
                if self._stop:
                    break
            self.step()
        for job in self._running + list(self._waiting):
            self._finish(job, error=RuntimeError("the LLM engine is shutting down"))

    def step(self) -> None:
        """Admit what fits, then one batched decode step over every running job."""
        self._reap_cancelled()
        while self._waiting and self.runtime.free_slots:
            with self._cv:
                job = self._waiting.popleft()
            self._admit(job)
        live = [j for j in self._running if not j.state.finished]
        if live:
            for j in live:
                j.state.begin_step()
            rows = torch.tensor([j.state.last_row for j in live], dtype=torch.long)
            try:
                text, audio = self.runtime.decode([j.slot for j in live], rows)
            except Exception as e:  # noqa: BLE001 - a failing step ends these requests, not the server
                for j in live:
                    self._finish(j, error=e)
            else:
                self.max_batch_seen = max(self.max_batch_seen, len(live))
                for i, j in enumerate(live):
                    self._advance(j, j.state.choose(text[i], audio[i], self._context_left(j)))
        if self.on_step:
            self.on_step(len(self._running))

    def _context_left(self, job: _Job) -> int:
        return self.runtime.max_context - (self.runtime.length(job.slot) + 1)

    def _admit(self, job: _Job) -> None:
        if job.cancelled or job.is_cancelled():
            self._finish(job, cancelled=True)
            return
        job.slot, job.cached_rows = self.runtime.acquire_for(job.prompt, job.req.session_id)
        self._running.append(job)
        try:
            job.state.begin_step()
            text, audio = self.runtime.prefill(job.slot, job.prompt)
        except Exception as e:  # noqa: BLE001
            self._finish(job, error=e)
            return
        self._advance(job, job.state.choose(text, audio, self._context_left(job)))

    def _reap_cancelled(self) -> None:
        with self._cv:
            ids, self._cancel_ids = self._cancel_ids, set()
        for job in list(self._running) + list(self._waiting):
            if job.req.request_id in ids or job.is_cancelled():
                job.cancelled = True
                if job in self._waiting:
                    with self._cv:
                        self._waiting.remove(job)
                self._finish(job, cancelled=True)

    def _advance(self, job: _Job, step: Step) -> None:
        if job.first_token_at is None:
            job.first_token_at = time.perf_counter()
        update = Update(rows=[(step.text_token, step.audio_token)])
        speech_done = False
        if step.mode == "audio":
            if step.audio_token == self.tokens.eosp_id:
                speech_done = True
            else:
                job.speech.append(step.audio_token)
        elif step.text_token not in (self.tokens.modality_pad_id, self.tokens.sosp_id):
            job.text_ids.append(step.text_token)
            text = self.prompts.decode_text(job.text_ids)
            if not text.endswith("\ufffd"):  # hold back an incomplete UTF-8 sequence
                update.text_tokens = [step.text_token]
                update.text_delta = text[len(job.text_sent) :]
                job.text_sent = text
        if job.req.output == "speech" or job.speech:
            update.windows = ready_windows(
                job.speech, job.emitted_speech, speech_done or step.finished, self.streaming, job.req.voice_id
            )
            job.emitted_speech += sum(w.n_chunk for w in update.windows)
        if step.finished:
            self._finish(job, last=update)
        elif update.text_tokens or update.windows:
            self._send(job, update)
        else:  # nothing a client can use yet: keep the rows for the next update
            job.pending_rows += update.rows

    def _send(self, job: _Job, update: Update) -> None:
        if job.pending_rows:
            update.rows = job.pending_rows + update.rows
            job.pending_rows = []
        try:
            job.emit(update)
        except Exception:  # noqa: BLE001 - the client went away; stop generating for it
            job.cancelled = True

    def _finish(
        self, job: _Job, last: Update | None = None, cancelled: bool = False, error: Exception | None = None
    ) -> None:
        if job in self._running:
            self._running.remove(job)
        if job.slot >= 0:
            # A clean finish keeps the K/V for the conversation's next turn; a failed step may have left it partial.
            self.runtime.release(job.slot, keep=error is None and not cancelled, key=job.req.session_id)
            job.slot = -1
        update = last or Update()
        update.final = True
        update.error = error
        generated = torch.tensor(job.state.rows, dtype=torch.long).reshape(-1, 2)
        now = time.perf_counter()
        update.usage = {
            "request_id": job.req.request_id,
            "prompt_tokens": int(job.prompt.shape[0]),
            "cached_tokens": job.cached_rows,
            "generated_tokens": len(job.state.rows),
            "stop_reason": "cancelled" if cancelled else ("error" if error else job.state.stop_reason),
            "ttft_ms": None if job.first_token_at is None else round((job.first_token_at - job.submitted) * 1e3, 3),
            "total_ms": round((now - job.submitted) * 1e3, 3),
            "speech_tokens": len(job.speech),
        }
        if not cancelled and error is None:
            update.turn_rows = self.prompts.exchange_rows(job.req.turn, job.req.output, generated)
        self._send(job, update)
