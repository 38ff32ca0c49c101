"""Engine management: write the Triton model repository.

Every ``config.pbtxt`` is a ``tritonclient.grpc.model_config_pb2.ModelConfig`` serialised with protobuf's
``text_format``: never string concatenation, so what we write is by construction valid against Triton's
``model_config.proto`` of the same release (2.51.0).

Layout written (model names are fixed; the variant names come from the manifest)::

    <repo>/manifest.json                       the typed manifest (tcsched.manifest.Manifest)
    <repo>/classifier/config.pbtxt              ensemble: IMAGE (encoded bytes) -> LOGITS, VARIANT
    <repo>/classifier/labels.txt                1000 ImageNet class names (classification extension)
    <repo>/classifier/1/                        (ensembles need an empty version folder)
    <repo>/preprocess/{config.pbtxt,1/model.py} Python backend: bytes -> float32 [3,224,224]
    <repo>/scheduler/{config.pbtxt,1/model.py}  Python backend: picks a variant, calls it by BLS
    <repo>/<variant>/{config.pbtxt,1/model.onnx[,1/model.py]}
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Literal

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from tcsched.names import (
    DECISION,
    ENSEMBLE,
    IMAGE,
    LABELS_FILE,
    LOGITS,
    PIXELS,
    PREPROCESS,
    SCHEDULER,
    VARIANT,
)
from tcsched.pixels import PixelDtype
from tcsched.preprocessing import IMAGENET, METHOD_KEY, PARAMETER_KEY, Method, PreprocessSpec
from tcsched.settings import SchedulerSettings

__all__ = ["ENSEMBLE", "LABELS_FILE", "PREPROCESS", "SCHEDULER", "ServingOptions"]

VariantBackend = Literal["python", "onnxruntime"]


@dataclass
class ServingOptions:
    """Knobs of the generated configs. Units in the names. The scheduler's own knobs are one
    :class:`tcsched.settings.SchedulerSettings` (``scheduler``), written as its config.pbtxt parameters."""

    max_batch_size: int = 8
    # 0: no waiting for a fuller batch; under load the dynamic batcher still batches whatever is queued when the
    # model frees up. Measured: 2000 us cost ~2 ms per hop at concurrency 1 (3 hops in the ensemble).
    max_queue_delay_microseconds: int = 0
    variant_backend: VariantBackend = "python"  # "onnxruntime": for the official Triton container
    intra_op_num_threads: int = 2
    #: instances of the ``preprocess`` model, each decoding one request at a time: by default one per core of the
    #: build machine, at most 4 (:func:`default_preprocess_instances`)
    preprocess_instances: int = field(default_factory=lambda: default_preprocess_instances())
    #: how ``preprocess`` makes pixels (tcsched.preprocessing.Method): ``fast`` (JPEG DCT-domain downscaling,
    #: one resize to the crop; its top-1 agreement with ``exact`` is measured by
    #: ``python -m tcsched.build_tools.preprocess_bench``) or ``exact`` (torchvision's transform, bit for bit)
    preprocess_method: Method = "fast"
    #: what ``preprocess`` sends the variants (tcsched.pixels): ``uint8`` pixels with the normalisation as the
    #: first nodes of every variant graph (a quarter of the bytes through the ensemble and the BLS calls), or
    #: ``float32`` normalised tensors (what a GPU repository is built from); README "Pixels: uint8 or float32"
    pixels: PixelDtype = "uint8"
    scheduler: SchedulerSettings = field(default_factory=SchedulerSettings)


#: the most ``preprocess`` instances by default: each is one Python-backend stub process, and the count is
#: written at build time, so a many-core build machine must not fill a repository served elsewhere with them
#: (measured on 2 cores: 2 instances 1.2-1.4x the ensemble's img/s of 1; README "Preprocessing")
MAX_PREPROCESS_INSTANCES = 4


def default_preprocess_instances(cpus: int | None = None) -> int:
    """Instances of ``preprocess`` by default: one per CPU core this process may run on
    (``os.sched_getaffinity``, else ``os.cpu_count``), 1 to :data:`MAX_PREPROCESS_INSTANCES`."""
    if cpus is None:
        try:
            cpus = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):  # not on Linux
            cpus = os.cpu_count() or 1
    return max(1, min(MAX_PREPROCESS_INSTANCES, cpus))


def _tensor(cls, name: str, dtype: int, dims: list[int], **kw):
    t = cls(name=name, data_type=dtype, **kw)
    t.dims.extend(dims)
    return t


def _set_params(cfg: mc.ModelConfig, params: dict[str, object]) -> None:
    for k, v in params.items():
        cfg.parameters[k].string_value = str(v)


def render(cfg: mc.ModelConfig) -> str:
    """Text-format config.pbtxt content for ``cfg``."""
    return text_format.MessageToString(cfg)


def parse(text: str) -> mc.ModelConfig:
    """Parse config.pbtxt text into a ``ModelConfig`` (raises ``text_format.ParseError`` if invalid)."""
    return text_format.Parse(text, mc.ModelConfig())


def _dynamic_batching(cfg: mc.ModelConfig, opts: ServingOptions) -> None:
    cfg.dynamic_batching.max_queue_delay_microseconds = opts.max_queue_delay_microseconds


#: batch sizes of the variants' ``model_warmup`` in config.pbtxt: 1 only, valid under any max_batch_size, so
#: that a config derived from this one with a smaller max_batch_size (Model Analyzer's sweep loads such configs
#: through the repository API) still loads. The Python-backend variants also warm up at their own
#: max_batch_size in ``initialize`` (triton_models/ort_variant.py), which follows whatever config they get.
WARMUP_BATCH_SIZES = (1,)


#: pixel dtype (tcsched.pixels) -> model_config.proto DataType of the tensor preprocess -> scheduler -> variant
PIXEL_TYPES = {"float32": mc.TYPE_FP32, "uint8": mc.TYPE_UINT8}


def _warmup(
    cfg: mc.ModelConfig, input_name: str, chw: list[int], batch_sizes: list[int], dtype: int = mc.TYPE_FP32
) -> None:
    """Triton's ``model_warmup``: zero tensors at these batch sizes before the model is marked ready, so the
    first real requests (and the scheduler's latency observations) do not pay for a cold ONNX Runtime session.

    Raises:
        ValueError: a batch size above the config's max_batch_size (Triton would refuse to load the model).
    """
    if any(b > max(1, cfg.max_batch_size) for b in batch_sizes):
        raise ValueError(f"warmup batch sizes {batch_sizes} exceed max_batch_size {cfg.max_batch_size}")
    for b in batch_sizes:
        w = cfg.model_warmup.add(name=f"zeros_batch{b}", batch_size=b)
        spec = w.inputs[input_name]
        spec.data_type = dtype
        spec.dims.extend(chw)
        spec.zero_data = True


def variant_config(
    name: str,
    opts: ServingOptions,
    input_name: str,
    output_name: str,
    chw: list[int],
    classes: int,
    runtime: str = "onnxruntime",
    precision: str = "fp32",
) -> mc.ModelConfig:
    """Config of one ONNX variant run by ``runtime`` (onnxruntime | openvino): the Python backend running the
    engine of :mod:`tcsched.engines` (parameters ``runtime``, ``precision``, ``onnx_file``,
    ``intra_op_num_threads``), or for the official container Triton's own onnxruntime or openvino backend.

    The openvino backend's parameters are those of its README ("Parameters"; read in src/openvino.cc,
    ``ModelState::ParseParameters``): ``INFERENCE_NUM_THREADS``, ``NUM_STREAMS``, ``PERFORMANCE_HINT`` and
    ``HINT_BF16`` (``YES`` for the bf16 variant). It has no ``INFERENCE_PRECISION_HINT`` parameter: with
    ``HINT_BF16`` ``NO`` the float layers run in the CPU device's default precision (bf16 on CPUs with
    native bf16), which the build did not measure for non-bf16 variants."""
    cfg = mc.ModelConfig(name=name, max_batch_size=opts.max_batch_size)
    pixels = PIXEL_TYPES[opts.pixels]
    cfg.input.append(_tensor(mc.ModelInput, input_name, pixels, chw))
    # labels beside every classifier model, so that class_count works wherever a client calls it
    cfg.output.append(
        _tensor(mc.ModelOutput, output_name, mc.TYPE_FP32, [classes], label_filename=LABELS_FILE)
    )
    _dynamic_batching(cfg, opts)
    _warmup(cfg, input_name, chw, list(WARMUP_BATCH_SIZES), pixels)
    if opts.variant_backend == "python":
        cfg.backend = "python"
        cfg.instance_group.append(mc.ModelInstanceGroup(count=1, kind=mc.ModelInstanceGroup.KIND_CPU))
        _set_params(
            cfg,
            {
                "onnx_file": "model.onnx",
                "intra_op_num_threads": opts.intra_op_num_threads,
                "runtime": runtime,
                "precision": precision,
            },
        )
    elif runtime == "openvino":
        cfg.backend = "openvino"
        cfg.default_model_filename = "model.onnx"
        cfg.instance_group.append(mc.ModelInstanceGroup(count=1, kind=mc.ModelInstanceGroup.KIND_CPU))
        _set_params(
            cfg,
            {
                "INFERENCE_NUM_THREADS": opts.intra_op_num_threads,
                "NUM_STREAMS": 1,
                "PERFORMANCE_HINT": "LATENCY",
                "HINT_BF16": "YES" if precision == "bf16" else "NO",
            },
        )
    else:
        cfg.backend = "onnxruntime"
        cfg.default_model_filename = "model.onnx"
        cfg.instance_group.append(mc.ModelInstanceGroup(count=1, kind=mc.ModelInstanceGroup.KIND_AUTO))
        _set_params(cfg, {"intra_op_thread_count": opts.intra_op_num_threads})
    return cfg


def preprocess_config(
    opts: ServingOptions, chw: list[int], spec: PreprocessSpec = IMAGENET
) -> mc.ModelConfig:
    """The ``preprocess`` model: ``IMAGE`` (encoded bytes) -> ``INPUT`` ``chw`` in ``opts.pixels`` (float32
    normalised, or uint8 pixels: the output's data type, read back by the model), made by ``spec``, which
    is written as the config parameter ``preprocessing`` (:meth:`PreprocessSpec.to_json`), and by
    ``opts.preprocess_method`` (parameter ``preprocess_method``); both are read back by the model's
    ``initialize``.

    Raises:
        PreprocessError: ``chw`` is not [len(spec.mean), *spec.crop_size].
    """
    spec.check_model_input(chw)
    cfg = mc.ModelConfig(name=PREPROCESS, backend="python", max_batch_size=opts.max_batch_size)
    cfg.input.append(_tensor(mc.ModelInput, IMAGE, mc.TYPE_STRING, [1]))
    cfg.output.append(_tensor(mc.ModelOutput, PIXELS, PIXEL_TYPES[opts.pixels], chw))
    _dynamic_batching(cfg, opts)
    cfg.instance_group.append(
        mc.ModelInstanceGroup(count=opts.preprocess_instances, kind=mc.ModelInstanceGroup.KIND_CPU)
    )
    _set_params(cfg, {PARAMETER_KEY: spec.to_json(), METHOD_KEY: opts.preprocess_method})
    return cfg


def scheduler_config(opts: ServingOptions, chw: list[int], classes: int) -> mc.ModelConfig:
    cfg = mc.ModelConfig(name=SCHEDULER, backend="python", max_batch_size=opts.max_batch_size)
    cfg.input.append(_tensor(mc.ModelInput, PIXELS, PIXEL_TYPES[opts.pixels], chw))
    cfg.output.append(_tensor(mc.ModelOutput, LOGITS, mc.TYPE_FP32, [classes], label_filename=LABELS_FILE))
    cfg.output.append(_tensor(mc.ModelOutput, VARIANT, mc.TYPE_STRING, [1]))
    cfg.output.append(_tensor(mc.ModelOutput, DECISION, mc.TYPE_STRING, [1]))
    _dynamic_batching(cfg, opts)
    cfg.instance_group.append(mc.ModelInstanceGroup(count=1, kind=mc.ModelInstanceGroup.KIND_CPU))
    _set_params(cfg, opts.scheduler.to_parameters())
    return cfg


def ensemble_config(opts: ServingOptions, classes: int, name: str = ENSEMBLE) -> mc.ModelConfig:
    """The served classifier ``name`` (default ``classifier``): ``IMAGE`` -> preprocess -> scheduler ->
    ``LOGITS`` (with the labels file), ``VARIANT``, ``DECISION``."""
    cfg = mc.ModelConfig(name=name, platform="ensemble", max_batch_size=opts.max_batch_size)
    cfg.input.append(_tensor(mc.ModelInput, IMAGE, mc.TYPE_STRING, [1]))
    cfg.output.append(_tensor(mc.ModelOutput, LOGITS, mc.TYPE_FP32, [classes], label_filename=LABELS_FILE))
    cfg.output.append(_tensor(mc.ModelOutput, VARIANT, mc.TYPE_STRING, [1]))
    cfg.output.append(_tensor(mc.ModelOutput, DECISION, mc.TYPE_STRING, [1]))
    pre = cfg.ensemble_scheduling.step.add(model_name=PREPROCESS, model_version=-1)
    pre.input_map[IMAGE] = IMAGE
    pre.output_map[PIXELS] = "preprocessed"
    sch = cfg.ensemble_scheduling.step.add(model_name=SCHEDULER, model_version=-1)
    sch.input_map[PIXELS] = "preprocessed"
    sch.output_map[LOGITS] = LOGITS
    sch.output_map[VARIANT] = VARIANT
    sch.output_map[DECISION] = DECISION
    return cfg


def pipeline_name(variant: str) -> str:
    """Name of the plain ensemble preprocess -> ``variant`` (no scheduler) that ``tcsched bench`` serves beside the
    repository to measure what the scheduler adds to the same JPEG request."""
    return f"pipeline_{variant}"


def pipeline_config(
    variant: str, opts: ServingOptions, classes: int, input_name: str = "input", output_name: str = "logits"
) -> mc.ModelConfig:
    """The ensemble ``IMAGE`` (encoded bytes) -> ``preprocess`` -> ``variant`` -> ``LOGITS``: the classifier
    ensemble without the scheduler, pinned to one variant (same inputs and preprocessing as ``classifier``)."""
    cfg = mc.ModelConfig(name=pipeline_name(variant), platform="ensemble", max_batch_size=opts.max_batch_size)
    cfg.input.append(_tensor(mc.ModelInput, IMAGE, mc.TYPE_STRING, [1]))
    cfg.output.append(_tensor(mc.ModelOutput, LOGITS, mc.TYPE_FP32, [classes]))
    pre = cfg.ensemble_scheduling.step.add(model_name=PREPROCESS, model_version=-1)
    pre.input_map[IMAGE] = IMAGE
    pre.output_map[PIXELS] = "preprocessed"
    var = cfg.ensemble_scheduling.step.add(model_name=variant, model_version=-1)
    var.input_map[input_name] = "preprocessed"
    var.output_map[output_name] = LOGITS
    return cfg


def thin_model_source(kind: Literal["preprocess", "scheduler", "ort_variant"]) -> str:
    """Source of a thin ``model.py`` from ``backends/python_scheduler/triton_models``."""
    return (resources.files("tcsched.scheduler") / "triton_models" / f"{kind}.py").read_text()


def write_model(repo: Path, cfg: mc.ModelConfig, model_py: str | None = None) -> Path:
    """Write ``<repo>/<cfg.name>/config.pbtxt`` (and ``1/model.py``); returns the model folder."""
    d = repo / cfg.name
    (d / "1").mkdir(parents=True, exist_ok=True)
    (d / "config.pbtxt").write_text(render(cfg))
    if model_py is not None:
        (d / "1" / "model.py").write_text(model_py)
    return d


def write_variant(
    repo: Path,
    name: str,
    onnx_path: Path,
    opts: ServingOptions,
    input_name: str = "input",
    output_name: str = "logits",
    chw: tuple[int, int, int] = (3, 224, 224),
    classes: int = 1000,
    runtime: str = "onnxruntime",
    precision: str = "fp32",
    spec: PreprocessSpec = IMAGENET,
) -> Path:
    """Copy ``onnx_path`` into the repository as variant ``name`` run by ``runtime`` (:func:`variant_config`);
    with ``opts.pixels`` ``uint8`` the copy takes uint8 pixels and normalises them by ``spec`` first
    (:func:`tcsched.build_tools.graph_surgery.add_pixel_input`). Returns the model file path."""
    cfg = variant_config(name, opts, input_name, output_name, list(chw), classes, runtime, precision)
    d = write_model(repo, cfg, thin_model_source("ort_variant") if opts.variant_backend == "python" else None)
    dst = d / "1" / "model.onnx"
    if opts.pixels == "uint8":
        import onnx

        from tcsched.build_tools.graph_surgery import add_pixel_input

        onnx.save(add_pixel_input(onnx.load(str(onnx_path)), spec.mean, spec.std), str(dst))
    else:
        shutil.copyfile(onnx_path, dst)
    return dst


def write_pipeline(
    repo: Path,
    labels: list[str],
    opts: ServingOptions,
    chw=(3, 224, 224),
    spec: PreprocessSpec = IMAGENET,
    ensemble: str = ENSEMBLE,
) -> None:
    """Write preprocess (making pixels by ``spec``), scheduler and the ensemble ``ensemble``, then the labels
    file of every model in ``repo`` whose config names one (:func:`write_labels`: the ensemble, the scheduler,
    the variants written before).

    Raises:
        ValueError: a label is empty or holds a newline (the labels file is one class per line).
        PreprocessError: ``chw`` does not match ``spec`` (:func:`preprocess_config`).
    """
    if any((not lb) or ("\n" in lb) for lb in labels):
        raise ValueError("labels must be non-empty single-line strings")
    write_model(repo, preprocess_config(opts, list(chw), spec), thin_model_source("preprocess"))
    write_model(repo, scheduler_config(opts, list(chw), len(labels)), thin_model_source("scheduler"))
    write_model(repo, ensemble_config(opts, len(labels), ensemble))
    write_labels(repo, labels)


def write_labels(repo: Path, labels: list[str]) -> list[Path]:
    """Write ``labels`` (one class per line, line i = class index i) as every ``label_filename`` that the
    configs in ``repo`` name (``<repo>/<model>/<label_filename>``); returns the files written.

    Triton's classification extension (``class_count``) answers ``score:index:label`` from that file and
    ``score:index`` without one (docs/protocol/extension_classification.md).

    Raises:
        ValueError: a config's output has a different number of classes than ``labels``, or a label file name
            that is not a plain file name.
    """
    written = []
    for path in sorted(repo.glob("*/config.pbtxt")):
        cfg = parse(path.read_text())
        for out in cfg.output:
            if not out.label_filename:
                continue
            if Path(out.label_filename).name != out.label_filename:
                raise ValueError(f"{path}: label_filename {out.label_filename!r} must be a file name")
            if list(out.dims)[-1:] != [len(labels)]:
                raise ValueError(
                    f"{path}: output {out.name} has dims {list(out.dims)}, not {len(labels)} classes"
                )
            target = path.parent / out.label_filename
            target.write_text("\n".join(labels) + "\n")
            written.append(target)
    return written


REPOSITORY_README = (
    resources.files("tcsched.build_tools") / "templates" / "model_repository_README.md"
).read_text()
