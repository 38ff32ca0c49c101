"""``tcsched engines``: compile the CPU repository's ONNX variants into TensorRT engines for this GPU.

Registered in :mod:`tcsched.cli`. Light at import time: typer and rich only; the TensorRT code
(:mod:`tcsched.build_tools.gpu_repository`) is imported when the command runs.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console


def engines(
    cpu_repo: Path = typer.Option(
        Path("model_repository"), "--cpu-repo", help="repository written by `tcsched build` (ONNX variants)"
    ),
    output: Path = typer.Option(
        Path("model_repository_gpu"), "--output", "-o", help="GPU repository to (re)write (atomic)"
    ),
    cuda_graphs: bool = typer.Option(
        False, "--cuda-graphs/--no-cuda-graphs", help="optimization { cuda { graphs: true } } in each variant"
    ),
    timing_cache: Path = typer.Option(
        None,
        help="TensorRT timing cache shared by builds (default: .tcsched/tensorrt/, one per GPU+TensorRT)",
    ),
    latency_repeats: int = typer.Option(50, help="timed runs per engine and batch size"),
    if_missing: bool = typer.Option(
        False,
        "--if-missing",
        help="do nothing when OUTPUT already holds engines for this GPU and TensorRT (container start)",
    ),
):
    """Build a TensorRT engine per variant on this GPU, profile it, write a tensorrt_plan repository."""
    from tcsched.build_tools import tensorrt_engine as te
    from tcsched.build_tools.gpu_repository import check_engine_compatibility, convert_to_gpu_repository
    from tcsched.manifest import MANIFEST_FILENAME, Manifest

    console = Console()
    try:  # before any work: name every missing piece of the GPU stack at once
        te.check_gpu_dependencies()
    except RuntimeError as e:
        console.print(f"[red]{e}[/red]")
        raise typer.Exit(1) from None
    if if_missing and (output / MANIFEST_FILENAME).is_file():
        try:
            existing = Manifest.read(output / MANIFEST_FILENAME)
            if existing.target == "gpu":
                check_engine_compatibility(existing)
                console.print(f"{output} already holds engines for this GPU and TensorRT: nothing to build")
                return
        except (ValueError, RuntimeError) as e:
            console.print(f"[yellow]rebuilding {output}: {e}[/yellow]")
    try:
        convert_to_gpu_repository(
            cpu_repo,
            output,
            cuda_graphs=cuda_graphs,
            timing_cache=timing_cache,
            console=console,
            latency_repeats=latency_repeats,
        )
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    except (ImportError, RuntimeError) as e:
        console.print(f"[red]{e}[/red]")
        raise typer.Exit(1) from None
