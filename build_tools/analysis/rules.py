"""The layer rules: each takes a :class:`~tcsched.build_tools.analysis.geometry.LayerGeometry` and returns a
:class:`Verdict` (``ok`` and a ``reason`` naming its source). :data:`RULES` lists them with the report field
that holds each verdict; :func:`run_rules` applies them all in one loop."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from tcsched.build_tools.analysis.geometry import LayerGeometry

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

Sparse24Outcome = Literal["eligible", "eligible_no_speedup", "not_eligible"]


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


@dataclass(frozen=True)
class Rule:
    """One rule of the analysis: ``check`` gives the verdict, stored in the report's ``field`` of each layer."""

    field: str
    check: Callable[[LayerGeometry], Verdict]


RULES: tuple[Rule, ...] = (
    Rule("fp16_aligned", rule_fp16_alignment),
    Rule("int8_aligned", rule_int8_alignment),
    Rule("sparse24_eligible", rule_sparse24),
)
"""Every rule, in report order; ``LayerReport`` has one verdict field per rule."""


def run_rules(g: LayerGeometry, rules: tuple[Rule, ...] = RULES) -> dict[str, Verdict]:
    """Every rule's verdict on ``g``: report field -> :class:`Verdict`."""
    return {rule.field: rule.check(g) for rule in rules}
