import io

import numpy as np
import pytest
from PIL import Image

from tcsched.data import default_photo, default_photos, list_images
from tcsched.imaging import ImageDecodeError, preprocess_batch, preprocess_bytes, resized_size


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
