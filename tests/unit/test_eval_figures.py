"""`tcsched eval` beside the build: a forced variant's row carries the manifest's figures on the same images."""

from tcsched.client.evaluation import EvalRow, _build_figures, _build_text
from tcsched.manifest import AccuracyReport
from tests.helpers import make_manifest


def _manifest():
    m = make_manifest({"m_fp32": ("fp32", 0.0, {1: 4.0}), "m_int8": ("int8", 2.0, {1: 2.0})})
    m.variant("m_int8").accuracy_all_images = AccuracyReport(
        dataset="all 300",
        n_images=300,
        top1=0.75,
        agreement_with_fp32=0.97,
        kl_vs_fp32=0.02,
        top1_drop_points=1,
    )
    return m


def _row(n: int) -> EvalRow:
    return EvalRow("served: m_int8", n, 0.76, 0.9, (0.7, 0.8), agreement_with_fp32=0.975)


def test_the_figures_of_the_same_image_set_and_size():
    m = _manifest()
    row = _row(300)
    _build_figures(row, m, "m_int8", "all")
    assert (row.build_top1, row.build_agreement_with_fp32) == (0.75, 0.97)
    assert _build_text(row) == "75.00% / 97.00% (+1.00 / +0.50)"  # served minus build, in points
    row = _row(100)  # the evaluation split: make_manifest's accuracy, on 100 images
    _build_figures(row, m, "m_int8", "evaluation")
    assert (row.build_top1, row.build_agreement_with_fp32) == (0.78, 0.98)


def test_no_figures_for_other_images():
    m = _manifest()
    for n, images, variant in [
        (299, "all", "m_int8"),  # not as many images as the build measured
        (100, "all", "m_int8"),  # the size of the evaluation split, asked for all images
        (300, None, "m_int8"),  # neither set (eval --limit on the whole folder)
        (100, "all", "m_fp32"),  # no figure on all images in this manifest
        (300, "all", "m_int4"),  # a variant the manifest does not have
    ]:
        row = _row(n)
        _build_figures(row, m, variant, images)
        assert row.build_top1 is None and row.build_agreement_with_fp32 is None and _build_text(row) == "-"
