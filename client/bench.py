"""``tcsched bench``: perf_analyzer against every variant and the ensemble, and the bare runtime as lower bound.

What one run measures, interleaved so that every ratio is taken side by side on this shared machine:

1. warm-up: every target gets a short perf_analyzer burst at the highest concurrency (the sweep's own first
   windows are also discarded by perf_analyzer's stability rule);
2. concurrency sweep: for each level c, each variant's bare ONNX Runtime session in-process at batch c
   (:func:`measure_bare`, same intra-op threads as serving), then every target in turn;
3. request-rate sweep: for each rate, every target in turn (rates default to fractions of the slowest target's
   best concurrency throughput, so every target gets the same absolute load).

Targets: each variant model directly, the ensemble forced to each variant (request parameter ``variant``) and
the ensemble with the scheduler's own choice. Overheads are ratios: served img/s / bare img/s, and
ensemble-forced p50 / direct variant p50 at the same concurrency.

The building blocks for the scheduler-under-load study (next issue) are in :mod:`tcsched.client.perf_analyzer`:
:func:`~tcsched.client.perf_analyzer.run_perf_analyzer` (any model, load, request parameters, optional
per-request profile), :func:`~tcsched.client.perf_analyzer.variant_usage_delta` and
:func:`~tcsched.client.perf_analyzer.within_budget_share`; :func:`make_input_data` and :func:`ramp_targets`
here prepare the data and the targets.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import re
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import typer

from tcsched.build_tools.repository import ServingOptions, pipeline_config, pipeline_name, render
from tcsched.client.overhead import OverheadResult, measure_overhead
from tcsched.client.perf_analyzer import (
    PerfAnalyzerError,
    PerfPoint,
    _run,
    find_perf_analyzer,
    perf_analyzer_command,
    perf_analyzer_version,
    run_perf_analyzer,
    server_statistics,
    variant_usage_delta,
    write_bytes_input_data,
    write_tensor_input_data,
)

ENSEMBLE = "classifier"
ENSEMBLE_INPUT = "IMAGE"
VARIANT_INPUT = "input"

TargetKind = Literal["variant", "ensemble", "scheduler", "pipeline"]
SCHEDULER = "scheduler"
SCHEDULER_INPUT = "INPUT"


@dataclass(frozen=True)
class Target:
    """One thing perf_analyzer loads: a Triton ``model`` with fixed request parameters.

    ``variant`` is the variant the target runs on (the model itself, or the one forced on the ensemble);
    ``None`` for the ensemble left to the scheduler.
    """

    name: str
    model: str
    kind: TargetKind
    request_parameters: dict[str, object] = field(default_factory=dict)
    variant: str | None = None


def bench_targets(
    variants: Sequence[str], ensemble: str = ENSEMBLE, scheduler: bool = True, pipelines: bool = False
) -> list[Target]:
    """Every variant directly, the ensemble forced to each variant, the scheduler model alone forced to each
    variant, (``pipelines``) the plain ensemble preprocess -> variant without the scheduler, and (``scheduler``)
    the ensemble's own pick."""
    out = [Target(v, v, "variant", {}, v) for v in variants]
    if pipelines:
        # same JPEG request and preprocessing as the ensemble, no scheduler: what the scheduler adds
        out += [Target(pipeline_name(v), pipeline_name(v), "pipeline", {}, v) for v in variants]
    out += [Target(f"{ensemble}[{v}]", ensemble, "ensemble", {"variant": v}, v) for v in variants]
    # the scheduler model alone (tensor in, BLS to the forced variant): its own overhead, without preprocessing
    out += [Target(f"{SCHEDULER}[{v}]", SCHEDULER, "scheduler", {"variant": v}, v) for v in variants]
    if scheduler:
        out.append(Target(f"{ensemble}[scheduler]", ensemble, "ensemble", {}, None))
    return out


