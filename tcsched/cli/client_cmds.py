"""The client commands: `tcsched classify`, `run` (the main job end to end) and `eval`."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from tcsched.cli.build_cmd import _print_manifest
from tcsched.cli.core import (
    REPO_OPT,
    CliError,
    _csv,
    _error_line,
    _image_files,
    _Objective,
    _params,
    _positive,
    _progress,
    _Protocol,
    console,
    err_console,
)
from tcsched.names import ENSEMBLE


def _classify_table(paths, results, model: str = ENSEMBLE) -> Table:
    k = max((len(r.topk) for r in results if not isinstance(r, Exception)), default=5)
    t = Table(title=f"{escape(model)} ensemble (through tritonclient)")
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
    if t == 0 and not d.get("escalated"):
        # a margin is never below 0: the calibration found the first stage alone meets the target
        text = f"{d['cascade']}: {d['cascade'].split('>')[0]} alone (threshold 0)"
    else:
        cmp = "<" if d.get("escalated") else ">="
        what = "escalated" if d.get("escalated") else "not escalated"
        text = f"{d['cascade']}: {what}" + (
            f" (margin {m:.3f} {cmp} {t:.3f})" if m is not None and t is not None else ""
        )
    if d.get("escalation_note"):
        text += f"; {d['escalation_note']}"
    return text


def _print_results(paths, results, model: str = ENSEMBLE) -> None:
    """The results table (titled by the ensemble ``model``) on stdout; each failed image's full error on stderr
    as `error: <path>: <message>`."""
    console.print(_classify_table(paths, results, model))
    for p, r in zip(paths, results, strict=True):
        if isinstance(r, Exception):
            _error_line(f"{p}: {' '.join(str(r).split())}")


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


def _connect(url: str, protocol: str, model: str | None = None):
    """A :class:`~tcsched.client.classify.ClassifierClient` to a server whose ensemble ``model`` (default
    ``classifier``, :data:`tcsched.names.ENSEMBLE`) is ready.

    Raises:
        CliError: tritonclient is missing (the client extra), or the server is unreachable or not ready.
    """
    try:
        from tcsched.client.classify import ClassifierClient, ServerUnavailable
    except ImportError as e:  # the [client] extra
        raise CliError(f"{e}: install the client with `pip install 'tcsched[client]'`") from None
    client = ClassifierClient(url, protocol, model=model or ENSEMBLE)  # type: ignore[arg-type]
    try:
        client.check_ready()
    except ServerUnavailable as e:
        client.close()
        raise CliError(str(e)) from None
    return client


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
    model: str = typer.Option(
        ENSEMBLE,
        "--model",
        help="the ensemble to call: the name the repository was built with (`tcsched build --ensemble-name`, "
        "the manifest's `ensemble`)",
    ),
):
    """Classify images through a running server with tritonclient."""
    paths = _image_files(images)
    address = _server_address(url, protocol.value)
    params = _params(
        variant, accuracy_budget, latency_budget_ms, objective.value if objective else None, min_agreement
    )
    results = []
    with _connect(address, protocol.value, model) as client, _progress("classify", err_console) as progress:
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
        _print_results(paths, results, model)
    if any(isinstance(r, Exception) for r in results):
        raise typer.Exit(2)


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

        manifest = run_build(BuildConfig(output=repo, data_dir=data_dir), console)
    else:
        console.print(f"using the existing repository {repo} (--rebuild to rebuild)")
        manifest = Manifest.read(repo / "manifest.json")
    _print_manifest(manifest)
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
        with ClassifierClient(url, protocol, model=manifest.ensemble) as client:  # type: ignore[arg-type]
            params = _params(variant, accuracy_budget, None, None)
            results = []
            for p in paths:
                try:
                    results.append(client.classify(Path(p).read_bytes(), 5, params))
                except Exception as e:  # noqa: BLE001
                    results.append(e)
        _print_results(paths, results, manifest.ensemble)
        ok = [r for r in results if not isinstance(r, Exception)]
        cascaded = [r for r in ok if (r.decision or {}).get("cascade")]
        if cascaded:
            console.print(_cascade_summary(manifest, cascaded))
        console.print("stopping tritonserver ...")
    console.print("[green]done[/green]")
    if any(isinstance(r, Exception) for r in results):
        raise typer.Exit(2)


def _cascade_summary(manifest, cascaded) -> str:
    """`tcsched run`'s line on the cascade that served ``cascaded`` (results whose DECISION names one): how many
    images escalated; for a plan whose first-stage threshold is 0 (its first stage alone met the target on the
    build's calibration images, so no row can escalate), the scheduler's own ranking of the plans for that
    target at batch 1 with their profiled cost in ms (:meth:`tcsched.scheduler.policy.Policy.rank`, no load)."""
    from tcsched.scheduler.policy import Policy, RequestOptions

    d = cascaded[0].decision
    label, target = d["cascade"], d["target_agreement"]
    head = f"confidence cascade {label} (target agreement {target:g}): "
    if not all((r.decision or {}).get("threshold") == 0 for r in cascaded):
        return head + f"{sum(r.escalated for r in cascaded)} of {len(cascaded)} images escalated"
    plans = Policy(manifest).rank(RequestOptions(min_agreement=target), batch_size=1)[:4]
    ranked = ", ".join(
        f"{p.cascade or p.chain[0] + ' alone'} {p.predicted_latency_ms:.2f} ms"
        for p in plans
        if p.predicted_latency_ms is not None
    )
    return head + (
        f"threshold 0: {label.split('>')[0]} alone met the target on the build's calibration images, so no "
        f"image escalates ({len(cascaded)} served); the scheduler's plans at batch 1 by the build's profile: "
        f"{ranked}"
    )


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


def _eager_reference(items, manifest=None) -> object:
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
        return eager_top5(items, on_batch=lambda n: progress.advance(task, n), manifest=manifest)


def _eval_items(data_dir: Path, evaluation_split: bool, limit: int | None) -> list:
    """``tcsched eval``'s labeled images of ``data_dir`` (its evaluation split only with ``evaluation_split``),
    at most ``limit``.

    Raises:
        typer.BadParameter: no images, or unlabeled ones.
    """
    from tcsched.data import SPLIT_FRACTIONS, list_images, split

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
    return items[:limit] if limit else items


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
    rounds: int = typer.Option(
        1,
        min=1,
        help="passes of every configuration, interleaved, for the compute ratios to fp32 (median over the "
        "rounds, with their range); accuracy comes from the first",
    ),
    output: Path = typer.Option(Path("reports/eval.json"), help="JSON results"),
):
    """Top-1/top-5 through the served ensemble, per variant and cascade target, vs torchvision eager, with 95%
    intervals; agreement with the served fp32, escalation rate and compute time per image (Triton statistics)."""
    import contextlib

    from tcsched.manifest import Manifest
    from tcsched.server import TritonServer

    items = _eval_items(data_dir, evaluation_split, limit)
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
        _connect(
            address, "http", manifest.ensemble
        ).close()  # fail now, in one line, when nothing serves there
    from tcsched.client.evaluation import run_eval

    eager = None
    if reference:
        top = _eager_reference(items, manifest)
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
            rounds=rounds,
            console=console,
            # --limit keeps a prefix: of the evaluation split, the one a build with --eval-limit measured
            build_images="evaluation" if evaluation_split else (None if limit else "all"),
        )
    console.print(result.table(f"{data_dir} ({len(items)} images)"))
    console.print(result.stage_table())
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({"data_dir": str(data_dir), **result.as_dict()}, indent=2))
    console.print(f"wrote {output}")
    if any(r.errors for r in result.rows):
        failed = sum(r.errors for r in result.rows)
        _error_line(f"{failed} request(s) failed; see the errors column and {output}")
        raise typer.Exit(2)
