"""``tcsched build``: export, analysis, variants, measurement, repository. The offline half of tcsched.

Data splits (no image is used for two purposes): with ``data_dir`` (labeled) the images are split by a hash of
their file names into calibration (25%: activation ranges and the per-layer ranking), selection (25%: choosing
the calibration method, the mixed-precision layers and the pruned layers) and evaluation (50%: every figure in
the manifest). Without it, calibration comes from ``calib_dir`` or the photos shipped in scikit-image, selection
reuses the calibration images, and evaluation uses ``eval_dir`` (or the calibration images, unlabeled).

Each step shows progress (rich). Everything is written into a temporary folder and swapped in at the end
(:func:`tcsched.fsutil.atomic_directory`): a failed or interrupted build leaves the previous repository as it was.
"""

from __future__ import annotations

import contextlib
import io
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from tcsched.build_tools import export as ex
from tcsched.build_tools import repository as repo_mod
from tcsched.build_tools import variants as var
from tcsched.build_tools.quantize import CalibMethod, quantize_int8
from tcsched.data import ImageItem, default_photos, list_images, split
from tcsched.fsutil import atomic_directory, check_replaceable_output, clean_stale_temporaries
from tcsched.imaging import preprocess_bytes
from tcsched.manifest import (
    MANIFEST_FILENAME,
    AccuracyReport,
    InputStatistics,
    LatencyReport,
    Manifest,
    TensorSpec,
    VariantEntry,
)
from tcsched.metrics import mean_kl, top1_agreement, topk_accuracy
from tcsched.ort_runtime import OrtClassifier

SUPPORTED_VARIANTS = ("fp32", "fp16", "int8", "int8_mixed", "sparse24")
DEFAULT_VARIANTS = ("fp32", "fp16", "int8", "int8_mixed", "sparse24")
MODEL_PREFIX = "mobilenet_v2"
ANALYSIS_FILENAME = "analysis.json"


@dataclass
class BuildConfig:
    """Options of ``tcsched build`` (units in names).

    ``variants=None`` builds :data:`DEFAULT_VARIANTS` and keeps ``sparse24`` only if it meets the accuracy
    budget; naming ``sparse24`` explicitly keeps it whatever it measures (the manifest says so).
    """

    output: Path = Path("model_repository")
    work_dir: Path = Path(".tcsched/build")
    report_dir: Path = Path("reports/build")
    variants: Sequence[str] | None = None
    data_dir: Path | None = None
    calib_dir: Path | None = None
    calib_limit: int = 128
    calib_methods: Sequence[str] = ("minmax", "percentile:99.999", "percentile:99.99")
    eval_dir: Path | None = None
    eval_limit: int | None = None
    analysis_limit: int = 32
    max_top1_drop_points: float = 0.5
    min_agreement: float = 0.97
    max_float_layers: int = 24  # int8_mixed: beyond this many float nodes it is no longer an int8 variant
    # int8_mixed: latency / fp32's at the largest latency batch size, measured for every candidate in the search
    max_latency_ratio: float = 0.6
    finetune_steps: int = 0
    qat_steps: int = 200  # int8: quantization-aware fine-tune of the weights by distillation (0: off)
    # fewer calibration images than this: no fine-tune (it would learn them by heart)
    qat_min_images: int = 64
    weights: Path | None = None
    opset: int = 17
    latency_batch_sizes: Sequence[int] = (1, 8)
    # 50 interleaved rounds: with 15, the same int8_mixed graph's b8 ratio ranged 0.54-0.62x (sd ~0.03) over
    # repeated runs on this shared 2-core machine; with 50, 0.57-0.59x (README, 'Measured here')
    latency_repeats: int = 50
    threads: int = 2
    serving: repo_mod.ServingOptions = field(default_factory=repo_mod.ServingOptions)

    @property
    def selected_variants(self) -> tuple[str, ...]:
        return tuple(self.variants) if self.variants else DEFAULT_VARIANTS

    def validate(self) -> None:
        """Fail fast, before any work.

        Raises:
            ValueError: unknown variant, no fp32, bad batch sizes, limits or budgets, missing folders.
        """
        unknown = set(self.selected_variants) - set(SUPPORTED_VARIANTS)
        if unknown:
            raise ValueError(f"unknown variant(s) {sorted(unknown)}; supported: {list(SUPPORTED_VARIANTS)}")
        if "fp32" not in self.selected_variants:
            raise ValueError("the fp32 variant is required: every other variant is measured against it")
        if "int8_mixed" in self.selected_variants and "int8" not in self.selected_variants:
            raise ValueError("int8_mixed is derived from the int8 variant: add int8 to the variants")
        if any(b < 1 for b in self.latency_batch_sizes):
            raise ValueError(f"latency batch sizes must be >= 1, got {list(self.latency_batch_sizes)}")
        mbs = self.serving.max_batch_size
        if mbs < 1:
            raise ValueError(f"max batch size must be >= 1, got {mbs}")
        if max(self.latency_batch_sizes) > mbs:
            raise ValueError(
                f"latency batch sizes {list(self.latency_batch_sizes)} exceed max batch size {mbs}"
            )
        if self.calib_limit < 1 or self.analysis_limit < 1:
            raise ValueError(
                f"calib_limit and analysis_limit must be >= 1, got {self.calib_limit}, {self.analysis_limit}"
            )
        if self.max_top1_drop_points < 0 or not 0 <= self.min_agreement <= 1:
            raise ValueError(
                f"budget: max top-1 drop must be >= 0 points and agreement in [0, 1], "
                f"got {self.max_top1_drop_points}, {self.min_agreement}"
            )
        if not self.max_latency_ratio > 0:
            raise ValueError(f"max_latency_ratio must be > 0, got {self.max_latency_ratio}")
        if self.finetune_steps < 0 or self.qat_steps < 0:
            raise ValueError(
                f"finetune_steps and qat_steps must be >= 0, got {self.finetune_steps}, {self.qat_steps}"
            )
        if not self.calib_methods:
            raise ValueError("at least one calibration method is needed")
        for spec in self.calib_methods:
            parse_calib_method(spec)
        for name, d in (
            ("data", self.data_dir),
            ("calibration", self.calib_dir),
            ("evaluation", self.eval_dir),
        ):
            if d is not None and not Path(d).is_dir():
                raise ValueError(f"{name} folder {d} does not exist")
        if self.data_dir is not None and (self.calib_dir is not None or self.eval_dir is not None):
            raise ValueError("give either data_dir (split three ways) or calib_dir/eval_dir, not both")


