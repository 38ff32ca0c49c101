"""Execution scheduling: a request's parameters, validated, and the decision they lead to. Plain Python.

The parameters are documented in :mod:`tcsched.scheduler.policy`; bad values raise :class:`RequestError`, which the
scheduler model answers with INVALID_ARG (HTTP 400 / gRPC INVALID_ARGUMENT).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

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
    reach_rates: tuple[float, ...] = ()  # the operating point's share of rows reaching each stage

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
