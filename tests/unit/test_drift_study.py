"""The drift check under study (build_tools/drift_study.py): the rule itself on synthetic and natural images, and
the study on real MobileNetV2 graphs under real corruptions."""

import io

import numpy as np
import pytest
from PIL import Image

from tcsched.build_tools.build import input_statistics
from tcsched.build_tools.drift_study import CORRUPTIONS, DriftResult, drift_check, drift_study
from tcsched.data import default_photo, default_photos
from tcsched.imaging import PreprocessSpec, preprocess_bytes, preprocess_pil
from tcsched.input_stats import saturated_fraction


@pytest.fixture(scope="module")
def stats():
    return input_statistics(np.stack([preprocess_bytes(p.read_bytes()) for p in default_photos()]))


def _png(arr):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return preprocess_bytes(buf.getvalue())


@pytest.mark.parametrize(
    "name,arr,needle",
    [
        ("black", np.zeros((64, 64, 3), np.uint8), "image"),
        ("white", np.full((64, 64, 3), 255, np.uint8), "image"),
        ("flat gray", np.full((64, 64, 3), 128, np.uint8), "std"),
    ],
)
def test_non_natural_images_are_out_of_distribution(stats, name, arr, needle):
    d = drift_check(_png(arr), stats)
    assert d.out_of_distribution and needle in d.reason


def test_natural_photos_are_in_distribution(stats, imagenet_sample):
    from tcsched.data import list_images

    items = list_images(imagenet_sample)[:60]
    flagged = [
        it.path.name
        for it in items
        if drift_check(preprocess_bytes(it.read_bytes()), stats).out_of_distribution
    ]
    assert len(flagged) <= 6, flagged  # calibrated on 12 photos: a few real outliers are fine, not a rule
    assert not drift_check(preprocess_bytes(default_photo("chelsea").read_bytes()), stats).out_of_distribution
    assert drift_check(np.zeros((3, 8, 8), np.float32), None) == DriftResult(False)


def test_saturated_fraction():
    assert saturated_fraction(_png(np.full((8, 8, 3), 255, np.uint8))) == 1.0
    assert saturated_fraction(_png(np.full((8, 8, 3), 100, np.uint8))) == 0.0


def test_study_measures_agreement_on_flagged_and_unflagged_images(stats):
    """On a tiny real-valued classifier: the study's counts add up and each corruption is applied."""
    from tcsched.ort_runtime import OrtClassifier
    from tests.helpers import tiny_classifier

    photos = [Image.open(p.path).convert("RGB") for p in default_photos()[:6]]
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        clf = OrtClassifier(tiny_classifier(f"{d}/t.onnx"), threads=1)
        small = lambda im: preprocess_pil(im, spec=PreprocessSpec(resize_size=36, crop_size=32))  # noqa: E731
        study = drift_study(
            photos, small, clf.predict, lambda x: clf.predict(x + 0.05), stats, cascade_threshold=0.1
        )
    names = [r.corruption for r in study.rows]
    assert names == ["clean", *CORRUPTIONS, "pooled"]
    pooled = study.rows[-1]
    assert pooled.n_images == 6 * (len(CORRUPTIONS) + 1)
    assert pooled.flagged == sum(r.flagged for r in study.rows[:-1])
    dark = next(r for r in study.rows if r.corruption == "brightness x0.3")
    assert dark.flagged >= 1  # very dark copies are what the rule flags
    assert "flagged" in study.markdown() and isinstance(study.rule_earns_place, bool)
