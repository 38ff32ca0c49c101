"""``tcsched build``: export, analysis, variants, measurement, repository. The offline half of tcsched.

Data splits (no image is used for two purposes): with ``data_dir`` (labeled) the images are split by a hash of
their file names into calibration (25%: activation ranges and the per-layer ranking), selection (25%: choosing
the calibration method, the mixed-precision layers and the pruned layers) and evaluation (50%: every figure in
the manifest). Without it, calibration comes from ``calib_dir`` or the photos shipped in scikit-image, selection
reuses the calibration images, and evaluation uses ``eval_dir`` (or the calibration images, unlabeled). The
splits, their preprocessing and their statistics: :mod:`tcsched.build_tools.splits`.

The stages of :func:`build`: :func:`export_source` (the fp32 graph), :func:`prepare` (images, fp32 reference
logits, per-layer analysis: the :class:`~tcsched.build_tools.recipes.BuildContext`), :func:`run_recipes` (each
requested variant recipe of :data:`~tcsched.build_tools.recipes.REGISTRY`, in dependency order),
:func:`measure` (every built variant on the evaluation split, latencies interleaved: :class:`Measurements`),
:func:`write_repository` (the manifest and the Triton models).

Each step shows progress (rich). Everything is written into a temporary folder and swapped in at the end
(:func:`tcsched.fsutil.atomic_directory`): a failed or interrupted build leaves the previous repository as it was.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from tcsched.build_tools import export as ex
from tcsched.build_tools import repository as repo_mod
from tcsched.build_tools.augment import label_preserving_views
from tcsched.build_tools.cascade import FrontVerdict
from tcsched.build_tools.config import BuildConfig
from tcsched.build_tools.graph_surgery import WEIGHT_OPS
from tcsched.build_tools.measure import (  # noqa: F401 - re-exported: the build's stages and figures in one place
    LATENCY_SAMPLE_IMAGES,
    MODEL_PREFIX,
    PREDICT_BATCH,
    Measured,
    Measurements,
    _accuracy,
    _tensorrt_graph,
    all_accuracy,
    measure,
    model_name,
    pixel_graph_note,
)
from tcsched.build_tools.model_source import ResolvedModel, optimize_basic, resolve_model
from tcsched.build_tools.quantize import parse_calib_method
from tcsched.build_tools.recipes import REGISTRY, BuildContext, BuiltVariant, Dropped, Recipe
from tcsched.build_tools.recipes.pairs import ONNXRUNTIME, openvino_pairs
from tcsched.build_tools.serving import Serving, decide_serving, write_serving_reports
from tcsched.build_tools.splits import Splits, input_statistics, load_images, make_splits
from tcsched.engines.capabilities import cpu_capabilities
from tcsched.fsutil import atomic_directory, check_replaceable_output, clean_stale_temporaries
from tcsched.manifest import (
    MANIFEST_FILENAME,
    LatencyReport,
    Manifest,
    ModelSource,
    TensorSpec,
    VariantEntry,
)
from tcsched.ort_runtime import OrtClassifier
from tcsched.preprocessing import IMAGENET, PreprocessSpec

__all__ = [
    "ANALYSIS_FILENAME",
    "DEFAULT_VARIANTS",
    "MODEL_PREFIX",
    "SUPPORTED_VARIANTS",
    "BuildConfig",
    "Measured",
    "Measurements",
    "Source",
    "build",
    "input_statistics",
    "make_splits",
    "parse_calib_method",
]

SUPPORTED_VARIANTS = DEFAULT_VARIANTS = REGISTRY.names  # the built-in recipes
ANALYSIS_FILENAME = "analysis.json"


# ------------------------------------------------------------------------------------------ source and context


@dataclass(frozen=True)
class Source:
    """The model the variants are made from: a torch classifier (eval mode; None for an ONNX source) and its
    fp32 ONNX graph.

    ``fp32_path``: input ``input`` float32 [N, *input_chw], output ``logits`` float32 [N, len(labels)].
    ``name``: prefix of the variants' Triton names; ``preprocessing``: how its pixels are made (crop = H, W of
    ``input_chw``); ``model``: the manifest's record of where it came from.
    """

    torch_model: Any
    fp32_path: Path
    labels: list[str]
    description: str  # the manifest's source_model
    name: str = MODEL_PREFIX
    input_chw: tuple[int, int, int] = (3, 224, 224)
    preprocessing: PreprocessSpec = IMAGENET
    model: ModelSource | None = None


def resolve(cfg: BuildConfig) -> ResolvedModel:
    """``cfg``'s model, weights, labels and preprocessing loaded and checked
    (:func:`tcsched.build_tools.model_source.resolve_model`).

    Raises:
        ModelSourceError: the reason the model or an option is refused.
    """
    return resolve_model(
        cfg.model,
        name=cfg.model_name,
        weights=cfg.weights,
        labels_file=cfg.labels_file,
        preprocessing_file=cfg.preprocessing_file,
        overrides=cfg.preprocess_overrides,
    )


def export_source(cfg: BuildConfig, work: Path, resolved: ResolvedModel | None = None) -> Source:
    """The fp32 graph of ``resolved`` (default: :func:`resolve` of ``cfg``) at ``work/fp32.onnx``.

    MobileNetV2 (no ``--model``) is exported as it always was; a torch model of ``--model`` is exported at the
    crop size and simplified by :func:`~tcsched.build_tools.model_source.optimize_basic`; an ONNX source is its
    normalised graph."""
    import onnx

    r = resolved or resolve(cfg)
    path = work / "fp32.onnx"
    if r.onnx_model is not None:
        onnx.save(r.onnx_model, str(path))
    else:
        ex.export_onnx(
            r.torch_model, path, opset=cfg.opset, image_size=r.input_chw[1:], channels=r.input_chw[0]
        )
        if r.spec.kind != "default":
            onnx.save(optimize_basic(onnx.load(str(path))), str(path))
    info = ModelSource(
        kind=r.spec.kind,
        target=str(Path(r.spec.target).resolve()) if r.spec.kind == "onnx" else r.spec.target,
        name=r.spec.name,
        weights_file=str(r.weights.resolve()) if r.weights is not None else None,
        onnx_file=str(Path(r.spec.target).resolve()) if r.spec.kind == "onnx" else None,
    )
    return Source(
        r.torch_model, path, r.labels, r.description, r.spec.name, r.input_chw, r.preprocessing, info
    )


def prepare(
    cfg: BuildConfig,
    splits: Splits,
    source: Source,
    work: Path,
    progress: Progress,
    console: Console,
    step: TaskID,
) -> BuildContext:
    """Load the images, compute the fp32 reference on the selection views and analyse the layers."""
    from tcsched.build_tools import analysis as an

    progress.update(step, description="load images")
    spec, method = source.preprocessing, cfg.serving.preprocess_method
    calib = load_images(splits.calib, progress, f"calibration ({len(splits.calib)})", spec, method)
    select = (
        calib
        if splits.select is splits.calib
        else load_images(splits.select, progress, "selection", spec, method)
    )
    evalx = (
        calib
        if splits.eval == splits.calib
        else load_images(splits.eval, progress, "evaluation", spec, method)
    )
    y_sel = (
        np.array([it.label for it in splits.select])
        if all(i.label is not None for i in splits.select)
        else None
    )
    y_eval = np.array([it.label for it in splits.eval]) if splits.labeled else None
    progress.advance(step)

    progress.update(step, description="fp32 reference on the selection views")
    # every choice on the selection split (calibration method, fine-tune kept, int8_mixed's float layers) is made
    # on label-preserving views of each image
    select_views = label_preserving_views(select)
    if y_sel is not None:
        y_sel = np.tile(y_sel, len(select_views) // len(select))
    fp32_session = OrtClassifier(source.fp32_path, threads=cfg.threads)
    fp32_model = onnx.load(str(source.fp32_path))
    progress.advance(step)

    progress.update(step, description="analyse layers (kind, MACs, alignment, 2:4, int8 sensitivity)")
    report = an.analyze(
        source.fp32_path, calib[: cfg.analysis_limit], progress=True, threads=cfg.threads, console=console
    )
    progress.advance(step)
    return BuildContext(
        cfg=cfg,
        work=work,
        torch_model=source.torch_model,
        fp32_path=source.fp32_path,
        fp32_model=fp32_model,
        fp32_session=fp32_session,
        labels=source.labels,
        layer_names=[n.name for n in fp32_model.graph.node if n.op_type in WEIGHT_OPS],
        calib=calib,
        select=select,
        select_views=select_views,
        select_labels=y_sel,
        select_ref_logits=fp32_session.predict(select_views, batch_size=PREDICT_BATCH),
        eval_images=evalx,
        eval_labels=y_eval,
        report=report,
        progress=progress,
        console=console,
    )


@dataclass
class RecipeOutcome:
    """What :func:`run_recipes` made: the built variants by name (in dependency order) and the dropped ones."""

    built: dict[str, BuiltVariant]
    dropped: list[Dropped] = field(default_factory=list)


def run_recipes(ctx: BuildContext, recipes: Sequence[Recipe], step: TaskID | None = None) -> RecipeOutcome:
    """Run ``recipes`` (dependency order, :meth:`RecipeRegistry.resolve`) on ``ctx``; each sees the variants
    built before it in ``ctx.built``. A recipe whose ``needs`` were dropped is dropped too, unbuilt."""
    dropped: list[Dropped] = []
    for recipe in recipes:
        if step is not None:
            ctx.progress.update(step, description=recipe.step or recipe.name)
        missing = [n for n in recipe.needs if n not in ctx.built]
        if missing:
            dropped.append(recipe.dropped([f"needs {', '.join(missing)}, which was not kept"]))
        else:
            result = recipe.build(ctx)
            if isinstance(result, Dropped):
                dropped.append(result)
            else:
                ctx.built[recipe.name] = result
        if step is not None:
            ctx.progress.advance(step)
    return RecipeOutcome(ctx.built, dropped)


# -------------------------------------------------------------------------------------------------- measurement


def _eval_description(cfg: BuildConfig, splits: Splits, ctx: BuildContext) -> str:
    n_views = len(ctx.select_views) // len(ctx.select)
    return (
        splits.description
        + (" (figures on the evaluation split)" if cfg.data_dir is not None else "")
        + f"; choices on the selection split use {n_views} label-preserving views of "
        f"each image ({len(ctx.select_views)}: original, flip, centre zoom, its flip)"
    )


def _other_images(
    cfg: BuildConfig, splits: Splits, ctx: BuildContext, progress: Progress, spec: PreprocessSpec
) -> tuple[np.ndarray, np.ndarray, str] | None:
    """(images, labels, description) of the labeled ``--data-dir`` images outside the evaluation split, for the
    figures on all its images (``tcsched eval`` without ``--evaluation-split`` sees the same ones); None when
    there are none (``Splits.others``)."""
    if not splits.others:
        return None
    method = cfg.serving.preprocess_method
    unused = (
        load_images(splits.unused, progress, "rest of calibration", spec, method) if splits.unused else None
    )
    parts = [ctx.calib, *([] if unused is None else [unused]), ctx.select]
    n = len(splits.others) + len(splits.eval)
    return (
        np.concatenate(parts),
        np.array([it.label for it in splits.others]),
        f"{cfg.data_dir}: all {n} labeled images (calibration, selection and evaluation splits)",
    )


# -------------------------------------------------------------------------------------------------- repository


def _entry(
    tmp: Path,
    m: Measured,
    ref: Measured,
    measurements: Measurements,
    cfg: BuildConfig,
    notes: list[str],
    verdict: FrontVerdict | None = None,
    chw: tuple[int, int, int] = (3, 224, 224),
    ctx: BuildContext | None = None,
    spec: PreprocessSpec = IMAGENET,
) -> VariantEntry:
    """The manifest entry of one measured variant, its model written under ``tmp``; ``verdict``: whether it is
    on the accuracy-latency front (:func:`tcsched.build_tools.cascade.pareto_front`)."""
    classes = ref.eval_logits.shape[1]
    dst = repo_mod.write_variant(
        tmp,
        m.model_name,
        m.variant.path,
        cfg.serving,
        chw=chw,
        classes=classes,
        runtime=m.runtime,
        precision=m.variant.precision,
        spec=spec,
    )
    if cfg.serving.pixels == "uint8":
        if ctx is None:
            raise ValueError("a uint8-pixel repository needs the build context (its images check the graphs)")
        notes = [*notes, pixel_graph_note(dst, m, ctx.eval_images, spec)]
    p50, ref_p50 = m.p50_ms_by_batch, ref.p50_ms_by_batch
    return VariantEntry(
        name=m.model_name,
        precision=m.variant.precision,
        runtime=m.runtime,
        requires_cpu=list(m.requires_cpu),
        file=str(dst.relative_to(tmp)),
        size_bytes=dst.stat().st_size,
        accuracy=_accuracy(m.eval_logits, ref.eval_logits, measurements),
        accuracy_all_images=all_accuracy(m, ref, measurements),
        latency=LatencyReport(
            device=f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            runtime=m.runtime,
            threads=cfg.threads,
            p50_ms_by_batch=p50,
            p99_ms_by_batch={b: float(np.percentile(v, 99)) for b, v in m.latency_ms.items()},
            ratio_to_fp32_by_batch={b: p50[b] / ref_p50[b] for b in p50},
        ),
        layer_precision=m.variant.layer_plan,
        build_notes=notes,
        serve_on_cpu_for_speed=m.variant.served_on_cpu_for_speed,
        on_pareto_front=verdict is None or verdict.on_front,
        not_served_reason=None if verdict is None else verdict.reason,
    )


def write_repository(
    cfg: BuildConfig,
    ctx: BuildContext,
    source: Source,
    measurements: Measurements,
    dropped: Sequence[Dropped],
    serving: Serving | None = None,
) -> Manifest:
    """Write the repository at ``cfg.output`` (atomic) and the reports at ``cfg.report_dir`` (analysis, and with
    ``serving`` the cascades and the drift study); the notes of dropped variants go into the reference's notes.
    ``serving``: the front verdicts and the calibrated cascades (:func:`~tcsched.build_tools.serving.decide_serving`)."""
    from tcsched.build_tools import analysis as an

    ref = measurements.variants[measurements.reference]
    verdicts = serving.plan.verdicts if serving is not None else {}
    cfg.report_dir.mkdir(parents=True, exist_ok=True)
    with atomic_directory(cfg.output) as tmp:
        entries = []
        for m in measurements.variants.values():
            notes = list(m.variant.notes)
            if m is ref:
                notes += [f"{d.name} dropped: " + " ".join(d.notes) for d in dropped]
            entry = _entry(
                tmp,
                m,
                ref,
                measurements,
                cfg,
                notes,
                verdicts.get(m.model_name),
                source.input_chw,
                ctx,
                source.preprocessing,
            )
            # a GPU build compiles each graph once, whatever CPU runtime a pair runs it on
            if m.runtime == ONNXRUNTIME:
                entry.tensorrt_graph = _tensorrt_graph(tmp, m, ref, measurements, ctx)
            entries.append(entry)
        repo_mod.write_pipeline(
            tmp, ctx.labels, cfg.serving, source.input_chw, source.preprocessing, cfg.ensemble_name
        )
        manifest = Manifest(
            source_model=source.description,
            input=TensorSpec(name=ex.INPUT_NAME, dtype=cfg.serving.pixels, shape=list(source.input_chw)),
            output=TensorSpec(name=ex.OUTPUT_NAME, dtype="float32", shape=[len(ctx.labels)]),
            max_batch_size=cfg.serving.max_batch_size,
            labels_file=f"{cfg.ensemble_name}/{repo_mod.LABELS_FILE}",
            reference_variant=measurements.reference,
            variants=entries,
            input_statistics=input_statistics(ctx.calib, source.preprocessing),
            cascades=serving.plan.cascades if serving is not None else [],
            build_cpu=cpu_capabilities().to_list(),
            model=source.model,
            preprocessing=source.preprocessing,
            ensemble=cfg.ensemble_name,
        )
        manifest.write(tmp / MANIFEST_FILENAME)
        ctx.report.write(tmp / ANALYSIS_FILENAME)
        (tmp / "README.md").write_text(repo_mod.REPOSITORY_README)
    ctx.report.write(cfg.report_dir / ANALYSIS_FILENAME)
    an.plot(ctx.report, cfg.report_dir / "analysis.png")
    if serving is not None:
        write_serving_reports(serving, measurements, cfg.report_dir)
    return manifest


def build(cfg: BuildConfig, console: Console | None = None, source: Source | None = None) -> Manifest:
    """Run the whole offline build and write the repository at ``cfg.output``; returns the manifest.

    ``source``: the model to make the variants from (default: :func:`export_source` of ``cfg.model``,
    MobileNetV2 without one).

    Raises:
        ValueError: bad options (:meth:`BuildConfig.validate`), a model refused by :func:`resolve` (a
            :class:`~tcsched.build_tools.model_source.ModelSourceError`), or an output folder that is not a
            repository.
    """
    cfg.validate()
    check_replaceable_output(cfg.output)  # before any work: a build replaces the whole folder
    # the model, weights, labels and preprocessing are checked before any image is read
    resolved = resolve(cfg) if source is None else None
    recipes = REGISTRY.resolve(cfg.selected_variants)
    console = console or Console()
    t_start = time.perf_counter()
    work = Path(cfg.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(cfg.output)
    splits = make_splits(cfg)

    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"))
    with Progress(
        *columns, TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console
    ) as progress:
        step = progress.add_task("build", total=4 + len(recipes) + 2)
        if source is None:
            progress.update(step, description=f"export ONNX ({resolved.description})")
            source = export_source(cfg, work, resolved)
            for note in resolved.notes:
                console.print(f"model: {note}")
        progress.advance(step)
        ctx = prepare(cfg, splits, source, work, progress, console, step)
        outcome = run_recipes(ctx, recipes, step)
        progress.update(step, description="measure accuracy (evaluation split) and latency (interleaved)")
        pairs, pair_notes = openvino_pairs(
            outcome.built,
            cpu_capabilities(),
            importlib.util.find_spec("openvino") is not None,
            two_model_variants=cfg.serving.variant_backend == "python",
        )
        if pair_notes:
            outcome.dropped.append(Dropped("openvino pairs", pair_notes))
        measurements = measure(
            ctx,
            outcome.built,
            _eval_description(cfg, splits, ctx),
            pairs,
            source.name,
            others=_other_images(cfg, splits, ctx, progress, source.preprocessing),
        )
        progress.advance(step)
        # every variant is built and measured here: which to serve (the accuracy-latency front) and the
        # confidence cascades calibrated on them are chosen before the manifest entries are written
        progress.update(step, description="serving plan: accuracy-latency front, cascades, drift-check study")
        serving = decide_serving(
            measurements,
            splits.eval,
            input_statistics(ctx.calib, source.preprocessing),
            cfg.threads,
            progress,
            spec=source.preprocessing,
            select_images=ctx.select,
            calib_images=None if splits.select is splits.calib else ctx.calib,
            calib_labels=np.array([it.label for it in splits.calib])
            if all(it.label is not None for it in splits.calib)
            else None,
        )
        progress.advance(step)

    manifest = write_repository(cfg, ctx, source, measurements, outcome.dropped, serving)
    console.print(f"[green]built {cfg.output} in {time.perf_counter() - t_start:.0f} s[/green]")
    return manifest
