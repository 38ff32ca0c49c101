"""Strategy decision: the precision variants beyond fp32, each an ONNX graph (the single source of every variant).

- ``fp16``: ONNX Runtime's float16 converter (``onnxruntime.transformers.float16``) with fp32 inputs/outputs
  (``keep_io_types``): Cast nodes at the boundary, fp16 weights and compute inside. TensorRT compiles the casts
  into FP16 kernels (strongly typed network); ONNX Runtime's CPU provider only emulates it.
- ``int8``: :func:`tcsched.build_tools.quantize.quantize_int8`, calibration method chosen by measurement.
- ``int8_mixed``: the int8 QDQ graph with the most sensitive layers returned to float
  (:func:`dequantize_layers`), as few as the accuracy budget allows (:func:`search_mixed`); when the budget
  is out of reach, :func:`float_group_study` measures whole kinds of layers in float, to show how far.
- ``sparse24``: 2:4 magnitude-pruned weights on eligible layers (:func:`prune_onnx_2_4`), optionally
  fine-tuned by knowledge distillation in ``build_tools/finetune.py``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from tcsched.build_tools.quantize import dequantize_initializer, producers, representable_range
from tcsched.metrics import mean_kl, top1_agreement, topk_accuracy
from tcsched.ort_runtime import OrtClassifier

# --------------------------------------------------------------------------------------------------- fp16


def convert_fp16(fp32_path: str | os.PathLike, out_path: str | os.PathLike) -> Path:
    """Write an fp16 graph with fp32 inputs/outputs (Cast nodes at the boundary)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(fp32_path)), keep_io_types=True)
    onnx.save(model, str(out_path))
    return Path(out_path)


# ----------------------------------------------------------------------------------------- accuracy helper


@dataclass
class Score:
    """Accuracy of candidate logits [N, classes] vs the fp32 logits on the same images."""

    agreement: float
    kl: float
    top1: float | None = None
    top1_drop_points: float | None = None

    @property
    def drop_points(self) -> float:
        """The top-1 drop in points; without labels, the disagreement with fp32 in points stands in for it."""
        return self.top1_drop_points if self.top1_drop_points is not None else 100 * (1 - self.agreement)

    def meets(self, max_drop_points: float, min_agreement: float) -> bool:
        return self.drop_points <= max_drop_points and self.agreement >= min_agreement


def score(ref_logits: np.ndarray, logits: np.ndarray, labels: np.ndarray | None = None) -> Score:
    if labels is None:
        return Score(top1_agreement(ref_logits, logits), max(0.0, mean_kl(ref_logits, logits)))
    top1 = topk_accuracy(logits, labels, 1)
    return Score(
        top1_agreement(ref_logits, logits),
        max(0.0, mean_kl(ref_logits, logits)),
        top1,
        100.0 * (topk_accuracy(ref_logits, labels, 1) - top1),
    )


def label_preserving_views(x: np.ndarray, zoom: float = 0.86) -> np.ndarray:
    """Four views of each preprocessed image that keep its ImageNet label, for choices made on few images.

    Views, in blocks of N: the images, their horizontal flips, the centre ``zoom`` x ``zoom`` of each resized back
    to H x W (bilinear, ``torch.nn.functional.interpolate``), and that zoom's flips; view v of image i is row
    ``v * N + i``. Both operations are linear in the pixel values, so they apply to normalized tensors. On ~130
    selection images one image is 0.77 points of agreement and a few near-tie images decide a choice; four views
    give each image four draws (measured here: an int8_mixed candidate chosen on 130 images for a 0.0021 lower KL
    than int8 was 0.0001 worse on the 520 views, and 0.0018 worse on the 984 views of the evaluation split).

    Args:
        x: float32 [N, C, H, W] preprocessed images.
        zoom: side fraction of the centre crop, in (0, 1]; 0.86 is close to the 224/256 = 0.875 centre crop of
            torchvision's eval transform, applied once more.

    Returns:
        float32 [4N, C, H, W].

    Raises:
        ValueError: ``x`` is not float32 [N, C, H, W] with N >= 1, or ``zoom`` is outside (0, 1].
    """
    if not isinstance(x, np.ndarray) or x.ndim != 4 or x.dtype != np.float32 or len(x) == 0:
        got = f"{x.dtype} {list(x.shape)}" if isinstance(x, np.ndarray) else type(x).__name__
        raise ValueError(f"expected float32 [N, C, H, W] images with N >= 1, got {got}")
    if not 0 < zoom <= 1:
        raise ValueError(f"zoom must be in (0, 1], got {zoom}")
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(x))
    h, w = t.shape[-2:]
    ch, cw = max(1, round(h * zoom)), max(1, round(w * zoom))
    top, left = (h - ch) // 2, (w - cw) // 2
    z = F.interpolate(
        t[:, :, top : top + ch, left : left + cw], size=(h, w), mode="bilinear", align_corners=False
    )
    return torch.cat([t, t.flip(-1), z, z.flip(-1)]).numpy().astype(np.float32, copy=False)


