"""Parsers of what perf_analyzer writes (never its stdout).

- the latency report (``-f report.csv --verbose-csv``): one row per load level with throughput, client
  percentiles and the server-side breakdown; for an ensemble, perf_analyzer also writes one
  ``<model>_v<version>.<report>.csv`` per composing model (:func:`parse_perf_csv`, :func:`composing_csvs`);
- the profile export (``--profile-export-file``), per-request timestamps (:func:`parse_profile_export`). In 2.51
  it also holds every request's inputs and every response's outputs (about 1.5 MB a request for a float32
  [3,224,224] tensor, ~0.15 MB for the ensemble's JPEG bytes), so the parser streams it and keeps only
  timestamps and string outputs (e.g. ``VARIANT``).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Literal

LoadMode = Literal["concurrency", "request_rate"]

# perf_analyzer merges the last 3 measurement windows into the reported figures (its stability window)
STABILITY_WINDOWS = 3


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
        rb'|"(?P<oname>' + outs.encode() + rb')":"(?P<oval>(?:[^"\\]|\\.){0,4096})"'
    )


class _ProfileScanner:
    """Turns the token matches of a profile export into :class:`ProfileExperiment` objects, request by request."""

    def __init__(self) -> None:
        self.experiments: list[ProfileExperiment] = []
        self.cur: dict | None = (
            None  # the request being read: {"start": ns, "end": ns | None, "outputs": {...}}
        )

    def flush_request(self) -> None:
        cur = self.cur
        if cur is not None and cur["end"] is not None and self.experiments:
            self.experiments[-1].requests.append(RequestRecord(cur["start"], cur["end"], cur["outputs"]))
        self.cur = None

    def handle(self, m: re.Match[bytes]) -> None:
        if m.group("mode") is not None:
            self.flush_request()
            self.experiments.append(
                ProfileExperiment(m.group("mode").decode(), float(m.group("value")), [], [])
            )
        elif m.group("ts") is not None:
            self.flush_request()
            self.cur = {"start": int(m.group("ts")), "end": None, "outputs": {}}
        elif m.group("rts") is not None:
            if self.cur is not None and m.group("rts"):
                self.cur["end"] = int(m.group("rts").rsplit(b",", 1)[-1])
        elif m.group("wb") is not None:
            self.flush_request()
            if self.experiments and m.group("wb"):
                self.experiments[-1].window_boundaries_ns = [int(x) for x in m.group("wb").split(b",")]
        elif m.group("oname") is not None and self.cur is not None:
            raw = m.group("oval").decode("utf-8", "replace")
            # a JSON string's escapes (a DECISION output is itself JSON): decoded as JSON decodes them
            self.cur["outputs"][m.group("oname").decode()] = json.loads(f'"{raw}"') if "\\" in raw else raw


def _stream_matches(f: BinaryIO, pat: re.Pattern[bytes], chunk_size: int) -> Iterator[re.Match[bytes]]:
    """Every match of ``pat`` in the stream, read ``chunk_size`` bytes at a time. A match starting in the last
    ``_TOKEN_MAX`` bytes of the buffer waits for the next chunk, so no token is cut at a chunk boundary."""
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
            yield m
            cut = m.end()
        if last:
            return
        buf = buf[max(cut, limit) :]


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
    scanner = _ProfileScanner()
    with contextlib.ExitStack() as stack:
        is_path = isinstance(source, str | os.PathLike)
        f = stack.enter_context(open(source, "rb")) if is_path else source  # noqa: SIM115
        for m in _stream_matches(f, pat, chunk_size):
            scanner.handle(m)
        scanner.flush_request()
    if not scanner.experiments:
        raise ValueError("not a perf_analyzer profile export: no experiment found")
    return scanner.experiments


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
