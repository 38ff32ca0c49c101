"""TensorRT engines from the variants' ONNX graphs: check the GPU stack, build, inspect, run, profile.

Every engine is a **strongly typed** network (``NetworkDefinitionCreationFlag.STRONGLY_TYPED``): the precision
of each layer comes from the ONNX graph itself (Q/DQ pairs -> INT8, Cast nodes -> FP16), never from the
``BuilderFlag.FP16``/``BuilderFlag.INT8`` flags or an INT8 calibrator (deprecated in TensorRT 10.13, gone in 11.1:
include/NvInfer.h ``enum class BuilderFlag``). ``BuilderFlag.TF32`` is cleared: it is on by default in 10.5, 10.13
and 11.1 ("Enabled by default", same header) and would let float32 layers (the fp32 reference, int8_mixed's
float layers) compute with 10-bit mantissas. ``BuilderFlag.SPARSE_WEIGHTS`` (value 7 in all three) lets the
builder try 2:4 sparse kernels for ``sparse24`` graphs.

What the builder chose is read from the engine itself, never from its log: the engine inspector
(``ICudaEngine.create_engine_inspector().get_engine_information(LayerInformationFormat.JSON)``, present with
these signatures in python/src/infer/pyCore.cpp of 10.5, 10.13 and 11.1) with ``ProfilingVerbosity.DETAILED``
lists every fused layer with its I/O formats (``"Format/Datatype": "... Int8 ..."``), its tactic and, for
convolutions, ``"HasSparseWeights"`` (``"ConvHasSparseWeights"`` when fused with an activation/pool); see the
engine JSONs of tools/experimental/trt-engine-explorer/examples in NVIDIA/TensorRT v10.13.3.

Engines run through cuda-python's CUDA runtime API (:func:`tcsched.engine_compat.cuda_runtime`), as TensorRT's
own Python samples do (samples/python/common_runtime.py): no torch. ``tensorrt`` and cuda-python are imported
inside the functions, so importing this module needs neither (the CPU build and every CPU test run without a GPU).

Engine files are valid only on the GPU architecture (compute capability) and the TensorRT version that built
them; :func:`gpu_identity` names both and the manifest records them (:class:`tcsched.manifest.EngineInfo`).
"""

from __future__ import annotations

import ctypes
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# re-exported: the CPU-side reading of graphs and engine information
from tcsched.build_tools.tensorrt_inspect import (  # noqa: F401
    _INT8_FORMAT,
    _TRT_QDQ_TYPES,
    _constants,
    _formats,
    engine_layers,
    int8_layers,
    sparse_layers,
    tensorrt_qdq_problems,
)

# re-exported: the profiling of a built engine
from tcsched.build_tools.tensorrt_profile import EngineLatency, profile_engine  # noqa: F401
from tcsched.engine_compat import cuda_check, cuda_runtime

# re-exported: the identity is defined beside the compatibility check that the server runs
from tcsched.engine_compat import gpu_identity as gpu_identity

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
CHW = (3, 224, 224)
DEFAULT_WORKSPACE_BYTES = 2 << 30  # 2 GiB: ample for MobileNetV2's tactics, small beside any datacenter GPU
# cudaMemcpyKind (CUDA runtime API, driver_types.h): 1 host->device, 2 device->host
_H2D, _D2H = 1, 2


# --------------------------------------------------------------------------------------------- the GPU stack
def missing_gpu_dependencies(device: int = 0) -> list[str]:
    """What this machine lacks to build and run TensorRT engines, one line each (empty: nothing).

    Checked without building anything: the ``tensorrt`` Python package (and the libnvinfer it loads), cuda-python
    (:func:`~tcsched.engine_compat.cuda_runtime`), a CUDA driver and GPU ``device`` (``cudaGetDeviceCount``).
    """
    missing = []
    try:
        import tensorrt  # noqa: F401
    except ImportError as e:  # also raised when libnvinfer cannot be loaded
        missing.append(f"tensorrt: {e} (pip install tensorrt-cu12==<the TensorRT of your Triton server>)")
    try:
        rt = cuda_runtime()
    except ImportError as e:
        missing.append(f"cuda-python: {e}")
        return missing
    try:
        count = cuda_check(rt.cudaGetDeviceCount(), "cudaGetDeviceCount")
    except RuntimeError as e:
        missing.append(f"CUDA GPU: {e} (no NVIDIA driver or GPU visible; run the container with --gpus)")
        return missing
    if device >= count:
        missing.append(f"CUDA GPU: device {device} requested, {count} visible (CUDA_VISIBLE_DEVICES)")
    return missing


