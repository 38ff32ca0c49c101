"""The models the bench serves beside a repository, in a second ("overlay") model repository:

- ``pipeline_<variant>`` = the classifier ensemble without the scheduler (IMAGE -> preprocess -> variant), to
  measure what the scheduler adds to the same request;
- today's path (:func:`write_exact_path`): ``preprocess_exact``, the repository's ``preprocess`` model with
  method ``exact`` and one instance, and ``<ensemble>_exact_path``, the repository's ensemble with its
  preprocessing step calling ``preprocess_exact``; the path rounds of the bench compare the ensemble as built
  with it.

The one module of ``tcsched.client`` that imports ``tcsched.build_tools`` (an exception declared in the
import-linter contract of pyproject.toml): the configs must be written by the build's own ModelConfig writers
and parser (``tcsched.build_tools.repository``), so that a pipeline is exactly the served ensemble minus the
scheduler, and today's path exactly the served ensemble with the old preprocessing.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

from tritonclient.grpc import model_config_pb2 as mc

from tcsched.build_tools.repository import (
    ServingOptions,
    parse,
    pipeline_config,
    pipeline_name,
    render,
)
from tcsched.names import PREPROCESS, SCHEDULER
from tcsched.preprocessing import METHOD_KEY

__all__ = [
    "PREPROCESS_EXACT",
    "exact_path_name",
    "pipeline_name",
    "preprocess_setup",
    "write_exact_path",
    "write_pipelines",
]

#: the ``preprocess`` model of today's path: method ``exact`` (torchvision's transform bit for bit), 1 instance
PREPROCESS_EXACT = "preprocess_exact"


def exact_path_name(ensemble: str) -> str:
    """Name of today's path beside the ensemble ``ensemble``: ``<ensemble>_exact_path``."""
    return f"{ensemble}_exact_path"


def write_pipelines(
    folder: Path,
    manifest,
    variants: Sequence[str],
    repo: Path | None = None,
    float_variants: Sequence[str] = (),
) -> Path:
    """Write a model repository holding one plain ensemble preprocess -> variant per variant (configs only; the
    models they call live in the main repository) and, with ``repo`` (the main repository), today's path
    (:func:`write_exact_path`, with float-input copies of ``float_variants`` for a uint8-pixel repository).
    Returns ``folder``, replaced if it existed.

    Raises:
        FileNotFoundError / ValueError: see :func:`write_exact_path`.
    """
    if folder.exists():
        shutil.rmtree(folder)
    opts = ServingOptions(max_batch_size=manifest.max_batch_size)
    classes = manifest.output.shape[-1]
    for v in variants:
        cfg = pipeline_config(v, opts, classes, manifest.input.name, manifest.output.name)
        (folder / cfg.name / "1").mkdir(parents=True)
        (folder / cfg.name / "config.pbtxt").write_text(render(cfg))
    if repo is not None:
        write_exact_path(folder, Path(repo), manifest.ensemble, float_variants)
    return folder


def preprocess_setup(model_folder: Path) -> dict | None:
    """``{"method", "instances"}`` of the preprocess model in ``model_folder`` (its config.pbtxt: the method as
    the preprocess model reads it, ``tcsched.imaging.method_of_model_config``; the instance groups' counts
    summed), or None without one.

    Raises:
        tcsched.imaging.PreprocessError: a method that is not one of ``tcsched.preprocessing.METHODS``.
    """
    path = Path(model_folder) / "config.pbtxt"
    if not path.is_file():
        return None
    from google.protobuf.json_format import MessageToDict

    from tcsched.imaging import method_of_model_config

    cfg = parse(path.read_text())
    method = method_of_model_config(MessageToDict(cfg, preserving_proto_field_name=True))
    return {"method": method, "instances": sum(g.count or 1 for g in cfg.instance_group) or 1}


