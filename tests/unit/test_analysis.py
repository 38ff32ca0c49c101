"""The layer analysis (tcsched.build_tools.analysis): rules on tiny ONNX graphs, 2:4 masks, INT8 sensitivity."""

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from PIL import Image
from rich.console import Console

from tcsched.build_tools.analysis import (
    AnalysisReport,
    LayerGeometry,
    activation_qparams,
    analyze,
    build_probe_model,
    inferred_shapes,
    is_2to4,
    layer_geometries,
    layer_kind,
    layer_macs,
    plot,
    print_table,
    prune_2_4,
    quantize_weight_per_channel,
    rule_fp16_alignment,
    rule_int8_alignment,
    rule_sparse24,
    short_name,
)
from tcsched.metrics import SqnrAccumulator as _SqnrAccumulator
from tcsched.metrics import sqnr_db
from tests.helpers import tiny_layered_classifier

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def geometry(op="Conv", cin=16, cout=16, k=(1, 1), group=1) -> LayerGeometry:
    wshape = (cout, cin // group, *k) if op == "Conv" else (cout, cin)
    return LayerGeometry(
        name="l",
        op_type=op,
        kind=layer_kind(op, wshape, group),
        in_channels=cin,
        out_channels=cout,
        group=group,
        kernel=tuple(k) if op == "Conv" else (1,),
        stride=(1, 1),
        weight_name="w",
        weight_shape=wshape,
        input_name="x",
        output_name="y",
    )


@pytest.fixture(scope="module")
def calib() -> np.ndarray:
    return np.random.default_rng(3).normal(0, 1, (24, 3, 16, 16)).astype(np.float32)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return tiny_layered_classifier(tmp_path_factory.mktemp("tiny") / "tiny.onnx")


@pytest.fixture(scope="module")
def report(tiny, calib) -> AnalysisReport:
    return analyze(tiny, calib, progress=False, batch_size=8)


# --- geometry and the static rules ------------------------------------------------------------------------------


def test_kinds_on_a_tiny_graph(tiny):
    geos = {g.name: g for g in layer_geometries(onnx.load(tiny))}
    assert {n: g.kind for n, g in geos.items()} == {
        "stem": "full",
        "pw": "pointwise",
        "dw": "depthwise",
        "fc1": "linear",
        "fc2": "linear",
        "fc3": "linear",
    }
    assert (geos["stem"].in_channels, geos["stem"].out_channels, geos["stem"].stride) == (3, 16, (2, 2))
    assert (geos["dw"].in_channels, geos["dw"].group, geos["dw"].kernel) == (12, 12, (3, 3))
    # transB=0: the weight is [in, out] = [256, 256]; fc1 (transB=1) is [out, in] = [256, 12]
    assert (geos["fc1"].in_channels, geos["fc1"].out_channels, geos["fc1"].trans_b) == (12, 256, True)
    assert geos["fc2"].trans_b is False and geos["fc2"].weight_channel_axis == 1
    assert layer_kind("Conv", (32, 8, 3, 3), group=4) == "grouped"
    with pytest.raises(ValueError, match="not a Conv/Gemm"):
        layer_kind("Relu", (1, 1))


def test_macs_params_and_shapes_against_hand_computed_values(report):
    by = {la.name: la for la in report.layers}
    # stem: 16 out channels x 8x8 outputs x (3 in x 3x3); params 16*3*3*3 + 16 bias
    assert by["stem"].output_shape == ["N", 16, 8, 8]
    assert by["stem"].macs == 16 * 8 * 8 * 3 * 9 and by["stem"].params == 16 * 27 + 16
    assert by["pw"].macs == 12 * 8 * 8 * 16 and by["pw"].params == 12 * 16 + 12
    assert by["dw"].macs == 12 * 8 * 8 * 9 and by["dw"].params == 12 * 9
    assert by["fc1"].output_shape == ["N", 256]
    assert by["fc1"].macs == 256 * 12 and by["fc1"].params == 256 * 12 + 256
    assert by["fc2"].macs == 256 * 256 and by["fc2"].params == 256 * 256
    assert by["fc3"].macs == 10 * 256 and by["fc3"].params == 10 * 256 + 10
    assert report.totals.macs == sum(la.macs for la in report.layers)
    assert report.n_calibration_images == 24 and report.input_shape == ["N", 3, 16, 16]


def test_layer_macs_refuses_unknown_dims():
    with pytest.raises(ValueError, match="unknown"):
        layer_macs(geometry(), ["N", 16, "?", 8])


def test_shape_inference_keeps_the_batch_symbolic(tiny):
    shapes = inferred_shapes(onnx.load(tiny))
    assert shapes["c_pw"] == ["N", 12, 8, 8] and shapes["logits"] == ["N", 10]


@pytest.mark.parametrize(
    ("cin", "cout", "fp16", "int8"),
    [
        (8, 16, True, False),
        (16, 32, True, True),
        (3, 16, False, False),
        (12, 16, False, False),
        (16, 12, False, False),
    ],
)
def test_alignment_verdicts(cin, cout, fp16, int8):
    g = geometry(cin=cin, cout=cout)
    v16, v8 = rule_fp16_alignment(g), rule_int8_alignment(g)
    assert (v16.ok, v8.ok) == (fp16, int8)
    assert ("multiple of 8" in v16.reason) or v16.ok
    if not int8:
        assert "not a multiple of 16" in v8.reason


def test_alignment_reasons_name_the_offending_channels(report):
    stem = next(la for la in report.layers if la.name == "stem")
    assert not stem.fp16_aligned.ok and "in 3 not a multiple of 8" in stem.fp16_aligned.reason
    fc2 = next(la for la in report.layers if la.name == "fc2")
    assert fc2.fp16_aligned.ok and fc2.int8_aligned.ok


def test_sparse24_verdicts_with_reasons():
    stem = rule_sparse24(geometry(cin=3, cout=32, k=(3, 3)))
    assert stem.outcome == "not_eligible" and not stem.ok and "3 input channel(s) per group" in stem.reason
    dw = rule_sparse24(geometry(cin=256, cout=256, k=(3, 3), group=256))
    assert dw.outcome == "not_eligible" and "depthwise" in dw.reason
    wide = rule_sparse24(geometry(cin=960, cout=320))
    assert wide.ok and wide.outcome == "eligible" and "#3849" in wide.reason
    narrow = rule_sparse24(geometry(cin=160, cout=960))
    assert not narrow.ok and narrow.structurally_eligible and narrow.outcome == "eligible_no_speedup"
    assert "reduction 160 < 256" in narrow.reason
    # a 3x3 kernel multiplies the reduction by 9: 32 channels x 9 = 288 >= 256
    assert rule_sparse24(geometry(cin=32, cout=256, k=(3, 3))).outcome == "eligible"
    assert rule_sparse24(geometry(cin=6, cout=256)).outcome == "not_eligible"  # 6 is not a multiple of 4
    assert rule_sparse24(geometry(op="Gemm", cin=1280, cout=1000)).outcome == "eligible"


def test_sparse24_in_the_report(report):
    outcome = {la.name: la.sparse24_eligible.outcome for la in report.layers}
    assert outcome == {
        "stem": "not_eligible",
        "pw": "eligible_no_speedup",
        "dw": "not_eligible",
        "fc1": "eligible_no_speedup",
        "fc2": "eligible",
        "fc3": "eligible_no_speedup",
    }
    assert report.totals.n_sparse24_eligible == 1 and report.totals.macs_sparse24_eligible == 256 * 256
    p24 = {la.name: la.prune24_sqnr_db for la in report.layers}
    assert p24["stem"] is None and p24["dw"] is None
    assert all(math.isfinite(p24[n]) for n in ("pw", "fc1", "fc2", "fc3"))
    assert all(la.sparsity == 0 and not la.is_2to4_sparse for la in report.layers)


# --- 2:4 pruning ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(8, 16, 3, 3), (5, 8, 1, 1), (7, 12)])
def test_prune_2_4_masks(shape):
    w = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    pruned, mask = prune_2_4(w)
    assert pruned.shape == w.shape and pruned.dtype == w.dtype and mask.dtype == bool
    assert is_2to4(pruned) and not is_2to4(w)
    # every group of 4 consecutive input channels (axis 1) at each (o, k...) has exactly 2 kept, >= 2 zeros
    g = np.moveaxis(pruned, 1, -1).reshape(*np.moveaxis(w, 1, -1).shape[:-1], -1, 4)
    assert ((g == 0).sum(-1) >= 2).all()
    gm = np.moveaxis(mask, 1, -1).reshape(g.shape)
    assert (gm.sum(-1) == 2).all()
    # the kept ones are the 2 largest magnitudes of their group
    ga = np.abs(np.moveaxis(w, 1, -1).reshape(g.shape))
    kept_min = np.where(gm, ga, np.inf).min(-1)
    dropped_max = np.where(gm, -np.inf, ga).max(-1)
    assert (kept_min >= dropped_max).all()
    np.testing.assert_array_equal(pruned[mask], w[mask])


def test_prune_2_4_by_hand():
    w = np.array([[1.0, -4.0, 3.0, 0.5, 0.0, 0.1, -0.2, 0.05]], dtype=np.float32)
    pruned, mask = prune_2_4(w)
    np.testing.assert_array_equal(pruned, np.array([[0, -4, 3, 0, 0, 0.1, -0.2, 0]], np.float32))
    assert mask.sum() == 4


def test_prune_2_4_refuses_non_multiples_of_4():
    with pytest.raises(ValueError, match="not a multiple of 4"):
        prune_2_4(np.ones((16, 3, 3, 3), np.float32))
    with pytest.raises(ValueError, match="rank"):
        prune_2_4(np.ones(8, np.float32))
    assert not is_2to4(np.zeros((16, 3, 3, 3), np.float32))


# --- quantization helpers and the probe graph -------------------------------------------------------------------


def test_quantization_helpers():
    scale, zp = activation_qparams(0.0, 6.0)
    assert scale == pytest.approx(6 / 255) and zp == 0
    scale, zp = activation_qparams(-1.0, 1.0)
    assert zp == 128 and scale == pytest.approx(2 / 255)
    assert activation_qparams(0.0, 0.0) == (1.0, 0)
    w = np.array([[0.5, -1.0], [0.0, 0.0]], np.float32)
    q, s = quantize_weight_per_channel(w, axis=0)
    assert q.dtype == np.int8 and q[0, 1] == -127 and s[1] == 1.0
    np.testing.assert_allclose(q * s[:, None], w, atol=1 / 254)


def test_sqnr_accumulator_matches_metrics():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(6, 5)).astype(np.float32), rng.normal(size=(6, 5)).astype(np.float32)
    acc = _SqnrAccumulator()
    acc.add(a[:2], b[:2])
    acc.add(a[2:], b[2:])
    assert acc.db == pytest.approx(sqnr_db(a, b))
    same = _SqnrAccumulator()
    same.add(a, a)
    assert same.db == math.inf