def ramp_targets(
    variants: Sequence[str], latency_budget_ms: float, ensemble: str = ENSEMBLE, **params: object
) -> list[Target]:
    """Targets for the scheduler-under-load study: the ensemble with ``latency_budget_ms`` (scheduler
    chooses) and the ensemble forced to each static variant (same extra ``params`` on all).

    Raises:
        ValueError: ``latency_budget_ms`` not a finite number > 0.
    """
    if not (math.isfinite(latency_budget_ms) and latency_budget_ms > 0):
        raise ValueError(f"latency_budget_ms must be a finite number > 0, got {latency_budget_ms!r}")
    out = [
        Target(
            f"{ensemble}[budget={latency_budget_ms:g}ms]",
            ensemble,
            "ensemble",
            {**params, "latency_budget_ms": float(latency_budget_ms)},
            None,
        )
    ]
    out += [Target(f"{ensemble}[{v}]", ensemble, "ensemble", {**params, "variant": v}, v) for v in variants]
    return out


# --------------------------------------------------------------------------------------------- input data


@dataclass(frozen=True)
class InputData:
    """perf_analyzer ``--input-data`` files made from the same real images: preprocessed float32 tensors for
    the variants, the encoded bytes for the ensemble; ``tensors`` feeds the bare-session measurement."""

    variant_json: Path
    ensemble_json: Path
    images: list[str]
    tensors: list  # numpy float32 [3, 224, 224] each
    scheduler_json: Path | None = None
    blobs: list = field(default_factory=list)  # the encoded images, same order as ``tensors``

    def for_target(self, t: Target) -> Path:
        if t.kind == "scheduler":
            return self.scheduler_json
        return self.variant_json if t.kind == "variant" else self.ensemble_json  # ensemble, pipeline


