"""``tcsched ramp``: the scheduler under load vs every static variant, side by side.

A load ramp (perf_analyzer concurrency levels, or open-loop request rates) on the repository's ensemble
(``manifest.ensemble``) with real images. At every level each target runs once per round (``rounds``, each round in a fresh random order,
pooled): the ensemble with ``latency_budget_ms`` (and ``min_agreement``) set, where the scheduler chooses, and the
ensemble forced to each static variant.
Per point: p50/p99 (perf_analyzer), the share of requests within the budget (per-request latencies from
``--profile-export-file``), the share of rows a cascade escalated, and the served agreement with fp32, measured:
before the ramp every image is classified once by each variant (:func:`probe_images`), so each response's
``VARIANT`` and ``DECISION`` (its confidence margin identifies the image) say whether its top-1 is fp32's. A
response without a margin (a single-variant plan) counts with its variant's agreement over the ramp's images.
Output: ``ramp.json``, ``ramp.md`` and ``ramp.png`` (within-budget share, p99, escalations and agreement).
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from tcsched.client.agreement import Probe, measured_agreement, probe_images, served_accuracy
from tcsched.manifest import Manifest
from tcsched.names import DECISION, VARIANT

__all__ = ["Probe", "RampPoint", "pool_runs", "probe_images", "run_ramp", "served_accuracy"]


@dataclass
class RampPoint:
    target: str
    concurrency: float  # the load level: requests in flight, or req/s in request-rate mode
    throughput_img_s: float
    p50_ms: float | None
    p99_ms: float | None
    within_budget: float | None
    n_requests: int
    served_by: dict[str, int]
    served_agreement: float | None
    served_top1: float | None
    stable: bool
    escalated: float | None = None  # share of rows a cascade re-ran on a later stage
    unidentified: int = (
        0  # cascade rows whose margin matched no probed image (counted at their variant's mean)
    )


def pool_runs(
    target: str,
    level: float,
    runs: Sequence,
    manifest: Manifest,
    budget_ms: float,
    probe: Probe | None = None,
) -> RampPoint:
    """One :class:`RampPoint` from several perf_analyzer runs (``PerfPoint`` with a profile) of the same target
    and level: latencies, requests and variant counts pooled, throughput averaged, stable only if all were.
    With a ``probe`` the served agreement is measured per response (:func:`measured_agreement`), else taken
    from the manifest's figures of the variants that answered."""
    import numpy as np

    from tcsched.client.perf_analyzer import within_budget_share

    lat: list[float] = []
    counts: dict[str, int] = {}
    records = []
    for p in runs:
        if p.profile is not None:
            lat += p.profile.latencies_ms()
            records += p.profile.measured()
            for v, n in p.profile.output_counts(VARIANT).items():
                counts[v] = counts.get(v, 0) + n
    agree, top1 = served_accuracy(manifest, counts)
    escalated, unknown = None, 0
    if probe is not None:
        agree, escalated, unknown = measured_agreement(records, probe, manifest)
    return RampPoint(
        target,
        level,
        float(np.mean([p.throughput_infer_per_s for p in runs])),
        float(np.percentile(lat, 50)) if lat else None,
        float(np.percentile(lat, 99)) if lat else None,
        within_budget_share(lat, budget_ms) if lat else None,
        sum(counts.values()),
        counts,
        agree,
        top1,
        all(p.stable for p in runs),
        escalated,
        unknown,
    )


def pending_requests(metrics_text: str) -> float:
    """Requests queued in the server, summed over every model: Triton's ``nv_inference_pending_request_count``
    gauge (Prometheus text exposition, docs/user_guide/metrics.md)."""
    from tcsched.prometheus import sum_metric

    return sum_metric(metrics_text, "nv_inference_pending_request_count", None)


def wait_idle(metrics_url: str, timeout_s: float = 60.0, poll_s: float = 0.2) -> float:
    """Block until the server has no pending request (an overloaded open-loop run leaves a backlog that would
    otherwise be served during the next target's measurement), at most ``timeout_s``; returns the seconds
    waited. An unreachable metrics endpoint returns at once (nothing to wait on)."""
    import urllib.request

    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout_s:
        try:
            with urllib.request.urlopen(metrics_url, timeout=2.0) as r:
                if pending_requests(r.read().decode()) == 0:
                    break
        except OSError:
            break
        time.sleep(poll_s)
    return time.perf_counter() - t0


