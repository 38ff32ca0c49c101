"""Measuring one load level: the perf_analyzer run (with one retry at a looser stability threshold when the
level does not stabilize), the statistics around it, and the parsed :class:`PerfPoint`.

The profile export is streamed through a FIFO into :func:`~tcsched.client.perf_analyzer.parsers.parse_profile_export`
on a thread: nothing big hits disk.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from tcsched.client.perf_analyzer.binary import PerfAnalyzerError
from tcsched.client.perf_analyzer.command import Distribution, LoadSpec, build_command, run_command
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

    def validate(self, load: LoadSpec, relax_unstable: float | None) -> None:
        """Raises ValueError on a bad argument (see :func:`build_command`), a missing input file or a bad
        ``relax_unstable``."""
        build_command(
            self.model,
            self.url,
            load,
            input_data=self.input_data,
            report_csv="x.csv",
            request_parameters=self.request_parameters,
            protocol=self.protocol,
        )
        if not Path(self.input_data).is_file():
            raise ValueError(f"input data file {self.input_data} does not exist")
        if relax_unstable is not None and relax_unstable <= 1:
            raise ValueError(f"relax_unstable must be > 1 or None, got {relax_unstable}")


def _work_dir(stack: contextlib.ExitStack, work_dir: str | os.PathLike | None) -> Path:
    """``work_dir`` (created), or a temporary folder removed when ``stack`` closes."""
    if work_dir is None:
        return Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tcsched-pa-")))
    wd = Path(work_dir).resolve()
    wd.mkdir(parents=True, exist_ok=True)
    return wd


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
    req.validate(load, relax_unstable)  # everything, before the first run
    label = target or model
    with contextlib.ExitStack() as stack:
        wd = _work_dir(stack, work_dir)
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
    measurement_interval_ms: int = LoadSpec.measurement_interval_ms,
    stability_percentage: float = LoadSpec.stability_percentage,
    max_trials: int = LoadSpec.max_trials,
    relax_unstable: float | None = 2.0,
    protocol: Protocol = "grpc",
    request_distribution: Distribution = LoadSpec.request_distribution,
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
