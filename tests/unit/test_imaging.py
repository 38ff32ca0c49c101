import io
import re
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from tcsched.data import default_photo, default_photos, list_images
from tcsched.imaging import (
    MAX_ASPECT_RATIO,
    MAX_SOURCE_PIXELS,
    ImageDecodeError,
    PreprocessError,
    PreprocessSpec,
    check_image_size,
    client_safe_text,
    decode_image,
    draft_scale,
    preprocess_batch,
    preprocess_bytes,
    preprocess_pil,
    resized_size,
    to_rgb,
)
from tcsched.pixels import dtype_of_model_config, normalise
from tcsched.preprocessing import IMAGENET


def torchvision_reference(path):
    torchvision = pytest.importorskip("torchvision")
    tf = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1.transforms()
    with open(path, "rb") as f:
        return tf(Image.open(f).convert("RGB")).numpy()


@pytest.mark.parametrize("name", ["chelsea", "coffee", "camera", "rocket", "motorcycle_left"])
def test_preprocess_equals_torchvision_eval_transform(name):
    path = default_photo(name)
    ours = preprocess_bytes(path.read_bytes())
    assert ours.shape == (3, 224, 224) and ours.dtype == np.float32 and ours.flags["C_CONTIGUOUS"]
    # bit-exact: the same float32 operations in the same order as torchvision's ToTensor + Normalize
    np.testing.assert_array_equal(ours, torchvision_reference(path))


def test_preprocess_equals_torchvision_on_imagenet_jpegs_including_gray(imagenet_sample):
    items = list_images(imagenet_sample)
    gray = [it for it in items if Image.open(it.path).mode == "L"][:3]
    assert gray, "the sample is documented to hold grayscale JPEGs"
    for it in items[:5] + gray:
        np.testing.assert_array_equal(preprocess_bytes(it.read_bytes()), torchvision_reference(it.path))


def torchvision_compose(spec: PreprocessSpec):
    """torchvision's eval transform of ``spec``, written out with torchvision's own classes."""
    torchvision = pytest.importorskip("torchvision")
    T = torchvision.transforms
    return T.Compose(
        [
            T.Resize(spec.resize_size, interpolation=T.InterpolationMode(spec.interpolation)),
            T.CenterCrop(list(spec.crop_size)),
            T.ToTensor(),
            T.Normalize(spec.mean, spec.std),
        ]
    )


def test_default_spec_is_the_weights_preset():
    torchvision = pytest.importorskip("torchvision")
    preset = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1.transforms()
    assert IMAGENET.resize_size == preset.resize_size[0] and list(IMAGENET.crop_size) == preset.crop_size * 2
    assert IMAGENET.interpolation == preset.interpolation.value
    assert (list(IMAGENET.mean), list(IMAGENET.std)) == (preset.mean, preset.std)


NON_DEFAULT_SPECS = [
    # an EfficientNet-B2-like preset: bicubic, resize 292, crop 260, mean = std = 0.5
    PreprocessSpec(resize_size=292, crop_size=260, interpolation="bicubic", mean=(0.5,) * 3, std=(0.5,) * 3),
    # rectangular crop (h != w), another filter
    PreprocessSpec(resize_size=240, crop_size=(200, 232), interpolation="lanczos"),
    PreprocessSpec(resize_size=160, crop_size=(144, 96), interpolation="nearest", mean=(0.1, 0.2, 0.3)),
    PreprocessSpec(resize_size=230, crop_size=(224, 180), interpolation="box"),
    PreprocessSpec(resize_size=256, crop_size=224, interpolation="hamming"),
]


@pytest.mark.parametrize("spec", NON_DEFAULT_SPECS, ids=lambda s: f"{s.interpolation}{list(s.crop_size)}")
def test_non_default_specs_equal_torchvision_bit_for_bit(spec, imagenet_sample):
    """Every PIL filter torchvision maps, square and rectangular crops, other mean/std: the same PIL call and
    the same float32 operations as torchvision, so bit-identical (bicubic included: PIL resizes in both)."""
    tf = torchvision_compose(spec)
    items = list_images(imagenet_sample)[:4]
    paths = [it.path for it in items] + [default_photo("rocket"), default_photo("camera")]  # camera: gray
    for path in paths:
        ours = preprocess_bytes(path.read_bytes(), spec=spec)
        assert ours.shape == (3, *spec.crop_size) and ours.dtype == np.float32
        with open(path, "rb") as f:
            ref = tf(Image.open(f).convert("RGB")).numpy()
        np.testing.assert_array_equal(ours, ref, err_msg=f"{path.name} {spec}")