def parse_calib_method(spec: str) -> tuple[CalibMethod, float]:
    """``minmax`` | ``percentile`` | ``percentile:P`` (P in (90, 100), default 99.999) -> (method, percentile).

    Raises:
        ValueError: anything else (``entropy`` through quantize_static silently equals minmax: refused).
    """
    name, _, arg = spec.partition(":")
    if name == "minmax" and not arg:
        return "minmax", 100.0
    if name == "percentile":
        try:
            p = float(arg) if arg else 99.999
        except ValueError:
            raise ValueError(f"bad percentile in {spec!r}") from None
        if not 90 < p < 100:
            raise ValueError(f"percentile must be in (90, 100), got {p}")
        return "percentile", p
    raise ValueError(
        f"unknown calibration method {spec!r}; expected minmax, percentile or percentile:P "
        "(entropy through quantize_static silently equals minmax)"
    )


@dataclass
class Splits:
    calib: list[ImageItem]
    select: list[ImageItem]
    eval: list[ImageItem]
    description: str

    @property
    def labeled(self) -> bool:
        return all(it.label is not None for it in self.eval)


def make_splits(cfg: BuildConfig) -> Splits:
    if cfg.data_dir is not None:
        items = list_images(cfg.data_dir)
        calib, select, evaluation = split(items, [0.25, 0.25, 0.5])
        desc = (
            f"{cfg.data_dir}: hash split of {len(items)} images: calibration {len(calib)}, selection "
            f"{len(select)}, evaluation {len(evaluation)}"
        )
        calib = calib[: cfg.calib_limit]
    else:
        calib = (list_images(cfg.calib_dir) if cfg.calib_dir else default_photos())[: cfg.calib_limit]
        select = calib
        evaluation = list_images(cfg.eval_dir) if cfg.eval_dir else list(calib)
        src = cfg.calib_dir or "scikit-image photos"
        desc = f"calibration and selection: {len(calib)} images from {src}; evaluation: {cfg.eval_dir or src}"
    if cfg.eval_limit:
        evaluation = evaluation[: cfg.eval_limit]
    return Splits(calib, select, evaluation, desc)


