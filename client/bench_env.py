"""What the bench records about the machine and the software (:func:`environment`), and what it checks on a
running server before measuring (:func:`check_server`, :func:`has_models`)."""

from __future__ import annotations

import contextlib
import os
import platform
import sys
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

from tcsched.client.perf_analyzer import perf_analyzer_version


def environment(server_url: str | None = None) -> dict:
    """CPU model, cores, load, and versions of tritonserver, perf_analyzer, onnxruntime, openvino, tcsched and friends."""
    import importlib.metadata as md

    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break

    def ver(dist: str) -> str | None:
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return None

    env = {
        "utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "cpu_model": cpu,
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "loadavg_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "tcsched": ver("tcsched"),
        "onnxruntime": ver("onnxruntime"),
        "openvino": ver("openvino"),
        "tritonclient": ver("tritonclient"),
        "nvidia_pytriton": ver("nvidia-pytriton"),
        "numpy": ver("numpy"),
        "perf_analyzer": None,
        "tritonserver": None,
        "omp_num_threads_server": "1 (tcsched.server.TritonServer default)",
    }
    with contextlib.suppress(Exception):
        env["perf_analyzer"] = perf_analyzer_version()
    if server_url:
        with contextlib.suppress(Exception):
            import tritonclient.grpc as grpcclient

            c = grpcclient.InferenceServerClient(server_url)
            env["tritonserver"] = c.get_server_metadata(as_json=True).get("version")
            c.close()
    return env


# ------------------------------------------------------------------------------------------------- run


def check_server(url: str, models: Sequence[str]) -> None:
    """Check that a Triton server answers gRPC at ``url`` (host:port) and serves every one of ``models``.

    Raises:
        ValueError: no server answering, the server not ready, or models not ready (named in the message).
    """
    import tritonclient.grpc as grpcclient

    try:
        c = grpcclient.InferenceServerClient(url)
        ready = c.is_server_ready()
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"no Triton server answering gRPC at {url}: {e}") from None
    if not ready:
        raise ValueError(f"the Triton server at {url} is not ready")
    missing = [m for m in models if not c.is_model_ready(m)]
    c.close()
    if missing:
        raise ValueError(f"models not ready on the server at {url}: {', '.join(missing)}")


def has_models(url: str, models: Sequence[str]) -> bool:
    """Whether the server at ``url`` (gRPC host:port) has every one of ``models`` ready."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    try:
        return all(client.is_model_ready(m) for m in models)
    finally:
        client.close()
