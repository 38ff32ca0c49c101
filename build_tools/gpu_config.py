"""The ``config.pbtxt`` of a TensorRT variant of the GPU repository (:func:`tensorrt_variant_config`) and what it
is made from: the engine's I/O types read from its ONNX graph, the CPU config's queue delay. Re-exported by
:mod:`tcsched.build_tools.gpu_repository`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from tritonclient.grpc import model_config_pb2 as mc

from tcsched.build_tools import repository as repo_mod
from tcsched.build_tools import tensorrt_engine as te

PLAN_FILENAME = "model.plan"
_CC = re.compile(r"^\d+\.\d+$")
_MODEL_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")

# ONNX TensorProto element type -> Triton data type, for the engine I/O types (strongly typed: the graph's)
_ONNX_TO_TRITON = {1: mc.TYPE_FP32, 10: mc.TYPE_FP16, 16: mc.TYPE_BF16}


def _validate_config_args(
    name: str,
    max_batch_size: int,
    instance_count: int,
    max_queue_delay_microseconds: int,
    cc_filenames: dict[str, str] | None,
) -> None:
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


def _add_cuda_graphs(cfg: mc.ModelConfig, input_name: str, chw: Sequence[int]) -> None:
    """``graphs: true`` and one ``graph_spec`` per batch size 1..max_batch_size.

    Without ``graph_spec``, tensorrt_backend r24.10 (src/instance_state.cc, ``InitializeGraphSpecs``) captures
    graphs only for {1} + ``preferred_batch_size`` + {max_batch_size} when dynamic batching is on, and runs every
    other batch size without a graph; a spec names the batch size and each input's shape without the batch
    dimension (model_config.proto ``ModelOptimizationPolicy.Cuda.GraphSpec``), and ``ValidateGraphSpec`` wants
    1 <= batch_size <= max_batch_size. No ``graph_lower_bound``: each graph serves its exact batch size only.
    """
    cuda = cfg.optimization.cuda
    cuda.graphs = True
    for b in range(1, cfg.max_batch_size + 1):
        spec = cuda.graph_spec.add(batch_size=b)
        spec.input[input_name].dim.extend(int(d) for d in chw)


def _add_warmup(cfg: mc.ModelConfig, input_name: str, input_dtype: int, chw: Sequence[int]) -> None:
    """``model_warmup`` at batch 1 and max_batch_size (zero data): Triton runs them when it loads the model, so
    the first requests do not pay for lazily loaded kernels and allocations (model_config.proto
    ``ModelWarmup``; the backend reports the model ready only after them)."""
    for b in sorted({1, cfg.max_batch_size}):
        w = cfg.model_warmup.add(name=f"zeros_batch_{b}", batch_size=b, count=1)
        inp = w.inputs[input_name]
        inp.data_type = input_dtype
        inp.dims.extend(int(d) for d in chw)
        inp.zero_data = True


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
    label_filename: str | None = None,
) -> mc.ModelConfig:
    """Triton config of one TensorRT variant.

    ``platform: "tensorrt_plan"``, one ``KIND_GPU`` instance group of ``instance_count`` instances, dynamic
    batching (``max_queue_delay_microseconds``), input ``input_name`` [3, 224, 224] and output ``output_name``
    [classes] (batch dimension excluded; FP32 unless the engine's graph says otherwise),
    ``default_model_filename: "model.plan"``, ``cc_model_filenames`` as given (compute capability such as
    ``"9.0"`` -> engine file name in the version folder), ``model_warmup`` at batch 1 and ``max_batch_size``,
    and with ``cuda_graphs`` ``optimization { cuda { graphs: true graph_spec {...} } }`` for every batch size
    1..``max_batch_size`` (:func:`_add_cuda_graphs`). ``label_filename``: the output's labels file in the model
    folder (Triton's classification extension, ``class_count``).

    Raises:
        ValueError: bad model name, ``max_batch_size`` < 1, ``instance_count`` < 1, negative queue delay, a
            ``cc_filenames`` key not of the form ``"<major>.<minor>"`` or a value that is not a bare file name.
    """
    _validate_config_args(name, max_batch_size, instance_count, max_queue_delay_microseconds, cc_filenames)
    cfg = mc.ModelConfig(
        name=name,
        platform="tensorrt_plan",
        max_batch_size=max_batch_size,
        default_model_filename=PLAN_FILENAME,
    )
    cfg.input.append(repo_mod._tensor(mc.ModelInput, input_name, input_dtype, list(chw)))
    labels = {"label_filename": label_filename} if label_filename else {}
    cfg.output.append(repo_mod._tensor(mc.ModelOutput, output_name, output_dtype, [classes], **labels))
    cfg.dynamic_batching.max_queue_delay_microseconds = max_queue_delay_microseconds
    cfg.instance_group.append(
        mc.ModelInstanceGroup(count=instance_count, kind=mc.ModelInstanceGroup.KIND_GPU)
    )
    for cc, fname in sorted((cc_filenames or {}).items()):
        cfg.cc_model_filenames[cc] = fname
    _add_warmup(cfg, input_name, input_dtype, chw)
    if cuda_graphs:
        _add_cuda_graphs(cfg, input_name, chw)
    return cfg


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