def _load(items: Sequence[ImageItem], progress: Progress, what: str) -> np.ndarray:
    task = progress.add_task(f"preprocess {what}", total=len(items))
    out = np.empty((len(items), 3, 224, 224), dtype=np.float32)
    for i, it in enumerate(items):
        out[i] = preprocess_bytes(it.read_bytes())
        progress.advance(task)
    return out


def input_statistics(x: np.ndarray) -> InputStatistics:
    """Per-channel and per-image statistics of preprocessed float32 [N, 3, H, W] images."""
    from tcsched.scheduler.live import saturated_fraction

    per_img_mean = x.mean(axis=(1, 2, 3))
    per_img_std = x.std(axis=(1, 2, 3))
    sat = np.array([saturated_fraction(img) for img in x])
    return InputStatistics(
        image_mean_p01_p99=tuple(float(v) for v in np.percentile(per_img_mean, [1, 99])),
        image_std_p01_p99=tuple(float(v) for v in np.percentile(per_img_std, [1, 99])),
        saturated_fraction_p99=float(np.percentile(sat, 99)),
        n_images=len(x),
        channel_mean=[float(v) for v in x.mean(axis=(0, 2, 3))],
        channel_std=[float(v) for v in x.std(axis=(0, 2, 3))],
        image_mean_range=(float(per_img_mean.min()), float(per_img_mean.max())),
        image_std_range=(float(per_img_std.min()), float(per_img_std.max())),
    )


def measure_latency(
    models: dict[str, Path], batch_sizes: Sequence[int], repeats: int, threads: int, sample: np.ndarray
) -> dict[str, dict[int, list[float]]]:
    """Wall-clock ms of one ``session.run`` per (variant, batch size), variants interleaved round-robin.

    Interleaving (every repeat runs each variant once) puts slow drifts of a shared machine on all variants
    alike, so the ratios are taken side by side. Two warm-up runs per (variant, batch) are discarded.
    """
    sessions = {n: OrtClassifier(p, threads=threads) for n, p in models.items()}
    times: dict[str, dict[int, list[float]]] = {n: {b: [] for b in batch_sizes} for n in models}
    for b in batch_sizes:
        x = np.ascontiguousarray(np.resize(sample, (b, *sample.shape[1:])))
        for s in sessions.values():
            s(x)
            s(x)
        for _ in range(repeats):
            for n, s in sessions.items():
                t0 = time.perf_counter()
                s(x)
                times[n][b].append((time.perf_counter() - t0) * 1e3)
    return times


def _qat_int8(cfg, paths, ptq_score, calib, teacher, evaluate, work, progress) -> str:
    """Fine-tune the chosen int8 graph's weights by distillation (:mod:`qdq_finetune`) on the calibration
    images; keep the result only if its KL vs fp32 on the selection split is lower. Returns the build note."""
    from tcsched.build_tools.qdq_finetune import distill_qdq

    task = progress.add_task(
        f"int8: quantization-aware fine-tune ({cfg.qat_steps} steps)", total=cfg.qat_steps
    )
    tuned = distill_qdq(
        onnx.load(str(paths["int8"])),
        calib,
        teacher,
        steps=cfg.qat_steps,
        threads=cfg.threads,
        on_step=lambda i, loss: progress.update(task, completed=i + 1),
    )
    p = work / "int8_qat.onnx"
    onnx.save(tuned, str(p))
    s = evaluate(p)
    kept = s.kl < ptq_score.kl
    if kept:
        paths["int8"] = p
    return (
        f"quantization-aware fine-tune of the int8 weights and biases (build_tools/qdq_finetune.py: the QDQ graph "
        f"in torch with fake quantization, distilled from fp32 on augmented calibration images, {cfg.qat_steps} "
        f"steps; scales, zero points and nodes unchanged): selection split KL {ptq_score.kl:.4f} -> {s.kl:.4f}, "
        f"agreement {ptq_score.agreement:.3f} -> {s.agreement:.3f}: {'kept' if kept else 'not kept (no gain)'}"
    )


