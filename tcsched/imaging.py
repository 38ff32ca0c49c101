"""Image decoding and the eval transform of a :class:`tcsched.preprocessing.PreprocessSpec`, in PIL + numpy (no
torch: this runs inside Triton).

The transform reproduces torchvision's eval transform of the spec, ``Resize(resize_size, interpolation,
antialias=True)`` on the shorter side, ``CenterCrop(crop_size)``, ``ToTensor`` (/255), ``Normalize(mean, std)``
(the default spec :data:`tcsched.preprocessing.IMAGENET` is ``MobileNet_V2_Weights.IMAGENET1K_V1``'s preset,
torchvision/transforms/_presets.py). On PIL images torchvision's Resize calls ``PIL.Image.resize`` with the size
from ``torchvision.transforms.functional._compute_resized_output_size`` and the PIL filter of
``torchvision.transforms.functional.pil_modes_mapping``, and CenterCrop rounds the offsets with
``int(round(...))``; all three are reproduced here, so the output is bit-identical to torchvision's (checked in
tests/unit/test_imaging.py).

Client bytes are untrusted. :func:`decode_image` bounds what a decode *produces*, from the header alone
(``Image.open`` parses only the header) and before any pixel is decoded:

- encoded size <= :data:`MAX_ENCODED_BYTES` (32 MiB);
- source pixels <= :data:`MAX_SOURCE_PIXELS` (32 Mi = 33.5 Mpixel: a 24-30 Mpixel camera original or a
  12 Mpixel phone photo fits; 0.37x PIL's own decompression-bomb warning threshold ``Image.MAX_IMAGE_PIXELS``,
  89.5 Mpixel, whose 2x is PIL's hard error). At the limit the decoded RGB image is 100 MB; measured on the
  project's 2-core machine, one 40 Mpixel JPEG takes 0.9 s and one 40 Mpixel PNG 1.3 s to decode and transform,
  a flat 5792x5792 PNG (33.5 Mpixel, 32 KB) 0.25 s alone and up to 2 s on a loaded server;
- aspect ratio <= :data:`MAX_ASPECT_RATIO` (16): the resize to 256 on the shorter side makes the longer side
  at most 4096 px (1 Mpixel, 16x a square image's 256x256). Without it a 180 KB PNG of 60000x1 pixels passes
  the source limit and the resize makes it 256x15.4M pixels (the preprocess stub peaked at 16 GB RSS). The
  224 px centre crop of a wider one would see under 1/18 of its longer side anyway;
- formats :data:`ALLOWED_FORMATS` only (JPEG, PNG, WebP, BMP, GIF, TIFF, PNM): PIL's EPS plugin runs
  Ghostscript, and the rarely used decoders are where decoder bugs live.

Every failure (any exception of PIL's open, load, convert) is an :class:`ImageDecodeError` of that image alone,
whose message quotes at most the first 8 bytes of the input (as hex) and a bounded, cleaned text of PIL's
reason: no heap addresses (``<_io.BytesIO object at 0x...>``), no file paths.
"""

from __future__ import annotations

import io
import re
import warnings
from collections.abc import Mapping

import numpy as np
from PIL import Image, UnidentifiedImageError

from tcsched.pixels import PixelDtype, normalise
from tcsched.pixels import check_dtype as _check_dtype
from tcsched.preprocessing import (
    IMAGENET,
    IMAGENET_MEAN,
    IMAGENET_STD,
    METHOD_KEY,
    METHODS,
    Method,
    PreprocessError,
    PreprocessSpec,
)

__all__ = [
    "IMAGENET",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageDecodeError",
    "PreprocessError",
    "PreprocessSpec",
    "check_image_size",
    "check_spec",
    "client_safe_text",
    "decode_image",
    "draft_scale",
    "method_of_model_config",
    "preprocess_batch",
    "preprocess_bytes",
    "preprocess_pil",
    "resized_size",
    "spec_of_model_config",
    "to_rgb",
]


