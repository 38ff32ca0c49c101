"""What the bench and the ramp load: :class:`Target` (a Triton model with fixed request parameters), the target
lists of ``tcsched bench`` and ``tcsched ramp``, and the perf_analyzer ``--input-data`` files made from real
images (:class:`InputData`)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from tcsched import names
from tcsched.client.perf_analyzer import write_bytes_input_data, write_tensor_input_data
from tcsched.client.pipelines import exact_path_name, pipeline_name

# model and tensor names of the repository that tcsched build writes (defined in tcsched.names)
ENSEMBLE = names.ENSEMBLE
ENSEMBLE_INPUT = names.IMAGE
VARIANT_INPUT = "input"  # the variants' ONNX input name (tcsched.build_tools.export.INPUT_NAME)
SCHEDULER = names.SCHEDULER
SCHEDULER_INPUT = names.PIXELS

TargetKind = Literal["variant", "ensemble", "scheduler", "pipeline"]


@dataclass(frozen=True)
class Target:
    """One thing perf_analyzer loads: a Triton ``model`` with fixed request parameters.

    ``variant`` is the variant the target runs on (the model itself, or the one forced on the ensemble);
    ``None`` for the ensemble left to the scheduler.
    """

    name: str
    model: str
    kind: TargetKind
    request_parameters: dict[str, object] = field(default_factory=dict)
    variant: str | None = None


def bench_targets(
    variants: Sequence[str], ensemble: str = ENSEMBLE, scheduler: bool = True, pipelines: bool = False
) -> list[Target]:
    """Every variant directly, the ensemble forced to each variant, the scheduler model alone forced to each
    variant, (``pipelines``) the plain ensemble preprocess -> variant without the scheduler, and (``scheduler``)
    the ensemble's own pick."""
    out = [Target(v, v, "variant", {}, v) for v in variants]
    if pipelines:
        # same JPEG request and preprocessing as the ensemble, no scheduler: what the scheduler adds
        out += [Target(pipeline_name(v), pipeline_name(v), "pipeline", {}, v) for v in variants]
    out += [Target(f"{ensemble}[{v}]", ensemble, "ensemble", {"variant": v}, v) for v in variants]
    # the scheduler model alone (tensor in, BLS to the forced variant): its own overhead, without preprocessing
    out += [Target(f"{SCHEDULER}[{v}]", SCHEDULER, "scheduler", {"variant": v}, v) for v in variants]
    if scheduler:
        out.append(Target(f"{ensemble}[scheduler]", ensemble, "ensemble", {}, None))
    return out


def ort_int8_variant(manifest) -> str | None:
    """The repository's ONNX Runtime int8 variant (the baseline of the pairs' and the paths' ratios), or None."""
    return next(
        (v.name for v in manifest.variants if (v.runtime, v.precision) == ("onnxruntime", "int8")), None
    )


#: what the path rounds' targets are, in the order of :func:`path_targets` (the first is the baseline)
PATH_ROLES = ("today", "default", "fastest")


def path_targets(
    ensemble: str, ort_int8: str, fastest: str, today_variant: str | None = None
) -> list[Target]:
    """The path rounds' targets, JPEG in, in :data:`PATH_ROLES` order: today's path (``<ensemble>_exact_path``:
    exact preprocessing, one instance, forced to the ONNX Runtime int8 variant ``ort_int8``, served as
    ``today_variant`` when given: its float-input copy beside a uint8-pixel repository), the ensemble as built
    with the scheduler's own choice (no parameters), and the ensemble forced to ``fastest``."""
    exact = exact_path_name(ensemble)
    today = today_variant or ort_int8
    return [
        Target(f"{exact}[{ort_int8}]", exact, "ensemble", {"variant": today}, ort_int8),
        Target(f"{ensemble}[scheduler]", ensemble, "ensemble", {}, None),
        Target(f"{ensemble}[{fastest}]", ensemble, "ensemble", {"variant": fastest}, fastest),
    ]


def ramp_targets(
    variants: Sequence[str], latency_budget_ms: float, ensemble: str = ENSEMBLE, **params: object
) -> list[Target]:
    """Targets for the scheduler-under-load study: the ensemble with ``latency_budget_ms`` (scheduler
    chooses) and the ensemble forced to each static variant (same extra ``params`` on all).

    Raises:
        ValueError: ``latency_budget_ms`` not a finite number > 0.
    """
    if not (math.isfinite(latency_budget_ms) and latency_budget_ms > 0):
        raise ValueError(f"latency_budget_ms must be a finite number > 0, got {latency_budget_ms!r}")
    out = [
        Target(
            f"{ensemble}[budget={latency_budget_ms:g}ms]",
            ensemble,
            "ensemble",
            {**params, "latency_budget_ms": float(latency_budget_ms)},
            None,
        )
    ]
    out += [Target(f"{ensemble}[{v}]", ensemble, "ensemble", {**params, "variant": v}, v) for v in variants]
    return out


@dataclass(frozen=True)
class InputData:
    """perf_analyzer ``--input-data`` files made from the same real images: preprocessed float32 tensors for
    the variants, the encoded bytes for the ensemble; ``tensors`` feeds the bare-session measurement."""

    variant_json: Path
    ensemble_json: Path
    images: list[str]
    tensors: list  # numpy float32 (or uint8 pixels) [C, H, W] each (the repository's preprocessing)
    scheduler_json: Path | None = None
    blobs: list = field(default_factory=list)  # the encoded images, same order as ``tensors``

    def for_target(self, t: Target) -> Path:
        if t.kind == "scheduler":
            return self.scheduler_json
        return self.variant_json if t.kind == "variant" else self.ensemble_json  # ensemble, pipeline


def pick_images(data_dir: str | os.PathLike | None, n: int) -> list:
    """``n`` real images spread evenly over ``data_dir`` (``tcsched.data.list_images``), or the default photos.

    Raises:
        ValueError: ``n`` < 1.
        FileNotFoundError: ``data_dir`` missing or without images.
    """
    from tcsched.data import default_photos, list_images

    if n < 1:
        raise ValueError(f"need at least 1 image, got {n}")
    items = list_images(data_dir) if data_dir is not None else default_photos()
    step = max(1, len(items) // n)
    return items[::step][:n]


def make_input_data(
    items: Sequence, folder: str | os.PathLike, spec=None, dtype: str = "float32"
) -> InputData:
    """Write both ``--input-data`` JSON files for ``items`` (``tcsched.data.ImageItem``) into ``folder``; the
    tensors are made by ``spec`` (the repository's ``Manifest.preprocess_spec``; None: ImageNet's 256/224) in
    ``dtype`` (the repository's ``Manifest.input.dtype``: float32, or uint8 pixels)."""
    from tcsched.imaging import preprocess_bytes
    from tcsched.preprocessing import IMAGENET

    spec = spec or IMAGENET

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    blobs = [it.read_bytes() for it in items]
    tensors = [preprocess_bytes(b, spec=spec, dtype=dtype) for b in blobs]
    return InputData(
        variant_json=write_tensor_input_data(folder / "variant_input.json", VARIANT_INPUT, tensors),
        ensemble_json=write_bytes_input_data(folder / "ensemble_input.json", ENSEMBLE_INPUT, blobs),
        images=[str(it.path) for it in items],
        tensors=tensors,
        scheduler_json=write_tensor_input_data(folder / "scheduler_input.json", SCHEDULER_INPUT, tensors),
        blobs=blobs,
    )
