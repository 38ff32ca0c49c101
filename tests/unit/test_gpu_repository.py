"""The GPU path on a CPU-only machine: configs, compatibility checks, keep-if-pays and the conversion itself.

No test here needs TensorRT or a GPU. Tests named ``*mocked_tensorrt*`` replace TensorRT: either the functions of
``tensorrt_engine`` (build_engine / profile_engine) or the ``tensorrt`` module itself (a fake recording how the
builder is driven). What they cannot show (real engines, real kernels, real latency) is in tests/gpu.
"""

from __future__ import annotations

import enum
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc
from typer.testing import CliRunner

from tcsched.build_tools import gpu_repository as g
from tcsched.build_tools import repository as r
from tcsched.build_tools import tensorrt_engine as te
from tcsched.manifest import EngineInfo, Manifest
from tcsched.scheduler.policy import LiveState, Policy, RequestOptions
from tests.helpers import make_manifest, tiny_classifier

FAKE_ID = ("NVIDIA Fake GPU", "8.9", "10.5.0")

SAMPLE_LOG = """\
[12:00:01] [I] [MemUsageChange] Init CUDA: CPU +2, GPU +0, now: CPU 20, GPU 500 (MiB)
[12:00:09] [I] (Sparsity) Layers eligible for sparse math: /features/1/conv/conv.0/Conv, /features/2/conv/conv.0/Conv + /features/2/conv/conv.2/Clip, /classifier/classifier.1/Gemm
[12:00:09] [I] (Sparsity) TRT inference plan picked sparse implementation for layers: /features/2/conv/conv.0/Conv + /features/2/conv/conv.2/Clip, /classifier/classifier.1/Gemm
[12:00:10] [I] Total Activation Memory: 7864832
"""


# --- configs ---------------------------------------------------------------------------------------------------
def test_tensorrt_variant_config_is_valid_model_config_proto():
    cfg = g.tensorrt_variant_config("mobilenet_v2_int8", 8, True, {"9.0": "model.plan", "8.9": "model.plan"})
    text = r.render(cfg)
    parsed = text_format.Parse(text, mc.ModelConfig())  # raises ParseError if not valid model_config.proto
    assert parsed == cfg
    assert parsed.platform == "tensorrt_plan" and parsed.backend == ""
    assert parsed.max_batch_size == 8 and parsed.default_model_filename == "model.plan"
    assert dict(parsed.cc_model_filenames) == {"9.0": "model.plan", "8.9": "model.plan"}
    assert parsed.optimization.cuda.graphs is True
    assert parsed.dynamic_batching.max_queue_delay_microseconds == 2000
    assert [(g_.kind, g_.count) for g_ in parsed.instance_group] == [(mc.ModelInstanceGroup.KIND_GPU, 1)]
    (inp,), (out,) = parsed.input, parsed.output
    assert (inp.name, inp.data_type, list(inp.dims)) == ("input", mc.TYPE_FP32, [3, 224, 224])
    assert (out.name, out.data_type, list(out.dims)) == ("logits", mc.TYPE_FP32, [1000])


def test_tensorrt_variant_config_without_cuda_graphs_or_cc_map():
    cfg = g.tensorrt_variant_config("v", 4, False, None, max_queue_delay_microseconds=500)
    parsed = r.parse(r.render(cfg))
    assert not parsed.HasField("optimization") and len(parsed.cc_model_filenames) == 0
    assert parsed.dynamic_batching.max_queue_delay_microseconds == 500


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "bad/name"}, "model name"),
        ({"max_batch_size": 0}, "max_batch_size"),
        ({"cc_filenames": {"sm90": "model.plan"}}, "compute capabilities"),
        ({"cc_filenames": {"9.0": "../model.plan"}}, "file name"),
        ({"instance_count": 0}, "instance_count"),
    ],
)
def test_tensorrt_variant_config_rejects_bad_input(kwargs, match):
    args = {"name": "v", "max_batch_size": 8, "cuda_graphs": False, "cc_filenames": None} | kwargs
    with pytest.raises(ValueError, match=match):
        g.tensorrt_variant_config(**args)


