"""Latency of ONNX graphs on this machine: one engine call (``session.run`` / OpenVINO ``infer``) per call,
variants interleaved, whatever their runtime (:mod:`tcsched.engines`)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx

from tcsched.engines import load_engine

# discarded runs per (variant, batch size) before timing: the first runs of a session allocate and plan
WARMUP_RUNS = 2


def measure_latency(
    models: dict[str, Path],
    batch_sizes: Sequence[int],
    repeats: int,
    threads: int,
    sample: np.ndarray,
    engines: dict[str, tuple[str, str]] | None = None,
) -> dict[str, dict[int, list[float]]]:
    """Wall-clock ms of one engine call per (variant, batch size), variants interleaved round-robin.

    ``engines``: variant name -> (runtime, precision) for :func:`tcsched.engines.load_engine`; a variant not in
    it runs on ONNX Runtime.

    Interleaving (every repeat runs each variant once) puts slow drifts of a shared machine on all variants
    alike, so the ratios are taken side by side. :data:`WARMUP_RUNS` runs per (variant, batch) are discarded.
    ``sample``: float32 [N, 3, H, W], repeated or cut to each batch size. Returns name -> batch -> ms per repeat.
    """
    engines = engines or {}
    sessions = {}
    for n, p in models.items():
        runtime, precision = engines.get(n, ("onnxruntime", "fp32"))
        sessions[n] = load_engine(runtime, p, threads=threads, precision=precision)
    times: dict[str, dict[int, list[float]]] = {n: {b: [] for b in batch_sizes} for n in models}
    for b in batch_sizes:
        x = np.ascontiguousarray(np.resize(sample, (b, *sample.shape[1:])))
        for s in sessions.values():
            for _ in range(WARMUP_RUNS):
                s(x)
        for _ in range(repeats):
            for n, s in sessions.items():
                t0 = time.perf_counter()
                s(x)
                times[n][b].append((time.perf_counter() - t0) * 1e3)
    return times


def candidate_latency_ratio(
    model: onnx.ModelProto,
    reference: Path,
    scratch: Path,
    batch_size: int,
    threads: int,
    sample: np.ndarray,
    repeats: int = 15,
) -> float:
    """Median latency of ``model`` / median latency of the ``reference`` ONNX file, one ``session.run`` of
    ``batch_size`` images each, the two interleaved (:func:`measure_latency`); ``model`` is written to
    ``scratch`` first. Unitless (a ratio of ms)."""
    onnx.save(model, str(scratch))
    t = measure_latency({"ref": reference, "model": scratch}, [batch_size], repeats, threads, sample)
    return float(np.median(t["model"][batch_size]) / np.median(t["ref"][batch_size]))
