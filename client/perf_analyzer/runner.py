"""Running perf_analyzer: one load level (:class:`LoadSpec`) of one model, its command line, the run (with a
retry at a looser stability threshold), and the parsed :class:`PerfPoint`.

Request parameters (``--request-parameter``) only work over gRPC in 2.51, so gRPC is the default protocol. The
profile export is streamed through a FIFO into :func:`~tcsched.client.perf_analyzer.parsers.parse_profile_export`
on a thread: nothing big hits disk.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

from tcsched.client.perf_analyzer.binary import PerfAnalyzerError, find_perf_analyzer, perf_analyzer_env
from tcsched.client.perf_analyzer.parsers import (
    CsvRow,
    LoadMode,
    ProfileExperiment,
    ServerBreakdown,
    composing_csvs,
    parse_perf_csv,
    parse_profile_export,
)
from tcsched.client.perf_analyzer.stats import (
    ModelStats,
    Protocol,
    StatsDelta,
    server_statistics,
    statistics_delta,
)

UNSTABLE_MARKER = "Failed to obtain stable measurement"
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


@dataclass
class PerfPoint:
    """One measured load level of one model (a perf_analyzer run): what the bench reports and plots.

    Latencies are client-side end-to-end, milliseconds; throughput in inferences (images) per second;
    ``server`` is the average server-side breakdown in ms (for an ensemble: summed over the composing models,
    queue included, see :func:`run_perf_analyzer`); ``composing`` the breakdown per composing model;
    ``server_stats`` what every model did during the run (statistics API, whole run incl. unstable windows).
    """

    target: str
    model: str
    mode: LoadMode
    load: float
    request_parameters: dict[str, object]
    throughput_infer_per_s: float
    p50_ms: float | None
    p90_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    avg_latency_ms: float | None
    client_send_ms: float
    network_server_send_recv_ms: float
    client_recv_ms: float
    server: ServerBreakdown
    composing: dict[str, ServerBreakdown] = field(default_factory=dict)
    server_stats: dict[str, StatsDelta] = field(default_factory=dict)
    stable: bool = True
    stability_percentage: float = 10.0
    measurement_interval_ms: int = 5000
    wall_s: float = 0.0
    profile: ProfileExperiment | None = None

    def as_dict(self, with_profile: bool = False) -> dict:
        d = asdict(self)
        d.pop("profile")
        if with_profile and self.profile is not None:
            d["profile"] = {
                "latencies_ms": self.profile.latencies_ms(),
                "outputs": [r.outputs for r in self.profile.measured()],
            }
        return d


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
    measurement_interval_ms: int = 3000,
    stability_percentage: float = 10.0,
    max_trials: int = 10,
    protocol: Protocol = "grpc",
    request_distribution: Distribution = "constant",
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


@dataclass(frozen=True)
class _Request:
    """What every run of one measurement shares: the model, the server, the data and the request's options."""

    model: str
    url: str
    input_data: str | os.PathLike
    request_parameters: Mapping[str, object]
    protocol: Protocol
    profile_export: bool
    string_outputs: Sequence[str]
    extra_args: Sequence[str]
    timeout_s: float


@dataclass
class _Run:
    """One perf_analyzer run: its command, result, wall time, the statistics around it and its profile."""

    cmd: list[str]
    proc: subprocess.CompletedProcess
    report: Path
    wall_s: float
    before: dict[str, ModelStats]
    after: dict[str, ModelStats]
    profile: object

    @property
    def ok(self) -> bool:
        return self.proc.returncode == 0 and self.report.is_file()

    @property
    def output(self) -> str:
        return self.proc.stdout + self.proc.stderr


def _run_once(req: _Request, load: LoadSpec, wd: Path, stem: str) -> _Run:
    report = wd / f"{stem}.csv"
    for old in [report, *composing_csvs(report).values()]:
        old.unlink(missing_ok=True)
    before = server_statistics(req.url, req.protocol)
    t0 = time.monotonic()
    profile_box: dict[str, object] = {}
    with contextlib.ExitStack() as run_stack:
        pe_path = None
        if req.profile_export:
            pe_path = _start_profile_reader(run_stack, wd, stem, req.string_outputs, profile_box)
        cmd = build_command(
            req.model,
            req.url,
            load,
            input_data=req.input_data,
            report_csv=report.name,  # bare name, run in wd: see run_command
            request_parameters=req.request_parameters,
            protocol=req.protocol,
            profile_export_file=pe_path,
            extra_args=req.extra_args,
        )
        p = run_command(cmd, req.timeout_s, cwd=wd)
        if pe_path is not None:
            _finish_profile_reader(pe_path, profile_box, p.returncode == 0)
    wall = time.monotonic() - t0
    after = server_statistics(req.url, req.protocol)
    return _Run(cmd, p, report, wall, before, after, profile_box.get("result"))


