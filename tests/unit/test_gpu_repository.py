"""The GPU path on a CPU-only machine: configs, compatibility checks, keep-if-pays and the conversion itself.

No test here needs TensorRT or a GPU. Tests named ``*mocked_tensorrt*`` replace TensorRT: either the functions of
``tensorrt_engine`` (build_engine / profile_engine) or the ``tensorrt`` module itself (a FAKE of releases 10.5.0,
10.13.3 and 11.1.0 recording how the builder is driven, tests/unit/fake_gpu.py). What they cannot show (real
engines, real kernels, real latency, Triton's TensorRT backend) is in tests/gpu.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
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
from tests.unit.fake_gpu import FAKE_ID, RELEASES, FakeEngines, fake_tensorrt, inspector_json, patch_engines


# --- configs ---------------------------------------------------------------------------------------------------
def test_tensorrt_variant_config_is_valid_model_config_proto():
    cfg = g.tensorrt_variant_config("mobilenet_v2_int8", 8, True, {"9.0": "model.plan", "8.9": "model.plan"})
    text = r.render(cfg)
    parsed = text_format.Parse(text, mc.ModelConfig())  # raises ParseError if not valid model_config.proto
    assert parsed == cfg
    assert parsed.platform == "tensorrt_plan" and parsed.backend == ""
    assert parsed.max_batch_size == 8 and parsed.default_model_filename == "model.plan"
    assert dict(parsed.cc_model_filenames) == {"9.0": "model.plan", "8.9": "model.plan"}
    assert parsed.dynamic_batching.max_queue_delay_microseconds == 2000
    assert [(g_.kind, g_.count) for g_ in parsed.instance_group] == [(mc.ModelInstanceGroup.KIND_GPU, 1)]
    (inp,), (out,) = parsed.input, parsed.output
    assert (inp.name, inp.data_type, list(inp.dims)) == ("input", mc.TYPE_FP32, [3, 224, 224])
    assert (out.name, out.data_type, list(out.dims)) == ("logits", mc.TYPE_FP32, [1000])


def test_cuda_graphs_for_every_batch_size_in_model_config_proto():
    """Without graph_spec tensorrt_backend r24.10 captures only {1, preferred, max}; with one spec per batch size
    every batch the dynamic batcher forms runs as a graph. Each spec passes the backend's ValidateGraphSpec rules
    (1 <= batch_size <= max_batch_size; every input named, its dims >= 0, without the batch dimension)."""
    cfg = text_format.Parse(r.render(g.tensorrt_variant_config("v", 8, True, None)), mc.ModelConfig())
    cuda = cfg.optimization.cuda
    assert cuda.graphs is True
    assert sorted(s.batch_size for s in cuda.graph_spec) == list(range(1, 9))
    for spec in cuda.graph_spec:
        assert 1 <= spec.batch_size <= cfg.max_batch_size
        assert {k: list(v.dim) for k, v in spec.input.items()} == {"input": [3, 224, 224]}
        assert not spec.HasField("graph_lower_bound")  # exact batch sizes only
    cfg4 = g.tensorrt_variant_config("v", 4, True, None, input_name="x", chw=(3, 32, 32))
    assert [(s.batch_size, list(s.input["x"].dim)) for s in cfg4.optimization.cuda.graph_spec] == [
        (b, [3, 32, 32]) for b in (1, 2, 3, 4)
    ]


def test_warmup_in_model_config_proto():
    for graphs in (True, False):
        cfg = text_format.Parse(r.render(g.tensorrt_variant_config("v", 8, graphs, None)), mc.ModelConfig())
        assert [w.batch_size for w in cfg.model_warmup] == [1, 8]
        for w in cfg.model_warmup:
            assert w.count == 1 and w.name and set(w.inputs) == {"input"}
            inp = w.inputs["input"]
            assert inp.data_type == mc.TYPE_FP32 and list(inp.dims) == [3, 224, 224]
            assert inp.WhichOneof("input_data_type") == "zero_data"
    cfg = g.tensorrt_variant_config("v", 1, False, None, input_dtype=mc.TYPE_FP16)
    assert [(w.batch_size, w.inputs["input"].data_type) for w in cfg.model_warmup] == [(1, mc.TYPE_FP16)]


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


# --- the engine inspector ----------------------------------------------------------------------------------------
def test_int8_and_sparse_layers_from_the_engine_inspector():
    layers = te.engine_layers(inspector_json(int8=True, sparse=True))
    assert te.int8_layers(layers) == ["stem + Clip", "proj + Add"]  # the Q/DQ Reformat does not count
    assert te.sparse_layers(layers) == ["proj + Add"]
    dense = te.engine_layers(inspector_json(int8=False, sparse=False))
    assert te.int8_layers(dense) == [] and te.sparse_layers(dense) == []
    # no sparsity field and no tactic anywhere: the inspector does not say, which is not "no sparse kernel"
    assert te.sparse_layers(te.engine_layers(inspector_json(int8=True, sparse=None))) is None
    uint8 = [
        {
            "Name": "u",
            "LayerType": "CaskConvolution",
            "Inputs": [{"Format/Datatype": "Channel major UInt8 format"}],
        }
    ]
    assert te.int8_layers(uint8) == []
    with pytest.raises(ValueError, match="DETAILED"):
        te.engine_layers(json.dumps({"Layers": ["conv1", "conv2"]}))  # LAYER_NAMES_ONLY
    with pytest.raises(ValueError, match="not JSON"):
        te.engine_layers("Layers: conv1")
    with pytest.raises(ValueError, match="no 'Layers'"):
        te.engine_layers("{}")


# --- Q/DQ that TensorRT can parse --------------------------------------------------------------------------------
def _qdq_graph(path: Path, zp_type: int, zp_value: int) -> Path:
    import onnx
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


# --- keep-if-pays ------------------------------------------------------------------------------------------------
def test_sparse_keep_decision():
    fp16 = {1: 1.0, 8: 4.0}
    keep, why = g.sparse_keep_decision(3, {1: 0.9, 8: 3.0}, fp16)
    assert keep and "kept" in why and "sparse kernels on 3 layers" in why
    keep, why = g.sparse_keep_decision(3, {1: 1.1, 8: 3.0}, fp16)  # slower at batch 1
    assert not keep and "not faster" in why
    keep, why = g.sparse_keep_decision(0, {1: 0.5, 8: 2.0}, fp16)  # faster, but no sparse kernel: noise
    assert not keep and "no layer with sparse weights" in why
    keep, why = g.sparse_keep_decision(
        None, {1: 0.5, 8: 2.0}, fp16
    )  # inspector silent: latency decides, said so
    assert keep and "unknown" in why
    keep, why = g.sparse_keep_decision(None, {1: 1.5, 8: 2.0}, fp16)
    assert not keep and "unknown" in why
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


# --- import without tensorrt, and the up-front check of the GPU stack ------------------------------------------
def test_modules_import_without_tensorrt_or_torch():
    code = (
        "import sys\n"
        "for m in ('tensorrt', 'pynvml', 'torch', 'cuda'): sys.modules[m] = None  # importing them raises\n"
        "import tcsched.build_tools.tensorrt_engine as te, tcsched.build_tools.gpu_repository, tcsched.cli\n"
        "try:\n    te.gpu_identity()\nexcept ImportError:\n    print('ok')\n"
        "print(te.missing_gpu_dependencies())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    first, missing = out.stdout.strip().splitlines()
    assert first == "ok" and "tensorrt:" in missing and "cuda-python:" in missing


def test_missing_gpu_dependencies_named_mocked_tensorrt(monkeypatch):
    from tests.unit.fake_gpu import FakeCudaRuntime

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.setattr(te, "cuda_runtime", lambda: FakeCudaRuntime(devices=0))
    (only,) = [m for m in te.missing_gpu_dependencies() if not m.startswith("tensorrt")]
    assert "device 0 requested, 0 visible" in only
    with pytest.raises(RuntimeError, match=r"cannot be built here: tensorrt: .*; CUDA GPU: device 0"):
        te.check_gpu_dependencies()
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt("10.5.0", {}))
    monkeypatch.setattr(te, "cuda_runtime", lambda: FakeCudaRuntime(devices=1))
    assert te.missing_gpu_dependencies() == []
    te.check_gpu_dependencies()


def test_gpu_commands_refuse_before_any_work_without_the_gpu_stack(tmp_path, monkeypatch):
    """On this machine (no TensorRT, no CUDA driver) both commands stop at once and name what is missing."""
    from tcsched import cli

    if not te.missing_gpu_dependencies():
        pytest.skip("this machine has the whole GPU stack")

    def no_work(*a, **k):
        raise AssertionError("must fail before any build work")

    monkeypatch.setattr("tcsched.build_tools.build.build", no_work)
    monkeypatch.setattr(g, "convert_to_gpu_repository", no_work)
    res = CliRunner().invoke(cli.app, ["build", "--target", "gpu", "--output", str(tmp_path / "repo")])
    assert res.exit_code == 2 and "tensorrt" in res.output, res.output
    res = CliRunner().invoke(
        cli.app, ["engines", "--cpu-repo", str(tmp_path), "--output", str(tmp_path / "g")]
    )
    assert res.exit_code == 1 and "cannot be built here" in res.output and "tensorrt" in res.output


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


# --- build_engine against FAKE tensorrt modules of three releases ------------------------------------------------
def test_fake_tensorrt_has_each_releases_flag_values():
    """NvInfer.h: kSTRONGLY_TYPED is 1 in 10.5 and 10.13, 0 (deprecated, ignored) in 11.1, where 1 is
    kPREFER_JIT_PYTHON_PLUGINS; kTF32 = 6 and kSPARSE_WEIGHTS = 7 in all three; kFP16/kINT8 gone in 11.1."""
    for version in ("10.5.0", "10.13.3"):
        assert RELEASES[version][0]["STRONGLY_TYPED"] == 1
        assert (RELEASES[version][1]["FP16"], RELEASES[version][1]["INT8"]) == (0, 1)
    net11, builder11 = RELEASES["11.1.0"]
    assert net11["STRONGLY_TYPED"] == 0 and net11["PREFER_JIT_PYTHON_PLUGINS"] == 1
    assert "FP16" not in builder11 and "INT8" not in builder11
    assert all(RELEASES[v][1]["TF32"] == 6 and RELEASES[v][1]["SPARSE_WEIGHTS"] == 7 for v in RELEASES)


@pytest.mark.parametrize("version", sorted(RELEASES))
def test_build_engine_mocked_tensorrt(tmp_path, monkeypatch, version):
    calls: dict = {}
    fake = fake_tensorrt(version, calls)
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    onnx_path = tiny_classifier(tmp_path / "m.onnx")
    cache = tmp_path / "cache" / "timing.cache"
    res = te.build_engine(
        onnx_path, tmp_path / "v" / "1" / "model.plan", max_batch_size=8, timing_cache_path=cache,
        log_path=tmp_path / "v" / "1" / "builder.log",
    )  # fmt: skip
    strongly_typed = RELEASES[version][0]["STRONGLY_TYPED"]
    assert calls["network_flags"] == 1 << strongly_typed  # by name: 2 on 10.x, 1 (the ignored bit 0) on 11.1
    assert calls["flags"] == set()  # TF32 cleared, nothing set (never FP16/INT8)
    assert calls["verbosity"] == fake.ProfilingVerbosity.DETAILED
    assert calls["profile"] == ("input", (1, 3, 224, 224), (8, 3, 224, 224), (8, 3, 224, 224))
    assert calls["profiles"] == 1 and calls["cache_loaded"] == b""
    assert res.tensorrt_version == version and json.loads(res.plan_path.read_bytes())["sparse"] is False
    assert cache.read_bytes() == b"+timings" and res.sparse_layers_chosen == 0 and res.int8_layers == 2
    assert json.loads(res.layers_path.read_text())["Layers"][1]["Name"] == "stem + Clip"
    assert res.layers_path == res.plan_path.with_name("engine_layers.json")
    assert "tactic timing detail" not in res.log_path.read_text()  # INFO by default

    res = te.build_engine(
        onnx_path, tmp_path / "s" / "1" / "model.plan", max_batch_size=8, sparse=True, timing_cache_path=cache,
        log_path=tmp_path / "s" / "1" / "builder.log", verbose_log=True,
    )  # fmt: skip
    assert calls["cache_loaded"] == b"+timings"  # the first build's timings are reused
    assert cache.read_bytes() == b"+timings+timings"
    assert calls["flags"] == {fake.BuilderFlag.SPARSE_WEIGHTS}
    assert res.sparse_layers_chosen == 1  # read from the inspector, not from the log
    assert "tactic timing detail" in res.log_path.read_text()


# --- the whole conversion with build/profile replaced ---------------------------------------------------------
PRECISIONS = {"fp32": 0.0, "fp16": 0.1, "int8": 0.8, "sparse24": 1.5}


def _cpu_repo(root: Path) -> Path:
    repo = root / "cpu"
    opts = r.ServingOptions(max_batch_size=8, max_queue_delay_microseconds=1500, pixels="float32")
    onnx_path = tiny_classifier(root / "tiny.onnx")
    for p in PRECISIONS:
        r.write_variant(repo, f"mobilenet_v2_{p}", Path(onnx_path), opts)
    r.write_pipeline(repo, [f"class {i}" for i in range(1000)], opts)
    m = make_manifest({f"mobilenet_v2_{p}": (p, d, {1: 5.0, 8: 30.0}) for p, d in PRECISIONS.items()})
    m.write(repo / "manifest.json")
    return repo


def test_convert_repository_mocked_tensorrt(tmp_path, monkeypatch):
    cpu = _cpu_repo(tmp_path)
    fake = FakeEngines({"fp32": 1.0, "fp16": 0.6, "int8": 0.4, "sparse24": 0.5})
    patch_engines(monkeypatch, fake)
    cache = tmp_path / "timing.cache"
    out = tmp_path / "gpu"
    src = Manifest.read(cpu / "manifest.json")
    m = g.convert_to_gpu_repository(cpu, out, cuda_graphs=True, timing_cache=cache, latency_repeats=3)

    assert Manifest.read(out / "manifest.json") == m
    assert m.target == "gpu" and m.reference_variant == "mobilenet_v2_fp32" and m.cascades == []
    assert [v.precision for v in m.variants] == list(PRECISIONS)  # sparse24 paid: kept
    assert [(n, s) for n, s, _, _ in fake.builds] == [
        (f"mobilenet_v2_{p}", p == "sparse24") for p in PRECISIONS
    ]
    assert {c for _, _, c, _ in fake.builds} == {cache}  # one timing cache for every variant
    for v in m.variants:
        assert v.runtime == "tensorrt" and v.file == f"{v.name}/1/model.plan" and (out / v.file).is_file()
        assert v.size_bytes == (out / v.file).stat().st_size
        e = v.engine
        assert (e.compute_capability, e.tensorrt_version, e.gpu_name) == ("8.9", "10.5.0", "NVIDIA Fake GPU")
        assert (out / e.builder_log_file).is_file() and e.build_seconds == 1.5
        assert e.sparse_layers_chosen == (1 if v.precision == "sparse24" else None)
        assert e.int8_layers == (2 if v.precision == "int8" else 0)
        assert te.engine_layers((out / e.layers_file).read_text())
        # the graph compiled sits beside the engine (a float graph: the CPU variant's own)
        assert (out / e.onnx_file).read_bytes() == (cpu / src.variant(v.name).file).read_bytes()
        assert v.accuracy == src.variant(v.name).accuracy  # no Q/DQ: the graph the CPU figures are of
        assert sorted(v.latency.p50_ms_by_batch) == [1, 8] and v.latency.runtime == "tensorrt"
        assert (
            v.latency.p99_ms_by_batch[1] > v.latency.p50_ms_by_batch[1]
            and "copies included" in v.latency.device
        )
        assert any("the engine alone p50 ms b1:" in n for n in v.build_notes)
        cfg = r.parse((out / v.name / "config.pbtxt").read_text())
        assert cfg.name == v.name and cfg.platform == "tensorrt_plan" and cfg.max_batch_size == 8
        assert dict(cfg.cc_model_filenames) == {"8.9": "model.plan"} and cfg.optimization.cuda.graphs
        assert sorted(s.batch_size for s in cfg.optimization.cuda.graph_spec) == list(range(1, 9))
        assert [w.batch_size for w in cfg.model_warmup] == [1, 8]
        assert cfg.dynamic_batching.max_queue_delay_microseconds == 1500  # taken over from the CPU config
        assert cfg.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
        labels = cpu / v.name / r.LABELS_FILE
        if labels.is_file():  # the classification extension's labels, as beside the CPU variant
            assert cfg.output[0].label_filename == r.LABELS_FILE
            assert (out / v.name / r.LABELS_FILE).read_bytes() == labels.read_bytes()
        assert (
            not (out / v.name / "1" / "model.onnx").exists()
            and not (out / v.name / "1" / "model.py").exists()
        )
    assert m.variant("int8").latency.ratio_to_fp32_by_batch[1] == pytest.approx(0.4)
    assert any("sparse24 kept: sparse kernels on 1 layers" in n for n in m.variant("sparse24").build_notes)
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


def test_convert_leaves_out_variants_of_other_cpu_runtimes_mocked_tensorrt(tmp_path, monkeypatch):
    import typing

    from tcsched import manifest as mf

    if "openvino" not in typing.get_args(mf.Runtime):
        pytest.skip("this manifest schema has no other CPU runtime")
    cpu = _cpu_repo(tmp_path)
    m = Manifest.read(cpu / "manifest.json")
    m.variant("int8").runtime = "openvino"
    m.write(cpu / "manifest.json")
    fake = FakeEngines({"fp32": 1.0, "fp16": 0.6, "int8": 0.4, "sparse24": 0.5})
    patch_engines(monkeypatch, fake)
    gpu = g.convert_to_gpu_repository(cpu, tmp_path / "gpu", timing_cache=tmp_path / "c")
    assert "mobilenet_v2_int8" not in [n for n, *_ in fake.builds] and "int8" not in [
        v.precision for v in gpu.variants
    ]
    assert not (tmp_path / "gpu" / "mobilenet_v2_int8").exists()
    assert any(
        "mobilenet_v2_int8: runtime openvino (a CPU runtime)" in n for n in gpu.variant("fp32").build_notes
    )


def test_convert_refuses_a_qdq_variant_without_its_measured_tensorrt_graph(tmp_path, monkeypatch):
    """A Q/DQ graph's CPU figures are the uint8 graph's: without the build's measured TensorRT form there is no
    figure for what TensorRT compiles, so the conversion refuses before any GPU work."""
    from tcsched.build_tools.quantize import quantize_int8
    from tests.unit.residual_graph import residual_classifier

    cpu = _cpu_repo(tmp_path)
    fp32 = residual_classifier(tmp_path / "res.onnx")
    calib = np.random.default_rng(0).normal(size=(8, 3, 224, 224)).astype(np.float32)
    quantize_int8(fp32, cpu / "mobilenet_v2_int8" / "1" / "model.onnx", calib, method="minmax")
    fake = FakeEngines({"fp32": 1.0, "fp16": 0.6, "int8": 0.4, "sparse24": 0.5})
    patch_engines(monkeypatch, fake)
    with pytest.raises(ValueError, match="mobilenet_v2_int8: a Q/DQ graph without a measured TensorRT form"):
        g.convert_to_gpu_repository(cpu, tmp_path / "gpu", timing_cache=tmp_path / "c")
    assert fake.builds == [] and not (tmp_path / "gpu").exists()


def test_convert_drops_sparse24_that_does_not_pay_mocked_tensorrt(tmp_path, monkeypatch):
    cpu = _cpu_repo(tmp_path)
    patch_engines(monkeypatch, FakeEngines({"fp32": 1.0, "fp16": 0.6, "int8": 0.4, "sparse24": 0.7}))
    m = g.convert_to_gpu_repository(cpu, tmp_path / "gpu", timing_cache=tmp_path / "c")
    assert "sparse24" not in [v.precision for v in m.variants]
    assert not (tmp_path / "gpu" / "mobilenet_v2_sparse24").exists()
    notes = m.variant("fp16").build_notes
    assert any(
        n.startswith("mobilenet_v2_sparse24: sparse24 dropped: sparse kernels on 1 layers but not faster")
        for n in notes
    )
    cfg = r.parse((tmp_path / "gpu" / "mobilenet_v2_fp16" / "config.pbtxt").read_text())
    assert not cfg.HasField("optimization") and len(cfg.model_warmup) == 2  # no --cuda-graphs; warmup always

    # faster, but the inspector shows no sparse kernel: dropped too
    patch_engines(
        monkeypatch,
        FakeEngines({"fp32": 1.0, "fp16": 0.6, "int8": 0.4, "sparse24": 0.5}, sparse_picked=False),
    )
    m = g.convert_to_gpu_repository(cpu, tmp_path / "gpu", timing_cache=tmp_path / "c")
    assert "sparse24" not in [v.precision for v in m.variants]
    assert any("no layer with sparse weights" in n for n in m.variant("fp16").build_notes)

    # faster, inspector silent about sparsity: kept on latency, and the notes say the kernel choice is unknown
    patch_engines(
        monkeypatch,
        FakeEngines({"fp32": 1.0, "fp16": 0.6, "int8": 0.4, "sparse24": 0.5}, sparse_picked=None),
    )
    m = g.convert_to_gpu_repository(cpu, tmp_path / "gpu", timing_cache=tmp_path / "c")
    assert any("sparse kernels unknown" in n for n in m.variant("sparse24").build_notes)
    assert m.variant("sparse24").engine.sparse_layers_chosen is None


def test_convert_failure_keeps_previous_repository_mocked_tensorrt(tmp_path, monkeypatch):
    cpu = _cpu_repo(tmp_path)
    patch_engines(monkeypatch, FakeEngines({"fp32": 1.0, "fp16": 0.6, "int8": 0.4, "sparse24": 0.5}))
    first = g.convert_to_gpu_repository(cpu, tmp_path / "gpu", timing_cache=tmp_path / "c")
    patch_engines(monkeypatch, FakeEngines({}, fail=True))
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
    fake = FakeEngines({"fp32": 1.0, "fp16": 0.6, "int8": 0.4, "sparse24": 0.5})
    patch_engines(monkeypatch, fake)
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
