"""The typed manifest: the one contract between the offline build and the online scheduler.

``build_tools`` writes ``<model_repository>/manifest.json``; the scheduler (``backends/python_scheduler``) reads
it at model load. Every field that carries a unit says so in its name (``_ms``, ``_bytes``, ``_points``).

The schema is versioned: a reader refuses a manifest whose ``schema_version`` major differs from
:data:`SCHEMA_VERSION`, with a message that says to rebuild (``tcsched build``).
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from tcsched.names import ENSEMBLE
from tcsched.precision import Precision
from tcsched.preprocessing import IMAGENET, PreprocessSpec

# 1.1: cascades, accuracy intervals, Pareto-front flags; 1.2: openvino runtime, CPU capabilities;
# 1.3: the model's source, its preprocessing and the ensemble's name (absent in older manifests: MobileNetV2,
# tcsched.preprocessing.IMAGENET, "classifier"); 1.4: each variant's figures on all the build's labeled images
SCHEMA_VERSION = "1.4"
MANIFEST_FILENAME = "manifest.json"

Runtime = Literal["onnxruntime", "openvino", "tensorrt"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class TensorSpec(_Model):
    """One tensor of a variant's signature (batch dimension excluded)."""

    name: str
    dtype: str = Field(description="numpy dtype name, e.g. 'float32'")
    shape: list[int] = Field(description="shape without the batch dimension, e.g. [3, 224, 224]")


class AccuracyReport(_Model):
    """Accuracy of one variant, measured by the build (not quoted from a paper).

    ``top1``/``top5`` are fractions in [0, 1] on ``dataset`` (``None`` when the images had no labels);
    ``agreement_with_fp32`` is the fraction of images whose top-1 class equals the fp32 variant's;
    ``kl_vs_fp32`` is the mean KL(softmax(fp32) || softmax(variant)) in nats.
    """

    dataset: str
    n_images: int = Field(ge=0)
    top1: float | None = Field(default=None, ge=0, le=1)
    top5: float | None = Field(default=None, ge=0, le=1)
    agreement_with_fp32: float = Field(ge=0, le=1)
    kl_vs_fp32: float = Field(ge=0)
    top1_drop_points: float = Field(
        description="fp32 top-1 minus this top-1, percentage points, on the same images; where the images had "
        "no labels, the disagreement with fp32 (100 * (1 - agreement)), a conservative stand-in"
    )
    top1_ci95: tuple[float, float] | None = Field(
        default=None,
        description="Wilson 95% interval of top1 over n_images (tcsched.metrics.wilson_interval)",
    )
    agreement_ci95: tuple[float, float] | None = Field(
        default=None, description="Wilson 95% interval of agreement_with_fp32 over n_images"
    )


class LatencyReport(_Model):
    """Latency of one variant on the machine that built it: bare runtime session, no server."""

    device: str = Field(description="where it was measured, e.g. 'cpu: 2 threads' or 'NVIDIA H100'")
    runtime: Runtime
    threads: int | None = None
    p50_ms_by_batch: dict[int, float] = Field(description="median latency of one batch, milliseconds")
    p99_ms_by_batch: dict[int, float] = Field(default_factory=dict)
    ratio_to_fp32_by_batch: dict[int, float] = Field(
        default_factory=dict, description="p50 / fp32 p50 at the same batch, measured interleaved in one run"
    )


class InputStatistics(_Model):
    """Statistics of the calibration inputs (after normalisation), for the scheduler's drift check.

    ``channel_mean``/``channel_std``: per RGB channel over all pixels of all calibration images.
    ``image_mean_range``: [min, max] over images of the per-image mean; the ``_p01_p99`` fields are the robust
    versions the drift check uses.
    """

    n_images: int
    channel_mean: list[float]
    channel_std: list[float]
    image_mean_range: tuple[float, float]
    image_std_range: tuple[float, float]
    image_mean_p01_p99: tuple[float, float] | None = Field(
        default=None, description="1st and 99th percentile over images of the per-image mean"
    )
    image_std_p01_p99: tuple[float, float] | None = None
    saturated_fraction_p99: float | None = Field(
        default=None, description="99th percentile over images of the fraction of values at pixel 0 or 255"
    )


class EngineInfo(_Model):
    """A TensorRT engine compiled from the variant's ONNX graph; valid only on the GPU and TensorRT it names."""

    plan_file: str = Field(description="path of the .plan, relative to the repository root")
    tensorrt_version: str
    compute_capability: str = Field(description="e.g. '9.0' for H100/H200")
    gpu_name: str
    builder_log_file: str | None = None
    build_seconds: float | None = None
    sparse_layers_chosen: int | None = Field(
        default=None, description="layers for which the builder picked sparse kernels (sparse24 only)"
    )
    onnx_file: str | None = Field(default=None, description="the ONNX graph this engine was compiled from")
    layers_file: str | None = Field(default=None, description="the engine inspector's JSON (DETAILED)")
    int8_layers: int | None = Field(
        default=None, description="compute layers with INT8 I/O, per the inspector"
    )


