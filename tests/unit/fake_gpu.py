"""FAKE TensorRT and FAKE CUDA runtime (cuda-python) for the CPU tests of the GPU path: mocks of what cannot run
here (no GPU, no TensorRT), named so.

:func:`fake_tensorrt` is the slice of the ``tensorrt`` Python API that ``build_engine`` and ``EngineRunner`` use,
with the enum values of a given release copied from NVIDIA/TensorRT include/NvInfer.h at that tag
(``NetworkDefinitionCreationFlag``, ``BuilderFlag``; python/src/infer/pyCore.cpp binds them under these names).
:class:`FakeCudaRuntime` is the slice of ``cuda.bindings.runtime``: device and pinned "memory" are real host
buffers (ctypes), copies are ``memmove``, events time the operations enqueued between them (0.1 ms each), and any
use of freed memory raises, so a runner that lets TensorRT write into a freed buffer fails the test.
"""

from __future__ import annotations

import ctypes
import enum
import json
import types
from pathlib import Path

import numpy as np

from tcsched.build_tools import tensorrt_engine as te

FAKE_ID = ("NVIDIA Fake GPU", "8.9", "10.5.0")

# NvInfer.h, enum class NetworkDefinitionCreationFlag / BuilderFlag, at v10.5.0, v10.13.3 and v11.1
_BUILDER_10_5 = {
    "FP16": 0, "INT8": 1, "DEBUG": 2, "GPU_FALLBACK": 3, "REFIT": 4, "DISABLE_TIMING_CACHE": 5, "TF32": 6,
    "SPARSE_WEIGHTS": 7, "SAFETY_SCOPE": 8, "OBEY_PRECISION_CONSTRAINTS": 9, "PREFER_PRECISION_CONSTRAINTS": 10,
    "DIRECT_IO": 11, "REJECT_EMPTY_ALGORITHMS": 12, "VERSION_COMPATIBLE": 13, "EXCLUDE_LEAN_RUNTIME": 14,
    "FP8": 15, "ERROR_ON_TIMING_CACHE_MISS": 16, "BF16": 17, "DISABLE_COMPILATION_CACHE": 18, "STRIP_PLAN": 19,
    "REFIT_IDENTICAL": 20, "WEIGHT_STREAMING": 21, "INT4": 22, "REFIT_INDIVIDUAL": 23,
}  # fmt: skip
_BUILDER_10_13 = _BUILDER_10_5 | {
    "STRICT_NANS": 24, "MONITOR_MEMORY": 25, "FP4": 26, "EDITABLE_TIMING_CACHE": 27,
    "DISTRIBUTIVE_INDEPENDENCE": 28,
}  # fmt: skip
_BUILDER_11_1 = {
    "DEBUG": 2, "GPU_FALLBACK": 3, "REFIT": 4, "DISABLE_TIMING_CACHE": 5, "TF32": 6, "SPARSE_WEIGHTS": 7,
    "SAFETY_SCOPE": 8, "DIRECT_IO": 11, "VERSION_COMPATIBLE": 12, "EXCLUDE_LEAN_RUNTIME": 13,
    "ERROR_ON_TIMING_CACHE_MISS": 15, "DISABLE_COMPILATION_CACHE": 17, "STRIP_PLAN": 18, "REFIT_IDENTICAL": 19,
    "WEIGHT_STREAMING": 20, "REFIT_INDIVIDUAL": 22, "STRICT_NANS": 23, "MONITOR_MEMORY": 24,
    "EDITABLE_TIMING_CACHE": 26, "DISTRIBUTIVE_INDEPENDENCE": 27,
}  # fmt: skip
RELEASES = {
    "10.5.0": ({"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1}, _BUILDER_10_5),
    "10.13.3": (
        {
            "EXPLICIT_BATCH": 0,
            "STRONGLY_TYPED": 1,
            "PREFER_JIT_PYTHON_PLUGINS": 2,
            "PREFER_AOT_PYTHON_PLUGINS": 3,
        },
        _BUILDER_10_13,
    ),
    # 11.1: kSTRONGLY_TYPED = 0 is deprecated and ignored (always strongly typed); 1 is kPREFER_JIT_PYTHON_PLUGINS
    "11.1.0": (
        {"STRONGLY_TYPED": 0, "PREFER_JIT_PYTHON_PLUGINS": 1, "PREFER_AOT_PYTHON_PLUGINS": 2},
        _BUILDER_11_1,
    ),
}


def inspector_json(int8: bool, sparse: bool | None) -> str:
    """Engine-inspector JSON in the layout of TensorRT's own examples (trt-engine-explorer, v10.13.3): a Q/DQ
    Reformat, a fused Conv (``ConvHasSparseWeights``), a Conv + Add; ``sparse`` None omits every sparsity field."""
    fmt = "Thirty-two wide channel vectorized row major Int8 format" if int8 else "Row major linear FP32"
    io = [{"Name": "t", "Location": "Device", "Dimensions": [8, 32, 112, 112], "Format/Datatype": fmt}]
    conv_a = {"Name": "stem + Clip", "LayerType": "CaskConvolution", "Inputs": io, "Outputs": io}
    conv_b = {"Name": "proj + Add", "LayerType": "CaskConvolution", "Inputs": io * 2, "Outputs": io}
    if sparse is not None:
        conv_a["ConvHasSparseWeights"] = 0
        conv_b["HasSparseWeights"] = int(sparse)
        conv_a["TacticName"] = "sm90_xmma_fprop_implicit_gemm_i8i8"
        conv_b["TacticName"] = (
            "sm90_xmma_fprop_sparse_conv_i8i8" if sparse else "sm90_xmma_fprop_implicit_gemm"
        )
    reformat = {
        "Name": "QuantizeLinear_2",
        "LayerType": "Reformat",
        "Inputs": [{"Format/Datatype": "Row major linear FP32"}],
        "Outputs": [{"Format/Datatype": "Row major Int8 format" if int8 else "Row major linear FP32"}],
        "Origin": "QDQ",
    }
    return json.dumps({"Layers": [reformat, conv_a, conv_b], "Bindings": ["input", "logits"]})


# ------------------------------------------------------------------------------------------------ CUDA runtime
class FakeCudaRuntime(types.ModuleType):
    """FAKE ``cuda.bindings.runtime``: every call returns ``(0, *values)`` like cuda-python. ``ops`` records
    the stream operations in order; freed pointers raise on use."""

    def __init__(self, devices: int = 1) -> None:
        super().__init__("cuda.bindings.runtime")
        self.devices = devices
        self.buffers: dict[int, ctypes.Array] = {}
        self.freed: set[int] = set()
        self.ops: list[tuple] = []
        self.events: dict[int, int] = {}
        self._next = 1

    def _alloc(self, nbytes):
        buf = ctypes.create_string_buffer(nbytes)
        self.buffers[ctypes.addressof(buf)] = buf
        return 0, ctypes.addressof(buf)

    def check(self, ptr: int, nbytes: int) -> None:
        """Raise unless [ptr, ptr + nbytes) lies inside a live allocation."""
        for base, buf in self.buffers.items():
            if base <= ptr and ptr + nbytes <= base + len(buf):
                return
        raise RuntimeError(f"FAKE CUDA: access to freed or unallocated memory at {ptr:#x}")

    def _free(self, ptr):
        if ptr not in self.buffers:
            raise RuntimeError(f"FAKE CUDA: double free of {ptr:#x}")
        del self.buffers[ptr]
        self.freed.add(ptr)
        return (0,)

    cudaMalloc = cudaMallocHost = _alloc
    cudaFree = cudaFreeHost = _free

    def cudaGetDeviceCount(self):
        return 0, self.devices

    def cudaSetDevice(self, device):
        return (0,) if device < self.devices else (101,)

    def cudaGetDeviceProperties(self, device):
        return 0, types.SimpleNamespace(name=b"NVIDIA Fake GPU\0\0", major=9, minor=0)

    def cudaStreamCreate(self):
        self._next += 1
        return 0, self._next

    def cudaStreamSynchronize(self, stream):
        return (0,)

    cudaStreamDestroy = cudaEventDestroy = cudaEventSynchronize = cudaStreamSynchronize

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream):
        self.check(dst, nbytes)
        self.check(src, nbytes)
        ctypes.memmove(dst, src, nbytes)
        self.ops.append(("copy", kind, nbytes))
        return (0,)

    def cudaEventCreate(self):
        self._next += 1
        return 0, self._next

    def cudaEventRecord(self, event, stream):
        self.events[event] = len(self.ops)
        self.ops.append(("record", event))
        return (0,)

    def cudaEventElapsedTime(self, start, end):
        between = [op for op in self.ops[self.events[start] + 1 : self.events[end]] if op[0] != "record"]
        return 0, 0.1 * len(between)


# ---------------------------------------------------------------------------------------------------- TensorRT
def fake_tensorrt(version: str, calls: dict, cuda: FakeCudaRuntime | None = None) -> types.ModuleType:
    """FAKE ``tensorrt`` of release ``version`` (a key of :data:`RELEASES`). Builder side: records in ``calls``
    how the builder is driven. Runtime side (needs ``cuda``): an engine whose plan is JSON
    ``{"max_batch": M, "classes": C}``; ``logits[i, k] = (k + 1) * mean(image i)``, written into the bound
    output buffer (checked live). ``set_input_shape`` returns False outside 1..M, as TensorRT does."""
    network_flags, builder_flags = RELEASES[version]
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag", network_flags)
    trt.BuilderFlag = enum.IntEnum("BuilderFlag", builder_flags)
    trt.MemoryPoolType = enum.IntEnum("MemoryPoolType", {"WORKSPACE": 0})
    trt.ProfilingVerbosity = enum.IntEnum(
        "ProfilingVerbosity", {"LAYER_NAMES_ONLY": 0, "NONE": 1, "DETAILED": 2}
    )
    trt.LayerInformationFormat = enum.IntEnum("LayerInformationFormat", {"ONELINE": 0, "JSON": 1})
    trt.TensorIOMode = enum.IntEnum("TensorIOMode", {"NONE": 0, "INPUT": 1, "OUTPUT": 2})
    trt.DataType = enum.IntEnum("DataType", {"FLOAT": 0, "HALF": 1, "INT8": 2})
    _builder_side(trt, calls)
    _runtime_side(trt, calls, cuda)
    return trt


def _builder_side(trt, calls: dict) -> None:
    class ILogger:
        Severity = enum.IntEnum(
            "Severity", {"INTERNAL_ERROR": 0, "ERROR": 1, "WARNING": 2, "INFO": 3, "VERBOSE": 4}
        )

        def __init__(self):
            pass

    class Tensor:
        name, shape = "input", (-1, 3, 224, 224)

    class Network:
        num_inputs = 1

        def get_input(self, i):
            return Tensor()

    class Cache:
        def __init__(self, data):
            self.data = bytes(data)

        def serialize(self):
            return self.data

    class Profile:
        def set_shape(self, name, lo, opt, hi):
            calls["profile"] = (name, tuple(lo), tuple(opt), tuple(hi))

    class Config:
        def __init__(self):
            self.flags = {trt.BuilderFlag.TF32}  # on by default (NvInfer.h: "Enabled by default")
            self.cache, self.profiling_verbosity = None, trt.ProfilingVerbosity.LAYER_NAMES_ONLY

        def set_memory_pool_limit(self, pool, size):
            calls["workspace"] = (pool, size)

        def set_flag(self, flag):
            self.flags.add(trt.BuilderFlag(flag))

        def clear_flag(self, flag):
            self.flags.discard(trt.BuilderFlag(flag))

        def add_optimization_profile(self, p):
            calls["profiles"] = calls.get("profiles", 0) + 1

        def create_timing_cache(self, data):
            calls["cache_loaded"] = bytes(data)
            return Cache(data)

        def set_timing_cache(self, cache, ignore_mismatch):
            self.cache = cache
            return True

        def get_timing_cache(self):
            return self.cache

    class Builder:
        def __init__(self, logger):
            self.logger = logger

        def create_network(self, flags):
            calls["network_flags"] = flags
            return Network()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            calls["flags"] = set(config.flags)
            calls["verbosity"] = config.profiling_verbosity
            self.logger.log(ILogger.Severity.VERBOSE, "tactic timing detail")
            self.logger.log(ILogger.Severity.INFO, "engine built")
            config.cache = Cache(config.cache.data + b"+timings")
            sparse = trt.BuilderFlag.SPARSE_WEIGHTS in config.flags
            return json.dumps({"max_batch": 8, "classes": 10, "sparse": sparse}).encode()

    class OnnxParser:
        num_errors = 0

        def __init__(self, network, logger):
            pass

        def parse_from_file(self, path):
            calls["parsed"] = path
            return True

    trt.ILogger, trt.Builder, trt.OnnxParser = ILogger, Builder, OnnxParser


def _runtime_side(trt, calls: dict, cuda: FakeCudaRuntime | None) -> None:
    class Inspector:
        def __init__(self, plan):
            self.plan = plan

        def get_engine_information(self, fmt):
            assert fmt == trt.LayerInformationFormat.JSON
            return inspector_json(int8=True, sparse=self.plan.get("sparse", False))

    class Context:
        def __init__(self, plan):
            self.plan, self.shape, self.addr = plan, None, {}

        def set_input_shape(self, name, shape):
            if name != "input" or not 1 <= shape[0] <= self.plan["max_batch"]:
                return False
            self.shape = tuple(shape)
            return True

        def get_tensor_shape(self, name):
            return (self.shape[0], self.plan["classes"])

        def set_tensor_address(self, name, ptr):
            self.addr[name] = int(ptr)
            return True

        def execute_async_v3(self, stream):
            n, classes = self.shape[0], self.plan["classes"]
            in_bytes, out_bytes = n * 3 * 224 * 224 * 4, n * classes * 4
            cuda.check(self.addr["input"], in_bytes)
            cuda.check(self.addr["logits"], out_bytes)
            x = np.frombuffer((ctypes.c_uint8 * in_bytes).from_address(self.addr["input"]), np.float32)
            y = np.outer(x.reshape(n, -1).mean(axis=1), np.arange(1, classes + 1)).astype(np.float32)
            ctypes.memmove(self.addr["logits"], y.ctypes.data, out_bytes)
            cuda.ops.append(("execute", n))
            calls["executed"] = calls.get("executed", 0) + 1
            return True

    class Engine:
        num_io_tensors = 2

        def __init__(self, plan):
            self.plan = plan

        def get_tensor_name(self, i):
            return ("input", "logits")[i]

        def get_tensor_mode(self, name):
            return trt.TensorIOMode.INPUT if name == "input" else trt.TensorIOMode.OUTPUT

        def get_tensor_profile_shape(self, name, profile):
            m = self.plan["max_batch"]
            return [(1, 3, 224, 224), (m, 3, 224, 224), (m, 3, 224, 224)]

        def get_tensor_shape(self, name):
            return (-1, 3, 224, 224) if name == "input" else (-1, self.plan["classes"])

        def get_tensor_dtype(self, name):
            return trt.DataType.FLOAT

        def create_execution_context(self):
            return Context(self.plan)

        def create_engine_inspector(self):
            return Inspector(self.plan)

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            return Engine(json.loads(bytes(data)))

    class Logger:
        WARNING = 2

        def __init__(self, level):
            pass

    trt.Runtime, trt.Logger = Runtime, Logger


# ------------------------------------------------------------------------ tensorrt_engine build/profile
class FakeEngines:
    """FAKE tensorrt_engine.build_engine / profile_engine; ``gpu_ms[precision]`` = p50 at batch 1 (with copies)."""

    def __init__(self, gpu_ms: dict[str, float], sparse_picked: bool | None = True, fail: bool = False):
        self.gpu_ms, self.sparse_picked, self.fail = gpu_ms, sparse_picked, fail
        self.builds: list[tuple[str, bool, Path, bytes]] = []

    def build_engine(
        self, onnx_path, plan_path, *, max_batch_size, sparse, timing_cache_path, log_path, layers_path, **kw
    ):
        if self.fail:
            raise RuntimeError("TensorRT could not build: simulated failure")
        plan_path, log_path, layers_path = Path(plan_path), Path(log_path), Path(layers_path)
        name = plan_path.parent.parent.name
        self.builds.append((name, sparse, Path(timing_cache_path), Path(onnx_path).read_bytes()))
        plan_path.write_bytes(b"engine " + name.encode())
        log_path.write_text("[I] built\n")
        info = inspector_json(int8="int8" in name, sparse=self.sparse_picked if sparse else False)
        layers = te.engine_layers(info)
        layers_path.write_text(json.dumps({"Layers": layers}))
        picked = te.sparse_layers(layers)
        return te.EngineBuildResult(
            plan_path=plan_path, log_path=log_path, layers_path=layers_path, tensorrt_version=FAKE_ID[2],
            build_seconds=1.5, size_bytes=plan_path.stat().st_size, int8_layers=len(te.int8_layers(layers)),
            sparse_layers_chosen=None if picked is None else len(picked),
        )  # fmt: skip

    def profile_engine(self, plan_path, batch_sizes, repeats=50):
        precision = Path(plan_path).parent.parent.name.removeprefix("mobilenet_v2_")
        ms = {b: self.gpu_ms[precision] * (1 + 0.5 * (b - 1)) for b in batch_sizes}
        return {b: te.EngineLatency(p50_ms=t, p99_ms=1.2 * t, compute_p50_ms=0.8 * t) for b, t in ms.items()}


def patch_engines(monkeypatch, fake: FakeEngines) -> None:
    monkeypatch.setattr(te, "build_engine", fake.build_engine)
    monkeypatch.setattr(te, "profile_engine", fake.profile_engine)
    monkeypatch.setattr(te, "gpu_identity", lambda device=0: FAKE_ID)
    monkeypatch.setattr(te, "check_gpu_dependencies", lambda device=0: None)
