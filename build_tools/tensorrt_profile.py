"""Latency of a TensorRT engine on this GPU, per batch size (:func:`profile_engine`: :class:`EngineLatency`), timed
with :class:`tcsched.build_tools.tensorrt_engine.EngineRunner`. Re-exported by
:mod:`tcsched.build_tools.tensorrt_engine`.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class EngineLatency:
    """Latency of one inference at one batch size, milliseconds: p50 and p99 with the host<->device copies (what
    a served request pays on the GPU), and the p50 of the engine's execution alone."""

    p50_ms: float
    p99_ms: float
    compute_p50_ms: float


def profile_engine(
    plan_path: str | os.PathLike, batch_sizes: Sequence[int], repeats: int = 50
) -> dict[int, EngineLatency]:
    """Latency of one inference per batch size: ``{batch: EngineLatency}``.

    Per batch size: 10 warm-up runs, then ``repeats`` timed runs with the input/output copies and ``repeats``
    without (:meth:`EngineRunner.time_ms`), on random inputs (latency does not depend on the values). Batch
    sizes must lie within the engine's optimization profile (1..max_batch_size of the build).

    Raises:
        ValueError: empty ``batch_sizes``, a batch size < 1 or outside the profile, ``repeats`` < 1, or no such
            engine file.
        ImportError / RuntimeError: as :class:`EngineRunner`.
    """
    sizes = list(batch_sizes)
    if not sizes or any((not isinstance(b, int)) or b < 1 for b in sizes):
        raise ValueError(f"batch_sizes must be a non-empty list of ints >= 1, got {sizes}")
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
    # the runner is tensorrt_engine's (which imports this module)
    from tcsched.build_tools.tensorrt_engine import EngineRunner

    out = {}
    with EngineRunner(plan_path) as runner:
        for b in sorted(set(sizes)):
            served = runner.time_ms(b, repeats, copies=True)
            compute = runner.time_ms(b, repeats, copies=False)
            out[b] = EngineLatency(
                p50_ms=float(statistics.median(served)),
                p99_ms=float(np.percentile(served, 99)),
                compute_p50_ms=float(statistics.median(compute)),
            )
    return out
