"""perf_analyzer (from the ``tritonclient[all]==2.51.0`` wheel): locate it, run it, parse what it writes.

Results come from files, never from perf_analyzer's stdout:

- the latency report (``-f report.csv --verbose-csv``): one row per load level with throughput, client
  percentiles and the server-side breakdown; for an ensemble, perf_analyzer also writes one
  ``<model>_v<version>.<report>.csv`` per composing model (:func:`parse_perf_csv`);
- the profile export (``--profile-export-file``), per-request timestamps (:func:`parse_profile_export`). In 2.51
  it also holds every request's inputs and every response's outputs (about 1.5 MB a request for a float32
  [3,224,224] tensor, ~0.15 MB for the ensemble's JPEG bytes), so :func:`run_perf_analyzer` streams it through
  a FIFO into a parser that keeps only timestamps and string outputs (e.g. ``VARIANT``): nothing big hits disk;
- Triton's statistics API (``get_inference_statistics``), read before and after a run
  (:func:`server_statistics`, :func:`statistics_delta`, :func:`variant_usage_delta`).

perf_analyzer needs Debian's ``libb64-0d`` and ``libcudart.so.12`` (PyPI ``nvidia-cuda-runtime-cu12``) even on a
CPU-only machine; :func:`perf_analyzer_env` puts the cu12 runtime's ``lib/`` on ``LD_LIBRARY_PATH``.
Request parameters (``--request-parameter``) only work over gRPC in 2.51, so gRPC is the default protocol.
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import BinaryIO, Literal

Protocol = Literal["grpc", "http"]
LoadMode = Literal["concurrency", "request_rate"]

UNSTABLE_MARKER = "Failed to obtain stable measurement"
# perf_analyzer merges the last 3 measurement windows into the reported figures (its stability window)
STABILITY_WINDOWS = 3


class PerfAnalyzerError(RuntimeError):
    """perf_analyzer failed; the message holds its command line and the tail of its output."""


# ----------------------------------------------------------------------------------------------- locating


def find_perf_analyzer() -> Path:
    """The ``perf_analyzer`` binary installed by ``tritonclient[all]`` next to this Python (else on PATH).

    Raises:
        FileNotFoundError: not installed.
    """
    here = Path(sys.executable).parent / "perf_analyzer"
    if here.is_file():
        return here
    found = shutil.which("perf_analyzer")
    if found:
        return Path(found)
    raise FileNotFoundError(
        "perf_analyzer not found: `pip install 'tritonclient[all]==2.51.0'` (it ships the binary)"
    )


def cuda_runtime_lib_dir() -> Path:
    """The ``lib/`` folder with ``libcudart.so.12`` from PyPI's ``nvidia-cuda-runtime-cu12``.

    torch may also install a CUDA 13 runtime (``nvidia/cu13/lib/libcudart.so.13``); perf_analyzer 2.51 links
    against ``libcudart.so.12``, so only a folder holding that exact soname qualifies.

    Raises:
        FileNotFoundError: no ``libcudart.so.12`` in any ``site-packages/nvidia/*/lib``.
    """
    import importlib.util

    spec = importlib.util.find_spec("nvidia")
    roots = [Path(p) for p in (spec.submodule_search_locations or [])] if spec else []
    for root in roots:
        for cand in [root / "cuda_runtime" / "lib", *sorted(root.glob("*/lib"))]:
            if (cand / "libcudart.so.12").exists():
                return cand
    raise FileNotFoundError(
        "libcudart.so.12 not found (perf_analyzer needs it even on CPU): `pip install nvidia-cuda-runtime-cu12`"
    )


def perf_analyzer_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for perf_analyzer: ``LD_LIBRARY_PATH`` starts with the cu12 runtime's ``lib/``."""
    env = dict(os.environ if base is None else base)
    lib = str(cuda_runtime_lib_dir())
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (lib, env.get("LD_LIBRARY_PATH", "")) if p)
    return env


