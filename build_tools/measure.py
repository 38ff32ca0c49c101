"""The measurement stage of ``tcsched build``: every built variant's logits on the evaluation split and their
latencies, interleaved (:func:`measure`: :class:`Measurements`), the accuracy figures of a variant's logits
(:func:`_accuracy`) and the measured TensorRT form of a Q/DQ variant (:func:`_tensorrt_graph`). Re-exported by
:mod:`tcsched.build_tools.build`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from tcsched.build_tools.latency import measure_latency
from tcsched.build_tools.quantize import int8_requirements
from tcsched.build_tools.recipes import BuildContext, BuiltVariant
from tcsched.build_tools.recipes.pairs import ONNXRUNTIME, Pair
from tcsched.build_tools.tensorrt_graph import TENSORRT_GRAPH_FILENAME, write_tensorrt_form
from tcsched.engines import load_engine
from tcsched.manifest import AccuracyReport, TensorRTGraph
from tcsched.metrics import mean_kl, top1_agreement, topk_accuracy, wilson_interval
from tcsched.ort_runtime import OrtClassifier
from tcsched.precision import REFERENCE

MODEL_PREFIX = "mobilenet_v2"  # the default model's; a build names its variants after its model
# images per ONNX Runtime call when computing logits: bounds the memory of one call, not a tuned figure
PREDICT_BATCH = 16
LATENCY_SAMPLE_IMAGES = 8  # evaluation images repeated or cut to each latency batch size


def model_name(variant: str, prefix: str = MODEL_PREFIX) -> str:
    """Triton model name of a variant of the model ``prefix``: ``mobilenet_v2_int8``, ``efficientnet_lite0_int8``."""
    return f"{prefix}_{variant}"


@dataclass
class Measured:
    """One built variant measured: logits float32 [N_eval, classes] on the evaluation split, and ms of one
    ``session.run`` per interleaved round by batch size. ``selection_logits`` (float32 [N_views, classes], on
    ``BuildContext.select_views``) are computed on first use. ``other_logits`` (float32 [N_others, classes] or
    None): on the labeled images outside the evaluation split (``Measurements.all_labels``)."""

    variant: BuiltVariant
    model_name: str
    eval_logits: np.ndarray
    latency_ms: dict[int, list[float]]
    _selection: Callable[[], np.ndarray] = field(repr=False)
    runtime: str = ONNXRUNTIME
    requires_cpu: tuple[str, ...] = ()
    other_logits: np.ndarray | None = None

    @cached_property
    def selection_logits(self) -> np.ndarray:
        return self._selection()

    @property
    def p50_ms_by_batch(self) -> dict[int, float]:
        return {b: float(np.median(v)) for b, v in self.latency_ms.items()}


@dataclass
class Measurements:
    """Every built variant measured, keyed by Triton model name, the reference (fp32) first.

    ``select_groups`` int [N_views]: the selection image of each view (views of one image share it);
    ``select_labels`` / ``eval_labels``: int labels or None. ``eval_description``: the images the figures are
    on (the manifest's accuracy dataset). ``all_labels`` int [N_others + N_eval] (or None): the labels of every
    labeled image the build loaded, the others first (``Measured.other_logits``) then the evaluation split;
    ``all_description`` says which images those are.
    """

    variants: dict[str, Measured]
    reference: str
    select_groups: np.ndarray
    select_labels: np.ndarray | None
    eval_labels: np.ndarray | None
    eval_description: str
    all_labels: np.ndarray | None = None
    all_description: str = ""

    def eval_logits(self) -> dict[str, np.ndarray]:
        return {n: m.eval_logits for n, m in self.variants.items()}

    def selection_logits(self) -> dict[str, np.ndarray]:
        return {n: m.selection_logits for n, m in self.variants.items()}

    def p50_ms_by_batch(self) -> dict[str, dict[int, float]]:
        return {n: m.p50_ms_by_batch for n, m in self.variants.items()}

    def served_on_cpu_for_speed(self) -> dict[str, bool]:
        return {n: m.variant.served_on_cpu_for_speed for n, m in self.variants.items()}


def measure(
    ctx: BuildContext,
    built: dict[str, BuiltVariant],
    eval_description: str,
    pairs: Sequence[Pair] = (),
    prefix: str = MODEL_PREFIX,
    others: tuple[np.ndarray, np.ndarray, str] | None = None,
) -> Measurements:
    """Logits of every built variant on the evaluation split, and latencies of all of them interleaved
    (:func:`~tcsched.build_tools.latency.measure_latency`, ``cfg.latency_repeats`` rounds per batch size).
    ``others``: (float32 [N, C, H, W] images, int [N] labels, description of all the images) of the labeled
    images outside the evaluation split; their logits make the figures on all images (:func:`all_accuracy`).

    Every graph in ``built`` runs on ONNX Runtime; each of ``pairs`` (:mod:`tcsched.build_tools.recipes.pairs`)
    is one of those graphs on another runtime, measured the same way, interleaved with the others. The Triton
    names are ``<prefix>_<variant>`` (:func:`model_name`)."""
    cfg = ctx.cfg
    # an int8 graph with 8-bit weights needs a CPU where they do not saturate (quantize.int8_requirements); a
    # pair runs a built graph, so each graph is read once
    int8_needs = {v.path: int8_requirements(v.path) for v in built.values()}
    runs: dict[str, tuple[BuiltVariant, str, tuple[str, ...]]] = {
        n: (v, ONNXRUNTIME, int8_needs[v.path]) for n, v in built.items()
    }
    for p in pairs:
        path = p.variant.path
        needs = int8_needs[path] if path in int8_needs else int8_requirements(path)
        runs[p.name] = (p.variant, p.runtime, (*p.requires_cpu, *needs))
    engines = {n: (rt, v.precision) for n, (v, rt, _) in runs.items()}

    def engine(n: str):
        v, rt, _ = runs[n]
        return load_engine(rt, v.path, threads=cfg.threads, precision=v.precision)

    task = ctx.progress.add_task("accuracy", total=len(runs))
    logits: dict[str, np.ndarray] = {}
    other_logits: dict[str, np.ndarray | None] = dict.fromkeys(runs)
    for name in runs:
        e = engine(name)
        logits[name] = e.predict(ctx.eval_images, batch_size=PREDICT_BATCH)
        if others is not None:
            other_logits[name] = e.predict(others[0], batch_size=PREDICT_BATCH)
        ctx.progress.advance(task)
    paths = {name: v.path for name, (v, _, _) in runs.items()}
    sample = ctx.eval_images[:LATENCY_SAMPLE_IMAGES]
    lat = measure_latency(paths, cfg.latency_batch_sizes, cfg.latency_repeats, cfg.threads, sample, engines)

    def selection(n: str) -> Callable[[], np.ndarray]:
        if n == REFERENCE:
            return lambda: ctx.select_ref_logits
        return lambda: engine(n).predict(ctx.select_views, batch_size=PREDICT_BATCH)

    variants = {
        model_name(n, prefix): Measured(
            v, model_name(n, prefix), logits[n], lat[n], selection(n), rt, req, other_logits[n]
        )
        for n, (v, rt, req) in runs.items()
    }
    n_select = len(ctx.select)
    return Measurements(
        variants=variants,
        reference=model_name(REFERENCE, prefix),
        select_groups=np.tile(np.arange(n_select), len(ctx.select_views) // n_select),
        select_labels=ctx.select_labels,
        eval_labels=ctx.eval_labels,
        eval_description=eval_description,
        all_labels=None
        if others is None or ctx.eval_labels is None
        else np.concatenate([others[1], ctx.eval_labels]),
        all_description="" if others is None else others[2],
    )


def _accuracy(logits: np.ndarray, ref_logits: np.ndarray, measurements: Measurements) -> AccuracyReport:
    """Accuracy of evaluation-split ``logits`` [N, classes] against the labels and the reference's logits."""
    return accuracy_report(logits, ref_logits, measurements.eval_labels, measurements.eval_description)


def all_accuracy(m: Measured, ref: Measured, measurements: Measurements) -> AccuracyReport | None:
    """Accuracy of ``m`` on every labeled image the build loaded (``Measurements.all_labels``), or None when
    the build had no others (no ``--data-dir``, or unlabeled images). It includes the images the build chose
    on: it is for comparing with a served figure on the same images (``tcsched eval`` without
    ``--evaluation-split``), not for choosing between variants."""
    y = measurements.all_labels
    if y is None or m.other_logits is None or ref.other_logits is None:
        return None
    return accuracy_report(
        np.concatenate([m.other_logits, m.eval_logits]),
        np.concatenate([ref.other_logits, ref.eval_logits]),
        y,
        measurements.all_description,
    )


def accuracy_report(
    logits: np.ndarray, ref_logits: np.ndarray, y: np.ndarray | None, dataset: str
) -> AccuracyReport:
    """Top-1/top-5 of ``logits`` float32 [N, classes] against the int labels ``y`` [N] (None: unlabeled), and
    agreement and KL with the reference's ``ref_logits`` [N, classes], with Wilson 95% intervals over N."""
    top1 = topk_accuracy(logits, y, 1) if y is not None else None
    agree = top1_agreement(ref_logits, logits)
    drop = 100.0 * (topk_accuracy(ref_logits, y, 1) - top1) if y is not None else 100.0 * (1.0 - agree)
    n = len(logits)
    return AccuracyReport(
        dataset=dataset,
        n_images=n,
        top1=top1,
        top5=topk_accuracy(logits, y, 5) if y is not None else None,
        agreement_with_fp32=agree,
        kl_vs_fp32=max(0.0, mean_kl(ref_logits, logits)),
        top1_drop_points=drop,
        top1_ci95=wilson_interval(int(round(top1 * n)), n) if top1 is not None else None,
        agreement_ci95=wilson_interval(int(round(agree * n)), n),
    )


def _tensorrt_graph(
    tmp: Path, m: Measured, ref: Measured, measurements: Measurements, ctx: BuildContext
) -> TensorRTGraph | None:
    """The graph a GPU build compiles for a Q/DQ variant (:mod:`tcsched.build_tools.tensorrt_graph`), written
    beside the variant's model and measured like it, on the evaluation split; None for graphs without Q/DQ."""
    dest = tmp / m.model_name / "1" / TENSORRT_GRAPH_FILENAME
    form = write_tensorrt_form(m.variant.path, dest)
    if form is None:
        return None
    logits = OrtClassifier(dest, threads=ctx.cfg.threads).predict(ctx.eval_images, batch_size=PREDICT_BATCH)
    accuracy = _accuracy(logits, ref.eval_logits, measurements)
    return TensorRTGraph(file=str(dest.relative_to(tmp)), accuracy=accuracy, note=form.note)


#: evaluation images on which a variant written with uint8 pixels in is checked against the graph measured
PIXEL_CHECK_IMAGES = 16


def pixel_graph_note(served: Path, m: Measured, eval_images: np.ndarray, spec) -> str:
    """A build note comparing the served uint8-input graph ``served`` (the measured graph with the normalisation
    of ``spec`` as its first nodes, ``tcsched.build_tools.graph_surgery.add_pixel_input``) with the measured
    float-input graph on the first :data:`PIXEL_CHECK_IMAGES` evaluation images: the pixels are recovered from
    the float32 images (exactly: ``tcsched.pixels.normalise`` of them gives the images back, checked).

    Raises:
        ValueError: the images are not normalised 8-bit pixels of ``spec`` (normalising the recovered pixels
            does not give them back), or the served graph's top-1 differs from the measured graph's.
    """
    from tcsched.pixels import normalisation, normalise

    x = eval_images[:PIXEL_CHECK_IMAGES]
    mean, std = normalisation(spec)
    pixels = np.rint((x.astype(np.float64) * std + mean) * 255).clip(0, 255).astype(np.uint8)
    if not np.array_equal(normalise(pixels, spec), x):
        raise ValueError(
            "the build's images are not normalised 8-bit pixels: --pixels uint8 cannot serve them"
        )
    got = load_engine(m.runtime, served, threads=1, precision=m.variant.precision).predict(
        pixels, batch_size=8
    )
    ref = m.eval_logits[: len(x)]
    same = int((got.argmax(1) == ref.argmax(1)).sum())
    if same != len(x):
        raise ValueError(
            f"{m.model_name}: the uint8-input graph changes top-1 on {len(x) - same}/{len(x)} images"
        )
    diff = float(np.abs(got - ref).max())
    return (
        f"served with uint8 pixels in (the normalisation as its first nodes, tcsched_pixels/*): on {len(x)} "
        f"evaluation images its logits differ from the measured float-input graph's by at most {diff:.2g}, "
        f"top-1 equal on {same}/{len(x)}"
    )
