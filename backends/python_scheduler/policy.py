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

Cascades (``min_agreement`` set and the manifest has calibrated cascades; rule 0, before the rules below):
  candidates = the fp32 reference alone (agreement 1 by definition) and every calibrated cascade whose stages are
  all servable and healthy, each at its operating point for the smallest target >= ``min_agreement`` that the
  calibration met (and, with both budgets given, whose measured top-1 drop fits ``accuracy_budget``).
  A cascade's predicted latency = its first stage at B rows + each later stage at its expected rows
  (reach rate x B), weighted by the chance that any row reaches it; each stage's prediction is corrected for
  the live load like a single variant's.
  ``min_latency``: the candidate with the lowest predicted latency. ``max_accuracy``: every operating point of
  a target >= ``min_agreement`` is a candidate; the one with the highest measured agreement whose predicted
  latency (plus upstream time) fits ``latency_budget_ms`` x ``latency_headroom``, else the cheapest; at run time
  the scheduler then escalates only as many rows (lowest margins first) as the budget left can pay for
  (:func:`escalation_allowance`), and says so in DECISION.

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

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from tcsched.manifest import CascadeProfile, Manifest, OperatingPoint, VariantEntry
from tcsched.scheduler.live import LoadTracker
from tcsched.settings import DEFAULTS, SchedulerSettings

Objective = Literal["min_latency", "max_accuracy"]
OBJECTIVES = ("min_latency", "max_accuracy")
KNOWN_PARAMETERS = ("variant", "min_agreement", "accuracy_budget", "latency_budget_ms", "objective")
QUOTE_LIMIT = 60  # characters of a client-supplied value quoted back in an error message


def quote(value: object, limit: int = QUOTE_LIMIT) -> str:
    """``repr(value)`` cut to ``limit`` characters (with the full length), for error messages."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


class RequestError(ValueError):
    """A request's parameters are invalid; the message names the parameter, the value and what is expected."""


@dataclass(frozen=True)
class RequestOptions:
    variant: str | None = None
    accuracy_budget_points: float = DEFAULTS.default_accuracy_budget_points
    latency_budget_ms: float | None = None
    objective: Objective | None = None  # None: max_accuracy with a latency budget, else min_latency
    min_agreement: float | None = None  # None: one variant per request (no cascade)
    accuracy_budget_given: bool = (
        False  # the request set accuracy_budget: it also bounds a cascade's top-1 drop
    )

    @classmethod
    def from_settings(cls, settings: SchedulerSettings) -> RequestOptions:
        """The defaults a request gets from the scheduler's config.pbtxt (``default_*`` knobs)."""
        return cls(
            accuracy_budget_points=settings.default_accuracy_budget_points,
            latency_budget_ms=settings.default_latency_budget_ms,
            objective=settings.default_objective or None,  # type: ignore[arg-type]
            min_agreement=settings.default_min_agreement,
        )

    @property
    def resolved_objective(self) -> Objective:
        if self.objective is not None:
            return self.objective
        return "max_accuracy" if self.latency_budget_ms is not None else "min_latency"


@dataclass(frozen=True)
class Decision:
    """A plan with its reason: one variant, or a cascade of variants (``stages``, first stage = ``variant``).

    ``code`` is a low-cardinality label for metrics; ``predicted_latency_ms`` is queue + service (ms) of the whole
    plan, ``None`` when a variant has no latency profile. For a cascade: ``thresholds`` (escalate a row from stage
    j when its confidence margin < thresholds[j]), ``cascade`` (label, e.g. 'int8>fp32'), the operating point's
    ``target_agreement`` and measured ``expected_agreement``, and the latency budget left for escalations
    (``escalation_budget_ms``, ``None``: escalate every row below the threshold).
    """

    variant: str
    reason: str
    predicted_latency_ms: float | None = None
    code: str = "chosen"
    stages: tuple[str, ...] = ()
    thresholds: tuple[float, ...] = ()
    cascade: str | None = None
    target_agreement: float | None = None
    expected_agreement: float | None = None
    escalation_budget_ms: float | None = None

    @property
    def chain(self) -> tuple[str, ...]:
        """The variants in calling order (just ``variant`` for a single-variant plan)."""
        return self.stages or (self.variant,)