def pick_images(data_dir: str | os.PathLike | None, n: int) -> list:
    """``n`` real images spread evenly over ``data_dir`` (``tcsched.data.list_images``), or the default photos.

    Raises:
        ValueError: ``n`` < 1.
        FileNotFoundError: ``data_dir`` missing or without images.
    """
    from tcsched.data import default_photos, list_images

    if n < 1:
        raise ValueError(f"need at least 1 image, got {n}")
    items = list_images(data_dir) if data_dir is not None else default_photos()
    step = max(1, len(items) // n)
    return items[::step][:n]


def make_input_data(items: Sequence, folder: str | os.PathLike) -> InputData:
    """Write both ``--input-data`` JSON files for ``items`` (``tcsched.data.ImageItem``) into ``folder``."""
    from tcsched.imaging import preprocess_bytes

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    blobs = [it.read_bytes() for it in items]
    tensors = [preprocess_bytes(b) for b in blobs]
    return InputData(
        variant_json=write_tensor_input_data(folder / "variant_input.json", VARIANT_INPUT, tensors),
        ensemble_json=write_bytes_input_data(folder / "ensemble_input.json", ENSEMBLE_INPUT, blobs),
        images=[str(it.path) for it in items],
        tensors=tensors,
        scheduler_json=write_tensor_input_data(folder / "scheduler_input.json", SCHEDULER_INPUT, tensors),
        blobs=blobs,
    )


# ------------------------------------------------------------------------------------------- bare runtime


@dataclass(frozen=True)
class BarePoint:
    """The variant's ONNX Runtime session in this process, no server: the serving lower bound.

    ``img_per_s`` = images / wall time of back-to-back calls at ``batch_size``; latencies per call, ms.
    """

    variant: str
    batch_size: int
    threads: int
    img_per_s: float
    p50_ms: float
    p99_ms: float
    calls: int
    duration_s: float


def serving_threads(repo: Path, variant: str, default: int = 2) -> int:
    """The variant model's ``intra_op_num_threads`` from its config.pbtxt (what the server runs with)."""
    cfg = repo / variant / "config.pbtxt"
    if cfg.is_file():
        m = re.search(
            r'key:\s*"intra_op_num_threads"\s*value\s*\{\s*string_value:\s*"(\d+)"', cfg.read_text()
        )
        if m and int(m.group(1)) > 0:
            return int(m.group(1))
    return default


def measure_bare(
    classifier,
    tensors: Sequence,
    batch_size: int,
    duration_s: float,
    variant: str = "",
    threads: int = 0,
    warmup_calls: int = 3,
) -> BarePoint:
    """Run ``classifier`` (an ``OrtClassifier``) back to back on batches cycled from ``tensors`` for
    ``duration_s`` seconds after ``warmup_calls`` calls.

    Raises:
        ValueError: ``batch_size`` < 1, ``duration_s`` <= 0 or no tensors.
    """
    import numpy as np

    if batch_size < 1 or duration_s <= 0 or not tensors:
        raise ValueError(f"need batch_size >= 1, duration_s > 0 and tensors (got {batch_size}, {duration_s})")
    n = len(tensors)
    batches = [
        np.ascontiguousarray(np.stack([tensors[(i * batch_size + j) % n] for j in range(batch_size)]))
        for i in range(n)
    ]
    for i in range(warmup_calls):
        classifier(batches[i % n])
    lat = []
    t_start = time.perf_counter()
    i = 0
    while True:
        t0 = time.perf_counter()
        classifier(batches[i % n])
        t1 = time.perf_counter()
        lat.append((t1 - t0) * 1e3)
        i += 1
        if t1 - t_start >= duration_s:
            break
    elapsed = time.perf_counter() - t_start
    return BarePoint(
        variant=variant,
        batch_size=batch_size,
        threads=threads,
        img_per_s=len(lat) * batch_size / elapsed,
        p50_ms=float(np.percentile(lat, 50)),
        p99_ms=float(np.percentile(lat, 99)),
        calls=len(lat),
        duration_s=elapsed,
    )


# ------------------------------------------------------------------------------------------------ config


@dataclass
class BenchConfig:
    """Options of one bench run. Times in ms unless named otherwise; rates in requests per second."""

    repo: Path = Path("model_repository")
    output: Path = Path("reports/bench")
    url: str | None = None  # gRPC host:port of a running server; None: start one on ``repo``
    data_dir: Path | None = None  # labeled/plain image folder; None: scikit-image's default photos
    n_images: int = 16
    variants: tuple[str, ...] | None = None  # default: every variant the manifest serves for speed here
    scheduler: bool = True  # also the ensemble with the scheduler's own choice
    concurrency: tuple[int, ...] = (1, 4, 8)
    request_rates: tuple[float, ...] | None = None  # absolute; None: rate_fractions of the slowest target
    rate_fractions: tuple[float, ...] = (0.5, 0.8)
    measurement_interval_ms: int = 2000
    stability_percentage: float = 15.0
    max_trials: int = 6
    bare: bool = True
    warmup: bool = True
    timeout_s: float = 240.0
    overhead_rounds: int = 200  # interleaved concurrency-1 overhead measurement (client/overhead.py); 0: skip

    def validate(self) -> None:
        """Raises ValueError on any bad option, before anything starts."""
        if not self.concurrency:
            raise ValueError("need at least one concurrency level")
        for c in self.concurrency:
            if isinstance(c, bool) or not isinstance(c, int) or c < 1:
                raise ValueError(f"concurrency levels must be integers >= 1, got {c!r}")
        for r in self.request_rates or ():
            if not (math.isfinite(r) and r > 0):
                raise ValueError(f"request rates must be finite numbers > 0 (req/s), got {r!r}")
        for f in self.rate_fractions:
            if not (0 < f <= 2):
                raise ValueError(f"rate fractions must be in (0, 2], got {f!r}")
        if self.n_images < 1:
            raise ValueError(f"n_images must be >= 1, got {self.n_images}")
        if self.measurement_interval_ms < 200:
            raise ValueError(f"measurement interval must be >= 200 ms, got {self.measurement_interval_ms}")
        if not (0 < self.stability_percentage <= 1000):
            raise ValueError(f"stability percentage must be in (0, 1000], got {self.stability_percentage}")
        if self.overhead_rounds != 0 and self.overhead_rounds < 2:
            raise ValueError(f"overhead_rounds must be 0 (skip) or >= 2, got {self.overhead_rounds}")
        if self.max_trials < 3:
            raise ValueError(f"max_trials must be >= 3, got {self.max_trials}")
        if self.data_dir is not None and not Path(self.data_dir).is_dir():
            raise ValueError(f"image folder {self.data_dir} does not exist")
        if not (Path(self.repo) / "manifest.json").is_file():
            raise ValueError(
                f"{self.repo} is not a tcsched model repository (no manifest.json): run `tcsched build` "
                "(the bench reads variant names and ONNX files from it, also with --url)"
            )
        if self.url is not None and not re.fullmatch(r"[^\s:/]+:\d{1,5}", self.url):
            raise ValueError(f"--url must be host:port of the server's gRPC endpoint, got {self.url!r}")


@dataclass
class BenchResult:
    """Everything one run measured: perf_analyzer points, bare points, the environment and the config."""

    config: dict
    environment: dict
    targets: list[Target]
    points: list[PerfPoint]
    bare: list[BarePoint]
    errors: list[str]
    wall_s: float
    overhead: list[OverheadResult] = field(default_factory=list)

    def point(self, target: str, mode: str, load: float) -> PerfPoint | None:
        for p in self.points:
            if p.target == target and p.mode == mode and abs(p.load - load) < 1e-9:
                return p
        return None

    def bare_point(self, variant: str, batch_size: int) -> BarePoint | None:
        return next((b for b in self.bare if b.variant == variant and b.batch_size == batch_size), None)

    def summary(self) -> dict:
        """The headline figures: per variant and concurrency, served img/s, p50/p99, bare img/s at the same
        batch (``min(c, max_batch_size)``), served/bare; ensemble-forced p50 / direct p50."""
        rows = []
        max_b = int(self.config.get("max_batch_size", 8))
        for t in self.targets:
            if t.kind != "variant":
                continue
            for c in self.config["concurrency"]:
                p = self.point(t.name, "concurrency", c)
                ens = self.point(f"{ENSEMBLE}[{t.name}]", "concurrency", c)
                sch = self.point(f"{SCHEDULER}[{t.name}]", "concurrency", c)
                pipe = self.point(pipeline_name(t.name), "concurrency", c)
                bare = self.bare_point(t.name, min(c, max_b))
                rows.append(
                    {
                        "variant": t.name,
                        "concurrency": c,
                        "served_img_per_s": p.throughput_infer_per_s if p else None,
                        "served_p50_ms": p.p50_ms if p else None,
                        "served_p99_ms": p.p99_ms if p else None,
                        "bare_batch": min(c, max_b),
                        "bare_img_per_s": bare.img_per_s if bare else None,
                        "served_over_bare": (
                            p.throughput_infer_per_s / bare.img_per_s
                            if p and bare and bare.img_per_s
                            else None
                        ),
                        "ensemble_img_per_s": ens.throughput_infer_per_s if ens else None,
                        "ensemble_p50_ms": ens.p50_ms if ens else None,
                        "ensemble_p99_ms": ens.p99_ms if ens else None,
                        "ensemble_p50_over_direct_p50": (
                            ens.p50_ms / p.p50_ms if ens and p and ens.p50_ms and p.p50_ms else None
                        ),
                        "pipeline_p50_ms": pipe.p50_ms if pipe else None,
                        # the scheduler's overhead on the same JPEG request: classifier[v] vs preprocess -> v
                        "ensemble_p50_over_pipeline_p50": (
                            ens.p50_ms / pipe.p50_ms if ens and pipe and ens.p50_ms and pipe.p50_ms else None
                        ),
                        "scheduler_p50_ms": sch.p50_ms if sch else None,
                        "scheduler_p50_over_direct_p50": (
                            sch.p50_ms / p.p50_ms if sch and p and sch.p50_ms and p.p50_ms else None
                        ),
                        "ensemble_over_bare": (
                            ens.throughput_infer_per_s / bare.img_per_s
                            if ens and bare and bare.img_per_s
                            else None
                        ),
                    }
                )
        return {"by_variant": rows}

    def as_dict(self) -> dict:
        return {
            "config": self.config,
            "environment": self.environment,
            "targets": [asdict(t) for t in self.targets],
            "summary": self.summary(),
            "points": [p.as_dict() for p in self.points],
            "bare": [asdict(b) for b in self.bare],
            "overhead": [asdict(o) for o in self.overhead],
            "errors": self.errors,
            "wall_s": self.wall_s,
        }


# ------------------------------------------------------------------------------------------- environment


def environment(server_url: str | None = None) -> dict:
    """CPU model, cores, load, and versions of tritonserver, perf_analyzer, onnxruntime, tcsched and friends."""
    import importlib.metadata as md

    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break

    def ver(dist: str) -> str | None:
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return None

    env = {
        "utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "cpu_model": cpu,
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "loadavg_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "tcsched": ver("tcsched"),
        "onnxruntime": ver("onnxruntime"),
        "tritonclient": ver("tritonclient"),
        "nvidia_pytriton": ver("nvidia-pytriton"),
        "numpy": ver("numpy"),
        "perf_analyzer": None,
        "tritonserver": None,
        "omp_num_threads_server": "1 (tcsched.server.TritonServer default)",
    }
    with contextlib.suppress(Exception):
        env["perf_analyzer"] = perf_analyzer_version()
    if server_url:
        with contextlib.suppress(Exception):
            import tritonclient.grpc as grpcclient

            c = grpcclient.InferenceServerClient(server_url)
            env["tritonserver"] = c.get_server_metadata(as_json=True).get("version")
            c.close()
    return env


# ------------------------------------------------------------------------------------------------- run


def _check_server(url: str, models: Sequence[str]) -> None:
    import tritonclient.grpc as grpcclient

    try:
        c = grpcclient.InferenceServerClient(url)
        ready = c.is_server_ready()
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"no Triton server answering gRPC at {url}: {e}") from None
    if not ready:
        raise ValueError(f"the Triton server at {url} is not ready")
    missing = [m for m in models if not c.is_model_ready(m)]
    c.close()
    if missing:
        raise ValueError(f"models not ready on the server at {url}: {', '.join(missing)}")


