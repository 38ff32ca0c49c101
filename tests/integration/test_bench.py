"""The bench against the real tritonserver with the real perf_analyzer: short runs, parsed into result types."""

from pathlib import Path

import pytest

from tcsched.client.bench import (
    BenchConfig,
    make_input_data,
    pick_images,
    run_bench,
)
from tcsched.client.bench_report import write_report
from tcsched.client.perf_analyzer import (
    PerfPoint,
    ProfileExperiment,
    run_perf_analyzer,
    server_statistics,
    variant_usage_delta,
    within_budget_share,
)
from tests.conftest import SHARED

pytestmark = pytest.mark.integration

FP32 = "mobilenet_v2_fp32"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def input_data(tmp_path_factory):
    items = pick_images(SHARED if (SHARED / "labels.csv").is_file() else None, 4)
    return make_input_data(items, tmp_path_factory.mktemp("bench_input"))


def test_perf_analyzer_point_with_profile_and_usage(server, built_repo, input_data, tmp_path):
    variants = ["mobilenet_v2_fp32", "mobilenet_v2_int8"]
    before = server_statistics(server.grpc_url)
    p = run_perf_analyzer(
        "classifier",
        server.grpc_url,
        input_data=input_data.ensemble_json,
        concurrency=2,
        request_parameters={"variant": "int8"},
        measurement_interval_ms=800,
        stability_percentage=50,
        max_trials=4,
        profile_export=True,
        work_dir=tmp_path,
    )
    after = server_statistics(server.grpc_url)
    assert isinstance(p, PerfPoint) and p.mode == "concurrency" and p.load == 2
    assert p.throughput_infer_per_s > 0 and 0 < p.p50_ms <= p.p99_ms
    assert set(p.composing) == {"preprocess", "scheduler"} and p.server.queue_ms > 0
    assert isinstance(p.profile, ProfileExperiment)
    measured = p.profile.measured()
    assert measured and p.profile.output_counts("VARIANT") == {"mobilenet_v2_int8": len(measured)}
    assert 0.0 <= within_budget_share(p.profile, p.p50_ms) <= 1.0
    assert within_budget_share(p.profile, 1e6) == 1.0
    usage = variant_usage_delta(before, after, variants)
    assert usage["mobilenet_v2_int8"]["inference_count"] >= len(measured)
    assert usage["mobilenet_v2_fp32"]["inference_count"] == 0
    assert p.server_stats["classifier"].success_count >= len(measured)


def test_short_bench_writes_report_and_plots(server, built_repo, tmp_path):
    cfg = BenchConfig(
        repo=built_repo,
        output=tmp_path / "bench",
        url=server.grpc_url,
        data_dir=SHARED if (SHARED / "labels.csv").is_file() else None,
        n_images=4,
        variants=(FP32,),
        scheduler=False,
        concurrency=(1, 2),
        rate_fractions=(0.5,),
        measurement_interval_ms=700,
        stability_percentage=50.0,
        max_trials=4,
        warmup=True,
        overhead_rounds=0,
        pair_rounds=2,
    )
    result = run_bench(cfg, log=lambda s: None)
    assert not result.errors, result.errors
    # the interleaved direct rounds at the highest concurrency, with what the dynamic batcher formed
    assert [(p.model, p.load) for p in result.pair_points] == [(FP32, 2.0), (FP32, 2.0)]
    (pair,) = result.pair_summary()
    assert pair["rounds"] == 2 and pair["median_img_per_s"] > 0 and 1.0 <= pair["avg_batch"] <= 2.0
    assert pair["over_ort_int8"] is None  # the ONNX Runtime int8 variant was not measured
    targets = {p.target for p in result.points}
    assert targets == {FP32, f"classifier[{FP32}]", f"scheduler[{FP32}]"}
    sched = result.point(f"scheduler[{FP32}]", "concurrency", 1)
    assert sched is not None and sched.p50_ms > 0  # the scheduler model alone, tensor in, BLS to fp32
    row = next(r for r in result.summary()["by_variant"] if r["concurrency"] == 1)
    assert row["scheduler_p50_over_direct_p50"] == pytest.approx(
        sched.p50_ms / result.point(FP32, "concurrency", 1).p50_ms
    )
    modes = {(p.target, p.mode, p.load) for p in result.points}
    assert {(FP32, "concurrency", 1.0), (FP32, "concurrency", 2.0)} <= modes
    assert any(p.mode == "request_rate" for p in result.points)
    assert [(b.variant, b.batch_size) for b in result.bare] == [(FP32, 1), (FP32, 2)]
    assert all(b.threads == 2 and b.img_per_s > 0 for b in result.bare)
    row = result.summary()["by_variant"][0]
    assert row["served_over_bare"] > 0 and row["ensemble_p50_over_direct_p50"] > 0
    ens = result.point(f"classifier[{FP32}]", "concurrency", 1)
    assert ens.server_stats[FP32].inference_count >= 1
    assert result.environment["tritonserver"] == "2.51.0" and result.environment["perf_analyzer"] == "2.51.0"

    files = write_report(result, cfg.output)
    names = {Path(f).name for f in files}
    assert {
        "bench.json",
        "points.csv",
        "report.md",
        "throughput_vs_p99.png",
        "latency_breakdown.png",
    } <= names
    for png in ("throughput_vs_p99.png", "latency_breakdown.png"):
        data = (cfg.output / png).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000
    md = (cfg.output / "report.md").read_text()
    assert "served / bare" in md and FP32 in md
    assert "## Pairs called directly at concurrency 2, interleaved (2 rounds)" in md