def check_gpu_dependencies(device: int = 0) -> None:
    """Refuse to start GPU work on a machine that cannot finish it (:func:`missing_gpu_dependencies`).

    Raises:
        RuntimeError: something is missing; the message lists every missing piece.
    """
    missing = missing_gpu_dependencies(device)
    if missing:
        raise RuntimeError("TensorRT engines cannot be built here: " + "; ".join(missing))


# ---------------------------------------------------------------------------------------------------- build
@dataclass(frozen=True)
class EngineBuildResult:
    """What :func:`build_engine` produced.

    ``build_seconds``: wall-clock seconds of parse + build + serialise + inspection. ``layers_path``: the engine
    inspector's JSON. ``int8_layers``: compute layers with INT8 I/O (:func:`int8_layers`).
    ``sparse_layers_chosen``: layers running sparse kernels (:func:`sparse_layers`), ``None`` if the
    inspector does not say.
    """

    plan_path: Path
    log_path: Path
    layers_path: Path
    tensorrt_version: str
    build_seconds: float
    size_bytes: int
    int8_layers: int
    sparse_layers_chosen: int | None


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


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _parse_network(trt, builder, logger, onnx_path: Path, log_path: Path):
    """The strongly typed network of ``onnx_path``, checked to take ``input`` [N, 3, 224, 224]."""
    # STRONGLY_TYPED is 1 in 10.x and 0 in 11.x, where it is deprecated and ignored (always strongly typed):
    # the enum member, not a number, keeps both right
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT's ONNX parser rejected {onnx_path}: {errors} (log: {log_path})")
    inputs = {network.get_input(i).name: network.get_input(i) for i in range(network.num_inputs)}
    if INPUT_NAME not in inputs or tuple(inputs[INPUT_NAME].shape)[1:] != CHW:
        found = {n: tuple(t.shape) for n, t in inputs.items()}
        raise ValueError(f"{onnx_path}: expected input {INPUT_NAME!r} of shape [N, 3, 224, 224], got {found}")
    return network, parser


def _builder_config(trt, builder, max_batch_size: int, sparse: bool, workspace_bytes: int, cache_path: Path):
    """Builder config: workspace limit, TF32 off, DETAILED profiling verbosity (the inspector's layer details),
    ``SPARSE_WEIGHTS`` if ``sparse``, one profile for batch 1..``max_batch_size`` (opt = max: Triton's dynamic
    batcher fills batches under load), and the timing cache at ``cache_path``."""
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    config.clear_flag(trt.BuilderFlag.TF32)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if sparse:
        config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT_NAME, (1, *CHW), (max_batch_size, *CHW), (max_batch_size, *CHW))  # min, opt, max
    config.add_optimization_profile(profile)
    cache_bytes = cache_path.read_bytes() if cache_path.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    # ignore_mismatch=False: a cache written on another GPU / TensorRT is refused; then start afresh
    if cache is None or not config.set_timing_cache(cache, False):
        config.set_timing_cache(config.create_timing_cache(b""), False)
    return config


def _inspect(trt, logger, serialized) -> str:
    """The engine inspector's JSON of a serialised engine (deserialised here, on this GPU)."""
    engine = trt.Runtime(logger).deserialize_cuda_engine(serialized)
    if engine is None:
        raise RuntimeError("TensorRT could not deserialise the engine it just built")
    inspector = engine.create_engine_inspector()
    return str(inspector.get_engine_information(trt.LayerInformationFormat.JSON))


