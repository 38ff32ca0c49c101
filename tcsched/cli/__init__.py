"""The ``tcsched`` command line: build, serve, classify, eval, run (the main job end to end).

The typer app and what every command shares are in :mod:`tcsched.cli.core`; each command group has its module
(registered here, in the order ``tcsched --help`` lists the commands). Every name is re-exported here.
"""

from __future__ import annotations

from tcsched.cli.build_cmd import (  # noqa: F401
    _BUILD,
    FEW_IMAGES,
    _build_config,
    _build_gpu_repository,
    _check_gpu_stack,
    _check_image_counts,
    _print_manifest,
    build,
)
from tcsched.cli.client_cmds import (  # noqa: F401
    _cascade_text,
    _classification_json,
    _classify_table,
    _connect,
    _eager_reference,
    _eval_configs,
    _eval_items,
    _print_results,
    _server_address,
    classify,
    evaluate,
    run,
)
from tcsched.cli.core import (  # noqa: F401
    _CLICK_ERROR,
    _EXTRA_OF,
    DEBUG_ENV,
    REPO_OPT,
    CliError,
    _App,
    _csv,
    _error_line,
    _image_files,
    _LogFormat,
    _main,
    _ModelControl,
    _Objective,
    _params,
    _positive,
    _progress,
    _Protocol,
    _version,
    app,
    console,
    err_console,
)
from tcsched.cli.perf_cmds import perf_analyzer, perf_analyzer_main, perf_data  # noqa: F401
from tcsched.cli.serve_cmd import (  # noqa: F401
    _MANAGED_TRITONSERVER_OPTIONS,
    _make_server,
    _print_serving,
    _tritonserver_passthrough,
    _wait,
    serve,
)

# the commands, in the order `tcsched --help` lists them
app.command()(build)
app.command()(serve)
app.command()(classify)
app.command()(run)
app.command("eval")(evaluate)
app.command(
    "perf-analyzer",
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    add_help_option=False,
)(perf_analyzer)
app.command("perf-data")(perf_data)

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
