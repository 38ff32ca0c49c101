"""``tcsched analyze``: the command line of the layer analysis (typer)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import typer
from rich.console import Console

from tcsched.build_tools.analysis.analyzer import analyze
from tcsched.build_tools.analysis.presentation import plot, print_table
from tcsched.build_tools.analysis.schema import ANALYSIS_FILENAME, PLOT_FILENAME


def load_calibration(calib_dir: Path | None, limit: int, spec=None) -> np.ndarray:
    """Preprocess up to ``limit`` images of ``calib_dir`` (default: the photos shipped in scikit-image) by
    ``spec`` (a :class:`tcsched.preprocessing.PreprocessSpec`; None: ImageNet's 256/224).

    Returns:
        float32 [n, 3, crop_h, crop_w].
    """
    from tcsched.data import default_photos, list_images
    from tcsched.imaging import preprocess_bytes
    from tcsched.preprocessing import IMAGENET

    spec = spec or IMAGENET
    items = (list_images(calib_dir) if calib_dir else default_photos())[:limit]
    return np.stack([preprocess_bytes(it.read_bytes(), spec=spec) for it in items]).astype(
        np.float32, copy=False
    )


def _model_spec(model: Path, preprocessing: Path | None):
    """The preprocessing for ``model``: ``preprocessing``'s fields over ImageNet's, the crop (and the resize,
    scaled by 256/224) from a fixed input height and width of the graph unless the file sets them
    (:func:`tcsched.build_tools.model_source.resolve_model`'s rule)."""
    from tcsched.build_tools.model_source import ModelSourceError, load_onnx_classifier, merge_spec

    _, (c, h, w), _, _ = load_onnx_classifier(model)
    file_fields = {}
    if preprocessing is not None:
        from tcsched.preprocessing import PreprocessSpec

        spec = PreprocessSpec.from_file(preprocessing)
        file_fields = {k: getattr(spec, k) for k in spec.model_fields_set}
    base = {}
    if h and w and "crop_size" not in file_fields:
        base["crop_size"] = (h, w)
        if "resize_size" not in file_fields:
            base["resize_size"] = round(max(h, w) * 256 / 224)
    try:
        spec = merge_spec(base, preprocessing, {})
        spec.check_model_input([c, h or spec.crop_size[0], w or spec.crop_size[1]])
    except ValueError as e:
        raise ModelSourceError(str(e)) from None
    return spec


def analyze_command(
    model: Path = typer.Option(
        None, help="fp32 ONNX model (default: export torchvision MobileNetV2 into .tcsched/analysis)"
    ),
    calib_dir: Path = typer.Option(None, help="calibration images (default: photos shipped in scikit-image)"),
    limit: int = typer.Option(32, help="at most this many calibration images"),
    output: Path = typer.Option(
        Path("reports/analysis"), "--output", "-o", help="folder for analysis.json and analysis.png"
    ),
    preprocessing: Path = typer.Option(
        None,
        help="a .json/.toml preprocessing spec for the calibration images (default: ImageNet's 256/224, the "
        "crop from the model's input size)",
    ),
) -> None:
    """Per-layer analysis of a classifier: MACs, Tensor Core alignment, 2:4 eligibility, INT8 sensitivity."""
    console = Console(width=None if sys.stdout.isatty() else 160)
    if limit < 1:
        raise typer.BadParameter(f"--limit must be >= 1, got {limit}")
    if calib_dir is not None and not calib_dir.is_dir():
        raise typer.BadParameter(f"calibration folder {calib_dir} does not exist")
    if model is not None and not model.is_file():
        raise typer.BadParameter(f"no ONNX model at {model}")
    if preprocessing is not None and not preprocessing.is_file():
        raise typer.BadParameter(f"no preprocessing file at {preprocessing}")
    spec = None
    if model is not None:
        try:
            spec = _model_spec(model, preprocessing)
        except ValueError as e:
            raise typer.BadParameter(str(e)) from None
    elif preprocessing is not None:
        from tcsched.preprocessing import PreprocessError, PreprocessSpec

        try:
            spec = PreprocessSpec.from_file(preprocessing)
        except PreprocessError as e:
            raise typer.BadParameter(str(e)) from None
    if model is None:
        from tcsched.build_tools import export as ex

        work = Path(".tcsched/analysis")
        work.mkdir(parents=True, exist_ok=True)
        with console.status("export ONNX (torchvision MobileNetV2, IMAGENET1K_V1)"):
            model = ex.export_onnx(ex.load_mobilenet_v2(), work / "fp32.onnx")
    with console.status("preprocess calibration images"):
        calib = load_calibration(calib_dir, limit, spec)
    try:
        report = analyze(model, calib, console=console)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    print_table(report, console)
    json_path = report.write(output / ANALYSIS_FILENAME)
    png_path = plot(report, output / PLOT_FILENAME)
    console.print(f"wrote {json_path} and {png_path}")
