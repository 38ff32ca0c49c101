"""EngineRunner / profile_engine / gpu_identity against a FAKE TensorRT runtime and a FAKE CUDA runtime
(tests/unit/fake_gpu.py): no GPU here. What the fakes check is the runner's own logic: torch is never imported,
shapes are set and checked, TensorRT only ever writes into live buffers, copies are inside the timed span.
Real kernels and real timings are in tests/gpu."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from tcsched import engine_compat
from tcsched.build_tools import tensorrt_engine as te
from tests.unit.fake_gpu import FakeCudaRuntime, fake_tensorrt

H2D, D2H = 1, 2


@pytest.fixture
def gpu(monkeypatch, tmp_path):
    """(fake cuda runtime, calls, plan path) with torch made unimportable."""
    cuda, calls = FakeCudaRuntime(), {}
    monkeypatch.setitem(sys.modules, "torch", None)  # any `import torch` raises ImportError
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt("10.5.0", calls, cuda))
    monkeypatch.setattr(te, "cuda_runtime", lambda: cuda)
    monkeypatch.setattr(engine_compat, "cuda_runtime", lambda: cuda)
    plan = tmp_path / "model.plan"
    plan.write_text(json.dumps({"max_batch": 8, "classes": 10}))
    return cuda, calls, plan


def test_runner_runs_in_chunks_of_the_profile_without_torch(gpu):
    cuda, calls, plan = gpu
    x = np.random.default_rng(0).normal(size=(11, 3, 224, 224)).astype(np.float32)
    with te.EngineRunner(plan) as runner:
        assert (runner.max_batch, runner.classes) == (8, 10)
        y = runner(x)
        assert runner(x[:1]).shape == (1, 10)
    expected = np.outer(x.reshape(11, -1).mean(axis=1), np.arange(1, 11))
    assert y.dtype == np.float32 and y.shape == (11, 10)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)
    assert calls["executed"] == 3  # 8 + 3, then 1
    assert [op[:2] for op in cuda.ops if op[0] == "copy"] == [("copy", H2D), ("copy", D2H)] * 3
    with pytest.raises(ValueError, match=r"\[N>=1, 3, 224, 224\]"):
        te.EngineRunner(plan)(x[:, :2])


def test_runner_buffers_live_until_close(gpu):
    cuda, _, plan = gpu
    runner = te.EngineRunner(plan)
    bound = dict(runner.context.addr)
    runner.time_ms(8, repeats=3, warmup=2)
    runner(np.zeros((2, 3, 224, 224), np.float32))
    assert dict(runner.context.addr) == bound  # the same buffers, bound once, never freed in between
    assert set(bound.values()) <= set(cuda.buffers)
    runner.close()
    runner.close()  # idempotent
    assert cuda.buffers == {} and set(bound.values()) <= cuda.freed


def test_refused_or_unexpected_shapes_raise(gpu):
    _, _, plan = gpu
    with te.EngineRunner(plan) as runner:
        for bad in (0, 9, 2.0):
            with pytest.raises(ValueError, match=r"1\.\.8"):
                runner.set_batch(bad)
        runner.context.set_input_shape = lambda name, shape: False  # TensorRT refuses the shape
        with pytest.raises(RuntimeError, match="refused input shape"):
            runner.set_batch(4)
        runner.context.set_input_shape = lambda name, shape: True
        runner.context.get_tensor_shape = lambda name: (8, 10)  # a stale output shape
        with pytest.raises(RuntimeError, match=r"output shape \(8, 10\) for batch 4"):
            runner.set_batch(4)


def test_latency_includes_the_copies(gpu):
    cuda, _, plan = gpu
    with te.EngineRunner(plan) as runner:
        assert runner.time_ms(4, repeats=2, warmup=0) == pytest.approx(
            [0.3, 0.3]
        )  # copy in, execute, copy out
        assert runner.time_ms(4, repeats=2, warmup=0, copies=False) == pytest.approx([0.1, 0.1])
        start = max(i for i, op in enumerate(cuda.ops) if op[0] == "record") - 2
        assert [op[0] for op in cuda.ops[start:]] == ["record", "execute", "record"]
        with pytest.raises(ValueError, match="repeats"):
            runner.time_ms(4, repeats=0)
    lat = te.profile_engine(plan, [8, 1, 8], repeats=3)
    assert sorted(lat) == [1, 8]
    assert lat[1] == te.EngineLatency(
        p50_ms=pytest.approx(0.3), p99_ms=pytest.approx(0.3), compute_p50_ms=pytest.approx(0.1)
    )
    with pytest.raises(ValueError, match=r"1\.\.8"):
        te.profile_engine(plan, [16], repeats=1)
    assert cuda.buffers == {}  # profile_engine closed its runner, also on error


def test_gpu_identity_through_the_cuda_runtime_without_torch(gpu):
    assert te.gpu_identity() == ("NVIDIA Fake GPU", "9.0", "10.5.0")
    with pytest.raises(RuntimeError, match="device 1 requested, 1 visible"):
        te.gpu_identity(1)
