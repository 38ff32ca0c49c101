"""The GPU model repository: the CPU build's ONNX variants compiled into TensorRT engines for this GPU.

``tcsched engines`` (:func:`convert_to_gpu_repository`) reads a repository written by ``tcsched build`` and
writes a second one beside it::

    <gpu_repo>/manifest.json                     target "gpu"; every variant runtime "tensorrt" + EngineInfo
    <gpu_repo>/classifier, preprocess, scheduler copied unchanged (same ensemble, same scheduler)
    <gpu_repo>/<variant>/config.pbtxt            platform "tensorrt_plan", KIND_GPU, dynamic batching
    <gpu_repo>/<variant>/1/model.plan            the engine (compiled from <cpu_repo>/<variant>/1/model.onnx)
    <gpu_repo>/<variant>/1/builder.log           TensorRT's builder log of that engine

The ONNX graphs compiled are exactly those of the CPU repository, the ones the CPU build and tests check
numerically; the accuracy figures in the manifest are carried over from them (ONNX Runtime on CPU), the
latency figures are re-measured on this GPU (:func:`tcsched.build_tools.tensorrt_engine.profile_engine`).

Configs are ``model_config_pb2.ModelConfig`` messages rendered with protobuf ``text_format`` (as in
:mod:`tcsched.build_tools.repository`), so they are valid against Triton's ``model_config.proto`` (2.51.0).

An engine runs only on the compute capability and TensorRT version that built it: the manifest records both,
:func:`check_engine_compatibility` refuses a mismatch, and each config names its engine under
``cc_model_filenames`` for the compute capability it was built for.

``tensorrt`` is imported only inside the functions of :mod:`tcsched.build_tools.tensorrt_engine`.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path

from rich.console import Console
from tritonclient.grpc import model_config_pb2 as mc

from tcsched import engine_compat
from tcsched.build_tools import repository as repo_mod
from tcsched.build_tools import tensorrt_engine as te
from tcsched.engine_compat import same_tensorrt_version as same_tensorrt_version  # re-exported
from tcsched.fsutil import atomic_directory, clean_stale_temporaries
from tcsched.manifest import MANIFEST_FILENAME, EngineInfo, LatencyReport, Manifest, VariantEntry

PLAN_FILENAME = "model.plan"
BUILDER_LOG_FILENAME = "builder.log"
DEFAULT_LATENCY_REPEATS = 50
_CC = re.compile(r"^\d+\.\d+$")
_MODEL_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")

# ONNX TensorProto element type -> Triton data type, for the engine I/O types (strongly typed: the graph's)
_ONNX_TO_TRITON = {1: mc.TYPE_FP32, 10: mc.TYPE_FP16, 16: mc.TYPE_BF16}


def tensorrt_variant_config(
    name: str,
    max_batch_size: int,
    cuda_graphs: bool,
    cc_filenames: dict[str, str] | None,
    *,
    max_queue_delay_microseconds: int = 2000,
    input_name: str = te.INPUT_NAME,
    output_name: str = te.OUTPUT_NAME,
    chw: Sequence[int] = te.CHW,
    classes: int = 1000,
    input_dtype: int = mc.TYPE_FP32,
    output_dtype: int = mc.TYPE_FP32,
    instance_count: int = 1,
) -> mc.ModelConfig:
    """Triton config of one TensorRT variant.

    ``platform: "tensorrt_plan"``, one ``KIND_GPU`` instance group of ``instance_count`` instances, dynamic
    batching (``max_queue_delay_microseconds``), input ``input_name`` [3, 224, 224] and output ``output_name``
    [classes] (batch dimension excluded; FP32 unless the engine's graph says otherwise),
    ``default_model_filename: "model.plan"``, ``cc_model_filenames`` as given (compute capability such as
    ``"9.0"`` -> engine file name in the version folder), and with ``cuda_graphs``
    ``optimization { cuda { graphs: true } }`` (Triton's TensorRT backend then captures CUDA graphs).

    Raises:
        ValueError: bad model name, ``max_batch_size`` < 1, ``instance_count`` < 1, negative queue delay, a
            ``cc_filenames`` key not of the form ``"<major>.<minor>"`` or a value that is not a bare file name.
    """
    if not isinstance(name, str) or not _MODEL_NAME.match(name):
        raise ValueError(f"model name must be letters, digits, '_', '-', '.', got {name!r}")
    if not isinstance(max_batch_size, int) or max_batch_size < 1:
        raise ValueError(f"max_batch_size must be an int >= 1, got {max_batch_size!r}")
    if not isinstance(instance_count, int) or instance_count < 1:
        raise ValueError(f"instance_count must be an int >= 1, got {instance_count!r}")
    if max_queue_delay_microseconds < 0:
        raise ValueError(f"max_queue_delay_microseconds must be >= 0, got {max_queue_delay_microseconds}")
    for cc, fname in (cc_filenames or {}).items():
        if not isinstance(cc, str) or not _CC.match(cc):
            raise ValueError(f"cc_filenames keys must be compute capabilities like '9.0', got {cc!r}")
        if not isinstance(fname, str) or not fname or Path(fname).name != fname:
            raise ValueError(f"cc_filenames[{cc!r}] must be a file name in the version folder, got {fname!r}")
    cfg = mc.ModelConfig(
        name=name,
        platform="tensorrt_plan",
        max_batch_size=max_batch_size,
        default_model_filename=PLAN_FILENAME,
    )
    cfg.input.append(repo_mod._tensor(mc.ModelInput, input_name, input_dtype, list(chw)))
    cfg.output.append(repo_mod._tensor(mc.ModelOutput, output_name, output_dtype, [classes]))
    cfg.dynamic_batching.max_queue_delay_microseconds = max_queue_delay_microseconds
    cfg.instance_group.append(
        mc.ModelInstanceGroup(count=instance_count, kind=mc.ModelInstanceGroup.KIND_GPU)
    )
    for cc, fname in sorted((cc_filenames or {}).items()):
        cfg.cc_model_filenames[cc] = fname
    if cuda_graphs:
        cfg.optimization.cuda.graphs = True
    return cfg


def default_timing_cache_path(compute_capability: str, tensorrt_version: str) -> Path:
    """``.tcsched/tensorrt/timing-cc<cc>-trt<version>.cache``: one cache per GPU architecture and TensorRT."""
    return Path(".tcsched") / "tensorrt" / f"timing-cc{compute_capability}-trt{tensorrt_version}.cache"


def sparse_keep_decision(
    sparse_layers_chosen: int, sparse_p50_ms: dict[int, float], fp16_p50_ms: dict[int, float] | None
) -> tuple[bool, str]:
    """Keep-if-pays for ``sparse24``: ``(keep, reason)``.

    Kept only if the builder picked sparse kernels for at least one layer AND the engine's p50 is lower than
    the fp16 engine's at every batch size both were profiled at (the scheduler may use either at any batch
    size, so a sparse engine that is slower anywhere is dropped).
    """
    if fp16_p50_ms is None:
        return False, "sparse24 dropped: no fp16 variant to compare it with"
    if sparse_layers_chosen < 1:
        return False, (
            "sparse24 dropped: the builder picked no sparse kernel for any layer (dense tactics timed faster), "
            "so it is the fp16 engine at best"
        )
    common = sorted(set(sparse_p50_ms) & set(fp16_p50_ms))
    if not common:
        return False, "sparse24 dropped: no batch size profiled for both sparse24 and fp16"
    pairs = ", ".join(f"b{b}: {sparse_p50_ms[b]:.3f} vs {fp16_p50_ms[b]:.3f} ms" for b in common)
    if all(sparse_p50_ms[b] < fp16_p50_ms[b] for b in common):
        return (
            True,
            f"sparse24 kept: sparse kernels on {sparse_layers_chosen} layers, faster than fp16 ({pairs})",
        )
    return False, (
        f"sparse24 dropped: sparse kernels on {sparse_layers_chosen} layers but not faster than fp16 "
        f"at every batch size ({pairs})"
    )


def _onnx_io_types(onnx_path: Path, input_name: str, output_name: str) -> tuple[int, int]:
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*graph.input, *graph.output)}
    out = []
    for n in (input_name, output_name):
        if n not in types:
            raise ValueError(f"{onnx_path}: no graph input/output named {n!r}; has {sorted(types)}")
        if types[n] not in _ONNX_TO_TRITON:
            raise ValueError(
                f"{onnx_path}: {n!r} has ONNX element type {types[n]}; expected float/float16/bfloat16"
            )
        out.append(_ONNX_TO_TRITON[types[n]])
    return out[0], out[1]


def _queue_delay(cpu_repo: Path, name: str) -> int:
    p = cpu_repo / name / "config.pbtxt"
    if p.is_file():
        cfg = repo_mod.parse(p.read_text())
        if cfg.HasField("dynamic_batching"):
            return int(cfg.dynamic_batching.max_queue_delay_microseconds)
    return repo_mod.ServingOptions().max_queue_delay_microseconds


def tensorrt_source(onnx_path: Path, dest: Path) -> tuple[Path, str | None]:
    """The graph TensorRT compiles for a variant: the ONNX file itself, or, where its Q/DQ are in ONNX Runtime's
    asymmetric uint8 form, the same graph re-expressed as symmetric int8 (``quantize.to_symmetric_int8``) at
    ``dest``. Returns (path, note or None).

    Raises:
        ValueError: the graph still has Q/DQ that TensorRT rejects after the conversion.
    """
    import onnx

    from tcsched.build_tools.quantize import to_symmetric_int8

    if not te.tensorrt_qdq_problems(onnx_path):
        return onnx_path, None
    model, n = to_symmetric_int8(onnx.load(str(onnx_path)))
    dest.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dest))
    problems = te.tensorrt_qdq_problems(dest)
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ValueError(f"TensorRT cannot compile {onnx_path}: {'; '.join(problems[:3])}{more}")
    return dest, (
        f"TensorRT compiled {dest.name}: the ONNX graph with its {n} uint8 Q/DQ ranges re-expressed as symmetric "
        "int8 (zero point 0) and int32 biases folded to float, as TensorRT requires"
    )


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
    for v in m.variants:
        if not v.file.endswith(".onnx") or not (cpu_repo / v.file).is_file():
            raise ValueError(f"variant {v.name}: expected its ONNX graph at {cpu_repo / v.file}")
    for d in (repo_mod.PREPROCESS, repo_mod.SCHEDULER, repo_mod.ENSEMBLE):
        if not (cpu_repo / d / "config.pbtxt").is_file():
            raise ValueError(f"{cpu_repo} lacks the {d!r} model; rebuild it with `tcsched build`")
    return m


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

    Steps: check the inputs; identify this GPU (name, compute capability, TensorRT version); build every
    engine (``sparse24`` with ``SPARSE_WEIGHTS``) sharing one timing cache; profile each engine's p50 latency
    (ms) at batch 1, the max batch size and every batch size the CPU build measured; apply keep-if-pays to
    ``sparse24`` (:func:`sparse_keep_decision`: a dropped variant's folder is removed and the reason goes into
    the build notes of the fp16 variant, or of the reference variant if there is no fp16); write configs,
    the unchanged pipeline (preprocess, scheduler, classifier + labels) and the manifest (``target: "gpu"``).
    Everything is written into a temporary folder swapped in at the end (atomic).

    Args:
        cpu_repo: repository written by ``tcsched build`` (``target: "cpu"``, ONNX variants).
        gpu_repo: repository to (re)write; must differ from ``cpu_repo``.
        cuda_graphs: emit ``optimization { cuda { graphs: true } }`` in every variant config.
        timing_cache: timing cache file shared by all builds (default
            :func:`default_timing_cache_path` for this GPU and TensorRT, under ``.tcsched/``).
        console: rich console for progress (default: a new one).
        latency_repeats: timed runs per (engine, batch size), >= 1.
        workspace_bytes: builder workspace limit per engine, bytes.
        identity: ``() -> (gpu_name, compute_capability, tensorrt_version)``; default
            :func:`tcsched.build_tools.tensorrt_engine.gpu_identity` (tests pass a fake).

    Returns:
        The manifest written to ``<gpu_repo>/manifest.json``.

    Raises:
        ValueError: ``cpu_repo`` is not a CPU tcsched repository (no manifest, target not cpu, a variant's
            ONNX file missing, another input name/shape), a variant has Q/DQ nodes TensorRT rejects
            (:func:`~tcsched.build_tools.tensorrt_engine.tensorrt_qdq_problems`: asymmetric or uint8),
            ``gpu_repo`` equals ``cpu_repo``, or ``latency_repeats`` < 1.
        ImportError / RuntimeError: no ``tensorrt``, no CUDA GPU, or a build failed (the previous
            ``gpu_repo`` is then left as it was).
    """
    cpu_repo, gpu_repo = Path(cpu_repo), Path(gpu_repo)
    if not isinstance(latency_repeats, int) or latency_repeats < 1:
        raise ValueError(f"latency_repeats must be an int >= 1, got {latency_repeats!r}")
    src = _validate_cpu_repository(cpu_repo, gpu_repo)
    console = console or Console()
    gpu_name, cc, trt_version = (identity or te.gpu_identity)()
    cache = Path(timing_cache) if timing_cache is not None else default_timing_cache_path(cc, trt_version)
    mbs = src.max_batch_size
    batch_sizes = sorted(
        {1, mbs} | {b for v in src.variants if v.latency for b in v.latency.p50_ms_by_batch if 1 <= b <= mbs}
    )
    console.print(
        f"compiling {len(src.variants)} variants for {gpu_name} (compute capability {cc}), TensorRT {trt_version}"
    )
    clean_stale_temporaries(gpu_repo)
    t_start = time.perf_counter()
    with atomic_directory(gpu_repo) as tmp:
        for d in (repo_mod.PREPROCESS, repo_mod.SCHEDULER, repo_mod.ENSEMBLE):
            shutil.copytree(cpu_repo / d, tmp / d, ignore=shutil.ignore_patterns("__pycache__"))
        if (cpu_repo / "README.md").is_file():
            shutil.copyfile(cpu_repo / "README.md", tmp / "README.md")

        built: dict[str, te.EngineBuildResult] = {}
        trt_notes: dict[str, str] = {}
        for v in src.variants:
            sparse = v.precision == "sparse24"
            source, trt_note = tensorrt_source(cpu_repo / v.file, tmp / v.name / "1" / "model.tensorrt.onnx")
            if trt_note:
                trt_notes[v.name] = trt_note
            with console.status(f"TensorRT build {v.name}{' (SPARSE_WEIGHTS)' if sparse else ''}"):
                res = te.build_engine(
                    source,
                    tmp / v.name / "1" / PLAN_FILENAME,
                    max_batch_size=mbs,
                    sparse=sparse,
                    timing_cache_path=cache,
                    log_path=tmp / v.name / "1" / BUILDER_LOG_FILENAME,
                    workspace_bytes=workspace_bytes,
                )
            built[v.name] = res
            extra = f", sparse kernels on {res.sparse_layers_chosen} layers" if sparse else ""
            console.print(f"  {v.name}: {res.size_bytes / 1e6:.1f} MB in {res.build_seconds:.0f} s{extra}")

        p50: dict[str, dict[int, float]] = {}
        for v in src.variants:
            with console.status(f"profile {v.name} at batch {batch_sizes}"):
                p50[v.name] = {
                    int(b): float(t)
                    for b, t in te.profile_engine(
                        built[v.name].plan_path, batch_sizes, latency_repeats
                    ).items()
                }

        fp16 = next((v for v in src.variants if v.precision == "fp16"), None)
        note_target = fp16.name if fp16 is not None else src.reference_variant
        extra_notes: dict[str, list[str]] = {}
        kept = []
        for v in src.variants:
            if v.precision == "sparse24":
                keep, reason = sparse_keep_decision(
                    built[v.name].sparse_layers_chosen, p50[v.name], p50[fp16.name] if fp16 else None
                )
                console.print(f"  {'[green]' if keep else '[yellow]'}{v.name}: {reason}")
                if not keep:
                    extra_notes.setdefault(note_target, []).append(f"{v.name}: {reason}")
                    shutil.rmtree(tmp / v.name)
                    continue
                extra_notes.setdefault(v.name, []).append(reason)
            kept.append(v)

        ref = p50[src.reference_variant]
        entries = []
        for v in kept:
            res = built[v.name]
            in_t, out_t = _onnx_io_types(cpu_repo / v.file, src.input.name, src.output.name)
            cfg = tensorrt_variant_config(
                v.name,
                mbs,
                cuda_graphs,
                {cc: PLAN_FILENAME},
                max_queue_delay_microseconds=_queue_delay(cpu_repo, v.name),
                input_name=src.input.name,
                output_name=src.output.name,
                chw=src.input.shape,
                classes=src.output.shape[0],
                input_dtype=in_t,
                output_dtype=out_t,
            )
            (tmp / v.name / "config.pbtxt").write_text(repo_mod.render(cfg))
            notes = [
                *v.build_notes,
                f"TensorRT {trt_version} engine for {gpu_name} (compute capability {cc}): strongly typed network "
                f"(precisions from the graph's Q/DQ and Cast nodes), profile batch 1..{mbs}, built in "
                f"{res.build_seconds:.0f} s; accuracy figures are ONNX Runtime's on the same ONNX graph",
                *extra_notes.get(v.name, []),
                *([trt_notes[v.name]] if v.name in trt_notes else []),
            ]
            entries.append(
                VariantEntry.model_validate(
                    v.model_dump()
                    | {
                        "runtime": "tensorrt",
                        "file": str(res.plan_path.relative_to(tmp)),
                        "size_bytes": res.size_bytes,
                        "latency": LatencyReport(
                            device=f"gpu: {gpu_name} (compute capability {cc})",
                            runtime="tensorrt",
                            p50_ms_by_batch=p50[v.name],
                            ratio_to_fp32_by_batch={
                                b: t / ref[b] for b, t in p50[v.name].items() if ref.get(b)
                            },
                        ).model_dump(),
                        "engine": EngineInfo(
                            plan_file=str(res.plan_path.relative_to(tmp)),
                            tensorrt_version=res.tensorrt_version,
                            compute_capability=cc,
                            gpu_name=gpu_name,
                            builder_log_file=str(res.log_path.relative_to(tmp)),
                            build_seconds=round(res.build_seconds, 3),
                            sparse_layers_chosen=res.sparse_layers_chosen
                            if v.precision == "sparse24"
                            else None,
                        ).model_dump(),
                        "build_notes": notes,
                    }
                )
            )
        manifest = Manifest.model_validate(
            src.model_dump()
            | {
                "variants": [e.model_dump() for e in entries],
                "target": "gpu",
                "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            }
        )
        manifest.write(tmp / MANIFEST_FILENAME)
    console.print(
        f"[green]wrote {gpu_repo} in {time.perf_counter() - t_start:.0f} s (timing cache {cache})[/green]"
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
