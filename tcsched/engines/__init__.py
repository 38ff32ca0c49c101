"""Engines: one interface (:class:`~tcsched.engines.base.Engine`), one module per runtime.

:func:`load_engine` opens a graph with the runtime a variant names; runtime libraries are imported only there
(ONNX Runtime, OpenVINO), so importing this package needs neither.
"""

from __future__ import annotations

import os

from tcsched.engines.base import Engine, EngineInfo, InvalidInputError, MissingRuntimeError

CPU_RUNTIMES = ("onnxruntime", "openvino")

__all__ = ["CPU_RUNTIMES", "Engine", "EngineInfo", "InvalidInputError", "MissingRuntimeError", "load_engine"]


def load_engine(
    runtime: str, path: str | os.PathLike, threads: int | None = None, precision: str = "fp32"
) -> Engine:
    """An :class:`Engine` for the ONNX file ``path`` on ``runtime`` (one of :data:`CPU_RUNTIMES`).

    ``precision``: the variant's precision; OpenVINO compiles ``bf16`` with ``INFERENCE_PRECISION_HINT=bf16``,
    and ``bf16_mixed`` likewise except the graph's f32 stem (:mod:`tcsched.engines.openvino`).

    Raises:
        ValueError: unknown runtime, bf16 or bf16_mixed on a CPU without native bf16, or bf16_mixed on a graph
            without a stem cut.
        MissingRuntimeError: the runtime is not installed (the message says how to install it).
    """
    if runtime == "onnxruntime":
        from tcsched.engines.onnxruntime import OrtClassifier

        return OrtClassifier(path, threads=threads, precision=precision)
    if runtime == "openvino":
        from tcsched.engines.openvino import OpenVinoEngine

        return OpenVinoEngine(path, threads=threads, precision=precision)
    raise ValueError(
        f"unknown CPU runtime {runtime!r}; expected one of {', '.join(CPU_RUNTIMES)} "
        "(TensorRT engines: tcsched.build_tools.tensorrt_adapter)"
    )
