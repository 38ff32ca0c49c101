import numpy as np
import onnx
import pytest

from tcsched.build_tools.quantize import (
    ArrayCalibrationReader,
    int8_requirements,
    int8_weight_bits,
    quantize_int8,
)
from tcsched.metrics import mean_kl, sqnr_db, top1_agreement, topk_accuracy, wilson_interval
from tcsched.ort_runtime import OrtClassifier
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
