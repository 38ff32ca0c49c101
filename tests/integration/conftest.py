"""Integration tier: a real MobileNetV2 repository built once per session, served by the real tritonserver."""

from pathlib import Path

import pytest
from rich.console import Console

from tcsched.build_tools.build import BuildConfig, build
from tcsched.build_tools.repository import ServingOptions
from tcsched.server import TritonServer
from tests.conftest import SHARED

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def built_repo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tcsched")
    has_labels = (SHARED / "labels.csv").is_file()
    cfg = BuildConfig(
        output=root / "model_repository",
        work_dir=root / "work",
        # labeled sample: its hash split, so that the cascades calibrate on 258 images (their conformal bound needs
        # 99 for a target of 0.99); else scikit-image's 12 photos, which certify no cascade target
        data_dir=SHARED if has_labels else None,
        eval_limit=48 if has_labels else None,
        latency_repeats=5,
        qat_steps=10,  # the default 200 takes ~4.5 min here; 10 runs the same path
        qat_min_images=1,  # calibration here is scikit-image's few photos
        # one preprocess instance (the default is one per core): the tests that batch a bomb with a good image
        # and that kill "the" preprocess stub need a single instance; float32 pixels: the tests call the variants
        # with the normalised tensors of tcsched.imaging (test_pixels.py builds and serves the uint8 default)
        serving=ServingOptions(preprocess_instances=1, pixels="float32"),
    )
    build(cfg, Console(quiet=True))
    return cfg.output


@pytest.fixture(scope="session")
def server(built_repo):
    with TritonServer(built_repo, http_port=0, grpc_port=0, metrics_port=0) as s:
        yield s
        assert s.alive(), "tritonserver died during the tests:\n" + s.log_tail()
