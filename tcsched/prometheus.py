"""Prometheus text exposition format, as Triton serves it on its metrics port (import path
``tcsched.prometheus``): shared by the scheduler (upstream time) and the load ramp (pending requests).

Parsing is ``prometheus_client.parser`` (the Prometheus project's own Python client); format:
https://prometheus.io/docs/instrumenting/exposition_formats/. Triton's metrics: docs/user_guide/metrics.md of
triton-inference-server.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from collections.abc import Callable, Iterable, Sequence
from functools import cache


@cache
def _text_parser() -> Callable[[str], Iterable]:
    """``prometheus_client.parser.text_string_to_metric_families``.

    The package's ``__init__`` also imports its HTTP exposition (``ssl``, ``wsgiref``) and registers the default
    process and GC collectors, none of which a parser needs; and in the Python-backend stub of nvidia-pytriton
    0.7.0 ``import ssl`` fails on some Python builds (measured here, pyenv 3.11.7: ``_ssl...so: undefined
    symbol: _PyModule_Add``). When the package import fails, the parser module (which needs only
    ``metrics_core``, ``samples`` and ``validation`` of the package) is loaded under a bare package module.

    Raises:
        ImportError: prometheus_client is not installed.
    """
    try:
        from prometheus_client.parser import text_string_to_metric_families

        return text_string_to_metric_families
    except ImportError:
        spec = importlib.util.find_spec("prometheus_client")
        if spec is None or not spec.submodule_search_locations:
            raise
    package = types.ModuleType("prometheus_client")
    package.__path__ = list(spec.submodule_search_locations)
    package.__spec__ = spec
    sys.modules["prometheus_client"] = package
    return importlib.import_module("prometheus_client.parser").text_string_to_metric_families


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
    for family in _text_parser()("\n".join(lines) + "\n"):
        for sample in family.samples:
            if sample.name == name and (wanted is None or sample.labels.get("model") in wanted):
                total += float(sample.value)
    return total
