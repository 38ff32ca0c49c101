"""The TensorRT engine behind :class:`tcsched.engines.base.Engine`: a thin adapter over
:class:`tcsched.build_tools.tensorrt_engine.EngineRunner` (the GPU code, unchanged).

It lives beside the GPU code it wraps (``tcsched.engines`` sits below ``build_tools`` in the import layers).
``tensorrt`` and cuda-python are imported by the runner's constructor only.
"""

from __future__ import annotations

import os

import numpy as np

from tcsched.engines.base import Engine, EngineInfo

RUNTIME = "tensorrt"


class TensorRTEngine(Engine):
    """A serialised TensorRT engine (``.plan``) on CUDA device ``device``: float32 [N, 3, 224, 224] in (any N;
    run in chunks of the engine's largest batch), float32 [N, classes] out. ``precision``: the variant's.

    Raises (constructor): as :class:`~tcsched.build_tools.tensorrt_engine.EngineRunner`.
    """

    def __init__(self, plan_path: str | os.PathLike, precision: str, device: int = 0):
        from tcsched.build_tools.tensorrt_engine import CHW, EngineRunner

        self.runner = EngineRunner(plan_path, device=device)
        self.input_shape = ["N", *CHW]
        self.precision = precision
        self.device = device

    def run(self, x: np.ndarray) -> np.ndarray:
        return self.runner(x)

    def describe(self) -> EngineInfo:
        import tensorrt as trt

        return EngineInfo(RUNTIME, trt.__version__, self.precision, None, device=f"cuda:{self.device}")

    def close(self) -> None:
        self.runner.close()