def test_probe_model_with_transb0_prunes_along_the_input(tiny, calib):
    model = onnx.load(tiny)
    g = next(x for x in layer_geometries(model) if x.name == "fc2")
    w = onnx.numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "w_fc2"))
    probe, outs = build_probe_model(model, g, w, (0.0, 10.0), prune=True)
    onnx.checker.check_model(probe)
    probe.graph.output.extend([onnx.helper.make_tensor_value_info("r1", onnx.TensorProto.FLOAT, None)])
    sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    r1, ref, p24 = sess.run(["r1", outs["ref"], outs["p24"]], {"input": calib})
    np.testing.assert_allclose(ref, r1 @ w, rtol=1e-4, atol=1e-4)
    pruned_t, _ = prune_2_4(w.T)  # [out, in]: groups of 4 input features
    np.testing.assert_allclose(p24, r1 @ pruned_t.T, rtol=1e-4, atol=1e-4)
    ops = [n.op_type for n in probe.graph.node]
    assert ops.count("QuantizeLinear") == 1 and ops.count("DequantizeLinear") == 2


# --- sensitivity ----------------------------------------------------------------------------------------------


def test_sensitivity_is_finite_and_small_on_a_well_behaved_graph(report):
    for la in report.layers:
        s = la.int8_sensitivity
        assert 0 <= s.top1_agreement <= 1
        assert math.isfinite(s.kl) and s.kl >= 0
        assert math.isfinite(s.output_sqnr_db) and s.output_sqnr_db > 20, la.name
    assert report.wall_time_s > 0