def run_model(model: onnx.ModelProto | str | os.PathLike, x: np.ndarray, threads: int = 2) -> np.ndarray:
    """Logits of an in-memory or on-disk ONNX classifier on float32 [N, 3, H, W]."""
    if isinstance(model, onnx.ModelProto):
        import tempfile

        with tempfile.NamedTemporaryFile(suffix=".onnx") as f:
            onnx.save(model, f.name)
            return OrtClassifier(f.name, threads=threads).predict(x, batch_size=16)
    return OrtClassifier(model, threads=threads).predict(x, batch_size=16)


# ---------------------------------------------------------------------------------------------- int8_mixed


def dequantize_layers(
    qdq: onnx.ModelProto, layers: Sequence[str], reference: onnx.ModelProto | None = None
) -> onnx.ModelProto:
    """Return a copy of a QDQ graph in which the named Conv/Gemm nodes compute in float.

    For each named node, an input produced by ``DequantizeLinear(QuantizeLinear(x))`` is rewired to the float
    ``x`` (the input's quantization is where MobileNetV2's int8 error sits; reading the dequantized value instead
    was measured to recover nothing). The price: x's producer now also outputs float and loses its fused int8
    kernel in ONNX Runtime; :func:`float_cost_macs` counts it. ONNX Runtime's quantizer removes Clip/Relu activations whose effect the quantization range already has
    (ReLU6 in MobileNetV2; the tensor keeps the activation's output name): with ``reference`` (the fp32 graph the
    QDQ graph came from) the removed activation is restored exactly; without it, ``x`` is clipped to the range
    the QuantizeLinear represents, which restores the activation approximately (calibrated saturation). A weight/bias produced by
    ``DequantizeLinear(int8 initializer)`` is replaced by the reference's original fp32 initializer (ONNX Runtime
    names the int8 copy ``<name>_quantized``), or by its dequantized value without a reference. Q/DQ nodes that nothing consumes any
    more are removed. Outputs keep their quantization (it belongs to the consumer).

    Raises:
        ValueError: a name is not a node of the graph.
    """
    model = onnx.ModelProto()
    model.CopyFrom(qdq)
    g = model.graph
    names = {n.name for n in g.node}
    missing = set(layers) - names
    if missing:
        raise ValueError(f"layers not in the graph: {sorted(missing)[:5]}")
    prod = producers(g)
    inits = {i.name: i for i in g.initializer}
    ref_inits = {i.name: i for i in reference.graph.initializer} if reference is not None else {}
    ref_prod = producers(reference.graph) if reference is not None else {}
    clipped: dict[str, str] = {}
    new_nodes: list[tuple[onnx.NodeProto, onnx.NodeProto]] = []
    # a float layer's output stays float for consumers that are not Conv/Gemm (residual Add, pooling): they read
    # it through DQ(Q(out)) now, and do the same treatment as the layer's own inputs
    float_outputs = {n.output[0] for n in g.node if n.name in layers}
    followers: set[str] = set()
    changed = True
    while (
        changed
    ):  # transitively: a follower's output is float for the non-Conv ops after it (GAP -> Flatten)
        changed = False
        for n in g.node:
            if n.op_type in ("Conv", "Gemm", "QuantizeLinear", "DequantizeLinear") or n.name in followers:
                continue
            for i in n.input:
                dq = prod.get(i)
                q = prod.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
                if q is not None and q.op_type == "QuantizeLinear" and q.input[0] in float_outputs:
                    followers.add(n.name)
                    float_outputs.update(n.output)
                    changed = True
                    break
    for node in g.node:
        if node.name not in layers and node.name not in followers:
            continue
        for k, name in enumerate(node.input):
            if node.name in followers and node.name not in layers:
                dq = prod.get(name)
                q = prod.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
                if q is None or q.input[0] not in float_outputs:
                    continue
            dq = prod.get(name)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            src = dq.input[0]
            q = prod.get(src)
            if q is not None and q.op_type == "QuantizeLinear":
                if q.name not in clipped:
                    lo, hi = _activation_bounds(q, inits, reference, ref_prod)
                    if np.isinf(lo) and np.isinf(hi):  # no activation was folded: the float tensor as it is
                        clipped[q.name] = q.input[0]
                    else:
                        out = f"{q.input[0]}_clip_{len(clipped)}"
                        bounds = [
                            numpy_helper.from_array(np.float32(v), f"{out}_{k}")
                            for k, v in (("min", lo), ("max", hi))
                        ]
                        g.initializer.extend(bounds)
                        clip = onnx.helper.make_node(
                            "Clip", [q.input[0], *(b.name for b in bounds)], [out], name=f"{out}_node"
                        )
                        new_nodes.append((q, clip))
                        clipped[q.name] = out
                node.input[k] = clipped[q.name]
            elif src in inits:
                float_name = f"{name}_float_{node.name}"
                original = ref_inits.get(src.removesuffix("_quantized"))
                value = dequantize_initializer(dq, inits)
                if original is not None and tuple(original.dims) == value.shape:
                    value = numpy_helper.to_array(original)  # the fp32 weight itself, not its int8 rounding
                g.initializer.append(numpy_helper.from_array(value.astype(np.float32), float_name))
                node.input[k] = float_name
    for q, clip in new_nodes:  # keep topological order: each Clip right after the Q it replaces
        g.node.insert(list(g.node).index(q) + 1, clip)
    _remove_dead(g)
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