def _copy_model(src: Path, dst: Path) -> None:
    """``src`` (a model folder: config.pbtxt, version folders, labels) copied to ``dst``, caches left out."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"), dirs_exist_ok=True)


def write_exact_path(
    folder: Path, repo: Path, ensemble: str, float_variants: Sequence[str] = ()
) -> tuple[str, str]:
    """Write today's path into ``folder``: ``preprocess_exact`` = a copy of ``repo``'s ``preprocess`` model
    folder (its ``1/model.py`` too) whose config is the repository's, parsed and rewritten with that name, one
    instance group of count 1 (same kind), parameter ``preprocess_method`` = ``exact`` and a float32 output;
    and ``<ensemble>_exact_path`` = a copy of ``repo``'s ensemble folder (labels file too) whose config is the
    repository's with that name and its ``preprocess`` step calling ``preprocess_exact``. Returns the two model
    names (preprocess, ensemble).

    In a repository built with ``--pixels uint8`` today's path still sends float32 tensors: its ensemble calls
    ``scheduler_exact`` (:func:`_float_scheduler`: float32 input, over float-input copies of the reference and
    of ``float_variants``, named ``<variant>_float``) instead of ``scheduler``.

    Raises:
        FileNotFoundError: ``repo`` has no ``preprocess`` or ``ensemble`` config.
        ValueError: the ensemble has no step calling ``preprocess``.
        google.protobuf.text_format.ParseError: a config that is not a valid ModelConfig.
    """
    pre_src, ens_src = repo / PREPROCESS, repo / ensemble
    pre_cfg = parse((pre_src / "config.pbtxt").read_text())
    ens_cfg = parse((ens_src / "config.pbtxt").read_text())
    steps = [s for s in ens_cfg.ensemble_scheduling.step if s.model_name == PREPROCESS]
    if not steps:
        raise ValueError(f"{ens_src / 'config.pbtxt'}: no ensemble step calls {PREPROCESS!r}")
    kind = pre_cfg.instance_group[0].kind if pre_cfg.instance_group else None
    del pre_cfg.instance_group[:]
    group = pre_cfg.instance_group.add(count=1)
    if kind is not None:
        group.kind = kind
    pre_cfg.name = PREPROCESS_EXACT
    pre_cfg.parameters[METHOD_KEY].string_value = "exact"
    pixels = pre_cfg.output[0].data_type
    pre_cfg.output[0].data_type = mc.TYPE_FP32
    for s in steps:
        s.model_name = PREPROCESS_EXACT
    if pixels != mc.TYPE_FP32:
        for s in ens_cfg.ensemble_scheduling.step:
            if s.model_name == SCHEDULER:
                s.model_name = _float_scheduler(folder, repo, float_variants)
    ens_cfg.name = exact_path_name(ensemble)
    for src, cfg in ((pre_src, pre_cfg), (ens_src, ens_cfg)):
        _copy_model(src, folder / cfg.name)
        (folder / cfg.name / "config.pbtxt").write_text(render(cfg))
    return pre_cfg.name, ens_cfg.name


#: the scheduler of today's path beside a ``--pixels uint8`` repository (:func:`write_exact_path`)
SCHEDULER_EXACT = "scheduler_exact"
FLOAT_SUFFIX = "_float"


def float_copy_name(variant: str) -> str:
    """The Triton name of ``variant``'s float-input copy beside a uint8-pixel repository (:func:`_float_scheduler`)."""
    return variant + FLOAT_SUFFIX


def _float_scheduler(folder: Path, repo: Path, variants: Sequence[str]) -> str:
    """Write ``scheduler_exact`` into ``folder``: ``repo``'s scheduler with a float32 input, reading its own
    manifest (``repo``'s, with only the reference and ``variants``, renamed ``<name>_float``, input float32, no
    cascades), and those variants as float-input models: ``repo``'s folders with float32 configs and graphs
    without their pixel nodes (:func:`tcsched.build_tools.graph_surgery.strip_pixel_input`). A request forcing a
    variant by name or precision reaches its copy (``Manifest.variant``). Returns the scheduler's name."""
    import onnx

    from tcsched.build_tools.graph_surgery import strip_pixel_input
    from tcsched.manifest import MANIFEST_FILENAME, Manifest

    m = Manifest.read(repo / MANIFEST_FILENAME)
    keep = [m.variant(m.reference_variant), *(m.variant(v) for v in variants if v != m.reference_variant)]
    entries = []
    for v in keep:
        name = float_copy_name(v.name)
        cfg = parse((repo / v.name / "config.pbtxt").read_text())
        cfg.name = name
        cfg.input[0].data_type = mc.TYPE_FP32
        for w in cfg.model_warmup:
            for spec in w.inputs.values():
                spec.data_type = mc.TYPE_FP32
        _copy_model(repo / v.name, folder / name)
        (folder / name / "config.pbtxt").write_text(render(cfg))
        graph = strip_pixel_input(onnx.load(str(repo / v.file)))
        onnx.save(graph, str(folder / name / "1" / Path(v.file).name))
        entries.append(v.model_copy(update={"name": name, "file": f"{name}/1/{Path(v.file).name}"}))
    cfg = parse((repo / SCHEDULER / "config.pbtxt").read_text())
    cfg.name = SCHEDULER_EXACT
    cfg.input[0].data_type = mc.TYPE_FP32
    cfg.parameters["manifest_file"].string_value = MANIFEST_FILENAME
    _copy_model(repo / SCHEDULER, folder / SCHEDULER_EXACT)
    (folder / SCHEDULER_EXACT / "config.pbtxt").write_text(render(cfg))
    floats = m.model_copy(
        update={
            "variants": entries,
            "reference_variant": entries[0].name,
            "cascades": [],
            "input": m.input.model_copy(update={"dtype": "float32"}),
        }
    )
    floats.write(folder / SCHEDULER_EXACT / MANIFEST_FILENAME)
    return SCHEDULER_EXACT
