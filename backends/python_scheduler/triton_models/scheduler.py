"""Triton Python-backend model ``scheduler``: picks a variant per request and calls it by BLS.

Thin wrapper around ``tcsched.scheduler.service`` (grouping, cascades, fallback, load tracking) and
``tcsched.scheduler.policy`` (the decision rules); both are plain Python, unit-tested without Triton.
Outputs ``LOGITS``, ``VARIANT`` (the name of the variant that answered the row) and ``DECISION`` (JSON: variant,
reason, code, cascade, escalated, confidence margin, threshold, predicted latency, observed BLS time, fallback),
one per batch row. Settings come from this model's config.pbtxt parameters
(``tcsched.settings.SchedulerSettings``, read in one call). Bad request parameters are answered with
INVALID_ARG (HTTP 400 / gRPC INVALID_ARGUMENT). Custom metrics (:class:`_Metrics`, README "Metrics") appear on
Triton's metrics port with the ``tcsched_`` prefix.
"""

import json
import os
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from tcsched import names
from tcsched.manifest import Manifest
from tcsched.scheduler.live import UpstreamProbe, gpu_state, instance_counts
from tcsched.scheduler.policy import RequestError, decision_label_sets
from tcsched.scheduler.service import BatchedEvents, MetricsSnapshot, SchedulerService, VariantUnavailable
from tcsched.settings import SchedulerSettings

#: Histogram buckets of the latency metrics, seconds: 0.5 ms (a TensorRT variant's BLS call) to 2.5 s (an
#: overloaded CPU queue); the CPU variants measured here take 3-60 ms per BLS call (README "Measured here").
LATENCY_BUCKETS_S = (
    0.0005,
    0.001,
    0.002,
    0.003,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.03,
    0.05,
    0.075,
    0.1,
    0.15,
    0.25,
    0.5,
    1.0,
    2.5,
)


class _Metrics:
    """The scheduler's Prometheus metrics through ``pb_utils.MetricFamily`` (python_backend 24.10: COUNTER, GAUGE,
    HISTOGRAM), in base units (seconds, ratios). Fed with summed :class:`MetricsSnapshot` s a few times a second
    by :class:`BatchedEvents`, from its thread: each ``increment``/``observe`` is an IPC call to the server.

    Every label set that the manifest allows exists from the start at zero (so that ``rate()`` and absent-series
    alerts work before the first event): decisions for each (variant, code) of
    :func:`tcsched.scheduler.policy.decision_label_sets`, fallbacks for each ordered pair of variants,
    escalations for each cascade, both histograms for each variant.
    """

    def __init__(self, manifest: Manifest):
        C, H = pb_utils.MetricFamily.COUNTER, pb_utils.MetricFamily.HISTOGRAM
        self.f_decisions = pb_utils.MetricFamily(
            "tcsched_decisions_total", "requests routed, by first variant and decision code (label reason)", C
        )
        self.f_fallbacks = pb_utils.MetricFamily(
            "tcsched_fallbacks_total", "requests served by a fallback variant after from_variant failed", C
        )
        self.f_escalations = pb_utils.MetricFamily(
            "tcsched_escalations_total", "rows re-run on a cascade's next stage, by cascade", C
        )
        self.f_bls = pb_utils.MetricFamily(
            "tcsched_bls_duration_seconds",
            "duration of one BLS call to a variant (its queue, compute, IPC)",
            H,
        )
        self.f_predicted = pb_utils.MetricFamily(
            "tcsched_predicted_latency_seconds",
            "the decision's predicted latency (queue + service), by variant",
            H,
        )
        self._m = {}
        names = [v.name for v in manifest.variants]
        for variant, code in decision_label_sets(manifest):
            self._get(self.f_decisions, variant=variant, reason=code)
        for src in names:
            for dst in names:
                if src != dst:
                    self._get(self.f_fallbacks, from_variant=src, to_variant=dst)
        for c in manifest.cascades:
            self._get(self.f_escalations, cascade=c.label)
        for v in names:
            self._get(self.f_bls, variant=v)
            self._get(self.f_predicted, variant=v)
        self.gpu = None
        if gpu_state() is not None:  # only where NVML sees a GPU
            self.gpu = pb_utils.MetricFamily(
                "tcsched_gpu_utilization", "NVML GPU utilisation, ratio 0-1", pb_utils.MetricFamily.GAUGE
            ).Metric(labels={})

    def _get(self, family, **labels):
        key = (id(family), tuple(sorted(labels.items())))
        if key not in self._m:
            if family is self.f_bls or family is self.f_predicted:
                self._m[key] = family.Metric(labels=labels, buckets=list(LATENCY_BUCKETS_S))
            else:
                self._m[key] = family.Metric(labels=labels)
        return self._m[key]

    def __call__(self, s: MetricsSnapshot) -> None:
        for (variant, code), n in s.decisions.items():
            self._get(self.f_decisions, variant=variant, reason=code).increment(n)
        for (src, dst), n in s.fallbacks.items():
            self._get(self.f_fallbacks, from_variant=src, to_variant=dst).increment(n)
        for cascade, n in s.escalations.items():
            self._get(self.f_escalations, cascade=cascade).increment(n)
        for variant, values in s.bls_ms.items():
            m = self._get(self.f_bls, variant=variant)
            for ms in values:
                m.observe(ms / 1e3)
        for variant, values in s.predicted_ms.items():
            m = self._get(self.f_predicted, variant=variant)
            for ms in values:
                m.observe(ms / 1e3)
        if self.gpu is not None:
            g = gpu_state()
            if g is not None:
                self.gpu.set(g.utilization_percent / 100.0)


