"""The OpenVINO engine (CPU device): ``openvino`` from PyPI, the same ONNX graphs as ONNX Runtime.

OpenVINO reads the ONNX file itself (``Core.read_model``) and compiles it for the CPU device
(``Core.compile_model``) with these properties (OpenVINO's CPU device documentation, "Supported properties";
``openvino.properties.hint`` in the Python API):

- ``INFERENCE_PRECISION_HINT``: ``bf16`` for the ``bf16`` precision, else ``f32``. The CPU device defaults to
  bf16 on CPUs with native bf16 (AVX-512 BF16, AMX), so ``f32`` is always set explicitly for the other
  precisions: an int8 (Q/DQ) graph keeps its float layers in fp32, as in ONNX Runtime.
- ``INFERENCE_NUM_THREADS``: the intra-op threads (the variant config's ``intra_op_num_threads``).
- ``NUM_STREAMS`` 1 and ``PERFORMANCE_HINT`` ``LATENCY``: one request at a time per compiled model, as one
  Triton instance runs one batch at a time.
- ``ENABLE_CPU_PINNING`` off: several compiled models (variants, Triton instances) share the cores; pinned
  threads would keep to the same cores whatever else runs.

The graph's batch dimension is dynamic (``N``). The CPU device runs a dynamic-shape model markedly slower than
one compiled for a fixed shape (measured on the project's 2-core AVX-512 machine, MobileNetV2 int8 Q/DQ, CPU time
per batch, 25 interleaved rounds: 1.6x at batch 1, 1.4x at batch 2, 1.3x at 4, 1.15x at 8), and a served model
gets batches of every size from 1 to its max batch. So the engine compiles one static-shape model per batch size
it runs, up to :data:`MAX_STATIC_BATCH` (on first use, or ahead with :meth:`OpenVinoEngine.prepare`), and
runs larger batches on the dynamic-shape model. Padding a batch up to a compiled size loses what the fixed shape
gains (batch 3 padded to 4, 6 to 8: measured no faster than the dynamic model), so every size gets its own.

``bf16`` is only compiled where the CPU runs it natively (:func:`tcsched.engines.capabilities.native_bf16`):
elsewhere the CPU device would refuse it or emulate it, and neither is what the build measured.
"""

from __future__ import annotations

import os

import numpy as np

from tcsched.engines.base import Engine, EngineInfo, MissingRuntimeError

RUNTIME = "openvino"
INSTALL_HINT = "pip install 'openvino==2026.4.1' (the version pinned in pyproject.toml)"
# precision name -> INFERENCE_PRECISION_HINT (ov::element::Type names)
PRECISION_HINTS = {"bf16": "bf16"}
DEFAULT_HINT = "f32"
# batch sizes up to this get their own static-shape compiled model (module docstring). Measured for MobileNetV2
# on the 2-core machine: 1..8 together take 4 s (bf16) to 14 s (int8 Q/DQ) to compile and ~200 MB of RSS;
# splitting a batch into compiled sizes 1, 2, 4, 8 instead kept only a third of the gain at batches 3, 5, 6, 7
MAX_STATIC_BATCH = 8


def import_openvino():
    """The ``openvino`` module.

    Raises:
        MissingRuntimeError: openvino is not installed; the message says how to install it.
    """
    try:
        import openvino
    except ImportError as e:
        raise MissingRuntimeError(f"the OpenVINO runtime is not installed: {INSTALL_HINT}") from e
    return openvino


def inference_precision_hint(precision: str) -> str:
    """``INFERENCE_PRECISION_HINT`` for a variant precision: ``bf16`` for bf16, ``f32`` for everything else."""
    return PRECISION_HINTS.get(precision, DEFAULT_HINT)


def compile_config(precision: str, threads: int | None) -> dict[str, str]:
    """The CPU device properties of :func:`OpenVinoEngine` (strings, as OpenVINO's property parser reads
    them and as Triton's openvino backend passes its ``parameters``)."""
    cfg = {
        "INFERENCE_PRECISION_HINT": inference_precision_hint(precision),
        "NUM_STREAMS": "1",
        "PERFORMANCE_HINT": "LATENCY",
        "ENABLE_CPU_PINNING": "NO",
    }
    if threads:
        cfg["INFERENCE_NUM_THREADS"] = str(int(threads))
    return cfg


