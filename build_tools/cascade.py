"""Strategy decision: calibrate confidence cascades, and keep only the variants on the accuracy-latency front.

A cascade is an ordered chain of variants, fastest first (e.g. int8 > fp32). Every row runs on the first stage;
the rows whose confidence margin (``tcsched.confidence.confidence_margin``) is below that stage's threshold run
again on the next stage, and so on. :func:`calibrate_cascade` chooses, for each target agreement with the fp32
reference, the thresholds with the lowest expected cost that reach the target on the calibration rows (the build's
calibration and selection splits, label-preserving views: ``tcsched.build_tools.serving``), and re-measures them
on the evaluation split.

Rule for the thresholds: conformal risk control (Angelopoulos et al., "Conformal Risk Control", ICLR 2024) with
the image as the unit. An image's loss at thresholds ``t`` is 1 when any of its label-preserving views (flips,
centre zooms) is served by a stage other than fp32 that *could* disagree with fp32 there: its margin is at most
``2 * max|softmax(stage) - softmax(fp32)|`` (:func:`could_disagree`; every real disagreement is such a row, and
the stage's perturbation is measured on every row, not only on the few that flip). The cheapest ``t`` with
``(sum of losses + 1) / (n_images + 1) <= 1 - goal`` is chosen (``goal = 1 - (1 - target) * safety``): for
images exchangeable with the calibration ones the expected disagreement rate is then at most ``1 - goal``. With
n images a target above ``n / (n + 1)`` cannot be met (0.995 needs 199 images): the build calibrates on the
calibration and the selection splits together (agreement with fp32 needs no label). A bootstrap lower bound is
1.0 as soon as no view disagrees and bounds no tail: on 130 images it let OpenVINO int8 serve rows where it
disagreed with fp32 at margins up to 0.48 (README "Input-aware scheduling"). The evaluation-split check stored
beside every operating point shows whether the target held on images the build never chose anything on.

:func:`pareto_front` marks the variants the scheduler should never choose: another variant is faster at every
measured batch size and this one is not significantly more accurate (paired bootstrap over images, 95%).
:func:`plan_serving` does both; the report of its cascades (table, plot):
:mod:`tcsched.build_tools.cascade_report`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from tcsched.confidence import confidence_margin, served_stage
from tcsched.manifest import CascadeCheck, CascadeProfile, OperatingPoint
from tcsched.metrics import wilson_interval

TARGETS = (0.97, 0.98, 0.99, 0.995, 0.999)
SAFETY = 1.0
GRID_STEPS = 100  # per non-final stage of a chain of 3 or more: escalation fractions 0, 1/100, ..., 1
BOOTSTRAP = 1000
_Z95 = 1.96


@dataclass(frozen=True)
class StageData:
    """One stage's outputs on the calibration rows: logits float32 [N, classes]."""

    name: str
    logits: np.ndarray


def chain_label(stages: Sequence[str]) -> str:
    """'mobilenet_v2_int8', 'mobilenet_v2_fp32' -> 'int8>fp32' (the common '_'-ended prefix removed)."""
    prefix = ""
    common = min(stages, key=len)
    for i in range(len(common)):
        if all(s[: i + 1] == common[: i + 1] for s in stages) and common[i] == "_":
            prefix = common[: i + 1]
    return ">".join(s[len(prefix) :] or s for s in stages)


def expected_batch_ms(
    reach: Sequence[float], p50_ms_by_batch: Sequence[Mapping[int, float]], batch_sizes: Sequence[int]
) -> dict[int, float]:
    """Expected ms of one batch of B rows through a cascade, for each B in ``batch_sizes``.

    Stage j is called with K ~ Binomial(B, reach[j]) rows (no call when K = 0) and costs its p50 at K rows,
    linearly interpolated between measured batch sizes (proportional beyond them). The rows of a batch are taken
    as independent, which they are not quite (a dark batch escalates together): the mean is right, the spread is
    wider than binomial.
    """
    out: dict[int, float] = {}
    for b in batch_sizes:
        total = 0.0
        for r, prof in zip(reach, p50_ms_by_batch, strict=True):
            k = np.arange(b + 1)
            pmf = np.array([math.comb(b, int(i)) for i in k]) * r**k * (1 - r) ** (b - k)
            total += float(sum(p * _interp(prof, int(i)) for p, i in zip(pmf[1:], k[1:], strict=True)))
        out[b] = total
    return out


