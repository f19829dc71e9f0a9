"""Toy postprocess: OUT = 10 * V, passes the other tensors through, BATCH = requests in this execute()."""

import numpy as np
import triton_python_backend_utils as pb_utils

PASS = ("STEP", "TICK", "ACTIVE", "TAG", "PARAMS")


class TritonPythonModel:
    def execute(self, requests):
        batch = np.array([[len(requests)]], dtype=np.int32)
        out = []
        for r in requests:
            v = pb_utils.get_input_tensor_by_name(r, "V").as_numpy()
            tensors = [pb_utils.Tensor("OUT", 10 * v), pb_utils.Tensor("BATCH", batch)]
            tensors += [pb_utils.Tensor(n, pb_utils.get_input_tensor_by_name(r, n).as_numpy()) for n in PASS]
            out.append(pb_utils.InferenceResponse(tensors))
        return out
