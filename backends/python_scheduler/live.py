"""Execution scheduling: what the scheduler observes online. Plain Python (numpy), no Triton import.

- :class:`LoadTracker`: requests in flight, an EWMA of each variant's observed BLS time relative to the build's
  profile, an EWMA of the scheduler's own execute time (the wait a newly arriving request sees), and the queue
  model (M/M/c over each variant's instances, :func:`erlang_c`; :func:`instance_counts` reads them).
- :class:`UpstreamProbe`: the time requests spent recently in the models before the scheduler (``preprocess``:
  its queue and its work), read from Triton's own Prometheus metrics; the latency budget a request has left.
- :func:`gpu_state`: NVML utilisation and memory when a GPU exists; ``None`` on a CPU (pynvml imported lazily).
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tcsched.prometheus import sum_metric as sum_metric  # re-exported
from tcsched.settings import DEFAULTS

log = logging.getLogger(__name__)


@dataclass
class LoadTracker:
    """Thread-safe online load state.

    ``offset_ms[v]``: EWMA of observed BLS ms minus the manifest's predicted ms for variant ``v``: corrects the
    offline profile for the serving process (IPC and stub overhead, contention). The overhead is mostly the same
    for every variant, so a variant not observed yet inherits ``global_offset_ms`` (the EWMA over all): a
    per-variant ratio would make every observed variant look worse than the unobserved ones. A variant's own
    offset expires ``offset_ttl_s`` after its last observation (then the global one applies again).
    ``execute_ms``: EWMA of the scheduler's own execute duration, the time a request arriving now waits before
    its batch starts (one scheduler instance executes one batch at a time).
    ``arrival_per_ms``: images that reached the scheduler in the last ``arrival_window_ms``, per ms. A sliding
    window, not a per-execute rate: under a closed-loop load the gaps between executes vary 10x, and a rate
    taken per gap swings with them.
    """

    alpha: float = DEFAULTS.latency_ewma_alpha
    offset_ttl_s: float = DEFAULTS.offset_ttl_s
    offset_ms: dict[str, float] = field(default_factory=dict)
    # variant -> time.monotonic() of its last observation (when its own offset expires)
    seen_at: dict[str, float] = field(default_factory=dict)
    global_offset_ms: float | None = None
    observed_ms: dict[str, float] = field(default_factory=dict)
    execute_ms: float = 0.0
    arrival_per_ms: float = 0.0  # images per ms reaching the scheduler, over the last arrival_window_ms
    arrival_window_ms: float = DEFAULTS.arrival_window_ms
    in_flight: int = 0
    # variant -> model instances that serve it (sum of its config's instance_group counts; 1 when unknown)
    instances: dict[str, int] = field(default_factory=dict)
    # scheduler instances the arrivals are spread over: each instance sees about 1/n of them
    scheduler_instances: int = 1
    _arrivals: deque = field(default_factory=deque, repr=False)  # (start s, images), oldest first
    _arrived: int = 0  # images in _arrivals
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def _ewma(self, old: float | None, new: float) -> float:
        return new if old is None else (1 - self.alpha) * old + self.alpha * new

    def observe_variant(
        self, variant: str, observed_ms: float, predicted_ms: float | None, now: float | None = None
    ) -> None:
        with self._lock:
            self.seen_at[variant] = time.monotonic() if now is None else now
            self.observed_ms[variant] = self._ewma(self.observed_ms.get(variant), observed_ms)
            if predicted_ms is not None and predicted_ms > 0:
                d = max(-0.9 * predicted_ms, observed_ms - predicted_ms)
                self.offset_ms[variant] = self._ewma(self.offset_ms.get(variant), d)
                self.global_offset_ms = self._ewma(self.global_offset_ms, d)

    def observe_execute(self, ms: float, images: int = 0, start: float | None = None) -> None:
        """One scheduler execute of ``images`` images that began at ``start`` (``time.perf_counter()``, s) and
        took ``ms``: updates the execute-time EWMA and the arrival rate over the last ``arrival_window_ms``."""
        with self._lock:
            self.execute_ms = self._ewma(self.execute_ms if self.execute_ms else None, ms)
            if start is not None and images:
                self._arrivals.append((start, images))
                self._arrived += images
                horizon = start - self.arrival_window_ms / 1e3
                while self._arrivals and self._arrivals[0][0] <= horizon:
                    self._arrived -= self._arrivals.popleft()[1]
                self.arrival_per_ms = self._arrived / self.arrival_window_ms

    def predicted_ms(
        self,
        variant: str,
        service_ms: float,
        batch_size: int,
        max_utilization: float = 0.95,
        now: float | None = None,
        share: float = 1.0,
    ) -> float:
        """Queue + service (ms) for ``variant`` at ``share`` of the current arrival rate (a cascade's later stage
        sees only the rows that reach it: its reach rate), as an M/M/c queue with c =
        ``instances[variant]`` (1 when unknown): offered load a = rate x service per image (rate: the arrivals
        this scheduler instance sees x ``scheduler_instances``), utilisation u = a / c, waiting = C(c, a) x
        service / (c (1 - u)) with C the Erlang C probability of waiting (Kleinrock, Queueing Systems vol. 1,
        1975, section 3.5); for c = 1 that is service x u / (1 - u), the M/M/1 wait. u above
        ``max_utilization`` means the variant cannot keep up: 100x its service time."""
        service = self.service_ms(variant, service_ms, now)
        c = max(1, self.instances.get(variant, 1))
        a = self.arrival_per_ms * max(1, self.scheduler_instances) * share * service / max(1, batch_size)
        u = a / c
        if u >= max_utilization:
            return 100.0 * service
        return service + erlang_c(c, a) * service / (c * (1.0 - u))

    def service_ms(self, variant: str, profiled_ms: float, now: float | None = None) -> float:
        """The profile's ms corrected by the observed offset: the variant's own if it was observed in the last
        ``offset_ttl_s`` seconds, else the global one. A variant's offset is only updated when it serves, so
        without the expiry one slow spell would keep a variant unchosen (and its offset stale) for good; the
        scheduler then served int8_mixed for whole runs of `tcsched ramp` where int8 was the better choice."""
        now = time.monotonic() if now is None else now
        own = self.offset_ms.get(variant)
        fresh = own is not None and now - self.seen_at.get(variant, -math.inf) <= self.offset_ttl_s
        off = own if fresh else (self.global_offset_ms or 0.0)
        return max(0.1 * profiled_ms, profiled_ms + off)

    def begin(self, n: int) -> float:
        with self._lock:
            self.in_flight += n
        return time.perf_counter()

    def end(self, n: int) -> None:
        with self._lock:
            self.in_flight = max(0, self.in_flight - n)


def erlang_c(c: int, a: float) -> float:
    """Probability that an arrival waits in an M/M/c queue with ``c`` servers and offered load ``a`` (arrival
    rate x mean service time), for ``a < c``: Erlang's C formula, computed from the Erlang B recursion
    B(0) = 1, B(k) = a B(k-1) / (k + a B(k-1)) and C = B(c) / (1 - (a / c)(1 - B(c))) (Kleinrock, Queueing
    Systems vol. 1, 1975, eqs. 3.42 and 3.46). ``erlang_c(1, a) == a``.

    Raises:
        ValueError: ``c`` < 1, or ``a`` negative or not below ``c`` (no steady state).
    """
    if c < 1:
        raise ValueError(f"need at least one server, got c={c}")
    if not 0 <= a < c:
        raise ValueError(f"offered load must be in [0, c={c}), got {a}")
    b = 1.0
    for k in range(1, c + 1):
        b = a * b / (k + a * b)
    return b / (1.0 - (a / c) * (1.0 - b))


def instance_counts(repository: str | os.PathLike, models: Sequence[str]) -> dict[str, int]:
    """Model instances of each of ``models`` from ``<repository>/<model>/config.pbtxt``: the sum of its
    ``instance_group`` counts (``count`` defaults to 1; a group naming ``gpus`` has ``count`` on each of them, as
    in Triton's model_config.proto). A model without config, without instance groups, or whose config cannot be
    read counts 1 (logged), so the queue model falls back to M/M/1. Read once at the scheduler's load: a model
    reloaded later with other counts (e.g. by Model Analyzer through the repository API) needs a scheduler
    reload to be seen.
    """
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2 as mc
    except ImportError as e:  # tritonclient is a dependency of tcsched; kept safe for a bare server image
        log.warning("cannot read instance counts (%s); assuming 1 instance per variant", e)
        return dict.fromkeys(models, 1)
    out = {}
    for m in models:
        path = Path(repository) / m / "config.pbtxt"
        try:
            cfg = text_format.Parse(path.read_text(), mc.ModelConfig())
        except (OSError, text_format.ParseError) as e:
            log.warning("instances of %s: cannot read %s (%s); assuming 1", m, path, e)
            out[m] = 1
            continue
        n = sum(max(1, g.count or 1) * max(1, len(g.gpus)) for g in cfg.instance_group)
        out[m] = max(1, n)
    return out


@dataclass(frozen=True)
class GpuState:
    utilization_percent: float
    memory_used_bytes: int
    memory_total_bytes: int


_nvml_failed = False
_last_reading: tuple[float, GpuState | None] | None = None


def gpu_state(index: int = 0, max_age_s: float = 1.0) -> GpuState | None:
    """NVML reading of GPU ``index``, at most one query per ``max_age_s`` (callers sit on the serving path; NVML
    samples utilisation over ~1/6 s to 1 s anyway); ``None`` without a GPU or NVML (never raises)."""
    global _last_reading
    now = time.monotonic()
    if _last_reading is not None and now - _last_reading[0] < max_age_s:
        return _last_reading[1]
    reading = _query_gpu(index)
    _last_reading = (now, reading)
    return reading


def _query_gpu(index: int) -> GpuState | None:
    global _nvml_failed
    if _nvml_failed:
        return None
    try:
        import pynvml

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(index)
        util = pynvml.nvmlDeviceGetUtilizationRates(h)
        mem = pynvml.nvmlDeviceGetMemoryInfo(h)
        return GpuState(float(util.gpu), int(mem.used), int(mem.total))
    except Exception:  # noqa: BLE001 - no GPU, no driver, no pynvml: the CPU case
        _nvml_failed = True
        return None


class Periodic:
    """Calls ``fn()`` every ``interval_s`` seconds from a daemon thread named ``name`` until :meth:`stop`.

    The background loop of :class:`UpstreamProbe` and :class:`tcsched.scheduler.service.BatchedEvents`; ``fn``
    handles its own errors (an exception ends the thread).
    """

    def __init__(self, fn, interval_s: float, name: str):
        self._fn = fn
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self._fn()

    def stop(self, timeout_s: float) -> None:
        """Stop the loop; waits at most ``timeout_s`` seconds for a call in progress to end."""
        self._stop.set()
        self._thread.join(timeout_s)


class UpstreamProbe:
    """The mean time (ms) that requests completed in the last ``interval_s`` spent in the ``models`` upstream of
    the scheduler, from Triton's cumulative counters ``nv_inference_request_duration_us`` (queue + compute of a
    request in a model) and ``nv_inference_request_success``: delta duration / delta count between two scrapes of
    ``metrics_url`` (Triton metrics, docs/user_guide/metrics.md). A scrape with no completed request reads 0 (idle).

    The scheduler cannot see how long a request has already waited before it (Triton's Python backend exposes no
    arrival time), yet under overload most of the client's latency is spent in ``preprocess``'s queue; the policy
    subtracts this from the latency budget. A thread scrapes; :meth:`wait_ms` only reads a float. An unreachable
    endpoint reads 0 (logged once), so the scheduler never fails because of it.

    Raises:
        ValueError: no model named, or ``interval_s`` not > 0.
    """

    DURATION = "nv_inference_request_duration_us"
    COUNT = "nv_inference_request_success"

    def __init__(
        self,
        metrics_url: str,
        models: Sequence[str],
        interval_s: float = 0.2,
        timeout_s: float = 0.5,
        fetch=None,
    ):
        if not models:
            raise ValueError("UpstreamProbe needs at least one upstream model name")
        if not interval_s > 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.metrics_url = metrics_url
        self.models = tuple(models)
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self._fetch = fetch or self._http_get
        self._last: tuple[float, float] | None = None
        self._wait_ms = 0.0
        self._warned = False
        self._loop = Periodic(self.poll, interval_s, "tcsched-upstream")

    def _http_get(self) -> str:
        import urllib.request

        with urllib.request.urlopen(self.metrics_url, timeout=self.timeout_s) as r:
            return r.read().decode()

    def poll(self) -> float:
        """Scrape once and update :meth:`wait_ms`; returns it."""
        try:
            text = self._fetch()
            now = (sum_metric(text, self.DURATION, self.models), sum_metric(text, self.COUNT, self.models))
        except Exception as e:  # noqa: BLE001 - no (or no valid) metrics endpoint: no upstream correction
            if not self._warned:
                log.warning(
                    "upstream probe: cannot read %s (%s); no upstream wait assumed", self.metrics_url, e
                )
                self._warned = True
            self._last, self._wait_ms = None, 0.0
            return 0.0
        if self._last is not None:
            d_us, d_n = now[0] - self._last[0], now[1] - self._last[1]
            self._wait_ms = d_us / d_n / 1e3 if d_n > 0 and d_us >= 0 else 0.0
        self._last = now
        return self._wait_ms

    def wait_ms(self) -> float:
        """Mean ms spent upstream by the requests completed in the last interval (0 when idle or unknown)."""
        return self._wait_ms

    def close(self, timeout_s: float = 2.0) -> None:
        self._loop.stop(timeout_s)
