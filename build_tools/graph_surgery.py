"""Graph surgery on ONNX classifiers: the edits the variant recipes make to a graph.

- :func:`convert_fp16`: fp16 weights and compute, fp32 inputs/outputs (ONNX Runtime's float16 converter).
- :func:`dequantize_layers`: named nodes of an int8 QDQ graph back to float.
- :func:`prune_onnx_2_4`: 2:4 magnitude pruning of named Conv/Gemm weights.
- :func:`float_cost_macs`: the MACs that run in float when a node of a QDQ graph returns to float.
- :func:`remove_dead`: drop Q/DQ nodes and initializers nothing reads any more.
- :func:`add_pixel_input` / :func:`strip_pixel_input`: uint8 pixels in, the normalisation as the graph's first
  nodes (a ``--pixels uint8`` repository), and back.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from tcsched.build_tools.quantize import dequantize_initializer, producers, representable_range

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
WEIGHT_OPS = ("Conv", "Gemm")


def convert_fp16(fp32_path: str | os.PathLike, out_path: str | os.PathLike) -> Path:
    """Write an fp16 graph with fp32 inputs/outputs (``keep_io_types``: Cast nodes at the boundary)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(fp32_path)), keep_io_types=True)
    onnx.save(model, str(out_path))
    return Path(out_path)


def qdq_source(prod: dict[str, onnx.NodeProto], name: str) -> onnx.NodeProto | None:
    """The QuantizeLinear of ``name`` = ``DequantizeLinear(QuantizeLinear(x))``, else None (``prod``: the
    graph's producer map, :func:`tcsched.build_tools.quantize.producers`)."""
    dq = prod.get(name)
    if dq is None or dq.op_type != "DequantizeLinear":
        return None
    q = prod.get(dq.input[0])
    return q if q is not None and q.op_type == "QuantizeLinear" else None


def _float_followers(g: onnx.GraphProto, layers: set[str]) -> tuple[set[str], set[str]]:
    """Nodes other than Conv/Gemm that read a float layer's output through DQ(Q(out)) (residual Add, pooling),
    transitively (GAP -> Flatten): their inputs from float tensors become float too. Returns (their names, every
    tensor that is float now)."""
    prod = producers(g)
    float_outputs = {n.output[0] for n in g.node if n.name in layers}
    followers: set[str] = set()
    changed = True
    while changed:
        changed = False
        for n in g.node:
            if n.op_type in (*WEIGHT_OPS, *QDQ_OPS) or n.name in followers:
                continue
            if any((q := qdq_source(prod, i)) is not None and q.input[0] in float_outputs for i in n.input):
                followers.add(n.name)
                float_outputs.update(n.output)
                changed = True
    return followers, float_outputs


