"""Toy encoder: H = 2 * X, plus the serving process id (to see two instances). Non-decoupled, batched."""

import json
import os
import time

import numpy as np
import triton_python_backend_utils as pb_utils

import moss_speech.services  # noqa: F401  (spike item h: the editable package imports inside the stub)


class TritonPythonModel:
    def initialize(self, args):
        params = json.loads(args["model_config"]).get("parameters", {})
        self.sleep_s = float(params.get("sleep_ms", {}).get("string_value", "0")) / 1000

    def execute(self, requests):
        time.sleep(self.sleep_s)  # one "forward pass" per batch
        out = []
        for r in requests:
            x = pb_utils.get_input_tensor_by_name(r, "X").as_numpy()
            pid = np.full((x.shape[0], 1), os.getpid(), dtype=np.int64)
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("H", 2 * x), pb_utils.Tensor("PID", pid)]))
        return out
