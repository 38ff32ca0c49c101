"""The TensorRT adapter behind the engine interface, against the FAKE TensorRT and FAKE CUDA runtimes of
tests/unit/fake_gpu.py (no GPU here; real kernels are in tests/gpu): same checks and calls as the CPU engines."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from tcsched import engine_compat
from tcsched.build_tools import tensorrt_engine as te
from tcsched.build_tools.tensorrt_adapter import TensorRTEngine
from tcsched.engines import Engine, InvalidInputError
from tests.unit.fake_gpu import FakeCudaRuntime, fake_tensorrt


@pytest.fixture
def fake_plan(monkeypatch, tmp_path):
    cuda, calls = FakeCudaRuntime(), {}
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt("10.5.0", calls, cuda))
    monkeypatch.setattr(te, "cuda_runtime", lambda: cuda)
    monkeypatch.setattr(engine_compat, "cuda_runtime", lambda: cuda)
    plan = tmp_path / "model.plan"
    plan.write_text(json.dumps({"max_batch": 8, "classes": 10}))
    return plan


def test_tensorrt_adapter_is_an_engine(fake_plan):
    e = TensorRTEngine(fake_plan, precision="int8")
    try:
        assert isinstance(e, Engine)
        x = np.random.default_rng(0).normal(size=(3, 3, 224, 224)).astype(np.float32)
        y = e(x)
        np.testing.assert_allclose(y, e.runner(x), rtol=1e-6)
        assert y.shape == (3, 10) and y.dtype == np.float32
        with pytest.raises(InvalidInputError, match=r"shape \[N, 3, 224, 224\]"):
            e(x[:, :, :100])
        d = e.describe()
        assert (d.runtime, d.version, d.precision, d.threads, d.device) == (
            "tensorrt",
            "10.5.0",
            "int8",
            None,
            "cuda:0",
        )
    finally:
        e.close()
