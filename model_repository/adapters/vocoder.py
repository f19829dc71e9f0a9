"""Triton adapter of the `vocoder` model: stateless window decoding, batched across requests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from moss_speech.builders.codec.streaming import DecodeWindow
from moss_speech.builders.codec.voice_store import VoiceStore, default_store_dir
from moss_speech.builders.codec.voices import UnknownVoiceError
from moss_speech.contract import tensors as T
from moss_speech.contract.window import Window
from moss_speech.model_repository.adapters.common import error_response, load_codec, string_input


def read_window(request) -> Window:
    def get(name: str):
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        return None if tensor is None else tensor.as_numpy()

    return Window.from_tensors(
        get(T.WINDOW_TOKENS.name), get(T.WINDOW_META.name), string_input(pb_utils, request, T.VOICE_ID.name)
    )


class TritonPythonModel:
    def initialize(self, args):
        self.codec, _ = load_codec(args)
        # created voices: read from the shared voice store on a miss (model_repository/adapters/voice.py)
        self.codec.voices.store = VoiceStore(default_store_dir(Path(args["model_repository"]).parent))
        # Warm up (voice conditioning, first-call allocations) so the first client does not pay for it.
        self.codec.decode_windows([DecodeWindow(tokens=[0] * 8, n_context=0, n_chunk=5, first_position=0)])

    def execute(self, requests):
        windows, owners, errors, metas = [], [], {}, {}
        for i, request in enumerate(requests):
            try:
                w = metas[i] = read_window(request)
                if w.has_window:
                    self.codec.voices.get(w.voice_id)  # an unknown/deleted voice fails its request, not the batch
                    windows.append(
                        DecodeWindow(
                            tokens=list(w.tokens),
                            n_context=w.n_context,
                            n_chunk=w.n_chunk,
                            first_position=w.first_position,
                            finalize=w.finalize,
                            voice_id=w.voice_id,
                        )
                    )
                    owners.append(i)
            except (ValueError, UnknownVoiceError) as e:
                errors[i] = str(e)
        audio: dict[int, np.ndarray] = {}
        if windows:
            try:
                for owner, pcm in zip(owners, self.codec.decode_windows(windows), strict=True):
                    audio[owner] = pcm
            except Exception as e:  # noqa: BLE001 - answer every request of the batch with the error
                errors.update({o: f"vocoder failed: {e}" for o in owners})
        responses = []
        for i, request in enumerate(requests):
            if i in errors:
                responses.append(error_response(pb_utils, errors[i], "INTERNAL"))
                continue
            w = metas[i]
            pcm = audio.get(i, np.zeros(0, dtype=np.float32)).astype(np.float32, copy=False)
            outputs = [
                pb_utils.Tensor(T.AUDIO_CHUNK.name, pcm.reshape(1, -1)),
                pb_utils.Tensor(T.AUDIO_SEQ.name, np.array([[w.chunk_index if i in audio else -1]], dtype=np.int64)),
                pb_utils.Tensor(T.SEQ.name, np.array([[w.response_index]], dtype=np.int64)),
            ]
            for t in T.PASSTHROUGH:
                value = pb_utils.get_input_tensor_by_name(request, t.name).as_numpy()
                outputs.append(pb_utils.Tensor(t.name + T.PASSTHROUGH_SUFFIX, value))
            responses.append(pb_utils.InferenceResponse(output_tensors=outputs))
        return responses
