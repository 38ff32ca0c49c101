"""Accuracy and error metrics as plain numpy functions (logits are float arrays of shape [N, classes])."""

from __future__ import annotations

import math

import numpy as np


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax (float64 internally), same shape as ``logits``."""
    z = logits.astype(np.float64) - logits.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def topk_correct(logits: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """bool [N]: whether ``labels[i]`` is among the ``k`` highest logits of row ``i``."""
    top = np.argpartition(-logits, kth=min(k, logits.shape[1] - 1), axis=1)[:, :k]
    return (top == labels[:, None]).any(axis=1)


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int = 1) -> float:
    """Fraction in [0, 1] of rows whose label is in the top ``k``."""
    if len(labels) == 0:
        raise ValueError("topk_accuracy needs at least one labeled row")
    return float(topk_correct(logits, labels, k).mean())


def top1_agreement(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Fraction of rows whose arg-max class is the same in both logit arrays."""
    return float((reference.argmax(1) == candidate.argmax(1)).mean())


def mean_kl(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Mean over rows of KL(softmax(reference) || softmax(candidate)), nats."""
    p = softmax(reference)
    q = softmax(candidate)
    return float(np.mean(np.sum(p * (np.log(p + 1e-12) - np.log(q + 1e-12)), axis=1)))


class SqnrAccumulator:
    """Signal-to-quantization-noise ratio over batches: 10 log10(sum ref^2 / sum (ref - cand)^2), dB, with
    float64 sums, so that a long run need not hold every batch. ``db`` is inf when nothing differs and -inf
    when the reference is all zero but the candidate is not."""

    def __init__(self) -> None:
        self.signal = 0.0
        self.noise = 0.0

    def add(self, ref: np.ndarray, cand: np.ndarray) -> None:
        """Add one batch: ``ref`` and ``cand`` of the same number of elements (any shape, any float dtype)."""
        r = ref.astype(np.float64, copy=False).ravel()
        d = r - cand.ravel()
        self.signal += float(np.dot(r, r))
        self.noise += float(np.dot(d, d))

    @property
    def db(self) -> float:
        if self.noise == 0:
            return math.inf
        if self.signal == 0:
            return -math.inf
        return 10.0 * math.log10(self.signal / self.noise)


def sqnr_db(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio, dB, of one pair of arrays (see :class:`SqnrAccumulator`)."""
    acc = SqnrAccumulator()
    acc.add(reference, candidate)
    return acc.db


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion (95% for z=1.96); (lo, hi) fractions. Wilson (1927), JASA 22:209."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, c - h), min(1.0, c + h))