def test_a_layer_with_a_huge_input_range_is_the_most_sensitive(tmp_path, calib, report):
    outlier = tiny_layered_classifier(tmp_path / "outlier.onnx", outlier_scale=1000.0)
    bad = analyze(outlier, calib, progress=False, batch_size=8)
    by = {la.name: la.int8_sensitivity for la in bad.layers}
    assert max(by, key=lambda n: by[n].kl) == "pw"
    assert min(by, key=lambda n: by[n].output_sqnr_db) == "pw"
    normal_pw = next(la for la in report.layers if la.name == "pw").int8_sensitivity
    assert by["pw"].kl > 10 * normal_pw.kl
    assert by["pw"].output_sqnr_db < normal_pw.output_sqnr_db - 20
    assert next(la for la in bad.layers if la.name == "pw").input_activation_max > 100


def test_feed_dicts_give_the_same_answer(tiny, calib, report):
    feeds = [{"input": calib[:10]}, {"input": calib[10:]}]
    again = analyze(tiny, feeds, progress=False)
    for a, b in zip(report.layers, again.layers, strict=True):
        assert a.int8_sensitivity.kl == pytest.approx(b.int8_sensitivity.kl, rel=1e-3, abs=1e-9)
        assert a.int8_sensitivity.output_sqnr_db == pytest.approx(b.int8_sensitivity.output_sqnr_db, rel=1e-3)