def test_batch_of_a_rectangular_spec_has_its_shape():
    spec = PreprocessSpec(resize_size=240, crop_size=(200, 232))
    good = default_photo("chelsea").read_bytes()
    out = preprocess_batch(np.array([[good], [good]], dtype=object), spec=spec)
    assert out.shape == (2, 3, 200, 232)
    np.testing.assert_array_equal(out[1], preprocess_bytes(good, spec=spec))


def test_spec_with_other_than_three_channels_is_refused():
    gray = PreprocessSpec(mean=(0.5,), std=(0.25,))
    good = default_photo("chelsea").read_bytes()
    for call in (
        lambda: preprocess_bytes(good, spec=gray),
        lambda: preprocess_batch(np.array([[good]], dtype=object), spec=gray),
        lambda: preprocess_pil(Image.open(default_photo("chelsea")), spec=gray),
    ):
        with pytest.raises(PreprocessError, match="mean/std have 1 values.*expected 3"):
            call()


def test_the_aspect_limit_follows_the_specs_resize():
    """The bound is MAX_ASPECT_RATIO x the spec's resize on the longer side, checked on the header."""
    with pytest.raises(ImageDecodeError, match="at most 1600 px"):
        preprocess_bytes(_png(1700, 100), spec=PreprocessSpec(resize_size=100, crop_size=96))
    assert preprocess_bytes(_png(1600, 100), spec=PreprocessSpec(resize_size=100, crop_size=96)).shape == (
        3,
        96,
        96,
    )


@pytest.mark.parametrize("w,h", [(640, 480), (480, 640), (256, 256), (300, 1000), (1, 1)])
def test_resized_size_short_side_256(w, h):
    nw, nh = resized_size(w, h)
    assert min(nw, nh) == 256
    assert abs(max(nw, nh) / 256 - max(w, h) / min(w, h)) < 0.01 or max(w, h) == min(w, h)


def test_tiny_and_rgba_and_palette_images_are_accepted():
    for mode in ("RGBA", "P", "L", "CMYK"):
        buf = io.BytesIO()
        Image.new(mode, (7, 3)).save(buf, format="PNG" if mode != "CMYK" else "JPEG")
        assert preprocess_bytes(buf.getvalue()).shape == (3, 224, 224)


@pytest.mark.parametrize(
    "data,needle",
    [
        (b"", "empty input"),
        (b"this is plain text, not an image", "cannot decode"),
        (b"\xff\xd8\xff\xe0" + b"\x00" * 40, "cannot decode"),
    ],
)
def test_bad_bytes_raise_clear_error(data, needle):
    with pytest.raises(ImageDecodeError, match=needle) as e:
        preprocess_bytes(data)
    assert "expected" in str(e.value)


