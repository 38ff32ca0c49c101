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
5. request-rate sweep: for each rate, every target in turn (rates default to fractions of the slowest target's
   best concurrency throughput, so every target gets the same absolute load).

Targets (:mod:`tcsched.client.targets`): each variant model directly, the ensemble forced to each variant
(request parameter ``variant``), the scheduler model alone forced to each variant, the plain pipelines
(:mod:`tcsched.client.pipelines`) and the ensemble with the scheduler's own choice. Overheads are ratios: served
img/s / bare img/s, and ensemble-forced p50 / direct variant p50 at the same concurrency. Results:
:mod:`tcsched.client.bench_results`; the written report: :mod:`tcsched.client.bench_report`.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import typer
from rich.console import Console

from tcsched.client.bare import BarePoint, measure_bare, serving_threads
from tcsched.client.bench_env import check_server, environment, has_models
from tcsched.client.bench_report import write_report
from tcsched.client.bench_results import BenchConfig, BenchResult
from tcsched.client.overhead import OverheadResult, measure_overhead
from tcsched.client.perf_analyzer import (
    LoadSpec,
    PerfAnalyzerError,
    PerfPoint,
    find_perf_analyzer,
    perf_analyzer_version,
    run_load,
    server_statistics,
    variant_usage_delta,
    warm_up,
)
from tcsched.client.pipelines import pipeline_name, write_pipelines
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
    pick_images,
    ramp_targets,
)


def plan(cfg: BenchConfig, variants: Sequence[str]) -> dict:
    """How many perf_analyzer points and bare measurements a config runs, and a rough duration (s)."""
    n_targets = len(bench_targets(variants, scheduler=cfg.scheduler, pipelines=cfg.url is None))
    n_rates = len(cfg.request_rates) if cfg.request_rates else len(cfg.rate_fractions)
    points = n_targets * (len(cfg.concurrency) + n_rates)
    bare = len(variants) * len(cfg.concurrency) if cfg.bare else 0
    per_point = (3 + 1) * cfg.measurement_interval_ms / 1000 + 1.0  # 3 windows, usually one more, startup
    est = points * per_point + bare * (3 * cfg.measurement_interval_ms / 1000 + 1) + n_targets * 3 + 25
    est += cfg.overhead_rounds * n_targets * 0.012  # one ~10 ms request per target per round
    est += cfg.pair_rounds * len(variants) * (3 * cfg.measurement_interval_ms / 1000 + 1.5)
    return {"perf_analyzer_points": points, "bare_points": bare, "estimated_s": round(est)}


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
        base = next(
            (v.name for v in manifest.variants if (v.runtime, v.precision) == ("onnxruntime", "int8")), None
        )
        if base is not None and base not in served:
            served.append(base)
    variants = list(cfg.variants) if cfg.variants else served
    unknown = [v for v in variants if v not in known]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; the repository {cfg.repo} has {known}")
    return variants


def _server(cfg: BenchConfig, manifest, variants: Sequence[str], raw: Path):
    """The server to measure: none to start with ``cfg.url``; else tritonserver on ``cfg.repo``, with the plain
    pipelines served beside it from a second repository."""
    from tcsched.server import TritonServer

    if cfg.url:
        return contextlib.nullcontext(None)
    overlay = write_pipelines(raw / "pipelines_repository", manifest, variants)
    return TritonServer(
        Path(cfg.repo),
        http_port=0,
        grpc_port=0,
        metrics_port=0,
        log_file=raw / "tritonserver.log",
        extra_args=[f"--model-repository={overlay}"],
    )


def _usage(p: PerfPoint, variants: Sequence[str]) -> dict[str, dict]:
    """Variant usage of one point from its statistics deltas (see ``variant_usage_delta``)."""
    total = sum(p.server_stats[v].inference_count for v in variants if v in p.server_stats)
    return {
        v: {
            "inference_count": p.server_stats[v].inference_count,
            "share": p.server_stats[v].inference_count / total if total else 0.0,
        }
        for v in variants
        if v in p.server_stats
    }


