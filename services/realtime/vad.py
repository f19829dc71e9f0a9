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
# Silero's probability falls 40-100 ms after speech energy ends (espeak-ng speech: 1.0 until ~40 ms after the last
# voiced sample, below 0.35 ~100 ms after it). The end of speech is therefore located by energy in 10 ms blocks
# within SEARCH samples before the last speech frame's end: the last block within GATE_DB of the utterance's
# loudest block (and above twice the noise floor) ends the speech.
BLOCK = 160  # 10 ms at 16 kHz
SEARCH = 160 * BLOCK // 10  # 160 ms
RECENT = SEARCH + 8 * FRAME  # audio kept for that search (the VAD flips a few frames after the last speech frame)
GATE_DB = 35.0
FLOOR_RMS = 10 ** (-70 / 20)  # -70 dBFS: digital silence is never speech


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


def _block_rms(x: np.ndarray) -> np.ndarray:
    """RMS of each whole BLOCK of `x`, aligned to its end (a partial block at the start is dropped)."""
    n = len(x) // BLOCK
    if n == 0:
        return np.zeros(0, np.float32)
    b = x[len(x) - n * BLOCK :].reshape(n, BLOCK)
    return np.sqrt(np.mean(b * b, axis=1))


class Endpointer:
    """Turns 16 kHz int16 audio into speech start/stop events at stream positions (ms since the stream began).

    Start: `MIN_SPEECH_FRAMES` consecutive frames at or above the threshold. Stop: once the VAD says silence
    (below threshold - NEG_MARGIN; a frame at or above the threshold ends the silence), the end of speech is
    located inside the last speech frames by energy (silero's probability lags the audio by 40-100 ms), and the
    turn ends as soon as the audio reaches end of speech + `silence_duration_ms` — on a frame boundary, or inside
    the not yet evaluated tail when that tail is quiet, so the stop does not wait for the next 32 ms frame.
    """

    MIN_SPEECH_FRAMES = 2

    def __init__(self, config: VadConfig) -> None:
        self.config = config
        self.vad = SileroVAD()
        self._pending = np.zeros(0, np.float32)
        self._recent = np.zeros(0, np.float32)  # the last RECENT samples evaluated, ending at `position`
        self.position = 0  # samples at 16 kHz evaluated by the VAD
        self.last_prob = 0.0
        self._noise = 0.0  # block RMS of recent non-speech audio (a moving average)
        self.reset()

    def reset(self) -> None:
        """Forget speech state (after a commit or clear); the stream position keeps counting."""
        self.speaking, self._run = False, 0
        self._peak = 0.0  # loudest block of this utterance
        self._last_speech = 0  # end of the last frame at or above the threshold
        self._speech_end: int | None = None  # located end of speech while the VAD says silence

    def _gate(self) -> float:
        """Energy above which a block counts as speech: near the utterance's peak, above the noise floor."""
        return max(self._peak * 10 ** (-GATE_DB / 20), 2.0 * self._noise, FLOOR_RMS)

    def _locate_end(self) -> int:
        """End of speech: the end of the last loud block within SEARCH before the last speech frame's end."""
        back = self.position - self._last_speech  # samples evaluated after the last speech frame
        if back + BLOCK > len(self._recent):  # a long hesitation before the flip: keep the frame's end
            return self._last_speech
        region = self._recent[max(0, len(self._recent) - back - SEARCH) : len(self._recent) - back]
        rms = _block_rms(region)
        loud = np.nonzero(rms >= self._gate())[0]
        if len(loud) == 0:  # silero's lag is longer than SEARCH here: speech ended before the region
            return self._last_speech - len(rms) * BLOCK
        return self._last_speech - (len(rms) - 1 - int(loud[-1])) * BLOCK

    def feed(self, pcm16: np.ndarray) -> list[VadEvent]:
        x = np.concatenate([self._pending, np.asarray(pcm16, np.float32) / 32768.0])
        n = len(x) // FRAME
        self._pending = x[n * FRAME :]
        events: list[VadEvent] = []
        c = self.config
        for i in range(n):
            frame = x[i * FRAME : (i + 1) * FRAME]
            p = self.last_prob = self.vad(frame)
            start = self.position
            self.position += FRAME
            self._recent = np.concatenate([self._recent, frame])[-RECENT:]
            rms = _block_rms(frame)
            if not self.speaking:
                self._run = self._run + 1 if p >= c.threshold else 0
                if p < c.threshold - NEG_MARGIN:
                    self._noise = 0.9 * self._noise + 0.1 * float(np.median(rms))
                if self._run:
                    self._peak = max(self._peak, float(rms.max()))
                else:
                    self._peak = 0.0
                if self._run >= self.MIN_SPEECH_FRAMES:
                    self.speaking, self._last_speech, self._speech_end = True, self.position, None
                    onset = start - (self.MIN_SPEECH_FRAMES - 1) * FRAME
                    events.append(VadEvent("start", max(0, _ms(onset) - c.prefix_padding_ms)))
                continue
            if p >= c.threshold:  # speech (again)
                self._last_speech, self._speech_end = self.position, None
                self._peak = max(self._peak, float(rms.max()))
            elif self._speech_end is None and p < c.threshold - NEG_MARGIN:
                self._speech_end = self._locate_end()
            if self._speech_end is not None and self.position >= self._stop_at():
                events.append(VadEvent("stop", _ms(self._stop_at())))
                self.reset()
        if self.speaking and self._speech_end is not None:
            # The stop point may lie in the tail not yet evaluated (under one frame): a quiet tail ends the turn.
            need = self._stop_at() - self.position
            if 0 < need <= len(self._pending) and float(np.sqrt(np.mean(self._pending[:need] ** 2))) < self._gate():
                events.append(VadEvent("stop", _ms(self._stop_at())))
                self.reset()
        return events

    def _stop_at(self) -> int:
        assert self._speech_end is not None
        return self._speech_end + self.config.silence_duration_ms * VAD_RATE // 1000


def _ms(samples: int) -> int:
    return int(round(1000 * samples / VAD_RATE))
