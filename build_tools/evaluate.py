"""``tcsched eval``: top-1/top-5 of the served ensemble (per variant) against torchvision eager, on labeled images.

The eager reference uses torchvision's own transform (``MobileNet_V2_Weights.IMAGENET1K_V1.transforms()``) and
``torchvision.io``-free PIL loading as ``torchvision.datasets.folder.pil_loader`` does: an independent path, so a
preprocessing bug in the served pipeline shows up as a gap.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from tcsched.data import ImageItem
from tcsched.metrics import wilson_interval


@dataclass
class EvalRow:
    """One evaluated configuration. Fractions in [0, 1]; ``ci95_top1`` is the Wilson 95% interval."""

    name: str
    n_images: int
    top1: float
    top5: float
    ci95_top1: tuple[float, float]
    agreement_with_reference: float | None = None
    errors: int = 0
    variants_used: dict[str, int] | None = None
    mean_latency_ms: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def row_from_topk(
    name: str,
    labels: np.ndarray,
    top5_idx: np.ndarray,
    reference_top1: np.ndarray | None = None,
    errors: int = 0,
    **extra,
) -> EvalRow:
    """Build an :class:`EvalRow` from top-5 class indices [N, 5] (best first) and labels [N]."""
    top1_hits = top5_idx[:, 0] == labels
    hits = int(top1_hits.sum())
    agree = None if reference_top1 is None else float((top5_idx[:, 0] == reference_top1).mean())
    return EvalRow(
        name=name,
        n_images=len(labels),
        top1=float(top1_hits.mean()),
        top5=float((top5_idx == labels[:, None]).any(axis=1).mean()),
        ci95_top1=wilson_interval(hits, len(labels)),
        agreement_with_reference=agree,
        errors=errors,
        **extra,
    )


def eager_top5(items: Sequence[ImageItem], batch_size: int = 32, weights=None) -> np.ndarray:
    """Top-5 class indices [N, 5] of torchvision MobileNetV2 in eager PyTorch (fp32, CPU)."""
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
    return np.concatenate(out)