def _interp(prof: Mapping[int, float], b: int) -> float:
    pts = sorted(prof.items())
    if b <= pts[0][0]:
        return pts[0][1]
    for (b0, t0), (b1, t1) in itertools.pairwise(pts):
        if b0 <= b <= b1:
            return t0 + (t1 - t0) * (b - b0) / (b1 - b0)
    bl, tl = pts[-1]
    return tl * b / bl


def _per_image_cost(prof: Mapping[int, float]) -> float:
    """Mean over measured batch sizes of p50 / batch: the cost of one row on a stage (ms)."""
    return float(np.mean([t / b for b, t in prof.items()]))


def _grouped_bootstrap_ci(
    ok: np.ndarray, groups: np.ndarray, rng: np.random.Generator
) -> tuple[float, float]:
    """95% percentile-bootstrap interval of mean(ok), resampling whole groups (images) with replacement."""
    uniq, inv = np.unique(groups, return_inverse=True)
    sums = np.bincount(inv, weights=ok.astype(np.float64), minlength=len(uniq))
    counts = np.bincount(inv, minlength=len(uniq)).astype(np.float64)
    idx = rng.integers(0, len(uniq), size=(BOOTSTRAP, len(uniq)))
    est = sums[idx].sum(1) / counts[idx].sum(1)
    return float(np.quantile(est, 0.025)), float(np.quantile(est, 0.975))


def could_disagree(stage_logits: np.ndarray, reference_logits: np.ndarray) -> np.ndarray:
    """Rows where the stage's top-1 could differ from fp32's: margin <= 2 * max_c |p_c - q_c|.

    ``p`` / ``q``: softmax of the stage's / the reference's logits. If the stage answers ``a`` and fp32 ``b != a``,
    the stage's margin is at most ``p_a - p_b = (p_a - q_a) + (q_a - q_b) + (q_b - p_b) <= 2 max|p - q|``
    (``q_a <= q_b``), so every disagreeing row is flagged; a flagged row need not disagree.

    Args:
        stage_logits, reference_logits: float [N, classes], same rows.

    Returns:
        bool [N].

    Raises:
        ValueError: the shapes differ or are not [N, classes >= 2].
    """
    x = np.asarray(stage_logits, dtype=np.float64)
    r = np.asarray(reference_logits, dtype=np.float64)
    if x.shape != r.shape or x.ndim != 2 or x.shape[1] < 2:
        raise ValueError(
            f"expected stage and reference logits of one shape [N, classes >= 2], got {x.shape} and {r.shape}"
        )

    def softmax(z: np.ndarray) -> np.ndarray:
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    gap = np.abs(softmax(x) - softmax(r)).max(axis=1)
    return confidence_margin(x) <= 2 * gap


def risk_bound(image_losses: np.ndarray) -> float:
    """Conformal risk control bound ``(sum of losses + 1) / (n + 1)`` on the expected loss of a new image.

    Args:
        image_losses: float or bool [n], one loss in [0, 1] per calibration image (n >= 1).
    """
    loss = np.asarray(image_losses, dtype=np.float64)
    if loss.ndim != 1 or len(loss) == 0:
        raise ValueError(f"expected one loss per image, [n >= 1], got shape {loss.shape}")
    return float((loss.sum() + 1.0) / (len(loss) + 1.0))


