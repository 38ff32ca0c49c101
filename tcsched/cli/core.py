"""The ``tcsched`` command line: build, serve, classify, eval, run (the main job end to end)."""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path

import typer
from rich.console import Console

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


def _csv(text: str | None) -> tuple[str, ...]:
    return tuple(v.strip() for v in (text or "").split(",") if v.strip())


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
