"""Prometheus text exposition format, as Triton serves it on its metrics port (import path
``tcsched.prometheus``): shared by the scheduler (upstream time) and the load ramp (pending requests).

Parsing is ``prometheus_client.parser`` (the Prometheus project's own Python client); format:
https://prometheus.io/docs/instrumenting/exposition_formats/. Triton's metrics: docs/user_guide/metrics.md of
triton-inference-server.
"""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client.parser import text_string_to_metric_families


def sum_metric(text: str, name: str, models: Sequence[str] | None) -> float:
    """Sum of the samples named ``name`` whose ``model`` label is in ``models`` (every version);
    ``models=None``: every sample of that name.

    ``text`` is the Prometheus text exposition format that Triton serves on its metrics port, e.g.
    ``nv_inference_request_duration_us{model="preprocess",version="1"} 123``. A missing metric sums to 0.
    Only the lines of ``name`` are parsed (the scheduler scrapes every 200 ms; the whole page is ~10x more).

    Raises:
        ValueError: the lines of ``name`` are not valid exposition format.
    """
    wanted = None if models is None else set(models)
    lines = [
        ln for ln in text.splitlines() if ln.startswith(name) and ln[len(name) : len(name) + 1] in ("{", " ")
    ]
    total = 0.0
    for family in text_string_to_metric_families("\n".join(lines) + "\n"):
        for sample in family.samples:
            if sample.name == name and (wanted is None or sample.labels.get("model") in wanted):
                total += float(sample.value)
    return total
