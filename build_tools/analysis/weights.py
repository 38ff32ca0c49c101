"""Weight math in numpy: 2:4 magnitude pruning and its check, weight statistics, and the INT8 quantization
parameters the sensitivity probes use (the same scheme as ``build_tools/quantize.py``: uint8 asymmetric
activations, int8 symmetric per-output-channel weights)."""

from __future__ import annotations

import numpy as np

from tcsched.build_tools.analysis.geometry import LayerGeometry


def _groups_of_4(weight: np.ndarray) -> np.ndarray:
    """View [O, I, k...] as [O, k..., I/4, 4]: groups of 4 consecutive input channels at each (o, k...)."""
    w = np.moveaxis(weight, 1, -1)
    return w.reshape(*w.shape[:-1], w.shape[-1] // 4, 4)


def prune_2_4(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Magnitude 2:4 pruning along the reduction (input-channel) dimension, axis 1.

    Conv weights [O, I/group, kh, kw]: groups of 4 consecutive input channels at each (o, kh, kw); Gemm weights
    in the ``transB=1`` layout [O, I]: groups of 4 consecutive input features per output (for ``transB=0``,
    [I, O], pass ``weight.T`` and transpose back). In every group the 2 entries of largest |w| are kept (ties:
    the lower index), so every group of 4 has at least 2 zeros, as TensorRT's structured sparsity requires
    (TensorRT Developer Guide, "Structured Sparsity").

    Args:
        weight: float array of rank >= 2, any float dtype.

    Returns:
        ``(pruned, mask)``: ``pruned`` has the dtype and shape of ``weight``; ``mask`` is bool, same shape, True
        where a weight is kept (exactly 2 per group).

    Raises:
        ValueError: rank < 2, or the size of axis 1 is not a multiple of 4.
    """
    weight = np.asarray(weight)
    if weight.ndim < 2:
        raise ValueError(f"2:4 pruning needs a weight of rank >= 2, got shape {list(weight.shape)}")
    if weight.shape[1] % 4:
        raise ValueError(
            f"2:4 pruning runs along axis 1 (input channels), whose size {weight.shape[1]} is not a multiple "
            f"of 4 (weight shape {list(weight.shape)})"
        )
    groups = _groups_of_4(np.abs(weight))
    order = np.argsort(-groups, axis=-1, kind="stable")
    keep = np.zeros(groups.shape, dtype=bool)
    np.put_along_axis(keep, order[..., :2], True, axis=-1)
    # back to the weight's layout: [O, k..., I/4, 4] -> [O, k..., I] -> [O, I, k...]
    mask = np.moveaxis(keep.reshape(*groups.shape[:-2], -1), -1, 1)
    return np.where(mask, weight, np.zeros((), dtype=weight.dtype)), mask


def is_2to4(weight: np.ndarray) -> bool:
    """True when every group of 4 consecutive entries along axis 1 has at least 2 zeros (see :func:`prune_2_4`).

    False (not an error) when the size of axis 1 is not a multiple of 4 or the rank is < 2: such a weight cannot
    be 2:4 structured.
    """
    weight = np.asarray(weight)
    if weight.ndim < 2 or weight.shape[1] % 4 or weight.shape[1] == 0:
        return False
    return bool(((_groups_of_4(weight) == 0).sum(axis=-1) >= 2).all())


def sparse_view(weight: np.ndarray, g: LayerGeometry) -> np.ndarray:
    """The weight in the [O, I, ...] layout that 2:4 runs along (Gemm transB=0 is transposed; a view, no copy)."""
    return weight if g.weight_channel_axis == 0 else weight.T


def can_prune_2_4(weight: np.ndarray, g: LayerGeometry) -> bool:
    """Whether :func:`prune_2_4` applies to this layer's weight: not depthwise, input axis a multiple of 4."""
    return sparse_view(weight, g).shape[1] % 4 == 0 and g.kind != "depthwise"


def weight_sparsity(weight: np.ndarray) -> float:
    """Fraction in [0, 1] of weights exactly 0."""
    weight = np.asarray(weight)
    return float(np.count_nonzero(weight == 0) / max(weight.size, 1))


def absmax_per_channel(weight: np.ndarray, axis: int) -> np.ndarray:
    """max |w| per output channel (``axis`` indexes the channels): float [weight.shape[axis]]."""
    return np.abs(weight).max(axis=tuple(a for a in range(weight.ndim) if a != axis))


def activation_qparams(lo: float, hi: float) -> tuple[float, int]:
    """uint8 asymmetric (scale, zero point) for the range [lo, hi], widened to include 0 (as ONNX Runtime).

    scale = (hi - lo) / 255, zero point = round(-lo / scale) clipped to [0, 255]; a zero range gives scale 1.
    """
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    scale = (hi - lo) / 255.0
    if not np.isfinite(scale) or scale <= 0:
        return 1.0, 0
    return scale, int(np.clip(round(-lo / scale), 0, 255))


def quantize_weight_per_channel(weight: np.ndarray, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per-channel quantization: scale_c = max|w_c| / 127, q = clip(round(w / scale), -127, 127).

    Returns:
        ``(q, scale)``: q int8 with the weight's shape; scale float32 [weight.shape[axis]] (1 for all-zero
        channels).
    """
    w = np.asarray(weight, dtype=np.float32)
    other = tuple(i for i in range(w.ndim) if i != axis)
    absmax = np.abs(w).max(axis=other) if other else np.abs(w)
    scale = np.where(absmax > 0, absmax / 127.0, 1.0).astype(np.float32)
    shape = [1] * w.ndim
    shape[axis] = -1
    q = np.clip(np.round(w / scale.reshape(shape)), -127, 127).astype(np.int8)
    return q, scale
