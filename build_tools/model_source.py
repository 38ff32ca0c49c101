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
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from tcsched.preprocessing import IMAGENET, PreprocessError, PreprocessSpec

SourceKind = Literal["default", "onnx", "torchvision", "callable"]

#: the repository's model-name prefix of the default model (``mobilenet_v2_int8``, ...)
DEFAULT_NAME = "mobilenet_v2"
#: torchvision's eval presets resize the shorter side to 256 for a 224 crop (torchvision/transforms/_presets.py);
#: an ONNX graph with another fixed input size keeps that ratio unless the resize is given
RESIZE_PER_CROP = 256 / 224
#: ImageNet-1k's number of classes: only then are ImageNet's class names the default labels
IMAGENET_CLASSES = 1000
#: channels of a decoded image (tcsched.imaging converts every image to RGB)
RGB_CHANNELS = 3
#: keys listed per kind in a weights mismatch message (the count says how many more)
_LISTED_KEYS = 12


class ModelSourceError(ValueError):
    """A model, weights, labels or preprocessing that the build refuses; the message says what and why."""


@dataclass(frozen=True)
class ModelSpec:
    """``--model`` parsed: ``kind``, ``target`` (the path, architecture or ``module:attr``), ``name`` (the prefix
    of the repository's model names: ``[a-z0-9_]``, from the model unless given)."""

    kind: SourceKind
    target: str
    name: str


def model_name_prefix(text: str) -> str:
    """A Triton-safe model-name prefix: lower case, runs of other characters than ``[a-z0-9]`` as one ``_``.

    Raises:
        ModelSourceError: nothing is left (e.g. ``"--"``).
    """
    name = re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")
    if not name:
        raise ModelSourceError(f"model name {text!r}: expected letters or digits")
    return name


_CALLABLE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def parse_model_spec(text: str | None, name: str | None = None) -> ModelSpec:
    """Parse ``--model`` (see the module docstring); ``name`` overrides the model-name prefix.

    Raises:
        ModelSourceError: a spec of none of the forms, an ONNX path that is not a file, an unknown torchvision
            architecture (the message lists the closest names).
    """
    prefix = model_name_prefix(name) if name else None
    if not text:
        return ModelSpec("default", "", prefix or DEFAULT_NAME)
    if text.startswith("torchvision:"):
        arch = text.split(":", 1)[1]
        import torchvision

        known = torchvision.models.list_models(module=torchvision.models)  # the classification models
        if arch not in known:
            close = difflib.get_close_matches(arch, known, n=5, cutoff=0.5)
            raise ModelSourceError(
                f"--model {text}: torchvision has no classification architecture {arch!r}; "
                + (f"closest: {', '.join(close)}" if close else "see torchvision.models.list_models()")
            )
        return ModelSpec("torchvision", arch, prefix or model_name_prefix(arch))
    if text.endswith(".onnx") or Path(text).suffix == ".onnx":
        p = Path(text)
        if not p.is_file():
            raise ModelSourceError(f"--model {text}: no ONNX file there")
        return ModelSpec("onnx", str(p), prefix or model_name_prefix(p.stem))
    if _CALLABLE.match(text):
        return ModelSpec("callable", text, prefix or model_name_prefix(text.rsplit(":", 1)[1].split(".")[-1]))
    raise ModelSourceError(
        f"--model {text!r}: expected a path to an .onnx file, torchvision:<architecture> or "
        "package.module:callable"
    )


# ------------------------------------------------------------------------------------------------ resolution


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


def load_state_dict(path: str | Path) -> dict:
    """A state dict from ``path``, with ``torch.load(map_location="cpu", weights_only=True)``; a checkpoint
    that wraps it under ``"state_dict"`` or ``"model"`` is unwrapped.

    Raises:
        ModelSourceError: no file, not loadable with ``weights_only`` (pickled code), or not a mapping of
            names to tensors.
    """
    import torch

    p = Path(path)
    if not p.is_file():
        raise ModelSourceError(f"--weights {p}: no such file")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, EOFError, ...
        raise ModelSourceError(
            f"--weights {p}: not a state dict that torch.load(weights_only=True) can read ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200]})"
        ) from None
    for key in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelSourceError(
            f"--weights {p}: expected a state dict (names -> tensors), got {type(state).__name__}"
        )
    return dict(state)


