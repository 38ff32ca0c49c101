"""Model analysis, layer by layer: what each Conv/Gemm costs, how it maps onto Tensor Cores, and what INT8 and
2:4 sparsity do to it (``tcsched analyze``; ``tcsched build`` uses the report to pick per-layer precisions).

The analysis is a set of small rules in the style of NNCF/ModelOpt: each rule takes a :class:`LayerGeometry`
and returns a :class:`Verdict` (``ok`` and a ``reason`` that says why, with its source); the reasons reach the
report (``analysis.json``), the terminal table and the lead's build notes.

Per layer (every ``Conv`` and ``Gemm`` whose weight is an initializer):

* geometry: kind (``pointwise`` / ``depthwise`` / ``grouped`` / ``full`` / ``linear``), in/out channels, kernel,
  stride, output shape (``onnx.shape_inference``; batch dimension kept symbolic), MACs and parameters per image;
* weights: per-output-channel max |w| (smallest and largest over channels), fraction of zeros, whether the weight
  already is 2:4 sparse;
* Tensor Core alignment: channels multiple of 8 (FP16) and 16 (INT8), see :func:`rule_fp16_alignment`;
* 2:4 sparsity: eligibility with its reason (:func:`rule_sparse24`), and ``prune24_sqnr_db``, the SQNR of this
  layer's output when only its weight is 2:4-pruned by magnitude (:func:`prune_2_4`);
* INT8 sensitivity: the error this layer adds when it alone is INT8 (uint8 asymmetric input activation,
  per-channel symmetric int8 weight, as ``build_tools/quantize.py`` quantizes the whole model): top-1
  agreement and mean KL of the final logits against fp32 on the calibration images, SQNR of its own output.

Speed: activation ranges are computed once (one fp32 pass with every layer input exposed); then one in-memory
graph per layer (QDQ around that layer only, plus two parallel copies of the layer, one fp32 as reference and one
with the pruned weight) runs once over the calibration images. On 2 CPU cores, MobileNetV2 (53 layers) with 32
images of 224x224 took 23-28 s (up to ~60 s with the cores shared), about 0.9 GB peak RSS.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import typer
from pydantic import BaseModel, ConfigDict, Field
from rich.console import Console
from rich.table import Table

from tcsched.metrics import mean_kl, top1_agreement

if TYPE_CHECKING:  # pragma: no cover
    import onnx

SCHEMA_VERSION = "1.0"
ANALYSIS_FILENAME = "analysis.json"
PLOT_FILENAME = "analysis.png"

FP16_CHANNEL_MULTIPLE = 8
INT8_CHANNEL_MULTIPLE = 16
SPARSE24_MIN_WIDTH = 256
"""Width (reduction length and output channels) from which TensorRT tends to pick sparse kernels."""

SRC_TENSOR_CORE_ALIGNMENT = (
    "NVIDIA Deep Learning Performance Guide / GTC 2019 S9926 'Tensor Core Performance: The Ultimate Guide': "
    "channel counts should be multiples of 8 (FP16) or 16 (INT8)"
)
SRC_TRT_SPARSITY = (
    "TensorRT Developer Guide, 'Structured Sparsity': for each output channel and kernel position, every 4 "
    "consecutive input channels must hold at least 2 zeros"
)
SRC_TRT_SPARSITY_WIDTH = (
    "NVIDIA/TensorRT issues #3849 and #4065 (maintainer nvpohanh): TensorRT times dense and sparse tactics and "
    "keeps the faster; sparse kernels win only when C_in and C_out are large enough (about 256), a KxK kernel "
    "multiplying the effective C_in by K*K"
)

LayerKind = Literal["pointwise", "depthwise", "grouped", "full", "linear"]
Sparse24Outcome = Literal["eligible", "eligible_no_speedup", "not_eligible"]
LAYER_OPS = ("Conv", "Gemm")


# ----------------------------------------------------------------------------------------------------------------
# verdicts and rules
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """The answer of one rule: ``ok`` and a human-readable ``reason`` (with its source where it quotes one)."""

    ok: bool
    reason: str


@dataclass(frozen=True)
class Sparse24Verdict(Verdict):
    """:func:`rule_sparse24`'s answer: a 3-way ``outcome``; ``ok`` is True only for ``"eligible"``.

    * ``eligible``: the weight can take the 2:4 pattern and the layer is wide enough for TensorRT to pick sparse
      kernels: worth pruning.
    * ``eligible_no_speedup``: the weight can take the pattern, but the layer is narrow; TensorRT would most
      likely keep dense kernels, so pruning costs accuracy for nothing.
    * ``not_eligible``: the weight cannot take the pattern along its reduction dimension (depthwise; input
      channels per group not a multiple of 4, e.g. the 3-channel stem).
    """

    outcome: Sparse24Outcome = "not_eligible"

    @property
    def structurally_eligible(self) -> bool:
        """True when the weight can be 2:4 sparse at all (``eligible`` or ``eligible_no_speedup``)."""
        return self.outcome != "not_eligible"


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


def _alignment(g: LayerGeometry, multiple: int, precision: str) -> Verdict:
    bad = [f"{what} {n}" for what, n in (("in", g.in_channels), ("out", g.out_channels)) if n % multiple]
    note = (
        "; depthwise: one input channel per group, little Tensor Core work whatever the alignment"
        if g.kind == "depthwise"
        else ""
    )
    if bad:
        return Verdict(
            False,
            f"{', '.join(bad)} not a multiple of {multiple}: {precision} Tensor Core kernels need padding "
            f"({SRC_TENSOR_CORE_ALIGNMENT}){note}",
        )
    return Verdict(
        True,
        f"in {g.in_channels} and out {g.out_channels} are multiples of {multiple} ({precision} Tensor Cores){note}",
    )


def rule_fp16_alignment(g: LayerGeometry) -> Verdict:
    """FP16 Tensor Core alignment: in and out channels multiples of 8.

    Source: NVIDIA Deep Learning Performance Guide ("Tensor Core requirements") and GTC 2019 S9926 "Tensor Core
    Performance: The Ultimate Guide": FP16 convolutions/GEMMs use Tensor Cores best when C and K are multiples of
    8; otherwise cuDNN/TensorRT pad the channels (wasted work) or fall back to other kernels.
    """
    return _alignment(g, FP16_CHANNEL_MULTIPLE, "FP16")


def rule_int8_alignment(g: LayerGeometry) -> Verdict:
    """INT8 Tensor Core alignment: in and out channels multiples of 16 (same sources as
    :func:`rule_fp16_alignment`: INT8 Tensor Core tiles are 16 channels wide)."""
    return _alignment(g, INT8_CHANNEL_MULTIPLE, "INT8")


def rule_sparse24(g: LayerGeometry, min_width: int = SPARSE24_MIN_WIDTH) -> Sparse24Verdict:
    """2:4 structured sparsity: can the weight take the pattern, and would TensorRT run it faster?

    Rules, in order (a 3-way outcome, see :class:`Sparse24Verdict`):

    1. depthwise -> ``not_eligible``: one input channel per group leaves no group of 4 along the reduction
       dimension, and TensorRT's sparse kernels are for dense convolutions and fully connected layers.
    2. input channels per group not >= 4 and a multiple of 4 -> ``not_eligible``. The 2:4 groups run along the
       input channels at each (output channel, kernel position) (TensorRT Developer Guide, "Structured
       Sparsity"; NVIDIA blog "Accelerating Inference with Sparsity Using the NVIDIA Ampere Architecture and
       NVIDIA TensorRT", 2021). The MobileNetV2 stem has 3 input channels: no group of 4 can be formed.
    3. reduction length ((C_in / group) x kernel area) and out channels both >= ``min_width`` (256) ->
       ``eligible``; otherwise ``eligible_no_speedup``. TensorRT times the dense and sparse tactics and keeps
       the faster one; per its maintainers, sparse convolution kernels beat dense ones only when C_in and C_out
       are large enough, about 256 or more, and a 3x3 kernel effectively multiplies C_in by 9 (NVIDIA/TensorRT
       issue #3849, https://github.com/NVIDIA/TensorRT/issues/3849; issue #4065). This is a rule of thumb, not a
       guarantee: the engine build log ("TRT inference plan picked sparse implementation for layers") is the
       measurement.

    Args:
        g: the layer.
        min_width: the width threshold of rule 3.
    """
    if g.kind == "depthwise":
        return Sparse24Verdict(
            False,
            "depthwise: one input channel per group, no group of 4 along the reduction dimension; TensorRT's "
            "sparse kernels cover dense convolutions and fully connected layers only",
            "not_eligible",
        )
    cpg = g.in_channels_per_group
    if cpg < 4 or cpg % 4:
        return Sparse24Verdict(
            False,
            f"{cpg} input channel(s) per group: 2:4 groups run along input channels and need a multiple of 4 "
            f"({SRC_TRT_SPARSITY})",
            "not_eligible",
        )
    k, n = g.reduction_length, g.out_channels
    if k >= min_width and n >= min_width:
        return Sparse24Verdict(
            True,
            f"2:4 along {cpg} input channels; wide enough (reduction {k}, out {n} >= {min_width}) for TensorRT "
            f"to pick sparse kernels ({SRC_TRT_SPARSITY_WIDTH})",
            "eligible",
        )
    narrow = " and ".join(
        f"{what} {v} < {min_width}" for what, v in (("reduction", k), ("out", n)) if v < min_width
    )
    return Sparse24Verdict(
        False,
        f"2:4 possible along {cpg} input channels, but unlikely to speed up: {narrow}; TensorRT keeps dense "
        f"kernels for narrow layers ({SRC_TRT_SPARSITY_WIDTH})",
        "eligible_no_speedup",
    )


# ----------------------------------------------------------------------------------------------------------------
# 2:4 pruning and weight statistics
# ----------------------------------------------------------------------------------------------------------------


def _groups_of_4(weight: np.ndarray) -> np.ndarray:
    """View [O, I, k...] as [O, k..., I/4, 4]: groups of 4 consecutive input channels at each (o, k...)."""
    w = np.moveaxis(weight, 1, -1)
    return w.reshape(*w.shape[:-1], w.shape[-1] // 4, 4)


def prune_2_4(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Magnitude 2:4 pruning along the reduction (input-channel) dimension, axis 1.

    Conv weights [O, I/group, kh, kw]: groups of 4 consecutive input channels at each (o, kh, kw); Gemm weights
    in the ``transB=1`` layout [O, I]: groups of 4 consecutive input features per output (for ``transB=0``,
    [I, O], pass ``weight.T`` and transpose back). In every group the 2 entries of largest |w| are kept (ties:
    the lower index), so every group of 4 has at least 2 zeros, as TensorRT's structured sparsity requires
    (TensorRT Developer Guide, "Structured Sparsity").

    Args:
        weight: float array of rank >= 2, any float dtype.

    Returns:
        ``(pruned, mask)``: ``pruned`` has the dtype and shape of ``weight``; ``mask`` is bool, same shape, True
        where a weight is kept (exactly 2 per group).

    Raises:
        ValueError: rank < 2, or the size of axis 1 is not a multiple of 4.
    """
    weight = np.asarray(weight)
    if weight.ndim < 2:
        raise ValueError(f"2:4 pruning needs a weight of rank >= 2, got shape {list(weight.shape)}")
    if weight.shape[1] % 4:
        raise ValueError(
            f"2:4 pruning runs along axis 1 (input channels), whose size {weight.shape[1]} is not a multiple "
            f"of 4 (weight shape {list(weight.shape)})"
        )
    groups = _groups_of_4(np.abs(weight))
    order = np.argsort(-groups, axis=-1, kind="stable")
    keep = np.zeros(groups.shape, dtype=bool)
    np.put_along_axis(keep, order[..., :2], True, axis=-1)
    # back to the weight's layout: [O, k..., I/4, 4] -> [O, k..., I] -> [O, I, k...]
    mask = np.moveaxis(keep.reshape(*groups.shape[:-2], -1), -1, 1)
    return np.where(mask, weight, np.zeros((), dtype=weight.dtype)), mask


def is_2to4(weight: np.ndarray) -> bool:
    """True when every group of 4 consecutive entries along axis 1 has at least 2 zeros (see :func:`prune_2_4`).

    False (not an error) when the size of axis 1 is not a multiple of 4 or the rank is < 2: such a weight cannot
    be 2:4 structured.
    """
    weight = np.asarray(weight)
    if weight.ndim < 2 or weight.shape[1] % 4 or weight.shape[1] == 0:
        return False
    return bool(((_groups_of_4(weight) == 0).sum(axis=-1) >= 2).all())


def _sparse_view(weight: np.ndarray, g: LayerGeometry) -> np.ndarray:
    """The weight in the [O, I, ...] layout that 2:4 runs along (Gemm transB=0 is transposed)."""
    return weight if g.weight_channel_axis == 0 else weight.T


def weight_sparsity(weight: np.ndarray) -> float:
    """Fraction in [0, 1] of weights exactly 0."""
    weight = np.asarray(weight)
    return float(np.count_nonzero(weight == 0) / max(weight.size, 1))


# ----------------------------------------------------------------------------------------------------------------
# report models
# ----------------------------------------------------------------------------------------------------------------


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="constants")


class VerdictModel(_Model):
    """A rule's verdict in the report."""

    ok: bool
    reason: str

    @classmethod
    def of(cls, v: Verdict) -> VerdictModel:
        return cls(ok=v.ok, reason=v.reason)


class Sparse24Model(VerdictModel):
    """2:4 verdict: ``ok`` only for ``outcome == 'eligible'`` (see :class:`Sparse24Verdict`)."""

    outcome: Sparse24Outcome

    @classmethod
    def of(cls, v: Sparse24Verdict) -> Sparse24Model:  # type: ignore[override]
        return cls(ok=v.ok, reason=v.reason, outcome=v.outcome)


class Int8Sensitivity(_Model):
    """Error added by this layer alone in INT8 (every other layer fp32), on the calibration images."""

    top1_agreement: float = Field(ge=0, le=1, description="fraction of images whose final top-1 matches fp32")
    kl: float = Field(description="mean KL(softmax(fp32 logits) || softmax(logits)), nats")
    output_sqnr_db: float = Field(description="SQNR of this layer's output vs fp32, dB (inf when equal)")


class LayerReport(_Model):
    """One Conv/Gemm layer. Units are in the names; MACs and params are per image / per layer."""

    index: int = Field(description="position among the analysed layers, in graph order")
    name: str = Field(description="ONNX node name")
    op_type: Literal["Conv", "Gemm"]
    kind: LayerKind
    input_name: str
    output_name: str
    weight_name: str
    weight_shape: list[int]
    in_channels: int
    out_channels: int
    groups: int
    kernel: list[int]
    stride: list[int]
    output_shape: list[int | str] = Field(description="shape of the output, batch dimension symbolic")
    macs: int = Field(ge=0, description="multiply-accumulates per image")
    params: int = Field(ge=0, description="weight + bias elements")
    weight_absmax_per_channel_min: float = Field(description="min over output channels of max |w|")
    weight_absmax_per_channel_max: float = Field(description="max over output channels of max |w|")
    input_activation_min: float = Field(description="min of the input activation on the calibration images")
    input_activation_max: float
    fp16_aligned: VerdictModel
    int8_aligned: VerdictModel
    sparse24_eligible: Sparse24Model
    sparsity: float = Field(ge=0, le=1, description="fraction of weights exactly 0")
    is_2to4_sparse: bool
    int8_sensitivity: Int8Sensitivity
    prune24_sqnr_db: float | None = Field(
        default=None,
        description="SQNR (dB) of this layer's output when only its weight is 2:4-pruned by magnitude; None "
        "when the weight cannot take the pattern",
    )


class AnalysisTotals(_Model):
    n_layers: int
    macs: int = Field(description="per image, over the analysed layers")
    params: int
    n_fp16_aligned: int
    n_int8_aligned: int
    n_sparse24_eligible: int
    n_sparse24_no_speedup: int
    n_sparse24_not_eligible: int
    macs_sparse24_eligible: int = Field(description="per image, in the 'eligible' layers")


class AnalysisReport(_Model):
    """``analysis.json``: the per-layer analysis of one ONNX model (schema-versioned)."""

    schema_version: str = SCHEMA_VERSION
    created_utc: str = Field(
        default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    model_path: str
    input_name: str
    input_shape: list[int | str]
    n_calibration_images: int
    activation_range_method: str = "minmax"
    quantization: str = (
        "one layer at a time: input uint8 asymmetric per tensor (calibration min/max), weight int8 symmetric per "
        "output channel, QDQ in ONNX Runtime"
    )
    onnxruntime_version: str = ""
    threads: int = 2
    wall_time_s: float = Field(ge=0, description="wall time of analyze(), seconds")
    layers: list[LayerReport]
    totals: AnalysisTotals

    def write(self, path: str | os.PathLike) -> Path:
        """Write atomically as JSON (temp file in the same folder, then rename); creates the folder."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".analysis-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            f.write(self.model_dump_json(indent=2))
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a report is meant to be read
        os.replace(tmp, path)
        return path

    @classmethod
    def read(cls, path: str | os.PathLike) -> AnalysisReport:
        """Read and validate.

        Raises:
            FileNotFoundError: no file at ``path``.
            ValueError: another schema major version, or invalid content.
        """
        from tcsched.manifest import read_versioned_json

        return cls.model_validate(read_versioned_json(path, SCHEMA_VERSION, "analysis", "tcsched analyze"))

    def layer(self, name: str) -> LayerReport:
        """The layer with ONNX node name ``name``.

        Raises:
            KeyError: no such layer.
        """
        for lay in self.layers:
            if lay.name == name:
                return lay
        raise KeyError(name)


# ----------------------------------------------------------------------------------------------------------------
# graph inspection
# ----------------------------------------------------------------------------------------------------------------


def _attr(node, name: str, default: Any = None) -> Any:
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def node_names(model: onnx.ModelProto) -> list[str]:
    """Node names, with ``<op_type>_<index>`` for nodes that have none."""
    return [n.name or f"{n.op_type}_{i}" for i, n in enumerate(model.graph.node)]


def layer_geometries(model: onnx.ModelProto) -> list[LayerGeometry]:
    """Every Conv/Gemm of the graph, in graph order, with the facts the rules need.

    Raises:
        ValueError: a Conv/Gemm whose weight is not an initializer (dynamic weights are not analysed), or a Gemm
            with ``transA=1``.
    """
    inits = {i.name: i for i in model.graph.initializer}
    names = node_names(model)
    out: list[LayerGeometry] = []
    for name, node in zip(names, model.graph.node, strict=True):
        if node.op_type not in LAYER_OPS:
            continue
        if len(node.input) < 2 or node.input[1] not in inits:
            raise ValueError(f"{node.op_type} {name}: its weight is not an initializer; cannot analyse it")
        wshape = tuple(int(d) for d in inits[node.input[1]].dims)
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        if node.op_type == "Conv":
            group = int(_attr(node, "group", 1))
            kernel = wshape[2:]
            stride = tuple(int(s) for s in (_attr(node, "strides") or [1] * len(kernel)))
            g = LayerGeometry(
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
        else:
            if int(_attr(node, "transA", 0)):
                raise ValueError(f"Gemm {name}: transA=1 is not supported")
            trans_b = bool(_attr(node, "transB", 0))
            n_out, n_in = wshape if trans_b else wshape[::-1]
            g = LayerGeometry(
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
        out.append(g)
    return out


def _dims(type_proto) -> list[int | str] | None:
    t = type_proto.tensor_type
    if not t.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim]


def inferred_shapes(model: onnx.ModelProto) -> dict[str, list[int | str]]:
    """Tensor name -> shape from ``onnx.shape_inference`` (symbolic dims as their names, unknown as ``"?"``)."""
    from onnx import shape_inference

    inferred = shape_inference.infer_shapes(model)
    g = inferred.graph
    shapes: dict[str, list[int | str]] = {}
    for vi in [*g.input, *g.value_info, *g.output]:
        d = _dims(vi.type)
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


# ----------------------------------------------------------------------------------------------------------------
# quantization helpers (numpy)
# ----------------------------------------------------------------------------------------------------------------


def activation_qparams(lo: float, hi: float) -> tuple[float, int]:
    """uint8 asymmetric (scale, zero point) for the range [lo, hi], widened to include 0 (as ONNX Runtime).

    scale = (hi - lo) / 255, zero point = round(-lo / scale) clipped to [0, 255]; a zero range gives scale 1.
    """
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    scale = (hi - lo) / 255.0
    if not np.isfinite(scale) or scale <= 0:
        return 1.0, 0
    return scale, int(np.clip(round(-lo / scale), 0, 255))


def quantize_weight_per_channel(weight: np.ndarray, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per-channel quantization: scale_c = max|w_c| / 127, q = clip(round(w / scale), -127, 127).

    Returns:
        ``(q, scale)``: q int8 with the weight's shape; scale float32 [weight.shape[axis]] (1 for all-zero
        channels).
    """
    w = np.asarray(weight, dtype=np.float32)
    other = tuple(i for i in range(w.ndim) if i != axis)
    absmax = np.abs(w).max(axis=other) if other else np.abs(w)
    scale = np.where(absmax > 0, absmax / 127.0, 1.0).astype(np.float32)
    shape = [1] * w.ndim
    shape[axis] = -1
    q = np.clip(np.round(w / scale.reshape(shape)), -127, 127).astype(np.int8)
    return q, scale


class _SqnrAccumulator:
    """SQNR over batches: 10 log10(sum ref^2 / sum (ref - cand)^2), float64 sums (= :func:`tcsched.metrics.sqnr_db`
    on the concatenation, without holding every batch)."""

    def __init__(self) -> None:
        self.signal = 0.0
        self.noise = 0.0

    def add(self, ref: np.ndarray, cand: np.ndarray) -> None:
        r = ref.astype(np.float64, copy=False).ravel()
        d = r - cand.ravel()
        self.signal += float(np.dot(r, r))
        self.noise += float(np.dot(d, d))

    @property
    def db(self) -> float:
        if self.noise == 0:
            return math.inf
        if self.signal == 0:
            return -math.inf
        return 10.0 * math.log10(self.signal / self.noise)


# ----------------------------------------------------------------------------------------------------------------
# running
# ----------------------------------------------------------------------------------------------------------------

Calibration = np.ndarray | Iterable[Mapping[str, np.ndarray]]


def _session_options(threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    return so


def _session(model_bytes: bytes, so):
    import onnxruntime as ort

    return ort.InferenceSession(model_bytes, sess_options=so, providers=["CPUExecutionProvider"])


def _calibration_feeds(
    calibration: Calibration, input_name: str, input_shape: Sequence[int | str], batch_size: int
) -> list[dict[str, np.ndarray]]:
    """Normalise the calibration data into feeds of at most ``batch_size`` images (fail fast on bad data)."""
    static_batch = input_shape[0] if input_shape and isinstance(input_shape[0], int) else None
    bs = static_batch or batch_size

    def check(x: np.ndarray, where: str) -> None:
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

    if isinstance(calibration, np.ndarray):
        check(calibration, "calibration")
        return [
            {input_name: np.ascontiguousarray(calibration[i : i + bs])}
            for i in range(0, len(calibration), bs)
        ]
    if isinstance(calibration, Mapping | str | bytes):
        raise ValueError("calibration must be a float32 array [N, C, H, W] or an iterable of feed dicts")
    feeds: list[dict[str, np.ndarray]] = []
    for i, feed in enumerate(calibration):
        if not isinstance(feed, Mapping) or input_name not in feed:
            raise ValueError(f"calibration feed {i} must be a dict with the model input {input_name!r}")
        x = feed[input_name]
        check(x, f"calibration feed {i}")
        for j in range(0, len(x), bs):
            feeds.append({input_name: np.ascontiguousarray(x[j : j + bs])})
    if not feeds:
        raise ValueError("calibration data is empty: at least one image is needed")
    return feeds


def _fp32_pass(
    model: onnx.ModelProto,
    geos: Sequence[LayerGeometry],
    feeds: Sequence[dict[str, np.ndarray]],
    so,
    on_batch=None,
) -> tuple[np.ndarray, dict[str, tuple[float, float]]]:
    """One fp32 pass with every layer input exposed: the logits [N, classes] and each input's (min, max)."""
    from onnx import TensorProto, helper

    m = type(model)()
    m.CopyFrom(model)
    graph_inputs = {i.name for i in m.graph.input}
    existing = {o.name for o in m.graph.output}
    wanted: dict[str, int] = {}  # tensor -> rank
    for g in geos:
        if g.input_name not in graph_inputs and g.input_name not in existing:
            wanted[g.input_name] = len(g.weight_shape) if g.op_type == "Conv" else 2
    m.graph.output.extend(
        helper.make_tensor_value_info(t, TensorProto.FLOAT, [None] * r) for t, r in wanted.items()
    )
    sess = _session(m.SerializeToString(), so)
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


def _np_init(array: np.ndarray, name: str):
    from onnx import numpy_helper

    return numpy_helper.from_array(np.asarray(array), name)


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
    from onnx import TensorProto, helper

    m = type(base)()
    m.CopyFrom(base)
    graph = m.graph
    idx = next(i for i, n in enumerate(graph.node) if (n.name or f"{n.op_type}_{i}") == g.name)
    node = graph.node[idx]
    axis = g.weight_channel_axis
    scale, zp = activation_qparams(*input_range)
    wq, wscale = quantize_weight_per_channel(weight, axis)
    p = prefix
    graph.initializer.extend(
        [
            _np_init(np.array(scale, dtype=np.float32), f"{p}_x_scale"),
            _np_init(np.array(zp, dtype=np.uint8), f"{p}_x_zp"),
            _np_init(wq, f"{p}_w_q"),
            _np_init(wscale, f"{p}_w_scale"),
            _np_init(np.zeros(wscale.shape, dtype=np.int8), f"{p}_w_zp"),
        ]
    )
    ref = helper.make_node(node.op_type, list(node.input), [f"{p}_ref"], name=f"{p}_ref_node")
    ref.attribute.extend(node.attribute)
    new_nodes = [
        helper.make_node(
            "QuantizeLinear", [g.input_name, f"{p}_x_scale", f"{p}_x_zp"], [f"{p}_x_q"], name=f"{p}_xq"
        ),
        helper.make_node(
            "DequantizeLinear", [f"{p}_x_q", f"{p}_x_scale", f"{p}_x_zp"], [f"{p}_x_dq"], name=f"{p}_xdq"
        ),
        helper.make_node(
            "DequantizeLinear",
            [f"{p}_w_q", f"{p}_w_scale", f"{p}_w_zp"],
            [f"{p}_w_dq"],
            name=f"{p}_wdq",
            axis=axis,
        ),
        ref,
    ]
    outputs = {"logits": base.graph.output[0].name, "int8": g.output_name, "ref": f"{p}_ref"}
    if prune:
        pruned, _ = prune_2_4(_sparse_view(weight, g))
        graph.initializer.append(_np_init(_sparse_view(pruned, g).astype(np.float32), f"{p}_w_p24"))
        inputs = list(node.input)
        inputs[1] = f"{p}_w_p24"
        p24 = helper.make_node(node.op_type, inputs, [f"{p}_p24"], name=f"{p}_p24_node")
        p24.attribute.extend(node.attribute)
        new_nodes.append(p24)
        outputs["p24"] = f"{p}_p24"
    node.input[0] = f"{p}_x_dq"
    node.input[1] = f"{p}_w_dq"
    for k, n in enumerate(new_nodes):
        graph.node.insert(idx + k, n)
    existing = {o.name for o in graph.output}
    rank = len(g.weight_shape) if g.op_type == "Conv" else 2
    graph.output.extend(
        helper.make_tensor_value_info(t, TensorProto.FLOAT, [None] * rank)
        for key, t in outputs.items()
        if key != "logits" and t not in existing
    )
    return m, outputs


def _probe(
    base: onnx.ModelProto,
    g: LayerGeometry,
    weight: np.ndarray,
    input_range: tuple[float, float],
    prune: bool,
    feeds: Sequence[dict[str, np.ndarray]],
    ref_logits: np.ndarray,
    so,
) -> tuple[Int8Sensitivity, float | None, list[int]]:
    """Run the probe graph of layer ``g``: its INT8 sensitivity, its 2:4 output SQNR (dB), its output shape."""
    m, outs = build_probe_model(base, g, weight, input_range, prune)
    sess = _session(m.SerializeToString(), so)
    names = list(dict.fromkeys(outs.values()))
    int8_acc, p24_acc = _SqnrAccumulator(), _SqnrAccumulator()
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
    return sens, (p24_acc.db if prune else None), shape


def analyze(
    onnx_path: str | os.PathLike,
    calibration: Calibration,
    *,
    progress: bool = True,
    batch_size: int = 8,
    threads: int = 2,
    console: Console | None = None,
) -> AnalysisReport:
    """Analyse every Conv/Gemm of an ONNX classifier (see the module docstring for what is measured).

    Args:
        onnx_path: fp32 ONNX graph with one input (float32 [N, C, H, W]) whose first output is the logits
            [N, classes]; opset >= 13 (per-axis DequantizeLinear).
        calibration: float32 array [N, C, H, W] of preprocessed images, or an iterable of ONNX Runtime feed dicts
            ``{input_name: float32 [n, C, H, W]}``. Used both for the activation ranges and for the errors.
        progress: show a rich progress bar.
        batch_size: images per ``session.run`` (a static batch in the model wins).
        threads: ONNX Runtime intra-op threads.
        console: where the progress goes.

    Returns:
        The :class:`AnalysisReport` (not written; see :meth:`AnalysisReport.write`).

    Raises:
        FileNotFoundError: no file at ``onnx_path``.
        ValueError: before any inference: bad ``batch_size``/``threads``, a model with != 1 input, opset < 13,
            no Conv/Gemm, a weight that is not an initializer, or calibration data of the wrong dtype/shape.
    """
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    t0 = time.perf_counter()
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    path = Path(onnx_path)
    if not path.is_file():
        raise FileNotFoundError(f"no ONNX model at {path}")
    model = onnx.load(str(path))
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 13:
        raise ValueError(f"{path}: opset {opset} < 13 (per-axis DequantizeLinear needs 13)")
    inits = {i.name for i in model.graph.initializer}
    real_inputs = [i for i in model.graph.input if i.name not in inits]
    if len(real_inputs) != 1:
        raise ValueError(f"{path}: expected one input, got {[i.name for i in real_inputs]}")
    input_name = real_inputs[0].name
    input_shape = _dims(real_inputs[0].type) or []
    geos = layer_geometries(model)
    if not geos:
        raise ValueError(f"{path}: no Conv/Gemm layer to analyse")
    feeds = _calibration_feeds(calibration, input_name, input_shape, batch_size)
    n_images = sum(len(f[input_name]) for f in feeds)
    shapes = inferred_shapes(model)
    weights = {
        i.name: numpy_helper.to_array(i).astype(np.float32, copy=False)
        for i in model.graph.initializer
        if i.name in {g.weight_name for g in geos} | {g.bias_name for g in geos if g.bias_name}
    }
    so = _session_options(threads)
    console = console or Console(stderr=True)

    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=not progress,
        transient=False,
    ) as bar:
        t_ranges = bar.add_task("fp32 pass: activation ranges", total=len(feeds))
        ref_logits, ranges = _fp32_pass(model, geos, feeds, so, on_batch=lambda: bar.advance(t_ranges))
        t_layers = bar.add_task("per-layer INT8 / 2:4 probes", total=len(geos))
        layers: list[LayerReport] = []
        for i, g in enumerate(geos):
            bar.update(t_layers, description=f"probe {g.name[-48:]}")
            w = weights[g.weight_name]
            sv = _sparse_view(w, g)
            verdict24 = rule_sparse24(g)
            can_prune = sv.shape[1] % 4 == 0 and g.kind != "depthwise"
            sens, p24, obs = _probe(model, g, w, ranges[g.input_name], can_prune, feeds, ref_logits, so)
            # shape inference first (symbolic batch); the shape seen at run time where it left a dim unknown
            out_shape: list[int | str] = list(shapes.get(g.output_name, []))
            if len(out_shape) != len(obs) or any(not isinstance(d, int) for d in out_shape[1:]):
                out_shape = [out_shape[0] if out_shape and isinstance(out_shape[0], str) else "N", *obs[1:]]
            absmax = np.abs(w).max(axis=tuple(a for a in range(w.ndim) if a != g.weight_channel_axis))
            bias_n = weights[g.bias_name].size if g.bias_name in weights else 0
            layers.append(
                LayerReport(
                    index=i,
                    name=g.name,
                    op_type=g.op_type,  # type: ignore[arg-type]
                    kind=g.kind,
                    input_name=g.input_name,
                    output_name=g.output_name,
                    weight_name=g.weight_name,
                    weight_shape=list(g.weight_shape),
                    in_channels=g.in_channels,
                    out_channels=g.out_channels,
                    groups=g.group,
                    kernel=list(g.kernel),
                    stride=list(g.stride),
                    output_shape=out_shape,
                    macs=layer_macs(g, out_shape),
                    params=int(w.size + bias_n),
                    weight_absmax_per_channel_min=float(absmax.min()),
                    weight_absmax_per_channel_max=float(absmax.max()),
                    input_activation_min=ranges[g.input_name][0],
                    input_activation_max=ranges[g.input_name][1],
                    fp16_aligned=VerdictModel.of(rule_fp16_alignment(g)),
                    int8_aligned=VerdictModel.of(rule_int8_alignment(g)),
                    sparse24_eligible=Sparse24Model.of(verdict24),
                    sparsity=weight_sparsity(w),
                    is_2to4_sparse=is_2to4(sv),
                    int8_sensitivity=sens,
                    prune24_sqnr_db=p24,
                )
            )
            bar.advance(t_layers)
        bar.update(t_layers, description="per-layer INT8 / 2:4 probes")

    outcome = [lay.sparse24_eligible.outcome for lay in layers]
    totals = AnalysisTotals(
        n_layers=len(layers),
        macs=sum(lay.macs for lay in layers),
        params=sum(lay.params for lay in layers),
        n_fp16_aligned=sum(lay.fp16_aligned.ok for lay in layers),
        n_int8_aligned=sum(lay.int8_aligned.ok for lay in layers),
        n_sparse24_eligible=outcome.count("eligible"),
        n_sparse24_no_speedup=outcome.count("eligible_no_speedup"),
        n_sparse24_not_eligible=outcome.count("not_eligible"),
        macs_sparse24_eligible=sum(lay.macs for lay in layers if lay.sparse24_eligible.outcome == "eligible"),
    )
    return AnalysisReport(
        model_path=str(path),
        input_name=input_name,
        input_shape=input_shape,
        n_calibration_images=n_images,
        onnxruntime_version=ort.__version__,
        threads=threads,
        wall_time_s=time.perf_counter() - t0,
        layers=layers,
        totals=totals,
    )


# ----------------------------------------------------------------------------------------------------------------
# presentation
# ----------------------------------------------------------------------------------------------------------------


def short_name(name: str) -> str:
    """A compact layer name: ``/features/features.1/conv/conv.0/conv.0.0/Conv`` -> ``features.1.conv.0.0``."""
    parts = [p for p in name.strip("/").split("/") if p]
    if len(parts) > 1 and parts[-1] in (*LAYER_OPS, "MatMul"):
        parts = parts[:-1]
    if not parts:
        return name
    out, prev = parts[0], parts[0]
    for seg in parts[1:]:
        out += seg[len(prev) :] if seg.startswith(prev + ".") else "." + seg
        prev = seg
    return out


def _fmt_db(v: float | None) -> str:
    if v is None:
        return "-"
    return "inf" if math.isinf(v) else f"{v:.1f}"


def print_table(report: AnalysisReport, console: Console | None = None, top: int = 5) -> None:
    """Print the per-layer table and a short summary (the ``top`` most INT8-sensitive layers by KL)."""
    console = console or Console()
    t = Table(
        title=f"layer analysis: {report.model_path} ({report.n_calibration_images} calibration images)",
        show_lines=False,
    )
    cols = [
        ("#", "right"),
        ("layer", "left"),
        ("kind", "left"),
        ("in→out", "right"),
        ("k", "right"),
        ("s", "right"),
        ("MMACs", "right"),
        ("fp16", "center"),
        ("int8", "center"),
        ("2:4", "left"),
        ("int8 KL", "right"),
        ("agree", "right"),
        ("SQNR int8 dB", "right"),
        ("SQNR 2:4 dB", "right"),
    ]
    for c, j in cols:
        t.add_column(c, justify=j)  # type: ignore[arg-type]
    mark = {True: "[green]✓[/green]", False: "[red]✗[/red]"}
    s24 = {
        "eligible": "[green]eligible[/green]",
        "eligible_no_speedup": "[yellow]narrow[/yellow]",
        "not_eligible": "[red]no[/red]",
    }
    for lay in report.layers:
        s = lay.int8_sensitivity
        t.add_row(
            str(lay.index),
            short_name(lay.name),
            lay.kind,
            f"{lay.in_channels}→{lay.out_channels}",
            "x".join(map(str, lay.kernel)),
            "x".join(map(str, lay.stride)),
            f"{lay.macs / 1e6:.2f}",
            mark[lay.fp16_aligned.ok],
            mark[lay.int8_aligned.ok],
            s24[lay.sparse24_eligible.outcome],
            f"{s.kl:.2e}",
            f"{100 * s.top1_agreement:.1f}%",
            _fmt_db(s.output_sqnr_db),
            _fmt_db(lay.prune24_sqnr_db),
        )
    console.print(t)
    tot = report.totals
    console.print(
        f"{tot.n_layers} layers, {tot.macs / 1e6:.1f} MMACs and {tot.params / 1e6:.2f} M params per image; "
        f"fp16-aligned {tot.n_fp16_aligned}, int8-aligned {tot.n_int8_aligned}; 2:4: {tot.n_sparse24_eligible} "
        f"eligible ({100 * tot.macs_sparse24_eligible / max(tot.macs, 1):.1f}% of MACs), "
        f"{tot.n_sparse24_no_speedup} too narrow to speed up, {tot.n_sparse24_not_eligible} not eligible; "
        f"analysis {report.wall_time_s:.1f} s"
    )
    worst = sorted(report.layers, key=lambda la: la.int8_sensitivity.kl, reverse=True)[:top]
    console.print(
        "most INT8-sensitive (KL, nats): "
        + ", ".join(f"#{la.index} {short_name(la.name)} {la.int8_sensitivity.kl:.2e}" for la in worst)
    )


def plot(report: AnalysisReport, png_path: str | os.PathLike) -> Path:
    """PNG: per layer (x = layer index), MACs as bars colored by kind, and INT8 sensitivity (KL, log scale)
    with the INT8 and 2:4 output SQNR (dB) below it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    layers = report.layers
    x = np.arange(len(layers))
    colors = {
        "full": "tab:red",
        "pointwise": "tab:blue",
        "depthwise": "tab:orange",
        "grouped": "tab:purple",
        "linear": "tab:green",
    }
    fig, (ax1, ax2, ax3) = plt.subplots(3, 1, figsize=(max(8, 0.22 * len(layers) + 3), 9), sharex=True)
    ax1.bar(x, [la.macs / 1e6 for la in layers], color=[colors[la.kind] for la in layers])
    ax1.set_ylabel("MMACs / image")
    handles = [Patch(color=c, label=k) for k, c in colors.items() if any(la.kind == k for la in layers)]
    eligible = [i for i, la in enumerate(layers) if la.sparse24_eligible.outcome == "eligible"]
    if eligible:
        handles.append(
            ax1.scatter(
                eligible,
                [layers[i].macs / 1e6 for i in eligible],
                marker="*",
                color="k",
                zorder=3,
                label="2:4 eligible",
            )
        )
    ax1.legend(handles=handles, fontsize=8, ncol=3)
    ax1.set_title(
        f"{Path(report.model_path).name}: per-layer analysis ({report.n_calibration_images} images)"
    )
    kl = np.array([max(la.int8_sensitivity.kl, 1e-9) for la in layers])
    ax2.semilogy(x, kl, "o-", color="tab:red", markersize=4)
    ax2.set_ylabel("INT8 alone: KL (nats)")
    ax2.grid(True, which="both", alpha=0.3)
    sq = [la.int8_sensitivity.output_sqnr_db for la in layers]
    ax3.plot(x, [v if math.isfinite(v) else np.nan for v in sq], "o-", markersize=4, label="INT8 output SQNR")
    p24 = [la.prune24_sqnr_db for la in layers]
    ax3.plot(
        x,
        [v if v is not None and math.isfinite(v) else np.nan for v in p24],
        "s",
        markersize=4,
        label="2:4-pruned output SQNR",
    )
    ax3.set_ylabel("SQNR (dB)")
    ax3.set_xlabel("layer index (graph order)")
    ax3.grid(True, alpha=0.3)
    ax3.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------


def load_calibration(calib_dir: Path | None, limit: int) -> np.ndarray:
    """Preprocess up to ``limit`` images of ``calib_dir`` (default: the photos shipped in scikit-image).

    Returns:
        float32 [n, 3, 224, 224].
    """
    from tcsched.data import default_photos, list_images
    from tcsched.imaging import preprocess_bytes

    items = (list_images(calib_dir) if calib_dir else default_photos())[:limit]
    return np.stack([preprocess_bytes(it.read_bytes()) for it in items]).astype(np.float32, copy=False)


def analyze_command(
    model: Path = typer.Option(
        None, help="fp32 ONNX model (default: export torchvision MobileNetV2 into .tcsched/analysis)"
    ),
    calib_dir: Path = typer.Option(None, help="calibration images (default: photos shipped in scikit-image)"),
    limit: int = typer.Option(32, help="at most this many calibration images"),
    output: Path = typer.Option(
        Path("reports/analysis"), "--output", "-o", help="folder for analysis.json and analysis.png"
    ),
) -> None:
    """Per-layer analysis of a classifier: MACs, Tensor Core alignment, 2:4 eligibility, INT8 sensitivity."""
    console = Console(width=None if sys.stdout.isatty() else 160)
    if limit < 1:
        raise typer.BadParameter(f"--limit must be >= 1, got {limit}")
    if calib_dir is not None and not calib_dir.is_dir():
        raise typer.BadParameter(f"calibration folder {calib_dir} does not exist")
    if model is not None and not model.is_file():
        raise typer.BadParameter(f"no ONNX model at {model}")
    if model is None:
        from tcsched.build_tools import export as ex

        work = Path(".tcsched/analysis")
        work.mkdir(parents=True, exist_ok=True)
        with console.status("export ONNX (torchvision MobileNetV2, IMAGENET1K_V1)"):
            model = ex.export_onnx(ex.load_mobilenet_v2(), work / "fp32.onnx")
    with console.status("preprocess calibration images"):
        calib = load_calibration(calib_dir, limit)
    try:
        report = analyze(model, calib, console=console)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    print_table(report, console)
    json_path = report.write(output / ANALYSIS_FILENAME)
    png_path = plot(report, output / PLOT_FILENAME)
    console.print(f"wrote {json_path} and {png_path}")