def run_ramp(
    repo: Path,
    output: Path,
    latency_budget_ms: float,
    concurrency: Sequence[int] = (1, 2, 4, 8, 12, 16),
    request_rates: Sequence[float] | None = None,
    variants: Sequence[str] | None = None,
    data_dir: Path | None = None,
    n_images: int = 32,
    measurement_interval_ms: int = 2000,
    url: str | None = None,
    log=print,
    rounds: int = 2,
    seed: int = 0,
    metrics_url: str | None = None,
    min_agreement: float | None = None,
) -> list[RampPoint]:
    """Run the ramp and write the report; returns every point.

    Each level runs ``rounds`` rounds; every round runs each target once, in a fresh random order, and a
    target's point pools its rounds (requests, latencies, variants served; throughput is the mean). On a shared
    2-core machine the throughput drifts by ~20% within minutes: one run per target in a fixed order put that
    drift, and the transient after each level change (always on the first target), on particular targets.
    Before each run the server's queues must be empty (:func:`wait_idle` on ``metrics_url``, the started
    server's own when ``url`` is not given): an overloaded run's backlog is not served during the next one.

    Raises:
        ValueError: bad budget or concurrency, unknown variant, no manifest (before any load is sent).
    """
    from tcsched.client.bench import make_input_data, pick_images, ramp_targets
    from tcsched.server import TritonServer

    _validate(latency_budget_ms, concurrency, request_rates, rounds)
    mode = "request_rate" if request_rates is not None else "concurrency"
    levels = list(request_rates) if request_rates is not None else list(concurrency)
    manifest = Manifest.read(Path(repo) / "manifest.json")
    names = list(variants) if variants else [v.name for v in manifest.variants if v.serve_on_cpu_for_speed]
    for v in names:
        manifest.variant(v)  # KeyError names the known ones
    output.mkdir(parents=True, exist_ok=True)
    items = pick_images(data_dir, n_images)
    data = make_input_data(items, output / "raw", manifest.preprocess_spec)
    extra = {} if min_agreement is None else {"min_agreement": float(min_agreement)}
    targets = ramp_targets(names, latency_budget_ms, manifest.ensemble, **extra)
    points: list[RampPoint] = []
    ctx = (
        contextlib.nullcontext(None) if url else TritonServer(repo, http_port=0, grpc_port=0, metrics_port=0)
    )
    t0 = time.perf_counter()
    with ctx as server:
        grpc_url = url or server.grpc_url
        metrics_url = metrics_url or (server.metrics_url if server is not None else None)
        probe = probe_images(grpc_url, [it.read_bytes() for it in items], manifest)
        _warm_up(targets, grpc_url, data.ensemble_json)
        rng = random.Random(seed)
        t_levels = time.perf_counter()
        for k, c in enumerate(levels, 1):
            runs = _run_level(
                targets,
                c,
                mode,
                rounds,
                rng,
                grpc_url,
                data.ensemble_json,
                metrics_url,
                measurement_interval_ms,
            )
            for t in targets:
                point = pool_runs(t.name, c, runs[t.name], manifest, latency_budget_ms, probe)
                points.append(point)
                log(_point_line(point, mode, latency_budget_ms))
            eta = (time.perf_counter() - t_levels) / k * (len(levels) - k)  # the mean level so far
            log(f"level {k}/{len(levels)} done, ETA {int(eta // 60)}:{int(eta % 60):02d}")
    write_ramp_report(
        points, manifest, latency_budget_ms, output, time.perf_counter() - t0, mode, min_agreement
    )
    return points


def _warm_up(targets, grpc_url: str, input_data) -> None:
    """One short run per target, so that every path is loaded and its sessions initialised."""
    from tcsched.client.perf_analyzer import run_perf_analyzer

    for t in targets:
        run_perf_analyzer(
            t.model,
            grpc_url,
            input_data=input_data,
            concurrency=1,
            request_parameters=t.request_parameters,
            measurement_interval_ms=500,
            max_trials=3,
            stability_percentage=100,
        )


