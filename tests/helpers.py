"""Test helpers: tiny ONNX graphs built with onnx.helper, synthetic manifests and perf_analyzer points."""

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


def tiny_layered_classifier(
    path, *, outlier_scale: float = 1.0, size: int = 16, classes: int = 10, seed: int = 0
) -> str:
    """One layer of every kind, for the layer analysis (tcsched.build_tools.analysis).

    ``input`` float32 [N, 3, size, size] ->
    ``stem`` Conv 3->16 3x3 stride 2 pad 1 (full) -> Relu ->
    ``pw`` Conv 16->12 1x1 (pointwise) -> Relu ->
    ``dw`` Conv 12->12 3x3 pad 1 group 12 (depthwise) -> Relu -> GlobalAveragePool -> Flatten ->
    ``fc1`` Gemm 12->256 (transB=1) -> Relu -> ``fc2`` Gemm 256->256 (transB=0, weight [in, out]) -> Relu ->
    ``fc3`` Gemm 256->classes (transB=1) -> ``logits`` float32 [N, classes]. Dynamic batch ``N``.

    ``outlier_scale`` multiplies the stem's output channel 0 (weight and bias) and divides ``pw``'s weights on
    input channel 0 by the same factor: the fp32 function is unchanged, but ``pw``'s input activation gets a huge
    dynamic range (one channel ``outlier_scale`` times larger than the others), so a per-tensor uint8
    quantization of that input wipes out the other channels: ``pw`` becomes the INT8-sensitive layer.
    """
    rng = np.random.default_rng(seed)
    w_stem = rng.normal(0, 0.3, (16, 3, 3, 3)).astype(np.float32)
    b_stem = rng.normal(0.1, 0.05, 16).astype(np.float32)
    w_pw = rng.normal(0, 0.3, (12, 16, 1, 1)).astype(np.float32)
    b_pw = rng.normal(0, 0.05, 12).astype(np.float32)
    w_stem[0] *= outlier_scale
    b_stem[0] *= outlier_scale
    w_pw[:, 0] /= outlier_scale
    w_dw = rng.normal(0, 0.3, (12, 1, 3, 3)).astype(np.float32)
    w_fc1 = rng.normal(0, 0.3, (256, 12)).astype(np.float32)
    b_fc1 = rng.normal(0, 0.05, 256).astype(np.float32)
    w_fc2 = rng.normal(0, 0.1, (256, 256)).astype(np.float32)  # [in, out]: transB=0
    w_fc3 = rng.normal(0, 0.1, (classes, 256)).astype(np.float32)
    b_fc3 = rng.normal(0, 0.05, classes).astype(np.float32)
    inits = {
        "w_stem": w_stem,
        "b_stem": b_stem,
        "w_pw": w_pw,
        "b_pw": b_pw,
        "w_dw": w_dw,
        "w_fc1": w_fc1,
        "b_fc1": b_fc1,
        "w_fc2": w_fc2,
        "w_fc3": w_fc3,
        "b_fc3": b_fc3,
    }
    mk = helper.make_node
    nodes = [
        mk("Conv", ["input", "w_stem", "b_stem"], ["c_stem"], name="stem", pads=[1, 1, 1, 1], strides=[2, 2]),
        mk("Relu", ["c_stem"], ["r_stem"], name="relu_stem"),
        mk("Conv", ["r_stem", "w_pw", "b_pw"], ["c_pw"], name="pw"),
        mk("Relu", ["c_pw"], ["r_pw"], name="relu_pw"),
        mk("Conv", ["r_pw", "w_dw"], ["c_dw"], name="dw", pads=[1, 1, 1, 1], group=12),
        mk("Relu", ["c_dw"], ["r_dw"], name="relu_dw"),
        mk("GlobalAveragePool", ["r_dw"], ["gap"], name="gap"),
        mk("Flatten", ["gap"], ["flat"], name="flatten"),
        mk("Gemm", ["flat", "w_fc1", "b_fc1"], ["h1"], name="fc1", transB=1),
        mk("Relu", ["h1"], ["r1"], name="relu_fc1"),
        mk("Gemm", ["r1", "w_fc2"], ["h2"], name="fc2"),
        mk("Relu", ["h2"], ["r2"], name="relu_fc2"),
        mk("Gemm", ["r2", "w_fc3", "b_fc3"], ["logits"], name="fc3", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_layered",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])],
        initializer=[numpy_helper.from_array(a, n) for n, a in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return str(path)


class FakeBLS:
    """Stands in for the scheduler's BLS call (a mock of what only Triton runs): records (variant, rows) calls,
    raises for the ``failing`` variants, and answers with :meth:`logits`."""

    def __init__(self, failing=()):
        self.calls = []
        self.failing = set(failing)

    def logits(self, variant: str, batch: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def __call__(self, variant, batch):
        self.calls.append((variant, len(batch)))
        if variant in self.failing:
            raise RuntimeError(f"{variant} is down")
        return self.logits(variant, batch)


def perf_point(target: str, model: str, served: dict[str, int], ips: float = 100.0, load: int = 1):
    """A :class:`tcsched.client.perf_analyzer.PerfPoint` of ``target`` on ``model`` at ``ips`` img/s whose server
    statistics say each model of ``served`` ran that many inferences (fixed latencies: p50 10 ms, p99 13 ms)."""
    from tcsched.client.perf_analyzer import PerfPoint
    from tcsched.client.perf_analyzer.parsers import ServerBreakdown
    from tcsched.client.perf_analyzer.stats import StatsDelta

    stats = {v: StatsDelta(n, n, n, 0, 1.0, 0.1, 0.1, 0.5, 0.1) for v, n in served.items()}
    return PerfPoint(
        target=target,
        model=model,
        mode="concurrency",
        load=load,
        request_parameters={},
        throughput_infer_per_s=ips,
        p50_ms=10.0,
        p90_ms=11.0,
        p95_ms=12.0,
        p99_ms=13.0,
        avg_latency_ms=10.0,
        client_send_ms=0.1,
        network_server_send_recv_ms=0.2,
        client_recv_ms=0.1,
        server=ServerBreakdown(1.0, 0.1, 5.0, 0.1),
        server_stats=stats,
    )
