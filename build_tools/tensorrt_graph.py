"""The graph TensorRT compiles for a Q/DQ variant: ONNX Runtime's int8 graph in the form TensorRT's guide asks for.

The CPU build's int8 graphs (``quantize.quantize_int8``) are ONNX Runtime's QDQ format: uint8 asymmetric
activations, int32 biases, and Q/DQ on *both* inputs of every residual ``Add``. TensorRT differs on two points:

1. It quantizes symmetrically only: zero points must be 0 and of a signed type (INT8, INT4, FP8; onnx-tensorrt
   10.1 ``QuantizeLinear``/``DequantizeLinear`` importers; NVIDIA/TensorRT#2774). :func:`~tcsched.build_tools.
   quantize.to_symmetric_int8` re-expresses each calibrated range [lo, hi] as s' = max(|lo|, |hi|) / 127 and keeps a
   folded ReLU/ReLU6 as an explicit Clip. On a [0, hi] (post-ReLU6) range that gives up one bit: uint8 had 255
   steps of s = hi / 255, symmetric int8 has 127 steps of s' = hi / 127 = 255 s / 127.
2. TensorRT's explicit-quantization guide ("Q/DQ Layer-Placement Recommendations", TensorRT 10 Developer Guide,
   "Quantize the residual input in weighted-operations"): an element-wise Add that follows a Conv is fused into
   that Conv when the Conv's output goes into the Add directly and only the Add's *other* (residual) input is
   quantized; the Add's output Q then fuses too, so Conv + Add + Q run as one INT8 kernel. A DQ(Q(Conv)) on the
   Conv side stops that fusion and the Add runs as a separate kernel. :func:`quantize_residual_inputs_only`
   removes that Q/DQ pair.

The result computes something else than the uint8 graph (coarser post-ReLU activations, one quantization fewer per
residual block), so its accuracy is measured on its own: the build runs this very graph with ONNX Runtime on the
evaluation split and records the figures in the manifest (``VariantEntry.tensorrt_graph``); the GPU repository
carries those figures, never the uint8 graph's. The CPU repository keeps serving the uint8 graph unchanged.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import onnx

from tcsched.build_tools.quantize import producers, to_symmetric_int8

TENSORRT_GRAPH_FILENAME = "model.tensorrt.onnx"  # beside model.onnx in the variant's version folder
_QDQ = ("QuantizeLinear", "DequantizeLinear")


@dataclass(frozen=True)
class TensorRTForm:
    """What :func:`write_tensorrt_form` wrote: the graph, how many residual inputs lost their Q/DQ pair, how many
    scale/zero-point pairs were made symmetric, and a one-line description for the build notes."""

    path: Path
    residual_adds: int
    symmetric_pairs: int
    note: str


def has_qdq(model: onnx.ModelProto) -> bool:
    """True if the graph has any QuantizeLinear/DequantizeLinear node (an explicitly quantized graph)."""
    return any(n.op_type in _QDQ for n in model.graph.node)


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            out.setdefault(i, []).append(n)
    return out


def _conv_side_pair(
    add: onnx.NodeProto,
    index: int,
    prod: dict[str, onnx.NodeProto],
    cons: dict[str, list[onnx.NodeProto]],
    graph_outputs: set[str],
) -> tuple[onnx.NodeProto, onnx.NodeProto, onnx.NodeProto] | None:
    """(conv, q, dq) when input ``index`` of ``add`` is DQ(Q(Conv output)) with nothing else reading the Conv's
    output, the Q or the DQ (removing the pair then changes only this Add's input); else None."""
    dq = prod.get(add.input[index])
    if dq is None or dq.op_type != "DequantizeLinear":
        return None
    q = prod.get(dq.input[0])
    if q is None or q.op_type != "QuantizeLinear":
        return None
    conv = prod.get(q.input[0])
    if conv is None or conv.op_type != "Conv":
        return None
    # one reader each: the Conv's output is read by q only, q's by dq only, dq's by this Add only (once)
    private = all(len(cons.get(t, [])) == 1 for t in (q.input[0], q.output[0], dq.output[0])) and not (
        {q.input[0], q.output[0], dq.output[0]} & graph_outputs
    )
    return (conv, q, dq) if private else None


def quantize_residual_inputs_only(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """A copy of a QDQ graph in which every ``Add`` of a residual block gets its Conv-side input unquantized.

    For each ``Add`` whose two inputs are both ``DequantizeLinear`` outputs: the input that is DQ(Q(Conv)), where
    that Conv, Q and DQ feed nothing else, is rewired to the Conv's float output and the Q/DQ pair is removed;
    the other input (the residual: the block's input, also read by the block's first Conv) keeps its Q/DQ. This
    is TensorRT's recommended placement (module docstring, point 2). Where both inputs qualify, the later one in
    node order (the nearer Conv) is the one fused. Adds with a float input already, or whose Conv side is shared,
    are left alone. Scale/zero-point initializers left unused are removed. Returns (model, Adds rewritten).
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    outputs = {o.name for o in g.output}
    rewritten = 0
    for add in [n for n in g.node if n.op_type == "Add" and len(n.input) == 2]:
        prod, cons = producers(g), _consumers(g)
        if not all(prod.get(i) is not None and prod[i].op_type == "DequantizeLinear" for i in add.input):
            continue
        found = [(i, p) for i in (0, 1) if (p := _conv_side_pair(add, i, prod, cons, outputs)) is not None]
        if not found:
            continue
        position = {o: k for k, n in enumerate(g.node) for o in n.output}
        index, (_conv, q, dq) = max(found, key=lambda f: position[f[1][0].output[0]])
        add.input[index] = q.input[0]
        g.node.remove(q)
        g.node.remove(dq)
        rewritten += 1
    used = {i for n in g.node for i in n.input}
    keep = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
    return out, rewritten


def tensorrt_form(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int, int]:
    """The graph TensorRT compiles for a QDQ ``model``: :func:`quantize_residual_inputs_only`, then
    :func:`~tcsched.build_tools.quantize.to_symmetric_int8`. Returns (model, residual Adds rewritten, symmetric
    scale/zero-point pairs)."""
    placed, adds = quantize_residual_inputs_only(model)
    sym, pairs = to_symmetric_int8(placed)
    return sym, adds, pairs


def write_tensorrt_form(onnx_path: str | os.PathLike, dest: str | os.PathLike) -> TensorRTForm | None:
    """Write the graph TensorRT compiles for the variant at ``onnx_path`` to ``dest``; ``None`` (nothing written)
    for a graph without Q/DQ (fp32, fp16, sparse24), which TensorRT compiles as it is.

    Raises:
        ValueError: ``onnx_path`` does not exist, or the converted graph still has Q/DQ nodes TensorRT rejects
            (:func:`tcsched.build_tools.tensorrt_engine.tensorrt_qdq_problems`).
    """
    from tcsched.build_tools.tensorrt_engine import tensorrt_qdq_problems

    onnx_path, dest = Path(onnx_path), Path(dest)
    if not onnx_path.is_file():
        raise ValueError(f"ONNX file {onnx_path} does not exist")
    model = onnx.load(str(onnx_path))
    if not has_qdq(model):
        return None
    converted, adds, pairs = tensorrt_form(model)
    onnx.checker.check_model(converted)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
    onnx.save(converted, str(tmp))
    os.replace(tmp, dest)
    problems = tensorrt_qdq_problems(dest)
    if problems:
        dest.unlink()
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ValueError(f"TensorRT cannot compile {onnx_path}: {'; '.join(problems[:3])}{more}")
    note = (
        f"TensorRT graph {dest.name}: {pairs} uint8 Q/DQ ranges re-expressed as symmetric int8 (zero point 0; "
        f"post-ReLU ranges keep their saturation as a Clip and have 127 steps instead of 255), int32 biases "
        f"folded to float, and {adds} residual Adds quantized on the residual input only (TensorRT fuses "
        "Conv + Add + Q); its accuracy is measured on its own with ONNX Runtime"
    )
    return TensorRTForm(dest, adds, pairs, note)