def plan(cfg: BenchConfig, variants: Sequence[str]) -> dict:
    """How many perf_analyzer points and bare measurements a config runs, and a rough duration (s)."""
    n_targets = len(bench_targets(variants, scheduler=cfg.scheduler, pipelines=cfg.url is None))
    n_rates = len(cfg.request_rates) if cfg.request_rates else len(cfg.rate_fractions)
    points = n_targets * (len(cfg.concurrency) + n_rates)
    bare = len(variants) * len(cfg.concurrency) if cfg.bare else 0
    per_point = (3 + 1) * cfg.measurement_interval_ms / 1000 + 1.0  # 3 windows, usually one more, startup
    est = points * per_point + bare * (3 * cfg.measurement_interval_ms / 1000 + 1) + n_targets * 3 + 25
    est += cfg.overhead_rounds * n_targets * 0.012  # one ~10 ms request per target per round
    return {"perf_analyzer_points": points, "bare_points": bare, "estimated_s": round(est)}


def write_pipelines(folder: Path, manifest, variants: Sequence[str]) -> Path:
    """Write a model repository holding one plain ensemble preprocess -> variant per variant (configs only; the
    models they call live in the main repository). Returns ``folder``, replaced if it existed."""
    if folder.exists():
        shutil.rmtree(folder)
    opts = ServingOptions(max_batch_size=manifest.max_batch_size)
    classes = manifest.output.shape[-1]
    for v in variants:
        cfg = pipeline_config(v, opts, classes, manifest.input.name, manifest.output.name)
        (folder / cfg.name / "1").mkdir(parents=True)
        (folder / cfg.name / "config.pbtxt").write_text(render(cfg))
    return folder


