"""Sensitivity probes in ONNX Runtime: the activation ranges from one fp32 pass, then per layer one in-memory
graph where only that layer is INT8 (QDQ), with two parallel copies of the layer (fp32 reference, 2:4-pruned
weight), run once over the calibration images.

Sessions come from :func:`tcsched.ort_runtime.make_session` (the options the build and the server use); the
modified graphs are written to a temporary folder for it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tcsched.build_tools.analysis.geometry import LayerGeometry
from tcsched.build_tools.analysis.schema import Int8Sensitivity
from tcsched.build_tools.analysis.weights import (
    activation_qparams,
    prune_2_4,
    quantize_weight_per_channel,
    sparse_view,
)
from tcsched.metrics import SqnrAccumulator, mean_kl, top1_agreement
from tcsched.ort_runtime import make_session

if TYPE_CHECKING:  # pragma: no cover
    import onnx

Calibration = np.ndarray | Iterable[Mapping[str, np.ndarray]]
Feeds = Sequence[dict[str, np.ndarray]]


def session(model: onnx.ModelProto, threads: int, workdir: Path, name: str = "probe"):
    """An ONNX Runtime CPU session of an in-memory ``model`` (saved as ``workdir/<name>.onnx`` first)."""
    path = Path(workdir) / f"{name}.onnx"
    path.write_bytes(model.SerializeToString())
    return make_session(path, threads=threads)


# --- calibration data -------------------------------------------------------------------------------------------


def _check_images(
    x: np.ndarray, where: str, input_shape: Sequence[int | str], static_batch: int | None
) -> None:
    """Raise ValueError unless ``x`` is float32 [N, *input_shape[1:]] with N > 0 (a multiple of a static batch)."""
    if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim != len(input_shape):
        raise ValueError(
            f"{where}: calibration images must be float32 of rank {len(input_shape)} "
            f"[N, {', '.join(map(str, input_shape[1:]))}], got "
            f"{getattr(x, 'dtype', type(x).__name__)} {list(getattr(x, 'shape', []))}"
        )
    for e, s in zip(input_shape[1:], x.shape[1:], strict=True):
        if isinstance(e, int) and e != s:
            raise ValueError(
                f"{where}: calibration images must have shape [N, {', '.join(map(str, input_shape[1:]))}], "
                f"got {list(x.shape)}"
            )
    if len(x) == 0:
        raise ValueError(f"{where}: no calibration images")
    if static_batch and len(x) % static_batch:
        raise ValueError(f"{where}: the model has a static batch of {static_batch}; got {len(x)} images")


def calibration_feeds(
    calibration: Calibration, input_name: str, input_shape: Sequence[int | str], batch_size: int
) -> list[dict[str, np.ndarray]]:
    """Normalise the calibration data into feeds of at most ``batch_size`` images (a static batch in the model
    wins), checking every image before any inference.

    Raises:
        ValueError: not a float32 array [N, C, H, W] nor an iterable of feed dicts holding ``input_name``; wrong
            dtype or shape; no image.
    """
    static_batch = input_shape[0] if input_shape and isinstance(input_shape[0], int) else None
    bs = static_batch or batch_size

    def split(x: np.ndarray) -> list[dict[str, np.ndarray]]:
        return [{input_name: np.ascontiguousarray(x[i : i + bs])} for i in range(0, len(x), bs)]

    if isinstance(calibration, np.ndarray):
        _check_images(calibration, "calibration", input_shape, static_batch)
        return split(calibration)
    if isinstance(calibration, Mapping | str | bytes):
        raise ValueError("calibration must be a float32 array [N, C, H, W] or an iterable of feed dicts")
    feeds: list[dict[str, np.ndarray]] = []
    for i, feed in enumerate(calibration):
        if not isinstance(feed, Mapping) or input_name not in feed:
            raise ValueError(f"calibration feed {i} must be a dict with the model input {input_name!r}")
        _check_images(feed[input_name], f"calibration feed {i}", input_shape, static_batch)
        feeds += split(feed[input_name])
    if not feeds:
        raise ValueError("calibration data is empty: at least one image is needed")
    return feeds


# --- fp32 pass --------------------------------------------------------------------------------------------------


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    m = type(model)()
    m.CopyFrom(model)
    return m


def _expose(graph, tensors: Mapping[str, int]) -> None:
    """Add graph outputs (float, rank given, dims unknown) for ``tensors`` that are not outputs already."""
    from onnx import TensorProto, helper

    existing = {o.name for o in graph.output}
    graph.output.extend(
        helper.make_tensor_value_info(t, TensorProto.FLOAT, [None] * r)
        for t, r in tensors.items()
        if t not in existing
    )


def fp32_pass(
    model: onnx.ModelProto,
    geos: Sequence[LayerGeometry],
    feeds: Feeds,
    threads: int,
    workdir: Path,
    on_batch: Callable[[], None] | None = None,
) -> tuple[np.ndarray, dict[str, tuple[float, float]]]:
    """One fp32 pass with every layer input exposed: the logits [N, classes] and each input's (min, max)."""
    m = _copy(model)
    graph_inputs = {i.name for i in m.graph.input}
    _expose(m.graph, {g.input_name: g.output_rank for g in geos if g.input_name not in graph_inputs})
    sess = session(m, threads, workdir, "fp32_ranges")
    out_names = [o.name for o in sess.get_outputs()]
    final = model.graph.output[0].name
    ranges: dict[str, tuple[float, float]] = {}
    logits = []
    for feed in feeds:
        values = dict(zip(out_names, sess.run(out_names, feed), strict=True)) | feed
        logits.append(values[final])
        for g in geos:
            x = values[g.input_name]
            lo, hi = float(x.min()), float(x.max())
            plo, phi = ranges.get(g.input_name, (lo, hi))
            ranges[g.input_name] = (min(lo, plo), max(hi, phi))
        if on_batch:
            on_batch()
    return np.concatenate(logits), ranges


