"""Triton adapter of the `voice` model: create, list, get and delete created voices.

`create` computes the conditioning with the codec runtime the repository serves (`CodecPipeline.make_voice`:
prompt codes from the speech encoder graphs on the 16 kHz resample, the 24 kHz prompt mel, both cut to the
loudest `$MOSS_SPEECH_VOICE_PROMPT_TOKENS` tokens (default `VoiceLimits.prompt_tokens`), the CAM++ x-vector of the
whole recording)
and writes it to the voice store that every vocoder instance reads (`builders.codec.voice_store`). Errors start
with the gRPC status name the service returns (`INVALID_ARGUMENT: ...`, `NOT_FOUND: ...`, `RESOURCE_EXHAUSTED:
...`), and name no path or internal detail.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import asdict
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from moss_speech.builders.codec.config import XVECTOR_DIM
from moss_speech.builders.codec.voice_store import VoiceStore, default_store_dir, new_voice_id
from moss_speech.contract import tensors as T
from moss_speech.contract.audio import AudioError
from moss_speech.contract.voices import VoiceLimits, VoiceRecordingError, check_name, check_recording
from moss_speech.model_repository.adapters.common import array_input, error_response, load_codec, string_input

LIMIT_ENV = "MOSS_SPEECH_MAX_VOICES_PER_KEY"
PROMPT_ENV = "MOSS_SPEECH_VOICE_PROMPT_TOKENS"  # the prompt cap (VoiceLimits.prompt_tokens)
N_MELS = T.PROMPT_MEL.dims[0]


class VoiceOpError(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")


def open_store(args) -> VoiceStore:
    """The store both this model and the vocoder use: `$MOSS_SPEECH_VOICE_STORE` or `<repository>.voices`."""
    return VoiceStore(default_store_dir(Path(args["model_repository"]).parent))


class TritonPythonModel:
    def initialize(self, args):
        self.codec, params = load_codec(args)
        self.store = open_store(args)
        default = VoiceLimits()
        self.limits = VoiceLimits(
            max_per_key=int(os.environ.get(LIMIT_ENV, default.max_per_key)),
            prompt_tokens=int(os.environ.get(PROMPT_ENV, default.prompt_tokens)),
        )
        self.builtin = {v: p for v, p in self.codec.voices.builtin_files.items()}
        self._create_lock = threading.Lock()  # the per-key count and the write are one step

    # ---- ops
    def _builtin_records(self) -> list[dict]:
        import soundfile as sf

        return [
            {
                "voice_id": v,
                "name": v,
                "description": "built-in",
                "owner": "",
                "builtin": True,
                "duration_seconds": round(sf.info(str(p)).duration, 3),
                "created_unix": p.stat().st_mtime,
            }
            for v, p in sorted(self.builtin.items())
        ]

    def _record(self, voice_id: str, owner: str) -> dict:
        try:
            record = self.store.record(voice_id)
        except (KeyError, ValueError):
            record = None
        if record is None or record.owner != owner:  # another key's voice is as unknown as a missing one
            raise VoiceOpError("NOT_FOUND", f"unknown voice {voice_id!r}")
        return asdict(record) | {"builtin": False}

    def _check_count(self, owner: str) -> None:
        if len(self.store.records(owner)) >= self.limits.max_per_key:
            raise VoiceOpError(
                "RESOURCE_EXHAUSTED",
                f"this API key already has {self.limits.max_per_key} voices (the limit); delete one first",
            )

    def _create(self, args: dict, pcm: np.ndarray | None) -> tuple[dict, np.ndarray, np.ndarray, np.ndarray]:
        owner, name, description = (
            str(args.get("owner", "")),
            str(args.get("name", "")),
            str(args.get("description", "")),
        )
        rate = int(args.get("sample_rate", 0))
        if pcm is None:
            raise VoiceOpError("INVALID_ARGUMENT", "create needs the recording (VOICE_PCM)")
        try:
            check_name(name, description, self.limits)
            seconds = check_recording(pcm, rate, self.limits)
        except VoiceRecordingError as e:
            raise VoiceOpError("INVALID_ARGUMENT", str(e)) from None
        self._check_count(owner)  # before the encoder runs; again under the lock before the write
        voice_id = new_voice_id()
        try:
            voice = self.codec.make_voice(voice_id, pcm, rate, prompt_tokens=self.limits.prompt_tokens)
        except AudioError as e:
            raise VoiceOpError("INVALID_ARGUMENT", f"recording: {e}") from None
        with self._create_lock:
            self._check_count(owner)
            record = self.store.save(
                voice_id, name, description, owner, seconds, voice.prompt_codes, voice.prompt_mel, voice.xvector
            )
        return asdict(record) | {"builtin": False}, voice.prompt_codes, voice.prompt_mel, voice.xvector

    def _run(self, op: str, args: dict, pcm: np.ndarray | None):
        empty = (np.zeros(0, np.int64), np.zeros((N_MELS, 0), np.float32), np.zeros(XVECTOR_DIM, np.float32))
        owner = str(args.get("owner", ""))
        if op == "create":
            return self._create(args, pcm)
        if op == "list":
            created = [asdict(r) | {"builtin": False} for r in self.store.records(owner)]
            return {"voices": self._builtin_records() + created}, *empty
        voice_id = str(args.get("voice_id", ""))
        if op == "get":
            if voice_id in self.builtin:
                return next(r for r in self._builtin_records() if r["voice_id"] == voice_id), *empty
            return self._record(voice_id, owner), *empty
        if op == "delete":
            if voice_id in self.builtin:
                raise VoiceOpError("INVALID_ARGUMENT", f"voice {voice_id!r} is built in and cannot be deleted")
            record = self._record(voice_id, owner)
            try:
                self.store.delete(voice_id)
            except FileNotFoundError:  # deleted meanwhile
                raise VoiceOpError("NOT_FOUND", f"unknown voice {voice_id!r}") from None
            return record, *empty
        raise VoiceOpError("INVALID_ARGUMENT", f"unknown voice operation {op!r}")

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                op = string_input(pb_utils, request, T.VOICE_OP.name) or ""
                try:
                    args = json.loads(string_input(pb_utils, request, T.VOICE_ARGS.name) or "{}")
                except ValueError:
                    raise VoiceOpError("INVALID_ARGUMENT", "VOICE_ARGS is not JSON") from None
                pcm = array_input(pb_utils, request, T.VOICE_PCM.name)
                pcm = None if pcm is None else pcm.reshape(-1).astype(np.float32)
                info, codes, mel, xvec = self._run(op, args if isinstance(args, dict) else {}, pcm)
                responses.append(
                    pb_utils.InferenceResponse(
                        [
                            pb_utils.Tensor(
                                T.VOICE_INFO.name, np.array([[json.dumps(info).encode()]], dtype=np.object_)
                            ),
                            pb_utils.Tensor(T.PROMPT_CODES.name, np.asarray(codes, np.int64)[None]),
                            pb_utils.Tensor(T.PROMPT_MEL.name, np.asarray(mel, np.float32)[None]),
                            pb_utils.Tensor(T.XVECTOR.name, np.asarray(xvec, np.float32)[None]),
                        ]
                    )
                )
            except VoiceOpError as e:
                responses.append(error_response(pb_utils, str(e)))
            except Exception as e:  # noqa: BLE001 - logged here, a plain message to the client
                pb_utils.Logger.log_error(f"voice: {type(e).__name__}: {e}")
                responses.append(error_response(pb_utils, "INTERNAL: the voice could not be processed", "INTERNAL"))
        return responses