class TensorRTGraph(_Model):
    """The graph TensorRT compiles for a Q/DQ variant (symmetric int8, residual inputs only quantized:
    ``tcsched.build_tools.tensorrt_graph``), which computes otherwise than ``file``: measured on its own."""

    file: str = Field(description="path of the ONNX graph, relative to the repository root")
    accuracy: AccuracyReport = Field(description="ONNX Runtime on this graph, same images as the variant's")
    note: str = ""


class VariantEntry(_Model):
    """One precision variant of the model: a Triton model in the repository."""

    name: str = Field(description="Triton model name of this variant, e.g. 'mobilenet_v2_int8'")
    precision: Precision
    runtime: Runtime = "onnxruntime"
    file: str = Field(description="path of the model file, relative to the repository root")
    size_bytes: int = Field(ge=0)
    accuracy: AccuracyReport | None = None
    accuracy_all_images: AccuracyReport | None = Field(
        default=None,
        description="the same figures on every labeled image of the build's --data-dir, the images it calibrated "
        "and chose on included: for comparing with a served figure on those images (tcsched eval without "
        "--evaluation-split), not for choosing between variants; None without --data-dir",
    )
    latency: LatencyReport | None = None
    layer_precision: dict[str, str] = Field(
        default_factory=dict, description="per Conv/Gemm layer: 'fp32' | 'fp16' | 'int8' | 'sparse24'"
    )
    build_notes: list[str] = Field(default_factory=list, description="how it was built and why it was kept")
    engine: EngineInfo | None = None
    tensorrt_graph: TensorRTGraph | None = Field(
        default=None,
        description="what a GPU build compiles instead of `file` (Q/DQ variants), and its accuracy",
    )
    serve_on_cpu_for_speed: bool = Field(
        default=True, description="False where the runtime only emulates this precision (fp16 on CPU)"
    )
    requires_cpu: list[str] = Field(
        default_factory=list,
        description="CPU capabilities it runs natively only with (tcsched.engines.capabilities), e.g. ['bf16']: "
        "on a CPU without them the scheduler treats it like emulated fp16",
    )
    on_pareto_front: bool = Field(
        default=True,
        description="False when another variant is faster at every measured batch size and this one is not "
        "significantly more accurate (paired 95% interval of the agreement difference): the scheduler then "
        "never chooses it on its own (a calibrated cascade may use it as a stage; a client may force it)",
    )
    not_served_reason: str | None = Field(default=None, description="why the scheduler does not choose it")

    @field_validator("file")
    @classmethod
    def _relative(cls, v: str) -> str:
        if Path(v).is_absolute() or ".." in Path(v).parts:
            raise ValueError(f"variant file must be relative to the repository root, got {v!r}")
        return v


class CascadeCheck(_Model):
    """One operating point re-measured on another split (the build's evaluation split)."""

    dataset: str
    n_images: int = Field(ge=0)
    agreement: float = Field(ge=0, le=1)
    agreement_ci95: tuple[float, float]
    escalation_rate: float = Field(ge=0, le=1, description="fraction of rows that left the first stage")


class OperatingPoint(_Model):
    """A cascade's thresholds for one target agreement with the fp32 reference.

    Row ``i`` is answered by the first stage ``j`` whose confidence margin (softmax top-1 minus top-2 of that
    stage's logits) is ``>= thresholds[j]``; the last stage answers every row that reaches it.
    """

    target_agreement: float = Field(gt=0, le=1)
    thresholds: list[float] = Field(description="one per stage but the last, in [0, 1]")
    agreement: float = Field(
        ge=0, le=1, description="measured top-1 agreement with fp32 on the calibration set"
    )
    agreement_ci95: tuple[float, float] = Field(
        description="95% interval of agreement: bootstrap over images (the views of an image move together)"
    )
    n_images: int = Field(ge=0)
    n_views: int = Field(ge=0, description="rows measured: n_images x label-preserving views")
    reach_rates: list[float] = Field(description="fraction of rows that reach each stage (the first: 1.0)")
    expected_latency_ms_by_batch: dict[int, float] = Field(
        description="expected ms of one batch through the cascade: first stage + each later stage at the "
        "binomial number of rows reaching it, from the variants' bare-runtime p50"
    )
    top1_drop_points: float | None = Field(
        default=None, description="fp32 top-1 minus the cascade's, if labeled"
    )
    met: bool = Field(
        description="the conformal risk bound over the calibration images is <= 1 - target_agreement (the rule "
        "of tcsched.build_tools.cascade); the scheduler uses met operating points only"
    )
    evaluation: CascadeCheck | None = None

    @property
    def escalation_rate(self) -> float:
        """Fraction of rows that leave the first stage."""
        return self.reach_rates[1] if len(self.reach_rates) > 1 else 0.0


class CascadeProfile(_Model):
    """An ordered chain of variants, fastest first, calibrated offline (``tcsched.build_tools.cascade``)."""

    stages: list[str] = Field(min_length=2, description="Triton model names, first stage first")
    label: str = Field(description="short name, e.g. 'int8>fp32' (the DECISION's and the metric's label)")
    margin: Literal["softmax_top1_minus_top2"] = "softmax_top1_minus_top2"
    calibration: str = Field(description="the images the thresholds were chosen on")
    operating_points: list[OperatingPoint]