def _thresholds_for(
    margins: Sequence[np.ndarray],
    flagged: Sequence[np.ndarray],
    costs: Sequence[float],
    goal: float,
    groups: np.ndarray,
) -> tuple[list[float], bool]:
    """The cheapest thresholds whose :func:`risk_bound` over the images is <= ``1 - goal``; (thresholds, met).

    ``flagged[j]``: bool [N], stage j could disagree with fp32 on the row (:func:`could_disagree`; all False for
    the reference). An image's loss: some row of it is served by a stage that flags it.

    Two stages: image i is loss-free iff the threshold exceeds s_i, the highest margin among its flagged rows;
    with ``k`` the number of losses the bound allows, the threshold lies just above the (k+1)-th highest s_i
    (midway to the next margin). More stages: a grid over each stage's margin quantiles, cheapest first. When
    the bound cannot be met (too few images: ``1 / (n + 1) > 1 - goal``), every row escalates to the last stage.
    """
    _, inv = np.unique(groups, return_inverse=True)
    n_img = int(inv.max()) + 1
    allowed = math.floor((1 - goal) * (n_img + 1) - 1 + 1e-9)  # losses the bound allows
    if len(margins) == 1:
        m = np.asarray(margins[0], dtype=np.float64)
        top = math.nextafter(float(m.max()), math.inf)
        if allowed < 0:
            return [top], False
        if flagged[1].any():  # a last stage that can disagree too: scan every threshold, lowest first
            mids = np.unique(m)
            for t in np.concatenate([[0.0], (mids[:-1] + mids[1:]) / 2, [top]]):
                served = m >= t
                rows = (served & flagged[0]) | (~served & flagged[1])
                if np.count_nonzero(np.bincount(inv, weights=rows.astype(np.float64))) <= allowed:
                    return [float(t)], True
            return [top], False
        score = np.full(n_img, -np.inf)
        np.maximum.at(score, inv[flagged[0]], m[flagged[0]])
        s = np.sort(score[np.isfinite(score)])[::-1]
        if len(s) <= allowed:
            return [0.0], True
        cut = float(s[allowed])
        above = m[m > cut]
        t = float((cut + above.min()) / 2) if len(above) else math.nextafter(cut, math.inf)
        return [t], True
    qs = np.linspace(0, 1, GRID_STEPS + 1)
    cands = [
        np.unique(
            np.concatenate([[0.0], np.quantile(m, qs[1:-1]), [math.nextafter(float(m.max()), math.inf)]])
        )
        for m in margins
    ]
    best: tuple[float, list[float]] | None = None
    for ts in itertools.product(*cands):
        stage = served_stage(margins, ts)
        reach = [float(np.mean(stage >= j)) for j in range(len(flagged))]
        cost = float(np.dot(reach, costs))
        if best is not None and cost >= best[0]:
            continue
        loss = np.bincount(inv, weights=np.choose(stage, flagged).astype(np.float64)) > 0
        if loss.sum() <= allowed:
            best = (cost, list(map(float, ts)))
    if best is None:
        return [c[-1] for c in cands], False
    return best[1], True


def _check(
    thresholds: Sequence[float], logits: Sequence[np.ndarray], ref: np.ndarray, name: str
) -> CascadeCheck:
    """The thresholds applied to other rows (one per image): agreement with Wilson 95% interval, escalation."""
    stage = served_stage([confidence_margin(x) for x in logits[:-1]], thresholds)
    ok = np.choose(stage, [x.argmax(1) == ref.argmax(1) for x in logits])
    return CascadeCheck(
        dataset=name,
        n_images=len(ok),
        agreement=float(ok.mean()),
        agreement_ci95=wilson_interval(int(ok.sum()), len(ok), _Z95),
        escalation_rate=float(np.mean(stage >= 1)),
    )


def _flagged(stages: Sequence[StageData], reference: np.ndarray) -> list[np.ndarray]:
    """Per stage, bool [N]: the rows where it could disagree with fp32 (:func:`could_disagree`); the reference
    as last stage agrees with itself (all False)."""
    return [
        np.zeros(len(reference), bool)
        if s is stages[-1] and np.array_equal(s.logits, reference)
        else could_disagree(s.logits, reference)
        for s in stages
    ]


def _top1_drop(
    stage: np.ndarray, stages: Sequence[StageData], ref_top1: np.ndarray, labels: np.ndarray
) -> float:
    """Top-1 points lost against ``labels`` when row i is served by ``stages[stage[i]]`` instead of fp32."""
    served_top1 = np.choose(stage, [s.logits.argmax(1) for s in stages])
    return 100.0 * (float(np.mean(ref_top1 == labels)) - float(np.mean(served_top1 == labels)))


