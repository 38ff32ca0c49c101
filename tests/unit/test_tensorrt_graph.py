"""The graph TensorRT compiles for a Q/DQ variant (build_tools/tensorrt_graph.py): Q/DQ placement on residual
Adds per TensorRT's guide, symmetric int8, and its accuracy measured on its own and carried into the GPU manifest.

Real ONNX Runtime quantization and inference on real photos (scikit-image's); only the TensorRT build of the GPU
conversion is FAKE (tests/unit/fake_gpu.py)."""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from tcsched.build_tools import build as b
from tcsched.build_tools import gpu_repository as g
from tcsched.build_tools import repository as r
from tcsched.build_tools import tensorrt_engine as te
from tcsched.build_tools.quantize import producers, quantize_int8, to_symmetric_int8
from tcsched.build_tools.tensorrt_graph import (
    TENSORRT_GRAPH_FILENAME,
    quantize_residual_inputs_only,
    tensorrt_form,
    write_tensorrt_form,
)
from tcsched.data import default_photos
from tcsched.imaging import preprocess_bytes
from tcsched.manifest import Manifest
from tcsched.metrics import mean_kl, top1_agreement
from tcsched.ort_runtime import OrtClassifier
from tests.helpers import make_manifest, tiny_classifier
from tests.unit.fake_gpu import FakeEngines, patch_engines
from tests.unit.residual_graph import residual_classifier


@pytest.fixture(scope="module")
def photos() -> np.ndarray:
    return np.stack([preprocess_bytes(it.read_bytes()) for it in default_photos()]).astype(np.float32)


@pytest.fixture(scope="module")
def residual_int8(tmp_path_factory, photos) -> tuple[Path, Path]:
    """(fp32 graph, ONNX Runtime's uint8 QDQ graph of it), calibrated on the photos."""
    root = tmp_path_factory.mktemp("residual")
    fp32 = Path(residual_classifier(root / "fp32.onnx"))
    return fp32, quantize_int8(fp32, root / "int8.onnx", photos, method="minmax")


def _add_inputs(model: onnx.ModelProto) -> list[list[str]]:
    """Per Add: the op type feeding each input, and for a DequantizeLinear the op behind its QuantizeLinear."""
    prod = producers(model.graph)
    out = []
    for add in (n for n in model.graph.node if n.op_type == "Add"):
        kinds = []
        for i in add.input:
            p = prod[i]
            if p.op_type == "DequantizeLinear":
                q = prod[p.input[0]]
                kinds.append(f"DQ(Q({prod[q.input[0]].op_type}))")
            else:
                kinds.append(p.op_type)
        out.append(kinds)
    return out


def test_onnxruntime_quantizes_both_inputs_of_every_residual_add(residual_int8):
    _, q = residual_int8
    # ONNX Runtime folds the stem's ReLU6 into its Q range, so both inputs of the first Add are DQ(Q(Conv))
    assert _add_inputs(onnx.load(str(q))) == [["DQ(Q(Conv))", "DQ(Q(Conv))"], ["DQ(Q(Add))", "DQ(Q(Conv))"]]


def test_residual_adds_are_quantized_on_the_residual_input_only(residual_int8):
    """TensorRT's guide: the Conv feeds the Add directly (Conv + Add + Q fuse into one INT8 kernel) and only the
    residual input keeps its Q/DQ; the residual's DQ still also feeds the block's first Conv."""
    _, q = residual_int8
    model = onnx.load(str(q))
    placed, n = quantize_residual_inputs_only(model)
    assert n == 2
    onnx.checker.check_model(placed)
    kinds = _add_inputs(placed)
    assert [k[1] for k in kinds] == ["Conv", "Conv"]  # the projection Conv's float output, no Q/DQ
    assert all(k[0].startswith("DQ(Q(") for k in kinds)  # the residual keeps its quantization
    prod = producers(placed.graph)
    for add in (x for x in placed.graph.node if x.op_type == "Add"):
        conv = prod[add.input[1]]
        assert conv.name.endswith("_project") and prod[conv.input[0]].op_type == "DequantizeLinear"
        skip_dq = add.input[0]
        assert (
            sum(skip_dq in x.input for x in placed.graph.node) == 2
        )  # the Add and the next block's expansion
    count = lambda m, op: sum(x.op_type == op for x in m.graph.node)  # noqa: E731
    assert count(placed, "QuantizeLinear") == count(model, "QuantizeLinear") - 2
    assert count(placed, "DequantizeLinear") == count(model, "DequantizeLinear") - 2
    used = {i for x in placed.graph.node for i in x.input}
    assert all(t.name in used for t in placed.graph.initializer)  # the removed pairs' scales are gone
    again, n2 = quantize_residual_inputs_only(placed)
    assert n2 == 0 and again == placed  # idempotent: the Conv sides are float already


def test_tensorrt_form_of_a_residual_graph(residual_int8, tmp_path, photos):
    fp32, q = residual_int8
    form = write_tensorrt_form(q, tmp_path / "1" / TENSORRT_GRAPH_FILENAME)
    assert form is not None and form.residual_adds == 2 and form.symmetric_pairs > 0
    assert "2 residual Adds" in form.note and "127 steps instead of 255" in form.note
    assert te.tensorrt_qdq_problems(form.path) == []
    assert te.tensorrt_qdq_problems(q)  # the uint8 graph: rejected by TensorRT's parser
    ref = OrtClassifier(fp32)(photos)
    got = OrtClassifier(form.path)(photos)
    # the same function up to quantization: as close to fp32 as a few 8-bit steps
    assert np.abs(got - ref).max() < 0.25 * np.abs(ref).max()
    assert (
        write_tensorrt_form(fp32, tmp_path / "unused.onnx") is None
        and not (tmp_path / "unused.onnx").exists()
    )
    with pytest.raises(ValueError, match="does not exist"):
        write_tensorrt_form(tmp_path / "missing.onnx", tmp_path / "x.onnx")