def perf_analyzer_version() -> str:
    """``perf_analyzer --version``, e.g. ``'2.51.0'``.

    Raises:
        PerfAnalyzerError: it does not start (typically: Debian ``libb64-0d`` missing).
    """
    cmd = [str(find_perf_analyzer()), "--version"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=perf_analyzer_env(), timeout=30)
    m = re.search(r"Version\s+(\S+)", p.stdout + p.stderr)
    if p.returncode != 0 or not m:
        hint = " (install Debian's libb64-0d: apt-get install libb64-0d)" if "libb64" in p.stderr else ""
        raise PerfAnalyzerError(f"`{' '.join(cmd)}` failed{hint}:\n{(p.stdout + p.stderr)[-2000:]}")
    return m.group(1)


# ------------------------------------------------------------------------------------------- input data


def _b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode("ascii")


def write_tensor_input_data(path: str | os.PathLike, input_name: str, tensors: Sequence) -> Path:
    """perf_analyzer ``--input-data`` JSON for a float32 tensor input: one step per tensor (round robin).

    Args:
        tensors: numpy float32 arrays, each one request's data without the batch dimension (e.g. [3,224,224]).

    Raises:
        ValueError: no tensors, or a tensor that is not float32.
    """
    import json

    if not tensors:
        raise ValueError("need at least one tensor for --input-data")
    steps = []
    for t in tensors:
        if str(t.dtype) != "float32":
            raise ValueError(f"tensor input data must be float32, got {t.dtype}")
        steps.append({input_name: {"b64": _b64(t.tobytes(order="C")), "shape": list(t.shape)}})
    path = Path(path)
    path.write_text(json.dumps({"data": steps}))
    return path


def write_bytes_input_data(path: str | os.PathLike, input_name: str, blobs: Sequence[bytes]) -> Path:
    """perf_analyzer ``--input-data`` JSON for a BYTES input of shape [1]: one encoded file per step.

    perf_analyzer copies ``b64`` content verbatim into the request's raw tensor, and Triton's raw BYTES format
    is a 4-byte little-endian length then the bytes; so each element is ``len32 || bytes``, base64-encoded.

    Raises:
        ValueError: no blobs, or an empty one.
    """
    import json

    if not blobs:
        raise ValueError("need at least one element for --input-data")
    steps = []
    for b in blobs:
        if not b:
            raise ValueError("empty element in BYTES input data")
        steps.append({input_name: {"b64": _b64(len(b).to_bytes(4, "little") + bytes(b)), "shape": [1]}})
    path = Path(path)
    path.write_text(json.dumps({"data": steps}))
    return path


# ------------------------------------------------------------------------------------------- CSV report


@dataclass(frozen=True)
class ServerBreakdown:
    """Server-side time of an average request, milliseconds (perf_analyzer's CSV columns, converted from µs)."""

    queue_ms: float
    compute_input_ms: float
    compute_infer_ms: float
    compute_output_ms: float

    @property
    def total_ms(self) -> float:
        return self.queue_ms + self.compute_input_ms + self.compute_infer_ms + self.compute_output_ms


@dataclass(frozen=True)
class CsvRow:
    """One row of perf_analyzer's latency report (``-f``). Latencies in milliseconds, throughput in infer/s.

    ``load`` is the concurrency or the request rate (req/s) of the row. Percentiles, ``avg_latency_ms`` and
    the gRPC columns are ``None`` in a composing model's CSV (perf_analyzer writes only the breakdown there).
    """

    load: float
    mode: LoadMode
    throughput_infer_per_s: float
    client_send_ms: float
    network_server_send_recv_ms: float
    server: ServerBreakdown
    client_recv_ms: float
    p50_ms: float | None = None
    p90_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    avg_latency_ms: float | None = None


def _us(row: Mapping[str, str], key: str) -> float | None:
    v = row.get(key)
    if v is None or v == "":
        return None
    return float(v) / 1000.0