def _number(name: str, value: object, *, positive: bool) -> float:
    if isinstance(value, bool):
        raise RequestError(f"parameter {name!r} must be a number, got boolean {value}")
    try:
        x = float(value)  # Triton request parameters arrive as str, int or (2.51) double
    except (TypeError, ValueError):
        raise RequestError(f"parameter {name!r} must be a number, got {quote(value)}") from None
    if not math.isfinite(x) or x < 0 or (positive and x == 0):
        bound = "> 0" if positive else ">= 0"
        raise RequestError(f"parameter {name!r} must be a finite number {bound}, got {quote(value)}")
    return x


def parse_parameters(params: Mapping[str, object], defaults: RequestOptions) -> RequestOptions:
    """Validate Triton request parameters into :class:`RequestOptions`.

    Parameters not in :data:`KNOWN_PARAMETERS` are ignored (Triton and clients add their own, e.g.
    ``sequence_id`` or ``headers``). ``accuracy_budget`` given without ``min_agreement`` turns the cascade off
    for that request (one variant within the accuracy budget, the rules below 0).

    Raises:
        RequestError: a known parameter with a bad type or value.
    """
    variant = params.get("variant", defaults.variant)
    if variant is not None and (not isinstance(variant, str) or not variant.strip()):
        raise RequestError(f"parameter 'variant' must be a non-empty string, got {quote(variant)}")
    acc = defaults.accuracy_budget_points
    if "accuracy_budget" in params:
        acc = _number("accuracy_budget", params["accuracy_budget"], positive=False)
    lat = defaults.latency_budget_ms
    if "latency_budget_ms" in params:
        lat = _number("latency_budget_ms", params["latency_budget_ms"], positive=True)
    obj = params.get("objective", defaults.objective)
    if obj is not None and obj not in OBJECTIVES:
        raise RequestError(f"parameter 'objective' must be one of {list(OBJECTIVES)}, got {quote(obj)}")
    if lat is not None and lat < 0:
        raise RequestError(f"parameter 'latency_budget_ms' must be > 0, got {lat}")
    agree = defaults.min_agreement
    if "min_agreement" in params:
        agree = _number("min_agreement", params["min_agreement"], positive=True)
        if agree > 1:
            raise RequestError(
                f"parameter 'min_agreement' must be a fraction in (0, 1] (e.g. 0.99 for 99% top-1 agreement "
                f"with fp32), got {quote(params['min_agreement'])}"
            )
    elif "accuracy_budget" in params:
        agree = None
    return RequestOptions(
        variant=variant.strip() if isinstance(variant, str) else None,
        accuracy_budget_points=acc,
        latency_budget_ms=lat,
        objective=obj,  # type: ignore[arg-type]
        min_agreement=agree,
        accuracy_budget_given="accuracy_budget" in params or defaults.accuracy_budget_given,
    )


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
    """Mutable online state: variants marked unhealthy until a monotonic deadline."""

    cooldown_s: float = DEFAULTS.unhealthy_cooldown_s
    unhealthy_until: dict[str, float] = field(default_factory=dict)

    def mark_unhealthy(self, variant: str, now: float | None = None) -> None:
        self.unhealthy_until[variant] = (time.monotonic() if now is None else now) + self.cooldown_s

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

    def servable(self, e: VariantEntry) -> bool:
        """May the scheduler choose ``e`` by itself: run natively (not emulated) and on the accuracy-latency
        front. On a GPU target the GPU build's own profile decides (every precision runs natively there)."""
        if self.manifest.target == "gpu":
            return True
        return e.serve_on_cpu_for_speed and e.on_pareto_front

    def predict(
        self, e: VariantEntry, batch_size: int, load: LoadTracker | None = None, now: float | None = None
    ) -> float | None:
        """Queue + service ms of ``e`` at ``batch_size`` under the live ``load`` (profile only without it);
        ``None`` without a latency profile. 0 rows cost 0 ms."""
        if batch_size <= 0:
            return 0.0
        service = predicted_latency_ms(e, batch_size)
        if service is None or load is None:
            return service
        return load.predicted_ms(e.name, service, batch_size, max_utilization=self.max_utilization, now=now)

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
        for k in range(wanted, 0, -1):
            t = self.predict(e, k, load, now)
            if t is not None and t <= left:
                return k
        return 0

    def _cascade_candidates(
        self, opts: RequestOptions, now: float | None
    ) -> list[tuple[CascadeProfile | None, OperatingPoint | None]]:
        """(cascade, operating point) pairs that meet ``opts.min_agreement``; (None, None) = the reference alone.

        With ``max_accuracy`` every met operating point of a target >= min_agreement is a candidate, else only
        the lowest such target of each cascade."""
        assert opts.min_agreement is not None
        m = self.manifest
        out: list[tuple[CascadeProfile | None, OperatingPoint | None]] = [(None, None)]
        for c in m.cascades:
            try:
                entries = [m.variant(s) for s in c.stages]
            except KeyError:
                continue
            if not all(self.servable(e) and self.state.healthy(e.name, now) for e in entries):
                continue
            ops = sorted(
                (
                    op
                    for op in c.operating_points
                    if op.met
                    and op.target_agreement >= opts.min_agreement - 1e-12
                    and (
                        not opts.accuracy_budget_given
                        or op.top1_drop_points is None
                        or op.top1_drop_points <= opts.accuracy_budget_points
                    )
                ),
                key=lambda op: op.target_agreement,
            )
            if opts.resolved_objective == "min_latency":
                ops = ops[:1]
            out += [(c, op) for op in ops]
        return out

    def _cascade_ms(
        self, chain: list[VariantEntry], reach: list[float], batch_size: int, load, now
    ) -> float | None:
        """First stage at B rows + each later stage j at round(reach_j x B) rows (at least 1), weighted by the
        chance 1 - (1 - reach_j)^B that any row of the batch reaches it."""
        total = 0.0
        for e, r in zip(chain, reach, strict=True):
            k = max(1, round(r * batch_size))
            t = self.predict(e, k, load, now)
            if t is None:
                return None
            total += (1.0 - (1.0 - r) ** batch_size) * t
        return total

    def _rank_cascades(
        self, opts: RequestOptions, batch_size: int, now, load, upstream_ms: float
    ) -> list[Decision]:
        m = self.manifest
        ref = m.variant(self.reference)
        lb = opts.latency_budget_ms
        up = max(0.0, upstream_ms)
        plans: list[tuple[float, float, Decision]] = []  # (agreement, ms, decision)
        for c, op in self._cascade_candidates(opts, now):
            if c is None or op is None:
                ms = self.predict(ref, batch_size, load, now)
                d = Decision(ref.name, "", ms, "", stages=(ref.name,), expected_agreement=1.0)
                plans.append((1.0, math.inf if ms is None else ms, d))
                continue
            chain = [m.variant(s) for s in c.stages]
            ms = self._cascade_ms(chain, op.reach_rates, batch_size, load, now)
            d = Decision(
                chain[0].name,
                "",
                ms,
                "",
                stages=tuple(c.stages),
                thresholds=tuple(op.thresholds),
                cascade=c.label,
                target_agreement=op.target_agreement,
                expected_agreement=op.agreement,
            )
            plans.append((op.agreement, math.inf if ms is None else ms, d))
        target = f"agreement >= {opts.min_agreement:g}"
        up_note = f" ({up:.1f} ms already spent upstream)" if up > 0 else ""

        def named(d: Decision, reason: str, code: str, budget: float | None = None) -> Decision:
            from dataclasses import replace

            label = d.cascade or "reference"
            return replace(d, reason=reason, code=f"{code}:{label}", escalation_budget_ms=budget)

        cheapest = sorted(plans, key=lambda p: (p[1], -p[0]))
        if opts.resolved_objective == "min_latency" or lb is None:
            first = [named(cheapest[0][2], f"cheapest plan with {target}", "cascade_min_latency")]
        else:
            limit = lb * self.latency_headroom - up
            # most accurate first; at equal measured agreement the reference (exact by definition) before a
            # cascade (an estimate on the calibration images), then the cheaper
            fits = [
                p
                for p in sorted(plans, key=lambda p: (-p[0], p[2].cascade is not None, p[1]))
                if p[1] <= limit
            ]
            if fits:
                d = fits[0][2]
                first = [
                    named(
                        d,
                        f"most accurate plan with {target} within latency budget {lb:g} ms{up_note}",
                        "cascade_max_accuracy",
                        limit,
                    )
                ]
            else:
                d = cheapest[0][2]
                first = [
                    named(
                        d,
                        f"no plan with {target} fits latency budget {lb:g} ms{up_note}: cheapest, "
                        "escalating only what the budget left pays for",
                        "cascade_degraded_latency",
                        limit,
                    )
                ]
        seen = {first[0].chain}
        for _, _, d in cheapest:
            if d.chain not in seen:
                first.append(named(d, "fallback", "fallback"))
                seen.add(d.chain)
        return first

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
            return self._rank_cascades(opts, batch_size, now, load, upstream_ms)
        usable = [e for e in m.variants if self.servable(e)]
        healthy = [e for e in usable if self.state.healthy(e.name, now)]
        pool = healthy or usable  # all unhealthy: try anyway rather than fail
        lat = {e.name: predict(e) for e in pool}

        def speed(e: VariantEntry) -> float:
            v = lat[e.name]
            return math.inf if v is None else v

        budget = opts.accuracy_budget_points
        within_acc = [e for e in pool if self._drop(e) <= budget]
        # most accurate first: the measured top-1 agreement with fp32 (the fidelity the scheduler trades for
        # speed, and what the served accuracy is judged by), ties broken by the KL vs fp32, then speed. Not the
        # top-1 drop: on a few hundred labelled images two int8 variants' drops and agreements can order them
        # opposite ways (build of 2026-11-21: int8 drop 0.81 / agreement 97.2%, int8_mixed 0.41 / 96.3%), and a
        # scheduler ranking by drop then served less agreement than static int8. The drop is the accuracy
        # budget's filter.
        by_accuracy = sorted(pool, key=lambda e: (-self._agreement(e), self._kl(e), self._drop(e), speed(e)))
        ordered: list[Decision] = []
        if opts.resolved_objective == "min_latency":
            for e in sorted(within_acc, key=speed):
                ordered.append(
                    Decision(
                        e.name,
                        f"fastest within accuracy budget {budget:g} points",
                        lat[e.name],
                        "min_latency",
                    )
                )
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
        else:
            lb = opts.latency_budget_ms
            up = max(0.0, upstream_ms)
            up_note = f" ({up:.1f} ms already spent upstream)" if up > 0 else ""
            fits = [
                e
                for e in by_accuracy
                if e in within_acc and (lb is None or up + speed(e) <= lb * self.latency_headroom)
            ]
            for e in fits:
                why = "most accurate" + ("" if lb is None else f" within latency budget {lb:g} ms{up_note}")
                ordered.append(Decision(e.name, why, lat[e.name], "max_accuracy"))
            if not ordered:
                fallback = sorted(within_acc, key=speed) or sorted(pool, key=speed)
                e = fallback[0]
                ordered.append(
                    Decision(
                        e.name,
                        f"no variant within latency budget {lb:g} ms{up_note}: fastest acceptable",
                        lat[e.name],
                        "degraded_latency",
                    )
                )
        seen = {d.variant for d in ordered}
        for e in by_accuracy:  # fallbacks: the rest, most accurate first
            if e.name not in seen:
                ordered.append(Decision(e.name, "fallback", lat[e.name], "fallback"))
                seen.add(e.name)
        return ordered
