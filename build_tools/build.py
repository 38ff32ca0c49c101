"""``tcsched build``: export, variants, measurement, repository. The offline half of tcsched.

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
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from tcsched.build_tools import export as ex
from tcsched.build_tools import repository as repo_mod
from tcsched.build_tools.quantize import CalibMethod, quantize_int8

from tcsched.data import ImageItem, default_photos, list_images
from tcsched.fsutil import atomic_directory, clean_stale_temporaries
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

SUPPORTED_VARIANTS = ("fp32", "int8")
MODEL_PREFIX = "mobilenet_v2"


@dataclass
class BuildConfig:
    """Options of ``tcsched build`` (units in names)."""

    output: Path = Path("model_repository")
    work_dir: Path = Path(".tcsched/build")
    variants: Sequence[str] = ("fp32", "int8")
    calib_dir: Path | None = None
    calib_limit: int = 128
    calib_method: CalibMethod = "percentile"
    eval_dir: Path | None = None
    eval_limit: int | None = None
    weights: Path | None = None
    opset: int = 17
    latency_batch_sizes: Sequence[int] = (1, 8)
    latency_repeats: int = 15
    threads: int = 2
    serving: repo_mod.ServingOptions = field(default_factory=repo_mod.ServingOptions)

    def validate(self) -> None:
        """Fail fast, before any work.

        Raises:
            ValueError: unknown variant, no fp32, bad batch sizes or limits, missing folders.
        """
        unknown = set(self.variants) - set(SUPPORTED_VARIANTS)
        if unknown:
            raise ValueError(f"unknown variant(s) {sorted(unknown)}; supported: {list(SUPPORTED_VARIANTS)}")
        if "fp32" not in self.variants:
            raise ValueError("the fp32 variant is required: every other variant is measured against it")
        if any(b < 1 for b in self.latency_batch_sizes):
            raise ValueError(f"latency batch sizes must be >= 1, got {list(self.latency_batch_sizes)}")
        mbs = self.serving.max_batch_size
        if mbs < 1:
            raise ValueError(f"max batch size must be >= 1, got {mbs}")
        if max(self.latency_batch_sizes) > mbs:
            raise ValueError(
                f"latency batch sizes {list(self.latency_batch_sizes)} exceed max batch size {mbs}"
            )
        if self.calib_limit < 1:
            raise ValueError(f"calib_limit must be >= 1, got {self.calib_limit}")
        for name, d in (("calibration", self.calib_dir), ("evaluation", self.eval_dir)):
            if d is not None and not Path(d).is_dir():
                raise ValueError(f"{name} folder {d} does not exist")


def _load(items: Sequence[ImageItem], progress: Progress, what: str) -> np.ndarray:
    task = progress.add_task(f"preprocess {what}", total=len(items))
    out = np.empty((len(items), 3, 224, 224), dtype=np.float32)
    for i, it in enumerate(items):
        out[i] = preprocess_bytes(it.read_bytes())
        progress.advance(task)
    return out


def input_statistics(x: np.ndarray) -> InputStatistics:
    """Per-channel and per-image statistics of preprocessed float32 [N, 3, H, W] images."""
    per_img_mean = x.mean(axis=(1, 2, 3))
    per_img_std = x.std(axis=(1, 2, 3))
    return InputStatistics(
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


def build(cfg: BuildConfig, console: Console | None = None) -> Manifest:
    """Run the whole offline build and write the repository at ``cfg.output``; returns the manifest."""
    cfg.validate()
    console = console or Console()
    t_start = time.perf_counter()
    work = Path(cfg.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(cfg.output)

    calib_items = list_images(cfg.calib_dir) if cfg.calib_dir else default_photos()
    calib_items = calib_items[: cfg.calib_limit]
    eval_items = list_images(cfg.eval_dir) if cfg.eval_dir else list(calib_items)
    if cfg.eval_limit:
        eval_items = eval_items[: cfg.eval_limit]
    labeled = all(it.label is not None for it in eval_items)
    eval_name = str(cfg.eval_dir) if cfg.eval_dir else "calibration photos (unlabeled)"

    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"))
    with Progress(*columns, TimeElapsedColumn(), console=console) as progress:
        step = progress.add_task("build", total=6)

        progress.update(step, description="export ONNX (torchvision MobileNetV2, IMAGENET1K_V1)")
        model = ex.load_mobilenet_v2(cfg.weights)
        labels = ex.imagenet_categories()
        fp32_path = ex.export_onnx(model, work / "fp32.onnx", opset=cfg.opset)
        progress.advance(step)

        progress.update(step, description="load images")
        calib = _load(calib_items, progress, f"calibration ({len(calib_items)})")
        evalx = calib if not cfg.eval_dir else _load(eval_items, progress, f"evaluation ({len(eval_items)})")
        y = np.array([it.label for it in eval_items]) if labeled else None
        progress.advance(step)

        progress.update(step, description="fp32 reference vs torch eager")
        import torch

        with torch.no_grad():
            eager = model(torch.from_numpy(evalx[: min(8, len(evalx))])).numpy()
        paths = {"fp32": fp32_path}
        notes: dict[str, list[str]] = {"fp32": []}
        ort_fp32 = OrtClassifier(fp32_path, threads=cfg.threads)
        diff = float(np.abs(ort_fp32.predict(evalx[: len(eager)]) - eager).max())
        notes["fp32"].append(f"ONNX export opset {cfg.opset}; max |ORT - torch eager| logit diff {diff:.2e}")
        progress.advance(step)

        progress.update(step, description="quantize int8 (QDQ, per-channel, uint8 activations)")
        if "int8" in cfg.variants:
            with contextlib.redirect_stdout(io.StringIO()):  # ORT's calibrators print to stdout
                paths["int8"] = quantize_int8(fp32_path, work / "int8.onnx", calib, method=cfg.calib_method)
            notes["int8"] = [
                f"onnxruntime quantize_static QDQ, per-channel int8 weights, uint8 activations, "
                f"{cfg.calib_method} calibration on {len(calib)} images "
                f"({cfg.calib_dir or 'default scikit-image photos'})"
            ]
        progress.advance(step)

        progress.update(step, description="measure accuracy and latency")
        acc_task = progress.add_task("accuracy", total=len(paths))
        logits: dict[str, np.ndarray] = {}
        for name, p in paths.items():
            logits[name] = OrtClassifier(p, threads=cfg.threads).predict(evalx, batch_size=16)
            progress.advance(acc_task)
        lat = measure_latency(paths, cfg.latency_batch_sizes, cfg.latency_repeats, cfg.threads, evalx[:8])
        progress.advance(step)

        progress.update(step, description="write repository (atomic)")
        ref = logits["fp32"]
        ref_top1 = topk_accuracy(ref, y, 1) if labeled else None
        p50 = {n: {b: float(np.median(v)) for b, v in d.items()} for n, d in lat.items()}
        entries = []
        with atomic_directory(cfg.output) as tmp:
            for name, p in paths.items():
                model_name = f"{MODEL_PREFIX}_{name}"
                dst = repo_mod.write_variant(tmp, model_name, p, cfg.serving)
                top1 = topk_accuracy(logits[name], y, 1) if labeled else None
                agree = top1_agreement(ref, logits[name])
                drop = 100.0 * (ref_top1 - top1) if labeled else 100.0 * (1.0 - agree)
                entries.append(
                    VariantEntry(
                        name=model_name,
                        precision=name,  # type: ignore[arg-type]
                        file=str(dst.relative_to(tmp)),
                        size_bytes=dst.stat().st_size,
                        accuracy=AccuracyReport(
                            dataset=eval_name,
                            n_images=len(eval_items),
                            top1=top1,
                            top5=topk_accuracy(logits[name], y, 5) if labeled else None,
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
                        build_notes=notes.get(name, []),
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
            (tmp / "README.md").write_text(repo_mod.REPOSITORY_README)
        progress.advance(step)
    console.print(f"[green]built {cfg.output} in {time.perf_counter() - t_start:.0f} s[/green]")
    return manifest
