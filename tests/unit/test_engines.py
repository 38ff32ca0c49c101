"""The engine interface on tiny graphs: ONNX Runtime and OpenVINO give the same logits; the bf16 gate; the
OpenVINO pairs of a build; the package without openvino."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from tcsched.build_tools.quantize import quantize_int8
from tcsched.build_tools.recipes.base import BuiltVariant
from tcsched.build_tools.recipes.pairs import openvino_pairs
from tcsched.engines import InvalidInputError, load_engine
from tcsched.engines.capabilities import (
    BF16,
    CpuCapabilities,
    cpu_capabilities,
    missing_capabilities,
    parse_cpuinfo,
)
from tcsched.scheduler.policy import Policy, RequestOptions
from tests.helpers import make_manifest, tiny_classifier

pytest.importorskip("openvino")

NATIVE_BF16 = cpu_capabilities().native_bf16


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    d = tmp_path_factory.mktemp("engines")
    fp32 = Path(tiny_classifier(d / "fp32.onnx"))
    rng = np.random.default_rng(0)
    calib = rng.normal(0, 1, (16, 3, 32, 32)).astype(np.float32)
    int8 = quantize_int8(fp32, d / "int8.onnx", calib, method="minmax")
    x = rng.normal(0, 1, (5, 3, 32, 32)).astype(np.float32)
    return fp32, Path(int8), x


def test_same_logits_fp32(graphs):
    fp32, _, x = graphs
    ort = load_engine("onnxruntime", fp32, threads=1)
    ov = load_engine("openvino", fp32, threads=1)
    a, b = ort(x), ov(x)
    assert a.shape == b.shape == (5, 10) and b.dtype == np.float32
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)
    # batch size changes between calls (dynamic batch)
    np.testing.assert_allclose(ov(x[:1]), a[:1], rtol=1e-4, atol=1e-4)
    assert ov.runtime_property("INFERENCE_PRECISION_HINT") in ("f32", "float32")


def test_openvino_compiles_one_static_model_per_batch_size(graphs, monkeypatch):
    from tcsched.engines import openvino as ov_engine

    fp32, int8, x = graphs
    for path, precision, tol in ((fp32, "fp32", 1e-4), (int8, "int8", 1e-4)):
        ov = load_engine("openvino", path, threads=1, precision=precision)
        ov.prepare([1, 3], dims=[3, 32, 32])
        assert sorted(ov.static_requests) == [1, 3]
        assert ov.compiled.input(0).get_partial_shape()[0].is_dynamic  # the graph's own model stays dynamic
        ov.request.infer({0: x[:3]})
        dynamic = np.array(ov.request.get_output_tensor(0).data)
        np.testing.assert_allclose(ov(x[:3]), dynamic, rtol=tol, atol=tol)
        np.testing.assert_allclose(ov(x[:1]), dynamic[:1], rtol=tol, atol=tol)
    # above the limit: the dynamic-shape model, nothing compiled
    monkeypatch.setattr(ov_engine, "MAX_STATIC_BATCH", 2)
    ov = load_engine("openvino", fp32, threads=1)
    ref = load_engine("onnxruntime", fp32, threads=1)(x)
    np.testing.assert_allclose(ov(x), ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ov(x[:2]), ref[:2], rtol=1e-4, atol=1e-4)
    assert sorted(ov.static_requests) == [2]
    # ONNX Runtime's prepare is one run at the largest size
    load_engine("onnxruntime", fp32, threads=1).prepare(range(1, 5))


def test_same_logits_int8_qdq(graphs):
    _, int8, x = graphs
    a = load_engine("onnxruntime", int8, threads=1, precision="int8")(x)
    b = load_engine("openvino", int8, threads=1, precision="int8")(x)
    # both run the Q/DQ graph in int8; rounding of the requantised activations may differ by a step
    scale = float(np.abs(a).max())
    assert np.abs(a - b).max() <= 0.05 * scale
    assert (a.argmax(1) == b.argmax(1)).mean() >= 0.8


def test_describe(graphs):
    fp32, _, _ = graphs
    import onnxruntime
    import openvino

    d = load_engine("openvino", fp32, threads=1).describe()
    assert (d.runtime, d.precision, d.threads) == ("openvino", "fp32", 1)
    assert openvino.__version__.startswith(d.version)
    d = load_engine("onnxruntime", fp32, threads=2, precision="fp32").describe()
    assert (d.runtime, d.version, d.threads) == ("onnxruntime", onnxruntime.__version__, 2)


def test_input_checks_shared(graphs):
    fp32, _, x = graphs
    ov = load_engine("openvino", fp32, threads=1)
    with pytest.raises(InvalidInputError, match="float32"):
        ov(x.astype(np.float64))
    with pytest.raises(InvalidInputError, match=r"shape \[N, 3, 32, 32\]"):
        ov(x[:, :, :16])
    bad = x.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(InvalidInputError, match="1 NaN"):
        ov(bad)


def test_unknown_runtime(graphs):
    with pytest.raises(ValueError, match="unknown CPU runtime 'tflite'.*onnxruntime, openvino"):
        load_engine("tflite", graphs[0])


@pytest.mark.skipif(not NATIVE_BF16, reason="this CPU has no native bf16")
def test_bf16_close_to_fp32(graphs):
    fp32, _, x = graphs
    a = load_engine("onnxruntime", fp32, threads=1)(x)
    e = load_engine("openvino", fp32, threads=1, precision="bf16")
    assert e.runtime_property("INFERENCE_PRECISION_HINT") in ("bf16", "bfloat16")
    b = e(x)
    assert np.abs(a - b).max() <= 0.03 * float(np.abs(a).max())  # bf16: 8-bit mantissa


def _stem_graph(path) -> str:
    """Input -> Conv+bias -> Relu -> [Conv -> Relu -> Conv, + residual from the Relu] -> Conv+bias -> Relu ->
    Conv -> GlobalAveragePool -> Flatten -> Gemm: the residual Add ends where a cut after 3 convolutions can be."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(1)
    c = 8
    w = {
        "w1": (c, 3, 3, 3), "b1": (c,), "w2": (c, 1, 3, 3), "w3": (c, c, 1, 1), "w4": (c, c, 1, 1), "b4": (c,),
        "w5": (c, 1, 3, 3), "wf": (10, c), "bf": (10,),
    }  # fmt: skip
    inits = [numpy_helper.from_array(rng.normal(0, 0.4, s).astype(np.float32), n) for n, s in w.items()]
    conv = helper.make_node
    nodes = [
        conv("Conv", ["input", "w1", "b1"], ["c1"], name="stem", pads=[1, 1, 1, 1], strides=[2, 2]),
        conv("Relu", ["c1"], ["r1"], name="r1"),
        conv("Conv", ["r1", "w2"], ["c2"], name="dw", pads=[1, 1, 1, 1], group=c),
        conv("Relu", ["c2"], ["r2"], name="r2"),
        conv("Conv", ["r2", "w3"], ["c3"], name="project"),
        conv("Add", ["c3", "r1"], ["res"], name="residual"),
        conv("Conv", ["res", "w4", "b4"], ["c4"], name="expand"),
        conv("Relu", ["c4"], ["r4"], name="r4"),
        conv("Conv", ["r4", "w5"], ["c5"], name="dw2", pads=[1, 1, 1, 1], group=c),
        conv("GlobalAveragePool", ["c5"], ["gap"], name="gap"),
        conv("Flatten", ["gap"], ["flat"], name="flatten"),
        conv("Gemm", ["flat", "wf", "bf"], ["logits"], name="classifier", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "stem",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return str(path)


def test_stem_cut_after_the_residual(tmp_path):
    import openvino as ov

    from tcsched.engines.openvino import split_at, stem_cut

    model = ov.Core().read_model(_stem_graph(tmp_path / "stem.onnx"))
    ops = list(model.get_ordered_ops())
    pos, out = stem_cut(model, 3)
    # not inside the residual block (its input is still needed by the Add), at the Add's output
    assert ops[pos].get_friendly_name() == "residual"
    # the first convolution's bias Add is fused into it: the cut after 1 convolution is after that Add
    assert ops[stem_cut(model, 1)[0]].get_type_name() == "Add"
    with pytest.raises(ValueError, match="no f32 stem of 9 convolutions: the graph has 5"):
        stem_cut(model, 9)
    # inside the residual block (after the depthwise convolution) every point is crossed by the branch
    with pytest.raises(ValueError, match="between convolution 2 and the next: a residual branch"):
        stem_cut(model, 2)
    stem, body = split_at(model, (pos, out))
    assert [list(p.get_partial_shape())[1:] for p in body.get_parameters()] == [[8, 16, 16]]
    stem, body = split_at(model, (pos, out), handover="bf16")
    assert stem.output(0).get_element_type().get_type_name() == "bf16"
    assert body.input(0).get_element_type().get_type_name() == "bf16"
    assert len(list(model.get_ordered_ops())) == len(ops)  # the model itself is left as it was


@pytest.mark.skipif(not NATIVE_BF16, reason="this CPU has no native bf16")
def test_bf16_mixed_runs_stem_in_f32(tmp_path):
    path = _stem_graph(tmp_path / "stem.onnx")
    x = np.random.default_rng(2).normal(0, 1, (5, 3, 32, 32)).astype(np.float32)
    ref = load_engine("onnxruntime", path, threads=1)(x)
    mixed = load_engine("openvino", path, threads=1, precision="bf16_mixed")
    assert len(mixed.stages) == 2 and mixed.runtime_property("INFERENCE_PRECISION_HINT") in (
        "bf16",
        "bfloat16",
    )
    stem = mixed.core.compile_model(mixed.stages[0][0], "CPU", mixed.stages[0][1])
    assert stem.get_property("INFERENCE_PRECISION_HINT").get_type_name() == "f32"
    a = mixed(x)
    assert np.abs(a - ref).max() <= 0.03 * float(np.abs(ref).max())
    np.testing.assert_array_equal(mixed(x[:2]), a[:2])  # static batch 2, same stages
    assert sorted(mixed.static_requests) == [2, 5]
    whole = load_engine("openvino", path, threads=1, precision="bf16")(x)
    # the f32 stem is closer to fp32 than whole-graph bf16
    assert np.abs(a - ref).mean() < np.abs(whole - ref).mean()


def test_bf16_refused_without_native(graphs, monkeypatch):
    from tcsched.engines import capabilities

    no_bf16 = CpuCapabilities(flags=frozenset({"avx2"}), openvino=frozenset({"FP32", "INT8"}))
    monkeypatch.setattr(capabilities, "cpu_capabilities", lambda: no_bf16)
    for precision in ("bf16", "bf16_mixed"):
        with pytest.raises(ValueError, match="bf16 needs a CPU that runs it natively.*avx2"):
            load_engine("openvino", graphs[0], precision=precision)


def test_bf16_gate_needs_both_sources():
    flags, model = parse_cpuinfo("processor\t: 0\nmodel name\t: Xeon X\nflags\t\t: fpu avx2 avx512_bf16\n")
    assert "avx512_bf16" in flags and model == "Xeon X"
    assert CpuCapabilities(frozenset({"avx512_bf16"}), frozenset({"BF16"})).native_bf16
    assert CpuCapabilities(frozenset({"amx_bf16"}), frozenset({"BF16", "FP32"})).native_bf16
    assert not CpuCapabilities(frozenset({"avx512_bf16"}), frozenset({"FP32"})).native_bf16
    assert not CpuCapabilities(frozenset({"avx512f"}), frozenset({"BF16"})).native_bf16
    caps = CpuCapabilities(frozenset({"amx_bf16"}), frozenset({"BF16"}))
    assert BF16 in caps.to_list() and "openvino:BF16" in caps.to_list()
    assert missing_capabilities(["bf16"], ["avx2"]) == ["bf16"]
    assert missing_capabilities(["bf16"], caps.to_list()) == []


def test_int8_full_range_gate_is_vnni_on_x86():
    """8-bit int8 weights saturate u8s8 kernels on x86 without VNNI (capabilities.VNNI_FLAGS)."""
    from tcsched.engines.capabilities import INT8_FULL_RANGE

    def caps(flags, arch):
        return CpuCapabilities(frozenset(flags), frozenset(), arch=arch)

    assert caps({"avx2"}, "x86_64").int8_saturates
    assert caps({"avx2", "avx512f"}, "x86_64").int8_saturates  # AVX-512 without VNNI still saturates
    for flag in ("avx512_vnni", "avx_vnni", "amx_int8"):
        assert not caps({"avx2", flag}, "x86_64").int8_saturates
    assert not caps(set(), "aarch64").int8_saturates and not caps(set(), "").int8_saturates
    assert INT8_FULL_RANGE not in caps({"avx2"}, "x86_64").to_list()
    assert INT8_FULL_RANGE in caps({"avx2", "avx512_vnni"}, "x86_64").to_list()
    # a repository whose int8 has 8-bit weights, served on a CPU without VNNI: the variant is missing a capability
    assert missing_capabilities([INT8_FULL_RANGE], caps({"avx2"}, "x86_64").to_list()) == [INT8_FULL_RANGE]


def _variants(path: Path) -> dict[str, BuiltVariant]:
    return {
        n: BuiltVariant(n, p, path, {"conv": "fp32" if n == "fp32" else "int8"}, [], True)
        for n, p in (("fp32", "fp32"), ("fp16", "fp16"), ("int8", "int8"))
    }


def test_openvino_pairs_follow_the_cpu(tmp_path):
    built = _variants(Path(_stem_graph(tmp_path / "g.onnx")))
    with_bf16 = CpuCapabilities(frozenset({"amx_bf16"}), frozenset({"BF16"}))
    pairs, notes = openvino_pairs(built, with_bf16, openvino_available=True)
    assert [(p.name, p.variant.precision, p.requires_cpu) for p in pairs] == [
        ("bf16_openvino", "bf16", ("bf16",)),
        ("bf16_mixed_openvino", "bf16_mixed", ("bf16",)),
        ("int8_openvino", "int8", ()),
    ]
    assert pairs[0].variant.layer_plan == {"conv": "bf16"} and notes == []
    assert pairs[1].variant.layer_plan == {"conv": "fp32"}  # the stem's convolution stays f32
    assert "first 3 convolutions" in pairs[1].variant.notes[0]
    # Triton's openvino backend runs one compiled model per model: no bf16_mixed for it
    pairs, notes = openvino_pairs(built, with_bf16, True, two_model_variants=False)
    assert [p.name for p in pairs] == ["bf16_openvino", "int8_openvino"]
    assert "one compiled model" in notes[0]
    without = CpuCapabilities(frozenset({"avx2"}), frozenset({"FP32"}))
    pairs, notes = openvino_pairs(built, without, openvino_available=True)
    assert [(p.name, p.variant.precision) for p in pairs] == [
        ("fp32_openvino", "fp32"),
        ("int8_openvino", "int8"),
    ]
    assert "no native bf16" in notes[0]
    pairs, notes = openvino_pairs(built, with_bf16, openvino_available=False)
    assert pairs == [] and "pip install 'openvino==" in notes[0]
    # a graph with no cut after 3 convolutions (tiny_classifier: 2) gets no bf16_mixed, and the note says why
    pairs, notes = openvino_pairs(_variants(Path(tiny_classifier(tmp_path / "t.onnx"))), with_bf16, True)
    assert [p.name for p in pairs] == ["bf16_openvino", "int8_openvino"]
    assert notes == ["bf16_mixed_openvino not built: no f32 stem of 3 convolutions: the graph has 2"]


SPECS = {
    "m_fp32": ("fp32", 0.0, {1: 5.0, 8: 32.0}),
    "m_int8": ("int8", 2.5, {1: 3.0, 8: 16.0}),
    "m_bf16_openvino": ("bf16", 0.0, {1: 4.0, 8: 17.0}),
    "m_int8_openvino": ("int8", 2.0, {1: 2.5, 8: 12.0}),
}


def _pair_manifest():
    m = make_manifest(SPECS)
    for e in m.variants:
        if e.name.endswith("_openvino"):
            e.runtime = "openvino"
        if e.precision == "bf16":
            e.requires_cpu = ["bf16"]
    return m


def test_scheduler_treats_bf16_as_emulated_without_native(caplog):
    m = _pair_manifest()
    with caplog.at_level("WARNING"):
        p = Policy(m, cpu=["avx2"])
    assert p.lacking_cpu == {"m_bf16_openvino": ["bf16"]}
    assert "m_bf16_openvino was built on a CPU with bf16" in caplog.text
    assert not p.servable(m.variant("m_bf16_openvino"))
    # a 0.5-point budget: only fp32 and bf16 qualify; without native bf16 the reference answers
    opts = RequestOptions(accuracy_budget_points=0.5)
    assert p.rank(opts)[0].variant == "m_fp32"
    # forced, it is still served
    assert p.rank(RequestOptions(variant="m_bf16_openvino"))[0].variant == "m_bf16_openvino"
    native = Policy(m, cpu=["bf16", "avx2"])
    assert native.lacking_cpu == {} and native.rank(opts)[0].variant == "m_bf16_openvino"
    # any pair: the fastest within the budget, whatever its runtime
    assert native.rank(RequestOptions(accuracy_budget_points=3.0))[0].variant == "m_int8_openvino"


def test_pareto_front_over_pairs():
    from tcsched.build_tools.cascade import pareto_front

    rng = np.random.default_rng(1)
    n = 400
    ref = np.ones(n, bool)
    int8_ort = rng.random(n) < 0.97
    agree = {
        "fp32": ref,
        "bf16_openvino": ref.copy(),
        "int8": int8_ort,
        "int8_openvino": int8_ort.copy(),  # same graph, same accuracy, faster: ORT int8 goes off the front
    }
    p50 = {
        "fp32": {1: 5.5, 8: 40.0},
        "bf16_openvino": {1: 4.4, 8: 21.0},
        "int8": {1: 3.9, 8: 21.5},
        "int8_openvino": {1: 3.5, 8: 17.0},
    }
    v = pareto_front(agree, p50, reference="fp32")
    assert v["fp32"].on_front and v["bf16_openvino"].on_front and v["int8_openvino"].on_front
    assert not v["int8"].on_front
    assert "bf16_openvino" in v["int8"].reason or "int8_openvino" in v["int8"].reason


def test_imports_and_asks_without_openvino(graphs):
    code = (
        "import sys; sys.modules['openvino'] = None\n"
        "import tcsched.engines, tcsched.build_tools.build, tcsched.scheduler.policy\n"
        "from tcsched.engines import MissingRuntimeError, load_engine\n"
        "from tcsched.engines.capabilities import cpu_capabilities\n"
        "assert not cpu_capabilities().native_bf16 and not cpu_capabilities().openvino\n"
        "try:\n"
        f"    load_engine('openvino', {str(graphs[0])!r})\n"
        "except MissingRuntimeError as e:\n"
        "    print('MISSING', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "MISSING the OpenVINO runtime is not installed: pip install 'openvino==" in out.stdout


def test_variant_configs_per_runtime():
    from tcsched.build_tools import repository as repo

    python = repo.variant_config(
        "m_bf16_openvino", repo.ServingOptions(), "input", "logits", [3, 224, 224], 1000, "openvino", "bf16"
    )
    params = {k: v.string_value for k, v in python.parameters.items()}
    assert python.backend == "python"
    assert params["runtime"] == "openvino" and params["precision"] == "bf16"
    assert params["intra_op_num_threads"] == "2"
    official = repo.ServingOptions(variant_backend="onnxruntime")
    for precision, hint in (("bf16", "YES"), ("int8", "NO")):
        cfg = repo.variant_config(
            "m", official, "input", "logits", [3, 224, 224], 1000, "openvino", precision
        )
        # through model_config.proto: what is written parses back to the same message
        again = repo.parse(repo.render(cfg))
        assert again == cfg and again.backend == "openvino" and again.default_model_filename == "model.onnx"
        p = {k: v.string_value for k, v in again.parameters.items()}
        assert p == {
            "INFERENCE_NUM_THREADS": "2",
            "NUM_STREAMS": "1",
            "PERFORMANCE_HINT": "LATENCY",
            "HINT_BF16": hint,
        }
    ort = repo.variant_config("m", official, "input", "logits", [3, 224, 224], 1000)
    assert ort.backend == "onnxruntime"


@pytest.mark.parametrize("which", ["fp32", "int8", "fp16"])
def test_pixel_input_graph_equals_the_float_graph_on_normalised_pixels(graphs, tmp_path, which):
    """add_pixel_input: uint8 pixels in, the normalisation inside the graph; both runtimes give the float graph's
    logits on the float tensor; the engines refuse float input to it; strip_pixel_input returns the float graph."""
    import onnx

    from tcsched.build_tools.graph_surgery import add_pixel_input, convert_fp16, strip_pixel_input
    from tcsched.pixels import normalise
    from tcsched.preprocessing import IMAGENET

    fp32, int8, _ = graphs
    src = {"fp32": fp32, "int8": int8}.get(which) or convert_fp16(fp32, tmp_path / "fp16.onnx")
    px_path = tmp_path / "pixels.onnx"
    onnx.save(add_pixel_input(onnx.load(src), IMAGENET.mean, IMAGENET.std), px_path)
    pixels = np.random.default_rng(1).integers(0, 256, (5, 3, 32, 32), dtype=np.uint8)
    x = normalise(pixels, IMAGENET)
    for runtime in ("onnxruntime", "openvino"):
        ref = load_engine(runtime, src, threads=1)(x)
        eng = load_engine(runtime, px_path, threads=1)
        assert eng.input_dtype == np.uint8
        got = eng(pixels)
        if runtime == "onnxruntime" and which == "fp32":  # the same float32 operations: the same logits
            np.testing.assert_array_equal(got, ref)
        else:  # OpenVINO folds the normalisation into the first layer; Q/DQ and fp16 graphs round their inputs
            np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-3 * np.abs(ref).max())
        with pytest.raises(InvalidInputError, match="input must be uint8, got float32"):
            eng(x)
    back = strip_pixel_input(onnx.load(px_path))
    assert back.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert not any(n.name.startswith("tcsched_pixels/") for n in back.graph.node)
    with pytest.raises(ValueError, match="already takes uint8 pixels"):
        add_pixel_input(onnx.load(px_path), IMAGENET.mean, IMAGENET.std)