class OpenVinoEngine(Engine):
    """One ONNX classifier compiled by OpenVINO for the CPU: float32 [N, 3, H, W] in, float32 [N, classes] out.

    Raises (constructor):
        MissingRuntimeError: openvino is not installed.
        ValueError: ``precision`` is ``bf16`` and this CPU has no native bf16
            (:func:`tcsched.engines.capabilities.native_bf16`).
    """

    def __init__(self, path: str | os.PathLike, threads: int | None = None, precision: str = "fp32"):
        ov = import_openvino()
        if precision == "bf16":
            from tcsched.engines.capabilities import cpu_capabilities

            caps = cpu_capabilities()
            if not caps.native_bf16:
                raise ValueError(f"bf16 needs a CPU that runs it natively; this one has {caps.summary()}")
        self.core = ov.Core()
        self.config = compile_config(precision, threads)
        self.model = self.core.read_model(str(path))
        self.compiled = self.core.compile_model(self.model, "CPU", self.config)
        self.request = self.compiled.create_infer_request()
        inp = self.compiled.input(0)
        self.input_shape = [d.get_length() if d.is_static else str(d) for d in inp.get_partial_shape()]
        if inp.get_element_type() == ov.Type.u8:
            self.input_dtype = np.dtype(np.uint8)
        # batch size -> infer request of the model compiled for exactly that batch
        self.static_requests: dict[int, object] = {}
        self.threads = threads
        self.precision = precision
        self.version = ov.__version__

    def _request_for(self, x: np.ndarray):
        """The infer request for ``x``'s shape: the static-shape model of its batch size (compiled now if not
        yet), or the dynamic-shape model when the batch size is above :data:`MAX_STATIC_BATCH`, the graph's batch
        dimension is already fixed, or the other dimensions are not the graph's."""
        n = len(x)
        req = self.static_requests.get(n)
        if req is not None:
            return req
        dims = self.model.input(0).get_partial_shape()
        if n > MAX_STATIC_BATCH or dims[0].is_static or list(x.shape[1:]) != self.input_shape[1:]:
            return self.request
        static = self.model.clone()
        static.reshape({static.input(0): [n, *x.shape[1:]]})
        req = self.core.compile_model(static, "CPU", self.config).create_infer_request()
        self.static_requests[n] = req
        return req

    def prepare(self, batch_sizes, dims: list[int] | None = None) -> None:
        """Compile the static-shape models of ``batch_sizes`` now (those up to :data:`MAX_STATIC_BATCH`), so
        that no request pays for a compile; one run of zeros each. ``dims``: C, H, W (default: the graph's)."""
        shape = self._dims(dims)
        for n in sorted({int(b) for b in batch_sizes}):
            if 1 <= n <= MAX_STATIC_BATCH:
                self.run(np.zeros([n, *shape], dtype=self.input_dtype))

    def run(self, x: np.ndarray) -> np.ndarray:
        """Logits of an input already checked by :meth:`check_input` (one synchronous ``infer`` on the model
        compiled for its batch size); a copy, since the request's output buffer is reused by the next call."""
        req = self._request_for(x)
        req.infer({0: x}, share_inputs=True)
        return np.array(req.get_output_tensor(0).data, dtype=np.float32, copy=True)

    def describe(self) -> EngineInfo:
        return EngineInfo(RUNTIME, self.version.split("-")[0], self.precision, self.threads)

    def runtime_property(self, name: str) -> str:
        """A property of the compiled model as OpenVINO reports it, e.g. ``INFERENCE_PRECISION_HINT`` (an
        element type: its short name, ``f32`` / ``bf16``)."""
        v = self.compiled.get_property(name)
        return v.get_type_name() if hasattr(v, "get_type_name") else str(v)
