"""The independent reference of ``tcsched eval`` (tcsched.client.evaluation): torchvision eager on labeled images.

The eager reference uses torchvision's own transform (``MobileNet_V2_Weights.IMAGENET1K_V1.transforms()``) and
``torchvision.io``-free PIL loading as ``torchvision.datasets.folder.pil_loader`` does: an independent path, so a
preprocessing bug in the served pipeline shows up as a gap.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from tcsched.data import ImageItem


def eager_top5(
    items: Sequence[ImageItem],
    batch_size: int = 32,
    weights=None,
    on_batch: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Top-5 class indices [N, 5] of torchvision MobileNetV2 in eager PyTorch (fp32, CPU); ``on_batch(n)`` is
    called after each batch of ``n`` images (progress)."""
    import torch
    import torchvision
    from PIL import Image

    from tcsched.build_tools.export import load_mobilenet_v2

    model = load_mobilenet_v2(weights)
    tf = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1.transforms()
    out = []
    with torch.no_grad():
        for i in range(0, len(items), batch_size):
            xs = []
            for it in items[i : i + batch_size]:
                with open(it.path, "rb") as f:
                    xs.append(tf(Image.open(f).convert("RGB")))
            out.append(model(torch.stack(xs)).topk(5, dim=1).indices.numpy())
            if on_batch is not None:
                on_batch(len(xs))
    return np.concatenate(out)
