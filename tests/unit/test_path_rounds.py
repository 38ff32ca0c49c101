"""Today's path served beside the repository (``preprocess_exact`` + ``<ensemble>_exact_path``, written from the
repository's own configs), the path rounds' targets and their summary and report table."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from tritonclient.grpc import model_config_pb2 as mc

from tcsched.build_tools import repository as r
from tcsched.client.bench_report import markdown, paths_table
from tcsched.client.bench_results import BenchConfig, BenchResult
from tcsched.client.pipelines import preprocess_setup, write_exact_path, write_pipelines
from tcsched.client.targets import path_targets
from tests.helpers import perf_point

LABELS = [f"class {i}" for i in range(10)]


@pytest.fixture
def repo(tmp_path):
    """A repository's serving models as ``tcsched build`` writes them (fast preprocessing, 2 instances)."""
    root = tmp_path / "repo"
    # float32 pixels: the exact path of a uint8 repository also needs its manifest (tests/integration/test_pixels.py)
    opts = r.ServingOptions(
        max_batch_size=4, preprocess_instances=2, preprocess_method="fast", pixels="float32"
    )
    r.write_pipeline(root, LABELS, opts, ensemble="flowers")
    return root


def _config(folder) -> mc.ModelConfig:
    return r.parse((folder / "config.pbtxt").read_text())


def test_exact_path_is_the_repository_ensemble_with_exact_preprocessing(repo, tmp_path):
    out = tmp_path / "overlay"
    assert write_exact_path(out, repo, "flowers") == ("preprocess_exact", "flowers_exact_path")
    pre, orig_pre = _config(out / "preprocess_exact"), _config(repo / "preprocess")
    assert pre.name == "preprocess_exact" and pre.backend == "python"
    assert [(g.count, g.kind) for g in pre.instance_group] == [(1, mc.ModelInstanceGroup.KIND_CPU)]
    assert pre.parameters["preprocess_method"].string_value == "exact"
    assert preprocess_setup(out / "preprocess_exact") == {"method": "exact", "instances": 1}
    assert preprocess_setup(repo / "preprocess") == {"method": "fast", "instances": 2}
    # everything else as the repository's: spec, tensors, batching, the model's code
    assert pre.parameters["preprocessing"] == orig_pre.parameters["preprocessing"]
    assert (pre.input, pre.output, pre.max_batch_size) == (
        orig_pre.input,
        orig_pre.output,
        orig_pre.max_batch_size,
    )
    code = (out / "preprocess_exact" / "1" / "model.py").read_text()
    assert code == (repo / "preprocess" / "1" / "model.py").read_text()
    ens, orig = _config(out / "flowers_exact_path"), _config(repo / "flowers")
    assert ens.name == "flowers_exact_path" and ens.platform == "ensemble"
    steps = list(ens.ensemble_scheduling.step)
    assert [s.model_name for s in steps] == ["preprocess_exact", "scheduler"]
    assert steps[0].input_map == orig.ensemble_scheduling.step[0].input_map
    assert (ens.input, ens.output) == (orig.input, orig.output)
    assert (out / "flowers_exact_path" / "labels.txt").read_text() == (
        repo / "flowers" / "labels.txt"
    ).read_text()
    # the repository itself is untouched
    assert (
        _config(repo / "preprocess").name == "preprocess"
        and preprocess_setup(repo / "preprocess")["instances"] == 2
    )


def test_write_pipelines_adds_the_exact_path_only_with_the_repository(repo, tmp_path):
    manifest = SimpleNamespace(
        max_batch_size=4,
        ensemble="flowers",
        input=SimpleNamespace(name="input"),
        output=SimpleNamespace(name="logits", shape=[-1, 10]),
    )
    out = write_pipelines(tmp_path / "o", manifest, ["v8"], repo=repo)
    assert sorted(p.name for p in out.iterdir()) == ["flowers_exact_path", "pipeline_v8", "preprocess_exact"]
    for cfg_file in out.glob("*/config.pbtxt"):
        r.parse(cfg_file.read_text())  # every config a valid ModelConfig
    out = write_pipelines(tmp_path / "o", manifest, ["v8"])
    assert sorted(p.name for p in out.iterdir()) == ["pipeline_v8"]


