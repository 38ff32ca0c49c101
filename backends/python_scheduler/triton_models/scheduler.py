"""Triton Python-backend model ``scheduler``: picks a variant per request and calls it by BLS.

Thin wrapper around ``tcsched.scheduler.service`` (grouping, fallback) and ``tcsched.scheduler.policy``
(the decision rules); both are plain Python, unit-tested without Triton. Outputs ``LOGITS`` and ``VARIANT``
(the served variant's name, one per batch row); the decision's reason and predicted latency travel as
response parameters where the server supports them.
"""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from tcsched.manifest import Manifest
from tcsched.scheduler.policy import LiveState, Policy, RequestOptions
from tcsched.scheduler.service import SchedulerService


class TritonPythonModel:
    def initialize(self, args):
        cfg = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in cfg.get("parameters", {}).items()}
        here = Path(args["model_repository"])
        manifest = Manifest.read((here / params.get("manifest_file", "../manifest.json")).resolve())
        self.timeout_us = int(float(params.get("bls_timeout_ms", "10000")) * 1000)
        state = LiveState(cooldown_s=float(params.get("unhealthy_cooldown_s", "30")))
        defaults = RequestOptions(accuracy_budget_points=float(params.get("default_accuracy_budget", "1.0")))
        self.service = SchedulerService(Policy(manifest, state), defaults, self._infer)
        self.input_name = manifest.input.name
        self.output_name = manifest.output.name

    def _infer(self, variant: str, batch: np.ndarray) -> np.ndarray:
        req = pb_utils.InferenceRequest(
            model_name=variant,
            requested_output_names=[self.output_name],
            inputs=[pb_utils.Tensor(self.input_name, batch)],
            timeout=self.timeout_us,
            # a TensorRT variant may leave its output in GPU memory: ask for it on the CPU
            preferred_memory=pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0),
        )
        resp = req.exec()
        if resp.has_error():
            raise RuntimeError(resp.error().message())
        return pb_utils.get_output_tensor_by_name(resp, self.output_name).as_numpy()

    def execute(self, requests):
        work = []
        for r in requests:
            params = json.loads(r.parameters() or "{}")
            work.append((params, pb_utils.get_input_tensor_by_name(r, "INPUT").as_numpy()))
        responses = []
        for result in self.service.handle(work):
            if isinstance(result, Exception):
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(result))))
                continue
            n = len(result.logits)
            variant = np.array([[result.decision.variant.encode()]] * n, dtype=np.object_)
            responses.append(
                pb_utils.InferenceResponse(
                    [pb_utils.Tensor("LOGITS", result.logits), pb_utils.Tensor("VARIANT", variant)]
                )
            )
        return responses
