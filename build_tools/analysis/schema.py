"""The report schema: ``analysis.json`` as pydantic models (schema-versioned, infinities kept as JSON
``Infinity``), with atomic write and validated read."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from tcsched.build_tools.analysis.geometry import LayerKind
from tcsched.build_tools.analysis.rules import Sparse24Outcome, Sparse24Verdict, Verdict
from tcsched.jsonio import atomic_write_text
from tcsched.manifest import read_versioned_json

SCHEMA_VERSION = "1.0"
ANALYSIS_FILENAME = "analysis.json"
PLOT_FILENAME = "analysis.png"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="constants")


class VerdictModel(_Model):
    """A rule's verdict in the report."""

    ok: bool
    reason: str

    @classmethod
    def of(cls, v: Verdict) -> VerdictModel:
        return cls(ok=v.ok, reason=v.reason)


class Sparse24Model(VerdictModel):
    """2:4 verdict: ``ok`` only for ``outcome == 'eligible'`` (see :class:`Sparse24Verdict`)."""

    outcome: Sparse24Outcome

    @classmethod
    def of(cls, v: Sparse24Verdict) -> Sparse24Model:  # type: ignore[override]
        return cls(ok=v.ok, reason=v.reason, outcome=v.outcome)


def verdict_model(v: Verdict) -> VerdictModel:
    """The report model of any rule's verdict (:class:`Sparse24Model` for a :class:`Sparse24Verdict`)."""
    return Sparse24Model.of(v) if isinstance(v, Sparse24Verdict) else VerdictModel.of(v)


class Int8Sensitivity(_Model):
    """Error added by this layer alone in INT8 (every other layer fp32), on the calibration images."""

    top1_agreement: float = Field(ge=0, le=1, description="fraction of images whose final top-1 matches fp32")
    kl: float = Field(description="mean KL(softmax(fp32 logits) || softmax(logits)), nats")
    output_sqnr_db: float = Field(description="SQNR of this layer's output vs fp32, dB (inf when equal)")


class LayerReport(_Model):
    """One Conv/Gemm layer. Units are in the names; MACs and params are per image / per layer."""

    index: int = Field(description="position among the analysed layers, in graph order")
    name: str = Field(description="ONNX node name")
    op_type: Literal["Conv", "Gemm"]
    kind: LayerKind
    input_name: str
    output_name: str
    weight_name: str
    weight_shape: list[int]
    in_channels: int
    out_channels: int
    groups: int
    kernel: list[int]
    stride: list[int]
    output_shape: list[int | str] = Field(description="shape of the output, batch dimension symbolic")
    macs: int = Field(ge=0, description="multiply-accumulates per image")
    params: int = Field(ge=0, description="weight + bias elements")
    weight_absmax_per_channel_min: float = Field(description="min over output channels of max |w|")
    weight_absmax_per_channel_max: float = Field(description="max over output channels of max |w|")
    input_activation_min: float = Field(description="min of the input activation on the calibration images")
    input_activation_max: float
    fp16_aligned: VerdictModel
    int8_aligned: VerdictModel
    sparse24_eligible: Sparse24Model
    sparsity: float = Field(ge=0, le=1, description="fraction of weights exactly 0")
    is_2to4_sparse: bool
    int8_sensitivity: Int8Sensitivity
    prune24_sqnr_db: float | None = Field(
        default=None,
        description="SQNR (dB) of this layer's output when only its weight is 2:4-pruned by magnitude; None "
        "when the weight cannot take the pattern",
    )


class AnalysisTotals(_Model):
    n_layers: int
    macs: int = Field(description="per image, over the analysed layers")
    params: int
    n_fp16_aligned: int
    n_int8_aligned: int
    n_sparse24_eligible: int
    n_sparse24_no_speedup: int
    n_sparse24_not_eligible: int
    macs_sparse24_eligible: int = Field(description="per image, in the 'eligible' layers")

    @classmethod
    def of(cls, layers: Sequence[LayerReport]) -> AnalysisTotals:
        """The totals over ``layers``."""
        outcome = [lay.sparse24_eligible.outcome for lay in layers]
        return cls(
            n_layers=len(layers),
            macs=sum(lay.macs for lay in layers),
            params=sum(lay.params for lay in layers),
            n_fp16_aligned=sum(lay.fp16_aligned.ok for lay in layers),
            n_int8_aligned=sum(lay.int8_aligned.ok for lay in layers),
            n_sparse24_eligible=outcome.count("eligible"),
            n_sparse24_no_speedup=outcome.count("eligible_no_speedup"),
            n_sparse24_not_eligible=outcome.count("not_eligible"),
            macs_sparse24_eligible=sum(
                lay.macs for lay in layers if lay.sparse24_eligible.outcome == "eligible"
            ),
        )


class AnalysisReport(_Model):
    """``analysis.json``: the per-layer analysis of one ONNX model (schema-versioned)."""

    schema_version: str = SCHEMA_VERSION
    created_utc: str = Field(
        default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    model_path: str
    input_name: str
    input_shape: list[int | str]
    n_calibration_images: int
    activation_range_method: str = "minmax"
    quantization: str = (
        "one layer at a time: input uint8 asymmetric per tensor (calibration min/max), weight int8 symmetric per "
        "output channel, QDQ in ONNX Runtime"
    )
    onnxruntime_version: str = ""
    threads: int = 2
    wall_time_s: float = Field(ge=0, description="wall time of analyze(), seconds")
    layers: list[LayerReport]
    totals: AnalysisTotals

    def write(self, path: str | os.PathLike) -> Path:
        """Write atomically as JSON (:func:`tcsched.jsonio.atomic_write_text`); creates the folder."""
        return atomic_write_text(path, self.model_dump_json(indent=2))

    @classmethod
    def read(cls, path: str | os.PathLike) -> AnalysisReport:
        """Read and validate.

        Raises:
            FileNotFoundError: no file at ``path``.
            ValueError: another schema major version, or invalid content.
        """
        return cls.model_validate(read_versioned_json(path, SCHEMA_VERSION, "analysis", "tcsched analyze"))

    def layer(self, name: str) -> LayerReport:
        """The layer with ONNX node name ``name``.

        Raises:
            KeyError: no such layer.
        """
        for lay in self.layers:
            if lay.name == name:
                return lay
        raise KeyError(name)
