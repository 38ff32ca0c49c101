"""Engine management, CPU backend: ONNX Runtime sessions for the variant graphs.

Used both offline (profiling in ``build_tools``) and online (the variant models' ``model.py`` in Triton), so the
latency the build measures is the latency of the same code the server runs.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np


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


class OrtClassifier:
    """One ONNX classifier: float32 [N, 3, H, W] in, float32 [N, classes] logits out."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None, spin: bool = False):
        self.session = make_session(path, threads=threads, spin=spin)
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.input_shape = list(inp.shape)
        self.output_name = self.session.get_outputs()[0].name

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Logits for a batch.

        Raises:
            ValueError: ``x`` is not float32 of rank 4 with the model's C, H, W.
        """
        if x.dtype != np.float32:
            raise ValueError(f"input must be float32, got {x.dtype}")
        expected = self.input_shape[1:]
        if x.ndim != 4 or any(
            isinstance(e, int) and e != s for e, s in zip(expected, x.shape[1:], strict=False)
        ):
            raise ValueError(
                f"input must have shape [N, {', '.join(map(str, expected))}], got {list(x.shape)}"
            )
        return self.session.run([self.output_name], {self.input_name: x})[0]

    def predict(self, x: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """Logits for any number of images, run ``batch_size`` at a time."""
        return np.concatenate([self(b) for b in batches(x, batch_size)], axis=0)


def batches(x: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    for i in range(0, len(x), batch_size):
        yield np.ascontiguousarray(x[i : i + batch_size])