def _listed(keys) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - _LISTED_KEYS} more)" if len(keys) > _LISTED_KEYS else ""
    return ", ".join(keys[:_LISTED_KEYS]) + more


def check_state_dict(model, state: Mapping, what: str) -> None:
    """Refuse ``state`` unless its keys and shapes are exactly those of ``model.state_dict()``.

    Raises:
        ModelSourceError: the missing keys, the unexpected keys and the mis-shaped ones, listed.
    """
    own = model.state_dict()
    missing = set(own) - set(state)
    unexpected = set(state) - set(own)
    shapes = [
        f"{k} {list(state[k].shape)} (expected {list(own[k].shape)})"
        for k in sorted(set(own) & set(state))
        if tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_listed(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_listed(unexpected)}")
        if shapes:
            parts.append(f"mis-shaped ({len(shapes)}): {', '.join(shapes[:_LISTED_KEYS])}")
        raise ModelSourceError(f"--weights do not match {what}: " + "; ".join(parts))


def _final_linear(model):
    """(name, module) of the last ``nn.Linear`` of ``model``, or None."""
    from torch import nn

    last = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            last = (name, mod)
    return last


def torchvision_model(arch: str, state: Mapping | None):
    """torchvision ``arch`` with ``state`` loaded. A state dict whose only difference is the final Linear's
    number of outputs (a fine-tuned classifier) builds the architecture with that ``num_classes``."""
    import torchvision

    model = torchvision.models.get_model(arch, weights=None)
    if state is None:
        return model
    last = _final_linear(model)
    if last is not None:
        key = f"{last[0]}.weight"
        if key in state and state[key].ndim == 2 and state[key].shape[0] != last[1].out_features:
            own = model.state_dict()
            others_match = set(own) == set(state) and all(
                tuple(own[k].shape) == tuple(state[k].shape) for k in own if k not in (key, f"{last[0]}.bias")
            )
            if others_match:
                model = torchvision.models.get_model(arch, weights=None, num_classes=int(state[key].shape[0]))
    check_state_dict(model, state, f"torchvision {arch}")
    model.load_state_dict(state)
    return model


@contextlib.contextmanager
def _cwd_importable():
    """The current folder on ``sys.path`` for the duration (``python -m``'s rule), as it was afterwards."""
    cwd = str(Path.cwd())
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        yield
    finally:
        if added:
            with contextlib.suppress(ValueError):
                sys.path.remove(cwd)


def callable_model(target: str):
    """Import ``package.module``, follow the attribute path, call it with no arguments.

    Raises:
        ModelSourceError: the module does not import, the attribute is missing or not callable, or the result
            is not a ``torch.nn.Module``.
    """
    from torch import nn

    module_name, attr_path = target.split(":", 1)
    with _cwd_importable():
        try:
            obj = importlib.import_module(module_name)
        except ImportError as e:
            raise ModelSourceError(f"--model {target}: cannot import {module_name} ({e})") from None
    for attr in attr_path.split("."):
        if not hasattr(obj, attr):
            raise ModelSourceError(f"--model {target}: {module_name} has no attribute {attr_path!r}")
        obj = getattr(obj, attr)
    if not callable(obj):
        raise ModelSourceError(f"--model {target}: {attr_path} is not callable")
    model = obj()
    if not isinstance(model, nn.Module):
        raise ModelSourceError(
            f"--model {target}: {attr_path}() returned {type(model).__name__}; expected a torch.nn.Module"
        )
    return model


def torchvision_preset(arch: str, weights: Path | None) -> tuple[dict, str]:
    """The eval-transform fields of ``arch``'s torchvision weights (``weights.transforms`` is a
    ``functools.partial`` of ``ImageClassification``; its keywords override the class's defaults), and which
    member they came from: the one whose download file name is ``weights``'s, else ``DEFAULT``. ``({}, "")``
    for an architecture without weights."""
    import inspect

    import torchvision

    try:
        enum = torchvision.models.get_model_weights(arch)
    except (ValueError, KeyError):
        return {}, ""
    members = list(enum)
    chosen = next(
        (w for w in members if weights is not None and w.url.rsplit("/", 1)[-1] == weights.name), None
    )
    chosen = chosen or enum.DEFAULT
    tf = chosen.transforms
    func = getattr(tf, "func", None)
    if func is None or func.__name__ != "ImageClassification":
        return {}, ""
    params = inspect.signature(func).parameters
    fields = {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}
    fields.update(tf.keywords)
    out = {k: fields[k] for k in ("resize_size", "crop_size", "mean", "std") if k in fields}
    if "interpolation" in fields:
        out["interpolation"] = getattr(fields["interpolation"], "value", fields["interpolation"])
    return out, f"{type(chosen).__name__}.{chosen.name}"


def read_labels(path: str | Path) -> list[str]:
    """Class names, one per line (line i = class i); a final newline is not a class.

    Raises:
        ModelSourceError: no file, or an empty line among the names.
    """
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ModelSourceError(f"--labels {p}: cannot read it ({e.strerror})") from None
    labels = [ln.rstrip("\r") for ln in text.split("\n")]
    if labels and labels[-1] == "":
        labels.pop()
    empty = [i + 1 for i, lb in enumerate(labels) if not lb.strip()]
    if empty:
        raise ModelSourceError(f"--labels {p}: empty line(s) {empty[:5]}; expected one class name per line")
    return labels


def _labels(labels_file: Path | None, classes: int) -> list[str]:
    if labels_file is not None:
        labels = read_labels(labels_file)
        if len(labels) != classes:
            raise ModelSourceError(
                f"--labels {labels_file} has {len(labels)} names but the model's output has {classes} classes; "
                "expected one name per class"
            )
        return labels
    if classes == IMAGENET_CLASSES:
        from tcsched.build_tools.export import imagenet_categories

        return imagenet_categories()
    raise ModelSourceError(
        f"the model's output has {classes} classes: give --labels FILE with one class name per line "
        f"(ImageNet's names are the default only for {IMAGENET_CLASSES} classes)"
    )


def merge_spec(
    base: dict, preprocessing_file: Path | None, overrides: Mapping[str, object]
) -> PreprocessSpec:
    """ImageNet's fields, then ``base``'s, then those the file sets, then ``overrides``, validated once."""
    try:
        fields = {**IMAGENET.model_dump(), **base}
        if preprocessing_file is not None:
            fields.update(_file_fields(preprocessing_file))
        fields.update(overrides)
        return PreprocessSpec.build(**fields)
    except PreprocessError as e:
        raise ModelSourceError(str(e)) from None


def _file_fields(path: Path) -> dict:
    """The fields a preprocessing file sets (the others keep the model's defaults, not ImageNet's)."""
    spec = PreprocessSpec.from_file(path)
    return {k: getattr(spec, k) for k in spec.model_fields_set}


def _torch_output(model, chw: tuple[int, int, int], what: str) -> int:
    """Run ``model`` on zeros [1, C, H, W]; its number of classes.

    Raises:
        ModelSourceError: the forward pass fails or its output is not one 2-D tensor [1, classes].
    """
    import torch

    try:
        with torch.no_grad():
            y = model(torch.zeros(1, *chw))
    except Exception as e:  # noqa: BLE001 - any failure of a user's forward pass is reported as such
        raise ModelSourceError(
            f"{what} fails on a float32 [1, {', '.join(map(str, chw))}] input ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200] if str(e) else ''}); expected an image classifier taking NCHW images"
        ) from None
    if not isinstance(y, torch.Tensor) or y.ndim != 2 or y.shape[0] != 1:
        got = f"shape {list(y.shape)}" if isinstance(y, torch.Tensor) else type(y).__name__
        raise ModelSourceError(f"{what}'s output is {got}; expected one 2-D tensor of logits [N, classes]")
    return int(y.shape[1])


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
    torch_model.eval()
    pre = merge_spec(base, preprocessing_file, overrides)
    chw = (pre.channels, *pre.crop_size)
    _check_channels(pre)
    classes = _torch_output(torch_model, chw, f"--model {model or 'mobilenet_v2'}")
    labels = _labels(labels_file, classes)
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


def _check_channels(pre: PreprocessSpec, model_channels: int | None = None) -> None:
    """Images are decoded to RGB (:func:`tcsched.imaging.check_spec`): 3 values of mean and std, and a model
    taking 3 channels."""
    for what, n in (("mean/std", pre.channels), ("the model's input", model_channels)):
        if n is not None and n != RGB_CHANNELS:
            raise ModelSourceError(
                f"{what} has {n} channels: images are decoded to RGB, so expected {RGB_CHANNELS}"
            )


# ------------------------------------------------------------------------------------------------------- ONNX

INPUT_NAME = "input"
OUTPUT_NAME = "logits"


def _dims(value_info) -> list[int | str | None]:
    t = value_info.type.tensor_type
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]


