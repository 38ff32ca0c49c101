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

``bf16_mixed`` is bf16 with the network's stem in f32: the graph is cut after its first
:data:`F32_STEM_CONVOLUTIONS` convolutions, at the first tensor that alone carries everything the rest needs
(:func:`stem_cut`), and the two parts are compiled as two models, the stem with ``f32`` and the body with
``bf16``, run one after the other (the stem's output tensor, converted to bf16, passed on without a copy:
:func:`split_at`). The CPU device offers no per-layer precision for this: the ``precise_0`` runtime attribute
(``ov::disable_fp16_compression``) is not copyable and is lost when the CPU plugin fuses a Convolution with its
bias, and a compiled model with marked Convolutions ran every one of them in bf16 all the same (measured with
OpenVINO 2026.4.1).
"""

from __future__ import annotations

import os

import numpy as np

from tcsched.engines.base import Engine, EngineInfo, MissingRuntimeError

RUNTIME = "openvino"
INSTALL_HINT = "pip install 'openvino==2026.4.1' (the version pinned in pyproject.toml)"
# precision name -> INFERENCE_PRECISION_HINT (ov::element::Type names)
PRECISION_HINTS = {"bf16": "bf16", "bf16_mixed": "bf16"}
# precisions that need a CPU with native bf16
BF16_PRECISIONS = ("bf16", "bf16_mixed")
# bf16_mixed: the leading convolutions run in f32, the stem and first block of a MobileNet-style network
# (MobileNetV2 features.0-1: conv 3x3 s2, depthwise 3x3, linear 1x1 projection to 16 channels). Measured on
# MobileNetV2 with uint8 input, OpenVINO 2026.4.1 on an AVX-512 BF16 CPU without AMX,
# 512 ImageNet images x 8 label-preserving views, against ONNX Runtime fp32: whole-graph bf16 disagreed on 71
# of 4096 views (6 of the 512 originals) with mean KL 0.0024; f32 up to the first convolution alone, 72 (7) and
# 0.0023; up to the third, 37 (2) and 0.00072; up to the sixth, 25 (2) and 0.00052. At batch 8 the three-
# convolution stem cost 0.58x ONNX Runtime fp32 against 0.44x for whole-graph bf16 (40 interleaved rounds, the
# cut crossed in f32; in bf16, split_at, 0.57x against 0.60x in 60 rounds).
F32_STEM_CONVOLUTIONS = 3
CONVOLUTIONS = ("Convolution", "GroupConvolution")
# elementwise ops the CPU device fuses into the convolution before them (bias, scale): never cut between them
FUSED_INTO_CONVOLUTION = ("Add", "Multiply", "Subtract")
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


def stem_cut(model, convolutions: int = F32_STEM_CONVOLUTIONS) -> tuple[int, int]:
    """Where ``bf16_mixed`` cuts ``model`` (an ``openvino.Model``): (position in ``model.get_ordered_ops()``,
    output index) of the first op output, after the ``convolutions``-th Convolution or GroupConvolution and
    before the next one, that is the only non-constant tensor crossing the cut (no residual branch or shape
    computation passes it) and does not feed a bias or scale of its own convolution
    (:data:`FUSED_INTO_CONVOLUTION`).

    Raises:
        ValueError: ``convolutions`` < 1, or no such tensor: the graph has fewer convolutions, or a residual
            branch or a shape computation of the input (``x.view(x.size(0), -1)``: ShapeOf of the input) crosses
            every point between that convolution and the next.
    """
    if convolutions < 1:
        raise ValueError(f"convolutions must be >= 1, got {convolutions}")
    ops = list(model.get_ordered_ops())
    position = {op.get_name(): i for i, op in enumerate(ops)}
    last_use: dict[tuple[int, int], int] = {}  # (producer position, output index) -> last consumer position
    for i, op in enumerate(ops):
        for inp in op.inputs():
            src = inp.get_source_output()
            if src.get_node().get_type_name() == "Constant":
                continue
            key = (position[src.get_node().get_name()], src.get_index())
            last_use[key] = max(last_use.get(key, -1), i)
    seen = 0
    for i, op in enumerate(ops):
        if op.get_type_name() in CONVOLUTIONS:
            seen += 1
        if seen < convolutions:
            continue
        if seen > convolutions:  # the stem would hold more convolutions than asked for
            break
        live = [k for k, last in last_use.items() if k[0] <= i < last]
        if len(live) != 1:
            continue
        out = ops[live[0][0]].output(live[0][1])
        fused = ops[live[0][0]].get_type_name() in CONVOLUTIONS and any(
            t.get_node().get_type_name() in FUSED_INTO_CONVOLUTION for t in out.get_target_inputs()
        )
        if not fused:
            return live[0]
    total = sum(op.get_type_name() in CONVOLUTIONS for op in ops)
    if total < convolutions:
        raise ValueError(f"no f32 stem of {convolutions} convolutions: the graph has {total}")
    raise ValueError(
        f"no single-tensor cut between convolution {convolutions} and the next: a residual branch or a shape "
        "computation crosses every point there"
    )


def split_at(model, cut: tuple[int, int], handover: str | None = None) -> tuple[object, object]:
    """``model`` cut at ``cut`` (:func:`stem_cut`): (the stem, ending in a Result on that tensor; the body,
    starting from a Parameter of its shape). Both are built on clones; ``model`` is left unchanged.

    ``handover``: an element type (``"bf16"``) the tensor crosses in: the stem converts it at its end and the
    body converts it back first. For a bf16 body this changes no value, since its first layers round their
    input to bf16 anyway (MobileNetV2: logits identical, max difference 0), and halves the bytes written and
    read at the cut (batch 8: 0.57x instead of 0.60x ONNX Runtime fp32, batch 1: 0.63x instead of 0.74x;
    60 interleaved rounds)."""
    import openvino.opset13 as opset

    ov = import_openvino()
    stem = model.clone()
    out = list(stem.get_ordered_ops())[cut[0]].output(cut[1])
    end = opset.convert(out, handover).output(0) if handover else out
    stem = ov.Model([opset.result(end)], stem.get_parameters(), "f32_stem")
    body = model.clone()
    out = list(body.get_ordered_ops())[cut[0]].output(cut[1])
    crossing = getattr(ov.Type, handover) if handover else out.get_element_type()
    param = opset.parameter(out.get_partial_shape(), crossing, name="stem_output")
    start = opset.convert(param, out.get_element_type()).output(0) if handover else param.output(0)
    for target in list(out.get_target_inputs()):
        target.replace_source_output(start)
    return stem, ov.Model(body.get_results(), [param], "body")


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
    """One ONNX classifier compiled by OpenVINO for the CPU: float32 (or uint8) [N, 3, H, W] in, float32
    [N, classes] out. ``bf16_mixed`` runs as two compiled models, the f32 stem and the bf16 body (module
    docstring); every other precision as one.

    Raises (constructor):
        MissingRuntimeError: openvino is not installed.
        ValueError: ``precision`` is ``bf16`` or ``bf16_mixed`` and this CPU has no native bf16
            (:func:`tcsched.engines.capabilities.native_bf16`); ``bf16_mixed`` on a graph without a stem cut
            (:func:`stem_cut`).
    """

    def __init__(self, path: str | os.PathLike, threads: int | None = None, precision: str = "fp32"):
        ov = import_openvino()
        if precision in BF16_PRECISIONS:
            from tcsched.engines.capabilities import cpu_capabilities

            caps = cpu_capabilities()
            if not caps.native_bf16:
                raise ValueError(f"bf16 needs a CPU that runs it natively; this one has {caps.summary()}")
        self.core = ov.Core()
        self.config = compile_config(precision, threads)
        self.model = self.core.read_model(str(path))
        # (model, compile properties) run one after the other
        if precision == "bf16_mixed":
            stem, body = split_at(self.model, stem_cut(self.model), handover="bf16")
            self.stages = [(stem, compile_config("fp32", threads)), (body, self.config)]
        else:
            self.stages = [(self.model, self.config)]
        compiled = [self.core.compile_model(m, "CPU", c) for m, c in self.stages]
        self.compiled = compiled[-1]  # the body: its properties are the variant's (runtime_property)
        self.chain = tuple(c.create_infer_request() for c in compiled)
        self.request = self.chain[0]
        inp = compiled[0].input(0)
        self.input_shape = [d.get_length() if d.is_static else str(d) for d in inp.get_partial_shape()]
        if inp.get_element_type() == ov.Type.u8:
            self.input_dtype = np.dtype(np.uint8)
        # batch size -> the infer requests (one per stage) of the models compiled for exactly that batch
        self.static_requests: dict[int, tuple] = {}
        self.threads = threads
        self.precision = precision
        self.version = ov.__version__

    def _requests_for(self, x: np.ndarray) -> tuple:
        """The infer requests for ``x``'s shape: the static-shape models of its batch size (compiled now if not
        yet), or the dynamic-shape models when the batch size is above :data:`MAX_STATIC_BATCH`, the graph's
        batch dimension is already fixed, or the other dimensions are not the graph's."""
        n = len(x)
        reqs = self.static_requests.get(n)
        if reqs is not None:
            return reqs
        dims = self.model.input(0).get_partial_shape()
        if n > MAX_STATIC_BATCH or dims[0].is_static or list(x.shape[1:]) != self.input_shape[1:]:
            return self.chain
        out = []
        for model, config in self.stages:
            static = model.clone()
            rest = [d.get_length() for d in list(static.input(0).get_partial_shape())[1:]]
            static.reshape({static.input(0): [n, *rest]})
            out.append(self.core.compile_model(static, "CPU", config).create_infer_request())
        self.static_requests[n] = reqs = tuple(out)
        return reqs

    def prepare(self, batch_sizes, dims: list[int] | None = None) -> None:
        """Compile the static-shape models of ``batch_sizes`` now (those up to :data:`MAX_STATIC_BATCH`), so
        that no request pays for a compile; one run of zeros each. ``dims``: C, H, W (default: the graph's)."""
        shape = self._dims(dims)
        for n in sorted({int(b) for b in batch_sizes}):
            if 1 <= n <= MAX_STATIC_BATCH:
                self.run(np.zeros([n, *shape], dtype=self.input_dtype))

    def run(self, x: np.ndarray) -> np.ndarray:
        """Logits of an input already checked by :meth:`check_input` (one synchronous ``infer`` per stage on
        the models compiled for its batch size, each stage's output tensor the next one's input); a copy, since
        the last request's output buffer is reused by the next call."""
        reqs = self._requests_for(x)
        reqs[0].infer({0: x}, share_inputs=True)
        for prev, req in zip(reqs, reqs[1:], strict=False):
            req.infer({0: prev.get_output_tensor(0)}, share_inputs=True)
        return np.array(reqs[-1].get_output_tensor(0).data, dtype=np.float32, copy=True)

    def describe(self) -> EngineInfo:
        return EngineInfo(RUNTIME, self.version.split("-")[0], self.precision, self.threads)

    def runtime_property(self, name: str) -> str:
        """A property of the compiled model as OpenVINO reports it, e.g. ``INFERENCE_PRECISION_HINT`` (an
        element type: its short name, ``f32`` / ``bf16``)."""
        v = self.compiled.get_property(name)
        return v.get_type_name() if hasattr(v, "get_type_name") else str(v)
