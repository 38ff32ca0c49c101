"""The ONNX Runtime engine (CPU execution provider): the runtime of every variant's reference figures."""

from __future__ import annotations

import os

import numpy as np

from tcsched.engines.base import Engine, EngineInfo

RUNTIME = "onnxruntime"


def make_session(path: str | os.PathLike, threads: int | None = None, spin: bool = False):
    """An ``onnxruntime.InferenceSession`` on the CPU execution provider.

    Args:
        path: ONNX file.
        threads: intra-op threads (``None``: ONNX Runtime's default, one per physical core).
        spin: allow intra-op thread spinning. Off by default: with several sessions (variants, Triton instances)
            sharing two cores, spinning threads steal the cores from each other.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


class OrtClassifier(Engine):
    """One ONNX classifier run by ONNX Runtime: float32 [N, 3, H, W] in, float32 [N, classes] logits out.

    ``precision``: what the graph computes in (the variant's precision name; ONNX Runtime runs the graph's own
    types, so this only describes it)."""

    def __init__(
        self,
        path: str | os.PathLike,
        threads: int | None = None,
        spin: bool = False,
        precision: str = "fp32",
    ):
        self.session = make_session(path, threads=threads, spin=spin)
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.input_shape = list(inp.shape)
        if inp.type == "tensor(uint8)":
            self.input_dtype = np.dtype(np.uint8)
        self.output_name = self.session.get_outputs()[0].name
        self.threads = threads
        self.precision = precision

    def run(self, x: np.ndarray) -> np.ndarray:
        """Logits of an input already checked by :meth:`check_input` (one ``session.run``)."""
        return self.session.run([self.output_name], {self.input_name: x})[0]

    def describe(self) -> EngineInfo:
        import onnxruntime as ort

        return EngineInfo(RUNTIME, ort.__version__, self.precision, self.threads)


OnnxRuntimeEngine = OrtClassifier
