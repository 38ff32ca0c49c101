"""``tcsched bench``: perf_analyzer against every variant and the ensemble, and the bare runtime as lower bound.

What one run measures, interleaved so that every ratio is taken side by side on the same machine state:

1. warm-up: every target gets a short perf_analyzer burst at the highest concurrency (the sweep's own first
   windows are also discarded by perf_analyzer's stability rule);
2. the interleaved concurrency-1 overhead measurement (:mod:`tcsched.client.overhead`);
3. concurrency sweep: for each level c, each variant's bare ONNX Runtime session in-process at batch c
   (:func:`~tcsched.client.bare.measure_bare`, same intra-op threads as serving), then every target in turn;
4. pair rounds: ``pair_rounds`` rounds of every variant called directly at the highest concurrency, the order
   reversed every other round, so that each pair's img/s ratio to ONNX Runtime int8 is taken side by side
   (median over rounds, paired bootstrap 95% interval), with the batch the dynamic batcher formed and the
   per-request queue / compute times from Triton's statistics;
5. path rounds: ``path_rounds`` rounds, JPEG in at the highest concurrency, of today's path (the ensemble
   ``<ensemble>_exact_path`` served beside the repository, :func:`~tcsched.client.pipelines.write_exact_path`:
   exact preprocessing with one instance, forced to ONNX Runtime int8), the ensemble as built with the
   scheduler's own choice, and the ensemble forced to the fastest pair of the pair rounds; the order reversed
   every other round; each one's img/s ratio to today's path (median over rounds, paired bootstrap 95% interval);
6. request-rate sweep: for each rate, every target in turn (rates default to fractions of the slowest target's
   best concurrency throughput, so every target gets the same absolute load).

Targets (:mod:`tcsched.client.targets`): each variant model directly, the ensemble forced to each variant
(request parameter ``variant``), the scheduler model alone forced to each variant, the plain pipelines
(:mod:`tcsched.client.pipelines`) and the ensemble with the scheduler's own choice. Overheads are ratios: served
img/s / bare img/s, and ensemble-forced p50 / direct variant p50 at the same concurrency. Results:
:mod:`tcsched.client.bench_results`; the written report: :mod:`tcsched.client.bench_report`.

This module chooses the variants, starts the server and runs the steps
(:class:`~tcsched.client.bench_run.BenchRun`), and holds the ``tcsched bench`` command.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import typer
from rich.console import Console

from tcsched.client.bare import BarePoint, measure_bare, serving_threads
from tcsched.client.bench_env import check_server, environment, has_models
from tcsched.client.bench_report import paths_table, write_report
from tcsched.client.bench_results import BenchConfig, BenchResult
from tcsched.client.bench_run import BenchRun, plan
from tcsched.client.perf_analyzer import (
    PerfAnalyzerError,
    find_perf_analyzer,
    perf_analyzer_version,
    server_statistics,
    variant_usage_delta,
)
from tcsched.client.pipelines import exact_path_name, pipeline_name, write_pipelines
from tcsched.client.targets import (
    ENSEMBLE,
    ENSEMBLE_INPUT,
    SCHEDULER,
    SCHEDULER_INPUT,
    VARIANT_INPUT,
    InputData,
    Target,
    TargetKind,
    bench_targets,
    make_input_data,
    ort_int8_variant,
    pick_images,
    ramp_targets,
)


def _select_variants(cfg: BenchConfig, manifest) -> list[str]:
    """``cfg.variants``, or by default the variants this machine serves for speed (an emulated precision, fp16
    on a CPU, is never chosen by the scheduler there; name it with --variants to measure it anyway) and the
    ONNX Runtime int8 variant, the baseline of the pairs' ratios.

    Raises:
        ValueError: a variant the repository does not have.
    """
    known = [v.name for v in manifest.variants]
    served = [
        v.name
        for v in manifest.variants
        if manifest.target == "gpu"
        or v.name == manifest.variant(manifest.reference_variant).name
        or (v.serve_on_cpu_for_speed and v.on_pareto_front)
    ]
    if not cfg.variants:
        # the ONNX Runtime int8 variant is the baseline of the pairs' img/s ratios: measured even off the front
        base = ort_int8_variant(manifest)
        if base is not None and base not in served:
            served.append(base)
    variants = list(cfg.variants) if cfg.variants else served
    unknown = [v for v in variants if v not in known]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; the repository {cfg.repo} has {known}")
    return variants


def _server(cfg: BenchConfig, manifest, variants: Sequence[str], raw: Path):
    """The server to measure: none to start with ``cfg.url``; else tritonserver on ``cfg.repo``, with the plain
    pipelines and (``cfg.path_rounds``) today's path served beside it from a second repository."""
    from tcsched.server import TritonServer

    if cfg.url:
        return contextlib.nullcontext(None)
    exact_from = Path(cfg.repo) if cfg.path_rounds else None
    ort = ort_int8_variant(manifest)
    overlay = write_pipelines(
        raw / "pipelines_repository", manifest, variants, repo=exact_from, float_variants=[ort] if ort else []
    )
    return TritonServer(
        Path(cfg.repo),
        http_port=0,
        grpc_port=0,
        metrics_port=0,
        log_file=raw / "tritonserver.log",
        extra_args=[f"--model-repository={overlay}"],
    )


