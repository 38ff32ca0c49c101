"""The bench report: ``bench.json`` (everything), ``points.csv`` (one row per point, perf_analyzer and bare),
``report.md`` (tables) and PNG plots (matplotlib, Agg backend, imported only when plotting)."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path

from tcsched.client.bench_results import BenchResult
from tcsched.client.perf_analyzer import PerfPoint
from tcsched.client.targets import ENSEMBLE
from tcsched.jsonio import atomic_write_text

POINT_COLUMNS = [
    "target",
    "model",
    "mode",
    "load",
    "request_parameters",
    "throughput_infer_per_s",
    "p50_ms",
    "p90_ms",
    "p95_ms",
    "p99_ms",
    "avg_latency_ms",
    "client_send_ms",
    "network_server_send_recv_ms",
    "server_queue_ms",
    "server_compute_input_ms",
    "server_compute_infer_ms",
    "server_compute_output_ms",
    "client_recv_ms",
    "stable",
    "stability_percentage",
    "measurement_interval_ms",
    "wall_s",
    "variants_served",
]


def _fmt(x, nd: int = 1) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def _served(p: PerfPoint, variants: Sequence[str]) -> dict[str, int]:
    return {v: p.server_stats[v].inference_count for v in variants if v in p.server_stats}


def point_row(p: PerfPoint, variants: Sequence[str] = (), ensemble: str = ENSEMBLE) -> dict:
    """One flat CSV row of a perf_analyzer point (ms, img/s)."""
    return {
        "target": p.target,
        "model": p.model,
        "mode": p.mode,
        "load": p.load,
        "request_parameters": json.dumps(p.request_parameters, sort_keys=True),
        "throughput_infer_per_s": p.throughput_infer_per_s,
        "p50_ms": p.p50_ms,
        "p90_ms": p.p90_ms,
        "p95_ms": p.p95_ms,
        "p99_ms": p.p99_ms,
        "avg_latency_ms": p.avg_latency_ms,
        "client_send_ms": p.client_send_ms,
        "network_server_send_recv_ms": p.network_server_send_recv_ms,
        "server_queue_ms": p.server.queue_ms,
        "server_compute_input_ms": p.server.compute_input_ms,
        "server_compute_infer_ms": p.server.compute_infer_ms,
        "server_compute_output_ms": p.server.compute_output_ms,
        "client_recv_ms": p.client_recv_ms,
        "stable": p.stable,
        "stability_percentage": p.stability_percentage,
        "measurement_interval_ms": p.measurement_interval_ms,
        "wall_s": round(p.wall_s, 2),
        "variants_served": json.dumps(_served(p, variants), sort_keys=True) if p.model == ensemble else "",
    }


def write_points_csv(result: BenchResult, path: Path) -> Path:
    """perf_analyzer points, then bare points (mode ``bare``, load = batch size)."""
    variants = result.config.get("variants", [])
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=POINT_COLUMNS)
        w.writeheader()
        for p in result.points:
            w.writerow(point_row(p, variants, result.ensemble))
        for b in result.bare:
            w.writerow(
                {
                    "target": f"bare {b.variant}",
                    "model": b.variant,
                    "mode": "bare",
                    "load": b.batch_size,
                    "throughput_infer_per_s": b.img_per_s,
                    "p50_ms": b.p50_ms,
                    "p99_ms": b.p99_ms,
                    "wall_s": round(b.duration_s, 2),
                }
            )
    return path


def _header(result: BenchResult) -> list[str]:
    env, cfg = result.environment, result.config
    return [
        "# tcsched bench",
        "",
        f"{env.get('utc')} on {env.get('cpu_model')} ({env.get('cpus_usable')} usable cores, load "
        f"{_fmt((env.get('loadavg_1_5_15') or [None])[0], 2)} before / "
        f"{_fmt((env.get('loadavg_1_5_15_after') or [None])[0], 2)} after); tritonserver "
        f"{env.get('tritonserver')}, perf_analyzer {env.get('perf_analyzer')}, onnxruntime "
        f"{env.get('onnxruntime')}, openvino {env.get('openvino')}, tcsched {env.get('tcsched')}, Python {env.get('python')}.",
        "",
        f"perf_analyzer over gRPC, batch 1, {len(cfg.get('images', []))} real images round robin, windows of "
        f"{cfg.get('measurement_interval_ms')} ms, stable when the last 3 agree within "
        f"{cfg.get('stability_percentage')}% (at most {cfg.get('max_trials')} windows). Bare = the variant's "
        "engine in-process (ONNX Runtime or OpenVINO, as served), same intra-op threads as serving, batch = min(concurrency, max batch). "
        f"Whole run: {result.wall_s:.0f} s.",
        "",
    ]


def _summary_section(result: BenchResult) -> list[str]:
    lines = [
        "## Served (runtime, graph) pairs vs their bare engine, and the ensemble's overhead",
        "",
        "| variant | runtime | precision | conc. | served img/s | served / ORT int8 | p50 ms | p99 ms "
        "| bare img/s (batch) | served / bare "
        "| ensemble img/s | ensemble p50 ms | ensemble p99 ms | ensemble p50 / direct p50 "
        "| pipeline p50 ms | ensemble p50 / pipeline p50 | scheduler p50 ms | scheduler p50 / direct p50 |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: | ---: |",
    ]
    for r in result.summary()["by_variant"]:
        lines.append(
            f"| {r['variant']} | {r.get('runtime') or '–'} | {r.get('precision') or '–'} | {r['concurrency']} "
            f"| {_fmt(r['served_img_per_s'])} | {_fmt(r.get('served_over_ort_int8'), 2)} | {_fmt(r['served_p50_ms'])} "
            f"| {_fmt(r['served_p99_ms'])} | {_fmt(r['bare_img_per_s'])} ({r['bare_batch']}) "
            f"| {_fmt(r['served_over_bare'], 2)} | {_fmt(r['ensemble_img_per_s'])} | {_fmt(r['ensemble_p50_ms'])} "
            f"| {_fmt(r['ensemble_p99_ms'])} | {_fmt(r['ensemble_p50_over_direct_p50'], 2)} "
            f"| {_fmt(r.get('pipeline_p50_ms'))} | {_fmt(r.get('ensemble_p50_over_pipeline_p50'), 2)} "
            f"| {_fmt(r.get('scheduler_p50_ms'))} | {_fmt(r.get('scheduler_p50_over_direct_p50'), 2)} |"
        )
    return lines + [
        "",
        f"Ensemble = `{result.ensemble}` (preprocess: JPEG decode + resize on the server, then scheduler → variant by BLS) "
        "forced to the variant with the request parameter `variant`; the direct variant gets the already "
        "preprocessed tensor, so the ratio includes decoding and preprocessing. Pipeline = `pipeline_<variant>`, "
        "the same ensemble without the scheduler (IMAGE -> preprocess -> variant), served beside the repository by "
        "the bench's own server: ensemble / pipeline is what the scheduler adds to the same JPEG request. "
        "Scheduler = the `scheduler` model alone, tensor in, variant forced: the Python-backend hop + BLS.",
        "",
    ]


def _ci(o, k: str) -> str:
    e = o.ratios.get(k)
    return f"{e.ratio:.3f} [{e.low:.3f}, {e.high:.3f}]" if e else "–"


def _overhead_section(result: BenchResult) -> list[str]:
    if not result.overhead:
        return []
    lines = [
        f"## Scheduler overhead at concurrency 1, targets interleaved ({result.overhead[0].rounds} rounds)",
        "",
        "| variant | direct p50 ms | scheduler p50 ms | pipeline p50 ms | ensemble p50 ms "
        "| ensemble / pipeline [95% CI] | scheduler / direct [95% CI] | ensemble / direct [95% CI] |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for o in result.overhead:
        p50 = o.p50_ms
        lines.append(
            f"| {o.variant} | {_fmt(p50.get('variant'), 2)} | {_fmt(p50.get('scheduler'), 2)} "
            f"| {_fmt(p50.get('pipeline'), 2)} | {_fmt(p50.get('ensemble'), 2)} "
            f"| {_ci(o, 'ensemble_over_pipeline')} | {_ci(o, 'scheduler_over_direct')} "
            f"| {_ci(o, 'ensemble_over_direct')} |"
        )
    return lines + [
        "",
        "Each round sends one request (batch 1, gRPC, Python tritonclient) to every target in a fresh random "
        "order, same image for all targets, images cycled over rounds (`tcsched.client.overhead`). Drifts "
        "of the machine's load fall on all targets alike, so these ratios are steadier than the "
        "perf_analyzer ones above, which measure one target after the other. CI: paired bootstrap over "
        "rounds. The client's own cost is in both sides of every ratio.",
        "",
    ]


def _pairs_section(result: BenchResult) -> list[str]:
    rows = result.pair_summary()
    if not rows:
        return []
    base = result.ort_int8_variant() or "the ONNX Runtime int8 variant"
    c = rows[0]["concurrency"]
    lines = [
        f"## Pairs called directly at concurrency {c:g}, interleaved ({rows[0]['rounds']} rounds)",
        "",
        f"| variant | runtime | precision | img/s (median) | / {base} [95% CI] | p50 ms | p99 ms | avg batch "
        "| queue ms | compute in ms | compute infer ms | compute out ms | img/s per round |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        o = r["over_ort_int8"]
        ratio = f"{o['ratio']:.2f} [{o['low']:.2f}, {o['high']:.2f}]" if o else "–"
        lines.append(
            f"| {r['variant']} | {r['runtime'] or '–'} | {r['precision'] or '–'} | {_fmt(r['median_img_per_s'])} "
            f"| {ratio} | {_fmt(r['p50_ms'])} | {_fmt(r['p99_ms'])} | {_fmt(r['avg_batch'], 2)} "
            f"| {_fmt(r['queue_ms'], 2)} | {_fmt(r['compute_input_ms'], 2)} | {_fmt(r['compute_infer_ms'], 2)} "
            f"| {_fmt(r['compute_output_ms'], 2)} | {' '.join(f'{x:.0f}' for x in r['img_per_s'])} |"
        )
    return lines + [
        "",
        "Each round measures every variant model once (perf_analyzer, tensor in, three windows), the order "
        "reversed every other round, so the machine's drift falls on all pairs alike; ratio = median over "
        "rounds / the baseline's median, paired bootstrap 95% interval over rounds. Avg batch = images / "
        "executions (Triton's statistics): what the dynamic batcher formed from the concurrent requests. "
        "Queue, compute in / infer / out: Triton's per-request averages, ms (compute infer is the execution "
        "of the whole batch the request was in).",
        "",
    ]


def paths_table(result: BenchResult) -> list[str]:
    """The path rounds' table (markdown lines; none without path rounds): each path's img/s and its ratio to
    today's path with the 95% interval, also printed by ``tcsched bench``."""
    rows = result.path_summary()
    if not rows or not rows[0]["rounds"]:
        return []
    prep = result.config.get("preprocess") or {}
    lines = [
        f"## Paths through the ensemble (JPEG in) at concurrency {_fmt(rows[0]['concurrency'], 0)}, "
        f"interleaved ({rows[0]['rounds']} round{'s' if rows[0]['rounds'] != 1 else ''})",
        "",
        "| path | target | preprocess | img/s (median) | / today's path [95% CI] | p50 ms | p99 ms "
        "| variants served (images) | img/s per round |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for r in rows:
        o = r["over_today"]
        ratio = "–" if not o else f"{o['ratio']:.2f}"
        if o and o["low"] is not None:
            ratio += f" [{o['low']:.2f}, {o['high']:.2f}]"
        p = prep.get("today" if r["path"] == "today" else "default") or {}
        pre = f"{p.get('method', '?')}, {p.get('instances', '?')} inst." if p else "–"
        lines.append(
            f"| {r['path']} | {r['target']} | {pre} | {_fmt(r['median_img_per_s'])} | {ratio} "
            f"| {_fmt(r['p50_ms'])} | {_fmt(r['p99_ms'])} "
            f"| {', '.join(f'{k}: {v}' for k, v in r['served'].items()) or '–'} "
            f"| {' '.join(f'{x:.0f}' for x in r['img_per_s'])} |"
        )
    return lines


def _paths_section(result: BenchResult) -> list[str]:
    lines = paths_table(result)
    if not lines:
        return []
    return lines + [
        "",
        "Today's path: the repository's ensemble with its preprocessing step calling `preprocess_exact` (the "
        "repository's `preprocess` with method `exact` and one instance), forced to the ONNX Runtime int8 "
        "variant; served beside the repository. Default: the ensemble as built, the scheduler's own choice "
        "(no request parameter); fastest: the same ensemble forced to the pair of the highest median img/s "
        "in the pair rounds. Each round measures every path once (perf_analyzer, the same JPEGs, three "
        "windows), the order reversed every other round; ratio = median over rounds / today's median, paired "
        "bootstrap 95% interval over rounds.",
        "",
    ]


def _points_section(result: BenchResult) -> list[str]:
    variants = result.config.get("variants", [])
    lines = [
        "## Every point",
        "",
        "| target | load | img/s | p50 ms | p90 ms | p99 ms | queue ms | compute in ms | infer ms | out ms "
        "| net+send/recv ms | stable | variants served (images) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for p in result.points:
        load = f"c={p.load:g}" if p.mode == "concurrency" else f"{p.load:g} req/s"
        served = _served(p, variants) if p.model == result.ensemble else {}
        lines.append(
            f"| {p.target} | {load} | {_fmt(p.throughput_infer_per_s)} | {_fmt(p.p50_ms)} | {_fmt(p.p90_ms)} "
            f"| {_fmt(p.p99_ms)} | {_fmt(p.server.queue_ms, 2)} | {_fmt(p.server.compute_input_ms, 2)} "
            f"| {_fmt(p.server.compute_infer_ms, 2)} | {_fmt(p.server.compute_output_ms, 2)} "
            f"| {_fmt(p.network_server_send_recv_ms, 2)} | {'yes' if p.stable else f'at {p.stability_percentage:g}%'} "
            f"| {', '.join(f'{k}: {v}' for k, v in served.items() if v) or '–'} |"
        )
    return lines + [
        "",
        "Server-side columns: perf_analyzer's CSV (average per request). For the ensemble they are summed over "
        "the composing models (preprocess, scheduler; the scheduler's infer time includes its BLS call to the "
        "variant), with the queue taken from the composing models' CSVs. Variants served: delta of each "
        "variant model's `inference_count` (Triton statistics API) over the whole perf_analyzer run.",
        "",
    ]


def _bare_section(result: BenchResult) -> list[str]:
    lines = [
        "## Bare engines (the variant's runtime in-process)",
        "",
        "| variant | runtime | batch | threads | img/s | p50 ms/batch | p99 ms/batch | calls |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    pairs = result.config.get("pairs") or {}
    for b in result.bare:
        runtime = (pairs.get(b.variant) or ["–"])[0]
        lines.append(
            f"| {b.variant} | {runtime} | {b.batch_size} | {b.threads} | {_fmt(b.img_per_s)} | {_fmt(b.p50_ms, 2)} "
            f"| {_fmt(b.p99_ms, 2)} | {b.calls} |"
        )
    return lines


def markdown(result: BenchResult, plots: Sequence[Path] = ()) -> str:
    """The report's markdown: headline table, ensemble overhead, every point, bare points, environment."""
    lines = [
        *_header(result),
        *_summary_section(result),
        *_pairs_section(result),
        *_paths_section(result),
        *_overhead_section(result),
        *_points_section(result),
        *_bare_section(result),
    ]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    if result.errors:
        lines += ["", "## Errors", ""] + [f"- {e.splitlines()[0]}" for e in result.errors]
    lines += ["", "## Environment", "", "```json", json.dumps(result.environment, indent=2), "```", ""]
    return "\n".join(lines)


def plot_throughput_vs_p99(points: Sequence[PerfPoint], path: Path) -> Path:
    """Throughput (img/s) against p99 latency (ms), one line per target: concurrency points joined by a line
    (annotated with c), request-rate points as hollow markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6), dpi=110)
    targets = list(dict.fromkeys(p.target for p in points))
    for i, t in enumerate(targets):
        color = f"C{i % 10}"
        conc = sorted((p for p in points if p.target == t and p.mode == "concurrency"), key=lambda p: p.load)
        rate = sorted((p for p in points if p.target == t and p.mode == "request_rate"), key=lambda p: p.load)
        if conc:
            ax.plot(
                [p.p99_ms for p in conc], [p.throughput_infer_per_s for p in conc], "o-", color=color, label=t
            )
            for p in conc:
                ax.annotate(
                    f"c{p.load:g}",
                    (p.p99_ms, p.throughput_infer_per_s),
                    fontsize=7,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
        if rate:
            ax.plot(
                [p.p99_ms for p in rate],
                [p.throughput_infer_per_s for p in rate],
                "s",
                color=color,
                markerfacecolor="none",
                label=f"{t} (request rate)" if not conc else None,
            )
    ax.set_xlabel("p99 latency (ms)")
    ax.set_ylabel("throughput (img/s)")
    ax.set_title("throughput vs p99 latency (● concurrency sweep, □ request-rate sweep)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_latency_breakdown(points: Sequence[PerfPoint], path: Path) -> Path:
    """Stacked bars of the average request's time (ms) per target and concurrency level: server queue,
    compute input, compute infer, compute output, and the rest (client send/recv, network, server overhead)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conc = [p for p in points if p.mode == "concurrency"] or list(points)
    labels = [f"{p.target}\n{'c' if p.mode == 'concurrency' else 'r'}{p.load:g}" for p in conc]
    parts = {
        "queue": [p.server.queue_ms for p in conc],
        "compute input": [p.server.compute_input_ms for p in conc],
        "compute infer": [p.server.compute_infer_ms for p in conc],
        "compute output": [p.server.compute_output_ms for p in conc],
        "client + network": [
            max(0.0, (p.avg_latency_ms or 0.0) - p.server.total_ms)
            if p.avg_latency_ms
            else p.client_send_ms + p.network_server_send_recv_ms + p.client_recv_ms
            for p in conc
        ],
    }
    fig, ax = plt.subplots(figsize=(max(8, 0.55 * len(conc) + 2), 6), dpi=110)
    bottom = [0.0] * len(conc)
    for i, (name, vals) in enumerate(parts.items()):
        ax.bar(range(len(conc)), vals, bottom=bottom, label=name, color=f"C{i}")
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    ax.set_xticks(range(len(conc)))
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("average latency (ms)")
    ax.set_title("latency breakdown (perf_analyzer server-side columns)")
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_plots(points: Sequence[PerfPoint], folder: Path) -> list[Path]:
    """Both PNG plots into ``folder``; none when there is no point."""
    if not points:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    return [
        plot_throughput_vs_p99(points, folder / "throughput_vs_p99.png"),
        plot_latency_breakdown(points, folder / "latency_breakdown.png"),
    ]


def write_report(result: BenchResult, folder: str | Path) -> list[Path]:
    """Write ``bench.json``, ``points.csv``, the plots and ``report.md`` into ``folder``; returns the paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    js = atomic_write_text(folder / "bench.json", json.dumps(result.as_dict(), indent=2, default=str))
    pts = write_points_csv(result, folder / "points.csv")
    plots = write_plots(result.points, folder)
    md = atomic_write_text(folder / "report.md", markdown(result, plots))
    return [js, pts, md, *plots]
