"""Image decoding and the ImageNet eval transform, in PIL + numpy (no torch: this runs inside Triton).

The transform reproduces torchvision's ``ImageClassification`` eval preset of ``MobileNet_V2_Weights.IMAGENET1K_V1``
(torchvision/transforms/_presets.py): ``Resize(256, BILINEAR, antialias=True)`` on the shorter side,
``CenterCrop(224)``, ``ToTensor`` (/255), ``Normalize(mean, std)``. On PIL images torchvision's Resize calls
``PIL.Image.resize`` with the size from ``torchvision.transforms.functional._compute_resized_output_size`` and
CenterCrop rounds the offsets with ``int(round(...))``; both are reproduced here, so the output is bit-identical
to torchvision's (checked in tests/test_imaging.py).
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

# ImageNet channel statistics used by every torchvision classification weight (torchvision _presets.py).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE_SIZE = 256
CROP_SIZE = 224
MAX_IMAGE_PIXELS = 50_000_000  # refuse decompression bombs before decoding
MAX_ENCODED_BYTES = 32 * 1024 * 1024


class ImageDecodeError(ValueError):
    """The bytes are not a decodable image; the message says what was received and what is expected."""


_MEAN_C11 = np.asarray(IMAGENET_MEAN, dtype=np.float32).reshape(3, 1, 1)
_STD_C11 = np.asarray(IMAGENET_STD, dtype=np.float32).reshape(3, 1, 1)


def decode_image(data: bytes) -> Image.Image:
    """Decode encoded image bytes (JPEG, PNG, BMP, WebP, ... anything PIL reads) into an RGB PIL image.

    Gray, palette, CMYK and alpha images are converted to RGB (as ``torchvision.datasets.folder.pil_loader``).

    Raises:
        ImageDecodeError: empty input, input over 32 MiB, an image over 50 Mpixel, or bytes PIL cannot decode.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ImageDecodeError(f"expected encoded image bytes, got {type(data).__name__}")
    n = len(data)
    if n == 0:
        raise ImageDecodeError("empty input: expected encoded image bytes (JPEG or PNG), got 0 bytes")
    if n > MAX_ENCODED_BYTES:
        raise ImageDecodeError(f"input of {n} bytes exceeds the limit of {MAX_ENCODED_BYTES} bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(bytes(data)))
            if img.width * img.height > MAX_IMAGE_PIXELS:
                raise ImageDecodeError(
                    f"image of {img.width}x{img.height} pixels exceeds the limit of {MAX_IMAGE_PIXELS} pixels"
                )
            img.load()
    except ImageDecodeError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombWarning) as e:
        head = bytes(data[:8]).hex()
        raise ImageDecodeError(
            f"cannot decode {n} bytes (first bytes 0x{head}) as an image: {e}; expected JPEG or PNG bytes"
        ) from None
    if img.width < 1 or img.height < 1:
        raise ImageDecodeError(f"image has no pixels ({img.width}x{img.height})")
    return img.convert("RGB")


def resized_size(width: int, height: int, size: int = RESIZE_SIZE) -> tuple[int, int]:
    """(new_width, new_height) with the shorter side ``size`` and the aspect ratio kept.

    Same arithmetic as torchvision ``_compute_resized_output_size`` (the long side is truncated with ``int``).
    """
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def preprocess_pil(img: Image.Image, resize: int = RESIZE_SIZE, crop: int = CROP_SIZE) -> np.ndarray:
    """The eval transform of one RGB image.

    Returns:
        float32 array of shape (3, crop, crop), normalised with :data:`IMAGENET_MEAN` / :data:`IMAGENET_STD`.
    """
    img = img.convert("RGB")
    w, h = resized_size(img.width, img.height, resize)
    img = img.resize((w, h), Image.BILINEAR)
    if w < crop or h < crop:  # only for resize < crop; torchvision pads with zeros (not used by the preset)
        raise ValueError(f"resized image {w}x{h} is smaller than the crop {crop}")
    top = int(round((h - crop) / 2.0))
    left = int(round((w - crop) / 2.0))
    img = img.crop((left, top, left + crop, top + crop))
    # torchvision's order of float32 operations (ToTensor: CHW, .float().div(255); Normalize: .sub_(mean).div_(std)),
    # in place on contiguous channel planes: the same IEEE results, ~3x faster than broadcasting over HWC
    x = np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).astype(np.float32, order="C")  # CHW copy
    x /= np.float32(255.0)
    x -= _MEAN_C11
    x /= _STD_C11
    return x


def preprocess_bytes(data: bytes) -> np.ndarray:
    """Decode and transform encoded image bytes: float32 (3, 224, 224).

    Raises:
        ImageDecodeError: see :func:`decode_image`.
    """
    return preprocess_pil(decode_image(data))


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax (float64 internally), same shape as ``logits``."""
    z = logits.astype(np.float64) - logits.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def preprocess_batch(images: np.ndarray) -> np.ndarray:
    """Transform a Triton BYTES tensor of encoded images, shape [B] or [B, 1] (object array of bytes).

    Returns:
        float32 [B, 3, 224, 224].

    Raises:
        ImageDecodeError: an element is not a decodable image; the message gives its index in the batch.
    """
    flat = np.asarray(images, dtype=object).reshape(-1)
    out = np.empty((len(flat), 3, CROP_SIZE, CROP_SIZE), dtype=np.float32)
    for i, data in enumerate(flat):
        try:
            out[i] = preprocess_bytes(data)
        except ImageDecodeError as e:
            raise ImageDecodeError(f"batch element {i}: {e}" if len(flat) > 1 else str(e)) from None
    return out