def run_bench(cfg: BenchConfig, log: Callable[[str], None] = print) -> BenchResult:
    """Run the benchmark (starting a server on ``cfg.repo`` unless ``cfg.url``) and return the results.

    Raises:
        ValueError: a bad option, an unknown variant, no server at ``cfg.url`` (before any measurement).
        FileNotFoundError / PerfAnalyzerError: perf_analyzer missing or not starting.
    """
    from tcsched.manifest import Manifest

    t_start = time.monotonic()
    cfg.validate()
    manifest = Manifest.read(Path(cfg.repo) / "manifest.json")
    variants = _select_variants(cfg, manifest)
    find_perf_analyzer()
    pa_version = perf_analyzer_version()  # fails early without libb64 / libcudart.so.12
    if cfg.url is not None:
        check_server(cfg.url, [*variants, manifest.ensemble])
    items = pick_images(cfg.data_dir, cfg.n_images)
    # the plain pipelines are served beside the repository by the bench's own server; an external one
    # (--url) has them only if it was started with them
    pipelines = cfg.url is None or has_models(cfg.url, [pipeline_name(v) for v in variants])
    if not pipelines:
        log("no pipeline_<variant> models on the server at --url: ensemble vs pipeline not measured")
    # today's path likewise (written only for path rounds)
    exact_path = cfg.path_rounds > 0 and (
        cfg.url is None or has_models(cfg.url, [exact_path_name(manifest.ensemble)])
    )
    targets = bench_targets(variants, manifest.ensemble, scheduler=cfg.scheduler, pipelines=pipelines)
    est = plan(cfg, variants)
    log(
        f"perf_analyzer {pa_version}: {est['perf_analyzer_points']} points over {len(targets)} targets, "
        f"{est['bare_points']} bare points, about {est['estimated_s']} s"
    )
    raw = (Path(cfg.output) / "raw").resolve()
    raw.mkdir(parents=True, exist_ok=True)
    data = make_input_data(items, raw, manifest.preprocess_spec, manifest.input.dtype)
    log(f"input data: {len(items)} real images from {cfg.data_dir or 'scikit-image default photos'}")
    run = BenchRun(cfg, manifest, variants, targets, data, raw, pipelines, log, exact_path=exact_path)
    with _server(cfg, manifest, variants, raw) as server:
        env = run.measure_all(cfg.url or server.grpc_url)
    return run.result(env, time.monotonic() - t_start)


__all__ = [
    "ENSEMBLE",
    "ENSEMBLE_INPUT",
    "SCHEDULER",
    "SCHEDULER_INPUT",
    "VARIANT_INPUT",
    "BarePoint",
    "BenchConfig",
    "BenchResult",
    "InputData",
    "Target",
    "TargetKind",
    "bench_command",
    "bench_targets",
    "environment",
    "make_input_data",
    "measure_bare",
    "pick_images",
    "plan",
    "ramp_targets",
    "run_bench",
    "server_statistics",
    "serving_threads",
    "variant_usage_delta",
    "write_pipelines",
]


