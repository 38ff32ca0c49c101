"""The GPU path for real: every variant of a real MobileNetV2 build compiled by TensorRT, run, compared.

Skipped at module level without the ``tensorrt`` package or a CUDA GPU (torch is the CUDA check and provides
the I/O buffers). Where both exist: builds the CPU repository (as tests/integration does), converts it with
``tcsched engines``' code, runs each engine on the build's photos and compares its top-1 with ONNX Runtime
running the very ONNX graph it was compiled from.

Not covered here: serving the GPU repository, which needs Triton's TensorRT backend (the official container,
see docker/); the embedded tritonserver of nvidia-pytriton ships only the Python backend.
"""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

trt = pytest.importorskip("tensorrt", reason="TensorRT Python package not installed")
torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU visible", allow_module_level=True)

from rich.console import Console  # noqa: E402

from tcsched.build_tools import gpu_repository as g  # noqa: E402
from tcsched.build_tools import repository as r  # noqa: E402
from tcsched.build_tools import tensorrt_engine as te  # noqa: E402
from tcsched.build_tools.build import SUPPORTED_VARIANTS, BuildConfig, build  # noqa: E402
from tcsched.data import default_photos  # noqa: E402
from tcsched.imaging import preprocess_bytes  # noqa: E402
from tcsched.manifest import Manifest  # noqa: E402
from tcsched.metrics import top1_agreement  # noqa: E402
from tcsched.ort_runtime import OrtClassifier  # noqa: E402

MIN_TOP1_AGREEMENT = 0.9  # engine vs ONNX Runtime on the same graph; fp16/int8 kernels round differently


@pytest.fixture(scope="module")
def built_repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("tcsched-gpu")
    cfg = BuildConfig(
        output=root / "model_repository",
        work_dir=root / "work",
        variants=SUPPORTED_VARIANTS,
        latency_repeats=3,
    )
    build(cfg, Console(quiet=True))
    return cfg.output


@pytest.fixture(scope="module")
def gpu_repo(built_repo, tmp_path_factory):
    root = tmp_path_factory.mktemp("tcsched-engines")
    out = root / "model_repository_gpu"
    g.convert_to_gpu_repository(
        built_repo,
        out,
        cuda_graphs=True,
        timing_cache=root / "timing.cache",
        console=Console(quiet=True),
        latency_repeats=10,
    )
    return out


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.stack([preprocess_bytes(it.read_bytes()) for it in default_photos()]).astype(np.float32)


def test_gpu_identity_names_this_gpu():
    name, cc, version = te.gpu_identity()
    major, minor = torch.cuda.get_device_capability(0)
    assert cc == f"{major}.{minor}" and name == torch.cuda.get_device_name(0) and version == trt.__version__


def test_every_variant_compiles_and_agrees_with_onnxruntime(built_repo, gpu_repo, images):
    cpu = Manifest.read(built_repo / "manifest.json")
    gpu = Manifest.read(gpu_repo / "manifest.json")
    kept = {v.name for v in gpu.variants}
    assert kept >= {v.name for v in cpu.variants if v.precision != "sparse24"}
    mbs = gpu.max_batch_size
    for v in gpu.variants:
        runner = te.EngineRunner(gpu_repo / v.file)
        got = np.concatenate([runner(images[i : i + mbs]) for i in range(0, len(images), mbs)])
        ref = OrtClassifier(built_repo / cpu.variant(v.name).file).predict(images, batch_size=mbs)
        assert got.shape == ref.shape == (len(images), 1000)
        assert np.isfinite(got).all()
        agreement = top1_agreement(ref, got)
        assert agreement >= MIN_TOP1_AGREEMENT, f"{v.name}: top-1 agreement with ONNX Runtime {agreement:.2f}"
    for v in cpu.variants:
        if v.name not in kept:  # only sparse24 may be dropped, and the reason is recorded
            assert v.precision == "sparse24"
            assert any("sparse24 dropped" in n for e in gpu.variants for n in e.build_notes)


def test_gpu_manifest_engines_and_configs(gpu_repo):
    m = Manifest.read(gpu_repo / "manifest.json")
    name, cc, version = te.gpu_identity()
    assert m.target == "gpu"
    g.check_engine_compatibility(m)
    for v in m.variants:
        assert v.runtime == "tensorrt" and v.engine.compute_capability == cc
        assert (
            v.engine.tensorrt_version == version and (gpu_repo / v.engine.builder_log_file).stat().st_size > 0
        )
        assert set(v.latency.p50_ms_by_batch) >= {1, m.max_batch_size}
        assert all(t > 0 for t in v.latency.p50_ms_by_batch.values())
        cfg = r.parse((gpu_repo / v.name / "config.pbtxt").read_text())
        assert cfg.platform == "tensorrt_plan" and dict(cfg.cc_model_filenames) == {cc: "model.plan"}
        if v.precision == "sparse24":
            assert v.engine.sparse_layers_chosen and v.engine.sparse_layers_chosen > 0


def test_mismatched_engine_is_refused(gpu_repo):
    m = Manifest.read(gpu_repo / "manifest.json")
    m.variants[0].engine.compute_capability = "1.0"
    with pytest.raises(RuntimeError, match="rebuild with `tcsched engines`"):
        g.check_engine_compatibility(m)
