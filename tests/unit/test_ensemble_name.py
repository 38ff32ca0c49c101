"""A repository whose ensemble is not named ``classifier`` (``tcsched build --ensemble-name``): the bench and ramp
targets, the bench report and the GPU repository conversion follow ``manifest.ensemble``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tcsched.build_tools import gpu_repository as g
from tcsched.build_tools import repository as r
from tcsched.client.bench import bench_targets, ramp_targets
from tcsched.client.bench_report import markdown, write_points_csv
from tcsched.client.bench_results import BenchResult
from tcsched.manifest import Manifest
from tests.helpers import make_manifest, perf_point, tiny_classifier
from tests.unit.fake_gpu import FakeEngines, patch_engines

NAME = "flowers"  # not tcsched.names.ENSEMBLE


def test_bench_and_ramp_targets_call_the_named_ensemble():
    bench = bench_targets(["v32", "v8"], NAME)
    ens = [t for t in bench if t.kind == "ensemble"]
    assert [t.name for t in ens] == ["flowers[v32]", "flowers[v8]", "flowers[scheduler]"]
    assert {t.model for t in ens} == {NAME}
    assert not any("classifier" in t.name or t.model == "classifier" for t in bench)
    ramp = ramp_targets(["v32"], 25.0, NAME, min_agreement=0.99)
    assert [(t.name, t.model) for t in ramp] == [("flowers[budget=25ms]", NAME), ("flowers[v32]", NAME)]
    assert ramp[0].request_parameters == {"min_agreement": 0.99, "latency_budget_ms": 25.0}


@pytest.mark.parametrize("recorded", [True, False])
def test_bench_report_names_the_ensemble_and_reads_its_points(tmp_path, recorded):
    """A run on a ``flowers`` repository: the summary pairs ``v32`` with ``flowers[v32]``, the report names
    ``flowers`` and lists what the ensemble's points were served by; results written before the name was recorded
    read as ``classifier`` (and then find no ensemble point of ``flowers``)."""
    targets = bench_targets(["v32"], NAME, scheduler=True)
    points = [
        perf_point("v32", "v32", {"v32": 40}),
        perf_point("flowers[v32]", NAME, {"v32": 40}),
        perf_point("flowers[scheduler]", NAME, {"v32": 30}),
    ]
    config = {"concurrency": [1], "variants": ["v32"], "pairs": {"v32": ["onnxruntime", "fp32"]}}
    if recorded:
        config["ensemble"] = NAME
    result = BenchResult(config, {}, targets, points, [], [], 1.0)
    assert result.ensemble == (NAME if recorded else "classifier")
    (row,) = result.summary()["by_variant"]
    assert row["ensemble_img_per_s"] == (100.0 if recorded else None)
    md = markdown(result)
    assert (f"Ensemble = `{NAME}`" in md) == recorded
    rows = write_points_csv(result, tmp_path / "points.csv").read_text().splitlines()
    served = [ln for ln in rows if ln.startswith("flowers[scheduler]")]
    assert (json.dumps({"v32": 30}).replace('"', '""') in served[0]) == recorded


def _cpu_repo(root: Path, ensemble: str) -> Path:
    """A CPU repository (a tiny ONNX graph as fp32 and int8; named as the FAKE engines expect) whose ensemble is named ``ensemble``."""
    repo = root / "cpu"
    opts = r.ServingOptions(max_batch_size=8, pixels="float32")  # TensorRT engines take float32 graphs
    onnx_path = tiny_classifier(root / "tiny.onnx")
    for p in ("fp32", "int8"):
        r.write_variant(repo, f"mobilenet_v2_{p}", Path(onnx_path), opts)
    r.write_pipeline(repo, [f"class {i}" for i in range(1000)], opts, ensemble=ensemble)
    specs = {"fp32": ("fp32", 0.0, {1: 5.0, 8: 30.0}), "int8": ("int8", 0.8, {1: 2.0, 8: 12.0})}
    m = make_manifest({f"mobilenet_v2_{p}": s for p, s in specs.items()})
    Manifest.model_validate(m.model_dump() | {"ensemble": ensemble}).write(repo / "manifest.json")
    return repo


def test_gpu_repository_copies_the_named_ensemble_mocked_tensorrt(tmp_path, monkeypatch):
    cpu = _cpu_repo(tmp_path, NAME)
    assert not (cpu / "classifier").exists()
    patch_engines(monkeypatch, FakeEngines({"fp32": 1.0, "int8": 0.4}))
    out = tmp_path / "gpu"
    m = g.convert_to_gpu_repository(cpu, out, timing_cache=tmp_path / "t.cache", latency_repeats=3)
    assert m.ensemble == NAME and Manifest.read(out / "manifest.json").ensemble == NAME
    assert not (out / "classifier").exists()
    for d in ("preprocess", "scheduler", NAME):  # the pipeline, unchanged
        files = [f for f in (cpu / d).rglob("*") if f.is_file() and "__pycache__" not in f.parts]
        assert files
        for f in files:
            assert (out / f.relative_to(cpu)).read_bytes() == f.read_bytes()
    assert r.parse((out / NAME / "config.pbtxt").read_text()).name == NAME


def test_gpu_repository_refuses_a_repository_without_the_manifests_ensemble(tmp_path, monkeypatch):
    """The manifest names ``flowers`` but the folder holds ``classifier``: refused before any engine, naming it."""
    cpu = _cpu_repo(tmp_path, "classifier")
    m = Manifest.read(cpu / "manifest.json")
    Manifest.model_validate(m.model_dump() | {"ensemble": NAME}).write(cpu / "manifest.json")
    fake = FakeEngines({"fp32": 1.0, "int8": 0.4})
    patch_engines(monkeypatch, fake)
    with pytest.raises(ValueError, match=f"lacks the '{NAME}' model"):
        g.convert_to_gpu_repository(cpu, tmp_path / "gpu", timing_cache=tmp_path / "t.cache")
    assert fake.builds == [] and not (tmp_path / "gpu").exists()