def _validate(latency_budget_ms: float, concurrency, request_rates, rounds: int) -> None:
    if not (math.isfinite(latency_budget_ms) and latency_budget_ms > 0):
        raise ValueError(f"latency_budget_ms must be > 0, got {latency_budget_ms}")
    if request_rates is not None:
        if not request_rates or min(request_rates) <= 0:
            raise ValueError(f"request rates must be > 0 req/s, got {list(request_rates)}")
    elif not concurrency or min(concurrency) < 1:
        raise ValueError(f"concurrency levels must be >= 1, got {list(concurrency)}")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")


def _run_level(
    targets,
    level: float,
    mode: str,
    rounds: int,
    rng: random.Random,
    grpc_url: str,
    input_data,
    metrics_url: str | None,
    measurement_interval_ms: int,
) -> dict[str, list]:
    """Every target at one load level, ``rounds`` times, each round in a fresh random order, each run on empty
    server queues; returns the runs (``PerfPoint`` with a profile) by target name."""
    from tcsched.client.perf_analyzer import run_perf_analyzer

    runs: dict[str, list] = {t.name: [] for t in targets}
    load = {"request_rate": float(level)} if mode == "request_rate" else {"concurrency": int(level)}
    for _ in range(rounds):
        order = list(targets)
        rng.shuffle(order)
        for t in order:
            if metrics_url:
                wait_idle(metrics_url)
            runs[t.name].append(
                run_perf_analyzer(
                    t.model,
                    grpc_url,
                    input_data=input_data,
                    **load,
                    request_parameters=t.request_parameters,
                    measurement_interval_ms=measurement_interval_ms,
                    stability_percentage=25.0,
                    max_trials=5,
                    profile_export=True,
                    string_outputs=(VARIANT, DECISION),
                    target=t.name,
                )
            )
    return runs


def _point_line(point: RampPoint, mode: str, budget_ms: float) -> str:
    pct = lambda x: "-" if x is None else f"{x:.1%}"  # noqa: E731
    return (
        f"{'rate' if mode == 'request_rate' else 'c'}={point.concurrency:<4g} {point.target:<42} "
        f"{point.throughput_img_s:7.1f} img/s  p99 {point.p99_ms or 0:7.1f} ms  within {budget_ms:g} ms: "
        f"{pct(point.within_budget)}  agreement {pct(point.served_agreement)}  escalated {pct(point.escalated)}  "
        f"served {point.served_by}"
    )


