"""Graph inspection: the static facts of every Conv/Gemm layer of an ONNX graph (kind, channels, kernel, stride,
output shape, MACs). Pure ONNX protobuf reading, no inference."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # pragma: no cover
    import onnx

LayerKind = Literal["pointwise", "depthwise", "grouped", "full", "linear"]
LAYER_OPS = ("Conv", "Gemm")


@dataclass(frozen=True)
class LayerGeometry:
    """The static facts of one Conv/Gemm layer that the rules look at.

    ``weight_shape`` is the initializer's shape as stored: Conv [O, I/group, k...]; Gemm [O, I] when ``trans_b``
    else [I, O]. ``in_channels``/``out_channels`` are the layer's totals (Gemm: in/out features).
    """

    name: str
    op_type: str
    kind: LayerKind
    in_channels: int
    out_channels: int
    group: int
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    weight_name: str
    weight_shape: tuple[int, ...]
    input_name: str
    output_name: str
    bias_name: str | None = None
    trans_b: bool = True

    @property
    def in_channels_per_group(self) -> int:
        return self.in_channels // self.group

    @property
    def reduction_length(self) -> int:
        """Length of the implicit-GEMM reduction: (in channels / group) x kernel area (Gemm: in features)."""
        return self.in_channels_per_group * math.prod(self.kernel)

    @property
    def weight_channel_axis(self) -> int:
        """Axis of the weight that indexes output channels (per-channel quantization axis)."""
        return 0 if (self.op_type == "Conv" or self.trans_b) else 1

    @property
    def output_rank(self) -> int:
        """Rank of the layer's output: the Conv weight's rank (N, C, spatial...), 2 for a Gemm."""
        return len(self.weight_shape) if self.op_type == "Conv" else 2


def layer_kind(op_type: str, weight_shape: Sequence[int], group: int = 1) -> LayerKind:
    """Classify a layer from its operator, weight shape and ``group``.

    Args:
        op_type: ``"Conv"`` or ``"Gemm"`` (``"MatMul"`` also counts as linear).
        weight_shape: Conv [O, I/group, k...]; Gemm 2-D.
        group: Conv ``group`` attribute.

    Returns:
        ``linear`` (Gemm/MatMul); ``depthwise`` (group = input channels > 1, one input channel per group);
        ``pointwise`` (all kernel dims 1, group 1); ``grouped`` (1 < group < input channels); else ``full``.

    Raises:
        ValueError: an unknown operator or a weight of rank < 3 for Conv.
    """
    if op_type in ("Gemm", "MatMul"):
        return "linear"
    if op_type != "Conv":
        raise ValueError(f"not a Conv/Gemm layer: {op_type}")
    if len(weight_shape) < 3:
        raise ValueError(f"Conv weight must be [O, I/group, k...], got shape {list(weight_shape)}")
    per_group = int(weight_shape[1])
    if group > 1 and per_group == 1:
        return "depthwise"
    if group > 1:
        return "grouped"
    if all(int(k) == 1 for k in weight_shape[2:]):
        return "pointwise"
    return "full"


def _attr(node, name: str, default: Any = None) -> Any:
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def node_names(model: onnx.ModelProto) -> list[str]:
    """Node names, with ``<op_type>_<index>`` for nodes that have none."""
    return [n.name or f"{n.op_type}_{i}" for i, n in enumerate(model.graph.node)]


def _conv_geometry(name: str, node, wshape: tuple[int, ...], bias: str | None) -> LayerGeometry:
    group = int(_attr(node, "group", 1))
    kernel = wshape[2:]
    stride = tuple(int(s) for s in (_attr(node, "strides") or [1] * len(kernel)))
    return LayerGeometry(
        name=name,
        op_type="Conv",
        kind=layer_kind("Conv", wshape, group),
        in_channels=wshape[1] * group,
        out_channels=wshape[0],
        group=group,
        kernel=tuple(kernel),
        stride=stride,
        weight_name=node.input[1],
        weight_shape=wshape,
        input_name=node.input[0],
        output_name=node.output[0],
        bias_name=bias,
    )


def _gemm_geometry(name: str, node, wshape: tuple[int, ...], bias: str | None) -> LayerGeometry:
    if int(_attr(node, "transA", 0)):
        raise ValueError(f"Gemm {name}: transA=1 is not supported")
    trans_b = bool(_attr(node, "transB", 0))
    n_out, n_in = wshape if trans_b else wshape[::-1]
    return LayerGeometry(
        name=name,
        op_type="Gemm",
        kind="linear",
        in_channels=n_in,
        out_channels=n_out,
        group=1,
        kernel=(1,),
        stride=(1,),
        weight_name=node.input[1],
        weight_shape=wshape,
        input_name=node.input[0],
        output_name=node.output[0],
        bias_name=bias,
        trans_b=trans_b,
    )


def layer_geometries(model: onnx.ModelProto) -> list[LayerGeometry]:
    """Every Conv/Gemm of the graph, in graph order, with the facts the rules need.

    Raises:
        ValueError: a Conv/Gemm whose weight is not an initializer (dynamic weights are not analysed), or a Gemm
            with ``transA=1``.
    """
    inits = {i.name: i for i in model.graph.initializer}
    out: list[LayerGeometry] = []
    for name, node in zip(node_names(model), model.graph.node, strict=True):
        if node.op_type not in LAYER_OPS:
            continue
        if len(node.input) < 2 or node.input[1] not in inits:
            raise ValueError(f"{node.op_type} {name}: its weight is not an initializer; cannot analyse it")
        wshape = tuple(int(d) for d in inits[node.input[1]].dims)
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        make = _conv_geometry if node.op_type == "Conv" else _gemm_geometry
        out.append(make(name, node, wshape, bias))
    return out


def tensor_dims(type_proto) -> list[int | str] | None:
    """Shape of an ONNX ``TypeProto`` tensor: ints, symbolic dims by name, unknown as ``"?"``; None if unranked."""
    t = type_proto.tensor_type
    if not t.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim]


def inferred_shapes(model: onnx.ModelProto) -> dict[str, list[int | str]]:
    """Tensor name -> shape from ``onnx.shape_inference`` (symbolic dims as their names, unknown as ``"?"``)."""
    from onnx import shape_inference

    g = shape_inference.infer_shapes(model).graph
    shapes: dict[str, list[int | str]] = {}
    for vi in [*g.input, *g.value_info, *g.output]:
        d = tensor_dims(vi.type)
        if d is not None:
            shapes[vi.name] = d
    return shapes


def layer_macs(g: LayerGeometry, output_shape: Sequence[int | str]) -> int:
    """Multiply-accumulates per image: output elements per image x reduction length.

    Conv: C_out x prod(output spatial) x (C_in / group) x prod(kernel); Gemm: out x in features (per row).

    Raises:
        ValueError: a non-batch output dimension is unknown.
    """
    per_image = list(output_shape[1:])
    if any(not isinstance(d, int) for d in per_image):
        raise ValueError(f"{g.name}: output shape {list(output_shape)} has unknown dimensions")
    return int(math.prod(per_image)) * g.reduction_length