def test_truncated_jpeg_is_an_error():
    data = default_photo("rocket").read_bytes()
    with pytest.raises(ImageDecodeError):
        preprocess_bytes(data[: len(data) // 3])


def test_batch_error_names_the_element():
    good = default_photos()[0].read_bytes()
    with pytest.raises(ImageDecodeError, match="batch element 1"):
        preprocess_batch(np.array([[good], [b"junk"]], dtype=object))
    assert preprocess_batch(np.array([[good], [good]], dtype=object)).shape == (2, 3, 224, 224)


# --- hostile and unusual images ------------------------------------------------------------------------------


def _png(w: int, h: int, mode: str = "L") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (w, h)).save(buf, format="PNG")
    return buf.getvalue()


def _png16(a: np.ndarray) -> bytes:
    """A 16-bit PNG of uint16 ``a`` ([H, W] gray, [H, W, 3] RGB, [H, W, 4] RGBA), written by hand: PIL writes
    16-bit gray only. PNG spec: big-endian samples, filter byte 0 per row, color types 0 / 2 / 6."""
    h, w = a.shape[:2]
    color_type = {2: 0, 3: {3: 2, 4: 6}.get(a.shape[-1])}[a.ndim]
    raw = b"".join(b"\x00" + a[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    )


def _encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


ADDRESS = re.compile(r"(?<![0-9A-Za-z])0x[0-9a-fA-F]+")  # "0x7f3a..." (not the "0x1" of "60000x1")


def _assert_client_safe(msg: str) -> None:
    assert not ADDRESS.search(msg) and "object at" not in msg, msg
    assert "site-packages" not in msg and "/PIL/" not in msg, msg
    assert len(msg) < 500, msg


@pytest.mark.parametrize("w,h", [(60000, 1), (1, 60000), (20000, 3), (17, 1), (4097, 256)])
def test_extreme_aspect_ratios_are_refused_from_the_header(w, h):
    data = _png(w, h)
    t0 = time.perf_counter()
    with pytest.raises(ImageDecodeError, match="aspect ratio of at most 16:1") as e:
        preprocess_bytes(data)
    # refused before decoding: the resize of 60000x1 used to take ~40 s and 16 GB, 20000x3 2-5 s
    assert time.perf_counter() - t0 < 0.5
    assert f"{w}x{h}" in str(e.value)
    _assert_client_safe(str(e.value))


@pytest.mark.parametrize("w,h", [(16, 1), (1, 16), (4096, 256), (256, 4096), (1, 1)])
def test_aspect_ratios_up_to_16_are_accepted(w, h):
    nw, nh = resized_size(w, h)
    assert max(nw, nh) <= MAX_ASPECT_RATIO * 256
    assert preprocess_bytes(_png(w, h)).shape == (3, 224, 224)


def test_source_pixel_limit_is_checked_before_decoding():
    side = int(MAX_SOURCE_PIXELS**0.5) + 1  # 5793 x 5793: just over 32 Mi pixels
    assert side * side > MAX_SOURCE_PIXELS > (side - 1) ** 2
    t0 = time.perf_counter()
    with pytest.raises(ImageDecodeError, match=f"exceeds the limit of {MAX_SOURCE_PIXELS} pixels"):
        decode_image(b"P6\n%d %d\n255\n" % (side, side))  # a header without pixels: never decoded
    assert time.perf_counter() - t0 < 0.5
    with pytest.raises(ImageDecodeError, match="exceeds the limit"):
        check_image_size(side, side)
    check_image_size(side - 1, side - 1)


@pytest.mark.parametrize("header", [b"P6\n60000 60000\n255\n", b"P6\n10000 10000\n255\n"])
def test_decompression_bomb_headers_are_this_images_error(header):
    """PIL raises DecompressionBombError (warns below 2x its threshold) while parsing the header."""
    with pytest.raises(ImageDecodeError, match="decompression-bomb threshold") as e:
        preprocess_bytes(header)
    assert "pixels" in str(e.value) and f"at most {MAX_SOURCE_PIXELS}" in str(e.value)
    _assert_client_safe(str(e.value))


def test_batch_with_a_bomb_names_it():
    good = default_photo("chelsea").read_bytes()
    with pytest.raises(ImageDecodeError, match="batch element 1: image of 60000x1"):
        preprocess_batch(np.array([[good], [_png(60000, 1)]], dtype=object))


@pytest.mark.parametrize(
    "data",
    [
        b"this is plain text, not an image",
        b"\x89PNG\r\n\x1a\n" + b"\x00" * 40,  # PNG signature, broken chunks
        default_photo("rocket").read_bytes()[:3000],  # truncated JPEG
        _encode(Image.open(default_photo("chelsea")))[:20_000],  # truncated PNG
        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n",  # EPS would run Ghostscript: not allowed
        b"GIF89a" + b"\xff" * 20,
        b"BM" + b"\xff" * 60,
        bytes(range(256)) * 4000,  # 1 MB of noise
    ],
)
def test_decode_errors_are_clear_bounded_and_free_of_addresses(data):
    with pytest.raises(ImageDecodeError, match="cannot decode") as e:
        preprocess_bytes(data)
    msg = str(e.value)
    _assert_client_safe(msg)
    assert f"{len(data)} bytes" in msg and data[:8].hex() in msg and "expected a JPEG, PNG" in msg


def test_formats_outside_the_allowed_list_are_refused():
    img = Image.open(default_photo("chelsea")).convert("RGB").resize((32, 32))
    for fmt in ("ICO", "TGA", "PCX"):
        with pytest.raises(ImageDecodeError, match="not a recognised image format"):
            decode_image(_encode(img, fmt))
    for fmt in ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP", "PPM"):
        assert decode_image(_encode(img, fmt)).size == (32, 32)


def test_client_safe_text_removes_addresses_paths_and_bounds_length():
    text = client_safe_text(
        "cannot identify image file <_io.BytesIO object at 0x7f3a2b1c4d50> in "
        "/work/main/.venv/lib/python3.11/site-packages/PIL/Image.py at 0xdeadbeef00 " + "A" * 10_000
    )
    assert not ADDRESS.search(text) and "site-packages" not in text and "<input>" in text and "<path>" in text
    assert len(text) <= 160 and text.endswith("...")


def test_16_bit_gray_png_equals_its_8_bit_version():
    """A 16-bit PNG made from an 8-bit one (v * 257, as image tools widen) decodes to exactly the 8-bit image;
    PIL's convert("RGB") clipped it to white before."""
    gray8 = np.asarray(Image.open(default_photo("camera")).convert("L"))
    data16 = _encode(Image.fromarray(gray8.astype(np.uint16) * 257))
    assert Image.open(io.BytesIO(data16)).mode == "I;16"
    np.testing.assert_array_equal(preprocess_bytes(data16), preprocess_bytes(_encode(Image.fromarray(gray8))))


def test_16_bit_gray_and_rgb_pngs_keep_the_high_byte_alike():
    rng = np.random.default_rng(0)
    v = rng.integers(0, 65536, (40, 50), dtype=np.uint16)
    high = (v >> 8).astype(np.uint8)
    ref = preprocess_bytes(_encode(Image.fromarray(high)))
    np.testing.assert_array_equal(preprocess_bytes(_png16(v)), ref)  # gray 16: our v >> 8
    np.testing.assert_array_equal(
        preprocess_bytes(_png16(np.stack([v] * 3, -1))), ref
    )  # RGB 16: Pillow's own
    rgba = np.stack([v, v, v, rng.integers(0, 65536, v.shape, dtype=np.uint16)], -1)
    np.testing.assert_array_equal(preprocess_bytes(_png16(rgba)), ref)  # alpha dropped, as pil_loader


def test_other_high_bit_depth_modes_are_scaled_not_clipped():
    rng = np.random.default_rng(1)
    v = rng.integers(0, 65536, (30, 40), dtype=np.uint16)
    expected = to_rgb(Image.fromarray((v >> 8).astype(np.uint8)))
    big_endian = Image.frombytes("I;16B", (40, 30), v.astype(">u2").tobytes())
    assert np.asarray(to_rgb(big_endian)).tolist() == np.asarray(expected).tolist()
    pgm16 = b"P5\n40 30\n65535\n" + v.astype(">u2").tobytes()  # Pillow opens it as mode I
    img = decode_image(pgm16)
    np.testing.assert_array_equal(np.asarray(img), np.asarray(expected))
    f = rng.random((30, 40), dtype=np.float32)
    tiff = _encode(Image.fromarray(f), "TIFF")
    assert Image.open(io.BytesIO(tiff)).mode == "F"
    np.testing.assert_array_equal(np.asarray(decode_image(tiff))[..., 0], np.rint(f * 255).astype(np.uint8))
    f[3, 4] = np.nan
    with pytest.raises(ImageDecodeError, match="NaN or infinite"):
        decode_image(_encode(Image.fromarray(f), "TIFF"))


@pytest.mark.parametrize(
    "mode,fmt",
    [
        ("L", "PNG"),
        ("P", "PNG"),
        ("LA", "PNG"),
        ("RGBA", "PNG"),
        ("1", "PNG"),
        ("CMYK", "JPEG"),
        ("CMYK", "TIFF"),
        ("P", "GIF"),
        ("L", "JPEG"),
    ],
)
def test_8_bit_modes_convert_exactly_as_torchvision_pil_loader(mode, fmt, tmp_path):
    path = tmp_path / f"chelsea_{mode}.{fmt.lower()}"
    Image.open(default_photo("chelsea")).convert(mode).save(path, format=fmt)
    assert Image.open(path).mode == mode
    np.testing.assert_array_equal(preprocess_bytes(path.read_bytes()), torchvision_reference(path))


# --- the fast method: DCT-domain downscaling of large JPEGs, one resize to the crop -----------------------------


def _steps(a: np.ndarray, b: np.ndarray, spec: PreprocessSpec = IMAGENET) -> np.ndarray:
    """|a - b| of normalised pixels in 8-bit steps of the source (x std x 255)."""
    return np.abs(a - b) * (np.asarray(spec.std, dtype=np.float32).reshape(3, 1, 1) * 255.0)


def _upscaled_jpeg(path, size, quality=90) -> bytes:
    """A real photo upscaled (bicubic) to ``size`` and re-encoded: a large JPEG with real content."""
    return _jpeg(Image.open(path).convert("RGB").resize(size, Image.Resampling.BICUBIC), quality)


def _jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


@pytest.mark.parametrize(
    "w,h,scale",
    [
        (511, 700, 1),
        (512, 700, 2),
        (700, 512, 2),
        (1023, 1100, 2),
        (1024, 1100, 4),
        (2047, 3000, 4),
        (2048, 2048, 8),
        (4000, 3000, 8),
        (255, 300, 1),
    ],
)
def test_draft_keeps_the_shorter_side_at_least_the_resize(w, h, scale):
    """PIL decodes at 1/scale, scale the largest of 8, 4, 2 with min(w, h) // scale >= 256: the resize that
    follows still downsamples; under 2x the resize nothing changes."""
    from math import ceil

    assert draft_scale(w, h, 256) == scale
    data = _jpeg(Image.new("RGB", (w, h), (120, 30, 200)), 75)
    img = decode_image(data, draft=True)
    assert img.size == (ceil(w / scale), ceil(h / scale)) and img.mode == "RGB"
    assert min(img.size) >= 256 or scale == 1
    assert decode_image(data).size == (w, h)  # exact: the full decode
    for size in (100, 160, 300):  # other resizes: the bound follows the spec's size
        assert min(decode_image(data, size=size, draft=True).size) >= min(size, w, h)


def test_draft_applies_to_jpeg_only_and_keeps_gray_and_cmyk():
    gray = Image.open(default_photo("camera")).convert("L").resize((1100, 1100))
    for mode, fmt in (("L", "JPEG"), ("CMYK", "JPEG"), ("RGB", "PNG"), ("RGB", "WEBP")):
        data = _encode(gray.convert(mode), fmt)
        img = decode_image(data, draft=True)
        assert img.mode == "RGB" and img.size == ((275, 275) if fmt == "JPEG" else (1100, 1100)), (mode, fmt)


def test_exact_and_fast_methods(imagenet_sample):
    """exact stays torchvision bit for bit; fast is another computation (it differs), close to it; another name
    is refused."""
    path = list_images(imagenet_sample)[0].path
    data = path.read_bytes()
    np.testing.assert_array_equal(preprocess_bytes(data, method="exact"), torchvision_reference(path))
    np.testing.assert_array_equal(preprocess_bytes(data), preprocess_bytes(data, method="exact"))
    big = _upscaled_jpeg(path, (2048, 1536))
    exact, fast = preprocess_bytes(big, method="exact"), preprocess_bytes(big, method="fast")
    assert fast.shape == exact.shape == (3, 224, 224) and fast.dtype == np.float32
    assert not np.array_equal(exact, fast)
    batch = preprocess_batch(np.array([[big], [data]], dtype=object), method="fast")
    np.testing.assert_array_equal(batch[0], fast)
    np.testing.assert_array_equal(
        preprocess_pil(Image.open(path), method="fast"), preprocess_bytes(data, method="fast")
    )
    for call in (
        lambda: preprocess_bytes(data, method="quick"),
        lambda: preprocess_batch(np.array([[data]], dtype=object), method="quick"),
        lambda: preprocess_pil(Image.open(path), method="quick"),
    ):
        with pytest.raises(PreprocessError, match="method 'quick': expected one of exact, fast"):
            call()


# Tolerances of fast vs exact, in 8-bit steps. Without the DCT-domain downscale the only difference is the one
# resize to the crop: the same filter, support and centres, but PIL runs a box resize's vertical pass first when
# that is cheaper, so the intermediate rows round differently: one step at most, on up to a quarter of the pixels
# (imagenet-sample, measured: 0.23 of them on n02108089_boxer). With it, the 1/s decode (libjpeg's reduced
# inverse DCT, close to an s x s block mean) stands in for most of exact's wider triangle filter: a blur of a few
# steps at edges, largest when the decoded side is just over the resize (imagenet-sample upscaled 4x, 8 images
# measured: mean 0.0-1.65 steps, 99th percentile 0-12, the 1.65 and 12 on an 800x532 photo decoded at 1/8 to
# 400x266); a crop two pixels off differs by a mean of 7-25 steps on the same images.
MAX_STEPS_NO_DRAFT = 1.01
MEAN_STEPS_NO_DRAFT = 0.35
MEAN_STEPS_DRAFT = 2.0
P99_STEPS_DRAFT = 16.0


def test_fast_is_close_to_exact_on_real_images(imagenet_sample):
    items = list_images(imagenet_sample)[:: len(list_images(imagenet_sample)) // 8][:8]
    for it in items:
        data = it.read_bytes()
        w, h = Image.open(it.path).size
        d = _steps(preprocess_bytes(data, method="exact"), preprocess_bytes(data, method="fast"))
        if draft_scale(w, h, 256) == 1:
            assert d.max() <= MAX_STEPS_NO_DRAFT and d.mean() <= MEAN_STEPS_NO_DRAFT, (it.path.name, d.max())
        big = _upscaled_jpeg(it.path, (w * 4, h * 4))
        d = _steps(preprocess_bytes(big, method="exact"), preprocess_bytes(big, method="fast"))
        assert d.mean() <= MEAN_STEPS_DRAFT and np.percentile(d, 99) <= P99_STEPS_DRAFT, (
            it.path.name,
            d.mean(),
            np.percentile(d, 99),
        )


def test_fast_keeps_the_geometry_of_a_rectangular_spec():
    """The crop offsets are computed on the source size: a large JPEG's fast crop sits where exact's does
    (a misplaced crop of a detailed photo differs by far more than the blur)."""
    spec = PreprocessSpec(
        resize_size=240, crop_size=(200, 232), interpolation="bicubic", mean=(0.5,) * 3, std=(0.5,) * 3
    )
    big = _upscaled_jpeg(default_photo("astronaut"), (2400, 2100))
    exact = preprocess_bytes(big, spec=spec, method="exact")
    fast = preprocess_bytes(big, spec=spec, method="fast")
    assert fast.shape == exact.shape == (3, 200, 232)
    assert _steps(exact, fast, spec).mean() <= MEAN_STEPS_DRAFT
    shifted = np.roll(exact, 2, axis=2)  # two pixels off: what a wrong offset would look like
    assert _steps(exact, shifted, spec).mean() > 3 * _steps(exact, fast, spec).mean()


def test_fast_decodes_a_12_mpixel_jpeg_several_times_faster(imagenet_sample):
    """The DCT-domain decode skips the inverse transform of 63 of 64 coefficients and the 12 Mpixel resize:
    measured 6-7x here (~100 ms vs ~15 ms); 3x is the bound on a loaded shared machine."""
    big = _upscaled_jpeg(list_images(imagenet_sample)[0].path, (4000, 3000))
    times = {"exact": [], "fast": []}
    for _ in range(3):
        for m in times:
            t0 = time.perf_counter()
            preprocess_bytes(big, method=m)
            times[m].append(time.perf_counter() - t0)
    assert min(times["exact"]) > 3 * min(times["fast"]), times


@pytest.mark.parametrize("method", ["exact", "fast"])
def test_uint8_pixels_normalised_are_the_float32_tensor_bit_for_bit(method, imagenet_sample):
    items = list_images(imagenet_sample)[:6]
    data = np.array([it.read_bytes() for it in items], dtype=object)
    pixels = preprocess_batch(data, method=method, dtype="uint8")
    assert pixels.dtype == np.uint8 and pixels.shape == (6, 3, 224, 224) and pixels.flags["C_CONTIGUOUS"]
    floats = preprocess_batch(data, method=method)
    np.testing.assert_array_equal(normalise(pixels), floats)
    if method == "exact":  # and so torchvision's eval transform too
        np.testing.assert_array_equal(normalise(pixels[0]), torchvision_reference(items[0].path))


def test_pixel_dtype_of_the_preprocess_config_and_bad_dtypes():
    assert dtype_of_model_config({"output": [{"data_type": "TYPE_UINT8", "dims": [3, 224, 224]}]}) == "uint8"
    assert dtype_of_model_config({"output": [{"data_type": "TYPE_FP32", "dims": [3, 224, 224]}]}) == "float32"
    with pytest.raises(
        PreprocessError, match="output data_type 'TYPE_FP16': expected one of TYPE_FP32, TYPE_UINT8"
    ):
        dtype_of_model_config({"output": [{"data_type": "TYPE_FP16"}]})
    with pytest.raises(PreprocessError, match="pixel dtype 'int8': expected one of float32, uint8"):
        preprocess_bytes(default_photo("chelsea").read_bytes(), dtype="int8")