def _group_study_note(qdq, report, fp32_model, evaluate, latency_ratio, cfg, progress) -> str:
    """The int8_mixed budget was not met: measure each whole kind of layer in float (selection split, latency
    vs fp32) so the manifest says how far the budget is from what float layers can buy. Returns the note."""
    groups = var.float_groups(qdq, {lay.name: lay.kind for lay in report.layers}, fp32_model)
    task = progress.add_task("int8_mixed: budget missed, each kind of layer in float", total=len(groups))

    def evaluate_with_progress(m: onnx.ModelProto) -> var.Score:
        s = evaluate(m)
        progress.advance(task)
        return s

    rows = var.float_group_study(qdq, groups, evaluate_with_progress, fp32_model, latency_ratio)
    lat_b = max(cfg.latency_batch_sizes)
    parts = [
        f"{r.group} ({len(r.layers)} nodes): agreement {r.score.agreement:.3f}, drop {r.score.drop_points:+.2f}, "
        f"KL {r.score.kl:.4f}, {r.latency_ratio:.2f}x fp32"
        for r in rows
    ]
    return (
        f"budget not met within the {cfg.max_latency_ratio:g}x latency cap; for scale, each whole kind of layer "
        f"returned to float at once (selection split, latency at batch {lat_b}): " + "; ".join(parts)
    )


def candidate_latency_ratio(
    model: onnx.ModelProto,
    reference: Path,
    scratch: Path,
    batch_size: int,
    threads: int,
    sample: np.ndarray,
    repeats: int = 15,
) -> float:
    """Median latency of ``model`` / median latency of the ``reference`` ONNX file, one ``session.run`` of
    ``batch_size`` images each, the two interleaved (:func:`measure_latency`); ``model`` is written to
    ``scratch`` first. Unitless (a ratio of ms)."""
    onnx.save(model, str(scratch))
    t = measure_latency({"ref": reference, "model": scratch}, [batch_size], repeats, threads, sample)
    return float(np.median(t["model"][batch_size]) / np.median(t["ref"][batch_size]))


def _quiet():
    """ONNX Runtime's calibrators print to stdout: keep the progress display clean."""
    return contextlib.redirect_stdout(io.StringIO())


