"""Triton adapter of the `speech_encoder` model: 16 kHz PCM -> speech codes, batched across requests."""

from __future__ import annotations

import numpy as np
import triton_python_backend_utils as pb_utils

from moss_speech.contract import tensors as T
from moss_speech.contract.audio import INPUT_RATE, AudioError
from moss_speech.model_repository.adapters.common import error_response, load_codec, serving_config


class TritonPythonModel:
    def initialize(self, args):
        self.codec, params = load_codec(args)
        self.max_samples = int(serving_config(params).max_audio_seconds * INPUT_RATE)
        self.codec.encode_pcm([np.zeros(INPUT_RATE, np.float32)])  # warm up before the first client

    def execute(self, requests):
        pcms, owners, errors = [], [], {}
        for i, request in enumerate(requests):
            pcm = pb_utils.get_input_tensor_by_name(request, T.AUDIO.name).as_numpy().reshape(-1).astype(np.float32)
            if pcm.size == 0:
                errors[i] = error_response(pb_utils, "AUDIO is empty")
            elif not np.isfinite(pcm).all():
                errors[i] = error_response(pb_utils, "AUDIO contains NaN or Inf")
            elif pcm.size > self.max_samples:
                errors[i] = error_response(
                    pb_utils,
                    f"AUDIO has {pcm.size} samples; the limit is {self.max_samples} "
                    "(max_audio_seconds, `moss-speech build --max-audio-seconds`)",
                )
            else:
                pcms.append(pcm)
                owners.append(i)
        codes = {}
        if pcms:
            try:
                codes = dict(zip(owners, self.codec.encode_pcm(pcms), strict=True))
            except AudioError as e:
                errors.update({o: error_response(pb_utils, str(e)) for o in owners})
        return [
            errors[i]
            if i in errors
            else pb_utils.InferenceResponse([pb_utils.Tensor(T.CODES.name, np.asarray(codes[i], dtype=np.int64)[None])])
            for i in range(len(requests))
        ]
