"""build_tools/preprocess_bench: fast vs exact agreement measured with the pixels the served graph takes."""

import io

import numpy as np
import onnx
import pytest
from PIL import Image

from tcsched.build_tools.graph_surgery import add_pixel_input
from tcsched.build_tools.preprocess_bench import agreement
from tcsched.data import ImageItem
from tcsched.ort_runtime import OrtClassifier
from tcsched.preprocessing import IMAGENET
from tests.helpers import tiny_classifier


def _any_size(path) -> onnx.ModelProto:
    """tiny_classifier with H and W left free (it is all convolutions and a global pool)."""
    m = onnx.load(path)
    dims = m.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "H", "W"
    return m


@pytest.mark.parametrize("pixels", ["float32", "uint8"])
def test_agreement_feeds_the_graph_its_own_pixel_dtype(tmp_path, pixels):
    """A uint8-input graph (a --pixels uint8 build, the default) gets uint8 pixels, a float one float32; the
    DCT-domain downscale is counted and the pixel steps are in 8-bit units either way."""
    m = _any_size(tiny_classifier(tmp_path / "tiny.onnx", classes=5))
    if pixels == "uint8":
        m = add_pixel_input(m, IMAGENET.mean, IMAGENET.std)
    onnx.save(m, tmp_path / "m.onnx")
    clf = OrtClassifier(tmp_path / "m.onnx", threads=1)
    assert str(clf.input_dtype) == pixels
    rng = np.random.default_rng(0)
    items = []
    for i, size in enumerate([(300, 260), (640, 560), (400, 300)]):  # the second: shorter side >= 2 x 256
        img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        (p := tmp_path / f"{i}.jpg").write_bytes(buf.getvalue())
        items.append(ImageItem(p, label=i % 5))
    r = agreement(items, lambda x: clf.predict(x, batch_size=2), IMAGENET, batch=2, dtype=pixels)
    assert r["n"] == 3 and r["drafted"] == 1
    assert 0.0 <= r["agreement"] <= 1.0 and r["agreement_95"][0] <= r["agreement"] <= r["agreement_95"][1]
    # fast resizes the drafted image differently: some steps differ
    assert 0.0 < r["pixel_steps_max"] <= 255.0
    assert set(r["median_ms"]) == {"exact", "fast"} and "top1_fast" in r