def check_onnx_signature(model) -> tuple[list, list]:
    """(input dims, output dims) of an ONNX classifier, or the reason it is not one.

    Raises:
        ModelSourceError: not exactly one graph input and one output, an input that is not float32 [N, C, H, W],
            an output that is not float32 [N, classes].
    """
    import onnx

    g = model.graph
    inits = {i.name for i in g.initializer}
    inputs = [i for i in g.input if i.name not in inits]
    if len(inputs) != 1 or len(g.output) != 1:
        raise ModelSourceError(
            f"the ONNX graph has {len(inputs)} input(s) {[i.name for i in inputs]} and {len(g.output)} output(s) "
            f"{[o.name for o in g.output]}; expected one image input and one logits output"
        )
    (inp,), (out,) = inputs, g.output
    for what, vi, rank, form in (
        ("input", inp, 4, "[N, C, H, W] (NCHW image)"),
        ("output", out, 2, "[N, classes] (logits)"),
    ):
        et = vi.type.tensor_type.elem_type
        dims = _dims(vi)
        if et != onnx.TensorProto.FLOAT or len(dims) != rank:
            raise ModelSourceError(
                f"the ONNX {what} {vi.name!r} is {onnx.helper.tensor_dtype_to_np_dtype(et) if et else 'untyped'} "
                f"{dims} ({len(dims)}-D); expected float32 {form}"
            )
    return _dims(inp), _dims(out)


