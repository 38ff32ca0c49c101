"""``--model`` parsed, and the checks every source kind shares: the model-name prefix, the class names, the
preprocessing merged from its sources, and :class:`ModelSourceError`, the one error of every refusal.

The forms of ``--model`` and the order in which the preprocessing fields are taken:
:mod:`tcsched.build_tools.model_source`.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

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
    """Parse ``--model`` (its forms: :mod:`tcsched.build_tools.model_source`); ``name`` overrides the
    model-name prefix.

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


def class_labels(labels_file: Path | None, classes: int) -> list[str]:
    """The ``classes`` class names: ``labels_file``'s (:func:`read_labels`), else ImageNet's for 1000 classes.

    Raises:
        ModelSourceError: the file's number of names differs from ``classes``, or no file for another number
            of classes than 1000.
    """
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
            fields.update(file_fields(preprocessing_file))
        fields.update(overrides)
        return PreprocessSpec.build(**fields)
    except PreprocessError as e:
        raise ModelSourceError(str(e)) from None


def file_fields(path: Path) -> dict:
    """The fields a preprocessing file sets (the others keep the model's defaults, not ImageNet's)."""
    spec = PreprocessSpec.from_file(path)
    return {k: getattr(spec, k) for k in spec.model_fields_set}


def check_channels(pre: PreprocessSpec, model_channels: int | None = None) -> None:
    """Images are decoded to RGB (:func:`tcsched.imaging.check_spec`): 3 values of mean and std, and a model
    taking 3 channels.

    Raises:
        ModelSourceError: ``pre``'s mean/std or ``model_channels`` (when given) is not 3.
    """
    for what, n in (("mean/std", pre.channels), ("the model's input", model_channels)):
        if n is not None and n != RGB_CHANNELS:
            raise ModelSourceError(
                f"{what} has {n} channels: images are decoded to RGB, so expected {RGB_CHANNELS}"
            )
