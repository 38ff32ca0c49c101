"""Scoring: how close a candidate graph's logits are to the fp32 reference's, on the same images.

Every choice the build makes on the selection split (calibration method, fine-tune kept, int8_mixed's float
layers, sparse24's pruned layers) compares candidates by :class:`Score`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import onnx

from tcsched.metrics import mean_kl, top1_agreement, topk_accuracy
from tcsched.ort_runtime import OrtClassifier


@dataclass
class Score:
    """Accuracy of candidate logits [N, classes] vs the fp32 logits on the same images.

    ``agreement``: fraction of images with the fp32 top-1 class; ``kl``: mean KL(fp32 || candidate), nats;
    ``top1``: fraction correct, ``top1_drop_points``: fp32's top-1 minus this one, points (both ``None``
    without labels).
    """

    agreement: float
    kl: float
    top1: float | None = None
    top1_drop_points: float | None = None

    @property
    def drop_points(self) -> float:
        """The top-1 drop in points; without labels, the disagreement with fp32 in points stands in for it."""
        return self.top1_drop_points if self.top1_drop_points is not None else 100 * (1 - self.agreement)

    def meets(self, max_drop_points: float, min_agreement: float) -> bool:
        """Within an accuracy budget: drop <= ``max_drop_points`` points and agreement >= ``min_agreement``."""
        return self.drop_points <= max_drop_points and self.agreement >= min_agreement


def score(ref_logits: np.ndarray, logits: np.ndarray, labels: np.ndarray | None = None) -> Score:
    """Score float32 [N, classes] ``logits`` against ``ref_logits`` (same images); ``labels`` int [N] or None."""
    if labels is None:
        return Score(top1_agreement(ref_logits, logits), max(0.0, mean_kl(ref_logits, logits)))
    top1 = topk_accuracy(logits, labels, 1)
    return Score(
        top1_agreement(ref_logits, logits),
        max(0.0, mean_kl(ref_logits, logits)),
        top1,
        100.0 * (topk_accuracy(ref_logits, labels, 1) - top1),
    )


def run_model(model: onnx.ModelProto | str | os.PathLike, x: np.ndarray, threads: int = 2) -> np.ndarray:
    """Logits float32 [N, classes] of an in-memory or on-disk ONNX classifier on float32 [N, 3, H, W]."""
    if isinstance(model, onnx.ModelProto):
        import tempfile

        with tempfile.NamedTemporaryFile(suffix=".onnx") as f:
            onnx.save(model, f.name)
            return OrtClassifier(f.name, threads=threads).predict(x, batch_size=16)
    return OrtClassifier(model, threads=threads).predict(x, batch_size=16)