def build_engine(
    onnx_path: str | os.PathLike,
    plan_path: str | os.PathLike,
    *,
    max_batch_size: int,
    sparse: bool = False,
    timing_cache_path: str | os.PathLike,
    log_path: str | os.PathLike,
    layers_path: str | os.PathLike | None = None,
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
    verbose_log: bool = False,
) -> EngineBuildResult:
    """Compile one ONNX variant into a serialised TensorRT engine (``.plan``) for this machine's GPU.

    The network is strongly typed (precisions from the graph's Q/DQ and Cast nodes), TF32 is off, and the
    ONNX input ``input`` float32 [N, 3, 224, 224] gets one optimization profile N = 1..``max_batch_size``. With
    ``sparse`` the builder may use 2:4 sparse kernels (``SPARSE_WEIGHTS``) where they time faster. The timing
    cache at ``timing_cache_path`` is loaded if present and written back (atomic) after the build. The builder
    log (INFO, or VERBOSE) goes to ``log_path``; the engine inspector's JSON to ``layers_path`` (default
    ``engine_layers.json`` beside the plan), and its INT8 and sparse layers are counted.

    Raises:
        ValueError: missing ONNX file, ``max_batch_size`` < 1, workspace < 1 MiB, the graph has no input
            ``input`` of shape [N, 3, 224, 224], or the inspector's output is not DETAILED JSON.
        ImportError: the ``tensorrt`` package is not installed.
        RuntimeError: the ONNX parser or the builder failed (the message holds their errors; see the log).
    """
    onnx_path, plan_path, log_path = Path(onnx_path), Path(plan_path), Path(log_path)
    cache_path = Path(timing_cache_path)
    layers_path = Path(layers_path) if layers_path is not None else plan_path.with_name("engine_layers.json")
    _validate_build_args(onnx_path, max_batch_size, workspace_bytes)
    import tensorrt as trt

    for p in (plan_path, log_path, cache_path, layers_path):
        p.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    logger = _file_logger(trt, log_path, verbose_log)
    try:
        builder = trt.Builder(logger)
        network, _parser = _parse_network(
            trt, builder, logger, onnx_path, log_path
        )  # the parser owns weights
        config = _builder_config(trt, builder, max_batch_size, sparse, workspace_bytes, cache_path)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            errors = "; ".join(logger.errors) or "see log"
            raise RuntimeError(f"TensorRT could not build {onnx_path}: {errors} (log: {log_path})")
        _write_atomic(plan_path, bytes(serialized))
        # the cache now holds this build's timings too: save it for the next variant / build
        _write_atomic(cache_path, bytes(config.get_timing_cache().serialize()))
        info = _inspect(trt, logger, serialized)
    finally:
        logger.close()
    layers = engine_layers(info)
    _write_atomic(layers_path, json.dumps({"Layers": layers}, indent=1).encode())
    sparse_names = sparse_layers(layers)
    return EngineBuildResult(
        plan_path=plan_path,
        log_path=log_path,
        layers_path=layers_path,
        tensorrt_version=trt.__version__,
        build_seconds=time.perf_counter() - t0,
        size_bytes=plan_path.stat().st_size,
        int8_layers=len(int8_layers(layers)),
        sparse_layers_chosen=None if sparse_names is None else len(sparse_names),
    )


# ------------------------------------------------------------------------------------------------------ run
def _numpy_dtype(trt, dt) -> np.dtype:
    table = {trt.DataType.FLOAT: np.float32, trt.DataType.HALF: np.float16}
    if dt not in table:
        raise RuntimeError(
            f"engine I/O data type {dt} is not supported by this runner (float32/float16 only)"
        )
    return np.dtype(table[dt])


class _Pinned:
    """One device buffer and one page-locked host buffer of ``nbytes`` each (cudaMalloc / cudaMallocHost)."""

    def __init__(self, rt, nbytes: int) -> None:
        self._rt, self.nbytes = rt, nbytes
        self.device = int(cuda_check(rt.cudaMalloc(nbytes), f"cudaMalloc({nbytes})"))
        try:
            self.host = int(cuda_check(rt.cudaMallocHost(nbytes), f"cudaMallocHost({nbytes})"))
        except RuntimeError:
            rt.cudaFree(self.device)
            raise

    def host_array(self, dtype: np.dtype, count: int) -> np.ndarray:
        """The host buffer's first ``count`` elements as a numpy array (a view: no copy)."""
        buf = (ctypes.c_uint8 * self.nbytes).from_address(self.host)
        return np.frombuffer(buf, dtype=dtype, count=count)

    def free(self) -> None:
        cuda_check(self._rt.cudaFreeHost(self.host), "cudaFreeHost")
        cuda_check(self._rt.cudaFree(self.device), "cudaFree")


