"""Label-preserving views of preprocessed images, so that choices made on few images do not hang on one image."""

from __future__ import annotations

import numpy as np

# side fraction of the centre crop of label_preserving_views: close to the 224/256 = 0.875 centre crop of
# torchvision's eval transform, applied once more
DEFAULT_ZOOM = 0.86


def label_preserving_views(x: np.ndarray, zoom: float = DEFAULT_ZOOM) -> np.ndarray:
    """Four views of each preprocessed image that keep its ImageNet label, for choices made on few images.

    Views, in blocks of N: the images, their horizontal flips, the centre ``zoom`` x ``zoom`` of each resized back
    to H x W (bilinear, ``torch.nn.functional.interpolate``), and that zoom's flips; view v of image i is row
    ``v * N + i``. Both operations are linear in the pixel values, so they apply to normalized tensors. On ~130
    selection images one image is 0.77 points of agreement and a few near-tie images decide a choice; four views
    give each image four draws (what this changed on MobileNetV2: README, "Measured here").

    Args:
        x: float32 [N, C, H, W] preprocessed images.
        zoom: side fraction of the centre crop, in (0, 1] (:data:`DEFAULT_ZOOM`).

    Returns:
        float32 [4N, C, H, W].

    Raises:
        ValueError: ``x`` is not float32 [N, C, H, W] with N >= 1, or ``zoom`` is outside (0, 1].
    """
    if not isinstance(x, np.ndarray) or x.ndim != 4 or x.dtype != np.float32 or len(x) == 0:
        got = f"{x.dtype} {list(x.shape)}" if isinstance(x, np.ndarray) else type(x).__name__
        raise ValueError(f"expected float32 [N, C, H, W] images with N >= 1, got {got}")
    if not 0 < zoom <= 1:
        raise ValueError(f"zoom must be in (0, 1], got {zoom}")
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(x))
    h, w = t.shape[-2:]
    ch, cw = max(1, round(h * zoom)), max(1, round(w * zoom))
    top, left = (h - ch) // 2, (w - cw) // 2
    z = F.interpolate(
        t[:, :, top : top + ch, left : left + cw], size=(h, w), mode="bilinear", align_corners=False
    )
    return torch.cat([t, t.flip(-1), z, z.flip(-1)]).numpy().astype(np.float32, copy=False)
