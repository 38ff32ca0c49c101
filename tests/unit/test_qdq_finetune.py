"""Quantization-aware fine-tune of a QDQ graph (build_tools/qdq_finetune.py) on tiny graphs, CPU."""

import numpy as np
import onnx
import pytest
from onnx import helper

from tcsched.build_tools.qdq_finetune import QDQTorchGraph, augment_batch, distill_qdq
from tcsched.build_tools.quantize import quantize_int8
from tcsched.metrics import mean_kl
from tcsched.ort_runtime import OrtClassifier
from tests.helpers import tiny_classifier


@pytest.fixture
def tiny(tmp_path):
    fp32 = tiny_classifier(tmp_path / "tiny.onnx", classes=10, channels=8)
    rng = np.random.default_rng(1)
    calib = rng.normal(0, 1, (32, 3, 32, 32)).astype(np.float32)
    int8 = quantize_int8(fp32, tmp_path / "int8.onnx", calib, method="minmax")
    return fp32, int8, calib


def test_torch_graph_computes_what_onnx_runtime_computes(tiny):
    import torch

    _, int8, calib = tiny
    g = QDQTorchGraph(onnx.load(str(int8)))
    with torch.no_grad():
        y = g(torch.from_numpy(calib)).numpy()
    ref = OrtClassifier(int8)(calib)
    # same quantized arithmetic; ORT's integer kernels round the requantization slightly differently
    assert np.abs(y - ref).max() < 0.05 * np.abs(ref).max()
    # untouched weights export to exactly the same initializers
    exported = g.export()
    before = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(int8)).graph.initializer}
    for i in exported.graph.initializer:
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(i), before[i.name])


def test_distillation_lowers_kl_and_keeps_the_graph(tiny):
    fp32, int8, calib = tiny
    teacher = OrtClassifier(fp32)
    rng = np.random.default_rng(2)
    held_out = rng.normal(0, 1, (64, 3, 32, 32)).astype(np.float32)
    # spoil the rounding of every int8 weight by up to 3 steps: what the fine-tune must learn back
    qdq = onnx.load(str(int8))
    for init in qdq.graph.initializer:
        if init.data_type == onnx.TensorProto.INT8 and init.dims:
            w = onnx.numpy_helper.to_array(init).astype(np.int32)
            w = np.clip(w + rng.integers(-3, 4, w.shape), -127, 127).astype(np.int8)
            init.CopyFrom(onnx.numpy_helper.from_array(w, init.name))
    spoiled = str(int8).replace("int8.onnx", "spoiled.onnx")
    onnx.save(qdq, spoiled)
    losses = []
    tuned = distill_qdq(
        qdq,
        calib,
        teacher,
        steps=60,
        batch_size=16,
        lr=0.1,
        on_step=lambda i, loss: losses.append(loss),
    )
    assert len(losses) == 60
    # same nodes, same quantization parameters: only weight/bias values may change
    assert [(n.op_type, list(n.input), list(n.output)) for n in tuned.graph.node] == [
        (n.op_type, list(n.input), list(n.output)) for n in qdq.graph.node
    ]
    old = {i.name: onnx.numpy_helper.to_array(i) for i in qdq.graph.initializer}
    changed = [
        i.name
        for i in tuned.graph.initializer
        if not np.array_equal(onnx.numpy_helper.to_array(i), old[i.name])
    ]
    assert changed and all("quantized" in n and "scale" not in n and "zero_point" not in n for n in changed)
    ref = teacher(held_out)
    kl_before = mean_kl(ref, OrtClassifier(spoiled)(held_out))
    path = str(int8).replace("int8.onnx", "tuned.onnx")
    onnx.save(tuned, path)
    kl_after = mean_kl(ref, OrtClassifier(path)(held_out))
    assert kl_after < 0.5 * kl_before, (kl_before, kl_after)


def test_unsupported_graphs_and_arguments_fail_before_training(tiny):
    fp32, int8, calib = tiny
    qdq = onnx.load(str(int8))
    teacher = OrtClassifier(fp32)
    with pytest.raises(ValueError, match="images"):
        distill_qdq(qdq, calib[0], teacher, steps=1)
    with pytest.raises(ValueError, match="steps"):
        distill_qdq(qdq, calib, teacher, steps=0)
    bad = onnx.load(str(int8))
    bad.graph.node.append(helper.make_node("Softmax", ["logits"], ["probs"], name="softmax"))
    with pytest.raises(ValueError, match="Softmax"):
        QDQTorchGraph(bad)


def test_augmented_batches_keep_shape_and_stay_within_the_images_values():
    import torch

    x = torch.from_numpy(np.random.default_rng(0).normal(0, 1, (4, 3, 32, 32)).astype(np.float32))
    y = augment_batch(x, np.random.default_rng(1))
    assert y.shape == x.shape and not torch.equal(y, x)
    # bilinear resizing interpolates: no value outside the batch's range
    assert y.min() >= x.min() - 1e-5 and y.max() <= x.max() + 1e-5


def test_seven_bit_weights_stay_seven_bit(tiny, tmp_path):
    """A graph quantized with reduce_range (for x86 without VNNI) keeps its weights in [-64, 64] when trained,
    its depthwise weights in [-127, 127]."""
    import torch

    from tcsched.build_tools.quantize import int8_weight_bits

    fp32, _, calib = tiny
    seven = quantize_int8(fp32, tmp_path / "7.onnx", calib, method="minmax", reduce_range=True)
    g = QDQTorchGraph(onnx.load(str(seven)))
    with torch.no_grad():
        for p in g.weight_parameters():
            p.mul_(3.0)  # far outside the 7-bit range: clamped, not exported as 8-bit
    out = g.export()
    assert int8_weight_bits(out) == 7
    widest = {
        i.name: int(np.abs(onnx.numpy_helper.to_array(i).astype(np.int16)).max())
        for i in out.graph.initializer
        if i.name in ("w1_quantized", "w2_quantized", "w3_quantized")
    }
    # the depthwise Conv's weights train in the 8-bit range, the others in the 7-bit one
    assert widest["w2_quantized"] > 64 and widest["w1_quantized"] <= 64 and widest["w3_quantized"] <= 64
    eight = quantize_int8(fp32, tmp_path / "8.onnx", calib, method="minmax", reduce_range=False)
    g = QDQTorchGraph(onnx.load(str(eight)))
    assert int8_weight_bits(g.export()) == 8
