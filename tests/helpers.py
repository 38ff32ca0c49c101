"""Test helpers: tiny ONNX graphs built with onnx.helper, and synthetic manifests."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tcsched.manifest import AccuracyReport, LatencyReport, Manifest, TensorSpec, VariantEntry


def tiny_classifier(path, classes: int = 10, channels: int = 8, seed: int = 0) -> str:
    """Conv(3->C, 3x3, stride 2) -> Relu -> depthwise Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm.

    Input ``input`` float32 [N, 3, 32, 32], output ``logits`` float32 [N, classes]. Dynamic batch.
    """
    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 0.3, (channels, 3, 3, 3)).astype(np.float32)
    b1 = rng.normal(0, 0.1, channels).astype(np.float32)
    w2 = rng.normal(0, 0.3, (channels, 1, 3, 3)).astype(np.float32)
    w3 = rng.normal(0, 0.3, (classes, channels)).astype(np.float32)
    b3 = rng.normal(0, 0.1, classes).astype(np.float32)
    nodes = [
        helper.make_node(
            "Conv", ["input", "w1", "b1"], ["c1"], name="stem_conv", pads=[1, 1, 1, 1], strides=[2, 2]
        ),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="dw_conv", pads=[1, 1, 1, 1], group=channels),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "w3", "b3"], ["logits"], name="classifier", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])],
        initializer=[
            numpy_helper.from_array(a, n)
            for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (w3, "w3"), (b3, "b3"))
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return str(path)


def make_manifest(specs: dict[str, tuple[str, float, dict[int, float]]], target="cpu") -> Manifest:
    """specs: name -> (precision, top1 drop points, p50 ms by batch). The fp32 one is the reference."""
    variants = []
    for name, (prec, drop, lat) in specs.items():
        variants.append(
            VariantEntry(
                name=name,
                precision=prec,
                file=f"{name}/1/model.onnx",
                size_bytes=1,
                accuracy=AccuracyReport(
                    dataset="t",
                    n_images=100,
                    top1=0.8 - drop / 100,
                    top5=0.9,
                    agreement_with_fp32=1 - drop / 100,
                    kl_vs_fp32=0.01,
                    top1_drop_points=drop,
                ),
                latency=LatencyReport(device="cpu", runtime="onnxruntime", p50_ms_by_batch=lat),
                serve_on_cpu_for_speed=prec != "fp16",
            )
        )
    ref = next(n for n, s in specs.items() if s[0] == "fp32")
    return Manifest(
        source_model="test",
        input=TensorSpec(name="input", dtype="float32", shape=[3, 224, 224]),
        output=TensorSpec(name="logits", dtype="float32", shape=[1000]),
        max_batch_size=8,
        reference_variant=ref,
        variants=variants,
        target=target,
    )
