"""Execution scheduling: the variant-selection policy. Pure Python, no Triton import; unit-tested rule by rule.

Inputs: the manifest (measured accuracy drop and latency per variant), the request's parameters, and the live
state kept by :class:`LiveState` (variant health). Output: a :class:`Decision` with the variant, the predicted
latency and the reason, which goes back to the client.

Request parameters (Triton request parameters, e.g. ``client.infer(..., parameters={...})``):

``variant``            force one variant (its Triton model name, or its precision such as ``int8``)
``min_agreement``      target top-1 agreement with fp32, a fraction in (0, 1]: served by a confidence cascade
                       calibrated to it (default: the scheduler's ``default_min_agreement``, 0.99)
``accuracy_budget``    maximum top-1 drop vs fp32 the caller accepts, percentage points, >= 0; given without
                       ``min_agreement`` it asks for one variant per request (no cascade)
``latency_budget_ms``  latency target, milliseconds, > 0
``objective``          ``min_latency`` or ``max_accuracy``; default: ``max_accuracy`` when a latency budget is
                       given (the most accurate plan that fits it), else ``min_latency``

Cascades (``min_agreement`` set and the manifest has calibrated cascades): rule 0, before the rules below, in
:mod:`tcsched.scheduler.cascades`.

Predicted latency of variant v for a batch of B images = queue + service:
  service = the build's measured p50 at batch B (interpolated) x the EWMA of observed/predicted BLS time of v
  (so the profile is corrected for the serving process); queue = service x u / (1 - u) with the utilisation
  u = arrival rate x service per image (M/M/1), so a variant that cannot keep up with the current load is
  predicted slow before its queue has grown. From :class:`tcsched.scheduler.live.LoadTracker`.

Rules, in order:
  1. ``variant`` given: that variant (unknown name -> error naming the known ones).
  2. candidates = healthy variants that the runtime executes natively (not emulated: fp16 on a CPU is out) and
     that are on the build's accuracy-latency front (:meth:`Policy.servable`).
  3. ``min_latency``: the fastest candidate whose measured top-1 drop <= ``accuracy_budget``.
     ``max_accuracy``: the most accurate candidate (highest measured top-1 agreement with fp32, then lowest
     KL; within the accuracy budget) whose predicted latency, plus
     the time the request already spent upstream (``preprocess``, from Triton's metrics), fits
     ``latency_budget_ms`` x ``latency_headroom``.
  4. Nothing fits: ``min_latency`` degrades to the most accurate candidate (accuracy is never traded away
     beyond the budget); ``max_accuracy`` degrades to the fastest candidate within the accuracy budget, else the
     fastest. The reason says which degradation happened.
  5. The remaining candidates follow as fallbacks, most accurate first (used when the chosen variant fails).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

from tcsched.engines.capabilities import cpu_capabilities, missing_capabilities
from tcsched.manifest import Manifest, VariantEntry
from tcsched.scheduler.cascades import rank_cascades
from tcsched.scheduler.live import LoadTracker
from tcsched.scheduler.options import (
    KNOWN_PARAMETERS,
    OBJECTIVES,
    Decision,
    Objective,
    RequestError,
    RequestOptions,
    parse_parameters,
    quote,
)
from tcsched.settings import DEFAULTS

__all__ = [
    "KNOWN_PARAMETERS",
    "OBJECTIVES",
    "Decision",
    "LiveState",
    "Objective",
    "Policy",
    "RequestError",
    "RequestOptions",
    "parse_parameters",
    "predicted_latency_ms",
    "quote",
]


def predicted_latency_ms(entry: VariantEntry, batch_size: int) -> float | None:
    """Measured p50 at ``batch_size``, linearly interpolated between measured batch sizes (extrapolated
    proportionally above the largest). ``None`` when the variant has no latency profile."""
    if entry.latency is None or not entry.latency.p50_ms_by_batch:
        return None
    pts = sorted(entry.latency.p50_ms_by_batch.items())
    if batch_size <= pts[0][0]:
        return pts[0][1]
    for (b0, t0), (b1, t1) in zip(pts, pts[1:], strict=False):
        if b0 <= batch_size <= b1:
            return t0 + (t1 - t0) * (batch_size - b0) / (b1 - b0)
    b, t = pts[-1]
    return t * batch_size / b


@dataclass
class LiveState:
    """Mutable online state: variants marked unhealthy until a monotonic deadline, with their last error.

    A request that forces an unhealthy variant is answered at once (:meth:`may_probe` false) instead of waiting on
    a dead model: a Python-backend stub that died makes each call wait its 1 s message timeout
    (python_backend r24.10 ``StubLauncher::ReceiveMessageFromStub``). One forced request per
    ``probe_interval_s`` still goes through, so a recovered variant is noticed.
    """

    cooldown_s: float = DEFAULTS.unhealthy_cooldown_s
    probe_interval_s: float = 1.0
    unhealthy_until: dict[str, float] = field(default_factory=dict)
    last_error: dict[str, str] = field(default_factory=dict)
    next_probe: dict[str, float] = field(default_factory=dict)

    def mark_unhealthy(self, variant: str, now: float | None = None, error: str = "") -> None:
        t = time.monotonic() if now is None else now
        self.unhealthy_until[variant] = t + self.cooldown_s
        self.next_probe[variant] = t + self.probe_interval_s
        if error:
            self.last_error[variant] = error

    def mark_healthy(self, variant: str) -> None:
        self.unhealthy_until.pop(variant, None)
        self.next_probe.pop(variant, None)

    def may_probe(self, variant: str, now: float | None = None) -> bool:
        """True when ``variant`` is healthy, or its next probe is due (which this call then uses up)."""
        t = time.monotonic() if now is None else now
        if self.healthy(variant, t):
            return True
        if t >= self.next_probe.get(variant, 0.0):
            self.next_probe[variant] = t + self.probe_interval_s
            return True
        return False

    def healthy(self, variant: str, now: float | None = None) -> bool:
        return (time.monotonic() if now is None else now) >= self.unhealthy_until.get(variant, 0.0)


class Policy:
    """Chooses a variant for a batch of identical options. Stateless apart from :class:`LiveState`.

    ``latency_headroom``: a variant fits a latency budget when its predicted latency is at most this fraction of
    it; the prediction covers the scheduler's queue and the variant, not the preprocessing step and the network
    before it (measured on 2 shared cores: ~0.3 of the end-to-end time under load).
    ``max_utilization``: above it a variant is taken as unable to keep up with the arrival rate.
    """

    def __init__(
        self,
        manifest: Manifest,
        state: LiveState | None = None,
        latency_headroom: float = DEFAULTS.latency_headroom,
        max_utilization: float = DEFAULTS.max_utilization,
        cpu: list[str] | None = None,
    ):
        if not 0 < latency_headroom <= 1 or not 0 < max_utilization < 1:
            raise ValueError(
                f"latency_headroom must be in (0, 1] and max_utilization in (0, 1), got {latency_headroom}, "
                f"{max_utilization}"
            )
        self.manifest = manifest
        self.state = state or LiveState()
        self.latency_headroom = latency_headroom
        self.max_utilization = max_utilization
        self.reference = manifest.variant(manifest.reference_variant).name
        # variants needing a CPU capability the serving CPU lacks (bf16 built on a bf16 CPU, served on one
        # without): treated like emulated fp16. ``cpu``: the serving CPU's capability names (default: this one's,
        # tcsched.engines.capabilities, read only when some variant requires one)
        self.lacking_cpu: dict[str, list[str]] = {}
        if any(e.requires_cpu for e in manifest.variants):
            have = cpu if cpu is not None else cpu_capabilities().to_list()
            for e in manifest.variants:
                if missing := missing_capabilities(e.requires_cpu, have):
                    self.lacking_cpu[e.name] = missing
                    logging.getLogger(__name__).warning(
                        "%s was built on a CPU with %s, which this CPU lacks: not chosen for speed (like "
                        "emulated fp16); a client may still force it",
                        e.name,
                        ", ".join(missing),
                    )

    def runnable(self, e: VariantEntry) -> bool:
        """Does ``e`` run natively here: not emulated, and the serving CPU has the capabilities it was built for
        (:attr:`lacking_cpu`). A calibrated cascade may use any runnable variant as a stage. On a GPU target the
        GPU build's own profile decides (every precision runs natively there)."""
        if self.manifest.target == "gpu":
            return True
        return e.serve_on_cpu_for_speed and e.name not in self.lacking_cpu

    def servable(self, e: VariantEntry) -> bool:
        """May the scheduler choose ``e`` on its own: runnable (:meth:`runnable`) and on the accuracy-latency
        front."""
        return self.runnable(e) and (self.manifest.target == "gpu" or e.on_pareto_front)

    def predict(
        self,
        e: VariantEntry,
        batch_size: int,
        load: LoadTracker | None = None,
        now: float | None = None,
        share: float = 1.0,
    ) -> float | None:
        """Queue + service ms of ``e`` at ``batch_size`` under the live ``load`` (profile only without it), when
        ``share`` of the arrivals reach ``e``; ``None`` without a latency profile. 0 rows cost 0 ms."""
        if batch_size <= 0:
            return 0.0
        service = predicted_latency_ms(e, batch_size)
        if service is None or load is None:
            return service
        return load.predicted_ms(
            e.name, service, batch_size, max_utilization=self.max_utilization, now=now, share=share
        )

    def escalation_allowance(
        self,
        decision: Decision,
        stage: int,
        wanted: int,
        spent_ms: float,
        load: LoadTracker | None = None,
        now: float | None = None,
    ) -> int:
        """How many of the ``wanted`` rows below the threshold may go on to ``decision.chain[stage]``: all of
        them without a latency budget, else the most whose predicted time fits what is left of
        ``decision.escalation_budget_ms`` after ``spent_ms``. Fewer ms left never allows more rows (monotone)."""
        if decision.escalation_budget_ms is None or wanted <= 0:
            return max(0, wanted)
        left = decision.escalation_budget_ms - spent_ms
        e = self.manifest.variant(decision.chain[stage])
        share = decision.reach_rates[stage] if stage < len(decision.reach_rates) else 1.0
        for k in range(wanted, 0, -1):
            t = self.predict(e, k, load, now, share=share)
            if t is not None and t <= left:
                return k
        return 0

    def _kl(self, e: VariantEntry) -> float:
        if e.name == self.reference:
            return 0.0
        return e.accuracy.kl_vs_fp32 if e.accuracy is not None else math.inf

    def _agreement(self, e: VariantEntry) -> float:
        if e.name == self.reference:
            return 1.0
        return e.accuracy.agreement_with_fp32 if e.accuracy is not None else -math.inf

    def _drop(self, e: VariantEntry) -> float:
        if e.name == self.reference:
            return 0.0
        return e.accuracy.top1_drop_points if e.accuracy is not None else math.inf

    def rank(
        self,
        opts: RequestOptions,
        batch_size: int = 1,
        now: float | None = None,
        load: LoadTracker | None = None,
        upstream_ms: float = 0.0,
    ) -> list[Decision]:
        """Every usable variant, best first, each with the reason it holds that place.

        The first is the decision; the rest are the fallbacks in order. ``upstream_ms``: time the request has
        already spent before the scheduler (``preprocess``'s queue and work, ms; see
        :class:`tcsched.scheduler.live.UpstreamProbe`): ``max_accuracy`` fits ``upstream_ms`` + predicted latency
        into the latency budget.

        Raises:
            RequestError: ``opts.variant`` names no variant.
        """
        m = self.manifest

        def predict(e: VariantEntry) -> float | None:
            return self.predict(e, batch_size, load, now)

        if opts.variant is not None:
            try:
                forced = m.variant(opts.variant)
            except KeyError as e:
                raise RequestError(f"parameter 'variant': {e.args[0]}") from None
            return [Decision(forced.name, "forced by the 'variant' parameter", predict(forced), "forced")]

        if opts.min_agreement is not None and m.cascades:
            return rank_cascades(self, opts, batch_size, now, load, upstream_ms)
        usable = [e for e in m.variants if self.servable(e)]
        healthy = [e for e in usable if self.state.healthy(e.name, now)]
        pool = healthy or usable  # all unhealthy: try anyway rather than fail
        lat = {e.name: predict(e) for e in pool}
        # most accurate first: the measured top-1 agreement with fp32 (the fidelity the scheduler trades for
        # speed, and what the served accuracy is judged by), ties broken by the KL vs fp32, then speed. Not the
        # top-1 drop, which is the accuracy budget's filter: on a few hundred labelled images two int8 variants'
        # drops and agreements can order them opposite ways (README, "Measured here").
        by_accuracy = sorted(
            pool, key=lambda e: (-self._agreement(e), self._kl(e), self._drop(e), _ms(lat, e))
        )
        within_acc = [e for e in pool if self._drop(e) <= opts.accuracy_budget_points]
        if opts.resolved_objective == "min_latency":
            ordered = self._min_latency(opts, within_acc, by_accuracy, lat)
        else:
            ordered = self._max_accuracy(opts, pool, within_acc, by_accuracy, lat, upstream_ms)
        seen = {d.variant for d in ordered}
        for e in by_accuracy:  # fallbacks: the rest, most accurate first
            if e.name not in seen:
                ordered.append(Decision(e.name, "fallback", lat[e.name], "fallback"))
                seen.add(e.name)
        return ordered

    def _min_latency(self, opts, within_acc, by_accuracy, lat) -> list[Decision]:
        """Rule 3/4, ``min_latency``: the candidates within the accuracy budget, fastest first; none: the most
        accurate."""
        budget = opts.accuracy_budget_points
        ordered = [
            Decision(e.name, f"fastest within accuracy budget {budget:g} points", lat[e.name], "min_latency")
            for e in sorted(within_acc, key=lambda e: _ms(lat, e))
        ]
        if not ordered:
            e = by_accuracy[0]
            ordered.append(
                Decision(
                    e.name,
                    f"no variant within accuracy budget {budget:g} points: most accurate",
                    lat[e.name],
                    "degraded_accuracy",
                )
            )
        return ordered

    def _max_accuracy(self, opts, pool, within_acc, by_accuracy, lat, upstream_ms: float) -> list[Decision]:
        """Rule 3/4, ``max_accuracy``: the candidates within the accuracy budget whose predicted latency plus
        the upstream time fits the budget, most accurate first; none: the fastest acceptable."""
        lb = opts.latency_budget_ms
        up = max(0.0, upstream_ms)
        up_note = f" ({up:.1f} ms already spent upstream)" if up > 0 else ""
        ordered = []
        for e in by_accuracy:
            if e in within_acc and (lb is None or up + _ms(lat, e) <= lb * self.latency_headroom):
                why = "most accurate" + ("" if lb is None else f" within latency budget {lb:g} ms{up_note}")
                ordered.append(Decision(e.name, why, lat[e.name], "max_accuracy"))
        if not ordered:
            e = (sorted(within_acc, key=lambda e: _ms(lat, e)) or sorted(pool, key=lambda e: _ms(lat, e)))[0]
            ordered.append(
                Decision(
                    e.name,
                    f"no variant within latency budget {lb:g} ms{up_note}: fastest acceptable",
                    lat[e.name],
                    "degraded_latency",
                )
            )
        return ordered


