"""Triton Python-backend model for one ONNX variant, run on the CPU by ONNX Runtime or OpenVINO.

The embedded tritonserver (nvidia-pytriton) has neither an onnxruntime nor an openvino backend, so the variant
graph runs in the engine of :mod:`tcsched.engines` that the config's ``runtime`` parameter names
(``onnxruntime``, the default, or ``openvino``; ``precision`` selects OpenVINO's inference precision), one engine
(one compiled model) per instance, ``intra_op_num_threads`` threads; in the official container ``tcsched build
--variant-backend onnxruntime`` emits configs for Triton's own onnxruntime and openvino backends instead.

Each request of a dynamic batch is checked on its own first (``OrtClassifier.check_input``: dtype, shape, NaN
or infinite values); a bad one gets its own ``INVALID_ARG`` response (HTTP 400, gRPC INVALID_ARGUMENT) and the
good ones go through one ``session.run``. A request whose logits come out non-finite gets an error instead of
them: ``INVALID_ARG`` when its input reaches outside the range of normalised images, else ``INTERNAL`` (a fault
of the model). A failing ``session.run`` is ``INTERNAL`` for the requests it ran.
"""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from tcsched.engines import load_engine
from tcsched.engines.base import InvalidInputError, nonfinite_output_error
from tcsched.imaging import client_safe_text


def _error(message: str, code) -> "pb_utils.InferenceResponse":
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))


class TritonPythonModel:
    def initialize(self, args):
        cfg = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in cfg.get("parameters", {}).items()}
        path = Path(args["model_repository"]) / args["model_version"] / params.get("onnx_file", "model.onnx")
        self.model = load_engine(
            params.get("runtime", "onnxruntime"),
            path,
            threads=int(params.get("intra_op_num_threads", "0")) or None,
            precision=params.get("precision", "fp32"),
        )
        self.input_name = cfg["input"][0]["name"]
        self.output_name = cfg["output"][0]["name"]
        # ready for every batch size up to this config's own max_batch_size (OpenVINO compiles one model per
        # batch size): the config's model_warmup is batch 1 only, so that a config derived with a smaller
        # max_batch_size (Model Analyzer's sweep) still loads (repository.py)
        max_batch = int(cfg.get("max_batch_size", 0))
        dims = [int(d) for d in cfg["input"][0]["dims"]]
        self.model.prepare(range(1, max(1, max_batch) + 1), dims)

    def execute(self, requests):
        responses = [None] * len(requests)
        good, arrays = [], []
        for i, request in enumerate(requests):
            tensor = pb_utils.get_input_tensor_by_name(request, self.input_name)
            if tensor is None:  # Triton checks the config's inputs; kept for BLS callers
                responses[i] = _error(f"missing input {self.input_name!r}", pb_utils.TritonError.INVALID_ARG)
                continue
            a = tensor.as_numpy()
            try:
                self.model.check_input(a)
            except InvalidInputError as e:
                responses[i] = _error(f"{self.input_name}: {e}", pb_utils.TritonError.INVALID_ARG)
                continue
            good.append(i)
            arrays.append(a)
        if not good:
            return responses
        try:
            logits = self.model.run(np.concatenate(arrays) if len(arrays) > 1 else arrays[0])
        except Exception as e:  # noqa: BLE001 - the requests it ran get the error, the server stays up
            err = f"{type(e).__name__}: {client_safe_text(str(e))}"
            for i in good:
                responses[i] = _error(err, pb_utils.TritonError.INTERNAL)
            return responses
        start = 0
        for i, a in zip(good, arrays, strict=True):
            out = logits[start : start + len(a)]
            start += len(a)
            bad = nonfinite_output_error(a, out)
            if bad is None:
                responses[i] = pb_utils.InferenceResponse([pb_utils.Tensor(self.output_name, out)])
            else:
                message, client_error = bad
                code = pb_utils.TritonError.INVALID_ARG if client_error else pb_utils.TritonError.INTERNAL
                responses[i] = _error(f"{self.input_name}: {message}", code)
        return responses
