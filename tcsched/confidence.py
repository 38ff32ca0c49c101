"""A classifier's confidence in its own answer, and what a confidence cascade does with it (``tcsched.confidence``).

Shared by the build (which calibrates cascade thresholds on it, ``tcsched.build_tools.cascade``) and the
scheduler (which escalates the rows below a threshold). The margin is the softmax probability of the top-1 class
minus that of the top-2 class: the "margin" uncertainty score of active learning (Scheffer et al., "Active hidden
Markov models for information extraction", IDA 2001), in [0, 1]; a quantized model's top-1 differs from fp32's
mostly where this margin is small.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def confidence_margin(logits: np.ndarray) -> np.ndarray:
    """Softmax top-1 minus top-2 probability per row.

    Args:
        logits: float array [N, classes] (classes >= 2).

    Returns:
        float64 [N] in [0, 1]; a row with a non-finite logit gets 0 (least confident).

    Raises:
        ValueError: not 2-D or fewer than 2 classes.
    """
    x = np.asarray(logits, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] < 2:
        raise ValueError(f"logits must be [N, classes >= 2], got shape {x.shape}")
    z = x - x.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    top2 = np.partition(p, -2, axis=1)[:, -2:]
    m = top2[:, 1] - top2[:, 0]
    return np.where(np.isfinite(m), m, 0.0)


def served_stage(margins: Sequence[np.ndarray], thresholds: Sequence[float]) -> np.ndarray:
    """Which stage answers each row: the first ``j`` with ``margins[j] >= thresholds[j]``, else the last stage.

    Args:
        margins: per stage but the last, float [N] (the stage's confidence margin of every row).
        thresholds: one per stage but the last.

    Returns:
        int [N], stage index in [0, len(thresholds)].
    """
    if len(margins) != len(thresholds):
        raise ValueError(f"{len(margins)} margin arrays for {len(thresholds)} thresholds")
    n = len(margins[0]) if margins else 0
    stage = np.full(n, len(thresholds), dtype=np.int64)
    open_rows = np.ones(n, dtype=bool)
    for j, (m, t) in enumerate(zip(margins, thresholds, strict=True)):
        stop = open_rows & (np.asarray(m) >= t)
        stage[stop] = j
        open_rows &= ~stop
    return stage
