"""What the ``preprocess`` model hands the variants: normalised float32 tensors, or uint8 pixels that the variant
graphs normalise themselves (a ``tcsched build --pixels uint8`` repository), and the normalisation both share.

``float32``: the preprocess model normalises (torchvision's ``ToTensor`` + ``Normalize``) and sends 4 bytes per
value. ``uint8``: it sends the 8-bit crop, a quarter of the bytes through every hop of the ensemble and the BLS
call, and each variant graph starts with the same three float32 operations
(:func:`tcsched.build_tools.graph_surgery.add_pixel_input`), which ONNX Runtime and OpenVINO run (OpenVINO folds
them into the first layer).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import numpy as np

from tcsched.preprocessing import IMAGENET, PreprocessError, PreprocessSpec

__all__ = ["PIXEL_DTYPES", "PixelDtype", "check_dtype", "dtype_of_model_config", "normalisation", "normalise"]

PixelDtype = Literal["float32", "uint8"]
PIXEL_DTYPES: tuple[str, ...] = ("float32", "uint8")
#: Triton config data types of the ``preprocess`` output -> pixel dtype (model_config.proto ``DataType`` names)
CONFIG_DTYPES = {"TYPE_FP32": "float32", "TYPE_UINT8": "uint8"}


def check_dtype(dtype: str) -> None:
    """Raises:
    PreprocessError: ``dtype`` is not one of :data:`PIXEL_DTYPES` (the message names both)."""
    if dtype not in PIXEL_DTYPES:
        shown = str(dtype)[:32]
        raise PreprocessError(f"pixel dtype {shown!r}: expected one of {', '.join(PIXEL_DTYPES)}")


def normalisation(spec: PreprocessSpec) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) as float32 [C, 1, 1]: torchvision's Normalize makes float32 tensors of them."""
    c = spec.channels
    return (
        np.asarray(spec.mean, dtype=np.float32).reshape(c, 1, 1),
        np.asarray(spec.std, dtype=np.float32).reshape(c, 1, 1),
    )


def normalise(pixels: np.ndarray, spec: PreprocessSpec = IMAGENET) -> np.ndarray:
    """float32 of uint8 pixels (..., C, H, W): ``pixels / 255``, minus ``spec.mean``, divided by ``spec.std``.

    torchvision's order of float32 operations (ToTensor: ``.float().div(255)``; Normalize:
    ``.sub_(mean).div_(std)``), in place on contiguous channel planes: the same IEEE results, ~3x faster than
    broadcasting over HWC. The graphs of a ``--pixels uint8`` build run the same three operations first
    (:func:`tcsched.build_tools.graph_surgery.add_pixel_input`).
    """
    mean, std = normalisation(spec)
    x = pixels.astype(np.float32, order="C")
    x /= np.float32(255.0)
    x -= mean
    x /= std
    return x


def dtype_of_model_config(model_config: Mapping) -> PixelDtype:
    """The :data:`PixelDtype` of a ``preprocess`` model's config: its one output's ``data_type``
    (``TYPE_FP32``: normalised float32, ``TYPE_UINT8``: pixels).

    Raises:
        PreprocessError: another data type, or not one output (the message names what was found).
    """
    outputs = model_config.get("output") or []
    if len(outputs) != 1:
        raise PreprocessError(f"preprocess model config: expected one output tensor, got {len(outputs)}")
    raw = str(outputs[0].get("data_type", ""))
    if raw not in CONFIG_DTYPES:
        raise PreprocessError(
            f"preprocess model config: output data_type {raw[:32]!r}: expected one of "
            f"{', '.join(CONFIG_DTYPES)}"
        )
    return CONFIG_DTYPES[raw]  # type: ignore[return-value]