# ------------------------------------------------------------------------------------------------ CLI


def _ints(s: str, what: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in s.split(",") if x.strip())
    except ValueError:
        raise typer.BadParameter(f"{what} must be comma-separated integers, got {s!r}") from None


def _floats(s: str, what: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in s.split(",") if x.strip())
    except ValueError:
        raise typer.BadParameter(f"{what} must be comma-separated numbers, got {s!r}") from None


def bench_command(
    repo: Path = typer.Option(Path("model_repository"), "--repo", "-r", help="model repository folder"),
    output: Path = typer.Option(Path("reports/bench"), "--output", "-o", help="report folder"),
    url: str = typer.Option(None, help="gRPC host:port of a running server (default: start one on --repo)"),
    data_dir: Path = typer.Option(None, help="real images (default: scikit-image's photos)"),
    images: int = typer.Option(16, help="how many images perf_analyzer cycles through"),
    variants: str = typer.Option(
        None, help="comma-separated variant models (default: those served for speed here; fp16 on CPU is not)"
    ),
    scheduler: bool = typer.Option(True, help="also the ensemble with the scheduler's own choice"),
    concurrency: str = typer.Option("1,4,8", help="concurrency levels"),
    request_rates: str = typer.Option(None, help="request rates, req/s (default: --rate-fractions)"),
    rate_fractions: str = typer.Option(
        "0.5,0.8", help="rates as fractions of the slowest target's best img/s"
    ),
    measurement_interval_ms: int = typer.Option(2000, help="perf_analyzer measurement window, ms"),
    stability_percentage: float = typer.Option(15.0, help="perf_analyzer -s, %"),
    max_trials: int = typer.Option(6, help="perf_analyzer -r, windows per level at most"),
    bare: bool = typer.Option(True, help="measure each variant's bare engine (ONNX Runtime or OpenVINO)"),
    warmup: bool = typer.Option(True, help="warm every target up before measuring"),
    overhead_rounds: int = typer.Option(
        200, help="rounds of the interleaved concurrency-1 overhead measurement (0: skip)"
    ),
    pair_rounds: int = typer.Option(
        4, help="interleaved rounds of every variant directly at the highest concurrency (0: skip)"
    ),
    path_rounds: int = typer.Option(
        4,
        help="interleaved rounds, JPEG in at the highest concurrency, of today's path (exact preprocessing, "
        "1 instance, ONNX Runtime int8) and the ensemble as built, default and fastest pair (0: skip)",
    ),
):
    """perf_analyzer sweeps (concurrency, request rate) of every variant and the ensemble, bare ONNX Runtime
    as the lower bound; writes JSON, CSV, markdown and PNG plots to OUTPUT."""

    console = Console(width=None if sys.stdout.isatty() else 140)
    cfg = BenchConfig(
        repo=repo,
        output=output,
        url=url,
        data_dir=data_dir,
        n_images=images,
        variants=tuple(v.strip() for v in variants.split(",") if v.strip()) if variants else None,
        scheduler=scheduler,
        concurrency=_ints(concurrency, "--concurrency"),
        request_rates=_floats(request_rates, "--request-rates") if request_rates else None,
        rate_fractions=_floats(rate_fractions, "--rate-fractions") if rate_fractions else (),
        measurement_interval_ms=measurement_interval_ms,
        stability_percentage=stability_percentage,
        max_trials=max_trials,
        bare=bare,
        warmup=warmup,
        overhead_rounds=overhead_rounds,
        pair_rounds=pair_rounds,
        path_rounds=path_rounds,
    )
    try:
        result = run_bench(cfg, log=lambda s: console.print(s, highlight=False, markup=False))
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    except (FileNotFoundError, PerfAnalyzerError) as e:
        console.print(f"[red]{e}[/red]")
        raise typer.Exit(1) from None
    files = write_report(result, output)
    for line in paths_table(result):
        console.print(line, highlight=False, markup=False)
    console.print(f"wrote {', '.join(str(f) for f in files)} ({result.wall_s:.0f} s)")
    if result.errors:
        console.print(f"[yellow]{len(result.errors)} error(s), see {output / 'bench.json'}[/yellow]")
        raise typer.Exit(2)