def calibrate_cascade(
    stages: Sequence[StageData],
    reference: np.ndarray,
    groups: np.ndarray,
    p50_ms_by_batch: Mapping[str, Mapping[int, float]],
    calibration: str,
    *,
    labels: np.ndarray | None = None,
    evaluation: tuple[Sequence[np.ndarray], np.ndarray, str] | None = None,
    targets: Sequence[float] = TARGETS,
    safety: float = SAFETY,
    seed: int = 0,
) -> CascadeProfile:
    """Thresholds of one cascade for each target agreement.

    Args:
        stages: the chain, first stage first, each with its logits on the N calibration rows.
        reference: fp32 logits on the same rows, float [N, classes].
        groups: int [N], the source image of each row (rows that are views of one image share it): the unit of
            the risk bound (module docstring) and of the 95% intervals (bootstrap over images).
        p50_ms_by_batch: per stage name, its bare-runtime p50 (ms) by batch size.
        calibration: description of the rows, for the manifest.
        labels: int [N] ground truth, for the top-1 drop (optional).
        evaluation: (per-stage logits on the evaluation rows, fp32 logits there, description): every operating
            point is re-measured there (one row per image; Wilson intervals).
        targets: target agreements; safety: see the module docstring.

    Returns:
        the profile with one :class:`OperatingPoint` per target (``met``: the risk bound of the module docstring
        is <= 1 - target on the calibration rows; when not, every row escalates).
    """
    if len(stages) < 2:
        raise ValueError("a cascade needs at least 2 stages")
    if not 0 < safety <= 1:
        raise ValueError(f"safety must be in (0, 1], got {safety}")
    rng = np.random.default_rng(seed)
    ref_top1 = reference.argmax(1)
    agree = [s.logits.argmax(1) == ref_top1 for s in stages]
    flagged = _flagged(stages, reference)
    margins = [confidence_margin(s.logits) for s in stages[:-1]]
    costs = [_per_image_cost(p50_ms_by_batch[s.name]) for s in stages]
    batch_sizes = sorted(set().union(*(p50_ms_by_batch[s.name].keys() for s in stages)))
    n_images = len(np.unique(groups))
    points = []
    for target in targets:
        goal = 1 - (1 - target) * safety
        ts, met = _thresholds_for(margins, flagged, costs, goal, groups)
        stage = served_stage(margins, ts)
        ok = np.choose(stage, agree)
        reach = [float(np.mean(stage >= j)) for j in range(len(stages))]
        drop = None if labels is None else _top1_drop(stage, stages, ref_top1, labels)
        check = None if evaluation is None else _check(ts, *evaluation)
        points.append(
            OperatingPoint(
                target_agreement=target,
                thresholds=ts,
                agreement=float(ok.mean()),
                agreement_ci95=_grouped_bootstrap_ci(ok, groups, rng),
                n_images=n_images,
                n_views=len(ok),
                reach_rates=reach,
                expected_latency_ms_by_batch=expected_batch_ms(
                    reach, [p50_ms_by_batch[s.name] for s in stages], batch_sizes
                ),
                top1_drop_points=drop,
                met=met,
                evaluation=check,
            )
        )
    names = [s.name for s in stages]
    return CascadeProfile(
        stages=names, label=chain_label(names), calibration=calibration, operating_points=points
    )


def candidate_chains(
    served: Sequence[str],
    reference: str,
    p50_ms_by_batch: Mapping[str, Mapping[int, float]],
    max_stages: int = 3,
) -> list[list[str]]:
    """Every chain of ``served`` variants ending in ``reference`` whose stages get slower along the chain
    (per-image p50, :func:`_per_image_cost`), up to ``max_stages`` long. The reference alone is not a chain."""
    cost = {n: _per_image_cost(p50_ms_by_batch[n]) for n in served}
    fast = sorted((n for n in served if n != reference and cost[n] < cost[reference]), key=cost.get)
    chains = []
    for k in range(1, max_stages):
        for combo in itertools.combinations(fast, k):
            chains.append([*combo, reference])
    return chains


@dataclass(frozen=True)
class FrontVerdict:
    on_front: bool
    reason: str | None = None


