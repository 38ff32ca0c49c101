"""The scheduler's serving settings: one typed contract, one default per knob (import path ``tcsched.settings``).

``tcsched build`` writes a :class:`SchedulerSettings` into the ``parameters`` of the scheduler's config.pbtxt with
:meth:`SchedulerSettings.to_parameters` (``tcsched.build_tools.repository``); the scheduler's ``initialize`` reads
them back in one call with :meth:`SchedulerSettings.from_parameters`, validated: a bad value fails the model load
with the knob's name. An operator may edit the values in config.pbtxt; a knob left out takes the default here.
Units are in the names (``_ms``, ``_s``, ``_points``); fractions are in [0, 1]. The pattern follows PyTriton's
``pytriton/model_config`` (one typed config with a matching writer and reader).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tcsched import names

ObjectiveSetting = Literal["", "min_latency", "max_accuracy"]


class SchedulerSettings(BaseModel):
    """Knobs of the scheduler model; the per-request parameters override the ``default_*`` ones."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    manifest_file: str = Field(
        default="../manifest.json", description="manifest path, relative to the model folder"
    )
    default_min_agreement: float | None = Field(
        default=0.99,
        gt=0,
        le=1,
        description="target top-1 agreement with fp32 of the confidence cascade when a request sets none; "
        "None: no cascade unless the request asks for one",
    )
    default_accuracy_budget_points: float = Field(
        default=1.0, ge=0, description="max top-1 drop vs fp32 (points) of a single-variant choice"
    )
    default_latency_budget_ms: float | None = Field(default=None, gt=0, description="None: no latency budget")
    default_objective: ObjectiveSetting = Field(
        default="", description="'': max_accuracy with a latency budget, else min_latency"
    )
    latency_headroom: float = Field(
        default=0.7,
        gt=0,
        le=1,
        description="a plan fits a latency budget when its predicted latency is at most this fraction of it: the "
        "prediction covers the scheduler's queue and the variants, not the client's network and the ensemble "
        "hops (measured on 2 shared cores: ~0.3 of the end-to-end time under load)",
    )
    max_utilization: float = Field(
        default=0.8,
        gt=0,
        lt=1,
        description="above it a variant is taken as unable to keep up with the arrivals",
    )
    arrival_window_ms: float = Field(default=500.0, gt=0, description="the arrival rate is over this window")
    latency_ewma_alpha: float = Field(default=0.3, gt=0, le=1, description="weight of a new BLS observation")
    offset_ttl_s: float = Field(
        default=2.0, gt=0, description="a variant's own latency offset expires this long after it last served"
    )
    bls_timeout_ms: float = Field(default=10_000.0, gt=0, description="timeout of one BLS call")
    unhealthy_cooldown_s: float = Field(
        default=30.0, ge=0, description="a failed variant is avoided this long"
    )
    max_attempts: int = Field(default=2, ge=1, description="plans tried per request group (1 + fallbacks)")
    metrics_flush_interval_ms: float = Field(
        default=250.0, gt=0, description="custom metrics are summed in memory and pushed this often (IPC)"
    )
    upstream_models: str = Field(
        default=names.PREPROCESS,
        description="comma-separated models before the scheduler whose time (queue + work, from Triton's "
        "metrics) counts against the latency budget; '' for none",
    )
    metrics_url: str = Field(
        default="",
        description="Triton metrics URL; '': $TCSCHED_METRICS_URL, else http://127.0.0.1:8002/metrics",
    )
    upstream_probe_interval_ms: float = Field(default=200.0, gt=0, description="how often the probe scrapes")

    def to_parameters(self) -> dict[str, str]:
        """The settings as config.pbtxt ``parameters`` (``string_value`` each; ``None`` as ``''``)."""
        return {k: "" if v is None else str(v) for k, v in self.model_dump().items()}

    @classmethod
    def from_parameters(cls, params: Mapping[str, str]) -> SchedulerSettings:
        """Read the settings back from config.pbtxt parameters (``{name: string_value}``).

        ``''`` means ``None`` for the optional knobs and the default for the others; a missing knob takes its
        default.

        Raises:
            ValueError: an unknown knob, or a value of the wrong type or out of range; the message names it.
        """
        unknown = sorted(set(params) - set(cls.model_fields))
        if unknown:
            raise ValueError(f"unknown scheduler parameter(s) {unknown}; known: {sorted(cls.model_fields)}")
        values: dict[str, object] = {}
        for k, v in params.items():
            optional = cls.model_fields[k].default is None or k in _OPTIONAL
            if v == "" and optional:
                values[k] = None
            elif v == "" and cls.model_fields[k].annotation is not str:
                continue
            else:
                values[k] = v
        try:
            return cls.model_validate(values)
        except ValidationError as e:
            bad = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
            raise ValueError(f"invalid scheduler parameter(s): {bad}") from None

    @classmethod
    def from_model_config(cls, model_config: Mapping) -> SchedulerSettings:
        """From the JSON model config Triton hands to ``initialize`` (``args['model_config']``, parsed).

        Raises:
            ValueError: see :meth:`from_parameters`.
        """
        params = model_config.get("parameters", {}) or {}
        return cls.from_parameters({k: v.get("string_value", "") for k, v in params.items()})


_OPTIONAL = frozenset(
    k for k, f in SchedulerSettings.model_fields.items() if f.default is None or "None" in str(f.annotation)
)
DEFAULTS = SchedulerSettings()
