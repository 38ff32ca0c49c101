"""int8_mixed: the int8 graph with its most sensitive nodes back in float, as few as the accuracy budget allows.

The Conv/Gemm/Add nodes of the int8 graph are ranked by the KL vs fp32 each removes alone, per MAC that goes back
to float (:mod:`tcsched.build_tools.mixed_search`); the smallest prefix of the ranking that meets the budget on
the selection views, with every candidate timed against fp32 under ``cfg.max_latency_ratio``, is kept. When the
budget is missed, each whole kind of layer is measured in float too, so the notes say how far it was.
"""

from __future__ import annotations

from collections.abc import Callable

import onnx

from tcsched.build_tools import mixed_search as ms
from tcsched.build_tools.graph_surgery import dequantize_layers, float_cost_macs
from tcsched.build_tools.latency import candidate_latency_ratio
from tcsched.build_tools.recipes.base import BuildContext, BuiltVariant, Recipe
from tcsched.build_tools.scoring import Score

LatencyRatio = Callable[[onnx.ModelProto], float]


def _ranking(ctx: BuildContext, qdq: onnx.ModelProto) -> tuple[list[str], dict[str, int], int]:
    """Cost-aware ranking of the int8 graph's nodes on the calibration images; returns (ranking, node -> float
    cost in MACs, MACs of the whole graph)."""
    n_nodes = sum(n.op_type in ms.RANKED_OPS for n in qdq.graph.node)
    task = ctx.progress.add_task("rank int8 nodes in context (leave-one-out)", total=n_nodes)
    gains = ms.rank_in_context(
        qdq,
        ctx.fp32_model,
        ctx.calib,
        ctx.fp32_session.predict(ctx.calib, batch_size=16),
        threads=ctx.cfg.threads,
        on_step=lambda i: ctx.progress.update(task, completed=i + 1),
    )
    macs = {lay.name: lay.macs for lay in ctx.report.layers}
    total = sum(macs.values())
    cost = {n: float_cost_macs(qdq, n, macs) for n, _ in gains}
    return ms.cost_aware_ranking(gains, cost, total), cost, total


def _trials_text(res: ms.MixedSearchResult, over: str) -> str:
    """Every k the search tried, in k order: evaluated ones with their scores, skipped ones with their timing."""
    described: dict[int, str] = {}
    for t in res.trials:
        s = t.score
        described[t.k] = f"k={t.k}: agree {s.agreement:.3f} drop {s.drop_points:+.2f} KL {s.kl:.4f}"
        if t.k in res.latency_ratios:
            described[t.k] += f" latency {res.latency_ratios[t.k]:.2f}x"
    for k, r in res.latency_ratios.items():  # timed but not evaluated: over the cap
        if k not in described and k != res.stopped_at:
            described[k] = f"k={k}: skipped, {r:.2f}x {over}"
    text = ", ".join(described[k] for k in sorted(described))
    if res.stopped_at is not None:
        text += f"; stopped at k={res.stopped_at}: {res.latency_ratios[res.stopped_at]:.2f}x {over}"
    return text


def _search_note(ctx: BuildContext, res: ms.MixedSearchResult, lat_b: int) -> str:
    cfg = ctx.cfg
    over = f"fp32 at batch {lat_b} > the {cfg.max_latency_ratio:g}x cap"
    return (
        f"Conv/Gemm/Add nodes of the int8 graph ranked by the KL vs fp32 each removes when it alone returns "
        f"to float, per MAC that goes back to float (leave-one-out in context, {len(ctx.calib)} calibration "
        f"images; the one-layer probe of analysis.json ranks Conv/Gemm only and needs ~3x more float layers on "
        f"MobileNetV2); {len(res.float_layers)} kept float (fp16 on GPU) to meet top-1 drop <= "
        f"{cfg.max_top1_drop_points} points and agreement >= {cfg.min_agreement:.0%} on the selection "
        f"split ({'met' if res.met_budget else 'NOT met'}), each candidate's latency measured against fp32 "
        f"(cap {cfg.max_latency_ratio:g}x at batch {lat_b}); trials: {_trials_text(res, over)}"
    )


def _group_study_note(
    ctx: BuildContext, qdq: onnx.ModelProto, latency_ratio: LatencyRatio, lat_b: int
) -> str:
    """The budget was not met: each whole kind of layer in float (selection views, latency vs fp32), so the
    manifest says how far the budget is from what float layers can buy."""
    groups = ms.float_groups(qdq, {lay.name: lay.kind for lay in ctx.report.layers}, ctx.fp32_model)
    task = ctx.progress.add_task("int8_mixed: budget missed, each kind of layer in float", total=len(groups))

    def evaluate_with_progress(m: onnx.ModelProto) -> Score:
        s = ctx.evaluate(m)
        ctx.progress.advance(task)
        return s

    rows = ms.float_group_study(qdq, groups, evaluate_with_progress, ctx.fp32_model, latency_ratio)
    parts = [
        f"{r.group} ({len(r.layers)} nodes): agreement {r.score.agreement:.3f}, drop {r.score.drop_points:+.2f}, "
        f"KL {r.score.kl:.4f}, {r.latency_ratio:.2f}x fp32"
        for r in rows
    ]
    return (
        f"budget not met within the {ctx.cfg.max_latency_ratio:g}x latency cap; for scale, each whole kind of "
        f"layer returned to float at once (selection split, latency at batch {lat_b}): " + "; ".join(parts)
    )


class Int8Mixed(Recipe):
    name = "int8_mixed"
    precision = "int8_mixed"
    needs = ("int8",)
    step = "int8_mixed: most sensitive layers back to float, as few as the budget allows"

    def build(self, ctx: BuildContext) -> BuiltVariant:
        cfg = ctx.cfg
        qdq = onnx.load(str(ctx.built["int8"].path))
        ranking, cost, total = _ranking(ctx, qdq)
        lat_b = max(cfg.latency_batch_sizes)

        def latency_ratio(m: onnx.ModelProto) -> float:
            scratch = ctx.work / "int8_mixed_trial.onnx"
            return candidate_latency_ratio(m, ctx.fp32_path, scratch, lat_b, cfg.threads, ctx.select[:lat_b])

        res = ms.search_mixed(
            qdq,
            ranking,
            ctx.evaluate,
            cfg.max_top1_drop_points,
            cfg.min_agreement,
            max_float_layers=cfg.max_float_layers,
            reference=ctx.fp32_model,
            latency_ratio=latency_ratio,
            max_latency_ratio=cfg.max_latency_ratio,
        )
        path = ctx.work / "int8_mixed.onnx"
        onnx.save(dequantize_layers(qdq, res.float_layers, ctx.fp32_model), str(path))
        plan = ctx.plan("int8")
        plan.update(dict.fromkeys(res.float_layers, "fp32"))  # float Adds too: they are not Conv/Gemm layers
        notes = [_search_note(ctx, res, lat_b)]
        if res.float_layers:
            float_macs = sum(cost[n] for n in res.float_layers)
            notes.append(
                f"float layers ({float_macs / total:.0%} of the MACs): " + ", ".join(res.float_layers)
            )
        if not res.met_budget:
            notes.append(_group_study_note(ctx, qdq, latency_ratio, lat_b))
        return self.built(path, plan, notes)