def pareto_front(
    agree: Mapping[str, np.ndarray],
    p50_ms_by_batch: Mapping[str, Mapping[int, float]],
    reference: str,
    seed: int = 0,
) -> dict[str, FrontVerdict]:
    """Which variants are on the accuracy-latency front.

    Variant v is off the front when some w is faster at every batch size measured for both (p50) and v's
    agreement with fp32 is not significantly higher than w's: the lower end of the paired bootstrap 95% interval
    of (agreement_v - agreement_w) over the images is <= 0. The reference is always on the front (every
    agreement is measured against it).

    Args:
        agree: per variant, bool [N]: its top-1 equals fp32's on each evaluation image (same images for all).
        p50_ms_by_batch: per variant, p50 ms by batch size.
    """
    rng = np.random.default_rng(seed)
    names = list(agree)
    n = len(next(iter(agree.values())))
    idx = rng.integers(0, n, size=(BOOTSTRAP, n))
    out: dict[str, FrontVerdict] = {}
    for v in names:
        if v == reference:
            out[v] = FrontVerdict(True)
            continue
        for w in names:
            if w == v:
                continue
            common = set(p50_ms_by_batch[v]) & set(p50_ms_by_batch[w])
            if not common or not all(p50_ms_by_batch[w][b] < p50_ms_by_batch[v][b] for b in common):
                continue
            diff = agree[v].astype(np.float64) - agree[w].astype(np.float64)
            lo = float(np.quantile(diff[idx].mean(1), 0.025))
            if lo <= 0:
                gain = 100 * float(diff.mean())
                out[v] = FrontVerdict(
                    False,
                    f"off the accuracy-latency front: {w} is faster at batch {', '.join(map(str, sorted(common)))} "
                    f"and this variant is not significantly more accurate (agreement with fp32 {gain:+.1f} points "
                    f"vs {w}, paired 95% interval lower end {100 * lo:+.1f}, {n} images): never chosen on its "
                    "own; a calibrated cascade may still use it as a stage",
                )
                break
        else:
            out[v] = FrontVerdict(True)
    return out


@dataclass
class ServingPlan:
    """What the build decided to serve: a front verdict per variant, and the calibrated cascades."""

    verdicts: dict[str, FrontVerdict]
    cascades: list[CascadeProfile]


def plan_serving(
    servable: Mapping[str, bool],
    reference: str,
    select_logits: Mapping[str, np.ndarray],
    groups: np.ndarray,
    eval_logits: Mapping[str, np.ndarray],
    p50_ms_by_batch: Mapping[str, Mapping[int, float]],
    calibration: str,
    evaluation: str,
    *,
    select_labels: np.ndarray | None = None,
    targets: Sequence[float] = TARGETS,
) -> ServingPlan:
    """Pareto front of the servable variants (on the evaluation split), then every cascade of front variants
    ending in ``reference`` calibrated on the selection rows and checked on the evaluation split.

    Args:
        servable: per variant, whether its runtime runs it natively (emulated ones are never on the front).
        select_logits / eval_logits: per variant, logits on the selection rows [N_sel, C] / evaluation [N_eval, C];
            both include ``reference``.
        groups: int [N_sel], the source image of each selection row.
    """
    ref_top1 = eval_logits[reference].argmax(1)
    agree = {n: eval_logits[n].argmax(1) == ref_top1 for n in eval_logits if servable.get(n, False)}
    verdicts = pareto_front(agree, {n: p50_ms_by_batch[n] for n in agree}, reference)
    for n in eval_logits:
        if n not in verdicts:
            verdicts[n] = FrontVerdict(
                False, "emulated by this runtime (slower than fp32): never chosen for speed"
            )
    front = [n for n, v in verdicts.items() if v.on_front]
    runnable = [n for n in agree]
    # two-stage chains of every runnable variant (a variant off the single-variant front can still be the
    # cheapest first stage to a target: one that disagrees with fp32 only at low margins), longer chains of front
    # variants only (their number grows fast)
    chains = candidate_chains(runnable, reference, p50_ms_by_batch, max_stages=2)
    chains += [c for c in candidate_chains(front, reference, p50_ms_by_batch) if len(c) > 2]
    cascades = []
    for chain in chains:
        cascades.append(
            calibrate_cascade(
                [StageData(n, select_logits[n]) for n in chain],
                select_logits[reference],
                groups,
                p50_ms_by_batch,
                calibration,
                labels=select_labels,
                evaluation=([eval_logits[n] for n in chain], eval_logits[reference], evaluation),
                targets=targets,
            )
        )
    return ServingPlan(verdicts, cascades)