# --- builder log -----------------------------------------------------------------------------------------------
def test_count_sparse_layers_from_builder_log():
    assert te.count_sparse_layers(SAMPLE_LOG) == 2  # a fused "A + B" layer counts once
    assert te.count_sparse_eligible_layers(SAMPLE_LOG) == 3
    assert te.count_sparse_layers(SAMPLE_LOG + SAMPLE_LOG) == 2  # the same layers twice: counted once
    none_picked = "[I] (Sparsity) TRT inference plan picked sparse implementation for layers:\n"
    assert te.count_sparse_layers(none_picked) == 0
    assert te.count_sparse_layers("") == 0
    with pytest.raises(TypeError):
        te.count_sparse_layers(b"bytes")  # type: ignore[arg-type]


# --- Q/DQ that TensorRT can parse --------------------------------------------------------------------------------
def _qdq_graph(path: Path, zp_type: int, zp_value: int) -> Path:
    from onnx import TensorProto, helper

    q = helper.make_node("QuantizeLinear", ["input", "s", "zp"], ["q"], name="q_in")
    dq = helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["logits"], name="dq_in")
    graph = helper.make_graph(
        [q, dq],
        "qdq",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])],
        initializer=[
            helper.make_tensor("s", TensorProto.FLOAT, [], [0.1]),
            helper.make_tensor("zp", zp_type, [], [zp_value]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))
    return path


def test_tensorrt_qdq_problems(tmp_path):
    from onnx import TensorProto

    assert te.tensorrt_qdq_problems(_qdq_graph(tmp_path / "sym.onnx", TensorProto.INT8, 0)) == []
    problems = te.tensorrt_qdq_problems(_qdq_graph(tmp_path / "u8.onnx", TensorProto.UINT8, 128))
    assert len(problems) == 2 and "UINT8 zero point" in problems[0] and "'q_in'" in problems[0]
    problems = te.tensorrt_qdq_problems(_qdq_graph(tmp_path / "asym.onnx", TensorProto.INT8, 3))
    assert len(problems) == 2 and "non-zero zero point" in problems[1]
    assert te.tensorrt_qdq_problems(tiny_classifier(tmp_path / "fp32.onnx")) == []  # no Q/DQ at all
    with pytest.raises(ValueError, match="does not exist"):
        te.tensorrt_qdq_problems(tmp_path / "missing.onnx")


def test_onnxruntime_uint8_int8_is_made_symmetric_for_tensorrt(tmp_path):
    """The CPU build's int8 (uint8 asymmetric activations, int32 biases) is re-expressed for TensorRT: symmetric
    int8 with the same calibrated ranges; ONNX Runtime still runs it and agrees with the uint8 graph."""
    import onnx

    from tcsched.build_tools.quantize import quantize_int8, to_symmetric_int8
    from tcsched.ort_runtime import OrtClassifier

    calib = np.random.default_rng(0).normal(size=(16, 3, 32, 32)).astype(np.float32)
    fp32 = tmp_path / "tiny.onnx"
    _cpu_repo(tmp_path)
    q = quantize_int8(fp32, tmp_path / "int8.onnx", calib, method="minmax")
    assert te.tensorrt_qdq_problems(q), "ONNX Runtime's default int8 has zero points TensorRT rejects"
    src, note = g.tensorrt_source(q, tmp_path / "trt" / "model.tensorrt.onnx")
    assert src != q and "symmetric" in note
    assert te.tensorrt_qdq_problems(src) == []
    original = onnx.load(str(q))
    sym, n = to_symmetric_int8(original)
    assert n > 0
    before = {i.name: onnx.numpy_helper.to_array(i) for i in original.graph.initializer}
    after = {i.name: onnx.numpy_helper.to_array(i) for i in sym.graph.initializer}
    for node in original.graph.node:
        if node.op_type != "QuantizeLinear":
            continue
        s0, z0 = before[node.input[1]].astype(float), before[node.input[2]].astype(float)
        s1, z1 = after[node.input[1]].astype(float), after[node.input[2]]
        assert z1.dtype == np.int8 and not z1.any()
        lo, hi = (0 - z0) * s0, (255 - z0) * s0  # the calibrated uint8 range ...
        tol = 1e-6 * max(abs(lo), abs(hi))  # the scale is stored as float32
        assert -128 * s1 <= lo + tol and hi <= 127 * s1 + tol  # ... is inside the symmetric one
        assert s1 <= 2.01 * s0  # at most one bit of resolution is given up
    assert not any(
        i.data_type == onnx.TensorProto.INT32 for i in sym.graph.initializer
    )  # biases folded to float
    # same function: the folded ReLU survives (a symmetric range alone would let negatives through)
    ref, a, b = OrtClassifier(fp32)(calib), OrtClassifier(q)(calib), OrtClassifier(src)(calib)
    err_u8, err_sym = np.abs(a - ref).max(), np.abs(b - ref).max()
    assert err_sym < 4 * err_u8 + 1e-3, (err_u8, err_sym)  # at most one bit coarser, not a different function
    assert g.tensorrt_source(fp32, tmp_path / "unused.onnx") == (fp32, None)  # float graph: compiled as it is


