"""The independent reference of ``tcsched eval`` (tcsched.client.evaluation): the source model in eager PyTorch on
labeled images.

The reference rebuilds the repository's model from its manifest (``Manifest.model``: torchvision MobileNetV2 by
default, a torchvision architecture or a ``package.module:callable`` with the recorded weights file; for an ONNX
source, which has no torch form, ONNX Runtime on the original file) and makes its pixels with torchvision's own
transforms (the ``ImageClassification`` eval preset of torchvision/transforms/_presets.py with the manifest's
preprocessing: ``Resize(resize_size, interpolation, antialias=True)``, ``CenterCrop(crop_size)``, to float /255,
``Normalize(mean, std)``) after ``torchvision.datasets.folder.pil_loader``'s PIL loading: an
independent path, so a preprocessing bug in the served pipeline shows up as a gap.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from tcsched.data import ImageItem
from tcsched.preprocessing import IMAGENET, PreprocessSpec


def torchvision_transform(spec: PreprocessSpec = IMAGENET):
    """torchvision's eval transform of ``spec``: PIL RGB image -> float32 tensor [C, crop_h, crop_w].

    A square crop is torchvision's own preset class ``ImageClassification`` (what ``weights.transforms()``
    returns); a rectangular one the same steps composed (the preset takes one side)."""
    from torchvision import transforms as T
    from torchvision.transforms._presets import ImageClassification

    interpolation = T.InterpolationMode(spec.interpolation)
    h, w = spec.crop_size
    if h == w:
        return ImageClassification(
            crop_size=h,
            resize_size=spec.resize_size,
            mean=spec.mean,
            std=spec.std,
            interpolation=interpolation,
        )
    return T.Compose(
        [
            T.Resize(spec.resize_size, interpolation=interpolation, antialias=True),
            T.CenterCrop([h, w]),
            T.ToTensor(),
            T.Normalize(list(spec.mean), list(spec.std)),
        ]
    )


def reference_model(manifest=None, weights=None) -> Callable:
    """A function float32 tensor [N, C, H, W] -> logits array [N, classes] of the repository's source model,
    fp32 on the CPU: torch eager, or ONNX Runtime on an ONNX source's original file.

    Raises:
        FileNotFoundError: the recorded weights or ONNX file is gone.
        ValueError: the recorded model cannot be rebuilt (:mod:`tcsched.build_tools.model_source`).
    """
    import torch

    from tcsched.build_tools import model_source as ms
    from tcsched.build_tools.export import load_mobilenet_v2

    src = getattr(manifest, "model", None)
    if src is None or src.kind == "default":
        model = load_mobilenet_v2(weights if weights is not None else getattr(src, "weights_file", None))
    elif src.kind == "onnx":
        from pathlib import Path

        import onnxruntime as ort

        # the original file with its batch axis made dynamic (the build's rule), not the build's graph
        model, *_ = ms.load_onnx_classifier(Path(src.onnx_file))
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return lambda x: sess.run(None, {ms.INPUT_NAME: x.numpy()})[0]
    else:
        w = weights if weights is not None else src.weights_file
        state = ms.load_state_dict(w) if w is not None else None
        if src.kind == "torchvision":
            model = ms.torchvision_model(src.target, state)
        else:
            model = ms.callable_model(src.target)
            if state is not None:
                ms.check_state_dict(model, state, src.target)
                model.load_state_dict(state)
    model.eval()

    def run(x):
        with torch.no_grad():
            return model(x).numpy()

    return run


def eager_top5(
    items: Sequence[ImageItem],
    batch_size: int = 32,
    weights=None,
    on_batch: Callable[[int], None] | None = None,
    manifest=None,
) -> np.ndarray:
    """Top-5 class indices [N, 5] of the source model of ``manifest`` (default: torchvision MobileNetV2) in eager
    PyTorch (fp32, CPU), on pixels made by torchvision with the manifest's preprocessing; ``weights``: another
    state dict than the recorded one; ``on_batch(n)`` is called after each batch of ``n`` images (progress)."""
    import torch
    from PIL import Image

    spec = manifest.preprocess_spec if manifest is not None else IMAGENET
    tf = torchvision_transform(spec)
    run = reference_model(manifest, weights)
    out = []
    for i in range(0, len(items), batch_size):
        xs = []
        for it in items[i : i + batch_size]:
            with open(it.path, "rb") as f:
                xs.append(tf(Image.open(f).convert("RGB")))
        logits = torch.as_tensor(run(torch.stack(xs)))
        out.append(logits.topk(5, dim=1).indices.numpy())
        if on_batch is not None:
            on_batch(len(xs))
    return np.concatenate(out)