def _remove_dead(g: onnx.GraphProto) -> None:
    outputs = {o.name for o in g.output}
    while True:
        used = {i for n in g.node for i in n.input} | outputs
        dead = [
            n
            for n in g.node
            if n.op_type in ("QuantizeLinear", "DequantizeLinear") and not set(n.output) & used
        ]
        if not dead:
            break
        for n in dead:
            g.node.remove(n)
    used = {i for n in g.node for i in n.input}
    keep = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)


@dataclass
class MixedSearchResult:
    """Outcome of :func:`search_mixed`: the float layers, and the score at each tried count."""

    float_layers: list[str]
    met_budget: bool
    score: Score
    # (k, agreement, drop points, KL)
    trials: list[tuple[int, float, float, float]] = field(default_factory=list)
    latency_ratios: dict[int, float] = field(default_factory=dict)  # k -> measured latency / fp32's
    # the k at which the scan stopped: the second in a row over max_latency_ratio (neither was evaluated)
    stopped_at: int | None = None


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
    float work). One slow stretch of this shared machine had timed a 5-layer candidate at 0.65x (both timings)
    that timed 0.56x in another build, and a first-over-the-cap stop ended that scan 3 layers short.

    When no k meets the budget, the result is the tried k with the lowest KL vs fp32 (the fewest float layers on a
    tie). KL is a mean over every image; agreement on ~130 images moves in 0.8-point steps and is not monotonic in
    k, so picking by it chose k by one or two images (measured on MobileNetV2: 1 to 7 float layers across builds).

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
    trials: list[tuple[int, float, float, float]] = []
    best: tuple[int, Score] | None = None
    ratios: dict[int, float] = {}
    stopped = None
    over_in_a_row = 0
    for k in range(n + 1):
        model = dequantize_layers(qdq, ranking[:k], reference) if k else qdq
        if k and latency_ratio is not None:
            ratios[k] = latency_ratio(model)
            if max_latency_ratio is not None and ratios[k] > max_latency_ratio:
                # one timing near the cap is noisy (measured: 0.62x once for a candidate that timed 0.56x in
                # other builds): confirm with a second one and judge their mean
                ratios[k] = (ratios[k] + latency_ratio(model)) / 2
                if ratios[k] > max_latency_ratio:
                    over_in_a_row += 1
                    if over_in_a_row == 2:
                        stopped = k
                        break
                    continue
            over_in_a_row = 0
        s = evaluate(model)
        trials.append((k, s.agreement, s.drop_points, s.kl))
        if s.meets(max_drop_points, min_agreement):
            return MixedSearchResult(list(ranking[:k]), True, s, trials, ratios)
        if best is None or s.kl < best[1].kl:
            best = (k, s)
    k, s = best  # type: ignore[misc]
    return MixedSearchResult(list(ranking[:k]), False, s, trials, ratios, stopped)


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


# ------------------------------------------------------------------------------------------------ sparse24


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
        dq = prod.get(name)
        q = prod.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        if q is not None and q.op_type == "QuantizeLinear":
            p = prod.get(q.input[0])
            if p is not None:
                cost += macs.get(p.name, 0)
    return cost


def rank_in_context(
    qdq: onnx.ModelProto,
    reference: onnx.ModelProto,
    x: np.ndarray,
    ref_logits: np.ndarray,
    op_types: Sequence[str] = ("Conv", "Gemm", "Add"),
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
