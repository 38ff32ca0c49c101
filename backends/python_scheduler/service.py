"""Execution scheduling: one scheduler ``execute`` call as plain Python.

``model.py`` hands over the batch of Triton requests as (parameters, input array) pairs and an ``infer`` callable
that runs a variant by BLS; this module groups requests with the same options, decides once per group
(batch-level decisions), concatenates their inputs into one BLS call, splits the logits back, and falls back
once to the next-ranked plan when the first variant of a plan fails. A cascade plan then re-runs the rows whose
confidence margin is below the stage's threshold on the next stage (one more BLS call per stage, with those rows
only): decisions per input row. A failed escalation keeps the rows' earlier logits and says so. Errors are
returned per request, never raised.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from tcsched.confidence import confidence_margin
from tcsched.manifest import Manifest
from tcsched.scheduler.live import LoadTracker, Periodic
from tcsched.scheduler.policy import (
    Decision,
    LiveState,
    Policy,
    RequestError,
    RequestOptions,
    parse_parameters,
    predicted_latency_ms,
)
from tcsched.settings import DEFAULTS, SchedulerSettings

log = logging.getLogger(__name__)

InferFn = Callable[[str, np.ndarray], np.ndarray]


class VariantUnavailable(RuntimeError):
    """A forced variant failed recently and is cooling down; answered at once (Triton UNAVAILABLE)."""


@dataclass
class Served:
    """The answer to one request: logits float32 [B, classes] and the decision that produced them.

    Per row: ``stage`` (int [B], index into ``decision.chain`` of the variant whose logits the row carries),
    ``margin`` (float [B], the first stage's confidence margin; ``None`` for a single-variant plan).
    ``escalation_note``: why fewer rows escalated than were below the threshold (latency budget, failure).
    """

    logits: np.ndarray
    decision: Decision
    fallback_from: str | None = None
    infer_ms: float = 0.0
    upstream_ms: float = 0.0
    stage: np.ndarray | None = None
    margin: np.ndarray | None = None
    escalation_note: str | None = None

    def row_variant(self, row: int) -> str:
        """The Triton model whose logits row ``row`` carries."""
        return self.decision.chain[0 if self.stage is None else int(self.stage[row])]

    def decision_json(self, row: int = 0) -> str:
        """Row ``row``'s decision as one JSON object (the DECISION output): variant (the one that answered the
        row), reason, code, cascade (label or null), escalated, confidence_margin (first stage's softmax top-1
        minus top-2), threshold (first stage's), target and expected agreement, escalation note, predicted and
        observed latency (ms), time already spent upstream (ms), fallback origin."""
        import json

        d = self.decision
        stage = 0 if self.stage is None else int(self.stage[row])
        return json.dumps(
            {
                "variant": self.row_variant(row),
                "reason": d.reason,
                "code": d.code,
                "cascade": d.cascade,
                "escalated": stage > 0,
                "confidence_margin": None if self.margin is None else round(float(self.margin[row]), 5),
                "threshold": round(d.thresholds[0], 5) if d.thresholds else None,
                "target_agreement": d.target_agreement,
                "expected_agreement": None
                if d.expected_agreement is None
                else round(d.expected_agreement, 5),
                "escalation_note": self.escalation_note,
                "predicted_latency_ms": None
                if d.predicted_latency_ms is None
                else round(d.predicted_latency_ms, 3),
                "observed_bls_ms": round(self.infer_ms, 3),
                "upstream_ms": round(self.upstream_ms, 3),
                "fallback_from": self.fallback_from,
            }
        )

    def decision_jsons(self) -> list[str]:
        """:meth:`decision_json` of every row."""
        return [self.decision_json(i) for i in range(len(self.logits))]


class Events:
    """Hooks for metrics; the defaults do nothing. ``model.py`` binds them to ``pb_utils.MetricFamily``."""

    def decision(self, variant: str, code: str, n: int) -> None: ...
    def fallback(self, from_variant: str, to_variant: str, n: int) -> None: ...
    def latency(self, variant: str, observed_ms: float, predicted_ms: float | None) -> None: ...
    def escalation(self, cascade: str, n: int) -> None: ...


@dataclass
class MetricsSnapshot:
    """Events summed since the last flush: counts per (variant, reason code) and per (from, to) fallback, escalations
    per cascade, and per variant the BLS latency (last and sum, ms; call count) and the last predicted latency (ms).
    ``bls_ms`` / ``predicted_ms``: every observation (ms) in order, for histograms."""

    decisions: dict[tuple[str, str], int] = field(default_factory=dict)
    fallbacks: dict[tuple[str, str], int] = field(default_factory=dict)
    escalations: dict[str, int] = field(default_factory=dict)
    bls_last_ms: dict[str, float] = field(default_factory=dict)
    bls_sum_ms: dict[str, float] = field(default_factory=dict)
    bls_calls: dict[str, int] = field(default_factory=dict)
    predicted_last_ms: dict[str, float] = field(default_factory=dict)
    bls_ms: dict[str, list[float]] = field(default_factory=dict)
    predicted_ms: dict[str, list[float]] = field(default_factory=dict)

    def empty(self) -> bool:
        return not (self.decisions or self.fallbacks or self.bls_calls or self.escalations)


class BatchedEvents(Events):
    """Sums events in memory and hands them to ``sink`` from a daemon thread every ``flush_interval_s`` seconds.

    The request path only updates a few dicts under a lock. Each ``pb_utils`` metric call is an IPC round trip from
    the Python-backend stub to the server: five per batch cost +0.2 ms of the scheduler's p50 at concurrency 1
    (int8, 2-core CPU, 600 rounds in shuffled order beside the same model without metrics, which this class
    matches within noise); summed and flushed a few times a second they leave the request path.
    Metrics therefore lag by at most ``flush_interval_s`` (Prometheus scrapes every 15 s by default). An exception
    in ``sink`` is logged and does not stop the thread. :meth:`close` flushes what is left and stops.

    Raises:
        ValueError: ``flush_interval_s`` not > 0.
    """

    def __init__(self, sink: Callable[[MetricsSnapshot], None], flush_interval_s: float = 0.25):
        if not flush_interval_s > 0:
            raise ValueError(f"flush_interval_s must be > 0, got {flush_interval_s}")
        self.sink = sink
        self.flush_interval_s = flush_interval_s
        self._lock = threading.Lock()
        self._snap = MetricsSnapshot()
        self._loop = Periodic(self.flush, flush_interval_s, "tcsched-metrics")

    def decision(self, variant: str, code: str, n: int) -> None:
        with self._lock:
            d = self._snap.decisions
            d[variant, code] = d.get((variant, code), 0) + n

    def fallback(self, from_variant: str, to_variant: str, n: int) -> None:
        with self._lock:
            f = self._snap.fallbacks
            f[from_variant, to_variant] = f.get((from_variant, to_variant), 0) + n

    def escalation(self, cascade: str, n: int) -> None:
        with self._lock:
            e = self._snap.escalations
            e[cascade] = e.get(cascade, 0) + n

    def latency(self, variant: str, observed_ms: float, predicted_ms: float | None) -> None:
        with self._lock:
            s = self._snap
            s.bls_last_ms[variant] = observed_ms
            s.bls_sum_ms[variant] = s.bls_sum_ms.get(variant, 0.0) + observed_ms
            s.bls_calls[variant] = s.bls_calls.get(variant, 0) + 1
            s.bls_ms.setdefault(variant, []).append(observed_ms)
            if predicted_ms is not None:
                s.predicted_last_ms[variant] = predicted_ms
                s.predicted_ms.setdefault(variant, []).append(predicted_ms)

    def flush(self) -> None:
        """Hand what was summed since the last flush to ``sink`` (nothing when there is nothing)."""
        with self._lock:
            snap, self._snap = self._snap, MetricsSnapshot()
        if snap.empty():
            return
        try:
            self.sink(snap)
        except Exception:  # noqa: BLE001 - a metric must never take serving down
            log.exception("metrics sink failed")

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the thread (waits at most ``timeout_s`` seconds), then flush what is left."""
        self._loop.stop(timeout_s)
        self.flush()


class SchedulerService:
    def __init__(
        self,
        policy: Policy,
        defaults: RequestOptions,
        infer: InferFn,
        max_attempts: int = DEFAULTS.max_attempts,
        load: LoadTracker | None = None,
        events: Events | None = None,
        upstream_ms: Callable[[], float] | None = None,
    ):
        self.policy = policy
        self.defaults = defaults
        self.infer = infer
        self.max_attempts = max_attempts
        self.load = load or LoadTracker()
        self.events = events or Events()
        # time requests already spent before the scheduler (ms), e.g. UpstreamProbe.wait_ms; None: 0
        self.upstream_ms = upstream_ms
        self.fallbacks = 0

    @classmethod
    def from_settings(
        cls,
        manifest: Manifest,
        settings: SchedulerSettings,
        infer: InferFn,
        events: Events | None = None,
        upstream_ms: Callable[[], float] | None = None,
    ) -> SchedulerService:
        """The service as the scheduler model runs it: policy, live state, load tracker and request defaults
        all from one :class:`tcsched.settings.SchedulerSettings`."""
        return cls(
            Policy(
                manifest,
                LiveState(cooldown_s=settings.unhealthy_cooldown_s),
                latency_headroom=settings.latency_headroom,
                max_utilization=settings.max_utilization,
            ),
            RequestOptions.from_settings(settings),
            infer,
            max_attempts=settings.max_attempts,
            load=LoadTracker(
                alpha=settings.latency_ewma_alpha,
                arrival_window_ms=settings.arrival_window_ms,
                offset_ttl_s=settings.offset_ttl_s,
            ),
            events=events,
            upstream_ms=upstream_ms,
        )

    def handle(self, requests: Sequence[tuple[Mapping[str, object], np.ndarray]]) -> list[Served | Exception]:
        """Serve a batch of requests; element ``i`` of the result answers request ``i``.

        Each request is (Triton request parameters, float32 [B_i, 3, H, W]). An element is an Exception
        (``RequestError`` for bad parameters, ``RuntimeError`` when every attempt failed) for that request only.
        """
        t_exec = time.perf_counter()
        out: list[Served | Exception | None] = [None] * len(requests)
        groups: dict[RequestOptions, list[int]] = {}
        for i, (params, _) in enumerate(requests):
            try:
                opts = parse_parameters(params, self.defaults)
            except RequestError as e:
                out[i] = e
                continue
            groups.setdefault(opts, []).append(i)

        up = self.upstream_ms() if self.upstream_ms is not None else 0.0
        for opts, idx in groups.items():
            self._serve_group(requests, idx, opts, up, out)
        images = sum(len(x) for _, x in requests)
        self.load.observe_execute((time.perf_counter() - t_exec) * 1e3, images, t_exec)
        return out  # type: ignore[return-value]

    def _serve_group(self, requests, idx: list[int], opts: RequestOptions, up: float, out):
        """One decision for the requests ``idx`` (same options), one BLS call per stage; results into ``out``."""
        t_group = time.perf_counter()
        batch = requests[idx[0]][1] if len(idx) == 1 else np.concatenate([requests[i][1] for i in idx])
        try:
            ranked = self.policy.rank(opts, batch_size=len(batch), load=self.load, upstream_ms=up)
        except RequestError as e:
            for i in idx:
                out[i] = e
            return
        attempts = ranked[: 1 if opts.variant is not None else self.max_attempts]
        state = self.policy.state
        if opts.variant is not None and not state.may_probe(attempts[0].variant):
            err = VariantUnavailable(
                f"variant {attempts[0].variant} failed recently ({state.last_error.get(attempts[0].variant, '')}); "
                f"it is tried again within {state.probe_interval_s:g} s"
            )
            for i in idx:
                out[i] = err
            return
        errors: list[str] = []
        for k, decision in enumerate(attempts):
            try:
                logits, stage, margin, note, ms = self._run(decision, batch, t_group)
            except Exception as e:  # a failing variant must not fail the request while another can serve
                errors.append(f"{decision.variant}: {e}")
                self.policy.state.mark_unhealthy(decision.variant, error=str(e)[:200])
                log.warning("variant %s failed (%s); marked unhealthy", decision.variant, e)
                continue
            if opts.variant is not None:
                state.mark_healthy(decision.variant)  # a forced probe that succeeded ends the cooldown
            self.events.decision(decision.variant, decision.code, len(idx))
            if k > 0:
                self.fallbacks += 1
                self.events.fallback(attempts[0].variant, decision.variant, len(idx))
            start = 0
            for i in idx:
                n = len(requests[i][1])
                rows = slice(start, start + n)
                out[i] = Served(
                    logits[rows],
                    decision,
                    attempts[0].variant if k else None,
                    ms,
                    up,
                    stage=None if stage is None else stage[rows],
                    margin=None if margin is None else margin[rows],
                    escalation_note=note,
                )
                start += n
            return
        err = RuntimeError("every attempted variant failed: " + "; ".join(errors))
        for i in idx:
            out[i] = err

    def _call(self, variant: str, x: np.ndarray, predicted_ms: float | None) -> tuple[np.ndarray, float]:
        """One BLS call with load tracking; (logits, ms). Raises what ``infer`` raises."""
        t0 = self.load.begin(len(x))
        try:
            logits = self.infer(variant, x)
        finally:
            self.load.end(len(x))
        ms = (time.perf_counter() - t0) * 1e3
        service = predicted_latency_ms(self.policy.manifest.variant(variant), len(x))
        self.load.observe_variant(variant, ms, service)
        self.events.latency(variant, ms, predicted_ms)
        return logits, ms

    def _run(self, decision: Decision, batch: np.ndarray, t_group: float):
        """Run a plan: the first stage on every row, then each later stage on the rows still below their
        stage's threshold (at most as many as :meth:`Policy.escalation_allowance` allows, lowest margins first).

        Returns:
            (logits [B, classes], stage int [B] or None, first-stage margin [B] or None, note or None, BLS ms).

        Raises:
            whatever the first stage's BLS call raises (the caller falls back to the next plan).
        """
        chain = decision.chain
        logits, total_ms = self._call(chain[0], batch, decision.predicted_latency_ms)
        if len(chain) == 1:
            return logits, None, None, None, total_ms
        logits = np.array(logits, copy=True)
        stage = np.zeros(len(batch), dtype=np.int64)
        margin = confidence_margin(logits)
        rows, cur = np.arange(len(batch)), margin
        note = None
        for j, threshold in enumerate(decision.thresholds):
            low = np.nonzero(cur < threshold)[0]
            if not len(low):
                break
            spent = (time.perf_counter() - t_group) * 1e3
            allowed = self.policy.escalation_allowance(decision, j + 1, len(low), spent, self.load)
            if allowed < len(low):
                note = (
                    f"escalation limited by the latency budget: {allowed} of {len(low)} rows below the "
                    f"threshold went on to {chain[j + 1]}"
                )
                low = low[np.argsort(cur[low], kind="stable")[:allowed]]
            if not len(low):
                break
            nxt = rows[low]
            try:
                more, ms = self._call(chain[j + 1], batch[nxt], None)
            except Exception as e:  # noqa: BLE001 - the rows keep the earlier stage's logits
                self.policy.state.mark_unhealthy(chain[j + 1], error=str(e)[:200])
                log.warning("escalation to %s failed (%s); marked unhealthy", chain[j + 1], e)
                note = f"escalation to {chain[j + 1]} failed ({e}); those rows kept {chain[j]}'s logits"
                break
            total_ms += ms
            logits[nxt] = more
            stage[nxt] = j + 1
            self.events.escalation(decision.cascade or "cascade", len(nxt))
            rows, cur = nxt, (confidence_margin(more) if j + 1 < len(decision.thresholds) else None)
            if cur is None:
                break
        return logits, stage, margin, note, total_ms
