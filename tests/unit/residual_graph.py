"""A tiny MobileNetV2-like classifier with residual Adds, built with onnx.helper (tests of the TensorRT graph)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def residual_classifier(path, classes: int = 10, width: int = 8, seed: int = 0) -> str:
    """``input`` float32 [N, 3, 224, 224] -> stem Conv 3->W 3x3 stride 4 + ReLU6 -> two inverted-residual blocks
    (1x1 expand W->2W + ReLU6, 3x3 depthwise + ReLU6, 1x1 project 2W->W, ``Add`` with the block's input) ->
    GlobalAveragePool -> Flatten -> Gemm -> ``logits`` float32 [N, classes]. Dynamic batch. Two residual Adds:
    the first one's skip is the stem's output (also read by block 1's expansion), the second one's is the first
    Add's output (also read by block 2's expansion), as in MobileNetV2.
    """
    rng = np.random.default_rng(seed)
    inits: dict[str, np.ndarray] = {}

    def w(name, *shape, scale=0.3):
        inits[name] = rng.normal(0, scale, shape).astype(np.float32)
        return name

    six = numpy_helper.from_array(np.float32(6.0), "six")
    zero = numpy_helper.from_array(np.float32(0.0), "zero")
    nodes = [
        helper.make_node("Conv", ["input", w("ws", width, 3, 3, 3), w("bs", width, scale=0.1)], ["s"],
                         name="stem", pads=[1, 1, 1, 1], strides=[4, 4]),
        helper.make_node("Clip", ["s", "zero", "six"], ["x0"], name="stem_relu6"),
    ]  # fmt: skip
    x = "x0"
    for k in (1, 2):
        e, d, p = f"b{k}_expand", f"b{k}_dw", f"b{k}_project"
        nodes += [
            helper.make_node("Conv", [x, w(f"{e}_w", 2 * width, width, 1, 1), w(f"{e}_b", 2 * width, scale=0.1)],
                             [f"{e}_c"], name=e),
            helper.make_node("Clip", [f"{e}_c", "zero", "six"], [f"{e}_r"], name=f"{e}_relu6"),
            helper.make_node("Conv", [f"{e}_r", w(f"{d}_w", 2 * width, 1, 3, 3), w(f"{d}_b", 2 * width, scale=0.1)],
                             [f"{d}_c"], name=d, pads=[1, 1, 1, 1], group=2 * width),
            helper.make_node("Clip", [f"{d}_c", "zero", "six"], [f"{d}_r"], name=f"{d}_relu6"),
            helper.make_node("Conv", [f"{d}_r", w(f"{p}_w", width, 2 * width, 1, 1), w(f"{p}_b", width, scale=0.1)],
                             [f"{p}_c"], name=p),
            helper.make_node("Add", [x, f"{p}_c"], [f"b{k}_out"], name=f"b{k}_add"),
        ]  # fmt: skip
        x = f"b{k}_out"
    nodes += [
        helper.make_node("GlobalAveragePool", [x], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", w("wc", classes, width), w("bc", classes, scale=0.1)], ["logits"],
                         name="classifier", transB=1),
    ]  # fmt: skip
    graph = helper.make_graph(
        nodes,
        "residual",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 224, 224])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])],
        initializer=[six, zero, *(numpy_helper.from_array(a, n) for n, a in inits.items())],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return str(path)
