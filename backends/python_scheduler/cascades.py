"""Execution scheduling: choosing a confidence cascade for a batch (rule 0 of :mod:`tcsched.scheduler.policy`).

Used when ``min_agreement`` is set and the manifest has calibrated cascades:
  candidates = the fp32 reference alone (agreement 1 by definition) and every calibrated cascade whose stages are
  all runnable (:meth:`Policy.runnable`: a stage need not be on the single-variant front) and healthy, each at its operating point for the smallest target >= ``min_agreement`` that the
  calibration met (and, with both budgets given, whose measured top-1 drop fits ``accuracy_budget``).
  A cascade's predicted latency = its first stage at B rows + each later stage at its expected rows
  (reach rate x B), weighted by the chance that any row reaches it; each stage's prediction is corrected for
  the live load like a single variant's.
  ``min_latency``: the candidate with the lowest profiled cost (the build's bare-runtime figures: the live
  corrections are mostly per-call overhead and contention, which slow every plan alike). ``max_accuracy``: every operating point of
  a target >= ``min_agreement`` is a candidate; the one with the highest measured agreement whose predicted
  latency (plus upstream time) fits ``latency_budget_ms`` x ``latency_headroom``, else the cheapest; at run time
  the scheduler then escalates only as many rows (lowest margins first) as the budget left can pay for
  (:meth:`tcsched.scheduler.policy.Policy.escalation_allowance`), and says so in DECISION.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import TYPE_CHECKING

from tcsched.manifest import CascadeProfile, OperatingPoint, VariantEntry
from tcsched.scheduler.options import Decision, RequestOptions

if TYPE_CHECKING:
    from tcsched.scheduler.live import LoadTracker
    from tcsched.scheduler.policy import Policy


def cascade_candidates(
    policy: Policy, opts: RequestOptions, now: float | None
) -> list[tuple[CascadeProfile | None, OperatingPoint | None]]:
    """(cascade, operating point) pairs that meet ``opts.min_agreement``; (None, None) = the reference alone.

    With ``max_accuracy`` every met operating point of a target >= min_agreement is a candidate, else only
    the lowest such target of each cascade."""
    assert opts.min_agreement is not None
    m = policy.manifest
    out: list[tuple[CascadeProfile | None, OperatingPoint | None]] = [(None, None)]
    for c in m.cascades:
        try:
            entries = [m.variant(s) for s in c.stages]
        except KeyError:
            continue
        if not all(policy.runnable(e) and policy.state.healthy(e.name, now) for e in entries):
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


def cascade_ms(
    policy: Policy, chain: list[VariantEntry], reach: list[float], batch_size: int, load, now
) -> float | None:
    """First stage at B rows + each later stage j at round(reach_j x B) rows (at least 1), weighted by the
    chance 1 - (1 - reach_j)^B that any row of the batch reaches it."""
    total = 0.0
    for e, r in zip(chain, reach, strict=True):
        k = max(1, round(r * batch_size))
        t = policy.predict(e, k, load, now, share=r)  # a stage sees only the rows that reach it
        if t is None:
            return None
        total += (1.0 - (1.0 - r) ** batch_size) * t
    return total


def rank_cascades(
    policy: Policy, opts: RequestOptions, batch_size: int, now, load: LoadTracker | None, upstream_ms: float
) -> list[Decision]:
    m = policy.manifest
    ref = m.variant(policy.reference)
    lb = opts.latency_budget_ms
    up = max(0.0, upstream_ms)
    # (agreement, predicted ms under the live load, profiled ms: the compute the plan costs, decision)
    plans: list[tuple[float, float, float, Decision]] = []
    for c, op in cascade_candidates(policy, opts, now):
        if c is None or op is None:
            ms = policy.predict(ref, batch_size, load, now)
            cost = policy.predict(ref, batch_size)
            d = Decision(ref.name, "", ms, "", stages=(ref.name,), expected_agreement=1.0)
            plans.append((1.0, _inf(ms), _inf(cost), d))
            continue
        chain = [m.variant(s) for s in c.stages]
        ms = cascade_ms(policy, chain, op.reach_rates, batch_size, load, now)
        cost = cascade_ms(policy, chain, op.reach_rates, batch_size, None, now)
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
            reach_rates=tuple(op.reach_rates),
        )
        plans.append((op.agreement, _inf(ms), _inf(cost), d))
    target = f"agreement >= {opts.min_agreement:g}"
    up_note = f" ({up:.1f} ms already spent upstream)" if up > 0 else ""

    def named(d: Decision, reason: str, code: str, budget: float | None = None) -> Decision:
        label = d.cascade or "reference"
        return replace(d, reason=reason, code=f"{code}:{label}", escalation_budget_ms=budget)

    # cheapest by the compute it costs (the build's profile): the live corrections are mostly per-call overhead
    # and contention, which a cascade's extra call would be charged in full although they slow every plan alike
    cheapest = sorted(plans, key=lambda p: (p[2], -p[0]))
    if opts.resolved_objective == "min_latency" or lb is None:
        first = [named(cheapest[0][3], f"cheapest plan with {target}", "cascade_min_latency")]
    else:
        limit = lb * policy.latency_headroom - up
        # most accurate first; at equal measured agreement the reference (exact by definition) before a
        # cascade (an estimate on the calibration images), then the cheaper
        fits = [
            p for p in sorted(plans, key=lambda p: (-p[0], p[3].cascade is not None, p[1])) if p[1] <= limit
        ]
        if fits:
            d = fits[0][3]
            first = [
                named(
                    d,
                    f"most accurate plan with {target} within latency budget {lb:g} ms{up_note}",
                    "cascade_max_accuracy",
                    limit,
                )
            ]
        else:
            d = cheapest[0][3]
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
    for *_, d in cheapest:
        if d.chain not in seen:
            first.append(named(d, "fallback", "fallback"))
            seen.add(d.chain)
    return first


def _inf(ms: float | None) -> float:
    return math.inf if ms is None else ms