def parse_perf_csv(text: str) -> list[CsvRow]:
    """Parse perf_analyzer's CSV latency report (with or without ``--verbose-csv``; main or composing model).

    Raises:
        ValueError: not a perf_analyzer report (no ``Concurrency``/``Request Rate`` and ``Inferences/Second``
            columns).
    """
    # with --collect-metrics perf_analyzer appends server metrics after a blank line: the report is the first block
    block = text.strip().split("\n\n", 1)[0]
    reader = csv.DictReader(io.StringIO(block))
    cols = reader.fieldnames or []
    if "Concurrency" in cols:
        load_col, mode = "Concurrency", "concurrency"
    elif "Request Rate" in cols:
        load_col, mode = "Request Rate", "request_rate"
    else:
        raise ValueError(f"not a perf_analyzer CSV report: columns {cols}")
    if "Inferences/Second" not in cols:
        raise ValueError(f"not a perf_analyzer CSV report (no 'Inferences/Second'): columns {cols}")
    rows = []
    for r in reader:
        rows.append(
            CsvRow(
                load=float(r[load_col]),
                mode=mode,  # type: ignore[arg-type]
                throughput_infer_per_s=float(r["Inferences/Second"]),
                client_send_ms=_us(r, "Client Send") or 0.0,
                network_server_send_recv_ms=_us(r, "Network+Server Send/Recv") or 0.0,
                server=ServerBreakdown(
                    queue_ms=_us(r, "Server Queue") or 0.0,
                    compute_input_ms=_us(r, "Server Compute Input") or 0.0,
                    compute_infer_ms=_us(r, "Server Compute Infer") or 0.0,
                    compute_output_ms=_us(r, "Server Compute Output") or 0.0,
                ),
                client_recv_ms=_us(r, "Client Recv") or 0.0,
                p50_ms=_us(r, "p50 latency"),
                p90_ms=_us(r, "p90 latency"),
                p95_ms=_us(r, "p95 latency"),
                p99_ms=_us(r, "p99 latency"),
                avg_latency_ms=_us(r, "Avg latency"),
            )
        )
    return rows


def composing_csvs(report: Path) -> dict[str, Path]:
    """The per-composing-model CSVs perf_analyzer writes beside ``report`` for an ensemble:
    ``<model>_v<version>.<report name>`` -> ``{model: path}``."""
    out = {}
    for p in sorted(report.parent.glob(f"*.{report.name}")):
        m = re.fullmatch(rf"(.+)_v(\d+)\.{re.escape(report.name)}", p.name)
        if m:
            out[m.group(1)] = p
    return out


# ------------------------------------------------------------------------------------ profile export


@dataclass(frozen=True)
class RequestRecord:
    """One request of a profile export: send time and last response time (ns since the epoch), and the
    values of the string outputs asked for (e.g. ``{"VARIANT": "mobilenet_v2_int8"}``)."""

    start_ns: int
    end_ns: int
    outputs: dict[str, str] = field(default_factory=dict)

    @property
    def latency_ms(self) -> float:
        return (self.end_ns - self.start_ns) / 1e6


@dataclass
class ProfileExperiment:
    """One load level of a profile export (``mode`` concurrency or request_rate, ``value`` the level).

    ``requests`` holds every request perf_analyzer sent at that level, including unstable windows;
    :meth:`measured` keeps those that ended inside the last :data:`STABILITY_WINDOWS` windows, the ones its
    reported figures come from (checked: their percentiles equal the CSV's to the microsecond rounding).
    """

    mode: str
    value: float
    requests: list[RequestRecord]
    window_boundaries_ns: list[int]

    def measured(self) -> list[RequestRecord]:
        wb = self.window_boundaries_ns
        if len(wb) < 2:
            return list(self.requests)
        lo, hi = wb[max(0, len(wb) - 1 - STABILITY_WINDOWS)], wb[-1]
        return [r for r in self.requests if lo <= r.end_ns <= hi]

    def latencies_ms(self, measured_only: bool = True) -> list[float]:
        return [r.latency_ms for r in (self.measured() if measured_only else self.requests)]

    def output_counts(self, name: str, measured_only: bool = True) -> dict[str, int]:
        """How many requests returned each value of string output ``name`` (e.g. which variant served)."""
        counts: dict[str, int] = {}
        for r in self.measured() if measured_only else self.requests:
            v = r.outputs.get(name)
            if v is not None:
                counts[v] = counts.get(v, 0) + 1
        return counts


