"""TensorRT engine compatibility (import path ``tcsched.engine_compat``): which GPU and TensorRT release this
machine has, and whether a repository's engines were built for them.

Engine files are valid only on the GPU architecture (compute capability) and the TensorRT release that built
them (TensorRT Developer Guide, "Hardware Compatibility" and "Version Compatibility": by default an engine is
tied to both). Shared by the build (``tcsched.build_tools``, which records the identity in the manifest) and the
server (``tcsched.server``, which refuses a mismatch before starting). ``tensorrt``, ``torch`` and ``pynvml`` are
imported inside the functions: importing this module needs none of them.
"""

from __future__ import annotations

from collections.abc import Callable

from tcsched.manifest import Manifest


def gpu_identity(device: int = 0) -> tuple[str, str, str]:
    """``(gpu_name, compute_capability, tensorrt_version)`` of this machine, e.g.
    ``("NVIDIA H100 80GB HBM3", "9.0", "10.5.0")``.

    The GPU is CUDA device ``device`` as the CUDA runtime numbers it (honouring ``CUDA_VISIBLE_DEVICES``),
    read through torch when installed, else through NVML (``nvidia-ml-py``; NVML numbers all GPUs of the
    machine, so set ``CUDA_VISIBLE_DEVICES`` consistently there). The TensorRT version is the Python
    package's ``tensorrt.__version__``.

    Raises:
        ValueError: ``device`` < 0.
        ImportError: ``tensorrt`` is not installed.
        RuntimeError: no CUDA GPU is visible (or neither torch nor NVML can see one).
    """
    if not isinstance(device, int) or device < 0:
        raise ValueError(f"device must be an int >= 0, got {device!r}")
    import tensorrt as trt

    name = cc = None
    try:
        import torch

        if torch.cuda.is_available() and device < torch.cuda.device_count():
            major, minor = torch.cuda.get_device_capability(device)
            name, cc = torch.cuda.get_device_name(device), f"{major}.{minor}"
    except ImportError:
        pass
    if name is None:
        try:
            import pynvml
        except ImportError:
            raise RuntimeError(
                "cannot identify the GPU: neither torch (with CUDA) nor nvidia-ml-py (pynvml) sees one"
            ) from None
        try:
            pynvml.nvmlInit()
            try:
                handle = pynvml.nvmlDeviceGetHandleByIndex(device)
                raw = pynvml.nvmlDeviceGetName(handle)
                name = raw.decode() if isinstance(raw, bytes) else str(raw)
                major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
                cc = f"{major}.{minor}"
            finally:
                pynvml.nvmlShutdown()
        except pynvml.NVMLError as e:
            raise RuntimeError(f"no CUDA GPU {device} visible to NVML: {e}") from None
    return str(name), str(cc), str(trt.__version__)


def same_tensorrt_version(a: str, b: str) -> bool:
    """Engines load only on the TensorRT release that built them: compare major.minor.patch."""
    return a.split(".")[:3] == b.split(".")[:3]


def check_engine_compatibility(
    manifest: Manifest, identity: Callable[[], tuple[str, str, str]] | None = None
) -> None:
    """Refuse to serve TensorRT engines built for another GPU architecture or TensorRT release.

    No-op for a CPU repository (``manifest.target == "cpu"``). For a GPU one, every variant's
    :class:`~tcsched.manifest.EngineInfo` must name this machine's compute capability and TensorRT
    major.minor.patch (``identity`` defaults to :func:`gpu_identity`).

    Raises:
        RuntimeError: a variant has no engine info; this machine's GPU or TensorRT cannot be identified (no
            tensorrt package, no CUDA GPU); or an engine was built for another compute capability / TensorRT.
            The message says what was found and to rebuild with ``tcsched engines``.
    """
    if manifest.target != "gpu":
        return
    missing = [v.name for v in manifest.variants if v.engine is None]
    if missing:
        raise RuntimeError(
            f"GPU repository without engine info for {missing}: rebuild it with `tcsched engines`"
        )
    first = manifest.variants[0].engine
    assert first is not None
    try:
        gpu_name, cc, trt_version = (identity or gpu_identity)()
    except (ImportError, RuntimeError) as e:
        raise RuntimeError(
            f"this repository holds TensorRT engines built for compute capability {first.compute_capability} / "
            f"TensorRT {first.tensorrt_version} ({first.gpu_name}), but this machine's GPU and TensorRT cannot "
            f"be identified ({e}); serve the CPU repository instead, or rebuild with `tcsched engines` on the GPU"
        ) from None
    for v in manifest.variants:
        e = v.engine
        assert e is not None
        if e.compute_capability != cc or not same_tensorrt_version(e.tensorrt_version, trt_version):
            raise RuntimeError(
                f"engine {e.plan_file} ({v.name}) built for compute capability {e.compute_capability} / "
                f"TensorRT {e.tensorrt_version} ({e.gpu_name}), this machine has compute capability {cc} / "
                f"TensorRT {trt_version} ({gpu_name}); rebuild with `tcsched engines`"
            )