def _make_batch_dynamic(model) -> bool:
    """Set dim 0 of the input and the output to the symbol ``batch`` where it is a fixed number; True if so."""
    changed = False
    g = model.graph
    inits = {i.name for i in g.initializer}
    for vi in [i for i in g.input if i.name not in inits] + list(g.output):
        d = vi.type.tensor_type.shape.dim[0]
        if d.HasField("dim_value"):
            d.Clear()
            d.dim_param = "batch"
            changed = True
    return changed


def _rename(model, old: str, new: str) -> None:
    if old == new:
        return
    g = model.graph
    for vi in list(g.input) + list(g.output):
        if vi.name == old:
            vi.name = new
    for n in g.node:
        for seq in (n.input, n.output):
            for i, x in enumerate(seq):
                if x == old:
                    seq[i] = new


def optimize_basic(model):
    """ONNX Runtime's basic graph optimizations (constant folding, redundant-node elimination, Pad/BN/Add
    folded into Conv: standard ONNX ops only), then ``Reshape(x, [0, -1])`` of a 4-D tensor as
    ``Flatten(axis=1)`` (ONNX Reshape: 0 copies that input dimension, so both give [N, C*H*W]); opset imports
    reduced to the domains the graph uses. The exported graphs of ``torch.nn.ZeroPad2d`` and of
    ``x.view(x.size(0), -1)`` become the Conv/Flatten form the build's quantizer, fine-tune and analysis
    know."""
    import tempfile

    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as d:
        src, dst = Path(d) / "in.onnx", Path(d) / "out.onnx"
        onnx.save(model, str(src))
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        so.optimized_model_filepath = str(dst)
        ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
        out = onnx.load(str(dst))
    g = out.graph
    consts = {i.name: i for i in g.initializer}
    shapes = {vi.name: vi for vi in list(g.value_info) + list(g.input)}
    inferred = onnx.shape_inference.infer_shapes(out)
    shapes.update({vi.name: vi for vi in inferred.graph.value_info})
    for n in g.node:
        if n.op_type != "Reshape" or n.input[1] not in consts:
            continue
        target = onnx.numpy_helper.to_array(consts[n.input[1]]).tolist()
        src_vi = shapes.get(n.input[0])
        if target == [0, -1] and src_vi is not None and len(_dims(src_vi)) == 4:
            n.op_type = "Flatten"
            del n.input[1:]
            del n.attribute[:]
            n.attribute.append(onnx.helper.make_attribute("axis", 1))
    used = {i for n in g.node for i in n.input}
    for name in [k for k in consts if k not in used]:
        g.initializer.remove(consts[name])
    domains = {n.domain or "" for n in g.node}
    keep = [o for o in out.opset_import if (o.domain or "") in domains or o.domain in ("", "ai.onnx")]
    del out.opset_import[:]
    out.opset_import.extend(keep)
    onnx.checker.check_model(out)
    return out


