"""``tcsched eval``: accuracy of the served ensemble per configuration (a forced variant, the scheduler's default,
a cascade target), on labeled images, beside torchvision eager.

Per configuration: top-1/top-5 with Wilson 95% intervals, top-1 agreement with the served fp32 reference (and with
eager), the share of images a cascade escalated, and the variants' compute time per image from Triton's own
statistics (``compute_infer`` of every variant model, delta over the configuration, divided by its images), with
its ratio to static fp32's in the same run. Configurations run one after the other on the same server.

With ``rounds`` > 1 every configuration runs again ``rounds - 1`` times, in reversed order every other round, so
that each compute ratio is taken side by side with fp32 in each round: the ratio reported is the median over the
rounds, with their range (one pass over 246 images takes ~1.5 s on 2 cores, short enough for a busy core to move
one pass's figure by 0.1x). Accuracy, agreement and escalation come from the first round.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from tcsched.client.classify import ClassifierClient, compute_ns
from tcsched.data import ImageItem
from tcsched.manifest import Manifest
from tcsched.metrics import wilson_interval


@dataclass
class EvalRow:
    """One evaluated configuration. Fractions in [0, 1]; ``*_ci95`` are Wilson 95% intervals over ``n_images``.

    ``compute_ms_per_image``: the variants' compute time (Triton ``compute_infer``) per image of this
    configuration; ``compute_vs_fp32``: its ratio to the static fp32 configuration's in the same run;
    ``images_per_s``: the client's served images per second over a pass (at the run's concurrency);
    ``stage_stats``: per variant that ran, ``calls`` (Triton executions, one per batch), ``rows``, ``ms_per_call``
    and ``ms_per_image`` (its compute over every served image of the configuration), summed over all rounds.
    """

    name: str
    n_images: int
    top1: float
    top5: float
    ci95_top1: tuple[float, float]
    agreement_with_reference: float | None = None  # with torchvision eager
    agreement_with_fp32: float | None = None  # with the served fp32 variant, same run
    agreement_with_fp32_ci95: tuple[float, float] | None = None
    escalation_rate: float | None = None
    # the manifest's escalation rate of the operating point that served (its evaluation-split check, and the
    # calibration views), for comparison with the online one
    manifest_escalation_rate: float | None = None
    manifest_calibration_escalation_rate: float | None = None
    compute_ms_per_image: float | None = None
    compute_vs_fp32: float | None = None  # median over the rounds of the per-round ratio
    compute_vs_fp32_rounds: list[float] = field(default_factory=list)  # each round's ratio, in round order
    images_per_s: float | None = None  # served images per second of wall time, median over the rounds
    # per variant that ran: calls (executions), rows, compute ms per call and per served image, over all rounds
    stage_stats: dict[str, dict[str, float]] = field(default_factory=dict)
    errors: int = 0
    variants_used: dict[str, int] = field(default_factory=dict)
    mean_latency_ms: float | None = None
    # a forced variant's figures in the manifest on the same images (the build's evaluation split, or all its
    # labeled images), for comparison with the served ones
    build_top1: float | None = None
    build_agreement_with_fp32: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def _ratio_text(r: EvalRow) -> str:
    if r.compute_vs_fp32 is None:
        return "-"
    rounds = r.compute_vs_fp32_rounds
    if len(rounds) < 2:
        return f"{r.compute_vs_fp32:.2f}x"
    return f"{r.compute_vs_fp32:.2f}x [{min(rounds):.2f}, {max(rounds):.2f}] ({len(rounds)} rounds)"


def row_from_topk(
    name: str,
    labels: np.ndarray,
    top5_idx: np.ndarray,
    reference_top1: np.ndarray | None = None,
    errors: int = 0,
    **extra,
) -> EvalRow:
    """An :class:`EvalRow` from top-5 class indices [N, 5] (best first) and labels [N]."""
    top1_hits = top5_idx[:, 0] == labels
    agree = None if reference_top1 is None else float((top5_idx[:, 0] == reference_top1).mean())
    return EvalRow(
        name=name,
        n_images=len(labels),
        top1=float(top1_hits.mean()),
        top5=float((top5_idx == labels[:, None]).any(axis=1).mean()),
        ci95_top1=wilson_interval(int(top1_hits.sum()), len(labels)),
        agreement_with_reference=agree,
        errors=errors,
        **extra,
    )


@dataclass
class EvalResult:
    rows: list[EvalRow]
    n_images: int
    model_prefix: str = ""  # the variants' common name prefix (e.g. 'mobilenet_v2_'), left out of the table

    def as_dict(self) -> dict:
        return {"n_images": self.n_images, "rows": [r.as_dict() for r in self.rows]}

    def _short(self, name: str) -> str:
        return name.replace(self.model_prefix, "") if self.model_prefix else name

    def table(self, title: str) -> Table:
        t = Table(title=f"top-1/top-5 on {title}")
        cols = (
            "configuration",
            "top-1 [95%]",
            "top-5",
            "agree fp32 [95%]",
            "agree eager",
            "build: top-1 / agree fp32",
            "escalated (manifest: eval split)",
            "compute ms/img",
            "vs fp32",
            "img/s",
            "errors",
            "variants used",
        )
        for c in cols:
            t.add_column(c)

        def pct(v):
            return "-" if v is None else f"{100 * v:.2f}%"

        for r in self.rows:
            ci = r.agreement_with_fp32_ci95
            t.add_row(
                self._short(r.name),
                f"{100 * r.top1:.2f}% [{100 * r.ci95_top1[0]:.1f}, {100 * r.ci95_top1[1]:.1f}]",
                pct(r.top5),
                "-" if ci is None else f"{pct(r.agreement_with_fp32)} [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]",
                pct(r.agreement_with_reference),
                _build_text(r),
                pct(r.escalation_rate)
                + ("" if r.manifest_escalation_rate is None else f" ({pct(r.manifest_escalation_rate)})"),
                "-" if r.compute_ms_per_image is None else f"{r.compute_ms_per_image:.2f}",
                _ratio_text(r),
                "-" if r.images_per_s is None else f"{r.images_per_s:.0f}",
                str(r.errors),
                ", ".join(f"{self._short(k)}: {v}" for k, v in r.variants_used.items()) or "-",
            )
        return t

    def stage_table(self) -> Table:
        """Where each configuration's compute goes: per variant that ran, its Triton calls, rows per call,
        compute ms per call and per served image (all rounds together)."""
        t = Table(title="compute per variant (Triton statistics, all rounds)")
        for c in ("configuration", "variant", "calls", "rows/call", "ms/call", "ms/img"):
            t.add_column(c)

        for r in self.rows:
            for name, st in r.stage_stats.items():
                t.add_row(
                    self._short(r.name),
                    self._short(name),
                    str(st["calls"]),
                    f"{st['rows_per_call']:.2f}",
                    f"{st['ms_per_call']:.2f}",
                    f"{st['ms_per_image']:.2f}",
                )
        return t


def _build_text(r: EvalRow) -> str:
    """'84.15% / 97.07% (+0.00 / +0.00)': the build's figures and served minus build, in points."""
    if r.build_agreement_with_fp32 is None or r.agreement_with_fp32 is None:
        return "-"
    top1 = "-" if r.build_top1 is None else f"{100 * r.build_top1:.2f}%"
    d_top1 = "-" if r.build_top1 is None else f"{100 * (r.top1 - r.build_top1):+.2f}"
    d_agree = 100 * (r.agreement_with_fp32 - r.build_agreement_with_fp32)
    return f"{top1} / {100 * r.build_agreement_with_fp32:.2f}% ({d_top1} / {d_agree:+.2f})"


