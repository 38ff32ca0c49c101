"""Prometheus text exposition format, as Triton serves it on its metrics port (import path
``tcsched.prometheus``): shared by the scheduler (upstream time) and the load ramp (pending requests).

Format: https://prometheus.io/docs/instrumenting/exposition_formats/ (one sample per line,
``name{label="value",...} number``); Triton's metrics: docs/user_guide/metrics.md of triton-inference-server.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_SAMPLE = re.compile(r"^(\w+)\{([^}]*)\}\s+(\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def sum_metric(text: str, name: str, models: Sequence[str] | None) -> float:
    """Sum of the samples of Prometheus metric ``name`` whose ``model`` label is in ``models`` (every version);
    ``models=None``: every sample of the metric.

    ``text`` is the Prometheus text exposition format that Triton serves on its metrics port, e.g.
    ``nv_inference_request_duration_us{model="preprocess",version="1"} 123``. A missing metric sums to 0.
    """
    wanted = None if models is None else set(models)
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        m = _SAMPLE.match(line)
        if m is None or m.group(1) != name:
            continue
        if wanted is None or dict(_LABEL.findall(m.group(2))).get("model") in wanted:
            total += float(m.group(3))
    return total
