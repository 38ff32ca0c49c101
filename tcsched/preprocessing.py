"""The preprocessing spec: how pixels are made from an image, in torchvision's terms (``tcsched.preprocessing``).

One :class:`PreprocessSpec` per repository: chosen at build time (options, a small JSON/TOML file, or the defaults
of the chosen torchvision weights), recorded in the manifest, written into the ``preprocess`` model's
config.pbtxt parameters, and used everywhere pixels are made (calibration, fine-tunes, evaluation, the
``preprocess`` model, the input statistics).

The fields mirror torchvision's eval preset ``ImageClassification`` (torchvision/transforms/_presets.py):
``Resize(resize_size, interpolation, antialias=True)`` on the shorter side, ``CenterCrop(crop_size)``,
``ToTensor`` (/255), ``Normalize(mean, std)``. The default is MobileNetV2's ``IMAGENET1K_V1`` preset: resize 256,
crop 224, bilinear, ImageNet's mean/std.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# ImageNet channel statistics used by every torchvision classification weight (torchvision _presets.py).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: torchvision ``InterpolationMode`` values that PIL implements (torchvision maps them to PIL's filters).
Interpolation = Literal["nearest", "bilinear", "bicubic", "box", "hamming", "lanczos"]

#: The key of the ``preprocess`` model's config.pbtxt parameter that holds :meth:`PreprocessSpec.to_json`.
PARAMETER_KEY = "preprocessing"

#: How the served ``preprocess`` model makes the pixels of a spec (tcsched.imaging): ``exact`` is torchvision's
#: transform bit for bit; ``fast`` decodes a JPEG at 1/2, 1/4 or 1/8 scale in the DCT domain when its shorter
#: side stays >= ``resize_size``, and resizes straight to the crop.
Method = Literal["exact", "fast"]
METHODS: tuple[str, ...] = get_args(Method)
#: The key of the ``preprocess`` model's config.pbtxt parameter that holds the :data:`Method`.
METHOD_KEY = "preprocess_method"


class PreprocessError(ValueError):
    """A preprocessing spec that cannot be used; the message names the field, the value and what is expected."""


class PreprocessSpec(BaseModel):
    """The eval transform of one model.

    Attributes:
        resize_size: pixels of the shorter side after the resize (torchvision ``Resize(int)``).
        crop_size: (height, width) of the centre crop, in pixels; an int means a square crop. It equals the
            model's input height and width.
        interpolation: the resize filter, a torchvision ``InterpolationMode`` value (lower case).
        mean, std: per-channel statistics of ``Normalize`` on 0..1 pixels, one value per input channel (RGB).

    Raises (on construction):
        pydantic.ValidationError: a crop larger than the resize, a non-positive size or std, mean and std of
            different lengths.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    resize_size: int = Field(default=256, ge=1, le=4096, description="shorter side after the resize, px")
    crop_size: tuple[int, int] = Field(
        default=(224, 224), description="(height, width) of the centre crop, px"
    )
    interpolation: Interpolation = "bilinear"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    @field_validator("crop_size", mode="before")
    @classmethod
    def _square(cls, v):
        if isinstance(v, int):
            return (v, v)
        return v

    @field_validator("crop_size")
    @classmethod
    def _positive_crop(cls, v: tuple[int, int]) -> tuple[int, int]:
        if min(v) < 1 or max(v) > 4096:
            raise ValueError(f"crop_size {list(v)}: expected 1..4096 px per side")
        return v

    @field_validator("std")
    @classmethod
    def _positive_std(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if any(s <= 0 for s in v):
            raise ValueError(f"std {list(v)}: expected every value > 0")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> PreprocessSpec:
        if len(self.mean) != len(self.std) or not self.mean:
            raise ValueError(
                f"mean has {len(self.mean)} values and std {len(self.std)}: expected one value per channel each"
            )
        if max(self.crop_size) > self.resize_size:
            raise ValueError(
                f"crop_size {list(self.crop_size)} is larger than resize_size {self.resize_size}: the centre crop "
                "of a square image would need padding; expected crop <= resize"
            )
        return self

    @property
    def channels(self) -> int:
        return len(self.mean)

    def check_model_input(self, shape: tuple[int, ...] | list[int]) -> None:
        """Check the spec against a model input shape ``[C, H, W]`` (without the batch axis).

        Raises:
            PreprocessError: C differs from the number of mean/std values, or (H, W) from ``crop_size``.
        """
        c, h, w = (int(d) for d in shape)
        if c != self.channels:
            raise PreprocessError(
                f"mean/std have {self.channels} values but the model's input has {c} channels (shape "
                f"{[c, h, w]}); expected one mean and one std per channel"
            )
        if (h, w) != tuple(self.crop_size):
            raise PreprocessError(
                f"crop_size {list(self.crop_size)} differs from the model's input height and width {[h, w]}; "
                "expected the crop to be the model's input size"
            )

    # --- writer and reader (the preprocess model's config.pbtxt parameter, the manifest, a file) -----------------

    def to_json(self) -> str:
        """Compact JSON of every field (the value of the ``preprocessing`` config parameter)."""
        return self.model_dump_json()

    @classmethod
    def from_json(cls, text: str) -> PreprocessSpec:
        """Inverse of :meth:`to_json`.

        Raises:
            PreprocessError: not JSON, or a field out of range (the message names it).
        """
        try:
            return cls.model_validate_json(text)
        except ValidationError as e:
            raise PreprocessError(f"preprocessing spec: {_errors(e)}") from None

    @classmethod
    def from_parameters(cls, parameters: Mapping[str, object]) -> PreprocessSpec:
        """The spec from a model config's ``parameters`` (``{key: {"string_value": ...}}`` as Triton passes them
        to ``initialize``, or ``{key: str}``); the defaults when the key is absent.

        Raises:
            PreprocessError: as :meth:`from_json`.
        """
        raw = parameters.get(PARAMETER_KEY)
        if raw is None:
            return cls()
        if isinstance(raw, Mapping):
            raw = raw.get("string_value", "")
        return cls.from_json(str(raw))

    @classmethod
    def from_file(cls, path: str | Path) -> PreprocessSpec:
        """Read a ``.json`` or ``.toml`` file of the fields (any subset; the others take the defaults).

        Raises:
            PreprocessError: unreadable file, another suffix, unparsable text or a bad field.
        """
        p = Path(path)
        try:
            import tomllib  # the standard library from Python 3.11 (the container's Python backend runs 3.10)
        except ImportError:
            if p.suffix == ".toml":
                raise PreprocessError(
                    f"preprocessing file {p}: TOML needs Python >= 3.11; use JSON"
                ) from None
            tomllib = None
        try:
            text = p.read_text()
        except OSError as e:
            raise PreprocessError(f"preprocessing file {p}: cannot read it ({e.strerror})") from None
        try:
            if p.suffix == ".json":
                data = json.loads(text)
            elif p.suffix == ".toml":
                data = tomllib.loads(text)
            else:
                raise PreprocessError(f"preprocessing file {p}: expected a .json or .toml file")
        except (json.JSONDecodeError, ValueError) as e:  # tomllib.TOMLDecodeError is a ValueError
            raise PreprocessError(f"preprocessing file {p}: not valid {p.suffix[1:].upper()} ({e})") from None
        if not isinstance(data, dict):
            raise PreprocessError(
                f"preprocessing file {p}: expected a table of fields, got {type(data).__name__}"
            )
        return cls.build(**data)

    @classmethod
    def build(cls, **fields) -> PreprocessSpec:
        """Construct from keyword fields, with :class:`PreprocessError` instead of pydantic's error.

        Raises:
            PreprocessError: a bad or unknown field (the message names it and what is expected).
        """
        try:
            return cls(**fields)
        except ValidationError as e:
            raise PreprocessError(f"preprocessing spec: {_errors(e)}") from None

    def with_overrides(self, **fields) -> PreprocessSpec:
        """A copy with the given fields replaced (None values ignored), validated as :meth:`build`."""
        return type(self).build(**{**self.model_dump(), **{k: v for k, v in fields.items() if v is not None}})


def _errors(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "spec"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


#: MobileNetV2 IMAGENET1K_V1's preset (and every torchvision ImageNet weight at 224 with resize 256).
IMAGENET = PreprocessSpec()
