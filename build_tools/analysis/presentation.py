"""Presentation: the terminal table (rich) and the PNG plot (matplotlib, Agg backend, imported when plotting)
of an :class:`~tcsched.build_tools.analysis.schema.AnalysisReport`."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from tcsched.build_tools.analysis.geometry import LAYER_OPS
from tcsched.build_tools.analysis.schema import AnalysisReport


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