def test_exact_path_needs_a_preprocess_step(repo, tmp_path):
    cfg = _config(repo / "flowers")
    cfg.ensemble_scheduling.step[0].model_name = "other"
    (repo / "flowers" / "config.pbtxt").write_text(r.render(cfg))
    with pytest.raises(ValueError, match="no ensemble step calls 'preprocess'"):
        write_exact_path(tmp_path / "o", repo, "flowers")


def _point(target: str, model: str, ips: float, served: dict[str, int]):
    return perf_point(target, model, served, ips=ips, load=8)


def test_path_summary_pairs_rounds_with_todays_path():
    targets = path_targets("classifier", "v8", "v8ov")
    assert [(t.name, t.model, t.request_parameters) for t in targets] == [
        ("classifier_exact_path[v8]", "classifier_exact_path", {"variant": "v8"}),
        ("classifier[scheduler]", "classifier", {}),
        ("classifier[v8ov]", "classifier", {"variant": "v8ov"}),
    ]
    today = [100.0, 80.0, 120.0]
    points = []
    for r_, base in enumerate(today):
        points.append(
            _point(f"{targets[0].name}#path{r_}", targets[0].model, base, {"v8": 40, "preprocess_exact": 40})
        )
        points.append(_point(f"{targets[1].name}#path{r_}", "classifier", 1.5 * base, {"v8ov": 30}))
        points.append(_point(f"{targets[2].name}#path{r_}", "classifier", 2.0 * base, {"v8ov": 30}))
    config = {
        "repository_variants": ["v8", "v8ov"],
        "preprocess": {
            "default": {"method": "fast", "instances": 2},
            "today": {"method": "exact", "instances": 1},
        },
        "concurrency": [8],
    }
    result = BenchResult(config, {}, [], [], [], [], 1.0, path_targets=targets, path_points=points)
    rows = result.path_summary()
    assert [row["path"] for row in rows] == ["today", "default", "fastest"]
    assert rows[0]["over_today"]["ratio"] == pytest.approx(1.0)
    # every round 1.5x / 2x today's: the ratio and both ends of the paired interval
    for row, k in zip(rows[1:], (1.5, 2.0), strict=True):
        o = row["over_today"]
        assert (o["ratio"], o["low"], o["high"]) == pytest.approx((k, k, k))
        assert row["rounds"] == 3 and row["concurrency"] == 8
    assert rows[0]["served"] == {"v8": 120} and rows[1]["served"] == {"v8ov": 90}
    table = paths_table(result)
    assert table[0].startswith(
        "## Paths through the ensemble (JPEG in) at concurrency 8, interleaved (3 rounds)"
    )
    assert "| today | classifier_exact_path[v8] | exact, 1 inst. |" in table[4]
    assert "| 1.50 [1.50, 1.50] |" in table[5] and "fast, 2 inst." in table[5]
    assert "Today's path" in markdown(result)
    assert result.as_dict()["paths"] == rows


def test_one_round_gives_the_ratio_without_interval_and_none_is_no_table():
    targets = path_targets("classifier", "v8", "v8")
    points = [_point(f"{t.name}#path0", t.model, 100.0 * (i + 1), {}) for i, t in enumerate(targets)]
    result = BenchResult({}, {}, [], [], [], [], 1.0, path_targets=targets, path_points=points)
    o = result.path_summary()[2]["over_today"]
    assert o == {"ratio": pytest.approx(3.0), "low": None, "high": None}
    assert "| 3.00 |" in paths_table(result)[6]
    assert paths_table(BenchResult({}, {}, [], [], [], [], 1.0)) == []


def test_path_rounds_option(tmp_path):
    (tmp_path / "manifest.json").write_text("{}")
    assert BenchConfig(repo=tmp_path).path_rounds == 4
    BenchConfig(repo=tmp_path, path_rounds=1).validate()
    with pytest.raises(ValueError, match="path_rounds"):
        BenchConfig(repo=tmp_path, path_rounds=-1).validate()