class _FloatRewiring:
    """The edits of :func:`dequantize_layers` on one graph: each input of a float node rewired to a float tensor.

    Activations (``DQ(Q(x))``) become ``x``, or ``Clip(x)`` where the quantizer had absorbed an activation (one
    Clip per QuantizeLinear, shared by its readers); weights (``DQ(int8 initializer)``) become fp32 initializers.
    """

    def __init__(self, g: onnx.GraphProto, reference: onnx.ModelProto | None):
        self.g = g
        self.prod = producers(g)
        self.inits = {i.name: i for i in g.initializer}
        self.reference = reference
        self.ref_inits = {i.name: i for i in reference.graph.initializer} if reference is not None else {}
        self.ref_prod = producers(reference.graph) if reference is not None else {}
        self.clipped: dict[str, str] = {}  # QuantizeLinear name -> the float tensor that replaces its DQ
        self.new_nodes: list[tuple[onnx.NodeProto, onnx.NodeProto]] = []  # (Q, the Clip to insert after it)

    def to_float(self, node: onnx.NodeProto, k: int) -> None:
        dq = self.prod.get(node.input[k])
        if dq is None or dq.op_type != "DequantizeLinear":
            return
        src = dq.input[0]
        q = self.prod.get(src)
        if q is not None and q.op_type == "QuantizeLinear":
            node.input[k] = self._activation(q)
        elif src in self.inits:
            node.input[k] = self._weight(node, node.input[k], dq)

    def _activation(self, q: onnx.NodeProto) -> str:
        if q.name not in self.clipped:
            lo, hi = _activation_bounds(q, self.inits, self.reference, self.ref_prod)
            if np.isinf(lo) and np.isinf(hi):  # no activation was folded: the float tensor as it is
                self.clipped[q.name] = q.input[0]
            else:
                out = f"{q.input[0]}_clip_{len(self.clipped)}"
                bounds = [
                    numpy_helper.from_array(np.float32(v), f"{out}_{k}")
                    for k, v in (("min", lo), ("max", hi))
                ]
                self.g.initializer.extend(bounds)
                clip = onnx.helper.make_node(
                    "Clip", [q.input[0], *(b.name for b in bounds)], [out], name=f"{out}_node"
                )
                self.new_nodes.append((q, clip))
                self.clipped[q.name] = out
        return self.clipped[q.name]

    def _weight(self, node: onnx.NodeProto, name: str, dq: onnx.NodeProto) -> str:
        float_name = f"{name}_float_{node.name}"
        original = self.ref_inits.get(dq.input[0].removesuffix("_quantized"))
        value = dequantize_initializer(dq, self.inits)
        if original is not None and tuple(original.dims) == value.shape:
            value = numpy_helper.to_array(original)  # the fp32 weight itself, not its int8 rounding
        self.g.initializer.append(numpy_helper.from_array(value.astype(np.float32), float_name))
        return float_name

    def insert_clips(self) -> None:
        for q, clip in self.new_nodes:  # keep topological order: each Clip right after the Q it replaces
            self.g.node.insert(list(self.g.node).index(q) + 1, clip)


def dequantize_layers(
    qdq: onnx.ModelProto, layers: Sequence[str], reference: onnx.ModelProto | None = None
) -> onnx.ModelProto:
    """Return a copy of a QDQ graph in which the named Conv/Gemm nodes compute in float.

    For each named node, an input produced by ``DequantizeLinear(QuantizeLinear(x))`` is rewired to the float
    ``x`` (the input's quantization is where MobileNetV2's int8 error sits; reading the dequantized value instead
    was measured to recover nothing). The price: x's producer now also outputs float and loses its fused int8
    kernel in ONNX Runtime; :func:`float_cost_macs` counts it. ONNX Runtime's quantizer removes Clip/Relu
    activations whose effect the quantization range already has (ReLU6 in MobileNetV2; the tensor keeps the
    activation's output name): with ``reference`` (the fp32 graph the QDQ graph came from) the removed activation
    is restored exactly; without it, ``x`` is clipped to the range the QuantizeLinear represents, which restores
    the activation approximately (calibrated saturation). A weight/bias produced by
    ``DequantizeLinear(int8 initializer)`` is replaced by the reference's original fp32 initializer (ONNX Runtime
    names the int8 copy ``<name>_quantized``), or by its dequantized value without a reference. A float layer's
    output stays float for the non-Conv/Gemm nodes that read it (:func:`_float_followers`). Q/DQ nodes that
    nothing consumes any more are removed. Outputs keep their quantization (it belongs to the consumer).

    Raises:
        ValueError: a name is not a node of the graph.
    """
    model = onnx.ModelProto()
    model.CopyFrom(qdq)
    g = model.graph
    missing = set(layers) - {n.name for n in g.node}
    if missing:
        raise ValueError(f"layers not in the graph: {sorted(missing)[:5]}")
    followers, float_outputs = _float_followers(g, set(layers))
    rewiring = _FloatRewiring(g, reference)
    for node in g.node:
        if node.name in layers:
            inputs = list(range(len(node.input)))
        elif node.name in followers:
            inputs = [
                k
                for k, name in enumerate(node.input)
                if (q := qdq_source(rewiring.prod, name)) is not None and q.input[0] in float_outputs
            ]
        else:
            continue
        for k in inputs:
            rewiring.to_float(node, k)
    rewiring.insert_clips()
    remove_dead(g)
    return model


