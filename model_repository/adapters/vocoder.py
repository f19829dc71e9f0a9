"""Triton adapter of the `vocoder` model: stateless window decoding, batched across requests."""

from __future__ import annotations

import numpy as np
import triton_python_backend_utils as pb_utils

from moss_speech.builders.codec.streaming import DecodeWindow
from moss_speech.model_repository.adapters.common import error_response, load_codec, string_input

PASSTHROUGH = ("TEXT_TOKENS", "TEXT_DELTA", "ROWS", "TURN_ROWS", "FINAL", "USAGE")


class TritonPythonModel:
    def initialize(self, args):
        self.codec, _ = load_codec(args)
        # Warm up (voice conditioning, first-call allocations) so the first client does not pay for it.
        self.codec.decode_windows([DecodeWindow(tokens=[0] * 8, n_context=0, n_chunk=5, first_position=0)])

    def execute(self, requests):
        windows, owners, errors = [], [], {}
        for i, request in enumerate(requests):
            meta = pb_utils.get_input_tensor_by_name(request, "WINDOW_META").as_numpy().reshape(-1)
            if meta[5]:  # has a window
                tokens = pb_utils.get_input_tensor_by_name(request, "WINDOW_TOKENS").as_numpy().reshape(-1)
                try:
                    windows.append(DecodeWindow(tokens=tokens.tolist(), n_context=int(meta[0]), n_chunk=int(meta[1]),
                                                first_position=int(meta[2]), finalize=bool(meta[3]),
                                                voice_id=string_input(pb_utils, request, "VOICE_ID") or "default"))
                    owners.append(i)
                except ValueError as e:
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
            meta = pb_utils.get_input_tensor_by_name(request, "WINDOW_META").as_numpy().reshape(-1)
            pcm = audio.get(i, np.zeros(0, dtype=np.float32)).astype(np.float32, copy=False)
            outputs = [pb_utils.Tensor("AUDIO_CHUNK", pcm.reshape(1, -1)),
                       pb_utils.Tensor("AUDIO_SEQ", np.array([[meta[4] if i in audio else -1]], dtype=np.int64)),
                       pb_utils.Tensor("SEQ", np.array([[meta[6]]], dtype=np.int64))]
            for name in PASSTHROUGH:
                value = pb_utils.get_input_tensor_by_name(request, name).as_numpy()
                outputs.append(pb_utils.Tensor(f"{name}_OUT", value))
            responses.append(pb_utils.InferenceResponse(output_tensors=outputs))
        return responses
