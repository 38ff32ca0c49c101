"""Triton Python-backend model ``scheduler``: picks a variant per request and calls it by BLS.

Thin wrapper around ``tcsched.scheduler.service`` (grouping, cascades, fallback, load tracking) and
``tcsched.scheduler.policy`` (the decision rules); both are plain Python, unit-tested without Triton.
Outputs ``LOGITS``, ``VARIANT`` (the name of the variant that answered the row) and ``DECISION`` (JSON: variant,
reason, code, cascade, escalated, confidence margin, threshold, predicted latency, observed BLS time, fallback),
one per batch row. Settings come from this model's config.pbtxt parameters
(``tcsched.settings.SchedulerSettings``, read in one call). Bad request parameters are answered with
INVALID_ARG (HTTP 400 / gRPC INVALID_ARGUMENT). Custom metrics appear on Triton's metrics port with the ``tcsched_`` prefix.
"""

import json
import os
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from tcsched import names
from tcsched.manifest import Manifest
from tcsched.scheduler.live import UpstreamProbe, gpu_state
from tcsched.scheduler.policy import RequestError
from tcsched.scheduler.service import BatchedEvents, MetricsSnapshot, SchedulerService, VariantUnavailable
from tcsched.settings import SchedulerSettings


class _Metrics:
    """Prometheus metrics through ``pb_utils.MetricFamily`` (one Metric per label set, created on first use),
    fed with summed :class:`MetricsSnapshot` s a few times a second by :class:`BatchedEvents`."""

    def __init__(self, manifest: Manifest):
        C, G = pb_utils.MetricFamily.COUNTER, pb_utils.MetricFamily.GAUGE
        self.f_decisions = pb_utils.MetricFamily(
            "tcsched_decisions_total", "requests routed, by variant and reason", C
        )
        self.f_fallbacks = pb_utils.MetricFamily(
            "tcsched_fallbacks_total", "requests served by a fallback variant", C
        )
        self.f_observed = pb_utils.MetricFamily(
            "tcsched_observed_latency_ms", "last BLS time of a variant, ms", G
        )
        self.f_predicted = pb_utils.MetricFamily(
            "tcsched_predicted_latency_ms", "last predicted latency, ms", G
        )
        self.f_obs_sum = pb_utils.MetricFamily("tcsched_bls_latency_ms_total", "sum of BLS times, ms", C)
        self.f_bls = pb_utils.MetricFamily("tcsched_bls_calls_total", "BLS calls, by variant", C)
        self.f_gpu = pb_utils.MetricFamily("tcsched_gpu_utilization_percent", "NVML GPU utilisation", G)
        self.f_escalations = pb_utils.MetricFamily(
            "tcsched_escalations_total", "rows re-run on a cascade's next stage, by cascade", C
        )
        self._m = {}
        for (
            c
        ) in manifest.cascades:  # at zero from the start, so that rate() works before the first escalation
            self._get(self.f_escalations, cascade=c.label)

    def _get(self, family, **labels):
        key = (id(family), tuple(sorted(labels.items())))
        if key not in self._m:
            self._m[key] = family.Metric(labels=labels)
        return self._m[key]

    def __call__(self, s: MetricsSnapshot) -> None:
        for (variant, code), n in s.decisions.items():
            self._get(self.f_decisions, variant=variant, reason=code).increment(n)
        for (src, dst), n in s.fallbacks.items():
            self._get(self.f_fallbacks, from_variant=src, to_variant=dst).increment(n)
        for cascade, n in s.escalations.items():
            self._get(self.f_escalations, cascade=cascade).increment(n)
        for variant, n in s.bls_calls.items():
            self._get(self.f_observed, variant=variant).set(s.bls_last_ms[variant])
            self._get(self.f_obs_sum, variant=variant).increment(s.bls_sum_ms[variant])
            self._get(self.f_bls, variant=variant).increment(n)
        for variant, ms in s.predicted_last_ms.items():
            self._get(self.f_predicted, variant=variant).set(ms)
        gpu = gpu_state()
        if gpu is not None:
            self._get(self.f_gpu).set(gpu.utilization_percent)


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