def test_bad_input_fails_before_any_work(built_repo, tmp_path):
    with pytest.raises(ValueError, match="unknown variant"):
        run_bench(BenchConfig(repo=built_repo, output=tmp_path, variants=("nope",)))
    with pytest.raises(ValueError, match="no Triton server"):
        run_bench(BenchConfig(repo=built_repo, output=tmp_path, url="127.0.0.1:1"))
    with pytest.raises(ValueError, match="concurrency"):
        run_bench(BenchConfig(repo=built_repo, output=tmp_path, concurrency=(0,)))
    assert not any(tmp_path.iterdir())


def test_bench_own_server_measures_the_pipeline_without_scheduler(built_repo, tmp_path):
    """Without --url the bench serves pipeline_<variant> (preprocess -> variant) beside the repository, so the
    ensemble is compared with the same JPEG request minus the scheduler, and today's path (exact preprocessing,
    one instance, ONNX Runtime int8) for the path rounds."""
    cfg = BenchConfig(
        repo=built_repo,
        output=tmp_path / "bench",
        n_images=2,
        variants=(FP32,),
        scheduler=False,
        concurrency=(1,),
        rate_fractions=(),
        measurement_interval_ms=600,
        stability_percentage=50.0,
        max_trials=4,
        bare=False,
        warmup=False,
        overhead_rounds=6,
        pair_rounds=0,
        path_rounds=1,
    )
    result = run_bench(cfg, log=lambda s: None)
    assert not result.errors, result.errors
    # one path round: today's path beside the repository, the ensemble's own choice, the fastest measured pair
    rows = result.path_summary()
    assert [r["target"] for r in rows] == [
        "classifier_exact_path[mobilenet_v2_int8]",
        "classifier[scheduler]",
        f"classifier[{FP32}]",
    ]
    assert all(r["rounds"] == 1 and r["median_img_per_s"] > 0 for r in rows)
    assert set(rows[0]["served"]) == {"mobilenet_v2_int8"} and rows[2]["served"].keys() == {FP32}
    assert rows[1]["over_today"]["ratio"] > 0 and rows[1]["over_today"]["low"] is None
    today = next(p for p in result.path_points if p.model == "classifier_exact_path")
    assert today.server_stats["preprocess_exact"].inference_count >= 1
    assert today.server_stats["preprocess"].inference_count == 0
    # the interleaved overhead measurement: every kind of target measured on the same rounds
    (oh,) = result.overhead
    assert oh.variant == FP32 and oh.rounds == 6
    assert set(oh.p50_ms) == {"variant", "pipeline", "ensemble", "scheduler"}
    for e in oh.ratios.values():
        assert 0 < e.low <= e.ratio <= e.high
    # the ensemble also decodes and resizes the JPEG and makes two more hops than a direct tensor call
    assert oh.ratios["ensemble_over_direct"].ratio > 1
    pipe = result.point(f"pipeline_{FP32}", "concurrency", 1)
    assert pipe is not None and pipe.p50_ms > 0
    stats = pipe.server_stats
    # the pipeline ran preprocess and the variant, never the scheduler
    assert stats["preprocess"].inference_count >= 1 and stats[FP32].inference_count >= 1
    assert stats["scheduler"].inference_count == 0
    row = result.summary()["by_variant"][0]
    ens = result.point(f"classifier[{FP32}]", "concurrency", 1)
    assert row["ensemble_p50_over_pipeline_p50"] == pytest.approx(ens.p50_ms / pipe.p50_ms)
    write_report(result, tmp_path / "report")
    md = (tmp_path / "report" / "report.md").read_text()
    assert "ensemble p50 / pipeline p50" in md and "targets interleaved (6 rounds)" in md
    assert "## Paths through the ensemble (JPEG in) at concurrency 1, interleaved (1 round)" in md


def test_open_loop_ramp_against_the_real_server(server, built_repo, tmp_path):
    """`tcsched ramp --request-rates`: perf_analyzer --async at a fixed rate, the scheduler with a budget vs
    static fp32, every run started on empty queues read from the real server's metrics."""
    import json
    import urllib.request

    from tcsched.client.ramp import pending_requests, run_ramp, wait_idle

    text = urllib.request.urlopen(server.metrics_url, timeout=5).read().decode()
    assert "nv_inference_pending_request_count{" in text and pending_requests(text) == 0
    assert wait_idle(server.metrics_url, timeout_s=10) < 5
    points = run_ramp(
        built_repo,
        tmp_path / "ramp",
        latency_budget_ms=2000.0,
        request_rates=(15.0,),
        variants=(FP32,),
        data_dir=SHARED if (SHARED / "labels.csv").is_file() else None,
        n_images=4,
        measurement_interval_ms=600,
        url=server.grpc_url,
        metrics_url=server.metrics_url,
        log=lambda s: None,
        rounds=1,
    )
    assert {p.target for p in points} == {"classifier[budget=2000ms]", f"classifier[{FP32}]"}
    for p in points:
        assert p.concurrency == 15.0 and p.n_requests > 0 and p.within_budget == 1.0
        assert 10 < p.throughput_img_s < 20  # open loop at 15 req/s: the server keeps up, so ~15 img/s
    fixed = next(p for p in points if p.target == f"classifier[{FP32}]")
    assert fixed.served_by == {FP32: fixed.n_requests} and fixed.served_agreement == 1.0
    report = json.loads((tmp_path / "ramp" / "ramp.json").read_text())
    assert report["mode"] == "request_rate" and (tmp_path / "ramp" / "ramp.png").read_bytes()[:8] == PNG_MAGIC
