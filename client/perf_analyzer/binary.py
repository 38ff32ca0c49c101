"""The perf_analyzer binary (from the ``tritonclient[all]==2.51.0`` wheel): locate it, give it the libraries it
needs, ask its version.

perf_analyzer needs Debian's ``libb64-0d`` and ``libcudart.so.12`` (PyPI ``nvidia-cuda-runtime-cu12``) even on a
CPU-only machine; :func:`perf_analyzer_env` puts the cu12 runtime's ``lib/`` on ``LD_LIBRARY_PATH``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path


class PerfAnalyzerError(RuntimeError):
    """perf_analyzer failed; the message holds its command line and the tail of its output."""


# ----------------------------------------------------------------------------------------------- locating


def find_perf_analyzer() -> Path:
    """The ``perf_analyzer`` binary installed by ``tritonclient[all]`` next to this Python (else on PATH).

    Raises:
        FileNotFoundError: not installed.
    """
    here = Path(sys.executable).parent / "perf_analyzer"
    if here.is_file():
        return here
    found = shutil.which("perf_analyzer")
    if found:
        return Path(found)
    raise FileNotFoundError(
        "perf_analyzer not found: `pip install 'tritonclient[all]==2.51.0'` (it ships the binary)"
    )


def cuda_runtime_lib_dir() -> Path:
    """The ``lib/`` folder with ``libcudart.so.12`` from PyPI's ``nvidia-cuda-runtime-cu12``.

    torch may also install a CUDA 13 runtime (``nvidia/cu13/lib/libcudart.so.13``); perf_analyzer 2.51 links
    against ``libcudart.so.12``, so only a folder holding that exact soname qualifies.

    Raises:
        FileNotFoundError: no ``libcudart.so.12`` in any ``site-packages/nvidia/*/lib``.
    """
    import importlib.util

    spec = importlib.util.find_spec("nvidia")
    roots = [Path(p) for p in (spec.submodule_search_locations or [])] if spec else []
    for root in roots:
        for cand in [root / "cuda_runtime" / "lib", *sorted(root.glob("*/lib"))]:
            if (cand / "libcudart.so.12").exists():
                return cand
    raise FileNotFoundError(
        "libcudart.so.12 not found (perf_analyzer needs it even on CPU): `pip install nvidia-cuda-runtime-cu12`"
    )


def perf_analyzer_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for perf_analyzer: ``LD_LIBRARY_PATH`` starts with the cu12 runtime's ``lib/``."""
    env = dict(os.environ if base is None else base)
    lib = str(cuda_runtime_lib_dir())
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (lib, env.get("LD_LIBRARY_PATH", "")) if p)
    return env


def perf_analyzer_version() -> str:
    """``perf_analyzer --version``, e.g. ``'2.51.0'``.

    Raises:
        PerfAnalyzerError: it does not start (typically: Debian ``libb64-0d`` missing).
    """
    cmd = [str(find_perf_analyzer()), "--version"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=perf_analyzer_env(), timeout=30)
    m = re.search(r"Version\s+(\S+)", p.stdout + p.stderr)
    if p.returncode != 0 or not m:
        hint = " (install Debian's libb64-0d: apt-get install libb64-0d)" if "libb64" in p.stderr else ""
        raise PerfAnalyzerError(f"`{' '.join(cmd)}` failed{hint}:\n{(p.stdout + p.stderr)[-2000:]}")
    return m.group(1)
