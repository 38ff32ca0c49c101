"""The perf_analyzer tools: `tcsched perf-analyzer` and `perf-data`."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from tcsched.cli.core import (
    CliError,
    _image_files,
    app,
)


def perf_analyzer(
    args: list[str] = typer.Argument(
        None,
        metavar="PERF_ANALYZER_ARGS...",
        help="perf_analyzer's own arguments (`tcsched perf-analyzer --help`)",
    ),
):
    """Run the perf_analyzer of the tritonclient wheel with its libraries found (libcudart.so.12 of
    nvidia-cuda-runtime-cu12 on LD_LIBRARY_PATH); every argument is perf_analyzer's, its exit code is returned."""
    import os

    from tcsched.client.perf_analyzer import find_perf_analyzer, perf_analyzer_env

    try:
        binary, env = find_perf_analyzer(), perf_analyzer_env()
    except FileNotFoundError as e:
        raise CliError(f"{e} (or `pip install 'tcsched[client]'`)") from None
    sys.stdout.flush()
    os.execve(binary, [str(binary), *(args or [])], env)


def perf_analyzer_main() -> None:  # pragma: no cover - exec'd
    """The ``tcsched-perf-analyzer`` executable: ``tcsched perf-analyzer`` as one path, for tools that take the
    path of a perf_analyzer binary (Model Analyzer's ``--perf-analyzer-path``)."""
    app(["perf-analyzer", *sys.argv[1:]])


def perf_data(
    images: list[Path] = typer.Argument(..., help="JPEG/PNG files, or folders of them"),
    output: Path = typer.Option(..., "--output", "-o", help="the --input-data JSON file to write"),
    tensor: bool = typer.Option(
        False,
        "--tensor/--bytes",
        help="--bytes (default): the encoded files, for the ensemble's BYTES input; --tensor: each image "
        "preprocessed as the ensemble of --repo does (float32 [3,H,W], or uint8 pixels for a --pixels uint8 "
        "repository), for a variant or the scheduler called directly "
        "(perf_analyzer's random data is mostly NaN as float32, which the variants refuse)",
    ),
    input_name: str = typer.Option(
        None,
        help="the input to fill (default: IMAGE, the ensemble's, with --bytes; input, a variant's, with --tensor; "
        "the scheduler's is INPUT)",
    ),
    limit: int = typer.Option(None, min=1, help="at most this many images"),
    repo: Path = typer.Option(
        Path("model_repository"),
        help="the repository whose preprocessing --tensor applies and whose ensemble the hint names (its "
        "manifest; without one there: ImageNet's 256/224 and 'classifier')",
    ),
):
    """Write a perf_analyzer --input-data file of real images, one per step (round robin): for the ensemble's
    BYTES input each element is base64 of Triton's raw BYTES encoding (a 4-byte little-endian length, then the
    file); with --tensor, the preprocessed tensor (the repository's dtype: float32, or uint8 pixels)."""
    from tcsched.client.perf_analyzer import write_bytes_input_data, write_tensor_input_data
    from tcsched.manifest import MANIFEST_FILENAME, Manifest
    from tcsched.names import ENSEMBLE, IMAGE
    from tcsched.preprocessing import IMAGENET

    manifest = Manifest.read(repo / MANIFEST_FILENAME) if (repo / MANIFEST_FILENAME).is_file() else None
    spec = manifest.preprocess_spec if manifest is not None else IMAGENET
    ensemble = manifest.ensemble if manifest is not None else ENSEMBLE
    dtype = manifest.input.dtype if manifest is not None else "float32"

    paths = _image_files(images)[:limit]
    if tensor:
        from tcsched.imaging import ImageDecodeError, preprocess_bytes

        name = input_name or "input"
        tensors = []
        for p in paths:
            try:
                tensors.append(preprocess_bytes(p.read_bytes(), spec=spec, dtype=dtype))
            except ImageDecodeError as e:
                raise CliError(f"{p}: {e}") from None
        write_tensor_input_data(output, name, tensors)
        shape = "x".join(str(d) for d in tensors[0].shape)
        print(f"wrote {output}: {len(paths)} preprocessed images ({dtype} {shape}) for input {name}")
        print(
            f"  tcsched perf-analyzer -m MODEL -u 127.0.0.1:8001 -i grpc --input-data {output} --concurrency-range 1:4"
        )
        return
    name = input_name or IMAGE
    write_bytes_input_data(output, name, [p.read_bytes() for p in paths])
    size = sum(p.stat().st_size for p in paths)
    print(f"wrote {output}: {len(paths)} images ({size / 1e6:.1f} MB) for input {name}")
    print(
        f"  tcsched perf-analyzer -m {ensemble} -u 127.0.0.1:8001 -i grpc --input-data {output} "
        f"--shape {name}:1 --concurrency-range 1:4"
    )