# --- keep-if-pays ------------------------------------------------------------------------------------------------
def test_sparse_keep_decision():
    fp16 = {1: 1.0, 8: 4.0}
    keep, why = g.sparse_keep_decision(3, {1: 0.9, 8: 3.0}, fp16)
    assert keep and "kept" in why
    keep, why = g.sparse_keep_decision(3, {1: 1.1, 8: 3.0}, fp16)  # slower at batch 1
    assert not keep and "not faster" in why
    keep, why = g.sparse_keep_decision(0, {1: 0.5, 8: 2.0}, fp16)  # faster, but no sparse kernel: noise
    assert not keep and "no sparse kernel" in why
    keep, why = g.sparse_keep_decision(3, {1: 0.5}, None)
    assert not keep and "no fp16" in why


# --- engine compatibility ------------------------------------------------------------------------------------------
def _gpu_manifest(cc="8.9", trt="10.5.0") -> Manifest:
    m = make_manifest({"fp32": ("fp32", 0.0, {1: 1.0}), "int8": ("int8", 0.5, {1: 0.5})}, target="gpu")
    for v in m.variants:
        v.runtime = "tensorrt"
        v.engine = EngineInfo(
            plan_file=f"{v.name}/1/model.plan",
            tensorrt_version=trt,
            compute_capability=cc,
            gpu_name="NVIDIA X",
        )
    return m


def _no_gpu():
    raise ImportError("No module named 'tensorrt'")


def test_check_engine_compatibility():
    cpu = make_manifest({"fp32": ("fp32", 0.0, {1: 1.0})})
    g.check_engine_compatibility(cpu, identity=_no_gpu)  # CPU repository: nothing to check, nothing imported
    g.check_engine_compatibility(_gpu_manifest(), identity=lambda: FAKE_ID)
    g.check_engine_compatibility(_gpu_manifest(trt="10.5.0.18"), identity=lambda: FAKE_ID)  # same release
    with pytest.raises(
        RuntimeError,
        match=r"compute capability 9\.0 / TensorRT 10\.5\.0.*this machine has "
        r"compute capability 8\.9 / TensorRT 10\.5\.0.*tcsched engines",
    ):
        g.check_engine_compatibility(_gpu_manifest(cc="9.0"), identity=lambda: FAKE_ID)
    with pytest.raises(RuntimeError, match=r"TensorRT 10\.3\.0.*TensorRT 10\.5\.0"):
        g.check_engine_compatibility(_gpu_manifest(trt="10.3.0"), identity=lambda: FAKE_ID)
    with pytest.raises(RuntimeError, match="cannot be identified"):
        g.check_engine_compatibility(_gpu_manifest(), identity=_no_gpu)
    m = _gpu_manifest()
    m.variants[1].engine = None
    with pytest.raises(RuntimeError, match="without engine info"):
        g.check_engine_compatibility(m, identity=lambda: FAKE_ID)