def load_onnx_classifier(path: Path):
    """An ONNX classifier normalised for the build: checked (:func:`check_onnx_signature`), batch axis
    dynamic, input renamed ``input`` and output ``logits``, :func:`optimize_basic`, and run by ONNX Runtime at
    batch 2. Returns (model, [C, H or None, W or None], classes or None, notes).

    Raises:
        ModelSourceError: unreadable, the signature, or a graph whose batch axis cannot be made dynamic (it
            fails or returns another batch at batch 2: a Reshape or an initializer fixes it).
    """
    import onnx

    try:
        model = onnx.load(str(path))
    except Exception as e:  # noqa: BLE001 - protobuf's DecodeError and friends
        raise ModelSourceError(f"--model {path}: not an ONNX model ({type(e).__name__}: {e})") from None
    in_dims, out_dims = check_onnx_signature(model)
    notes = []
    if _make_batch_dynamic(model):
        notes.append(f"batch axis of {path.name} was fixed ({in_dims[0]}): made dynamic")
    g = model.graph
    inits = {i.name for i in g.initializer}
    (inp,) = [i for i in g.input if i.name not in inits]
    _rename(model, inp.name, INPUT_NAME)
    _rename(model, g.output[0].name, OUTPUT_NAME)
    try:
        model = optimize_basic(model)
    except Exception as e:  # noqa: BLE001 - ONNX Runtime refuses the graph: say so
        raise ModelSourceError(
            f"--model {path}: ONNX Runtime cannot load it ({str(e).splitlines()[0][:300]})"
        ) from None
    c, h, w = (d if isinstance(d, int) and d > 0 else None for d in in_dims[1:])
    if c is None:
        raise ModelSourceError(
            f"--model {path}: the input's channel axis is {in_dims[1]!r}; expected a fixed number"
        )
    classes = out_dims[1] if isinstance(out_dims[1], int) and out_dims[1] > 0 else None
    return model, [c, h, w], classes, notes


def _run_batch2(model, chw: tuple[int, int, int], path: Path) -> int:
    """Run the normalised graph at batch 2; its number of classes.

    Raises:
        ModelSourceError: it fails, or the output is not [2, classes].
    """
    import onnxruntime as ort

    try:
        s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        (y,) = s.run(None, {INPUT_NAME: np.zeros((2, *chw), np.float32)})
    except Exception as e:  # noqa: BLE001 - ONNX Runtime's errors are one class per kind
        raise ModelSourceError(
            f"--model {path}: the graph does not run at batch 2 ({str(e).splitlines()[0][:300]}); its batch "
            "axis cannot be made dynamic (a Reshape or a constant fixes it): export it with a dynamic batch axis"
        ) from None
    if y.ndim != 2 or y.shape[0] != 2:
        raise ModelSourceError(
            f"--model {path}: at batch 2 the output is {list(y.shape)}; expected [2, classes] (the batch axis "
            "cannot be made dynamic: export it with a dynamic batch axis)"
        )
    return int(y.shape[1])


def _resolve_onnx(spec, weights, labels_file, preprocessing_file, overrides) -> ResolvedModel:
    path = Path(spec.target)
    if weights is not None:
        raise ModelSourceError(f"--weights {weights}: an ONNX model carries its weights; leave --weights out")
    model, (c, h, w), classes, notes = load_onnx_classifier(path)
    _check_channels(IMAGENET, c)
    base: dict = {}
    explicit_crop = "crop_size" in overrides or (
        preprocessing_file is not None and "crop_size" in _file_fields(preprocessing_file)
    )
    explicit_resize = "resize_size" in overrides or (
        preprocessing_file is not None and "resize_size" in _file_fields(preprocessing_file)
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
        _fix_spatial(model, pre.crop_size)
    chw = (c, *pre.crop_size)
    ran = _run_batch2(model, chw, path)
    classes = classes or ran
    if ran != classes:
        raise ModelSourceError(f"--model {path}: the output declares {classes} classes but returns {ran}")
    labels = _labels(labels_file, classes)
    return ResolvedModel(spec, None, model, chw, classes, labels, pre, None, f"ONNX {path.name}", notes)


def _fix_spatial(model, crop: tuple[int, int]) -> None:
    d = model.graph.input[0].type.tensor_type.shape.dim
    for i, v in ((2, crop[0]), (3, crop[1])):
        d[i].Clear()
        d[i].dim_value = int(v)
