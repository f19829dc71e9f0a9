"""Server VAD: silero-vad's ONNX model on onnxruntime (no torch), and the endpointing state machine.

The model ships inside the `silero-vad` wheel (`silero_vad/data/silero_vad.onnx`); it is located with
`importlib.util.find_spec`, which does not import the package (its `__init__` imports torch). Nothing is
downloaded. One InferenceSession serves every connection: the recurrent state is an input, kept per connection.

The model takes 512-sample frames at 16 kHz (32 ms) preceded by the previous frame's last 64 samples.
"""

from __future__ import annotations

import importlib.util
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

VAD_RATE = 16000
FRAME = 512  # samples per decision at 16 kHz
CONTEXT = 64
FRAME_MS = 1000 * FRAME / VAD_RATE  # 32 ms
NEG_MARGIN = 0.15  # silence = probability below threshold - margin (silero's own hysteresis)
# Silero's probability falls about two frames after speech energy ends (measured on espeak-ng speech: 1.0 until
# ~40 ms after the last voiced sample, below 0.35 ~100 ms after it). The silence clock starts that much earlier, so
# `silence_duration_ms` counts from the end of speech rather than from the model's late decision.
OFFSET_LAG_MS = 64


def model_path() -> Path:
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("server VAD needs the `silero-vad` package (extra `realtime`)")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "silero_vad.onnx"
    if not path.is_file():
        raise RuntimeError(f"silero-vad's ONNX model is missing: {path}")
    return path


_session = None
_session_lock = threading.Lock()


def shared_session():
    """The one onnxruntime session (single-threaded: decisions are tiny and connections are many)."""
    global _session
    with _session_lock:
        if _session is None:
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = opts.inter_op_num_threads = 1
            _session = ort.InferenceSession(str(model_path()), sess_options=opts, providers=["CPUExecutionProvider"])
        return _session


class SileroVAD:
    """Speech probability per 32 ms frame, with per-stream recurrent state."""

    def __init__(self) -> None:
        self.session = shared_session()
        self.reset()

    def reset(self) -> None:
        self._state = np.zeros((2, 1, 128), np.float32)
        self._context = np.zeros((1, CONTEXT), np.float32)

    def __call__(self, frame: np.ndarray) -> float:
        x = np.concatenate([self._context, frame.reshape(1, FRAME).astype(np.float32)], axis=1)
        out, self._state = self.session.run(
            None, {"input": x, "state": self._state, "sr": np.array(VAD_RATE, np.int64)}
        )
        self._context = x[:, -CONTEXT:]
        return float(out.reshape(-1)[0])


@dataclass
class VadConfig:
    threshold: float = 0.5
    prefix_padding_ms: int = 300
    silence_duration_ms: int = 500
    create_response: bool = True
    interrupt_response: bool = True

    def as_dict(self) -> dict:
        return {
            "type": "server_vad",
            "threshold": self.threshold,
            "prefix_padding_ms": self.prefix_padding_ms,
            "silence_duration_ms": self.silence_duration_ms,
            "create_response": self.create_response,
            "interrupt_response": self.interrupt_response,
            "idle_timeout_ms": None,
        }


@dataclass
class VadEvent:
    kind: str  # "start" | "stop"
    ms: int  # audio_start_ms (speech start minus prefix padding, >= 0) or audio_end_ms (when silence was long enough)


class Endpointer:
    """Turns 16 kHz int16 audio into speech start/stop events at stream positions (ms since the stream began).

    Start: `MIN_SPEECH_FRAMES` consecutive frames at or above the threshold. Stop: silence (below threshold -
    NEG_MARGIN) lasting `silence_duration_ms`; a frame at or above the threshold ends the silence.
    """

    MIN_SPEECH_FRAMES = 2

    def __init__(self, config: VadConfig) -> None:
        self.config = config
        self.vad = SileroVAD()
        self._pending = np.zeros(0, np.float32)
        self.position = 0  # samples at 16 kHz processed into decisions
        self.speaking = False
        self._run = 0
        self._silence_start: int | None = None
        self.last_prob = 0.0

    def reset(self) -> None:
        """Forget speech state (after a commit or clear); the stream position keeps counting."""
        self.speaking, self._run, self._silence_start = False, 0, None

    def feed(self, pcm16: np.ndarray) -> list[VadEvent]:
        x = np.concatenate([self._pending, np.asarray(pcm16, np.float32) / 32768.0])
        n = len(x) // FRAME
        self._pending = x[n * FRAME :]
        events: list[VadEvent] = []
        c = self.config
        for i in range(n):
            p = self.last_prob = self.vad(x[i * FRAME : (i + 1) * FRAME])
            start = self.position
            self.position += FRAME
            if not self.speaking:
                self._run = self._run + 1 if p >= c.threshold else 0
                if self._run >= self.MIN_SPEECH_FRAMES:
                    self.speaking, self._silence_start = True, None
                    onset = start - (self.MIN_SPEECH_FRAMES - 1) * FRAME
                    events.append(VadEvent("start", max(0, _ms(onset) - c.prefix_padding_ms)))
            elif p >= c.threshold:
                self._silence_start = None
            elif p < c.threshold - NEG_MARGIN or self._silence_start is not None:
                if self._silence_start is None:
                    self._silence_start = max(0, start - OFFSET_LAG_MS * VAD_RATE // 1000)
                if _ms(self.position - self._silence_start) >= c.silence_duration_ms:
                    events.append(VadEvent("stop", _ms(self.position)))
                    self.reset()
        return events


def _ms(samples: int) -> int:
    return int(round(1000 * samples / VAD_RATE))