class EngineRunner:
    """Run a serialised engine on one CUDA device through cuda-python (tests, profiling); no torch.

    One input ``input`` [N, 3, 224, 224] and one output ``logits`` [N, classes] of float32 or float16. The input
    and output live in device buffers of the profile's largest batch, allocated once and bound to the execution
    context for the runner's whole life (so TensorRT never writes into freed memory), with page-locked host
    buffers for the copies. Use as a context manager, or call :meth:`close`.

    Raises (constructor):
        ValueError: ``plan_path`` does not exist.
        ImportError: tensorrt or cuda-python is not installed.
        RuntimeError: no CUDA GPU, or the engine cannot be deserialised here (other GPU/TensorRT), or its I/O
            is not one ``input`` and one output.
    """

    def __init__(self, plan_path: str | os.PathLike, device: int = 0) -> None:
        plan_path = Path(plan_path)
        if not plan_path.is_file():
            raise ValueError(f"engine file {plan_path} does not exist")
        import tensorrt as trt

        self._trt, self._rt = trt, cuda_runtime()
        cuda_check(self._rt.cudaSetDevice(device), f"cudaSetDevice({device})")
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(plan_path.read_bytes())
        if self.engine is None:
            raise RuntimeError(
                f"TensorRT {trt.__version__} could not deserialise {plan_path}: built for another GPU or "
                "TensorRT version? Rebuild it with `tcsched engines`"
            )
        self.context = self.engine.create_execution_context()
        self._check_io()
        self._allocate()

    def _check_io(self) -> None:
        trt, engine = self._trt, self.engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if inputs != [INPUT_NAME] or len(outputs) != 1:
            raise RuntimeError(f"expected one input {INPUT_NAME!r} and one output, got {inputs} -> {outputs}")
        self.output_name = outputs[0]
        self.max_batch = int(engine.get_tensor_profile_shape(INPUT_NAME, 0)[2][0])
        self.classes = int(engine.get_tensor_shape(self.output_name)[1])
        self.input_dtype = _numpy_dtype(trt, engine.get_tensor_dtype(INPUT_NAME))
        self.output_dtype = _numpy_dtype(trt, engine.get_tensor_dtype(self.output_name))

    def _allocate(self) -> None:
        rt, n = self._rt, self.max_batch
        self._in = _Pinned(rt, n * int(np.prod(CHW)) * self.input_dtype.itemsize)
        self._out = _Pinned(rt, n * self.classes * self.output_dtype.itemsize)
        self.stream = cuda_check(rt.cudaStreamCreate(), "cudaStreamCreate")
        self._events = tuple(cuda_check(rt.cudaEventCreate(), "cudaEventCreate") for _ in range(2))
        self._closed = False
        if not (
            self.context.set_tensor_address(INPUT_NAME, self._in.device)
            and self.context.set_tensor_address(self.output_name, self._out.device)
        ):
            raise RuntimeError("TensorRT refused the I/O buffer addresses")

    def set_batch(self, batch: int) -> None:
        """Set the input shape to ``batch`` images and check the output shape TensorRT infers from it.

        Raises:
            ValueError: ``batch`` outside the engine's profile, 1..``max_batch``.
            RuntimeError: TensorRT refused the shape (``set_input_shape`` returned False) or inferred another
                output shape than [batch, classes].
        """
        if not isinstance(batch, int) or not 1 <= batch <= self.max_batch:
            raise ValueError(
                f"batch must be an int in 1..{self.max_batch} (the engine's profile), got {batch!r}"
            )
        if not self.context.set_input_shape(INPUT_NAME, (batch, *CHW)):
            raise RuntimeError(f"TensorRT refused input shape {(batch, *CHW)} (profile 1..{self.max_batch})")
        shape = tuple(self.context.get_tensor_shape(self.output_name))
        if shape != (batch, self.classes):
            raise RuntimeError(f"output shape {shape} for batch {batch}, expected {(batch, self.classes)}")

    def _enqueue(self, batch: int, copies: bool) -> None:
        """Enqueue on the runner's stream: [input host->device], the engine, [output device->host]."""
        rt, s = self._rt, self.stream
        if copies:
            nbytes = batch * int(np.prod(CHW)) * self.input_dtype.itemsize
            cuda_check(rt.cudaMemcpyAsync(self._in.device, self._in.host, nbytes, _H2D, s), "copy in")
        if not self.context.execute_async_v3(int(s)):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        if copies:
            nbytes = batch * self.classes * self.output_dtype.itemsize
            cuda_check(rt.cudaMemcpyAsync(self._out.host, self._out.device, nbytes, _D2H, s), "copy out")

    def __call__(self, x_host: np.ndarray) -> np.ndarray:
        """Run float32 numpy [N, 3, 224, 224] (any N >= 1, in chunks of ``max_batch``); return float32 [N, classes].

        Raises:
            ValueError: ``x_host`` is not a numpy array of shape [N, 3, 224, 224] with N >= 1.
            RuntimeError: as :meth:`set_batch`, or a CUDA/TensorRT call failed.
        """
        if (
            not isinstance(x_host, np.ndarray)
            or x_host.ndim != 4
            or tuple(x_host.shape[1:]) != CHW
            or not len(x_host)
        ):
            shape = getattr(x_host, "shape", type(x_host).__name__)
            raise ValueError(f"expected a numpy array [N>=1, 3, 224, 224], got {shape}")
        out = []
        for i in range(0, len(x_host), self.max_batch):
            chunk = x_host[i : i + self.max_batch]
            n = len(chunk)
            self.set_batch(n)
            self._in.host_array(self.input_dtype, chunk.size)[:] = chunk.astype(self.input_dtype).ravel()
            self._enqueue(n, copies=True)
            cuda_check(self._rt.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
            y = self._out.host_array(self.output_dtype, n * self.classes)
            out.append(y.reshape(n, self.classes).astype(np.float32))  # a copy: the buffer is reused
        return np.concatenate(out)

    def time_ms(self, batch: int, repeats: int, warmup: int = 10, copies: bool = True) -> list[float]:
        """Milliseconds of one inference at ``batch``, ``repeats`` times (CUDA events on the runner's stream), on
        random inputs. With ``copies`` (the served path: Triton copies each request in and each response out)
        the input host->device and output device->host copies are inside the timed span; without, the engine's
        execution alone.

        Raises:
            ValueError: ``repeats`` < 1, ``warmup`` < 0, or ``batch`` outside the profile.
        """
        if not isinstance(repeats, int) or repeats < 1 or not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"repeats must be an int >= 1 and warmup >= 0, got {repeats!r}, {warmup!r}")
        rt, (start, end) = self._rt, self._events
        self.set_batch(batch)
        x = np.random.default_rng(0).normal(size=batch * int(np.prod(CHW)))
        self._in.host_array(self.input_dtype, x.size)[:] = x.astype(self.input_dtype)
        for _ in range(warmup):
            self._enqueue(batch, copies)
        cuda_check(rt.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        out = []
        for _ in range(repeats):
            cuda_check(rt.cudaEventRecord(start, self.stream), "cudaEventRecord")
            self._enqueue(batch, copies)
            cuda_check(rt.cudaEventRecord(end, self.stream), "cudaEventRecord")
            cuda_check(rt.cudaEventSynchronize(end), "cudaEventSynchronize")
            out.append(float(cuda_check(rt.cudaEventElapsedTime(start, end), "cudaEventElapsedTime")))
        return out

    def close(self) -> None:
        """Free the buffers, events and stream (idempotent)."""
        if getattr(self, "_closed", True):
            return
        self._closed = True
        cuda_check(self._rt.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        for e in self._events:
            self._rt.cudaEventDestroy(e)
        self._rt.cudaStreamDestroy(self.stream)
        self._in.free()
        self._out.free()

    def __enter__(self) -> EngineRunner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