def _activation_bounds(
    q: onnx.NodeProto,
    inits: dict[str, onnx.TensorProto],
    reference: onnx.ModelProto | None,
    ref_prod: dict[str, onnx.NodeProto],
) -> tuple[float, float]:
    """Bounds of the activation folded into ``q``: from the reference graph's Clip/Relu when it produced the
    tensor (``ref_prod``: the reference's producer map), (-inf, inf) when the reference shows no activation
    there, else the representable range of ``q``."""
    if reference is not None:
        act = ref_prod.get(q.input[0])
        if act is None or act.op_type not in ("Clip", "Relu"):
            return -np.inf, np.inf
        if act.op_type == "Relu":
            return 0.0, np.inf
        return _clip_bounds(act, reference.graph)
    zp = numpy_helper.to_array(inits[q.input[2]]) if len(q.input) > 2 else np.zeros(1, np.uint8)
    lo, hi = representable_range(numpy_helper.to_array(inits[q.input[1]]), zp)
    return float(np.min(lo)), float(np.max(hi))


def _clip_bounds(clip: onnx.NodeProto, graph: onnx.GraphProto) -> tuple[float, float]:
    """(min, max) of a Clip node, from initializers or Constant nodes; a missing bound is -inf / inf."""
    inits = {i.name: i for i in graph.initializer}
    consts = {n.output[0]: n for n in graph.node if n.op_type == "Constant"}

    def value(name: str, default: float) -> float:
        if not name:
            return default
        if name in inits:
            return float(numpy_helper.to_array(inits[name]).reshape(-1)[0])
        if name in consts:
            attr = next(a for a in consts[name].attribute if a.name == "value")
            return float(numpy_helper.to_array(attr.t).reshape(-1)[0])
        return default

    ins = list(clip.input) + ["", "", ""]
    return value(ins[1], -np.inf), value(ins[2], np.inf)


def remove_dead(g: onnx.GraphProto) -> None:
    """Remove, in place, Q/DQ nodes whose outputs nothing reads (repeatedly), then unused initializers."""
    outputs = {o.name for o in g.output}
    while True:
        used = {i for n in g.node for i in n.input} | outputs
        dead = [n for n in g.node if n.op_type in QDQ_OPS and not set(n.output) & used]
        if not dead:
            break
        for n in dead:
            g.node.remove(n)
    used = {i for n in g.node for i in n.input}
    keep = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)


