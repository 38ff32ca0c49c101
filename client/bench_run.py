"""The measuring steps of one ``tcsched bench`` run, in order, against a server that is up: warm-up, the
concurrency-1 overhead, the concurrency sweep with the bare engines, the pair rounds, the path rounds and the
request-rate sweep (what each measures and why they are interleaved: :mod:`tcsched.client.bench`), and
:func:`plan`, the number of points a config runs and its rough duration.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np

from tcsched.client.bare import BarePoint, measure_bare, serving_threads
from tcsched.client.bench_env import environment
from tcsched.client.bench_results import BenchConfig, BenchResult
from tcsched.client.overhead import OverheadResult, measure_overhead
from tcsched.client.perf_analyzer import LoadSpec, PerfAnalyzerError, PerfPoint, run_load, warm_up
from tcsched.client.pipelines import (
    PREPROCESS_EXACT,
    SCHEDULER_EXACT,
    exact_path_name,
    float_copy_name,
    pipeline_name,
    preprocess_setup,
)
from tcsched.client.targets import SCHEDULER, InputData, Target, bench_targets, ort_int8_variant, path_targets
from tcsched.names import PREPROCESS


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
    if cfg.url is None:  # today's path is served by the bench's own server (or was started with it)
        est += cfg.path_rounds * 3 * (3 * cfg.measurement_interval_ms / 1000 + 1.5)
    return {"perf_analyzer_points": points, "bare_points": bare, "estimated_s": round(est)}


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


class BenchRun:
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
        exact_path: bool = False,
    ) -> None:
        self.cfg, self.manifest, self.variants, self.targets = cfg, manifest, variants, targets
        self.data, self.raw, self.pipelines, self.log = data, raw, pipelines, log
        self.exact_path = exact_path  # today's path (<ensemble>_exact_path) is on the server
        self.known = [v.name for v in manifest.variants]
        # the models whose inferences count as "served by": the variants and what serves them on today's path
        self.counted = list(dict.fromkeys([*self.known, *map(self._today_model, self.known)]))
        self.url = ""
        self.points: list[PerfPoint] = []
        self.bare: list[BarePoint] = []
        self.errors: list[str] = []
        self.overhead: list[OverheadResult] = []
        self.pair_points: list[PerfPoint] = []
        self.path_targets: list[Target] = []
        self.path_points: list[PerfPoint] = []
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

    def _run(
        self, t: Target, load: LoadSpec, stats_models: Sequence[str], name: str, label: str
    ) -> PerfPoint | None:
        """One perf_analyzer run of ``t`` recorded as target ``name``; None when it fails, its error recorded in
        ``errors`` under ``label``."""
        try:
            return run_load(
                t.model,
                self.url,
                load,
                input_data=self.data.for_target(t),
                request_parameters=t.request_parameters,
                stats_models=stats_models,
                work_dir=self.raw,
                target=name,
                timeout_s=self.cfg.timeout_s,
            )
        except PerfAnalyzerError as e:
            self.errors.append(f"{label}: {str(e)[-600:]}")
            return None

    def _today_model(self, variant: str) -> str:
        """The model that serves ``variant`` on today's path: itself, or beside a uint8-pixel repository its
        float-input copy (client.pipelines)."""
        return variant if self.manifest.input.dtype == "float32" else float_copy_name(variant)

    def _served_by(self, p: PerfPoint) -> dict[str, int]:
        """Inferences per variant that served ``p`` (those with any)."""
        return {k: v["inference_count"] for k, v in _usage(p, self.counted).items() if v["inference_count"]}

    def measure(self, t: Target, load: LoadSpec) -> None:
        """One perf_analyzer point of ``t``; a failure is recorded in ``errors`` and the run goes on."""
        tag = _load_tag(load)
        stats_models = [self.manifest.ensemble, "preprocess", "scheduler", *self.known]
        if self.pipelines:
            stats_models += [pipeline_name(v) for v in self.variants]
        p = self._run(t, load, stats_models, t.name, f"{t.name} {tag}")
        if p is None:
            self.log(f"  {t.name:34s} {tag:>18s}  FAILED (see errors) {self.progress()}")
            return
        self.points.append(p)
        used = f"  served by {self._served_by(p)}" if t.kind == "ensemble" and t.variant is None else ""
        self.log(
            f"  {t.name:34s} {tag:>18s}  {p.throughput_infer_per_s:7.1f} img/s  p50 {p.p50_ms:7.1f} ms"
            f"  p99 {p.p99_ms:7.1f} ms{'' if p.stable else f'  (stable only at {p.stability_percentage:g}%)'}"
            f"{used}  {self.progress()}"
        )

    def warm_up(self, targets: Sequence[Target] | None = None) -> None:
        """A short burst (4 requests per slot) at the highest concurrency on every target (or ``targets``).

        Raises:
            PerfAnalyzerError: a target fails its warm-up (the server cannot serve it).
        """
        self.log("warm-up")
        c_max = max(self.cfg.concurrency)
        for t in self.targets if targets is None else targets:
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

    def rounds(
        self, targets: Sequence[Target], n: int, tag: str, stats_models: Sequence[str]
    ) -> list[PerfPoint]:
        """``n`` rounds of ``targets`` at the highest concurrency, the order reversed every other round; three
        windows each, taken as they are (the rounds, not perf_analyzer's stability rule, average out the
        machine's drift). A target's point of round ``r`` is named ``<target>#<tag><r>``; a failing point is
        recorded in ``errors`` and the rounds go on."""
        load = LoadSpec(
            concurrency=max(self.cfg.concurrency),
            measurement_interval_ms=self.cfg.measurement_interval_ms,
            stability_percentage=1000.0,
            max_trials=3,
        )
        out: list[PerfPoint] = []
        for r in range(n):
            for t in targets if r % 2 == 0 else targets[::-1]:
                name = f"{t.name}#{tag}{r}"
                p = self._run(t, load, stats_models, name, name)
                if p is None:
                    continue
                out.append(p)
                st = p.server_stats.get(t.model)
                if t.kind == "variant":
                    extra = f"  batch {st.avg_batch_size:.2f}" if st and st.avg_batch_size else ""
                else:
                    extra = f"  served by {self._served_by(p)}"
                self.log(
                    f"  round {r} {t.name:34s} {p.throughput_infer_per_s:7.1f} img/s  p50 {p.p50_ms:7.1f} ms{extra}"
                )
        return out

    def pair_rounds(self) -> None:
        """``cfg.pair_rounds`` :meth:`rounds` of every variant target called directly."""
        direct = [t for t in self.targets if t.kind == "variant"]
        if not direct or not self.cfg.pair_rounds:
            return
        c = max(self.cfg.concurrency)
        self.log(f"pair rounds: {self.cfg.pair_rounds} rounds of every variant directly at concurrency {c}")
        self.pair_points = self.rounds(direct, self.cfg.pair_rounds, "round", self.known)

    def fastest_variant(self) -> str | None:
        """The measured variant of the highest median img/s in the pair rounds; without pair rounds, the one
        whose forced ensemble served the most img/s at the highest concurrency in the sweep; None: neither."""
        c = max(self.cfg.concurrency)
        score: dict[str, list[float]] = {}
        for p in self.pair_points:
            score.setdefault(p.model, []).append(p.throughput_infer_per_s)
        if not score:
            forced = {t.name: t.variant for t in self.targets if t.kind == "ensemble" and t.variant}
            for p in self.points:
                if p.target in forced and p.mode == "concurrency" and p.load == c:
                    score[forced[p.target]] = [p.throughput_infer_per_s]
        score = {v: xs for v, xs in score.items() if v in self.variants}
        return max(score, key=lambda v: float(np.median(score[v]))) if score else None

    def path_rounds(self) -> None:
        """``cfg.path_rounds`` :meth:`rounds` of the path targets (:func:`path_targets`): today's path forced to
        the ONNX Runtime int8 variant, the ensemble with the scheduler's choice, the ensemble forced to
        :meth:`fastest_variant`; warmed up first (``cfg.warmup``). Skipped (logged) without today's path on the
        server or without an ONNX Runtime int8 variant in the repository."""
        if not self.cfg.path_rounds:
            return
        ort = ort_int8_variant(self.manifest)
        if not self.exact_path or ort is None:
            why = "no ONNX Runtime int8 variant" if ort is None else "today's path is not on the server"
            self.log(f"no path rounds: {why}")
            return
        fastest = self.fastest_variant() or ort
        today = self._today_model(ort)
        self.path_targets = path_targets(self.manifest.ensemble, ort, fastest, today)
        c = max(self.cfg.concurrency)
        self.log(
            f"path rounds: {self.cfg.path_rounds} rounds, JPEG in, at concurrency {c}: "
            + ", ".join(t.name for t in self.path_targets)
        )
        try:
            if self.cfg.warmup:
                self.warm_up(self.path_targets)
        except PerfAnalyzerError as e:
            self.errors.append(f"path rounds warm-up: {str(e)[-600:]}")
            return
        ens = self.manifest.ensemble
        stats = [ens, exact_path_name(ens), PREPROCESS, PREPROCESS_EXACT, SCHEDULER, *self.known]
        if today != ort:
            stats += [SCHEDULER_EXACT, today]
        self.path_points = self.rounds(self.path_targets, self.cfg.path_rounds, "path", stats)

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
        self.path_rounds()
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
            repository_variants=self.counted,
            # preprocessing of the ensemble as built and of today's path (the path rounds' table)
            preprocess={
                "default": preprocess_setup(Path(self.cfg.repo) / PREPROCESS),
                "today": {"method": "exact", "instances": 1},
            },
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
            self.path_targets,
            self.path_points,
        )
