"""Strategy decision, INT8: static QDQ quantization with ONNX Runtime's quantization tools.

The int8 graph is plain ONNX with QuantizeLinear/DequantizeLinear pairs: ONNX Runtime runs it on the CPU and
TensorRT compiles the same graph into an INT8 engine (explicit quantization, strongly typed network).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import onnx

from tcsched.engines.capabilities import INT8_FULL_RANGE, cpu_capabilities

CalibMethod = Literal["minmax", "percentile", "entropy"]
# ``percentile`` without a value: the 99.999th percentile of |x| (ONNX Runtime's CalibPercentile default)
DEFAULT_PERCENTILE = 99.999


def parse_calib_method(spec: str) -> tuple[CalibMethod, float]:
    """``minmax`` | ``percentile`` | ``percentile:P`` (P in (90, 100), default 99.999) -> (method, percentile).

    Raises:
        ValueError: anything else (``entropy`` through quantize_static silently equals minmax: refused).
    """
    name, _, arg = spec.partition(":")
    if name == "minmax" and not arg:
        return "minmax", 100.0
    if name == "percentile":
        try:
            p = float(arg) if arg else DEFAULT_PERCENTILE
        except ValueError:
            raise ValueError(f"bad percentile in {spec!r}") from None
        if not 90 < p < 100:
            raise ValueError(f"percentile must be in (90, 100), got {p}")
        return "percentile", p
    raise ValueError(
        f"unknown calibration method {spec!r}; expected minmax, percentile or percentile:P "
        "(entropy through quantize_static silently equals minmax)"
    )


class ArrayCalibrationReader:
    """ONNX Runtime ``CalibrationDataReader`` over a float32 array [N, 3, H, W], up to ``batch_size`` images a call
    (all batches the same size).

    Calibration data is an iterable of ``dict[str, np.ndarray]`` (ONNX Runtime's convention).
    """

    def __init__(self, input_name: str, images: np.ndarray, batch_size: int = 8):
        if images.ndim != 4 or images.dtype != np.float32:
            raise ValueError(
                f"calibration images must be float32 [N, C, H, W], got {images.dtype} {images.shape}"
            )
        if len(images) == 0:
            raise ValueError("calibration needs at least one image")
        self.input_name = input_name
        self.images = images
        # equal batches only: ONNX Runtime's histogram calibrators stack the collected outputs of every batch
        # and fail on a shorter last batch; the largest divisor of N not above batch_size
        self.batch_size = max(b for b in range(1, batch_size + 1) if len(images) % b == 0)
        self._it: Iterator[dict[str, np.ndarray]] | None = None

    def _gen(self) -> Iterator[dict[str, np.ndarray]]:
        for i in range(0, len(self.images), self.batch_size):
            yield {self.input_name: self.images[i : i + self.batch_size]}

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._it is None:
            self._it = self._gen()
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = None

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self._gen()


def quantize_int8(
    fp32_model: str | os.PathLike,
    output: str | os.PathLike,
    calibration: np.ndarray,
    input_name: str = "input",
    method: CalibMethod = "percentile",
    percentile: float = DEFAULT_PERCENTILE,
    nodes_to_exclude: Sequence[str] = (),
    op_types: Iterable[str] | None = None,
    reduce_range: bool | None = None,
) -> Path:
    """Write a QDQ int8 model: per-channel int8 weights, uint8 activations (asymmetric).

    Args:
        fp32_model: the fp32 ONNX graph.
        output: where to write the int8 graph.
        calibration: float32 [N, 3, H, W] preprocessed images.
        method: ``minmax``; ``percentile`` (``percentile`` of |x|, histogram-based); ``entropy`` (KL, TensorRT's
            method, with 2048 bins passed through so that it is not silently MinMax).
        nodes_to_exclude: node names kept in float (the layer-aware mixed variant uses this).
        op_types: operator types to quantize (``None``: every type ONNX Runtime can quantize, so that Clip folds
            into the ranges and residual Adds stay int8; Conv/Gemm only leaves float islands that cost speed).
        reduce_range: 7-bit weights (ONNX Runtime's ``reduce_range``), for x86 CPUs without VNNI, where 8-bit
            weights saturate the u8s8 GEMM kernels (:data:`tcsched.engines.capabilities.VNNI_FLAGS`); depthwise
            Conv weights keep 8 bits (:func:`depthwise_weights`). ``None``: 7-bit exactly when this CPU is one
            (``CpuCapabilities.int8_saturates``).

    Raises:
        ValueError: unknown method or a bad calibration array (before any work).
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    methods = {
        "minmax": CalibrationMethod.MinMax,
        "percentile": CalibrationMethod.Percentile,
        "entropy": CalibrationMethod.Entropy,
    }
    if method == "entropy":
        raise ValueError(
            "calibration method 'entropy' is refused: through quantize_static, ONNX Runtime's entropy calibrator "
            "ignores the bin options and gives exactly MinMax's ranges (measured here: identical scores); use "
            "'minmax' or 'percentile'"
        )
    if method not in methods:
        raise ValueError(f"unknown calibration method {method!r}; expected one of {sorted(methods)}")
    if reduce_range is None:
        reduce_range = cpu_capabilities().int8_saturates
    reader = ArrayCalibrationReader(input_name, calibration)
    extra: dict = {"ActivationSymmetric": False, "WeightSymmetric": True}
    if method == "percentile":
        extra |= {"CalibPercentile": percentile, "CalibNumBins": 2048}
    elif method == "entropy":
        extra |= {"CalibNumBins": 2048, "CalibNumQuantizedBins": 128}
    output = Path(output)
    with tempfile.TemporaryDirectory(prefix="tcsched-quant-") as tmp:
        prepped = Path(tmp) / "prepped.onnx"
        quant_pre_process(str(fp32_model), str(prepped), skip_symbolic_shape=True)
        if reduce_range:  # depthwise weights keep 8 bits: their kernels accumulate in int32
            dw = depthwise_weights(onnx.load(str(prepped), load_external_data=False))
            extra["TensorQuantOverrides"] = {
                name: [{"axis": 0, "reduce_range": False}] for name in sorted(dw)
            }
        quantize_static(
            str(prepped),
            str(output),
            reader,
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(op_types) if op_types else None,
            per_channel=True,
            reduce_range=reduce_range,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=methods[method],
            nodes_to_exclude=list(nodes_to_exclude),
            extra_options=extra,
        )
    model = onnx.load(str(output))
    if strip_output_qdq(model):
        onnx.save(model, str(output))
    return output


REDUCED_WEIGHT_MAX = 64  # |int8 weight| bound of reduce_range's symmetric weights (onnxruntime qmin/qmax)


def depthwise_weights(model: onnx.ModelProto) -> set[str]:
    """Names of the weights of depthwise Convs (``group`` > 1, one input channel per group), as initializers or
    behind the DequantizeLinear that reads them.

    Their int8 kernels do not saturate with 8-bit weights on any CPU: ONNX Runtime's MLAS depthwise kernels
    (``onnxruntime/core/mlas/lib/qdwconv*.cpp``) widen inputs and weights to int16, subtract the zero points
    and accumulate the products in int32, unlike the u8s8 GEMM's pairwise int16 sums (``vpmaddubsw``) on x86
    without VNNI. Measured here (AVX2, MobileNetV2, 256 images): 8-bit depthwise weights with 7-bit elsewhere
    agree with fp32 as often as unsaturated 8-bit QDQ emulated in float (93.0%).
    """
    inits = {i.name: i for i in model.graph.initializer}
    behind = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    out = set()
    for n in model.graph.node:
        if n.op_type != "Conv" or len(n.input) < 2:
            continue
        group = next((a.i for a in n.attribute if a.name == "group"), 1)
        name = behind.get(n.input[1], n.input[1])
        w = inits.get(name)
        if w is not None and group > 1 and len(w.dims) > 1 and w.dims[1] == 1:
            out.add(name)
    return out


def int8_weight_bits(model: onnx.ModelProto) -> int | None:
    """8 when some int8 weight initializer behind a DequantizeLinear, depthwise Convs' aside
    (:func:`depthwise_weights`), reaches outside [-64, 64], 7 when every one stays inside (``reduce_range``'s
    symmetric range: with uint8 activations, 2 x 255 x 64 fits int16), None without int8 weights."""
    inits = {i.name: i for i in model.graph.initializer}
    dw = depthwise_weights(model)
    widest = None
    for n in model.graph.node:
        t = inits.get(n.input[0]) if n.op_type == "DequantizeLinear" and n.input[0] not in dw else None
        if t is not None and t.data_type == onnx.TensorProto.INT8:
            w = onnx.numpy_helper.to_array(t).astype(np.int16)
            widest = max(widest or 0, int(np.abs(w).max(initial=0)))
    return None if widest is None else (7 if widest <= REDUCED_WEIGHT_MAX else 8)


def int8_requirements(path: str | os.PathLike) -> tuple[str, ...]:
    """What a graph's int8 needs of the CPU: ``("int8_full_range",)`` for 8-bit weights (they saturate on x86
    without VNNI, :data:`tcsched.engines.capabilities.VNNI_FLAGS`), else nothing."""
    model = onnx.load(str(path), load_external_data=False)
    return (INT8_FULL_RANGE,) if int8_weight_bits(model) == 8 else ()


def producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    """Tensor name -> the node that outputs it."""
    return {o: n for n in graph.node for o in n.output}


def representable_range(scale: np.ndarray, zero_point: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Float range a Q/DQ pair can represent, float64: ((qmin - zp) * s, (qmax - zp) * s), qmin/qmax from the
    zero point's integer type (uint8: 0..255, int8: -128..127)."""
    info = np.iinfo(zero_point.dtype)
    zp = zero_point.astype(np.float64)
    s = scale.astype(np.float64)
    return (info.min - zp) * s, (info.max - zp) * s


def dequantize_initializer(dq: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> np.ndarray:
    """Value of ``DequantizeLinear(initializer)`` in float64: (q - zp) * scale, per-axis scales broadcast along
    the node's ``axis`` (ONNX default 1). float64 keeps int32 biases above 2^24 exact."""
    from onnx import numpy_helper

    q = numpy_helper.to_array(inits[dq.input[0]]).astype(np.float64)
    scale = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float64)
    zp = numpy_helper.to_array(inits[dq.input[2]]).astype(np.float64) if len(dq.input) > 2 else np.zeros(1)
    if scale.ndim == 1 and scale.size > 1:
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        shape = [1] * q.ndim
        shape[axis] = -1
        scale, zp = scale.reshape(shape), np.asarray(zp).reshape(shape)
    return (q - zp) * scale


def strip_output_qdq(model: onnx.ModelProto) -> int:
    """Remove QuantizeLinear -> DequantizeLinear pairs that feed graph outputs, in place; returns how many.

    ONNX Runtime's QDQ quantizer quantizes the output of the last Gemm, so the logits would leave the model with
    256 levels (a step of ~0.1 logit on MobileNetV2), enough to flip near-tied top-1 classes. The producer
    writes the output directly instead; the Gemm itself stays int8 (DQ inputs -> QGemm with a float output).
    """
    g = model.graph
    prod = producers(g)
    removed = 0
    for out in g.output:
        dq = prod.get(out.name)
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        q = prod.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear":
            continue
        others = [n for n in g.node if n is not q and q.input[0] in n.input]
        others += [n for n in g.node if n is not dq and q.output[0] in n.input]
        if others:  # the tensors feed something else too: leave the graph alone
            continue
        src = prod.get(q.input[0])
        if src is None:
            continue
        src.output[list(src.output).index(q.input[0])] = out.name
        g.node.remove(q)
        g.node.remove(dq)
        removed += 1
    return removed


def to_symmetric_int8(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """A copy of a QDQ graph whose asymmetric (uint8, zero point != 0) Q/DQ pairs are re-expressed as TensorRT's
    symmetric int8: the calibrated float range [lo, hi] = ((0 - zp) * s, (255 - zp) * s) becomes
    s' = max(|lo|, |hi|) / 127 with a zero int8 zero point, and where lo = 0 (a ReLU/ReLU6 that ONNX Runtime
    folded into the range) a Clip(lo, hi) before the QuantizeLinear keeps the activation. Weights (already
    symmetric int8) are untouched.

    TensorRT accepts only zero zero-points of a signed type (NVIDIA/TensorRT#2774); the CPU keeps the uint8 graph,
    which ONNX Runtime runs about twice as fast as int8 activations. int32 biases (DequantizeLinear of an int32
    initializer) are folded to float initializers, as TensorRT expects. The ranges stay the calibrated ones: this
    is the same graph, in the form TensorRT parses. Returns (model, number of rewritten scale/zero-point pairs).
    """
    from onnx import numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    inits = {i.name: i for i in g.initializer}
    # int32 biases: TensorRT takes biases in float; fold DequantizeLinear(int32 initializer) into a float initializer
    for node in [n for n in g.node if n.op_type == "DequantizeLinear"]:
        src = inits.get(node.input[0])
        if src is None or src.data_type != onnx.TensorProto.INT32:
            continue
        g.initializer.append(
            numpy_helper.from_array(dequantize_initializer(node, inits).astype(np.float32), node.output[0])
        )
        g.node.remove(node)
    used = {i for n in g.node for i in n.input}
    keep = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
    inits = {i.name: i for i in g.initializer}
    done: dict[tuple[str, str], tuple[float, float]] = {}
    for node in list(g.node):
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or len(node.input) < 3:
            continue
        s_name, zp_name = node.input[1], node.input[2]
        if (s_name, zp_name) in done or zp_name not in inits or s_name not in inits:
            continue
        zp = numpy_helper.to_array(inits[zp_name])
        if zp.dtype != np.uint8 and not np.any(zp):
            continue
        scale = numpy_helper.to_array(inits[s_name]).astype(np.float64)
        lo, hi = representable_range(scale, zp)
        new_scale = np.maximum(np.abs(lo), np.abs(hi)) / 127.0
        inits[s_name].CopyFrom(
            numpy_helper.from_array(new_scale.astype(np.float32).reshape(scale.shape), s_name)
        )
        inits[zp_name].CopyFrom(numpy_helper.from_array(np.zeros(zp.shape, np.int8), zp_name))
        done[(s_name, zp_name)] = (float(np.min(lo)), float(np.max(hi)))
    # keep each calibrated range's saturation: ONNX Runtime folds ReLU/ReLU6 into a [0, hi] uint8 range, which a
    # symmetric [-m, m] range would let through; an explicit Clip(lo, hi) before the QuantizeLinear restores it
    # (TensorRT fuses it into the producer as an activation)
    for q in [n for n in g.node if n.op_type == "QuantizeLinear" and (n.input[1], n.input[2]) in done]:
        lo, hi = done[(q.input[1], q.input[2])]
        if lo < -1e-12:  # a signed range: symmetric already covers it with no activation folded
            continue
        x = q.input[0]
        out_name = f"{x}_range_clip_{q.name}"
        b_lo, b_hi = f"{out_name}_min", f"{out_name}_max"
        g.initializer.extend(
            [numpy_helper.from_array(np.float32(lo), b_lo), numpy_helper.from_array(np.float32(hi), b_hi)]
        )
        clip = onnx.helper.make_node("Clip", [x, b_lo, b_hi], [out_name], name=f"{out_name}_node")
        g.node.insert(list(g.node).index(q), clip)
        q.input[0] = out_name
    return out, len(done)
