"""Search for int8_mixed: which nodes of the int8 graph return to float, as few and as cheap as the budget allows.

- :func:`rank_in_context`: each quantized node's error, measured leave-one-out in the int8 graph.
- :func:`cost_aware_ranking`: that error per MAC that goes back to float.
- :func:`search_mixed`: the smallest prefix of the ranking that meets the accuracy budget under a latency cap.
- :func:`float_groups` / :func:`float_group_study`: whole kinds of layers in float, when the budget is missed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx

from tcsched.build_tools.graph_surgery import dequantize_layers
from tcsched.build_tools.quantize import producers
from tcsched.build_tools.scoring import Score, run_model
from tcsched.metrics import mean_kl

RANKED_OPS = ("Conv", "Gemm", "Add")

# cost_aware_ranking adds this fraction of the whole graph's MACs to every node's float cost: a node whose own
# float cost is ~0 (a residual Add next to no Conv producer) then ranks by its KL gain over a small cost instead
# of dividing by ~0. A chosen smoothing term (0.5% of MobileNetV2's ~300M MACs is ~1.5M, a small pointwise
# layer), not a tuned one: no measurement of other values is recorded.
FLOAT_COST_FLOOR_FRACTION = 0.005


def rank_in_context(
    qdq: onnx.ModelProto,
    reference: onnx.ModelProto,
    x: np.ndarray,
    ref_logits: np.ndarray,
    op_types: Sequence[str] = RANKED_OPS,
    threads: int = 2,
    on_step: Callable[[int], None] | None = None,
) -> list[tuple[str, float]]:
    """Rank the quantized nodes of an int8 graph by the error each one adds *in context*: the mean KL vs fp32
    removed when only that node returns to float (leave-one-out on the full int8 graph), on images ``x``.

    Unlike a one-layer-at-a-time probe on the fp32 graph, this sees the interactions of the real int8 graph and
    ranks the residual Adds too (whose quantization MobileNetV2 is sensitive to). Cost: one ONNX Runtime
    session and one pass over ``x`` per node. Returns (node name, KL removed) pairs, largest first.
    """
    base = mean_kl(ref_logits, run_model(qdq, x, threads))
    names = [n.name for n in qdq.graph.node if n.op_type in op_types]
    gains = []
    for i, name in enumerate(names):
        kl = mean_kl(ref_logits, run_model(dequantize_layers(qdq, [name], reference), x, threads))
        gains.append((name, base - kl))
        if on_step is not None:
            on_step(i)
    return sorted(gains, key=lambda t: -t[1])


def cost_aware_ranking(
    gains: Sequence[tuple[str, float]], float_cost: dict[str, int], total_macs: int
) -> list[str]:
    """The nodes with a positive gain, ordered by KL removed per float MAC (largest first), so that the few float
    layers are also cheap ones: gain / (cost + :data:`FLOAT_COST_FLOOR_FRACTION` * ``total_macs``).

    Args:
        gains: (node, KL removed) from :func:`rank_in_context`.
        float_cost: node -> MACs per image that run in float with it (``graph_surgery.float_cost_macs``).
        total_macs: MACs per image of the whole graph.
    """
    floor = FLOAT_COST_FLOOR_FRACTION * total_macs
    ordered = sorted(gains, key=lambda t: -t[1] / (float_cost[t[0]] + floor))
    return [n for n, gain in ordered if gain > 0]


@dataclass(frozen=True)
class Trial:
    """One evaluated candidate of :func:`search_mixed`: the ``k`` first ranked nodes in float, and its score."""

    k: int
    score: Score


@dataclass
class MixedSearchResult:
    """Outcome of :func:`search_mixed`: the float layers, and what each tried count measured."""

    float_layers: list[str]
    met_budget: bool
    score: Score
    trials: list[Trial] = field(default_factory=list)  # evaluated candidates, in k order
    latency_ratios: dict[int, float] = field(default_factory=dict)  # k -> measured latency / fp32's
    # the k at which the scan stopped: the second in a row over max_latency_ratio (neither was evaluated)
    stopped_at: int | None = None


class _LatencyGate:
    """The latency cap of :func:`search_mixed`: a candidate over the cap is timed twice and judged on the mean;
    the second confirmed one in a row stops the scan."""

    def __init__(self, latency_ratio: Callable | None, cap: float | None):
        self.latency_ratio, self.cap = latency_ratio, cap
        self.ratios: dict[int, float] = {}
        self.over_in_a_row = 0

    def admits(self, k: int, model: onnx.ModelProto) -> bool:
        if self.latency_ratio is None:
            return True
        self.ratios[k] = self.latency_ratio(model)
        if self.cap is not None and self.ratios[k] > self.cap:
            # one timing near the cap is noisy: confirm with a second one and judge their mean
            self.ratios[k] = (self.ratios[k] + self.latency_ratio(model)) / 2
            if self.ratios[k] > self.cap:
                self.over_in_a_row += 1
                return False
        self.over_in_a_row = 0
        return True


def search_mixed(
    qdq: onnx.ModelProto,
    ranking: Sequence[str],
    evaluate: Callable[[onnx.ModelProto], Score],
    max_drop_points: float,
    min_agreement: float,
    max_float_layers: int | None = None,
    reference: onnx.ModelProto | None = None,
    latency_ratio: Callable[[onnx.ModelProto], float] | None = None,
    max_latency_ratio: float | None = None,
) -> MixedSearchResult:
    """Smallest k such that returning the k most sensitive layers (``ranking``, most sensitive first) to float
    meets the budget on the selection split. ``reference`` is the fp32 graph (see :func:`dequantize_layers`).

    A linear scan k = 0, 1, 2, ... with an early stop: on a few hundred images agreement moves in steps of one
    image and is not monotonic in k, so a bisection can jump far past the smallest k that works (measured on
    MobileNetV2). At most ``max_float_layers`` + 1 evaluations.

    ``latency_ratio(model)`` (measured latency / fp32's) is called for every k >= 1 before its accuracy. A k
    measured above ``max_latency_ratio`` is timed a second time and judged on the mean of the two; a k whose mean
    is still above the cap is skipped (never evaluated, never the result: met or not, the result is not slower
    than the cap), and the scan stops at the second such k in a row (more float layers only add reorders and
    float work; why one over the cap does not stop it: README, "Measured here").

    When no k meets the budget, the result is the tried k with the lowest KL vs fp32 (the fewest float layers on a
    tie). KL is a mean over every image; agreement on ~130 images moves in 0.8-point steps and is not monotonic in
    k, so picking by it would choose k by one or two images.

    Raises:
        ValueError: empty ranking or budgets out of range.
    """
    if not ranking:
        raise ValueError("ranking must name at least one layer")
    if max_drop_points < 0 or not 0 <= min_agreement <= 1:
        raise ValueError(f"bad budget: drop {max_drop_points} points, agreement {min_agreement}")
    if max_latency_ratio is not None and (latency_ratio is None or not max_latency_ratio > 0):
        raise ValueError(
            f"max_latency_ratio {max_latency_ratio} needs a latency_ratio function and a value > 0"
        )
    n = min(len(ranking), max_float_layers if max_float_layers is not None else len(ranking))
    trials: list[Trial] = []
    best: Trial | None = None
    gate = _LatencyGate(latency_ratio, max_latency_ratio)
    for k in range(n + 1):
        model = dequantize_layers(qdq, ranking[:k], reference) if k else qdq
        if k and not gate.admits(k, model):
            if gate.over_in_a_row == 2:
                assert best is not None  # k=0 is never timed, so it was evaluated
                return MixedSearchResult(list(ranking[: best.k]), False, best.score, trials, gate.ratios, k)
            continue
        trial = Trial(k, evaluate(model))
        trials.append(trial)
        if trial.score.meets(max_drop_points, min_agreement):
            return MixedSearchResult(list(ranking[:k]), True, trial.score, trials, gate.ratios)
        if best is None or trial.score.kl < best.score.kl:
            best = trial
    assert best is not None  # k=0 is always evaluated
    return MixedSearchResult(list(ranking[: best.k]), False, best.score, trials, gate.ratios)


@dataclass
class GroupTrial:
    """One row of :func:`float_group_study`: every node of ``group`` returned to float at once."""

    group: str
    layers: list[str]
    score: Score
    latency_ratio: float | None = None  # measured latency / fp32's (unitless), None when not measured


def float_groups(
    qdq: onnx.ModelProto, kinds: dict[str, str], reference: onnx.ModelProto
) -> dict[str, list[str]]:
    """The quantized Conv/Gemm/Add nodes of an int8 graph grouped by what they compute.

    ``kinds`` maps Conv/Gemm node names to their layer kind (``analysis.json``: pointwise / depthwise / grouped
    / full / linear). Pointwise layers are split by ``reference`` (the fp32 graph) into those followed by a
    Clip/Relu ("pointwise + activation": MobileNetV2's expansions) and the linear ones ("pointwise, linear":
    its projections, the linear bottlenecks of Sandler et al. 2018, arXiv:1801.04381); Add nodes whose inputs
    are quantized form "residual add". Groups keep graph order; empty groups are left out.
    """
    prod = producers(qdq.graph)
    consumers: dict[str, list[str]] = {}
    for n in reference.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n.op_type)
    ref_out = {n.name: n.output[0] for n in reference.graph.node}
    groups: dict[str, list[str]] = {}
    for n in qdq.graph.node:
        quantized = any(prod.get(i) is not None and prod[i].op_type == "DequantizeLinear" for i in n.input)
        if not quantized:
            continue
        if n.op_type == "Add":
            group = "residual add"
        elif n.name in kinds:
            group = kinds[n.name]
            if group == "pointwise":
                acts = {"Clip", "Relu"} & set(consumers.get(ref_out.get(n.name, ""), []))
                group = "pointwise + activation" if acts else "pointwise, linear"
        else:
            continue
        groups.setdefault(group, []).append(n.name)
    return groups


def float_group_study(
    qdq: onnx.ModelProto,
    groups: dict[str, list[str]],
    evaluate: Callable[[onnx.ModelProto], Score],
    reference: onnx.ModelProto,
    latency_ratio: Callable[[onnx.ModelProto], float] | None = None,
) -> list[GroupTrial]:
    """Return each whole group of :func:`float_groups` to float (:func:`dequantize_layers`) and measure it.

    What the layer-by-layer search cannot show: how far the accuracy budget is from what any cheap set of float
    layers can give, and what the whole kinds cost. One ``evaluate`` (and one ``latency_ratio``, when given)
    per group, in ``groups`` order.

    Raises:
        ValueError: a group is empty or names a node the graph does not have.
    """
    rows = []
    for group, layers in groups.items():
        if not layers:
            raise ValueError(f"group {group!r} is empty")
        model = dequantize_layers(qdq, layers, reference)
        ratio = latency_ratio(model) if latency_ratio is not None else None
        rows.append(GroupTrial(group, list(layers), evaluate(model), ratio))
    return rows