# --- per-layer probe graph --------------------------------------------------------------------------------------


def _np_init(array: np.ndarray, name: str):
    from onnx import numpy_helper

    return numpy_helper.from_array(np.asarray(array), name)


def _layer_copy(node, inputs: Sequence[str], output: str, name: str):
    """A node with ``node``'s operator and attributes on other inputs and output."""
    from onnx import helper

    n = helper.make_node(node.op_type, list(inputs), [output], name=name)
    n.attribute.extend(node.attribute)
    return n


def _qdq_nodes(graph, g: LayerGeometry, weight: np.ndarray, input_range: tuple[float, float], p: str) -> list:
    """Initializers (added to ``graph``) and Q/DQ nodes for the layer's input (uint8) and weight (int8/channel)."""
    from onnx import helper

    axis = g.weight_channel_axis
    scale, zp = activation_qparams(*input_range)
    wq, wscale = quantize_weight_per_channel(weight, axis)
    graph.initializer.extend(
        [
            _np_init(np.array(scale, dtype=np.float32), f"{p}_x_scale"),
            _np_init(np.array(zp, dtype=np.uint8), f"{p}_x_zp"),
            _np_init(wq, f"{p}_w_q"),
            _np_init(wscale, f"{p}_w_scale"),
            _np_init(np.zeros(wscale.shape, dtype=np.int8), f"{p}_w_zp"),
        ]
    )
    x_q = [f"{p}_x_q", f"{p}_x_scale", f"{p}_x_zp"]
    return [
        helper.make_node("QuantizeLinear", [g.input_name, *x_q[1:]], [x_q[0]], name=f"{p}_xq"),
        helper.make_node("DequantizeLinear", x_q, [f"{p}_x_dq"], name=f"{p}_xdq"),
        helper.make_node(
            "DequantizeLinear",
            [f"{p}_w_q", f"{p}_w_scale", f"{p}_w_zp"],
            [f"{p}_w_dq"],
            name=f"{p}_wdq",
            axis=axis,
        ),
    ]