_TOKEN_MAX = 1 << 16  # longest token the scanner must see whole (window_boundaries of a long run: ~2 KB)


def _profile_token_re(string_outputs: Iterable[str]) -> re.Pattern[bytes]:
    # JSON escapes every '"' inside a string as '\"', so these patterns cannot match inside input/output data
    outs = "|".join(re.escape(s) for s in string_outputs) or "(?!)"
    return re.compile(
        rb'"experiment":\{"mode":"(?P<mode>[a-z_]+)","value":(?P<value>[-+.\deE]+)\}'
        rb'|\{"timestamp":(?P<ts>\d+),'
        rb'|"response_timestamps":\[(?P<rts>[\d,]*)\]'
        rb'|"window_boundaries":\[(?P<wb>[\d,]*)\]'
        rb'|"(?P<oname>' + outs.encode() + rb')":"(?P<oval>[^"\\]{0,512})"'
    )


def parse_profile_export(
    source: str | os.PathLike | BinaryIO,
    string_outputs: Iterable[str] = ("VARIANT",),
    chunk_size: int = 1 << 22,
) -> list[ProfileExperiment]:
    """Parse a perf_analyzer 2.51 ``--profile-export-file`` in one streaming pass (file, FIFO or binary stream).

    Keeps per request the send timestamp, the last response timestamp and the string outputs named in
    ``string_outputs``; skips the (huge) input and output tensors without decoding them (they are not
    always valid UTF-8: perf_analyzer writes BYTES inputs raw).

    Raises:
        ValueError: the stream is not a profile export (no ``experiments``).
    """
    pat = _profile_token_re(string_outputs)
    experiments: list[ProfileExperiment] = []
    cur: dict | None = None  # the request being read: {"start": ns, "end": ns | None, "outputs": {...}}
    seen_any = False

    def flush_request() -> None:
        nonlocal cur
        if cur is not None and cur["end"] is not None and experiments:
            experiments[-1].requests.append(RequestRecord(cur["start"], cur["end"], cur["outputs"]))
        cur = None

    def handle(m: re.Match[bytes]) -> None:
        nonlocal cur, seen_any
        if m.group("mode") is not None:
            flush_request()
            experiments.append(ProfileExperiment(m.group("mode").decode(), float(m.group("value")), [], []))
            seen_any = True
        elif m.group("ts") is not None:
            flush_request()
            cur = {"start": int(m.group("ts")), "end": None, "outputs": {}}
        elif m.group("rts") is not None:
            if cur is not None and m.group("rts"):
                cur["end"] = int(m.group("rts").rsplit(b",", 1)[-1])
        elif m.group("wb") is not None:
            flush_request()
            if experiments and m.group("wb"):
                experiments[-1].window_boundaries_ns = [int(x) for x in m.group("wb").split(b",")]
        elif m.group("oname") is not None and cur is not None:
            cur["outputs"][m.group("oname").decode()] = m.group("oval").decode("utf-8", "replace")

    with contextlib.ExitStack() as stack:
        is_path = isinstance(source, str | os.PathLike)
        f = stack.enter_context(open(source, "rb")) if is_path else source  # noqa: SIM115
        buf = b""
        while True:
            chunk = f.read(chunk_size)
            buf += chunk
            last = not chunk
            limit = len(buf) if last else len(buf) - _TOKEN_MAX
            cut = 0
            for m in pat.finditer(buf):
                if m.start() >= limit:
                    break
                handle(m)
                cut = m.end()
            if last:
                break
            buf = buf[max(cut, limit) :]
        flush_request()
    if not seen_any:
        raise ValueError("not a perf_analyzer profile export: no experiment found")
    return experiments