def test_onnxruntime_uint8_int8_is_made_symmetric_for_tensorrt(tmp_path):
    """The CPU build's int8 (uint8 asymmetric activations, int32 biases) is re-expressed for TensorRT: symmetric
    int8 with the same calibrated ranges; ONNX Runtime still runs it and agrees with the uint8 graph."""
    calib = np.random.default_rng(0).normal(size=(16, 3, 32, 32)).astype(np.float32)
    fp32 = tiny_classifier(tmp_path / "tiny.onnx")
    q = quantize_int8(fp32, tmp_path / "int8.onnx", calib, method="minmax")
    original = onnx.load(str(q))
    sym, n = to_symmetric_int8(original)
    assert n > 0
    before = {i.name: numpy_helper.to_array(i) for i in original.graph.initializer}
    after = {i.name: numpy_helper.to_array(i) for i in sym.graph.initializer}
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
    assert not any(i.data_type == onnx.TensorProto.INT32 for i in sym.graph.initializer)  # biases folded
    form, adds, _ = tensorrt_form(original)
    assert adds == 0  # no residual Add in this graph: the TensorRT form is the symmetric graph
    path = tmp_path / "sym.onnx"
    onnx.save(form, str(path))
    ref, a, c = OrtClassifier(fp32)(calib), OrtClassifier(q)(calib), OrtClassifier(path)(calib)
    err_u8, err_sym = np.abs(a - ref).max(), np.abs(c - ref).max()
    assert err_sym < 4 * err_u8 + 1e-3, (err_u8, err_sym)  # at most one bit coarser, not a different function


def test_build_measures_the_tensorrt_graph_and_the_gpu_manifest_records_it(
    tmp_path, monkeypatch, residual_int8, photos
):
    """The build writes the TensorRT form beside the int8 model and measures it with ONNX Runtime like the variant
    (build._tensorrt_graph); the GPU conversion compiles exactly that file and its manifest carries exactly
    those figures, not the uint8 graph's."""
    fp32, q = residual_int8
    repo = tmp_path / "cpu"
    opts = r.ServingOptions(max_batch_size=8, pixels="float32")  # TensorRT engines take float32 graphs
    for name, path in (("mobilenet_v2_fp32", fp32), ("mobilenet_v2_int8", q)):
        r.write_variant(repo, name, path, opts, classes=10)
    r.write_pipeline(repo, [f"class {i}" for i in range(10)], opts)
    ref_logits = OrtClassifier(fp32).predict(photos)
    u8_logits = OrtClassifier(q).predict(photos)
    measurements = types.SimpleNamespace(eval_labels=None, eval_description="scikit-image photos")
    ctx = types.SimpleNamespace(cfg=types.SimpleNamespace(threads=1), eval_images=photos)
    ref = types.SimpleNamespace(eval_logits=ref_logits)
    measured = {}
    for name, path in (("mobilenet_v2_fp32", fp32), ("mobilenet_v2_int8", q)):
        m = types.SimpleNamespace(model_name=name, variant=types.SimpleNamespace(path=path))
        measured[name] = b._tensorrt_graph(repo, m, ref, measurements, ctx)
    assert measured["mobilenet_v2_fp32"] is None  # no Q/DQ: TensorRT compiles the CPU graph itself
    tg = measured["mobilenet_v2_int8"]
    assert tg.file == f"mobilenet_v2_int8/1/{TENSORRT_GRAPH_FILENAME}" and "residual Adds" in tg.note
    trt_logits = OrtClassifier(repo / tg.file).predict(photos)
    assert tg.accuracy.agreement_with_fp32 == top1_agreement(ref_logits, trt_logits)
    assert tg.accuracy.kl_vs_fp32 == pytest.approx(mean_kl(ref_logits, trt_logits))
    assert tg.accuracy.n_images == len(photos) and tg.accuracy.dataset == "scikit-image photos"
    u8 = b._accuracy(u8_logits, ref_logits, measurements)
    assert u8.kl_vs_fp32 != pytest.approx(tg.accuracy.kl_vs_fp32)  # another graph, other figures

    manifest = make_manifest(
        {"mobilenet_v2_fp32": ("fp32", 0.0, {1: 5.0}), "mobilenet_v2_int8": ("int8", 0.5, {1: 3.0})}
    )
    manifest.variant("int8").accuracy = u8
    manifest.variant("int8").tensorrt_graph = tg
    manifest.write(repo / "manifest.json")
    fake = FakeEngines({"fp32": 1.0, "int8": 0.4})
    patch_engines(monkeypatch, fake)
    gpu = g.convert_to_gpu_repository(repo, tmp_path / "gpu", timing_cache=tmp_path / "c", latency_repeats=1)
    assert gpu.variant("int8").accuracy == tg.accuracy != u8
    assert gpu.variant("int8").tensorrt_graph is None  # the GPU entry's graph is the engine's onnx_file
    compiled = {name: data for name, _, _, data in fake.builds}
    assert compiled["mobilenet_v2_int8"] == (repo / tg.file).read_bytes()
    assert compiled["mobilenet_v2_fp32"] == Path(fp32).read_bytes()
    e = gpu.variant("int8").engine
    assert (tmp_path / "gpu" / e.onnx_file).read_bytes() == (repo / tg.file).read_bytes()
    assert any("residual Adds" in n for n in gpu.variant("int8").build_notes)
    assert Manifest.read(tmp_path / "gpu" / "manifest.json") == gpu