# --- import without tensorrt -----------------------------------------------------------------------------------
def test_modules_import_without_tensorrt():
    code = (
        "import sys\n"
        "for m in ('tensorrt', 'pynvml'): sys.modules[m] = None  # any import of them raises ImportError\n"
        "import tcsched.build_tools.tensorrt_engine as te, tcsched.build_tools.gpu_repository, tcsched.cli\n"
        "assert 'torch' not in sys.modules\n"
        "try:\n    te.gpu_identity()\nexcept ImportError:\n    print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_engine_functions_validate_before_importing_tensorrt(tmp_path):
    kw = {"max_batch_size": 8, "timing_cache_path": tmp_path / "c", "log_path": tmp_path / "l"}
    with pytest.raises(ValueError, match="does not exist"):
        te.build_engine(tmp_path / "missing.onnx", tmp_path / "m.plan", **kw)
    onnx_path = tiny_classifier(tmp_path / "m.onnx")
    with pytest.raises(ValueError, match="max_batch_size"):
        te.build_engine(onnx_path, tmp_path / "m.plan", **(kw | {"max_batch_size": 0}))
    with pytest.raises(ValueError, match="batch_sizes"):
        te.profile_engine(tmp_path / "m.plan", [])
    with pytest.raises(ValueError, match="repeats"):
        te.profile_engine(tmp_path / "m.plan", [1], repeats=0)
    with pytest.raises(ValueError, match="device"):
        te.gpu_identity(-1)


# --- build_engine against a fake tensorrt module ---------------------------------------------------------------
def _fake_tensorrt(calls: dict) -> types.ModuleType:
    """The slice of the TensorRT 10/11 Python API that build_engine uses; no FP16/INT8 builder flags (as in 11)."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "11.0.0"

    class ILogger:
        class Severity(enum.IntEnum):
            INTERNAL_ERROR = 0
            ERROR = 1
            WARNING = 2
            INFO = 3
            VERBOSE = 4

        def __init__(self):
            pass

    class NetworkDefinitionCreationFlag(enum.IntEnum):
        STRONGLY_TYPED = 1

    class BuilderFlag(enum.IntEnum):
        SPARSE_WEIGHTS = 7

    class MemoryPoolType(enum.IntEnum):
        WORKSPACE = 0

    class ProfilingVerbosity(enum.IntEnum):
        LAYER_NAMES_ONLY = 0
        DETAILED = 1

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
            self.flags, self.cache = set(), None

        def set_memory_pool_limit(self, pool, size):
            calls["workspace"] = (pool, size)

        def set_flag(self, flag):
            self.flags.add(flag)

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
            sev = ILogger.Severity
            self.logger.log(sev.VERBOSE, "tactic timing detail")
            if BuilderFlag.SPARSE_WEIGHTS in config.flags:
                for line in SAMPLE_LOG.splitlines()[1:3]:
                    self.logger.log(sev.INFO, line.split("[I] ", 1)[1])
            config.cache = Cache(config.cache.data + b"+timings")
            return b"PLAN"

    class OnnxParser:
        num_errors = 0

        def __init__(self, network, logger):
            pass

        def parse_from_file(self, path):
            calls["parsed"] = path
            return True

    for obj in (
        ILogger,
        NetworkDefinitionCreationFlag,
        BuilderFlag,
        MemoryPoolType,
        ProfilingVerbosity,
        Builder,
    ):
        setattr(trt, obj.__name__, obj)
    trt.OnnxParser = OnnxParser
    return trt


def test_build_engine_mocked_tensorrt(tmp_path, monkeypatch):
    calls: dict = {}
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt(calls))
    onnx_path = tiny_classifier(tmp_path / "m.onnx")
    cache = tmp_path / "cache" / "timing.cache"
    res = te.build_engine(
        onnx_path, tmp_path / "v" / "1" / "model.plan", max_batch_size=8, timing_cache_path=cache,
        log_path=tmp_path / "v" / "1" / "builder.log",
    )  # fmt: skip
    assert calls["network_flags"] == 1 << 1  # STRONGLY_TYPED, nothing else
    assert calls["flags"] == set()  # dense: no builder flag at all (never FP16/INT8)
    assert calls["profile"] == ("input", (1, 3, 224, 224), (8, 3, 224, 224), (8, 3, 224, 224))
    assert calls["profiles"] == 1 and calls["cache_loaded"] == b""
    assert res.plan_path.read_bytes() == b"PLAN" and res.tensorrt_version == "11.0.0"
    assert cache.read_bytes() == b"+timings" and res.sparse_layers_chosen == 0
    assert "tactic timing detail" not in res.log_path.read_text()  # INFO by default

    res = te.build_engine(
        onnx_path, tmp_path / "s" / "1" / "model.plan", max_batch_size=8, sparse=True, timing_cache_path=cache,
        log_path=tmp_path / "s" / "1" / "builder.log", verbose_log=True,
    )  # fmt: skip
    assert calls["cache_loaded"] == b"+timings"  # the first build's timings are reused
    assert cache.read_bytes() == b"+timings+timings"
    assert calls["flags"] == {7}  # SPARSE_WEIGHTS
    assert res.sparse_layers_chosen == 2 and res.sparse_layers_eligible == 3
    log = res.log_path.read_text()
    assert "picked sparse implementation" in log and "tactic timing detail" in log


# --- the whole conversion with build/profile replaced ---------------------------------------------------------
PRECISIONS = {"fp32": 0.0, "fp16": 0.1, "int8": 0.8, "sparse24": 1.5}


def _cpu_repo(root: Path) -> Path:
    repo = root / "cpu"
    opts = r.ServingOptions(max_batch_size=8, max_queue_delay_microseconds=1500)
    onnx_path = tiny_classifier(root / "tiny.onnx")
    for p in PRECISIONS:
        r.write_variant(repo, f"mobilenet_v2_{p}", Path(onnx_path), opts)
    r.write_pipeline(repo, [f"class {i}" for i in range(1000)], opts)
    m = make_manifest({f"mobilenet_v2_{p}": (p, d, {1: 5.0, 8: 30.0}) for p, d in PRECISIONS.items()})
    m.write(repo / "manifest.json")
    return repo


class _FakeEngines:
    """Stands in for tensorrt_engine.build_engine / profile_engine; ``gpu_ms[precision]`` = p50 at batch 1."""

    def __init__(self, gpu_ms: dict[str, float], sparse_picked: bool = True, fail: bool = False):
        self.gpu_ms, self.sparse_picked, self.fail = gpu_ms, sparse_picked, fail
        self.builds: list[tuple[str, bool, Path]] = []

    def build_engine(
        self, onnx_path, plan_path, *, max_batch_size, sparse, timing_cache_path, log_path, **kw
    ):
        if self.fail:
            raise RuntimeError("TensorRT could not build: simulated failure")
        plan_path, log_path = Path(plan_path), Path(log_path)
        self.builds.append((plan_path.parent.parent.name, sparse, Path(timing_cache_path)))
        plan_path.parent.mkdir(parents=True, exist_ok=True)
        plan_path.write_bytes(b"engine " + plan_path.parent.parent.name.encode())
        log_path.write_text(SAMPLE_LOG if sparse and self.sparse_picked else "[I] built\n")
        text = log_path.read_text()
        return te.EngineBuildResult(
            plan_path=plan_path, log_path=log_path, tensorrt_version=FAKE_ID[2], build_seconds=1.5,
            size_bytes=plan_path.stat().st_size, sparse_layers_chosen=te.count_sparse_layers(text),
            sparse_layers_eligible=te.count_sparse_eligible_layers(text),
        )  # fmt: skip

    def profile_engine(self, plan_path, batch_sizes, repeats=50):
        precision = Path(plan_path).parent.parent.name.removeprefix("mobilenet_v2_")
        return {b: self.gpu_ms[precision] * (1 + 0.5 * (b - 1)) for b in batch_sizes}


def _patch(monkeypatch, fake: _FakeEngines) -> None:
    monkeypatch.setattr(te, "build_engine", fake.build_engine)
    monkeypatch.setattr(te, "profile_engine", fake.profile_engine)
    monkeypatch.setattr(te, "gpu_identity", lambda device=0: FAKE_ID)


def test_convert_repository_mocked_tensorrt(tmp_path, monkeypatch):
    cpu = _cpu_repo(tmp_path)
    fake = _FakeEngines({"fp32": 1.0, "fp16": 0.6, "int8": 0.4, "sparse24": 0.5})
    _patch(monkeypatch, fake)
    cache = tmp_path / "timing.cache"
    out = tmp_path / "gpu"
    m = g.convert_to_gpu_repository(cpu, out, cuda_graphs=True, timing_cache=cache, latency_repeats=3)

    assert Manifest.read(out / "manifest.json") == m
    assert m.target == "gpu" and m.reference_variant == "mobilenet_v2_fp32"
    assert [v.precision for v in m.variants] == list(PRECISIONS)  # sparse24 paid: kept
    assert [(n, s) for n, s, _ in fake.builds] == [(f"mobilenet_v2_{p}", p == "sparse24") for p in PRECISIONS]
    assert {c for _, _, c in fake.builds} == {cache}  # one timing cache for every variant
    for v in m.variants:
        assert v.runtime == "tensorrt" and v.file == f"{v.name}/1/model.plan" and (out / v.file).is_file()
        assert v.size_bytes == (out / v.file).stat().st_size
        e = v.engine
        assert (e.compute_capability, e.tensorrt_version, e.gpu_name) == ("8.9", "10.5.0", "NVIDIA Fake GPU")
        assert (out / e.builder_log_file).is_file() and e.build_seconds == 1.5
        assert e.sparse_layers_chosen == (2 if v.precision == "sparse24" else None)
        assert sorted(v.latency.p50_ms_by_batch) == [1, 8] and v.latency.runtime == "tensorrt"
        assert v.accuracy is not None  # carried over from the ONNX graph's measurement
        cfg = r.parse((out / v.name / "config.pbtxt").read_text())
        assert cfg.name == v.name and cfg.platform == "tensorrt_plan" and cfg.max_batch_size == 8
        assert dict(cfg.cc_model_filenames) == {"8.9": "model.plan"} and cfg.optimization.cuda.graphs
        assert cfg.dynamic_batching.max_queue_delay_microseconds == 1500  # taken over from the CPU config
        assert cfg.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
        assert (
            not (out / v.name / "1" / "model.onnx").exists()
            and not (out / v.name / "1" / "model.py").exists()
        )
    assert m.variant("int8").latency.ratio_to_fp32_by_batch[1] == pytest.approx(0.4)
    assert any("sparse24 kept" in n for n in m.variant("sparse24").build_notes)
    for d in ("preprocess", "scheduler", "classifier"):  # the pipeline, unchanged
        for f in (cpu / d).rglob("*"):
            if f.is_file():
                assert (out / f.relative_to(cpu)).read_bytes() == f.read_bytes()
    g.check_engine_compatibility(m)  # the (fake) identity of this machine
    # the scheduler accepts the GPU manifest and uses the GPU latencies: int8 is fastest within budget 1.0
    assert (
        Policy(m, LiveState()).rank(RequestOptions(accuracy_budget_points=1.0))[0].variant
        == "mobilenet_v2_int8"
    )


def test_convert_drops_sparse24_that_does_not_pay_mocked_tensorrt(tmp_path, monkeypatch):
    cpu = _cpu_repo(tmp_path)
    _patch(monkeypatch, _FakeEngines({"fp32": 1.0, "fp16": 0.6, "int8": 0.4, "sparse24": 0.7}))
    m = g.convert_to_gpu_repository(cpu, tmp_path / "gpu", timing_cache=tmp_path / "c")
    assert "sparse24" not in [v.precision for v in m.variants]
    assert not (tmp_path / "gpu" / "mobilenet_v2_sparse24").exists()
    notes = m.variant("fp16").build_notes
    assert any(
        n.startswith("mobilenet_v2_sparse24: sparse24 dropped: sparse kernels on 2 layers but not faster")
        for n in notes
    )
    cfg = r.parse((tmp_path / "gpu" / "mobilenet_v2_fp16" / "config.pbtxt").read_text())
    assert not cfg.HasField("optimization")  # no --cuda-graphs

    # faster, but the builder chose no sparse kernel: dropped too
    _patch(
        monkeypatch,
        _FakeEngines({"fp32": 1.0, "fp16": 0.6, "int8": 0.4, "sparse24": 0.5}, sparse_picked=False),
    )
    m = g.convert_to_gpu_repository(cpu, tmp_path / "gpu", timing_cache=tmp_path / "c")
    assert "sparse24" not in [v.precision for v in m.variants]
    assert any("no sparse kernel" in n for n in m.variant("fp16").build_notes)


def test_convert_failure_keeps_previous_repository_mocked_tensorrt(tmp_path, monkeypatch):
    cpu = _cpu_repo(tmp_path)
    _patch(monkeypatch, _FakeEngines({"fp32": 1.0, "fp16": 0.6, "int8": 0.4, "sparse24": 0.5}))
    first = g.convert_to_gpu_repository(cpu, tmp_path / "gpu", timing_cache=tmp_path / "c")
    _patch(monkeypatch, _FakeEngines({}, fail=True))
    with pytest.raises(RuntimeError, match="simulated"):
        g.convert_to_gpu_repository(cpu, tmp_path / "gpu", timing_cache=tmp_path / "c")
    assert Manifest.read(tmp_path / "gpu" / "manifest.json") == first
    assert (
        sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".gpu")) == []
    )  # no temporaries left


def test_convert_rejects_bad_input_before_any_work(tmp_path, monkeypatch):
    def no_work(*a, **k):
        raise AssertionError("must fail before touching the GPU")

    monkeypatch.setattr(te, "build_engine", no_work)
    with pytest.raises(ValueError, match="no manifest.json"):
        g.convert_to_gpu_repository(tmp_path / "nothing", tmp_path / "gpu", identity=no_work)
    cpu = _cpu_repo(tmp_path)
    with pytest.raises(ValueError, match="must differ"):
        g.convert_to_gpu_repository(cpu, cpu, identity=no_work)
    with pytest.raises(ValueError, match="latency_repeats"):
        g.convert_to_gpu_repository(cpu, tmp_path / "gpu", latency_repeats=0, identity=no_work)
    (cpu / "mobilenet_v2_int8" / "1" / "model.onnx").unlink()
    with pytest.raises(ValueError, match="mobilenet_v2_int8: expected its ONNX graph"):
        g.convert_to_gpu_repository(cpu, tmp_path / "gpu", identity=no_work)
    gpu_manifest = _gpu_manifest()
    gpu_manifest.write(cpu / "manifest.json")
    with pytest.raises(ValueError, match="'gpu' repository"):
        g.convert_to_gpu_repository(cpu, tmp_path / "gpu", identity=no_work)
    assert not (tmp_path / "gpu").exists()


def test_engines_command_mocked_tensorrt(tmp_path, monkeypatch):
    from tcsched.cli import app

    cpu = _cpu_repo(tmp_path)
    fake = _FakeEngines({"fp32": 1.0, "fp16": 0.6, "int8": 0.4, "sparse24": 0.5})
    _patch(monkeypatch, fake)
    out = tmp_path / "gpu"
    args = ["engines", "--cpu-repo", str(cpu), "--output", str(out), "--timing-cache", str(tmp_path / "c")]
    res = CliRunner().invoke(app, [*args, "--cuda-graphs", "--latency-repeats", "2"])
    assert res.exit_code == 0, res.output
    assert Manifest.read(out / "manifest.json").target == "gpu" and len(fake.builds) == 4
    res = CliRunner().invoke(app, [*args, "--if-missing"])  # engines for this GPU exist: nothing rebuilt
    assert res.exit_code == 0 and "nothing to build" in res.output and len(fake.builds) == 4
    monkeypatch.setattr(te, "gpu_identity", lambda device=0: ("Other", "9.0", "10.5.0"))
    res = CliRunner().invoke(app, [*args, "--if-missing"])  # other GPU: rebuilt
    assert res.exit_code == 0 and "rebuilding" in res.output and len(fake.builds) == 8
    res = CliRunner().invoke(app, ["engines", "--cpu-repo", str(tmp_path / "none"), "--output", str(out)])
    assert res.exit_code == 2 and "no manifest.json" in res.output
