"""The model a build starts from (``tcsched build --model SPEC``): parsed, loaded and checked before any work.

``SPEC`` is one of:

- absent: torchvision MobileNetV2 with its IMAGENET1K_V1 weights (found offline, :func:`export.find_weights`);
- a path to an ONNX classifier (``*.onnx``): one float32 input ``[N, C, H, W]``, one 2-D float32 output
  ``[N, classes]``; a fixed batch axis is made dynamic (and checked by running the graph at batch 2);
- ``torchvision:<architecture>`` (a name of ``torchvision.models.list_models()``) with ``--weights FILE``;
- ``package.module:callable`` (an attribute path after the colon), called with no arguments, returning a
  ``torch.nn.Module``; the current folder is importable, as with ``python -m``. ``--weights FILE`` optional.

Weights files are state dicts loaded with ``torch.load(..., weights_only=True)`` (no pickled code runs) and
``load_state_dict(strict=True)``; a mismatch lists the missing, unexpected and mis-shaped keys.

The preprocessing (:class:`tcsched.preprocessing.PreprocessSpec`) comes, in increasing priority, from: ImageNet's
defaults; the torchvision weights' eval preset (``torchvision:<arch>``: the weights enum member whose file name is
``--weights``'s, else ``DEFAULT``); an ONNX graph's fixed input height and width (the crop, the resize scaled by
torchvision's 256/224); ``--preprocessing FILE``; the individual options. The number of classes comes from the
model's output, the class names from ``--labels FILE`` (one per line) or, for 1000 classes only, ImageNet's.

Every refusal is a :class:`ModelSourceError` (a ``ValueError``) naming what was wrong and what was expected.

This module resolves a model (:func:`resolve_model`) and re-exports the public names of its parts:
:mod:`~tcsched.build_tools.model_spec` (the spec, the labels, the preprocessing merge, the error),
:mod:`~tcsched.build_tools.model_torch` (weights and torch models), :mod:`~tcsched.build_tools.model_onnx`
(ONNX classifiers).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tcsched.build_tools.model_onnx import (
    INPUT_NAME,
    OUTPUT_NAME,
    check_onnx_signature,
    fix_spatial,
    load_onnx_classifier,
    optimize_basic,
    run_batch2,
)
from tcsched.build_tools.model_spec import (
    DEFAULT_NAME,
    IMAGENET_CLASSES,
    RESIZE_PER_CROP,
    RGB_CHANNELS,
    ModelSourceError,
    ModelSpec,
    SourceKind,
    check_channels,
    class_labels,
    file_fields,
    merge_spec,
    model_name_prefix,
    parse_model_spec,
    read_labels,
)
from tcsched.build_tools.model_torch import (
    callable_model,
    check_state_dict,
    load_state_dict,
    torch_output,
    torchvision_model,
    torchvision_preset,
)
from tcsched.preprocessing import IMAGENET, PreprocessError, PreprocessSpec

__all__ = [
    "DEFAULT_NAME",
    "IMAGENET_CLASSES",
    "INPUT_NAME",
    "OUTPUT_NAME",
    "RESIZE_PER_CROP",
    "RGB_CHANNELS",
    "ModelSourceError",
    "ModelSpec",
    "ResolvedModel",
    "SourceKind",
    "callable_model",
    "check_onnx_signature",
    "check_state_dict",
    "load_onnx_classifier",
    "load_state_dict",
    "merge_spec",
    "model_name_prefix",
    "optimize_basic",
    "parse_model_spec",
    "read_labels",
    "resolve_model",
    "torchvision_model",
    "torchvision_preset",
]


@dataclass
class ResolvedModel:
    """A model checked before any work: what the build exports (``torch_model``) or copies (``onnx_model``),
    its input ``[C, H, W]``, its classes and labels, the preprocessing, and the manifest's description.

    ``onnx_model``: the ONNX source normalised (input ``input``, output ``logits``, dynamic batch): see
    :func:`load_onnx_classifier`. ``notes``: what was derived and from where (printed by the build)."""

    spec: ModelSpec
    torch_model: Any
    onnx_model: Any
    input_chw: tuple[int, int, int]
    classes: int
    labels: list[str]
    preprocessing: PreprocessSpec
    weights: Path | None
    description: str
    notes: list[str] = field(default_factory=list)


def resolve_model(
    model: str | None,
    *,
    name: str | None = None,
    weights: Path | None = None,
    labels_file: Path | None = None,
    preprocessing_file: Path | None = None,
    overrides: Mapping[str, object] | None = None,
) -> ResolvedModel:
    """Load and check the model of ``--model`` with its weights, labels and preprocessing (module docstring),
    before any other work of the build.

    Raises:
        ModelSourceError: any refusal: the spec, the weights (keys listed), an ONNX input that is not 4-D float
            or an output that is not 2-D, a labels file whose length differs from the classes, a mean/std whose
            length differs from the channels, a crop larger than the resize or other than the model's input.
    """
    spec = parse_model_spec(model, name)
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    if spec.kind == "onnx":
        return _resolve_onnx(spec, weights, labels_file, preprocessing_file, overrides)
    torch_model, weights, base, notes, description = _load_torch(spec, weights)
    torch_model.eval()
    pre = merge_spec(base, preprocessing_file, overrides)
    chw = (pre.channels, *pre.crop_size)
    check_channels(pre)
    classes = torch_output(torch_model, chw, f"--model {model or 'mobilenet_v2'}")
    labels = class_labels(labels_file, classes)
    return ResolvedModel(
        spec,
        torch_model,
        None,
        chw,
        classes,
        labels,
        pre,
        Path(weights) if weights else None,
        description,
        notes,
    )


def _load_torch(spec: ModelSpec, weights: Path | None) -> tuple[Any, Path | None, dict, list[str], str]:
    """The torch model of a ``default``, ``torchvision`` or ``callable`` spec with ``weights`` loaded: (model,
    the weights file used or None, the preprocessing fields its torchvision preset sets, notes, description).

    Raises:
        ModelSourceError: ``torchvision:<arch>`` without weights, or weights / a callable refused.
    """
    notes: list[str] = []
    base: dict = {}
    if spec.kind == "default":
        from tcsched.build_tools import export as ex

        torch_model = ex.load_mobilenet_v2(weights)
        weights = ex.find_weights(weights)
        description = ex.SOURCE_MODEL
    elif spec.kind == "torchvision":
        from tcsched.build_tools import export as ex

        if weights is None and spec.target == DEFAULT_NAME:
            weights = ex.find_weights(None)
        if weights is None:
            raise ModelSourceError(
                f"--model torchvision:{spec.target} needs --weights FILE (a state dict): the build does not "
                "download weights"
            )
        state = load_state_dict(weights)
        torch_model = torchvision_model(spec.target, state)
        base, member = torchvision_preset(spec.target, Path(weights))
        if member:
            notes.append(f"preprocessing defaults from torchvision {member}")
        description = f"torchvision {spec.target}, weights {Path(weights).name}"
    else:
        torch_model = callable_model(spec.target)
        if weights is not None:
            state = load_state_dict(weights)
            check_state_dict(torch_model, state, spec.target)
            torch_model.load_state_dict(state)
        description = f"{spec.target}" + (
            f", weights {Path(weights).name}" if weights else ", its own weights"
        )
    return torch_model, weights, base, notes, description


def _resolve_onnx(spec, weights, labels_file, preprocessing_file, overrides) -> ResolvedModel:
    """:func:`resolve_model` of an ONNX spec: the crop (and the resize, by :data:`RESIZE_PER_CROP`) from the
    graph's fixed input size unless given, the graph's symbolic height and width fixed to the crop."""
    path = Path(spec.target)
    if weights is not None:
        raise ModelSourceError(f"--weights {weights}: an ONNX model carries its weights; leave --weights out")
    model, (c, h, w), classes, notes = load_onnx_classifier(path)
    check_channels(IMAGENET, c)
    base: dict = {}
    explicit_crop = "crop_size" in overrides or (
        preprocessing_file is not None and "crop_size" in file_fields(preprocessing_file)
    )
    explicit_resize = "resize_size" in overrides or (
        preprocessing_file is not None and "resize_size" in file_fields(preprocessing_file)
    )
    if h is not None and w is not None and not explicit_crop:
        base["crop_size"] = (h, w)
        if not explicit_resize and (h, w) != tuple(IMAGENET.crop_size):
            base["resize_size"] = round(max(h, w) * RESIZE_PER_CROP)
        notes.append(
            f"crop {h}x{w} from the model's input"
            + (f", resize {base['resize_size']} (256/224 of it)" if "resize_size" in base else "")
        )
    pre = merge_spec(base, preprocessing_file, overrides)
    if pre.channels != c:
        raise ModelSourceError(
            f"mean/std have {pre.channels} values but the model's input has {c} channels; expected one mean and "
            "one std per channel"
        )
    if h is not None and w is not None:
        try:
            pre.check_model_input([c, h, w])
        except PreprocessError as e:
            raise ModelSourceError(str(e)) from None
    else:  # dynamic height/width: the crop decides; fix them in the graph so every config states them
        fix_spatial(model, pre.crop_size)
    chw = (c, *pre.crop_size)
    ran = run_batch2(model, chw, path)
    classes = classes or ran
    if ran != classes:
        raise ModelSourceError(f"--model {path}: the output declares {classes} classes but returns {ran}")
    labels = class_labels(labels_file, classes)
    return ResolvedModel(spec, None, model, chw, classes, labels, pre, None, f"ONNX {path.name}", notes)
