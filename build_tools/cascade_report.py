"""The build's report of the calibrated cascades: the markdown table of every operating point and the plot of
agreement against cost (written by :func:`tcsched.build_tools.serving.write_serving_reports`; the cascades
themselves: :mod:`tcsched.build_tools.cascade`).
"""

from __future__ import annotations

from collections.abc import Mapping

from tcsched.build_tools.cascade import ServingPlan, chain_label


def cascade_table(
    plan: ServingPlan, p50_ms_by_batch: Mapping[str, Mapping[int, float]], reference: str
) -> str:
    """Markdown table of every operating point: thresholds, agreement (calibration and evaluation, 95% intervals),
    escalation rates, expected ms per batch and its ratio to the reference's p50."""
    head = (
        "| cascade | target | threshold | calibration agreement [95%] | escalated | evaluation agreement [95%] | "
        "escalated | " + " | ".join(f"b{b} ms (vs fp32)" for b in sorted(p50_ms_by_batch[reference])) + " |"
    )
    lines = [head, "|" + " --- |" * (7 + len(p50_ms_by_batch[reference]))]
    for c in plan.cascades:
        for op in c.operating_points:
            ev = op.evaluation
            lat = " | ".join(
                f"{op.expected_latency_ms_by_batch[b]:.2f} ({op.expected_latency_ms_by_batch[b] / t:.2f}x)"
                for b, t in sorted(p50_ms_by_batch[reference].items())
                if b in op.expected_latency_ms_by_batch
            )
            lines.append(
                f"| {c.label} | {op.target_agreement:g} | {', '.join(f'{t:.4f}' for t in op.thresholds)} | "
                f"{100 * op.agreement:.2f}% [{100 * op.agreement_ci95[0]:.1f}, {100 * op.agreement_ci95[1]:.1f}] "
                f"({op.n_images} images x {op.n_views // max(1, op.n_images)} views){'' if op.met else ' NOT met'} | "
                f"{100 * op.escalation_rate:.1f}% | "
                + (
                    f"{100 * ev.agreement:.2f}% [{100 * ev.agreement_ci95[0]:.1f}, {100 * ev.agreement_ci95[1]:.1f}] "
                    f"({ev.n_images}) | {100 * ev.escalation_rate:.1f}% | "
                    if ev is not None
                    else "- | - | "
                )
                + lat
                + " |"
            )
    return "\n".join(lines)


def plot_cascades(
    plan: ServingPlan,
    single_agreement: Mapping[str, float],
    p50_ms_by_batch: Mapping[str, Mapping[int, float]],
    reference: str,
    path,
) -> None:
    """PNG: evaluation-split agreement with fp32 against expected cost per image (x the reference's), for each
    cascade's met operating points (the ones the scheduler may use) and each single variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b = max(p50_ms_by_batch[reference])
    ref_ms = p50_ms_by_batch[reference][b]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for c in plan.cascades:
        pts = [
            (op.expected_latency_ms_by_batch[b] / ref_ms, op.evaluation.agreement, op.target_agreement)
            for op in c.operating_points
            if op.met and op.evaluation is not None and b in op.expected_latency_ms_by_batch
        ]
        if pts:
            ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], "o-", label=f"cascade {c.label}")
            for x, y, t in pts:
                ax.annotate(f"{t:g}", (x, 100 * y), textcoords="offset points", xytext=(4, -10), fontsize=7)
    for n, a in single_agreement.items():
        if n in p50_ms_by_batch and b in p50_ms_by_batch[n]:
            x = p50_ms_by_batch[n][b] / ref_ms
            ax.scatter([x], [100 * a], marker="s", color="gray")
            ax.annotate(
                chain_label([n, reference]).split(">")[0],
                (x, 100 * a),
                xytext=(4, 4),
                textcoords="offset points",
            )
    ax.set_xlabel(f"expected time per batch of {b} / fp32's (bare runtime p50)")
    ax.set_ylabel("top-1 agreement with fp32, evaluation split (%)")
    ax.set_title("Confidence cascades: agreement vs cost (labels: target agreement)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # no cascade met a target: nothing to name
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