def write_ramp_report(
    points: list[RampPoint],
    manifest: Manifest,
    budget_ms: float,
    output: Path,
    wall_s: float,
    mode: str = "concurrency",
    min_agreement: float | None = None,
) -> None:
    (output / "ramp.json").write_text(
        json.dumps(
            {
                "latency_budget_ms": budget_ms,
                "min_agreement": min_agreement,
                "mode": mode,
                "wall_s": wall_s,
                "points": [asdict(p) for p in points],
            },
            indent=2,
        )
    )
    level = "request rate (req/s)" if mode == "request_rate" else "concurrency"
    lines = [
        f"# Load ramp: scheduler with latency_budget_ms={budget_ms:g}"
        + ("" if min_agreement is None else f", min_agreement={min_agreement:g}")
        + " vs static variants",
        "",
        f"{'Open loop (perf_analyzer --request-rate --async, constant arrivals; each run starts on empty server queues)' if mode == 'request_rate' else 'Closed loop (perf_analyzer concurrency)'}, "
        f"gRPC, real images, ensemble `{manifest.ensemble}`; {wall_s:.0f} s in all. "
        "Served agreement: measured per response (each image classified by every variant before the ramp; a "
        "cascade's DECISION margin identifies the image). Escalated: share of a cascade's rows re-run on fp32.",
        "",
        f"| {level} | target | img/s | p50 ms | p99 ms | within budget | served agreement | escalated | served by |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    fmt = lambda x, f: "-" if x is None else f.format(x)  # noqa: E731
    for p in points:
        lines.append(
            f"| {p.concurrency} | {p.target} | {p.throughput_img_s:.1f} | {fmt(p.p50_ms, '{:.1f}')} | "
            f"{fmt(p.p99_ms, '{:.1f}')} | {fmt(p.within_budget, '{:.1%}')} | {fmt(p.served_agreement, '{:.1%}')} | "
            f"{fmt(p.escalated, '{:.1%}')} | {', '.join(f'{k}: {v}' for k, v in p.served_by.items())} |"
        )
    (output / "ramp.md").write_text("\n".join(lines) + "\n")
    plot_ramp(points, budget_ms, output / "ramp.png", level)


def plot_ramp(points: list[RampPoint], budget_ms: float, path: Path, level: str = "concurrency") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ((a, b), (c, d)) = plt.subplots(2, 2, figsize=(12, 8.5))
    for target in dict.fromkeys(p.target for p in points):
        pts = [p for p in points if p.target == target]
        xs = [p.concurrency for p in pts]  # the load level: concurrency or request rate
        style = {"lw": 2.5, "color": "black"} if "budget" in target else {"ls": "--"}
        a.plot(xs, [100 * (p.within_budget or 0) for p in pts], marker="o", label=target, **style)
        b.plot(xs, [p.p99_ms or float("nan") for p in pts], marker="o", label=target, **style)
        c.plot(
            xs,
            [100 * p.served_agreement if p.served_agreement is not None else float("nan") for p in pts],
            marker="o",
            label=target,
            **style,
        )
        if any(p.escalated is not None for p in pts):
            d.plot(
                xs,
                [100 * p.escalated if p.escalated is not None else float("nan") for p in pts],
                marker="o",
                label=target,
                **style,
            )
    c.set(xlabel=level, ylabel="served top-1 agreement with fp32, %")
    c.axhline(99, color="grey", lw=0.8, ls=":")
    d.set(xlabel=level, ylabel="rows escalated by the cascade, %", ylim=(0, None))
    c.legend(fontsize=8)
    a.axhline(95, color="grey", lw=0.8, ls=":")
    a.set(
        xlabel=level,
        ylabel=f"% of requests within {budget_ms:g} ms",
        ylim=(0, 105),
    )
    b.axhline(budget_ms, color="red", lw=0.8, ls=":", label=f"budget {budget_ms:g} ms")
    b.set(xlabel=level, ylabel="p99 latency, ms", yscale="log")
    a.legend(fontsize=8)
    b.legend(fontsize=8)
    fig.suptitle("tcsched scheduler vs static variants under a load ramp")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def ramp_command(
    repo: Path = Path("model_repository"),
    output: Path = Path("reports/ramp"),
    latency_budget_ms: float = 50.0,
    concurrency: str = "1,2,4,8,12,16",
    request_rates: str = None,
    variants: str = None,
    data_dir: Path = None,
    measurement_interval_ms: int = 2000,
    url: str = None,
    rounds: int = 2,
    min_agreement: float = None,
):
    """Load ramp: the scheduler with a latency budget vs each static variant (p99, share within budget, served
    accuracy); --request-rates gives an open-loop sweep instead of concurrency; writes ramp.json, ramp.md,
    ramp.png to OUTPUT."""
    import typer

    try:
        levels = tuple(int(x) for x in concurrency.split(","))
        rates = tuple(float(x) for x in request_rates.split(",")) if request_rates else None
    except ValueError:
        raise typer.BadParameter(
            "--concurrency takes integers, --request-rates numbers, comma-separated"
        ) from None
    try:
        run_ramp(
            repo,
            output,
            latency_budget_ms,
            concurrency=levels,
            request_rates=rates,
            variants=tuple(v.strip() for v in variants.split(",")) if variants else None,
            data_dir=data_dir,
            measurement_interval_ms=measurement_interval_ms,
            url=url,
            rounds=rounds,
            min_agreement=min_agreement,
        )
    except (ValueError, KeyError) as e:
        raise typer.BadParameter(str(e)) from None