def _load_tag(load: LoadSpec) -> str:
    if load.concurrency is not None:
        return f"concurrency={load.concurrency:g}"
    return f"request_rate={load.request_rate:g}"


class _BenchRun:
    """The measuring part of one bench run against a server at ``url``: its steps in order, and what they
    measured so far (points, bare points, overhead, errors)."""

    def __init__(
        self,
        cfg: BenchConfig,
        manifest,
        variants: list[str],
        targets: list[Target],
        data: InputData,
        raw: Path,
        pipelines: bool,
        log: Callable[[str], None],
    ) -> None:
        self.cfg, self.manifest, self.variants, self.targets = cfg, manifest, variants, targets
        self.data, self.raw, self.pipelines, self.log = data, raw, pipelines, log
        self.known = [v.name for v in manifest.variants]
        self.url = ""
        self.points: list[PerfPoint] = []
        self.bare: list[BarePoint] = []
        self.errors: list[str] = []
        self.overhead: list[OverheadResult] = []
        self.pair_points: list[PerfPoint] = []
        self.rates: list[float] = []
        # progress of the perf_analyzer points: done of planned, and the time they took (the ETA of the rest)
        self.planned = plan(cfg, variants)["perf_analyzer_points"]
        self.done = 0
        self.started = time.monotonic()

    def progress(self) -> str:
        """``[k/N, ETA m:ss]`` after the k-th perf_analyzer point, from the mean time per point so far."""
        self.done += 1
        left = max(0, self.planned - self.done)
        eta = (time.monotonic() - self.started) / self.done * left
        return f"[{self.done}/{self.planned}, ETA {int(eta // 60)}:{int(eta % 60):02d}]"

    def load(self, **level: float) -> LoadSpec:
        """A load level (``concurrency=`` or ``request_rate=``) with the config's measurement settings."""
        cfg = self.cfg
        return LoadSpec(
            **level,
            measurement_interval_ms=cfg.measurement_interval_ms,
            stability_percentage=cfg.stability_percentage,
            max_trials=cfg.max_trials,
        )

    def measure(self, t: Target, load: LoadSpec) -> None:
        """One perf_analyzer point of ``t``; a failure is recorded in ``errors`` and the run goes on."""
        tag = _load_tag(load)
        stats_models = [self.manifest.ensemble, "preprocess", "scheduler", *self.known]
        if self.pipelines:
            stats_models += [pipeline_name(v) for v in self.variants]
        try:
            p = run_load(
                t.model,
                self.url,
                load,
                input_data=self.data.for_target(t),
                request_parameters=t.request_parameters,
                stats_models=stats_models,
                work_dir=self.raw,
                target=t.name,
                timeout_s=self.cfg.timeout_s,
            )
        except PerfAnalyzerError as e:
            self.errors.append(f"{t.name} {tag}: {str(e)[-600:]}")
            self.log(f"  {t.name:34s} {tag:>18s}  FAILED (see errors) {self.progress()}")
            return
        self.points.append(p)
        used = ""
        if t.kind == "ensemble" and t.variant is None:
            use = {k: v["inference_count"] for k, v in _usage(p, self.known).items() if v["inference_count"]}
            used = f"  served by {use}"
        self.log(
            f"  {t.name:34s} {tag:>18s}  {p.throughput_infer_per_s:7.1f} img/s  p50 {p.p50_ms:7.1f} ms"
            f"  p99 {p.p99_ms:7.1f} ms{'' if p.stable else f'  (stable only at {p.stability_percentage:g}%)'}"
            f"{used}  {self.progress()}"
        )

    def warm_up(self) -> None:
        """A short burst (4 requests per slot) at the highest concurrency on every target.

        Raises:
            PerfAnalyzerError: a target fails its warm-up (the server cannot serve it).
        """
        self.log("warm-up")
        c_max = max(self.cfg.concurrency)
        for t in self.targets:
            warm_up(
                t.model,
                self.url,
                LoadSpec(concurrency=c_max, request_count=4 * c_max),
                input_data=self.data.for_target(t),
                work_dir=self.raw,
                request_parameters=t.request_parameters,
                timeout_s=self.cfg.timeout_s,
                label=t.name,
            )

    def measure_overhead(self) -> None:
        """The interleaved concurrency-1 overhead; a failure is recorded, the sweeps still run."""
        self.log(
            f"overhead at concurrency 1: {self.cfg.overhead_rounds} rounds, targets interleaved in random order"
        )
        try:
            self.overhead = measure_overhead(
                self.url, self.targets, self.data.tensors, self.data.blobs, rounds=self.cfg.overhead_rounds
            )
        except Exception as e:  # noqa: BLE001 - reported with the results, the sweep still runs
            self.errors.append(f"overhead: {type(e).__name__}: {str(e)[-600:]}")
        for o in self.overhead:
            self.log(
                f"  {o.variant:34s} "
                + "  ".join(f"{k} {e.ratio:.3f} [{e.low:.3f}, {e.high:.3f}]" for k, e in o.ratios.items())
            )

    def bare_sessions(self) -> dict:
        """variant -> (its engine with the serving threads, threads), for the CPU variants (ONNX Runtime and
        OpenVINO, :func:`tcsched.engines.load_engine`: the engine the variant model serves with)."""
        from tcsched.engines import CPU_RUNTIMES, load_engine

        sessions = {}
        repo = Path(self.cfg.repo)
        for v in self.variants:
            entry = self.manifest.variant(v)
            path = repo / entry.file
            if entry.runtime in CPU_RUNTIMES and path.suffix == ".onnx" and path.is_file():
                th = serving_threads(repo, v)
                sessions[v] = (load_engine(entry.runtime, path, threads=th, precision=entry.precision), th)
            else:
                self.log(f"  no bare measurement for {v} ({entry.runtime}, {entry.file})")
        return sessions

    def concurrency_sweep(self) -> None:
        """Each level: the bare sessions at batch min(c, max batch), then every target in turn."""
        sessions = self.bare_sessions() if self.cfg.bare else {}
        max_b = self.manifest.max_batch_size
        self.log("concurrency sweep (each level: bare sessions, then every target in turn)")
        for c in self.cfg.concurrency:
            for v, (clf, th) in sessions.items():
                b = min(c, max_b)
                bp = measure_bare(
                    clf, self.data.tensors, b, 3 * self.cfg.measurement_interval_ms / 1000, v, th
                )
                self.bare.append(bp)
                self.log(
                    f"  {'bare ' + v:34s} {f'batch={b}':>18s}  {bp.img_per_s:7.1f} img/s  "
                    f"p50 {bp.p50_ms:7.1f} ms  p99 {bp.p99_ms:7.1f} ms"
                )
            for t in self.targets:
                self.measure(t, self.load(concurrency=c))

    def pair_rounds(self) -> None:
        """``cfg.pair_rounds`` rounds of every variant target at the highest concurrency, the order reversed every
        other round; three windows each, taken as they are (the rounds, not perf_analyzer's stability rule,
        average out the machine's drift). A failing point is recorded in ``errors``."""
        c = max(self.cfg.concurrency)
        direct = [t for t in self.targets if t.kind == "variant"]
        if not direct or not self.cfg.pair_rounds:
            return
        self.log(f"pair rounds: {self.cfg.pair_rounds} rounds of every variant directly at concurrency {c}")
        stats_models = list(self.known)
        load = LoadSpec(
            concurrency=c,
            measurement_interval_ms=self.cfg.measurement_interval_ms,
            stability_percentage=1000.0,
            max_trials=3,
        )
        for r in range(self.cfg.pair_rounds):
            for t in direct if r % 2 == 0 else direct[::-1]:
                try:
                    p = run_load(
                        t.model,
                        self.url,
                        load,
                        input_data=self.data.for_target(t),
                        stats_models=stats_models,
                        work_dir=self.raw,
                        target=f"{t.name}#round{r}",
                        timeout_s=self.cfg.timeout_s,
                    )
                except PerfAnalyzerError as e:
                    self.errors.append(f"{t.name} pair round {r}: {str(e)[-600:]}")
                    continue
                self.pair_points.append(p)
                st = p.server_stats.get(t.model)
                batch = f"  batch {st.avg_batch_size:.2f}" if st and st.avg_batch_size else ""
                self.log(
                    f"  round {r} {t.name:34s} {p.throughput_infer_per_s:7.1f} img/s  p50 {p.p50_ms:7.1f} ms{batch}"
                )

    def request_rates(self) -> list[float]:
        """``cfg.request_rates``, else ``cfg.rate_fractions`` x the slowest target's best throughput (needs a
        concurrency point of every target; else an error is recorded and there is no rate sweep)."""
        rates = list(self.cfg.request_rates or ())
        if rates or not self.cfg.rate_fractions:
            return rates
        best: dict[str, float] = {}
        for p in self.points:
            best[p.target] = max(best.get(p.target, 0.0), p.throughput_infer_per_s)
        if not best or len(best) != len(self.targets):
            self.errors.append("no request-rate sweep: some concurrency points failed")
            return []
        slowest = min(best.values())
        rates = [round(f * slowest, 1) for f in self.cfg.rate_fractions]
        self.log(
            f"request rates {rates} req/s = {list(self.cfg.rate_fractions)} x slowest target ({slowest:.1f} img/s)"
        )
        return rates

    def measure_all(self, url: str) -> dict:
        """Every step against the server at ``url``; returns the environment (before and after)."""
        self.url = url
        env = environment(url)
        self.log(
            f"server {url} (tritonserver {env.get('tritonserver')}); {env['cpu_model']}, {env['cpu_count']} cores"
        )
        if self.cfg.warmup:
            self.warm_up()
        if self.cfg.overhead_rounds:
            self.measure_overhead()
        self.concurrency_sweep()
        self.pair_rounds()
        self.rates = self.request_rates()
        if self.rates:
            self.log("request-rate sweep (each rate: every target in turn)")
        for r in self.rates:
            for t in self.targets:
                self.measure(t, self.load(request_rate=r))
        env["loadavg_1_5_15_after"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
        return env

    def result(self, env: dict, wall_s: float) -> BenchResult:
        conf = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self.cfg).items()}
        conf.update(
            ensemble=self.manifest.ensemble,  # the served ensemble's name (manifest.ensemble)
            variants=self.variants,
            # variant -> [runtime, precision]: the (runtime, graph) pair of each, for the report's tables
            pairs={
                v: [self.manifest.variant(v).runtime, self.manifest.variant(v).precision]
                for v in self.variants
            },
            request_rates_used=self.rates,
            max_batch_size=self.manifest.max_batch_size,
            images=self.data.images,
            protocol="grpc",
            request_distribution="constant",
        )
        return BenchResult(
            conf,
            env,
            self.targets,
            self.points,
            self.bare,
            self.errors,
            wall_s,
            self.overhead,
            self.pair_points,
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
    targets = bench_targets(variants, manifest.ensemble, scheduler=cfg.scheduler, pipelines=pipelines)
    est = plan(cfg, variants)
    log(
        f"perf_analyzer {pa_version}: {est['perf_analyzer_points']} points over {len(targets)} targets, "
        f"{est['bare_points']} bare points, about {est['estimated_s']} s"
    )
    raw = (Path(cfg.output) / "raw").resolve()
    raw.mkdir(parents=True, exist_ok=True)
    data = make_input_data(items, raw, manifest.preprocess_spec)
    log(f"input data: {len(items)} real images from {cfg.data_dir or 'scikit-image default photos'}")
    run = _BenchRun(cfg, manifest, variants, targets, data, raw, pipelines, log)
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
    )
    try:
        result = run_bench(cfg, log=lambda s: console.print(s, highlight=False, markup=False))
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    except (FileNotFoundError, PerfAnalyzerError) as e:
        console.print(f"[red]{e}[/red]")
        raise typer.Exit(1) from None
    files = write_report(result, output)
    console.print(f"wrote {', '.join(str(f) for f in files)} ({result.wall_s:.0f} s)")
    if result.errors:
        console.print(f"[yellow]{len(result.errors)} error(s), see {output / 'bench.json'}[/yellow]")
        raise typer.Exit(2)
