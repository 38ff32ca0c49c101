"""The bench's options (:class:`BenchConfig`) and results (:class:`BenchResult`, with its headline summary)."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from tcsched.client.bare import BarePoint
from tcsched.client.overhead import OverheadResult, ratio_of_medians
from tcsched.client.perf_analyzer import PerfPoint
from tcsched.client.pipelines import pipeline_name
from tcsched.client.targets import ENSEMBLE, PATH_ROLES, SCHEDULER, Target


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
    # interleaved rounds of every variant called directly at the highest concurrency (the pairs' img/s ratios
    # side by side); 0: skip
    pair_rounds: int = 4
    # interleaved rounds of today's path, the ensemble as built and the ensemble forced to the fastest pair at
    # the highest concurrency, JPEG in (the paths' img/s ratios side by side); 0: skip
    path_rounds: int = 4

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
        if self.pair_rounds != 0 and self.pair_rounds < 2:
            raise ValueError(f"pair_rounds must be 0 (skip) or >= 2, got {self.pair_rounds}")
        if self.path_rounds < 0:
            raise ValueError(f"path_rounds must be >= 0 (0: skip), got {self.path_rounds}")
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
    # the interleaved direct rounds (``pair_rounds``): one point per variant per round, in measuring order
    pair_points: list[PerfPoint] = field(default_factory=list)
    # the path rounds (``path_rounds``): their targets in PATH_ROLES order (the first is the baseline) and one
    # point per target per round, named ``<target>#path<round>``
    path_targets: list[Target] = field(default_factory=list)
    path_points: list[PerfPoint] = field(default_factory=list)

    def point(self, target: str, mode: str, load: float) -> PerfPoint | None:
        for p in self.points:
            if p.target == target and p.mode == mode and abs(p.load - load) < 1e-9:
                return p
        return None

    @property
    def ensemble(self) -> str:
        """The served ensemble's name (the repository manifest's ``ensemble``; results written before it was
        recorded: ``classifier``, :data:`tcsched.names.ENSEMBLE`)."""
        return str(self.config.get("ensemble") or ENSEMBLE)

    def bare_point(self, variant: str, batch_size: int) -> BarePoint | None:
        return next((b for b in self.bare if b.variant == variant and b.batch_size == batch_size), None)

    def summary(self) -> dict:
        """The headline figures: per variant and concurrency, served img/s, p50/p99, bare img/s at the same
        batch (``min(c, max_batch_size)``), served/bare; ensemble-forced p50 / direct p50; each variant's
        (runtime, precision) pair and its served img/s / the ONNX Runtime int8 variant's at the same concurrency."""
        rows = []
        max_b = int(self.config.get("max_batch_size", 8))
        pairs = self.config.get("pairs") or {}
        ort_int8 = self.ort_int8_variant()
        for t in self.targets:
            if t.kind != "variant":
                continue
            for c in self.config["concurrency"]:
                p = self.point(t.name, "concurrency", c)
                ens = self.point(f"{self.ensemble}[{t.name}]", "concurrency", c)
                sch = self.point(f"{SCHEDULER}[{t.name}]", "concurrency", c)
                pipe = self.point(pipeline_name(t.name), "concurrency", c)
                bare = self.bare_point(t.name, min(c, max_b))
                base = self.point(ort_int8, "concurrency", c) if ort_int8 else None
                runtime, precision = pairs.get(t.name, [None, None])
                rows.append(
                    {
                        "variant": t.name,
                        "runtime": runtime,
                        "precision": precision,
                        "concurrency": c,
                        "served_over_ort_int8": (
                            p.throughput_infer_per_s / base.throughput_infer_per_s
                            if p and base and base.throughput_infer_per_s
                            else None
                        ),
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

    def ort_int8_variant(self) -> str | None:
        """The ONNX Runtime int8 variant: the baseline of the served-pair ratios."""
        pairs = self.config.get("pairs") or {}
        return next((v for v, rp in pairs.items() if list(rp) == ["onnxruntime", "int8"]), None)

    def pair_summary(self) -> list[dict]:
        """Per variant, from the interleaved direct rounds (``pair_points``): img/s per round and their median,
        the median ratio to the ONNX Runtime int8 variant with a paired bootstrap 95% interval over rounds
        (:func:`tcsched.client.overhead.ratio_of_medians`), p50/p99 ms (medians over rounds), and from Triton's
        statistics the average batch the dynamic batcher formed and the per-request queue, compute input,
        compute infer (the whole batch's execution) and compute output ms (medians over rounds)."""
        by: dict[str, list[PerfPoint]] = {}
        for p in self.pair_points:
            by.setdefault(p.model, []).append(p)
        base = by.get(self.ort_int8_variant() or "", [])
        pairs = self.config.get("pairs") or {}
        med = lambda xs: float(np.median(xs)) if xs else None  # noqa: E731
        rows = []
        for v, pts in by.items():
            st = [p.server_stats[v] for p in pts if v in p.server_stats]
            ips = [p.throughput_infer_per_s for p in pts]
            ratio = None
            n = min(len(pts), len(base))
            if base and n >= 2:
                ratio = ratio_of_medians(ips[:n], [b.throughput_infer_per_s for b in base[:n]])
            runtime, precision = pairs.get(v, [None, None])
            rows.append(
                {
                    "variant": v,
                    "runtime": runtime,
                    "precision": precision,
                    "concurrency": pts[0].load,
                    "rounds": len(pts),
                    "img_per_s": ips,
                    "median_img_per_s": med(ips),
                    "over_ort_int8": asdict(ratio) if ratio else None,
                    "p50_ms": med([p.p50_ms for p in pts if p.p50_ms is not None]),
                    "p99_ms": med([p.p99_ms for p in pts if p.p99_ms is not None]),
                    "avg_batch": med([s.avg_batch_size for s in st if s.avg_batch_size]),
                    "queue_ms": med([s.avg_queue_ms for s in st if s.avg_queue_ms is not None]),
                    "compute_input_ms": med(
                        [s.avg_compute_input_ms for s in st if s.avg_compute_input_ms is not None]
                    ),
                    "compute_infer_ms": med(
                        [s.avg_compute_infer_ms for s in st if s.avg_compute_infer_ms is not None]
                    ),
                    "compute_output_ms": med(
                        [s.avg_compute_output_ms for s in st if s.avg_compute_output_ms is not None]
                    ),
                }
            )
        return rows

    def path_summary(self) -> list[dict]:
        """Per path target (:data:`~tcsched.client.targets.PATH_ROLES` order), from the path rounds: img/s per
        round and their median, the median ratio to today's path (the first target) with a paired bootstrap 95%
        interval over the rounds both measured (:func:`tcsched.client.overhead.ratio_of_medians`; one round: the
        ratio without interval), p50/p99 ms (medians over rounds) and the images each variant served."""
        by_round: dict[str, dict[int, PerfPoint]] = {t.name: {} for t in self.path_targets}
        for p in self.path_points:
            name, _, r = p.target.rpartition("#path")
            if name in by_round and r.isdigit():
                by_round[name][int(r)] = p
        base = by_round.get(self.path_targets[0].name, {}) if self.path_targets else {}
        known = set(self.config.get("repository_variants") or self.config.get("variants") or [])
        med = lambda xs: float(np.median(xs)) if xs else None  # noqa: E731
        rows = []
        for role, t in zip(PATH_ROLES, self.path_targets, strict=False):
            pts = by_round[t.name]
            ips = [pts[r].throughput_infer_per_s for r in sorted(pts)]
            paired = [r for r in sorted(pts) if r in base]
            num = [pts[r].throughput_infer_per_s for r in paired]
            den = [base[r].throughput_infer_per_s for r in paired]
            ratio = None
            if len(paired) >= 2:
                ratio = asdict(ratio_of_medians(num, den))
            elif paired and den[0]:
                ratio = {"ratio": num[0] / den[0], "low": None, "high": None}
            served: dict[str, int] = {}
            for p in pts.values():
                for m, st in p.server_stats.items():
                    if m in known and st.inference_count:
                        served[m] = served.get(m, 0) + st.inference_count
            rows.append(
                {
                    "path": role,
                    "target": t.name,
                    "model": t.model,
                    "request_parameters": dict(t.request_parameters),
                    "concurrency": next(iter(pts.values())).load if pts else None,
                    "rounds": len(pts),
                    "img_per_s": ips,
                    "median_img_per_s": med(ips),
                    "over_today": ratio,
                    "p50_ms": med([p.p50_ms for p in pts.values() if p.p50_ms is not None]),
                    "p99_ms": med([p.p99_ms for p in pts.values() if p.p99_ms is not None]),
                    "served": served,
                }
            )
        return rows

    def as_dict(self) -> dict:
        return {
            "config": self.config,
            "environment": self.environment,
            "targets": [asdict(t) for t in self.targets],
            "summary": self.summary(),
            "points": [p.as_dict() for p in self.points],
            "bare": [asdict(b) for b in self.bare],
            "overhead": [asdict(o) for o in self.overhead],
            "pairs": self.pair_summary(),
            "pair_points": [p.as_dict() for p in self.pair_points],
            "path_targets": [asdict(t) for t in self.path_targets],
            "paths": self.path_summary(),
            "path_points": [p.as_dict() for p in self.path_points],
            "errors": self.errors,
            "wall_s": self.wall_s,
        }
