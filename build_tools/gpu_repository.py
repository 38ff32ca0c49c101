"""The GPU model repository: the CPU build's ONNX variants compiled into TensorRT engines for this GPU.

``tcsched engines`` (:func:`convert_to_gpu_repository`) reads a repository written by ``tcsched build`` and
writes a second one beside it::

    <gpu_repo>/manifest.json                     target "gpu"; every variant runtime "tensorrt" + EngineInfo
    <gpu_repo>/<ensemble>, preprocess, scheduler  copied unchanged (the ensemble named by manifest.ensemble,
                                                 default classifier; the same scheduler)
    <gpu_repo>/<variant>/config.pbtxt            platform "tensorrt_plan", KIND_GPU, dynamic batching, warmup,
                                                 CUDA graphs for every batch size (optional)
    <gpu_repo>/<variant>/1/model.plan            the engine
    <gpu_repo>/<variant>/1/model.tensorrt.onnx   the ONNX graph the engine was compiled from
    <gpu_repo>/<variant>/1/engine_layers.json    the engine inspector's layers (formats, tactics, sparsity)
    <gpu_repo>/<variant>/1/builder.log           TensorRT's builder log of that engine

The graph compiled is the CPU variant's ONNX graph where it has no Q/DQ (fp32, fp16, sparse24), and for Q/DQ
variants the TensorRT form that ``tcsched build`` wrote and measured (``VariantEntry.tensorrt_graph``,
:mod:`tcsched.build_tools.tensorrt_graph`). The accuracy figures in the GPU manifest are those of the graph
compiled (ONNX Runtime on the CPU, on the build's evaluation split); the latency figures are measured on this GPU
(:func:`tcsched.build_tools.tensorrt_engine.profile_engine`: p50/p99 of one inference including the host<->device
copies).

Configs are ``model_config_pb2.ModelConfig`` messages rendered with protobuf ``text_format`` (as in
:mod:`tcsched.build_tools.repository`), so they are valid against Triton's ``model_config.proto`` (2.51.0).

An engine runs only on the compute capability and TensorRT version that built it: the manifest records both,
:func:`check_engine_compatibility` refuses a mismatch, and each config names its engine under
``cc_model_filenames`` for the compute capability it was built for.

``tensorrt`` is imported only inside the functions of :mod:`tcsched.build_tools.tensorrt_engine`.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from rich.console import Console

from tcsched import engine_compat
from tcsched.build_tools import repository as repo_mod
from tcsched.build_tools import tensorrt_engine as te
from tcsched.build_tools.gpu_config import (  # noqa: F401 - re-exported: the variant configs of this repository
    _CC,
    _MODEL_NAME,
    _ONNX_TO_TRITON,
    PLAN_FILENAME,
    _add_cuda_graphs,
    _add_warmup,
    _onnx_io_types,
    _queue_delay,
    _validate_config_args,
    tensorrt_variant_config,
)
from tcsched.build_tools.tensorrt_graph import TENSORRT_GRAPH_FILENAME, has_qdq
from tcsched.engine_compat import same_tensorrt_version as same_tensorrt_version  # re-exported
from tcsched.fsutil import atomic_directory, clean_stale_temporaries
from tcsched.manifest import (
    MANIFEST_FILENAME,
    AccuracyReport,
    EngineInfo,
    LatencyReport,
    Manifest,
    VariantEntry,
)

BUILDER_LOG_FILENAME = "builder.log"
LAYERS_FILENAME = "engine_layers.json"
DEFAULT_LATENCY_REPEATS = 50


def default_timing_cache_path(compute_capability: str, tensorrt_version: str) -> Path:
    """``.tcsched/tensorrt/timing-cc<cc>-trt<version>.cache``: one cache per GPU architecture and TensorRT."""
    return Path(".tcsched") / "tensorrt" / f"timing-cc{compute_capability}-trt{tensorrt_version}.cache"


def sparse_keep_decision(
    sparse_layers_chosen: int | None, sparse_p50_ms: dict[int, float], fp16_p50_ms: dict[int, float] | None
) -> tuple[bool, str]:
    """Keep-if-pays for ``sparse24``: ``(keep, reason)``.

    Kept only if the engine's p50 is lower than the fp16 engine's at every batch size both were profiled at (the
    scheduler may use either at any batch size, so a sparse engine that is slower anywhere is dropped) AND the
    engine inspector shows sparse kernels on at least one layer. ``sparse_layers_chosen`` ``None`` means the
    inspector does not say (:func:`~tcsched.build_tools.tensorrt_engine.sparse_layers`): then latency alone
    decides, and the reason says that the kernel choice is unknown.
    """
    if fp16_p50_ms is None:
        return False, "sparse24 dropped: no fp16 variant to compare it with"
    if sparse_layers_chosen == 0:
        return False, (
            "sparse24 dropped: the engine inspector shows no layer with sparse weights (dense tactics timed "
            "faster), so it is the fp16 engine at best"
        )
    common = sorted(set(sparse_p50_ms) & set(fp16_p50_ms))
    if not common:
        return False, "sparse24 dropped: no batch size profiled for both sparse24 and fp16"
    pairs = ", ".join(f"b{b}: {sparse_p50_ms[b]:.3f} vs {fp16_p50_ms[b]:.3f} ms" for b in common)
    kernels = (
        "sparse kernels unknown (the engine inspector has no sparsity field)"
        if sparse_layers_chosen is None
        else f"sparse kernels on {sparse_layers_chosen} layers"
    )
    if all(sparse_p50_ms[b] < fp16_p50_ms[b] for b in common):
        return True, f"sparse24 kept: {kernels}, faster than fp16 ({pairs})"
    return False, f"sparse24 dropped: {kernels} but not faster than fp16 at every batch size ({pairs})"


@dataclass(frozen=True)
class EngineSource:
    """The ONNX graph an engine is compiled from, and the accuracy measured on that very graph."""

    path: Path
    accuracy: AccuracyReport | None
    note: str | None


def engine_source(cpu_repo: Path, v: VariantEntry) -> EngineSource:
    """What TensorRT compiles for variant ``v`` of ``cpu_repo``: its ``tensorrt_graph`` (the build's TensorRT
    form of a Q/DQ graph, with that graph's accuracy) if it has one, else its own ONNX graph (no Q/DQ: the
    graph the CPU figures are of).

    Raises:
        ValueError: a Q/DQ variant without ``tensorrt_graph`` (a repository of an older build: its figures are
            the uint8 graph's, not those of anything TensorRT can compile), or a missing file.
    """
    import onnx

    if v.tensorrt_graph is not None:
        path = cpu_repo / v.tensorrt_graph.file
        if not path.is_file():
            raise ValueError(
                f"variant {v.name}: its TensorRT graph {path} is missing; rebuild with `tcsched build`"
            )
        return EngineSource(path, v.tensorrt_graph.accuracy, v.tensorrt_graph.note or None)
    path = cpu_repo / v.file
    if has_qdq(onnx.load(str(path), load_external_data=False)):
        raise ValueError(
            f"variant {v.name}: a Q/DQ graph without a measured TensorRT form in the manifest (tensorrt_graph); "
            "rebuild the CPU repository with `tcsched build`, which writes and measures it"
        )
    return EngineSource(path, v.accuracy, None)


def _validate_cpu_repository(cpu_repo: Path, gpu_repo: Path) -> Manifest:
    if not (cpu_repo / MANIFEST_FILENAME).is_file():
        raise ValueError(
            f"{cpu_repo} is not a tcsched repository (no {MANIFEST_FILENAME}); run `tcsched build`"
        )
    if cpu_repo.resolve() == gpu_repo.resolve():
        raise ValueError(f"the GPU repository must differ from the CPU one, both are {cpu_repo}")
    m = Manifest.read(cpu_repo / MANIFEST_FILENAME)
    if m.target != "cpu":
        raise ValueError(f"{cpu_repo} is a {m.target!r} repository; expected the CPU build's (ONNX variants)")
    if m.input.name != te.INPUT_NAME or list(m.input.shape) != list(te.CHW):
        raise ValueError(
            f"engines are built for input {te.INPUT_NAME!r} [3, 224, 224]; the manifest has "
            f"{m.input.name!r} {m.input.shape}"
        )
    if m.input.dtype != "float32":
        raise ValueError(
            f"engines are built from float32-input graphs; {cpu_repo} was built with --pixels {m.input.dtype} "
            "(its graphs take pixels): rebuild it with --pixels float32 for a GPU repository"
        )
    if m.variant(m.reference_variant).runtime != "onnxruntime":
        raise ValueError(f"the reference variant {m.reference_variant} must be an ONNX Runtime graph")
    for v in m.variants:
        if not v.file.endswith(".onnx") or not (cpu_repo / v.file).is_file():
            raise ValueError(f"variant {v.name}: expected its ONNX graph at {cpu_repo / v.file}")
    for d in (repo_mod.PREPROCESS, repo_mod.SCHEDULER, m.ensemble):
        if not (cpu_repo / d / "config.pbtxt").is_file():
            raise ValueError(f"{cpu_repo} lacks the {d!r} model; rebuild it with `tcsched build`")
    return m


# ------------------------------------------------------------------------------------- the conversion's steps
@dataclass(frozen=True)
class _Target:
    """Where and for what the conversion builds: the GPU's identity, the timing cache, the profile's batch
    sizes, the builder's workspace."""

    gpu_name: str
    cc: str
    trt_version: str
    cache: Path
    max_batch_size: int
    batch_sizes: list[int]
    workspace_bytes: int


def _copy_pipeline(cpu_repo: Path, tmp: Path, ensemble: str) -> None:
    """The ensemble (named ``ensemble``: the manifest's), preprocess and scheduler models (and the repository
    README), unchanged."""
    for d in (repo_mod.PREPROCESS, repo_mod.SCHEDULER, ensemble):
        shutil.copytree(cpu_repo / d, tmp / d, ignore=shutil.ignore_patterns("__pycache__"))
    if (cpu_repo / "README.md").is_file():
        shutil.copyfile(cpu_repo / "README.md", tmp / "README.md")


def _build_engines(
    variants: Iterable[VariantEntry],
    sources: dict[str, EngineSource],
    tmp: Path,
    t: _Target,
    console: Console,
) -> dict[str, te.EngineBuildResult]:
    """One engine per variant into ``tmp/<variant>/1/``, beside a copy of the graph it is compiled from."""
    built = {}
    for v in variants:
        folder = tmp / v.name / "1"
        folder.mkdir(parents=True, exist_ok=True)
        onnx_copy = folder / TENSORRT_GRAPH_FILENAME
        shutil.copyfile(sources[v.name].path, onnx_copy)
        sparse = v.precision == "sparse24"
        with console.status(f"TensorRT build {v.name}{' (SPARSE_WEIGHTS)' if sparse else ''}"):
            res = te.build_engine(
                onnx_copy,
                folder / PLAN_FILENAME,
                max_batch_size=t.max_batch_size,
                sparse=sparse,
                timing_cache_path=t.cache,
                log_path=folder / BUILDER_LOG_FILENAME,
                layers_path=folder / LAYERS_FILENAME,
                workspace_bytes=t.workspace_bytes,
            )
        built[v.name] = res
        extra = f", sparse kernels on {res.sparse_layers_chosen} layers" if sparse else ""
        console.print(
            f"  {v.name}: {res.size_bytes / 1e6:.1f} MB in {res.build_seconds:.0f} s, "
            f"{res.int8_layers} INT8 layers{extra}"
        )
    return built


def _profile_engines(
    built: dict[str, te.EngineBuildResult], t: _Target, repeats: int, console: Console
) -> dict[str, dict[int, te.EngineLatency]]:
    out = {}
    for name, res in built.items():
        with console.status(f"profile {name} at batch {t.batch_sizes}"):
            out[name] = te.profile_engine(res.plan_path, t.batch_sizes, repeats)
    return out


def _keep_if_pays(
    src: Manifest,
    variants: list[VariantEntry],
    built: dict[str, te.EngineBuildResult],
    p50: dict[str, dict[int, float]],
    tmp: Path,
    console: Console,
) -> tuple[list[VariantEntry], dict[str, list[str]]]:
    """The variants kept (``sparse24`` only if it pays, :func:`sparse_keep_decision`; a dropped one's folder is
    removed) and the notes per variant (a drop is noted on fp16, or on the reference without fp16)."""
    fp16 = next((v for v in variants if v.precision == "fp16"), None)
    note_target = fp16.name if fp16 is not None else src.reference_variant
    notes: dict[str, list[str]] = {}
    kept = []
    for v in variants:
        if v.precision == "sparse24":
            keep, reason = sparse_keep_decision(
                built[v.name].sparse_layers_chosen, p50[v.name], p50[fp16.name] if fp16 else None
            )
            console.print(f"  {'[green]' if keep else '[yellow]'}{v.name}: {reason}")
            if not keep:
                notes.setdefault(note_target, []).append(f"{v.name}: {reason}")
                shutil.rmtree(tmp / v.name)
                continue
            notes.setdefault(v.name, []).append(reason)
        kept.append(v)
    return kept, notes


def _variant_config(cpu_repo: Path, src: Manifest, v: VariantEntry, source: Path, cc: str, cuda_graphs: bool):
    in_t, out_t = _onnx_io_types(source, src.input.name, src.output.name)
    labels = cpu_repo / v.name / repo_mod.LABELS_FILE  # copied beside the config by the caller when present
    return tensorrt_variant_config(
        v.name,
        src.max_batch_size,
        cuda_graphs,
        {cc: PLAN_FILENAME},
        max_queue_delay_microseconds=_queue_delay(cpu_repo, v.name),
        input_name=src.input.name,
        output_name=src.output.name,
        chw=src.input.shape,
        classes=src.output.shape[0],
        input_dtype=in_t,
        output_dtype=out_t,
        label_filename=repo_mod.LABELS_FILE if labels.is_file() else None,
    )


def _latency_report(lat: dict[int, te.EngineLatency], ref: dict[int, te.EngineLatency], t: _Target) -> dict:
    return LatencyReport(
        device=f"gpu: {t.gpu_name} (compute capability {t.cc}); input and output host<->device copies included",
        runtime="tensorrt",
        p50_ms_by_batch={b: x.p50_ms for b, x in lat.items()},
        p99_ms_by_batch={b: x.p99_ms for b, x in lat.items()},
        ratio_to_fp32_by_batch={b: x.p50_ms / ref[b].p50_ms for b, x in lat.items() if b in ref},
    ).model_dump()


def _engine_info(res: te.EngineBuildResult, tmp: Path, t: _Target, sparse: bool) -> dict:
    return EngineInfo(
        plan_file=str(res.plan_path.relative_to(tmp)),
        tensorrt_version=res.tensorrt_version,
        compute_capability=t.cc,
        gpu_name=t.gpu_name,
        builder_log_file=str(res.log_path.relative_to(tmp)),
        build_seconds=round(res.build_seconds, 3),
        sparse_layers_chosen=res.sparse_layers_chosen if sparse else None,
        onnx_file=str(res.plan_path.with_name(TENSORRT_GRAPH_FILENAME).relative_to(tmp)),
        layers_file=str(res.layers_path.relative_to(tmp)),
        int8_layers=res.int8_layers,
    ).model_dump()


def _gpu_notes(
    v: VariantEntry, source: EngineSource, res: te.EngineBuildResult, lat, t: _Target
) -> list[str]:
    compute = ", ".join(f"b{b}: {x.compute_p50_ms:.3f}" for b, x in sorted(lat.items()))
    return [
        *v.build_notes,
        *([source.note] if source.note else []),
        f"TensorRT {t.trt_version} engine for {t.gpu_name} (compute capability {t.cc}): strongly typed network "
        f"(precisions from the graph's Q/DQ and Cast nodes), TF32 off, profile batch 1..{t.max_batch_size}, "
        f"built in {res.build_seconds:.0f} s, {res.int8_layers} layers with INT8 I/O (engine inspector); "
        f"accuracy figures are ONNX Runtime's on the graph compiled ({TENSORRT_GRAPH_FILENAME})",
        f"latency: one inference with the input and output copies; the engine alone p50 ms {compute}",
    ]


def _gpu_entry(
    v: VariantEntry,
    source: EngineSource,
    res: te.EngineBuildResult,
    lat: dict[int, te.EngineLatency],
    ref: dict[int, te.EngineLatency],
    tmp: Path,
    t: _Target,
    extra_notes: list[str],
) -> VariantEntry:
    """The GPU manifest entry of ``v``: the engine, the graph compiled and its accuracy, the GPU latency."""
    return VariantEntry.model_validate(
        v.model_dump(exclude={"tensorrt_graph"})
        | {
            "runtime": "tensorrt",
            "file": str(res.plan_path.relative_to(tmp)),
            "size_bytes": res.size_bytes,
            "accuracy": source.accuracy.model_dump() if source.accuracy is not None else None,
            "latency": _latency_report(lat, ref, t),
            "engine": _engine_info(res, tmp, t, v.precision == "sparse24"),
            "build_notes": [*_gpu_notes(v, source, res, lat, t), *extra_notes],
        }
    )


def _write_variants(
    cpu_repo: Path,
    src: Manifest,
    kept: list[VariantEntry],
    sources: dict[str, EngineSource],
    built: dict[str, te.EngineBuildResult],
    lat: dict[str, dict[int, te.EngineLatency]],
    tmp: Path,
    t: _Target,
    cuda_graphs: bool,
    notes: dict[str, list[str]],
) -> list[VariantEntry]:
    """Each kept variant's config.pbtxt (and labels file) under ``tmp``; returns their GPU manifest entries."""
    entries = []
    for v in kept:
        cfg = _variant_config(cpu_repo, src, v, sources[v.name].path, t.cc, cuda_graphs)
        (tmp / v.name / "config.pbtxt").write_text(repo_mod.render(cfg))
        if cfg.output[0].label_filename:
            shutil.copyfile(cpu_repo / v.name / repo_mod.LABELS_FILE, tmp / v.name / repo_mod.LABELS_FILE)
        ref = lat[src.reference_variant]
        entries.append(
            _gpu_entry(v, sources[v.name], built[v.name], lat[v.name], ref, tmp, t, notes.get(v.name, []))
        )
    return entries


def _gpu_manifest(src: Manifest, entries: list[VariantEntry]) -> Manifest:
    """The GPU manifest: the CPU one with the GPU entries, ``target: "gpu"``, and no cascades (their thresholds
    and expected latencies were calibrated on ONNX Runtime's graphs and CPU latencies; a note says so)."""
    ref = next(e for e in entries if e.name == src.reference_variant)
    if src.cascades:
        ref.build_notes.append(
            f"{len(src.cascades)} confidence cascades of the CPU build not carried over: calibrated on the CPU "
            "graphs' logits and latencies, not on these engines"
        )
    return Manifest.model_validate(
        src.model_dump()
        | {
            "variants": [e.model_dump() for e in entries],
            "target": "gpu",
            "cascades": [],
            "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
    )


def _target(src: Manifest, identity, timing_cache, workspace_bytes: int) -> _Target:
    gpu_name, cc, trt_version = identity()
    cache = Path(timing_cache) if timing_cache is not None else default_timing_cache_path(cc, trt_version)
    mbs = src.max_batch_size
    measured = {b for v in src.variants if v.latency for b in v.latency.p50_ms_by_batch if 1 <= b <= mbs}
    return _Target(gpu_name, cc, trt_version, cache, mbs, sorted({1, mbs} | measured), workspace_bytes)


def convert_to_gpu_repository(
    cpu_repo: str | os.PathLike,
    gpu_repo: str | os.PathLike,
    *,
    cuda_graphs: bool = False,
    timing_cache: str | os.PathLike | None = None,
    console: Console | None = None,
    latency_repeats: int = DEFAULT_LATENCY_REPEATS,
    workspace_bytes: int = te.DEFAULT_WORKSPACE_BYTES,
    identity: Callable[[], tuple[str, str, str]] | None = None,
) -> Manifest:
    """Compile every variant of the CPU repository into a TensorRT engine and write the GPU repository.

    Steps: check the inputs and pick each variant's graph (:func:`engine_source`); identify this GPU; build every
    engine (``sparse24`` with ``SPARSE_WEIGHTS``) sharing one timing cache; profile each engine at batch 1, the
    max batch size and every batch size the CPU build measured; keep-if-pays for ``sparse24``; write configs,
    the unchanged pipeline and the manifest (``target: "gpu"``). Everything is written into a temporary folder
    swapped in at the end (atomic).

    Args:
        cpu_repo: repository written by ``tcsched build`` (``target: "cpu"``, ONNX variants).
        gpu_repo: repository to (re)write; must differ from ``cpu_repo``.
        cuda_graphs: CUDA graphs for every batch size in every variant config (:func:`_add_cuda_graphs`).
        timing_cache: timing cache file shared by all builds (default :func:`default_timing_cache_path`).
        console: rich console for progress (default: a new one).
        latency_repeats: timed runs per (engine, batch size), >= 1.
        workspace_bytes: builder workspace limit per engine, bytes.
        identity: ``() -> (gpu_name, compute_capability, tensorrt_version)``; default
            :func:`tcsched.build_tools.tensorrt_engine.gpu_identity` (tests pass a fake).

    Raises:
        ValueError: ``cpu_repo`` is not a CPU tcsched repository (no manifest, target not cpu, a variant's
            ONNX file missing, another input name/shape), a Q/DQ variant has no measured TensorRT graph,
            ``gpu_repo`` equals ``cpu_repo``, or ``latency_repeats`` < 1.
        ImportError / RuntimeError: no ``tensorrt`` or cuda-python, no CUDA GPU, or a build failed (the previous
            ``gpu_repo`` is then left as it was).
    """
    cpu_repo, gpu_repo = Path(cpu_repo), Path(gpu_repo)
    if not isinstance(latency_repeats, int) or latency_repeats < 1:
        raise ValueError(f"latency_repeats must be an int >= 1, got {latency_repeats!r}")
    src = _validate_cpu_repository(cpu_repo, gpu_repo)
    # ONNX Runtime's variants are the ONNX graphs the CPU figures are of; other runtimes' (OpenVINO) are CPU-only
    variants = [v for v in src.variants if v.runtime == "onnxruntime"]
    sources = {v.name: engine_source(cpu_repo, v) for v in variants}
    console = console or Console()
    t = _target(src, identity or te.gpu_identity, timing_cache, workspace_bytes)
    console.print(
        f"compiling {len(variants)} variants for {t.gpu_name} (compute capability {t.cc}), "
        f"TensorRT {t.trt_version}"
    )
    clean_stale_temporaries(gpu_repo)
    t_start = time.perf_counter()
    with atomic_directory(gpu_repo) as tmp:
        _copy_pipeline(cpu_repo, tmp, src.ensemble)
        built = _build_engines(variants, sources, tmp, t, console)
        lat = _profile_engines(built, t, latency_repeats, console)
        p50 = {n: {b: x.p50_ms for b, x in by_b.items()} for n, by_b in lat.items()}
        kept, extra_notes = _keep_if_pays(src, variants, built, p50, tmp, console)
        for v in src.variants:
            if v.runtime != "onnxruntime":
                note = f"{v.name}: runtime {v.runtime} (a CPU runtime): not compiled for the GPU"
                extra_notes.setdefault(src.reference_variant, []).append(note)
        entries = _write_variants(cpu_repo, src, kept, sources, built, lat, tmp, t, cuda_graphs, extra_notes)
        manifest = _gpu_manifest(src, entries)
        manifest.write(tmp / MANIFEST_FILENAME)
    console.print(
        f"[green]wrote {gpu_repo} in {time.perf_counter() - t_start:.0f} s (timing cache {t.cache})[/green]"
    )
    return manifest


def check_engine_compatibility(
    manifest: Manifest, identity: Callable[[], tuple[str, str, str]] | None = None
) -> None:
    """:func:`tcsched.engine_compat.check_engine_compatibility`, with ``identity`` defaulting to this module's
    :func:`tcsched.build_tools.tensorrt_engine.gpu_identity` looked up at call time (tests replace it there).

    Raises:
        RuntimeError: as :func:`tcsched.engine_compat.check_engine_compatibility`.
    """
    engine_compat.check_engine_compatibility(manifest, identity or te.gpu_identity)
