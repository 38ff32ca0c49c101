import numpy as np
import onnx
import pytest

from tcsched.build_tools.quantize import (
    ArrayCalibrationReader,
    depthwise_weights,
    int8_requirements,
    int8_weight_bits,
    quantize_int8,
)
from tcsched.metrics import mean_kl, sqnr_db, top1_agreement, topk_accuracy, wilson_interval
from tcsched.ort_runtime import OrtClassifier, make_session
from tests.helpers import tiny_classifier


def test_int8_qdq_graph_on_a_tiny_model(tmp_path):
    fp32 = tiny_classifier(tmp_path / "tiny.onnx")
    rng = np.random.default_rng(1)
    calib = rng.normal(0, 1, (16, 3, 32, 32)).astype(np.float32)
    out = quantize_int8(fp32, tmp_path / "int8.onnx", calib, method="minmax")
    graph = onnx.load(str(out)).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("QuantizeLinear") >= 3 and ops.count("DequantizeLinear") >= 6
    # per-channel int8 weights: the stem's weight scale has one entry per output channel
    inits = {i.name: i for i in graph.initializer}
    w_scales = [n for n in inits if n.startswith("w1") and "scale" in n]
    assert w_scales and onnx.numpy_helper.to_array(inits[w_scales[0]]).shape == (8,)
    x = rng.normal(0, 1, (32, 3, 32, 32)).astype(np.float32)
    ref, q = OrtClassifier(fp32)(x), OrtClassifier(out)(x)
    assert sqnr_db(ref, q) > 20
    assert top1_agreement(ref, q) >= 0.8


def test_excluded_nodes_stay_float(tmp_path):
    fp32 = tiny_classifier(tmp_path / "tiny.onnx")
    calib = np.random.default_rng(2).normal(0, 1, (8, 3, 32, 32)).astype(np.float32)
    out = quantize_int8(
        fp32, tmp_path / "mixed.onnx", calib, method="minmax", nodes_to_exclude=["classifier"]
    )
    g = onnx.load(str(out)).graph
    gemm = next(n for n in g.node if n.op_type == "Gemm")
    assert gemm.input[1] == "w3"  # the float weight, not a DequantizeLinear output


def test_bad_arguments_fail_before_work(tmp_path):
    fp32 = tiny_classifier(tmp_path / "tiny.onnx")
    with pytest.raises(ValueError, match="unknown calibration method"):
        quantize_int8(fp32, tmp_path / "x.onnx", np.zeros((1, 3, 32, 32), np.float32), method="magic")
    with pytest.raises(ValueError, match="float32"):
        ArrayCalibrationReader("input", np.zeros((1, 3, 32, 32), np.float64))
    assert not (tmp_path / "x.onnx").exists()


def test_metrics():
    ref = np.array([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0]])
    assert top1_agreement(ref, ref) == 1.0 and mean_kl(ref, ref) == pytest.approx(0.0, abs=1e-9)
    assert topk_accuracy(ref, np.array([0, 2]), 1) == 0.5 and topk_accuracy(ref, np.array([0, 2]), 2) == 1.0
    assert sqnr_db(ref, ref) == float("inf") and sqnr_db(ref, ref * 1.1) == pytest.approx(20.0)
    lo, hi = wilson_interval(80, 100)
    assert 0.70 < lo < 0.8 < hi < 0.88


def test_calibration_batches_are_equal_sized_for_histogram_calibrators(tmp_path):
    r = ArrayCalibrationReader("input", np.zeros((12, 3, 4, 4), np.float32), batch_size=8)
    sizes = [len(b["input"]) for b in r]
    assert sizes == [6, 6]
    fp32 = tiny_classifier(tmp_path / "tiny.onnx")
    calib = np.random.default_rng(3).normal(0, 1, (12, 3, 32, 32)).astype(np.float32)
    assert quantize_int8(fp32, tmp_path / "p.onnx", calib, method="percentile").is_file()


def test_calibration_method_specs():
    from tcsched.build_tools.build import BuildConfig, parse_calib_method

    assert parse_calib_method("minmax") == ("minmax", 100.0)
    assert parse_calib_method("percentile") == ("percentile", 99.999)
    assert parse_calib_method("percentile:99.99") == ("percentile", 99.99)
    for bad, needle in [
        ("entropy", "silently equals minmax"),
        ("percentile:100", "in \\(90, 100\\)"),
        ("percentile:x", "bad"),
    ]:
        with pytest.raises(ValueError, match=needle):
            parse_calib_method(bad)
    BuildConfig().validate()  # the defaults are valid
    with pytest.raises(ValueError, match="entropy"):
        BuildConfig(calib_methods=("minmax", "entropy")).validate()