def _row(name: str, res: list, labels: np.ndarray, eager_top1: np.ndarray | None, compute_ms: float):
    """(EvalRow, served top-1 of every image or None when some failed) of one configuration's results."""
    keep = np.array([not isinstance(r, Exception) for r in res], dtype=bool)  # bool even when empty
    ok = [r for r in res if not isinstance(r, Exception)]
    top5 = np.array([[p.index for p in r.topk] for r in ok]).reshape(-1, 5)
    used: dict[str, int] = {}
    for r in ok:
        used[r.variant] = used.get(r.variant, 0) + 1
    row = row_from_topk(
        name,
        labels[keep],
        top5,
        None if eager_top1 is None else eager_top1[keep],
        len(res) - len(ok),
        variants_used=used,
        mean_latency_ms=float(np.mean([r.latency_ms for r in ok])) if ok else None,
        compute_ms_per_image=compute_ms / max(1, len(ok)),
    )
    if any((r.decision or {}).get("cascade") for r in ok):
        row.escalation_rate = float(np.mean([r.escalated for r in ok]))
    return row, (top5[:, 0] if len(ok) == len(res) else None)


def _manifest_rates(row: EvalRow, res: list, manifest: Manifest) -> None:
    """The manifest's escalation rates of the operating point most of ``res`` were served by."""
    seen: dict[tuple[str, float], int] = {}
    for r in res:
        d = {} if isinstance(r, Exception) else (r.decision or {})
        if d.get("cascade"):
            key = (d["cascade"], d["target_agreement"])
            seen[key] = seen.get(key, 0) + 1
    if not seen:
        return
    label, target = max(seen, key=seen.get)
    for c in manifest.cascades:
        for op in c.operating_points:
            if c.label == label and op.target_agreement == target:
                row.manifest_calibration_escalation_rate = op.escalation_rate
                if op.evaluation is not None:
                    row.manifest_escalation_rate = op.evaluation.escalation_rate


