"""The bare-runtime lower bound of the bench: a variant's ONNX Runtime session in this process, no server."""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class BarePoint:
    """The variant's ONNX Runtime session in this process, no server: the serving lower bound.

    ``img_per_s`` = images / wall time of back-to-back calls at ``batch_size``; latencies per call, ms.
    """

    variant: str
    batch_size: int
    threads: int
    img_per_s: float
    p50_ms: float
    p99_ms: float
    calls: int
    duration_s: float


def serving_threads(repo: Path, variant: str, default: int = 2) -> int:
    """The variant model's ``intra_op_num_threads`` from its config.pbtxt (what the server runs with)."""
    cfg = repo / variant / "config.pbtxt"
    if cfg.is_file():
        m = re.search(
            r'key:\s*"intra_op_num_threads"\s*value\s*\{\s*string_value:\s*"(\d+)"', cfg.read_text()
        )
        if m and int(m.group(1)) > 0:
            return int(m.group(1))
    return default


def measure_bare(
    classifier,
    tensors: Sequence,
    batch_size: int,
    duration_s: float,
    variant: str = "",
    threads: int = 0,
    warmup_calls: int = 3,
) -> BarePoint:
    """Run ``classifier`` (an ``OrtClassifier``) back to back on batches cycled from ``tensors`` for
    ``duration_s`` seconds after ``warmup_calls`` calls.

    Raises:
        ValueError: ``batch_size`` < 1, ``duration_s`` <= 0 or no tensors.
    """
    import numpy as np

    if batch_size < 1 or duration_s <= 0 or not tensors:
        raise ValueError(f"need batch_size >= 1, duration_s > 0 and tensors (got {batch_size}, {duration_s})")
    n = len(tensors)
    batches = [
        np.ascontiguousarray(np.stack([tensors[(i * batch_size + j) % n] for j in range(batch_size)]))
        for i in range(n)
    ]
    for i in range(warmup_calls):
        classifier(batches[i % n])
    lat = []
    t_start = time.perf_counter()
    i = 0
    while True:
        t0 = time.perf_counter()
        classifier(batches[i % n])
        t1 = time.perf_counter()
        lat.append((t1 - t0) * 1e3)
        i += 1
        if t1 - t_start >= duration_s:
            break
    elapsed = time.perf_counter() - t_start
    return BarePoint(
        variant=variant,
        batch_size=batch_size,
        threads=threads,
        img_per_s=len(lat) * batch_size / elapsed,
        p50_ms=float(np.percentile(lat, 50)),
        p99_ms=float(np.percentile(lat, 99)),
        calls=len(lat),
        duration_s=elapsed,
    )
