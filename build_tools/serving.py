"""Strategy decision, last step of the build: what the scheduler may serve, and how.

From the measured variants (``tcsched.build_tools.build.Measurements``): the accuracy-latency Pareto front
(variants off it are kept in the repository but never chosen by the scheduler), the confidence cascades of front
variants calibrated per target agreement (``tcsched.build_tools.cascade``), and the drift-check study on
corrupted evaluation images (``tcsched.build_tools.drift_study``). Writes ``cascade.{md,json,png}`` and
``drift_study.{md,json}`` into the build's report folder.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tcsched.build_tools.augment import label_preserving_views
from tcsched.build_tools.cascade import FrontVerdict, ServingPlan, plan_serving
from tcsched.build_tools.cascade_report import cascade_table, plot_cascades
from tcsched.build_tools.drift_study import DriftStudy, drift_study
from tcsched.data import ImageItem
from tcsched.engines import load_engine
from tcsched.imaging import decode_image, preprocess_pil
from tcsched.jsonio import atomic_write_json, atomic_write_text
from tcsched.ort_runtime import OrtClassifier
from tcsched.preprocessing import IMAGENET, PreprocessSpec

# centre zooms (side fraction) added to the build's 4 views for the cascade calibration, with their flips: one
# tighter and one looser than augment.DEFAULT_ZOOM (0.86); more views of an image make its loss (some view served
# by a stage that could disagree with fp32) a stricter test of it (cross-validated: README "Input-aware scheduling")
EXTRA_ZOOMS = (0.75, 0.93)
VIEW_CHUNK = 32  # images whose views are made and run at once
DRIFT_IMAGES = 96  # evaluation images the drift study corrupts (x 8 versions: ~15 s on 2 cores)
DEFAULT_TARGET = (
    0.99  # the scheduler's default_min_agreement (tcsched.settings): the study's cascade threshold
)


@dataclass
class Serving:
    plan: ServingPlan
    drift: DriftStudy | None


def decide_serving(
    measurements,
    eval_items: Sequence[ImageItem],
    input_statistics,
    threads: int,
    progress=None,
    spec: PreprocessSpec = IMAGENET,
    select_images: np.ndarray | None = None,
    calib_images: np.ndarray | None = None,
    calib_labels: np.ndarray | None = None,
) -> Serving:
    """The Pareto front and the cascades from ``measurements``, then the drift study on ``eval_items``.

    The cascades are calibrated on 8 label-preserving views of each selection image and, when given, of each
    of ``calib_images`` (the calibration split: agreement with fp32 needs no label, and the conformal bound of
    :mod:`tcsched.build_tools.cascade` needs at least 199 images to certify 0.995): the build's 4 views
    (:func:`~tcsched.build_tools.augment.label_preserving_views`) and the centre zooms of
    :data:`EXTRA_ZOOMS` with their flips. Every variant that may be a stage runs on the views made here.

    Args:
        measurements: ``tcsched.build_tools.build.Measurements`` (logits on the selection views and the
            evaluation split, latency profiles, the reference's name).
        input_statistics: the calibration images' :class:`tcsched.manifest.InputStatistics` (the drift rule's).
        spec: the repository's preprocessing (the drift study makes its pixels with it).
        select_images: float32 [N_sel, 3, H, W] the preprocessed selection images (those of
            ``measurements.select_groups``; None: their 4 measured views only).
        calib_images: float32 [N_cal, 3, H, W] preprocessed calibration images, distinct from the selection
            ones (None: the selection images only); calib_labels: int [N_cal] or None.
    """
    m = measurements
    servable = m.served_on_cpu_for_speed()
    select = {n: m.variants[n].selection_logits for n, ok in servable.items() if ok}
    groups, labels = m.select_groups, m.select_labels
    n_sel = len(np.unique(groups))
    # (images, first group id, labels, whether the build's 4 views are still to be made)
    sources: list[tuple[np.ndarray, int, np.ndarray | None, bool]] = []
    if select_images is not None and len(select_images):
        y = None if labels is None else labels[: len(select_images)]
        sources.append((select_images, 0, y, False))
    if calib_images is not None and len(calib_images):
        y = None if calib_labels is None else np.asarray(calib_labels)
        sources.append((calib_images, n_sel, y, True))
    if sources:
        select, groups, labels = _calibration_views(m, select, groups, labels, sources, threads, progress)
    plan = plan_serving(
        servable,
        m.reference,
        select,
        groups,
        m.eval_logits(),
        m.p50_ms_by_batch(),
        _calibration_description(groups, calib_images is not None and len(calib_images) > 0),
        m.eval_description,
        select_labels=labels,
    )
    drift = _drift(m, plan, eval_items, input_statistics, threads, progress, spec)
    return Serving(plan, drift)


def _calibration_views(m, select, groups, labels, sources, threads: int, progress):
    """``select`` (per variant, logits on the measured selection views), ``groups`` and ``labels`` extended by
    the views of ``sources`` (images, first group id, labels, whether the build's 4 views are to be made too),
    each variant of ``select`` run on them: (logits per variant, groups, labels or None)."""
    engines = {
        n: load_engine(
            m.variants[n].runtime,
            m.variants[n].variant.path,
            threads=threads,
            precision=m.variants[n].variant.precision,
        )
        for n in select
    }
    total = sum(len(x) for x, *_ in sources)
    task = progress.add_task("cascade calibration views", total=total) if progress else None
    parts: dict[str, list[np.ndarray]] = {n: [select[n]] for n in select}
    more_groups, more_labels = [groups], [labels]
    for x, first, y, base in sources:
        for i in range(0, len(x), VIEW_CHUNK):  # a chunk of images at a time: 8 views of 266 are 1.3 GB
            chunk = x[i : i + VIEW_CHUNK]
            views = _zoom_views(chunk)
            if base:
                views = np.concatenate([label_preserving_views(chunk), views])
            k = len(views) // len(chunk)
            for n, eng in engines.items():
                parts[n].append(eng.predict(views, batch_size=16))
            more_groups.append(first + np.tile(np.arange(i, i + len(chunk)), k))
            more_labels.append(None if y is None else np.tile(y[i : i + len(chunk)], k))
            if task is not None:
                progress.advance(task, len(chunk))
    select = {n: np.concatenate(p) for n, p in parts.items()}
    labels = None if any(v is None for v in more_labels) else np.concatenate(more_labels)
    return select, np.concatenate(more_groups), labels


def _calibration_description(groups: np.ndarray, with_calibration_split: bool) -> str:
    """The manifest's description of the cascades' calibration rows: the splits, images x views, the rule."""
    n_img = len(np.unique(groups))
    n_views = len(groups) // n_img if len(groups) % n_img == 0 else None
    what = "calibration and selection splits" if with_calibration_split else "selection split"
    return (
        f"{what}: {n_img} images x {n_views or 'up to 8'} label-preserving views (flip, centre zooms); "
        "thresholds by conformal risk control over the images"
    )


def _drift(
    m, plan: ServingPlan, eval_items, input_statistics, threads: int, progress, spec
) -> DriftStudy | None:
    """The drift study of the int8 variant the scheduler serves (on the front) if any, else of the first int8
    variant, on the first :data:`DRIFT_IMAGES` of ``eval_items``; None without an int8 variant or images."""
    # the rule guarded INT8 variants: study the int8 variant that the scheduler serves (on the front) if any
    int8s = [v for v in m.variants.values() if v.variant.precision == "int8"]
    on_front = [v for v in int8s if plan.verdicts.get(v.model_name, FrontVerdict(False)).on_front]
    int8 = (on_front or int8s or [None])[0]
    if int8 is None or not eval_items:
        return None
    threshold = None
    for c in plan.cascades:
        if c.stages == [int8.model_name, m.reference]:
            op = next((o for o in c.operating_points if o.target_agreement == DEFAULT_TARGET), None)
            threshold = op.thresholds[0] if op is not None else None
    fp32 = OrtClassifier(m.variants[m.reference].variant.path, threads=threads)
    q = load_engine(int8.runtime, int8.variant.path, threads=threads, precision=int8.variant.precision)
    images = [decode_image(it.read_bytes()) for it in eval_items[:DRIFT_IMAGES]]
    task = progress.add_task("drift-check study (corruptions)", total=8) if progress is not None else None
    return drift_study(
        images,
        lambda im: preprocess_pil(im, spec=spec),
        lambda x: fp32.predict(x, batch_size=16),
        lambda x: q.predict(x, batch_size=16),
        input_statistics,
        cascade_threshold=threshold,
        on_step=(lambda i: progress.update(task, completed=i)) if task is not None else None,
    )


def _zoom_views(x: np.ndarray) -> np.ndarray:
    """float32 [4N, ...]: for each of :data:`EXTRA_ZOOMS`, the centre zoom of every image, then its flips."""
    n = len(x)
    return np.concatenate([label_preserving_views(x, zoom=z)[2 * n :] for z in EXTRA_ZOOMS])


def write_serving_reports(serving: Serving, measurements, report_dir: Path) -> None:
    """``cascade.md`` (table), ``cascade.json`` (the profiles), ``cascade.png`` (agreement vs cost), and the
    drift study's ``drift_study.md`` / ``.json``."""
    m = measurements
    report_dir.mkdir(parents=True, exist_ok=True)
    p50 = m.p50_ms_by_batch()
    ref_top1 = m.variants[m.reference].eval_logits.argmax(1)
    single = {n: float(np.mean(v.eval_logits.argmax(1) == ref_top1)) for n, v in m.variants.items()}
    verdicts = "\n".join(
        f"- {n}: " + ("on the front" if v.on_front else v.reason or "off the front")
        for n, v in serving.plan.verdicts.items()
    )
    atomic_write_text(
        report_dir / "cascade.md",
        "# Confidence cascades\n\n"
        + cascade_table(serving.plan, p50, m.reference)
        + "\n\nExpected ms: bare-runtime p50 of each stage at the binomial number of rows reaching it.\n\n"
        + "## Accuracy-latency front\n\n"
        + verdicts
        + "\n",
    )
    atomic_write_json(
        report_dir / "cascade.json",
        {
            "cascades": [c.model_dump() for c in serving.plan.cascades],
            "front": {
                n: {"on_front": v.on_front, "reason": v.reason} for n, v in serving.plan.verdicts.items()
            },
        },
    )
    if serving.plan.cascades:
        plot_cascades(serving.plan, single, p50, m.reference, report_dir / "cascade.png")
    if serving.drift is not None:
        atomic_write_text(
            report_dir / "drift_study.md", "# Drift check under corruptions\n\n" + serving.drift.markdown()
        )
        atomic_write_json(report_dir / "drift_study.json", serving.drift.as_dict())