def _server_breakdown(row: CsvRow, composing: Mapping[str, ServerBreakdown]) -> tuple[ServerBreakdown, float]:
    """The run's server breakdown and network time (ms). For an ensemble perf_analyzer's CSV sums compute
    input/infer/output over the composing models but reports only the ensemble's own queue (~0) and folds the
    steps' queues into Network+Server Send/Recv: the queues come from the composing models' CSVs instead and
    move out of the network time."""
    if not composing:
        return row.server, row.network_server_send_recv_ms
    q = sum(b.queue_ms for b in composing.values())
    server = replace(row.server, queue_ms=row.server.queue_ms + q)
    return server, max(0.0, row.network_server_send_recv_ms - q)


def _point(
    req: _Request, run: _Run, load: LoadSpec, label: str, stable: bool, stats_models: Sequence[str] | None
) -> PerfPoint:
    rows = parse_perf_csv(run.report.read_text())
    if len(rows) != 1:
        raise PerfAnalyzerError(f"expected one row in {run.report}, got {len(rows)}")
    row = rows[0]
    composing = {
        name: parse_perf_csv(path.read_text())[0].server for name, path in composing_csvs(run.report).items()
    }
    server, network = _server_breakdown(row, composing)
    profile = None
    if req.profile_export:
        exps = run.profile if isinstance(run.profile, list) else []
        if len(exps) != 1:
            raise PerfAnalyzerError(
                f"profile export of {label} at {load.tag}: expected 1 experiment, got {len(exps)}"
            )
        profile = exps[0]
    return PerfPoint(
        target=label,
        model=req.model,
        mode=row.mode,
        load=row.load,
        request_parameters=dict(req.request_parameters),
        throughput_infer_per_s=row.throughput_infer_per_s,
        p50_ms=row.p50_ms,
        p90_ms=row.p90_ms,
        p95_ms=row.p95_ms,
        p99_ms=row.p99_ms,
        avg_latency_ms=row.avg_latency_ms,
        client_send_ms=row.client_send_ms,
        network_server_send_recv_ms=network,
        client_recv_ms=row.client_recv_ms,
        server=server,
        composing=composing,
        server_stats=statistics_delta(run.before, run.after, stats_models),
        stable=stable,
        stability_percentage=load.stability_percentage,
        measurement_interval_ms=int(load.measurement_interval_ms),
        wall_s=run.wall_s,
        profile=profile,
    )


def run_load(
    model: str,
    url: str,
    load: LoadSpec,
    *,
    input_data: str | os.PathLike,
    request_parameters: Mapping[str, object] | None = None,
    relax_unstable: float | None = 2.0,
    protocol: Protocol = "grpc",
    profile_export: bool = False,
    string_outputs: Sequence[str] = ("VARIANT",),
    stats_models: Sequence[str] | None = None,
    work_dir: str | os.PathLike | None = None,
    target: str | None = None,
    timeout_s: float = 300.0,
    extra_args: Sequence[str] = (),
) -> PerfPoint:
    """Measure one load level of ``model`` with perf_analyzer and return it parsed.

    Args:
        model: Triton model name (a variant, or the ``classifier`` ensemble).
        url: server ``host:port`` for ``protocol`` (gRPC port by default).
        load: the load level and its measurement (:class:`LoadSpec`).
        input_data: ``--input-data`` JSON (:func:`~tcsched.client.perf_analyzer.inputs.write_tensor_input_data`
            / :func:`~tcsched.client.perf_analyzer.inputs.write_bytes_input_data`).
        request_parameters: Triton request parameters, e.g. ``{"variant": "mobilenet_v2_fp32"}`` or
            ``{"latency_budget_ms": 30.0}`` (floats travel as strings).
        relax_unstable: when the level does not stabilize, run it again once with the threshold multiplied by
            this factor (the point is then marked ``stable=False``); ``None`` raises instead.
        profile_export: also record per-request timestamps (``--profile-export-file``, streamed through a
            FIFO and parsed on the fly) into ``PerfPoint.profile``, with the string outputs ``string_outputs``.
        stats_models: models whose Triton statistics to difference around the run (default: all).
        work_dir: where the CSV reports go (kept); default a temporary folder, removed.
        target: the point's name in reports (default ``model``).
        timeout_s: wall-clock limit of one perf_analyzer run, seconds.

    Raises:
        ValueError: bad arguments (before anything runs).
        PerfAnalyzerError: perf_analyzer failed (or stayed unstable with ``relax_unstable=None``).
    """
    # validate everything before the first run
    build_command(
        model,
        url,
        load,
        input_data=input_data,
        report_csv="x.csv",
        request_parameters=request_parameters,
        protocol=protocol,
    )
    if not Path(input_data).is_file():
        raise ValueError(f"input data file {input_data} does not exist")
    if relax_unstable is not None and relax_unstable <= 1:
        raise ValueError(f"relax_unstable must be > 1 or None, got {relax_unstable}")
    req = _Request(
        model,
        url,
        input_data,
        dict(request_parameters or {}),
        protocol,
        profile_export,
        string_outputs,
        extra_args,
        timeout_s,
    )
    label = target or model
    with contextlib.ExitStack() as stack:
        if work_dir is None:
            wd = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tcsched-pa-")))
        else:
            wd = Path(work_dir).resolve()
            wd.mkdir(parents=True, exist_ok=True)
        stem = re.sub(r"[^A-Za-z0-9_.=-]+", "_", f"{label}_{load.tag}")
        stable = True
        for attempt in range(2):
            run = _run_once(req, load, wd, stem)
            if run.ok:
                break
            if UNSTABLE_MARKER in run.output and relax_unstable is not None and attempt == 0:
                load, stable = load.relaxed(relax_unstable), False
                continue
            raise PerfAnalyzerError(
                f"perf_analyzer failed (exit {run.proc.returncode}) for {label} at {load.tag}: "
                f"{' '.join(map(str, run.cmd))}\n{run.output[-3000:]}"
            )
        return _point(req, run, load, label, stable, stats_models)