def build_probe_model(
    base: onnx.ModelProto,
    g: LayerGeometry,
    weight: np.ndarray,
    input_range: tuple[float, float],
    prune: bool,
    prefix: str = "__tcsched_probe",
) -> tuple[onnx.ModelProto, dict[str, str]]:
    """A copy of ``base`` where only layer ``g`` is INT8 (QDQ), plus parallel reference copies of the layer.

    * the layer's input goes through QuantizeLinear/DequantizeLinear (uint8, scale/zero point from
      ``input_range``); its weight is stored int8 and dequantized per output channel (``axis`` = the weight's
      output-channel axis); the bias stays fp32;
    * ``<prefix>_ref``: the same layer on the fp32 input and weight (the reference output);
    * ``<prefix>_p24`` (when ``prune``): the same layer on the fp32 input with the 2:4-pruned fp32 weight.

    Returns:
        ``(model, outputs)``: outputs maps ``"logits"``, ``"int8"``, ``"ref"`` (and ``"p24"``) to graph output
        names.
    """
    m = _copy(base)
    graph, p = m.graph, prefix
    idx = next(i for i, n in enumerate(graph.node) if (n.name or f"{n.op_type}_{i}") == g.name)
    node = graph.node[idx]
    new_nodes = _qdq_nodes(graph, g, weight, input_range, p)
    new_nodes.append(_layer_copy(node, node.input, f"{p}_ref", f"{p}_ref_node"))
    outputs = {"logits": base.graph.output[0].name, "int8": g.output_name, "ref": f"{p}_ref"}
    if prune:
        pruned, _ = prune_2_4(sparse_view(weight, g))
        graph.initializer.append(_np_init(sparse_view(pruned, g).astype(np.float32), f"{p}_w_p24"))
        inputs = list(node.input)
        inputs[1] = f"{p}_w_p24"
        new_nodes.append(_layer_copy(node, inputs, f"{p}_p24", f"{p}_p24_node"))
        outputs["p24"] = f"{p}_p24"
    node.input[0] = f"{p}_x_dq"
    node.input[1] = f"{p}_w_dq"
    for k, n in enumerate(new_nodes):
        graph.node.insert(idx + k, n)
    _expose(graph, {t: g.output_rank for key, t in outputs.items() if key != "logits"})
    return m, outputs


@dataclass(frozen=True)
class ProbeResult:
    """What one layer's probe measured: its INT8 sensitivity, the 2:4-pruned output's SQNR (dB; None when not
    pruned) and the layer's output shape as seen at run time (last batch)."""

    int8: Int8Sensitivity
    prune24_sqnr_db: float | None
    observed_shape: list[int]


def probe_layer(
    base: onnx.ModelProto,
    g: LayerGeometry,
    weight: np.ndarray,
    input_range: tuple[float, float],
    prune: bool,
    feeds: Feeds,
    ref_logits: np.ndarray,
    threads: int,
    workdir: Path,
) -> ProbeResult:
    """Run the probe graph of layer ``g`` (:func:`build_probe_model`) over ``feeds``, against ``ref_logits``."""
    m, outs = build_probe_model(base, g, weight, input_range, prune)
    sess = session(m, threads, workdir)
    names = list(dict.fromkeys(outs.values()))
    int8_acc, p24_acc = SqnrAccumulator(), SqnrAccumulator()
    logits = []
    shape: list[int] = []
    for feed in feeds:
        vals = dict(zip(names, sess.run(names, feed), strict=True))
        logits.append(vals[outs["logits"]])
        shape = list(vals[outs["int8"]].shape)
        int8_acc.add(vals[outs["ref"]], vals[outs["int8"]])
        if prune:
            p24_acc.add(vals[outs["ref"]], vals[outs["p24"]])
    q_logits = np.concatenate(logits)
    sens = Int8Sensitivity(
        top1_agreement=top1_agreement(ref_logits, q_logits),
        kl=max(0.0, mean_kl(ref_logits, q_logits)),
        output_sqnr_db=int8_acc.db,
    )
    return ProbeResult(sens, p24_acc.db if prune else None, shape)