class TritonPythonModel:
    def initialize(self, args):
        cfg = json.loads(args["model_config"])
        settings = SchedulerSettings.from_model_config(
            cfg
        )  # ValueError (names the knob) fails the model load
        here = Path(args["model_repository"])
        manifest = Manifest.read((here / settings.manifest_file).resolve())
        self.timeout_us = int(settings.bls_timeout_ms * 1000)
        # metric updates are IPC calls to the server: summed, and flushed from a thread off the request path
        self.events = BatchedEvents(
            _Metrics(manifest), flush_interval_s=settings.metrics_flush_interval_ms / 1e3
        )
        # time already spent in preprocess (its queue + work), read from Triton's own metrics endpoint; the URL:
        # the config's metrics_url, else $TCSCHED_METRICS_URL (set by tcsched serve), else Triton's default port
        upstream = [m.strip() for m in settings.upstream_models.split(",") if m.strip()]
        self.upstream = (
            UpstreamProbe(
                settings.metrics_url
                or os.environ.get("TCSCHED_METRICS_URL")
                or "http://127.0.0.1:8002/metrics",
                upstream,
                interval_s=settings.upstream_probe_interval_ms / 1e3,
            )
            if upstream
            else None
        )
        self.service = SchedulerService.from_settings(
            manifest,
            settings,
            self._infer,
            events=self.events,
            upstream_ms=self.upstream.wait_ms if self.upstream is not None else None,
        )
        # the queue model: each variant's instances from its config (the variants are this model's siblings),
        # and this scheduler's own instances, over which the arrivals are spread
        load = self.service.load
        load.instances = instance_counts(here.parent, [v.name for v in manifest.variants])
        load.scheduler_instances = sum(max(1, g.get("count", 1)) for g in cfg.get("instance_group", [])) or 1
        self.input_name = manifest.input.name
        self.output_name = manifest.output.name

    def _infer(self, variant: str, batch: np.ndarray) -> np.ndarray:
        req = pb_utils.InferenceRequest(
            model_name=variant,
            requested_output_names=[self.output_name],
            inputs=[pb_utils.Tensor(self.input_name, batch)],
            timeout=self.timeout_us,
            # a TensorRT variant may leave its output in GPU memory: ask for it on the CPU
            preferred_memory=pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0),
        )
        resp = req.exec()
        if resp.has_error():
            raise RuntimeError(resp.error().message())
        return pb_utils.get_output_tensor_by_name(resp, self.output_name).as_numpy()

    def execute(self, requests):
        work = []
        for r in requests:
            try:
                params = json.loads(r.parameters() or "{}")
            except ValueError:
                params = {}
            work.append((params, pb_utils.get_input_tensor_by_name(r, names.PIXELS).as_numpy()))
        responses = []
        for result in self.service.handle(work):
            if isinstance(result, Exception):
                # bad parameters are the client's mistake (HTTP 400 / gRPC INVALID_ARGUMENT)
                if isinstance(result, RequestError):
                    code = pb_utils.TritonError.INVALID_ARG
                elif isinstance(result, VariantUnavailable):
                    code = getattr(pb_utils.TritonError, "UNAVAILABLE", pb_utils.TritonError.INTERNAL)
                else:
                    code = pb_utils.TritonError.INTERNAL
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(result), code)))
                continue
            n = len(result.logits)
            variant = np.array([[result.row_variant(i).encode()] for i in range(n)], dtype=np.object_)
            decision = np.array([[d.encode()] for d in result.decision_jsons()], dtype=np.object_)
            responses.append(
                pb_utils.InferenceResponse(
                    [
                        pb_utils.Tensor(names.LOGITS, result.logits),
                        pb_utils.Tensor(names.VARIANT, variant),
                        pb_utils.Tensor(names.DECISION, decision),
                    ]
                )
            )
        return responses

    def finalize(self):
        self.events.close()
        if self.upstream is not None:
            self.upstream.close()