def _has_models(url: str, models: Sequence[str]) -> bool:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    try:
        return all(client.is_model_ready(m) for m in models)
    finally:
        client.close()


def run_bench(cfg: BenchConfig, log: Callable[[str], None] = print) -> BenchResult:
    """Run the benchmark (starting a server on ``cfg.repo`` unless ``cfg.url``) and return the results.

    Raises:
        ValueError: a bad option, an unknown variant, no server at ``cfg.url`` (before any measurement).
        FileNotFoundError / PerfAnalyzerError: perf_analyzer missing or not starting.
    """
    from tcsched.manifest import Manifest
    from tcsched.server import TritonServer

    t_start = time.monotonic()
    cfg.validate()
    manifest = Manifest.read(Path(cfg.repo) / "manifest.json")
    known = [v.name for v in manifest.variants]
    # default: the variants this machine serves for speed (an emulated precision, fp16 on a CPU, is never chosen
    # by the scheduler there; name it with --variants to measure it anyway)
    served = [v.name for v in manifest.variants if v.serve_on_cpu_for_speed or manifest.target == "gpu"]
    variants = list(cfg.variants) if cfg.variants else served
    unknown = [v for v in variants if v not in known]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; the repository {cfg.repo} has {known}")
    find_perf_analyzer()
    pa_version = perf_analyzer_version()  # fails early without libb64 / libcudart.so.12
    if cfg.url is not None:
        _check_server(cfg.url, [*variants, ENSEMBLE])
    items = pick_images(cfg.data_dir, cfg.n_images)
    # the plain pipelines are served beside the repository by the bench's own server; an external one
    # (--url) has them only if it was started with them
    pipelines = cfg.url is None or _has_models(cfg.url, [pipeline_name(v) for v in variants])
    if not pipelines:
        log("no pipeline_<variant> models on the server at --url: ensemble vs pipeline not measured")
    targets = bench_targets(variants, scheduler=cfg.scheduler, pipelines=pipelines)
    est = plan(cfg, variants)
    log(
        f"perf_analyzer {pa_version}: {est['perf_analyzer_points']} points over {len(targets)} targets, "
        f"{est['bare_points']} bare points, about {est['estimated_s']} s"
    )
    out = Path(cfg.output)
    raw = (out / "raw").resolve()
    raw.mkdir(parents=True, exist_ok=True)
    data = make_input_data(items, raw)
    log(f"input data: {len(items)} real images from {cfg.data_dir or 'scikit-image default photos'}")

    extra_args = []
    if cfg.url is None:
        overlay = write_pipelines(raw / "pipelines_repository", manifest, variants)
        extra_args = [f"--model-repository={overlay}"]
    server_ctx = (
        contextlib.nullcontext(None)
        if cfg.url
        else TritonServer(
            Path(cfg.repo),
            http_port=0,
            grpc_port=0,
            metrics_port=0,
            log_file=raw / "tritonserver.log",
            extra_args=extra_args,
        )
    )
    points: list[PerfPoint] = []
    bare: list[BarePoint] = []
    errors: list[str] = []
    with server_ctx as server:
        url = cfg.url or server.grpc_url
        env = environment(url)
        log(
            f"server {url} (tritonserver {env.get('tritonserver')}); {env['cpu_model']}, {env['cpu_count']} cores"
        )

        def measure(t: Target, **load) -> None:
            tag = ", ".join(f"{k}={v:g}" for k, v in load.items())
            try:
                p = run_perf_analyzer(
                    t.model,
                    url,
                    input_data=data.for_target(t),
                    request_parameters=t.request_parameters,
                    measurement_interval_ms=cfg.measurement_interval_ms,
                    stability_percentage=cfg.stability_percentage,
                    max_trials=cfg.max_trials,
                    stats_models=[ENSEMBLE, "preprocess", "scheduler", *known]
                    + ([pipeline_name(v) for v in variants] if pipelines else []),
                    work_dir=raw,
                    target=t.name,
                    timeout_s=cfg.timeout_s,
                    **load,
                )
            except PerfAnalyzerError as e:
                errors.append(f"{t.name} {tag}: {str(e)[-600:]}")
                log(f"  {t.name:34s} {tag:>18s}  FAILED (see errors)")
                return
            points.append(p)
            used = ""
            if t.kind == "ensemble" and t.variant is None:
                use = {k: v["inference_count"] for k, v in _usage(p, known).items() if v["inference_count"]}
                used = f"  served by {use}"
            log(
                f"  {t.name:34s} {tag:>18s}  {p.throughput_infer_per_s:7.1f} img/s  p50 {p.p50_ms:7.1f} ms"
                f"  p99 {p.p99_ms:7.1f} ms{'' if p.stable else f'  (stable only at {p.stability_percentage:g}%)'}"
                f"{used}"
            )

        if cfg.warmup:
            log("warm-up")
            c_max = max(cfg.concurrency)
            for t in targets:
                cmd = perf_analyzer_command(
                    t.model,
                    url,
                    input_data=data.for_target(t),
                    report_csv="warmup.csv",
                    concurrency=c_max,
                    request_parameters=t.request_parameters,
                    request_count=4 * c_max,
                )
                p = _run(cmd, cfg.timeout_s, cwd=raw)
                if p.returncode != 0:
                    raise PerfAnalyzerError(f"warm-up of {t.name} failed:\n{(p.stdout + p.stderr)[-3000:]}")
        overhead: list[OverheadResult] = []
        if cfg.overhead_rounds:
            log(
                f"overhead at concurrency 1: {cfg.overhead_rounds} rounds, targets interleaved in random order"
            )
            try:
                overhead = measure_overhead(
                    url, targets, data.tensors, data.blobs, rounds=cfg.overhead_rounds
                )
            except Exception as e:  # noqa: BLE001 - reported with the results, the sweep still runs
                errors.append(f"overhead: {type(e).__name__}: {str(e)[-600:]}")
            for o in overhead:
                log(
                    f"  {o.variant:34s} "
                    + "  ".join(f"{k} {e.ratio:.3f} [{e.low:.3f}, {e.high:.3f}]" for k, e in o.ratios.items())
                )
        sessions = {}
        if cfg.bare:
            from tcsched.ort_runtime import OrtClassifier

            for v in variants:
                entry = manifest.variant(v)
                path = Path(cfg.repo) / entry.file
                if entry.runtime == "onnxruntime" and path.suffix == ".onnx" and path.is_file():
                    th = serving_threads(Path(cfg.repo), v)
                    sessions[v] = (OrtClassifier(path, threads=th), th)
                else:
                    log(f"  no bare measurement for {v} ({entry.runtime}, {entry.file})")
        max_b = manifest.max_batch_size
        log("concurrency sweep (each level: bare sessions, then every target in turn)")
        for c in cfg.concurrency:
            for v, (clf, th) in sessions.items():
                b = min(c, max_b)
                bp = measure_bare(clf, data.tensors, b, 3 * cfg.measurement_interval_ms / 1000, v, th)
                bare.append(bp)
                log(
                    f"  {'bare ' + v:34s} {f'batch={b}':>18s}  {bp.img_per_s:7.1f} img/s  "
                    f"p50 {bp.p50_ms:7.1f} ms  p99 {bp.p99_ms:7.1f} ms"
                )
            for t in targets:
                measure(t, concurrency=c)
        sessions.clear()
        rates = list(cfg.request_rates or ())
        if not rates and cfg.rate_fractions:
            best = {}
            for p in points:
                best[p.target] = max(best.get(p.target, 0.0), p.throughput_infer_per_s)
            if best and len(best) == len(targets):
                slowest = min(best.values())
                rates = [round(f * slowest, 1) for f in cfg.rate_fractions]
                log(
                    f"request rates {rates} req/s = {list(cfg.rate_fractions)} x slowest target ({slowest:.1f} img/s)"
                )
            else:
                errors.append("no request-rate sweep: some concurrency points failed")
        if rates:
            log("request-rate sweep (each rate: every target in turn)")
        for r in rates:
            for t in targets:
                measure(t, request_rate=r)
        env["loadavg_1_5_15_after"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    conf = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
    conf.update(
        variants=variants,
        request_rates_used=rates,
        max_batch_size=max_b,
        images=data.images,
        protocol="grpc",
        request_distribution="constant",
    )
    return BenchResult(conf, env, targets, points, bare, errors, time.monotonic() - t_start, overhead)


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


__all__ = [
    "BarePoint",
    "BenchConfig",
    "BenchResult",
    "InputData",
    "Target",
    "bench_command",
    "bench_targets",
    "make_input_data",
    "measure_bare",
    "pick_images",
    "ramp_targets",
    "run_bench",
    "server_statistics",
    "variant_usage_delta",
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
    bare: bool = typer.Option(True, help="measure each variant's bare ONNX Runtime session"),
    warmup: bool = typer.Option(True, help="warm every target up before measuring"),
    overhead_rounds: int = typer.Option(
        200, help="rounds of the interleaved concurrency-1 overhead measurement (0: skip)"
    ),
):
    """perf_analyzer sweeps (concurrency, request rate) of every variant and the ensemble, bare ONNX Runtime
    as the lower bound; writes JSON, CSV, markdown and PNG plots to OUTPUT."""
    from rich.console import Console

    from tcsched.client.bench_report import write_report

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