RESIZE_SIZE = IMAGENET.resize_size  # 256
CROP_SIZE = IMAGENET.crop_size[0]  # 224
#: torchvision ``InterpolationMode`` -> PIL filter, as ``torchvision.transforms.functional.pil_modes_mapping``
#: (what torchvision's Resize passes to ``PIL.Image.resize`` for a PIL image).
PIL_FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "lanczos": Image.Resampling.LANCZOS,
}
#: channels of the pixels made here: images are decoded to RGB (:func:`to_rgb`)
CHANNELS = 3
MAX_ENCODED_BYTES = 32 * 1024 * 1024
MAX_SOURCE_PIXELS = 32 * 1024 * 1024  # see the module docstring for the why of each limit
MAX_ASPECT_RATIO = 16  # longer side after the resize <= 16 x the shorter one (4096 px for 256)
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "PPM")  # PIL format ids; JPEG includes MPO
_EXPECTED = "expected a JPEG, PNG, WebP, BMP, GIF, TIFF or PNM image"
_MAX_REASON_CHARS = 160
_HEAD_BYTES = 8


class ImageDecodeError(ValueError):
    """The bytes are not an acceptable image; the message says what was received and what is expected.

    A client error: the Triton models answer it with ``INVALID_ARG`` (HTTP 400, gRPC INVALID_ARGUMENT).
    """


_OBJECT_REPR = re.compile(r"<[^<>]{0,200}\bat 0x[0-9a-fA-F]+>")  # "<_io.BytesIO object at 0x7f...>"
_HEX_ADDRESS = re.compile(r"\b0x[0-9a-fA-F]{6,}\b")
_PATH = re.compile(r"(?:[A-Za-z]:)?(?:[\\/][\w.+\-]+){2,}")  # /usr/lib/python3/site-packages/PIL/...


def client_safe_text(text: str, limit: int = _MAX_REASON_CHARS) -> str:
    """``text`` fit to quote in an error for a client: object reprs, hex addresses and file paths replaced,
    control characters dropped, at most ``limit`` characters (then ``...``)."""
    text = _OBJECT_REPR.sub("<input>", text)
    text = _HEX_ADDRESS.sub("<address>", text)
    text = _PATH.sub("<path>", text)
    text = "".join(c if c.isprintable() else " " for c in text).strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _reason(e: BaseException) -> str:
    if isinstance(e, UnidentifiedImageError):
        return "not a recognised image format"
    if isinstance(e, MemoryError):
        return "out of memory while decoding"
    text = client_safe_text(str(e))
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _decode_failure(data: bytes, e: BaseException) -> ImageDecodeError:
    head = bytes(data[:_HEAD_BYTES]).hex()
    return ImageDecodeError(
        f"cannot decode {len(data)} bytes (first bytes, hex: {head}) as an image: {_reason(e)}; {_EXPECTED}"
    )


def check_image_size(width: int, height: int, size: int = RESIZE_SIZE) -> None:
    """Refuse an image whose decode or resize would be out of bounds (see the module docstring).

    Raises:
        ImageDecodeError: no pixels, more than :data:`MAX_SOURCE_PIXELS` pixels, or a longer side after the
            resize to ``size`` on the shorter side over ``MAX_ASPECT_RATIO * size``.
    """
    if width < 1 or height < 1:
        raise ImageDecodeError(f"image has no pixels ({width}x{height}); expected at least 1x1")
    if width * height > MAX_SOURCE_PIXELS:
        raise ImageDecodeError(
            f"image of {width}x{height} pixels ({width * height} pixels) exceeds the limit of "
            f"{MAX_SOURCE_PIXELS} pixels; expected at most {MAX_SOURCE_PIXELS} pixels"
        )
    new_w, new_h = resized_size(width, height, size)
    if max(new_w, new_h) > MAX_ASPECT_RATIO * size:
        raise ImageDecodeError(
            f"image of {width}x{height} pixels: the resize to {size} px on its shorter side would make it "
            f"{new_w}x{new_h}; expected an aspect ratio of at most {MAX_ASPECT_RATIO}:1 "
            f"(longer side at most {MAX_ASPECT_RATIO * size} px after the resize)"
        )


_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


