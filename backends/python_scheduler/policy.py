"""Execution scheduling: the variant-selection policy. Pure Python, no Triton import; unit-tested rule by rule.

Inputs: the manifest (measured accuracy drop and latency per variant), the request's parameters, and the live
state kept by :class:`LiveState` (variant health). Output: a :class:`Decision` with the variant, the predicted
latency and the reason, which goes back to the client.

Request parameters (Triton request parameters, e.g. ``client.infer(..., parameters={...})``):

``variant``            force one variant (its Triton model name, or its precision such as ``int8``)
``accuracy_budget``    maximum top-1 drop vs fp32 the caller accepts, percentage points, >= 0
``latency_budget_ms``  latency target, milliseconds, > 0
``objective``          ``min_latency`` or ``max_accuracy``; default: ``max_accuracy`` when a latency budget is
                       given (the most accurate variant that fits it), else ``min_latency``

Predicted latency of variant v for a batch of B images = queue + service:
  service = the build's measured p50 at batch B (interpolated) x the EWMA of observed/predicted BLS time of v
  (so the profile is corrected for the serving process); queue = service x u / (1 - u) with the utilisation
  u = arrival rate x service per image (M/M/1), so a variant that cannot keep up with the current load is
  predicted slow before its queue has grown. From :class:`tcsched.scheduler.live.LoadTracker`.

Rules, in order:
  1. ``variant`` given: that variant (unknown name -> error naming the known ones).
  2. candidates = healthy variants that the runtime executes natively (not emulated: fp16 on a CPU is out);
     when the input is out of the calibration distribution (:func:`tcsched.scheduler.live.drift_check`), INT8
     variants (int8, int8_mixed) are dropped from the candidates: their ranges were calibrated on other data.
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

from tcsched.manifest import Manifest, VariantEntry
from tcsched.scheduler.live import DriftResult, LoadTracker

Objective = Literal["min_latency", "max_accuracy"]
OBJECTIVES = ("min_latency", "max_accuracy")
KNOWN_PARAMETERS = ("variant", "accuracy_budget", "latency_budget_ms", "objective")
INT8_PRECISIONS = ("int8", "int8_mixed")


class RequestError(ValueError):
    """A request's parameters are invalid; the message names the parameter, the value and what is expected."""


@dataclass(frozen=True)
class RequestOptions:
    variant: str | None = None
    accuracy_budget_points: float = 1.0
    latency_budget_ms: float | None = None
    objective: Objective | None = None  # None: max_accuracy with a latency budget, else min_latency

    @property
    def resolved_objective(self) -> Objective:
        if self.objective is not None:
            return self.objective
        return "max_accuracy" if self.latency_budget_ms is not None else "min_latency"


@dataclass(frozen=True)
class Decision:
    """A variant with its reason. ``code`` is a low-cardinality label for metrics; ``predicted_latency_ms`` is
    queue + service (ms), ``None`` when the variant has no latency profile."""

    variant: str
    reason: str
    predicted_latency_ms: float | None = None
    code: str = "chosen"


def _number(name: str, value: object, *, positive: bool) -> float:
    if isinstance(value, bool):
        raise RequestError(f"parameter {name!r} must be a number, got boolean {value}")
    try:
        x = float(value)  # Triton request parameters arrive as str, int or (2.51) double
    except (TypeError, ValueError):
        raise RequestError(f"parameter {name!r} must be a number, got {value!r}") from None
    if not math.isfinite(x) or x < 0 or (positive and x == 0):
        bound = "> 0" if positive else ">= 0"
        raise RequestError(f"parameter {name!r} must be a finite number {bound}, got {value!r}")
    return x


def parse_parameters(params: Mapping[str, object], defaults: RequestOptions) -> RequestOptions:
    """Validate Triton request parameters into :class:`RequestOptions`.

    Parameters not in :data:`KNOWN_PARAMETERS` are ignored (Triton and clients add their own, e.g.
    ``sequence_id`` or ``headers``).

    Raises:
        RequestError: a known parameter with a bad type or value.
    """
    variant = params.get("variant", defaults.variant)
    if variant is not None and (not isinstance(variant, str) or not variant.strip()):
        raise RequestError(f"parameter 'variant' must be a non-empty string, got {variant!r}")
    acc = defaults.accuracy_budget_points
    if "accuracy_budget" in params:
        acc = _number("accuracy_budget", params["accuracy_budget"], positive=False)
    lat = defaults.latency_budget_ms
    if "latency_budget_ms" in params:
        lat = _number("latency_budget_ms", params["latency_budget_ms"], positive=True)
    obj = params.get("objective", defaults.objective)
    if obj is not None and obj not in OBJECTIVES:
        raise RequestError(f"parameter 'objective' must be one of {list(OBJECTIVES)}, got {obj!r}")
    if lat is not None and lat < 0:
        raise RequestError(f"parameter 'latency_budget_ms' must be > 0, got {lat}")
    return RequestOptions(
        variant=variant.strip() if isinstance(variant, str) else None,
        accuracy_budget_points=acc,
        latency_budget_ms=lat,
        objective=obj,  # type: ignore[arg-type]
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

    cooldown_s: float = 30.0
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
        latency_headroom: float = 0.7,
        max_utilization: float = 0.8,
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
        drift: DriftResult | None = None,
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
            service = predicted_latency_ms(e, batch_size)
            if service is None:
                return None
            if load is None:
                return service
            return load.predicted_ms(
                e.name, service, batch_size, max_utilization=self.max_utilization, now=now
            )

        if opts.variant is not None:
            try:
                forced = m.variant(opts.variant)
            except KeyError as e:
                raise RequestError(f"parameter 'variant': {e.args[0]}") from None
            return [Decision(forced.name, "forced by the 'variant' parameter", predict(forced), "forced")]

        usable = [e for e in m.variants if e.serve_on_cpu_for_speed or m.target == "gpu"]
        ood_note = ""
        if drift is not None and drift.out_of_distribution:
            safe = [e for e in usable if e.precision not in INT8_PRECISIONS]
            if safe:
                usable = safe
                ood_note = f"; input out of distribution ({drift.reason}): INT8 variants avoided"
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
        code_sfx = "_ood" if ood_note else ""
        if opts.resolved_objective == "min_latency":
            for e in sorted(within_acc, key=speed):
                ordered.append(
                    Decision(
                        e.name,
                        f"fastest within accuracy budget {budget:g} points{ood_note}",
                        lat[e.name],
                        "min_latency" + code_sfx,
                    )
                )
            if not ordered:
                e = by_accuracy[0]
                ordered.append(
                    Decision(
                        e.name,
                        f"no variant within accuracy budget {budget:g} points: most accurate{ood_note}",
                        lat[e.name],
                        "degraded_accuracy" + code_sfx,
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
                ordered.append(Decision(e.name, why + ood_note, lat[e.name], "max_accuracy" + code_sfx))
            if not ordered:
                fallback = sorted(within_acc, key=speed) or sorted(pool, key=speed)
                e = fallback[0]
                ordered.append(
                    Decision(
                        e.name,
                        f"no variant within latency budget {lb:g} ms{up_note}: fastest acceptable{ood_note}",
                        lat[e.name],
                        "degraded_latency" + code_sfx,
                    )
                )
        seen = {d.variant for d in ordered}
        for e in by_accuracy:  # fallbacks: the rest, most accurate first
            if e.name not in seen:
                ordered.append(Decision(e.name, "fallback", lat[e.name], "fallback"))
                seen.add(e.name)
        return ordered