def test_seven_bit_weights_where_int8_saturates(tmp_path):
    """reduce_range (7-bit weights) for x86 CPUs without VNNI; the graph says which it has, and 8-bit weights
    make the variant require a CPU where they do not saturate."""
    from tcsched.engines.capabilities import INT8_FULL_RANGE, cpu_capabilities

    fp32 = tiny_classifier(tmp_path / "tiny.onnx")
    calib = np.random.default_rng(1).normal(0, 1, (16, 3, 32, 32)).astype(np.float32)
    eight = quantize_int8(fp32, tmp_path / "8.onnx", calib, method="minmax", reduce_range=False)
    seven = quantize_int8(fp32, tmp_path / "7.onnx", calib, method="minmax", reduce_range=True)
    assert int8_weight_bits(onnx.load(str(eight))) == 8 and int8_requirements(eight) == (INT8_FULL_RANGE,)
    assert int8_weight_bits(onnx.load(str(seven))) == 7 and int8_requirements(seven) == ()
    assert int8_weight_bits(onnx.load(str(fp32))) is None and int8_requirements(fp32) == ()
    auto = quantize_int8(fp32, tmp_path / "auto.onnx", calib, method="minmax")  # this CPU decides
    assert int8_weight_bits(onnx.load(str(auto))) == (7 if cpu_capabilities().int8_saturates else 8)
    # the depthwise Conv keeps 8-bit weights in the 7-bit graph; the stem Conv and the Gemm do not
    widest = _widest_int8(onnx.load(str(seven)))
    assert depthwise_weights(onnx.load(str(seven))) == {"w2_quantized"}
    assert widest["w2_quantized"] == 127 and widest["w1_quantized"] <= 64 and widest["w3_quantized"] <= 64
    scales = {i.name: list(i.dims) for i in onnx.load(str(seven)).graph.initializer}
    assert scales["w2_scale"] == [8]  # still one scale per output channel


def _widest_int8(model: onnx.ModelProto) -> dict[str, int]:
    return {
        i.name: int(np.abs(onnx.numpy_helper.to_array(i).astype(np.int16)).max())
        for i in model.graph.initializer
        if i.data_type == onnx.TensorProto.INT8 and not i.name.endswith("zero_point")
    }


def _qdq_conv(path, depthwise: bool, channels: int = 64) -> tuple[str, float]:
    """x -> Q/DQ (uint8, scale 1) -> Conv with int8 weights all 127 (scale 1) -> Q/DQ (uint8): on inputs of 255,
    each output is ``peak`` = 255 x 127 x (9 taps | 64 channels), exactly 255 after the output Q."""
    from onnx import TensorProto, helper, numpy_helper

    k = 3 if depthwise else 1
    w = np.full((channels, 1 if depthwise else channels, k, k), 127, np.int8)
    peak = 255.0 * 127 * (k * k if depthwise else channels)
    inits = [
        numpy_helper.from_array(a, n)
        for a, n in [
            (np.array(1.0, np.float32), "s"),
            (np.array(0, np.uint8), "zp"),
            (w, "wq"),
            (np.ones(channels, np.float32), "ws"),
            (np.zeros(channels, np.int8), "wzp"),
            (np.array(peak / 255, np.float32), "ys"),
        ]
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "s", "zp"], ["xd"]),
        helper.make_node("DequantizeLinear", ["wq", "ws", "wzp"], ["wd"], axis=0),
        helper.make_node("Conv", ["xd", "wd"], ["y"], group=channels if depthwise else 1),
        helper.make_node("QuantizeLinear", ["y", "ys", "zp"], ["yq"]),
        helper.make_node("DequantizeLinear", ["yq", "ys", "zp"], ["out"]),
    ]
    graph = helper.make_graph(
        nodes,
        "saturation",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, 4, 4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return str(path), peak


@pytest.mark.parametrize("depthwise", [False, True], ids=["pointwise", "depthwise"])
def test_int8_kernels_saturate_where_the_cpu_gate_says(tmp_path, depthwise):
    """The rule behind 7-bit weights, checked on this CPU's real kernels (ONNX Runtime's fused QLinearConv and
    OpenVINO's int8 convolution) against the float emulation of the same QDQ graph: 8-bit weights saturate a
    pointwise Conv's u8s8 sums exactly where ``CpuCapabilities.int8_saturates`` (x86 without VNNI), and never a
    depthwise Conv's (``depthwise_weights``)."""
    import onnxruntime as ort
    import openvino as ov

    from tcsched.engines.capabilities import cpu_capabilities

    path, peak = _qdq_conv(tmp_path / "conv.onnx", depthwise)
    x = np.full((1, 64, 4, 4), 255, np.float32)
    emulated = ort.SessionOptions()
    emulated.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    ref = ort.InferenceSession(path, emulated, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.allclose(ref, peak)  # the emulation is exact: the graph represents the full sum
    served = {
        "onnxruntime": make_session(path).run(None, {"x": x})[0],
        "openvino": ov.Core().compile_model(path, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(x)[0],
    }
    saturates = cpu_capabilities().int8_saturates and not depthwise
    for runtime, y in served.items():
        assert np.allclose(y, ref) != saturates, (runtime, float(y.max() / peak), saturates)
