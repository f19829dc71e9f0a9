"""Tensor specs of every Triton model and ensemble: names, data types, shapes.

The config.pbtxt templates, the adapters, the service's Triton client and the docs take their names from here.
Shapes are per item (Triton adds the batch dimension; -1 = any length). `ragged` inputs of dynamically batched
models are batched without padding.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from moss_speech.contract import window

NUMPY = {"FP32": np.float32, "INT64": np.int64, "BOOL": np.bool_, "STRING": np.object_}


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str  # Triton data type without the TYPE_ prefix
    dims: tuple[int, ...]
    meaning: str
    optional: bool = False
    ragged: bool = False

    @property
    def triton_type(self) -> str:
        """As config.pbtxt writes it."""
        return f"TYPE_{self.dtype}"

    @property
    def wire_type(self) -> str:
        """As the inference protocol (and tritonclient) names it."""
        return "BYTES" if self.dtype == "STRING" else self.dtype

    @property
    def numpy_dtype(self) -> type:
        return NUMPY[self.dtype]


@dataclass(frozen=True)
class Model:
    name: str
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]

    def input(self, name: str) -> Tensor:
        return next(t for t in self.inputs if t.name == name)

    def output(self, name: str) -> Tensor:
        return next(t for t in self.outputs if t.name == name)


def _ragged(tensors: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """Inputs of a dynamically batched model: variable-length ones batch without padding."""
    return tuple(replace(t, ragged=-1 in t.dims) for t in tensors)


# --- the user's turn ---------------------------------------------------------------------------------------
AUDIO = Tensor("AUDIO", "FP32", (-1,), "the user's turn, 16 kHz mono PCM in [-1, 1]")
TEXT = Tensor("TEXT", "STRING", (1,), "the user's turn as UTF-8 text")
CODES = Tensor("CODES", "INT64", (-1,), "speech codes of the user's turn (12.5 Hz)")
HISTORY = Tensor("HISTORY", "INT64", (-1, 2), "earlier turns as grid rows (may be 0 rows)", optional=True)
OUTPUT_MODALITY = Tensor("OUTPUT_MODALITY", "STRING", (1,), "`speech` (default) or `text`", optional=True)
SAMPLING = Tensor(
    "SAMPLING", "STRING", (1,), "JSON of `SamplingParams`; missing fields take the defaults", optional=True
)
VOICE = Tensor("VOICE", "STRING", (1,), "voice id for the vocoder (default `default`)", optional=True)
SYSTEM_PROMPT = Tensor("SYSTEM_PROMPT", "STRING", (1,), "empty = the reference default", optional=True)
TURN_INPUTS = (HISTORY, OUTPUT_MODALITY, SAMPLING, VOICE, SYSTEM_PROMPT)  # every ensemble passes them to llm
CANCEL_REQUEST_ID = Tensor(
    "CANCEL_REQUEST_ID",
    "STRING",
    (1,),
    "control request: stop the job with this request id (every other input absent)",
    optional=True,
)

# --- llm -> vocoder ----------------------------------------------------------------------------------------
WINDOW_TOKENS = Tensor(window.TOKENS, "INT64", (-1,), "context + chunk + lookahead speech tokens")
WINDOW_META = Tensor(
    window.META, "INT64", (len(window.META_FIELDS),), "the window's named integers: " + ", ".join(window.META_FIELDS)
)
VOICE_ID = Tensor(window.VOICE, "STRING", (1,), "voice id of the window")
# The fields the vocoder passes through, so every ensemble response comes from one step.
PASSTHROUGH = (
    Tensor("TEXT_TOKENS", "INT64", (-1,), "new text-channel tokens (text mode only)"),
    Tensor("TEXT_DELTA", "STRING", (1,), "their decoded text"),
    Tensor("ROWS", "INT64", (-1, 2), "new generated grid rows"),
    Tensor(
        "TURN_ROWS",
        "INT64",
        (-1, 2),
        "final response only: this exchange as history rows (the wrapped user turn, then the wrapped "
        "assistant turn: reply prefix + generated rows + closing newline); the next request sends "
        "`HISTORY + TURN_ROWS`",
    ),
    Tensor("FINAL", "BOOL", (1,), "true on the last response"),
    Tensor(
        "USAGE",
        "STRING",
        (1,),
        "JSON on the final response: `prompt_tokens`, `generated_tokens`, "
        "`stop_reason`, `ttft_ms`, `total_ms`, `speech_tokens`",
    ),
)
TEXT_TOKENS, TEXT_DELTA, ROWS, TURN_ROWS, FINAL, USAGE = PASSTHROUGH
PASSTHROUGH_SUFFIX = "_OUT"  # the vocoder's name of a passed-through field

# --- vocoder -> client -------------------------------------------------------------------------------------
AUDIO_CHUNK = Tensor("AUDIO_CHUNK", "FP32", (-1,), "new 24 kHz PCM")
AUDIO_SEQ = Tensor("AUDIO_SEQ", "INT64", (1,), "sequence number of the chunk (-1 when the response has no audio)")
SEQ = Tensor(
    "SEQ",
    "INT64",
    (1,),
    "index of the response in its stream (0, 1, ...): the vocoder keeps order "
    "(`preserve_ordering`), and clients can check it",
)
VOCODER_OWN = (AUDIO_CHUNK, AUDIO_SEQ, SEQ)

# --- voice: create / list / get / delete created voices (one request at a time, no batching) ----------------
VOICE_OP = Tensor("VOICE_OP", "STRING", (1,), "`create`, `list`, `get` or `delete`")
VOICE_ARGS = Tensor(
    "VOICE_ARGS",
    "STRING",
    (1,),
    "JSON: `owner` (API key id), and `name`, `description`, `sample_rate` (create) or `voice_id` (get, delete)",
)
VOICE_PCM = Tensor(
    "VOICE_PCM", "FP32", (-1,), "create: the recording, mono PCM at `sample_rate`, 3-30 s", optional=True
)
VOICE_INFO = Tensor(
    "VOICE_INFO", "STRING", (1,), "JSON: the voice's record (create, get, delete) or `voices`, a list of records (list)"
)
PROMPT_CODES = Tensor(
    "PROMPT_CODES", "INT64", (-1,), "create: the voice's prompt codes (speech encoder, 16 kHz); empty otherwise"
)
PROMPT_MEL = Tensor("PROMPT_MEL", "FP32", (80, -1), "create: 24 kHz prompt mel, 4 frames per prompt code")
XVECTOR = Tensor("XVECTOR", "FP32", (-1,), "create: CAM++ x-vector (192)")

# --- models --------------------------------------------------------------------------------------------------
SPEECH_ENCODER = Model("speech_encoder", _ragged((AUDIO,)), (CODES,))
LLM = Model(
    "llm",
    (replace(CODES, optional=True), replace(TEXT, optional=True), *TURN_INPUTS, CANCEL_REQUEST_ID),
    (WINDOW_TOKENS, WINDOW_META, VOICE_ID, *PASSTHROUGH),
)
VOCODER = Model(
    "vocoder",
    _ragged(LLM.outputs),
    (*VOCODER_OWN, *(replace(t, name=t.name + PASSTHROUGH_SUFFIX) for t in PASSTHROUGH)),
)
S2S = Model("s2s", (AUDIO, *TURN_INPUTS), (*VOCODER_OWN, *PASSTHROUGH))  # speech in
T2S = Model("t2s", (TEXT, *TURN_INPUTS), (*VOCODER_OWN, *PASSTHROUGH))  # text in
VOICE_MODEL = Model("voice", (VOICE_OP, VOICE_ARGS, VOICE_PCM), (VOICE_INFO, PROMPT_CODES, PROMPT_MEL, XVECTOR))
PYTHON_MODELS = (SPEECH_ENCODER, LLM, VOCODER, VOICE_MODEL)
ENSEMBLES = (S2S, T2S)