def build(cfg: BuildConfig, console: Console | None = None) -> Manifest:
    """Run the whole offline build and write the repository at ``cfg.output``; returns the manifest."""
    from tcsched.build_tools import analysis as an

    cfg.validate()
    check_replaceable_output(cfg.output)  # before any work: a build replaces the whole folder
    console = console or Console()
    t_start = time.perf_counter()
    work = Path(cfg.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(cfg.output)
    wanted = cfg.selected_variants
    splits = make_splits(cfg)
    notes: dict[str, list[str]] = {v: [] for v in wanted}
    plans: dict[str, dict[str, str]] = {}
    paths: dict[str, Path] = {}

    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"))
    with Progress(*columns, TimeElapsedColumn(), console=console) as progress:
        step = progress.add_task("build", total=8)

        progress.update(step, description="export ONNX (torchvision MobileNetV2, IMAGENET1K_V1)")
        model = ex.load_mobilenet_v2(cfg.weights)
        labels = ex.imagenet_categories()
        fp32_path = ex.export_onnx(model, work / "fp32.onnx", opset=cfg.opset)
        fp32_model = onnx.load(str(fp32_path))
        paths["fp32"] = fp32_path
        progress.advance(step)

        progress.update(step, description="load images")
        calib = _load(splits.calib, progress, f"calibration ({len(splits.calib)})")
        select = calib if splits.select is splits.calib else _load(splits.select, progress, "selection")
        evalx = calib if splits.eval == splits.calib else _load(splits.eval, progress, "evaluation")
        y_sel = (
            np.array([it.label for it in splits.select])
            if all(i.label is not None for i in splits.select)
            else None
        )
        y_eval = np.array([it.label for it in splits.eval]) if splits.labeled else None
        progress.advance(step)

        progress.update(step, description="fp32 reference vs torch eager")
        import torch

        with torch.no_grad():
            eager = model(torch.from_numpy(evalx[: min(8, len(evalx))])).numpy()
        ort_fp32 = OrtClassifier(fp32_path, threads=cfg.threads)
        diff = float(np.abs(ort_fp32.predict(evalx[: len(eager)]) - eager).max())
        notes["fp32"].append(f"ONNX export opset {cfg.opset}; max |ORT - torch eager| logit diff {diff:.2e}")
        # every choice on the selection split (calibration method, fine-tune kept, int8_mixed's float layers)
        # is made on 4 label-preserving views of each image: a few near-tie images decided them on 130
        select_views = var.label_preserving_views(select)
        if y_sel is not None:
            y_sel = np.tile(y_sel, len(select_views) // len(select))
        ref_sel = ort_fp32.predict(select_views, batch_size=16)
        layer_names = [n.name for n in fp32_model.graph.node if n.op_type in ("Conv", "Gemm")]
        plans["fp32"] = dict.fromkeys(layer_names, "fp32")
        progress.advance(step)

        def evaluate(m) -> var.Score:
            return var.score(ref_sel, var.run_model(m, select_views, cfg.threads), y_sel)

        progress.update(step, description="analyse layers (kind, MACs, alignment, 2:4, int8 sensitivity)")
        report = an.analyze(
            fp32_path, calib[: cfg.analysis_limit], progress=True, threads=cfg.threads, console=console
        )
        progress.advance(step)

        progress.update(step, description="fp16 (casts in the graph)")
        if "fp16" in wanted:
            paths["fp16"] = var.convert_fp16(fp32_path, work / "fp16.onnx")
            plans["fp16"] = dict.fromkeys(layer_names, "fp16")
            notes["fp16"].append(
                "onnxruntime.transformers.float16 with fp32 inputs/outputs; ONNX Runtime's CPU provider emulates "
                "fp16 (slower than fp32): never chosen for speed on a CPU; TensorRT builds FP16 kernels from it"
            )
        progress.advance(step)

        progress.update(step, description="int8: calibration method chosen by measurement")
        if "int8" in wanted:
            scores: dict[str, var.Score] = {}
            for spec in cfg.calib_methods:
                method, pct = parse_calib_method(spec)
                p = work / f"int8_{spec.replace(':', '_')}.onnx"
                with _quiet():
                    quantize_int8(fp32_path, p, calib, method=method, percentile=pct)
                scores[spec] = evaluate(p)
            best = min(scores, key=lambda m: (scores[m].kl, -scores[m].agreement))
            paths["int8"] = work / f"int8_{best.replace(':', '_')}.onnx"
            plans["int8"] = dict.fromkeys(layer_names, "int8")
            tried = "; ".join(f"{m}: agreement {s.agreement:.3f}, KL {s.kl:.4f}" for m, s in scores.items())
            notes["int8"].append(
                f"onnxruntime quantize_static QDQ, per-channel int8 weights, uint8 activations, every supported op "
                f"(Clip folded into the ranges), logits left float; calibration on {len(calib)} images; "
                f"method chosen on the selection split by KL vs fp32: {best} ({tried})"
            )
            if cfg.qat_steps and len(calib) >= cfg.qat_min_images:
                notes["int8"].append(
                    _qat_int8(cfg, paths, scores[best], calib, ort_fp32, evaluate, work, progress)
                )
            elif cfg.qat_steps:
                notes["int8"].append(
                    f"no quantization-aware fine-tune: {len(calib)} calibration images, fewer than "
                    f"{cfg.qat_min_images} (with so few it learns them by heart)"
                )
        progress.advance(step)

        progress.update(
            step, description="int8_mixed: most sensitive layers back to float, as few as the budget allows"
        )
        if "int8_mixed" in wanted:
            qdq = onnx.load(str(paths["int8"]))
            rank_x = calib
            n_nodes = sum(n.op_type in ("Conv", "Gemm", "Add") for n in qdq.graph.node)
            rank_task = progress.add_task("rank int8 nodes in context (leave-one-out)", total=n_nodes)
            gains = var.rank_in_context(
                qdq,
                fp32_model,
                rank_x,
                ort_fp32.predict(rank_x, batch_size=16),
                threads=cfg.threads,
                on_step=lambda i: progress.update(rank_task, completed=i + 1),
            )
            # cost-aware: KL removed per float MAC, so that the few float layers are also cheap ones
            macs = {lay.name: lay.macs for lay in report.layers}
            total = sum(macs.values())
            cost = {n: var.float_cost_macs(qdq, n, macs) for n, _ in gains}
            ranking = [
                n for n, gain in sorted(gains, key=lambda t: -t[1] / (cost[t[0]] + 0.005 * total)) if gain > 0
            ]
            lat_b = max(cfg.latency_batch_sizes)

            def latency_ratio(m: onnx.ModelProto) -> float:
                return candidate_latency_ratio(
                    m, fp32_path, work / "int8_mixed_trial.onnx", lat_b, cfg.threads, select[:lat_b]
                )

            res = var.search_mixed(
                qdq,
                ranking,
                evaluate,
                cfg.max_top1_drop_points,
                cfg.min_agreement,
                max_float_layers=cfg.max_float_layers,
                reference=fp32_model,
                latency_ratio=latency_ratio,
                max_latency_ratio=cfg.max_latency_ratio,
            )
            mixed = var.dequantize_layers(qdq, res.float_layers, fp32_model)
            float_macs = sum(cost[n] for n in res.float_layers)
            paths["int8_mixed"] = work / "int8_mixed.onnx"
            onnx.save(mixed, str(paths["int8_mixed"]))
            plans["int8_mixed"] = {n: ("fp32" if n in res.float_layers else "int8") for n in layer_names}
            plans["int8_mixed"].update({n: "fp32" for n in res.float_layers if n not in plans["int8_mixed"]})
            over = f"fp32 at batch {lat_b} > the {cfg.max_latency_ratio:g}x cap"
            described: dict[int, str] = {}
            for k, a, d, kl in res.trials:
                described[k] = f"k={k}: agree {a:.3f} drop {d:+.2f} KL {kl:.4f}"
                if k in res.latency_ratios:
                    described[k] += f" latency {res.latency_ratios[k]:.2f}x"
            for k, r in res.latency_ratios.items():  # timed but not evaluated: over the cap
                if k not in described and k != res.stopped_at:
                    described[k] = f"k={k}: skipped, {r:.2f}x {over}"
            trials = ", ".join(described[k] for k in sorted(described))
            if res.stopped_at is not None:
                trials += f"; stopped at k={res.stopped_at}: {res.latency_ratios[res.stopped_at]:.2f}x {over}"
            notes["int8_mixed"].append(
                f"Conv/Gemm/Add nodes of the int8 graph ranked by the KL vs fp32 each removes when it alone returns "
                f"to float, per MAC that goes back to float (leave-one-out in context, {len(rank_x)} calibration images; the one-layer probe of "
                f"analysis.json ranks Conv/Gemm only and needs ~3x more float layers on MobileNetV2); "
                f"{len(res.float_layers)} kept float (fp16 on GPU) to meet top-1 drop <= "
                f"{cfg.max_top1_drop_points} points and agreement >= {cfg.min_agreement:.0%} on the selection "
                f"split ({'met' if res.met_budget else 'NOT met'}), each candidate's latency measured against fp32 "
                f"(cap {cfg.max_latency_ratio:g}x at batch {lat_b}); trials: {trials}"
            )
            if res.float_layers:
                notes["int8_mixed"].append(
                    f"float layers ({float_macs / total:.0%} of the MACs): " + ", ".join(res.float_layers)
                )
            if not res.met_budget:
                notes["int8_mixed"].append(
                    _group_study_note(qdq, report, fp32_model, evaluate, latency_ratio, cfg, progress)
                )
        progress.advance(step)

        progress.update(step, description="sparse24: 2:4 pruning of eligible layers")
        dropped: list[str] = []
        if "sparse24" in wanted:
            kept, why = _build_sparse24(
                cfg, report, fp32_model, model, calib, evaluate, work, progress, console
            )
            explicitly = cfg.variants is not None
            notes["sparse24"] += why
            if kept is not None and (kept[1] or explicitly):
                paths["sparse24"] = kept[0]
                plans["sparse24"] = {n: ("sparse24" if n in kept[2] else "fp16") for n in layer_names}
                if not kept[1]:
                    notes["sparse24"].append("kept although it misses the budget: explicitly requested")
            else:
                dropped.append("sparse24 dropped: " + " ".join(why))
        progress.advance(step)

        progress.update(step, description="measure accuracy (evaluation split) and latency (interleaved)")
        acc_task = progress.add_task("accuracy", total=len(paths))
        logits: dict[str, np.ndarray] = {}
        for name, p in paths.items():
            logits[name] = OrtClassifier(p, threads=cfg.threads).predict(evalx, batch_size=16)
            progress.advance(acc_task)
        lat = measure_latency(paths, cfg.latency_batch_sizes, cfg.latency_repeats, cfg.threads, evalx[:8])

    ref = logits["fp32"]
    ref_top1 = topk_accuracy(ref, y_eval, 1) if y_eval is not None else None
    p50 = {n: {b: float(np.median(v)) for b, v in d.items()} for n, d in lat.items()}
    eval_name = (
        splits.description
        + (" (figures on the evaluation split)" if cfg.data_dir is not None else "")
        + f"; choices on the selection split use {len(select_views) // len(select)} label-preserving views of "
        f"each image ({len(select_views)}: original, flip, centre zoom, its flip)"
    )
    if dropped:
        notes["fp32"] += dropped
    entries = []
    cfg.report_dir.mkdir(parents=True, exist_ok=True)
    with atomic_directory(cfg.output) as tmp:
        for name, p in paths.items():
            model_name = f"{MODEL_PREFIX}_{name}"
            dst = repo_mod.write_variant(tmp, model_name, p, cfg.serving)
            top1 = topk_accuracy(logits[name], y_eval, 1) if y_eval is not None else None
            agree = top1_agreement(ref, logits[name])
            drop = 100.0 * (ref_top1 - top1) if y_eval is not None else 100.0 * (1.0 - agree)
            emulated = name in ("fp16", "sparse24")
            if name == "sparse24":
                notes[name].append(
                    "2:4 sparsity is exploited only by TensorRT sparse tensor cores (Ampere and later); ONNX Runtime "
                    "on a CPU runs it as dense fp16 (emulated): never chosen for speed on a CPU"
                )
            entries.append(
                VariantEntry(
                    name=model_name,
                    precision=name,  # type: ignore[arg-type]
                    file=str(dst.relative_to(tmp)),
                    size_bytes=dst.stat().st_size,
                    accuracy=AccuracyReport(
                        dataset=eval_name,
                        n_images=len(splits.eval),
                        top1=top1,
                        top5=topk_accuracy(logits[name], y_eval, 5) if y_eval is not None else None,
                        agreement_with_fp32=agree,
                        kl_vs_fp32=max(0.0, mean_kl(ref, logits[name])),
                        top1_drop_points=drop,
                    ),
                    latency=LatencyReport(
                        device=f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                        runtime="onnxruntime",
                        threads=cfg.threads,
                        p50_ms_by_batch=p50[name],
                        p99_ms_by_batch={b: float(np.percentile(v, 99)) for b, v in lat[name].items()},
                        ratio_to_fp32_by_batch={b: p50[name][b] / p50["fp32"][b] for b in p50[name]},
                    ),
                    layer_precision=plans.get(name, {}),
                    build_notes=notes.get(name, []),
                    serve_on_cpu_for_speed=not emulated,
                )
            )
        repo_mod.write_pipeline(tmp, labels, cfg.serving)
        manifest = Manifest(
            source_model=ex.SOURCE_MODEL,
            input=TensorSpec(name=ex.INPUT_NAME, dtype="float32", shape=[3, 224, 224]),
            output=TensorSpec(name=ex.OUTPUT_NAME, dtype="float32", shape=[len(labels)]),
            max_batch_size=cfg.serving.max_batch_size,
            labels_file=f"{repo_mod.ENSEMBLE}/{repo_mod.LABELS_FILE}",
            reference_variant=f"{MODEL_PREFIX}_fp32",
            variants=entries,
            input_statistics=input_statistics(calib),
        )
        manifest.write(tmp / MANIFEST_FILENAME)
        report.write(tmp / ANALYSIS_FILENAME)
        (tmp / "README.md").write_text(repo_mod.REPOSITORY_README)
    report.write(cfg.report_dir / ANALYSIS_FILENAME)
    an.plot(report, cfg.report_dir / "analysis.png")
    console.print(f"[green]built {cfg.output} in {time.perf_counter() - t_start:.0f} s[/green]")
    return manifest


def _build_sparse24(cfg, report, fp32_model, torch_model, calib, evaluate, work, progress, console):
    """Prune eligible layers by 2:4 magnitude, as many as the budget allows (least pruning error first), with
    an optional KD fine-tune of every eligible layer. Returns ((path, meets_budget, layers) or None, notes)."""
    from tcsched.build_tools import analysis as an

    eligible = [lay for lay in report.layers if lay.sparse24_eligible.ok and lay.prune24_sqnr_db is not None]
    notes: list[str] = []
    if not eligible:
        return None, ["no layer is eligible for 2:4 sparsity (see analysis.json)"]
    order = [lay.name for lay in sorted(eligible, key=lambda r: -r.prune24_sqnr_db)]
    candidates: list[tuple[list[str], var.Score, str]] = []

    # largest k (least damaging first) that still meets the budget, without fine-tuning
    scores: dict[int, var.Score] = {}

    def at(k: int) -> var.Score:  # each k evaluated once (the search revisits its final k)
        if k not in scores:
            scores[k] = evaluate(var.prune_onnx_2_4(fp32_model, order[:k], an.prune_2_4))
        return scores[k]

    lo, hi = 0, len(order)
    s_all = at(hi)
    if s_all.meets(cfg.max_top1_drop_points, cfg.min_agreement):
        lo = hi
    else:
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if at(mid).meets(cfg.max_top1_drop_points, cfg.min_agreement):
                lo = mid
            else:
                hi = mid
    notes.append(
        f"{len(eligible)} layers eligible (not depthwise, channels multiple of 4, wide enough for TensorRT sparse "
        f"kernels); pruning all of them without fine-tuning: agreement {s_all.agreement:.3f}, top-1 drop "
        f"{s_all.drop_points:+.2f} points"
    )
    if lo > 0:
        candidates.append((order[:lo], at(lo), f"{lo} least-damaged layers pruned, no fine-tune"))

    if cfg.finetune_steps > 0:
        from onnx import numpy_helper

        from tcsched.build_tools.finetune import distill_pruned, map_onnx_layers

        inits = {i.name: i for i in fp32_model.graph.initializer}
        shapes = [
            (n.name, tuple(numpy_helper.to_array(inits[n.input[1]]).shape))
            for n in fp32_model.graph.node
            if n.op_type in ("Conv", "Gemm")
        ]
        mapping = map_onnx_layers(torch_model, shapes)
        task = progress.add_task(f"KD fine-tune ({cfg.finetune_steps} steps)", total=cfg.finetune_steps)
        student = distill_pruned(
            torch_model,
            {n: mapping[n] for n in order},
            an.prune_2_4,
            calib,
            cfg.finetune_steps,
            on_step=lambda i, loss: progress.update(
                task, completed=i + 1, description=f"KD fine-tune loss {loss:.3f}"
            ),
        )
        ft_path = ex.export_onnx(student, work / "sparse24_finetuned_fp32.onnx", opset=cfg.opset)
        s_ft = evaluate(ft_path)
        candidates.append(
            (order, s_ft, f"all {len(order)} eligible layers pruned, KD fine-tune {cfg.finetune_steps} steps")
        )
        notes.append(
            f"KD fine-tune of all eligible layers: agreement {s_ft.agreement:.3f}, drop {s_ft.drop_points:+.2f}"
        )

    if not candidates:
        return None, notes + ["even the single least-damaged layer misses the accuracy budget"]
    # most pruned layers among those that meet the budget; else the best scoring
    meeting = [c for c in candidates if c[1].meets(cfg.max_top1_drop_points, cfg.min_agreement)]
    layers, s, how = (
        max(meeting, key=lambda c: len(c[0])) if meeting else max(candidates, key=lambda c: c[1].agreement)
    )
    if how.startswith("all") and cfg.finetune_steps > 0:
        src = onnx.load(str(work / "sparse24_finetuned_fp32.onnx"))
    else:
        src = var.prune_onnx_2_4(fp32_model, layers, an.prune_2_4)
    pruned_path = work / "sparse24_fp32.onnx"
    onnx.save(src, str(pruned_path))
    _check_2to4(src, layers)
    path = var.convert_fp16(pruned_path, work / "sparse24.onnx")
    notes.append(
        f"chosen: {how}; selection split: agreement {s.agreement:.3f}, top-1 drop {s.drop_points:+.2f} points; "
        f"weights fp16 (casts in the graph) so that TensorRT builds FP16 sparse kernels"
    )
    return (path, bool(meeting), layers), notes


def _check_2to4(model: onnx.ModelProto, layers: Sequence[str]) -> None:
    """Every pruned layer's weight really has >= 2 zeros in each group of 4 (after export and BN folding).

    Raises:
        RuntimeError: a layer lost its 2:4 pattern.
    """
    from onnx import numpy_helper

    from tcsched.build_tools.analysis import is_2to4

    inits = {i.name: i for i in model.graph.initializer}
    for n in model.graph.node:
        if n.name in layers and not is_2to4(numpy_helper.to_array(inits[n.input[1]])):
            raise RuntimeError(f"layer {n.name} is not 2:4 sparse after pruning")
