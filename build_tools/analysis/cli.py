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


def load_calibration(calib_dir: Path | None, limit: int) -> np.ndarray:
    """Preprocess up to ``limit`` images of ``calib_dir`` (default: the photos shipped in scikit-image).

    Returns:
        float32 [n, 3, 224, 224].
    """
    from tcsched.data import default_photos, list_images
    from tcsched.imaging import preprocess_bytes

    items = (list_images(calib_dir) if calib_dir else default_photos())[:limit]
    return np.stack([preprocess_bytes(it.read_bytes()) for it in items]).astype(np.float32, copy=False)


def analyze_command(
    model: Path = typer.Option(
        None, help="fp32 ONNX model (default: export torchvision MobileNetV2 into .tcsched/analysis)"
    ),
    calib_dir: Path = typer.Option(None, help="calibration images (default: photos shipped in scikit-image)"),
    limit: int = typer.Option(32, help="at most this many calibration images"),
    output: Path = typer.Option(
        Path("reports/analysis"), "--output", "-o", help="folder for analysis.json and analysis.png"
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
    if model is None:
        from tcsched.build_tools import export as ex

        work = Path(".tcsched/analysis")
        work.mkdir(parents=True, exist_ok=True)
        with console.status("export ONNX (torchvision MobileNetV2, IMAGENET1K_V1)"):
            model = ex.export_onnx(ex.load_mobilenet_v2(), work / "fp32.onnx")
    with console.status("preprocess calibration images"):
        calib = load_calibration(calib_dir, limit)
    try:
        report = analyze(model, calib, console=console)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    print_table(report, console)
    json_path = report.write(output / ANALYSIS_FILENAME)
    png_path = plot(report, output / PLOT_FILENAME)
    console.print(f"wrote {json_path} and {png_path}")