def to_rgb(img: Image.Image) -> Image.Image:
    """An RGB image of ``img``, 8 bits per channel.

    RGB is returned as is; L, P, PA, LA, RGBA, RGBX, CMYK, YCbCr, 1, ... go through ``img.convert("RGB")``,
    exactly as ``torchvision.datasets.folder.pil_loader`` (alpha dropped, not composited), so the transform stays
    bit-identical to torchvision's. High-bit-depth gray modes, which ``convert`` would clip at 255 (a 16-bit
    PNG turns white), are scaled to 8 bits instead:

    - ``I;16``, ``I;16L``, ``I;16B``, ``I;16N`` (16-bit PNG/TIFF gray): ``v >> 8``, the same rule as Pillow's own
      decoding of 16-bit RGB/RGBA PNGs (it keeps the high byte), so a 16-bit gray PNG and a 16-bit RGB PNG of
      the same gray picture give the same tensor, and one made from an 8-bit image (``v8 * 257``) gives back
      exactly ``v8``;
    - ``I`` (32-bit signed; Pillow's mode for 16-bit PGM/PPM gray, scaled to 0..65535 by Pillow): clipped to
      0..65535, then ``v >> 8``;
    - ``F`` (32-bit float, e.g. float TIFF): taken in the floating-point image convention 0..1, clipped,
      ``round(v * 255)``.

    Raises:
        ImageDecodeError: an ``F`` image with NaN or infinite pixels, or a mode PIL cannot convert to RGB.
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in _SIXTEEN_BIT_MODES or mode == "I":
        a = np.asarray(img)
        if mode == "I":
            a = np.clip(a, 0, 65535)
        return Image.fromarray((a >> 8).astype(np.uint8)).convert("RGB")
    if mode == "F":
        a = np.asarray(img, dtype=np.float32)
        if not np.isfinite(a).all():
            raise ImageDecodeError("floating-point image has NaN or infinite pixels; expected values in 0..1")
        return Image.fromarray(np.rint(np.clip(a, 0.0, 1.0) * 255.0).astype(np.uint8)).convert("RGB")
    try:
        return img.convert("RGB")
    except ValueError as e:
        raise ImageDecodeError(
            f"image mode {client_safe_text(mode, 16)!r} cannot be converted to RGB ({client_safe_text(str(e))}); "
            f"{_EXPECTED} in an RGB, gray, palette, CMYK or 16-bit gray mode"
        ) from None


def decode_image(data: bytes, *, size: int = RESIZE_SIZE, draft: bool = False) -> Image.Image:
    """Decode encoded image bytes (see :data:`ALLOWED_FORMATS`) into an RGB PIL image (see :func:`to_rgb`).

    The header is checked (:func:`check_image_size` for a resize to ``size`` px on the shorter side) before any
    pixel is decoded. Only the first frame of an animated or multi-page image is decoded. EXIF orientation is not
    applied (as torchvision's pil_loader). With ``draft``, a JPEG is decoded at 1 / :func:`draft_scale` of its
    size in the DCT domain (``PIL.JpegImagePlugin.JpegImageFile.draft``), its shorter side still >= ``size``.

    Raises:
        ImageDecodeError: not bytes, empty, over :data:`MAX_ENCODED_BYTES`, a format outside
            :data:`ALLOWED_FORMATS`, a header over the limits of :func:`check_image_size` or over PIL's
            decompression-bomb threshold, or any failure of PIL to decode or convert the pixels.
    """
    return _decode(data, size, draft=draft)[0]


def draft_scale(width: int, height: int, size: int) -> int:
    """The JPEG DCT-domain scale denominator (1, 2, 4 or 8) that PIL's ``JpegImageFile.draft(mode, (size, size))``
    picks for a ``width`` x ``height`` source: the largest power of two <= ``min(width, height) // size``, at
    most 8 (libjpeg's scaled decode keeps 8/8, 4/8, 2/8 or 1/8 of each 8x8 block).

    The decoded image is ``ceil(width / s)`` x ``ceil(height / s)``, so its shorter side stays >= ``size``: the
    resize that follows still downsamples (with its antialiasing filter), never upsamples.
    """
    scale = min(width // size, height // size)
    return next((s for s in (8, 4, 2) if scale >= s), 1)


def _decode(data: bytes, size: int, draft: bool) -> tuple[Image.Image, tuple[int, int], tuple[float, float]]:
    """:func:`decode_image`, and with ``draft`` a JPEG decoded at :func:`draft_scale`.

    Returns:
        (the RGB image, the source's (width, height) from the header, the source's extent in the decoded
        image's pixels: (width / s, height / s), the box of ``PIL.Image.resize`` that maps the source exactly).
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ImageDecodeError(f"expected encoded image bytes, got {type(data).__name__}")
    n = len(data)
    if n == 0:
        raise ImageDecodeError("empty input: expected encoded image bytes (JPEG or PNG), got 0 bytes")
    if n > MAX_ENCODED_BYTES:
        raise ImageDecodeError(
            f"input of {n} bytes exceeds the limit of {MAX_ENCODED_BYTES} bytes; expected less"
        )
    data = bytes(data)
    try:
        with warnings.catch_warnings():
            # PIL warns above Image.MAX_IMAGE_PIXELS and raises DecompressionBombError above twice that, both
            # while parsing the header; both are far above MAX_SOURCE_PIXELS, so either is a refusal here
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        declared = re.search(
            r"\((\d{1,20}) pixels\)", str(e)
        )  # PIL: "Image size (N pixels) exceeds limit ..."
        raise ImageDecodeError(
            f"the image header declares {declared.group(1) + ' pixels' if declared else 'a size'}, over PIL's "
            f"decompression-bomb threshold of {Image.MAX_IMAGE_PIXELS} pixels; expected at most "
            f"{MAX_SOURCE_PIXELS} pixels"
        ) from None
    except Exception as e:  # noqa: BLE001 - whatever PIL raises on hostile bytes is this image's error
        raise _decode_failure(data, e) from None
    try:
        source = (img.width, img.height)
        check_image_size(*source, size)
        extent = (float(source[0]), float(source[1]))
        # JPEG (and MPO, its multi-picture form) only: PIL's draft is a no-op for the other formats
        if draft and img.format in ("JPEG", "MPO") and draft_scale(*source, size) > 1:
            drafted = img.draft("RGB", (size, size))  # mode "RGB": keep YCbCr -> RGB; L and CMYK stay
            if drafted is not None:
                extent = (drafted[1][2], drafted[1][3])
            # the whole file to the decoder at once, not in PIL's 64 KiB blocks (the same pixels; measured ~5%
            # faster on a 12 Mpixel JPEG, whose decode is then mostly entropy decoding)
            img.decodermaxblock = max(img.decodermaxblock, n)
        img.load()
        return to_rgb(img), source, extent
    except ImageDecodeError:
        raise
    except Exception as e:  # noqa: BLE001 - as above
        raise _decode_failure(data, e) from None


def resized_size(width: int, height: int, size: int = RESIZE_SIZE) -> tuple[int, int]:
    """(new_width, new_height) with the shorter side ``size`` and the aspect ratio kept.

    Same arithmetic as torchvision ``_compute_resized_output_size`` (the long side is truncated with ``int``).
    """
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def check_spec(spec: PreprocessSpec) -> None:
    """Refuse a spec that this transform cannot make pixels for.

    Raises:
        PreprocessError: ``spec`` is not a :class:`PreprocessSpec`, or its mean/std do not have
            :data:`CHANNELS` (3, RGB) values: images are decoded to RGB only.
    """
    if not isinstance(spec, PreprocessSpec):
        raise PreprocessError(f"expected a PreprocessSpec, got {type(spec).__name__}")
    if spec.channels != CHANNELS:
        raise PreprocessError(
            f"mean/std have {spec.channels} values: images are decoded to RGB, so expected {CHANNELS} values "
            "each (one per channel)"
        )


def preprocess_pil(
    img: Image.Image,
    *,
    spec: PreprocessSpec = IMAGENET,
    method: Method = "exact",
    dtype: PixelDtype = "float32",
) -> np.ndarray:
    """The eval transform of ``spec`` on one image (converted to RGB by :func:`to_rgb` first).

    Args:
        method: ``exact``: torchvision's transform (resize, then crop), bit-identical; ``fast``: one resize of
            the crop's source box straight to the crop size (the same filter, its support and centres; pixels
            differ from ``exact`` by at most a few 8-bit steps), with ``reducing_gap`` :data:`REDUCING_GAP`.

    Returns:
        float32 array of shape (3, crop_h, crop_w) (``spec.crop_size``), normalised with ``spec.mean`` /
        ``spec.std``; with ``dtype`` ``uint8`` the crop's pixels, uint8 (3, crop_h, crop_w), not normalised.

    Raises:
        ImageDecodeError: the image is over the limits of :func:`check_image_size` (for ``spec.resize_size``).
        PreprocessError: see :func:`check_spec`, or an unknown ``method``.
    """
    check_spec(spec)
    _check_method(method)
    _check_dtype(dtype)
    check_image_size(img.width, img.height, spec.resize_size)
    img = to_rgb(img)
    if method == "fast":
        return _finish(
            _resize_crop_fast(img, img.size, (float(img.width), float(img.height)), spec), spec, dtype
        )
    w, h = resized_size(img.width, img.height, spec.resize_size)
    img = img.resize((w, h), PIL_FILTERS[spec.interpolation])
    top, left = _crop_offsets(w, h, spec)
    crop_h, crop_w = spec.crop_size
    # the spec keeps crop <= resize, so the resized image always holds the crop (torchvision would pad)
    img = img.crop((left, top, left + crop_w, top + crop_h))
    return _finish(img, spec, dtype)


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise PreprocessError(
            f"preprocessing method {client_safe_text(str(method), 32)!r}: expected one of {', '.join(METHODS)}"
        )


def _crop_offsets(w: int, h: int, spec: PreprocessSpec) -> tuple[int, int]:
    """(top, left) of torchvision's CenterCrop of ``spec.crop_size`` in a ``w`` x ``h`` image."""
    crop_h, crop_w = spec.crop_size
    return int(round((h - crop_h) / 2.0)), int(round((w - crop_w) / 2.0))


#: ``PIL.Image.resize(reducing_gap=...)`` of the ``fast`` method: above 3x the remaining downscale an integer
#: box reduction (``Image.reduce``) runs first; Pillow's documentation: from 3.0 the result is "indistinguishable"
#: from the plain resample in most cases.
REDUCING_GAP = 3.0


def _resize_crop_fast(
    img: Image.Image, source: tuple[int, int], extent: tuple[float, float], spec: PreprocessSpec
) -> Image.Image:
    """The crop of ``spec`` by one resize: torchvision's geometry on the ``source`` size (resized size, crop
    offsets), mapped into ``img``, whose pixels cover ``extent`` (source width, height in ``img``'s pixels)."""
    w, h = resized_size(*source, spec.resize_size)
    top, left = _crop_offsets(w, h, spec)
    crop_h, crop_w = spec.crop_size
    fx, fy = extent[0] / w, extent[1] / h
    box = (left * fx, top * fy, (left + crop_w) * fx, (top + crop_h) * fy)
    return img.resize((crop_w, crop_h), PIL_FILTERS[spec.interpolation], box=box, reducing_gap=REDUCING_GAP)


def _finish(img: Image.Image, spec: PreprocessSpec, dtype: PixelDtype) -> np.ndarray:
    """The crop's pixels, uint8 (C, H, W) C-contiguous (ToTensor's layout), normalised unless ``dtype`` is uint8."""
    pixels = np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))
    return pixels if dtype == "uint8" else normalise(pixels, spec)


def preprocess_bytes(
    data: bytes, *, spec: PreprocessSpec = IMAGENET, method: Method = "exact", dtype: PixelDtype = "float32"
) -> np.ndarray:
    """Decode and transform encoded image bytes: float32 (3, crop_h, crop_w) (see :func:`preprocess_pil`), or
    with ``dtype`` ``uint8`` the same crop's 8-bit pixels before normalisation (:func:`normalise` of them is the
    float32 result, bit for bit).

    Args:
        method: ``exact``: torchvision's transform of the fully decoded image, bit-identical. ``fast``: a JPEG
            whose shorter side is >= 2x ``spec.resize_size`` is decoded at 1/2, 1/4 or 1/8 scale in the DCT
            domain (:func:`draft_scale`: its decoded shorter side stays >= the resize), then one resize maps
            the crop's source box straight to the crop (:func:`preprocess_pil`). The geometry is the exact
            path's, computed on the source size.

    Raises:
        ImageDecodeError: see :func:`decode_image`.
        PreprocessError: see :func:`check_spec`, or an unknown ``method`` or ``dtype``.
    """
    check_spec(spec)
    _check_method(method)
    _check_dtype(dtype)
    if method == "exact":
        return preprocess_pil(decode_image(data, size=spec.resize_size), spec=spec, dtype=dtype)
    img, source, extent = _decode(data, spec.resize_size, draft=True)
    return _finish(_resize_crop_fast(img, source, extent, spec), spec, dtype)


def spec_of_model_config(model_config: Mapping) -> PreprocessSpec:
    """The spec of a ``preprocess`` model: its config's ``preprocessing`` parameter
    (:meth:`PreprocessSpec.from_parameters`; the defaults when absent), checked against the config's output.

    Args:
        model_config: the model config as JSON-decoded dict (``json.loads(args["model_config"])`` in a Python
            backend's ``initialize``): ``parameters`` ({key: {"string_value": ...}}) and ``output`` (one tensor
            whose ``dims`` are [C, H, W]).

    Raises:
        PreprocessError: the parameter is not a valid spec, the spec fails :func:`check_spec`, or the output's
            dims differ from [3, *crop_size] (the message names the model config and what is expected).
    """
    try:
        spec = PreprocessSpec.from_parameters(model_config.get("parameters") or {})
        check_spec(spec)
        outputs = model_config.get("output") or []
        if len(outputs) != 1:
            raise PreprocessError(f"expected one output tensor [C, H, W], got {len(outputs)}")
        dims = [int(d) for d in outputs[0].get("dims", [])]
        if len(dims) != 3:
            raise PreprocessError(f"output dims {dims}: expected [C, H, W]")
        spec.check_model_input(dims)
    except PreprocessError as e:
        raise PreprocessError(f"preprocess model config: {e}") from None
    return spec


def method_of_model_config(model_config: Mapping) -> Method:
    """The :data:`tcsched.preprocessing.Method` of a ``preprocess`` model's config (parameter ``preprocess_method``;
    ``exact`` when absent).

    Raises:
        PreprocessError: another value (the message names it and the methods expected).
    """
    raw = (model_config.get("parameters") or {}).get(METHOD_KEY)
    if raw is None:
        return "exact"
    value = raw.get("string_value", "") if isinstance(raw, Mapping) else str(raw)
    try:
        _check_method(value)
    except PreprocessError as e:
        raise PreprocessError(f"preprocess model config: parameter {METHOD_KEY}: {e}") from None
    return value


def preprocess_batch(
    images: np.ndarray,
    *,
    spec: PreprocessSpec = IMAGENET,
    method: Method = "exact",
    dtype: PixelDtype = "float32",
) -> np.ndarray:
    """Transform a Triton BYTES tensor of encoded images, shape [B] or [B, 1] (object array of bytes), each
    by :func:`preprocess_bytes` with ``spec``, ``method`` and ``dtype``.

    Returns:
        float32 (or ``dtype``) [B, 3, crop_h, crop_w] (``spec.crop_size``).

    Raises:
        ImageDecodeError: an element is not a decodable image; the message gives its index in the batch.
        PreprocessError: see :func:`check_spec`.
    """
    check_spec(spec)
    _check_method(method)
    _check_dtype(dtype)
    flat = np.asarray(images, dtype=object).reshape(-1)
    out = np.empty((len(flat), CHANNELS, *spec.crop_size), dtype=np.dtype(dtype))
    for i, data in enumerate(flat):
        try:
            out[i] = preprocess_bytes(data, spec=spec, method=method, dtype=dtype)
        except ImageDecodeError as e:
            raise ImageDecodeError(f"batch element {i}: {e}" if len(flat) > 1 else str(e)) from None
    return out