def within_budget_share(
    latencies: ProfileExperiment | Iterable[float] | str | os.PathLike, budget_ms: float
) -> float:
    """Fraction (0..1) of requests whose end-to-end client latency is at most ``budget_ms`` milliseconds.

    ``latencies`` is a :class:`ProfileExperiment` (its measured windows), a profile export path (must hold
    exactly one experiment), or plain latencies in ms.

    Raises:
        ValueError: ``budget_ms`` not a finite number > 0, no latencies, or a path with several experiments.
    """
    if not (isinstance(budget_ms, int | float) and math.isfinite(budget_ms) and budget_ms > 0):
        raise ValueError(f"budget_ms must be a finite number > 0, got {budget_ms!r}")
    if isinstance(latencies, str | os.PathLike):
        exps = parse_profile_export(latencies)
        if len(exps) != 1:
            raise ValueError(f"{latencies} holds {len(exps)} experiments; pass one ProfileExperiment")
        latencies = exps[0]
    lat = latencies.latencies_ms() if isinstance(latencies, ProfileExperiment) else list(latencies)
    if not lat:
        raise ValueError("no request latencies to compare with the budget")
    return sum(1 for x in lat if x <= budget_ms) / len(lat)


# ---------------------------------------------------------------------------------- server statistics


@dataclass(frozen=True)
class ModelStats:
    """Cumulative counters of one model from Triton's statistics API (durations in ns, as Triton gives them)."""

    inference_count: int
    execution_count: int
    success_count: int
    fail_count: int
    success_ns: int
    queue_ns: int
    compute_input_ns: int
    compute_infer_ns: int
    compute_output_ns: int


@dataclass(frozen=True)
class StatsDelta:
    """What one model did between two statistics snapshots. Averages per successful request, milliseconds.

    ``inference_count`` counts images (batch elements), ``execution_count`` model executions (batches), so
    ``avg_batch_size`` = inference_count / execution_count shows what dynamic batching achieved.
    """

    inference_count: int
    execution_count: int
    success_count: int
    fail_count: int
    avg_request_ms: float | None
    avg_queue_ms: float | None
    avg_compute_input_ms: float | None
    avg_compute_infer_ms: float | None
    avg_compute_output_ms: float | None

    @property
    def avg_batch_size(self) -> float | None:
        return self.inference_count / self.execution_count if self.execution_count else None


def _grpc_client(url: str, protocol: Protocol):
    if protocol == "grpc":
        import tritonclient.grpc as client_mod
    elif protocol == "http":
        import tritonclient.http as client_mod
    else:
        raise ValueError(f"protocol must be 'grpc' or 'http', got {protocol!r}")
    return client_mod.InferenceServerClient(url)


def server_statistics(url: str, protocol: Protocol = "grpc") -> dict[str, ModelStats]:
    """Cumulative statistics of every loaded model (version-summed), from ``get_inference_statistics()``."""
    c = _grpc_client(url, protocol)
    try:
        js = c.get_inference_statistics(as_json=True) if protocol == "grpc" else c.get_inference_statistics()
    finally:
        c.close()
    out: dict[str, ModelStats] = {}

    def dur(d: Mapping, key: str) -> tuple[int, int]:
        v = d.get(key, {}) or {}
        return int(v.get("count", 0) or 0), int(v.get("ns", 0) or 0)

    for m in js.get("model_stats", []):
        inf = m.get("inference_stats", {}) or {}
        s_count, s_ns = dur(inf, "success")
        f_count, _ = dur(inf, "fail")
        prev = out.get(m["name"])
        cur = ModelStats(
            inference_count=int(m.get("inference_count", 0) or 0),
            execution_count=int(m.get("execution_count", 0) or 0),
            success_count=s_count,
            fail_count=f_count,
            success_ns=s_ns,
            queue_ns=dur(inf, "queue")[1],
            compute_input_ns=dur(inf, "compute_input")[1],
            compute_infer_ns=dur(inf, "compute_infer")[1],
            compute_output_ns=dur(inf, "compute_output")[1],
        )
        if prev is not None:  # several versions: sum them
            cur = ModelStats(
                *(a + b for a, b in zip(asdict(prev).values(), asdict(cur).values(), strict=True))
            )
        out[m["name"]] = cur
    return out


