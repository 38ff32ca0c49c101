"""Statistics of preprocessed input images (import path ``tcsched.input_stats``).

Shared by the build (the manifest's :class:`tcsched.manifest.InputStatistics`) and its drift study.
"""

from __future__ import annotations

import numpy as np

from tcsched.imaging import IMAGENET_MEAN, IMAGENET_STD


def saturated_fraction(
    x: np.ndarray, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD
) -> float:
    """Fraction of the values of a preprocessed image (float32 [C, H, W], normalised with ``mean``/``std``) that
    were pixel 0 or 255 before the normalisation (clipped highlights/shadows, flat synthetic backgrounds)."""
    m = np.asarray(mean, np.float32)[:, None, None]
    s = np.asarray(std, np.float32)[:, None, None]
    lo, hi = -m / s, (1 - m) / s
    tol = 0.5 / 255 / s
    return float(np.mean((np.abs(x - lo) < tol) | (np.abs(x - hi) < tol)))