def _build_figures(row: EvalRow, manifest: Manifest, variant: str, images: str | None) -> None:
    """The manifest's top-1 and agreement of ``variant`` on ``images`` ("evaluation": the build's evaluation
    split; "all": every labeled image of its ``--data-dir``), when they were measured on as many images as
    ``row`` was served."""
    if images is None:
        return
    try:
        entry = manifest.variant(variant)
    except KeyError:
        return
    report = entry.accuracy if images == "evaluation" else entry.accuracy_all_images
    if report is not None and report.n_images == row.n_images:
        row.build_top1, row.build_agreement_with_fp32 = report.top1, report.agreement_with_fp32


def _pass(client, data, params, variant_names, concurrency, on_done) -> tuple[list, dict, float]:
    """One pass of ``data`` with ``params``: (results, per variant the (compute ns, rows, calls) of the pass,
    served images per second of the pass's wall time)."""
    before = compute_ns(client, variant_names)
    t0 = time.perf_counter()
    res = client.classify_many(data, top_k=5, parameters=params, concurrency=concurrency, on_done=on_done)
    wall_s = time.perf_counter() - t0
    after = compute_ns(client, variant_names)
    served = sum(not isinstance(r, Exception) for r in res)
    deltas = {n: tuple(a - b for a, b in zip(after[n], before[n], strict=True)) for n in variant_names}
    return res, deltas, served / max(wall_s, 1e-9)


def _compute_ms(deltas: Mapping[str, tuple[int, ...]]) -> float:
    return sum(d[0] for d in deltas.values()) / 1e6


def _add_deltas(acc: dict[str, list[int]], deltas: Mapping[str, tuple[int, ...]]) -> None:
    """Add one pass's per-variant (compute ns, rows, calls) to the totals ``acc``."""
    for name, d in deltas.items():
        if d[2]:
            tot = acc.setdefault(name, [0, 0, 0])
            for j, v in enumerate(d):
                tot[j] += v


def stage_stats(acc: Mapping[str, Sequence[int]], images: int) -> dict[str, dict[str, float]]:
    """Per variant, from its total (compute ns, rows, calls) over ``images`` served images: ``calls``,
    ``rows``, ``rows_per_call``, ``ms_per_call`` and ``ms_per_image`` (compute ms over every served image)."""
    return {
        name: {
            "calls": calls,
            "rows": rows,
            "rows_per_call": rows / calls,
            "ms_per_call": ns / 1e6 / calls,
            "ms_per_image": ns / 1e6 / max(1, images),
        }
        for name, (ns, rows, calls) in acc.items()
        if calls
    }


def _set_compute(
    rows: list[EvalRow],
    row_of: dict[int, int],
    compute: dict[int, list[float]],
    ref_config: int | None,
    rates: dict[int, list[float]],
) -> None:
    """Each configuration's median compute per image and img/s, and its per-round ratios to the reference's."""
    for k, i in row_of.items():
        rows[i].compute_ms_per_image = float(np.median(compute[k]))
        rows[i].images_per_s = float(np.median(rates[k]))
        if ref_config is not None and all(compute[ref_config]):
            ratios = [c / f for c, f in zip(compute[k], compute[ref_config], strict=True)]
            rows[i].compute_vs_fp32 = float(np.median(ratios))
            rows[i].compute_vs_fp32_rounds = ratios if len(ratios) > 1 else []