def test_bad_arguments_fail_before_work(tiny, tmp_path):
    with pytest.raises(ValueError, match="float32"):
        analyze(tiny, np.zeros((2, 3, 16, 16), np.float64), progress=False)
    with pytest.raises(ValueError, match="shape"):
        analyze(tiny, np.zeros((2, 3, 32, 32), np.float32), progress=False)
    with pytest.raises(ValueError, match="no calibration images"):
        analyze(tiny, np.zeros((0, 3, 16, 16), np.float32), progress=False)
    with pytest.raises(ValueError, match="model input 'input'"):
        analyze(tiny, [{"x": np.zeros((1, 3, 16, 16), np.float32)}], progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        analyze(tiny, np.zeros((2, 3, 16, 16), np.float32), progress=False, batch_size=0)
    with pytest.raises(FileNotFoundError):
        analyze(tmp_path / "missing.onnx", np.zeros((2, 3, 16, 16), np.float32), progress=False)


# --- outputs ----------------------------------------------------------------------------------------------------


def test_analysis_json_round_trip(report, tmp_path):
    path = report.write(tmp_path / "sub" / "analysis.json")
    back = AnalysisReport.read(path)
    assert back == report
    # infinities survive (an exact layer has infinite SQNR)
    inf = report.model_copy(deep=True)
    inf.layers[0].prune24_sqnr_db = math.inf
    assert AnalysisReport.read(inf.write(tmp_path / "inf.json")).layers[0].prune24_sqnr_db == math.inf
    bad = tmp_path / "old.json"
    bad.write_text('{"schema_version": "0.1"}')
    with pytest.raises(ValueError, match="schema_version"):
        AnalysisReport.read(bad)


def test_plot_writes_a_png(report, tmp_path):
    out = plot(report, tmp_path / "plots" / "analysis.png")
    assert out.read_bytes()[:8] == PNG_MAGIC


def test_table_and_short_names(report):
    console = Console(record=True, width=200)
    print_table(report, console)
    text = console.export_text()
    assert "fc2" in text and "eligible" in text and "most INT8-sensitive" in text
    assert short_name("/features/features.1/conv/conv.0/conv.0.0/Conv") == "features.1.conv.0.0"
    assert short_name("/classifier/classifier.1/Gemm") == "classifier.1"
    assert short_name("stem") == "stem"


def test_cli_analyze(tmp_path):
    from typer.testing import CliRunner

    from tcsched.cli import app

    model = tiny_layered_classifier(tmp_path / "tiny224.onnx", size=224)
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (240, 260, 3), dtype=np.uint8)).save(photos / f"p{i}.png")
    out = tmp_path / "reports"
    res = CliRunner().invoke(
        app, ["analyze", "--model", model, "--calib-dir", str(photos), "--limit", "2", "--output", str(out)]
    )
    assert res.exit_code == 0, res.output
    report = AnalysisReport.read(out / "analysis.json")
    assert report.n_calibration_images == 2 and len(report.layers) == 6
    assert (out / "analysis.png").read_bytes()[:8] == PNG_MAGIC
    bad = CliRunner().invoke(app, ["analyze", "--model", model, "--limit", "0"])
    assert bad.exit_code != 0 and "limit" in bad.output