#: :attr:`Decision.code` of the single-variant plans of :meth:`Policy.rank` (the ``reason`` label of the metric
#: ``tcsched_decisions_total``)
SINGLE_VARIANT_CODES = (
    "forced",
    "min_latency",
    "max_accuracy",
    "degraded_accuracy",
    "degraded_latency",
    "fallback",
)
#: codes of the cascade plans (:func:`tcsched.scheduler.cascades.rank_cascades`), each as ``<code>:<label>`` with
#: the cascade's label, or ``reference`` for the plain reference variant
CASCADE_CODES = ("cascade_min_latency", "cascade_max_accuracy", "cascade_degraded_latency", "fallback")


def decision_label_sets(manifest: Manifest) -> list[tuple[str, str]]:
    """Every (variant, code) that a :class:`Decision` of ``manifest`` can carry, sorted: each variant with each
    of :data:`SINGLE_VARIANT_CODES`, and each cascade's first stage (and the reference) with each of
    :data:`CASCADE_CODES` and its label. The scheduler creates its decision counters at zero for these."""
    out = {(v.name, c) for v in manifest.variants for c in SINGLE_VARIANT_CODES}
    plans = [(manifest.variant(c.stages[0]).name, c.label) for c in manifest.cascades]
    plans.append((manifest.variant(manifest.reference_variant).name, "reference"))
    out |= {(first, f"{code}:{label}") for first, label in plans for code in CASCADE_CODES}
    return sorted(out)


def _ms(lat: dict[str, float | None], e: VariantEntry) -> float:
    v = lat[e.name]
    return math.inf if v is None else v
