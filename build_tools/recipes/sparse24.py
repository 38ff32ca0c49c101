"""sparse24: 2:4 magnitude-pruned weights on the eligible layers, fp16 compute.

Eligible layers (``analysis.json``: not depthwise, channels a multiple of 4, wide enough for TensorRT's sparse
kernels) are pruned least-damaged first (highest pruning SQNR), as many as the accuracy budget allows on the
selection views; with ``cfg.finetune_steps`` every eligible layer is also pruned and fine-tuned by knowledge
distillation (:mod:`tcsched.build_tools.finetune`). The candidate with the most pruned layers among those that
meet the budget wins, else the best-agreeing one. Kept only if it meets the budget, or when named in
``cfg.variants``. Only TensorRT's sparse tensor cores run 2:4 sparsity; on a CPU it is dense fp16 (emulated).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import numpy_helper

from tcsched.build_tools import export as ex
from tcsched.build_tools.graph_surgery import WEIGHT_OPS, convert_fp16, prune_onnx_2_4
from tcsched.build_tools.recipes.base import BuildContext, BuiltVariant, Dropped, Recipe
from tcsched.build_tools.scoring import Score


@dataclass(frozen=True)
class Candidate:
    """Pruned ``layers`` and their ``score`` on the selection views; ``finetuned``: the fine-tuned fp32 graph
    (None: the fp32 weights pruned as they are)."""

    layers: list[str]
    score: Score
    how: str
    finetuned: Path | None = None


def _least_damaging_prefix(ctx: BuildContext, order: list[str]) -> tuple[int, Score, Score]:
    """Largest k such that pruning ``order[:k]`` (no fine-tune) meets the budget, by bisection (each k evaluated
    once). Returns (k, its score, the score of all layers pruned); k = 0 when none meets it."""
    from tcsched.build_tools.analysis import prune_2_4

    cfg = ctx.cfg
    scores: dict[int, Score] = {}

    def at(k: int) -> Score:
        if k not in scores:
            scores[k] = ctx.evaluate(prune_onnx_2_4(ctx.fp32_model, order[:k], prune_2_4))
        return scores[k]

    lo, hi = 0, len(order)
    s_all = at(hi)
    if s_all.meets(cfg.max_top1_drop_points, cfg.min_agreement):
        lo = hi
    else:
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if at(mid).meets(cfg.max_top1_drop_points, cfg.min_agreement):
                lo = mid
            else:
                hi = mid
    return lo, (at(lo) if lo > 0 else s_all), s_all


def _fine_tuned(ctx: BuildContext, order: list[str]) -> Candidate:
    """Every layer of ``order`` pruned, then a knowledge-distillation fine-tune of the torch model."""
    from tcsched.build_tools.analysis import prune_2_4
    from tcsched.build_tools.finetune import distill_pruned, map_onnx_layers

    steps = ctx.cfg.finetune_steps
    inits = {i.name: i for i in ctx.fp32_model.graph.initializer}
    shapes = [
        (n.name, tuple(numpy_helper.to_array(inits[n.input[1]]).shape))
        for n in ctx.fp32_model.graph.node
        if n.op_type in WEIGHT_OPS
    ]
    mapping = map_onnx_layers(ctx.torch_model, shapes)
    task = ctx.progress.add_task(f"KD fine-tune ({steps} steps)", total=steps)
    student = distill_pruned(
        ctx.torch_model,
        {n: mapping[n] for n in order},
        prune_2_4,
        ctx.calib,
        steps,
        on_step=lambda i, loss: ctx.progress.update(
            task, completed=i + 1, description=f"KD fine-tune loss {loss:.3f}"
        ),
    )
    path = ex.export_onnx(student, ctx.work / "sparse24_finetuned_fp32.onnx", opset=ctx.cfg.opset)
    how = f"all {len(order)} eligible layers pruned, KD fine-tune {steps} steps"
    return Candidate(order, ctx.evaluate(path), how, finetuned=path)


def check_2to4(model: onnx.ModelProto, layers: Sequence[str]) -> None:
    """Every pruned layer's weight really has >= 2 zeros in each group of 4 (after export and BN folding).

    Raises:
        RuntimeError: a layer lost its 2:4 pattern.
    """
    from tcsched.build_tools.analysis import is_2to4

    inits = {i.name: i for i in model.graph.initializer}
    for n in model.graph.node:
        if n.name in layers and not is_2to4(numpy_helper.to_array(inits[n.input[1]])):
            raise RuntimeError(f"layer {n.name} is not 2:4 sparse after pruning")


def _write(ctx: BuildContext, chosen: Candidate) -> Path:
    """The chosen candidate as an fp16 graph (casts in the graph, so that TensorRT builds FP16 sparse kernels)."""
    from tcsched.build_tools.analysis import prune_2_4

    if chosen.finetuned is not None:
        src = onnx.load(str(chosen.finetuned))
    else:
        src = prune_onnx_2_4(ctx.fp32_model, chosen.layers, prune_2_4)
    pruned_path = ctx.work / "sparse24_fp32.onnx"
    onnx.save(src, str(pruned_path))
    check_2to4(src, chosen.layers)
    return convert_fp16(pruned_path, ctx.work / "sparse24.onnx")


class Sparse24(Recipe):
    name = "sparse24"
    precision = "sparse24"
    emulated_on_cpu = True
    step = "sparse24: 2:4 pruning of eligible layers"

    def build(self, ctx: BuildContext) -> BuiltVariant | Dropped:
        cfg = ctx.cfg
        eligible = [
            lay for lay in ctx.report.layers if lay.sparse24_eligible.ok and lay.prune24_sqnr_db is not None
        ]
        if not eligible:
            return self.dropped(["no layer is eligible for 2:4 sparsity (see analysis.json)"])
        order = [lay.name for lay in sorted(eligible, key=lambda r: -r.prune24_sqnr_db)]
        k, s_k, s_all = _least_damaging_prefix(ctx, order)
        notes = [
            f"{len(eligible)} layers eligible (not depthwise, channels multiple of 4, wide enough for TensorRT "
            f"sparse kernels); pruning all of them without fine-tuning: agreement {s_all.agreement:.3f}, top-1 "
            f"drop {s_all.drop_points:+.2f} points"
        ]
        candidates = (
            [Candidate(order[:k], s_k, f"{k} least-damaged layers pruned, no fine-tune")] if k else []
        )
        if cfg.finetune_steps > 0:
            ft = _fine_tuned(ctx, order)
            candidates.append(ft)
            notes.append(
                f"KD fine-tune of all eligible layers: agreement {ft.score.agreement:.3f}, "
                f"drop {ft.score.drop_points:+.2f}"
            )
        if not candidates:
            return self.dropped([*notes, "even the single least-damaged layer misses the accuracy budget"])
        meeting = [c for c in candidates if c.score.meets(cfg.max_top1_drop_points, cfg.min_agreement)]
        chosen = (
            max(meeting, key=lambda c: len(c.layers))
            if meeting
            else max(candidates, key=lambda c: c.score.agreement)
        )
        path = _write(ctx, chosen)
        notes.append(
            f"chosen: {chosen.how}; selection split: agreement {chosen.score.agreement:.3f}, top-1 drop "
            f"{chosen.score.drop_points:+.2f} points; weights fp16 (casts in the graph) so that TensorRT builds "
            f"FP16 sparse kernels"
        )
        if not (meeting or cfg.explicit_variants):
            return self.dropped(notes)
        if not meeting:
            notes.append("kept although it misses the budget: explicitly requested")
        notes.append(
            "2:4 sparsity is exploited only by TensorRT sparse tensor cores (Ampere and later); ONNX Runtime on a "
            "CPU runs it as dense fp16 (emulated): never chosen for speed on a CPU"
        )
        plan = {n: ("sparse24" if n in chosen.layers else "fp16") for n in ctx.layer_names}
        return self.built(path, plan, notes)
