"""TensorRT engine compatibility (import path ``tcsched.engine_compat``): which GPU and TensorRT release this
machine has, and whether a repository's engines were built for them.

Engine files are valid only on the GPU architecture (compute capability) and the TensorRT release that built
them (TensorRT Developer Guide, "Hardware Compatibility" and "Version Compatibility": by default an engine is
tied to both). Shared by the build (``tcsched.build_tools``, which records the identity in the manifest) and the
server (``tcsched.server``, which refuses a mismatch before starting). ``tensorrt``, cuda-python and ``pynvml`` are
imported inside the functions: importing this module needs none of them.
"""

from __future__ import annotations

from collections.abc import Callable

from tcsched.manifest import Manifest


def cuda_runtime():
    """The CUDA runtime API of cuda-python: ``cuda.bindings.runtime`` (cuda-python >= 12.6.1, as TensorRT 10.13's
    and 11.1's samples/python/common_runtime.py import it), else the older ``cuda.cudart`` (TensorRT 10.5's
    samples). Every call returns ``(cudaError_t, *values)``.

    Raises:
        ImportError: cuda-python is not installed (``pip install 'cuda-python>=12.6,<13'`` for CUDA 12 drivers).
    """
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime
        except ImportError:
            raise ImportError(
                "cuda-python is not installed (the CUDA runtime API that runs TensorRT engines): "
                "pip install 'cuda-python>=12.6,<13'"
            ) from None
    return runtime


def cuda_check(result, what: str):
    """The values of a cuda-python call's ``(cudaError_t, *values)`` result: none -> None, one -> it, more -> a
    tuple.

    Raises:
        RuntimeError: the error code is not ``cudaSuccess`` (0); the message names ``what`` and the error.
    """
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RuntimeError(f"{what} failed: {getattr(err, 'name', err)}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def _identity_cuda(device: int) -> tuple[str, str] | None:
    """(name, compute capability) of CUDA device ``device`` through cuda-python, or None without cuda-python.

    Raises:
        RuntimeError: cuda-python is there but sees no such GPU (no driver, no device, index out of range).
    """
    try:
        rt = cuda_runtime()
    except ImportError:
        return None
    count = cuda_check(rt.cudaGetDeviceCount(), "cudaGetDeviceCount (is an NVIDIA driver and GPU visible?)")
    if device >= count:
        raise RuntimeError(f"CUDA device {device} requested, {count} visible (CUDA_VISIBLE_DEVICES)")
    prop = cuda_check(rt.cudaGetDeviceProperties(device), f"cudaGetDeviceProperties({device})")
    raw = prop.name
    name = raw.split(b"\0", 1)[0].decode() if isinstance(raw, bytes) else str(raw)
    return name, f"{prop.major}.{prop.minor}"


def _identity_nvml(device: int) -> tuple[str, str]:
    """(name, compute capability) of GPU ``device`` through NVML (nvidia-ml-py), which numbers all GPUs of the
    machine regardless of CUDA_VISIBLE_DEVICES.

    Raises:
        RuntimeError: no nvidia-ml-py, or NVML sees no such GPU.
    """
    try:
        import pynvml
    except ImportError:
        raise RuntimeError(
            "cannot identify the GPU: neither cuda-python nor nvidia-ml-py (pynvml) is installed"
        ) from None
    try:
        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(device)
            raw = pynvml.nvmlDeviceGetName(handle)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
        finally:
            pynvml.nvmlShutdown()
    except pynvml.NVMLError as e:
        raise RuntimeError(f"no CUDA GPU {device} visible to NVML: {e}") from None
    return (raw.decode() if isinstance(raw, bytes) else str(raw)), f"{major}.{minor}"


def gpu_identity(device: int = 0) -> tuple[str, str, str]:
    """``(gpu_name, compute_capability, tensorrt_version)`` of this machine, e.g.
    ``("NVIDIA H100 80GB HBM3", "9.0", "10.5.0")``.

    The GPU is CUDA device ``device`` as the CUDA runtime numbers it (honouring ``CUDA_VISIBLE_DEVICES``), read
    through cuda-python (:func:`cuda_runtime`, the same API that runs the engines), else through NVML
    (``nvidia-ml-py``; NVML numbers all GPUs of the machine, so set ``CUDA_VISIBLE_DEVICES`` consistently
    there). The TensorRT version is the Python package's ``tensorrt.__version__``. torch is never needed.

    Raises:
        ValueError: ``device`` < 0.
        ImportError: ``tensorrt`` is not installed.
        RuntimeError: no CUDA GPU is visible (or neither cuda-python nor NVML is installed).
    """
    if not isinstance(device, int) or device < 0:
        raise ValueError(f"device must be an int >= 0, got {device!r}")
    import tensorrt as trt

    found = _identity_cuda(device)
    name, cc = found if found is not None else _identity_nvml(device)
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
