"""Triton's statistics API (``get_inference_statistics``), read before and after a run: what every model did
in between (:func:`server_statistics`, :func:`statistics_delta`, :func:`variant_usage_delta`)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Literal

Protocol = Literal["grpc", "http"]


@dataclass(frozen=True)
class ModelStats:
    """Cumulative counters of one model from Triton's statistics API (durations in ns, as Triton gives them)."""

    inference_count: int
    execution_count: int
    success_count: int
    fail_count: int
    success_ns: int
    queue_ns: int
    compute_input_ns: int
    compute_infer_ns: int
    compute_output_ns: int


@dataclass(frozen=True)
class StatsDelta:
    """What one model did between two statistics snapshots. Averages per successful request, milliseconds.

    ``inference_count`` counts images (batch elements), ``execution_count`` model executions (batches), so
    ``avg_batch_size`` = inference_count / execution_count shows what dynamic batching achieved.
    """

    inference_count: int
    execution_count: int
    success_count: int
    fail_count: int
    avg_request_ms: float | None
    avg_queue_ms: float | None
    avg_compute_input_ms: float | None
    avg_compute_infer_ms: float | None
    avg_compute_output_ms: float | None

    @property
    def avg_batch_size(self) -> float | None:
        return self.inference_count / self.execution_count if self.execution_count else None


def _grpc_client(url: str, protocol: Protocol):
    if protocol == "grpc":
        import tritonclient.grpc as client_mod
    elif protocol == "http":
        import tritonclient.http as client_mod
    else:
        raise ValueError(f"protocol must be 'grpc' or 'http', got {protocol!r}")
    return client_mod.InferenceServerClient(url)


def server_statistics(url: str, protocol: Protocol = "grpc") -> dict[str, ModelStats]:
    """Cumulative statistics of every loaded model (version-summed), from ``get_inference_statistics()``."""
    c = _grpc_client(url, protocol)
    try:
        js = c.get_inference_statistics(as_json=True) if protocol == "grpc" else c.get_inference_statistics()
    finally:
        c.close()
    out: dict[str, ModelStats] = {}

    def dur(d: Mapping, key: str) -> tuple[int, int]:
        v = d.get(key, {}) or {}
        return int(v.get("count", 0) or 0), int(v.get("ns", 0) or 0)

    for m in js.get("model_stats", []):
        inf = m.get("inference_stats", {}) or {}
        s_count, s_ns = dur(inf, "success")
        f_count, _ = dur(inf, "fail")
        prev = out.get(m["name"])
        cur = ModelStats(
            inference_count=int(m.get("inference_count", 0) or 0),
            execution_count=int(m.get("execution_count", 0) or 0),
            success_count=s_count,
            fail_count=f_count,
            success_ns=s_ns,
            queue_ns=dur(inf, "queue")[1],
            compute_input_ns=dur(inf, "compute_input")[1],
            compute_infer_ns=dur(inf, "compute_infer")[1],
            compute_output_ns=dur(inf, "compute_output")[1],
        )
        if prev is not None:  # several versions: sum them
            cur = ModelStats(
                *(a + b for a, b in zip(asdict(prev).values(), asdict(cur).values(), strict=True))
            )
        out[m["name"]] = cur
    return out


def statistics_delta(
    before: Mapping[str, ModelStats], after: Mapping[str, ModelStats], models: Iterable[str] | None = None
) -> dict[str, StatsDelta]:
    """Per model, the difference ``after - before`` of two :func:`server_statistics` snapshots."""
    names = list(models) if models is not None else sorted(after)
    zero = ModelStats(0, 0, 0, 0, 0, 0, 0, 0, 0)
    out = {}
    for n in names:
        a, b = after.get(n, zero), before.get(n, zero)
        d = ModelStats(*(x - y for x, y in zip(asdict(a).values(), asdict(b).values(), strict=True)))
        per = lambda ns, d=d: ns / d.success_count / 1e6 if d.success_count else None  # noqa: E731
        out[n] = StatsDelta(
            inference_count=d.inference_count,
            execution_count=d.execution_count,
            success_count=d.success_count,
            fail_count=d.fail_count,
            avg_request_ms=per(d.success_ns),
            avg_queue_ms=per(d.queue_ns),
            avg_compute_input_ms=per(d.compute_input_ns),
            avg_compute_infer_ms=per(d.compute_infer_ns),
            avg_compute_output_ms=per(d.compute_output_ns),
        )
    return out


def variant_usage_delta(
    before: Mapping[str, ModelStats], after: Mapping[str, ModelStats], variants: Iterable[str]
) -> dict[str, dict[str, float | int | None]]:
    """Which variants actually served between two snapshots: per variant model, the images
    (``inference_count``), executions (``execution_count``), their share of all images and the average batch.

    Use it around a run through the ensemble: the scheduler calls the variant models by BLS, so their counters
    move exactly by what the scheduler sent them.
    """
    deltas = statistics_delta(before, after, variants)
    total = sum(d.inference_count for d in deltas.values())
    return {
        n: {
            "inference_count": d.inference_count,
            "execution_count": d.execution_count,
            "share": d.inference_count / total if total else 0.0,
            "avg_batch_size": d.avg_batch_size,
        }
        for n, d in deltas.items()
    }