class ModelSource(_Model):
    """Where the fp32 graph came from (``tcsched build --model``), enough to rebuild it or to run it eagerly."""

    kind: Literal["default", "onnx", "torchvision", "callable"] = Field(
        description="default: torchvision MobileNetV2 IMAGENET1K_V1; onnx: an ONNX file; torchvision: "
        "torchvision.models.get_model(target); callable: package.module:callable returning an nn.Module"
    )
    target: str = Field(default="", description="the ONNX path, the architecture or 'module:callable'")
    name: str = Field(description="prefix of the variants' model names, e.g. 'efficientnet_lite0'")
    weights_file: str | None = Field(default=None, description="absolute path of the state dict loaded")
    onnx_file: str | None = Field(default=None, description="absolute path of the ONNX source")


class Manifest(_Model):
    """Everything the scheduler needs to know about the variants, as measured by ``tcsched build``."""

    schema_version: str = SCHEMA_VERSION
    created_utc: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    source_model: str = Field(description="e.g. 'torchvision mobilenet_v2 IMAGENET1K_V1'")
    input: TensorSpec
    output: TensorSpec
    max_batch_size: int = Field(ge=1)
    labels_file: str = "classifier/labels.txt"
    reference_variant: str = Field(description="the fp32 variant every accuracy is compared with")
    variants: list[VariantEntry]
    input_statistics: InputStatistics | None = None
    target: Literal["cpu", "gpu"] = "cpu"
    cascades: list[CascadeProfile] = Field(default_factory=list)
    build_cpu: list[str] = Field(
        default_factory=list,
        description="capabilities of the CPU that built and measured it "
        "(tcsched.engines.capabilities.CpuCapabilities.to_list)",
    )
    model: ModelSource | None = Field(default=None, description="None in manifests before 1.3: MobileNetV2")
    preprocessing: PreprocessSpec | None = Field(
        default=None,
        description="the eval transform every pixel of the build and the preprocess model was made with "
        "(None before 1.3: tcsched.preprocessing.IMAGENET); see preprocess_spec",
    )
    ensemble: str = Field(default=ENSEMBLE, description="name of the served ensemble")

    @property
    def preprocess_spec(self) -> PreprocessSpec:
        """The repository's preprocessing: ``preprocessing``, or ImageNet's (MobileNetV2's) in older manifests."""
        return self.preprocessing or IMAGENET

    @field_validator("variants")
    @classmethod
    def _unique(cls, v: list[VariantEntry]) -> list[VariantEntry]:
        names = [e.name for e in v]
        if len(set(names)) != len(names):
            raise ValueError(f"variant names must be unique, got {names}")
        if not v:
            raise ValueError("a manifest needs at least one variant")
        return v

    def variant(self, name: str) -> VariantEntry:
        """Return the variant called ``name``: its full name (``mobilenet_v2_int8_openvino``), else the first
        variant of that precision (``int8``: the ONNX Runtime one comes first), else the one variant whose name
        ends in ``_<name>`` (``int8_openvino``: the name without the model's prefix).

        Raises:
            KeyError: no such variant, or a suffix that several names end in; the message lists the known ones.
        """
        for e in self.variants:
            if e.name == name or e.precision == name:
                return e
        tail = [e for e in self.variants if e.name.endswith(f"_{name}")]
        if len(tail) == 1:
            return tail[0]
        what = "ambiguous" if tail else "unknown"
        raise KeyError(f"{what} variant {name!r}; known: {', '.join(e.name for e in self.variants)}")

    # --- I/O -----------------------------------------------------------------------------------------------
    def write(self, path: str | os.PathLike) -> None:
        """Write atomically (temp file in the same folder + rename), mode 0644."""
        from tcsched.jsonio import atomic_write_text

        atomic_write_text(path, self.model_dump_json(indent=2))

    @classmethod
    def read(cls, path: str | os.PathLike) -> Manifest:
        """Read and validate a manifest.

        Raises:
            FileNotFoundError: no manifest at ``path`` (run ``tcsched build``).
            ValueError: unsupported schema version or invalid content.
        """
        return cls.model_validate(read_versioned_json(path, SCHEMA_VERSION, "manifest", "tcsched build"))


def read_versioned_json(path: str | os.PathLike, schema_version: str, what: str, command: str) -> dict:
    """Load a schema-versioned JSON document, refusing another major ``schema_version``.

    Raises:
        FileNotFoundError: no file at ``path``; the message names ``command``, which writes it.
        ValueError: another schema major version (rebuild it with ``command``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {what} at {path}; run `{command}` first")
    raw = json.loads(path.read_text())
    version = str(raw.get("schema_version", "0"))
    if version.split(".")[0] != schema_version.split(".")[0]:
        raise ValueError(
            f"{what} {path} has schema_version {version}, this tcsched reads {schema_version}: "
            f"rebuild it with `{command}`"
        )
    return raw
