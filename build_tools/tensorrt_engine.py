"""TensorRT engines from the variants' ONNX graphs: build, identify the GPU, profile.

Every engine is a **strongly typed** network (``NetworkDefinitionCreationFlag.STRONGLY_TYPED``): the precision
of each layer comes from the ONNX graph itself (Q/DQ pairs -> INT8, Cast nodes -> FP16), never from the
``BuilderFlag.FP16``/``BuilderFlag.INT8`` flags or an INT8 calibrator. Those flags and calibrators are
deprecated in TensorRT 10 and gone in 11; strong typing works on both. ``BuilderFlag.SPARSE_WEIGHTS`` (still
present in 10 and 11) lets the builder try 2:4 sparse kernels for ``sparse24`` graphs.

``tensorrt``, ``pynvml`` and ``torch`` are imported inside the functions: importing this module needs none of
them (the CPU build and every CPU test run without a GPU).

Engine files are valid only on the GPU architecture (compute capability) and the TensorRT version that built
them; :func:`gpu_identity` names both and the manifest records them (:class:`tcsched.manifest.EngineInfo`).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

# re-exported: the identity is defined beside the compatibility check that the server runs
from tcsched.engine_compat import gpu_identity as gpu_identity

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
CHW = (3, 224, 224)
DEFAULT_WORKSPACE_BYTES = 2 << 30  # 2 GiB: ample for MobileNetV2's tactics, small beside any datacenter GPU

# TensorRT's builder reports 2:4 sparsity at INFO level, one line each (wording unchanged from TensorRT 8 to 10;
# see e.g. NVIDIA/TensorRT issues #1403 and #4056):
#   (Sparsity) Layers eligible for sparse math: Conv_0, Conv_3 + Relu_4
#   (Sparsity) TRT inference plan picked sparse implementation for layers: Conv_3 + Relu_4
_PICKED_SPARSE = re.compile(r"picked sparse implementation for layers:(?P<layers>.*)$")
_ELIGIBLE_SPARSE = re.compile(r"Layers eligible for sparse math:(?P<layers>.*)$")


@dataclass(frozen=True)
class EngineBuildResult:
    """What :func:`build_engine` produced.

    ``build_seconds``: wall-clock seconds of parse + build + serialise. ``sparse_layers_chosen``: number of
    (fused) layers for which the builder picked a sparse kernel, counted from the builder log (0 when
    ``sparse=False``). ``sparse_layers_eligible``: layers whose weights the builder found 2:4 sparse.
    """

    plan_path: Path
    log_path: Path
    tensorrt_version: str
    build_seconds: float
    size_bytes: int
    sparse_layers_chosen: int
    sparse_layers_eligible: int


def _layer_names(log_text: str, pattern: re.Pattern[str]) -> set[str]:
    names: set[str] = set()
    for line in log_text.splitlines():
        m = pattern.search(line)
        if m:
            names.update(n.strip() for n in m.group("layers").split(",") if n.strip())
    return names


def count_sparse_layers(log_text: str) -> int:
    """Number of distinct layers for which TensorRT picked a sparse (2:4) kernel, from a builder log.

    Parses the INFO lines ``(Sparsity) TRT inference plan picked sparse implementation for layers: A, B + C``
    (comma-separated, fused layers joined by `` + `` count as one). Layer names seen on several such lines (a
    log holding more than one build) are counted once. A log without such a line gives 0.

    Raises:
        TypeError: ``log_text`` is not a ``str``.
    """
    if not isinstance(log_text, str):
        raise TypeError(f"log_text must be the builder log as str, got {type(log_text).__name__}")
    return len(_layer_names(log_text, _PICKED_SPARSE))


def count_sparse_eligible_layers(log_text: str) -> int:
    """Number of distinct layers TensorRT found eligible for sparse math (``Layers eligible for sparse math:``)."""
    if not isinstance(log_text, str):
        raise TypeError(f"log_text must be the builder log as str, got {type(log_text).__name__}")
    return len(_layer_names(log_text, _ELIGIBLE_SPARSE))


# ONNX TensorProto element types TensorRT's Q/DQ accept: INT8, INT4, and the FP8/FP4 types (symmetric only)
_TRT_QDQ_TYPES = {
    3: "INT8",
    17: "FLOAT8E4M3FN",
    18: "FLOAT8E4M3FNUZ",
    19: "FLOAT8E5M2",
    20: "FLOAT8E5M2FNUZ",
    22: "INT4",
    23: "FLOAT4E2M1",
}


def tensorrt_qdq_problems(onnx_path: str | os.PathLike) -> list[str]:
    """Q/DQ nodes of an ONNX graph that TensorRT's parser rejects, one message each (empty: none).

    TensorRT quantizes symmetrically only: every ``QuantizeLinear``/``DequantizeLinear`` zero point must be
    all zeros, of a signed type (INT8, INT4, FP8). ONNX Runtime's default static quantization (uint8
    activations, asymmetric) violates both; quantize with ``activation_type=QuantType.QInt8``,
    ``weight_type=QuantType.QInt8`` and ``extra_options={"ActivationSymmetric": True, "WeightSymmetric": True}``
    for TensorRT. Runs on CPU (onnx only), so a bad variant is refused before any GPU work.

    Raises:
        ValueError: ``onnx_path`` does not exist.
    """
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise ValueError(f"ONNX file {onnx_path} does not exist")
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    consts = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.output:
            for a in node.attribute:
                if a.name == "value":
                    consts[node.output[0]] = a.t
    problems = []
    for node in graph.node:
        if (
            node.op_type not in ("QuantizeLinear", "DequantizeLinear")
            or len(node.input) < 3
            or not node.input[2]
        ):
            continue
        zp = consts.get(node.input[2])
        if zp is None:
            problems.append(f"{node.op_type} {node.name!r}: zero point {node.input[2]!r} is not a constant")
            continue
        if zp.data_type not in _TRT_QDQ_TYPES:
            kind = onnx.TensorProto.DataType.Name(zp.data_type)
            problems.append(f"{node.op_type} {node.name!r}: {kind} zero point (TensorRT: INT8/INT4/FP8 only)")
        elif zp.data_type in (3, 22) and numpy_helper.to_array(zp).any():
            problems.append(f"{node.op_type} {node.name!r}: non-zero zero point (TensorRT: symmetric only)")
    return problems


def _file_logger(trt, path: Path, verbose: bool):
    """A ``trt.ILogger`` writing every message at or above INFO (or VERBOSE) to ``path``, one per line."""

    class _FileLogger(trt.ILogger):
        # Severity values (TensorRT 8-11): INTERNAL_ERROR 0, ERROR 1, WARNING 2, INFO 3, VERBOSE 4
        _letters = "FEWIV"

        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.max_level = int(trt.ILogger.Severity.VERBOSE if verbose else trt.ILogger.Severity.INFO)
            self.errors: list[str] = []
            self._f = open(path, "w", encoding="utf-8")  # noqa: SIM115 - closed by close()

        def log(self, severity, msg) -> None:
            level = int(severity)
            if level <= int(trt.ILogger.Severity.ERROR):
                self.errors.append(msg)
            if level <= self.max_level and not self._f.closed:
                letter = self._letters[level] if 0 <= level < len(self._letters) else "?"
                self._f.write(f"[{time.strftime('%H:%M:%S')}] [{letter}] {msg}\n")

        def close(self) -> None:
            self._f.close()

    return _FileLogger()


def _validate_build_args(onnx_path: Path, max_batch_size: int, workspace_bytes: int) -> None:
    if not onnx_path.is_file():
        raise ValueError(f"ONNX file {onnx_path} does not exist; expected a variant's model.onnx")
    if not isinstance(max_batch_size, int) or max_batch_size < 1:
        raise ValueError(f"max_batch_size must be an int >= 1, got {max_batch_size!r}")
    if not isinstance(workspace_bytes, int) or workspace_bytes < (1 << 20):
        raise ValueError(f"workspace_bytes must be an int >= 1 MiB, got {workspace_bytes!r}")


def build_engine(
    onnx_path: str | os.PathLike,
    plan_path: str | os.PathLike,
    *,
    max_batch_size: int,
    sparse: bool = False,
    timing_cache_path: str | os.PathLike,
    log_path: str | os.PathLike,
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
    verbose_log: bool = False,
) -> EngineBuildResult:
    """Compile one ONNX variant into a serialised TensorRT engine (``.plan``) for this machine's GPU.

    The network is strongly typed (precisions from the graph's Q/DQ and Cast nodes). The ONNX input
    ``input`` float32 [N, 3, 224, 224] gets one optimization profile: min N=1, opt N=``max_batch_size``,
    max N=``max_batch_size`` (Triton's dynamic batcher forms batches up to that size). With ``sparse`` the
    builder may use 2:4 sparse kernels (``BuilderFlag.SPARSE_WEIGHTS``); it keeps them only where they time
    faster, and says which in the log (:func:`count_sparse_layers`).

    The timing cache at ``timing_cache_path`` is loaded if present (tactic timings of earlier builds on this
    GPU and TensorRT) and written back after the build, so the next variant or build skips re-timing. The
    builder log (INFO, or VERBOSE with ``verbose_log``) is written to ``log_path``.

    Args:
        onnx_path: the variant's ONNX graph (dynamic batch dimension on ``input``).
        plan_path: where to write the engine; its folder is created.
        max_batch_size: largest batch, >= 1.
        sparse: set ``SPARSE_WEIGHTS`` (for ``sparse24`` variants).
        timing_cache_path: timing cache file (created if missing).
        log_path: builder log file (overwritten).
        workspace_bytes: ``MemoryPoolType.WORKSPACE`` limit, bytes (default 2 GiB).
        verbose_log: log at VERBOSE instead of INFO (tactic-level detail; tens of MB).

    Raises:
        ValueError: missing ONNX file, ``max_batch_size`` < 1, workspace < 1 MiB, or the graph has no input
            ``input`` of shape [N, 3, 224, 224].
        ImportError: the ``tensorrt`` package is not installed.
        RuntimeError: the ONNX parser or the builder failed (the message holds their errors; see the log).
    """
    onnx_path, plan_path, log_path = Path(onnx_path), Path(plan_path), Path(log_path)
    timing_cache_path = Path(timing_cache_path)
    _validate_build_args(onnx_path, max_batch_size, workspace_bytes)
    import tensorrt as trt

    for p in (plan_path, log_path, timing_cache_path):
        p.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    logger = _file_logger(trt, log_path, verbose_log)
    try:
        builder = trt.Builder(logger)
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(onnx_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise RuntimeError(f"TensorRT's ONNX parser rejected {onnx_path}: {errors} (log: {log_path})")
        inputs = {network.get_input(i).name: network.get_input(i) for i in range(network.num_inputs)}
        if INPUT_NAME not in inputs or tuple(inputs[INPUT_NAME].shape)[1:] != CHW:
            found = {n: tuple(t.shape) for n, t in inputs.items()}
            raise ValueError(
                f"{onnx_path}: expected input {INPUT_NAME!r} of shape [N, 3, 224, 224], got {found}"
            )

        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # layer names + tactics in the engine
        if sparse:
            config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
        profile = builder.create_optimization_profile()
        profile.set_shape(
            INPUT_NAME, (1, *CHW), (max_batch_size, *CHW), (max_batch_size, *CHW)
        )  # min, opt, max
        config.add_optimization_profile(profile)

        cache_bytes = timing_cache_path.read_bytes() if timing_cache_path.is_file() else b""
        cache = config.create_timing_cache(cache_bytes)
        # ignore_mismatch=False: a cache written on another GPU / TensorRT is refused; then start afresh
        if cache is None or not config.set_timing_cache(cache, False):
            config.set_timing_cache(config.create_timing_cache(b""), False)

        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise RuntimeError(
                f"TensorRT could not build {onnx_path}: {'; '.join(logger.errors) or 'see log'} (log: {log_path})"
            )
        tmp = plan_path.with_name(f".{plan_path.name}.tmp{os.getpid()}")
        tmp.write_bytes(serialized)
        os.replace(tmp, plan_path)
        # the cache now holds this build's timings too: save it for the next variant / build
        updated = config.get_timing_cache()
        ctmp = timing_cache_path.with_name(f".{timing_cache_path.name}.tmp{os.getpid()}")
        ctmp.write_bytes(updated.serialize())
        os.replace(ctmp, timing_cache_path)
    finally:
        logger.close()
    text = log_path.read_text(encoding="utf-8", errors="replace")
    return EngineBuildResult(
        plan_path=plan_path,
        log_path=log_path,
        tensorrt_version=trt.__version__,
        build_seconds=time.perf_counter() - t0,
        size_bytes=plan_path.stat().st_size,
        sparse_layers_chosen=count_sparse_layers(text) if sparse else 0,
        sparse_layers_eligible=count_sparse_eligible_layers(text) if sparse else 0,
    )


def _torch_dtype(trt, torch, dt):
    table = {
        trt.DataType.FLOAT: torch.float32,
        trt.DataType.HALF: torch.float16,
        trt.DataType.INT8: torch.int8,
        trt.DataType.INT32: torch.int32,
        trt.DataType.BOOL: torch.bool,
    }
    if hasattr(trt.DataType, "BF16"):
        table[trt.DataType.BF16] = torch.bfloat16
    if hasattr(trt.DataType, "INT64"):
        table[trt.DataType.INT64] = torch.int64
    if dt not in table:
        raise RuntimeError(f"engine I/O data type {dt} is not supported by this runner")
    return table[dt]


class EngineRunner:
    """Run a serialised engine on CUDA device 0 with torch CUDA tensors as I/O buffers (tests, profiling).

    One input ``input`` [N, 3, 224, 224] and one output ``logits`` [N, classes], any dtypes the engine
    declares (a float32 host array is cast to the input's dtype; outputs come back as float32 numpy).

    Raises (constructor):
        ValueError: ``plan_path`` does not exist.
        ImportError: tensorrt or torch is not installed.
        RuntimeError: no CUDA GPU, or the engine cannot be deserialised here (other GPU/TensorRT).
    """

    def __init__(self, plan_path: str | os.PathLike) -> None:
        plan_path = Path(plan_path)
        if not plan_path.is_file():
            raise ValueError(f"engine file {plan_path} does not exist")
        import tensorrt as trt
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("no CUDA GPU visible to torch: cannot run a TensorRT engine")
        self._trt, self._torch = trt, torch
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(plan_path.read_bytes())
        if self.engine is None:
            raise RuntimeError(
                f"TensorRT {trt.__version__} could not deserialise {plan_path}: built for another GPU or "
                "TensorRT version? Rebuild it with `tcsched engines`"
            )
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if self.inputs != [INPUT_NAME] or len(self.outputs) != 1:
            raise RuntimeError(
                f"expected one input {INPUT_NAME!r} and one output, got {self.inputs} -> {self.outputs}"
            )
        self.stream = torch.cuda.Stream()

    def _bind(self, x):
        torch = self._torch
        name_in, name_out = self.inputs[0], self.outputs[0]
        self.context.set_input_shape(name_in, tuple(x.shape))
        y = torch.empty(
            tuple(self.context.get_tensor_shape(name_out)),
            dtype=_torch_dtype(self._trt, torch, self.engine.get_tensor_dtype(name_out)),
            device="cuda",
        )
        self.context.set_tensor_address(name_in, x.data_ptr())
        self.context.set_tensor_address(name_out, y.data_ptr())
        return y

    def device_input(self, batch: int):
        """A random CUDA input tensor of ``batch`` images in the engine's input dtype."""
        torch = self._torch
        dt = _torch_dtype(self._trt, torch, self.engine.get_tensor_dtype(self.inputs[0]))
        return torch.randn((batch, *CHW), device="cuda").to(dt).contiguous()

    def __call__(self, x_host):
        """Run float32 numpy [N, 3, 224, 224]; return float32 numpy [N, classes].

        Raises:
            ValueError: ``x_host`` is not a numpy array of shape [N, 3, 224, 224] with N >= 1.
        """
        import numpy as np

        if (
            not isinstance(x_host, np.ndarray)
            or x_host.ndim != 4
            or tuple(x_host.shape[1:]) != CHW
            or not len(x_host)
        ):
            shape = getattr(x_host, "shape", type(x_host).__name__)
            raise ValueError(f"expected a numpy array [N>=1, 3, 224, 224], got {shape}")
        x_host = np.ascontiguousarray(x_host, dtype=np.float32)
        torch = self._torch
        dt = _torch_dtype(self._trt, torch, self.engine.get_tensor_dtype(self.inputs[0]))
        x = torch.from_numpy(x_host).to(device="cuda", dtype=dt).contiguous()
        y = self._bind(x)
        self.stream.wait_stream(torch.cuda.current_stream())  # x and y were made on torch's current stream
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        self.stream.synchronize()
        return y.float().cpu().numpy()

    def time_ms(self, batch: int, repeats: int, warmup: int = 10) -> list[float]:
        """GPU time of one ``execute_async_v3`` at ``batch``, milliseconds (CUDA events), ``repeats`` times."""
        torch = self._torch
        x = self.device_input(batch)
        self._bind(x)
        self.stream.wait_stream(torch.cuda.current_stream())
        handle = self.stream.cuda_stream
        for _ in range(warmup):
            self.context.execute_async_v3(handle)
        self.stream.synchronize()
        out = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(self.stream)
            self.context.execute_async_v3(handle)
            end.record(self.stream)
            end.synchronize()
            out.append(float(start.elapsed_time(end)))
        return out


def profile_engine(
    plan_path: str | os.PathLike, batch_sizes: Sequence[int], repeats: int = 50
) -> dict[int, float]:
    """Median GPU latency of one inference per batch size, milliseconds: ``{batch: p50_ms}``.

    Times ``execute_async_v3`` with CUDA events on a private stream after 10 warm-up runs, ``repeats`` times
    per batch size, on random inputs (latency does not depend on the values). Batch sizes must lie within
    the engine's optimization profile (1..max_batch_size of the build).

    Raises:
        ValueError: empty ``batch_sizes``, a batch size < 1, ``repeats`` < 1, or no such engine file.
        ImportError / RuntimeError: as :class:`EngineRunner`.
    """
    sizes = list(batch_sizes)
    if not sizes or any((not isinstance(b, int)) or b < 1 for b in sizes):
        raise ValueError(f"batch_sizes must be a non-empty list of ints >= 1, got {sizes}")
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
    runner = EngineRunner(plan_path)
    import statistics

    return {b: float(statistics.median(runner.time_ms(b, repeats))) for b in sorted(set(sizes))}
