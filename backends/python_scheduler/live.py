"""Execution scheduling: what the scheduler observes online. Plain Python (numpy), no Triton import.

- :func:`drift_check`: a cheap test of one preprocessed image against the calibration statistics in the manifest.
- :class:`LoadTracker`: requests in flight, an EWMA of each variant's observed BLS time relative to the build's
  profile, and an EWMA of the scheduler's own execute time (the wait a newly arriving request sees).
- :func:`gpu_state`: NVML utilisation and memory when a GPU exists; ``None`` on a CPU (pynvml imported lazily).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import numpy as np

from tcsched.manifest import InputStatistics


@dataclass(frozen=True)
class DriftResult:
    """``out_of_distribution`` with the reason (which statistic, its value, the accepted range)."""

    out_of_distribution: bool
    reason: str = ""


def drift_check(x: np.ndarray, stats: InputStatistics | None, margin: float = 0.5) -> DriftResult:
    """Is one preprocessed image (float32 [3, H, W], ImageNet-normalised) outside the calibration distribution?

    The image's mean and standard deviation over all pixels are compared with the calibration images' ranges
    (``stats.image_mean_range``/``image_std_range``), each widened by ``margin`` times its own width on both
    sides. Very dark, saturated or flat (non-natural) images fall outside. Costs one pass over 150k floats
    (~0.1 ms).
    """
    if stats is None:
        return DriftResult(False)
    m, s = float(x.mean()), float(x.std())
    lo, hi = stats.image_mean_range
    w = (hi - lo) * margin
    if not lo - w <= m <= hi + w:
        return DriftResult(True, f"image mean {m:.2f} outside calibration range [{lo - w:.2f}, {hi + w:.2f}]")
    lo, hi = stats.image_std_range
    w = (hi - lo) * margin
    if not lo - w <= s <= hi + w:
        return DriftResult(
            True, f"image std {s:.2f} outside calibration range [{max(0.0, lo - w):.2f}, {hi + w:.2f}]"
        )
    return DriftResult(False)


@dataclass
class LoadTracker:
    """Thread-safe online load state.

    ``service_ratio[v]``: EWMA of observed BLS ms / the manifest's predicted ms for variant ``v`` (starts at 1):
    corrects the offline profile for the serving process (contention, cache, threads).
    ``execute_ms``: EWMA of the scheduler's own execute duration, the time a request arriving now waits before
    its batch starts (one scheduler instance executes one batch at a time).
    """

    alpha: float = 0.3
    service_ratio: dict[str, float] = field(default_factory=dict)
    observed_ms: dict[str, float] = field(default_factory=dict)
    execute_ms: float = 0.0
    in_flight: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def _ewma(self, old: float | None, new: float) -> float:
        return new if old is None else (1 - self.alpha) * old + self.alpha * new

    def observe_variant(self, variant: str, observed_ms: float, predicted_ms: float | None) -> None:
        with self._lock:
            self.observed_ms[variant] = self._ewma(self.observed_ms.get(variant), observed_ms)
            if predicted_ms and predicted_ms > 0:
                ratio = min(10.0, max(0.1, observed_ms / predicted_ms))
                self.service_ratio[variant] = self._ewma(self.service_ratio.get(variant), ratio)

    def observe_execute(self, ms: float) -> None:
        with self._lock:
            self.execute_ms = self._ewma(self.execute_ms if self.execute_ms else None, ms)

    def ratio(self, variant: str) -> float:
        return self.service_ratio.get(variant, 1.0)

    def begin(self, n: int) -> float:
        with self._lock:
            self.in_flight += n
        return time.perf_counter()

    def end(self, n: int) -> None:
        with self._lock:
            self.in_flight = max(0, self.in_flight - n)


@dataclass(frozen=True)
class GpuState:
    utilization_percent: float
    memory_used_bytes: int
    memory_total_bytes: int


_nvml_failed = False


def gpu_state(index: int = 0) -> GpuState | None:
    """NVML reading of GPU ``index``; ``None`` without a GPU or NVML (never raises)."""
    global _nvml_failed
    if _nvml_failed:
        return None
    try:
        import pynvml

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(index)
        util = pynvml.nvmlDeviceGetUtilizationRates(h)
        mem = pynvml.nvmlDeviceGetMemoryInfo(h)
        return GpuState(float(util.gpu), int(mem.used), int(mem.total))
    except Exception:  # noqa: BLE001 - no GPU, no driver, no pynvml: the CPU case
        _nvml_failed = True
        return None