def run_eval(
    items: Sequence[ImageItem],
    url: str,
    manifest: Manifest,
    configs: Sequence[tuple[str, Mapping[str, object]]],
    *,
    eager: Callable[[Sequence[ImageItem]], np.ndarray] | None = None,
    concurrency: int = 4,
    rounds: int = 1,
    console: Console | None = None,
    build_images: str | None = None,
) -> EvalResult:
    """Every configuration (name, request parameters) over ``items`` through the ensemble at ``url`` (HTTP).

    Args:
        eager: top-5 class indices [N, 5] of an independent reference (torchvision eager), or None.
        build_images: which of the build's image sets ``items`` are ("evaluation" or "all", None: neither):
            each forced variant's row then carries the manifest's figures on them.
        rounds: passes of every configuration for the compute ratios (module docstring); >= 1. A row's
            ``errors`` count the failed requests of all its passes.

    Raises:
        ValueError: ``rounds`` < 1.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    console = console or Console()
    labels = np.array([it.label for it in items])
    data = [it.read_bytes() for it in items]
    ref_name = manifest.reference_variant
    variant_names = [v.name for v in manifest.variants]
    rows: list[EvalRow] = []
    eager_top1 = None
    if eager is not None:
        with console.status(f"reference: torchvision eager on {len(items)} images"):
            top = eager(items)
        eager_top1 = top[:, 0]
        rows.append(row_from_topk("torchvision eager fp32", labels, top))
    served_ref_top1: np.ndarray | None = None
    ref_config: int | None = None
    row_of: dict[int, int] = {}  # configuration index -> its row
    compute: dict[int, list[float]] = {}  # configuration index -> compute ms per image, one per round
    rates: dict[int, list[float]] = {}  # configuration index -> served img/s, one per round
    stage_acc: dict[int, dict[str, list[int]]] = {}  # configuration index -> variant -> (ns, rows, calls)
    served_acc: dict[int, int] = {}  # configuration index -> images served over all rounds
    top1s: dict[int, np.ndarray] = {}  # row index -> served top-1 of every image (rows without errors)
    client = ClassifierClient(url, "http", model=manifest.ensemble)
    cols = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    try:
        with Progress(*cols, console=console) as progress:
            for k, (name, params) in enumerate(configs):
                task = progress.add_task(name, total=len(items))
                advance = lambda task=task: progress.advance(task)  # noqa: E731
                res, deltas, rate = _pass(client, data, params, variant_names, concurrency, advance)
                row, top1 = _row(f"served: {name}", res, labels, eager_top1, _compute_ms(deltas))
                stage_acc[k], served_acc[k] = {}, len(res) - row.errors
                _add_deltas(stage_acc[k], deltas)
                _manifest_rates(row, res, manifest)
                if "variant" in params:
                    _build_figures(row, manifest, str(params["variant"]), build_images)
                if top1 is not None:
                    top1s[len(rows)] = top1
                    if params.get("variant") in (ref_name, "fp32"):
                        served_ref_top1, ref_config = top1, k
                row_of[k], compute[k], rates[k] = len(rows), [row.compute_ms_per_image], [rate]
                rows.append(row)
            for rnd in range(1, rounds):
                task = progress.add_task(f"compute round {rnd + 1}/{rounds}", total=len(configs) * len(items))
                for k in list(range(len(configs)))[:: -1 if rnd % 2 else 1]:
                    advance = lambda task=task: progress.advance(task)  # noqa: E731
                    res, deltas, rate = _pass(
                        client, data, configs[k][1], variant_names, concurrency, advance
                    )
                    served = sum(not isinstance(r, Exception) for r in res)
                    compute[k].append(_compute_ms(deltas) / max(1, served))
                    rates[k].append(rate)
                    _add_deltas(stage_acc[k], deltas)
                    served_acc[k] += served
                    rows[row_of[k]].errors += len(res) - served
    finally:
        client.close()
    # agreement with the served fp32 and compute ratios, once the reference configuration has run
    for i, r in enumerate(rows):
        if served_ref_top1 is not None and i in top1s:
            hits = int((top1s[i] == served_ref_top1).sum())
            r.agreement_with_fp32 = hits / len(items)
            r.agreement_with_fp32_ci95 = wilson_interval(hits, len(items))
    _set_compute(rows, row_of, compute, ref_config, rates)
    for k, i in row_of.items():
        rows[i].stage_stats = stage_stats(stage_acc[k], served_acc[k])
    prefix = os.path.commonprefix(variant_names)
    return EvalResult(rows, len(items), prefix[: prefix.rfind("_") + 1] if len(variant_names) > 1 else "")
