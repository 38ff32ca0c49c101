"""Triton Python-backend model for one ONNX variant, run by ONNX Runtime on the CPU.

The embedded tritonserver (nvidia-pytriton) has no onnxruntime backend, so the variant graph runs in
``tcsched.ort_runtime`` here; in the official container ``tcsched build --variant-backend onnxruntime`` emits
configs for Triton's own onnxruntime backend instead. All requests of a dynamic batch go through one
``session.run``.
"""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from tcsched.ort_runtime import OrtClassifier


class TritonPythonModel:
    def initialize(self, args):
        cfg = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in cfg.get("parameters", {}).items()}
        path = Path(args["model_repository"]) / args["model_version"] / params.get("onnx_file", "model.onnx")
        self.model = OrtClassifier(path, threads=int(params.get("intra_op_num_threads", "0")) or None)
        self.input_name = cfg["input"][0]["name"]
        self.output_name = cfg["output"][0]["name"]

    def execute(self, requests):
        arrays = [pb_utils.get_input_tensor_by_name(r, self.input_name).as_numpy() for r in requests]
        try:
            logits = self.model(np.concatenate(arrays) if len(arrays) > 1 else arrays[0])
        except Exception as e:  # noqa: BLE001 - every request of the batch gets the error, the server stays up
            err = pb_utils.TritonError(f"{type(e).__name__}: {e}")
            return [pb_utils.InferenceResponse(error=err) for _ in requests]
        responses, start = [], 0
        for a in arrays:
            out = pb_utils.Tensor(self.output_name, logits[start : start + len(a)])
            responses.append(pb_utils.InferenceResponse([out]))
            start += len(a)
        return responses