def run_perf_analyzer(
    model: str,
    url: str,
    *,
    input_data: str | os.PathLike,
    concurrency: int | None = None,
    request_rate: float | None = None,
    request_parameters: Mapping[str, object] | None = None,
    measurement_interval_ms: int = 3000,
    stability_percentage: float = 10.0,
    max_trials: int = 10,
    relax_unstable: float | None = 2.0,
    protocol: Protocol = "grpc",
    request_distribution: Distribution = "constant",
    profile_export: bool = False,
    string_outputs: Sequence[str] = ("VARIANT",),
    stats_models: Sequence[str] | None = None,
    work_dir: str | os.PathLike | None = None,
    target: str | None = None,
    timeout_s: float = 300.0,
    extra_args: Sequence[str] = (),
) -> PerfPoint:
    """:func:`run_load` with the load level given field by field (``concurrency`` or ``request_rate``, and the
    measurement settings of :class:`LoadSpec`).

    Raises:
        ValueError: bad arguments (before anything runs).
        PerfAnalyzerError: perf_analyzer failed (or stayed unstable with ``relax_unstable=None``).
    """
    load = LoadSpec(
        concurrency=concurrency,
        request_rate=request_rate,
        request_distribution=request_distribution,
        measurement_interval_ms=measurement_interval_ms,
        stability_percentage=stability_percentage,
        max_trials=max_trials,
    )
    return run_load(
        model,
        url,
        load,
        input_data=input_data,
        request_parameters=request_parameters,
        relax_unstable=relax_unstable,
        protocol=protocol,
        profile_export=profile_export,
        string_outputs=string_outputs,
        stats_models=stats_models,
        work_dir=work_dir,
        target=target,
        timeout_s=timeout_s,
        extra_args=extra_args,
    )


def _start_profile_reader(
    stack: contextlib.ExitStack, wd: Path, stem: str, string_outputs: Sequence[str], box: dict
) -> Path:
    fifo = wd / f"{stem}.profile.fifo"
    fifo.unlink(missing_ok=True)
    os.mkfifo(fifo)
    stack.callback(lambda: fifo.unlink(missing_ok=True))

    def reader() -> None:
        try:
            with open(fifo, "rb") as f:  # blocks until perf_analyzer opens it for writing
                box["result"] = parse_profile_export(f, string_outputs)
        except Exception as e:  # noqa: BLE001 - reported by _finish_profile_reader
            box["error"] = e

    t = threading.Thread(target=reader, name="profile-export-reader", daemon=True)
    t.start()
    box["thread"] = t
    return fifo


def _finish_profile_reader(fifo: Path, box: dict, pa_ok: bool) -> None:
    t: threading.Thread = box["thread"]  # type: ignore[assignment]
    if t.is_alive() and "result" not in box:
        # perf_analyzer exited without opening the FIFO (it failed early): unblock the reader
        with contextlib.suppress(OSError):
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            os.close(fd)
    t.join(timeout=120)
    if pa_ok and "error" in box:
        raise PerfAnalyzerError(f"could not parse the profile export: {box['error']}")