def statistics_delta(
    before: Mapping[str, ModelStats], after: Mapping[str, ModelStats], models: Iterable[str] | None = None
) -> dict[str, StatsDelta]:
    """Per model, the difference ``after - before`` of two :func:`server_statistics` snapshots."""
    names = list(models) if models is not None else sorted(after)
    zero = ModelStats(0, 0, 0, 0, 0, 0, 0, 0, 0)
    out = {}
    for n in names:
        a, b = after.get(n, zero), before.get(n, zero)
        d = ModelStats(*(x - y for x, y in zip(asdict(a).values(), asdict(b).values(), strict=True)))
        per = lambda ns, d=d: ns / d.success_count / 1e6 if d.success_count else None  # noqa: E731
        out[n] = StatsDelta(
            inference_count=d.inference_count,
            execution_count=d.execution_count,
            success_count=d.success_count,
            fail_count=d.fail_count,
            avg_request_ms=per(d.success_ns),
            avg_queue_ms=per(d.queue_ns),
            avg_compute_input_ms=per(d.compute_input_ns),
            avg_compute_infer_ms=per(d.compute_infer_ns),
            avg_compute_output_ms=per(d.compute_output_ns),
        )
    return out


def variant_usage_delta(
    before: Mapping[str, ModelStats], after: Mapping[str, ModelStats], variants: Iterable[str]
) -> dict[str, dict[str, float | int | None]]:
    """Which variants actually served between two snapshots: per variant model, the images
    (``inference_count``), executions (``execution_count``), their share of all images and the average batch.

    Use it around a run through the ensemble: the scheduler calls the variant models by BLS, so their counters
    move exactly by what the scheduler sent them.
    """
    deltas = statistics_delta(before, after, variants)
    total = sum(d.inference_count for d in deltas.values())
    return {
        n: {
            "inference_count": d.inference_count,
            "execution_count": d.execution_count,
            "share": d.inference_count / total if total else 0.0,
            "avg_batch_size": d.avg_batch_size,
        }
        for n, d in deltas.items()
    }


# ------------------------------------------------------------------------------------------- running


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
    request_distribution: Literal["constant", "poisson"] = "constant",
    profile_export_file: str | os.PathLike | None = None,
    request_count: int | None = None,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """The perf_analyzer command line for one load level (validated; see :func:`run_perf_analyzer`).

    Raises:
        ValueError: both or neither of ``concurrency``/``request_rate``, a value out of range, or request
            parameters over HTTP (perf_analyzer 2.51 sends them only over gRPC).
    """
    if not model or not isinstance(model, str):
        raise ValueError(f"model must be a non-empty name, got {model!r}")
    if (concurrency is None) == (request_rate is None):
        raise ValueError("give exactly one of concurrency (>= 1) or request_rate (req/s > 0)")
    if concurrency is not None and (
        isinstance(concurrency, bool) or int(concurrency) != concurrency or concurrency < 1
    ):
        raise ValueError(f"concurrency must be an integer >= 1, got {concurrency!r}")
    if request_rate is not None and not (math.isfinite(request_rate) and request_rate > 0):
        raise ValueError(f"request_rate must be a finite number > 0 (req/s), got {request_rate!r}")
    if measurement_interval_ms < 100:
        raise ValueError(f"measurement_interval_ms must be >= 100, got {measurement_interval_ms}")
    if not (0 < stability_percentage <= 1000):
        raise ValueError(f"stability_percentage must be in (0, 1000], got {stability_percentage}")
    if max_trials < 3:
        raise ValueError(f"max_trials must be >= 3 (perf_analyzer compares 3 windows), got {max_trials}")
    if protocol not in ("grpc", "http"):
        raise ValueError(f"protocol must be 'grpc' or 'http', got {protocol!r}")
    params = dict(request_parameters or {})
    if params and protocol != "grpc":
        raise ValueError("perf_analyzer 2.51 sends --request-parameter only over gRPC: use protocol='grpc'")
    cmd = [
        str(find_perf_analyzer()),
        "-m",
        model,
        "-i",
        protocol,
        "-u",
        url,
        "-b",
        "1",
        "--input-data",
        str(Path(input_data).resolve()),
        "--measurement-mode",
        "time_windows",
        "-p",
        str(int(measurement_interval_ms)),
        "-s",
        f"{stability_percentage:g}",
        "-r",
        str(int(max_trials)),
        "-f",
        str(report_csv),
        "--verbose-csv",
    ]
    if concurrency is not None:
        cmd += ["--concurrency-range", str(int(concurrency))]
    else:
        # open loop: --async so that requests leave on schedule even when the server falls behind (in sync mode
        # each of perf_analyzer's threads waits for its response, the schedule slips on the client, and the
        # server's backlog never shows in the latencies: a closed loop in disguise)
        cmd += [
            "--request-rate-range",
            f"{request_rate:g}",
            "--request-distribution",
            request_distribution,
            "--async",
        ]
    if request_count is not None:
        cmd += ["--request-count", str(int(request_count))]
    for k, v in params.items():
        cmd += ["--request-parameter", _param_arg(k, v)]
    if profile_export_file is not None:
        cmd += ["--profile-export-file", str(Path(profile_export_file).resolve())]
    return cmd + list(extra_args)


