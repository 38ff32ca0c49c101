"""The perf_analyzer command line: one load level (:class:`LoadSpec`) of one model, batch 1, time windows, a
verbose CSV report; and running such a command (:func:`run_command`, :func:`warm_up`).

Request parameters (``--request-parameter``) only work over gRPC in 2.51, so gRPC is the default protocol.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from tcsched.client.perf_analyzer.binary import PerfAnalyzerError, find_perf_analyzer, perf_analyzer_env
from tcsched.client.perf_analyzer.stats import Protocol

Distribution = Literal["constant", "poisson"]


@dataclass(frozen=True)
class LoadSpec:
    """One load level and how perf_analyzer measures it.

    Exactly one of ``concurrency`` (outstanding requests, closed loop) and ``request_rate`` (requests per second,
    open loop with ``request_distribution`` arrivals and ``--async``). perf_analyzer reports the last 3 windows of
    ``measurement_interval_ms`` once their throughput and average latency agree within
    ``stability_percentage`` %, trying at most ``max_trials`` windows; ``request_count`` (optional) ends the run
    after that many requests instead.
    """

    concurrency: int | None = None
    request_rate: float | None = None
    request_distribution: Distribution = "constant"
    measurement_interval_ms: int = 3000
    stability_percentage: float = 10.0
    max_trials: int = 10
    request_count: int | None = None

    def validate(self) -> None:
        """Raises ValueError naming the bad field and what is expected."""
        c, r = self.concurrency, self.request_rate
        if (c is None) == (r is None):
            raise ValueError("give exactly one of concurrency (>= 1) or request_rate (req/s > 0)")
        if c is not None and (isinstance(c, bool) or int(c) != c or c < 1):
            raise ValueError(f"concurrency must be an integer >= 1, got {c!r}")
        if r is not None and not (math.isfinite(r) and r > 0):
            raise ValueError(f"request_rate must be a finite number > 0 (req/s), got {r!r}")
        if self.measurement_interval_ms < 100:
            raise ValueError(f"measurement_interval_ms must be >= 100, got {self.measurement_interval_ms}")
        if not (0 < self.stability_percentage <= 1000):
            raise ValueError(f"stability_percentage must be in (0, 1000], got {self.stability_percentage}")
        if self.max_trials < 3:
            raise ValueError(
                f"max_trials must be >= 3 (perf_analyzer compares 3 windows), got {self.max_trials}"
            )

    @property
    def tag(self) -> str:
        """``c<concurrency>`` or ``r<rate>``: names the level in file names and messages."""
        return f"c{self.concurrency}" if self.concurrency is not None else f"r{self.request_rate:g}"

    def relaxed(self, factor: float) -> LoadSpec:
        """The same level with the stability threshold multiplied by ``factor``."""
        return replace(self, stability_percentage=self.stability_percentage * factor)

    def args(self) -> list[str]:
        """The load-level arguments of the command line."""
        if self.concurrency is not None:
            out = ["--concurrency-range", str(int(self.concurrency))]
        else:
            # open loop: --async so that requests leave on schedule even when the server falls behind (in sync mode
            # each of perf_analyzer's threads waits for its response, the schedule slips on the client, and the
            # server's backlog never shows in the latencies: a closed loop in disguise)
            out = [
                "--request-rate-range",
                f"{self.request_rate:g}",
                "--request-distribution",
                self.request_distribution,
                "--async",
            ]
        if self.request_count is not None:
            out += ["--request-count", str(int(self.request_count))]
        return out


def _param_arg(name: str, value: object) -> str:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.\-]*", name):
        raise ValueError(f"request parameter name {name!r} must be an identifier")
    if isinstance(value, bool):
        return f"{name}:{str(value).lower()}:bool"
    if isinstance(value, int):
        return f"{name}:{value}:int"
    if isinstance(value, float):  # 2.51 sends bool/int/string; the scheduler parses numbers from strings
        if not math.isfinite(value):
            raise ValueError(f"request parameter {name!r} must be finite, got {value}")
        return f"{name}:{value!r}:string"
    if isinstance(value, str):
        if not value or ":" in value:
            raise ValueError(f"request parameter {name!r}: string value must be non-empty without ':'")
        return f"{name}:{value}:string"
    raise ValueError(f"request parameter {name!r} has unsupported type {type(value).__name__}")


def build_command(
    model: str,
    url: str,
    load: LoadSpec,
    *,
    input_data: str | os.PathLike,
    report_csv: str | os.PathLike,
    request_parameters: Mapping[str, object] | None = None,
    protocol: Protocol = "grpc",
    profile_export_file: str | os.PathLike | None = None,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """The perf_analyzer command line for one load level, batch 1, time windows, verbose CSV report.

    Raises:
        ValueError: an empty model name, a bad ``load`` (:meth:`LoadSpec.validate`), an unknown protocol, or
            request parameters over HTTP (perf_analyzer 2.51 sends them only over gRPC).
    """
    if not model or not isinstance(model, str):
        raise ValueError(f"model must be a non-empty name, got {model!r}")
    load.validate()
    if protocol not in ("grpc", "http"):
        raise ValueError(f"protocol must be 'grpc' or 'http', got {protocol!r}")
    params = dict(request_parameters or {})
    if params and protocol != "grpc":
        raise ValueError("perf_analyzer 2.51 sends --request-parameter only over gRPC: use protocol='grpc'")
    cmd = [str(find_perf_analyzer()), "-m", model, "-i", protocol, "-u", url, "-b", "1"]
    cmd += ["--input-data", str(Path(input_data).resolve()), "--measurement-mode", "time_windows"]
    cmd += ["-p", str(int(load.measurement_interval_ms)), "-s", f"{load.stability_percentage:g}"]
    cmd += ["-r", str(int(load.max_trials)), "-f", str(report_csv), "--verbose-csv"]
    cmd += load.args()
    for k, v in params.items():
        cmd += ["--request-parameter", _param_arg(k, v)]
    if profile_export_file is not None:
        cmd += ["--profile-export-file", str(Path(profile_export_file).resolve())]
    return cmd + list(extra_args)


def perf_analyzer_command(
    model: str,
    url: str,
    *,
    input_data: str | os.PathLike,
    report_csv: str | os.PathLike,
    concurrency: int | None = None,
    request_rate: float | None = None,
    request_parameters: Mapping[str, object] | None = None,
    measurement_interval_ms: int = LoadSpec.measurement_interval_ms,
    stability_percentage: float = LoadSpec.stability_percentage,
    max_trials: int = LoadSpec.max_trials,
    protocol: Protocol = "grpc",
    request_distribution: Distribution = LoadSpec.request_distribution,
    profile_export_file: str | os.PathLike | None = None,
    request_count: int | None = None,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """:func:`build_command` with the load level given field by field (see :class:`LoadSpec`).

    Raises:
        ValueError: as :func:`build_command`.
    """
    load = LoadSpec(
        concurrency=concurrency,
        request_rate=request_rate,
        request_distribution=request_distribution,
        measurement_interval_ms=measurement_interval_ms,
        stability_percentage=stability_percentage,
        max_trials=max_trials,
        request_count=request_count,
    )
    return build_command(
        model,
        url,
        load,
        input_data=input_data,
        report_csv=report_csv,
        request_parameters=request_parameters,
        protocol=protocol,
        profile_export_file=profile_export_file,
        extra_args=extra_args,
    )


def run_command(
    cmd: Sequence[str], timeout_s: float, cwd: str | os.PathLike | None = None
) -> subprocess.CompletedProcess:
    """Run a perf_analyzer command line in its environment, output captured as text.

    Give ``cwd`` = the report's folder and a bare ``-f`` file name: perf_analyzer names the composing models'
    CSVs ``<model>_v<version>.<-f value>``, which only works for a bare name.

    Raises:
        PerfAnalyzerError: it ran past ``timeout_s`` seconds (the message holds the command and its output's tail).
    """
    cmd = list(cmd)
    try:
        return subprocess.run(
            cmd, capture_output=True, text=True, env=perf_analyzer_env(), timeout=timeout_s, cwd=cwd
        )
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"")[-3000:]
        raise PerfAnalyzerError(
            f"perf_analyzer ran past {timeout_s:.0f} s: {' '.join(cmd)}\n{out!r}"
        ) from None


def warm_up(
    model: str,
    url: str,
    load: LoadSpec,
    *,
    input_data: str | os.PathLike,
    work_dir: str | os.PathLike,
    request_parameters: Mapping[str, object] | None = None,
    timeout_s: float = 300.0,
    label: str | None = None,
) -> None:
    """One unmeasured perf_analyzer burst at ``load`` (give it a ``request_count``); its report goes to
    ``work_dir/warmup.csv``.

    Raises:
        ValueError: as :func:`build_command`.
        PerfAnalyzerError: perf_analyzer failed; the message names ``label`` (default ``model``).
    """
    cmd = build_command(
        model,
        url,
        load,
        input_data=input_data,
        report_csv="warmup.csv",
        request_parameters=request_parameters,
    )
    p = run_command(cmd, timeout_s, cwd=work_dir)
    if p.returncode != 0:
        raise PerfAnalyzerError(f"warm-up of {label or model} failed:\n{(p.stdout + p.stderr)[-3000:]}")
