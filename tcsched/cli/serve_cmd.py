"""`tcsched serve`: the embedded tritonserver on a repository, until Ctrl-C or SIGTERM."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import typer

from tcsched.cli.core import (
    REPO_OPT,
    _error_line,
    _LogFormat,
    _ModelControl,
    console,
    err_console,
)


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
    from tcsched.server import ServerError

    extra = _tritonserver_passthrough(tritonserver_args or [])
    extra.append(f"--model-control-mode={model_control_mode.value}")
    if log_format:
        extra.append(f"--log-format={log_format.value}")
    server = _make_server(
        repo, host, (http_port, grpc_port, metrics_port), log_verbose, admin_key, open_api, watchdog, extra
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        server.start()
    except (ServerError, FileNotFoundError, ValueError) as e:
        _error_line(str(e))
        raise typer.Exit(1) from None
    _print_serving(server, admin_key, watchdog, model_control_mode.value, tritonserver_args)
    try:
        _wait(server, stop)
    finally:
        console.print("stopping tritonserver ...")
        server.stop()


def _make_server(repo, host, ports, log_verbose, admin_key, open_api, watchdog, extra):
    """The TritonServer of `tcsched serve`'s options (not started); a refused option: typer.BadParameter."""
    from tcsched.server import TritonServer

    http_port, grpc_port, metrics_port = ports
    try:
        return TritonServer(
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


def _print_serving(server, admin_key, watchdog: bool, model_control_mode: str, tritonserver_args) -> None:
    """What a started `tcsched serve` serves: addresses, admin APIs, stub watchdog, model control."""
    from tcsched.server import ADMIN_HEADER

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
            "--no-watchdog" if not watchdog else f"it needs explicit model control, not {model_control_mode}"
        )
        console.print(f"  stub watchdog: off ({why})")
    console.print(f"  model control: {server.model_control_mode}")
    if tritonserver_args:
        console.print(f"  tritonserver options passed through: {' '.join(tritonserver_args)}")


def _wait(server, stop: threading.Event) -> None:
    """Until ``stop`` is set: report each stub the watchdog reloaded; a dead tritonserver: typer.Exit(1)."""
    seen = 0
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