def _run(
    cmd: list[str], timeout_s: float, cwd: str | os.PathLike | None = None
) -> subprocess.CompletedProcess:
    """Run perf_analyzer. Give ``cwd`` = the report's folder and a bare ``-f`` file name: perf_analyzer names the
    composing models' CSVs ``<model>_v<version>.<-f value>``, which only works for a bare name."""
    try:
        return subprocess.run(
            cmd, capture_output=True, text=True, env=perf_analyzer_env(), timeout=timeout_s, cwd=cwd
        )
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"")[-3000:]
        raise PerfAnalyzerError(
            f"perf_analyzer ran past {timeout_s:.0f} s: {' '.join(cmd)}\n{out!r}"
        ) from None


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
    request_distribution: Literal["constant", "poisson"] = "constant",
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
        input_data: ``--input-data`` JSON (:func:`write_tensor_input_data` / :func:`write_bytes_input_data`).
        concurrency: outstanding requests (closed loop), or
        request_rate: requests per second (open loop, ``request_distribution`` arrivals).
        request_parameters: Triton request parameters, e.g. ``{"variant": "mobilenet_v2_fp32"}`` or
            ``{"latency_budget_ms": 30.0}`` (floats travel as strings).
        measurement_interval_ms: one measurement window, ms; perf_analyzer reports the last 3 windows once
            their throughput and average latency agree within ``stability_percentage`` %, trying at most
            ``max_trials`` windows.
        relax_unstable: when the level does not stabilize, run it again once with the threshold multiplied by
            this factor (the point is then marked ``stable=False``); ``None`` raises instead.
        profile_export: also record per-request timestamps (``--profile-export-file``, streamed through a
            FIFO and parsed on the fly) into ``PerfPoint.profile``, with the string outputs ``string_outputs``.
        stats_models: models whose Triton statistics to difference around the run (default: all).
        work_dir: where the CSV reports go (kept); default a temporary folder, removed.
        timeout_s: wall-clock limit of one perf_analyzer run, seconds.

    Raises:
        ValueError: bad arguments (before anything runs).
        PerfAnalyzerError: perf_analyzer failed (or stayed unstable with ``relax_unstable=None``).
    """
    # validate everything before the first run
    perf_analyzer_command(
        model,
        url,
        input_data=input_data,
        report_csv="x.csv",
        concurrency=concurrency,
        request_rate=request_rate,
        request_parameters=request_parameters,
        measurement_interval_ms=measurement_interval_ms,
        stability_percentage=stability_percentage,
        max_trials=max_trials,
        protocol=protocol,
        request_distribution=request_distribution,
    )
    if not Path(input_data).is_file():
        raise ValueError(f"input data file {input_data} does not exist")
    if relax_unstable is not None and relax_unstable <= 1:
        raise ValueError(f"relax_unstable must be > 1 or None, got {relax_unstable}")
    label = target or model
    with contextlib.ExitStack() as stack:
        if work_dir is None:
            wd = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tcsched-pa-")))
        else:
            wd = Path(work_dir).resolve()
            wd.mkdir(parents=True, exist_ok=True)
        load_tag = f"c{concurrency}" if concurrency is not None else f"r{request_rate:g}"
        stem = re.sub(r"[^A-Za-z0-9_.=-]+", "_", f"{label}_{load_tag}")
        s_pct = stability_percentage
        stable = True
        for attempt in range(2):
            report = wd / f"{stem}.csv"
            for old in [report, *composing_csvs(report).values()]:
                old.unlink(missing_ok=True)
            before = server_statistics(url, protocol)
            t0 = time.monotonic()
            profile_box: dict[str, object] = {}
            with contextlib.ExitStack() as run_stack:
                pe_path = None
                if profile_export:
                    pe_path = _start_profile_reader(run_stack, wd, stem, string_outputs, profile_box)
                cmd = perf_analyzer_command(
                    model,
                    url,
                    input_data=input_data,
                    report_csv=report.name,  # bare name, run in wd: see _run
                    concurrency=concurrency,
                    request_rate=request_rate,
                    request_parameters=request_parameters,
                    measurement_interval_ms=measurement_interval_ms,
                    stability_percentage=s_pct,
                    max_trials=max_trials,
                    protocol=protocol,
                    request_distribution=request_distribution,
                    profile_export_file=pe_path,
                    extra_args=extra_args,
                )
                p = _run(cmd, timeout_s, cwd=wd)
                if pe_path is not None:
                    _finish_profile_reader(pe_path, profile_box, p.returncode == 0)
            wall = time.monotonic() - t0
            after = server_statistics(url, protocol)
            output = p.stdout + p.stderr
            if p.returncode == 0 and report.is_file():
                break
            if UNSTABLE_MARKER in output and relax_unstable is not None and attempt == 0:
                s_pct, stable = s_pct * relax_unstable, False
                continue
            raise PerfAnalyzerError(
                f"perf_analyzer failed (exit {p.returncode}) for {label} at {load_tag}: "
                f"{' '.join(map(str, cmd))}\n{output[-3000:]}"
            )
        rows = parse_perf_csv(report.read_text())
        if len(rows) != 1:
            raise PerfAnalyzerError(f"expected one row in {report}, got {len(rows)}")
        row = rows[0]
        composing = {
            name: parse_perf_csv(path.read_text())[0].server for name, path in composing_csvs(report).items()
        }
        server, network = row.server, row.network_server_send_recv_ms
        if composing:
            # for an ensemble perf_analyzer's CSV sums compute input/infer/output over the composing models but
            # reports only the ensemble's own queue (~0) and folds the steps' queues into Network+Server
            # Send/Recv; take the queues from the composing models' CSVs and move them out of the network
            q = sum(b.queue_ms for b in composing.values())
            server = ServerBreakdown(
                queue_ms=row.server.queue_ms + q,
                compute_input_ms=row.server.compute_input_ms,
                compute_infer_ms=row.server.compute_infer_ms,
                compute_output_ms=row.server.compute_output_ms,
            )
            network = max(0.0, network - q)
        profile = profile_box.get("result")
        if profile_export:
            exps = profile if isinstance(profile, list) else []
            if len(exps) != 1:
                raise PerfAnalyzerError(
                    f"profile export of {label} at {load_tag}: expected 1 experiment, got {len(exps)}"
                )
            profile = exps[0]
        return PerfPoint(
            target=label,
            model=model,
            mode=row.mode,
            load=row.load,
            request_parameters=dict(request_parameters or {}),
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
            server_stats=statistics_delta(before, after, stats_models),
            stable=stable,
            stability_percentage=s_pct,
            measurement_interval_ms=int(measurement_interval_ms),
            wall_s=wall,
            profile=profile if profile_export else None,  # type: ignore[arg-type]
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