def prune_onnx_2_4(model: onnx.ModelProto, layers: Sequence[str], prune: Callable) -> onnx.ModelProto:
    """Copy of an fp32 graph with the weights of ``layers`` (Conv/Gemm names) pruned by ``prune`` (2:4).

    ``prune(weight [O, I, ...]) -> (pruned, mask)`` groups the reduction (input-channel) dimension by 4; Gemm
    weights with ``transB=0`` ([I, O]) are transposed around the call.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {i.name: i for i in out.graph.initializer}
    wanted = set(layers)
    for node in out.graph.node:
        if node.name not in wanted:
            continue
        w_name = node.input[1]
        w = numpy_helper.to_array(inits[w_name])
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        pruned = prune(w.T)[0].T if node.op_type == "Gemm" and not trans_b else prune(w)[0]
        inits[w_name].CopyFrom(numpy_helper.from_array(pruned.astype(w.dtype), w_name))
    return out


def float_cost_macs(qdq: onnx.ModelProto, node_name: str, macs: dict[str, int]) -> int:
    """MACs (per image) that run in float when ``node_name`` returns to float with :func:`dequantize_layers`:
    its own, plus those of the Conv/Gemm producers of its quantized inputs (they must output float)."""
    g = qdq.graph
    prod = producers(g)
    node = next(n for n in g.node if n.name == node_name)
    cost = macs.get(node_name, 0)
    for name in node.input:
        q = qdq_source(prod, name)
        if q is not None:
            p = prod.get(q.input[0])
            if p is not None:
                cost += macs.get(p.name, 0)
    return cost


#: name prefix of the nodes and initializers :func:`add_pixel_input` adds
PIXEL_PREFIX = "tcsched_pixels/"


def add_pixel_input(model: onnx.ModelProto, mean: Sequence[float], std: Sequence[float]) -> onnx.ModelProto:
    """A copy of ``model`` whose input takes uint8 pixels [N, C, H, W] (same name and shape) and normalises them
    first: ``Cast`` to float, ``Div`` by 255, ``Sub`` ``mean``, ``Div`` by ``std``, each [1, C, 1, 1] float32:
    torchvision's float32 operations in its order (``ToTensor`` then ``Normalize``;
    :func:`tcsched.pixels.normalise`), so the graph computes what it computed on the float tensor.

    Raises:
        ValueError: the model does not have one float32 input of rank 4 with C = len(mean) = len(std), or
            already takes pixels.
    """
    from onnx import TensorProto, helper

    if len(model.graph.input) != 1:
        raise ValueError(f"expected one graph input, got {len(model.graph.input)}")
    inp = model.graph.input[0]
    t = inp.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in t.shape.dim]
    if any(n.name.startswith(PIXEL_PREFIX) for n in model.graph.node):
        raise ValueError("the graph already takes uint8 pixels")
    if t.elem_type != TensorProto.FLOAT or len(dims) != 4 or not (dims[1] == len(mean) == len(std)):
        raise ValueError(
            f"expected a float32 input [N, {len(mean)}, H, W], got element type {t.elem_type} and shape {dims}"
        )
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    name, norm = inp.name, PIXEL_PREFIX + "normalised"
    for node in g.node:
        node.input[:] = [norm if x == name else x for x in node.input]
    c = len(mean)
    consts = {
        "255": np.array(255.0, dtype=np.float32),
        "mean": np.asarray(mean, dtype=np.float32).reshape(1, c, 1, 1),
        "std": np.asarray(std, dtype=np.float32).reshape(1, c, 1, 1),
    }
    g.initializer.extend(numpy_helper.from_array(v, PIXEL_PREFIX + k) for k, v in consts.items())
    p = PIXEL_PREFIX
    first = [
        helper.make_node("Cast", [name], [p + "float"], name=p + "Cast", to=TensorProto.FLOAT),
        helper.make_node("Div", [p + "float", p + "255"], [p + "unit"], name=p + "Div255"),
        helper.make_node("Sub", [p + "unit", p + "mean"], [p + "centred"], name=p + "SubMean"),
        helper.make_node("Div", [p + "centred", p + "std"], [norm], name=p + "DivStd"),
    ]
    nodes = _topological(first + list(g.node), {i.name for i in g.initializer} | {name})
    del g.node[:]
    g.node.extend(nodes)
    g.input[0].type.tensor_type.elem_type = TensorProto.UINT8
    onnx.checker.check_model(out)
    return out


def _topological(nodes: list[onnx.NodeProto], available: set[str]) -> list[onnx.NodeProto]:
    """``nodes`` in an order where every node comes after the producers of its inputs (stable: a node keeps its
    place when it can). ONNX requires it (onnx.checker); the fp16 converter appends its input Casts at the end.
    onnxruntime's ``ONNXModel.topological_sort`` is not stable (it moves every Constant to the front), and the
    pixel nodes must stay the graph's first nodes.

    Raises:
        ValueError: some node's input is produced by no node and is no graph input or initializer.
    """
    have, out, pending = set(available) | {""}, [], list(nodes)
    while pending:
        rest = []
        for n in pending:
            if all(x in have for x in n.input):
                out.append(n)
                have.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            raise ValueError(f"node {rest[0].name!r} reads a tensor nothing produces: {list(rest[0].input)}")
        pending = rest
    return out


def strip_pixel_input(model: onnx.ModelProto) -> onnx.ModelProto:
    """The float32-input graph of a graph made by :func:`add_pixel_input` (its nodes and initializers removed).

    Raises:
        ValueError: ``model`` has no such nodes.
    """
    from onnx import TensorProto

    g0 = model.graph
    if not any(n.name.startswith(PIXEL_PREFIX) for n in g0.node):
        raise ValueError("the graph does not take uint8 pixels (no tcsched_pixels/ nodes)")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    name, norm = g.input[0].name, PIXEL_PREFIX + "normalised"
    keep = [n for n in g.node if not n.name.startswith(PIXEL_PREFIX)]
    for node in keep:
        node.input[:] = [name if x == norm else x for x in node.input]
    del g.node[:]
    g.node.extend(keep)
    inits = [i for i in g.initializer if not i.name.startswith(PIXEL_PREFIX)]
    del g.initializer[:]
    g.initializer.extend(inits)
    g.input[0].type.tensor_type.elem_type = TensorProto.FLOAT
    onnx.checker.check_model(out)
    return out
