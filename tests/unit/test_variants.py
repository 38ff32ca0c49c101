import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from tcsched.build_tools.analysis import is_2to4, prune_2_4
from tcsched.build_tools.augment import label_preserving_views
from tcsched.build_tools.graph_surgery import convert_fp16, dequantize_layers, prune_onnx_2_4
from tcsched.build_tools.mixed_search import float_group_study, float_groups, rank_in_context, search_mixed
from tcsched.build_tools.quantize import quantize_int8
from tcsched.build_tools.scoring import Score, run_model, score
from tests.helpers import tiny_classifier, tiny_layered_classifier


@pytest.fixture
def tiny(tmp_path):
    fp32 = tiny_classifier(tmp_path / "tiny.onnx", channels=16)
    x = np.random.default_rng(0).normal(0, 1, (32, 3, 32, 32)).astype(np.float32)
    q = quantize_int8(fp32, tmp_path / "int8.onnx", x, method="minmax")
    return onnx.load(fp32), onnx.load(str(q)), x


def test_all_layers_float_is_exactly_the_fp32_graph(tiny):
    fp32, q, x = tiny
    ref = run_model(fp32, x)
    names = [n.name for n in q.graph.node if n.op_type in ("Conv", "Gemm", "Add")]
    restored = dequantize_layers(q, names, fp32)
    onnx.checker.check_model(restored)
    np.testing.assert_allclose(run_model(restored, x), ref, rtol=1e-5, atol=1e-5)
    assert not [n for n in restored.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert score(ref, run_model(q, x)).kl > 0  # the int8 graph itself is not exact


def test_one_float_layer_keeps_the_others_int8(tiny):
    fp32, q, _ = tiny
    m = dequantize_layers(q, ["classifier"], fp32)
    gemm = next(n for n in m.graph.node if n.name == "classifier")
    conv = next(n for n in m.graph.node if n.name == "dw_conv")
    prod = {o: n for n in m.graph.node for o in n.output}
    assert all(prod.get(i) is None or prod[i].op_type != "DequantizeLinear" for i in gemm.input)
    assert prod[conv.input[1]].op_type == "DequantizeLinear"  # still an int8 weight
    with pytest.raises(ValueError, match="not in the graph"):
        dequantize_layers(q, ["nope"], fp32)


def test_search_mixed_takes_the_smallest_k_and_reports_trials(tiny):
    fp32, q, _ = tiny
    ranking = ["classifier", "dw_conv", "stem_conv"]
    calls = []

    def evaluate(model):  # pretend agreement grows with the float layers kept
        k = sum(1 for n in model.graph.node if n.name in ranking) - sum(
            1
            for n in model.graph.node
            if n.name in ranking
            and any(i.endswith("DequantizeLinear_Output") or "_quantized" in i for i in n.input[1:2])
        )
        calls.append(k)
        return Score(agreement=[0.90, 0.96, 0.99, 1.0][k], kl=0.1 / (k + 1), top1_drop_points=0.0)

    res = search_mixed(q, ranking, evaluate, 0.5, 0.97, reference=fp32)
    assert res.met_budget and res.float_layers == ["classifier", "dw_conv"]
    assert [t.k for t in res.trials] == [0, 1, 2]
    res = search_mixed(q, ranking, evaluate, 0.5, 0.999, max_float_layers=1, reference=fp32)
    assert not res.met_budget and len(res.float_layers) == 1
    with pytest.raises(ValueError):
        search_mixed(q, [], evaluate, 0.5, 0.97)


def _n_float(model, ranking):
    """How many of the ``ranking`` nodes read a float weight (no DequantizeLinear / int8 initializer behind it)."""
    return sum(
        1
        for n in model.graph.node
        if n.name in ranking
        and not any(i.endswith("DequantizeLinear_Output") or "_quantized" in i for i in n.input[1:2])
    )


def test_search_mixed_stops_at_the_latency_cap(tiny):
    fp32, q, _ = tiny
    ranking = ["classifier", "dw_conv", "stem_conv"]

    evaluated = []

    def evaluate(model):  # agreement would reach the budget only with all 3 layers float
        evaluated.append(_n_float(model, ranking))
        return Score(
            agreement=[0.90, 0.93, 0.95, 0.99][_n_float(model, ranking)],
            kl=0.1 / (1 + _n_float(model, ranking)),
            top1_drop_points=0.0,
        )

    def latency(model):  # each float layer costs 0.1x fp32 on top of int8's 0.45x
        return 0.45 + 0.1 * _n_float(model, ranking)

    res = search_mixed(
        q, ranking, evaluate, 0.5, 0.97, reference=fp32, latency_ratio=latency, max_latency_ratio=0.6
    )
    # k=2 costs 0.65x and k=3 0.75x (each timed twice): two in a row over the cap stop the scan at k=3 without
    # evaluating either; the result is the best within the cap
    assert res.stopped_at == 3 and evaluated == [0, 1]
    assert res.latency_ratios == {1: pytest.approx(0.55), 2: pytest.approx(0.65), 3: pytest.approx(0.75)}
    assert not res.met_budget and res.float_layers == ["classifier"]
    with pytest.raises(ValueError, match="max_latency_ratio"):
        search_mixed(q, ranking, evaluate, 0.5, 0.97, max_latency_ratio=0.6)


def test_search_mixed_missing_the_budget_keeps_the_lowest_kl_not_the_luckiest_agreement(tiny):
    fp32, q, _ = tiny
    ranking = ["classifier", "dw_conv", "stem_conv"]

    # agreement peaks at k=1 by one lucky image; KL (a mean over every image) keeps falling to k=2, then flattens
    agreement = [0.90, 0.95, 0.94, 0.94]
    kl = [0.10, 0.05, 0.03, 0.03]

    def evaluate(model):
        k = _n_float(model, ranking)
        return Score(agreement=agreement[k], kl=kl[k], top1_drop_points=0.0)

    res = search_mixed(q, ranking, evaluate, 0.5, 0.97, reference=fp32)
    assert not res.met_budget and [t.k for t in res.trials] == [0, 1, 2, 3]
    assert res.float_layers == ["classifier", "dw_conv"]  # k=2: lowest KL, and fewer layers than the k=3 tie
    assert res.score.kl == pytest.approx(0.03) and res.score.agreement == pytest.approx(0.94)


def test_search_mixed_confirms_an_over_cap_timing_before_stopping(tiny):
    fp32, q, _ = tiny
    ranking = ["classifier", "dw_conv", "stem_conv"]
    timings = iter([0.55, 0.66, 0.52, 0.58])  # k=1; k=2 noisy then 0.52 (mean 0.59); k=3

    def latency(model):
        return next(timings)

    def evaluate(model):
        return Score(agreement=0.9, kl=0.1, top1_drop_points=0.0)

    res = search_mixed(
        q, ranking, evaluate, 0.5, 0.97, reference=fp32, latency_ratio=latency, max_latency_ratio=0.6
    )
    assert res.stopped_at is None and [t.k for t in res.trials] == [0, 1, 2, 3]
    assert res.latency_ratios[2] == pytest.approx(0.59)


def test_search_mixed_skips_one_candidate_over_the_cap_and_goes_on(tiny):
    fp32, q, _ = tiny
    ranking = ["classifier", "dw_conv", "stem_conv"]
    # a slow stretch of the machine: k=2 times 0.66x twice, then k=3 is back under the cap
    timings = iter([0.50, 0.66, 0.66, 0.58])
    evaluated = []

    def evaluate(model):
        evaluated.append(_n_float(model, ranking))
        return Score(agreement=0.9, kl=0.1 / (1 + _n_float(model, ranking)), top1_drop_points=0.0)

    res = search_mixed(
        q,
        ranking,
        evaluate,
        0.5,
        0.97,
        reference=fp32,
        latency_ratio=lambda m: next(timings),
        max_latency_ratio=0.6,
    )
    assert evaluated == [0, 1, 3] and res.stopped_at is None  # k=2 skipped, never evaluated
    assert res.latency_ratios == {1: pytest.approx(0.50), 2: pytest.approx(0.66), 3: pytest.approx(0.58)}
    assert res.float_layers == ranking  # k=3: the lowest KL, under the cap


def test_rank_in_context_covers_every_quantized_node(tiny):
    fp32, q, x = tiny
    ranked = rank_in_context(q, fp32, x, run_model(fp32, x))
    assert {n for n, _ in ranked} == {"stem_conv", "dw_conv", "classifier"}
    gains = [g for _, g in ranked]
    assert gains == sorted(gains, reverse=True)


def test_prune_onnx_2_4_and_fp16(tmp_path):
    fp32 = onnx.load(tiny_classifier(tmp_path / "t.onnx", channels=16))
    # the depthwise conv cannot take the pattern (1 input channel per group): only prune eligible layers
    pruned = prune_onnx_2_4(fp32, ["classifier"], prune_2_4)
    inits = {i.name: numpy_helper.to_array(i) for i in pruned.graph.initializer}
    w = inits["w3"]  # Gemm weight [10, 16], transB=1: groups of 4 along the 16 inputs
    assert is_2to4(w)
    groups = w.reshape(10, 4, 4)
    assert ((groups == 0).sum(axis=2) >= 2).all()
    orig = numpy_helper.to_array(next(i for i in fp32.graph.initializer if i.name == "w3")).reshape(10, 4, 4)
    kept = np.sort(np.abs(orig), axis=2)[:, :, 2:]  # the 2 largest magnitudes of each group survive
    np.testing.assert_allclose(np.sort(np.abs(groups), axis=2)[:, :, 2:], kept)
    onnx.save(pruned, str(tmp_path / "p.onnx"))
    f16 = convert_fp16(tmp_path / "p.onnx", tmp_path / "p16.onnx")
    g = onnx.load(str(f16)).graph
    assert g.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # fp32 in/out, casts inside
    assert any(n.op_type == "Cast" for n in g.node)
    w16 = numpy_helper.to_array(next(i for i in g.initializer if i.dims == [10, 16]))
    assert w16.dtype == np.float16 and is_2to4(w16.astype(np.float32))


def test_candidate_latency_is_measured_against_the_reference(tmp_path):
    """The int8_mixed search's latency probe, timed for real with ONNX Runtime on a tiny graph."""
    from tcsched.build_tools.latency import candidate_latency_ratio

    fp32 = tiny_classifier(tmp_path / "tiny.onnx")
    x = np.random.default_rng(0).normal(0, 1, (8, 3, 32, 32)).astype(np.float32)
    same = candidate_latency_ratio(onnx.load(fp32), fp32, tmp_path / "trial.onnx", 8, 1, x, repeats=15)
    assert (tmp_path / "trial.onnx").is_file()
    assert 0.3 < same < 3.0  # the same graph against itself: ~1, with a tiny graph's timing noise


def test_float_groups_split_pointwise_by_activation_and_study_each_group(tmp_path):
    from tcsched.build_tools.analysis import layer_kind

    fp32_path = tiny_layered_classifier(tmp_path / "layered.onnx")
    x = np.random.default_rng(0).normal(0, 1, (16, 3, 16, 16)).astype(np.float32)
    # 8-bit weights on every CPU: the premise below is about the activations' per-tensor ranges, which 7-bit
    # weights (reduce_range, chosen by default on x86 without VNNI) would blur with their own error
    q = onnx.load(
        str(quantize_int8(fp32_path, tmp_path / "int8.onnx", x, method="minmax", reduce_range=False))
    )
    fp32 = onnx.load(fp32_path)
    inits = {i.name: numpy_helper.to_array(i) for i in fp32.graph.initializer}
    kinds = {}
    for n in fp32.graph.node:
        if n.op_type in ("Conv", "Gemm"):
            group = next((a.i for a in n.attribute if a.name == "group"), 1)
            kinds[n.name] = layer_kind(n.op_type, inits[n.input[1]].shape, group)
    # fc3 feeds no activation, but it is "linear" (a Gemm), not a pointwise Conv
    kinds["pw_linear_probe"] = "pointwise"  # a name the int8 graph does not have: ignored
    groups = float_groups(q, kinds, fp32)
    assert groups["full"] == ["stem"]
    assert groups["pointwise + activation"] == ["pw"]
    assert groups["depthwise"] == ["dw"]
    assert set(groups["linear"]) <= {"fc1", "fc2", "fc3"} and groups["linear"]
    assert "pointwise, linear" not in groups and "residual add" not in groups

    ref = run_model(fp32, x)
    seen = []

    def evaluate(model):
        seen.append(model)
        return score(ref, run_model(model, x))

    rows = float_group_study(q, groups, evaluate, fp32, latency_ratio=lambda m: 0.5)
    assert [r.group for r in rows] == list(groups) and len(seen) == len(groups)
    assert all(r.latency_ratio == 0.5 for r in rows)
    # floating the pw layer (the input whose per-tensor quantization hurts most here) removes error
    base = score(ref, run_model(q, x)).kl
    assert next(r for r in rows if r.group == "pointwise + activation").score.kl < base
    with pytest.raises(ValueError, match="empty"):
        float_group_study(q, {"nothing": []}, evaluate, fp32)


def test_float_groups_mark_linear_pointwise_and_residual_adds(tmp_path):
    """A pointwise projection with no activation after it and a residual Add (MobileNetV2's block tail)."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    w_e = rng.normal(0, 0.3, (8, 4, 1, 1)).astype(np.float32)
    w_p = rng.normal(0, 0.3, (4, 8, 1, 1)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["input", "w_e"], ["e"], name="expand"),
        helper.make_node("Clip", ["e", "lo", "hi"], ["e6"], name="relu6"),
        helper.make_node("Conv", ["e6", "w_p"], ["p"], name="project"),
        helper.make_node("Add", ["p", "input"], ["out"], name="residual"),
    ]
    graph = helper.make_graph(
        nodes,
        "block",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 4, 8, 8])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 4, 8, 8])],
        initializer=[
            numpy_helper.from_array(w_e, "w_e"),
            numpy_helper.from_array(w_p, "w_p"),
            numpy_helper.from_array(np.float32(0), "lo"),
            numpy_helper.from_array(np.float32(6), "hi"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "block.onnx"))
    x = rng.normal(0, 1, (8, 4, 8, 8)).astype(np.float32)
    q = onnx.load(str(quantize_int8(tmp_path / "block.onnx", tmp_path / "q.onnx", x, method="minmax")))
    groups = float_groups(q, {"expand": "pointwise", "project": "pointwise"}, model)
    assert groups == {
        "pointwise + activation": ["expand"],
        "pointwise, linear": ["project"],
        "residual add": ["residual"],
    }


def test_score_drop_points_stands_in_disagreement_without_labels():
    assert Score(agreement=0.96, kl=0.0).drop_points == pytest.approx(4.0)
    assert Score(agreement=0.96, kl=0.0, top1=0.8, top1_drop_points=0.5).drop_points == 0.5


def test_label_preserving_views_are_the_image_its_flip_and_a_centre_zoom():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 20, 20)).astype(np.float32)
    v = label_preserving_views(x, zoom=0.5)
    assert v.shape == (8, 3, 20, 20) and v.dtype == np.float32
    np.testing.assert_array_equal(v[:2], x)
    np.testing.assert_array_equal(v[2:4], x[..., ::-1])
    np.testing.assert_array_equal(v[6:8], v[4:6][..., ::-1])
    # on a linear ramp bilinear resizing is exact away from the border: the zoom is the centre 10x10 (rows and
    # columns 5-14) stretched 2x, output pixel p sampling crop coordinate (p + 0.5) / 2 - 0.5 (half-pixel centres)
    ramp = np.broadcast_to(np.arange(20, dtype=np.float32), (1, 3, 20, 20)).copy()
    zoomed = label_preserving_views(ramp, zoom=0.5)[2]
    p = np.arange(1, 19)
    np.testing.assert_allclose(
        zoomed[:, 0, 1:19], np.broadcast_to(5 + (p + 0.5) / 2 - 0.5, (3, 18)), atol=1e-5
    )
    with pytest.raises(ValueError, match=r"float32 \[N, C, H, W\]"):
        label_preserving_views(x.astype(np.float64))
    with pytest.raises(ValueError, match="zoom"):
        label_preserving_views(x, zoom=0)
