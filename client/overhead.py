"""Scheduler overhead at concurrency 1, measured request by request with the targets interleaved.

perf_analyzer measures one target after another, each for a few windows, and a change in the machine's load
between two such runs moves a concurrency-1 p50 by as much as the overhead being measured (~10% between two runs
on 2 shared CPU cores). Here every round sends one request to each target in a fresh random order (same image
for all targets in a round, images cycled over rounds), one at a time over gRPC. A drift of the machine then
falls on all targets alike, and the ratios are ratios of medians taken side by side.

Targets per variant ``v`` (the names of :func:`tcsched.client.targets.bench_targets`):

- ``v``: the variant model called directly with the preprocessed tensor;
- ``scheduler[v]``: the scheduler model alone, forced to ``v`` (tensor in, one BLS call);
- ``pipeline_v``: the ensemble preprocess -> v without the scheduler (JPEG in);
- ``classifier[v]``: the deployed ensemble preprocess -> scheduler -> BLS v, forced to ``v`` (JPEG in).

``ensemble / pipeline`` is what the scheduler adds to the same JPEG request; ``scheduler / direct`` is the same
for a tensor request. The client's own cost (Python tritonclient, ~0.3 ms) is in both sides of each ratio.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from tcsched.client.targets import ENSEMBLE_INPUT, SCHEDULER_INPUT, VARIANT_INPUT, Target

# (numerator kind, denominator kind) -> name in the report
RATIOS = {
    "ensemble_over_pipeline": ("ensemble", "pipeline"),
    "scheduler_over_direct": ("scheduler", "variant"),
    "ensemble_over_direct": ("ensemble", "variant"),
}


@dataclass(frozen=True)
class RatioEstimate:
    """Ratio of two p50s, with a paired bootstrap 95% interval (rounds resampled with replacement)."""

    ratio: float
    low: float
    high: float


@dataclass(frozen=True)
class OverheadResult:
    """One variant's interleaved measurement: p50 in ms per target kind, and the ratios of :data:`RATIOS`."""

    variant: str
    rounds: int
    p50_ms: dict[str, float]  # target kind -> p50 ms
    p99_ms: dict[str, float]
    ratios: dict[str, RatioEstimate]


def ratio_of_medians(
    num: Sequence[float], den: Sequence[float], resamples: int = 2000, seed: int = 0
) -> RatioEstimate:
    """median(num) / median(den) with a paired percentile-bootstrap 95% interval (Efron & Tibshirani 1993,
    ch. 13): rounds are resampled with replacement, both medians taken on the same resampled rounds.

    Raises:
        ValueError: lengths differ or fewer than 2 rounds.
    """
    a, b = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or len(a) < 2:
        raise ValueError(f"need two equal-length series of >= 2 rounds, got {a.shape} and {b.shape}")
    idx = np.random.default_rng(seed).integers(0, len(a), size=(resamples, len(a)))
    boot = np.median(a[idx], axis=1) / np.median(b[idx], axis=1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return RatioEstimate(float(np.median(a) / np.median(b)), float(lo), float(hi))


def summarize(variant: str, times_ms: dict[str, list[float]]) -> OverheadResult:
    """Turn per-kind latency series (same rounds, same order) into an :class:`OverheadResult`."""
    rounds = min(len(v) for v in times_ms.values())
    ratios = {
        name: ratio_of_medians(times_ms[n][:rounds], times_ms[d][:rounds])
        for name, (n, d) in RATIOS.items()
        if n in times_ms and d in times_ms
    }
    return OverheadResult(
        variant=variant,
        rounds=rounds,
        p50_ms={k: float(np.percentile(v, 50)) for k, v in times_ms.items()},
        p99_ms={k: float(np.percentile(v, 99)) for k, v in times_ms.items()},
        ratios=ratios,
    )


def _request_inputs(t: Target, tensor: np.ndarray, blob: bytes) -> list:
    """The gRPC inputs of one request to ``t``: the tensor (variant, scheduler) or the encoded image."""
    import tritonclient.grpc as grpcclient

    if t.kind in ("variant", "scheduler"):
        x = np.ascontiguousarray(tensor[None])
        inp = grpcclient.InferInput(
            VARIANT_INPUT if t.kind == "variant" else SCHEDULER_INPUT,
            list(x.shape),
            "UINT8" if x.dtype == np.uint8 else "FP32",
        )
    else:
        x = np.array([[blob]], dtype=object)
        inp = grpcclient.InferInput(ENSEMBLE_INPUT, [1, 1], "BYTES")
    inp.set_data_from_numpy(x)
    return [inp]


def measure_overhead(
    url: str,
    targets: Sequence[Target],
    tensors: Sequence[np.ndarray],
    blobs: Sequence[bytes],
    rounds: int = 200,
    warmup_rounds: int = 10,
    seed: int = 0,
    on_round: Callable[[int], None] | None = None,
) -> list[OverheadResult]:
    """Interleaved concurrency-1 latency of ``targets`` (:class:`~tcsched.client.targets.Target` of kinds
    variant, scheduler, pipeline, ensemble, each with a ``variant``), over gRPC at ``url``.

    Args:
        tensors: preprocessed float32 (or uint8 pixels) [3, H, W] images (variant and scheduler targets).
        blobs: the same images encoded (ensemble and pipeline targets), ``len(blobs) == len(tensors)``.
        rounds: measured rounds; each sends one request to every target, in a fresh random order.

    Returns:
        One :class:`OverheadResult` per variant, in the order the variants first appear in ``targets``.

    Raises:
        ValueError: no targets, ``rounds`` < 2, mismatched images.
        tritonclient.utils.InferenceServerException: a request failed (the measurement is then meaningless).
    """
    import tritonclient.grpc as grpcclient

    targets = [
        t
        for t in targets
        if t.variant is not None and t.kind in ("variant", "scheduler", "pipeline", "ensemble")
    ]
    if not targets:
        raise ValueError("no target with a variant to measure")
    if rounds < 2 or warmup_rounds < 0:
        raise ValueError(f"rounds must be >= 2 and warmup_rounds >= 0, got {rounds}, {warmup_rounds}")
    if not tensors or len(tensors) != len(blobs):
        raise ValueError(f"need as many tensors as encoded images, got {len(tensors)} and {len(blobs)}")
    client = grpcclient.InferenceServerClient(url)
    # requests are built before the clock starts: what is timed is the call
    prepared = {
        t.name: [_request_inputs(t, x, b) for x, b in zip(tensors, blobs, strict=True)] for t in targets
    }
    times: dict[str, list[float]] = {t.name: [] for t in targets}
    rng = random.Random(seed)
    order = list(targets)
    for r in range(warmup_rounds + rounds):
        rng.shuffle(order)
        i = r % len(tensors)
        for t in order:
            t0 = time.perf_counter()
            client.infer(t.model, prepared[t.name][i], parameters=t.request_parameters or None)
            dt = (time.perf_counter() - t0) * 1e3
            if r >= warmup_rounds:
                times[t.name].append(dt)
        if on_round is not None and r >= warmup_rounds:
            on_round(r - warmup_rounds)
    client.close()
    out = []
    for v in dict.fromkeys(t.variant for t in targets):
        mine = {t.kind: times[t.name] for t in targets if t.variant == v}
        out.append(summarize(v, mine))
    return out
